//! A failover on PostgreSQL 17+: `run` on a multi-host `source.url`
//! (primary, then its physical standby) streams a workload; once the
//! standby's copy of the failover slot is synchronized and caught up, the
//! standby is promoted and the old primary stopped as a crash would stop
//! it. The running pgfanout reconnects through its retry loop, finds the
//! new primary in the host list and goes on from the synchronized slot
//! while writes go on there: every sink ends equal to PostgreSQL, with
//! every change once. Before that, the host choice itself against the real
//! pair: a standby listed first is passed over, a list without a primary
//! is refused naming the hosts.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pgfanout::source::slot::{self, SlotError};
use pgfanout::source::Lsn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use support::private::PrivatePostgres;
use support::sinks::assert_every_sink_equals_postgres;
use support::topics::read_topic;
use support::workload::{self, Progress};
use support::{pg_versions, wait_until, TestEnv};

/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "pgfanout_standby";

/// How long the standby may take to synchronize pgfanout's slot.
const SYNC_PATIENCE: Duration = Duration::from_secs(300);

const CONTENTS: [&str; 4] = [
    "00000000-0000-0000-0000-0000000000f1",
    "00000000-0000-0000-0000-0000000000f2",
    "00000000-0000-0000-0000-0000000000f3",
    "00000000-0000-0000-0000-0000000000f4",
];

