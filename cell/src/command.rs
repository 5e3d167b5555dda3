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
    /// Change or authenticate an existing identity (one bucket, one identity).
    Identity(IdentityCommand),
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
    /// Control cell: add, update or revoke a partner (bumps the partner-list version).
    ControlPutPartner {
        /// Protobuf `nid.v1.PartnerRecord` (the credential only as a keyed hash).
        partner: Vec<u8>,
        /// Refuse if the partner id exists.
        create_only: bool,
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
    /// Delete the replay-index markers decided before `before_ms` in the owned buckets of
    /// `[first, end)`, at most `limit` of them. The leader proposes it periodically; being a Raft
    /// command, every replica forgets the same markers at the same point of the log.
    SweepTxnMarkers {
        /// First bucket.
        first: u16,
        /// One past the last bucket (at most `BUCKETS`).
        end: u16,
        /// Markers decided before this Unix ms go.
        before_ms: u64,
        /// At most this many per command (>= 1), so one apply stays short.
        limit: u32,
    },
}

impl Command {
    /// Roughly how many bytes the command takes in a log entry (for sizing entries).
    pub fn approx_len(&self) -> usize {
        match self {
            Command::Enroll(e) => e.sealed.len() + 128,
            Command::Identity(c) => c.sealed.len() + 96,
            Command::ControlPutPartner { partner, .. } => partner.len() + 16,
            Command::ControlInit { config, table } => config.len() + table.len() + 16,
            Command::ControlRegisterCell { cell } => cell.len() + 16,
            Command::ControlCommitMove { .. } => 64,
            Command::SetBuckets { buckets, .. } => buckets.len() * 2 + 32,
            Command::SweepTxnMarkers { .. } => 32,
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
    /// Seed the nonces of the values this command writes are derived from.
    pub seed: [u8; 16],
}

/// The sealed part of an enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EnrollSecret {
    /// The protobuf `EnrollRequest` with the PIN removed.
    pub request: Vec<u8>,
    /// Keyed PIN verifier, when a PIN was given.
    pub pin_verifier: Option<PinVerifier>,
    /// TOTP secret, when one was provisioned.
    pub totp_secret: Option<Vec<u8>>,
    /// Candidate UINs inside the bucket, in preference order (12-digit strings).
    pub candidates: Vec<String>,
}

/// The identity record, sealed under its UIN key with the record version as associated data.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IdentityRecord {
    /// The UIN (12 digits).
    pub uin: String,
    /// Lifecycle status (`nid.v1.IdentityStatus` number).
    pub status: i32,
    /// Why the status last changed (free text from the operator; sealed like the rest).
    pub status_reason: String,
    /// Record version, starting at 1; grows with every change visible in `Identity`.
    pub version: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
    /// The protobuf `EnrollRequest` (PIN removed): RID, current demographics and biometrics.
    pub request: Vec<u8>,
    /// Keyed digest of the enrolment request.
    pub payload_mac: [u8; 32],
    /// Keyed PIN verifier.
    pub pin: Option<PinVerifier>,
    /// TOTP secret.
    pub totp_secret: Option<Vec<u8>>,
    /// The last TOTP time step accepted; a code for this step or an earlier one is refused.
    pub totp_last_step: u64,
    /// Virtual ids, active and revoked.
    pub vids: Vec<VidEntry>,
    /// Auth-type locks set by the resident.
    pub locks: Vec<LockEntry>,
    /// Consecutive failed factor checks.
    pub failures: u32,
    /// Authentication is refused until this time after too many failures (Unix ms; 0 = not).
    pub locked_until_ms: u64,
    /// Number of audit records.
    pub audit_len: u64,
    /// Hash of the last audit record (zeros before the first).
    pub audit_head: [u8; 32],
}

/// A salted, keyed PIN verifier: HMAC-SHA256(PIN key, salt || PIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct PinVerifier {
    /// Random per-identity salt.
    pub salt: [u8; 16],
    /// The MAC.
    pub mac: [u8; 32],
}

