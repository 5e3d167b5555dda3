//! The replica<->replica Raft transport over tonic, and the address book it dials from.
//!
//! Sending: one long-lived client stream per peer, fed by a bounded queue; messages queued while a
//! batch is in flight go out together in the next `RaftMessageBatch`. A broken or refused
//! connection is retried with exponential backoff, and raft is told (`report_unreachable`, and
//! `report_snapshot(Failure)` for snapshots lost with it) so it probes instead of streaming blind.
//! The transport never blocks the Raft loop: a full queue drops messages (raft retransmits).
//!
//! Receiving ([`RaftTransportService`]): only batches addressed to this cell and node, from a
//! member in the address book, are parsed; a message whose bytes do not decode, or whose from/to
//! disagree with its batch, is counted and dropped, never stepped.

use crate::codec;
use crate::keys::CF_META;
use crate::metrics::CellMetrics;
use crate::peer::{PeerHandle, PeerMsg, Transport};
use crate::storage::{StoreError, cf};
use nid_proto::v1::raft_transport_client::RaftTransportClient;
use nid_proto::v1::raft_transport_server::RaftTransport;
use nid_proto::v1::{RaftMessageBatch, RaftStreamDone, SnapshotChunk, SnapshotDone};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

/// Key of the persisted address book in the `meta` CF.
pub const ADDRESS_BOOK_KEY: &[u8] = &[0x05];
/// Largest raft message batch or snapshot accepted.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
const QUEUE: usize = 8192;
const MAX_BATCH: usize = 512;

/// A member's address and zone.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// host:port.
    pub address: String,
    /// Availability zone.
    pub zone: String,
}

/// Where each member of the cell listens. Updated when membership changes apply; persisted.
#[derive(Debug, Default)]
pub struct AddressBook {
    members: RwLock<HashMap<u64, Member>>,
}

impl AddressBook {
    /// A book holding `members`.
    pub fn new(members: impl IntoIterator<Item = Member>) -> AddressBook {
        AddressBook { members: RwLock::new(members.into_iter().map(|m| (m.id, m)).collect()) }
    }

    /// Loads the persisted book and overlays `configured` (the flags win for the members they list).
    pub fn load(
        db: &rocksdb::DB,
        configured: impl IntoIterator<Item = Member>,
    ) -> Result<AddressBook, StoreError> {
        let mut members: HashMap<u64, Member> = match db.get_cf(cf(db, CF_META)?, ADDRESS_BOOK_KEY)? {
            Some(bytes) => codec::decode::<Vec<Member>>(&bytes)
                .map_err(|source| StoreError::Corrupt { what: "address book", source })?
                .into_iter()
                .map(|m| (m.id, m))
                .collect(),
            None => HashMap::new(),
        };
        for m in configured {
            members.insert(m.id, m);
        }
        Ok(AddressBook { members: RwLock::new(members) })
    }

    /// The address of `id`.
    pub fn address(&self, id: u64) -> Option<String> {
        self.members.read().ok()?.get(&id).map(|m| m.address.clone())
    }

    /// True when `id` is a known member.
    pub fn contains(&self, id: u64) -> bool {
        self.members.read().is_ok_and(|m| m.contains_key(&id))
    }

    /// Every member, by id.
    pub fn members(&self) -> Vec<Member> {
        let mut all: Vec<Member> =
            self.members.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        all.sort_by_key(|m| m.id);
        all
    }

    /// Records members added by a membership change and forgets removed ones, staging the new book
    /// into `wb` (the apply batch of the change).
    pub fn update(
        &self,
        db: &rocksdb::DB,
        added: &[Member],
        removed: &[u64],
        wb: &mut rocksdb::WriteBatch,
    ) -> Result<(), StoreError> {
        if let Ok(mut members) = self.members.write() {
            for m in added {
                members.insert(m.id, m.clone());
            }
            for id in removed {
                members.remove(id);
            }
        }
        wb.put_cf(cf(db, CF_META)?, ADDRESS_BOOK_KEY, codec::encode(&self.members()));
        Ok(())
    }
}

/// Sends raft messages to peers over gRPC.
pub struct GrpcTransport {
    cell_id: u64,
    node_id: u64,
    book: Arc<AddressBook>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
    me: Arc<Mutex<Option<PeerHandle>>>,
}

impl GrpcTransport {
    /// A transport for `node_id` of `cell_id`. `me` is filled with the replica's own handle once
    /// it runs, for unreachable and snapshot reports.
    pub fn new(
        cell_id: u64,
        node_id: u64,
        book: Arc<AddressBook>,
        runtime: tokio::runtime::Handle,
        me: Arc<Mutex<Option<PeerHandle>>>,
    ) -> GrpcTransport {
        GrpcTransport { cell_id, node_id, book, queues: Mutex::default(), runtime, me }
    }

