//! Row versions that never wrap: `_version UInt128` = commit LSN << 32 |
//! ordinal in ClickHouse (checked on the real engine, through the sink's own
//! RowBinary rows), hex versions in the HTTP events, `init` migrating tables
//! of the old UInt64 form, and a PostgreSQL whose WAL crosses 1000/0.

mod support;

use std::time::Duration;

use pgfanout::enrich::{Content, ContentChange, EngagementChange, EngagementRow, Enriched};
use pgfanout::source::{Op, Position};
use support::private::PrivatePostgres;
use support::{pg_versions, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const A: &str = "00000000-0000-0000-0000-0000000000a1";

fn row(event_id: i64, duration_ms: i32) -> EngagementRow {
    EngagementRow {
        event_id,
        content_id: None,
        user_id: None,
        event_type: Some("play".into()),
        event_ts: 1_700_000_000_000,
        duration_ms: Some(duration_ms),
        device: None,
        raw_payload: None,
        engagement_seconds: None,
        engagement_percent: None,
        content_slug: None,
        content_title: None,
        content_type: None,
        length_seconds: None,
        publish_ts: None,
    }
}

fn batch(position: Position, duration_ms: i32, title: &str) -> Enriched {
    Enriched {
        engagements: vec![EngagementChange {
            op: Op::Update,
            current: Some(row(1, duration_ms)),
            previous: None,
            position,
            commit_ts: 0,
            replay_digest: None,
        }],
        contents: vec![ContentChange {
            op: Op::Update,
            content: Some(Content {
                id: A.parse().unwrap(),
                slug: "a".into(),
                title: title.into(),
                content_type: Some("podcast".into()),
                length_seconds: Some(100),
                publish_ts: 0,
            }),
            position,
            commit_ts: 0,
        }],
        ..Default::default()
    }
}

/// Two versions equal in their low 64 bits, apart above: ReplacingMergeTree
/// keeps the higher one, written first, in both tables.
#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_orders_versions_above_bit_64() {
    let t = TestEnv::builder(&pg_versions()[0]).sinks(&[support::Sink::ClickHouse]).build().await;
    use pgfanout::sinks::Sink;
    let sink = pgfanout::sinks::clickhouse::ClickHouseSink::new(
        t.cfg.clickhouse.as_ref().unwrap(),
        &pgfanout::sinks::Refused::Stall,
    )
    .unwrap();
    let high = Position { commit_lsn: 0x2_0000_0010, ordinal: 1 };
    let low = Position { commit_lsn: 0x1_0000_0010, ordinal: 1 };
    assert_eq!(high.version() as u64, low.version() as u64, "the test needs versions apart only above bit 64");
    sink.write(&batch(high, 2000, "high")).await.unwrap();
    sink.write(&batch(low, 1000, "low")).await.unwrap();
    for sql in ["OPTIMIZE TABLE enriched_engagements FINAL", "OPTIMIZE TABLE content_dim FINAL"] {
        t.ch().query(sql).execute().await.unwrap();
    }
    let (d, v): (Option<i32>, u128) =
        t.ch().query("SELECT duration_ms, _version FROM enriched_engagements FINAL").fetch_one().await.unwrap();
    assert_eq!((d, v), (Some(2000), high.version()));
    // The same number as ClickHouse prints it: the crate's u128 is UInt128's bytes.
    let text: String =
        t.ch().query("SELECT toString(_version) FROM enriched_engagements FINAL").fetch_one().await.unwrap();
    assert_eq!(text, high.version().to_string());
    let (title, v): (String, u128) =
        t.ch().query("SELECT title, _version FROM content_dim FINAL").fetch_one().await.unwrap();
    assert_eq!((title.as_str(), v), ("high", high.version()));
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements").await, 1, "merged into one row");
}

