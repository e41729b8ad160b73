//! What the replication session makes of the stream, against real
//! PostgreSQL on every major scripts/test started: change keys are primary
//! keys, unchanged TOASTed values are filled in where an old row exists,
//! heartbeats give the slot positions and nothing else, values of every
//! supported type equal what SELECT returns in text and in binary transfer.

mod support;

use std::time::Duration;

use pgfanout::config::SourceConfig;
use pgfanout::source::{session, Change, Op, SourceEvent};
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
        Reader::start_at(cfg, t.confirmed_flush_lsn().await)
    }

    /// Reads `cfg`'s slot from `acked` (0: from the slot's own position).
    fn start_at(cfg: &SourceConfig, acked: u64) -> Reader {
        let (tx, events) = mpsc::channel(1_000);
        let (acks, ack_rx) = watch::channel(acked);
        let (stop, stop_rx) = watch::channel(false);
        let task = session::spawn(cfg.clone(), tx, ack_rx, stop_rx, Default::default());
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

/// A test env for the session alone: PostgreSQL and the log, no sink.
async fn session_env(v: &str) -> TestEnv {
    TestEnv::builder(v).sinks(&[]).build().await
}

/// `init` sets REPLICA IDENTITY FULL, so the Relation message flags every
/// column as identity; the key must still be the primary key alone, the
/// same before and after an update.
async fn keys_are_primary_keys(v: &str) {
    let t = session_env(v).await;
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
    let t = session_env(v).await;
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

/// Every type the decoder promises, with NULLs, non-ASCII JSON, timestamptz
/// written in several zones, arrays, an enum and a domain.
const TYPED: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE typed (
    id int PRIMARY KEY,
    c_bool bool, c_bytea bytea, c_int2 int2, c_int4 int4, c_int8 int8, c_float4 float4, c_float8 float8,
    c_numeric numeric, c_text text, c_varchar varchar(20), c_bpchar char(4), c_name name, c_uuid uuid,
    c_date date, c_time time, c_timetz timetz, c_timestamp timestamp, c_timestamptz timestamptz,
    c_interval interval, c_json json, c_jsonb jsonb, c_inet inet, c_cidr cidr, c_mood mood, c_posint posint,
    a_int4 int4[], a_text text[], a_timestamptz timestamptz[], a_numeric numeric[], a_jsonb jsonb[], a_2d int8[]
);
CREATE PUBLICATION typed FOR TABLE typed;";

const TYPED_ROWS: &str = r#"
SET TimeZone = 'Asia/Kolkata';
INSERT INTO typed VALUES (1, true, '\x00ff10', 32767, -2147483648, 9223372036854775807, 1.5, 'NaN',
  12345678901234567890.000000000000000001, E'tab\t\"q\" ü\\', 'varchar ✓', 'ab', 'a_name',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-28', '23:59:59.999999', '04:05:06+05:30',
  '2026-11-28 12:00:00.123456', '2026-11-28 12:00:00.5-08', '1 year 2 mons 3 days 04:05:06.5',
  '{"a": [1, 2.50, null], "ü": "ß"}', '{"emoji": "😀", "日本": "語", "n": 1.0e2}', '192.168.1.5/24', '10.0.0.0/8',
  'happy', 42, '{1,NULL,3}', '{"a b",NULL,"",NULL}', '{"2026-01-01 00:00:00+09",infinity}', '{1.10,NaN,-0.5}',
  ARRAY['{"k": 1}'::jsonb, NULL], '{{1,2},{3,4}}');
INSERT INTO typed (id) VALUES (2);
SET TimeZone = 'America/New_York';
INSERT INTO typed (id, c_timestamptz, c_timestamp, c_date) VALUES (3, '2026-03-08 01:59:59.999-05', '-infinity', 'infinity');
SET TimeZone = 'UTC';
UPDATE typed SET c_text = 'now ü', c_mood = 'sad', c_numeric = -0.000001 WHERE id = 1;
DELETE FROM typed WHERE id = 2;
INSERT INTO typed (id, c_text, a_text) VALUES (5, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 5000) g),
  ARRAY[repeat('long ü ', 20000)]);"#;

/// What SELECT returns for each row of `typed`, as values: each column's
/// text through `Value::from_text` with its base type, in JSON form.
async fn selected_typed(t: &TestEnv) -> std::collections::BTreeMap<i32, serde_json::Value> {
    use pgfanout::source::values::Value;
    let cols =
        t.pg.query(
            "SELECT a.attname::text, COALESCE(NULLIF(ty.typbasetype, 0), a.atttypid)
             FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
             WHERE a.attrelid = 'typed'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[],
        )
        .await
        .unwrap();
    // The simple query protocol returns each value's text output, as
    // pgoutput's text transfer does (a ::text cast would not: bool says "true").
    let messages = t.pg.simple_query("SELECT * FROM typed").await.unwrap();
    let rows = messages.iter().filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    rows.map(|r| {
        let mut obj = serde_json::Map::new();
        for (i, c) in cols.iter().enumerate() {
            let v = match r.get(i) {
                None => Value::Null,
                Some(text) => Value::from_text(c.get(1), text.as_bytes()).unwrap(),
            };
            obj.insert(c.get(0), v.to_json());
        }
        (obj["id"].as_i64().unwrap() as i32, serde_json::Value::Object(obj))
    })
    .collect()
}

