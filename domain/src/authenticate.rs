//! The authentication decision (DESIGN.md §5), a pure function of the identity's profile and hot
//! state, the attempt and the command's time. Checks run in the documented order and the first
//! failing stage decides: factor granted to the partner -> status -> VID usable -> auth type
//! locked -> lockout -> replay -> request time within the skew -> factors (every factor that did
//! not match is reported). Only the hot [`AuthState`] changes; the audit chain grows by one record
//! per decision ([`append_audit`]).

use crate::commands::{AuthAttempt, AuthPolicy};
use crate::demographics;
use crate::keyring::{Keyring, ct_eq};
use crate::lifecycle::{ACTIVATED, BLOCKED, active_locks, vid_usable};
use crate::records::{AuditRecord, AuthProfile, AuthState, VidEntry};
use crate::totp;
use nid_proto::v1::{AuthReason, AuthType};

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

/// What an authentication decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Yes or no.
    pub authenticated: bool,
    /// Reason codes (empty on yes).
    pub reasons: Vec<i32>,
    /// Whether the (partner, transaction) pair is to be recorded as seen.
    pub record_transaction: bool,
}

/// Decides an authentication and updates the hot state (failures, lockout, TOTP step, VID uses).
/// `via_vid` is the VID entry the attempt came through; `replayed` says the transaction id was
/// already used for another request.
pub fn decide(
    profile: &AuthProfile,
    state: &mut AuthState,
    attempt: &AuthAttempt,
    via_vid: Option<&VidEntry>,
    replayed: bool,
    now_ms: u64,
    keyring: &Keyring,
) -> Decision {
    let policy = attempt.policy.unwrap_or_else(AuthPolicy::standard);
    let no = |reason: AuthReason, record_transaction: bool| Decision {
        authenticated: false,
        reasons: vec![reason as i32],
        record_transaction,
    };
    if !factors_allowed(attempt) {
        return no(AuthReason::FactorNotAllowed, true);
    }
    if profile.status == BLOCKED {
        return no(AuthReason::IdentityBlocked, true);
    }
    if profile.status != ACTIVATED {
        return no(AuthReason::IdentityDeactivated, true);
    }
    if let Some(vid) = via_vid
        && !vid_usable(vid, state.uses(vid.slot), now_ms)
    {
        return no(AuthReason::VidUnusable, true);
    }
    let types = presented(attempt);
    if active_locks(&profile.locks, now_ms).iter().any(|l| types.contains(&l.auth_type)) {
        return no(AuthReason::AuthTypeLocked, true);
    }
    if state.locked_until_ms > now_ms {
        return no(AuthReason::TooManyFailures, true);
    }
    if replayed {
        return no(AuthReason::ReplayedTransaction, false);
    }
    if attempt.request_time_ms.abs_diff(now_ms) > policy.skew_ms {
        return no(AuthReason::RequestExpired, true);
    }

    let mut reasons = Vec::new();
    if let Some(claim) = &attempt.demographic {
        let matched = profile.digests.as_ref().is_some_and(|d| demographics::matches(claim, d));
        if !matched {
            reasons.push(AuthReason::DemographicMismatch as i32);
        }
    }
    if let Some(pin) = &attempt.pin {
        match &profile.pin {
            None => reasons.push(AuthReason::PinNotEnrolled as i32),
            Some(v) if !ct_eq(&keyring.pin_mac(&v.salt, pin), &v.mac) => {
                reasons.push(AuthReason::PinMismatch as i32)
            }
            Some(_) => {}
        }
    }
    if let Some(code) = &attempt.totp {
        if profile.totp_secret.is_empty() {
            reasons.push(AuthReason::TotpNotEnrolled as i32);
        } else {
            match totp::check(&profile.totp_secret, code, now_ms, state.totp_last_step) {
                // A matched code is spent even if another factor fails: never accepted twice.
                Some(step) => state.totp_last_step = step,
                None => reasons.push(AuthReason::TotpMismatch as i32),
            }
        }
    }
    if reasons.is_empty() {
        state.failures = 0;
        state.locked_until_ms = 0;
        if let Some(vid) = via_vid
            && vid.max_uses > 0
        {
            state.count_use(vid.slot);
        }
        Decision { authenticated: true, reasons, record_transaction: true }
    } else {
        state.failures = state.failures.saturating_add(1);
        if state.failures >= policy.max_failures.max(1) {
            state.failures = 0;
            state.locked_until_ms = now_ms.saturating_add(policy.cooldown_ms);
        }
        Decision { authenticated: false, reasons, record_transaction: true }
    }
}

