//! The cell's gRPC services: the router->cell `Cell` API, `BucketAdmin`, and the mapping of every
//! internal outcome to a gRPC status (the one place this crate does it).
//!
//! Errors never quote identifiers or personal data; bad input gets INVALID_ARGUMENT with BadRequest
//! field violations; routing problems carry typed hints (not-leader, wrong-owner, retry-later).

use crate::command::{AuthPolicy, BucketState, Command, CommandResult, Rejection};
use crate::crypto::Keyring;
use crate::enroll::{self, PrepareError};
use crate::fsm::StateMachine;
use crate::handlers::Clock;
use crate::metrics::CellMetrics;
use crate::peer::{PeerError, PeerHandle, PeerMsg};
use crate::transport::{AddressBook, Member};
use nid_proto::bucket::BucketId;
use nid_proto::error::{FieldViolations, RoutingHint, invalid_field, status_with_reason};
use nid_proto::ids::IdScheme;
use nid_proto::v1::bucket_admin_server::BucketAdmin;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::cell_server::Cell;
use nid_proto::v1::control_server::Control;
use nid_proto::v1::membership_change::Kind;
use nid_proto::v1::{
    BucketExportChunk, CellInfo, CellRequest, CellResponse, CellState, CellStatus, ChangeMembershipRequest,
    ChangeMembershipResponse, ChecksumBucketRequest, ChecksumBucketResponse, DeleteBucketRequest,
    DeleteBucketResponse, EchoRequest, EchoResponse, EnrollRequest, EnrollResponse, ErrorReason,
    ExportBucketRequest, GetCellStatusRequest, GetSigningKeysRequest, GetSigningKeysResponse,
    ImportBucketResponse, PartnerRecord, ReplicaInfo, ReplicaStatus, ServedBy, SetBucketStateRequest,
    SetBucketStateResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use nid_proto::v1::{
    ClusterConfig, CommitBucketMoveRequest, CommitBucketMoveResponse, GetClusterConfigRequest,
    GetRoutingTableRequest, InitClusterRequest, InitClusterResponse, ListCellsRequest, ListCellsResponse,
    ListMigrationsRequest, ListMigrationsResponse, ListPartnersInternalRequest, ListPartnersInternalResponse,
    PutPartnerRequest, PutPartnerResponse, RecordMigrationRequest, RecordMigrationResponse,
    RegisterCellRequest, RegisterCellResponse, RoutingTable, WatchRoutingTableRequest,
};
use prost::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Request, Response, Status, Streaming};

/// How long a write or read may wait for Raft.
pub const RAFT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the services of one replica share.
pub struct CellContext {
    /// Cell id.
    pub cell_id: u64,
    /// Node id.
    pub node_id: u64,
    /// The Raft loop.
    pub peer: PeerHandle,
    /// Applied-state reads.
    pub fsm: StateMachine,
    /// Keys.
    pub keyring: Arc<Keyring>,
    /// The id scheme.
    pub scheme: IdScheme,
    /// Members' addresses.
    pub book: Arc<AddressBook>,
    /// Metrics.
    pub metrics: Arc<CellMetrics>,
    /// The clock commands are stamped with.
    pub clock: Arc<Clock>,
    /// Lockout and skew policy for authentication.
    pub auth_policy: AuthPolicy,
}

impl CellContext {
    pub(crate) fn served_by(&self) -> ServedBy {
        ServedBy { cell_id: self.cell_id, node_id: self.node_id, table_version: 0 }
    }

    /// Maps a Raft-side failure to a status.
    pub fn peer_status(&self, e: PeerError) -> Status {
        match e {
            PeerError::NotLeader { leader } => RoutingHint::NotLeader {
                cell_id: self.cell_id,
                leader: leader.and_then(|id| self.book.address(id).map(|a| (id, a))),
            }
            .into_status(),
            PeerError::Timeout => status_with_reason(
                Code::DeadlineExceeded,
                "the cell did not answer in time; the outcome of a write is unknown",
                ErrorReason::Timeout,
                &[],
            ),
            PeerError::Dropped => RoutingHint::RetryLater { after: Duration::from_millis(50) }.into_status(),
            PeerError::Busy => Status::resource_exhausted("the replica is overloaded; retry with backoff"),
            PeerError::Stopped => Status::unavailable("the replica is stopping"),
            PeerError::Invalid(m) => Status::failed_precondition(m),
        }
    }

