//! The replica's RocksDB keyspace (DESIGN.md §3, §4).
//!
//! - `raft` CF: `0x01 | index (u64 BE)` -> entry; `0x02` -> [`crate::storage::RaftLocalState`].
//! - `meta` CF: `0x03` -> [`crate::storage::ApplyState`]; `0x10 | bucket (u16 BE)` -> bucket state.
//! - `data` CF: `bucket (u16 BE) | table (u8) | keyed hash of the natural key` (a time-ordered table
//!   puts a big-endian Unix ms before the hash), so a bucket is one contiguous range that can be
//!   exported, checksummed and deleted by range. No key contains a plaintext identifier.

use nid_proto::bucket::BucketId;

/// Column family of the Raft log and hard state.
pub const CF_RAFT: &str = "raft";
/// Column family of apply state and bucket ownership.
pub const CF_META: &str = "meta";
/// Column family of the state machine's data.
pub const CF_DATA: &str = "data";

const ENTRY_PREFIX: u8 = 0x01;
/// Key of the Raft local state (hard state and last index) in the `raft` CF.
pub const RAFT_LOCAL_STATE: &[u8] = &[0x02];
/// Key of the apply state in the `meta` CF.
pub const APPLY_STATE: &[u8] = &[0x03];
/// Key of the "snapshot install in progress" marker in the `meta` CF.
pub const SNAPSHOT_APPLYING: &[u8] = &[0x04];
const BUCKET_STATE_PREFIX: u8 = 0x10;

