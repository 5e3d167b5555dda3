//! The identity's lifecycle rules as pure functions over its stored parts: versioned updates,
//! status, VIDs (one active perpetual; temporary ones with an expiry and a use limit; a cap per
//! identity) and auth-type locks. Time comes from the command, so every replica reaches the same
//! state.

use crate::commands::UpdateOp;
use crate::outcome::{Refusal, Rejection};
use crate::records::{AuthProfile, AuthState, HistoryEntry, IdentityRecord, LockEntry, VidEntry};
use nid_proto::v1::{IdentityStatus, VidKind};

/// `nid.v1.IdentityStatus.ACTIVATED`.
pub const ACTIVATED: i32 = IdentityStatus::Activated as i32;
/// `nid.v1.IdentityStatus.BLOCKED`.
pub const BLOCKED: i32 = IdentityStatus::Blocked as i32;
/// `nid.v1.IdentityStatus.DEACTIVATED`.
pub const DEACTIVATED: i32 = IdentityStatus::Deactivated as i32;

/// Most VID entries an identity keeps (usable, revoked and expired together). Creating one more
/// drops the oldest unusable entry; when every entry is usable, creation is refused.
pub const MAX_VIDS: usize = 32;

fn bump(profile: &mut AuthProfile, now_ms: u64) -> u64 {
    profile.version += 1;
    profile.updated_ms = now_ms.max(profile.updated_ms);
    profile.version
}

fn refuse_if_deactivated(profile: &AuthProfile) -> Result<(), Rejection> {
    if profile.status == DEACTIVATED {
        return Err(Rejection::NotAllowed(Refusal::Deactivated));
    }
    Ok(())
}

/// Replaces demographics and biometrics if `expected_version` is current.
pub fn update(
    profile: &mut AuthProfile,
    cold: &mut IdentityRecord,
    op: UpdateOp,
    now_ms: u64,
) -> Result<u64, Rejection> {
    if profile.version != op.expected_version {
        return Err(Rejection::VersionMismatch { current: profile.version });
    }
    refuse_if_deactivated(profile)?;
    if op.demographics.is_none() || op.digests.is_none() {
        return Err(Rejection::Malformed("an update without demographics".into()));
    }
    cold.demographics = op.demographics;
    cold.biometrics = op.biometrics;
    profile.digests = op.digests;
    let version = bump(profile, now_ms);
    profile.cold_version = version;
    Ok(version)
}

/// Changes the lifecycle status. DEACTIVATED is final; setting the current status again changes
/// nothing.
pub fn set_status(
    profile: &mut AuthProfile,
    status: i32,
    reason: &str,
    now_ms: u64,
) -> Result<u64, Rejection> {
    if ![ACTIVATED, BLOCKED, DEACTIVATED].contains(&status) {
        return Err(Rejection::Malformed("status".into()));
    }
    if profile.status == status {
        return Ok(profile.version);
    }
    refuse_if_deactivated(profile)?;
    profile.status = status;
    profile.status_reason = reason.to_owned();
    Ok(bump(profile, now_ms))
}

/// Whether a VID can be used (to read or to authenticate) at `now_ms`, given its uses so far.
pub fn vid_usable(vid: &VidEntry, uses: u32, now_ms: u64) -> bool {
    !vid.revoked()
        && (vid.expires_ms == 0 || now_ms < vid.expires_ms)
        && (vid.max_uses == 0 || uses < vid.max_uses)
}

