//! The metrics pgfanout exports, by name, and the helpers the data path
//! calls to report through the `metrics` facade. Names and labels are a
//! contract with the dashboards and alert rules (the compose demo's Grafana
//! files use them as they are): change them only together.
//!
//! Without an installed recorder (library use, in-process tests) every call
//! here is a no-op.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::health::{Readiness, Snapshot};

/// `{table, stage}`: changes read from the slot, published to the broker,
/// and delivered (flushed by every sink).
pub const CHANGES: &str = "pgfanout_changes_total";
pub const LAG_BYTES: &str = "pgfanout_replication_lag_bytes";
pub const LAG_SECONDS: &str = "pgfanout_replication_lag_seconds";
/// `{sink}`: time for one batch, retries included (`broker` is the publish).
pub const SINK_FLUSH_SECONDS: &str = "pgfanout_sink_flush_seconds";
pub const BATCH_SIZE: &str = "pgfanout_batch_size";
pub const SINK_RETRIES: &str = "pgfanout_sink_retries_total";
pub const SINK_ERRORS: &str = "pgfanout_sink_errors_total";
/// `{sink}`: failed attempts in a row of the batch the sink is working on.
pub const SINK_CONSECUTIVE_FAILURES: &str = "pgfanout_sink_consecutive_failures";
pub const DEAD_LETTERS: &str = "pgfanout_dead_letters_total";
/// Records of a replay that the log already held, not published again.
pub const LOG_SKIPPED: &str = "pgfanout_log_records_already_held_total";
pub const ERRORS: &str = "pgfanout_errors_total";
pub const BUFFER_OCCUPANCY: &str = "pgfanout_buffer_occupancy";
pub const FLUSHED_LSN: &str = "pgfanout_flushed_lsn";
pub const CONNECTED: &str = "pgfanout_replication_connected";
pub const READY: &str = "pgfanout_ready";
pub const LAG_ALERT: &str = "pgfanout_lag_alert";
pub const LAST_DELIVERED_COMMIT: &str = "pgfanout_last_delivered_commit_timestamp_seconds";
/// `{sink}`: per change of the live stream, PostgreSQL commit time to the
/// moment that sink's write returned; `all` when every sink had flushed it.
pub const COMMIT_TO_SINK_SECONDS: &str = "pgfanout_commit_to_sink_seconds";

/// `{outcome}`: transactions the server streamed before their commit
/// (protocol 2+), by how they ended: `committed` or `aborted`.
pub const STREAMED_TRANSACTIONS: &str = "pgfanout_streamed_transactions_total";
/// Bytes of streamed, not yet committed transactions held in memory (set
/// when one spills or ends).
pub const STREAM_BUFFER_BYTES: &str = "pgfanout_stream_buffer_bytes";
/// Bytes of streamed transactions written to spill files.
pub const STREAM_SPILLED_BYTES: &str = "pgfanout_stream_spilled_bytes_total";

/// Failed attempts in a row after which a sink is reported as failing
/// (the alert log line), then again every `KEEPS_FAILING_REPEAT`.
pub const KEEPS_FAILING_AFTER: u32 = 5;
const KEEPS_FAILING_REPEAT: u32 = 20;

