//! The `nid.v1.BucketAdmin` service of a data cell, what a bucket move drives (DESIGN.md §7):
//! ownership changes through the log (and change tracking at a source), export of a bucket as of
//! one view (a full copy, or the changes after an index), import into an IMPORTING bucket through
//! this cell's log in chunks, checksums from one view, and deletion of a bucket's range.

use crate::error::CellError;
use crate::identity_cell::{IdentityCell, RAFT_TIMEOUT};
use nid_engine::{BucketState, bucket_data};
use nid_proto::bucket::BucketId;
use nid_proto::error::FieldViolations;
use nid_proto::v1::bucket_admin_server::BucketAdmin;
use nid_proto::v1::{
    BucketChecksum, BucketExportChunk, ChecksumBucketRequest, ChecksumBucketResponse, DeleteBucketRequest,
    DeleteBucketResponse, ExportBucketRequest, ImportBucketResponse, SetBucketStateRequest,
    SetBucketStateResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// The `BucketAdmin` service.
pub struct BucketAdminService(pub Arc<IdentityCell>);

type ExportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BucketExportChunk, Status>> + Send>>;

fn state_of(number: i32) -> Option<BucketState> {
    match nid_proto::v1::BucketState::try_from(number).ok()? {
        nid_proto::v1::BucketState::NotOwned => Some(BucketState::NotOwned),
        nid_proto::v1::BucketState::Owned => Some(BucketState::Owned),
        nid_proto::v1::BucketState::Importing => Some(BucketState::Importing),
        nid_proto::v1::BucketState::Frozen => Some(BucketState::Frozen),
    }
}

#[tonic::async_trait]
impl BucketAdmin for BucketAdminService {
    async fn set_bucket_state(
        &self,
        request: Request<SetBucketStateRequest>,
    ) -> Result<Response<SetBucketStateResponse>, Status> {
        let cell = &self.0;
        let req = request.into_inner();
        let mut v = FieldViolations::new();
        if req.buckets.iter().any(|&b| BucketId::new(b).is_none()) {
            v.add("buckets", "every bucket must be < 16384");
        }
        if req.buckets.is_empty() {
            v.add("buckets", "at least one bucket is required");
        }
        let state = state_of(req.state);
        if state.is_none() {
            v.add("state", "unknown bucket state");
        }
        if req.table_version == 0 {
            v.add("table_version", "must be > 0");
        }
        if req.track_changes && state != Some(BucketState::Owned) {
            v.add("track_changes", "only with state OWNED");
        }
        let Some(state) = state.filter(|_| v.is_empty()) else { return Err(CellError::Invalid(v).into()) };
        let applied_index = if req.track_changes {
            cell.node.track_buckets(req.buckets, req.table_version, RAFT_TIMEOUT).await
        } else {
            cell.node.set_buckets(req.buckets, state, req.table_version, RAFT_TIMEOUT).await
        }
        .map_err(|e| cell.engine_error(e))?;
        Ok(Response::new(SetBucketStateResponse { applied_index }))
    }

    type ExportBucketStream = ExportStream;

    async fn export_bucket(
        &self,
        request: Request<ExportBucketRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let cell = self.0.clone();
        let req = request.into_inner();
        let buckets = bucket_list(req.bucket, &req.buckets)?;
        // Read on the leader, after everything committed before the call.
        cell.node.read_barrier(RAFT_TIMEOUT).await.map_err(|e| cell.engine_error(e))?;
        for &b in &buckets {
            let record = cell.node.bucket(b);
            let state = record.state();
            if !matches!(state, BucketState::Owned | BucketState::Frozen) {
                return Err(
                    CellError::NotAllowed("a bucket is not served here; nothing to export".into()).into()
                );
            }
            if req.after_index > 0 && !record.tracking && state == BucketState::Owned {
                return Err(CellError::NotAllowed(
                    "a bucket's changes are not tracked (set track_changes first)".into(),
                )
                .into());
            }
        }
        let node = cell.node.clone();
        let after = req.after_index;
        let exported = tokio::task::spawn_blocking(move || {
            node.view(|v| {
                let index = v.applied_index()?;
                let mut out = Vec::with_capacity(buckets.len());
                for b in buckets {
                    let pairs = if after == 0 {
                        bucket_data::export(v, b)?
                    } else {
                        bucket_data::changes_since(v, b, after)?
                    };
                    out.push((b, pairs));
                }
                Ok::<_, nid_engine::StorageError>((index, out))
            })
        })
        .await
        .map_err(|_| CellError::Internal("export task failed".into()))?
        .map_err(|_| CellError::Internal("storage error".into()))?;
        let (index, per_bucket) = exported;
        let chunks: Vec<BucketExportChunk> = per_bucket
            .into_iter()
            .flat_map(|(b, pairs)| chunk(u32::from(b.get()), index, after == 0, pairs))
            .collect();
        cell.metrics.migration_exported(chunks.iter().map(chunk_bytes).sum());
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn import_bucket(
        &self,
        request: Request<Streaming<BucketExportChunk>>,
    ) -> Result<Response<ImportBucketResponse>, Status> {
        let cell = &self.0;
        let mut stream = request.into_inner();
        let (mut records, mut source_index) = (0u64, 0u64);
        while let Some(c) = stream.message().await? {
            if c.keys.len() != c.values.len() || c.keys.len() != c.deleted.len() {
                return Err(CellError::field("keys", "keys, values and deleted must be parallel").into());
            }
            let id = BucketId::new(c.bucket).ok_or_else(|| CellError::field("bucket", "must be < 16384"))?;
            if c.keys.iter().any(|k| nid_engine::keys::bucket_of_data_key(k) != Some(id)) {
                return Err(CellError::field("keys", "every key must lie in its chunk's bucket").into());
            }
            let n = c.keys.len() as u64;
            let bytes = chunk_bytes(&c);
            let ingest = nid_engine::buckets::IngestBucket {
                bucket: c.bucket,
                reset: c.reset,
                keys: c.keys,
                values: c.values,
                deleted: c.deleted,
            };
            cell.node.ingest(ingest, RAFT_TIMEOUT).await.map_err(|e| cell.engine_error(e))?;
            cell.metrics.migration_imported(bytes);
            records += n;
            source_index = source_index.max(c.source_index);
        }
        Ok(Response::new(ImportBucketResponse { records, source_index }))
    }

    async fn checksum_bucket(
        &self,
        request: Request<ChecksumBucketRequest>,
    ) -> Result<Response<ChecksumBucketResponse>, Status> {
        let cell = &self.0;
        let req = request.into_inner();
        let many = !req.buckets.is_empty();
        let buckets = bucket_list(req.bucket, &req.buckets)?;
        if !req.local {
            cell.node.read_barrier(RAFT_TIMEOUT).await.map_err(|e| cell.engine_error(e))?;
        }
        let (applied_index, sums) = cell
            .node
            .view(|v| {
                let index = v.applied_index()?;
                let sums = buckets
                    .iter()
                    .map(|&b| bucket_data::digest(v, b).map(|(n, d)| (b, n, d)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, nid_engine::StorageError>((index, sums))
            })
            .map_err(|_| CellError::Internal("storage error".into()))?;
        let checksums: Vec<BucketChecksum> = sums
            .iter()
            .map(|(b, n, d)| BucketChecksum { bucket: u32::from(b.get()), records: *n, sha256: d.to_vec() })
            .collect();
        let (records, sha256) = match checksums.first() {
            Some(first) if !many => (first.records, first.sha256.clone()),
            _ => (0, Vec::new()),
        };
        Ok(Response::new(ChecksumBucketResponse {
            records,
            sha256,
            applied_index,
            checksums: if many { checksums } else { Vec::new() },
        }))
    }

    async fn delete_bucket(
        &self,
        request: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        let cell = &self.0;
        let req = request.into_inner();
        let buckets: Vec<u32> =
            bucket_list(req.bucket, &req.buckets)?.iter().map(|b| u32::from(b.get())).collect();
        cell.node.drop_buckets(&buckets, RAFT_TIMEOUT).await.map_err(|e| cell.engine_error(e))?;
        Ok(Response::new(DeleteBucketResponse {}))
    }
}

/// The buckets a request names: its list when it has one, else its single bucket; each checked.
fn bucket_list(single: u32, list: &[u32]) -> Result<Vec<BucketId>, CellError> {
    if list.len() > usize::from(nid_proto::bucket::BUCKETS) {
        return Err(CellError::field("buckets", "at most 16384"));
    }
    let raw: Vec<u32> = if list.is_empty() { vec![single] } else { list.to_vec() };
    raw.into_iter()
        .map(|b| BucketId::new(b).ok_or_else(|| CellError::field("buckets", "every bucket must be < 16384")))
        .collect()
}

/// The most one chunk (one Raft entry at the importer) carries.
const CHUNK_BYTES: usize = 512 << 10;

fn chunk_bytes(c: &BucketExportChunk) -> u64 {
    c.keys.iter().chain(&c.values).map(|x| x.len() as u64).sum()
}

/// Cuts exported pairs into chunks of at most [`CHUNK_BYTES`]; a full copy always has a first
/// chunk (with `reset`), even for an empty bucket.
fn chunk(bucket: u32, index: u64, full: bool, pairs: Vec<bucket_data::Pair>) -> Vec<BucketExportChunk> {
    let new = |reset: bool| BucketExportChunk { bucket, source_index: index, reset, ..Default::default() };
    let mut out = Vec::new();
    let mut current = new(full);
    let mut size = 0usize;
    for (k, v) in pairs {
        let len = k.len() + v.as_ref().map_or(0, Vec::len);
        if size > 0 && size + len > CHUNK_BYTES {
            out.push(std::mem::replace(&mut current, new(false)));
            size = 0;
        }
        size += len;
        current.keys.push(k);
        current.deleted.push(v.is_none());
        current.values.push(v.unwrap_or_default());
    }
    if !current.keys.is_empty() || full {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_budget_and_a_full_copy_always_has_a_reset_chunk() {
        let empty = chunk(7, 9, true, Vec::new());
        assert_eq!(empty.len(), 1);
        assert!(empty[0].reset && empty[0].keys.is_empty());
        assert!(chunk(7, 9, false, Vec::new()).is_empty());
        let big = vec![0u8; 200 << 10];
        let pairs: Vec<bucket_data::Pair> =
            (0..7u8).map(|i| (vec![0, 7, i], if i == 3 { None } else { Some(big.clone()) })).collect();
        let chunks = chunk(7, 9, true, pairs);
        assert!(chunks.len() >= 3);
        assert!(chunks[0].reset && chunks[1..].iter().all(|c| !c.reset));
        assert!(chunks.iter().all(|c| chunk_bytes(c) as usize <= CHUNK_BYTES));
        let all: Vec<&Vec<u8>> = chunks.iter().flat_map(|c| &c.keys).collect();
        assert_eq!(all.len(), 7);
        let deleted: Vec<bool> = chunks.iter().flat_map(|c| c.deleted.clone()).collect();
        assert_eq!(deleted.iter().filter(|d| **d).count(), 1);
    }
}
