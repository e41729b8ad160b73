//! A batch ClickHouse refuses for good: the type of a column of
//! `enriched_engagements` is changed under the running pipeline, so every
//! insert fails the client's schema check until it is changed back.
//! With `on_permanent_error = "dead_letter"` (the default) the batch is
//! parked in the dead-letter topic after `permanent_attempts`, with the
//! error and its change positions, and the stream goes on: Redis gets the
//! event, the slot moves past it, later events reach ClickHouse once the
//! column is fixed, and `dead-letters replay` (refused again before the
//! fix, reported and left parked) delivers the parked batch after it.
//! With `"stall"` the pipeline stops at the batch and alerts, the slot
//! stays before it, and once the column is fixed the batch is written:
//! nothing is lost.

mod support;

use std::time::Duration;

use pgfanout::commands::dead_letters::{self, Filter, Outcome};
use pgfanout::config::OnPermanentError;
use redis::AsyncCommands;
use serde_json::Value as Json;
use support::topics::{read_topic, Record};
use support::{logs, pg_versions, wait_until, Sink, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const A: &str = "00000000-0000-0000-0000-0000000000a1";
/// Nullable(Int32) in the schema; Int64 breaks the rows' type for good.
const BREAK: &str = "ALTER TABLE enriched_engagements MODIFY COLUMN duration_ms Nullable(Int64)";
const FIX: &str = "ALTER TABLE enriched_engagements MODIFY COLUMN duration_ms Nullable(Int32)";

async fn dead_letters(t: &TestEnv, timeout: Duration, enough: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    read_topic(t, &format!("{}dead_letter", t.cfg.log.topic_prefix), timeout, enough).await
}

async fn insert_event(t: &TestEnv, id: i64, duration_ms: i32) -> u64 {
    t.pg.batch_execute(&format!(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES ({id}, '{A}', 'play', now(), {duration_ms})"
    ))
    .await
    .unwrap();
    t.wal_insert_lsn().await
}

/// The engagement percent PostgreSQL computes for event `id`, as the sinks must.
async fn pg_percent(t: &TestEnv, id: i64) -> f64 {
    let row = t
        .pg
        .query_one(
            "SELECT round(e.duration_ms / 10.0 / c.length_seconds, 2)::float8 FROM engagement_events e JOIN content c ON c.id = e.content_id WHERE e.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    row.get(0)
}

async fn ch_event(t: &TestEnv, id: i64) -> Option<(Option<i32>, Option<f64>)> {
    t.ch()
        .query("SELECT duration_ms, engagement_percent FROM enriched_engagements FINAL WHERE event_id = ?")
        .bind(id as u64)
        .fetch_optional::<(Option<i32>, Option<f64>)>()
        .await
        .unwrap()
}

/// The ids of the events in the podcast stream of Redis.
async fn redis_ids(t: &TestEnv) -> Vec<i64> {
    let mut r = t.redis();
    let entries: redis::streams::StreamRangeReply =
        r.xrange_all(format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap();
    entries
        .ids
        .iter()
        .filter_map(|e| e.get::<String>("data"))
        .filter_map(|d| serde_json::from_str::<Json>(&d).ok())
        .filter_map(|j| j["event"]["event_id"].as_i64())
        .collect()
}

/// ClickHouse, whose batch is refused, and Redis, which shows whether the
/// stream went on.
async fn start(v: &str, mode: OnPermanentError) -> TestEnv {
    let mut t = TestEnv::builder(v)
        .sinks(&[Sink::ClickHouse, Sink::Redis])
        .with(move |cfg| {
            let ch = cfg.clickhouse.as_mut().unwrap();
            ch.on_permanent_error = mode;
            ch.permanent_attempts = 3;
        })
        .build()
        .await;
    t.start();
    t.pg.batch_execute(&format!("INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 1200, now())")).await.unwrap();
    insert_event(&t, 1, 6_000).await;
    wait_until("ClickHouse holds event 1", WAIT, || async { ch_event(&t, 1).await.is_some() }).await;
    t.ch().query(BREAK).execute().await.expect("changing the column type");
    t
}

async fn parked(v: &str, logs: &logs::Logs) {
    let mut t = start(v, OnPermanentError::DeadLetter).await;
    let end = insert_event(&t, 2, 12_000).await;
    let dead = dead_letters(&t, WAIT, |r| !r.is_empty()).await;
    assert_eq!(dead.len(), 1, "PG {v}: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.headers.get("pgfanout.sink").map(String::as_str), Some("clickhouse"), "PG {v}: {d:?}");
    let error = d.headers.get("pgfanout.error").cloned().unwrap_or_default();
    assert!(error.contains("duration_ms"), "PG {v}: the error names the column: {error:?}");
    assert_eq!(d.payload["attempts"], 3, "PG {v}: parked after the configured attempts: {d:?}");
    assert_eq!(d.payload["engagements"], 1, "PG {v}: {d:?}");
    assert_eq!(d.payload["tables"], "enriched_engagements", "PG {v}: {d:?}");
    let (first, last) = (d.payload["first"].as_str().unwrap(), d.payload["last"].as_str().unwrap());
    assert_eq!(first, last, "PG {v}: one change: {d:?}");
    assert_eq!(d.key.as_deref(), Some(format!("{first}..{last}").as_str()));
    let commit_lsn = pgfanout::source::Lsn::parse(first.rsplit_once('/').unwrap().0).unwrap().0;
    assert!(commit_lsn <= end, "PG {v}: the parked position {first} is event 2's commit");
    let logged = logs.lines_with(&["batch refused permanently", "enriched_engagements", first]);
    assert!(!logged.is_empty(), "PG {v}: no error line naming the table and the position");
    assert!(!logs.lines_with(&["sink=\"clickhouse\"", "permanent=true", "retrying"]).is_empty(), "PG {v}");

    // The stream went on: Redis has event 2 and the slot moved past it.
    wait_until("the slot acknowledged event 2", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    assert_eq!(redis_ids(&t).await, vec![1, 2], "PG {v}");
    assert!(ch_event(&t, 2).await.is_none(), "PG {v}: the parked batch is not in ClickHouse");
    // Replayed before the fix: refused again, reported, still parked.
    let clickhouse = Filter { sink: Some("clickhouse".into()), since: None };
    let report = dead_letters::replay(&t.cfg, &clickhouse).await.unwrap();
    assert_eq!(report.failed(), 1, "PG {v}: {}", report.render());
    assert!(report.render().contains("duration_ms"), "PG {v}: {}", report.render());

    // Fixed: later events reach ClickHouse, with PostgreSQL's values.
    t.ch().query(FIX).execute().await.expect("changing the column type back");
    let end = insert_event(&t, 3, 18_000).await;
    wait_until("ClickHouse holds event 3", WAIT, || async { ch_event(&t, 3).await.is_some() }).await;
    assert_eq!(ch_event(&t, 3).await, Some((Some(18_000), Some(pg_percent(&t, 3).await))), "PG {v}");
    wait_until("the slot acknowledged everything", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    assert_eq!(redis_ids(&t).await, vec![1, 2, 3], "PG {v}");
    // And the parked batch, replayed: ClickHouse gets event 2, Redis (which
    // had it) is left alone.
    let report = dead_letters::replay(&t.cfg, &clickhouse).await.unwrap();
    assert_eq!(report.count(|o| *o == Outcome::Replayed), 1, "PG {v}: {}", report.render());
    assert_eq!(ch_event(&t, 2).await, Some((Some(12_000), Some(pg_percent(&t, 2).await))), "PG {v}");
    assert_eq!(redis_ids(&t).await, vec![1, 2, 3], "PG {v}");
    assert!(t.pipeline_is_running());
    t.stop().await;
}

async fn stalled(v: &str, logs: &logs::Logs) {
    let mut t = start(v, OnPermanentError::Stall).await;
    let before = t.confirmed_flush_lsn().await;
    let end = insert_event(&t, 2, 12_000).await;
    wait_until("the ClickHouse sink alerts", WAIT, || async {
        !logs.lines_with(&["sink clickhouse keeps failing", "duration_ms"]).is_empty()
    })
    .await;
    assert!(t.pipeline_is_running(), "PG {v}: stalled, not stopped");
    assert!(t.confirmed_flush_lsn().await < end, "PG {v}: the slot must not move past the stalled batch");
    assert!(t.confirmed_flush_lsn().await >= before);
    assert!(dead_letters(&t, Duration::from_secs(3), |_| false).await.is_empty(), "PG {v}: nothing parked");

    t.ch().query(FIX).execute().await.expect("changing the column type back");
    wait_until("ClickHouse holds the stalled event 2", WAIT, || async { ch_event(&t, 2).await.is_some() }).await;
    assert_eq!(ch_event(&t, 2).await, Some((Some(12_000), Some(pg_percent(&t, 2).await))), "PG {v}");
    wait_until("the slot acknowledged everything", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    assert_eq!(redis_ids(&t).await, vec![1, 2], "PG {v}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanently_refused_batch_is_parked_and_the_stream_goes_on() {
    let logs = logs::capture();
    for v in pg_versions() {
        parked(&v, &logs).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_stall_a_permanently_refused_batch_stops_the_stream_and_loses_nothing() {
    let logs = logs::capture();
    for v in pg_versions() {
        stalled(&v, &logs).await;
    }
}
