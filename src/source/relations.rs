//! Turns decoded pgoutput tuples into named, typed rows using the Relation
//! messages the server sends before a table's first change in each session.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{Cell, OldTuple, Relation, Tuple};
use super::values::Value;
use super::{Row, TableName};

#[derive(Debug, thiserror::Error)]
pub enum RelationError {
    #[error("change at LSN {lsn} refers to relation {rel_id}, which the server never described")]
    UnknownRelation { rel_id: u32, lsn: String },
    #[error("{table} at LSN {lsn}: tuple has {got} columns, relation has {expected}")]
    ColumnCount { table: TableName, lsn: String, got: usize, expected: usize },
    #[error("{table}.{column} (type OID {type_oid}) at LSN {lsn}: {reason}")]
    Value { table: TableName, column: String, type_oid: u32, lsn: String, reason: String },
}

/// A relation as the pipeline needs it: its name, and per column the name
/// (shared, so rows clone cheaply), type and whether it is part of the key.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub table: TableName,
    pub columns: Vec<ColumnShape>,
}

#[derive(Debug, Clone)]
pub struct ColumnShape {
    pub name: Arc<str>,
    pub type_oid: u32,
    pub key: bool,
}

#[derive(Debug, Default)]
pub struct Relations {
    by_id: HashMap<u32, TableShape>,
}

impl Relations {
    pub fn learn(&mut self, rel: &Relation) {
        let shape = TableShape {
            table: TableName::new(&rel.namespace, &rel.name),
            columns: rel
                .columns
                .iter()
                .map(|c| ColumnShape { name: c.name.as_str().into(), type_oid: c.type_oid, key: c.key })
                .collect(),
        };
        self.by_id.insert(rel.rel_id, shape);
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
                    None => continue,
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

    /// The key columns of a row (all columns if the table has no key).
    pub fn key_of(&self, row: &Row) -> Row {
        let keys: Vec<_> = self.columns.iter().filter(|c| c.key).map(|c| &c.name).collect();
        if keys.is_empty() {
            return row.clone();
        }
        Row(row.0.iter().filter(|(n, v)| keys.contains(&n) && !matches!(v, Value::Null)).cloned().collect())
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
