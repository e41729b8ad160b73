//! What a sink parks in the dead-letter topic when it gives up on a batch:
//! the batch itself (its enriched events and content changes with their
//! positions, commit times and origin) as versioned JSON, so that `pgfanout
//! dead-letters replay` can hand it back to the same sink's `write` once the
//! cause is fixed. The summary fields (`first`, `last`, the counts,
//! `tables`, `error`, `attempts`) are for people and tools reading the topic.

use serde::{Deserialize, Serialize};

use crate::enrich::{self, Content, ContentChange, EngagementChange, EngagementRow, Enriched};
use crate::log::{LogError, LogProducer};
use crate::source::{Op, Position};

/// The `pgfanout.format` header and `format` field of a parked batch. A
/// reader refuses other versions rather than guess at them.
pub const BATCH_FORMAT: &str = "batch.v1";
/// A parked batch without its changes: one change alone was larger than
/// the broker takes, so only the summary (positions, counts) was kept.
pub const SUMMARY_FORMAT: &str = "summary.v1";

/// A parked batch, as the dead-letter record's payload holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedBatch {
    pub format: String,
    pub sink: String,
    /// Where the sink was writing (tables, keys, the receiver's URL).
    pub tables: String,
    pub error: String,
    pub attempts: u32,
    /// Event ids (`Position::event_id`) of the batch's first and last change.
    pub first: String,
    pub last: String,
    pub changes: usize,
    pub engagements: usize,
    pub contents: usize,
    /// The batch's `Enriched::origin` (None: the live stream).
    pub origin: Option<String>,
    pub batch: Batch,
}

/// The changes of a parked batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub engagements: Vec<ParkedEngagement>,
    pub contents: Vec<ParkedContent>,
}

/// An `EngagementChange`, with its position as `Position::sortable_hex`
/// (exact in any JSON reader).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedEngagement {
    pub op: Op,
    #[serde(with = "sortable_hex")]
    pub position: Position,
    pub commit_ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_digest: Option<u64>,
    pub current: Option<EngagementRow>,
    pub previous: Option<EngagementRow>,
}

/// A `ContentChange`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedContent {
    pub op: Op,
    #[serde(with = "sortable_hex")]
    pub position: Position,
    pub commit_ts: i64,
    pub content: Option<Content>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error("format {0:?} is not one this pgfanout reads ({BATCH_FORMAT})")]
    Format(String),
    #[error("the payload is not a parked batch: {0}")]
    Json(#[from] serde_json::Error),
}

impl ParkedBatch {
    /// The parked form of `batch`; None if it holds no change (nothing to park).
    pub fn new(sink: &str, tables: &str, batch: &Enriched, error: &str, attempts: u32) -> Option<ParkedBatch> {
        let positions =
            || batch.engagements.iter().map(|c| c.position).chain(batch.contents.iter().map(|c| c.position));
        let (first, last) = (positions().min()?, positions().max()?);
        let engagements = batch
            .engagements
            .iter()
            .map(|c| ParkedEngagement {
                op: c.op,
                position: c.position,
                commit_ts: c.commit_ts,
                replay_digest: c.replay_digest,
                current: c.current.clone(),
                previous: c.previous.clone(),
            })
            .collect();
        let contents = batch
            .contents
            .iter()
            .map(|c| ParkedContent {
                op: c.op,
                position: c.position,
                commit_ts: c.commit_ts,
                content: c.content.clone(),
            })
            .collect();
        Some(ParkedBatch {
            format: BATCH_FORMAT.into(),
            sink: sink.into(),
            tables: tables.into(),
            error: error.into(),
            attempts,
            first: first.event_id(),
            last: last.event_id(),
            changes: positions().count(),
            engagements: batch.engagements.len(),
            contents: batch.contents.len(),
            origin: batch.origin.clone(),
            batch: Batch { engagements, contents },
        })
    }

    /// Reads a dead-letter payload of [`BATCH_FORMAT`].
    pub fn parse(payload: &[u8]) -> Result<ParkedBatch, ParkedError> {
        let parked: ParkedBatch = serde_json::from_slice(payload)?;
        if parked.format != BATCH_FORMAT {
            return Err(ParkedError::Format(parked.format));
        }
        Ok(parked)
    }

    /// The dead-letter record's key: `<first event id>..<last>`.
    pub fn key(&self) -> String {
        format!("{}..{}", self.first, self.last)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a parked batch serializes")
    }

