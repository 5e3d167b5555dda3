//! One replica's Raft loop, on a dedicated thread (never on tokio workers: it fsyncs).
//!
//! Each turn drains every control message (peers' Raft traffic first), then a bounded amount of
//! client work, ticks, packs the turn's proposals into as few entries as fit the count and byte
//! budgets (group commit: one fsync for many commands), issues one ReadIndex for the turn's reads,
//! then handles one Ready in the order raft-rs requires (see ../shared/guides/raft-rs-rocksdb.md):
//! leader messages -> snapshot install -> apply committed -> one synced write of entries and hard
//! state -> persisted messages -> advance -> commit index -> light-ready messages and entries ->
//! advance_apply.
//!
//! A storage failure, or a state machine that cannot go on, stops the loop: the replica reports
//! itself stopped ([`crate::Node::stopped`]) instead of limping on or diverging.

use crate::address_book::AddressBook;
use crate::buckets::{self, BucketRecord, BucketState, Buckets, DropBucket, IngestBucket, SetBuckets};
use crate::db::cf;
use crate::error::{EngineError, StorageError};
use crate::mailbox::{Client, Control, Payload, Reply, ReplyTo};
use crate::metrics::RaftMetrics;
use crate::state::{Member, Members};
use crate::state_machine::{ApplyContext, Overlay, StateMachine, View};
use crate::storage::PeerStorage;
use nid_proto::bucket::BucketId;
use nid_proto::codec;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, ReadOnlyOption, StateRole};
use rocksdb::WriteBatch;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One Raft entry's payload: the proposals the leader batched into it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryBatch {
    /// The proposals, applied in order.
    #[prost(message, repeated, tag = "1")]
    pub proposals: Vec<EntryProposal>,
}

/// One proposal in an entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryProposal {
    /// What it is.
    #[prost(oneof = "entry_proposal::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<entry_proposal::Kind>,
}

/// The variants of [`EntryProposal`].
pub mod entry_proposal {
    /// A proposal's kind.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// An encoded state-machine command.
        #[prost(bytes = "vec", tag = "1")]
        Machine(Vec<u8>),
        /// An ownership change.
        #[prost(message, tag = "2")]
        SetBuckets(super::SetBuckets),
        /// Copied data of an importing bucket.
        #[prost(message, tag = "3")]
        Ingest(super::IngestBucket),
        /// Deletion of a bucket's data.
        #[prost(message, tag = "4")]
        Drop(super::DropBucket),
    }
}

/// A view of the replica's Raft state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// This replica.
    pub node_id: u64,
    /// Current term.
    pub term: u64,
    /// The leader, 0 when unknown.
    pub leader_id: u64,
    /// Role name (Leader, Follower, Candidate, PreCandidate).
    pub role: String,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// First index in the log.
    pub first_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Matched index per peer (leader only).
    pub matched: Vec<(u64, u64)>,
}

/// Sends Raft messages to peers. Implementations must not block: drop (and report unreachable)
/// rather than wait.
pub trait Transport: Send + 'static {
    /// Sends messages to their `to` peers.
    fn send(&self, messages: Vec<Message>);
}

/// Tunables of one replica.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The cell.
    pub cell_id: u64,
    /// This replica.
    pub node_id: u64,
    /// The tick interval.
    pub tick: Duration,
    /// Election timeout in ticks.
    pub election_tick: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_tick: usize,
    /// Compact the log once it holds more than this many applied entries.
    pub log_gc_threshold: u64,
    /// Entries kept behind the applied index when compacting.
    pub log_gc_keep: u64,
    /// Compact the log once its entries exceed this many bytes (whatever their count).
    pub log_gc_size: u64,
    /// Past this many bytes, compact what every replica already holds (see `maybe_compact`).
    pub log_gc_soft_size: u64,
    /// Most proposals in one entry.
    pub max_commands_per_entry: usize,
    /// Most bytes of proposals in one entry (a single larger proposal still goes alone).
    pub max_entry_bytes: usize,
    /// Capacity of the client queue (proposals and reads waiting for the loop).
    pub client_queue: usize,
    /// Most client messages taken per turn (the rest wait for the next turn, after Raft traffic).
    pub client_per_turn: usize,
}

impl PeerConfig {
    /// Production defaults for `node_id` of `cell_id`.
    pub fn new(cell_id: u64, node_id: u64) -> PeerConfig {
        PeerConfig {
            cell_id,
            node_id,
            tick: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 2,
            log_gc_threshold: 20_000,
            log_gc_keep: 5_000,
            log_gc_size: 64 << 20,
            log_gc_soft_size: 4 << 20,
            max_commands_per_entry: 1024,
            max_entry_bytes: 4 << 20,
            client_queue: 16_384,
            client_per_turn: 4_096,
        }
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.node_id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 64 << 20,
            max_committed_size_per_ready: 16 << 20,
            batch_append: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        }
    }
}

