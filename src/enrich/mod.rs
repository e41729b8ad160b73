//! Enrichment: each `engagement_events` change is LEFT JOINed to the content
//! it points at, as of its own commit (the content dimension is loaded at
//! start and then follows the content table's own changes in commit order),
//! and gets SPEC's derived figures. An event with unknown content is still
//! delivered, with empty content fields.

mod content;

pub use content::{Content, ContentDim, ContentError};

use serde::Serialize;
use uuid::Uuid;

use crate::source::{Change, Op, Position, Row};

pub const CONTENT_TABLE: (&str, &str) = ("public", "content");
pub const EVENTS_TABLE: (&str, &str) = ("public", "engagement_events");

/// `duration_ms / 1000.0`; NULL stays NULL.
pub fn engagement_seconds(duration_ms: Option<i32>) -> Option<f64> {
    duration_ms.map(|d| f64::from(d) / 1000.0)
}

/// `round(engagement_seconds / length_seconds * 100, 2)`; NULL when the
/// length is NULL or 0 or the duration is NULL (never 0, never NaN).
pub fn engagement_percent(duration_ms: Option<i32>, length_seconds: Option<i32>) -> Option<f64> {
    let secs = engagement_seconds(duration_ms)?;
    let len = length_seconds.filter(|l| *l != 0)?;
    let pct = secs / f64::from(len) * 100.0;
    // Round half away from zero at two decimals, as SQL's round() does.
    let rounded = (pct * 100.0).round() / 100.0;
    rounded.is_finite().then_some(rounded)
}

/// One enriched engagement event: the row as stored in ClickHouse, streamed
/// to Redis and posted to the HTTP system.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngagementRow {
    pub event_id: i64,
    pub content_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub event_type: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub event_ts: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    pub raw_payload: Option<serde_json::Value>,
    pub engagement_seconds: Option<f64>,
    pub engagement_percent: Option<f64>,
    pub content_slug: Option<String>,
    pub content_title: Option<String>,
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
    pub publish_ts: Option<i64>,
}

/// A change of one engagement event after enrichment, in stream order.
/// `previous` is the row before an update or delete (from REPLICA IDENTITY
/// FULL). A TRUNCATE of the events table is one of these too, with
/// `op: Op::Truncate` and neither row, so every sink meets it at its place
/// among the batch's events (rows before it are gone, rows after it stay).
#[derive(Debug, Clone, PartialEq)]
pub struct EngagementChange {
    pub op: Op,
    pub current: Option<EngagementRow>,
    pub previous: Option<EngagementRow>,
    pub position: Position,
    /// Commit time, ms since the Unix epoch.
    pub commit_ts: i64,
    /// Set on re-read rows (backfill): a digest of `current`, which gives the
    /// event an identity that is the same on every re-read of the same row
    /// version (see `sinks::change_id`). None: the position identifies it.
    pub replay_digest: Option<u64>,
}

/// A content change, for ClickHouse's `content_dim`. `content` is None only
/// for a TRUNCATE of the content table (`op: Op::Truncate`), which clears
/// the dimension at its place in the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentChange {
    pub op: Op,
    pub content: Option<Content>,
    pub position: Position,
    pub commit_ts: i64,
}

/// What one batch of changes becomes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Enriched {
    pub engagements: Vec<EngagementChange>,
    pub contents: Vec<ContentChange>,
    /// Changes that could not be enriched, with the reason; they are parked
    /// by the pipeline, never dropped.
    pub rejected: Vec<(Change, String)>,
    /// Each engagement's JSON as the Redis stream and the HTTP batch carry
    /// it, serialized once for both (`sinks::events_json`).
    pub events_json: std::sync::OnceLock<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("engagement_events row at {position}: column {column}: {reason}")]
    Column { position: Position, column: &'static str, reason: String },
}

/// Enriches a batch in order, updating the content dimension as content
/// changes go by (so each event sees content as of its own commit).
pub fn enrich(dim: &mut ContentDim, changes: &[Change]) -> Enriched {
    let mut out = Enriched::default();
    for c in changes {
        let commit_ts = c.tx.commit_ts_us.div_euclid(1000);
        if c.table.is(CONTENT_TABLE.0, CONTENT_TABLE.1) {
            match dim.apply(c) {
                Ok(content @ Some(_)) => {
                    out.contents.push(ContentChange { op: c.op, content, position: c.position, commit_ts })
                }
                Ok(None) if c.op == Op::Truncate => {
                    out.contents.push(ContentChange { op: c.op, content: None, position: c.position, commit_ts })
                }
                Ok(None) => {}
                Err(e) => out.rejected.push((c.clone(), e.to_string())),
            }
        } else if c.table.is(EVENTS_TABLE.0, EVENTS_TABLE.1) {
            if c.op == Op::Truncate {
                out.engagements.push(EngagementChange {
                    op: c.op,
                    current: None,
                    previous: None,
                    position: c.position,
                    commit_ts,
                    replay_digest: None,
                });
                continue;
            }
            let row = |r: &Option<Row>| r.as_ref().map(|r| engagement_row(dim, r, c.position)).transpose();
            let previous = match row(&c.before) {
                // An old row that cannot be enriched was parked, never
                // delivered: nothing to retract, and its fix must go through.
                Err(e) if c.after.is_some() => {
                    tracing::warn!(table = %c.table, position = %c.position, reason = %e, "the row before this update could not be enriched (it was parked); delivering the update as a new row");
                    Ok(None)
                }
                p => p,
            };
            match (row(&c.after), previous) {
                (Ok(current), Ok(previous)) => out.engagements.push(EngagementChange {
                    op: c.op,
                    current,
                    previous,
                    position: c.position,
                    commit_ts,
                    replay_digest: None,
                }),
                (Err(e), _) | (_, Err(e)) => out.rejected.push((c.clone(), e.to_string())),
            }
        }
    }
    out
}