    fn queue(&self, to: u64) -> Option<mpsc::Sender<Message>> {
        let mut queues = self.queues.lock().ok()?;
        if let Some(q) = queues.get(&to)
            && !q.is_closed()
        {
            return Some(q.clone());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Link {
            cell_id: self.cell_id,
            from: self.node_id,
            to,
            book: self.book.clone(),
            me: self.me.clone(),
        };
        self.runtime.spawn(link.run(rx));
        queues.insert(to, tx.clone());
        Some(tx)
    }
}

fn report(me: &Mutex<Option<PeerHandle>>, msg: PeerMsg) {
    if let Ok(guard) = me.lock()
        && let Some(h) = guard.as_ref()
    {
        let _ = h.send(msg);
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let sent = self.queue(to).is_some_and(|q| q.try_send(m).is_ok());
            if !sent {
                report(&self.me, PeerMsg::Unreachable(to));
                if is_snapshot {
                    report(&self.me, PeerMsg::SnapshotReport { to, ok: false });
                }
            }
        }
    }
}

struct Link {
    cell_id: u64,
    from: u64,
    to: u64,
    book: Arc<AddressBook>,
    me: Arc<Mutex<Option<PeerHandle>>>,
}

impl Link {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(address) = self.book.address(self.to) else {
                // Not a member (any more): drop what arrives until the queue closes.
                match rx.recv().await {
                    Some(_) => {
                        report(&self.me, PeerMsg::Unreachable(self.to));
                        continue;
                    }
                    None => return,
                }
            };
            let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
                Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
                Err(_) => return,
            };
            match endpoint.connect().await {
                Ok(channel) => {
                    backoff = Duration::from_millis(50);
                    let client = RaftTransportClient::new(channel)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    if self.stream(client, &mut rx).await {
                        return;
                    }
                }
                Err(_) => {
                    // Tell raft, drop what queued (raft resends), and back off.
                    report(&self.me, PeerMsg::Unreachable(self.to));
                    while let Ok(m) = rx.try_recv() {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            report(&self.me, PeerMsg::SnapshotReport { to: self.to, ok: false });
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Streams until the connection breaks (false) or the queue closes (true).
    async fn stream(
        &self,
        mut client: RaftTransportClient<tonic::transport::Channel>,
        rx: &mut mpsc::Receiver<Message>,
    ) -> bool {
        let (tx, out) = mpsc::channel::<RaftMessageBatch>(64);
        let call = tokio::spawn(async move {
            client.send_messages(tokio_stream::wrappers::ReceiverStream::new(out)).await
        });
        loop {
            let Some(first) = rx.recv().await else { return true };
            let mut messages = vec![first];
            while messages.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => messages.push(m),
                    Err(_) => break,
                }
            }
            let snapshots: Vec<u64> = messages
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to)
                .collect();
            let batch = RaftMessageBatch {
                cell_id: self.cell_id,
                from_node: self.from,
                to_node: self.to,
                messages: messages.iter().map(|m| m.write_to_bytes().unwrap_or_default()).collect(),
            };
            let ok = tx.send(batch).await.is_ok();
            for to in snapshots {
                report(&self.me, PeerMsg::SnapshotReport { to, ok });
            }
            if !ok || call.is_finished() {
                report(&self.me, PeerMsg::Unreachable(self.to));
                call.abort();
                return false;
            }
        }
    }
}

/// The receiving side of the transport.
pub struct RaftTransportService {
    /// This cell.
    pub cell_id: u64,
    /// This replica.
    pub node_id: u64,
    /// Known members.
    pub book: Arc<AddressBook>,
    /// The local replica.
    pub peer: PeerHandle,
    /// Metrics.
    pub metrics: Arc<CellMetrics>,
}

impl RaftTransportService {
    /// Checks one batch and returns its messages, or why it was refused.
    pub fn accept(&self, batch: &RaftMessageBatch) -> Result<Vec<Message>, &'static str> {
        if batch.cell_id != self.cell_id {
            return Err("wrong_cell");
        }
        if batch.to_node != self.node_id {
            return Err("wrong_node");
        }
        if !self.book.contains(batch.from_node) {
            return Err("unknown_peer");
        }
        let mut out = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let m = Message::parse_from_bytes(bytes).map_err(|_| "malformed")?;
            if m.from != batch.from_node || m.to != self.node_id {
                return Err("mismatched_from_to");
            }
            out.push(m);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn send_messages(
        &self,
        request: Request<Streaming<RaftMessageBatch>>,
    ) -> Result<Response<RaftStreamDone>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            match self.accept(&batch) {
                Ok(messages) => {
                    for m in messages {
                        if self.peer.send(PeerMsg::Raft(Box::new(m))).is_err() {
                            self.metrics.messages_rejected.with_label_values(&["inbox_full"]).inc();
                        }
                    }
                }
                Err(reason) => {
                    self.metrics.messages_rejected.with_label_values(&[reason]).inc();
                    tracing::warn!(reason, from = batch.from_node, "raft batch refused");
                    return Err(Status::permission_denied(format!("raft batch refused: {reason}")));
                }
            }
        }
        Ok(Response::new(RaftStreamDone {}))
    }

    async fn send_snapshot(
        &self,
        _request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotDone>, Status> {
        Err(Status::unimplemented(
            "snapshots travel inside raft messages in this version; chunked SST streaming is not built yet",
        ))
    }
}
