//! Sinks are optional: a configuration without `[http]` (or without
//! `[redis]`) runs end to end, with the file sink beside the others;
//! `status` and `init` skip what is off; a configuration without any sink
//! is refused unless it asks for a log-only run.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::{pg_versions, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

const CONTENT: &str = "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES \
    ('550e8400-e29b-41d4-a716-446655440000', 'test-episode', 'Test Episode', 'podcast', 1200, NOW())";

/// `n` events of 30 s each on the content above, in one transaction.
fn events(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "('550e8400-e29b-41d4-a716-446655440000', gen_random_uuid(), 'play', NOW(), {}, 'web', '{{}}')",
                30_000 + i
            )
        })
        .collect();
    format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES {}",
        rows.join(", ")
    )
}

/// Lines of the file sink's output, parsed.
fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_http_clickhouse_redis_and_the_file_sink_get_every_event() {
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let path = out.to_string_lossy().into_owned();
    // Built with the receiver's client (to show nothing reached it), and
    // initialised without [http].
    let mut t = TestEnv::builder(&pg_versions()[0])
        .with(|cfg| {
            cfg.http = None;
            cfg.file = Some(pgfanout::config::FileConfig { path });
        })
        .build()
        .await;

    t.start();
    t.pg.batch_execute(CONTENT).await.unwrap();
    t.pg.batch_execute(&events(N)).await.unwrap();
    t.acked_everything(WAIT).await;
    // Acknowledged means every sink flushed: no waiting for any of them now.
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL").await, N as u64);
    let mut redis = t.redis();
    let stream = format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix);
    assert_eq!(redis.xlen::<_, u64>(&stream).await.unwrap(), N as u64);
    let written = lines(&out);
    assert_eq!(written.len(), N, "one line per event");
    // Values, not only counts: each line is the event as PostgreSQL holds it, enriched.
    let rows = t
        .pg
        .query(
            "SELECT id, duration_ms, round(duration_ms / 1000.0 / 1200 * 100, 2)::float8 FROM engagement_events ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    for (line, row) in written.iter().zip(&rows) {
        assert_eq!(line["op"], "c");
        assert_eq!(line["event"]["event_id"], row.get::<_, i64>(0), "{line}");
        assert_eq!(line["event"]["duration_ms"], row.get::<_, i32>(1), "{line}");
        assert_eq!(line["event"]["engagement_percent"], row.get::<_, f64>(2), "{line}");
        assert_eq!(line["event"]["content_slug"], "test-episode");
    }
    let ids: std::collections::HashSet<&str> = written.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), N, "distinct event ids");
    // Nothing reached the receiver this configuration does not have.
    assert_eq!(t.http_get("_stats").await["batches"], 0);

    let report = pgfanout::commands::status::check(&t.cfg).await.expect("status");
    let names: Vec<&str> = report.sinks.iter().map(|s| s.name).collect();
    assert_eq!(names, ["broker", "clickhouse", "redis", "file"], "status probes what is configured");
    assert!(report.sinks.iter().all(|s| s.reachable), "{:?}", report.sinks);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_the_other_sinks_get_every_event() {
    const N: usize = 25;
    let mut t = TestEnv::new(&pg_versions()[0]).await;
    let prefix = t.cfg.redis.as_ref().unwrap().key_prefix.clone();
    t.cfg.redis = None;
    t.start();
    t.pg.batch_execute(CONTENT).await.unwrap();
    t.pg.batch_execute(&events(N)).await.unwrap();
    t.acked_everything(WAIT).await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL").await, N as u64);
    assert_eq!(t.http_get("_stats").await["events"], N as u64);
    let mut redis = t.redis();
    let keys: Vec<String> = redis.keys(format!("{prefix}*")).await.unwrap();
    assert!(keys.is_empty(), "Redis is off, yet it holds {keys:?}");
    let report = pgfanout::commands::status::check(&t.cfg).await.expect("status");
    let names: Vec<&str> = report.sinks.iter().map(|s| s.name).collect();
    assert_eq!(names, ["broker", "clickhouse", "http"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_sink_is_refused_unless_the_run_is_log_only() {
    let mut t = TestEnv::new(&pg_versions()[0]).await;
    t.cfg.clickhouse = None;
    t.cfg.redis = None;
    t.cfg.http = None;
    let e =
        pgfanout::sinks::build(&t.cfg, pgfanout::sinks::Refused::Stall).err().expect("no sink is an error").to_string();
    assert!(e.contains("no sink is configured") && e.contains("log_only"), "{e}");
    // Log-only: the slot moves once the broker has the changes.
    t.cfg.pipeline.log_only = true;
    t.start();
    t.pg.batch_execute(CONTENT).await.unwrap();
    t.pg.batch_execute(&events(5)).await.unwrap();
    t.acked_everything(WAIT).await;
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    let published = support::topics::read_topic(&t, &topic, WAIT, |r| r.len() >= 5).await;
    assert_eq!(published.len(), 5, "every event is in the log");
    t.stop().await;
}