fn engagement_row(dim: &ContentDim, row: &Row, position: Position) -> Result<EngagementRow, EnrichError> {
    let err = |column: &'static str, reason: &str| EnrichError::Column { position, column, reason: reason.to_string() };
    let event_id = row.get("id").and_then(|v| v.as_i64()).ok_or_else(|| err("id", "missing or not an integer"))?;
    let content_id = row.get("content_id").and_then(|v| v.as_uuid());
    let duration_ms = match row.get("duration_ms").and_then(|v| v.as_i64()) {
        None => None,
        Some(d) => Some(i32::try_from(d).map_err(|_| err("duration_ms", "out of range"))?),
    };
    let event_ts = row
        .get("event_ts")
        .and_then(|v| v.as_timestamp_millis())
        .ok_or_else(|| err("event_ts", "missing or not a timestamp"))?;
    let content = content_id.and_then(|id| dim.get(&id));
    let length_seconds = content.and_then(|c| c.length_seconds);
    Ok(EngagementRow {
        event_id,
        content_id,
        user_id: row.get("user_id").and_then(|v| v.as_uuid()),
        event_type: row.get("event_type").and_then(|v| v.as_str()).map(str::to_string),
        event_ts,
        duration_ms,
        device: row.get("device").and_then(|v| v.as_str()).map(str::to_string),
        raw_payload: row.get("raw_payload").map(|v| v.to_json()).filter(|j| !j.is_null()),
        engagement_seconds: engagement_seconds(duration_ms),
        engagement_percent: engagement_percent(duration_ms, length_seconds),
        content_slug: content.map(|c| c.slug.clone()),
        content_title: content.map(|c| c.title.clone()),
        content_type: content.and_then(|c| c.content_type.clone()),
        length_seconds,
        publish_ts: content.map(|c| c.publish_ts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_sample() {
        assert_eq!(engagement_seconds(Some(30_000)), Some(30.0));
        assert_eq!(engagement_percent(Some(30_000), Some(1200)), Some(2.5));
    }

    #[test]
    fn nulls_and_zero_length_give_null() {
        assert_eq!(engagement_percent(None, Some(1200)), None);
        assert_eq!(engagement_percent(Some(1000), None), None);
        assert_eq!(engagement_percent(Some(1000), Some(0)), None);
        assert_eq!(engagement_seconds(None), None);
    }

    #[test]
    fn rounds_to_two_decimals() {
        assert_eq!(engagement_percent(Some(1000), Some(3)), Some(33.33));
        assert_eq!(engagement_percent(Some(2000), Some(3)), Some(66.67));
        assert_eq!(engagement_percent(Some(-1000), Some(3)), Some(-33.33));
    }

    fn change(table: &str, op: Op, ordinal: u32, after: Option<Row>) -> Change {
        Change {
            table: crate::source::TableName::new("public", table),
            op,
            key: Row::default(),
            before: None,
            after,
            lsn: 0,
            tx: Default::default(),
            position: Position { commit_lsn: 1, ordinal },
        }
    }

    fn event(id: i64) -> Row {
        use crate::source::values::Value;
        let ts = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        Row(vec![("id".into(), Value::Int8(id)), ("event_ts".into(), Value::TimestampTz(ts))])
    }

    /// A TRUNCATE keeps its place among the batch's changes: each sink
    /// hides what precedes it and keeps what follows.
    #[test]
    fn truncates_stay_in_stream_order() {
        let mut dim = ContentDim::default();
        let batch = [
            change("engagement_events", Op::Create, 0, Some(event(1))),
            change("engagement_events", Op::Truncate, 1, None),
            change("content", Op::Truncate, 2, None),
            change("engagement_events", Op::Create, 3, Some(event(2))),
        ];
        let out = enrich(&mut dim, &batch);
        let ops: Vec<(Op, u32, Option<i64>)> = out
            .engagements
            .iter()
            .map(|c| (c.op, c.position.ordinal, c.current.as_ref().map(|r| r.event_id)))
            .collect();
        assert_eq!(ops, [(Op::Create, 0, Some(1)), (Op::Truncate, 1, None), (Op::Create, 3, Some(2))]);
        assert!(out.engagements[1].previous.is_none());
        assert_eq!(out.contents.len(), 1);
        assert_eq!(
            (out.contents[0].op, out.contents[0].content.as_ref(), out.contents[0].position.ordinal),
            (Op::Truncate, None, 2)
        );
        assert!(out.rejected.is_empty());
    }

    proptest! {
        #[test]
        fn percent_is_finite_and_two_decimals(d in any::<i32>(), l in any::<i32>()) {
            if let Some(p) = engagement_percent(Some(d), Some(l)) {
                prop_assert!(p.is_finite());
                prop_assert!(((p * 100.0).round() - p * 100.0).abs() < 1e-6 * p.abs().max(1.0));
            } else {
                prop_assert_eq!(l, 0);
            }
        }
    }
}
