//! The load drivers. Open loop sends on a fixed schedule and measures every latency from the
//! request's INTENDED send time, so a stalled server shows up as latency instead of silently
//! lowering the offered load (no coordinated omission). Closed loop keeps C requests in flight.

use crate::people::{Person, person};
use crate::report::{Outcome, Recorder};
use nid_proto::error::reason_of;
use nid_proto::v1::authentication_client::AuthenticationClient;
use nid_proto::v1::diagnostics_client::DiagnosticsClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{
    AuthFactors, AuthenticateRequest, DemographicFactor, Demographics, EchoRequest, EnrollRequest,
    GetIdentityRequest, UpdateIdentityRequest,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// What each request does.
#[derive(Clone)]
pub enum Scenario {
    /// Enrol fresh synthetic people (seeded; indexes from a shared counter). Against etcd: put the
    /// same encoded enrolment request under a key of its RID.
    Enroll {
        /// Population seed.
        seed: u64,
        /// Next person index.
        next: Arc<AtomicU64>,
    },
    /// Read populated identities by UIN.
    Get {
        /// The UINs.
        uins: Arc<Vec<String>>,
    },
    /// Authenticate populated people with a demographic factor (name and date of birth, exact) as
    /// a partner; every request has a fresh transaction id. `wrong_percent` of the requests carry a
    /// wrong date of birth and must come back "no" (DEMOGRAPHIC_MISMATCH); any other outcome, a
    /// "no" for right factors or a "yes" for wrong ones, counts as an error.
    Auth {
        /// The populated people.
        people: Arc<Vec<Person>>,
        /// `authorization` header value: `Bearer <partner API key>`.
        bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        /// Distinguishes this run's transaction ids from earlier runs'.
        run: u64,
        /// Share of requests with wrong factors, 0..=100.
        wrong_percent: u64,
    },
    /// Versioned updates of populated people (a new e-mail each time). The harness remembers each
    /// person's version (1 after populate); a VERSION_MISMATCH (another writer, an earlier run)
    /// takes the current version from the answer and counts as an error.
    Update {
        /// The populated people.
        people: Arc<Vec<Person>>,
        /// The version each person is believed to be at.
        versions: Arc<Vec<AtomicU64>>,
    },
    /// The no-op path: Diagnostics.Echo through the router to the leader of the bucket's cell,
    /// without Raft or disk. Buckets go round so every cell answers its share.
    Echo {
        /// The payload (sized like an enrolment request).
        payload: Arc<Vec<u8>>,
    },
    /// A weighted mix of the other scenarios (`--mix auth=90,get=5,enroll=5`).
    Mixed {
        /// (cumulative weight, scenario), ascending; the last weight is the total.
        parts: Arc<Vec<(u64, Scenario)>>,
    },
}

impl Scenario {
    /// The scenario request `k` runs: a mix picks a part by a hash of `k`, so the shares hold in
    /// every stretch of the run.
    pub fn pick(&self, k: u64) -> &Scenario {
        match self {
            Scenario::Mixed { parts } => {
                let total = parts.last().map(|(w, _)| *w).unwrap_or(1).max(1);
                let x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) % total;
                parts.iter().find(|(w, _)| x < *w).map(|(_, s)| s).unwrap_or(self)
            }
            other => other,
        }
    }
}

/// Parses `--mix name=weight,...` (names: enroll, get, auth; weights are relative).
pub fn parse_mix(spec: &str) -> Result<Vec<(String, u64)>, String> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, weight) =
            part.split_once('=').ok_or_else(|| format!("--mix: '{part}' is not name=weight"))?;
        let name = name.trim();
        if !["enroll", "get", "auth"].contains(&name) {
            return Err(format!("--mix: unknown scenario '{name}' (enroll, get, auth)"));
        }
        let weight: u64 =
            weight.trim().parse().map_err(|_| format!("--mix: weight of '{name}' is not a number"))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("--mix: '{name}' given twice"));
        }
        if weight > 0 {
            out.push((name.to_owned(), weight));
        }
    }
    if out.is_empty() {
        return Err("--mix: no scenario with a weight above 0".into());
    }
    Ok(out)
}

