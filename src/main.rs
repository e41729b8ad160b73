//! The command line: `init`, `run`, `status`, `snapshot`, `backfill`, `generate`, `dead-letters`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

// Every change allocates a handful of short-lived rows, strings and buffers
// across threads; glibc's malloc spent about a third of the pipeline's CPU
// on them (perf, benches/drain.sh), mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pgfanout",
    version,
    about = "PostgreSQL → Redpanda → ClickHouse, Redis and HTTP, acknowledged only after every sink flushed"
)]
struct Cli {
    /// Configuration file (TOML); PGFANOUT_<SECTION>__<KEY> variables override it.
    #[arg(short, long, global = true, env = "PGFANOUT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create what is missing: source schema, publication and slot, ClickHouse tables, topics.
    Init {
        /// Leave the source tables alone (they exist already).
        #[arg(long)]
        no_source_schema: bool,
        /// Print, and do not run, the SQL an administrator runs once so that the role of
        /// source.url can run pgfanout without being a superuser (connects nowhere).
        #[arg(long)]
        print_sql: bool,
    },
    /// Stream the slot to the log and all sinks until SIGINT/SIGTERM.
    Run,
    /// Show the slot, every sink and the running sidecar; exit 0 healthy, 1 unhealthy, 2 on a config or connection error.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the source path alone: read the slot through the decoder up to an LSN, no log or sinks.
    Drain {
        /// Stop after the transaction ending at or past this LSN (e.g. 0/3A0B1C8).
        #[arg(long)]
        until: String,
    },
    /// Initial load: create the slot with an exported snapshot and deliver every published
    /// table as of that point (resumes an interrupted snapshot; exits 0 if it completed before).
    Snapshot {
        #[command(flatten)]
        scan: ScanArgs,
        /// Load one table only, while `run` streams (a table added to the publication later):
        /// read it under a snapshot of its own and deliver it as a backfill of the whole table.
        #[arg(long)]
        table: Option<String>,
        /// Drop an existing, inactive slot that no snapshot created (e.g. by `init`) and recreate it.
        #[arg(long)]
        recreate_slot: bool,
    },
    /// Re-read a time range of a table and re-deliver it to the log and every sink; safe while `run` streams and to repeat.
    Backfill {
        #[arg(long)]
        table: String,
        /// Start of the range, inclusive: a date (UTC midnight) or an RFC 3339 timestamp.
        #[arg(long, value_parser = pgfanout::commands::backfill::parse_bound)]
        from: chrono::DateTime<chrono::Utc>,
        /// End of the range, exclusive.
        #[arg(long, value_parser = pgfanout::commands::backfill::parse_bound)]
        to: chrono::DateTime<chrono::Utc>,
        /// Timestamp column the range applies to (default: event_ts, or publish_ts for content).
        #[arg(long)]
        column: Option<String>,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Write a generated workload to PostgreSQL.
    Generate {
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        #[arg(long, default_value_t = 50)]
        contents: usize,
        /// Events per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<u64>,
        /// Events per INSERT (one transaction each): small for a steady
        /// stream of commits, large for bulk loads.
        #[arg(long, default_value_t = 500)]
        rows_per_statement: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// What the sinks parked in the dead-letter topic, and its re-delivery once the cause is fixed.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
}

#[derive(Subcommand)]
enum DeadLettersAction {
    /// One line per parked record: sink, reason, positions, time parked, replayed or not.
    List {
        /// Only what this sink parked (clickhouse, redis, http; log and enrich for changes no sink got).
        #[arg(long)]
        sink: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-deliver each parked batch to its sink (the sink's own idempotent write) and record it
    /// as replayed, so a second run changes nothing; exit 1 if any fails again (it stays parked).
    Replay {
        #[arg(long)]
        sink: Option<String>,
        /// Only what was parked since: an RFC 3339 time or a duration back from now (2h, 30m, 7d).
        #[arg(long, value_parser = pgfanout::commands::dead_letters::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

/// How `snapshot` and `backfill` read tables.
#[derive(clap::Args)]
struct ScanArgs {
    /// Parallel readers, each with its own connection and delivery.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Rows per chunk: the unit of parallelism, progress and resume.
    #[arg(long, default_value_t = 20_000)]
    chunk_rows: u64,
    /// Publish to the log only (no enrichment, no sinks); a snapshot then counts as done.
    #[arg(long)]
    log_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Status { json } = cli.command {
        std::process::exit(pgfanout::commands::status::main(cli.config.as_deref(), json).await);
    }
    let cfg = pgfanout::config::Config::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Init { print_sql: true, .. } => print!("{}", pgfanout::commands::init::print_sql(&cfg)),
        Command::Init { no_source_schema, print_sql: false } => {
            pgfanout::commands::init::run(&cfg, !no_source_schema).await?
        }
        Command::Run => pgfanout::commands::run::run(cfg).await?,
        Command::Drain { until } => {
            let until = pgfanout::source::Lsn::parse(&until).map_err(|e| anyhow::anyhow!("--until: {e:?}"))?;
            let started = std::time::Instant::now();
            let n = pgfanout::source::session::drain(&cfg.source, until.0).await?;
            let secs = started.elapsed().as_secs_f64();
            println!("{n} changes in {secs:.2} s ({:.0} changes/s)", n as f64 / secs);
        }
        Command::Snapshot { scan: ScanArgs { workers, chunk_rows, log_only }, table: Some(table), .. } => {
            let opts = pgfanout::commands::backfill::BackfillOptions {
                table,
                column: None,
                range: None,
                workers,
                chunk_rows,
                log_only,
            };
            print_backfill(&pgfanout::commands::backfill::run(&cfg, &opts).await?);
        }
        Command::Snapshot { scan: ScanArgs { workers, chunk_rows, log_only }, recreate_slot, table: None } => {
            let opts = pgfanout::commands::snapshot::SnapshotOptions { workers, chunk_rows, log_only, recreate_slot };
            match pgfanout::commands::snapshot::run(&cfg, &opts).await? {
                pgfanout::commands::snapshot::SnapshotOutcome::Loaded { rows, chunks, resumed, seconds } => println!(
                    "{}",
                    serde_json::json!({"rows": rows, "chunks": chunks, "resumed": resumed, "seconds": seconds,
                        "rows_per_sec": rows as f64 / seconds.max(1e-3)})
                ),
                pgfanout::commands::snapshot::SnapshotOutcome::AlreadyComplete => {
                    println!("{}", serde_json::json!({"already_complete": true}))
                }
            }
        }
        Command::Backfill { table, from, to, column, scan: ScanArgs { workers, chunk_rows, log_only } } => {
            let range = Some((from, to));
            let opts =
                pgfanout::commands::backfill::BackfillOptions { table, column, range, workers, chunk_rows, log_only };
            print_backfill(&pgfanout::commands::backfill::run(&cfg, &opts).await?);
        }
        Command::Status { .. } => unreachable!("handled before loading the configuration"),
        Command::Generate { events, contents, rate, rows_per_statement, seed } => {
            let client = pgfanout::source::slot::connect(cfg.source.url.expose()).await?;
            let w = pgfanout::commands::generate::Workload {
                events,
                contents,
                rate,
                rows_per_statement: rows_per_statement.max(1),
                seed,
            };
            let n = pgfanout::commands::generate::run(&client, &w).await.context("writing the workload")?;
            println!("{n}");
        }
        Command::DeadLetters { action: DeadLettersAction::List { sink, json } } => {
            let filter = pgfanout::commands::dead_letters::Filter { sink, since: None };
            let letters = pgfanout::commands::dead_letters::list(&cfg, &filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", pgfanout::commands::dead_letters::render(&letters));
            }
        }
        Command::DeadLetters { action: DeadLettersAction::Replay { sink, since } } => {
            let filter = pgfanout::commands::dead_letters::Filter { sink, since };
            let report = pgfanout::commands::dead_letters::replay(&cfg, &filter).await?;
            print!("{}", report.render());
            if report.failed() > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

fn print_backfill(r: &pgfanout::commands::backfill::BackfillReport) {
    println!(
        "{}",
        serde_json::json!({"rows": r.rows, "chunks": r.chunks, "seconds": r.seconds,
            "consistent_point": pgfanout::source::Lsn(r.consistent_point).to_pg_string()})
    );
}
