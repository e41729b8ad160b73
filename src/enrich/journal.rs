//! The content journal: every version of every content row the live
//! pipeline applied, kept with its stream position in pgfanout's own tables
//! in the source database (sql/postgres/content_journal.sql), so that an
//! event is enriched with its content *as of its own commit* whatever
//! happened to pgfanout in between.
//!
//! Why. After a stop or a crash the slot replays from its confirmed
//! position, and events committed during the downtime arrive late. Joining
//! them to the content table as it is *now* would give them later content
//! (an event written before its content existed would get the content's
//! slug; a replayed event would get a different body than its first
//! delivery). The dimension the pipeline needs at start is instead the
//! content as of the confirmed position: exactly what the journal holds.
//!
//! How.
//! - Seed: when the slot is created (`init`, `run`, `snapshot`), it is
//!   created with an exported snapshot and the content table is copied into
//!   the journal *in that snapshot*, at position 0/0: the content as of the
//!   slot's first streamed change. A slot older than the journal is seeded
//!   from the table as it is then, once, with a warning (events it replays
//!   before that point may see later content, as before).
//! - Append: the live pipeline has the dimension record each version it
//!   applies (`ContentDim::record_versions`) and appends them here before the
//!   batch goes to the sinks, so the slot never moves past a content change
//!   the journal lacks. A replay appends the same versions again (no-op).
//! - Load: for each id, its latest version below the confirmed position,
//!   unless a delete or a TRUNCATE came after it. Versions at or above the
//!   confirmed position are replayed by the slot and applied again.
//! - Prune: versions superseded by a later one below the confirmed position
//!   can never be loaded again, nor can deletes and truncates once what they
//!   hide is gone; pruning leaves about one row per live content id plus
//!   the versions not yet confirmed. It runs at start and again whenever the
//!   appends since the last prune exceed the catalogue's size, so the
//!   journal stays within about twice the catalogue. Loading streams the
//!   rows (no result set held in memory): a million contents load in
//!   seconds.

use futures::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use uuid::Uuid;

use super::content::{Content, ContentDim, ContentVersion, VersionKind};
use crate::config::SourceConfig;
use crate::retry::{self, ErrorClass};
use crate::source::scan::quote_literal;
use crate::source::slot::{self, SlotError, SlotState};
use crate::source::snapshot::{self, ExportError};
use crate::source::Lsn;