async fn typed_values(v: &str) {
    let t = session_env(v).await;
    t.pg.batch_execute(TYPED).await.unwrap();
    let modes = [("text", Some(false)), ("binary", Some(true)), ("auto", None)];
    let mut readers = Vec::new();
    for (mode, binary) in modes {
        let mut cfg = t.cfg.source.clone();
        cfg.slot = format!("{}_{mode}", t.name);
        cfg.publication = "typed".into();
        cfg.binary = binary;
        t.pg.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&cfg.slot]).await.unwrap();
        readers.push((mode, Reader::start_at(&cfg, 0)));
    }
    t.pg.batch_execute(TYPED_ROWS).await.unwrap();
    let want = selected_typed(&t).await;
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), vec![1, 3, 5], "PG {v}");
    // Row 5's text (160 kB of hex) cannot fit in an 8 kB page: TOASTed.
    for (mode, r) in &mut readers {
        let changes = r.changes(6).await;
        // The latest state of each row, as the stream tells it.
        let mut got = std::collections::BTreeMap::new();
        for c in &changes {
            let id = c.key.to_json()["id"].as_i64().unwrap() as i32;
            match &c.after {
                Some(after) => got.insert(id, after.to_json()),
                None => got.remove(&id),
            };
        }
        assert_eq!(got, want, "PG {v}, {mode} transfer");
        assert_eq!(changes[4].before.as_ref().map(|b| b.to_json()["id"].clone()), Some(json!(2)), "PG {v} {mode}");
    }

    // A column of a type with no binary decoder (point) arrives mid-stream:
    // forced binary carries its raw bytes as an unknown value, the automatic
    // mode switches to text and gets the text form; text mode just reads it.
    t.pg.batch_execute(
        "ALTER TABLE typed ADD COLUMN p point; INSERT INTO typed (id, p, c_posint) VALUES (4, '(1,2)', 7)",
    )
    .await
    .unwrap();
    for (mode, r) in &mut readers {
        // The switch reconnects from the last acknowledged commit, so the
        // automatic mode may read the first transaction again (the sinks are
        // idempotent): the new row is the first change with id 4.
        let mut after = json!(null);
        for _ in 0..=6 {
            after = r.changes(1).await.remove(0).after.map(|a| a.to_json()).unwrap_or_default();
            if after["id"] == json!(4) {
                break;
            }
        }
        assert_eq!((&after["id"], &after["c_posint"]), (&json!(4), &json!(7)), "PG {v} {mode}");
        let p = after["p"].as_str().unwrap_or_default().to_string();
        match *mode {
            "binary" => assert!(p.starts_with("\\x3ff0"), "PG {v}: forced binary point {p:?}"),
            _ => assert_eq!(p, "(1,2)", "PG {v}: {mode} transfer"),
        }
    }

    // The snapshot's reader (binary COPY) gives the same values, the point
    // column as its text form like the text stream.
    use pgfanout::source::scan::{self, Chunk, ScanPoint, ScanTable};
    let table = pgfanout::source::TableName::new("public", "typed");
    let shape = ScanTable::load(&t.pg, &table).await.unwrap();
    let chunk = Chunk { seq: 0, table: table.clone(), lo: None, hi: None, rows: 0 };
    let (tx, mut rx) = mpsc::channel(10);
    let point = ScanPoint { consistent_point: 1 << 40, commit_ts_us: 0 };
    let read = async {
        let tx = tx;
        scan::read_chunk(&t.pg, &shape, &chunk, None, point, &tx).await.unwrap()
    };
    let mut scanned = std::collections::BTreeMap::new();
    let collect = async {
        while let Some(ev) = rx.recv().await {
            let pgfanout::source::SourceEvent::Change(c) = ev else { panic!("a scan sends changes only") };
            let after = c.after.unwrap().to_json();
            scanned.insert(after["id"].as_i64().unwrap() as i32, after);
        }
    };
    tokio::join!(read, collect);
    assert_eq!(scanned, selected_typed(&t).await, "PG {v}: snapshot read");

    t.pg.batch_execute("TRUNCATE typed").await.unwrap();
    for (mode, r) in &mut readers {
        let truncate = loop {
            let c = r.changes(1).await.remove(0);
            if c.op == Op::Truncate {
                break c;
            }
        };
        assert_eq!(truncate.table.to_string(), "public.typed", "PG {v} {mode}");
        assert_eq!((truncate.before, truncate.after), (None, None), "PG {v} {mode}");
    }
    for (_, r) in readers {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_equals_select_in_text_and_binary_transfer() {
    for v in pg_versions() {
        typed_values(&v).await;
    }
}
