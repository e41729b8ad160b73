//! Writes changes to the broker: idempotent producer, acks=all, compressed.
//! `publish` returns only when the broker has acknowledged every message of
//! the batch, which is the point where the sinks may see it.
//!
//! Every error of `publish` is transient to its caller (the pipeline
//! retries it through `retry::run` for as long as it takes, alerting as a
//! failing sink `broker`): the broker unreachable, a leader moving, a
//! timeout. The one error no retry can cure, a message larger than the
//! broker takes, never reaches the caller: it is parked here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::envelope::{self, Encoder};
use super::records::{self, Layout, Publish, Record, TxState};
use super::tail::{self, Tails};
use crate::config::LogConfig;
use crate::source::Change;

fn live(how: Publish<'_>) -> bool {
    how.origin.is_none()
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("broker client setup failed: {0}")]
    Client(#[source] KafkaError),
    #[error("broker did not accept the message for topic {topic}: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("creating topic {topic} failed: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("reading what topic {topic} already holds failed: {reason}")]
    Tail { topic: String, reason: String },
    #[error("reading topic {topic} failed: {source}")]
    Read { topic: String, source: KafkaError },
    #[error("reading topic {topic}: nothing arrived for 30 s, {left} still unread; is the broker up?")]
    ReadStalled { topic: String, left: String },
}

impl LogError {
    /// The broker (or librdkafka's own `message.max.bytes`) refused the
    /// message for its size: no retry helps, a smaller one may pass.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            LogError::Produce { source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), .. }
        )
    }
}

pub struct LogProducer {
    /// Replaced after a fatal error (the gapless guarantee refused to go
    /// on past a lost record): librdkafka takes no more records from it.
    producer: std::sync::Mutex<FutureProducer>,
    cfg: LogConfig,
    encoder: Encoder,
    state: tokio::sync::Mutex<PublishState>,
}

/// What a publisher carries from one batch to the next.
#[derive(Default)]
struct PublishState {
    tx: TxState,
    /// What the log held of the live stream when this publisher started or
    /// last failed; None until read (lazily, per topic, at the first batch
    /// that needs it).
    tails: Option<Tails>,
    /// Partition counts of topics a scan chunk wrote (the live stream's
    /// come with its tails).
    partitions: HashMap<String, i32>,
    last_heartbeat: Option<Instant>,
}

/// How long reading the partitions' last records may take before the
/// publish is retried.
const TAIL_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn client_config(cfg: &LogConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v.expose());
    }
    c
}

fn new_producer(cfg: &LogConfig) -> Result<FutureProducer, LogError> {
    client_config(cfg)
        .set("enable.idempotence", "true")
        // A record that failed for good is never followed by a later one
        // in its partition (a fatal error instead): a partition holds a
        // prefix of what it was sent, which `log::tail` builds on.
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000")
        .create()
        .map_err(LogError::Client)
}

/// The partition Kafka's Java clients (and so Kafka Connect, hence Debezium)
/// put a keyed record in: murmur2 of the key, positive, modulo the count.
/// Chosen here rather than by librdkafka so the publisher knows, before
/// sending, which partition's tail a record is compared with.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    // SAFETY: librdkafka's murmur2 partitioner reads `keylen` bytes of
    // `key` and nothing else (the topic and opaques are unused by it).
    unsafe {
        rdkafka::bindings::rd_kafka_msg_partitioner_murmur2(
            std::ptr::null(),
            key.as_ptr().cast(),
            key.len(),
            partitions,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    }
}

