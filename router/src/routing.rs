//! The routing state of a router: the cached routing table (refreshed from the control cell, kept
//! when the control cell is unreachable), a leader cache per cell, pooled channels per replica,
//! and the forwarding loop that follows not-leader and wrong-owner hints within the deadline.

use crate::metrics::RouterMetrics;
use nid_proto::error::RoutingHint;
use nid_proto::ids::{IdScheme, IdSchemeSeed};
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::control_client::ControlClient;
use nid_proto::v1::{
    CellRequest, ClusterConfig, EchoRequest, GetClusterConfigRequest, GetRoutingTableRequest, RouteHeader,
    RoutingTable, WatchRoutingTableRequest,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A partner the router authenticated.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The partner id.
    pub partner_id: String,
    /// `nid.v1.AuthType` numbers it may use.
    pub allowed: Vec<i32>,
}

/// The routing table as the router uses it.
#[derive(Debug, Default)]
pub struct Table {
    /// Version.
    pub version: u64,
    /// Owner cell per bucket.
    pub owner: Vec<u64>,
    /// Replica addresses per cell.
    pub replicas: HashMap<u64, Vec<String>>,
    /// The registered cells.
    pub cells: Vec<nid_proto::v1::CellInfo>,
}

impl Table {
    fn from_proto(raw: RoutingTable) -> Table {
        let replicas = raw
            .cells
            .iter()
            .map(|c| (c.cell_id, c.replicas.iter().map(|r| r.address.clone()).collect()))
            .collect();
        Table { version: raw.version, owner: raw.owner, replicas, cells: raw.cells }
    }
}

/// Shared routing state.
pub struct Router {
    control: Vec<String>,
    table: RwLock<Arc<Table>>,
    scheme: RwLock<Option<Arc<IdScheme>>>,
    leaders: RwLock<HashMap<u64, String>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Metrics.
    pub metrics: Arc<RouterMetrics>,
}

impl Router {
    /// A router that learns its table from `control` replicas.
    pub fn new(control: Vec<String>, metrics: Arc<RouterMetrics>) -> Router {
        Router {
            control,
            table: RwLock::default(),
            scheme: RwLock::default(),
            leaders: RwLock::default(),
            channels: Mutex::default(),
            metrics,
        }
    }

