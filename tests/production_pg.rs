//! Production PostgreSQL, against the real services on every major that
//! scripts/test started: pgfanout run as a least-privilege role (neither
//! superuser nor owner of the tables) after an administrator ran what
//! `pgfanout init --print-sql` prints, with clear errors for what the role
//! lacks; and a partitioned `engagement_events`, published via its root,
//! with changes that move rows between partitions. Each ends with every sink
//! (ClickHouse, Redis streams and window, HTTP, the log) compared with
//! PostgreSQL's rows, value by value.

mod support;

use std::time::Duration;

use pgfanout::commands::backfill::{self, BackfillError, BackfillOptions};
use pgfanout::commands::init::{self, InitError};
use pgfanout::commands::snapshot::{self, SnapshotOptions, SnapshotOutcome};
use pgfanout::config::{Config, Secret};
use pgfanout::enrich::journal::JournalError;
use pgfanout::pipeline::PipelineError;
use pgfanout::source::slot::{self, SlotError};
use support::sinks::assert_every_sink_equals_postgres;
use support::{pg_versions, url_as, Setup, TestEnv};

const CONTENT: &str = "
INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
  ('00000000-0000-0000-0000-0000000000c1', 'pod', 'A podcast', 'podcast', 1200, now() - interval '1 year'),
  ('00000000-0000-0000-0000-0000000000c2', 'news', 'A newsletter', 'newsletter', 300, now() - interval '1 year'),
  ('00000000-0000-0000-0000-0000000000c3', 'vid', 'A video', 'video', NULL, now() - interval '1 year'),
  ('00000000-0000-0000-0000-0000000000c4', 'clip', 'A clip', 'video', 95, now() - interval '1 year');
";

