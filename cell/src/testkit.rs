//! An in-process cell for tests (after TiKV's test_raftstore): real replicas (real RocksDB, real
//! Raft loops on their own threads) wired through an in-memory transport whose filters drop,
//! delay, partition or isolate traffic, plus `must_*` helpers that wait for a condition or fail.

use crate::command::{AuthPolicy, BucketState, Command, CommandResult};
use crate::crypto::Keyring;
use crate::enroll;
use crate::fsm::StateMachine;
use crate::handlers::Clock;
use crate::metrics::CellMetrics;
use crate::peer::{self, PeerConfig, PeerError, PeerHandle, PeerMsg, PeerStatus, Transport};
use crate::service::CellContext;
use crate::storage::{PeerStorage, open_db};
use crate::transport::AddressBook;
use nid_proto::ids::IdScheme;
use nid_proto::v1::EnrollRequest;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::{CellRequest, RouteHeader};
use raft::prelude::{Message, MessageType};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

struct Net {
    handles: RwLock<HashMap<u64, PeerHandle>>,
    snap_roots: RwLock<HashMap<u64, PathBuf>>,
    filters: RwLock<Vec<Arc<dyn Filter>>>,
    delay: Mutex<Option<Duration>>,
}

impl Net {
    fn deliver(&self, m: Message) {
        if !self.filters.read().map(|f| f.iter().all(|f| f.allow(&m))).unwrap_or(true) {
            return;
        }
        let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
        let (from, to) = (m.from, m.to);
        // What the gRPC transport streams as files, copied here from the sender's generated
        // directory into the receiver's received one.
        if is_snapshot && !self.copy_snapshot_files(&m) {
            if let Ok(handles) = self.handles.read()
                && let Some(sender) = handles.get(&from)
            {
                let _ = sender.send(PeerMsg::SnapshotReport { to, ok: false });
            }
            return;
        }
        let handles = match self.handles.read() {
            Ok(h) => h,
            Err(_) => return,
        };
        let delivered = handles.get(&to).is_some_and(|h| h.send(PeerMsg::Raft(Box::new(m))).is_ok());
        if let Some(sender) = handles.get(&from) {
            if !delivered {
                let _ = sender.send(PeerMsg::Unreachable(to));
            }
            if is_snapshot {
                let _ = sender.send(PeerMsg::SnapshotReport { to, ok: delivered });
            }
        }
    }
}

impl Net {
    fn copy_snapshot_files(&self, m: &Message) -> bool {
        let meta = m.get_snapshot().get_metadata();
        let Ok(manifest) = crate::codec::decode::<crate::snapshot::SnapshotManifest>(&m.get_snapshot().data)
        else {
            return false;
        };
        let Ok(roots) = self.snap_roots.read() else { return false };
        let (Some(src), Some(dst)) = (roots.get(&m.from), roots.get(&m.to)) else { return false };
        let src = crate::snapshot::gen_dir(src, meta.index, meta.term);
        let dst = crate::snapshot::recv_dir(dst, meta.index, meta.term);
        let _ = std::fs::remove_dir_all(&dst);
        if std::fs::create_dir_all(&dst).is_err() {
            return false;
        }
        manifest.files.iter().all(|f| std::fs::copy(src.join(&f.name), dst.join(&f.name)).is_ok())
    }
}

struct NetTransport(Arc<Net>);

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

struct Running {
    handle: PeerHandle,
    thread: std::thread::JoinHandle<()>,
    db: Arc<rocksdb::DB>,
    metrics: Arc<CellMetrics>,
}

/// An in-process cell.
pub struct Cluster {
    /// Per-replica tunables; edit before [`Cluster::start`] or a restart.
    pub config: PeerConfig,
    net: Arc<Net>,
    dirs: HashMap<u64, PathBuf>,
    _root: tempfile::TempDir,
    running: HashMap<u64, Running>,
    keyring: Arc<Keyring>,
    scheme: IdScheme,
    initial: Vec<u64>,
    /// The clock every replica's service stamps commands with; tests move it forward.
    pub clock: Arc<Clock>,
    /// Authentication policy of the services.
    pub auth_policy: AuthPolicy,
}

