//! The sinks, behind one trait. [`build`] is the only place that names the
//! concrete sinks: a section in the configuration turns one on, and adding a
//! sink is a folder here plus one line there. Each sink's folder keeps its
//! pure encoding (rows, script arguments, request bodies; unit-tested
//! without services) apart from its I/O.

pub mod clickhouse;
pub mod file;
pub mod http;
pub mod parked;
pub mod redis;
pub mod tls;

use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, OnPermanentError, SourceConfig};
use crate::enrich::{EngagementChange, EngagementRow, Enriched};
use crate::log::LogProducer;
use crate::source::{Op, Position};

/// A destination of enriched batches.
///
/// # The contract
///
/// - **What a call receives.** [`Sink::write`] gets one [`Enriched`] batch:
///   the engagement events and content changes of a run of consecutive
///   changes, enriched as of each change's commit, in commit order inside
///   the batch. A batch may end inside a transaction; it may be empty of
///   what this sink stores (write nothing and return `Ok`).
/// - **Ordering.** Batches of one origin ([`Enriched::origin`]: the live
///   stream, or one snapshot or backfill chunk) arrive in position order.
///   Origins interleave: scan chunks carry positions below the live
///   stream's, so a sink that keeps a progress watermark keeps one per
///   origin and forgets a chunk's on [`Sink::forget_origin`].
/// - **One write in flight.** The pipeline calls `write` from one task per
///   sink and awaits it before the next batch: a sink never sees two of its
///   writes at once, and needs no locking of its own for that.
/// - **What `Ok` promises.** The batch is durably in the destination (a
///   later crash of pgfanout does not lose it), or it was refused for good
///   and parked in the dead-letter topic ([`park`]) with the error and the
///   change positions. Only then does the slot move past the batch.
/// - **At least once, counted once.** After a crash the slot replays from
///   the last acknowledged commit, so a sink receives again batches it may
///   already hold, cut differently. Each sink makes the repeat count once:
///   ClickHouse by row version (`Position::version`), Redis by a watermark
///   per origin applied atomically with the data, HTTP by event ids and a
///   recorded in-flight batch re-cut exactly ([`Sink::follow_live`]).
/// - **What `Err` means, and who retries.** The sink retries transient
///   errors itself, with backoff, for as long as it takes (through
///   `retry::run`, which reports the sink metrics and alerts), and a
///   permanent one `permanent_attempts` times before parking the batch
///   (or for ever with `on_permanent_error = "stall"`). `Err` is what is
///   left: the sink cannot go on (its dead-letter topic refused the batch,
///   its progress was taken over). The pipeline then stops without
///   acknowledging the batch, so the next start replays it.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The sink's name in metrics (`sink` label), logs, the dead-letter
    /// topic's payloads and `pgfanout status`.
    fn name(&self) -> &'static str;

    /// Creates what the sink needs (tables, directories); idempotent, run by
    /// `pgfanout init` and safe to repeat.
    async fn init(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Opens the sink's connections before the first write, so a run fails
    /// at start, naming the sink, when it cannot be reached at all.
    async fn connect(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// For `pgfanout status`: reachable or not, with the last position the
    /// sink holds where it keeps one.
    async fn probe(&self) -> Result<Probe, String>;

    /// Writes one batch; see the trait's contract.
    async fn write(&self, batch: &Enriched) -> Result<(), SinkError>;

    /// Makes this sink the live stream's, once, before its first write. A
    /// sink whose replay depends on how batches were cut (HTTP's
    /// idempotency keys) returns where the live stream's batches must be
    /// cut after a restart; the pipeline's batcher honours it.
    async fn follow_live(
        &self,
        _pg: &tokio_postgres::Client,
        _source: &SourceConfig,
    ) -> Result<Option<Arc<dyn Cuts>>, SinkError> {
        Ok(None)
    }

    /// The scan chunk `origin` is complete and will never be written again:
    /// a sink may drop what it keeps for it (a watermark).
    async fn forget_origin(&self, _origin: &str) -> Result<(), SinkError> {
        Ok(())
    }
}

/// What a probe found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// The last position the sink holds, where it keeps one.
    pub position: Option<Position>,
    /// One line for a person (database, key, receiver's answer).
    pub detail: Option<String>,
}

