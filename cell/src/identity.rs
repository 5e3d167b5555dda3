//! The identity domain's rules as pure functions over one [`IdentityRecord`]: lifecycle, VIDs,
//! auth-type locks and the authentication decision (DESIGN.md §5).
//!
//! Everything here is deterministic: time comes from the command (the leader's clock at proposal),
//! never from the replica, so every replica reaches the same record and the same decision. The
//! state machine ([`crate::fsm`]) does the reads and writes around these functions.

use crate::codec;
use crate::command::{AuditRecord, AuthAttempt, IdentityRecord, LockEntry, PinVerifier, Rejection, VidEntry};
use crate::crypto::{Keyring, ct_eq};
use nid_proto::v1::{
    AuthReason, AuthType, BiometricReference, DemographicFactor, Demographics, EnrollRequest, IdentityStatus,
    MatchMode, VidKind,
};
use prost::Message as _;
use unicode_normalization::UnicodeNormalization as _;

/// `nid.v1.IdentityStatus.ACTIVATED`.
pub const ACTIVATED: i32 = IdentityStatus::Activated as i32;
/// `nid.v1.IdentityStatus.BLOCKED`.
pub const BLOCKED: i32 = IdentityStatus::Blocked as i32;
/// `nid.v1.IdentityStatus.DEACTIVATED`.
pub const DEACTIVATED: i32 = IdentityStatus::Deactivated as i32;

/// TOTP time step (RFC 6238), seconds.
pub const TOTP_STEP_SECS: u64 = 30;

fn bump(rec: &mut IdentityRecord, now_ms: u64) {
    rec.version += 1;
    rec.updated_ms = now_ms.max(rec.updated_ms);
}

fn refuse_if_deactivated(rec: &IdentityRecord) -> Result<(), Rejection> {
    if rec.status == DEACTIVATED {
        return Err(Rejection::NotAllowed("the identity is deactivated; it can no longer change"));
    }
    Ok(())
}

