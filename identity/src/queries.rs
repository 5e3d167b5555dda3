//! Reads of the applied state, each from ONE view (a RocksDB snapshot), so a multi-key answer is
//! consistent: an identity (profile, hot state and cold record together), its history pages, its
//! audit pages and the verification of its audit chain against the head its hot state records.

use crate::lookup::{self, Found};
use crate::store::{ReadError, open};
use nid_domain::authenticate::{ChainReport, verify_chain};
use nid_domain::commands::TargetKind;
use nid_domain::keyring::Keyring;
use nid_domain::keys::{self, Table};
use nid_domain::lifecycle::vid_usable;
use nid_domain::prepare::target;
use nid_domain::records::{AuditRecord, AuthProfile, AuthState, HistoryEntry, IdentityRecord};
use nid_engine::KvRead;
use nid_proto::ids::{IdKind, Identifier};

/// An identity read whole.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Where it was found.
    pub found: Found,
    /// The cold record.
    pub cold: IdentityRecord,
    /// The profile.
    pub profile: AuthProfile,
    /// The hot state.
    pub state: AuthState,
}

/// The identity `id` names (a VID only while usable at `now_ms`), read whole.
pub fn identity(
    view: &dyn KvRead,
    keyring: &Keyring,
    id: &Identifier,
    now_ms: u64,
) -> Result<Option<Loaded>, ReadError> {
    let (kind, hash) = target(keyring, id);
    let bucket = id.bucket();
    let Some(found) = lookup::resolve(view, keyring, bucket, kind, &hash)? else { return Ok(None) };
    let Some(profile) = lookup::profile_of(view, keyring, bucket, &found)? else { return Ok(None) };
    let state = lookup::state(view, keyring, bucket, &found.uin_hash)?;
    if let Some(vid_hash) = &found.via_vid {
        let usable = lookup::vid_entry(keyring, &profile, vid_hash)
            .is_some_and(|v| vid_usable(v, state.uses(v.slot), now_ms));
        if !usable {
            return Ok(None);
        }
    }
    let cold = lookup::cold(view, keyring, bucket, &found.uin_hash, profile.cold_version)?;
    Ok(Some(Loaded { found, cold, profile, state }))
}

/// Whether an identity with identifier `id` exists (any VID that resolves counts; the decision
/// checks its usability).
pub fn exists(view: &dyn KvRead, keyring: &Keyring, id: &Identifier) -> Result<bool, ReadError> {
    let (kind, hash) = target(keyring, id);
    Ok(lookup::resolve(view, keyring, id.bucket(), kind, &hash)?.is_some())
}

/// Versions `from..` of the identity with UIN hash `uin_hash`, at most `limit`, and the next
/// version if there are more.
pub fn history(
    view: &dyn KvRead,
    keyring: &Keyring,
    id: &Identifier,
    uin_hash: &[u8; 32],
    from: u64,
    limit: usize,
) -> Result<(Vec<HistoryEntry>, Option<u64>), ReadError> {
    let bucket = id.bucket();
    let start = keys::sequenced(bucket, Table::History, uin_hash, from.max(1));
    let end = keys::sequenced(bucket, Table::History, uin_hash, u64::MAX);
    let mut out = Vec::new();
    let mut next = None;
    let mut failure = None;
    view.scan(&start, &end, false, &mut |k, v| match open::<HistoryEntry>(keyring, k, v, "history entry") {
        Ok(entry) if out.len() == limit => {
            next = Some(entry.version);
            false
        }
        Ok(entry) => {
            out.push(entry);
            true
        }
        Err(e) => {
            failure = Some(e);
            false
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok((out, next)),
    }
}

/// Audit records of an identity, newest first, below sequence `before` (None: from the newest);
/// at most `limit`, and the sequence to continue below if there are more.
pub fn audit_page(
    view: &dyn KvRead,
    keyring: &Keyring,
    id: &Identifier,
    uin_hash: &[u8; 32],
    before: Option<u64>,
    limit: usize,
) -> Result<(Vec<AuditRecord>, Option<u64>), ReadError> {
    let bucket = id.bucket();
    let lower = keys::sequenced(bucket, Table::Audit, uin_hash, 0);
    let upper = keys::sequenced(bucket, Table::Audit, uin_hash, before.unwrap_or(u64::MAX));
    let mut out = Vec::new();
    let mut next = None;
    let mut failure = None;
    view.scan(&lower, &upper, true, &mut |k, v| match open::<AuditRecord>(keyring, k, v, "audit record") {
        Ok(record) if out.len() == limit => {
            next = Some(record.seq + 1);
            false
        }
        Ok(record) => {
            out.push(record);
            true
        }
        Err(e) => {
            failure = Some(e);
            false
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok((out, next)),
    }
}

/// Walks the identity's audit chain and its recorded head, from the same view.
pub fn verify_audit_chain(
    view: &dyn KvRead,
    keyring: &Keyring,
    id: &Identifier,
    uin_hash: &[u8; 32],
) -> Result<ChainReport, ReadError> {
    let bucket = id.bucket();
    let state = lookup::state(view, keyring, bucket, uin_hash)?;
    let lower = keys::sequenced(bucket, Table::Audit, uin_hash, 0);
    let upper = keys::sequenced(bucket, Table::Audit, uin_hash, u64::MAX);
    let mut records = Vec::new();
    view.scan(&lower, &upper, false, &mut |k, v| {
        // A record that does not open breaks the chain at its position.
        records.push(open::<AuditRecord>(keyring, k, v, "audit record").ok());
        true
    })?;
    Ok(verify_chain(records, &state))
}

/// The UIN hash of a UIN.
pub fn uin_target(keyring: &Keyring, id: &Identifier) -> Option<[u8; 32]> {
    match target(keyring, id) {
        (TargetKind::Uin, h) if id.kind() == IdKind::Uin => Some(h),
        _ => None,
    }
}
