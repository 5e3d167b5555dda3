//! Applying an enrolment. The leader prepared and sealed every value; apply decides only what the
//! log order decides: whether the RID is new (else the existing identity answers, or a different
//! payload conflicts) and whether the UIN candidate is free (else the leader retries with another).
//! One RID never yields two UINs and one UIN never names two people, because both checks and the
//! writes happen in this one command.

use crate::keys_state::CellKeys;
use crate::lookup;
use crate::store::{ReadError, read};
use nid_domain::commands::EnrollCommand;
use nid_domain::keyring::{ct_eq, sealed_generation};
use nid_domain::keys::{self, Table, UIN_DOMAIN};
use nid_domain::outcome::{Enrolled, Outcome, Rejection};
use nid_domain::records::RidRecord;
use nid_engine::{ApplyContext, KvRead as _, StorageError};
use nid_proto::bucket::BucketId;

fn hash32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

/// Applies `c`.
pub fn apply(
    keys: &CellKeys,
    c: EnrollCommand,
    ctx: &mut ApplyContext<'_>,
) -> Result<Result<Outcome, Rejection>, StorageError> {
    keys.check_fingerprint(&c.index_fingerprint)?;
    let keyring = keys.keyring();
    let (Some(bucket), Some(rid_hash), Some(uin_hash)) =
        (BucketId::new(c.bucket), hash32(&c.rid_hash), hash32(&c.uin_hash))
    else {
        return Ok(Err(Rejection::Malformed("enrolment keys".into())));
    };
    let rid_key = keys::hashed(bucket, Table::Rid, &rid_hash);
    if let Some(existing) = read::<RidRecord>(ctx, &keyring, &rid_key, &rid_key, "RID index")? {
        if !ct_eq(&existing.payload_mac, &c.payload_mac) {
            return Ok(Err(Rejection::RidConflict));
        }
        // The call that created it, retried, still hears "created"; any other call, "existed".
        let created = !c.creator.is_empty() && ct_eq(&existing.creator, &c.creator);
        let existing_hash = keyring.index_hash(UIN_DOMAIN, existing.uin.as_bytes());
        let profile = lookup::profile(ctx, &keyring, bucket, &existing_hash)?
            .ok_or(ReadError::Corrupt("auth profile (missing beside its RID)"))?;
        return Ok(Ok(Outcome::Enrolled(Enrolled {
            created,
            uin: existing.uin,
            totp_secret: profile.totp_secret,
        })));
    }
    // Every value must be sealed with a generation this replica holds, or it could not serve them.
    for sealed in [&c.rid_record, &c.identity, &c.profile, &c.state, &c.history] {
        match sealed_generation(sealed) {
            Ok(id) if keyring.holds(id) => {}
            Ok(id) => return Err(ReadError::MissingKey(id).into()),
            Err(_) => return Ok(Err(Rejection::Malformed("a sealed value is truncated".into()))),
        }
    }
    if ctx.get(&lookup::profile_key(bucket, &uin_hash))?.is_some() {
        return Ok(Err(Rejection::CandidatesTaken));
    }
    ctx.put(&rid_key, c.rid_record)?;
    ctx.put(&lookup::cold_key(bucket, &uin_hash), c.identity)?;
    ctx.put(&lookup::profile_key(bucket, &uin_hash), c.profile)?;
    ctx.put(&lookup::state_key(bucket, &uin_hash), c.state)?;
    ctx.put(&keys::sequenced(bucket, Table::History, &uin_hash, 1), c.history)?;
    Ok(Ok(Outcome::Enrolled(Enrolled { created: true, uin: String::new(), totp_secret: Vec::new() })))
}
