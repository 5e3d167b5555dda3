//! The identity keyspace inside a bucket (DESIGN.md §3): `bucket (u16 BE) | table (u8) | keyed hash
//! of the natural key`, with a big-endian sequence or time after the hash where a table is ordered.
//! A bucket is one contiguous key range, so it can be exported, checksummed and deleted by range.
//! No key contains a plaintext identifier. Cell-scoped identity state (the key generations) sits
//! at [`CELL_KEYS`], above every bucket prefix (< 0x4000).

use nid_proto::bucket::BucketId;

/// Hash domain of RIDs.
pub const RID_DOMAIN: &[u8] = b"rid";
/// Hash domain of UINs.
pub const UIN_DOMAIN: &[u8] = b"uin";
/// Hash domain of VIDs.
pub const VID_DOMAIN: &[u8] = b"vid";
/// Hash domain of (partner, transaction, UIN) replay keys.
pub const TXN_DOMAIN: &[u8] = b"txn";
/// Hash domain of the digest of an authentication request.
pub const TXN_REQUEST_DOMAIN: &[u8] = b"txn-request";
/// Hash domain of (caller, request id) keys.
pub const REQUEST_DOMAIN: &[u8] = b"request";
/// Hash domain of the digest of a mutating request.
pub const REQUEST_CONTENT_DOMAIN: &[u8] = b"request-content";
/// Hash domain of the enrolment idempotency digest.
pub const ENROLL_PAYLOAD_DOMAIN: &[u8] = b"enroll-payload";

/// The key of the cell's key state ([`crate::records::KeyState`]).
pub const CELL_KEYS: &[u8] = &[0xff, 0xfe, 0x01];

/// Tables inside a bucket's key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// RID -> [`crate::records::RidRecord`] (the enrolment idempotency index).
    Rid = 1,
    /// UIN -> [`crate::records::IdentityRecord`] (cold).
    Identity = 2,
    /// UIN, version -> [`crate::records::HistoryEntry`].
    History = 3,
    /// VID -> [`crate::records::VidIndex`].
    Vid = 4,
    /// UIN, sequence -> [`crate::records::AuditRecord`] (the hash chain).
    Audit = 5,
    /// (partner, transaction, UIN) -> [`crate::records::TxnRecord`]: the replay index.
    Txn = 6,
    /// Decision time, then the replay-index hash -> nothing: the replay index in time order, for
    /// the sweep.
    TxnByTime = 7,
    /// UIN -> [`crate::records::AuthProfile`].
    Profile = 8,
    /// UIN -> [`crate::records::AuthState`] (hot).
    State = 9,
    /// (caller, request id) -> [`crate::records::RequestRecord`].
    Request = 10,
    /// Apply time, then the request hash -> nothing: the request index in time order, for the
    /// sweep.
    RequestByTime = 11,
}

/// Every table, for tests and tools.
pub const TABLES: [Table; 11] = [
    Table::Rid,
    Table::Identity,
    Table::History,
    Table::Vid,
    Table::Audit,
    Table::Txn,
    Table::TxnByTime,
    Table::Profile,
    Table::State,
    Table::Request,
    Table::RequestByTime,
];

/// A key: bucket, table, then a keyed hash of the natural key (never the key itself).
pub fn hashed(bucket: BucketId, table: Table, hash: &[u8; 32]) -> [u8; 35] {
    let mut key = [0u8; 35];
    key[..2].copy_from_slice(&bucket.key_prefix());
    key[2] = table as u8;
    key[3..].copy_from_slice(hash);
    key
}

