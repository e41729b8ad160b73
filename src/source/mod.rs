//! The source: a PostgreSQL logical replication slot read with our own
//! pgoutput decoder. `session` runs the replication connection, `pgoutput`
//! and `values` are the pure wire-format decoder, `relations` turns decoded
//! tuples into named rows, and `slot` manages the publication and slot.
//! `streamed` holds transactions the server streams before they commit.
//! `snapshot` is the initial load (and `scan` the chunked table reads it
//! shares with backfill; `copy` decodes their binary COPY data).
//! `tls` applies libpq's TLS keys (parsed out of `source.url` by
//! `config::conninfo`) to both kinds of connection.
//! `privilege` is what a least-privilege role needs and the errors that
//! name what it lacks.

pub mod copy;
pub mod pgoutput;
pub mod privilege;
pub mod relations;
pub mod scan;
pub mod session;
pub mod slot;
pub mod snapshot;
pub mod streamed;
pub mod tls;
pub mod values;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use pgwire_replication::Lsn;
use values::Value;

/// Where a change sits in the stream: its transaction's commit LSN and its
/// ordinal inside that transaction. Positions only grow in commit order, so
/// sinks use them as idempotency watermarks and ClickHouse row versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Position {
    pub commit_lsn: u64,
    pub ordinal: u32,
}

impl Position {
    /// One integer that orders exactly like the position, for every commit
    /// LSN (all 64 bits) and every ordinal: the LSN in bits 32..96 and the
    /// ordinal in bits 0..32. ClickHouse stores it as `_version UInt128`.
    /// (The earlier u64 form, `lsn << 20 | min(ordinal, 2^20 - 1)`, lost the
    /// LSN's top bits past WAL position 1000/0 and tied ordinals past 2^20.)
    pub fn version(&self) -> u128 {
        (u128::from(self.commit_lsn) << 32) | u128::from(self.ordinal)
    }

    /// The position a [`Position::version`] was made from.
    pub fn from_version(v: u128) -> Position {
        Position { commit_lsn: (v >> 32) as u64, ordinal: v as u32 }
    }

    /// The version as 24 fixed-width lowercase hex digits (commit LSN 16,
    /// ordinal 8): string order is position order, and it survives JSON,
    /// whose numbers most parsers hold as doubles (exact only to 2^53).
    /// The HTTP/Redis event `version` and Redis's progress key use it.
    pub fn sortable_hex(&self) -> String {
        format!("{:016x}{:08x}", self.commit_lsn, self.ordinal)
    }

    /// The change's id in Redis streams, HTTP batches, broker keys and the
    /// dead-letter topic: `<commit LSN>/<ordinal>`, stable across replays.
    pub fn event_id(&self) -> String {
        format!("{}/{}", Lsn(self.commit_lsn).to_pg_string(), self.ordinal)
    }

    /// The position an [`Position::event_id`] was written from.
    pub fn from_event_id(s: &str) -> Option<Position> {
        let (lsn, ordinal) = s.rsplit_once('/')?;
        Some(Position { commit_lsn: Lsn::parse(lsn).ok()?.0, ordinal: ordinal.parse().ok()? })
    }

    /// The position a [`Position::sortable_hex`] was written from.
    pub fn from_sortable_hex(s: &str) -> Option<Position> {
        if s.len() != 24 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let commit_lsn = u64::from_str_radix(&s[..16], 16).ok()?;
        let ordinal = u32::from_str_radix(&s[16..], 16).ok()?;
        Some(Position { commit_lsn, ordinal })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", Lsn(self.commit_lsn).to_pg_string(), self.ordinal)
    }
}

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "t")]
    Truncate,
    #[serde(rename = "r")]
    Read,
}

impl Op {
    /// The code, as serialized.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: Arc<str>,
    pub name: Arc<str>,
}

impl TableName {
    pub fn new(schema: &str, name: &str) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }
    pub fn is(&self, schema: &str, name: &str) -> bool {
        &*self.schema == schema && &*self.name == name
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A row as named, typed values in column order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row(pub Vec<(Arc<str>, Value)>);

impl Row {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| &**n == column).map(|(_, v)| v)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// A JSON object of the columns, in column order.
impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(n, v)| (&**n, v)))
    }
}

/// The transaction a change belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxInfo {
    pub xid: u32,
    pub commit_lsn: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// End LSN of the transaction committed before this one in the stream
    /// (the session's start position for its first), which Debezium's
    /// `source.sequence` names as the last committed LSN.
    pub last_commit_lsn: u64,
}

