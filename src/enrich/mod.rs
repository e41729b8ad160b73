//! Enrichment: each `engagement_events` change is LEFT JOINed to the content
//! it points at, as of its own commit (the content dimension is loaded at
//! start and then follows the content table's own changes in commit order),
//! and gets SPEC's derived figures. An event with unknown content is still
//! delivered, with empty content fields.

mod content;
pub mod journal;

pub use content::{Content, ContentDim, ContentError, ContentVersion, VersionKind};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::source::values::Value;
use crate::source::{Change, Op, Position, Row, TableName};

pub const CONTENT_TABLE: (&str, &str) = ("public", "content");
pub const EVENTS_TABLE: (&str, &str) = ("public", "engagement_events");

/// The column that says when a row of a domain table happened, which a
/// backfill's time range applies to by default.
pub fn time_column(table: &TableName) -> Option<&'static str> {
    if table.is(EVENTS_TABLE.0, EVENTS_TABLE.1) {
        Some("event_ts")
    } else if table.is(CONTENT_TABLE.0, CONTENT_TABLE.1) {
        Some("publish_ts")
    } else {
        None
    }
}

/// `duration_ms / 1000.0`; NULL stays NULL.
pub fn engagement_seconds(duration_ms: Option<i32>) -> Option<f64> {
    duration_ms.map(|d| f64::from(d) / 1000.0)
}

/// `round(engagement_seconds / length_seconds * 100, 2)`; NULL when the
/// length is NULL or 0 or the duration is NULL (never 0, never NaN).
///
/// Rounded half away from zero on the exact decimal value, as PostgreSQL's
/// `round(numeric, 2)` and Spark's HALF_UP `round` do: in hundredths the
/// percent is `duration_ms * 10 / length_seconds`, a ratio of integers, so
/// it is rounded in integers (f64 would hold 1005 ms of 100 s as
/// 1.00499999… and round the tie down). Only the final hundredths become a
/// float, `n / 100.0` correctly rounded: the same double as parsing
/// PostgreSQL's text `1.01`.
pub fn engagement_percent(duration_ms: Option<i32>, length_seconds: Option<i32>) -> Option<f64> {
    let hundredths = percent_hundredths(duration_ms?, length_seconds?)?;
    // |n| <= 10 * 2^31 < 2^53: exact as f64, and one correctly rounded division.
    Some(hundredths as f64 / 100.0)
}

/// `round(duration_ms * 10 / length_seconds)` half away from zero, exactly;
/// None for a length of 0. i64 holds every case: |duration_ms * 10| <=
/// 10 * 2^31, and twice a remainder stays below 2^33.
fn percent_hundredths(duration_ms: i32, length_seconds: i32) -> Option<i64> {
    let num = i64::from(duration_ms) * 10;
    let den = i64::from(length_seconds);
    if den == 0 {
        return None;
    }
    let (q, r) = (num / den, num % den);
    // Truncating division: q is rounded toward zero and r has num's sign.
    // Away from zero when the dropped part is at least one half.
    if 2 * r.abs() >= den.abs() {
        Some(if (num < 0) == (den < 0) { q + 1 } else { q - 1 })
    } else {
        Some(q)
    }
}

/// One enriched engagement event: the row as stored in ClickHouse, streamed
/// to Redis and posted to the HTTP system.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Which run of positions the batch belongs to: None for the live
    /// stream, a chunk's name (`snapshot:<table>:<chunk>`,
    /// `backfill:<cp>:<table>:<chunk>`) for a scan. Scan chunks carry
    /// positions below the live stream's, so a sink that keeps a progress
    /// watermark keeps one per origin (see `sinks::Sink`).
    pub origin: Option<String>,
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

