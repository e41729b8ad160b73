//! Writes changes to the broker: idempotent producer, acks=all, compressed.
//! `publish` returns only when the broker has acknowledged every message of
//! the batch, which is the point where the sinks may see it.
//!
//! Every error of `publish` is transient to its caller (the pipeline
//! retries it through `retry::run` for as long as it takes, alerting as a
//! failing sink `broker`): the broker unreachable, a leader moving, a
//! timeout. The one error no retry can cure, a message larger than the
//! broker takes, never reaches the caller: it is parked here.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::envelope::{self, Encoder};
use crate::config::LogConfig;
use crate::source::Change;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("broker client setup failed: {0}")]
    Client(#[source] KafkaError),
    #[error("broker did not accept the message for topic {topic}: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("creating topic {topic} failed: {reason}")]
    CreateTopic { topic: String, reason: String },
}

pub struct LogProducer {
    producer: FutureProducer,
    cfg: LogConfig,
    encoder: Encoder,
}

pub(crate) fn client_config(cfg: &LogConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v.expose());
    }
    c
}

impl LogProducer {
    pub fn new(cfg: &LogConfig, database: &str) -> Result<Self, LogError> {
        let producer: FutureProducer = client_config(cfg)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &cfg.compression)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .map_err(LogError::Client)?;
        Ok(LogProducer { producer, cfg: cfg.clone(), encoder: Encoder::new(cfg, database) })
    }

    pub fn topic_prefix(&self) -> &str {
        &self.cfg.topic_prefix
    }

    /// A change's record value without the schema, for a dead-letter record.
    pub fn envelope_bytes(&self, change: &Change) -> Vec<u8> {
        serde_json::to_vec(&self.encoder.value(change, now_us())).unwrap_or_default()
    }

    /// Publishes a batch and waits for the broker's acknowledgement of all of it.
    ///
    /// Every message is handed to librdkafka first, then the deliveries are
    /// awaited in order: already-settled receivers cost next to nothing,
    /// where one future per message polled through a `FuturesUnordered` was
    /// a fifth of the publishing CPU.
    pub async fn publish(&self, changes: &[Change]) -> Result<(), LogError> {
        let now_us = now_us();
        let mut pending = Vec::with_capacity(changes.len());
        for c in changes {
            let topic = envelope::topic(&self.cfg.topic_prefix, c);
            let key = self.encoder.key(c);
            let payload = self.encoder.envelope(c, now_us, None);
            // pgfanout's position, outside Debezium's value.
            let position = envelope::position_header(c);
            let headers =
                OwnedHeaders::new().insert(Header { key: envelope::POSITION_HEADER, value: Some(position.as_str()) });
            let mut record = FutureRecord::to(&topic).payload(&payload).headers(headers);
            if let Some(key) = &key {
                record = record.key(key);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((c, delivery));
                        break;
                    }
                    // librdkafka's queue is full: let what is in flight land.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        if pending.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        self.settle(&mut pending, now_us).await?;
                    }
                    // No retry can make it fit, and retrying would stop the stream for good.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                        let bytes = key.as_ref().map_or(0, Vec::len) + payload.len();
                        self.park_oversized(c, &topic, bytes, now_us).await?;
                        break;
                    }
                    Err((source, _)) => return Err(LogError::Produce { topic, source }),
                }
            }
        }
        self.settle(&mut pending, now_us).await
    }

    /// Waits for the deliveries of `pending`, in order, and empties it.
    async fn settle(&self, pending: &mut Vec<(&Change, DeliveryFuture)>, now_us: i64) -> Result<(), LogError> {
        for (c, delivery) in pending.drain(..) {
            let failed = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), msg))) => {
                    let bytes = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
                    let topic = envelope::topic(&self.cfg.topic_prefix, c);
                    self.park_oversized(c, &topic, bytes, now_us).await?;
                    continue;
                }
                Ok(Err((source, _))) => source,
                Err(_canceled) => KafkaError::Canceled,
            };
            return Err(LogError::Produce { topic: envelope::topic(&self.cfg.topic_prefix, c), source: failed });
        }
        Ok(())
    }

    /// A change whose envelope is larger than the broker takes: logged, and
    /// parked in the dead-letter topic with its large values left out (so the
    /// record identifies the row and its position, to re-read from
    /// PostgreSQL). The sinks still get the whole change.
    async fn park_oversized(&self, c: &Change, topic: &str, bytes: usize, now_us: i64) -> Result<(), LogError> {
        let reason = format!("envelope for {topic} is {bytes} bytes (key + value), more than the broker takes");
        tracing::error!(table = %c.table, position = %c.position, bytes, "change too large for the log; parking a summary in the dead-letter topic, the sinks still get it");
        let mut value = self.encoder.value(c, now_us);
        for side in ["before", "after"] {
            if let Some(row) = value[side].as_object_mut() {
                for v in row.values_mut() {
                    let n = v.to_string().len();
                    if n > 1024 {
                        *v = serde_json::json!({ "omitted_bytes": n });
                    }
                }
            }
        }
        let payload = serde_json::to_vec(&value).unwrap_or_default();
        self.dead_letter("log", &c.position.event_id(), &payload, &reason).await
    }

    /// Parks a payload that a sink could never deliver, with the reason, in
    /// the dead-letter topic. Counts as delivered only once the broker has it.
    pub async fn dead_letter(&self, sink: &str, key: &str, payload: &[u8], error: &str) -> Result<(), LogError> {
        let topic = dead_letter_topic(&self.cfg.topic_prefix);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "pgfanout.sink", value: Some(sink) })
            .insert(Header { key: "pgfanout.error", value: Some(error) });
        let record = FutureRecord::to(&topic).key(key).payload(payload).headers(headers);
        self.producer
            .send(record, Duration::from_secs(300))
            .await
            .map(|_| crate::observe::metrics::dead_letter(sink))
            .map_err(|(source, _)| LogError::Produce { topic, source })
    }
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub fn dead_letter_topic(prefix: &str) -> String {
    format!("{prefix}dead_letter")
}

