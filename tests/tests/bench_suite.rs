//! `make bench` end to end in miniature: the suite starts its own cluster, runs the ceiling,
//! enrolment and authentication rows through `nid-loadtest`, and writes the table, the targets and
//! the per-process CPU breakdown to its output file, keeping hand-written text below the markers.
//! (etcd, the cgroup scale-out and perf are left to `make bench`: they need root and minutes; the
//! rebalance section runs with 2,000 identities instead of 200,000, and the overload section, which
//! needs root for its cgroup, with a 2-second overload.)

use nid_tests::binary;
use std::process::Command;

#[test]
fn the_suite_writes_its_table_and_keeps_hand_written_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("BENCHMARKS.md");
    std::fs::write(
        &out,
        "<!-- bench-suite: generated from here -->\nold\n<!-- bench-suite: generated up to here; text below is kept -->\n## By hand\nkept\n",
    )
    .unwrap();
    let run = Command::new(binary("bench-suite"))
        .args(["--seconds", "1", "--populate", "200", "--concurrency", "8", "--rebalance-identities", "2000"])
        .args(["--overload-seconds", "2"])
        .args(["--skip-etcd", "--skip-scaleout", "--skip-profile", "--out"])
        .arg(&out)
        .arg("--results")
        .arg(dir.path().join("results"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    for needle in [
        "- Machine: ",
        "- Disk: fdatasync of 4 KiB p50 ",
        "| 1 ceiling | echo (no Raft, no disk) | closed, c=8 |",
        "| 2 enrol | enroll | closed, c=8 |",
        "| 3 auth | auth at the 5,000/s target | open, 5000/s |",
        "| auth >= 5,000/s at p99 <= 25 ms (one cell) |",
        "| >= 50% of the no-op ceiling |",
        "| 2b exactly-once | versioned update, request ids off | closed, c=8 |",
        "| request-id bookkeeping costs < 10% of enrolment throughput |",
        "CPU per authentication at max throughput: cell leader ",
        "| 4 -> 5 cells, 2000 identities |",
        "| adding a cell: 0 client errors, p99 during <= 2x before, freeze p99 <= 250 ms, >= 20 MB/s |",
        "## By hand\nkept\n",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        for needle in [
            "Section 7, overload: one cell whose three replicas share 0.6 CPU",
            "| overload at 3x max for 2 s: goodput >= 80% of max",
            "| a partner over its rate limit leaves another's throughput and p99 within 10% |",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(dir.path().join("results/7-overload-3x.json").exists());
    } else {
        assert!(text.contains("overload section failed"), "without root the cgroup cannot be made:\n{text}");
    }
    assert!(!text.contains("\nold\n"), "the old generated part is replaced");
    // Every row's report and plot are kept.
    assert!(dir.path().join("results/3-auth-max.json").exists());
    assert!(dir.path().join("results/1-echo.svg").exists());
}
