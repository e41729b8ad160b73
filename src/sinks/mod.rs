//! The sinks. Each receives enriched batches in commit order and returns
//! only once the batch is durably flushed, or parked in the dead-letter
//! topic after a permanent error (see `retry` and [`park`]). Delivery is at-least-once: after a crash the slot
//! replays from the last acknowledged commit, so every sink must make a
//! repeated change count once (ClickHouse by row version, Redis by a
//! progress watermark applied atomically with the data, HTTP by event ids
//! and idempotency keys).

pub mod clickhouse;
pub mod http;
pub mod redis;

use std::sync::Arc;

use serde::Serialize;

use crate::enrich::{EngagementChange, EngagementRow, Enriched};
use crate::source::{Op, Position};

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
}

/// Parks a batch `sink` refused for good in the dead-letter topic: the
/// payload names the sink, the error, the attempts and the change
/// positions (first, last, count; the rows are in the log under them, to
/// replay once the cause is fixed), keyed `<first event id>..<last>`.
/// Logged as an error naming `tables` and the positions. Once the broker
/// has it the batch counts as flushed.
pub async fn park(
    log: &crate::log::LogProducer,
    sink: &'static str,
    tables: &str,
    batch: &Enriched,
    error: &str,
    attempts: u32,
) -> Result<(), SinkError> {
    let positions = || batch.engagements.iter().map(|c| c.position).chain(batch.contents.iter().map(|c| c.position));
    let (Some(first), Some(last)) = (positions().min(), positions().max()) else { return Ok(()) };
    let (first, last) = (event_id(&first), event_id(&last));
    tracing::error!(sink, tables, first, last, changes = positions().count(), error, attempts, "batch refused permanently; parking it in the dead-letter topic and going on (on_permanent_error = \"stall\" would stop here)");
    let payload = serde_json::json!({
        "sink": sink,
        "tables": tables,
        "error": error,
        "attempts": attempts,
        "first": first,
        "last": last,
        "changes": positions().count(),
        "engagements": batch.engagements.len(),
        "contents": batch.contents.len(),
    });
    let key = format!("{first}..{last}");
    log.dead_letter(sink, &key, &serde_json::to_vec(&payload).unwrap_or_default(), error).await?;
    Ok(())
}

/// One of the sinks, as a lane of the pipeline and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    ClickHouse,
    Redis,
    Http,
}

/// The three sinks, shared by the live lanes, snapshot and backfill.
#[derive(Clone)]
pub struct Sinks {
    pub clickhouse: Arc<clickhouse::ClickHouseSink>,
    pub redis: Arc<redis::RedisSink>,
    pub http: Arc<http::HttpSink>,
}

impl Sinks {
    pub const ALL: [Sink; 3] = [Sink::ClickHouse, Sink::Redis, Sink::Http];

    /// Writes a batch to one sink; returns once it is flushed there.
    /// `scope`: the Redis progress scope (see `pipeline::DeliverOptions`).
    pub async fn write(&self, sink: Sink, batch: &Enriched, scope: Option<&str>) -> Result<(), SinkError> {
        match sink {
            Sink::ClickHouse => crate::observe::timed("clickhouse", self.clickhouse.write(batch)).await,
            Sink::Redis => crate::observe::timed("redis", self.redis.write_scoped(batch, scope)).await,
            Sink::Http => crate::observe::timed("http", self.http.write(batch)).await,
        }
    }

    /// Writes a batch to every sink concurrently.
    pub async fn write_all(&self, batch: &Enriched, scope: Option<&str>) -> Result<(), SinkError> {
        tokio::try_join!(
            self.write(Sink::ClickHouse, batch, scope),
            self.write(Sink::Redis, batch, scope),
            self.write(Sink::Http, batch, scope),
        )?;
        Ok(())
    }
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

pub fn event_id(p: &Position) -> String {
    format!("{}/{}", crate::source::Lsn(p.commit_lsn).to_pg_string(), p.ordinal)
}

/// The id of an engagement event in Redis streams and HTTP batches: its
/// position, or for a re-read row (backfill) `bf:<event_id>:<digest>`, the
/// row and a digest of its enriched content, so re-reading an unchanged row
/// yields the same id (a receiver de-duplicates it) and a changed one a new id.
pub fn change_id(c: &EngagementChange) -> String {
    match (c.replay_digest, &c.current) {
        (Some(digest), Some(row)) => format!("bf:{}:{digest:016x}", row.event_id),
        _ => event_id(&c.position),
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
