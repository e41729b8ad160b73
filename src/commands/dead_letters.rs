//! `pgfanout dead-letters list | replay`: what the sinks parked in the
//! dead-letter topic `<prefix>dead_letter`, and its re-delivery once the
//! cause is fixed.
//!
//! A sink parks the batch itself (`sinks::parked`), so `replay` hands it
//! back to the same sink's `write`, the idempotent write `run` uses, and
//! only once that returned `Ok` records the dead-letter record as replayed
//! in `<prefix>dead_letter.replayed` (keyed by its partition and offset).
//! A second replay skips what is recorded; a crash between the write and
//! the record re-delivers that batch once more, which the sinks count once
//! anyway. The dead-letter topic itself is never rewritten: it stays the
//! history of what was parked and why.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::log::producer::{self, ENVELOPE_FORMAT, ERROR_HEADER, FORMAT_HEADER, PARKED_AT_HEADER, SINK_HEADER};
use crate::log::{LogError, LogProducer, LogRecord};
use crate::sinks::parked::{ParkedBatch, BATCH_FORMAT, SUMMARY_FORMAT};
use crate::sinks::{self, Refused, Sink, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum DeadLettersError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Which parked records a command looks at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only those this sink parked.
    pub sink: Option<String>,
    /// Only those parked at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    fn keeps(&self, d: &DeadLetter) -> bool {
        let sink = match &self.sink {
            Some(s) => *s == d.sink,
            None => true,
        };
        let since = match self.since {
            Some(t) => d.parked_at.is_some_and(|p| p >= t),
            None => true,
        };
        sink && since
    }
}

/// One record of the dead-letter topic, as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// The sink that parked it (`log` and `enrich` for changes that never
    /// reached a sink).
    pub sink: String,
    /// The last error.
    pub reason: String,
    /// Event ids (`<commit LSN>/<ordinal>`) of the first and last change it holds.
    pub first: Option<String>,
    pub last: Option<String>,
    /// Changes it holds, where the payload says.
    pub changes: Option<u64>,
    pub parked_at: Option<DateTime<Utc>>,
    /// The payload's format (`pgfanout.format`); None for records parked
    /// before the header existed.
    pub format: Option<String>,
    /// When `replay` re-delivered it.
    pub replayed_at: Option<DateTime<Utc>>,
    /// Why `replay` cannot re-deliver it (None: it can).
    pub not_replayable: Option<String>,
    /// The record's key (`<first>..<last>`, or a change's position).
    pub key: Option<String>,
    #[serde(skip)]
    payload: Vec<u8>,
}

impl DeadLetter {
    fn of(r: LogRecord, replayed: &BTreeMap<String, Replayed>) -> DeadLetter {
        let sink = r.header(SINK_HEADER).unwrap_or("unknown").to_string();
        let format = r.header(FORMAT_HEADER).map(str::to_string);
        let summary: Option<serde_json::Value> = serde_json::from_slice(&r.payload).ok();
        let field =
            |name: &str| summary.as_ref().and_then(|s| s.get(name)).and_then(|v| v.as_str()).map(str::to_string);
        // Batches name their ends; a change's envelope is keyed by its position.
        let (first, last) = match (field("first"), field("last"), &r.key) {
            (Some(f), Some(l), _) => (Some(f), Some(l)),
            (_, _, Some(key)) => match key.split_once("..") {
                Some((f, l)) => (Some(f.to_string()), Some(l.to_string())),
                None => (Some(key.clone()), Some(key.clone())),
            },
            _ => (None, None),
        };
        let changes = summary.as_ref().and_then(|s| s.get("changes")).and_then(|v| v.as_u64());
        let changes = changes.or((format.as_deref() == Some(ENVELOPE_FORMAT)).then_some(1));
        let parked_at = r
            .header(PARKED_AT_HEADER)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| r.timestamp_ms.and_then(DateTime::from_timestamp_millis));
        let not_replayable = why_not_replayable(&sink, format.as_deref(), &r.payload);
        DeadLetter {
            partition: r.partition,
            offset: r.offset,
            reason: r.header(ERROR_HEADER).unwrap_or_default().to_string(),
            first,
            last,
            changes,
            parked_at,
            replayed_at: replayed
                .get(&marker_key(r.partition, r.offset))
                .filter(|m| m.key == r.key && m.sink == sink)
                .map(|m| m.replayed_at),
            not_replayable,
            format,
            sink,
            key: r.key,
            payload: r.payload,
        }
    }

    pub fn positions(&self) -> String {
        match (&self.first, &self.last) {
            (Some(f), Some(l)) if f == l => f.clone(),
            (Some(f), Some(l)) => format!("{f}..{l}"),
            _ => "?".into(),
        }
    }
}

