//! From stored records to the public answers: identity views (current and historical), VIDs,
//! locks, audit records, and the signed authentication decision.

use crate::keyring::Keyring;
use crate::lifecycle::{active_locks, vids_as_of};
use crate::outcome::AuthOutcome;
use crate::records::{
    AuditRecord, AuthProfile, AuthState, HistoryEntry, IdentityRecord, LockEntry, StoredDemographics,
    VidEntry,
};
use crate::time::timestamp;
use nid_proto::v1::{
    Address, AuthDecision, AuthLock, AuthRecord, AuthenticateResponse, BiometricReference, Demographics,
    GetSigningKeysResponse, Identity, SigningKey, VidInfo,
};
use prost::Message as _;

/// The wire demographics of stored ones.
pub fn demographics(d: &StoredDemographics) -> Demographics {
    Demographics {
        full_name: d.full_name.clone(),
        date_of_birth: d.date_of_birth.clone(),
        gender: d.gender,
        address: d.address.as_ref().map(|a| Address {
            lines: a.lines.clone(),
            locality: a.locality.clone(),
            region: a.region.clone(),
            postal_code: a.postal_code.clone(),
            country: a.country.clone(),
        }),
        phone: d.phone.clone(),
        email: d.email.clone(),
        extensions: d.extensions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The wire view of a VID, with its uses so far.
pub fn vid(v: &VidEntry, uses: u32) -> VidInfo {
    VidInfo {
        vid: v.vid.clone(),
        kind: v.kind,
        created_at: Some(timestamp(v.created_ms)),
        expires_at: (v.expires_ms != 0).then(|| timestamp(v.expires_ms)),
        uses_left: v.max_uses.saturating_sub(uses),
        revoked: v.revoked(),
    }
}

/// The wire view of locks in force at `now_ms`.
pub fn locks(locks: &[LockEntry], now_ms: u64) -> Vec<AuthLock> {
    active_locks(locks, now_ms)
        .iter()
        .map(|l| AuthLock { auth_type: l.auth_type, until: (l.until_ms != 0).then(|| timestamp(l.until_ms)) })
        .collect()
}

fn biometrics(cold: &[crate::records::StoredBiometric]) -> Vec<BiometricReference> {
    cold.iter()
        .map(|b| BiometricReference {
            modality: b.modality,
            position: b.position.clone(),
            template_digest: b.template_digest.clone(),
            abis_reference: b.abis_reference.clone(),
        })
        .collect()
}

/// The current identity.
pub fn identity(cold: &IdentityRecord, profile: &AuthProfile, state: &AuthState, now_ms: u64) -> Identity {
    Identity {
        uin: cold.uin.clone(),
        rid: cold.rid.clone(),
        status: profile.status,
        version: profile.version,
        created_at: Some(timestamp(cold.created_ms)),
        updated_at: Some(timestamp(profile.updated_ms)),
        demographics: cold.demographics.as_ref().map(demographics),
        biometrics: biometrics(&cold.biometrics),
        vids: profile.vids.iter().map(|v| vid(v, state.uses(v.slot))).collect(),
        auth_locks: locks(&profile.locks, now_ms),
        has_pin: profile.pin.is_some(),
        has_totp: !profile.totp_secret.is_empty(),
        updated_by: profile.updated_by.clone(),
    }
}

/// One historical version. VIDs are those of the profile as of that version (use counts are not
/// versioned: they show today's).
pub fn history(
    cold: &IdentityRecord,
    profile: &AuthProfile,
    state: &AuthState,
    entry: &HistoryEntry,
    now_ms: u64,
) -> Identity {
    Identity {
        uin: cold.uin.clone(),
        rid: cold.rid.clone(),
        status: entry.status,
        version: entry.version,
        created_at: Some(timestamp(cold.created_ms)),
        updated_at: Some(timestamp(entry.updated_ms)),
        demographics: entry.demographics.as_ref().map(demographics),
        biometrics: biometrics(&entry.biometrics),
        vids: vids_as_of(&profile.vids, entry.version).iter().map(|v| vid(v, state.uses(v.slot))).collect(),
        auth_locks: locks(&entry.locks, now_ms),
        has_pin: entry.has_pin,
        has_totp: entry.has_totp,
        updated_by: entry.updated_by.clone(),
    }
}

/// An audit record as the resident sees it.
pub fn auth_record(r: AuditRecord) -> AuthRecord {
    AuthRecord {
        time: Some(timestamp(r.time_ms)),
        partner_id: r.partner_id,
        transaction_id: r.transaction_id,
        authenticated: r.authenticated,
        reasons: r.reasons,
        auth_types: r.auth_types,
    }
}

/// The signed answer to an authentication: the decision encoded once, signed with `generation`'s
/// key (Ed25519 is deterministic: the same decision under the same key gives the same bytes). A
/// partner token accompanies only a yes; a "no" tells the partner nothing about the person.
pub fn signed_decision(
    keyring: &Keyring,
    generation: u32,
    outcome: &AuthOutcome,
    partner_id: &str,
    transaction_id: &str,
) -> Option<AuthenticateResponse> {
    let partner_token = match (&outcome.uin, outcome.authenticated) {
        (Some(uin), true) => keyring.partner_token(partner_id, uin),
        _ => String::new(),
    };
    let decision = AuthDecision {
        authenticated: outcome.authenticated,
        reasons: outcome.reasons.clone(),
        partner_token,
        transaction_id: transaction_id.to_owned(),
        partner_id: partner_id.to_owned(),
        response_time: Some(timestamp(outcome.time_ms)),
    };
    let signed_decision = decision.encode_to_vec();
    let (signature, key_id) = keyring.sign(generation, &signed_decision)?;
    Some(AuthenticateResponse {
        decision: Some(decision),
        signed_decision,
        signature,
        key_id: key_id.to_owned(),
    })
}

/// The published decision-signing keys.
pub fn signing_keys(keyring: &Keyring) -> GetSigningKeysResponse {
    GetSigningKeysResponse {
        keys: keyring
            .signing_public_keys()
            .into_iter()
            .map(|(key_id, public_key)| SigningKey { key_id, public_key, not_before: None, not_after: None })
            .collect(),
    }
}
