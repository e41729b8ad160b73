//! `pgfanout init`: applies the schemas idempotently — the source tables,
//! publication and slot in PostgreSQL, the database and tables in
//! ClickHouse, and the topics in the broker.

use crate::config::Config;
use crate::log::producer;
use crate::source::slot;

pub const POSTGRES_SCHEMA: &str = include_str!("../sql/postgres/schema.sql");
pub const CLICKHOUSE_SCHEMA: &str = include_str!("../sql/clickhouse/schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("applying sql/postgres/schema.sql failed: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error("applying sql/clickhouse/schema.sql failed: {0}")]
    ClickHouse(#[source] clickhouse::error::Error),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Journal(#[from] crate::enrich::journal::JournalError),
}

/// Splits a schema file into statements (`;` at a line end), without comments.
pub fn statements(sql: &str) -> Vec<String> {
    let body: String = sql.lines().filter(|l| !l.trim_start().starts_with("--")).map(|l| format!("{l}\n")).collect();
    body.split(";\n").map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

pub async fn run(cfg: &Config, with_source_schema: bool) -> Result<(), InitError> {
    let pg = slot::connect(cfg.source.url.expose()).await?;
    if with_source_schema {
        pg.batch_execute(POSTGRES_SCHEMA).await.map_err(InitError::Postgres)?;
    }
    crate::enrich::journal::prepare(&pg, &cfg.source).await?;

    let ch = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_user(&cfg.clickhouse.user)
        .with_password(cfg.clickhouse.password.expose());
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS `{}`", cfg.clickhouse.database.replace('`', "")))
        .execute()
        .await
        .map_err(InitError::ClickHouse)?;
    let ch = ch.with_database(&cfg.clickhouse.database);
    for stmt in statements(CLICKHOUSE_SCHEMA) {
        ch.query(&stmt).execute().await.map_err(InitError::ClickHouse)?;
    }

    producer::ensure_topics(&cfg.log, &crate::pipeline::topics(cfg)).await?;
    tracing::info!("init done: schema, publication, slot, ClickHouse tables and topics are in place");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn clickhouse_schema_splits_into_two_tables() {
        let s = super::statements(super::CLICKHOUSE_SCHEMA);
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|x| x.starts_with("CREATE TABLE IF NOT EXISTS")));
    }
}
