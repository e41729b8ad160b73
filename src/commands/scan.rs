//! The shared part of `snapshot` and `backfill`: a pool of workers that
//! each hold one REPEATABLE READ transaction, read chunks
//! (`source::scan::read_chunk`) and hand their rows to the pipeline's
//! `Delivery` in batches of `pipeline.batch_max_changes`, with a progress
//! bar, and the sinks told when a chunk is done for good.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::enrich::ContentDim;
use crate::observe::Stats;
use crate::pipeline::ack::FlushedLsn;
use crate::pipeline::fanout::Fanout;
use crate::pipeline::{drive, Batches, DeliverOptions, Delivery, PipelineError};
use crate::source::scan::{begin, read_chunk, Chunk, ScanError, ScanPoint, ScanTable};
use crate::source::{slot, SourceEvent, TableName};

/// Why a scan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScanRunError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("loading content for enrichment: {0}")]
    Content(#[from] crate::enrich::ContentError),
    #[error("scan worker failed: {0}")]
    Worker(String),
}

/// Rows read so far against the plan: an indicatif bar on a terminal,
/// a log line every few seconds otherwise.
pub struct ScanProgress {
    what: &'static str,
    total: u64,
    rows: AtomicU64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl ScanProgress {
    pub fn new(what: &'static str, total: u64) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows, {rate}, ETA {eta}",
                )
                .expect("valid template")
                .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} rows/s", s.per_sec());
                }),
            );
            bar.set_message(what);
            bar
        });
        Arc::new(ScanProgress { what, total, rows: AtomicU64::new(0), started: Instant::now(), bar })
    }

    pub fn add(&self, n: u64) {
        self.rows.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    pub fn rate(&self) -> f64 {
        self.rows() as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    fn log_line(&self) {
        let rows = self.rows();
        let rate = self.rate();
        let eta = if rate > 0.0 { self.total.saturating_sub(rows) as f64 / rate } else { f64::NAN };
        tracing::info!(
            "{}: {rows}/{} rows ({:.1}%), {:.0} rows/s, ETA {:.0}s",
            self.what,
            self.total,
            100.0 * rows as f64 / self.total.max(1) as f64,
            rate,
            eta
        );
    }

    /// Logs progress every `every` until the returned task is aborted (no-op on a terminal).
    pub fn spawn_logger(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if self.bar.is_some() {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.log_line();
            }
        }))
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Everything a pool of scan workers needs.
pub struct ScanJob {
    pub cfg: Config,
    pub database: String,
    pub tables: HashMap<TableName, Arc<ScanTable>>,
    /// Row filter (SQL) per table, for backfills.
    pub filters: HashMap<TableName, String>,
    pub chunks: Vec<Chunk>,
    pub point: ScanPoint,
    /// Exported snapshot every worker imports (None: each takes its own).
    pub snapshot: Option<String>,
    pub workers: usize,
    /// Delivery options for a chunk's batches (its Redis progress scope).
    pub options: Box<dyn Fn(&Chunk) -> DeliverOptions + Send + Sync>,
    pub stats: Arc<Stats>,
}

/// Runs a scan job to its end with a progress bar (or log lines): each chunk
/// delivered to every sink is passed to `mark` (the snapshot records it),
/// then every sink forgets the chunk's origin, which is never written again.
/// Returns the rows read.
pub async fn load<F, Fut>(
    job: ScanJob,
    keep_until_imported: Option<Box<dyn Any + Send>>,
    what: &'static str,
    log_only: bool,
    mut mark: F,
) -> Result<u64, ScanRunError>
where
    F: FnMut(Chunk) -> Fut,
    Fut: std::future::Future<Output = Result<(), ScanRunError>>,
{
    let total_rows: u64 = job.chunks.iter().map(|c| c.rows).sum();
    let progress = ScanProgress::new(what, total_rows);
    let logger = progress.spawn_logger(Duration::from_secs(5));
    let sinks = if log_only {
        Vec::new()
    } else {
        crate::sinks::build(&job.cfg, crate::sinks::Refused::Stall).map_err(PipelineError::from)?
    };
    let origin_of = |c: &Chunk| (job.options)(c).origin;
    let origins: HashMap<u32, Option<String>> = job.chunks.iter().map(|c| (c.seq, origin_of(c))).collect();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Chunk>();
    let finished = async {
        while let Some(c) = done_rx.recv().await {
            let origin = origins.get(&c.seq).cloned().flatten();
            mark(c).await?;
            let Some(origin) = origin.as_deref() else { continue };
            for sink in &sinks {
                if let Err(e) = sink.forget_origin(origin).await {
                    tracing::warn!(sink = sink.name(), origin, error = %e, "could not forget a finished chunk's progress (harmless)");
                }
            }
        }
        Ok::<(), ScanRunError>(())
    };
    let (scanned, finished) = tokio::join!(run(job, keep_until_imported, progress.clone(), done_tx), finished);
    if let Some(l) = logger {
        l.abort();
    }
    progress.finish();
    let rows = scanned?;
    finished?;
    Ok(rows)
}