/// What a table's columns are beyond the values a row carries: the
/// declared type (modifier included) and nullability, which the log's
/// Debezium schema and encodings need (a `numeric(10,3)` is a Decimal of
/// scale 3, a `timestamp(3)` milliseconds, a NOT NULL column a required
/// field). Read once per relation, shared by every change of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableColumns {
    pub columns: Vec<ColumnMeta>,
    /// Indexes into `columns` of the primary key (or, without one, of the
    /// replica identity index), in key order; empty when the table has
    /// neither, where Debezium's message key is null.
    pub key: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMeta {
    pub name: Arc<str>,
    /// The base type (domains resolved).
    pub type_oid: u32,
    /// `atttypmod`: -1 when the type has none.
    pub type_modifier: i32,
    /// NULL allowed (no NOT NULL constraint).
    pub optional: bool,
    /// An enum's labels in order, comma-separated (Debezium's `allowed`).
    pub enum_labels: Option<Arc<str>>,
    /// The column's DEFAULT as the catalog prints it (`pg_get_expr`), from
    /// which Debezium's schema takes the field's default.
    pub default: Option<Arc<str>>,
}

/// One row-level change, decoded and named.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: TableName,
    pub op: Op,
    /// Primary-key (replica identity) columns, also the broker message key.
    pub key: Row,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// LSN of the change record itself (0 for snapshot rows).
    pub lsn: u64,
    pub tx: TxInfo,
    pub position: Position,
    /// The table's column types and nullability, when the source knows them.
    pub columns: Option<Arc<TableColumns>>,
    /// Columns left out of `after` because PostgreSQL did not send their
    /// value (TOASTed and unchanged) and no old row had it (DEFAULT
    /// identity; under FULL the old row's value fills it). The sinks never
    /// see them; the log writes Debezium's placeholder for them.
    pub unchanged_toast: Vec<Arc<str>>,
}

/// What the replication reader hands to the pipeline, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    Change(Box<Change>),
    /// A transaction ended; everything before `end_lsn` may be acknowledged
    /// once it is flushed everywhere.
    Commit {
        end_lsn: u64,
        tx: TxInfo,
    },
    /// No transaction is open and the server has sent everything up to
    /// `wal_end`: once the pipeline is empty, this position can be
    /// acknowledged so an idle slot does not pin WAL.
    Idle {
        wal_end: u64,
    },
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos((commit_lsn, ordinal): (u64, u32)) -> Position {
        Position { commit_lsn, ordinal }
    }

    proptest! {
        /// Versions and their hex order exactly like positions over the
        /// whole LSN and ordinal range, and each reads back as its position.
        #[test]
        fn versions_order_like_positions(a in any::<(u64, u32)>(), b in any::<(u64, u32)>()) {
            let (pa, pb) = (pos(a), pos(b));
            prop_assert_eq!(pa.version().cmp(&pb.version()), pa.cmp(&pb));
            prop_assert_eq!(pa.sortable_hex().cmp(&pb.sortable_hex()), pa.cmp(&pb));
            prop_assert_eq!(Position::from_version(pa.version()), pa);
            prop_assert_eq!(Position::from_sortable_hex(&pa.sortable_hex()), Some(pa));
            prop_assert_eq!(pa.sortable_hex(), format!("{:024x}", pa.version()));
        }
    }

    #[test]
    fn no_wrap_past_lsn_1000_0_and_no_tie_past_2_pow_20_ordinals() {
        // 1000/0 is 2^44: the old u64 form shifted it out entirely.
        let before = pos((0xFFF_FFFF_FFFF, 7));
        let after = pos((0x1000_0000_0000, 0));
        assert!(after.version() > before.version());
        assert!(pos((u64::MAX, 0)).version() > pos((u64::MAX - 1, u32::MAX)).version());
        let lsn = 0x1234_5678;
        assert!(pos((lsn, 1 << 20)).version() > pos((lsn, (1 << 20) - 1)).version());
        assert!(pos((lsn, (1 << 20) + 1)).sortable_hex() > pos((lsn, 1 << 20)).sortable_hex());
        assert_eq!(pos((0x1000_0000_0000, 3)).sortable_hex(), "0000100000000000".to_string() + "00000003");
        assert_eq!(Position::from_sortable_hex("00000000000000000000012"), None);
        assert_eq!(Position::from_sortable_hex("+0000000000000000000012a"), None);
    }
}
