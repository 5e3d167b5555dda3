//! A bucket's data as a whole: its keys form one contiguous range of the `data` column family
//! (they start with the bucket number), so it can be counted and checksummed from one view. Bucket
//! export, ingest and deletion for migrations build on the same range.

use crate::error::StorageError;
use crate::keys;
use crate::state_machine::KvRead;
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