/// Adds the VID `candidate`. A new perpetual VID revokes the previous active one: one active
/// perpetual VID per UIN. Returns the new entry and the VIDs dropped to stay within [`MAX_VIDS`]
/// (their index keys go too).
pub fn create_vid(
    profile: &mut AuthProfile,
    state: &AuthState,
    candidate: String,
    kind: i32,
    expires_ms: u64,
    max_uses: u32,
    now_ms: u64,
) -> Result<(VidEntry, Vec<VidEntry>), Rejection> {
    if profile.status != ACTIVATED {
        return Err(Rejection::NotAllowed(Refusal::VidNeedsActivated));
    }
    let (expires_ms, max_uses) = match VidKind::try_from(kind) {
        Ok(VidKind::Perpetual) => (0, 0),
        Ok(VidKind::Temporary) if expires_ms > now_ms => (expires_ms, max_uses),
        Ok(VidKind::Temporary) => return Err(Rejection::NotAllowed(Refusal::VidExpiryPassed)),
        _ => return Err(Rejection::Malformed("vid kind".into())),
    };
    let mut dropped = Vec::new();
    if profile.vids.len() >= MAX_VIDS {
        match profile.vids.iter().position(|v| !vid_usable(v, state.uses(v.slot), now_ms)) {
            Some(i) => dropped.push(profile.vids.remove(i)),
            None => return Err(Rejection::NotAllowed(Refusal::TooManyVids)),
        }
    }
    let version = bump(profile, now_ms);
    if kind == VidKind::Perpetual as i32 {
        for old in profile.vids.iter_mut().filter(|v| v.kind == kind && !v.revoked()) {
            old.revoked_version = version;
        }
    }
    let entry = VidEntry {
        vid: candidate,
        kind,
        created_ms: now_ms,
        expires_ms,
        max_uses,
        revoked_version: 0,
        created_version: version,
        slot: profile.next_vid_slot,
    };
    profile.next_vid_slot = profile.next_vid_slot.wrapping_add(1);
    profile.vids.push(entry.clone());
    Ok((entry, dropped))
}

/// Revokes a VID of this identity. Revoking it again changes nothing.
pub fn revoke_vid(profile: &mut AuthProfile, vid: &str, now_ms: u64) -> Result<(), Rejection> {
    let next = profile.version + 1;
    let Some(entry) = profile.vids.iter_mut().find(|v| v.vid == vid) else {
        return Err(Rejection::NotFound);
    };
    if entry.revoked() {
        return Ok(());
    }
    entry.revoked_version = next;
    bump(profile, now_ms);
    Ok(())
}

/// The locks in force at `now_ms`.
pub fn active_locks(locks: &[LockEntry], now_ms: u64) -> Vec<LockEntry> {
    locks.iter().filter(|l| l.until_ms == 0 || now_ms < l.until_ms).copied().collect()
}

/// Sets and clears auth-type locks; returns the locks in force afterwards.
pub fn lock_auth_types(
    profile: &mut AuthProfile,
    lock: &[LockEntry],
    unlock: &[i32],
    now_ms: u64,
) -> Result<Vec<LockEntry>, Rejection> {
    refuse_if_deactivated(profile)?;
    let mut locks = active_locks(&profile.locks, now_ms);
    locks.retain(|l| !unlock.contains(&l.auth_type));
    for new in lock {
        locks.retain(|l| l.auth_type != new.auth_type);
        locks.push(*new);
    }
    locks.sort_by_key(|l| l.auth_type);
    if locks != profile.locks {
        profile.locks = locks;
        bump(profile, now_ms);
    }
    Ok(active_locks(&profile.locks, now_ms))
}

/// The history view of the current version.
pub fn history_entry(profile: &AuthProfile, cold: &IdentityRecord) -> HistoryEntry {
    HistoryEntry {
        version: profile.version,
        status: profile.status,
        status_reason: profile.status_reason.clone(),
        updated_ms: profile.updated_ms,
        demographics: cold.demographics.clone(),
        biometrics: cold.biometrics.clone(),
        locks: profile.locks.clone(),
        has_pin: profile.pin.is_some(),
        has_totp: !profile.totp_secret.is_empty(),
        updated_by: profile.updated_by.clone(),
    }
}

