//! How nidctl reaches servers. With a certificate directory (`--tls-dir`, or the dev cluster's
//! `secrets/tls` when `dev up` made one) it speaks mutual TLS as `--as` (by default `admin`;
//! `enroller-dev` for enrol/get and `partner-dev` for auth, the certificates `dev up` issues).
//! Without one it speaks plaintext, which only `--insecure` servers accept.

use nid_support::tls::{Dial, Tls, TlsPaths};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static DIAL: Mutex<Option<Dial>> = Mutex::new(None);

/// The dev cluster's certificate directory under `dev_dir`.
pub fn dev_tls_dir(dev_dir: &Path) -> PathBuf {
    dev_dir.join("secrets").join("tls")
}

/// Chooses how to dial: `tls_dir` if given, else the dev cluster's directory if it has a CA and
/// the cluster runs TLS, else plaintext.
pub fn init(tls_dir: Option<&Path>, name: &str, dev_dir: &Path) -> anyhow::Result<()> {
    let dir = match tls_dir {
        Some(d) => Some(d.to_path_buf()),
        None => {
            let d = dev_tls_dir(dev_dir);
            let insecure = crate::dev::load_cluster(dev_dir).map(|c| c.insecure).unwrap_or(false);
            (d.join(nid_support::pki::CA_CERT).exists() && !insecure).then_some(d)
        }
    };
    let dial = match dir {
        Some(dir) => Dial::Tls(Tls::load(TlsPaths::in_dir(&dir, name), &prometheus::Registry::new())?),
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
