//! Mutual TLS end to end: a `nidctl dev up` cluster with its dev CA (real processes), probed by
//! clients holding the certificates of each role, of another CA, expired, or none.

use nid_proto::v1::control_client::ControlClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::raft_transport_client::RaftTransportClient;
use nid_proto::v1::*;
use nid_support::tls::{Dial, Tls, TlsPaths};
use nid_tests::{DevCluster, binary, enroll_request, http_get};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};
use tonic::Code;

fn tls_dir(dev: &DevCluster) -> PathBuf {
    dev.dir.path().join("secrets").join("tls")
}

/// A dialer presenting `cert`/`key`, trusting the cluster CA (without checking the own
/// certificate, so that refusals can be shown).
fn dialer(ca_dir: &Path, cert_dir: &Path, name: &str) -> Dial {
    let paths = TlsPaths {
        ca: ca_dir.join("ca.pem"),
        cert: cert_dir.join(format!("{name}.pem")),
        key: cert_dir.join(format!("{name}.key")),
    };
    Dial::Tls(Tls::load_unverified(paths, &prometheus::Registry::new()).expect("load certificate"))
}

async fn channel(dial: &Dial, address: &str, server: &'static str) -> Option<tonic::transport::Channel> {
    let endpoint = Dial::endpoint(address)
        .ok()?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    dial.connect(endpoint, server).await.ok()
}

/// Looks up an unknown UIN on a new connection: NOT_FOUND means the call went through.
async fn lookup(dial: &Dial, router: &str) -> Result<(), tonic::Status> {
    let Some(ch) = channel(dial, router, "router").await else {
        return Err(tonic::Status::unavailable("no connection"));
    };
    lookup_over(ch).await
}

/// [`lookup`] over an open channel.
async fn lookup_over(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    match EnrollmentClient::new(ch).get_identity(GetIdentityRequest { id: "1".repeat(12) }).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code(), Code::NotFound | Code::InvalidArgument) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The sum of the samples of metric `name` whose labels include `label` (may be empty).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(address: &str) -> String {
    http_get(address, "/metrics").await.unwrap_or_default()
}

fn nidctl(dev: &DevCluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("nidctl"))
        .args(args)
        .arg("--dev-dir")
        .arg(dev.dir.path())
        .output()
        .expect("run nidctl");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

