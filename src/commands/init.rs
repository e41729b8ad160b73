//! `pgfanout init`: applies the schemas idempotently — the source tables,
//! publication and slot in PostgreSQL, what each configured sink needs
//! (`Sink::init`: ClickHouse's database and tables), and the topics.
//! `pgfanout init --print-sql` instead prints what an administrator runs
//! once for a least-privilege role (`source::privilege::grants_sql`), after
//! which that role runs `init --no-source-schema`.

use crate::config::Config;
use crate::log::producer;
use crate::source::privilege::{self, MissingPrivilege};
use crate::source::slot;

pub const POSTGRES_SCHEMA: &str = include_str!("../../sql/postgres/schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("applying sql/postgres/schema.sql failed: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error("applying sql/postgres/schema.sql (the demo's source tables and their replica identity) was refused: {0}. A role that does not own the source tables runs `pgfanout init --no-source-schema`, after an administrator ran what `pgfanout init --print-sql` prints")]
    SourceSchemaRefused(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Sink(#[from] crate::sinks::SinkError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Journal(#[from] crate::enrich::journal::JournalError),
    #[error(transparent)]
    Privilege(#[from] MissingPrivilege),
}

/// What `pgfanout init --print-sql` prints: the statements an administrator
/// runs once for the role of `source.url` (nothing is connected to).
pub fn print_sql(cfg: &Config) -> String {
    privilege::grants_sql(&cfg.source)
}

pub async fn run(cfg: &Config, with_source_schema: bool) -> Result<(), InitError> {
    match apply(cfg, with_source_schema).await {
        // Already says what to do (a GRANT would not: the tables are the administrator's).
        Err(e @ InitError::SourceSchemaRefused(_)) => Err(e),
        r => r.map_err(|e| privilege::explain(e, &cfg.source)),
    }
}

async fn apply(cfg: &Config, with_source_schema: bool) -> Result<(), InitError> {
    let pg = slot::connect(cfg.source.url.expose()).await?;
    if with_source_schema {
        pg.batch_execute(POSTGRES_SCHEMA).await.map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                InitError::SourceSchemaRefused(e)
            } else {
                InitError::Postgres(e)
            }
        })?;
    }
    // Before `prepare`, which warns about a publication that lacks tables.
    slot::add_missing_publication_tables(&pg, &cfg.source).await?;
    crate::enrich::journal::prepare(&pg, &cfg.source).await?;

    // Each configured sink's tables (ClickHouse's database and tables).
    for sink in crate::sinks::build(cfg, crate::sinks::Refused::Stall)? {
        sink.init().await?;
    }

    producer::ensure_topics(&cfg.log, &crate::pipeline::topics(cfg)).await?;
    tracing::info!("init done: schema, publication, slot, sink tables and topics are in place");
    Ok(())
}
