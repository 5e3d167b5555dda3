//! `make bench`: the standard benchmark suite. It starts everything it needs (dev clusters of real
//! processes, a 3-member etcd), drives them with `nid-loadtest`, prints one table and writes it to
//! BENCHMARKS.md with the date, the machine and the disk's fdatasync latency measured at the start.
//! Every figure also appears as a ratio to a figure of the same run (the no-op ceiling, etcd, one
//! cell), because absolute figures drift on shared machines. Asserts nothing.
//!
//! Usage: bench-suite [--seconds N] [--out BENCHMARKS.md] [--results DIR] [--cell-cpu 0.25]
//!                    [--concurrency 64] [--populate 5000] [--skip-etcd] [--skip-scaleout]
//!                    [--skip-profile] [--skip-rebalance] [--rebalance-identities 200000]
//!                    [--skip-overload | --overload-only] [--overload-cpu 0.6] [--overload-seconds 30]

use anyhow::Context as _;
use nid_tests::{DevCluster, EtcdCluster, binary, cell_leader, fdatasync_latency, rss_mib};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Options {
    seconds: u64,
    out: PathBuf,
    results: PathBuf,
    cell_cpu: f64,
    concurrency: usize,
    populate: u64,
    etcd: bool,
    scaleout: bool,
    profile: bool,
    rebalance: bool,
    rebalance_identities: u64,
    overload: bool,
    overload_only: bool,
    overload_cpu: f64,
    overload_seconds: u64,
}

impl Options {
    fn parse() -> anyhow::Result<Options> {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
        let flag = |name: &str| args.iter().any(|a| a == name);
        Ok(Options {
            seconds: value("--seconds").map(|s| s.parse()).transpose()?.unwrap_or(10),
            out: value("--out").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("BENCHMARKS.md")),
            results: value("--results").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".nid/bench")),
            cell_cpu: value("--cell-cpu").map(|s| s.parse()).transpose()?.unwrap_or(0.25),
            concurrency: value("--concurrency").map(|s| s.parse()).transpose()?.unwrap_or(64),
            populate: value("--populate").map(|s| s.parse()).transpose()?.unwrap_or(5000),
            etcd: !flag("--skip-etcd"),
            scaleout: !flag("--skip-scaleout"),
            profile: !flag("--skip-profile"),
            rebalance: !flag("--skip-rebalance"),
            rebalance_identities: value("--rebalance-identities")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(200_000),
            overload: !flag("--skip-overload"),
            overload_only: flag("--overload-only"),
            overload_cpu: value("--overload-cpu").map(|s| s.parse()).transpose()?.unwrap_or(0.6),
            overload_seconds: value("--overload-seconds").map(|s| s.parse()).transpose()?.unwrap_or(30),
        })
    }
}

/// Unmeasured seconds before every run.
const WARMUP_SECONDS: u64 = 2;

/// One measured row of the table.
struct Row {
    section: &'static str,
    workload: String,
    mode: String,
    throughput: f64,
    p50: f64,
    p99: f64,
    failed: u64,
    ratio: String,
}

impl Row {
    fn from_report(section: &'static str, workload: &str, r: &serde_json::Value) -> Row {
        let mode = match r["mode"].as_str() {
            Some("open") => format!("open, {}/s", r["load"]),
            _ => format!("closed, c={}", r["load"]),
        };
        Row {
            section,
            workload: workload.to_owned(),
            mode,
            throughput: r["throughput"].as_f64().unwrap_or(0.0),
            p50: r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            p99: r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            failed: r["failed"].as_u64().unwrap_or(0) + r["dropped"].as_u64().unwrap_or(0),
            ratio: String::new(),
        }
    }
}

/// Runs `nid-loadtest run ARGS`, keeping its JSON report and plot under `results/TAG.*`.
fn loadtest(options: &Options, tag: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    loadtest_for(options, tag, args, options.seconds)
}

/// [`loadtest`] measuring `seconds` (the first phase of a phased run).
fn loadtest_for(
    options: &Options,
    tag: &str,
    args: &[&str],
    seconds: u64,
) -> anyhow::Result<serde_json::Value> {
    let report = options.results.join(format!("{tag}.json"));
    let seconds = seconds.to_string();
    let out = Command::new(binary("nid-loadtest"))
        .arg("run")
        .args(args)
        .args(["--duration", &seconds, "--warmup", &WARMUP_SECONDS.to_string(), "--report"])
        .arg(&report)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run nid-loadtest for {tag}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(out.status.success(), "nid-loadtest failed for {tag}");
    Ok(serde_json::from_str(&std::fs::read_to_string(&report)?)?)
}

/// `nid-loadtest GLOBAL populate`: `--populate` people (seed 11) enrolled through `router`, kept
/// in `out`.
fn populate(options: &Options, global: &[&str], router: &str, out: &Path) -> anyhow::Result<()> {
    let status = Command::new(binary("nid-loadtest"))
        .args(global)
        .args(["populate", "--target", router, "--count", &options.populate.to_string(), "--seed", "11"])
        .arg("--out")
        .arg(out)
        .status()?;
    anyhow::ensure!(status.success(), "populate through {router} failed");
    Ok(())
}

