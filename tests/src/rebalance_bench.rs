//! The rebalance benchmark (`make bench` section 6, `make bench-rebalance` alone): a cluster of N
//! data cells holding many identities gains one more while authentications and enrolments run at
//! half of what the cluster completes at most. Prints and returns what an operator asks: how long,
//! how fast (MB/s, identities/s), what clients felt (p99 before, during, after; errors), and how
//! long each moved batch of buckets refused writes.

use crate::{DevCluster, binary};
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What to run.
pub struct RebalanceBench {
    /// Data cells before the addition.
    pub cells: u64,
    /// Identities enrolled before the addition.
    pub identities: u64,
    /// Where reports go.
    pub results: PathBuf,
    /// Requests in flight for the maximum-throughput probe.
    pub concurrency: usize,
}

/// What it measured.
#[derive(Debug, Clone)]
pub struct RebalanceFigures {
    /// Data cells before the addition.
    pub cells: u64,
    /// Identities held before the addition.
    pub identities: u64,
    /// The mixed load's closed-loop maximum (completions/s) on the cluster before the addition.
    pub max_rate: f64,
    /// The offered rate during the measurement (half of `max_rate`).
    pub offered: u64,
    /// From `nidctl dev add-cell` to nothing misplaced.
    pub seconds: f64,
    /// Buckets moved.
    pub buckets: u64,
    /// Bytes (keys and values) copied, including catch-up rounds.
    pub bytes: u64,
    /// Keys copied.
    pub keys: u64,
    /// Identities moved, estimated as identities held x buckets moved / 16384.
    pub identities_moved: f64,
    /// Worst per-window p99 (ms) of the load before, during and after the rebalance.
    pub p99_before: f64,
    /// During.
    pub p99_during: f64,
    /// After.
    pub p99_after: f64,
    /// Freeze per moved batch (ms): p50, p99, max.
    pub freeze_ms: (f64, f64, f64),
    /// Moved batches.
    pub batches: usize,
    /// Aborted moves.
    pub aborted: usize,
    /// Requests that failed (or could not be sent) before, during and after.
    pub errors: (u64, u64, u64),
    /// Completed requests during the rebalance.
    pub completed_during: u64,
}

/// Seconds each load window measures.
const WINDOW: u64 = 5;

