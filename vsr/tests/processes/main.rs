//! Tests against real processes: replicas, the load generator, bpftrace. Run as root.

mod checkpoints;
mod cluster;
mod documents;
mod probes;
mod tools;
