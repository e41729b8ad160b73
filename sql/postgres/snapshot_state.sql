-- Progress of `pgfanout snapshot`, kept in the source database so a snapshot
-- killed at any point resumes at chunk granularity. Created by the snapshot
-- command; not part of any publication.
CREATE SCHEMA IF NOT EXISTS pgfanout;

-- One row per slot whose snapshot was started. consistent_point is NULL
-- while the slot is being created (a crash then leaves a slot nobody read).
CREATE TABLE IF NOT EXISTS pgfanout.snapshots (
    slot              text PRIMARY KEY,
    consistent_point  pg_lsn,
    -- Commit time given to snapshot rows (taken before the slot existed).
    snapshot_ts       timestamptz,
    started_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz
);

-- The plan: key ranges (lo, hi] per table, in text form (NULL = unbounded).
-- chunk is unique per slot and fixes the positions of the chunk's rows.
CREATE TABLE IF NOT EXISTS pgfanout.snapshot_chunks (
    slot          text    NOT NULL,
    table_name    text    NOT NULL,
    chunk         integer NOT NULL,
    lo            text,
    hi            text,
    rows_planned  bigint  NOT NULL DEFAULT 0,
    done_at       timestamptz,
    PRIMARY KEY (slot, chunk)
);
