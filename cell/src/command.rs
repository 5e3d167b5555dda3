//! Commands carried in the Raft log. Deterministic: everything random or time-based (UIN candidates,
//! nonces, timestamps) is chosen by the leader before proposing; apply only checks and writes.
//!
//! No plaintext identifier or personal data enters the log: natural keys arrive as keyed hashes and
//! payloads sealed with the cell keyring (see [`crate::crypto`]).

use bincode::{Decode, Encode};

/// One Raft entry's payload: the client commands the leader batched into it (group commit).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EntryBatch {
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

/// A state-machine command.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Command {
    /// Create an identity (or return the existing one for a retried RID).
    Enroll(EnrollCommand),
    /// Control cell: create the cluster (config and the first routing table), once.
    ControlInit {
        /// Protobuf `nid.v1.ClusterConfig`.
        config: Vec<u8>,
        /// Protobuf `nid.v1.RoutingTable` (version 1, with the cells).
        table: Vec<u8>,
    },
    /// Control cell: add or update a cell in the registry (bumps the table version).
    ControlRegisterCell {
        /// Protobuf `nid.v1.CellInfo`.
        cell: Vec<u8>,
    },
    /// Control cell: the one decision point of a bucket move: owner `from` -> `to` if the bucket's
    /// epoch is still `expected_epoch` (compare-and-swap); epoch and table version grow by one.
    ControlCommitMove {
        /// The bucket.
        bucket: u16,
        /// Current owner.
        from: u64,
        /// New owner.
        to: u64,
        /// The epoch the coordinator observed.
        expected_epoch: u64,
    },
    /// Set the ownership state of buckets (driven by the control cell and the rebalancer).
    SetBuckets {
        /// The buckets.
        buckets: Vec<u16>,
        /// The new state.
        state: BucketState,
        /// The routing-table version that decided it; older versions are ignored.
        table_version: u64,
    },
}

impl Command {
    /// Roughly how many bytes the command takes in a log entry (for sizing entries).
    pub fn approx_len(&self) -> usize {
        match self {
            Command::Enroll(e) => e.sealed.len() + 128,
            Command::ControlInit { config, table } => config.len() + table.len() + 16,
            Command::ControlRegisterCell { cell } => cell.len() + 16,
            Command::ControlCommitMove { .. } => 64,
            Command::SetBuckets { buckets, .. } => buckets.len() * 2 + 32,
        }
    }
}

/// Ownership state of one bucket on this cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum BucketState {
    /// Not ours: commands are rejected with a wrong-owner hint.
    NotOwned,
    /// Ours: commands apply.
    Owned,
    /// Being imported by a migration: client commands get retry-later.
    Importing,
    /// Frozen at the source of a migration: reads serve, writes get retry-later.
    Frozen,
}

/// The durable value of a bucket-state key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct BucketRecord {
    /// The state.
    pub state: BucketState,
    /// Routing-table version that set it.
    pub table_version: u64,
}

/// An enrolment as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EnrollCommand {
    /// Bucket of the RID (and so of the UIN).
    pub bucket: u16,
    /// Keyed hash of the RID.
    pub rid_hash: [u8; 32],
    /// [`EnrollSecret`], sealed with the RID hash as associated data.
    pub sealed: Vec<u8>,
    /// Keyed digest of the whole request: the same RID with another payload is a conflict.
    pub payload_mac: [u8; 32],
    /// Leader's clock at proposal, Unix milliseconds.
    pub now_ms: u64,
    /// Nonce for sealing the RID index value.
    pub rid_nonce: [u8; 12],
    /// Nonce for sealing the identity record.
    pub record_nonce: [u8; 12],
}

/// The sealed part of an enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EnrollSecret {
    /// The protobuf `EnrollRequest` with the PIN removed.
    pub request: Vec<u8>,
    /// Keyed PIN verifier, when a PIN was given.
    pub pin_verifier: Option<[u8; 32]>,
    /// TOTP secret, when one was provisioned.
    pub totp_secret: Option<Vec<u8>>,
    /// Candidate UINs inside the bucket, in preference order (12-digit strings).
    pub candidates: Vec<String>,
}

/// The identity record, sealed under its UIN key.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IdentityRecord {
    /// The UIN (12 digits).
    pub uin: String,
    /// Lifecycle status (`nid.v1.IdentityStatus` number).
    pub status: i32,
    /// Record version, starting at 1.
    pub version: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
    /// The protobuf `EnrollRequest` (PIN removed) the identity was created from.
    pub request: Vec<u8>,
    /// Keyed PIN verifier.
    pub pin_verifier: Option<[u8; 32]>,
    /// TOTP secret.
    pub totp_secret: Option<Vec<u8>>,
    /// Keyed digest of the enrolment request.
    pub payload_mac: [u8; 32],
}

/// The value of a RID index key, sealed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RidRecord {
    /// The UIN the RID created.
    pub uin: String,
    /// Keyed digest of the request that created it.
    pub payload_mac: [u8; 32],
}

/// What applying one command produced; returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandResult {
    /// An enrolment applied (or matched an earlier one).
    Enrolled {
        /// The UIN.
        uin: String,
        /// True when this command created it.
        created: bool,
        /// The TOTP secret, when the identity has one.
        totp_secret: Option<Vec<u8>>,
    },
    /// Bucket states changed.
    BucketsSet,
    /// The control state changed (or already matched); the routing-table version after it.
    Control {
        /// True when this command created or changed something.
        changed: bool,
        /// Table version.
        version: u64,
    },
    /// The command was refused; nothing was written.
    Rejected(Rejection),
}

/// Why a command was refused at apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The cell does not own the bucket.
    WrongOwner {
        /// The bucket.
        bucket: u16,
        /// The table version behind the cell's belief.
        table_version: u64,
    },
    /// The bucket is migrating.
    RetryLater {
        /// The bucket.
        bucket: u16,
    },
    /// The RID exists with a different payload.
    RidConflict,
    /// Every candidate UIN was taken (the leader retries with new ones).
    CandidatesTaken,
    /// The command did not decode or open (deterministic on every replica).
    Malformed(String),
    /// A bucket move whose owner or epoch no longer matches (someone else moved it).
    MoveConflict,
    /// The cluster already exists with another config.
    ClusterExists,
    /// The cluster has not been initialized.
    NoCluster,
    /// A routing-table version older than the one recorded.
    StaleTableVersion {
        /// The version on record.
        current: u64,
    },
}
