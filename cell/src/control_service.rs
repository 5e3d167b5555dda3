//! The `nid.v1.Control` service of the control cell: cluster creation, the routing table (read and
//! watched), the cell registry, bucket-move commits and partners. Every write is checked here
//! before it is proposed (the state machine checks again: apply is total either way).

use crate::error::CellError;
use nid_control::commands::{CommitMove, Init, PutPartner, check_cell, check_init, control_command};
use nid_control::{Changed, ControlCommand, ControlMachine, store};
use nid_domain::validate::partner_id_ok;
use nid_engine::Node;
use nid_proto::bucket::BucketId;
use nid_proto::error::FieldViolations;
use nid_proto::v1::control_server::Control;
use nid_proto::v1::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// How long a control write or read may wait for Raft.
const RAFT_TIMEOUT: Duration = Duration::from_secs(5);

/// The control cell's side of one replica.
pub struct ControlCell {
    /// The replica.
    pub node: Node<ControlMachine>,
    /// The applied routing-table version (watchers wake on its changes).
    pub table_version: watch::Receiver<u64>,
}

/// The `Control` service.
pub struct ControlService(pub Arc<ControlCell>);

type TableStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<RoutingTable, Status>> + Send>>;

impl ControlCell {
    fn engine_error(&self, e: nid_engine::EngineError) -> CellError {
        CellError::from_engine(e, self.node.cell_id(), |id| self.node.book().address(id))
    }

    /// A linearizable read of the control state.
    async fn read<T>(
        &self,
        f: impl FnOnce(&dyn nid_engine::KvRead) -> Result<T, nid_engine::StorageError>,
    ) -> Result<T, CellError> {
        self.node.read_barrier(RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))?;
        self.node.view(|v| f(v)).map_err(|_| CellError::Internal("storage error".into()))
    }

    async fn table(&self) -> Result<RoutingTable, CellError> {
        self.read(store::table)
            .await?
            .ok_or_else(|| CellError::NotAllowed("the cluster has not been initialized".into()))
    }

    /// A linearizable read of the control state, for the rebalancer.
    pub async fn read_state<T>(
        &self,
        f: impl FnOnce(&dyn nid_engine::KvRead) -> Result<T, nid_engine::StorageError>,
    ) -> Result<T, Status> {
        Ok(self.read(f).await?)
    }

    /// Proposes a control command, for the rebalancer.
    pub async fn propose_kind(&self, kind: control_command::Kind) -> Result<Changed, Status> {
        Ok(self.propose(kind).await?)
    }

    async fn propose(&self, kind: control_command::Kind) -> Result<Changed, CellError> {
        let command = ControlCommand::new(kind);
        Ok(self.node.propose(&command, RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))??)
    }
}

