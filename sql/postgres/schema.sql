-- The source schema (SPEC.md). Applied idempotently by `pgfanout init`.
CREATE TABLE IF NOT EXISTS content (
    id              UUID PRIMARY KEY,
    slug            TEXT UNIQUE NOT NULL,
    title           TEXT        NOT NULL,
    content_type    TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds  INTEGER,
    publish_ts      TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS engagement_events (
    id           BIGSERIAL PRIMARY KEY,
    content_id   UUID REFERENCES content(id),
    user_id      UUID,
    event_type   TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts     TIMESTAMPTZ NOT NULL,
    duration_ms  INTEGER,      -- nullable: events without a duration
    device       TEXT,         -- e.g. "ios", "web-safari"
    raw_payload  JSONB         -- anything extra the client sent
);

-- Updates and deletes must carry the whole old row: ClickHouse's sort key
-- (event_ts, content_id, event_id) needs the old event_ts and content_id to
-- retract a row, and Redis's window must subtract what the old row counted.
-- With the default identity a delete carries only the id.
-- Content rows are small; FULL also means an update that leaves a TOASTed
-- title untouched still carries its value.
-- A partitioned table (created before `init`, e.g. engagement_events by
-- month) gets it on every partition too: PostgreSQL does not pass it down,
-- and the server logs a row's old version with its partition's identity.
DO $$
DECLARE
  t regclass;
BEGIN
  FOR t IN
    SELECT r FROM unnest(ARRAY['engagement_events', 'content']::regclass[]) AS r
    UNION
    SELECT p.relid FROM unnest(ARRAY['engagement_events', 'content']::regclass[]) AS r, pg_partition_tree(r) AS p
  LOOP
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', t);
  END LOOP;
END $$;
