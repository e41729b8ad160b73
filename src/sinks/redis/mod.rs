//! Redis: a stream per content type (time-ordered enriched events, trimmed
//! by approximate MAXLEN) and the "most engaged content" window as
//! per-minute sorted sets that expire by themselves, merged into
//! `<prefix>top:window` after every batch. A batch is one Lua script, so
//! its data and the progress watermark change together: a replayed change
//! (position at or below the watermark) is skipped.
//!
//! The window counts each live event exactly once and retracts exactly
//! what it counted. Per minute bucket, `<prefix>top:bp:<minute>` sums
//! `engagement_percent` in basis points (hundredths of a percent, integers,
//! so additions and retractions cancel exactly) and `<prefix>top:n:<minute>`
//! counts the events behind each member (a member leaves when its last
//! event does, even if the rest sum to 0). `top:window` holds each member's
//! sum divided by 100 once: the double nearest to the exact decimal.
//! Every event that adds to a bucket leaves a *contribution record* (bucket,
//! content id, basis points), and an update or delete of the event
//! subtracts that record, not a recomputation of the old row: the content's
//! length may have changed since, and under REPLICA IDENTITY DEFAULT an
//! update carries no old row at all. Records are found by event id alone;
//! see [`contrib_key`] for how they are kept. A TRUNCATE of the events table
//! drops every bucket (`<prefix>top:buckets` lists them) and makes every
//! record stale at once by bumping `<prefix>top:epoch`, which each record
//! carries (the stale records expire with their buckets, as they would
//! have anyway; the epoch is one small key without TTL, as it must outlive
//! every record); it also appends an entry with op `t` to every stream.
//!
//! The live stream uses `<prefix>position`; a batch of another origin
//! (`Enriched::origin`: a snapshot or backfill chunk, whose positions are
//! not the live stream's) uses `<prefix>position:<origin>`.
//! Re-read rows (backfill) carry a row-version digest: their stream entry is
//! appended only if `<prefix>backfill:seen:<event_id / 128>` does not hold
//! that digest for the row already (kept `SEEN_TTL_SECS`), and they never
//! touch the window, which counts each live change once when it streams.
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

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use uuid::Uuid;

use super::{Probe, SinkError};
use crate::config::RedisConfig;
use crate::enrich::{EngagementChange, EngagementRow, Enriched};
use crate::log::LogProducer;
use crate::retry::{self, ErrorClass, Policy};
use crate::source::{Op, Position};

pub mod tls;

const BUCKET_SECS: i64 = 60;
/// How long Redis remembers which row versions a backfill appended: a
/// re-run within this time appends nothing for unchanged rows.
pub const SEEN_TTL_SECS: u64 = 7 * 24 * 3600;
/// Events per contribution-record hash (see [`contrib_key`]).
const CONTRIB_GROUP: i64 = 128;

/// `<prefix>position`: the position of the last change applied, as
/// [`crate::source::Position::sortable_hex`] writes it (string order is position order,
/// so the Lua script compares them as strings). The key was
/// `<prefix>progress` while it held the old u64 `Position::version()`; the
/// new name keeps a value of the old form from being compared with it.
pub fn progress_key(key_prefix: &str) -> String {
    format!("{key_prefix}position")
}

/// `<prefix>top:contrib:<event_id / 128>`, field `event_id % 128`: the hash
/// holding the window contributions of 128 consecutive event ids, each
/// `"<epoch> <minute> <content_id> <basis points>"`.
///
/// Why hashes grouped by event id rather than one hash per bucket: a record
/// must be found from the event id alone (an update under REPLICA IDENTITY
/// DEFAULT has no old row, so no old `event_ts`, hence no old bucket), and
/// Redis 7.0 has no per-field expiry. Why 128: ids come from a sequence, so
/// a group is written within a short stretch of time and expires soon after
/// (its EXPIREAT is the latest of its records' bucket expiries plus a
/// minute, only ever moved later), which keeps memory at about rate x
/// window; at most 128 records (a record is 50-60 bytes) keep Redis's
/// compact listpack encoding (`hash-max-listpack-entries` 128 and `-value`
/// 64 by default). A record whose bucket has left the window is ignored
/// when its event changes again and replaced or removed then.
fn contrib_key(key_prefix: &str, event_id: i64) -> (String, String) {
    (
        format!("{key_prefix}top:contrib:{}", event_id.div_euclid(CONTRIB_GROUP)),
        event_id.rem_euclid(CONTRIB_GROUP).to_string(),
    )
}

