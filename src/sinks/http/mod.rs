//! The external HTTP system: enriched events POSTed as JSON batches, signed
//! the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`; the key is `http.secret`,
//! a `whsec_<base64>` secret decoded or a raw one as its bytes), with an
//! `Idempotency-Key` (equal to `webhook-id`) made of the batch's first and
//! last event ids.
//!
//! Batches are deterministic: after a crash the batch that was in flight
//! goes out again with the same events, key and body, and new events only
//! under new keys (how: `replay.rs`). What a batch is on the wire and how a
//! response is classified, without I/O: `encode.rs`.
//!
//! # Failures
//!
//! Connection errors, timeouts, 5xx, 408, 409 and 429 are transient:
//! retried with backoff and jitter (a `Retry-After` on 429/503, seconds or
//! an HTTP date, replaces the computed delay, at least `backoff_initial_ms`
//! and at most [`MAX_RETRY_AFTER`]). Redirects (not followed: the signature
//! is for `http.url`) and every other 4xx are permanent: the batch is parked
//! in the broker's dead-letter topic after `permanent_attempts` (1 by
//! default: at once) with its error, as a batch is after `max_attempts`
//! transient failures, and counts as delivered: parked, never dropped (with
//! `on_permanent_error = "stall"` a permanent refusal is retried like a
//! failure would be without `max_attempts`: until the receiver takes it). All of it goes through
//! `retry::run`, as the other sinks' writes do. Each event also carries a stable `id`, so a receiver can
//! de-duplicate per event too.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

mod encode;
mod replay;

use tokio_postgres::Client;

use self::encode::{classify, Outgoing};
use self::replay::LiveProgress;
use super::parked::ParkedBatch;
use super::{Cuts, Probe, Refused, SinkError};
use crate::config::{HttpConfig, SourceConfig};
use crate::enrich::{EngagementChange, Enriched};
use crate::log::LogProducer;
use crate::retry::{self, Alert, ErrorClass, Policy};

pub use self::encode::{sign, MAX_RETRY_AFTER};
pub use self::replay::{Inflight, LiveRecord, Replay, PROGRESS_SCHEMA};

pub struct HttpSink {
    client: reqwest::Client,
    cfg: HttpConfig,
    /// The HMAC key `cfg.secret` stands for.
    key: Vec<u8>,
    /// Where undeliverable batches are parked (None: they stall instead).
    log: Option<Arc<LogProducer>>,
    /// The live stream's progress record; set once by `follow_live`.
    live: OnceLock<tokio::sync::Mutex<LiveProgress>>,
    policy: Policy,
}

/// One failed attempt.
struct Failure {
    error: String,
    class: ErrorClass,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl HttpSink {
    /// `refused`: what becomes of a batch it gives up on (parked, or without
    /// a dead-letter topic returned as the write's `Err`).
    pub fn new(cfg: &HttpConfig, refused: &Refused) -> Result<Self, SinkError> {
        let key = cfg.signing_key().map_err(|e| SinkError::Http(e.to_string()))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("pgfanout/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SinkError::Http(e.to_string()))?;
        let policy = Policy {
            what: "http",
            failed: "post failed; retrying",
            initial: Duration::from_millis(cfg.backoff_initial_ms),
            max: Duration::from_millis(cfg.backoff_max_ms),
            // Without a dead-letter topic the webhook returns what it gives
            // up on rather than stall; only a replay overrides "stall" too.
            permanent_attempts: match refused {
                Refused::Return => refused.permanent_attempts(cfg.on_permanent_error, cfg.permanent_attempts),
                Refused::Park(_) | Refused::Stall => cfg.on_permanent_error.attempts(cfg.permanent_attempts),
            },
            transient_attempts: Some(cfg.max_attempts),
            healthy_after: None,
            alert: Alert::Sink,
        };
        Ok(HttpSink { client, cfg: cfg.clone(), key, log: refused.dead_letter(), live: OnceLock::new(), policy })
    }

    /// Posts a batch until it is delivered, or parks it in the dead-letter
    /// topic once it failed permanently (`permanent_attempts`, 1 by default,
    /// or never with `on_permanent_error = "stall"`) or `max_attempts` times.
    /// `events` are the changes `out` carries, and `origin` their batch's:
    /// what is parked, so that a replay posts the same batch again.
    async fn deliver(
        &self,
        out: &Outgoing,
        events: &[&EngagementChange],
        origin: &Option<String>,
    ) -> Result<(), SinkError> {
        let initial = self.policy.initial;
        let classify = |f: &Failure| match f.class {
            ErrorClass::TransientAfter(asked) => {
                ErrorClass::TransientAfter(asked.clamp(initial, MAX_RETRY_AFTER.max(initial)))
            }
            class => class,
        };
        let gave_up = match retry::run(&self.policy, classify, |_| self.post(&out.key, &out.body)).await {
            Ok(()) => {
                tracing::debug!(sink = "http", idempotency_key = %out.key, bytes = out.body.len(), "batch posted");
                return Ok(());
            }
            Err(g) => g,
        };
        let why = match gave_up.class {
            ErrorClass::Permanent => "the receiver refused it permanently",
            _ => "attempts exhausted",
        };
        let (error, attempts) = (&gave_up.error.error, gave_up.attempts);
        let Some(log) = &self.log else { return Err(SinkError::Http(format!("{error} ({why})"))) };
        tracing::error!(sink = "http", idempotency_key = %out.key, error = %error, attempts, "batch undeliverable ({why}); parking it in the dead-letter topic");
        let batch = Enriched {
            origin: origin.clone(),
            engagements: events.iter().map(|&c| c.clone()).collect(),
            ..Enriched::default()
        };
        // The receiver's address without its query, which may hold a token.
        let receiver = self.cfg.url.split('?').next().unwrap_or_default();
        if let Some(parked) = ParkedBatch::new("http", receiver, &batch, error, attempts) {
            parked.send(log).await?;
        }
        Ok(())
    }

    async fn post(&self, key: &str, body: &[u8]) -> Result<(), Failure> {
        let ts = chrono::Utc::now().timestamp();
        let signature = sign(&self.key, key, ts, body);
        let resp = self
            .client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .header("webhook-id", key)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Failure { error: e.without_url().to_string(), class: ErrorClass::Transient })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = header(reqwest::header::RETRY_AFTER);
        let class = classify(status, retry_after.as_deref(), SystemTime::now());
        let error = if status.is_redirection() {
            // Without the query: it may carry a token.
            let to = header(reqwest::header::LOCATION).unwrap_or_default();
            let to = to.split('?').next().unwrap_or_default();
            format!("HTTP {status}, a redirect to {to:?}: not followed (the signature is for http.url); set http.url to the final address")
        } else {
            let text = resp.text().await.unwrap_or_default();
            format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())
        };
        Err(Failure { error, class })
    }
}

