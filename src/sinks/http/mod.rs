//! The external HTTP system: enriched events POSTed as JSON batches, signed
//! the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`; the key is `http.secret`,
//! a `whsec_<base64>` secret decoded or a raw one as its bytes), with an
//! `Idempotency-Key` (equal to `webhook-id`) made of the batch's first and
//! last event ids.
//!
//! # Deterministic batches
//!
//! Receivers de-duplicate by that key alone (Standard Webhooks receivers
//! do), so a batch must never be posted twice with other events, and an
//! event never twice under different keys. After a crash the slot replays
//! from the last acknowledged commit, which is usually well before the last
//! batch posted, and the batcher (count + linger) would cut the replay
//! differently. So the live stream's sink keeps a record in the source
//! database, `pgfanout_state.http_progress` (sql/postgres/http_progress.sql), one
//! row per slot, written in one statement *before* each post:
//! `posted_through` = the last event of the batch before (which was
//! delivered or parked), `inflight_first` / `inflight_last` / `inflight_key`
//! = the batch about to leave. Posts are sequential, so at most one batch is
//! in flight and it is recorded before it can reach the receiver. Each run
//! bumps the row's `generation` when it loads it and writes only while the
//! generation is its own: a SIGKILLed run's last write, which PostgreSQL
//! may still execute after the next run started, cannot overwrite it.
//!
//! On start, `pipeline::run` loads the record ([`LiveRecord::load`]) and
//! hands it to the sink ([`HttpSink::follow_live`]), which returns the
//! in-flight range as a [`Replay`] for the batcher:
//! - Events at or below `posted_through` were delivered: skipped.
//! - If the replayed stream contains the range's first event, the batch may
//!   not have arrived: the batcher ends a batch just before that event and
//!   right after the range's last one, and never splits the range (whatever
//!   `batch_max_changes` and the linger say). The batch has the same events,
//!   hence the same key and (enrichment being a function of the commit) the
//!   same body, and the receiver's de-duplication does the rest.
//! - If the stream starts past the range's first event, the slot was
//!   acknowledged past a commit in that batch, which happens only once every
//!   sink flushed it: it was delivered, and its events are skipped too.
//! - Everything after the range is new and cut freely; every new batch
//!   starts after the last key ever posted, so its key is new.
//!
//! The record survives a new machine (it lives with the slot) and costs one
//! small upsert per posted batch. Snapshot and backfill deliveries do not
//! use it (their sinks never call `follow_live`): their events have their
//! own ids and are re-posted whole when a chunk is redone.
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

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use sha2::Sha256;
use tokio_postgres::{Client, Statement};

use super::{Boundary, Cuts, Probe, SinkError};
use crate::config::{HttpConfig, Secret, SourceConfig};
use crate::enrich::{EngagementChange, Enriched};
use crate::log::LogProducer;
use crate::retry::{self, Alert, Attempts, ErrorClass, Policy};
use crate::source::slot::{self, query_err, SlotError};
use crate::source::{Lsn, Position};

pub const PROGRESS_SCHEMA: &str = include_str!("../../../sql/postgres/http_progress.sql");

/// The longest `Retry-After` honoured: a receiver asking for more (or a
/// date far ahead) would hold the slot, and with it the WAL, for that long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

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

/// The Standard Webhooks signature of a message.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A batch as posted: `{"idempotency_key": …, "events": [EventJson…]}`,
/// from the events' shared JSON text.
fn body(key: &str, events: &[&str]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + key.len() + 40);
    body.extend_from_slice(b"{\"idempotency_key\":");
    serde_json::to_writer(&mut body, key).expect("a string serializes");
    body.extend_from_slice(b",\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e.as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

/// A batch ready to post.
struct Outgoing {
    key: String,
    body: Vec<u8>,
    first: Position,
    last: Position,
}

impl Outgoing {
    /// The batch of these events (None if there are none).
    fn of<'a>(events: impl Iterator<Item = (&'a EngagementChange, &'a String)>) -> Option<Outgoing> {
        let mut ends: Option<(&EngagementChange, &EngagementChange)> = None;
        let mut json = Vec::new();
        for (c, j) in events {
            ends = Some((ends.map_or(c, |(f, _)| f), c));
            json.push(j.as_str());
        }
        let (first, last) = ends?;
        let key = format!("{}-{}", super::change_id(first), super::change_id(last));
        Some(Outgoing { body: body(&key, &json), key, first: first.position, last: last.position })
    }
}

