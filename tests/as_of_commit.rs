//! Enrichment as of each commit across downtime: events and content changes
//! committed while pgfanout is stopped (an event before its content exists,
//! content updated between two events of it and inside one transaction,
//! content deleted, content changed again after the last event) reach every
//! sink with the content their own commit saw, which PostgreSQL computes in
//! the same transaction as each event's write.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use redis::AsyncCommands;
use support::{pg_versions, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

/// The enriched fields of one event change, as PostgreSQL computes them.
#[derive(Debug, Clone, PartialEq)]
struct Enriched {
    event_id: i64,
    slug: Option<String>,
    title: Option<String>,
    content_type: Option<String>,
    length_seconds: Option<i32>,
    publish_ts_ms: Option<i64>,
    /// `round(duration_ms / 1000.0 / length_seconds * 100, 2)` as text.
    percent: Option<String>,
}

const JOIN: &str = "SELECT e.id, c.slug, c.title, c.content_type, c.length_seconds, \
     floor(extract(epoch FROM c.publish_ts) * 1000)::int8, \
     round(e.duration_ms / 1000.0 / nullif(c.length_seconds, 0) * 100, 2)::text \
     FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id WHERE e.id = $1";

/// Runs `statements` (event writes returning ids, content changes) in one
/// transaction; after each statement that returns event ids, records what
/// PostgreSQL's join gives for them inside that transaction.
async fn tx(t: &TestEnv, statements: &[&str], changes: &mut Vec<Enriched>) {
    t.pg.batch_execute("BEGIN").await.unwrap();
    for sql in statements {
        let rows = t.pg.query(*sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        for r in rows {
            let id: i64 = r.get(0);
            let j = t.pg.query_one(JOIN, &[&id]).await.unwrap();
            changes.push(Enriched {
                event_id: j.get(0),
                slug: j.get(1),
                title: j.get(2),
                content_type: j.get(3),
                length_seconds: j.get(4),
                publish_ts_ms: j.get(5),
                percent: j.get(6),
            });
        }
    }
    t.pg.batch_execute("COMMIT").await.unwrap();
}

fn ev(content: &str, duration_ms: i32) -> String {
    format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) \
         VALUES ('{content}', 'play', now(), {duration_ms}) RETURNING id"
    )
}

const A: &str = "00000000-0000-4000-8000-00000000000a";
const X: &str = "00000000-0000-4000-8000-00000000000b";

fn percent(v: Option<f64>) -> Option<String> {
    v.map(|p| format!("{p:.2}"))
}

