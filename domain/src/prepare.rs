//! The leader's side of a command: from a validated request to the command it proposes. Everything
//! random or time-based is chosen here (the UIN or VID candidate, salts, nonces, the TOTP secret,
//! the time), everything keyed is computed here once (hashes of identifiers, the enrolment and
//! request digests, demographic digests), and everything secret is sealed here with the cell's
//! active key generation, so apply on every replica only checks and writes.

use crate::commands::{
    AuthAttempt, AuthPolicy, CreateVidOp, EnrollCommand, IdentityCommand, IdentityOp, LockOp, RequestKey,
    SetStatusOp, TargetKind, UpdateOp, identity_op, op_aad,
};
use crate::demographics;
use crate::keyring::{Keyring, SealError};
use crate::keys::{self, Table};
use crate::lifecycle::ACTIVATED;
use crate::random::{RandomError, Stream};
use crate::records::{
    AuthProfile, AuthState, IdentityRecord, PinVerifier, RidRecord, StoredAddress, StoredBiometric,
    StoredDemographics, StoredEnrollment,
};
use nid_proto::bucket::{BucketId, KeyDomain, bucket_of_key};
use nid_proto::ids::{GenerationError, IdKind, IdScheme, Identifier};
use nid_proto::v1::{AuthenticateRequest, BiometricReference, Demographics, EnrollRequest};
use prost::Message as _;

/// Why a command could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The random source failed.
    #[error("the random source failed")]
    Random,
    /// The active key generation is not in this replica's keyring.
    #[error("cannot seal: {0}")]
    Seal(#[from] SealError),
}

impl From<RandomError> for PrepareError {
    fn from(_: RandomError) -> PrepareError {
        PrepareError::Random
    }
}

impl From<GenerationError> for PrepareError {
    fn from(_: GenerationError) -> PrepareError {
        PrepareError::Random
    }
}

/// Seals values with one generation, each under a fresh random nonce.
pub struct Sealer<'a> {
    /// The keyring.
    pub keyring: &'a Keyring,
    /// The generation that seals.
    pub generation: u32,
}

impl Sealer<'_> {
    /// Seals the encoding of `value` bound to `aad`.
    pub fn seal<T: prost::Message>(
        &self,
        aad: &[u8],
        value: &T,
        rng: &mut Stream,
    ) -> Result<Vec<u8>, SealError> {
        self.keyring.seal(self.generation, aad, rng.array(), &nid_proto::codec::encode(value))
    }
}

/// The associated data of a cold identity record: its key and the version it was written at.
pub fn cold_aad(key: &[u8], cold_version: u64) -> Vec<u8> {
    let mut aad = key.to_vec();
    aad.extend_from_slice(&cold_version.to_be_bytes());
    aad
}

