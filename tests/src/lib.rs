//! Helpers for cross-process tests: find the workspace's binaries, pick free ports, start real
//! replicas as processes, kill them with SIGKILL and restart them on the same data.
//!
//! The binaries come from the shared target directory (`cargo build --workspace`, which `make test`
//! runs first).

pub mod rebalance_bench;

use nid_proto::v1::cell_client::CellClient;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Path of a workspace binary next to the running test executable (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (tools) -> target/<profile>/<name>
    let mut dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (make test does)",
        path.display()
    );
    path
}

/// A TCP port free right now on 127.0.0.1, outside the range outgoing connections take their
/// source ports from, and not handed out before by this test binary ([`nid_support::ports`]).
pub fn free_port() -> u16 {
    nid_support::ports::free_port().expect("a free port on 127.0.0.1")
}

/// One `nid-cell` replica process.
pub struct CellProcess {
    /// Node id.
    pub node_id: u64,
    /// gRPC address.
    pub addr: String,
    /// Metrics address.
    pub metrics_addr: String,
    /// Data directory (kept across restarts).
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    alive: std::sync::atomic::AtomicBool,
}

/// A 3-replica cell of real processes.
pub struct ProcessCell {
    /// The replicas, by node id - 1.
    pub nodes: Vec<CellProcess>,
    _root: tempfile::TempDir,
}

impl ProcessCell {
    /// Starts `n` replicas of cell 1 on free ports, one zone each, with `extra` flags.
    pub fn start(n: u64, extra: &[&str]) -> ProcessCell {
        let root = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let peers = (1..=n)
            .map(|id| format!("{id}=127.0.0.1:{}@zone-{id}", ports[(id - 1) as usize].0))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (1..=n)
            .map(|id| {
                let (port, metrics) = ports[(id - 1) as usize];
                let data_dir = root.path().join(format!("node-{id}"));
                let mut args: Vec<String> = vec![
                    "--cell-id".into(),
                    "1".into(),
                    "--node-id".into(),
                    id.to_string(),
                    "--zone".into(),
                    format!("zone-{id}"),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{metrics}"),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--peers".into(),
                    peers.clone(),
                    "--insecure".into(),
                    "--tick-ms".into(),
                    "50".into(),
                ];
                args.extend(extra.iter().map(|s| s.to_string()));
                let mut p = CellProcess {
                    node_id: id,
                    addr: format!("127.0.0.1:{port}"),
                    metrics_addr: format!("127.0.0.1:{metrics}"),
                    data_dir,
                    args,
                    child: None,
                    alive: std::sync::atomic::AtomicBool::new(false),
                };
                p.spawn();
                p
            })
            .collect();
        ProcessCell { nodes, _root: root }
    }

    /// The replica with `node_id`.
    pub fn node(&mut self, node_id: u64) -> &mut CellProcess {
        &mut self.nodes[(node_id - 1) as usize]
    }
}

impl CellProcess {
    /// Starts the process (again, on the same data directory).
    pub fn spawn(&mut self) {
        if !self.is_running()
            && let Some(mut dead) = self.child.take()
        {
            let _ = dead.wait();
        }
        assert!(self.child.is_none(), "node {} already running", self.node_id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("open log file");
        let child = Command::new(binary("nid-cell"))
            .args(&self.args)
            .env("NID_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nid-cell");
        self.child = Some(child);
        self.alive.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets `flag` to `value` for the next [`CellProcess::spawn`] (replacing it, or adding it).
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_owned(),
            _ => self.args.extend([flag.to_owned(), value.to_owned()]),
        }
    }