/// Replaces demographics and biometrics if `expected_version` is current.
pub fn update(
    rec: &mut IdentityRecord,
    expected_version: u64,
    demographics: &[u8],
    biometrics: &[Vec<u8>],
    now_ms: u64,
) -> Result<u64, Rejection> {
    if rec.version != expected_version {
        return Err(Rejection::VersionMismatch { current: rec.version });
    }
    refuse_if_deactivated(rec)?;
    let malformed = |what: &str| Rejection::Malformed(format!("{what} does not decode"));
    let mut stored =
        EnrollRequest::decode(rec.request.as_slice()).map_err(|_| malformed("stored request"))?;
    stored.demographics = Some(Demographics::decode(demographics).map_err(|_| malformed("demographics"))?);
    stored.biometrics = biometrics
        .iter()
        .map(|b| BiometricReference::decode(b.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(|_| malformed("biometrics"))?;
    rec.request = stored.encode_to_vec();
    bump(rec, now_ms);
    Ok(rec.version)
}

/// Changes the lifecycle status. DEACTIVATED is final; setting the current status again changes
/// nothing (an idempotent retry).
pub fn set_status(
    rec: &mut IdentityRecord,
    status: i32,
    reason: &str,
    now_ms: u64,
) -> Result<u64, Rejection> {
    if ![ACTIVATED, BLOCKED, DEACTIVATED].contains(&status) {
        return Err(Rejection::Malformed("status".into()));
    }
    if rec.status == status {
        return Ok(rec.version);
    }
    refuse_if_deactivated(rec)?;
    rec.status = status;
    rec.status_reason = reason.to_owned();
    bump(rec, now_ms);
    Ok(rec.version)
}

/// Whether a VID can be used (to read or to authenticate) at `now_ms`.
pub fn vid_usable(vid: &VidEntry, now_ms: u64) -> bool {
    !vid.revoked && vid.expires_ms.is_none_or(|e| now_ms < e) && vid.uses_left != Some(0)
}

/// Adds a VID (the state machine picked `vid` among the free candidates). A new perpetual VID
/// revokes the previous active one: one active perpetual VID per UIN.
pub fn create_vid(
    rec: &mut IdentityRecord,
    vid: String,
    kind: i32,
    expires_ms: Option<u64>,
    max_uses: Option<u32>,
    now_ms: u64,
) -> Result<VidEntry, Rejection> {
    if rec.status != ACTIVATED {
        return Err(Rejection::NotAllowed("VIDs can only be created for an activated identity"));
    }
    let entry = match VidKind::try_from(kind) {
        Ok(VidKind::Perpetual) => {
            for old in rec.vids.iter_mut().filter(|v| v.kind == kind && !v.revoked) {
                old.revoked = true;
            }
            VidEntry { vid, kind, created_ms: now_ms, expires_ms: None, uses_left: None, revoked: false }
        }
        Ok(VidKind::Temporary) => {
            let Some(expires) = expires_ms.filter(|&e| e > now_ms) else {
                return Err(Rejection::NotAllowed("a temporary VID needs an expiry in the future"));
            };
            VidEntry {
                vid,
                kind,
                created_ms: now_ms,
                expires_ms: Some(expires),
                uses_left: max_uses,
                revoked: false,
            }
        }
        _ => return Err(Rejection::Malformed("vid kind".into())),
    };
    rec.vids.push(entry.clone());
    bump(rec, now_ms);
    Ok(entry)
}

/// Revokes a VID of this identity. Revoking it again changes nothing.
pub fn revoke_vid(rec: &mut IdentityRecord, vid: &str, now_ms: u64) -> Result<(), Rejection> {
    let Some(entry) = rec.vids.iter_mut().find(|v| v.vid == vid) else {
        return Err(Rejection::NotFound);
    };
    if entry.revoked {
        return Ok(());
    }
    entry.revoked = true;
    bump(rec, now_ms);
    Ok(())
}

/// The locks in force at `now_ms`.
pub fn active_locks(rec: &IdentityRecord, now_ms: u64) -> Vec<LockEntry> {
    rec.locks.iter().filter(|l| l.until_ms.is_none_or(|u| now_ms < u)).copied().collect()
}

/// Sets and clears auth-type locks; returns the locks in force afterwards.
pub fn lock_auth_types(
    rec: &mut IdentityRecord,
    lock: &[LockEntry],
    unlock: &[i32],
    now_ms: u64,
) -> Result<Vec<LockEntry>, Rejection> {
    refuse_if_deactivated(rec)?;
    let mut locks = active_locks(rec, now_ms);
    locks.retain(|l| !unlock.contains(&l.auth_type));
    for new in lock {
        locks.retain(|l| l.auth_type != new.auth_type);
        locks.push(*new);
    }
    locks.sort_by_key(|l| l.auth_type);
    if locks != rec.locks {
        rec.locks = locks;
        bump(rec, now_ms);
    }
    Ok(active_locks(rec, now_ms))
}

/// The auth types an attempt presents.
pub fn presented(attempt: &AuthAttempt) -> Vec<i32> {
    let mut types = Vec::new();
    if attempt.demographic.is_some() {
        types.push(AuthType::Demographic as i32);
    }
    if attempt.pin.is_some() {
        types.push(AuthType::Pin as i32);
    }
    if attempt.totp.is_some() {
        types.push(AuthType::Totp as i32);
    }
    types
}

/// Whether the partner may use every factor it presents.
pub fn factors_allowed(attempt: &AuthAttempt) -> bool {
    presented(attempt).iter().all(|t| attempt.allowed.contains(t))
}

/// What an authentication decided and what it changes besides the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Yes or no.
    pub authenticated: bool,
    /// Reason codes (empty on yes).
    pub reasons: Vec<i32>,
    /// Whether the (partner, transaction) pair is to be recorded as seen.
    pub record_transaction: bool,
}

/// Decides an authentication of `rec` and updates its counters (failures, lockout, TOTP step, VID
/// uses). Checks run in the documented order and the first failing stage decides; the factor stage
/// reports every factor that did not match.
pub fn authenticate(
    rec: &mut IdentityRecord,
    attempt: &AuthAttempt,
    via_vid: Option<&str>,
    replayed: bool,
    now_ms: u64,
    keyring: &Keyring,
) -> Decision {
    let no = |reason: AuthReason, record_transaction: bool| Decision {
        authenticated: false,
        reasons: vec![reason as i32],
        record_transaction,
    };
    if !factors_allowed(attempt) {
        return no(AuthReason::FactorNotAllowed, true);
    }
    if rec.status == BLOCKED {
        return no(AuthReason::IdentityBlocked, true);
    }
    if rec.status != ACTIVATED {
        return no(AuthReason::IdentityDeactivated, true);
    }
    if let Some(vid) = via_vid
        && !rec.vids.iter().any(|v| v.vid == vid && vid_usable(v, now_ms))
    {
        return no(AuthReason::VidUnusable, true);
    }
    let types = presented(attempt);
    if active_locks(rec, now_ms).iter().any(|l| types.contains(&l.auth_type)) {
        return no(AuthReason::AuthTypeLocked, true);
    }
    if rec.locked_until_ms > now_ms {
        return no(AuthReason::TooManyFailures, true);
    }
    if replayed {
        return no(AuthReason::ReplayedTransaction, false);
    }
    if attempt.request_time_ms.abs_diff(now_ms) > attempt.policy.skew_ms {
        return no(AuthReason::RequestExpired, true);
    }

    let mut reasons = Vec::new();
    if let Some(factor) = &attempt.demographic {
        let matched = DemographicFactor::decode(factor.as_slice())
            .ok()
            .zip(EnrollRequest::decode(rec.request.as_slice()).ok().and_then(|r| r.demographics))
            .is_some_and(|(f, d)| demographics_match(&f, &d));
        if !matched {
            reasons.push(AuthReason::DemographicMismatch as i32);
        }
    }
    if let Some(pin) = &attempt.pin {
        match &rec.pin {
            None => reasons.push(AuthReason::PinNotEnrolled as i32),
            Some(v) if !pin_matches(keyring, v, pin) => reasons.push(AuthReason::PinMismatch as i32),
            Some(_) => {}
        }
    }
    if let Some(code) = &attempt.totp {
        match &rec.totp_secret {
            None => reasons.push(AuthReason::TotpNotEnrolled as i32),
            Some(secret) => match totp_match(secret, code, now_ms, rec.totp_last_step) {
                // A matched code is spent even if another factor fails: it is never accepted twice.
                Some(step) => rec.totp_last_step = step,
                None => reasons.push(AuthReason::TotpMismatch as i32),
            },
        }
    }
    if reasons.is_empty() {
        rec.failures = 0;
        rec.locked_until_ms = 0;
        if let Some(vid) = via_vid
            && let Some(entry) = rec.vids.iter_mut().find(|v| v.vid == vid)
            && let Some(left) = entry.uses_left.as_mut()
        {
            *left = left.saturating_sub(1);
        }
        Decision { authenticated: true, reasons, record_transaction: true }
    } else {
        rec.failures = rec.failures.saturating_add(1);
        if rec.failures >= attempt.policy.max_failures.max(1) {
            rec.failures = 0;
            rec.locked_until_ms = now_ms.saturating_add(attempt.policy.cooldown_ms);
        }
        Decision { authenticated: false, reasons, record_transaction: true }
    }
}

/// Appends a decision to the identity's audit chain; returns the record to store.
pub fn append_audit(
    rec: &mut IdentityRecord,
    attempt: &AuthAttempt,
    decision: &Decision,
    now_ms: u64,
) -> AuditRecord {
    let record = AuditRecord {
        seq: rec.audit_len + 1,
        time_ms: now_ms,
        partner_id: attempt.partner_id.clone(),
        transaction_id: attempt.transaction_id.clone(),
        authenticated: decision.authenticated,
        reasons: decision.reasons.clone(),
        auth_types: presented(attempt),
        prev: rec.audit_head,
    };
    rec.audit_len = record.seq;
    rec.audit_head = audit_hash(&record);
    record
}

/// The chain hash of an audit record: SHA-256 of its canonical encoding.
pub fn audit_hash(record: &AuditRecord) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, &codec::encode(record));
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Builds a PIN verifier with a fresh salt.
pub fn pin_verifier(keyring: &Keyring, salt: [u8; 16], pin: &str) -> PinVerifier {
    PinVerifier { salt, mac: keyring.pin_mac(&salt, pin) }
}

