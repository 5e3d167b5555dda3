//! A running replica: [`Node::start`] opens the replica's storage and starts its Raft loop; the
//! [`Node`] handle proposes commands, waits for linearizable reads, opens consistent views of the
//! applied state, changes membership and reports status. Every method is safe to call from any
//! thread; async ones never block a runtime worker.

use crate::address_book::AddressBook;
use crate::buckets::{BucketRecord, BucketState, Buckets, DropBucket, IngestBucket, SetBuckets};
use crate::error::{EngineError, StorageError};
use crate::mailbox::{CONTROL_CAPACITY, Client, Control, Inbox, Payload, ReplyTo};
use crate::metrics::RaftMetrics;
use crate::peer::{self, Parts, PeerConfig, PeerStatus, Shared, Transport};
use crate::state::Member;
use crate::state_machine::{StateMachine, View};
use crate::storage::PeerStorage;
use nid_proto::bucket::BucketId;
use raft::prelude::{ConfChangeV2, ConfState};
use rocksdb::DB;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What [`Node::start`] needs.
pub struct NodeSetup<SM> {
    /// Tunables.
    pub config: PeerConfig,
    /// The replica's DB (see [`crate::db::open_db`]).
    pub db: Arc<DB>,
    /// The initial voters, when this replica is one of them and starts a new cell; empty for a
    /// replica that joins an existing cell (it waits for a snapshot).
    pub bootstrap_voters: Vec<u64>,
    /// Members known from configuration (they override the persisted address book).
    pub members: Vec<Member>,
    /// The state machine.
    pub machine: SM,
    /// Where the replication metrics are registered.
    pub registry: prometheus::Registry,
}

/// A handle to a running replica.
pub struct Node<SM: StateMachine> {
    config: Arc<PeerConfig>,
    client: crossbeam_channel::Sender<Client<SM::Output>>,
    inbox: Inbox,
    shared: Arc<Shared>,
    db: Arc<DB>,
    buckets: Arc<Buckets>,
    book: Arc<AddressBook>,
    metrics: RaftMetrics,
    snap_root: PathBuf,
}

impl<SM: StateMachine> Clone for Node<SM> {
    fn clone(&self) -> Self {
        Node {
            config: self.config.clone(),
            client: self.client.clone(),
            inbox: self.inbox.clone(),
            shared: self.shared.clone(),
            db: self.db.clone(),
            buckets: self.buckets.clone(),
            book: self.book.clone(),
            metrics: self.metrics.clone(),
            snap_root: self.snap_root.clone(),
        }
    }
}

impl<SM: StateMachine> Node<SM> {
    /// Opens the replica's storage and starts its Raft loop on its own thread. `transport` builds
    /// the transport from the loop's inbox (for its reports).
    pub fn start<T: Transport>(
        setup: NodeSetup<SM>,
        transport: impl FnOnce(Inbox, Arc<AddressBook>, PathBuf) -> T,
    ) -> Result<(Node<SM>, std::thread::JoinHandle<()>), StorageError> {
        let NodeSetup { config, db, bootstrap_voters, members, machine, registry } = setup;
        let storage = PeerStorage::open(db.clone(), &bootstrap_voters)?;
        let snap_root = storage.snap_root().to_path_buf();
        let book = Arc::new(AddressBook::load(&db, members)?);
        let buckets = Arc::new(Buckets::load(&db)?);
        let metrics =
            RaftMetrics::new(&registry).map_err(|e| StorageError::Halted(format!("metrics: {e}")))?;
        let (control_tx, control_rx) = crossbeam_channel::bounded(CONTROL_CAPACITY);
        let (client_tx, client_rx) = crossbeam_channel::bounded(config.client_queue);
        let inbox = Inbox { tx: control_tx };
        let transport = transport(inbox.clone(), book.clone(), snap_root.clone());
        let shared = Arc::new(Shared::default());
        let parts = Parts {
            storage,
            machine,
            transport,
            control: control_rx,
            client: client_rx,
            shared: shared.clone(),
            buckets: buckets.clone(),
            book: book.clone(),
            metrics: metrics.clone(),
        };
        let thread = peer::spawn(config.clone(), parts, &crate::logger::raft_logger())?;
        let node = Node {
            config: Arc::new(config),
            client: client_tx,
            inbox,
            shared,
            db,
            buckets,
            book,
            metrics,
            snap_root,
        };
        Ok((node, thread))
    }

    /// This replica's node id.
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// Its cell.
    pub fn cell_id(&self) -> u64 {
        self.config.cell_id
    }