fn from_json(e: &serde_json::Value) -> Enriched {
    let s = |k: &str| e[k].as_str().map(str::to_string);
    Enriched {
        event_id: e["event_id"].as_i64().expect("event_id"),
        slug: s("content_slug"),
        title: s("content_title"),
        content_type: s("content_type"),
        length_seconds: e["length_seconds"].as_i64().map(|l| l as i32),
        publish_ts_ms: e["publish_ts"].as_i64(),
        percent: percent(e["engagement_percent"].as_f64()),
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ChRow {
    event_id: u64,
    content_slug: String,
    content_title: String,
    content_type: String,
    length_seconds: Option<i32>,
    publish_ts_ms: Option<i64>,
    engagement_percent: Option<f64>,
}

async fn downtime(v: &str) {
    let mut t = TestEnv::new(v).await;
    // Events may name content that does not exist (yet): a schema without
    // the foreign key, as many have.
    t.pg.batch_execute("ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey")
        .await
        .unwrap();
    let mut changes = Vec::new();
    t.start();
    let content_a =
        format!("INSERT INTO content VALUES ('{A}', 'a', 'Alpha', 'podcast', 100, '2026-01-01 00:00:00.1239+00')");
    tx(&t, &[&content_a], &mut changes).await;
    tx(&t, &[&ev(A, 30_000)], &mut changes).await;
    let end = t.wal_insert_lsn().await;
    wait_until("the live event is acknowledged", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    t.stop().await;

    // Downtime: every order of events and content changes.
    tx(&t, &[&ev(X, 50_000)], &mut changes).await; // before X exists
    tx(&t, &[&format!("INSERT INTO content VALUES ('{X}', 'x', 'Ex', 'video', 200, now())")], &mut changes).await;
    tx(&t, &[&ev(X, 50_000)], &mut changes).await; // 25 % of 200 s
    let e2: i64 = t.pg.query_one("SELECT max(id) FROM engagement_events", &[]).await.unwrap().get(0);
    tx(
        &t,
        &[&format!("UPDATE content SET length_seconds = 400, content_type = 'newsletter' WHERE id = '{X}'")],
        &mut changes,
    )
    .await;
    tx(&t, &[&ev(X, 50_000)], &mut changes).await; // 12.5 % of 400 s
    tx(&t, &[&format!("UPDATE engagement_events SET duration_ms = 60000 WHERE id = {e2} RETURNING id")], &mut changes)
        .await;
    tx(&t, &[&ev(A, 10_000)], &mut changes).await;
    tx(&t, &[&format!("DELETE FROM content WHERE id = '{A}'")], &mut changes).await;
    tx(&t, &[&ev(A, 10_000)], &mut changes).await; // content gone
    tx(
        &t,
        &[
            &ev(X, 20_000),
            &format!("UPDATE content SET length_seconds = 1000, title = 'Ex 2' WHERE id = '{X}'"),
            &ev(X, 20_000),
        ],
        &mut changes,
    )
    .await;
    // Changed after the last event: no event may show it.
    t.pg.batch_execute(&format!("UPDATE content SET title = 'later', length_seconds = 7 WHERE id = '{X}'"))
        .await
        .unwrap();
    t.pg.batch_execute(&format!("INSERT INTO content VALUES ('{A}', 'a2', 'Alpha again', 'video', 50, now())"))
        .await
        .unwrap();

    t.start();
    let end = t.wal_insert_lsn().await;
    wait_until("the backlog is acknowledged", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;

    // ClickHouse: each event's last change.
    let mut last: BTreeMap<i64, Enriched> = BTreeMap::new();
    for c in &changes {
        last.insert(c.event_id, c.clone());
    }
    let rows = t
        .ch_rows::<ChRow>(
            "SELECT event_id, content_slug, content_title, content_type, length_seconds, \
             toUnixTimestamp64Milli(publish_ts) AS publish_ts_ms, engagement_percent \
             FROM enriched_engagements FINAL ORDER BY event_id",
        )
        .await;
    let got: BTreeMap<i64, Enriched> = rows
        .into_iter()
        .map(|r| {
            let opt = |s: String| (!s.is_empty()).then_some(s);
            let e = Enriched {
                event_id: r.event_id as i64,
                slug: opt(r.content_slug),
                title: opt(r.content_title),
                content_type: opt(r.content_type),
                length_seconds: r.length_seconds,
                publish_ts_ms: r.publish_ts_ms,
                percent: percent(r.engagement_percent),
            };
            (e.event_id, e)
        })
        .collect();
    assert_eq!(got, last, "PG {v}: ClickHouse FINAL against PostgreSQL's join as of each commit");

    // HTTP: every change, in commit order, with its values.
    wait_until("HTTP has every change", WAIT, || async {
        t.http_get("_stats").await["events"].as_u64() == Some(changes.len() as u64)
    })
    .await;
    let http: Vec<Enriched> =
        t.http_get("_events").await.as_array().unwrap().iter().map(|e| from_json(&e["event"])).collect();
    assert_eq!(http, changes, "PG {v}: HTTP events against PostgreSQL's join as of each commit");

    // Redis: each change's stream entry, in the stream of its own content type.
    let mut r = t.redis();
    let keys: Vec<String> = r.keys(format!("{}stream:*", t.cfg.redis.as_ref().unwrap().key_prefix)).await.unwrap();
    let mut streamed = Vec::new();
    for k in keys {
        let reply: redis::streams::StreamRangeReply = r.xrange_all(&k).await.unwrap();
        for entry in reply.ids {
            let data: String = entry.get("data").unwrap();
            let doc: serde_json::Value = serde_json::from_str(&data).unwrap();
            let e = from_json(&doc["event"]);
            let stream_type = k.rsplit(':').next().unwrap().to_string();
            let expected_type = e.content_type.clone().unwrap_or_else(|| "unknown".into());
            assert_eq!(stream_type, expected_type, "PG {v}: {e:?} in {k}");
            streamed.push((doc["id"].as_str().unwrap().to_string(), e));
        }
    }
    let streamed: Vec<Enriched> = streamed.into_iter().map(|(_, e)| e).collect();
    assert_eq!(streamed.len(), changes.len(), "PG {v}: Redis stream entries");
    for e in &changes {
        assert!(streamed.contains(e), "PG {v}: Redis streams lack {e:?}: {streamed:#?}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn enrichment_is_as_of_each_commit_across_downtime() {
    for v in pg_versions() {
        downtime(&v).await;
    }
}

/// The journal's own arithmetic against real PostgreSQL: a load as of any
/// position returns each id's latest version before it unless deleted or
/// truncated since, and pruning below a position changes no load at or
/// above it.
async fn journal_as_of(v: &str) {
    use pgfanout::enrich::{journal, Content, ContentVersion, VersionKind};
    use pgfanout::source::Position;
    // No sink: the test reads and writes PostgreSQL alone.
    let t = TestEnv::builder(v).sinks(&[]).build().await;
    let slot = format!("{}_j", t.name);
    let uuid = |n: u128| uuid::Uuid::from_u128(n);
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{}', 'one', 'One', 'video', 10, '1969-12-31 23:59:59.9995+00'), \
         ('{}', 'two', 'Two', NULL, NULL, now())",
        uuid(1),
        uuid(2)
    ))
    .await
    .unwrap();
    assert_eq!(journal::seed(&t.pg, &slot, None).await.unwrap(), 2);
    let content = |id: u128, len: i32| Content {
        id: uuid(id),
        slug: format!("s{id}-{len}"),
        title: "T".into(),
        content_type: Some("podcast".into()),
        length_seconds: Some(len),
        publish_ts: -1,
    };
    let at = |lsn: u64, ordinal: u32, kind| ContentVersion { position: Position { commit_lsn: lsn, ordinal }, kind };
    let versions = vec![
        at(0x100, 0, VersionKind::Row(content(1, 20))),
        at(0x100, 1, VersionKind::Row(content(3, 30))),
        at(0x200, 0, VersionKind::Deleted(uuid(2))),
        at(0x300, 2, VersionKind::Truncated),
        at(0x300, 3, VersionKind::Row(content(3, 31))),
        at(0x400, 0, VersionKind::Row(content(1, 40))),
    ];
    journal::append(&t.pg, &slot, &versions).await.unwrap();
    // A replay appends the same versions again: nothing changes.
    journal::append(&t.pg, &slot, &versions[2..]).await.unwrap();
    let load = |as_of: u64| {
        let (pg, slot) = (&t.pg, slot.clone());
        async move {
            let dim = journal::load(pg, &slot, as_of).await.unwrap();
            let mut ids: Vec<(u128, Option<i32>)> =
                (1..=3).filter_map(|i| dim.get(&uuid(i)).map(|c| (i, c.length_seconds))).collect();
            ids.sort();
            ids
        }
    };
    let expect = [
        (0x0, vec![(1, Some(10)), (2, None)]),
        (0x100, vec![(1, Some(10)), (2, None)]),
        (0x101, vec![(1, Some(20)), (2, None), (3, Some(30))]),
        (0x201, vec![(1, Some(20)), (3, Some(30))]),
        (0x301, vec![(3, Some(31))]),
        (0x401, vec![(1, Some(40)), (3, Some(31))]),
    ];
    for (as_of, want) in &expect {
        assert_eq!(&load(*as_of).await, want, "PG {v}: load as of {as_of:#x}");
    }
    // publish_ts floored to the millisecond, before 1970 too.
    let dim = journal::load(&t.pg, &slot, 0x100).await.unwrap();
    assert_eq!(dim.get(&uuid(1)).unwrap().publish_ts, -1);

    assert_eq!(journal_rows(&t.pg, &slot).await, 8);
    journal::prune(&t.pg, &slot, 0x301).await.unwrap();
    // Left: the row after the truncate and the version not yet below the cut.
    assert_eq!(journal_rows(&t.pg, &slot).await, 2);
    for (as_of, want) in &expect[4..] {
        assert_eq!(&load(*as_of).await, want, "PG {v}: load as of {as_of:#x} after pruning");
    }
    journal::prune(&t.pg, &slot, 0x401).await.unwrap();
    assert_eq!(journal_rows(&t.pg, &slot).await, 2);
    assert_eq!(load(0x401).await, expect[5].1);
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_loads_as_of_any_position_and_prunes_what_no_load_needs() {
    for v in pg_versions() {
        journal_as_of(&v).await;
    }
}

async fn journal_rows(pg: &tokio_postgres::Client, slot: &str) -> i64 {
    pg.query_one("SELECT count(*) FROM pgfanout_state.content_versions WHERE slot = $1", &[&slot]).await.unwrap().get(0)
}
