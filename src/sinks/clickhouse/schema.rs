//! `pgfanout init` for ClickHouse: the database, the tables of
//! `sql/clickhouse/schema.sql`, and the in-place migration of tables made
//! before versions were UInt128.

use super::SinkError;
use crate::config::ClickHouseConfig;

pub const CLICKHOUSE_SCHEMA: &str = include_str!("../../../sql/clickhouse/schema.sql");

/// Creates the database and every table (idempotent), migrating old tables.
pub async fn apply(cfg: &ClickHouseConfig) -> Result<(), SinkError> {
    let err = |step: &str| {
        let step = format!("applying sql/clickhouse/schema.sql: {step}");
        move |source| SinkError::ClickHouseSchema { step, source }
    };
    let ch = super::tls::client(cfg)?;
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS `{}`", cfg.database.replace('`', "")))
        .execute()
        .await
        .map_err(err("create database"))?;
    let ch = ch.with_database(&cfg.database);
    for stmt in statements(CLICKHOUSE_SCHEMA) {
        ch.query(&stmt).execute().await.map_err(err(created_table(&stmt).unwrap_or("statement")))?;
        if let Some(table) = created_table(&stmt) {
            migrate_version(&ch, table, &stmt).await?;
        }
    }
    Ok(())
}

/// The table a `CREATE TABLE IF NOT EXISTS <name> (` statement creates.
fn created_table(stmt: &str) -> Option<&str> {
    let rest = stmt.strip_prefix("CREATE TABLE IF NOT EXISTS ")?;
    rest.split_whitespace().next()
}

/// How each table stored its version before `_version UInt128`, and how an
/// old version becomes a new one.
fn old_version(table: &str) -> Option<(&'static str, &'static str)> {
    match table {
        // lsn << 20 | min(ordinal, 2^20 - 1) -> lsn << 32 | ordinal. (Past WAL
        // 1000/0 the old value had already lost the LSN's top bits; those
        // rows keep whatever order they had.)
        "enriched_engagements" => Some((
            "_version",
            "bitOr(bitShiftLeft(toUInt128(bitShiftRight(_version, 20)), 32), toUInt128(bitAnd(_version, 1048575)))",
        )),
        // Commit milliseconds cannot become a position; they are kept as they
        // are. Below 2^42 (until year 2109), they sort under every position
        // version (an LSN of 0/400 or more, shifted by 32), so the rows'
        // order among themselves holds and any new change replaces them.
        "content_dim" => Some(("version_ts_ms", "toUInt128(version_ts_ms)")),
        _ => None,
    }
}

/// Migrates `table` in place when it still has the old version column
/// (UInt64 `_version`, or content_dim's `version_ts_ms`): a new table from
/// `create` under a temporary name, every row copied with its version
/// mapped (`old_version`), then EXCHANGE TABLES (atomic: readers see the old
/// or the new table, never neither) and the old one dropped. Idempotent: a
/// migrated table is left alone, and a temporary table left by an
/// interrupted run is dropped and made again. Run it with the sidecar
/// stopped, as every `init`: rows written meanwhile would not be copied.
async fn migrate_version(ch: &clickhouse::Client, table: &str, create: &str) -> Result<(), SinkError> {
    let Some((old_col, mapping)) = old_version(table) else { return Ok(()) };
    let err = |step: &'static str| {
        move |source| SinkError::ClickHouseSchema {
            step: format!("migrating {table} to UInt128 versions ({step})"),
            source,
        }
    };
    let temp = format!("{table}__v128");
    let columns = |t: String| {
        ch.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = ? ORDER BY position",
        )
        .bind(t)
        .fetch_all::<(String, String)>()
    };
    // Left by a run interrupted after EXCHANGE (it holds the old rows) or
    // before it (a partial copy): not needed either way.
    ch.query(&format!("DROP TABLE IF EXISTS `{temp}`")).execute().await.map_err(err("drop leftover"))?;
    let old = columns(table.to_string()).await.map_err(err("read columns"))?;
    let needs = old.iter().any(|(n, t)| n == old_col && (n != "_version" || t != "UInt128"));
    if !needs {
        return Ok(());
    }
    let new_create =
        create.replacen(&format!("CREATE TABLE IF NOT EXISTS {table} "), &format!("CREATE TABLE `{temp}` "), 1);
    ch.query(&new_create).execute().await.map_err(err("create new table"))?;
    let new = columns(temp.clone()).await.map_err(err("read new columns"))?;
    // Columns both forms have, copied by name; the version mapped.
    let shared: Vec<String> = new
        .iter()
        .filter(|(n, _)| n != "_version" && old.iter().any(|(o, _)| o == n))
        .map(|(n, _)| format!("`{n}`"))
        .collect();
    let list = shared.join(", ");
    // optimize_on_insert = 0: a copy of every row as it is (ReplacingMergeTree
    // would otherwise collapse each block on insert); merges do that later.
    let copy = format!(
        "INSERT INTO `{temp}` ({list}, `_version`) SELECT {list}, {mapping} FROM `{table}` SETTINGS optimize_on_insert = 0"
    );
    ch.query(&copy).execute().await.map_err(err("copy rows"))?;
    ch.query(&format!("EXCHANGE TABLES `{table}` AND `{temp}`")).execute().await.map_err(err("exchange tables"))?;
    ch.query(&format!("DROP TABLE `{temp}`")).execute().await.map_err(err("drop old table"))?;
    let rows: u64 = ch.query(&format!("SELECT count() FROM `{table}`")).fetch_one().await.map_err(err("count rows"))?;
    tracing::info!(
        table,
        rows,
        from = old_col,
        "migrated ClickHouse table to _version UInt128 (commit LSN << 32 | ordinal)"
    );
    Ok(())
}

/// Splits a schema file into statements (`;` at a line end), without comments.
fn statements(sql: &str) -> Vec<String> {
    let body: String = sql.lines().filter(|l| !l.trim_start().starts_with("--")).map(|l| format!("{l}\n")).collect();
    body.split(";\n").map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
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