    /// Parks it: one record in the dead-letter topic, once the broker has
    /// it; or, when that is larger than the broker takes, its halves, each
    /// a batch of its own (and replayed as one), down to single changes;
    /// a single change too large is parked as its summary alone.
    pub async fn send(&self, log: &LogProducer) -> Result<(), LogError> {
        let sent = log.dead_letter(&self.sink, &self.key(), &self.to_json(), &self.error, self.format_name()).await;
        match sent {
            Err(e) if e.is_too_large() => {}
            other => return other,
        }
        let Some((a, b)) = self.halves() else {
            tracing::error!(sink = %self.sink, first = %self.first, "a single parked change is larger than the broker takes; parking its summary only (re-deliver it with pgfanout backfill)");
            let summary = ParkedBatch {
                format: SUMMARY_FORMAT.into(),
                batch: Batch { engagements: Vec::new(), contents: Vec::new() },
                ..self.clone()
            };
            return log.dead_letter(&self.sink, &self.key(), &summary.to_json(), &self.error, SUMMARY_FORMAT).await;
        };
        tracing::warn!(sink = %self.sink, first = %self.first, last = %self.last, "parked batch larger than the broker takes; parking it in two halves");
        Box::pin(a.send(log)).await?;
        Box::pin(b.send(log)).await
    }

    fn format_name(&self) -> &'static str {
        if self.format == SUMMARY_FORMAT {
            SUMMARY_FORMAT
        } else {
            BATCH_FORMAT
        }
    }

    /// The batch in two, each half of its engagements and of its content
    /// changes (a replay applies each by its own position, so the halves
    /// need not interleave); None for a single change.
    fn halves(&self) -> Option<(ParkedBatch, ParkedBatch)> {
        if self.changes < 2 {
            return None;
        }
        let (e, c) = (&self.batch.engagements, &self.batch.contents);
        // A lone engagement and a lone content change split between them.
        let (ne, nc) = if e.len() == 1 && c.len() == 1 { (1, 0) } else { (e.len() / 2, c.len() / 2) };
        let part = |engagements: &[ParkedEngagement], contents: &[ParkedContent]| {
            let changes = Enriched {
                origin: self.origin.clone(),
                engagements: engagements.iter().cloned().map(ParkedEngagement::into_change).collect(),
                contents: contents.iter().cloned().map(ParkedContent::into_change).collect(),
                ..Enriched::default()
            };
            ParkedBatch::new(&self.sink, &self.tables, &changes, &self.error, self.attempts)
        };
        Some((part(&e[..ne], &c[..nc])?, part(&e[ne..], &c[nc..])?))
    }

    /// The position of a TRUNCATE the batch holds, if any: replayed later,
    /// it would remove from the sink what was written since.
    pub fn truncate(&self) -> Option<String> {
        let e = self.batch.engagements.iter().filter(|c| c.op == Op::Truncate).map(|c| c.position);
        let c = self.batch.contents.iter().filter(|c| c.op == Op::Truncate).map(|c| c.position);
        e.chain(c).min().map(|p| p.event_id())
    }

    /// The batch as the sink was given it, under `origin` (see
    /// `Enriched::origin`). The derived figures are computed again from the
    /// row rather than read back: they are a function of it, and so are
    /// bit for bit what enrichment gave the first write, whatever a JSON
    /// float's round trip would have made of them.
    pub fn into_enriched(self, origin: Option<String>) -> Enriched {
        let derive = |row: Option<EngagementRow>| {
            row.map(|mut r| {
                r.engagement_seconds = enrich::engagement_seconds(r.duration_ms);
                r.engagement_percent = enrich::engagement_percent(r.duration_ms, r.length_seconds);
                r
            })
        };
        let engagements = self
            .batch
            .engagements
            .into_iter()
            .map(|c| {
                let mut change = c.into_change();
                change.current = derive(change.current);
                change.previous = derive(change.previous);
                change
            })
            .collect();
        let contents = self.batch.contents.into_iter().map(ParkedContent::into_change).collect();
        Enriched { origin, engagements, contents, ..Enriched::default() }
    }
}

impl ParkedEngagement {
    fn into_change(self) -> EngagementChange {
        EngagementChange {
            op: self.op,
            current: self.current,
            previous: self.previous,
            position: self.position,
            commit_ts: self.commit_ts,
            replay_digest: self.replay_digest,
        }
    }
}

impl ParkedContent {
    fn into_change(self) -> ContentChange {
        ContentChange { op: self.op, content: self.content, position: self.position, commit_ts: self.commit_ts }
    }
}

