//! What a batch of changes becomes in the log, as Debezium lays it out: a
//! record per change in its table's topic, a tombstone after each delete
//! (`tombstones.on.delete`), nothing for a skipped operation
//! (`skipped.operations`), and with `provide.transaction.metadata` a BEGIN
//! and an END record per transaction in `<prefix>transaction` and a
//! `transaction` block in each change.
//!
//! Every record carries a [`Mark`]: the position it belongs to and its kind.
//! Marks grow along the records of one origin in the order they are sent,
//! in every topic, which is what lets a restarted publisher recognise what
//! a partition already holds (`log::tail`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::envelope::{self, Encoder, TransactionBlock};
use crate::config::DebeziumConfig;
use crate::source::{Change, Op, Position, TxInfo};

/// A record's kind, in the order a transaction's records are sent: its
/// BEGIN before its first change, a delete's tombstone right after it, its
/// END after its last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Begin,
    Change,
    Tombstone,
    End,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Begin => "begin",
            Kind::Change => "change",
            Kind::Tombstone => "tombstone",
            Kind::End => "end",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Begin, Kind::Change, Kind::Tombstone, Kind::End].into_iter().find(|k| k.as_str() == s)
    }
}

/// Orders the records of one origin: by position, then kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mark {
    pub position: Position,
    pub kind: Kind,
}

/// One record to publish.
#[derive(Debug)]
pub struct Record<'a> {
    pub topic: Arc<str>,
    /// None for a TRUNCATE, which has no row (Debezium sends it unkeyed).
    pub key: Option<Vec<u8>>,
    /// None for a tombstone.
    pub payload: Option<Vec<u8>>,
    pub mark: Mark,
    /// The change it encodes (None for tombstones and transaction
    /// records), for parking a summary of it when the broker refuses its size.
    pub change: Option<&'a Change>,
}

/// How a batch is published.
#[derive(Debug, Clone, Copy, Default)]
pub struct Publish<'a> {
    /// None for the live stream, else the scan chunk's name. Only the live
    /// stream has transactions, and only it skips what the log already
    /// holds: its positions are the WAL's, the same on every replay.
    pub origin: Option<&'a str>,
    /// The batch ends inside a transaction (its commit is still to come).
    pub tx_open: bool,
    /// `(commit LSN, end LSN)` of the commits the batch holds: Debezium
    /// names a transaction's END by its commit's end.
    pub commits: &'a [(u64, u64)],
}

/// The live stream's transaction state, carried from batch to batch (a
/// transaction can span many).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TxState {
    /// The commit LSN of the transaction whose changes are being read.
    current: Option<u64>,
    /// The end LSN of the last transaction that ended.
    pub last_end: Option<u64>,
    /// The transaction whose BEGIN went out and whose END has not.
    open: Option<OpenTx>,
}

#[derive(Debug, Clone, PartialEq)]
struct OpenTx {
    tx: TxInfo,
    last: Position,
    events: u64,
    /// Events per `schema.table`, in name order as Debezium lists them.
    per_collection: BTreeMap<String, u64>,
}

/// What stays fixed for a publisher.
pub struct Layout<'a> {
    pub prefix: &'a str,
    pub debezium: &'a DebeziumConfig,
    pub encoder: &'a Encoder,
}

/// Debezium's `<topic.prefix>.transaction`.
pub fn transaction_topic(prefix: &str) -> String {
    format!("{prefix}transaction")
}

/// Debezium's `topic.prefix` (pgfanout's keeps a trailing dot).
pub fn server_name(prefix: &str) -> &str {
    prefix.strip_suffix('.').unwrap_or(prefix)
}

/// Debezium's `<topic.heartbeat.prefix>.<topic.prefix>`.
pub fn heartbeat_topic(prefix: &str, debezium: &DebeziumConfig) -> String {
    format!("{}.{}", debezium.topic_heartbeat_prefix, server_name(prefix))
}

