//! The publication and the replication slot: created when missing, checked
//! for the states that would otherwise lose data silently (dropped,
//! invalidated, held by another process).

use std::str::FromStr;

use tokio_postgres::{Client, NoTls};

use crate::config::SourceConfig;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("invalid PostgreSQL connection string: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("PostgreSQL query failed ({what}): {source}")]
    Query { what: &'static str, source: tokio_postgres::Error },
    #[error("wal_level is {0}; logical replication needs wal_level=logical (set it in postgresql.conf and restart)")]
    WalLevel(String),
    #[error("replication slot {slot} was invalidated ({reason}); the WAL it needed is gone: drop it and take a new snapshot (`pgfanout snapshot`)")]
    Invalidated { slot: String, reason: String },
    #[error("replication slot {slot} uses plugin {plugin}, not pgoutput; drop it or configure another slot name")]
    WrongPlugin { slot: String, plugin: String },
    #[error("table {0} named in source.tables does not exist")]
    NoSuchTable(String),
}

/// Opens an ordinary (non-replication) connection and drives it in the background.
pub async fn connect(url: &str) -> Result<Client, SlotError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(SlotError::Url)?;
    let (client, conn) = cfg.connect(NoTls).await.map_err(SlotError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// The slot as PostgreSQL reports it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush_lsn: Option<u64>,
    pub active_pid: Option<i32>,
}

fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SlotError {
    move |source| SlotError::Query { what, source }
}

/// Checks `wal_level` and creates the publication when it is missing (the
/// snapshot creates its slot itself, with an exported snapshot).
pub async fn ensure_publication(client: &Client, cfg: &SourceConfig) -> Result<(), SlotError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(query_err("SHOW wal_level"))?.get(0);
    if wal_level != "logical" {
        return Err(SlotError::WalLevel(wal_level));
    }
    let has_pub = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&cfg.publication])
        .await
        .map_err(query_err("look up publication"))?
        .is_some();
    if !has_pub {
        let mut tables = Vec::new();
        for t in &cfg.tables {
            let row =
                client.query_opt("SELECT to_regclass($1)::text", &[t]).await.map_err(query_err("look up table"))?;
            let name: Option<String> = row.and_then(|r| r.get(0));
            tables.push(name.ok_or_else(|| SlotError::NoSuchTable(t.clone()))?);
        }
        let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(&cfg.publication), tables.join(", "));
        client.batch_execute(&sql).await.map_err(query_err("create publication"))?;
        tracing::info!(publication = %cfg.publication, tables = ?cfg.tables, "created publication");
    }
    Ok(())
}

/// The slot, when it exists, refusing one that can no longer be trusted.
/// Creating it is `enrich::journal::prepare`'s job: a new slot is created
/// with an exported snapshot, in which the content journal is seeded.
pub async fn check(client: &Client, cfg: &SourceConfig) -> Result<Option<SlotState>, SlotError> {
    let slot = client
        .query_opt("SELECT plugin, confirmed_flush_lsn::text, active_pid, wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot])
        .await
        .map_err(query_err("look up slot"))?;
    let Some(row) = slot else { return Ok(None) };
    let plugin: String = row.get(0);
    if plugin != "pgoutput" {
        return Err(SlotError::WrongPlugin { slot: cfg.slot.clone(), plugin });
    }
    let wal_status: Option<String> = row.get(3);
    if wal_status.as_deref() == Some("lost") {
        return Err(SlotError::Invalidated { slot: cfg.slot.clone(), reason: "wal_status = lost".into() });
    }
    Ok(Some(SlotState { confirmed_flush_lsn: parse_lsn(row.get(1)), active_pid: row.get(2) }))
}

/// Reads the slot's state (None when the slot does not exist).
pub async fn state(client: &Client, slot: &str) -> Result<Option<SlotState>, SlotError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("read slot"))?;
    Ok(row.map(|r| SlotState { confirmed_flush_lsn: parse_lsn(r.get(0)), active_pid: r.get(1) }))
}

fn parse_lsn(s: Option<String>) -> Option<u64> {
    s.and_then(|s| super::Lsn::parse(&s).ok()).map(|l| l.0)
}

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
