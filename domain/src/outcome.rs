//! What applying an identity command produced: a typed [`Outcome`] or a deterministic
//! [`Rejection`] (recorded identically on every replica), and the stored form of the outcomes a
//! request id replays ([`StoredOutcome`]).
//!
//! Callers ask for the outcome they expect with [`Expect`]: a command's proposer gets its own type
//! back (a version, a VID, a decision), never an enum to match.

use crate::records::{LockEntry, VidEntry};

/// A successful apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An enrolment applied, or matched an earlier one.
    Enrolled(Enrolled),
    /// The record's new version (update, status).
    Version(NewVersion),
    /// The VID created.
    Vid(VidEntry),
    /// The VID is revoked.
    VidRevoked(VidRevoked),
    /// The locks in force afterwards.
    Locks(LocksInForce),
    /// An authentication decision.
    Auth(AuthOutcome),
    /// Entries swept.
    Swept(Swept),
    /// A key generation activated.
    KeysActivated(KeysActivated),
}

/// The result of an enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// True when this command created the identity. When false, `uin` and `totp_secret` are the
    /// existing identity's.
    pub created: bool,
    /// The existing UIN (empty when created: the proposer knows the one it proposed).
    pub uin: String,
    /// The existing identity's TOTP secret (empty when none or created).
    pub totp_secret: Vec<u8>,
}

/// A record version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewVersion(pub u64);

/// A VID was revoked (or already was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VidRevoked;

/// The locks in force after a lock change, as of the command's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocksInForce(pub Vec<LockEntry>);

/// An authentication decision.
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

/// What a sweep removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Entries removed.
    pub deleted: u64,
    /// Set when the limit was reached: the bucket to continue from.
    pub resume: Option<u32>,
}

/// The generation now sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysActivated(pub u32);

/// Why a command was refused at apply; nothing was written (except a request-id record of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The RID exists with a different payload.
    #[error("the rid was enrolled with a different payload")]
    RidConflict,
    /// No identity has this identifier (or the VID is not usable).
    #[error("no identity with this id")]
    NotFound,
    /// The expected version is not the current one.
    #[error("expected_version is stale; the current version is {current}")]
    VersionMismatch {
        /// The current version.
        current: u64,
    },
    /// The change is not allowed in the identity's state.
    #[error("{0}")]
    NotAllowed(Refusal),
    /// The UIN or VID candidate is taken (the leader retries with a new one).
    #[error("the identifier candidate is taken")]
    CandidatesTaken,
    /// The request id was used before for another request.
    #[error("the request id was already used for a different request")]
    RequestIdReused,
    /// The command does not decode or is inconsistent (the same on every replica).
    #[error("malformed command: {0}")]
    Malformed(String),
}

/// Why a change is not allowed (fixed texts: they name no personal data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(i32)]
pub enum Refusal {
    /// DEACTIVATED is final.
    #[error("the identity is deactivated; it can no longer change")]
    Deactivated = 1,
    /// VIDs need an activated identity.
    #[error("VIDs can only be created for an activated identity")]
    VidNeedsActivated = 2,
    /// A temporary VID needs a future expiry.
    #[error("a temporary VID needs an expiry in the future")]
    VidExpiryPassed = 3,
    /// The VID cap is reached.
    #[error("the identity holds the most usable VIDs allowed; revoke one first")]
    TooManyVids = 4,
}

impl Refusal {
    fn from_code(code: i32) -> Option<Refusal> {
        Some(match code {
            1 => Refusal::Deactivated,
            2 => Refusal::VidNeedsActivated,
            3 => Refusal::VidExpiryPassed,
            4 => Refusal::TooManyVids,
            _ => return None,
        })
    }
}

/// Asks for the outcome a command produces.
pub trait Expect: Sized {
    /// The outcome, when it is this type.
    fn from_outcome(outcome: Outcome) -> Option<Self>;
}

