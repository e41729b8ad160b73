//! Reading a topic back, for tests that check what reached the log or the
//! dead-letter topic.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value as Json;

use super::TestEnv;

/// One record of a topic.
#[derive(Debug)]
pub struct Record {
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Json,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` (every partition) from the beginning until `enough` says
/// so or `timeout` passes. Assigned, not subscribed, and read to the end by
/// polling: Tansu's watermarks cannot be trusted. A tombstone's payload is
/// JSON null.
pub async fn read_topic(
    t: &TestEnv,
    topic: &str,
    timeout: Duration,
    enough: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &t.cfg.log.brokers)
        .set("group.id", format!("{}-reader-{}", t.name, uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()).max(1) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !enough(&out) && Instant::now() < deadline {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else { continue };
        let msg = pgfanout::log::LogRecord::of(&msg.unwrap_or_else(|e| panic!("reading {topic}: {e}")));
        out.push(Record {
            partition: msg.partition,
            payload: serde_json::from_slice(&msg.payload).unwrap_or(Json::Null),
            key: msg.key,
            headers: msg.headers.into_iter().collect(),
        });
    }
    out
}
