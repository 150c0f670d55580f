//! vsrscope: attach to running VSR replicas through their USDT probes, build the seed's
//! metrics in kernel maps, and export them.

pub mod attach;
pub mod build_info;
pub mod cookie_slots;
pub mod liveness;
pub mod metrics;
pub mod otlp;
pub mod privileges;
pub mod process;
pub mod snapshot_slots;
pub mod statsd;
pub mod web;

/// USDT discovery, from its own crate so the fuzzer can build it alone.
pub use vsrscope_usdt as usdt;
