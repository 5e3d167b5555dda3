//! Who may call what: a tower layer in front of every gRPC service of a TLS listener. It reads
//! the caller from the verified client certificate ([`crate::tls::peer_of`], left in the
//! request's extensions for the handlers) and the method from
//! the request path, and refuses before any request byte is parsed: UNAUTHENTICATED when the
//! certificate names no nid identity, PERMISSION_DENIED when the holder's role may not call the
//! method. Refusals are counted in `nid_access_denied_total{service,role}`.

use crate::tls::{Peer, peer_of};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// One call, as the policy sees it.
pub struct Call<'a> {
    /// For example `nid.v1.Cell`.
    pub service: &'a str,
    /// For example `Execute`.
    pub method: &'a str,
    /// The caller, by its certificate.
    pub peer: &'a Peer,
    /// The request headers (a gateway's forwarded credential).
    pub headers: &'a http::HeaderMap,
}

/// Whether a call is allowed.
pub type Policy = Arc<dyn Fn(&Call<'_>) -> bool + Send + Sync>;

/// The bearer token in `authorization`, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// The services every holder of a cluster certificate may call: health and reflection.
pub fn is_open(service: &str) -> bool {
    matches!(
        service,
        "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection"
    )
}

/// The services nid serves (metric labels; any other path counts as `other`).
const KNOWN: &[&str] = &[
    "nid.v1.Enrollment",
    "nid.v1.Authentication",
    "nid.v1.Admin",
    "nid.v1.Diagnostics",
    "nid.v1.Cell",
    "nid.v1.BucketAdmin",
    "nid.v1.RaftTransport",
    "nid.v1.Control",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// `("nid.v1.Cell", "Execute")` from `/nid.v1.Cell/Execute`.
pub fn split_path(path: &str) -> (&str, &str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split_once('/').unwrap_or((path, ""))
}

/// The layer; without a policy (a plaintext development listener) it lets everything through.
#[derive(Clone)]
pub struct AccessLayer {
    policy: Option<Policy>,
    denied: prometheus::IntCounterVec,
}

impl AccessLayer {
    /// A layer enforcing `policy` (None: plaintext, nothing to check), counting into `registry`.
    pub fn new(policy: Option<Policy>, registry: &prometheus::Registry) -> prometheus::Result<AccessLayer> {
        let denied = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "nid_access_denied_total",
                "Calls refused before parsing because the caller's certificate may not call the service.",
            ),
            &["service", "role"],
        )?;
        registry.register(Box::new(denied.clone()))?;
        Ok(AccessLayer { policy, denied })
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access { inner, policy: self.policy.clone(), denied: self.denied.clone() }
    }
}

/// The service the layer wraps around the routes.
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    policy: Option<Policy>,
    denied: prometheus::IntCounterVec,
}

impl<S> Access<S> {
    /// The caller, when the policy admits the call (None without a policy).
    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Peer>, tonic::Status> {
        let Some(policy) = &self.policy else { return Ok(None) };
        let (service, method) = split_path(request.uri().path());
        // Known service names only as labels: a caller cannot grow the metric with made-up paths.
        let label = KNOWN.iter().find(|k| **k == service).copied().unwrap_or("other");
        let Some(peer) = peer_of(request.extensions()) else {
            self.denied.with_label_values(&[label, "none"]).inc();
            return Err(tonic::Status::unauthenticated(
                "a client certificate of the cluster CA naming a nid identity is required",
            ));
        };
        if is_open(service) || policy(&Call { service, method, peer: &peer, headers: request.headers() }) {
            return Ok(Some(peer));
        }
        self.denied.with_label_values(&[label, peer.role()]).inc();
        Err(tonic::Status::permission_denied(format!("a {} certificate may not call {label}", peer.role())))
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Access<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.check(&request) {
            Ok(peer) => {
                // Parsed once here; handlers read it back through `peer_of`.
                if let Some(peer) = peer {
                    request.extensions_mut().insert(peer);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(split_path("/nid.v1.Cell/Execute"), ("nid.v1.Cell", "Execute"));
        assert_eq!(split_path("/x"), ("x", ""));
    }
}
