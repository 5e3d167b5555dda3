//! A small certificate authority for nid clusters (`nidctl cert`, `nidctl dev up`, the tests):
//! one CA, then one certificate per process and per client, named as [`crate::tls::Peer`] says.
//! Keys are ECDSA P-256, written with mode 0600.

use crate::tls::Peer;
use anyhow::Context as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What the CA's files are called in a certificate directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (keep it off the machines that run nid in production).
pub const CA_KEY: &str = "ca.key";

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomically(path, contents.as_bytes(), 0o600)
}

/// Writes `bytes` to `path` with permission bits `mode`: into a fresh file beside it, synced, then
/// renamed over it, so a reloading process never reads half a file.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover of an interrupted write could carry other permission bits: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn to_time(t: SystemTime) -> anyhow::Result<time::OffsetDateTime> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).context("time before 1970")?.as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).context("time out of range")
}

/// Creates `ca.pem` and `ca.key` in `dir` unless they exist (then keeps them).
pub fn ensure_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    if dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = to_time(now - Duration::from_secs(3600))?;
    params.not_after = to_time(now + Duration::from_secs(10 * 365 * 86_400))?;
    let cert = params.self_signed(&key)?;
    write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
    std::fs::write(dir.join(CA_CERT), cert.pem()).context("write the CA certificate")?;
    Ok(())
}

/// Issues `<dir>/<name>.pem` and `<dir>/<name>.key` for `name` (a [`Peer`] name), valid from
/// `not_before` to `not_after`, signed by the CA in `dir`. Servers (routers, replicas) get their
/// role as a SAN as well and may serve; everyone may be a client. Replaces existing files.
pub fn issue_between(
    dir: &Path,
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<()> {
    let peer = Peer::parse(name).with_context(|| {
        format!(
            "{name:?} is not a nid certificate name (router[-x], cell-<cell>-<node>, control-<node>, admin[-x], enroller-<centre>, partner-<id>)"
        )
    })?;
    let ca_key = std::fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("read {}", dir.join(CA_KEY).display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).context("parse the CA key")?;
    let ca_cert = std::fs::read_to_string(dir.join(CA_CERT))
        .with_context(|| format!("read {}", dir.join(CA_CERT).display()))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).context("parse the CA certificate")?;
    let mut names = vec![name.to_owned()];
    let mut usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if let Some(server) = peer.server_name() {
        names.push(server.to_owned());
        usages.push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = usages;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = to_time(not_before)?;
    params.not_after = to_time(not_after)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    // Key first: a process polling the pair sees a mismatch (and waits) rather than an old key
    // under a new certificate for longer than one poll.
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    let cert_path = dir.join(format!("{name}.pem"));
    let tmp = cert_path.with_extension("pem.tmp");
    std::fs::write(&tmp, cert.pem()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &cert_path).with_context(|| format!("write {}", cert_path.display()))?;
    Ok(())
}

/// Issues a certificate for `name` valid for `days` from an hour ago.
pub fn issue(dir: &Path, name: &str, days: u64) -> anyhow::Result<()> {
    let now = SystemTime::now();
    issue_between(dir, name, now - Duration::from_secs(3600), now + Duration::from_secs(days * 86_400))
}

/// Issues a certificate for `name` unless its files exist and it is valid for another week.
pub fn ensure(dir: &Path, name: &str, days: u64) -> anyhow::Result<()> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let cert = dir.join(format!("{name}.pem"));
    if cert.exists() && dir.join(format!("{name}.key")).exists() {
        let week_ahead = SystemTime::now() + Duration::from_secs(7 * 86_400);
        let week_ahead =
            week_ahead.duration_since(SystemTime::UNIX_EPOCH).map_or(i64::MAX, |d| d.as_secs() as i64);
        let lasts = CertificateDer::from_pem_file(&cert)
            .ok()
            .and_then(|c| crate::tls::names_and_expiry(&c).ok())
            .is_some_and(|(_, not_after)| not_after > week_ahead);
        if lasts {
            return Ok(());
        }
    }
    issue(dir, name, days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Tls, TlsPaths};

    #[test]
    fn an_issued_certificate_loads_names_its_holder_and_reloads_when_replaced() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path(), "test CA").unwrap();
        issue(dir.path(), "cell-4-2", 30).unwrap();
        let registry = prometheus::Registry::new();
        let tls = Tls::load(TlsPaths::in_dir(dir.path(), "cell-4-2"), &registry).unwrap();
        assert_eq!(tls.identity(), Peer::Cell { cell: 4, node: 2 });
        let first = tls.not_after();
        assert!(!tls.reload(false).unwrap(), "unchanged files are not reloaded");
        issue(dir.path(), "cell-4-2", 60).unwrap();
        assert!(tls.reload(false).unwrap());
        assert!(tls.not_after() > first + 20 * 86_400);
        // Another holder's certificate under this name is refused; the old one stays.
        std::fs::copy(dir.path().join("ca.pem"), dir.path().join("x.pem")).unwrap();
        issue(dir.path(), "cell-4-3", 60).unwrap();
        std::fs::copy(dir.path().join("cell-4-3.pem"), dir.path().join("cell-4-2.pem")).unwrap();
        std::fs::copy(dir.path().join("cell-4-3.key"), dir.path().join("cell-4-2.key")).unwrap();
        assert!(tls.reload(true).is_err());
        assert_eq!(tls.identity(), Peer::Cell { cell: 4, node: 2 });
    }

    #[test]
    fn an_expired_certificate_or_one_from_another_ca_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path(), "test CA").unwrap();
        let now = SystemTime::now();
        issue_between(dir.path(), "router", now - Duration::from_secs(7200), now - Duration::from_secs(3600))
            .unwrap();
        let registry = prometheus::Registry::new();
        let err = Tls::load(TlsPaths::in_dir(dir.path(), "router"), &registry).err().unwrap();
        assert!(format!("{err:#}").contains("not valid"), "{err:#}");
        let other = tempfile::tempdir().unwrap();
        ensure_ca(other.path(), "other CA").unwrap();
        issue(other.path(), "router", 1).unwrap();
        let paths = TlsPaths {
            ca: dir.path().join("ca.pem"),
            cert: other.path().join("router.pem"),
            key: other.path().join("router.key"),
        };
        assert!(Tls::load(paths, &prometheus::Registry::new()).is_err());
    }
}
