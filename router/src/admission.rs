//! Admission control: how many requests the router keeps in flight to each cell, and what happens
//! to the rest.
//!
//! Every cell has an adaptive limit on the requests forwarded to it at once. A request takes a
//! permit before it is forwarded. At the limit it waits in a short FIFO queue; one that would wait
//! longer than the cell's latency target (or finds the queue full) is refused at once with
//! RESOURCE_EXHAUSTED / OVERLOADED and a retry delay. So an overloaded cell costs a client a fast
//! refusal instead of a queue that grows for as long as the overload lasts, and the work the cell
//! does is work someone still waits for (no retry storm of attempts that timed out).
//!
//! The limit follows the cell's round trip against a latency target, additive increase and
//! multiplicative decrease as in TCP: every 100 ms the router compares the window's mean round trip
//! with the target. Above it the cell is queueing, and the limit shrinks in proportion (at most by
//! half per window); an attempt the cell shed or let time out counts as above. Below it, with the
//! limit in use, the limit grows by its square root. The limit stays within
//! `[min_limit, max_limit]`.
//!
//! The queue in front of the limit tells a burst from an overload the way CoDel tells a good queue
//! from a standing one. While a slot was free within the last 100 ms and nobody was refused, the
//! queue absorbs a burst (a flush, a pause, a leader change), and a request waits up to four times
//! the target. No free slot for 100 ms, or a refusal in that time, means the cell lacks capacity: a
//! request then waits at most a third of the target, so what is admitted stays fast and the rest
//! is refused at once. At most four times the limit may wait. A refusal asks the client to retry
//! after half the target.
//!
//! Why an absolute target and not a multiple of the shortest round trip seen (TCP Vegas): a cell
//! batches proposals, so under load every request waits about one batch, and the shortest round
//! trip rises with the load; a limit that chases a multiple of it drifts upwards for as long as
//! the load lasts. The target is the operator's statement of how long a cell may take.
//!
//! The decisions live in [`Control`], a plain value driven by explicit times, so the unit tests run
//! it against a simulated cell without sleeping.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How the limiters behave (router flags).
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// The limit a cell starts at.
    pub initial_limit: usize,
    /// The limit never goes below this.
    pub min_limit: usize,
    /// Nor above this.
    pub max_limit: usize,
    /// The mean round trip to a cell the limit aims to stay under.
    pub target: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> AdmissionConfig {
        AdmissionConfig {
            initial_limit: 64,
            min_limit: 16,
            max_limit: 1024,
            target: Duration::from_millis(50),
        }
    }
}

/// How often the limit is reconsidered.
const WINDOW: Duration = Duration::from_millis(100);
/// A queue that has not been empty for this long is congested, not absorbing a burst.
const CONGESTION_INTERVAL: Duration = Duration::from_millis(100);
/// Waiting requests per unit of limit, at most (memory stays bounded).
const QUEUE_PER_LIMIT: usize = 4;
/// What a client refused by the router as a whole (`--max-in-flight`) is told to wait.
pub const SHED_RETRY: Duration = Duration::from_millis(50);

/// What became of a forwarded attempt, for the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// The cell answered (a result or a deterministic refusal): its round trip counts.
    Answered,
    /// The cell shed it or let it time out: a sign of overload whatever the round trip.
    Overloaded,
}

/// The limit's arithmetic, driven by explicit times.
#[derive(Debug)]
pub struct Control {
    target: Duration,
    min: f64,
    max: f64,
    /// The current limit (fractional; requests get `floor` of it).
    limit: f64,
    window_start: Instant,
    samples: u32,
    sum: Duration,
    overloaded: bool,
    /// A request found the limit in use during this window.
    saturated: bool,
}

impl Control {
    /// A limit at `config.initial_limit` starting `now`.
    pub fn new(config: &AdmissionConfig, now: Instant) -> Control {
        let min = config.min_limit.max(1) as f64;
        let max = (config.max_limit as f64).max(min);
        Control {
            target: config.target.max(Duration::from_millis(1)),
            min,
            max,
            limit: (config.initial_limit as f64).clamp(min, max),
            window_start: now,
            samples: 0,
            sum: Duration::ZERO,
            overloaded: false,
            saturated: false,
        }
    }

