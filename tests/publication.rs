//! A table added to `source.tables` after `init`: `run` warns that the
//! publication lacks it, `init` adds it (and says so), and its changes flow
//! from then on.

mod support;

use std::time::Duration;

use support::{logs, pg_versions, wait_until, Sink, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const A: &str = "00000000-0000-0000-0000-0000000000a1";

async fn published(t: &TestEnv) -> Vec<String> {
    t.pg.query(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
        &[&t.cfg.source.publication],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn table_added_after_init(v: &str, logs: &logs::Logs) {
    // One sink, to show the table's changes flow: ClickHouse.
    let mut t = TestEnv::builder(v).sinks(&[Sink::ClickHouse]).build().await;
    let name = t.name.clone();
    // As first set up: init with the content table alone.
    t.pg.batch_execute(&format!("DROP PUBLICATION {}", t.name)).await.unwrap();
    let mut one = t.cfg.clone();
    one.source.tables = vec!["public.content".into()];
    pgfanout::commands::init::run(&one, false).await.unwrap();
    assert_eq!(published(&t).await, ["public.content"], "PG {v}");

    // `run` with both tables configured says which one is not published.
    t.start();
    let warned = [name.as_str(), "WARN", "disagree", "missing=public.engagement_events"];
    wait_until("run warns about the missing table", WAIT, || async { !logs.lines_with(&warned).is_empty() }).await;
    t.stop().await;
    let warnings = logs.lines_with(&warned).len();

    // `init` with both adds it and says so; nothing more the second time.
    pgfanout::commands::init::run(&t.cfg, false).await.unwrap();
    assert_eq!(published(&t).await, ["public.content", "public.engagement_events"], "PG {v}");
    let added = [name.as_str(), "added tables to the publication", "added=public.engagement_events"];
    assert_eq!(logs.lines_with(&added).len(), 1, "PG {v}");
    pgfanout::commands::init::run(&t.cfg, false).await.unwrap();
    assert_eq!(logs.lines_with(&added).len(), 1, "PG {v}: the second init changes nothing");

    // Its changes now reach the sinks, enriched as PostgreSQL computes them.
    t.start();
    t.pg.batch_execute(&format!(
        "INSERT INTO content VALUES ('{A}', 'a', 'A', 'podcast', 700, now());
         INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms) VALUES (1, '{A}', 'play', now(), 12345)"
    ))
    .await
    .unwrap();
    let pg_percent: f64 =
        t.pg.query_one(
            "SELECT round(e.duration_ms / 1000.0 / c.length_seconds * 100, 2)::float8
               FROM engagement_events e JOIN content c ON c.id = e.content_id WHERE e.id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_until("ClickHouse holds the event", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    let (percent, slug): (Option<f64>, String) = t
        .ch()
        .query("SELECT engagement_percent, content_slug FROM enriched_engagements FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((percent, slug.as_str()), (Some(pg_percent), "a"), "PG {v}");
    assert_eq!(logs.lines_with(&warned).len(), warnings, "PG {v}: no warning once they agree");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn init_adds_tables_missing_from_the_publication() {
    let logs = logs::capture();
    for v in pg_versions() {
        table_added_after_init(&v, &logs).await;
    }
}
