//! Reading tables, for the initial snapshot and for backfills: a plan of
//! primary-key range chunks, each read in a REPEATABLE READ transaction
//! (optionally on an exported snapshot) with `COPY (SELECT … ORDER BY key)
//! TO STDOUT (FORMAT binary)`, its rows turned into `Op::Read` changes and
//! handed on in batches, so memory stays bounded by a few batches per
//! reader. The pool of workers that delivers them is `commands::scan`.
//!
//! Positions. Every row read by a scan gets a position just below the scan's
//! consistent point `cp` (the LSN its snapshot corresponds to):
//! `commit_lsn = cp - 1 - chunk.seq`, `ordinal` = the row's key minus the
//! chunk's lower bound (integer keys; chunks are at most 2^32 - 1 keys wide,
//! so the ordinal, which `Position::version()` keeps whole, holds it) or its rank in the chunk
//! (other keys). So positions are unique per row, grow along a chunk in
//! delivery order (what a per-chunk Redis progress watermark needs), and
//! order below every change the slot streams after `cp` (all of which
//! commit at or after `cp`, so ClickHouse keeps any streamed version over
//! the scanned one). Integer-key positions depend on the key alone, so a
//! chunk re-read under another snapshot gives each row the same position.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::copy::{CopyDecoder, CopyError};
use super::slot::{self, quote_ident};
use super::values::{oid, Value};
use super::{Change, ColumnMeta, Op, Position, Row, SourceEvent, TableColumns, TableName, TxInfo};

/// Widest integer-key chunk: a row's ordinal (its key's offset in the
/// chunk) must fit `Position::ordinal`'s 32 bits, which `Position::version()`
/// keeps whole.
pub const MAX_CHUNK_WIDTH: i64 = u32::MAX as i64;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("PostgreSQL query failed ({what}): {source}")]
    Query { what: String, source: tokio_postgres::Error },
    #[error("reading {table}: {source}")]
    Copy { table: TableName, source: CopyError },
    #[error("{table}.{column}: {reason}")]
    Value { table: TableName, column: String, reason: String },
    #[error("{table}: key {key} is outside chunk {seq} ({lo}, {hi}]")]
    OutsideChunk { table: TableName, seq: u32, key: i64, lo: String, hi: String },
    #[error("{table}: the key spans more than 2^63 values; it cannot be cut into chunks")]
    KeySpan { table: TableName },
    #[error("table {0} does not exist")]
    NoSuchTable(String),
}

pub(crate) fn query_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ScanError {
    let what = what.into();
    move |source| ScanError::Query { what, source }
}

/// Quotes an SQL string literal (standard_conforming_strings is on by default).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A column as the scan reads it.
#[derive(Debug, Clone)]
pub struct ScanColumn {
    pub name: Arc<str>,
    /// The base type (domains resolved): what binary COPY sends.
    pub type_oid: u32,
    /// `format_type` of the declared type, for casting key literals.
    pub type_name: String,
}

impl ScanColumn {
    /// A type with no binary decoder here (enums, geometry, extensions…) is
    /// COPY'd as its text form, which is how it travels on (with its OID).
    fn read_as_text(&self) -> bool {
        !oid::decodes_binary(self.type_oid)
    }
}

/// How a table's key lets it be cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A single int2/int4/int8 column: fixed-width key ranges, key-derived ordinals.
    Integer(usize),
    /// A single column of another type: ranges between sampled keys, rank ordinals.
    Ordered(usize),
    /// A composite key led by an int2/int4/int8 column, such as a
    /// partitioned table's `(id, event_ts)` (its key must hold the partition
    /// key): ranges of that column as for `Integer`, rank ordinals (the
    /// column alone may repeat, so its offset could name two rows).
    IntegerPrefix(usize),
    /// Another composite key, or none: the table is one chunk.
    Whole,
}

/// A published table: its columns in attribute order and its primary key.
#[derive(Debug, Clone)]
pub struct ScanTable {
    pub name: TableName,
    pub columns: Vec<ScanColumn>,
    /// Primary-key columns (indexes into `columns`), in key order.
    pub key: Vec<usize>,
    /// The columns' declared types and nullability, for the log's encoding.
    pub meta: Arc<TableColumns>,
}

