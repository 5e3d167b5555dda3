//! Per-partner rate limits at the router: a token bucket per partner, refilled at the partner's
//! rate times this router's share of the cluster's routers (`--quota-share`), holding at most its
//! burst times the share. A partner over its limit gets RESOURCE_EXHAUSTED / RATE_LIMITED with a
//! RetryInfo delay before anything is sent to a cell.
//!
//! With several routers behind a load balancer each one enforces `share` of the partner's limit:
//! with N routers and an even spread, `--quota-share 1/N` makes the cluster-wide limit the
//! configured one (a partner that hits only some routers gets less, never more). No router talks
//! to another on the request path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::Status;

/// The longest retry delay a refusal names.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// The smallest share a router enforces (a smaller one would make every wait infinite).
const MIN_SHARE: f64 = 1e-6;

/// One partner's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens per second.
    rate: f64,
    /// Most tokens held.
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, capacity: f64, now: Instant) -> Bucket {
        Bucket { rate, capacity, tokens: capacity, at: now }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(MAX_WAIT);
            Err(wait.min(MAX_WAIT))
        }
    }
}

/// The buckets of every partner seen by this router.
pub struct Quotas {
    share: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    limited: prometheus::IntCounterVec,
}

impl Quotas {
    /// Quotas enforcing `share` (0 < share <= 1) of each partner's limit; counts refusals in
    /// `nid_router_rate_limited_total{partner}`.
    pub fn new(share: f64, registry: &prometheus::Registry) -> prometheus::Result<Quotas> {
        let limited = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "nid_router_rate_limited_total",
                "Authentications refused because the partner exceeded its rate limit, by partner.",
            ),
            &["partner"],
        )?;
        registry.register(Box::new(limited.clone()))?;
        Ok(Quotas { share: share.clamp(MIN_SHARE, 1.0), buckets: Mutex::default(), limited })
    }

    /// Admits one request of `partner`, whose limit is `rate_per_second` with `burst` (0: no
    /// limit; a burst of 0 means the rate).
    pub fn admit(&self, partner: &str, rate_per_second: u32, burst: u32) -> Result<(), Status> {
        self.admit_at(partner, rate_per_second, burst, Instant::now())
    }

    fn admit_at(&self, partner: &str, rate_per_second: u32, burst: u32, now: Instant) -> Result<(), Status> {
        if rate_per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(rate_per_second) * self.share;
        // Always room for one request, so a small share still lets a partner through.
        let capacity = (f64::from(if burst == 0 { rate_per_second } else { burst }) * self.share).max(1.0);
        let taken = {
            let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
            let bucket =
                buckets.entry(partner.to_owned()).or_insert_with(|| Bucket::new(rate, capacity, now));
            if bucket.rate != rate || bucket.capacity != capacity {
                // The limit changed: keep what was saved, within the new capacity.
                bucket.rate = rate;
                bucket.capacity = capacity;
                bucket.tokens = bucket.tokens.min(capacity);
            }
            bucket.take(now)
        };
        taken.map_err(|wait| {
            self.limited.with_label_values(&[partner]).inc();
            nid_proto::error::rate_limited(rate, wait.max(Duration::from_millis(1)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn quotas(share: f64) -> Quotas {
        Quotas::new(share, &prometheus::Registry::new()).unwrap()
    }

    #[test]
    fn a_burst_then_the_rate_and_a_retry_delay_until_the_next_token() {
        let q = quotas(1.0);
        let t0 = Instant::now();
        for _ in 0..4 {
            q.admit_at("bank-a", 2, 4, t0).unwrap();
        }
        let refused = q.admit_at("bank-a", 2, 4, t0).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(nid_proto::error::reason_of(&refused).as_deref(), Some("RATE_LIMITED"));
        let wait = nid_proto::error::retry_delay(&refused).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-3, "{wait:?}");
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        q.admit_at("bank-a", 2, 4, t1).unwrap();
        assert!(q.admit_at("bank-a", 2, 4, t1).is_err());
        // Another partner has its own bucket; no limit means no bucket at all.
        q.admit_at("bank-b", 2, 4, t1).unwrap();
        for _ in 0..1000 {
            q.admit_at("bank-c", 0, 0, t1).unwrap();
        }
    }

    #[test]
    fn a_router_enforces_its_share_and_a_changed_limit_applies_at_once() {
        let q = quotas(0.5);
        let t0 = Instant::now();
        // Rate 10 with burst 0 (= the rate): this router holds 5.
        let admitted = (0..20).filter(|_| q.admit_at("bank-a", 10, 0, t0).is_ok()).count();
        assert_eq!(admitted, 5);
        // Raised to 100/s with a burst of 100: after 0.1 s, 5 more tokens (50/s here).
        let t1 = t0 + Duration::from_millis(100);
        let admitted = (0..20).filter(|_| q.admit_at("bank-a", 100, 100, t1).is_ok()).count();
        assert_eq!(admitted, 5);
        // A tiny share still admits one at a time.
        let q = quotas(0.01);
        assert!(q.admit_at("bank-a", 1, 0, t0).is_ok());
    }
}