/// A virtual id of an identity.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct VidEntry {
    /// The VID (16 digits).
    pub vid: String,
    /// `nid.v1.VidKind` number.
    pub kind: i32,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Expiry (temporary VIDs), Unix ms.
    pub expires_ms: Option<u64>,
    /// Authentications left (temporary VIDs with a limit); None = unlimited.
    pub uses_left: Option<u32>,
    /// True once revoked.
    pub revoked: bool,
}

/// A lock on one auth type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct LockEntry {
    /// `nid.v1.AuthType` number.
    pub auth_type: i32,
    /// The lock ends at this time (Unix ms); None = until unlocked.
    pub until_ms: Option<u64>,
}

/// One version of an identity as kept in its history (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HistoryEntry {
    /// Version.
    pub version: u64,
    /// Status.
    pub status: i32,
    /// Why the status last changed.
    pub status_reason: String,
    /// Creation time of the identity.
    pub created_ms: u64,
    /// Time of this version.
    pub updated_ms: u64,
    /// The protobuf `EnrollRequest` (PIN removed) as of this version.
    pub request: Vec<u8>,
    /// VIDs as of this version.
    pub vids: Vec<VidEntry>,
    /// Locks as of this version.
    pub locks: Vec<LockEntry>,
    /// A PIN was enrolled.
    pub has_pin: bool,
    /// A TOTP secret was enrolled.
    pub has_totp: bool,
}

impl IdentityRecord {
    /// The history view of the current version.
    pub fn history_entry(&self) -> HistoryEntry {
        HistoryEntry {
            version: self.version,
            status: self.status,
            status_reason: self.status_reason.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            request: self.request.clone(),
            vids: self.vids.clone(),
            locks: self.locks.clone(),
            has_pin: self.pin.is_some(),
            has_totp: self.totp_secret.is_some(),
        }
    }
}

/// One audited authentication decision. Records form a hash chain per identity: `prev` is the
/// SHA-256 of the previous record's encoding.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Decision time, Unix ms.
    pub time_ms: u64,
    /// The partner.
    pub partner_id: String,
    /// The partner's transaction id.
    pub transaction_id: String,
    /// Yes or no.
    pub authenticated: bool,
    /// `nid.v1.AuthReason` numbers.
    pub reasons: Vec<i32>,
    /// `nid.v1.AuthType` numbers of the factors presented.
    pub auth_types: Vec<i32>,
    /// Hash of the previous record (zeros for the first).
    pub prev: [u8; 32],
}

/// The value of a VID index key, sealed: the UIN the VID belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct VidIndex {
    /// The UIN.
    pub uin: String,
}

/// How an identity command names its identity: the keyed hash of a UIN or of a VID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Target {
    /// Keyed hash of a UIN.
    Uin([u8; 32]),
    /// Keyed hash of a VID.
    Vid([u8; 32]),
}

/// A change to (or an authentication of) one identity, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IdentityCommand {
    /// The identity's bucket.
    pub bucket: u16,
    /// The identity.
    pub target: Target,
    /// [`IdentityOp`], sealed with the bucket and target as associated data.
    pub sealed: Vec<u8>,
    /// Leader's clock at proposal, Unix ms.
    pub now_ms: u64,
    /// Seed the nonces of the values this command writes are derived from.
    pub seed: [u8; 16],
}

/// What an [`IdentityCommand`] does.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum IdentityOp {
    /// Replace demographics and biometrics if the version still matches.
    Update {
        /// The version the caller read.
        expected_version: u64,
        /// Protobuf `Demographics`.
        demographics: Vec<u8>,
        /// Protobuf `BiometricReference`s.
        biometrics: Vec<Vec<u8>>,
    },
    /// Change the lifecycle status.
    SetStatus {
        /// `nid.v1.IdentityStatus` number.
        status: i32,
        /// Why.
        reason: String,
    },
    /// Create a VID from the first free candidate.
    CreateVid {
        /// `nid.v1.VidKind` number.
        kind: i32,
        /// Expiry of a temporary VID, Unix ms.
        expires_ms: Option<u64>,
        /// Use limit of a temporary VID (None = unlimited).
        max_uses: Option<u32>,
        /// Candidate VIDs in the identity's bucket.
        candidates: Vec<String>,
    },
    /// Revoke the VID the target names.
    RevokeVid,
    /// Lock and unlock auth types.
    LockAuthTypes {
        /// Locks to set (replacing any on the same type).
        lock: Vec<LockEntry>,
        /// Auth types to unlock.
        unlock: Vec<i32>,
    },
    /// Decide an authentication and audit it.
    Authenticate(AuthAttempt),
}

