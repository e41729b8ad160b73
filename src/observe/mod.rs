//! Running pgfanout as a service: Prometheus metrics, the `/metrics`,
//! `/healthz` and `/readyz` endpoint, the lag and sink-failure alerts, and
//! the counters the data path keeps. The data path only reports (through the `metrics`
//! facade and the shared `ReaderProgress`/`Stats` atomics); nothing here can
//! slow it down or hold an acknowledgement back.

pub mod exposition;
pub mod health;
pub mod metrics;
pub mod progress;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;

pub use self::metrics::{error, sink_failed, sink_flushed, timed, TableCounters};
pub use self::progress::{ReaderProgress, Stats};

/// The running observers; dropping it stops nothing (they live as long as
/// the process), it only tells where the endpoint listens.
#[derive(Debug)]
pub struct Observer {
    /// Where `/metrics` is served, when the endpoint is up.
    pub listening: Option<std::net::SocketAddr>,
}

/// Installs the metrics recorder, starts the periodic checks (gauges,
/// process metrics, the lag alert) and, unless `metrics.listen` is empty,
/// the HTTP endpoint. An endpoint that cannot bind is logged as an error and
/// skipped: replication matters more than its dashboard.
pub async fn start(cfg: &Config, stats: Arc<Stats>) -> Observer {
    let handle = metrics::install();
    let limits = cfg.metrics.clone();
    tokio::spawn(health::watch(stats.clone(), limits.clone(), handle.clone(), Duration::from_secs(1)));
    let listening = if limits.listen.is_empty() {
        None
    } else {
        match tokio::net::TcpListener::bind(&limits.listen).await {
            Ok(listener) => {
                let addr = listener.local_addr().ok();
                tracing::info!(listen = ?addr, "serving /metrics, /healthz and /readyz");
                let endpoint = Arc::new(server::Endpoint { handle, stats, limits });
                tokio::spawn(server::serve(listener, endpoint));
                addr
            }
            Err(e) => {
                tracing::error!(listen = %limits.listen, error = %e, "cannot serve /metrics; running without it (set metrics.listen to a free address, or \"\" to disable)");
                error("metrics_endpoint");
                None
            }
        }
    };
    Observer { listening }
}
