//! The public `Admin` service: cluster status and cells, assembled from the cached routing table and
//! each replica's own view; partner management and audit verification, which need the admin
//! credential (`authorization: Bearer <admin token>`). Rebalancing arrives with its issue.

use crate::partners::{Partners, auth_type_of};
use crate::routing::Router;
use nid_proto::error::{FieldViolations, status_with_reason};
use nid_proto::v1::admin_server::Admin;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

/// The `Admin` service.
pub struct AdminService {
    /// Routing.
    pub router: Arc<Router>,
    /// Partner credentials.
    pub partners: Arc<Partners>,
    /// The admin token; None refuses every admin-only call.
    pub admin_token: Option<Vec<u8>>,
}

fn admin_required(message: &str) -> Status {
    status_with_reason(Code::PermissionDenied, message, ErrorReason::AdminRequired, &[])
}

impl AdminService {
    /// Stores a partner in the control cell, then refreshes this router's cached list.
    async fn put_partner(&self, put: PutPartnerRequest) -> Result<(), Status> {
        self.router
            .control_call(|mut c| {
                let put = put.clone();
                async move { c.put_partner(put).await }
            })
            .await?;
        let _ = self.partners.refresh(&self.router).await;
        Ok(())
    }

    /// Checks `authorization: Bearer <admin token>` in constant time.
    fn require_admin(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(token) = &self.admin_token else {
            return Err(admin_required(
                "this router has no admin credential configured (--admin-token-file)",
            ));
        };
        let given = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                admin_required("the admin credential is required (authorization: Bearer <token>)")
            })?;
        let given = given.trim().as_bytes();
        let ok =
            given.len() == token.len() && given.iter().zip(token).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if !ok {
            return Err(admin_required("wrong admin credential"));
        }
        Ok(())
    }

    async fn cell_status(&self, cell: &CellInfo, owned: u32) -> CellStatus {
        let mut best: Option<CellStatus> = None;
        let mut reachable = Vec::new();
        for r in &cell.replicas {
            let Ok(channel) = self.router.channel(&r.address) else { continue };
            let mut req = Request::new(GetCellStatusRequest {});
            req.set_timeout(Duration::from_millis(500));
            if let Ok(s) = CellClient::new(channel).get_cell_status(req).await {
                let s = s.into_inner();
                reachable.push(r.node_id);
                let leads = s.replicas.iter().any(|x| x.is_leader && x.node_id == r.node_id);
                if leads || best.is_none() {
                    best = Some(s);
                }
            }
        }
        let mut status = best.unwrap_or_default();
        status.cell = Some(cell.clone());
        status.buckets_owned = owned;
        for r in &mut status.replicas {
            r.healthy = reachable.contains(&r.node_id);
        }
        if status.replicas.is_empty() {
            status.replicas = cell
                .replicas
                .iter()
                .map(|r| ReplicaStatus {
                    node_id: r.node_id,
                    address: r.address.clone(),
                    zone: r.zone.clone(),
                    ..Default::default()
                })
                .collect();
        }
        status
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} arrives with its issue"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_cluster_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<GetClusterStatusResponse>, Status> {
        let router = &self.router;
        let mut table = router.table();
        if table.version == 0 {
            router.refresh().await?;
            table = router.table();
        }
        let mut owned: HashMap<u64, u32> = HashMap::new();
        for cell in &table.owner {
            *owned.entry(*cell).or_default() += 1;
        }
        let mut cells = Vec::new();
        for cell in &table.cells {
            cells.push(self.cell_status(cell, owned.get(&cell.cell_id).copied().unwrap_or(0)).await);
        }
        Ok(Response::new(GetClusterStatusResponse {
            cells,
            table_version: table.version,
            migrations: Vec::new(),
        }))
    }

    async fn list_cells(
        &self,
        _request: Request<ListCellsRequest>,
    ) -> Result<Response<ListCellsResponse>, Status> {
        let mut table = self.router.table();
        if table.version == 0 {
            self.router.refresh().await?;
            table = self.router.table();
        }
        Ok(Response::new(ListCellsResponse { cells: table.cells.clone() }))
    }

    async fn add_cell(&self, _request: Request<AddCellRequest>) -> Result<Response<AddCellResponse>, Status> {
        Err(unimplemented("adding a cell (the rebalancer)"))
    }

    async fn add_partner(
        &self,
        request: Request<AddPartnerRequest>,
    ) -> Result<Response<AddPartnerResponse>, Status> {
        self.require_admin(request.metadata())?;
        let req = request.into_inner();
        let mut v = FieldViolations::new();
        let id_ok = (1..=64).contains(&req.partner_id.len())
            && req.partner_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            v.add("partner_id", "must be 1..=64 characters of a-z, 0-9 and '-'");
        }
        if req.name.chars().count() > 128 {
            v.add("name", "at most 128 characters");
        }
        if req.allowed.is_empty() {
            v.add("allowed", "grant at least one auth type");
        }
        for (i, g) in req.allowed.iter().enumerate() {
            if auth_type_of(&g.auth_type).is_none() {
                v.add(format!("allowed[{i}].auth_type"), "must be demographic, pin or totp");
            }
        }
        v.into_result()?;
        if self
            .partners
            .list()
            .iter()
            .any(|p| p.partner.as_ref().is_some_and(|p| p.partner_id == req.partner_id))
        {
            return Err(Status::already_exists(
                "a partner with this id exists; revoke it or pick another id",
            ));
        }
        let secret = {
            use ring::rand::SecureRandom as _;
            let mut bytes = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| Status::internal("random source failed"))?;
            hex::encode(bytes)
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut allowed: Vec<String> = req.allowed.iter().map(|g| g.auth_type.clone()).collect();
        allowed.sort();
        allowed.dedup();
        let partner = Partner {
            partner_id: req.partner_id.clone(),
            name: req.name,
            allowed_auth_types: allowed,
            revoked: false,
            created_at: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
        };
        let put = PutPartnerRequest {
            partner: Some(partner.clone()),
            secret_digest: self.partners.digest(&secret),
            create_only: true,
        };
        self.put_partner(put).await?;
        tracing::info!(partner = %partner.partner_id, "partner added");
        Ok(Response::new(AddPartnerResponse {
            api_key: format!("{}.{secret}", partner.partner_id),
            partner: Some(partner),
        }))
    }

    async fn list_partners(
        &self,
        request: Request<ListPartnersRequest>,
    ) -> Result<Response<ListPartnersResponse>, Status> {
        self.require_admin(request.metadata())?;
        self.partners.refresh(&self.router).await?;
        let partners = self.partners.list().into_iter().filter_map(|p| p.partner).collect();
        Ok(Response::new(ListPartnersResponse { partners }))
    }

    async fn revoke_partner(
        &self,
        request: Request<RevokePartnerRequest>,
    ) -> Result<Response<RevokePartnerResponse>, Status> {
        self.require_admin(request.metadata())?;
        let id = request.into_inner().partner_id;
        self.partners.refresh(&self.router).await?;
        let record = self
            .partners
            .list()
            .into_iter()
            .find(|p| p.partner.as_ref().is_some_and(|p| p.partner_id == id))
            .ok_or_else(|| Status::not_found("no partner with this id"))?;
        let mut partner = record.partner.unwrap_or_default();
        partner.revoked = true;
        let put = PutPartnerRequest {
            partner: Some(partner),
            secret_digest: record.secret_digest,
            create_only: false,
        };
        self.put_partner(put).await?;
        tracing::info!(partner = %id, "partner revoked");
        Ok(Response::new(RevokePartnerResponse {}))
    }

    async fn get_rebalance_status(
        &self,
        _request: Request<GetRebalanceStatusRequest>,
    ) -> Result<Response<GetRebalanceStatusResponse>, Status> {
        Err(unimplemented("rebalancing"))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<VerifyAuditChainRequest>,
    ) -> Result<Response<VerifyAuditChainResponse>, Status> {
        self.require_admin(request.metadata())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let req = request.into_inner();
        let id = crate::service::checked(&self.router, |scheme| {
            nid_domain::validate::verify_audit_chain(scheme, &req)
        });
        crate::service::by_bucket(
            &self.router,
            id,
            nid_proto::v1::cell_request::Operation::VerifyAuditChain(req),
            deadline,
            None,
            |r| match r {
                nid_proto::v1::cell_response::Result::VerifyAuditChain(r) => Some(r),
                _ => None,
            },
        )
        .await
    }
}
