//! ClickHouse: enriched events into `enriched_engagements`, content changes
//! into `content_dim`. Both tables are ReplacingMergeTree with a version
//! taken from the change's position and an `_is_deleted` flag, so a replayed
//! row collapses into the one already there and a delete hides the row;
//! queries read with FINAL (or `SETTINGS final = 1`).

use std::time::Duration;

use clickhouse::{Client, Row, RowOwned, RowWrite};
use serde::Serialize;
use uuid::Uuid;

use super::SinkError;
use crate::config::ClickHouseConfig;
use crate::enrich::{ContentChange, EngagementChange, EngagementRow, Enriched};
use crate::retry::Backoff;
use crate::source::Op;

#[derive(Debug, Row, Serialize)]
struct EngagementRecord {
    event_id: u64,
    #[serde(with = "clickhouse::serde::uuid")]
    content_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid::option")]
    user_id: Option<Uuid>,
    event_type: Option<String>,
    event_ts: i64,
    duration_ms: Option<i32>,
    device: Option<String>,
    engagement_seconds: Option<f64>,
    engagement_percent: Option<f64>,
    content_slug: String,
    content_title: String,
    content_type: String,
    length_seconds: Option<i32>,
    publish_ts: Option<i64>,
    /// `Position::version()`: UInt128, exact for every LSN and ordinal.
    _version: u128,
    _is_deleted: u8,
}

impl EngagementRecord {
    fn new(r: &EngagementRow, version: u128, deleted: bool) -> Self {
        EngagementRecord {
            event_id: r.event_id as u64,
            // The sort key cannot be Nullable: a missing content_id is the nil UUID.
            content_id: r.content_id.unwrap_or(Uuid::nil()),
            user_id: r.user_id,
            event_type: r.event_type.clone(),
            event_ts: r.event_ts,
            duration_ms: r.duration_ms,
            device: r.device.clone(),
            engagement_seconds: r.engagement_seconds,
            engagement_percent: r.engagement_percent,
            content_slug: r.content_slug.clone().unwrap_or_default(),
            content_title: r.content_title.clone().unwrap_or_default(),
            content_type: r.content_type.clone().unwrap_or_default(),
            length_seconds: r.length_seconds,
            publish_ts: r.publish_ts,
            _version: version,
            _is_deleted: u8::from(deleted),
        }
    }

    fn sort_key(&self) -> (i64, Uuid, u64) {
        (self.event_ts, self.content_id, self.event_id)
    }
}

#[derive(Debug, Row, Serialize)]
struct ContentRecord {
    #[serde(with = "clickhouse::serde::uuid")]
    id: Uuid,
    slug: String,
    title: String,
    content_type: Option<String>,
    length_seconds: Option<i32>,
    publish_ts: i64,
    /// `Position::version()`, as for events: commit milliseconds (the
    /// earlier `version_ts_ms`) tie for two changes in one millisecond.
    _version: u128,
    _is_deleted: u8,
}

/// How long one write (all its requests) may take. The client has no
/// timeout of its own: a hung server (or a dead connection without a reset)
/// would stall the pipeline silently forever. A write abandoned here may
/// still land later; the retry writes the same rows and versions, which
/// collapse into them.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ClickHouseSink {
    client: Client,
}