async fn wait_routing(dial: &Dial, router: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = lookup(dial, router).await {
        assert!(Instant::now() < deadline, "the router never answered over TLS: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `dev up` cluster with TLS, routing, and the dev enroller's dialer.
struct TlsCluster {
    dev: DevCluster,
    router: String,
    router_metrics: String,
    dir: PathBuf,
    enroller: Dial,
}

impl TlsCluster {
    async fn start() -> TlsCluster {
        let dev = DevCluster::start_tls(1);
        let router = dev.router();
        let router_metrics = dev.info["router"]["metrics"].as_str().unwrap().to_owned();
        let dir = tls_dir(&dev);
        let enroller = dialer(&dir, &dir, "enroller-dev");
        wait_routing(&enroller, &router).await;
        TlsCluster { dev, router, router_metrics, dir, enroller }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_a_valid_cluster_certificate_of_the_right_role_get_through() {
    let TlsCluster { dev, router, router_metrics, dir, enroller } = TlsCluster::start().await;

    // The enroller enrols; nidctl (as admin, from the dev directory) sees the cluster.
    let ch = channel(&enroller, &router, "router").await.expect("enroller connects");
    let enrolled = EnrollmentClient::new(ch.clone()).enroll(enroll_request("tls-rid-1", "Ada Tls")).await;
    let uin = enrolled.expect("the enroller enrols").into_inner().uin;
    // Every version names who made it: the enrolment centre, then another centre's update.
    nid_support::pki::issue(&dir, "enroller-centre-2", 1).unwrap();
    let centre2 = channel(&dialer(&dir, &dir, "enroller-centre-2"), &router, "router").await.unwrap();
    let update = UpdateIdentityRequest {
        uin: uin.clone(),
        expected_version: 1,
        demographics: enroll_request("x", "Ada Tls-Updated").demographics,
        ..Default::default()
    };
    EnrollmentClient::new(centre2).update_identity(update).await.expect("the second centre updates");
    let history = EnrollmentClient::new(ch)
        .get_history(GetHistoryRequest { uin: uin.clone(), from_version: 1, limit: 10 })
        .await
        .expect("history")
        .into_inner();
    let authors: Vec<(u64, &str)> =
        history.versions.iter().map(|v| (v.version, v.updated_by.as_str())).collect();
    assert_eq!(authors, vec![(1, "enroller-dev"), (2, "enroller-centre-2")], "each version names its author");
    let (ok, out) = nidctl(&dev, &["status"]);
    assert!(ok, "nidctl status over TLS: {out}");

    // A partner's certificate may not enrol; an enroller's may not authenticate.
    let partner = dialer(&dir, &dir, "partner-dev-partner");
    let refused = EnrollmentClient::new(channel(&partner, &router, "router").await.unwrap())
        .enroll(enroll_request("tls-rid-2", "Bo Tls"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = nid_proto::v1::authentication_client::AuthenticationClient::new(
        channel(&enroller, &router, "router").await.unwrap(),
    )
    .authenticate(AuthenticateRequest::default())
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // No certificate, another CA's, an expired one: refused in the handshake, and counted.
    let before = metric(&metrics(&router_metrics).await, "nid_tls_handshake_failures_total", "");
    assert!(lookup(&Dial::Plain, &router).await.is_err(), "a plaintext client is refused");
    let other = tempfile::tempdir().unwrap();
    nid_support::pki::ensure_ca(other.path(), "another CA").unwrap();
    nid_support::pki::issue(other.path(), "admin", 1).unwrap();
    assert!(
        lookup(&dialer(&dir, other.path(), "admin"), &router).await.is_err(),
        "another CA's certificate is refused"
    );
    let now = SystemTime::now();
    nid_support::pki::issue_between(
        &dir,
        "enroller-old",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        lookup(&dialer(&dir, &dir, "enroller-old"), &router).await.is_err(),
        "an expired certificate is refused"
    );
    let after = metric(&metrics(&router_metrics).await, "nid_tls_handshake_failures_total", "");
    assert!(after >= before + 3.0, "handshake failures counted: {before} -> {after}");
    // And the valid enroller still gets through.
    assert!(lookup(&enroller, &router).await.is_ok());

    // Internal services: a router's certificate may read the control cell but not write it
    // (unless it forwards the admin credential), and may not speak Raft.
    nid_support::pki::issue(&dir, "router-probe", 1).unwrap();
    let router_cert = dialer(&dir, &dir, "router-probe");
    let control = dev.info["control"]["replicas"][0]["address"].as_str().unwrap().to_owned();
    let mut c =
        ControlClient::new(channel(&router_cert, &control, "control").await.expect("router dials control"));
    let read = c.get_cluster_config(GetClusterConfigRequest {}).await;
    assert!(
        read.as_ref()
            .map_or_else(|e| !matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated), |_| true),
        "a router reads the control cell: {read:?}"
    );
    let write = c.set_rebalance(SetRebalanceRequest::default()).await.unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "a router's certificate alone cannot write: {write:?}");
    let token = std::fs::read_to_string(dev.dir.path().join("secrets").join("admin.token")).unwrap();
    let mut wrong = tonic::Request::new(SetRebalanceRequest::default());
    wrong.metadata_mut().insert("authorization", "Bearer 00".parse().unwrap());
    assert_eq!(c.set_rebalance(wrong).await.unwrap_err().code(), Code::PermissionDenied);
    let mut forwarded = tonic::Request::new(SetRebalanceRequest::default());
    forwarded.metadata_mut().insert("authorization", format!("Bearer {}", token.trim()).parse().unwrap());
    let forwarded = c.set_rebalance(forwarded).await;
    assert!(
        forwarded.as_ref().is_ok() || forwarded.as_ref().is_err_and(|e| e.code() != Code::PermissionDenied),
        "with the admin credential the router's write passes the gate: {forwarded:?}"
    );

    // A router's certificate may not change a cell's membership; an admin may not call
    // Cell.Execute directly (only routers, which name the caller from a verified certificate).
    let refused = nid_proto::v1::cell_client::CellClient::new(
        channel(&router_cert, &control, "control").await.unwrap(),
    )
    .transfer_leader(TransferLeaderRequest::default())
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let admin = dialer(&dir, &dir, "admin");
    let data_replica = dev.info["cells"][0]["replicas"][0]["address"].as_str().unwrap().to_owned();
    let refused =
        nid_proto::v1::cell_client::CellClient::new(channel(&admin, &data_replica, "cell").await.unwrap())
            .execute(CellRequest::default())
            .await
            .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "an admin cannot forge a routed call: {refused:?}");
    // A partner's certificate with another partner's API key is refused.
    nid_support::pki::issue(&dir, "partner-bank-z", 1).unwrap();
    let dev_key = std::fs::read_to_string(dev.dir.path().join("secrets").join("dev-partner.apikey")).unwrap();
    let mut request = tonic::Request::new(AuthenticateRequest::default());
    request.metadata_mut().insert("authorization", format!("Bearer {}", dev_key.trim()).parse().unwrap());
    let refused = nid_proto::v1::authentication_client::AuthenticationClient::new(
        channel(&dialer(&dir, &dir, "partner-bank-z"), &router, "router").await.unwrap(),
    )
    .authenticate(request)
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "another partner's key: {refused:?}");

    let cell = &dev.info["cells"][0];
    let replica = cell["replicas"][0]["address"].as_str().unwrap().to_owned();
    let replica_metrics = cell["replicas"][0]["metrics"].as_str().unwrap().to_owned();
    let node = cell["replicas"][0]["node_id"].as_u64().unwrap();
    let cell_id = cell["cell_id"].as_u64().unwrap();
    let heartbeat = |from: u64| {
        let mut m = raft::prelude::Message { from, to: node, ..Default::default() };
        m.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
        use protobuf::Message as _;
        RaftMessageBatch {
            cell_id,
            from_node: from,
            to_node: node,
            messages: vec![m.write_to_bytes().unwrap()],
        }
    };
    let send = |dial: Dial, batch: RaftMessageBatch| {
        let replica = replica.clone();
        async move {
            let Some(ch) = channel(&dial, &replica, "cell").await else {
                return Err(tonic::Status::unavailable("no connection"));
            };
            RaftTransportClient::new(ch).send_messages(tokio_stream::iter(vec![batch])).await.map(|_| ())
        }
    };
    let refused = send(router_cert.clone(), heartbeat(2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "a router may not speak Raft: {refused:?}");
    let other_cell = format!("cell-{}-2", cell_id + 100);
    nid_support::pki::issue(&dir, &other_cell, 1).unwrap();
    let refused = send(dialer(&dir, &dir, &other_cell), heartbeat(2)).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "another cell's replica may not speak Raft: {refused:?}"
    );
    // A member's certificate claiming another sender id is refused and counted.
    let peer = cell["replicas"][1]["node_id"].as_u64().unwrap();
    let liar = cell["replicas"][2]["node_id"].as_u64().unwrap();
    let before =
        metric(&metrics(&replica_metrics).await, "nid_raft_messages_rejected_total", "sender_mismatch");
    let member = dialer(&dir, &dir, &format!("cell-{cell_id}-{peer}"));
    let refused = send(member, heartbeat(liar)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("sender_mismatch"), "{refused:?}");
    let after =
        metric(&metrics(&replica_metrics).await, "nid_raft_messages_rejected_total", "sender_mismatch");
    assert_eq!(after, before + 1.0, "the forged sender is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_used_without_dropping_traffic() {
    let TlsCluster { dev, router, router_metrics, dir, enroller } = TlsCluster::start().await;
    let expiry = |text: &str| metric(text, "nid_tls_certificate_expiry_timestamp_seconds", "");
    let first = expiry(&metrics(&router_metrics).await);
    assert!(first > 0.0);

    // Traffic on one connection and on fresh ones throughout the replacement.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, enroller, router) = (stop.clone(), enroller.clone(), router.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut calls = 0;
            let held = channel(&enroller, &router, "router").await.expect("connect");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = lookup_over(held.clone()).await {
                    failures.push(format!("held: {e:?}"));
                }
                if let Err(e) = lookup(&enroller, &router).await {
                    failures.push(format!("fresh: {e:?}"));
                }
                calls += 2;
            }
            (calls, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The router's certificate and every replica's, reissued for longer.
    let mut names = vec!["router".to_owned()];
    for cell in std::iter::once(&dev.info["control"]).chain(dev.info["cells"].as_array().unwrap()) {
        for r in cell["replicas"].as_array().unwrap() {
            let id = cell["cell_id"].as_u64().unwrap();
            let node = r["node_id"].as_u64().unwrap();
            names.push(if id == 0 { format!("control-{node}") } else { format!("cell-{id}-{node}") });
        }
    }
    for name in &names {
        nid_support::pki::issue(&dir, name, 400).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = expiry(&metrics(&router_metrics).await);
        if now > first + 20.0 * 86_400.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router never picked the new certificate up ({first} -> {now})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (calls, failures) = traffic.await.unwrap();
    assert!(calls > 10, "traffic ran ({calls} calls)");
    assert!(failures.is_empty(), "no call failed across the replacement: {failures:?}");
    let text = metrics(&router_metrics).await;
    assert!(metric(&text, "nid_tls_reloads_total", "\"ok\"") >= 1.0);
    // The cluster still writes (the replicas reloaded too and still talk to each other).
    let ch = channel(&enroller, &router, "router").await.unwrap();
    let enrolled = EnrollmentClient::new(ch).enroll(enroll_request("tls-reload-rid", "Cy Tls")).await;
    assert!(enrolled.is_ok(), "{enrolled:?}");
}
