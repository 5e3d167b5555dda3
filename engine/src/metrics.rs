//! Prometheus metrics of one replica's replication (etcd-style names with a `nid_` prefix, base
//! units in names, counters ending in `_total`). Registered in a registry the caller owns (an
//! in-process test cell holds several). Labels never carry identifiers or personal data.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The replication metrics of one replica.
#[derive(Clone)]
pub struct RaftMetrics {
    /// 1 when the replica knows its cell's leader.
    pub has_leader: IntGauge,
    /// 1 when the replica is the leader.
    pub is_leader: IntGauge,
    /// Leader changes seen.
    pub leader_changes: IntCounter,
    /// Current term.
    pub term: IntGauge,
    /// Commit index.
    pub commit_index: IntGauge,
    /// Applied index.
    pub applied_index: IntGauge,
    /// Entries in the log (after the truncated index).
    pub log_entries: IntGauge,
    /// Voters in the cell's configuration.
    pub voters: IntGauge,
    /// Client commands committed and applied.
    pub proposals_committed: IntCounter,
    /// Client commands that failed, by reason.
    pub proposals_failed: IntCounterVec,
    /// Client work waiting in the loop's queue.
    pub client_queue: IntGauge,
    /// Entries appended per Ready.
    pub ready_entries: Histogram,
    /// Client commands per proposed entry (group commit).
    pub batch_commands: Histogram,
    /// Duration of the Ready's log write (the fsync).
    pub fsync_seconds: Histogram,
    /// Duration of applying a Ready's committed entries.
    pub apply_seconds: Histogram,
    /// Snapshots by operation.
    pub snapshots: IntCounterVec,
    /// Log entries removed by compaction.
    pub log_compacted: IntCounter,
    /// Raft messages refused by the transport, by reason.
    pub messages_rejected: IntCounterVec,
    /// Buckets per ownership state.
    pub buckets: IntGaugeVec,
    /// 1 while the Raft loop runs; 0 once it stopped (after a storage failure or at shutdown).
    pub running: IntGauge,
}

/// Latency buckets in seconds, 100 us to 5 s.
pub fn latency_buckets() -> Vec<f64> {
    vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
}

impl RaftMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<RaftMetrics> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let sizes = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
        let buckets = IntGaugeVec::new(
            Opts::new("nid_buckets", "Buckets of this cell per ownership state."),
            &["state"],
        )?;
        registry.register(Box::new(buckets.clone()))?;
        Ok(RaftMetrics {
            has_leader: gauge("nid_raft_has_leader", "1 when this replica knows its cell's leader.")?,
            is_leader: gauge("nid_raft_is_leader", "1 when this replica is its cell's leader.")?,
            leader_changes: counter(
                "nid_raft_leader_changes_seen_total",
                "Leader changes seen by this replica.",
            )?,
            term: gauge("nid_raft_term", "Current Raft term.")?,
            commit_index: gauge("nid_raft_commit_index", "Raft commit index.")?,
            applied_index: gauge("nid_raft_applied_index", "Last applied Raft index.")?,
            log_entries: gauge("nid_raft_log_entries", "Entries in the Raft log after the last compaction.")?,
            voters: gauge(
                "nid_raft_voters",
                "Voters in the cell's configuration as this replica applied it.",
            )?,
            proposals_committed: counter(
                "nid_raft_proposals_committed_total",
                "Client commands committed and applied.",
            )?,
            proposals_failed: counter_vec(
                "nid_raft_proposals_failed_total",
                "Client commands that failed, by reason.",
                &["reason"],
            )?,
            client_queue: gauge(
                "nid_raft_client_queue",
                "Client proposals and reads waiting for the Raft loop.",
            )?,
            ready_entries: histogram(
                "nid_raft_ready_entries",
                "Log entries persisted per Ready.",
                sizes.clone(),
            )?,
            batch_commands: histogram(
                "nid_raft_batch_commands",
                "Client commands per proposed entry.",
                sizes,
            )?,
            fsync_seconds: histogram(
                "nid_raft_fsync_duration_seconds",
                "Duration of the synced log write of one Ready.",
                latency_buckets(),
            )?,
            apply_seconds: histogram(
                "nid_raft_apply_duration_seconds",
                "Duration of applying one Ready's committed entries.",
                latency_buckets(),
            )?,
            snapshots: counter_vec("nid_raft_snapshots_total", "Snapshots by operation.", &["op"])?,
            log_compacted: counter(
                "nid_raft_log_compacted_entries_total",
                "Log entries removed by compaction.",
            )?,
            messages_rejected: counter_vec(
                "nid_raft_messages_rejected_total",
                "Raft messages refused by the transport, by reason.",
                &["reason"],
            )?,
            buckets,
            running: gauge("nid_raft_running", "1 while the replica's Raft loop runs.")?,
        })
    }
}
