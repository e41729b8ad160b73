//! The durable log: every change goes to a Kafka-API topic per table
//! (Redpanda in production) before any sink sees it, so other consumers can
//! read the same stream and nothing depends on the sidecar's memory.
//! `envelope` is a change's record, `records` what a batch becomes (with
//! tombstones and transaction records), `tail` what the log already holds,
//! `producer` sends it, `reader` reads a topic back (the dead-letter topic,
//! for `pgfanout dead-letters`).

pub mod debezium;
pub mod envelope;
pub mod producer;
pub mod reader;
pub mod records;
pub mod tail;

pub use producer::{LogError, LogProducer};
pub use reader::{read_to_end, LogRecord};
pub use records::Publish;
