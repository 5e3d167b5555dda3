//! Time as the domain sees it: Unix milliseconds from the leader's [`Clock`] (carried in commands,
//! so every replica decides with the same time), protobuf timestamps, and calendar dates.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The leader's clock. Tests shift it to cross a cool-down without waiting; production never does.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Unix milliseconds now, plus the test offset.
    pub fn now_ms(&self) -> u64 {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        real.saturating_add(self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Moves the clock by `ms` (tests only).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// A protobuf timestamp of Unix milliseconds.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Unix milliseconds of a timestamp; None before 1970 or with out-of-range nanos.
pub fn millis(t: &prost_types::Timestamp) -> Option<u64> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    (t.seconds as u64).checked_mul(1000)?.checked_add(t.nanos as u64 / 1_000_000)
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    /// Year.
    pub year: u32,
    /// Month, 1..=12.
    pub month: u32,
    /// Day, 1..=31.
    pub day: u32,
}

impl Date {
    /// Parses a real calendar date `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Date> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| {
            let part = s.get(r)?;
            part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse::<u32>().ok()).flatten()
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        (1..=days).contains(&day).then_some(Date { year, month, day })
    }

    /// The UTC date of a Unix millisecond time (Howard Hinnant's civil-from-days).
    pub fn from_unix_ms(ms: u64) -> Date {
        let days = (ms / 86_400_000) as i64;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        Date { year, month, day }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_strictly_and_convert_from_unix_time() {
        assert_eq!(Date::parse("2024-02-29"), Some(Date { year: 2024, month: 2, day: 29 }));
        for bad in
            ["2023-02-29", "1990-13-01", "1990-00-10", "1990-1-10", "199O-01-10", "+990-01-10", "1990-01-32"]
        {
            assert_eq!(Date::parse(bad), None, "{bad}");
        }
        assert_eq!(Date::from_unix_ms(0), Date { year: 1970, month: 1, day: 1 });
        assert_eq!(Date::from_unix_ms(951_782_400_000), Date { year: 2000, month: 2, day: 29 });
        assert_eq!(Date::from_unix_ms(1_796_083_199_999), Date { year: 2026, month: 11, day: 30 });
        assert!(Date::parse("2026-12-01").unwrap() > Date::from_unix_ms(1_796_083_199_999));
    }

    #[test]
    fn timestamps_round_trip_and_refuse_negative_time() {
        assert_eq!(millis(&timestamp(1_700_000_000_123)), Some(1_700_000_000_123));
        assert_eq!(millis(&prost_types::Timestamp { seconds: -1, nanos: 0 }), None);
        assert_eq!(millis(&prost_types::Timestamp { seconds: 1, nanos: 1_000_000_000 }), None);
    }
}
