//! The identity metrics of a data cell replica (the replication metrics are the engine's, the gRPC
//! ones `nid_support::grpc_metrics`'): authentication decisions, repeated answers, unknown
//! identifiers per partner, sweeps, and bytes moved by bucket migrations. Labels never carry identifiers or personal data; partner ids
//! are operator-assigned names of a bounded set.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// The identity metrics of one replica.
#[derive(Clone)]
pub struct CellMetrics {
    /// Authentication decisions signed by this replica, by result.
    pub auth_decisions: IntCounterVec,
    /// Retries of an already decided authentication answered with the stored decision.
    pub auth_repeated: IntCounter,
    /// Authentications of identifiers no identity has, by partner.
    pub auth_unknown: IntCounterVec,
    /// Sweep commands this replica proposed as leader and applied.
    pub sweeps: IntCounter,
    /// Replay markers and request records past their window deleted by those sweeps.
    pub swept: IntCounter,
    /// Bucket bytes (keys and values) exported from and imported into this cell by migrations.
    pub migration_bytes: IntCounterVec,
}

impl CellMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<CellMetrics> {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(CellMetrics {
            auth_decisions: counter_vec(
                "nid_auth_decisions_total",
                "Authentication decisions signed by this replica, by result and first reason (none on a yes).",
                &["result", "reason"],
            )?,
            auth_repeated: counter(
                "nid_auth_repeated_answers_total",
                "Retries of an already decided authentication answered with the stored decision.",
            )?,
            auth_unknown: counter_vec(
                "nid_auth_unknown_identity_total",
                "Authentications of identifiers no identity has (answered no without a Raft write), by partner.",
                &["partner"],
            )?,
            sweeps: counter(
                "nid_sweeps_total",
                "Sweeps of replay markers and request records this replica proposed as leader and applied.",
            )?,
            swept: counter(
                "nid_swept_entries_total",
                "Replay markers and request records past their window deleted by sweeps this replica proposed.",
            )?,
            migration_bytes: counter_vec(
                "nid_migration_bytes_total",
                "Bucket bytes (keys and values) this replica exported or imported for bucket moves, by direction.",
                &["direction"],
            )?,
        })
    }

    /// Counts bytes exported for a bucket move.
    pub fn migration_exported(&self, bytes: u64) {
        self.migration_bytes.with_label_values(&["export"]).inc_by(bytes);
    }

    /// Counts bytes imported for a bucket move.
    pub fn migration_imported(&self, bytes: u64) {
        self.migration_bytes.with_label_values(&["import"]).inc_by(bytes);
    }
}
