-- The ClickHouse schema (SPEC.md), run by `pgfanout init` inside the
-- configured database (default `app`). Statements end with ";" on its own
-- line end; table names are unqualified on purpose.
--
-- Engines: both tables are ReplacingMergeTree with a version from the
-- change's position in the replication stream and an _is_deleted flag.
-- _version is UInt128: commit LSN << 32 | ordinal (Position::version), exact
-- for the whole 64-bit LSN range and every ordinal. Tables of the earlier
-- form (UInt64 _version = lsn << 20 | ordinal, content_dim's version_ts_ms)
-- are migrated by `pgfanout init` (src/init.rs). Delivery is at-least-once; a replayed row has the same
-- sort key and version as the one already stored and collapses into it, and
-- a delete writes a row with _is_deleted = 1 that hides the event. Read with
-- FINAL, or with `SETTINGS final = 1` (a user profile setting makes the
-- analysts' query unchanged), so a row delivered twice counts once.
--
-- Nullable: engagement_percent, engagement_seconds, duration_ms and
-- length_seconds are Nullable because NULL means "unknown" and must not
-- become 0: avg(engagement_percent) skips NULLs, a 0 would drag it down.
-- content_id is in the sort key, which cannot be Nullable: an event without
-- content_id stores the nil UUID. An event whose content is unknown is kept
-- with empty slug/title/content_type ('' = no content row, per SPEC).

CREATE TABLE IF NOT EXISTS content_dim (
  id              UUID,
  slug            String,
  title           String,
  content_type    LowCardinality(Nullable(String)),
  length_seconds  Nullable(Int32),
  publish_ts      DateTime64(3),
  _version        UInt128,
  _is_deleted     UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
ORDER BY id;

CREATE TABLE IF NOT EXISTS enriched_engagements (
  event_id        UInt64,
  content_id      UUID,
  user_id         Nullable(UUID),
  event_type      LowCardinality(Nullable(String)),
  event_ts        DateTime64(3),
  duration_ms     Nullable(Int32),
  device          Nullable(String),
  engagement_seconds Nullable(Float64),
  engagement_percent Nullable(Float64),
  content_slug    String,
  content_title   String,
  content_type    LowCardinality(String),
  length_seconds  Nullable(Int32),
  publish_ts      Nullable(DateTime64(3)),
  loaded_at       DateTime DEFAULT now(),
  _version        UInt128,
  _is_deleted     UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
PARTITION BY toDate(event_ts)
ORDER BY (event_ts, content_id, event_id);
