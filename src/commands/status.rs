//! `pgfanout status`: one look at everything a running (or stopped) sidecar
//! depends on, with the same configuration: the replication slot as
//! PostgreSQL sees it, each sink's reachability and position, and the
//! sidecar's own rates and lag when its `/metrics` answers. Exit 0 healthy,
//! 1 unhealthy (slot missing or invalidated, a sink unreachable, lag over a
//! threshold), 2 when the configuration or PostgreSQL itself fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, Producer};
use serde::Serialize;

use crate::config::Config;
use crate::observe::exposition::{parse_samples, Sample};
use crate::source::{slot, Lsn};

/// How long one probe of a service may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The gap between the two scrapes of `/metrics` that rates are taken over.
const RATE_WINDOW: Duration = Duration::from_secs(1);

pub const EXIT_HEALTHY: i32 = 0;
pub const EXIT_UNHEALTHY: i32 = 1;
pub const EXIT_ERROR: i32 = 2;

#[derive(Debug, Serialize)]
pub struct Report {
    pub healthy: bool,
    /// Why it is unhealthy, one line each, naming the slot or sink.
    pub problems: Vec<String>,
    /// Worth a look, not unhealthy (an inactive slot, WAL about to be lost).
    pub warnings: Vec<String>,
    pub slot: SlotReport,
    pub sinks: Vec<SinkReport>,
    pub sidecar: SidecarReport,
}

#[derive(Debug, Default, Serialize)]
pub struct SlotReport {
    pub name: String,
    pub exists: bool,
    pub active: Option<bool>,
    pub active_pid: Option<i64>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub wal_status: Option<String>,
    /// WAL the slot keeps on the server: current WAL position minus restart_lsn.
    pub retained_wal_bytes: Option<u64>,
    /// Current WAL position minus confirmed_flush_lsn.
    pub lag_bytes: Option<u64>,
    pub current_wal_lsn: String,
    pub invalidation_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SinkReport {
    pub name: &'static str,
    pub reachable: bool,
    /// Last position the sink holds (`<commit LSN>#<ordinal>`), where it keeps one.
    pub position: Option<String>,
    pub detail: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct SidecarReport {
    pub metrics_url: Option<String>,
    pub reachable: bool,
    pub ready: Option<bool>,
    pub not_ready_reason: Option<String>,
    pub lag_bytes: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub buffer_occupancy: Option<f64>,
    /// Changes per second by stage (read, published, delivered), over a short window.
    pub rates: BTreeMap<String, f64>,
    /// Delivered changes per second by table.
    pub delivered_by_table: BTreeMap<String, f64>,
    /// Failed sink attempts per second by sink.
    pub sink_errors_per_second: BTreeMap<String, f64>,
}

/// The whole command: loads the configuration, checks, prints, and returns the exit code.
pub async fn main(config: Option<&Path>, json: bool) -> i32 {
    let outcome = match Config::load(config) {
        Ok(cfg) => check(&cfg).await.map_err(|e| format!("{e:#}")),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", render(&report));
            }
            if report.healthy {
                EXIT_HEALTHY
            } else {
                EXIT_UNHEALTHY
            }
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "healthy": false, "error": e }));
            }
            eprintln!("pgfanout status: {e}");
            EXIT_ERROR
        }
    }
}

/// Checks everything; fails only when PostgreSQL cannot be asked at all.
pub async fn check(cfg: &Config) -> anyhow::Result<Report> {
    let pg = match tokio::time::timeout(PROBE_TIMEOUT * 2, slot::connect(cfg.source.url.expose())).await {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("cannot connect to PostgreSQL: no answer within {:?}", PROBE_TIMEOUT * 2),
    };
    let slot = slot_report(&pg, &cfg.source.slot).await?;
    // Each configured sink, through its `Sink::probe`; the broker beside them.
    let configured = crate::sinks::build(cfg, crate::sinks::Refused::Stall)?;
    let probes = configured.iter().map(|s| {
        probe(s.name(), async move {
            let p = s.probe().await?;
            Ok((p.position.map(|p| p.to_string()), p.detail))
        })
    });
    let (broker, sinks, sidecar) = tokio::join!(broker(cfg), futures::future::join_all(probes), sidecar(cfg));
    let sinks: Vec<SinkReport> = std::iter::once(broker).chain(sinks).collect();
    let (problems, warnings) = judge(cfg, &slot, &sinks, &sidecar);
    Ok(Report { healthy: problems.is_empty(), problems, warnings, slot, sinks, sidecar })
}