fn pin_matches(keyring: &Keyring, verifier: &PinVerifier, pin: &str) -> bool {
    ct_eq(&keyring.pin_mac(&verifier.salt, pin), &verifier.mac)
}

/// Unicode NFKC, case fold, whitespace collapsed: the NORMALIZED match mode.
pub fn normalize(s: &str) -> String {
    let nfkc: String = s.nfkc().collect();
    let folded = caseless::default_case_fold_str(&nfkc);
    let renormalized: String = folded.nfkc().collect();
    renormalized.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Compares the fields set in `factor` with the stored demographics.
pub fn demographics_match(factor: &DemographicFactor, stored: &Demographics) -> bool {
    let normalized = factor.match_mode == MatchMode::Normalized as i32;
    let eq = |given: &str, have: &str| {
        if normalized { normalize(given) == normalize(have) } else { given == have }
    };
    let mut compared = 0;
    let mut all = true;
    for (given, have) in [
        (&factor.full_name, &stored.full_name),
        (&factor.date_of_birth, &stored.date_of_birth),
        (&factor.phone, &stored.phone),
        (&factor.email, &stored.email),
    ] {
        if !given.is_empty() {
            compared += 1;
            all &= eq(given, have);
        }
    }
    if factor.gender != 0 {
        compared += 1;
        all &= factor.gender == stored.gender;
    }
    compared > 0 && all
}

/// The 6-digit RFC 6238 code (HMAC-SHA1, as authenticator apps use) for time step `step`.
pub fn totp_code(secret: &[u8], step: u64) -> u32 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = ring::hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let bin = (u32::from(mac[offset]) & 0x7f) << 24
        | u32::from(mac[offset + 1]) << 16
        | u32::from(mac[offset + 2]) << 8
        | u32::from(mac[offset + 3]);
    bin % 1_000_000
}

