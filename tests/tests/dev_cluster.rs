//! `nidctl dev up` end to end: a control cell, two data cells and a router as real processes.
//! Enrolments through the router spread over both cells and stay readable; the router survives a
//! SIGKILL and restart; with every control-cell replica dead the router keeps serving (enrol, read,
//! authenticate) from its cached table and partner list; SIGTERM to nidctl stops every process.

use nid_proto::bucket::{KeyDomain, bucket_of_key};
use nid_proto::v1::authentication_client::AuthenticationClient;
use nid_proto::v1::bucket_admin_client::BucketAdminClient;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::control_client::ControlClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{
    AuthFactors, AuthenticateRequest, BucketState, CommitBucketMoveRequest, DemographicFactor,
    GetCellStatusRequest, GetIdentityRequest, GetRoutingTableRequest, SetBucketStateRequest,
    SetRebalanceRequest,
};
use nid_tests::{DevCluster, binary, enroll_request, http_get};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

async fn client(address: &str) -> EnrollmentClient<tonic::transport::Channel> {
    EnrollmentClient::new(nid_tests::connect(address).await)
}

/// Enrols, retrying transport errors (a restarting router) for a while.
async fn enroll(address: &str, rid: &str) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = client(address).await;
        match c.enroll(enroll_request(rid, "Dev Cluster")).await {
            Ok(r) => {
                let r = r.into_inner();
                return (r.uin, r.served_by.map(|s| s.cell_id).unwrap_or(0));
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "enrol {rid} kept failing: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn kill9(pid: u64) {
    let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_cluster_routes_balances_and_survives_router_and_control_loss() {
    let mut dev = DevCluster::start(2);
    let cluster = dev.info.clone();
    let router = cluster["router"]["address"].as_str().unwrap().to_owned();

    // 1000 enrolments through the router, 16 at a time.
    let mut enrolled: HashMap<String, String> = HashMap::new();
    let mut per_cell: HashMap<u64, usize> = HashMap::new();
    for start in (0..1000).step_by(16) {
        let results = futures_join((start..(start + 16).min(1000)).map(|i| {
            let router = router.clone();
            async move {
                let rid = format!("DEV-{i}");
                let (uin, cell) = enroll(&router, &rid).await;
                (rid, uin, cell)
            }
        }))
        .await;
        for (rid, uin, cell) in results {
            *per_cell.entry(cell).or_default() += 1;
            enrolled.insert(rid, uin);
        }
    }
    assert_eq!(per_cell.len(), 2, "{per_cell:?}");
    for (cell, n) in &per_cell {
        assert!((400..=600).contains(n), "cell {cell} holds {n} of 1000");
    }
    let mut c = client(&router).await;
    for uin in enrolled.values() {
        let r = c
            .get_identity(GetIdentityRequest { id: uin.clone() })
            .await
            .expect("readable through the router");
        assert_eq!(&r.into_inner().identity.unwrap().uin, uin);
    }

    // nidctl status: both cells, three replicas each in three zones, one leader, all buckets owned.
    let out = Command::new(binary("nidctl"))
        .args(["status", "-o", "json", "--dev-dir"])
        .arg(dev.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cells = status["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    let owned: u64 = cells.iter().map(|c| c["buckets_owned"].as_u64().unwrap()).sum();
    assert_eq!(owned, 16384);
    for c in cells {
        let replicas = c["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 3);
        assert_eq!(replicas.iter().filter(|r| r["leader"] == true).count(), 1, "{c}");
        assert!(replicas.iter().all(|r| r["healthy"] == true));
        let zones: std::collections::HashSet<&str> =
            replicas.iter().map(|r| r["zone"].as_str().unwrap()).collect();
        assert_eq!(zones.len(), 3);
    }

    // SIGKILL the router and start another on the same address: clients reconnect.
    let router_pid = cluster["router"]["pid"].as_u64().unwrap();
    kill9(router_pid);
    let control: Vec<String> = cluster["control"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    let router_metrics = format!("127.0.0.1:{}", nid_tests::free_port());
    // A refresh period of an hour: this router's table goes stale on purpose below.
    let mut new_router = Command::new(binary("nid-router"))
        .args([
            "--listen",
            &router,
            "--control",
            &control.join(","),
            "--insecure",
            "--refresh-ms",
            "3600000",
            "--no-watch",
        ])
        .args(["--metrics-listen", &router_metrics])
        .arg("--partner-key-file")
        .arg(dev.dir.path().join("secrets/partner.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (uin, _) = enroll(&router, "DEV-AFTER-ROUTER-RESTART").await;
    let mut c = client(&router).await;
    assert!(c.get_identity(GetIdentityRequest { id: uin }).await.is_ok());
    assert_eq!(enroll(&router, "DEV-0").await.0, enrolled["DEV-0"], "no data difference after the restart");

    // SIGKILL the leader of data cell 1: the router finds the new leader; nothing acknowledged is lost.
    let cell1 = &cluster["cells"][0];
    let leader = cell_leader(cell1).await;
    kill9(leader);
    for i in 0..30 {
        enroll(&router, &format!("DEV-AFTER-LEADER-KILL-{i}")).await;
    }
    let mut c = client(&router).await;
    for uin in enrolled.values().take(200) {
        assert!(
            c.get_identity(GetIdentityRequest { id: uin.clone() }).await.is_ok(),
            "acknowledged write lost"
        );
    }

    // A bucket moves while this router's table is stale: the old owner refuses with wrong-owner and
    // the router refreshes and re-routes. The move is made by hand here, so the rebalancer (which
    // would move the bucket back to its place) is paused first.
    control_call(&control, |mut c| async move {
        c.set_rebalance(SetRebalanceRequest { paused: Some(true), ..Default::default() }).await
    })
    .await;
    let used: std::collections::HashSet<u16> =
        enrolled.keys().map(|rid| bucket_of_key(KeyDomain::Rid, rid.as_bytes()).get()).collect();
    let rid = (0..)
        .map(|i| format!("MOVE-{i}"))
        .find(|r| !used.contains(&bucket_of_key(KeyDomain::Rid, r.as_bytes()).get()))
        .unwrap();
    let bucket = bucket_of_key(KeyDomain::Rid, rid.as_bytes()).get();
    let table =
        control_call(&control, |mut c| async move { c.get_routing_table(GetRoutingTableRequest {}).await })
            .await;
    let from = table.owner[usize::from(bucket)];
    let to = if from == 1 { 2 } else { 1 };
    let cells: Vec<&serde_json::Value> = cluster["cells"].as_array().unwrap().iter().collect();
    let cell_of = |id: u64| *cells.iter().find(|c| c["cell_id"].as_u64() == Some(id)).unwrap();
    set_bucket(cell_of(from), bucket, BucketState::NotOwned, table.version + 1).await;
    set_bucket(cell_of(to), bucket, BucketState::Owned, table.version + 1).await;
    let expected_epoch = table.epoch[usize::from(bucket)];
    let moved = control_call(&control, |mut c| async move {
        c.commit_bucket_move(CommitBucketMoveRequest {
            bucket: u32::from(bucket),
            from_cell: from,
            to_cell: to,
            expected_epoch,
        })
        .await
    })
    .await;
    assert_eq!(moved.table_version, table.version + 1, "routing-table versions only grow");
    let (_, served_by) = enroll(&router, &rid).await;
    assert_eq!(served_by, to, "re-routed to the new owner");
    let metrics = http_get(&router_metrics, "/metrics").await.expect("router metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("nid_router_retries_total{reason=\"wrong_owner\"}")),
        "the stale route was refused and retried:\n{metrics}"
    );

    // A watching router (with a one-hour poll period) learns of the next move through the watch.
    let watch_addr = format!("127.0.0.1:{}", nid_tests::free_port());
    let watch_metrics = format!("127.0.0.1:{}", nid_tests::free_port());
    let mut watcher = Command::new(binary("nid-router"))
        .args([
            "--listen",
            &watch_addr,
            "--control",
            &control.join(","),
            "--insecure",
            "--refresh-ms",
            "3600000",
        ])
        .args(["--metrics-listen", &watch_metrics])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let version_of = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("nid_router_table_version "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while version_of(&http_get_retry(&watch_metrics).await) != moved.table_version {
        assert!(Instant::now() < deadline, "the watching router never loaded the table");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = control_call(&control, |mut c| async move {
        c.commit_bucket_move(CommitBucketMoveRequest {
            bucket: u32::from(bucket),
            from_cell: to,
            to_cell: from,
            expected_epoch: expected_epoch + 1,
        })
        .await
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while version_of(&http_get_retry(&watch_metrics).await) != back.table_version {
        assert!(Instant::now() < deadline, "the watch never delivered version {}", back.table_version);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    // A stale epoch loses the compare-and-swap.
    let stale = {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", control[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let req = CommitBucketMoveRequest {
            bucket: u32::from(bucket),
            from_cell: from,
            to_cell: to,
            expected_epoch,
        };
        let mut results = vec![ControlClient::new(ch).commit_bucket_move(req).await.map(|_| ())];
        for address in &control[1..] {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            results.push(ControlClient::new(ch).commit_bucket_move(req).await.map(|_| ()));
        }
        results
    };
    assert!(stale.iter().all(|r| r.is_err()), "a move with a stale epoch must be refused");
    assert!(stale.iter().any(|r| matches!(r, Err(e) if e.code() == tonic::Code::Aborted)), "{stale:?}");

    // Every control-cell replica dies: the router keeps serving from its cached table.
    for r in cluster["control"]["replicas"].as_array().unwrap() {
        kill9(r["pid"].as_u64().unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (uin, _) = enroll(&router, "DEV-NO-CONTROL").await;
    let mut c = client(&router).await;
    assert!(c.get_identity(GetIdentityRequest { id: uin }).await.is_ok());
    assert!(c.get_identity(GetIdentityRequest { id: enrolled["DEV-7"].clone() }).await.is_ok());
    // Authentication too: the router checks partner keys against its cached partner list.
    let key = std::fs::read_to_string(dev.dir.path().join("secrets/dev-partner.apikey")).unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{router}")).unwrap().connect().await.unwrap();
    let mut auth = AuthenticationClient::new(channel);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut request = tonic::Request::new(AuthenticateRequest {
        id: enrolled["DEV-7"].clone(),
        transaction_id: "NO-CONTROL-1".into(),
        request_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
        factors: Some(AuthFactors {
            demographic: Some(DemographicFactor { full_name: "Dev Cluster".into(), ..Default::default() }),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert("authorization", format!("Bearer {}", key.trim()).parse().unwrap());
    let decision = auth.authenticate(request).await.expect("auth without the control cell").into_inner();
    assert!(decision.decision.unwrap().authenticated);

    let _ = new_router.kill();
    let _ = new_router.wait();
    // SIGTERM to nidctl stops every process it started.
    assert!(dev.stop(), "nidctl dev up stops cleanly");
    for cell in cluster["cells"].as_array().unwrap() {
        for r in cell["replicas"].as_array().unwrap() {
            let pid = r["pid"].as_u64().unwrap();
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "replica {pid} still running");
        }
    }
}

async fn cell_leader(cell: &serde_json::Value) -> u64 {
    for r in cell["replicas"].as_array().unwrap() {
        let address = r["address"].as_str().unwrap();
        if let Ok(ch) =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await
            && let Ok(s) = CellClient::new(ch).get_cell_status(GetCellStatusRequest {}).await
            && let Some(l) = s.into_inner().replicas.iter().find(|x| x.is_leader)
        {
            let replica = cell["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["node_id"].as_u64() == Some(l.node_id));
            return replica.unwrap()["pid"].as_u64().unwrap();
        }
    }
    panic!("no leader in cell {}", cell["cell_id"]);
}

/// Runs a control-cell call on whichever replica leads.
async fn control_call<T, F, Fut>(control: &[String], f: F) -> T
where
    F: Fn(ControlClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for address in control {
            if let Ok(ch) =
                tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await
                && let Ok(r) = f(ControlClient::new(ch).max_decoding_message_size(16 << 20)).await
            {
                return r.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "control cell unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set_bucket(cell: &serde_json::Value, bucket: u16, state: BucketState, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for r in cell["replicas"].as_array().unwrap() {
            let address = r["address"].as_str().unwrap();
            if let Ok(ch) =
                tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await
            {
                let req = SetBucketStateRequest {
                    buckets: vec![u32::from(bucket)],
                    state: state as i32,
                    table_version: version,
                    track_changes: false,
                };
                if BucketAdminClient::new(ch).set_bucket_state(req).await.is_ok() {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "could not set bucket state");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metrics text, waiting for the endpoint to come up.
async fn http_get_retry(address: &str) -> String {
    for _ in 0..50 {
        if let Some(text) = http_get(address, "/metrics").await {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("metrics endpoint {address} never came up");
}

async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
