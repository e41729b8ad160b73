//! The sink lanes and the acknowledgement task: each sink writes batches in
//! its own task with a queue bounded in changes, and the slot's flush
//! position moves only past batches every lane has flushed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::ack::{BatchAck, FlushedLsn};
use super::PipelineError;
use crate::enrich::Enriched;
use crate::observe::{self, metrics::CommitToSink, Stats};
use crate::sinks::Sink;
use crate::source::{Change, TableName};

/// What metrics need of a batch's changes, without their rows: a batch
/// queued for slow sinks keeps this instead of the changes, so it holds its
/// data once (in the enriched form the sinks write).
#[derive(Debug, Default)]
pub struct Tally {
    /// Commit time (µs since the epoch) of each transaction's run of
    /// changes, with the run's length.
    pub commits: Vec<(i64, usize)>,
    /// Changes per table.
    pub tables: Vec<(TableName, u64)>,
    pub changes: usize,
}

impl Tally {
    pub fn of(batch: &[Change]) -> Tally {
        let mut commits: Vec<(i64, usize)> = Vec::new();
        for c in batch {
            match commits.last_mut() {
                Some((ts, n)) if *ts == c.tx.commit_ts_us => *n += 1,
                _ => commits.push((c.tx.commit_ts_us, 1)),
            }
        }
        Tally { commits, tables: per_table(batch), changes: batch.len() }
    }

    pub fn last_commit_ts_us(&self) -> Option<i64> {
        self.commits.last().map(|(ts, _)| *ts)
    }
}

/// A batch's changes per table, in order of first appearance.
pub fn per_table(batch: &[Change]) -> Vec<(TableName, u64)> {
    let mut tables: Vec<(TableName, u64)> = Vec::new();
    for c in batch {
        match tables.iter_mut().find(|(name, _)| *name == c.table) {
            Some((_, n)) => *n += 1,
            None => tables.push((c.table.clone(), 1)),
        }
    }
    tables
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
pub struct Fanout {
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
    pub fn start(
        sinks: Vec<Arc<dyn Sink>>,
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
        for (lane, sink) in sinks.into_iter().enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<Job>, OwnedSemaphorePermit)>();
            let (acks, fail_tx) = (acks.clone(), fail_tx.clone());
            tasks.push(tokio::spawn(async move {
                let latency = CommitToSink::new(sink.name());
                while let Some((job, room)) = rx.recv().await {
                    if let Err(e) = observe::timed(sink.name(), sink.write(&job.enriched)).await {
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
    pub async fn push(&mut self, changes: Vec<Change>, enriched: Enriched, ack: BatchAck) -> Result<(), PipelineError> {
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
    pub async fn failure(&mut self) -> PipelineError {
        match self.failures.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Lets every lane flush what it holds, then waits for the final
    /// acknowledgement.
    pub async fn finish(mut self) -> Result<(), PipelineError> {
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
    let latency = CommitToSink::new("all");
    while let Some(msg) = rx.recv().await {
        match msg {
            AckMsg::Pushed(job) => pending.push_back(job),
            AckMsg::Flushed { lane, seq } => lane_seq[lane] = seq,
        }
        // No lane (a log-only run): a batch is done once it is published.
        let done = lane_seq.iter().copied().min().unwrap_or(u64::MAX);
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
