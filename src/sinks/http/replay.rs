//! Deterministic webhook batches across restarts: the live stream's
//! progress record, `pgfanout_state.http_progress`, and the batch that was
//! in flight, which the batcher cuts again exactly.
//!
//! Receivers de-duplicate by the `Idempotency-Key` alone (Standard
//! Webhooks receivers do), so a batch must never be posted twice with other
//! events, and an event never twice under different keys. After a crash
//! the slot replays from the last acknowledged commit, which is usually
//! well before the last batch posted, and the batcher (count + linger)
//! would cut the replay differently. So the live stream's sink keeps a
//! record in the source database, `pgfanout_state.http_progress`
//! (sql/postgres/http_progress.sql), one row per slot, written in one
//! statement *before* each post:
//! `posted_through` = the last event of the batch before (which was
//! delivered or parked), `inflight_first` / `inflight_last` / `inflight_key`
//! = the batch about to leave. Posts are sequential, so at most one batch is
//! in flight and it is recorded before it can reach the receiver. Each run
//! bumps the row's `generation` when it loads it and writes only while the
//! generation is its own: a SIGKILLed run's last write, which PostgreSQL
//! may still execute after the next run started, cannot overwrite it.
//!
//! On start, `pipeline::run` makes the sink the live stream's
//! (`HttpSink::follow_live`), which loads the record ([`LiveRecord::load`])
//! and returns the in-flight range as a [`Replay`] for the batcher:
//! - Events at or below `posted_through` were delivered: skipped.
//! - If the replayed stream contains the range's first event, the batch may
//!   not have arrived: the batcher ends a batch just before that event and
//!   right after the range's last one, and never splits the range (whatever
//!   `batch_max_changes` and the linger say). The batch has the same events,
//!   hence the same key and (enrichment being a function of the commit) the
//!   same body, and the receiver's de-duplication does the rest.
//! - If the stream starts past the range's first event, the slot was
//!   acknowledged past a commit in that batch, which happens only once every
//!   sink flushed it: it was delivered, and its events are skipped too.
//! - Everything after the range is new and cut freely; every new batch
//!   starts after the last key ever posted, so its key is new.
//!
//! The record survives a new machine (it lives with the slot) and costs one
//! small upsert per posted batch. Snapshot and backfill deliveries do not
//! use it (their sinks never call `follow_live`): their events have their
//! own ids and are re-posted whole when a chunk is redone.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use super::encode::Outgoing;
use crate::config::Secret;
use crate::retry::{Attempts, ErrorClass, Policy};
use crate::sinks::{Boundary, Cuts, SinkError};
use crate::source::slot::{self, query_err, SlotError};
use crate::source::{Lsn, Position};

pub const PROGRESS_SCHEMA: &str = include_str!("../../../sql/postgres/http_progress.sql");

/// The live stream's row of `pgfanout_state.http_progress`, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveRecord {
    /// This run's generation: the row's, bumped by the load.
    pub generation: i64,
    /// Every event at or below this position was delivered.
    pub posted_through: Option<Position>,
    /// The batch that was about to be posted, or was posted, last.
    pub inflight: Option<Inflight>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    pub first: Position,
    pub last: Position,
    pub key: String,
}

