//! An in-memory network between in-process replicas whose filters drop, delay, partition or
//! isolate traffic (after TiKV's test_raftstore transport_simulate). Snapshot files, which the gRPC
//! transport streams, are copied from the sender's generated directory to the receiver's.

use nid_engine::Transport;
use nid_engine::mailbox::Inbox;
use nid_engine::snapshot::{self, SnapshotManifest};
use raft::prelude::{Message, MessageType};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Decides whether a message may pass.
pub trait Filter: Send + Sync {
    /// True to deliver `m`.
    fn allow(&self, m: &Message) -> bool;
}

/// Drops every message between two groups of nodes (both directions).
pub struct Partition {
    /// One side.
    pub a: HashSet<u64>,
    /// The other side.
    pub b: HashSet<u64>,
}

impl Filter for Partition {
    fn allow(&self, m: &Message) -> bool {
        !((self.a.contains(&m.from) && self.b.contains(&m.to))
            || (self.b.contains(&m.from) && self.a.contains(&m.to)))
    }
}

/// Drops every message of some types.
pub struct DropTypes(pub Vec<MessageType>);

impl Filter for DropTypes {
    fn allow(&self, m: &Message) -> bool {
        !self.0.contains(&m.get_msg_type())
    }
}

/// The network.
#[derive(Default)]
pub struct Net {
    inboxes: RwLock<HashMap<u64, Inbox>>,
    snap_roots: RwLock<HashMap<u64, PathBuf>>,
    filters: RwLock<Vec<Arc<dyn Filter>>>,
    delay: Mutex<Option<Duration>>,
}

impl Net {
    /// Connects replica `id`.
    pub fn attach(&self, id: u64, inbox: Inbox, snap_root: PathBuf) {
        if let Ok(mut i) = self.inboxes.write() {
            i.insert(id, inbox);
        }
        if let Ok(mut r) = self.snap_roots.write() {
            r.insert(id, snap_root);
        }
    }

    /// Disconnects replica `id`.
    pub fn detach(&self, id: u64) {
        if let Ok(mut i) = self.inboxes.write() {
            i.remove(&id);
        }
    }

    /// Adds a filter.
    pub fn add_filter(&self, f: Arc<dyn Filter>) {
        if let Ok(mut filters) = self.filters.write() {
            filters.push(f);
        }
    }

    /// Removes every filter.
    pub fn clear_filters(&self) {
        if let Ok(mut filters) = self.filters.write() {
            filters.clear();
        }
    }

    /// Delays every message by `d` (None: immediate delivery).
    pub fn set_delay(&self, d: Option<Duration>) {
        if let Ok(mut delay) = self.delay.lock() {
            *delay = d;
        }
    }

    fn inbox(&self, id: u64) -> Option<Inbox> {
        self.inboxes.read().ok()?.get(&id).cloned()
    }

    fn deliver(&self, m: Message) {
        if !self.filters.read().map(|f| f.iter().all(|f| f.allow(&m))).unwrap_or(true) {
            return;
        }
        let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
        let (from, to) = (m.from, m.to);
        if is_snapshot && !self.copy_snapshot_files(&m) {
            if let Some(sender) = self.inbox(from) {
                sender.report_snapshot(to, false);
            }
            return;
        }
        let delivered = self.inbox(to).is_some_and(|i| i.deliver(m));
        if let Some(sender) = self.inbox(from) {
            if !delivered {
                sender.report_unreachable(to);
            }
            if is_snapshot {
                sender.report_snapshot(to, delivered);
            }
        }
    }

    fn copy_snapshot_files(&self, m: &Message) -> bool {
        let meta = m.get_snapshot().get_metadata();
        let Ok(manifest) = nid_proto::codec::decode::<SnapshotManifest>(&m.get_snapshot().data) else {
            return false;
        };
        let Ok(roots) = self.snap_roots.read() else { return false };
        let (Some(src), Some(dst)) = (roots.get(&m.from), roots.get(&m.to)) else { return false };
        let src = snapshot::gen_dir(src, meta.index, meta.term);
        let dst = snapshot::recv_dir(dst, meta.index, meta.term);
        let _ = std::fs::remove_dir_all(&dst);
        if std::fs::create_dir_all(&dst).is_err() {
            return false;
        }
        manifest.files.iter().all(|f| std::fs::copy(src.join(&f.name), dst.join(&f.name)).is_ok())
    }
}

/// A replica's transport on the in-memory network.
pub struct NetTransport(pub Arc<Net>);

impl Transport for NetTransport {
    fn send(&self, messages: Vec<Message>) {
        let delay = self.0.delay.lock().ok().and_then(|d| *d);
        match delay {
            None => messages.into_iter().for_each(|m| self.0.deliver(m)),
            Some(d) => {
                let net = self.0.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    messages.into_iter().for_each(|m| net.deliver(m));
                });
            }
        }
    }
}