/// Why a record with this sink, format and payload cannot be re-delivered,
/// for the user.
fn why_not_replayable(sink: &str, format: Option<&str>, payload: &[u8]) -> Option<String> {
    match (sink, format) {
        (_, Some(BATCH_FORMAT)) => match ParkedBatch::parse(payload) {
            Err(e) => Some(format!("unreadable payload: {e}")),
            Ok(batch) => batch.truncate().map(|at| {
                format!(
                    "it holds a TRUNCATE (at {at}), which replayed now would remove what the sink got since: \
                     re-deliver with pgfanout backfill instead"
                )
            }),
        },
        (_, Some(SUMMARY_FORMAT)) => Some(
            "a change of it was larger than the broker takes, so only its positions were kept: re-deliver it \
             with pgfanout backfill over its time range"
                .into(),
        ),
        ("log", _) => Some(
            "a change whose envelope is larger than the broker takes: the sinks got it, only the log lacks it \
             (raise the broker's message size limit for later changes); nothing to replay"
                .into(),
        ),
        ("enrich", _) => Some(
            "a change that could not be enriched, so no sink ever got it: fix the row in PostgreSQL (an UPDATE \
             streams it again) or re-read it with pgfanout backfill"
                .into(),
        ),
        (_, None) => Some(
            "parked by an older pgfanout that kept only the positions, not the batch: re-deliver it with \
             pgfanout backfill over its time range"
                .into(),
        ),
        (_, Some(other)) => Some(format!("payload format {other:?} is unknown to this pgfanout")),
    }
}

/// What `<prefix>dead_letter.replayed` holds per replayed record. It names
/// the record by its key too: a dead-letter topic deleted and made again
/// starts its offsets over, and its new records are not the replayed ones.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Replayed {
    partition: i32,
    offset: i64,
    key: Option<String>,
    sink: String,
    replayed_at: DateTime<Utc>,
}

