//! `nidctl dev up`: a whole development cluster as real processes on 127.0.0.1 (a control cell and
//! N data cells of 3 replicas in zone-a/zone-b/zone-c, plus one router), initialized, described in
//! `DIR/cluster.json`, stopped cleanly on Ctrl-C or SIGTERM, resumed on the same data when started
//! again on the same DIR.

use anyhow::{Context as _, bail};
use nid_proto::bucket::BUCKETS;
use nid_proto::error::RoutingHint;
use nid_proto::ids::{IdKind, IdSchemeSeed};
use nid_proto::placement::{CellWeight, DEFAULT_WEIGHT, desired_placement};
use nid_proto::v1::bucket_admin_client::BucketAdminClient;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::control_client::ControlClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{
    BucketState, CellInfo, CellState, ClusterConfig, GetCellStatusRequest, GetIdentityRequest,
    InitClusterRequest, ReplicaInfo, RoutingTable, SetBucketStateRequest,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The id of the control cell.
pub const CONTROL_CELL_ID: u64 = 0;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// One process of the cluster, as written to cluster.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Name (also the log file name).
    pub name: String,
    /// gRPC address.
    pub address: String,
    /// Metrics address.
    pub metrics: String,
    /// Zone.
    pub zone: String,
    /// Process id of the last start.
    pub pid: u32,
    /// Raft node id (0 for the router).
    pub node_id: u64,
}

/// One cell in cluster.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellEntry {
    /// Cell id (0 is the control cell).
    pub cell_id: u64,
    /// Its replicas.
    pub replicas: Vec<ProcessInfo>,
}

/// `DIR/cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The router.
    pub router: ProcessInfo,
    /// The control cell.
    pub control: CellEntry,
    /// The data cells.
    pub cells: Vec<CellEntry>,
    /// The id-scheme seed (hex).
    pub id_scheme_seed: String,
    /// Development partner credentials (partners arrive with the identity domain; placeholder id).
    pub dev_partner: DevPartner,
    /// Plaintext (`dev up --insecure`); otherwise every process has a certificate of the dev CA
    /// in `DIR/secrets/tls`.
    #[serde(default)]
    pub insecure: bool,
}

/// The dev cluster's certificate directory under `dir`.
pub fn dev_tls_dir(dir: &Path) -> PathBuf {
    dir.join("secrets").join("tls")
}

/// The certificate directory of the dev cluster in `dir` when it runs TLS.
pub fn cluster_tls_dir(dir: &Path) -> Option<PathBuf> {
    let tls = dev_tls_dir(dir);
    let insecure = load_cluster(dir).map(|c| c.insecure).unwrap_or(false);
    (tls.join(nid_support::pki::CA_CERT).exists() && !insecure).then_some(tls)
}

/// Reads `DIR/cluster.json`.
pub fn load_cluster(dir: &Path) -> anyhow::Result<ClusterFile> {
    let file = dir.join("cluster.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("no {} (start the cluster with nidctl dev up)", file.display()))?;
    serde_json::from_str(&text).context("read cluster.json")
}

/// Development partner credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevPartner {
    /// Partner id.
    pub partner_id: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(nid_support::ports::free_port()?)
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("nidctl has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found next to nidctl (build the workspace first)", path.display());
    }
    Ok(path)
}

fn new_process(name: String, zone: &str, node_id: u64) -> anyhow::Result<ProcessInfo> {
    Ok(ProcessInfo {
        name,
        address: format!("127.0.0.1:{}", free_port()?),
        metrics: format!("127.0.0.1:{}", free_port()?),
        zone: zone.to_owned(),
        pid: 0,
        node_id,
    })
}

