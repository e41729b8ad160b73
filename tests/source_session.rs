//! The replication session against real PostgreSQL: it survives a
//! terminated walsender without a gap, and an idle slot does not pin WAL.

mod support;

use std::time::Duration;

use support::{pg_versions, wait_until, workload, Sink, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

async fn terminated_walsender(v: &str) {
    // The sinks it reads back: ClickHouse (rows) and HTTP (event ids).
    let mut t = TestEnv::builder(v).sinks(&[Sink::ClickHouse, Sink::Http]).build().await;
    t.start();
    t.pg.batch_execute(
        "INSERT INTO content VALUES ('00000000-0000-0000-0000-000000000001', 'a', 'A', 'podcast', 600, now())",
    )
    .await
    .unwrap();
    let mut written = 0i64;
    for round in 0..20 {
        workload::insert_events(&t.pg, "00000000-0000-0000-0000-000000000001", 500, 500).await;
        written += 500;
        if round % 5 == 2 {
            // Kill the walsender serving our slot, mid-stream.
            let n: i64 = t
                .pg
                .query_one(
                    "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&t.name],
                )
                .await
                .unwrap()
                .get(0);
            eprintln!("PG {v}: terminated {n} walsender(s) after {written} events");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("ClickHouse caught up after the reconnects", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == written as u64
    })
    .await;
    wait_until("HTTP caught up", WAIT, || async {
        let events = t.http_get("_events").await;
        let ids: std::collections::HashSet<String> =
            events.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
        ids.len() as i64 == written
    })
    .await;
    let end = t.wal_insert_lsn().await;
    wait_until("slot acknowledged to the end", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    // What the pipeline was handed before a reconnect is not sent again:
    // no row inserted twice, no event posted twice.
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements").await, written as u64, "PG {v}");
    assert_eq!(t.http_get("_stats").await["events"], written, "PG {v}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resumes_without_gap_after_pg_terminate_backend() {
    for v in pg_versions() {
        terminated_walsender(&v).await;
    }
}

async fn idle_slot_advances(v: &str) {
    // Any one sink: the test watches the slot alone.
    let mut t = TestEnv::builder(v).sinks(&[Sink::Redis]).build().await;
    t.pg.batch_execute("CREATE TABLE unpublished (id serial primary key, note text)").await.unwrap();
    t.start();
    // Let the stream start, then only write to a table the publication does not cover.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = t.confirmed_flush_lsn().await;
    let mut moves = 0;
    for _ in 0..15 {
        t.pg.batch_execute("INSERT INTO unpublished (note) SELECT repeat('x', 1000) FROM generate_series(1, 100)")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = t.confirmed_flush_lsn().await;
        if now > last {
            moves += 1;
            last = now;
        }
    }
    assert!(moves >= 5, "PG {v}: confirmed_flush_lsn moved only {moves} times in 15 s of unpublished writes");
    let written = t.wal_insert_lsn().await;
    // Nothing of ours is in flight: the slot may go to the server's position.
    wait_until("slot follows the server while idle", WAIT, || async {
        t.confirmed_flush_lsn().await + 64 * 1024 >= written
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_slot_does_not_pin_wal() {
    for v in pg_versions() {
        idle_slot_advances(&v).await;
    }
}