/// A key with a big-endian sequence after the hash (history versions, audit records), so one
/// identity's entries sort in order and form one range.
pub fn sequenced(bucket: BucketId, table: Table, hash: &[u8; 32], seq: u64) -> [u8; 43] {
    let mut key = [0u8; 43];
    key[..35].copy_from_slice(&hashed(bucket, table, hash));
    key[35..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// A key ordered by time: bucket, table, big-endian Unix ms, then a keyed hash.
pub fn timed(bucket: BucketId, table: Table, time_ms: u64, hash: &[u8; 32]) -> [u8; 43] {
    let mut key = [0u8; 43];
    key[..2].copy_from_slice(&bucket.key_prefix());
    key[2] = table as u8;
    key[3..11].copy_from_slice(&time_ms.to_be_bytes());
    key[11..].copy_from_slice(hash);
    key
}

/// The `[start, end)` range of the time-ordered keys of `table` in `bucket` older than `before_ms`.
pub fn timed_range(bucket: BucketId, table: Table, before_ms: u64) -> ([u8; 3], [u8; 11]) {
    let b = bucket.key_prefix();
    let mut end = [0u8; 11];
    end[..2].copy_from_slice(&b);
    end[2] = table as u8;
    end[3..].copy_from_slice(&before_ms.to_be_bytes());
    ([b[0], b[1], table as u8], end)
}

/// The hash a [`timed`] key carries, if `key` is one.
pub fn timed_hash(key: &[u8]) -> Option<[u8; 32]> {
    if key.len() != 43 {
        return None;
    }
    key[11..].try_into().ok()
}

/// The `[start, end)` range of one bucket.
pub fn bucket_range(bucket: BucketId) -> ([u8; 2], [u8; 2]) {
    let b = bucket.get();
    // b < BUCKETS = 2^14, so b + 1 still fits the 2-byte prefix.
    (b.to_be_bytes(), (b + 1).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inside(k: &[u8], (start, end): (&[u8], &[u8])) -> bool {
        k >= start && k < end
    }

    #[test]
    fn timed_keys_sort_by_time_and_a_timed_range_holds_exactly_the_older_ones() {
        let b = BucketId::new(300).unwrap();
        let (start, end) = timed_range(b, Table::TxnByTime, 1_000);
        for (t, h, expect) in [
            (0u64, [0xffu8; 32], true),
            (999, [0xff; 32], true),
            (1_000, [0; 32], false),
            (u64::MAX, [0; 32], false),
        ] {
            let k = timed(b, Table::TxnByTime, t, &h);
            assert_eq!(inside(&k, (&start, &end)), expect, "time {t}");
            assert_eq!(timed_hash(&k), Some(h));
        }
        for k in [
            hashed(b, Table::Txn, &[0xff; 32]).to_vec(),
            timed(BucketId::new(301).unwrap(), Table::TxnByTime, 0, &[0; 32]).to_vec(),
            timed(b, Table::RequestByTime, 0, &[0; 32]).to_vec(),
        ] {
            assert!(!inside(&k, (&start, &end)));
        }
        assert_eq!(timed_hash(&hashed(b, Table::Txn, &[1; 32])), None);
    }

    #[test]
    fn sequenced_keys_of_one_identity_sort_by_sequence() {
        let b = BucketId::new(9).unwrap();
        let h = [7u8; 32];
        let keys: Vec<_> =
            [1u64, 2, 255, 256, 70000].iter().map(|&s| sequenced(b, Table::Audit, &h, s)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(keys.iter().all(|k| k.starts_with(&hashed(b, Table::Audit, &h))));
    }

    #[test]
    fn a_bucket_is_one_contiguous_range_and_cell_keys_sit_above_every_bucket() {
        for b in [0u16, 1, 255, 256, 16383] {
            let bucket = BucketId::new(u32::from(b)).unwrap();
            let (start, end) = bucket_range(bucket);
            for table in TABLES {
                for h in [[0u8; 32], [0xff; 32]] {
                    for k in [
                        hashed(bucket, table, &h).to_vec(),
                        sequenced(bucket, table, &h, u64::MAX).to_vec(),
                        timed(bucket, table, u64::MAX, &h).to_vec(),
                    ] {
                        assert!(inside(&k, (&start, &end)));
                    }
                }
            }
            assert!(CELL_KEYS > end.as_slice());
        }
    }
}