/// The arguments of an authentication run (10% wrong factors) through `router` as the partner of
/// API key `key` over the people in `people`, then `load`.
fn auth_run_args(router: &str, key: &str, people: &str, load: &[&str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["--target", router, "--scenario", "auth", "--wrong-percent", "10", "--api-key", key]
            .iter()
            .map(|s| s.to_string())
            .collect();
    a.extend(["--people".to_owned(), people.to_owned()]);
    a.extend(load.iter().map(|s| s.to_string()));
    a
}

/// A second router on the bench cluster that assigns no request ids (killed on drop).
struct BareRouter {
    address: String,
    child: std::process::Child,
}

impl BareRouter {
    fn start(cluster: &serde_json::Value, flags: &[&str]) -> anyhow::Result<BareRouter> {
        let control: Vec<&str> = cluster["control"]["replicas"]
            .as_array()
            .context("control replicas in cluster.json")?
            .iter()
            .filter_map(|r| r["address"].as_str())
            .collect();
        let address = format!("127.0.0.1:{}", nid_tests::free_port());
        let child = Command::new(binary("nid-router"))
            .args(["--listen", &address, "--control", &control.join(","), "--insecure", "--threads", "1"])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the router without request ids")?;
        let mut router = BareRouter { address, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(&router.address).is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the second router never listened");
            if let Some(status) = router.child.try_wait()? {
                anyhow::bail!("the second router exited: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(router)
    }
}

impl Drop for BareRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits a people file into two halves (disjoint identities for two update runs).
fn split_people(people: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(people)?;
    let lines: Vec<&str> = text.lines().collect();
    let (a, b) = lines.split_at(lines.len() / 2);
    let (pa, pb) = (dir.join("people-a.jsonl"), dir.join("people-b.jsonl"));
    std::fs::write(&pa, a.join("\n") + "\n")?;
    std::fs::write(&pb, b.join("\n") + "\n")?;
    Ok((pa, pb))
}

/// Machine facts for the header: cores, CPU model, RAM, kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({model}), {ram_gib:.0} GiB RAM, Linux {}", kernel.trim())
}

/// (total, steal) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (fields.iter().sum(), fields.get(7).copied().unwrap_or(0))
}

/// User+system CPU ticks (USER_HZ) of a process so far.
fn process_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// The processes of a one-cell dev cluster, grouped as the CPU breakdown reports them: the cell's
/// leader, its followers, the router, the control cell.
async fn process_groups(cluster: &serde_json::Value) -> Vec<(&'static str, Vec<u64>)> {
    let leader = cell_leader(cluster, 0).await.map(|(_, pid)| pid).unwrap_or(0);
    let followers = cell_pids(cluster, 0).into_iter().filter(|p| *p != leader).collect();
    let control = cluster["control"]["replicas"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["pid"].as_u64()).collect())
        .unwrap_or_default();
    vec![
        ("cell leader", vec![leader]),
        ("cell followers (2)", followers),
        ("router", vec![cluster["router"]["pid"].as_u64().unwrap_or(0)]),
        ("control cell (3)", control),
    ]
}

/// Runs `run` and splits the machine's CPU time during it over `groups` (the rest is the load
/// generator and anything else on the machine), per successful request, in microseconds.
fn cpu_breakdown(
    groups: &[(&'static str, Vec<u64>)],
    run: impl FnOnce() -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<(serde_json::Value, String)> {
    let ticks = |pids: &Vec<u64>| pids.iter().map(|p| process_ticks(*p)).sum::<u64>();
    let before: Vec<u64> = groups.iter().map(|(_, pids)| ticks(pids)).collect();
    let (total0, steal0) = cpu_jiffies();
    let idle0 = idle_jiffies();
    let report = run()?;
    let (total1, steal1) = cpu_jiffies();
    let idle1 = idle_jiffies();
    // The measured window is the report's; the warm-up ran too, so scale by completions of the
    // whole run: ok over the measured seconds times (warm-up + measured) seconds.
    let seconds = report["seconds"].as_f64().unwrap_or(1.0);
    let requests =
        (report["ok"].as_f64().unwrap_or(0.0) * (seconds + WARMUP_SECONDS as f64) / seconds).max(1.0);
    let us = |t: u64| t as f64 * 10_000.0 / requests; // USER_HZ = 100: one tick is 10 ms
    let mut out = String::new();
    let mut accounted = 0u64;
    for ((name, pids), b) in groups.iter().zip(before) {
        let spent = ticks(pids).saturating_sub(b);
        accounted += spent;
        let _ = write!(out, "{name} {:.0} us, ", us(spent));
    }
    let busy = (total1 - total0).saturating_sub(idle1 - idle0).saturating_sub(steal1 - steal0);
    let _ = write!(
        out,
        "load generator and the rest {:.0} us; machine total {:.0} us of CPU per request",
        us(busy.saturating_sub(accounted)),
        us(busy)
    );
    Ok((report, out))
}

/// Idle + iowait jiffies of all CPUs.
fn idle_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0)
}

/// A CPU cap (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`) on a set of processes; removed on drop
/// once they have exited.
struct CpuCap {
    dir: PathBuf,
    v2: bool,
}

impl CpuCap {
    fn new(name: &str, cpus: f64, pids: &[u64], first: bool) -> anyhow::Result<CpuCap> {
        // A short period (5 ms) spreads the quota evenly: with the default 100 ms a capped cell
        // runs for a burst and then stalls, and every request waits out the stall.
        let period = 5_000u64.max((1000.0 / cpus.max(0.01)) as u64);
        let quota = ((cpus * period as f64) as u64).max(1000); // the kernel's minimum is 1 ms
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|x| x == "cpu"))
            .unwrap_or(false);
        let dir = if v2 {
            // Let children of the root use the cpu controller (already on under systemd).
            let _ = std::fs::write(v2_root.join("cgroup.subtree_control"), "+cpu");
            v2_root.join(name)
        } else {
            ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
                .iter()
                .map(Path::new)
                .find(|p| p.join("cpu.cfs_quota_us").exists())
                .context("no cgroup v2 cpu controller and no cgroup v1 cpu hierarchy")?
                .join(name)
        };
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("create {} (needs root)", dir.display()))?;
        }
        // `first`: the group also gets ten times the default weight, so up to its quota it runs
        // first, as if on CPUs of its own, and the uncapped processes (router, load generator)
        // take the rest.
        let (weight, shares) = if first { ("1000", "10240") } else { ("100", "1024") };
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
            std::fs::write(dir.join("cpu.weight"), weight)?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
            std::fs::write(dir.join("cpu.shares"), shares)?;
        }
        for pid in pids {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("move pid {pid} into {}", dir.display()))?;
        }
        Ok(CpuCap { dir, v2 })
    }

    /// Periods in which the group was throttled (evidence that the cap bit).
    fn throttled(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let key = "nr_throttled";
        stat.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn kind(&self) -> &'static str {
        if self.v2 { "cgroup v2 cpu.max" } else { "cgroup v1 cpu.cfs_quota_us" }
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The pids of data cell `index`'s replicas in a dev cluster.
fn cell_pids(cluster: &serde_json::Value, index: usize) -> Vec<u64> {
    cluster["cells"][index]["replicas"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["pid"].as_u64()).collect())
        .unwrap_or_default()
}

