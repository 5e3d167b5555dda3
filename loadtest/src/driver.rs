//! The load drivers. Open loop sends on a fixed schedule and measures every latency from the
//! request's INTENDED send time, so a stalled server shows up as latency instead of silently
//! lowering the offered load (no coordinated omission). Closed loop keeps C requests in flight.

use crate::people::{Person, person};
use crate::report::Recorder;
use nid_proto::error::reason_of;
use nid_proto::v1::authentication_client::AuthenticationClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{
    AuthFactors, AuthenticateRequest, DemographicFactor, Demographics, EnrollRequest, GetIdentityRequest,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// What each request does.
#[derive(Clone)]
pub enum Scenario {
    /// Enrol fresh synthetic people (seeded; indexes from a shared counter).
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
    /// `get_percent` reads, the rest enrolments.
    Mixed {
        /// Share of reads, 0..=100.
        get_percent: u64,
        /// Population seed for enrolments.
        seed: u64,
        /// Next person index.
        next: Arc<AtomicU64>,
        /// The UINs to read.
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
}

/// The clients of one connection to the router.
#[derive(Clone)]
pub struct Clients {
    /// Enrollment.
    pub enroll: EnrollmentClient<Channel>,
    /// Authentication.
    pub auth: AuthenticationClient<Channel>,
}

impl Clients {
    /// Both clients over one channel.
    pub fn new(channel: Channel) -> Clients {
        Clients { enroll: EnrollmentClient::new(channel.clone()), auth: AuthenticationClient::new(channel) }
    }
}

/// How much load.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Open loop: requests per second.
    Rate(u64),
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

/// Sends one request of the scenario; `k` picks the item.
pub async fn one(clients: &mut Clients, scenario: &Scenario, k: u64) -> Result<Outcome, String> {
    let client = &mut clients.enroll;
    let enroll =
        |seed: u64, next: &AtomicU64| enroll_request(&person(seed, next.fetch_add(1, Ordering::Relaxed)));
    let result = match scenario {
        Scenario::Enroll { seed, next } => client.enroll(enroll(*seed, next)).await.map(|_| Outcome::Done),
        Scenario::Get { uins } => {
            let id = uins[(k % uins.len() as u64) as usize].clone();
            client.get_identity(GetIdentityRequest { id }).await.map(|_| Outcome::Done)
        }
        Scenario::Mixed { get_percent, seed, next, uins } => {
            if k.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 100 < *get_percent {
                let id = uins[(k % uins.len() as u64) as usize].clone();
                client.get_identity(GetIdentityRequest { id }).await.map(|_| Outcome::Done)
            } else {
                client.enroll(enroll(*seed, next)).await.map(|_| Outcome::Done)
            }
        }
        Scenario::Auth { people, bearer, run, wrong_percent } => {
            let p = &people[(k % people.len() as u64) as usize];
            let wrong = k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % 100 < *wrong_percent;
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
            let mismatch = vec![nid_proto::v1::AuthReason::DemographicMismatch as i32];
            match clients.auth.authenticate(request).await {
                Ok(r) => {
                    let d = r.into_inner().decision.unwrap_or_default();
                    return match (wrong, d.authenticated) {
                        (false, true) => Ok(Outcome::Yes),
                        (true, false) if d.reasons == mismatch => Ok(Outcome::No),
                        (true, true) => Err("auth yes for wrong factors".into()),
                        (_, false) => Err(format!("auth no {:?}", d.reasons)),
                    };
                }
                Err(e) => Err(e),
            }
        }
    };
    result.map_err(|s| error_kind(&s))
}

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
    clients: Vec<Clients>,
    scenario: Scenario,
    load: Load,
    warmup: Duration,
    duration: Duration,
    max_in_flight: usize,
) -> anyhow::Result<Recorder> {
    anyhow::ensure!(!clients.is_empty(), "no clients");
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    let dropped = Arc::new(AtomicU64::new(0));
    let producer = {
        let (clients, scenario, dropped) = (clients.clone(), scenario.clone(), dropped.clone());
        tokio::spawn(async move {
            match load {
                Load::Rate(rate) => {
                    let in_flight = Arc::new(AtomicUsize::new(0));
                    let mut i = 0u64;
                    loop {
                        let at = intended(start, i, rate);
                        if at >= end {
                            break;
                        }
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
                        let (scenario, tx) = (scenario.clone(), tx.clone());
                        workers.push(tokio::spawn(async move {
                            let mut k = w as u64;
                            while Instant::now() < end {
                                let sent = Instant::now();
                                let result = one(&mut client, &scenario, k).await;
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
                continue;
            }
            let second = d.intended.duration_since(measure_from).as_secs() as usize;
            let latency = d.finished.duration_since(d.intended).as_micros() as u64;
            if let Ok(outcome) = &d.result {
                recorder.auth(*outcome);
            }
            recorder.complete(second, d.result.map(|_| latency));
        }
    };
    // The producer and its request tasks hold the only senders: the channel closes when all finish.
    let (produced, ()) = tokio::join!(producer, collect);
    produced?;
    recorder.dropped = dropped.load(Ordering::Relaxed);
    Ok(recorder)
}

#[cfg(test)]
mod tests {
    use super::*;

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
