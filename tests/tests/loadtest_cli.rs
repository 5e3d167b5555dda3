//! `nid-loadtest` against a real one-cell dev cluster: populate, then an open-loop read run whose
//! JSON report accounts for every scheduled request, a closed-loop enrolment run, and a closed-loop
//! authentication run as the dev partner.

use nid_tests::{DevCluster, binary};
use std::process::Command;

#[test]
fn populate_then_open_and_closed_loop_runs_report_honestly() {
    let mut cluster = DevCluster::start(1);
    let router = cluster.router();
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.jsonl");
    let out = Command::new(binary("nid-loadtest"))
        .args(["populate", "--target", &router, "--count", "60", "--seed", "9", "--out"])
        .arg(&people)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = std::fs::read_to_string(&people).unwrap();
    assert_eq!(lines.lines().count(), 60);
    assert!(lines.lines().all(|l| l.contains("\"uin\":\"") && !l.contains("\"uin\":\"\"")));

    let report = dir.path().join("get.json");
    let out = Command::new(binary("nid-loadtest"))
        .args([
            "run",
            "--target",
            &router,
            "--scenario",
            "get",
            "--rate",
            "200",
            "--duration",
            "2",
            "--warmup",
            "1",
        ])
        .arg("--people")
        .arg(&people)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Open loop: exactly rate x duration requests are scheduled in the measured window.
    let accounted =
        r["ok"].as_u64().unwrap() + r["failed"].as_u64().unwrap() + r["dropped"].as_u64().unwrap();
    assert_eq!(accounted, 400, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["per_second"].as_array().unwrap().len(), 2);
    let p50 = r["latency_ms"]["p50"].as_f64().unwrap();
    let p99 = r["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50);

    let out = Command::new(binary("nid-loadtest"))
        .args([
            "run",
            "--target",
            &router,
            "--scenario",
            "enroll",
            "--concurrency",
            "8",
            "--duration",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("enroll (closed loop, load 8)") && text.contains(" 0 failed"), "{text}");

    // Authentication as the dev partner: right factors must get a yes and the quarter sent with a
    // wrong date of birth a no; any other answer counts as failed.
    let key = std::fs::read_to_string(cluster.dir.path().join("secrets/dev-partner.apikey")).unwrap();
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &router, "--scenario", "auth", "--concurrency", "4", "--duration", "1"])
        .args(["--warmup", "0", "--wrong-percent", "25", "--api-key", key.trim()])
        .arg("--people")
        .arg(&people)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("auth (closed loop, load 4)") && text.contains(" 0 failed"), "{text}");
    let counts = text.lines().find(|l| l.starts_with("auth: ")).expect("yes/no counts");
    let numbers: Vec<u64> =
        counts.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
    assert!(numbers.len() == 2 && numbers[0] > numbers[1] && numbers[1] > 0, "{counts}");
    let without_key = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &router, "--scenario", "auth", "--concurrency", "1", "--duration", "1"])
        .env_remove("NID_API_KEY")
        .arg("--people")
        .arg(&people)
        .output()
        .unwrap();
    assert!(!without_key.status.success(), "the auth scenario needs a key");

    assert!(cluster.stop(), "nidctl dev up stops cleanly");
}
