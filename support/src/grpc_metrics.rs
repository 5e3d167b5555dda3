//! One tower layer that records every gRPC call a server handles, after go-grpc-prometheus:
//! `nid_grpc_server_handled_total{grpc_service, grpc_method, grpc_code}` and the histogram
//! `nid_grpc_server_handling_seconds{grpc_service, grpc_method}` (time to the response headers).
//! Calls to services or methods the server does not have are counted under `unknown`, so a caller
//! cannot grow the label set.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// The gRPC server metrics of one process.
#[derive(Clone)]
pub struct GrpcMetrics {
    handled: IntCounterVec,
    seconds: HistogramVec,
}

impl GrpcMetrics {
    /// Creates the metrics under their standard names and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<GrpcMetrics> {
        GrpcMetrics::named(registry, "nid_grpc_server_handled_total", "nid_grpc_server_handling_seconds")
    }

    /// Creates the metrics under the given names (the router keeps its `nid_router_*` names).
    pub fn named(registry: &Registry, handled: &str, seconds: &str) -> prometheus::Result<GrpcMetrics> {
        let handled = IntCounterVec::new(
            Opts::new(handled, "gRPC calls handled, by service, method and code."),
            &["grpc_service", "grpc_method", "grpc_code"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(seconds, "gRPC handling latency to the response headers.").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0,
            ]),
            &["grpc_service", "grpc_method"],
        )?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(GrpcMetrics { handled, seconds })
    }

    /// Records one call to `path` (`/package.Service/Method`) answered with `code`.
    pub fn record(&self, path: &str, code: tonic::Code, secs: f64) {
        let (service, method) = match (code, path.strip_prefix('/').and_then(|p| p.split_once('/'))) {
            (tonic::Code::Unimplemented, _) | (_, None) => ("unknown", "unknown"),
            (_, Some(pair)) => pair,
        };
        let name = crate::code_name(code);
        self.handled.with_label_values(&[service, method, name]).inc();
        self.seconds.with_label_values(&[service, method]).observe(secs);
    }
}

/// The layer.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.0.clone() }
    }
}

/// A service recording its calls.
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            // Errors travel in the headers (a trailers-only response); a success's status comes
            // in the trailers, after the headers: no status in the headers means OK.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.record(&path, code, started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_do_not_grow_the_label_set() {
        let registry = Registry::new();
        let m = GrpcMetrics::new(&registry).unwrap();
        m.record("/nid.v1.Cell/Execute", tonic::Code::Ok, 0.001);
        m.record("/evil.Service/Random1", tonic::Code::Unimplemented, 0.001);
        m.record("/evil.Service/Random2", tonic::Code::Unimplemented, 0.001);
        m.record("garbage", tonic::Code::Internal, 0.001);
        let text = {
            use prometheus::Encoder as _;
            let mut out = Vec::new();
            prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(
            text.contains(r#"grpc_code="OK",grpc_method="Execute",grpc_service="nid.v1.Cell""#),
            "{text}"
        );
        assert!(!text.contains("evil") && !text.contains("Random"));
        assert!(
            text.contains(r#"grpc_code="Unimplemented",grpc_method="unknown",grpc_service="unknown"} 2"#),
            "{text}"
        );
    }
}
