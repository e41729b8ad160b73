//! `pgfanout run` as a long-running service: the observability endpoint and
//! checks, the pipeline, and the shutdown. SIGTERM or SIGINT drains (the
//! batch in flight is flushed by every sink and acknowledged); a drain that
//! takes longer than `pipeline.shutdown_timeout_ms`, or a second signal,
//! ends the process non-zero without acknowledging anything more, so the
//! slot replays from the last position every sink flushed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::observe::{self, Stats};
use crate::pipeline;

/// Exit status when the drain did not finish in time.
pub const EXIT_DRAIN_TIMEOUT: i32 = 1;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    observe::start(&cfg, stats.clone()).await;
    let limit = Duration::from_millis(cfg.pipeline.shutdown_timeout_ms);
    let (stop, stopped) = watch::channel(false);
    let mut pipeline = tokio::spawn(pipeline::run(cfg, stopped, stats));
    tokio::select! {
        r = &mut pipeline => return finished(r),
        _ = signal() => {}
    }
    tracing::info!(limit_ms = limit.as_millis() as u64, "signal received; draining and stopping");
    let _ = stop.send(true);
    let give_up = tokio::select! {
        r = &mut pipeline => return finished(r),
        _ = tokio::time::sleep(limit) => format!("draining did not finish within pipeline.shutdown_timeout_ms = {}", limit.as_millis()),
        _ = signal() => "a second signal arrived while draining".to_string(),
    };
    // Exit at once: whatever the pipeline still holds was never acknowledged,
    // so the slot replays it on the next start and nothing is lost.
    tracing::error!("{give_up}; exiting without acknowledging anything more (the next start replays from the last flushed position)");
    std::process::exit(EXIT_DRAIN_TIMEOUT);
}

fn finished(r: Result<Result<(), pipeline::PipelineError>, tokio::task::JoinError>) -> anyhow::Result<()> {
    r.context("the pipeline task failed")?.context("the pipeline stopped")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
