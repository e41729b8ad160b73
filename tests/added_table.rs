//! A table added to `source.tables` (and so to the publication) while
//! `run` streams: `init` adds it, its changes stream from then on, and
//! `pgfanout snapshot --table` loads the rows it already held through the
//! same pipeline, safe while `run` keeps streaming.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use pgfanout::commands::backfill::{self, BackfillOptions};
use support::topics::read_topic;
use support::{pg_versions, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

async fn insert(t: &TestEnv, ids: std::ops::Range<i32>) {
    t.pg.execute(
        "INSERT INTO extra (id, v) SELECT g, 'v' || g FROM generate_series($1::int, $2::int) g",
        &[&ids.start, &(ids.end - 1)],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_mid_stream_is_snapshotted_while_run_streams() {
    let mut t = TestEnv::new(&pg_versions()[0]).await;
    t.start();
    t.pg.batch_execute("CREATE TABLE extra (id int PRIMARY KEY, v text)").await.unwrap();
    // Before the table is published: only the snapshot can bring these.
    insert(&t, 0..300).await;
    t.cfg.source.tables.push("public.extra".into());
    pgfanout::commands::init::run(&t.cfg, false).await.expect("init adds the table to the publication");
    // Published now: streamed by the running pipeline.
    insert(&t, 300..500).await;
    let topic = format!("{}public.extra", t.cfg.log.topic_prefix);
    read_topic(&t, &topic, WAIT, |r| r.len() >= 200).await;

    let opts = BackfillOptions {
        table: "extra".into(),
        column: None,
        range: None,
        workers: 2,
        chunk_rows: 100,
        log_only: false,
    };
    let report = backfill::run(&t.cfg, &opts).await.expect("snapshot --table while run streams");
    assert_eq!(report.rows, 500, "every row the table holds at the snapshot's point");
    insert(&t, 500..600).await;
    t.acked_everything(WAIT).await;

    let log = read_topic(&t, &topic, WAIT, |r| r.len() >= 800).await;
    let ids = |op: &str| -> Vec<i64> {
        log.iter().filter(|r| r.payload["op"] == op).map(|r| r.payload["after"]["id"].as_i64().unwrap()).collect()
    };
    let (read, created) = (ids("r"), ids("c"));
    assert_eq!(read.len(), 500, "each row of the snapshot once");
    assert_eq!(read.iter().collect::<HashSet<_>>().len(), 500);
    assert_eq!(
        read.iter().copied().collect::<HashSet<_>>(),
        (0..500).collect(),
        "the snapshot is the table at its point"
    );
    assert_eq!(created.len(), 300, "each change after the table was published once");
    assert_eq!(created.iter().copied().collect::<HashSet<_>>(), (300..600).collect());
    // Every row of the table is in the log, with its values.
    for r in log.iter().filter(|r| r.payload["op"] == "r") {
        let id = r.payload["after"]["id"].as_i64().unwrap();
        assert_eq!(r.payload["after"]["v"], format!("v{id}"), "{:?}", r.payload);
    }
    assert!(t.pipeline_is_running());
    t.stop().await;
}