/// State shared between the loop and its handles, readable without a round trip.
#[derive(Debug, Default)]
pub struct Shared {
    /// Current leader (0 when unknown).
    pub leader_id: AtomicU64,
    /// Applied index.
    pub applied: AtomicU64,
    /// Current term.
    pub term: AtomicU64,
    /// Why the loop stopped, when it stopped on a failure.
    pub failure: Mutex<Option<String>>,
    /// Cancelled once the loop has stopped, for whatever reason.
    pub stopped: CancellationToken,
}

/// Why this replica must stop, when `m` proves that its log lost entries: a leader's heartbeat
/// carries the commit index up to what it knows this replica stored (and synced before saying so),
/// so one beyond the last index here means the data directory was wiped, replaced by an older copy,
/// or lost writes the disk acknowledged. Rejoining like this is unsafe (the replica also forgot
/// its votes): it must be replaced under a new node id.
fn lost_log(m: &Message, last_index: u64) -> Option<String> {
    (m.get_msg_type() == MessageType::MsgHeartbeat && m.commit > last_index).then(|| {
        format!(
            "the leader (node {}) counts entries up to index {} as stored here, but the log ends at \
             {last_index}: this replica's data was lost or restored from an old copy; do not restart \
             it under this node id, replace it under a new one (RUNBOOK: a replica that lost its data)",
            m.from, m.commit
        )
    })
}

/// Marks the replica stopped when the loop thread ends, by returning or by panicking.
struct StopGuard {
    shared: Arc<Shared>,
    metrics: RaftMetrics,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(mut f) = self.shared.failure.lock()
            && f.is_none()
        {
            *f = Some("the Raft loop panicked".into());
        }
        self.shared.leader_id.store(0, Ordering::Relaxed);
        self.metrics.is_leader.set(0);
        self.metrics.has_leader.set(0);
        self.metrics.running.set(0);
        self.shared.stopped.cancel();
    }
}

enum Applied<O> {
    Machine(O),
    Buckets(u64),
}

enum PendingKind<O> {
    Proposals(Vec<Option<(ReplyTo<O>, Instant)>>),
    ConfChange(Option<(Reply<ConfState>, Instant)>),
}

struct Pending<O> {
    index: u64,
    term: u64,
    kind: PendingKind<O>,
}

enum Outcome<O> {
    Proposals(Vec<Result<Applied<O>, EngineError>>),
    Malformed(String),
    ConfChange(Result<ConfState, String>),
}

/// Reads waiting for one ReadIndex answer, each with its deadline.
type ReadWaiters = Vec<(Reply<u64>, Instant)>;

struct ReadBatch {
    waiters: ReadWaiters,
    issued: Instant,
}

const READ_RETRY: Duration = Duration::from_millis(300);
const CONTROL_PER_TURN: usize = 16_384;

/// What the loop needs besides its configuration.
pub(crate) struct Parts<SM: StateMachine, T: Transport> {
    pub storage: PeerStorage,
    pub machine: SM,
    pub transport: T,
    pub control: crossbeam_channel::Receiver<Control>,
    pub client: crossbeam_channel::Receiver<Client<SM::Output>>,
    pub shared: Arc<Shared>,
    pub buckets: Arc<Buckets>,
    pub book: Arc<AddressBook>,
    pub metrics: RaftMetrics,
}

/// Starts a replica's loop on its own thread.
pub(crate) fn spawn<SM: StateMachine, T: Transport>(
    config: PeerConfig,
    parts: Parts<SM, T>,
    logger: &slog::Logger,
) -> Result<std::thread::JoinHandle<()>, StorageError> {
    let Parts { storage, mut machine, transport, control, client, shared, buckets, book, metrics } = parts;
    let applied = storage.apply_state().applied_index;
    machine.restore(&View::new(storage.db()))?;
    let node = RawNode::new(&config.raft_config(applied), storage, logger)
        .map_err(|e| StorageError::Halted(format!("raft: {e}")))?;
    shared.applied.store(applied, Ordering::Relaxed);
    metrics.running.set(1);
    let name = format!("raft-{}-{}", config.cell_id, config.node_id);
    let mut peer = Peer {
        config,
        node,
        machine,
        transport,
        metrics,
        book,
        buckets,
        shared,
        batch: Vec::new(),
        reads: Vec::new(),
        pending: VecDeque::new(),
        reads_in_flight: HashMap::new(),
        reads_waiting_apply: VecDeque::new(),
        next_read_ctx: 1,
        last_role: StateRole::Follower,
        last_leader: 0,
    };
    peer.publish_buckets();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _guard = StopGuard { shared: peer.shared.clone(), metrics: peer.metrics.clone() };
            peer.run(&control, &client);
        })
        .map_err(|e| StorageError::Halted(format!("spawn the Raft thread: {e}")))
}