macro_rules! expect {
    ($variant:ident, $ty:ty) => {
        impl Expect for $ty {
            fn from_outcome(outcome: Outcome) -> Option<Self> {
                match outcome {
                    Outcome::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

expect!(Enrolled, Enrolled);
expect!(Version, NewVersion);
expect!(Vid, VidEntry);
expect!(VidRevoked, VidRevoked);
expect!(Locks, LocksInForce);
expect!(Auth, AuthOutcome);
expect!(Swept, Swept);
expect!(KeysActivated, KeysActivated);

/// The stored form of what a request-id command produced (updates, status, VIDs, locks).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredOutcome {
    /// A new version.
    #[prost(uint64, optional, tag = "1")]
    pub version: Option<u64>,
    /// A VID created.
    #[prost(message, optional, tag = "2")]
    pub vid: Option<VidEntry>,
    /// A VID revoked.
    #[prost(bool, tag = "3")]
    pub vid_revoked: bool,
    /// Locks in force (with `locks_set`: possibly none).
    #[prost(message, repeated, tag = "4")]
    pub locks: Vec<LockEntry>,
    /// The outcome was a lock change.
    #[prost(bool, tag = "5")]
    pub locks_set: bool,
    /// The rejection code (see [`StoredOutcome::from_result`]).
    #[prost(int32, tag = "6")]
    pub rejection: i32,
    /// The rejection's number (current version, refusal code).
    #[prost(uint64, tag = "7")]
    pub rejection_detail: u64,
}

impl StoredOutcome {
    /// The stored form of a request's result; None for results that are not stored (enrolments,
    /// authentications and sweeps have their own idempotency; malformed commands and taken
    /// candidates are not final).
    pub fn from_result(result: &Result<Outcome, Rejection>) -> Option<StoredOutcome> {
        let mut s = StoredOutcome::default();
        match result {
            Ok(Outcome::Version(NewVersion(v))) => s.version = Some(*v),
            Ok(Outcome::Vid(v)) => s.vid = Some(v.clone()),
            Ok(Outcome::VidRevoked(_)) => s.vid_revoked = true,
            Ok(Outcome::Locks(LocksInForce(l))) => {
                s.locks = l.clone();
                s.locks_set = true;
            }
            Err(Rejection::NotFound) => s.rejection = 1,
            Err(Rejection::VersionMismatch { current }) => {
                s.rejection = 2;
                s.rejection_detail = *current;
            }
            Err(Rejection::NotAllowed(r)) => {
                s.rejection = 3;
                s.rejection_detail = *r as i32 as u64;
            }
            _ => return None,
        }
        Some(s)
    }

    /// The result this records.
    pub fn into_result(self) -> Result<Outcome, Rejection> {
        match self.rejection {
            0 => {}
            1 => return Err(Rejection::NotFound),
            2 => return Err(Rejection::VersionMismatch { current: self.rejection_detail }),
            3 => {
                return Err(i32::try_from(self.rejection_detail)
                    .ok()
                    .and_then(Refusal::from_code)
                    .map(Rejection::NotAllowed)
                    .unwrap_or_else(|| Rejection::Malformed("stored refusal code".into())));
            }
            _ => return Err(Rejection::Malformed("stored rejection code".into())),
        }
        if let Some(v) = self.version {
            return Ok(Outcome::Version(NewVersion(v)));
        }
        if let Some(v) = self.vid {
            return Ok(Outcome::Vid(v));
        }
        if self.vid_revoked {
            return Ok(Outcome::VidRevoked(VidRevoked));
        }
        if self.locks_set {
            return Ok(Outcome::Locks(LocksInForce(self.locks)));
        }
        Err(Rejection::Malformed("empty stored outcome".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_outcomes_round_trip_and_only_final_results_are_stored() {
        let vid = VidEntry { vid: "1".repeat(16), kind: 1, created_version: 2, ..Default::default() };
        for result in [
            Ok(Outcome::Version(NewVersion(7))),
            Ok(Outcome::Vid(vid)),
            Ok(Outcome::VidRevoked(VidRevoked)),
            Ok(Outcome::Locks(LocksInForce(vec![]))),
            Ok(Outcome::Locks(LocksInForce(vec![LockEntry { auth_type: 2, until_ms: 9 }]))),
            Err(Rejection::NotFound),
            Err(Rejection::VersionMismatch { current: 4 }),
            Err(Rejection::NotAllowed(Refusal::TooManyVids)),
        ] {
            let stored = StoredOutcome::from_result(&result).expect("stored");
            let bytes = nid_proto::codec::encode(&stored);
            assert_eq!(nid_proto::codec::decode::<StoredOutcome>(&bytes).unwrap().into_result(), result);
        }
        for result in [
            Err(Rejection::CandidatesTaken),
            Err(Rejection::Malformed("x".into())),
            Ok(Outcome::Swept(Swept { deleted: 1, resume: None })),
        ] {
            assert!(StoredOutcome::from_result(&result).is_none());
        }
        assert_eq!(NewVersion::from_outcome(Outcome::Version(NewVersion(3))), Some(NewVersion(3)));
        assert_eq!(NewVersion::from_outcome(Outcome::VidRevoked(VidRevoked)), None);
    }
}
