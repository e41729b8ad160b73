//! pgfanout: a PostgreSQL change-data-capture sidecar.
//!
//! Data flows `source` (slot, native pgoutput decoder) → `log` (Kafka-API
//! broker, durable) → `enrich` (content join and derived engagement figures)
//! → `sinks` (one trait; ClickHouse, Redis, HTTP, file) → `pipeline`
//! (batcher, delivery, sink lanes, acknowledgement). The slot is
//! acknowledged only once every sink has flushed what precedes a commit.
//! `config`, `observe` and `retry` are the base every layer may use;
//! `commands` are the CLI's verbs. Each module imports only what stands
//! below it (ARCHITECTURE.md; `tests/layering.rs` enforces it).

pub mod config;
pub mod observe;
pub mod retry;

pub mod source;

pub mod log;

pub mod enrich;

pub mod sinks;

pub mod pipeline;

pub mod commands;