fn marker_key(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// Every record of the dead-letter topic `filter` keeps, oldest first per
/// partition, with whether it was replayed. Reads both topics from their
/// beginning to the end they had when it started.
pub async fn list(cfg: &Config, filter: &Filter) -> Result<Vec<DeadLetter>, DeadLettersError> {
    let prefix = &cfg.log.topic_prefix;
    let markers = crate::log::read_to_end(&cfg.log, &producer::replayed_topic(prefix)).await?;
    let replayed: BTreeMap<String, Replayed> = markers
        .iter()
        .filter_map(|m| serde_json::from_slice::<Replayed>(&m.payload).ok())
        .map(|m| (marker_key(m.partition, m.offset), m))
        .collect();
    let records = crate::log::read_to_end(&cfg.log, &producer::dead_letter_topic(prefix)).await?;
    Ok(records.into_iter().map(|r| DeadLetter::of(r, &replayed)).filter(|d| filter.keeps(d)).collect())
}

/// `list`'s table, for a person.
pub fn render(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    if letters.is_empty() {
        out.push_str("no dead letters\n");
        return out;
    }
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|d| {
            let state = match (&d.replayed_at, &d.not_replayable) {
                (Some(t), _) => format!("replayed {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                (None, Some(_)) => "not replayable".into(),
                (None, None) => "parked".into(),
            };
            [
                format!("{}/{}", d.partition, d.offset),
                d.sink.clone(),
                d.parked_at.map_or_else(|| "?".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                match d.changes {
                    Some(1) => format!("{} (1 change)", d.positions()),
                    Some(n) => format!("{} ({n} changes)", d.positions()),
                    None => d.positions(),
                },
                state,
                d.reason.clone(),
            ]
        })
        .collect();
    let header = ["RECORD", "SINK", "PARKED AT", "POSITIONS", "STATE", "REASON"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; 6]| {
        for (i, cell) in cells.iter().enumerate().take(5) {
            let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
        }
        let _ = writeln!(out, "{}", cells[5]);
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    let waiting = letters.iter().filter(|d| d.replayed_at.is_none() && d.not_replayable.is_none()).count();
    let _ = writeln!(out, "{} dead letters, {waiting} waiting for replay", letters.len());
    for d in letters.iter().filter(|d| d.replayed_at.is_none()) {
        if let Some(why) = &d.not_replayable {
            let _ = writeln!(out, "{}/{} ({}): {why}", d.partition, d.offset, d.sink);
        }
    }
    if waiting > 0 {
        let _ = writeln!(out, "once the cause is fixed: pgfanout dead-letters replay [--sink S] [--since T]");
    }
    out
}

/// What became of one record in `replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum Outcome {
    /// Re-delivered now, and recorded.
    Replayed,
    /// Recorded as replayed by an earlier run.
    AlreadyReplayed,
    /// Cannot be re-delivered (why).
    NotReplayable(String),
    /// Re-delivery failed (the error); it stays parked.
    Failed(String),
}

/// `replay`'s account, one entry per record `filter` kept.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub records: Vec<(DeadLetter, Outcome)>,
}

impl ReplayReport {
    pub fn count(&self, which: fn(&Outcome) -> bool) -> usize {
        self.records.iter().filter(|(_, o)| which(o)).count()
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (d, o) in &self.records {
            let what = format!("{}/{} {} {}", d.partition, d.offset, d.sink, d.positions());
            let _ = match o {
                Outcome::Replayed => writeln!(out, "replayed {what}"),
                Outcome::AlreadyReplayed => writeln!(out, "skipped {what}: replayed before"),
                Outcome::NotReplayable(why) => writeln!(out, "skipped {what}: cannot be replayed: {why}"),
                Outcome::Failed(e) => writeln!(out, "FAILED {what}: {e} (still parked)"),
            };
        }
        let _ = writeln!(
            out,
            "{} replayed, {} failed, {} replayed before, {} not replayable",
            self.count(|o| *o == Outcome::Replayed),
            self.failed(),
            self.count(|o| *o == Outcome::AlreadyReplayed),
            self.count(|o| matches!(o, Outcome::NotReplayable(_))),
        );
        if self.failed() > 0 {
            let _ = writeln!(out, "what failed is still parked: fix the cause and run the replay again");
        }
        out
    }
}

/// Re-delivers every parked batch `filter` keeps that was not replayed
/// yet, oldest first, each to the sink that parked it, through the sink's
/// own `write` (which retries as in `run`, and returns what it gives up
/// on: nothing is parked again), and records each that succeeded. A record
/// whose sink this configuration lacks fails (stays parked).
pub async fn replay(cfg: &Config, filter: &Filter) -> Result<ReplayReport, DeadLettersError> {
    let letters = list(cfg, filter).await?;
    let mut report = ReplayReport::default();
    let pending = letters.iter().any(|d| d.replayed_at.is_none() && d.not_replayable.is_none());
    if !pending {
        report.records = letters.into_iter().map(|d| (d.clone(), settled(&d))).collect();
        return Ok(report);
    }
    let replayed_topic = producer::replayed_topic(&cfg.log.topic_prefix);
    producer::ensure_topics(&cfg.log, std::slice::from_ref(&replayed_topic)).await?;
    // It publishes no change envelope, so needs no database name.
    let log = LogProducer::new(&cfg.log, "")?;
    let configured = sinks::build(cfg, Refused::Return)?;
    let mut connected: BTreeMap<&'static str, Result<(), String>> = BTreeMap::new();
    for d in letters {
        if d.replayed_at.is_some() || d.not_replayable.is_some() {
            report.records.push((d.clone(), settled(&d)));
            continue;
        }
        let Some(sink) = configured.iter().find(|s| s.name() == d.sink) else {
            let why = format!("sink {} is not configured here: add its section to the configuration", d.sink);
            report.records.push((d, Outcome::Failed(why)));
            continue;
        };
        let ready = match connected.get(sink.name()) {
            Some(r) => r.clone(),
            None => {
                let r = sink.connect().await.map_err(|e| e.to_string());
                connected.insert(sink.name(), r.clone());
                r
            }
        };
        let outcome = match ready {
            Ok(()) => redeliver(&log, sink.as_ref(), &d).await?,
            Err(e) => Outcome::Failed(format!("cannot connect: {e}")),
        };
        report.records.push((d, outcome));
    }
    Ok(report)
}

fn settled(d: &DeadLetter) -> Outcome {
    match (&d.replayed_at, &d.not_replayable) {
        (Some(_), _) => Outcome::AlreadyReplayed,
        (None, Some(why)) => Outcome::NotReplayable(why.clone()),
        (None, None) => unreachable!("only settled records are passed"),
    }
}

/// One record: write, then record. `Err` only when the record of a
/// successful write could not be kept (the broker is gone).
async fn redeliver(log: &LogProducer, sink: &dyn Sink, d: &DeadLetter) -> Result<Outcome, DeadLettersError> {
    let parked = match ParkedBatch::parse(&d.payload) {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Failed(format!("unreadable payload: {e}"))),
    };
    // An origin of its own: a sink that keeps a progress watermark (Redis)
    // would otherwise skip the batch as older than what the live stream
    // wrote since, and a repeat of this replay skips what it applied.
    let origin = format!("dead_letter:{}:{}", d.partition, d.offset);
    let batch = parked.into_enriched(Some(origin.clone()));
    if let Err(e) = sink.write(&batch).await {
        tracing::error!(sink = sink.name(), record = %marker_key(d.partition, d.offset), error = %e, "replaying a dead letter failed; it stays parked");
        return Ok(Outcome::Failed(e.to_string()));
    }
    let marker = Replayed {
        partition: d.partition,
        offset: d.offset,
        key: d.key.clone(),
        sink: d.sink.clone(),
        replayed_at: Utc::now(),
    };
    let payload = serde_json::to_vec(&marker).expect("a marker serializes");
    log.record_replayed(&marker_key(d.partition, d.offset), &payload).await?;
    if let Err(e) = sink.forget_origin(&origin).await {
        tracing::warn!(sink = sink.name(), origin, error = %e, "could not forget the replay's progress (harmless)");
    }
    tracing::info!(sink = sink.name(), record = %marker_key(d.partition, d.offset), positions = %d.positions(), "dead letter replayed");
    Ok(Outcome::Replayed)
}