/// The clients of one connection to the router.
#[derive(Clone)]
pub struct Clients {
    /// Enrollment.
    pub enroll: EnrollmentClient<Channel>,
    /// Authentication.
    pub auth: AuthenticationClient<Channel>,
    /// Diagnostics (echo).
    pub diagnostics: DiagnosticsClient<Channel>,
}

impl Clients {
    /// Authentication over `partner`, everything else over `enroller` (over TLS each channel
    /// presents the certificate of its role; in plaintext they may be one channel).
    pub fn new(enroller: Channel, partner: Channel) -> Clients {
        Clients {
            enroll: EnrollmentClient::new(enroller.clone()),
            auth: AuthenticationClient::new(partner),
            diagnostics: DiagnosticsClient::new(enroller),
        }
    }
}

/// One connection of the harness: to a nid router, or to an etcd cluster (the comparison peer).
#[derive(Clone)]
pub enum Conn {
    /// A nid router.
    Nid(Clients),
    /// etcd's KV API.
    Etcd(etcd_client::KvClient),
}

/// How much load.
#[derive(Debug, Clone)]
pub enum Load {
    /// Open loop: requests per second for the warm-up and the measured duration, then each
    /// further (rate, seconds) phase in turn, measured too (an overload and the recovery after it).
    Rate(u64, Vec<(u64, u64)>),
    /// Closed loop: requests in flight.
    Concurrency(usize),
}

