//! `pgfanout backfill`: re-reads a time range of one published table from
//! PostgreSQL and re-delivers it through the same `Delivery` as the live
//! stream, to the log and every sink, while a sidecar keeps streaming.
//! Like Debezium's incremental snapshots and DBLog's watermarks, the read
//! is placed at a known point of the change stream so that a live change
//! always wins over an older backfilled copy of its row; here the point
//! comes from the server rather than from a watermark written to the log.
//!
//! The point. The backfill creates a temporary logical slot on a replication
//! connection with `EXPORT_SNAPSHOT` and reads the range under that exported
//! snapshot (parallel chunked COPY, see `scan`). The slot's consistent point
//! `cp` splits history exactly: every transaction that commits before `cp` is
//! visible in the snapshot, every one committing at or after `cp` is not.
//! Backfilled rows get positions just below `cp` (`cp - 1 - chunk`, ordinal
//! from the key). So in ClickHouse (ReplacingMergeTree on that version) a
//! backfilled row replaces what the live stream wrote before `cp`, which is
//! the same row or an older one (and re-enriched with today's content), and
//! loses to every change committed after `cp`, which the running sidecar
//! streams with a higher version whether it arrives before or after the
//! backfill. Reading `pg_current_wal_insert_lsn()` before opening the
//! transaction would nearly do: but a transaction whose commit record is
//! already in the WAL can still be invisible to a snapshot taken a moment
//! later (it leaves the proc array after writing its commit record, e.g.
//! while it waits for a synchronous standby), and its change would then sort
//! below the older row the backfill read. The exported snapshot has no such
//! window. The temporary slot is dropped as soon as every worker has
//! imported the snapshot, so it pins WAL only for the planning moment.
//!
//! Identity and re-runs. A backfilled event's id is `bf:<event_id>:<digest>`,
//! the row plus a digest of its enriched content (`sinks::change_id`), not
//! its position, which differs on every run. Per sink, a second run of the
//! same range changes nothing:
//! - ClickHouse: the same rows again, at a higher version; `FINAL` reads
//!   the same values.
//! - HTTP: the same event ids again (batches are cut the same way, so even
//!   the idempotency keys repeat); a receiver de-duplicating by id, as
//!   Standard Webhooks receivers do, keeps one copy. Events also carry
//!   `version`, so a receiver keeping the latest row per key is right
//!   whatever order backfilled and live events arrive in.
//! - Redis streams: an entry is appended only for a row version not appended
//!   before: `<prefix>backfill:seen:*` remembers each row's digest, in the
//!   same script as the append, for `SEEN_TTL_SECS` (a week). A row changed
//!   since the last run (or re-enriched differently) is appended again,
//!   with its new id.
//! - The Redis 10-minute window is never touched by a backfill: it counts
//!   each live change once when it streams (and the snapshot counts what was
//!   there before), so adding re-read rows would count them twice.
//!
//! A TRUNCATE of the table streamed while a backfill is delivering is the
//! one change a backfill can undo (ClickHouse empties the table; backfilled
//! rows that arrive later come back): do not backfill across a truncate.
//!
//! Each run writes its Redis batches under its own progress scope
//! (`<prefix>position:backfill:<cp>:<table>:<chunk>`, deleted when the chunk
//! is done), never the live `<prefix>position`, whose watermark positions
//! below `cp` would otherwise skip or move. A backfill keeps no state: after
//! a crash, run it again.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use rand::Rng;

