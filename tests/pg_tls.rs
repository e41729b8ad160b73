//! TLS to PostgreSQL, against a private server with `ssl = on`, a
//! certificate signed by a CA made for the test, and `hostssl` lines only:
//! the pipeline streams with `sslmode=verify-full` (password or client
//! certificate), and each failure (unknown CA, wrong host name, a plain
//! connection, a refused or missing client certificate, a server without
//! TLS) is an error naming the connection, SQL or replication, and why;
//! with several hosts, verify-full checks the name of the host chosen.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfanout::config::conninfo::SslMode;
use pgfanout::config::{Config, Secret};
use support::certs::{Issued, TestCa};
use support::private::{PrivatePostgres, ServerTls, CERT_USER, TLS_PG_PASSWORD};
use support::{pg_versions, unique_name, wait_until, Sidecar, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

const SAMPLE: &str = "
INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
('550e8400-e29b-41d4-a716-446655440000', 'tls-episode', 'TLS Episode', 'podcast', 1200, NOW());
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) VALUES
('550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'play', NOW(), 30000, 'web');
";

/// The CAs, certificates and TLS-only server of one test.
struct TlsServer {
    dir: PathBuf,
    ca: TestCa,
    other_ca: TestCa,
    client: Issued,
    /// A client certificate for the right user, signed by the other CA.
    stranger: Issued,
    pg: PrivatePostgres,
}

impl TlsServer {
    async fn start(v: &str) -> TlsServer {
        let dir = std::env::temp_dir().join(format!("pgfanout-tls-{}", unique_name()));
        let ca = TestCa::new(&dir, "ca", "pgfanout test CA");
        let other_ca = TestCa::new(&dir, "other-ca", "some other CA");
        let server = ca.server("server", &["DNS:localhost"]);
        let client = ca.client("client", CERT_USER);
        let stranger = other_ca.client("stranger", CERT_USER);
        let pg = PrivatePostgres::start_tls(
            v,
            ServerTls { cert: server.cert.clone(), key: server.key.clone(), ca: ca.cert() },
        )
        .await;
        let s = TlsServer { dir, ca, other_ca, client, stranger, pg };
        let admin = pgfanout::source::slot::connect(&s.admin_url()).await.expect("admin connection over TLS");
        admin.batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER")).await.unwrap();
        s
    }

    /// `pgfanout`, by password, over TLS verified in full.
    fn admin_url(&self) -> String {
        format!(
            "postgres://pgfanout:{TLS_PG_PASSWORD}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.pg.port,
            self.ca.cert().display()
        )
    }

    /// A key=value string for database `db` with `extra` keys.
    fn key_value(&self, host: &str, user: &str, db: &str, extra: &str) -> String {
        format!("host={host} port={} user={user} password={TLS_PG_PASSWORD} dbname={db} {extra}", self.pg.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn keys(mode: &str, root: &Path) -> String {
    format!("sslmode={mode} sslrootcert='{}'", root.display())
}

/// Rows, acknowledgement and TLS of a pipeline streaming from `t`'s database.
async fn assert_streams(t: &TestEnv, expected_user: &str) {
    t.pg.batch_execute(SAMPLE).await.unwrap();
    let end = t.wal_insert_lsn().await;
    wait_until("ClickHouse holds the enriched row", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    wait_until("the slot is acknowledged past the sample", WAIT, || async { t.confirmed_flush_lsn().await >= end })
        .await;
    // The walsender pgfanout streams from is on TLS, as the user expected.
    let walsenders = t
        .pg
        .query(
            "SELECT a.usename::text, s.ssl, coalesce(s.client_dn, '') FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.backend_type = 'walsender' AND a.datname = $1",
            &[&t.name],
        )
        .await
        .unwrap();
    assert!(!walsenders.is_empty(), "no walsender for the test's database");
    for row in walsenders {
        let (user, ssl, dn): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((user.as_str(), ssl), (expected_user, true), "the replication connection");
        if expected_user == CERT_USER {
            assert_eq!(dn, format!("/CN={CERT_USER}"), "authenticated by the client certificate");
        }
    }
    let plain: i64 =
        t.pg.query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND NOT s.ssl",
            &[&t.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0, "every connection to the test's database is on TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_streams_end_to_end_on_a_tls_only_server() {
    for v in pg_versions() {
        let s = TlsServer::start(&v).await;
        // The TLS keys in the URL's query, on every connection the pipeline opens.
        let mut t = TestEnv::builder(&v).on_server(&s.admin_url()).build().await;
        t.start();
        assert_streams(&t, "pgfanout").await;
        t.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_from_source_keys_streams_through_the_binary() {
    for v in pg_versions() {
        let s = TlsServer::start(&v).await;
        let t = TestEnv::builder(&v).on_server(&s.admin_url()).build().await;
        // `pgfanout run` with the TLS keys in [source], a key=value URL and
        // no password: the server authenticates the certificate.
        let mut cfg: Config = t.cfg.clone();
        cfg.source.url = Secret(format!("host=localhost port={} user={CERT_USER} dbname={}", s.pg.port, t.name));
        cfg.source.sslmode = Some(SslMode::VerifyFull);
        cfg.source.sslrootcert = Some(s.ca.cert().display().to_string());
        cfg.source.sslcert = Some(s.client.cert.clone());
        cfg.source.sslkey = Some(s.client.key.clone());
        let config = s.dir.join("pgfanout.toml");
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        let mut sidecar = Sidecar::spawn(&config);
        assert_streams(&t, CERT_USER).await;
        let (status, _) = sidecar.terminate(Duration::from_secs(60));
        let text = sidecar.log_text();
        assert!(status.success(), "pgfanout run: {status}\n{text}");
        let key = std::fs::read_to_string(&s.client.key).unwrap();
        let key_body = key.lines().nth(1).expect("a PEM body line");
        assert!(!text.contains(key_body) && !text.contains("PRIVATE KEY"), "the key reached the log:\n{text}");
    }
}

/// The SQL connection's error for `url` (it must fail).
async fn sql_error(url: &str) -> String {
    match pgfanout::source::slot::connect(url).await {
        Ok(_) => panic!("the SQL connection succeeded: {url}"),
        Err(e) => e.to_string(),
    }
}

/// Opens the replication connection for `url` the way pgfanout does when it
/// creates a slot (a temporary one here).
async fn replication(t: &TestEnv, url: &str) -> Result<(), String> {
    let mut source = t.cfg.source.clone();
    source.url = Secret(url.to_string());
    // A name of its own: the last probe's temporary slot may not be gone yet.
    pgfanout::source::snapshot::create_slot_exporting(&source, &unique_name(), true)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn replication_error(t: &TestEnv, url: &str) -> String {
    replication(t, url).await.expect_err("the replication connection succeeded")
}

fn assert_says(err: &str, wanted: &[&str]) {
    eprintln!("checked: {err}");
    for w in wanted {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }
    assert!(!err.contains(TLS_PG_PASSWORD), "the password is in the error: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tls_failure_names_the_connection_and_the_cause() {
    for v in pg_versions() {
        let s = TlsServer::start(&v).await;
        let t = TestEnv::builder(&v).on_server(&s.admin_url()).build().await;
        let port = s.pg.port;
        let db = t.name.as_str();
        let ca = s.ca.cert();
        let other = s.other_ca.cert();

        // Right CA, right name: both connections open.
        let good = s.key_value("localhost", "pgfanout", db, &keys("verify-full", &ca));
        pgfanout::source::slot::connect(&good).await.expect("SQL connection with verify-full");
        replication(&t, &good).await.expect("replication connection with verify-full");

        // A CA that did not sign the server's certificate.
        let wrong_ca = s.key_value("localhost", "pgfanout", db, &keys("verify-full", &other));
        let why = ["the server's certificate is not signed by a CA in", "other-ca.crt", "(unknown CA)"];
        let target = format!("to localhost:{port} failed the TLS handshake (sslmode=verify-full)");
        assert_says(&sql_error(&wrong_ca).await, &[&["SQL connection ", &target].concat(), why[0], why[1], why[2]]);
        assert_says(
            &replication_error(&t, &wrong_ca).await,
            &[&["replication connection ", &target].concat(), why[0], why[1], why[2]],
        );
        // verify-ca and require-with-a-root-certificate check the chain too.
        for mode in ["verify-ca", "require"] {
            let url = s.key_value("localhost", "pgfanout", db, &keys(mode, &other));
            assert_says(&sql_error(&url).await, &["SQL connection", "(unknown CA)"]);
        }

        // The right CA, a host name the certificate does not hold.
        let wrong_name = s.key_value("127.0.0.1", "pgfanout", db, &keys("verify-full", &ca));
        let why = ["the server's certificate is not valid for the host name 127.0.0.1 (it names localhost)"];
        assert_says(&sql_error(&wrong_name).await, &[&format!("SQL connection to 127.0.0.1:{port} failed"), why[0]]);
        assert_says(&replication_error(&t, &wrong_name).await, &["replication connection to 127.0.0.1:", why[0]]);
        // verify-ca does not check the name; require checks nothing.
        for extra in [keys("verify-ca", &ca), "sslmode=require".to_string()] {
            let url = s.key_value("127.0.0.1", "pgfanout", db, &extra);
            pgfanout::source::slot::connect(&url).await.unwrap_or_else(|e| panic!("SQL with {extra}: {e}"));
            replication(&t, &url).await.unwrap_or_else(|e| panic!("replication with {extra}: {e}"));
        }

        // Plain text: the server has no pg_hba.conf line for it.
        let plain = s.key_value("localhost", "pgfanout", db, "sslmode=disable");
        let why = [
            "without TLS (sslmode=disable) was refused by the server",
            "no pg_hba.conf entry",
            "set sslmode=verify-full",
        ];
        assert_says(&sql_error(&plain).await, &["SQL connection to localhost:", why[0], why[1], why[2]]);
        assert_says(
            &replication_error(&t, &plain).await,
            &["replication connection to localhost:", why[0], why[1], why[2]],
        );

        // Client certificates: the right one opens both connections ...
        let cert = format!("sslcert='{}' sslkey='{}'", s.client.cert.display(), s.client.key.display());
        let by_cert =
            format!("host=localhost port={port} user={CERT_USER} dbname={db} {} {cert}", keys("verify-full", &ca));
        pgfanout::source::slot::connect(&by_cert).await.expect("SQL connection by client certificate");
        replication(&t, &by_cert).await.expect("replication connection by client certificate");
        // ... one from another CA is refused in the handshake ...
        let stranger = format!(
            "host=localhost port={port} user={CERT_USER} dbname={db} {} sslcert='{}' sslkey='{}'",
            keys("verify-full", &ca),
            s.stranger.cert.display(),
            s.stranger.key.display()
        );
        let why = "the server refused the client certificate";
        assert_says(&sql_error(&stranger).await, &["SQL connection to localhost:", why]);
        assert_says(&replication_error(&t, &stranger).await, &["replication connection to localhost:", why]);
        // ... none at all is refused at login ...
        let none = format!("host=localhost port={port} user={CERT_USER} dbname={db} {}", keys("verify-full", &ca));
        assert_says(&sql_error(&none).await, &["certificate"]);
        assert_says(&replication_error(&t, &none).await, &["certificate"]);
        // ... and the server's own certificate is still checked.
        let cert_wrong_ca =
            format!("host=localhost port={port} user={CERT_USER} dbname={db} {} {cert}", keys("verify-full", &other));
        assert_says(&sql_error(&cert_wrong_ca).await, &["SQL connection", "(unknown CA)"]);
        assert_says(&replication_error(&t, &cert_wrong_ca).await, &["replication connection", "(unknown CA)"]);

        // Settings that cannot work fail before connecting, naming the file.
        let missing = s.key_value("localhost", "pgfanout", db, &keys("verify-full", &s.dir.join("nowhere.crt")));
        assert_says(&sql_error(&missing).await, &["SQL connection: TLS settings: sslrootcert", "nowhere.crt"]);
        assert_says(&replication_error(&t, &missing).await, &["replication connection: TLS settings: sslrootcert"]);

        // `pgfanout run` reports the SQL connection's failure and stops.
        let mut cfg = t.cfg.clone();
        cfg.source.url = Secret(wrong_ca.clone());
        let config = s.dir.join("wrong-ca.toml");
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        let mut sidecar = Sidecar::spawn(&config);
        let status = sidecar.wait();
        let text = sidecar.log_text();
        assert!(!status.success(), "pgfanout run with the wrong CA: {status}\n{text}");
        assert_says(&text, &["SQL connection to localhost:", "(unknown CA)"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_tls_is_named_and_prefer_falls_back() {
    // The shared servers run without TLS.
    for v in pg_versions() {
        let t = TestEnv::new(&v).await;
        let url = t.cfg.source.url.expose().to_string();
        let require = format!("{url}?sslmode=require");
        let why = "the server does not accept TLS connections";
        assert_says(&sql_error(&require).await, &["SQL connection to 127.0.0.1:", "(sslmode=require)", why]);
        assert_says(&replication_error(&t, &require).await, &["replication connection to 127.0.0.1:", why]);
        // prefer (libpq's default, and pgfanout's) connects in plain text.
        let prefer = format!("{url}?sslmode=prefer");
        pgfanout::source::slot::connect(&prefer).await.expect("prefer falls back to plain");
        replication(&t, &prefer).await.expect("prefer falls back to plain on the replication connection");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_several_hosts_verify_full_checks_the_name_of_the_host_chosen() {
    for v in pg_versions() {
        let s = TlsServer::start(&v).await;
        let t = TestEnv::builder(&v).on_server(&s.admin_url()).build().await;
        let port = s.pg.port;
        // The same server twice: first by an address its certificate does
        // not name (passed over), then by the name it holds.
        let hosts = |list: &str| {
            format!(
                "host={list} port={port} user=pgfanout password={TLS_PG_PASSWORD} dbname={} {}",
                t.name,
                keys("verify-full", &s.ca.cert())
            )
        };
        let url = hosts("127.0.0.1,localhost");
        let (_, chosen) = pgfanout::source::slot::connect_primary(&url)
            .await
            .unwrap_or_else(|e| panic!("PG {v}: the host whose name the certificate holds: {e}"));
        assert_eq!(chosen.to_string(), format!("localhost:{port}"), "PG {v}");
        replication(&t, &url).await.unwrap_or_else(|e| panic!("PG {v}: the replication connection to it: {e}"));

        let err = sql_error(&hosts("127.0.0.1,127.0.0.1")).await;
        let mismatch = format!(
            "127.0.0.1:{port}: SQL connection to 127.0.0.1:{port} failed the TLS handshake (sslmode=verify-full): the server's certificate is not valid for the host name 127.0.0.1"
        );
        assert_says(&err, &["found no primary among the hosts of source.url", &mismatch]);
    }
}
