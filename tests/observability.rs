//! Running pgfanout as a service, against the real services: the built
//! binary's `/metrics`, `/healthz` and `/readyz` during a workload, the
//! `status` command healthy and with a sink unreachable, and SIGTERM in the
//! middle of a workload (exit 0 in time, then a restart ends exact).

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pgfanout::observe::exposition::{parse_samples, Sample};
use redis::AsyncCommands;
use support::private::PrivateService;
use support::{free_port, pg_versions, wait_until, workload, Sidecar, Sink, TestEnv, TestEnvBuilder};

const WAIT: Duration = Duration::from_secs(60);
const CONTENT: &str = "550e8400-e29b-41d4-a716-446655440000";

/// The test env `env` builds, its sidecar serving metrics on a port of its
/// own, and its config file.
async fn env_with_metrics(env: TestEnvBuilder) -> (TestEnv, PathBuf) {
    let t = env.with(|cfg| cfg.metrics.listen = format!("127.0.0.1:{}", free_port())).build().await;
    let config = t.write_config(&t.cfg, "pgfanout");
    (t, config)
}

fn base_url(t: &TestEnv) -> String {
    format!("http://{}", t.cfg.metrics.listen)
}

async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

async fn scrape(t: &TestEnv) -> Vec<Sample> {
    let (status, text) = get(&format!("{}/metrics", base_url(t))).await.expect("/metrics answers");
    assert_eq!(status, 200);
    parse_samples(&text)
}

fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

