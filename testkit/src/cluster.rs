//! An in-process cell (after TiKV's test_raftstore): real replicas (real RocksDB, real Raft loops
//! on their own threads) of any state machine, wired through the filtered in-memory [`Net`], with
//! `must_*` helpers that wait for a condition or fail the test.

use crate::net::{Filter, Net, NetTransport, Partition};
use nid_engine::db::open_db;
use nid_engine::{BucketState, EngineError, Member, Node, NodeSetup, PeerConfig, PeerStatus, StateMachine};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long must_* helpers wait.
pub const WAIT: Duration = Duration::from_secs(15);

struct Running<SM: StateMachine> {
    node: Node<SM>,
    thread: std::thread::JoinHandle<()>,
    registry: prometheus::Registry,
}

/// An in-process cell of `SM` replicas.
pub struct Cluster<SM: StateMachine> {
    /// Per-replica tunables; edit before [`Cluster::start`] or a restart.
    pub config: PeerConfig,
    net: Arc<Net>,
    dirs: HashMap<u64, PathBuf>,
    root: tempfile::TempDir,
    running: HashMap<u64, Running<SM>>,
    initial: Vec<u64>,
    factory: Box<dyn Fn(u64) -> SM + Send + Sync>,
}

impl<SM: StateMachine> Cluster<SM> {
    /// A cell of `n` initial voters (node ids 1..=n) with fast ticks, not started yet; `factory`
    /// makes each replica's state machine.
    pub fn new(n: u64, factory: impl Fn(u64) -> SM + Send + Sync + 'static) -> Cluster<SM> {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dirs = (1..=n).map(|id| (id, root.path().join(format!("node-{id}")))).collect();
        let mut config = PeerConfig::new(1, 0);
        config.tick = Duration::from_millis(20);
        Cluster {
            config,
            net: Arc::new(Net::default()),
            dirs,
            root,
            running: HashMap::new(),
            initial: (1..=n).collect(),
            factory: Box::new(factory),
        }
    }

    /// Starts every initial replica.
    pub fn start(&mut self) {
        for id in self.initial.clone() {
            self.run_node(id);
        }
    }

    /// Starts (or restarts on its existing data) replica `id`. A replica not among the initial
    /// voters starts empty and waits to be added and sent a snapshot.
    pub fn run_node(&mut self, id: u64) {
        if let Err(e) = self.try_run_node(id) {
            panic!("start node {id}: {e}");
        }
    }

    /// Like [`Cluster::run_node`], but a replica that refuses to start says why instead of
    /// failing the test.
    pub fn try_run_node(&mut self, id: u64) -> Result<(), String> {
        assert!(!self.running.contains_key(&id), "node {id} already running");
        let dir = self.dirs.entry(id).or_insert_with(|| self.root.path().join(format!("node-{id}"))).clone();
        let db = open_db(&dir).unwrap_or_else(|e| panic!("open db of node {id}: {e}"));
        let mut config = self.config.clone();
        config.node_id = id;
        let registry = prometheus::Registry::new();
        let setup = NodeSetup {
            config,
            db,
            bootstrap_voters: if self.initial.contains(&id) { self.initial.clone() } else { Vec::new() },
            // Initial members know each other's addresses, as the flags of a real cell give them
            // (nothing dials them in process); a replica that joins later learns them from the
            // cell, by snapshot and membership changes.
            members: if self.initial.contains(&id) {
                self.initial
                    .iter()
                    .map(|&m| Member { id: m, address: format!("in-process:{m}"), zone: format!("zone-{m}") })
                    .collect()
            } else {
                Vec::new()
            },
            machine: (self.factory)(id),
            registry: registry.clone(),
        };
        let net = self.net.clone();
        let (node, thread) = Node::start(setup, |_, _, _| NetTransport(net)).map_err(|e| e.to_string())?;
        self.net.attach(id, node.inbox().clone(), node.snap_root().to_path_buf());
        self.running.insert(id, Running { node, thread, registry });
        Ok(())
    }