impl LiveRecord {
    /// Loads the record of `slot` and takes it over for this run (a new
    /// generation), creating the table when it is missing (only then:
    /// creating needs CREATE on schema pgfanout_state, which a user of an
    /// existing table may lack). A record whose positions lie beyond the server's WAL
    /// cannot be this cluster's (a database restored elsewhere) and is
    /// ignored, with a warning, rather than skipping new events.
    pub async fn load(pg: &Client, slot: &str) -> Result<LiveRecord, SlotError> {
        let exists: bool = pg
            .query_one("SELECT to_regclass('pgfanout_state.http_progress') IS NOT NULL", &[])
            .await
            .map_err(query_err("look up pgfanout_state.http_progress"))?
            .get(0);
        if !exists {
            pg.batch_execute(PROGRESS_SCHEMA).await.map_err(query_err(
                "create pgfanout_state.http_progress, the webhook sink's progress: it needs CREATE on schema pgfanout_state (`pgfanout init --print-sql`), or run sql/postgres/http_progress.sql as a user who has it",
            ))?;
        }
        let row = pg
            .query_one(
                "INSERT INTO pgfanout_state.http_progress AS p (slot) VALUES ($1)
                 ON CONFLICT (slot) DO UPDATE SET generation = p.generation + 1
                 RETURNING generation, posted_through, inflight_first, inflight_last, inflight_key,
                     pg_current_wal_lsn()::text",
                &[&slot],
            )
            .await
            .map_err(query_err("take over pgfanout_state.http_progress"))?;
        let generation: i64 = row.get(0);
        let texts: [Option<String>; 3] = [row.get(1), row.get(2), row.get(3)];
        let parse = |i: usize| texts[i].as_deref().map(|s| Position::from_sortable_hex(s).ok_or(s));
        let wal_now = row.get::<_, Option<String>>(5).and_then(|s| Lsn::parse(&s).ok()).map(|l| l.0);
        let fresh = LiveRecord { generation, ..LiveRecord::default() };
        let record = match (parse(0).transpose(), parse(1), parse(2), row.get::<_, Option<String>>(4)) {
            (Ok(None), None, None, None) => return Ok(fresh),
            (Ok(posted_through), Some(Ok(first)), Some(Ok(last)), Some(key)) => {
                LiveRecord { generation, posted_through, inflight: Some(Inflight { first, last, key }) }
            }
            bad => {
                tracing::warn!(slot, record = ?bad, "pgfanout_state.http_progress holds positions that are not <16 hex digits><8 hex digits>; ignoring it (the batch in flight, if any, may reach the receiver under a second key)");
                return Ok(fresh);
            }
        };
        let newest = record.inflight.as_ref().map(|i| i.last.commit_lsn).unwrap_or(0);
        if wal_now.is_some_and(|now| newest > now) {
            tracing::warn!(slot, record = ?record, "pgfanout_state.http_progress is ahead of this server's WAL, so it was written on another cluster; ignoring it");
            return Ok(fresh);
        }
        Ok(record)
    }
}

/// The batch in flight when the live stream last stopped, for the batcher
/// to cut again exactly, and for the sink to know whether it did.
#[derive(Debug)]
pub struct Replay {
    pub first: Position,
    pub last: Position,
    pub key: String,
    /// `UNSEEN`, `REPLAYING`, `REPLAYED` or `PASSED`; written by the batcher
    /// before it hands on any batch at or past `first`, read by the sink.
    state: AtomicU8,
}

const UNSEEN: u8 = 0;
/// The batcher took `first` and is holding the batch open until `last`.
const REPLAYING: u8 = 1;
/// The batcher cut the replayed batch.
const REPLAYED: u8 = 2;
/// The stream started past `first`: the batch was delivered.
const PASSED: u8 = 3;

impl Cuts for Replay {
    fn boundary(&self, p: Position) -> Boundary {
        Replay::boundary(self, p)
    }
}

impl Replay {
    pub(super) fn new(i: Inflight) -> Self {
        Replay { first: i.first, last: i.last, key: i.key, state: AtomicU8::new(UNSEEN) }
    }

    /// Where batch boundaries go around the change at `p`; the batcher asks
    /// for every change, in stream order, before it hands the batch on.
    pub fn boundary(&self, p: Position) -> Boundary {
        let set = |s| self.state.store(s, Ordering::Release);
        match self.state.load(Ordering::Acquire) {
            UNSEEN if p < self.first => Boundary::default(),
            UNSEEN if p == self.first => {
                let whole = p >= self.last;
                set(if whole { REPLAYED } else { REPLAYING });
                Boundary { cut_before: true, hold: !whole, cut_after: whole }
            }
            UNSEEN => {
                set(PASSED);
                Boundary::default()
            }
            REPLAYING if p < self.last => Boundary { hold: true, ..Boundary::default() },
            REPLAYING if p == self.last => {
                set(REPLAYED);
                Boundary { cut_after: true, ..Boundary::default() }
            }
            REPLAYING => {
                // The range's last change is not in this stream (it differs
                // from the first reading): close the batch before going on.
                set(REPLAYED);
                Boundary { cut_before: true, ..Boundary::default() }
            }
            _ => Boundary::default(),
        }
    }

