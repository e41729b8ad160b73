//! ClickHouse: enriched events into `enriched_engagements`, content changes
//! into `content_dim`. Both tables are ReplacingMergeTree with a version
//! taken from the change's position and an `_is_deleted` flag, so a replayed
//! row collapses into the one already there and a delete hides the row;
//! queries read with FINAL (or `SETTINGS final = 1`).
//!
//! # Failures
//!
//! [`classify`] sorts ClickHouse's errors. Transient (retried with backoff
//! for as long as it takes, alerting through the sink metrics): network
//! errors, refused or dropped connections, timeouts ([`REQUEST_TIMEOUT`]),
//! HTTP 5xx without a code, and every server error whose code is not listed
//! below: TOO_MANY_PARTS (252), MEMORY_LIMIT_EXCEEDED (241),
//! TOO_MANY_SIMULTANEOUS_QUERIES (202), TIMEOUT_EXCEEDED (159),
//! TABLE_IS_READ_ONLY (242), Keeper errors, and also AUTHENTICATION_FAILED
//! (516) and ACCESS_DENIED (497), which an operator fixes for every batch
//! at once (parking would empty the stream into the dead-letter topic).
//! Permanent (this batch fails the same way until the table or the data
//! changes): the client's schema check (`SchemaMismatch`: a column's type
//! changed, a column is missing), errors encoding the rows, and the server
//! codes of [`PERMANENT_CODES`] (TYPE_MISMATCH 53, NO_SUCH_COLUMN_IN_TABLE
//! 16, CANNOT_PARSE_INPUT_ASSERTION_FAILED 27, UNKNOWN_TABLE 60,
//! SYNTAX_ERROR 62, ...). A permanent error is retried `permanent_attempts`
//! times in all, then the batch is parked in the dead-letter topic with the
//! error and its change positions ([`super::park`]) and counts as flushed;
//! with `on_permanent_error = "stall"` it is retried like a transient one.

use std::sync::Arc;
use std::time::Duration;

mod rows;
mod schema;
pub mod tls;

use clickhouse::{Client, RowOwned, RowWrite};

use self::rows::{after_last_truncate, content_records, engagement_records, ContentRecord, EngagementRecord, Table};
use super::{Probe, Refused, SinkError};
use crate::config::ClickHouseConfig;
use crate::enrich::Enriched;
use crate::log::LogProducer;
use crate::retry::{self, ErrorClass, Policy};
use crate::source::{Op, Position};

/// How long one write (all its requests) may take. The client has no
/// timeout of its own: a hung server (or a dead connection without a reset)
/// would stall the pipeline silently forever. A write abandoned here may
/// still land later; the retry writes the same rows and versions, which
/// collapse into them.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ClickHouseSink {
    client: Client,
    cfg: ClickHouseConfig,
    policy: Policy,
    dead_letter: Option<Arc<LogProducer>>,
}