/// The unhealthy conditions, and the warnings.
fn judge(cfg: &Config, slot: &SlotReport, sinks: &[SinkReport], sidecar: &SidecarReport) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if !slot.exists {
        problems.push(format!(
            "replication slot {} does not exist (`pgfanout init` or `pgfanout run` creates it)",
            slot.name
        ));
    } else {
        if slot.wal_status.as_deref() == Some("lost") || slot.invalidation_reason.is_some() {
            let why = slot.invalidation_reason.clone().unwrap_or_else(|| "wal_status = lost".into());
            problems.push(format!(
                "replication slot {} is invalidated ({why}): drop it and take a new snapshot",
                slot.name
            ));
        } else if slot.wal_status.as_deref() == Some("unreserved") {
            warnings.push(format!(
                "replication slot {} is past max_wal_size (wal_status = unreserved): its WAL may be removed soon",
                slot.name
            ));
        }
        if slot.active == Some(false) {
            warnings.push(format!("replication slot {} is not active: no sidecar is streaming it", slot.name));
        }
        if let Some(lag) = slot.lag_bytes.filter(|l| *l > cfg.metrics.max_lag_bytes) {
            problems.push(format!(
                "replication slot {} lags {lag} bytes behind the server, over metrics.max_lag_bytes = {}",
                slot.name, cfg.metrics.max_lag_bytes
            ));
        }
    }
    for s in sinks.iter().filter(|s| !s.reachable) {
        problems.push(format!("sink {} unreachable: {}", s.name, s.error.as_deref().unwrap_or("no answer")));
    }
    if let Some(lag) = sidecar.lag_seconds.filter(|l| *l > cfg.metrics.max_lag_seconds as f64) {
        problems.push(format!(
            "sidecar lags {lag:.1} s behind its source, over metrics.max_lag_seconds = {}",
            cfg.metrics.max_lag_seconds
        ));
    }
    (problems, warnings)
}

async fn slot_report(pg: &tokio_postgres::Client, name: &str) -> Result<SlotReport, slot::SlotError> {
    let query = slot::query_err;
    let current: String = pg
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(query("current WAL position"))?
        .get(0);
    // to_jsonb: one query for every PostgreSQL major, whatever columns it has
    // (wal_status from 13, conflicting from 16, invalidation_reason from 17).
    let row = pg
        .query_opt("SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = $1", &[&name])
        .await
        .map_err(query("read slot"))?;
    let mut r = SlotReport { name: name.to_string(), current_wal_lsn: current.clone(), ..Default::default() };
    let Some(row) = row else { return Ok(r) };
    let s: serde_json::Value = row.get(0);
    let text = |k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_string);
    r.exists = true;
    r.active = s.get("active").and_then(|v| v.as_bool());
    r.active_pid = s.get("active_pid").and_then(|v| v.as_i64());
    r.confirmed_flush_lsn = text("confirmed_flush_lsn");
    r.restart_lsn = text("restart_lsn");
    r.wal_status = text("wal_status");
    r.invalidation_reason = text("invalidation_reason");
    if s.get("conflicting").and_then(|v| v.as_bool()) == Some(true) && r.invalidation_reason.is_none() {
        r.invalidation_reason = Some("conflicting with recovery".into());
    }
    let lsn = |s: &Option<String>| s.as_deref().and_then(|s| Lsn::parse(s).ok()).map(|l| l.0);
    let now = Lsn::parse(&current).map(|l| l.0).ok();
    r.retained_wal_bytes = now.zip(lsn(&r.restart_lsn)).map(|(n, l)| n.saturating_sub(l));
    r.lag_bytes = now.zip(lsn(&r.confirmed_flush_lsn)).map(|(n, l)| n.saturating_sub(l));
    Ok(r)
}