fn has(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> bool {
    samples.iter().any(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
}

async fn wait_ready(t: &TestEnv, sidecar: &Sidecar) {
    let url = format!("{}/readyz", base_url(t));
    let start = Instant::now();
    loop {
        if let Some((200, _)) = get(&url).await {
            return;
        }
        if start.elapsed() > WAIT {
            panic!("/readyz never answered 200; log:\n{}", sidecar.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert_content(t: &TestEnv) {
    t.pg.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES ('{CONTENT}', 'test-episode', 'Test Episode', 'podcast', 1200, now())"
    ))
    .await
    .unwrap();
}

async fn insert_events(pg: &tokio_postgres::Client, n: u64, per_statement: u64) {
    workload::insert_events(pg, CONTENT, n, per_statement).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_health_and_readiness_during_a_workload() {
    let (t, config) = env_with_metrics(TestEnv::builder(&pg_versions()[0])).await;
    let mut sidecar = Sidecar::spawn(&config);
    let base = base_url(&t);
    wait_until("/healthz answers 200", WAIT, || async {
        matches!(get(&format!("{base}/healthz")).await, Some((200, _)))
    })
    .await;
    wait_ready(&t, &sidecar).await;
    let (status, body) = get(&format!("{base}/readyz")).await.unwrap();
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, ready["ready"].as_bool(), ready["connected"].as_bool()),
        (200, Some(true), Some(true)),
        "{body}"
    );
    assert_eq!(get(&format!("{base}/nope")).await.unwrap().0, 404);

    const N: u64 = 3_000;
    insert_content(&t).await;
    insert_events(&t.pg, N, 250).await;
    wait_until("ClickHouse holds every event", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == N
    })
    .await;
    wait_until("the receiver holds every event", WAIT, || async { t.http_get("_stats").await["events"] == N }).await;

    let events = [("table", "public.engagement_events")];
    let content = [("table", "public.content")];
    wait_until("delivered counters reach what the sinks hold", WAIT, || async {
        let m = scrape(&t).await;
        sum(&m, "pgfanout_changes_total", &[events[0], ("stage", "delivered")]) == N as f64
            && sum(&m, "pgfanout_batch_size_sum", &[]) == (N + 1) as f64
    })
    .await;
    let m = scrape(&t).await;
    for stage in ["read", "published", "delivered"] {
        assert_eq!(sum(&m, "pgfanout_changes_total", &[events[0], ("stage", stage)]), N as f64, "events {stage}");
        assert_eq!(sum(&m, "pgfanout_changes_total", &[content[0], ("stage", stage)]), 1.0, "content {stage}");
    }
    for sink in ["broker", "clickhouse", "redis", "http"] {
        assert!(has(&m, "pgfanout_sink_flush_seconds_bucket", &[("sink", sink), ("le", "+Inf")]), "{sink} histogram");
        assert!(sum(&m, "pgfanout_sink_flush_seconds_count", &[("sink", sink)]) >= 1.0, "{sink} flushes counted");
        assert_eq!(sum(&m, "pgfanout_sink_retries_total", &[("sink", sink)]), 0.0, "{sink} retries");
        assert!(has(&m, "pgfanout_sink_errors_total", &[("sink", sink)]), "{sink} error counter exists at 0");
    }
    // Commit-to-sink latency: one sample per delivered change (the content
    // row too) in every sink's histogram and in `all`, and none of them
    // older than the workload.
    let delivered = (N + 1) as f64;
    let latency = "pgfanout_commit_to_sink_seconds";
    for sink in ["clickhouse", "redis", "http", "all"] {
        let label = [("sink", sink)];
        let count = sum(&m, &format!("{latency}_count"), &label);
        assert_eq!(count, delivered, "{sink}: commit-to-sink samples");
        assert_eq!(sum(&m, &format!("{latency}_bucket"), &[label[0], ("le", "+Inf")]), delivered, "{sink} +Inf");
        assert!(has(&m, &format!("{latency}_bucket"), &[label[0], ("le", "0.001")]), "{sink}: 1 ms bucket");
        let mean = sum(&m, &format!("{latency}_sum"), &label) / count;
        assert!(mean > 0.0 && mean < WAIT.as_secs_f64(), "{sink}: mean commit-to-sink {mean} s");
    }
    // `all` is taken when the last sink has flushed a change, so it is never
    // below any one sink's.
    for sink in ["clickhouse", "redis", "http"] {
        assert!(
            sum(&m, &format!("{latency}_sum"), &[("sink", "all")])
                >= sum(&m, &format!("{latency}_sum"), &[("sink", sink)]),
            "all ≥ {sink}"
        );
    }
    assert!(sum(&m, "pgfanout_batch_size_count", &[]) >= 1.0);
    assert!(has(&m, "pgfanout_batch_size_bucket", &[("le", "+Inf")]));
    for gauge in [
        "pgfanout_replication_lag_bytes",
        "pgfanout_replication_lag_seconds",
        "pgfanout_buffer_occupancy",
        "process_cpu_seconds_total",
    ] {
        assert!(has(&m, gauge, &[]), "{gauge} exported");
    }
    // The progress gauges are published once a second: on a fast run the
    // scrape above may come before the first tick that saw the stream.
    wait_until("the flushed-LSN and connected gauges are published", WAIT, || async {
        let g = scrape(&t).await;
        sum(&g, "pgfanout_flushed_lsn", &[]) > 0.0 && sum(&g, "pgfanout_replication_connected", &[]) == 1.0
    })
    .await;
    assert!(sum(&m, "process_resident_memory_bytes", &[]) > 1e6);
    assert_eq!(sum(&m, "pgfanout_dead_letters_total", &[("sink", "http")]), 0.0);

    let (status, took) = sidecar.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?} after {took:?}; log:\n{}", sidecar.log_text());
}

fn status(config: &Path, json: bool) -> Output {
    let mut args = vec!["-c", config.to_str().unwrap(), "status"];
    if json {
        args.push("--json");
    }
    Command::new(env!("CARGO_BIN_EXE_pgfanout")).args(&args).output().expect("run pgfanout status")
}

fn status_json(config: &Path) -> (i32, serde_json::Value) {
    let out = status(config, true);
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().expect("exit code"), doc)
}