/// `perf record` of `pid` for `seconds` while `during` runs; the top self-time symbols.
fn profile(
    pid: u64,
    seconds: u64,
    dir: &Path,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> Option<String> {
    let data = dir.join("leader.perf");
    let mut perf = Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let ran = during();
    perf.wait().ok()?;
    ran.ok()?;
    let report = Command::new("perf")
        .args(["report", "--no-children", "--sort", "dso,symbol", "--stdio", "-g", "none", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&report.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()))
        .take(25)
        .map(|l| {
            let l = l.split_whitespace().filter(|w| *w != "-").collect::<Vec<_>>().join(" ");
            l.chars().take(140).collect()
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

const BEGIN: &str = "<!-- bench-suite: generated from here -->";
const END: &str = "<!-- bench-suite: generated up to here; text below is kept -->";

/// `existing` with its generated part replaced by `generated` (hand-written text after the end
/// marker survives a new run).
fn splice(existing: &str, generated: &str) -> String {
    let kept = existing.split_once(END).map(|(_, rest)| rest.trim_start_matches('\n')).unwrap_or("");
    let head = existing.split_once(BEGIN).map(|(head, _)| head).unwrap_or("");
    format!("{head}{BEGIN}\n{generated}{END}\n{kept}")
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn ms(v: f64) -> String {
    format!("{v:.2}")
}

/// Samples the RSS of some processes every 250 ms on a thread until dropped.
struct RssWatch {
    max: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pids: Vec<u64>) -> RssWatch {
        let max = std::sync::Arc::new(std::sync::Mutex::new(vec![0.0; pids.len()]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (max, stop) = (max.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut m) = max.lock() {
                        for (slot, pid) in m.iter_mut().zip(&pids) {
                            *slot = f64::max(*slot, rss_mib(*pid));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        RssWatch { max, stop, thread: Some(thread) }
    }

    /// The largest sample of each process since the last call; then starts afresh.
    fn take(&self) -> Vec<f64> {
        self.max.lock().map(|mut m| m.iter_mut().map(std::mem::take).collect()).unwrap_or_default()
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The latency target of the router section 7 drives (`--cell-latency-target-ms`).
const OVERLOAD_TARGET_MS: u64 = 15;

/// What section (7) measured.
struct OverloadFigures {
    cpu: f64,
    max: f64,
    max_p99: f64,
    /// CPU per authentication at the maximum, by process group.
    max_cpu: String,
    /// Requests of the closed-loop run refused as OVERLOADED and sent again after the hinted delay.
    max_retried: u64,
    /// Scheduling periods in which the cell's cgroup was throttled, up to the recovery's end.
    throttled: u64,
    /// p50 and p99 at half the maximum, ms.
    unloaded: (f64, f64),
    offered: u64,
    seconds: u64,
    /// Successes answered per second during the overload.
    goodput: f64,
    /// p50 and p99 of the successes due during the overload, ms.
    admitted: (f64, f64),
    refused: u64,
    other_failures: BTreeMap<String, u64>,
    /// Largest RSS of the router and of the cell leader, MiB: at half the maximum, then during
    /// the overload and the recovery.
    rss: [(f64, f64); 2],
    recovery_rate: u64,
    /// Seconds after the overload until two seconds in a row have a p99 within 1.5x the unloaded
    /// p99; None if that never happens in the recovery phase.
    recovery: Option<u64>,
    recovery_p99: Vec<f64>,
    /// Another partner at half the maximum beside a noisy partner offering the maximum over a
    /// rate limit of 1% of it: (throughput, p99) alone (the unloaded run) and beside the noise,
    /// the noisy partner's refusals and what it got through.
    noisy: Option<NoisyFigures>,
}

struct NoisyFigures {
    limit: u64,
    alone: (f64, f64),
    beside: (f64, f64),
    rate_limited: u64,
    noisy_served: f64,
    /// Requests per second the noisy load generator got out (answered or refused).
    noisy_sent: f64,
}

impl OverloadFigures {
    fn met(&self) -> bool {
        self.goodput >= 0.8 * self.max
            && self.admitted.1 <= 2.0 * self.unloaded.1
            && self.recovery.is_some_and(|s| s <= 5)
            && self.rss.iter().all(|(before, during)| *before > 0.0 && *during <= 2.0 * before)
    }
}

/// (7) Overload: a one-cell cluster whose three replicas share `--overload-cpu` CPUs (a cgroup;
/// the router and the load generator are uncapped, as clients live on other machines in
/// production and here would otherwise take the cell's CPU to send what it refuses):
/// authentication closed loop for the maximum, open loop at half of it for the unloaded latency,
/// then 3x the maximum for `--overload-seconds` followed at once by 15 s at half the maximum.
async fn overload_section(options: &Options) -> anyhow::Result<OverloadFigures> {
    let cluster = DevCluster::start(1);
    // A router whose latency target is the authentication SLO's (p99 <= 25 ms: a mean round trip
    // of 15 ms), beside the cluster's own router (default 50 ms).
    let partner_key = cluster.dir.path().join("secrets/partner.key").display().to_string();
    let slo_router = BareRouter::start(
        &cluster.info,
        &["--partner-key-file", &partner_key, "--cell-latency-target-ms", &OVERLOAD_TARGET_MS.to_string()],
    )?;
    let router = slo_router.address.clone();
    let key = std::fs::read_to_string(cluster.dir.path().join("secrets/dev-partner.apikey"))?;
    let people = options.results.join("people-overload.jsonl");
    populate(options, &[], &router, &people)?;
    let cap = CpuCap::new("nid-bench-overload", options.overload_cpu, &cell_pids(&cluster.info, 0), true)?;
    let people = people.display().to_string();
    let c = options.concurrency.to_string();
    let args = |load: &[&str]| auth_run_args(&router, key.trim(), &people, load);
    let f64_of =
        |r: &serde_json::Value, path: &[&str]| path.iter().fold(r, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    let mut groups = process_groups(&cluster.info).await;
    // The router under test is the SLO router, not the cluster's own (idle here).
    for (name, pids) in groups.iter_mut() {
        if *name == "router" {
            *pids = vec![u64::from(slo_router.child.id())];
        }
    }
    let (max, max_cpu) = cpu_breakdown(&groups, || {
        loadtest(options, "7-overload-max", &as_refs(&args(&["--concurrency", &c])))
    })?;
    let max_rate = f64_of(&max, &["throughput"]).max(1.0);
    let half = ((max_rate / 2.0) as u64).max(1);
    let leader = cell_leader(&cluster.info, 0).await.map(|(_, pid)| pid).unwrap_or(0);
    let watch = RssWatch::start(vec![u64::from(slo_router.child.id()), leader]);
    let unloaded = loadtest(options, "7-overload-unloaded", &as_refs(&args(&["--rate", &half.to_string()])))?;
    let rss_before = watch.take();
    let offered = (3.0 * max_rate) as u64;
    let recovery_seconds = 15;
    let then = format!("{half}:{recovery_seconds}");
    let over = loadtest_for(
        options,
        "7-overload-3x",
        &as_refs(&args(&["--rate", &offered.to_string(), "--then", &then])),
        options.overload_seconds,
    )?;
    let rss_during = watch.take();
    drop(watch);
    let throttled = cap.throttled();
    let phase = &over["phases"][0];
    let unloaded_p99 = f64_of(&unloaded, &["latency_ms", "p99"]);
    let recovery_p99: Vec<f64> = over["per_second_p99_ms"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_f64()).skip(options.overload_seconds as usize).collect())
        .unwrap_or_default();
    let normal = |p99: &f64| *p99 > 0.0 && *p99 <= 1.5 * unloaded_p99;
    let recovery = (0..recovery_p99.len().saturating_sub(1))
        .find(|&s| normal(&recovery_p99[s]) && normal(&recovery_p99[s + 1]))
        .map(|s| s as u64);
    let errors: BTreeMap<String, u64> = phase["errors"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    let (refused, other_failures): (BTreeMap<String, u64>, BTreeMap<String, u64>) =
        errors.into_iter().partition(|(k, _)| k.starts_with("ResourceExhausted"));
    let max_of = |v: &[f64], i: usize| v.get(i).copied().unwrap_or(0.0);
    Ok(OverloadFigures {
        cpu: options.overload_cpu,
        max: max_rate,
        max_p99: f64_of(&max, &["latency_ms", "p99"]),
        max_cpu,
        max_retried: max["retried"].as_u64().unwrap_or(0),
        throttled,
        unloaded: (f64_of(&unloaded, &["latency_ms", "p50"]), unloaded_p99),
        offered,
        seconds: options.overload_seconds,
        goodput: f64_of(phase, &["throughput"]),
        admitted: (f64_of(phase, &["latency_ms", "p50"]), f64_of(phase, &["latency_ms", "p99"])),
        refused: refused.values().sum(),
        other_failures,
        rss: [
            (max_of(&rss_before, 0), max_of(&rss_during, 0)),
            (max_of(&rss_before, 1), max_of(&rss_during, 1)),
        ],
        recovery_rate: half,
        recovery,
        recovery_p99,
        noisy: match noisy_partner(options, &cluster, &args, max_rate) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("noisy-partner run failed: {e:#}");
                None
            }
        },
    })
}

/// The dev partner at half the maximum alone, then again beside a partner limited to 1% of the
/// maximum that offers the whole maximum (from a second load generator).
fn noisy_partner(
    options: &Options,
    cluster: &DevCluster,
    args: &dyn Fn(&[&str]) -> Vec<String>,
    max_rate: f64,
) -> anyhow::Result<NoisyFigures> {
    let limit = ((max_rate * 0.01) as u64).max(1);
    let out = Command::new(binary("nidctl"))
        .args(["partner", "add", "bench-noisy", "--allow", "demographic"])
        .args(["--rate", &limit.to_string(), "--burst", &limit.to_string(), "--dev-dir"])
        .arg(cluster.dir.path())
        .output()?;
    anyhow::ensure!(out.status.success(), "nidctl partner add: {}", String::from_utf8_lossy(&out.stderr));
    let noisy_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // Routers learn partners within about a second.
    std::thread::sleep(Duration::from_secs(2));
    let half = ((max_rate / 2.0) as u64).max(1).to_string();
    // Alone first, right before the run beside the noisy partner: the cell as it is now (after
    // the overload's writes), not as it was at the start.
    let alone = loadtest(options, "7-alone", &as_refs(&args(&["--rate", &half])))?;
    let offered = (max_rate as u64).to_string();
    let mut noisy_args = args(&["--rate", &offered]);
    for (flag, value) in [("--api-key", noisy_key.as_str()), ("--wrong-percent", "0")] {
        if let Some(i) = noisy_args.iter().position(|a| a == flag) {
            noisy_args[i + 1] = value.to_owned();
        }
    }
    let noisy_report = options.results.join("7-noisy-partner.json");
    // It runs a second longer on each side than the measured run beside it.
    let seconds = (options.seconds + WARMUP_SECONDS + 2).to_string();
    // The noisy partner stands for a client on its own machine: its load generator runs at the
    // lowest CPU priority so that on this shared box it takes what the measured path leaves, while
    // the router still receives, checks and refuses every request it sends.
    let mut noisy = Command::new("nice")
        .args(["-n", "19"])
        .arg(binary("nid-loadtest"))
        .arg("run")
        .args(&noisy_args)
        .args(["--duration", &seconds, "--warmup", "0", "--report"])
        .arg(&noisy_report)
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let beside = loadtest(options, "7-beside-noisy-partner", &as_refs(&args(&["--rate", &half])));
    let status = noisy.wait()?;
    let beside = beside?;
    anyhow::ensure!(status.success(), "the noisy partner's load generator failed");
    let noisy: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&noisy_report)?)?;
    let pick = |r: &serde_json::Value| {
        (r["throughput"].as_f64().unwrap_or(0.0), r["latency_ms"]["p99"].as_f64().unwrap_or(0.0))
    };
    Ok(NoisyFigures {
        limit,
        alone: pick(&alone),
        beside: pick(&beside),
        rate_limited: noisy["errors"]["ResourceExhausted/RATE_LIMITED"].as_u64().unwrap_or(0),
        noisy_served: noisy["throughput"].as_f64().unwrap_or(0.0),
        noisy_sent: (noisy["ok"].as_f64().unwrap_or(0.0) + noisy["failed"].as_f64().unwrap_or(0.0))
            / noisy["seconds"].as_f64().unwrap_or(1.0).max(1.0),
    })
}

/// The overload rows of the targets table.
fn overload_targets(f: &OverloadFigures) -> String {
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let mut targets = String::new();
    let _ = writeln!(
        targets,
        "| overload at 3x max for {} s: goodput >= 80% of max, admitted p99 <= 2x unloaded, RSS bounded, normal within 5 s | goodput {:.2} of max, admitted p99 {:.2}x unloaded, RSS router {:.0} -> {:.0} MiB and leader {:.0} -> {:.0} MiB, normal after {} | {} |",
        f.seconds,
        f.goodput / f.max.max(1.0),
        f.admitted.1 / f.unloaded.1.max(0.001),
        f.rss[0].0,
        f.rss[0].1,
        f.rss[1].0,
        f.rss[1].1,
        f.recovery.map_or("more than 15 s".to_owned(), |s| format!("{s} s")),
        verdict(f.met())
    );
    if let Some(n) = &f.noisy {
        let _ = writeln!(
            targets,
            "| a partner over its rate limit leaves another's throughput and p99 within 10% | throughput {:.2}x, p99 {:.2}x of the run without it | {} |",
            n.beside.0 / n.alone.0.max(1.0),
            n.beside.1 / n.alone.1.max(0.001),
            verdict(n.beside.0 >= 0.9 * n.alone.0 && n.beside.1 <= 1.1 * n.alone.1)
        );
    }
    targets
}

/// The overload paragraphs of BENCHMARKS.md.
fn overload_text(f: &OverloadFigures) -> String {
    let mut md = String::new();
    let others: Vec<String> = f.other_failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let p99s: Vec<String> = f.recovery_p99.iter().map(|v| format!("{v:.0}")).collect();
    let _ = writeln!(
        md,
        "Section 7, overload: one cell whose three replicas share {} CPU (cgroup), the router (`--cell-latency-target-ms {}`) and the \
             load generator uncapped. Authentication (10% wrong factors): closed-loop maximum {:.0}/s (p99 {:.1} ms; {} refusals sent again after the delay they gave); open loop at half \
             of it p50 {:.1} ms, p99 {:.1} ms (the unloaded figures); then {}/s offered (3x) for {} s: {:.0}/s answered \
             yes or no ({:.2} of the maximum), admitted p50 {:.1} ms and p99 {:.1} ms ({:.2}x unloaded), {} refused with \
             RESOURCE_EXHAUSTED and a retry delay, other failures: {}. Largest RSS at half load vs during the overload: \
             router {:.0} vs {:.0} MiB, cell leader {:.0} vs {:.0} MiB. Then {}/s: p99 of each second after the overload \
             (ms): {}; two seconds in a row within 1.5x the unloaded p99 after {}. The cap bit in {} scheduling periods; CPU per \
             authentication at the maximum: {}.\n",
        f.cpu,
        OVERLOAD_TARGET_MS,
        f.max,
        f.max_p99,
        f.max_retried,
        f.unloaded.0,
        f.unloaded.1,
        f.offered,
        f.seconds,
        f.goodput,
        f.goodput / f.max.max(1.0),
        f.admitted.0,
        f.admitted.1,
        f.admitted.1 / f.unloaded.1.max(0.001),
        f.refused,
        if others.is_empty() { "none".to_owned() } else { others.join(", ") },
        f.rss[0].0,
        f.rss[0].1,
        f.rss[1].0,
        f.rss[1].1,
        f.recovery_rate,
        p99s.join(" "),
        f.recovery.map_or("more than 15 s".to_owned(), |s| format!("{s} s")),
        f.throttled,
        f.max_cpu
    );
    if let Some(n) = &f.noisy {
        let _ = writeln!(
            md,
            "Then the same half-load run alone and again beside a second partner limited to {}/s that offers the whole maximum \
                 from another load generator (at the lowest CPU priority, standing for a client on its own machine; it got \
                 {:.0}/s out): {:.0}/s at p99 {:.1} ms alone, {:.0}/s at p99 {:.1} ms beside it; the noisy \
                 partner got {:.0}/s through and {} RESOURCE_EXHAUSTED / RATE_LIMITED answers.\n",
            n.limit,
            n.noisy_sent,
            n.alone.0,
            n.alone.1,
            n.beside.0,
            n.beside.1,
            n.noisy_served,
            n.rate_limited
        );
    }
    md
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    std::fs::create_dir_all(&options.results)?;
    let c = options.concurrency.to_string();
    let started = std::time::SystemTime::now();
    let (jiffies0, steal0) = cpu_jiffies();
    let machine = machine();
    let (sync50, sync99) = fdatasync_latency(&options.results);
    let disk = format!(
        "fdatasync of 4 KiB p50 {:.2} ms, p99 {:.2} ms",
        sync50.as_secs_f64() * 1e3,
        sync99.as_secs_f64() * 1e3
    );
    println!("machine: {machine}\ndisk: {disk}");
    if options.overload_only {
        let f = overload_section(&options).await?;
        println!("\n{}\n{}", overload_text(&f), overload_targets(&f));
        return Ok(());
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // (1)-(3): one data cell of 3 replicas behind the router.
    let mut cluster = DevCluster::start(1);
    let router = cluster.router();
    let key = std::fs::read_to_string(cluster.dir.path().join("secrets/dev-partner.apikey"))?;
    let key = key.trim().to_owned();
    println!("\n== (1) no-op ceiling: echo through the router to the cell leader");
    let echo =
        loadtest(&options, "1-echo", &["--target", &router, "--scenario", "echo", "--concurrency", &c])?;
    let ceiling = echo["throughput"].as_f64().unwrap_or(0.0).max(1.0);
    let mut row = Row::from_report("1 ceiling", "echo (no Raft, no disk)", &echo);
    row.ratio = "1.00 of ceiling".into();
    rows.push(row);

    println!("\n== (2) enrolment: max throughput, then latency at fixed rates");
    let groups = process_groups(&cluster.info).await;
    let (enroll, enroll_cpu) = cpu_breakdown(&groups, || {
        loadtest(
            &options,
            "2-enroll-max",
            &["--target", &router, "--scenario", "enroll", "--concurrency", &c],
        )
    })?;
    notes.push(format!("CPU per enrolment at max throughput: {enroll_cpu}"));
    let enroll_max = enroll["throughput"].as_f64().unwrap_or(0.0);
    let mut row = Row::from_report("2 enrol", "enroll", &enroll);
    row.ratio = format!("{:.2} of ceiling", enroll_max / ceiling);
    rows.push(row);
    for (share, seed) in [(50u64, "3"), (80, "4")] {
        let rate = ((enroll_max * share as f64 / 100.0) as u64).max(1).to_string();
        let r = loadtest(
            &options,
            &format!("2-enroll-{share}pct"),
            &["--target", &router, "--scenario", "enroll", "--rate", &rate, "--seed", seed],
        )?;
        let mut row = Row::from_report("2 enrol", &format!("enroll at {share}% of max"), &r);
        row.ratio = format!("{:.2} of ceiling", row.throughput / ceiling);
        rows.push(row);
    }

    println!("\n== (3) authentication against a populated cluster");
    let people = options.results.join("people.jsonl");
    populate(&options, &[], &router, &people)?;
    let people_arg = people.display().to_string();
    let auth_args = |load: &[&str]| auth_run_args(&router, &key, &people_arg, load);
    let (auth, auth_cpu) = cpu_breakdown(&groups, || {
        loadtest(&options, "3-auth-max", &as_refs(&auth_args(&["--concurrency", &c])))
    })?;
    notes.push(format!("CPU per authentication at max throughput: {auth_cpu}"));
    let auth_max = auth["throughput"].as_f64().unwrap_or(0.0);
    let mut row = Row::from_report("3 auth", "auth (10% wrong factors)", &auth);
    row.ratio = format!("{:.2} of ceiling", auth_max / ceiling);
    rows.push(row);
    let half = ((auth_max / 2.0) as u64).max(1).to_string();
    let r = loadtest(&options, "3-auth-50pct", &as_refs(&auth_args(&["--rate", &half])))?;
    let mut row = Row::from_report("3 auth", "auth at 50% of max", &r);
    row.ratio = format!("{:.2} of ceiling", row.throughput / ceiling);
    rows.push(row);
    let target = loadtest(&options, "3-auth-5000", &as_refs(&auth_args(&["--rate", "5000"])))?;
    let mut row = Row::from_report("3 auth", "auth at the 5,000/s target", &target);
    row.ratio = format!("{:.2} of target rate", row.throughput / 5000.0);
    let (target_rate, target_p99) = (row.throughput, row.p99);
    rows.push(row);

    // (2b) What exactly-once costs: the same cluster through a second router that assigns no
    // request ids (a hidden benchmark-only flag), enrolments and versioned updates, one after the
    // other in this run. Updates go to two disjoint halves of the populated people.
    println!("\n== (2b) exactly-once bookkeeping: request ids on vs off, same cluster");
    let bare = BareRouter::start(&cluster.info, &["--unsafe-no-request-ids"])?;
    let (half_a, half_b) = split_people(&people, &options.results)?;
    let mut once = Vec::new();
    for (tag, target, seed, half) in
        [("on", router.as_str(), "21", &half_a), ("off", bare.address.as_str(), "22", &half_b)]
    {
        let e = loadtest(
            &options,
            &format!("2b-enroll-ids-{tag}"),
            &["--target", target, "--scenario", "enroll", "--concurrency", &c, "--seed", seed],
        )?;
        let half = half.display().to_string();
        let u = loadtest(
            &options,
            &format!("2b-update-ids-{tag}"),
            &["--target", target, "--scenario", "update", "--concurrency", &c, "--people", &half],
        )?;
        once.push((tag, e, u));
    }
    drop(bare);
    let rate = |r: &serde_json::Value| r["throughput"].as_f64().unwrap_or(0.0);
    let (enroll_on, enroll_off) = (rate(&once[0].1), rate(&once[1].1).max(1.0));
    let (update_on, update_off) = (rate(&once[0].2), rate(&once[1].2).max(1.0));
    for (tag, e, u) in &once {
        let mut row = Row::from_report("2b exactly-once", &format!("enroll, request ids {tag}"), e);
        row.ratio = format!("{:.2} of ids off", rate(e) / enroll_off);
        rows.push(row);
        let mut row = Row::from_report("2b exactly-once", &format!("versioned update, request ids {tag}"), u);
        row.ratio = format!("{:.2} of ids off", rate(u) / update_off);
        rows.push(row);
    }
    let exactly_once = (enroll_on / enroll_off, update_on / update_off);

    let mut profiles: Vec<(&str, String)> = Vec::new();
    if options.profile
        && let Some((_, pid)) = cell_leader(&cluster.info, 0).await
    {
        let auth = auth_args(&["--concurrency", &c]);
        let enroll: Vec<String> =
            ["--target", &router, "--scenario", "enroll", "--concurrency", &c, "--seed", "5"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        for (what, tag, args) in [("auth", "3-auth-profiled", auth), ("enroll", "2-enroll-profiled", enroll)]
        {
            println!("\n== profile of the cell leader (pid {pid}) under closed-loop {what}");
            let seconds = options.seconds + WARMUP_SECONDS;
            match profile(pid, seconds, &options.results, || {
                loadtest(&options, tag, &as_refs(&args)).map(|_| ())
            }) {
                Some(text) => profiles.push((what, text)),
                None => notes.push(format!("perf is not available or could not attach: no {what} profile")),
            }
        }
    }
    cluster.stop();

    // (3b) The same closed-loop authentication with mutual TLS on every hop (client to router,
    // router to cell, Raft between replicas): a fresh TLS cluster populated the same way, run
    // alone on the machine like (3).
    println!("\n== (3b) authentication over mutual TLS, beside the plaintext run of (3)");
    let tls_cluster = DevCluster::start_tls(1);
    let tls_router = tls_cluster.router();
    let tls_dir = tls_cluster.dir.path().join("secrets/tls").display().to_string();
    let tls_key = std::fs::read_to_string(tls_cluster.dir.path().join("secrets/dev-partner.apikey"))?;
    let tls_people = options.results.join("people-tls.jsonl");
    populate(&options, &["--tls-dir", &tls_dir], &tls_router, &tls_people)?;
    let tls_groups = process_groups(&tls_cluster.info).await;
    let tls_people = tls_people.display().to_string();
    let (tls_auth, tls_cpu) = cpu_breakdown(&tls_groups, || {
        loadtest(
            &options,
            "3b-auth-tls",
            &[
                "--tls-dir",
                &tls_dir,
                "--target",
                &tls_router,
                "--scenario",
                "auth",
                "--wrong-percent",
                "10",
                "--api-key",
                tls_key.trim(),
                "--people",
                &tls_people,
                "--concurrency",
                &c,
            ],
        )
    })?;
    notes.push(format!("CPU per authentication at max throughput over mutual TLS: {tls_cpu}"));
    let mut row = Row::from_report("3b auth TLS", "auth over mutual TLS (10% wrong factors)", &tls_auth);
    row.ratio = format!("{:.2} of plaintext (3)", row.throughput / auth_max.max(1.0));
    rows.push(row);
    drop(tls_cluster);

    // (7) overload, before etcd and the scale-out (it is about this cell's behaviour, not theirs).
    let mut overload = None;
    if options.overload {
        println!(
            "\n== (7) overload: authentication at 3x the maximum for {} s on a cell capped to {} CPU",
            options.overload_seconds, options.overload_cpu
        );
        match overload_section(&options).await {
            Ok(f) => overload = Some(f),
            Err(e) => notes.push(format!("overload section failed: {e:#}")),
        }
    }

    // (4) etcd, same harness and value size.
    let mut etcd_figures = None;
    if options.etcd {
        println!("\n== (4) etcd 3 members on loopback, the same enrolment requests as puts");
        match EtcdCluster::start(3) {
            Ok(etcd) => {
                let r = loadtest(
                    &options,
                    "4-etcd-put",
                    &["--target", &etcd.target(), "--scenario", "enroll", "--concurrency", &c],
                )?;
                let version = Command::new(nid_tests::etcd_binary())
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                let mut row = Row::from_report("4 etcd", &format!("put, {}", version.trim()), &r);
                row.ratio = format!("nid enrol = {:.2}x etcd", enroll_max / row.throughput.max(1.0));
                etcd_figures = Some((row.throughput, row.p99));
                rows.push(row);
            }
            Err(e) => notes.push(format!("etcd skipped: {e:#}")),
        }
    }

    // (5) scale-out under equal CPU quotas per cell.
    let mut scale: Vec<(u64, f64, u64)> = Vec::new();
    if options.scaleout {
        println!("\n== (5) scale-out: 1, 2, 4 and 8 cells, each capped to {} CPU", options.cell_cpu);
        for cells in [1u64, 2, 4, 8] {
            let mut cluster = DevCluster::start(cells);
            let mut caps = Vec::new();
            let mut failed = None;
            for i in 0..cells as usize {
                match CpuCap::new(
                    &format!("nid-bench-cell{i}"),
                    options.cell_cpu,
                    &cell_pids(&cluster.info, i),
                    false,
                ) {
                    Ok(cap) => caps.push(cap),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                notes.push(format!("scale-out skipped: {e:#}"));
                cluster.stop();
                break;
            }
            let router = cluster.router();
            let conc = (32 * cells).to_string();
            let r = loadtest(
                &options,
                &format!("5-scaleout-{cells}"),
                &["--target", &router, "--scenario", "enroll", "--concurrency", &conc, "--connections", "8"],
            )?;
            let throttled: u64 = caps.iter().map(CpuCap::throttled).sum();
            let kind = caps.first().map(CpuCap::kind).unwrap_or("");
            let mut row = Row::from_report("5 scale-out", &format!("enroll, {cells} cell(s)"), &r);
            let base = scale.first().map(|(_, t, _)| *t).unwrap_or(row.throughput).max(1.0);
            row.ratio = format!(
                "{:.0}/s per cell, efficiency {:.2}",
                row.throughput / cells as f64,
                row.throughput / (cells as f64 * base)
            );
            scale.push((cells, row.throughput, throttled));
            rows.push(row);
            cluster.stop();
            drop(caps);
            println!("   ({kind}; throttled periods {throttled})");
        }
    }

    // (6) a fifth cell joins four under load.
    let mut rebalance = None;
    if options.rebalance {
        println!(
            "\n== (6) rebalance: a fifth cell joins four holding {} identities",
            options.rebalance_identities
        );
        let bench = nid_tests::rebalance_bench::RebalanceBench {
            cells: 4,
            identities: options.rebalance_identities,
            results: options.results.clone(),
            concurrency: options.concurrency,
        };
        match bench.run() {
            Ok(f) => {
                println!("{}\n{}", nid_tests::rebalance_bench::RebalanceFigures::header(), f.markdown());
                rebalance = Some(f);
            }
            Err(e) => notes.push(format!("rebalance section failed: {e:#}")),
        }
    }

    let (jiffies1, steal1) = cpu_jiffies();
    let steal = 100.0 * (steal1 - steal0) as f64 / (jiffies1 - jiffies0).max(1) as f64;
    let elapsed = started.elapsed().unwrap_or_default().as_secs();

    // The table and the targets.
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| section | workload | load | throughput/s | p50 ms | p99 ms | failed or not sent | ratio |"
    );
    let _ = writeln!(table, "|---|---|---|---:|---:|---:|---:|---|");
    for r in &rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            r.section,
            r.workload,
            r.mode,
            r.throughput,
            ms(r.p50),
            ms(r.p99),
            r.failed,
            r.ratio
        );
    }
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let mut targets = String::new();
    let _ = writeln!(targets, "| target | measured in this run | |");
    let _ = writeln!(targets, "|---|---|---|");
    let _ = writeln!(
        targets,
        "| auth >= 5,000/s at p99 <= 25 ms (one cell) | {target_rate:.0}/s offered 5,000/s, p99 {target_p99:.1} ms; closed-loop max {auth_max:.0}/s = {:.2} of target | {} |",
        auth_max / 5000.0,
        verdict(target_rate >= 4950.0 && target_p99 <= 25.0)
    );
    if let Some((etcd_rate, etcd_p99)) = etcd_figures {
        let enroll_p99 = rows.iter().find(|r| r.section == "2 enrol").map(|r| r.p99).unwrap_or(0.0);
        let _ = writeln!(
            targets,
            "| enrol >= 3x etcd put throughput at a lower p99 | {:.2}x ({enroll_max:.0} vs {etcd_rate:.0}/s), p99 {enroll_p99:.1} vs {etcd_p99:.1} ms | {} |",
            enroll_max / etcd_rate.max(1.0),
            verdict(enroll_max >= 3.0 * etcd_rate && enroll_p99 < etcd_p99)
        );
    }
    let _ = writeln!(
        targets,
        "| request-id bookkeeping costs < 10% of enrolment throughput | enrol {:.2} of the same with ids off \
         (versioned updates, for information: {:.2}; each writes a request record and its sweep index) | {} |",
        exactly_once.0,
        exactly_once.1,
        verdict(exactly_once.0 > 0.9)
    );
    let _ = writeln!(
        targets,
        "| >= 50% of the no-op ceiling | enrol {:.2}, auth {:.2} of {ceiling:.0}/s | {} |",
        enroll_max / ceiling,
        auth_max / ceiling,
        verdict(enroll_max / ceiling >= 0.5 && auth_max / ceiling >= 0.5)
    );
    if let Some((_, base, _)) = scale.first() {
        let effs: Vec<String> = scale
            .iter()
            .skip(1)
            .map(|(n, t, _)| format!("{n} cells {:.2}", t / (*n as f64 * base.max(1.0))))
            .collect();
        let worst =
            scale.iter().skip(1).map(|(n, t, _)| t / (*n as f64 * base.max(1.0))).fold(f64::MAX, f64::min);
        let _ = writeln!(
            targets,
            "| scale-out efficiency >= 0.9 | {} | {} |",
            effs.join(", "),
            verdict((0.9..f64::MAX).contains(&worst))
        );
    }

    if let Some(f) = &rebalance {
        let _ = writeln!(
            targets,
            "| adding a cell: 0 client errors, p99 during <= 2x before, freeze p99 <= 250 ms, >= 20 MB/s | {} errors, p99 {:.2}x, freeze p99 {:.0} ms, {:.2} MB/s | {} |",
            f.errors.1,
            f.p99_during / f.p99_before.max(0.001),
            f.freeze_ms.1,
            f.mb_per_second(),
            verdict(
                f.errors.1 == 0
                    && f.p99_during <= 2.0 * f.p99_before
                    && f.freeze_ms.1 <= 250.0
                    && f.mb_per_second() >= 20.0
            )
        );
    }

    if let Some(f) = &overload {
        targets.push_str(&overload_targets(f));
    }

    let date = nid_tests::utc_now();
    let mut md = String::new();
    let _ = writeln!(md, "# nid benchmarks\n");
    let _ =
        writeln!(md, "Written by `make bench` (tests/src/bin/bench-suite.rs); figures, not assertions.\n");
    let _ = writeln!(md, "- Date: {date}; the suite took {elapsed} s.");
    let _ = writeln!(md, "- Machine: {machine}.");
    let _ = writeln!(md, "- Disk: {disk} (measured at the start).");
    let _ = writeln!(
        md,
        "- CPU steal during the run: {steal:.1}% (a shared VM: compare ratios, not absolute figures)."
    );
    let _ = writeln!(
        md,
        "- Everything runs on this one machine on loopback: the control cell, the data cells (3 replicas each), the router, \
         the load generator (`nid-loadtest`, {} connections) and etcd. Sections 1-3 use one uncapped data cell; closed-loop \
         rows keep {c} requests in flight; open-loop rows send on a fixed schedule and measure from the intended send time.",
        4
    );
    let _ = writeln!(
        md,
        "- Section 5 caps each data cell's three replica processes to {} CPU with cgroups; the router and the load \
         generator are not capped. Reports and SVG plots of every row: `{}`.\n",
        options.cell_cpu,
        options.results.display()
    );
    let _ = writeln!(md, "{table}");
    if let Some(f) = &rebalance {
        let _ = writeln!(
            md,
            "Section 6, a fifth cell joins four (uncapped) under mixed authentication and enrolment at half the cluster's \
             closed-loop maximum ({:.0}/s of {:.0}/s); p99 is the worst of {}-second windows; identities moved are \
             estimated from the buckets moved:\n\n{}\n{}\n",
            f.offered as f64,
            f.max_rate,
            5,
            nid_tests::rebalance_bench::RebalanceFigures::header(),
            f.markdown()
        );
    }
    if let Some(f) = &overload {
        md.push_str(&overload_text(f));
    }
    let _ = writeln!(md, "## Targets\n\n{targets}");
    for n in &notes {
        let _ = writeln!(md, "- {n}.");
    }
    if !profiles.is_empty() {
        let _ = writeln!(md, "\n## Where the time goes");
    }
    for (what, text) in &profiles {
        let _ = writeln!(
            md,
            "\nperf, the cell leader's process under closed-loop {what} (self time by library and symbol, top 25):\n\n```\n{text}\n```"
        );
    }
    println!("\n{table}\n{targets}");
    for n in &notes {
        println!("note: {n}");
    }
    std::fs::write(&options.out, splice(&std::fs::read_to_string(&options.out).unwrap_or_default(), &md))?;
    println!("wrote {}", options.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_run_replaces_the_generated_part_and_keeps_the_rest() {
        let first = splice("", "table one\n");
        assert!(first.starts_with(BEGIN) && first.contains("table one") && first.trim_end().ends_with(END));
        let edited = format!("{first}\n## Reading these figures\nby hand\n");
        let second = splice(&edited, "table two\n");
        assert!(second.contains("table two") && !second.contains("table one"), "{second}");
        assert!(second.ends_with("## Reading these figures\nby hand\n"), "{second}");
        assert_eq!(splice(&second, "table two\n"), second, "idempotent");
    }
}