/// The stored form of wire demographics (extensions in key order).
pub fn stored_demographics(d: &Demographics) -> StoredDemographics {
    StoredDemographics {
        full_name: d.full_name.clone(),
        date_of_birth: d.date_of_birth.clone(),
        gender: d.gender,
        address: d.address.as_ref().map(|a| StoredAddress {
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

/// The stored form of wire biometric references.
pub fn stored_biometrics(b: &[BiometricReference]) -> Vec<StoredBiometric> {
    b.iter()
        .map(|b| StoredBiometric {
            modality: b.modality,
            position: b.position.clone(),
            template_digest: b.template_digest.clone(),
            abis_reference: b.abis_reference.clone(),
        })
        .collect()
}

/// The bucket an enrolment lives in: that of its RID.
pub fn bucket_of_rid(rid: &str) -> BucketId {
    bucket_of_key(KeyDomain::Rid, rid.as_bytes())
}

/// The keyed digest of an enrolment, over its canonical stored form (deterministic whatever the
/// order of its extension map): the same RID with the same payload is a retry.
pub fn enrollment_mac(keyring: &Keyring, req: &EnrollRequest) -> [u8; 32] {
    let canonical = StoredEnrollment {
        rid: req.rid.clone(),
        demographics: req.demographics.as_ref().map(stored_demographics),
        biometrics: stored_biometrics(&req.biometrics),
        pin: req.pin.clone(),
        provision_totp: req.provision_totp,
    };
    keyring.index_hash(keys::ENROLL_PAYLOAD_DOMAIN, &canonical.encode_to_vec())
}

/// A prepared enrolment: the command, and what the proposer answers when it creates the identity.
#[derive(Debug, Clone)]
pub struct PreparedEnrollment {
    /// The command.
    pub command: EnrollCommand,
    /// The UIN it proposes.
    pub uin: String,
    /// The TOTP secret it provisions (empty: none).
    pub totp_secret: Vec<u8>,
}

/// Prepares the enrolment of a validated request with one UIN candidate inside the RID's bucket.
pub fn enroll(
    req: &EnrollRequest,
    creator: &[u8],
    actor: &str,
    sealer: &Sealer<'_>,
    scheme: &IdScheme,
    now_ms: u64,
    rng: &mut Stream,
) -> Result<PreparedEnrollment, PrepareError> {
    let keyring = sealer.keyring;
    let bucket = bucket_of_rid(&req.rid);
    let uin = scheme.generate(IdKind::Uin, bucket, &mut || Ok(rng.next_u64()))?.to_digits();
    let rid_hash = keyring.index_hash(keys::RID_DOMAIN, req.rid.as_bytes());
    let uin_hash = keyring.index_hash(keys::UIN_DOMAIN, uin.as_bytes());
    let payload_mac = enrollment_mac(keyring, req);
    let demographics = req.demographics.as_ref().map(stored_demographics).unwrap_or_default();
    let pin = if req.pin.is_empty() {
        None
    } else {
        let salt = rng.array::<16>().to_vec();
        Some(PinVerifier { mac: keyring.pin_mac(&salt, &req.pin).to_vec(), salt })
    };
    let totp_secret = if req.provision_totp { rng.array::<20>().to_vec() } else { Vec::new() };
    let profile = AuthProfile {
        version: 1,
        status: ACTIVATED,
        status_reason: String::new(),
        updated_ms: now_ms,
        cold_version: 1,
        vids: Vec::new(),
        locks: Vec::new(),
        pin,
        totp_secret: totp_secret.clone(),
        digests: Some(demographics::digests(keyring, &demographics)),
        next_vid_slot: 0,
        updated_by: actor.to_owned(),
    };
    let cold = IdentityRecord {
        uin: uin.clone(),
        rid: req.rid.clone(),
        created_ms: now_ms,
        demographics: Some(demographics),
        biometrics: stored_biometrics(&req.biometrics),
    };
    let history = crate::lifecycle::history_entry(&profile, &cold);
    let rid_record =
        RidRecord { uin: uin.clone(), payload_mac: payload_mac.to_vec(), creator: creator.to_vec() };
    let identity_key = keys::hashed(bucket, Table::Identity, &uin_hash);
    let command = EnrollCommand {
        bucket: u32::from(bucket.get()),
        rid_hash: rid_hash.to_vec(),
        uin_hash: uin_hash.to_vec(),
        payload_mac: payload_mac.to_vec(),
        now_ms,
        rid_record: sealer.seal(&keys::hashed(bucket, Table::Rid, &rid_hash), &rid_record, rng)?,
        identity: sealer.seal(&cold_aad(&identity_key, 1), &cold, rng)?,
        profile: sealer.seal(&keys::hashed(bucket, Table::Profile, &uin_hash), &profile, rng)?,
        state: sealer.seal(&keys::hashed(bucket, Table::State, &uin_hash), &AuthState::default(), rng)?,
        history: sealer.seal(&keys::sequenced(bucket, Table::History, &uin_hash, 1), &history, rng)?,
        index_fingerprint: keyring.index_fingerprint().to_vec(),
        creator: creator.to_vec(),
    };
    Ok(PreparedEnrollment { command, uin, totp_secret })
}

/// How a command names an identifier: its kind and keyed hash.
pub fn target(keyring: &Keyring, id: &Identifier) -> (TargetKind, [u8; 32]) {
    let digits = id.to_digits();
    match id.kind() {
        IdKind::Vid => (TargetKind::Vid, keyring.index_hash(keys::VID_DOMAIN, digits.as_bytes())),
        IdKind::Uin => (TargetKind::Uin, keyring.index_hash(keys::UIN_DOMAIN, digits.as_bytes())),
    }
}

/// The idempotency key of a mutating request: the keyed hash of (caller, request id) and the keyed
/// digest of its content (canonical bytes chosen by the caller of this function).
pub fn request_key(keyring: &Keyring, caller: &str, request_id: &str, content: &[u8]) -> RequestKey {
    let mut natural = Vec::with_capacity(caller.len() + request_id.len() + 8);
    natural.extend_from_slice(&(caller.len() as u32).to_be_bytes());
    natural.extend_from_slice(caller.as_bytes());
    natural.extend_from_slice(request_id.as_bytes());
    RequestKey {
        hash: keyring.index_hash(keys::REQUEST_DOMAIN, &natural).to_vec(),
        content_mac: keyring.index_hash(keys::REQUEST_CONTENT_DOMAIN, content).to_vec(),
    }
}

/// The keyed hash of (caller, request id) that names one client call (empty without a request id).
pub fn call_key(keyring: &Keyring, caller: &str, request_id: &str) -> Vec<u8> {
    if request_id.is_empty() {
        return Vec::new();
    }
    request_key(keyring, caller, request_id, &[]).hash
}

/// The canonical content of an identity operation on `id`, for [`request_key`] (the operation's
/// own encoding is canonical: stored types, no hash maps).
pub fn op_content(id: &Identifier, op: &IdentityOp) -> Vec<u8> {
    let mut content = id.to_digits().into_bytes();
    content.push(0);
    op.encode(&mut content).unwrap_or_default();
    content
}

/// Seals `op` for the identity `id` and wraps it in a command stamped with `now_ms`.
pub fn identity_command(
    sealer: &Sealer<'_>,
    id: &Identifier,
    op: &IdentityOp,
    now_ms: u64,
    request: Option<RequestKey>,
    actor: &str,
    rng: &mut Stream,
) -> Result<IdentityCommand, PrepareError> {
    let (kind, hash) = target(sealer.keyring, id);
    let bucket = u32::from(id.bucket().get());
    let aad = op_aad(bucket, kind as i32, &hash);
    Ok(IdentityCommand {
        bucket,
        target_kind: kind as i32,
        target: hash.to_vec(),
        sealed_op: sealer.seal(&aad, op, rng)?,
        now_ms,
        seed: rng.array::<16>().to_vec(),
        index_fingerprint: sealer.keyring.index_fingerprint().to_vec(),
        request,
        actor: actor.to_owned(),
    })
}

/// An update operation with the new demographics' digests.
pub fn update_op(
    keyring: &Keyring,
    expected_version: u64,
    d: &Demographics,
    b: &[BiometricReference],
) -> IdentityOp {
    let demographics = stored_demographics(d);
    let digests = demographics::digests(keyring, &demographics);
    op(identity_op::Op::Update(UpdateOp {
        expected_version,
        demographics: Some(demographics),
        biometrics: stored_biometrics(b),
        digests: Some(digests),
    }))
}

/// A status change.
pub fn set_status_op(status: i32, reason: &str) -> IdentityOp {
    op(identity_op::Op::SetStatus(SetStatusOp { status, reason: reason.to_owned() }))
}

/// A VID creation with a fresh candidate in the UIN's bucket.
pub fn create_vid_op(
    keyring: &Keyring,
    scheme: &IdScheme,
    uin: &Identifier,
    kind: i32,
    expires_ms: u64,
    max_uses: u32,
    rng: &mut Stream,
) -> Result<IdentityOp, PrepareError> {
    let candidate = scheme.generate(IdKind::Vid, uin.bucket(), &mut || Ok(rng.next_u64()))?.to_digits();
    let candidate_hash = keyring.index_hash(keys::VID_DOMAIN, candidate.as_bytes()).to_vec();
    Ok(op(identity_op::Op::CreateVid(CreateVidOp { kind, expires_ms, max_uses, candidate, candidate_hash })))
}

/// The canonical content of a CreateVid request for its request id: what the client asked, not
/// the candidate the leader drew.
pub fn create_vid_op_content(kind: i32, expires_ms: u64, max_uses: u32) -> Vec<u8> {
    let mut content = b"create-vid".to_vec();
    content.extend_from_slice(&kind.to_be_bytes());
    content.extend_from_slice(&expires_ms.to_be_bytes());
    content.extend_from_slice(&max_uses.to_be_bytes());
    content
}

/// A lock change.
pub fn lock_op(lock: &[(i32, u64)], unlock: &[i32]) -> IdentityOp {
    op(identity_op::Op::LockAuthTypes(LockOp {
        lock: lock
            .iter()
            .map(|&(auth_type, until_ms)| crate::records::LockEntry { auth_type, until_ms })
            .collect(),
        unlock: unlock.to_vec(),
    }))
}

/// A revocation (the command's target is the VID).
pub fn revoke_vid_op() -> IdentityOp {
    op(identity_op::Op::RevokeVid(crate::commands::RevokeVidOp {}))
}

/// An authentication attempt by `partner_id` (allowed `allowed` auth types) on a validated
/// request, with its factors prepared (demographic digests) and its request digest.
pub fn auth_op(
    keyring: &Keyring,
    req: &AuthenticateRequest,
    request_time_ms: u64,
    partner_id: &str,
    allowed: &[i32],
    policy: AuthPolicy,
) -> IdentityOp {
    let factors = req.factors.clone().unwrap_or_default();
    // The request digest covers what the partner sent besides the key (partner, transaction and
    // UIN are the replay key): its time, the factors, and the identifier it used (another VID of
    // the same person under the same transaction id is a replay, not a retry).
    let mut natural = req.id.as_bytes().to_vec();
    natural.push(0);
    natural.extend_from_slice(&request_time_ms.to_be_bytes());
    factors.encode(&mut natural).unwrap_or_default();
    let request_mac = keyring.index_hash(keys::TXN_REQUEST_DOMAIN, &natural).to_vec();
    op(identity_op::Op::Authenticate(AuthAttempt {
        partner_id: partner_id.to_owned(),
        allowed: allowed.to_vec(),
        transaction_id: req.transaction_id.clone(),
        request_time_ms,
        demographic: factors.demographic.as_ref().map(|d| demographics::claim(keyring, d)),
        pin: (!factors.pin.is_empty()).then_some(factors.pin),
        totp: (!factors.totp.is_empty()).then_some(factors.totp),
        policy: Some(policy),
        request_mac,
    }))
}

fn op(op: identity_op::Op) -> IdentityOp {
    IdentityOp { op: Some(op) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn request(rid: &str) -> EnrollRequest {
        EnrollRequest {
            rid: rid.into(),
            demographics: Some(Demographics {
                full_name: "Test Person".into(),
                date_of_birth: "1990-02-28".into(),
                ..Default::default()
            }),
            pin: "4321".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_enrolment_digest_ignores_the_order_of_extensions() {
        let k = Keyring::dev();
        let mut digests = std::collections::HashSet::new();
        for round in 0..20 {
            let mut extensions = HashMap::new();
            let mut names: Vec<String> = (0..8).map(|i| format!("attr_{i}")).collect();
            names.rotate_left(round % 8);
            for n in names {
                extensions.insert(n.clone(), n.repeat(2));
            }
            let mut r = request("RID-EXT");
            r.demographics.as_mut().unwrap().extensions = extensions;
            digests.insert(enrollment_mac(&k, &r));
        }
        assert_eq!(digests.len(), 1, "one payload, one digest");
        let mut other = request("RID-EXT");
        other.pin = "4322".into();
        assert!(!digests.contains(&enrollment_mac(&k, &other)));
    }

    #[test]
    fn a_prepared_enrolment_carries_no_plaintext_and_lives_in_the_rid_bucket() {
        let keyring = Keyring::dev();
        let sealer = Sealer { keyring: &keyring, generation: 0 };
        let scheme = IdScheme::dev();
        let mut rng = Stream::new().unwrap();
        let p = enroll(
            &request("RID-SECRET-42"),
            &[],
            "enroller-x",
            &sealer,
            &scheme,
            1_700_000_000_000,
            &mut rng,
        )
        .unwrap();
        let bytes = nid_proto::codec::encode(&crate::commands::Command::new(
            crate::commands::command::Kind::Enroll(p.command.clone()),
        ));
        for needle in [&b"RID-SECRET-42"[..], b"Test Person", b"4321", b"1990-02-28", p.uin.as_bytes()] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "plaintext in the log entry");
        }
        assert_eq!(p.command.bucket, u32::from(bucket_of_rid("RID-SECRET-42").get()));
        assert_eq!(
            scheme.parse(&p.uin).unwrap().bucket(),
            bucket_of_rid("RID-SECRET-42"),
            "UIN in the RID's bucket"
        );
        let rid_key = keys::hashed(
            bucket_of_rid("RID-SECRET-42"),
            Table::Rid,
            &p.command.rid_hash.clone().try_into().unwrap(),
        );
        let rid: RidRecord =
            nid_proto::codec::decode(&keyring.open(&rid_key, &p.command.rid_record).unwrap()).unwrap();
        assert_eq!(rid.uin, p.uin);
    }
}
