//! The replica's configuration: command-line flags over an optional TOML file (unknown keys
//! rejected), checked before anything starts.

use clap::Parser;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

/// One replica of a nid cell.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "nid-cell", version, about = "One replica of a nid cell: a Raft group over RocksDB")]
pub struct Flags {
    /// TOML file with the same settings (snake_case keys); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The cell this replica belongs to.
    #[arg(long)]
    pub cell_id: Option<u64>,
    /// This replica's Raft node id (unique within the cell, > 0).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// This replica's availability zone (or NID_ZONE, e.g. from a Kubernetes topology label).
    #[arg(long, env = "NID_ZONE")]
    pub zone: Option<String>,
    /// gRPC listen address (cell API, Raft transport, health, reflection).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address peers and routers use to reach this replica (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Prometheus metrics listen address (HTTP, GET /metrics).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory (RocksDB).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Initial members: `id=host:port@zone,...`. A replica not listed starts empty and waits to be
    /// added by a membership change.
    #[arg(long)]
    pub peers: Option<String>,
    /// `data` (identity buckets) or `control` (the routing table).
    #[arg(long)]
    pub role: Option<String>,
    /// Allow replicas of this cell to share a zone (development clusters only).
    #[arg(long)]
    pub dev_allow_same_zone: bool,
    /// Serve and dial plaintext gRPC: no certificates, every caller accepted. Development only.
    #[arg(long)]
    pub insecure: bool,
    /// Directory with `ca.pem` and this replica's `cell-<cell>-<node>.pem/.key` (a control
    /// replica's `control-<node>.pem/.key`), as `nidctl cert` writes them.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// The cluster CA certificate (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This replica's certificate (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This replica's private key (PEM); overrides the one in --tls-dir.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Control replicas: the admin credential's secret file (as the routers'). With it, a router
    /// may write to the control cell on behalf of an admin whose credential it forwards; without
    /// it only admin and control-replica certificates write.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// The cluster's id-scheme seed (64 hex characters); defaults to the development seed.
    #[arg(long, env = "NID_ID_SCHEME_SEED", hide_env_values = true)]
    pub id_scheme_seed: Option<String>,
    /// Keyring file (`<key_id>:<hex secret>` per line, one line per key generation); defaults to
    /// the development keyring.
    #[arg(long, alias = "keyring")]
    pub keyring_file: Option<PathBuf>,
    /// Raft tick in milliseconds.
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Compact the Raft log once it holds this many applied entries.
    #[arg(long)]
    pub log_gc_threshold: Option<u64>,
    /// Entries kept behind the applied index when compacting.
    #[arg(long)]
    pub log_gc_keep: Option<u64>,
    /// Compact the Raft log once its entries exceed this many MiB.
    #[arg(long)]
    pub log_gc_size_mib: Option<u64>,
    /// RocksDB block cache in MiB (data blocks, and the index and filter blocks of the data);
    /// 8..=65536, default 256. Count it in the replica's memory limit.
    #[arg(long)]
    pub block_cache_mib: Option<usize>,
    /// Runtime threads for gRPC and the replica's tasks (the Raft loop has its own thread): 1 a
    /// current-thread runtime (the least CPU per request where cores are shared: about 5-8% less
    /// for the cell's processes, measured on 2 shared cores), N > 1 a multi-threaded runtime of N
    /// workers, 0 (the default) one worker per core.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds to wait for a leadership transfer on SIGTERM.
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// Consecutive failed authentications that lock an identity's authentication (default 5).
    #[arg(long)]
    pub auth_max_failures: Option<u32>,
    /// How long that lock lasts, in seconds (default 1800).
    #[arg(long)]
    pub auth_cooldown_secs: Option<u64>,
    /// Allowed distance between a partner's request time and the cell's clock, seconds (default 300).
    #[arg(long)]
    pub auth_skew_secs: Option<u64>,
    /// Log lines as `text` (default) or `json` (one object per line, for log shippers).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Seconds between two sweeps of replay markers past the replay window, each over 1/64 of the
    /// buckets (default 2; 0 turns sweeping off).
    #[arg(long)]
    pub txn_sweep_secs: Option<u64>,
}

