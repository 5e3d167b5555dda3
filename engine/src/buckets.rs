//! Bucket ownership, the fence of DESIGN.md §4: every bucket a cell knows is NOT_OWNED, OWNED,
//! IMPORTING (a migration is copying it in) or FROZEN (a migration is about to move it out). The
//! states change only through the log ([`SetBuckets`]), with the routing-table version that decided
//! them, never backwards; apply refuses a write for a bucket that is not OWNED, which is what makes
//! a stale router harmless. The table is kept in memory (loaded at start and after a snapshot) and
//! persisted in the `meta` column family.

use crate::error::{EngineError, StorageError};
use crate::keys;
use nid_proto::bucket::{BUCKETS, BucketId};
use nid_proto::codec;
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Ownership state of one bucket on this cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum BucketState {
    /// Not ours: commands are refused with a wrong-owner hint.
    NotOwned = 0,
    /// Ours: commands apply.
    Owned = 1,
    /// Being imported by a migration: client commands get retry-later.
    Importing = 2,
    /// Frozen at the source of a migration: reads serve, writes get retry-later.
    Frozen = 3,
}

impl BucketState {
    /// The state's name in metrics and status.
    pub fn name(self) -> &'static str {
        match self {
            BucketState::NotOwned => "not_owned",
            BucketState::Owned => "owned",
            BucketState::Importing => "importing",
            BucketState::Frozen => "frozen",
        }
    }
}

/// The durable ownership record of one bucket.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct BucketRecord {
    /// The state.
    #[prost(enumeration = "BucketState", tag = "1")]
    pub state: i32,
    /// Routing-table version that set it.
    #[prost(uint64, tag = "2")]
    pub table_version: u64,
    /// An owned bucket a migration is copying out: every change to it also writes a change
    /// marker, which the migration's catch-up reads.
    #[prost(bool, tag = "3")]
    pub tracking: bool,
}

/// The engine command that changes bucket states.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SetBuckets {
    /// The buckets.
    #[prost(uint32, repeated, tag = "1")]
    pub buckets: Vec<u32>,
    /// The new state.
    #[prost(enumeration = "BucketState", tag = "2")]
    pub state: i32,
    /// The routing-table version that decided it; a bucket recorded at a newer version refuses it.
    #[prost(uint64, tag = "3")]
    pub table_version: u64,
    /// With state OWNED: track changes for a migration's catch-up (markers start afresh).
    #[prost(bool, tag = "4")]
    pub track_changes: bool,
}

/// The engine command that writes a migrating bucket's copied data at the destination.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct IngestBucket {
    /// The bucket; it must be IMPORTING here.
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// Drop whatever the bucket's range holds first (the first chunk of a copy).
    #[prost(bool, tag = "2")]
    pub reset: bool,
    /// Keys, each inside the bucket's range.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub keys: Vec<Vec<u8>>,
    /// Values, parallel to `keys` (ignored where `deleted`).
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub values: Vec<Vec<u8>>,
    /// Deletions, parallel to `keys`.
    #[prost(bool, repeated, tag = "5")]
    pub deleted: Vec<bool>,
}

/// The engine command that deletes a bucket's data and change markers: at the source once the
/// move committed (the bucket is NOT_OWNED), at the destination of an aborted move.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DropBucket {
    /// The bucket; it must be NOT_OWNED or IMPORTING here.
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// More buckets dropped with it (all or none).
    #[prost(uint32, repeated, tag = "2")]
    pub more: Vec<u32>,
}

/// The in-memory ownership table of a replica.
#[derive(Debug)]
pub struct Buckets {
    records: RwLock<Vec<BucketRecord>>,
}

impl Default for Buckets {
    fn default() -> Buckets {
        Buckets { records: RwLock::new(vec![BucketRecord::default(); usize::from(BUCKETS)]) }
    }
}

impl Buckets {
    /// Loads the table from the `meta` column family.
    pub fn load(db: &rocksdb::DB) -> Result<Buckets, StorageError> {
        let table = Buckets::default();
        table.reload(db)?;
        Ok(table)
    }