/// `n` events from `first_id` on, spread over the current month and the
/// three before it (the recent ones inside the Redis window), with NULL
/// durations, devices and contents among them.
fn events(first_id: i64, n: i64) -> String {
    format!(
        "INSERT INTO engagement_events (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
         SELECT g,
                CASE WHEN g % 13 = 0 THEN NULL
                     ELSE ('00000000-0000-0000-0000-0000000000c' || (1 + g % 4))::uuid END,
                gen_random_uuid(),
                (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
                now() - (g % 4) * interval '1 month' - (g % 90) * interval '1 second' - (g % 1000) * interval '1 ms',
                CASE WHEN g % 10 = 0 THEN NULL ELSE (g * 7919) % 600000 END,
                CASE WHEN g % 7 = 0 THEN NULL ELSE 'dev-' || (g % 3) END,
                jsonb_build_object('g', g)
         FROM generate_series({first_id}::int8, {last}::int8) AS g",
        last = first_id + n - 1
    )
}

/// Live changes of every kind: inserts, updates in place, updates that move
/// an event to other content or to another month (another partition where
/// the table is partitioned; into and out of the Redis window), deletes.
const LIVE_CHANGES: &[&str] = &[
    "UPDATE engagement_events SET duration_ms = coalesce(duration_ms, 0) + 1111 WHERE id % 9 = 1",
    "UPDATE engagement_events SET content_id = '00000000-0000-0000-0000-0000000000c4' WHERE id % 11 = 2",
    // Three months ago -> now, and now -> two months ago.
    "UPDATE engagement_events SET event_ts = now() - interval '5 seconds' WHERE id % 4 = 3 AND id % 5 = 0",
    "UPDATE engagement_events SET event_ts = event_ts - interval '2 months' WHERE id % 4 = 0 AND id % 6 = 0",
    "DELETE FROM engagement_events WHERE id % 17 = 5",
];

fn backfill_everything() -> BackfillOptions {
    let now = chrono::Utc::now();
    BackfillOptions {
        table: "engagement_events".into(),
        column: None,
        range: Some((now - chrono::Duration::days(200), now + chrono::Duration::days(1))),
        workers: 2,
        chunk_rows: 100,
        log_only: false,
    }
}

/// `t`'s configuration connecting as `role`.
fn as_role(t: &TestEnv, role: &str) -> Config {
    let mut cfg = t.cfg.clone();
    cfg.source.url = Secret(url_as(t.cfg.source.url.expose(), role, "cdc-password"));
    cfg
}

/// What `pgfanout init --print-sql` prints for `cfg`, from the binary.
fn print_sql(t: &TestEnv, cfg: &Config) -> String {
    let dir = std::env::temp_dir().join(&t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("role.toml");
    std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfanout"))
        .args(["-c", path.to_str().unwrap(), "init", "--print-sql"])
        .output()
        .expect("run pgfanout init --print-sql");
    assert!(out.status.success(), "init --print-sql: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn least_privilege(v: &str) {
    let mut t = TestEnv::with_setup(
        v,
        Setup { sql: format!("{}{CONTENT}{}", init::POSTGRES_SCHEMA, events(1, 600)), skip_init: true },
    )
    .await;
    t.cfg.redis.as_mut().unwrap().stream_maxlen = 100_000_000;
    let role = format!("{}_cdc", t.name);
    t.pg.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'cdc-password'")).await.unwrap();
    let mut cfg = as_role(&t, &role);
    cfg.source.heartbeat_ms = 500;

    // Before the administrator's statements: the role cannot create the
    // publication, and `init` says which statement creates it.
    let e = init::run(&cfg, false).await.expect_err("init without the grants");
    let InitError::Journal(JournalError::Slot(SlotError::Privilege(p))) = &e else {
        panic!("PG {v}: not a missing privilege: {e}")
    };
    assert!(p.grant.starts_with(&format!("CREATE PUBLICATION \"{}\" FOR TABLE", t.name)), "PG {v}: {p}");
    assert!(e.to_string().contains(&p.grant), "PG {v}: the message gives the statement: {e}");

    // The administrator runs what `init --print-sql` prints, twice (it is idempotent).
    let sql = print_sql(&t, &cfg);
    assert!(!sql.contains("cdc-password"), "PG {v}: the password must not be printed");
    t.pg.batch_execute(&sql).await.unwrap_or_else(|e| panic!("PG {v}: the printed SQL: {e}\n{sql}"));
    t.pg.batch_execute(&sql).await.unwrap_or_else(|e| panic!("PG {v}: the printed SQL again: {e}"));
    let attrs: (bool, bool) =
        t.pg.query_one("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
    assert_eq!(attrs, (false, true), "PG {v}: the role is no superuser, and may replicate");

    // The demo schema is the administrator's: applying it is refused, saying what to do instead.
    let e = init::run(&cfg, true).await.expect_err("init with the source schema");
    assert!(matches!(e, InitError::SourceSchemaRefused(_)), "PG {v}: {e}");
    assert!(e.to_string().contains("--no-source-schema"), "PG {v}: {e}");

    // The whole flow as the role: init, the initial snapshot (its slot
    // recreated with an exported snapshot), run, live changes, a backfill
    // while it streams.
    init::run(&cfg, false).await.unwrap_or_else(|e| panic!("PG {v}: init as the role: {e}"));
    let opts = SnapshotOptions { chunk_rows: 100, recreate_slot: true, ..Default::default() };
    match snapshot::run(&cfg, &opts).await.unwrap_or_else(|e| panic!("PG {v}: snapshot as the role: {e}")) {
        SnapshotOutcome::Loaded { rows, .. } => assert_eq!(rows, 604, "PG {v}: 4 contents and 600 events"),
        other => panic!("PG {v}: {other:?}"),
    }
    t.cfg = cfg.clone();
    t.start();
    t.pg.batch_execute(&events(601, 200)).await.unwrap();
    for change in LIVE_CHANGES {
        t.pg.batch_execute(change).await.unwrap();
    }
    let report = backfill::run(&cfg, &backfill_everything()).await.unwrap_or_else(|e| panic!("PG {v}: backfill: {e}"));
    assert!(report.rows > 700, "PG {v}: backfilled {} rows", report.rows);
    t.pg.batch_execute("UPDATE engagement_events SET duration_ms = 4321 WHERE id % 50 = 7").await.unwrap();
    assert_every_sink_equals_postgres(&mut t, &format!("PG {v}, as the least-privilege role")).await;
    let owner: String =
        t.pg.query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'pgfanout_state' AND tablename = 'snapshots'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, role, "PG {v}: the role keeps its state in its own schema");
    t.stop().await;

    // A revoked SELECT: the backfill names the privilege and the GRANT.
    t.pg.batch_execute(&format!("REVOKE SELECT ON engagement_events FROM {role}")).await.unwrap();
    let e = backfill::run(&cfg, &backfill_everything()).await.expect_err("backfill without SELECT");
    let BackfillError::Privilege(p) = &e else { panic!("PG {v}: not a missing privilege: {e}") };
    assert_eq!(p.privilege, "SELECT on \"public\".\"engagement_events\"", "PG {v}: {e}");
    assert_eq!(p.grant, format!("GRANT SELECT ON TABLE \"public\".\"engagement_events\" TO \"{role}\";"), "PG {v}");
    let text = e.to_string();
    assert!(text.contains("permission denied for table engagement_events"), "PG {v}: {text}");
    assert!(text.contains(&role), "PG {v}: {text}");

    // Without REPLICATION, `run` stops at once naming the attribute.
    t.pg.batch_execute(&format!("ALTER ROLE {role} NOREPLICATION")).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let run = pgfanout::pipeline::run(cfg.clone(), stopped, Default::default());
    let e = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("run stops by itself")
        .expect_err("run without REPLICATION");
    let PipelineError::Privilege(p) = &e else { panic!("PG {v}: not a missing privilege: {e}") };
    assert!(p.privilege.contains("REPLICATION"), "PG {v}: {e}");
    assert!(p.grant.starts_with(&format!("ALTER ROLE \"{role}\" WITH REPLICATION;")), "PG {v}: {e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_least_privilege_role_runs_the_whole_flow_and_is_told_what_it_lacks() {
    let _logs = support::logs::capture();
    for v in pg_versions() {
        least_privilege(&v).await;
    }
}

/// `engagement_events` partitioned by month of `event_ts` (so its key is
/// `(id, event_ts)`), a partition for each of the last four months and the
/// next; `init` then leaves the tables alone.
const PARTITIONED: &str = "
CREATE TABLE content (
    id              UUID PRIMARY KEY,
    slug            TEXT UNIQUE NOT NULL,
    title           TEXT        NOT NULL,
    content_type    TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds  INTEGER,
    publish_ts      TIMESTAMPTZ NOT NULL
);
CREATE TABLE engagement_events (
    id           BIGSERIAL,
    content_id   UUID REFERENCES content(id),
    user_id      UUID,
    event_type   TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts     TIMESTAMPTZ NOT NULL,
    duration_ms  INTEGER,
    device       TEXT,
    raw_payload  JSONB,
    PRIMARY KEY (id, event_ts)
) PARTITION BY RANGE (event_ts);
DO $$
DECLARE
  m timestamptz;
BEGIN
  FOR i IN -4..1 LOOP
    m := date_trunc('month', now()) + make_interval(months => i);
    EXECUTE format('CREATE TABLE %I PARTITION OF engagement_events FOR VALUES FROM (%L) TO (%L)',
                   'engagement_events_' || to_char(m, 'YYYY_MM'), m, m + interval '1 month');
  END LOOP;
END $$;
";

/// Live events per partition, as PostgreSQL routes them.
async fn rows_per_partition(t: &TestEnv) -> Vec<(String, i64)> {
    t.pg.query("SELECT tableoid::regclass::text, count(*) FROM engagement_events GROUP BY 1 ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn partitioned(v: &str) {
    let mut t = TestEnv::with_setup(v, Setup { sql: PARTITIONED.to_string(), skip_init: false }).await;
    t.cfg.redis.as_mut().unwrap().stream_maxlen = 100_000_000;
    let (via_root, published): (bool, Vec<String>) = (
        t.pg.query_one("SELECT pubviaroot FROM pg_publication WHERE pubname = $1", &[&t.name]).await.unwrap().get(0),
        t.pg.query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&t.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect(),
    );
    assert!(via_root, "PG {v}: the publication publishes partitions via their root");
    assert_eq!(published, ["public.content", "public.engagement_events"], "PG {v}");
    let identities: Vec<(String, String)> =
        t.pg.query(
            "SELECT c.relname::text, c.relreplident::text FROM pg_partition_tree('engagement_events') p
               JOIN pg_class c ON c.oid = p.relid WHERE c.relreplident <> 'f' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(identities.is_empty(), "PG {v}: init gives every partition REPLICA IDENTITY FULL: {identities:?}");

    // Rows in four partitions before the slot; the snapshot reads them
    // through the parent, in chunks of its (id, event_ts) key's id.
    t.pg.batch_execute(&format!("{CONTENT}{}", events(1, 600))).await.unwrap();
    let before = rows_per_partition(&t).await;
    assert!(before.len() >= 4, "PG {v}: rows in four partitions (five across a month's turn): {before:?}");
    t.pg.execute("SELECT pg_drop_replication_slot($1)", &[&t.name]).await.unwrap();
    let opts = SnapshotOptions { chunk_rows: 100, ..Default::default() };
    match snapshot::run(&t.cfg, &opts).await.expect("snapshot") {
        SnapshotOutcome::Loaded { rows, chunks, .. } => {
            assert_eq!(rows, 604, "PG {v}");
            assert!(chunks >= 6, "PG {v}: the events are read in several chunks, got {chunks}");
        }
        other => panic!("PG {v}: {other:?}"),
    }

    // Streamed changes in every partition, rows moving between them (an
    // UPDATE of the partition key is a delete from one partition and an
    // insert into another), a backfill through the parent while it streams.
    t.start();
    t.pg.batch_execute(&events(601, 200)).await.unwrap();
    for change in LIVE_CHANGES {
        t.pg.batch_execute(change).await.unwrap();
    }
    let moved: i64 =
        t.pg.query_one(
            "WITH m AS (UPDATE engagement_events SET event_ts = event_ts - interval '1 month'
                         WHERE id % 4 = 1 AND id % 3 = 0 RETURNING 1) SELECT count(*) FROM m",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved > 20, "PG {v}: moved {moved} rows a month back");
    let report = backfill::run(&t.cfg, &backfill_everything()).await.expect("backfill");
    assert!(report.rows > 700, "PG {v}: backfilled {} rows", report.rows);
    t.pg.batch_execute(
        "UPDATE engagement_events SET event_ts = now() - interval '2 seconds', duration_ms = 60000 WHERE id IN (8, 12, 16)",
    )
    .await
    .unwrap();
    assert_ne!(rows_per_partition(&t).await, before, "PG {v}: the partitions' rows changed");
    assert_every_sink_equals_postgres(&mut t, &format!("PG {v}, partitioned engagement_events")).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_engagement_events_reaches_every_sink_as_one_table() {
    for v in pg_versions() {
        partitioned(&v).await;
    }
}

async fn partition_root_and_identity(v: &str, logs: &support::logs::Logs) {
    let t = TestEnv::with_setup(v, Setup { sql: PARTITIONED.to_string(), skip_init: false }).await;
    // A publication of old, its partitions published under their own names.
    t.pg.batch_execute(&format!("ALTER PUBLICATION {} SET (publish_via_partition_root = false)", t.name))
        .await
        .unwrap();
    let e = slot::ensure_publication(&t.pg, &t.cfg.source).await.expect_err("partitions not via their root");
    assert!(matches!(e, SlotError::PartitionsNotViaRoot { .. }), "PG {v}: {e}");
    let fix = format!("ALTER PUBLICATION {} SET (publish_via_partition_root = true)", t.name);
    assert!(e.to_string().contains(&fix), "PG {v}: {e}");
    // `run` refuses to start on it rather than miss the partitions' changes.
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let e = pgfanout::pipeline::run(t.cfg.clone(), stopped, Default::default()).await.expect_err("run refuses");
    assert!(e.to_string().contains(&fix), "PG {v}: {e}");

    // `init` sets it, and the publication lists the table itself again.
    init::run(&t.cfg, false).await.expect("init");
    let via_root: bool =
        t.pg.query_one("SELECT pubviaroot FROM pg_publication WHERE pubname = $1", &[&t.name]).await.unwrap().get(0);
    assert!(via_root, "PG {v}");
    slot::ensure_publication(&t.pg, &t.cfg.source).await.expect("a publication via the root");

    // A partition created later starts with REPLICA IDENTITY DEFAULT: the
    // start warns, naming it and the statement.
    t.pg.batch_execute(
        "CREATE TABLE engagement_events_later PARTITION OF engagement_events
           FOR VALUES FROM ('2100-01-01') TO ('2100-02-01')",
    )
    .await
    .unwrap();
    let warned = [t.name.as_str(), "WARN", "ALTER TABLE engagement_events_later REPLICA IDENTITY FULL;"];
    assert!(logs.lines_with(&warned).is_empty(), "PG {v}: no warning before");
    slot::ensure_publication(&t.pg, &t.cfg.source).await.expect("ensure_publication");
    assert_eq!(logs.lines_with(&warned).len(), 1, "PG {v}: the warning names the new partition");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_are_published_via_their_root_with_the_tables_replica_identity() {
    let logs = support::logs::capture();
    for v in pg_versions() {
        partition_root_and_identity(&v, &logs).await;
    }
}
