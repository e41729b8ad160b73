//! Progress counters the data path keeps and the observers read: plain
//! atomics, so reporting never waits on anything.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

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

/// What the replication reader knows and the observers need: whether the
/// stream is up, how far the server's WAL reaches, and how many changes sit
/// in the channel to the apply loop.
#[derive(Debug, Default)]
pub struct ReaderProgress {
    connected: AtomicBool,
    server_wal_end: AtomicU64,
    buffered: AtomicU64,
}

impl ReaderProgress {
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records the server's WAL end from a keepalive or a WAL data header
    /// (0 there means "not sent" and is ignored).
    pub fn saw_server_wal_end(&self, lsn: u64) {
        self.server_wal_end.fetch_max(lsn, Ordering::Relaxed);
    }

    pub fn server_wal_end(&self) -> u64 {
        self.server_wal_end.load(Ordering::Relaxed)
    }

    /// A change is about to enter the channel to the apply loop.
    pub fn buffered_one(&self) {
        self.buffered.fetch_add(1, Ordering::Relaxed);
    }

    /// The apply loop took a change out of the channel.
    pub fn took_one(&self) {
        // Saturating: the counter is a gauge, never worth a panic or a wrap.
        let _ = self.buffered.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }

    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }
}