impl ClickHouseSink {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        let client = Client::default()
            .with_url(&cfg.url)
            .with_database(&cfg.database)
            .with_user(&cfg.user)
            .with_password(cfg.password.expose());
        ClickHouseSink { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Writes a batch, retrying (with backoff) until ClickHouse takes it:
    /// an outage stalls the pipeline, it never drops data.
    pub async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        let (events_truncated, events) = after_last_truncate(&batch.engagements, |c| c.op == Op::Truncate);
        let (contents_truncated, contents) = after_last_truncate(&batch.contents, |c| c.op == Op::Truncate);
        let events =
            Table { name: "enriched_engagements", truncate: events_truncated, rows: engagement_records(events) };
        let contents = Table { name: "content_dim", truncate: contents_truncated, rows: content_records(contents) };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = tokio::time::timeout(REQUEST_TIMEOUT, self.write_once(&events, &contents));
            match attempt.await.unwrap_or(Err(SinkError::ClickHouse(clickhouse::error::Error::TimedOut))) {
                Ok(()) => {
                    crate::observe::sink_flushed("clickhouse", backoff.attempts());
                    return Ok(());
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(sink = "clickhouse", error = %e, attempt = backoff.attempts(), "write failed; retrying");
                    crate::observe::sink_failed("clickhouse", backoff.attempts(), &e, true);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One attempt. A retry repeats it whole: the TRUNCATE again, then the
    /// same rows and versions, so it ends in the same state.
    async fn write_once(
        &self,
        events: &Table<EngagementRecord>,
        contents: &Table<ContentRecord>,
    ) -> Result<(), SinkError> {
        self.write_table(events).await?;
        self.write_table(contents).await
    }

    async fn write_table<T: RowOwned + RowWrite>(&self, table: &Table<T>) -> Result<(), SinkError> {
        if table.truncate {
            self.client.query(&format!("TRUNCATE TABLE {}", table.name)).execute().await?;
        }
        if !table.rows.is_empty() {
            let mut ins = self.client.insert::<T>(table.name).await?;
            for r in &table.rows {
                ins.write(r).await?;
            }
            ins.end().await?;
        }
        Ok(())
    }
}

/// What a batch writes to one table: a TRUNCATE first if the batch holds
/// one, then the rows of the changes after the last TRUNCATE.
struct Table<T> {
    name: &'static str,
    truncate: bool,
    rows: Vec<T>,
}

/// The changes a batch still has to write once its TRUNCATEs are applied in
/// commit order: those after the last one, and whether there is one. Rows
/// of the changes before it would be inserted only for the TRUNCATE to
/// remove them (with every row older than the batch), so they are left out:
/// the table ends exactly as applying every segment in turn would leave it,
/// holding only what follows the last TRUNCATE. A replay of the batch, cut
/// the same way or not, truncates again and rewrites the same rows.
fn after_last_truncate<T>(changes: &[T], is_truncate: impl Fn(&T) -> bool) -> (bool, &[T]) {
    match changes.iter().rposition(is_truncate) {
        Some(i) => (true, &changes[i + 1..]),
        None => (false, changes),
    }
}

/// Rows for a batch: the current row of each insert/update, a tombstone for
/// each delete, and a tombstone for the old sort key when an update moved
/// the row (event_ts or content_id changed).
fn engagement_records(changes: &[EngagementChange]) -> Vec<EngagementRecord> {
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        let version = c.position.version();
        let current = c.current.as_ref().map(|r| EngagementRecord::new(r, version, false));
        let previous = c.previous.as_ref().map(|r| EngagementRecord::new(r, version, true));
        match (c.op, current, previous) {
            (Op::Delete, _, Some(prev)) => out.push(prev),
            (_, Some(cur), Some(prev)) => {
                if prev.sort_key() != cur.sort_key() {
                    out.push(prev);
                }
                out.push(cur);
            }
            (_, Some(cur), None) => out.push(cur),
            _ => {}
        }
    }
    out
}

fn content_records(changes: &[ContentChange]) -> Vec<ContentRecord> {
    changes
        .iter()
        .filter_map(|c| {
            let content = c.content.as_ref()?;
            Some(ContentRecord {
                id: content.id,
                slug: content.slug.clone(),
                title: content.title.clone(),
                content_type: content.content_type.clone(),
                length_seconds: content.length_seconds,
                publish_ts: content.publish_ts,
                _version: c.position.version(),
                _is_deleted: u8::from(c.op == Op::Delete),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_follows_the_last_truncate_is_written() {
        let truncate = |x: &i32| *x == 0;
        assert_eq!(after_last_truncate(&[1, 2, 0, 3], truncate), (true, &[3][..]));
        assert_eq!(after_last_truncate(&[0, 1, 0], truncate), (true, &[][..]));
        assert_eq!(after_last_truncate(&[1, 2], truncate), (false, &[1, 2][..]));
        assert_eq!(after_last_truncate(&[], truncate), (false, &[][..]));
    }
}
