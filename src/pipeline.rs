//! The apply loop: source → log → enrich → sinks → acknowledgement.
//!
//! Changes arrive from the replication reader in commit order and are cut
//! into batches (by count and by a short linger), so a huge transaction
//! flows through in bounded memory. A batch is published to the broker and
//! acknowledged there before enrichment; the three sinks then write it
//! concurrently, and only when all three have returned does the slot's
//! flush position advance, to the end of the last transaction the batch
//! completed (see `ack`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::ack::{BatchAck, FlushedLsn};
use crate::config::Config;
use crate::enrich::{self, ContentDim};
use crate::log::{producer, LogProducer};
use crate::observe::{self, ReaderProgress};
use crate::sinks::{clickhouse::ClickHouseSink, http::HttpSink, redis::RedisSink, SinkError};
use crate::source::{self, session, slot, Change, SourceEvent};

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
    #[error("replication reader stopped unexpectedly")]
    ReaderGone,
}

/// Counters the pipeline keeps (exported as metrics, read by tests).
#[derive(Debug, Default)]
pub struct Stats {
    pub changes: AtomicU64,
    pub batches: AtomicU64,
    pub rejected: AtomicU64,
    pub flushed_lsn: AtomicU64,
    /// The replication reader's side: connected, server WAL end, buffered changes.
    pub reader: Arc<ReaderProgress>,
    /// Commit time (µs) the apply loop is behind by, 0 when caught up (see
    /// `observe::health::Snapshot::lag_seconds`).
    pub behind_commit_ts_us: AtomicI64,
}

/// The topics `run` writes to, for `init`.
pub fn topics(cfg: &Config) -> Vec<String> {
    let mut t: Vec<String> = cfg.source.tables.iter().map(|t| format!("{}{}", cfg.log.topic_prefix, t)).collect();
    t.push(producer::dead_letter_topic(&cfg.log.topic_prefix));
    t
}