impl ScanTable {
    /// Reads the table's shape from the catalog (generated columns are left
    /// out, as pgoutput leaves them out).
    pub async fn load(client: &Client, table: &TableName) -> Result<ScanTable, ScanError> {
        let regclass = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name));
        let rows = client
            .query(
                "WITH RECURSIVE cols AS (
                   SELECT a.attnum, a.attname::text AS name, a.atttypid AS typ,
                          format_type(a.atttypid, a.atttypmod) AS type_name, a.atttypmod, a.attnotnull,
                          (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
                            WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum) AS default_expr
                   FROM pg_attribute a
                   WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                     AND a.attgenerated = ''
                 ), base(attnum, typ, depth) AS (
                   SELECT attnum, typ, 0 FROM cols
                   UNION ALL
                   SELECT b.attnum, t.typbasetype, b.depth + 1
                   FROM base b JOIN pg_type t ON t.oid = b.typ WHERE t.typtype = 'd'
                 )
                 SELECT c.name, (SELECT b.typ FROM base b WHERE b.attnum = c.attnum ORDER BY b.depth DESC LIMIT 1),
                        c.type_name,
                        (SELECT k.ord FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                          WHERE i.indrelid = $1::text::regclass AND i.indisprimary AND k.attnum = c.attnum),
                        c.atttypmod, c.attnotnull,
                        (SELECT string_agg(e.enumlabel::text, ',' ORDER BY e.enumsortorder) FROM pg_enum e
                          WHERE e.enumtypid = (SELECT b.typ FROM base b WHERE b.attnum = c.attnum
                                               ORDER BY b.depth DESC LIMIT 1)),
                        c.default_expr
                 FROM cols c ORDER BY c.attnum",
                &[&regclass],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
                    ScanError::NoSuchTable(table.to_string())
                }
                _ => ScanError::Query { what: format!("read the columns of {table}"), source: e },
            })?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut meta = Vec::with_capacity(rows.len());
        let mut key: Vec<(i64, usize)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let name: String = r.get(0);
            let type_oid: u32 = r.get(1);
            let column = ScanColumn { name: name.as_str().into(), type_oid, type_name: r.get(2) };
            meta.push(ColumnMeta {
                name: column.name.clone(),
                type_oid,
                type_modifier: r.get(4),
                optional: !r.get::<_, bool>(5),
                enum_labels: r.get::<_, Option<String>>(6).map(Into::into),
                default: r.get::<_, Option<String>>(7).map(Into::into),
            });
            columns.push(column);
            if let Some(ord) = r.get::<_, Option<i64>>(3) {
                key.push((ord, i));
            }
        }
        key.sort_unstable();
        let key: Vec<usize> = key.into_iter().map(|(_, i)| i).collect();
        let meta = Arc::new(TableColumns { columns: meta, key: key.clone() });
        Ok(ScanTable { name: table.clone(), columns, key, meta })
    }

    pub fn key_kind(&self) -> KeyKind {
        match self.key.as_slice() {
            [k] if self.is_integer(*k) => KeyKind::Integer(*k),
            [k] => KeyKind::Ordered(*k),
            [k, _, ..] if self.is_integer(*k) => KeyKind::IntegerPrefix(*k),
            _ => KeyKind::Whole,
        }
    }

    fn is_integer(&self, column: usize) -> bool {
        matches!(self.columns[column].type_oid, oid::INT2 | oid::INT4 | oid::INT8)
    }

    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.name.schema), quote_ident(&self.name.name))
    }

    fn key_list(&self) -> String {
        self.key.iter().map(|&i| quote_ident(&self.columns[i].name)).collect::<Vec<_>>().join(", ")
    }

    /// The COPY statement that reads one chunk, in key order.
    pub fn copy_sql(&self, chunk: &Chunk, filter: Option<&str>) -> String {
        let cols = self
            .columns
            .iter()
            .map(|c| match c.read_as_text() {
                true => format!("{}::text", quote_ident(&c.name)),
                false => quote_ident(&c.name),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut conds: Vec<String> = filter.map(|f| format!("({f})")).into_iter().collect();
        let bound = |k: usize, op: &str, v: &str| {
            let col = &self.columns[k];
            match self.key_kind() {
                KeyKind::Integer(_) | KeyKind::IntegerPrefix(_) => format!("{} {op} {v}", quote_ident(&col.name)),
                _ => format!("{} {op} {}::{}", quote_ident(&col.name), quote_literal(v), col.type_name),
            }
        };
        if let KeyKind::Integer(k) | KeyKind::Ordered(k) | KeyKind::IntegerPrefix(k) = self.key_kind() {
            if let Some(lo) = &chunk.lo {
                conds.push(bound(k, ">", lo));
            }
            if let Some(hi) = &chunk.hi {
                conds.push(bound(k, "<=", hi));
            }
        }
        let mut sql = format!("COPY (SELECT {cols} FROM {}", self.qualified());
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        if !self.key.is_empty() {
            sql.push_str(" ORDER BY ");
            sql.push_str(&self.key_list());
        }
        sql.push_str(") TO STDOUT (FORMAT binary)");
        sql
    }
}

/// One unit of work and of progress: a key range `(lo, hi]` of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Place in the plan, unique across its tables; spreads positions.
    pub seq: u32,
    pub table: TableName,
    /// Exclusive lower and inclusive upper key bound (text form); None = unbounded.
    pub lo: Option<String>,
    pub hi: Option<String>,
    /// Rows the plan counted (for progress; a re-read may differ).
    pub rows: u64,
}

