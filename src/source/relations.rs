//! Turns decoded pgoutput tuples into named, typed rows using the Relation
//! messages the server sends before a table's first change in each session,
//! and picks each change's key: the table's primary key, read from the
//! catalog when the session starts (see `primary_keys`) and again when a
//! relation is sent a second time (after DDL, which may have changed it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::Client;

use super::pgoutput::{Cell, OldTuple, Relation, Tuple};
use super::values::{oid, Value};
use super::{ColumnMeta, Row, TableColumns, TableName};

#[derive(Debug, thiserror::Error)]
pub enum RelationError {
    #[error("change at LSN {lsn} refers to relation {rel_id}, which the server never described")]
    UnknownRelation { rel_id: u32, lsn: String },
    #[error("{table} at LSN {lsn}: tuple has {got} columns, relation has {expected}")]
    ColumnCount { table: TableName, lsn: String, got: usize, expected: usize },
    #[error("{table}.{column} (type OID {type_oid}) at LSN {lsn}: {reason}")]
    Value { table: TableName, column: String, type_oid: u32, lsn: String, reason: String },
    #[error("{table}.{column} has type OID {type_oid}, which pgfanout cannot decode in binary")]
    NotBinary { table: TableName, column: String, type_oid: u32 },
}

/// A relation as the pipeline needs it: its name, per column the name
/// (shared, so rows clone cheaply), type and replica-identity flag, and which
/// columns make the change's key.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub table: TableName,
    pub columns: Vec<ColumnShape>,
    /// Indexes into `columns` of the key, in key order: the primary key when
    /// the catalog names one, else the replica identity columns. Empty when
    /// the table has neither (the whole row is then the key).
    pub key: Vec<usize>,
    /// The columns as the log's encoding needs them (shared by the changes).
    pub meta: Arc<TableColumns>,
}

#[derive(Debug, Clone)]
pub struct ColumnShape {
    pub name: Arc<str>,
    pub type_oid: u32,
    /// Part of the replica identity, as the Relation message flags it.
    pub key: bool,
}

/// What pgoutput does not say of a table's columns, by table OID (the
/// Relation message's `rel_id`): which are NOT NULL, and their defaults.
pub type NotNull = HashMap<u32, ColumnCatalog>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColumnCatalog {
    pub not_null: HashSet<String>,
    /// Column → its DEFAULT expression (`pg_get_expr`).
    pub defaults: HashMap<String, Arc<str>>,
}

/// Primary-key column names in key order, by table OID (the Relation
/// message's `rel_id`).
pub type PrimaryKeys = HashMap<u32, Vec<String>>;

#[derive(Debug, Default)]
pub struct Relations {
    by_id: HashMap<u32, TableShape>,
    primary_keys: PrimaryKeys,
    not_null: NotNull,
    types: Types,
    /// The stream is in automatic binary mode: a relation with a column that
    /// pgfanout cannot decode in binary is an error, on which the session
    /// reconnects in text (forced binary leaves this off and reads such a
    /// column's raw bytes as an unknown value).
    binary: bool,
}

/// What the catalog says of the types a Relation message names only by OID:
/// domains (the server sends their base type's format) and enums (sent as
/// their label in text and in binary alike).
#[derive(Debug, Default, Clone)]
pub struct Types {
    /// Domain → its declared base type (possibly another domain).
    domains: HashMap<u32, u32>,
    /// Enum → its labels in order, comma-separated.
    enums: HashMap<u32, Arc<str>>,
}

