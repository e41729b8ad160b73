//! Two-phase and large transactions through the whole pipeline, against
//! real PostgreSQL on every major scripts/test started (see ARCHITECTURE.md,
//! "Large transactions" and "Two-phase commit"). A prepared transaction is
//! sent when it is committed. A large one is streamed while in progress
//! (protocol 2+, the default from PostgreSQL 14) and held by pgfanout until
//! its commit, or, with protocol 1, spilled by the server until then: either
//! way aborted work reaches no sink.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::{pg_versions, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(120);
const A: &str = "00000000-0000-0000-0000-0000000000a1";

async fn content(t: &TestEnv) {
    t.pg.batch_execute(&format!("INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 600, now())")).await.unwrap();
}

/// `n` events with ids `first..first+n`, as one statement.
fn events(first: i64, n: i64) -> String {
    format!(
        "INSERT INTO engagement_events (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
         SELECT g, '{A}', gen_random_uuid(), 'play', now(), g % 600000, 'web', '{{\"n\": 1}}'
         FROM generate_series({first}, {first} + {n} - 1) g"
    )
}

/// Waits until the slot is acknowledged past everything written so far.
async fn acked_to_the_end(t: &TestEnv) {
    let end = t.wal_insert_lsn().await;
    wait_until("slot acknowledged to the end", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
}

/// What every sink holds: ClickHouse rows (FINAL and raw), HTTP events,
/// entries of Redis's podcast stream.
async fn sink_counts(t: &TestEnv) -> (u64, u64, u64, u64) {
    let mut r = t.redis();
    let stream: u64 = r.xlen(format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap();
    (
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await,
        t.ch_count("SELECT count() FROM enriched_engagements").await,
        t.http_get("_stats").await["events"].as_u64().unwrap(),
        stream,
    )
}

/// Rolls back the prepared transactions still open when a test ends: a
/// failed assertion must not leave one behind, since it would hold every
/// later slot creation on that server (which waits for running transactions).
struct Prepared {
    psql: std::path::PathBuf,
    url: String,
    gids: Vec<String>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        for gid in &self.gids {
            // Fails harmlessly ("does not exist") once the test resolved it.
            let _ = std::process::Command::new(&self.psql)
                .args(["-qX", &self.url, "-c", &format!("ROLLBACK PREPARED '{gid}'")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn two_phase(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.start();
    content(&t).await;
    let (commit_gid, rollback_gid) = (format!("{}_c", t.name), format!("{}_r", t.name));
    let _cleanup = Prepared {
        psql: std::path::PathBuf::from(std::env::var(format!("PGFANOUT_PG{v}_BIN")).unwrap()).join("psql"),
        url: t.cfg.source.url.expose().to_string(),
        gids: vec![commit_gid.clone(), rollback_gid.clone()],
    };
    t.pg.batch_execute(&format!("BEGIN; {}; PREPARE TRANSACTION '{commit_gid}'", events(1, 3))).await.unwrap();
    t.pg.batch_execute(&format!("BEGIN; {}; PREPARE TRANSACTION '{rollback_gid}'", events(11, 3))).await.unwrap();
    // Prepared is not committed: nothing of them may arrive yet, while a
    // transaction committed after them does.
    t.pg.batch_execute(&events(100, 1)).await.unwrap();
    wait_until("the committed event arrived", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL WHERE event_id < 100").await, 0, "PG {v}");

    // Each on its own: neither may run inside a (multi-statement) transaction block.
    t.pg.batch_execute(&format!("COMMIT PREPARED '{commit_gid}'")).await.unwrap();
    t.pg.batch_execute(&format!("ROLLBACK PREPARED '{rollback_gid}'")).await.unwrap();
    t.pg.batch_execute(&events(101, 1)).await.unwrap();
    acked_to_the_end(&t).await;
    wait_until("every sink holds the 5 committed events", WAIT, || async { sink_counts(&t).await == (5, 5, 5, 5) })
        .await;
    let ids = t.ch_rows::<u64>("SELECT event_id FROM enriched_engagements FINAL ORDER BY event_id").await;
    assert_eq!(ids, vec![1, 2, 3, 100, 101], "PG {v}: the rolled-back prepared transaction reached a sink");
    assert_eq!(t.http_get("_stats").await["duplicates"], 0, "PG {v}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_transactions_arrive_once_when_committed_and_never_when_rolled_back() {
    for v in pg_versions() {
        two_phase(&v).await;
    }
}

const BIG: i64 = 50_000;

/// The slot's counters (PostgreSQL 14+): `(spill_txns, stream_txns)`.
async fn slot_stats(t: &TestEnv) -> (i64, i64) {
    let r = t
        .pg
        .query_one("SELECT spill_txns, stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1", &[&t.name])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// A connection of its own, for a transaction left open.
async fn connect(t: &TestEnv) -> tokio_postgres::Client {
    pgfanout::source::slot::connect(t.cfg.source.url.expose()).await.unwrap()
}

/// Waits until our walsender has decoded everything `open` (a connection
/// in an open transaction) has written: what overflowed the decoding memory
/// has been spilled or streamed by then. (PostgreSQL 18 skips spilling and
/// streaming a transaction it already knows to be aborted, so a test that
/// wants either must roll back only after this.)
async fn decoded(t: &TestEnv, open: &tokio_postgres::Client) {
    let written: String = open.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    wait_until("the walsender decoded the open transaction", WAIT, || async {
        t.pg.query_one(
            "SELECT coalesce(bool_or(r.sent_lsn >= $2::text::pg_lsn), false)
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&t.name, &written],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
}

/// A 50,000-row transaction rolled back after the walsender decoded it,
/// then one event: only that event reaches the sinks.
async fn big_rollback_then_one_event(t: &TestEnv) {
    let big = connect(t).await;
    big.batch_execute(&format!("BEGIN; {}", events(1, BIG))).await.unwrap();
    decoded(t, &big).await;
    big.batch_execute("ROLLBACK").await.unwrap();
    t.pg.batch_execute(&events(BIG + 1, 1)).await.unwrap();
    acked_to_the_end(t).await;
    wait_until("the event after the rollback arrived", WAIT, || async { sink_counts(t).await == (1, 1, 1, 1) }).await;
}

/// Every sink holds `want` events, each once (by row, stream entry, posted
/// event and event id).
async fn every_sink_holds(t: &TestEnv, want: u64, v: &str) {
    acked_to_the_end(t).await;
    wait_until("every sink holds every committed row", WAIT, || async {
        sink_counts(t).await == (want, want, want, want)
    })
    .await;
    assert_eq!(t.ch_count("SELECT uniqExact(event_id) FROM enriched_engagements").await, want, "PG {v}");
    let events = t.http_get("_events").await;
    let ids: std::collections::HashSet<&str> =
        events.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len() as u64, want, "PG {v}: HTTP distinct event ids");
    assert_eq!(t.http_get("_stats").await["duplicates"], 0, "PG {v}");
}

/// The smallest decoding memory the server allows, on our walsender only:
/// 50,000 rows overflow it.
fn small_decoding_memory(t: &mut TestEnv) {
    let url = format!("{}?options=-c%20logical_decoding_work_mem%3D64kB", t.cfg.source.url.expose());
    t.cfg.source.url = pgfanout::config::Secret(url);
}

async fn large_transactions(v: &str) {
    let mut t = TestEnv::new(v).await;
    small_decoding_memory(&mut t);
    // Protocol 1: the server spills what overflows to its disk.
    t.cfg.source.proto_version = Some(1);
    t.start();
    content(&t).await;

    big_rollback_then_one_event(&t).await;
    wait_until("the rolled-back transaction was spilled", WAIT, || async { slot_stats(&t).await.0 >= 1 }).await;

    t.pg.batch_execute(&events(1, BIG)).await.unwrap();
    every_sink_holds(&t, BIG as u64 + 1, v).await;
    wait_until("the committed transaction was spilled too", WAIT, || async { slot_stats(&t).await.0 >= 2 }).await;
    eprintln!("PG {v}: (spill_txns, stream_txns) {:?}", slot_stats(&t).await);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_spilled_transactions_rolled_back_reach_no_sink_committed_reach_every_sink_once() {
    for v in pg_versions() {
        large_transactions(&v).await;
    }
}

async fn streamed_transactions(v: &str) {
    let mut t = TestEnv::new(v).await;
    small_decoding_memory(&mut t);
    // The default protocol (2 or 4 here); 1 MB of memory for what is in
    // progress, so 50,000 rows spill to pgfanout's files.
    t.cfg.source.stream_buffer_mb = 1;
    t.start();
    content(&t).await;

    // Streamed, then rolled back: nothing may arrive.
    big_rollback_then_one_event(&t).await;
    wait_until("the rolled-back transaction was streamed", WAIT, || async { slot_stats(&t).await.1 >= 1 }).await;

    // A large transaction still open while a small one commits: the small
    // one arrives first and alone. The large one rolls back a savepoint
    // holding 5,000 rows (streamed before the rollback), outlives a lost
    // replication connection, and then commits.
    let big = connect(&t).await;
    big.batch_execute(&format!("BEGIN; {}; SAVEPOINT s; {}", events(1, BIG), events(BIG + 10, 5_000))).await.unwrap();
    decoded(&t, &big).await;
    big.batch_execute(&format!("ROLLBACK TO SAVEPOINT s; {}", events(BIG + 10_000, 10))).await.unwrap();
    decoded(&t, &big).await;
    t.pg.batch_execute(&events(BIG + 2, 1)).await.unwrap();
    wait_until("the small transaction arrived", WAIT, || async { sink_counts(&t).await == (2, 2, 2, 2) }).await;
    assert_eq!(slot_stats(&t).await.0, 0, "PG {v}: the server spilled although it could stream");
    // The replication connection drops while pgfanout holds the open
    // transaction: what it held goes with the connection, and the server
    // sends the transaction again, all of it, on the next one (spilling
    // what it decodes before the slot's confirmed position, which it may
    // not stream).
    let terminated: i64 =
        t.pg.query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1",
            &[&t.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1, "PG {v}: the walsender was running");
    big.batch_execute(&events(BIG + 20_000, 10)).await.unwrap();
    big.batch_execute("COMMIT").await.unwrap();

    every_sink_holds(&t, BIG as u64 + 2 + 20, v).await;
    let rolled_back = t
        .ch_count(&format!(
            "SELECT count() FROM enriched_engagements WHERE event_id BETWEEN {} AND {}",
            BIG + 10,
            BIG + 5_009
        ))
        .await;
    assert_eq!(rolled_back, 0, "PG {v}: rows of the rolled-back savepoint reached ClickHouse");
    let (spill_txns, stream_txns) = slot_stats(&t).await;
    eprintln!("PG {v}: (spill_txns, stream_txns) ({spill_txns}, {stream_txns})");
    assert!(stream_txns >= 2, "PG {v}: streamed {stream_txns} transactions");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_transactions_reach_sinks_at_commit_without_rolled_back_work() {
    for v in pg_versions() {
        streamed_transactions(&v).await;
    }
}
