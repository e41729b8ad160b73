//! The sinks. Each receives enriched batches in commit order and returns
//! only once the batch is durably flushed (or, for HTTP, parked in the
//! dead-letter topic). Delivery is at-least-once: after a crash the slot
//! replays from the last acknowledged commit, so every sink must make a
//! repeated change count once (ClickHouse by row version, Redis by a
//! progress watermark applied atomically with the data, HTTP by event ids
//! and idempotency keys).

pub mod clickhouse;
pub mod http;
pub mod redis;

use serde::Serialize;

use crate::enrich::{EngagementChange, EngagementRow};
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

/// The JSON form of an enriched change, shared by the Redis stream entries
/// and the HTTP batches so consumers see one shape.
#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    /// Stable across replays: `<commit LSN>/<ordinal>`.
    pub id: String,
    pub op: Op,
    pub commit_ts: i64,
    pub event: Option<&'a EngagementRow>,
    pub previous: Option<&'a EngagementRow>,
}

impl<'a> EventJson<'a> {
    pub fn new(c: &'a EngagementChange) -> Self {
        EventJson {
            id: event_id(&c.position),
            op: c.op,
            commit_ts: c.commit_ts,
            event: c.current.as_ref(),
            previous: c.previous.as_ref(),
        }
    }
}

pub fn event_id(p: &Position) -> String {
    format!("{}/{}", crate::source::Lsn(p.commit_lsn).to_pg_string(), p.ordinal)
}