/// How long must_* helpers wait.
pub const WAIT: Duration = Duration::from_secs(15);

impl Cluster {
    /// A cell of `n` initial voters (node ids 1..=n) with fast ticks, not started yet.
    pub fn new(n: u64) -> Cluster {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dirs = (1..=n).map(|id| (id, root.path().join(format!("node-{id}")))).collect();
        let mut config = PeerConfig::new(1, 0);
        config.tick = Duration::from_millis(20);
        Cluster {
            config,
            net: Arc::new(Net {
                handles: RwLock::default(),
                snap_roots: RwLock::default(),
                filters: RwLock::default(),
                delay: Mutex::default(),
            }),
            dirs,
            _root: root,
            running: HashMap::new(),
            keyring: Arc::new(Keyring::dev()),
            scheme: IdScheme::dev(),
            initial: (1..=n).collect(),
            clock: Arc::new(Clock::default()),
            auth_policy: AuthPolicy::default(),
        }
    }

    /// Starts every replica.
    pub fn start(&mut self) {
        for id in self.initial.clone() {
            self.run_node(id);
        }
    }

    /// Starts (or restarts on its existing data) replica `id`. A replica not among the initial
    /// voters starts empty and waits to be added and sent a snapshot.
    pub fn run_node(&mut self, id: u64) {
        assert!(!self.running.contains_key(&id), "node {id} already running");
        let dir = self.dirs.entry(id).or_insert_with(|| self._root.path().join(format!("node-{id}"))).clone();
        let db = open_db(&dir).unwrap_or_else(|e| panic!("open db of node {id}: {e}"));
        let voters = if self.initial.contains(&id) { self.initial.clone() } else { Vec::new() };
        let storage = PeerStorage::open(db.clone(), &voters).unwrap_or_else(|e| panic!("open storage: {e}"));
        if let Ok(mut roots) = self.net.snap_roots.write() {
            roots.insert(id, storage.snap_root().to_path_buf());
        }
        let fsm = StateMachine::new(db.clone(), self.keyring.clone());
        let metrics = Arc::new(CellMetrics::new());
        let mut config = self.config.clone();
        config.node_id = id;
        let (handle, thread) = peer::spawn(
            config,
            storage,
            fsm,
            NetTransport(self.net.clone()),
            metrics.clone(),
            Arc::new(AddressBook::default()),
            &crate::raft_logger(),
        )
        .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
        if let Ok(mut h) = self.net.handles.write() {
            h.insert(id, handle.clone());
        }
        self.running.insert(id, Running { handle, thread, db, metrics });
    }

