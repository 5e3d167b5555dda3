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
