//! The identity state machine's commands, as carried in the Raft log.
//!
//! Deterministic: everything random or time-based (UIN and VID candidates, salts, nonces, seeds,
//! timestamps) is chosen by the leader before proposing (see [`crate::prepare`]); apply only checks
//! and writes. No plaintext identifier or personal datum enters the log: natural keys arrive as
//! keyed hashes and payloads sealed with the cell's active key generation. Every command that
//! reads or writes identities carries the keyring's index fingerprint, which apply checks, so a
//! replica with other root keys stops instead of writing other keys.

/// One command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// What it does.
    #[prost(oneof = "command::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<command::Kind>,
}

/// The variants of [`Command`].
pub mod command {
    /// What a command does.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// Create an identity (or answer for the existing one of a retried RID).
        #[prost(message, tag = "1")]
        Enroll(super::EnrollCommand),
        /// Change or authenticate one existing identity.
        #[prost(message, tag = "2")]
        Identity(super::IdentityCommand),
        /// Forget replay markers and request records past their window.
        #[prost(message, tag = "3")]
        Sweep(super::SweepCommand),
        /// Seal with another key generation from this point of the log on.
        #[prost(message, tag = "4")]
        ActivateKeys(super::ActivateKeysCommand),
    }
}

impl Command {
    /// A command of `kind`.
    pub fn new(kind: command::Kind) -> Command {
        Command { kind: Some(kind) }
    }

    /// The bucket the command writes, for the ownership fence (None: cell-scoped).
    pub fn bucket(&self) -> Option<u32> {
        match &self.kind {
            Some(command::Kind::Enroll(c)) => Some(c.bucket),
            Some(command::Kind::Identity(c)) => Some(c.bucket),
            Some(command::Kind::Sweep(_) | command::Kind::ActivateKeys(_)) | None => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match &self.kind {
            Some(command::Kind::Enroll(_)) => "enroll",
            Some(command::Kind::Identity(_)) => "identity",
            Some(command::Kind::Sweep(_)) => "sweep",
            Some(command::Kind::ActivateKeys(_)) => "activate_keys",
            None => "empty",
        }
    }
}

/// An enrolment as prepared by the leader: every value it writes, already sealed under the keys it
/// goes to (the leader sealed them once; followers write the bytes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnrollCommand {
    /// Bucket of the RID (and so of the UIN).
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// Keyed hash of the RID.
    #[prost(bytes = "vec", tag = "2")]
    pub rid_hash: Vec<u8>,
    /// Keyed hash of the UIN candidate.
    #[prost(bytes = "vec", tag = "3")]
    pub uin_hash: Vec<u8>,
    /// Keyed digest of the enrolment: the same RID with another payload is a conflict.
    #[prost(bytes = "vec", tag = "4")]
    pub payload_mac: Vec<u8>,
    /// Leader's clock at proposal, Unix ms.
    #[prost(uint64, tag = "5")]
    pub now_ms: u64,
    /// The sealed [`crate::records::RidRecord`].
    #[prost(bytes = "vec", tag = "6")]
    pub rid_record: Vec<u8>,
    /// The sealed [`crate::records::IdentityRecord`].
    #[prost(bytes = "vec", tag = "7")]
    pub identity: Vec<u8>,
    /// The sealed [`crate::records::AuthProfile`].
    #[prost(bytes = "vec", tag = "8")]
    pub profile: Vec<u8>,
    /// The sealed [`crate::records::AuthState`].
    #[prost(bytes = "vec", tag = "9")]
    pub state: Vec<u8>,
    /// The sealed first [`crate::records::HistoryEntry`].
    #[prost(bytes = "vec", tag = "10")]
    pub history: Vec<u8>,
    /// The keyring's index fingerprint.
    #[prost(bytes = "vec", tag = "11")]
    pub index_fingerprint: Vec<u8>,
    /// Keyed hash of the (caller, request id) of this call (empty: none), see
    /// [`crate::records::RidRecord::creator`].
    #[prost(bytes = "vec", tag = "12")]
    pub creator: Vec<u8>,
}

/// How an identity command names its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TargetKind {
    /// Not used.
    Unspecified = 0,
    /// The keyed hash of a UIN.
    Uin = 1,
    /// The keyed hash of a VID.
    Vid = 2,
}