    /// Stops replica `id` (its thread exits, its DB closes); its data stays for [`Cluster::run_node`].
    pub fn stop_node(&mut self, id: u64) {
        if let Ok(mut h) = self.net.handles.write() {
            h.remove(&id);
        }
        if let Some(r) = self.running.remove(&id) {
            let _ = r.handle.send(PeerMsg::Shutdown);
            let _ = r.thread.join();
            drop(r.handle);
            // Wait until the last DB reference is gone so a restart can reopen it.
            let deadline = Instant::now() + WAIT;
            let db = r.db;
            while Arc::strong_count(&db) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Deletes a stopped replica's data directory.
    pub fn wipe_node(&mut self, id: u64) {
        assert!(!self.running.contains_key(&id), "stop node {id} first");
        if let Some(dir) = self.dirs.get(&id) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The handle of a running replica.
    pub fn handle(&self, id: u64) -> PeerHandle {
        self.running.get(&id).map(|r| r.handle.clone()).unwrap_or_else(|| panic!("node {id} not running"))
    }

    /// The metrics of a running replica.
    pub fn metrics(&self, id: u64) -> Arc<CellMetrics> {
        self.running.get(&id).map(|r| r.metrics.clone()).unwrap_or_else(|| panic!("node {id} not running"))
    }

    /// The directory holding every replica's data (RocksDB files, snapshots).
    pub fn data_root(&self) -> &std::path::Path {
        self._root.path()
    }

    /// The raw DB of running replica `id` (tests that tamper with stored bytes).
    pub fn db(&self, id: u64) -> Arc<rocksdb::DB> {
        self.running.get(&id).map(|r| r.db.clone()).unwrap_or_else(|| panic!("node {id} not running"))
    }

    /// A state machine over replica `id`'s DB for reading its applied state.
    pub fn fsm(&self, id: u64) -> StateMachine {
        let db =
            self.running.get(&id).map(|r| r.db.clone()).unwrap_or_else(|| panic!("node {id} not running"));
        StateMachine::new(db, self.keyring.clone())
    }

    /// The gRPC service context of running replica `id` (what `nid-cell` serves, minus the network).
    pub fn context(&self, id: u64) -> Arc<CellContext> {
        let r = self.running.get(&id).unwrap_or_else(|| panic!("node {id} not running"));
        Arc::new(CellContext {
            cell_id: 1,
            node_id: id,
            peer: r.handle.clone(),
            fsm: StateMachine::new(r.db.clone(), self.keyring.clone()),
            keyring: self.keyring.clone(),
            scheme: self.scheme.clone(),
            book: Arc::new(AddressBook::default()),
            metrics: r.metrics.clone(),
            clock: self.clock.clone(),
            auth_policy: self.auth_policy,
        })
    }

    /// Executes `operation` through the `Cell` service of the current leader (as the router would,
    /// with `partner` authenticated for `allowed` auth types), retrying leader changes.
    pub async fn execute(
        &self,
        operation: Operation,
        partner: Option<(&str, &[i32])>,
    ) -> Result<CellResult, tonic::Status> {
        use crate::service::CellService;
        use nid_proto::v1::cell_server::Cell as _;
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = tokio::task::block_in_place(|| self.must_leader());
            let service = CellService(self.context(leader));
            let request = CellRequest {
                route: partner.map(|(id, allowed)| RouteHeader {
                    bucket: 0,
                    table_version: 1,
                    partner_id: id.to_owned(),
                    partner_allowed: allowed.to_vec(),
                }),
                operation: Some(operation.clone()),
            };
            match service.execute(tonic::Request::new(request)).await {
                Ok(r) => return r.into_inner().result.ok_or_else(|| tonic::Status::internal("empty result")),
                Err(e)
                    if nid_proto::error::RoutingHint::from_status(&e).is_some()
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ids of running replicas.
    pub fn running_ids(&self) -> Vec<u64> {
        let mut ids: Vec<_> = self.running.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Adds a network filter.
    pub fn add_filter(&self, f: Arc<dyn Filter>) {
        if let Ok(mut filters) = self.net.filters.write() {
            filters.push(f);
        }
    }

    /// Cuts `a` from `b` both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        self.add_filter(Arc::new(Partition {
            a: a.iter().copied().collect(),
            b: b.iter().copied().collect(),
        }));
    }

    /// Cuts `id` from every other replica.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self.dirs.keys().copied().filter(|&o| o != id).collect();
        self.partition(&[id], &others);
    }

    /// Delays every message by `d` (None restores immediate delivery).
    pub fn set_delay(&self, d: Option<Duration>) {
        if let Ok(mut delay) = self.net.delay.lock() {
            *delay = d;
        }
    }

    /// Removes every filter.
    pub fn heal(&self) {
        if let Ok(mut filters) = self.net.filters.write() {
            filters.clear();
        }
    }

    /// Status of a running replica.
    pub fn status(&self, id: u64) -> PeerStatus {
        self.handle(id).status_blocking().unwrap_or_else(|e| panic!("status of node {id}: {e}"))
    }

    /// Waits until one running replica among `among` is leader and the others (that can hear it) agree.
    pub fn must_leader_among(&self, among: &[u64]) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses: Vec<PeerStatus> =
                among.iter().filter_map(|id| self.handle(*id).status_blocking().ok()).collect();
            let leaders: Vec<u64> =
                statuses.iter().filter(|s| s.role == "Leader").map(|s| s.node_id).collect();
            if let [leader] = leaders.as_slice() {
                let agree = statuses.iter().filter(|s| s.leader_id == *leader).count();
                if agree * 2 > among.len() {
                    return *leader;
                }
            }
            assert!(Instant::now() < deadline, "no leader among {among:?}: {statuses:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a leader among all running replicas.
    pub fn must_leader(&self) -> u64 {
        self.must_leader_among(&self.running_ids())
    }

    /// Proposes through the current leader, retrying on leader changes, until applied or `WAIT`.
    pub async fn must_propose(&self, command: Command) -> CommandResult {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = tokio::task::block_in_place(|| self.must_leader());
            match self.handle(leader).propose(command.clone(), Duration::from_secs(3)).await {
                Ok(r) => return r,
                Err(e @ (PeerError::NotLeader { .. } | PeerError::Dropped | PeerError::Timeout)) => {
                    assert!(Instant::now() < deadline, "proposal kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("proposal failed: {e}"),
            }
        }
    }

    /// Gives the cell every bucket (as the control cell would at cluster creation).
    pub async fn must_own_all_buckets(&self) {
        let buckets = (0..nid_proto::bucket::BUCKETS).collect();
        let r = self
            .must_propose(Command::SetBuckets { buckets, state: BucketState::Owned, table_version: 1 })
            .await;
        assert_eq!(r, CommandResult::BucketsSet);
    }

    /// Prepares an enrolment command for `rid` as the leader would.
    pub fn enroll_command(&self, rid: &str) -> Command {
        self.enroll_command_for(&sample_request(rid))
    }

    /// Prepares an enrolment command for `request` as the leader would.
    pub fn enroll_command_for(&self, request: &EnrollRequest) -> Command {
        Command::Enroll(
            enroll::prepare(request, &self.keyring, &self.scheme, 1_700_000_000_000)
                .unwrap_or_else(|_| panic!("prepare enrolment")),
        )
    }

    /// Enrols `rid` through the leader; returns its UIN.
    pub async fn must_enroll(&self, rid: &str) -> String {
        match self.must_propose(self.enroll_command(rid)).await {
            CommandResult::Enrolled { uin, .. } => uin,
            other => panic!("enrol failed: {other:?}"),
        }
    }

    /// Waits until replica `id` has applied at least `index`.
    pub fn must_applied(&self, id: u64, index: u64) {
        let deadline = Instant::now() + WAIT;
        while self.status(id).applied < index {
            assert!(Instant::now() < deadline, "node {id} stuck at {:?}, want {index}", self.status(id));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until replica `id` holds identity `uin` for `rid` in its applied state.
    pub fn must_have_identity(&self, id: u64, rid: &str, uin: &str) {
        let bucket = enroll::bucket_of_rid(rid);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(record)) = self.fsm(id).get_identity(bucket, uin) {
                assert_eq!(record.uin, uin);
                return;
            }
            assert!(Instant::now() < deadline, "node {id} never applied the identity");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.running_ids() {
            self.stop_node(id);
        }
    }
}

/// A valid enrolment request for `rid`.
pub fn sample_request(rid: &str) -> EnrollRequest {
    EnrollRequest {
        rid: rid.to_owned(),
        demographics: Some(nid_proto::v1::Demographics {
            full_name: "Asha Example".into(),
            date_of_birth: "1988-07-14".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
