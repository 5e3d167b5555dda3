//! A router at its limit of requests in flight sheds the rest at once with RESOURCE_EXHAUSTED /
//! OVERLOADED and a retry delay (bounded queues, bounded memory), and a shed request applies
//! nothing: the same request sent again later creates the identity.

use nid_proto::error::{reason_of, retry_delay};
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_tests::{DevCluster, binary, enroll_request, free_port};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_at_its_in_flight_limit_sheds_with_a_retry_hint_and_applies_nothing() {
    let cluster = DevCluster::start(1);
    let control: Vec<String> = cluster.info["control"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    let address = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut small = Command::new(binary("nid-router"))
        .args(["--listen", &address, "--control", &control.join(","), "--insecure", "--max-in-flight", "2"])
        .args(["--metrics-listen", &metrics])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // It serves once it has the table.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = EnrollmentClient::new(nid_tests::connect(&address).await);
        if c.enroll(enroll_request("RID-SHED-WARM", "Shed Person")).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the small router never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 64 enrolments at once through a router that forwards 2 at a time.
    let channel = nid_tests::connect(&address).await;
    let calls = (0..64).map(|i| {
        let mut c = EnrollmentClient::new(channel.clone());
        async move { (i, c.enroll(enroll_request(&format!("RID-SHED-{i}"), "Shed Person")).await) }
    });
    let mut shed = Vec::new();
    let mut created = 0;
    for handle in calls.map(tokio::spawn).collect::<Vec<_>>() {
        let (i, result) = handle.await.unwrap();
        match result {
            Ok(r) => {
                assert!(r.into_inner().created);
                created += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason_of(&e).as_deref(), Some("OVERLOADED"));
                assert!(retry_delay(&e).is_some_and(|d| d > Duration::ZERO), "a retry hint: {e:?}");
                shed.push(i);
            }
        }
    }
    assert!(!shed.is_empty() && created >= 2, "{created} created, {} shed", shed.len());
    let text = nid_tests::http_get(&metrics, "/metrics").await.unwrap_or_default();
    let counted = text
        .lines()
        .find_map(|l| l.strip_prefix("nid_router_shed_total "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    assert_eq!(counted, Some(shed.len()), "shed requests are counted");
    // A shed enrolment never applied: sent again through the cluster's router, it creates.
    let mut c = EnrollmentClient::new(nid_tests::connect(&cluster.router()).await);
    for i in shed {
        let r = c.enroll(enroll_request(&format!("RID-SHED-{i}"), "Shed Person")).await.unwrap().into_inner();
        assert!(r.created, "a shed request applied nothing");
    }
    let _ = small.kill();
    let _ = small.wait();
}