struct Peer<SM: StateMachine, T: Transport> {
    config: PeerConfig,
    node: RawNode<PeerStorage>,
    machine: SM,
    transport: T,
    metrics: RaftMetrics,
    book: Arc<AddressBook>,
    buckets: Arc<Buckets>,
    shared: Arc<Shared>,
    batch: Vec<(Payload, ReplyTo<SM::Output>, Instant)>,
    reads: ReadWaiters,
    pending: VecDeque<Pending<SM::Output>>,
    reads_in_flight: HashMap<u64, ReadBatch>,
    reads_waiting_apply: VecDeque<(u64, ReadWaiters)>,
    next_read_ctx: u64,
    last_role: StateRole,
    last_leader: u64,
}

impl<SM: StateMachine, T: Transport> Peer<SM, T> {
    fn run(
        &mut self,
        control: &crossbeam_channel::Receiver<Control>,
        client: &crossbeam_channel::Receiver<Client<SM::Output>>,
    ) {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.config.tick.saturating_sub(last_tick.elapsed());
            let mut stop = false;
            crossbeam_channel::select! {
                recv(control) -> m => match m {
                    Ok(m) => stop |= self.on_control(m),
                    Err(_) => stop = true,
                },
                recv(client) -> m => if let Ok(m) = m { self.on_client(m) },
                default(wait) => {}
            }
            // Raft traffic first, all of it; then a bounded share of client work.
            for _ in 0..CONTROL_PER_TURN {
                match control.try_recv() {
                    Ok(m) => stop |= self.on_control(m),
                    Err(_) => break,
                }
            }
            for _ in 0..self.config.client_per_turn {
                match client.try_recv() {
                    Ok(m) => self.on_client(m),
                    Err(_) => break,
                }
            }
            self.metrics.client_queue.set(client.len() as i64);
            if stop {
                break;
            }
            if last_tick.elapsed() >= self.config.tick {
                self.node.tick();
                last_tick = Instant::now();
                self.expire(Instant::now());
            }
            self.flush_proposals();
            self.flush_reads();
            if let Err(e) = self.on_ready() {
                tracing::error!(cell = self.config.cell_id, node = self.config.node_id, error = %e,
                    "replica stopped: it can no longer apply the log");
                if let Ok(mut f) = self.shared.failure.lock() {
                    *f = Some(e.to_string());
                }
                break;
            }
        }
        // Dropping the pending replies answers every waiter with Stopped.
    }

    fn on_client(&mut self, m: Client<SM::Output>) {
        match m {
            Client::Propose { payload, reply, deadline } => self.batch.push((payload, reply, deadline)),
            Client::Read { reply, deadline } => self.reads.push((reply, deadline)),
        }
    }

    /// Stops serving for good: logs and counts `failure`, and records it (synced) so that no
    /// restart serves again; a leader elected later would heartbeat with commit 0 and let the
    /// replica through.
    fn stop_for_lost_log(&mut self, failure: String) {
        tracing::error!(cell = self.config.cell_id, node = self.config.node_id, %failure,
            "replica stopped: its log lost entries its cell counts as stored here");
        self.metrics.messages_rejected.with_label_values(&["log_lost"]).inc();
        let db = self.node.store().db().clone();
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        let marked = cf(&db, crate::keys::CF_META).and_then(|meta| {
            db.put_cf_opt(meta, crate::keys::LOG_LOST, failure.as_bytes(), &sync).map_err(Into::into)
        });
        if let Err(e) = marked {
            tracing::error!(error = %e, "could not record that the log was lost");
        }
        if let Ok(mut f) = self.shared.failure.lock() {
            *f = Some(failure);
        }
    }

    /// Handles one control message; true means stop.
    fn on_control(&mut self, m: Control) -> bool {
        match m {
            Control::Raft(m) => {
                if let Some(failure) = lost_log(&m, self.node.raft.raft_log.last_index()) {
                    // raft-rs would panic on this heartbeat; the replica stops and says why.
                    self.stop_for_lost_log(failure);
                    return true;
                }
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft message not stepped");
                }
            }
            Control::ConfChange { change, reply, deadline } => {
                self.propose_conf_change(change, reply, deadline)
            }
            Control::TransferLeader { to } => self.transfer_leader(to),
            Control::Unreachable(id) => self.node.report_unreachable(id),
            Control::SnapshotReport { to, ok } => {
                let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.node.report_snapshot(to, status);
                self.metrics.snapshots.with_label_values(&[if ok { "sent" } else { "send_failed" }]).inc();
            }
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::Shutdown => return true,
        }
        false
    }

    fn status(&self) -> PeerStatus {
        let raft = &self.node.raft;
        let cs = self.node.store().conf_state();
        let matched = if raft.state == StateRole::Leader {
            let mut m: Vec<_> = raft.prs().iter().map(|(id, pr)| (*id, pr.matched)).collect();
            m.sort();
            m
        } else {
            Vec::new()
        };
        PeerStatus {
            node_id: self.config.node_id,
            term: raft.term,
            leader_id: raft.leader_id,
            role: format!("{:?}", raft.state),
            commit: raft.raft_log.committed,
            applied: self.node.store().apply_state().applied_index,
            first_index: self.node.store().apply_state().truncated_index + 1,
            last_index: raft.raft_log.last_index(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            matched,
        }
    }

    fn not_leader(&self) -> EngineError {
        EngineError::NotLeader { leader: Some(self.node.raft.leader_id).filter(|&id| id != 0) }
    }

    fn flush_proposals(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if self.node.raft.state != StateRole::Leader {
            let err = self.not_leader();
            for (_, reply, _) in batch {
                self.metrics.proposals_failed.with_label_values(&["not_leader"]).inc();
                reply.fail(err.clone());
            }
            return;
        }
        let now = Instant::now();
        let mut rest = batch.into_iter().peekable();
        while rest.peek().is_some() {
            // One entry takes proposals until the count or the byte budget is reached (at least one).
            let mut proposals = Vec::new();
            let mut replies = Vec::new();
            let mut bytes = 0usize;
            while let Some((payload, _, _)) = rest.peek() {
                let len = payload.approx_len();
                let full = proposals.len() >= self.config.max_commands_per_entry
                    || (!proposals.is_empty() && bytes + len > self.config.max_entry_bytes);
                if full {
                    break;
                }
                let Some((payload, reply, deadline)) = rest.next() else { break };
                // Whoever asked has given up: proposing it now would only apply it unseen.
                if deadline <= now {
                    self.metrics.proposals_failed.with_label_values(&["expired"]).inc();
                    reply.fail(EngineError::Timeout);
                    continue;
                }
                bytes += len;
                proposals.push(EntryProposal {
                    kind: Some(match payload {
                        Payload::Machine(b) => entry_proposal::Kind::Machine(b),
                        Payload::SetBuckets(s) => entry_proposal::Kind::SetBuckets(s),
                        Payload::Ingest(i) => entry_proposal::Kind::Ingest(i),
                        Payload::Drop(d) => entry_proposal::Kind::Drop(d),
                    }),
                });
                replies.push(Some((reply, deadline)));
            }
            if proposals.is_empty() {
                continue;
            }
            self.metrics.batch_commands.observe(proposals.len() as f64);
            let data = codec::encode(&EntryBatch { proposals });
            let before = self.node.raft.raft_log.last_index();
            let proposed = self.node.propose(Vec::new(), data);
            let index = self.node.raft.raft_log.last_index();
            if proposed.is_err() || index == before {
                for (reply, _) in replies.into_iter().flatten() {
                    self.metrics.proposals_failed.with_label_values(&["dropped"]).inc();
                    reply.fail(EngineError::Dropped);
                }
                continue;
            }
            let term = self.node.raft.term;
            self.pending.push_back(Pending { index, term, kind: PendingKind::Proposals(replies) });
        }
    }

    fn propose_conf_change(&mut self, change: ConfChangeV2, reply: Reply<ConfState>, deadline: Instant) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.node.raft.has_pending_conf() {
            let _ = reply.send(Err(EngineError::Invalid("another membership change is in progress".into())));
            return;
        }
        let before = self.node.raft.raft_log.last_index();
        let proposed = self.node.propose_conf_change(Vec::new(), change);
        let index = self.node.raft.raft_log.last_index();
        if let Err(e) = proposed {
            let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
            return;
        }
        if index == before {
            let _ = reply.send(Err(EngineError::Dropped));
            return;
        }
        let term = self.node.raft.term;
        self.pending.push_back(Pending {
            index,
            term,
            kind: PendingKind::ConfChange(Some((reply, deadline))),
        });
    }

    fn transfer_leader(&mut self, to: Option<u64>) {
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        let me = self.config.node_id;
        let voters = self.node.store().conf_state().voters.clone();
        let target = to.or_else(|| {
            self.node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != me && voters.contains(id))
                .max_by_key(|(_, pr)| pr.matched)
                .map(|(id, _)| *id)
        });
        if let Some(target) = target {
            tracing::info!(cell = self.config.cell_id, from = me, to = target, "transferring leadership");
            self.node.transfer_leader(target);
        }
    }

    fn flush_reads(&mut self) {
        let now = Instant::now();
        // Re-issue batches raft may have dropped silently (a leader without a commit in its term).
        let stale: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, b)| now - b.issued > READ_RETRY)
            .map(|(k, _)| *k)
            .collect();
        let mut waiters = std::mem::take(&mut self.reads);
        for ctx in stale {
            if let Some(b) = self.reads_in_flight.remove(&ctx) {
                waiters.extend(b.waiters);
            }
        }
        if waiters.is_empty() {
            return;
        }
        if self.node.raft.state != StateRole::Leader {
            let err = self.not_leader();
            for (reply, _) in waiters {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.node.read_index(ctx.to_be_bytes().to_vec());
        self.reads_in_flight.insert(ctx, ReadBatch { waiters, issued: now });
    }

    fn expire(&mut self, now: Instant) {
        for p in self.pending.iter_mut() {
            match &mut p.kind {
                PendingKind::Proposals(replies) => {
                    for slot in replies.iter_mut() {
                        if slot.as_ref().is_some_and(|(_, d)| *d <= now)
                            && let Some((reply, _)) = slot.take()
                        {
                            self.metrics.proposals_failed.with_label_values(&["timeout"]).inc();
                            reply.fail(EngineError::Timeout);
                        }
                    }
                }
                PendingKind::ConfChange(slot) => {
                    if slot.as_ref().is_some_and(|(_, d)| *d <= now)
                        && let Some((reply, _)) = slot.take()
                    {
                        let _ = reply.send(Err(EngineError::Timeout));
                    }
                }
            }
        }
        let expire_reads = |waiters: &mut ReadWaiters| {
            let (gone, keep): (Vec<_>, Vec<_>) =
                std::mem::take(waiters).into_iter().partition(|(_, d)| *d <= now);
            *waiters = keep;
            for (reply, _) in gone {
                let _ = reply.send(Err(EngineError::Timeout));
            }
        };
        for b in self.reads_in_flight.values_mut() {
            expire_reads(&mut b.waiters);
        }
        self.reads_in_flight.retain(|_, b| !b.waiters.is_empty());
        for (_, w) in self.reads_waiting_apply.iter_mut() {
            expire_reads(w);
        }
        self.reads_waiting_apply.retain(|(_, w)| !w.is_empty());
    }

    fn on_role_change(&mut self) {
        let raft = &self.node.raft;
        let (role, leader, term) = (raft.state, raft.leader_id, raft.term);
        if leader != self.last_leader {
            self.metrics.leader_changes.inc();
            self.last_leader = leader;
            tracing::info!(
                cell = self.config.cell_id,
                node = self.config.node_id,
                leader,
                term,
                "leader changed"
            );
        }
        self.shared.leader_id.store(leader, Ordering::Relaxed);
        self.shared.term.store(term, Ordering::Relaxed);
        self.metrics.has_leader.set(i64::from(leader != 0));
        self.metrics.is_leader.set(i64::from(role == StateRole::Leader));
        self.metrics.term.set(term as i64);
        if self.last_role == StateRole::Leader && role != StateRole::Leader {
            // Reads a deposed leader was about to answer could be stale: send them elsewhere.
            let err = self.not_leader();
            for (_, b) in self.reads_in_flight.drain() {
                for (reply, _) in b.waiters {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        self.last_role = role;
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        if rd.ss().is_some() {
            self.on_role_change();
        }
        // Leader: replicate before the local fsync so both overlap.
        if !rd.messages().is_empty() {
            self.send(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        for rs in rd.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if let Some(b) = self.reads_in_flight.remove(&ctx) {
                self.reads_waiting_apply.push_back((rs.index, b.waiters));
            }
        }
        self.apply(rd.take_committed_entries())?;

        let started = Instant::now();
        let mut wb = WriteBatch::default();
        let entries = rd.entries().len();
        self.node.mut_store().append(rd.entries(), rd.hs(), &mut wb)?;
        self.node.mut_store().write(wb, rd.must_sync())?;
        if entries > 0 {
            self.metrics.ready_entries.observe(entries as f64);
        }
        if rd.must_sync() {
            self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        }
        if !rd.persisted_messages().is_empty() {
            self.send(rd.take_persisted_messages());
        }
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut wb = WriteBatch::default();
            self.node.mut_store().set_commit(commit, &mut wb)?;
            self.node.mut_store().write(wb, false)?;
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages());
        }
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.serve_reads();
        self.maybe_compact()?;
        let raft = &self.node.raft;
        self.metrics.commit_index.set(raft.raft_log.committed as i64);
        let store = self.node.store();
        self.metrics
            .log_entries
            .set(raft.raft_log.last_index().saturating_sub(store.apply_state().truncated_index) as i64);
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for m in &messages {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.metrics.snapshots.with_label_values(&["message_sent"]).inc();
            }
        }
        self.transport.send(messages);
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        let index = snap.get_metadata().index;
        self.node.mut_store().apply_snapshot(&snap)?;
        let db = self.node.store().db().clone();
        self.buckets.reload(&db)?;
        self.book.reload(&db)?;
        self.machine.restore(&View::new(&db))?;
        self.publish_buckets();
        self.metrics.snapshots.with_label_values(&["applied"]).inc();
        self.shared.applied.store(index, Ordering::Relaxed);
        self.metrics.applied_index.set(index as i64);
        tracing::info!(cell = self.config.cell_id, node = self.config.node_id, index, "installed snapshot");
        // Proposals waiting below the snapshot point can no longer be matched: outcome unknown.
        while self.pending.front().is_some_and(|p| p.index <= index) {
            if let Some(p) = self.pending.pop_front() {
                fail_pending(p, EngineError::Timeout);
            }
        }
        Ok(())
    }

    fn publish_buckets(&self) {
        for (state, n) in self.buckets.counts() {
            self.metrics.buckets.with_label_values(&[state]).set(n as i64);
        }
        self.metrics.voters.set(self.node.store().conf_state().voters.len() as i64);
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let Some(last) = entries.last() else { return Ok(()) };
        let (last_index, last_term) = (last.index, last.term);
        let started = Instant::now();
        let db = self.node.store().db().clone();
        let mut wb = WriteBatch::default();
        let mut overlay = Overlay::default();
        let mut outcomes: Vec<(u64, u64, Outcome<SM::Output>)> = Vec::with_capacity(entries.len());
        let mut new_conf_state = None;
        for entry in &entries {
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Outcome::Proposals(Vec::new()),
                EntryType::EntryNormal => match codec::decode::<EntryBatch>(&entry.data) {
                    Ok(batch) => {
                        let mut results = Vec::with_capacity(batch.proposals.len());
                        for proposal in batch.proposals {
                            let result = match proposal.kind {
                                Some(entry_proposal::Kind::Machine(bytes)) => self
                                    .apply_machine(&bytes, &db, &mut wb, &mut overlay, entry.index)?
                                    .map(Applied::Machine),
                                Some(entry_proposal::Kind::SetBuckets(s)) => {
                                    apply_set_buckets(&s, &db, &mut wb, &mut overlay, &self.buckets)?
                                        .map(|()| Applied::Buckets(entry.index))
                                }
                                Some(entry_proposal::Kind::Ingest(i)) => {
                                    let mut ctx = ApplyContext {
                                        db: &db,
                                        batch: &mut wb,
                                        overlay: &mut overlay,
                                        buckets: &self.buckets,
                                        index: entry.index,
                                    };
                                    apply_ingest(&i, &mut ctx)?.map(|()| Applied::Buckets(entry.index))
                                }
                                Some(entry_proposal::Kind::Drop(d)) => {
                                    apply_drop(&d, &db, &mut wb, &overlay, &self.buckets)?
                                        .map(|()| Applied::Buckets(entry.index))
                                }
                                None => Err(EngineError::Malformed("empty proposal".into())),
                            };
                            results.push(result);
                        }
                        Outcome::Proposals(results)
                    }
                    // Same bytes on every replica, so the same (deterministic) refusal everywhere.
                    Err(e) => Outcome::Malformed(e.to_string()),
                },
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    let cc = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
                        ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| e.to_string())
                    } else {
                        // We only propose V2; a V1 entry is read as one step.
                        ConfChange::parse_from_bytes(&entry.data).map(v1_to_v2).map_err(|e| e.to_string())
                    };
                    match cc.map(|cc| (self.node.apply_conf_change(&cc).map_err(|e| e.to_string()), cc)) {
                        Ok((Ok(cs), cc)) => {
                            let added =
                                codec::decode::<Members>(&cc.context).map(|m| m.members).unwrap_or_default();
                            let removed: Vec<u64> = cc
                                .changes
                                .iter()
                                .filter(|c| c.get_change_type() == ConfChangeType::RemoveNode)
                                .map(|c| c.node_id)
                                .collect();
                            self.book.update(&db, &added, &removed, &mut wb)?;
                            tracing::info!(cell = self.config.cell_id, node = self.config.node_id,
                                voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                            new_conf_state = Some(cs.clone());
                            Outcome::ConfChange(Ok(cs))
                        }
                        Ok((Err(e), _)) | Err(e) => Outcome::ConfChange(Err(e)),
                    }
                }
            };
            outcomes.push((entry.index, entry.term, outcome));
        }
        self.node.mut_store().stage_applied(last_index, last_term, new_conf_state, &mut wb)?;
        self.node.mut_store().write(wb, false)?;
        if !overlay.bucket_updates().is_empty() {
            self.buckets.set(overlay.bucket_updates());
            self.publish_buckets();
        } else if self.metrics.voters.get() != self.node.store().conf_state().voters.len() as i64 {
            self.publish_buckets();
        }
        self.shared.applied.store(last_index, Ordering::Relaxed);
        self.metrics.applied_index.set(last_index as i64);
        self.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        for (index, term, outcome) in outcomes {
            self.resolve(index, term, outcome);
        }
        Ok(())
    }

    /// Decodes, fences and applies one state-machine command.
    fn apply_machine(
        &mut self,
        bytes: &[u8],
        db: &rocksdb::DB,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
        index: u64,
    ) -> Result<Result<SM::Output, EngineError>, StorageError> {
        let command = match SM::decode(bytes) {
            Ok(c) => c,
            Err(e) => return Ok(Err(EngineError::Malformed(e))),
        };
        if let Some(b) = SM::bucket(&command) {
            let Some(bucket) = BucketId::new(b) else {
                return Ok(Err(EngineError::Malformed("bucket out of range".into())));
            };
            if let Err(fenced) = buckets::write_fence(bucket, overlay.bucket(bucket, &self.buckets)) {
                return Ok(Err(fenced));
            }
        }
        let mut ctx = ApplyContext { db, batch: wb, overlay, buckets: &self.buckets, index };
        Ok(Ok(self.machine.apply(command, &mut ctx)?))
    }

    fn resolve(&mut self, index: u64, term: u64, outcome: Outcome<SM::Output>) {
        while self.pending.front().is_some_and(|p| p.index < index) {
            if let Some(p) = self.pending.pop_front() {
                fail_pending(p, EngineError::Dropped);
            }
        }
        if self.pending.front().is_none_or(|p| p.index != index) {
            return;
        }
        let Some(p) = self.pending.pop_front() else { return };
        if p.term != term {
            fail_pending(p, EngineError::Dropped);
            return;
        }
        match (p.kind, outcome) {
            (PendingKind::Proposals(replies), Outcome::Proposals(results)) => {
                for (slot, result) in replies.into_iter().zip(results) {
                    match &result {
                        Ok(_) => self.metrics.proposals_committed.inc(),
                        Err(_) => self.metrics.proposals_failed.with_label_values(&["refused"]).inc(),
                    }
                    let Some((reply, _)) = slot else { continue };
                    match (reply, result) {
                        (ReplyTo::Machine(r), Ok(Applied::Machine(o))) => {
                            let _ = r.send(Ok(o));
                        }
                        (ReplyTo::Buckets(r), Ok(Applied::Buckets(i))) => {
                            let _ = r.send(Ok(i));
                        }
                        (reply, Err(e)) => reply.fail(e),
                        (reply, Ok(_)) => {
                            reply.fail(EngineError::Malformed("the entry does not match its proposal".into()))
                        }
                    }
                }
            }
            (PendingKind::Proposals(replies), Outcome::Malformed(e)) => {
                for (reply, _) in replies.into_iter().flatten() {
                    reply.fail(EngineError::Malformed(e.clone()));
                }
            }
            (PendingKind::ConfChange(Some((reply, _))), Outcome::ConfChange(r)) => {
                let _ = reply.send(r.map_err(EngineError::Invalid));
            }
            (kind, _) => fail_pending(Pending { index, term, kind }, EngineError::Dropped),
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.node.store().apply_state().applied_index;
        while self.reads_waiting_apply.front().is_some_and(|(i, _)| *i <= applied) {
            if let Some((index, waiters)) = self.reads_waiting_apply.pop_front() {
                for (reply, _) in waiters {
                    let _ = reply.send(Ok(index));
                }
            }
        }
    }

    /// Compacts the log in two regimes.
    ///
    /// Past `log_gc_soft_size` bytes (of entries appended since this replica started), the entries
    /// every replica already holds go: on the leader, up to the least matched index of all peers;
    /// on a follower (which learns no one else's progress), up to `log_gc_keep` behind its applied
    /// index, the tail it would have kept anyway for the peers it may serve if elected. Entries
    /// live in the `raft` column family's memtable, so removed this early they are gone before it
    /// flushes, and a flush writes their range tombstones instead of the entries (otherwise every
    /// entry was written to a table file and later compacted away, beside the flush of the `data`
    /// column family the replicas all do at the same moment). A peer that stopped answering holds
    /// the leader's log back only up to the hard limits.
    ///
    /// Past `log_gc_threshold` entries or `log_gc_size` bytes, the log keeps a tail of
    /// `log_gc_keep` entries (a quarter over the size limit: entries are large) whoever still
    /// needs older ones: a peer further behind catches up by snapshot.
    fn maybe_compact(&mut self) -> Result<(), StorageError> {
        let apply = self.node.store().apply_state();
        let (applied, truncated) = (apply.applied_index, apply.truncated_index);
        let entries = applied.saturating_sub(truncated);
        let bytes = self.node.store().log_bytes();
        let by_count = entries > self.config.log_gc_threshold;
        let by_size = bytes > self.config.log_gc_size;
        let to = if by_count || by_size {
            let keep = if by_count { self.config.log_gc_keep } else { self.config.log_gc_keep / 4 };
            applied.saturating_sub(keep)
        } else if bytes > self.config.log_gc_soft_size {
            let held = self.held_by_every_replica(applied);
            // Only when at least half the log goes: a follower whose kept tail alone exceeds the
            // soft size would otherwise compact a few entries on every turn.
            if held.saturating_sub(truncated).saturating_mul(2) < entries {
                return Ok(());
            }
            held
        } else {
            return Ok(());
        };
        if to <= truncated {
            return Ok(());
        }
        let removed = self.node.mut_store().compact_to(to)?;
        self.metrics.log_compacted.inc_by(removed);
        Ok(())
    }

    /// The highest log index, at most `applied`, that no peer needs from this replica's log: on
    /// the leader the least matched index of its peers (learners included); a follower keeps
    /// `log_gc_keep` entries for the peers it may serve if it is elected.
    fn held_by_every_replica(&self, applied: u64) -> u64 {
        let raft = &self.node.raft;
        if raft.state == StateRole::Leader {
            raft.prs().iter().map(|(_, pr)| pr.matched).min().unwrap_or(0).min(applied)
        } else {
            applied.saturating_sub(self.config.log_gc_keep)
        }
    }
}

