//! The stored schema of an identity: the domain's own types, never the wire messages, encoded by
//! `nid_proto::codec` (protobuf with our own tags: fields can be added without rewriting data) and
//! sealed by the keyring before they reach disk.
//!
//! One identity is several values under its UIN's keyed hash, split by how often they change
//! (see [`crate::keys`] for the key layout):
//! - [`IdentityRecord`], the cold part: demographics and biometrics. Read by GetIdentity and
//!   history, written by enrolment and updates only.
//! - [`AuthProfile`]: what authentication checks and what changes only with the record's version:
//!   status, VIDs, locks, the PIN verifier, the TOTP secret and keyed digests of the demographic
//!   fields (so a demographic match compares digests and never opens the cold record).
//! - [`AuthState`], the hot part: failure counter, lockout, the last TOTP step, the audit chain's
//!   head and length, VID use counts. Every authentication rewrites it, and only it (plus its audit
//!   record and replay marker).
//!
//! Deterministic encoding matters: replicas must write identical bytes, and the enrolment
//! idempotency digest is taken over [`StoredEnrollment`]. Maps are B-tree maps; nothing here is a
//! hash map.

use std::collections::BTreeMap;

/// A postal address as stored.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StoredAddress {
    /// Street lines.
    #[prost(string, repeated, tag = "1")]
    pub lines: Vec<String>,
    /// City, town or village.
    #[prost(string, tag = "2")]
    pub locality: String,
    /// Region.
    #[prost(string, tag = "3")]
    pub region: String,
    /// Postal code.
    #[prost(string, tag = "4")]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country.
    #[prost(string, tag = "5")]
    pub country: String,
}

/// Demographics as stored.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StoredDemographics {
    /// Full name.
    #[prost(string, tag = "1")]
    pub full_name: String,
    /// Date of birth, YYYY-MM-DD.
    #[prost(string, tag = "2")]
    pub date_of_birth: String,
    /// `nid.v1.Gender` number.
    #[prost(int32, tag = "3")]
    pub gender: i32,
    /// Address.
    #[prost(message, optional, tag = "4")]
    pub address: Option<StoredAddress>,
    /// Phone (E.164).
    #[prost(string, tag = "5")]
    pub phone: String,
    /// E-mail.
    #[prost(string, tag = "6")]
    pub email: String,
    /// Extension attributes, in key order.
    #[prost(btree_map = "string, string", tag = "7")]
    pub extensions: BTreeMap<String, String>,
}

/// A biometric reference as stored.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StoredBiometric {
    /// `nid.v1.BiometricModality` number.
    #[prost(int32, tag = "1")]
    pub modality: i32,
    /// Position.
    #[prost(string, tag = "2")]
    pub position: String,
    /// SHA-256 of the template.
    #[prost(bytes = "vec", tag = "3")]
    pub template_digest: Vec<u8>,
    /// The ABIS's reference.
    #[prost(string, tag = "4")]
    pub abis_reference: String,
}

/// What an enrolment asked for, in canonical form: the input of the idempotency digest (the same
/// RID with the same payload is a retry; with another, a conflict).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StoredEnrollment {
    /// RID.
    #[prost(string, tag = "1")]
    pub rid: String,
    /// Demographics.
    #[prost(message, optional, tag = "2")]
    pub demographics: Option<StoredDemographics>,
    /// Biometric references.
    #[prost(message, repeated, tag = "3")]
    pub biometrics: Vec<StoredBiometric>,
    /// The PIN as given (only ever digested, never stored).
    #[prost(string, tag = "4")]
    pub pin: String,
    /// Whether a TOTP secret was asked for.
    #[prost(bool, tag = "5")]
    pub provision_totp: bool,
}

