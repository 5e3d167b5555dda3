//! `nid-loadtest`: populate a cluster with synthetic people and drive load at it through the router,
//! open loop (fixed rate, latency from the intended send time) or closed loop (fixed concurrency),
//! with HdrHistogram percentiles, throughput over time, errors by code and reason, and a JSON report.

mod driver;
mod people;
mod plot;
mod report;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "nid-loadtest", version, about = "Load-test harness for nid")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS to the router (without --tls-dir: plaintext, for `--insecure` routers).
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// Certificate directory (ca.pem and the named certificates, as `nidctl cert` writes them).
    #[arg(long, global = true, env = "NID_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The certificate enrolments, reads and echoes present.
    #[arg(long, global = true, default_value = "enroller-dev")]
    enroller_cert: String,
    /// The certificate authentications present.
    #[arg(long, global = true, default_value = "partner-dev-partner")]
    partner_cert: String,
}

/// How to reach the router: one dialer per certificate (or plaintext for both).
#[derive(Clone)]
struct Dialers {
    enroller: nid_support::tls::Dial,
    partner: nid_support::tls::Dial,
}

impl Dialers {
    fn new(args: &TlsArgs) -> anyhow::Result<Dialers> {
        use nid_support::tls::{Dial, Tls, TlsPaths};
        let Some(dir) = &args.tls_dir else {
            return Ok(Dialers { enroller: Dial::Plain, partner: Dial::Plain });
        };
        let load = |name: &str| -> anyhow::Result<Dial> {
            Ok(Dial::Tls(Tls::load(TlsPaths::in_dir(dir, name), &prometheus::Registry::new())?))
        };
        Ok(Dialers { enroller: load(&args.enroller_cert)?, partner: load(&args.partner_cert)? })
    }
}

static DIALERS: std::sync::OnceLock<Dialers> = std::sync::OnceLock::new();

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    Enroll,
    Get,
    Update,
    Mixed,
    Auth,
    Echo,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol N synthetic people (deterministic by seed) and save them with their UINs.
    Populate {
        /// Router address host:port.
        #[arg(long)]
        target: String,
        /// How many people.
        #[arg(long)]
        count: u64,
        /// Population seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Where to save the people (JSON lines).
        #[arg(long, default_value = "people.jsonl")]
        out: PathBuf,
    },
    /// Drive a scenario and report.
    Run {
        /// Router address host:port, or `etcd://host:port,host:port,...` to run the enroll scenario
        /// as puts of the same encoded enrolment requests against etcd (the comparison peer).
        #[arg(long)]
        target: String,
        /// What to send. echo is the no-op path (router -> cell leader, no Raft, no disk).
        #[arg(long, value_enum)]
        scenario: ScenarioArg,
        /// Weights of the mixed scenario, e.g. auth=90,get=5,enroll=5.
        #[arg(long, default_value = "get=90,enroll=10")]
        mix: String,
        /// Open loop: requests per second.
        #[arg(long, conflicts_with = "concurrency", required_unless_present = "concurrency")]
        rate: Option<u64>,
        /// Closed loop: requests in flight. A request refused as OVERLOADED is sent again after
        /// the delay the refusal gives, as a well-behaved client would (counted as "sent again",
        /// not as failed).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Open loop: after the measured duration at --rate, go on at RATE for SECONDS, measured
        /// too and reported phase by phase (repeatable: `--rate 7500 --duration 30 --then 1250:15`
        /// is an overload and the recovery after it).
        #[arg(long, value_name = "RATE:SECONDS", requires = "rate", value_parser = parse_phase)]
        then: Vec<(u64, u64)>,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Share of authentications sent with a wrong date of birth (they must come back "no"); they
        /// go to a fixed slice of the people (the last eighth), so lockouts they earn never hit right
        /// factors.
        #[arg(long, default_value_t = 0)]
        wrong_percent: u64,
        /// Partner API key for the auth scenario.
        #[arg(long, env = "NID_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// People file from `populate` (needed by get, mixed and auth).
        #[arg(long, default_value = "people.jsonl")]
        people: PathBuf,
        /// Seed for fresh enrolments (use another seed than the populated one).
        #[arg(long, default_value_t = 2)]
        seed: u64,
        /// Bound on requests in flight in open loop (beyond it sends are counted as not sent).
        #[arg(long, default_value_t = 20_000)]
        max_in_flight: usize,
        /// gRPC connections to the router.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// JSON report file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// SVG plot (throughput and p50/p99 per second); defaults to the report's path with .svg.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

/// Connections to `target`: a router address, or `etcd://` endpoints.
async fn connections(target: &str, n: usize) -> anyhow::Result<Vec<driver::Conn>> {
    if let Some(endpoints) = target.strip_prefix("etcd://") {
        let endpoints: Vec<&str> = endpoints.split(',').filter(|e| !e.is_empty()).collect();
        anyhow::ensure!(!endpoints.is_empty(), "--target etcd:// needs at least one host:port");
        let mut out = Vec::new();
        for _ in 0..n.max(1) {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(30));
            let client = etcd_client::Client::connect(&endpoints, Some(options))
                .await
                .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?;
            out.push(driver::Conn::Etcd(client.kv_client()));
        }
        return Ok(out);
    }
    Ok(clients(target, n).await?.into_iter().map(driver::Conn::Nid).collect())
}

