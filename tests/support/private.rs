//! Private service instances for tests that break a service: a Redis, a
//! Tansu broker or a ClickHouse adapter of the test's own, on a free port,
//! so stopping it disturbs no test running in parallel. Killed on drop.
//!
//! An outage is either `stop` (SIGSTOP: the process hangs with its sockets
//! open, the kernel still accepts connections, nothing answers — the
//! hardest case for a client) followed by `resume` (SIGCONT), or `kill`
//! followed by `start` on the same port (connection refused, then a fresh
//! server; ClickHouse keeps its data dir, Redis runs without persistence
//! and comes back empty, Tansu's memory storage too).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, TestEnv};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Tansu,
    ClickHouse,
}

pub struct PrivateService {
    pub kind: Kind,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Served over TLS only (Redis: `--tls-port`, clients must present a
    /// certificate `ca` signed; ClickHouse adapter: HTTPS).
    tls: Option<ServerTls>,
}

/// What a service started with TLS presents and trusts.
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA its clients' certificates must chain to (Redis, PostgreSQL's
    /// `hostssl … cert` lines).
    pub ca: PathBuf,
}

/// `PGFANOUT_<NAME>` if set, else `<PGFANOUT_CACHE>/<rel>` (the cache
/// scripts/services installs into; it exports both).
fn cached_tool(var: &str, rel: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let cache = std::env::var("PGFANOUT_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        let home = std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
        home.join("pgfanout")
    });
    cache.join(rel)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

impl PrivateService {
    pub async fn redis() -> Self {
        Self::launch(Kind::Redis).await
    }

    pub async fn tansu() -> Self {
        Self::launch(Kind::Tansu).await
    }

    pub async fn clickhouse() -> Self {
        Self::launch(Kind::ClickHouse).await
    }

    /// A Redis or ClickHouse adapter that speaks TLS only.
    pub async fn with_tls(kind: Kind, tls: ServerTls) -> Self {
        assert_ne!(kind, Kind::Tansu, "the broker's TLS is librdkafka's (log.properties)");
        Self::start_new(kind, Some(tls)).await
    }

    async fn launch(kind: Kind) -> Self {
        Self::start_new(kind, None).await
    }

    async fn start_new(kind: Kind, tls: Option<ServerTls>) -> Self {
        let dir = std::env::temp_dir().join(format!("pgfanout-private-{}", super::unique_name()));
        std::fs::create_dir_all(&dir).expect("create private service dir");
        let mut s = PrivateService { kind, port: free_port(), dir, child: None, tls };
        s.start().await;
        s
    }

    /// The address a client is configured with.
    pub fn url(&self) -> String {
        let tls = if self.tls.is_some() { "s" } else { "" };
        match self.kind {
            Kind::Redis => format!("redis{tls}://127.0.0.1:{}", self.port),
            Kind::Tansu => format!("127.0.0.1:{}", self.port),
            Kind::ClickHouse => format!("http{tls}://127.0.0.1:{}", self.port),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("service is running").id()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("service.log")
    }

    fn command(&self) -> Command {
        let port = self.port.to_string();
        match self.kind {
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                match &self.tls {
                    None => c.args(["--port", &port]),
                    // tls-auth-clients is on by default: a client without a
                    // certificate the CA signed is refused.
                    Some(tls) => c
                        .args(["--port", "0", "--tls-port", &port, "--tls-cert-file"])
                        .arg(&tls.cert)
                        .arg("--tls-key-file")
                        .arg(&tls.key)
                        .arg("--tls-ca-cert-file")
                        .arg(&tls.ca),
                };
                c.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--daemonize", "no", "--dir"])
                    .arg(&self.dir);
                c
            }
            Kind::Tansu => {
                let url = format!("tcp://127.0.0.1:{port}");
                let mut c = Command::new(cached_tool("PGFANOUT_TANSU_BIN", "bin/tansu"));
                c.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                    .args(["--storage-engine", "memory://tansu/"]);
                c
            }
            Kind::ClickHouse => {
                let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/support/clickhouse_http.py");
                let data = self.dir.join("clickhouse");
                std::fs::create_dir_all(&data).expect("create ClickHouse data dir");
                let mut c = Command::new(cached_tool("PGFANOUT_PYTHON", "venv/bin/python"));
                c.arg(script).args(["--host", "127.0.0.1", "--port", &port, "--data"]).arg(data);
                if let Some(tls) = &self.tls {
                    c.arg("--tls-cert").arg(&tls.cert).arg("--tls-key").arg(&tls.key);
                }
                c
            }
        }
    }

