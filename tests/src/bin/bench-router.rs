//! `make bench-router`: what the router adds. The same linearizable read (GetIdentity) through the
//! router and straight to the owning cell's leader, p50/p99 at concurrency 1 and 16, plus the
//! router's CPU per request (from /proc); then the same for the no-op echo (no Raft, no disk), which
//! isolates the cost of the extra gRPC hop itself. Prints figures; asserts nothing.
//!
//! Usage: bench-router [--seconds N]

use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::diagnostics_client::DiagnosticsClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{CellRequest, EchoRequest, GetIdentityRequest};
use nid_tests::{DevCluster, closed_loop, enroll_request, percentile_ms};
use std::sync::Arc;
use std::time::Duration;

fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

#[derive(Clone)]
enum Target {
    Router(EnrollmentClient<tonic::transport::Channel>),
    Cell(CellClient<tonic::transport::Channel>),
    RouterEcho(DiagnosticsClient<tonic::transport::Channel>),
    CellEcho(CellClient<tonic::transport::Channel>),
}

/// An echo payload the size of an enrolment request.
const ECHO_BYTES: usize = 220;

async fn read(target: &mut Target, uin: &str) -> bool {
    match target {
        Target::Router(c) => c.get_identity(GetIdentityRequest { id: uin.to_owned() }).await.is_ok(),
        Target::Cell(c) => c
            .execute(CellRequest {
                route: None,
                operation: Some(Operation::GetIdentity(GetIdentityRequest { id: uin.to_owned() })),
            })
            .await
            .is_ok(),
        Target::RouterEcho(c) => {
            c.echo(EchoRequest { payload: vec![7; ECHO_BYTES], bucket: uin.len() as u32 }).await.is_ok()
        }
        Target::CellEcho(c) => c.echo(EchoRequest { payload: vec![7; ECHO_BYTES], bucket: 0 }).await.is_ok(),
    }
}

/// Runs `concurrency` closed-loop readers for `seconds`; returns (reads/s, sorted latencies in us).
async fn run(target: Target, uins: Arc<Vec<String>>, concurrency: usize, seconds: u64) -> (f64, Vec<u64>) {
    let m = closed_loop(concurrency, Duration::from_secs(seconds), move |w, k| {
        let (mut target, uins) = (target.clone(), uins.clone());
        async move {
            let i = (w as u64 + k * concurrency as u64) as usize % uins.len();
            read(&mut target, &uins[i]).await
        }
    })
    .await;
    (m.rate, m.latencies_us)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let mut dev = DevCluster::start(1);
    let cluster = dev.info.clone();
    let router_addr = cluster["router"]["address"].as_str().unwrap_or_default().to_owned();
    let router_pid = cluster["router"]["pid"].as_u64().unwrap_or(0);
    let connect = |a: String| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{a}"))?.tcp_nodelay(true).connect().await
    };
    let router_channel = connect(router_addr).await?;
    let mut router = EnrollmentClient::new(router_channel.clone());
    let mut uins = Vec::new();
    for i in 0..200 {
        let r = router.enroll(enroll_request(&format!("BENCH-ROUTER-{i}"), "Bench")).await?;
        uins.push(r.into_inner().uin);
    }
    // The leader of the one data cell, from its status.
    let mut leader = None;
    for r in cluster["cells"][0]["replicas"].as_array().cloned().unwrap_or_default() {
        let addr = r["address"].as_str().unwrap_or_default().to_owned();
        let mut c = CellClient::new(connect(addr.clone()).await?);
        let s = c.get_cell_status(nid_proto::v1::GetCellStatusRequest {}).await?.into_inner();
        if s.replicas.iter().any(|x| x.is_leader && Some(x.node_id) == r["node_id"].as_u64()) {
            leader = Some(addr);
        }
    }
    let leader = leader.ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let cell = CellClient::new(connect(leader).await?);
    let uins = Arc::new(uins);
    println!(
        "read = GetIdentity (ReadIndex), echo = Echo of {ECHO_BYTES} bytes (no Raft, no disk); 1 data cell of 3 \
         replicas on one machine, {seconds} s per row"
    );
    println!(
        "{:<14} {:>11} {:>10} {:>9} {:>9} {:>16}",
        "path", "concurrency", "requests/s", "p50 ms", "p99 ms", "router CPU us/req"
    );
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let echo_router = DiagnosticsClient::new(router_channel);
    let rows = [
        ("read", Target::Cell(cell.clone()), Target::Router(router.clone())),
        ("echo", Target::CellEcho(cell.clone()), Target::RouterEcho(echo_router)),
    ];
    for (what, direct_target, routed_target) in rows {
        for concurrency in [1usize, 16] {
            let (direct_rate, direct) = run(direct_target.clone(), uins.clone(), concurrency, seconds).await;
            let before = cpu_ticks(router_pid);
            let (routed_rate, routed) = run(routed_target.clone(), uins.clone(), concurrency, seconds).await;
            let cpu = (cpu_ticks(router_pid) - before) as f64 / ticks_per_sec;
            let per_req = cpu * 1e6 / (routed.len().max(1) as f64);
            println!(
                "{:<14} {:>11} {:>10.0} {:>9.3} {:>9.3} {:>16}",
                format!("{what} direct"),
                concurrency,
                direct_rate,
                percentile_ms(&direct, 0.5),
                percentile_ms(&direct, 0.99),
                "-"
            );
            println!(
                "{:<14} {:>11} {:>10.0} {:>9.3} {:>9.3} {:>16.0}",
                format!("{what} router"),
                concurrency,
                routed_rate,
                percentile_ms(&routed, 0.5),
                percentile_ms(&routed, 0.99),
                per_req
            );
            println!(
                "               added p50 at concurrency {concurrency}: {:.0} us",
                (percentile_ms(&routed, 0.5) - percentile_ms(&direct, 0.5)) * 1000.0
            );
        }
    }
    dev.stop();
    Ok(())
}
