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
    assert_eq!(r["per_second_p99_ms"].as_array().unwrap().len(), 2);
    // Throughput counts what was answered inside the window; the rest is reported as late.
    assert_eq!(r["offered"], 200, "{r}");
    let in_window: u64 = r["per_second"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    // (Answers in the window to requests due in the warm-up count too.)
    assert!(in_window + r["late"].as_u64().unwrap() >= r["ok"].as_u64().unwrap(), "{r}");
    assert!((r["throughput"].as_f64().unwrap() - in_window as f64 / 2.0).abs() < 1e-9, "{r}");
    // The plot sits next to the report: lines for the offered rate, completions, p50 and p99.
    let svg = std::fs::read_to_string(report.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4, "{svg}");
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
    assert!(
        text.contains("enroll against nid (closed loop, load 8)") && text.contains(" 0 failed"),
        "{text}"
    );

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
    assert!(text.contains("auth against nid (closed loop, load 4)") && text.contains(" 0 failed"), "{text}");
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

    // A weighted mix: every part runs, the auth part with its yes/no accounting.
    let report = dir.path().join("mixed.json");
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &router, "--scenario", "mixed", "--mix", "auth=70,get=20,enroll=10"])
        .args(["--rate", "150", "--duration", "2", "--warmup", "0", "--wrong-percent", "20"])
        .args(["--api-key", key.trim()])
        .arg("--people")
        .arg(&people)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["scenario"], "mixed(auth=70,get=20,enroll=10)", "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    let (ok, yes, no) =
        (r["ok"].as_u64().unwrap(), r["auth_yes"].as_u64().unwrap(), r["auth_no"].as_u64().unwrap());
    // 300 requests, about 70% of them authentications: far from both 0 and all of them.
    assert!(yes + no > ok / 2 && yes + no < ok * 9 / 10 && no > 0, "{r}");
    let bad_mix = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &router, "--scenario", "mixed", "--mix", "auth=90,write=10"])
        .args(["--concurrency", "1", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!bad_mix.status.success());
    assert!(String::from_utf8_lossy(&bad_mix.stderr).contains("unknown scenario 'write'"));

    // The no-op path (router -> cell leader, no Raft, no disk) answers every echo.
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &router, "--scenario", "echo", "--concurrency", "8", "--duration", "1"])
        .args(["--warmup", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo against nid (closed loop, load 8)") && text.contains(" 0 failed"), "{text}");

    assert!(cluster.stop(), "nidctl dev up stops cleanly");
}

/// The comparison peer: the same enroll-shaped workload as puts against a real 3-member etcd. Every
/// acknowledged put is in etcd afterwards, under its own key.
#[test]
fn the_enroll_scenario_runs_as_puts_against_etcd() {
    let etcd = nid_tests::EtcdCluster::start(3).expect("start etcd (make deps installs etcd-server)");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("etcd.json");
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &etcd.target(), "--scenario", "enroll", "--concurrency", "8"])
        .args(["--duration", "1", "--warmup", "0", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["target"], "etcd", "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    let ok = r["ok"].as_u64().unwrap();
    assert!(ok > 0, "{r}");
    let etcdctl = nid_tests::etcd_binary().with_file_name("etcdctl");
    let listing = Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints.join(",")))
        .args(["get", "/nid-loadtest/", "--prefix", "--limit=1", "-w", "json"])
        .output()
        .unwrap();
    assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    // Puts acknowledged during the warm-up and measured window, plus any still in flight at the
    // end: at least the measured ones are there.
    assert!(listing["count"].as_u64().unwrap() >= ok, "{listing} vs {ok}");

    // Only the enroll scenario has an etcd equivalent.
    let out = Command::new(binary("nid-loadtest"))
        .args(["run", "--target", &etcd.target(), "--scenario", "get", "--concurrency", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only --scenario enroll"));
}
