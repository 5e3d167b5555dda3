//! `nidctl enroll` and `nidctl get`: enrol a person and read a record through the router.

use crate::Output;
use crate::dev;
use nid_proto::error::FieldViolations;
use nid_proto::v1::{Demographics, EnrollRequest, GetIdentityRequest, Identity, IdentityStatus};
use std::path::Path;
use std::process::ExitCode;

/// Enrolment arguments.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// Registration id (1..=64 of A-Z a-z 0-9 _ -); a repeated RID returns the existing UIN.
    #[arg(long)]
    pub rid: String,
    /// Full name.
    #[arg(long)]
    pub name: String,
    /// Date of birth, YYYY-MM-DD.
    #[arg(long)]
    pub dob: String,
    /// Phone, E.164.
    #[arg(long)]
    pub phone: Option<String>,
    /// E-mail.
    #[arg(long)]
    pub email: Option<String>,
    /// PIN, 4..=8 digits.
    #[arg(long)]
    pub pin: Option<String>,
}

/// A one-line description of a failed call: the code and message, or the bad fields.
pub fn describe(status: &tonic::Status) -> String {
    let violations = FieldViolations::from_status(status);
    if violations.is_empty() {
        format!("{:?}: {}", status.code(), status.message())
    } else {
        let parts: Vec<String> = violations.violations().iter().map(|(f, d)| format!("{f} {d}")).collect();
        format!("invalid argument: {}", parts.join("; "))
    }
}

/// `nidctl enroll`.
pub async fn enroll(
    args: EnrollArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let address = dev::router_address(router, dir)?;
    let mut client = dev::enrollment_client(&address).await?;
    let request = EnrollRequest {
        rid: args.rid,
        demographics: Some(Demographics {
            full_name: args.name,
            date_of_birth: args.dob,
            phone: args.phone.unwrap_or_default(),
            email: args.email.unwrap_or_default(),
            ..Default::default()
        }),
        pin: args.pin.unwrap_or_default(),
        ..Default::default()
    };
    match client.enroll(request).await {
        Ok(r) => {
            let r = r.into_inner();
            match output {
                Output::Table => println!("{}", r.uin),
                Output::Json => println!("{}", serde_json::json!({"uin": r.uin, "created": r.created})),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("nidctl: enrol failed: {}", describe(&e));
            Ok(ExitCode::from(1))
        }
    }
}

/// `nidctl get`.
pub async fn get(id: String, router: Option<&str>, dir: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let address = dev::router_address(router, dir)?;
    let mut client = dev::enrollment_client(&address).await?;
    match client.get_identity(GetIdentityRequest { id }).await {
        Ok(r) => {
            let Some(identity) = r.into_inner().identity else {
                eprintln!("nidctl: the router returned no record");
                return Ok(ExitCode::from(1));
            };
            print_identity(&identity, output);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("nidctl: get failed: {}", describe(&e));
            Ok(ExitCode::from(1))
        }
    }
}

fn print_identity(i: &Identity, output: Output) {
    let d = i.demographics.clone().unwrap_or_default();
    let status = IdentityStatus::try_from(i.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
    match output {
        Output::Table => {
            println!("uin            {}", i.uin);
            println!("rid            {}", i.rid);
            println!("status         {}", status.trim_start_matches("IDENTITY_STATUS_"));
            println!("version        {}", i.version);
            println!("full name      {}", d.full_name);
            println!("date of birth  {}", d.date_of_birth);
            println!("pin enrolled   {}", i.has_pin);
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "uin": i.uin, "rid": i.rid, "status": status, "version": i.version,
                "full_name": d.full_name, "date_of_birth": d.date_of_birth, "has_pin": i.has_pin,
            })
        ),
    }
}