    /// Waits (up to `timeout`) for the process to exit by itself; its exit code (None for a signal
    /// or when it still runs).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
                return Some(status.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown hooks, no flush.
    pub fn kill9(&mut self) {
        self.sigkill();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL through a shared reference (for killing while other tasks use the cell); the
    /// process is reaped by the next [`CellProcess::kill9`], [`CellProcess::spawn`] or drop.
    pub fn sigkill(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").arg("-KILL").arg(child.id().to_string()).status();
        }
        self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// SIGTERM, then wait for the exit (up to `timeout`). Returns the exit success.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        let Some(child) = &self.child else { return false };
        // A process that exited by itself stays a zombie until reaped: read its state.
        let exited = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
            .map(|stat| {
                stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(true);
        !exited && self.alive.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The replica's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// A gRPC client, waiting until the replica answers.
    pub async fn client(&self, timeout: Duration) -> CellClient<Channel> {
        match self.try_client(timeout).await {
            Some(client) => client,
            None => panic!("node {} never answered; log:\n{}", self.node_id, self.log()),
        }
    }

    /// A gRPC client once the replica answers; None if it does not within `timeout` or its
    /// process has exited.
    pub async fn try_client(&self, timeout: Duration) -> Option<CellClient<Channel>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                .expect("endpoint")
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(10))
                .connect()
                .await
            {
                return Some(CellClient::new(channel));
            }
            if Instant::now() >= deadline || !self.is_running() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CellProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `nidctl dev up` cluster started for a test or a benchmark; SIGTERM on drop.
pub struct DevCluster {
    /// The `nidctl dev up` process.
    pub process: Child,
    /// Its `cluster.json`.
    pub info: serde_json::Value,
    /// The cluster directory.
    pub dir: tempfile::TempDir,
}

impl DevCluster {
    /// Starts `nidctl dev up --cells N --insecure` (plaintext) in a fresh directory and waits
    /// for its `cluster.json`.
    pub fn start(cells: u64) -> DevCluster {
        DevCluster::start_with(cells, &["--insecure"])
    }

    /// Starts `nidctl dev up --cells N` with mutual TLS (the dev CA in `DIR/secrets/tls`).
    pub fn start_tls(cells: u64) -> DevCluster {
        DevCluster::start_with(cells, &[])
    }

    fn start_with(cells: u64, extra: &[&str]) -> DevCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        // dev up's own messages, kept so that a failed start says why.
        let stderr_path = dir.path().join("nidctl-dev-up.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create the dev up log");
        let mut process = Command::new(binary("nidctl"))
            .args(["dev", "up", "--cells", &cells.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nidctl dev up");
        let file = dir.path().join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(90);
        let said = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "cluster.json never appeared; nidctl dev up said:\n{}",
                said()
            );
            if let Ok(Some(status)) = process.try_wait() {
                panic!("nidctl dev up exited early ({status}); it said:\n{}", said());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = std::fs::read_to_string(&file).expect("read cluster.json");
        let info = serde_json::from_str(&text).expect("cluster.json is JSON");
        DevCluster { process, info, dir }
    }

    /// The router's address.
    pub fn router(&self) -> String {
        self.info["router"]["address"].as_str().unwrap_or_default().to_owned()
    }

    /// The control cell's replica addresses.
    pub fn control(&self) -> Vec<String> {
        self.info["control"]["replicas"]
            .as_array()
            .map(|rs| rs.iter().filter_map(|r| r["address"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// Sends SIGTERM to `nidctl dev up` and returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.process.id().to_string()).status();
        self.process.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            self.stop();
        }
    }
}

/// A valid enrolment request for `rid` with a fixed synthetic person named `name`.
pub fn enroll_request(rid: &str, name: &str) -> nid_proto::v1::EnrollRequest {
    nid_proto::v1::EnrollRequest {
        rid: rid.to_owned(),
        demographics: Some(nid_proto::v1::Demographics {
            full_name: name.to_owned(),
            date_of_birth: "1970-01-01".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `GET path` over plain HTTP/1.1 (the metrics endpoints); None when the server is unreachable.
pub async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(address).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The `p` quantile (0..=1) of sorted microsecond latencies, in milliseconds.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    sorted_us[((sorted_us.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// What a closed-loop run measured.
pub struct ClosedLoop {
    /// Successful requests per second.
    pub rate: f64,
    /// Latencies of successful requests in microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Failed requests.
    pub errors: u64,
}

/// Keeps `concurrency` requests in flight for `duration`. `request(worker, k)` sends the k-th
/// request of a worker and says whether it succeeded.
pub async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, request: F) -> ClosedLoop
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors, request) = (stop.clone(), errors.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if request(w, k).await {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
            }
            lat
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap_or_default());
    }
    latencies_us.sort_unstable();
    let rate = latencies_us.len() as f64 / started.elapsed().as_secs_f64();
    ClosedLoop { rate, latencies_us, errors: errors.load(Ordering::Relaxed) }
}

/// A channel to a router at `address` (15 s per-call timeout), retrying the connection for up to
/// 30 s while the router starts or restarts.
pub async fn connect(address: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("router address")
            .timeout(Duration::from_secs(15))
            .connect()
            .await
        {
            return ch;
        }
        assert!(Instant::now() < deadline, "router {address} unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// p50 and p99 of 200 fdatasyncs of 4 KiB appended to a file in `dir`: the disk's commit latency,
/// printed next to every storage figure.
pub fn fdatasync_latency(dir: &std::path::Path) -> (Duration, Duration) {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = vec![0x5au8; 4096];
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
        samples.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
}

/// The leader replica of data cell `index` of a dev cluster's `cluster.json`: (address, pid). Asks
/// each replica's metrics endpoint (plain HTTP, so it works for TLS clusters too), else its gRPC
/// status (plaintext clusters without metrics).
pub async fn cell_leader(cluster: &serde_json::Value, index: usize) -> Option<(String, u64)> {
    let replicas = cluster["cells"][index]["replicas"].as_array()?.clone();
    for _ in 0..100 {
        for r in &replicas {
            let address = r["address"].as_str().unwrap_or_default().to_owned();
            if let Some(metrics) = r["metrics"].as_str()
                && let Some(text) = http_get(metrics, "/metrics").await
            {
                if text.lines().any(|l| l.trim() == "nid_raft_is_leader 1") {
                    return Some((address, r["pid"].as_u64().unwrap_or(0)));
                }
                continue;
            }
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{address}")) else {
                continue;
            };
            let Ok(channel) = endpoint.timeout(Duration::from_secs(2)).connect().await else { continue };
            let Ok(status) =
                CellClient::new(channel).get_cell_status(nid_proto::v1::GetCellStatusRequest {}).await
            else {
                continue;
            };
            let node = r["node_id"].as_u64();
            if status.into_inner().replicas.iter().any(|x| x.is_leader && Some(x.node_id) == node) {
                return Some((address, r["pid"].as_u64().unwrap_or(0)));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The etcd binary: `$NID_ETCD`, else `etcd` on the PATH (Debian's `etcd-server`, which
/// `make deps` installs).
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NID_ETCD") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("etcd")).find(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// An etcd cluster of real `etcd` processes on 127.0.0.1 with free ports (the benchmark's
/// comparison peer); killed on drop.
pub struct EtcdCluster {
    /// Client endpoints host:port.
    pub endpoints: Vec<String>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` members and waits until every one reports healthy.
    pub fn start(members: usize) -> anyhow::Result<EtcdCluster> {
        let binary = etcd_binary();
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: install Debian's etcd-server (make deps does, as root)",
            binary.display()
        );
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log")))?;
            children.push(
                Command::new(&binary)
                    .arg(format!("--name=m{i}"))
                    .arg(format!("--data-dir={}", dir.path().join(format!("m{i}")).display()))
                    .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                    .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
                    .arg(format!("--initial-cluster={initial}"))
                    .args(["--initial-cluster-state=new", "--initial-cluster-token=nid-bench"])
                    .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
        }
        let endpoints: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        let mut cluster = EtcdCluster { endpoints, children, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        for endpoint in cluster.endpoints.clone() {
            while !http_get_blocking(&endpoint, "/health").is_some_and(|r| r.contains("\"health\":\"true\""))
            {
                if Instant::now() > deadline
                    || cluster.children.iter_mut().any(|c| c.try_wait().ok().flatten().is_some())
                {
                    anyhow::bail!("etcd member {endpoint} did not become healthy");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(cluster)
    }

    /// `etcd://a,b,c` for `nid-loadtest --target`.
    pub fn target(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Blocking `GET path` over HTTP/1.1; None when unreachable.
pub fn http_get_blocking(address: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A replica of a `nidctl dev up` cluster that a test kills, pauses and starts again by itself:
/// its command line is read from `/proc` when adopted, and a restart runs the same command on the
/// same data directory. Replicas this handle started are SIGKILLed on drop.
pub struct DevReplica {
    /// Node id.
    pub node_id: u64,
    /// gRPC address.
    pub address: String,
    pid: u32,
    command: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl DevReplica {
    /// Adopts the running replica described by a `cluster.json` entry; its restarts log to `logs`.
    pub fn adopt(entry: &serde_json::Value, logs: &std::path::Path) -> DevReplica {
        let pid = entry["pid"].as_u64().expect("replica pid") as u32;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("replica command line");
        let command: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let name = entry["name"].as_str().unwrap_or("replica");
        DevReplica {
            node_id: entry["node_id"].as_u64().expect("node id"),
            address: entry["address"].as_str().expect("address").to_owned(),
            pid,
            command,
            log: logs.join(format!("{name}.restarted.log")),
            child: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with (and restarts with).
    pub fn command(&self) -> &[String] {
        &self.command
    }

    /// Its `--data-dir`.
    pub fn data_dir(&self) -> Option<PathBuf> {
        let i = self.command.iter().position(|a| a == "--data-dir")?;
        self.command.get(i + 1).map(PathBuf::from)
    }

    /// A replica of the same command line but node id `node_id` (a replacement for this one on
    /// its address and data directory, which joins the cell once added). Not started. Plaintext
    /// clusters only: a TLS replica would need a certificate for its new name.
    pub fn as_new_member(&self, node_id: u64) -> DevReplica {
        let mut command = self.command.clone();
        if let Some(i) = command.iter().position(|a| a == "--node-id")
            && let Some(value) = command.get_mut(i + 1)
        {
            *value = node_id.to_string();
        }
        DevReplica {
            node_id,
            address: self.address.clone(),
            pid: 0,
            command,
            log: self.log.with_file_name(format!("node-{node_id}.replacement.log")),
            child: None,
        }
    }

    fn signal(&self, signal: &str) {
        if self.pid == 0 {
            return; // never started: `kill 0` would signal the whole process group
        }
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(self.pid.to_string()).status();
    }

    /// SIGKILL, and reap it when this handle started it; otherwise wait until it has exited (a
    /// zombie of `nidctl dev up` holds no files), so a restart finds its RocksDB lock free.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
            return;
        }
        // The thread-group leader turns zombie first; the files close when the last thread has
        // gone (one in the middle of a RocksDB sync can take seconds).
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            let threads =
                std::fs::read_dir(format!("/proc/{}/task", self.pid)).map(|d| d.count()).unwrap_or(0);
            if matches!(state, None | Some("Z" | "X")) && threads <= 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("replica {} (pid {}) still running 120 s after SIGKILL", self.node_id, self.pid);
    }

    /// SIGSTOP: the process stays, frozen (a GC-like pause, a stuck VM).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`DevReplica::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Starts the replica again with its original command line (same data directory and ports).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open log");
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart replica");
        self.pid = child.id();
        self.child = Some(child);
    }

    /// This replica's view of its cell (None while it does not answer within `timeout`).
    pub async fn status(&self, timeout: Duration) -> Option<nid_proto::v1::CellStatus> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address)).ok()?;
        let channel = endpoint.connect_timeout(timeout).timeout(timeout).connect().await.ok()?;
        let request = nid_proto::v1::GetCellStatusRequest {};
        Some(CellClient::new(channel).get_cell_status(request).await.ok()?.into_inner())
    }
}

impl Drop for DevReplica {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("CONT");
            self.kill9();
        }
    }
}

/// The replicas of data cell `index` in a dev cluster's `cluster.json`, adopted.
pub fn adopt_cell(dev: &DevCluster, index: usize) -> Vec<DevReplica> {
    let logs = dev.dir.path().join("logs");
    dev.info["cells"][index]["replicas"]
        .as_array()
        .expect("cell replicas")
        .iter()
        .map(|r| DevReplica::adopt(r, &logs))
        .collect()
}

/// The index in `replicas` of the leader they agree on, asking each in turn, for up to `timeout`.
pub async fn leader_of(replicas: &[DevReplica], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for r in replicas {
            if let Some(status) = r.status(Duration::from_millis(500)).await
                && let Some(leader) = status.replicas.iter().find(|x| x.is_leader)
                && let Some(i) = replicas.iter().position(|x| x.node_id == leader.node_id)
            {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Resident memory of `pid` in MiB (0 once it has exited).
pub fn rss_mib(pid: u64) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The date and time now, `YYYY-MM-DD HH:MM UTC` (for benchmark reports).
pub fn utc_now() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