use super::scan::{self, ScanJob, ScanRunError};
use crate::config::Config;
use crate::observe::Stats;
use crate::pipeline::DeliverOptions;
use crate::source::scan::{query_err, quote_literal, Chunk, ScanError, ScanPoint, ScanTable};
use crate::source::slot::{self, quote_ident};
use crate::source::snapshot::{self, ExportError};
use crate::source::{Lsn, TableName};

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// The table, `name` or `schema.name`; must be published.
    pub table: String,
    /// The timestamp column the range applies to (default: `event_ts` for
    /// engagement_events, `publish_ts` for content).
    pub column: Option<String>,
    /// Inclusive start and exclusive end of the range; None: the whole
    /// table (`pgfanout snapshot --table`, for a table added to the
    /// publication while `run` streams).
    pub range: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub workers: usize,
    pub chunk_rows: u64,
    /// Publish to the log only (no enrichment, no sinks).
    pub log_only: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackfillReport {
    pub rows: u64,
    pub chunks: usize,
    pub consistent_point: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Load(#[from] ScanRunError),
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("table {table} is not in publication {publication}; only published tables can be backfilled")]
    NotPublished { table: String, publication: String },
    #[error("{table} has no column {column}; name the timestamp column with --column")]
    NoColumn { table: TableName, column: String },
    #[error("no default time column for {0}; name it with --column")]
    NoDefaultColumn(TableName),
    #[error("empty range: --from {from} is not before --to {to}")]
    EmptyRange { from: DateTime<Utc>, to: DateTime<Utc> },
    #[error(transparent)]
    Privilege(#[from] crate::source::privilege::MissingPrivilege),
}

/// Parses `--from` / `--to`: a date (`2026-01-01`, midnight UTC) or an RFC 3339 timestamp.
pub fn parse_bound(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is neither a date (YYYY-MM-DD) nor an RFC 3339 timestamp: {e}"))
}

/// The Redis progress scope of one chunk of one backfill run.
pub fn chunk_origin(consistent_point: u64, chunk: &Chunk) -> String {
    format!("backfill:{consistent_point:X}:{}:{}", chunk.table, chunk.seq)
}

pub async fn run(cfg: &Config, opts: &BackfillOptions) -> Result<BackfillReport, BackfillError> {
    reload(cfg, opts).await.map_err(|e| crate::source::privilege::explain(e, &cfg.source))
}

async fn reload(cfg: &Config, opts: &BackfillOptions) -> Result<BackfillReport, BackfillError> {
    let started = Instant::now();
    if let Some((from, to)) = opts.range.filter(|(from, to)| from >= to) {
        return Err(BackfillError::EmptyRange { from, to });
    }
    let url = cfg.source.url.expose();
    let state = slot::connect(url).await?;
    let published = snapshot::published_tables(&state, &cfg.source.publication).await?;
    let resolved: Option<String> = state
        .query_one(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&opts.table],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    let table = resolved.and_then(|r| published.iter().find(|t| t.to_string() == r).cloned()).ok_or_else(|| {
        BackfillError::NotPublished { table: opts.table.clone(), publication: cfg.source.publication.clone() }
    })?;
    let shape = ScanTable::load(&state, &table).await?;
    let filter = match opts.range {
        None => None,
        Some((from, to)) => {
            let column = match &opts.column {
                Some(c) => c.clone(),
                None => crate::enrich::time_column(&table)
                    .ok_or_else(|| BackfillError::NoDefaultColumn(table.clone()))?
                    .to_string(),
            };
            if !shape.columns.iter().any(|c| *c.name == *column) {
                return Err(BackfillError::NoColumn { table, column });
            }
            Some(format!(
                "{col} >= {}::timestamptz AND {col} < {}::timestamptz",
                quote_literal(&from.to_rfc3339()),
                quote_literal(&to.to_rfc3339()),
                col = quote_ident(&column)
            ))
        }
    };
    let database: String =
        state.query_one("SELECT current_database()", &[]).await.map_err(query_err("current_database"))?.get(0);
    let ts: i64 = state
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
        .await
        .map_err(query_err("read the clock"))?
        .get(0);

    let slot_name = format!("pgfanout_backfill_{}_{:08x}", std::process::id(), rand::thread_rng().gen::<u32>());
    let exported = snapshot::create_slot_exporting(&cfg.source, &slot_name, true).await?;
    let cp = exported.consistent_point;
    let filters: HashMap<TableName, String> = filter.into_iter().map(|f| (table.clone(), f)).collect();
    let (tables, chunks) =
        snapshot::plan(url, &exported.name, std::slice::from_ref(&table), &filters, opts.chunk_rows).await?;
    let total_rows: u64 = chunks.iter().map(|c| c.rows).sum();
    let chunk_count = chunks.len();
    tracing::info!(table = %table, range = ?opts.range, consistent_point = %Lsn(cp).to_pg_string(), rows = total_rows, chunks = chunk_count, "backfill planned; rows sort below every change committed after the consistent point");

    let log_only = opts.log_only;
    let job = ScanJob {
        cfg: cfg.clone(),
        database,
        tables,
        filters,
        chunks,
        point: ScanPoint { consistent_point: cp, commit_ts_us: ts },
        snapshot: Some(exported.name.clone()),
        workers: opts.workers,
        options: Box::new(move |c| DeliverOptions { origin: Some(chunk_origin(cp, c)), log_only, replay: true }),
        stats: std::sync::Arc::new(Stats::default()),
    };
    let keep: Box<dyn std::any::Any + Send> = Box::new(exported.session);
    let rows = scan::load(job, Some(keep), "backfill", log_only, |_| async { Ok(()) }).await?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(table = %table, rows, chunks = chunk_count, seconds, "backfill complete");
    Ok(BackfillReport { rows, chunks: chunk_count, consistent_point: cp, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!(parse_bound("2026-01-01").unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(parse_bound("2026-01-01T10:00:00+02:00").unwrap().to_rfc3339(), "2026-01-01T08:00:00+00:00");
        assert!(parse_bound("January").is_err());
    }
}
