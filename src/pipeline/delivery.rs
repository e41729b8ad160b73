//! What happens to a batch before the sink lanes: publish it to the log,
//! enrich it, park what cannot be enriched.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::fanout::per_table;
use super::{topics, PipelineError};
use crate::config::Config;
use crate::enrich::{self, ContentDim, Enriched};
use crate::log::{producer, LogProducer, Publish};
use crate::observe::{self, Stats};
use crate::retry;
use crate::sinks::{self, Sink};
use crate::source::Change;

/// How `Delivery::publish_and_enrich` treats a batch that is not the live stream.
#[derive(Debug, Clone, Default)]
pub struct DeliverOptions {
    /// The batch's origin (`Enriched::origin`): None for the live stream,
    /// the chunk's name for a snapshot or backfill chunk, whose positions sit
    /// below the live stream's. Sinks that keep a progress watermark keep
    /// one per origin, so a replayed chunk skips what it already applied
    /// without touching the live stream's or another chunk's.
    pub origin: Option<String>,
    /// Publish to the log only: no enrichment, no sinks (benchmarks, or
    /// re-seeding other consumers of the log).
    pub log_only: bool,
    /// The rows are re-read history (backfill): events get row-version
    /// identities (see `sinks::change_id`), Redis appends each row version to
    /// its stream once and leaves the live window alone.
    pub replay: bool,
}

/// Everything downstream of the source: the log, the content dimension and
/// the sinks. The live stream and every snapshot or backfill chunk go
/// through it and then the same batcher and lanes (`pipeline::drive`).
pub struct Delivery {
    pub log: Arc<LogProducer>,
    pub dim: ContentDim,
    pub sinks: Vec<Arc<dyn Sink>>,
    pub stats: Arc<Stats>,
}

impl Delivery {
    /// Connects to the broker (creating missing topics) and every sink.
    pub async fn connect(
        cfg: &Config,
        database: &str,
        dim: ContentDim,
        stats: Arc<Stats>,
    ) -> Result<Self, PipelineError> {
        producer::ensure_topics(&cfg.log, &topics(cfg)).await?;
        let log = Arc::new(LogProducer::new(&cfg.log, database)?);
        let sinks = sinks::build(cfg, sinks::Refused::Park(log.clone()))?;
        for sink in &sinks {
            sink.connect().await?;
        }
        Ok(Delivery { log, dim, sinks, stats })
    }

    /// Publishes `batch` to the log, retrying until the broker takes it. An
    /// empty batch still ends the transactions whose commits `how` holds
    /// (their END records).
    pub async fn publish(&self, batch: &[Change], how: Publish<'_>) -> Result<(), PipelineError> {
        // The broker's errors are all transient: an oversized message, the
        // one that no retry can fix, is parked by `publish` itself.
        let policy = retry::Policy::sink("broker", None).failed("publishing to the broker failed; retrying");
        let log = &self.log;
        let published = retry::run(&policy, |_| retry::ErrorClass::Transient, |_| log.publish(batch, how));
        // Never given up (every error is transient); `?` only for the types.
        observe::timed("broker", published).await.map_err(|g| g.error)?;
        Ok(())
    }

    /// Publishes the batch to the log (retrying
    /// until the broker takes it), enriches it and parks what cannot be
    /// enriched. `None` for a log-only delivery (nothing more to do).
    pub async fn publish_and_enrich(
        &mut self,
        batch: &[Change],
        opts: &DeliverOptions,
        how: Publish<'_>,
    ) -> Result<Option<Enriched>, PipelineError> {
        self.publish(batch, how).await?;
        observe::metrics::count_tables("published", &per_table(batch));
        if opts.log_only {
            self.stats.changes.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return Ok(None);
        }
        let mut enriched = enrich::enrich(&mut self.dim, batch);
        enriched.origin = opts.origin.clone();
        if opts.replay {
            sinks::mark_replayed(&mut enriched);
        }
        for (change, reason) in &enriched.rejected {
            tracing::error!(table = %change.table, position = %change.position, key = %change.key.to_json(), reason = %reason, "change cannot be enriched; parking it in the dead-letter topic");
            observe::error("enrich");
            let payload = self.log.envelope_bytes(change);
            self.log
                .dead_letter("enrich", &change.position.event_id(), &payload, reason, producer::ENVELOPE_FORMAT)
                .await?;
        }
        Ok(Some(enriched))
    }
}
