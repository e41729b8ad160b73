//! `pgfanout snapshot` and `pgfanout backfill` against the real services:
//! an initial load with live writes running, then `run` catching up, with
//! every sink compared to PostgreSQL; a snapshot SIGKILLed half way and
//! resumed; a backfill run twice; a backfill racing updates of its rows.
//!
//! PGFANOUT_SNAPSHOT_EVENTS overrides the 40k events of the snapshot
//! tests: enough for more chunks than workers, a kill with chunks done and
//! chunks left, and live writes all through the snapshot, in a debug build
//! on a busy CI machine. The 1M-event acceptance run is
//! `cargo test --test snapshot -- --ignored` (and benches/snapshot.sh).

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgfanout::commands::backfill::{self, BackfillOptions};
use pgfanout::commands::snapshot::{self, SnapshotOptions, SnapshotOutcome};
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use support::{pg_versions, wait_until, workload, TestEnv};

const STREAMS: [&str; 4] = ["podcast", "newsletter", "video", "unknown"];

fn snapshot_events() -> u64 {
    std::env::var("PGFANOUT_SNAPSHOT_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(40_000)
}

/// A test environment whose slot does not exist yet (the snapshot creates it).
async fn env_without_slot(v: &str) -> TestEnv {
    let mut t = TestEnv::new(v).await;
    // Streams must not trim: their lengths are compared with event counts.
    t.cfg.redis.as_mut().unwrap().stream_maxlen = 100_000_000;
    t.pg.execute("SELECT pg_drop_replication_slot($1)", &[&t.name]).await.unwrap();
    t
}

/// 50 contents (some with NULL or 0 length) and `events` engagement events
/// of the last two minutes, with NULL durations, devices and contents.
async fn load(pg: &tokio_postgres::Client, events: u64) {
    let w = pgfanout::commands::generate::Workload { events: 0, contents: 50, ..Default::default() };
    pgfanout::commands::generate::run(pg, &w).await.unwrap();
    let step = 100_000u64;
    let mut from = 0u64;
    while from < events {
        let to = (from + step).min(events);
        pg.execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
             SELECT CASE WHEN g % 199 = 0 THEN NULL ELSE (ARRAY(SELECT id FROM content ORDER BY id))[1 + g % 50] END,
                    CASE WHEN g % 7 = 0 THEN NULL ELSE gen_random_uuid() END,
                    (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
                    now() - (g % 120) * interval '1 second' - (g % 1000) * interval '1 millisecond',
                    CASE WHEN g % 10 = 0 THEN NULL ELSE (g * 7919) % 600000 END,
                    CASE WHEN g % 20 = 0 THEN NULL ELSE 'dev-' || (g % 5) END,
                    jsonb_build_object('n', g)
             FROM generate_series($1::int8, $2::int8) AS g",
            &[&(from as i64 + 1), &(to as i64)],
        )
        .await
        .unwrap();
        from = to;
    }
}

/// Live writes until stopped: inserts, updates (some moving event_ts),
/// deletes (of rows with ids above `deletes_above`).
fn start_live_writes(t: &TestEnv, deletes_above: i64) -> workload::Writer<()> {
    workload::spawn(t, move |pg, progress| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        while !progress.stopping() {
            let max: i64 =
                pg.query_one("SELECT coalesce(max(id), 1) FROM engagement_events", &[]).await.unwrap().get(0);
            let inserted = pg
                .execute(
                    "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, device)
                     SELECT (ARRAY(SELECT id FROM content ORDER BY id))[1 + g % 50], 'play', now(), g * 100, 'live'
                     FROM generate_series(1, 100) g",
                    &[],
                )
                .await
                .unwrap();
            let updated =
                pg.execute(&workload::lengthen(&workload::random_ids(&mut rng, max, 40), 1), &[]).await.unwrap();
            let moved = pg
                .execute(
                    &format!(
                        "UPDATE engagement_events SET event_ts = event_ts + interval '1 ms' WHERE id IN ({})",
                        workload::random_ids(&mut rng, max, 5)
                    ),
                    &[],
                )
                .await
                .unwrap();
            let deleted = if max > deletes_above {
                let doomed: Vec<String> = (0..5).map(|_| rng.gen_range(deletes_above + 1..=max).to_string()).collect();
                pg.execute(&workload::delete(&doomed.join(",")), &[]).await.unwrap()
            } else {
                0
            };
            progress.add(inserted + updated + moved + deleted);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
struct Totals {
    rows: u64,
    ids: u64,
    duration: i64,
    percent: f64,
}

async fn ch_totals(t: &TestEnv) -> Totals {
    t.ch()
        .query(
            "SELECT count() AS rows, sum(event_id) AS ids, toInt64(sum(ifNull(duration_ms, 0))) AS duration, \
         ifNull(sum(engagement_percent), 0) AS percent FROM enriched_engagements FINAL",
        )
        .fetch_one::<Totals>()
        .await
        .unwrap()
}

async fn pg_totals(t: &TestEnv) -> Totals {
    let r =
        t.pg.query_one(
            // The percentage as the pipeline computes it: in f64, rounded
            // half away from zero (PostgreSQL's float8 round() is half-even).
            "SELECT count(*)::int8, coalesce(sum(e.id), 0)::int8, coalesce(sum(e.duration_ms), 0)::int8,
                    coalesce(sum(sign(p.x) * floor(abs(p.x) + 0.5) / 100.0::float8), 0)::float8
             FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id,
             LATERAL (SELECT e.duration_ms::float8 / 1000.0::float8 / nullif(c.length_seconds, 0)::float8
                             * 100.0::float8 * 100.0::float8 AS x) p",
            &[],
        )
        .await
        .unwrap();
    Totals { rows: r.get::<_, i64>(0) as u64, ids: r.get::<_, i64>(1) as u64, duration: r.get(2), percent: r.get(3) }
}

/// ClickHouse holds exactly PostgreSQL's rows (integer sums are exact; the
/// f64 percentages differ only by summation order).
fn assert_same_totals(ch: &Totals, pg: &Totals, what: &str) {
    assert_eq!((ch.rows, ch.ids, ch.duration), (pg.rows, pg.ids, pg.duration), "{what}: ClickHouse vs PostgreSQL");
    assert!(
        (ch.percent - pg.percent).abs() < 1e-6 * pg.percent.abs().max(1.0),
        "{what}: sum(engagement_percent) {} vs {}",
        ch.percent,
        pg.percent
    );
}

async fn stream_lengths(t: &TestEnv) -> HashMap<&'static str, u64> {
    let mut r = t.redis();
    let mut out = HashMap::new();
    for s in STREAMS {
        out.insert(
            s,
            r.xlen::<_, u64>(format!("{}stream:{s}", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap(),
        );
    }
    out
}

async fn window(t: &TestEnv) -> Vec<(String, f64)> {
    let mut r = t.redis();
    r.zrange_withscores(format!("{}top:window", t.cfg.redis.as_ref().unwrap().key_prefix), 0, -1).await.unwrap()
}

async fn http_events(t: &TestEnv) -> Vec<serde_json::Value> {
    t.http_get("_events").await.as_array().cloned().unwrap_or_default()
}

fn distinct_ids(events: &[serde_json::Value]) -> HashSet<String> {
    events.iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect()
}

/// Waits until the running sidecar has acknowledged everything written so far
/// and ClickHouse holds PostgreSQL's row count. A timeout says how far the
/// acknowledgement got (stuck, or only slow).
async fn caught_up(t: &TestEnv) {
    let started = std::time::Instant::now();
    let end = t.wal_insert_lsn().await;
    let from = t.confirmed_flush_lsn().await;
    let limit = Duration::from_secs(300);
    loop {
        let at = t.confirmed_flush_lsn().await;
        if at >= end {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for the slot to be acknowledged past the last write: {} -> {} of {} \
             ({} of {} bytes; the sidecar delivered {} changes; running: {})",
            pgfanout::source::Lsn(from).to_pg_string(),
            pgfanout::source::Lsn(at).to_pg_string(),
            pgfanout::source::Lsn(end).to_pg_string(),
            at.saturating_sub(from),
            end.saturating_sub(from),
            t.stats.changes.load(Ordering::Relaxed),
            t.pipeline_is_running(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pg_rows = pg_totals(t).await.rows;
    wait_until("ClickHouse holds PostgreSQL's rows", Duration::from_secs(60), || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == pg_rows
    })
    .await;
    eprintln!(
        "PG {}: caught up in {:.1} s ({} bytes of WAL)",
        t.pg_version,
        started.elapsed().as_secs_f64(),
        end.saturating_sub(from)
    );
}

/// Every sink equals PostgreSQL: ClickHouse row for row (totals), each
/// event once in Redis and at the HTTP receiver (Redis entries = distinct
/// HTTP ids), and each row of PostgreSQL introduced by exactly one event
/// (its snapshot read or its streamed insert): no gap, no overlap.
async fn assert_sinks_exact(t: &TestEnv, what: &str) {
    assert_same_totals(&ch_totals(t).await, &pg_totals(t).await, what);
    let events = http_events(t).await;
    let ids = distinct_ids(&events);
    let lengths = stream_lengths(t).await;
    let in_redis: u64 = lengths.values().sum();
    assert_eq!(in_redis, ids.len() as u64, "{what}: Redis stream entries {lengths:?} vs distinct HTTP events");
    let mut origins: HashMap<i64, HashSet<String>> = HashMap::new();
    for e in &events {
        if matches!(e["op"].as_str(), Some("r" | "c")) {
            let row = e["event"]["event_id"].as_i64().unwrap();
            origins.entry(row).or_default().insert(e["id"].as_str().unwrap().to_string());
        }
    }
    let rows: Vec<i64> =
        t.pg.query("SELECT id FROM engagement_events", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let missing = rows.iter().filter(|id| !origins.contains_key(id)).count();
    let doubled: Vec<_> = origins.iter().filter(|(_, ids)| ids.len() > 1).take(5).collect();
    assert_eq!(missing, 0, "{what}: rows with neither a snapshot read nor a streamed insert (gap)");
    assert!(doubled.is_empty(), "{what}: rows introduced twice (overlap): {doubled:?}");
}

async fn snapshot_with_live_writes(v: &str, events: u64) {
    let mut t = env_without_slot(v).await;
    load(&t.pg, events).await;
    let writer = start_live_writes(&t, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // About five chunks of events (more than the workers) at the default
    // size; the 1M-event run keeps the command's default chunk size.
    let chunk_rows = (events / 5).clamp(1_000, 20_000);
    let opts = SnapshotOptions { workers: 2, chunk_rows, ..Default::default() };
    let outcome = snapshot::run(&t.cfg, &opts).await.expect("snapshot");
    let SnapshotOutcome::Loaded { rows, chunks, resumed, seconds } = outcome else { panic!("{outcome:?}") };
    assert!(!resumed);
    assert!(chunks > opts.workers, "PG {v}: {chunks} chunks for {} workers", opts.workers);
    assert!(rows >= events, "PG {v}: snapshot read {rows} rows of {events}");
    eprintln!("PG {v}: snapshot of {rows} rows in {seconds:.1} s ({:.0} rows/s)", rows as f64 / seconds);
    // Writes go on while `run` starts from the slot's consistent point.
    t.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("PG {v}: {} live changes", writer.changes());
    writer.stop().await;
    caught_up(&t).await;
    assert_sinks_exact(&t, &format!("PG {v}")).await;
    // Done is done: a second snapshot does nothing.
    assert_eq!(snapshot::run(&t.cfg, &opts).await.unwrap(), SnapshotOutcome::AlreadyComplete);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_with_live_writes_then_run_every_sink_equals_postgres() {
    for v in pg_versions() {
        snapshot_with_live_writes(&v, snapshot_events()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "1M events: minutes; run with --ignored"]
async fn snapshot_one_million_events() {
    let v = pg_versions().last().cloned().unwrap();
    snapshot_with_live_writes(&v, 1_000_000).await;
}

fn snapshot_command(config: &Path, log: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pgfanout"));
    c.arg("--config").arg(config).args(["snapshot", "--workers", "2", "--chunk-rows", "5000"]);
    c.env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::options().append(true).create(true).open(log).unwrap());
    c
}

async fn chunk_state(t: &TestEnv) -> Vec<(i32, Option<String>)> {
    t.pg.query(
        "SELECT chunk, done_at::text FROM pgfanout_state.snapshot_chunks WHERE slot = $1 ORDER BY chunk",
        &[&t.name],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

async fn sigkill_and_resume(v: &str, events: u64) {
    let mut t = env_without_slot(v).await;
    // Small batches: the kill lands inside chunks, with batches half applied.
    t.cfg.pipeline.batch_max_changes = 1_000;
    let config = t.write_config(&t.cfg, "pgfanout");
    let log = config.with_file_name("snapshot.log");
    load(&t.pg, events).await;
    // Deletes only of rows written live, never of loaded rows: a loaded row
    // deleted after the slot's point is not read again by the resumed chunk,
    // so if the killed attempt had delivered its snapshot event to some sinks
    // and not to others, they would keep differing by that event (the
    // limitation src/source/snapshot.rs describes), and this test compares
    // Redis with HTTP event for event.
    let writer = start_live_writes(&t, events as i64);

    let mut child = snapshot_command(&config, &log).spawn().unwrap();
    wait_until("a few chunks are done", Duration::from_secs(300), || async {
        chunk_state(&t).await.iter().filter(|(_, d)| d.is_some()).count() >= 3
    })
    .await;
    child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
    child.wait().unwrap();
    let before = chunk_state(&t).await;
    let done_before: Vec<_> = before.iter().filter(|(_, d)| d.is_some()).cloned().collect();
    assert!(
        done_before.len() < before.len(),
        "PG {v}: the kill came too late ({} of {} chunks done)",
        done_before.len(),
        before.len()
    );
    eprintln!("PG {v}: killed with {} of {} chunks done", done_before.len(), before.len());

    let resumed_at = std::time::Instant::now();
    let out = snapshot_command(&config, &log).output().unwrap();
    eprintln!("PG {v}: resumed snapshot took {:.1} s", resumed_at.elapsed().as_secs_f64());
    assert!(out.status.success(), "PG {v}: resumed snapshot failed; see {}", log.display());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], true, "PG {v}: {report}");
    let after = chunk_state(&t).await;
    assert!(after.iter().all(|(_, d)| d.is_some()), "PG {v}: chunks left: {after:?}");
    for (chunk, done_at) in &done_before {
        let now = after.iter().find(|(c, _)| c == chunk).map(|(_, d)| d.clone());
        assert_eq!(now, Some(done_at.clone()), "PG {v}: chunk {chunk}, done before the kill, was read again");
    }
    let again = snapshot_command(&config, &log).output().unwrap();
    assert!(again.status.success());
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&again.stdout).unwrap()["already_complete"], true);

    t.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.stop().await;
    caught_up(&t).await;
    assert_sinks_exact(&t, &format!("PG {v}, after SIGKILL and resume")).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_killed_with_sigkill_resumes_from_its_chunks_and_sinks_end_exact() {
    // One major (the newest): the resume logic does not depend on the version.
    let v = pg_versions().last().cloned().unwrap();
    sigkill_and_resume(&v, snapshot_events()).await;
}

fn backfill_today() -> BackfillOptions {
    let now = chrono::Utc::now();
    BackfillOptions {
        table: "engagement_events".into(),
        column: None,
        range: Some((now - chrono::Duration::days(1), now + chrono::Duration::days(1))),
        workers: 2,
        chunk_rows: 3_000,
        log_only: false,
    }
}

#[derive(Debug, PartialEq)]
struct SinkState {
    ch: (u64, u64, i64),
    percent: f64,
    streams: HashMap<&'static str, u64>,
    window: Vec<(String, f64)>,
    http_ids: usize,
}

async fn sink_state(t: &TestEnv) -> SinkState {
    let c = ch_totals(t).await;
    SinkState {
        ch: (c.rows, c.ids, c.duration),
        percent: (c.percent * 100.0).round() / 100.0,
        streams: stream_lengths(t).await,
        window: window(t).await.into_iter().map(|(k, v)| (k, (v * 100.0).round() / 100.0)).collect(),
        http_ids: distinct_ids(&http_events(t).await).len(),
    }
}

async fn backfill_twice(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.cfg.redis.as_mut().unwrap().stream_maxlen = 100_000_000;
    t.start();
    load(&t.pg, 20_000).await;
    caught_up(&t).await;
    let s0 = sink_state(&t).await;
    assert_eq!(s0.http_ids, 20_000, "PG {v}: streamed");

    let first = backfill::run(&t.cfg, &backfill_today()).await.expect("backfill");
    assert_eq!(first.rows, 20_000);
    let s1 = sink_state(&t).await;
    assert_eq!((s1.ch, s1.percent), (s0.ch, s0.percent), "PG {v}: ClickHouse after the first backfill");
    assert_eq!(s1.window, s0.window, "PG {v}: a backfill leaves the 10-minute window alone");
    assert_eq!(
        s1.streams.values().sum::<u64>(),
        s0.streams.values().sum::<u64>() + 20_000,
        "PG {v}: one re-delivered event per row"
    );
    assert_eq!(s1.http_ids, 40_000, "PG {v}");
    let events = http_events(&t).await;
    assert!(events.iter().filter(|e| e["op"] == "r").all(|e| e["id"].as_str().unwrap().starts_with("bf:")));

    let second = backfill::run(&t.cfg, &backfill_today()).await.expect("backfill again");
    assert_eq!(second.rows, 20_000);
    assert!(second.consistent_point > first.consistent_point);
    let s2 = sink_state(&t).await;
    assert_eq!(s2, s1, "PG {v}: a second backfill of unchanged rows changes no sink");
    assert_same_totals(&ch_totals(&t).await, &pg_totals(&t).await, &format!("PG {v}"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_twice_leaves_every_sink_unchanged() {
    for v in pg_versions() {
        backfill_twice(&v).await;
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct EventRow {
    event_id: u64,
    duration_ms: Option<i32>,
    event_ts: i64,
}

async fn backfill_racing_updates(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.cfg.redis.as_mut().unwrap().stream_maxlen = 100_000_000;
    t.cfg.pipeline.batch_max_changes = 500;
    t.start();
    load(&t.pg, 20_000).await;
    caught_up(&t).await;

    let updater = workload::spawn(&t, |pg, progress| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        while !progress.stopping() {
            let ids = workload::random_ids(&mut rng, 20_000, 200);
            let n = pg
                .execute(
                    &format!(
                        "UPDATE engagement_events SET duration_ms = coalesce(duration_ms, 0) + 1, \
                         event_ts = event_ts + interval '1 ms' WHERE id IN ({ids})"
                    ),
                    &[],
                )
                .await
                .unwrap();
            progress.add(n);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut opts = backfill_today();
    opts.chunk_rows = 1_000;
    let report = backfill::run(&t.cfg, &opts).await.expect("backfill");
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("PG {v}: backfilled {} rows while {} rows were updated", report.rows, updater.changes());
    updater.stop().await;
    caught_up(&t).await;

    // event_ts in ms as the pipeline stores it: truncated, like ClickHouse's
    // own DateTime64(3) conversion (casting PostgreSQL's numeric epoch to
    // int8 would round instead, and every row whose microseconds are 500 or
    // more would differ by 1 ms).
    let pg_rows: HashMap<i64, (Option<i32>, i64)> = t
        .pg
        .query("SELECT id, duration_ms, floor(extract(epoch FROM event_ts) * 1000)::int8 FROM engagement_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let ch_rows = t.ch_rows::<EventRow>("SELECT event_id, duration_ms, toUnixTimestamp64Milli(event_ts) AS event_ts FROM enriched_engagements FINAL").await;
    assert_eq!(ch_rows.len(), pg_rows.len(), "PG {v}: ClickHouse rows");
    let stale: Vec<_> =
        ch_rows.iter().filter(|r| pg_rows.get(&(r.event_id as i64)) != Some(&(r.duration_ms, r.event_ts))).collect();
    assert!(
        stale.is_empty(),
        "PG {v}: {} of {} ClickHouse rows differ from PostgreSQL's: {:?}",
        stale.len(),
        ch_rows.len(),
        &stale[..stale.len().min(5)]
    );

    // The HTTP receiver, keeping per row the event of the highest version,
    // ends with PostgreSQL's rows too.
    let mut latest: HashMap<i64, (String, Option<i64>)> = HashMap::new();
    for e in http_events(&t).await {
        let Some(row) = e["event"].as_object() else { continue };
        let id = row["event_id"].as_i64().unwrap();
        // Fixed-width hex: string order is version order.
        let version = e["version"].as_str().unwrap().to_string();
        let slot = latest.entry(id).or_insert((String::new(), None));
        if version >= slot.0 {
            *slot = (version, row["duration_ms"].as_i64());
        }
    }
    let stale_http =
        pg_rows.iter().filter(|(id, (d, _))| latest.get(id).map(|l| l.1) != Some(d.map(i64::from))).count();
    assert_eq!(stale_http, 0, "PG {v}: rows whose latest HTTP event is not PostgreSQL's row");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_while_its_rows_are_updated_never_overwrites_newer_values() {
    for v in pg_versions() {
        backfill_racing_updates(&v).await;
    }
}

/// Snapshot state an earlier release kept in schema `pgfanout` moves to
/// `pgfanout_state` with its rows, and the emptied schema goes: a role
/// named pgfanout would otherwise create its unqualified tables there.
#[tokio::test(flavor = "multi_thread")]
async fn state_tables_move_out_of_the_old_schema() {
    let v = pg_versions()[0].clone();
    // No sink: the test reads and writes PostgreSQL alone.
    let t = TestEnv::builder(&v).sinks(&[]).build().await;
    t.pg.batch_execute(
        "CREATE SCHEMA pgfanout;
         CREATE TABLE pgfanout.snapshots (slot text PRIMARY KEY, consistent_point pg_lsn, snapshot_ts timestamptz,
           started_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz);
         CREATE TABLE pgfanout.snapshot_chunks (slot text NOT NULL, table_name text NOT NULL, chunk integer NOT NULL,
           lo text, hi text, rows_planned bigint NOT NULL DEFAULT 0, done_at timestamptz, PRIMARY KEY (slot, chunk));
         INSERT INTO pgfanout.snapshots (slot, consistent_point) VALUES ('old', '0/1234');
         INSERT INTO pgfanout.snapshot_chunks (slot, table_name, chunk) VALUES ('old', 'public.content', 0);",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        t.pg.batch_execute(snapshot::STATE_SCHEMA).await.unwrap();
    }
    let moved: (i64, i64, i64) = {
        let r =
            t.pg.query_one(
                "SELECT (SELECT count(*) FROM pgfanout_state.snapshots WHERE consistent_point = '0/1234'),
                        (SELECT count(*) FROM pgfanout_state.snapshot_chunks WHERE slot = 'old'),
                        (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgfanout')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(moved, (1, 1, 0), "PG {v}: rows moved, old schema dropped");
}
