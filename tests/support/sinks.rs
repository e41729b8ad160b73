//! What every sink holds of `engagement_events`, read back, and the same
//! computed from PostgreSQL's rows, for tests that end with "every sink
//! equals PostgreSQL". Values, not counts: each live event's columns and
//! enriched fields in ClickHouse, in its latest Redis stream entry, in its
//! latest HTTP event and in its latest log record, and the Redis window's
//! score of each content. PostgreSQL's side joins the content as it is now,
//! so a test comparing with it leaves the content alone while events change.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value as Json;

use super::topics::read_topic;
use super::TestEnv;

const STREAMS: [&str; 4] = ["podcast", "newsletter", "video", "unknown"];

/// One live event as a sink shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub content_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub event_ts_ms: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    /// The enriched fields (None in the log, which carries the row alone).
    pub enriched: Option<Enriched>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Enriched {
    pub slug: Option<String>,
    pub content_type: Option<String>,
    /// engagement_percent in hundredths (exact).
    pub pct_hundredths: Option<i64>,
}

/// Live events by id.
pub type Events = BTreeMap<i64, Event>;

fn hundredths(p: Option<f64>) -> Option<i64> {
    p.map(|p| (p * 100.0).round() as i64)
}

/// PostgreSQL's live events, enriched as SPEC says (round half away from
/// zero on the exact value: numeric round()).
pub async fn postgres(t: &TestEnv) -> Events {
    t.pg.query(
        "SELECT e.id, e.content_id::text, floor(extract(epoch FROM e.event_ts) * 1000)::int8, e.duration_ms, e.device,
                c.slug, c.content_type, round(e.duration_ms::numeric * 10 / nullif(c.length_seconds, 0))::int8
           FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let enriched = Enriched { slug: r.get(5), content_type: r.get(6), pct_hundredths: r.get(7) };
        let event = Event {
            content_id: r.get(1),
            event_ts_ms: r.get(2),
            duration_ms: r.get(3),
            device: r.get(4),
            enriched: Some(enriched),
        };
        (r.get::<_, i64>(0), event)
    })
    .collect()
}

/// The events without their enriched fields, as the log has them.
pub fn rows_only(events: &Events) -> Events {
    events.iter().map(|(id, e)| (*id, Event { enriched: None, ..e.clone() })).collect()
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ChEvent {
    event_id: u64,
    content_id: String,
    ts: i64,
    duration_ms: Option<i32>,
    device: Option<String>,
    content_slug: String,
    content_type: String,
    engagement_percent: Option<f64>,
}

pub async fn clickhouse(t: &TestEnv) -> Events {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    t.ch()
        .query(
            "SELECT event_id, toString(content_id) AS content_id, toUnixTimestamp64Milli(event_ts) AS ts, duration_ms,
                device, content_slug, content_type, engagement_percent
           FROM enriched_engagements FINAL",
        )
        .fetch_all::<ChEvent>()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let event = Event {
                // An event without content_id is stored with the nil UUID (a sort key cannot be Nullable).
                content_id: (r.content_id != uuid::Uuid::nil().to_string()).then_some(r.content_id),
                event_ts_ms: r.ts,
                duration_ms: r.duration_ms,
                device: r.device,
                enriched: Some(Enriched {
                    slug: opt(r.content_slug),
                    content_type: opt(r.content_type),
                    pct_hundredths: hundredths(r.engagement_percent),
                }),
            };
            (r.event_id as i64, event)
        })
        .collect()
}

fn event_of_json(e: &Json) -> Event {
    let s = |k: &str| e[k].as_str().map(str::to_string);
    Event {
        content_id: s("content_id"),
        event_ts_ms: e["event_ts"].as_i64().expect("event_ts"),
        duration_ms: e["duration_ms"].as_i64().map(|d| d as i32),
        device: s("device"),
        enriched: Some(Enriched {
            slug: s("content_slug"),
            content_type: s("content_type"),
            pct_hundredths: hundredths(e["engagement_percent"].as_f64()),
        }),
    }
}

/// Each event's latest state among enriched events as the Redis streams and
/// the HTTP batches carry them (`version` orders the changes of one event,
/// whatever order snapshot, backfill and live events came in).
fn latest_of_events<'a>(docs: impl Iterator<Item = &'a Json>) -> Events {
    let mut latest: HashMap<i64, (String, Option<Event>)> = HashMap::new();
    for d in docs {
        let row = if d["event"].is_null() { &d["previous"] } else { &d["event"] };
        let Some(id) = row["event_id"].as_i64() else { continue };
        let version = d["version"].as_str().expect("version").to_string();
        if latest.get(&id).map_or(true, |(v, _)| *v < version) {
            let state = (d["op"] != "d").then(|| event_of_json(&d["event"]));
            latest.insert(id, (version, state));
        }
    }
    latest.into_iter().filter_map(|(id, (_, e))| e.map(|e| (id, e))).collect()
}

pub async fn http(t: &TestEnv) -> Events {
    let events = t.http_get("_events").await;
    latest_of_events(events.as_array().expect("receiver events").iter())
}

pub async fn redis_streams(t: &TestEnv) -> Events {
    let prefix = &t.cfg.redis.as_ref().unwrap().key_prefix;
    let mut r = t.redis().clone();
    let mut docs = Vec::new();
    for s in STREAMS {
        let reply: redis::streams::StreamRangeReply = r.xrange_all(format!("{prefix}stream:{s}")).await.unwrap();
        for entry in reply.ids {
            let doc: Json = serde_json::from_str(&entry.get::<String>("data").expect("data field")).unwrap();
            docs.push(doc);
        }
    }
    latest_of_events(docs.iter())
}

