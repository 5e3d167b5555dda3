//! The two ways into a replica's Raft loop.
//!
//! Raft traffic and administration ([`Control`]: messages from peers, transport reports, membership
//! changes, status) and client work ([`Client`]: proposals and reads) travel on separate channels.
//! The loop drains every control message before it takes client work, so a flood of proposals
//! never delays a heartbeat or a vote; the client channel is bounded on its own and a full one
//! refuses at once ([`crate::EngineError::Busy`]), which is the backpressure callers see.

use crate::buckets::{DropBucket, IngestBucket, SetBuckets};
use crate::error::EngineError;
use raft::prelude::{ConfChangeV2, ConfState, Message};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A reply channel.
pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Capacity of the control channel. Peers' messages beyond it are dropped (Raft retransmits).
pub const CONTROL_CAPACITY: usize = 65_536;

/// What a client proposes.
pub enum Payload {
    /// An encoded state-machine command.
    Machine(Vec<u8>),
    /// An ownership change.
    SetBuckets(SetBuckets),
    /// Copied data of a bucket being imported.
    Ingest(IngestBucket),
    /// Deletion of a bucket's data.
    Drop(DropBucket),
}

impl Payload {
    /// Roughly how many bytes the payload takes in an entry.
    pub fn approx_len(&self) -> usize {
        match self {
            Payload::Machine(bytes) => bytes.len() + 8,
            Payload::SetBuckets(s) => s.buckets.len() * 3 + 16,
            Payload::Ingest(i) => {
                i.keys.iter().zip(&i.values).map(|(k, v)| k.len() + v.len() + 8).sum::<usize>() + 16
            }
            Payload::Drop(_) => 8,
        }
    }
}

/// Where an applied proposal's result goes.
pub enum ReplyTo<O> {
    /// A state-machine command's output.
    Machine(Reply<O>),
    /// An ownership change: the index it applied at.
    Buckets(Reply<u64>),
}

impl<O> ReplyTo<O> {
    /// Answers with an error.
    pub fn fail(self, e: EngineError) {
        match self {
            ReplyTo::Machine(r) => {
                let _ = r.send(Err(e));
            }
            ReplyTo::Buckets(r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// Client work.
pub enum Client<O> {
    /// A proposal.
    Propose {
        /// What.
        payload: Payload,
        /// Where the result goes.
        reply: ReplyTo<O>,
        /// When to give up (a proposal still queued then is dropped, never proposed).
        deadline: Instant,
    },
    /// A linearizable read barrier: answered once the applied state covers the read index.
    Read {
        /// Where the answer (the read index) goes.
        reply: Reply<u64>,
        /// When to give up.
        deadline: Instant,
    },
}

/// Raft traffic and administration.
pub enum Control {
    /// A Raft message from a peer.
    Raft(Box<Message>),
    /// A membership change (ConfChangeV2; the added members travel in `context`).
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
    Status(oneshot::Sender<crate::PeerStatus>),
    /// Stop the loop.
    Shutdown,
}

/// The sending side of the control channel: what the transport and admin paths hold.
#[derive(Clone)]
pub struct Inbox {
    pub(crate) tx: crossbeam_channel::Sender<Control>,
}

impl Inbox {
    /// Delivers a message from a peer; false when the loop is gone or overwhelmed.
    pub fn deliver(&self, message: Message) -> bool {
        self.tx.try_send(Control::Raft(Box::new(message))).is_ok()
    }

    /// Tells Raft a peer could not be reached (it probes instead of streaming blind).
    pub fn report_unreachable(&self, to: u64) {
        let _ = self.tx.try_send(Control::Unreachable(to));
    }

    /// Tells Raft whether a snapshot reached `to` (without it, the follower stays paused).
    pub fn report_snapshot(&self, to: u64, ok: bool) {
        let _ = self.tx.try_send(Control::SnapshotReport { to, ok });
    }

    /// Sends any control message.
    pub fn send(&self, message: Control) -> Result<(), EngineError> {
        self.tx.try_send(message).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => {
                EngineError::Busy { retry_after: Duration::from_millis(50) }
            }
            crossbeam_channel::TrySendError::Disconnected(_) => EngineError::Stopped,
        })
    }
}
