//! The `nid.v1.Cell` service (router -> cell): `Execute` dispatches one identity operation to the
//! data cell's [`IdentityCell`]; the replica operations (status, membership, leadership) are
//! answered by any replica, data or control.

use crate::error::CellError;
use crate::identity_cell::IdentityCell;
use crate::key_rotation::VoterKeys;
use crate::replica::Replica;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::cell_server::Cell;
use nid_proto::v1::{
    ActivateKeyGenerationRequest, ActivateKeyGenerationResponse, CellRequest, CellResponse, CellStatus,
    ChangeMembershipRequest, ChangeMembershipResponse, EchoRequest, EchoResponse, GetCellStatusRequest,
    GetKeyGenerationsRequest, GetSigningKeysRequest, GetSigningKeysResponse, KeyGenerations,
    TransferLeaderRequest, TransferLeaderResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Largest echo payload.
pub const MAX_ECHO_BYTES: usize = 64 << 10;

/// The `Cell` service of one replica.
pub struct CellService {
    /// The replica operations.
    pub replica: Arc<dyn Replica>,
    /// The identity side (None on a control replica).
    pub identity: Option<Arc<IdentityCell>>,
    /// How the leader asks voters which key generations they hold.
    pub voter_keys: Arc<dyn VoterKeys>,
}

impl CellService {
    fn identity(&self) -> Result<&IdentityCell, CellError> {
        self.identity
            .as_deref()
            .ok_or_else(|| CellError::NotAllowed("the control cell holds no identities".into()))
    }

    async fn execute(&self, req: CellRequest) -> Result<CellResult, CellError> {
        let cell = self.identity()?;
        let route = req.route.as_ref();
        let op = req.operation.ok_or_else(|| CellError::field("operation", "is required"))?;
        Ok(match op {
            Operation::Enroll(r) => CellResult::Enroll(cell.enroll(r, route).await?),
            Operation::GetIdentity(r) => CellResult::GetIdentity(cell.get_identity(r, route).await?),
            Operation::UpdateIdentity(r) => CellResult::UpdateIdentity(cell.update_identity(r, route).await?),
            Operation::SetStatus(r) => CellResult::SetStatus(cell.set_status(r, route).await?),
            Operation::GetHistory(r) => CellResult::GetHistory(cell.get_history(r, route).await?),
            Operation::CreateVid(r) => CellResult::CreateVid(cell.create_vid(r, route).await?),
            Operation::RevokeVid(r) => CellResult::RevokeVid(cell.revoke_vid(r, route).await?),
            Operation::LockAuthTypes(r) => CellResult::LockAuthTypes(cell.lock_auth_types(r, route).await?),
            Operation::Authenticate(r) => CellResult::Authenticate(cell.authenticate(r, route).await?),
            Operation::GetAuthHistory(r) => {
                CellResult::GetAuthHistory(cell.get_auth_history(r, route).await?)
            }
            Operation::VerifyAuditChain(r) => {
                CellResult::VerifyAuditChain(cell.verify_audit_chain(r, route).await?)
            }
        })
    }
}

#[tonic::async_trait]
impl Cell for CellService {
    async fn execute(&self, request: Request<CellRequest>) -> Result<Response<CellResponse>, Status> {
        let req = request.into_inner();
        let result = CellService::execute(self, req).await?;
        let served_by = self.identity.as_ref().map(|c| c.served_by());
        Ok(Response::new(CellResponse { result: Some(result), served_by }))
    }

    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let payload = request.into_inner().payload;
        if payload.len() > MAX_ECHO_BYTES {
            return Err(CellError::field("payload", "must be at most 64 KiB").into());
        }
        Ok(Response::new(EchoResponse { payload }))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<GetSigningKeysRequest>,
    ) -> Result<Response<GetSigningKeysResponse>, Status> {
        Ok(Response::new(self.identity()?.signing_keys()))
    }

    async fn get_cell_status(
        &self,
        _request: Request<GetCellStatusRequest>,
    ) -> Result<Response<CellStatus>, Status> {
        Ok(Response::new(self.replica.status().await?))
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        Ok(Response::new(self.replica.change_membership(request.into_inner()).await?))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.replica.transfer_leader(request.into_inner().to_node)?;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn get_key_generations(
        &self,
        _request: Request<GetKeyGenerationsRequest>,
    ) -> Result<Response<KeyGenerations>, Status> {
        Ok(Response::new(self.identity()?.key_generations()))
    }

    async fn activate_key_generation(
        &self,
        request: Request<ActivateKeyGenerationRequest>,
    ) -> Result<Response<ActivateKeyGenerationResponse>, Status> {
        let id = request.into_inner().id;
        let applied_index = self.identity()?.activate_key_generation(id, self.voter_keys.as_ref()).await?;
        Ok(Response::new(ActivateKeyGenerationResponse { applied_index }))
    }
}
