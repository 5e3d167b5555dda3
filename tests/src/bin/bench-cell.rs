//! `make bench-cell`: write throughput and latency of one 3-replica cell of real `nid-cell`
//! processes on this machine, at several client concurrencies, next to the disk's measured
//! fdatasync latency. Prints figures; asserts nothing (machines here are shared and noisy).
//!
//! Usage: bench-cell [--seconds N] [--concurrency 1,16,64,256]

use nid_proto::v1::bucket_admin_client::BucketAdminClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::{BucketState, CellRequest, GetCellStatusRequest, SetBucketStateRequest};
use nid_tests::{ProcessCell, closed_loop, enroll_request, fdatasync_latency, http_get, percentile_ms};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let seconds: u64 = arg("--seconds").map(|s| s.parse()).transpose()?.unwrap_or(10);
    let levels: Vec<usize> = arg("--concurrency")
        .unwrap_or_else(|| "1,16,64,256".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;

    let cell = ProcessCell::start(3, &[]);
    let (p50, p99) = fdatasync_latency(cell.nodes[0].data_dir.parent().expect("root"));
    println!(
        "disk: fdatasync of 4 KiB p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    // Find the leader and give the cell every bucket.
    let leader = loop {
        let mut found = None;
        for n in &cell.nodes {
            let mut c = n.client(Duration::from_secs(30)).await;
            if let Ok(s) = c.get_cell_status(GetCellStatusRequest {}).await
                && let Some(r) = s.into_inner().replicas.iter().find(|r| r.is_leader)
            {
                found = Some(r.node_id);
            }
        }
        if let Some(l) = found {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node = &cell.nodes[(leader - 1) as usize];
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))?.connect().await?;
    BucketAdminClient::new(channel.clone())
        .set_bucket_state(SetBucketStateRequest {
            buckets: (0..16384).collect(),
            state: BucketState::Owned as i32,
            table_version: 1,
            track_changes: false,
        })
        .await?;

    println!("3 replicas (3 processes, one machine), Enroll through the leader, {seconds} s per level");
    println!(
        "{:>11} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "concurrency", "writes/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for (run, &c) in levels.iter().enumerate() {
        let client = nid_proto::v1::cell_client::CellClient::new(channel.clone());
        let m = closed_loop(c, Duration::from_secs(seconds), move |w, k| {
            let mut client = client.clone();
            async move {
                let request = CellRequest {
                    route: None,
                    operation: Some(Operation::Enroll(enroll_request(
                        &format!("BENCH-{run}-{w}-{k}"),
                        "Bench Person",
                    ))),
                };
                client.execute(request).await.is_ok()
            }
        })
        .await;
        println!(
            "{:>11} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            c,
            m.rate,
            percentile_ms(&m.latencies_us, 0.50),
            percentile_ms(&m.latencies_us, 0.99),
            percentile_ms(&m.latencies_us, 1.0),
            m.errors
        );
    }
    // Group commit at work: client commands per log entry and entries per fsync, from the leader.
    let metrics = http_get(&node.metrics_addr, "/metrics").await.unwrap_or_default();
    for line in metrics.lines() {
        if line.starts_with("nid_raft_batch_commands_sum")
            || line.starts_with("nid_raft_batch_commands_count")
            || line.starts_with("nid_raft_fsync_duration_seconds_count")
            || line.starts_with("nid_raft_fsync_duration_seconds_sum")
        {
            println!("leader {line}");
        }
    }
    Ok(())
}
