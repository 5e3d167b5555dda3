//! Snapshots as files (after TiKV): the leader writes the `data` column family, read from ONE
//! RocksDB snapshot view, into an SST file in the background; `Snapshot.data` carries only a small
//! [`SnapshotManifest`] (apply state, bucket states, file names, sizes and SHA-256). The transport
//! streams the files in chunks; the follower checks every checksum before it steps the snapshot
//! message, and installs by ingesting the files. An "applying" marker written before the install
//! and removed in the install's final batch makes a crash mid-install redo it on restart.
//!
//! Directory layout under the replica's snapshot root:
//! `gen-<index>-<term>/` (built here, served to followers) and `recv-<index>-<term>/` (received).

use crate::codec;
use crate::keys::{self, CF_DATA, CF_META};
use crate::storage::{ApplyState, StoreError, cf};
use bincode::{Decode, Encode};
use rocksdb::{DB, IteratorMode, ReadOptions};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// The data file of a snapshot.
pub const DATA_FILE: &str = "data.sst";

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SnapshotFile {
    /// File name inside the snapshot directory (no path separators).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
}

/// What `Snapshot.data` carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct SnapshotManifest {
    /// Apply state at the snapshot point (index, term, conf state).
    pub apply_state: ApplyState,
    /// Bucket-ownership key/value pairs of the `meta` CF.
    pub buckets: Vec<(Vec<u8>, Vec<u8>)>,
    /// The SST files of the `data` CF (none when the CF was empty).
    pub files: Vec<SnapshotFile>,
    /// Number of `data` keys in the files.
    pub data_keys: u64,
}

impl SnapshotManifest {
    /// Checks file names so a manifest from the network cannot point outside its directory.
    pub fn validate(&self) -> Result<(), StoreError> {
        for f in &self.files {
            let ok = !f.name.is_empty()
                && f.name.len() <= 64
                && f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
                && !f.name.starts_with('.');
            if !ok {
                return Err(StoreError::BadSnapshot("bad file name in manifest".into()));
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
pub fn file_digest(path: &Path) -> Result<(u64, [u8; 32]), StoreError> {
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
pub fn io(e: std::io::Error) -> StoreError {
    StoreError::BadSnapshot(format!("snapshot file: {e}"))
}

/// Builds a snapshot of the applied state into `root/gen-<index>-<term>/` from one RocksDB view.
/// Returns the manifest. Runs off the Raft thread.
pub fn generate(db: &DB, root: &Path) -> Result<SnapshotManifest, StoreError> {
    let view = db.snapshot();
    let apply: ApplyState = match view.get_cf(cf(db, CF_META)?, keys::APPLY_STATE)? {
        Some(bytes) => {
            codec::decode(&bytes).map_err(|source| StoreError::Corrupt { what: "apply state", source })?
        }
        None => return Err(StoreError::BadSnapshot("no apply state yet".into())),
    };
    let final_dir = gen_dir(root, apply.applied_index, apply.applied_term);
    let tmp = final_dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;

    let opts = rocksdb::Options::default();
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
        files.push(SnapshotFile { name: DATA_FILE.into(), size, sha256 });
    } else {
        drop(writer);
        let _ = std::fs::remove_file(&path);
    }

    let (start, end) = keys::bucket_state_range();
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end.to_vec());
    ro.set_snapshot(&view);
    let mut buckets = Vec::new();
    for item in
        db.iterator_cf_opt(cf(db, CF_META)?, ro, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        buckets.push((k.to_vec(), v.to_vec()));
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(io)?;
    Ok(SnapshotManifest { apply_state: apply, buckets, files, data_keys })
}

/// Checks that every file of `manifest` is in `dir` with its size and checksum.
pub fn verify_files(manifest: &SnapshotManifest, dir: &Path) -> Result<(), StoreError> {
    manifest.validate()?;
    for f in &manifest.files {
        let (size, sha) = file_digest(&dir.join(&f.name))?;
        if size != f.size || sha != f.sha256 {
            return Err(StoreError::BadSnapshot(format!("file {} does not match its checksum", f.name)));
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
