//! `nidctl partner add|list|revoke`, `nidctl audit verify` (admin credential) and `nidctl auth`
//! (a partner's API key): the partner-facing and audit side of the CLI.

use crate::Output;
use crate::credentials::{admin_token, with_bearer};
use crate::dev;
use crate::identity::describe;
use nid_proto::v1::admin_client::AdminClient;
use nid_proto::v1::authentication_client::AuthenticationClient;
use nid_proto::v1::{
    AddPartnerRequest, AuthFactors, AuthReason, AuthTypeGrant, AuthenticateRequest, DemographicFactor,
    ListPartnersRequest, MatchMode, RevokePartnerRequest, UpdatePartnerRequest, VerifyAuditChainRequest,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the admin credential comes from.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Admin token (hex); prefer the environment or a file.
    #[arg(long, env = "NID_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token (default: the dev cluster's DIR/secrets/admin.token).
    #[arg(long, global = true)]
    pub admin_token_file: Option<PathBuf>,
}

/// `nidctl partner ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PartnerCommand {
    /// Register a partner; prints its API key once.
    Add {
        /// Partner id, 1..=64 of a-z 0-9 '-'.
        id: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Factors it may use: demographic, pin, totp (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<String>,
        /// Rate limit over the cluster, authentications per second ("200" or "200/s"; 0: none).
        #[arg(long, default_value = "0", value_parser = parse_rate)]
        rate: u32,
        /// Burst above the rate (0: as many as the rate).
        #[arg(long, default_value_t = 0)]
        burst: u32,
    },
    /// Change a partner's display name or rate limit (its API key stays).
    Update {
        /// Partner id.
        id: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New rate limit, authentications per second ("200" or "200/s"; 0: none).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<u32>,
        /// New burst (0: as many as the rate).
        #[arg(long)]
        burst: Option<u32>,
    },
    /// List partners (secrets are never shown).
    List,
    /// Revoke a partner: its API key stops working on every router within about a second.
    Revoke {
        /// Partner id.
        id: String,
    },
}

/// `nidctl auth` arguments.
#[derive(Debug, clap::Args)]
pub struct AuthArgs {
    /// UIN or VID.
    pub id: String,
    /// Partner API key `<partner-id>.<secret>` (default: the dev partner's key file).
    #[arg(long, env = "NID_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Transaction id (default: a fresh one).
    #[arg(long)]
    pub txn: Option<String>,
    /// PIN.
    #[arg(long)]
    pub pin: Option<String>,
    /// TOTP code.
    #[arg(long)]
    pub totp: Option<String>,
    /// Full name to match.
    #[arg(long)]
    pub name: Option<String>,
    /// Date of birth to match.
    #[arg(long)]
    pub dob: Option<String>,
    /// Compare demographics normalized (NFKC, case fold, whitespace) instead of exactly.
    #[arg(long)]
    pub normalized: bool,
}

/// The router's Admin client and the admin token (flag, environment, or the dev cluster's file).
pub(crate) async fn admin_client(
    admin: &AdminArgs,
    router: Option<&str>,
    dir: &Path,
) -> anyhow::Result<(AdminClient<tonic::transport::Channel>, String)> {
    let default = dir.join("secrets").join("admin.token");
    let file = admin.admin_token_file.clone().or_else(|| default.exists().then_some(default));
    let token = admin_token(admin.admin_token.as_deref(), file.as_deref())?;
    let address = dev::router_address(router, dir)?;
    Ok((AdminClient::new(dev::channel(&address).await?), token))
}

/// `nidctl partner ...`.
pub async fn partner(
    command: PartnerCommand,
    admin: &AdminArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let (mut client, token) = admin_client(admin, router, dir).await?;
    let result = match command {
        PartnerCommand::Add { id, name, allow, rate, burst } => {
            let request = AddPartnerRequest {
                partner_id: id,
                name,
                allowed: allow.into_iter().map(|auth_type| AuthTypeGrant { auth_type }).collect(),
                rate_per_second: rate,
                burst,
            };
            client.add_partner(with_bearer(request, &token)?).await.map(|r| {
                let r = r.into_inner();
                match output {
                    Output::Table => {
                        println!("{}", r.api_key);
                        eprintln!("nidctl: the API key is shown once; store it now");
                    }
                    Output::Json => println!("{}", serde_json::json!({"api_key": r.api_key})),
                }
            })
        }
        PartnerCommand::List => {
            client.list_partners(with_bearer(ListPartnersRequest {}, &token)?).await.map(|r| {
                for p in r.into_inner().partners {
                    match output {
                        Output::Table => println!(
                            "{:<24} {:<8} {:<28} {:<16} {}",
                            p.partner_id,
                            if p.revoked { "revoked" } else { "active" },
                            p.allowed_auth_types.join(","),
                            limit_text(p.rate_per_second, p.burst),
                            p.name
                        ),
                        Output::Json => println!(
                            "{}",
                            serde_json::json!({"partner_id": p.partner_id, "name": p.name,
                            "allowed": p.allowed_auth_types, "revoked": p.revoked,
                            "rate_per_second": p.rate_per_second, "burst": p.burst})
                        ),
                    }
                }
            })
        }
        PartnerCommand::Update { id, name, rate, burst } => {
            let request = UpdatePartnerRequest { partner_id: id, name, rate_per_second: rate, burst };
            client.update_partner(with_bearer(request, &token)?).await.map(|r| {
                let p = r.into_inner().partner.unwrap_or_default();
                match output {
                    Output::Table => {
                        println!("{} {}", p.partner_id, limit_text(p.rate_per_second, p.burst))
                    }
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"partner_id": p.partner_id, "name": p.name,
                        "rate_per_second": p.rate_per_second, "burst": p.burst})
                    ),
                }
            })
        }
        PartnerCommand::Revoke { id } => client
            .revoke_partner(with_bearer(RevokePartnerRequest { partner_id: id }, &token)?)
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("nidctl: {}", describe(&e));
            Ok(ExitCode::from(1))
        }
    }
}

