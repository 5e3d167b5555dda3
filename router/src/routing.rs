//! The routing state of a router: the cached routing table (refreshed from the control cell, kept
//! when the control cell is unreachable), a leader cache per cell, pooled channels per replica,
//! and the forwarding loop that follows not-leader and wrong-owner hints within the deadline.

use crate::admission::Sample;
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

/// The longest a first attempt at a replica may take; the client's deadline bounds the whole
/// call. A replica that lets an attempt run out is probed: a live one (slow, busy, answering a
/// long read) gets the rest of the deadline on the next attempt; one that does not answer the
/// probe is suspect.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a liveness probe may take before the replica counts as paused, partitioned or dead.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a replica that failed at the transport or did not answer a probe is avoided, by every
/// call of this router.
pub const SUSPECT_FOR: Duration = Duration::from_millis(2000);
/// How often a call waits out a cell's OVERLOADED answer before passing it to the client.
const OVERLOAD_RETRIES: u32 = 1;

/// A failure at the transport or inside the cell whose outcome is unknown: another attempt (at
/// another replica) may succeed, and every operation is safe to repeat. Raw transport statuses
/// (h2 errors, client-side timeouts, cancellations) never reach the client.
fn transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => true,
        // h2 maps its protocol failures (a GOAWAY, "enhance your calm" after a resumed pause) to
        // INTERNAL or RESOURCE_EXHAUSTED; the cells' own INTERNAL answers carry no transport source.
        Code::Internal | Code::ResourceExhausted => {
            !overloaded(status)
                && (std::error::Error::source(status).is_some()
                    || status.message().starts_with("h2 protocol error")
                    || status.message().contains("transport error"))
        }
        _ => false,
    }
}

/// A cell's explicit load shedding (RESOURCE_EXHAUSTED with reason OVERLOADED).
fn overloaded(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && nid_proto::error::reason_of(status).as_deref() == Some("OVERLOADED")
}

/// What the client is told when its deadline passes. When no replica could even be reached
/// (connections refused: the cell is down), UNAVAILABLE; otherwise DEADLINE_EXCEEDED with reason
/// TIMEOUT. Either way the outcome of a write is unknown and retrying it is safe.
fn past_deadline(last: &Status, reached: bool) -> Status {
    if !reached && last.code() == Code::Unavailable {
        return Status::unavailable("no replica of the owning cell is reachable; retrying is safe");
    }
    nid_proto::error::status_with_reason(
        Code::DeadlineExceeded,
        "no answer from the owning cell within the deadline; the outcome of a write is unknown, \
         and retrying it is safe",
        nid_proto::v1::ErrorReason::Timeout,
        &[],
    )
}

/// A fresh request id (128 random bits, hex) for a client call that brought none; UNAVAILABLE
/// when the system's random source fails (a write must not go out without one).
pub fn new_request_id() -> Result<String, Status> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Status::unavailable("the router cannot draw a request id; retry"))?;
    Ok(hex::encode(bytes))
}

/// A control-cell client whose calls carry an admin's credential.
pub type AdminControlClient = ControlClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
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
    /// Replicas that failed at the transport or did not answer a probe, until when.
    suspects: Mutex<HashMap<String, Instant>>,
    /// Metrics.
    pub metrics: Arc<RouterMetrics>,
    /// Whether client calls without a request id get one (always, but for benchmarks measuring
    /// what the exactly-once bookkeeping costs).
    pub assign_request_ids: bool,
    /// Requests being forwarded; a request finding none left is shed at once.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Plaintext or mutual TLS to the replicas.
    dial: nid_support::tls::Dial,
    /// How many requests go to each cell at once.
    admission: crate::admission::Admission,
}

