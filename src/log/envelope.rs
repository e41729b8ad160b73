//! The log's records: the key and value of Debezium's PostgreSQL connector
//! through Kafka Connect's JSON converter, so Debezium consumers (Flink's
//! `debezium-json`, Kafka Connect sinks, …) read them unchanged.
//!
//! Value: `{before, after, source, transaction, op, ts_ms, ts_us, ts_ns}`,
//! key: the primary key's columns; with `schemas.enable` each is
//! `{"schema": …, "payload": …}`. The column encodings are in
//! [`super::debezium`]. pgfanout's own position travels in the record's
//! `pgfanout.position` header, outside Debezium's value.
//!
//! The per-relation part (which columns, how each is encoded, the schema
//! text) is worked out once per relation and cached; a change is then
//! written straight into bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;

use super::debezium::{self, json_string, Kind};
use crate::config::{DebeziumConfig, LogConfig};
use crate::source::values::{oid, Value};
use crate::source::{Change, ColumnMeta, Op, Position, Row, TableColumns, TxInfo};

/// The record header that carries the change's position.
pub const POSITION_HEADER: &str = "pgfanout.position";

/// Debezium's `transaction` block of a change (written when the lead's
/// transaction metadata is on; `null` otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionBlock {
    pub id: String,
    pub total_order: u64,
    pub data_collection_order: u64,
}

/// Debezium's transaction id for the PostgreSQL connector: `<txId>:<lsn>`,
/// where the LSN is the last one it has seen (the BEGIN's for the BEGIN
/// record, the change's own for a change's `transaction` block).
pub fn transaction_id(tx: &TxInfo, lsn: u64) -> String {
    format!("{}:{lsn}", tx.xid)
}

/// The `pgfanout.position` header: `<commit LSN>/<ordinal>` as decimal
/// numbers (so it sorts numerically field by field).
pub fn position_header(p: &Position) -> String {
    format!("{}/{}", p.commit_lsn, p.ordinal)
}

/// The position a [`position_header`] was written from.
pub fn parse_position_header(s: &str) -> Option<Position> {
    let (lsn, ordinal) = s.split_once('/')?;
    Some(Position { commit_lsn: lsn.parse().ok()?, ordinal: ordinal.parse().ok()? })
}

/// The topic a table's changes go to: `<prefix><schema>.<table>`.
pub fn topic(prefix: &str, change: &Change) -> String {
    format!("{prefix}{}.{}", change.table.schema, change.table.name)
}

/// One relation's encoding: the columns Debezium writes, how, and the
/// schema texts.
#[derive(Debug)]
struct Plan {
    /// The columns Debezium writes, in order, with their encodings.
    columns: Vec<Field>,
    key: Vec<Field>,
    /// Key schema (`None` for a table without a key: Debezium's key is null).
    key_schema: Option<String>,
    envelope_schema: String,
    /// `"schema":"…","table":"…"` of the source block, escaped once.
    source_table: String,
}

type Plans = HashMap<usize, (Arc<TableColumns>, Arc<Plan>)>;

/// A column as Debezium writes it.
#[derive(Debug)]
struct Field {
    name: Arc<str>,
    /// `"<name>":`, escaped once.
    label: Box<[u8]>,
    kind: Kind,
    /// For a NOT NULL column, what a NULL in it is written as (see
    /// [`debezium::fallback_json`]).
    if_null: Option<String>,
}

/// Writes changes as Debezium's records for one configuration.
pub struct Encoder {
    cfg: DebeziumConfig,
    /// The topic prefix without its trailing dot: Debezium's `topic.prefix`
    /// and `source.name`.
    name: String,
    /// `{"version":…,"connector":"postgresql","name":…`, escaped once.
    source_head: String,
    database_json: String,
    source_schema: String,
    /// By the address of the relation's `TableColumns`, which the entry
    /// keeps alive (so the address is not reused while cached).
    plans: Mutex<Plans>,
}

