//! The one configuration loader: a TOML file, overridden by environment
//! variables `PGFANOUT_<SECTION>__<KEY>` (e.g. `PGFANOUT_SOURCE__URL`).
//! Secrets are wrapped so they never reach a log line.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub mod conninfo;

use self::conninfo::{ConninfoError, SslMode, TlsKeys};

/// A string that must not be logged (passwords, shared secrets).
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub log: LogConfig,
    // The sinks: a section present turns its sink on (`sinks::build`).
    #[serde(default)]
    pub clickhouse: Option<ClickHouseConfig>,
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub file: Option<FileConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

impl Config {
    /// Loads `path` (if given) and applies `PGFANOUT_*__*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(Toml::file_exact(p));
        }
        let mut cfg: Config = fig
            .merge(Env::prefixed("PGFANOUT_").split("__").filter(|k| k.as_str().contains('.')))
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))?;
        // One connection string for every connection: the TLS keys go into it.
        cfg.source.url = cfg
            .source
            .url_with_tls_keys()
            .map_err(|e| ConfigError(Box::new(figment::Error::from(format!("source.url / source.ssl*: {e}")))))?;
        cfg.source.check_socket_dir().map_err(|e| ConfigError(Box::new(figment::Error::from(e))))?;
        // A secret that cannot sign fails here, at start, not at the first batch.
        if let Some(http) = &cfg.http {
            http.signing_key().map_err(|e| ConfigError(Box::new(figment::Error::from(e.to_string()))))?;
        }
        cfg.log.debezium.check().map_err(|e| ConfigError(Box::new(figment::Error::from(e))))?;
        Ok(cfg)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key=value string; the password inside is never
    /// logged. With several hosts (`postgres://h1:p1,h2:p2/db`), every
    /// connection goes to the first that is a primary (after a promotion,
    /// the promoted standby).
    pub url: Secret,
    /// Connect the replication stream over this Unix socket directory instead
    /// of TCP (faster next to PostgreSQL: the walsender spends most of its time
    /// in send()). Only with one host in `url`.
    #[serde(default)]
    pub socket_dir: Option<String>,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Tables the publication covers, schema-qualified.
    #[serde(default = "default_tables")]
    pub tables: Vec<String>,
    /// How often the flush position is reported to the server.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Every this many milliseconds, write a tiny non-transactional logical
    /// message (`pg_logical_emit_message`) so the slot gets a position to
    /// acknowledge even when the published tables are idle (0 = off).
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// pgoutput's binary transfer (the walsender skips each value's output
    /// function; about 20 % faster here). Unset: on when every published
    /// column has a type pgfanout decodes in binary, else text.
    #[serde(default)]
    pub binary: Option<bool>,
    /// pgoutput protocol version, 1 to 4. Unset: 4 on PostgreSQL 16+, 2 on
    /// 14 and 15, 1 before. From 2 on, the server streams a transaction
    /// larger than its `logical_decoding_work_mem` while it is still in
    /// progress, and pgfanout holds it (`stream_buffer_mb`, then files in
    /// `spill_dir`) until it commits; with 1 the server spills it to its own
    /// disk and sends it at commit.
    #[serde(default)]
    pub proto_version: Option<u32>,
    /// Memory for streamed transactions not yet committed; past it they
    /// spill to files in `spill_dir`.
    #[serde(default = "default_stream_buffer_mb")]
    pub stream_buffer_mb: usize,
    /// Where streamed transactions spill (anonymous files, gone when
    /// pgfanout exits however it exits). Unset: the system's temp directory.
    #[serde(default)]
    pub spill_dir: Option<std::path::PathBuf>,
    /// Create the slot as a failover slot (PostgreSQL 17+), which a standby
    /// with `sync_replication_slots = on` keeps in step, so that after a
    /// promotion `run` continues from it on the new primary. Unset: on where
    /// the server supports it; `true` on an older server is warned about and
    /// ignored. Applies when pgfanout creates the slot.
    #[serde(default)]
    pub failover: Option<bool>,
    /// TLS to PostgreSQL, as libpq's keys of the same names (which `url`
    /// may carry too; these win): disable, prefer (the default), require,
    /// verify-ca, verify-full. `Config::load` writes them into `url`, which
    /// every connection, SQL and replication, is opened from.
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// The CA certificate(s) (PEM) the server's certificate must be signed
    /// by, or `system` for the trusted roots of the public CAs.
    #[serde(default)]
    pub sslrootcert: Option<String>,
    /// A client certificate (PEM) and its unencrypted key, for servers that
    /// authenticate by certificate (`hostssl … cert` in pg_hba.conf).
    #[serde(default)]
    pub sslcert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub sslkey: Option<std::path::PathBuf>,
}

