//! The apply loop: source → log → enrich → sinks → acknowledgement.
//!
//! Changes arrive from the replication reader in commit order and are cut
//! into batches (by count and by a short linger), so a huge transaction
//! flows through in bounded memory. A batch is published to the broker and
//! acknowledged there before enrichment. Each sink then writes it in its own
//! lane (a task with a queue bounded in changes), in batch order, while the loop
//! already reads, publishes and enriches the next batches: the stages
//! overlap, and the slowest stage, not the sum of all of them, sets the
//! rate. A full lane stops the loop, which stops the reader (backpressure).
//! The slot's flush position advances only past batches that every lane has
//! flushed, to the end of the last transaction they completed (see `ack`).
//!
//! After a restart, the batch the webhook sink had in flight is cut again
//! exactly as it was, whatever count and linger say (`sinks::http::Replay`).

pub mod ack;
pub mod batcher;
pub mod delivery;
pub mod fanout;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use self::ack::FlushedLsn;
pub use self::batcher::{drive, Batches, Ended};
pub use self::delivery::{DeliverOptions, Delivery};
use self::fanout::Fanout;
use crate::config::Config;
use crate::enrich::{self, journal};
use crate::log::producer;
use crate::log::records;
use crate::observe::Stats;
use crate::sinks::{Cuts, SinkError};
use crate::source::{self, session, slot};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Content(#[from] enrich::ContentError),
    #[error(transparent)]
    Journal(#[from] enrich::journal::JournalError),
    #[error("replication reader stopped unexpectedly")]
    ReaderGone,
    #[error("sink {sink} panicked while writing a batch (a bug; the batch is not acknowledged and is replayed on the next start)")]
    SinkPanicked { sink: &'static str },
    #[error(transparent)]
    Privilege(#[from] source::privilege::MissingPrivilege),
}

/// The topics `run` writes to, for `init`.
pub fn topics(cfg: &Config) -> Vec<String> {
    let mut t: Vec<String> = cfg.source.tables.iter().map(|t| format!("{}{}", cfg.log.topic_prefix, t)).collect();
    t.push(producer::dead_letter_topic(&cfg.log.topic_prefix));
    if cfg.log.debezium.provide_transaction_metadata {
        t.push(records::transaction_topic(&cfg.log.topic_prefix));
    }
    if cfg.source.heartbeat_ms > 0 {
        t.push(records::heartbeat_topic(&cfg.log.topic_prefix, &cfg.log.debezium));
    }
    t
}

/// Runs until `shutdown` turns true, then drains what was read, flushes the
/// sinks and reports the final flush position before returning.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>, stats: Arc<Stats>) -> Result<(), PipelineError> {
    let source_cfg = cfg.source.clone();
    stream(cfg, shutdown, stats).await.map_err(|e| source::privilege::explain(e, &source_cfg))
}

async fn stream(cfg: Config, mut shutdown: watch::Receiver<bool>, stats: Arc<Stats>) -> Result<(), PipelineError> {
    let pg = slot::connect(cfg.source.url.expose()).await?;
    // The content as of the slot's confirmed position, not as of now: the
    // slot replays from there (see `enrich::journal`).
    let journal::Prepared { slot: slot_state, mut dim } = journal::prepare(&pg, &cfg.source).await?;
    let database = pg
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(|source| slot::SlotError::Query { what: "current_database", source })?
        .get::<_, String>(0);
    tracing::info!(contents = dim.len(), confirmed_flush_lsn = ?slot_state.confirmed_flush_lsn.map(|l| source::Lsn(l).to_pg_string()), "starting pipeline");
    let contents = dim.len();
    dim.record_versions();

    let mut delivery = Delivery::connect(&cfg, &database, dim, stats.clone()).await?;
    let mut cuts: Vec<Arc<dyn Cuts>> = Vec::new();
    for sink in &delivery.sinks {
        cuts.extend(sink.follow_live(&pg, &cfg.source).await?);
    }
    let mut journal = journal::JournalWriter::new(cfg.source.url.expose(), &cfg.source.slot, pg, contents);

    let (events_tx, mut events) = mpsc::channel(cfg.pipeline.channel_capacity);
    let (ack_tx, ack_rx) = watch::channel(slot_state.confirmed_flush_lsn.unwrap_or(0));
    let (stop_reader_tx, stop_reader) = watch::channel(false);
    let reader = session::spawn(cfg.source.clone(), events_tx, ack_rx, stop_reader, stats.reader.clone());

    let flushed = FlushedLsn(slot_state.confirmed_flush_lsn.unwrap_or(0));
    stats.flushed_lsn.store(flushed.0, Ordering::Relaxed);
    let mut fanout =
        Fanout::start(delivery.sinks.clone(), cfg.pipeline.sink_queue_changes, flushed, ack_tx, stats.clone());
    let drove = {
        let mut batches = Batches { events: &mut events, cuts: &cuts, shutdown: Some(&mut shutdown), stopping: false };
        drive(&mut batches, &mut delivery, &mut fanout, &DeliverOptions::default(), Some(&mut journal), &cfg).await
    };
    match drove {
        Ok(Ended::Stopped) => {}
        Ok(Ended::InputClosed) => {
            return Err(match reader.await {
                Ok(Err(e)) => e.into(),
                _ => PipelineError::ReaderGone,
            })
        }
        Err(e) => return Err(e),
    }
    fanout.finish().await?;
    tracing::info!(flushed_lsn = %source::Lsn(stats.flushed_lsn.load(Ordering::Relaxed)).to_pg_string(), "draining done; stopping replication");
    let _ = stop_reader_tx.send(true);
    // Discard what the reader still hands over (never acknowledged, so the
    // next start replays it) so that it cannot block on a full channel
    // instead of seeing the stop.
    let discard = async { while events.recv().await.is_some() {} };
    match tokio::join!(reader, discard).0 {
        Ok(r) => r?,
        Err(_) => return Err(PipelineError::ReaderGone),
    }
    Ok(())
}