    /// Requests that may be in flight at once.
    pub fn cap(&self) -> usize {
        self.limit as usize
    }

    /// Notes that a request found every permit taken.
    pub fn saturate(&mut self) {
        self.saturated = true;
    }

    /// Takes one finished attempt into account; closes the window when it is due. Returns whether
    /// the limit changed.
    pub fn record(&mut self, rtt: Duration, sample: Sample, now: Instant) -> bool {
        match sample {
            Sample::Overloaded => self.overloaded = true,
            Sample::Answered => {
                self.samples += 1;
                self.sum += rtt;
            }
        }
        if now.saturating_duration_since(self.window_start) < WINDOW {
            return false;
        }
        let before = self.limit;
        let mean = (self.samples > 0).then(|| self.sum / self.samples);
        let over = mean.filter(|m| *m > self.target);
        if self.overloaded || over.is_some() {
            let ratio = over.map_or(0.9, |m| self.target.as_secs_f64() / m.as_secs_f64());
            let ratio = if self.overloaded { ratio.min(0.9) } else { ratio };
            self.limit = (self.limit * ratio.clamp(0.5, 0.95)).max(self.min);
        } else if self.saturated {
            self.limit = (self.limit + self.limit.sqrt()).min(self.max);
        }
        self.window_start = now;
        self.samples = 0;
        self.sum = Duration::ZERO;
        self.overloaded = false;
        self.saturated = false;
        self.limit != before
    }
}

/// The limiters of every cell this router forwards to.
pub struct Admission {
    config: AdmissionConfig,
    cells: Mutex<HashMap<u64, Arc<Limiter>>>,
    limit: IntGaugeVec,
    refused: IntCounterVec,
}

impl Admission {
    /// Limiters configured by `config`, with their metrics in `registry`.
    pub fn new(config: AdmissionConfig, registry: &Registry) -> anyhow::Result<Admission> {
        let limit = IntGaugeVec::new(
            Opts::new(
                "nid_router_cell_concurrency_limit",
                "Requests this router forwards to the cell at once (adaptive).",
            ),
            &["cell"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "nid_router_cell_refused_total",
                "Requests refused before forwarding because the cell was at its concurrency limit, by why.",
            ),
            &["cell", "why"],
        )?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(Admission { config, cells: Mutex::default(), limit, refused })
    }

    fn limiter(&self, cell: u64) -> Arc<Limiter> {
        let mut cells = match self.cells.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        cells
            .entry(cell)
            .or_insert_with(|| {
                let label = cell.to_string();
                let gauge = self.limit.with_label_values(&[&label]);
                gauge.set(self.config.initial_limit as i64);
                Arc::new(Limiter {
                    state: Mutex::new(State {
                        control: Control::new(&self.config, Instant::now()),
                        in_flight: 0,
                        queue: VecDeque::new(),
                        last_free: Instant::now(),
                        last_refused: None,
                    }),
                    max_wait: self.config.target * 4,
                    congested_wait: self.config.target / 3,
                    retry_after: self.config.target / 2,
                    min_queue: self.config.min_limit.max(1),
                    gauge,
                    refused_full: self.refused.with_label_values(&[&label, "queue_full"]),
                    refused_waited: self.refused.with_label_values(&[&label, "waited"]),
                })
            })
            .clone()
    }

