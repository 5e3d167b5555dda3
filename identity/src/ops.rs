//! Applying a change to, or an authentication of, one identity.
//!
//! The operation arrives sealed (it carries factors and personal data); apply opens it, answers a
//! retried request id from its record, resolves the target, loads only the parts the operation
//! needs, runs the domain rule and writes what changed in this one command: an authentication
//! writes the hot state, its audit record and its replay marker, never the profile or the cold
//! record; a version change writes the profile, its history entry and (for an update) the cold
//! record. Every value is sealed with the cell's active generation as of this log index.

use crate::keys_state::CellKeys;
use crate::lookup::{self, Found};
use crate::store::{ReadError, Writer, nonce, open, read};
use nid_domain::authenticate::{self, factors_allowed};
use nid_domain::commands::{AuthAttempt, IdentityCommand, IdentityOp, TargetKind, identity_op, op_aad};
use nid_domain::keyring::{Keyring, SealError, ct_eq};
use nid_domain::keys::{self, TXN_DOMAIN, Table, VID_DOMAIN};
use nid_domain::lifecycle;
use nid_domain::outcome::{
    AuthOutcome, LocksInForce, NewVersion, Outcome, Rejection, StoredOutcome, VidRevoked,
};
use nid_domain::prepare::cold_aad;
use nid_domain::records::{AuthProfile, AuthState, RequestRecord, TxnRecord, VidIndex};
use nid_engine::{ApplyContext, StorageError};
use nid_proto::bucket::BucketId;
use nid_proto::codec;
use nid_proto::v1::AuthReason;

/// Applies `c`.
pub fn apply(
    keys: &CellKeys,
    c: IdentityCommand,
    ctx: &mut ApplyContext<'_>,
) -> Result<Result<Outcome, Rejection>, StorageError> {
    keys.check_fingerprint(&c.index_fingerprint)?;
    let keyring = keys.keyring();
    let kind = TargetKind::try_from(c.target_kind).unwrap_or(TargetKind::Unspecified);
    let (Some(bucket), Ok(target)) = (BucketId::new(c.bucket), <[u8; 32]>::try_from(c.target.as_slice()))
    else {
        return Ok(Err(Rejection::Malformed("identity command target".into())));
    };
    let op: IdentityOp = match keyring.open(&op_aad(c.bucket, c.target_kind, &target), &c.sealed_op) {
        Ok(plain) => match codec::decode(&plain) {
            Ok(op) => op,
            Err(e) => return Ok(Err(Rejection::Malformed(e.to_string()))),
        },
        Err(SealError::UnknownKey(id)) => return Err(ReadError::MissingKey(id).into()),
        Err(e) => return Ok(Err(Rejection::Malformed(e.to_string()))),
    };
    let Some(op) = op.op else { return Ok(Err(Rejection::Malformed("empty operation".into()))) };
    let writer = Writer { keyring: &keyring, generation: keys.active_generation(), seed: &c.seed };

    // A retried request id gets what the first attempt got; another request under it is refused.
    let request = match &c.request {
        Some(r) => {
            let Ok(hash) = <[u8; 32]>::try_from(r.hash.as_slice()) else {
                return Ok(Err(Rejection::Malformed("request key".into())));
            };
            let key = keys::hashed(bucket, Table::Request, &hash);
            if let Some(earlier) = read::<RequestRecord>(&*ctx, &keyring, &key, &key, "request record")? {
                if !ct_eq(&earlier.request_mac, &r.content_mac) {
                    return Ok(Err(Rejection::RequestIdReused));
                }
                let stored: StoredOutcome =
                    codec::decode(&earlier.outcome).map_err(|_| ReadError::Corrupt("request outcome"))?;
                return Ok(stored.into_result());
            }
            Some((key, hash, r.content_mac.clone()))
        }
        None => None,
    };

    let found = lookup::resolve(&*ctx, &keyring, bucket, kind, &target)?;
    let result = match found {
        None => Ok(match op {
            identity_op::Op::Authenticate(a) => Err(unknown_identity(&a, c.now_ms)),
            _ => Err(Unknown::Rejected(Rejection::NotFound)),
        }),
        Some(found) => {
            apply_to(&keyring, &writer, bucket, found, op, Stamp { now: c.now_ms, actor: &c.actor }, ctx)
        }
    }?;
    let result = match result {
        Ok(r) => Ok(r),
        // An unknown identity's authentication is a decision, not a refusal.
        Err(Unknown::Decision(outcome)) => Ok(Outcome::Auth(outcome)),
        Err(Unknown::Rejected(r)) => Err(r),
    };
    if let Some((key, hash, content_mac)) = request
        && let Some(stored) = StoredOutcome::from_result(&result)
    {
        let record =
            RequestRecord { request_mac: content_mac, outcome: codec::encode(&stored), time_ms: c.now_ms };
        writer.put(ctx, &key, &key, nonce::REQUEST, &record)?;
        ctx.put(&keys::timed(bucket, Table::RequestByTime, c.now_ms, &hash), Vec::new())?;
    }
    Ok(result)
}

