//! How nidctl reaches servers. With a certificate directory (`--tls-dir`, or the dev cluster's
//! `secrets/tls` when `dev up` made one) it speaks mutual TLS as `--as` (by default `admin`;
//! `enroller-dev` for enrol/get and `partner-dev-partner` for auth, the certificates `dev up`
//! issues).
//! Without one it speaks plaintext, which only `--insecure` servers accept.

use nid_support::tls::{Dial, Tls, TlsPaths};
use std::path::Path;
use std::sync::Mutex;

static DIAL: Mutex<Option<Dial>> = Mutex::new(None);

/// Dials as `name` from the certificates in `tls_dir`, or plaintext without one.
pub fn init(tls_dir: Option<&Path>, name: &str) -> anyhow::Result<()> {
    let dial = match tls_dir {
        Some(dir) => Dial::Tls(Tls::load(TlsPaths::in_dir(dir, name), &prometheus::Registry::new())?),
        None => Dial::Plain,
    };
    set(dial);
    Ok(())
}

/// The NAME of the one certificate (`NAME.pem` beside `ca.pem`) in `dir`, when it holds exactly
/// one: a container's certificate directory, mounted with its own pair only.
pub fn only_certificate(dir: &Path) -> Option<String> {
    let mut names = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pem").map(str::to_owned))
        .filter(|n| n != "ca");
    let first = names.next()?;
    names.next().is_none().then_some(first)
}

/// Dials with `dial` from now on.
pub fn set(dial: Dial) {
    if let Ok(mut d) = DIAL.lock() {
        *d = Some(dial);
    }
}

/// How to dial.
pub fn dial() -> Dial {
    DIAL.lock().ok().and_then(|d| d.clone()).unwrap_or(Dial::Plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_one_certificate_names_it_and_otherwise_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(only_certificate(dir.path()), None);
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        assert_eq!(only_certificate(dir.path()), None, "the CA is not a certificate to present");
        std::fs::write(dir.path().join("cell-1-2.pem"), "").unwrap();
        std::fs::write(dir.path().join("cell-1-2.key"), "").unwrap();
        assert_eq!(only_certificate(dir.path()).as_deref(), Some("cell-1-2"));
        std::fs::write(dir.path().join("admin.pem"), "").unwrap();
        assert_eq!(only_certificate(dir.path()), None, "two to choose from");
        assert_eq!(only_certificate(&dir.path().join("missing")), None);
    }
}
