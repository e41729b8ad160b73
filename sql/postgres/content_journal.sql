-- The content journal (src/enrich/journal.rs): every version of every
-- content row the pipeline applied, with its stream position, so that after
-- any restart the dimension is rebuilt exactly as of the slot's confirmed
-- position and replayed events are enriched as they were the first time.
-- Created by `pgfanout init`, `run` and `snapshot`; not part of any publication.
-- Only when missing: CREATE SCHEMA checks the database's CREATE privilege
-- even with IF NOT EXISTS, which a least-privilege role lacks (its
-- administrator creates the schema for it, owned by it: `pgfanout init
-- --print-sql`).
DO $$
BEGIN
  IF to_regnamespace('pgfanout_state') IS NULL THEN
    CREATE SCHEMA IF NOT EXISTS pgfanout_state;
  END IF;
END $$;

-- One row per slot whose journal has its starting state (the content table
-- at the slot's creation point, or, for a slot older than the journal, as
-- it was when the journal was first seeded).
CREATE TABLE IF NOT EXISTS pgfanout_state.content_journals (
    slot       text PRIMARY KEY,
    seeded_at  timestamptz NOT NULL DEFAULT now(),
    -- true: seeded in the slot's exported snapshot (exact); false: seeded
    -- from the table as it was then, for a slot that already existed.
    exact      boolean NOT NULL
);

-- kind: 'row' (the row as of this position), 'deleted' (the id is gone) or
-- 'truncated' (every row is gone; id is the nil UUID). The seed has
-- position 0/0 #0, below every streamed change.
CREATE TABLE IF NOT EXISTS pgfanout_state.content_versions (
    slot            text    NOT NULL,
    id              uuid    NOT NULL,
    commit_lsn      pg_lsn  NOT NULL,
    ordinal         bigint  NOT NULL,
    kind            text    NOT NULL CHECK (kind IN ('row', 'deleted', 'truncated')),
    slug            text,
    title           text,
    content_type    text,
    length_seconds  integer,
    publish_ts_ms   bigint,
    PRIMARY KEY (slot, id, commit_lsn, ordinal)
);