    pub(crate) fn rejection_status(&self, r: Rejection) -> Status {
        match r {
            Rejection::WrongOwner { bucket, table_version } => {
                RoutingHint::WrongOwner { bucket, owner_cell: None, table_version }.into_status()
            }
            Rejection::RetryLater { .. } => {
                RoutingHint::RetryLater { after: Duration::from_millis(100) }.into_status()
            }
            Rejection::RidConflict => status_with_reason(
                Code::AlreadyExists,
                "the rid was enrolled with a different payload",
                ErrorReason::RidConflict,
                &[],
            ),
            Rejection::CandidatesTaken => Status::unavailable("uin candidates collided; retry"),
            Rejection::StaleTableVersion { current } => Status::failed_precondition(format!(
                "routing-table version is older than the recorded {current}"
            )),
            Rejection::Malformed(_) => Status::internal("the command could not be applied"),
            Rejection::MoveConflict => {
                Status::aborted("the bucket's owner or epoch changed; read the table and retry")
            }
            Rejection::ClusterExists => Status::already_exists("the cluster exists with another config"),
            Rejection::PartnerExists => Status::already_exists("a partner with this id exists"),
            Rejection::NoCluster => Status::failed_precondition("the cluster has not been initialized"),
            Rejection::NotFound => crate::handlers::not_found(),
            Rejection::VersionMismatch { current } => status_with_reason(
                Code::Aborted,
                format!("expected_version is stale; the current version is {current}"),
                ErrorReason::VersionMismatch,
                &[("current_version", current.to_string())],
            ),
            Rejection::NotAllowed(m) => Status::failed_precondition(m),
        }
    }

    async fn enroll(&self, req: EnrollRequest, route_bucket: Option<u32>) -> Result<EnrollResponse, Status> {
        let bucket = enroll::bucket_of_rid(&req.rid);
        if let Some(b) = route_bucket
            && !req.rid.is_empty()
            && b != u32::from(bucket.get())
        {
            return Err(invalid_field("route.bucket", "does not match the bucket of rid"));
        }
        // Candidates can collide with existing UINs (rarely): prepare fresh ones and retry.
        for _ in 0..3 {
            let cmd = match enroll::prepare(&req, &self.keyring, &self.scheme, self.clock.now_ms()) {
                Ok(cmd) => cmd,
                Err(PrepareError::Invalid(v)) => return Err(violations_status(v)),
                Err(PrepareError::Random) => return Err(Status::internal("random source failed")),
            };
            match self
                .peer
                .propose(Command::Enroll(cmd), RAFT_TIMEOUT)
                .await
                .map_err(|e| self.peer_status(e))?
            {
                CommandResult::Enrolled { uin, created, totp_secret } => {
                    return Ok(EnrollResponse {
                        uin,
                        created,
                        totp_secret: totp_secret.unwrap_or_default(),
                        served_by: Some(self.served_by()),
                    });
                }
                CommandResult::Rejected(Rejection::CandidatesTaken) => continue,
                CommandResult::Rejected(r) => return Err(self.rejection_status(r)),
                _ => return Err(Status::internal("unexpected result")),
            }
        }
        Err(Status::unavailable("uin candidates kept colliding; retry"))
    }

