//! Test support: every test gets its own database, slot, publication,
//! topic prefix, ClickHouse database, Redis key prefix and HTTP receiver
//! path on the services `scripts/services up` started (its env file names
//! them), so tests run in parallel without seeing each other.

#![allow(dead_code)]

pub mod logs;
pub mod private;
pub mod sinks;
pub mod topics;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfanout::config::{
    ClickHouseConfig, Config, HttpConfig, LogConfig, MetricsConfig, OnPermanentError, PipelineConfig, RedisConfig,
    Secret, SourceConfig,
};
use pgfanout::observe::Stats;
use pgfanout::pipeline;
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through scripts/test, which starts the services"))
}

/// PostgreSQL major versions running for this test run.
pub fn pg_versions() -> Vec<String> {
    env("PGFANOUT_PG_VERSIONS").split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

pub fn unique_name() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// How [`TestEnv::with_setup`] prepares the test's database.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup<'a> {
    /// Run as the server's superuser in the new database, before `init`.
    pub sql: &'a str,
    /// Leave `pgfanout init` out (publication, slot, state, sink tables
    /// and topics), e.g. for a test that runs it as another role.
    pub skip_init: bool,
}

/// `url` (a postgres:// URL) connecting as `user` with `password`.
pub fn url_as(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

type RunningPipeline = (watch::Sender<bool>, JoinHandle<Result<(), pipeline::PipelineError>>);

pub struct TestEnv {
    pub name: String,
    pub pg_version: String,
    pub cfg: Config,
    pub pg: tokio_postgres::Client,
    pub ch: clickhouse::Client,
    pub redis: redis::aio::MultiplexedConnection,
    pub http_base: String,
    pipeline: Option<RunningPipeline>,
    pub stats: Arc<Stats>,
}

impl TestEnv {
    /// A fresh, initialised environment (schema, slot, tables, topics) on one PostgreSQL major.
    pub async fn new(pg_version: &str) -> TestEnv {
        Self::on_server(pg_version, &env(&format!("PGFANOUT_PG{pg_version}_URL"))).await
    }

    /// Like `new`, on the PostgreSQL server at `admin_url` (a private one).
    pub async fn on_server(pg_version: &str, admin_url: &str) -> TestEnv {
        Self::on_server_with(pg_version, admin_url, Setup::default()).await
    }

    /// Like `new`, with `setup`'s SQL run in the new database first and
    /// `pgfanout init` (as the superuser of the server's URL) only if it says so.
    pub async fn with_setup(pg_version: &str, setup: Setup<'_>) -> TestEnv {
        Self::on_server_with(pg_version, &env(&format!("PGFANOUT_PG{pg_version}_URL")), setup).await
    }

    async fn on_server_with(pg_version: &str, admin_url: &str, setup: Setup<'_>) -> TestEnv {
        let name = unique_name();
        let admin = pgfanout::source::slot::connect(admin_url).await.expect("connect to PostgreSQL");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("{admin_url} must be a postgres:// URL"),
        };
        let http_base = env("PGFANOUT_HTTP_URL");
        let cfg = Config {
            source: SourceConfig {
                url: Secret(url.clone()),
                socket_dir: None,
                slot: name.clone(),
                publication: name.clone(),
                tables: vec!["public.content".into(), "public.engagement_events".into()],
                status_interval_ms: 200,
                heartbeat_ms: 0,
                binary: None,
                proto_version: None,
                stream_buffer_mb: 16,
                spill_dir: None,
            },
            log: LogConfig {
                brokers: env("PGFANOUT_KAFKA_BROKERS"),
                topic_prefix: format!("{name}."),
                partitions: 1,
                replication_factor: 1,
                compression: "lz4".into(),
                properties: Default::default(),
            },
            clickhouse: Some(ClickHouseConfig {
                url: env("PGFANOUT_CLICKHOUSE_URL"),
                database: name.clone(),
                user: "default".into(),
                password: Secret::default(),
                on_permanent_error: OnPermanentError::DeadLetter,
                permanent_attempts: 3,
            }),
            redis: Some(RedisConfig {
                url: Secret(env("PGFANOUT_REDIS_URL")),
                key_prefix: format!("{name}:"),
                stream_maxlen: 100_000,
                top_window_secs: 600,
                on_permanent_error: OnPermanentError::DeadLetter,
                permanent_attempts: 3,
            }),
            http: Some(HttpConfig {
                url: format!("{http_base}/{name}"),
                secret: Secret(env("PGFANOUT_HTTP_SECRET")),
                timeout_ms: 5_000,
                max_attempts: 1_000,
                backoff_initial_ms: 50,
                backoff_max_ms: 500,
                on_permanent_error: OnPermanentError::DeadLetter,
                permanent_attempts: 1,
            }),
            file: None,
            pipeline: PipelineConfig {
                batch_max_changes: 2_000,
                batch_linger_ms: 20,
                channel_capacity: 10_000,
                shutdown_timeout_ms: 10_000,
                ..Default::default()
            },
            // Any free port: sidecars started from tests run side by side.
            metrics: MetricsConfig { listen: "127.0.0.1:0".into(), ..Default::default() },
        };
        let pg = pgfanout::source::slot::connect(&url).await.expect("connect to test database");
        if !setup.sql.is_empty() {
            pg.batch_execute(setup.sql).await.expect("setup SQL");
        }
        if !setup.skip_init {
            pgfanout::commands::init::run(&cfg, true).await.expect("pgfanout init");
        }
        let ch = clickhouse::Client::default().with_url(&cfg.clickhouse.as_ref().unwrap().url).with_database(&name);
        let redis = redis::Client::open(cfg.redis.as_ref().unwrap().url.expose())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        TestEnv {
            name,
            pg_version: pg_version.to_string(),
            cfg,
            pg,
            ch,
            redis,
            http_base,
            pipeline: None,
            stats: Arc::default(),
        }
    }

    pub fn start(&mut self) {
        let (tx, rx) = watch::channel(false);
        let handle = tokio::spawn(pipeline::run(self.cfg.clone(), rx, self.stats.clone()));
        self.pipeline = Some((tx, handle));
    }

    /// Stops the sidecar the way SIGTERM does and returns its result.
    pub async fn stop(&mut self) {
        if let Some((tx, handle)) = self.pipeline.take() {
            let _ = tx.send(true);
            handle.await.expect("pipeline task").expect("pipeline ended with an error");
        }
    }

    /// Whether the in-process sidecar started by `start` is still running
    /// (it has not stopped on an error).
    pub fn pipeline_is_running(&self) -> bool {
        self.pipeline.as_ref().is_some_and(|(_, handle)| !handle.is_finished())
    }

    pub async fn ch_count(&self, sql: &str) -> u64 {
        self.ch.query(sql).fetch_one::<u64>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn http_get(&self, what: &str) -> serde_json::Value {
        let url = format!("{}/{what}/{}", self.http_base, self.name);
        reqwest::get(&url).await.expect("receiver").json().await.expect("receiver json")
    }

    pub async fn http_control(&self, body: serde_json::Value) {
        let url = format!("{}/_control/{}", self.http_base, self.name);
        let r = reqwest::Client::new().post(&url).json(&body).send().await.expect("receiver control");
        assert!(r.status().is_success(), "control {body}: {}", r.status());
    }

    /// Current WAL insert position, as a u64.
    pub async fn wal_insert_lsn(&self) -> u64 {
        let s: String = self.pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
        pgfanout::source::Lsn::parse(&s).unwrap().0
    }

    pub async fn confirmed_flush_lsn(&self) -> u64 {
        pgfanout::source::slot::state(&self.pg, &self.name)
            .await
            .unwrap()
            .and_then(|s| s.confirmed_flush_lsn)
            .unwrap_or(0)
    }
}

/// Polls `check` until it returns true; fails the test with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `pgfanout run` (the binary) with `config`, its log appended to
/// `log`, for tests that kill it.
pub fn spawn_sidecar(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_pgfanout"))
        .args(["-c", config.to_str().unwrap(), "run"])
        .env("RUST_LOG", std::env::var("PGFANOUT_SIDECAR_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pgfanout")
}
