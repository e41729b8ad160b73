//! Readiness, lag and the lag alert: pure arithmetic over a snapshot of the
//! pipeline's progress, and the once-a-second task that publishes it as
//! gauges, collects process metrics and raises the alert.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use super::Stats;
use crate::config::MetricsConfig;

/// Re-log a standing alert this often, so it is visible in any log window.
const ALERT_REPEAT: Duration = Duration::from_secs(60);

/// The pipeline's progress at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub connected: bool,
    pub server_wal_end: u64,
    pub flushed_lsn: u64,
    /// Changes waiting in the channel from the reader to the apply loop.
    pub buffered: u64,
    /// Commit time (µs since the Unix epoch) the apply loop is behind by:
    /// the oldest change it holds, or the last one it delivered while more
    /// wait. 0 when it has delivered everything it read.
    pub behind_commit_ts_us: i64,
}

impl Snapshot {
    pub fn of(stats: &Stats) -> Snapshot {
        Snapshot {
            connected: stats.reader.connected(),
            server_wal_end: stats.reader.server_wal_end(),
            flushed_lsn: stats.flushed_lsn.load(Ordering::Relaxed),
            buffered: stats.reader.buffered(),
            behind_commit_ts_us: stats.behind_commit_ts_us.load(Ordering::Relaxed),
        }
    }

    /// Server WAL end (as last reported) minus the flushed LSN.
    pub fn lag_bytes(&self) -> u64 {
        self.server_wal_end.saturating_sub(self.flushed_lsn)
    }

    /// Now minus the commit time of the change the pipeline is behind by;
    /// 0 when it is caught up with what it has read (an idle source is not
    /// lag, whatever the time since the last change).
    pub fn lag_seconds(&self, now_us: i64) -> f64 {
        if self.behind_commit_ts_us == 0 {
            return 0.0;
        }
        (now_us - self.behind_commit_ts_us).max(0) as f64 / 1e6
    }
}

/// The answer of `/readyz`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub connected: bool,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
}

/// Ready = the replication stream is connected and both lags are within
/// `limits`.
pub fn readiness(s: &Snapshot, limits: &MetricsConfig, now_us: i64) -> Readiness {
    let lag_bytes = s.lag_bytes();
    let lag_seconds = s.lag_seconds(now_us);
    let reason = if !s.connected {
        Some("replication stream not connected".to_string())
    } else if lag_seconds > limits.max_lag_seconds as f64 {
        Some(format!("replication lag {lag_seconds:.1} s is over metrics.max_lag_seconds = {}", limits.max_lag_seconds))
    } else if lag_bytes > limits.max_lag_bytes {
        Some(format!("replication lag {lag_bytes} bytes is over metrics.max_lag_bytes = {}", limits.max_lag_bytes))
    } else {
        None
    };
    Readiness { ready: reason.is_none(), reason, connected: s.connected, lag_bytes, lag_seconds }
}

/// Whether a lag is over either threshold (being disconnected is not lag).
pub fn lag_over(r: &Readiness, limits: &MetricsConfig) -> bool {
    r.lag_seconds > limits.max_lag_seconds as f64 || r.lag_bytes > limits.max_lag_bytes
}

/// What the lag alert does on one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStep {
    Raise,
    Repeat,
    Clear,
}

/// A standing alert: raised once when its condition starts, repeated every
/// `ALERT_REPEAT` while it lasts, cleared once when it ends.
#[derive(Debug, Default)]
pub struct Alert {
    last_logged: Option<Instant>,
}

impl Alert {
    pub fn update(&mut self, firing: bool, now: Instant) -> Option<AlertStep> {
        match (firing, self.last_logged) {
            (true, None) => {
                self.last_logged = Some(now);
                Some(AlertStep::Raise)
            }
            (true, Some(t)) if now.duration_since(t) >= ALERT_REPEAT => {
                self.last_logged = Some(now);
                Some(AlertStep::Repeat)
            }
            (false, Some(_)) => {
                self.last_logged = None;
                Some(AlertStep::Clear)
            }
            _ => None,
        }
    }

    pub fn firing(&self) -> bool {
        self.last_logged.is_some()
    }
}

pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The apply loop took the first change of a batch: from now on it is
/// behind by at least that change's commit.
pub fn batch_started(stats: &Stats, first_commit_ts_us: i64) {
    stats.open_batches.fetch_add(1, Ordering::Relaxed);
    let _ = stats.behind_commit_ts_us.compare_exchange(0, first_commit_ts_us, Ordering::Relaxed, Ordering::Relaxed);
}

