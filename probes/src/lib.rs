//! The `vsr` USDT provider: the one contract between the replica and every tracer.
//!
//! Each probe is a function taking a closure that returns its arguments. The closure runs only
//! inside the branch guarded by the probe's semaphore, so while nobody is attached a probe costs
//! one compare and a not-taken jump, and its arguments are never computed. With the `probes`
//! feature off the functions are empty and the binary carries no `.note.stapsdt` at all.
//!
//! Every argument is an integer (pointers travel as `u64` addresses) and every probe takes the
//! replica id first, so a tracer can always label a hit without reading replica memory. Units
//! are in the argument names. The reference for operators is `docs/probes.md`, checked against
//! [`PROBES`] by a test.

mod codes;
mod snapshot;

pub use codes::{
    Command, Component, PEER_CLIENT, RejectReason, RepairStatus, ReplicaStatus, ViewChangeReason,
};
pub use snapshot::{ReplicaSnapshot, SNAPSHOT_VERSION};

/// One probe as tracers see it: its name and its argument names, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub arguments: &'static [&'static str],
}

macro_rules! probes {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ident),+); )*) => {
        #[cfg(feature = "probes")]
        #[usdt::provider]
        mod vsr {
            $( fn $name($($arg: $ty),+) {} )*
        }

        $(
            $(#[$doc])*
            #[inline(always)]
            pub fn $name(arguments: impl FnOnce() -> ($($ty,)+)) {
                #[cfg(feature = "probes")]
                vsr::$name!(|| arguments());
                #[cfg(not(feature = "probes"))]
                let _ = arguments;
            }
        )*

        /// Every probe of the provider, in declaration order.
        pub const PROBES: &[ProbeSpec] = &[
            $( ProbeSpec { name: stringify!($name), arguments: &[$(stringify!($arg)),+] }, )*
        ];
    };
}

probes! {
    /// A client request accepted by the primary (not a duplicate, session valid).
    fn client_request(replica_id: u8, client_id: u64, request_number: u64, bytes: u32);
    /// A reply sent to a client; `latency_ns` runs from the request's arrival at the primary.
    fn client_reply(replica_id: u8, client_id: u64, request_number: u64, op: u64, latency_ns: u64);
    /// All replies of one committed op at once: `latencies_ns_address` points to `count` `u64`
    /// latencies (as in `client_reply`), valid for the duration of the probe.
    fn client_reply_batch(replica_id: u8, op: u64, count: u32, latencies_ns_address: u64);
    /// The primary prepared one op (a batch of `requests` client requests, `bytes` of body).
    fn prepare_send(replica_id: u8, view: u64, op: u64, requests: u32, bytes: u32);
    /// The primary gathered a quorum of PrepareOk for `op`, `latency_ns` after preparing it.
    fn prepare_quorum(replica_id: u8, op: u64, latency_ns: u64, votes: u8);
    /// The primary committed `op`, `latency_ns` after its quorum (waiting for earlier ops included).
    fn commit(replica_id: u8, op: u64, latency_ns: u64);
    /// Any replica executed committed `op` against its state machine.
    fn commit_execute(replica_id: u8, op: u64, operations_ok: u32, operations_failed: u32);
    /// A message handed to the transport; `peer` is a replica index or 255 for a client.
    fn message_send(replica_id: u8, command: u8, bytes: u32, peer: u8);
    /// A message that passed every check and reached the protocol.
    fn message_recv(replica_id: u8, command: u8, bytes: u32, peer: u8);
    /// One group commit: `entries` journal records, `bytes` written and made durable together.
    fn journal_write(replica_id: u8, entries: u32, bytes: u64, latency_ns: u64);
    /// This replica left `view_old` for `view_new` (reason: see `ViewChangeReason`).
    fn view_change_start(replica_id: u8, view_old: u64, view_new: u64, reason: u8);
    /// Normal status reached in `view`, `latency_ns` after this replica's view change started.
    fn view_change_done(replica_id: u8, view: u64, latency_ns: u64, is_primary: u8);
    /// A restarted replica began the recovery protocol from its durable `commit`.
    fn recovery_start(replica_id: u8, nonce: u64, commit: u64);
    /// Recovery finished: the replica rejoined `view` at `op`, `latency_ns` after it started.
    fn recovery_done(replica_id: u8, view: u64, op: u64, latency_ns: u64);
    /// A checksum mismatch in durable state (component: see `Component`); `op` for the log.
    fn checksum_failure(replica_id: u8, component: u8, op: u64);
    /// A message rejected before the protocol saw it (reason: see `RejectReason`).
    fn byzantine_rejection(replica_id: u8, reason: u8, peer: u8);
    /// The replica asked its peers for a missing or corrupt log entry.
    fn repair_request(replica_id: u8, op: u64);
    /// A repair finished (status: see `RepairStatus`), `latency_ns` after it was first requested.
    fn repair_done(replica_id: u8, op: u64, latency_ns: u64, status: u8);
    /// A request already seen: resent the stored reply, or dropped while it was in flight.
    fn duplicate_request(replica_id: u8, client_id: u64, request_number: u64);
    /// The client table was full and evicted its least recently used session.
    fn session_evict(replica_id: u8, client_id: u64, sessions: u32);
    /// Periodic state: `snapshot_address` points to a `ReplicaSnapshot` of `snapshot_bytes`.
    fn state_snapshot(replica_id: u8, snapshot_address: u64, snapshot_bytes: u32);
}
