//! pgfanout: a PostgreSQL change-data-capture sidecar.
//!
//! Data flows `source` (slot, native pgoutput decoder) → `log` (Kafka-API
//! broker, durable) → `enrich` (content join and derived engagement figures)
//! → `sinks` (ClickHouse, Redis, HTTP). The slot is acknowledged through
//! `ack` only once every sink has flushed what precedes a commit.

pub mod ack;
pub mod backfill;
pub mod config;
pub mod enrich;
pub mod generate;
pub mod init;
pub mod log;
pub mod observe;
pub mod pipeline;
pub mod retry;
pub mod service;
pub mod sinks;
pub mod source;
