//! Redis: a stream per content type (time-ordered enriched events, trimmed
//! by approximate MAXLEN) and the "most engaged content" window as
//! per-minute sorted sets that expire by themselves, merged into
//! `<prefix>top:window` after every batch. A batch is one Lua script, so
//! its data and the progress watermark change together: a replayed change
//! (position at or below the watermark) is skipped.
//!
//! The live stream uses `<prefix>position`; a caller may name its own scope
//! (`<prefix>position:<scope>`, see `DeliverOptions::progress_scope`) for
//! positions that are not the live stream's (snapshot and backfill chunks).
//! Re-read rows (backfill) carry a row-version digest: their stream entry is
//! appended only if `<prefix>backfill:seen:<event_id / 128>` does not hold
//! that digest for the row already (kept `SEEN_TTL_SECS`), and they never
//! touch the window, which counts each live change once when it streams.

use std::borrow::Cow;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use super::SinkError;
use crate::config::RedisConfig;
use crate::enrich::{EngagementChange, EngagementRow, Enriched};
use crate::retry::Backoff;

const BUCKET_SECS: i64 = 60;
/// How long Redis remembers which row versions a backfill appended: a
/// re-run within this time appends nothing for unchanged rows.
pub const SEEN_TTL_SECS: u64 = 7 * 24 * 3600;

/// `<prefix>position`: the position of the last change applied, as
/// [`crate::source::Position::sortable_hex`] writes it (string order is position order,
/// so the Lua script compares them as strings). The key was
/// `<prefix>progress` while it held the old u64 `Position::version()`; the
/// new name keeps a value of the old form from being compared with it.
pub fn progress_key(key_prefix: &str) -> String {
    format!("{key_prefix}position")
}

/// ARGV: now_ms, stream maxlen, window ttl secs, union key count N, N bucket
/// keys, then ops of 6 args: position, kind (X|Z|D), key, a, b, c. A D op
/// (hash key, field, digest, ttl) skips the ops of its position that follow
/// it when the hash already holds the digest, and records it otherwise.
/// Z ops (bucket key, increment, member, expire-at) of the positions not yet
/// applied are summed per bucket and member and written once each at the
/// end: a batch touches a few buckets and contents but thousands of events.
const APPLY: &str = r#"
local progress = redis.call('GET', KEYS[1]) or ''
local maxlen = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local i = 5 + n
local newest = progress
local seen = nil
local scores = {}
local expire = {}
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
    else
      local members = scores[key]
      if members == nil then
        members = {}
        scores[key] = members
        expire[key] = c
      end
      members[b] = (members[b] or 0) + tonumber(a)
    end
    if pos > newest then newest = pos end
  end
  i = i + 6
end
for key, members in pairs(scores) do
  for member, delta in pairs(members) do
    redis.call('ZINCRBY', key, string.format('%.17g', delta), member)
  end
  redis.call('EXPIREAT', key, expire[key])
end
if newest ~= progress then redis.call('SET', KEYS[1], newest) end
if n > 0 then
  local buckets = {}
  for j = 1, n do buckets[j] = ARGV[4 + j] end
  redis.call('ZUNIONSTORE', KEYS[2], n, unpack(buckets))
  redis.call('EXPIRE', KEYS[2], ttl)
end
return newest
"#;

pub struct RedisSink {
    conn: ConnectionManager,
    cfg: RedisConfig,
    script: Script,
}

impl RedisSink {
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, SinkError> {
        let client = redis::Client::open(cfg.url.expose())?;
        // A batch is one script of thousands of commands, which can take a
        // few hundred ms; the default 500 ms response timeout would abandon
        // (and re-send) big batches whenever Redis is busy.
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisSink { conn, cfg: cfg.clone(), script: Script::new(APPLY) })
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

    fn bucket_key(&self, bucket: i64) -> String {
        format!("{}top:{}", self.cfg.key_prefix, bucket)
    }