async fn clients(target: &str, n: usize) -> anyhow::Result<Vec<driver::Clients>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let endpoint =
            nid_support::tls::Dial::endpoint(target)?.tcp_nodelay(true).timeout(Duration::from_secs(30));
        let dialers = DIALERS.get().context("dialers not set")?;
        let enroller = dialers.enroller.connect(endpoint.clone(), "router").await;
        let enroller = enroller.with_context(|| format!("connect to {target}"))?;
        let partner = match &dialers.partner {
            nid_support::tls::Dial::Plain => enroller.clone(),
            tls => tls.connect(endpoint, "router").await.with_context(|| format!("connect to {target}"))?,
        };
        out.push(driver::Clients::new(enroller, partner));
    }
    Ok(out)
}

async fn populate(
    target: String,
    count: u64,
    seed: u64,
    concurrency: usize,
    out: PathBuf,
) -> anyhow::Result<()> {
    let clients = clients(&target, 4).await?;
    let next = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..concurrency.max(1) {
        let (mut client, next, tx) = (clients[w % clients.len()].enroll.clone(), next.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let mut p = people::person(seed, i);
                let mut attempts = 0;
                let result = loop {
                    attempts += 1;
                    match client.enroll(driver::enroll_request(&p)).await {
                        Ok(r) => break Ok(r.into_inner().uin),
                        Err(e) if attempts < 5 && e.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        // Refused at a cell's limit before anything was sent: wait and go again.
                        Err(e) if attempts < 100 && e.code() == tonic::Code::ResourceExhausted => {
                            let wait = nid_proto::error::retry_delay(&e).unwrap_or(Duration::from_millis(20));
                            tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                        }
                        Err(e) => break Err(format!("{:?}: {}", e.code(), e.message())),
                    }
                };
                let result = result.map(|uin| {
                    p.uin = uin;
                    p
                });
                if tx.send(result).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out)?);
    let (mut done, mut failed) = (0u64, 0u64);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(p) => writeln!(file, "{}", serde_json::to_string(&p)?)?,
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("enrol failed: {e}");
                }
            }
        }
        done += 1;
        if done % (count / 10).max(1) == 0 {
            eprintln!("populate: {done}/{count}");
        }
    }
    file.flush()?;
    println!("populated {} of {count} people into {}", done - failed, out.display());
    anyhow::ensure!(failed == 0, "{failed} enrolments failed");
    Ok(())
}

/// `RATE:SECONDS`, both positive.
fn parse_phase(spec: &str) -> Result<(u64, u64), String> {
    let (rate, seconds) = spec.split_once(':').ok_or_else(|| format!("'{spec}' is not RATE:SECONDS"))?;
    let rate: u64 = rate.trim().parse().map_err(|_| format!("the rate in '{spec}' is not a number"))?;
    let seconds: u64 =
        seconds.trim().parse().map_err(|_| format!("the seconds in '{spec}' are not a number"))?;
    if rate == 0 || seconds == 0 || rate > 10_000_000 || seconds > 86_400 {
        return Err(format!("'{spec}': the rate must be 1..=10000000 and the seconds 1..=86400"));
    }
    Ok((rate, seconds))
}

fn load_people(path: &PathBuf) -> anyhow::Result<Arc<Vec<people::Person>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("open {} (run populate first)", path.display()))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        out.push(serde_json::from_str(&line?)?);
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no people", path.display());
    Ok(Arc::new(out))
}