/// The cold part of an identity.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct IdentityRecord {
    /// The UIN (12 digits).
    #[prost(string, tag = "1")]
    pub uin: String,
    /// The RID that created it.
    #[prost(string, tag = "2")]
    pub rid: String,
    /// Creation time, Unix ms.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
    /// Demographics.
    #[prost(message, optional, tag = "4")]
    pub demographics: Option<StoredDemographics>,
    /// Biometric references.
    #[prost(message, repeated, tag = "5")]
    pub biometrics: Vec<StoredBiometric>,
}

/// A salted, keyed PIN verifier: HMAC-SHA256(PIN key, salt || PIN).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PinVerifier {
    /// Random per-identity salt (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub salt: Vec<u8>,
    /// The MAC (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub mac: Vec<u8>,
}

/// A virtual id of an identity.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct VidEntry {
    /// The VID (16 digits).
    #[prost(string, tag = "1")]
    pub vid: String,
    /// `nid.v1.VidKind` number.
    #[prost(int32, tag = "2")]
    pub kind: i32,
    /// Creation time, Unix ms.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
    /// Expiry of a temporary VID, Unix ms (0: none).
    #[prost(uint64, tag = "4")]
    pub expires_ms: u64,
    /// Authentications allowed (0: unlimited).
    #[prost(uint32, tag = "5")]
    pub max_uses: u32,
    /// The record version that revoked it (0: not revoked).
    #[prost(uint64, tag = "6")]
    pub revoked_version: u64,
    /// The record version that created it.
    #[prost(uint64, tag = "7")]
    pub created_version: u64,
    /// Its slot in [`AuthState::vid_uses`] (stable for the identity's life).
    #[prost(uint32, tag = "8")]
    pub slot: u32,
}

impl VidEntry {
    /// Whether the VID is revoked.
    pub fn revoked(&self) -> bool {
        self.revoked_version != 0
    }
}

/// A lock on one auth type.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct LockEntry {
    /// `nid.v1.AuthType` number.
    #[prost(int32, tag = "1")]
    pub auth_type: i32,
    /// The lock ends at this time, Unix ms (0: until unlocked).
    #[prost(uint64, tag = "2")]
    pub until_ms: u64,
}

/// Keyed digests of each demographic field, exact and normalized (see
/// [`crate::demographics`]), so a demographic factor is matched without the cold record.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DemographicDigests {
    /// Full name, exact.
    #[prost(bytes = "vec", tag = "1")]
    pub full_name: Vec<u8>,
    /// Full name, normalized.
    #[prost(bytes = "vec", tag = "2")]
    pub full_name_normalized: Vec<u8>,
    /// Date of birth, exact.
    #[prost(bytes = "vec", tag = "3")]
    pub date_of_birth: Vec<u8>,
    /// Date of birth, normalized.
    #[prost(bytes = "vec", tag = "4")]
    pub date_of_birth_normalized: Vec<u8>,
    /// Phone, exact.
    #[prost(bytes = "vec", tag = "5")]
    pub phone: Vec<u8>,
    /// Phone, normalized.
    #[prost(bytes = "vec", tag = "6")]
    pub phone_normalized: Vec<u8>,
    /// E-mail, exact.
    #[prost(bytes = "vec", tag = "7")]
    pub email: Vec<u8>,
    /// E-mail, normalized.
    #[prost(bytes = "vec", tag = "8")]
    pub email_normalized: Vec<u8>,
    /// `nid.v1.Gender` number.
    #[prost(int32, tag = "9")]
    pub gender: i32,
}