    /// Replaces the table with the one in the `meta` column family (after a snapshot install).
    pub fn reload(&self, db: &rocksdb::DB) -> Result<(), StorageError> {
        let mut records = vec![BucketRecord::default(); usize::from(BUCKETS)];
        let meta = crate::db::cf(db, keys::CF_META)?;
        let (start, end) = keys::bucket_state_range();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        for item in
            db.iterator_cf_opt(meta, ro, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (k, v) = item?;
            let record: BucketRecord =
                codec::decode(&v).map_err(|source| StorageError::Corrupt { what: "bucket state", source })?;
            if let Some(b) = keys::bucket_of_state_key(&k) {
                records[usize::from(b.get())] = record;
            }
        }
        if let Ok(mut r) = self.records.write() {
            *r = records;
        }
        Ok(())
    }

    /// The record of `bucket`.
    pub fn get(&self, bucket: BucketId) -> BucketRecord {
        self.records.read().map(|r| r[usize::from(bucket.get())]).unwrap_or_default()
    }

    /// Sets records after they were written durably.
    pub fn set(&self, updates: &[(BucketId, BucketRecord)]) {
        if let Ok(mut r) = self.records.write() {
            for (b, rec) in updates {
                r[usize::from(b.get())] = *rec;
            }
        }
    }

    /// Buckets per state.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        // Every state, empty ones too: a gauge published from this must fall back to 0.
        let mut counts: BTreeMap<&'static str, u64> =
            [BucketState::NotOwned, BucketState::Owned, BucketState::Importing, BucketState::Frozen]
                .into_iter()
                .map(|s| (s.name(), 0))
                .collect();
        if let Ok(r) = self.records.read() {
            for rec in r.iter() {
                *counts.entry(rec.state().name()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The buckets in `state`.
    pub fn in_state(&self, state: BucketState) -> Vec<u16> {
        self.records
            .read()
            .map(|r| (0..BUCKETS).filter(|&b| r[usize::from(b)].state() == state).collect())
            .unwrap_or_default()
    }
}

/// The fence for a write: the bucket must be OWNED.
pub fn write_fence(bucket: BucketId, record: BucketRecord) -> Result<(), EngineError> {
    match record.state() {
        BucketState::Owned => Ok(()),
        BucketState::Importing | BucketState::Frozen => Err(EngineError::RetryLater { bucket: bucket.get() }),
        BucketState::NotOwned => {
            Err(EngineError::WrongOwner { bucket: bucket.get(), table_version: record.table_version })
        }
    }
}

/// The fence for a read: the bucket must be OWNED or FROZEN (its data is complete and current).
pub fn read_fence(bucket: BucketId, record: BucketRecord) -> Result<(), EngineError> {
    match record.state() {
        BucketState::Owned | BucketState::Frozen => Ok(()),
        BucketState::Importing => Err(EngineError::RetryLater { bucket: bucket.get() }),
        BucketState::NotOwned => {
            Err(EngineError::WrongOwner { bucket: bucket.get(), table_version: record.table_version })
        }
    }
}

/// The encoded record.
pub fn encode(record: &BucketRecord) -> Vec<u8> {
    codec::encode(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_by_state() {
        let b = BucketId::new(7).unwrap();
        let rec =
            |state: BucketState| BucketRecord { state: state as i32, table_version: 3, tracking: false };
        assert_eq!(write_fence(b, rec(BucketState::Owned)), Ok(()));
        assert_eq!(write_fence(b, rec(BucketState::Frozen)), Err(EngineError::RetryLater { bucket: 7 }));
        assert_eq!(write_fence(b, rec(BucketState::Importing)), Err(EngineError::RetryLater { bucket: 7 }));
        assert_eq!(
            write_fence(b, rec(BucketState::NotOwned)),
            Err(EngineError::WrongOwner { bucket: 7, table_version: 3 })
        );
        assert_eq!(read_fence(b, rec(BucketState::Frozen)), Ok(()));
        assert_eq!(read_fence(b, rec(BucketState::Importing)), Err(EngineError::RetryLater { bucket: 7 }));
        let t = Buckets::default();
        t.set(&[(b, rec(BucketState::Owned))]);
        assert_eq!(t.get(b).state(), BucketState::Owned);
        assert_eq!(t.counts().get("owned"), Some(&1));
        t.set(&[(b, rec(BucketState::Frozen))]);
        assert_eq!(t.counts().get("frozen"), Some(&1));
        t.set(&[(b, rec(BucketState::Owned))]);
        assert_eq!(t.counts().get("frozen"), Some(&0), "an emptied state counts 0 (its gauge falls back)");
        assert_eq!(t.in_state(BucketState::Owned), vec![7]);
    }
}
