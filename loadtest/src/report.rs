//! Measurements of one run: latency histogram (HdrHistogram, microseconds), completions per second,
//! errors by gRPC code and nid reason; the JSON report and the human summary.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// What a successful request was, for the yes/no counts of the auth scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not an authentication.
    Done,
    /// An expected yes.
    Yes,
    /// An expected no.
    No,
}

/// Collected while running. A request is *measured* when it was due (open loop) or sent (closed
/// loop) inside the measured window; it *completed in the window* when its answer came before the
/// window's end. Throughput counts only the latter: a server that falls behind shows up as a
/// throughput below the offered rate and a backlog answered late, not as a flat line.
pub struct Recorder {
    /// Latencies of measured successes, in microseconds, late ones included.
    pub latency: Histogram<u64>,
    /// Successes answered in each second of the window (by the second the answer came).
    pub per_second: Vec<u64>,
    /// Failures answered in each second of the window.
    pub per_second_failed: Vec<u64>,
    /// Latencies of the successes completed in each second (2 significant digits: for the plot).
    pub per_second_latency: Vec<Histogram<u64>>,
    /// Successes answered inside the window (to requests due in it or in the warm-up).
    pub ok_in_window: u64,
    /// Measured requests answered after the window (the backlog at its end), successes or not.
    pub late: u64,
    /// From the window's end to the last answer, in seconds (0 when nothing was late).
    pub drain_seconds: f64,
    second_template: Histogram<u64>,
    /// Errors by "CODE" or "CODE/REASON".
    pub errors: BTreeMap<String, u64>,
    /// Requests the open-loop driver could not send because too many were in flight.
    pub dropped: u64,
    /// Closed loop: sends again after an OVERLOADED refusal (the request counts once).
    pub retried: u64,
    /// Measured authentications answered yes as expected.
    pub auth_yes: u64,
    /// Measured authentications answered no as expected.
    pub auth_no: u64,
    /// Per phase of a phased open-loop run, the requests due in it (empty otherwise).
    pub phases: Vec<PhaseRecorder>,
}

/// The requests due in one phase of a phased run.
pub struct PhaseRecorder {
    /// Latencies of its successes, microseconds.
    pub latency: Histogram<u64>,
    /// Its failures by kind.
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> anyhow::Result<Recorder> {
        Ok(Recorder {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            per_second: Vec::new(),
            per_second_failed: Vec::new(),
            per_second_latency: Vec::new(),
            second_template: Histogram::new_with_bounds(1, 120_000_000, 2)?,
            errors: BTreeMap::new(),
            ok_in_window: 0,
            late: 0,
            drain_seconds: 0.0,
            dropped: 0,
            retried: 0,
            auth_yes: 0,
            auth_no: 0,
            phases: Vec::new(),
        })
    }

    /// Records the answer to a measured request due in phase `phase`.
    pub fn phase(&mut self, phase: usize, result: &Result<u64, String>) {
        while self.phases.len() <= phase {
            self.phases
                .push(PhaseRecorder { latency: Histogram::new_from(&self.latency), errors: BTreeMap::new() });
        }
        let p = &mut self.phases[phase];
        match result {
            Ok(us) => {
                let _ = p.latency.record((*us).clamp(1, 120_000_000));
            }
            Err(kind) => *p.errors.entry(kind.clone()).or_default() += 1,
        }
    }

