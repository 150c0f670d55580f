//! vsrscope: attach to running VSR replicas through their USDT probes, build the seed's
//! metrics in kernel maps, and export them.

pub mod attach;
pub mod metrics;
pub mod process;
pub mod usdt;