pub const SCHEMA: &str = include_str!("../../sql/postgres/content_journal.sql");

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Export(#[from] Box<ExportError>),
    #[error("content journal ({what}, slot {slot}): {source}")]
    Query { what: &'static str, slot: String, source: tokio_postgres::Error },
    #[error("content journal of slot {slot}: row {id} has kind {kind:?} without its columns")]
    Corrupt { slot: String, id: Uuid, kind: String },
}

/// The slot and the content dimension as of its confirmed position, ready
/// for the live stream.
pub struct Prepared {
    pub slot: SlotState,
    pub dim: ContentDim,
}

/// Makes sure the publication, the slot and its journal exist (creating the
/// slot with an exported snapshot and seeding the journal in it when the
/// slot is missing), then loads the dimension as of the slot's confirmed
/// position and prunes what no start can need again.
pub async fn prepare(client: &Client, source: &SourceConfig) -> Result<Prepared, JournalError> {
    slot::ensure_publication(client, source).await?;
    ensure_schema(client, &source.slot).await?;
    let state = match slot::check(client, source).await? {
        Some(state) => {
            if !is_seeded(client, &source.slot).await? {
                tracing::warn!(slot = %source.slot, "this slot has no content journal yet (it predates it): seeding it from the content table as it is now; events the slot replays from before this moment are enriched with today's content, later ones as of their commit");
                seed(client, &source.slot, None).await?;
            }
            state
        }
        None => {
            let exported = snapshot::create_slot_exporting(source, &source.slot, false).await.map_err(Box::new)?;
            let rows = seed(client, &source.slot, Some(&exported.name)).await?;
            tracing::info!(slot = %source.slot, lsn = %Lsn(exported.consistent_point).to_pg_string(), contents = rows, "created replication slot; content journal seeded in its snapshot");
            SlotState { confirmed_flush_lsn: Some(exported.consistent_point), active_pid: None }
        }
    };
    let as_of = state.confirmed_flush_lsn.unwrap_or(0);
    let dim = load(client, &source.slot, as_of).await?;
    prune(client, &source.slot, as_of).await?;
    Ok(Prepared { slot: state, dim })
}

fn query_err(what: &'static str, slot: &str) -> impl FnOnce(tokio_postgres::Error) -> JournalError {
    let slot = slot.to_string();
    move |source| JournalError::Query { what, slot, source }
}

pub async fn ensure_schema(client: &Client, slot: &str) -> Result<(), JournalError> {
    // IF NOT EXISTS notices are noise in the command's output.
    client
        .batch_execute(&format!("SET client_min_messages TO warning;\n{SCHEMA}\nRESET client_min_messages;"))
        .await
        .map_err(query_err("create its tables", slot))
}

async fn is_seeded(client: &Client, slot: &str) -> Result<bool, JournalError> {
    let row = client
        .query_opt("SELECT 1 FROM pgfanout_state.content_journals WHERE slot = $1", &[&slot])
        .await
        .map_err(query_err("look up", slot))?;
    Ok(row.is_some())
}

/// Replaces the slot's journal with the content table, read in the exported
/// `snapshot` (exact: the content as of the slot's creation point) or as it
/// is now. Returns the rows copied.
pub async fn seed(client: &Client, slot: &str, snapshot: Option<&str>) -> Result<u64, JournalError> {
    let err = |what| query_err(what, slot);
    let seeded = async {
        if let Some(name) = snapshot {
            client.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name))).await?;
        }
        client.execute("DELETE FROM pgfanout_state.content_versions WHERE slot = $1", &[&slot]).await?;
        let rows = client
            .execute(
                "INSERT INTO pgfanout_state.content_versions \
                 (slot, id, commit_lsn, ordinal, kind, slug, title, content_type, length_seconds, publish_ts_ms) \
                 SELECT $1, id, '0/0', 0, 'row', slug, title, content_type, length_seconds, \
                 floor(extract(epoch FROM publish_ts) * 1000)::int8 FROM public.content",
                &[&slot],
            )
            .await?;
        client
            .execute(
                "INSERT INTO pgfanout_state.content_journals (slot, exact) VALUES ($1, $2) \
                 ON CONFLICT (slot) DO UPDATE SET seeded_at = now(), exact = EXCLUDED.exact",
                &[&slot, &snapshot.is_some()],
            )
            .await?;
        Ok(rows)
    };
    slot::transaction(client, "BEGIN ISOLATION LEVEL REPEATABLE READ", seeded).await.map_err(err("seed"))
}

