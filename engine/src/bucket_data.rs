//! A bucket's data as a whole: its keys form one contiguous range of the `data` column family
//! (they start with the bucket number), so it can be counted, checksummed and exported from one
//! view, and its changes since a log index read from the change markers of a tracked bucket.
//! Ingest and deletion are engine commands (`peer.rs`).

use crate::db::cf;
use crate::error::StorageError;
use crate::keys;
use crate::state_machine::{KvRead, View};
use nid_proto::bucket::BucketId;

/// The number of keys of `bucket` and a SHA-256 over its raw range (each key and value with its
/// length), identical on every replica that applied the same log.
pub fn digest(view: &dyn KvRead, bucket: BucketId) -> Result<(u64, [u8; 32]), StorageError> {
    let (start, end) = keys::bucket_range(bucket);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0u64;
    view.scan(&start, &end, false, &mut |k, v| {
        ctx.update(&(k.len() as u32).to_be_bytes());
        ctx.update(k);
        ctx.update(&(v.len() as u32).to_be_bytes());
        ctx.update(v);
        n += 1;
        true
    })?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((n, out))
}

/// One key of a bucket as exported: its value, or None for a deletion.
pub type Pair = (Vec<u8>, Option<Vec<u8>>);

/// Every key and value of `bucket` as of `view`.
pub fn export(view: &View<'_>, bucket: BucketId) -> Result<Vec<Pair>, StorageError> {
    let (start, end) = keys::bucket_range(bucket);
    let mut out = Vec::new();
    view.scan(&start, &end, false, &mut |k, v| {
        out.push((k.to_vec(), Some(v.to_vec())));
        true
    })?;
    Ok(out)
}

/// Every key of a tracked `bucket` changed after log index `after`, with its value as of `view`
/// (None: deleted since).
pub fn changes_since(view: &View<'_>, bucket: BucketId, after: u64) -> Result<Vec<Pair>, StorageError> {
    let (start, end) = keys::change_range(bucket);
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_lower_bound(start.to_vec());
    ro.set_iterate_upper_bound(end.to_vec());
    ro.set_snapshot(&view.snapshot);
    let mut it = view.db.raw_iterator_cf_opt(cf(view.db, keys::CF_META)?, ro);
    it.seek_to_first();
    let mut changed = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let index = <[u8; 8]>::try_from(v).map(u64::from_be_bytes).unwrap_or(u64::MAX);
        if index > after {
            changed.push(k[1..].to_vec());
        }
        it.next();
    }
    it.status()?;
    let mut out = Vec::with_capacity(changed.len());
    for key in changed {
        let value = view.get(&key)?;
        out.push((key, value));
    }
    Ok(out)
}