impl Router {
    /// A router that learns its table from `control` replicas and forwards at most
    /// `max_in_flight` requests at once (more are refused with RESOURCE_EXHAUSTED / OVERLOADED
    /// and a retry delay, so memory and queues stay bounded under overload).
    pub fn new(
        control: Vec<String>,
        metrics: Arc<RouterMetrics>,
        max_in_flight: usize,
        dial: nid_support::tls::Dial,
        admission: crate::admission::Admission,
    ) -> Router {
        Router {
            control,
            table: RwLock::default(),
            scheme: RwLock::default(),
            leaders: RwLock::default(),
            channels: Mutex::default(),
            suspects: Mutex::default(),
            metrics,
            assign_request_ids: true,
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1))),
            dial,
            admission,
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
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|_| Status::internal("bad replica address in the routing table"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // A paused or partitioned replica's connection is declared dead within seconds.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        // Over TLS the replica must hold the role it is dialled as.
        let role = if self.control.iter().any(|c| c == address) { "control" } else { "cell" };
        let channel = self.dial.connect_lazy(endpoint, role);
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

    fn set_leader(&self, cell: u64, address: String) {
        if let Ok(mut l) = self.leaders.write() {
            l.insert(cell, address);
        }
    }

    /// Writes through the control cell's leader for an admin, following not-leader hints across
    /// the configured replicas; any other answer (a timeout included: the write may have applied)
    /// is final. The admin's own credential (`admin_token`, already checked here) goes along: the
    /// control cell checks it again, so a router's certificate alone cannot write.
    pub async fn control_call<T, F, Fut>(&self, admin_token: &str, f: F) -> Result<T, Status>
    where
        F: FnMut(AdminControlClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let bearer = tonic::metadata::MetadataValue::try_from(format!("Bearer {admin_token}"))
            .map_err(|_| Status::invalid_argument("the admin credential is not a valid header value"))?;
        self.control_loop(
            |channel| ControlClient::with_interceptor(channel, Bearer(bearer.clone())),
            f,
            false,
        )
        .await
    }

    /// Reads from the control cell's leader; like [`Router::control_call`], but any failure moves
    /// on to the next replica.
    pub async fn control_read<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.control_loop(ControlClient::new, f, true).await
    }

    async fn control_loop<C, T, F, Fut>(
        &self,
        client: impl Fn(Channel) -> C,
        mut f: F,
        read: bool,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
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
            match f(client(self.channel(&address)?)).await {
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
        caller: &str,
    ) -> Result<CellResult, Status> {
        self.forward_as(bucket, operation, deadline, None, caller).await
    }

    /// [`Router::forward`] on behalf of an authenticated partner, for `caller` (the client
    /// certificate's name; empty on a plaintext listener). Every operation is safe to send
    /// again after an ambiguous failure: reads change nothing, an enrolment is keyed by its RID,
    /// an authentication by its transaction id, and every other write by its request id (the
    /// client's, or one the router assigns here, once per client call, in `request_id`).
    pub async fn forward_as(
        &self,
        bucket: u16,
        operation: Operation,
        deadline: Instant,
        partner: Option<&Authenticated>,
        caller: &str,
    ) -> Result<CellResult, Status> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics.shed.inc();
            return Err(nid_proto::error::overloaded(
                "the router is at its limit of requests in flight",
                crate::admission::SHED_RETRY,
            ));
        };
        let partner_id = partner.map(|p| p.partner_id.clone()).unwrap_or_default();
        let partner_allowed = partner.map(|p| p.allowed.clone()).unwrap_or_default();
        let request_id = if self.assign_request_ids { new_request_id()? } else { String::new() };
        self.forward_call(bucket, deadline, true, |mut client, table_version, remaining| {
            let mut request = tonic::Request::new(CellRequest {
                route: Some(RouteHeader {
                    bucket: u32::from(bucket),
                    table_version,
                    partner_id: partner_id.clone(),
                    partner_allowed: partner_allowed.clone(),
                    caller: caller.to_owned(),
                    request_id: request_id.clone(),
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
        // Any replica echoes: the answer says nothing about who leads.
        self.forward_call(bucket, deadline, false, |mut client, _, remaining| {
            let mut request = tonic::Request::new(EchoRequest { payload: payload.clone(), bucket: 0 });
            request.set_timeout(remaining);
            async move { Ok(client.echo(request).await?.into_inner().payload) }
        })
        .await
    }

    /// Calls the owning cell's leader of `bucket` with `call(client, table version, time left for
    /// this attempt)`, following routing hints and retrying transient failures until `deadline`.
    /// `leader_only`: a success proves the replica leads (not so for an echo).
    ///
    /// A first attempt at a replica gets at most [`ATTEMPT_TIMEOUT`]. When it runs out, a
    /// [`PROBE_TIMEOUT`] liveness probe tells a slow replica (it answers; the next attempt gets
    /// the rest of the deadline) from a paused, partitioned or dead one (suspect for
    /// [`SUSPECT_FOR`], router-wide, as is one whose connection fails). Calls go to the other
    /// replicas meanwhile, which answer not-leader with the leader they know; a hint naming a
    /// suspect is not followed (the election under way will name another) unless every other
    /// replica has been tried and names it too. A lost leader so costs about one election.
    async fn forward_call<T, F, Fut>(
        &self,
        bucket: u16,
        deadline: Instant,
        leader_only: bool,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(CellClient<Channel>, u64, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0usize;
        let mut patient: Vec<String> = Vec::new();
        let mut overloads = 0u32;
        let mut reached = false;
        // An attempt went out; from then on the outcome may be unknown.
        let mut sent = false;
        // An attempt's outcome is unknown (it timed out or failed in transit).
        let mut ambiguous = false;
        let mut last = Status::unavailable("the owning cell did not answer");
        loop {
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(past_deadline(&last, reached));
            }
            let table = self.table();
            if table.version == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.refresh()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => {
                        tracing::warn!(code = ?e.code(), "no routing table yet");
                        return Err(Status::unavailable("the router has no routing table yet; retry"));
                    }
                    Err(_) => return Err(past_deadline(&last, reached)),
                }
            }
            let cell = *table
                .owner
                .get(usize::from(bucket))
                .ok_or_else(|| Status::internal("bucket outside table"))?;
            let replicas = match table.replicas.get(&cell) {
                Some(r) if !r.is_empty() => r,
                _ => return Err(Status::unavailable("the owning cell has no replicas in the routing table")),
            };
            let suspects = self.suspects();
            let address = match self.leader_of(cell).filter(|a| !suspects.contains(a)) {
                Some(a) => a,
                None => {
                    let healthy: Vec<&String> = replicas.iter().filter(|r| !suspects.contains(*r)).collect();
                    let pool = if healthy.is_empty() { replicas.iter().collect() } else { healthy };
                    pool[attempt % pool.len()].clone()
                }
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let budget = if patient.contains(&address) { remaining } else { remaining.min(ATTEMPT_TIMEOUT) };
            // Requests to a cell (not echoes and probes) wait for a permit of its limit; a
            // refusal goes to the client with its retry delay, but only before anything was sent:
            // after an attempt whose outcome is unknown, a refusal would tell the client a write
            // failed that may have applied, so later attempts go without a permit.
            let permit = if leader_only && !sent {
                match self.admission.admit(cell, deadline).await {
                    Ok(p) => Some(p),
                    Err(refusal) => {
                        self.metrics.shed.inc();
                        return Err(refusal);
                    }
                }
            } else {
                None
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let budget = budget.min(remaining);
            let client = CellClient::new(self.channel(&address)?);
            sent = true;
            let outcome = tokio::time::timeout(budget, call(client, table.version, budget)).await;
            let err = match outcome {
                Ok(Ok(result)) => {
                    if let Some(permit) = permit {
                        permit.done(Sample::Answered);
                    }
                    self.clear_suspect(&address);
                    if leader_only && self.leader_of(cell).as_deref() != Some(address.as_str()) {
                        self.set_leader(cell, address);
                    }
                    return Ok(result);
                }
                Ok(Err(e)) => e,
                Err(_) => Status::cancelled("attempt timed out"),
            };
            let timed_out = err.code() == Code::Cancelled && err.message() == "attempt timed out";
            let hint = RoutingHint::from_status(&err);
            if let Some(permit) = permit {
                if overloaded(&err) {
                    permit.done(Sample::Overloaded);
                } else if !(timed_out || hint.is_some() || transient(&err)) {
                    permit.done(Sample::Answered);
                }
                // Otherwise dropped without a sample: a timeout (a slow replica or a dead one:
                // the probe below tells), a routing hint (answered fast by a replica that does
                // not serve it) or a transport failure says nothing of the serving replica's
                // latency.
            }
            if timed_out || (hint.is_none() && transient(&err)) {
                ambiguous = true;
            }
            // A replica that answered, even only "not the leader", was reached.
            if !transient(&err) || timed_out || hint.is_some() {
                reached = true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match hint {
                Some(RoutingHint::NotLeader { leader, .. }) => {
                    self.metrics.retries.with_label_values(&["not_leader"]).inc();
                    let hint = leader.map(|(_, a)| a).filter(|a| *a != address);
                    let others_tried = attempt >= replicas.len();
                    match hint {
                        Some(h) if !suspects.contains(&h) || others_tried => self.set_leader(cell, h),
                        _ => {
                            // No leader known yet, or the one named is suspect: an election is
                            // under way; ask again shortly.
                            self.forget_leader(cell, &address);
                            tokio::time::sleep(Duration::from_millis(25).min(left)).await;
                        }
                    }
                    last = err;
                }
                Some(RoutingHint::WrongOwner { .. }) => {
                    self.metrics.retries.with_label_values(&["wrong_owner"]).inc();
                    match tokio::time::timeout(left, self.refresh()).await {
                        Ok(Ok(_)) => {}
                        _ => {
                            tracing::warn!("refresh after wrong-owner failed");
                            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                        }
                    }
                    last = Status::unavailable("the bucket's owner changed; retry");
                }
                Some(RoutingHint::RetryLater { after }) => {
                    self.metrics.retries.with_label_values(&["retry_later"]).inc();
                    tokio::time::sleep(after.min(left)).await;
                    last = err;
                }
                None if overloaded(&err) => {
                    overloads += 1;
                    // After an attempt of unknown outcome, RESOURCE_EXHAUSTED would read as "not
                    // applied": keep trying until the deadline, which answers "unknown, retry".
                    if overloads > OVERLOAD_RETRIES && !ambiguous {
                        // Shed load reaches the client, which backs off by the delay it carries.
                        return Err(err);
                    }
                    self.metrics.retries.with_label_values(&["overloaded"]).inc();
                    let wait = nid_proto::error::retry_delay(&err).unwrap_or(Duration::from_millis(20));
                    tokio::time::sleep(wait.min(left)).await;
                    last = err;
                }
                None if timed_out => {
                    self.metrics.retries.with_label_values(&["timeout"]).inc();
                    if self.probe(&address, left.min(PROBE_TIMEOUT)).await {
                        // Alive and slow (busy, or a long read): give it the rest of the deadline.
                        patient.push(address.clone());
                        if leader_only && self.leader_of(cell).is_none() {
                            self.set_leader(cell, address);
                        }
                    } else {
                        self.suspect(&address);
                        self.forget_leader(cell, &address);
                    }
                    last = err;
                }
                None if transient(&err) => {
                    // The replica is down, unreachable or lost its quorum: try the others.
                    self.metrics.retries.with_label_values(&["unavailable"]).inc();
                    self.suspect(&address);
                    self.forget_leader(cell, &address);
                    tokio::time::sleep(Duration::from_millis(5 * attempt.min(10) as u64).min(left)).await;
                    last = err;
                }
                None => return Err(err),
            }
        }
    }

    /// Whether the replica at `address` answers a cheap call within `timeout` (a paused process,
    /// a partitioned host or a dead one does not).
    async fn probe(&self, address: &str, timeout: Duration) -> bool {
        let Ok(channel) = self.channel(address) else { return false };
        let request = EchoRequest { payload: Vec::new(), bucket: 0 };
        matches!(tokio::time::timeout(timeout, CellClient::new(channel).echo(request)).await, Ok(Ok(_)))
    }

    fn suspects(&self) -> Vec<String> {
        let now = Instant::now();
        match self.suspects.lock() {
            Ok(mut s) => {
                s.retain(|_, until| *until > now);
                s.keys().cloned().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    fn suspect(&self, address: &str) {
        if let Ok(mut s) = self.suspects.lock() {
            s.insert(address.to_owned(), Instant::now() + SUSPECT_FOR);
        }
    }

    fn clear_suspect(&self, address: &str) {
        if let Ok(mut s) = self.suspects.lock()
            && !s.is_empty()
        {
            s.remove(address);
        }
    }

    /// Forgets the cached leader of `cell` if it is still `address` (another call may have found
    /// the new one meanwhile).
    fn forget_leader(&self, cell: u64, address: &str) {
        if let Ok(mut l) = self.leaders.write()
            && l.get(&cell).is_some_and(|a| a == address)
        {
            l.remove(&cell);
        }
    }
}
