//! `nidctl dev up` end to end: a control cell, two data cells and a router as real processes.
//! Enrolments through the router spread over both cells and stay readable; the router survives a
//! SIGKILL and restart; with every control-cell replica dead the router keeps serving from its
//! cached table; SIGTERM to nidctl stops every process.

use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{Demographics, EnrollRequest, GetIdentityRequest};
use nid_tests::binary;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn request(rid: &str) -> EnrollRequest {
    EnrollRequest {
        rid: rid.into(),
        demographics: Some(Demographics {
            full_name: "Dev Cluster".into(),
            date_of_birth: "1999-09-09".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn client(address: &str) -> EnrollmentClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .timeout(Duration::from_secs(15))
            .connect()
            .await
        {
            return EnrollmentClient::new(ch);
        }
        assert!(Instant::now() < deadline, "router {address} unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Enrols, retrying transport errors (a restarting router) for a while.
async fn enroll(address: &str, rid: &str) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = client(address).await;
        match c.enroll(request(rid)).await {
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
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(binary("nidctl"))
        .args(["dev", "up", "--cells", "2", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = dir.path().join("cluster.json");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !file.exists() {
        assert!(Instant::now() < deadline, "cluster.json never appeared");
        assert!(up.try_wait().unwrap().is_none(), "nidctl dev up exited early");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cluster: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
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

    // SIGKILL the router and start another on the same address: clients reconnect.
    let router_pid = cluster["router"]["pid"].as_u64().unwrap();
    kill9(router_pid);
    let control: Vec<String> = cluster["control"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    let mut new_router = Command::new(binary("nid-router"))
        .args(["--listen", &router, "--control", &control.join(","), "--insecure"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (uin, _) = enroll(&router, "DEV-AFTER-ROUTER-RESTART").await;
    let mut c = client(&router).await;
    assert!(c.get_identity(GetIdentityRequest { id: uin }).await.is_ok());
    assert_eq!(enroll(&router, "DEV-0").await.0, enrolled["DEV-0"], "no data difference after the restart");

    // Every control-cell replica dies: the router keeps serving from its cached table.
    for r in cluster["control"]["replicas"].as_array().unwrap() {
        kill9(r["pid"].as_u64().unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (uin, _) = enroll(&router, "DEV-NO-CONTROL").await;
    let mut c = client(&router).await;
    assert!(c.get_identity(GetIdentityRequest { id: uin }).await.is_ok());
    assert!(c.get_identity(GetIdentityRequest { id: enrolled["DEV-7"].clone() }).await.is_ok());

    let _ = new_router.kill();
    let _ = new_router.wait();
    // SIGTERM to nidctl stops every process it started.
    let _ = Command::new("kill").arg("-TERM").arg(up.id().to_string()).status();
    let status = up.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for cell in cluster["cells"].as_array().unwrap() {
        for r in cell["replicas"].as_array().unwrap() {
            let pid = r["pid"].as_u64().unwrap();
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "replica {pid} still running");
        }
    }
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