/// The position of the `ordinal`-th row of chunk `seq` of a scan whose
/// snapshot corresponds to `consistent_point` (see the module docs).
pub fn scan_position(consistent_point: u64, seq: u32, ordinal: u32) -> Position {
    Position { commit_lsn: consistent_point.saturating_sub(1 + u64::from(seq)), ordinal }
}

/// Width of integer-key chunks: about `chunk_rows` rows each where keys are
/// dense, never wider than `MAX_CHUNK_WIDTH` keys.
pub fn chunk_width(min: i64, max: i64, count: u64, chunk_rows: u64) -> i64 {
    let span = (i128::from(max) - i128::from(min) + 1).max(1);
    let count = i128::from(count.max(1));
    let w = (span * i128::from(chunk_rows.max(1)) + count - 1) / count;
    w.clamp(1, i128::from(MAX_CHUNK_WIDTH)) as i64
}

/// Integer-key ranges `(lo, hi]` for the non-empty buckets `(bucket, rows)`,
/// bucket `b` holding keys `min + b*width ..= min + (b+1)*width - 1`. No
/// range reaches past `max`: a chunk re-read after a resume must not pick up
/// rows inserted after the snapshot with larger keys (the slot streams those).
pub fn integer_ranges(min: i64, max: i64, width: i64, buckets: &[(i64, u64)]) -> Vec<(i128, i128, u64)> {
    buckets
        .iter()
        .map(|&(b, rows)| {
            let lo = i128::from(min) - 1 + i128::from(b) * i128::from(width);
            (lo, (lo + i128::from(width)).min(i128::from(max)), rows)
        })
        .collect()
}