/// The answer for an identity that does not exist.
enum Unknown {
    Decision(AuthOutcome),
    Rejected(Rejection),
}

impl From<Rejection> for Unknown {
    fn from(r: Rejection) -> Unknown {
        Unknown::Rejected(r)
    }
}

fn unknown_identity(a: &AuthAttempt, now_ms: u64) -> Unknown {
    let reason = if factors_allowed(a) { AuthReason::UnknownId } else { AuthReason::FactorNotAllowed };
    Unknown::Decision(AuthOutcome {
        authenticated: false,
        reasons: vec![reason as i32],
        uin: None,
        time_ms: now_ms,
        repeated: false,
    })
}

type OpResult = Result<Result<Outcome, Unknown>, StorageError>;

#[allow(clippy::too_many_arguments)]
fn write_version(
    keyring: &Keyring,
    writer: &Writer<'_>,
    bucket: BucketId,
    uin_hash: &[u8; 32],
    profile: &mut AuthProfile,
    before: u64,
    actor: &str,
    ctx: &mut ApplyContext<'_>,
) -> Result<(), StorageError> {
    if profile.version != before {
        actor.clone_into(&mut profile.updated_by);
    }
    let key = lookup::profile_key(bucket, uin_hash);
    writer.put(ctx, &key, &key, nonce::PROFILE, profile)?;
    if profile.version != before {
        let cold = lookup::cold(&*ctx, keyring, bucket, uin_hash, profile.cold_version)?;
        let hkey = keys::sequenced(bucket, Table::History, uin_hash, profile.version);
        writer.put(ctx, &hkey, &hkey, nonce::HISTORY, &lifecycle::history_entry(profile, &cold))?;
    }
    Ok(())
}

/// When a command was proposed (the leader's clock) and who asked for it.
struct Stamp<'a> {
    now: u64,
    actor: &'a str,
}

fn apply_to(
    keyring: &Keyring,
    writer: &Writer<'_>,
    bucket: BucketId,
    found: Found,
    op: identity_op::Op,
    stamp: Stamp<'_>,
    ctx: &mut ApplyContext<'_>,
) -> OpResult {
    let Stamp { now, actor } = stamp;
    let uin_hash = found.uin_hash;
    let Some(mut profile) = lookup::profile_of(&*ctx, keyring, bucket, &found)? else {
        return Ok(Err(Rejection::NotFound.into()));
    };
    let before = profile.version;
    let via_vid = match &found.via_vid {
        Some(h) => match lookup::vid_entry(keyring, &profile, h) {
            Some(v) => Some(v.clone()),
            None => return Ok(Err(Rejection::NotFound.into())),
        },
        None => None,
    };
    let outcome = match op {
        identity_op::Op::Update(u) => {
            let mut cold = lookup::cold(&*ctx, keyring, bucket, &uin_hash, profile.cold_version)?;
            match lifecycle::update(&mut profile, &mut cold, u, now) {
                Ok(version) => {
                    let key = lookup::cold_key(bucket, &uin_hash);
                    writer.put(ctx, &key, &cold_aad(&key, profile.cold_version), nonce::COLD, &cold)?;
                    write_version(keyring, writer, bucket, &uin_hash, &mut profile, before, actor, ctx)?;
                    Outcome::Version(NewVersion(version))
                }
                Err(r) => return Ok(Err(r.into())),
            }
        }
        identity_op::Op::SetStatus(s) => {
            match lifecycle::set_status(&mut profile, s.status, &s.reason, now) {
                Ok(version) => {
                    if version != before {
                        write_version(keyring, writer, bucket, &uin_hash, &mut profile, before, actor, ctx)?;
                    }
                    Outcome::Version(NewVersion(version))
                }
                Err(r) => return Ok(Err(r.into())),
            }
        }
        identity_op::Op::CreateVid(v) => {
            let Ok(candidate_hash) = <[u8; 32]>::try_from(v.candidate_hash.as_slice()) else {
                return Ok(Err(Rejection::Malformed("vid candidate hash".into()).into()));
            };
            let vkey = keys::hashed(bucket, Table::Vid, &candidate_hash);
            if nid_engine::KvRead::get(&*ctx, &vkey)?.is_some() {
                return Ok(Err(Rejection::CandidatesTaken.into()));
            }
            let state = lookup::state(&*ctx, keyring, bucket, &uin_hash)?;
            let uin = match &found.uin {
                Some(u) => u.clone(),
                None => lookup::cold(&*ctx, keyring, bucket, &uin_hash, profile.cold_version)?.uin,
            };
            match lifecycle::create_vid(
                &mut profile,
                &state,
                v.candidate,
                v.kind,
                v.expires_ms,
                v.max_uses,
                now,
            ) {
                Ok((entry, dropped)) => {
                    writer.put(ctx, &vkey, &vkey, nonce::VID, &VidIndex { uin })?;
                    for old in dropped {
                        let h = keyring.index_hash(VID_DOMAIN, old.vid.as_bytes());
                        ctx.delete(&keys::hashed(bucket, Table::Vid, &h))?;
                    }
                    write_version(keyring, writer, bucket, &uin_hash, &mut profile, before, actor, ctx)?;
                    Outcome::Vid(entry)
                }
                Err(r) => return Ok(Err(r.into())),
            }
        }
        identity_op::Op::RevokeVid(_) => {
            let Some(vid) = via_vid else {
                return Ok(Err(Rejection::Malformed("revoke needs a VID target".into()).into()));
            };
            match lifecycle::revoke_vid(&mut profile, &vid.vid, now) {
                Ok(()) => {
                    if profile.version != before {
                        write_version(keyring, writer, bucket, &uin_hash, &mut profile, before, actor, ctx)?;
                    }
                    Outcome::VidRevoked(VidRevoked)
                }
                Err(r) => return Ok(Err(r.into())),
            }
        }
        identity_op::Op::LockAuthTypes(l) => {
            match lifecycle::lock_auth_types(&mut profile, &l.lock, &l.unlock, now) {
                Ok(locks) => {
                    if profile.version != before {
                        write_version(keyring, writer, bucket, &uin_hash, &mut profile, before, actor, ctx)?;
                    }
                    Outcome::Locks(LocksInForce(locks))
                }
                Err(r) => return Ok(Err(r.into())),
            }
        }
        identity_op::Op::Authenticate(attempt) => {
            authenticate(keyring, writer, bucket, &found, &profile, via_vid.as_ref(), &attempt, now, ctx)?
        }
    };
    Ok(Ok(outcome))
}

