//! Redis: a stream per content type (time-ordered enriched events, trimmed
//! by approximate MAXLEN) and the "most engaged content" window as
//! per-minute sorted sets that expire by themselves, merged into
//! `<prefix>top:window` after every batch. A batch is one Lua script, so
//! its data and the progress watermark change together: a replayed change
//! (position at or below the watermark) is skipped.
//!
//! The live stream uses `<prefix>position`; a batch of another origin
//! (`Enriched::origin`: a snapshot or backfill chunk, whose positions are
//! not the live stream's) uses `<prefix>position:<origin>`.
//!
//! How the window counts each live event once and retracts exactly what it
//! counted, and how re-read rows (backfill) are appended once per row
//! version: `script.rs`, which holds the keys, the Lua script and its
//! arguments, without I/O.
//!
//! # Failures
//!
//! [`classify`] sorts Redis's errors. Transient (retried with backoff for as
//! long as it takes, alerting through the sink metrics): I/O errors, refused
//! and dropped connections, timeouts, and the server's BUSY (a script still
//! running), LOADING, TRYAGAIN, MASTERDOWN, READONLY (a failover), OOM,
//! CLUSTERDOWN, NOSCRIPT (the client loads the script again), and
//! authentication and ACL errors (an operator fixes them for every batch at
//! once). Permanent: WRONGTYPE (a key under the prefix holds another type
//! than this sink writes), an error raised in the batch's script (`ERR
//! ... script ...`), a reply the client cannot parse or did not expect.
//! A permanent error is retried `permanent_attempts` times in all, then the
//! batch is parked in the dead-letter topic with the error and its change
//! positions (`sinks::park`) and counts as flushed; with
//! `on_permanent_error = "stall"` it is retried like a transient one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

mod script;

use redis::aio::ConnectionManager;
use redis::Script;

use super::{Probe, Refused, SinkError};
use crate::config::RedisConfig;
use crate::enrich::Enriched;
use crate::log::LogProducer;
use crate::retry::{self, ErrorClass, Policy};
use crate::source::{Op, Position};

pub mod tls;

pub use self::script::{progress_key, SEEN_TTL_SECS};

pub struct RedisSink {
    client: redis::Client,
    /// Opened by the first `connect`, `probe` or write.
    conn: tokio::sync::OnceCell<ConnectionManager>,
    cfg: RedisConfig,
    script: Script,
    policy: Policy,
    dead_letter: Option<Arc<LogProducer>>,
}

/// Whether another attempt of the same batch may succeed (see the module docs).
pub fn classify(e: &SinkError) -> ErrorClass {
    let SinkError::Redis(e) = e else { return ErrorClass::Transient };
    classify_redis(e)
}