/// Server error codes that fail a batch the same way on every attempt: the
/// rows do not fit the table (or the table is gone), not the server unwell.
pub const PERMANENT_CODES: &[(u32, &str)] = &[
    (6, "CANNOT_PARSE_TEXT"),
    (16, "NO_SUCH_COLUMN_IN_TABLE"),
    (26, "CANNOT_PARSE_QUOTED_STRING"),
    (27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED"),
    (33, "CANNOT_READ_ALL_DATA"),
    (36, "BAD_ARGUMENTS"),
    (41, "CANNOT_PARSE_DATETIME"),
    (43, "ILLEGAL_TYPE_OF_ARGUMENT"),
    (47, "UNKNOWN_IDENTIFIER"),
    (53, "TYPE_MISMATCH"),
    (60, "UNKNOWN_TABLE"),
    (62, "SYNTAX_ERROR"),
    (69, "ARGUMENT_OUT_OF_BOUND"),
    (70, "CANNOT_CONVERT_TYPE"),
    (72, "CANNOT_PARSE_NUMBER"),
    (81, "UNKNOWN_DATABASE"),
    (117, "INCORRECT_DATA"),
    (349, "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN"),
];

/// Whether another attempt of the same write may succeed (see the module docs).
pub fn classify(e: &SinkError) -> ErrorClass {
    use clickhouse::error::Error as E;
    let SinkError::ClickHouse(e) = e else { return ErrorClass::Transient };
    match e {
        E::BadResponse(text) => match exception_code(text) {
            Some(code) if PERMANENT_CODES.iter().any(|(c, _)| *c == code) => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        },
        E::SchemaMismatch(_)
        | E::InvalidColumnsHeader(_)
        | E::InvalidParams(_)
        | E::DataFormat(_)
        | E::Custom(_)
        | E::SequenceMustHaveLength
        | E::DeserializeAnyNotSupported
        | E::NotEnoughData
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::VariantDiscriminatorIsOutOfBound(_)
        | E::Unsupported(_) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// The code of a server exception as the client reports it: the whole text
/// (the `X-ClickHouse-Exception-Code` header when the body was unreadable)
/// or `Code: 53. DB::Exception: ...`.
fn exception_code(text: &str) -> Option<u32> {
    let text = text.trim();
    if let Ok(code) = text.parse() {
        return Some(code);
    }
    let at = text.find("Code: ")? + "Code: ".len();
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

impl ClickHouseSink {
    /// `refused`: what becomes of a batch refused for good (parked as
    /// `on_permanent_error` says, stalled, or returned).
    pub fn new(cfg: &ClickHouseConfig, refused: &Refused) -> Result<Self, SinkError> {
        let client = tls::client(cfg)?.with_database(&cfg.database);
        let permanent_attempts = refused.permanent_attempts(cfg.on_permanent_error, cfg.permanent_attempts);
        let dead_letter = refused.dead_letter();
        let policy = Policy { permanent_attempts, ..Policy::sink("clickhouse", None) };
        Ok(ClickHouseSink { client, cfg: cfg.clone(), policy, dead_letter })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One attempt. A retry repeats it whole: the TRUNCATE again, then the
    /// same rows and versions, so it ends in the same state.
    async fn write_once(
        &self,
        events: &Table<EngagementRecord>,
        contents: &Table<ContentRecord>,
    ) -> Result<(), SinkError> {
        // Content first: a reader that sees an event also sees the content
        // row it was enriched from (the dimension is never behind the facts).
        self.write_table(contents).await?;
        self.write_table(events).await
    }

    async fn write_table<T: RowOwned + RowWrite>(&self, table: &Table<T>) -> Result<(), SinkError> {
        if table.truncate {
            self.client.query(&format!("TRUNCATE TABLE {}", table.name)).execute().await?;
        }
        if !table.rows.is_empty() {
            let mut ins = self.client.insert::<T>(table.name).await?;
            for r in &table.rows {
                ins.write(r).await?;
            }
            ins.end().await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl super::Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    /// The database and tables of `sql/clickhouse/schema.sql`, migrating
    /// tables that still have the old version column.
    async fn init(&self) -> Result<(), SinkError> {
        schema::apply(&self.cfg).await
    }

    /// Over `https://`, stops the run at start when the TLS handshake
    /// fails (a certificate the CA does not vouch for, a server without
    /// TLS): every attempt would fail alike, and a write only warns and
    /// retries. Any other failure (ClickHouse down) is left to the writes,
    /// which ride it out as before.
    async fn connect(&self) -> Result<(), SinkError> {
        if !tls::is_https(&self.cfg.url) {
            return Ok(());
        }
        let ping = tokio::time::timeout(REQUEST_TIMEOUT, self.client.query("SELECT 1").execute()).await;
        let Ok(Err(e)) = ping else { return Ok(()) };
        let Some(why) = tls::handshake_failure(&e) else { return Ok(()) };
        let against = match &self.cfg.ca_file {
            Some(ca) => format!("clickhouse.ca_file = {}", ca.display()),
            None => "the system's trusted roots (no clickhouse.ca_file)".into(),
        };
        Err(SinkError::Tls {
            sink: "clickhouse",
            detail: format!("TLS handshake failed: {why} (verified against {against})"),
        })
    }

    async fn probe(&self) -> Result<Probe, String> {
        let v: u128 = self
            .client
            .query("SELECT max(_version) FROM enriched_engagements")
            .fetch_one()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Probe {
            position: (v != 0).then(|| Position::from_version(v)),
            detail: Some(format!("database {}", self.cfg.database)),
        })
    }

    /// Writes a batch, retrying (with backoff) until ClickHouse takes it:
    /// an outage stalls the pipeline, it never drops data. A batch refused
    /// permanently is parked after `permanent_attempts` (or stalls).
    async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        let (events_truncated, events) = after_last_truncate(&batch.engagements, |c| c.op == Op::Truncate);
        let (contents_truncated, contents) = after_last_truncate(&batch.contents, |c| c.op == Op::Truncate);
        let events =
            Table { name: "enriched_engagements", truncate: events_truncated, rows: engagement_records(events) };
        let contents = Table { name: "content_dim", truncate: contents_truncated, rows: content_records(contents) };
        let (sink, tables) = (self, (&events, &contents));
        let written = retry::run(&self.policy, classify, move |_| async move {
            let attempt = tokio::time::timeout(REQUEST_TIMEOUT, sink.write_once(tables.0, tables.1));
            attempt.await.unwrap_or(Err(SinkError::ClickHouse(clickhouse::error::Error::TimedOut)))
        })
        .await;
        match (written, &self.dead_letter) {
            (Ok(()), _) => Ok(()),
            (Err(g), Some(log)) if g.may_park() => {
                let tables: Vec<&str> = [events.written(), contents.written()].into_iter().flatten().collect();
                super::park(log, "clickhouse", &tables.join(", "), batch, &g.error.to_string(), g.attempts).await
            }
            (Err(g), _) => Err(g.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_and_data_errors_are_permanent_outages_transient() {
        use clickhouse::error::Error as E;
        let class = |e: E| classify(&SinkError::ClickHouse(e));
        let bad = |text: &str| class(E::BadResponse(text.into()));
        assert_eq!(
            bad("Code: 53. DB::Exception: Type mismatch in VALUES section. (TYPE_MISMATCH)"),
            ErrorClass::Permanent
        );
        assert_eq!(
            bad("Code: 16. DB::Exception: No such column device. (NO_SUCH_COLUMN_IN_TABLE)"),
            ErrorClass::Permanent
        );
        assert_eq!(bad("Code: 60. DB::Exception: Table x.enriched_engagements does not exist"), ErrorClass::Permanent);
        assert_eq!(bad("27"), ErrorClass::Permanent, "the exception-code header alone");
        assert_eq!(bad("Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS)"), ErrorClass::Transient);
        assert_eq!(bad("Code: 241. DB::Exception: Memory limit exceeded"), ErrorClass::Transient);
        assert_eq!(bad("Code: 516. DB::Exception: default: Authentication failed"), ErrorClass::Transient);
        assert_eq!(bad("503 Service Unavailable"), ErrorClass::Transient);
        assert_eq!(class(E::SchemaMismatch("device: Nullable(String) vs UInt8".into())), ErrorClass::Permanent);
        assert_eq!(class(E::TimedOut), ErrorClass::Transient);
        assert_eq!(class(E::Network("connection refused".into())), ErrorClass::Transient);
    }
}
