//! The durable log: every change goes to a Kafka-API topic per table
//! (Redpanda in production) before any sink sees it, so other consumers can
//! read the same stream and nothing depends on the sidecar's memory.
//! `reader` reads a topic back (the dead-letter topic, for `pgfanout
//! dead-letters`).

pub mod envelope;
pub mod producer;
pub mod reader;

pub use producer::{LogError, LogProducer};
pub use reader::{read_to_end, LogRecord};
