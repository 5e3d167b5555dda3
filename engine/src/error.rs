//! The engine's errors: [`StorageError`] (the replica's own disk or data; fatal to the Raft loop)
//! and [`EngineError`] (what a proposer or reader is told; each variant says whether and where to
//! retry).

use nid_proto::codec::CodecError;
use std::time::Duration;

/// A failure of the replica's own storage or of a value it holds.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value did not decode.
    #[error("corrupt {what}: {source}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        source: CodecError,
    },
    /// A stored raft-rs protobuf did not decode.
    #[error("corrupt {what}: {source}")]
    CorruptProto {
        /// Which value.
        what: &'static str,
        /// Why.
        source: protobuf::ProtobufError,
    },
    /// A snapshot failed its checksum or shape checks, or its files could not be handled.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A column family is missing.
    #[error("column family {0} missing")]
    MissingCf(&'static str),
    /// The state machine cannot go on on this replica (a missing key, a broken invariant): the
    /// replica stops applying rather than diverge.
    #[error("state machine halted: {0}")]
    Halted(String),
    /// This replica's log lost entries its cell counts as stored here (recorded by the replica
    /// when a heartbeat proved it): it must be replaced under a new node id, never restarted.
    #[error("{0}")]
    LostLog(String),
}

/// Why a proposal, a read or an admin request did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// This replica is not the leader; `leader` is the leader's node id when known.
    #[error("not the leader")]
    NotLeader {
        /// The leader's node id, when known.
        leader: Option<u64>,
    },
    /// The cell does not own the bucket (the fence).
    #[error("the cell does not own the bucket")]
    WrongOwner {
        /// The bucket.
        bucket: u16,
        /// The routing-table version behind the cell's belief.
        table_version: u64,
    },
    /// The bucket is migrating: retry later.
    #[error("the bucket is migrating")]
    RetryLater {
        /// The bucket.
        bucket: u16,
    },
    /// The deadline passed first. For a write the outcome is unknown.
    #[error("timed out")]
    Timeout,
    /// Raft dropped the proposal (leadership changed or a transfer is running); nothing applied.
    #[error("proposal dropped; retry")]
    Dropped,
    /// The replica's client queue is full: shed, retry with backoff.
    #[error("replica overloaded")]
    Busy {
        /// A suggested wait before retrying.
        retry_after: Duration,
    },
    /// The replica is shutting down or stopped after a storage failure.
    #[error("replica stopped")]
    Stopped,
    /// The command's bytes do not decode (the same on every replica).
    #[error("malformed command: {0}")]
    Malformed(String),
    /// An ownership change older than the one on record.
    #[error("routing-table version is older than the recorded {current}")]
    StaleTableVersion {
        /// The version on record.
        current: u64,
    },
    /// The request is not valid for the current state (membership, bucket table).
    #[error("{0}")]
    Invalid(String),
}
