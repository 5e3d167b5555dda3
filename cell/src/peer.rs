//! One replica's Raft loop, on a dedicated thread (never on tokio workers: it fsyncs).
//!
//! Each turn drains the inbox (proposals, raft messages, reads, admin requests), ticks, turns all
//! client commands gathered in the turn into one log entry (group commit: one entry, one fsync for
//! many commands), issues one ReadIndex for all reads gathered, then handles one Ready in the order
//! raft-rs requires (see ../shared/guides/raft-rs-rocksdb.md):
//! leader messages -> snapshot install -> apply committed -> one synced write of entries + hard state
//! -> persisted messages -> advance -> commit index -> light-ready messages and entries -> advance_apply.

use crate::codec;
use crate::command::{Command, CommandResult, EntryBatch, Rejection};
use crate::fsm::{Overlay, StateMachine};
use crate::metrics::CellMetrics;
use crate::storage::{PeerStorage, StoreError};
use crate::transport::{AddressBook, Member};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, ReadOnlyOption, StateRole};
use rocksdb::WriteBatch;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Why a proposal, read or admin request did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// This replica is not the leader; `leader` is the leader's node id when known.
    #[error("not the leader")]
    NotLeader {
        /// The leader's node id, when known.
        leader: Option<u64>,
    },
    /// The deadline passed first. For a write the outcome is unknown.
    #[error("timed out")]
    Timeout,
    /// Raft dropped the proposal (leadership changed or a transfer is running); nothing was applied.
    #[error("proposal dropped; retry")]
    Dropped,
    /// The inbox is full: the replica is overloaded.
    #[error("replica overloaded")]
    Busy,
    /// The replica is shutting down or stopped after a storage failure.
    #[error("replica stopped")]
    Stopped,
    /// The request is not valid for the current membership.
    #[error("{0}")]
    Invalid(String),
}

type Reply<T> = oneshot::Sender<Result<T, PeerError>>;
type ReadWaiters = Vec<(Reply<()>, Instant)>;

/// Messages into a replica's loop.
pub enum PeerMsg {
    /// A client command.
    Propose {
        /// The command.
        command: Command,
        /// Where the result goes.
        reply: Reply<CommandResult>,
        /// When to give up.
        deadline: Instant,
    },
    /// A linearizable read barrier: answered once the applied state covers the read index.
    Read {
        /// Where the answer goes.
        reply: Reply<()>,
        /// When to give up.
        deadline: Instant,
    },
    /// A raft message from a peer.
    Raft(Box<Message>),
    /// A membership change (ConfChangeV2; peer addresses travel in `context`).
    ConfChange {
        /// The change.
        change: ConfChangeV2,
        /// Where the new conf state goes once applied.
        reply: Reply<ConfState>,
        /// When to give up.
        deadline: Instant,
    },
    /// Hand leadership to the most up-to-date voter (or `to`).
    TransferLeader {
        /// The transferee; None picks the voter with the highest matched index.
        to: Option<u64>,
    },
    /// The transport could not reach a peer.
    Unreachable(u64),
    /// The transport finished (or failed) delivering a snapshot.
    SnapshotReport {
        /// The peer.
        to: u64,
        /// Delivered.
        ok: bool,
    },
    /// A status snapshot.
    Status(oneshot::Sender<PeerStatus>),
    /// Stop the loop.
    Shutdown,
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

/// Sends raft messages to peers. Implementations must not block: drop (and report unreachable)
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
    /// Entries kept behind the applied index when compacting (lets slow followers catch up from the log).
    pub log_gc_keep: u64,
    /// Compact the log once its entries exceed this many bytes (whatever their count).
    pub log_gc_size: u64,
    /// Most client commands in one entry.
    pub max_commands_per_entry: usize,
    /// Most bytes of client commands in one entry (a single larger command still goes alone).
    pub max_entry_bytes: usize,
    /// Inbox capacity.
    pub inbox_capacity: usize,
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
            max_commands_per_entry: 1024,
            max_entry_bytes: 4 << 20,
            inbox_capacity: 65_536,
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

/// State shared between the loop and the services, readable without a round trip.
#[derive(Debug, Default)]
pub struct SharedState {
    /// Current leader (0 when unknown).
    pub leader_id: AtomicU64,
    /// Applied index.
    pub applied: AtomicU64,
}

/// A handle to a running replica loop.
#[derive(Clone)]
pub struct PeerHandle {
    tx: SyncSender<PeerMsg>,
    /// Shared state.
    pub shared: Arc<SharedState>,
    /// This replica's node id.
    pub node_id: u64,
}

impl PeerHandle {
    /// Sends a message without waiting; fails when the inbox is full or the loop stopped.
    pub fn send(&self, msg: PeerMsg) -> Result<(), PeerError> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(PeerError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(PeerError::Stopped),
        }
    }

