//! `nid-router`: the stateless router (issue #4 builds it; this binary only reports that so far).

fn main() -> std::process::ExitCode {
    eprintln!("nid-router {}: not implemented yet (see issue #4)", env!("CARGO_PKG_VERSION"));
    std::process::ExitCode::from(2)
}
