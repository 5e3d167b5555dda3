//! Router metrics (Prometheus, `nid_router_*`), served on `--metrics-listen` at `/metrics`.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The router's metrics.
pub struct RouterMetrics {
    registry: Registry,
    /// Requests by method and gRPC code.
    pub requests: IntCounterVec,
    /// Latency by method.
    pub latency: HistogramVec,
    /// Forwarding retries by reason.
    pub retries: IntCounterVec,
    /// Routing-table version in use.
    pub table_version: IntGauge,
}

impl RouterMetrics {
    /// Registers every metric.
    pub fn new() -> anyhow::Result<RouterMetrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("nid_router_requests_total", "Requests handled, by method and gRPC code."),
            &["grpc_method", "grpc_code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("nid_router_request_duration_seconds", "Request latency by method.").buckets(
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            &["grpc_method"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("nid_router_retries_total", "Forwarding retries by reason."),
            &["reason"],
        )?;
        let table_version = IntGauge::new("nid_router_table_version", "Routing-table version in use.")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(table_version.clone()))?;
        Ok(RouterMetrics { registry, requests, latency, retries, table_version })
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
