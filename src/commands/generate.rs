//! `pgfanout generate`: a realistic workload written to PostgreSQL — content
//! of every type (some with NULL or 0 length), then engagement events with
//! skewed popularity, all four event types, NULL durations and devices
//! where SPEC allows them, and JSON payloads.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Workload {
    pub contents: usize,
    pub events: u64,
    /// Events per second; None writes as fast as PostgreSQL takes them.
    pub rate: Option<u64>,
    pub rows_per_statement: usize,
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload { contents: 50, events: 10_000, rate: None, rows_per_statement: 500, seed: 1 }
    }
}

const TYPES: [&str; 3] = ["podcast", "newsletter", "video"];
const EVENTS: [&str; 4] = ["play", "pause", "finish", "click"];
const DEVICES: [&str; 5] = ["ios", "android", "web-safari", "web-chrome", "tv"];

/// Writes the workload; returns the number of events inserted.
pub async fn run(client: &Client, w: &Workload) -> Result<u64, tokio_postgres::Error> {
    let mut rng = StdRng::seed_from_u64(w.seed);
    let mut ids = Vec::with_capacity(w.contents);
    let mut values = Vec::new();
    for i in 0..w.contents {
        let id = Uuid::from_u128(rng.gen());
        ids.push(id);
        let length = match i % 10 {
            0 => "NULL".to_string(),
            1 => "0".to_string(),
            _ => rng.gen_range(60..7200).to_string(),
        };
        values.push(format!(
            "('{id}', 'gen-{id}', 'Generated {i}', '{}', {length}, now() - interval '{} days')",
            TYPES[i % 3],
            rng.gen_range(0..365)
        ));
    }
    if !values.is_empty() {
        client
            .batch_execute(&format!(
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES {} ON CONFLICT DO NOTHING",
                values.join(",")
            ))
            .await?;
    }
    let started = Instant::now();
    let mut written = 0u64;
    while written < w.events {
        let n = (w.events - written).min(w.rows_per_statement as u64);
        let mut rows = Vec::with_capacity(n as usize);
        for _ in 0..n {
            // Zipf-like popularity: the first contents get most events.
            let content = if ids.is_empty() || rng.gen_ratio(1, 200) {
                "NULL".to_string()
            } else {
                let x: f64 = rng.gen::<f64>().powi(3);
                format!("'{}'", ids[((x * ids.len() as f64) as usize).min(ids.len() - 1)])
            };
            let duration =
                if rng.gen_ratio(1, 10) { "NULL".to_string() } else { rng.gen_range(0..600_000).to_string() };
            let device =
                if rng.gen_ratio(1, 20) { "NULL".to_string() } else { format!("'{}'", DEVICES[rng.gen_range(0..5)]) };
            rows.push(format!(
                "({content}, '{}', '{}', now() - interval '{} seconds', {duration}, {device}, '{{\"source\": \"generator\", \"n\": {}}}')",
                Uuid::from_u128(rng.gen()),
                EVENTS[rng.gen_range(0..4)],
                rng.gen_range(0..120),
                rng.gen::<u32>()
            ));
        }
        client
            .batch_execute(&format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES {}",
                rows.join(",")
            ))
            .await?;
        written += n;
        if let Some(rate) = w.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(written as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(written)
}