/// The VIDs as of `version`: those created by then, revoked only if revoked by then.
pub fn vids_as_of(vids: &[VidEntry], version: u64) -> Vec<VidEntry> {
    vids.iter()
        .filter(|v| v.created_version <= version)
        .map(|v| {
            let mut v = v.clone();
            if v.revoked_version > version {
                v.revoked_version = 0;
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> AuthProfile {
        AuthProfile { version: 1, status: ACTIVATED, updated_ms: 1, cold_version: 1, ..Default::default() }
    }

    #[test]
    fn status_changes_bump_the_version_and_deactivated_is_final() {
        let mut p = profile();
        assert_eq!(set_status(&mut p, BLOCKED, "fraud check", 10), Ok(2));
        assert_eq!(set_status(&mut p, BLOCKED, "again", 11), Ok(2), "same status: no change");
        assert_eq!(set_status(&mut p, DEACTIVATED, "death", 12), Ok(3));
        assert_eq!(
            set_status(&mut p, ACTIVATED, "undo", 13),
            Err(Rejection::NotAllowed(Refusal::Deactivated))
        );
        assert!(matches!(set_status(&mut p, 9, "x", 13), Err(Rejection::Malformed(_))));
    }

    #[test]
    fn one_active_perpetual_vid_and_history_views_by_version() {
        let mut p = profile();
        let s = AuthState::default();
        let (a, _) = create_vid(&mut p, &s, "A".into(), VidKind::Perpetual as i32, 0, 0, 10).unwrap();
        let (b, _) = create_vid(&mut p, &s, "B".into(), VidKind::Perpetual as i32, 0, 0, 11).unwrap();
        assert_eq!((a.created_version, b.created_version, p.version), (2, 3, 3));
        assert!(p.vids[0].revoked() && !p.vids[1].revoked());
        let at2 = vids_as_of(&p.vids, 2);
        assert_eq!(at2.len(), 1);
        assert!(!at2[0].revoked(), "as of version 2, A was active");
        assert_eq!(revoke_vid(&mut p, "B", 12), Ok(()));
        assert_eq!(p.version, 4);
        assert_eq!(revoke_vid(&mut p, "B", 13), Ok(()));
        assert_eq!(p.version, 4, "revoking again changes nothing");
        assert_eq!(revoke_vid(&mut p, "C", 13), Err(Rejection::NotFound));
        let r = create_vid(&mut p, &s, "T".into(), VidKind::Temporary as i32, 5, 1, 13);
        assert_eq!(r.unwrap_err(), Rejection::NotAllowed(Refusal::VidExpiryPassed));
    }

    #[test]
    fn the_vid_cap_drops_unusable_entries_first_and_refuses_when_all_are_usable() {
        let mut p = profile();
        let mut s = AuthState::default();
        for i in 0..MAX_VIDS {
            create_vid(&mut p, &s, format!("T{i}"), VidKind::Temporary as i32, 1_000, 1, 10).unwrap();
        }
        let err = create_vid(&mut p, &s, "X".into(), VidKind::Temporary as i32, 1_000, 1, 10).unwrap_err();
        assert_eq!(err, Rejection::NotAllowed(Refusal::TooManyVids));
        // T3's only use is spent: it goes first.
        s.count_use(3);
        let (_, dropped) =
            create_vid(&mut p, &s, "X".into(), VidKind::Temporary as i32, 1_000, 1, 10).unwrap();
        assert_eq!(dropped.iter().map(|v| v.vid.as_str()).collect::<Vec<_>>(), vec!["T3"]);
        assert_eq!(p.vids.len(), MAX_VIDS);
        assert!(vid_usable(p.vids.last().unwrap(), 0, 999));
        assert!(!vid_usable(p.vids.last().unwrap(), 0, 1_000), "expired");
    }

    #[test]
    fn locks_expire_and_unlock() {
        let mut p = profile();
        let pin = LockEntry { auth_type: 2, until_ms: 100 };
        let demo = LockEntry { auth_type: 1, until_ms: 0 };
        assert_eq!(lock_auth_types(&mut p, &[pin, demo], &[], 10).unwrap(), vec![demo, pin]);
        assert_eq!(p.version, 2);
        assert_eq!(active_locks(&p.locks, 100), vec![demo]);
        assert_eq!(lock_auth_types(&mut p, &[], &[1], 10).unwrap(), vec![pin]);
        assert_eq!(lock_auth_types(&mut p, &[], &[1], 10).unwrap(), vec![pin]);
        assert_eq!(p.version, 3, "unlocking what is not locked changes nothing");
    }
}