/// The window's score of each content, in hundredths.
pub async fn redis_window(t: &TestEnv) -> BTreeMap<String, i64> {
    let mut r = t.redis().clone();
    let top: Vec<(String, f64)> =
        r.zrange_withscores(format!("{}top:window", t.cfg.redis.as_ref().unwrap().key_prefix), 0, -1).await.unwrap();
    top.into_iter().map(|(c, s)| (c, (s * 100.0).round() as i64)).collect()
}

/// What the window must hold: per content, the summed percent of its live
/// events of the last `top_window_secs` that have one.
pub async fn postgres_window(t: &TestEnv) -> BTreeMap<String, i64> {
    let secs = t.cfg.redis.as_ref().unwrap().top_window_secs as f64;
    t.pg.query(
        "SELECT e.content_id::text, sum(round(e.duration_ms::numeric * 10 / nullif(c.length_seconds, 0)))::int8
           FROM engagement_events e JOIN content c ON c.id = e.content_id
          WHERE e.event_ts >= now() - make_interval(secs => $1)
            AND round(e.duration_ms::numeric * 10 / nullif(c.length_seconds, 0)) IS NOT NULL
          GROUP BY 1",
        &[&secs],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Each row's latest state in the log's topic of `engagement_events`
/// (latest per message key by position; a delete removes it), and the
/// tables the records name.
pub async fn log(t: &TestEnv) -> (Events, Vec<String>) {
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    // Everything a sink holds went through the log first: read to its end.
    let records = read_topic(t, &topic, Duration::from_secs(8), |_| false).await;
    let mut tables: Vec<String> = Vec::new();
    // Per key: the position of its latest record and the row it leaves (None after a delete).
    type Latest = ((u64, u64), Option<(i64, Event)>);
    let mut latest: HashMap<String, Latest> = HashMap::new();
    for r in &records {
        let p = &r.payload;
        if p.is_null() {
            // A tombstone: the delete before it already left the key.
            continue;
        }
        let table = format!("{}.{}", p["source"]["schema"].as_str().unwrap(), p["source"]["table"].as_str().unwrap());
        if !tables.contains(&table) {
            tables.push(table);
        }
        // pgfanout's position travels in a header, outside Debezium's value.
        let header = r.headers.get("pgfanout.position").expect("pgfanout.position header");
        let (lsn, ordinal) = header.split_once('/').expect("<commit lsn>/<ordinal>");
        let pos = (lsn.parse::<u64>().unwrap(), ordinal.parse::<u64>().unwrap());
        let key = r.key.clone().expect("message key");
        if latest.get(&key).is_some_and(|(p, _)| *p >= pos) {
            continue;
        }
        let state = (p["op"] != "d").then(|| {
            let a = &p["after"];
            let ts = chrono::DateTime::parse_from_rfc3339(a["event_ts"].as_str().expect("event_ts")).unwrap();
            let event = Event {
                content_id: a["content_id"].as_str().map(str::to_string),
                event_ts_ms: ts.timestamp_millis(),
                duration_ms: a["duration_ms"].as_i64().map(|d| d as i32),
                device: a["device"].as_str().map(str::to_string),
                enriched: None,
            };
            (a["id"].as_i64().expect("id"), event)
        });
        latest.insert(key, (pos, state));
    }
    // An update that changed the key (event_ts, in a table partitioned by
    // it) is a delete under the old key and a create under the new one, so
    // no id may be live under two keys.
    let mut by_id = Events::new();
    for (_, state) in latest.into_values() {
        let Some((id, event)) = state else { continue };
        assert!(by_id.insert(id, event).is_none(), "event {id} is live under two keys of the log");
    }
    (by_id, tables)
}

/// Fails naming the first differences between `got` and `want`.
pub fn assert_same<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    got: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) {
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("{k:?} missing (PostgreSQL: {w:?})")),
            Some(g) if g != w => diffs.push(format!("{k:?}: {g:?}, PostgreSQL {w:?}")),
            Some(_) => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("{k:?} is not in PostgreSQL: {g:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences from PostgreSQL ({} rows there), first: {:#?}",
        diffs.len(),
        want.len(),
        &diffs[..diffs.len().min(8)]
    );
}

/// Waits until the slot is acknowledged past everything written so far
/// (every sink flushed it), then compares every sink with PostgreSQL.
pub async fn assert_every_sink_equals_postgres(t: &mut TestEnv, what: &str) {
    let end = t.wal_insert_lsn().await;
    let started = std::time::Instant::now();
    loop {
        let at = t.confirmed_flush_lsn().await;
        if at >= end {
            break;
        }
        if !t.pipeline_is_running() {
            // Panics with the error the sidecar stopped on.
            t.stop().await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: the slot was not acknowledged past the last change ({} of {}; the sidecar is running: {})",
            pgfanout::source::Lsn(at).to_pg_string(),
            pgfanout::source::Lsn(end).to_pg_string(),
            t.pipeline_is_running()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = postgres(t).await;
    assert!(!want.is_empty(), "{what}: PostgreSQL has no events to compare");
    assert_same(&format!("{what}: ClickHouse"), &clickhouse(t).await, &want);
    assert_same(&format!("{what}: Redis streams"), &redis_streams(t).await, &want);
    assert_same(&format!("{what}: HTTP"), &http(t).await, &want);
    assert_same(&format!("{what}: Redis window"), &redis_window(t).await, &postgres_window(t).await);
    let (log, tables) = log(t).await;
    assert_same(&format!("{what}: log"), &log, &rows_only(&want));
    assert_eq!(tables, ["public.engagement_events"], "{what}: the tables the log's records name");
}