/// The class of a non-success response. 408 (timeout), 409 (a receiver
/// still processing the same key) and 429 are the 4xx that a retry can
/// cure; a redirect is not followed (the signature covers the configured
/// URL) and needs the configuration fixed, as other 4xx need the receiver
/// or the secret fixed. 5xx and anything unexpected: transient.
/// A `Retry-After` on 429 and 503 makes it `TransientAfter`.
fn classify(status: StatusCode, retry_after: Option<&str>, now: SystemTime) -> ErrorClass {
    let transient = |after: Option<Duration>| after.map_or(ErrorClass::Transient, ErrorClass::TransientAfter);
    match status.as_u16() {
        429 | 503 => transient(retry_after.and_then(|v| parse_retry_after(v, now))),
        408 | 409 => ErrorClass::Transient,
        300..=499 => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP date
/// (any of the three formats) from which the delay is counted from `now`;
/// a date in the past means now. None for anything else.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds still means "a very long time".
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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
    pub fn new(cfg: &HttpConfig, log: Option<Arc<LogProducer>>) -> Result<Self, SinkError> {
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
            permanent_attempts: cfg.on_permanent_error.attempts(cfg.permanent_attempts),
            transient_attempts: Some(cfg.max_attempts),
            healthy_after: None,
            alert: Alert::Sink,
        };
        Ok(HttpSink { client, cfg: cfg.clone(), key, log, live: OnceLock::new(), policy })
    }

    /// Posts a batch until it is delivered, or parks it in the dead-letter
    /// topic once it failed permanently (`permanent_attempts`, 1 by default,
    /// or never with `on_permanent_error = "stall"`) or `max_attempts` times.
    async fn deliver(&self, out: &Outgoing) -> Result<(), SinkError> {
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
        log.dead_letter("http", &out.key, &out.body, error).await?;
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
            return match Outgoing::of(batch.engagements.iter().zip(events)) {
                Some(out) => self.deliver(&out).await,
                None => Ok(()),
            };
        };
        let mut live = live.lock().await;
        live.settle();
        let fresh = batch.engagements.iter().zip(events).filter(|(c, _)| !live.delivered(c.position));
        let Some(out) = Outgoing::of(fresh) else { return Ok(()) };
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
        self.deliver(&out).await?;
        live.posted(out.last);
        Ok(())
    }
}

/// The live stream's row of `pgfanout_state.http_progress`, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveRecord {
    /// This run's generation: the row's, bumped by the load.
    pub generation: i64,
    /// Every event at or below this position was delivered.
    pub posted_through: Option<Position>,
    /// The batch that was about to be posted, or was posted, last.
    pub inflight: Option<Inflight>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    pub first: Position,
    pub last: Position,
    pub key: String,
}

impl LiveRecord {
    /// Loads the record of `slot` and takes it over for this run (a new
    /// generation), creating the table when it is missing (only then:
    /// creating needs CREATE on schema pgfanout_state, which a user of an
    /// existing table may lack). A record whose positions lie beyond the server's WAL
    /// cannot be this cluster's (a database restored elsewhere) and is
    /// ignored, with a warning, rather than skipping new events.
    pub async fn load(pg: &Client, slot: &str) -> Result<LiveRecord, SlotError> {
        let exists: bool = pg
            .query_one("SELECT to_regclass('pgfanout_state.http_progress') IS NOT NULL", &[])
            .await
            .map_err(query_err("look up pgfanout_state.http_progress"))?
            .get(0);
        if !exists {
            pg.batch_execute(PROGRESS_SCHEMA).await.map_err(query_err(
                "create pgfanout_state.http_progress, the webhook sink's progress: it needs CREATE on schema pgfanout_state (`pgfanout init --print-sql`), or run sql/postgres/http_progress.sql as a user who has it",
            ))?;
        }
        let row = pg
            .query_one(
                "INSERT INTO pgfanout_state.http_progress AS p (slot) VALUES ($1)
                 ON CONFLICT (slot) DO UPDATE SET generation = p.generation + 1
                 RETURNING generation, posted_through, inflight_first, inflight_last, inflight_key,
                     pg_current_wal_lsn()::text",
                &[&slot],
            )
            .await
            .map_err(query_err("take over pgfanout_state.http_progress"))?;
        let generation: i64 = row.get(0);
        let texts: [Option<String>; 3] = [row.get(1), row.get(2), row.get(3)];
        let parse = |i: usize| texts[i].as_deref().map(|s| Position::from_sortable_hex(s).ok_or(s));
        let wal_now = row.get::<_, Option<String>>(5).and_then(|s| Lsn::parse(&s).ok()).map(|l| l.0);
        let fresh = LiveRecord { generation, ..LiveRecord::default() };
        let record = match (parse(0).transpose(), parse(1), parse(2), row.get::<_, Option<String>>(4)) {
            (Ok(None), None, None, None) => return Ok(fresh),
            (Ok(posted_through), Some(Ok(first)), Some(Ok(last)), Some(key)) => {
                LiveRecord { generation, posted_through, inflight: Some(Inflight { first, last, key }) }
            }
            bad => {
                tracing::warn!(slot, record = ?bad, "pgfanout_state.http_progress holds positions that are not <16 hex digits><8 hex digits>; ignoring it (the batch in flight, if any, may reach the receiver under a second key)");
                return Ok(fresh);
            }
        };
        let newest = record.inflight.as_ref().map(|i| i.last.commit_lsn).unwrap_or(0);
        if wal_now.is_some_and(|now| newest > now) {
            tracing::warn!(slot, record = ?record, "pgfanout_state.http_progress is ahead of this server's WAL, so it was written on another cluster; ignoring it");
            return Ok(fresh);
        }
        Ok(record)
    }
}

