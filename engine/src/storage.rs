//! `raft::Storage` over the replica's RocksDB: the log, hard state, apply state and snapshots.
//!
//! Durable state, all in one DB (one WAL, so a write batch spanning column families is atomic):
//! - [`RaftLocalState`] (hard state, last index and term) next to the entries in the `raft` CF;
//! - [`ApplyState`] (applied index/term, truncated index/term, conf state) in the `meta` CF, written
//!   in the same batch as the state-machine changes it covers.
//!
//! `last_index`/`last_term` live in memory and in the local state, never found by seeking. The
//! truncated index AND term are kept so `term(first_index - 1)` keeps working after compaction.
//! Recently appended entries stay in an in-memory cache because raft re-reads them right after
//! `advance` to build append messages.

use crate::db::cf;
use crate::error::StorageError;
use crate::keys::{self, CF_DATA, CF_META, CF_RAFT};
use crate::snapshot::{self, SnapshotManifest};
use crate::state::{ApplyState, RaftLocalState};
use nid_proto::codec;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use rocksdb::{DB, WriteBatch, WriteOptions};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The index and term at which initial members of a new cell start (as TiKV does): a replica
/// added later starts empty at 0 and so must catch up by snapshot.
pub const BOOTSTRAP_INDEX: u64 = 5;
/// See [`BOOTSTRAP_INDEX`].
pub const BOOTSTRAP_TERM: u64 = 5;

const MAX_CACHED_ENTRIES: usize = 4096;

fn to_raft(e: StorageError) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(e)))
}

/// Reads and decodes the apply state (default when absent).
pub fn read_apply_state(db: &DB) -> Result<ApplyState, StorageError> {
    match db.get_cf(cf(db, CF_META)?, keys::APPLY_STATE)? {
        Some(bytes) => {
            codec::decode(&bytes).map_err(|source| StorageError::Corrupt { what: "apply state", source })
        }
        None => Ok(ApplyState::default()),
    }
}

fn decode_proto<M: protobuf::Message>(bytes: &[u8], what: &'static str) -> Result<M, StorageError> {
    if bytes.is_empty() {
        return Ok(M::new());
    }
    M::parse_from_bytes(bytes).map_err(|source| StorageError::CorruptProto { what, source })
}

fn encode_proto<M: protobuf::Message>(m: &M) -> Vec<u8> {
    // Writing a well-formed in-memory message into a Vec cannot fail.
    m.write_to_bytes().unwrap_or_default()
}

/// The replica's Raft storage.
pub struct PeerStorage {
    db: Arc<DB>,
    snap_root: PathBuf,
    generating: Arc<Mutex<Generation>>,
    hard_state: HardState,
    last_index: u64,
    last_term: u64,
    apply: ApplyState,
    conf_state: ConfState,
    cache: VecDeque<Entry>,
    /// Approximate bytes of log entries after the truncated index (recounted from appends; zero
    /// after a restart, when the count threshold still applies).
    log_bytes: u64,
}