/// Applies an ownership change: every bucket must be in range and none recorded at a newer
/// routing-table version (then nothing changes).
fn apply_set_buckets(
    s: &SetBuckets,
    db: &rocksdb::DB,
    wb: &mut WriteBatch,
    overlay: &mut Overlay,
    committed: &Buckets,
) -> Result<Result<(), EngineError>, StorageError> {
    let Ok(state) = BucketState::try_from(s.state) else {
        return Ok(Err(EngineError::Malformed("bucket state".into())));
    };
    let mut ids = Vec::with_capacity(s.buckets.len());
    for &b in &s.buckets {
        let Some(id) = BucketId::new(b) else {
            return Ok(Err(EngineError::Malformed("bucket out of range".into())));
        };
        let current = overlay.bucket(id, committed);
        if current.table_version > s.table_version {
            return Ok(Err(EngineError::StaleTableVersion { current: current.table_version }));
        }
        ids.push(id);
    }
    let meta = cf(db, crate::keys::CF_META)?;
    let tracking = s.track_changes && state == BucketState::Owned;
    let record = BucketRecord { state: state as i32, table_version: s.table_version, tracking };
    for id in ids {
        if tracking {
            // Markers start afresh: leftovers of an earlier, aborted move mean nothing now.
            let (start, end) = crate::keys::change_range(id);
            wb.delete_range_cf(meta, start, end);
        }
        wb.put_cf(meta, crate::keys::bucket_state_key(id), buckets::encode(&record));
        overlay.set_bucket(id, record);
    }
    Ok(Ok(()))
}