/// The dimension as of `as_of` (a confirmed flush position): each id's
/// latest version committed before it, unless deleted or truncated since.
pub async fn load(client: &Client, slot: &str, as_of: u64) -> Result<ContentDim, JournalError> {
    let err = |what| query_err(what, slot);
    // The seed sits at 0/0, below every confirmed position a slot can have.
    let as_of = Lsn(as_of.max(1)).to_pg_string();
    let sql = "WITH cut AS (
          SELECT commit_lsn, ordinal FROM pgfanout_state.content_versions
           WHERE slot = $1 AND kind = 'truncated' AND commit_lsn < $2::text::pg_lsn
          UNION ALL SELECT '0/0'::pg_lsn, -1
          ORDER BY 1 DESC, 2 DESC LIMIT 1)
        SELECT id, kind, slug, title, content_type, length_seconds, publish_ts_ms FROM (
          SELECT DISTINCT ON (v.id) v.* FROM pgfanout_state.content_versions v, cut
           WHERE v.slot = $1 AND v.kind <> 'truncated' AND v.commit_lsn < $2::text::pg_lsn
             AND (v.commit_lsn, v.ordinal) > (cut.commit_lsn, cut.ordinal)
           ORDER BY v.id, v.commit_lsn DESC, v.ordinal DESC) latest
        WHERE kind = 'row'";
    let params: [&(dyn ToSql + Sync); 2] = [&slot, &as_of];
    let rows = client.query_raw(sql, params).await.map_err(err("load"))?;
    pin_mut!(rows);
    // Straight into the map: a million rows held twice (a Vec, then the
    // map) doubled the peak memory of a start.
    let mut dim = ContentDim::default();
    while let Some(r) = rows.try_next().await.map_err(err("load"))? {
        let id: Uuid = r.get(0);
        let corrupt = || JournalError::Corrupt { slot: slot.to_string(), id, kind: r.get(1) };
        dim.insert(Content {
            id,
            slug: r.get::<_, Option<String>>(2).ok_or_else(corrupt)?,
            title: r.get::<_, Option<String>>(3).ok_or_else(corrupt)?,
            content_type: r.get(4),
            length_seconds: r.get(5),
            publish_ts: r.get::<_, Option<i64>>(6).ok_or_else(corrupt)?,
        });
    }
    Ok(dim)
}

/// Appends versions the pipeline applied (positions may repeat on a replay:
/// the same version again changes nothing).
pub async fn append(client: &Client, slot: &str, versions: &[ContentVersion]) -> Result<(), JournalError> {
    let n = versions.len();
    let (mut ids, mut lsns, mut ordinals, mut kinds) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut slugs, mut titles, mut types, mut lengths, mut publish) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for v in versions {
        lsns.push(Lsn(v.position.commit_lsn).to_pg_string());
        ordinals.push(i64::from(v.position.ordinal));
        let (id, kind, c) = match &v.kind {
            VersionKind::Row(c) => (c.id, "row", Some(c)),
            VersionKind::Deleted(id) => (*id, "deleted", None),
            VersionKind::Truncated => (Uuid::nil(), "truncated", None),
        };
        ids.push(id);
        kinds.push(kind);
        slugs.push(c.map(|c| c.slug.as_str()));
        titles.push(c.map(|c| c.title.as_str()));
        types.push(c.and_then(|c| c.content_type.as_deref()));
        lengths.push(c.and_then(|c| c.length_seconds));
        publish.push(c.map(|c| c.publish_ts));
    }
    client
        .execute(
            "INSERT INTO pgfanout_state.content_versions \
             (slot, id, commit_lsn, ordinal, kind, slug, title, content_type, length_seconds, publish_ts_ms) \
             SELECT $1, * FROM unnest($2::uuid[], $3::text[]::pg_lsn[], $4::int8[], $5::text[], $6::text[], \
             $7::text[], $8::text[], $9::int4[], $10::int8[]) ON CONFLICT DO NOTHING",
            &[&slot, &ids, &lsns, &ordinals, &kinds, &slugs, &titles, &types, &lengths, &publish],
        )
        .await
        .map_err(query_err("append", slot))?;
    Ok(())
}

