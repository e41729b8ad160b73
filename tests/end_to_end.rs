//! PostgreSQL → every sink, against the real services, on every PostgreSQL
//! major that scripts/test started.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::{pg_versions, wait_until, TestEnv};

const SAMPLE: &str = "
INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
('550e8400-e29b-41d4-a716-446655440000', 'test-episode', 'Test Episode', 'podcast', 1200, NOW());
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES
('550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'play', NOW(), 30000, 'web', '{\"source\": \"test\"}');
";

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SampleRow {
    engagement_seconds: Option<f64>,
    engagement_percent: Option<f64>,
    content_type: String,
    content_slug: String,
    content_title: String,
    device: Option<String>,
}

async fn spec_sample(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.start();
    t.pg.batch_execute(SAMPLE).await.unwrap();
    let end = t.wal_insert_lsn().await;
    wait_until("ClickHouse holds the enriched row", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    let rows = t.ch_rows::<SampleRow>("SELECT engagement_seconds, engagement_percent, content_type, content_slug, content_title, device FROM enriched_engagements FINAL").await;
    assert_eq!(rows.len(), 1, "PG {v}");
    let r = &rows[0];
    assert_eq!(r.engagement_seconds, Some(30.0));
    assert_eq!(r.engagement_percent, Some(2.5));
    assert_eq!(
        (r.content_type.as_str(), r.content_slug.as_str(), r.content_title.as_str()),
        ("podcast", "test-episode", "Test Episode")
    );
    assert_eq!(r.device.as_deref(), Some("web"));
    assert_eq!(t.ch_count("SELECT count() FROM content_dim FINAL").await, 1);

    let mut redis = t.redis();
    let stream = format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix);
    wait_until("Redis podcast stream holds the event", WAIT, || {
        let mut r = redis.clone();
        let stream = stream.clone();
        async move { r.xlen::<_, u64>(&stream).await.unwrap() == 1 }
    })
    .await;
    let top: Vec<(String, f64)> = redis
        .zrevrange_withscores(format!("{}top:window", t.cfg.redis.as_ref().unwrap().key_prefix), 0, -1)
        .await
        .unwrap();
    assert_eq!(top, vec![("550e8400-e29b-41d4-a716-446655440000".to_string(), 2.5)], "PG {v}");

    wait_until("HTTP receiver got the event", WAIT, || async { t.http_get("_stats").await["events"] == 1 }).await;
    let events = t.http_get("_events").await;
    assert_eq!(events[0]["event"]["engagement_percent"], 2.5);
    assert_eq!(events[0]["event"]["content_slug"], "test-episode");
    assert_eq!(t.http_get("_stats").await["rejected"], 0);

    wait_until("slot acknowledged past the transaction", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_sample_reaches_every_sink() {
    for v in pg_versions() {
        spec_sample(&v).await;
    }
}

async fn ack_waits_for_the_slowest_sink(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.start();
    // Settle: the slot has caught up with an idle server.
    t.pg.batch_execute(
        "INSERT INTO content VALUES ('550e8400-e29b-41d4-a716-446655440000', 's', 'T', 'video', 100, now())",
    )
    .await
    .unwrap();
    let settled = t.wal_insert_lsn().await;
    wait_until("initial ack", WAIT, || async { t.confirmed_flush_lsn().await >= settled }).await;

    t.http_control(serde_json::json!({"hold": true})).await;
    let before = t.confirmed_flush_lsn().await;
    t.pg.batch_execute("INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) VALUES ('550e8400-e29b-41d4-a716-446655440000', 'play', now(), 5000)").await.unwrap();
    let end = t.wal_insert_lsn().await;
    wait_until("ClickHouse has the row", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    // ClickHouse and Redis have it, HTTP is refusing: the slot must not move past it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = t.confirmed_flush_lsn().await;
    assert!(held < end, "PG {v}: slot acknowledged {held:#x} past {end:#x} while the HTTP sink had not flushed");
    assert!(held >= before);
    assert_eq!(t.http_get("_stats").await["events"], 0);

    t.http_control(serde_json::json!({"hold": false})).await;
    wait_until("HTTP receiver got the event", WAIT, || async { t.http_get("_stats").await["events"] == 1 }).await;
    wait_until("slot acknowledged after all sinks flushed", WAIT, || async { t.confirmed_flush_lsn().await >= end })
        .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_is_acknowledged_only_after_every_sink_flushed() {
    for v in pg_versions() {
        ack_waits_for_the_slowest_sink(&v).await;
    }
}

async fn nulls_and_unknown_content(v: &str) {
    let mut t = TestEnv::new(v).await;
    // The FK would refuse an event whose content does not exist; the sidecar
    // must cope with one anyway (late content, FK-less sources).
    t.pg.batch_execute("ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey")
        .await
        .unwrap();
    t.start();
    t.pg.batch_execute(
        "INSERT INTO content VALUES
           ('00000000-0000-0000-0000-0000000000a1', 'a', 'A', 'podcast', NULL, now()),
           ('00000000-0000-0000-0000-0000000000a2', 'b', 'B', 'video', 0, now()),
           ('00000000-0000-0000-0000-0000000000a3', 'c', 'C', 'newsletter', 600, now());
         INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES
           (1, '00000000-0000-0000-0000-0000000000a1', 'play', now(), 1000),   -- NULL length
           (2, '00000000-0000-0000-0000-0000000000a2', 'play', now(), 1000),   -- zero length
           (3, '00000000-0000-0000-0000-0000000000a3', 'pause', now(), NULL),  -- NULL duration
           (4, '00000000-0000-0000-0000-0000000000ff', 'click', now(), 2000),  -- unknown content
           (5, NULL, 'finish', now(), 3000);                                   -- no content at all",
    )
    .await
    .unwrap();
    wait_until("ClickHouse holds all five", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 5
    })
    .await;
    assert_eq!(
        t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE engagement_percent IS NULL").await,
        5,
        "PG {v}: every percent here is NULL, none 0 or NaN"
    );
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE event_id = 3 AND engagement_seconds IS NULL AND duration_ms IS NULL").await, 1);
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE event_id = 4 AND content_slug = '' AND content_type = '' AND length_seconds IS NULL AND engagement_seconds = 2").await, 1);

    wait_until("HTTP receiver got all five", WAIT, || async { t.http_get("_stats").await["events"] == 5 }).await;
    let events = t.http_get("_events").await;
    for e in events.as_array().unwrap() {
        assert!(e["event"]["engagement_percent"].is_null(), "PG {v}: {e}");
    }
    let unknown = events.as_array().unwrap().iter().find(|e| e["event"]["event_id"] == 4).expect("event 4 delivered");
    assert!(unknown["event"]["content_slug"].is_null());

    let mut redis = t.redis();
    let p = t.cfg.redis.as_ref().unwrap().key_prefix.clone();
    let lens: Vec<u64> = futures::future::join_all(["podcast", "video", "newsletter", "unknown"].iter().map(|ty| {
        let mut r = redis.clone();
        let key = format!("{p}stream:{ty}");
        async move { r.xlen::<_, u64>(key).await.unwrap() }
    }))
    .await;
    assert_eq!(lens, vec![1, 1, 1, 2], "PG {v}: streams per content type");
    let top: Vec<(String, f64)> = redis.zrange_withscores(format!("{p}top:window"), 0, -1).await.unwrap();
    assert!(top.is_empty(), "PG {v}: NULL percentages score nothing, got {top:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn null_rules_and_unknown_content_in_every_sink() {
    for v in pg_versions() {
        nulls_and_unknown_content(&v).await;
    }
}

/// Two batches of one transaction whose ordinals the old u64
/// `Position::version()` could not tell apart (past 2^20, a transaction of
/// more than a million changes): Redis applies both, and a replay of the
/// second applies nothing.
#[tokio::test(flavor = "multi_thread")]
async fn redis_applies_every_batch_of_a_transaction_past_a_million_changes() {
    use pgfanout::enrich::{EngagementChange, EngagementRow, Enriched};
    use pgfanout::source::{Op, Position};
    let t = TestEnv::builder(&pg_versions()[0]).sinks(&[support::Sink::Redis]).build().await;
    use pgfanout::sinks::Sink;
    let sink = pgfanout::sinks::redis::RedisSink::new(t.cfg.redis.as_ref().unwrap(), &pgfanout::sinks::Refused::Stall)
        .unwrap();
    let batch = |ordinal: u32| Enriched {
        engagements: vec![EngagementChange {
            op: Op::Create,
            current: Some(EngagementRow {
                event_id: i64::from(ordinal),
                content_id: None,
                user_id: None,
                event_type: Some("play".into()),
                event_ts: 0,
                duration_ms: None,
                device: None,
                raw_payload: None,
                engagement_seconds: None,
                engagement_percent: None,
                content_slug: None,
                content_title: None,
                content_type: None,
                length_seconds: None,
                publish_ts: None,
            }),
            previous: None,
            position: Position { commit_lsn: 0x1_0000_0000, ordinal },
            commit_ts: 0,
            replay_digest: None,
        }],
        ..Default::default()
    };
    for ordinal in [(1 << 20) + 5, (1 << 20) + 6, (1 << 20) + 6] {
        sink.write(&batch(ordinal)).await.unwrap();
    }
    let mut r = t.redis();
    let entries: u64 = r.xlen(format!("{}stream:unknown", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap();
    assert_eq!(entries, 2, "both batches applied once each");
}
