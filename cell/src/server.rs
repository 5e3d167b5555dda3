//! A replica process, top to bottom: configuration, RocksDB, keys, the engine with the role's
//! state machine, the services, `/metrics`, the gRPC server; then it runs until a shutdown signal
//! (a leader first hands leadership over, so a rolling restart costs no election) or until its
//! Raft loop stops on a failure (health turns NOT_SERVING and the process exits non-zero, so a
//! supervisor restarts it).

use crate::access::ReplicaDialer;
use crate::bucket_admin::BucketAdminService;
use crate::cell_service::CellService;
use crate::config::{CellConfig, Role};
use crate::control_service::{ControlCell, ControlService};
use crate::identity_cell::IdentityCell;
use crate::key_rotation::GrpcVoterKeys;
use crate::metrics::CellMetrics;
use crate::replica::ReplicaAdmin;
use anyhow::Context as _;
use nid_control::ControlMachine;
use nid_domain::commands::AuthPolicy;
use nid_domain::keyring::Keyring;
use nid_domain::time::Clock;
use nid_engine::db::open_db_with;
use nid_engine::transport::{Dialer, GrpcTransport, MAX_MESSAGE_BYTES};
use nid_engine::transport_service::RaftTransportService;
use nid_engine::{Member, Node, NodeSetup, PeerConfig, StateMachine};
use nid_identity::{CellKeys, IdentityMachine};
use nid_proto::ids::{IdScheme, IdSchemeSeed};
use nid_proto::v1::bucket_admin_server::BucketAdminServer;
use nid_proto::v1::cell_server::CellServer;
use nid_proto::v1::control_server::ControlServer;
use nid_proto::v1::raft_transport_server::RaftTransportServer;
use nid_support::tls::{Dial, Peer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a replica run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A shutdown was asked for.
    Shutdown,
    /// The Raft loop stopped on a failure.
    Failed(String),
}

