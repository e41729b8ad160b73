//! The sink lanes and the acknowledgement task: each sink writes batches in
//! its own task with a queue bounded in changes, and the slot's flush
//! position moves only past batches every lane has flushed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::ack::{min_flushed, BatchAck, FlushedLsn};
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
                    // A sink that panics stops the pipeline like one that
                    // fails: without it the lane would end unheard and the
                    // loop wait on it for ever.
                    let write = std::panic::AssertUnwindSafe(sink.write(&job.enriched)).catch_unwind();
                    let failed = match observe::timed(sink.name(), write).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.into()),
                        Err(_) => Some(PipelineError::SinkPanicked { sink: sink.name() }),
                    };
                    if let Some(e) = failed {
                        let _ = fail_tx.send(e);
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
        let done = if lane_seq.is_empty() { u64::MAX } else { min_flushed(&lane_seq) };
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::enrich::{self, ContentDim};
    use crate::sinks::{Probe, SinkError};
    use crate::source::values::Value;
    use crate::source::{Op, Position, Row, TxInfo};

    /// A sink in memory whose writes the test lets through one at a time:
    /// each write takes a permit of `gate` first, then fails if told to, or
    /// records the positions it was given.
    struct FakeSink {
        name: &'static str,
        gate: Semaphore,
        fail: AtomicBool,
        panic: AtomicBool,
        /// The engagement positions of each batch written, in order.
        written: watch::Sender<Vec<Vec<Position>>>,
    }

    impl FakeSink {
        /// A sink whose writes wait for `release`.
        fn gated(name: &'static str) -> Arc<FakeSink> {
            Arc::new(FakeSink {
                name,
                gate: Semaphore::new(0),
                fail: AtomicBool::new(false),
                panic: AtomicBool::new(false),
                written: watch::Sender::new(Vec::new()),
            })
        }

        /// A sink that writes at once.
        fn open(name: &'static str) -> Arc<FakeSink> {
            let sink = FakeSink::gated(name);
            sink.gate.add_permits(Semaphore::MAX_PERMITS);
            sink
        }

        /// Lets `n` more writes through.
        fn release(&self, n: usize) {
            self.gate.add_permits(n);
        }

        fn written(&self) -> Vec<Vec<Position>> {
            self.written.borrow().clone()
        }

        /// Waits until `n` batches are written.
        async fn wait_written(&self, n: usize) {
            let mut rx = self.written.subscribe();
            soon(&format!("{} writing {n} batches", self.name), rx.wait_for(|w| w.len() >= n))
                .await
                .expect("sender lives");
        }
    }

    #[async_trait::async_trait]
    impl Sink for FakeSink {
        fn name(&self) -> &'static str {
            self.name
        }

        async fn probe(&self) -> Result<Probe, String> {
            Ok(Probe::default())
        }

        async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
            self.gate.acquire().await.expect("gate stays open").forget();
            if self.fail.load(Ordering::Relaxed) {
                return Err(SinkError::Http(format!("{} told to fail", self.name)));
            }
            assert!(!self.panic.load(Ordering::Relaxed), "{} told to panic", self.name);
            let positions = batch.engagements.iter().map(|e| e.position).collect();
            self.written.send_modify(|w| w.push(positions));
            Ok(())
        }
    }

    fn lanes(sinks: &[&Arc<FakeSink>]) -> Vec<Arc<dyn Sink>> {
        sinks.iter().map(|s| Arc::clone(s) as Arc<dyn Sink>).collect()
    }

    /// A fanout whose flush position starts at 0, with the receiver the
    /// replication reader would acknowledge from.
    fn start(sinks: Vec<Arc<dyn Sink>>, queue_changes: usize) -> (Fanout, watch::Receiver<u64>, Arc<Stats>) {
        let (ack_tx, ack_rx) = watch::channel(0);
        let stats = Arc::new(Stats::default());
        (Fanout::start(sinks, queue_changes, FlushedLsn(0), ack_tx, stats.clone()), ack_rx, stats)
    }

    /// `n` inserts into `engagement_events` by transaction `xid`, which
    /// commits at `commit_lsn`; ordinals from `first`.
    fn inserts(xid: u32, commit_lsn: u64, first: u32, n: u32) -> Vec<Change> {
        let tx = TxInfo { xid, commit_lsn, commit_ts_us: 1_700_000_000_000_000 + i64::from(xid), ..TxInfo::default() };
        (first..first + n)
            .map(|ordinal| {
                let id = i64::from(xid) * 1000 + i64::from(ordinal);
                let ts = chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + id).expect("in range");
                let row = Row(vec![
                    ("id".into(), Value::Int8(id)),
                    ("content_id".into(), Value::Null),
                    ("event_ts".into(), Value::TimestampTz(ts)),
                    ("duration_ms".into(), Value::Int4(1_000)),
                ]);
                Change {
                    table: TableName::new(enrich::EVENTS_TABLE.0, enrich::EVENTS_TABLE.1),
                    op: Op::Create,
                    key: Row(vec![("id".into(), Value::Int8(id))]),
                    before: None,
                    after: Some(row),
                    lsn: commit_lsn - 0x80 + u64::from(ordinal),
                    tx,
                    position: Position { commit_lsn, ordinal },
                    columns: None,
                    unchanged_toast: Vec::new(),
                }
            })
            .collect()
    }

    /// Every change of transaction `xid` committed at `commit_lsn`, as one
    /// batch that ends with the commit (which ends at `commit_lsn + 0x10`).
    fn whole(xid: u32, commit_lsn: u64, n: u32) -> (Vec<Change>, BatchAck) {
        (inserts(xid, commit_lsn, 0, n), BatchAck { last_commit_end: Some(end(commit_lsn)), ..BatchAck::default() })
    }

    fn end(commit_lsn: u64) -> u64 {
        commit_lsn + 0x10
    }

    fn positions(changes: &[Change]) -> Vec<Position> {
        changes.iter().map(|c| c.position).collect()
    }

    /// The push the loop makes: the batch with its enrichment.
    fn push<'a>(
        fanout: &'a mut Fanout,
        (changes, ack): &(Vec<Change>, BatchAck),
    ) -> impl Future<Output = Result<(), PipelineError>> + 'a {
        let enriched = enrich::enrich(&mut ContentDim::default(), changes);
        assert_eq!(enriched.engagements.len(), changes.len(), "every fake change enriches: {:?}", enriched.rejected);
        fanout.push(changes.clone(), enriched, *ack)
    }

    /// Fails the test if `f` does not complete (a hang, not a slow machine:
    /// nothing here waits on anything outside the process).
    async fn soon<F: Future>(what: &str, f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f).await.unwrap_or_else(|_| panic!("{what} did not complete"))
    }

    /// Lets every task the test woke run until it waits again: on the
    /// current-thread runtime each yield runs every ready task once, and the
    /// longest chain here (a released write, the lane's flush message, the
    /// acknowledgement task, a push waiting for room) is a few hops.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// Fails the test if `f` completes while the tasks settle.
    async fn assert_pending<F: Future + Unpin>(what: &str, f: &mut F)
    where
        F::Output: std::fmt::Debug,
    {
        tokio::select! {
            biased;
            out = f => panic!("{what} completed: {out:?}"),
            () = settle() => {}
        }
    }

    #[tokio::test]
    async fn a_slow_lane_does_not_hold_the_others_within_its_bound() {
        let (slow, fast) = (FakeSink::gated("slow"), FakeSink::open("fast"));
        // The slow lane first: the loop hands it every batch before the fast one.
        let (mut fanout, acked, _) = start(lanes(&[&slow, &fast]), 10);
        let batches = [whole(1, 0x100, 3), whole(2, 0x200, 3), whole(3, 0x300, 3)];
        for b in &batches {
            soon("a push within the bound", push(&mut fanout, b)).await.expect("push");
        }
        fast.wait_written(3).await;
        assert_eq!(fast.written(), batches.iter().map(|(c, _)| positions(c)).collect::<Vec<_>>());
        settle().await;
        assert!(slow.written().is_empty());
        assert_eq!(*acked.borrow(), 0, "the slow lane has flushed nothing");

        slow.release(3);
        soon("finish", fanout.finish()).await.expect("finish");
        assert_eq!(slow.written(), fast.written());
        assert_eq!(*acked.borrow(), end(0x300));
    }

    #[tokio::test]
    async fn a_full_lane_stops_the_loop() {
        let (slow, fast) = (FakeSink::gated("slow"), FakeSink::open("fast"));
        let (mut fanout, acked, _) = start(lanes(&[&slow, &fast]), 10);
        for b in [whole(1, 0x100, 3), whole(2, 0x200, 3), whole(3, 0x300, 3)] {
            soon("a push within the bound", push(&mut fanout, &b)).await.expect("push");
        }
        // 9 of 10 changes queued for the slow lane: 3 more do not fit.
        let fourth = whole(4, 0x400, 3);
        let mut pushing = Box::pin(push(&mut fanout, &fourth));
        assert_pending("a push past the bound", &mut pushing).await;
        assert_eq!(fast.written().len(), 3, "no lane gets the batch while one is full");
        // The slow lane flushes its first batch: room for 3 again.
        slow.release(1);
        soon("the push once the lane has room", pushing).await.expect("push");
        fast.wait_written(4).await;
        assert_eq!(slow.written(), vec![positions(&whole(1, 0x100, 3).0)]);
        soon("ack of batch 1", acked.clone().wait_for(|l| *l >= end(0x100))).await.expect("ack");
        assert_eq!(*acked.borrow(), end(0x100));

        // A batch larger than the bound takes the whole lane: it waits until
        // the lane is empty, and then goes.
        let huge = whole(5, 0x500, 15);
        let mut pushing = Box::pin(push(&mut fanout, &huge));
        assert_pending("a push larger than the bound into a non-empty lane", &mut pushing).await;
        slow.release(2);
        assert_pending("a push larger than the bound into a non-empty lane", &mut pushing).await;
        slow.release(1);
        soon("the push once the lane is empty", pushing).await.expect("push");
        slow.release(1);
        soon("finish", fanout.finish()).await.expect("finish");
        assert_eq!(slow.written().len(), 5);
        assert_eq!(slow.written(), fast.written());
        assert_eq!(*acked.borrow(), end(0x500));
    }

    /// Every order in which two lanes can flush four batches (one ending in
    /// an open transaction, one an idle keepalive without changes): after
    /// each flush the position is exactly what both lanes have.
    #[tokio::test]
    async fn the_flush_lsn_never_passes_a_batch_some_lane_lacks() {
        let tx2 = inserts(2, 0x200, 0, 3);
        let batches = [
            whole(1, 0x100, 2),
            (tx2[..2].to_vec(), BatchAck { open_tx: true, ..BatchAck::default() }),
            (
                [&tx2[2..], &inserts(3, 0x300, 0, 2)[..]].concat(),
                BatchAck { last_commit_end: Some(end(0x300)), ..BatchAck::default() },
            ),
            (Vec::new(), BatchAck { idle_wal_end: Some(0x480), ..BatchAck::default() }),
        ];
        // The flush position once both lanes have the first `n` batches:
        // the second batch ends inside transaction 2, so it adds nothing.
        let expected = [0, end(0x100), end(0x100), end(0x300), 0x480];
        for order in (0u32..1 << 8).filter(|o| o.count_ones() == 4) {
            let sinks = [FakeSink::gated("a"), FakeSink::gated("b")];
            let (mut fanout, acked, _) = start(lanes(&[&sinks[0], &sinks[1]]), 100);
            for b in &batches {
                soon("a push within the bound", push(&mut fanout, b)).await.expect("push");
            }
            let mut flushed = [0, 0];
            for step in 0..8 {
                let lane = ((order >> step) & 1) as usize;
                sinks[lane].release(1);
                flushed[lane] += 1;
                sinks[lane].wait_written(flushed[lane]).await;
                settle().await;
                let both = flushed[0].min(flushed[1]);
                assert_eq!(*acked.borrow(), expected[both], "order {order:08b}, lanes flushed {flushed:?}");
            }
            soon("finish", fanout.finish()).await.expect("finish");
            let want: Vec<_> = batches.iter().map(|(c, _)| positions(c)).collect();
            assert_eq!(sinks[0].written(), want);
            assert_eq!(sinks[1].written(), want);
            assert_eq!(*acked.borrow(), 0x480);
        }
    }

    #[tokio::test]
    async fn a_failed_lane_stops_the_pipeline_without_acknowledging() {
        let (good, bad) = (FakeSink::open("good"), FakeSink::open("bad"));
        let (mut fanout, acked, stats) = start(lanes(&[&good, &bad]), 100);
        soon("push", push(&mut fanout, &whole(1, 0x100, 2))).await.expect("push");
        soon("ack of batch 1", acked.clone().wait_for(|l| *l == end(0x100))).await.expect("ack");

        bad.fail.store(true, Ordering::Relaxed);
        let second = whole(2, 0x200, 2);
        soon("push", push(&mut fanout, &second)).await.expect("the lane fails after taking the batch");
        let e = soon("the lane's failure", fanout.failure()).await;
        assert!(matches!(&e, PipelineError::Sink(SinkError::Http(m)) if m == "bad told to fail"), "{e:?}");
        good.wait_written(2).await;
        // Drains the good lane and the acknowledgement task to the end.
        let _ = soon("finish", fanout.finish()).await;
        assert_eq!(good.written()[1], positions(&second.0));
        assert_eq!(bad.written().len(), 1);
        assert_eq!(*acked.borrow(), end(0x100), "batch 2 only the good lane flushed");
        assert_eq!(stats.flushed_lsn.load(Ordering::Relaxed), end(0x100));
        assert_eq!(stats.changes.load(Ordering::Relaxed), 2, "only batch 1 counts as delivered");
    }

    #[tokio::test]
    async fn push_and_finish_report_a_failed_lane() {
        // The loop pushes again before it looked at the failure.
        let (good, bad) = (FakeSink::open("good"), FakeSink::open("bad"));
        bad.fail.store(true, Ordering::Relaxed);
        let (mut fanout, acked, _) = start(lanes(&[&good, &bad]), 100);
        soon("push", push(&mut fanout, &whole(1, 0x100, 2))).await.expect("the lane fails after taking the batch");
        good.wait_written(1).await;
        settle().await;
        let e = soon("push to a failed lane", push(&mut fanout, &whole(2, 0x200, 2))).await.expect_err("lane failed");
        assert!(matches!(&e, PipelineError::Sink(SinkError::Http(m)) if m == "bad told to fail"), "{e:?}");
        let _ = soon("finish", fanout.finish()).await;
        assert_eq!(*acked.borrow(), 0);

        // Shutdown drains what the lanes hold; a lane that failed meanwhile
        // is the result.
        let (good, bad) = (FakeSink::open("good"), FakeSink::gated("bad"));
        let (mut fanout, acked, _) = start(lanes(&[&good, &bad]), 100);
        soon("push", push(&mut fanout, &whole(1, 0x100, 2))).await.expect("push");
        bad.fail.store(true, Ordering::Relaxed);
        bad.release(1);
        let e = soon("finish", fanout.finish()).await.expect_err("lane failed");
        assert!(matches!(&e, PipelineError::Sink(SinkError::Http(m)) if m == "bad told to fail"), "{e:?}");
        assert_eq!(good.written().len(), 1);
        assert_eq!(*acked.borrow(), 0);
    }

    #[tokio::test]
    async fn a_panicking_sink_stops_the_pipeline_without_acknowledging() {
        let (good, bad) = (FakeSink::open("good"), FakeSink::open("bad"));
        bad.panic.store(true, Ordering::Relaxed);
        let (mut fanout, acked, _) = start(lanes(&[&good, &bad]), 100);
        soon("push", push(&mut fanout, &whole(1, 0x100, 2))).await.expect("push");
        let e = soon("the lane's failure", fanout.failure()).await;
        assert!(matches!(e, PipelineError::SinkPanicked { sink: "bad" }), "{e:?}");
        good.wait_written(1).await;
        let _ = soon("finish", fanout.finish()).await;
        assert_eq!(*acked.borrow(), 0, "nothing acknowledged past a batch the panicking sink lacks");
    }

    #[tokio::test]
    async fn without_lanes_a_batch_is_acknowledged_once_pushed() {
        let (mut fanout, acked, stats) = start(Vec::new(), 10);
        soon("push", push(&mut fanout, &whole(1, 0x100, 20))).await.expect("push");
        soon("ack of batch 1", acked.clone().wait_for(|l| *l == end(0x100))).await.expect("ack");
        let mut failing = Box::pin(fanout.failure());
        assert_pending("failure without lanes", &mut failing).await;
        drop(failing);
        soon("push", push(&mut fanout, &(Vec::new(), BatchAck { idle_wal_end: Some(0x180), ..BatchAck::default() })))
            .await
            .expect("push");
        soon("finish", fanout.finish()).await.expect("finish");
        assert_eq!(*acked.borrow(), 0x180);
        assert_eq!(stats.changes.load(Ordering::Relaxed), 20);
    }
}
