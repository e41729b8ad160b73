//! `pgfanout init`: applies the schemas idempotently — the source tables,
//! publication and slot in PostgreSQL, what each configured sink needs
//! (`Sink::init`: ClickHouse's database and tables), and the topics.

use crate::config::Config;
use crate::log::producer;
use crate::source::slot;

pub const POSTGRES_SCHEMA: &str = include_str!("../../sql/postgres/schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("applying sql/postgres/schema.sql failed: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Sink(#[from] crate::sinks::SinkError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Journal(#[from] crate::enrich::journal::JournalError),
}

pub async fn run(cfg: &Config, with_source_schema: bool) -> Result<(), InitError> {
    let pg = slot::connect(cfg.source.url.expose()).await?;
    if with_source_schema {
        pg.batch_execute(POSTGRES_SCHEMA).await.map_err(InitError::Postgres)?;
    }
    // Before `prepare`, which warns about a publication that lacks tables.
    slot::add_missing_publication_tables(&pg, &cfg.source).await?;
    crate::enrich::journal::prepare(&pg, &cfg.source).await?;

    // Each configured sink's tables (ClickHouse's database and tables).
    for sink in crate::sinks::build(cfg, None)? {
        sink.init().await?;
    }

    producer::ensure_topics(&cfg.log, &crate::pipeline::topics(cfg)).await?;
    tracing::info!("init done: schema, publication, slot, sink tables and topics are in place");
    Ok(())
}
