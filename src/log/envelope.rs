//! The JSON envelope written to the log, shaped like Debezium's so its users
//! recognise it: `op`, `before`, `after`, `source`, `ts_ms`, plus pgfanout's
//! `position`, which only grows and identifies a change across replays.

use serde::Serialize;
use serde_json::Value as Json;

use crate::source::{Change, Lsn, Op, Row};

/// The message key: the row's primary key as a JSON object (so every change
/// of one row lands in one partition, in order).
pub fn key(change: &Change) -> Vec<u8> {
    serde_json::to_vec(&change.key).unwrap_or_default()
}

/// The envelope as it is written: serialized straight from the change (no
/// intermediate JSON tree, this runs for every change).
#[derive(Serialize)]
pub struct Envelope<'a> {
    op: Op,
    before: Option<&'a Row>,
    after: Option<&'a Row>,
    source: Source<'a>,
    position: PositionJson,
    ts_ms: i64,
    transaction: Option<&'a TransactionBlock>,
}

/// Debezium's `transaction` block of a change (with
/// `provide.transaction.metadata`): the transaction's id and the change's
/// place in it, overall and within its table, both counted from 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransactionBlock {
    pub id: String,
    pub total_order: u64,
    pub data_collection_order: u64,
}

/// A transaction id as Debezium's PostgreSQL connector writes it:
/// `<txId>:<LSN>`, the LSN a decimal number. Which LSN depends on the
/// record (Debezium 3.6, read off its output): a BEGIN and each change use
/// the change's own, an END its commit's end.
pub fn transaction_id(xid: u32, lsn: u64) -> String {
    format!("{xid}:{lsn}")
}

#[derive(Serialize)]
struct Source<'a> {
    connector: &'static str,
    version: &'static str,
    db: &'a str,
    schema: &'a str,
    table: &'a str,
    lsn: u64,
    commit_lsn: String,
    txid: u32,
    commit_ts: i64,
    snapshot: bool,
}

#[derive(Serialize)]
struct PositionJson {
    commit_lsn: u64,
    ordinal: u32,
}

pub fn envelope<'a>(
    change: &'a Change,
    database: &'a str,
    now_ms: i64,
    transaction: Option<&'a TransactionBlock>,
) -> Envelope<'a> {
    Envelope {
        op: change.op,
        before: change.before.as_ref(),
        after: change.after.as_ref(),
        source: Source {
            connector: "pgfanout",
            version: env!("CARGO_PKG_VERSION"),
            db: database,
            schema: &change.table.schema,
            table: &change.table.name,
            lsn: change.lsn,
            commit_lsn: Lsn(change.tx.commit_lsn).to_pg_string(),
            txid: change.tx.xid,
            commit_ts: change.tx.commit_ts_us.div_euclid(1000),
            snapshot: matches!(change.op, Op::Read),
        },
        position: PositionJson { commit_lsn: change.position.commit_lsn, ordinal: change.position.ordinal },
        ts_ms: now_ms,
        transaction,
    }
}

/// The envelope's bytes, as published.
pub fn to_vec(change: &Change, database: &str, now_ms: i64, transaction: Option<&TransactionBlock>) -> Vec<u8> {
    // Sized for a typical row up front: growing from serde_json's default
    // 128 bytes copied every envelope three or four times.
    let mut out = Vec::with_capacity(768);
    match serde_json::to_writer(&mut out, &envelope(change, database, now_ms, transaction)) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// The envelope as a JSON tree, for the rare paths that edit it.
pub fn value(change: &Change, database: &str, now_ms: i64) -> Json {
    serde_json::to_value(envelope(change, database, now_ms, None)).unwrap_or_default()
}

/// The topic a table's changes go to.
pub fn topic(prefix: &str, change: &Change) -> String {
    format!("{prefix}{}.{}", change.table.schema, change.table.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::values::Value;
    use crate::source::{Op, Position, Row, TableName, TxInfo};

    #[test]
    fn debezium_shape() {
        let row = Row(vec![("id".into(), Value::Int8(7)), ("device".into(), Value::Null)]);
        let c = Change {
            table: TableName::new("public", "engagement_events"),
            op: Op::Create,
            key: Row(vec![("id".into(), Value::Int8(7))]),
            before: None,
            after: Some(row),
            lsn: 42,
            tx: TxInfo { xid: 9, commit_lsn: 0x1_0000_0010, commit_ts_us: 1_700_000_000_123_456 },
            position: Position { commit_lsn: 0x1_0000_0010, ordinal: 3 },
        };
        let v = value(&c, "app", 5);
        assert_eq!(v["op"], "c");
        assert_eq!(v["after"]["id"], 7);
        assert!(v["after"]["device"].is_null());
        assert!(v["before"].is_null());
        assert_eq!(v["source"]["commit_lsn"], "1/10");
        assert_eq!(v["source"]["commit_ts"], 1_700_000_000_123i64);
        assert_eq!(v["position"]["ordinal"], 3);
        assert_eq!(key(&c), br#"{"id":7}"#);
        assert_eq!(topic("pgfanout.", &c), "pgfanout.public.engagement_events");
        let bytes: Json = serde_json::from_slice(&to_vec(&c, "app", 5, None)).unwrap();
        assert_eq!(bytes, v, "the published bytes are the envelope");
    }
}
