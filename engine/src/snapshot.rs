//! Snapshots as files (after TiKV): the leader writes the `data` column family, read from ONE
//! RocksDB snapshot view, into an SST file in the background; `Snapshot.data` carries only a small
//! [`SnapshotManifest`] (apply state, bucket states, file names, sizes and SHA-256). The transport
//! streams the files in chunks; the follower checks every checksum before it steps the snapshot
//! message, and installs by ingesting the files. An "applying" marker written before the install
//! and removed in the install's final batch makes a crash mid-install redo it on restart.
//!
//! Directory layout under the replica's snapshot root:
//! `gen-<index>-<term>/` (built here, served to followers) and `recv-<index>-<term>/` (received).

use crate::db::cf;
use crate::error::StorageError;
use crate::keys::{self, CF_DATA, CF_META};
use crate::state::{ApplyState, Members};
use nid_proto::codec;
use rocksdb::{DB, IteratorMode, ReadOptions};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// The data file of a snapshot.
pub const DATA_FILE: &str = "data.sst";

/// One file of a snapshot.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SnapshotFile {
    /// File name inside the snapshot directory (no path separators).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Size in bytes.
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// SHA-256 of the content.
    #[prost(bytes = "vec", tag = "3")]
    pub sha256: Vec<u8>,
}

/// A key and its value.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// What `Snapshot.data` carries.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SnapshotManifest {
    /// Apply state at the snapshot point (index, term, conf state).
    #[prost(message, optional, tag = "1")]
    pub apply_state: Option<ApplyState>,
    /// Bucket-ownership records and change markers of the `meta` CF.
    #[prost(message, repeated, tag = "2")]
    pub buckets: Vec<KeyValue>,
    /// The SST files of the `data` CF (none when the CF was empty).
    #[prost(message, repeated, tag = "3")]
    pub files: Vec<SnapshotFile>,
    /// Number of `data` keys in the files.
    #[prost(uint64, tag = "4")]
    pub data_keys: u64,
    /// The address book, so a member that joins by snapshot knows every peer.
    #[prost(message, optional, tag = "5")]
    pub members: Option<Members>,
}

impl SnapshotManifest {
    /// The apply state at the snapshot point.
    pub fn apply(&self) -> ApplyState {
        self.apply_state.clone().unwrap_or_default()
    }

    /// Checks file names so a manifest from the network cannot point outside its directory.
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.apply_state.is_none() {
            return Err(StorageError::Snapshot("manifest without apply state".into()));
        }
        for f in &self.files {
            let ok = !f.name.is_empty()
                && f.name.len() <= 64
                && f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
                && !f.name.starts_with('.');
            if !ok {
                return Err(StorageError::Snapshot("bad file name in manifest".into()));
            }
        }
        Ok(())
    }
}

/// The snapshot root of a DB at `db_path`.
pub fn snap_root(db_path: &Path) -> PathBuf {
    db_path.with_extension("snap")
}

/// Where a generated snapshot lives.
pub fn gen_dir(root: &Path, index: u64, term: u64) -> PathBuf {
    root.join(format!("gen-{index}-{term}"))
}

/// Where a received snapshot lives.
pub fn recv_dir(root: &Path, index: u64, term: u64) -> PathBuf {
    root.join(format!("recv-{index}-{term}"))
}

/// SHA-256 and size of a file.
pub fn file_digest(path: &Path) -> Result<(u64, [u8; 32]), StorageError> {
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((size, out))
}

/// Maps an I/O error into the storage error type.
pub fn io(e: std::io::Error) -> StorageError {
    StorageError::Snapshot(format!("file: {e}"))
}

/// Builds a snapshot of the applied state into `root/gen-<index>-<term>/` from one RocksDB view.
/// Returns the manifest. Runs off the Raft thread.
pub fn generate(db: &DB, root: &Path) -> Result<SnapshotManifest, StorageError> {
    let view = db.snapshot();
    let apply: ApplyState = match view.get_cf(cf(db, CF_META)?, keys::APPLY_STATE)? {
        Some(bytes) => {
            codec::decode(&bytes).map_err(|source| StorageError::Corrupt { what: "apply state", source })?
        }
        None => return Err(StorageError::Snapshot("no apply state yet".into())),
    };
    let final_dir = gen_dir(root, apply.applied_index, apply.applied_term);
    let tmp = final_dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;

    let opts = crate::db::data_file_options();
    let mut writer = rocksdb::SstFileWriter::create(&opts);
    let path = tmp.join(DATA_FILE);
    writer.open(&path)?;
    let mut data_keys = 0u64;
    for item in view.iterator_cf(cf(db, CF_DATA)?, IteratorMode::Start) {
        let (k, v) = item?;
        writer.put(&k, &v)?;
        data_keys += 1;
    }
    let mut files = Vec::new();
    if data_keys > 0 {
        writer.finish()?;
        let (size, sha256) = file_digest(&path)?;
        files.push(SnapshotFile { name: DATA_FILE.into(), size, sha256: sha256.to_vec() });
    } else {
        drop(writer);
        let _ = std::fs::remove_file(&path);
    }

    let (start, end) = keys::ownership_range();
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end.to_vec());
    ro.set_snapshot(&view);
    let mut buckets = Vec::new();
    for item in
        db.iterator_cf_opt(cf(db, CF_META)?, ro, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        buckets.push(KeyValue { key: k.to_vec(), value: v.to_vec() });
    }
    let members = match view.get_cf(cf(db, CF_META)?, keys::ADDRESS_BOOK)? {
        Some(bytes) => Some(
            codec::decode::<Members>(&bytes)
                .map_err(|source| StorageError::Corrupt { what: "address book", source })?,
        ),
        None => None,
    };
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(io)?;
    Ok(SnapshotManifest { apply_state: Some(apply), buckets, files, data_keys, members })
}

/// Checks that every file of `manifest` is in `dir` with its size and checksum.
pub fn verify_files(manifest: &SnapshotManifest, dir: &Path) -> Result<(), StorageError> {
    manifest.validate()?;
    for f in &manifest.files {
        let (size, sha) = file_digest(&dir.join(&f.name))?;
        if size != f.size || sha.as_slice() != f.sha256.as_slice() {
            return Err(StorageError::Snapshot(format!("file {} does not match its checksum", f.name)));
        }
    }
    Ok(())
}

/// Removes every generated snapshot directory but `keep`.
pub fn prune_generated(root: &Path, keep: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path();
            let is_gen = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("gen-"));
            if is_gen && p != keep {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}