    /// Whether the batcher took the range's first change (the batch is being
    /// or was re-cut), as opposed to seeing the stream start past it.
    fn replayed(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), REPLAYING | REPLAYED)
    }
}

/// The live sink's side of the record.
pub(super) struct LiveProgress {
    pub(super) url: Secret,
    pub(super) slot: String,
    pub(super) generation: i64,
    pub(super) pg: Option<(Client, Statement)>,
    pub(super) posted_through: Option<Position>,
    /// Until the sink has passed it.
    pub(super) replay: Option<Arc<Replay>>,
}

const RECORD: &str = "UPDATE pgfanout_state.http_progress
     SET posted_through = $3, inflight_first = $4, inflight_last = $5, inflight_key = $6, updated_at = now()
     WHERE slot = $1 AND generation = $2";

/// Why a batch could not be recorded.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Query(#[from] SlotError),
    #[error("pgfanout_state.http_progress of slot {slot} was taken over by a later `pgfanout run` (this one has generation {generation}); stopping rather than post beside it")]
    TakenOver { slot: String, generation: i64 },
}

impl LiveProgress {
    /// Once the batcher saw the stream start past the in-flight batch, that
    /// batch counts as posted.
    pub(super) fn settle(&mut self) {
        if let Some(r) = self.replay.as_ref().filter(|r| r.state.load(Ordering::Acquire) == PASSED) {
            self.posted_through = self.posted_through.max(Some(r.last));
            self.replay = None;
        }
    }

    /// Whether the event at `p` reached the receiver in an earlier batch.
    pub(super) fn delivered(&self, p: Position) -> bool {
        if let Some(r) = self.replay.as_ref().filter(|r| (r.first..=r.last).contains(&p)) {
            // The batcher resolves the range before any batch reaching into
            // it is handed on, so here it is either re-cut or passed.
            return !r.replayed();
        }
        self.posted_through.is_some_and(|t| p <= t)
    }

    /// After `last` was delivered (or parked).
    pub(super) fn posted(&mut self, last: Position) {
        self.posted_through = Some(last);
        if self.replay.as_ref().is_some_and(|r| last >= r.last) {
            self.replay = None;
        }
    }

