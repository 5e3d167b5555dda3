//! `make bench-scale`: how cost grows as one cell's data grows. A one-cell dev cluster is measured
//! at a small population (10,000 identities by default), filled to a large one (1,000,000) in
//! timed chunks, and measured again: bytes on disk per identity, RSS of each replica and of the
//! router, authentication throughput and p99 (closed loop over the whole population, so the working
//! set grows with it), then the time a follower killed with SIGKILL takes to serve again on its own
//! data, and the time a follower whose data directory is wiped takes to catch up (by snapshot when
//! the leader's log no longer reaches back). Prints a Markdown section and writes it to
//! `RESULTS/scale.md`. Asserts nothing.
//!
//! Usage: bench-scale [--identities 1000000] [--small 10000] [--chunks 10] [--seconds 20]
//!                    [--concurrency 64] [--results .nid/bench/scale]

use anyhow::Context as _;
use nid_proto::v1::TransferLeaderRequest;
use nid_proto::v1::cell_client::CellClient;
use nid_tests::rebalance_bench::arg;
use nid_tests::{DevCluster, DevReplica, adopt_cell, binary, http_get, leader_of, rss_mib};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    identities: u64,
    small: u64,
    chunks: u64,
    seconds: u64,
    concurrency: usize,
    results: PathBuf,
}

/// What one population size measured.
struct Point {
    identities: u64,
    auth: serde_json::Value,
    /// Per replica: (RocksDB tables, everything in the data directory).
    disk_bytes: Vec<(u64, u64)>,
    /// Per replica, the larger of before and after the authentication run (the cache fills).
    rss: Vec<f64>,
    router_rss: f64,
}

