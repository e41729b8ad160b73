//! `pgfanout snapshot`: the initial load. Every published table is read as
//! of the replication slot's creation point and delivered through the same
//! `Delivery` as the live stream; `pgfanout run` then streams from exactly
//! that point, with no gap and no overlap.
//!
//! How. The slot is created on a replication connection with
//! `CREATE_REPLICATION_SLOT … LOGICAL pgoutput EXPORT_SNAPSHOT`, which returns
//! the consistent point `cp` and the name of a snapshot that sees exactly the
//! transactions committed before `cp`: the slot streams every commit from `cp`
//! on, the snapshot holds everything before. That connection stays open
//! until every worker has run `SET TRANSACTION SNAPSHOT` in its REPEATABLE
//! READ transaction (an exported snapshot lives only as long as its session
//! is idle). The tables are cut into key-range chunks, which `workers`
//! parallel workers read with binary COPY (see `scan`).
//!
//! Positions (see `scan` for the arithmetic). A snapshot row of chunk `s`
//! gets `commit_lsn = cp - 1 - s` and an ordinal from its key, which makes
//! it (a) unique per row, so HTTP event ids and Redis stream entries, which
//! derive from positions, are distinct; (b) lower than every streamed change
//! (those commit at or after `cp`; a commit record may start exactly at `cp`,
//! hence the `- 1`), so ClickHouse's ReplacingMergeTree keeps any later
//! streamed version of a row, whichever arrives first; (c) increasing along
//! a chunk, so a Redis progress watermark per chunk works. Redis writes of
//! chunk batches use the scope `<prefix>position:snapshot:<table>:<chunk>`
//! instead of the live `<prefix>position` (positions below `cp` would be
//! skipped by, or would drag, the live watermark): a chunk replayed after a
//! crash skips exactly what it already applied and no other chunk is
//! affected. The key is deleted once its chunk is recorded as done.
//!
//! Progress and resume. The plan and each chunk's completion are kept in
//! `pgfanout_state.snapshots` and `pgfanout_state.snapshot_chunks` in the source
//! database (sql/postgres/snapshot_state.sql); a chunk counts as done only
//! after every sink flushed all of it. After a crash (even SIGKILL) the
//! exported snapshot is gone, so the chunks not done are read under a new
//! snapshot taken at some later time `t`, with the positions of the
//! original plan (still below `cp`). That is still exact for the sinks that
//! hold state: the slot has kept every change since `cp` and streams it
//! later with higher versions, so for each row either nothing changed after
//! `cp` (then the row read at `t` is the row at `cp`), or its last change is
//! streamed and wins in ClickHouse over what was read at `t`; a row deleted
//! after `cp` is not read at `t`, and its delete is streamed too, which also
//! hides a copy an earlier attempt delivered; a row inserted after `cp` is
//! streamed (integer-key chunks end at the largest key at `cp`). Event sinks
//! see what a resume changes: a row of a re-read chunk changed between `cp`
//! and `t` has a snapshot event carrying its state at `t`, followed by the
//! streamed events of those changes, so the 10-minute Redis window may count
//! such a change twice until its minute expires, and a row deleted in that
//! interval has no snapshot event (where the crashed attempt had already
//! delivered it to some sinks and not to others, those keep differing by
//! that one event; its streamed delete reaches all of them). Single-column
//! integer keys give the same row the same position on every attempt, so the
//! Redis watermark of a half-done chunk skips exactly the rows that attempt
//! applied; other keys (a composite key led by an integer too) rank rows,
//! which a concurrent insert or delete in the chunk's range can shift.
//!
//! `pgfanout run` may start before the snapshot is done: sinks keep the
//! highest version whatever the arrival order, with one exception, a
//! TRUNCATE streamed while chunks are still being delivered (ClickHouse
//! empties the table, later chunks bring rows back); start `run` after the
//! snapshot when truncates are possible.
//!
//! A slot that already exists but was not created by a snapshot (`init` or
//! `run` made it) has no exported snapshot to offer: the command refuses it
//! unless `--recreate-slot` lets it drop the (inactive) slot and start over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use super::scan::{self, ScanJob, ScanRunError};
use crate::config::Config;
use crate::enrich::journal;
use crate::observe::Stats;
use crate::pipeline::DeliverOptions;
use crate::source::scan::{query_err, Chunk, ScanError, ScanPoint, ScanTable};
use crate::source::slot;
use crate::source::snapshot::{create_slot_exporting, plan, published_tables, ExportError};
use crate::source::{Lsn, TableName};

