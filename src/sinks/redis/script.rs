//! The Redis sink's batch without I/O: its keys, the Lua script that
//! applies a batch atomically with the progress watermark ([`APPLY`]), and
//! the script's arguments ([`script_args`]).
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
//! Re-read rows (backfill) carry a row-version digest: their stream entry is
//! appended only if `<prefix>backfill:seen:<event_id / 128>` does not hold
//! that digest for the row already (kept [`SEEN_TTL_SECS`]), and they never
//! touch the window, which counts each live change once when it streams.

use std::borrow::Cow;
use std::collections::BTreeSet;

use uuid::Uuid;

use crate::config::RedisConfig;
use crate::enrich::{EngagementChange, EngagementRow};
use crate::sinks::change_id;
use crate::source::Op;

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

/// `<prefix>stream:<content type>`: the stream of one content type.
pub(super) fn stream_key(key_prefix: &str, content_type: &str) -> String {
    format!("{key_prefix}stream:{content_type}")
}

/// `<prefix>top:window`: the "most engaged content" of the window.
pub(super) fn top_key(key_prefix: &str) -> String {
    format!("{key_prefix}top:window")
}

/// `<prefix>position:<origin>`: a progress watermark of its own.
pub(super) fn scoped_progress_key(key_prefix: &str, origin: &str) -> String {
    format!("{}:{origin}", progress_key(key_prefix))
}

