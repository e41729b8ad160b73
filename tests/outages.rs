//! Outages of each downstream service in the middle of a steady workload:
//! ClickHouse, Redis, the HTTP receiver and the broker each stop answering
//! for `PGFANOUT_OUTAGE_SECS` (default 30 s) while PostgreSQL keeps taking
//! a few thousand changes over ~40 s, then come back. The sidecar runs on
//! without a restart and, at the end, every sink holds every change exactly
//! once; meanwhile the slot is never acknowledged past a change the stopped
//! service lacks, and memory stays bounded.
//!
//! A stopped service is SIGSTOPped (it hangs with its sockets open: the
//! hardest case for a client) on a private instance, so tests running in
//! parallel are not disturbed; the HTTP receiver is held on the test's path
//! instead (it answers 503). ClickHouse is, after it resumes, also killed
//! and restarted on the same port (same data dir) while writes go on, so
//! the sink meets dead pooled connections and refused connects too.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfanout::source::Lsn;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use support::private::PrivateService;
use support::{logs, pg_versions, wait_until, workload, TestEnv};

/// How long the service is down; `PGFANOUT_OUTAGE_SECS=10` for a quick run.
const DEFAULT_OUTAGE_SECS: u64 = 30;
/// The workload runs this long before the outage and after it.
const BEFORE_OUTAGE: Duration = Duration::from_secs(5);
const AFTER_OUTAGE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(100);
const INSERTS_PER_TICK: usize = 10;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The test process holds the in-process sidecar and the test's clients.
const RSS_LIMIT_KB: u64 = 400 * 1024;
const CATCH_UP: Duration = Duration::from_secs(180);