    /// Proposes a command and waits for its applied result.
    pub async fn propose(&self, command: Command, timeout: Duration) -> Result<CommandResult, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.send(PeerMsg::Propose { command, reply, deadline: Instant::now() + timeout })?;
        wait(rx, timeout).await
    }

    /// Waits until the applied state reflects every write committed before the call (ReadIndex).
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), PeerError> {
        let (reply, rx) = oneshot::channel();
        self.send(PeerMsg::Read { reply, deadline: Instant::now() + timeout })?;
        wait(rx, timeout).await
    }

    /// Proposes a membership change and waits until it is applied.
    pub async fn change_membership(
        &self,
        change: ConfChangeV2,
        timeout: Duration,
    ) -> Result<ConfState, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.send(PeerMsg::ConfChange { change, reply, deadline: Instant::now() + timeout })?;
        wait(rx, timeout).await
    }

    /// The replica's Raft status.
    pub async fn status(&self) -> Result<PeerStatus, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.send(PeerMsg::Status(reply))?;
        rx.await.map_err(|_| PeerError::Stopped)
    }

    /// Blocking form of [`PeerHandle::status`]; usable from any thread, inside a runtime or not.
    pub fn status_blocking(&self) -> Result<PeerStatus, PeerError> {
        let (reply, mut rx) = oneshot::channel();
        self.send(PeerMsg::Status(reply))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match rx.try_recv() {
                Ok(status) => return Ok(status),
                Err(oneshot::error::TryRecvError::Closed) => return Err(PeerError::Stopped),
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() > deadline => {
                    return Err(PeerError::Timeout);
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
}

async fn wait<T>(rx: oneshot::Receiver<Result<T, PeerError>>, timeout: Duration) -> Result<T, PeerError> {
    // The loop answers at the deadline itself; the extra margin only covers a stopped loop.
    match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(PeerError::Stopped),
        Err(_) => Err(PeerError::Timeout),
    }
}

enum PendingKind {
    Commands(Vec<Option<(Reply<CommandResult>, Instant)>>),
    ConfChange(Option<(Reply<ConfState>, Instant)>),
}

struct Pending {
    index: u64,
    term: u64,
    kind: PendingKind,
}

struct ReadBatch {
    waiters: Vec<(Reply<()>, Instant)>,
    issued: Instant,
}

/// Starts a replica's loop on its own thread.
pub fn spawn<T: Transport>(
    config: PeerConfig,
    storage: PeerStorage,
    fsm: StateMachine,
    transport: T,
    metrics: Arc<CellMetrics>,
    book: Arc<AddressBook>,
    logger: &slog::Logger,
) -> Result<(PeerHandle, std::thread::JoinHandle<()>), raft::Error> {
    let applied = storage.apply_state().applied_index;
    let node = RawNode::new(&config.raft_config(applied), storage, logger)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(config.inbox_capacity);
    let shared = Arc::new(SharedState::default());
    shared.applied.store(applied, Ordering::Relaxed);
    let handle = PeerHandle { tx, shared: shared.clone(), node_id: config.node_id };
    let name = format!("raft-{}-{}", config.cell_id, config.node_id);
    let mut peer = Peer {
        config,
        node,
        fsm,
        transport,
        metrics,
        book,
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
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || peer.run(rx))
        .map_err(|e| raft::Error::Io(std::io::Error::other(e)))?;
    Ok((handle, thread))
}

struct Peer<T: Transport> {
    config: PeerConfig,
    node: RawNode<PeerStorage>,
    fsm: StateMachine,
    transport: T,
    metrics: Arc<CellMetrics>,
    book: Arc<AddressBook>,
    shared: Arc<SharedState>,
    batch: Vec<(Command, Reply<CommandResult>, Instant)>,
    reads: Vec<(Reply<()>, Instant)>,
    pending: VecDeque<Pending>,
    reads_in_flight: HashMap<u64, ReadBatch>,
    reads_waiting_apply: VecDeque<(u64, ReadWaiters)>,
    next_read_ctx: u64,
    last_role: StateRole,
    last_leader: u64,
}

const READ_RETRY: Duration = Duration::from_millis(300);

impl<T: Transport> Peer<T> {
    fn run(&mut self, rx: Receiver<PeerMsg>) {
        let mut last_tick = Instant::now();
        let mut stop = false;
        while !stop {
            let wait = self.config.tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(msg) => stop |= self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            // Drain what queued meanwhile: everything gathered here shares one Ready and one fsync.
            for _ in 0..8192 {
                match rx.try_recv() {
                    Ok(msg) => stop |= self.handle(msg),
                    Err(_) => break,
                }
            }
            if last_tick.elapsed() >= self.config.tick {
                self.node.tick();
                last_tick = Instant::now();
                self.expire(Instant::now());
            }
            self.flush_proposals();
            self.flush_reads();
            if let Err(e) = self.on_ready() {
                self.fail(e);
                break;
            }
        }
        self.shared.leader_id.store(0, Ordering::Relaxed);
        self.metrics.is_leader.set(0);
        // Dropping the pending replies answers every waiter with Stopped.
    }

    fn fail(&mut self, e: StoreError) {
        tracing::error!(cell = self.config.cell_id, node = self.config.node_id, error = %e, "replica stopped after a storage failure");
    }

    /// Handles one inbox message; true means stop.
    fn handle(&mut self, msg: PeerMsg) -> bool {
        match msg {
            PeerMsg::Propose { command, reply, deadline } => self.batch.push((command, reply, deadline)),
            PeerMsg::Read { reply, deadline } => self.reads.push((reply, deadline)),
            PeerMsg::Raft(m) => {
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft message not stepped");
                }
            }
            PeerMsg::ConfChange { change, reply, deadline } => {
                self.propose_conf_change(change, reply, deadline)
            }
            PeerMsg::TransferLeader { to } => self.transfer_leader(to),
            PeerMsg::Unreachable(id) => self.node.report_unreachable(id),
            PeerMsg::SnapshotReport { to, ok } => {
                let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.node.report_snapshot(to, status);
                self.metrics.snapshots.with_label_values(&[if ok { "sent" } else { "send_failed" }]).inc();
            }
            PeerMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            PeerMsg::Shutdown => return true,
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

    fn not_leader(&self) -> PeerError {
        PeerError::NotLeader { leader: Some(self.node.raft.leader_id).filter(|&id| id != 0) }
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
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let mut rest = batch.into_iter().peekable();
        while rest.peek().is_some() {
            // One entry takes commands until the count or the byte budget is reached (at least one).
            let mut commands = Vec::new();
            let mut replies = Vec::new();
            let mut bytes = 0usize;
            while let Some((command, _, _)) = rest.peek() {
                let len = command.approx_len();
                let full = commands.len() >= self.config.max_commands_per_entry
                    || (!commands.is_empty() && bytes + len > self.config.max_entry_bytes);
                if full {
                    break;
                }
                let Some((command, reply, deadline)) = rest.next() else { break };
                bytes += len;
                commands.push(command);
                replies.push(Some((reply, deadline)));
            }
            self.metrics.batch_commands.observe(commands.len() as f64);
            let data = codec::encode(&EntryBatch { commands });
            let before = self.node.raft.raft_log.last_index();
            let proposed = self.node.propose(Vec::new(), data);
            let index = self.node.raft.raft_log.last_index();
            if proposed.is_err() || index == before {
                for (reply, _) in replies.into_iter().flatten() {
                    self.metrics.proposals_failed.with_label_values(&["dropped"]).inc();
                    let _ = reply.send(Err(PeerError::Dropped));
                }
                continue;
            }
            let term = self.node.raft.term;
            self.pending.push_back(Pending { index, term, kind: PendingKind::Commands(replies) });
        }
    }

    fn propose_conf_change(&mut self, change: ConfChangeV2, reply: Reply<ConfState>, deadline: Instant) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.node.raft.has_pending_conf() {
            let _ = reply.send(Err(PeerError::Invalid("another membership change is in progress".into())));
            return;
        }
        let before = self.node.raft.raft_log.last_index();
        let proposed = self.node.propose_conf_change(Vec::new(), change);
        let index = self.node.raft.raft_log.last_index();
        if let Err(e) = proposed {
            let _ = reply.send(Err(PeerError::Invalid(e.to_string())));
            return;
        }
        if index == before {
            let _ = reply.send(Err(PeerError::Dropped));
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
        // Re-issue batches raft may have dropped silently (e.g. a leader without a commit in its term).
        let stale: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, b)| now - b.issued > READ_RETRY)
            .map(|(k, _)| *k)
            .collect();
        let mut waiters: Vec<(Reply<()>, Instant)> = std::mem::take(&mut self.reads);
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
                PendingKind::Commands(replies) => {
                    for slot in replies.iter_mut() {
                        if slot.as_ref().is_some_and(|(_, d)| *d <= now)
                            && let Some((reply, _)) = slot.take()
                        {
                            self.metrics.proposals_failed.with_label_values(&["timeout"]).inc();
                            let _ = reply.send(Err(PeerError::Timeout));
                        }
                    }
                }
                PendingKind::ConfChange(slot) => {
                    if slot.as_ref().is_some_and(|(_, d)| *d <= now)
                        && let Some((reply, _)) = slot.take()
                    {
                        let _ = reply.send(Err(PeerError::Timeout));
                    }
                }
            }
        }
        let expire_reads = |waiters: &mut Vec<(Reply<()>, Instant)>| {
            let (gone, keep): (Vec<_>, Vec<_>) =
                std::mem::take(waiters).into_iter().partition(|(_, d)| *d <= now);
            *waiters = keep;
            for (reply, _) in gone {
                let _ = reply.send(Err(PeerError::Timeout));
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
        self.metrics.has_leader.set(i64::from(leader != 0));
        self.metrics.is_leader.set(i64::from(role == StateRole::Leader));
        self.metrics.term.set(term as i64);
        if self.last_role == StateRole::Leader && role != StateRole::Leader {
            // Reads answered by a deposed leader could be stale: send them elsewhere.
            let err = self.not_leader();
            for (_, b) in self.reads_in_flight.drain() {
                for (reply, _) in b.waiters {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        self.last_role = role;
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
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

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StoreError> {
        let index = snap.get_metadata().index;
        self.node.mut_store().apply_snapshot(&snap)?;
        self.metrics.snapshots.with_label_values(&["applied"]).inc();
        self.shared.applied.store(index, Ordering::Relaxed);
        self.metrics.apply_index.set(index as i64);
        tracing::info!(cell = self.config.cell_id, node = self.config.node_id, index, "installed snapshot");
        // Proposals waiting below the snapshot point can no longer be matched: their outcome is unknown.
        while self.pending.front().is_some_and(|p| p.index <= index) {
            if let Some(p) = self.pending.pop_front() {
                fail_pending(p, PeerError::Timeout);
            }
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let Some(last) = entries.last() else { return Ok(()) };
        let (last_index, last_term) = (last.index, last.term);
        let started = Instant::now();
        let mut wb = WriteBatch::default();
        let mut overlay = Overlay::default();
        let mut outcomes: Vec<(u64, u64, Outcome)> = Vec::with_capacity(entries.len());
        let mut new_conf_state = None;
        for entry in &entries {
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Outcome::Commands(Vec::new()),
                EntryType::EntryNormal => match codec::decode::<EntryBatch>(&entry.data) {
                    Ok(batch) => {
                        let mut results = Vec::with_capacity(batch.commands.len());
                        for command in &batch.commands {
                            results.push(self.fsm.apply(command, &mut wb, &mut overlay)?);
                        }
                        Outcome::Commands(results)
                    }
                    // Same bytes on every replica, so the same (deterministic) rejection everywhere.
                    Err(e) => Outcome::Malformed(e.to_string()),
                },
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    let cc = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
                        ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| e.to_string())
                    } else {
                        // We only propose V2; a V1 entry (from an older tool) is read as one step.
                        ConfChange::parse_from_bytes(&entry.data).map(v1_to_v2).map_err(|e| e.to_string())
                    };
                    match cc.map(|cc| (self.node.apply_conf_change(&cc).map_err(|e| e.to_string()), cc)) {
                        Ok((Ok(cs), cc)) => {
                            let added: Vec<Member> = codec::decode(&cc.context).unwrap_or_default();
                            let removed: Vec<u64> = cc
                                .changes
                                .iter()
                                .filter(|c| c.get_change_type() == ConfChangeType::RemoveNode)
                                .map(|c| c.node_id)
                                .collect();
                            self.book.update(self.node.store().db(), &added, &removed, &mut wb)?;
                            tracing::info!(cell = self.config.cell_id, node = self.config.node_id, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
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
        self.shared.applied.store(last_index, Ordering::Relaxed);
        self.metrics.apply_index.set(last_index as i64);
        self.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        for (index, term, outcome) in outcomes {
            self.resolve(index, term, outcome);
        }
        Ok(())
    }

    fn resolve(&mut self, index: u64, term: u64, outcome: Outcome) {
        while self.pending.front().is_some_and(|p| p.index < index) {
            if let Some(p) = self.pending.pop_front() {
                fail_pending(p, PeerError::Dropped);
            }
        }
        if self.pending.front().is_none_or(|p| p.index != index) {
            return;
        }
        let Some(p) = self.pending.pop_front() else { return };
        if p.term != term {
            fail_pending(p, PeerError::Dropped);
            return;
        }
        match (p.kind, outcome) {
            (PendingKind::Commands(replies), Outcome::Commands(results)) => {
                for (slot, result) in replies.into_iter().zip(results) {
                    if !matches!(result, CommandResult::Rejected(_)) {
                        self.metrics.proposals_committed.inc();
                    } else {
                        self.metrics.proposals_failed.with_label_values(&["rejected"]).inc();
                    }
                    if let Some((reply, _)) = slot {
                        let _ = reply.send(Ok(result));
                    }
                }
            }
            (PendingKind::Commands(replies), Outcome::Malformed(e)) => {
                for (reply, _) in replies.into_iter().flatten() {
                    let _ = reply.send(Ok(CommandResult::Rejected(Rejection::Malformed(e.clone()))));
                }
            }
            (PendingKind::ConfChange(Some((reply, _))), Outcome::ConfChange(r)) => {
                let _ = reply.send(r.map_err(PeerError::Invalid));
            }
            (p, _) => fail_pending(Pending { index, term, kind: p }, PeerError::Dropped),
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.node.store().apply_state().applied_index;
        while self.reads_waiting_apply.front().is_some_and(|(i, _)| *i <= applied) {
            if let Some((_, waiters)) = self.reads_waiting_apply.pop_front() {
                for (reply, _) in waiters {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let apply = self.node.store().apply_state();
        let by_count =
            apply.applied_index.saturating_sub(apply.truncated_index) > self.config.log_gc_threshold;
        let by_size = self.node.store().log_bytes() > self.config.log_gc_size;
        if !by_count && !by_size {
            return Ok(());
        }
        // Over the size limit, keep a quarter of the usual tail (entries are large).
        let keep = if by_count { self.config.log_gc_keep } else { self.config.log_gc_keep / 4 };
        let to = apply.applied_index.saturating_sub(keep);
        let removed = self.node.mut_store().compact_to(to)?;
        self.metrics.log_compacted.inc_by(removed);
        Ok(())
    }
}

enum Outcome {
    Commands(Vec<CommandResult>),
    Malformed(String),
    ConfChange(Result<ConfState, String>),
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

fn fail_pending(p: Pending, err: PeerError) {
    match p.kind {
        PendingKind::Commands(replies) => {
            for (reply, _) in replies.into_iter().flatten() {
                let _ = reply.send(Err(err.clone()));
            }
        }
        PendingKind::ConfChange(Some((reply, _))) => {
            let _ = reply.send(Err(err));
        }
        PendingKind::ConfChange(None) => {}
    }
}