impl LogProducer {
    pub fn new(cfg: &LogConfig, database: &str) -> Result<Self, LogError> {
        Ok(LogProducer {
            producer: std::sync::Mutex::new(new_producer(cfg)?),
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, database),
            state: tokio::sync::Mutex::new(PublishState::default()),
        })
    }

    /// A change's value without its schema, as the dead-letter topic holds it.
    pub fn envelope_bytes(&self, change: &Change) -> Vec<u8> {
        serde_json::to_vec(&self.encoder.value(change, chrono::Utc::now().timestamp_micros())).unwrap_or_default()
    }

    pub fn topic_prefix(&self) -> &str {
        &self.cfg.topic_prefix
    }

    fn producer(&self) -> FutureProducer {
        self.producer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn layout(&self) -> Layout<'_> {
        Layout { prefix: &self.cfg.topic_prefix, debezium: &self.cfg.debezium, encoder: &self.encoder }
    }

    /// Publishes a batch and waits for the broker's acknowledgement of all
    /// of it. The live stream's records that the log already holds (a
    /// replay after a restart or a failed attempt) are not sent again.
    ///
    /// Every record is handed to librdkafka first, then the deliveries are
    /// awaited in order: already-settled receivers cost next to nothing,
    /// where one future per message polled through a `FuturesUnordered` was
    /// a fifth of the publishing CPU.
    pub async fn publish(&self, changes: &[Change], how: Publish<'_>) -> Result<(), LogError> {
        let mut state = self.state.lock().await;
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut tx = state.tx.clone();
        let records = records::plan(&self.layout(), changes, &mut tx, &how, now_us);
        let result = self.send(&mut state, &records, how, now_us).await;
        match &result {
            Ok(()) => state.tx = tx,
            Err(_) => {
                // Part of the batch may have landed: read again what the
                // log holds before the retry sends it.
                state.tails = None;
                let producer = self.producer();
                if let Some((code, reason)) = producer.client().fatal_error() {
                    tracing::warn!(%code, %reason, "the broker producer stopped on a fatal error; starting a new one");
                    *self.producer.lock().unwrap_or_else(|p| p.into_inner()) = new_producer(&self.cfg)?;
                }
            }
        }
        result
    }

    async fn send(
        &self,
        state: &mut PublishState,
        records: &[Record<'_>],
        how: Publish<'_>,
        now_us: i64,
    ) -> Result<(), LogError> {
        let origin = how.origin.unwrap_or(tail::STREAM);
        let mut topics: Vec<&str> = Vec::new();
        for r in records {
            if !topics.contains(&&*r.topic) {
                topics.push(&r.topic);
            }
        }
        let counts: Vec<String> =
            topics.iter().filter(|t| !state.partitions.contains_key(**t)).map(|t| t.to_string()).collect();
        let tails: Vec<String> = match &state.tails {
            _ if !live(how) => Vec::new(),
            Some(t) => t.unknown(topics.iter().copied()),
            None => topics.iter().map(|t| t.to_string()).collect(),
        };
        if !counts.is_empty() || !tails.is_empty() {
            let cfg = self.cfg.clone();
            let mut known = if live(how) { state.tails.take().unwrap_or_default() } else { Tails::default() };
            let partitions = state.partitions.clone();
            let origin = origin.to_string();
            let read = tokio::task::spawn_blocking(move || {
                // One consumer for the partition counts and the tails.
                let consumer = tail::consumer(&cfg)?;
                let counts = tail::partition_counts(&consumer, &counts, TAIL_TIMEOUT)?;
                let with_counts: Vec<(String, i32)> = tails
                    .into_iter()
                    .map(|t| {
                        let n = partitions.get(&t).or_else(|| counts.iter().find(|(c, _)| *c == t).map(|(_, n)| n));
                        let n = n.copied().unwrap_or(1);
                        (t, n)
                    })
                    .collect();
                known.read(&consumer, &with_counts, &origin, TAIL_TIMEOUT).map(|()| (known, counts))
            });
            let (known, counts) =
                read.await.map_err(|e| LogError::Tail { topic: String::new(), reason: e.to_string() })??;
            state.partitions.extend(counts);
            if live(how) {
                state.tails = Some(known);
            }
        }
        let producer = self.producer();
        let mut pending = Vec::with_capacity(records.len());
        let mut skipped = 0u64;
        for r in records {
            // An unkeyed record (a TRUNCATE) goes to partition 0: a fixed
            // place, so a replay finds it where it was.
            let partition = match &r.key {
                Some(key) => partition_for(key, state.partitions.get(&*r.topic).copied().unwrap_or(1)),
                None => 0,
            };
            if live(how) && state.tails.as_ref().is_some_and(|t| t.holds(&r.topic, partition, r.mark)) {
                skipped += 1;
                continue;
            }
            let position = envelope::position_header(&r.mark.position);
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header { key: tail::POSITION_HEADER, value: Some(&position) })
                .insert(Header { key: tail::KIND_HEADER, value: Some(r.mark.kind.as_str()) })
                .insert(Header { key: tail::ORIGIN_HEADER, value: Some(origin) });
            let mut record = FutureRecord::<[u8], [u8]>::to(&r.topic).partition(partition).headers(headers);
            if let Some(key) = &r.key {
                record = record.key(key);
            }
            if let Some(payload) = &r.payload {
                record = record.payload(payload);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((r, delivery));
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
                        let bytes = r.key.as_ref().map_or(0, Vec::len) + r.payload.as_ref().map_or(0, Vec::len);
                        self.park_oversized(r, bytes, now_us).await?;
                        break;
                    }
                    Err((source, _)) => return Err(LogError::Produce { topic: r.topic.to_string(), source }),
                }
            }
        }
        if skipped > 0 {
            tracing::info!(skipped, "records the log already held from before the restart were not published again");
            crate::observe::metrics::log_skipped(skipped);
        }
        self.settle(&mut pending, now_us).await?;
        if let (Some(tails), Some(last)) = (state.tails.as_mut(), records.last()) {
            if live(how) {
                tails.passed(last.mark);
            }
        }
        Ok(())
    }

    /// Waits for the deliveries of `pending`, in order, and empties it.
    async fn settle(&self, pending: &mut Vec<(&Record<'_>, DeliveryFuture)>, now_us: i64) -> Result<(), LogError> {
        for (r, delivery) in pending.drain(..) {
            let failed = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), msg))) => {
                    let bytes = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
                    self.park_oversized(r, bytes, now_us).await?;
                    continue;
                }
                Ok(Err((source, _))) => source,
                Err(_canceled) => KafkaError::Canceled,
            };
            return Err(LogError::Produce { topic: r.topic.to_string(), source: failed });
        }
        Ok(())
    }

    /// A heartbeat record in Debezium's heartbeat topic, at most once per
    /// `every`: consumers see the publisher alive while no change flows.
    pub async fn heartbeat(&self, every: Duration) -> Result<(), LogError> {
        let mut state = self.state.lock().await;
        if state.last_heartbeat.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        let topic = records::heartbeat_topic(&self.cfg.topic_prefix, &self.cfg.debezium);
        let (key, value) =
            records::heartbeat(&self.cfg.topic_prefix, &self.cfg.debezium, chrono::Utc::now().timestamp_millis());
        self.producer()
            .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(30))
            .await
            .map_err(|(source, _)| LogError::Produce { topic, source })?;
        state.last_heartbeat = Some(Instant::now());
        Ok(())
    }

    /// A change whose envelope is larger than the broker takes: logged, and
    /// parked in the dead-letter topic with its large values left out (so the
    /// record identifies the row and its position, to re-read from
    /// PostgreSQL). The sinks still get the whole change.
    async fn park_oversized(&self, r: &Record<'_>, bytes: usize, now_us: i64) -> Result<(), LogError> {
        let topic = &r.topic;
        let reason = format!("record for {topic} is {bytes} bytes (key + value), more than the broker takes");
        let Some(c) = r.change else {
            // A transaction record: its size grows with the tables it touched only.
            tracing::error!(%topic, bytes, "transaction record too large for the log; left out");
            return Ok(());
        };
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
        self.dead_letter("log", &c.position.event_id(), &payload, &reason, ENVELOPE_FORMAT).await
    }

    /// Parks a payload that a sink could never deliver, with the reason, in
    /// the dead-letter topic: headers [`SINK_HEADER`], [`ERROR_HEADER`],
    /// [`FORMAT_HEADER`] (`format`: how the payload reads, so `pgfanout
    /// dead-letters` knows what it can replay) and [`PARKED_AT_HEADER`].
    /// Counts as delivered only once the broker has it.
    pub async fn dead_letter(
        &self,
        sink: &str,
        key: &str,
        payload: &[u8],
        error: &str,
        format: &str,
    ) -> Result<(), LogError> {
        let topic = dead_letter_topic(&self.cfg.topic_prefix);
        let parked_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let headers = OwnedHeaders::new()
            .insert(Header { key: SINK_HEADER, value: Some(sink) })
            .insert(Header { key: ERROR_HEADER, value: Some(error) })
            .insert(Header { key: FORMAT_HEADER, value: Some(format) })
            .insert(Header { key: PARKED_AT_HEADER, value: Some(&parked_at) });
        let record = FutureRecord::to(&topic).key(key).payload(payload).headers(headers);
        self.producer()
            .send(record, Duration::from_secs(300))
            .await
            .map(|_| crate::observe::metrics::dead_letter(sink))
            .map_err(|(source, _)| LogError::Produce { topic, source })
    }

    /// Records that the dead-letter record `key` (its `<partition>/<offset>`)
    /// was re-delivered, in [`replayed_topic`]; returns once the broker has it.
    pub async fn record_replayed(&self, key: &str, payload: &[u8]) -> Result<(), LogError> {
        let topic = replayed_topic(&self.cfg.topic_prefix);
        let record = FutureRecord::to(&topic).key(key).payload(payload);
        self.producer()
            .send(record, Duration::from_secs(300))
            .await
            .map(|_| ())
            .map_err(|(source, _)| LogError::Produce { topic, source })
    }
}