    /// Records `out` as in flight (and everything before it as posted),
    /// retrying until PostgreSQL takes it: a batch must not leave
    /// unrecorded, or a replay could re-cut it under another key.
    pub(super) async fn record(&mut self, out: &Outgoing, sink: &Policy) -> Result<(), SinkError> {
        let policy = Policy {
            failed: "recording webhook progress in pgfanout_state.http_progress failed; the batch waits; retrying",
            permanent_attempts: None,
            transient_attempts: None,
            ..sink.clone()
        };
        let mut attempts = Attempts::new(&policy);
        loop {
            attempts.begin();
            let e = match self.try_record(out).await {
                Ok(()) => {
                    // The sink has not flushed yet: its failure gauge stays until the post.
                    if attempts.failures() > 0 {
                        tracing::info!(
                            sink = "http",
                            failed_attempts = attempts.failures(),
                            "webhook progress recorded again"
                        );
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            self.pg = None;
            let class = match e {
                RecordError::TakenOver { .. } => ErrorClass::Fatal,
                RecordError::Query(_) => ErrorClass::Transient,
            };
            attempts.failed(e, class).await.map_err(|g| SinkError::Http(g.error.to_string()))?;
        }
    }

    async fn try_record(&mut self, out: &Outgoing) -> Result<(), RecordError> {
        if self.pg.is_none() {
            let pg = slot::connect(self.url.expose()).await?;
            // The record must survive a crash of PostgreSQL like the slot's
            // position does; a server set not to wait for its own WAL flush
            // would lose it.
            pg.batch_execute(
                "SELECT set_config('synchronous_commit', 'local', false) WHERE current_setting('synchronous_commit') = 'off'",
            )
            .await
            .map_err(query_err("set synchronous_commit"))?;
            let record = pg.prepare(RECORD).await.map_err(query_err("prepare the webhook progress update"))?;
            self.pg = Some((pg, record));
        }
        let (pg, record) = self.pg.as_ref().expect("connected above");
        let through = self.posted_through.as_ref().map(Position::sortable_hex);
        let (first, last) = (out.first.sortable_hex(), out.last.sortable_hex());
        let updated = pg
            .execute(record, &[&self.slot, &self.generation, &through, &first, &last, &out.key])
            .await
            .map_err(query_err("record webhook progress"))?;
        if updated == 0 {
            return Err(RecordError::TakenOver { slot: self.slot.clone(), generation: self.generation });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(commit_lsn: u64, ordinal: u32) -> Position {
        Position { commit_lsn, ordinal }
    }

    fn replay(first: Position, last: Position) -> Replay {
        Replay::new(Inflight { first, last, key: "k".into() })
    }

    /// The live record of a run that loaded `posted_through` and `replay`.
    fn live_progress(posted_through: Option<Position>, replay: Option<Arc<Replay>>) -> LiveProgress {
        LiveProgress { url: Secret::default(), slot: "s".into(), generation: 1, pg: None, posted_through, replay }
    }

    const FREE: Boundary = Boundary { cut_before: false, hold: false, cut_after: false };
    const HOLD: Boundary = Boundary { cut_before: false, hold: true, cut_after: false };

    #[test]
    fn the_replayed_range_is_cut_exactly() {
        let r = replay(pos(20, 1), pos(30, 2));
        assert_eq!(r.boundary(pos(10, 5)), FREE);
        assert_eq!(r.boundary(pos(20, 1)), Boundary { cut_before: true, hold: true, cut_after: false });
        assert!(r.replayed());
        assert_eq!(r.boundary(pos(20, 2)), HOLD);
        assert_eq!(r.boundary(pos(30, 1)), HOLD);
        assert_eq!(r.boundary(pos(30, 2)), Boundary { cut_after: true, ..FREE });
        assert_eq!(r.boundary(pos(30, 3)), FREE);
        assert_eq!(r.boundary(pos(40, 1)), FREE);
        assert!(r.replayed());

        let one = replay(pos(20, 1), pos(20, 1));
        assert_eq!(one.boundary(pos(20, 1)), Boundary { cut_before: true, hold: false, cut_after: true });
        assert_eq!(one.boundary(pos(20, 2)), FREE);

        // The range's last change missing from the stream: closed before what follows.
        let gap = replay(pos(20, 1), pos(30, 2));
        gap.boundary(pos(20, 1));
        assert_eq!(gap.boundary(pos(31, 0)), Boundary { cut_before: true, ..FREE });
        assert_eq!(gap.boundary(pos(31, 1)), FREE);
    }

    #[test]
    fn a_stream_starting_inside_the_range_passes_it() {
        let r = replay(pos(20, 1), pos(30, 2));
        assert_eq!(r.boundary(pos(20, 7)), FREE);
        assert!(!r.replayed());
        assert_eq!(r.boundary(pos(30, 2)), FREE);
        let mut live = live_progress(Some(pos(19, 4)), Some(Arc::new(r)));
        live.settle();
        assert!(live.replay.is_none());
        assert!(live.delivered(pos(20, 7)) && live.delivered(pos(30, 2)));
        assert!(!live.delivered(pos(30, 3)));
    }

    #[test]
    fn the_live_sink_skips_what_was_delivered_and_reposts_the_range() {
        let r = Arc::new(replay(pos(20, 1), pos(30, 2)));
        let mut live = live_progress(Some(pos(19, 4)), Some(r.clone()));
        assert!(live.delivered(pos(10, 1)) && live.delivered(pos(19, 4)));
        assert!(!live.delivered(pos(19, 5)), "not posted before: new");
        r.boundary(pos(20, 1));
        r.boundary(pos(30, 2));
        live.settle();
        assert!(!live.delivered(pos(20, 1)) && !live.delivered(pos(30, 2)), "the range is posted again");
        live.posted(pos(30, 2));
        assert!(live.replay.is_none());
        assert!(live.delivered(pos(20, 1)) && live.delivered(pos(30, 2)));
        assert!(!live.delivered(pos(30, 3)));
    }
}
