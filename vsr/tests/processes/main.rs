//! Tests against real processes: replicas, the load generator, bpftrace. Run as root.

mod checkpoints;
mod cluster;
mod documents;
mod identity;
mod probes;
mod tools;
