//! The external HTTP system: enriched events POSTed as JSON batches, signed
//! the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`), with an `Idempotency-Key`
//! from the batch's first and last positions. Failures are retried with
//! backoff and jitter; a batch that still fails is parked in the broker's
//! dead-letter topic with its error and counts as delivered: parked, never
//! dropped. Each event carries a stable `id`, so a receiver can also
//! de-duplicate events replayed after a crash in differently cut batches.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SinkError;
use crate::config::HttpConfig;
use crate::enrich::Enriched;
use crate::log::LogProducer;
use crate::retry::Backoff;

pub struct HttpSink {
    client: reqwest::Client,
    cfg: HttpConfig,
    log: Arc<LogProducer>,
}

/// The Standard Webhooks signature of a message.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A batch as posted: `{"idempotency_key": …, "events": [EventJson…]}`,
/// from the events' shared JSON text.
fn body(key: &str, events: &[String]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + key.len() + 40);
    body.extend_from_slice(b"{\"idempotency_key\":");
    serde_json::to_writer(&mut body, key).expect("a string serializes");
    body.extend_from_slice(b",\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e.as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

impl HttpSink {
    pub fn new(cfg: &HttpConfig, log: Arc<LogProducer>) -> Result<Self, SinkError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("pgfanout/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Http(e.to_string()))?;
        Ok(HttpSink { client, cfg: cfg.clone(), log })
    }

    pub async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        let (Some(first), Some(last)) = (batch.engagements.first(), batch.engagements.last()) else {
            return Ok(());
        };
        let key = format!("{}-{}", super::change_id(first), super::change_id(last));
        let body = body(&key, super::events_json(batch));
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.backoff_initial_ms),
            Duration::from_millis(self.cfg.backoff_max_ms),
        );
        loop {
            let err = match self.post(&key, &body).await {
                Ok(()) => {
                    crate::observe::sink_flushed("http", backoff.attempts());
                    return Ok(());
                }
                Err(e) => e,
            };
            if backoff.attempts() + 1 >= self.cfg.max_attempts {
                crate::observe::sink_failed("http", backoff.attempts() + 1, &err, false);
                tracing::error!(sink = "http", idempotency_key = %key, error = %err, attempts = self.cfg.max_attempts, "batch undeliverable; parking it in the dead-letter topic");
                self.log.dead_letter("http", &key, &body, &err).await?;
                return Ok(());
            }
            let wait = backoff.next_delay();
            tracing::warn!(sink = "http", idempotency_key = %key, error = %err, attempt = backoff.attempts(), "post failed; retrying");
            crate::observe::sink_failed("http", backoff.attempts(), &err, true);
            tokio::time::sleep(wait).await;
        }
    }

    async fn post(&self, key: &str, body: &[u8]) -> Result<(), String> {
        let ts = chrono::Utc::now().timestamp();
        let signature = sign(self.cfg.secret.expose().as_bytes(), key, ts, body);
        let resp = self
            .client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .header("webhook-id", key)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            let text = resp.text().await.unwrap_or_default();
            Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_batch_json() {
        let events = vec![r#"{"id":"0/1"}"#.to_string(), r#"{"id":"0/2"}"#.to_string()];
        let v: serde_json::Value = serde_json::from_slice(&body("a\"b", &events)).unwrap();
        assert_eq!(v, serde_json::json!({ "idempotency_key": "a\"b", "events": [{ "id": "0/1" }, { "id": "0/2" }] }));
        let empty: serde_json::Value = serde_json::from_slice(&body("k", &[])).unwrap();
        assert_eq!(empty["events"], serde_json::json!([]));
    }

    #[test]
    fn standard_webhooks_signature() {
        // Test vector from the Standard Webhooks specification (secret decoded from base64).
        let secret = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