/// The batch in flight when the live stream last stopped, for the batcher
/// to cut again exactly, and for the sink to know whether it did.
#[derive(Debug)]
pub struct Replay {
    pub first: Position,
    pub last: Position,
    pub key: String,
    /// `UNSEEN`, `REPLAYING`, `REPLAYED` or `PASSED`; written by the batcher
    /// before it hands on any batch at or past `first`, read by the sink.
    state: AtomicU8,
}

const UNSEEN: u8 = 0;
/// The batcher took `first` and is holding the batch open until `last`.
const REPLAYING: u8 = 1;
/// The batcher cut the replayed batch.
const REPLAYED: u8 = 2;
/// The stream started past `first`: the batch was delivered.
const PASSED: u8 = 3;

impl Cuts for Replay {
    fn boundary(&self, p: Position) -> Boundary {
        Replay::boundary(self, p)
    }
}

impl Replay {
    fn new(i: Inflight) -> Self {
        Replay { first: i.first, last: i.last, key: i.key, state: AtomicU8::new(UNSEEN) }
    }

    /// Where batch boundaries go around the change at `p`; the batcher asks
    /// for every change, in stream order, before it hands the batch on.
    pub fn boundary(&self, p: Position) -> Boundary {
        let set = |s| self.state.store(s, Ordering::Release);
        match self.state.load(Ordering::Acquire) {
            UNSEEN if p < self.first => Boundary::default(),
            UNSEEN if p == self.first => {
                let whole = p >= self.last;
                set(if whole { REPLAYED } else { REPLAYING });
                Boundary { cut_before: true, hold: !whole, cut_after: whole }
            }
            UNSEEN => {
                set(PASSED);
                Boundary::default()
            }
            REPLAYING if p < self.last => Boundary { hold: true, ..Boundary::default() },
            REPLAYING if p == self.last => {
                set(REPLAYED);
                Boundary { cut_after: true, ..Boundary::default() }
            }
            REPLAYING => {
                // The range's last change is not in this stream (it differs
                // from the first reading): close the batch before going on.
                set(REPLAYED);
                Boundary { cut_before: true, ..Boundary::default() }
            }
            _ => Boundary::default(),
        }
    }

    /// Whether the batcher took the range's first change (the batch is being
    /// or was re-cut), as opposed to seeing the stream start past it.
    fn replayed(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), REPLAYING | REPLAYED)
    }
}

/// The live sink's side of the record.
struct LiveProgress {
    url: Secret,
    slot: String,
    generation: i64,
    pg: Option<(Client, Statement)>,
    posted_through: Option<Position>,
    /// Until the sink has passed it.
    replay: Option<Arc<Replay>>,
}

const RECORD: &str = "UPDATE pgfanout_state.http_progress
     SET posted_through = $3, inflight_first = $4, inflight_last = $5, inflight_key = $6, updated_at = now()
     WHERE slot = $1 AND generation = $2";

/// Why a batch could not be recorded.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Query(#[from] SlotError),
    #[error("pgfanout_state.http_progress of slot {slot} was taken over by a later `pgfanout run` (this one has generation {generation}); stopping rather than post beside it")]
    TakenOver { slot: String, generation: i64 },
}

impl LiveProgress {
    /// Once the batcher saw the stream start past the in-flight batch, that
    /// batch counts as posted.
    fn settle(&mut self) {
        if let Some(r) = self.replay.as_ref().filter(|r| r.state.load(Ordering::Acquire) == PASSED) {
            self.posted_through = self.posted_through.max(Some(r.last));
            self.replay = None;
        }
    }

