-- Progress of `pgfanout snapshot`, kept in the source database so a snapshot
-- killed at any point resumes at chunk granularity. Created by the snapshot
-- command; not part of any publication.
-- The schema is not named `pgfanout`: a role of that name (the obvious name
-- for pgfanout's role) finds a schema named after it first on the default
-- search_path ("$user", public), so its unqualified CREATE TABLE would land
-- there. Tables an earlier version kept in `pgfanout` move once.
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
ALTER TABLE IF EXISTS pgfanout.snapshots SET SCHEMA pgfanout_state;
ALTER TABLE IF EXISTS pgfanout.snapshot_chunks SET SCHEMA pgfanout_state;
DO $$
BEGIN
  DROP SCHEMA IF EXISTS pgfanout;
EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
  -- Something else lives there, or it belongs to another role: leave it.
  NULL;
END $$;

-- One row per slot whose snapshot was started. consistent_point is NULL
-- while the slot is being created (a crash then leaves a slot nobody read).
CREATE TABLE IF NOT EXISTS pgfanout_state.snapshots (
    slot              text PRIMARY KEY,
    consistent_point  pg_lsn,
    -- Commit time given to snapshot rows (taken before the slot existed).
    snapshot_ts       timestamptz,
    started_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz
);

-- The plan: key ranges (lo, hi] per table, in text form (NULL = unbounded).
-- chunk is unique per slot and fixes the positions of the chunk's rows.
CREATE TABLE IF NOT EXISTS pgfanout_state.snapshot_chunks (
    slot          text    NOT NULL,
    table_name    text    NOT NULL,
    chunk         integer NOT NULL,
    lo            text,
    hi            text,
    rows_planned  bigint  NOT NULL DEFAULT 0,
    done_at       timestamptz,
    PRIMARY KEY (slot, chunk)
);
