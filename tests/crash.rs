//! Exactly-once in effect: a mixed workload of inserts, updates and deletes
//! while the sidecar is SIGKILLed at random moments and restarted; at the
//! end every sink holds exactly what PostgreSQL holds.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use support::topics::read_topic;
use support::workload::{self, Progress};
use support::{pg_versions, wait_until, Sidecar, TestEnv};

const TARGET_CHANGES: u64 = 100_000;
const KILLS: usize = 10;

/// Every event write also records, in the same statement (so as of the same
/// commit), what PostgreSQL's own join gives for the rows it wrote, in
/// `expected` (not published): the values every sink must end with.
const EXPECTED_TABLE: &str = "CREATE TABLE expected (
    event_id bigint PRIMARY KEY, content_id uuid, event_ts timestamptz, slug text, content_type text,
    length_seconds int, pct numeric)";

/// Wraps an event write returning `id, content_id, event_ts, duration_ms`
/// so that it also upserts `expected`; returns the rows written.
fn recorded(write: &str) -> String {
    format!(
        "WITH w AS ({write} RETURNING id, content_id, event_ts, duration_ms),
         x AS (INSERT INTO expected SELECT w.id, w.content_id, w.event_ts, c.slug, c.content_type, c.length_seconds,
                 round(w.duration_ms / 1000.0 / nullif(c.length_seconds, 0) * 100, 2)
               FROM w LEFT JOIN content c ON c.id = w.content_id
               ON CONFLICT (event_id) DO UPDATE SET content_id = EXCLUDED.content_id, event_ts = EXCLUDED.event_ts,
                 slug = EXCLUDED.slug, content_type = EXCLUDED.content_type,
                 length_seconds = EXCLUDED.length_seconds, pct = EXCLUDED.pct)
         SELECT count(*)::int8 FROM w"
    )
}