/// Creates the topics that are missing (existing ones are left as they are).
pub async fn ensure_topics(cfg: &LogConfig, topics: &[String]) -> Result<(), LogError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create().map_err(LogError::Client)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, cfg.partitions, TopicReplication::Fixed(cfg.replication_factor)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new.iter(), &opts).await.map_err(LogError::Client)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(LogError::CreateTopic { topic, reason: code.to_string() }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn broker_tls_and_sasl_pass_through_as_secrets() {
        // The README's example, as written there.
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "b.toml",
                r#"
                [source]
                url = "postgres://localhost/db"
                [log]
                brokers = "broker-1.example.com:9093"
                [log.properties]
                "security.protocol" = "SASL_SSL"
                "ssl.ca.location" = "/etc/pgfanout/kafka-ca.pem"
                "sasl.mechanisms" = "SCRAM-SHA-512"
                "sasl.username" = "pgfanout"
                "sasl.password" = "kafka-s3cret"
                [file]
                path = "-"
                "#,
            )?;
            let c = crate::config::Config::load(Some(std::path::Path::new("b.toml"))).expect("loads");
            let props: Vec<(&str, &str)> = c.log.properties.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
            assert_eq!(
                props,
                [
                    ("sasl.mechanisms", "SCRAM-SHA-512"),
                    ("sasl.password", "kafka-s3cret"),
                    ("sasl.username", "pgfanout"),
                    ("security.protocol", "SASL_SSL"),
                    ("ssl.ca.location", "/etc/pgfanout/kafka-ca.pem"),
                ]
            );
            assert!(!format!("{c:?}").contains("kafka-s3cret"));
            // The bundled librdkafka takes them (built with OpenSSL, so
            // SASL_SSL and SCRAM); it reads ssl.ca.location at once, which
            // is left to the system's roots here.
            let mut log = c.log.clone();
            log.properties.remove("ssl.ca.location");
            let made = client_config(&log).create::<rdkafka::producer::BaseProducer>();
            assert!(made.is_ok(), "librdkafka refused the README's TLS/SASL settings: {:?}", made.err());
            Ok(())
        });
    }
}