    /// A permit to forward one request to `cell`, waiting a little when the cell is at its limit
    /// (never past `deadline`). `Err` is the refusal to send the client.
    pub async fn admit(&self, cell: u64, deadline: Instant) -> Result<Permit, tonic::Status> {
        let limiter = self.limiter(cell);
        let (rx, wait) = {
            let mut st = limiter.lock();
            let now = Instant::now();
            // Waiters that gave up leave from the front: a queue of them is no queue.
            while st.queue.front().is_some_and(|w| w.is_closed()) {
                st.queue.pop_front();
            }
            let cap = st.control.cap();
            if st.in_flight < cap && st.queue.is_empty() {
                st.last_free = now;
                st.in_flight += 1;
                if st.in_flight >= cap {
                    st.control.saturate();
                }
                return Ok(Permit::new(limiter.clone()));
            }
            st.control.saturate();
            let room = cap.saturating_mul(QUEUE_PER_LIMIT).max(limiter.min_queue);
            if st.queue.len() >= room {
                st.queue.retain(|w| !w.is_closed());
            }
            if st.queue.len() >= room {
                st.last_refused = Some(now);
                limiter.refused_full.inc();
                return Err(refusal(limiter.retry_after));
            }
            // A cell with no free slot for a while, or one that had to refuse lately, is not
            // absorbing a burst: it is short of capacity, and waiting longer would only add latency
            // (CoDel's insight). (Not "the queue was empty": under overload, waiters that gave up
            // empty it again and again, and so does each step up of the limit.)
            let refused_lately =
                st.last_refused.is_some_and(|t| now.saturating_duration_since(t) < CONGESTION_INTERVAL);
            let congested =
                refused_lately || now.saturating_duration_since(st.last_free) > CONGESTION_INTERVAL;
            let (tx, rx) = oneshot::channel();
            st.queue.push_back(tx);
            (rx, if congested { limiter.congested_wait } else { limiter.max_wait })
        };
        let wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        // If this future is dropped while waiting (the client went away), the guard gives back a
        // slot handed over meanwhile.
        let mut waiting = Waiting { rx: Some(rx), limiter: limiter.clone() };
        let granted = match waiting.rx.as_mut() {
            Some(rx) => match tokio::time::timeout(wait, &mut *rx).await {
                Ok(r) => r.is_ok(),
                Err(_) => {
                    // Out of time; a slot handed over meanwhile is still ours.
                    rx.close();
                    rx.try_recv().is_ok()
                }
            },
            None => false,
        };
        waiting.rx = None;
        if granted {
            Ok(Permit::new(limiter))
        } else {
            limiter.lock().last_refused = Some(Instant::now());
            limiter.refused_waited.inc();
            Err(refusal(limiter.retry_after))
        }
    }
}

/// A request waiting for a slot. Dropped before it learnt the outcome, it releases a slot that
/// was handed to it.
struct Waiting {
    rx: Option<oneshot::Receiver<()>>,
    limiter: Arc<Limiter>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.limiter.release(None);
            }
        }
    }
}

/// The refusal of a request the cell's limit did not admit, with the delay after which the
/// requests ahead of it have about been answered.
fn refusal(retry_after: Duration) -> tonic::Status {
    nid_proto::error::overloaded(
        "the owning cell is at its concurrency limit; retry after the delay",
        retry_after,
    )
}

struct State {
    control: Control,
    in_flight: usize,
    /// Requests waiting for a slot; a slot handed over is already counted in `in_flight`.
    queue: VecDeque<oneshot::Sender<()>>,
    /// When a slot was last free with nobody waiting for it.
    last_free: Instant,
    /// When a request was last refused (it waited in vain, or the queue was full).
    last_refused: Option<Instant>,
}

/// One cell's limiter.
struct Limiter {
    state: Mutex<State>,
    /// The longest a request waits for a permit while the queue absorbs a burst.
    max_wait: Duration,
    /// The longest it waits once the queue has stood for [`CONGESTION_INTERVAL`].
    congested_wait: Duration,
    /// The delay a refused client is told to wait.
    retry_after: Duration,
    /// Requests that may wait, at least ([`QUEUE_PER_LIMIT`] times the limit when that is more).
    min_queue: usize,
    gauge: prometheus::IntGauge,
    refused_full: prometheus::IntCounter,
    refused_waited: prometheus::IntCounter,
}