/// `nidctl audit verify <UIN>`: exit 0 when the chain is intact, 3 when it is broken.
pub async fn audit_verify(
    uin: String,
    admin: &AdminArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let (mut client, token) = admin_client(admin, router, dir).await?;
    match client.verify_audit_chain(with_bearer(VerifyAuditChainRequest { uin }, &token)?).await {
        Ok(r) => {
            let r = r.into_inner();
            match output {
                Output::Table if r.intact => println!("intact: {} records", r.records),
                Output::Table => println!("BROKEN at record {} ({} records read)", r.first_broken, r.records),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"intact": r.intact, "records": r.records, "first_broken": r.first_broken})
                ),
            }
            Ok(if r.intact { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        Err(e) => {
            eprintln!("nidctl: {}", describe(&e));
            Ok(ExitCode::from(1))
        }
    }
}

/// `nidctl auth`: exit 0 on yes, 4 on no.
pub async fn auth(
    args: AuthArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let key = match args.api_key {
        Some(k) => k,
        None => std::fs::read_to_string(dir.join("secrets").join("dev-partner.apikey"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| anyhow::anyhow!("no --api-key and no dev partner key in {}", dir.display()))?,
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let demographic = (args.name.is_some() || args.dob.is_some()).then(|| DemographicFactor {
        full_name: args.name.unwrap_or_default(),
        date_of_birth: args.dob.unwrap_or_default(),
        match_mode: if args.normalized { MatchMode::Normalized } else { MatchMode::Exact } as i32,
        ..Default::default()
    });
    let request = AuthenticateRequest {
        id: args.id,
        transaction_id: args.txn.unwrap_or_else(|| format!("nidctl-{}", now.as_nanos())),
        request_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
        factors: Some(AuthFactors {
            demographic,
            pin: args.pin.unwrap_or_default(),
            totp: args.totp.unwrap_or_default(),
        }),
    };
    let address = dev::router_address(router, dir)?;
    let mut client = AuthenticationClient::new(dev::channel(&address).await?);
    match client.authenticate(with_bearer(request, &key)?).await {
        Ok(r) => {
            let r = r.into_inner();
            let d = r.decision.unwrap_or_default();
            let reasons: Vec<&str> = d
                .reasons
                .iter()
                .map(|&x| AuthReason::try_from(x).map(|r| r.as_str_name()).unwrap_or("UNKNOWN"))
                .map(|s| s.trim_start_matches("AUTH_REASON_"))
                .collect();
            match output {
                Output::Table if d.authenticated => {
                    println!("YES token={} key={}", d.partner_token, r.key_id)
                }
                Output::Table => println!("NO {}", reasons.join(",")),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"authenticated": d.authenticated, "reasons": reasons,
                        "partner_token": d.partner_token, "transaction_id": d.transaction_id,
                        "key_id": r.key_id, "signature": hex::encode(&r.signature)})
                ),
            }
            Ok(if d.authenticated { ExitCode::SUCCESS } else { ExitCode::from(4) })
        }
        Err(e) => {
            eprintln!("nidctl: {}", describe(&e));
            Ok(ExitCode::from(1))
        }
    }
}

/// "200" or "200/s".
fn parse_rate(text: &str) -> Result<u32, String> {
    text.trim_end_matches("/s")
        .parse()
        .map_err(|_| "expected authentications per second, e.g. 200/s".to_owned())
}

fn limit_text(rate: u32, burst: u32) -> String {
    match (rate, burst) {
        (0, _) => "no limit".to_owned(),
        (r, 0) => format!("{r}/s"),
        (r, b) => format!("{r}/s burst {b}"),
    }
}