/// The `nid-cell` entry point.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let config = match CellConfig::load(crate::config::Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nid-cell: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let role = if config.role == Role::Control { "control" } else { "cell" };
    nid_support::logging::init(
        config.log_format,
        &[
            ("role", role.into()),
            ("cell", config.cell_id.into()),
            ("node", config.node_id.into()),
            ("zone", config.zone.clone().into()),
        ],
    );
    let runtime = match nid_support::runtime(config.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nid-cell: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    runtime.spawn(async move {
        nid_support::shutdown_signal().await;
        signal.cancel();
    });
    match runtime.block_on(run(config, shutdown)) {
        Ok(Ended::Shutdown) => std::process::ExitCode::SUCCESS,
        Ok(Ended::Failed(reason)) => {
            eprintln!("nid-cell: the replica stopped: {reason}");
            std::process::ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("nid-cell: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn keyring(config: &CellConfig) -> anyhow::Result<Keyring> {
    match &config.keyring_file {
        Some(path) => Keyring::from_file(path).map_err(anyhow::Error::msg),
        None => {
            tracing::warn!("no keyring file configured: using the DEVELOPMENT keyring (never in production)");
            Ok(Keyring::dev())
        }
    }
}

fn scheme(config: &CellConfig) -> anyhow::Result<IdScheme> {
    match &config.id_scheme_seed {
        Some(hex) => Ok(IdScheme::new(
            &IdSchemeSeed::from_hex(hex)
                .map_err(|_| anyhow::anyhow!("id_scheme_seed must be 64 hex characters"))?,
        )),
        None => {
            tracing::warn!("no id-scheme seed configured: using the development seed");
            Ok(IdScheme::dev())
        }
    }
}

fn peer_config(config: &CellConfig) -> PeerConfig {
    let mut p = PeerConfig::new(config.cell_id, config.node_id);
    p.tick = Duration::from_millis(config.tick_ms);
    p.log_gc_threshold = config.log_gc_threshold;
    p.log_gc_keep = config.log_gc_keep;
    p.log_gc_size = config.log_gc_size;
    p
}

fn start<SM: StateMachine>(
    config: &CellConfig,
    machine: SM,
    registry: &prometheus::Registry,
    dialer: Arc<dyn Dialer>,
) -> anyhow::Result<(Node<SM>, std::thread::JoinHandle<()>)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let db = open_db_with(&config.data_dir.join("db"), config.block_cache_mib).context("open RocksDB")?;
    let in_peers = config.peers.iter().any(|p| p.id == config.node_id);
    let members = config
        .peers
        .iter()
        .map(|p| Member {
            id: p.id,
            address: p.address.clone(),
            zone: p
                .zone
                .clone()
                .unwrap_or_else(|| if p.id == config.node_id { config.zone.clone() } else { String::new() }),
        })
        .collect();
    let setup = NodeSetup {
        config: peer_config(config),
        db,
        bootstrap_voters: if in_peers { config.peers.iter().map(|p| p.id).collect() } else { Vec::new() },
        members,
        machine,
        registry: registry.clone(),
    };
    let runtime = tokio::runtime::Handle::current();
    let (cell_id, node_id) = (config.cell_id, config.node_id);
    let (node, thread) = Node::start(setup, move |inbox, book, snap_root| {
        GrpcTransport::new(cell_id, node_id, inbox, book, snap_root, dialer, runtime)
    })
    .context("start the replica")?;
    if !in_peers && node.status_blocking().map(|s| s.voters.is_empty()).unwrap_or(true) {
        tracing::info!(cell = cell_id, node = node_id, "starting empty; waiting to be added to the cell");
    }
    Ok((node, thread))
}

/// Runs one replica until `shutdown` or a failure of its Raft loop.
pub async fn run(config: CellConfig, shutdown: CancellationToken) -> anyhow::Result<Ended> {
    let registry = prometheus::Registry::new();
    let grpc_metrics = nid_support::grpc_metrics::GrpcMetrics::new(&registry)?;
    let tls = match &config.tls {
        Some(paths) => {
            let tls = nid_support::tls::Tls::load(paths.clone(), &registry)?;
            let expected = match config.role {
                Role::Data => Peer::Cell { cell: config.cell_id, node: config.node_id },
                Role::Control => Peer::Control { node: config.node_id },
            };
            anyhow::ensure!(
                tls.identity() == expected,
                "the certificate names {} but this replica is {expected}",
                tls.identity()
            );
            tls.spawn_reloader();
            Some(tls)
        }
        None => {
            tracing::warn!(
                "--insecure: plaintext gRPC, every caller accepted, Raft senders unchecked (DEVELOPMENT ONLY)"
            );
            None
        }
    };
    let dial = tls.clone().map_or(Dial::Plain, Dial::Tls);
    let own_role = if config.role == Role::Control { "control" } else { "cell" };
    let dialer: Arc<dyn Dialer> = Arc::new(ReplicaDialer { dial: dial.clone(), server_name: own_role });
    let admin_token = match &config.admin_token_file {
        Some(path) => Some(nid_support::secret::AdminToken::from_file(path)?),
        None => None,
    };
    let access = nid_support::access::AccessLayer::new(
        tls.as_ref().map(|_| crate::access::policy(config.role, config.cell_id, admin_token)),
        &registry,
    )?;
    let tasks = TaskTracker::new();
    let (health, health_service) = tonic_health::server::health_reporter();

    // The role's state machine, node and services.
    let started = match config.role {
        Role::Data => {
            let keys = Arc::new(CellKeys::new(keyring(&config)?));
            let (node, thread) =
                start(&config, IdentityMachine::new(keys.clone()), &registry, dialer.clone())?;
            let cell = Arc::new(IdentityCell {
                cell_id: config.cell_id,
                node: node.clone(),
                keys,
                scheme: scheme(&config)?,
                clock: Arc::new(Clock::default()),
                policy: AuthPolicy {
                    max_failures: config.auth_max_failures,
                    cooldown_ms: config.auth_cooldown_secs.saturating_mul(1000),
                    skew_ms: config.auth_skew_secs.saturating_mul(1000),
                },
                metrics: CellMetrics::new(&registry)?,
            });
            if config.txn_sweep_secs > 0 {
                tasks.spawn(crate::sweeper::run(
                    cell.clone(),
                    Duration::from_secs(config.txn_sweep_secs),
                    shutdown.clone(),
                ));
            }
            let cell_service = CellService {
                replica: Arc::new(ReplicaAdmin {
                    node: node.clone(),
                    allow_same_zone: config.dev_allow_same_zone,
                }),
                identity: Some(cell.clone()),
                voter_keys: Arc::new(GrpcVoterKeys(dialer.clone())),
            };
            tasks.spawn(crate::readiness::watch(
                node.clone(),
                health.clone(),
                vec!["nid.v1.Cell", "nid.v1.BucketAdmin"],
                shutdown.clone(),
            ));
            let routes = tonic::service::Routes::new(CellServer::new(cell_service))
                .add_service(BucketAdminServer::new(BucketAdminService(cell)));
            Started::new(&config, node, thread, routes)
        }
        Role::Control => {
            let (version_tx, version_rx) = tokio::sync::watch::channel(0u64);
            let (node, thread) =
                start(&config, ControlMachine::new(Arc::new(version_tx)), &registry, dialer.clone())?;
            let control = Arc::new(ControlCell { node: node.clone(), table_version: version_rx });
            let rebalancer = Arc::new(crate::rebalancer::Rebalancer::new(
                control.clone(),
                Arc::new(ReplicaDialer { dial: dial.clone(), server_name: "cell" }),
                crate::rebalancer::RebalanceMetrics::new(&registry)?,
            ));
            tasks.spawn(rebalancer.run(shutdown.clone()));
            let cell_service = CellService {
                replica: Arc::new(ReplicaAdmin {
                    node: node.clone(),
                    allow_same_zone: config.dev_allow_same_zone,
                }),
                identity: None,
                voter_keys: Arc::new(GrpcVoterKeys(dialer.clone())),
            };
            tasks.spawn(crate::readiness::watch(
                node.clone(),
                health.clone(),
                vec!["nid.v1.Cell", "nid.v1.Control"],
                shutdown.clone(),
            ));
            let routes = tonic::service::Routes::new(CellServer::new(cell_service))
                .add_service(ControlServer::new(ControlService(control)));
            Started::new(&config, node, thread, routes)
        }
    };
    let Started {
        stopped,
        failure,
        hand_over,
        stop_node,
        thread,
        routes: role_routes,
        raft: mut raft_service,
    } = started;
    if tls.is_some() {
        raft_service.sender_of = Some(crate::access::sender_of(config.role, config.cell_id));
    }
    health.set_serving::<RaftTransportServer<RaftTransportService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;

    if let Some(addr) = config.metrics_listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind metrics {addr}"))?;
        let disk = DiskGauges::new(&registry, &config.data_dir)?;
        let info = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("nid_replica_info", "1 per replica: its cell, node, zone and role."),
            &["cell", "node", "zone", "role"],
        )?;
        registry.register(Box::new(info.clone()))?;
        let role = if config.role == Role::Control { "control" } else { "data" };
        info.with_label_values(&[
            &config.cell_id.to_string(),
            &config.node_id.to_string(),
            &config.zone,
            role,
        ])
        .set(1);
        let db_size = {
            let registry = registry.clone();
            let size = prometheus::IntGauge::new(
                "nid_rocksdb_size_bytes",
                "Live SST files size of the replica's RocksDB.",
            )?;
            registry.register(Box::new(size.clone()))?;
            let data_dir = config.data_dir.join("db");
            move || size.set(dir_size(&data_dir) as i64)
        };
        let render: nid_support::metrics_http::Render = Arc::new(move || {
            db_size();
            disk.update();
            use prometheus::Encoder as _;
            let mut out = Vec::new();
            let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
            String::from_utf8(out).unwrap_or_default()
        });
        tracing::info!(%addr, "metrics listening");
        tasks.spawn(nid_support::metrics_http::serve(listener, render, shutdown.clone()));
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nid_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nid_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(cell = config.cell_id, node = config.node_id, zone = %config.zone, %local, "serving");
    // A line for scripts and tests that wait for readiness.
    println!("nid-cell ready cell={} node={} listen={local}", config.cell_id, config.node_id);

    let server_stop = CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        let routes = role_routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RaftTransportServer::new(raft_service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .layer(nid_support::grpc_metrics::GrpcMetricsLayer(grpc_metrics))
            .layer(access)
            .add_routes(routes);
        let stopped = async move { stop.cancelled().await };
        match &tls {
            Some(tls) => tokio::spawn(server.serve_with_incoming_shutdown(tls.incoming(listener), stopped)),
            None => {
                tokio::spawn(server.serve_with_incoming_shutdown(nid_support::incoming(listener), stopped))
            }
        }
    };

    let ended = tokio::select! {
        () = shutdown.cancelled() => Ended::Shutdown,
        () = stopped.cancelled() => Ended::Failed(failure().unwrap_or_else(|| "the Raft loop stopped".into())),
    };
    match &ended {
        Ended::Shutdown => {
            tracing::info!("shutdown requested");
            hand_over(Duration::from_secs(config.shutdown_grace_secs)).await;
        }
        Ended::Failed(reason) => {
            tracing::error!(reason = %reason, "the replica can no longer serve; stopping (a supervisor should restart it)");
        }
    }
    // Stop the background tasks first, so readiness cannot turn a service back to SERVING.
    shutdown.cancel();
    for service in ["", "nid.v1.Cell", "nid.v1.BucketAdmin", "nid.v1.Control", "nid.v1.RaftTransport"] {
        health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
    }
    server_stop.cancel();
    // Peers hold long-lived Raft streams open; give in-flight calls a moment, then close.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    stop_node();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    tracing::info!("stopped");
    Ok(ended)
}

/// A started replica, whatever its role.
struct Started {
    stopped: CancellationToken,
    failure: Box<dyn Fn() -> Option<String> + Send>,
    hand_over: HandOver,
    stop_node: Box<dyn Fn() + Send>,
    thread: std::thread::JoinHandle<()>,
    routes: tonic::service::Routes,
    raft: RaftTransportService,
}

impl Started {
    fn new<SM: StateMachine>(
        config: &CellConfig,
        node: Node<SM>,
        thread: std::thread::JoinHandle<()>,
        routes: tonic::service::Routes,
    ) -> Started {
        let raft = RaftTransportService {
            cell_id: config.cell_id,
            node_id: config.node_id,
            book: node.book().clone(),
            inbox: node.inbox().clone(),
            metrics: node.metrics().clone(),
            snap_root: node.snap_root().to_path_buf(),
            sender_of: None,
        };
        let (for_failure, for_stop) = (node.clone(), node.clone());
        Started {
            stopped: node.stopped(),
            failure: Box::new(move || for_failure.failure()),
            hand_over: leader_hand_over(node),
            stop_node: Box::new(move || for_stop.shutdown()),
            thread,
            routes,
            raft,
        }
    }
}

type HandOver =
    Box<dyn FnOnce(Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// If this replica leads, transfers leadership away and waits (up to the grace period) for
/// another leader.
fn leader_hand_over<SM: StateMachine>(node: Node<SM>) -> HandOver {
    Box::new(move |grace| {
        Box::pin(async move {
            if !node.is_leader() {
                return;
            }
            let deadline = Instant::now() + grace;
            let _ = node.transfer_leader(None);
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match node.leader() {
                    Some(l) if l != node.node_id() => {
                        tracing::info!(new_leader = l, "leadership handed over");
                        return;
                    }
                    _ => {}
                }
            }
            tracing::warn!("leadership transfer did not finish within the grace period");
        })
    })
}

/// Free and total bytes of the filesystem holding the data directory.
struct DiskGauges {
    available: prometheus::IntGauge,
    capacity: prometheus::IntGauge,
    path: std::ffi::CString,
}

impl DiskGauges {
    fn new(registry: &prometheus::Registry, dir: &std::path::Path) -> anyhow::Result<DiskGauges> {
        use std::os::unix::ffi::OsStrExt as _;
        let available = prometheus::IntGauge::new(
            "nid_disk_available_bytes",
            "Bytes available to the replica on its data filesystem.",
        )?;
        let capacity = prometheus::IntGauge::new(
            "nid_disk_capacity_bytes",
            "Size of the replica's data filesystem in bytes.",
        )?;
        registry.register(Box::new(available.clone()))?;
        registry.register(Box::new(capacity.clone()))?;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("data dir path")?;
        Ok(DiskGauges { available, capacity, path })
    }

    fn update(&self) {
        // SAFETY: statvfs writes only into the zeroed struct we own; the path is NUL-terminated.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(self.path.as_ptr(), &mut stat) } == 0 {
            let block = stat.f_frsize as u64;
            self.available.set((stat.f_bavail as u64).saturating_mul(block) as i64);
            self.capacity.set((stat.f_blocks as u64).saturating_mul(block) as i64);
        }
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