    /// The cached table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// The id scheme of the cluster, once the config is known.
    pub fn scheme(&self) -> Result<Arc<IdScheme>, Status> {
        self.scheme
            .read()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| Status::unavailable("the router has not loaded the cluster config yet"))
    }

    /// A pooled channel to `address` (connected lazily, reconnecting by itself).
    pub fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().map_err(|_| Status::internal("channel pool poisoned"))?;
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|_| Status::internal("bad replica address in the routing table"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Fetches the config and table from the control cell (following its leader). Keeps the cached
    /// table on failure; never goes back to a lower version.
    pub async fn refresh(&self) -> Result<u64, Status> {
        if self.scheme.read().map(|s| s.is_none()).unwrap_or(true) {
            let config: ClusterConfig = self
                .control_read(|mut c| async move { c.get_cluster_config(GetClusterConfigRequest {}).await })
                .await?;
            let seed: [u8; 32] = config
                .id_scheme_seed
                .as_slice()
                .try_into()
                .map_err(|_| Status::internal("cluster config has a bad id-scheme seed"))?;
            if let Ok(mut s) = self.scheme.write() {
                *s = Some(Arc::new(IdScheme::new(&IdSchemeSeed::from_bytes(seed))));
            }
        }
        let raw = self
            .control_read(|c| {
                let mut c = c.max_decoding_message_size(16 << 20);
                async move { c.get_routing_table(GetRoutingTableRequest {}).await }
            })
            .await?;
        Ok(self.install(raw))
    }

    fn install(&self, raw: RoutingTable) -> u64 {
        let Ok(mut table) = self.table.write() else { return 0 };
        if raw.version > table.version {
            tracing::info!(version = raw.version, cells = raw.cells.len(), "routing table updated");
            *table = Arc::new(Table::from_proto(raw));
            self.metrics.table_version.set(table.version as i64);
        }
        table.version
    }

    /// Keeps the table current in the background: a watch stream on the control cell's leader
    /// (pushes each new version), falling back to a fetch every `period` while no watch holds.
    pub fn spawn_refresher(self: &Arc<Self>, period: Duration, watch: bool) {
        let router = self.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                if let Err(e) = router.refresh().await {
                    tracing::warn!(code = ?e.code(), "routing-table refresh failed; serving from the cached table");
                }
                if !watch || router.control.is_empty() {
                    tokio::time::sleep(period).await;
                    continue;
                }
                let address = router.control[next % router.control.len()].clone();
                next += 1;
                match router.watch(&address).await {
                    Ok(()) => {}
                    Err(e) => {
                        if let Some(RoutingHint::NotLeader { leader: Some((_, leader)), .. }) =
                            RoutingHint::from_status(&e)
                            && let Some(i) = router.control.iter().position(|a| *a == leader)
                        {
                            next = i;
                            continue;
                        }
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
    }

    /// Follows the control cell's watch stream until it ends or fails.
    async fn watch(&self, address: &str) -> Result<(), Status> {
        let mut client = ControlClient::new(self.channel(address)?).max_decoding_message_size(16 << 20);
        let known = self.table().version;
        let mut stream =
            client.watch_routing_table(WatchRoutingTableRequest { known_version: known }).await?.into_inner();
        while let Some(table) = stream.message().await? {
            self.install(table);
        }
        Ok(())
    }

    fn leader_of(&self, cell: u64) -> Option<String> {
        self.leaders.read().ok()?.get(&cell).cloned()
    }

    fn set_leader(&self, cell: u64, address: Option<String>) {
        if let Ok(mut l) = self.leaders.write() {
            match address {
                Some(a) => {
                    l.insert(cell, a);
                }
                None => {
                    l.remove(&cell);
                }
            }
        }
    }

    /// Writes through the control cell's leader, following not-leader hints across the configured
    /// replicas; any other answer (a timeout included: the write may have applied) is final.
    pub async fn control_call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.control_loop(f, false).await
    }

    /// Reads from the control cell's leader; like [`Router::control_call`], but any failure moves
    /// on to the next replica.
    pub async fn control_read<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.control_loop(f, true).await
    }

    async fn control_loop<T, F, Fut>(&self, mut f: F, read: bool) -> Result<T, Status>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = Status::unavailable("no control-cell address configured");
        let mut candidates: Vec<String> = self.control.clone();
        let mut tried = 0;
        while let Some(address) = candidates.first().cloned() {
            candidates.remove(0);
            tried += 1;
            if tried > 6 {
                break;
            }
            match f(ControlClient::new(self.channel(&address)?)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => {
                    match RoutingHint::from_status(&e) {
                        Some(RoutingHint::NotLeader { leader: Some((_, leader)), .. }) => {
                            candidates.insert(0, leader)
                        }
                        Some(RoutingHint::NotLeader { .. }) => {}
                        _ if read || matches!(e.code(), Code::Unavailable | Code::Unknown) => {}
                        _ => return Err(e),
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Replica addresses of every cell, for calls any cell can answer.
    pub fn any_replicas(&self) -> Vec<String> {
        let table = self.table();
        let mut out: Vec<String> = table.replicas.values().flatten().cloned().collect();
        out.sort();
        out
    }

    /// Forwards one operation on `bucket` to the owning cell's leader, retrying on routing hints and
    /// transient failures until `deadline`.
    pub async fn forward(
        &self,
        bucket: u16,
        operation: Operation,
        deadline: Instant,
    ) -> Result<CellResult, Status> {
        self.forward_as(bucket, operation, deadline, None).await
    }

    /// [`Router::forward`] on behalf of an authenticated partner.
    pub async fn forward_as(
        &self,
        bucket: u16,
        operation: Operation,
        deadline: Instant,
        partner: Option<&Authenticated>,
    ) -> Result<CellResult, Status> {
        let partner_id = partner.map(|p| p.partner_id.clone()).unwrap_or_default();
        let partner_allowed = partner.map(|p| p.allowed.clone()).unwrap_or_default();
        self.forward_call(bucket, deadline, |mut client, table_version, remaining| {
            let mut request = tonic::Request::new(CellRequest {
                route: Some(RouteHeader {
                    bucket: u32::from(bucket),
                    table_version,
                    partner_id: partner_id.clone(),
                    partner_allowed: partner_allowed.clone(),
                    caller: String::new(),
                }),
                operation: Some(operation.clone()),
            });
            request.set_timeout(remaining);
            async move {
                let response = client.execute(request).await?;
                response.into_inner().result.ok_or_else(|| Status::internal("empty cell response"))
            }
        })
        .await
    }

    /// Echoes `payload` through the leader of the cell owning `bucket` (no Raft, no disk): the same
    /// table lookup, leader cache and pooled channel as a real request.
    pub async fn echo(&self, bucket: u16, payload: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, Status> {
        self.forward_call(bucket, deadline, |mut client, _, remaining| {
            let mut request = tonic::Request::new(EchoRequest { payload: payload.clone(), bucket: 0 });
            request.set_timeout(remaining);
            async move { Ok(client.echo(request).await?.into_inner().payload) }
        })
        .await
    }

    /// Calls the owning cell's leader of `bucket` with `call(client, table version, time left)`,
    /// following routing hints and retrying transient failures until `deadline`.
    async fn forward_call<T, F, Fut>(&self, bucket: u16, deadline: Instant, mut call: F) -> Result<T, Status>
    where
        F: FnMut(CellClient<Channel>, u64, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let table = self.table();
            if table.version == 0 {
                self.refresh().await?;
                continue;
            }
            let cell = *table
                .owner
                .get(usize::from(bucket))
                .ok_or_else(|| Status::internal("bucket outside table"))?;
            let address = match self.leader_of(cell) {
                Some(a) => a,
                None => match table.replicas.get(&cell) {
                    Some(r) if !r.is_empty() => r[attempt % r.len()].clone(),
                    _ => {
                        return Err(Status::unavailable(
                            "the owning cell has no replicas in the routing table",
                        ));
                    }
                },
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded("no answer from the owning cell within the deadline"));
            }
            let client = CellClient::new(self.channel(&address)?);
            let err = match call(client, table.version, remaining).await {
                Ok(result) => {
                    if self.leader_of(cell).as_deref() != Some(address.as_str()) {
                        self.set_leader(cell, Some(address));
                    }
                    return Ok(result);
                }
                Err(e) => e,
            };
            match RoutingHint::from_status(&err) {
                Some(RoutingHint::NotLeader { leader, .. }) => {
                    self.metrics.retries.with_label_values(&["not_leader"]).inc();
                    let hint = leader.map(|(_, a)| a).filter(|a| *a != address);
                    if hint.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    self.set_leader(cell, hint);
                }
                Some(RoutingHint::WrongOwner { .. }) => {
                    self.metrics.retries.with_label_values(&["wrong_owner"]).inc();
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(code = ?e.code(), "refresh after wrong-owner failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Some(RoutingHint::RetryLater { after }) => {
                    self.metrics.retries.with_label_values(&["retry_later"]).inc();
                    tokio::time::sleep(after.min(remaining)).await;
                }
                None if matches!(err.code(), Code::Unavailable | Code::Unknown) => {
                    // The replica is down or unreachable: try another one.
                    self.metrics.retries.with_label_values(&["unavailable"]).inc();
                    self.set_leader(cell, None);
                    tokio::time::sleep(Duration::from_millis(10 * attempt.min(10) as u64)).await;
                }
                None => return Err(err),
            }
        }
    }
}