/// `rounds` rounds of inserts, updates in place, moves to other content
/// and deletes; ids from `first_id` on (the serial, after earlier rounds
/// on this or the other server), each round's row changes added to `progress`.
async fn mixed_writes(pg: tokio_postgres::Client, progress: Arc<Progress>, first_id: i64, rounds: u32, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pg = &pg;
    let count = |sql: String| async move { pg.execute(sql.as_str(), &[]).await.unwrap() };
    let mut max_id = first_id - 1;
    for _ in 0..rounds {
        let rows: Vec<String> = (0..200)
            .map(|_| {
                let content = CONTENTS[rng.gen_range(0..CONTENTS.len())];
                workload::play(content, &workload::nullable_duration(&mut rng))
            })
            .collect();
        let inserted = count(workload::insert_plays(&rows)).await;
        max_id += inserted as i64;
        let recent = |rng: &mut StdRng, k| {
            (0..k).map(|_| rng.gen_range(first_id..=max_id).to_string()).collect::<Vec<_>>().join(",")
        };
        let lengthened = count(workload::lengthen(&recent(&mut rng, 60), 1_500)).await;
        let moved = count(workload::move_to(CONTENTS[rng.gen_range(0..CONTENTS.len())], &recent(&mut rng, 15))).await;
        let deleted = count(workload::delete(&recent(&mut rng, 20))).await;
        progress.add(inserted + lengthened + moved + deleted);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `confirmed_flush_lsn` of `slot` on `server`, when the slot is there,
/// synchronized from the primary and persistent (a slot the standby has
/// not yet made persistent is dropped at promotion).
async fn synced_position(server: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = server
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND synced AND NOT temporary",
            &[&slot],
        )
        .await
        .unwrap()?;
    row.get::<_, Option<String>>(0).map(|l| Lsn::parse(&l).unwrap().0)
}

/// A plain connection to one server, standby or not (`slot::connect`
/// would pass a standby over).
async fn direct(port: u16, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=pgfanout dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    tokio::spawn(conn);
    client
}

async fn lsn(client: &tokio_postgres::Client, sql: &str) -> u64 {
    let text: Option<String> = client.query_one(sql, &[]).await.unwrap().get(0);
    text.map_or(0, |l| Lsn::parse(&l).unwrap().0)
}

async fn host_choice(v: &str, primary: &PrivatePostgres, standby: &PrivatePostgres, logs: &support::logs::Logs) {
    let (p, s) = (primary.port, standby.port);
    let (_, chosen) =
        slot::connect_primary(&format!("host=127.0.0.1,127.0.0.1 port={s},{p} user=pgfanout dbname=postgres"))
            .await
            .unwrap_or_else(|e| panic!("PG {v}: standby listed first: {e}"));
    assert_eq!(chosen.to_string(), format!("127.0.0.1:{p}"), "PG {v}: the primary is chosen");
    let skipped = logs.lines_with(&["skipping a standby (in recovery)", &format!("127.0.0.1:{s}")]);
    assert!(!skipped.is_empty(), "PG {v}: the standby passed over is logged");

    let dead = support::free_port();
    let only_standby =
        format!("postgres://pgfanout@127.0.0.1:{dead},127.0.0.1:{s}/postgres?target_session_attrs=read-write");
    let e = slot::connect(&only_standby).await.err().unwrap_or_else(|| panic!("PG {v}: no primary, yet connected"));
    assert!(matches!(e, SlotError::NoPrimary { .. }), "PG {v}: {e}");
    let text = e.to_string();
    assert!(text.contains(&format!("127.0.0.1:{dead}: cannot connect to PostgreSQL")), "PG {v}: {text}");
    assert!(text.contains(&format!("127.0.0.1:{s}: a standby (in recovery)")), "PG {v}: {text}");
}

async fn promotion(v: &str, logs: &support::logs::Logs) {
    let primary = PrivatePostgres::start_major(v).await;
    let standby = primary.standby(STANDBY_SLOT).await;
    host_choice(v, &primary, &standby, logs).await;

    // The URL lists the primary, then the standby, as libpq allows.
    let url = format!(
        "postgres://pgfanout@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let mut t = TestEnv::builder(v)
        .on_server(&url)
        .with(|c| c.redis.as_mut().unwrap().stream_maxlen = 10_000_000)
        .build()
        .await;
    let failover: bool =
        t.pg.query_one("SELECT failover FROM pg_replication_slots WHERE slot_name = $1", &[&t.name])
            .await
            .unwrap()
            .get(0);
    assert!(failover, "PG {v}: init created a failover slot");
    for (i, id) in CONTENTS.iter().enumerate() {
        let kind = ["podcast", "newsletter", "video", "video"][i];
        t.pg.execute(
            "INSERT INTO content VALUES ($1::text::uuid, $2, $3, $4, $5, now())",
            &[id, &format!("c-{i}"), &format!("Content {i}"), &kind, &(300 * (i as i32 + 1))],
        )
        .await
        .unwrap();
    }
    t.start();

    let before = workload::spawn(&t, |pg, progress| mixed_writes(pg, progress, 1, 15, 1));
    let progress_before = before.progress();
    before.finish().await;
    t.acked_everything(Duration::from_secs(120)).await;

    // The standby has every change and pgfanout's slot as the primary has it.
    let on_standby = direct(standby.port, &t.name).await;
    let acked = t.confirmed_flush_lsn().await;
    let written = t.wal_insert_lsn().await;
    wait_until("the standby replayed everything the primary wrote", Duration::from_secs(60), || async {
        lsn(&on_standby, "SELECT pg_last_wal_replay_lsn()::text").await >= written
    })
    .await;
    let synced = async {
        loop {
            if synced_position(&on_standby, &t.name).await.is_some_and(|l| l >= acked) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // The standby's worker naps up to 30 s between rounds while nothing changes.
    let waited = std::time::Instant::now();
    if tokio::time::timeout(SYNC_PATIENCE, synced).await.is_err() {
        let slots = on_standby
            .query(
                "SELECT slot_name::text, synced, temporary, confirmed_flush_lsn::text FROM pg_replication_slots",
                &[],
            )
            .await
            .unwrap();
        let slots: Vec<(String, bool, bool, Option<String>)> =
            slots.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        panic!(
            "PG {v}: the standby's slot {} was not synchronized up to {} in {SYNC_PATIENCE:?}: {slots:?}\nstandby log:\n{}",
            t.name,
            Lsn(acked).to_pg_string(),
            standby.log()
        );
    }
    eprintln!("PG {v}: the standby's copy of the slot caught up in {:?}", waited.elapsed());
    drop(on_standby);

    // The failover: the standby promoted, the old primary gone at once.
    standby.promote();
    primary.stop_immediately();
    t.pg = slot::connect(t.cfg.source.url.expose()).await.expect("connect to the new primary");
    let port: i32 = t.pg.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port, standby.port as i32, "PG {v}: the URL now leads to the promoted standby");

    // Writes go on there while pgfanout finds it.
    let max_id: i64 = t.pg.query_one("SELECT coalesce(max(id), 0) FROM engagement_events", &[]).await.unwrap().get(0);
    let after = workload::spawn(&t, move |pg, progress| mixed_writes(pg, progress, max_id + 1, 15, 2));
    let progress_after = after.progress();
    after.finish().await;
    assert_every_sink_equals_postgres(&mut t, &format!("PG {v}, after the promotion")).await;
    let started = logs.lines_with(&["replication started", &t.name, &format!("127.0.0.1:{}", standby.port)]);
    assert!(!started.is_empty(), "PG {v}: the running pgfanout reconnected to the promoted standby by itself");

    // Nothing twice: each change once in the log, in the HTTP receiver and
    // in the Redis streams.
    let total = progress_before.changes() + progress_after.changes();
    let topic = format!("{}public.engagement_events", t.cfg.log.topic_prefix);
    // To its end (a record twice may come after all the others).
    // The change records: a delete's tombstone shares its position.
    let records: Vec<_> = read_topic(&t, &topic, Duration::from_secs(15), |_| false)
        .await
        .into_iter()
        .filter(|r| r.headers.get("pgfanout.kind").is_some_and(|k| k == "change"))
        .collect();
    let mut positions: Vec<(u64, u64)> = records
        .iter()
        .map(|r| {
            // pgfanout's position travels in a header, `<commit LSN>/<ordinal>`.
            let (lsn, ordinal) = r.headers["pgfanout.position"].split_once('/').expect("<commit lsn>/<ordinal>");
            (lsn.parse().unwrap(), ordinal.parse().unwrap())
        })
        .collect();
    positions.sort();
    positions.dedup();
    assert_eq!(
        (records.len() as u64, positions.len() as u64),
        (total, total),
        "PG {v}: log records, distinct positions"
    );
    let events = t.http_get("_events").await;
    let events = events.as_array().unwrap();
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((events.len() as u64, ids.len() as u64), (total, total), "PG {v}: HTTP events applied, distinct ids");
    let stats = t.http_get("_stats").await;
    assert_eq!(stats["conflicts"], 0, "PG {v}: a webhook key re-sent with another body: {stats}");
    let mut redis = t.redis();
    let prefix = t.cfg.redis.as_ref().unwrap().key_prefix.clone();
    let mut streamed = 0u64;
    for stream in ["podcast", "newsletter", "video", "unknown"] {
        streamed += redis.xlen::<_, u64>(format!("{prefix}stream:{stream}")).await.unwrap();
    }
    assert_eq!(streamed, total, "PG {v}: Redis stream entries");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_promotion_run_goes_on_from_the_synchronized_slot_on_the_new_primary() {
    let logs = support::logs::capture();
    let mut ran = false;
    for v in pg_versions() {
        if v.parse::<u32>().unwrap_or(0) < 17 {
            eprintln!("PG {v}: skipped, failover slots need PostgreSQL 17 or later");
            continue;
        }
        promotion(&v, &logs).await;
        ran = true;
    }
    if !ran {
        eprintln!("no PostgreSQL 17+ in PGFANOUT_PG_VERSIONS: nothing tested");
    }
}