    /// Hands client work to the loop without waiting: refused at once (`Busy`) when the client
    /// queue is full, or `Stopped` when the loop is gone.
    pub fn submit(&self, message: Client<SM::Output>) -> Result<(), EngineError> {
        // A stopped loop may not have dropped its inbox yet: refuse at once rather than queue work
        // nobody will take.
        if self.shared.stopped.is_cancelled() {
            return Err(EngineError::Stopped);
        }
        self.client.try_send(message).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => {
                self.metrics.proposals_failed.with_label_values(&["busy"]).inc();
                EngineError::Busy { retry_after: Duration::from_millis(20) }
            }
            crossbeam_channel::TrySendError::Disconnected(_) => EngineError::Stopped,
        })
    }

    /// Proposes a command and waits (until `timeout`) for its output once applied.
    pub async fn propose(&self, command: &SM::Command, timeout: Duration) -> Result<SM::Output, EngineError> {
        self.propose_encoded(SM::encode(command), timeout).await
    }

    /// Proposes an already encoded command.
    pub async fn propose_encoded(
        &self,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<SM::Output, EngineError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        self.submit(Client::Propose {
            payload: Payload::Machine(bytes),
            reply: ReplyTo::Machine(reply),
            deadline,
        })?;
        wait(rx, timeout).await
    }

    /// Sets the ownership state of `buckets` through the log; returns the index it applied at.
    pub async fn set_buckets(
        &self,
        buckets: Vec<u32>,
        state: BucketState,
        table_version: u64,
        timeout: Duration,
    ) -> Result<u64, EngineError> {
        let set = SetBuckets { buckets, state: state as i32, table_version, track_changes: false };
        self.propose_engine(Payload::SetBuckets(set), timeout).await
    }

    /// Keeps `buckets` OWNED and starts tracking their changes for a move's catch-up (markers
    /// start afresh); returns the index it applied at: every change after it is marked.
    pub async fn track_buckets(
        &self,
        buckets: Vec<u32>,
        table_version: u64,
        timeout: Duration,
    ) -> Result<u64, EngineError> {
        let set =
            SetBuckets { buckets, state: BucketState::Owned as i32, table_version, track_changes: true };
        self.propose_engine(Payload::SetBuckets(set), timeout).await
    }

    /// Writes a chunk of an IMPORTING bucket's copied data through the log; returns its index.
    pub async fn ingest(&self, chunk: IngestBucket, timeout: Duration) -> Result<u64, EngineError> {
        self.propose_engine(Payload::Ingest(chunk), timeout).await
    }

    /// Deletes the data and change markers of NOT_OWNED or IMPORTING buckets through the log (all
    /// or none).
    pub async fn drop_buckets(&self, buckets: &[u32], timeout: Duration) -> Result<u64, EngineError> {
        let Some((&bucket, more)) = buckets.split_first() else {
            return Err(EngineError::Malformed("no bucket to drop".into()));
        };
        self.propose_engine(Payload::Drop(DropBucket { bucket, more: more.to_vec() }), timeout).await
    }

    async fn propose_engine(&self, payload: Payload, timeout: Duration) -> Result<u64, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Client::Propose {
            payload,
            reply: ReplyTo::Buckets(reply),
            deadline: Instant::now() + timeout,
        })?;
        wait(rx, timeout).await
    }

    /// Waits until the applied state reflects every write committed before the call (ReadIndex);
    /// returns the read index.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<u64, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Client::Read { reply, deadline: Instant::now() + timeout })?;
        wait(rx, timeout).await
    }

    /// Runs `f` on one consistent view of the applied state.
    pub fn view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        f(&View::new(&self.db))
    }

    /// The ownership record of `bucket`.
    pub fn bucket(&self, bucket: BucketId) -> BucketRecord {
        self.buckets.get(bucket)
    }

    /// Buckets per state.
    pub fn bucket_counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.buckets.counts()
    }

    /// Proposes a membership change and waits until it is applied.
    pub async fn change_membership(
        &self,
        change: ConfChangeV2,
        timeout: Duration,
    ) -> Result<ConfState, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.inbox.send(Control::ConfChange { change, reply, deadline: Instant::now() + timeout })?;
        wait(rx, timeout).await
    }

    /// Asks the loop to hand leadership to `to` (None: the most up-to-date voter).
    pub fn transfer_leader(&self, to: Option<u64>) -> Result<(), EngineError> {
        self.inbox.send(Control::TransferLeader { to })
    }

    /// The replica's Raft status.
    pub async fn status(&self) -> Result<PeerStatus, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.inbox.send(Control::Status(reply))?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(EngineError::Stopped),
            Err(_) => Err(EngineError::Timeout),
        }
    }

    /// Blocking form of [`Node::status`]; usable from any thread, inside a runtime or not.
    pub fn status_blocking(&self) -> Result<PeerStatus, EngineError> {
        let (reply, mut rx) = oneshot::channel();
        self.inbox.send(Control::Status(reply))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match rx.try_recv() {
                Ok(status) => return Ok(status),
                Err(oneshot::error::TryRecvError::Closed) => return Err(EngineError::Stopped),
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() > deadline => {
                    return Err(EngineError::Timeout);
                }
                Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// The leader this replica believes in.
    pub fn leader(&self) -> Option<u64> {
        match self.shared.leader_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Whether this replica believes it leads.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.config.node_id)
    }

    /// The applied index.
    pub fn applied(&self) -> u64 {
        self.shared.applied.load(Ordering::Relaxed)
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Relaxed)
    }

    /// The loop's inbox (the receiving transport delivers here).
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The cell's members.
    pub fn book(&self) -> &Arc<AddressBook> {
        &self.book
    }

    /// The replica's DB.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// Where the replica keeps snapshot files.
    pub fn snap_root(&self) -> &Path {
        &self.snap_root
    }

    /// The replication metrics.
    pub fn metrics(&self) -> &RaftMetrics {
        &self.metrics
    }

    /// Cancelled once the Raft loop has stopped (a storage failure, a halted state machine, a panic
    /// or a shutdown).
    pub fn stopped(&self) -> CancellationToken {
        self.shared.stopped.clone()
    }

    /// Why the loop stopped, when a failure stopped it.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Asks the loop to stop.
    pub fn shutdown(&self) {
        let _ = self.inbox.tx.send(Control::Shutdown);
    }
}

async fn wait<T>(rx: oneshot::Receiver<Result<T, EngineError>>, timeout: Duration) -> Result<T, EngineError> {
    // The loop answers at the deadline itself; the margin only covers a stopped loop.
    match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(EngineError::Stopped),
        Err(_) => Err(EngineError::Timeout),
    }
}
