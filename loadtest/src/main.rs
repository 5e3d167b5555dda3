//! `nid-loadtest`: the load-test harness (issue #6 builds it; this binary only reports that so far).

fn main() -> std::process::ExitCode {
    eprintln!("nid-loadtest {}: not implemented yet (see issue #6)", env!("CARGO_PKG_VERSION"));
    std::process::ExitCode::from(2)
}