fn sink<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("sink {name} in {doc}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_healthy_then_names_the_unreachable_sink() {
    let (t, config) = env_with_metrics(TestEnv::builder(&pg_versions()[0])).await;
    let sidecar = Sidecar::spawn(&config);
    wait_ready(&t, &sidecar).await;
    insert_content(&t).await;
    insert_events(&t.pg, 10, 10).await;
    wait_until("ClickHouse holds the events", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 10
    })
    .await;
    let mut redis = t.redis();
    let progress_key = pgfanout::sinks::redis::progress_key(&t.cfg.redis.as_ref().unwrap().key_prefix);
    wait_until("Redis progress written", WAIT, || {
        let (mut r, k) = (redis.clone(), progress_key.clone());
        async move { r.exists::<_, bool>(k).await.unwrap() }
    })
    .await;

    let table = status(&config, false);
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&table.stderr));
    assert!(text.contains("HEALTHY") && !text.contains("UNHEALTHY"), "{text}");
    for name in ["broker", "clickhouse", "redis", "http", "confirmed flush", "retained WAL"] {
        assert!(text.contains(name), "{name} in:\n{text}");
    }

    let (code, doc) = status_json(&config);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["healthy"], true);
    assert_eq!(doc["slot"]["exists"], true);
    assert_eq!(doc["slot"]["active"], true, "{doc:#}");
    assert!(doc["slot"]["active_pid"].as_i64().is_some());
    assert!(doc["slot"]["retained_wal_bytes"].as_u64().is_some());
    for name in ["broker", "clickhouse", "redis", "http"] {
        assert_eq!(sink(&doc, name)["reachable"], true, "{name}: {doc:#}");
    }
    // Both sinks keep the version of the last event they applied: the same one.
    let redis_at = sink(&doc, "redis")["position"].as_str().expect("redis position").to_string();
    assert_eq!(sink(&doc, "clickhouse")["position"].as_str(), Some(redis_at.as_str()));
    let stored: String = redis.get(&progress_key).await.unwrap();
    let expected = pgfanout::source::Position::from_sortable_hex(&stored).unwrap().to_string();
    assert_eq!(redis_at, expected);
    assert_eq!(doc["sidecar"]["reachable"], true, "{doc:#}");
    assert_eq!(doc["sidecar"]["ready"], true);
    assert!(doc["sidecar"]["rates"]["delivered"].as_f64().is_some(), "{doc:#}");

    // Redis "stopped": the same config pointing at a port nothing listens on.
    let mut broken = t.cfg.clone();
    broken.redis.as_mut().unwrap().url = pgfanout::config::Secret(format!("redis://127.0.0.1:{}", free_port()));
    let broken_config = t.write_config(&broken, "redis-down");
    let (code, doc) = status_json(&broken_config);
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(doc["healthy"], false);
    assert_eq!(sink(&doc, "redis")["reachable"], false);
    assert_eq!(sink(&doc, "clickhouse")["reachable"], true);
    let problems = doc["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("sink redis unreachable")), "{doc:#}");
    let text = String::from_utf8_lossy(&status(&broken_config, false).stdout).to_string();
    assert!(text.contains("UNHEALTHY") && text.contains("sink redis unreachable"), "{text}");

    // ClickHouse "stopped" the same way.
    let mut broken = t.cfg.clone();
    broken.clickhouse.as_mut().unwrap().url = format!("http://127.0.0.1:{}", free_port());
    let (code, doc) = status_json(&t.write_config(&broken, "clickhouse-down"));
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(sink(&doc, "clickhouse")["reachable"], false);
    assert!(doc["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("clickhouse")));

    // A slot that does not exist is unhealthy too.
    let mut broken = t.cfg.clone();
    broken.source.slot = format!("{}_missing", t.name);
    let (code, doc) = status_json(&t.write_config(&broken, "no-slot"));
    assert_eq!((code, doc["slot"]["exists"].as_bool()), (1, Some(false)), "{doc:#}");

    // PostgreSQL unreachable, or no usable config: 2.
    let mut broken = t.cfg.clone();
    broken.source.url = pgfanout::config::Secret(format!("postgres://u:p@127.0.0.1:{}/db", free_port()));
    assert_eq!(status(&t.write_config(&broken, "pg-down"), false).status.code(), Some(2));
    let bad = config.with_file_name("bad.toml");
    std::fs::write(&bad, "[source]\n").unwrap();
    assert_eq!(status(&bad, false).status.code(), Some(2));
    drop(sidecar);
}

/// Distinct event ids (`<commit LSN>/<ordinal>`) among the receiver's events.
fn distinct_ids(events: &serde_json::Value) -> u64 {
    events.as_array().unwrap().iter().filter_map(|e| e["id"].as_str()).collect::<HashSet<_>>().len() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_workload_exits_zero_then_restart_ends_exact() {
    let (t, config) = env_with_metrics(TestEnv::builder(&pg_versions()[0])).await;
    insert_content(&t).await;
    let mut sidecar = Sidecar::spawn(&config);
    wait_ready(&t, &sidecar).await;

    let writer = workload::spawn(&t, |pg, progress| async move {
        while !progress.stopping() {
            insert_events(&pg, 200, 200).await;
            progress.add(200);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Mid-workload: changes are being read, published and flushed.
    wait_until("the sidecar is delivering", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements").await >= 1_000
    })
    .await;
    let (status, took) = sidecar.terminate(Duration::from_secs(15));
    let log = sidecar.log_text();
    assert!(status.success(), "exit {status:?} after {took:?}; log:\n{log}");
    assert!(took < Duration::from_secs(10), "drained in {took:?}; log:\n{log}");
    assert!(log.contains("stopped cleanly"), "{log}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let progress = writer.progress();
    writer.stop().await;
    let pg_count: i64 = t.pg.query_one("SELECT count(*) FROM engagement_events", &[]).await.unwrap().get(0);
    assert_eq!(pg_count as u64, progress.changes());

    let mut sidecar = Sidecar::spawn(&config);
    let stream = format!("{}stream:podcast", t.cfg.redis.as_ref().unwrap().key_prefix);
    let redis = t.redis();
    wait_until("every sink holds every event", Duration::from_secs(120), || {
        let (t, mut r, stream) = (&t, redis.clone(), stream.clone());
        async move {
            t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == pg_count as u64
                && r.xlen::<_, u64>(&stream).await.unwrap() == pg_count as u64
                && distinct_ids(&t.http_get("_events").await) == pg_count as u64
        }
    })
    .await;
    // Exact: nothing lost, nothing counted twice.
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL").await, pg_count as u64);
    assert_eq!(
        t.ch_count("SELECT uniqExact(event_id) FROM enriched_engagements FINAL").await,
        pg_count as u64,
        "distinct events in ClickHouse"
    );
    let events = t.http_get("_events").await;
    assert_eq!(distinct_ids(&events), pg_count as u64, "distinct event ids at the receiver");
    let event_ids: HashSet<i64> =
        events.as_array().unwrap().iter().map(|e| e["event"]["event_id"].as_i64().unwrap()).collect();
    assert_eq!(event_ids.len() as u64, pg_count as u64, "distinct source rows at the receiver");

    let (status, took) = sidecar.terminate(Duration::from_secs(15));
    assert!(status.success() && took < Duration::from_secs(10), "{status:?} after {took:?}");
}

async fn wait_for_log(sidecar: &Sidecar, line: &str) {
    let start = Instant::now();
    while !sidecar.log_text().contains(line) {
        if start.elapsed() > WAIT {
            panic!("the log never said {line:?}:\n{}", sidecar.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_when_a_sink_keeps_failing_and_when_lag_passes_its_threshold() {
    let v = pg_versions()[0].clone();
    // A Redis of this test's own, so stopping it disturbs no other test.
    let mut redis = PrivateService::redis().await;
    let mut t = TestEnv::builder(&v)
        .sinks(&[Sink::ClickHouse, Sink::Redis])
        .with(|cfg| {
            cfg.metrics.listen = format!("127.0.0.1:{}", free_port());
            cfg.metrics.max_lag_seconds = 2;
        })
        .build()
        .await;
    t.use_private_redis(&redis).await;
    let config = t.write_config(&t.cfg, "pgfanout");
    let mut sidecar = Sidecar::spawn(&config);
    wait_ready(&t, &sidecar).await;
    insert_content(&t).await;
    insert_events(&t.pg, 10, 10).await;
    wait_until("ClickHouse holds the first events", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 10
    })
    .await;

    // Redis goes away: its sink retries, the pipeline stalls, the lag grows.
    redis.kill();
    insert_events(&t.pg, 10, 10).await;
    wait_for_log(&sidecar, "sink redis keeps failing").await;
    wait_for_log(&sidecar, "replication lag over threshold").await;
    let m = scrape(&t).await;
    assert!(sum(&m, "pgfanout_sink_retries_total", &[("sink", "redis")]) >= 5.0);
    assert!(sum(&m, "pgfanout_sink_errors_total", &[("sink", "redis")]) >= 5.0);
    assert!(sum(&m, "pgfanout_sink_consecutive_failures", &[("sink", "redis")]) >= 5.0);
    assert_eq!(sum(&m, "pgfanout_sink_retries_total", &[("sink", "clickhouse")]), 0.0);
    assert!(sum(&m, "pgfanout_errors_total", &[("kind", "sink")]) >= 5.0);
    assert_eq!(sum(&m, "pgfanout_lag_alert", &[]), 1.0);
    assert!(sum(&m, "pgfanout_replication_lag_seconds", &[]) > 2.0);
    let (code, body) = get(&format!("{}/readyz", base_url(&t))).await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("max_lag_seconds"), "{body}");

    let (code, doc) = status_json(&config);
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(sink(&doc, "redis")["reachable"], false);
    let problems = doc["problems"].to_string();
    assert!(problems.contains("sink redis unreachable") && problems.contains("max_lag_seconds"), "{doc:#}");

    // Back on the same port (empty: no persistence): everything recovers.
    redis.start().await;
    wait_for_log(&sidecar, "sink redis recovered").await;
    wait_for_log(&sidecar, "replication lag back under threshold").await;
    wait_ready(&t, &sidecar).await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL").await, 20);
    let m = scrape(&t).await;
    assert_eq!(sum(&m, "pgfanout_sink_consecutive_failures", &[("sink", "redis")]), 0.0);
    assert_eq!(sum(&m, "pgfanout_lag_alert", &[]), 0.0);
    let (status, took) = sidecar.terminate(Duration::from_secs(15));
    assert!(status.success() && took < Duration::from_secs(10), "{status:?} after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_past_its_bound_exits_nonzero_and_loses_nothing() {
    let env = TestEnv::builder(&pg_versions()[0])
        .sinks(&[Sink::ClickHouse, Sink::Http])
        .with(|cfg| cfg.pipeline.shutdown_timeout_ms = 2_000);
    let (t, config) = env_with_metrics(env).await;
    let mut sidecar = Sidecar::spawn(&config);
    wait_ready(&t, &sidecar).await;
    insert_content(&t).await;
    let settled = t.wal_insert_lsn().await;
    wait_until("content acknowledged", WAIT, || async { t.confirmed_flush_lsn().await >= settled }).await;

    // The receiver refuses everything: the batch in flight can never finish.
    t.http_control(serde_json::json!({"hold": true})).await;
    insert_events(&t.pg, 50, 50).await;
    let end = t.wal_insert_lsn().await;
    wait_until("ClickHouse has the batch the HTTP sink is stuck on", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 50
    })
    .await;
    let (status, took) = sidecar.terminate(Duration::from_secs(15));
    let log = sidecar.log_text();
    assert!(!status.success(), "a stuck drain must not exit 0; log:\n{log}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(log.contains("draining did not finish within pipeline.shutdown_timeout_ms = 2000"), "{log}");
    assert!(t.confirmed_flush_lsn().await < end, "the slot was acknowledged past what the HTTP sink flushed");

    t.http_control(serde_json::json!({"hold": false})).await;
    let mut sidecar = Sidecar::spawn(&config);
    wait_until("the receiver got every event after the restart", WAIT, || async {
        distinct_ids(&t.http_get("_events").await) == 50
    })
    .await;
    wait_until("slot acknowledged after all sinks flushed", WAIT, || async { t.confirmed_flush_lsn().await >= end })
        .await;
    assert_eq!(t.ch_count("SELECT count() FROM enriched_engagements FINAL").await, 50);
    let (status, _) = sidecar.terminate(Duration::from_secs(15));
    assert!(status.success());
}