/// Plans the chunks of one table (rows matching `filter`, if given), under
/// whatever snapshot `client`'s transaction holds. Sequence numbers start at `first_seq`.
pub async fn plan_table(
    client: &Client,
    table: &ScanTable,
    filter: Option<&str>,
    chunk_rows: u64,
    first_seq: u32,
) -> Result<Vec<Chunk>, ScanError> {
    let chunk_rows = chunk_rows.clamp(1, MAX_CHUNK_WIDTH as u64);
    let name = &table.name;
    let and_filter = filter.map(|f| format!(" AND ({f})")).unwrap_or_default();
    let where_filter = filter.map(|f| format!(" WHERE ({f})")).unwrap_or_default();
    let mk = |i: usize, lo: Option<String>, hi: Option<String>, rows: u64| Chunk {
        seq: first_seq + i as u32,
        table: name.clone(),
        lo,
        hi,
        rows,
    };
    match table.key_kind() {
        KeyKind::Integer(k) | KeyKind::IntegerPrefix(k) => {
            let col = quote_ident(&table.columns[k].name);
            let r = client
                .query_one(
                    &format!(
                        "SELECT min({col})::int8, max({col})::int8, count(*)::int8 FROM {}{where_filter}",
                        table.qualified()
                    ),
                    &[],
                )
                .await
                .map_err(query_err(format!("measure {name}")))?;
            let (Some(min), Some(max)) = (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)) else {
                return Ok(Vec::new());
            };
            if i128::from(max) - i128::from(min) > i128::from(i64::MAX) {
                return Err(ScanError::KeySpan { table: name.clone() });
            }
            let width = chunk_width(min, max, r.get::<_, i64>(2) as u64, chunk_rows);
            let rows = client
                .query(
                    &format!(
                        "SELECT (({col}::int8 - $1::int8) / $2::int8)::int8, count(*)::int8 FROM {} \
                         WHERE {col} IS NOT NULL{and_filter} GROUP BY 1 ORDER BY 1",
                        table.qualified()
                    ),
                    &[&min, &width],
                )
                .await
                .map_err(query_err(format!("count the chunks of {name}")))?;
            let buckets: Vec<(i64, u64)> = rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect();
            Ok(integer_ranges(min, max, width, &buckets)
                .into_iter()
                .enumerate()
                .map(|(i, (lo, hi, rows))| mk(i, Some(lo.to_string()), Some(hi.to_string()), rows))
                .collect())
        }
        KeyKind::Ordered(k) => {
            let col = quote_ident(&table.columns[k].name);
            let count: i64 = client
                .query_one(&format!("SELECT count(*)::int8 FROM {}{where_filter}", table.qualified()), &[])
                .await
                .map_err(query_err(format!("count {name}")))?
                .get(0);
            if count == 0 {
                return Ok(Vec::new());
            }
            let bounds: Vec<String> = client
                .query(
                    &format!(
                        "SELECT k::text FROM (SELECT {col} AS k, row_number() OVER (ORDER BY {col}) AS rn FROM {} \
                         WHERE {col} IS NOT NULL{and_filter}) s WHERE rn % $1 = 0 AND rn < $2 ORDER BY rn",
                        table.qualified()
                    ),
                    &[&(chunk_rows as i64), &count],
                )
                .await
                .map_err(query_err(format!("sample the keys of {name}")))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut chunks = Vec::with_capacity(bounds.len() + 1);
            let mut lo = None;
            for (i, b) in bounds.iter().enumerate() {
                chunks.push(mk(i, lo.take(), Some(b.clone()), chunk_rows));
                lo = Some(b.clone());
            }
            let rest = count as u64 - chunk_rows * bounds.len() as u64;
            chunks.push(mk(bounds.len(), lo, None, rest));
            Ok(chunks)
        }
        KeyKind::Whole => {
            let count: i64 = client
                .query_one(&format!("SELECT count(*)::int8 FROM {}{where_filter}", table.qualified()), &[])
                .await
                .map_err(query_err(format!("count {name}")))?
                .get(0);
            Ok(if count == 0 { Vec::new() } else { vec![mk(0, None, None, count as u64)] })
        }
    }
}

/// What every row of a scan shares.
#[derive(Debug, Clone, Copy)]
pub struct ScanPoint {
    /// The LSN the scan's data corresponds to (see the module docs).
    pub consistent_point: u64,
    /// Commit time given to the rows (µs since the Unix epoch): taken before
    /// the consistent point, so it is no later than any change streamed after it.
    pub commit_ts_us: i64,
}