/// An authentication request as the leader proposes it (sealed: it carries factors).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AuthAttempt {
    /// The partner the router authenticated.
    pub partner_id: String,
    /// `nid.v1.AuthType` numbers the partner may use.
    pub allowed: Vec<i32>,
    /// The partner's transaction id.
    pub transaction_id: String,
    /// The partner's request time, Unix ms.
    pub request_time_ms: u64,
    /// Protobuf `DemographicFactor`, when presented.
    pub demographic: Option<Vec<u8>>,
    /// PIN, when presented.
    pub pin: Option<String>,
    /// TOTP code, when presented.
    pub totp: Option<String>,
    /// Lockout and skew policy (carried so every replica decides alike).
    pub policy: AuthPolicy,
}

/// Authentication policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct AuthPolicy {
    /// Consecutive failures that lock authentication.
    pub max_failures: u32,
    /// How long the lock lasts, ms.
    pub cooldown_ms: u64,
    /// Allowed distance between the request time and the cell's clock, ms.
    pub skew_ms: u64,
}

impl Default for AuthPolicy {
    fn default() -> AuthPolicy {
        AuthPolicy { max_failures: 5, cooldown_ms: 30 * 60 * 1000, skew_ms: 5 * 60 * 1000 }
    }
}

/// The outcome of an authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOutcome {
    /// Yes or no.
    pub authenticated: bool,
    /// `nid.v1.AuthReason` numbers (empty on yes).
    pub reasons: Vec<i32>,
    /// The identity's UIN (for the partner token), when it exists.
    pub uin: Option<String>,
    /// When decided (the command's clock), Unix ms.
    pub time_ms: u64,
    /// True when this answers a retry of an already decided request (nothing was written).
    pub repeated: bool,
}

/// What an identity command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityResult {
    /// The record's new version.
    Version(u64),
    /// The VID created.
    Vid(VidEntry),
    /// The VID is revoked.
    VidRevoked,
    /// The locks now in force.
    Locks(Vec<LockEntry>),
    /// An authentication decision.
    Auth(AuthOutcome),
}

/// The value of a replay-index key, sealed: the decision a (partner, transaction, identity) got,
/// so a retry of the very same request gets the very same answer instead of a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TxnRecord {
    /// Keyed digest of what the partner sent (request time and factors).
    pub request_mac: [u8; 32],
    /// The decision.
    pub authenticated: bool,
    /// Its `nid.v1.AuthReason` numbers.
    pub reasons: Vec<i32>,
    /// When it was decided, Unix ms.
    pub time_ms: u64,
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
    /// An identity command applied.
    Identity(IdentityResult),
    /// Bucket states changed.
    BucketsSet,
    /// The control state changed (or already matched); the routing-table version after it.
    Control {
        /// True when this command created or changed something.
        changed: bool,
        /// Table version.
        version: u64,
    },
    /// Replay markers swept.
    Swept {
        /// Time-index entries removed (each with its marker, unless that was rewritten since).
        deleted: u64,
        /// Set when the limit was reached: the bucket to continue from.
        resume: Option<u16>,
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
    /// No identity has this identifier (or the VID is not usable).
    NotFound,
    /// The expected version is not the current one.
    VersionMismatch {
        /// The current version.
        current: u64,
    },
    /// The change is not allowed in the identity's state (the message names no personal data).
    NotAllowed(&'static str),
    /// Every candidate UIN was taken (the leader retries with new ones).
    CandidatesTaken,
    /// The command did not decode or open (deterministic on every replica).
    Malformed(String),
    /// A bucket move whose owner or epoch no longer matches (someone else moved it).
    MoveConflict,
    /// The cluster already exists with another config.
    ClusterExists,
    /// A partner with this id exists (and the command only creates).
    PartnerExists,
    /// The cluster has not been initialized.
    NoCluster,
    /// A routing-table version older than the one recorded.
    StaleTableVersion {
        /// The version on record.
        current: u64,
    },
}