fn nidctl_json(dir: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out =
        Command::new(binary("nidctl")).args(args).args(["-o", "json", "--dev-dir"]).arg(dir).output()?;
    anyhow::ensure!(out.status.success(), "nidctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One open-loop window of mixed load; its report.
fn window(
    router: &str,
    key: &str,
    people: &Path,
    rate: u64,
    seed: u64,
    report: &Path,
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", router, "--scenario", "mixed", "--mix", "auth=50,enroll=50"])
        .args(["--rate", &rate.to_string(), "--duration", &WINDOW.to_string(), "--warmup", "0"])
        .args(["--seed", &seed.to_string(), "--api-key", key, "--people"])
        .arg(people)
        .arg("--report")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()?;
    anyhow::ensure!(out.success(), "nid-loadtest failed");
    Ok(serde_json::from_str(&std::fs::read_to_string(report)?)?)
}

fn failed(r: &serde_json::Value) -> u64 {
    r["failed"].as_u64().unwrap_or(0) + r["dropped"].as_u64().unwrap_or(0)
}

fn p99(r: &serde_json::Value) -> f64 {
    r["latency_ms"]["p99"].as_f64().unwrap_or(0.0)
}

impl RebalanceBench {
    /// Runs it: starts and stops its own cluster.
    pub fn run(&self) -> anyhow::Result<RebalanceFigures> {
        std::fs::create_dir_all(&self.results)?;
        let mut cluster = DevCluster::start(self.cells);
        let dir = cluster.dir.path().to_owned();
        let router = cluster.router();
        let key = std::fs::read_to_string(dir.join("secrets/dev-partner.apikey"))?.trim().to_owned();
        let people = self.results.join("6-people.jsonl");
        println!("   populating {} identities over {} cells", self.identities, self.cells);
        let status = Command::new(binary("nid-loadtest"))
            .args(["populate", "--target", &router, "--count", &self.identities.to_string()])
            .args(["--seed", "61", "--concurrency", "64", "--out"])
            .arg(&people)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "populate failed");

        // The maximum of the mixed load on this cluster, then half of it.
        let report = self.results.join("6-rebalance-max.json");
        let out = Command::new(binary("nid-loadtest"))
            .args(["run", "--target", &router, "--scenario", "mixed", "--mix", "auth=50,enroll=50"])
            .args(["--concurrency", &self.concurrency.to_string(), "--duration", &WINDOW.to_string()])
            .args(["--seed", "62", "--api-key", &key, "--people"])
            .arg(&people)
            .arg("--report")
            .arg(&report)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(out.success(), "the maximum-throughput probe failed");
        let max: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
        let max_rate = max["throughput"].as_f64().unwrap_or(0.0);
        let offered = ((max_rate / 2.0) as u64).max(1);
        println!("   mixed auth/enrol maximum {max_rate:.0}/s; offering {offered}/s");

        let mut seed = 70;
        let mut next = |tag: &str| {
            seed += 1;
            (seed, self.results.join(format!("6-rebalance-{tag}-{seed}.json")))
        };
        let mut before = Vec::new();
        for _ in 0..2 {
            let (s, path) = next("before");
            before.push(window(&router, &key, &people, offered, s, &path)?);
        }

        // During: windows one after another while the cell joins.
        let done = Arc::new(AtomicBool::new(false));
        let load = {
            let (done, router, key, people, results) =
                (done.clone(), router.clone(), key.clone(), people.clone(), self.results.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<serde_json::Value>> {
                let mut reports = Vec::new();
                let mut s = 200;
                while !done.load(Ordering::SeqCst) {
                    s += 1;
                    let path = results.join(format!("6-rebalance-during-{s}.json"));
                    reports.push(window(&router, &key, &people, offered, s, &path)?);
                }
                Ok(reports)
            })
        };
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let out = Command::new(binary("nidctl"))
            .args(["dev", "add-cell", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .output()?;
        anyhow::ensure!(out.status.success(), "dev add-cell: {}", String::from_utf8_lossy(&out.stderr));
        let deadline = started + Duration::from_secs(1800);
        let status = loop {
            let s = nidctl_json(&dir, &["rebalance", "status"])?;
            let idle = s["buckets_misplaced"].as_u64() == Some(0)
                && s["in_flight"].as_array().is_some_and(|m| m.is_empty())
                && s["cells"].as_array().is_some_and(|c| c.len() as u64 == self.cells + 1);
            if idle {
                break s;
            }
            anyhow::ensure!(Instant::now() < deadline, "the rebalance did not finish in 30 minutes: {s}");
            std::thread::sleep(Duration::from_millis(250));
        };
        let seconds = started.elapsed().as_secs_f64();
        done.store(true, Ordering::SeqCst);
        let during = load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        let mut after = Vec::new();
        for _ in 0..2 {
            let (s, path) = next("after");
            after.push(window(&router, &key, &people, offered, s, &path)?);
        }
        cluster.stop();

        let finished = status["finished"].as_array().cloned().unwrap_or_default();
        let committed: Vec<&serde_json::Value> = finished.iter().filter(|m| m["phase"] == "done").collect();
        let aborted = finished.iter().filter(|m| m["phase"] == "aborted").count();
        let sum = |field: &str| committed.iter().map(|m| m[field].as_u64().unwrap_or(0)).sum::<u64>();
        let (buckets, bytes, keys) = (sum("buckets"), sum("bytes"), sum("keys"));
        let mut freeze: Vec<f64> = committed.iter().map(|m| m["freeze_ms"].as_f64().unwrap_or(0.0)).collect();
        freeze.sort_by(f64::total_cmp);
        let worst = |rs: &[serde_json::Value]| rs.iter().map(p99).fold(0.0, f64::max);
        let errors = |rs: &[serde_json::Value]| rs.iter().map(failed).sum::<u64>();
        let figures = RebalanceFigures {
            cells: self.cells,
            identities: self.identities,
            max_rate,
            offered,
            seconds,
            buckets,
            bytes,
            keys,
            identities_moved: self.identities as f64 * buckets as f64 / f64::from(nid_proto::bucket::BUCKETS),
            p99_before: worst(&before),
            p99_during: worst(&during),
            p99_after: worst(&after),
            freeze_ms: (
                percentile(&freeze, 50.0),
                percentile(&freeze, 99.0),
                freeze.last().copied().unwrap_or(0.0),
            ),
            batches: committed.len(),
            aborted,
            errors: (errors(&before), errors(&during), errors(&after)),
            completed_during: during.iter().map(|r| r["ok"].as_u64().unwrap_or(0)).sum(),
        };
        if finished.len() >= 256 {
            println!("   (the control cell keeps the last 256 moves: freeze and byte figures cover those)");
        }
        Ok(figures)
    }
}

impl RebalanceFigures {
    /// MB/s copied over the whole rebalance.
    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(0.001)
    }

    /// The figures as Markdown lines.
    pub fn markdown(&self) -> String {
        format!(
            "| {} -> {} cells, {} identities | {:.1} s | {} buckets in {} batches ({} aborted) | {:.2} MB ({} keys) = {:.2} MB/s | \
             ~{:.0} identities/s | {:.1} / {:.1} / {:.1} ms ({:.2}x) | {:.0} / {:.0} / {:.0} ms | {} / {} / {} of {} during |",
            self.cells,
            self.cells + 1,
            self.identities,
            self.seconds,
            self.buckets,
            self.batches,
            self.aborted,
            self.bytes as f64 / 1e6,
            self.keys,
            self.mb_per_second(),
            self.identities_moved / self.seconds.max(0.001),
            self.p99_before,
            self.p99_during,
            self.p99_after,
            self.p99_during / self.p99_before.max(0.001),
            self.freeze_ms.0,
            self.freeze_ms.1,
            self.freeze_ms.2,
            self.errors.0,
            self.errors.1,
            self.errors.2,
            self.completed_during,
        )
    }

    /// The Markdown table's header.
    pub fn header() -> &'static str {
        "| cluster | time | moved | copied | identities moved | p99 before / during / after (during vs before) | freeze p50 / p99 / max | errors before / during / after |\n|---|---:|---|---|---:|---|---|---|"
    }
}

/// Parses `--name VALUE` from the command line.
pub fn arg<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)) {
        Some(v) => v.parse().map(Some).map_err(|e| anyhow::anyhow!("{name}: {e}")).context("arguments"),
        None => Ok(None),
    }
}
