//! Running pgfanout as a service: Prometheus metrics, the `/metrics`,
//! `/healthz` and `/readyz` endpoint, the lag and sink-failure alerts, and
//! `pgfanout status`. The data path only reports (through the `metrics`
//! facade and the shared `ReaderProgress`/`Stats` atomics); nothing here can
//! slow it down or hold an acknowledgement back.

pub mod health;
pub mod metrics;
pub mod server;
pub mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::pipeline::Stats;

pub use self::metrics::{count_changes, error, sink_failed, sink_flushed, timed, TableCounters};

/// What the replication reader knows and the observers need: whether the
/// stream is up, how far the server's WAL reaches, and how many changes sit
/// in the channel to the apply loop.
#[derive(Debug, Default)]
pub struct ReaderProgress {
    connected: AtomicBool,
    server_wal_end: AtomicU64,
    buffered: AtomicU64,
}

impl ReaderProgress {
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records the server's WAL end from a keepalive or a WAL data header
    /// (0 there means "not sent" and is ignored).
    pub fn saw_server_wal_end(&self, lsn: u64) {
        self.server_wal_end.fetch_max(lsn, Ordering::Relaxed);
    }

    pub fn server_wal_end(&self) -> u64 {
        self.server_wal_end.load(Ordering::Relaxed)
    }

    /// A change is about to enter the channel to the apply loop.
    pub fn buffered_one(&self) {
        self.buffered.fetch_add(1, Ordering::Relaxed);
    }

    /// The apply loop took a change out of the channel.
    pub fn took_one(&self) {
        // Saturating: the counter is a gauge, never worth a panic or a wrap.
        let _ = self.buffered.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }

    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }
}

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