/// A change to (or an authentication of) one identity, as proposed by the leader.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdentityCommand {
    /// The identity's bucket.
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// Whether `target` hashes a UIN or a VID.
    #[prost(enumeration = "TargetKind", tag = "2")]
    pub target_kind: i32,
    /// The keyed hash of the identifier.
    #[prost(bytes = "vec", tag = "3")]
    pub target: Vec<u8>,
    /// The sealed [`IdentityOp`] (associated data: [`op_aad`]).
    #[prost(bytes = "vec", tag = "4")]
    pub sealed_op: Vec<u8>,
    /// Leader's clock at proposal, Unix ms.
    #[prost(uint64, tag = "5")]
    pub now_ms: u64,
    /// Seed of the nonces of the values apply seals (16 bytes).
    #[prost(bytes = "vec", tag = "6")]
    pub seed: Vec<u8>,
    /// The keyring's index fingerprint.
    #[prost(bytes = "vec", tag = "7")]
    pub index_fingerprint: Vec<u8>,
    /// For mutating requests with a request id: the keyed hash of (caller, request id), and the
    /// keyed digest of the request's content.
    #[prost(message, optional, tag = "8")]
    pub request: Option<RequestKey>,
    /// Who asked (the caller's certificate name, as the router authenticated it; empty when
    /// unknown): recorded as `updated_by` of the version a change makes.
    #[prost(string, tag = "9")]
    pub actor: String,
}

/// The idempotency key of a mutating request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestKey {
    /// Keyed hash of (caller, request id).
    #[prost(bytes = "vec", tag = "1")]
    pub hash: Vec<u8>,
    /// Keyed digest of the request's content.
    #[prost(bytes = "vec", tag = "2")]
    pub content_mac: Vec<u8>,
}

/// Associated data of a sealed identity operation: the bucket and the target, so a sealed payload
/// cannot be replayed against another identity.
pub fn op_aad(bucket: u32, target_kind: i32, target: &[u8]) -> Vec<u8> {
    let mut aad = b"nid/v1/op".to_vec();
    aad.extend_from_slice(&bucket.to_be_bytes());
    aad.extend_from_slice(&target_kind.to_be_bytes());
    aad.extend_from_slice(target);
    aad
}

/// What an [`IdentityCommand`] does.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdentityOp {
    /// The operation.
    #[prost(oneof = "identity_op::Op", tags = "1, 2, 3, 4, 5, 6")]
    pub op: Option<identity_op::Op>,
}

/// The variants of [`IdentityOp`].
pub mod identity_op {
    /// One identity operation.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Op {
        /// Replace demographics and biometrics if the version still matches.
        #[prost(message, tag = "1")]
        Update(super::UpdateOp),
        /// Change the lifecycle status.
        #[prost(message, tag = "2")]
        SetStatus(super::SetStatusOp),
        /// Create a VID from the candidate.
        #[prost(message, tag = "3")]
        CreateVid(super::CreateVidOp),
        /// Revoke the VID the target names.
        #[prost(message, tag = "4")]
        RevokeVid(super::RevokeVidOp),
        /// Lock and unlock auth types.
        #[prost(message, tag = "5")]
        LockAuthTypes(super::LockOp),
        /// Decide an authentication and audit it.
        #[prost(message, tag = "6")]
        Authenticate(super::AuthAttempt),
    }
}

/// Update: new demographics and biometrics, with their digests computed by the leader.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateOp {
    /// The version the caller read.
    #[prost(uint64, tag = "1")]
    pub expected_version: u64,
    /// The new demographics.
    #[prost(message, optional, tag = "2")]
    pub demographics: Option<crate::records::StoredDemographics>,
    /// The new biometrics.
    #[prost(message, repeated, tag = "3")]
    pub biometrics: Vec<crate::records::StoredBiometric>,
    /// Digests of the new demographics.
    #[prost(message, optional, tag = "4")]
    pub digests: Option<crate::records::DemographicDigests>,
}

/// SetStatus.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetStatusOp {
    /// `nid.v1.IdentityStatus` number.
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// Why.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// CreateVid.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateVidOp {
    /// `nid.v1.VidKind` number.
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// Expiry of a temporary VID, Unix ms (0: none).
    #[prost(uint64, tag = "2")]
    pub expires_ms: u64,
    /// Use limit of a temporary VID (0: unlimited).
    #[prost(uint32, tag = "3")]
    pub max_uses: u32,
    /// The candidate VID in the identity's bucket.
    #[prost(string, tag = "4")]
    pub candidate: String,
    /// Its keyed hash.
    #[prost(bytes = "vec", tag = "5")]
    pub candidate_hash: Vec<u8>,
}

/// RevokeVid (the target is the VID).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeVidOp {}

