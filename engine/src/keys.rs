//! The engine's part of a replica's RocksDB: column families and the keys of the `raft` and `meta`
//! families. The `data` family belongs to the state machine, except that keys below
//! [`BUCKET_KEYS_END`] start with a bucket number (u16 BE), which the ownership fence, bucket
//! export and deletion rely on.
//!
//! - `raft`: `0x01 | index (u64 BE)` -> entry; `0x02` -> [`crate::state::RaftLocalState`].
//! - `meta`: `0x03` -> [`crate::state::ApplyState`]; `0x04` -> the snapshot-install marker;
//!   `0x05` -> the address book; `0x10 | bucket (u16 BE)` -> [`crate::buckets::BucketRecord`];
//!   `0x11 | data key` -> the log index that last changed that key of a bucket whose changes are
//!   tracked for a migration's catch-up (the data key starts with its bucket, so one bucket's
//!   markers form one range).

use nid_proto::bucket::BucketId;

/// Column family of the Raft log and hard state.
pub const CF_RAFT: &str = "raft";
/// Column family of apply state, bucket ownership and the address book.
pub const CF_META: &str = "meta";
/// Column family of the state machine's data.
pub const CF_DATA: &str = "data";

/// Data keys below this start with a bucket number (buckets < 2^14 = 0x4000).
pub const BUCKET_KEYS_END: [u8; 2] = [0x40, 0x00];

const ENTRY_PREFIX: u8 = 0x01;
/// Key of the Raft local state in the `raft` CF.
pub const RAFT_LOCAL_STATE: &[u8] = &[0x02];
/// Key of the apply state in the `meta` CF.
pub const APPLY_STATE: &[u8] = &[0x03];
/// Key of the "snapshot install in progress" marker in the `meta` CF.
pub const SNAPSHOT_APPLYING: &[u8] = &[0x04];
/// Key of the address book in the `meta` CF.
pub const ADDRESS_BOOK: &[u8] = &[0x05];
/// Key of the "this replica's log lost entries" marker in the `meta` CF (why, as text).
pub const LOG_LOST: &[u8] = &[0x06];
const BUCKET_STATE_PREFIX: u8 = 0x10;
const CHANGE_PREFIX: u8 = 0x11;

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

/// Key of one bucket's ownership record in the `meta` CF.
pub fn bucket_state_key(bucket: BucketId) -> [u8; 3] {
    let b = bucket.key_prefix();
    [BUCKET_STATE_PREFIX, b[0], b[1]]
}

/// The bucket a bucket-state key names.
pub fn bucket_of_state_key(key: &[u8]) -> Option<BucketId> {
    match key {
        [BUCKET_STATE_PREFIX, hi, lo] => BucketId::new(u32::from(u16::from_be_bytes([*hi, *lo]))),
        _ => None,
    }
}

/// The range `[start, end)` of all bucket-state keys in the `meta` CF.
pub fn bucket_state_range() -> ([u8; 1], [u8; 1]) {
    ([BUCKET_STATE_PREFIX], [BUCKET_STATE_PREFIX + 1])
}

/// The range of the `meta` CF a Raft snapshot carries besides the data: bucket-state records and
/// change markers.
pub fn ownership_range() -> ([u8; 1], [u8; 1]) {
    ([BUCKET_STATE_PREFIX], [CHANGE_PREFIX + 1])
}

/// Key of the change marker of data key `key` (which starts with its bucket).
pub fn change_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(CHANGE_PREFIX);
    out.extend_from_slice(key);
    out
}

/// The `[start, end)` range of one bucket's change markers.
pub fn change_range(bucket: BucketId) -> ([u8; 3], [u8; 3]) {
    let (s, e) = bucket_range(bucket);
    ([CHANGE_PREFIX, s[0], s[1]], [CHANGE_PREFIX, e[0], e[1]])
}

/// The bucket a data key belongs to (None for keys above every bucket prefix).
pub fn bucket_of_data_key(key: &[u8]) -> Option<BucketId> {
    match key {
        [hi, lo, ..] if [*hi, *lo] < BUCKET_KEYS_END => {
            BucketId::new(u32::from(u16::from_be_bytes([*hi, *lo])))
        }
        _ => None,
    }
}

/// The `[start, end)` range of one bucket's data keys.
pub fn bucket_range(bucket: BucketId) -> ([u8; 2], [u8; 2]) {
    let b = bucket.get();
    // b < BUCKETS = 2^14, so b + 1 still fits the 2-byte prefix.
    (b.to_be_bytes(), (b + 1).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bucket_state_keys_round_trip_and_bucket_ranges_tile_the_bucket_space() {
        for b in [0u32, 1, 255, 256, 16383] {
            let bucket = BucketId::new(b).unwrap();
            assert_eq!(bucket_of_state_key(&bucket_state_key(bucket)), Some(bucket));
            let (start, end) = bucket_range(bucket);
            assert!(end.as_slice() <= BUCKET_KEYS_END.as_slice());
            if b < 16383 {
                assert_eq!(end, bucket_range(BucketId::new(b + 1).unwrap()).0);
            }
            assert!(start < end);
        }
    }
}