/// The acknowledgement task finished a batch: every sink flushed it; its
/// last change (if it had any, then `batch_started` counted it) committed at
/// `last_commit_ts_us`. `queue_empty`: no later batch waits for the sinks
/// and nothing waits in the reader's channel. Caught up only if, besides,
/// the loop holds no batch it started and has not pushed yet: without that
/// count, a batch finishing while the loop was still publishing the next
/// one reset the lag to 0 for good if that next one then stalled.
pub fn batch_done(stats: &Stats, last_commit_ts_us: Option<i64>, queue_empty: bool) {
    let mut open = stats.open_batches.load(Ordering::Relaxed);
    if let Some(ts) = last_commit_ts_us {
        super::metrics::delivered_commit(ts);
        open = stats.open_batches.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
    }
    match (queue_empty && open == 0, last_commit_ts_us) {
        (true, _) => stats.behind_commit_ts_us.store(0, Ordering::Relaxed),
        (false, Some(ts)) => stats.behind_commit_ts_us.store(ts, Ordering::Relaxed),
        (false, None) => {}
    }
}

/// Once every `every`: publishes the progress gauges and process metrics,
/// runs the exporter's upkeep and raises or clears the lag alert.
pub async fn watch(stats: Arc<Stats>, limits: MetricsConfig, handle: PrometheusHandle, every: Duration) {
    let process = metrics_process::Collector::default();
    process.describe();
    let mut alert = Alert::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = Snapshot::of(&stats);
        let r = readiness(&snapshot, &limits, now_us());
        super::metrics::publish_progress(&snapshot, &r);
        process.collect();
        handle.run_upkeep();
        match alert.update(lag_over(&r, &limits), Instant::now()) {
            Some(AlertStep::Raise | AlertStep::Repeat) => {
                super::metrics::lag_alert(true);
                tracing::error!(
                    lag_bytes = r.lag_bytes,
                    lag_seconds = r.lag_seconds,
                    max_lag_bytes = limits.max_lag_bytes,
                    max_lag_seconds = limits.max_lag_seconds,
                    "replication lag over threshold: the sinks are not keeping up (see pgfanout_sink_flush_seconds, pgfanout_sink_retries_total)"
                );
            }
            Some(AlertStep::Clear) => {
                super::metrics::lag_alert(false);
                tracing::info!(
                    lag_bytes = r.lag_bytes,
                    lag_seconds = r.lag_seconds,
                    "replication lag back under threshold"
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MetricsConfig {
        MetricsConfig { listen: String::new(), max_lag_seconds: 60, max_lag_bytes: 1000 }
    }

    #[test]
    fn lag_is_zero_when_caught_up() {
        let s = Snapshot { connected: true, server_wal_end: 500, flushed_lsn: 700, ..Default::default() };
        assert_eq!(s.lag_bytes(), 0);
        assert_eq!(s.lag_seconds(1_000_000_000), 0.0);
        let r = readiness(&s, &limits(), 1_000_000_000);
        assert!(r.ready, "{r:?}");
    }

    #[test]
    fn readiness_names_its_reason() {
        let now = 100_000_000;
        let down = Snapshot::default();
        assert_eq!(readiness(&down, &limits(), now).reason.as_deref(), Some("replication stream not connected"));

        let slow = Snapshot { connected: true, behind_commit_ts_us: now - 61_000_000, ..Default::default() };
        let r = readiness(&slow, &limits(), now);
        assert!(!r.ready && r.reason.unwrap().contains("max_lag_seconds"));
        assert!((r.lag_seconds - 61.0).abs() < 1e-9);

        let far = Snapshot { connected: true, server_wal_end: 5000, flushed_lsn: 1000, ..Default::default() };
        let r = readiness(&far, &limits(), now);
        assert_eq!(r.lag_bytes, 4000);
        assert!(!r.ready && r.reason.unwrap().contains("max_lag_bytes"));
        assert!(lag_over(&readiness(&far, &limits(), now), &limits()));
        assert!(!lag_over(&readiness(&down, &limits(), now), &limits()));
    }

    #[test]
    fn alert_raises_repeats_and_clears_once() {
        let t0 = Instant::now();
        let mut a = Alert::default();
        assert_eq!(a.update(false, t0), None);
        assert_eq!(a.update(true, t0), Some(AlertStep::Raise));
        assert_eq!(a.update(true, t0 + Duration::from_secs(1)), None);
        assert_eq!(a.update(true, t0 + ALERT_REPEAT), Some(AlertStep::Repeat));
        assert!(a.firing());
        assert_eq!(a.update(false, t0 + ALERT_REPEAT * 2), Some(AlertStep::Clear));
        assert_eq!(a.update(false, t0 + ALERT_REPEAT * 3), None);
    }

    #[test]
    fn behind_position_follows_batches() {
        let stats = Stats::default();
        batch_started(&stats, 10);
        batch_started(&stats, 20); // already behind by the older one
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 10);
        batch_done(&stats, Some(30), false);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 30);
        batch_done(&stats, None, false);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 30);
        batch_done(&stats, Some(40), true);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 0);
        // A batch the loop started but has not handed to the sinks yet: an
        // empty queue behind the one finishing is not caught up.
        batch_started(&stats, 50);
        batch_started(&stats, 60);
        batch_done(&stats, Some(55), true);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 55);
        batch_done(&stats, None, true);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 55);
        batch_done(&stats, Some(65), true);
        assert_eq!(stats.behind_commit_ts_us.load(Ordering::Relaxed), 0);
    }
}