/// What authentication checks, and the record's version-bearing state.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AuthProfile {
    /// Record version, from 1; grows with every change visible in `Identity`.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// `nid.v1.IdentityStatus` number.
    #[prost(int32, tag = "2")]
    pub status: i32,
    /// Why the status last changed.
    #[prost(string, tag = "3")]
    pub status_reason: String,
    /// Time of the last change, Unix ms.
    #[prost(uint64, tag = "4")]
    pub updated_ms: u64,
    /// The version at which the cold record was last written (its associated data binds it, so an
    /// older cold value cannot be put back under the key).
    #[prost(uint64, tag = "5")]
    pub cold_version: u64,
    /// Virtual ids, active and (up to a cap) revoked or expired.
    #[prost(message, repeated, tag = "6")]
    pub vids: Vec<VidEntry>,
    /// Auth-type locks.
    #[prost(message, repeated, tag = "7")]
    pub locks: Vec<LockEntry>,
    /// The PIN verifier.
    #[prost(message, optional, tag = "8")]
    pub pin: Option<PinVerifier>,
    /// The TOTP secret (empty: none).
    #[prost(bytes = "vec", tag = "9")]
    pub totp_secret: Vec<u8>,
    /// Demographic digests.
    #[prost(message, optional, tag = "10")]
    pub digests: Option<DemographicDigests>,
    /// The next VID slot to hand out.
    #[prost(uint32, tag = "11")]
    pub next_vid_slot: u32,
    /// Who made the current version: the caller's certificate name (an enrolment centre, an
    /// operator), as the router authenticated it; empty when unknown (a plaintext development
    /// cluster, data written before it was recorded).
    #[prost(string, tag = "12")]
    pub updated_by: String,
}

/// Uses of one VID.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct VidUse {
    /// The VID's slot.
    #[prost(uint32, tag = "1")]
    pub slot: u32,
    /// Successful authentications through it.
    #[prost(uint32, tag = "2")]
    pub uses: u32,
}

/// The hot authentication state of an identity.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AuthState {
    /// Consecutive failed factor checks.
    #[prost(uint32, tag = "1")]
    pub failures: u32,
    /// Authentication is refused until this time after too many failures (Unix ms; 0: not).
    #[prost(uint64, tag = "2")]
    pub locked_until_ms: u64,
    /// The last TOTP step accepted; a code for it or an earlier one is refused.
    #[prost(uint64, tag = "3")]
    pub totp_last_step: u64,
    /// Number of audit records.
    #[prost(uint64, tag = "4")]
    pub audit_len: u64,
    /// Hash of the last audit record (empty before the first).
    #[prost(bytes = "vec", tag = "5")]
    pub audit_head: Vec<u8>,
    /// Uses per VID slot (slots never used are absent), in slot order.
    #[prost(message, repeated, tag = "6")]
    pub vid_uses: Vec<VidUse>,
}

impl AuthState {
    /// Uses of the VID in `slot`.
    pub fn uses(&self, slot: u32) -> u32 {
        self.vid_uses.iter().find(|u| u.slot == slot).map_or(0, |u| u.uses)
    }

    /// Counts one more use of the VID in `slot`.
    pub fn count_use(&mut self, slot: u32) {
        match self.vid_uses.iter_mut().find(|u| u.slot == slot) {
            Some(u) => u.uses = u.uses.saturating_add(1),
            None => {
                self.vid_uses.push(VidUse { slot, uses: 1 });
                self.vid_uses.sort_by_key(|u| u.slot);
            }
        }
    }
}

/// One version of an identity as kept in its history (no secrets; VIDs are derived from the
/// profile's `created_version`/`revoked_version`, not copied).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HistoryEntry {
    /// Version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// Status.
    #[prost(int32, tag = "2")]
    pub status: i32,
    /// Why the status last changed.
    #[prost(string, tag = "3")]
    pub status_reason: String,
    /// Time of this version, Unix ms.
    #[prost(uint64, tag = "4")]
    pub updated_ms: u64,
    /// Demographics as of this version.
    #[prost(message, optional, tag = "5")]
    pub demographics: Option<StoredDemographics>,
    /// Biometrics as of this version.
    #[prost(message, repeated, tag = "6")]
    pub biometrics: Vec<StoredBiometric>,
    /// Locks as of this version.
    #[prost(message, repeated, tag = "7")]
    pub locks: Vec<LockEntry>,
    /// A PIN was enrolled.
    #[prost(bool, tag = "8")]
    pub has_pin: bool,
    /// A TOTP secret was enrolled.
    #[prost(bool, tag = "9")]
    pub has_totp: bool,
    /// Who made this version (see [`AuthProfile::updated_by`]).
    #[prost(string, tag = "10")]
    pub updated_by: String,
}