/// Appends a decision to the identity's audit chain; returns the record to store.
pub fn append_audit(
    state: &mut AuthState,
    attempt: &AuthAttempt,
    decision: &Decision,
    now_ms: u64,
) -> AuditRecord {
    let record = AuditRecord {
        seq: state.audit_len + 1,
        time_ms: now_ms,
        partner_id: attempt.partner_id.clone(),
        transaction_id: attempt.transaction_id.clone(),
        authenticated: decision.authenticated,
        reasons: decision.reasons.clone(),
        auth_types: presented(attempt),
        prev: state.audit_head.clone(),
    };
    state.audit_len = record.seq;
    state.audit_head = audit_hash(&record).to_vec();
    record
}

/// The chain hash of an audit record: SHA-256 of its canonical encoding.
pub fn audit_hash(record: &AuditRecord) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, &nid_proto::codec::encode(record));
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The result of verifying an identity's audit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainReport {
    /// True when every link and the head match.
    pub intact: bool,
    /// Records checked.
    pub records: u64,
    /// Sequence number of the first broken link (0 when intact).
    pub first_broken: u64,
}

/// Walks an audit chain: every record must sit at its sequence and link to the hash of the one
/// before, and the last must be the head the hot state records. `records` yields each record in
/// sequence order, or None for one that does not open (tampered ciphertext breaks the chain there).
pub fn verify_chain(
    records: impl IntoIterator<Item = Option<AuditRecord>>,
    state: &AuthState,
) -> ChainReport {
    let broken = |at: u64, records: u64| ChainReport { intact: false, records, first_broken: at };
    let mut prev: Vec<u8> = Vec::new();
    let mut expected = 1u64;
    for record in records {
        let Some(record) = record else { return broken(expected, expected - 1) };
        if record.seq != expected || record.prev != prev {
            return broken(expected, expected - 1);
        }
        prev = audit_hash(&record).to_vec();
        expected += 1;
    }
    let records = expected - 1;
    if records != state.audit_len || prev != state.audit_head {
        // Missing or extra records at the end, or a last record that is not the recorded head.
        let at = if records == state.audit_len { records.max(1) } else { records.min(state.audit_len) + 1 };
        return broken(at, records);
    }
    ChainReport { intact: true, records, first_broken: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::DemographicClaim;
    use crate::records::{DemographicDigests, PinVerifier, StoredDemographics};

    fn profile(keyring: &Keyring) -> AuthProfile {
        let d = StoredDemographics {
            full_name: "Ana".into(),
            date_of_birth: "1990-01-31".into(),
            ..Default::default()
        };
        let salt = vec![7u8; 16];
        AuthProfile {
            version: 1,
            status: ACTIVATED,
            pin: Some(PinVerifier { mac: keyring.pin_mac(&salt, "2468").to_vec(), salt }),
            digests: Some(demographics::digests(keyring, &d)),
            ..Default::default()
        }
    }

    fn attempt(pin: &str, time: u64) -> AuthAttempt {
        AuthAttempt {
            partner_id: "p".into(),
            allowed: vec![1, 2, 3],
            transaction_id: "t".into(),
            request_time_ms: time,
            pin: Some(pin.into()),
            policy: Some(AuthPolicy { max_failures: 2, cooldown_ms: 1_000, skew_ms: 100 }),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_failing_stage_decides_and_failures_lock_until_the_cooldown() {
        let k = Keyring::dev();
        let p = profile(&k);
        let mut s = AuthState::default();
        let yes = decide(&p, &mut s, &attempt("2468", 10_000), None, false, 10_000, &k);
        assert!(yes.authenticated);
        let expired = decide(&p, &mut s, &attempt("2468", 10_000), None, false, 10_101, &k);
        assert_eq!(expired.reasons, vec![AuthReason::RequestExpired as i32]);
        let replay = decide(&p, &mut s, &attempt("2468", 10_000), None, true, 10_000, &k);
        assert_eq!(
            (replay.reasons[0], replay.record_transaction),
            (AuthReason::ReplayedTransaction as i32, false)
        );
        assert_eq!(
            decide(&p, &mut s, &attempt("0000", 10_000), None, false, 10_000, &k).reasons,
            vec![AuthReason::PinMismatch as i32]
        );
        assert_eq!(s.failures, 1);
        decide(&p, &mut s, &attempt("0000", 10_000), None, false, 10_000, &k);
        assert_eq!((s.failures, s.locked_until_ms), (0, 11_000), "the second failure locks");
        let locked = decide(&p, &mut s, &attempt("2468", 10_500), None, false, 10_500, &k);
        assert_eq!(locked.reasons, vec![AuthReason::TooManyFailures as i32], "right factors, still locked");
        assert!(decide(&p, &mut s, &attempt("2468", 11_000), None, false, 11_000, &k).authenticated);
        let mut not_allowed = attempt("2468", 11_000);
        not_allowed.allowed = vec![1];
        assert_eq!(
            decide(&p, &mut s, &not_allowed, None, false, 11_000, &k).reasons,
            vec![AuthReason::FactorNotAllowed as i32]
        );
        let mut demo = attempt("2468", 11_000);
        demo.demographic = Some(DemographicClaim {
            date_of_birth: k.demographic_digest(b"date_of_birth", "1990-01-30").to_vec(),
            ..Default::default()
        });
        let both = decide(&p, &mut s, &demo, None, false, 11_000, &k);
        assert_eq!(both.reasons, vec![AuthReason::DemographicMismatch as i32]);
        let _ = DemographicDigests::default();
    }

    #[test]
    fn a_spent_temporary_vid_is_unusable() {
        let k = Keyring::dev();
        let p = profile(&k);
        let mut s = AuthState::default();
        let vid = VidEntry {
            vid: "V".into(),
            kind: 2,
            expires_ms: 1_000_000,
            max_uses: 1,
            slot: 4,
            ..Default::default()
        };
        assert!(decide(&p, &mut s, &attempt("2468", 10_000), Some(&vid), false, 10_000, &k).authenticated);
        assert_eq!(s.uses(4), 1);
        let second = decide(&p, &mut s, &attempt("2468", 10_000), Some(&vid), false, 10_000, &k);
        assert_eq!(second.reasons, vec![AuthReason::VidUnusable as i32]);
    }

    #[test]
    fn the_chain_detects_a_changed_a_missing_and_an_extra_record() {
        let mut s = AuthState::default();
        let a = attempt("1", 0);
        let d = Decision { authenticated: true, reasons: vec![], record_transaction: true };
        let records: Vec<AuditRecord> = (0..3).map(|i| append_audit(&mut s, &a, &d, i)).collect();
        let report = |rs: Vec<Option<AuditRecord>>| verify_chain(rs, &s);
        assert!(report(records.iter().cloned().map(Some).collect()).intact);
        let mut changed: Vec<_> = records.iter().cloned().map(Some).collect();
        changed[1].as_mut().unwrap().authenticated = false;
        assert_eq!(report(changed).first_broken, 3, "the next link no longer matches");
        let mut unopened: Vec<_> = records.iter().cloned().map(Some).collect();
        unopened[1] = None;
        assert_eq!(report(unopened).first_broken, 2);
        assert_eq!(report(records[..2].iter().cloned().map(Some).collect()).first_broken, 3);
    }
}