    /// Counts an authentication's expected answer.
    pub fn auth(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Yes => self.auth_yes += 1,
            Outcome::No => self.auth_no += 1,
            Outcome::Done => {}
        }
    }

    /// Counts an answer inside the window to a request due before it (in the warm-up): it adds
    /// to what the server completed in the window, not to the latency figures.
    pub fn complete_unmeasured(&mut self, second: usize, ok: bool) {
        self.grow(second);
        if ok {
            self.per_second[second] += 1;
            self.ok_in_window += 1;
        } else {
            self.per_second_failed[second] += 1;
        }
    }

    fn grow(&mut self, second: usize) {
        while self.per_second.len() <= second {
            self.per_second.push(0);
            self.per_second_failed.push(0);
            self.per_second_latency.push(Histogram::new_from(&self.second_template));
        }
    }

    /// Records the answer to one measured request: `second` is the second of the window it
    /// completed in, None when it completed after the window.
    pub fn complete(&mut self, second: Option<usize>, result: Result<u64, String>) {
        match second {
            Some(second) => self.grow(second),
            None => self.late += 1,
        }
        match result {
            Ok(us) => {
                let us = us.clamp(1, 120_000_000);
                let _ = self.latency.record(us);
                if let Some(second) = second {
                    self.per_second[second] += 1;
                    self.ok_in_window += 1;
                    let _ = self.per_second_latency[second].record(us);
                }
            }
            Err(kind) => {
                if let Some(second) = second {
                    self.per_second_failed[second] += 1;
                }
                *self.errors.entry(kind).or_default() += 1
            }
        }
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What ran.
    pub scenario: String,
    /// What it ran against: "nid" (a router) or "etcd".
    pub target: String,
    /// "open" (fixed rate) or "closed" (fixed concurrency).
    pub mode: String,
    /// Target rate (open loop) or concurrency (closed loop).
    pub load: u64,
    /// Measured seconds (after warmup).
    pub seconds: f64,
    /// Successful measured requests (answered in the window or after it).
    pub ok: u64,
    /// Failed measured requests.
    pub failed: u64,
    /// Successes answered inside the window, per second of the window.
    pub throughput: f64,
    /// Open loop: the rate offered (sends due per second); closed loop: 0.
    pub offered: u64,
    /// Measured requests answered after the window: the backlog at its end.
    pub late: u64,
    /// Seconds from the window's end to the last answer.
    pub drain_seconds: f64,
    /// Latency percentiles in milliseconds (open loop: from the intended send time).
    pub latency_ms: BTreeMap<String, f64>,
    /// Successes per second of the window, by the second the answer came in.
    pub per_second: Vec<u64>,
    /// Failures per second of the window.
    pub per_second_failed: Vec<u64>,
    /// p50 latency of each second's successes, ms (0 for a second without one).
    pub per_second_p50_ms: Vec<f64>,
    /// p99 latency of each second's successes, ms.
    pub per_second_p99_ms: Vec<f64>,
    /// Errors by code and reason.
    pub errors: BTreeMap<String, u64>,
    /// Sends skipped because the in-flight bound was reached (open loop only).
    pub dropped: u64,
    /// Closed loop: requests sent again after an OVERLOADED refusal and the hinted wait.
    pub retried: u64,
    /// Authentications answered yes as expected (right factors).
    pub auth_yes: u64,
    /// Authentications answered no as expected (wrong factors).
    pub auth_no: u64,
    /// A phased open-loop run (`--then`): each phase's own figures, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseReport>,
}

