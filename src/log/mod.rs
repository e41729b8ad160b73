//! The durable log: every change goes to a Kafka-API topic per table
//! (Redpanda in production) before any sink sees it, so other consumers can
//! read the same stream and nothing depends on the sidecar's memory.

pub mod debezium;
pub mod envelope;
pub mod producer;

pub use producer::{LogError, LogProducer};