impl PeerStorage {
    /// Loads the storage from `db`. When the replica is new and `bootstrap_voters` is non-empty it is
    /// bootstrapped as an initial member with that voter set; with an empty list it starts
    /// uninitialized and waits for a snapshot from the leader.
    pub fn open(db: Arc<DB>, bootstrap_voters: &[u64]) -> Result<PeerStorage, StorageError> {
        // A replica that found its log lost never serves again under this node id (a leader
        // elected later would not notice, and the replica has forgotten its votes).
        if let Some(why) = db.get_cf(cf(&db, CF_META)?, keys::LOG_LOST)? {
            return Err(StorageError::LostLog(String::from_utf8_lossy(&why).into_owned()));
        }
        // A crash during a snapshot install left its marker: finish (redo) the install first.
        if let Some(bytes) = db.get_cf(cf(&db, CF_META)?, keys::SNAPSHOT_APPLYING)? {
            let manifest: SnapshotManifest = codec::decode(&bytes)
                .map_err(|source| StorageError::Corrupt { what: "snapshot marker", source })?;
            tracing::warn!(index = manifest.apply().applied_index, "redoing an interrupted snapshot install");
            let root = snapshot::snap_root(db.path());
            install_files(&db, &root, &manifest)?;
        }
        let local: Option<RaftLocalState> = match db.get_cf(cf(&db, CF_RAFT)?, keys::RAFT_LOCAL_STATE)? {
            Some(bytes) => Some(
                codec::decode(&bytes)
                    .map_err(|source| StorageError::Corrupt { what: "raft local state", source })?,
            ),
            None => None,
        };
        let mut storage = match local {
            Some(local) => {
                let apply = read_apply_state(&db)?;
                let mut hard_state: HardState = decode_proto(&local.hard_state, "hard state")?;
                // The commit index is persisted lazily (it can always be re-learnt), but applied
                // entries were committed: never start with commit < applied.
                if hard_state.commit < apply.applied_index {
                    hard_state.commit = apply.applied_index;
                }
                let conf_state = decode_proto(&apply.conf_state, "conf state")?;
                PeerStorage {
                    snap_root: snapshot::snap_root(db.path()),
                    generating: Arc::default(),
                    db,
                    hard_state,
                    last_index: local.last_index,
                    last_term: local.last_term,
                    apply,
                    conf_state,
                    cache: VecDeque::new(),
                    log_bytes: 0,
                }
            }
            None => {
                let mut storage = PeerStorage {
                    snap_root: snapshot::snap_root(db.path()),
                    generating: Arc::default(),
                    db,
                    hard_state: HardState::default(),
                    last_index: 0,
                    last_term: 0,
                    apply: ApplyState::default(),
                    conf_state: ConfState::default(),
                    cache: VecDeque::new(),
                    log_bytes: 0,
                };
                if !bootstrap_voters.is_empty() {
                    storage.bootstrap(bootstrap_voters)?;
                }
                storage
            }
        };
        storage.cache.clear();
        Ok(storage)
    }

    fn bootstrap(&mut self, voters: &[u64]) -> Result<(), StorageError> {
        let mut cs = ConfState::default();
        cs.set_voters(voters.to_vec());
        let hs = HardState { term: BOOTSTRAP_TERM, commit: BOOTSTRAP_INDEX, ..Default::default() };
        self.apply = ApplyState {
            applied_index: BOOTSTRAP_INDEX,
            applied_term: BOOTSTRAP_TERM,
            truncated_index: BOOTSTRAP_INDEX,
            truncated_term: BOOTSTRAP_TERM,
            conf_state: encode_proto(&cs),
        };
        self.conf_state = cs;
        self.hard_state = hs;
        self.last_index = BOOTSTRAP_INDEX;
        self.last_term = BOOTSTRAP_TERM;
        let mut wb = WriteBatch::default();
        self.put_apply_state(&mut wb)?;
        self.put_local_state(&mut wb)?;
        self.write(wb, true)
    }

    /// The DB.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// The current apply state.
    pub fn apply_state(&self) -> &ApplyState {
        &self.apply
    }

