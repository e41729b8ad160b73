//! Bad and odd input, against the real services on every PostgreSQL major
//! that scripts/test started: each change is either delivered to every sink
//! or parked in the dead-letter topic with a logged reason that names the
//! table, key, position and what was wrong; nothing is lost and the stream
//! goes on after it.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value as Json;
use support::topics::{read_topic, Record};
use support::{logs, pg_versions, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const A: &str = "00000000-0000-0000-0000-0000000000a1";
const B: &str = "00000000-0000-0000-0000-0000000000b2";
const NO_TYPE: &str = "00000000-0000-0000-0000-0000000000c3";

fn dead_letter_topic(t: &TestEnv) -> String {
    format!("{}dead_letter", t.cfg.log.topic_prefix)
}

/// HTTP events by event id, the last one seen of each.
async fn http_events(t: &TestEnv) -> Vec<Json> {
    t.http_get("_events").await.as_array().unwrap().clone()
}

async fn wait_http_events(t: &TestEnv, n: u64) {
    wait_until(&format!("HTTP receiver holds {n} events"), WAIT, || async {
        t.http_get("_stats").await["events"].as_u64().unwrap() >= n
    })
    .await;
}

async fn stream_len(t: &TestEnv, content_type: &str) -> u64 {
    let mut r = t.redis();
    r.xlen(format!("{}stream:{content_type}", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap()
}

async fn top_score(t: &TestEnv, content_id: &str) -> Option<f64> {
    let mut r = t.redis();
    r.zscore(format!("{}top:window", t.cfg.redis.as_ref().unwrap().key_prefix), content_id).await.unwrap()
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Delivered {
    event_id: u64,
    event_type: Option<String>,
    duration_ms: Option<i32>,
    engagement_seconds: Option<f64>,
    engagement_percent: Option<f64>,
    content_type: String,
    content_slug: String,
    length_seconds: Option<i32>,
}

async fn ch_rows(t: &TestEnv) -> HashMap<u64, Delivered> {
    t.ch_rows::<Delivered>(
        "SELECT event_id, event_type, duration_ms, engagement_seconds, engagement_percent, content_type, \
         content_slug, length_seconds FROM enriched_engagements FINAL ORDER BY event_id",
    )
    .await
    .into_iter()
    .map(|r| (r.event_id, r))
    .collect()
}

async fn content(t: &TestEnv) {
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES
           ('{A}', 'a', 'A', 'podcast', 1200, now()),
           ('{B}', 'b', 'B', 'video', 600, now()),
           ('{NO_TYPE}', 'no-type', 'No type', NULL, NULL, now())"
    ))
    .await
    .unwrap();
}

/// An unknown event_type, a negative and an absurd duration, content with
/// NULL type and length, and a column added mid-stream: odd but valid, so
/// each is delivered as it is, with faithfully computed figures.
async fn odd_values(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.pg.batch_execute("ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_event_type_check")
        .await
        .unwrap();
    t.start();
    content(&t).await;
    let ins = |id: i64, content: &str, ty: &str, duration: i64| {
        format!("INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES ({id}, '{content}', '{ty}', now(), {duration})")
    };
    for stmt in [
        ins(1, A, "scroll", 30_000),
        ins(2, A, "play", -5_000),
        ins(3, A, "play", 2_000_000_000),
        ins(4, NO_TYPE, "play", 1_000),
        "ALTER TABLE engagement_events ADD COLUMN session_id TEXT".to_string(),
        format!("INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms, session_id) VALUES (5, '{A}', 'pause', now(), 1000, 'sess-5')"),
        ins(6, A, "finish", 12_000),
    ] {
        t.pg.batch_execute(&stmt).await.unwrap();
    }
    wait_until("ClickHouse holds all six", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 6
    })
    .await;
    let rows = ch_rows(&t).await;
    let r = &rows[&1];
    assert_eq!((r.event_type.as_deref(), r.engagement_percent), (Some("scroll"), Some(2.5)), "PG {v}: {r:?}");
    let r = &rows[&2];
    assert_eq!(
        (r.duration_ms, r.engagement_seconds, r.engagement_percent),
        (Some(-5_000), Some(-5.0), Some(-0.42)),
        "PG {v}: {r:?}"
    );
    let r = &rows[&3];
    assert_eq!(
        (r.duration_ms, r.engagement_seconds, r.engagement_percent),
        (Some(2_000_000_000), Some(2_000_000.0), Some(166_666.67)),
        "PG {v}: {r:?}"
    );
    let r = &rows[&4];
    assert_eq!(
        (
            r.content_slug.as_str(),
            r.content_type.as_str(),
            r.length_seconds,
            r.engagement_seconds,
            r.engagement_percent
        ),
        ("no-type", "", None, Some(1.0), None),
        "PG {v}: NULL content_type and length: {r:?}"
    );
    // A batch writes its events before its content rows: the events being
    // there does not mean content_dim is yet.
    wait_until(&format!("PG {v}: content_dim keeps NULL type and length as NULL"), WAIT, || async {
        t.ch_count("SELECT count() FROM content_dim FINAL WHERE slug = 'no-type' AND content_type IS NULL AND length_seconds IS NULL").await
            == 1
    })
    .await;
    assert_eq!(rows[&5].event_type.as_deref(), Some("pause"));
    assert_eq!(rows[&6].engagement_percent, Some(1.0));

    wait_http_events(&t, 6).await;
    let events = http_events(&t).await;
    assert_eq!(events.len(), 6, "PG {v}");
    let by_id = |id: i64| events.iter().find(|e| e["event"]["event_id"] == id).unwrap();
    assert_eq!(by_id(1)["event"]["event_type"], "scroll");
    assert_eq!(by_id(3)["event"]["engagement_percent"], 166_666.67);
    assert!(by_id(4)["event"]["content_type"].is_null() && by_id(4)["event"]["length_seconds"].is_null());
    assert_eq!(by_id(4)["event"]["content_slug"], "no-type");

    assert_eq!((stream_len(&t, "podcast").await, stream_len(&t, "unknown").await), (5, 1), "PG {v}: streams");
    let score = top_score(&t, A).await.expect("A is in the window");
    assert!((score - (2.5 - 0.42 + 166_666.67 + 0.08 + 1.0)).abs() < 1e-6, "PG {v}: A scores {score}");
    assert_eq!(top_score(&t, NO_TYPE).await, None, "PG {v}: a NULL percent scores nothing");

    // The added column travels in the log, where other consumers read it.
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    let has_session = |r: &[Record]| r.iter().any(|r| r.payload["after"]["session_id"] == "sess-5");
    let log = read_topic(&t, &topic, WAIT, has_session).await;
    assert!(has_session(&log), "PG {v}: the log's envelope of event 5 lacks the added column");
    // And nothing was parked.
    let dead = read_topic(&t, &dead_letter_topic(&t), Duration::from_secs(3), |r| !r.is_empty()).await;
    assert!(dead.is_empty(), "PG {v}: dead letters: {dead:?}");
    t.acked_everything(WAIT).await;
    assert!(t.pipeline_is_running());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_but_valid_values_are_delivered_as_they_are() {
    logs::capture();
    for v in pg_versions() {
        odd_values(&v).await;
    }
}

/// A 1 MB raw_payload: more than a broker takes in one message (1 MB by
/// default in Kafka, Redpanda and librdkafka), so the log cannot hold it.
async fn huge_payload(v: &str, logs: &logs::Logs) {
    let mut t = TestEnv::new(v).await;
    t.start();
    content(&t).await;
    t.pg.batch_execute(&format!(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms, raw_payload) \
         VALUES (1, '{A}', 'play', now(), 6000, jsonb_build_object('blob', repeat('x', 1048576)))"
    ))
    .await
    .unwrap();
    t.pg.batch_execute(&format!(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES (2, '{A}', 'play', now(), 12000)"
    ))
    .await
    .unwrap();
    wait_until("ClickHouse holds both events (the stream went on)", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 2
    })
    .await;
    wait_http_events(&t, 2).await;
    let events = http_events(&t).await;
    let big = events.iter().find(|e| e["event"]["event_id"] == 1).expect("event 1 delivered over HTTP");
    assert_eq!(big["event"]["raw_payload"]["blob"].as_str().map(str::len), Some(1_048_576), "PG {v}");
    assert_eq!(stream_len(&t, "podcast").await, 2, "PG {v}");
    let mut r = t.redis();
    let entries: redis::streams::StreamRangeReply =
        r.xrange_all(format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap();
    let data: String = entries.ids[0].get("data").unwrap();
    assert!(data.len() > 1_048_576, "PG {v}: the Redis entry carries the payload");

    // The broker cannot take it: a summary is parked in the dead-letter
    // topic, where the row and its position can be found.
    let dead = read_topic(&t, &dead_letter_topic(&t), WAIT, |r| !r.is_empty()).await;
    assert_eq!(dead.len(), 1, "PG {v}: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.headers.get("pgfanout.sink").map(String::as_str), Some("log"), "PG {v}: {d:?}");
    let error = d.headers.get("pgfanout.error").cloned().unwrap_or_default();
    assert!(error.contains("engagement_events") && error.contains("bytes"), "PG {v}: pgfanout.error = {error:?}");
    assert_eq!(d.payload["after"]["id"], 1, "PG {v}: {d:?}");
    assert!(d.payload["after"]["raw_payload"]["omitted_bytes"].as_u64() > Some(1_048_576), "PG {v}: {d:?}");
    let position = d.key.clone().expect("dead letter key");
    let commit_lsn = position.rsplit_once('/').unwrap().0;
    assert!(
        !logs.lines_with(&["too large for the log", "public.engagement_events", commit_lsn]).is_empty(),
        "PG {v}: no log line naming table and position"
    );
    t.acked_everything(WAIT).await;
    assert!(t.pipeline_is_running());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_megabyte_payload_does_not_stop_the_stream() {
    let logs = logs::capture();
    for v in pg_versions() {
        huge_payload(&v, &logs).await;
    }
}

/// An event updated to point at other content: ClickHouse keeps one row
/// with the new content, Redis's window moves the score from the old
/// content to the new one, the HTTP receiver sees both rows.
async fn moved_event(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.start();
    content(&t).await;
    t.pg.batch_execute(&format!(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES (1, '{A}', 'play', now(), 30000)"
    ))
    .await
    .unwrap();
    wait_until("A scores 2.5", WAIT, || async { top_score(&t, A).await == Some(2.5) }).await;
    t.pg.batch_execute(&format!("UPDATE engagement_events SET content_id = '{B}' WHERE id = 1")).await.unwrap();
    wait_until("B scores 5", WAIT, || async { top_score(&t, B).await == Some(5.0) }).await;
    let old = top_score(&t, A).await;
    assert!(old.is_none() || old == Some(0.0), "PG {v}: A still scores {old:?} after its event moved away");

    wait_until("ClickHouse shows the event under B", WAIT, || async {
        t.ch_count(&format!(
            "SELECT count() FROM enriched_engagements FINAL WHERE content_id = '{B}' AND content_type = 'video' AND engagement_percent = 5"
        ))
        .await
            == 1
    })
    .await;
    assert_eq!(
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await,
        1,
        "PG {v}: the row under A is gone"
    );

    wait_http_events(&t, 2).await;
    let events = http_events(&t).await;
    let update = &events[1];
    assert_eq!(update["op"], "u", "PG {v}: {update}");
    assert_eq!((&update["event"]["content_id"], &update["previous"]["content_id"]), (&Json::from(B), &Json::from(A)));
    assert_eq!(
        (&update["event"]["engagement_percent"], &update["previous"]["engagement_percent"]),
        (&Json::from(5.0), &Json::from(2.5))
    );
    assert_eq!((stream_len(&t, "podcast").await, stream_len(&t, "video").await), (1, 1), "PG {v}");
    t.acked_everything(WAIT).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_moved_to_other_content_moves_its_score() {
    logs::capture();
    for v in pg_versions() {
        moved_event(&v).await;
    }
}

/// A value the enriched row cannot hold (duration_ms widened to bigint
/// mid-stream, then 5e9): parked in the dead-letter topic with the reason,
/// logged with table, key and position; the stream goes on, and a later
/// fix of the row is delivered.
async fn out_of_range(v: &str, logs: &logs::Logs) {
    let mut t = TestEnv::new(v).await;
    t.start();
    content(&t).await;
    let ins = |id: i64, duration: i64| {
        format!("INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES ({id}, '{A}', 'play', now(), {duration})")
    };
    t.pg.batch_execute(&ins(1, 6_000)).await.unwrap();
    t.pg.batch_execute("ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE bigint").await.unwrap();
    t.pg.batch_execute(&ins(2, 5_000_000_000)).await.unwrap();
    t.pg.batch_execute(&ins(3, 12_000)).await.unwrap();
    wait_until("ClickHouse holds events 1 and 3", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 2
    })
    .await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE event_id = 2").await, 0);

    let dead = read_topic(&t, &dead_letter_topic(&t), WAIT, |r| !r.is_empty()).await;
    assert_eq!(dead.len(), 1, "PG {v}: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.payload["after"]["id"], 2, "PG {v}: the parked record is the change: {d:?}");
    assert_eq!(d.payload["after"]["duration_ms"], 5_000_000_000i64);
    assert_eq!(d.payload["source"]["table"], "engagement_events");
    assert_eq!(d.headers.get("pgfanout.sink").map(String::as_str), Some("enrich"));
    let error = d.headers.get("pgfanout.error").cloned().unwrap_or_default();
    assert!(error.contains("duration_ms") && error.contains("out of range"), "PG {v}: pgfanout.error = {error:?}");
    let position = d.key.clone().expect("dead letter key");
    let commit_lsn = position.rsplit_once('/').unwrap().0;
    assert!(error.contains(commit_lsn), "PG {v}: the reason names the position {position}: {error:?}");
    let logged = logs.lines_with(&["change cannot be enriched", "public.engagement_events", r#""id":2"#, commit_lsn]);
    assert!(!logged.is_empty(), "PG {v}: no log line naming table, key and position");
    assert!(logged[0].contains("out of range"), "PG {v}: {}", logged[0]);

    // The row is fixed: its update must reach the sinks, though the row it
    // replaces was never delivered.
    t.pg.batch_execute("UPDATE engagement_events SET duration_ms = 24000 WHERE id = 2").await.unwrap();
    wait_until("ClickHouse holds the fixed event 2", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE event_id = 2 AND engagement_percent = 2").await
            == 1
    })
    .await;
    wait_http_events(&t, 3).await;
    assert_eq!(stream_len(&t, "podcast").await, 3, "PG {v}");
    let score = top_score(&t, A).await.unwrap();
    assert!((score - (0.5 + 1.0 + 2.0)).abs() < 1e-9, "PG {v}: A scores {score}");
    t.acked_everything(WAIT).await;
    assert!(t.pipeline_is_running());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unenrichable_value_is_dead_lettered_with_its_reason() {
    let logs = logs::capture();
    for v in pg_versions() {
        out_of_range(&v, &logs).await;
    }
}