/// Where the live stream's batches must be cut for a sink to replay
/// exactly what it had in flight (see [`Sink::follow_live`]).
pub trait Cuts: Send + Sync {
    /// Called with each change's position in stream order.
    fn boundary(&self, position: Position) -> Boundary;
}

/// What [`Cuts`] asks of the batcher at one change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boundary {
    /// End the batch before this change.
    pub cut_before: bool,
    /// Inside a range that must go out as one batch: do not cut for count
    /// or linger.
    pub hold: bool,
    /// End the batch after this change.
    pub cut_after: bool,
}

impl Boundary {
    /// Both asks at once (any sink's cut is a cut; any hold holds).
    pub fn union(self, other: Boundary) -> Boundary {
        Boundary {
            cut_before: self.cut_before || other.cut_before,
            hold: self.hold || other.hold,
            cut_after: self.cut_after || other.cut_after,
        }
    }
}

/// What a sink does with a batch it gives up on: refused for good
/// (`permanent_attempts`), or the webhook's `max_attempts` spent.
#[derive(Clone)]
pub enum Refused {
    /// Park it in this dead-letter topic and go on (`run`), or with
    /// `on_permanent_error = "stall"` retry a refusal for ever.
    Park(Arc<LogProducer>),
    /// No dead-letter topic (`status` and `init`, which never write; scans):
    /// ClickHouse and Redis retry a refusal for ever, the webhook returns it.
    Stall,
    /// Return it as the write's `Err` after `permanent_attempts`, whatever
    /// `on_permanent_error` says (`dead-letters replay`: the record stays
    /// parked and the command reports the new error).
    Return,
}

impl Refused {
    /// Where to park, if anywhere.
    pub fn dead_letter(&self) -> Option<Arc<LogProducer>> {
        match self {
            Refused::Park(log) => Some(log.clone()),
            Refused::Stall | Refused::Return => None,
        }
    }

    /// `retry::Policy::permanent_attempts` of ClickHouse and Redis.
    pub fn permanent_attempts(&self, on: OnPermanentError, attempts: u32) -> Option<u32> {
        match self {
            Refused::Park(_) => on.attempts(attempts),
            Refused::Stall => None,
            Refused::Return => Some(attempts.max(1)),
        }
    }
}

