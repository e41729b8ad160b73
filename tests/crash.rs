//! Exactly-once in effect: a mixed workload of inserts, updates and deletes
//! while the sidecar is SIGKILLed at random moments and restarted; at the
//! end every sink holds exactly what PostgreSQL holds.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use support::{pg_versions, spawn_sidecar, wait_until, TestEnv};

const TARGET_CHANGES: u64 = 100_000;
const KILLS: usize = 10;

/// Writes at least TARGET_CHANGES row changes to engagement_events; returns
/// how many rows the statements changed (each is one change in the stream).
async fn workload(pg: &tokio_postgres::Client, contents: &[String], done: &AtomicBool, changes: &AtomicU64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut max_id = 0i64;
    while changes.load(Ordering::Relaxed) < TARGET_CHANGES {
        let values: Vec<String> = (0..400)
            .map(|_| {
                let content = &contents[rng.gen_range(0..contents.len())];
                let duration =
                    if rng.gen_ratio(1, 10) { "NULL".to_string() } else { rng.gen_range(0..900_000).to_string() };
                format!("('{content}', 'play', now(), {duration})")
            })
            .collect();
        let n = pg
            .execute(
                &format!(
                    "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) VALUES {}",
                    values.join(",")
                ),
                &[],
            )
            .await
            .unwrap();
        max_id += n as i64;
        let ids = |rng: &mut rand::rngs::StdRng, k: usize| {
            (0..k).map(|_| rng.gen_range(1..=max_id).to_string()).collect::<Vec<_>>().join(",")
        };
        let updated = pg
            .execute(
                &format!(
                    "UPDATE engagement_events SET duration_ms = coalesce(duration_ms, 0) + 1000 WHERE id IN ({})",
                    ids(&mut rng, 150)
                ),
                &[],
            )
            .await
            .unwrap();
        let moved_to = &contents[rng.gen_range(0..contents.len())];
        let moved = pg
            .execute(
                &format!(
                    "UPDATE engagement_events SET content_id = '{moved_to}', event_ts = now() WHERE id IN ({})",
                    ids(&mut rng, 20)
                ),
                &[],
            )
            .await
            .unwrap();
        let deleted = pg
            .execute(&format!("DELETE FROM engagement_events WHERE id IN ({})", ids(&mut rng, 50)), &[])
            .await
            .unwrap();
        changes.fetch_add(n + updated + moved + deleted, Ordering::Relaxed);
        // Paced so the kills land while changes are still being written.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_and_every_sink_ends_exact() {
    let v = pg_versions()[0].clone();
    let mut t = TestEnv::new(&v).await;
    t.cfg.redis.stream_maxlen = 10_000_000;
    let dir = std::env::temp_dir().join(&t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pgfanout.toml");
    std::fs::write(&config, toml::to_string(&t.cfg).unwrap()).unwrap();
    let log = dir.join("pgfanout.log");

    let contents: Vec<String> = (1..=20).map(|i| format!("00000000-0000-0000-0000-{i:012}")).collect();
    for (i, id) in contents.iter().enumerate() {
        let kind = ["podcast", "newsletter", "video"][i % 3];
        t.pg.execute(
            "INSERT INTO content VALUES ($1::text::uuid, $2, $3, $4, $5, now())",
            &[id, &format!("c{i}"), &format!("Content {i}"), &kind, &(600 + 60 * i as i32)],
        )
        .await
        .unwrap();
    }

    let mut child = spawn_sidecar(&config, &log);
    let done = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (done, changes, contents) = (done.clone(), changes.clone(), contents.clone());
        let url = t.cfg.source.url.expose().to_string();
        tokio::spawn(async move {
            let pg = pgfanout::source::slot::connect(&url).await.unwrap();
            workload(&pg, &contents, &done, &changes).await;
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2_500))).await;
        child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
        child.wait().unwrap();
        eprintln!("kill {kill}: after {} changes", changes.load(Ordering::Relaxed));
        child = spawn_sidecar(&config, &log);
    }
    writer.await.unwrap();
    let total = changes.load(Ordering::Relaxed);
    eprintln!("workload done: {total} changes");

    let pg_count: i64 = t.pg.query_one("SELECT count(*) FROM engagement_events", &[]).await.unwrap().get(0);
    let redis_keys: Vec<String> = ["podcast", "newsletter", "video", "unknown"]
        .iter()
        .map(|k| format!("{}stream:{k}", t.cfg.redis.key_prefix))
        .collect();
    let redis = t.redis.clone();
    wait_until("every sink caught up", Duration::from_secs(300), || {
        let (t, redis, keys) = (&t, redis.clone(), redis_keys.clone());
        async move {
            let ch = t.ch_count("SELECT count() FROM enriched_engagements FINAL").await;
            let mut r = redis;
            let mut streamed = 0u64;
            for k in &keys {
                streamed += r.xlen::<_, u64>(k).await.unwrap();
            }
            ch == pg_count as u64 && streamed == total
        }
    })
    .await;

    // ClickHouse: the same rows with the same values.
    let pg_sum: i64 =
        t.pg.query_one("SELECT coalesce(sum(duration_ms), 0)::int8 FROM engagement_events", &[]).await.unwrap().get(0);
    let ch_sum = t.ch_count("SELECT toUInt64(sum(ifNull(duration_ms, 0))) FROM enriched_engagements FINAL").await;
    assert_eq!(ch_sum, pg_sum as u64, "ClickHouse duration sum");
    let moved_ok = t
        .ch_count("SELECT count() FROM enriched_engagements FINAL WHERE content_slug = '' OR engagement_seconds IS NULL AND duration_ms IS NOT NULL")
        .await;
    assert_eq!(moved_ok, 0, "every event enriched with its content");

    // HTTP: every change exactly once by event id, no batch key applied twice.
    let events = t.http_get("_events").await;
    let mut ids: HashMap<String, u32> = HashMap::new();
    for e in events.as_array().unwrap() {
        *ids.entry(e["id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(ids.len() as u64, total, "HTTP distinct event ids");
    // The receiver de-duplicates by Idempotency-Key alone: replays re-sent exactly the batches
    // posted before (src/sinks/http.rs), so no event was applied twice and no key changed body.
    assert_eq!(events.as_array().unwrap().len() as u64, total, "HTTP events applied");
    let stats = t.http_get("_stats").await;
    assert_eq!(stats["conflicts"], 0, "a webhook key re-sent with another body: {stats}");

    // Redis: the window's scores equal what PostgreSQL's current rows give.
    let expected: Vec<(String, f64)> =
        t.pg.query(
            "SELECT e.content_id::text, sum(round(e.duration_ms / 1000.0 / c.length_seconds * 100, 2))::float8
             FROM engagement_events e JOIN content c ON c.id = e.content_id
             WHERE e.duration_ms IS NOT NULL GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut r = t.redis.clone();
    let top: HashMap<String, f64> = r
        .zrange_withscores::<_, Vec<(String, f64)>>(format!("{}top:window", t.cfg.redis.key_prefix), 0, -1)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for (content, score) in expected {
        let got = top.get(&content).copied().unwrap_or(0.0);
        assert!(
            (got - score).abs() < 1e-6 * score.abs().max(1.0),
            "top score of {content}: redis {got}, postgres {score}"
        );
    }

    // A clean stop after all that exits 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "SIGTERM exit: {status:?}; log: {}", log.display());
}