/// Reads one chunk and sends its rows as `Op::Read` changes, one event each
/// (the pipeline's batcher cuts them; a full channel pauses the COPY).
/// Returns the rows read (fewer if the receiver went away).
pub async fn read_chunk(
    client: &Client,
    table: &ScanTable,
    chunk: &Chunk,
    filter: Option<&str>,
    point: ScanPoint,
    out: &mpsc::Sender<SourceEvent>,
) -> Result<u64, ScanError> {
    let sql = table.copy_sql(chunk, filter);
    let stream = client.copy_out(sql.as_str()).await.map_err(query_err(format!("COPY {}", table.name)))?;
    futures::pin_mut!(stream);
    let mut decoder = CopyDecoder::new(table.columns.len());
    let lo: Option<i128> = match table.key_kind() {
        KeyKind::Integer(_) => chunk.lo.as_deref().and_then(|s| s.parse().ok()),
        _ => None,
    };
    let tx = TxInfo {
        xid: 0,
        commit_lsn: point.consistent_point,
        commit_ts_us: point.commit_ts_us,
        // Debezium's snapshot rows follow no commit: their sequence is
        // `[null, "<snapshot LSN>"]`.
        last_commit_lsn: 0,
    };
    let mut rank = 0u32;
    let mut rows = 0u64;
    let copy_err = |source| ScanError::Copy { table: table.name.clone(), source };
    while let Some(data) = stream.next().await {
        let data = data.map_err(query_err(format!("COPY {}", table.name)))?;
        decoder.push(&data);
        while let Some(tuple) = decoder.next_tuple().map_err(copy_err)? {
            let mut values = Vec::with_capacity(tuple.len());
            for (col, cell) in table.columns.iter().zip(tuple) {
                let v = match cell {
                    None => Value::Null,
                    Some(b) if col.read_as_text() => {
                        Value::from_text(col.type_oid, &b).map_err(|e| ScanError::Value {
                            table: table.name.clone(),
                            column: col.name.to_string(),
                            reason: e.to_string(),
                        })?
                    }
                    Some(b) => Value::from_binary(col.type_oid, &b).map_err(|e| ScanError::Value {
                        table: table.name.clone(),
                        column: col.name.to_string(),
                        reason: e.to_string(),
                    })?,
                };
                values.push((col.name.clone(), v));
            }
            rank = rank.saturating_add(1);
            let ordinal = match (table.key_kind(), lo) {
                (KeyKind::Integer(k), Some(lo)) => {
                    let key = values[k].1.as_i64().unwrap_or_default();
                    let off = i128::from(key) - lo;
                    if !(1..=i128::from(MAX_CHUNK_WIDTH)).contains(&off) {
                        return Err(ScanError::OutsideChunk {
                            table: table.name.clone(),
                            seq: chunk.seq,
                            key,
                            lo: chunk.lo.clone().unwrap_or_default(),
                            hi: chunk.hi.clone().unwrap_or_default(),
                        });
                    }
                    off as u32
                }
                _ => rank,
            };
            let key = Row(table.key.iter().map(|&i| values[i].clone()).collect());
            let change = Change {
                table: table.name.clone(),
                op: Op::Read,
                key,
                before: None,
                after: Some(Row(values)),
                lsn: 0,
                tx,
                position: scan_position(point.consistent_point, chunk.seq, ordinal),
                columns: Some(table.meta.clone()),
                unchanged_toast: Vec::new(),
            };
            if out.send(SourceEvent::Change(Box::new(change))).await.is_err() {
                return Ok(rows);
            }
            rows += 1;
        }
    }
    decoder.finish().map_err(copy_err)?;
    Ok(rows)
}

