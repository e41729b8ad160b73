//! Test support: every test gets its own database, slot, publication,
//! topic prefix, ClickHouse database, Redis key prefix and HTTP receiver
//! path on the services `scripts/services up` started (its env file names
//! them), so tests run in parallel without seeing each other. A test
//! configures only the sinks it needs (`TestEnv::builder`); the services of
//! the others need not be reachable for it.

#![allow(dead_code)]

pub mod certs;
pub mod logs;
pub mod private;
pub mod sinks;
pub mod topics;
pub mod workload;

use std::future::Future;
use std::net::TcpListener;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfanout::config::{
    ClickHouseConfig, Config, HttpConfig, LogConfig, MetricsConfig, OnPermanentError, PipelineConfig, RedisConfig,
    Secret, SourceConfig,
};
use pgfanout::observe::Stats;
use pgfanout::pipeline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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

/// A TCP port that is free on 127.0.0.1, picked below the kernel's
/// ephemeral range so outgoing connections do not take it before a server
/// binds it (as `free_ports` in scripts/lib/common.sh does). Also a port
/// nothing listens on, for a service "stopped".
pub fn free_port() -> u16 {
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The sinks a test environment can configure. The broker is always there:
/// the log is not optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    ClickHouse,
    Redis,
    Http,
}

pub const ALL_SINKS: [Sink; 3] = [Sink::ClickHouse, Sink::Redis, Sink::Http];

type ConfigEdit = Box<dyn FnOnce(&mut Config) + Send>;

/// How `TestEnv::builder` makes an environment: which server, which sinks,
/// and changes to the configuration before `init` runs on it.
pub struct TestEnvBuilder {
    pg_version: String,
    admin_url: Option<String>,
    sinks: Vec<Sink>,
    edits: Vec<ConfigEdit>,
    setup: Setup,
}

/// How [`TestEnvBuilder::setup`] prepares the test's database.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Run as the server's superuser in the new database, before `init`.
    pub sql: String,
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

impl TestEnvBuilder {
    /// SQL to run in the new database first, and whether to leave `init` out.
    pub fn setup(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }

    /// On the PostgreSQL server at `admin_url` (a private one) instead of
    /// the shared server of the builder's major.
    pub fn on_server(mut self, admin_url: &str) -> Self {
        self.admin_url = Some(admin_url.to_string());
        self
    }

    /// Only these sinks (all three by default). None at all is a log-only
    /// run, the one configuration without sinks the product accepts.
    pub fn sinks(mut self, sinks: &[Sink]) -> Self {
        self.sinks = sinks.to_vec();
        self
    }

    /// Changes the configuration before `init` runs on it; the env keeps
    /// its clients of the sinks it was asked for.
    pub fn with(mut self, edit: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// A fresh database, initialised (schema, slot, the sinks' tables, topics).
    pub async fn build(self) -> TestEnv {
        let admin_url = self.admin_url.unwrap_or_else(|| env(&format!("PGFANOUT_PG{}_URL", self.pg_version)));
        let name = unique_name();
        let admin = pgfanout::source::slot::connect(&admin_url).await.expect("connect to PostgreSQL");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        // The database is the path's last part; the query (TLS keys) stays.
        let (path, query) = admin_url.split_once('?').unwrap_or((admin_url.as_str(), ""));
        let url = match path.rsplit_once('/') {
            Some((base, _)) if query.is_empty() => format!("{base}/{name}"),
            Some((base, _)) => format!("{base}/{name}?{query}"),
            None => panic!("{admin_url} must be a postgres:// URL"),
        };
        let on = |s: Sink| self.sinks.contains(&s);
        let http_base = on(Sink::Http).then(|| env("PGFANOUT_HTTP_URL"));
        let mut cfg = Config {
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
                failover: None,
                sslmode: None,
                sslrootcert: None,
                sslcert: None,
                sslkey: None,
            },
            log: LogConfig {
                brokers: env("PGFANOUT_KAFKA_BROKERS"),
                topic_prefix: format!("{name}."),
                partitions: 1,
                replication_factor: 1,
                compression: "lz4".into(),
                properties: Default::default(),
                debezium: Default::default(),
            },
            clickhouse: on(Sink::ClickHouse).then(|| ClickHouseConfig {
                url: env("PGFANOUT_CLICKHOUSE_URL"),
                ca_file: None,
                database: name.clone(),
                user: "default".into(),
                password: Secret::default(),
                on_permanent_error: OnPermanentError::DeadLetter,
                permanent_attempts: 3,
            }),
            redis: on(Sink::Redis).then(|| RedisConfig {
                url: Secret(env("PGFANOUT_REDIS_URL")),
                ca_file: None,
                client_cert_file: None,
                client_key_file: None,
                key_prefix: format!("{name}:"),
                stream_maxlen: 100_000,
                top_window_secs: 600,
                on_permanent_error: OnPermanentError::DeadLetter,
                permanent_attempts: 3,
            }),
            http: http_base.as_ref().map(|base| HttpConfig {
                url: format!("{base}/{name}"),
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
                log_only: self.sinks.is_empty(),
                ..Default::default()
            },
            // Any free port: sidecars started from tests run side by side.
            metrics: MetricsConfig { listen: "127.0.0.1:0".into(), ..Default::default() },
        };
        // The clients, made before the edits: a test may turn a sink off
        // and still look at its service.
        let ch = cfg.clickhouse.as_ref().map(|c| clickhouse::Client::default().with_url(&c.url).with_database(&name));
        let redis = match &cfg.redis {
            Some(c) => Some(
                redis::Client::open(c.url.expose())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to Redis"),
            ),
            None => None,
        };
        for edit in self.edits {
            edit(&mut cfg);
        }
        let pg = pgfanout::source::slot::connect(&url).await.expect("connect to test database");
        if !self.setup.sql.is_empty() {
            pg.batch_execute(&self.setup.sql).await.expect("setup SQL");
        }
        if !self.setup.skip_init {
            pgfanout::commands::init::run(&cfg, true).await.expect("pgfanout init");
        }
        TestEnv {
            name,
            pg_version: self.pg_version,
            cfg,
            pg,
            ch,
            redis,
            http_base,
            pipeline: None,
            stats: Arc::default(),
        }
    }
}

type RunningPipeline = (watch::Sender<bool>, JoinHandle<Result<(), pipeline::PipelineError>>);

pub struct TestEnv {
    pub name: String,
    pub pg_version: String,
    pub cfg: Config,
    pub pg: tokio_postgres::Client,
    ch: Option<clickhouse::Client>,
    redis: Option<redis::aio::MultiplexedConnection>,
    http_base: Option<String>,
    pipeline: Option<RunningPipeline>,
    pub stats: Arc<Stats>,
}

impl TestEnv {
    /// A fresh, initialised environment on one PostgreSQL major, with every sink.
    pub async fn new(pg_version: &str) -> TestEnv {
        Self::builder(pg_version).build().await
    }

