//! nid-cell: one replica of a cell, a Raft group of three replicas over RocksDB.
//!
//! Layers, bottom up: [`codec`] (the only encoder of persisted values) and [`keys`] (the keyspace);
//! [`storage`] (`raft::Storage` over RocksDB); [`fsm`] (deterministic apply with the ownership
//! fence) over [`command`]s prepared by the leader ([`enroll`]) and sealed with [`crypto`];
//! [`peer`] (the Raft loop on its own thread); [`transport`] and [`service`] (gRPC);
//! [`server`] (wires a replica process together) and [`testkit`] (an in-process cluster with
//! network filters for tests).

pub mod codec;
pub mod command;
pub mod config;
pub mod crypto;
pub mod enroll;
pub mod fsm;
pub mod handlers;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod storage;
pub mod sweep;
pub mod testkit;
pub mod transport;

/// A slog logger for raft-rs that forwards to `tracing`.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        // raft-rs messages carry node ids, terms and indexes only: no identifiers or personal data.
        let msg = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}