fn seen_key(key_prefix: &str, event_id: i64) -> String {
    format!("{key_prefix}backfill:seen:{}", event_id.div_euclid(128))
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
pub(super) const APPLY: &str = r#"
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

/// The script's arguments. Event JSON is borrowed, not copied: it is the
/// bulk of the batch and the command serializes it once anyway.
/// `streams`: the stream keys that exist before the batch.
pub(super) fn script_args<'a>(
    cfg: &RedisConfig,
    changes: &[EngagementChange],
    events_json: &'a [String],
    now_ms: i64,
    mut streams: BTreeSet<String>,
) -> Vec<Cow<'a, str>> {
    let window = cfg.top_window_secs as i64;
    let now_bucket = now_ms.div_euclid(1000 * BUCKET_SECS);
    let first_bucket = (now_ms - window * 1000).div_euclid(1000 * BUCKET_SECS);
    let mut args: Vec<Cow<'a, str>> = vec![
        cfg.stream_maxlen.to_string().into(),
        window.to_string().into(),
        BUCKET_SECS.to_string().into(),
        cfg.key_prefix.clone().into(),
        first_bucket.to_string().into(),
        now_bucket.to_string().into(),
    ];
    for (c, json) in changes.iter().zip(events_json) {
        let pos = c.position.sortable_hex();
        if c.op == Op::Truncate {
            args.extend::<[Cow<str>; 6]>([pos.clone().into(), "T".into(), "".into(), "".into(), "".into(), "".into()]);
            for stream in &streams {
                args.extend::<[Cow<str>; 6]>([
                    pos.clone().into(),
                    "X".into(),
                    stream.clone().into(),
                    change_id(c).into(),
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
                seen_key(&cfg.key_prefix, row.event_id).into(),
                row.event_id.rem_euclid(128).to_string().into(),
                format!("{digest:016x}").into(),
                SEEN_TTL_SECS.to_string().into(),
            ]);
        }
        let stream = stream_key(&cfg.key_prefix, content_type);
        streams.insert(stream.clone());
        args.extend::<[Cow<str>; 6]>([
            pos.clone().into(),
            "X".into(),
            stream.into(),
            change_id(c).into(),
            c.op.code().into(),
            Cow::Borrowed(json.as_str()),
        ]);
        if c.replay_digest.is_some() {
            continue;
        }
        // The window: whatever this event counted so far is looked up by
        // its id and retracted; the current row, if it counts, replaces it.
        let Some(event_id) = c.current.as_ref().or(c.previous.as_ref()).map(|r| r.event_id) else { continue };
        let (key, field) = contrib_key(&cfg.key_prefix, event_id);
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

/// `s` with the glob characters SCAN's MATCH knows escaped.
pub(super) fn glob_escape(s: &str) -> String {
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
    use crate::config::Secret;
    use crate::source::Position;
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

    /// 2023-11-14T22:13:20Z: minute bucket 28333333; a 600 s window starts
    /// in bucket 28333323.
    const NOW_MS: i64 = 1_700_000_000_000;

    fn cfg() -> RedisConfig {
        RedisConfig {
            url: Secret::default(),
            key_prefix: "p:".into(),
            stream_maxlen: 1000,
            top_window_secs: 600,
            on_permanent_error: Default::default(),
            permanent_attempts: 3,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }

    fn row(event_id: i64, content: u128, content_type: &str, percent: f64, event_ts: i64) -> EngagementRow {
        EngagementRow {
            event_id,
            content_id: Some(Uuid::from_u128(content)),
            content_type: Some(content_type.into()),
            engagement_percent: Some(percent),
            event_ts,
            ..EngagementRow::default()
        }
    }

    fn change(op: Op, commit_lsn: u64, ordinal: u32, current: Option<EngagementRow>) -> EngagementChange {
        EngagementChange {
            op,
            current,
            previous: None,
            position: Position { commit_lsn, ordinal },
            commit_ts: NOW_MS,
            replay_digest: None,
        }
    }

    /// The ops of `args` after the six header arguments, six strings each.
    fn ops<'a>(args: &'a [Cow<'_, str>]) -> Vec<Vec<&'a str>> {
        args[6..].chunks(6).map(|op| op.iter().map(|a| a.as_ref()).collect()).collect()
    }

    #[test]
    fn a_batch_becomes_stream_window_truncate_and_digest_ops() {
        // 30 s ago: bucket 28333332, whose record expires at
        // (28333332 + 2) * 60 + 600.
        let ts = NOW_MS - 30_000;
        // Under REPLICA IDENTITY DEFAULT an update carries no old row.
        let moved = change(Op::Update, 0x20, 0, Some(row(5, 2, "article", 50.0, ts)));
        let mut deleted = change(Op::Delete, 0x20, 1, None);
        deleted.previous = Some(row(200, 1, "video", 10.0, ts));
        let mut reread = change(Op::Read, 0x40, 0, Some(row(300, 1, "video", 20.0, ts)));
        reread.replay_digest = Some(0xabc);
        let changes = [
            change(Op::Create, 0x10, 1, Some(row(5, 1, "video", 12.34, ts))),
            moved,
            deleted,
            change(Op::Truncate, 0x30, 0, None),
            reread,
        ];
        let json: Vec<String> = (0..changes.len()).map(|i| format!("{{\"n\":{i}}}")).collect();
        let existing = BTreeSet::from(["p:stream:music".to_string()]);
        let args = script_args(&cfg(), &changes, &json, NOW_MS, existing);

        assert_eq!(args[..6], ["1000", "600", "60", "p:", "28333323", "28333333"]);
        let (p1, p2, p3, p4, p5) = (
            "000000000000001000000001",
            "000000000000002000000000",
            "000000000000002000000001",
            "000000000000003000000000",
            "000000000000004000000000",
        );
        let record_insert = "28333332 00000000-0000-0000-0000-000000000001 1234";
        let record_update = "28333332 00000000-0000-0000-0000-000000000002 5000";
        let j: Vec<&str> = json.iter().map(String::as_str).collect();
        let expected: Vec<Vec<&str>> = vec![
            vec![p1, "X", "p:stream:video", "0/10/1", "c", j[0]],
            vec![p1, "W", "p:top:contrib:0", "5", record_insert, "1700000640"],
            // The update moves event 5 to another content and stream; the
            // script retracts its record of the insert by the same key.
            vec![p2, "X", "p:stream:article", "0/20/0", "u", j[1]],
            vec![p2, "W", "p:top:contrib:0", "5", record_update, "1700000640"],
            // Event 200 is field 72 of group 1; a delete only retracts.
            vec![p3, "X", "p:stream:video", "0/20/1", "d", j[2]],
            vec![p3, "W", "p:top:contrib:1", "72", "", ""],
            // Every stream: the one there before and those this batch made.
            vec![p4, "T", "", "", "", ""],
            vec![p4, "X", "p:stream:article", "0/30/0", "t", j[3]],
            vec![p4, "X", "p:stream:music", "0/30/0", "t", j[3]],
            vec![p4, "X", "p:stream:video", "0/30/0", "t", j[3]],
            // A re-read row: its digest guards the entry, and no window op.
            vec![p5, "D", "p:backfill:seen:2", "44", "0000000000000abc", "604800"],
            vec![p5, "X", "p:stream:video", "bf:300:0000000000000abc", "r", j[4]],
        ];
        assert_eq!(ops(&args), expected);
        // The events' JSON is the batch's own text, not a copy.
        assert!(args.iter().filter(|a| a.starts_with("{\"n\"")).all(|a| matches!(a, Cow::Borrowed(_))));
    }

    #[test]
    fn an_event_that_counts_nothing_only_retracts() {
        let old = NOW_MS - 601_000;
        let mut no_percent = row(7, 1, "video", 0.0, NOW_MS);
        no_percent.engagement_percent = None;
        let mut no_content = row(8, 1, "video", 5.0, NOW_MS);
        no_content.content_id = None;
        let changes = [
            change(Op::Create, 0x10, 0, Some(row(6, 1, "video", 5.0, old))),
            change(Op::Create, 0x10, 1, Some(no_percent)),
            change(Op::Update, 0x10, 2, Some(no_content)),
        ];
        let json = vec![String::new(); changes.len()];
        let args = script_args(&cfg(), &changes, &json, NOW_MS, BTreeSet::new());
        let windows: Vec<Vec<&str>> = ops(&args).into_iter().filter(|op| op[1] == "W").collect();
        assert_eq!(
            windows,
            [
                ["000000000000001000000000", "W", "p:top:contrib:0", "6", "", ""],
                ["000000000000001000000001", "W", "p:top:contrib:0", "7", "", ""],
                ["000000000000001000000002", "W", "p:top:contrib:0", "8", "", ""],
            ]
        );
    }
}