/// Writes at least TARGET_CHANGES row changes to engagement_events (each is
/// one change in the stream) while the content they point at is updated,
/// deleted and re-created now and then.
async fn mixed_writes(pg: tokio_postgres::Client, contents: Vec<String>, progress: Arc<Progress>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut max_id = 0i64;
    let pg = &pg;
    let count = |sql: String| async move { pg.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) as u64 };
    let mut round = 0u64;
    while progress.changes() < TARGET_CHANGES {
        round += 1;
        let values: Vec<String> = (0..400)
            .map(|_| {
                let content = &contents[rng.gen_range(0..contents.len())];
                let duration = match rng.gen_range(0..20) {
                    0 | 1 => "NULL".to_string(),
                    // Exact ties of the 2-decimal rounding (x.xx5) on 600 s items.
                    2 => (rng.gen_range(0..1000) * 60 + 30).to_string(),
                    _ => rng.gen_range(0..900_000).to_string(),
                };
                workload::play(content, &duration)
            })
            .collect();
        let n = count(recorded(&workload::insert_plays(&values))).await;
        max_id += n as i64;
        let updated = count(recorded(&workload::lengthen(&workload::random_ids(&mut rng, max_id, 150), 1000))).await;
        let moved_to = &contents[rng.gen_range(0..contents.len())];
        let moved = count(recorded(&format!(
            "UPDATE engagement_events SET content_id = '{moved_to}', event_ts = now() WHERE id IN ({})",
            workload::random_ids(&mut rng, max_id, 20)
        )))
        .await;
        let deleted = count(format!(
            "WITH w AS (DELETE FROM engagement_events WHERE id IN ({}) RETURNING id),
             x AS (DELETE FROM expected WHERE event_id IN (SELECT id FROM w))
             SELECT count(*)::int8 FROM w",
            workload::random_ids(&mut rng, max_id, 50)
        ))
        .await;
        // The content the events join changes while they stream: a new
        // length and type, or (every 7th round) gone until the next round.
        let content = &contents[rng.gen_range(0..contents.len())];
        let kind = ["podcast", "newsletter", "video"][rng.gen_range(0..3)];
        if round % 7 == 0 {
            pg.execute(&format!("DELETE FROM content WHERE id = '{content}'"), &[]).await.unwrap();
        } else {
            pg.execute(
                &format!(
                    "INSERT INTO content VALUES ('{content}', 'c-{content}', 'Content {round}', '{kind}', {len}, now())
                     ON CONFLICT (id) DO UPDATE SET length_seconds = EXCLUDED.length_seconds,
                       content_type = EXCLUDED.content_type, title = EXCLUDED.title",
                    len = rng.gen_range(0..3) * 300 + 300
                ),
                &[],
            )
            .await
            .unwrap();
        }
        progress.add(n + updated + moved + deleted);
        // Paced so the kills land while changes are still being written.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The enriched fields every sink must hold for one event.
#[derive(Debug, Clone, PartialEq)]
struct Values {
    content_id: Option<String>,
    slug: Option<String>,
    content_type: Option<String>,
    length_seconds: Option<i32>,
    /// Hundredths of a percent (exact).
    pct_hundredths: Option<i64>,
}

fn hundredths(p: Option<f64>) -> Option<i64> {
    p.map(|p| (p * 100.0).round() as i64)
}

fn values_of_json(e: &serde_json::Value) -> Values {
    let s = |k: &str| e[k].as_str().map(str::to_string);
    Values {
        content_id: s("content_id"),
        slug: s("content_slug"),
        content_type: s("content_type"),
        length_seconds: e["length_seconds"].as_i64().map(|l| l as i32),
        pct_hundredths: hundredths(e["engagement_percent"].as_f64()),
    }
}

/// `<commit LSN>/<ordinal>` (an event id) as a sortable pair.
fn position_of(id: &str) -> (u64, u64) {
    let (lsn, ordinal) = id.rsplit_once('/').expect("event id");
    (pgfanout::source::Lsn::parse(lsn).expect("event id LSN").0, ordinal.parse().expect("event id ordinal"))
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ChValues {
    event_id: u64,
    content_id: String,
    content_slug: String,
    content_type: String,
    length_seconds: Option<i32>,
    engagement_percent: Option<f64>,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct DailyAvg {
    date: String,
    content_type: String,
    rows: u64,
    hundredths: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_and_every_sink_ends_exact() {
    let v = pg_versions()[0].clone();
    let t = TestEnv::builder(&v)
        .with(|cfg| {
            cfg.redis.as_mut().unwrap().stream_maxlen = 10_000_000;
            // Several partitions: each one's tail is found and kept apart.
            cfg.log.partitions = 3;
        })
        .build()
        .await;
    let config = t.write_config(&t.cfg, "pgfanout");

    t.pg.batch_execute(&format!(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey; {EXPECTED_TABLE}"
    ))
    .await
    .unwrap();
    let contents: Vec<String> = (1..=20).map(|i| format!("00000000-0000-0000-0000-{i:012}")).collect();
    for (i, id) in contents.iter().enumerate() {
        let kind = ["podcast", "newsletter", "video"][i % 3];
        t.pg.execute(
            "INSERT INTO content VALUES ($1::text::uuid, $2, $3, $4, $5, now())",
            &[id, &format!("c-{id}"), &format!("Content {i}"), &kind, &600],
        )
        .await
        .unwrap();
    }

    let mut sidecar = Sidecar::spawn(&config);
    let writer = {
        let contents = contents.clone();
        workload::spawn(&t, move |pg, progress| mixed_writes(pg, contents, progress))
    };

    sidecar.kill_at_random(KILLS, 300..2_500, 11, || writer.changes()).await;
    let progress = writer.progress();
    writer.finish().await;
    let total = progress.changes();
    eprintln!("workload done: {total} changes");

    let pg_count: i64 = t.pg.query_one("SELECT count(*) FROM engagement_events", &[]).await.unwrap().get(0);
    let redis_keys: Vec<String> = ["podcast", "newsletter", "video", "unknown"]
        .iter()
        .map(|k| format!("{}stream:{k}", t.cfg.redis.as_ref().unwrap().key_prefix))
        .collect();
    let redis = t.redis();
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

    // What PostgreSQL computed for each live event as of its last change's commit.
    let expected: HashMap<i64, Values> =
        t.pg.query(
            "SELECT event_id, content_id::text, slug, content_type, length_seconds, (pct * 100)::int8 FROM expected",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let values = Values {
                content_id: r.get(1),
                slug: r.get(2),
                content_type: r.get(3),
                length_seconds: r.get(4),
                pct_hundredths: r.get(5),
            };
            (r.get::<_, i64>(0), values)
        })
        .collect();
    assert_eq!(expected.len() as i64, pg_count);

    // ClickHouse: every event with the values of its own commit.
    let pg_sum: i64 =
        t.pg.query_one("SELECT coalesce(sum(duration_ms), 0)::int8 FROM engagement_events", &[]).await.unwrap().get(0);
    let ch_sum = t.ch_count("SELECT toUInt64(sum(ifNull(duration_ms, 0))) FROM enriched_engagements FINAL").await;
    assert_eq!(ch_sum, pg_sum as u64, "ClickHouse duration sum");
    let rows = t.ch_rows::<ChValues>("SELECT event_id, toString(content_id) AS content_id, content_slug, content_type, length_seconds, engagement_percent FROM enriched_engagements FINAL").await;
    let opt = |s: String| (!s.is_empty()).then_some(s);
    let mut wrong = 0;
    for r in rows {
        let got = Values {
            content_id: Some(r.content_id),
            slug: opt(r.content_slug),
            content_type: opt(r.content_type),
            length_seconds: r.length_seconds,
            pct_hundredths: hundredths(r.engagement_percent),
        };
        let want = expected.get(&(r.event_id as i64));
        if want != Some(&got) {
            wrong += 1;
            if wrong <= 5 {
                eprintln!("ClickHouse event {}: {got:?}, PostgreSQL as of commit {want:?}", r.event_id);
            }
        }
    }
    assert_eq!(wrong, 0, "ClickHouse rows whose enriched values differ from PostgreSQL's as of their commit");

    // The analysts' 30-day query, in exact hundredths, on both sides.
    let ch_daily = t
        .ch_rows::<DailyAvg>(
            "SELECT toString(toDate(event_ts)) AS date, content_type, count(engagement_percent) AS rows,
                    toInt64(ifNull(sum(round(engagement_percent * 100)), 0)) AS hundredths
             FROM enriched_engagements FINAL WHERE event_ts >= now() - INTERVAL 30 DAY
             GROUP BY date, content_type ORDER BY date DESC, content_type",
        )
        .await;
    let pg_daily: Vec<(String, String, i64, i64)> =
        t.pg.query(
            "SELECT (event_ts AT TIME ZONE 'UTC')::date::text, coalesce(content_type, ''), count(pct)::int8,
                    coalesce(sum(pct * 100), 0)::int8
             FROM expected WHERE event_ts >= now() - interval '30 days'
             GROUP BY 1, 2 ORDER BY 1 DESC, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let ch_daily: Vec<(String, String, i64, i64)> =
        ch_daily.into_iter().map(|d| (d.date, d.content_type, d.rows as i64, d.hundredths)).collect();
    assert_eq!(ch_daily, pg_daily, "the 30-day query: ClickHouse against PostgreSQL as of each commit");

    // HTTP: every change exactly once by event id, and each live event's
    // latest change carries the values of its commit.
    let events = t.http_get("_events").await;
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut latest: HashMap<i64, ((u64, u64), Values)> = HashMap::new();
    for e in events.as_array().unwrap() {
        let id = e["id"].as_str().unwrap();
        *ids.entry(id.to_string()).or_default() += 1;
        let Some(event_id) = e["event"]["event_id"].as_i64() else { continue };
        let pos = position_of(id);
        if latest.get(&event_id).is_none_or(|(p, _)| *p < pos) {
            latest.insert(event_id, (pos, values_of_json(&e["event"])));
        }
    }
    assert_eq!(ids.len() as u64, total, "HTTP distinct event ids");
    let wrong = expected.iter().filter(|(id, want)| latest.get(id).map(|(_, v)| v) != Some(want)).count();
    assert_eq!(wrong, 0, "HTTP: live events whose latest change differs from PostgreSQL's as of its commit");
    // The receiver de-duplicates by Idempotency-Key alone: replays re-sent exactly the batches
    // posted before (src/sinks/http.rs), so no event was applied twice and no key changed body.
    assert_eq!(events.as_array().unwrap().len() as u64, total, "HTTP events applied");
    let stats = t.http_get("_stats").await;
    assert_eq!(stats["conflicts"], 0, "a webhook key re-sent with another body: {stats}");

    // Redis streams: the same for each event's latest entry, which sits in
    // the stream of its own content type.
    // Its own connection with a patient response timeout: on a loaded
    // machine a page of big entries outlasts the default one.
    let mut r = redis::Client::open(t.cfg.redis.as_ref().unwrap().url.expose())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60))),
        )
        .await
        .unwrap();
    let mut latest: HashMap<i64, ((u64, u64), Values)> = HashMap::new();
    for k in &redis_keys {
        let stream_type = k.rsplit(':').next().unwrap();
        // In pages: one XRANGE of a whole stream outlasts the client's response timeout.
        let mut entries = Vec::new();
        let mut from = "-".to_string();
        loop {
            let page: redis::streams::StreamRangeReply = r.xrange_count(k, &from, "+", 1_000).await.unwrap();
            let Some(last) = page.ids.last() else { break };
            from = format!("({}", last.id);
            entries.extend(page.ids);
        }
        for entry in entries {
            let doc: serde_json::Value = serde_json::from_str(&entry.get::<String>("data").unwrap()).unwrap();
            let Some(event_id) = doc["event"]["event_id"].as_i64() else { continue };
            let values = values_of_json(&doc["event"]);
            assert_eq!(values.content_type.as_deref().unwrap_or("unknown"), stream_type, "stream of event {event_id}");
            let pos = position_of(doc["id"].as_str().unwrap());
            if latest.get(&event_id).is_none_or(|(p, _)| *p < pos) {
                latest.insert(event_id, (pos, values));
            }
        }
    }
    let wrong = expected.iter().filter(|(id, want)| latest.get(id).map(|(_, v)| v) != Some(want)).count();
    assert_eq!(wrong, 0, "Redis: live events whose latest stream entry differs from PostgreSQL's as of its commit");

    // Redis window: each member's score is the sum over its live events of
    // what they counted as of their commit.
    let window: Vec<(String, i64)> =
        t.pg.query(
            "SELECT content_id::text, sum(pct * 100)::int8 FROM expected
             WHERE pct IS NOT NULL AND event_ts >= now() - make_interval(secs => $1) GROUP BY 1",
            &[&(t.cfg.redis.as_ref().unwrap().top_window_secs as f64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let top: HashMap<String, f64> = r
        .zrange_withscores::<_, Vec<(String, f64)>>(
            format!("{}top:window", t.cfg.redis.as_ref().unwrap().key_prefix),
            0,
            -1,
        )
        .await
        .unwrap()
        .into_iter()
        .collect();
    for (content, score) in window {
        let got = hundredths(top.get(&content).copied());
        assert_eq!(got.unwrap_or(0), score, "top score of {content} (hundredths): Redis against PostgreSQL");
    }

    // The log: each change once (a restart replays from the slot's
    // confirmed position, which is behind what reached the broker), each
    // delete followed by its tombstone, so compaction keeps exactly the
    // live rows (the test broker does not compact: its rule is applied here).
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    // Every inserted row has a sequence value and none was rolled back, so
    // the deleted rows (one tombstone each) are the inserted ones not live.
    let inserted: i64 = t.pg.query_one("SELECT last_value FROM engagement_events_id_seq", &[]).await.unwrap().get(0);
    let records = total + (inserted - pg_count) as u64;
    let log = read_topic(&t, &topic, Duration::from_secs(180), |r| r.len() as u64 >= records).await;
    let mut seen: HashMap<(String, String), u32> = HashMap::new();
    for r in &log {
        *seen.entry((r.headers["pgfanout.position"].clone(), r.headers["pgfanout.kind"].clone())).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "records the log holds more than once (of {}): {twice:?}", log.len());
    let changes = seen.keys().filter(|(_, k)| k == "change").count() as u64;
    assert_eq!(changes, total, "changes in the log");
    let deletes = log.iter().filter(|r| r.payload["op"] == "d").count();
    let tombstones = log.iter().filter(|r| r.payload.is_null()).count();
    assert_eq!(tombstones, deletes, "a tombstone for each delete");
    let mut compacted: HashMap<&str, bool> = HashMap::new();
    for r in &log {
        compacted.insert(r.key.as_deref().unwrap(), !r.payload.is_null());
    }
    let mut kept: Vec<i64> = compacted
        .into_iter()
        .filter(|(_, live)| *live)
        .map(|(k, _)| serde_json::from_str::<serde_json::Value>(k).unwrap()["id"].as_i64().unwrap())
        .collect();
    kept.sort_unstable();
    let live: Vec<i64> =
        t.pg.query("SELECT id FROM engagement_events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(kept, live, "the keys a compacted topic keeps are the live rows");

    // A clean stop after all that exits 0.
    let (status, took) = sidecar.terminate(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exit: {status:?} after {took:?}; log: {}", sidecar.log.display());
}