impl SourceConfig {
    /// `url` with the `ssl*` keys above written into it.
    pub fn url_with_tls_keys(&self) -> Result<Secret, ConninfoError> {
        let keys = TlsKeys {
            sslmode: self.sslmode,
            sslrootcert: self.sslrootcert.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
        };
        conninfo::with_tls_keys(self.url.expose(), &keys).map(Secret)
    }

    /// `socket_dir` with a multi-host `url` is refused: the socket reaches
    /// only the server beside pgfanout, while the primary, which the
    /// replication connection must reach, is whichever of the hosts holds
    /// that role (a promotion moves it).
    pub fn check_socket_dir(&self) -> Result<(), String> {
        let Some(dir) = &self.socket_dir else { return Ok(()) };
        // A string that does not parse fails at the first connection, with its own error.
        let hosts = conninfo::split(self.url.expose())
            .and_then(|s| s.pg_config())
            .and_then(|pg| conninfo::endpoints(&pg))
            .map_or(1, |e| e.len());
        if hosts > 1 {
            return Err(format!("source.socket_dir ({dir}) cannot be used with {hosts} hosts in source.url: the replication connection goes to whichever host is the primary; remove socket_dir, or list one host"));
        }
        Ok(())
    }

    /// The protocol version to ask a server of version `server_version_num` for.
    pub fn proto_version_for(&self, server_version_num: i32) -> u32 {
        self.proto_version.unwrap_or(match server_version_num {
            v if v >= 160_000 => 4,
            v if v >= 140_000 => 2,
            _ => 1,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub brokers: String,
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Extra librdkafka properties (e.g. security.protocol, sasl.*, ssl.*).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, Secret>,
    /// The Debezium connector options the log follows: how values are
    /// encoded and what goes in besides the changes, under Debezium's names.
    #[serde(default)]
    pub debezium: DebeziumConfig,
}

impl LogConfig {
    /// A `[log]` section that names only its brokers: every other key at its default.
    pub fn new(brokers: impl Into<String>) -> LogConfig {
        LogConfig {
            brokers: brokers.into(),
            topic_prefix: default_topic_prefix(),
            partitions: one(),
            replication_factor: one(),
            compression: default_compression(),
            properties: Default::default(),
            debezium: DebeziumConfig::default(),
        }
    }
}

/// `[log.debezium]`: the Debezium connector options the log's envelope
/// follows (their names and defaults are Debezium's).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// The JSON converter's `schemas.enable`: each key and value as
    /// `{"schema": …, "payload": …}`.
    #[serde(rename = "schemas.enable", default)]
    pub schemas_enable: bool,
    #[serde(rename = "decimal.handling.mode", default)]
    pub decimal_handling_mode: DecimalHandlingMode,
    #[serde(rename = "time.precision.mode", default)]
    pub time_precision_mode: TimePrecisionMode,
    #[serde(rename = "binary.handling.mode", default)]
    pub binary_handling_mode: BinaryHandlingMode,
    #[serde(rename = "interval.handling.mode", default)]
    pub interval_handling_mode: IntervalHandlingMode,
    /// What an unchanged TOASTed value (not sent by PostgreSQL) is written as.
    #[serde(rename = "unavailable.value.placeholder", default = "default_unavailable_placeholder")]
    pub unavailable_value_placeholder: String,
    /// A tombstone (the deleted key, no value) after each delete, so a
    /// compacted topic forgets the key.
    #[serde(rename = "tombstones.on.delete", default = "yes")]
    pub tombstones_on_delete: bool,
    /// Operations left out of the log, comma-separated among `c`, `u`,
    /// `d`, `t`, or `none`. Only the log: the sinks still get every change.
    #[serde(rename = "skipped.operations", default = "default_skipped_operations")]
    pub skipped_operations: String,
    /// BEGIN and END records in `<prefix>transaction` and a `transaction`
    /// block in each change.
    #[serde(rename = "provide.transaction.metadata", default)]
    pub provide_transaction_metadata: bool,
    /// The heartbeat topic is `<topic.heartbeat.prefix>.<prefix>`; written
    /// every `source.heartbeat_ms` when that is on.
    #[serde(rename = "topic.heartbeat.prefix", default = "default_heartbeat_prefix")]
    pub topic_heartbeat_prefix: String,
}

impl Default for DebeziumConfig {
    fn default() -> Self {
        DebeziumConfig {
            schemas_enable: false,
            decimal_handling_mode: DecimalHandlingMode::default(),
            time_precision_mode: TimePrecisionMode::default(),
            binary_handling_mode: BinaryHandlingMode::default(),
            interval_handling_mode: IntervalHandlingMode::default(),
            unavailable_value_placeholder: default_unavailable_placeholder(),
            tombstones_on_delete: true,
            skipped_operations: default_skipped_operations(),
            provide_transaction_metadata: false,
            topic_heartbeat_prefix: default_heartbeat_prefix(),
        }
    }
}

impl DebeziumConfig {
    fn check(&self) -> Result<(), String> {
        match self.skipped_operations.split(',').map(str::trim).find(|s| !matches!(*s, "c" | "u" | "d" | "t" | "none"))
        {
            Some(bad) => Err(format!(
                "log.debezium.\"skipped.operations\": '{bad}' is not one of c, u, d, t, none (comma-separated)"
            )),
            None => Ok(()),
        }
    }

    /// Whether `op` (its one-letter code) stays out of the log.
    pub fn skips(&self, op: &str) -> bool {
        self.skipped_operations.split(',').map(str::trim).any(|s| s == op)
    }
}

fn yes() -> bool {
    true
}

fn default_skipped_operations() -> String {
    "t".into()
}

fn default_heartbeat_prefix() -> String {
    "__debezium-heartbeat".into()
}

fn default_unavailable_placeholder() -> String {
    "__debezium_unavailable_value".into()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecimalHandlingMode {
    /// `org.apache.kafka.connect.data.Decimal` (or Debezium's
    /// `VariableScaleDecimal` for a numeric without a declared scale).
    #[default]
    Precise,
    String,
    Double,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecisionMode {
    #[default]
    Adaptive,
    AdaptiveTimeMicroseconds,
    Connect,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum BinaryHandlingMode {
    #[default]
    #[serde(rename = "bytes")]
    Bytes,
    #[serde(rename = "base64")]
    Base64,
    #[serde(rename = "base64-url-safe")]
    Base64UrlSafe,
    #[serde(rename = "hex")]
    Hex,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IntervalHandlingMode {
    /// `io.debezium.time.MicroDuration`: microseconds, a month counted as 365.25 / 12 days.
    #[default]
    Numeric,
    /// `io.debezium.time.Interval`: ISO 8601 `PnYnMnDTnHnMnS`.
    String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// `http://` or `https://` (TLS, the server's certificate verified
    /// against `ca_file`, else the system's trusted roots).
    pub url: String,
    /// PEM file of the CA certificate(s) that sign the server's certificate,
    /// for an `https://` URL; it replaces the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_ch_database")]
    pub database: String,
    #[serde(default = "default_ch_user")]
    pub user: String,
    #[serde(default)]
    pub password: Secret,
    /// What a batch ClickHouse refuses for good (a type mismatch, an
    /// unknown column) becomes; see `sinks::clickhouse::classify`.
    #[serde(default)]
    pub on_permanent_error: OnPermanentError,
    /// Attempts of a permanently failing batch before it is parked.
    #[serde(default = "default_permanent_attempts")]
    pub permanent_attempts: u32,
}

/// The file sink: every enriched engagement event as one JSON line (the
/// shape Redis streams and HTTP batches carry), appended and flushed before
/// a batch counts as written. For debugging and for piping into other tools.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A file to append to, or `-` for standard output.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS, the server's certificate verified
    /// against `ca_file`, else the system's trusted roots).
    pub url: Secret,
    /// PEM file of the CA certificate(s) that sign the server's certificate,
    /// for a `rediss://` URL; it replaces the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) and private key presented to a server that
    /// asks for one (`tls-auth-clients`); both or neither.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Prefix of every key written, so several pipelines share one Redis.
    #[serde(default)]
    pub key_prefix: String,
    /// Approximate MAXLEN of each content-type stream.
    #[serde(default = "default_stream_maxlen")]
    pub stream_maxlen: u64,
    /// Width of the "most engaged" window.
    #[serde(default = "default_top_window_secs")]
    pub top_window_secs: u64,
    /// What a batch Redis refuses for good (WRONGTYPE, a script error)
    /// becomes; see `sinks::redis::classify`.
    #[serde(default)]
    pub on_permanent_error: OnPermanentError,
    #[serde(default = "default_permanent_attempts")]
    pub permanent_attempts: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    /// Shared secret for the Standard Webhooks HMAC-SHA256 signature: a
    /// Standard Webhooks secret `whsec_<base64>` (the key is the decoded
    /// bytes), or any other string (the key is its UTF-8 bytes).
    pub secret: Secret,
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts before a batch is parked in the dead-letter topic.
    #[serde(default = "default_http_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// What a batch the receiver refuses for good (a 4xx, a redirect)
    /// becomes; `max_attempts` bounds the transient failures as before.
    #[serde(default)]
    pub on_permanent_error: OnPermanentError,
    /// 1 by default: a refusal is parked at once.
    #[serde(default = "default_http_permanent_attempts")]
    pub permanent_attempts: u32,
}

impl RedisConfig {
    /// A Redis at `url`, every other key at its default (as a file that
    /// sets only `url` would give).
    pub fn new(url: Secret) -> Self {
        RedisConfig {
            url,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            key_prefix: String::new(),
            stream_maxlen: default_stream_maxlen(),
            top_window_secs: default_top_window_secs(),
            on_permanent_error: OnPermanentError::default(),
            permanent_attempts: default_permanent_attempts(),
        }
    }
}

/// What a sink does with a batch that failed permanently
/// (`on_permanent_error` in its config section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPermanentError {
    /// After `permanent_attempts`, park the batch in the dead-letter topic
    /// (with the error and its change positions), count it as flushed, go on.
    #[default]
    DeadLetter,
    /// Retry it like a transient failure, for as long as it takes: the
    /// stream stops there (and alerts) until someone fixes the cause; nothing
    /// is skipped.
    Stall,
}

impl OnPermanentError {
    /// `retry::Policy::permanent_attempts` for this choice and `permanent_attempts`.
    pub fn attempts(self, permanent_attempts: u32) -> Option<u32> {
        match self {
            OnPermanentError::DeadLetter => Some(permanent_attempts.max(1)),
            OnPermanentError::Stall => None,
        }
    }
}

/// Why `http.secret` cannot be used as a signing key. The messages never
/// quote the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("http.secret is empty")]
    Empty,
    #[error("http.secret starts with `whsec_` but the rest is not standard base64 ({0}); a Standard Webhooks secret is `whsec_` followed by the base64 of the key bytes")]
    Base64(&'static str),
}

impl HttpConfig {
    /// A receiver at `url` signed with `secret`, every other key at its
    /// default (as a file that sets only those two would give).
    pub fn new(url: impl Into<String>, secret: Secret) -> Self {
        HttpConfig {
            url: url.into(),
            secret,
            timeout_ms: default_http_timeout_ms(),
            max_attempts: default_http_max_attempts(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            on_permanent_error: OnPermanentError::default(),
            permanent_attempts: default_http_permanent_attempts(),
        }
    }

    /// The HMAC key `http.secret` stands for. A secret starting with
    /// `whsec_` is taken as a Standard Webhooks secret, as the receivers'
    /// libraries take it (padding optional); anything else is used as is,
    /// so existing raw secrets keep working.
    pub fn signing_key(&self) -> Result<Vec<u8>, SecretError> {
        use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
        use base64::Engine;
        const WHSEC: GeneralPurpose = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            general_purpose::PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let secret = self.secret.expose();
        let key = match secret.strip_prefix("whsec_") {
            Some(b64) => WHSEC.decode(b64).map_err(|e| {
                // Not the error's text: it quotes the offending byte, a piece of the secret.
                SecretError::Base64(match e {
                    base64::DecodeError::InvalidByte(..) => "a character outside the base64 alphabet",
                    base64::DecodeError::InvalidLength(_) => "its length is not that of base64",
                    base64::DecodeError::InvalidLastSymbol(..) => "the last character has bits set past the end",
                    base64::DecodeError::InvalidPadding => "misplaced padding",
                })
            })?,
            None => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(key)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
// Field by field: one key set in the file or the environment keeps the
// other defaults.
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Largest number of changes handed to the sinks at once; also bounds
    /// memory for huge transactions, which are cut into batches.
    pub batch_max_changes: usize,
    /// How long a partial batch may wait for more changes.
    pub batch_linger_ms: u64,
    /// Changes buffered between the replication reader and the pipeline.
    pub channel_capacity: usize,
    /// Changes each sink lane may queue while it writes the batch before: a
    /// slow sink holds at most this many before it slows the source. Counted
    /// in changes, not batches, so at low rates (small batches) a stalled
    /// sink does not hold the others back, and under a backlog (full
    /// batches) memory stays as bounded as ever.
    pub sink_queue_changes: usize,
    /// How long SIGTERM/SIGINT may take to drain: past it the process exits
    /// non-zero without acknowledging anything more (the slot replays the rest).
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Run with no sink at all: changes are published to the log and the
    /// slot moves once the broker has them (for other consumers of the
    /// log). Without it, a configuration with no sink section is an error.
    pub log_only: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_max_changes: 5_000,
            batch_linger_ms: 50,
            // One batch's worth: more buys no speed (the lanes queue whole
            // batches already) and costs about 40 MB of peak RSS per 20k
            // changes (benches/drain.sh).
            channel_capacity: 5_000,
            // Two full batches under a backlog; at 1,000 changes/s (batches
            // of ~50) ten seconds of a stalled sink.
            sink_queue_changes: 10_000,
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            log_only: false,
        }
    }
}

/// The service endpoint (`/metrics`, `/healthz`, `/readyz`) and the lag
/// thresholds behind readiness, the lag alert and `pgfanout status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address the endpoint listens on (`host:port`); empty disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// Replication lag in seconds above which the sidecar is not ready and alerts.
    #[serde(default = "default_max_lag_seconds")]
    pub max_lag_seconds: u64,
    /// Replication lag in bytes (server WAL end minus flushed LSN) above
    /// which the sidecar is not ready and alerts.
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
            max_lag_seconds: default_max_lag_seconds(),
            max_lag_bytes: default_max_lag_bytes(),
        }
    }
}

fn default_slot() -> String {
    "pgfanout".into()
}
fn default_tables() -> Vec<String> {
    vec!["public.content".into(), "public.engagement_events".into()]
}
fn default_stream_buffer_mb() -> usize {
    16
}
fn default_status_interval_ms() -> u64 {
    1_000
}
fn default_topic_prefix() -> String {
    "pgfanout.".into()
}
fn one() -> i32 {
    1
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_ch_database() -> String {
    "app".into()
}
fn default_ch_user() -> String {
    "default".into()
}
fn default_stream_maxlen() -> u64 {
    100_000
}
fn default_top_window_secs() -> u64 {
    600
}
fn default_http_timeout_ms() -> u64 {
    10_000
}
fn default_http_max_attempts() -> u32 {
    8
}
fn default_permanent_attempts() -> u32 {
    3
}
fn default_http_permanent_attempts() -> u32 {
    1
}
fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    10_000
}
fn default_shutdown_timeout_ms() -> u64 {
    10_000
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_max_lag_seconds() -> u64 {
    60
}
fn default_max_lag_bytes() -> u64 {
    1 << 30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"***\"");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn toml_and_env_overrides() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                r#"
                [source]
                url = "postgres://u:pw@localhost/db"
                [log]
                brokers = "localhost:9092"
                [clickhouse]
                url = "https://localhost:8443"
                ca_file = "/etc/pgfanout/ca.pem"
                [redis]
                url = "rediss://localhost"
                [http]
                url = "http://localhost:9000/hook"
                secret = "s3cret"
                "#,
            )?;
            jail.set_env("PGFANOUT_REDIS__KEY_PREFIX", "t1:");
            jail.set_env("PGFANOUT_REDIS__CLIENT_CERT_FILE", "/run/secrets/redis.pem");
            jail.set_env("PGFANOUT_REDIS_URL", "ignored, not a section key");
            // One key of a section the file leaves out: the rest keep their defaults.
            jail.set_env("PGFANOUT_PIPELINE__CHANNEL_CAPACITY", "7000");
            let c = Config::load(Some(Path::new("p.toml"))).expect("loads");
            assert_eq!(c.redis.as_ref().unwrap().key_prefix, "t1:");
            assert_eq!(c.clickhouse.as_ref().unwrap().ca_file.as_deref(), Some(Path::new("/etc/pgfanout/ca.pem")));
            let redis = c.redis.as_ref().unwrap();
            assert_eq!(redis.client_cert_file.as_deref(), Some(Path::new("/run/secrets/redis.pem")));
            assert!(redis.ca_file.is_none() && redis.client_key_file.is_none());
            assert_eq!(c.source.slot, "pgfanout");
            assert_eq!(c.source.heartbeat_ms, 0, "the heartbeat is off unless asked for");
            assert_eq!(c.pipeline.batch_max_changes, 5_000);
            assert_eq!(c.pipeline.channel_capacity, 7_000);
            assert_eq!(c.pipeline.shutdown_timeout_ms, 10_000);
            assert_eq!(c.metrics.listen, "127.0.0.1:9187");
            assert!(!format!("{c:?}").contains("s3cret"));
            assert_eq!(c.http.as_ref().unwrap().signing_key().unwrap(), b"s3cret", "a raw secret is its UTF-8 bytes");
            jail.set_env("PGFANOUT_HTTP__SECRET", "whsec_not base64!");
            let err = Config::load(Some(Path::new("p.toml"))).unwrap_err().to_string();
            assert!(err.contains("http.secret") && err.contains("base64") && !err.contains("not base64!"), "{err}");
            // A section left out turns its sink off (an environment
            // variable of a section would make it, wanting its other keys).
            jail.clear_env();
            jail.create_file(
                "q.toml",
                "[source]\nurl = \"postgres://localhost/db\"\n[log]\nbrokers = \"b:9092\"\n[file]\npath = \"-\"\n",
            )?;
            let c = Config::load(Some(Path::new("q.toml"))).expect("loads without clickhouse, redis and http");
            assert!(c.clickhouse.is_none() && c.redis.is_none() && c.http.is_none());
            assert_eq!(c.file.as_ref().map(|f| f.path.as_str()), Some("-"));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn source_tls_keys_go_into_the_url() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                r#"
                [source]
                url = "postgres://u:pw@db.example.com/app?sslmode=require"
                sslrootcert = "/etc/ca.pem"
                sslcert = "/etc/client.crt"
                sslkey = "/etc/client.key"
                [log]
                brokers = "localhost:9092"
                "#,
            )?;
            jail.set_env("PGFANOUT_SOURCE__SSLMODE", "verify-full");
            let c = Config::load(Some(Path::new("p.toml"))).expect("loads");
            let tls = conninfo::split(c.source.url.expose()).unwrap().tls;
            assert_eq!(
                tls.sslmode,
                Some(SslMode::VerifyFull),
                "[source] (here from the environment) wins over the URL"
            );
            assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca.pem"));
            assert_eq!(tls.sslkey.as_deref(), Some(Path::new("/etc/client.key")));
            jail.set_env("PGFANOUT_SOURCE__SSLMODE", "verify");
            let err = Config::load(Some(Path::new("p.toml"))).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("source.sslmode") && err.contains("verify-full"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn socket_dir_is_refused_with_several_hosts() {
        figment::Jail::expect_with(|jail| {
            let file = |url: &str| {
                format!("[source]\nurl = \"{url}\"\nsocket_dir = \"/run/pg\"\n[log]\nbrokers = \"b:9092\"\n")
            };
            jail.create_file("one.toml", &file("postgres://u@db1:5432/app"))?;
            Config::load(Some(Path::new("one.toml"))).expect("one host with socket_dir");
            jail.create_file("two.toml", &file("postgres://u@db1:5432,db2:5432/app?target_session_attrs=read-write"))?;
            let err = Config::load(Some(Path::new("two.toml"))).unwrap_err().to_string();
            assert!(err.contains("source.socket_dir (/run/pg) cannot be used with 2 hosts"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn standard_webhooks_secrets_decode_to_their_key() {
        let http = |secret: &str| HttpConfig::new("", Secret(secret.into()));
        let key = [0x31, 0xf2, 0x90, 0xf6, 0xbf, 0x06, 0x29, 0x8a, 0xab, 0x4f, 0x08, 0xd4, 0x3c, 0x3f, 0x08, 0x2c];
        assert_eq!(http("whsec_MfKQ9r8GKYqrTwjUPD8ILA==").signing_key().unwrap(), key);
        assert_eq!(http("whsec_MfKQ9r8GKYqrTwjUPD8ILA").signing_key().unwrap(), key, "padding is optional");
        assert_eq!(http("MfKQ9r8GKYqrTwjUPD8ILA==").signing_key().unwrap(), b"MfKQ9r8GKYqrTwjUPD8ILA==");
        assert_eq!(http("whsec_").signing_key(), Err(SecretError::Empty));
        assert_eq!(http("").signing_key(), Err(SecretError::Empty));
        assert!(matches!(http("whsec_Mf-Q").signing_key(), Err(SecretError::Base64(_))));
    }
}