const FLUSH_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Fine enough to read p50 and p99 anywhere from 1 ms to 10 s (each bucket
/// at most 1.5 times the one below it, so interpolation within a bucket is
/// off by well under that); 30 and 60 s catch a stalled sink.
const COMMIT_TO_SINK_BUCKETS: &[f64] = &[
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
    0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder
/// (once; later calls return the same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(SINK_FLUSH_SECONDS.into()), FLUSH_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(COMMIT_TO_SINK_SECONDS.into()), COMMIT_TO_SINK_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(e) = ::metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "another metrics recorder is installed; /metrics will stay empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(CHANGES, Unit::Count, "Row changes by table and stage: read (from the slot), published (to the broker), delivered (flushed by every sink).");
    describe_gauge!(LAG_BYTES, Unit::Bytes, "Server WAL end (from keepalives) minus the flushed LSN.");
    describe_gauge!(LAG_SECONDS, Unit::Seconds, "Now minus the commit time of the change the pipeline is behind by; 0 when it has delivered everything it read.");
    describe_histogram!(
        SINK_FLUSH_SECONDS,
        Unit::Seconds,
        "Time for one batch to be flushed by a sink, retries included."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Changes per delivered batch.");
    describe_histogram!(
        COMMIT_TO_SINK_SECONDS,
        Unit::Seconds,
        "Per change of the live stream: PostgreSQL commit time to the moment the sink's write returned (all: every sink had flushed it)."
    );
    describe_counter!(SINK_RETRIES, Unit::Count, "Failed sink attempts that were retried.");
    describe_counter!(SINK_ERRORS, Unit::Count, "Failed sink attempts.");
    describe_gauge!(
        SINK_CONSECUTIVE_FAILURES,
        Unit::Count,
        "Failed attempts in a row of the batch the sink is working on."
    );
    describe_counter!(DEAD_LETTERS, Unit::Count, "Payloads parked in the dead-letter topic.");
    describe_counter!(
        LOG_SKIPPED,
        Unit::Count,
        "Records of a replay (after a restart or a failed publish) that the log already held, so not published again."
    );
    describe_counter!(ERRORS, Unit::Count, "Errors by kind (replication, publish, enrich, lag, ...).");
    describe_gauge!(
        BUFFER_OCCUPANCY,
        Unit::Count,
        "Changes waiting in the channel from the replication reader to the apply loop."
    );
    describe_counter!(
        STREAMED_TRANSACTIONS,
        Unit::Count,
        "Transactions PostgreSQL streamed before their commit (protocol 2+), by outcome."
    );
    describe_gauge!(STREAM_BUFFER_BYTES, Unit::Bytes, "Streamed transactions not yet committed, held in memory.");
    describe_counter!(STREAM_SPILLED_BYTES, Unit::Bytes, "Streamed transactions written to spill files.");
    describe_gauge!(FLUSHED_LSN, "Slot position acknowledged to PostgreSQL (flushed by every sink).");
    describe_gauge!(CONNECTED, "1 while the replication stream is connected.");
    describe_gauge!(READY, "1 while /readyz answers 200.");
    describe_gauge!(LAG_ALERT, "1 while the replication lag is over its threshold.");
    describe_gauge!(
        LAST_DELIVERED_COMMIT,
        Unit::Seconds,
        "Commit time of the last delivered change, seconds since the Unix epoch."
    );
    // Series that alert rules compare against exist from the start, at 0
    // (each configured sink registers its own, see `register_sink`).
    register_sink("broker");
    counter!(DEAD_LETTERS, "sink" => "enrich").absolute(0);
    for kind in ["sink", "replication", "enrich", "lag"] {
        counter!(ERRORS, "kind" => kind).absolute(0);
    }
    gauge!(LAG_ALERT).set(0.0);
}

/// Creates the series of one sink (a `sink` label) at 0, so that alert
/// rules comparing them see the sink before its first failure.
pub fn register_sink(sink: &'static str) {
    counter!(SINK_RETRIES, "sink" => sink).absolute(0);
    counter!(SINK_ERRORS, "sink" => sink).absolute(0);
    gauge!(SINK_CONSECUTIVE_FAILURES, "sink" => sink).set(0.0);
    counter!(DEAD_LETTERS, "sink" => sink).absolute(0);
}

/// Runs `f` (one sink's write of one batch) and records how long it took.
pub async fn timed<F: Future>(sink: &'static str, f: F) -> F::Output {
    let start = Instant::now();
    let out = f.await;
    histogram!(SINK_FLUSH_SECONDS, "sink" => sink).record(start.elapsed().as_secs_f64());
    out
}

/// One failed attempt of `sink`; `failures` counts the attempts in a row
/// that failed so far. After `KEEPS_FAILING_AFTER` of them this is the
/// "sink X keeps failing" alert.
pub fn sink_failed(sink: &'static str, failures: u32, cause: &dyn fmt::Display, retrying: bool) {
    counter!(SINK_ERRORS, "sink" => sink).increment(1);
    error("sink");
    if retrying {
        counter!(SINK_RETRIES, "sink" => sink).increment(1);
    }
    gauge!(SINK_CONSECUTIVE_FAILURES, "sink" => sink).set(f64::from(failures));
    if failures == KEEPS_FAILING_AFTER || (failures > KEEPS_FAILING_AFTER && failures % KEEPS_FAILING_REPEAT == 0) {
        tracing::error!(sink, consecutive_failures = failures, error = %cause, "sink {sink} keeps failing");
    }
}

/// `sink` flushed a batch after `failures` failed attempts.
pub fn sink_flushed(sink: &'static str, failures: u32) {
    gauge!(SINK_CONSECUTIVE_FAILURES, "sink" => sink).set(0.0);
    if failures >= KEEPS_FAILING_AFTER {
        tracing::info!(sink, failed_attempts = failures, "sink {sink} recovered");
    }
}

/// Counts changes per table at `stage`.
pub fn count_tables<T: fmt::Display>(stage: &'static str, tables: &[(T, u64)]) {
    for (table, n) in tables {
        counter!(CHANGES, "table" => table.to_string(), "stage" => stage).increment(*n);
    }
}

/// Per-table change counters for one stage, cached for a hot loop.
pub struct TableCounters<T> {
    stage: &'static str,
    by_table: HashMap<T, Counter>,
}

impl<T: std::hash::Hash + Eq + Clone + fmt::Display> TableCounters<T> {
    pub fn new(stage: &'static str) -> Self {
        TableCounters { stage, by_table: HashMap::new() }
    }

    pub fn add(&mut self, table: &T, n: u64) {
        let stage = self.stage;
        self.by_table
            .entry(table.clone())
            .or_insert_with(|| counter!(CHANGES, "table" => table.to_string(), "stage" => stage))
            .increment(n);
    }
}

/// The `COMMIT_TO_SINK_SECONDS` histogram of one sink label, fetched once
/// so the per-change recording is a clock read per batch and an atomic push
/// per change.
#[derive(Clone)]
pub struct CommitToSink(Histogram);

impl CommitToSink {
    pub fn new(sink: &'static str) -> Self {
        CommitToSink(histogram!(COMMIT_TO_SINK_SECONDS, "sink" => sink))
    }

    /// Records every change of a batch (its `Tally::commits`) as flushed now.
    pub fn flushed(&self, commits: &[(i64, usize)]) {
        let now_us = chrono::Utc::now().timestamp_micros();
        // A transaction's changes share its commit time: one subtraction
        // per transaction, one record per change.
        for &(ts, n) in commits {
            // PostgreSQL's clock may run ahead of ours on another host.
            self.0.record_many((now_us - ts).max(0) as f64 / 1e6, n);
        }
    }
}

pub fn batch_size(n: usize) {
    histogram!(BATCH_SIZE).record(n as f64);
}

/// One error of `kind`: sink (any failed sink or broker attempt),
/// replication (the stream was lost), enrich (a change parked as
/// unenrichable), lag (the lag alert), metrics_endpoint.
pub fn error(kind: &'static str) {
    counter!(ERRORS, "kind" => kind).increment(1);
}

/// `n` records of a replay were already in the log.
pub fn log_skipped(n: u64) {
    counter!(LOG_SKIPPED).increment(n);
}

/// A payload of `sink` was parked in the dead-letter topic.
pub fn dead_letter(sink: &str) {
    counter!(DEAD_LETTERS, "sink" => sink.to_string()).increment(1);
}

pub(super) fn delivered_commit(commit_ts_us: i64) {
    gauge!(LAST_DELIVERED_COMMIT).set(commit_ts_us as f64 / 1e6);
}

pub(super) fn lag_alert(firing: bool) {
    gauge!(LAG_ALERT).set(if firing { 1.0 } else { 0.0 });
    if firing {
        error("lag");
    }
}

pub(super) fn publish_progress(s: &Snapshot, r: &Readiness) {
    gauge!(LAG_BYTES).set(r.lag_bytes as f64);
    gauge!(LAG_SECONDS).set(r.lag_seconds);
    gauge!(BUFFER_OCCUPANCY).set(s.buffered as f64);
    gauge!(FLUSHED_LSN).set(s.flushed_lsn as f64);
    gauge!(CONNECTED).set(if s.connected { 1.0 } else { 0.0 });
    gauge!(READY).set(if r.ready { 1.0 } else { 0.0 });
}
