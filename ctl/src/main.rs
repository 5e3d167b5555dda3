//! `nidctl`: the admin CLI of nid.
//!
//! This file only parses flags and dispatches; each command group lives in its own module.

mod cells;
mod cluster;
mod config;
mod credentials;
mod dev;
mod id;
mod identity;
mod partner;
mod status;
mod tls;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Admin CLI for nid, the cell-based national-ID data service.
#[derive(Debug, Parser)]
#[command(name = "nidctl", version, about)]
struct Cli {
    /// Configuration file (TOML). Keys: id_scheme_seed.
    #[arg(long, global = true, env = "NIDCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Certificate directory (ca.pem, NAME.pem, NAME.key as `nidctl cert` writes them): speak
    /// mutual TLS. Default: the dev cluster's DIR/secrets/tls when it has one, else plaintext.
    #[arg(long, global = true, env = "NIDCTL_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The certificate to present (its NAME in the certificate directory). Default: admin;
    /// enroller-dev for enroll and get, partner-dev-partner for auth; for probe, the one
    /// certificate of a directory that holds only one (a container's own).
    #[arg(long = "as", global = true, value_name = "NAME")]
    as_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Table,
    /// One JSON document per result.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and generate identifiers (UINs and VIDs) offline.
    Id {
        #[command(subcommand)]
        command: id::IdCommand,
    },
    /// A development cluster on this machine.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Enrol a person through the router; prints the UIN (the existing one for a repeated RID).
    Enroll {
        #[command(flatten)]
        args: identity::EnrollArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Cells, replicas, zones, leaders, applied indexes, buckets owned and health.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Print an identity record (by UIN) read through the router.
    Get {
        /// The UIN.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Register, list and revoke partners (relying parties); needs the admin credential.
    Partner {
        #[command(subcommand)]
        command: partner::PartnerCommand,
        #[command(flatten)]
        admin: partner::AdminArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Authenticate a person as a partner: prints YES with the partner token, or NO with reasons.
    Auth {
        #[command(flatten)]
        args: partner::AuthArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Create a cluster described by a spec file (compose, Kubernetes).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// gRPC health check of one server: exit 0 when it is SERVING, 1 otherwise (for container
    /// health checks, which run without a shell).
    Probe {
        /// host:port of the server.
        address: String,
        /// The service to ask about (empty: the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
        /// With TLS: the role the server holds.
        #[arg(long, value_enum, default_value_t = ServerRole::Router)]
        server: ServerRole,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Create a cluster CA and issue certificates from it (names: router, cell-<cell>-<node>,
    /// control-<node>, admin, enroller-<centre>, partner-<id>).
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Print a shell completion script: `nidctl completion bash > /etc/bash_completion.d/nidctl`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Add, drain and remove data cells; need the admin credential.
    Cell {
        #[command(subcommand)]
        command: cells::CellCommand,
        #[command(flatten)]
        admin: partner::AdminArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Watch and steer the rebalancer that moves buckets between cells.
    Rebalance {
        #[command(subcommand)]
        command: cells::RebalanceCommand,
        #[command(flatten)]
        admin: partner::AdminArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Audit-trail tools; need the admin credential.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        admin: partner::AdminArgs,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Initialize the cluster a spec file describes (TOML: name, id_scheme_seed or
    /// id_scheme_seed_file, control = [addresses], [[cells]] with cell_id and replicas of node_id,
    /// address and zone). Waits for leaders; idempotent.
    Init {
        /// The spec file.
        #[arg(long)]
        spec: PathBuf,
        /// How long to wait for the cells to elect leaders, in seconds.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
}

/// The roles that serve.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ServerRole {
    /// A router.
    Router,
    /// A data-cell replica.
    Cell,
    /// A control-cell replica.
    Control,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create the CA (ca.pem, ca.key) in DIR unless it exists.
    InitCa {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue NAME.pem and NAME.key in DIR from its CA (replacing an older pair: running
    /// processes pick the new one up within seconds, or at once on SIGHUP).
    Issue {
        /// The certificate name.
        name: String,
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
    /// Copy `ca.pem` and the one certificate pair of FROM into TO (key 0400), after checking
    /// that the pair is valid now and issued by that CA (a Kubernetes init container's step).
    Install {
        /// The directory holding ca.pem and one NAME.pem/NAME.key.
        #[arg(long)]
        from: PathBuf,
        /// Where to put them.
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an identity's audit hash chain; exit 3 when it is broken.
    Verify {
        /// The UIN.
        uin: String,
    },
}

/// Where the router is.
#[derive(Debug, clap::Args)]
struct Target {
    /// Router address host:port (default: the dev cluster's, from DIR/cluster.json).
    #[arg(long, global = true)]
    router: Option<String>,
    /// Dev cluster directory holding cluster.json.
    #[arg(long, default_value = ".nid/dev", global = true)]
    dev_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start (or resume) a local cluster: a control cell, N data cells of 3 replicas, a router.
    Up {
        /// Data cells.
        #[arg(long, default_value_t = 2)]
        cells: u64,
        /// Replicas per cell (3: one per zone).
        #[arg(long, default_value_t = 3)]
        replicas: u64,
        /// Where data, logs and cluster.json go.
        #[arg(long, default_value = ".nid/dev")]
        data_dir: PathBuf,
        /// Plaintext gRPC, every caller accepted (development only). Default: a dev CA in
        /// DIR/secrets/tls and a certificate for every process and client role.
        #[arg(long)]
        insecure: bool,
    },
    /// Add a data cell (three new replicas, zone-a/b/c) to the running `dev up` cluster and
    /// register it; the rebalancer then moves its share of the buckets to it.
    AddCell {
        /// The dev cluster's directory.
        #[arg(long, default_value = ".nid/dev")]
        data_dir: PathBuf,
    },
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(f)
}

/// For commands that dial: the dev cluster directory they work in and the certificate they
/// present by default. None for commands that dial nothing, and for `dev up`/`dev add-cell`,
/// which issue (or renew) the dev certificates first and then dial as the admin.
fn defaults(command: &Command) -> Option<(PathBuf, &'static str)> {
    match command {
        Command::Enroll { target, .. } | Command::Get { target, .. } => {
            Some((target.dev_dir.clone(), "enroller-dev"))
        }
        Command::Auth { target, .. } => Some((target.dev_dir.clone(), "partner-dev-partner")),
        Command::Status { target }
        | Command::Partner { target, .. }
        | Command::Cell { target, .. }
        | Command::Rebalance { target, .. }
        | Command::Audit { target, .. } => Some((target.dev_dir.clone(), "admin")),
        Command::Cluster { .. } | Command::Probe { .. } => Some((PathBuf::from(".nid/dev"), "admin")),
        Command::Id { .. } | Command::Dev { .. } | Command::Cert { .. } | Command::Completion { .. } => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some((dev_dir, default_name)) = defaults(&cli.command) {
        let tls_dir = cli.tls_dir.clone().or_else(|| dev::cluster_tls_dir(&dev_dir));
        let own = match (&cli.command, &tls_dir) {
            (Command::Probe { .. }, Some(dir)) => tls::only_certificate(dir),
            _ => None,
        };
        let name = cli.as_name.as_deref().or(own.as_deref()).unwrap_or(default_name);
        if let Err(e) = tls::init(tls_dir.as_deref(), name) {
            eprintln!("nidctl: {e:#}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Id { command } => config::Config::load(cli.config.as_deref())
            .and_then(|config| id::run(command, &config, cli.output)),
        Command::Dev { command: DevCommand::Up { cells, replicas, data_dir, insecure } } => {
            block_on(dev::up(cells, replicas, &data_dir, insecure)).map(|()| ExitCode::SUCCESS)
        }
        Command::Dev { command: DevCommand::AddCell { data_dir } } => {
            block_on(dev::add_cell(&data_dir, cli.output)).map(|()| ExitCode::SUCCESS)
        }
        Command::Cell { command, admin, target } => {
            block_on(cells::cell(command, &admin, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Rebalance { command, admin, target } => {
            block_on(cells::rebalance(command, &admin, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Enroll { args, target } => {
            block_on(identity::enroll(args, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Status { target } => {
            block_on(status::run(target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Get { id, target } => {
            block_on(identity::get(id, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Partner { command, admin, target } => {
            block_on(partner::partner(command, &admin, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Auth { args, target } => {
            block_on(partner::auth(args, target.router.as_deref(), &target.dev_dir, cli.output))
        }
        Command::Cluster { command: ClusterCommand::Init { spec, wait_secs } } => {
            block_on(cluster::init(&spec, std::time::Duration::from_secs(wait_secs)))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Probe { address, service, server, timeout_ms } => {
            let server = match server {
                ServerRole::Router => "router",
                ServerRole::Cell => "cell",
                ServerRole::Control => "control",
            };
            let timeout = std::time::Duration::from_millis(timeout_ms);
            match block_on(cluster::probe(&address, server, &service, timeout)) {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => {
                    eprintln!("nidctl: {address} is not serving");
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("nidctl: {e:#}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Cert { command: CertCommand::InitCa { dir } } => {
            nid_support::pki::ensure_ca(&dir, "nid cluster CA").map(|()| ExitCode::SUCCESS)
        }
        Command::Cert { command: CertCommand::Issue { name, dir, days } } => {
            nid_support::pki::issue(&dir, &name, days).map(|()| ExitCode::SUCCESS)
        }
        Command::Cert { command: CertCommand::Install { from, to } } => {
            tls::install(&from, &to).map(|name| {
                println!("installed {name} and the CA from {} into {}", from.display(), to.display());
                ExitCode::SUCCESS
            })
        }
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "nidctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command: AuditCommand::Verify { uin }, admin, target } => block_on(
            partner::audit_verify(uin, &admin, target.router.as_deref(), &target.dev_dir, cli.output),
        ),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("nidctl: {error:#}");
            ExitCode::from(2)
        }
    }
}