/// The enrolment request for a synthetic person.
pub fn enroll_request(p: &Person) -> EnrollRequest {
    EnrollRequest {
        rid: p.rid.clone(),
        demographics: Some(Demographics {
            full_name: p.name.clone(),
            date_of_birth: p.dob.clone(),
            gender: p.gender,
            phone: p.phone.clone(),
            email: p.email.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn error_kind(status: &tonic::Status) -> String {
    match reason_of(status) {
        Some(reason) => format!("{:?}/{reason}", status.code()),
        None => format!("{:?}", status.code()),
    }
}

fn etcd_error_kind(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("etcd {:?}", s.code()),
        etcd_client::Error::TransportError(_) => "etcd transport".into(),
        _ => "etcd other".into(),
    }
}

/// Sends one request of the scenario; `k` picks the item.
pub async fn one(conn: &mut Conn, scenario: &Scenario, k: u64) -> Result<Outcome, String> {
    attempt(conn, scenario, k, &mut None).await
}

/// [`one`], leaving the delay a RESOURCE_EXHAUSTED answer asked for in `retry_after`.
async fn attempt(
    conn: &mut Conn,
    scenario: &Scenario,
    k: u64,
    retry_after: &mut Option<Duration>,
) -> Result<Outcome, String> {
    let scenario = scenario.pick(k);
    let clients = match conn {
        Conn::Nid(c) => c,
        Conn::Etcd(kv) => {
            let Scenario::Enroll { seed, next } = scenario else {
                return Err("etcd runs only the enroll scenario".into());
            };
            let request = enroll_request(&person(*seed, next.fetch_add(1, Ordering::Relaxed)));
            let key = format!("/nid-loadtest/{}", request.rid);
            return kv
                .put(key, prost::Message::encode_to_vec(&request), None)
                .await
                .map(|_| Outcome::Done)
                .map_err(|e| etcd_error_kind(&e));
        }
    };
    let client = &mut clients.enroll;
    let result = match scenario {
        Scenario::Enroll { seed, next } => client
            .enroll(enroll_request(&person(*seed, next.fetch_add(1, Ordering::Relaxed))))
            .await
            .map(|_| Outcome::Done),
        Scenario::Get { uins } => {
            let id = uins[(k % uins.len() as u64) as usize].clone();
            client.get_identity(GetIdentityRequest { id }).await.map(|_| Outcome::Done)
        }
        Scenario::Update { people, versions } => {
            let i = (k % people.len() as u64) as usize;
            let p = &people[i];
            let expected = versions[i].load(Ordering::Relaxed);
            let mut demographics = enroll_request(p).demographics.unwrap_or_default();
            demographics.email = format!("update-{k}@example.org");
            let request = UpdateIdentityRequest {
                uin: p.uin.clone(),
                expected_version: expected,
                demographics: Some(demographics),
                ..Default::default()
            };
            match client.update_identity(request).await {
                Ok(r) => {
                    versions[i].store(r.into_inner().version, Ordering::Relaxed);
                    Ok(Outcome::Done)
                }
                Err(e) => {
                    let current =
                        nid_proto::error::metadata_of(&e, "current_version").and_then(|v| v.parse().ok());
                    if let Some(v) = current {
                        versions[i].store(v, Ordering::Relaxed);
                    }
                    Err(e)
                }
            }
        }
        Scenario::Echo { payload } => {
            let request = EchoRequest { payload: payload.to_vec(), bucket: (k % 16384) as u32 };
            match clients.diagnostics.echo(request).await {
                Ok(r) if r.get_ref().payload.len() == payload.len() => Ok(Outcome::Done),
                Ok(_) => return Err("echo returned another payload".into()),
                Err(e) => Err(e),
            }
        }
        Scenario::Mixed { .. } => return Err("a mix inside a mix".into()),
        Scenario::Auth { people, bearer, run, wrong_percent } => {
            let wrong = k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % 100 < *wrong_percent;
            let p = &people[auth_person(people.len(), *wrong_percent, wrong, k)];
            // A real date that is not the person's: the same day one year later.
            let dob = if wrong {
                let year: u32 = p.dob.get(..4).and_then(|y| y.parse().ok()).unwrap_or(1970);
                format!("{}{}", year + 1, p.dob.get(4..).unwrap_or("-01-01")).replace("-02-29", "-02-28")
            } else {
                p.dob.clone()
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let mut request = tonic::Request::new(AuthenticateRequest {
                id: p.uin.clone(),
                transaction_id: format!("lt-{run:x}-{k}"),
                request_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
                factors: Some(AuthFactors {
                    demographic: Some(DemographicFactor {
                        full_name: p.name.clone(),
                        date_of_birth: dob,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            });
            request.metadata_mut().insert("authorization", bearer.clone());
            // A wrong factor is refused as a mismatch, or, once a person has failed too often in a
            // row (in this run or an earlier one), by the failure lockout: both are the right "no".
            let mismatch = vec![nid_proto::v1::AuthReason::DemographicMismatch as i32];
            let locked = vec![nid_proto::v1::AuthReason::TooManyFailures as i32];
            match clients.auth.authenticate(request).await {
                Ok(r) => {
                    let d = r.into_inner().decision.unwrap_or_default();
                    return match (wrong, d.authenticated) {
                        (false, true) => Ok(Outcome::Yes),
                        (true, false) if d.reasons == mismatch || d.reasons == locked => Ok(Outcome::No),
                        (true, true) => Err("auth yes for wrong factors".into()),
                        (_, false) => Err(format!("auth no {:?}", d.reasons)),
                    };
                }
                Err(e) => Err(e),
            }
        }
    };
    result.map_err(|s| {
        if s.code() == tonic::Code::ResourceExhausted {
            *retry_after = nid_proto::error::retry_delay(&s);
        }
        error_kind(&s)
    })
}

/// The index of the person authentication `k` uses. People sent wrong factors are kept apart from
/// people sent right ones: whenever any request carries wrong factors, they go to the last eighth of
/// the file (at least one person), the same slice for every `wrong_percent`, so the failure lockout
/// they earn, in this run or an earlier one, never turns a right factor into a "no". Needs at least
/// two people when `0 < wrong_percent < 100`.
pub fn auth_person(people: usize, wrong_percent: u64, wrong: bool, k: u64) -> usize {
    let n = people as u64;
    let wrong_people = match wrong_percent {
        0 => 0,
        100.. => n,
        _ => (n / 8).max(1).min(n.saturating_sub(1)),
    };
    let index =
        if wrong { n - wrong_people + k % wrong_people.max(1) } else { k % (n - wrong_people).max(1) };
    index.min(n.saturating_sub(1)) as usize
}

/// The error kind of a request the router refused because the cell was at its limit.
const OVERLOADED: &str = "ResourceExhausted/OVERLOADED";
/// How long a closed-loop worker waits before sending a refused request again, when the refusal
/// names no delay.
const CLOSED_LOOP_BACKOFF: Duration = Duration::from_millis(20);

/// The intended send time of request `i` at `rate` per second after `start`.
pub fn intended(start: Instant, i: u64, rate: u64) -> Instant {
    start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1))
}

struct Done {
    intended: Instant,
    finished: Instant,
    result: Result<Outcome, String>,
}

/// Runs the load for `warmup + duration`, measuring only after the warmup.
pub async fn run(
    clients: Vec<Conn>,
    scenario: Scenario,
    load: Load,
    warmup: Duration,
    duration: Duration,
    max_in_flight: usize,
) -> anyhow::Result<Recorder> {
    anyhow::ensure!(!clients.is_empty(), "no clients");
    let start = Instant::now();
    let measure_from = start + warmup;
    // Open loop: (from, until, rate) segments; the first covers the warm-up and the duration.
    let mut segments = Vec::new();
    let mut end = measure_from + duration;
    if let Load::Rate(rate, then) = &load {
        segments.push((start, end, *rate));
        for (rate, seconds) in then {
            let until = end + Duration::from_secs(*seconds);
            segments.push((end, until, *rate));
            end = until;
        }
    }
    let phase_of = {
        let bounds: Vec<Instant> = segments.iter().map(|(_, until, _)| *until).collect();
        move |at: Instant| bounds.iter().position(|b| at < *b).unwrap_or(0)
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    let dropped = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let producer = {
        let (clients, scenario, dropped, retried) =
            (clients.clone(), scenario.clone(), dropped.clone(), retried.clone());
        let segments = segments.clone();
        tokio::spawn(async move {
            match load {
                Load::Rate(..) => {
                    let in_flight = Arc::new(AtomicUsize::new(0));
                    let mut i = 0u64;
                    let mut segment = 0;
                    let mut j = 0u64;
                    while let Some(&(from, until, rate)) = segments.get(segment) {
                        let at = intended(from, j, rate);
                        if at >= until {
                            segment += 1;
                            j = 0;
                            continue;
                        }
                        j += 1;
                        tokio::time::sleep_until(at.into()).await;
                        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                            if at >= measure_from {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            i += 1;
                            continue;
                        }
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let mut client = clients[(i % clients.len() as u64) as usize].clone();
                        let (scenario, tx, in_flight) = (scenario.clone(), tx.clone(), in_flight.clone());
                        tokio::spawn(async move {
                            let result = one(&mut client, &scenario, i).await;
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            let _ = tx.send(Done { intended: at, finished: Instant::now(), result });
                        });
                        i += 1;
                    }
                }
                Load::Concurrency(c) => {
                    let mut workers = Vec::new();
                    for w in 0..c {
                        let mut client = clients[w % clients.len()].clone();
                        let (scenario, tx, retried) = (scenario.clone(), tx.clone(), retried.clone());
                        workers.push(tokio::spawn(async move {
                            let mut k = w as u64;
                            while Instant::now() < end {
                                let sent = Instant::now();
                                let mut hint = None;
                                let mut result = attempt(&mut client, &scenario, k, &mut hint).await;
                                // A well-behaved client: a request the router refused for an
                                // overloaded cell waits the delay the answer gives and goes again;
                                // its latency counts from the first send.
                                while matches!(&result, Err(kind) if kind == OVERLOADED)
                                    && Instant::now() < end
                                {
                                    retried.fetch_add(1, Ordering::Relaxed);
                                    let wait = hint.take().unwrap_or(CLOSED_LOOP_BACKOFF);
                                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                                    result = attempt(&mut client, &scenario, k, &mut hint).await;
                                }
                                let _ = tx.send(Done { intended: sent, finished: Instant::now(), result });
                                k += c as u64;
                            }
                        }));
                    }
                    for w in workers {
                        let _ = w.await;
                    }
                }
            }
        })
    };
    let mut recorder = Recorder::new()?;
    let collect = async {
        while let Some(d) = rx.recv().await {
            if d.intended < measure_from {
                // Due in the warm-up: not measured, but an answer inside the window is part of
                // what the server completed in it.
                if d.finished >= measure_from && d.finished < end {
                    let second = d.finished.duration_since(measure_from).as_secs() as usize;
                    recorder.complete_unmeasured(second, d.result.is_ok());
                }
                continue;
            }
            // Bucketed by when the answer came, not when the request was due: a server that
            // falls behind shows fewer completions per second and a backlog after the window.
            let second = if d.finished < end {
                Some(d.finished.duration_since(measure_from).as_secs() as usize)
            } else {
                recorder.drain_seconds = recorder.drain_seconds.max((d.finished - end).as_secs_f64());
                None
            };
            let latency = d.finished.duration_since(d.intended).as_micros() as u64;
            if let Ok(outcome) = &d.result {
                recorder.auth(*outcome);
            }
            let result = d.result.map(|_| latency);
            if segments.len() > 1 {
                recorder.phase(phase_of(d.intended), &result);
            }
            recorder.complete(second, result);
        }
    };
    // The producer and its request tasks hold the only senders: the channel closes when all finish.
    let (produced, ()) = tokio::join!(producer, collect);
    produced?;
    recorder.dropped = dropped.load(Ordering::Relaxed);
    recorder.retried = retried.load(Ordering::Relaxed);
    Ok(recorder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_and_right_factors_go_to_disjoint_people() {
        for (people, percent) in [(2usize, 10u64), (10, 10), (1000, 25), (7, 50), (5, 99)] {
            let wrong: std::collections::HashSet<usize> =
                (0..10_000).map(|k| auth_person(people, percent, true, k)).collect();
            let right: std::collections::HashSet<usize> =
                (0..10_000).map(|k| auth_person(people, percent, false, k)).collect();
            assert!(wrong.is_disjoint(&right), "{people} {percent}");
            assert_eq!(wrong.len() + right.len(), people, "{people} {percent}: everyone is used");
            assert!(wrong.iter().chain(&right).all(|i| *i < people));
        }
        // The slice does not depend on the share: a run with another share never sends right
        // factors to someone an earlier run locked out.
        for percent in [1, 10, 25, 50, 99] {
            let wrong: std::collections::HashSet<usize> =
                (0..1000).map(|k| auth_person(64, percent, true, k)).collect();
            assert_eq!(wrong, (56..64).collect(), "{percent}");
        }
        assert_eq!(auth_person(1, 0, false, 5), 0);
        assert_eq!(auth_person(1, 100, true, 5), 0);
    }

    #[test]
    fn the_open_loop_schedule_is_fixed_and_exact() {
        let start = Instant::now();
        assert_eq!(intended(start, 0, 1000), start);
        assert_eq!(intended(start, 1000, 1000) - start, Duration::from_secs(1));
        assert_eq!(intended(start, 3, 4) - start, Duration::from_millis(750));
        // The schedule does not depend on when earlier requests finished.
        assert_eq!(intended(start, 500, 250) - start, Duration::from_secs(2));
    }
}
