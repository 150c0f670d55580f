//! OTLP push to an OpenTelemetry Collector (gRPC or HTTP/protobuf), from the same metric
//! families `/metrics` serves.
//!
//! Mapping: latency histograms become explicit-bucket histograms with the configured bounds;
//! counters become cumulative monotonic sums whose start time is when their counting began
//! (vsrscope's start for kernel-map counters, the replica process's start for the tallies in its
//! snapshot); gauges become gauges with the values of the moment. Every export carries running
//! totals, so an export that never arrives loses nothing: the next one supersedes it. That is
//! also why nothing is queued: memory stays bounded however long a collector is down.
//!
//! Each replica is its own resource (`service.name`, `service.instance.id`, `host.name`,
//! `process.pid`); vsrscope's self-metrics are a resource of their own (`service.name` =
//! `vsrscope`).

mod encode;
mod export;
mod settings;

pub use encode::{OtlpEncoder, ReplicaProcess};
pub use export::OtlpExporter;
pub use settings::{OtlpFlags, OtlpSettings, Protocol};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OtlpError {
    #[error("{0}")]
    Config(String),
    #[error("OTLP export to {endpoint} failed after {attempts} attempt(s): {reason}")]
    Export {
        endpoint: String,
        attempts: u32,
        reason: String,
    },
    #[error("OTLP receiver at {endpoint} rejected {points} data point(s): {message}")]
    Rejected {
        endpoint: String,
        points: i64,
        message: String,
    },
}

fn config(message: impl Into<String>) -> OtlpError {
    OtlpError::Config(message.into())
}
