//! What the replication session makes of the stream, against real
//! PostgreSQL on every major scripts/test started: change keys are primary
//! keys, unchanged TOASTed values are filled in where an old row exists,
//! heartbeats give the slot positions and nothing else.

mod support;

use std::time::Duration;

use pgfanout::config::SourceConfig;
use pgfanout::source::{session, Change, SourceEvent};
use serde_json::json;
use support::{pg_versions, wait_until, TestEnv};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const A: &str = "00000000-0000-0000-0000-0000000000a1";

/// The replication session alone (no log, no sinks), acknowledging every
/// commit as soon as it is read.
struct Reader {
    events: mpsc::Receiver<SourceEvent>,
    acks: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), session::SessionError>>,
}

impl Reader {
    async fn start(t: &TestEnv, cfg: &SourceConfig) -> Reader {
        let (tx, events) = mpsc::channel(1_000);
        let (acks, ack_rx) = watch::channel(t.confirmed_flush_lsn().await);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(session::read(cfg.clone(), tx, ack_rx, stop_rx, Default::default()));
        Reader { events, acks, stop, task }
    }

    async fn next(&mut self) -> SourceEvent {
        let ev = tokio::time::timeout(WAIT, self.events.recv()).await.expect("an event in time").expect("reader runs");
        if let SourceEvent::Commit { end_lsn, .. } = ev {
            let _ = self.acks.send(end_lsn);
        }
        ev
    }

    /// The next `n` changes, skipping commits and idle positions.
    async fn changes(&mut self, n: usize) -> Vec<Change> {
        let mut out = Vec::new();
        while out.len() < n {
            if let SourceEvent::Change(c) = self.next().await {
                out.push(*c);
            }
        }
        out
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let Reader { mut events, task, .. } = self;
        let drain = async { while events.recv().await.is_some() {} };
        tokio::join!(task, drain).0.expect("reader task").expect("reader ended cleanly");
    }
}

/// `init` sets REPLICA IDENTITY FULL, so the Relation message flags every
/// column as identity; the key must still be the primary key alone, the
/// same before and after an update.
async fn keys_are_primary_keys(v: &str) {
    let t = TestEnv::new(v).await;
    let mut r = Reader::start(&t, &t.cfg.source).await;
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 600, now());
         INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms, device)
           VALUES (7, '{A}', 'play', now(), 1000, 'web');
         UPDATE engagement_events SET device = 'ios', duration_ms = 2000 WHERE id = 7;
         UPDATE content SET title = 'A2' WHERE id = '{A}';
         DELETE FROM engagement_events WHERE id = 7;"
    ))
    .await
    .unwrap();
    let changes = r.changes(5).await;
    let keys: Vec<_> = changes.iter().map(|c| (c.table.to_string(), c.key.to_json())).collect();
    assert_eq!(
        keys,
        vec![
            ("public.content".into(), json!({"id": A})),
            ("public.engagement_events".into(), json!({"id": 7})),
            ("public.engagement_events".into(), json!({"id": 7})),
            ("public.content".into(), json!({"id": A})),
            ("public.engagement_events".into(), json!({"id": 7})),
        ],
        "PG {v}"
    );
    // FULL identity still brings the whole old row.
    assert_eq!(changes[2].before.as_ref().and_then(|b| b.get("device")).map(|d| d.to_json()), Some(json!("web")));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn change_keys_are_primary_keys_under_full_identity() {
    for v in pg_versions() {
        keys_are_primary_keys(&v).await;
    }
}