fn checked(problem: Option<(&'static str, &'static str)>) -> Result<(), CellError> {
    match problem {
        Some((field, description)) => Err(CellError::field(field, description)),
        None => Ok(()),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<InitClusterResponse>, Status> {
        let req = request.into_inner();
        let config = req.config.ok_or_else(|| CellError::field("config", "is required"))?;
        let mut table = req.table.ok_or_else(|| CellError::field("table", "is required"))?;
        if table.cells.is_empty() {
            table.cells = req.cells;
        }
        checked(check_init(&config, &table))?;
        let changed = self
            .0
            .propose(control_command::Kind::Init(Init { config: Some(config), table: Some(table) }))
            .await?;
        Ok(Response::new(InitClusterResponse { table_version: changed.version, created: changed.changed }))
    }

    async fn get_cluster_config(
        &self,
        _request: Request<GetClusterConfigRequest>,
    ) -> Result<Response<ClusterConfig>, Status> {
        let config = self
            .0
            .read(store::config)
            .await?
            .ok_or_else(|| CellError::NotAllowed("the cluster has not been initialized".into()))?;
        Ok(Response::new(config))
    }

    async fn get_routing_table(
        &self,
        _request: Request<GetRoutingTableRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        Ok(Response::new(self.0.table().await?))
    }

    type WatchRoutingTableStream = TableStream;

    async fn watch_routing_table(
        &self,
        request: Request<WatchRoutingTableRequest>,
    ) -> Result<Response<Self::WatchRoutingTableStream>, Status> {
        let mut known = request.into_inner().known_version;
        let cell = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut changes = cell.table_version.clone();
            loop {
                if tx.is_closed() {
                    return;
                }
                // A new version is read linearizably before it is sent (the watch channel only
                // says that one applied here).
                if *changes.borrow_and_update() > known || known == 0 {
                    match cell.table().await {
                        Ok(t) if t.version > known => {
                            known = t.version;
                            if tx.send(Ok(t)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                // Wake on the next applied version, or every second to notice a lost leadership.
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
                if !cell.node.is_leader() {
                    let leader = cell.node.leader();
                    let _ = tx
                        .send(Err(cell.engine_error(nid_engine::EngineError::NotLeader { leader }).into()))
                        .await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn register_cell(
        &self,
        request: Request<RegisterCellRequest>,
    ) -> Result<Response<RegisterCellResponse>, Status> {
        let cell = request.into_inner().cell.ok_or_else(|| CellError::field("cell", "is required"))?;
        checked(check_cell(&cell))?;
        let changed = self.0.propose(control_command::Kind::RegisterCell(cell)).await?;
        Ok(Response::new(RegisterCellResponse { table_version: changed.version }))
    }

    async fn list_cells(
        &self,
        _request: Request<ListCellsRequest>,
    ) -> Result<Response<ListCellsResponse>, Status> {
        Ok(Response::new(ListCellsResponse { cells: self.0.table().await?.cells }))
    }

    async fn commit_bucket_move(
        &self,
        request: Request<CommitBucketMoveRequest>,
    ) -> Result<Response<CommitBucketMoveResponse>, Status> {
        let req = request.into_inner();
        let bucket =
            BucketId::new(req.bucket).ok_or_else(|| CellError::field("bucket", "must be < 16384"))?;
        if req.from_cell == req.to_cell {
            return Err(CellError::field("to_cell", "must differ from from_cell").into());
        }
        let changed = self
            .0
            .propose(control_command::Kind::CommitMove(CommitMove {
                bucket: u32::from(bucket.get()),
                from: req.from_cell,
                to: req.to_cell,
                expected_epoch: req.expected_epoch,
                buckets: Vec::new(),
                expected_epochs: Vec::new(),
            }))
            .await?;
        let epoch = req
            .expected_epoch
            .checked_add(1)
            .ok_or_else(|| CellError::NotAllowed("epoch exhausted".into()))?;
        Ok(Response::new(CommitBucketMoveResponse { table_version: changed.version, epoch }))
    }

    async fn record_migration(
        &self,
        request: Request<RecordMigrationRequest>,
    ) -> Result<Response<RecordMigrationResponse>, Status> {
        let m = request.into_inner().migration.ok_or_else(|| CellError::field("migration", "is required"))?;
        if BucketId::new(m.bucket).is_none() {
            return Err(CellError::field("migration.bucket", "must be < 16384").into());
        }
        if m.from_cell == m.to_cell {
            return Err(CellError::field("migration.to_cell", "must differ from from_cell").into());
        }
        self.0.propose(control_command::Kind::RecordMigration(m)).await?;
        Ok(Response::new(RecordMigrationResponse {}))
    }

    async fn list_migrations(
        &self,
        request: Request<ListMigrationsRequest>,
    ) -> Result<Response<ListMigrationsResponse>, Status> {
        let include_finished = request.into_inner().include_finished;
        let (log, settings) = self.0.read(|v| Ok((store::migrations(v)?, store::rebalance(v)?))).await?;
        let mut migrations = log.active;
        if include_finished {
            migrations.extend(log.finished.into_iter().rev());
        }
        Ok(Response::new(ListMigrationsResponse { migrations, settings: Some(settings) }))
    }

    async fn set_cell_state(
        &self,
        request: Request<SetCellStateRequest>,
    ) -> Result<Response<SetCellStateResponse>, Status> {
        let req = request.into_inner();
        if !matches!(
            CellState::try_from(req.state),
            Ok(CellState::Joining | CellState::Active | CellState::Draining)
        ) {
            return Err(CellError::field("state", "must be JOINING, ACTIVE or DRAINING").into());
        }
        let changed = self
            .0
            .propose(control_command::Kind::SetCellState(nid_control::commands::SetCellState {
                cell_id: req.cell_id,
                state: req.state,
            }))
            .await?;
        Ok(Response::new(SetCellStateResponse { table_version: changed.version }))
    }

    async fn replace_cell_replicas(
        &self,
        request: Request<ReplaceCellReplicasRequest>,
    ) -> Result<Response<ReplaceCellReplicasResponse>, Status> {
        let req = request.into_inner();
        if req.replicas.is_empty() || req.replicas.len() > 9 {
            return Err(CellError::field("replicas", "1..=9 replicas").into());
        }
        let changed = self
            .0
            .propose(control_command::Kind::UpdateReplicas(nid_control::commands::UpdateReplicas {
                cell_id: req.cell_id,
                replicas: req.replicas,
                expected: req.expected,
            }))
            .await?;
        Ok(Response::new(ReplaceCellReplicasResponse { table_version: changed.version }))
    }

    async fn remove_cell(
        &self,
        request: Request<RemoveCellRequest>,
    ) -> Result<Response<RemoveCellResponse>, Status> {
        let changed = self.0.propose(control_command::Kind::RemoveCell(request.into_inner().cell_id)).await?;
        Ok(Response::new(RemoveCellResponse { table_version: changed.version }))
    }

    async fn set_rebalance(
        &self,
        request: Request<SetRebalanceRequest>,
    ) -> Result<Response<RebalanceSettings>, Status> {
        let req = request.into_inner();
        checked(nid_control::commands::check_rebalance(&req))?;
        self.0.propose(control_command::Kind::SetRebalance(req)).await?;
        Ok(Response::new(self.0.read(store::rebalance).await?))
    }

    async fn put_partner(
        &self,
        request: Request<PutPartnerRequest>,
    ) -> Result<Response<PutPartnerResponse>, Status> {
        let req = request.into_inner();
        let partner = req.partner.ok_or_else(|| CellError::field("partner", "is required"))?;
        let mut v = FieldViolations::new();
        if !partner_id_ok(&partner.partner_id) {
            v.add("partner.partner_id", "must be 1..=64 characters of a-z, 0-9 and '-'");
        }
        if partner.name.chars().count() > 128 {
            v.add("partner.name", "at most 128 characters");
        }
        if partner.allowed_auth_types.iter().any(|t| !["demographic", "pin", "totp"].contains(&t.as_str())) {
            v.add("partner.allowed_auth_types", "each must be demographic, pin or totp");
        }
        if req.secret_digest.len() != 32 {
            v.add("secret_digest", "must be 32 bytes");
        }
        if !v.is_empty() {
            return Err(CellError::Invalid(v).into());
        }
        let record = PartnerRecord { partner: Some(partner), secret_digest: req.secret_digest };
        let changed = self
            .0
            .propose(control_command::Kind::PutPartner(PutPartner {
                partner: Some(record),
                create_only: req.create_only,
            }))
            .await?;
        Ok(Response::new(PutPartnerResponse { partners_version: changed.version }))
    }

    async fn list_partners_internal(
        &self,
        _request: Request<ListPartnersInternalRequest>,
    ) -> Result<Response<ListPartnersInternalResponse>, Status> {
        Ok(Response::new(self.0.read(store::partners).await?))
    }
}
