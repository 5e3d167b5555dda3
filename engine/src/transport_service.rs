//! The receiving side of the Raft transport (`nid.v1.RaftTransport`).
//!
//! Only batches addressed to this cell and node, from a member in the address book, are parsed;
//! a message whose bytes do not decode, or whose from/to disagree with its batch, refuses the
//! stream and is counted, never stepped. A snapshot stream lands in `recv-<index>-<term>/`, every
//! file checked against the manifest's size and SHA-256, each chunk within [`CHUNK_TIMEOUT`], and
//! the snapshot message is stepped only once every file is local.

use crate::address_book::AddressBook;
use crate::mailbox::Inbox;
use crate::metrics::RaftMetrics;
use crate::snapshot::{self, SnapshotManifest};
use nid_proto::codec;
use nid_proto::v1::raft_transport_server::RaftTransport;
use nid_proto::v1::snapshot_chunk::Piece;
use nid_proto::v1::{RaftMessageBatch, RaftStreamDone, SnapshotChunk, SnapshotDone};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

/// A snapshot stream that sends nothing for this long is abandoned.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// The node a connection's verified certificate belongs to, if it is a member's; None for anyone
/// else. Unset on a plaintext listener, where nothing can be checked.
pub type SenderOf = Arc<dyn Fn(&tonic::Extensions) -> Option<u64> + Send + Sync>;

/// The receiving side of the transport.
pub struct RaftTransportService {
    /// This cell.
    pub cell_id: u64,
    /// This replica.
    pub node_id: u64,
    /// Known members.
    pub book: Arc<AddressBook>,
    /// The local replica's inbox.
    pub inbox: Inbox,
    /// Metrics.
    pub metrics: RaftMetrics,
    /// Where received snapshot files go.
    pub snap_root: PathBuf,
    /// With mutual TLS: who the sender is by its certificate. Every batch's `from_node` must be
    /// that node (refused as `sender_mismatch` otherwise).
    pub sender_of: Option<SenderOf>,
}

impl RaftTransportService {
    fn refuse(&self, reason: &'static str) -> Status {
        self.metrics.messages_rejected.with_label_values(&[reason]).inc();
        Status::invalid_argument(format!("snapshot refused: {reason}"))
    }

    async fn next_chunk(
        &self,
        stream: &mut Streaming<SnapshotChunk>,
    ) -> Result<Option<SnapshotChunk>, Status> {
        match tokio::time::timeout(CHUNK_TIMEOUT, stream.next()).await {
            Ok(Some(chunk)) => chunk.map(Some),
            Ok(None) => Ok(None),
            Err(_) => Err(self.refuse("stalled")),
        }
    }

    /// Receives one snapshot stream, checking every file, and returns the snapshot message to step
    /// once everything is local.
    async fn receive_snapshot(
        &self,
        sender: Option<u64>,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<Message, Status> {
        let header = match self.next_chunk(&mut stream).await? {
            Some(SnapshotChunk { piece: Some(Piece::Header(h)) }) => h,
            _ => return Err(self.refuse("no_header")),
        };
        let batch = RaftMessageBatch {
            cell_id: header.cell_id,
            from_node: header.from_node,
            to_node: header.to_node,
            messages: vec![header.raft_message],
        };
        let m = self
            .accept_from(sender, &batch)
            .map_err(|r| self.refuse(r))?
            .pop()
            .ok_or_else(|| self.refuse("no_message"))?;
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return Err(self.refuse("not_a_snapshot"));
        }
        let meta = m.get_snapshot().get_metadata();
        let manifest: SnapshotManifest =
            codec::decode(&m.get_snapshot().data).map_err(|_| self.refuse("bad_manifest"))?;
        manifest.validate().map_err(|_| self.refuse("bad_manifest"))?;
        let dir = snapshot::recv_dir(&self.snap_root, meta.index, meta.term);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|_| Status::internal("cannot create snapshot directory"))?;
        let mut expected = manifest.files.iter();
        let mut current: Option<(tokio::fs::File, ring::digest::Context, u64, &snapshot::SnapshotFile)> =
            None;
        while let Some(chunk) = self.next_chunk(&mut stream).await? {
            use tokio::io::AsyncWriteExt as _;
            match chunk.piece {
                Some(Piece::Data(bytes)) => {
                    if current.is_none() {
                        let f = expected.next().ok_or_else(|| self.refuse("unexpected_file"))?;
                        let file = tokio::fs::File::create(dir.join(&f.name))
                            .await
                            .map_err(|_| Status::internal("cannot write snapshot file"))?;
                        current = Some((file, ring::digest::Context::new(&ring::digest::SHA256), 0, f));
                    }
                    let Some((file, ctx, size, f)) = current.as_mut() else {
                        return Err(self.refuse("no_file"));
                    };
                    *size += bytes.len() as u64;
                    if *size > f.size {
                        return Err(self.refuse("file_too_long"));
                    }
                    ctx.update(&bytes);
                    file.write_all(&bytes)
                        .await
                        .map_err(|_| Status::internal("cannot write snapshot file"))?;
                }
                Some(Piece::FileEnd(end)) => {
                    let Some((file, ctx, size, f)) = current.take() else {
                        return Err(self.refuse("no_file"));
                    };
                    file.sync_all().await.map_err(|_| Status::internal("cannot sync snapshot file"))?;
                    let digest = ctx.finish();
                    if end.name != f.name
                        || end.size != size
                        || size != f.size
                        || digest.as_ref() != f.sha256.as_slice()
                    {
                        return Err(self.refuse("checksum_mismatch"));
                    }
                }
                _ => return Err(self.refuse("unexpected_chunk")),
            }
        }
        if current.is_some() || expected.next().is_some() {
            return Err(self.refuse("incomplete"));
        }
        Ok(m)
    }

    /// The node the connection's certificate names, when there is a certificate to check:
    /// Ok(None) on plaintext, Err when the certificate is no member's.
    fn sender(&self, extensions: &tonic::Extensions) -> Result<Option<u64>, &'static str> {
        match &self.sender_of {
            None => Ok(None),
            Some(of) => of(extensions).map(Some).ok_or("sender_mismatch"),
        }
    }

    /// Checks one batch (from `sender` by its certificate, when known) and returns its
    /// messages, or why it was refused.
    pub fn accept_from(
        &self,
        sender: Option<u64>,
        batch: &RaftMessageBatch,
    ) -> Result<Vec<Message>, &'static str> {
        if sender.is_some_and(|s| s != batch.from_node) {
            return Err("sender_mismatch");
        }
        self.accept(batch)
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
        let sender = self.sender(request.extensions()).map_err(|reason| {
            self.metrics.messages_rejected.with_label_values(&[reason]).inc();
            Status::permission_denied(format!("raft batch refused: {reason}"))
        })?;
        let mut stream = request.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            match self.accept_from(sender, &batch) {
                Ok(messages) => {
                    for m in messages {
                        if !self.inbox.deliver(m) {
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
        let sender = self.sender(request.extensions()).map_err(|r| self.refuse(r))?;
        let m = self.receive_snapshot(sender, request.into_inner()).await?;
        self.metrics.snapshots.with_label_values(&["received"]).inc();
        if !self.inbox.deliver(m) {
            return Err(Status::unavailable("replica busy"));
        }
        Ok(Response::new(SnapshotDone {}))
    }
}