/// Key of log entry `index` in the `raft` CF.
pub fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = ENTRY_PREFIX;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The index an entry key names, if `key` is one.
pub fn entry_index(key: &[u8]) -> Option<u64> {
    match key {
        [ENTRY_PREFIX, rest @ ..] if rest.len() == 8 => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// Key of one bucket's ownership state in the `meta` CF.
pub fn bucket_state_key(bucket: BucketId) -> [u8; 3] {
    let b = bucket.get().to_be_bytes();
    [BUCKET_STATE_PREFIX, b[0], b[1]]
}

/// The range `[start, end)` of all bucket-state keys in the `meta` CF.
pub fn bucket_state_range() -> ([u8; 1], [u8; 1]) {
    ([BUCKET_STATE_PREFIX], [BUCKET_STATE_PREFIX + 1])
}

/// Control-cell keys in the `data` CF. They start with 0xFFFF, above every bucket prefix (< 0x4000),
/// so they never meet a bucket range.
pub const CONTROL_CONFIG: &[u8] = &[0xff, 0xff, 0x01];
/// The routing table (with the cell registry) on the control cell.
pub const CONTROL_TABLE: &[u8] = &[0xff, 0xff, 0x02];

/// Tables inside a bucket's key range of the `data` CF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// RID -> UIN (the enrolment idempotency index).
    Rid = 1,
    /// UIN -> identity record.
    Identity = 2,
    /// UIN, version -> that version of the identity (history).
    History = 3,
    /// VID -> UIN.
    Vid = 4,
    /// UIN, sequence -> audit record (the hash chain).
    Audit = 5,
    /// (partner, transaction, identity) -> the sealed decision: the replay index.
    Txn = 6,
    /// Decision time, then the replay-index hash -> nothing: the replay index in time order, so
    /// markers past the replay window can be found and swept.
    TxnByTime = 7,
}

/// A `data` CF key: bucket, table, then a keyed hash of the natural key (never the key itself).
pub fn data_key(bucket: BucketId, table: Table, hashed: &[u8; 32]) -> [u8; 35] {
    let mut key = [0u8; 35];
    key[..2].copy_from_slice(&bucket.get().to_be_bytes());
    key[2] = table as u8;
    key[3..].copy_from_slice(hashed);
    key
}

/// A `data` CF key with a big-endian sequence after the hash (history versions, audit records), so
/// one identity's entries sort in order and form one range.
pub fn sequence_key(bucket: BucketId, table: Table, hashed: &[u8; 32], seq: u64) -> [u8; 43] {
    let mut key = [0u8; 43];
    key[..35].copy_from_slice(&data_key(bucket, table, hashed));
    key[35..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// A `data` CF key ordered by time: bucket, table, big-endian Unix ms, then a keyed hash.
pub fn time_key(bucket: BucketId, table: Table, time_ms: u64, hashed: &[u8; 32]) -> [u8; 43] {
    let mut key = [0u8; 43];
    key[..2].copy_from_slice(&bucket.get().to_be_bytes());
    key[2] = table as u8;
    key[3..11].copy_from_slice(&time_ms.to_be_bytes());
    key[11..].copy_from_slice(hashed);
    key
}

/// The `[start, end)` range of the time-ordered keys of `table` in `bucket` older than `before_ms`.
pub fn time_range(bucket: BucketId, table: Table, before_ms: u64) -> ([u8; 3], [u8; 11]) {
    let b = bucket.get().to_be_bytes();
    let mut end = [0u8; 11];
    end[..2].copy_from_slice(&b);
    end[2] = table as u8;
    end[3..].copy_from_slice(&before_ms.to_be_bytes());
    ([b[0], b[1], table as u8], end)
}

/// The hash a [`time_key`] carries, if `key` is one.
pub fn time_key_hash(key: &[u8]) -> Option<[u8; 32]> {
    if key.len() != 43 {
        return None;
    }
    key[11..].try_into().ok()
}

/// The control-cell key of the partner list.
pub const CONTROL_PARTNERS: &[u8] = &[0xff, 0xff, 0x03];

/// The `[start, end)` range of one bucket in the `data` CF.
pub fn bucket_range(bucket: BucketId) -> (Vec<u8>, Vec<u8>) {
    let b = bucket.get();
    let start = b.to_be_bytes().to_vec();
    // b < BUCKETS = 2^14, so b + 1 still fits the 2-byte prefix.
    let end = (b + 1).to_be_bytes().to_vec();
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_sort_by_time_and_a_time_range_holds_exactly_the_older_ones() {
        let b = BucketId::new(300).unwrap();
        let (start, end) = time_range(b, Table::TxnByTime, 1_000);
        for (t, h, inside) in [
            (0u64, [0xffu8; 32], true),
            (999, [0xff; 32], true),
            (1_000, [0; 32], false),
            (u64::MAX, [0; 32], false),
        ] {
            let k = time_key(b, Table::TxnByTime, t, &h);
            assert_eq!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice(), inside, "time {t}");
            assert_eq!(time_key_hash(&k), Some(h));
        }
        // Neither the Txn table of the same bucket nor the next bucket falls inside.
        for k in [
            data_key(b, Table::Txn, &[0xff; 32]).to_vec(),
            time_key(BucketId::new(301).unwrap(), Table::TxnByTime, 0, &[0; 32]).to_vec(),
        ] {
            assert!(!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice()));
        }
        assert_eq!(time_key_hash(&data_key(b, Table::Txn, &[1; 32])), None);
    }

    #[test]
    fn entry_keys_sort_by_index_and_round_trip() {
        let mut keys: Vec<_> = [5u64, 1, 256, u64::MAX, 0].iter().map(|&i| entry_key(i)).collect();
        keys.sort();
        let order: Vec<_> = keys.iter().map(|k| entry_index(k).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 5, 256, u64::MAX]);
        assert_eq!(entry_index(RAFT_LOCAL_STATE), None);
        assert_eq!(entry_index(&[1, 2]), None);
    }

    #[test]
    fn sequence_keys_of_one_identity_sort_by_sequence() {
        let b = BucketId::new(9).unwrap();
        let h = [7u8; 32];
        let keys: Vec<_> =
            [1u64, 2, 255, 256, 70000].iter().map(|&s| sequence_key(b, Table::Audit, &h, s)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(keys.iter().all(|k| k.starts_with(&data_key(b, Table::Audit, &h))));
    }

    #[test]
    fn a_bucket_is_one_contiguous_range() {
        for b in [0u16, 1, 255, 256, 16383] {
            let bucket = BucketId::new(u32::from(b)).unwrap();
            let (start, end) = bucket_range(bucket);
            for table in [
                Table::Rid,
                Table::Identity,
                Table::History,
                Table::Vid,
                Table::Audit,
                Table::Txn,
                Table::TxnByTime,
            ] {
                for h in [[0u8; 32], [0xff; 32]] {
                    let k = data_key(bucket, table, &h);
                    assert!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice());
                    let k = sequence_key(bucket, table, &h, u64::MAX);
                    assert!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice());
                    let k = time_key(bucket, table, u64::MAX, &h);
                    assert!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice());
                }
            }
            if b < 16383 {
                let next = BucketId::new(u32::from(b) + 1).unwrap();
                assert!(data_key(next, Table::Rid, &[0; 32]).as_slice() >= end.as_slice());
            }
        }
    }
}
