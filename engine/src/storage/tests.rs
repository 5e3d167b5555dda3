//! Storage tests: recovery, tail overwrite, compaction that keeps the truncated term, snapshots.

use super::*;
use crate::db::open_db;
use crate::snapshot::{self, SnapshotManifest};
use raft::Storage as _;

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("e{index}t{term}").into_bytes().into(), ..Default::default() }
}

fn append(s: &mut PeerStorage, entries: &[Entry]) {
    let mut wb = WriteBatch::default();
    s.append(entries, None, &mut wb).unwrap();
    s.write(wb, true).unwrap();
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

#[test]
fn bootstrap_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
        assert!(s.is_initialized());
        assert_eq!(s.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
        assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
        assert_eq!(s.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
    }
    // Reopening never re-bootstraps, whatever voters are passed.
    let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[9]).unwrap();
    let state = s.initial_state().unwrap();
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(state.hard_state.term, BOOTSTRAP_TERM);
    assert_eq!(state.hard_state.commit, BOOTSTRAP_INDEX);
}

#[test]
fn a_new_member_starts_uninitialized() {
    let dir = tempfile::tempdir().unwrap();
    let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[]).unwrap();
    assert!(!s.is_initialized());
    assert_eq!(s.first_index().unwrap(), 1);
    assert_eq!(s.last_index().unwrap(), 0);
    assert_eq!(s.term(0).unwrap(), 0);
}

#[test]
fn overwritten_tail_is_gone_from_cache_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
        append(&mut s, &(6..=10).map(|i| entry(i, 6)).collect::<Vec<_>>());
        // A new leader overwrites from 8 with a shorter log in term 7.
        append(&mut s, &[entry(8, 7)]);
        assert_eq!(s.last_index().unwrap(), 8);
        let got = s.entries(6, 9, None, ctx()).unwrap();
        assert_eq!(got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(6, 6), (7, 6), (8, 7)]);
        assert!(s.entries(6, 10, None, ctx()).is_err(), "reading past last_index fails");
    }
    let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
    assert_eq!(s.last_index().unwrap(), 8);
    assert_eq!(s.term(8).unwrap(), 7);
    let got = s.entries(6, 9, None, ctx()).unwrap();
    assert_eq!(got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(6, 6), (7, 6), (8, 7)]);
    let db = s.db();
    let raft_cf = cf(db, CF_RAFT).unwrap();
    assert!(db.get_cf(raft_cf, keys::entry_key(9)).unwrap().is_none(), "stale entry 9 deleted");
    assert!(db.get_cf(raft_cf, keys::entry_key(10)).unwrap().is_none(), "stale entry 10 deleted");
}

#[test]
fn max_size_limits_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
    append(&mut s, &(6..=20).map(|i| entry(i, 6)).collect::<Vec<_>>());
    assert_eq!(s.entries(6, 21, Some(0), ctx()).unwrap().len(), 1);
    let one = u64::from(entry(6, 6).compute_size());
    assert_eq!(s.entries(6, 21, Some(one * 3), ctx()).unwrap().len(), 3);
}

#[test]
fn compaction_keeps_the_truncated_term() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
        append(&mut s, &(6..=10).map(|i| entry(i, if i < 9 { 6 } else { 7 })).collect::<Vec<_>>());
        let mut wb = WriteBatch::default();
        s.stage_applied(10, 7, None, &mut wb).unwrap();
        s.write(wb, false).unwrap();
        assert_eq!(s.compact_to(8).unwrap(), 3);
        assert_eq!(s.first_index().unwrap(), 9);
        assert_eq!(s.term(8).unwrap(), 6, "term(first_index - 1) survives compaction");
        assert_eq!(s.entries(7, 9, None, ctx()), Err(raft::Error::Store(RaftStorageError::Compacted)));
        assert_eq!(s.term(7), Err(raft::Error::Store(RaftStorageError::Compacted)));
        // Compaction never passes the applied index.
        assert_eq!(s.compact_to(100).unwrap(), 2);
        assert_eq!(s.first_index().unwrap(), 11);
    }
    let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
    assert_eq!(s.first_index().unwrap(), 11);
    assert_eq!(s.last_index().unwrap(), 10);
    assert_eq!(s.term(10).unwrap(), 7);
}

#[test]
fn restart_never_reports_commit_below_applied() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
        append(&mut s, &(6..=8).map(|i| entry(i, 6)).collect::<Vec<_>>());
        let mut wb = WriteBatch::default();
        s.stage_applied(8, 6, None, &mut wb).unwrap();
        s.write(wb, false).unwrap();
    }
    let s = PeerStorage::open(open_db(dir.path()).unwrap(), &[1]).unwrap();
    assert_eq!(s.apply_state().applied_index, 8);
    assert!(s.initial_state().unwrap().hard_state.commit >= 8);
}

