//! A Viewstamped Replication replica carrying the `vsr` USDT probes, with its client, load
//! generator support and deterministic simulator. See `../shared/vsr-notes.md` for the protocol
//! and `docs/probes.md` for the probes.

pub mod checkpoint;
pub mod checksum;
pub mod client;
pub mod client_table;
mod identity;
pub mod journal;
pub mod kv;
pub mod message;
pub mod online_checks;
pub mod prng;
pub mod replica;
pub mod runtime;
pub mod simulator;
pub mod storage;
pub mod superblock;
pub mod transport;