fn load_uins(path: &PathBuf) -> anyhow::Result<Arc<Vec<String>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("open {} (run populate first)", path.display()))?;
    let mut uins = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let p: people::Person = serde_json::from_str(&line?)?;
        uins.push(p.uin);
    }
    anyhow::ensure!(!uins.is_empty(), "{} holds no people", path.display());
    Ok(Arc::new(uins))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = DIALERS.set(Dialers::new(&cli.tls)?);
    match cli.command {
        Command::Populate { target, count, seed, concurrency, out } => {
            populate(target, count, seed, concurrency, out).await
        }
        Command::Run {
            target,
            scenario,
            mix,
            rate,
            concurrency,
            then,
            duration,
            warmup,
            people,
            api_key,
            wrong_percent,
            seed,
            max_in_flight,
            connections: n_connections,
            report: report_file,
            plot: plot_file,
        } => {
            anyhow::ensure!(wrong_percent <= 100, "--wrong-percent must be 0..=100");
            let etcd = target.starts_with("etcd://");
            anyhow::ensure!(
                !etcd || matches!(scenario, ScenarioArg::Enroll),
                "an etcd target runs only --scenario enroll (puts of the same encoded enrolment requests)"
            );
            let next = Arc::new(AtomicU64::new(0));
            let build = |name: &str| -> anyhow::Result<driver::Scenario> {
                Ok(match name {
                    "enroll" => driver::Scenario::Enroll { seed, next: next.clone() },
                    "get" => driver::Scenario::Get { uins: load_uins(&people)? },
                    "update" => {
                        let people = load_people(&people)?;
                        let versions = Arc::new((0..people.len()).map(|_| AtomicU64::new(1)).collect());
                        driver::Scenario::Update { people, versions }
                    }
                    "auth" => {
                        let key = api_key.as_deref().context("auth needs --api-key (or NID_API_KEY)")?;
                        let bearer =
                            format!("Bearer {}", key.trim()).parse().context("the API key is not ASCII")?;
                        let run = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)?
                            .as_nanos() as u64;
                        let people = load_people(&people)?;
                        anyhow::ensure!(
                            people.len() >= 2 || wrong_percent == 0 || wrong_percent == 100,
                            "--wrong-percent between 1 and 99 needs at least two people (right and wrong factors go to different people)"
                        );
                        driver::Scenario::Auth { people, bearer, run, wrong_percent }
                    }
                    _ => {
                        // The no-op path carries a payload the size of an enrolment request.
                        let size =
                            prost::Message::encoded_len(&driver::enroll_request(&people::person(seed, 0)));
                        driver::Scenario::Echo { payload: Arc::new(vec![0x5a; size]) }
                    }
                })
            };
            let (name, scenario) = match scenario {
                ScenarioArg::Enroll => ("enroll".to_owned(), build("enroll")?),
                ScenarioArg::Get => ("get".to_owned(), build("get")?),
                ScenarioArg::Update => ("update".to_owned(), build("update")?),
                ScenarioArg::Auth => ("auth".to_owned(), build("auth")?),
                ScenarioArg::Echo => ("echo".to_owned(), build("echo")?),
                ScenarioArg::Mixed => {
                    let weights = driver::parse_mix(&mix).map_err(|e| anyhow::anyhow!(e))?;
                    let mut parts = Vec::new();
                    let mut total = 0;
                    for (part, weight) in &weights {
                        total += weight;
                        parts.push((total, build(part)?));
                    }
                    let label = weights.iter().map(|(n, w)| format!("{n}={w}")).collect::<Vec<_>>().join(",");
                    (format!("mixed({label})"), driver::Scenario::Mixed { parts: Arc::new(parts) })
                }
            };
            let (mode, load, amount) = match (rate, concurrency) {
                (Some(r), _) => ("open", driver::Load::Rate(r, then.clone()), r),
                (None, Some(c)) => ("closed", driver::Load::Concurrency(c), c as u64),
                (None, None) => anyhow::bail!("give --rate or --concurrency"),
            };
            let conns = connections(&target, n_connections).await?;
            let recorder = driver::run(
                conns,
                scenario,
                load,
                Duration::from_secs(warmup),
                Duration::from_secs(duration),
                max_in_flight,
            )
            .await?;
            let mut schedule = Vec::new();
            if !then.is_empty() {
                schedule.push((amount, duration));
                schedule.extend(then.iter().copied());
            }
            let window = duration + then.iter().map(|(_, s)| s).sum::<u64>();
            let report = report::Report::new(
                &name,
                if etcd { "etcd" } else { "nid" },
                mode,
                amount,
                window as f64,
                &recorder,
                &schedule,
            );
            print!("{}", report.summary());
            if let Some(path) = &report_file {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
                println!("report {}", path.display());
            }
            if let Some(path) = plot_file.or_else(|| report_file.map(|r| r.with_extension("svg"))) {
                std::fs::write(&path, plot::svg(&report))?;
                println!("plot {}", path.display());
            }
            Ok(())
        }
    }
}
