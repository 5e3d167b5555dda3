//! The control state machine's commands. The values they carry are the contract's own messages
//! (`ClusterConfig`, `RoutingTable`, `CellInfo`, `PartnerRecord`): the control cell stores exactly
//! what routers and `nidctl` read, and those messages evolve by protobuf's rules.

use nid_proto::v1::{CellInfo, ClusterConfig, Migration, PartnerRecord, RoutingTable, SetRebalanceRequest};

/// One control command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControlCommand {
    /// What it does.
    #[prost(oneof = "control_command::Kind", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9")]
    pub kind: Option<control_command::Kind>,
}

/// The variants of [`ControlCommand`].
pub mod control_command {
    /// A control command's kind.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// Create the cluster (config and routing table version 1), once.
        #[prost(message, tag = "1")]
        Init(super::Init),
        /// Add or update a cell in the registry (bumps the table version).
        #[prost(message, tag = "2")]
        RegisterCell(nid_proto::v1::CellInfo),
        /// Add, update or revoke a partner.
        #[prost(message, tag = "3")]
        PutPartner(super::PutPartner),
        /// The one decision point of a bucket move (compare-and-swap on the routing table).
        #[prost(message, tag = "4")]
        CommitMove(super::CommitMove),
        /// Record a bucket move's progress (the rebalancer resumes from it).
        #[prost(message, tag = "5")]
        RecordMigration(nid_proto::v1::Migration),
        /// Change a cell's state (joining, active, draining).
        #[prost(message, tag = "6")]
        SetCellState(super::SetCellState),
        /// Remove a cell that owns nothing from the registry.
        #[prost(uint64, tag = "7")]
        RemoveCell(u64),
        /// Change the rebalancer's settings.
        #[prost(message, tag = "8")]
        SetRebalance(nid_proto::v1::SetRebalanceRequest),
        /// Replace a registered cell's replicas, if they are still those the caller read.
        #[prost(message, tag = "9")]
        UpdateReplicas(super::UpdateReplicas),
    }
}

impl ControlCommand {
    /// A command of `kind`.
    pub fn new(kind: control_command::Kind) -> ControlCommand {
        ControlCommand { kind: Some(kind) }
    }
}

/// Create the cluster.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Init {
    /// The config.
    #[prost(message, optional, tag = "1")]
    pub config: Option<ClusterConfig>,
    /// The first routing table (version 1, every epoch 0).
    #[prost(message, optional, tag = "2")]
    pub table: Option<RoutingTable>,
}

/// Store a partner.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutPartner {
    /// The partner with its credential verifier.
    #[prost(message, optional, tag = "1")]
    pub partner: Option<PartnerRecord>,
    /// Refuse if the partner id exists.
    #[prost(bool, tag = "2")]
    pub create_only: bool,
}

/// Move bucket `bucket` from `from` to `to` if its epoch is still `expected_epoch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitMove {
    /// The bucket.
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// Current owner.
    #[prost(uint64, tag = "2")]
    pub from: u64,
    /// New owner.
    #[prost(uint64, tag = "3")]
    pub to: u64,
    /// The epoch the coordinator observed.
    #[prost(uint64, tag = "4")]
    pub expected_epoch: u64,
    /// A batch instead of `bucket` alone: every bucket moves, or none.
    #[prost(uint32, repeated, tag = "5")]
    pub buckets: Vec<u32>,
    /// The epoch observed for each bucket of the batch.
    #[prost(uint64, repeated, tag = "6")]
    pub expected_epochs: Vec<u64>,
}

/// The buckets a migration record carries: its batch, or its single bucket.
pub fn buckets_of(m: &nid_proto::v1::Migration) -> Vec<u32> {
    if m.buckets.is_empty() { vec![m.bucket] } else { m.buckets.clone() }
}

/// Set a cell's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetCellState {
    /// The cell.
    #[prost(uint64, tag = "1")]
    pub cell_id: u64,
    /// `nid.v1.CellState`.
    #[prost(int32, tag = "2")]
    pub state: i32,
}

/// Replace a registered cell's replicas (after one was replaced), keeping its state and weight: a
/// compare-and-swap on the replicas the caller read, so it never brings back a cell removed
/// meanwhile nor undoes another update.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateReplicas {
    /// The cell.
    #[prost(uint64, tag = "1")]
    pub cell_id: u64,
    /// Its replicas from now on.
    #[prost(message, repeated, tag = "2")]
    pub replicas: Vec<nid_proto::v1::ReplicaInfo>,
    /// The replicas the registry listed when the caller read it.
    #[prost(message, repeated, tag = "3")]
    pub expected: Vec<nid_proto::v1::ReplicaInfo>,
}

