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

/// Collected while running.
pub struct Recorder {
    /// Latencies of measured (post-warmup) successes, in microseconds.
    pub latency: Histogram<u64>,
    /// Completions (success or error) per second since the start of measurement.
    pub per_second: Vec<u64>,
    /// Latencies of the successes of each second (2 significant digits: for the plot).
    pub per_second_latency: Vec<Histogram<u64>>,
    second_template: Histogram<u64>,
    /// Errors by "CODE" or "CODE/REASON".
    pub errors: BTreeMap<String, u64>,
    /// Requests the open-loop driver could not send because too many were in flight.
    pub dropped: u64,
    /// Measured authentications answered yes as expected.
    pub auth_yes: u64,
    /// Measured authentications answered no as expected.
    pub auth_no: u64,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> anyhow::Result<Recorder> {
        Ok(Recorder {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            per_second: Vec::new(),
            per_second_latency: Vec::new(),
            second_template: Histogram::new_with_bounds(1, 120_000_000, 2)?,
            errors: BTreeMap::new(),
            dropped: 0,
            auth_yes: 0,
            auth_no: 0,
        })
    }

    /// Counts an authentication's expected answer.
    pub fn auth(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Yes => self.auth_yes += 1,
            Outcome::No => self.auth_no += 1,
            Outcome::Done => {}
        }
    }

    /// Records one completion `second` seconds into the measurement.
    pub fn complete(&mut self, second: usize, result: Result<u64, String>) {
        while self.per_second.len() <= second {
            self.per_second.push(0);
            self.per_second_latency.push(Histogram::new_from(&self.second_template));
        }
        self.per_second[second] += 1;
        match result {
            Ok(us) => {
                let us = us.clamp(1, 120_000_000);
                let _ = self.latency.record(us);
                let _ = self.per_second_latency[second].record(us);
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
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
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// Successful requests per second.
    pub throughput: f64,
    /// Latency percentiles in milliseconds (open loop: from the intended send time).
    pub latency_ms: BTreeMap<String, f64>,
    /// Completions per second over time.
    pub per_second: Vec<u64>,
    /// p50 latency of each second's successes, ms (0 for a second without one).
    pub per_second_p50_ms: Vec<f64>,
    /// p99 latency of each second's successes, ms.
    pub per_second_p99_ms: Vec<f64>,
    /// Errors by code and reason.
    pub errors: BTreeMap<String, u64>,
    /// Sends skipped because the in-flight bound was reached (open loop only).
    pub dropped: u64,
    /// Authentications answered yes as expected (right factors).
    pub auth_yes: u64,
    /// Authentications answered no as expected (wrong factors).
    pub auth_no: u64,
}

impl Report {
    /// Builds the report from a recorder.
    pub fn new(scenario: &str, target: &str, mode: &str, load: u64, seconds: f64, r: &Recorder) -> Report {
        let h = &r.latency;
        let ms = |v: u64| v as f64 / 1000.0;
        let mut latency_ms = BTreeMap::new();
        for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999)] {
            latency_ms.insert(name.to_owned(), ms(h.value_at_quantile(q)));
        }
        latency_ms.insert("max".to_owned(), ms(h.max()));
        let failed = r.errors.values().sum();
        Report {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            mode: mode.to_owned(),
            load,
            seconds,
            ok: h.len(),
            failed,
            throughput: if seconds > 0.0 { h.len() as f64 / seconds } else { 0.0 },
            latency_ms,
            per_second: r.per_second.clone(),
            per_second_p50_ms: r.per_second_latency.iter().map(|h| ms(h.value_at_quantile(0.5))).collect(),
            per_second_p99_ms: r.per_second_latency.iter().map(|h| ms(h.value_at_quantile(0.99))).collect(),
            errors: r.errors.clone(),
            dropped: r.dropped,
            auth_yes: r.auth_yes,
            auth_no: r.auth_no,
        }
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "{} against {} ({} loop, load {}): {} ok, {} failed in {:.1} s = {:.0}/s\nlatency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.scenario,
            self.target,
            self.mode,
            self.load,
            self.ok,
            self.failed,
            self.seconds,
            self.throughput,
            l["p50"],
            l["p90"],
            l["p99"],
            l["p99.9"],
            l["max"]
        );
        for (kind, n) in &self.errors {
            out.push_str(&format!("error {kind}: {n}\n"));
        }
        if self.dropped > 0 {
            out.push_str(&format!("not sent (in-flight bound reached): {}\n", self.dropped));
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
            r.complete((us / 500) as usize, Ok(us * 10));
        }
        r.complete(2, Err("Unavailable/NOT_LEADER".into()));
        let rep = Report::new("get", "nid", "open", 500, 2.0, &r);
        assert_eq!(rep.ok, 1000);
        assert_eq!(rep.failed, 1);
        assert_eq!(rep.throughput, 500.0);
        assert!((rep.latency_ms["p50"] - 5.0).abs() < 0.05, "{:?}", rep.latency_ms);
        assert!((rep.latency_ms["max"] - 10.0).abs() < 0.05);
        assert_eq!(rep.per_second, vec![499, 500, 2]);
        // Second 0 holds 10..=4990 us, second 1 5000..=9990 us, second 2 10000 us and the error.
        assert!((rep.per_second_p50_ms[0] - 2.5).abs() < 0.05, "{:?}", rep.per_second_p50_ms);
        assert!((rep.per_second_p99_ms[1] - 9.95).abs() < 0.1, "{:?}", rep.per_second_p99_ms);
        assert!((rep.per_second_p50_ms[2] - 10.0).abs() < 0.1, "{:?}", rep.per_second_p50_ms);
        assert!(rep.summary().contains("error Unavailable/NOT_LEADER: 1"));
        // A second with only failures has no latency to plot.
        let mut r = Recorder::new().unwrap();
        r.complete(0, Ok(100));
        r.complete(1, Err("Unavailable".into()));
        assert_eq!(Report::new("get", "nid", "open", 1, 2.0, &r).per_second_p50_ms[1], 0.0);
    }
}
