//! The public `Admin` service: cluster status and cells, assembled from the cached routing table and
//! each replica's own view; adding, draining and removing cells and steering the rebalancer (the
//! control cell's leader moves the buckets); partner management and audit verification. Every
//! change needs the admin credential (`authorization: Bearer <admin token>`).

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
    /// The admin credential; None refuses every admin-only call.
    pub admin_token: Option<nid_support::secret::AdminToken>,
}

fn admin_required(message: &str) -> Status {
    status_with_reason(Code::PermissionDenied, message, ErrorReason::AdminRequired, &[])
}

impl AdminService {
    /// Stores a partner in the control cell, then refreshes this router's cached list.
    async fn put_partner(&self, admin: &str, put: PutPartnerRequest) -> Result<(), Status> {
        self.router
            .control_call(admin, |mut c| {
                let put = put.clone();
                async move { c.put_partner(put).await }
            })
            .await?;
        let _ = self.partners.refresh(&self.router).await;
        Ok(())
    }

    /// Checks `authorization: Bearer <admin token>` in constant time; returns the token, which
    /// goes along to the control cell on writes.
    fn require_admin(&self, metadata: &MetadataMap) -> Result<String, Status> {
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
            })?
            .trim();
        if !token.matches(given) {
            return Err(admin_required("wrong admin credential"));
        }
        Ok(given.to_owned())
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