    /// The conf state as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The hard state as last persisted.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// True once the replica has a conf state (initial member or installed snapshot).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || !self.conf_state.learners.is_empty()
    }

    /// Writes `wb` to the DB, synced when `sync`.
    pub fn write(&self, wb: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(wb, &opts)?;
        Ok(())
    }

    fn put_local_state(&self, wb: &mut WriteBatch) -> Result<(), StorageError> {
        let local = RaftLocalState {
            hard_state: encode_proto(&self.hard_state),
            last_index: self.last_index,
            last_term: self.last_term,
        };
        wb.put_cf(cf(&self.db, CF_RAFT)?, keys::RAFT_LOCAL_STATE, codec::encode(&local));
        Ok(())
    }

    fn put_apply_state(&self, wb: &mut WriteBatch) -> Result<(), StorageError> {
        wb.put_cf(cf(&self.db, CF_META)?, keys::APPLY_STATE, codec::encode(&self.apply));
        Ok(())
    }

    /// Stages `entries` (and removal of any conflicting tail) plus the hard state into `wb`. The
    /// in-memory view changes immediately; the caller must write `wb` (synced) before sending the
    /// messages that depend on it.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        wb: &mut WriteBatch,
    ) -> Result<(), StorageError> {
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            let raft_cf = cf(&self.db, CF_RAFT)?;
            for e in entries {
                let bytes = encode_proto(e);
                self.log_bytes += bytes.len() as u64;
                wb.put_cf(raft_cf, keys::entry_key(e.index), bytes);
            }
            // Entries after the new last one are a stale tail from an older term: delete them.
            if last.index < self.last_index {
                wb.delete_range_cf(
                    raft_cf,
                    keys::entry_key(last.index + 1),
                    keys::entry_key(self.last_index + 1),
                );
            }
            while self.cache.back().is_some_and(|e| e.index >= first.index) {
                self.cache.pop_back();
            }
            if self.cache.back().is_some_and(|e| e.index + 1 != first.index) {
                self.cache.clear();
            }
            self.cache.extend(entries.iter().cloned());
            while self.cache.len() > MAX_CACHED_ENTRIES {
                self.cache.pop_front();
            }
            self.last_index = last.index;
            self.last_term = last.term;
        }
        self.put_local_state(wb)
    }

    /// Records a commit index learnt after the Ready that carried the hard state.
    pub fn set_commit(&mut self, commit: u64, wb: &mut WriteBatch) -> Result<(), StorageError> {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
        }
        self.put_local_state(wb)
    }

    /// Stages the new applied position (and conf state) into `wb`, next to the data it covers.
    pub fn stage_applied(
        &mut self,
        index: u64,
        term: u64,
        conf_state: Option<ConfState>,
        wb: &mut WriteBatch,
    ) -> Result<(), StorageError> {
        self.apply.applied_index = index;
        self.apply.applied_term = term;
        if let Some(cs) = conf_state {
            self.apply.conf_state = encode_proto(&cs);
            self.conf_state = cs;
        }
        self.put_apply_state(wb)
    }

    /// Removes log entries up to and including `index` (which must be applied), keeping its term.
    /// Returns how many entries went away.
    pub fn compact_to(&mut self, index: u64) -> Result<u64, StorageError> {
        let index = index.min(self.apply.applied_index);
        if index <= self.apply.truncated_index {
            return Ok(0);
        }
        let term = self.term_of(index)?;
        let first = self.apply.truncated_index + 1;
        self.apply.truncated_index = index;
        self.apply.truncated_term = term;
        // The truncated state goes first (and durably); the range delete may then lag or be redone.
        let mut wb = WriteBatch::default();
        self.put_apply_state(&mut wb)?;
        wb.delete_range_cf(cf(&self.db, CF_RAFT)?, keys::entry_key(first), keys::entry_key(index + 1));
        self.write(wb, false)?;
        while self.cache.front().is_some_and(|e| e.index <= index) {
            self.cache.pop_front();
        }
        let before = self.last_index.saturating_sub(first - 1).max(1);
        let kept = self.last_index.saturating_sub(index);
        self.log_bytes = self.log_bytes.saturating_mul(kept) / before;
        Ok(index + 1 - first)
    }

    fn term_of(&self, idx: u64) -> Result<u64, StorageError> {
        if idx == self.apply.truncated_index {
            return Ok(self.apply.truncated_term);
        }
        if idx == self.last_index {
            return Ok(self.last_term);
        }
        if let Some(e) = self.cached(idx) {
            return Ok(e.term);
        }
        match self.db.get_cf(cf(&self.db, CF_RAFT)?, keys::entry_key(idx))? {
            Some(bytes) => Ok(decode_proto::<Entry>(&bytes, "log entry")?.term),
            None => Err(StorageError::Snapshot(format!("log entry {idx} missing"))),
        }
    }

    fn cached(&self, idx: u64) -> Option<&Entry> {
        let front = self.cache.front()?.index;
        if idx < front {
            return None;
        }
        self.cache.get((idx - front) as usize)
    }

    fn first(&self) -> u64 {
        self.apply.truncated_index + 1
    }

    /// Approximate size of the log after the truncated index.
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// The directory holding this replica's snapshot files.
    pub fn snap_root(&self) -> &Path {
        &self.snap_root
    }

    /// Installs a snapshot received from the leader. Its files must already sit, verified, in
    /// `recv-<index>-<term>/`. A marker is written first; the data is replaced by ingesting the
    /// files; the final synced batch writes ownership, apply state and the reset log and removes
    /// the marker. A crash in between redoes the install on restart ([`PeerStorage::open`]).
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StorageError> {
        let manifest: SnapshotManifest = codec::decode(&snap.data)
            .map_err(|source| StorageError::Corrupt { what: "snapshot manifest", source })?;
        let meta = snap.get_metadata();
        if manifest.apply().applied_index != meta.index || manifest.apply().applied_term != meta.term {
            return Err(StorageError::Snapshot("manifest does not match metadata".into()));
        }
        let dir = snapshot::recv_dir(&self.snap_root, meta.index, meta.term);
        snapshot::verify_files(&manifest, &dir)?;
        let mut wb = WriteBatch::default();
        wb.put_cf(cf(&self.db, CF_META)?, keys::SNAPSHOT_APPLYING, codec::encode(&manifest));
        self.write(wb, true)?;
        install_files(&self.db, &self.snap_root, &manifest)?;
        self.apply = manifest.apply();
        self.apply.truncated_index = meta.index;
        self.apply.truncated_term = meta.term;
        self.conf_state = meta.get_conf_state().clone();
        self.last_index = meta.index;
        self.last_term = meta.term;
        self.log_bytes = 0;
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        // install_files already persisted this local state (log reset, commit and term raised).
        self.cache.clear();
        Ok(())
    }

    /// Entries `[low, high)` read from the cache or the DB, at most `max_size` bytes (at least one).
    fn read_entries(&self, low: u64, high: u64, max_size: u64) -> Result<Vec<Entry>, raft::Error> {
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        let mut next = low;
        while next < high {
            let entry = match self.cached(next) {
                Some(e) => e.clone(),
                None => {
                    let bytes = self
                        .db
                        .get_cf(cf(&self.db, CF_RAFT).map_err(to_raft)?, keys::entry_key(next))
                        .map_err(|e| to_raft(e.into()))?
                        .ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
                    decode_proto::<Entry>(&bytes, "log entry").map_err(to_raft)?
                }
            };
            size += u64::from(entry.compute_size());
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(entry);
            next += 1;
        }
        Ok(out)
    }
}

