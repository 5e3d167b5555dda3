//! Finding an identity and loading its parts, for apply and reads alike: a target (the keyed hash
//! of a UIN or of a VID) resolves to the UIN's hash (a VID through its index), and the identity's
//! profile, hot state and cold record are each opened only when needed.

use crate::store::{ReadError, open, read};
use nid_domain::commands::TargetKind;
use nid_domain::keyring::Keyring;
use nid_domain::keys::{self, Table, UIN_DOMAIN, VID_DOMAIN};
use nid_domain::prepare::cold_aad;
use nid_domain::records::{AuthProfile, AuthState, IdentityRecord, VidEntry, VidIndex};
use nid_engine::KvRead;
use nid_proto::bucket::BucketId;

/// An identity found by a target.
#[derive(Debug, Clone)]
pub struct Found {
    /// The UIN's keyed hash.
    pub uin_hash: [u8; 32],
    /// The UIN's digits, when the lookup went through a VID (the index holds them).
    pub uin: Option<String>,
    /// The VID's keyed hash, when the target was a VID.
    pub via_vid: Option<[u8; 32]>,
    /// The sealed profile, when resolving read it (a UIN target): [`profile_of`] opens it instead
    /// of reading the same key again.
    pub sealed_profile: Option<Vec<u8>>,
}

/// Resolves a target. None when no identity has it.
pub fn resolve(
    store: &dyn KvRead,
    keyring: &Keyring,
    bucket: BucketId,
    kind: TargetKind,
    target: &[u8; 32],
) -> Result<Option<Found>, ReadError> {
    match kind {
        TargetKind::Uin => {
            let sealed = store.get(&keys::hashed(bucket, Table::Profile, target))?;
            Ok(sealed.map(|s| Found { uin_hash: *target, uin: None, via_vid: None, sealed_profile: Some(s) }))
        }
        TargetKind::Vid => {
            let key = keys::hashed(bucket, Table::Vid, target);
            let Some(index) = read::<VidIndex>(store, keyring, &key, &key, "VID index")? else {
                return Ok(None);
            };
            let uin_hash = keyring.index_hash(UIN_DOMAIN, index.uin.as_bytes());
            Ok(Some(Found { uin_hash, uin: Some(index.uin), via_vid: Some(*target), sealed_profile: None }))
        }
        TargetKind::Unspecified => Ok(None),
    }
}

/// The entry of the VID whose keyed hash is `vid_hash`, in `profile`.
pub fn vid_entry<'p>(
    keyring: &Keyring,
    profile: &'p AuthProfile,
    vid_hash: &[u8; 32],
) -> Option<&'p VidEntry> {
    profile.vids.iter().find(|v| keyring.index_hash(VID_DOMAIN, v.vid.as_bytes()) == *vid_hash)
}

/// The profile key of an identity.
pub fn profile_key(bucket: BucketId, uin_hash: &[u8; 32]) -> [u8; 35] {
    keys::hashed(bucket, Table::Profile, uin_hash)
}

/// The hot-state key of an identity.
pub fn state_key(bucket: BucketId, uin_hash: &[u8; 32]) -> [u8; 35] {
    keys::hashed(bucket, Table::State, uin_hash)
}

/// The cold-record key of an identity.
pub fn cold_key(bucket: BucketId, uin_hash: &[u8; 32]) -> [u8; 35] {
    keys::hashed(bucket, Table::Identity, uin_hash)
}

/// Loads an identity's profile.
pub fn profile(
    store: &dyn KvRead,
    keyring: &Keyring,
    bucket: BucketId,
    uin_hash: &[u8; 32],
) -> Result<Option<AuthProfile>, ReadError> {
    let key = profile_key(bucket, uin_hash);
    read(store, keyring, &key, &key, "auth profile")
}

/// Loads the profile of an identity `found` by [`resolve`], opening what resolving read when it
/// read it.
pub fn profile_of(
    store: &dyn KvRead,
    keyring: &Keyring,
    bucket: BucketId,
    found: &Found,
) -> Result<Option<AuthProfile>, ReadError> {
    match &found.sealed_profile {
        Some(sealed) => {
            let key = profile_key(bucket, &found.uin_hash);
            open(keyring, &key, sealed, "auth profile").map(Some)
        }
        None => profile(store, keyring, bucket, &found.uin_hash),
    }
}

/// Loads an identity's hot state (the default when it has none yet).
pub fn state(
    store: &dyn KvRead,
    keyring: &Keyring,
    bucket: BucketId,
    uin_hash: &[u8; 32],
) -> Result<AuthState, ReadError> {
    let key = state_key(bucket, uin_hash);
    Ok(read(store, keyring, &key, &key, "auth state")?.unwrap_or_default())
}

/// Loads an identity's cold record at the version its profile names.
pub fn cold(
    store: &dyn KvRead,
    keyring: &Keyring,
    bucket: BucketId,
    uin_hash: &[u8; 32],
    cold_version: u64,
) -> Result<IdentityRecord, ReadError> {
    let key = cold_key(bucket, uin_hash);
    read(store, keyring, &key, &cold_aad(&key, cold_version), "identity record")?
        .ok_or(ReadError::Corrupt("identity record (missing beside its profile)"))
}