/// Runs until `shutdown` turns true, then drains what was read, flushes the
/// sinks and reports the final flush position before returning.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>, stats: Arc<Stats>) -> Result<(), PipelineError> {
    let pg = slot::connect(cfg.source.url.expose()).await?;
    let slot_state = slot::ensure(&pg, &cfg.source).await?;
    let dim = ContentDim::load(&pg).await?;
    let database = pg
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(|source| slot::SlotError::Query { what: "current_database", source })?
        .get::<_, String>(0);
    drop(pg);
    tracing::info!(contents = dim.len(), confirmed_flush_lsn = ?slot_state.confirmed_flush_lsn.map(|l| source::Lsn(l).to_pg_string()), "starting pipeline");

    let mut delivery = Delivery::connect(&cfg, &database, dim, stats.clone()).await?;

    let (events_tx, mut events) = mpsc::channel(cfg.pipeline.channel_capacity);
    let (ack_tx, ack_rx) = watch::channel(slot_state.confirmed_flush_lsn.unwrap_or(0));
    let (stop_reader_tx, stop_reader) = watch::channel(false);
    let reader = tokio::spawn(session::read(cfg.source.clone(), events_tx, ack_rx, stop_reader, stats.reader.clone()));

    let mut flushed = FlushedLsn(slot_state.confirmed_flush_lsn.unwrap_or(0));
    stats.flushed_lsn.store(flushed.0, Ordering::Relaxed);
    let mut open_tx = false;
    let linger = Duration::from_millis(cfg.pipeline.batch_linger_ms);
    let mut stopping = false;
    loop {
        // Wait for the first event of a batch, or for shutdown.
        let first = tokio::select! {
            ev = events.recv() => ev,
            _ = shutdown.changed(), if !stopping => { stopping = true; None }
        };
        let mut batch: Vec<Change> = Vec::new();
        let mut ack = BatchAck::default();
        let take = |ev: SourceEvent, batch: &mut Vec<Change>, ack: &mut BatchAck, open_tx: &mut bool| match ev {
            SourceEvent::Change(c) => {
                stats.reader.took_one();
                *open_tx = true;
                batch.push(*c);
            }
            SourceEvent::Commit { end_lsn, .. } => {
                *open_tx = false;
                ack.last_commit_end = Some(end_lsn);
            }
            SourceEvent::Idle { wal_end } => ack.idle_wal_end = Some(wal_end),
        };
        match first {
            Some(ev) => take(ev, &mut batch, &mut ack, &mut open_tx),
            None if stopping => break,
            None => {
                return Err(match reader.await {
                    Ok(Err(e)) => e.into(),
                    _ => PipelineError::ReaderGone,
                })
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < cfg.pipeline.batch_max_changes {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => take(ev, &mut batch, &mut ack, &mut open_tx),
                _ => break,
            }
        }
        ack.open_tx = open_tx;
        if let Some(c) = batch.first() {
            observe::health::batch_started(&stats, c.tx.commit_ts_us);
            delivery.deliver(&batch).await?;
        }
        observe::health::batch_done(&stats, batch.last().map(|c| c.tx.commit_ts_us), events.is_empty());
        if let Some(lsn) = flushed.advance(&ack) {
            stats.flushed_lsn.store(lsn, Ordering::Relaxed);
            let _ = ack_tx.send(lsn);
        }
    }
    tracing::info!(flushed_lsn = %source::Lsn(flushed.0).to_pg_string(), "draining done; stopping replication");
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

/// How `Delivery::deliver_with` treats a batch that is not the live stream.
#[derive(Debug, Clone, Default)]
pub struct DeliverOptions {
    /// Redis progress watermark `<prefix>progress:<scope>` instead of the
    /// live `<prefix>progress`. Snapshot and backfill positions sit below
    /// the live stream's, so under the live key they would be skipped (or
    /// would move it past live changes not yet applied); each snapshot chunk
    /// and backfill chunk has its own scope, so a replayed chunk skips what
    /// it already applied without touching any other chunk.
    pub progress_scope: Option<String>,
    /// Publish to the log only: no enrichment, no sinks (benchmarks, or
    /// re-seeding other consumers of the log).
    pub log_only: bool,
    /// The rows are re-read history (backfill): events get row-version
    /// identities (see `sinks::change_id`), Redis appends each row version to
    /// its stream once and leaves the live window alone.
    pub replay: bool,
}

/// Everything downstream of the source: the log, the content dimension and
/// the sinks. The streaming loop, the snapshot and backfill all hand their
/// changes to `deliver`, so every path has the same guarantees.
pub struct Delivery {
    pub log: Arc<LogProducer>,
    pub dim: ContentDim,
    pub clickhouse: ClickHouseSink,
    pub redis: RedisSink,
    pub http: HttpSink,
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
        let clickhouse = ClickHouseSink::new(&cfg.clickhouse);
        let redis = RedisSink::connect(&cfg.redis).await?;
        let http = HttpSink::new(&cfg.http, log.clone())?;
        Ok(Delivery { log, dim, clickhouse, redis, http, stats })
    }

    /// Publishes a batch to the log (retrying until the broker takes it),
    /// enriches it, parks what cannot be enriched, and writes it to every
    /// sink concurrently. Returns once all of them have flushed it.
    pub async fn deliver(&mut self, batch: &[Change]) -> Result<(), PipelineError> {
        self.deliver_with(batch, &DeliverOptions::default()).await
    }

    /// `deliver`, for batches that are not the live stream (snapshot chunks,
    /// backfills): see `DeliverOptions`.
    pub async fn deliver_with(&mut self, batch: &[Change], opts: &DeliverOptions) -> Result<(), PipelineError> {
        let mut backoff = crate::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        observe::timed("broker", async {
            while let Err(e) = self.log.publish(batch).await {
                tracing::warn!(error = %e, attempt = backoff.attempts(), "publishing to the broker failed; retrying");
                let wait = backoff.next_delay();
                observe::sink_failed("broker", backoff.attempts(), &e, true);
                tokio::time::sleep(wait).await;
            }
        })
        .await;
        observe::sink_flushed("broker", backoff.attempts());
        observe::count_changes("published", batch);
        if opts.log_only {
            self.stats.changes.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let mut enriched = enrich::enrich(&mut self.dim, batch);
        if opts.replay {
            crate::sinks::mark_replayed(&mut enriched);
        }
        for (change, reason) in &enriched.rejected {
            tracing::error!(table = %change.table, position = %change.position, key = %change.key.to_json(), reason = %reason, "change cannot be enriched; parking it in the dead-letter topic");
            observe::error("enrich");
            let payload =
                serde_json::to_vec(&crate::log::envelope::value(change, "", chrono::Utc::now().timestamp_millis()))
                    .unwrap_or_default();
            self.log.dead_letter("enrich", &crate::sinks::event_id(&change.position), &payload, reason).await?;
        }
        tokio::try_join!(
            observe::timed("clickhouse", self.clickhouse.write(&enriched)),
            observe::timed("redis", self.redis.write_scoped(&enriched, opts.progress_scope.as_deref())),
            observe::timed("http", self.http.write(&enriched)),
        )?;
        observe::count_changes("delivered", batch);
        observe::metrics::batch_size(batch.len());
        self.stats.changes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.rejected.fetch_add(enriched.rejected.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