/// The TOML file form of [`Flags`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cell_id: Option<u64>,
    node_id: Option<u64>,
    zone: Option<String>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    peers: Option<String>,
    role: Option<String>,
    dev_allow_same_zone: Option<bool>,
    insecure: Option<bool>,
    tls_dir: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    id_scheme_seed: Option<String>,
    keyring_file: Option<PathBuf>,
    tick_ms: Option<u64>,
    log_gc_threshold: Option<u64>,
    log_gc_keep: Option<u64>,
    log_gc_size_mib: Option<u64>,
    block_cache_mib: Option<usize>,
    threads: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    auth_max_failures: Option<u32>,
    auth_cooldown_secs: Option<u64>,
    auth_skew_secs: Option<u64>,
    txn_sweep_secs: Option<u64>,
    log_format: Option<String>,
}

/// What the cell holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Identity buckets.
    Data,
    /// The routing table and registry.
    Control,
}

/// An initial member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Node id.
    pub id: u64,
    /// host:port.
    pub address: String,
    /// Zone, when given.
    pub zone: Option<String>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct CellConfig {
    /// Cell id.
    pub cell_id: u64,
    /// Node id.
    pub node_id: u64,
    /// Zone.
    pub zone: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Advertised address.
    pub advertise: String,
    /// Metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Initial members (may be empty for a joining replica).
    pub peers: Vec<PeerSpec>,
    /// Role.
    pub role: Role,
    /// Plaintext gRPC allowed.
    pub insecure: bool,
    /// Mutual TLS certificate files (None only with `insecure`).
    pub tls: Option<nid_support::tls::TlsPaths>,
    /// The admin credential's secret file (control replicas).
    pub admin_token_file: Option<PathBuf>,
    /// Voters of this cell may share a zone (development clusters only).
    pub dev_allow_same_zone: bool,
    /// Id-scheme seed hex, if configured.
    pub id_scheme_seed: Option<String>,
    /// Keyring file, if configured.
    pub keyring_file: Option<PathBuf>,
    /// Raft tick.
    pub tick_ms: u64,
    /// Log GC threshold.
    pub log_gc_threshold: u64,
    /// Log GC keep.
    pub log_gc_keep: u64,
    /// Log GC size threshold in bytes.
    pub log_gc_size: u64,
    /// RocksDB block cache in MiB.
    pub block_cache_mib: usize,
    /// Runtime threads (0: one per core).
    pub threads: usize,
    /// Shutdown grace.
    pub shutdown_grace_secs: u64,
    /// Failures before the auth lock.
    pub auth_max_failures: u32,
    /// Auth lock duration, seconds.
    pub auth_cooldown_secs: u64,
    /// Allowed request-time skew, seconds.
    pub auth_skew_secs: u64,
    /// Seconds between replay-marker sweeps (0: off).
    pub txn_sweep_secs: u64,
    /// Log line format.
    pub log_format: nid_support::logging::LogFormat,
}

/// Parses `id=host:port@zone,...`.
pub fn parse_peers(text: &str) -> Result<Vec<PeerSpec>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, rest) =
            part.split_once('=').ok_or_else(|| format!("peers: '{part}' is not id=host:port[@zone]"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("peers: node id '{id}' is not a number"))?;
        if id == 0 {
            return Err("peers: node id 0 is reserved".into());
        }
        if !seen.insert(id) {
            return Err(format!("peers: node id {id} listed twice"));
        }
        let (address, zone) = match rest.split_once('@') {
            Some((a, z)) => (a.trim(), Some(z.trim().to_owned())),
            None => (rest.trim(), None),
        };
        if address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(format!("peers: address of node {id} must be host:port"));
        }
        out.push(PeerSpec { id, address: address.to_owned(), zone });
    }
    Ok(out)
}