    /// A linearizable read barrier followed by the ownership check for `bucket`.
    pub(crate) async fn read_fence(&self, bucket: BucketId) -> Result<(), Status> {
        self.peer.read_barrier(RAFT_TIMEOUT).await.map_err(|e| self.peer_status(e))?;
        let rec = self.fsm.bucket_record(bucket.get()).map_err(|_| Status::internal("storage error"))?;
        match rec.state {
            BucketState::Owned | BucketState::Frozen => Ok(()),
            BucketState::Importing => {
                Err(self.rejection_status(Rejection::RetryLater { bucket: bucket.get() }))
            }
            BucketState::NotOwned => Err(self.rejection_status(Rejection::WrongOwner {
                bucket: bucket.get(),
                table_version: rec.table_version,
            })),
        }
    }
}

/// The status of a set of field violations.
pub(crate) fn violations_status(v: FieldViolations) -> Status {
    match v.into_result() {
        Err(status) => status,
        Ok(()) => Status::invalid_argument("invalid request"),
    }
}

/// Runs `f`, recording its method, gRPC code and latency in the replica's metrics.
async fn observed<T>(
    metrics: &CellMetrics,
    method: &'static str,
    f: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    nid_support::observed(
        method,
        |method, code, secs| {
            metrics.grpc_requests.with_label_values(&[method, code]).inc();
            metrics.grpc_seconds.with_label_values(&[method]).observe(secs);
        },
        f,
    )
    .await
}

/// The `Cell` service.
pub struct CellService(pub Arc<CellContext>);