/// The records of `changes`, in sending order; `tx` is the transaction
/// state before the batch and becomes the state after it.
pub fn plan<'a>(
    layout: &Layout<'_>,
    changes: &'a [Change],
    tx: &mut TxState,
    how: &Publish<'_>,
    now_us: i64,
) -> Vec<Record<'a>> {
    let live = how.origin.is_none();
    let metadata = live && layout.debezium.provide_transaction_metadata;
    let tx_topic: Arc<str> = transaction_topic(layout.prefix).into();
    let mut topics: Vec<(&crate::source::TableName, Arc<str>)> = Vec::new();
    let mut out = Vec::with_capacity(changes.len() + changes.len() / 8 + 2);
    for c in changes {
        if live {
            if tx.current.is_some_and(|cur| cur != c.tx.commit_lsn) {
                end_transaction(tx, how, layout.debezium.schemas_enable, &tx_topic, &mut out);
            }
            tx.current = Some(c.tx.commit_lsn);
        }
        if layout.debezium.skips(c.op.code()) {
            continue;
        }
        let block = metadata.then(|| {
            let open = tx.open.get_or_insert_with(|| {
                out.push(begin_record(layout.debezium.schemas_enable, &tx_topic, c));
                OpenTx { tx: c.tx, last: c.position, events: 0, per_collection: BTreeMap::new() }
            });
            open.events += 1;
            open.last = c.position;
            let in_collection = open.per_collection.entry(format!("{}.{}", c.table.schema, c.table.name)).or_default();
            *in_collection += 1;
            TransactionBlock {
                id: envelope::transaction_id(&c.tx, c.lsn),
                total_order: open.events,
                data_collection_order: *in_collection,
            }
        });
        let topic = match topics.iter().find(|(t, _)| *t == &c.table) {
            Some((_, topic)) => topic.clone(),
            None => {
                let topic: Arc<str> = envelope::topic(layout.prefix, c).into();
                topics.push((&c.table, topic.clone()));
                topic
            }
        };
        // None for a TRUNCATE and for a table without a key, as Debezium.
        let key = layout.encoder.key(c);
        let payload = layout.encoder.envelope(c, now_us, block.as_ref());
        // A tombstone without a key would make compaction forget nothing.
        let tombstone = (c.op == Op::Delete && key.is_some() && layout.debezium.tombstones_on_delete).then(|| Record {
            topic: topic.clone(),
            key: key.clone(),
            payload: None,
            mark: Mark { position: c.position, kind: Kind::Tombstone },
            change: None,
        });
        out.push(Record {
            topic,
            key,
            payload: Some(payload),
            mark: Mark { position: c.position, kind: Kind::Change },
            change: Some(c),
        });
        out.extend(tombstone);
    }
    if live && !how.tx_open && tx.current.is_some() {
        end_transaction(tx, how, layout.debezium.schemas_enable, &tx_topic, &mut out);
    }
    out
}

/// The transaction being read ended: its END record if its BEGIN went out.
fn end_transaction(tx: &mut TxState, how: &Publish<'_>, schemas: bool, topic: &Arc<str>, out: &mut Vec<Record<'_>>) {
    let Some(commit_lsn) = tx.current.take() else { return };
    // The batch that ends a transaction holds its commit (the reader hands
    // the commit before the next transaction's first change).
    let end = how.commits.iter().find(|(c, _)| *c == commit_lsn).map_or(commit_lsn, |(_, end)| *end);
    tx.last_end = Some(end);
    if let Some(open) = tx.open.take() {
        out.push(end_record(schemas, topic, open, end));
    }
}

// Field order as Debezium's `TransactionMetadataValue` schema has it.
#[derive(Serialize)]
struct TxValue<'a> {
    status: &'static str,
    id: &'a str,
    event_count: Option<u64>,
    data_collections: Option<Vec<Collection<'a>>>,
    ts_ms: i64,
}

#[derive(Serialize)]
struct Collection<'a> {
    data_collection: &'a str,
    event_count: u64,
}