impl Types {
    pub async fn load(client: &Client) -> Result<Types, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT t.oid, t.typtype = 'e', t.typbasetype,
                        (SELECT string_agg(e.enumlabel::text, ',' ORDER BY e.enumsortorder)
                         FROM pg_enum e WHERE e.enumtypid = t.oid)
                 FROM pg_type t WHERE t.typtype IN ('d', 'e')",
                &[],
            )
            .await?;
        let mut types = Types::default();
        for r in rows {
            let oid: u32 = r.get(0);
            if r.get::<_, bool>(1) {
                types.enums.insert(oid, r.get::<_, Option<String>>(3).unwrap_or_default().into());
            } else {
                types.domains.insert(oid, r.get(2));
            }
        }
        Ok(types)
    }

    /// The type whose format the server sends for `type_oid`: a domain's
    /// base type, through nested domains.
    pub fn base(&self, mut type_oid: u32) -> u32 {
        // Bounded: the catalog cannot hold a cycle, but a stale map must not hang us.
        for _ in 0..16 {
            match self.domains.get(&type_oid) {
                Some(&base) => type_oid = base,
                None => break,
            }
        }
        type_oid
    }

    /// Whether a value of `type_oid` decodes from binary to what its text form gives.
    pub fn decodes_binary(&self, type_oid: u32) -> bool {
        let base = self.base(type_oid);
        oid::decodes_binary(base) || self.enums.contains_key(&base)
    }

    /// An enum's labels, comma-separated in order.
    pub fn enum_labels(&self, type_oid: u32) -> Option<Arc<str>> {
        self.enums.get(&self.base(type_oid)).cloned()
    }
}

/// The type OIDs of every column of every table in `publication`.
pub async fn published_column_types(client: &Client, publication: &str) -> Result<Vec<u32>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT a.atttypid
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE pt.pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Reads the NOT NULL columns and the column defaults of every table in
/// `publication` (with the primary keys, at the session's start and after
/// a re-sent relation): one query for all of them.
pub async fn not_null_columns(client: &Client, publication: &str) -> Result<NotNull, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum AND a.attgenerated = ''
             WHERE pt.pubname = $1 AND (a.attnotnull OR d.adbin IS NOT NULL)",
            &[&publication],
        )
        .await?;
    let mut out = NotNull::new();
    for r in rows {
        let table = out.entry(r.get::<_, u32>(0)).or_default();
        let name: String = r.get(1);
        if let Some(default) = r.get::<_, Option<String>>(3) {
            table.defaults.insert(name.clone(), default.into());
        }
        if r.get::<_, bool>(2) {
            table.not_null.insert(name);
        }
    }
    Ok(out)
}

/// Reads the primary-key columns of every table in `publication`.
///
/// The Relation message cannot tell us the key: it flags the replica
/// identity columns, and under `REPLICA IDENTITY FULL` (which `init` sets so
/// updates and deletes carry the old row) that is every column, which would
/// make the whole row the broker key and change the key whenever any column
/// changes. The catalog knows the real key.
///
/// Tables are matched by name, not with a `::regclass` cast: the planner may
/// evaluate the cast on catalog rows the publication's filter drops later,
/// and naming a relation in `pg_toast` is refused to a role that is not a
/// superuser.
pub async fn primary_keys(client: &Client, publication: &str) -> Result<PrimaryKeys, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT i.indrelid, a.attname::text
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE pt.pubname = $1
             ORDER BY i.indrelid, k.ord",
            &[&publication],
        )
        .await?;
    let mut keys = PrimaryKeys::new();
    for r in rows {
        keys.entry(r.get::<_, u32>(0)).or_default().push(r.get(1));
    }
    Ok(keys)
}

impl Relations {
    /// Relations whose keys come from `primary_keys` where a table has one,
    /// whose domains decode as their base types, for a stream in binary or not.
    pub fn new(primary_keys: PrimaryKeys, types: Types, binary: bool) -> Self {
        Relations { by_id: HashMap::new(), primary_keys, not_null: NotNull::new(), types, binary }
    }

    /// Whether a Relation message for `rel_id` came before in this session
    /// (one that comes again follows DDL: columns or the key may differ).
    pub fn knows(&self, rel_id: u32) -> bool {
        self.by_id.contains_key(&rel_id)
    }

    /// Replaces the primary keys read at the session's start with ones read
    /// again (after DDL), for the relations learnt from now on.
    pub fn set_primary_keys(&mut self, primary_keys: PrimaryKeys) {
        self.primary_keys = primary_keys;
    }