/// Asks for a snapshot until the background generation has produced one.
fn wait_snapshot(s: &PeerStorage, request_index: u64) -> Snapshot {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match s.snapshot(request_index, 2) {
            Ok(snap) => return snap,
            Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable)) => {
                assert!(std::time::Instant::now() < deadline, "snapshot never generated");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// What the transport does: copy the generated files into the receiver's directory.
fn ship(src: &PeerStorage, dst: &PeerStorage, snap: &Snapshot) {
    let meta = snap.get_metadata();
    let from = snapshot::gen_dir(src.snap_root(), meta.index, meta.term);
    let to = snapshot::recv_dir(dst.snap_root(), meta.index, meta.term);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn source_with_data(dir: &std::path::Path) -> PeerStorage {
    let mut src = PeerStorage::open(open_db(dir).unwrap(), &[1, 2, 3]).unwrap();
    append(&mut src, &(6..=9).map(|i| entry(i, 6)).collect::<Vec<_>>());
    let mut wb = WriteBatch::default();
    wb.put_cf(cf(src.db(), CF_DATA).unwrap(), b"\x00\x07k1", b"v1");
    wb.put_cf(cf(src.db(), CF_DATA).unwrap(), b"\x00\x08k2", b"v2");
    wb.put_cf(cf(src.db(), CF_META).unwrap(), [0x10, 0, 7], [1]);
    src.stage_applied(9, 6, None, &mut wb).unwrap();
    src.write(wb, true).unwrap();
    src
}

#[test]
fn snapshot_files_move_data_ownership_and_conf_state() {
    let root = tempfile::tempdir().unwrap();
    let src = source_with_data(&root.path().join("src"));
    let snap = wait_snapshot(&src, 9);
    assert_eq!(snap.get_metadata().index, 9);
    assert_eq!(src.snapshots_generated(), 1);
    // The manifest is small: the data travels as a file.
    let manifest: SnapshotManifest = codec::decode(&snap.data).unwrap();
    assert_eq!(manifest.files.len(), 1);
    assert_eq!(manifest.data_keys, 2);
    // Asking again reuses the generated snapshot.
    let _ = wait_snapshot(&src, 9);
    assert_eq!(src.snapshots_generated(), 1);

    let dst_dir = root.path().join("dst");
    let mut dst = PeerStorage::open(open_db(&dst_dir).unwrap(), &[]).unwrap();
    let mut wb = WriteBatch::default();
    wb.put_cf(cf(dst.db(), CF_DATA).unwrap(), b"\x00\x09stale", b"x");
    dst.write(wb, true).unwrap();
    ship(&src, &dst, &snap);
    dst.apply_snapshot(&snap).unwrap();
    assert!(dst.is_initialized());
    assert_eq!(dst.first_index().unwrap(), 10);
    assert_eq!(dst.term(9).unwrap(), 6);
    drop(dst);
    let dst = PeerStorage::open(open_db(&dst_dir).unwrap(), &[]).unwrap();
    assert_eq!(dst.conf_state().voters, vec![1, 2, 3]);
    assert_eq!(dst.apply_state().applied_index, 9);
    let db = dst.db();
    assert_eq!(db.get_cf(cf(db, CF_DATA).unwrap(), b"\x00\x07k1").unwrap().as_deref(), Some(&b"v1"[..]));
    assert_eq!(db.get_cf(cf(db, CF_DATA).unwrap(), b"\x00\x08k2").unwrap().as_deref(), Some(&b"v2"[..]));
    assert!(db.get_cf(cf(db, CF_DATA).unwrap(), b"\x00\x09stale").unwrap().is_none());
    assert_eq!(db.get_cf(cf(db, CF_META).unwrap(), [0x10, 0, 7]).unwrap().as_deref(), Some(&[1u8][..]));
    assert!(db.get_cf(cf(db, CF_META).unwrap(), keys::SNAPSHOT_APPLYING).unwrap().is_none());
}

#[test]
fn a_tampered_snapshot_file_is_refused_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let src = source_with_data(&root.path().join("src"));
    let snap = wait_snapshot(&src, 9);
    let mut dst = PeerStorage::open(open_db(&root.path().join("dst")).unwrap(), &[]).unwrap();
    ship(&src, &dst, &snap);
    let file = snapshot::recv_dir(dst.snap_root(), 9, 6).join(snapshot::DATA_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    assert!(dst.apply_snapshot(&snap).is_err());
    assert!(!dst.is_initialized());
}

#[test]
fn a_crash_mid_install_is_redone_on_restart() {
    let root = tempfile::tempdir().unwrap();
    let src = source_with_data(&root.path().join("src"));
    let snap = wait_snapshot(&src, 9);
    let dst_dir = root.path().join("dst");
    {
        let dst = PeerStorage::open(open_db(&dst_dir).unwrap(), &[]).unwrap();
        ship(&src, &dst, &snap);
        // The install wrote its marker and wiped the old data, then the process died.
        let mut wb = WriteBatch::default();
        wb.put_cf(cf(dst.db(), CF_META).unwrap(), keys::SNAPSHOT_APPLYING, &snap.data);
        wb.delete_range_cf(cf(dst.db(), CF_DATA).unwrap(), [0u8].as_slice(), [0xffu8; 4].as_slice());
        dst.write(wb, true).unwrap();
    }
    let dst = PeerStorage::open(open_db(&dst_dir).unwrap(), &[]).unwrap();
    assert!(dst.is_initialized(), "restart finished the install");
    assert_eq!(dst.apply_state().applied_index, 9);
    assert_eq!(dst.first_index().unwrap(), 10);
    let db = dst.db();
    assert_eq!(db.get_cf(cf(db, CF_DATA).unwrap(), b"\x00\x07k1").unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(db.get_cf(cf(db, CF_META).unwrap(), keys::SNAPSHOT_APPLYING).unwrap().is_none());
    assert!(!snapshot::recv_dir(dst.snap_root(), 9, 6).exists(), "received files cleaned up");
}
