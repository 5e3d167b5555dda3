//! Router metrics (Prometheus, `nid_router_*`), served on `--metrics-listen` at `/metrics`.

use prometheus::{Encoder as _, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The router's metrics.
pub struct RouterMetrics {
    registry: Registry,
    /// Requests by service, method and gRPC code, and their latency (the gRPC metrics layer).
    pub grpc: nid_support::grpc_metrics::GrpcMetrics,
    /// Forwarding retries by reason.
    pub retries: IntCounterVec,
    /// Routing-table version in use.
    pub table_version: IntGauge,
    /// Requests refused before forwarding (the router's or a cell's limit).
    pub shed: prometheus::IntCounter,
}

impl RouterMetrics {
    /// Registers every metric.
    pub fn new() -> anyhow::Result<RouterMetrics> {
        let registry = Registry::new();
        let grpc = nid_support::grpc_metrics::GrpcMetrics::named(
            &registry,
            "nid_router_requests_total",
            "nid_router_request_duration_seconds",
        )?;
        let retries = IntCounterVec::new(
            Opts::new("nid_router_retries_total", "Forwarding retries by reason."),
            &["reason"],
        )?;
        let table_version = IntGauge::new("nid_router_table_version", "Routing-table version in use.")?;
        registry.register(Box::new(retries.clone()))?;
        let shed = prometheus::IntCounter::new(
            "nid_router_shed_total",
            "Requests refused with RESOURCE_EXHAUSTED/OVERLOADED before forwarding: at --max-in-flight, or at a cell's concurrency limit (nid_router_cell_refused_total splits those).",
        )?;
        registry.register(Box::new(table_version.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        Ok(RouterMetrics { registry, grpc, retries, table_version, shed })
    }

    /// The registry, for metrics other modules own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