/// `engagement_percent` in basis points. The percent is the double nearest
/// a two-decimal value, so times 100 it is within far less than 0.5 of that
/// value's integer hundredths.
fn basis_points(percent: f64) -> i64 {
    (percent * 100.0).round() as i64
}

/// What an event adds to the window: (minute bucket, content, basis
/// points), or None when it counts nothing (NULL percent, no content, or
/// older than the window).
fn contribution(row: &EngagementRow, now_ms: i64, window_secs: i64) -> Option<(i64, Uuid, i64)> {
    let pct = row.engagement_percent?;
    let content_id = row.content_id?;
    if row.event_ts < now_ms - window_secs * 1000 {
        return None;
    }
    Some((row.event_ts.div_euclid(1000 * BUCKET_SECS), content_id, basis_points(pct)))
}

/// ARGV: stream maxlen, window secs, bucket secs, key prefix, first and
/// last minute bucket of the window, then ops of 6 args: position, kind
/// (X|D|W|T), key, a, b, c. Ops of a position at or below the watermark
/// are skipped.
/// - X (stream key, entry id, op, data): XADD.
/// - D (hash key, field, digest, ttl) skips the ops of its position that
///   follow it when the hash already holds the digest, and records it
///   otherwise.
/// - W (record hash key, field, contribution or "", record expire-at): the
///   event's recorded contribution of the current epoch, if its bucket is
///   still in the window, is subtracted; the new one ("<minute> <content>
///   <basis points>") is added and recorded, or the record removed.
/// - T: TRUNCATE. Every bucket is dropped (with what this batch had summed
///   for them so far) and the epoch bumped, which makes every record older
///   than it stale, including those written earlier in this batch.
///
/// Sums are collected per bucket and member and written once each at the
/// end: a batch touches a few buckets and contents but thousands of events.
/// A bucket key that expired (clock skew) and is touched again gets its
/// EXPIREAT again, in the past, so Redis drops it: never a bucket without TTL.
const APPLY: &str = r#"
local progress = redis.call('GET', KEYS[1]) or ''
local maxlen = ARGV[1]
local window = tonumber(ARGV[2])
local bucket_secs = tonumber(ARGV[3])
local prefix = ARGV[4]
local first = tonumber(ARGV[5])
local last = tonumber(ARGV[6])
local epoch_key = prefix .. 'top:epoch'
local index_key = prefix .. 'top:buckets'
local epoch = redis.call('GET', epoch_key) or '0'
local newest = progress
local seen = nil
local sums, counts, records = {}, {}, {}
local function expire_at(bucket) return (tonumber(bucket) + 1) * bucket_secs + window end
local function count(bucket, member, bp, n)
  local s = sums[bucket]
  if s == nil then
    s = {}
    sums[bucket] = s
    counts[bucket] = {}
  end
  s[member] = (s[member] or 0) + bp
  counts[bucket][member] = (counts[bucket][member] or 0) + n
end
local i = 7
while i <= #ARGV do
  local pos, kind, key, a, b, c = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5]
  if pos > progress and pos ~= seen then
    if kind == 'X' then
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'id', a, 'op', b, 'data', c)
    elseif kind == 'D' then
      if redis.call('HGET', key, a) == b then
        seen = pos
      else
        redis.call('HSET', key, a, b)
        redis.call('EXPIRE', key, c)
      end
    elseif kind == 'W' then
      local old = redis.call('HGET', key, a)
      if old then
        local e, bucket, member, bp = string.match(old, '^(%d+) (%-?%d+) (%S+) (%-?%d+)$')
        if e == epoch and tonumber(bucket) >= first then count(bucket, member, -tonumber(bp), -1) end
      end
      if b == '' then
        if old then redis.call('HDEL', key, a) end
      else
        local bucket, member, bp = string.match(b, '^(%-?%d+) (%S+) (%-?%d+)$')
        count(bucket, member, tonumber(bp), 1)
        redis.call('HSET', key, a, epoch .. ' ' .. b)
        local at = tonumber(c)
        if records[key] == nil or records[key] < at then records[key] = at end
      end
    elseif kind == 'T' then
      sums, counts = {}, {}
      for _, bucket in ipairs(redis.call('ZRANGE', index_key, 0, -1)) do
        redis.call('DEL', prefix .. 'top:bp:' .. bucket, prefix .. 'top:n:' .. bucket)
      end
      redis.call('DEL', index_key)
      epoch = tostring(redis.call('INCR', epoch_key))
    end
    if pos > newest then newest = pos end
  end
  i = i + 6
