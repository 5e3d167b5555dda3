//! Process logging: human-readable text (the default) or one JSON object per line for log
//! shippers (`--log-format json`), both on stderr, filtered by `NID_LOG` (tracing's env-filter
//! syntax, default `info`).
//!
//! A JSON line carries `timestamp` (RFC 3339, UTC), `level`, `target`, the process's static fields
//! (role, cell, node, zone; numbers as numbers, as events carry them) and the event's own fields,
//! `message` included. Events never carry
//! identifiers or personal data (ARCHITECTURE.md), so neither do the lines.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing's compact human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Installs the process's subscriber. `statics` are fields every JSON line carries (the text
/// format leaves them out: a terminal shows one process at a time).
pub fn init(format: LogFormat, statics: &[(&'static str, serde_json::Value)]) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("NID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(JsonLines { statics: statics.to_vec() }).try_init(),
    };
}

/// The JSON event format.
pub struct JsonLines {
    statics: Vec<(&'static str, serde_json::Value)>,
}

impl JsonLines {
    /// A format adding `statics` to every line.
    pub fn new(statics: Vec<(&'static str, serde_json::Value)>) -> JsonLines {
        JsonLines { statics }
    }

    /// The JSON object of one event.
    fn object(&self, event: &Event<'_>) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        let mut timestamp = String::new();
        if SystemTime.format_time(&mut Writer::new(&mut timestamp)).is_ok() {
            map.insert("timestamp".into(), timestamp.into());
        }
        let meta = event.metadata();
        map.insert("level".into(), meta.level().as_str().to_ascii_lowercase().into());
        map.insert("target".into(), meta.target().into());
        for (k, v) in &self.statics {
            map.insert((*k).into(), v.clone());
        }
        event.record(&mut Fields(&mut map));
        map
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let line = serde_json::to_string(&self.object(event)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_time_level_target_statics_and_fields() {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .event_format(JsonLines::new(vec![("role", "cell".into()), ("node", 2.into())]))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "nid::test", term = 7u64, leader = true, "leader changed");
            tracing::info!("second \"quoted\" line");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "one object per line: {text}");
        let first = &lines[0];
        assert_eq!(first["level"], "warn");
        assert_eq!(first["target"], "nid::test");
        assert_eq!(first["message"], "leader changed");
        assert_eq!((first["term"].as_u64(), first["leader"].as_bool()), (Some(7), Some(true)));
        assert_eq!(
            (first["role"].as_str(), first["node"].as_u64()),
            (Some("cell"), Some(2)),
            "numbers stay numbers"
        );
        assert!(first["timestamp"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{first}");
        assert_eq!(lines[1]["message"], "second \"quoted\" line");
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
