//! Redis: a stream per content type (time-ordered enriched events, trimmed
//! by approximate MAXLEN) and the "most engaged content" window as
//! per-minute sorted sets that expire by themselves, merged into
//! `<prefix>top:window` after every batch. A batch is one Lua script, so
//! its data and the progress watermark change together: a replayed change
//! (position at or below the watermark) is skipped.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use super::{EventJson, SinkError};
use crate::config::RedisConfig;
use crate::enrich::{EngagementChange, EngagementRow, Enriched};
use crate::retry::Backoff;

const BUCKET_SECS: i64 = 60;

/// ARGV: now_ms, stream maxlen, window ttl secs, union key count N, N bucket
/// keys, then ops of 6 args: position, kind (X|Z), key, a, b, c.
const APPLY: &str = r#"
local progress = redis.call('GET', KEYS[1]) or ''
local maxlen = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local i = 5 + n
local newest = progress
while i <= #ARGV do
  local pos, kind, key, a, b, c = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5]
  if pos > progress then
    if kind == 'X' then
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'id', a, 'op', b, 'data', c)
    else
      redis.call('ZINCRBY', key, a, b)
      redis.call('EXPIREAT', key, c)
    end
    if pos > newest then newest = pos end
  end
  i = i + 6
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
        let conn = ConnectionManager::new(client).await?;
        Ok(RedisSink { conn, cfg: cfg.clone(), script: Script::new(APPLY) })
    }

    pub fn stream_key(&self, content_type: &str) -> String {
        format!("{}stream:{}", self.cfg.key_prefix, content_type)
    }

    pub fn top_key(&self) -> String {
        format!("{}top:window", self.cfg.key_prefix)
    }

    pub fn progress_key(&self) -> String {
        format!("{}progress", self.cfg.key_prefix)
    }

    fn bucket_key(&self, bucket: i64) -> String {
        format!("{}top:{}", self.cfg.key_prefix, bucket)
    }

    /// Applies a batch, retrying (with backoff) until Redis takes it.
    pub async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        if batch.engagements.is_empty() {
            return Ok(());
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let args = self.script_args(&batch.engagements, now_ms);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut inv = self.script.prepare_invoke();
            inv.key(self.progress_key()).key(self.top_key());
            for a in &args {
                inv.arg(a);
            }
            let mut conn = self.conn.clone();
            match inv.invoke_async::<String>(&mut conn).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(sink = "redis", error = %e, attempt = backoff.attempts(), "write failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn script_args(&self, changes: &[EngagementChange], now_ms: i64) -> Vec<String> {
        let window = self.cfg.top_window_secs as i64;
        let now_bucket = now_ms.div_euclid(1000 * BUCKET_SECS);
        let first_bucket = (now_ms - window * 1000).div_euclid(1000 * BUCKET_SECS);
        let mut args = vec![now_ms.to_string(), self.cfg.stream_maxlen.to_string(), window.to_string()];
        let buckets: Vec<String> = (first_bucket..=now_bucket).map(|b| self.bucket_key(b)).collect();
        args.push(buckets.len().to_string());
        args.extend(buckets);
        for c in changes {
            // Zero-padded so Lua's string comparison orders positions.
            let pos = format!("{:020}", c.position.version());
            let json = serde_json::to_string(&EventJson::new(c)).unwrap_or_default();
            let content_type =
                c.current.as_ref().or(c.previous.as_ref()).and_then(|r| r.content_type.as_deref()).unwrap_or("unknown");
            let op = serde_json::to_value(c.op).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            args.extend([
                pos.clone(),
                "X".into(),
                self.stream_key(content_type),
                super::event_id(&c.position),
                op,
                json,
            ]);
            // The window score: retract what the previous row counted, add the current row.
            let mut score = |row: &EngagementRow, sign: f64| {
                let Some(pct) = row.engagement_percent else { return };
                let Some(content_id) = row.content_id else { return };
                if row.event_ts < now_ms - window * 1000 {
                    return;
                }
                let bucket = row.event_ts.div_euclid(1000 * BUCKET_SECS);
                let expire_at = (bucket + 1) * BUCKET_SECS + window;
                args.extend([
                    pos.clone(),
                    "Z".into(),
                    self.bucket_key(bucket),
                    (sign * pct).to_string(),
                    content_id.to_string(),
                    expire_at.to_string(),
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
