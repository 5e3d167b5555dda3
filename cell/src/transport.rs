//! The replica<->replica Raft transport over tonic, and the address book it dials from.
//!
//! Sending: one long-lived client stream per peer, fed by a bounded queue; messages queued while a
//! batch is in flight go out together in the next `RaftMessageBatch`. A broken or refused
//! connection is retried with exponential backoff, and raft is told (`report_unreachable`, and
//! `report_snapshot(Failure)` for snapshots lost with it) so it probes instead of streaming blind.
//! The transport never blocks the Raft loop: a full queue drops messages (raft retransmits).
//!
//! Snapshots use their own RPC: the MsgSnapshot (whose data is a small manifest) in a header,
//! then each SST file in 1 MiB chunks closed by its size and SHA-256; the receiver steps the
//! message only once every file is local and verified.
//!
//! Receiving ([`RaftTransportService`]): only batches addressed to this cell and node, from a
//! member in the address book, are parsed; a message whose bytes do not decode, or whose from/to
//! disagree with its batch, is counted and dropped, never stepped.

use crate::codec;
use crate::keys::CF_META;
use crate::metrics::CellMetrics;
use crate::peer::{PeerHandle, PeerMsg, Transport};
use crate::snapshot::{self, SnapshotManifest};
use crate::storage::{StoreError, cf};
use nid_proto::v1::raft_transport_client::RaftTransportClient;
use nid_proto::v1::raft_transport_server::RaftTransport;
use nid_proto::v1::snapshot_chunk::Piece;
use nid_proto::v1::{
    RaftMessageBatch, RaftStreamDone, SnapshotChunk, SnapshotDone, SnapshotFileEnd, SnapshotHeader,
};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use std::collections::HashMap;
use std::path::PathBuf;
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
    snap_root: PathBuf,
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
        snap_root: PathBuf,
        runtime: tokio::runtime::Handle,
        me: Arc<Mutex<Option<PeerHandle>>>,
    ) -> GrpcTransport {
        GrpcTransport { cell_id, node_id, book, snap_root, queues: Mutex::default(), runtime, me }
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
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // Snapshots go on their own RPC: the message, then the files in chunks.
                let sender = SnapshotSender {
                    cell_id: self.cell_id,
                    from: self.node_id,
                    book: self.book.clone(),
                    snap_root: self.snap_root.clone(),
                };
                let me = self.me.clone();
                self.runtime.spawn(async move {
                    let ok = match sender.send(m).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(to, error = %e, "snapshot send failed");
                            false
                        }
                    };
                    report(&me, PeerMsg::SnapshotReport { to, ok });
                });
                continue;
            }
            if self.queue(to).is_none_or(|q| q.try_send(m).is_err()) {
                report(&self.me, PeerMsg::Unreachable(to));
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

/// Size of one snapshot data chunk on the wire.
const SNAPSHOT_CHUNK: usize = 1 << 20;

struct SnapshotSender {
    cell_id: u64,
    from: u64,
    book: Arc<AddressBook>,
    snap_root: PathBuf,
}

impl SnapshotSender {
    async fn send(&self, m: Message) -> anyhow::Result<()> {
        let to = m.to;
        let address = self.book.address(to).ok_or_else(|| anyhow::anyhow!("no address for node {to}"))?;
        let snap = m.get_snapshot();
        let meta = snap.get_metadata();
        let manifest: SnapshotManifest = codec::decode(&snap.data)?;
        manifest.validate()?;
        let dir = snapshot::gen_dir(&self.snap_root, meta.index, meta.term);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
        let header = SnapshotHeader {
            cell_id: self.cell_id,
            from_node: self.from,
            to_node: to,
            raft_message: m.write_to_bytes()?,
        };
        let producer = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            tx.send(SnapshotChunk { piece: Some(Piece::Header(header)) }).await?;
            for f in &manifest.files {
                let mut file = tokio::fs::File::open(dir.join(&f.name)).await?;
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    tx.send(SnapshotChunk { piece: Some(Piece::Data(buf[..n].to_vec())) }).await?;
                }
                let end = SnapshotFileEnd { name: f.name.clone(), size: f.size, sha256: f.sha256.to_vec() };
                tx.send(SnapshotChunk { piece: Some(Piece::FileEnd(end)) }).await?;
            }
            anyhow::Ok(())
        });
        let result = client.send_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        producer.await??;
        result?;
        Ok(())
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
    /// Where received snapshot files go.
    pub snap_root: PathBuf,
}

