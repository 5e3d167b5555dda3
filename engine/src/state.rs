//! The engine's persisted state besides the log entries, in protobuf behind the format byte of
//! `nid_proto::codec`: Raft's local state, the apply state, and cell members.

/// Raft's durable per-replica state besides the entries.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RaftLocalState {
    /// The protobuf-encoded `HardState` (raft-rs's rust-protobuf type).
    #[prost(bytes = "vec", tag = "1")]
    pub hard_state: Vec<u8>,
    /// Index of the last entry in the log (the truncated index when the log is empty).
    #[prost(uint64, tag = "2")]
    pub last_index: u64,
    /// Term of that entry.
    #[prost(uint64, tag = "3")]
    pub last_term: u64,
}

/// How far the state machine has applied the log, and where the log starts. Written in the same
/// batch as the state-machine changes it covers.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ApplyState {
    /// Last applied entry.
    #[prost(uint64, tag = "1")]
    pub applied_index: u64,
    /// Its term.
    #[prost(uint64, tag = "2")]
    pub applied_term: u64,
    /// Last entry removed by compaction (or covered by the installed snapshot).
    #[prost(uint64, tag = "3")]
    pub truncated_index: u64,
    /// Its term.
    #[prost(uint64, tag = "4")]
    pub truncated_term: u64,
    /// The protobuf-encoded `ConfState` as of `applied_index`.
    #[prost(bytes = "vec", tag = "5")]
    pub conf_state: Vec<u8>,
}

/// A member of the cell: its node id, address and zone.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Member {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// host:port.
    #[prost(string, tag = "2")]
    pub address: String,
    /// Availability zone.
    #[prost(string, tag = "3")]
    pub zone: String,
}

/// A list of members (the persisted address book; the context of a membership change).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Members {
    /// The members, by id.
    #[prost(message, repeated, tag = "1")]
    pub members: Vec<Member>,
}