impl Encoder {
    pub fn new(cfg: &LogConfig, database: &str) -> Encoder {
        let name = cfg.topic_prefix.strip_suffix('.').unwrap_or(&cfg.topic_prefix).to_string();
        let version = format!("pgfanout-{}", env!("CARGO_PKG_VERSION"));
        Encoder {
            cfg: cfg.debezium.clone(),
            source_head: format!(
                r#"{{"version":{},"connector":"postgresql","name":{}"#,
                json_string(&version),
                json_string(&name)
            ),
            name,
            database_json: json_string(database),
            source_schema: source_schema(),
            plans: Mutex::new(HashMap::new()),
        }
    }

    fn plan(&self, change: &Change) -> Arc<Plan> {
        let Some(columns) = &change.columns else {
            // A change made without the source's catalog (tests, tools):
            // the columns as its values say, all optional.
            return Arc::new(self.make_plan(change, &inferred_columns(change)));
        };
        let at = Arc::as_ptr(columns) as usize;
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = plans.get(&at) {
            return p.clone();
        }
        let plan = Arc::new(self.make_plan(change, columns));
        // A relation learnt again (after DDL, or in a new session) replaces
        // its columns: forget the plans no change refers to any more.
        plans.retain(|_, (cols, _)| Arc::strong_count(cols) > 1);
        plans.insert(at, (columns.clone(), plan.clone()));
        plan
    }

