//! The content dimension held in memory: loaded at start as of the slot's
//! confirmed position (from the journal, see `journal`), then kept current
//! from the content table's own changes in commit order. The live pipeline
//! has the dimension record every version it applies, so the journal can
//! keep them durably before the slot moves past them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::source::{Change, Op, Position, Row};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Content {
    pub id: Uuid,
    pub slug: String,
    pub title: String,
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
    /// Milliseconds since the Unix epoch.
    pub publish_ts: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content row at {position}: column {column} is missing or has the wrong type")]
    Column { position: String, column: &'static str },
    #[error("loading content from PostgreSQL failed: {0}")]
    Load(#[from] tokio_postgres::Error),
}

/// What one change did to the dimension, as the journal keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentVersion {
    pub position: Position,
    pub kind: VersionKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VersionKind {
    /// The content row as of this position (insert, update, snapshot read).
    Row(Content),
    /// The row with this id is gone (a delete, or an update that changed the id).
    Deleted(Uuid),
    /// Every row is gone (TRUNCATE).
    Truncated,
}

#[derive(Debug, Default)]
pub struct ContentDim {
    by_id: HashMap<Uuid, Content>,
    /// Versions applied since the last `take_versions`, when recording.
    recorded: Option<Vec<ContentVersion>>,
}

impl ContentDim {
    /// The content table as the transaction of `client` sees it (a scan's
    /// snapshot). Milliseconds are floored, as `Value::as_timestamp_millis`
    /// floors them on the stream path.
    pub async fn load(client: &Client) -> Result<ContentDim, ContentError> {
        let rows = client
            .query(
                "SELECT id, slug, title, content_type, length_seconds, \
                 floor(extract(epoch from publish_ts) * 1000)::int8 FROM public.content",
                &[],
            )
            .await?;
        let by_id = rows
            .iter()
            .map(|r| {
                let c = Content {
                    id: r.get(0),
                    slug: r.get(1),
                    title: r.get(2),
                    content_type: r.get(3),
                    length_seconds: r.get(4),
                    publish_ts: r.get(5),
                };
                (c.id, c)
            })
            .collect();
        Ok(ContentDim { by_id, recorded: None })
    }

    /// Adds (or replaces) one row, as a load streams them in.
    pub fn insert(&mut self, content: Content) {
        self.by_id.insert(content.id, content);
    }

    /// From now on, every version `apply` makes is kept for `take_versions`.
    pub fn record_versions(&mut self) {
        self.recorded.get_or_insert_with(Vec::new);
    }

    /// The versions applied since the last call (empty when not recording).
    pub fn take_versions(&mut self) -> Vec<ContentVersion> {
        self.recorded.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn record(&mut self, position: Position, kind: VersionKind) {
        if let Some(r) = &mut self.recorded {
            r.push(ContentVersion { position, kind });
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<&Content> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Applies a change of the content table; returns the content row it
    /// produced (the deleted row for a delete).
    pub fn apply(&mut self, change: &Change) -> Result<Option<Content>, ContentError> {
        match change.op {
            Op::Create | Op::Update | Op::Read => {
                let Some(after) = &change.after else { return Ok(None) };
                let c = content_from_row(after, change)?;
                if let Some(before) = &change.before {
                    if let Some(old_id) = before.get("id").and_then(|v| v.as_uuid()) {
                        if old_id != c.id {
                            self.by_id.remove(&old_id);
                            self.record(change.position, VersionKind::Deleted(old_id));
                        }
                    }
                }
                self.by_id.insert(c.id, c.clone());
                self.record(change.position, VersionKind::Row(c.clone()));
                Ok(Some(c))
            }
            Op::Delete => {
                let id = change
                    .before
                    .as_ref()
                    .and_then(|r| r.get("id"))
                    .and_then(|v| v.as_uuid())
                    .ok_or_else(|| ContentError::Column { position: change.position.to_string(), column: "id" })?;
                self.record(change.position, VersionKind::Deleted(id));
                Ok(self
                    .by_id
                    .remove(&id)
                    .or_else(|| change.before.as_ref().and_then(|b| content_from_row(b, change).ok())))
            }
            Op::Truncate => {
                self.by_id.clear();
                self.record(change.position, VersionKind::Truncated);
                Ok(None)
            }
        }
    }
}

fn content_from_row(row: &Row, change: &Change) -> Result<Content, ContentError> {
    let missing = |column| ContentError::Column { position: change.position.to_string(), column };
    Ok(Content {
        id: row.get("id").and_then(|v| v.as_uuid()).ok_or_else(|| missing("id"))?,
        slug: row.get("slug").and_then(|v| v.as_str()).ok_or_else(|| missing("slug"))?.to_string(),
        title: row.get("title").and_then(|v| v.as_str()).ok_or_else(|| missing("title"))?.to_string(),
        content_type: row.get("content_type").and_then(|v| v.as_str()).map(str::to_string),
        length_seconds: row.get("length_seconds").and_then(|v| v.as_i64()).and_then(|v| i32::try_from(v).ok()),
        publish_ts: row.get("publish_ts").and_then(|v| v.as_timestamp_millis()).ok_or_else(|| missing("publish_ts"))?,
    })
}
