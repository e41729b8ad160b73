//! The source: a PostgreSQL logical replication slot read with our own
//! pgoutput decoder. `session` runs the replication connection, `pgoutput`
//! and `values` are the pure wire-format decoder, `relations` turns decoded
//! tuples into named rows, and `slot` manages the publication and slot.
//! `streamed` holds transactions the server streams before they commit.
//! `snapshot` is the initial load (and `scan` the chunked table reads it
//! shares with backfill; `copy` decodes their binary COPY data).

pub mod copy;
pub mod pgoutput;
pub mod relations;
pub mod scan;
pub mod session;
pub mod slot;
pub mod snapshot;
pub mod streamed;
pub mod values;

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

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
    /// A single u64 that orders like the position itself: the commit LSN in
    /// the high bits and the ordinal in the low 20 bits. WAL positions stay
    /// far below 2^44 bytes (16 TiB) in practice; ordinals past 2^20 within
    /// one transaction share the last value, which is still ordered against
    /// every other transaction.
    pub fn version(&self) -> u64 {
        (self.commit_lsn << 20) | u64::from(self.ordinal.min((1 << 20) - 1))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", Lsn(self.commit_lsn).to_pg_string(), self.ordinal)
    }
}

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