    /// The NOT NULL columns, read with the primary keys (at the session's
    /// start and again after DDL), for the relations learnt from now on.
    pub fn set_not_null(&mut self, not_null: NotNull) {
        self.not_null = not_null;
    }

    pub fn learn(&mut self, rel: &Relation) -> Result<(), RelationError> {
        if self.binary {
            if let Some(c) = rel.columns.iter().find(|c| !self.types.decodes_binary(c.type_oid)) {
                return Err(RelationError::NotBinary {
                    table: TableName::new(&rel.namespace, &rel.name),
                    column: c.name.clone(),
                    type_oid: c.type_oid,
                });
            }
        }
        let columns: Vec<ColumnShape> = rel
            .columns
            .iter()
            .map(|c| ColumnShape { name: c.name.as_str().into(), type_oid: self.types.base(c.type_oid), key: c.key })
            .collect();
        // A primary key only counts when the relation carries all of its
        // columns (a publication column list may leave some out).
        let primary = self.primary_keys.get(&rel.rel_id).and_then(|pk| {
            pk.iter().map(|name| columns.iter().position(|c| &*c.name == name.as_str())).collect::<Option<Vec<_>>>()
        });
        let identity: Vec<usize> = columns.iter().enumerate().filter(|(_, c)| c.key).map(|(i, _)| i).collect();
        let (key, log_key) = match primary {
            Some(k) if !k.is_empty() => (k.clone(), k),
            // Debezium falls back to a unique index's columns, which an
            // identity index is; FULL identity flags every column, which
            // identifies nothing to it (its message key is then null).
            _ if rel.replica_identity == b'i' => (identity.clone(), identity),
            _ => (identity, Vec::new()),
        };
        let not_null = self.not_null.get(&rel.rel_id);
        let meta = TableColumns {
            columns: rel
                .columns
                .iter()
                .zip(&columns)
                .map(|(c, shape)| ColumnMeta {
                    name: shape.name.clone(),
                    type_oid: shape.type_oid,
                    type_modifier: c.type_modifier,
                    optional: !not_null.is_some_and(|n| n.not_null.contains(&c.name)),
                    enum_labels: self.types.enum_labels(c.type_oid),
                    // Debezium parses defaults by type name: a domain's has none.
                    default: (c.type_oid == shape.type_oid)
                        .then(|| not_null.and_then(|n| n.defaults.get(&c.name).cloned()))
                        .flatten(),
                })
                .collect(),
            key: log_key,
        };
        let shape = TableShape { table: TableName::new(&rel.namespace, &rel.name), columns, key, meta: Arc::new(meta) };
        self.by_id.insert(rel.rel_id, shape);
        Ok(())
    }

    pub fn shape(&self, rel_id: u32, lsn: u64) -> Result<&TableShape, RelationError> {
        self.by_id
            .get(&rel_id)
            .ok_or_else(|| RelationError::UnknownRelation { rel_id, lsn: super::Lsn(lsn).to_pg_string() })
    }
}

impl TableShape {
    /// Decodes a tuple. Unchanged-TOAST cells take the value from `fill`
    /// (the old tuple, when the replica identity is FULL) or are left out of
    /// the row, so a sink never mistakes "unchanged" for NULL.
    pub fn row(&self, tuple: &Tuple, fill: Option<&Row>, lsn: u64) -> Result<Row, RelationError> {
        self.row_noting_toast(tuple, fill, lsn, &mut Vec::new())
    }

