//! The rows a batch writes, without I/O: one record per event row and per
//! content row, tombstones for deletes and moved sort keys, and TRUNCATE
//! applied in commit order.

use clickhouse::Row;
use serde::Serialize;
use uuid::Uuid;

use crate::enrich::{ContentChange, EngagementChange, EngagementRow};
use crate::source::Op;

#[derive(Debug, Row, Serialize)]
pub(super) struct EngagementRecord {
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
pub(super) struct ContentRecord {
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

/// What a batch writes to one table: a TRUNCATE first if the batch holds
/// one, then the rows of the changes after the last TRUNCATE.
pub(super) struct Table<T> {
    pub name: &'static str,
    pub truncate: bool,
    pub rows: Vec<T>,
}

impl<T> Table<T> {
    /// The table's name if the batch writes to it.
    pub fn written(&self) -> Option<&'static str> {
        (self.truncate || !self.rows.is_empty()).then_some(self.name)
    }
}

/// The changes a batch still has to write once its TRUNCATEs are applied in
/// commit order: those after the last one, and whether there is one. Rows
/// of the changes before it would be inserted only for the TRUNCATE to
/// remove them (with every row older than the batch), so they are left out:
/// the table ends exactly as applying every segment in turn would leave it,
/// holding only what follows the last TRUNCATE. A replay of the batch, cut
/// the same way or not, truncates again and rewrites the same rows.
pub(super) fn after_last_truncate<T>(changes: &[T], is_truncate: impl Fn(&T) -> bool) -> (bool, &[T]) {
    match changes.iter().rposition(is_truncate) {
        Some(i) => (true, &changes[i + 1..]),
        None => (false, changes),
    }
}

/// Rows for a batch: the current row of each insert/update, a tombstone for
/// each delete, and a tombstone for the old sort key when an update moved
/// the row (event_ts or content_id changed).
pub(super) fn engagement_records(changes: &[EngagementChange]) -> Vec<EngagementRecord> {
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

pub(super) fn content_records(changes: &[ContentChange]) -> Vec<ContentRecord> {
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