// The JSON converter's schemas of Debezium's transaction and heartbeat
// records (`io.debezium.schema.SchemaFactory`), for `schemas.enable`.
const TX_KEY_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"}],"optional":false,"name":"io.debezium.connector.common.TransactionMetadataKey","version":1}"#;
const TX_VALUE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"status"},{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":true,"field":"event_count"},{"type":"array","items":{"type":"struct","fields":[{"type":"string","optional":false,"field":"data_collection"},{"type":"int64","optional":false,"field":"event_count"}],"optional":true,"name":"event.collection","version":1},"optional":true,"field":"data_collections"},{"type":"int64","optional":false,"field":"ts_ms"}],"optional":false,"name":"io.debezium.connector.common.TransactionMetadataValue","version":1}"#;
const HEARTBEAT_KEY_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"serverName"}],"optional":false,"name":"io.debezium.connector.common.ServerNameKey","version":1}"#;
const HEARTBEAT_VALUE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"int64","optional":false,"field":"ts_ms"}],"optional":false,"name":"io.debezium.connector.common.Heartbeat","version":1}"#;

/// `payload` as the JSON converter writes it: bare, or with `schemas.enable`
/// as `{"schema": …, "payload": …}`.
fn converted(schemas: bool, schema: &str, payload: &impl Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(payload).unwrap_or_default();
    if !schemas {
        return body;
    }
    let mut out = Vec::with_capacity(schema.len() + body.len() + 24);
    out.extend_from_slice(b"{\"schema\":");
    out.extend_from_slice(schema.as_bytes());
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(&body);
    out.push(b'}');
    out
}

/// A heartbeat record's key and value.
pub fn heartbeat(prefix: &str, debezium: &DebeziumConfig, now_ms: i64) -> (Vec<u8>, Vec<u8>) {
    let schemas = debezium.schemas_enable;
    (
        converted(schemas, HEARTBEAT_KEY_SCHEMA, &serde_json::json!({ "serverName": server_name(prefix) })),
        converted(schemas, HEARTBEAT_VALUE_SCHEMA, &serde_json::json!({ "ts_ms": now_ms })),
    )
}

fn tx_key(schemas: bool, id: &str) -> Option<Vec<u8>> {
    Some(converted(schemas, TX_KEY_SCHEMA, &serde_json::json!({ "id": id })))
}

/// BEGIN: named, as Debezium does, by the transaction id and its first
/// change's LSN.
fn begin_record<'a>(schemas: bool, topic: &Arc<str>, first: &Change) -> Record<'a> {
    let id = envelope::transaction_id(&first.tx, first.lsn);
    let value = TxValue { status: "BEGIN", id: &id, event_count: None, data_collections: None, ts_ms: ms(&first.tx) };
    tx_record(schemas, topic, &value, Mark { position: first.position, kind: Kind::Begin })
}

/// END: named by the transaction id and its commit's end LSN.
fn end_record<'a>(schemas: bool, topic: &Arc<str>, open: OpenTx, end_lsn: u64) -> Record<'a> {
    let id = envelope::transaction_id(&open.tx, end_lsn);
    let collections =
        open.per_collection.iter().map(|(name, n)| Collection { data_collection: name, event_count: *n }).collect();
    let value = TxValue {
        status: "END",
        id: &id,
        event_count: Some(open.events),
        data_collections: Some(collections),
        ts_ms: ms(&open.tx),
    };
    tx_record(schemas, topic, &value, Mark { position: open.last, kind: Kind::End })
}

/// The commit time in milliseconds, as transaction records carry it.
fn ms(tx: &TxInfo) -> i64 {
    tx.commit_ts_us.div_euclid(1000)
}