    /// [`TableShape::row`], also naming in `unchanged` the unchanged-TOAST
    /// columns it left out (those `fill` had no value for).
    pub fn row_noting_toast(
        &self,
        tuple: &Tuple,
        fill: Option<&Row>,
        lsn: u64,
        unchanged: &mut Vec<Arc<str>>,
    ) -> Result<Row, RelationError> {
        if tuple.0.len() != self.columns.len() {
            return Err(RelationError::ColumnCount {
                table: self.table.clone(),
                lsn: super::Lsn(lsn).to_pg_string(),
                got: tuple.0.len(),
                expected: self.columns.len(),
            });
        }
        let mut out = Vec::with_capacity(self.columns.len());
        for (col, cell) in self.columns.iter().zip(&tuple.0) {
            let value = match cell {
                Cell::Null => Value::Null,
                Cell::UnchangedToast => match fill.and_then(|r| r.get(&col.name)) {
                    Some(v) => v.clone(),
                    None => {
                        unchanged.push(col.name.clone());
                        continue;
                    }
                },
                Cell::Text(b) => Value::from_text(col.type_oid, b).map_err(|e| self.value_err(col, lsn, e))?,
                Cell::Binary(b) => Value::from_binary(col.type_oid, b).map_err(|e| self.value_err(col, lsn, e))?,
            };
            out.push((col.name.clone(), value));
        }
        Ok(Row(out))
    }

    pub fn old_row(&self, old: &OldTuple, lsn: u64) -> Result<Row, RelationError> {
        match old {
            OldTuple::Key(t) | OldTuple::Full(t) => self.row(t, None, lsn),
        }
    }

    /// The key columns of a row, in key order (the whole row if the table
    /// has no key). NULLs are left out: a key column is never NULL in a
    /// primary key or identity index, and under FULL identity without a
    /// primary key a NULL identifies nothing.
    pub fn key_of(&self, row: &Row) -> Row {
        if self.key.is_empty() {
            return row.clone();
        }
        Row(self
            .key
            .iter()
            .filter_map(|&i| {
                let name = &self.columns[i].name;
                match row.get(name) {
                    None | Some(Value::Null) => None,
                    Some(v) => Some((name.clone(), v.clone())),
                }
            })
            .collect())
    }