    fn make_plan(&self, change: &Change, table: &TableColumns) -> Plan {
        let kinds: Vec<Option<Kind>> = table.columns.iter().map(|c| Kind::of(c, &self.cfg)).collect();
        let fields = |idx: &mut dyn Iterator<Item = usize>| -> (Vec<Field>, Vec<String>) {
            let mut cols = Vec::new();
            let mut schemas = Vec::new();
            for i in idx {
                if let (Some(meta), Some(Some(kind))) = (table.columns.get(i), kinds.get(i)) {
                    let default = debezium::default_value(meta, kind).map(|v| {
                        let mut out = Vec::new();
                        debezium::write_value(&mut out, kind, &v);
                        String::from_utf8_lossy(&out).into_owned()
                    });
                    schemas.push(kind.schema_json_with_default(meta.optional, default.as_deref(), Some(&meta.name)));
                    let if_null = (!meta.optional).then(|| default.unwrap_or_else(|| debezium::fallback_json(kind)));
                    let label = format!("{}:", json_string(&meta.name)).into_bytes().into_boxed_slice();
                    cols.push(Field { name: meta.name.clone(), label, kind: kind.clone(), if_null });
                }
            }
            (cols, schemas)
        };
        let (columns, value_fields) = fields(&mut (0..table.columns.len()));
        let (key, key_fields) = fields(&mut table.key.iter().copied());
        let base = format!("{}.{}.{}", self.name, change.table.schema, change.table.name);
        let value_schema = |field: &str| {
            format!(
                r#"{{"type":"struct","fields":[{}],"optional":true,"name":{},"field":"{field}"}}"#,
                value_fields.join(","),
                json_string(&format!("{base}.Value"))
            )
        };
        let envelope_schema = format!(
            r#"{{"type":"struct","fields":[{},{},{},{},{{"type":"string","optional":false,"field":"op"}},{{"type":"int64","optional":true,"field":"ts_ms"}},{{"type":"int64","optional":true,"field":"ts_us"}},{{"type":"int64","optional":true,"field":"ts_ns"}}],"optional":false,"name":{},"version":2}}"#,
            value_schema("before"),
            value_schema("after"),
            self.source_schema,
            TRANSACTION_SCHEMA,
            json_string(&format!("{base}.Envelope")),
        );
        let key_schema = (!key.is_empty()).then(|| {
            format!(
                r#"{{"type":"struct","fields":[{}],"optional":false,"name":{}}}"#,
                key_fields.join(","),
                json_string(&format!("{base}.Key"))
            )
        });
        let source_table =
            format!(r#""schema":{},"table":{}"#, json_string(&change.table.schema), json_string(&change.table.name));
        Plan { columns, key, key_schema, envelope_schema, source_table }
    }

    /// The record key: the primary key's columns (`None`, a null key, for a
    /// table without one and for a TRUNCATE, as Debezium).
    pub fn key(&self, change: &Change) -> Option<Vec<u8>> {
        if change.op == Op::Truncate {
            return None;
        }
        let plan = self.plan(change);
        let schema = plan.key_schema.as_ref()?;
        let mut out = Vec::with_capacity(64);
        if self.cfg.schemas_enable {
            out.extend_from_slice(b"{\"schema\":");
            out.extend_from_slice(schema.as_bytes());
            out.extend_from_slice(b",\"payload\":");
        }
        out.push(b'{');
        for (i, f) in plan.key.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&f.label);
            debezium::write_value(&mut out, &f.kind, change.key.get(&f.name).unwrap_or(&Value::Null));
        }
        out.push(b'}');
        if self.cfg.schemas_enable {
            out.push(b'}');
        }
        Some(out)
    }

    /// The record value, `now_us` being the processing time (the
    /// envelope's `ts_ms`, `ts_us`, `ts_ns`).
    pub fn envelope(&self, change: &Change, now_us: i64, transaction: Option<&TransactionBlock>) -> Vec<u8> {
        let plan = self.plan(change);
        // Sized for a typical row up front: growing from a small buffer
        // copied every envelope three or four times.
        let mut out =
            Vec::with_capacity(if self.cfg.schemas_enable { 1024 + plan.envelope_schema.len() } else { 1024 });
        if self.cfg.schemas_enable {
            out.extend_from_slice(b"{\"schema\":");
            out.extend_from_slice(plan.envelope_schema.as_bytes());
            out.extend_from_slice(b",\"payload\":");
        }
        self.payload(&mut out, &plan, change, now_us, transaction);
        if self.cfg.schemas_enable {
            out.push(b'}');
        }
        out
    }

    /// The value without the schema, as a JSON tree: for the dead-letter
    /// topic, whose records name the change in Debezium's form.
    pub fn value(&self, change: &Change, now_us: i64) -> Json {
        let plan = self.plan(change);
        let mut out = Vec::with_capacity(1024);
        self.payload(&mut out, &plan, change, now_us, None);
        serde_json::from_slice(&out).unwrap_or_default()
    }

    fn payload(&self, out: &mut Vec<u8>, plan: &Plan, c: &Change, now_us: i64, tx: Option<&TransactionBlock>) {
        out.extend_from_slice(b"{\"before\":");
        self.row(out, plan, c.before.as_ref(), &[]);
        out.extend_from_slice(b",\"after\":");
        self.row(out, plan, c.after.as_ref(), &c.unchanged_toast);
        out.extend_from_slice(b",\"source\":");
        self.source(out, plan, c);
        out.extend_from_slice(b",\"transaction\":");
        match tx {
            None => out.extend_from_slice(b"null"),
            Some(t) => {
                out.extend_from_slice(b"{\"id\":");
                out.extend_from_slice(json_string(&t.id).as_bytes());
                push(
                    out,
                    format_args!(
                        ",\"total_order\":{},\"data_collection_order\":{}}}",
                        t.total_order, t.data_collection_order
                    ),
                );
            }
        }
        push(
            out,
            format_args!(
                ",\"op\":\"{}\",\"ts_ms\":{},\"ts_us\":{},\"ts_ns\":{}}}",
                c.op.code(),
                now_us.div_euclid(1000),
                now_us,
                now_us.saturating_mul(1000)
            ),
        );
    }

    fn row(&self, out: &mut Vec<u8>, plan: &Plan, row: Option<&Row>, unchanged: &[Arc<str>]) {
        let Some(row) = row else {
            out.extend_from_slice(b"null");
            return;
        };
        out.push(b'{');
        // The row's cells are in column order, some possibly missing
        // (unchanged TOAST without a value): a cursor finds each in one pass.
        let cells = &row.0;
        let mut next = 0;
        for (i, f) in plan.columns.iter().enumerate() {
            let name = &f.name;
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&f.label);
            let found = cells.get(next..).and_then(|rest| rest.iter().position(|(n, _)| n == name));
            let value = found.map(|k| {
                next += k + 1;
                &cells[next - 1].1
            });
            match (value.unwrap_or(&Value::Null), &f.if_null) {
                _ if unchanged.iter().any(|u| u == name) => {
                    debezium::write_placeholder(out, &f.kind, &self.cfg.unavailable_value_placeholder)
                }
                (Value::Null, Some(if_null)) => out.extend_from_slice(if_null.as_bytes()),
                (v, _) => debezium::write_value(out, &f.kind, v),
            }
        }
        out.push(b'}');
    }

    fn source(&self, out: &mut Vec<u8>, plan: &Plan, c: &Change) {
        let snapshot = c.op == Op::Read;
        // Snapshot rows carry no record LSN: the snapshot's position.
        let lsn = if c.lsn == 0 { c.tx.commit_lsn } else { c.lsn };
        let ts_us = c.tx.commit_ts_us;
        out.extend_from_slice(self.source_head.as_bytes());
        push(
            out,
            format_args!(
                ",\"ts_ms\":{},\"snapshot\":\"{}\",\"db\":",
                ts_us.div_euclid(1000),
                if snapshot { "true" } else { "false" }
            ),
        );
        out.extend_from_slice(self.database_json.as_bytes());
        // `["<last commit>","<lsn>"]` as a string; the last commit is null
        // before the first one (a slot read from its start).
        let last_commit = match c.tx.last_commit_lsn {
            0 => "null".to_string(),
            n => format!("\\\"{n}\\\""),
        };
        push(
            out,
            format_args!(
                ",\"sequence\":\"[{last_commit},\\\"{lsn}\\\"]\",\"ts_us\":{ts_us},\"ts_ns\":{},",
                ts_us.saturating_mul(1000)
            ),
        );
        out.extend_from_slice(plan.source_table.as_bytes());
        out.extend_from_slice(b",\"txId\":");
        if c.tx.xid == 0 {
            out.extend_from_slice(b"null");
        } else {
            push(out, format_args!("{}", c.tx.xid));
        }
        push(out, format_args!(",\"lsn\":{lsn},\"xmin\":null,\"origin\":null,\"origin_lsn\":null}}"));
    }
}