fn tx_record<'a>(schemas: bool, topic: &Arc<str>, value: &TxValue<'_>, mark: Mark) -> Record<'a> {
    Record {
        topic: topic.clone(),
        key: tx_key(schemas, value.id),
        payload: Some(converted(schemas, TX_VALUE_SCHEMA, value)),
        mark,
        change: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::values::Value;
    use crate::source::{Row, TableName};

    fn change(table: &str, op: Op, commit_lsn: u64, ordinal: u32, id: i64) -> Change {
        let row = Row(vec![("id".into(), Value::Int8(id))]);
        Change {
            table: TableName::new("public", table),
            op,
            key: row.clone(),
            before: matches!(op, Op::Update | Op::Delete).then(|| row.clone()),
            after: matches!(op, Op::Create | Op::Update).then_some(row),
            lsn: commit_lsn - 8,
            tx: TxInfo { xid: commit_lsn as u32, commit_lsn, commit_ts_us: 1_700_000_000_000_000, last_commit_lsn: 0 },
            position: Position { commit_lsn, ordinal },
            columns: None,
            unchanged_toast: Vec::new(),
        }
    }

    /// The records `plan` makes of `changes` with options `d`.
    fn plan_with<'a>(
        d: &DebeziumConfig,
        changes: &'a [Change],
        tx: &mut TxState,
        how: &Publish<'_>,
    ) -> Vec<Record<'a>> {
        let cfg = crate::config::LogConfig {
            topic_prefix: "pgf.".into(),
            debezium: d.clone(),
            ..crate::config::LogConfig::new("")
        };
        let encoder = Encoder::new(&cfg, "app");
        plan(&Layout { prefix: "pgf.", debezium: d, encoder: &encoder }, changes, tx, how, 0)
    }

    fn json(bytes: &Option<Vec<u8>>) -> serde_json::Value {
        bytes.as_deref().map(|b| serde_json::from_slice(b).unwrap()).unwrap_or_default()
    }

    #[test]
    fn a_delete_is_followed_by_its_tombstone_and_truncate_is_skipped_by_default() {
        let d = DebeziumConfig::default();
        let changes = [change("a", Op::Delete, 100, 0, 1), change("a", Op::Truncate, 100, 1, 0)];
        let records = plan_with(&d, &changes, &mut TxState::default(), &Publish::default());
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(json(&records[0].payload)["op"], "d");
        assert_eq!(records[1].payload, None, "the tombstone has no value");
        assert_eq!(records[1].key, records[0].key, "and the deleted row's key");
        assert!(records[0].key.is_some());
        assert!(records[0].mark < records[1].mark);

        let kept = DebeziumConfig { tombstones_on_delete: false, skipped_operations: "none".into(), ..d };
        let records = plan_with(&kept, &changes, &mut TxState::default(), &Publish::default());
        let ops: Vec<_> = records.iter().map(|r| json(&r.payload)["op"].clone()).collect();
        assert_eq!(ops, ["d", "t"]);
        assert_eq!(records[1].key, None, "a TRUNCATE is unkeyed");
    }

    #[test]
    fn transactions_get_begin_and_end_records_across_batches() {
        let d = DebeziumConfig { provide_transaction_metadata: true, ..DebeziumConfig::default() };
        let mut tx = TxState::default();
        // Transaction 100 spans two batches; 200 starts and ends in the second.
        let first = [change("a", Op::Create, 100, 0, 1), change("b", Op::Create, 100, 1, 2)];
        let records = plan_with(&d, &first, &mut tx, &Publish { tx_open: true, ..Publish::default() });
        let kinds: Vec<_> = records.iter().map(|r| r.mark.kind).collect();
        assert_eq!(kinds, [Kind::Begin, Kind::Change, Kind::Change], "no END while the transaction is open");
        assert_eq!(&*records[0].topic, "pgf.transaction");
        assert_eq!(json(&records[0].payload)["status"], "BEGIN");
        assert!(json(&records[0].payload)["event_count"].is_null());
        assert_eq!(json(&records[2].payload)["transaction"]["total_order"], 2);
        assert_eq!(json(&records[2].payload)["transaction"]["data_collection_order"], 1);

        let second = [change("a", Op::Create, 100, 2, 3), change("a", Op::Update, 200, 0, 3)];
        let records =
            plan_with(&d, &second, &mut tx, &Publish { commits: &[(100, 150), (200, 250)], ..Publish::default() });
        let kinds: Vec<_> = records.iter().map(|r| (r.mark.kind, r.mark.position.commit_lsn)).collect();
        assert_eq!(
            kinds,
            [(Kind::Change, 100), (Kind::End, 100), (Kind::Begin, 200), (Kind::Change, 200), (Kind::End, 200)]
        );
        let end = json(&records[1].payload);
        assert_eq!(end["status"], "END");
        assert_eq!(end["event_count"], 3);
        assert_eq!(
            end["data_collections"],
            serde_json::json!([{"data_collection": "public.a", "event_count": 2}, {"data_collection": "public.b", "event_count": 1}])
        );
        assert_eq!(json(&records[0].payload)["transaction"]["data_collection_order"], 2);
        // Debezium's ids: BEGIN and each change by their own LSN, END by the commit's end.
        assert_eq!(end["id"], "100:150");
        assert_eq!(json(&records[0].payload)["transaction"]["id"], "100:92");
        assert_eq!(json(&records[2].payload)["id"], "200:192");
        assert_eq!(json(&records[4].payload)["id"], "200:250");
        assert_eq!(tx, TxState { last_end: Some(250), ..TxState::default() }, "nothing open after the last commit");
        // Marks grow in sending order within each topic.
        for topic in ["pgf.transaction", "pgf.public.a"] {
            let marks: Vec<_> = records.iter().filter(|r| &*r.topic == topic).map(|r| r.mark).collect();
            assert!(marks.windows(2).all(|w| w[0] < w[1]), "{topic}: {marks:?}");
        }
    }

    #[test]
    fn scans_and_the_default_have_no_transaction_records() {
        let on = DebeziumConfig { provide_transaction_metadata: true, ..DebeziumConfig::default() };
        let rows = [change("a", Op::Read, 100, 0, 1)];
        let records =
            plan_with(&on, &rows, &mut TxState::default(), &Publish { origin: Some("chunk"), ..Publish::default() });
        assert_eq!(records.len(), 1);
        assert!(json(&records[0].payload)["transaction"].is_null());
        let off = DebeziumConfig::default();
        let records = plan_with(&off, &rows, &mut TxState::default(), &Publish::default());
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn with_schemas_transaction_and_heartbeat_records_carry_debeziums_schemas() {
        let d =
            DebeziumConfig { provide_transaction_metadata: true, schemas_enable: true, ..DebeziumConfig::default() };
        let changes = [change("a", Op::Create, 100, 0, 1)];
        let records =
            plan_with(&d, &changes, &mut TxState::default(), &Publish { commits: &[(100, 120)], ..Publish::default() });
        let begin = json(&records[0].payload);
        assert_eq!(begin["schema"]["name"], "io.debezium.connector.common.TransactionMetadataValue");
        assert_eq!(begin["payload"]["status"], "BEGIN");
        let key: serde_json::Value = serde_json::from_slice(records[0].key.as_deref().unwrap()).unwrap();
        assert_eq!(key["schema"]["name"], "io.debezium.connector.common.TransactionMetadataKey");
        assert_eq!(key["payload"]["id"], "100:92");
        assert_eq!(json(&records[2].payload)["payload"]["id"], "100:120");
        let (key, value) = heartbeat("pgf.", &d, 5);
        let key: serde_json::Value = serde_json::from_slice(&key).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(key["payload"], serde_json::json!({"serverName": "pgf"}));
        assert_eq!(value["schema"]["name"], "io.debezium.connector.common.Heartbeat");
        assert_eq!(value["payload"]["ts_ms"], 5);
        let (_, bare) = heartbeat("pgf.", &DebeziumConfig::default(), 5);
        assert_eq!(bare, br#"{"ts_ms":5}"#);
    }

    #[test]
    fn kinds_read_back() {
        for k in [Kind::Begin, Kind::Change, Kind::Tombstone, Kind::End] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("other"), None);
    }
}
