//! The service endpoint: `/metrics` (Prometheus text format), `/healthz`
//! (the process is alive: always 200) and `/readyz` (200 while the
//! replication stream is connected and the lag is under its thresholds,
//! else 503 with the reason as JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::health::{now_us, readiness, Snapshot};
use super::Stats;
use crate::config::MetricsConfig;

/// What the endpoint answers from.
pub struct Endpoint {
    pub handle: PrometheusHandle,
    pub stats: Arc<Stats>,
    pub limits: MetricsConfig,
}

impl Endpoint {
    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD\n".into());
        }
        match path {
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.handle.render()),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let r = readiness(&Snapshot::of(&self.stats), &self.limits, now_us());
                let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                reply(status, "application/json", serde_json::to_string(&r).unwrap_or_default())
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a /metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = endpoint.respond(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "/metrics connection ended with an error");
            }
        });
    }
}