/// LockAuthTypes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LockOp {
    /// Locks to set (replacing any on the same type).
    #[prost(message, repeated, tag = "1")]
    pub lock: Vec<crate::records::LockEntry>,
    /// Auth types to unlock.
    #[prost(int32, repeated, tag = "2")]
    pub unlock: Vec<i32>,
}

/// A demographic factor as the leader prepared it: keyed digests of the given fields in the
/// requested match mode (empty: the field was not given).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DemographicClaim {
    /// True for the NORMALIZED match mode.
    #[prost(bool, tag = "1")]
    pub normalized: bool,
    /// Digest of the full name.
    #[prost(bytes = "vec", tag = "2")]
    pub full_name: Vec<u8>,
    /// Digest of the date of birth.
    #[prost(bytes = "vec", tag = "3")]
    pub date_of_birth: Vec<u8>,
    /// Digest of the phone.
    #[prost(bytes = "vec", tag = "4")]
    pub phone: Vec<u8>,
    /// Digest of the e-mail.
    #[prost(bytes = "vec", tag = "5")]
    pub email: Vec<u8>,
    /// `nid.v1.Gender` number (0: not given).
    #[prost(int32, tag = "6")]
    pub gender: i32,
}

/// An authentication request as the leader proposes it (sealed: it carries factors).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthAttempt {
    /// The partner the router authenticated.
    #[prost(string, tag = "1")]
    pub partner_id: String,
    /// `nid.v1.AuthType` numbers the partner may use.
    #[prost(int32, repeated, tag = "2")]
    pub allowed: Vec<i32>,
    /// The partner's transaction id.
    #[prost(string, tag = "3")]
    pub transaction_id: String,
    /// The partner's request time, Unix ms.
    #[prost(uint64, tag = "4")]
    pub request_time_ms: u64,
    /// The demographic factor, when presented.
    #[prost(message, optional, tag = "5")]
    pub demographic: Option<DemographicClaim>,
    /// The PIN, when presented.
    #[prost(string, optional, tag = "6")]
    pub pin: Option<String>,
    /// The TOTP code, when presented.
    #[prost(string, optional, tag = "7")]
    pub totp: Option<String>,
    /// Lockout and skew policy (carried so every replica decides alike).
    #[prost(message, optional, tag = "8")]
    pub policy: Option<AuthPolicy>,
    /// Keyed digest of what the partner sent (request time, factors, identifier): a retry with the
    /// same digest gets the stored decision.
    #[prost(bytes = "vec", tag = "9")]
    pub request_mac: Vec<u8>,
}

/// Authentication policy.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct AuthPolicy {
    /// Consecutive failures that lock authentication.
    #[prost(uint32, tag = "1")]
    pub max_failures: u32,
    /// How long the lock lasts, ms.
    #[prost(uint64, tag = "2")]
    pub cooldown_ms: u64,
    /// Allowed distance between the request time and the cell's clock, ms.
    #[prost(uint64, tag = "3")]
    pub skew_ms: u64,
}

impl AuthPolicy {
    /// The defaults: 5 failures lock for 30 minutes; 5 minutes of skew.
    pub fn standard() -> AuthPolicy {
        AuthPolicy { max_failures: 5, cooldown_ms: 30 * 60 * 1000, skew_ms: 5 * 60 * 1000 }
    }
}

/// Forget what is past its window in the buckets `[first, end)` this cell owns: replay markers
/// decided before `txn_before_ms` and request records applied before `request_before_ms`, at most
/// `limit` in all. The leader proposes it periodically; being a Raft command, every replica
/// forgets the same entries at the same point of the log.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SweepCommand {
    /// First bucket.
    #[prost(uint32, tag = "1")]
    pub first: u32,
    /// One past the last bucket (at most `BUCKETS`).
    #[prost(uint32, tag = "2")]
    pub end: u32,
    /// Replay markers decided before this Unix ms go.
    #[prost(uint64, tag = "3")]
    pub txn_before_ms: u64,
    /// Request records applied before this Unix ms go.
    #[prost(uint64, tag = "4")]
    pub request_before_ms: u64,
    /// At most this many entries (>= 1), so one apply stays short.
    #[prost(uint32, tag = "5")]
    pub limit: u32,
}

/// Seal with generation `id` from this point of the log on. The leader proposes it only once every
/// voter holds the generation with this fingerprint; a replica that does not stops applying.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ActivateKeysCommand {
    /// The generation.
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// Its fingerprint.
    #[prost(bytes = "vec", tag = "2")]
    pub fingerprint: Vec<u8>,
}