/// Background snapshot generation state.
#[derive(Default)]
pub struct Generation {
    running: bool,
    ready: Option<Snapshot>,
    generated: u64,
}

impl PeerStorage {
    /// Snapshots generated so far by this replica (for metrics and tests).
    pub fn snapshots_generated(&self) -> u64 {
        self.generating.lock().map(|g| g.generated).unwrap_or(0)
    }
}

/// The raft snapshot carrying `manifest`.
pub fn to_raft_snapshot(manifest: &SnapshotManifest) -> Result<Snapshot, StorageError> {
    let conf_state: ConfState = decode_proto(&manifest.apply().conf_state, "conf state")?;
    let mut meta = SnapshotMetadata {
        index: manifest.apply().applied_index,
        term: manifest.apply().applied_term,
        ..Default::default()
    };
    meta.set_conf_state(conf_state);
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    snap.data = codec::encode(manifest).into();
    Ok(snap)
}

/// Replaces the data and ownership with the snapshot's (from `recv-<index>-<term>/`), resets the log
/// to start after the snapshot point, writes the apply state and clears the marker. Idempotent.
fn install_files(db: &DB, root: &Path, manifest: &SnapshotManifest) -> Result<(), StorageError> {
    let (index, term) = (manifest.apply().applied_index, manifest.apply().applied_term);
    let dir = snapshot::recv_dir(root, index, term);
    let data_cf = cf(db, CF_DATA)?;
    let mut wb = WriteBatch::default();
    wb.delete_range_cf(data_cf, [0u8].as_slice(), [0xffu8; 4].as_slice());
    db.write(wb)?;
    let paths: Vec<PathBuf> = manifest.files.iter().map(|f| dir.join(&f.name)).collect();
    if !paths.is_empty() {
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        // Copy, so the files survive for a redo until the marker is gone.
        opts.set_move_files(false);
        db.ingest_external_file_cf_opts(data_cf, &opts, paths)?;
    }
    let meta_cf = cf(db, CF_META)?;
    let mut wb = WriteBatch::default();
    let (bs, be) = keys::ownership_range();
    wb.delete_range_cf(meta_cf, bs, be);
    for kv in &manifest.buckets {
        wb.put_cf(meta_cf, &kv.key, &kv.value);
    }
    match &manifest.members {
        Some(members) => wb.put_cf(meta_cf, keys::ADDRESS_BOOK, codec::encode(members)),
        None => wb.delete_cf(meta_cf, keys::ADDRESS_BOOK),
    }
    let apply = ApplyState { truncated_index: index, truncated_term: term, ..manifest.apply() };
    wb.put_cf(meta_cf, keys::APPLY_STATE, codec::encode(&apply));
    wb.delete_range_cf(cf(db, CF_RAFT)?, keys::entry_key(0), keys::entry_key(u64::MAX));
    // The local state is rewritten from the (possibly older) stored one: log reset to the snapshot.
    let mut local: RaftLocalState = match db.get_cf(cf(db, CF_RAFT)?, keys::RAFT_LOCAL_STATE)? {
        Some(bytes) => codec::decode(&bytes)
            .map_err(|source| StorageError::Corrupt { what: "raft local state", source })?,
        None => RaftLocalState::default(),
    };
    let mut hs: HardState = decode_proto(&local.hard_state, "hard state")?;
    hs.commit = hs.commit.max(index);
    hs.term = hs.term.max(term);
    local.hard_state = encode_proto(&hs);
    local.last_index = index;
    local.last_term = term;
    wb.put_cf(cf(db, CF_RAFT)?, keys::RAFT_LOCAL_STATE, codec::encode(&local));
    wb.delete_cf(meta_cf, keys::SNAPSHOT_APPLYING);
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(wb, &opts)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

impl raft::Storage for PeerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        self.read_entries(low, high, max_size.into().unwrap_or(u64::MAX))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.apply.truncated_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        self.term_of(idx).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let Ok(mut generation) = self.generating.lock() else {
            return Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable));
        };
        if let Some(ready) = &generation.ready {
            let meta = ready.get_metadata();
            if meta.index >= request_index
                && snapshot::gen_dir(&self.snap_root, meta.index, meta.term).exists()
            {
                return Ok(ready.clone());
            }
        }
        if !generation.running {
            generation.running = true;
            let (db, root, state) = (self.db.clone(), self.snap_root.clone(), self.generating.clone());
            let spawned = std::thread::Builder::new().name("snap-gen".into()).spawn(move || {
                let result = std::fs::create_dir_all(&root)
                    .map_err(snapshot::io)
                    .and_then(|()| snapshot::generate(&db, &root))
                    .and_then(|m| to_raft_snapshot(&m));
                let Ok(mut g) = state.lock() else { return };
                g.running = false;
                match result {
                    Ok(snap) => {
                        let meta = snap.get_metadata();
                        snapshot::prune_generated(&root, &snapshot::gen_dir(&root, meta.index, meta.term));
                        g.generated += 1;
                        g.ready = Some(snap);
                    }
                    Err(e) => tracing::error!(error = %e, "snapshot generation failed"),
                }
            });
            if spawned.is_err() {
                generation.running = false;
            }
        }
        // raft asks again after the next heartbeat response.
        Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests;