/// An UPDATE that leaves a TOASTed (out-of-line) value alone does not resend
/// it. Under FULL identity the old row has it, so the new row is complete;
/// under DEFAULT identity there is no old row and the column is left out of
/// the new row (never turned into NULL).
async fn unchanged_toast(v: &str) {
    let t = TestEnv::new(v).await;
    // EXTERNAL: stored out of line uncompressed, so 10 kB is surely TOASTed.
    t.pg.batch_execute(&format!(
        "ALTER TABLE engagement_events ALTER COLUMN raw_payload SET STORAGE EXTERNAL;
         INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 600, now());"
    ))
    .await
    .unwrap();
    let mut r = Reader::start(&t, &t.cfg.source).await;
    let big = "x".repeat(10_000);
    let write = |id: i64| {
        format!(
            "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms, raw_payload)
               VALUES ({id}, '{A}', 'play', now(), 1000, jsonb_build_object('blob', '{big}'));
             UPDATE engagement_events SET duration_ms = 2000 WHERE id = {id};"
        )
    };
    t.pg.batch_execute(&write(1)).await.unwrap();
    let changes = r.changes(3).await;
    let update = &changes[2];
    assert_eq!(update.after.as_ref().unwrap().get("duration_ms").map(|d| d.to_json()), Some(json!(2000)));
    assert_eq!(
        update.after.as_ref().unwrap().get("raw_payload").map(|p| p.to_json()),
        Some(json!({"blob": big})),
        "PG {v}: FULL identity fills the unchanged TOASTed value from the old row"
    );

    t.pg.batch_execute("ALTER TABLE engagement_events REPLICA IDENTITY DEFAULT").await.unwrap();
    t.pg.batch_execute(&write(2)).await.unwrap();
    let changes = r.changes(2).await;
    let after = changes[1].after.as_ref().unwrap();
    assert_eq!(after.get("duration_ms").map(|d| d.to_json()), Some(json!(2000)));
    assert_eq!(after.get("raw_payload"), None, "PG {v}: DEFAULT identity has no old value to fill in");
    assert!(changes[1].before.is_none());
    assert_eq!(changes[1].key.to_json(), json!({"id": 2}));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_values_are_filled_from_the_old_row_or_left_out() {
    for v in pg_versions() {
        unchanged_toast(&v).await;
    }
}

/// LSNs of the heartbeat messages in the WAL since `peek_slot` was made.
async fn heartbeat_lsns(t: &TestEnv, peek_slot: &str) -> Vec<u64> {
    let rows =
        t.pg.query(
            "SELECT lsn::text FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
               'proto_version', '1', 'publication_names', $2, 'messages', 'true')
             WHERE get_byte(data, 0) = ascii('M') AND position(convert_to($3, 'UTF8') IN data) > 0",
            &[&peek_slot, &t.cfg.source.publication, &session::HEARTBEAT_PREFIX],
        )
        .await
        .unwrap();
    rows.iter().map(|r| pgfanout::source::Lsn::parse(r.get::<_, &str>(0)).unwrap().0).collect()
}

/// With `heartbeat_ms` set and no published table written, the session
/// writes heartbeat messages, turns each into a position (never a change),
/// and the whole pipeline acknowledges past them with every sink empty.
async fn heartbeats(v: &str) {
    let mut t = TestEnv::new(v).await;
    t.cfg.source.heartbeat_ms = 200;
    let peek = format!("{}_peek", t.name);
    t.pg.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&peek]).await.unwrap();

    // The session alone: heartbeat positions, and no change.
    let mut r = Reader::start(&t, &t.cfg.source).await;
    let mut idle = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        match r.next().await {
            SourceEvent::Idle { wal_end } => idle.push(wal_end),
            other => panic!("PG {v}: a heartbeat became {other:?}"),
        }
    }
    r.stop().await;
    let beats = heartbeat_lsns(&t, &peek).await;
    assert!(beats.len() >= 5, "PG {v}: {} heartbeats in 3 s at 200 ms", beats.len());
    assert!(
        beats.iter().any(|b| idle.contains(b)),
        "PG {v}: no heartbeat LSN {beats:x?} among the session's idle positions {idle:x?}"
    );

    // The pipeline: the slot follows the heartbeats, no sink sees them.
    t.start();
    let before = heartbeat_lsns(&t, &peek).await.last().copied().unwrap_or(0);
    wait_until("a newer heartbeat", WAIT, || async { heartbeat_lsns(&t, &peek).await.last() > Some(&before) }).await;
    let beat = *heartbeat_lsns(&t, &peek).await.last().unwrap();
    wait_until("the slot acknowledged past a heartbeat", WAIT, || async { t.confirmed_flush_lsn().await >= beat })
        .await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements").await, 0, "PG {v}");
    assert_eq!(t.ch_count("SELECT count() FROM content_dim").await, 0, "PG {v}");
    assert_eq!(t.http_get("_stats").await["events"], 0, "PG {v}");
    assert!(t.pipeline_is_running());
    t.stop().await;
    t.pg.execute("SELECT pg_drop_replication_slot($1)", &[&peek]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_advance_the_slot_and_reach_no_sink() {
    for v in pg_versions() {
        heartbeats(&v).await;
    }
}
