//! What the log already holds of one origin: for each partition, the mark
//! of the last record that origin published there. A publisher that
//! restarted (after a crash, or a failed publish whose records may have
//! partly landed) replays from the slot's confirmed position, which is
//! usually behind what reached the broker; it skips what a partition holds
//! instead of publishing it again, so the log holds each change once.
//!
//! This works because a partition holds, of one publisher, a prefix of
//! what it was sent in order: the producer is idempotent with the gapless
//! guarantee on (a record is never appended after one that failed), and a
//! publisher sends each origin's records in mark order. It does not rely
//! on Kafka transactions.
//!
//! The tail is found by reading each partition backwards in growing windows
//! from its high watermark to its end (the end found through partition EOF,
//! not the watermark: Tansu's is wrong, see ../shared/SERVICES.md), until a
//! record of the origin shows up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::producer::{client_config, LogError};
use super::records::{Kind, Mark};
use crate::config::LogConfig;

pub use super::envelope::POSITION_HEADER;
/// Header with the record's kind (`records::Kind`).
pub const KIND_HEADER: &str = "pgfanout.kind";
/// Header with the record's origin: `stream`, or a scan chunk's name.
pub const ORIGIN_HEADER: &str = "pgfanout.origin";
/// The live stream's origin.
pub const STREAM: &str = "stream";

/// First look-back, and the widest: past it a partition is taken to hold
/// nothing of the origin (it is logged), so a topic written by something
/// else costs a bounded read, not the whole topic at every start.
const FIRST_WINDOW: i64 = 64;
const WIDEST_WINDOW: i64 = 1 << 18;

/// The last mark of one origin per topic partition, for the topics read so far.
#[derive(Debug, Default)]
pub struct Tails {
    marks: HashMap<(String, i32), Mark>,
    read: std::collections::HashSet<String>,
}

/// The consumer both reads go through: assigned, never subscribed or
/// committing, partition EOF on.
pub fn consumer(cfg: &LogConfig) -> Result<BaseConsumer, LogError> {
    client_config(cfg)
        .set("group.id", "pgfanout-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(LogError::Client)
}

/// The partition count of each of `topics`, from the broker's metadata
/// (blocking).
pub fn partition_counts(
    consumer: &BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32)>, LogError> {
    let mut out = Vec::with_capacity(topics.len());
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout).map_err(LogError::Client)?;
        let n = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        if n == 0 {
            return Err(LogError::Tail { topic: topic.clone(), reason: "the broker lists no partitions".into() });
        }
        out.push((topic.clone(), n));
    }
    Ok(out)
}

impl Tails {
    /// The topics whose tails are not read yet, among `topics`.
    pub fn unknown<'a>(&self, topics: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in topics {
            if !self.read.contains(t) && !out.iter().any(|o| o == t) {
                out.push(t.to_string());
            }
        }
        out
    }

    /// Whether the partition already holds the record with `mark`.
    pub fn holds(&self, topic: &str, partition: i32, mark: Mark) -> bool {
        // Looked up without allocating: this runs for every record of a replay.
        self.marks.iter().any(|((t, p), m)| *p == partition && t == topic && mark <= *m)
    }

    /// Forgets the tails that `published` (a record just sent past them)
    /// has overtaken: every later record of the origin has a greater mark.
    pub fn passed(&mut self, published: Mark) {
        self.marks.retain(|_, m| *m >= published);
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// Reads the tails of `topics`, each with its partition count
    /// (blocking: run it off the async threads).
    pub fn read(
        &mut self,
        consumer: &BaseConsumer,
        topics: &[(String, i32)],
        origin: &str,
        timeout: Duration,
    ) -> Result<(), LogError> {
        let deadline = Instant::now() + timeout;
        for (topic, n) in topics {
            let mut pending = Vec::new();
            for p in 0..*n {
                let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(LogError::Client)?;
                pending.push(Partition { partition: p, low, high, window: FIRST_WINDOW });
            }
            // One topic at a time: a partition EOF names the partition only.
            while !pending.is_empty() {
                let found = read_windows(consumer, topic, &pending, origin, deadline)?;
                let mut wider = Vec::new();
                for mut part in pending {
                    match found.get(&part.partition) {
                        Some(mark) => {
                            self.marks.insert((topic.clone(), part.partition), *mark);
                        }
                        None if part.start() > part.low && part.window < WIDEST_WINDOW => {
                            part.window *= 8;
                            wider.push(part);
                        }
                        None if part.start() > part.low => tracing::warn!(
                            %topic, partition = part.partition, records = part.window,
                            "no record of this publisher among the partition's last records; taking it to hold none (a replay may repeat what an older publisher wrote)"
                        ),
                        None => {}
                    }
                }
                pending = wider;
            }
            self.read.insert(topic.clone());
        }
        Ok(())
    }
}