/// The replay-index key of (partner, transaction, identity).
fn txn_key(
    keyring: &Keyring,
    bucket: BucketId,
    partner: &str,
    txn: &str,
    uin_hash: &[u8; 32],
) -> ([u8; 35], [u8; 32]) {
    let mut natural = Vec::with_capacity(partner.len() + txn.len() + 40);
    natural.extend_from_slice(&(partner.len() as u32).to_be_bytes());
    natural.extend_from_slice(partner.as_bytes());
    natural.extend_from_slice(&(txn.len() as u32).to_be_bytes());
    natural.extend_from_slice(txn.as_bytes());
    natural.extend_from_slice(uin_hash);
    let hash = keyring.index_hash(TXN_DOMAIN, &natural);
    (keys::hashed(bucket, Table::Txn, &hash), hash)
}

#[allow(clippy::too_many_arguments)]
fn authenticate(
    keyring: &Keyring,
    writer: &Writer<'_>,
    bucket: BucketId,
    found: &Found,
    profile: &AuthProfile,
    via_vid: Option<&nid_domain::records::VidEntry>,
    attempt: &AuthAttempt,
    now: u64,
    ctx: &mut ApplyContext<'_>,
) -> Result<Outcome, StorageError> {
    let uin_hash = found.uin_hash;
    let (tkey, thash) = txn_key(keyring, bucket, &attempt.partner_id, &attempt.transaction_id, &uin_hash);
    let seen = nid_engine::KvRead::get(&*ctx, &tkey)?;
    // A retry of the very same request (by the partner, or by the router after an ambiguous
    // failure) gets the decision already made, without a second audit record; the same
    // transaction id with anything else is a replay. A marker that does not open still refuses.
    if let Some(sealed) = &seen
        && let Ok(earlier) = open::<TxnRecord>(keyring, &tkey, sealed, "replay marker")
        && ct_eq(&earlier.request_mac, &attempt.request_mac)
    {
        return Ok(Outcome::Auth(AuthOutcome {
            authenticated: earlier.authenticated,
            reasons: earlier.reasons,
            uin: found.uin.clone(),
            time_ms: earlier.time_ms,
            repeated: true,
        }));
    }
    let mut state: AuthState = lookup::state(&*ctx, keyring, bucket, &uin_hash)?;
    let decision = authenticate::decide(profile, &mut state, attempt, via_vid, seen.is_some(), now, keyring);
    if decision.record_transaction {
        let record = TxnRecord {
            request_mac: attempt.request_mac.clone(),
            authenticated: decision.authenticated,
            reasons: decision.reasons.clone(),
            time_ms: now,
        };
        writer.put(ctx, &tkey, &tkey, nonce::TXN, &record)?;
        // The same marker in time order, for the sweep.
        ctx.put(&keys::timed(bucket, Table::TxnByTime, now, &thash), Vec::new())?;
    }
    let audit = authenticate::append_audit(&mut state, attempt, &decision, now);
    let akey = keys::sequenced(bucket, Table::Audit, &uin_hash, audit.seq);
    writer.put(ctx, &akey, &akey, nonce::AUDIT, &audit)?;
    let skey = lookup::state_key(bucket, &uin_hash);
    writer.put(ctx, &skey, &skey, nonce::STATE, &state)?;
    Ok(Outcome::Auth(AuthOutcome {
        authenticated: decision.authenticated,
        reasons: decision.reasons,
        uin: found.uin.clone(),
        time_ms: now,
        repeated: false,
    }))
}