fn plan(cells: u64) -> anyhow::Result<ClusterFile> {
    let cell = |cell_id: u64| -> anyhow::Result<CellEntry> {
        let replicas = (1..=3u64)
            .map(|n| new_process(format!("cell-{cell_id}-node-{n}"), ZONES[(n - 1) as usize], n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(CellEntry { cell_id, replicas })
    };
    let mut control = cell(CONTROL_CELL_ID)?;
    for r in &mut control.replicas {
        r.name = format!("control-node-{}", r.node_id);
    }
    Ok(ClusterFile {
        router: new_process("router".into(), "zone-a", 0)?,
        control,
        cells: (1..=cells).map(cell).collect::<anyhow::Result<_>>()?,
        id_scheme_seed: IdSchemeSeed::dev().to_hex(),
        dev_partner: DevPartner { partner_id: "dev-partner".into() },
        insecure: false,
    })
}

struct Running {
    children: Vec<(String, Child)>,
}

impl Running {
    fn stop(&mut self) {
        for (_, c) in &self.children {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (name, c) in &mut self.children {
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("nidctl: {name} did not stop in time; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.children.clear();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(
    running: &mut Running,
    dir: &Path,
    p: &mut ProcessInfo,
    binary: &Path,
    args: Vec<String>,
) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{}.log", p.name)))?;
    let child = Command::new(binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", p.name))?;
    p.pid = child.id();
    running.children.push((p.name.clone(), child));
    Ok(())
}

/// The dev cluster's secrets, created once under `DIR/secrets` (mode 0600): the cluster keyring
/// (cells), the partner-credential key and the admin token (router).
pub struct Secrets {
    /// Keyring file.
    pub keyring: PathBuf,
    /// Partner-credential key file.
    pub partner_key: PathBuf,
    /// Admin token file.
    pub admin_token: PathBuf,
    /// The dev partner's API key file.
    pub dev_partner_key: PathBuf,
}

fn random_hex32() -> anyhow::Result<String> {
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        let word =
            nid_proto::ids::system_random_u64().map_err(|e| anyhow::anyhow!("random source: {e:?}"))?;
        out.push_str(&hex::encode(word.to_be_bytes()));
    }
    Ok(out)
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Paths of the dev secrets under `dir`, creating the missing ones.
pub fn secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let root = dir.join("secrets");
    std::fs::create_dir_all(&root)?;
    let s = Secrets {
        keyring: root.join("keyring"),
        partner_key: root.join("partner.key"),
        admin_token: root.join("admin.token"),
        dev_partner_key: root.join("dev-partner.apikey"),
    };
    if !s.keyring.exists() {
        write_secret(&s.keyring, &format!("1:{}\n", random_hex32()?))?;
    }
    for path in [&s.partner_key, &s.admin_token] {
        if !path.exists() {
            write_secret(path, &format!("{}\n", random_hex32()?))?;
        }
    }
    Ok(s)
}

/// The certificate name of a replica of `cell`.
fn replica_cert(cell: &CellEntry, p: &ProcessInfo) -> String {
    if cell.cell_id == CONTROL_CELL_ID {
        format!("control-{}", p.node_id)
    } else {
        format!("cell-{}-{}", cell.cell_id, p.node_id)
    }
}

/// The dev CA and a certificate for every process and client role of `cluster` (kept when they
/// exist), in `DIR/secrets/tls`; nidctl then dials as the admin.
fn issue_certificates(dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    let tls = dev_tls_dir(dir);
    nid_support::pki::ensure_ca(&tls, "nid development CA")?;
    let mut names = vec![
        "router".to_owned(),
        "admin".to_owned(),
        "enroller-dev".to_owned(),
        format!("partner-{}", cluster.dev_partner.partner_id),
    ];
    for cell in std::iter::once(&cluster.control).chain(&cluster.cells) {
        names.extend(cell.replicas.iter().map(|p| replica_cert(cell, p)));
    }
    for name in names {
        nid_support::pki::ensure(&tls, &name, 365)?;
    }
    crate::tls::init(Some(&tls), "admin")
}

/// How a dev process serves: `--tls-dir` of the dev CA, or `--insecure`.
fn security_args(dir: &Path, insecure: bool) -> Vec<String> {
    if insecure {
        vec!["--insecure".into()]
    } else {
        vec!["--tls-dir".into(), dev_tls_dir(dir).display().to_string()]
    }
}

fn cell_args(
    dir: &Path,
    cell: &CellEntry,
    p: &ProcessInfo,
    role: &str,
    seed: &str,
    insecure: bool,
) -> Vec<String> {
    let peers = cell
        .replicas
        .iter()
        .map(|r| format!("{}={}@{}", r.node_id, r.address, r.zone))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "--cell-id".into(),
        cell.cell_id.to_string(),
        "--node-id".into(),
        p.node_id.to_string(),
        "--zone".into(),
        p.zone.clone(),
        "--listen".into(),
        p.address.clone(),
        "--metrics-listen".into(),
        p.metrics.clone(),
        "--data-dir".into(),
        dir.join("data").join(&p.name).display().to_string(),
        "--peers".into(),
        peers,
        "--role".into(),
        role.into(),
        "--id-scheme-seed".into(),
        seed.into(),
        "--keyring-file".into(),
        dir.join("secrets").join("keyring").display().to_string(),
        // Control replicas check the admin credential a router forwards on writes.
        "--admin-token-file".into(),
        dir.join("secrets").join("admin.token").display().to_string(),
        // Six replicas share the machine's cores: one runtime thread each, as for the router.
        "--threads".into(),
        "1".into(),
    ]
    .into_iter()
    .chain(security_args(dir, insecure))
    .collect()
}

/// A channel to the router at `address`.
pub(crate) async fn channel(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    connect(address, "router").await
}

/// A channel to a replica of `cell`.
async fn replica_channel(cell: &CellEntry, address: &str) -> anyhow::Result<tonic::transport::Channel> {
    connect(address, if cell.cell_id == CONTROL_CELL_ID { "control" } else { "cell" }).await
}

pub(crate) async fn connect(
    address: &str,
    server: &'static str,
) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = nid_support::tls::Dial::endpoint(address)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10));
    Ok(crate::tls::dial().connect(endpoint, server).await?)
}

/// Waits until some replica of `cell` reports a leader; returns the leader's address.
async fn wait_leader(cell: &CellEntry, deadline: Instant) -> anyhow::Result<String> {
    loop {
        for r in &cell.replicas {
            if let Ok(ch) = replica_channel(cell, &r.address).await
                && let Ok(status) = CellClient::new(ch).get_cell_status(GetCellStatusRequest {}).await
                && let Some(leader) = status.into_inner().replicas.iter().find(|x| x.is_leader)
                && let Some(l) = cell.replicas.iter().find(|x| x.node_id == leader.node_id)
            {
                return Ok(l.address.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("cell {} elected no leader in time", cell.cell_id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `f` against the leader of `cell`, following not-leader hints, until it succeeds or `deadline`.
async fn on_leader<T, F, Fut>(cell: &CellEntry, deadline: Instant, f: F) -> anyhow::Result<T>
where
    F: Fn(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    loop {
        let leader = wait_leader(cell, deadline).await?;
        let outcome = match replica_channel(cell, &leader).await {
            Ok(channel) => f(channel).await,
            // A leader just elected may not accept yet, or may have lost its place already.
            Err(e) => Err(tonic::Status::unavailable(format!("connect to the leader: {e:#}"))),
        };
        match outcome {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                bail!("cell {}: {:?}: {}", cell.cell_id, e.code(), e.message())
            }
            Err(e) if !worth_retrying(&e) => bail!("cell {}: {:?}: {}", cell.cell_id, e.code(), e.message()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether an answer from a cell that is still starting may change on a retry: a leader that
/// moved, a replica not ready, a proposal of unknown outcome, a refusal for load, a broken
/// connection. Every step `on_leader` runs is idempotent, so retrying any of these is safe.
fn worth_retrying(e: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(RoutingHint::from_status(e), Some(RoutingHint::NotLeader { .. }))
        || matches!(
            e.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Unknown
                | Code::Cancelled
        )
}

fn cell_info(cell: &CellEntry) -> CellInfo {
    CellInfo {
        cell_id: cell.cell_id,
        replicas: cell
            .replicas
            .iter()
            .map(|r| ReplicaInfo { node_id: r.node_id, address: r.address.clone(), zone: r.zone.clone() })
            .collect(),
        weight: DEFAULT_WEIGHT,
        state: CellState::Active as i32,
    }
}

/// Initializes the cluster: config and table in the control cell, ownership in each data cell.
/// Idempotent, so a resumed cluster runs it again harmlessly.
pub async fn init_cluster(cluster: &ClusterFile, deadline: Instant) -> anyhow::Result<()> {
    let seed = IdSchemeSeed::from_hex(&cluster.id_scheme_seed).map_err(|e| anyhow::anyhow!("seed: {e}"))?;
    initialize(&cluster.control, &cluster.cells, &seed, "dev", deadline).await
}

/// Initializes a cluster of `cells` whose control cell is `control`: the placement, then
/// `Control.InitCluster` on the control leader, then each data cell's buckets owned through its
/// leader. Every step is idempotent.
pub async fn initialize(
    control: &CellEntry,
    cells: &[CellEntry],
    seed: &IdSchemeSeed,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let weights: Vec<CellWeight> =
        cells.iter().map(|c| CellWeight { cell_id: c.cell_id, weight: DEFAULT_WEIGHT }).collect();
    let owner = desired_placement(&weights)?;
    let table = RoutingTable {
        version: 1,
        owner: owner.clone(),
        epoch: vec![0; usize::from(BUCKETS)],
        cells: cells.iter().map(cell_info).collect(),
    };
    let config = ClusterConfig {
        buckets: u32::from(BUCKETS),
        id_scheme_seed: seed.as_bytes().to_vec(),
        name: name.to_owned(),
    };
    let request = InitClusterRequest { config: Some(config), cells: Vec::new(), table: Some(table) };
    let init = on_leader(control, deadline, |ch| {
        let request = request.clone();
        async move {
            ControlClient::new(ch)
                .max_encoding_message_size(16 << 20)
                .init_cluster(request)
                .await
                .map(|r| r.into_inner())
        }
    })
    .await?;
    if !init.created && init.table_version > 1 {
        // The cluster has lived since its creation (cells added, buckets moved): the cells hold
        // their ownership already, and the first placement means nothing any more.
        return Ok(());
    }
    for cell in cells {
        let buckets: Vec<u32> =
            (0..u32::from(BUCKETS)).filter(|&b| owner[b as usize] == cell.cell_id).collect();
        let request = SetBucketStateRequest {
            buckets,
            state: BucketState::Owned as i32,
            table_version: 1,
            track_changes: false,
        };
        on_leader(cell, deadline, |ch| {
            let request = request.clone();
            async move { BucketAdminClient::new(ch).set_bucket_state(request).await.map(|r| r.into_inner()) }
        })
        .await?;
    }
    Ok(())
}

/// Waits until the router routes: a lookup of a well-formed UIN comes back NOT_FOUND.
async fn wait_router(cluster: &ClusterFile, deadline: Instant) -> anyhow::Result<()> {
    let scheme = nid_proto::ids::IdScheme::new(
        &IdSchemeSeed::from_hex(&cluster.id_scheme_seed).map_err(|e| anyhow::anyhow!("seed: {e}"))?,
    );
    let probe = scheme
        .generate(
            IdKind::Uin,
            nid_proto::bucket::BucketId::new(0).context("bucket 0")?,
            &mut nid_proto::ids::system_random_u64,
        )?
        .to_digits();
    let mut last;
    loop {
        match channel(&cluster.router.address).await {
            Ok(ch) => {
                match EnrollmentClient::new(ch).get_identity(GetIdentityRequest { id: probe.clone() }).await {
                    Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
                    Ok(_) => return Ok(()),
                    Err(e) => last = format!("{:?}: {}", e.code(), e.message()),
                }
            }
            Err(e) => last = format!("connect: {e:#}"),
        }
        if Instant::now() > deadline {
            bail!("the router never started routing (its last answer: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nidctl dev up`.
pub async fn up(cells: u64, replicas: u64, dir: &Path, insecure: bool) -> anyhow::Result<()> {
    if replicas != 3 {
        bail!("--replicas: a dev cell has 3 replicas, one per zone (got {replicas})");
    }
    if !(1..=16).contains(&cells) {
        bail!("--cells must be 1..=16");
    }
    std::fs::create_dir_all(dir)?;
    let file = dir.join("cluster.json");
    let mut cluster = match std::fs::read_to_string(&file) {
        Ok(text) => {
            let c: ClusterFile = serde_json::from_str(&text).context("read cluster.json")?;
            eprintln!("nidctl: resuming the cluster in {}", dir.display());
            c
        }
        Err(_) => plan(cells)?,
    };
    cluster.insecure = insecure;
    let secrets = secrets(dir)?;
    if insecure {
        eprintln!("nidctl: --insecure: plaintext gRPC, every caller accepted (development only)");
        crate::tls::set(nid_support::tls::Dial::Plain);
    } else {
        issue_certificates(dir, &cluster)?;
    }
    let cell_bin = sibling_binary("nid-cell")?;
    let router_bin = sibling_binary("nid-router")?;
    let mut running = Running { children: Vec::new() };
    let seed = cluster.id_scheme_seed.clone();
    let control = cluster.control.clone();
    for p in &mut cluster.control.replicas {
        let args = cell_args(dir, &control, p, "control", &seed, insecure);
        spawn(&mut running, dir, p, &cell_bin, args)?;
    }
    for i in 0..cluster.cells.len() {
        let cell = cluster.cells[i].clone();
        for p in &mut cluster.cells[i].replicas {
            let args = cell_args(dir, &cell, p, "data", &seed, insecure);
            spawn(&mut running, dir, p, &cell_bin, args)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    init_cluster(&cluster, deadline).await?;
    let control_addrs =
        cluster.control.replicas.iter().map(|r| r.address.clone()).collect::<Vec<_>>().join(",");
    let router_args = vec![
        "--listen".into(),
        cluster.router.address.clone(),
        "--metrics-listen".into(),
        cluster.router.metrics.clone(),
        "--control".into(),
        control_addrs,
        "--zone".into(),
        cluster.router.zone.clone(),
        "--partner-key-file".into(),
        secrets.partner_key.display().to_string(),
        "--admin-token-file".into(),
        secrets.admin_token.display().to_string(),
        // Every process of a dev cluster shares a few cores: one runtime thread costs the router
        // about a third less CPU per request than a multi-threaded runtime (make bench-router).
        "--threads".into(),
        "1".into(),
    ]
    .into_iter()
    .chain(security_args(dir, insecure))
    .collect();
    let mut router = cluster.router.clone();
    spawn(&mut running, dir, &mut router, &router_bin, router_args)?;
    cluster.router = router;
    wait_router(&cluster, deadline).await?;
    if !secrets.dev_partner_key.exists() {
        let key = add_dev_partner(&cluster, &secrets).await?;
        write_secret(&secrets.dev_partner_key, &format!("{key}\n"))?;
    }
    write_cluster_file(dir, &cluster)?;
    println!("router {}", cluster.router.address);
    println!("cluster file {}", file.display());
    println!("logs {}/logs; Ctrl-C stops the cluster", dir.display());
    // Supervise: cells `nidctl dev add-cell` appends to cluster.json are started here, so they
    // stop with the rest and a later `dev up` resumes them.
    let shutdown = nid_support::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if let Err(e) = adopt_new_cells(&mut running, dir, &mut cluster, &cell_bin, &seed) {
            eprintln!("nidctl: starting an added cell failed: {e:#}");
        }
    }
    eprintln!("nidctl: stopping the cluster");
    running.stop();
    Ok(())
}

/// Writes `cluster` to `DIR/cluster.json` atomically.
fn write_cluster_file(dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(cluster)?)?;
    std::fs::rename(&tmp, dir.join("cluster.json"))?;
    Ok(())
}

/// Starts the replicas of cells that appeared in `DIR/cluster.json` since this process read it.
fn adopt_new_cells(
    running: &mut Running,
    dir: &Path,
    cluster: &mut ClusterFile,
    cell_bin: &Path,
    seed: &str,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join("cluster.json"))?;
    let on_disk: ClusterFile = serde_json::from_str(&text).context("read cluster.json")?;
    let new: Vec<CellEntry> =
        on_disk.cells.into_iter().filter(|c| !cluster.cells.iter().any(|x| x.cell_id == c.cell_id)).collect();
    if new.is_empty() {
        return Ok(());
    }
    for mut cell in new {
        let entry = cell.clone();
        for p in &mut cell.replicas {
            let args = cell_args(dir, &entry, p, "data", seed, cluster.insecure);
            spawn(running, dir, p, cell_bin, args)?;
        }
        eprintln!("nidctl: started the replicas of added cell {}", cell.cell_id);
        cluster.cells.push(cell);
    }
    write_cluster_file(dir, cluster)
}

/// `nidctl dev add-cell`: plans a new cell of three replicas (zone-a/b/c) in `DIR/cluster.json`,
/// waits for the running `dev up` to start them and for them to elect a leader, then registers
/// the cell through the router's `Admin.AddCell`; the rebalancer then moves buckets to it.
pub async fn add_cell(dir: &Path, output: crate::Output) -> anyhow::Result<()> {
    let file = dir.join("cluster.json");
    let mut cluster = load_cluster(dir)?;
    let cell_id = cluster.cells.iter().map(|c| c.cell_id).max().unwrap_or(0) + 1;
    let replicas = (1..=3u64)
        .map(|n| new_process(format!("cell-{cell_id}-node-{n}"), ZONES[(n - 1) as usize], n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    cluster.cells.push(CellEntry { cell_id, replicas });
    if !cluster.insecure {
        // The replicas' certificates, before `dev up` starts them.
        issue_certificates(dir, &cluster)?;
    }
    write_cluster_file(dir, &cluster)?;
    eprintln!("nidctl: cell {cell_id} planned; waiting for nidctl dev up to start it");
    let deadline = Instant::now() + Duration::from_secs(60);
    let entry = loop {
        let text = std::fs::read_to_string(&file)?;
        let c: ClusterFile = serde_json::from_str(&text).context("read cluster.json")?;
        if let Some(e) =
            c.cells.iter().find(|x| x.cell_id == cell_id && x.replicas.iter().all(|r| r.pid != 0))
        {
            break e.clone();
        }
        if Instant::now() > deadline {
            bail!("nidctl dev up did not start cell {cell_id} (is it running on {}?)", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_leader(&entry, Instant::now() + Duration::from_secs(60)).await?;
    let secrets = secrets(dir)?;
    let token = crate::credentials::admin_token(None, Some(&secrets.admin_token))?;
    let mut info = cell_info(&entry);
    info.state = CellState::Joining as i32;
    let request =
        crate::credentials::with_bearer(nid_proto::v1::AddCellRequest { cell: Some(info) }, &token)?;
    let mut admin = nid_proto::v1::admin_client::AdminClient::new(channel(&cluster.router.address).await?);
    let added = admin
        .add_cell(request)
        .await
        .map_err(|e| anyhow::anyhow!("add cell {cell_id}: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    match output {
        crate::Output::Table => println!(
            "cell {cell_id} added (table version {}); {} buckets will move to it; watch with nidctl rebalance status --watch",
            added.table_version, added.buckets_planned
        ),
        crate::Output::Json => println!(
            "{}",
            serde_json::json!({"cell_id": cell_id, "table_version": added.table_version, "buckets_planned": added.buckets_planned})
        ),
    }
    Ok(())
}

async fn add_dev_partner(cluster: &ClusterFile, secrets: &Secrets) -> anyhow::Result<String> {
    let token = crate::credentials::admin_token(None, Some(&secrets.admin_token))?;
    let mut client = nid_proto::v1::admin_client::AdminClient::new(channel(&cluster.router.address).await?);
    let request = nid_proto::v1::AddPartnerRequest {
        partner_id: cluster.dev_partner.partner_id.clone(),
        name: "Development partner (all factors)".into(),
        allowed: ["demographic", "pin", "totp"]
            .iter()
            .map(|t| nid_proto::v1::AuthTypeGrant { auth_type: (*t).into() })
            .collect(),
        // No rate limit: the load-test harness authenticates as this partner.
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unknown_outcome = false;
    loop {
        match client.add_partner(crate::credentials::with_bearer(request.clone(), &token)?).await {
            Ok(response) => return Ok(response.into_inner().api_key),
            Err(e) if e.code() == tonic::Code::AlreadyExists && unknown_outcome => bail!(
                "register the dev partner: an earlier attempt of unknown outcome created it, and its key \
                 is shown only once; stop dev up and remove the cluster directory to start afresh"
            ),
            Err(e) if worth_retrying(&e) && Instant::now() < deadline => {
                unknown_outcome |= e.code() != tonic::Code::ResourceExhausted;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("register the dev partner: {:?}: {}", e.code(), e.message()),
        }
    }
}

/// The router address from `--router` or the dev cluster file.
pub fn router_address(router: Option<&str>, dir: &Path) -> anyhow::Result<String> {
    if let Some(r) = router {
        return Ok(r.to_owned());
    }
    let text = std::fs::read_to_string(dir.join("cluster.json")).with_context(|| {
        format!("no --router given and no {}/cluster.json (start one with nidctl dev up)", dir.display())
    })?;
    let c: ClusterFile = serde_json::from_str(&text)?;
    Ok(c.router.address)
}

/// A client of the router.
pub async fn enrollment_client(address: &str) -> anyhow::Result<EnrollmentClient<tonic::transport::Channel>> {
    Ok(EnrollmentClient::new(channel(address).await.with_context(|| format!("connect to router {address}"))?))
}