impl Limiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Hands free slots to waiting requests, oldest first, while the limit allows; a waiter that
    /// gave up is skipped. A handed slot counts in `in_flight` at once.
    fn hand_over(st: &mut State) {
        while st.in_flight < st.control.cap() {
            let Some(tx) = st.queue.pop_front() else { break };
            if tx.send(()).is_ok() {
                st.in_flight += 1;
            }
        }
        if st.in_flight < st.control.cap() {
            st.last_free = Instant::now();
        }
    }

    fn release(&self, sample: Option<(Duration, Sample)>) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some((rtt, sample)) = sample
            && st.control.record(rtt, sample, Instant::now())
        {
            self.gauge.set(st.control.cap() as i64);
        }
        Limiter::hand_over(&mut st);
    }
}

/// Leave to forward one request to a cell; released when dropped (or by [`Permit::done`]).
pub struct Permit {
    limiter: Option<Arc<Limiter>>,
    started: Instant,
}

impl Permit {
    fn new(limiter: Arc<Limiter>) -> Permit {
        Permit { limiter: Some(limiter), started: Instant::now() }
    }

    /// Releases the permit, telling the limit what became of the request.
    pub fn done(mut self, sample: Sample) {
        if let Some(limiter) = self.limiter.take() {
            limiter.release(Some((self.started.elapsed(), sample)));
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").field("started", &self.started).finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Cancelled (the client went away): free the slot, learn nothing.
        if let Some(limiter) = self.limiter.take() {
            limiter.release(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell that completes `rate` requests per second once it has `knee` in flight, and whose
    /// round trip is `base` plus the queueing that more in flight adds (Little's law).
    fn cell_rtt(in_flight: usize, base: Duration, rate: f64, knee: usize) -> Duration {
        let queued = in_flight.saturating_sub(knee) as f64 / rate;
        base + Duration::from_secs_f64(queued)
    }

    /// Runs `control` against the simulated cell with `offered` requests wanting to be in flight,
    /// for `seconds`; returns the limit at the end.
    fn drive(control: &mut Control, start: Instant, seconds: u64, offered: usize) -> (Instant, usize) {
        let mut now = start;
        let end = start + Duration::from_secs(seconds);
        while now < end {
            let in_flight = offered.min(control.cap());
            if offered >= control.cap() {
                control.saturate();
            }
            let rtt = cell_rtt(in_flight, Duration::from_millis(4), 2500.0, 16);
            control.record(rtt, Sample::Answered, now);
            now += Duration::from_micros(400);
        }
        (now, control.cap())
    }

    #[test]
    fn the_limit_settles_where_the_cell_meets_the_target_and_grows_back_when_it_can() {
        let config = AdmissionConfig {
            initial_limit: 512,
            target: Duration::from_millis(20),
            ..AdmissionConfig::default()
        };
        let start = Instant::now();
        let mut control = Control::new(&config, start);
        // 5,000 callers want in; the cell is busy from 16 in flight on. A 20 ms mean round trip
        // is, by Little's law, 16 + 2500 * 16 ms = 56 in flight.
        let (now, limit) = drive(&mut control, start, 5, 5000);
        assert!((40..=70).contains(&limit), "limit {limit} under overload");
        // A cell that became four times faster: the limit rises with it, well above the old one.
        let mut now = now;
        let end = now + Duration::from_secs(5);
        while now < end {
            control.saturate();
            let rtt = cell_rtt(control.cap(), Duration::from_millis(4), 10_000.0, 64);
            control.record(rtt, Sample::Answered, now);
            now += Duration::from_micros(100);
        }
        assert!(control.cap() > 2 * limit, "limit {} after the cell sped up (was {limit})", control.cap());
    }

    #[test]
    fn a_limit_nobody_reaches_does_not_grow() {
        let config = AdmissionConfig::default();
        let start = Instant::now();
        let mut control = Control::new(&config, start);
        let (_, limit) = drive(&mut control, start, 3, 8);
        assert_eq!(limit, config.initial_limit);
    }

    #[test]
    fn sheds_and_timeouts_shrink_the_limit_to_its_floor_and_no_further() {
        let config = AdmissionConfig { initial_limit: 100, min_limit: 4, ..AdmissionConfig::default() };
        let start = Instant::now();
        let mut control = Control::new(&config, start);
        let mut now = start;
        for _ in 0..200 {
            now += WINDOW;
            control.record(Duration::from_millis(1), Sample::Overloaded, now);
        }
        assert_eq!(control.cap(), 4);
    }

    #[tokio::test]
    async fn a_waiter_cancelled_after_a_slot_was_handed_to_it_gives_the_slot_back() {
        let registry = Registry::new();
        let config =
            AdmissionConfig { initial_limit: 1, min_limit: 1, max_limit: 1, ..AdmissionConfig::default() };
        let admission = Arc::new(Admission::new(config, &registry).unwrap());
        let far = Instant::now() + Duration::from_secs(5);
        let held = admission.admit(3, far).await.unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(3, far).await.map(drop) })
        };
        // Let it queue (this runtime has one thread: it runs only when we yield).
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The slot goes to the waiter, which is cancelled before it runs again.
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(admission.limiter(3).lock().in_flight, 0, "the handed slot came back");
        let started = Instant::now();
        admission.admit(3, far).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(5));
    }

