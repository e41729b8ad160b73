//! A consistent point to read tables at: a new logical slot created with an
//! exported snapshot (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`), the
//! published tables, and a plan of key-range chunks read under that
//! snapshot. `pgfanout snapshot` and `backfill` (in `commands`) build on it;
//! the journal seeds the content dimension from it.

use std::collections::HashMap;
use std::sync::Arc;

use pgwire_replication::{Lsn, ReplicationClient};
use tokio_postgres::Client;

use super::scan::{self, query_err, Chunk, ScanError, ScanTable};
use super::session::{explain_replication_error, replication_config};
use super::slot::{self, quote_ident};
use super::TableName;
use crate::config::SourceConfig;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Session(#[from] super::session::SessionError),
    #[error("replication connection: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error("unexpected reply to CREATE_REPLICATION_SLOT: {0}")]
    Reply(String),
}

/// A slot just created with an exported snapshot. Keep `session` until the
/// snapshot has been imported; dropping it ends the session (and drops a
/// temporary slot).
pub struct ExportedSnapshot {
    pub session: ReplicationClient,
    pub consistent_point: u64,
    pub name: String,
}

/// Creates `slot_name` (pgoutput) on a replication connection to the
/// primary, exporting its snapshot (which SQL connections to the same
/// server then import).
pub async fn create_slot_exporting(
    source: &SourceConfig,
    slot_name: &str,
    temporary: bool,
) -> Result<ExportedSnapshot, ExportError> {
    let mut rc = source.clone();
    rc.slot = slot_name.to_string();
    let primary = slot::primary(source.url.expose()).await?;
    let (config, tls) = replication_config(&rc, &primary)?;
    let mut session = ReplicationClient::connect_gated(config).await?;
    // The first query waits for the connection: TLS and login failures come here.
    let version = match session.simple_query("SHOW server_version_num").await {
        Ok(rows) => rows,
        Err(e) => {
            return Err(explain_replication_error(e, &tls).await.map_or_else(ExportError::from, ExportError::from))
        }
    };
    let version: i32 = version
        .first()
        .and_then(|r| r.first())
        .and_then(|c| c.as_ref())
        .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
        .unwrap_or(0);
    let failover = !temporary && source.failover.unwrap_or(true);
    if failover && version < 170_000 && source.failover == Some(true) {
        tracing::warn!(
            slot = slot_name,
            server_version_num = version,
            "source.failover = true needs PostgreSQL 17 or later; creating an ordinary slot"
        );
    }
    let sql = create_slot_sql(slot_name, temporary, failover && version >= 170_000, version);
    let rows = session.simple_query(&sql).await?;
    let text = |i: usize| -> Option<String> {
        rows.first().and_then(|r| r.get(i)).and_then(|c| c.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let (Some(cp), Some(name)) = (text(1), text(2)) else {
        return Err(ExportError::Reply(format!("{rows:?}")));
    };
    let consistent_point = Lsn::parse(&cp).map_err(|e| ExportError::Reply(format!("consistent_point {cp}: {e}")))?.0;
    Ok(ExportedSnapshot { session, consistent_point, name })
}

/// `CREATE_REPLICATION_SLOT` exporting a snapshot, in the option-list form
/// of PostgreSQL 15+ (which `FAILOVER` needs, 17+), else the older keywords.
fn create_slot_sql(slot_name: &str, temporary: bool, failover: bool, server_version_num: i32) -> String {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    if server_version_num >= 150_000 {
        let failover = if failover { ", FAILOVER true" } else { "" };
        format!(
            "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput (SNAPSHOT 'export'{failover})",
            quote_ident(slot_name)
        )
    } else {
        format!("CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput EXPORT_SNAPSHOT", quote_ident(slot_name))
    }
}

/// The published tables, in name order.
pub async fn published_tables(client: &Client, publication: &str) -> Result<Vec<TableName>, ScanError> {
    Ok(client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(query_err("list the published tables"))?
        .iter()
        .map(|r| TableName::new(r.get(0), r.get(1)))
        .collect())
}

/// Plans the chunks of `tables` under the exported snapshot.
pub async fn plan(
    url: &str,
    snapshot: &str,
    tables: &[TableName],
    filters: &HashMap<TableName, String>,
    chunk_rows: u64,
) -> Result<(HashMap<TableName, Arc<ScanTable>>, Vec<Chunk>), ScanError> {
    let planner = slot::connect(url).await?;
    scan::begin(&planner, Some(snapshot)).await?;
    let mut shapes = HashMap::new();
    let mut chunks = Vec::new();
    for t in tables {
        let shape = ScanTable::load(&planner, t).await?;
        let mut planned =
            scan::plan_table(&planner, &shape, filters.get(t).map(String::as_str), chunk_rows, chunks.len() as u32)
                .await?;
        tracing::info!(table = %t, chunks = planned.len(), rows = planned.iter().map(|c| c.rows).sum::<u64>(), key = ?shape.key_kind(), "planned");
        chunks.append(&mut planned);
        shapes.insert(t.clone(), Arc::new(shape));
    }
    planner.batch_execute("COMMIT").await.map_err(query_err("commit"))?;
    Ok((shapes, chunks))
}

#[cfg(test)]
mod tests {
    use super::create_slot_sql;

    #[test]
    fn failover_only_in_the_option_form_of_new_servers() {
        assert_eq!(
            create_slot_sql("s", false, true, 170_000),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
        );
        assert_eq!(
            create_slot_sql("s", true, false, 160_000),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_sql("s", false, false, 140_000),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
    }
}
