//! TLS to the sinks, against real servers with a CA the test makes
//! (openssl): a Redis that listens with `--tls-port` only and requires a
//! client certificate, and the ClickHouse adapter serving HTTPS. The
//! pipeline streams PostgreSQL to both over `rediss://` and `https://` with
//! verification on; a CA that did not sign the servers' certificates, or no
//! client certificate, stops `run` at start with an error naming the sink.

mod support;

use std::time::Duration;

use pgfanout::config::Config;
use pgfanout::pipeline::{self, PipelineError};
use redis::AsyncCommands;
use support::certs::{Issued, TestCa};
use support::private::{Kind, PrivateService, ServerTls};
use support::{pg_versions, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

const SAMPLE: &str = "
INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
('550e8400-e29b-41d4-a716-446655440000', 'tls-episode', 'Over TLS', 'podcast', 1200, NOW());
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES
('550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'play', NOW(), 30000, 'web', '{}');
";

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Row {
    content_slug: String,
    content_title: String,
    engagement_percent: Option<f64>,
}

struct Services {
    /// Holds the certificate files.
    _dir: tempfile::TempDir,
    ca: TestCa,
    client: Issued,
    redis: PrivateService,
    clickhouse: PrivateService,
}

async fn services() -> Services {
    let dir = tempfile::tempdir().expect("a directory for the certificates");
    let ca = TestCa::new(dir.path(), "good", "pgfanout good test CA");
    let tls = || {
        let server = ca.server("server", &["IP:127.0.0.1", "DNS:localhost"]);
        ServerTls { cert: server.cert, key: server.key, ca: ca.cert() }
    };
    let redis = PrivateService::with_tls(Kind::Redis, tls()).await;
    let clickhouse = PrivateService::with_tls(Kind::ClickHouse, tls()).await;
    let client = ca.client("client-pgfanout", "pgfanout");
    Services { _dir: dir, client, redis, clickhouse, ca }
}

/// A test environment whose Redis and ClickHouse sinks are `s`'s, reached
/// over TLS with the test CA (and the client certificate for Redis).
async fn env_on(v: &str, s: &Services) -> TestEnv {
    let mut t = TestEnv::new(v).await;
    let redis = t.cfg.redis.as_mut().unwrap();
    redis.ca_file = Some(s.ca.cert());
    redis.client_cert_file = Some(s.client.cert.clone());
    redis.client_key_file = Some(s.client.key.clone());
    t.use_private_redis(&s.redis).await;
    t.cfg.clickhouse.as_mut().unwrap().ca_file = Some(s.ca.cert());
    // `init` over https: the schema goes through the same client.
    t.use_private_clickhouse(&s.clickhouse).await;
    t
}

async fn streams_over_tls(v: &str, s: &Services) {
    let mut t = env_on(v, s).await;
    assert!(t.cfg.redis.as_ref().unwrap().url.expose().starts_with("rediss://"));
    assert!(t.cfg.clickhouse.as_ref().unwrap().url.starts_with("https://"));
    t.start();
    t.pg.batch_execute(SAMPLE).await.unwrap();
    let end = t.wal_insert_lsn().await;

    wait_until("ClickHouse (https) holds the enriched row", WAIT, || async {
        t.ch_count("SELECT count() FROM enriched_engagements FINAL").await == 1
    })
    .await;
    let rows = t
        .ch()
        .query("SELECT content_slug, content_title, engagement_percent FROM enriched_engagements FINAL")
        .fetch_all::<Row>()
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "PG {v}");
    assert_eq!((rows[0].content_slug.as_str(), rows[0].content_title.as_str()), ("tls-episode", "Over TLS"));
    assert_eq!(rows[0].engagement_percent, Some(2.5));

    let prefix = t.cfg.redis.as_ref().unwrap().key_prefix.clone();
    let stream = format!("{prefix}stream:podcast");
    wait_until("Redis (rediss) holds the stream entry", WAIT, || {
        let (mut r, stream) = (t.redis().clone(), stream.clone());
        async move { r.xlen::<_, u64>(&stream).await.unwrap() == 1 }
    })
    .await;
    let mut r = t.redis().clone();
    let entries: redis::streams::StreamRangeReply = r.xrange_all(&stream).await.unwrap();
    let data: String = entries.ids[0].get("data").expect("the entry's data field");
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    let event = &data["event"];
    assert_eq!(
        (event["content_slug"].as_str(), event["engagement_percent"].as_f64()),
        (Some("tls-episode"), Some(2.5))
    );
    let top: Vec<(String, f64)> = r.zrevrange_withscores(format!("{prefix}top:window"), 0, -1).await.unwrap();
    assert_eq!(top, vec![("550e8400-e29b-41d4-a716-446655440000".to_string(), 2.5)], "PG {v}");

    wait_until("slot acknowledged past the transaction", WAIT, || async { t.confirmed_flush_lsn().await >= end }).await;
    t.stop().await;
}

/// `run` with `cfg` ends by itself (it must not start streaming); its error.
async fn run_fails(cfg: Config) -> String {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let run = pipeline::run(cfg, rx, Default::default());
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Err(PipelineError::Sink(e))) => {
            eprintln!("run stopped at start, as it should: {e}");
            e.to_string()
        }
        Ok(other) => panic!("run should have failed on a sink at start, got {other:?}"),
        Err(_) => panic!("run kept going for 60 s with a sink it cannot verify"),
    }
}

async fn wrong_ca_and_missing_client_certificate_fail_at_start(v: &str, s: &Services) {
    let t = env_on(v, s).await;
    let other_dir = tempfile::tempdir().expect("a directory for the other CA");
    let other = TestCa::new(other_dir.path(), "other", "pgfanout other test CA");

    let mut cfg = t.cfg.clone();
    cfg.clickhouse.as_mut().unwrap().ca_file = Some(other.cert());
    let e = run_fails(cfg).await;
    assert!(
        e.starts_with("clickhouse: TLS handshake failed: invalid peer certificate: UnknownIssuer")
            && e.contains(other.cert().to_str().unwrap()),
        "PG {v}: {e}"
    );

    let mut cfg = t.cfg.clone();
    cfg.redis.as_mut().unwrap().ca_file = Some(other.cert());
    let e = run_fails(cfg).await;
    assert!(e.starts_with("redis: ") && e.contains("UnknownIssuer"), "PG {v}: {e}");

    // The server asks for a client certificate (tls-auth-clients): without one it refuses.
    let mut cfg = t.cfg.clone();
    let redis = cfg.redis.as_mut().unwrap();
    (redis.client_cert_file, redis.client_key_file) = (None, None);
    let e = run_fails(cfg).await;
    assert!(e.starts_with("redis: "), "PG {v}: {e}");

    // Certificate keys for a URL without TLS are refused, not ignored.
    let mut cfg = t.cfg.clone();
    cfg.redis.as_mut().unwrap().url = pgfanout::config::Secret("redis://127.0.0.1:1".into());
    let e = run_fails(cfg).await;
    assert_eq!(e, "redis: redis.ca_file is set but redis.url is not a rediss:// URL (TLS)");
    let mut cfg = t.cfg.clone();
    cfg.clickhouse.as_mut().unwrap().url = "http://127.0.0.1:1".into();
    let e = run_fails(cfg).await;
    assert_eq!(e, "clickhouse: clickhouse.ca_file is set but clickhouse.url is not an https:// URL");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_and_clickhouse_over_tls_verified_by_the_test_ca() {
    let s = services().await;
    for v in pg_versions() {
        streams_over_tls(&v, &s).await;
        wrong_ca_and_missing_client_certificate_fail_at_start(&v, &s).await;
    }
}