fn push(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = out.write_fmt(args);
}

/// `io.debezium.connector.postgresql.Source`, as Debezium 3.6 declares it.
fn source_schema() -> String {
    let f =
        |ty: &str, optional: bool, name: &str| format!(r#"{{"type":"{ty}","optional":{optional},"field":"{name}"}}"#);
    let fields = [
        f("string", false, "version"),
        f("string", false, "connector"),
        f("string", false, "name"),
        f("int64", false, "ts_ms"),
        r#"{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},"default":"false","field":"snapshot"}"#.to_string(),
        f("string", false, "db"),
        f("string", true, "sequence"),
        f("int64", true, "ts_us"),
        f("int64", true, "ts_ns"),
        f("string", false, "schema"),
        f("string", false, "table"),
        f("int64", true, "txId"),
        f("int64", true, "lsn"),
        f("int64", true, "xmin"),
        f("string", true, "origin"),
        f("int64", true, "origin_lsn"),
    ];
    format!(
        r#"{{"type":"struct","fields":[{}],"optional":false,"name":"io.debezium.connector.postgresql.Source","version":1,"field":"source"}}"#,
        fields.join(",")
    )
}

const TRANSACTION_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"}"#;

/// The columns of a change that came without its relation's catalog, as
/// its values say (every column optional, the key as the change names it).
fn inferred_columns(change: &Change) -> TableColumns {
    let row = change.after.as_ref().or(change.before.as_ref()).cloned().unwrap_or_default();
    let columns: Vec<ColumnMeta> = row
        .0
        .iter()
        .map(|(name, v)| ColumnMeta {
            name: name.clone(),
            type_oid: value_oid(v),
            type_modifier: -1,
            optional: true,
            enum_labels: None,
            default: None,
        })
        .collect();
    let key = change.key.0.iter().filter_map(|(n, _)| columns.iter().position(|c| &c.name == n)).collect();
    TableColumns { columns, key }
}

fn value_oid(v: &Value) -> u32 {
    match v {
        Value::Bool(_) => oid::BOOL,
        Value::Int2(_) => oid::INT2,
        Value::Int4(_) => oid::INT4,
        Value::Int8(_) => oid::INT8,
        Value::Float4(_) => oid::FLOAT4,
        Value::Float8(_) => oid::FLOAT8,
        Value::Numeric(_) => oid::NUMERIC,
        Value::Uuid(_) => oid::UUID,
        Value::Date(_) => oid::DATE,
        Value::Time(_) => oid::TIME,
        Value::TimeTz { .. } => oid::TIMETZ,
        Value::Timestamp(_) => oid::TIMESTAMP,
        Value::TimestampTz(_) => oid::TIMESTAMPTZ,
        Value::Infinity { oid, .. } => *oid,
        Value::Interval { .. } => oid::INTERVAL,
        Value::Json { .. } => oid::JSONB,
        Value::Bytea(_) => oid::BYTEA,
        Value::Inet(_) => oid::INET,
        Value::Cidr(_) => oid::CIDR,
        Value::Array { elem_oid, .. } => array_of(*elem_oid),
        Value::Null | Value::Text(_) | Value::Unknown { .. } => oid::TEXT,
    }
}

fn array_of(elem: u32) -> u32 {
    [
        1000, 1001, 1003, 1005, 1007, 1016, 1009, 1015, 1014, 1021, 1022, 1231, 2951, 1182, 1183, 1115, 1185, 1187,
        1270, 3807, 199, 1041, 651,
    ]
    .into_iter()
    .find(|&a| oid::array_element(a) == Some(elem))
    .unwrap_or(1009)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Op, Position, Row, TableName, TxInfo};

    fn log_config(schemas: bool) -> LogConfig {
        LogConfig { debezium: DebeziumConfig { schemas_enable: schemas, ..Default::default() }, ..LogConfig::new("") }
    }

    fn meta(name: &str, type_oid: u32, type_modifier: i32, optional: bool) -> ColumnMeta {
        ColumnMeta { name: name.into(), type_oid, type_modifier, optional, enum_labels: None, default: None }
    }

    fn change() -> Change {
        let columns = TableColumns {
            columns: vec![
                meta("id", oid::INT8, -1, false),
                meta("body", oid::TEXT, -1, true),
                meta("amount", oid::NUMERIC, ((10 << 16) | 3) + 4, true),
                meta("at", 600, -1, true),
            ],
            key: vec![0],
        };
        // `body` is unchanged TOAST, not sent (DEFAULT identity): left out of the row.
        let row = Row(vec![
            ("id".into(), Value::Int8(7)),
            ("amount".into(), Value::Numeric("12.340".into())),
            ("at".into(), Value::Unknown { oid: 600, text: "(1,2)".into() }),
        ]);
        Change {
            table: TableName::new("public", "engagement_events"),
            op: Op::Update,
            key: Row(vec![("id".into(), Value::Int8(7))]),
            before: None,
            after: Some(row),
            lsn: 42,
            tx: TxInfo { xid: 9, commit_lsn: 0x1_0000_0010, commit_ts_us: 1_700_000_000_123_456, last_commit_lsn: 40 },
            position: Position { commit_lsn: 0x1_0000_0010, ordinal: 3 },
            columns: Some(Arc::new(columns)),
            unchanged_toast: vec!["body".into()],
        }
    }

    #[test]
    fn debezium_value_and_key() {
        let e = Encoder::new(&log_config(false), "app");
        let c = change();
        let v: Json = serde_json::from_slice(&e.envelope(&c, 5_000_123, None)).unwrap();
        let want = serde_json::json!({
            "before": null,
            "after": {"id": 7, "body": "__debezium_unavailable_value", "amount": "MDQ="},
            "source": {
                "version": format!("pgfanout-{}", env!("CARGO_PKG_VERSION")),
                "connector": "postgresql", "name": "pgfanout",
                "ts_ms": 1_700_000_000_123i64, "snapshot": "false", "db": "app",
                "sequence": "[\"40\",\"42\"]",
                "ts_us": 1_700_000_000_123_456i64, "ts_ns": 1_700_000_000_123_456_000i64,
                "schema": "public", "table": "engagement_events",
                "txId": 9, "lsn": 42, "xmin": null, "origin": null, "origin_lsn": null
            },
            "transaction": null,
            "op": "u", "ts_ms": 5000, "ts_us": 5_000_123, "ts_ns": 5_000_123_000i64
        });
        assert_eq!(v, want);
        assert_eq!(e.key(&c).unwrap(), br#"{"id":7}"#);
        assert_eq!(topic("pgfanout.", &c), "pgfanout.public.engagement_events");
        assert_eq!(position_header(&c.position), "4294967312/3");
        assert_eq!(parse_position_header("4294967312/3"), Some(c.position));
        assert_eq!(parse_position_header("0/16B3F20/3"), None);
        assert_eq!(transaction_id(&c.tx, 42), "9:42");
        assert_eq!(e.value(&c, 5_000_123), want, "the dead-letter form is the value");

        let block = TransactionBlock { id: "9:42".into(), total_order: 3, data_collection_order: 2 };
        let v: Json = serde_json::from_slice(&e.envelope(&c, 0, Some(&block))).unwrap();
        assert_eq!(v["transaction"], serde_json::json!({"id": "9:42", "total_order": 3, "data_collection_order": 2}));

        // A snapshot row: snapshot "true", the snapshot's LSN, no txId.
        let mut r = change();
        r.op = Op::Read;
        r.lsn = 0;
        r.tx.xid = 0;
        r.tx.last_commit_lsn = 0;
        r.unchanged_toast.clear();
        let v: Json = serde_json::from_slice(&e.envelope(&r, 0, None)).unwrap();
        assert_eq!(v["op"], "r");
        assert_eq!(v["source"]["snapshot"], "true");
        assert_eq!(v["source"]["lsn"], 0x1_0000_0010u64);
        assert_eq!(v["source"]["sequence"], "[null,\"4294967312\"]");
        assert!(v["source"]["txId"].is_null());
        assert!(v["after"]["body"].is_null());

        // The first transaction read from a new slot follows no commit.
        let mut first = change();
        first.tx.last_commit_lsn = 0;
        let v: Json = serde_json::from_slice(&e.envelope(&first, 0, None)).unwrap();
        assert_eq!(v["source"]["sequence"], "[null,\"42\"]");

        // A TRUNCATE has a null key.
        let mut t = change();
        t.op = Op::Truncate;
        assert_eq!(e.key(&t), None);
    }

    #[test]
    fn schemas_enable_wraps_key_and_value() {
        let e = Encoder::new(&log_config(true), "app");
        let c = change();
        let v: Json = serde_json::from_slice(&e.envelope(&c, 0, None)).unwrap();
        let schema = &v["schema"];
        assert_eq!(schema["name"], "pgfanout.public.engagement_events.Envelope");
        assert_eq!(schema["version"], 2);
        let names: Vec<&str> =
            schema["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        assert_eq!(names, ["before", "after", "source", "transaction", "op", "ts_ms", "ts_us", "ts_ns"]);
        let after = &schema["fields"][1];
        assert_eq!(after["name"], "pgfanout.public.engagement_events.Value");
        assert_eq!(after["optional"], true);
        let cols: Vec<&str> =
            after["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        assert_eq!(cols, ["id", "body", "amount"], "point is left out, as Debezium does");
        assert_eq!(after["fields"][0], serde_json::json!({"type": "int64", "optional": false, "field": "id"}));
        assert_eq!(
            after["fields"][2]["parameters"],
            serde_json::json!({"scale": "3", "connect.decimal.precision": "10"})
        );
        assert_eq!(schema["fields"][2]["name"], "io.debezium.connector.postgresql.Source");
        assert_eq!(schema["fields"][2]["fields"][4]["default"], "false");
        assert_eq!(schema["fields"][3]["name"], "event.block");
        assert_eq!(v["payload"]["after"]["amount"], "MDQ=");

        let k: Json = serde_json::from_slice(&e.key(&c).unwrap()).unwrap();
        assert_eq!(
            k,
            serde_json::json!({
                "schema": {"type": "struct", "fields": [{"type": "int64", "optional": false, "field": "id"}],
                           "optional": false, "name": "pgfanout.public.engagement_events.Key"},
                "payload": {"id": 7}
            })
        );
    }

    /// The old row of a DELETE under DEFAULT identity has only the key:
    /// Debezium writes a NOT NULL column's NULL as its default, else as the
    /// type's zero, and the schema carries the default.
    #[test]
    fn not_null_columns_of_a_key_only_old_row_and_defaults() {
        let e = Encoder::new(&log_config(true), "app");
        let columns = TableColumns {
            columns: vec![
                ColumnMeta {
                    default: Some("nextval('t_id_seq'::regclass)".into()),
                    ..meta("id", oid::INT8, -1, false)
                },
                meta("at", oid::TIMESTAMPTZ, -1, false),
                ColumnMeta { default: Some("'new'::text".into()), ..meta("state", oid::TEXT, -1, false) },
                meta("note", oid::TEXT, -1, true),
            ],
            key: vec![0],
        };
        let old = Row(vec![
            ("id".into(), Value::Int8(3)),
            ("at".into(), Value::Null),
            ("state".into(), Value::Null),
            ("note".into(), Value::Null),
        ]);
        let c = Change { op: Op::Delete, before: Some(old), after: None, columns: Some(Arc::new(columns)), ..change() };
        let v: Json = serde_json::from_slice(&e.envelope(&c, 0, None)).unwrap();
        assert_eq!(
            v["payload"]["before"],
            serde_json::json!({"id": 3, "at": "1970-01-01T00:00:00Z", "state": "new", "note": null})
        );
        let fields = &v["schema"]["fields"][0]["fields"];
        assert_eq!(fields[0], serde_json::json!({"type": "int64", "optional": false, "default": 0, "field": "id"}));
        assert_eq!(fields[2]["default"], "new");
        assert!(fields[3].get("default").is_none());
        let k: Json = serde_json::from_slice(&e.key(&c).unwrap()).unwrap();
        assert_eq!(k["schema"]["fields"][0]["default"], 0, "the key's field has the default too");
    }

    /// Plans of relations no change refers to any more are dropped, so
    /// sessions that learn every relation again do not grow the cache.
    #[test]
    fn plans_of_forgotten_relations_are_dropped() {
        let e = Encoder::new(&log_config(false), "app");
        for _ in 0..5 {
            let c = change();
            e.envelope(&c, 0, None);
        }
        let kept = e.plans.lock().unwrap().len();
        assert_eq!(kept, 1, "only the last relation's plan is kept");
        let c = change();
        let again = change();
        e.envelope(&c, 0, None);
        e.envelope(&again, 0, None);
        assert_eq!(e.plans.lock().unwrap().len(), 2, "relations still in use keep theirs");
    }

    #[test]
    fn changes_without_a_catalog_infer_their_columns() {
        let e = Encoder::new(&log_config(false), "app");
        let mut c = change();
        c.columns = None;
        c.unchanged_toast.clear();
        let v: Json = serde_json::from_slice(&e.envelope(&c, 0, None)).unwrap();
        assert_eq!(v["after"]["id"], 7);
        assert_eq!(v["after"]["amount"], serde_json::json!({"scale": 2, "value": "BNI="}));
        assert_eq!(e.key(&c).unwrap(), br#"{"id":7}"#);
    }
}