/// `--since`: an RFC 3339 time, or a duration back from now (`90s`, `15m`,
/// `2h`, `7d`, or several, `1h30m`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    parse_since_at(s, Utc::now())
}

pub fn parse_since_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad =
        || format!("{s:?} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor a duration (90s, 15m, 2h, 7d, 1h30m)");
    let mut seconds: i64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = match rest[digits..].chars().next() {
            Some('s') => 1,
            Some('m') => 60,
            Some('h') => 3600,
            Some('d') => 86_400,
            _ => return Err(bad()),
        };
        seconds = n.checked_mul(unit).and_then(|x| seconds.checked_add(x)).ok_or_else(bad)?;
        rest = &rest[digits + 1..];
    }
    chrono::TimeDelta::try_seconds(seconds).and_then(|d| now.checked_sub_signed(d)).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn since_takes_a_time_or_a_duration_back_from_now() {
        let at = |s| parse_since_at(s, now()).map(|t| t.to_rfc3339());
        assert_eq!(at("2026-12-01T10:00:00Z"), Ok("2026-12-01T10:00:00+00:00".into()));
        assert_eq!(at("2026-12-01T11:00:00+01:00"), Ok("2026-12-01T10:00:00+00:00".into()));
        assert_eq!(at("2h"), Ok("2026-12-02T10:00:00+00:00".into()));
        assert_eq!(at("90s"), Ok("2026-12-02T11:58:30+00:00".into()));
        assert_eq!(at("1h30m"), Ok("2026-12-02T10:30:00+00:00".into()));
        assert_eq!(at("7d"), Ok("2026-11-25T12:00:00+00:00".into()));
        assert_eq!(at("0s"), Ok("2026-12-02T12:00:00+00:00".into()));
        for bad in ["", "2", "h", "2x", "2h30", "-2h", "yesterday", "2026-12-01", "99999999999999999999d"] {
            let e = at(bad).expect_err(bad);
            assert!(e.contains("RFC 3339") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    fn record(sink: &str, format: Option<&str>, key: &str, payload: &[u8]) -> LogRecord {
        let mut headers = BTreeMap::from([
            (SINK_HEADER.to_string(), sink.to_string()),
            (ERROR_HEADER.to_string(), "boom".to_string()),
            (PARKED_AT_HEADER.to_string(), "2026-12-02T11:00:00.500Z".to_string()),
        ]);
        if let Some(f) = format {
            headers.insert(FORMAT_HEADER.to_string(), f.to_string());
        }
        LogRecord {
            partition: 0,
            offset: 7,
            key: Some(key.into()),
            payload: payload.to_vec(),
            headers,
            timestamp_ms: Some(1),
        }
    }

    fn parked_of(ops: &[crate::source::Op]) -> ParkedBatch {
        let change = |(i, &op): (usize, &crate::source::Op)| crate::enrich::EngagementChange {
            op,
            current: (op != crate::source::Op::Truncate)
                .then(|| crate::enrich::EngagementRow { event_id: i as i64, ..Default::default() }),
            previous: None,
            position: crate::source::Position { commit_lsn: 0x16b_3f28, ordinal: 2 + i as u32 },
            commit_ts: 0,
            replay_digest: None,
        };
        let batch =
            crate::enrich::Enriched { engagements: ops.iter().enumerate().map(change).collect(), ..Default::default() };
        ParkedBatch::new("http", "http://r/hook", &batch, "HTTP 500", 8).unwrap()
    }

    #[test]
    fn records_are_listed_with_positions_time_and_whether_they_can_be_replayed() {
        use crate::source::Op;
        let parked = parked_of(&[Op::Create]);
        let none = BTreeMap::new();
        let batch = DeadLetter::of(record("http", Some(BATCH_FORMAT), &parked.key(), &parked.to_json()), &none);
        assert_eq!(batch.positions(), "0/16B3F28/2");
        assert_eq!(batch.changes, Some(1));
        assert_eq!(batch.reason, "boom");
        assert_eq!(
            batch.parked_at,
            Some(now() - chrono::TimeDelta::minutes(60) + chrono::TimeDelta::milliseconds(500))
        );
        assert_eq!(batch.not_replayable, None);
        assert!(Filter { sink: Some("http".into()), since: Some(now() - chrono::TimeDelta::hours(1)) }.keeps(&batch));
        assert!(!Filter { sink: Some("redis".into()), since: None }.keeps(&batch));
        assert!(!Filter { sink: None, since: Some(now()) }.keeps(&batch));

        // A TRUNCATE replayed late would wipe what the sink got since.
        let truncating = parked_of(&[Op::Create, Op::Truncate, Op::Create]);
        let truncating = DeadLetter::of(record("http", Some(BATCH_FORMAT), "k", &truncating.to_json()), &none);
        assert_eq!(truncating.positions(), "0/16B3F28/2..0/16B3F28/4");
        let why = truncating.not_replayable.unwrap();
        assert!(why.contains("TRUNCATE (at 0/16B3F28/3)") && why.contains("backfill"), "{why}");
        let mut summary = parked_of(&[Op::Create, Op::Create]);
        summary.format = SUMMARY_FORMAT.into();
        let summary = DeadLetter::of(record("redis", Some(SUMMARY_FORMAT), "k", &summary.to_json()), &none);
        assert_eq!(summary.changes, Some(2));
        assert!(summary.not_replayable.unwrap().contains("larger than the broker takes"));

        let log = DeadLetter::of(record("log", Some(ENVELOPE_FORMAT), "0/1A/3", b"{\"op\":\"c\"}"), &none);
        assert_eq!((log.positions(), log.changes), ("0/1A/3".to_string(), Some(1)));
        assert!(log.not_replayable.as_deref().is_some_and(|w| w.contains("larger than the broker takes")));
        // An older ClickHouse summary: positions from its fields, no batch.
        let old = br#"{"sink":"clickhouse","first":"0/1/1","last":"0/2/4","changes":5}"#;
        let old = DeadLetter::of(record("clickhouse", None, "0/1/1..0/2/4", old), &none);
        assert_eq!((old.positions(), old.changes), ("0/1/1..0/2/4".to_string(), Some(5)));
        assert!(old.not_replayable.as_deref().is_some_and(|w| w.contains("older pgfanout")));

        let marker = |key: &str| Replayed {
            partition: 0,
            offset: 7,
            key: Some(key.into()),
            sink: "http".into(),
            replayed_at: now(),
        };
        let marked = BTreeMap::from([(marker_key(0, 7), marker(&parked.key()))]);
        let done = DeadLetter::of(record("http", Some(BATCH_FORMAT), &parked.key(), &parked.to_json()), &marked);
        assert_eq!(done.replayed_at, Some(now()));
        // A record at the same offset of a topic made again is another one.
        let other = BTreeMap::from([(marker_key(0, 7), marker("0/1/1..0/1/2"))]);
        let fresh = DeadLetter::of(record("http", Some(BATCH_FORMAT), &parked.key(), &parked.to_json()), &other);
        assert_eq!(fresh.replayed_at, None);
        let table = render(&[batch, log, done]);
        assert!(table.contains("3 dead letters, 1 waiting for replay"), "{table}");
        assert!(table.contains("0/7 (log): a change whose envelope"), "{table}");
        assert!(table.contains("replayed 2026-12-02T12:00:00Z"), "{table}");
    }
}