/// Writes a chunk of copied data into an IMPORTING bucket. Every key must lie in the bucket's
/// range and the lists must be parallel; otherwise nothing is written.
fn apply_ingest(
    i: &IngestBucket,
    ctx: &mut ApplyContext<'_>,
) -> Result<Result<(), EngineError>, StorageError> {
    let Some(bucket) = BucketId::new(i.bucket) else {
        return Ok(Err(EngineError::Malformed("bucket out of range".into())));
    };
    if i.values.len() != i.keys.len() || i.deleted.len() != i.keys.len() {
        return Ok(Err(EngineError::Malformed("ingest lists of different lengths".into())));
    }
    if i.keys.iter().any(|k| crate::keys::bucket_of_data_key(k) != Some(bucket)) {
        return Ok(Err(EngineError::Malformed("ingest key outside its bucket".into())));
    }
    if ctx.bucket(bucket).state() != BucketState::Importing {
        return Ok(Err(EngineError::Invalid("the bucket is not importing here".into())));
    }
    if i.reset {
        let (start, end) = crate::keys::bucket_range(bucket);
        ctx.batch.delete_range_cf(cf(ctx.db, crate::keys::CF_DATA)?, start, end);
        ctx.overlay.forget_range(&start, &end);
    }
    for ((k, v), deleted) in i.keys.iter().zip(&i.values).zip(&i.deleted) {
        if *deleted {
            ctx.delete(k)?;
        } else {
            ctx.put(k, v.clone())?;
        }
    }
    Ok(Ok(()))
}