mod sortable_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::source::Position;

    pub fn serialize<S: Serializer>(p: &Position, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.sortable_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Position, D::Error> {
        let text = String::deserialize(d)?;
        Position::from_sortable_hex(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a position (24 hex digits)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_id: i64, duration_ms: Option<i32>, length_seconds: Option<i32>) -> EngagementRow {
        EngagementRow {
            event_id,
            content_id: Some(uuid::Uuid::from_u128(0xa1)),
            user_id: None,
            event_type: Some("play".into()),
            event_ts: 1_764_000_000_123,
            duration_ms,
            device: Some("web-safari".into()),
            raw_payload: Some(serde_json::json!({"source": "test", "nested": [1, 2.5, "ü"]})),
            engagement_seconds: enrich::engagement_seconds(duration_ms),
            engagement_percent: enrich::engagement_percent(duration_ms, length_seconds),
            content_slug: Some("slug".into()),
            content_title: Some("Title".into()),
            content_type: Some("podcast".into()),
            length_seconds,
            publish_ts: Some(1_700_000_000_000),
        }
    }

    fn batch() -> Enriched {
        let at = |lsn: u64, ordinal: u32| Position { commit_lsn: lsn, ordinal };
        let change = |op, current, previous, position, replay_digest| EngagementChange {
            op,
            current,
            previous,
            position,
            commit_ts: 1_764_000_000_456,
            replay_digest,
        };
        Enriched {
            origin: Some("backfill:0/1:public.engagement_events:3".into()),
            engagements: vec![
                change(Op::Create, Some(row(1, Some(1005), Some(100))), None, at(0x1000_0000_2000, 1), None),
                change(
                    Op::Update,
                    Some(row(1, Some(7), Some(3))),
                    Some(row(1, Some(1005), Some(100))),
                    at(0x1000_0000_2000, 2),
                    Some(u64::MAX - 5),
                ),
                change(Op::Delete, None, Some(row(2, None, Some(0))), at(u64::MAX, u32::MAX), None),
                change(Op::Truncate, None, None, at(0x3000, 0), None),
            ],
            contents: vec![ContentChange {
                op: Op::Create,
                content: Some(Content {
                    id: uuid::Uuid::from_u128(0xa1),
                    slug: "slug".into(),
                    title: "Title".into(),
                    content_type: None,
                    length_seconds: Some(100),
                    publish_ts: -1,
                }),
                position: at(0x1000_0000_2000, 0),
                commit_ts: 1_764_000_000_456,
            }],
            ..Enriched::default()
        }
    }

    #[test]
    fn a_parked_batch_reads_back_as_the_batch_it_was() {
        let b = batch();
        let parked = ParkedBatch::new("http", "https://example.com/hook", &b, "HTTP 500: down", 8).unwrap();
        assert_eq!(parked.first, "0/3000/0");
        assert_eq!(parked.last, format!("{}/{}", crate::source::Lsn(u64::MAX).to_pg_string(), u32::MAX));
        assert_eq!((parked.changes, parked.engagements, parked.contents), (5, 4, 1));
        let back = ParkedBatch::parse(&parked.to_json()).unwrap();
        assert_eq!(back, parked);
        let again = back.into_enriched(b.origin.clone());
        assert_eq!(again, b);
        // What the HTTP and Redis sinks send is the same text too.
        assert_eq!(crate::sinks::events_json(&again), crate::sinks::events_json(&b));
    }

    #[test]
    fn the_payload_keeps_the_summary_fields_and_says_its_format() {
        let parked = ParkedBatch::new("clickhouse", "enriched_engagements", &batch(), "type mismatch", 3).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&parked.to_json()).unwrap();
        assert_eq!(json["format"], BATCH_FORMAT);
        assert_eq!(json["attempts"], 3);
        assert_eq!(json["tables"], "enriched_engagements");
        assert_eq!(json["engagements"], 4);
        assert_eq!(json["batch"]["engagements"][0]["position"], "000010000000200000000001");
        assert_eq!(parked.key(), format!("{}..{}", parked.first, parked.last));
    }

    #[test]
    fn a_batch_splits_into_halves_that_together_hold_every_change() {
        let b = batch();
        let parked = ParkedBatch::new("clickhouse", "t", &b, "e", 3).unwrap();
        assert_eq!(parked.truncate().as_deref(), Some("0/3000/0"));
        let (a, z) = parked.halves().unwrap();
        assert_eq!((a.changes, z.changes), (2, 3));
        assert_eq!((a.engagements, a.contents, z.engagements, z.contents), (2, 0, 2, 1));
        assert_eq!((a.first.as_str(), a.last.as_str()), ("1000/2000/1", "1000/2000/2"));
        let mut whole = a.clone().into_enriched(None);
        let rest = z.clone().into_enriched(None);
        whole.engagements.extend(rest.engagements);
        whole.contents.extend(rest.contents);
        assert_eq!(whole, Enriched { origin: None, ..b.clone() });
        // Down to single changes, never an empty half.
        let (one, two) = z.halves().unwrap();
        assert_eq!((one.changes, two.changes), (1, 2));
        assert!(one.halves().is_none());
        let (x, y) = two.halves().unwrap();
        assert_eq!((x.engagements, x.contents, y.engagements, y.contents), (1, 0, 0, 1));
        assert!(x.halves().is_none());
        assert_eq!(z.key(), format!("{}..{}", z.first, z.last));
    }

    #[test]
    fn other_formats_and_foreign_payloads_are_refused() {
        let mut parked = ParkedBatch::new("redis", "k", &batch(), "e", 1).unwrap();
        parked.format = "batch.v2".into();
        assert!(matches!(ParkedBatch::parse(&parked.to_json()), Err(ParkedError::Format(f)) if f == "batch.v2"));
        // What the HTTP sink parked before batches were kept: its request body.
        let body = br#"{"idempotency_key":"0/1/0-0/1/0","events":[]}"#;
        assert!(matches!(ParkedBatch::parse(body), Err(ParkedError::Json(_))));
        assert!(ParkedBatch::new("redis", "k", &Enriched::default(), "e", 1).is_none());
    }
}