    /// Whether the event at `p` reached the receiver in an earlier batch.
    fn delivered(&self, p: Position) -> bool {
        if let Some(r) = self.replay.as_ref().filter(|r| (r.first..=r.last).contains(&p)) {
            // The batcher resolves the range before any batch reaching into
            // it is handed on, so here it is either re-cut or passed.
            return !r.replayed();
        }
        self.posted_through.is_some_and(|t| p <= t)
    }

    /// After `last` was delivered (or parked).
    fn posted(&mut self, last: Position) {
        self.posted_through = Some(last);
        if self.replay.as_ref().is_some_and(|r| last >= r.last) {
            self.replay = None;
        }
    }

    /// Records `out` as in flight (and everything before it as posted),
    /// retrying until PostgreSQL takes it: a batch must not leave
    /// unrecorded, or a replay could re-cut it under another key.
    async fn record(&mut self, out: &Outgoing, sink: &Policy) -> Result<(), SinkError> {
        let policy = Policy {
            failed: "recording webhook progress in pgfanout_state.http_progress failed; the batch waits; retrying",
            permanent_attempts: None,
            transient_attempts: None,
            ..sink.clone()
        };
        let mut attempts = Attempts::new(&policy);
        loop {
            attempts.begin();
            let e = match self.try_record(out).await {
                Ok(()) => {
                    // The sink has not flushed yet: its failure gauge stays until the post.
                    if attempts.failures() > 0 {
                        tracing::info!(
                            sink = "http",
                            failed_attempts = attempts.failures(),
                            "webhook progress recorded again"
                        );
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            self.pg = None;
            let class = match e {
                RecordError::TakenOver { .. } => ErrorClass::Fatal,
                RecordError::Query(_) => ErrorClass::Transient,
            };
            attempts.failed(e, class).await.map_err(|g| SinkError::Http(g.error.to_string()))?;
        }
    }

    async fn try_record(&mut self, out: &Outgoing) -> Result<(), RecordError> {
        if self.pg.is_none() {
            let pg = slot::connect(self.url.expose()).await?;
            // The record must survive a crash of PostgreSQL like the slot's
            // position does; a server set not to wait for its own WAL flush
            // would lose it.
            pg.batch_execute(
                "SELECT set_config('synchronous_commit', 'local', false) WHERE current_setting('synchronous_commit') = 'off'",
            )
            .await
            .map_err(query_err("set synchronous_commit"))?;
            let record = pg.prepare(RECORD).await.map_err(query_err("prepare the webhook progress update"))?;
            self.pg = Some((pg, record));
        }
        let (pg, record) = self.pg.as_ref().expect("connected above");
        let through = self.posted_through.as_ref().map(Position::sortable_hex);
        let (first, last) = (out.first.sortable_hex(), out.last.sortable_hex());
        let updated = pg
            .execute(record, &[&self.slot, &self.generation, &through, &first, &last, &out.key])
            .await
            .map_err(query_err("record webhook progress"))?;
        if updated == 0 {
            return Err(RecordError::TakenOver { slot: self.slot.clone(), generation: self.generation });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_batch_json() {
        let events = [r#"{"id":"0/1"}"#, r#"{"id":"0/2"}"#];
        let v: serde_json::Value = serde_json::from_slice(&body("a\"b", &events)).unwrap();
        assert_eq!(v, serde_json::json!({ "idempotency_key": "a\"b", "events": [{ "id": "0/1" }, { "id": "0/2" }] }));
        let empty: serde_json::Value = serde_json::from_slice(&body("k", &[])).unwrap();
        assert_eq!(empty["events"], serde_json::json!([]));
    }

    #[test]
    fn standard_webhooks_signature() {
        // Test vector from the Standard Webhooks specification, with the
        // secret as configured (`whsec_` + base64 of the key).
        let cfg = HttpConfig::new("", Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()));
        let sig =
            sign(&cfg.signing_key().unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn statuses_are_transient_or_permanent() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |code: u16, retry_after: Option<&str>| classify(StatusCode::from_u16(code).unwrap(), retry_after, now);
        for code in [500, 502, 503, 504, 599, 408, 409, 429] {
            assert_eq!(v(code, None), ErrorClass::Transient, "{code}");
        }
        for code in [300, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 410, 413, 415, 422, 451, 499] {
            assert_eq!(v(code, Some("5")), ErrorClass::Permanent, "{code}");
        }
        assert_eq!(v(429, Some("7")), ErrorClass::TransientAfter(Duration::from_secs(7)));
        assert_eq!(v(503, Some("120")), ErrorClass::TransientAfter(Duration::from_secs(120)));
        // Honoured on 429 and 503 only.
        assert_eq!(v(500, Some("7")), ErrorClass::Transient);
        assert_eq!(v(408, Some("7")), ErrorClass::Transient);
        assert_eq!(v(429, Some("soon")), ErrorClass::Transient);
    }

    #[test]
    fn retry_after_seconds_or_http_date() {
        // 2023-11-14T22:13:20Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let p = |s| parse_retry_after(s, now);
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(p("99999999999999999999999"), Some(Duration::from_secs(u64::MAX)));
        // The three date formats of RFC 9110, 90 s after `now`.
        for date in ["Tue, 14 Nov 2023 22:14:50 GMT", "Tuesday, 14-Nov-23 22:14:50 GMT", "Tue Nov 14 22:14:50 2023"] {
            assert_eq!(p(date), Some(Duration::from_secs(90)), "{date}");
        }
        assert_eq!(p("Tue, 14 Nov 2023 22:00:00 GMT"), Some(Duration::ZERO), "a past date means now");
        for bad in ["", "-5", "1.5", "5s", "tomorrow", "Tue, 14 Nov 2023 25:00:00 GMT"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    fn pos(commit_lsn: u64, ordinal: u32) -> Position {
        Position { commit_lsn, ordinal }
    }

    fn replay(first: Position, last: Position) -> Replay {
        Replay::new(Inflight { first, last, key: "k".into() })
    }

    /// The live record of a run that loaded `posted_through` and `replay`.
    fn live_progress(posted_through: Option<Position>, replay: Option<Arc<Replay>>) -> LiveProgress {
        LiveProgress { url: Secret::default(), slot: "s".into(), generation: 1, pg: None, posted_through, replay }
    }

    const FREE: Boundary = Boundary { cut_before: false, hold: false, cut_after: false };
    const HOLD: Boundary = Boundary { cut_before: false, hold: true, cut_after: false };

    #[test]
    fn the_replayed_range_is_cut_exactly() {
        let r = replay(pos(20, 1), pos(30, 2));
        assert_eq!(r.boundary(pos(10, 5)), FREE);
        assert_eq!(r.boundary(pos(20, 1)), Boundary { cut_before: true, hold: true, cut_after: false });
        assert!(r.replayed());
        assert_eq!(r.boundary(pos(20, 2)), HOLD);
        assert_eq!(r.boundary(pos(30, 1)), HOLD);
        assert_eq!(r.boundary(pos(30, 2)), Boundary { cut_after: true, ..FREE });
        assert_eq!(r.boundary(pos(30, 3)), FREE);
        assert_eq!(r.boundary(pos(40, 1)), FREE);
        assert!(r.replayed());

        let one = replay(pos(20, 1), pos(20, 1));
        assert_eq!(one.boundary(pos(20, 1)), Boundary { cut_before: true, hold: false, cut_after: true });
        assert_eq!(one.boundary(pos(20, 2)), FREE);

        // The range's last change missing from the stream: closed before what follows.
        let gap = replay(pos(20, 1), pos(30, 2));
        gap.boundary(pos(20, 1));
        assert_eq!(gap.boundary(pos(31, 0)), Boundary { cut_before: true, ..FREE });
        assert_eq!(gap.boundary(pos(31, 1)), FREE);
    }

    #[test]
    fn a_stream_starting_inside_the_range_passes_it() {
        let r = replay(pos(20, 1), pos(30, 2));
        assert_eq!(r.boundary(pos(20, 7)), FREE);
        assert!(!r.replayed());
        assert_eq!(r.boundary(pos(30, 2)), FREE);
        let mut live = live_progress(Some(pos(19, 4)), Some(Arc::new(r)));
        live.settle();
        assert!(live.replay.is_none());
        assert!(live.delivered(pos(20, 7)) && live.delivered(pos(30, 2)));
        assert!(!live.delivered(pos(30, 3)));
    }

    #[test]
    fn the_live_sink_skips_what_was_delivered_and_reposts_the_range() {
        let r = Arc::new(replay(pos(20, 1), pos(30, 2)));
        let mut live = live_progress(Some(pos(19, 4)), Some(r.clone()));
        assert!(live.delivered(pos(10, 1)) && live.delivered(pos(19, 4)));
        assert!(!live.delivered(pos(19, 5)), "not posted before: new");
        r.boundary(pos(20, 1));
        r.boundary(pos(30, 2));
        live.settle();
        assert!(!live.delivered(pos(20, 1)) && !live.delivered(pos(30, 2)), "the range is posted again");
        live.posted(pos(30, 2));
        assert!(live.replay.is_none());
        assert!(live.delivered(pos(20, 1)) && live.delivered(pos(30, 2)));
        assert!(!live.delivered(pos(30, 3)));
    }
}