    fn value_err(&self, col: &ColumnShape, lsn: u64, e: impl std::fmt::Display) -> RelationError {
        RelationError::Value {
            table: self.table.clone(),
            column: col.name.to_string(),
            type_oid: col.type_oid,
            lsn: super::Lsn(lsn).to_pg_string(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::source::pgoutput::Column;
    use crate::source::values::oid;

    const REL: u32 = 16_384;

    fn relation(identity: u8, cols: &[(&str, u32, bool)]) -> Relation {
        Relation {
            xid: None,
            rel_id: REL,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: cols
                .iter()
                .map(|&(name, type_oid, key)| Column { key, name: name.into(), type_oid, type_modifier: -1 })
                .collect(),
        }
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn names(row: &Row) -> Vec<&str> {
        row.0.iter().map(|(n, _)| &**n).collect()
    }

    /// Under FULL identity every column is flagged; the key is still the
    /// primary key, in key order (not column order).
    #[test]
    fn key_is_the_primary_key_under_full_identity() {
        let rel = relation(b'f', &[("a", oid::INT4, true), ("b", oid::TEXT, true), ("c", oid::INT8, true)]);
        let mut rels =
            Relations::new(PrimaryKeys::from([(REL, vec!["c".into(), "a".into()])]), Types::default(), false);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let row = shape.row(&Tuple(vec![text("1"), text("x"), text("7")]), None, 0).unwrap();
        let key = shape.key_of(&row);
        assert_eq!(key.0, vec![("c".into(), Value::Int8(7)), ("a".into(), Value::Int4(1))]);
    }

    #[test]
    fn no_primary_key_falls_back_to_the_replica_identity() {
        // An identity index on `b` (DEFAULT/INDEX identity flags only its columns).
        let rel = relation(b'i', &[("a", oid::INT4, false), ("b", oid::TEXT, true)]);
        let mut rels = Relations::new(PrimaryKeys::new(), Types::default(), false);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let row = shape.row(&Tuple(vec![text("1"), text("x")]), None, 0).unwrap();
        assert_eq!(names(&shape.key_of(&row)), vec!["b"]);

        // FULL without a primary key: every non-NULL column.
        let rel = relation(b'f', &[("a", oid::INT4, true), ("b", oid::TEXT, true)]);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let row = shape.row(&Tuple(vec![Cell::Null, text("x")]), None, 0).unwrap();
        assert_eq!(names(&shape.key_of(&row)), vec!["b"]);

        // Neither (REPLICA IDENTITY NOTHING): the whole row.
        let rel = relation(b'n', &[("a", oid::INT4, false), ("b", oid::TEXT, false)]);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let row = shape.row(&Tuple(vec![text("1"), text("x")]), None, 0).unwrap();
        assert_eq!(shape.key_of(&row), row);
    }

    /// An unchanged TOASTed value is not resent: it comes from the old row
    /// when there is one (FULL identity), and is otherwise left out of the
    /// row rather than turned into NULL.
    #[test]
    fn unchanged_toast_is_filled_from_the_old_row_or_left_out() {
        let rel = relation(b'f', &[("id", oid::INT4, true), ("big", oid::TEXT, true), ("n", oid::INT4, true)]);
        let mut rels = Relations::new(PrimaryKeys::from([(REL, vec!["id".into()])]), Types::default(), false);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let old = OldTuple::Full(Tuple(vec![text("1"), text("long text"), text("5")]));
        let new = Tuple(vec![text("1"), Cell::UnchangedToast, text("6")]);

        let before = shape.old_row(&old, 0).unwrap();
        let after = shape.row(&new, Some(&before), 0).unwrap();
        assert_eq!(after.get("big"), Some(&Value::Text("long text".into())));
        assert_eq!(after.get("n"), Some(&Value::Int4(6)));

        let after = shape.row(&new, None, 0).unwrap();
        assert_eq!(names(&after), vec!["id", "n"]);
        assert_eq!(after.get("big"), None);
    }

    /// A primary-key column the relation does not carry (a publication
    /// column list left it out) cannot be the key.
    #[test]
    fn primary_key_missing_from_the_relation_is_ignored() {
        let rel = relation(b'f', &[("a", oid::INT4, true), ("b", oid::TEXT, true)]);
        let mut rels = Relations::new(PrimaryKeys::from([(REL, vec!["id".into()])]), Types::default(), false);
        rels.learn(&rel).unwrap();
        let shape = rels.shape(REL, 0).unwrap();
        let row = shape.row(&Tuple(vec![text("1"), text("x")]), None, 0).unwrap();
        assert_eq!(names(&shape.key_of(&row)), vec!["a", "b"]);
    }

    /// A domain column decodes as its base type (nested domains too); in a
    /// binary stream a column of a type pgfanout cannot decode in binary is
    /// refused, so the session can fall back to text.
    #[test]
    fn domains_decode_as_their_base_type_and_binary_refuses_unknown_types() {
        let (posint, small, mood) = (90_001, 90_002, 90_003);
        let types = Types {
            domains: HashMap::from([(posint, oid::INT4), (small, posint)]),
            enums: HashMap::from([(mood, "happy,sad".into())]),
        };
        assert_eq!(types.base(small), oid::INT4);
        assert!(types.decodes_binary(small) && types.decodes_binary(mood) && types.decodes_binary(1007));
        assert!(!types.decodes_binary(600), "point has no binary decoder here");

        let rel = relation(b'd', &[("a", small, true), ("m", mood, false)]);
        let mut rels = Relations::new(PrimaryKeys::new(), types.clone(), true);
        rels.learn(&rel).unwrap();
        let row = rels.shape(REL, 0).unwrap().row(&Tuple(vec![text("7"), text("happy")]), None, 0).unwrap();
        assert_eq!(row.get("a"), Some(&Value::Int4(7)));

        let odd = relation(b'd', &[("a", oid::INT4, true), ("p", 600, false)]);
        let err = rels.learn(&odd).unwrap_err();
        assert!(err.to_string().contains("public.t.p has type OID 600"), "{err}");
        Relations::new(PrimaryKeys::new(), types, false).learn(&odd).expect("text streams take any type");
    }
}