#[tonic::async_trait]
impl Cell for CellService {
    async fn execute(&self, request: Request<CellRequest>) -> Result<Response<CellResponse>, Status> {
        let ctx = &self.0;
        let req = request.into_inner();
        let route_bucket = req.route.as_ref().map(|r| r.bucket);
        let op = req.operation.clone().ok_or_else(|| invalid_field("operation", "is required"))?;
        let (method, fut): (
            &'static str,
            std::pin::Pin<Box<dyn Future<Output = Result<CellResult, Status>> + Send + '_>>,
        ) = match op {
            Operation::Enroll(r) => {
                ("Enroll", Box::pin(async move { ctx.enroll(r, route_bucket).await.map(CellResult::Enroll) }))
            }
            Operation::GetIdentity(r) => (
                "GetIdentity",
                Box::pin(async move { ctx.get_identity(r).await.map(CellResult::GetIdentity) }),
            ),
            Operation::UpdateIdentity(r) => (
                "UpdateIdentity",
                Box::pin(async move { ctx.update_identity(r).await.map(CellResult::UpdateIdentity) }),
            ),
            Operation::SetStatus(r) => {
                ("SetStatus", Box::pin(async move { ctx.set_status(r).await.map(CellResult::SetStatus) }))
            }
            Operation::GetHistory(r) => {
                ("GetHistory", Box::pin(async move { ctx.get_history(r).await.map(CellResult::GetHistory) }))
            }
            Operation::CreateVid(r) => {
                ("CreateVid", Box::pin(async move { ctx.create_vid(r).await.map(CellResult::CreateVid) }))
            }
            Operation::RevokeVid(r) => {
                ("RevokeVid", Box::pin(async move { ctx.revoke_vid(r).await.map(CellResult::RevokeVid) }))
            }
            Operation::LockAuthTypes(r) => (
                "LockAuthTypes",
                Box::pin(async move { ctx.lock_auth_types(r).await.map(CellResult::LockAuthTypes) }),
            ),
            Operation::Authenticate(r) => {
                let route = req.route.clone();
                (
                    "Authenticate",
                    Box::pin(async move {
                        ctx.authenticate(r, route.as_ref(), ctx.auth_policy)
                            .await
                            .map(CellResult::Authenticate)
                    }),
                )
            }
            Operation::GetAuthHistory(r) => (
                "GetAuthHistory",
                Box::pin(async move { ctx.get_auth_history(r).await.map(CellResult::GetAuthHistory) }),
            ),
            Operation::VerifyAuditChain(r) => (
                "VerifyAuditChain",
                Box::pin(async move { ctx.verify_audit_chain(r).await.map(CellResult::VerifyAuditChain) }),
            ),
        };
        observed(&ctx.metrics, method, async move {
            let result = fut.await?;
            Ok(CellResponse { result: Some(result), served_by: Some(ctx.served_by()) })
        })
        .await
    }

    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let payload = request.into_inner().payload;
        if payload.len() > 64 << 10 {
            return Err(invalid_field("payload", "must be at most 64 KiB"));
        }
        Ok(Response::new(EchoResponse { payload }))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<GetSigningKeysRequest>,
    ) -> Result<Response<GetSigningKeysResponse>, Status> {
        Ok(Response::new(self.0.signing_keys()))
    }

    async fn get_cell_status(
        &self,
        _request: Request<GetCellStatusRequest>,
    ) -> Result<Response<CellStatus>, Status> {
        let ctx = &self.0;
        observed(&ctx.metrics, "GetCellStatus", async {
            let s = ctx.peer.status().await.map_err(|e| ctx.peer_status(e))?;
            let owned = ctx.fsm.bucket_counts().map_err(|_| Status::internal("storage error"))?;
            let members = ctx.book.members();
            let replicas = members
                .iter()
                .map(|m| ReplicaStatus {
                    node_id: m.id,
                    address: m.address.clone(),
                    zone: m.zone.clone(),
                    is_leader: s.leader_id == m.id,
                    applied_index: if m.id == ctx.node_id {
                        s.applied
                    } else {
                        s.matched.iter().find(|(id, _)| *id == m.id).map(|(_, i)| *i).unwrap_or(0)
                    },
                    healthy: s.voters.contains(&m.id) || s.learners.contains(&m.id),
                })
                .collect();
            Ok(CellStatus {
                cell: Some(CellInfo {
                    cell_id: ctx.cell_id,
                    replicas: members
                        .iter()
                        .map(|m| ReplicaInfo {
                            node_id: m.id,
                            address: m.address.clone(),
                            zone: m.zone.clone(),
                        })
                        .collect(),
                    weight: 1,
                    state: CellState::Active as i32,
                }),
                replicas,
                buckets_owned: owned.get("owned").copied().unwrap_or(0) as u32,
                term: s.term,
            })
        })
        .await
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        let ctx = &self.0;
        let req = request.into_inner();
        observed(&ctx.metrics, "ChangeMembership", async {
            let (cc, added) = membership_change(&req, &ctx.book.members())?;
            let cs = ctx.peer.change_membership(cc, RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))?;
            tracing::info!(cell = ctx.cell_id, added = added.len(), voters = ?cs.voters, "membership change applied");
            Ok(ChangeMembershipResponse { voters: cs.voters, learners: cs.learners })
        })
        .await
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let ctx = &self.0;
        let to = Some(request.into_inner().to_node).filter(|&n| n != 0);
        observed(&ctx.metrics, "TransferLeader", async {
            if ctx.peer.leader() != Some(ctx.node_id) {
                return Err(ctx.peer_status(PeerError::NotLeader { leader: ctx.peer.leader() }));
            }
            ctx.peer.send(PeerMsg::TransferLeader { to }).map_err(|e| ctx.peer_status(e))?;
            Ok(TransferLeaderResponse {})
        })
        .await
    }
}

