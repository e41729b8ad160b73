//! The webhook sink against the test receiver (scripts/support/http_receiver.py),
//! which behaves like a Standard Webhooks receiver: it verifies signatures
//! with the official library and de-duplicates by `Idempotency-Key` alone.
//!
//! - SIGKILLed while events stream (big transactions cut into many batches,
//!   updates, deletes), the sidecar re-sends after each restart exactly the
//!   batches it had posted (same events, same key, same body), so the
//!   receiver holds every change exactly once and the final state of every
//!   row equals PostgreSQL's.
//! - Permanent refusals (4xx, redirects) are parked at once, without
//!   retries; `Retry-After` on 429 is waited for.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value as Json;
use support::workload::{self, Progress};
use support::{logs, pg_versions, wait_until, Sidecar, Sink, TestEnv};

const TARGET_CHANGES: u64 = 30_000;
const KILLS: usize = 8;
const CONTENTS: usize = 6;

fn content_id(i: usize) -> String {
    format!("00000000-0000-0000-0000-{:012}", 0xe000 + i)
}

/// Inserts (now and then one transaction of a few thousand rows, which
/// spans many batches), updates (some moving events to other content) and
/// deletes until TARGET_CHANGES row changes are written.
async fn mixed_writes(pg: tokio_postgres::Client, progress: Arc<Progress>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut max_id = 0i64;
    while progress.changes() < TARGET_CHANGES {
        let rows = if rng.gen_ratio(1, 8) { rng.gen_range(1_000..4_000) } else { rng.gen_range(1..200) };
        let values: Vec<String> = (0..rows)
            .map(|_| {
                let duration = workload::nullable_duration(&mut rng);
                workload::play(&content_id(rng.gen_range(0..CONTENTS)), &duration)
            })
            .collect();
        // One transaction: the inserts, then changes to rows of earlier ones.
        pg.batch_execute("BEGIN").await.unwrap();
        let inserted = pg.execute(&workload::insert_plays(&values), &[]).await.unwrap();
        let updated =
            pg.execute(&workload::lengthen(&workload::random_ids(&mut rng, max_id, 40), 1000), &[]).await.unwrap();
        let to = content_id(rng.gen_range(0..CONTENTS));
        let moved =
            pg.execute(&workload::move_to(&to, &workload::random_ids(&mut rng, max_id, 10)), &[]).await.unwrap();
        let deleted = pg.execute(&workload::delete(&workload::random_ids(&mut rng, max_id, 15)), &[]).await.unwrap();
        pg.batch_execute("COMMIT").await.unwrap();
        max_id += inserted as i64;
        progress.add(inserted + updated + moved + deleted);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_sidecar_resends_exactly_the_batches_it_posted() {
    let v = pg_versions()[0].clone();
    let t = TestEnv::builder(&v)
        .sinks(&[Sink::Http])
        // Small batches: many of them, and big transactions cut across several.
        .with(|cfg| cfg.pipeline.batch_max_changes = 300)
        .build()
        .await;
    let config = t.write_config(&t.cfg, "pgfanout");

    // publish_ts = now(), with microseconds: the first run learns the
    // contents from the stream, later ones from the table, and both must give
    // the same millisecond value or a re-sent batch changes body.
    for i in 0..CONTENTS {
        let kind = ["podcast", "newsletter", "video"][i % 3];
        t.pg.execute(
            "INSERT INTO content VALUES ($1::text::uuid, $2, $3, $4, $5, now())",
            &[&content_id(i), &format!("slug-{i}"), &format!("Content {i}"), &kind, &(300 + 120 * i as i32)],
        )
        .await
        .unwrap();
    }

    let mut sidecar = Sidecar::spawn(&config);
    let writer = workload::spawn(&t, mixed_writes);
    sidecar.kill_at_random(KILLS, 1_000..3_000, 29, || writer.changes()).await;
    let progress = writer.progress();
    writer.finish().await;
    let total = progress.changes();
    assert!(total >= TARGET_CHANGES, "the writer stopped after {total} changes");
    let end = t.wal_insert_lsn().await;
    // Once the slot is past the end, every lane flushed everything: no post is still to come.
    wait_until("the slot acknowledged everything", Duration::from_secs(300), || async {
        t.confirmed_flush_lsn().await >= end
    })
    .await;

    let stats = t.http_get("_stats").await;
    eprintln!("{total} changes; receiver: {stats}; log: {}", sidecar.log.display());
    let conflicts = t.http_get("_conflicts").await;
    assert_eq!(stats["conflicts"], 0, "keys re-sent with another body: {conflicts}");
    assert_eq!(stats["rejected"], 0, "{stats}");
    let events = t.http_get("_events").await;
    let events = events.as_array().unwrap();
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!((events.len() as u64, ids.len() as u64), (total, total), "events applied, distinct ids vs changes");
    // The kills landed on batches in flight: re-posted, and dropped by key.
    assert!(stats["duplicates"].as_u64().unwrap() > 0, "no batch was re-sent after {KILLS} kills: {stats}");

    // Values: the receiver applied batches in stream order, so the last event
    // of each row is its final state, which must be PostgreSQL's row, enriched.
    let mut last: HashMap<i64, &Json> = HashMap::new();
    for e in events {
        let row = if e["op"] == "d" { &e["previous"] } else { &e["event"] };
        last.insert(row["event_id"].as_i64().unwrap(), e);
    }
    let rows =
        t.pg.query(
            "SELECT e.id, e.content_id::text, e.duration_ms, c.slug, c.length_seconds
             FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id",
            &[],
        )
        .await
        .unwrap();
    let live = last.values().filter(|e| e["op"] != "d").count();
    assert_eq!(live, rows.len(), "rows alive after the last event of each");
    for r in &rows {
        let id: i64 = r.get(0);
        let e = last.get(&id).unwrap_or_else(|| panic!("event {id}: no webhook event"));
        assert_ne!(e["op"], "d", "event {id} exists in PostgreSQL, deleted at the receiver");
        let row = &e["event"];
        let (content, duration, slug, length): (Option<String>, Option<i32>, Option<String>, Option<i32>) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(row["content_id"].as_str().map(str::to_string), content, "event {id} content_id");
        assert_eq!(row["duration_ms"].as_i64(), duration.map(i64::from), "event {id} duration_ms");
        assert_eq!(row["content_slug"].as_str().map(str::to_string), slug, "event {id} content_slug");
        assert_eq!(row["length_seconds"].as_i64(), length.map(i64::from), "event {id} length_seconds");
    }

    // The record names the last batch posted: it ends with the last event applied.
    let key: String =
        t.pg.query_one("SELECT inflight_key FROM pgfanout_state.http_progress WHERE slot = $1", &[&t.cfg.source.slot])
            .await
            .unwrap()
            .get(0);
    let last_id = events.last().unwrap()["id"].as_str().unwrap();
    assert!(key.ends_with(&format!("-{last_id}")), "recorded key {key}, last event applied {last_id}");
    drop(sidecar);
}

async fn insert_event(t: &TestEnv, id: i64) {
    t.pg.execute(
        "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES ($1, $2::text::uuid, 'play', now(), 1000)",
        &[&id, &content_id(0)],
    )
    .await
    .unwrap();
}

async fn delivered_ids(t: &TestEnv) -> Vec<i64> {
    let events = t.http_get("_events").await;
    events.as_array().unwrap().iter().map(|e| e["event"]["event_id"].as_i64().unwrap()).collect()
}

async fn wait_delivered(t: &TestEnv, id: i64) {
    wait_until(&format!("event {id} at the receiver"), Duration::from_secs(60), || async {
        delivered_ids(t).await.contains(&id)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_parked_at_once_and_retry_after_is_waited_for() {
    let logs = logs::capture();
    let v = pg_versions()[0].clone();
    let mut t = TestEnv::builder(&v)
        .sinks(&[Sink::Http])
        .with(|cfg| {
            // Far from the 2 s Retry-After below: a retry before it is not the backoff's.
            let http = cfg.http.as_mut().unwrap();
            http.backoff_initial_ms = 50;
            http.backoff_max_ms = 200;
        })
        .build()
        .await;
    t.pg.execute(
        "INSERT INTO content VALUES ($1::text::uuid, 'slug-0', 'Content 0', 'podcast', 600, now())",
        &[&content_id(0)],
    )
    .await
    .unwrap();
    t.start();
    insert_event(&t, 1).await;
    wait_delivered(&t, 1).await;

    // 400 and a redirect: one attempt each, parked, the stream goes on.
    for (id, status) in [(2, 400), (3, 307)] {
        let failed = t.http_get("_stats").await["failed"].as_u64().unwrap();
        t.http_control(serde_json::json!({"fail_next": 1, "status": status})).await;
        insert_event(&t, id).await;
        wait_until(&format!("HTTP {status} answered"), Duration::from_secs(60), || async {
            t.http_get("_stats").await["failed"].as_u64().unwrap() > failed
        })
        .await;
        // In a batch of its own, after the refused one.
        insert_event(&t, id + 10).await;
        wait_delivered(&t, id + 10).await;
        let stats = t.http_get("_stats").await;
        assert_eq!(stats["failed"].as_u64().unwrap(), failed + 1, "HTTP {status}: retried: {stats}");
        let ids = delivered_ids(&t).await;
        assert!(!ids.contains(&id), "HTTP {status}: event {id} delivered after a permanent refusal");
        let parked = logs.lines_with(&[
            "refused it permanently",
            "parking it in the dead-letter topic",
            &format!("HTTP {status}"),
        ]);
        assert_eq!(parked.len(), 1, "HTTP {status}: {parked:?}");
    }
    // The redirect was not followed.
    let moved = reqwest::get(format!("{}/_stats/_moved/{}", t.http_base(), t.name))
        .await
        .unwrap()
        .json::<Json>()
        .await
        .unwrap();
    assert_eq!(moved["batches"], 0, "the redirect was followed: {moved}");

    // 429 with Retry-After: 2 s, however short the backoff.
    t.http_control(serde_json::json!({"fail_next": 1, "status": 429, "retry_after": "2"})).await;
    let sent = Instant::now();
    insert_event(&t, 4).await;
    wait_delivered(&t, 4).await;
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(1_900), "delivered {took:?} after a 429 asking for 2 s");
    assert!(took < Duration::from_secs(10), "delivered only {took:?} after a 429 asking for 2 s");
    assert_eq!(t.http_get("_stats").await["conflicts"], 0);
    t.stop().await;
}

/// The live record's generation and in-flight key.
async fn record(t: &TestEnv) -> (i64, Option<String>) {
    let q = "SELECT generation, inflight_key FROM pgfanout_state.http_progress WHERE slot = $1";
    let r = t.pg.query_one(q, &[&t.cfg.source.slot]).await.unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_record_was_taken_over_stops_before_posting() {
    let v = pg_versions()[0].clone();
    let t = TestEnv::builder(&v).sinks(&[Sink::Http]).build().await;
    t.pg.execute(
        "INSERT INTO content VALUES ($1::text::uuid, 'slug-0', 'Content 0', 'podcast', 600, now())",
        &[&content_id(0)],
    )
    .await
    .unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pgfanout::pipeline::run(t.cfg.clone(), rx, Default::default()));
    insert_event(&t, 1).await;
    wait_delivered(&t, 1).await;
    let (generation, key) = record(&t).await;
    assert_eq!(generation, 1, "the first run's generation");
    assert_eq!(delivered_ids(&t).await, [1]);

    // What a later `pgfanout run` does when it starts (the slot keeps this
    // one from streaming beside it; a SIGKILLed one's late write is the case).
    t.pg.execute(
        "UPDATE pgfanout_state.http_progress SET generation = generation + 1 WHERE slot = $1",
        &[&t.cfg.source.slot],
    )
    .await
    .unwrap();
    insert_event(&t, 2).await;
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run stops")
        .unwrap()
        .expect_err("the run stops with an error");
    assert!(err.to_string().contains("taken over"), "{err}");
    assert_eq!(delivered_ids(&t).await, [1], "nothing posted after the take-over");
    assert_eq!(record(&t).await, (2, key), "the record is the later run's");
}