#[async_trait::async_trait]
impl super::Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    /// Any answer to a HEAD of the receiver's origin, even 404 or 405,
    /// proves it is there.
    async fn probe(&self) -> Result<Probe, String> {
        let url = reqwest::Url::parse(&self.cfg.url).map_err(|e| format!("http.url: {e}"))?;
        let origin = format!("{}/", url.origin().ascii_serialization());
        let resp = self.client.head(&origin).send().await.map_err(|e| e.without_url().to_string())?;
        Ok(Probe { position: None, detail: Some(format!("HEAD {origin}: {}", resp.status())) })
    }

    /// Makes this the live stream's sink: from now on it skips what `record`
    /// says was delivered, re-posts the batch in flight as it was, and
    /// records each batch in `pgfanout_state.http_progress` before posting it.
    /// Returns the in-flight range, which the batcher must cut exactly as
    /// before (see `Replay::boundary`). Called once, before the first write.
    async fn follow_live(&self, pg: &Client, source: &SourceConfig) -> Result<Option<Arc<dyn Cuts>>, SinkError> {
        let record = LiveRecord::load(pg, &source.slot)
            .await
            .map_err(|e| SinkError::Http(crate::source::privilege::explain(e, source).to_string()))?;
        let replay = record.inflight.map(|i| {
            tracing::info!(first = %i.first, last = %i.last, idempotency_key = %i.key, "the webhook batch in flight at the last stop is re-posted as it was if the stream replays it");
            Arc::new(Replay::new(i))
        });
        let progress = LiveProgress {
            url: source.url.clone(),
            slot: source.slot.clone(),
            generation: record.generation,
            pg: None,
            posted_through: record.posted_through,
            replay: replay.clone(),
        };
        assert!(self.live.set(tokio::sync::Mutex::new(progress)).is_ok(), "follow_live is called once per sink");
        Ok(replay.map(|r| r as Arc<dyn Cuts>))
    }

    async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        let events = super::events_json(batch);
        let Some(live) = self.live.get() else {
            let all: Vec<&EngagementChange> = batch.engagements.iter().collect();
            return match Outgoing::of(batch.engagements.iter().zip(events)) {
                Some(out) => self.deliver(&out, &all, &batch.origin).await,
                None => Ok(()),
            };
        };
        let mut live = live.lock().await;
        live.settle();
        let fresh: Vec<(&EngagementChange, &String)> =
            batch.engagements.iter().zip(events).filter(|(c, _)| !live.delivered(c.position)).collect();
        let Some(out) = Outgoing::of(fresh.iter().copied()) else { return Ok(()) };
        if let Some(r) = live.replay.as_ref().filter(|r| out.first == r.first) {
            if out.key == r.key {
                tracing::info!(idempotency_key = %out.key, "re-posting the webhook batch in flight at the last stop");
            } else {
                // Only if the stream differs from the one first read (a
                // replayed event enriched away, the range's last change missing).
                tracing::error!(idempotency_key = %out.key, recorded = %r.key, "the replayed webhook batch differs from the one in flight at the last stop");
            }
        }
        live.record(&out, &self.policy).await?;
        let carried: Vec<&EngagementChange> = fresh.iter().map(|(c, _)| *c).collect();
        self.deliver(&out, &carried, &batch.origin).await?;
        live.posted(out.last);
        Ok(())
    }
}