/// The migrations the control cell remembers: those in flight (one per bucket at most) and the
/// most recent finished ones.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MigrationLog {
    /// In flight, by start.
    #[prost(message, repeated, tag = "1")]
    pub active: Vec<Migration>,
    /// Finished (cleaned up or aborted), oldest first, at most [`FINISHED_KEPT`].
    #[prost(message, repeated, tag = "2")]
    pub finished: Vec<Migration>,
}

/// How many finished migrations the log keeps.
pub const FINISHED_KEPT: usize = 256;

/// Checks a rebalancer settings change: `None` when fine.
pub fn check_rebalance(r: &SetRebalanceRequest) -> Option<(&'static str, &'static str)> {
    match r.max_in_flight {
        Some(n) if !(1..=64).contains(&n) => Some(("max_in_flight", "must be 1..=64")),
        _ => None,
    }
}

/// What a control command changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    /// True when the command created or changed something (false: it already held).
    pub changed: bool,
    /// The routing-table version (partner-list version for partners) after it.
    pub version: u64,
}

/// Why a control command was refused (the same on every replica; nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlRejection {
    /// The command is inconsistent.
    #[error("malformed control command: {0}")]
    Malformed(&'static str),
    /// The cluster exists with another config.
    #[error("the cluster exists with another config")]
    ClusterExists,
    /// The cluster has not been initialized.
    #[error("the cluster has not been initialized")]
    NoCluster,
    /// A partner with this id exists and the command only creates.
    #[error("a partner with this id exists")]
    PartnerExists,
    /// The bucket's owner or epoch changed since the coordinator read it.
    #[error("the bucket's owner or epoch changed; read the table and retry")]
    MoveConflict,
    /// A version or epoch would overflow.
    #[error("a version or epoch is exhausted")]
    Exhausted,
    /// The cell is not registered.
    #[error("no such cell")]
    NoSuchCell,
    /// The migration record does not follow from the one in flight (another move of the bucket,
    /// a phase going back, a move of a bucket its source does not own).
    #[error("the migration does not follow from the recorded one: {0}")]
    MigrationConflict(&'static str),
    /// The registry changed since the caller read it.
    #[error("the registry changed since it was read; read it again")]
    RegistryChanged,
    /// The cell still owns buckets, takes part in a move, or is the last one that may own buckets.
    #[error("the cell cannot be changed so: {0}")]
    CellBusy(&'static str),
}

/// A checked config, table or registry entry for InitCluster: `None` when fine.
pub fn check_init(config: &ClusterConfig, table: &RoutingTable) -> Option<(&'static str, &'static str)> {
    let n = usize::from(nid_proto::bucket::BUCKETS);
    if config.buckets != u32::from(nid_proto::bucket::BUCKETS) {
        return Some(("config.buckets", "must be 16384"));
    }
    if config.id_scheme_seed.len() != 32 {
        return Some(("config.id_scheme_seed", "must be 32 bytes"));
    }
    if table.version != 1 {
        return Some(("table.version", "a new cluster's table starts at version 1"));
    }
    if table.owner.len() != n || table.epoch.len() != n {
        return Some(("table.owner", "must have one owner and one epoch per bucket (16384)"));
    }
    if table.epoch.iter().any(|&e| e != 0) {
        return Some(("table.epoch", "a new cluster's buckets start at epoch 0"));
    }
    let cells: std::collections::HashSet<u64> = table.cells.iter().map(|c| c.cell_id).collect();
    if cells.len() != table.cells.len() {
        return Some(("table.cells", "cell ids must be distinct"));
    }
    if table.owner.iter().any(|o| !cells.contains(o)) {
        return Some(("table.owner", "every owner must be one of the table's cells"));
    }
    table.cells.iter().find_map(check_cell)
}

/// Checks a registry entry.
pub fn check_cell(cell: &CellInfo) -> Option<(&'static str, &'static str)> {
    if cell.cell_id == 0 {
        return Some(("cell.cell_id", "must be > 0 (0 is the control cell)"));
    }
    if cell.replicas.is_empty() {
        return Some(("cell.replicas", "at least one replica is required"));
    }
    if !(1..=1000).contains(&cell.weight) {
        return Some(("cell.weight", "must be 1..=1000"));
    }
    None
}
