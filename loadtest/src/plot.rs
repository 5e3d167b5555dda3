//! The run as a picture: an SVG with throughput per second on top and p50/p99 latency per second
//! below, on a shared time axis. Hand-written SVG (a few polylines and labels), so no plotting
//! dependency and the file opens in any browser.

use crate::report::Report;
use std::fmt::Write as _;

const WIDTH: f64 = 860.0;
const PANEL: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;

/// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|v| *v >= max).unwrap_or(10.0 * power)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

struct Panel {
    top: f64,
    y_max: f64,
    seconds: usize,
}

impl Panel {
    fn x(&self, second: usize) -> f64 {
        // Each value is drawn at the middle of its second.
        let width = WIDTH - LEFT - RIGHT;
        LEFT + width * (second as f64 + 0.5) / self.seconds.max(1) as f64
    }

    fn y(&self, value: f64) -> f64 {
        self.top + PANEL - PANEL * (value / self.y_max).clamp(0.0, 1.0)
    }

    fn frame(&self, out: &mut String, title: &str, unit: &str) {
        let _ = write!(
            out,
            r##"<rect x="{LEFT}" y="{}" width="{}" height="{PANEL}" fill="none" stroke="#999"/>"##,
            self.top,
            WIDTH - LEFT - RIGHT
        );
        for i in 0..=4 {
            let v = self.y_max * f64::from(i) / 4.0;
            let y = self.y(v);
            let _ = write!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                format_value(v)
            );
        }
        let _ = write!(
            out,
            r##"<text x="{LEFT}" y="{:.1}" font-size="13" font-weight="bold">{}</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            self.top - 8.0,
            escape(title),
            WIDTH - RIGHT,
            self.top - 8.0,
            escape(unit)
        );
    }

    fn line(&self, out: &mut String, values: &[f64], colour: &str) {
        let points: Vec<String> =
            values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", self.x(i), self.y(*v))).collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
    }
}

fn format_value(v: f64) -> String {
    match v {
        v if v >= 100.0 || v == 0.0 => format!("{v:.0}"),
        v if v >= 10.0 => format!("{v:.1}"),
        v => format!("{v:.2}"),
    }
}

/// The SVG of a run's report.
pub fn svg(report: &Report) -> String {
    let seconds = report.per_second.len().max(1);
    let height = TOP + PANEL + GAP + PANEL + 50.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#
    );
    let throughput: Vec<f64> = report.per_second.iter().map(|v| *v as f64).collect();
    let failed: Vec<f64> = report.per_second_failed.iter().map(|v| *v as f64).collect();
    let offered = report.offered as f64;
    let y_max = nice_ceiling(throughput.iter().chain(&failed).copied().fold(offered, f64::max));
    let top = Panel { top: TOP, y_max, seconds };
    let late =
        if report.late > 0 { format!(", {} answered after the window", report.late) } else { String::new() };
    top.frame(
        &mut out,
        &format!(
            "{} against {} ({} loop, load {}): {:.0}/s, {} failed{late}",
            report.scenario, report.target, report.mode, report.load, report.throughput, report.failed
        ),
        if report.offered > 0 {
            "answered per second: ok (blue), failed (orange); offered (grey)"
        } else {
            "answered per second: ok (blue), failed (orange)"
        },
    );
    if report.offered > 0 {
        top.line(&mut out, &vec![offered; seconds], "#999999");
    }
    top.line(&mut out, &throughput, "#1f77b4");
    if failed.iter().any(|f| *f > 0.0) {
        top.line(&mut out, &failed, "#ff7f0e");
    }
    let p99_max = report.per_second_p99_ms.iter().copied().fold(0.0, f64::max);
    let bottom = Panel { top: TOP + PANEL + GAP, y_max: nice_ceiling(p99_max), seconds };
    bottom.frame(
        &mut out,
        &format!(
            "latency: p50 {:.2} ms, p99 {:.2} ms over the run",
            report.latency_ms.get("p50").copied().unwrap_or(0.0),
            report.latency_ms.get("p99").copied().unwrap_or(0.0)
        ),
        "ms per second: p50 (green), p99 (red)",
    );
    bottom.line(&mut out, &report.per_second_p50_ms, "#2ca02c");
    bottom.line(&mut out, &report.per_second_p99_ms, "#d62728");
    let axis_y = bottom.top + PANEL + 18.0;
    let step = seconds.div_ceil(10).max(1);
    for s in (0..seconds).step_by(step) {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{axis_y:.1}" font-size="11" text-anchor="middle">{s}</text>"#,
            bottom.x(s)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">seconds after warm-up</text></svg>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        axis_y + 18.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Recorder;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1999.0), 2000.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
    }

    #[test]
    fn the_plot_has_one_point_per_second_for_each_line() {
        let mut r = Recorder::new().unwrap();
        for second in 0..5usize {
            for i in 0..100u64 {
                r.complete(Some(second), Ok(1000 + i * (second as u64 + 1)));
            }
        }
        let report = Report::new("get", "nid", "open", 100, 5.0, &r, &[]);
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        // Offered, completions, p50, p99.
        assert_eq!(svg.matches("<polyline").count(), 4);
        for line in svg.split("points=\"").skip(1) {
            let points = line.split('"').next().unwrap();
            assert_eq!(points.split(' ').count(), 5, "{points}");
        }
        assert!(svg.contains("get against nid"));
    }
}