/// Checks that the replicas of a cell to be added are running, empty, of this cluster (the same
/// keyring as a cell already serving) and one per distinct zone.
async fn check_new_cell(router: &Router, cell: &CellInfo) -> Result<(), Status> {
    let table = router.table();
    let mut v = FieldViolations::new();
    if cell.cell_id == 0 {
        v.add("cell.cell_id", "must be > 0 (0 is the control cell)");
    }
    if table.cells.iter().any(|c| c.cell_id == cell.cell_id) {
        v.add("cell.cell_id", "a cell with this id is registered");
    }
    if cell.replicas.len() < 3 {
        v.add("cell.replicas", "a cell has at least 3 replicas");
    }
    check_zones_and_ids(&mut v, "cell.replicas", &cell.replicas);
    let known: std::collections::HashSet<&str> =
        table.cells.iter().flat_map(|c| c.replicas.iter().map(|r| r.address.as_str())).collect();
    if cell.replicas.iter().any(|r| known.contains(r.address.as_str())) {
        v.add("cell.replicas", "an address already serves a registered cell");
    }
    if !(cell.weight == 0 || (1..=nid_proto::placement::MAX_WEIGHT).contains(&cell.weight)) {
        v.add("cell.weight", "must be 1..=1000 (0: the default)");
    }
    v.into_result()?;
    // Every key generation a serving cell holds (one answering replica per cell): data sealed
    // with any of them may move to the new cell, which must be able to open it.
    let mut reference: Option<Vec<KeyGeneration>> = None;
    for c in &table.cells {
        for r in &c.replicas {
            let Ok(ch) = router.channel(&r.address) else { continue };
            let mut req = Request::new(GetKeyGenerationsRequest {});
            req.set_timeout(Duration::from_secs(2));
            if let Ok(k) = CellClient::new(ch).get_key_generations(req).await {
                let all = reference.get_or_insert_with(Vec::new);
                for g in k.into_inner().held {
                    if !all.contains(&g) {
                        all.push(g);
                    }
                }
                break;
            }
        }
    }
    for (i, r) in cell.replicas.iter().enumerate() {
        let field = format!("cell.replicas[{i}]");
        let channel = router.channel(&r.address)?;
        let mut req = Request::new(GetCellStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        let status = CellClient::new(channel.clone())
            .get_cell_status(req)
            .await
            .map_err(|_| {
                nid_proto::error::invalid_field(&field, "is not reachable (start the replica first)")
            })?
            .into_inner();
        if status.cell.as_ref().map(|c| c.cell_id) != Some(cell.cell_id) {
            return Err(nid_proto::error::invalid_field(&field, "runs another cell id"));
        }
        if !status.replicas.iter().any(|x| x.node_id == r.node_id) {
            return Err(nid_proto::error::invalid_field(&field, "is not a member with this node id"));
        }
        if status.buckets_owned > 0 {
            return Err(nid_proto::error::invalid_field(&field, "is not empty: it owns buckets"));
        }
        let mut req = Request::new(GetKeyGenerationsRequest {});
        req.set_timeout(Duration::from_secs(2));
        let held = CellClient::new(channel)
            .get_key_generations(req)
            .await
            .map_err(|_| nid_proto::error::invalid_field(&field, "does not answer for its keys"))?
            .into_inner()
            .held;
        if let Some(reference) = &reference {
            if !held.iter().any(|k| reference.contains(k)) {
                return Err(nid_proto::error::invalid_field(&field, "holds another cluster's keys"));
            }
            if !reference.iter().all(|k| held.contains(k)) {
                return Err(nid_proto::error::invalid_field(
                    &field,
                    "lacks a key generation the serving cells hold (give it the cluster's whole keyring)",
                ));
            }
        }
    }
    Ok(())
}

/// A cell's replicas sit in distinct, named zones under distinct node ids > 0 (violations
/// recorded against `field`).
fn check_zones_and_ids(v: &mut FieldViolations, field: &str, replicas: &[ReplicaInfo]) {
    let zones: std::collections::HashSet<&str> = replicas.iter().map(|r| r.zone.as_str()).collect();
    if zones.len() != replicas.len() || zones.contains("") {
        v.add(field, "each replica must sit in its own, named zone");
    }
    let nodes: std::collections::HashSet<u64> = replicas.iter().map(|r| r.node_id).collect();
    if nodes.len() != replicas.len() || nodes.contains(&0) {
        v.add(field, "node ids must be distinct and > 0");
    }
}

/// The replicas an operator says cell `cell_id` has now: three to nine, distinct node ids,
/// addresses and named zones, no address of another registered cell, and each listed replica
/// answering as a member of this cell whose Raft members (voters and learners) are exactly the
/// listed node ids, each at the address and zone the cell records for it (a replacement half
/// done, with a learner still catching up, is refused until it finishes).
async fn check_replicas(router: &Router, cell_id: u64, replicas: &[ReplicaInfo]) -> Result<(), Status> {
    let table = router.table();
    let mut v = FieldViolations::new();
    if !table.cells.iter().any(|c| c.cell_id == cell_id) {
        v.add("cell_id", "no registered data cell has this id");
    }
    if !(3..=9).contains(&replicas.len()) {
        v.add("replicas", "a cell has 3 to 9 replicas");
    }
    check_zones_and_ids(&mut v, "replicas", replicas);
    let nodes: std::collections::BTreeSet<u64> = replicas.iter().map(|r| r.node_id).collect();
    let others: std::collections::HashSet<&str> = table
        .cells
        .iter()
        .filter(|c| c.cell_id != cell_id)
        .flat_map(|c| c.replicas.iter().map(|r| r.address.as_str()))
        .collect();
    let addresses: std::collections::HashSet<&str> = replicas.iter().map(|r| r.address.as_str()).collect();
    if addresses.len() != replicas.len()
        || replicas.iter().any(|r| r.address.is_empty() || others.contains(r.address.as_str()))
    {
        v.add("replicas", "each replica needs its own address, serving no other registered cell");
    }
    v.into_result()?;
    for (i, r) in replicas.iter().enumerate() {
        let field = format!("replicas[{i}]");
        let mut req = Request::new(GetCellStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        let status = CellClient::new(router.channel(&r.address)?)
            .get_cell_status(req)
            .await
            .map_err(|_| nid_proto::error::invalid_field(&field, "is not reachable"))?
            .into_inner();
        if status.cell.as_ref().map(|c| c.cell_id) != Some(cell_id) {
            return Err(nid_proto::error::invalid_field(&field, "runs another cell id"));
        }
        // The Raft members (the address book also keeps `--peers` entries of removed nodes).
        let members: std::collections::BTreeMap<u64, &ReplicaStatus> =
            status.replicas.iter().filter(|x| x.healthy).map(|x| (x.node_id, x)).collect();
        if members.keys().copied().collect::<std::collections::BTreeSet<u64>>() != nodes {
            return Err(nid_proto::error::invalid_field(
                &field,
                format!(
                    "its cell's members are {:?}, not the node ids listed",
                    members.keys().collect::<Vec<_>>()
                ),
            ));
        }
        for (j, listed) in replicas.iter().enumerate() {
            let recorded = members.get(&listed.node_id);
            if recorded.is_none_or(|m| m.address != listed.address || m.zone != listed.zone) {
                return Err(nid_proto::error::invalid_field(
                    &format!("replicas[{j}]"),
                    "its address or zone differs from what its cell records for that node",
                ));
            }
        }
    }
    Ok(())
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
        // Moves in flight, when the control cell answers (the status is useful without it).
        let migrations = router
            .control_read(|mut c| async move {
                c.list_migrations(ListMigrationsRequest { include_finished: false }).await
            })
            .await
            .map(|l| l.migrations)
            .unwrap_or_default();
        Ok(Response::new(GetClusterStatusResponse { cells, table_version: table.version, migrations }))
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

    async fn add_cell(&self, request: Request<AddCellRequest>) -> Result<Response<AddCellResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let mut cell = request
            .into_inner()
            .cell
            .ok_or_else(|| nid_proto::error::invalid_field("cell", "is required"))?;
        self.router.refresh().await?;
        check_new_cell(&self.router, &cell).await?;
        if cell.weight == 0 {
            cell.weight = nid_proto::placement::DEFAULT_WEIGHT;
        }
        cell.state = CellState::Joining as i32;
        let registered = cell.clone();
        let table_version = self
            .router
            .control_call(&admin, |mut c| {
                let cell = registered.clone();
                async move { c.register_cell(RegisterCellRequest { cell: Some(cell) }).await }
            })
            .await?
            .table_version;
        self.router.refresh().await?;
        let table = self.router.table();
        let raw =
            RoutingTable { cells: table.cells.clone(), owner: table.owner.clone(), ..Default::default() };
        let buckets_planned = nid_proto::placement::desired_for(&raw)
            .map(|d| d.iter().filter(|&&c| c == cell.cell_id).count() as u32)
            .unwrap_or(0);
        tracing::info!(cell = cell.cell_id, buckets_planned, "cell added");
        Ok(Response::new(AddCellResponse { table_version, buckets_planned }))
    }

    async fn update_cell_replicas(
        &self,
        request: Request<UpdateCellReplicasRequest>,
    ) -> Result<Response<UpdateCellReplicasResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let req = request.into_inner();
        self.router.refresh().await?;
        check_replicas(&self.router, req.cell_id, &req.replicas).await?;
        let table = self.router.table();
        let Some(existing) = table.cells.iter().find(|c| c.cell_id == req.cell_id) else {
            return Err(nid_proto::error::invalid_field("cell_id", "no registered data cell has this id"));
        };
        // A compare-and-swap on the replicas read above: a cell removed or updated meanwhile
        // comes back ABORTED or NOT_FOUND instead of being brought back or overwritten.
        let replace = ReplaceCellReplicasRequest {
            cell_id: req.cell_id,
            replicas: req.replicas,
            expected: existing.replicas.clone(),
        };
        let table_version = self
            .router
            .control_call(&admin, |mut c| {
                let replace = replace.clone();
                async move { c.replace_cell_replicas(replace).await }
            })
            .await?
            .table_version;
        let _ = self.router.refresh().await;
        tracing::info!(cell = req.cell_id, table_version, "cell replicas updated");
        Ok(Response::new(UpdateCellReplicasResponse { table_version }))
    }

    async fn drain_cell(
        &self,
        request: Request<DrainCellRequest>,
    ) -> Result<Response<SetCellStateResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let cell_id = request.into_inner().cell_id;
        let r = self
            .router
            .control_call(&admin, |mut c| async move {
                c.set_cell_state(SetCellStateRequest { cell_id, state: CellState::Draining as i32 }).await
            })
            .await?;
        tracing::info!(cell = cell_id, "cell draining");
        let _ = self.router.refresh().await;
        Ok(Response::new(r))
    }

    async fn remove_cell(
        &self,
        request: Request<RemoveCellRequest>,
    ) -> Result<Response<RemoveCellResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let cell_id = request.into_inner().cell_id;
        let r = self
            .router
            .control_call(&admin, |mut c| async move { c.remove_cell(RemoveCellRequest { cell_id }).await })
            .await?;
        tracing::info!(cell = cell_id, "cell removed");
        let _ = self.router.refresh().await;
        Ok(Response::new(r))
    }

    async fn set_rebalance(
        &self,
        request: Request<SetRebalanceRequest>,
    ) -> Result<Response<RebalanceSettings>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let req = request.into_inner();
        let r = self.router.control_call(&admin, |mut c| async move { c.set_rebalance(req).await }).await?;
        Ok(Response::new(r))
    }

    async fn add_partner(
        &self,
        request: Request<AddPartnerRequest>,
    ) -> Result<Response<AddPartnerResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
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
        check_limits(&mut v, Some(req.rate_per_second), Some(req.burst));
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
            rate_per_second: req.rate_per_second,
            burst: req.burst,
        };
        let put = PutPartnerRequest {
            partner: Some(partner.clone()),
            secret_digest: self.partners.digest(&secret),
            create_only: true,
        };
        self.put_partner(&admin, put).await?;
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
        let admin = self.require_admin(request.metadata())?;
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
        self.put_partner(&admin, put).await?;
        tracing::info!(partner = %id, "partner revoked");
        Ok(Response::new(RevokePartnerResponse {}))
    }

    async fn update_partner(
        &self,
        request: Request<UpdatePartnerRequest>,
    ) -> Result<Response<UpdatePartnerResponse>, Status> {
        let admin = self.require_admin(request.metadata())?;
        let req = request.into_inner();
        let mut v = FieldViolations::new();
        if req.name.as_ref().is_some_and(|n| n.chars().count() > 128) {
            v.add("name", "at most 128 characters");
        }
        check_limits(&mut v, req.rate_per_second, req.burst);
        v.into_result()?;
        self.partners.refresh(&self.router).await?;
        let record = self
            .partners
            .list()
            .into_iter()
            .find(|p| p.partner.as_ref().is_some_and(|p| p.partner_id == req.partner_id))
            .ok_or_else(|| Status::not_found("no partner with this id"))?;
        let mut partner = record.partner.unwrap_or_default();
        if let Some(name) = req.name {
            partner.name = name;
        }
        if let Some(rate) = req.rate_per_second {
            partner.rate_per_second = rate;
        }
        if let Some(burst) = req.burst {
            partner.burst = burst;
        }
        let put = PutPartnerRequest {
            partner: Some(partner.clone()),
            secret_digest: record.secret_digest,
            create_only: false,
        };
        self.put_partner(&admin, put).await?;
        tracing::info!(partner = %partner.partner_id, rate = partner.rate_per_second, burst = partner.burst, "partner updated");
        Ok(Response::new(UpdatePartnerResponse { partner: Some(partner) }))
    }

    async fn get_rebalance_status(
        &self,
        _request: Request<GetRebalanceStatusRequest>,
    ) -> Result<Response<GetRebalanceStatusResponse>, Status> {
        let table = self
            .router
            .control_read(|c| {
                let mut c = c.max_decoding_message_size(16 << 20);
                async move { c.get_routing_table(GetRoutingTableRequest {}).await }
            })
            .await?;
        let list = self
            .router
            .control_read(|mut c| async move {
                c.list_migrations(ListMigrationsRequest { include_finished: true }).await
            })
            .await?;
        let desired = nid_proto::placement::desired_for(&table).unwrap_or_default();
        let misplaced = table.owner.iter().zip(&desired).filter(|(o, d)| o != d).count() as u32;
        let cells = table
            .cells
            .iter()
            .map(|c| CellBuckets {
                cell_id: c.cell_id,
                state: c.state,
                owned: table.owner.iter().filter(|&&o| o == c.cell_id).count() as u32,
                desired: desired.iter().filter(|&&d| d == c.cell_id).count() as u32,
            })
            .collect();
        let last_commit = list
            .migrations
            .iter()
            .filter(|m| m.phase == MigrationPhase::CleanedUp as i32)
            .filter_map(|m| m.updated_at)
            .max_by_key(|t| (t.seconds, t.nanos));
        Ok(Response::new(GetRebalanceStatusResponse {
            buckets_misplaced: misplaced,
            migrations: list.migrations,
            last_commit,
            settings: list.settings,
            cells,
            table_version: table.version,
        }))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<VerifyAuditChainRequest>,
    ) -> Result<Response<VerifyAuditChainResponse>, Status> {
        self.require_admin(request.metadata())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let caller = crate::service::caller_of(&request);
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
            &caller,
            |r| match r {
                nid_proto::v1::cell_response::Result::VerifyAuditChain(r) => Some(r),
                _ => None,
            },
        )
        .await
    }
}

/// A partner's rate limit: at most a million per second, and a burst no smaller than one.
fn check_limits(v: &mut FieldViolations, rate: Option<u32>, burst: Option<u32>) {
    if rate.is_some_and(|r| r > 1_000_000) {
        v.add("rate_per_second", "at most 1000000 (0: no limit)");
    }
    if burst.is_some_and(|b| b > 1_000_000) {
        v.add("burst", "at most 1000000 (0: the rate)");
    }
}
