//! Dead letters a user can act on. The webhook receiver answers HTTP 500
//! for longer than the sink's retry budget (`max_attempts`), so the sink
//! parks its batches and the stream goes on. `pgfanout dead-letters list`
//! shows them (sink, reason, positions, time, not replayed); a replay while
//! the receiver still fails exits 1 and leaves them parked (a batch larger
//! than the broker takes is parked in parts, each replayed as a batch of its
//! own); once the
//! receiver is back, `pgfanout dead-letters replay --sink http` re-delivers
//! them: the receiver ends holding every change exactly once, and a second
//! replay posts nothing at all.
//!
//! And Redis, which skips positions at or below its watermark: a batch it
//! refused for good (WRONGTYPE), replayed after the live stream went past
//! it, lands in its stream and the window exactly once.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value as Json;
use support::topics::read_topic;
use support::{pg_versions, wait_until, Sink, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const CONTENT: &str = "00000000-0000-0000-0000-00000000d1e7";

/// The built binary on the test's configuration.
fn pgfanout(config: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfanout"))
        .arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pgfanout");
    eprintln!(
        "pgfanout {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn list_json(config: &Path) -> Vec<Json> {
    let out = pgfanout(config, &["dead-letters", "list", "--json"]);
    assert!(out.status.success(), "dead-letters list --json failed");
    serde_json::from_slice::<Json>(&out.stdout).expect("list --json prints JSON").as_array().unwrap().clone()
}

/// What the receiver applied, as (event id, op) per change id.
async fn received(t: &TestEnv) -> BTreeMap<String, Vec<(i64, String)>> {
    let mut by_change: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for e in t.http_get("_events").await.as_array().unwrap() {
        let row = if e["event"].is_null() { &e["previous"] } else { &e["event"] };
        let entry = (row["event_id"].as_i64().unwrap(), e["op"].as_str().unwrap().to_string());
        by_change.entry(e["id"].as_str().unwrap().to_string()).or_default().push(entry);
    }
    by_change
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_webhook_batches_are_listed_and_replayed_once() {
    let v = pg_versions()[0].clone();
    let mut t = TestEnv::builder(&v)
        .sinks(&[Sink::Http])
        .with(|cfg| {
            // A short retry budget: three attempts, 20-50 ms apart.
            let http = cfg.http.as_mut().unwrap();
            http.max_attempts = 3;
            http.backoff_initial_ms = 20;
            http.backoff_max_ms = 50;
            // Small enough that a batch of 100 events is parked in parts.
            cfg.log.properties.insert("message.max.bytes".into(), pgfanout::config::Secret("20000".into()));
        })
        .build()
        .await;
    let config = t.write_config(&t.cfg, "pgfanout");
    assert!(stdout(&pgfanout(&config, &["dead-letters", "list"])).contains("no dead letters"));

    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{CONTENT}', 'dl', 'Dead letters', 'podcast', 600, now())"
    ))
    .await
    .unwrap();
    t.start();
    let insert = |ids: &str| {
        format!(
            "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) \
             SELECT i, '{CONTENT}', 'play', now(), 1000 * i FROM unnest('{{{ids}}}'::bigint[]) AS i"
        )
    };
    t.pg.batch_execute(&insert("1")).await.unwrap();
    wait_until("event 1 at the receiver", WAIT, || async { !received(&t).await.is_empty() }).await;

    // The outage: every post fails, for longer than three attempts.
    t.http_control(serde_json::json!({"fail_next": 1_000_000, "status": 500})).await;
    // Three batches, each its own transaction, parked one after the other.
    t.pg.batch_execute(&insert("2,3,4")).await.unwrap();
    t.acked_everything(WAIT).await;
    t.pg.batch_execute(&format!(
        "BEGIN; UPDATE engagement_events SET duration_ms = 500 WHERE id = 1; {}; COMMIT",
        insert("5")
    ))
    .await
    .unwrap();
    t.acked_everything(WAIT).await;
    t.pg.batch_execute("DELETE FROM engagement_events WHERE id = 3").await.unwrap();
    t.acked_everything(WAIT).await;
    let many: Vec<String> = (6..=105).map(|i| i.to_string()).collect();
    t.pg.batch_execute(&insert(&many.join(","))).await.unwrap();
    t.acked_everything(WAIT).await;
    t.stop().await;
    let before = t.http_get("_stats").await;
    assert_eq!(before["events"], 1, "only event 1 got through: {before}");

    // Parked in the dead-letter topic with the batch, its format and time.
    let topic = format!("{}dead_letter", t.cfg.log.topic_prefix);
    let dead = read_topic(&t, &topic, WAIT, |r| {
        r.iter().map(|d| d.payload["engagements"].as_u64().unwrap_or(0)).sum::<u64>() >= 106
    })
    .await;
    let parts = dead.len() - 3;
    for d in &dead {
        assert_eq!(d.headers.get("pgfanout.sink").map(String::as_str), Some("http"), "{d:?}");
        assert_eq!(d.headers.get("pgfanout.format").map(String::as_str), Some("batch.v1"), "{d:?}");
        assert!(d.headers.get("pgfanout.error").is_some_and(|e| e.contains("HTTP 500")), "{d:?}");
        assert!(d.headers.contains_key("pgfanout.parked_at"), "{d:?}");
        assert_eq!(d.payload["attempts"], 3, "{d:?}");
    }
    let sizes: Vec<u64> = dead.iter().map(|d| d.payload["engagements"].as_u64().unwrap()).collect();
    assert_eq!(sizes[..3], [3, 2, 1]);
    assert!(parts > 1 && sizes[3..].iter().all(|&n| n < 100), "the batch of 100 in parts: {sizes:?}");
    assert_eq!(sizes[3..].iter().sum::<u64>(), 100, "{sizes:?}");
    let n = dead.len();

    // Listed: sink, reason, positions, time, not replayed.
    let listed = list_json(&config);
    assert_eq!(listed.len(), n, "{listed:?}");
    for (l, d) in listed.iter().zip(&dead) {
        assert_eq!(l["sink"], "http", "{l}");
        assert!(l["reason"].as_str().unwrap().contains("HTTP 500"), "{l}");
        assert_eq!(l["first"], d.payload["first"], "{l}");
        assert_eq!(l["last"], d.payload["last"], "{l}");
        assert!(l["parked_at"].is_string(), "{l}");
        assert!(l["replayed_at"].is_null() && l["not_replayable"].is_null(), "{l}");
    }
    let table = stdout(&pgfanout(&config, &["dead-letters", "list", "--sink", "http"]));
    assert!(table.contains(&format!("{n} dead letters, {n} waiting for replay")), "{table}");
    assert!(stdout(&pgfanout(&config, &["dead-letters", "list", "--sink", "redis"])).contains("no dead letters"));

    // Replayed while the receiver still fails: exit 1, still parked, nothing arrived.
    let failed = pgfanout(&config, &["dead-letters", "replay", "--sink", "http"]);
    assert_eq!(failed.status.code(), Some(1));
    let text = stdout(&failed);
    assert_eq!(text.matches("FAILED").count(), n, "{text}");
    assert!(text.contains("HTTP 500") && text.contains(&format!("0 replayed, {n} failed")), "{text}");
    assert!(list_json(&config).iter().all(|l| l["replayed_at"].is_null()));
    assert_eq!(t.http_get("_stats").await["events"], 1);

    // Back: every change arrives, exactly once.
    t.http_control(serde_json::json!({"fail_next": 0})).await;
    let replayed = pgfanout(&config, &["dead-letters", "replay", "--sink", "http", "--since", "1h"]);
    assert!(replayed.status.success());
    assert!(stdout(&replayed).contains(&format!("{n} replayed, 0 failed")), "{}", stdout(&replayed));
    let got = received(&t).await;
    let mut changes: Vec<(i64, String)> = got.values().flatten().cloned().collect();
    changes.sort();
    let mut expected: Vec<(i64, String)> = [(1, "c"), (1, "u"), (2, "c"), (3, "c"), (3, "d"), (4, "c"), (5, "c")]
        .map(|(i, op)| (i, op.to_string()))
        .into();
    expected.extend((6..=105).map(|i| (i, "c".to_string())));
    expected.sort();
    assert_eq!(changes, expected, "{got:?}");
    assert!(got.values().all(|c| c.len() == 1), "a change arrived twice: {got:?}");
    let after = t.http_get("_stats").await;
    assert_eq!((after["duplicates"].as_u64(), after["conflicts"].as_u64()), (Some(0), Some(0)), "{after}");
    let listed = list_json(&config);
    assert!(listed.iter().all(|l| l["replayed_at"].is_string()), "{listed:?}");
    assert!(stdout(&pgfanout(&config, &["dead-letters", "list"])).contains(&format!("{n} dead letters, 0 waiting")));

    // Twice: nothing is posted at all.
    let again = pgfanout(&config, &["dead-letters", "replay"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains(&format!("0 replayed, 0 failed, {n} replayed before")), "{}", stdout(&again));
    assert_eq!(t.http_get("_stats").await, after, "the second replay posted");
    assert_eq!(received(&t).await, got);
}

/// Event ids in `<prefix>stream:<kind>`, in stream order.
async fn stream_ids(t: &TestEnv, kind: &str) -> Vec<i64> {
    let key = format!("{}stream:{kind}", t.cfg.redis.as_ref().unwrap().key_prefix);
    let reply: redis::streams::StreamRangeReply = t.redis().xrange_all(key).await.unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            serde_json::from_str::<Json>(&e.get::<String>("data").unwrap()).unwrap()["event"]["event_id"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_redis_batch_replays_past_the_live_watermark() {
    const PODCAST: &str = "00000000-0000-0000-0000-0000000000a1";
    const VIDEO: &str = "00000000-0000-0000-0000-0000000000b2";
    let v = pg_versions()[0].clone();
    let mut t = TestEnv::builder(&v).sinks(&[Sink::Redis]).build().await;
    let config = t.write_config(&t.cfg, "pgfanout");
    let prefix = t.cfg.redis.as_ref().unwrap().key_prefix.clone();
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{PODCAST}', 'p', 'P', 'podcast', 600, now()), ('{VIDEO}', 'v', 'V', 'video', 300, now())"
    ))
    .await
    .unwrap();
    let insert = |id: i64, content: &str| {
        format!(
            "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES ({id}, '{content}', 'play', now(), {})",
            7_000 * id
        )
    };
    t.start();
    t.pg.batch_execute(&insert(1, PODCAST)).await.unwrap();
    wait_until("event 1 in Redis", WAIT, || async { stream_ids(&t, "podcast").await == [1] }).await;

    // The video stream's key holds a string: every write to it is WRONGTYPE.
    let video = format!("{prefix}stream:video");
    t.redis().set::<_, _, ()>(&video, "not a stream").await.unwrap();
    t.pg.batch_execute(&insert(2, VIDEO)).await.unwrap();
    t.acked_everything(WAIT).await;
    t.redis().del::<_, ()>(&video).await.unwrap();
    // The live stream goes on past the parked batch.
    t.pg.batch_execute(&format!("{}; {}", insert(3, VIDEO), insert(4, PODCAST))).await.unwrap();
    wait_until("events 3 and 4 in Redis", WAIT, || async { stream_ids(&t, "video").await == [3] }).await;
    t.acked_everything(WAIT).await;
    t.stop().await;
    assert_eq!(stream_ids(&t, "podcast").await, [1, 4]);
    assert_ne!(support::sinks::redis_window(&t).await, support::sinks::postgres_window(&t).await);

    let listed = list_json(&config);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sink"], "redis");
    assert!(listed[0]["reason"].as_str().unwrap().contains("WRONGTYPE"), "{listed:?}");

    let replayed = pgfanout(&config, &["dead-letters", "replay", "--sink", "redis"]);
    assert!(replayed.status.success());
    assert!(stdout(&replayed).contains("1 replayed, 0 failed"), "{}", stdout(&replayed));
    assert_eq!(stream_ids(&t, "video").await, [3, 2]);
    assert_eq!(support::sinks::redis_window(&t).await, support::sinks::postgres_window(&t).await);
    // The replay's own watermark is gone once it is recorded.
    let watermarks: Vec<String> = t.redis().keys(format!("{prefix}position:*")).await.unwrap();
    assert!(watermarks.is_empty(), "{watermarks:?}");

    let again = pgfanout(&config, &["dead-letters", "replay"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("0 replayed, 0 failed, 1 replayed before"), "{}", stdout(&again));
    assert_eq!(stream_ids(&t, "video").await, [3, 2]);
    assert_eq!(stream_ids(&t, "podcast").await, [1, 4]);
    assert_eq!(support::sinks::redis_window(&t).await, support::sinks::postgres_window(&t).await);
}
