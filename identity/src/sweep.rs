//! Forgetting what is past its window: replay markers (kept twice the allowed skew plus a margin,
//! after which a request bearing the transaction is refused as expired anyway) and request-id
//! records (kept 24 hours). The leader proposes a sweep per span of buckets; being a Raft command,
//! every replica forgets the same entries at the same log index, whatever its batching (reads in
//! apply see the batch's earlier deletions). Only owned buckets are swept: an importing or frozen
//! bucket does not change under a migration.

use crate::keys_state::CellKeys;
use crate::store::open;
use nid_domain::commands::SweepCommand;
use nid_domain::keys::{self, Table};
use nid_domain::outcome::{Outcome, Rejection, Swept};
use nid_domain::records::{RequestRecord, TxnRecord};
use nid_engine::{ApplyContext, BucketState, KvRead as _, StorageError};
use nid_proto::bucket::{BUCKETS, BucketId};

/// Applies `c`.
pub fn apply(
    keys: &CellKeys,
    c: &SweepCommand,
    ctx: &mut ApplyContext<'_>,
) -> Result<Result<Outcome, Rejection>, StorageError> {
    if c.first >= c.end || c.end > u32::from(BUCKETS) || c.limit == 0 {
        return Ok(Err(Rejection::Malformed("sweep range or limit".into())));
    }
    let keyring = keys.keyring();
    let limit = u64::from(c.limit);
    let mut deleted = 0u64;
    for b in c.first..c.end {
        let Some(bucket) = BucketId::new(b) else { continue };
        if ctx.bucket(bucket).state() != BucketState::Owned {
            continue;
        }
        for (index, entry, before) in [
            (Table::TxnByTime, Table::Txn, c.txn_before_ms),
            (Table::RequestByTime, Table::Request, c.request_before_ms),
        ] {
            let (start, end) = keys::timed_range(bucket, index, before);
            let mut found = Vec::new();
            ctx.scan(&start, &end, false, &mut |k, _| {
                found.push(k.to_vec());
                (found.len() as u64) <= limit - deleted
            })?;
            for tkey in found {
                if deleted >= limit {
                    return Ok(Ok(Outcome::Swept(Swept { deleted, resume: Some(b) })));
                }
                if let Some(hash) = keys::timed_hash(&tkey) {
                    let key = keys::hashed(bucket, entry, &hash);
                    // An entry rewritten since its index entry (a later decision under the same key)
                    // stays; only the stale index entry goes.
                    let rewritten = match ctx.get(&key)? {
                        None => false,
                        Some(v) => match entry {
                            Table::Txn => open::<TxnRecord>(&keyring, &key, &v, "replay marker")
                                .is_ok_and(|r| r.time_ms >= before),
                            _ => open::<RequestRecord>(&keyring, &key, &v, "request record")
                                .is_ok_and(|r| r.time_ms >= before),
                        },
                    };
                    if !rewritten {
                        ctx.delete(&key)?;
                    }
                }
                ctx.delete(&tkey)?;
                deleted += 1;
            }
        }
    }
    Ok(Ok(Outcome::Swept(Swept { deleted, resume: None })))
}
