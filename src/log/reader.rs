//! Reads a topic back from its beginning to the end it had when the read
//! started, as `pgfanout dead-letters` lists and replays the dead-letter
//! topic. Bounded by the high watermarks read at the start (or a partition's
//! end, whichever comes first), so a sink that keeps parking while it runs
//! cannot keep the read going.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::producer::client_config;
use super::LogError;
use crate::config::LogConfig;

/// How long one broker request (metadata, watermarks) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the read may go without a record before a partition's end.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One record as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// Header values as text (pgfanout's are).
    pub headers: BTreeMap<String, String>,
    /// The broker's timestamp, ms since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

impl LogRecord {
    /// A consumed message as a record.
    pub fn of(msg: &impl Message<Headers = impl Headers>) -> LogRecord {
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        LogRecord {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Every record of `topic`, in offset order per partition (partitions one
/// after the other); empty if the topic does not exist. Runs the consumer's
/// blocking calls on a blocking thread.
pub async fn read_to_end(cfg: &LogConfig, topic: &str) -> Result<Vec<LogRecord>, LogError> {
    let (cfg, topic) = (cfg.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || read_blocking(&cfg, &topic))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn read_blocking(cfg: &LogConfig, topic: &str) -> Result<Vec<LogRecord>, LogError> {
    let read = |source| LogError::Read { topic: topic.to_string(), source };
    let consumer: BaseConsumer = client_config(cfg)
        // Assigned, never subscribed and never committing: the group is only
        // a name librdkafka wants.
        .set("group.id", format!("pgfanout-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(LogError::Client)?;
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(read)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(Vec::new()) };
    match found.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(Vec::new()),
        Some(code) => return Err(read(KafkaError::MetadataFetch(code))),
    }
    // The end of each partition that holds anything, as of now.
    let mut ends = BTreeMap::new();
    for p in found.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT).map_err(read)?;
        tracing::debug!(topic, partition = p.id(), low, high, "reading a partition up to its high watermark");
        if high > low {
            ends.insert(p.id(), high);
        }
    }
    let mut assignment = TopicPartitionList::new();
    for &p in ends.keys() {
        assignment.add_partition_offset(topic, p, Offset::Beginning).map_err(read)?;
    }
    consumer.assign(&assignment).map_err(read)?;
    let mut out = Vec::new();
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        let Some(polled) = consumer.poll(Duration::from_millis(500)) else {
            if last_progress.elapsed() > STALL_TIMEOUT {
                let left: Vec<String> =
                    ends.iter().map(|(p, end)| format!("partition {p} before offset {end}")).collect();
                return Err(LogError::ReadStalled { topic: topic.to_string(), left: left.join(", ") });
            }
            continue;
        };
        last_progress = Instant::now();
        let msg = match polled {
            Ok(msg) => msg,
            Err(KafkaError::PartitionEOF(p)) => {
                tracing::debug!(topic, partition = p, "partition read to its end");
                ends.remove(&p);
                continue;
            }
            Err(e) => return Err(read(e)),
        };
        let Some(&end) = ends.get(&msg.partition()) else { continue };
        if msg.offset() >= end {
            ends.remove(&msg.partition());
            continue;
        }
        out.push(LogRecord::of(&msg));
        if msg.offset() + 1 >= end {
            ends.remove(&msg.partition());
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}
