//! The public `Admin` service: cluster status and cells, assembled from the cached routing table and
//! each replica's own view. Partner management and rebalancing arrive with their issues.

use crate::routing::Router;
use nid_proto::v1::admin_server::Admin;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The `Admin` service.
pub struct AdminService(pub Arc<Router>);

impl AdminService {
    async fn cell_status(&self, cell: &CellInfo, owned: u32) -> CellStatus {
        let mut best: Option<CellStatus> = None;
        let mut reachable = Vec::new();
        for r in &cell.replicas {
            let Ok(channel) = self.0.channel(&r.address) else { continue };
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
        let router = &self.0;
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
        let mut table = self.0.table();
        if table.version == 0 {
            self.0.refresh().await?;
            table = self.0.table();
        }
        Ok(Response::new(ListCellsResponse { cells: table.cells.clone() }))
    }

    async fn add_cell(&self, _request: Request<AddCellRequest>) -> Result<Response<AddCellResponse>, Status> {
        Err(unimplemented("adding a cell (the rebalancer)"))
    }

    async fn add_partner(
        &self,
        _request: Request<AddPartnerRequest>,
    ) -> Result<Response<AddPartnerResponse>, Status> {
        Err(unimplemented("partner management"))
    }

    async fn list_partners(
        &self,
        _request: Request<ListPartnersRequest>,
    ) -> Result<Response<ListPartnersResponse>, Status> {
        Err(unimplemented("partner management"))
    }

    async fn revoke_partner(
        &self,
        _request: Request<RevokePartnerRequest>,
    ) -> Result<Response<RevokePartnerResponse>, Status> {
        Err(unimplemented("partner management"))
    }

    async fn get_rebalance_status(
        &self,
        _request: Request<GetRebalanceStatusRequest>,
    ) -> Result<Response<GetRebalanceStatusResponse>, Status> {
        Err(unimplemented("rebalancing"))
    }

    async fn verify_audit_chain(
        &self,
        _request: Request<VerifyAuditChainRequest>,
    ) -> Result<Response<VerifyAuditChainResponse>, Status> {
        Err(unimplemented("the audit trail"))
    }
}
