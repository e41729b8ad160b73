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

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::ack::{BatchAck, FlushedLsn};
use crate::config::Config;
use crate::enrich::{self, journal, ContentDim, Enriched};
use crate::log::{producer, LogProducer};
use crate::observe::metrics::Tally;
use crate::observe::{self, ReaderProgress};
use crate::retry;
use crate::sinks::http::{self, Boundary, HttpSink};
use crate::sinks::{clickhouse::ClickHouseSink, redis::RedisSink, SinkError, Sinks};
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
    #[error(transparent)]
    Journal(#[from] enrich::journal::JournalError),
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
    /// Batches with changes the loop started that the sinks have not all
    /// flushed yet (see `observe::health::batch_done`).
    pub open_batches: AtomicU64,
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
    let http_record = http::LiveRecord::load(&pg, &cfg.source.slot).await?;
    // The content as of the slot's confirmed position, not as of now: the
    // slot replays from there (see `enrich::journal`).
    let journal::Prepared { slot: slot_state, mut dim } = journal::prepare(&pg, &cfg.source).await?;
    let database = pg
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(|source| slot::SlotError::Query { what: "current_database", source })?
        .get::<_, String>(0);
    tracing::info!(contents = dim.len(), confirmed_flush_lsn = ?slot_state.confirmed_flush_lsn.map(|l| source::Lsn(l).to_pg_string()), "starting pipeline");
    let mut journal = journal::JournalWriter::new(cfg.source.url.expose(), &cfg.source.slot, pg, dim.len());
    dim.record_versions();

    let mut delivery = Delivery::connect(&cfg, &database, dim, stats.clone()).await?;
    let replay = delivery.sinks.http.follow_live(&cfg.source, http_record);
    let boundary = |ev: &SourceEvent| match (ev, &replay) {
        (SourceEvent::Change(c), Some(r)) => r.boundary(c.position),
        _ => Boundary::default(),
    };

    let (events_tx, mut events) = mpsc::channel(cfg.pipeline.channel_capacity);
    let (ack_tx, ack_rx) = watch::channel(slot_state.confirmed_flush_lsn.unwrap_or(0));
    let (stop_reader_tx, stop_reader) = watch::channel(false);
    let reader = session::spawn(cfg.source.clone(), events_tx, ack_rx, stop_reader, stats.reader.clone());

    let flushed = FlushedLsn(slot_state.confirmed_flush_lsn.unwrap_or(0));
    stats.flushed_lsn.store(flushed.0, Ordering::Relaxed);
    let mut fanout =
        Fanout::start(delivery.sinks.clone(), cfg.pipeline.sink_queue_changes, flushed, ack_tx, stats.clone());
    let mut open_tx = false;
    let linger = Duration::from_millis(cfg.pipeline.batch_linger_ms);
    let mut stopping = false;
    // A change that must start the next batch, with its boundary.
    let mut carried: Option<(SourceEvent, Boundary)> = None;
    loop {
        // Wait for the first event of a batch, or for shutdown, or for a
        // lane that gave up.
        let (first, first_boundary) = match carried.take() {
            Some((ev, b)) => (Some(ev), b),
            None => {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = shutdown.changed(), if !stopping => { stopping = true; None }
                    e = fanout.failure() => return Err(e),
                };
                let b = ev.as_ref().map(boundary).unwrap_or_default();
                (ev, b)
            }
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
        // `hold`: inside the replayed webhook batch, which only its last
        // change ends; `cut`: end the batch now.
        let (mut hold, mut cut) = (first_boundary.hold, first_boundary.cut_after);
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
        while !cut && (hold || batch.len() < cfg.pipeline.batch_max_changes) {
            let ev = if hold {
                tokio::select! {
                    ev = events.recv() => ev,
                    _ = shutdown.changed(), if !stopping => { stopping = true; None }
                    e = fanout.failure() => return Err(e),
                }
            } else {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(ev)) => Some(ev),
                    _ => break,
                }
            };
            let Some(ev) = ev else { break };
            let b = boundary(&ev);
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
            if stopping {
                break;
            }
            continue;
        }
        ack.open_tx = open_tx;
        let enriched = match batch.first() {
            Some(c) => {
                observe::health::batch_started(&stats, c.tx.commit_ts_us);
                let enriched =
                    delivery.publish_and_enrich(&batch, &DeliverOptions::default()).await?.unwrap_or_default();
                // Durable before any sink has the batch, hence before the
                // slot can move past its content changes.
                let versions = delivery.dim.take_versions();
                journal.write(&versions, stats.flushed_lsn.load(Ordering::Relaxed)).await?;
                enriched
            }
            None => Enriched::default(),
        };
        fanout.push(batch, enriched, ack).await?;
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