pub const STATE_SCHEMA: &str = include_str!("../../sql/postgres/snapshot_state.sql");

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Parallel workers, each with its own connection and its own `Delivery`.
    pub workers: usize,
    /// Rows per chunk (the unit of parallelism, progress and resume).
    pub chunk_rows: u64,
    /// Publish to the log only (no enrichment, no sinks).
    pub log_only: bool,
    /// Drop an existing slot that no snapshot created, and create it again.
    pub recreate_slot: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions { workers: 2, chunk_rows: 20_000, log_only: false, recreate_slot: false }
    }
}

/// What a snapshot run did.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotOutcome {
    Loaded {
        rows: u64,
        chunks: usize,
        resumed: bool,
        seconds: f64,
    },
    /// The slot's snapshot had completed before; nothing was read.
    AlreadyComplete,
}
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Load(#[from] ScanRunError),
    #[error(transparent)]
    Journal(#[from] Box<crate::enrich::journal::JournalError>),
    #[error("replication slot {slot} exists but no snapshot created it (`pgfanout init` or `run` did), so its starting point has no snapshot to match; stop `pgfanout run` and pass --recreate-slot to drop and recreate it (changes not yet streamed from it become part of the snapshot)")]
    SlotExists { slot: String },
    #[error("replication slot {slot} is in use by PID {pid}; stop the process reading it (`pgfanout run`) first")]
    SlotBusy { slot: String, pid: i32 },
    #[error("another `pgfanout snapshot` is running for slot {slot}")]
    AlreadyRunning { slot: String },
    #[error(transparent)]
    Privilege(#[from] crate::source::privilege::MissingPrivilege),
}
struct Record {
    consistent_point: Option<u64>,
    snapshot_ts_us: Option<i64>,
    completed: bool,
}

async fn record(state: &Client, slot_name: &str) -> Result<Option<Record>, ScanError> {
    let row = state
        .query_opt(
            "SELECT consistent_point::text, (extract(epoch FROM snapshot_ts) * 1000000)::int8, completed_at IS NOT NULL \
             FROM pgfanout_state.snapshots WHERE slot = $1",
            &[&slot_name],
        )
        .await
        .map_err(query_err("read the snapshot state"))?;
    Ok(row.map(|r| Record {
        consistent_point: r.get::<_, Option<String>>(0).and_then(|s| Lsn::parse(&s).ok()).map(|l| l.0),
        snapshot_ts_us: r.get(1),
        completed: r.get(2),
    }))
}

async fn forget(state: &Client, slot_name: &str) -> Result<(), ScanError> {
    state
        .execute("DELETE FROM pgfanout_state.snapshot_chunks WHERE slot = $1", &[&slot_name])
        .await
        .map_err(query_err("clear the snapshot state"))?;
    state
        .execute("DELETE FROM pgfanout_state.snapshots WHERE slot = $1", &[&slot_name])
        .await
        .map_err(query_err("clear the snapshot state"))?;
    Ok(())
}

async fn drop_slot(state: &Client, slot_name: &str) -> Result<(), SnapshotError> {
    if let Some(s) = slot::state(state, slot_name).await? {
        if let Some(pid) = s.active_pid {
            return Err(SnapshotError::SlotBusy { slot: slot_name.to_string(), pid });
        }
        state
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
            .await
            .map_err(query_err("drop the replication slot"))
            .map_err(SnapshotError::Scan)?;
        tracing::warn!(slot = %slot_name, "dropped the replication slot to create it again with a snapshot");
    }
    Ok(())
}

/// The origin (`Enriched::origin`) of a snapshot chunk's batches.
pub fn chunk_origin(chunk: &Chunk) -> String {
    format!("snapshot:{}:{}", chunk.table, chunk.seq)
}

/// Runs (or resumes) the snapshot of the configured slot.
pub async fn run(cfg: &Config, opts: &SnapshotOptions) -> Result<SnapshotOutcome, SnapshotError> {
    load(cfg, opts).await.map_err(|e| crate::source::privilege::explain(e, &cfg.source))
}

async fn load(cfg: &Config, opts: &SnapshotOptions) -> Result<SnapshotOutcome, SnapshotError> {
    let started = Instant::now();
    let url = cfg.source.url.expose();
    let slot_name = cfg.source.slot.as_str();
    let state = slot::connect(url).await?;
    slot::ensure_publication(&state, &cfg.source).await?;
    // IF NOT EXISTS notices are noise in the command's output.
    state
        .batch_execute(&format!("SET client_min_messages TO warning;\n{STATE_SCHEMA}"))
        .await
        .map_err(query_err("create the pgfanout snapshot state tables"))?;
    let locked: bool = state
        .query_one("SELECT pg_try_advisory_lock(hashtextextended('pgfanout.snapshot:' || $1, 0))", &[&slot_name])
        .await
        .map_err(query_err("take the snapshot lock"))?
        .get(0);
    if !locked {
        return Err(SnapshotError::AlreadyRunning { slot: slot_name.to_string() });
    }
    let database: String =
        state.query_one("SELECT current_database()", &[]).await.map_err(query_err("current_database"))?.get(0);
    let existing = slot::state(&state, slot_name).await?;
    let rec = record(&state, slot_name).await?;

    let resume = match (&rec, &existing) {
        (Some(r), Some(_)) if r.completed => {
            tracing::info!(slot = %slot_name, "the snapshot of this slot completed earlier; nothing to do (`pgfanout run` streams from it)");
            return Ok(SnapshotOutcome::AlreadyComplete);
        }
        (Some(Record { consistent_point: Some(cp), snapshot_ts_us: Some(ts), .. }), Some(_)) => Some((*cp, *ts)),
        // Our own slot creation (or saving its plan) was interrupted:
        // nobody has read the slot yet.
        (Some(_), Some(_)) => {
            drop_slot(&state, slot_name).await?;
            None
        }
        (None, Some(_)) if opts.recreate_slot => {
            drop_slot(&state, slot_name).await?;
            None
        }
        (None, Some(_)) => return Err(SnapshotError::SlotExists { slot: slot_name.to_string() }),
        (Some(_), None) => {
            tracing::warn!(slot = %slot_name, "the slot of an earlier snapshot is gone; starting a new snapshot");
            None
        }
        (None, None) => None,
    };

    let (job_parts, exported, resumed) = match resume {
        Some((cp, ts)) => {
            let pending = state
                .query(
                    "SELECT table_name, chunk, lo, hi, rows_planned FROM pgfanout_state.snapshot_chunks \
                     WHERE slot = $1 AND done_at IS NULL ORDER BY chunk",
                    &[&slot_name],
                )
                .await
                .map_err(query_err("read the snapshot plan"))?;
            let total: i64 = state
                .query_one("SELECT count(*) FROM pgfanout_state.snapshot_chunks WHERE slot = $1", &[&slot_name])
                .await
                .map_err(query_err("read the snapshot plan"))?
                .get(0);
            tracing::info!(slot = %slot_name, consistent_point = %Lsn(cp).to_pg_string(), done = total - pending.len() as i64, total, "resuming the snapshot: the chunks not done are read under a new snapshot (see `pgfanout::source::snapshot` for why that is exact)");
            let published = published_tables(&state, &cfg.source.publication).await?;
            let by_text: HashMap<String, TableName> = published.iter().map(|t| (t.to_string(), t.clone())).collect();
            let mut shapes = HashMap::new();
            let mut chunks = Vec::new();
            for r in &pending {
                let text: String = r.get(0);
                let table = by_text.get(&text).cloned().ok_or(ScanError::NoSuchTable(text))?;
                if !shapes.contains_key(&table) {
                    shapes.insert(table.clone(), Arc::new(ScanTable::load(&state, &table).await?));
                }
                chunks.push(Chunk {
                    seq: r.get::<_, i32>(1) as u32,
                    table,
                    lo: r.get(2),
                    hi: r.get(3),
                    rows: r.get::<_, i64>(4) as u64,
                });
            }
            ((shapes, chunks, ScanPoint { consistent_point: cp, commit_ts_us: ts }), None, true)
        }
        None => {
            forget(&state, slot_name).await?;
            state
                .execute("INSERT INTO pgfanout_state.snapshots (slot) VALUES ($1)", &[&slot_name])
                .await
                .map_err(query_err("record the snapshot"))?;
            let ts: i64 = state
                .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
                .await
                .map_err(query_err("read the clock"))?
                .get(0);
            let exported = create_slot_exporting(&cfg.source, slot_name, false).await?;
            let cp = exported.consistent_point;
            // `run` enriches what it streams from `cp` with the content as
            // of `cp`: seed its journal in the same snapshot, before the plan
            // is saved (a crash before that drops the slot and starts over).
            journal::ensure_schema(&state, slot_name).await.map_err(Box::new)?;
            journal::seed(&state, slot_name, Some(&exported.name)).await.map_err(Box::new)?;
            tracing::info!(slot = %slot_name, consistent_point = %Lsn(cp).to_pg_string(), snapshot = %exported.name, "created the replication slot with an exported snapshot");
            let tables = published_tables(&state, &cfg.source.publication).await?;
            let (shapes, chunks) = plan(url, &exported.name, &tables, &HashMap::new(), opts.chunk_rows).await?;
            save_plan(&state, slot_name, cp, ts, &chunks).await?;
            ((shapes, chunks, ScanPoint { consistent_point: cp, commit_ts_us: ts }), Some(exported), false)
        }
    };
    let (tables, chunks, point) = job_parts;
    let chunk_count = chunks.len();
    let snapshot_name = exported.as_ref().map(|e| e.name.clone());
    let log_only = opts.log_only;
    let job = ScanJob {
        cfg: cfg.clone(),
        database,
        tables,
        filters: HashMap::new(),
        chunks,
        point,
        snapshot: snapshot_name,
        workers: opts.workers,
        options: Box::new(move |c| DeliverOptions { origin: Some(chunk_origin(c)), log_only, replay: false }),
        stats: Arc::new(Stats::default()),
    };
    let state = &state;
    let mark = |c: Chunk| async move {
        state
            .execute(
                "UPDATE pgfanout_state.snapshot_chunks SET done_at = now() WHERE slot = $1 AND chunk = $2",
                &[&slot_name, &(c.seq as i32)],
            )
            .await
            .map_err(query_err("record a finished chunk"))?;
        Ok(())
    };
    let keep = exported.map(|e| Box::new(e.session) as Box<dyn std::any::Any + Send>);
    let rows = scan::load(job, keep, "snapshot", log_only, mark).await?;
    state
        .execute("UPDATE pgfanout_state.snapshots SET completed_at = now() WHERE slot = $1", &[&slot_name])
        .await
        .map_err(query_err("record the snapshot as complete"))?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(slot = %slot_name, rows, chunks = chunk_count, seconds, rows_per_sec = rows as f64 / seconds.max(1e-3), "snapshot complete; `pgfanout run` streams from its consistent point");
    Ok(SnapshotOutcome::Loaded { rows, chunks: chunk_count, resumed, seconds })
}

async fn save_plan(state: &Client, slot_name: &str, cp: u64, ts_us: i64, chunks: &[Chunk]) -> Result<(), ScanError> {
    let tables: Vec<String> = chunks.iter().map(|c| c.table.to_string()).collect();
    let seqs: Vec<i32> = chunks.iter().map(|c| c.seq as i32).collect();
    let los: Vec<Option<String>> = chunks.iter().map(|c| c.lo.clone()).collect();
    let his: Vec<Option<String>> = chunks.iter().map(|c| c.hi.clone()).collect();
    let rows: Vec<i64> = chunks.iter().map(|c| c.rows as i64).collect();
    let saved = async {
        state
            .execute(
                "UPDATE pgfanout_state.snapshots SET consistent_point = $2::text::pg_lsn, snapshot_ts = to_timestamp($3::float8 / 1e6) \
                 WHERE slot = $1",
                &[&slot_name, &Lsn(cp).to_pg_string(), &(ts_us as f64)],
            )
            .await?;
        state
            .execute(
                "INSERT INTO pgfanout_state.snapshot_chunks (slot, table_name, chunk, lo, hi, rows_planned) \
                 SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::text[], $5::text[], $6::int8[])",
                &[&slot_name, &tables, &seqs, &los, &his, &rows],
            )
            .await?;
        Ok(())
    };
    slot::transaction(state, "BEGIN", saved).await.map_err(query_err("save the snapshot plan"))?;
    Ok(())
}