fn outage_duration() -> Duration {
    let secs = std::env::var("PGFANOUT_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_OUTAGE_SECS);
    Duration::from_secs(secs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    ClickHouse,
    Redis,
    Http,
    Broker,
}

const CONTENT: [(&str, Option<&str>, Option<i32>); 8] = [
    ("00000000-0000-0000-0000-00000000c001", Some("podcast"), Some(1200)),
    ("00000000-0000-0000-0000-00000000c002", Some("podcast"), Some(600)),
    ("00000000-0000-0000-0000-00000000c003", Some("newsletter"), Some(300)),
    ("00000000-0000-0000-0000-00000000c004", Some("newsletter"), None),
    ("00000000-0000-0000-0000-00000000c005", Some("video"), Some(3600)),
    ("00000000-0000-0000-0000-00000000c006", Some("video"), Some(0)),
    ("00000000-0000-0000-0000-00000000c007", None, Some(900)),
    ("00000000-0000-0000-0000-00000000c008", Some("podcast"), Some(45)),
];

/// What the workload wrote: every insert statement with the moment it was
/// sent and the ids it created, and how many row changes it made in all.
#[derive(Default)]
struct Written {
    inserts: Vec<(Instant, Vec<i64>)>,
    changes: u64,
}

/// Inserts, updates (some moving the event to other content) and deletes,
/// one autocommit statement at a time, until `until`.
async fn mixed_writes(pg: tokio_postgres::Client, until: Instant) -> Written {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alive: Vec<i64> = Vec::new();
    let mut out = Written::default();
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let values: Vec<String> = (0..INSERTS_PER_TICK)
            .map(|_| {
                let content = CONTENT[rng.gen_range(0..CONTENT.len())].0;
                let duration = workload::nullable_duration(&mut rng);
                let user = uuid::Uuid::from_u128(rng.gen());
                format!("('{content}', '{user}', 'play', now(), {duration}, 'web')")
            })
            .collect();
        let sent = Instant::now();
        let rows = pg
            .query(
                &format!(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) \
                     VALUES {} RETURNING id",
                    values.join(",")
                ),
                &[],
            )
            .await
            .expect("workload insert");
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        out.changes += ids.len() as u64;
        alive.extend(&ids);
        out.inserts.push((sent, ids));
        let pick = |rng: &mut rand::rngs::StdRng, alive: &[i64], k: usize| {
            (0..k).map(|_| alive[rng.gen_range(0..alive.len())].to_string()).collect::<Vec<_>>().join(",")
        };
        if n % 5 == 0 {
            let ids = pick(&mut rng, &alive, 3);
            out.changes += pg.execute(&workload::lengthen(&ids, 1000), &[]).await.expect("workload update");
        }
        if n % 20 == 0 {
            let ids = pick(&mut rng, &alive, 2);
            let to = CONTENT[rng.gen_range(0..CONTENT.len())].0;
            out.changes += pg.execute(&workload::move_to(to, &ids), &[]).await.expect("workload move");
        }
        if n % 10 == 0 {
            let id = alive.swap_remove(rng.gen_range(0..alive.len()));
            out.changes += pg.execute(&workload::delete(&id.to_string()), &[]).await.expect("workload delete");
        }
    }
    out
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Every entry of the test's Redis streams: (stream length sum, entry ids).
async fn redis_stream_ids(t: &TestEnv) -> (u64, Vec<String>) {
    let mut r = t.redis();
    let keys: Vec<String> =
        r.keys(format!("{}stream:*", t.cfg.redis.as_ref().unwrap().key_prefix)).await.expect("redis KEYS");
    let mut total = 0;
    let mut ids = Vec::new();
    for k in keys {
        total += r.xlen::<_, u64>(&k).await.expect("XLEN");
        let reply: redis::streams::StreamRangeReply = r.xrange_all(&k).await.expect("XRANGE");
        for entry in reply.ids {
            ids.push(entry.get::<String>("id").expect("stream entry has an id field"));
        }
    }
    (total, ids)
}

async fn pg_count_and_sum(t: &TestEnv) -> (u64, i64) {
    let row =
        t.pg.query_one("SELECT count(*), coalesce(sum(duration_ms), 0)::int8 FROM engagement_events", &[])
            .await
            .unwrap();
    (row.get::<_, i64>(0) as u64, row.get(1))
}

async fn ch_count_and_sum(t: &TestEnv) -> Option<(u64, i64)> {
    t.ch()
        .query("SELECT count(), toInt64(coalesce(sum(duration_ms), 0)) FROM enriched_engagements FINAL")
        .fetch_one::<(u64, i64)>()
        .await
        .ok()
}

async fn outage(target: Target) {
    let logs = logs::capture();
    let v = pg_versions()[0].clone();
    let mut t = TestEnv::new(&v).await;
    let mut service = match target {
        Target::ClickHouse => Some(PrivateService::clickhouse().await),
        Target::Redis => Some(PrivateService::redis().await),
        Target::Broker => Some(PrivateService::tansu().await),
        Target::Http => None,
    };
    match (target, &service) {
        (Target::ClickHouse, Some(s)) => t.use_private_clickhouse(s).await,
        (Target::Redis, Some(s)) => t.use_private_redis(s).await,
        (Target::Broker, Some(s)) => t.use_private_broker(s).await,
        _ => {}
    }
    let content: Vec<String> = CONTENT
        .iter()
        .enumerate()
        .map(|(i, (id, ty, len))| {
            let ty = ty.map(|s| format!("'{s}'")).unwrap_or("NULL".into());
            let len = len.map(|l| l.to_string()).unwrap_or("NULL".into());
            format!("('{id}', 'slug-{i}', 'Title {i}', {ty}, {len}, now())")
        })
        .collect();
    t.pg.batch_execute(&format!("INSERT INTO content VALUES {}", content.join(","))).await.unwrap();
    t.start();
    let settled = t.wal_insert_lsn().await;
    wait_until("the slot caught up with the content rows", CATCH_UP, || async {
        t.confirmed_flush_lsn().await >= settled
    })
    .await;

    let outage = outage_duration();
    let max_rss = Arc::new(AtomicU64::new(rss_kb()));
    let sampling = Arc::new(AtomicBool::new(true));
    let rss_task = {
        let (max_rss, sampling) = (max_rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                max_rss.fetch_max(rss_kb(), Ordering::Relaxed);
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    let started = Instant::now();
    let until = started + BEFORE_OUTAGE + outage + AFTER_OUTAGE;
    let writer = workload::spawn(&t, move |pg, _| mixed_writes(pg, until));
    tokio::time::sleep(BEFORE_OUTAGE).await;

    // The outage.
    match (target, &service) {
        (Target::Http, _) => t.http_control(serde_json::json!({"hold": true})).await,
        (_, Some(s)) => s.stop(),
        _ => unreachable!(),
    }
    let stopped_at = Instant::now();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut http_during = 0;
    while stopped_at.elapsed() < outage {
        samples.push((stopped_at.elapsed(), t.confirmed_flush_lsn().await));
        if target == Target::Http {
            http_during = t.http_get("_stats").await["events"].as_u64().unwrap();
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    match (target, &service) {
        (Target::Http, _) => t.http_control(serde_json::json!({"hold": false})).await,
        (_, Some(s)) => s.resume(),
        _ => unreachable!(),
    }
    let resumed_at = Instant::now();
    // How long the sidecar takes to work off the outage's backlog: until the
    // slot passes what PostgreSQL had written when the service came back.
    let backlog_end = t.wal_insert_lsn().await;
    let caught_up = {
        let (url, slot) = (t.cfg.source.url.expose().to_string(), t.cfg.source.slot.clone());
        tokio::spawn(async move {
            let pg = pgfanout::source::slot::connect(&url).await.expect("catch-up probe connection");
            loop {
                let s = pgfanout::source::slot::state(&pg, &slot).await.unwrap();
                if s.and_then(|s| s.confirmed_flush_lsn).unwrap_or(0) >= backlog_end {
                    return resumed_at.elapsed();
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    eprintln!("{target:?}: down for {:?}, {} flush-LSN samples", resumed_at - stopped_at, samples.len());
    if target == Target::ClickHouse {
        // And a crash: killed and restarted on the same port (same data dir)
        // while the workload goes on; pooled connections now point at a dead server.
        tokio::time::sleep(Duration::from_secs(2)).await;
        service.as_mut().unwrap().restart().await;
        eprintln!("ClickHouse: killed and restarted");
    }

    let written = writer.finish().await;
    let end = t.wal_insert_lsn().await;
    let (pg_rows, pg_sum) = pg_count_and_sum(&t).await;
    let changes = written.changes;
    eprintln!(
        "{target:?}: workload wrote {changes} changes ({} inserts) in {:?}; PostgreSQL holds {pg_rows} rows",
        written.inserts.iter().map(|(_, ids)| ids.len()).sum::<usize>(),
        started.elapsed()
    );

    wait_until("ClickHouse holds what PostgreSQL holds", CATCH_UP, || async {
        ch_count_and_sum(&t).await == Some((pg_rows, pg_sum))
    })
    .await;
    wait_until("Redis streams hold every change", CATCH_UP, || async { redis_stream_ids(&t).await.0 >= changes }).await;
    wait_until("the HTTP receiver holds every change", CATCH_UP, || async {
        t.http_get("_stats").await["events"].as_u64().unwrap() >= changes
    })
    .await;
    wait_until("the slot acknowledged everything", CATCH_UP, || async { t.confirmed_flush_lsn().await >= end }).await;
    let caught_up = caught_up.await.expect("catch-up probe");
    sampling.store(false, Ordering::Relaxed);
    rss_task.await.unwrap();
    assert!(t.pipeline_is_running(), "{target:?}: the sidecar stopped; it must ride the outage out");

    // Exactly once, everywhere.
    let uniq = t.ch_count("SELECT uniqExact(event_id) FROM enriched_engagements FINAL").await;
    assert_eq!(uniq, pg_rows, "{target:?}: ClickHouse FINAL has duplicate or missing event ids");
    let (stream_total, stream_ids) = redis_stream_ids(&t).await;
    let distinct: HashSet<&String> = stream_ids.iter().collect();
    assert_eq!(
        (stream_total, distinct.len() as u64),
        (changes, changes),
        "{target:?}: Redis stream entries (total, distinct ids) vs changes"
    );
    let events = t.http_get("_events").await;
    let events = events.as_array().unwrap();
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        (events.len() as u64, ids.len() as u64),
        (changes, changes),
        "{target:?}: HTTP events (applied, distinct ids) vs changes"
    );
    let stats = t.http_get("_stats").await;
    assert_eq!(stats["keys"], stats["batches"], "{target:?}: a batch key applied twice: {stats}");
    assert_eq!(stats["rejected"], 0, "{target:?}: {stats}");

    // The slot held back while the service was down: never past the first
    // transaction committed after it stopped, which it cannot have had. Its
    // commit LSN is the one in its events' ids (`<commit LSN>/<ordinal>`).
    let (sent, first_ids) =
        written.inserts.iter().find(|(sent, _)| *sent >= stopped_at).expect("the workload wrote during the outage");
    let first_event = events
        .iter()
        .find(|e| e["op"] == "c" && e["event"]["event_id"] == first_ids[0])
        .unwrap_or_else(|| panic!("{target:?}: event {} not delivered", first_ids[0]));
    let id = first_event["id"].as_str().unwrap();
    let commit_lsn = Lsn::parse(id.split('/').take(2).collect::<Vec<_>>().join("/").as_str()).unwrap().0;
    for (at, lsn) in &samples {
        assert!(
            *lsn <= commit_lsn,
            "{target:?}: {at:?} into the outage the slot was acknowledged at {} past {} (commit of event {}, sent {:?} after the stop), which the stopped service lacked",
            Lsn(*lsn).to_pg_string(),
            Lsn(commit_lsn).to_pg_string(),
            first_ids[0],
            *sent - stopped_at,
        );
    }
    let held_at = samples.last().map(|s| s.1).unwrap_or(0);
    if target == Target::Http {
        assert!(http_during < changes, "{target:?}: the held receiver applied events");
    }

    let max_rss = max_rss.load(Ordering::Relaxed);
    assert!(max_rss < RSS_LIMIT_KB, "{target:?}: RSS reached {} MB", max_rss / 1024);

    // The outage is visible to an operator, not a silent stall.
    let expect_warning = match target {
        Target::ClickHouse => (outage > pgfanout::sinks::clickhouse::REQUEST_TIMEOUT + Duration::from_secs(2))
            .then_some(["sink=\"clickhouse\"", "retrying"]),
        // Redis's client gives a script 30 s (src/sinks/redis.rs) before it
        // retries; the broker's client retries inside librdkafka, unlogged.
        Target::Redis => (outage > Duration::from_secs(32)).then_some(["sink=\"redis\"", "retrying"]),
        Target::Http => Some(["sink=\"http\"", "retrying"]),
        Target::Broker => None,
    };
    let warnings = |needles: &[&str]| logs.lines_with(needles).len();
    if let Some(needles) = expect_warning {
        assert!(warnings(&needles) > 0, "{target:?}: the outage left no warning in the log");
    }
    eprintln!(
        "{target:?}: PG {v}, {changes} changes, outage {outage:?}, backlog worked off {caught_up:?} after the service came back, \
         slot held at {} (first change lacked committed at {}), max RSS {} MB, http duplicates {}, retry warnings: ch {} redis {} http {} broker {}",
        Lsn(held_at).to_pg_string(),
        Lsn(commit_lsn).to_pg_string(),
        max_rss / 1024,
        stats["duplicates"],
        warnings(&["sink=\"clickhouse\"", "retrying"]),
        warnings(&["sink=\"redis\"", "retrying"]),
        warnings(&["sink=\"http\"", "retrying"]),
        warnings(&["broker", "retrying"]),
    );
    t.stop().await;
    drop(service);
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_outage_loses_nothing_and_holds_the_slot() {
    outage(Target::ClickHouse).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_loses_nothing_and_holds_the_slot() {
    outage(Target::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_receiver_outage_loses_nothing_and_holds_the_slot() {
    outage(Target::Http).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_outage_loses_nothing_and_holds_the_slot() {
    outage(Target::Broker).await;
}