struct Partition {
    partition: i32,
    low: i64,
    high: i64,
    window: i64,
}

impl Partition {
    fn start(&self) -> i64 {
        (self.high - self.window).max(self.low)
    }
}

/// Reads each partition of `topic` from its window's start to its end;
/// the last mark of `origin` in each.
fn read_windows(
    consumer: &BaseConsumer,
    topic: &str,
    parts: &[Partition],
    origin: &str,
    deadline: Instant,
) -> Result<HashMap<i32, Mark>, LogError> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.start())).map_err(LogError::Client)?;
    }
    consumer.assign(&tpl).map_err(LogError::Client)?;
    let mut at_end = std::collections::HashSet::new();
    let mut found = HashMap::new();
    let tail_err = |reason: String| LogError::Tail { topic: topic.to_string(), reason };
    while at_end.len() < parts.len() {
        if Instant::now() > deadline {
            return Err(tail_err(format!(
                "reading the last records took too long ({} of {} partitions not at their end)",
                parts.len() - at_end.len(),
                parts.len()
            )));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                if let Some(mark) = mark_of(&msg, origin) {
                    let slot = found.entry(msg.partition()).or_insert(mark);
                    *slot = (*slot).max(mark);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                return Err(tail_err("a partition's records were deleted while being read".into()))
            }
            Some(Err(e)) => return Err(LogError::Client(e)),
        }
    }
    Ok(found)
}

/// The mark of a record the origin published, from its headers.
fn mark_of(msg: &BorrowedMessage<'_>, origin: &str) -> Option<Mark> {
    let headers = msg.headers()?;
    let (mut position, mut kind, mut from) = (None, None, None);
    for h in headers.iter() {
        let value = std::str::from_utf8(h.value?).ok()?;
        match h.key {
            POSITION_HEADER => position = super::envelope::parse_position_header(value),
            KIND_HEADER => kind = Kind::parse(value),
            ORIGIN_HEADER => from = Some(value == origin),
            _ => {}
        }
    }
    match (position, kind, from) {
        (Some(position), Some(kind), Some(true)) => Some(Mark { position, kind }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Position;

    fn mark(lsn: u64, ordinal: u32, kind: Kind) -> Mark {
        Mark { position: Position { commit_lsn: lsn, ordinal }, kind }
    }

    #[test]
    fn a_partition_holds_what_is_at_or_before_its_tail_and_forgets_it_once_passed() {
        let mut t = Tails::default();
        t.marks.insert(("a".into(), 0), mark(10, 2, Kind::Change));
        t.marks.insert(("a".into(), 1), mark(8, 0, Kind::Tombstone));
        t.read.insert("a".into());
        assert!(t.holds("a", 0, mark(10, 2, Kind::Change)));
        assert!(t.holds("a", 0, mark(9, 7, Kind::End)));
        assert!(!t.holds("a", 0, mark(10, 2, Kind::Tombstone)), "the delete landed, its tombstone did not");
        assert!(t.holds("a", 1, mark(8, 0, Kind::Change)));
        assert!(!t.holds("a", 1, mark(9, 0, Kind::Change)), "partition 1 lost more of the batch");
        assert!(!t.holds("b", 0, mark(1, 0, Kind::Change)), "another topic");
        assert_eq!(t.unknown(["a", "b", "b"]), ["b"]);
        t.passed(mark(9, 0, Kind::Change));
        assert!(!t.is_empty(), "partition 0's tail is still ahead");
        t.passed(mark(11, 0, Kind::Change));
        assert!(t.is_empty());
    }
}