/// Tables of the old form (UInt64 `_version` = lsn << 20 | ordinal,
/// content_dim's `version_ts_ms`): `init` migrates them with every row and
/// the versions mapped, keeps their order, is idempotent, and new changes
/// then replace migrated rows.
#[tokio::test(flavor = "multi_thread")]
async fn init_migrates_old_version_columns() {
    let mut t = TestEnv::builder(&pg_versions()[0]).sinks(&[support::Sink::ClickHouse]).build().await;
    for sql in [
        "DROP TABLE enriched_engagements",
        "DROP TABLE content_dim",
        // The schema as it was before UInt128 versions.
        "CREATE TABLE content_dim (id UUID, slug String, title String, content_type LowCardinality(Nullable(String)),
           length_seconds Nullable(Int32), publish_ts DateTime64(3), version_ts_ms UInt64, _is_deleted UInt8 DEFAULT 0)
         ENGINE = ReplacingMergeTree(version_ts_ms, _is_deleted) ORDER BY id",
        "CREATE TABLE enriched_engagements (event_id UInt64, content_id UUID, user_id Nullable(UUID),
           event_type LowCardinality(Nullable(String)), event_ts DateTime64(3), duration_ms Nullable(Int32),
           device Nullable(String), engagement_seconds Nullable(Float64), engagement_percent Nullable(Float64),
           content_slug String, content_title String, content_type LowCardinality(String), length_seconds Nullable(Int32),
           publish_ts Nullable(DateTime64(3)), loaded_at DateTime DEFAULT now(), _version UInt64, _is_deleted UInt8 DEFAULT 0)
         ENGINE = ReplacingMergeTree(_version, _is_deleted) PARTITION BY toDate(event_ts) ORDER BY (event_ts, content_id, event_id)",
        // Event 1 in three versions (the highest in the middle), event 2
        // deleted. One part each, not collapsed on insert: nothing merges
        // them before init copies them (a merge needs two parts).
        "INSERT INTO enriched_engagements (event_id, content_id, event_ts, duration_ms, content_slug, content_title,
           content_type, _version, _is_deleted) SETTINGS optimize_on_insert = 0 VALUES
         (1, '00000000-0000-0000-0000-0000000000a1', 1700000000000, 10, 'a', 'A', 'podcast', bitOr(bitShiftLeft(toUInt64(100), 20), 3), 0),
         (1, '00000000-0000-0000-0000-0000000000a1', 1700000000000, 20, 'a', 'A', 'podcast', bitOr(bitShiftLeft(toUInt64(100), 20), 1048575), 0),
         (1, '00000000-0000-0000-0000-0000000000a1', 1700000000000, 30, 'a', 'A', 'podcast', bitOr(bitShiftLeft(toUInt64(99), 20), 7), 0),
         (2, '00000000-0000-0000-0000-0000000000a1', 1700000000000, 40, 'a', 'A', 'podcast', bitShiftLeft(toUInt64(101), 20), 0),
         (2, '00000000-0000-0000-0000-0000000000a1', 1700000000000, 40, 'a', 'A', 'podcast', bitOr(bitShiftLeft(toUInt64(101), 20), 1), 1)",
        "INSERT INTO content_dim (id, slug, title, content_type, length_seconds, publish_ts, version_ts_ms) SETTINGS optimize_on_insert = 0 VALUES
         ('00000000-0000-0000-0000-0000000000a1', 'a', 'old A', 'podcast', 100, 0, 1700000000001),
         ('00000000-0000-0000-0000-0000000000a1', 'a', 'older A', 'podcast', 100, 0, 1700000000000)",
    ] {
        t.ch().query(sql).execute().await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let types = || async {
        t.ch_rows::<(String, String, String)>(
            "SELECT table, name, type FROM system.columns WHERE database = currentDatabase()
               AND name IN ('_version', 'version_ts_ms') ORDER BY table",
        )
        .await
    };
    let versions = || async {
        t.ch_rows::<(u64, Option<i32>, u128, u8)>(
            "SELECT event_id, duration_ms, _version, _is_deleted FROM enriched_engagements ORDER BY _version",
        )
        .await
    };
    let v = |lsn: u64, ordinal: u32| Position { commit_lsn: lsn, ordinal }.version();
    let want = vec![
        (1, Some(30), v(99, 7), 0),
        (1, Some(10), v(100, 3), 0),
        (1, Some(20), v(100, 0xF_FFFF), 0),
        (2, Some(40), v(101, 0), 0),
        (2, Some(40), v(101, 1), 1),
    ];
    for run in 0..2 {
        pgfanout::commands::init::run(&t.cfg, false).await.unwrap_or_else(|e| panic!("init run {run}: {e}"));
        let want_types = [("content_dim", "_version", "UInt128"), ("enriched_engagements", "_version", "UInt128")]
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(types().await, want_types, "init run {run}");
        assert_eq!(versions().await, want, "init run {run}: every row, versions mapped");
        let leftovers = t
            .ch_count("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE '%v128%'")
            .await;
        assert_eq!(leftovers, 0, "init run {run}");
        let finals: Vec<(u64, Option<i32>)> =
            t.ch_rows("SELECT event_id, duration_ms FROM enriched_engagements FINAL").await;
        assert_eq!(finals, vec![(1, Some(20))], "init run {run}: the highest version wins, the delete hides event 2");
        let dim: Vec<(String, u128)> = t.ch_rows("SELECT title, _version FROM content_dim ORDER BY _version").await;
        assert_eq!(dim, vec![("older A".into(), 1_700_000_000_000), ("old A".into(), 1_700_000_000_001)]);
    }

    // A change streamed now outranks the migrated rows.
    t.start();
    t.pg.batch_execute(&format!("INSERT INTO content VALUES ('{A}', 'a', 'new A', 'podcast', 100, now())"))
        .await
        .unwrap();
    wait_until("content_dim shows the streamed title", WAIT, || async {
        let titles: Vec<String> = t.ch_rows("SELECT title FROM content_dim FINAL").await;
        titles == ["new A"]
    })
    .await;
    t.stop().await;
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct EventRow {
    duration_ms: Option<i32>,
    engagement_percent: Option<f64>,
    content_title: String,
    _version: u128,
}

/// A PostgreSQL whose WAL starts 64 MiB below 1000/0 (2^44, where the old
/// u64 version lost the LSN's top bits): one row updated before and after
/// the WAL crosses it, also twice in one transaction. ClickHouse (FINAL)
/// keeps the last values, and the HTTP events of the row carry strictly
/// increasing versions in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn updates_keep_their_order_past_lsn_1000_0() {
    const LSN_1000_0: u64 = 1 << 44;
    let pg = PrivatePostgres::start(Some("0000000100000FFF000000FC")).await;
    // The sinks it reads back: ClickHouse (the last version) and HTTP (every one).
    let mut t = TestEnv::builder("15")
        .on_server(&pg.url())
        .sinks(&[support::Sink::ClickHouse, support::Sink::Http])
        .build()
        .await;
    let start = t.wal_insert_lsn().await;
    assert!((0xFFF_FC00_0000..LSN_1000_0).contains(&start), "WAL at {start:x} after pg_resetwal");
    t.start();
    let update = |d: i32| format!("UPDATE engagement_events SET duration_ms = {d} WHERE id = 1");
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 100, now());
         INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES (1, '{A}', 'play', now(), 1000)"
    ))
    .await
    .unwrap();
    t.pg.batch_execute(&update(2000)).await.unwrap();
    assert!(t.wal_insert_lsn().await < LSN_1000_0, "the first changes must commit below 1000/0");
    // Each switch starts a new 16 MiB segment once the current one has WAL.
    t.pg.batch_execute("CREATE TABLE filler (x int)").await.unwrap();
    while t.wal_insert_lsn().await < LSN_1000_0 {
        t.pg.batch_execute("INSERT INTO filler VALUES (1); SELECT pg_switch_wal()").await.unwrap();
    }
    for d in [3000, 4000, 5000] {
        t.pg.batch_execute(&update(d)).await.unwrap();
    }
    t.pg.batch_execute(&format!("BEGIN; {}; {}; COMMIT", update(6000), update(7000))).await.unwrap();
    let durations: Vec<i64> = (1..=7).map(|i| i * 1000).collect();

    wait_until("HTTP holds the 7 events of row 1", WAIT, || async {
        t.http_get("_events").await.as_array().map_or(0, |a| a.len()) >= 7
    })
    .await;
    wait_until("ClickHouse FINAL holds the last update", WAIT, || async {
        let d: Vec<Option<i32>> = t.ch_rows("SELECT duration_ms FROM enriched_engagements FINAL").await;
        d == [Some(7000)]
    })
    .await;
    let rows: Vec<EventRow> = t
        .ch_rows("SELECT duration_ms, engagement_percent, content_title, _version FROM enriched_engagements FINAL")
        .await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!((r.duration_ms, r.engagement_percent, r.content_title.as_str()), (Some(7000), Some(7.0), "A"));
    let at = Position::from_version(r._version);
    assert!(at.commit_lsn >= LSN_1000_0, "last version at {at}");

    let events = t.http_get("_events").await;
    let events: Vec<_> = events.as_array().unwrap().iter().filter(|e| e["event"]["event_id"] == 1).collect();
    let seen: Vec<i64> = events.iter().map(|e| e["event"]["duration_ms"].as_i64().unwrap()).collect();
    assert_eq!(seen, durations, "HTTP events in commit order, each once");
    let positions: Vec<Position> = events
        .iter()
        .map(|e| {
            let hex = e["version"].as_str().unwrap_or_else(|| panic!("version is a hex string: {e}"));
            Position::from_sortable_hex(hex).unwrap_or_else(|| panic!("version {hex}"))
        })
        .collect();
    for w in events.windows(2) {
        assert!(w[0]["version"].as_str() < w[1]["version"].as_str(), "versions increase: {} then {}", w[0], w[1]);
    }
    assert!(positions[1].commit_lsn < LSN_1000_0 && positions[2].commit_lsn >= LSN_1000_0, "{positions:?}");
    assert_eq!(positions[5].commit_lsn, positions[6].commit_lsn, "the last two in one transaction");
    assert_eq!(positions[6].version(), r._version, "ClickHouse's version is the last event's");
    t.stop().await;
}