/// The figures of one phase of a phased run.
#[derive(Debug, Serialize)]
pub struct PhaseReport {
    /// Requests per second offered.
    pub rate: u64,
    /// Seconds from the measured window's start to the phase's.
    pub from_second: u64,
    /// How long it lasted.
    pub seconds: u64,
    /// Successes answered inside the phase's seconds, per second (goodput).
    pub throughput: f64,
    /// Requests due in the phase that succeeded (whenever answered).
    pub ok: u64,
    /// Requests due in the phase that failed.
    pub failed: u64,
    /// Latency of the phase's successes, ms: p50, p99, max.
    pub latency_ms: BTreeMap<String, f64>,
    /// Its failures by kind.
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Builds the report from a recorder.
    /// A phased open-loop run has `schedule`: each phase's (rate, seconds), the first one the
    /// measured duration at `load` (empty otherwise); `seconds` is the whole window.
    pub fn new(
        scenario: &str,
        target: &str,
        mode: &str,
        load: u64,
        seconds: f64,
        r: &Recorder,
        schedule: &[(u64, u64)],
    ) -> Report {
        // A window ends with its last second: answers come no later than it.
        let window = (seconds.ceil() as usize).max(1);
        let mut per_second = r.per_second.clone();
        per_second.resize(window, 0);
        let mut per_second_failed = r.per_second_failed.clone();
        per_second_failed.resize(window, 0);
        let per_second_ms = |q: f64| -> Vec<f64> {
            let mut v: Vec<f64> =
                r.per_second_latency.iter().map(|h| h.value_at_quantile(q) as f64 / 1000.0).collect();
            v.resize(window, 0.0);
            v
        };
        let h = &r.latency;
        let ms = |v: u64| v as f64 / 1000.0;
        let mut latency_ms = BTreeMap::new();
        for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999)] {
            latency_ms.insert(name.to_owned(), ms(h.value_at_quantile(q)));
        }
        latency_ms.insert("max".to_owned(), ms(h.max()));
        let failed = r.errors.values().sum();
        let mut phases = Vec::new();
        let mut from = 0u64;
        for (i, &(rate, secs)) in schedule.iter().enumerate() {
            let range = (from as usize).min(per_second.len())..((from + secs) as usize).min(per_second.len());
            let done: u64 = per_second[range].iter().sum();
            let (latency, errors) = match r.phases.get(i) {
                Some(p) => (Some(&p.latency), p.errors.clone()),
                None => (None, BTreeMap::new()),
            };
            let mut latency_ms = BTreeMap::new();
            for (name, q) in [("p50", 0.50), ("p99", 0.99)] {
                latency_ms.insert(name.to_owned(), latency.map_or(0.0, |h| ms(h.value_at_quantile(q))));
            }
            latency_ms.insert("max".to_owned(), latency.map_or(0.0, |h| ms(h.max())));
            phases.push(PhaseReport {
                rate,
                from_second: from,
                seconds: secs,
                throughput: done as f64 / secs.max(1) as f64,
                ok: latency.map_or(0, |h| h.len()),
                failed: errors.values().sum(),
                latency_ms,
                errors,
            });
            from += secs;
        }
        Report {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            mode: mode.to_owned(),
            load,
            seconds,
            ok: h.len(),
            failed,
            throughput: if seconds > 0.0 { r.ok_in_window as f64 / seconds } else { 0.0 },
            offered: if mode == "open" { load } else { 0 },
            late: r.late,
            drain_seconds: r.drain_seconds,
            latency_ms,
            per_second,
            per_second_failed,
            per_second_p50_ms: per_second_ms(0.5),
            per_second_p99_ms: per_second_ms(0.99),
            errors: r.errors.clone(),
            dropped: r.dropped,
            retried: r.retried,
            auth_yes: r.auth_yes,
            auth_no: r.auth_no,
            phases,
        }
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "{} against {} ({} loop, load {}): {:.0}/s answered in the {:.1} s window ({} ok, {} failed in all)\nlatency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.scenario,
            self.target,
            self.mode,
            self.load,
            self.throughput,
            self.seconds,
            self.ok,
            self.failed,
            l["p50"],
            l["p90"],
            l["p99"],
            l["p99.9"],
            l["max"]
        );
        for (kind, n) in &self.errors {
            out.push_str(&format!("error {kind}: {n}\n"));
        }
        if self.offered > 0 && self.throughput < 0.95 * self.offered as f64 {
            out.push_str(&format!(
                "BEHIND: offered {}/s, answered {:.0}/s in the window\n",
                self.offered, self.throughput
            ));
        }
        // Closed loop always has its last requests in flight at the end: no backlog to speak of.
        if self.late > 0 && self.mode == "open" {
            out.push_str(&format!(
                "answered after the window (backlog at its end): {}, drained in {:.2} s\n",
                self.late, self.drain_seconds
            ));
        }
        if self.retried > 0 {
            out.push_str(&format!("sent again after an OVERLOADED refusal: {}\n", self.retried));
        }
        if self.dropped > 0 {
            out.push_str(&format!("not sent (in-flight bound reached): {}\n", self.dropped));
        }
        for p in &self.phases {
            out.push_str(&format!(
                "phase from {} s, {} s at {}/s: {:.0}/s answered in it, {} ok, {} failed, p50 {:.2} p99 {:.2} ms\n",
                p.from_second, p.seconds, p.rate, p.throughput, p.ok, p.failed, p.latency_ms["p50"], p.latency_ms["p99"]
            ));
        }
        if self.auth_yes + self.auth_no > 0 {
            out.push_str(&format!("auth: {} yes, {} no (as expected)\n", self.auth_yes, self.auth_no));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_percentiles_and_errors() {
        let mut r = Recorder::new().unwrap();
        for us in 1..=1000u64 {
            r.complete(Some((us / 500) as usize), Ok(us * 10));
        }
        r.complete(Some(2), Err("Unavailable/NOT_LEADER".into()));
        let rep = Report::new("get", "nid", "open", 500, 3.0, &r, &[]);
        assert_eq!(rep.ok, 1000);
        assert_eq!(rep.failed, 1);
        assert!((rep.throughput - 1000.0 / 3.0).abs() < 1e-9);
        assert!((rep.latency_ms["p50"] - 5.0).abs() < 0.05, "{:?}", rep.latency_ms);
        assert!((rep.latency_ms["max"] - 10.0).abs() < 0.05);
        assert_eq!(rep.per_second, vec![499, 500, 1]);
        assert_eq!(rep.per_second_failed, vec![0, 0, 1]);
        // Second 0 holds 10..=4990 us, second 1 5000..=9990 us, second 2 10000 us and the error.
        assert!((rep.per_second_p50_ms[0] - 2.5).abs() < 0.05, "{:?}", rep.per_second_p50_ms);
        assert!((rep.per_second_p99_ms[1] - 9.95).abs() < 0.1, "{:?}", rep.per_second_p99_ms);
        assert!((rep.per_second_p50_ms[2] - 10.0).abs() < 0.1, "{:?}", rep.per_second_p50_ms);
        assert!(rep.summary().contains("error Unavailable/NOT_LEADER: 1"));
        // A second with only failures has no latency to plot.
        let mut r = Recorder::new().unwrap();
        r.complete(Some(0), Ok(100));
        r.complete(Some(1), Err("Unavailable".into()));
        assert_eq!(Report::new("get", "nid", "open", 1, 2.0, &r, &[]).per_second_p50_ms[1], 0.0);
    }

    #[test]
    fn a_phased_run_reports_each_phase_apart() {
        // 2 s at 100/s where half are shed, then 1 s at 10/s all answered quickly.
        let mut r = Recorder::new().unwrap();
        for second in 0..2 {
            for i in 0..100 {
                let result = if i % 2 == 0 { Ok(40_000) } else { Err("ResourceExhausted/OVERLOADED".into()) };
                r.phase(0, &result);
                r.complete(Some(second), result);
            }
        }
        for _ in 0..10 {
            r.phase(1, &Ok(2_000));
            r.complete(Some(2), Ok(2_000));
        }
        let rep = Report::new("auth", "nid", "open", 100, 3.0, &r, &[(100, 2), (10, 1)]);
        assert_eq!(rep.phases.len(), 2);
        let (a, b) = (&rep.phases[0], &rep.phases[1]);
        assert_eq!((a.rate, a.from_second, a.seconds, a.ok, a.failed), (100, 0, 2, 100, 100));
        assert_eq!(a.throughput, 50.0);
        assert_eq!(a.errors["ResourceExhausted/OVERLOADED"], 100);
        assert!((a.latency_ms["p99"] - 40.0).abs() < 0.1, "{:?}", a.latency_ms);
        assert_eq!((b.rate, b.from_second, b.throughput, b.failed), (10, 2, 10.0, 0));
        assert!((b.latency_ms["p99"] - 2.0).abs() < 0.01, "{:?}", b.latency_ms);
        assert!(rep.summary().contains("phase from 2 s, 1 s at 10/s"), "{}", rep.summary());
    }

    #[test]
    fn a_server_falling_behind_shows_a_backlog_not_the_offered_rate() {
        // Offered 100/s for 2 s; the server answers 50 in each second and the other 100 late.
        let mut r = Recorder::new().unwrap();
        for second in 0..2 {
            for _ in 0..50 {
                r.complete(Some(second), Ok(5_000));
            }
        }
        for _ in 0..100 {
            r.complete(None, Ok(900_000));
        }
        r.drain_seconds = 1.0;
        let rep = Report::new("auth", "nid", "open", 100, 2.0, &r, &[]);
        assert_eq!(rep.ok, 200, "every answer counts for latency");
        assert_eq!(rep.throughput, 50.0, "only answers inside the window count for throughput");
        assert_eq!(rep.late, 100);
        assert_eq!(rep.per_second, vec![50, 50]);
        assert!(rep.latency_ms["p99"] > 800.0, "late answers' latency is in the percentiles");
        let text = rep.summary();
        assert!(
            text.contains("BEHIND: offered 100/s") && text.contains("backlog at its end): 100"),
            "{text}"
        );
    }
}