    /// `<prefix>position:<scope>`: a progress watermark of its own.
    pub fn scoped_progress_key(&self, scope: &str) -> String {
        format!("{}:{scope}", progress_key(&self.cfg.key_prefix))
    }

    /// Forgets a scope's watermark (its chunk is done for good).
    pub async fn forget_progress(&self, scope: &str) -> Result<(), SinkError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(self.scoped_progress_key(scope)).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    fn seen_key(&self, event_id: i64) -> String {
        format!("{}backfill:seen:{}", self.cfg.key_prefix, event_id.div_euclid(128))
    }

    /// Applies a batch, retrying (with backoff) until Redis takes it.
    pub async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        self.write_scoped(batch, None).await
    }

    /// `write` with the progress watermark of `scope` (None: the live one).
    pub async fn write_scoped(&self, batch: &Enriched, scope: Option<&str>) -> Result<(), SinkError> {
        if batch.engagements.is_empty() {
            return Ok(());
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let args = self.script_args(&batch.engagements, super::events_json(batch), now_ms);
        let progress = scope.map_or_else(|| self.progress_key(), |s| self.scoped_progress_key(s));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut inv = self.script.prepare_invoke();
            inv.key(&progress).key(self.top_key());
            for a in &args {
                inv.arg(a);
            }
            let mut conn = self.conn.clone();
            match inv.invoke_async::<String>(&mut conn).await {
                Ok(_) => {
                    crate::observe::sink_flushed("redis", backoff.attempts());
                    return Ok(());
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(sink = "redis", error = %e, attempt = backoff.attempts(), "write failed; retrying");
                    crate::observe::sink_failed("redis", backoff.attempts(), &e, true);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The script's arguments. Event JSON is borrowed, not copied: it is the
    /// bulk of the batch and the command serializes it once anyway.
    fn script_args<'a>(
        &self,
        changes: &[EngagementChange],
        events_json: &'a [String],
        now_ms: i64,
    ) -> Vec<Cow<'a, str>> {
        let window = self.cfg.top_window_secs as i64;
        let now_bucket = now_ms.div_euclid(1000 * BUCKET_SECS);
        let first_bucket = (now_ms - window * 1000).div_euclid(1000 * BUCKET_SECS);
        let mut args: Vec<Cow<'a, str>> =
            vec![now_ms.to_string().into(), self.cfg.stream_maxlen.to_string().into(), window.to_string().into()];
        let buckets: Vec<String> = (first_bucket..=now_bucket).map(|b| self.bucket_key(b)).collect();
        args.push(buckets.len().to_string().into());
        args.extend(buckets.into_iter().map(Cow::Owned));
        for (c, json) in changes.iter().zip(events_json) {
            let pos = c.position.sortable_hex();
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
            args.extend::<[Cow<str>; 6]>([
                pos.clone().into(),
                "X".into(),
                self.stream_key(content_type).into(),
                super::change_id(c).into(),
                c.op.code().into(),
                Cow::Borrowed(json.as_str()),
            ]);
            if c.replay_digest.is_some() {
                continue;
            }
            // The window score: retract what the previous row counted, add the current row.
            let mut score = |row: &EngagementRow, sign: f64| {
                let Some(pct) = row.engagement_percent else { return };
                let Some(content_id) = row.content_id else { return };
                if row.event_ts < now_ms - window * 1000 {
                    return;
                }
                let bucket = row.event_ts.div_euclid(1000 * BUCKET_SECS);
                let expire_at = (bucket + 1) * BUCKET_SECS + window;
                args.extend::<[Cow<str>; 6]>([
                    pos.clone().into(),
                    "Z".into(),
                    self.bucket_key(bucket).into(),
                    (sign * pct).to_string().into(),
                    content_id.to_string().into(),
                    expire_at.to_string().into(),
                ]);
            };
            if let Some(prev) = &c.previous {
                score(prev, -1.0);
            }
            if let Some(cur) = &c.current {
                score(cur, 1.0);
            }
        }
        args
    }
}