/// Deletes a bucket's data and change markers; only a bucket that is not served here.
fn apply_drop(
    d: &DropBucket,
    db: &rocksdb::DB,
    wb: &mut WriteBatch,
    overlay: &Overlay,
    committed: &Buckets,
) -> Result<Result<(), EngineError>, StorageError> {
    let mut ids = Vec::with_capacity(1 + d.more.len());
    for &b in std::iter::once(&d.bucket).chain(&d.more) {
        let Some(bucket) = BucketId::new(b) else {
            return Ok(Err(EngineError::Malformed("bucket out of range".into())));
        };
        match overlay.bucket(bucket, committed).state() {
            BucketState::NotOwned | BucketState::Importing => ids.push(bucket),
            BucketState::Owned | BucketState::Frozen => {
                return Ok(Err(EngineError::Invalid(
                    "the bucket is served here; it cannot be dropped".into(),
                )));
            }
        }
    }
    for bucket in ids {
        let (start, end) = crate::keys::bucket_range(bucket);
        wb.delete_range_cf(cf(db, crate::keys::CF_DATA)?, start, end);
        let (start, end) = crate::keys::change_range(bucket);
        wb.delete_range_cf(cf(db, crate::keys::CF_META)?, start, end);
    }
    Ok(Ok(()))
}

fn v1_to_v2(c: ConfChange) -> ConfChangeV2 {
    let mut step = raft::prelude::ConfChangeSingle::default();
    step.set_change_type(c.get_change_type());
    step.node_id = c.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.set_changes(vec![step].into());
    v2.context = c.context;
    v2
}

fn fail_pending<O>(p: Pending<O>, err: EngineError) {
    match p.kind {
        PendingKind::Proposals(replies) => {
            for (reply, _) in replies.into_iter().flatten() {
                reply.fail(err.clone());
            }
        }
        PendingKind::ConfChange(Some((reply, _))) => {
            let _ = reply.send(Err(err));
        }
        PendingKind::ConfChange(None) => {}
    }
}

/// The encoded context of a membership change that adds `members`.
pub fn change_context(members: &[Member]) -> Vec<u8> {
    codec::encode(&Members { members: members.to_vec() })
}
