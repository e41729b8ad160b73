//! The command line: `init`, `run`, `generate`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    },
    /// Stream the slot to the log and all sinks until SIGINT/SIGTERM.
    Run,
    /// Write a generated workload to PostgreSQL.
    Generate {
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        #[arg(long, default_value_t = 50)]
        contents: usize,
        /// Events per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = pgfanout::config::Config::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Init { no_source_schema } => pgfanout::init::run(&cfg, !no_source_schema).await?,
        Command::Run => {
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received; draining and stopping");
                let _ = tx.send(true);
            });
            pgfanout::pipeline::run(cfg, rx, Arc::default()).await?;
        }
        Command::Generate { events, contents, rate, seed } => {
            let client = pgfanout::source::slot::connect(cfg.source.url.expose()).await?;
            let w = pgfanout::generate::Workload { events, contents, rate, seed, ..Default::default() };
            let n = pgfanout::generate::run(&client, &w).await.context("writing the workload")?;
            println!("{n}");
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
