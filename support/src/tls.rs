//! Mutual TLS on every nid connection (rustls, ring as the crypto provider).
//!
//! One cluster CA issues every certificate. A certificate's DNS SANs name who holds it (see
//! [`Peer`]): the server side derives the caller from the verified client certificate, never from
//! a field of the request, and a client checks that the server holds the role it dialled
//! (`router`, `cell` or `control` as a DNS SAN). Certificates are read from files and re-read on
//! SIGHUP or when the files change ([`Tls::spawn_reloader`]): new connections use the new
//! certificate, open ones carry on. A broken or half-written set of files is refused and the
//! previous certificate stays in use. The leaf's expiry is exported as
//! `nid_tls_certificate_expiry_timestamp_seconds`.

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};

/// A handshake that has not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once on one listener; a connection beyond is closed.
pub const MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress at once from one source address; a connection beyond is closed.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;

/// One handshake in progress from a source address (released on drop).
struct SourceSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<SourceSlot> {
        let mut map = counts.lock().ok()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot { counts: counts.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock()
            && let Some(n) = map.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
/// How often the certificate files are checked for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Where a process's certificate, key and the cluster CA are.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This process's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TlsPaths {
    /// `<dir>/ca.pem`, `<dir>/<name>.pem` and `<dir>/<name>.key`: the layout `nidctl cert` and
    /// `nidctl dev up` write.
    pub fn in_dir(dir: &Path, name: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// Where the certificate files are, from a process's settings: a directory in the `nidctl cert`
/// layout (files named after `name`) and/or explicit files, which override the directory's.
/// None when nothing is set; an error when explicit files are incomplete without a directory.
pub fn resolve_paths(
    dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    name: &str,
) -> Result<Option<TlsPaths>, String> {
    match (dir, ca, cert, key) {
        (None, None, None, None) => Ok(None),
        (Some(dir), ca, cert, key) => {
            let d = TlsPaths::in_dir(&dir, name);
            Ok(Some(TlsPaths {
                ca: ca.unwrap_or(d.ca),
                cert: cert.unwrap_or(d.cert),
                key: key.unwrap_or(d.key),
            }))
        }
        (None, Some(ca), Some(cert), Some(key)) => Ok(Some(TlsPaths { ca, cert, key })),
        _ => Err("--tls-ca, --tls-cert and --tls-key go together (or give --tls-dir)".into()),
    }
}

/// Who holds a certificate, from its DNS SANs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A router (`router` or `router-<name>`).
    Router(String),
    /// A replica of a data cell (`cell-<cell>-<node>`).
    Cell {
        /// Its cell.
        cell: u64,
        /// Its node id.
        node: u64,
    },
    /// A replica of the control cell (`control-<node>`).
    Control {
        /// Its node id.
        node: u64,
    },
    /// An operator with administrative rights (`admin` or `admin-<name>`).
    Admin(String),
    /// An enrolment centre or identity administrator (`enroller-<centre>`).
    Enroller(String),
    /// A relying party that authenticates people (`partner-<id>`).
    Partner(String),
}

/// A DNS label of lowercase letters, digits and inner hyphens.
fn label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Peer {
    /// Parses a certificate name; None for role-only names (`cell`, `control`) and anything else.
    pub fn parse(name: &str) -> Option<Peer> {
        if !label(name) {
            return None;
        }
        let suffix = |prefix: &str| name.strip_prefix(prefix).filter(|s| !s.is_empty());
        if name == "router" || suffix("router-").is_some() {
            return Some(Peer::Router(name.to_owned()));
        }
        if name == "admin" || suffix("admin-").is_some() {
            return Some(Peer::Admin(name.to_owned()));
        }
        if let Some(rest) = suffix("cell-") {
            let (cell, node) = rest.split_once('-')?;
            return Some(Peer::Cell { cell: cell.parse().ok()?, node: node.parse().ok()? });
        }
        if let Some(node) = suffix("control-") {
            return Some(Peer::Control { node: node.parse().ok()? });
        }
        if let Some(centre) = suffix("enroller-") {
            return Some(Peer::Enroller(centre.to_owned()));
        }
        suffix("partner-").map(|id| Peer::Partner(id.to_owned()))
    }

    /// The certificate name.
    pub fn name(&self) -> String {
        match self {
            Peer::Router(n) | Peer::Admin(n) => n.clone(),
            Peer::Cell { cell, node } => format!("cell-{cell}-{node}"),
            Peer::Control { node } => format!("control-{node}"),
            Peer::Enroller(c) => format!("enroller-{c}"),
            Peer::Partner(p) => format!("partner-{p}"),
        }
    }

    /// The role, as a metric label.
    pub fn role(&self) -> &'static str {
        match self {
            Peer::Router(_) => "router",
            Peer::Cell { .. } => "cell",
            Peer::Control { .. } => "control",
            Peer::Admin(_) => "admin",
            Peer::Enroller(_) => "enroller",
            Peer::Partner(_) => "partner",
        }
    }

    /// The DNS SAN a server of this role presents, if it serves: what a client dials.
    pub fn server_name(&self) -> Option<&'static str> {
        match self {
            Peer::Router(_) => Some("router"),
            Peer::Cell { .. } => Some("cell"),
            Peer::Control { .. } => Some("control"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The DNS SANs and expiry (Unix seconds) of a DER certificate.
pub fn names_and_expiry(der: &[u8]) -> anyhow::Result<(Vec<String>, i64)> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| anyhow::anyhow!("not an X.509 certificate"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push((*n).to_owned());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// The holder of a verified chain: the first SAN of the leaf that names a [`Peer`].
pub fn peer_of_chain(certs: &[CertificateDer<'_>]) -> Option<Peer> {
    let (names, _) = names_and_expiry(certs.first()?).ok()?;
    names.iter().find_map(|n| Peer::parse(n))
}

/// The caller of a request on a TLS listener (None on a plaintext one): the [`Peer`] the access
/// layer left in the extensions, else parsed from the connection's certificate.
pub fn peer_of(extensions: &http::Extensions) -> Option<Peer> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    if let Some(peer) = extensions.get::<Peer>() {
        return Some(peer.clone());
    }
    let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
    peer_of_chain(&info.peer_certs()?)
}

/// One loaded set of certificate files.
struct Loaded {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    identity: Peer,
    not_after: i64,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

fn stamp(paths: &TlsPaths) -> Vec<Option<(SystemTime, u64)>> {
    [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(paths: &TlsPaths, check_own: bool) -> anyhow::Result<Loaded> {
    let stamp = stamp(paths);
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.ca)
        .with_context(|| format!("read the CA certificate {}", paths.ca.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse the CA certificate {}", paths.ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c).context("the CA certificate is not usable as a trust anchor")?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", paths.ca.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .with_context(|| format!("read the certificate {}", paths.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse the certificate {}", paths.cert.display()))?;
    let leaf = chain.first().with_context(|| format!("{} holds no certificate", paths.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .with_context(|| format!("read the private key {}", paths.key.display()))?;
    let (names, not_after) = names_and_expiry(leaf)?;
    let identity = names
        .iter()
        .find_map(|n| Peer::parse(n))
        .with_context(|| format!("{} names no nid identity (SANs {names:?})", paths.cert.display()))?;
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .context("client verifier")?;
    // Our own certificate must chain to the CA and be valid now: a mistake shows at start-up,
    // not as every peer refusing us.
    if check_own {
        verifier.verify_client_cert(leaf, &chain[1..], UnixTime::now()).map_err(|e| {
            anyhow::anyhow!("{} is not valid under the cluster CA: {e}", paths.cert.display())
        })?;
    }
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .context("the certificate and the private key do not belong together")?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the certificate and the private key do not belong together")?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { server: Arc::new(server), client: Arc::new(client), identity, not_after, stamp })
}

/// A process's TLS identity, reloadable.
pub struct Tls {
    paths: TlsPaths,
    current: RwLock<Arc<Loaded>>,
    expiry: prometheus::IntGauge,
    reloads: prometheus::IntCounterVec,
    handshake_failures: prometheus::IntCounter,
}

impl Tls {
    /// Loads the files (a failure names the file and why) and registers the TLS metrics.
    pub fn load(paths: TlsPaths, registry: &prometheus::Registry) -> anyhow::Result<Arc<Tls>> {
        Tls::load_checked(paths, registry, true)
    }

    /// Like [`Tls::load`] but without checking that the own certificate is valid now and issued
    /// by the CA: only for tests that must present an expired or foreign certificate.
    pub fn load_unverified(paths: TlsPaths, registry: &prometheus::Registry) -> anyhow::Result<Arc<Tls>> {
        Tls::load_checked(paths, registry, false)
    }

    fn load_checked(
        paths: TlsPaths,
        registry: &prometheus::Registry,
        check_own: bool,
    ) -> anyhow::Result<Arc<Tls>> {
        let loaded = load(&paths, check_own)?;
        let expiry = prometheus::IntGauge::new(
            "nid_tls_certificate_expiry_timestamp_seconds",
            "When this process's certificate expires (Unix seconds).",
        )?;
        let reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new("nid_tls_reloads_total", "Certificate reloads by result (ok, error)."),
            &["result"],
        )?;
        let handshake_failures = prometheus::IntCounter::new(
            "nid_tls_handshake_failures_total",
            "Incoming connections whose TLS handshake failed or timed out (no certificate, another CA, expired).",
        )?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        expiry.set(loaded.not_after);
        Ok(Arc::new(Tls {
            paths,
            current: RwLock::new(Arc::new(loaded)),
            expiry,
            reloads,
            handshake_failures,
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Who this process is.
    pub fn identity(&self) -> Peer {
        self.current().identity.clone()
    }

    /// When the certificate in use expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.current().not_after
    }

    /// Re-reads the files if they changed (or always with `force`). Ok(true) when a new
    /// certificate is in use; on error the previous one stays.
    pub fn reload(&self, force: bool) -> anyhow::Result<bool> {
        let old = self.current();
        if !force && stamp(&self.paths) == old.stamp {
            return Ok(false);
        }
        match load(&self.paths, true) {
            Ok(new) => {
                if new.identity != old.identity {
                    self.reloads.with_label_values(&["error"]).inc();
                    anyhow::bail!(
                        "the new certificate names {} but this process is {}",
                        new.identity,
                        old.identity
                    );
                }
                self.expiry.set(new.not_after);
                match self.current.write() {
                    Ok(mut c) => *c = Arc::new(new),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
                }
                self.reloads.with_label_values(&["ok"]).inc();
                Ok(true)
            }
            Err(e) => {
                self.reloads.with_label_values(&["error"]).inc();
                Err(e)
            }
        }
    }

    /// Reloads on SIGHUP and whenever the files change, until the runtime ends. A failed reload
    /// is logged once per change of the files.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut failed_stamp = None;
            loop {
                let forced = tokio::select! {
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                    () = tokio::time::sleep(RELOAD_POLL) => false,
                };
                let now = stamp(&tls.paths);
                if !forced && failed_stamp.as_ref() == Some(&now) {
                    continue;
                }
                match tls.reload(forced) {
                    Ok(true) => {
                        failed_stamp = None;
                        tracing::info!(not_after = tls.not_after(), "certificate reloaded");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failed_stamp = Some(now);
                        tracing::warn!(error = %format!("{e:#}"), "certificate reload refused; the previous certificate stays in use");
                    }
                }
            }
        });
    }

    /// The TLS connections accepted on `listener`; handshakes run off the accept loop, each
    /// within [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once and
    /// [`MAX_HANDSHAKES_PER_SOURCE`] per source address: beyond that a new connection is closed at
    /// once (and counted), so idle connections from one place cannot stop the listener accepting
    /// others. Ends when the server drops the stream.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
            Arc::default();
        tokio::spawn(async move {
            loop {
                let (tcp, source) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => {
                            // Out of descriptors or an aborted connection: wait a moment.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tls.handshake_failures.inc();
                    continue;
                };
                let Some(slot) = SourceSlot::take(&per_source, source.ip()) else {
                    tls.handshake_failures.inc();
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server.clone());
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop((permit, slot));
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        _ => tls.handshake_failures.inc(),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A connector for tonic that dials TLS and expects the server to hold `server_name`
    /// (`router`, `cell` or `control`).
    pub fn connector(self: &Arc<Self>, server_name: &'static str) -> TlsConnector {
        TlsConnector { tls: self.clone(), server_name }
    }
}

/// Dials TLS with the current client certificate (see [`Tls::connector`]).
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<Tls>,
    server_name: &'static str,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.current().client.clone();
        let server_name = self.server_name;
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
            let host = uri.host().ok_or_else(|| invalid("no host in the address"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or_else(|| invalid("no port in the address"))?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server_name).map_err(|_| invalid("bad server name"))?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// How a client reaches nid servers: plaintext (development) or mutual TLS.
#[derive(Clone)]
pub enum Dial {
    /// Plaintext HTTP/2 (`--insecure`).
    Plain,
    /// Mutual TLS with this identity.
    Tls(Arc<Tls>),
}

impl Dial {
    /// The endpoint for `address` (host:port), to tune before connecting.
    pub fn endpoint(address: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
    }

    /// Connects now to a server of role `server_name`.
    pub async fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
        server_name: &'static str,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match self {
            Dial::Plain => endpoint.connect().await,
            Dial::Tls(tls) => endpoint.connect_with_connector(tls.connector(server_name)).await,
        }
    }

    /// A channel that connects (and reconnects) when used.
    pub fn connect_lazy(
        &self,
        endpoint: tonic::transport::Endpoint,
        server_name: &'static str,
    ) -> tonic::transport::Channel {
        match self {
            Dial::Plain => endpoint.connect_lazy(),
            Dial::Tls(tls) => endpoint.connect_with_connector_lazy(tls.connector(server_name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_parse_to_their_holders_and_back() {
        for (name, peer) in [
            ("router", Peer::Router("router".into())),
            ("router-a", Peer::Router("router-a".into())),
            ("cell-3-12", Peer::Cell { cell: 3, node: 12 }),
            ("control-2", Peer::Control { node: 2 }),
            ("admin", Peer::Admin("admin".into())),
            ("enroller-centre-7", Peer::Enroller("centre-7".into())),
            ("partner-bank-a", Peer::Partner("bank-a".into())),
        ] {
            assert_eq!(Peer::parse(name), Some(peer.clone()), "{name}");
            assert_eq!(peer.name(), name);
        }
        for name in [
            "cell",
            "control",
            "cell-3",
            "cell-x-1",
            "control-",
            "partner-",
            "Router",
            "evil",
            "cell-1-2-3",
            "-admin",
        ] {
            assert_eq!(Peer::parse(name), None, "{name}");
        }
    }
}