fn classify_redis(e: &redis::RedisError) -> ErrorClass {
    use redis::ErrorKind;
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return ErrorClass::Transient;
    }
    match (e.kind(), e.code()) {
        (_, Some("WRONGTYPE")) => ErrorClass::Permanent,
        (_, Some("ERR")) if e.detail().is_some_and(|d| d.to_ascii_lowercase().contains("script")) => {
            ErrorClass::Permanent
        }
        (ErrorKind::Parse | ErrorKind::UnexpectedReturnType, _) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

impl RedisSink {
    /// `refused`: what becomes of a batch refused for good (parked as
    /// `on_permanent_error` says, stalled, or returned).
    pub fn new(cfg: &RedisConfig, refused: &Refused) -> Result<Self, SinkError> {
        let client = tls::client(cfg)?;
        let permanent_attempts = refused.permanent_attempts(cfg.on_permanent_error, cfg.permanent_attempts);
        let dead_letter = refused.dead_letter();
        let policy = Policy { permanent_attempts, ..Policy::sink("redis", None) };
        let conn = tokio::sync::OnceCell::new();
        Ok(RedisSink { client, conn, cfg: cfg.clone(), script: Script::new(script::APPLY), policy, dead_letter })
    }

    /// The connection, opened on first use; it reconnects by itself after.
    async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        // A batch is one script of thousands of commands, which can take a
        // few hundred ms; the default 500 ms response timeout would abandon
        // (and re-send) big batches whenever Redis is busy.
        let conn = self.conn.get_or_try_init(|| {
            let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
            ConnectionManager::new_with_config(self.client.clone(), config)
        });
        Ok(conn.await?.clone())
    }

    pub fn stream_key(&self, content_type: &str) -> String {
        script::stream_key(&self.cfg.key_prefix, content_type)
    }

    pub fn top_key(&self) -> String {
        script::top_key(&self.cfg.key_prefix)
    }

    pub fn progress_key(&self) -> String {
        progress_key(&self.cfg.key_prefix)
    }

    /// `<prefix>position:<origin>`: a progress watermark of its own.
    pub fn scoped_progress_key(&self, origin: &str) -> String {
        script::scoped_progress_key(&self.cfg.key_prefix, origin)
    }

    async fn write_once(&self, batch: &Enriched, progress: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn().await?;
        // A TRUNCATE is appended to every stream there is; those this batch
        // creates before it are added as the arguments are built.
        let streams = if batch.engagements.iter().any(|c| c.op == Op::Truncate) {
            self.streams(&mut conn).await?
        } else {
            BTreeSet::new()
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let args = script::script_args(&self.cfg, &batch.engagements, super::events_json(batch), now_ms, streams);
        let mut inv = self.script.prepare_invoke();
        inv.key(progress).key(self.top_key());
        for a in &args {
            inv.arg(a);
        }
        inv.invoke_async::<String>(&mut conn).await?;
        Ok(())
    }

    /// Every stream key under the prefix (`<prefix>stream:*`).
    async fn streams(&self, conn: &mut ConnectionManager) -> Result<BTreeSet<String>, redis::RedisError> {
        let pattern = format!("{}stream:*", script::glob_escape(&self.cfg.key_prefix));
        let mut out = BTreeSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(conn)
                .await?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

#[async_trait::async_trait]
impl super::Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn connect(&self) -> Result<(), SinkError> {
        self.conn().await?;
        Ok(())
    }

    async fn probe(&self) -> Result<Probe, String> {
        let mut conn = self.conn().await.map_err(|e| e.to_string())?;
        let key = self.progress_key();
        let progress: Option<String> =
            redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(|e| e.to_string())?;
        let (position, unreadable) = match progress.as_deref().map(|p| (Position::from_sortable_hex(p), p)) {
            Some((Some(p), _)) => (Some(p), None),
            Some((None, p)) => (None, Some(format!(", unreadable position {p:?}"))),
            None => (None, None),
        };
        Ok(Probe { position, detail: Some(format!("key {key}{}", unreadable.unwrap_or_default())) })
    }

    /// Applies a batch, retrying (with backoff) until Redis takes it, with
    /// the progress watermark of the batch's origin.
    async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        if batch.engagements.is_empty() {
            return Ok(());
        }
        let progress = batch.origin.as_deref().map_or_else(|| self.progress_key(), |s| self.scoped_progress_key(s));
        let progress = progress.as_str();
        let written = retry::run(&self.policy, classify, |_| async move {
            self.write_once(batch, progress).await.map_err(SinkError::from)
        })
        .await;
        match (written, &self.dead_letter) {
            (Ok(()), _) => Ok(()),
            (Err(g), Some(log)) if g.may_park() => {
                let tables = format!("{}stream:*, {}", self.cfg.key_prefix, self.top_key());
                super::park(log, "redis", &tables, batch, &g.error.to_string(), g.attempts).await
            }
            (Err(g), _) => Err(g.error),
        }
    }

    /// Deletes the chunk's watermark `<prefix>position:<origin>`.
    async fn forget_origin(&self, origin: &str) -> Result<(), SinkError> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL").arg(self.scoped_progress_key(origin)).query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrongtype_and_script_errors_are_permanent_busy_and_loading_transient() {
        let server =
            |code: &str, detail: &str| classify_redis(&redis::make_extension_error(code.into(), Some(detail.into())));
        assert_eq!(
            server("WRONGTYPE", "Operation against a key holding the wrong kind of value"),
            ErrorClass::Permanent
        );
        assert_eq!(
            server("ERR", "user_script:12: Script attempted to access nonexistent global"),
            ErrorClass::Permanent
        );
        assert_eq!(server("BUSY", "Redis is busy running a script"), ErrorClass::Transient);
        assert_eq!(server("OOM", "command not allowed when used memory > 'maxmemory'"), ErrorClass::Transient);
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify_redis(&io), ErrorClass::Transient);
    }
}