impl CellConfig {
    /// Merges flags over the file and checks the result.
    pub fn load(flags: Flags) -> Result<CellConfig, String> {
        let file: FileConfig = match &flags.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cell_id = flags.cell_id.or(file.cell_id).ok_or("cell_id is required (--cell-id)")?;
        let node_id = flags.node_id.or(file.node_id).ok_or("node_id is required (--node-id)")?;
        if node_id == 0 {
            return Err("node_id must be > 0".into());
        }
        let zone = flags.zone.or(file.zone).ok_or("zone is required (--zone)")?;
        let listen = flags.listen.or(file.listen).ok_or("listen is required (--listen)")?;
        let advertise = flags.advertise.or(file.advertise).unwrap_or_else(|| listen.to_string());
        let data_dir = flags.data_dir.or(file.data_dir).ok_or("data_dir is required (--data-dir)")?;
        let peers = parse_peers(&flags.peers.or(file.peers).unwrap_or_default())?;
        let role = match flags.role.or(file.role).as_deref() {
            None | Some("data") => Role::Data,
            Some("control") => Role::Control,
            Some(other) => return Err(format!("role must be data or control, not '{other}'")),
        };
        let allow_same_zone = flags.dev_allow_same_zone || file.dev_allow_same_zone.unwrap_or(false);
        if let Some(me) = peers.iter().find(|p| p.id == node_id)
            && let Some(z) = &me.zone
            && *z != zone
        {
            return Err(format!("peers lists node {node_id} in zone '{z}' but --zone is '{zone}'"));
        }
        if !allow_same_zone && !peers.is_empty() {
            let mut zones: BTreeMap<String, u64> = BTreeMap::new();
            for p in &peers {
                let z = p.zone.clone().ok_or_else(|| {
                    format!("peers: node {} has no @zone (needed to keep replicas in distinct zones)", p.id)
                })?;
                if let Some(other) = zones.insert(z.clone(), p.id) {
                    return Err(format!(
                        "nodes {other} and {} share zone '{z}'; replicas of a cell must sit in distinct zones \
                         (--dev-allow-same-zone for development)",
                        p.id
                    ));
                }
            }
        }
        let insecure = flags.insecure || file.insecure.unwrap_or(false);
        let name = match role {
            Role::Data => format!("cell-{cell_id}-{node_id}"),
            Role::Control => format!("control-{node_id}"),
        };
        let tls = nid_support::tls::resolve_paths(
            flags.tls_dir.or(file.tls_dir),
            flags.tls_ca.or(file.tls_ca),
            flags.tls_cert.or(file.tls_cert),
            flags.tls_key.or(file.tls_key),
            &name,
        )?;
        match (&tls, insecure) {
            (Some(_), true) => return Err("--insecure and the TLS settings exclude each other".into()),
            (None, false) => {
                return Err(format!(
                    "mutual TLS needs --tls-dir (with ca.pem and {name}.pem/.key) or --tls-ca/--tls-cert/--tls-key; \
                     --insecure serves plaintext to anyone (development only)"
                ));
            }
            _ => {}
        }
        let tick_ms = flags.tick_ms.or(file.tick_ms).unwrap_or(100);
        if !(1..=10_000).contains(&tick_ms) {
            return Err("tick_ms must be 1..=10000".into());
        }
        Ok(CellConfig {
            cell_id,
            node_id,
            zone,
            listen,
            advertise,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            data_dir,
            peers,
            role,
            insecure,
            tls,
            admin_token_file: flags.admin_token_file.or(file.admin_token_file),
            dev_allow_same_zone: allow_same_zone,
            id_scheme_seed: flags.id_scheme_seed.or(file.id_scheme_seed),
            keyring_file: flags.keyring_file.or(file.keyring_file),
            tick_ms,
            log_gc_threshold: flags.log_gc_threshold.or(file.log_gc_threshold).unwrap_or(20_000),
            log_gc_keep: flags.log_gc_keep.or(file.log_gc_keep).unwrap_or(5_000),
            log_gc_size: flags.log_gc_size_mib.or(file.log_gc_size_mib).unwrap_or(64).saturating_mul(1 << 20),
            block_cache_mib: match flags
                .block_cache_mib
                .or(file.block_cache_mib)
                .unwrap_or(nid_engine::db::DEFAULT_BLOCK_CACHE_MIB)
            {
                n @ 8..=65_536 => n,
                _ => return Err("block_cache_mib must be 8..=65536".into()),
            },
            threads: match flags.threads.or(file.threads).unwrap_or(0) {
                n @ 0..=1024 => n,
                _ => return Err("threads must be 0..=1024".into()),
            },
            shutdown_grace_secs: flags.shutdown_grace_secs.or(file.shutdown_grace_secs).unwrap_or(10),
            auth_max_failures: match flags.auth_max_failures.or(file.auth_max_failures).unwrap_or(5) {
                0 => return Err("auth_max_failures must be > 0".into()),
                n => n,
            },
            auth_cooldown_secs: flags.auth_cooldown_secs.or(file.auth_cooldown_secs).unwrap_or(1800),
            auth_skew_secs: flags.auth_skew_secs.or(file.auth_skew_secs).unwrap_or(300),
            txn_sweep_secs: flags.txn_sweep_secs.or(file.txn_sweep_secs).unwrap_or(2),
            log_format: match flags.log_format.or(file.log_format) {
                None => nid_support::logging::LogFormat::Text,
                Some(f) => f.parse().map_err(|e| format!("log_format: {e}"))?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("nid-cell").chain(args.iter().copied()))
    }

    const BASE: &[&str] = &[
        "--cell-id",
        "1",
        "--node-id",
        "1",
        "--zone",
        "a",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        "/tmp/x",
        "--insecure",
    ];

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:7001@a, 2=h:7002@b,3=h:7003").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1], PeerSpec { id: 2, address: "h:7002".into(), zone: Some("b".into()) });
        assert_eq!(p[2].zone, None);
        assert!(parse_peers("1=h:1,1=h:2").is_err());
        assert!(parse_peers("0=h:1").is_err());
        assert!(parse_peers("x=h:1").is_err());
        assert!(parse_peers("1=h").is_err());
    }

    #[test]
    fn distinct_zones_are_enforced_unless_dev() {
        let mut args = BASE.to_vec();
        args.extend(["--peers", "1=h:1@a,2=h:2@a,3=h:3@c"]);
        let err = CellConfig::load(flags(&args)).unwrap_err();
        assert!(err.contains("distinct zones"), "{err}");
        args.push("--dev-allow-same-zone");
        assert!(CellConfig::load(flags(&args)).is_ok());
        let mut args = BASE.to_vec();
        args.extend(["--peers", "1=h:1@b,2=h:2@a"]);
        assert!(CellConfig::load(flags(&args)).unwrap_err().contains("zone"));
    }

    #[test]
    fn file_is_overridden_by_flags_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cell.toml");
        std::fs::write(
            &path,
            "cell_id = 7\nnode_id = 2\nzone = \"b\"\nlisten = \"127.0.0.1:9\"\ndata_dir = \"/d\"\ninsecure = true\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = CellConfig::load(flags(&["--config", p, "--node-id", "3"])).unwrap();
        assert_eq!((c.cell_id, c.node_id, c.zone.as_str()), (7, 3, "b"));
        std::fs::write(&path, "cell_id = 7\nnode_idd = 2\n").unwrap();
        let err = CellConfig::load(flags(&["--config", p])).unwrap_err();
        assert!(err.contains("node_idd"), "{err}");
    }

    /// The configuration of [`BASE`] with one more flag.
    fn with_flag(flag: &str, value: &str) -> Result<CellConfig, String> {
        let mut args = BASE.to_vec();
        args.extend([flag, value]);
        CellConfig::load(flags(&args))
    }

    #[test]
    fn the_block_cache_is_bounded_and_defaults_to_256_mib() {
        assert_eq!(CellConfig::load(flags(BASE)).unwrap().block_cache_mib, 256);
        let with = |mib: &str| with_flag("--block-cache-mib", mib);
        assert_eq!(with("1024").unwrap().block_cache_mib, 1024);
        for bad in ["4", "100000"] {
            assert!(with(bad).unwrap_err().contains("block_cache_mib"), "{bad}");
        }
    }

    #[test]
    fn runtime_threads_default_to_one_per_core_and_are_bounded() {
        assert_eq!(CellConfig::load(flags(BASE)).unwrap().threads, 0);
        assert_eq!(with_flag("--threads", "1").unwrap().threads, 1);
        assert!(with_flag("--threads", "5000").unwrap_err().contains("threads"));
    }

    #[test]
    fn plaintext_needs_the_explicit_flag() {
        let args: Vec<&str> = BASE.iter().copied().filter(|a| *a != "--insecure").collect();
        assert!(CellConfig::load(flags(&args)).unwrap_err().contains("--insecure"));
    }
}