    /// Stops replica `id` (its thread exits, its DB closes); its data stays for [`Cluster::run_node`].
    pub fn stop_node(&mut self, id: u64) {
        self.net.detach(id);
        if let Some(r) = self.running.remove(&id) {
            r.node.shutdown();
            let _ = r.thread.join();
            // Wait until the last DB reference is gone so a restart can reopen it.
            let db = r.node.db().clone();
            drop(r.node);
            let deadline = Instant::now() + WAIT;
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
            let _ = std::fs::remove_dir_all(dir.with_extension("snap"));
        }
    }

    /// The handle of running replica `id`.
    pub fn node(&self, id: u64) -> Node<SM> {
        self.running.get(&id).map(|r| r.node.clone()).unwrap_or_else(|| panic!("node {id} not running"))
    }

    /// The metrics registry of running replica `id`.
    pub fn registry(&self, id: u64) -> prometheus::Registry {
        self.running.get(&id).map(|r| r.registry.clone()).unwrap_or_else(|| panic!("node {id} not running"))
    }

    /// The directory holding every replica's data.
    pub fn data_root(&self) -> &std::path::Path {
        self.root.path()
    }

    /// Ids of running replicas.
    pub fn running_ids(&self) -> Vec<u64> {
        let mut ids: Vec<_> = self.running.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Adds a network filter.
    pub fn add_filter(&self, f: Arc<dyn Filter>) {
        self.net.add_filter(f);
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
        self.net.set_delay(d);
    }

    /// Removes every filter.
    pub fn heal(&self) {
        self.net.clear_filters();
    }

    /// Status of a running replica.
    pub fn status(&self, id: u64) -> PeerStatus {
        self.node(id).status_blocking().unwrap_or_else(|e| panic!("status of node {id}: {e}"))
    }

    /// Waits until one replica among `among` leads and a majority of them agree.
    pub fn must_leader_among(&self, among: &[u64]) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses: Vec<PeerStatus> = among
                .iter()
                .filter_map(|id| self.running.get(id))
                .filter_map(|r| r.node.status_blocking().ok())
                .collect();
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

    /// Proposes through the current leader, retrying leader changes, until applied or `WAIT`.
    pub async fn must_propose(&self, command: &SM::Command) -> SM::Output {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = tokio::task::block_in_place(|| self.must_leader());
            match self.node(leader).propose(command, Duration::from_secs(3)).await {
                Ok(r) => return r,
                Err(e @ (EngineError::NotLeader { .. } | EngineError::Dropped | EngineError::Timeout)) => {
                    assert!(Instant::now() < deadline, "proposal kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("proposal failed: {e}"),
            }
        }
    }

    /// Sets bucket states through the leader, retrying leader changes.
    pub async fn must_set_buckets(&self, buckets: Vec<u32>, state: BucketState, table_version: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = tokio::task::block_in_place(|| self.must_leader());
            match self
                .node(leader)
                .set_buckets(buckets.clone(), state, table_version, Duration::from_secs(3))
                .await
            {
                Ok(index) => return index,
                Err(e @ (EngineError::NotLeader { .. } | EngineError::Dropped | EngineError::Timeout)) => {
                    assert!(Instant::now() < deadline, "bucket change kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bucket change failed: {e}"),
            }
        }
    }

    /// Gives the cell every bucket (as the control cell does at cluster creation).
    pub async fn must_own_all_buckets(&self) {
        self.must_set_buckets((0..u32::from(nid_proto::bucket::BUCKETS)).collect(), BucketState::Owned, 1)
            .await;
    }

    /// Waits until replica `id` has applied at least `index`.
    pub fn must_applied(&self, id: u64, index: u64) {
        let deadline = Instant::now() + WAIT;
        while self.status(id).applied < index {
            assert!(Instant::now() < deadline, "node {id} stuck at {:?}, want {index}", self.status(id));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl<SM: StateMachine> Drop for Cluster<SM> {
    fn drop(&mut self) {
        for id in self.running_ids() {
            self.stop_node(id);
        }
    }
}
