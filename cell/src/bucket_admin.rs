//! The `nid.v1.BucketAdmin` service of a data cell: ownership changes through the log and bucket
//! checksums from one view. Bucket export, import and deletion come with online migration.

use crate::error::CellError;
use crate::identity_cell::{IdentityCell, RAFT_TIMEOUT};
use nid_engine::{BucketState, bucket_data};
use nid_proto::bucket::BucketId;
use nid_proto::error::FieldViolations;
use nid_proto::v1::bucket_admin_server::BucketAdmin;
use nid_proto::v1::{
    BucketExportChunk, ChecksumBucketRequest, ChecksumBucketResponse, DeleteBucketRequest,
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
        let Some(state) = state.filter(|_| v.is_empty()) else { return Err(CellError::Invalid(v).into()) };
        let applied_index = cell
            .node
            .set_buckets(req.buckets, state, req.table_version, RAFT_TIMEOUT)
            .await
            .map_err(|e| cell.engine_error(e))?;
        Ok(Response::new(SetBucketStateResponse { applied_index }))
    }

    type ExportBucketStream = ExportStream;

    async fn export_bucket(
        &self,
        _request: Request<ExportBucketRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        Err(Status::unimplemented("bucket export arrives with online migration"))
    }

    async fn import_bucket(
        &self,
        _request: Request<Streaming<BucketExportChunk>>,
    ) -> Result<Response<ImportBucketResponse>, Status> {
        Err(Status::unimplemented("bucket import arrives with online migration"))
    }

    async fn checksum_bucket(
        &self,
        request: Request<ChecksumBucketRequest>,
    ) -> Result<Response<ChecksumBucketResponse>, Status> {
        let cell = &self.0;
        let req = request.into_inner();
        let bucket =
            BucketId::new(req.bucket).ok_or_else(|| CellError::field("bucket", "must be < 16384"))?;
        let applied_index = if req.local {
            cell.node.applied()
        } else {
            cell.node.read_barrier(RAFT_TIMEOUT).await.map_err(|e| cell.engine_error(e))?
        };
        let (records, digest) = cell
            .node
            .view(|v| bucket_data::digest(v, bucket))
            .map_err(|_| CellError::Internal("storage error".into()))?;
        Ok(Response::new(ChecksumBucketResponse { records, sha256: digest.to_vec(), applied_index }))
    }

    async fn delete_bucket(
        &self,
        _request: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        Err(Status::unimplemented("bucket cleanup arrives with online migration"))
    }
}