    /// Starts the service (again) on its port and waits until it answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{:?} is already running", self.kind);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("service log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("service log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting private {:?}: {e}", self.kind));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.answers().await {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("private {:?} exited ({status}) at start: {}", self.kind, self.log_tail());
            }
            if Instant::now() > deadline {
                panic!("private {:?} did not answer on port {} in 90 s: {}", self.kind, self.port, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self) -> bool {
        if self.tls.is_some() {
            // Both listen only once loaded (the adapter opens its engine
            // first); a TLS client here would need the test's certificates.
            return TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        match self.kind {
            Kind::Tansu => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            Kind::Redis => {
                let Ok(client) = redis::Client::open(self.url()) else { return false };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return false };
                redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            }
            Kind::ClickHouse => {
                let url = format!("{}/ping", self.url());
                let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
                match client.get(&url).send().await {
                    Ok(r) => r.text().await.map(|t| t.trim() == "Ok.").unwrap_or(false),
                    Err(_) => false,
                }
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGSTOP: the service hangs (connections are accepted by the kernel,
    /// requests are never answered) until `resume`.
    pub fn stop(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT after `stop`.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// SIGKILL (works on a stopped process too) and reap it; the port is
    /// free again afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill, then start again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.start().await;
    }
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestEnv {
    /// Points the sidecar's ClickHouse sink (and `self.ch`) at `ch` and
    /// creates the test's database and tables there. Call before `start`.
    /// Over TLS, set `clickhouse.ca_file` first: `self.ch` is made from the
    /// section as the sink makes its client.
    pub async fn use_private_clickhouse(&mut self, ch: &PrivateService) {
        assert_eq!(ch.kind, Kind::ClickHouse);
        let cfg = self.cfg.clickhouse.as_mut().unwrap();
        cfg.url = ch.url();
        self.ch =
            Some(pgfanout::sinks::clickhouse::tls::client(cfg).expect("ClickHouse client").with_database(&self.name));
        pgfanout::commands::init::run(&self.cfg, false).await.expect("init on the private ClickHouse");
    }

    /// Points the Redis sink (and `self.redis`) at `redis`. Call before
    /// `start`; over TLS, after setting the section's certificate keys
    /// (`self.redis` is made from it as the sink makes its client).
    pub async fn use_private_redis(&mut self, redis: &PrivateService) {
        assert_eq!(redis.kind, Kind::Redis);
        let cfg = self.cfg.redis.as_mut().unwrap();
        cfg.url = pgfanout::config::Secret(redis.url());
        self.redis = Some(
            pgfanout::sinks::redis::tls::client(cfg)
                .expect("Redis client")
                .get_multiplexed_async_connection()
                .await
                .expect("connect to the private Redis"),
        );
    }

    /// Points the log at the private broker `tansu` and creates the topics
    /// there. Call before `start`.
    pub async fn use_private_broker(&mut self, tansu: &PrivateService) {
        assert_eq!(tansu.kind, Kind::Tansu);
        self.cfg.log.brokers = tansu.url();
        pgfanout::commands::init::run(&self.cfg, false).await.expect("init on the private broker");
    }
}

/// A PostgreSQL cluster of the test's own, on a free port, for tests that
/// need a server in a state the shared ones are not in: a WAL position
/// moved with `pg_resetwal` ([`start`](Self::start)), TLS only
/// ([`start_tls`](Self::start_tls)), or a primary with a physical standby
/// to promote ([`start_major`](Self::start_major), [`standby`](Self::standby)).
/// Configured as scripts/services configures the shared ones. Stopped
/// (immediate) and removed on drop.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// The password of `pgfanout` on a [`PrivatePostgres::start_tls`] server.
pub const TLS_PG_PASSWORD: &str = "pgfanout-tls-test";
/// The user a [`PrivatePostgres::start_tls`] server authenticates by
/// client certificate only (`hostssl … cert`): the certificate's CN.
pub const CERT_USER: &str = "pgfanout_cert";

impl PrivatePostgres {
    /// Debian's PostgreSQL 15, which scripts/services always installs (the
    /// npm builds of the other majors ship no pg_resetwal): initdb, then
    /// `pg_resetwal -l <first_wal_file>` when given (the WAL then starts at
    /// that segment), then start. Local and host connections are trusted.
    pub async fn start(first_wal_file: Option<&str>) -> Self {
        let bin = std::env::var("PGFANOUT_PG15_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/usr/lib/postgresql/15/bin"));
        let pg = Self::init(bin, false, |_| {});
        if let Some(file) = first_wal_file {
            let data = pg.data();
            pg.run("pg_resetwal", |c| {
                c.args(["-l", file]).arg(&data);
            });
        }
        pg.configure_and_start("", None);
        pg
    }

    /// PostgreSQL `pg_version` (the binaries scripts/services installed)
    /// with `ssl = on` and `tls`, and a pg_hba.conf of `hostssl` lines
    /// only: [`CERT_USER`] by client certificate, everyone else by password
    /// (`pgfanout`'s is [`TLS_PG_PASSWORD`]). The Unix socket stays trusted.
    pub async fn start_tls(pg_version: &str, tls: ServerTls) -> Self {
        let bin = PathBuf::from(super::env(&format!("PGFANOUT_PG{pg_version}_BIN")));
        let pg = Self::init(bin, true, |dir| {
            let certs = dir.join("tls");
            std::fs::create_dir_all(&certs).unwrap();
            for (from, to) in [(&tls.cert, "server.crt"), (&tls.key, "server.key"), (&tls.ca, "client-ca.crt")] {
                std::fs::copy(from, certs.join(to)).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            }
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(certs.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        });
        let certs = pg.dir.join("tls");
        let conf = format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
            certs.join("server.crt").display(),
            certs.join("server.key").display(),
            certs.join("client-ca.crt").display()
        );
        let hba = format!(
            "local all all trust\nlocal replication all trust\n\
             hostssl all {CERT_USER} 127.0.0.1/32 cert\nhostssl all {CERT_USER} ::1/128 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n"
        );
        pg.configure_and_start(&conf, Some(&hba));
        pg
    }

    /// PostgreSQL `pg_version` (the binaries scripts/services installed),
    /// every connection trusted, replication ones too (initdb's pg_hba.conf).
    pub async fn start_major(pg_version: &str) -> Self {
        let bin = PathBuf::from(super::env(&format!("PGFANOUT_PG{pg_version}_BIN")));
        let pg = Self::init(bin, false, |_| {});
        pg.configure_and_start("", None);
        pg
    }

    /// A physical standby of this server, streaming from it through the
    /// physical slot `slot` (created here), set up as PostgreSQL 17's slot
    /// synchronisation asks: `primary_slot_name`, `hot_standby_feedback`,
    /// `sync_replication_slots` and a `primary_conninfo` with a database
    /// on the standby, `synchronized_standby_slots` naming `slot` here (so
    /// a logical walsender never sends what the standby has not received).
    /// The base backup is a copy of this server's data directory, stopped
    /// for it: pg_basebackup here is Debian's 15, which refuses newer
    /// servers, and the npm builds of 16+ ship none.
    pub async fn standby(&self, slot: &str) -> PrivatePostgres {
        let admin = pgfanout::source::slot::connect(&self.url()).await.expect("connect to the primary");
        admin.execute("SELECT pg_create_physical_replication_slot($1, true)", &[&slot]).await.expect("physical slot");
        drop(admin);
        self.pg_ctl(&["-m", "fast", "stop"]);

        let dir = std::env::temp_dir().join(format!("pgfanout-private-pg-{}", super::unique_name()));
        std::fs::create_dir_all(dir.join("sock")).expect("create the standby's dir");
        let standby = PrivatePostgres { port: free_port(), dir, bin: self.bin.clone() };
        let (from, to) = (self.data(), standby.data());
        // `-a` keeps the PostgreSQL user's ownership and the modes it insists on.
        let copied = Command::new("cp").arg("-a").arg(&from).arg(&to).status().expect("cp").success();
        assert!(copied, "copy {} to {}", from.display(), to.display());
        // What pg_basebackup leaves out: the primary's slots and its pid file.
        for entry in std::fs::read_dir(to.join("pg_replslot")).unwrap() {
            std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
        }
        let _ = std::fs::remove_file(to.join("postmaster.pid"));
        std::fs::write(to.join("standby.signal"), "").unwrap();
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(&standby.dir).status().unwrap().success();
            assert!(ok, "chown {} to postgres", standby.dir.display());
        }

        let mut conf = std::fs::OpenOptions::new().append(true).open(from.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut conf, format!("synchronized_standby_slots = '{slot}'\n").as_bytes()).unwrap();
        self.pg_ctl(&["start"]);
        standby.configure_and_start(
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=pgfanout dbname=postgres application_name=standby'\n\
                 primary_slot_name = '{slot}'\nhot_standby_feedback = on\nsync_replication_slots = on\n",
                self.port
            ),
            None,
        );
        standby
    }

    /// Promotes this standby to a primary; returns once it is one.
    pub fn promote(&self) {
        self.pg_ctl(&["promote"]);
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn stop_immediately(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    /// A new data dir, `prepare` given the cluster's dir to add files to
    /// before it is handed to the PostgreSQL user, then initdb: every
    /// connection trusted, or with `password` only local ones, and TCP by
    /// password ([`TLS_PG_PASSWORD`] for `pgfanout`).
    fn init(bin: PathBuf, password: bool, prepare: impl FnOnce(&Path)) -> Self {
        let dir = std::env::temp_dir().join(format!("pgfanout-private-pg-{}", super::unique_name()));
        std::fs::create_dir_all(dir.join("sock")).expect("create private PostgreSQL dir");
        prepare(&dir);
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{TLS_PG_PASSWORD}\n")).unwrap();
        let pg = PrivatePostgres { port: free_port(), dir, bin };
        if is_root() {
            // PostgreSQL refuses to run as root; scripts/services uses `postgres` too.
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(&pg.dir).status().unwrap().success();
            assert!(ok, "chown {} to postgres", pg.dir.display());
        }
        let data = pg.data();
        pg.run("initdb", |c| {
            c.arg("-D").arg(&data).args(["-U", "pgfanout", "-E", "UTF8", "--locale=C", "-N"]);
            match password {
                true => c
                    .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                    .arg(format!("--pwfile={}", pwfile.display())),
                false => c.args(["-A", "trust"]),
            };
        });
        let _ = std::fs::remove_file(&pwfile);
        pg
    }

    /// Appends scripts/services' settings and `extra` to postgresql.conf,
    /// replaces pg_hba.conf with `hba` when given, and starts the server.
    fn configure_and_start(&self, extra: &str, hba: Option<&str>) {
        let data = self.data();
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_wal_senders = 40\nmax_replication_slots = 200\nmax_connections = 200\n\
             max_prepared_transactions = 20\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 128MB\nlogical_decoding_work_mem = 64MB\nwal_sender_timeout = 60s\n\
             password_encryption = scram-sha-256\n{extra}",
            self.port,
            self.dir.join("sock").display()
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        self.pg_ctl(&["start"]);
    }

    /// `pg_ctl <args>` on the cluster, waiting (up to 60 s) for it to be done.
    fn pg_ctl(&self, args: &[&str]) {
        let (data, log) = (self.data(), self.dir.join("postgres.log"));
        self.run("pg_ctl", |c| {
            c.arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "60"]).args(args);
        });
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `tool` from the cluster's bin dir, run as the PostgreSQL user from a
    /// directory it can enter.
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir("/");
        c
    }

    /// `tool` from the cluster's bin dir, as the PostgreSQL user; panics with
    /// its output when it fails.
    fn run(&self, tool: &str, args: impl FnOnce(&mut Command)) {
        let mut c = self.command(tool);
        args(&mut c);
        let out = c.output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// Admin URL (database `postgres`, user `pgfanout`, trust auth).
    pub fn url(&self) -> String {
        format!("postgres://pgfanout@127.0.0.1:{}/postgres", self.port)
    }

    /// The Unix socket directory (trusted on every private server).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The server's log (for a test's failure message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.command("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
