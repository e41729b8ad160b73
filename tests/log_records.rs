//! What the log holds besides the change records, as Debezium lays it out:
//! a tombstone after each delete, TRUNCATE left out unless asked for,
//! BEGIN/END transaction records with their counts and each change's
//! `transaction` block, and heartbeat records. And a publisher that stops
//! and starts again publishes nothing twice.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::topics::{read_topic, Record};
use support::{pg_versions, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

const CONTENT: &str = "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES \
    ('550e8400-e29b-41d4-a716-446655440000', 'test-episode', 'Test Episode', 'podcast', 1200, NOW())";

fn insert_events(ids: std::ops::RangeInclusive<i64>) -> String {
    let rows: Vec<String> = ids
        .map(|id| {
            format!(
                "({id}, '550e8400-e29b-41d4-a716-446655440000', gen_random_uuid(), 'play', NOW(), {}, 'web', '{{}}')",
                30_000 + id
            )
        })
        .collect();
    format!(
        "INSERT INTO engagement_events (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES {}",
        rows.join(", ")
    )
}

fn kind(r: &Record) -> &str {
    r.headers.get("pgfanout.kind").map(String::as_str).unwrap_or("?")
}

async fn log_only(edit: impl FnOnce(&mut pgfanout::config::Config) + Send + 'static) -> TestEnv {
    let mut t = TestEnv::builder(&pg_versions()[0])
        .sinks(&[])
        .with(|cfg| {
            cfg.pipeline.log_only = true;
            edit(cfg);
        })
        .build()
        .await;
    t.pg.batch_execute(CONTENT).await.unwrap();
    t.start();
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn deletes_get_tombstones_truncate_is_skipped_and_transactions_are_framed() {
    let mut t = log_only(|cfg| {
        cfg.log.debezium.provide_transaction_metadata = true;
        cfg.source.heartbeat_ms = 200;
    })
    .await;
    t.pg.batch_execute(&format!(
        "BEGIN; {}; UPDATE engagement_events SET duration_ms = 1 WHERE id = 2; COMMIT;",
        insert_events(1..=3)
    ))
    .await
    .unwrap();
    t.pg.batch_execute("BEGIN; DELETE FROM engagement_events WHERE id = 3; TRUNCATE engagement_events; COMMIT;")
        .await
        .unwrap();
    t.acked_everything(WAIT).await;

    let prefix = t.cfg.log.topic_prefix.clone();
    let topic = format!("{prefix}public.engagement_events");
    let log = read_topic(&t, &topic, WAIT, |r| r.len() >= 6).await;
    let shape: Vec<(String, &str)> =
        log.iter().map(|r| (r.payload["op"].as_str().unwrap_or("-").to_string(), kind(r))).collect();
    assert_eq!(
        shape,
        [
            ("c".into(), "change"),
            ("c".into(), "change"),
            ("c".into(), "change"),
            ("u".into(), "change"),
            ("d".into(), "change"),
            ("-".into(), "tombstone"),
        ],
        "TRUNCATE is skipped by default (skipped.operations = t)"
    );
    assert_eq!(log[5].key, log[4].key, "the tombstone carries the deleted key");
    assert!(log[5].payload.is_null());

    // Transaction records: BEGIN, END per transaction, with the counts
    // (the first pair is the content row's, written before the events).
    let all = read_topic(&t, &format!("{prefix}transaction"), WAIT, |r| r.len() >= 6).await;
    assert_eq!(all.len(), 6, "{all:?}");
    assert_eq!(all[1].payload["data_collections"][0]["data_collection"], "public.content");
    let tx = &all[2..];
    let statuses: Vec<&str> = tx.iter().map(|r| r.payload["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["BEGIN", "END", "BEGIN", "END"]);
    assert_eq!(tx[1].payload["event_count"], 4);
    assert_eq!(
        tx[1].payload["data_collections"],
        serde_json::json!([{"data_collection": "public.engagement_events", "event_count": 4}])
    );
    assert_eq!(tx[3].payload["event_count"], 1, "the skipped TRUNCATE is not counted");
    assert!(tx[0].payload["event_count"].is_null());
    let key: serde_json::Value = serde_json::from_str(tx[0].key.as_deref().unwrap()).unwrap();
    assert_eq!(key["id"], tx[0].payload["id"]);
    // Debezium's ids are `<txId>:<LSN>`: a BEGIN and each change by the
    // change's own LSN, an END by its commit's end.
    let id = |v: &serde_json::Value| -> (u64, u64) {
        let (xid, lsn) = v.as_str().unwrap().split_once(':').unwrap();
        (xid.parse().unwrap(), lsn.parse().unwrap())
    };
    let txid = |r: &Record| r.payload["source"]["txId"].as_u64().unwrap();
    let lsn = |r: &Record| r.payload["source"]["lsn"].as_u64().unwrap();
    assert_eq!(id(&tx[0].payload["id"]), (txid(&log[0]), lsn(&log[0])), "BEGIN by the first change");
    assert_eq!(id(&tx[1].payload["id"]).0, txid(&log[0]));
    assert!(id(&tx[1].payload["id"]).1 > lsn(&log[3]), "END by the commit's end");
    assert_eq!(id(&tx[2].payload["id"]), (txid(&log[4]), lsn(&log[4])));
    // Each change's block names its transaction and its place in it.
    let orders: Vec<((u64, u64), u64, u64)> = log[..5]
        .iter()
        .map(|r| {
            let b = &r.payload["transaction"];
            (id(&b["id"]), b["total_order"].as_u64().unwrap(), b["data_collection_order"].as_u64().unwrap())
        })
        .collect();
    let want: Vec<((u64, u64), u64, u64)> =
        log[..5].iter().zip([1, 2, 3, 4, 1]).map(|(r, n)| ((txid(r), lsn(r)), n, n)).collect();
    assert_eq!(orders, want);

    // Heartbeats, keyed by the server name (Debezium's topic.prefix).
    let server = prefix.trim_end_matches('.');
    let beats = read_topic(&t, &format!("__debezium-heartbeat.{server}"), WAIT, |r| !r.is_empty()).await;
    assert!(!beats.is_empty(), "no heartbeat record");
    let key: serde_json::Value = serde_json::from_str(beats[0].key.as_deref().unwrap()).unwrap();
    assert_eq!(key, serde_json::json!({ "serverName": server }));
    assert!(beats[0].payload["ts_ms"].as_i64().unwrap() > 1_600_000_000_000);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_is_kept_when_asked_and_tombstones_can_be_turned_off() {
    let mut t = log_only(|cfg| {
        cfg.log.debezium.skipped_operations = "none".into();
        cfg.log.debezium.tombstones_on_delete = false;
    })
    .await;
    t.pg.batch_execute(&insert_events(1..=2)).await.unwrap();
    t.pg.batch_execute("DELETE FROM engagement_events WHERE id = 1; TRUNCATE engagement_events;").await.unwrap();
    t.acked_everything(WAIT).await;
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    let log = read_topic(&t, &topic, WAIT, |r| r.len() >= 4).await;
    let ops: Vec<&str> = log.iter().map(|r| r.payload["op"].as_str().unwrap_or("-")).collect();
    assert_eq!(ops, ["c", "c", "d", "t"]);
    t.stop().await;
}

/// The sidecar published a run of changes and then died before the slot
/// was acknowledged: the next start replays them from the slot. A copy of
/// the slot made before the changes is that slot (PostgreSQL copies a slot
/// at its position); the new publisher finds the changes in the log and
/// publishes none of them again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_publishes_nothing_the_log_already_holds() {
    let mut t = TestEnv::builder(&pg_versions()[0])
        .sinks(&[])
        .with(|cfg| {
            cfg.pipeline.log_only = true;
            cfg.log.partitions = 3;
            cfg.log.debezium.provide_transaction_metadata = true;
        })
        .build()
        .await;
    let replay = format!("{}_replay", t.cfg.source.slot);
    t.pg.execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&t.cfg.source.slot, &replay]).await.unwrap();
    t.pg.batch_execute(CONTENT).await.unwrap();
    t.start();
    t.pg.batch_execute(&insert_events(1..=40)).await.unwrap();
    t.pg.batch_execute("DELETE FROM engagement_events WHERE id <= 10").await.unwrap();
    t.acked_everything(WAIT).await;
    t.stop().await;
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    let before = read_topic(&t, &topic, WAIT, |r| r.len() >= 60).await;
    assert_eq!(before.len(), 60, "40 creates, 10 deletes, 10 tombstones");
    assert!(before.iter().map(|r| r.partition).collect::<std::collections::HashSet<_>>().len() > 1);
    let tx_topic = format!("{}transaction", t.cfg.log.topic_prefix);
    // The content row's transaction, the inserts', the deletes'.
    assert_eq!(read_topic(&t, &tx_topic, WAIT, |r| r.len() >= 6).await.len(), 6);

    // The slot as it was before the changes: everything is replayed.
    let slot = t.cfg.source.slot.clone();
    t.pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
    t.pg.execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&replay, &slot]).await.unwrap();
    t.pg.execute("SELECT pg_drop_replication_slot($1)", &[&replay]).await.unwrap();
    t.start();
    t.pg.batch_execute(&insert_events(41..=45)).await.unwrap();
    t.acked_everything(WAIT).await;
    let after = read_topic(&t, &topic, WAIT, |r| r.len() >= 65).await;
    let mut seen: HashMap<(String, String), u32> = HashMap::new();
    for r in &after {
        *seen.entry((r.headers["pgfanout.position"].clone(), kind(r).to_string())).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "a record published twice: {seen:?}");
    assert_eq!(after.len(), 65, "the replay added only the 5 new changes");
    let tx_after = read_topic(&t, &tx_topic, WAIT, |r| r.len() >= 8).await;
    assert_eq!(tx_after.len(), 8, "and only the new transaction's BEGIN and END");
    t.stop().await;
}