end
for key, at in pairs(records) do
  redis.call('EXPIREAT', key, at, 'NX')
  redis.call('EXPIREAT', key, at, 'GT')
end
local index_at = nil
for bucket, members in pairs(sums) do
  local zkey = prefix .. 'top:bp:' .. bucket
  local nkey = prefix .. 'top:n:' .. bucket
  local n = counts[bucket]
  for member, bp in pairs(members) do
    if redis.call('HINCRBY', nkey, member, n[member]) > 0 then
      redis.call('ZINCRBY', zkey, string.format('%d', bp), member)
    else
      redis.call('HDEL', nkey, member)
      redis.call('ZREM', zkey, member)
    end
  end
  local at = expire_at(bucket)
  redis.call('EXPIREAT', zkey, at)
  redis.call('EXPIREAT', nkey, at)
  redis.call('ZADD', index_key, bucket, bucket)
  if index_at == nil or index_at < at then index_at = at end
end
if index_at ~= nil then
  redis.call('EXPIREAT', index_key, index_at, 'NX')
  redis.call('EXPIREAT', index_key, index_at, 'GT')
end
redis.call('ZREMRANGEBYSCORE', index_key, '-inf', '(' .. string.format('%d', first))
if newest ~= progress then redis.call('SET', KEYS[1], newest) end
local buckets = {}
for b = first, last do buckets[#buckets + 1] = prefix .. 'top:bp:' .. string.format('%d', b) end
redis.call('ZUNIONSTORE', KEYS[2], #buckets, unpack(buckets))
local total = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local scaled = {}
for j = 1, #total, 2 do
  scaled[#scaled + 1] = string.format('%.17g', tonumber(total[j + 1]) / 100)
  scaled[#scaled + 1] = total[j]
  if #scaled >= 1000 then
    redis.call('ZADD', KEYS[2], unpack(scaled))
    scaled = {}
  end
end
if #scaled > 0 then redis.call('ZADD', KEYS[2], unpack(scaled)) end
redis.call('EXPIRE', KEYS[2], window)
return newest
"#;

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
    /// `dead_letter`: where batches refused for good are parked, as
    /// `on_permanent_error` says; without one a permanent error stalls.
    pub fn new(cfg: &RedisConfig, dead_letter: Option<Arc<LogProducer>>) -> Result<Self, SinkError> {
        let client = tls::client(cfg)?;
        let permanent_attempts = dead_letter.as_ref().and(cfg.on_permanent_error.attempts(cfg.permanent_attempts));
        let policy = Policy { permanent_attempts, ..Policy::sink("redis", None) };
        let conn = tokio::sync::OnceCell::new();
        Ok(RedisSink { client, conn, cfg: cfg.clone(), script: Script::new(APPLY), policy, dead_letter })
    }

    /// The connection, opened on first use; it reconnects by itself after.
    async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        // A batch is one script of thousands of commands, which can take a
        // few hundred ms; the default 500 ms response timeout would abandon
        // (and re-send) big batches whenever Redis is busy.
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let conn = self.conn.get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config));
        Ok(conn.await?.clone())
    }

    pub fn stream_key(&self, content_type: &str) -> String {
        format!("{}stream:{}", self.cfg.key_prefix, content_type)
    }

    pub fn top_key(&self) -> String {
        format!("{}top:window", self.cfg.key_prefix)
    }

    pub fn progress_key(&self) -> String {
        progress_key(&self.cfg.key_prefix)
    }

    /// `<prefix>position:<origin>`: a progress watermark of its own.
    pub fn scoped_progress_key(&self, origin: &str) -> String {
        format!("{}:{origin}", progress_key(&self.cfg.key_prefix))
    }

    fn seen_key(&self, event_id: i64) -> String {
        format!("{}backfill:seen:{}", self.cfg.key_prefix, event_id.div_euclid(128))
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
        let args = self.script_args(&batch.engagements, super::events_json(batch), now_ms, streams);
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
        let pattern = format!("{}stream:*", glob_escape(&self.cfg.key_prefix));
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

    /// The script's arguments. Event JSON is borrowed, not copied: it is the
    /// bulk of the batch and the command serializes it once anyway.
    /// `streams`: the stream keys that exist before the batch.
    fn script_args<'a>(
        &self,
        changes: &[EngagementChange],
        events_json: &'a [String],
        now_ms: i64,
        mut streams: BTreeSet<String>,
    ) -> Vec<Cow<'a, str>> {
        let window = self.cfg.top_window_secs as i64;
        let now_bucket = now_ms.div_euclid(1000 * BUCKET_SECS);
        let first_bucket = (now_ms - window * 1000).div_euclid(1000 * BUCKET_SECS);
        let mut args: Vec<Cow<'a, str>> = vec![
            self.cfg.stream_maxlen.to_string().into(),
            window.to_string().into(),
            BUCKET_SECS.to_string().into(),
            self.cfg.key_prefix.clone().into(),
            first_bucket.to_string().into(),
            now_bucket.to_string().into(),
        ];
        for (c, json) in changes.iter().zip(events_json) {
            let pos = c.position.sortable_hex();
            if c.op == Op::Truncate {
                args.extend::<[Cow<str>; 6]>([
                    pos.clone().into(),
                    "T".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
                for stream in &streams {
                    args.extend::<[Cow<str>; 6]>([
                        pos.clone().into(),
                        "X".into(),
                        stream.clone().into(),
                        super::change_id(c).into(),
                        c.op.code().into(),
                        Cow::Borrowed(json.as_str()),
                    ]);
                }
                continue;
            }
            let content_type =
                c.current.as_ref().or(c.previous.as_ref()).and_then(|r| r.content_type.as_deref()).unwrap_or("unknown");
            if let (Some(digest), Some(row)) = (c.replay_digest, &c.current) {
                args.extend::<[Cow<str>; 6]>([
                    pos.clone().into(),
                    "D".into(),
                    self.seen_key(row.event_id).into(),
                    row.event_id.rem_euclid(128).to_string().into(),
                    format!("{digest:016x}").into(),
                    SEEN_TTL_SECS.to_string().into(),
                ]);
            }
            let stream = self.stream_key(content_type);
            streams.insert(stream.clone());
            args.extend::<[Cow<str>; 6]>([
                pos.clone().into(),
                "X".into(),
                stream.into(),
                super::change_id(c).into(),
                c.op.code().into(),
                Cow::Borrowed(json.as_str()),
            ]);
            if c.replay_digest.is_some() {
                continue;
            }
            // The window: whatever this event counted so far is looked up by
            // its id and retracted; the current row, if it counts, replaces it.
            let Some(event_id) = c.current.as_ref().or(c.previous.as_ref()).map(|r| r.event_id) else { continue };
            let (key, field) = contrib_key(&self.cfg.key_prefix, event_id);
            let (record, expire_at) = match c.current.as_ref().and_then(|r| contribution(r, now_ms, window)) {
                // The record outlives its bucket by a minute, so clock skew
                // between here and Redis cannot drop it before the bucket.
                Some((bucket, content_id, bp)) => {
                    (format!("{bucket} {content_id} {bp}"), ((bucket + 2) * BUCKET_SECS + window).to_string())
                }
                None => (String::new(), String::new()),
            };
            args.extend::<[Cow<str>; 6]>([
                pos.into(),
                "W".into(),
                key.into(),
                field.into(),
                record.into(),
                expire_at.into(),
            ]);
        }
        args
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

/// `s` with the glob characters SCAN's MATCH knows escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
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
    use proptest::prelude::*;

    proptest! {
        /// A percent as enrichment gives it (the double nearest a two-decimal
        /// value) is exactly its hundredths in basis points, so the window's
        /// integer sums cancel exactly on retraction.
        #[test]
        fn basis_points_are_the_exact_hundredths(h in -(1i64 << 40)..(1i64 << 40)) {
            prop_assert_eq!(basis_points(h as f64 / 100.0), h);
            let parsed: f64 = format!("{}.{:02}", h / 100, (h % 100).abs()).parse().unwrap();
            if h >= 0 {
                prop_assert_eq!(basis_points(parsed), h);
            }
        }
    }

    #[test]
    fn glob_characters_of_the_prefix_are_escaped() {
        assert_eq!(glob_escape("app:*?[x]\\:"), "app:\\*\\?\\[x\\]\\\\:");
        assert_eq!(glob_escape("pgfanout:"), "pgfanout:");
    }
}
