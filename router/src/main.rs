//! `nid-router`: the stateless router. It validates requests, computes their bucket from the request
//! alone, and forwards them to the owning cell's leader using a routing table cached from the
//! control cell (kept when the control cell is unreachable). It holds no durable state.

/// Allocation through mimalloc: see ARCHITECTURE.md, "Measured departures from the chosen
/// dependencies".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod access;
mod admin;
mod admission;
mod descriptors;
mod metrics;
mod partners;
mod quota;
mod routing;
mod service;

use clap::Parser;
use nid_proto::v1::admin_server::AdminServer;
use nid_proto::v1::authentication_server::AuthenticationServer;
use nid_proto::v1::diagnostics_server::DiagnosticsServer;
use nid_proto::v1::enrollment_server::EnrollmentServer;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// nid's stateless router.
#[derive(Debug, Parser)]
#[command(name = "nid-router", version)]
struct Flags {
    /// Public gRPC listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Control-cell replica addresses, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    control: Vec<String>,
    /// This router's availability zone (or NID_ZONE).
    #[arg(long, env = "NID_ZONE", default_value = "zone-a")]
    zone: String,
    /// Prometheus metrics listen address (HTTP, GET /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Routing-table refresh period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    refresh_ms: u64,
    /// Do not watch the control cell; only fetch the table every --refresh-ms (tests use this to
    /// hold a stale table on purpose).
    #[arg(long)]
    no_watch: bool,
    /// File with the partner-credential key (64+ hex characters): API-key secrets are stored in the
    /// control cell only as HMAC-SHA256 under it. Without it a development key is used (loudly).
    #[arg(long)]
    partner_key_file: Option<std::path::PathBuf>,
    /// File with the admin token (64+ hex characters) that partner management and audit
    /// verification require; without it those calls are refused.
    #[arg(long)]
    admin_token_file: Option<std::path::PathBuf>,
    /// Do not serve the Diagnostics echo (the no-op path the load-test harness measures).
    #[arg(long)]
    disable_echo: bool,
    /// Runtime threads: 1 runs everything on one thread (a current-thread runtime: the least CPU
    /// per request, measured about a third less than the multi-threaded runtime on 2 shared cores);
    /// N > 1 a multi-threaded runtime of N workers; 0 one worker per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Log lines as `text` or `json` (one object per line, for log shippers).
    #[arg(long, default_value = "text")]
    log_format: nid_support::logging::LogFormat,
    /// Benchmarks only: assign no request id to client calls that bring none, so that a retried
    /// write can apply twice or be answered as failed after it applied. Measures what the
    /// exactly-once bookkeeping costs (make bench); never in production.
    #[arg(long, hide = true)]
    unsafe_no_request_ids: bool,
    /// Requests forwarded at once; beyond it the router answers RESOURCE_EXHAUSTED / OVERLOADED
    /// with a retry delay at once instead of queueing (memory stays bounded under overload).
    #[arg(long, default_value_t = 8192)]
    max_in_flight: usize,
    /// The mean round trip to a cell the router aims to stay under: each cell's limit of requests
    /// in flight adapts to it; requests beyond the limit wait briefly (up to 4x this for a burst,
    /// a third of it once the cell is congested) and the rest get RESOURCE_EXHAUSTED / OVERLOADED with
    /// a retry delay of half this.
    #[arg(long, default_value_t = 50)]
    cell_latency_target_ms: u64,
    /// The fewest requests in flight to one cell the adaptive limit allows.
    #[arg(long, default_value_t = 16)]
    cell_min_in_flight: usize,
    /// The most requests in flight to one cell the adaptive limit allows.
    #[arg(long, default_value_t = 1024)]
    cell_max_in_flight: usize,
    /// This router's share of every partner's rate limit: with N routers behind a load balancer
    /// that spreads evenly, 1/N keeps each partner's cluster-wide rate at its configured limit.
    #[arg(long, default_value_t = 1.0)]
    quota_share: f64,
    /// Serve and dial plaintext gRPC: no certificates, every client accepted. Development only.
    #[arg(long)]
    insecure: bool,
    /// Directory with `ca.pem` and this router's `<--tls-name>.pem/.key` (as `nidctl cert`
    /// writes them).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// The router's certificate name in --tls-dir (`router` or `router-<name>`).
    #[arg(long, default_value = "router")]
    tls_name: String,
    /// The cluster CA certificate (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The router's certificate (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// The router's private key (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    nid_support::logging::init(
        flags.log_format,
        &[("role", "router".into()), ("zone", flags.zone.clone().into())],
    );
    if !(flags.quota_share >= 1e-6 && flags.quota_share <= 1.0) {
        eprintln!("nid-router: --quota-share must be between 0.000001 and 1");
        return ExitCode::from(2);
    }
    if !(1..=1_000_000).contains(&flags.max_in_flight) {
        eprintln!("nid-router: --max-in-flight must be between 1 and 1000000");
        return ExitCode::from(2);
    }
    if !(1..=60_000).contains(&flags.cell_latency_target_ms) {
        eprintln!("nid-router: --cell-latency-target-ms must be between 1 and 60000");
        return ExitCode::from(2);
    }
    if flags.cell_min_in_flight == 0
        || flags.cell_min_in_flight > flags.cell_max_in_flight
        || flags.cell_max_in_flight > 1_000_000
    {
        eprintln!(
            "nid-router: --cell-min-in-flight must be at least 1 and at most --cell-max-in-flight, itself at most 1000000"
        );
        return ExitCode::from(2);
    }
    let tls = match nid_support::tls::resolve_paths(
        flags.tls_dir.clone(),
        flags.tls_ca.clone(),
        flags.tls_cert.clone(),
        flags.tls_key.clone(),
        &flags.tls_name,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nid-router: {e}");
            return ExitCode::from(2);
        }
    };
    match (&tls, flags.insecure) {
        (Some(_), true) => {
            eprintln!("nid-router: --insecure and the TLS settings exclude each other");
            return ExitCode::from(2);
        }
        (None, false) => {
            eprintln!(
                "nid-router: mutual TLS needs --tls-dir (with ca.pem and router.pem/.key) or \
                 --tls-ca/--tls-cert/--tls-key; --insecure serves plaintext to anyone (development only)"
            );
            return ExitCode::from(2);
        }
        _ => {}
    }
    let runtime = match nid_support::runtime(flags.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nid-router: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(flags, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nid-router: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(flags: Flags, tls: Option<nid_support::tls::TlsPaths>) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::RouterMetrics::new()?);
    let tls = match tls {
        Some(paths) => {
            let tls = nid_support::tls::Tls::load(paths, metrics.registry())?;
            anyhow::ensure!(
                matches!(tls.identity(), nid_support::tls::Peer::Router(_)),
                "the certificate names {}, not a router",
                tls.identity()
            );
            tls.spawn_reloader();
            Some(tls)
        }
        None => {
            tracing::warn!("--insecure: plaintext gRPC, every client accepted (DEVELOPMENT ONLY)");
            None
        }
    };
    let dial = tls.clone().map_or(nid_support::tls::Dial::Plain, nid_support::tls::Dial::Tls);
    let access =
        nid_support::access::AccessLayer::new(tls.as_ref().map(|_| access::policy()), metrics.registry())?;
    let admission = admission::Admission::new(
        admission::AdmissionConfig {
            initial_limit: flags.cell_min_in_flight.max(64).min(flags.cell_max_in_flight),
            min_limit: flags.cell_min_in_flight,
            max_limit: flags.cell_max_in_flight,
            target: Duration::from_millis(flags.cell_latency_target_ms),
        },
        metrics.registry(),
    )?;
    let mut router =
        routing::Router::new(flags.control.clone(), metrics.clone(), flags.max_in_flight, dial, admission);
    if flags.unsafe_no_request_ids {
        tracing::warn!("--unsafe-no-request-ids: retried writes may apply twice (benchmarks only)");
        router.assign_request_ids = false;
    }
    let router = Arc::new(router);
    router.spawn_refresher(Duration::from_millis(flags.refresh_ms.max(50)), !flags.no_watch);
    let partner_key = match &flags.partner_key_file {
        Some(path) => nid_support::secret::read_secret_file(path)?,
        None => {
            tracing::warn!(
                "no --partner-key-file: using the DEVELOPMENT partner-credential key (never in production)"
            );
            b"nid dev partner-credential key; never in production".to_vec()
        }
    };
    let admin_token = match &flags.admin_token_file {
        Some(path) => Some(nid_support::secret::AdminToken::from_file(path)?),
        None => None,
    };
    let quotas = quota::Quotas::new(flags.quota_share, metrics.registry())?;
    let partners = Arc::new(partners::Partners::new(&partner_key, quotas));
    partners.spawn_refresher(router.clone());
    if let Some(addr) = flags.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let m = metrics.clone();
        tokio::spawn(nid_support::metrics_http::serve(
            listener,
            Arc::new(move || m.render()),
            tokio_util::sync::CancellationToken::new(),
        ));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    // The public face: only the public services are listed, answer health, accept gzip.
    let mut public = vec!["nid.v1.Enrollment", "nid.v1.Authentication", "nid.v1.Admin"];
    if !flags.disable_echo {
        public.push("nid.v1.Diagnostics");
    }
    for service in public.iter().chain([&""]) {
        health.set_service_status(*service, tonic_health::ServingStatus::Serving).await;
    }
    // Reflection describes the public services, health and itself, nothing internal.
    let described = descriptors::public_descriptors(nid_proto::FILE_DESCRIPTOR_SET, &public)?;
    let reflection = |reflection_service: &'static str| {
        public
            .iter()
            .chain(&["grpc.health.v1.Health", reflection_service])
            .fold(tonic_reflection::server::Builder::configure(), |b, s| b.with_service_name(*s))
            .register_file_descriptor_set(described.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection").build_v1()?;
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?;
    let listener = tokio::net::TcpListener::bind(flags.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(%local, zone = %flags.zone, "router serving");
    println!("nid-router ready listen={local}");
    let gzip = tonic::codec::CompressionEncoding::Gzip;
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Outermost first: the metrics see the code the client sees.
        .layer(nid_support::grpc_metrics::GrpcMetricsLayer(metrics.grpc.clone()))
        .layer(access)
        .layer(nid_support::oversized::OversizedLayer)
        .layer(nid_support::accept_encoding::AdvertiseEncodingLayer("gzip"))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EnrollmentServer::new(service::EnrollmentService(router.clone()))
                .accept_compressed(gzip)
                .send_compressed(gzip),
        )
        .add_service(
            AuthenticationServer::new(service::AuthenticationService {
                router: router.clone(),
                partners: partners.clone(),
                keys: tokio::sync::RwLock::default(),
            })
            .accept_compressed(gzip)
            .send_compressed(gzip),
        )
        .add_service(
            AdminServer::new(admin::AdminService { router: router.clone(), partners, admin_token })
                .accept_compressed(gzip)
                .send_compressed(gzip),
        )
        .add_optional_service((!flags.disable_echo).then(|| {
            DiagnosticsServer::new(service::DiagnosticsService(router.clone()))
                .accept_compressed(gzip)
                .send_compressed(gzip)
        }));
    let stop = async {
        nid_support::shutdown_signal().await;
        tracing::info!("router stopping");
    };
    match &tls {
        Some(tls) => server.serve_with_incoming_shutdown(tls.incoming(listener), stop).await?,
        None => server.serve_with_incoming_shutdown(nid_support::incoming(listener), stop).await?,
    }
    Ok(())
}