/// The time step a code matches (the current one, one before or one after), if any, and only if
/// that step is later than the last step accepted: a code is never accepted twice.
pub fn totp_match(secret: &[u8], code: &str, now_ms: u64, last_step: u64) -> Option<u64> {
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = now_ms / 1000 / TOTP_STEP_SECS;
    let mut found = None;
    // Check every window step (no early exit) so timing does not tell which step matched.
    for step in [current.saturating_sub(1), current, current + 1] {
        let expected = format!("{:06}", totp_code(secret, step));
        if ct_eq(expected.as_bytes(), code.as_bytes()) && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::AuthPolicy;

    fn record() -> IdentityRecord {
        let request = EnrollRequest {
            rid: "R1".into(),
            demographics: Some(Demographics {
                full_name: "Ana  María Núñez".into(),
                date_of_birth: "1990-01-31".into(),
                gender: 1,
                phone: "+15550001111".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let keyring = Keyring::dev();
        IdentityRecord {
            uin: "123456789012".into(),
            status: ACTIVATED,
            status_reason: String::new(),
            version: 1,
            created_ms: 1_000,
            updated_ms: 1_000,
            request: request.encode_to_vec(),
            payload_mac: [0; 32],
            pin: Some(pin_verifier(&keyring, [4; 16], "2468")),
            totp_secret: Some(b"12345678901234567890".to_vec()),
            totp_last_step: 0,
            vids: Vec::new(),
            locks: Vec::new(),
            failures: 0,
            locked_until_ms: 0,
            audit_len: 0,
            audit_head: [0; 32],
        }
    }

    const NOW: u64 = 1_700_000_000_000;

    fn attempt() -> AuthAttempt {
        AuthAttempt {
            partner_id: "bank".into(),
            allowed: vec![1, 2, 3],
            transaction_id: "T1".into(),
            request_time_ms: NOW,
            demographic: None,
            pin: Some("2468".into()),
            totp: None,
            policy: AuthPolicy::default(),
        }
    }

    fn decide(rec: &mut IdentityRecord, a: &AuthAttempt) -> Decision {
        authenticate(rec, a, None, false, NOW, &Keyring::dev())
    }

    #[test]
    fn rfc6238_vectors_truncated_to_six_digits() {
        // RFC 6238 appendix B, SHA-1 secret, T = 59 s and T = 1111111109 s (8-digit codes 94287082
        // and 07081804).
        let secret = b"12345678901234567890";
        assert_eq!(totp_code(secret, 59 / 30), 287_082);
        assert_eq!(totp_code(secret, 1_111_111_109 / 30), 81_804);
    }

    #[test]
    fn a_totp_code_is_accepted_once_within_one_step_of_skew() {
        let secret = b"12345678901234567890";
        let now = NOW;
        let step = now / 1000 / 30;
        let code = format!("{:06}", totp_code(secret, step));
        assert_eq!(totp_match(secret, &code, now, 0), Some(step));
        assert_eq!(totp_match(secret, &code, now, step), None, "reuse refused");
        let next = format!("{:06}", totp_code(secret, step + 1));
        assert_eq!(totp_match(secret, &next, now, step), Some(step + 1), "one step ahead is fine");
        let far = format!("{:06}", totp_code(secret, step + 2));
        assert_eq!(totp_match(secret, &far, now, 0), None, "two steps away is refused");
        assert_eq!(totp_match(secret, "12345", now, 0), None);
    }

    #[test]
    fn normalized_matching_folds_case_width_and_spaces_exact_does_not() {
        assert_eq!(normalize("  ANA   maría\tNÚÑEZ "), normalize("ana maría núñez"));
        assert_eq!(normalize("Ｓｔｒａｓｓｅ"), normalize("strasse"), "fullwidth folds");
        assert_eq!(normalize("STRASSE"), normalize("straße"), "full case folding");
        let stored = Demographics { full_name: "Ana  María Núñez".into(), ..Default::default() };
        let mut f = DemographicFactor { full_name: "ana maría núñez".into(), ..Default::default() };
        assert!(!demographics_match(&f, &stored), "EXACT is byte equality");
        f.match_mode = MatchMode::Normalized as i32;
        assert!(demographics_match(&f, &stored));
        assert!(
            !demographics_match(&DemographicFactor::default(), &stored),
            "nothing to compare is no match"
        );
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let mut rec = record();
        rec.status = BLOCKED;
        let mut a = attempt();
        a.pin = Some("0000".into());
        a.request_time_ms = 0;
        assert_eq!(decide(&mut rec, &a).reasons, vec![AuthReason::IdentityBlocked as i32]);
        rec.status = ACTIVATED;
        rec.locks = vec![LockEntry { auth_type: AuthType::Pin as i32, until_ms: None }];
        assert_eq!(decide(&mut rec, &a).reasons, vec![AuthReason::AuthTypeLocked as i32]);
        rec.locks.clear();
        let d = authenticate(&mut rec, &a, None, true, NOW, &Keyring::dev());
        assert_eq!(d.reasons, vec![AuthReason::ReplayedTransaction as i32]);
        assert!(!d.record_transaction);
        assert_eq!(decide(&mut rec, &a).reasons, vec![AuthReason::RequestExpired as i32]);
        a.request_time_ms = NOW - 1000;
        assert_eq!(decide(&mut rec, &a).reasons, vec![AuthReason::PinMismatch as i32]);
        a.allowed = vec![1];
        assert_eq!(decide(&mut rec, &a).reasons, vec![AuthReason::FactorNotAllowed as i32]);
    }

    #[test]
    fn failures_lock_for_the_cooldown_and_success_resets() {
        let mut rec = record();
        let mut bad = attempt();
        bad.pin = Some("1111".into());
        for _ in 0..4 {
            assert_eq!(decide(&mut rec, &bad).reasons, vec![AuthReason::PinMismatch as i32]);
        }
        assert!(decide(&mut rec, &attempt()).authenticated, "a success before N resets the count");
        assert_eq!(rec.failures, 0);
        for _ in 0..5 {
            decide(&mut rec, &bad);
        }
        assert_eq!(rec.locked_until_ms, NOW + 30 * 60 * 1000);
        assert_eq!(decide(&mut rec, &attempt()).reasons, vec![AuthReason::TooManyFailures as i32]);
        let later = NOW + 30 * 60 * 1000;
        let mut good = attempt();
        good.request_time_ms = later;
        assert!(authenticate(&mut rec, &good, None, false, later, &Keyring::dev()).authenticated);
    }

    #[test]
    fn temporary_vids_expire_and_run_out_of_uses() {
        let mut rec = record();
        let v =
            create_vid(&mut rec, "1".repeat(16), VidKind::Temporary as i32, Some(NOW + 10_000), Some(1), NOW)
                .unwrap();
        assert_eq!(rec.version, 2);
        assert!(vid_usable(&v, NOW));
        assert!(!vid_usable(&v, NOW + 10_000), "expired");
        let d = authenticate(&mut rec, &attempt(), Some(&v.vid), false, NOW, &Keyring::dev());
        assert!(d.authenticated);
        let d = authenticate(&mut rec, &attempt(), Some(&v.vid), false, NOW, &Keyring::dev());
        assert_eq!(d.reasons, vec![AuthReason::VidUnusable as i32], "the one use is spent");
    }

    #[test]
    fn one_active_perpetual_vid_and_deactivation_is_final() {
        let mut rec = record();
        let p = VidKind::Perpetual as i32;
        create_vid(&mut rec, "1".repeat(16), p, None, None, NOW).unwrap();
        create_vid(&mut rec, "2".repeat(16), p, None, None, NOW).unwrap();
        let active: Vec<_> = rec.vids.iter().filter(|v| vid_usable(v, NOW)).map(|v| v.vid.clone()).collect();
        assert_eq!(active, vec!["2".repeat(16)]);
        assert_eq!(set_status(&mut rec, DEACTIVATED, "death", NOW), Ok(4));
        assert_eq!(set_status(&mut rec, DEACTIVATED, "again", NOW), Ok(4), "idempotent");
        assert!(matches!(set_status(&mut rec, ACTIVATED, "undo", NOW), Err(Rejection::NotAllowed(_))));
        assert!(matches!(update(&mut rec, 4, &[], &[], NOW), Err(Rejection::NotAllowed(_))));
        assert_eq!(update(&mut rec, 3, &[], &[], NOW), Err(Rejection::VersionMismatch { current: 4 }));
    }

    #[test]
    fn locks_expire_and_unlock() {
        let mut rec = record();
        let pin = AuthType::Pin as i32;
        let locks =
            lock_auth_types(&mut rec, &[LockEntry { auth_type: pin, until_ms: Some(NOW + 5) }], &[], NOW)
                .unwrap();
        assert_eq!(locks.len(), 1);
        assert!(active_locks(&rec, NOW + 5).is_empty(), "expired");
        lock_auth_types(&mut rec, &[LockEntry { auth_type: pin, until_ms: None }], &[], NOW).unwrap();
        assert_eq!(lock_auth_types(&mut rec, &[], &[pin], NOW).unwrap(), vec![]);
    }

    #[test]
    fn audit_records_chain_by_hash() {
        let mut rec = record();
        let d = decide(&mut rec, &attempt());
        let first = append_audit(&mut rec, &attempt(), &d, NOW);
        let second = append_audit(&mut rec, &attempt(), &d, NOW);
        assert_eq!(first.prev, [0; 32]);
        assert_eq!(second.prev, audit_hash(&first));
        assert_eq!(rec.audit_head, audit_hash(&second));
        assert_eq!(rec.audit_len, 2);
    }
}