/// Validates a membership request against the current members and builds the Raft change.
pub fn membership_change(
    req: &ChangeMembershipRequest,
    current: &[Member],
) -> Result<(ConfChangeV2, Vec<Member>), Status> {
    let mut v = FieldViolations::new();
    if req.changes.is_empty() {
        v.add("changes", "at least one change is required");
    }
    let mut steps = Vec::new();
    let mut added = Vec::new();
    for (i, c) in req.changes.iter().enumerate() {
        let field = |f: &str| format!("changes[{i}].{f}");
        if c.node_id == 0 {
            v.add(field("node_id"), "must be > 0");
        }
        let kind = Kind::try_from(c.kind).unwrap_or(Kind::Unspecified);
        let change_type = match kind {
            Kind::AddVoter => ConfChangeType::AddNode,
            Kind::AddLearner => ConfChangeType::AddLearnerNode,
            Kind::Remove => ConfChangeType::RemoveNode,
            Kind::Unspecified => {
                v.add(field("kind"), "must be ADD_VOTER, ADD_LEARNER or REMOVE");
                continue;
            }
        };
        if change_type != ConfChangeType::RemoveNode {
            let known = current.iter().find(|m| m.id == c.node_id);
            if c.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
                && known.is_none()
            {
                v.add(field("address"), "host:port is required when adding a replica");
            }
            if c.zone.is_empty() && known.is_none() {
                v.add(field("zone"), "is required when adding a replica");
            }
            let address = if c.address.is_empty() {
                known.map(|m| m.address.clone()).unwrap_or_default()
            } else {
                c.address.clone()
            };
            let zone = if c.zone.is_empty() {
                known.map(|m| m.zone.clone()).unwrap_or_default()
            } else {
                c.zone.clone()
            };
            added.push(Member { id: c.node_id, address, zone });
        }
        let mut step = ConfChangeSingle::default();
        step.set_change_type(change_type);
        step.node_id = c.node_id;
        steps.push(step);
    }
    if !v.is_empty() {
        return Err(violations_status(v));
    }
    let mut cc = ConfChangeV2::default();
    cc.set_changes(steps.into());
    if req.changes.len() > 1 {
        cc.set_transition(ConfChangeTransition::Auto);
    }
    cc.context = crate::codec::encode(&added).into();
    Ok((cc, added))
}

/// The `BucketAdmin` service: ownership changes and checksums (migration streaming arrives with the
/// rebalancer).
pub struct BucketAdminService(pub Arc<CellContext>);

type ExportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BucketExportChunk, Status>> + Send>>;

#[tonic::async_trait]
impl BucketAdmin for BucketAdminService {
    async fn set_bucket_state(
        &self,
        request: Request<SetBucketStateRequest>,
    ) -> Result<Response<SetBucketStateResponse>, Status> {
        let ctx = &self.0;
        let req = request.into_inner();
        observed(&ctx.metrics, "SetBucketState", async {
            let mut v = FieldViolations::new();
            let mut buckets = Vec::with_capacity(req.buckets.len());
            for b in &req.buckets {
                match BucketId::new(*b) {
                    Some(id) => buckets.push(id.get()),
                    None => {
                        v.add("buckets", "every bucket must be < 16384");
                        break;
                    }
                }
            }
            if buckets.is_empty() && v.is_empty() {
                v.add("buckets", "at least one bucket is required");
            }
            let state = match nid_proto::v1::BucketState::try_from(req.state) {
                Ok(nid_proto::v1::BucketState::NotOwned) => BucketState::NotOwned,
                Ok(nid_proto::v1::BucketState::Owned) => BucketState::Owned,
                Ok(nid_proto::v1::BucketState::Importing) => BucketState::Importing,
                Ok(nid_proto::v1::BucketState::Frozen) => BucketState::Frozen,
                Err(_) => {
                    v.add("state", "unknown bucket state");
                    BucketState::NotOwned
                }
            };
            if req.table_version == 0 {
                v.add("table_version", "must be > 0");
            }
            if !v.is_empty() {
                return Err(violations_status(v));
            }
            let cmd = Command::SetBuckets { buckets, state, table_version: req.table_version };
            match ctx.peer.propose(cmd, RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))? {
                CommandResult::BucketsSet => Ok(SetBucketStateResponse {
                    applied_index: ctx.peer.shared.applied.load(std::sync::atomic::Ordering::Relaxed),
                }),
                CommandResult::Rejected(r) => Err(ctx.rejection_status(r)),
                _ => Err(Status::internal("unexpected result")),
            }
        })
        .await
    }

    type ExportBucketStream = ExportStream;

    async fn export_bucket(
        &self,
        _request: Request<ExportBucketRequest>,
    ) -> Result<Response<Self::ExportBucketStream>, Status> {
        Err(Status::unimplemented("bucket export arrives with the rebalancer (issue #4)"))
    }

    async fn import_bucket(
        &self,
        _request: Request<Streaming<BucketExportChunk>>,
    ) -> Result<Response<ImportBucketResponse>, Status> {
        Err(Status::unimplemented("bucket import arrives with the rebalancer (issue #4)"))
    }

    async fn checksum_bucket(
        &self,
        request: Request<ChecksumBucketRequest>,
    ) -> Result<Response<ChecksumBucketResponse>, Status> {
        let ctx = &self.0;
        let req = request.into_inner();
        observed(&ctx.metrics, "ChecksumBucket", async {
            let bucket =
                BucketId::new(req.bucket).ok_or_else(|| invalid_field("bucket", "must be < 16384"))?;
            ctx.peer.read_barrier(RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))?;
            let applied = ctx.peer.shared.applied.load(std::sync::atomic::Ordering::Relaxed);
            let (records, digest) =
                ctx.fsm.bucket_digest(bucket).map_err(|_| Status::internal("storage error"))?;
            Ok(ChecksumBucketResponse { records, sha256: digest.to_vec(), applied_index: applied })
        })
        .await
    }

    async fn delete_bucket(
        &self,
        _request: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        Err(Status::unimplemented("bucket cleanup arrives with the rebalancer (issue #4)"))
    }
}

