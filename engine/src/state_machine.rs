//! The contract between the engine and what it replicates.
//!
//! A [`StateMachine`] turns committed commands into writes of the `data` column family. The engine
//! hands it an [`ApplyContext`] per command: reads see the state as of the previous command (the
//! writes of earlier commands in the same batch included), writes go into the one write batch the
//! engine commits with the new apply state. Reads outside apply go through a [`View`], one RocksDB
//! snapshot, so a multi-key read is consistent. Both implement [`KvRead`], so a state machine's
//! query code serves apply and reads alike.
//!
//! Apply must be deterministic and total: the same command on the same state gives the same writes
//! and the same output on every replica, and a command that cannot apply produces a rejection in
//! its output, never a panic. [`StateMachine::apply`] returns an error only when THIS replica cannot
//! go on (its disk failed, it lacks a key the log needs): the engine then stops the replica instead
//! of letting it diverge.

use crate::buckets::{BucketRecord, Buckets};
use crate::db::cf;
use crate::error::StorageError;
use crate::keys::CF_DATA;
use nid_proto::bucket::BucketId;
use rocksdb::{DB, WriteBatch};
use std::collections::BTreeMap;
use std::ops::Bound;

/// A replicated state machine.
pub trait StateMachine: Send + 'static {
    /// A command as proposed and carried in the log.
    type Command: Send + 'static;
    /// What applying a command produced, for its proposer.
    type Output: Send + 'static;

    /// Encodes a command for the log.
    fn encode(command: &Self::Command) -> Vec<u8>;

    /// Decodes a command from the log. Every replica holds the same bytes, so an error is the same
    /// everywhere: the engine answers the proposer with it and applies nothing.
    fn decode(bytes: &[u8]) -> Result<Self::Command, String>;

    /// The bucket the command writes, for the ownership fence (None: a cell-scoped command). A
    /// bucket out of range is malformed.
    fn bucket(command: &Self::Command) -> Option<u32>;

    /// Applies one committed command at log position `ctx.index()`.
    fn apply(
        &mut self,
        command: Self::Command,
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Self::Output, StorageError>;

    /// Called at start and after a snapshot was installed: reload any state kept in memory.
    fn restore(&mut self, view: &View<'_>) -> Result<(), StorageError>;
}

/// Reads of the `data` column family.
pub trait KvRead {
    /// The value under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Calls `f` with each (key, value) in `[start, end)`, ascending (or descending when
    /// `reverse`), until `f` returns false.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError>;
}

/// The writes of the batch being applied, visible to later commands of the same batch.
#[derive(Debug, Default)]
pub struct Overlay {
    data: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    buckets: Vec<(BucketId, BucketRecord)>,
}

impl Overlay {
    /// The bucket records the batch changed, in order.
    pub fn bucket_updates(&self) -> &[(BucketId, BucketRecord)] {
        &self.buckets
    }

    /// Forgets pending writes in `[start, end)` (the range was just deleted wholesale).
    pub fn forget_range(&mut self, start: &[u8], end: &[u8]) {
        let doomed: Vec<Vec<u8>> =
            self.data.range(start.to_vec()..end.to_vec()).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.data.insert(k, None);
        }
    }

    /// Records a bucket change.
    pub fn set_bucket(&mut self, bucket: BucketId, record: BucketRecord) {
        self.buckets.retain(|(b, _)| *b != bucket);
        self.buckets.push((bucket, record));
    }

    /// The record of `bucket` as of the batch so far.
    pub fn bucket(&self, bucket: BucketId, committed: &Buckets) -> BucketRecord {
        self.buckets
            .iter()
            .find(|(b, _)| *b == bucket)
            .map(|(_, r)| *r)
            .unwrap_or_else(|| committed.get(bucket))
    }
}

/// What a state machine sees while applying one command.
pub struct ApplyContext<'a> {
    pub(crate) db: &'a DB,
    pub(crate) batch: &'a mut WriteBatch,
    pub(crate) overlay: &'a mut Overlay,
    pub(crate) buckets: &'a Buckets,
    pub(crate) index: u64,
}

impl ApplyContext<'_> {
    /// The log index being applied.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Writes `value` under `key`.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), StorageError> {
        self.batch.put_cf(cf(self.db, CF_DATA)?, key, &value);
        self.mark(key)?;
        self.overlay.data.insert(key.to_vec(), Some(value));
        Ok(())
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), StorageError> {
        self.batch.delete_cf(cf(self.db, CF_DATA)?, key);
        self.mark(key)?;
        self.overlay.data.insert(key.to_vec(), None);
        Ok(())
    }

    /// Records a change to a key of a bucket whose changes are tracked (a migration copying it).
    fn mark(&mut self, key: &[u8]) -> Result<(), StorageError> {
        if let Some(bucket) = crate::keys::bucket_of_data_key(key)
            && self.bucket(bucket).tracking
        {
            let meta = cf(self.db, crate::keys::CF_META)?;
            self.batch.put_cf(meta, crate::keys::change_key(key), self.index.to_be_bytes());
        }
        Ok(())
    }

    /// The ownership record of `bucket` as of this command.
    pub fn bucket(&self, bucket: BucketId) -> BucketRecord {
        self.overlay.bucket(bucket, self.buckets)
    }
}

