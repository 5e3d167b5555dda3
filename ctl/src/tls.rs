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

/// `nidctl cert install --from SRC --to DST`: copies `ca.pem` and the one certificate pair of
/// `SRC` (as [`only_certificate`] finds it) into `DST`, after checking that the pair loads, is
/// valid now and was issued by that CA. Certificates are written 0444 and the key 0400, each
/// beside its target and renamed over it. What a Kubernetes init container runs to give a
/// replica its own pair out of its cell's Secret (deploy/k8s/README.md). Returns the pair's name.
pub fn install(from: &Path, to: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let name = only_certificate(from).with_context(|| {
        format!("{} does not hold exactly one certificate pair beside ca.pem", from.display())
    })?;
    let paths = TlsPaths::in_dir(from, &name);
    Tls::load(paths.clone(), &prometheus::Registry::new())
        .with_context(|| format!("the pair {name} in {}", from.display()))?;
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    let target = TlsPaths::in_dir(to, &name);
    for (src, dst, mode) in
        [(&paths.ca, &target.ca, 0o444), (&paths.cert, &target.cert, 0o444), (&paths.key, &target.key, 0o400)]
    {
        let bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
        nid_support::pki::write_atomically(dst, &bytes, mode)?;
    }
    Ok(name)
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

    #[test]
    fn install_copies_one_checked_pair_and_refuses_a_pair_of_another_ca() {
        use std::os::unix::fs::PermissionsExt as _;
        let ca = tempfile::tempdir().unwrap();
        nid_support::pki::ensure_ca(ca.path(), "test CA").unwrap();
        nid_support::pki::issue(ca.path(), "cell-1-2", 1).unwrap();
        // A replica's directory in the cell's Secret: the CA and its pair under generic names.
        let secret = tempfile::tempdir().unwrap();
        let from = secret.path().join("1");
        std::fs::create_dir(&from).unwrap();
        for (src, dst) in [("ca.pem", "ca.pem"), ("cell-1-2.pem", "node.pem"), ("cell-1-2.key", "node.key")] {
            std::fs::copy(ca.path().join(src), from.join(dst)).unwrap();
        }
        let to = tempfile::tempdir().unwrap();
        assert_eq!(install(&from, to.path()).unwrap(), "node");
        for (file, mode) in [("ca.pem", 0o444), ("node.pem", 0o444), ("node.key", 0o400)] {
            let meta = std::fs::metadata(to.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
            assert_eq!(std::fs::read(to.path().join(file)).unwrap(), std::fs::read(from.join(file)).unwrap());
        }
        let loaded = Tls::load(TlsPaths::in_dir(to.path(), "node"), &prometheus::Registry::new()).unwrap();
        assert_eq!(loaded.identity().name(), "cell-1-2");

        // The same pair beside another CA's certificate is refused and nothing is written.
        let other = tempfile::tempdir().unwrap();
        nid_support::pki::ensure_ca(other.path(), "another CA").unwrap();
        std::fs::copy(other.path().join("ca.pem"), from.join("ca.pem")).unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert!(install(&from, empty.path()).is_err());
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);

        // A directory with two pairs (a whole Secret mounted by mistake) is refused.
        std::fs::copy(ca.path().join("ca.pem"), from.join("ca.pem")).unwrap();
        std::fs::copy(ca.path().join("cell-1-2.pem"), from.join("other.pem")).unwrap();
        let err = install(&from, empty.path()).unwrap_err();
        assert!(format!("{err:#}").contains("exactly one certificate pair"), "{err:#}");
    }
}
