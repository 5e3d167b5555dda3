//! Prometheus metrics of one replica (etcd-style names with a `nid_` prefix); `nid_support` serves
//! them over HTTP. Labels never carry identifiers or personal data.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The replica's metrics, registered in their own registry (an in-process test cluster holds many).
pub struct CellMetrics {
    /// The registry.
    pub registry: Registry,
    /// 1 when the replica knows a leader.
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
    pub apply_index: IntGauge,
    /// Client commands committed.
    pub proposals_committed: IntCounter,
    /// Client commands that failed, by reason.
    pub proposals_failed: IntCounterVec,
    /// Entries appended per Ready.
    pub ready_entries: Histogram,
    /// Client commands per proposed entry (group commit).
    pub batch_commands: Histogram,
    /// Duration of the Ready's log write (the fsync).
    pub fsync_seconds: Histogram,
    /// Duration of applying a Ready's committed entries.
    pub apply_seconds: Histogram,
    /// Snapshots by operation: message_sent, sent / send_failed (files delivered or not), received,
    /// applied.
    pub snapshots: IntCounterVec,
    /// Log entries removed by compaction.
    pub log_compacted: IntCounter,
    /// Raft messages refused by the transport, by reason.
    pub messages_rejected: IntCounterVec,
    /// On-disk size of the replica's RocksDB.
    pub rocksdb_size: IntGauge,
    /// gRPC requests by method and code.
    pub grpc_requests: IntCounterVec,
    /// gRPC latency by method.
    pub grpc_seconds: HistogramVec,
    /// Authentication decisions by result (yes/no); never labelled by identity or partner.
    pub auth_decisions: IntCounterVec,
    /// Answers to retries of an already decided authentication (the stored decision, re-sent).
    pub auth_repeated: IntCounter,
    /// Replay markers deleted by sweeps this replica proposed.
    pub replay_markers_swept: IntCounter,
    /// Sweep commands this replica proposed that were applied.
    pub replay_sweeps: IntCounter,
}

fn buckets_seconds() -> Vec<f64> {
    vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
}

impl CellMetrics {
    /// Creates and registers every metric.
    pub fn new() -> CellMetrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            registry.register(Box::new(g.clone())).unwrap_or_else(|e| unreachable!("register {name}: {e}"));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            registry.register(Box::new(c.clone())).unwrap_or_else(|e| unreachable!("register {name}: {e}"));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            registry.register(Box::new(c.clone())).unwrap_or_else(|e| unreachable!("register {name}: {e}"));
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            registry.register(Box::new(h.clone())).unwrap_or_else(|e| unreachable!("register {name}: {e}"));
            h
        };
        let sizes = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
        let grpc_seconds = HistogramVec::new(
            HistogramOpts::new("nid_grpc_server_handling_seconds", "gRPC handling latency by method.")
                .buckets(buckets_seconds()),
            &["grpc_method"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        registry.register(Box::new(grpc_seconds.clone())).unwrap_or_else(|e| unreachable!("register: {e}"));
        CellMetrics {
            has_leader: gauge("nid_raft_has_leader", "1 when this replica knows its cell's leader."),
            is_leader: gauge("nid_raft_is_leader", "1 when this replica is its cell's leader."),
            leader_changes: counter(
                "nid_raft_leader_changes_seen_total",
                "Leader changes seen by this replica.",
            ),
            term: gauge("nid_raft_term", "Current Raft term."),
            commit_index: gauge("nid_raft_commit_index", "Raft commit index."),
            apply_index: gauge("nid_raft_apply_index", "Last applied Raft index."),
            proposals_committed: counter(
                "nid_raft_proposals_committed_total",
                "Client commands committed and applied.",
            ),
            proposals_failed: counter_vec(
                "nid_raft_proposals_failed_total",
                "Client commands that failed, by reason.",
                &["reason"],
            ),
            ready_entries: histogram(
                "nid_raft_ready_entries",
                "Log entries persisted per Ready.",
                sizes.clone(),
            ),
            batch_commands: histogram(
                "nid_raft_batch_commands",
                "Client commands per proposed entry.",
                sizes,
            ),
            fsync_seconds: histogram(
                "nid_raft_fsync_duration_seconds",
                "Duration of the synced log write of one Ready.",
                buckets_seconds(),
            ),
            apply_seconds: histogram(
                "nid_raft_apply_duration_seconds",
                "Duration of applying one Ready's committed entries.",
                buckets_seconds(),
            ),
            snapshots: counter_vec("nid_raft_snapshots_total", "Snapshots by operation.", &["op"]),
            log_compacted: counter(
                "nid_raft_log_compacted_entries_total",
                "Log entries removed by compaction.",
            ),
            messages_rejected: counter_vec(
                "nid_raft_messages_rejected_total",
                "Raft messages refused by the transport, by reason.",
                &["reason"],
            ),
            rocksdb_size: gauge("nid_rocksdb_size_bytes", "Live SST plus WAL size of the replica's RocksDB."),
            auth_decisions: counter_vec(
                "nid_auth_decisions_total",
                "Authentication decisions signed by this replica, by result.",
                &["result"],
            ),
            auth_repeated: counter(
                "nid_auth_repeated_answers_total",
                "Retries of an already decided authentication answered with the stored decision.",
            ),
            replay_markers_swept: counter(
                "nid_auth_replay_markers_swept_total",
                "Replay markers past the replay window deleted by sweeps this replica proposed as leader.",
            ),
            replay_sweeps: counter(
                "nid_auth_replay_sweeps_total",
                "Replay-marker sweep commands (one span of buckets each) this replica proposed as leader and applied.",
            ),
            grpc_requests: counter_vec(
                "nid_grpc_server_handled_total",
                "gRPC requests handled, by method and code.",
                &["grpc_method", "grpc_code"],
            ),
            grpc_seconds,
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for CellMetrics {
    fn default() -> Self {
        CellMetrics::new()
    }
}