impl KvRead for ApplyContext<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.overlay.data.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.get_cf(cf(self.db, CF_DATA)?, key)?)
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        // Merge the committed state with the batch's pending writes (which win).
        let range = (Bound::Included(start.to_vec()), Bound::Excluded(end.to_vec()));
        let mut pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self.overlay.data.range(range).collect();
        if reverse {
            pending.reverse();
        }
        let mut pending = pending.into_iter().peekable();
        let mut it = raw_iterator(self.db, None, start, end)?;
        if reverse {
            it.seek_to_last();
        } else {
            it.seek_to_first();
        }
        let advance = |it: &mut rocksdb::DBRawIteratorWithThreadMode<'_, DB>| {
            if reverse {
                it.prev();
            } else {
                it.next();
            }
        };
        loop {
            let committed = it.key().map(<[u8]>::to_vec);
            let next_pending = pending.peek().map(|(k, _)| k.as_slice());
            // Which comes first in scan order; on a tie the pending write replaces the committed value.
            let take_pending = match (&committed, next_pending) {
                (None, None) => break,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(c), Some(p)) => {
                    if reverse {
                        p >= c.as_slice()
                    } else {
                        p <= c.as_slice()
                    }
                }
            };
            if take_pending {
                let Some((k, v)) = pending.next() else { break };
                if committed.as_deref() == Some(k.as_slice()) {
                    advance(&mut it);
                }
                if let Some(v) = v
                    && !f(k, v)
                {
                    return Ok(());
                }
            } else {
                let (Some(k), Some(v)) = (committed, it.value().map(<[u8]>::to_vec)) else { break };
                if !f(&k, &v) {
                    return Ok(());
                }
                advance(&mut it);
            }
        }
        it.status()?;
        Ok(())
    }
}

/// One consistent read view of the applied state (a RocksDB snapshot).
pub struct View<'a> {
    pub(crate) db: &'a DB,
    pub(crate) snapshot: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl<'a> View<'a> {
    /// A view of `db` as of now.
    pub fn new(db: &'a DB) -> View<'a> {
        View { db, snapshot: db.snapshot() }
    }

    /// The log index this view's state was applied up to.
    pub fn applied_index(&self) -> Result<u64, StorageError> {
        match self.snapshot.get_cf(cf(self.db, crate::keys::CF_META)?, crate::keys::APPLY_STATE)? {
            Some(bytes) => nid_proto::codec::decode::<crate::state::ApplyState>(&bytes)
                .map(|a| a.applied_index)
                .map_err(|source| StorageError::Corrupt { what: "apply state", source }),
            None => Ok(0),
        }
    }
}

impl KvRead for View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.snapshot.get_cf(cf(self.db, CF_DATA)?, key)?)
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut it = raw_iterator(self.db, Some(&self.snapshot), start, end)?;
        if reverse {
            it.seek_to_last();
        } else {
            it.seek_to_first();
        }
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !f(k, v) {
                return Ok(());
            }
            if reverse {
                it.prev();
            } else {
                it.next();
            }
        }
        it.status()?;
        Ok(())
    }
}

fn raw_iterator<'a>(
    db: &'a DB,
    snapshot: Option<&rocksdb::SnapshotWithThreadMode<'a, DB>>,
    start: &[u8],
    end: &[u8],
) -> Result<rocksdb::DBRawIteratorWithThreadMode<'a, DB>, StorageError> {
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_lower_bound(start.to_vec());
    ro.set_iterate_upper_bound(end.to_vec());
    if let Some(s) = snapshot {
        ro.set_snapshot(s);
    }
    Ok(db.raw_iterator_cf_opt(cf(db, CF_DATA)?, ro))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(r: &dyn KvRead, reverse: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        r.scan(b"a", b"z", reverse, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn apply_reads_merge_pending_writes_over_the_committed_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open_db(dir.path()).unwrap();
        let data = cf(&db, CF_DATA).unwrap();
        for k in ["b", "d", "f", "h"] {
            db.put_cf(data, k, format!("old-{k}")).unwrap();
        }
        let mut batch = WriteBatch::default();
        let mut overlay = Overlay::default();
        let buckets = Buckets::default();
        let mut ctx =
            ApplyContext { db: &db, batch: &mut batch, overlay: &mut overlay, buckets: &buckets, index: 7 };
        ctx.put(b"a", b"new-a".to_vec()).unwrap();
        ctx.put(b"d", b"new-d".to_vec()).unwrap();
        ctx.delete(b"f").unwrap();
        ctx.put(b"g", b"new-g".to_vec()).unwrap();
        assert_eq!(ctx.get(b"d").unwrap(), Some(b"new-d".to_vec()));
        assert_eq!(ctx.get(b"f").unwrap(), None);
        assert_eq!(ctx.get(b"h").unwrap(), Some(b"old-h".to_vec()));
        let expect: Vec<(Vec<u8>, Vec<u8>)> =
            [("a", "new-a"), ("b", "old-b"), ("d", "new-d"), ("g", "new-g"), ("h", "old-h")]
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
        assert_eq!(collect(&ctx, false), expect);
        let mut reversed = expect.clone();
        reversed.reverse();
        assert_eq!(collect(&ctx, true), reversed);
        let mut first_two = Vec::new();
        ctx.scan(b"a", b"z", false, &mut |k, _| {
            first_two.push(k.to_vec());
            first_two.len() < 2
        })
        .unwrap();
        assert_eq!(first_two, vec![b"a".to_vec(), b"b".to_vec()]);
        // A view sees only what was committed.
        let view = View::new(&db);
        assert_eq!(collect(&view, false).len(), 4);
        db.write(batch).unwrap();
        assert_eq!(collect(&view, false).len(), 4, "the view keeps its snapshot");
        assert_eq!(collect(&View::new(&db), false), expect);
    }
}