/// Runs a probe with the probe timeout; `Ok((position, detail))` means reachable.
async fn probe<F>(name: &'static str, f: F) -> SinkReport
where
    F: Future<Output = Result<(Option<String>, Option<String>), String>>,
{
    let (reachable, position, detail, error) = match tokio::time::timeout(PROBE_TIMEOUT, f).await {
        Ok(Ok((position, detail))) => (true, position, detail, None),
        Ok(Err(e)) => (false, None, None, Some(e)),
        Err(_) => (false, None, None, Some(format!("no answer within {PROBE_TIMEOUT:?}"))),
    };
    SinkReport { name, reachable, position, detail, error }
}

async fn broker(cfg: &Config) -> SinkReport {
    let log = cfg.log.clone();
    let expected = crate::pipeline::topics(cfg);
    probe("broker", async move {
        let producer: BaseProducer = crate::log::producer::client_config(&log).create().map_err(|e| e.to_string())?;
        // librdkafka's metadata call blocks; keep it off the runtime's workers.
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, PROBE_TIMEOUT).map(|m| {
                let topics: Vec<String> = m.topics().iter().map(|t| t.name().to_string()).collect();
                (m.brokers().len(), topics)
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let (brokers, topics) = metadata;
        let present = expected.iter().filter(|t| topics.contains(t)).count();
        Ok((None, Some(format!("{brokers} broker(s), {present}/{} topics present", expected.len()))))
    })
    .await
}

/// Where the sidecar serves `/metrics`, if it can be found from the config.
fn metrics_base(listen: &str) -> Option<String> {
    let (host, port) = listen.rsplit_once(':')?;
    if port == "0" || port.is_empty() {
        return None;
    }
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "[::]" => "[::1]",
        h => h,
    };
    Some(format!("http://{host}:{port}"))
}

async fn sidecar(cfg: &Config) -> SidecarReport {
    let Some(base) = metrics_base(&cfg.metrics.listen) else { return SidecarReport::default() };
    let mut r = SidecarReport { metrics_url: Some(format!("{base}/metrics")), ..Default::default() };
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(2)).build() else { return r };
    let scrape = || async {
        let t = Instant::now();
        let text =
            client.get(format!("{base}/metrics")).send().await.ok()?.error_for_status().ok()?.text().await.ok()?;
        Some((t, parse_samples(&text)))
    };
    let Some((t0, first)) = scrape().await else { return r };
    r.reachable = true;
    if let Ok(resp) = client.get(format!("{base}/readyz")).send().await {
        r.ready = Some(resp.status().is_success());
        if let Ok(body) = resp.json::<serde_json::Value>().await {
            r.not_ready_reason = body.get("reason").and_then(|v| v.as_str()).map(str::to_string);
        }
    }
    tokio::time::sleep(RATE_WINDOW).await;
    let Some((t1, second)) = scrape().await else { return r };
    let dt = t1.duration_since(t0).as_secs_f64().max(1e-3);
    let gauge = |name: &str| second.iter().find(|s| s.name == name).map(|s| s.value);
    r.lag_bytes = gauge(crate::observe::metrics::LAG_BYTES);
    r.lag_seconds = gauge(crate::observe::metrics::LAG_SECONDS);
    r.buffer_occupancy = gauge(crate::observe::metrics::BUFFER_OCCUPANCY);
    let rate = |label: &str, name: &str, filter: &dyn Fn(&Sample) -> bool| -> BTreeMap<String, f64> {
        let sums = |samples: &[Sample]| {
            let mut m: BTreeMap<String, f64> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.name == name && filter(s)) {
                *m.entry(s.label(label).unwrap_or_default().to_string()).or_default() += s.value;
            }
            m
        };
        let (before, after) = (sums(&first), sums(&second));
        after
            .into_iter()
            .map(|(k, v)| (k.clone(), (v - before.get(&k).copied().unwrap_or(0.0)).max(0.0) / dt))
            .collect()
    };
    r.rates = rate("stage", crate::observe::metrics::CHANGES, &|_| true);
    r.delivered_by_table = rate("table", crate::observe::metrics::CHANGES, &|s| s.label("stage") == Some("delivered"));
    r.sink_errors_per_second = rate("sink", crate::observe::metrics::SINK_ERRORS, &|_| true);
    r
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The human form: a summary line, the slot, a table of sinks, the sidecar, the problems.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pgfanout status: {}", if r.healthy { "HEALTHY" } else { "UNHEALTHY" });
    let _ = writeln!(out);
    let s = &r.slot;
    if s.exists {
        let active = match (s.active, s.active_pid) {
            (Some(true), Some(pid)) => format!("active (pid {pid})"),
            (Some(true), None) => "active".into(),
            _ => "inactive".into(),
        };
        let _ = writeln!(out, "slot {}: {active}, wal_status {}", s.name, s.wal_status.as_deref().unwrap_or("-"));
        let _ = writeln!(out, "  confirmed flush  {}", s.confirmed_flush_lsn.as_deref().unwrap_or("-"));
        let _ = writeln!(
            out,
            "  retained WAL     {} (restart {}, current {})",
            s.retained_wal_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            s.restart_lsn.as_deref().unwrap_or("-"),
            s.current_wal_lsn
        );
        let _ = writeln!(out, "  lag              {}", s.lag_bytes.map(human_bytes).unwrap_or_else(|| "-".into()));
    } else {
        let _ = writeln!(out, "slot {}: MISSING (current WAL {})", s.name, s.current_wal_lsn);
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<11} {:<10} {:<22} DETAIL", "SINK", "REACHABLE", "POSITION");
    for k in &r.sinks {
        let detail = match (&k.error, &k.detail) {
            (Some(e), _) => e.as_str(),
            (None, Some(d)) => d.as_str(),
            (None, None) => "",
        };
        let _ = writeln!(
            out,
            "{:<11} {:<10} {:<22} {detail}",
            k.name,
            if k.reachable { "yes" } else { "NO" },
            k.position.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out);
    let c = &r.sidecar;
    match (&c.metrics_url, c.reachable) {
        (None, _) => {
            let _ = writeln!(out, "sidecar: metrics.listen not set to a fixed address; rates unknown");
        }
        (Some(url), false) => {
            let _ = writeln!(out, "sidecar: not answering at {url}");
        }
        (Some(url), true) => {
            let ready = match (c.ready, &c.not_ready_reason) {
                (Some(true), _) => "ready".to_string(),
                (_, Some(why)) => format!("NOT READY ({why})"),
                _ => "readiness unknown".to_string(),
            };
            let _ = writeln!(out, "sidecar {url}: {ready}");
            let _ = writeln!(
                out,
                "  lag              {} / {:.1} s, {} changes buffered",
                c.lag_bytes.map(|b| human_bytes(b as u64)).unwrap_or_else(|| "-".into()),
                c.lag_seconds.unwrap_or(0.0),
                c.buffer_occupancy.unwrap_or(0.0)
            );
            let rates: Vec<String> = c.rates.iter().map(|(k, v)| format!("{k} {v:.1}/s")).collect();
            let _ =
                writeln!(out, "  changes          {}", if rates.is_empty() { "-".into() } else { rates.join(", ") });
            let errors: Vec<String> = c
                .sink_errors_per_second
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| format!("{k} {v:.1}/s"))
                .collect();
            if !errors.is_empty() {
                let _ = writeln!(out, "  sink errors      {}", errors.join(", "));
            }
        }
    }
    for (title, lines) in [("problems", &r.problems), ("warnings", &r.warnings)] {
        if !lines.is_empty() {
            let _ = writeln!(out, "\n{title}:");
            for l in lines {
                let _ = writeln!(out, "  - {l}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_address_from_listen() {
        assert_eq!(metrics_base("127.0.0.1:9187").as_deref(), Some("http://127.0.0.1:9187"));
        assert_eq!(metrics_base("0.0.0.0:9187").as_deref(), Some("http://127.0.0.1:9187"));
        assert_eq!(metrics_base("[::]:9187").as_deref(), Some("http://[::1]:9187"));
        assert_eq!(metrics_base("127.0.0.1:0"), None);
        assert_eq!(metrics_base(""), None);
    }

    #[test]
    fn bytes_read_like_bytes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