/// Which sink parked a dead-letter record (`log` and `enrich` for what
/// never reached a sink).
pub const SINK_HEADER: &str = "pgfanout.sink";
/// Why it was parked: the last error.
pub const ERROR_HEADER: &str = "pgfanout.error";
/// How its payload reads: [`ENVELOPE_FORMAT`], or a sink batch's format
/// (`sinks::parked`). Records parked before this header existed have none.
pub const FORMAT_HEADER: &str = "pgfanout.format";
/// When it was parked, RFC 3339 in UTC.
pub const PARKED_AT_HEADER: &str = "pgfanout.parked_at";
/// A change's envelope as the log carries it (large values left out for
/// the log's own records): it identifies the row and its position, to be
/// re-read from PostgreSQL; no sink input, so not replayable.
pub const ENVELOPE_FORMAT: &str = "envelope";

pub fn dead_letter_topic(prefix: &str) -> String {
    format!("{prefix}dead_letter")
}

/// Where `pgfanout dead-letters replay` records each dead-letter record it
/// re-delivered, keyed `<partition>/<offset>` of that record.
pub fn replayed_topic(prefix: &str) -> String {
    format!("{prefix}dead_letter.replayed")
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
    fn keys_land_where_kafkas_java_clients_put_them() {
        // Kafka's own murmur2 test vectors (its UtilsTest), made positive as
        // its default partitioner does; modulo i32::MAX leaves them whole.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, murmur2) in cases {
            assert_eq!(
                partition_for(key, i32::MAX),
                (murmur2 & 0x7fff_ffff) % i32::MAX,
                "{}",
                String::from_utf8_lossy(key)
            );
            assert!((0..6).contains(&partition_for(key, 6)));
        }
        assert_eq!(partition_for(br#"{"id":7}"#, 1), 0);
    }

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
