//! The one batcher, for the live stream and for every scan chunk: events
//! are cut into batches by count (`pipeline.batch_max_changes`) and by a
//! short linger (`pipeline.batch_linger_ms`), and where a sink asks for it
//! (`sinks::Cuts`, the webhook batch in flight at the last stop) exactly at
//! the positions it names. Each batch is published and enriched
//! (`Delivery`), its content versions journaled when the live stream keeps
//! a journal, and handed to the sink lanes (`Fanout`), so every path has the
//! same guarantees and metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::ack::BatchAck;
use super::fanout::Fanout;
use super::{DeliverOptions, Delivery, PipelineError};
use crate::config::Config;
use crate::enrich::{journal::JournalWriter, Enriched};
use crate::log::Publish;
use crate::observe;
use crate::sinks::{Boundary, Cuts};
use crate::source::{Change, SourceEvent};

/// Where the batcher takes its events from, and what may stop it.
pub struct Batches<'a> {
    pub events: &'a mut mpsc::Receiver<SourceEvent>,
    /// Where sinks need the batches cut (none for scans).
    pub cuts: &'a [Arc<dyn Cuts>],
    /// Turns true to drain and stop (None: run until the events end).
    pub shutdown: Option<&'a mut watch::Receiver<bool>>,
    pub stopping: bool,
}

/// Why [`drive`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The events' sender went away (a scan chunk read to its end; for the
    /// live stream, the reader stopped).
    InputClosed,
    /// Shutdown was asked for; what was read is pushed to the lanes.
    Stopped,
}

impl Batches<'_> {
    fn boundary(&self, ev: &SourceEvent) -> Boundary {
        match ev {
            SourceEvent::Change(c) => {
                self.cuts.iter().fold(Boundary::default(), |b, k| b.union(k.boundary(c.position)))
            }
            _ => Boundary::default(),
        }
    }

    /// The next event, or None on shutdown (once) or when the events end.
    async fn next(&mut self, fanout: &mut Fanout) -> Result<Option<SourceEvent>, PipelineError> {
        let stop = async {
            match self.shutdown.as_deref_mut() {
                Some(s) if !self.stopping => {
                    let _ = s.changed().await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            ev = self.events.recv() => Ok(ev),
            _ = stop => { self.stopping = true; Ok(None) }
            e = fanout.failure() => Err(e),
        }
    }
}

/// Cuts `batches` into batches and delivers each through `delivery` to
/// `fanout`'s lanes, until the events end or shutdown. `journal`: the live
/// stream's content journal, appended before any sink has a batch.
pub async fn drive(
    batches: &mut Batches<'_>,
    delivery: &mut Delivery,
    fanout: &mut Fanout,
    opts: &DeliverOptions,
    mut journal: Option<&mut JournalWriter>,
    cfg: &Config,
) -> Result<Ended, PipelineError> {
    let stats = delivery.stats.clone();
    let linger = Duration::from_millis(cfg.pipeline.batch_linger_ms);
    let mut open_tx = false;
    // A change that must start the next batch, with its boundary.
    let mut carried: Option<(SourceEvent, Boundary)> = None;
    loop {
        // Wait for the first event of a batch, or for shutdown, or for a
        // lane that gave up.
        let (first, first_boundary) = match carried.take() {
            Some((ev, b)) => (Some(ev), b),
            None => {
                let ev = batches.next(fanout).await?;
                let b = ev.as_ref().map(|e| batches.boundary(e)).unwrap_or_default();
                (ev, b)
            }
        };
        let mut batch: Vec<Change> = Vec::new();
        let mut ack = BatchAck::default();
        let mut commits: Vec<(u64, u64)> = Vec::new();
        let mut take = |ev: SourceEvent, batch: &mut Vec<Change>, ack: &mut BatchAck, open_tx: &mut bool| match ev {
            SourceEvent::Change(c) => {
                stats.reader.took_one();
                *open_tx = true;
                batch.push(*c);
            }
            SourceEvent::Commit { end_lsn, tx } => {
                commits.push((tx.commit_lsn, end_lsn));
                *open_tx = false;
                ack.last_commit_end = Some(end_lsn);
            }
            SourceEvent::Idle { wal_end } => ack.idle_wal_end = Some(wal_end),
        };
        // `hold`: inside the replayed webhook batch, which only its last
        // change ends; `cut`: end the batch now.
        let (mut hold, mut cut) = (first_boundary.hold, first_boundary.cut_after);
        match first {
            Some(ev) => take(ev, &mut batch, &mut ack, &mut open_tx),
            None if batches.stopping => return Ok(Ended::Stopped),
            None => return Ok(Ended::InputClosed),
        }
        let deadline = tokio::time::Instant::now() + linger;
        while !cut && (hold || batch.len() < cfg.pipeline.batch_max_changes) {
            let ev = if hold {
                batches.next(fanout).await?
            } else {
                match tokio::time::timeout_at(deadline, batches.events.recv()).await {
                    Ok(Some(ev)) => Some(ev),
                    _ => break,
                }
            };
            let Some(ev) = ev else { break };
            let b = batches.boundary(&ev);
            if b.cut_before && !batch.is_empty() {
                carried = Some((ev, b));
                break;
            }
            if matches!(ev, SourceEvent::Change(_)) {
                (hold, cut) = (b.hold, b.cut_after);
            }
            take(ev, &mut batch, &mut ack, &mut open_tx);
        }
        if hold {
            // Stopping, or the reader gone, inside the replayed webhook
            // batch: a part of it must not go out (it would be posted under
            // another key). Nothing of it is acknowledged, so the next start
            // replays it whole.
            if batches.stopping {
                return Ok(Ended::Stopped);
            }
            continue;
        }
        ack.open_tx = open_tx;
        if cfg.source.heartbeat_ms > 0 && opts.origin.is_none() {
            // Debezium's heartbeat record; a failure only delays the next one.
            if let Err(e) = delivery.log.heartbeat(Duration::from_millis(cfg.source.heartbeat_ms)).await {
                tracing::warn!(error = %e, "writing a heartbeat record to the log failed");
            }
        }
        let how = Publish { origin: opts.origin.as_deref(), tx_open: open_tx, commits: &commits };
        let enriched = match batch.first() {
            Some(c) => {
                observe::health::batch_started(&stats, c.tx.commit_ts_us);
                let Some(enriched) = delivery.publish_and_enrich(&batch, opts, how).await? else {
                    // Log only: published is all there is to do.
                    continue;
                };
                // Durable before any sink has the batch, hence before the
                // slot can move past its content changes.
                if let Some(journal) = journal.as_deref_mut() {
                    let versions = delivery.dim.take_versions();
                    journal.write(&versions, stats.flushed_lsn.load(Ordering::Relaxed)).await?;
                }
                enriched
            }
            None => {
                if !commits.is_empty() && opts.origin.is_none() {
                    // A transaction whose last change went out in an earlier
                    // batch ends here: its END record, before the ack.
                    delivery.publish(&[], how).await?;
                }
                Enriched::default()
            }
        };
        fanout.push(batch, enriched, ack).await?;
    }
}
