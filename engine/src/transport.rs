//! The sending side of the replica<->replica Raft transport over gRPC.
//!
//! One long-lived client stream per peer, fed by a bounded queue; messages queued while a batch is
//! in flight go out together in the next `RaftMessageBatch` (bounded in count and bytes). HTTP/2
//! keepalives detect a dead peer within seconds. A broken or refused connection is retried with
//! exponential backoff, and Raft is told (`report_unreachable`, and `report_snapshot(Failure)` for
//! a snapshot lost with it) so it probes instead of streaming blind. The transport never blocks
//! the Raft loop: a full queue drops messages (Raft retransmits).
//!
//! Snapshots use their own RPC: the MsgSnapshot (whose data is a small manifest) in a header,
//! then each SST file in 1 MiB chunks closed by its size and SHA-256, all within a deadline.

use crate::address_book::AddressBook;
use crate::mailbox::Inbox;
use crate::peer::Transport;
use crate::snapshot::{self, SnapshotManifest};
use nid_proto::codec;
use nid_proto::v1::raft_transport_client::RaftTransportClient;
use nid_proto::v1::snapshot_chunk::Piece;
use nid_proto::v1::{RaftMessageBatch, SnapshotChunk, SnapshotFileEnd, SnapshotHeader};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest Raft message batch or snapshot chunk either side accepts. An entry holds at most 4 MiB
/// of commands plus a Raft message's 1 MiB of appended entries; batches are cut at [`MAX_BATCH_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// A batch is cut once its messages reach this many bytes.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
const QUEUE: usize = 8192;
const MAX_BATCH: usize = 512;
/// Size of one snapshot data chunk on the wire.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
/// A whole snapshot stream must finish within this.
pub const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(600);
/// HTTP/2 keepalive interval of Raft links: a silent peer is declared dead after this plus
/// [`KEEPALIVE_TIMEOUT`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel being opened by a [`Dialer`].
pub type Connecting = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::transport::Channel, tonic::transport::Error>> + Send>,
>;

/// Opens gRPC channels to peers: plaintext ([`PlainDialer`]) or mutual TLS (the cell binary's).
pub trait Dialer: Send + Sync + 'static {
    /// An endpoint for `address` (host:port), to tune before connecting.
    fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
    }
    /// Connects now.
    fn connect(&self, endpoint: tonic::transport::Endpoint) -> Connecting;
    /// A channel that connects when first used.
    fn connect_lazy(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel;
}

/// Plaintext HTTP/2.
pub struct PlainDialer;

impl Dialer for PlainDialer {
    fn connect(&self, endpoint: tonic::transport::Endpoint) -> Connecting {
        Box::pin(async move { endpoint.connect().await })
    }

    fn connect_lazy(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        endpoint.connect_lazy()
    }
}

/// Sends Raft messages to peers over gRPC.
pub struct GrpcTransport {
    cell_id: u64,
    node_id: u64,
    inbox: Inbox,
    book: Arc<AddressBook>,
    snap_root: PathBuf,
    dialer: Arc<dyn Dialer>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
}

impl GrpcTransport {
    /// A transport for `node_id` of `cell_id` whose reports go to `inbox`.
    pub fn new(
        cell_id: u64,
        node_id: u64,
        inbox: Inbox,
        book: Arc<AddressBook>,
        snap_root: PathBuf,
        dialer: Arc<dyn Dialer>,
        runtime: tokio::runtime::Handle,
    ) -> GrpcTransport {
        GrpcTransport { cell_id, node_id, inbox, book, snap_root, dialer, queues: Mutex::default(), runtime }
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
            inbox: self.inbox.clone(),
            dialer: self.dialer.clone(),
        };
        self.runtime.spawn(link.run(rx));
        queues.insert(to, tx.clone());
        Some(tx)
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let sender = SnapshotSender {
                    cell_id: self.cell_id,
                    from: self.node_id,
                    book: self.book.clone(),
                    snap_root: self.snap_root.clone(),
                    dialer: self.dialer.clone(),
                };
                let inbox = self.inbox.clone();
                self.runtime.spawn(async move {
                    let ok = match tokio::time::timeout(SNAPSHOT_DEADLINE, sender.send(m)).await {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            tracing::warn!(to, error = %e, "snapshot send failed");
                            false
                        }
                        Err(_) => {
                            tracing::warn!(to, "snapshot send timed out");
                            false
                        }
                    };
                    inbox.report_snapshot(to, ok);
                });
                continue;
            }
            if self.queue(to).is_none_or(|q| q.try_send(m).is_err()) {
                self.inbox.report_unreachable(to);
            }
        }
    }
}

struct Link {
    cell_id: u64,
    from: u64,
    to: u64,
    book: Arc<AddressBook>,
    inbox: Inbox,
    dialer: Arc<dyn Dialer>,
}

impl Link {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(address) = self.book.address(self.to) else {
                // Not a member (any more): drop what arrives until the queue closes.
                match rx.recv().await {
                    Some(_) => {
                        self.inbox.report_unreachable(self.to);
                        continue;
                    }
                    None => return,
                }
            };
            let endpoint = match self.dialer.endpoint(&address) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true),
                Err(_) => return,
            };
            match self.dialer.connect(endpoint).await {
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
                    // Tell Raft, drop what queued (Raft resends), and back off.
                    self.inbox.report_unreachable(self.to);
                    while rx.try_recv().is_ok() {}
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
            let mut messages = vec![first.write_to_bytes().unwrap_or_default()];
            let mut bytes = messages[0].len();
            while messages.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        let encoded = m.write_to_bytes().unwrap_or_default();
                        bytes += encoded.len();
                        messages.push(encoded);
                    }
                    Err(_) => break,
                }
            }
            let batch =
                RaftMessageBatch { cell_id: self.cell_id, from_node: self.from, to_node: self.to, messages };
            let ok = tx.send(batch).await.is_ok();
            if !ok || call.is_finished() {
                self.inbox.report_unreachable(self.to);
                call.abort();
                return false;
            }
        }
    }
}

struct SnapshotSender {
    cell_id: u64,
    from: u64,
    book: Arc<AddressBook>,
    snap_root: PathBuf,
    dialer: Arc<dyn Dialer>,
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
        let endpoint = self
            .dialer
            .endpoint(&address)?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        let channel = self.dialer.connect(endpoint).await?;
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
                let end = SnapshotFileEnd { name: f.name.clone(), size: f.size, sha256: f.sha256.clone() };
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