/// The configured sinks, in the order of their lanes, each doing with what
/// it gives up on what `refused` says.
pub fn build(cfg: &Config, refused: Refused) -> Result<Vec<Arc<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(c) = &cfg.clickhouse {
        sinks.push(Arc::new(clickhouse::ClickHouseSink::new(c, &refused)?));
    }
    if let Some(c) = &cfg.redis {
        sinks.push(Arc::new(redis::RedisSink::new(c, &refused)?));
    }
    if let Some(c) = &cfg.http {
        sinks.push(Arc::new(http::HttpSink::new(c, &refused)?));
    }
    if let Some(c) = &cfg.file {
        sinks.push(Arc::new(file::FileSink::new(c)));
    }
    if sinks.is_empty() && !cfg.pipeline.log_only {
        return Err(SinkError::NoSink);
    }
    for s in &sinks {
        crate::observe::metrics::register_sink(s.name());
    }
    Ok(sinks)
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("http: {0}")]
    Http(String),
    #[error("dead-letter topic: {0}")]
    DeadLetter(#[from] crate::log::LogError),
    #[error("clickhouse: {step}: {source}")]
    ClickHouseSchema { step: String, source: ::clickhouse::error::Error },
    #[error("file sink {path}: {source}")]
    File { path: String, source: std::io::Error },
    /// TLS settings that cannot work (a file unreadable, a CA for a URL
    /// without TLS) or a handshake that failed (a certificate the CA does
    /// not vouch for); never retried, the run stops at start.
    #[error("{sink}: {detail}")]
    Tls { sink: &'static str, detail: String },
    #[error("no sink is configured: add a [clickhouse], [redis], [http] or [file] section, or set pipeline.log_only = true to publish to the log only")]
    NoSink,
}

/// Parks a batch `sink` refused for good in the dead-letter topic
/// ([`parked::ParkedBatch`]: the batch itself, to replay with `pgfanout
/// dead-letters replay` once the cause is fixed, with the error, the
/// attempts and the change positions), keyed `<first event id>..<last>`.
/// Logged as an error naming `tables` and the positions. Once the broker
/// has it the batch counts as flushed.
pub async fn park(
    log: &LogProducer,
    sink: &'static str,
    tables: &str,
    batch: &Enriched,
    error: &str,
    attempts: u32,
) -> Result<(), SinkError> {
    let Some(parked) = parked::ParkedBatch::new(sink, tables, batch, error, attempts) else { return Ok(()) };
    let (first, last, changes) = (&parked.first, &parked.last, parked.changes);
    tracing::error!(sink, tables, first, last, changes, error, attempts, "batch refused permanently; parking it in the dead-letter topic and going on (on_permanent_error = \"stall\" would stop here)");
    parked.send(log).await?;
    Ok(())
}

/// The JSON form of an enriched change, shared by the Redis stream entries
/// and the HTTP batches so consumers see one shape.
#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    /// Stable across replays: `<commit LSN>/<ordinal>` (see `change_id`).
    pub id: String,
    /// Orders every event of one row: a receiver that applies an event only
    /// over a lower version ends with the latest row, whatever order
    /// snapshot, backfill and live events arrive in. 24 hex digits
    /// (`Position::sortable_hex`), compared as strings: the exact 96-bit
    /// position, which a JSON number (a double in most parsers) is not.
    pub version: String,
    pub op: Op,
    pub commit_ts: i64,
    pub event: Option<&'a EngagementRow>,
    pub previous: Option<&'a EngagementRow>,
}

impl<'a> EventJson<'a> {
    pub fn new(c: &'a EngagementChange) -> Self {
        EventJson {
            id: change_id(c),
            version: c.position.sortable_hex(),
            op: c.op,
            commit_ts: c.commit_ts,
            event: c.current.as_ref(),
            previous: c.previous.as_ref(),
        }
    }
}

/// Every engagement of a batch as `EventJson` text, computed by the first
/// sink that asks and shared with the other.
pub fn events_json(batch: &Enriched) -> &[String] {
    batch.events_json.get_or_init(|| {
        batch.engagements.iter().map(|c| serde_json::to_string(&EventJson::new(c)).unwrap_or_default()).collect()
    })
}

/// The id of an engagement event in Redis streams and HTTP batches: its
/// position, or for a re-read row (backfill) `bf:<event_id>:<digest>`, the
/// row and a digest of its enriched content, so re-reading an unchanged row
/// yields the same id (a receiver de-duplicates it) and a changed one a new id.
pub fn change_id(c: &EngagementChange) -> String {
    match (c.replay_digest, &c.current) {
        (Some(digest), Some(row)) => format!("bf:{}:{digest:016x}", row.event_id),
        _ => c.position.event_id(),
    }
}

/// Marks a batch as re-read history: each event gets its row-version digest.
pub fn mark_replayed(batch: &mut Enriched) {
    use sha2::{Digest, Sha256};
    for c in &mut batch.engagements {
        if let Some(row) = &c.current {
            let json = serde_json::to_vec(row).unwrap_or_default();
            let d = Sha256::digest(&json);
            c.replay_digest = Some(u64::from_be_bytes(d[..8].try_into().expect("8 bytes")));
        }
    }
}