    /// An environment to build: every sink unless `sinks` says otherwise.
    pub fn builder(pg_version: &str) -> TestEnvBuilder {
        TestEnvBuilder {
            pg_version: pg_version.to_string(),
            admin_url: None,
            sinks: ALL_SINKS.to_vec(),
            edits: Vec::new(),
            setup: Setup::default(),
        }
    }

    /// Every sink, with `setup` run first (see [`Setup`]).
    pub async fn with_setup(pg_version: &str, setup: Setup) -> TestEnv {
        Self::builder(pg_version).setup(setup).build().await
    }

    /// The test's ClickHouse database.
    pub fn ch(&self) -> &clickhouse::Client {
        self.ch.as_ref().expect("this TestEnv was built without Sink::ClickHouse")
    }

    /// A connection to the test's Redis.
    pub fn redis(&self) -> redis::aio::MultiplexedConnection {
        self.redis.clone().expect("this TestEnv was built without Sink::Redis")
    }

    /// The HTTP receiver's base URL (the test's path is `<base>/<name>`).
    pub fn http_base(&self) -> &str {
        self.http_base.as_deref().expect("this TestEnv was built without Sink::Http")
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
        self.ch().query(sql).fetch_one::<u64>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every row `sql` returns from the test's ClickHouse database.
    pub async fn ch_rows<T: clickhouse::RowOwned + clickhouse::RowRead>(&self, sql: &str) -> Vec<T> {
        self.ch().query(sql).fetch_all::<T>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn http_get(&self, what: &str) -> serde_json::Value {
        let url = format!("{}/{what}/{}", self.http_base(), self.name);
        reqwest::get(&url).await.expect("receiver").json().await.expect("receiver json")
    }

    pub async fn http_control(&self, body: serde_json::Value) {
        let url = format!("{}/_control/{}", self.http_base(), self.name);
        let r = reqwest::Client::new().post(&url).json(&body).send().await.expect("receiver control");
        assert!(r.status().is_success(), "control {body}: {}", r.status());
    }

    /// Writes `cfg` to `<name>.toml` in the test's own directory, for the
    /// binary (`Sidecar`, `pgfanout status`, …) to read.
    pub fn write_config(&self, cfg: &Config, name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
        path
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

    /// Waits until the slot is acknowledged past everything written so far
    /// (so every sink has flushed it); fails the test after `timeout`.
    pub async fn acked_everything(&self, timeout: Duration) {
        let end = self.wal_insert_lsn().await;
        wait_until("the slot is acknowledged past every change", timeout, || async {
            self.confirmed_flush_lsn().await >= end
        })
        .await;
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

/// `pgfanout run`, the built binary, on a config file, for tests that kill
/// it, stop it or read what it serves; its log is appended to the config's
/// path with extension `log`. SIGKILLed when dropped, also when the test fails.
pub struct Sidecar {
    child: Child,
    config: PathBuf,
    pub log: PathBuf,
}

impl Sidecar {
    pub fn spawn(config: &Path) -> Sidecar {
        let log = config.with_extension("log");
        Sidecar { child: Self::run(config, &log), config: config.to_path_buf(), log }
    }

    fn run(config: &Path, log: &Path) -> Child {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_pgfanout"))
            .args(["-c", config.to_str().unwrap(), "run"])
            .env("RUST_LOG", std::env::var("PGFANOUT_SIDECAR_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start pgfanout run")
    }

    /// SIGKILLs it, once it has gone starts it again on the same config.
    pub fn restart(&mut self) {
        // std's kill() is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::run(&self.config, &self.log);
    }

    /// `restart`s it `kills` times, each after a pause drawn from
    /// `pause_ms` (seeded with `seed`, so a run can be repeated), while a
    /// workload writes; `changes` tells the test's output how far it got.
    pub async fn kill_at_random(&mut self, kills: usize, pause_ms: Range<u64>, seed: u64, changes: impl Fn() -> u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for kill in 0..kills {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(pause_ms.clone()))).await;
            self.restart();
            eprintln!("kill {kill}: after {} changes", changes());
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how
    /// long it took. Fails the test if it takes longer than `limit`.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        // SAFETY: kill(2) on our own child's PID; it has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) }, 0, "SIGTERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("pgfanout did not exit within {limit:?} of SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for it to exit by itself (a run that fails at start).
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for pgfanout")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // std's kill() is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
