-- Progress of the webhook sink on the live stream, kept in the source
-- database next to the slot it belongs to, so a replay after a crash (or on
-- a new machine) re-sends exactly the batches that were posted before; see
-- src/sinks/http.rs. Created by `pgfanout run` when missing; not part of any
-- publication. Positions are `<commit LSN><ordinal>` in fixed-width hex (16
-- and 8 digits), so text order is stream order.
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

-- One row per slot. Written before each batch is posted: the batch before
-- it was delivered (or parked as a dead letter), this one may or may not
-- have arrived.
CREATE TABLE IF NOT EXISTS pgfanout_state.http_progress (
    slot            text PRIMARY KEY,
    -- Bumped by each `pgfanout run` when it starts; its writes carry it, so
    -- a write of a killed predecessor that PostgreSQL executes late cannot
    -- overwrite the record of the run after it.
    generation      bigint      NOT NULL DEFAULT 1,
    -- Every event at or below this position was delivered.
    posted_through  text,
    -- The batch in flight: its first and last event and its Idempotency-Key
    -- (NULL until a run posted one).
    inflight_first  text,
    inflight_last   text,
    inflight_key    text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