impl RaftTransportService {
    /// Receives one snapshot stream into `recv-<index>-<term>/`, checking every file, and returns
    /// the snapshot message to step once everything is local.
    async fn receive_snapshot(&self, mut stream: Streaming<SnapshotChunk>) -> Result<Message, Status> {
        let refuse = |reason: &'static str| {
            self.metrics.messages_rejected.with_label_values(&[reason]).inc();
            Status::invalid_argument(format!("snapshot refused: {reason}"))
        };
        let header = match stream.next().await {
            Some(Ok(SnapshotChunk { piece: Some(Piece::Header(h)) })) => h,
            Some(Err(e)) => return Err(e),
            _ => return Err(refuse("no_header")),
        };
        let batch = RaftMessageBatch {
            cell_id: header.cell_id,
            from_node: header.from_node,
            to_node: header.to_node,
            messages: vec![header.raft_message],
        };
        let m = self.accept(&batch).map_err(refuse)?.pop().ok_or_else(|| refuse("no_message"))?;
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return Err(refuse("not_a_snapshot"));
        }
        let meta = m.get_snapshot().get_metadata();
        let manifest: SnapshotManifest =
            codec::decode(&m.get_snapshot().data).map_err(|_| refuse("bad_manifest"))?;
        manifest.validate().map_err(|_| refuse("bad_manifest"))?;
        let dir = snapshot::recv_dir(&self.snap_root, meta.index, meta.term);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|_| Status::internal("cannot create snapshot directory"))?;
        let mut expected = manifest.files.iter();
        let mut current: Option<(tokio::fs::File, ring::digest::Context, u64, &snapshot::SnapshotFile)> =
            None;
        while let Some(chunk) = stream.next().await {
            use tokio::io::AsyncWriteExt as _;
            match chunk?.piece {
                Some(Piece::Data(bytes)) => {
                    if current.is_none() {
                        let f = expected.next().ok_or_else(|| refuse("unexpected_file"))?;
                        let file = tokio::fs::File::create(dir.join(&f.name))
                            .await
                            .map_err(|_| Status::internal("cannot write snapshot file"))?;
                        current = Some((file, ring::digest::Context::new(&ring::digest::SHA256), 0, f));
                    }
                    let Some((file, ctx, size, f)) = current.as_mut() else { return Err(refuse("no_file")) };
                    *size += bytes.len() as u64;
                    if *size > f.size {
                        return Err(refuse("file_too_long"));
                    }
                    ctx.update(&bytes);
                    file.write_all(&bytes)
                        .await
                        .map_err(|_| Status::internal("cannot write snapshot file"))?;
                }
                Some(Piece::FileEnd(end)) => {
                    let Some((file, ctx, size, f)) = current.take() else { return Err(refuse("no_file")) };
                    file.sync_all().await.map_err(|_| Status::internal("cannot sync snapshot file"))?;
                    let digest = ctx.finish();
                    if end.name != f.name || end.size != size || size != f.size || digest.as_ref() != f.sha256
                    {
                        return Err(refuse("checksum_mismatch"));
                    }
                }
                _ => return Err(refuse("unexpected_chunk")),
            }
        }
        if current.is_some() || expected.next().is_some() {
            return Err(refuse("incomplete"));
        }
        Ok(m)
    }

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
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotDone>, Status> {
        let m = self.receive_snapshot(request.into_inner()).await?;
        self.metrics.snapshots.with_label_values(&["received"]).inc();
        self.peer.send(PeerMsg::Raft(Box::new(m))).map_err(|_| Status::unavailable("replica busy"))?;
        Ok(Response::new(SnapshotDone {}))
    }
}