/// A column the enrichment computes from: `Ok(None)` for SQL NULL, an error
/// naming it when the table no longer has it (dropped or renamed) or it no
/// longer holds the type `read` takes (retyped), so such a change is parked
/// with that reason instead of silently losing its derived figures.
fn needed<'r, T>(
    row: &'r Row,
    column: &'static str,
    what: &str,
    read: impl Fn(&'r Value) -> Option<T>,
    err: &impl Fn(&'static str, &str) -> EnrichError,
) -> Result<Option<T>, EnrichError> {
    match row.get(column) {
        None => Err(err(column, "missing from the row: the column was dropped or renamed on the source table")),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => {
            read(v).map(Some).ok_or_else(|| err(column, &format!("not {what} (was the column's type changed?)")))
        }
    }
}

fn engagement_row(dim: &ContentDim, row: &Row, position: Position) -> Result<EngagementRow, EnrichError> {
    let err = |column: &'static str, reason: &str| EnrichError::Column { position, column, reason: reason.to_string() };
    let event_id = row.get("id").and_then(|v| v.as_i64()).ok_or_else(|| err("id", "missing or not an integer"))?;
    let content_id = needed(row, "content_id", "a uuid", Value::as_uuid, &err)?;
    let duration_ms = match needed(row, "duration_ms", "an integer", Value::as_i64, &err)? {
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
    fn a_needed_column_dropped_or_retyped_is_a_reason_not_a_null() {
        let mut dim = ContentDim::default();
        let with = |column: &str, v: Option<Value>| {
            let mut row = event(1);
            row.0.retain(|(c, _)| &**c != column);
            if let Some(v) = v {
                row.0.push((column.into(), v));
            }
            row
        };
        let reason = |row: Row, dim: &mut ContentDim| {
            let e = enrich(dim, &[change("engagement_events", Op::Create, 0, Some(row))]);
            e.rejected.first().map(|(_, r)| r.clone())
        };
        assert_eq!(reason(event(1), &mut dim), None, "NULLs are fine");
        let dropped = reason(with("duration_ms", None), &mut dim).expect("parked");
        assert!(dropped.contains("duration_ms") && dropped.contains("dropped or renamed"), "{dropped}");
        let retyped = reason(with("duration_ms", Some(Value::Text("12".into()))), &mut dim).expect("parked");
        assert!(retyped.contains("duration_ms") && retyped.contains("type changed"), "{retyped}");
        let widened = reason(with("duration_ms", Some(Value::Int8(1_000))), &mut dim);
        assert_eq!(widened, None, "a wider integer type still reads");
        let content = reason(with("content_id", None), &mut dim).expect("parked");
        assert!(content.contains("content_id"), "{content}");
        // A column the enrichment does not compute from may go.
        assert_eq!(reason(with("device", None), &mut dim), None);
    }

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

    #[test]
    fn ties_round_away_from_zero() {
        // 1005 ms of 100 s is exactly 1.005 %: PostgreSQL says 1.01.
        assert_eq!(engagement_percent(Some(1005), Some(100)), Some(1.01));
        assert_eq!(engagement_percent(Some(-1005), Some(100)), Some(-1.01));
        assert_eq!(engagement_percent(Some(1005), Some(-100)), Some(-1.01));
        assert_eq!(engagement_percent(Some(-1005), Some(-100)), Some(1.01));
        assert_eq!(engagement_percent(Some(1), Some(20)), Some(0.01)); // 0.005
        assert_eq!(engagement_percent(Some(-1), Some(20)), Some(-0.01));
        assert_eq!(engagement_percent(Some(1), Some(30)), Some(0.0)); // 0.00333
        assert_eq!(engagement_percent(Some(1), Some(3)), Some(0.03)); // 0.0333
                                                                      // 0.015 and 2.675 are below their decimal in f64; the exact value is a tie.
        assert_eq!(engagement_percent(Some(3), Some(20)), Some(0.02));
        assert_eq!(engagement_percent(Some(2675), Some(100)), Some(2.68));
    }

    #[test]
    fn extremes() {
        assert_eq!(engagement_percent(Some(i32::MIN), Some(1)), Some(-21474836480.0 / 100.0));
        assert_eq!(engagement_percent(Some(i32::MAX), Some(1)), Some(21474836470.0 / 100.0));
        assert_eq!(engagement_percent(Some(i32::MIN), Some(-1)), Some(214748364.8));
        assert_eq!(engagement_percent(Some(i32::MIN), Some(i32::MIN)), Some(0.1));
        assert_eq!(engagement_percent(Some(i32::MAX), Some(i32::MIN)), Some(-0.1));
        assert_eq!(engagement_percent(Some(1), Some(i32::MAX)), Some(0.0));
        assert_eq!(engagement_percent(Some(i32::MAX), Some(i32::MAX)), Some(0.1));
    }

    /// The exact rational d*10/l against the rounded hundredths, in i128
    /// so this reference shares no arithmetic with the function.
    fn reference_hundredths(d: i32, l: i32) -> i128 {
        let (num, den) = (i128::from(d) * 10, i128::from(l));
        // Scale by 2 and compare with the two neighbours: n is the integer
        // with |2*num - 2*n*den| < |den|, or on a tie the one farther from 0.
        let below = num.div_euclid(den.abs()) * den.signum();
        let mut best = below;
        for n in [below - 1, below, below + 1] {
            let err = (2 * num - 2 * n * den).abs();
            let best_err = (2 * num - 2 * best * den).abs();
            if err < best_err || (err == best_err && n.abs() > best.abs()) {
                best = n;
            }
        }
        best
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
            columns: None,
            unchanged_toast: Vec::new(),
        }
    }

    fn event(id: i64) -> Row {
        let ts = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        Row(vec![
            ("id".into(), Value::Int8(id)),
            ("content_id".into(), Value::Null),
            ("event_ts".into(), Value::TimestampTz(ts)),
            ("duration_ms".into(), Value::Null),
        ])
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
        fn percent_is_the_exact_ratio_rounded_half_away(d in any::<i32>(), l in any::<i32>()) {
            match engagement_percent(Some(d), Some(l)) {
                Some(p) => {
                    let n = reference_hundredths(d, l);
                    prop_assert_eq!(p, n as f64 / 100.0);
                    // And the double PostgreSQL's text for the same value parses to.
                    let sign = if n < 0 { "-" } else { "" };
                    let text = format!("{sign}{}.{:02}", n.abs() / 100, n.abs() % 100);
                    prop_assert_eq!(p, text.parse::<f64>().unwrap());
                }
                None => prop_assert_eq!(l, 0),
            }
        }

        #[test]
        fn ties_round_away(half in -10_000i32..10_000, t in -50_000i32..50_000) {
            // d = o*t over l = 20*t is exactly o/2 hundredths (o odd): a tie.
            prop_assume!(t != 0);
            let o = 2 * half + 1;
            let want = (o + o.signum()) / 2;
            prop_assert_eq!(engagement_percent(Some(o * t), Some(20 * t)), Some(f64::from(want) / 100.0));
        }
    }
}