    #[tokio::test]
    async fn a_cell_without_a_free_slot_for_a_while_makes_newcomers_wait_only_a_third_of_the_target() {
        let registry = Registry::new();
        let target = Duration::from_millis(60);
        let config = AdmissionConfig { initial_limit: 1, min_limit: 1, max_limit: 1, target };
        let admission = Arc::new(Admission::new(config, &registry).unwrap());
        let far = Instant::now() + Duration::from_secs(5);
        let held = admission.admit(1, far).await.unwrap();
        // A burst: a slot was free a moment ago, so a waiter may wait four times the target.
        let started = Instant::now();
        let refused = admission.admit(1, far).await.unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= 4 * target, "a burst waits up to four targets: {waited:?}");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // No slot has been free for longer than the congestion interval: the cell lacks capacity.
        tokio::time::sleep(CONGESTION_INTERVAL).await;
        let started = Instant::now();
        let refused = admission.admit(1, far).await.unwrap_err();
        let waited = started.elapsed();
        assert!(waited < target, "a congested cell lets a newcomer wait a third of the target: {waited:?}");
        assert_eq!(nid_proto::error::reason_of(&refused).as_deref(), Some("OVERLOADED"));
        // Once the slot is free, a request goes through at once.
        drop(held);
        let started = Instant::now();
        admission.admit(1, far).await.unwrap();
        assert!(started.elapsed() < target);
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_wait_briefly_then_are_refused_with_a_retry_delay() {
        let registry = Registry::new();
        let config = AdmissionConfig {
            initial_limit: 2,
            min_limit: 2,
            max_limit: 2,
            target: Duration::from_millis(10),
        };
        let admission = Admission::new(config, &registry).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let a = admission.admit(7, far).await.unwrap();
        let b = admission.admit(7, far).await.unwrap();
        // Another cell has its own limit.
        let other = admission.admit(8, far).await.unwrap();
        // The third waits, and gets the permit the first frees.
        let waiting = tokio::spawn(async move {
            let admission = admission;
            let third = admission.admit(7, far).await.unwrap();
            let started = third.started;
            // The fourth finds both permits taken and waits in vain (four targets: a burst).
            let refused = admission.admit(7, far).await.err();
            drop(third);
            (started, refused, admission)
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let freed = Instant::now();
        a.done(Sample::Answered);
        let (third, refused, admission) = waiting.await.unwrap();
        assert!(third >= freed, "the waiter got the freed permit");
        let refused = refused.expect("refused after waiting");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(nid_proto::error::reason_of(&refused).as_deref(), Some("OVERLOADED"));
        assert_eq!(nid_proto::error::retry_delay(&refused), Some(Duration::from_millis(5)));
        drop((b, other));
        // Every permit came back.
        let st = admission.limiter(7).lock().in_flight;
        assert_eq!(st, 0);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(text.contains("nid_router_cell_refused_total{cell=\"7\",why=\"waited\"} 1"), "{text}");
    }
}