/// Deletes what no load as of `below` or later can return; returns the rows
/// deleted.
pub async fn prune(client: &Client, slot: &str, below: u64) -> Result<u64, JournalError> {
    let err = |what| query_err(what, slot);
    let below = Lsn(below).to_pg_string();
    let pruned = async {
        // Older versions of an id (the nil id holds the truncates) than its
        // latest one below the cut.
        let superseded = client
            .execute(
                "WITH latest AS (
                   SELECT DISTINCT ON (id) id, commit_lsn, ordinal FROM pgfanout_state.content_versions
                    WHERE slot = $1 AND commit_lsn < $2::text::pg_lsn
                    ORDER BY id, commit_lsn DESC, ordinal DESC)
                 DELETE FROM pgfanout_state.content_versions v USING latest l
                  WHERE v.slot = $1 AND v.id = l.id AND (v.commit_lsn, v.ordinal) < (l.commit_lsn, l.ordinal)",
                &[&slot, &below],
            )
            .await?;
        // Everything before the last truncate below the cut.
        let truncated = client
            .execute(
                "DELETE FROM pgfanout_state.content_versions v USING (
                   SELECT commit_lsn, ordinal FROM pgfanout_state.content_versions
                    WHERE slot = $1 AND kind = 'truncated' AND commit_lsn < $2::text::pg_lsn) t
                  WHERE v.slot = $1 AND v.kind <> 'truncated' AND (v.commit_lsn, v.ordinal) < (t.commit_lsn, t.ordinal)",
                &[&slot, &below],
            )
            .await?;
        // Deletes and truncates below the cut now hide nothing.
        let markers = client
            .execute(
                "DELETE FROM pgfanout_state.content_versions \
                 WHERE slot = $1 AND kind <> 'row' AND commit_lsn < $2::text::pg_lsn",
                &[&slot, &below],
            )
            .await?;
        Ok(superseded + truncated + markers)
    };
    slot::transaction(client, "BEGIN", pruned).await.map_err(err("prune"))
}

/// The live pipeline's handle on the journal: appends with retries (a lost
/// connection is reopened; an outage of the source database stalls the
/// pipeline, as the slot cannot be read then either) and prunes now and then.
pub struct JournalWriter {
    url: String,
    slot: String,
    /// Reopened by the next attempt once closed.
    client: tokio::sync::Mutex<Option<Client>>,
    /// Rows appended since the last prune, and about how many it left.
    since_prune: usize,
    held: usize,
}

impl JournalWriter {
    /// `client`: the connection `prepare` used; `catalogue`: the contents
    /// loaded (about what its prune left).
    pub fn new(url: &str, slot: &str, client: Client, catalogue: usize) -> Self {
        JournalWriter {
            url: url.to_string(),
            slot: slot.to_string(),
            client: tokio::sync::Mutex::new(Some(client)),
            since_prune: 0,
            held: catalogue,
        }
    }

    /// Appends `versions` durably; `flushed`: the slot's flush position now,
    /// below which a due prune may delete.
    pub async fn write(&mut self, versions: &[ContentVersion], flushed: u64) -> Result<(), JournalError> {
        if versions.is_empty() {
            return Ok(());
        }
        // Every error is transient: the journal is the source database,
        // whose outage stops the slot too; `?` only for the types.
        let policy = retry::Policy::sink("journal", None).failed("writing the content journal failed; retrying");
        retry::run(&policy, |_| ErrorClass::Transient, |_| self.append_once(versions)).await.map_err(|g| g.error)?;
        self.since_prune += versions.len();
        // A prune reads the whole journal: one per doubling keeps the cost
        // per append constant, and the journal within twice what it holds.
        if self.since_prune >= self.held.max(10_000) {
            if let Some(c) = self.client.get_mut().as_ref() {
                match prune(c, &self.slot, flushed).await {
                    Ok(n) => {
                        self.held = (self.held + self.since_prune).saturating_sub(n as usize);
                        self.since_prune = 0;
                        tracing::debug!(slot = %self.slot, rows = n, "pruned the content journal");
                    }
                    // Harmless: the next append tries again.
                    Err(e) => tracing::warn!(slot = %self.slot, error = %e, "pruning the content journal failed"),
                }
            }
        }
        Ok(())
    }

    /// One attempt: on the open connection, or a new one if it closed.
    async fn append_once(&self, versions: &[ContentVersion]) -> Result<(), JournalError> {
        let mut client = self.client.lock().await;
        if !client.as_ref().is_some_and(|c| !c.is_closed()) {
            *client = None;
            *client = Some(slot::connect(&self.url).await?);
        }
        append(client.as_ref().expect("connected above"), &self.slot, versions).await
    }
}