/// `nid-loadtest populate`: `count` people of `seed` into `out`; returns the seconds it took.
fn populate(o: &Options, router: &str, count: u64, seed: u64, out: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = Command::new(binary("nid-loadtest"))
        .args(["populate", "--target", router, "--count", &count.to_string(), "--seed", &seed.to_string()])
        .args(["--concurrency", &o.concurrency.to_string(), "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .context("run nid-loadtest populate")?;
    anyhow::ensure!(status.success(), "populate failed");
    Ok(started.elapsed().as_secs_f64())
}

/// A closed-loop authentication run (10% wrong factors) over `people`, its report kept as `tag`.
fn authenticate(
    o: &Options,
    router: &str,
    key: &str,
    people: &Path,
    tag: &str,
) -> anyhow::Result<serde_json::Value> {
    let report = o.results.join(format!("{tag}.json"));
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", router, "--scenario", "auth", "--wrong-percent", "10", "--api-key", key])
        .arg("--people")
        .arg(people)
        .args(["--concurrency", &o.concurrency.to_string(), "--duration", &o.seconds.to_string()])
        .args(["--warmup", "3", "--report"])
        .arg(&report)
        .output()
        .context("run nid-loadtest")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(out.status.success(), "nid-loadtest failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(&std::fs::read_to_string(&report)?)?)
}

/// Bytes under `path`: (RocksDB tables, all files). The rest is the write-ahead log, RocksDB's
/// own logs and manifests, and snapshot files.
fn disk_bytes(path: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(path) else { return (0, 0) };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            Ok(_) => {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                let table = e.file_name().to_string_lossy().ends_with(".sst");
                (if table { len } else { 0 }, len)
            }
            Err(_) => (0, 0),
        })
        .fold((0, 0), |(t, a), (t2, a2)| (t + t2, a + a2))
}

/// The `--data-dir` of a replica.
fn data_dir(r: &DevReplica) -> anyhow::Result<PathBuf> {
    r.data_dir().context("replica without --data-dir")
}

fn measure(
    o: &Options,
    cluster: &DevCluster,
    replicas: &[DevReplica],
    key: &str,
    people: &Path,
    identities: u64,
) -> anyhow::Result<Point> {
    let mut disk_bytes_now = Vec::new();
    for r in replicas {
        disk_bytes_now.push(disk_bytes(&data_dir(r)?));
    }
    let rss_now = || -> Vec<f64> { replicas.iter().map(|r| rss_mib(u64::from(r.pid()))).collect() };
    let router_pid = cluster.info["router"]["pid"].as_u64().unwrap_or(0);
    let (rss_before, router_before) = (rss_now(), rss_mib(router_pid));
    let auth = authenticate(o, &cluster.router(), key, people, &format!("auth-{identities}"))?;
    let rss = rss_before.iter().zip(rss_now()).map(|(a, b)| a.max(b)).collect();
    let router_rss = router_before.max(rss_mib(router_pid));
    Ok(Point { identities, auth, disk_bytes: disk_bytes_now, rss, router_rss })
}

/// The applied index and known leader of `r` (None while it does not answer).
async fn applied(r: &DevReplica) -> Option<(u64, u64)> {
    let status = r.status(Duration::from_millis(500)).await?;
    let own = status.replicas.iter().find(|x| x.node_id == r.node_id)?;
    let leader = status.replicas.iter().find(|x| x.is_leader).map(|x| x.node_id).unwrap_or(0);
    Some((own.applied_index, leader))
}

/// `nidctl cell replace-replica 1 --node OLD --new-node NEW` on the dev cluster in `dir`: the
/// seconds the new replica took to catch up, as nidctl reports them.
fn replace_replica(dir: &Path, old: u64, new: u64) -> anyhow::Result<f64> {
    let out = Command::new(binary("nidctl"))
        .args(["-o", "json", "cell", "replace-replica", "1", "--node", &old.to_string()])
        .args(["--new-node", &new.to_string(), "--dev-dir"])
        .arg(dir)
        .output()
        .context("run nidctl cell replace-replica")?;
    anyhow::ensure!(out.status.success(), "replace-replica failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    report["caught_up_seconds"].as_f64().context("no caught_up_seconds in nidctl's answer")
}

/// Seconds until `r` answers, knows a leader and has applied at least `target`.
async fn until_serving(r: &DevReplica, target: u64, limit: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        if let Some((index, leader)) = applied(r).await
            && leader != 0
            && index >= target
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(started.elapsed() < limit, "replica {} not serving after {limit:?}", r.node_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A counter of a replica's Prometheus endpoint, summed over `label`.
async fn counter(metrics: &str, name: &str, label: &str) -> u64 {
    let text = http_get(metrics, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Whether every bucket's (records, digest) at `a` equals `b`'s, both from their applied state.
async fn same_data(a: &str, b: &str) -> anyhow::Result<bool> {
    use nid_proto::v1::ChecksumBucketRequest;
    use nid_proto::v1::bucket_admin_client::BucketAdminClient;
    let sums = |address: String| async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .timeout(Duration::from_secs(120))
            .connect()
            .await?;
        let request = ChecksumBucketRequest {
            bucket: 0,
            local: true,
            buckets: (0..u32::from(nid_proto::bucket::BUCKETS)).collect(),
        };
        let response = BucketAdminClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .checksum_bucket(request)
            .await?;
        anyhow::Ok(response.into_inner().checksums)
    };
    Ok(sums(a.to_owned()).await? == sums(b.to_owned()).await?)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn point_row(p: &Point) -> String {
    let n = p.disk_bytes.len().max(1) as f64;
    let tables = p.disk_bytes.iter().map(|(t, _)| t).sum::<u64>() as f64 / n;
    let all = p.disk_bytes.iter().map(|(_, a)| a).sum::<u64>() as f64 / n;
    let rss: Vec<String> = p.rss.iter().map(|v| format!("{v:.0}")).collect();
    format!(
        "| {} | {:.0} | {:.2} / {:.2} | {} | {:.0} MiB ({:.0} B per identity) | {:.0} MiB | {} | {:.0} |",
        p.identities,
        p.auth["throughput"].as_f64().unwrap_or(0.0),
        p.auth["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        p.auth["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        p.auth["failed"].as_u64().unwrap_or(0),
        mib(tables as u64),
        tables / p.identities.max(1) as f64,
        mib(all as u64),
        rss.join(" / "),
        p.router_rss,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Options {
        identities: arg("--identities")?.unwrap_or(1_000_000),
        small: arg("--small")?.unwrap_or(10_000),
        chunks: arg::<u64>("--chunks")?.unwrap_or(10).max(1),
        seconds: arg("--seconds")?.unwrap_or(20),
        concurrency: arg("--concurrency")?.unwrap_or(64),
        results: arg::<PathBuf>("--results")?.unwrap_or_else(|| PathBuf::from(".nid/bench/scale")),
    };
    // The load generator sends wrong factors only to the last eighth of its people file, and the
    // failure lockout those people reach outlives the run: the small population goes last in the
    // large run's file, inside its last eighth, so nobody locked out is sent right factors.
    anyhow::ensure!(
        o.small > 0 && o.identities / 8 >= o.small,
        "--identities must be at least 8 times --small"
    );
    std::fs::create_dir_all(&o.results)?;
    let started = Instant::now();
    let mut cluster = DevCluster::start(1);
    let router = cluster.router();
    let key = std::fs::read_to_string(cluster.dir.path().join("secrets/dev-partner.apikey"))?;
    let key = key.trim().to_owned();
    let mut replicas = adopt_cell(&cluster, 0);

    println!("== {} identities", o.small);
    let all = o.results.join("people-all.jsonl");
    let first = o.results.join("people-0.jsonl");
    let mut fill = vec![(o.small, populate(&o, &router, o.small, 100, &first)?)];
    std::fs::File::create(&all)?;
    let small = measure(&o, &cluster, &replicas, &key, &first, o.small)?;

    println!("== filling to {} identities in {} chunks", o.identities, o.chunks);
    let rest = o.identities - o.small;
    let mut done = o.small;
    for c in 0..o.chunks {
        let count = rest / o.chunks + u64::from(c < rest % o.chunks);
        let out = o.results.join(format!("people-{}.jsonl", c + 1));
        let seconds = populate(&o, &router, count, 101 + c, &out)?;
        done += count;
        println!("  {done} identities: the last {count} at {:.0}/s", count as f64 / seconds);
        fill.push((count, seconds));
        let mut a = std::fs::OpenOptions::new().append(true).open(&all)?;
        std::io::copy(&mut std::fs::File::open(&out)?, &mut a)?;
        std::fs::remove_file(&out)?;
    }
    let mut a = std::fs::OpenOptions::new().append(true).open(&all)?;
    std::io::copy(&mut std::fs::File::open(&first)?, &mut a)?;
    println!("== {} identities", o.identities);
    let large = measure(&o, &cluster, &replicas, &key, &all, o.identities)?;

    println!("== a follower killed with SIGKILL and restarted on its data");
    let leader = leader_of(&replicas, Duration::from_secs(10)).await.context("the cell has no leader")?;
    let follower = (leader + 1) % replicas.len();
    let (target, _) = applied(&replicas[leader]).await.context("the leader's status")?;
    replicas[follower].kill9();
    replicas[follower].restart();
    let restart = until_serving(&replicas[follower], target, Duration::from_secs(300)).await?;
    println!("  serving after {restart:.1} s");

    // A replica that lost its data must not rejoin under its old node id: its peers remember a
    // log it no longer has (the engine stops such a replica). The replacement procedure (RUNBOOK):
    // the replica starts empty under a new node id, and `nidctl cell replace-replica` has the
    // leader add it as a learner, waits until it caught up (by snapshot), then removes the old id
    // and promotes the new one.
    println!("== a follower's data directory wiped and the replica replaced under a new node id");
    let leader = leader_of(&replicas, Duration::from_secs(10)).await.context("the cell has no leader")?;
    let wiped = (leader + 2) % replicas.len();
    let metrics =
        cluster.info["cells"][0]["replicas"][wiped]["metrics"].as_str().unwrap_or_default().to_owned();
    replicas[wiped].kill9();
    let dir = data_dir(&replicas[wiped])?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("wipe {}", dir.display()))?;
    let old_id = replicas[wiped].node_id;
    let new_id = replicas.iter().map(|r| r.node_id).max().unwrap_or(0) + 1;
    replicas[wiped] = replicas[wiped].as_new_member(new_id);
    replicas[wiped].restart();
    let leader_address = replicas[leader].address.clone();
    let catch_up = replace_replica(cluster.dir.path(), old_id, new_id)?;
    let snapshots = counter(&metrics, "nid_raft_snapshots_total", "op=\"applied\"").await;
    let mut identical = false;
    for _ in 0..20 {
        // With no load the two converge at once; a few tries cover a last heartbeat in flight.
        identical = same_data(&replicas[wiped].address, &leader_address).await.unwrap_or(false);
        if identical {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "  caught up after {catch_up:.1} s ({snapshots} snapshot(s) applied), same data as the leader: {identical}"
    );
    // The replacement leads, and the router still serves through it.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{leader_address}"))?.connect().await?;
    CellClient::new(channel)
        .transfer_leader(TransferLeaderRequest { to_node: new_id })
        .await
        .map_err(|e| anyhow::anyhow!("TransferLeader: {:?}: {}", e.code(), e.message()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&replicas[wiped]).await.map(|(_, l)| l) != Some(new_id) {
        anyhow::ensure!(Instant::now() < deadline, "the replacement never became leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = authenticate(&o, &router, &key, &all, "auth-after-replacement")?;
    let (wiped_tables, wiped_bytes) = disk_bytes(&dir);
    drop(replicas);
    cluster.stop();

    let mut s = String::new();
    let _ = writeln!(
        s,
        "One cell of three replicas behind the router (`make bench-scale`, {} s, {}).\n",
        started.elapsed().as_secs(),
        nid_tests::utc_now()
    );
    let _ = writeln!(
        s,
        "| identities | auth/s (closed, c={}) | p50 / p99 ms | failed | RocksDB tables per replica | whole data directory | RSS of the replicas, MiB | router RSS, MiB |\n|---:|---:|---|---:|---|---:|---|---:|",
        o.concurrency
    );
    let _ = writeln!(s, "{}\n{}", point_row(&small), point_row(&large));
    let ratio = large.auth["throughput"].as_f64().unwrap_or(0.0)
        / small.auth["throughput"].as_f64().unwrap_or(1.0).max(1.0);
    let _ = writeln!(
        s,
        "\nAuthentication at {} vs {} identities: {ratio:.2} (target >= 0.80).\n",
        o.identities, o.small
    );
    let _ = writeln!(s, "Enrolment over the fill (closed loop, c={}):\n", o.concurrency);
    let _ = writeln!(s, "| identities after | enrolled | enrolments/s |\n|---:|---:|---:|");
    let mut total = 0;
    for (count, seconds) in &fill {
        total += count;
        let _ = writeln!(s, "| {total} | {count} | {:.0} |", *count as f64 / seconds);
    }
    let fill_seconds: f64 = fill.iter().map(|(_, s)| s).sum();
    let _ =
        writeln!(s, "\nWhole fill: {total} in {fill_seconds:.0} s, {:.0}/s.\n", total as f64 / fill_seconds);
    let _ = writeln!(
        s,
        "- A follower killed with SIGKILL served again (answering, a leader known, applied up to the leader's index at the kill) after {restart:.1} s (no load meanwhile: this is opening the database and hearing from the leader)."
    );
    let _ = writeln!(
        s,
        "- A follower whose data directory was wiped, replaced under a new node id (started empty, added as a learner, promoted once caught up), caught up after {catch_up:.1} s (target <= 120 s), {snapshots} snapshot(s) applied, {:.0} MiB of tables ({:.0} MiB in all) on disk afterwards; every bucket's checksum equal to the leader's: {identical}.",
        mib(wiped_tables),
        mib(wiped_bytes)
    );
    let _ = writeln!(
        s,
        "- Led by the replacement, the router authenticated at {:.0}/s, p99 {:.2} ms, {} failed.",
        after["throughput"].as_f64().unwrap_or(0.0),
        after["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        after["failed"].as_u64().unwrap_or(0)
    );
    println!("\n{s}");
    std::fs::write(o.results.join("scale.md"), &s)?;
    Ok(())
}
