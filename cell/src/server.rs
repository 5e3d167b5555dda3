//! A replica process: configuration, storage, the Raft loop, gRPC, metrics and graceful shutdown.
//!
//! On SIGTERM or SIGINT a leader hands leadership to the most up-to-date voter and waits (up to the
//! grace period) for it to take over before the process exits, so a rolling restart costs no
//! election timeout.

use crate::config::{CellConfig, Flags, Role};
use crate::crypto::Keyring;
use crate::fsm::StateMachine;
use crate::metrics::CellMetrics;
use crate::peer::{self, PeerConfig, PeerHandle, PeerMsg};
use crate::service::{BucketAdminService, CellContext, CellService, ControlService};
use crate::storage::{PeerStorage, open_db};
use crate::transport::{AddressBook, GrpcTransport, MAX_MESSAGE_BYTES, Member, RaftTransportService};
use anyhow::Context as _;
use clap::Parser as _;
use nid_proto::ids::{IdScheme, IdSchemeSeed};
use nid_proto::v1::bucket_admin_server::BucketAdminServer;
use nid_proto::v1::cell_server::CellServer;
use nid_proto::v1::control_server::ControlServer;
use nid_proto::v1::raft_transport_server::RaftTransportServer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `nid-cell` entry point.
pub fn main() -> std::process::ExitCode {
    init_tracing();
    let config = match CellConfig::load(Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nid-cell: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("nid-cell-rt").build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nid-cell: cannot start the runtime: {e}");
                return std::process::ExitCode::from(1);
            }
        };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nid-cell: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("NID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs one replica until a shutdown signal.
pub async fn run(config: CellConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let db = open_db(&config.data_dir.join("db")).context("open RocksDB")?;
    let voters: Vec<u64> = if config.peers.iter().any(|p| p.id == config.node_id) {
        config.peers.iter().map(|p| p.id).collect()
    } else {
        Vec::new()
    };
    let storage = PeerStorage::open(db.clone(), &voters).context("open raft storage")?;
    if !storage.is_initialized() {
        tracing::info!(
            cell = config.cell_id,
            node = config.node_id,
            "starting empty; waiting to be added to the cell"
        );
    }
    let configured = config.peers.iter().map(|p| Member {
        id: p.id,
        address: p.address.clone(),
        zone: p
            .zone
            .clone()
            .unwrap_or_else(|| if p.id == config.node_id { config.zone.clone() } else { String::new() }),
    });
    let book = Arc::new(AddressBook::load(&db, configured).context("load address book")?);
    let keyring = Arc::new(match &config.keyring_file {
        Some(path) => Keyring::from_file(path).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!("no keyring file configured: using the DEVELOPMENT keyring (never in production)");
            Keyring::dev()
        }
    });
    let scheme = match &config.id_scheme_seed {
        Some(hex) => IdScheme::new(
            &IdSchemeSeed::from_hex(hex)
                .map_err(|_| anyhow::anyhow!("id_scheme_seed must be 64 hex characters"))?,
        ),
        None => {
            tracing::warn!("no id-scheme seed configured: using the development seed");
            IdScheme::dev()
        }
    };
    let metrics = Arc::new(CellMetrics::new());
    let me: Arc<Mutex<Option<PeerHandle>>> = Arc::default();
    let snap_root = storage.snap_root().to_path_buf();
    let transport = GrpcTransport::new(
        config.cell_id,
        config.node_id,
        book.clone(),
        snap_root.clone(),
        tokio::runtime::Handle::current(),
        me.clone(),
    );
    let mut peer_config = PeerConfig::new(config.cell_id, config.node_id);
    peer_config.tick = Duration::from_millis(config.tick_ms);
    peer_config.log_gc_threshold = config.log_gc_threshold;
    peer_config.log_gc_keep = config.log_gc_keep;
    peer_config.log_gc_size = config.log_gc_size;
    let fsm = StateMachine::new(db.clone(), keyring.clone());
    let (handle, thread) = peer::spawn(
        peer_config,
        storage,
        fsm,
        transport,
        metrics.clone(),
        book.clone(),
        &crate::raft_logger(),
    )
    .context("start raft")?;
    if let Ok(mut m) = me.lock() {
        *m = Some(handle.clone());
    }

    let context = Arc::new(CellContext {
        cell_id: config.cell_id,
        node_id: config.node_id,
        peer: handle.clone(),
        fsm: StateMachine::new(db.clone(), keyring.clone()),
        keyring,
        scheme,
        book: book.clone(),
        metrics: metrics.clone(),
        clock: Arc::new(crate::handlers::Clock::default()),
        auth_policy: crate::command::AuthPolicy {
            max_failures: config.auth_max_failures,
            cooldown_ms: config.auth_cooldown_secs.saturating_mul(1000),
            skew_ms: config.auth_skew_secs.saturating_mul(1000),
        },
    });

    if config.role == Role::Data && config.txn_sweep_secs > 0 {
        tokio::spawn(crate::sweep::run(context.clone(), Duration::from_secs(config.txn_sweep_secs)));
    }

    if let Some(addr) = config.metrics_listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind metrics {addr}"))?;
        let m = metrics.clone();
        let size_db = db.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            if let Ok(Some(size)) = size_db.property_int_value("rocksdb.total-sst-files-size") {
                m.rocksdb_size.set(size as i64);
            }
            m.render()
        });
        tracing::info!(%addr, "metrics listening");
        tokio::spawn(nid_support::serve_metrics(listener, render));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CellServer<CellService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nid_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let raft_service = RaftTransportService {
        cell_id: config.cell_id,
        node_id: config.node_id,
        book: book.clone(),
        peer: handle.clone(),
        metrics: metrics.clone(),
        snap_root,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(cell = config.cell_id, node = config.node_id, zone = %config.zone, %local, "serving");
    // A line for scripts and tests that wait for readiness.
    println!("nid-cell ready cell={} node={} listen={local}", config.cell_id, config.node_id);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(CellServer::from_arc(Arc::new(CellService(context.clone()))))
            .add_service(BucketAdminServer::from_arc(Arc::new(BucketAdminService(context.clone()))))
            .add_optional_service(
                (config.role == Role::Control)
                    .then(|| ControlServer::from_arc(Arc::new(ControlService(context.clone())))),
            )
            .add_service(
                RaftTransportServer::new(raft_service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(nid_support::incoming(listener), async {
                let _ = stop_rx.await;
            }),
    );
    tokio::select! {
        result = &mut server => {
            // The server ended on its own: that is a failure.
            let _ = handle.send(PeerMsg::Shutdown);
            result.context("gRPC server task")?.context("gRPC server")?;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
        () = nid_support::shutdown_signal() => {}
    }
    tracing::info!("shutdown requested");
    hand_over_leadership(&handle, config.node_id, Duration::from_secs(config.shutdown_grace_secs)).await;
    health.set_not_serving::<CellServer<CellService>>().await;
    let _ = stop_tx.send(());
    // Peers hold long-lived Raft streams open; give in-flight client calls a moment, then close.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    let _ = handle.send(PeerMsg::Shutdown);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    tracing::info!("stopped");
    Ok(())
}

/// If this replica leads, transfers leadership away and waits (up to `grace`) for another leader.
async fn hand_over_leadership(handle: &PeerHandle, node_id: u64, grace: Duration) {
    if handle.leader() != Some(node_id) {
        return;
    }
    let deadline = Instant::now() + grace;
    let _ = handle.send(PeerMsg::TransferLeader { to: None });
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match handle.leader() {
            Some(l) if l != node_id => {
                tracing::info!(new_leader = l, "leadership handed over");
                return;
            }
            _ => {}
        }
    }
    tracing::warn!("leadership transfer did not finish within the grace period");
}