/// Runs the job's chunks on `job.workers` workers. `keep_until_imported`
/// (the session that exported the snapshot) is dropped once every worker
/// has imported the snapshot. Each chunk delivered to every sink is sent
/// on `done`. Returns the rows read.
pub async fn run(
    job: ScanJob,
    keep_until_imported: Option<Box<dyn Any + Send>>,
    progress: Arc<ScanProgress>,
    done: mpsc::UnboundedSender<Chunk>,
) -> Result<u64, ScanRunError> {
    let workers = job.workers.max(1).min(job.chunks.len().max(1));
    let job = Arc::new(job);
    let queue = Arc::new(Mutex::new(job.chunks.iter().cloned().collect::<VecDeque<_>>()));
    let (imported_tx, mut imported) = mpsc::channel::<()>(workers);
    let mut handles = futures::stream::FuturesUnordered::new();
    for id in 0..workers {
        let w = worker(id, job.clone(), queue.clone(), imported_tx.clone(), progress.clone(), done.clone());
        handles.push(tokio::spawn(w));
    }
    drop(imported_tx);
    let mut keep = keep_until_imported;
    let mut waiting = true;
    let mut rows = 0u64;
    loop {
        tokio::select! {
            r = imported.recv(), if waiting => {
                // Every worker imported (or ended): the exporting session may go.
                if r.is_none() {
                    waiting = false;
                    if keep.take().is_some() {
                        tracing::debug!("every worker imported the snapshot; closing the exporting session");
                    }
                }
            }
            joined = handles.next() => match joined {
                None => break,
                Some(Ok(Ok(n))) => rows += n,
                // One failure ends the scan: the chunks in flight are not
                // recorded as done, so the next run reads them again.
                Some(Ok(Err(e))) => {
                    handles.iter().for_each(|h| h.abort());
                    return Err(e);
                }
                Some(Err(e)) => {
                    handles.iter().for_each(|h| h.abort());
                    return Err(ScanRunError::Worker(e.to_string()));
                }
            }
        }
    }
    drop(keep);
    Ok(rows)
}

async fn worker(
    id: usize,
    job: Arc<ScanJob>,
    queue: Arc<Mutex<VecDeque<Chunk>>>,
    imported: mpsc::Sender<()>,
    progress: Arc<ScanProgress>,
    done: mpsc::UnboundedSender<Chunk>,
) -> Result<u64, ScanRunError> {
    let client = slot::connect(job.cfg.source.url.expose()).await?;
    begin(&client, job.snapshot.as_deref()).await?;
    // The first query fixes the transaction's snapshot: enrichment sees
    // content exactly as the rows it joins.
    let dim = ContentDim::load(&client).await?;
    let _ = imported.send(()).await;
    drop(imported);
    let mut delivery = Delivery::connect(&job.cfg, &job.database, dim, job.stats.clone()).await?;
    let mut total = 0u64;
    loop {
        let Some(chunk) = queue.lock().expect("queue lock").pop_front() else { break };
        let table = job.tables.get(&chunk.table).ok_or_else(|| ScanError::NoSuchTable(chunk.table.to_string()))?;
        let opts = (job.options)(&chunk);
        let filter = job.filters.get(&chunk.table).map(String::as_str);
        let (tx, rx) = mpsc::channel::<SourceEvent>(job.cfg.pipeline.channel_capacity.max(1));
        let read = async {
            let tx = tx;
            read_chunk(&client, table, &chunk, filter, job.point, &tx).await
        };
        // The chunk goes through the live stream's batcher and lanes; it is
        // done once every lane has flushed all of it.
        let write = async {
            let mut rx = rx;
            let (ack_tx, _) = watch::channel(0);
            let queue_changes = job.cfg.pipeline.sink_queue_changes;
            let mut fanout =
                Fanout::start(delivery.sinks.clone(), queue_changes, FlushedLsn(0), ack_tx, job.stats.clone());
            let drove = {
                let mut batches = Batches { events: &mut rx, cuts: &[], shutdown: None, stopping: false };
                drive(&mut batches, &mut delivery, &mut fanout, &opts, None, &job.cfg).await
            };
            // A failed delivery drops the receiver, which stops the read.
            drop(rx);
            let finished = fanout.finish().await;
            drove?;
            finished?;
            Ok::<(), ScanRunError>(())
        };
        // Reading and delivering overlap: the next batch decodes while the
        // sinks write this one.
        let (read, written) = tokio::join!(read, write);
        written?;
        let n = read?;
        progress.add(n);
        tracing::debug!(worker = id, table = %chunk.table, chunk = chunk.seq, rows = n, "chunk delivered");
        total += n;
        let _ = done.send(chunk);
    }
    Ok(total)
}