/// One audited authentication decision. Records form a hash chain per identity: `prev` is the
/// SHA-256 of the previous record's encoding.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Decision time, Unix ms.
    #[prost(uint64, tag = "2")]
    pub time_ms: u64,
    /// The partner.
    #[prost(string, tag = "3")]
    pub partner_id: String,
    /// The partner's transaction id.
    #[prost(string, tag = "4")]
    pub transaction_id: String,
    /// Yes or no.
    #[prost(bool, tag = "5")]
    pub authenticated: bool,
    /// `nid.v1.AuthReason` numbers.
    #[prost(int32, repeated, tag = "6")]
    pub reasons: Vec<i32>,
    /// `nid.v1.AuthType` numbers of the factors presented.
    #[prost(int32, repeated, tag = "7")]
    pub auth_types: Vec<i32>,
    /// Hash of the previous record (empty for the first).
    #[prost(bytes = "vec", tag = "8")]
    pub prev: Vec<u8>,
}

/// The value of a RID index key: the UIN the RID created and the enrolment's digest.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RidRecord {
    /// The UIN.
    #[prost(string, tag = "1")]
    pub uin: String,
    /// Keyed digest of the enrolment ([`StoredEnrollment`]).
    #[prost(bytes = "vec", tag = "2")]
    pub payload_mac: Vec<u8>,
    /// Keyed hash of the (caller, request id) of the call that created the identity (empty when
    /// that call had none): a retry of that call answers "created", any other "already existed".
    #[prost(bytes = "vec", tag = "3")]
    pub creator: Vec<u8>,
}

/// The value of a VID index key: the UIN the VID belongs to.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct VidIndex {
    /// The UIN.
    #[prost(string, tag = "1")]
    pub uin: String,
}

/// The value of a replay-index key: the decision a (partner, transaction, identity) got, so a
/// retry of the very same request gets the very same answer.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct TxnRecord {
    /// Keyed digest of what the partner sent (request time, factors, the VID used).
    #[prost(bytes = "vec", tag = "1")]
    pub request_mac: Vec<u8>,
    /// The decision.
    #[prost(bool, tag = "2")]
    pub authenticated: bool,
    /// Its `nid.v1.AuthReason` numbers.
    #[prost(int32, repeated, tag = "3")]
    pub reasons: Vec<i32>,
    /// When it was decided, Unix ms.
    #[prost(uint64, tag = "4")]
    pub time_ms: u64,
}

/// The value of a request-id key: what a mutating request (by caller and request id) produced,
/// so a retry gets the original answer.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RequestRecord {
    /// Keyed digest of the request's content (the same id with other content is refused).
    #[prost(bytes = "vec", tag = "1")]
    pub request_mac: Vec<u8>,
    /// The encoded [`crate::outcome::StoredOutcome`].
    #[prost(bytes = "vec", tag = "2")]
    pub outcome: Vec<u8>,
    /// When it was applied, Unix ms.
    #[prost(uint64, tag = "3")]
    pub time_ms: u64,
}

/// A generation as the cell knows it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GenerationStamp {
    /// Generation id.
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// Its fingerprint ([`crate::keyring::Keyring::fingerprint`]).
    #[prost(bytes = "vec", tag = "2")]
    pub fingerprint: Vec<u8>,
}

/// The cell's key state, changed only through the log: which generation seals.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeyState {
    /// The generation that seals new values and signs decisions (none before the first
    /// activation: the root generation then).
    #[prost(message, optional, tag = "1")]
    pub active: Option<GenerationStamp>,
    /// Every generation activated so far, in order.
    #[prost(message, repeated, tag = "2")]
    pub history: Vec<GenerationStamp>,
}
