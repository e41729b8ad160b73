//! Writing engagement events while a test watches the sinks: a writer in
//! the background on a connection of its own, and the statements the mixed
//! workloads are made of (play events inserted, then, on rows written
//! before, durations lengthened, events moved to other content, deletes).
//! Each test keeps its own mix, sizes and pacing, since what it checks
//! depends on them (transactions cut into batches, kills landing mid-write);
//! `pgfanout generate` (src/commands/generate.rs) writes the realistic mix
//! of every event type and device.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::task::JoinHandle;

use super::TestEnv;

/// What a background writer shares with its test: the row changes it has
/// made so far, and whether it has been asked to stop.
#[derive(Default)]
pub struct Progress {
    changes: AtomicU64,
    stop: AtomicBool,
}

impl Progress {
    pub fn add(&self, changes: u64) {
        self.changes.fetch_add(changes, Ordering::Relaxed);
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A writer running in the background (see `spawn`).
pub struct Writer<T> {
    progress: Arc<Progress>,
    task: JoinHandle<T>,
}

/// Runs `write` in the background on a connection of its own to the test's
/// database, with the `Progress` it reports to.
pub fn spawn<T, F, Fut>(t: &TestEnv, write: F) -> Writer<T>
where
    F: FnOnce(tokio_postgres::Client, Arc<Progress>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let url = t.cfg.source.url.expose().to_string();
    let progress = Arc::new(Progress::default());
    let shared = progress.clone();
    let task = tokio::spawn(async move {
        let pg = pgfanout::source::slot::connect(&url).await.expect("writer connection");
        write(pg, shared).await
    });
    Writer { progress, task }
}

impl<T> Writer<T> {
    /// Row changes written so far.
    pub fn changes(&self) -> u64 {
        self.progress.changes()
    }

    /// What it reports, also once it has ended.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Waits for the writer to end by itself; fails the test if it panicked.
    pub async fn finish(self) -> T {
        self.task.await.expect("writer task")
    }

    /// Asks the writer to stop, then waits for it.
    pub async fn stop(self) -> T {
        self.progress.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }
}

/// `n` play events of `content`, in statements of `per_statement` rows.
pub async fn insert_events(pg: &tokio_postgres::Client, content: &str, n: u64, per_statement: u64) {
    let mut left = n;
    while left > 0 {
        let k = left.min(per_statement);
        pg.batch_execute(&format!(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, device)
             SELECT '{content}', 'play', now(), (i * 1000)::int, 'web' FROM generate_series(1, {k}) i"
        ))
        .await
        .unwrap();
        left -= k;
    }
}

/// A duration as SQL: NULL one time in ten, else up to 10 minutes.
pub fn nullable_duration(rng: &mut StdRng) -> String {
    if rng.gen_ratio(1, 10) {
        "NULL".to_string()
    } else {
        rng.gen_range(0..600_000).to_string()
    }
}

/// One row of `insert_plays`: a play event of `content` now.
pub fn play(content: &str, duration: &str) -> String {
    format!("('{content}', 'play', now(), {duration})")
}

/// Inserts `rows` made by `play`.
pub fn insert_plays(rows: &[String]) -> String {
    format!("INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) VALUES {}", rows.join(","))
}

/// `k` ids (with repeats) of rows written so far, `1..=max_id` as the
/// serial gives them (some may be deleted), for an `IN (…)` list.
pub fn random_ids(rng: &mut StdRng, max_id: i64, k: usize) -> String {
    (0..k).map(|_| rng.gen_range(1..=max_id.max(1)).to_string()).collect::<Vec<_>>().join(",")
}

/// Adds `ms` to the duration of the events `ids` (NULL counts as 0).
pub fn lengthen(ids: &str, ms: u32) -> String {
    format!("UPDATE engagement_events SET duration_ms = coalesce(duration_ms, 0) + {ms} WHERE id IN ({ids})")
}

/// Moves the events `ids` to `content`.
pub fn move_to(content: &str, ids: &str) -> String {
    format!("UPDATE engagement_events SET content_id = '{content}' WHERE id IN ({ids})")
}

/// Deletes the events `ids`.
pub fn delete(ids: &str) -> String {
    format!("DELETE FROM engagement_events WHERE id IN ({ids})")
}