/// One batch on its way through the sink lanes.
struct Job {
    seq: u64,
    /// The changes' commit times and per-table counts; the rows themselves
    /// are dropped once enriched (the sinks write `enriched`).
    tally: Tally,
    enriched: Enriched,
    ack: BatchAck,
}

/// What the lanes and the loop tell the acknowledgement task.
enum AckMsg {
    /// The loop handed batch `seq` to every lane.
    Pushed(Arc<Job>),
    /// Lane `lane` has flushed every batch up to `seq`.
    Flushed { lane: usize, seq: u64 },
}

/// The sink lanes of the live stream and the task that turns their progress
/// into the slot's flush position.
struct Fanout {
    lanes: Vec<Lane>,
    tasks: Vec<JoinHandle<()>>,
    acks: mpsc::UnboundedSender<AckMsg>,
    ack_task: JoinHandle<()>,
    failures: mpsc::UnboundedReceiver<PipelineError>,
    seq: u64,
}

/// A sink lane's queue, bounded by the changes it holds: a batch takes as
/// many permits as it has changes (at least one, at most the whole bound)
/// and gives them back once the sink has flushed it.
struct Lane {
    tx: mpsc::UnboundedSender<(Arc<Job>, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
    bound: u32,
}

impl Fanout {
    fn start(
        sinks: Sinks,
        queue_changes: usize,
        flushed: FlushedLsn,
        ack_tx: watch::Sender<u64>,
        stats: Arc<Stats>,
    ) -> Self {
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (fail_tx, failures) = mpsc::unbounded_channel();
        let bound = queue_changes.clamp(1, Semaphore::MAX_PERMITS) as u32;
        let mut lanes = Vec::new();
        let mut tasks = Vec::new();
        for (lane, sink) in Sinks::ALL.into_iter().enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<Job>, OwnedSemaphorePermit)>();
            let (sinks, acks, fail_tx) = (sinks.clone(), acks.clone(), fail_tx.clone());
            tasks.push(tokio::spawn(async move {
                let latency = observe::metrics::CommitToSink::of(sink);
                while let Some((job, room)) = rx.recv().await {
                    if let Err(e) = sinks.write(sink, &job.enriched, None).await {
                        let _ = fail_tx.send(e.into());
                        return;
                    }
                    drop(room);
                    latency.flushed(&job.tally.commits);
                    let _ = acks.send(AckMsg::Flushed { lane, seq: job.seq });
                }
            }));
            lanes.push(Lane { tx, room: Arc::new(Semaphore::new(bound as usize)), bound });
        }
        let ack_task = tokio::spawn(acknowledge(ack_rx, lanes.len(), flushed, ack_tx, stats));
        Fanout { lanes, tasks, acks, ack_task, failures, seq: 0 }
    }

    /// Hands a published, enriched batch to every lane; waits while a lane's
    /// queue is full.
    async fn push(&mut self, changes: Vec<Change>, enriched: Enriched, ack: BatchAck) -> Result<(), PipelineError> {
        self.seq += 1;
        let job = Arc::new(Job { seq: self.seq, tally: Tally::of(&changes), enriched, ack });
        drop(changes);
        let _ = self.acks.send(AckMsg::Pushed(job.clone()));
        let need = (job.tally.changes as u32).max(1);
        for lane in &self.lanes {
            let room =
                lane.room.clone().acquire_many_owned(need.min(lane.bound)).await.expect("lane semaphores stay open");
            if lane.tx.send((job.clone(), room)).is_err() {
                return Err(self.failure().await);
            }
        }
        Ok(())
    }

    /// The first error of a lane that stopped (pending forever while all run).
    async fn failure(&mut self) -> PipelineError {
        match self.failures.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Lets every lane flush what it holds, then waits for the final
    /// acknowledgement.
    async fn finish(mut self) -> Result<(), PipelineError> {
        self.lanes.clear();
        drop(self.acks);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let _ = self.ack_task.await;
        match self.failures.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

/// The acknowledgement task: a batch is done when every lane has flushed it
/// (lanes flush in order, so a lane's last flushed sequence covers all
/// before it); the flush LSN then moves past it.
async fn acknowledge(
    mut rx: mpsc::UnboundedReceiver<AckMsg>,
    lanes: usize,
    mut flushed: FlushedLsn,
    ack_tx: watch::Sender<u64>,
    stats: Arc<Stats>,
) {
    let mut lane_seq = vec![0u64; lanes];
    let mut pending = std::collections::VecDeque::<Arc<Job>>::new();
    let latency = observe::metrics::CommitToSink::new("all");
    while let Some(msg) = rx.recv().await {
        match msg {
            AckMsg::Pushed(job) => pending.push_back(job),
            AckMsg::Flushed { lane, seq } => lane_seq[lane] = seq,
        }
        let done = lane_seq.iter().copied().min().unwrap_or(0);
        while pending.front().is_some_and(|j| j.seq <= done) {
            let job = pending.pop_front().expect("front");
            if job.tally.changes > 0 {
                latency.flushed(&job.tally.commits);
                observe::metrics::count_tables("delivered", &job.tally.tables);
                observe::metrics::batch_size(job.tally.changes);
                stats.changes.fetch_add(job.tally.changes as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.rejected.fetch_add(job.enriched.rejected.len() as u64, Ordering::Relaxed);
            }
            let caught_up = pending.is_empty() && stats.reader.buffered() == 0;
            observe::health::batch_done(&stats, job.tally.last_commit_ts_us(), caught_up);
            if let Some(lsn) = flushed.advance(&job.ack) {
                stats.flushed_lsn.store(lsn, Ordering::Relaxed);
                let _ = ack_tx.send(lsn);
            }
        }
    }
}

/// How `Delivery::deliver_with` treats a batch that is not the live stream.
#[derive(Debug, Clone, Default)]
pub struct DeliverOptions {
    /// Redis progress watermark `<prefix>position:<scope>` instead of the
    /// live `<prefix>position`. Snapshot and backfill positions sit below
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
    pub sinks: Sinks,
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
        let sinks = Sinks {
            clickhouse: Arc::new(ClickHouseSink::new(&cfg.clickhouse).with_dead_letter(log.clone())),
            redis: Arc::new(RedisSink::connect(&cfg.redis).await?.with_dead_letter(log.clone())),
            http: Arc::new(HttpSink::new(&cfg.http, log.clone())?),
        };
        Ok(Delivery { log, dim, sinks, stats })
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
        let Some(enriched) = self.publish_and_enrich(batch, opts).await? else { return Ok(()) };
        self.sinks.write_all(&enriched, opts.progress_scope.as_deref()).await?;
        observe::count_changes("delivered", batch);
        observe::metrics::batch_size(batch.len());
        self.stats.changes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.rejected.fetch_add(enriched.rejected.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The first half of a delivery: publishes the batch to the log (retrying
    /// until the broker takes it), enriches it and parks what cannot be
    /// enriched. `None` for a log-only delivery (nothing more to do).
    pub async fn publish_and_enrich(
        &mut self,
        batch: &[Change],
        opts: &DeliverOptions,
    ) -> Result<Option<Enriched>, PipelineError> {
        // The broker's errors are all transient: an oversized message, the
        // one that no retry can fix, is parked by `publish` itself.
        let policy = retry::Policy::sink("broker", None).failed("publishing to the broker failed; retrying");
        let log = &self.log;
        let published = retry::run(&policy, |_| retry::ErrorClass::Transient, |_| log.publish(batch));
        // Never given up (every error is transient); `?` only for the types.
        observe::timed("broker", published).await.map_err(|g| g.error)?;
        observe::count_changes("published", batch);
        if opts.log_only {
            self.stats.changes.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return Ok(None);
        }
        let mut enriched = enrich::enrich(&mut self.dim, batch);
        if opts.replay {
            crate::sinks::mark_replayed(&mut enriched);
        }
        for (change, reason) in &enriched.rejected {
            tracing::error!(table = %change.table, position = %change.position, key = %change.key.to_json(), reason = %reason, "change cannot be enriched; parking it in the dead-letter topic");
            observe::error("enrich");
            let payload = crate::log::envelope::to_vec(change, "", chrono::Utc::now().timestamp_millis());
            self.log.dead_letter("enrich", &crate::sinks::event_id(&change.position), &payload, reason).await?;
        }
        Ok(Some(enriched))
    }
}