/// The control cell's `Control` service (served only with `--role control`): cluster config,
/// cell registry and routing table. Migrations and partners arrive with their issues.
pub struct ControlService(pub Arc<CellContext>);

type TableStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<RoutingTable, Status>> + Send>>;

impl ControlService {
    async fn read_table(&self) -> Result<RoutingTable, Status> {
        let ctx = &self.0;
        ctx.peer.read_barrier(RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))?;
        ctx.fsm
            .routing_table()
            .map_err(|_| Status::internal("storage error"))?
            .ok_or_else(|| Status::failed_precondition("the cluster has not been initialized"))
    }

    async fn propose_control(&self, cmd: Command) -> Result<(bool, u64), Status> {
        let ctx = &self.0;
        match ctx.peer.propose(cmd, RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))? {
            CommandResult::Control { changed, version } => Ok((changed, version)),
            CommandResult::Rejected(r) => Err(ctx.rejection_status(r)),
            _ => Err(Status::internal("unexpected result")),
        }
    }
}

/// A partner id: 1..=64 characters of [a-z0-9-].
pub fn valid_partner_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a routing table's shape: one owner and epoch per bucket, owners among its cells.
pub fn validate_table(table: &RoutingTable, field: &str) -> Result<(), Status> {
    let n = usize::from(nid_proto::bucket::BUCKETS);
    if table.owner.len() != n || table.epoch.len() != n {
        return Err(invalid_field(
            &format!("{field}.owner"),
            "must have one owner and one epoch per bucket (16384)",
        ));
    }
    let cells: std::collections::HashSet<u64> = table.cells.iter().map(|c| c.cell_id).collect();
    if table.owner.iter().any(|o| !cells.contains(o)) {
        return Err(invalid_field(&format!("{field}.owner"), "every owner must be one of the table's cells"));
    }
    if table.version == 0 {
        return Err(invalid_field(&format!("{field}.version"), "must be > 0"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<InitClusterResponse>, Status> {
        let req = request.into_inner();
        observed(&self.0.metrics, "InitCluster", async {
            let config = req.config.ok_or_else(|| invalid_field("config", "is required"))?;
            if config.buckets != u32::from(nid_proto::bucket::BUCKETS) {
                return Err(invalid_field("config.buckets", "must be 16384"));
            }
            if config.id_scheme_seed.len() != 32 {
                return Err(invalid_field("config.id_scheme_seed", "must be 32 bytes"));
            }
            let mut table = req.table.ok_or_else(|| invalid_field("table", "is required"))?;
            if table.cells.is_empty() {
                table.cells = req.cells;
            }
            validate_table(&table, "table")?;
            let cmd = Command::ControlInit { config: config.encode_to_vec(), table: table.encode_to_vec() };
            let (created, version) = self.propose_control(cmd).await?;
            Ok(InitClusterResponse { table_version: version, created })
        })
        .await
    }

    async fn get_cluster_config(
        &self,
        _request: Request<GetClusterConfigRequest>,
    ) -> Result<Response<ClusterConfig>, Status> {
        let ctx = &self.0;
        observed(&ctx.metrics, "GetClusterConfig", async {
            ctx.peer.read_barrier(RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))?;
            ctx.fsm
                .cluster_config()
                .map_err(|_| Status::internal("storage error"))?
                .ok_or_else(|| Status::failed_precondition("the cluster has not been initialized"))
        })
        .await
    }

    async fn get_routing_table(
        &self,
        _request: Request<GetRoutingTableRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        observed(&self.0.metrics, "GetRoutingTable", self.read_table()).await
    }

    type WatchRoutingTableStream = TableStream;

    async fn watch_routing_table(
        &self,
        request: Request<WatchRoutingTableRequest>,
    ) -> Result<Response<Self::WatchRoutingTableStream>, Status> {
        let mut known = request.into_inner().known_version;
        let ctx = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // Sends every version above the known one, polling the applied state.
            loop {
                if tx.is_closed() {
                    return;
                }
                let table = match ctx.peer.read_barrier(RAFT_TIMEOUT).await {
                    Ok(()) => ctx.fsm.routing_table().ok().flatten(),
                    Err(e) => {
                        let _ = tx.send(Err(ctx.peer_status(e))).await;
                        return;
                    }
                };
                if let Some(t) = table
                    && t.version > known
                {
                    known = t.version;
                    if tx.send(Ok(t)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn register_cell(
        &self,
        request: Request<RegisterCellRequest>,
    ) -> Result<Response<RegisterCellResponse>, Status> {
        let req = request.into_inner();
        observed(&self.0.metrics, "RegisterCell", async {
            let cell = req.cell.ok_or_else(|| invalid_field("cell", "is required"))?;
            if cell.cell_id == 0 {
                return Err(invalid_field("cell.cell_id", "must be > 0"));
            }
            if cell.replicas.is_empty() {
                return Err(invalid_field("cell.replicas", "at least one replica is required"));
            }
            let (_, version) =
                self.propose_control(Command::ControlRegisterCell { cell: cell.encode_to_vec() }).await?;
            Ok(RegisterCellResponse { table_version: version })
        })
        .await
    }

    async fn list_cells(
        &self,
        _request: Request<ListCellsRequest>,
    ) -> Result<Response<ListCellsResponse>, Status> {
        observed(&self.0.metrics, "ListCells", async {
            Ok(ListCellsResponse { cells: self.read_table().await?.cells })
        })
        .await
    }

    async fn commit_bucket_move(
        &self,
        request: Request<CommitBucketMoveRequest>,
    ) -> Result<Response<CommitBucketMoveResponse>, Status> {
        let req = request.into_inner();
        observed(&self.0.metrics, "CommitBucketMove", async {
            let bucket =
                BucketId::new(req.bucket).ok_or_else(|| invalid_field("bucket", "must be < 16384"))?;
            if req.from_cell == req.to_cell {
                return Err(invalid_field("to_cell", "must differ from from_cell"));
            }
            let cmd = Command::ControlCommitMove {
                bucket: bucket.get(),
                from: req.from_cell,
                to: req.to_cell,
                expected_epoch: req.expected_epoch,
            };
            let (_, version) = self.propose_control(cmd).await?;
            Ok(CommitBucketMoveResponse { table_version: version, epoch: req.expected_epoch + 1 })
        })
        .await
    }

    async fn record_migration(
        &self,
        _request: Request<RecordMigrationRequest>,
    ) -> Result<Response<RecordMigrationResponse>, Status> {
        Err(Status::unimplemented("migrations arrive with the rebalancer"))
    }

    async fn list_migrations(
        &self,
        _request: Request<ListMigrationsRequest>,
    ) -> Result<Response<ListMigrationsResponse>, Status> {
        Err(Status::unimplemented("migrations arrive with the rebalancer"))
    }

    async fn put_partner(
        &self,
        request: Request<PutPartnerRequest>,
    ) -> Result<Response<PutPartnerResponse>, Status> {
        let req = request.into_inner();
        observed(&self.0.metrics, "PutPartner", async {
            let partner = req.partner.ok_or_else(|| invalid_field("partner", "is required"))?;
            let mut v = FieldViolations::new();
            if !valid_partner_id(&partner.partner_id) {
                v.add("partner.partner_id", "must be 1..=64 characters of a-z, 0-9 and '-'");
            }
            if partner.name.chars().count() > 128 {
                v.add("partner.name", "at most 128 characters");
            }
            if partner
                .allowed_auth_types
                .iter()
                .any(|t| !["demographic", "pin", "totp"].contains(&t.as_str()))
            {
                v.add("partner.allowed_auth_types", "each must be demographic, pin or totp");
            }
            if req.secret_digest.len() != 32 {
                v.add("secret_digest", "must be 32 bytes");
            }
            if !v.is_empty() {
                return Err(violations_status(v));
            }
            let record = PartnerRecord { partner: Some(partner), secret_digest: req.secret_digest };
            let cmd =
                Command::ControlPutPartner { partner: record.encode_to_vec(), create_only: req.create_only };
            let (_, version) = self.propose_control(cmd).await?;
            Ok(PutPartnerResponse { partners_version: version })
        })
        .await
    }

    async fn list_partners_internal(
        &self,
        _request: Request<ListPartnersInternalRequest>,
    ) -> Result<Response<ListPartnersInternalResponse>, Status> {
        let ctx = &self.0;
        observed(&ctx.metrics, "ListPartnersInternal", async {
            ctx.peer.read_barrier(RAFT_TIMEOUT).await.map_err(|e| ctx.peer_status(e))?;
            ctx.fsm.partners().map_err(|_| Status::internal("storage error"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nid_proto::v1::MembershipChange;

    fn change(kind: Kind, node_id: u64, address: &str, zone: &str) -> MembershipChange {
        MembershipChange { kind: kind as i32, node_id, address: address.into(), zone: zone.into() }
    }

    fn fields(status: &Status) -> Vec<String> {
        nid_proto::error::FieldViolations::from_status(status)
            .violations()
            .iter()
            .map(|(f, _)| f.clone())
            .collect()
    }

    #[test]
    fn membership_requests_are_validated_field_by_field() {
        let current = vec![Member { id: 1, address: "h:1".into(), zone: "a".into() }];
        let empty = membership_change(&ChangeMembershipRequest { changes: vec![] }, &current).unwrap_err();
        assert_eq!(fields(&empty), vec!["changes"]);
        let bad = ChangeMembershipRequest {
            changes: vec![change(Kind::AddVoter, 0, "nope", ""), change(Kind::Unspecified, 2, "", "")],
        };
        let err = membership_change(&bad, &current).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            fields(&err),
            vec!["changes[0].node_id", "changes[0].address", "changes[0].zone", "changes[1].kind"]
        );
    }

    #[test]
    fn replace_is_one_joint_change_carrying_the_new_address() {
        let current = vec![Member { id: 3, address: "h:3".into(), zone: "c".into() }];
        let req = ChangeMembershipRequest {
            changes: vec![change(Kind::AddVoter, 4, "h:4", "c"), change(Kind::Remove, 3, "", "")],
        };
        let (cc, added) = membership_change(&req, &current).unwrap();
        assert_eq!(cc.changes.len(), 2);
        assert_eq!(cc.get_transition(), ConfChangeTransition::Auto);
        assert_eq!(added, vec![Member { id: 4, address: "h:4".into(), zone: "c".into() }]);
        let carried: Vec<Member> = crate::codec::decode(&cc.context).unwrap();
        assert_eq!(carried, added);
    }
}