/// Opens the REPEATABLE READ, READ ONLY transaction a scan reads in, on the
/// exported `snapshot` if given (else the first query takes a new one).
pub async fn begin(client: &Client, snapshot: Option<&str>) -> Result<(), ScanError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(query_err("begin the scan transaction"))?;
    if let Some(name) = snapshot {
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))
            .await
            .map_err(query_err("import the exported snapshot"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn widths() {
        // Dense keys: about chunk_rows keys per chunk.
        assert_eq!(chunk_width(1, 1_000_000, 1_000_000, 20_000), 20_000);
        // Sparse keys: wider ranges, never past what a u32 ordinal holds.
        assert_eq!(chunk_width(1, 10_000_000, 1_000, 20_000), 200_000_000);
        assert_eq!(chunk_width(1, 10_000_000_000_000, 1_000, 20_000), MAX_CHUNK_WIDTH);
        assert_eq!(chunk_width(5, 5, 1, 20_000), 20_000);
        assert_eq!(chunk_width(1, 100, 100, 0), 1);
        assert_eq!(chunk_width(i64::MIN, i64::MAX, 10, 1), MAX_CHUNK_WIDTH);
    }

    #[test]
    fn ranges_cover_buckets_and_stop_at_max() {
        let r = integer_ranges(10, 95, 20, &[(0, 20), (2, 5), (4, 3)]);
        assert_eq!(r, vec![(9, 29, 20), (49, 69, 5), (89, 95, 3)]);
    }

    #[test]
    fn copy_sql_bounds_and_order() {
        let t = ScanTable {
            name: TableName::new("public", "engagement_events"),
            columns: vec![
                ScanColumn { name: "id".into(), type_oid: oid::INT8, type_name: "bigint".into() },
                ScanColumn { name: "event_ts".into(), type_oid: oid::TIMESTAMPTZ, type_name: "timestamptz".into() },
            ],
            key: vec![0],
            meta: Default::default(),
        };
        let c = Chunk { seq: 3, table: t.name.clone(), lo: Some("100".into()), hi: Some("200".into()), rows: 7 };
        assert_eq!(
            t.copy_sql(&c, Some("event_ts >= '2026-01-01'")),
            "COPY (SELECT \"id\", \"event_ts\" FROM \"public\".\"engagement_events\" WHERE (event_ts >= '2026-01-01') \
             AND \"id\" > 100 AND \"id\" <= 200 ORDER BY \"id\") TO STDOUT (FORMAT binary)"
        );
        let u = ScanTable {
            key: vec![1],
            meta: Default::default(),
            columns: vec![
                ScanColumn { name: "v".into(), type_oid: oid::TEXT, type_name: "text".into() },
                ScanColumn { name: "k".into(), type_oid: oid::UUID, type_name: "uuid".into() },
            ],
            ..t
        };
        let c = Chunk { lo: None, hi: Some("o'k".into()), ..c };
        assert!(u.copy_sql(&c, None).contains("WHERE \"k\" <= 'o''k'::uuid ORDER BY \"k\""));
        // No binary decoder for point: its text form is read instead.
        let p = ScanTable {
            columns: vec![
                ScanColumn { name: "k".into(), type_oid: oid::INT4, type_name: "integer".into() },
                ScanColumn { name: "p".into(), type_oid: 600, type_name: "point".into() },
            ],
            key: vec![0],
            meta: Default::default(),
            ..u
        };
        assert!(p.copy_sql(&c, None).starts_with("COPY (SELECT \"k\", \"p\"::text FROM"), "{}", p.copy_sql(&c, None));
    }

    #[test]
    fn a_composite_key_led_by_an_integer_is_cut_on_that_column() {
        // A table partitioned by event_ts: its key must hold the partition key.
        let t = ScanTable {
            name: TableName::new("public", "engagement_events"),
            columns: vec![
                ScanColumn { name: "id".into(), type_oid: oid::INT8, type_name: "bigint".into() },
                ScanColumn { name: "event_ts".into(), type_oid: oid::TIMESTAMPTZ, type_name: "timestamptz".into() },
            ],
            key: vec![0, 1],
            meta: Default::default(),
        };
        assert_eq!(t.key_kind(), KeyKind::IntegerPrefix(0));
        let c = Chunk { seq: 0, table: t.name.clone(), lo: Some("100".into()), hi: Some("200".into()), rows: 7 };
        assert!(
            t.copy_sql(&c, None).ends_with(
                "WHERE \"id\" > 100 AND \"id\" <= 200 ORDER BY \"id\", \"event_ts\") TO STDOUT (FORMAT binary)"
            ),
            "{}",
            t.copy_sql(&c, None)
        );
        // Led by another type: the table is one chunk.
        let u = ScanTable { key: vec![1, 0], ..t };
        assert_eq!(u.key_kind(), KeyKind::Whole);
        assert!(u
            .copy_sql(&Chunk { lo: None, hi: None, ..c }, None)
            .ends_with("ORDER BY \"event_ts\", \"id\") TO STDOUT (FORMAT binary)"));
    }

    proptest! {
        /// Scan rows order below every streamed change (commit_lsn >= cp),
        /// and along a chunk their versions grow with the ordinal.
        #[test]
        fn scan_positions_sort_below_the_consistent_point(
            cp in (1u64 << 24)..(1u64 << 40),
            seq in 0u32..100_000,
            a in 1u32..=(MAX_CHUNK_WIDTH as u32),
            b in 1u32..=(MAX_CHUNK_WIDTH as u32),
            streamed_ordinal in 0u32..u32::MAX,
        ) {
            let streamed = Position { commit_lsn: cp, ordinal: streamed_ordinal };
            let pa = scan_position(cp, seq, a);
            prop_assert!(pa.version() < streamed.version());
            prop_assert!(pa < streamed);
            let pb = scan_position(cp, seq, b);
            prop_assert_eq!(a.cmp(&b), pa.version().cmp(&pb.version()));
            prop_assert!(scan_position(cp, seq + 1, b) != pa);
        }
    }
}
