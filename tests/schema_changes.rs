//! Columns of a published table change while pgfanout streams: ADD, RENAME,
//! ALTER TYPE (compatible and not), DROP, and a new primary key. The log's
//! envelope follows each from the next Relation message; the enriched
//! sinks keep running where the columns they compute from still read, and
//! park the event with a reason where they do not; nothing is lost and the
//! slot keeps moving.

mod support;

use std::time::Duration;

use support::topics::read_topic;
use support::{pg_versions, TestEnv};

const WAIT: Duration = Duration::from_secs(30);
const C: &str = "550e8400-e29b-41d4-a716-446655440000";

#[tokio::test(flavor = "multi_thread")]
async fn columns_added_renamed_retyped_and_dropped_mid_stream() {
    let mut t = TestEnv::new(&pg_versions()[0]).await;
    t.start();
    t.pg.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES ('{C}', 's', 'T', 'podcast', 100, now())"
    ))
    .await
    .unwrap();
    let ins = |id: i64, extra: &str| {
        format!("INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms{extra}) VALUES ({id}, '{C}', 'play', now(), 10000{})",
            if extra.is_empty() { "" } else { ", 'x'" })
    };
    t.pg.batch_execute(&ins(1, "")).await.unwrap();
    t.pg.batch_execute("ALTER TABLE engagement_events ADD COLUMN campaign text").await.unwrap();
    t.pg.batch_execute(&ins(2, ", campaign")).await.unwrap();
    t.pg.batch_execute("ALTER TABLE engagement_events RENAME COLUMN device TO device_kind").await.unwrap();
    t.pg.batch_execute(&ins(3, "")).await.unwrap();
    t.pg.batch_execute("ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE bigint").await.unwrap();
    t.pg.batch_execute(&ins(4, "")).await.unwrap();
    // Incompatible: the enrichment cannot compute from text.
    t.pg.batch_execute("ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE text").await.unwrap();
    t.pg.batch_execute(&ins(5, "")).await.unwrap();
    t.pg.batch_execute("ALTER TABLE engagement_events DROP COLUMN duration_ms").await.unwrap();
    t.pg.batch_execute(&format!(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts) VALUES (6, '{C}', 'play', now())"
    ))
    .await
    .unwrap();
    t.acked_everything(WAIT).await;

    // The log follows every shape.
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    let log = read_topic(&t, &topic, WAIT, |r| r.len() >= 6).await;
    assert_eq!(log.len(), 6, "every event is in the log: {log:?}");
    let after = |id: i64| {
        log.iter().find(|r| r.payload["after"]["id"] == id).map(|r| r.payload["after"].clone()).expect("in the log")
    };
    assert!(after(1).get("campaign").is_none(), "before ADD COLUMN: {}", after(1));
    assert_eq!(after(2)["campaign"], "x");
    assert!(after(3).get("device_kind").is_some() && after(3).get("device").is_none(), "{}", after(3));
    assert_eq!(after(4)["duration_ms"], 10000);
    assert_eq!(after(5)["duration_ms"], "10000", "retyped to text, sent as text");
    assert!(after(6).get("duration_ms").is_none(), "dropped: {}", after(6));

    // ClickHouse has what could be enriched, with its figures.
    let pct: Vec<(u64, Option<f64>)> = t
        .ch()
        .query("SELECT event_id, engagement_percent FROM enriched_engagements FINAL ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(pct, vec![(1, Some(10.0)), (2, Some(10.0)), (3, Some(10.0)), (4, Some(10.0))]);

    // The rest is parked, each with the column and the reason.
    let dead_topic = format!("{}dead_letter", t.cfg.log.topic_prefix);
    let dead = read_topic(&t, &dead_topic, WAIT, |r| r.len() >= 2).await;
    let reason = |id: i64| {
        let d = dead.iter().find(|d| d.payload["after"]["id"] == id).unwrap_or_else(|| panic!("{id} parked: {dead:?}"));
        assert_eq!(d.headers.get("pgfanout.sink").map(String::as_str), Some("enrich"));
        d.headers.get("pgfanout.error").cloned().unwrap_or_default()
    };
    let retyped = reason(5);
    assert!(retyped.contains("duration_ms") && retyped.contains("type"), "{retyped}");
    let dropped = reason(6);
    assert!(dropped.contains("duration_ms") && dropped.contains("dropped or renamed"), "{dropped}");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(t.http_get("_stats").await["events"], 4);
    assert!(t.pipeline_is_running(), "the pipeline keeps running");
    t.stop().await;
}

/// A table's primary key replaced mid-stream: the log's message key follows
/// the new key from the next Relation message on.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_primary_key_is_read_again() {
    let mut t = TestEnv::new(&pg_versions()[0]).await;
    t.start();
    t.pg.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES ('{C}', 'a', 'A', 'video', 60, now())"
    ))
    .await
    .unwrap();
    t.pg.batch_execute("ALTER TABLE content ADD COLUMN code int").await.unwrap();
    t.pg.batch_execute(&format!("UPDATE content SET code = 7 WHERE id = '{C}'")).await.unwrap();
    t.acked_everything(WAIT).await;
    // Replace the key: (id) -> (code). A new primary key on a table whose
    // replica identity is FULL leaves every column flagged; the key must
    // come from the catalog again.
    t.pg.batch_execute(
        "ALTER TABLE content DROP CONSTRAINT content_pkey CASCADE; ALTER TABLE content ADD PRIMARY KEY (code)",
    )
    .await
    .unwrap();
    t.pg.batch_execute(&format!("UPDATE content SET title = 'B' WHERE id = '{C}'")).await.unwrap();
    t.acked_everything(WAIT).await;
    let topic = format!("{}public.content", t.cfg.log.topic_prefix);
    let log = read_topic(&t, &topic, WAIT, |r| r.len() >= 3).await;
    let keys: Vec<serde_json::Value> =
        log.iter().map(|r| serde_json::from_str(r.key.as_deref().unwrap_or("null")).unwrap()).collect();
    assert_eq!(keys.len(), 3, "{log:?}");
    assert_eq!(keys[0], serde_json::json!({"id": C}), "{keys:?}");
    assert_eq!(keys[2], serde_json::json!({"code": 7}), "the new key: {keys:?}");
    t.stop().await;
}
