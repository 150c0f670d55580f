//! The periodic state snapshot: slowly changing replica state, published by one probe hit
//! instead of one hit per change.

use crate::Command;

/// Bumped whenever the layout of [`ReplicaSnapshot`] changes; tracers check it first.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Message types are indexed by their `Command` code; slot 0 is unused.
pub const COMMAND_SLOTS: usize = 16;

/// The memory `state_snapshot` points to. `#[repr(C)]` with explicit padding-free ordering, so
/// an eBPF program can read it with one `bpf_probe_read_user` and a field at a fixed offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReplicaSnapshot {
    pub version: u32,
    pub replica_id: u8,
    /// A `ReplicaStatus` code.
    pub status: u8,
    pub cluster_size: u8,
    pub quorum_size: u8,
    pub is_primary: u8,
    pub padding: [u8; 7],
    pub view: u64,
    pub op: u64,
    pub commit: u64,
    pub log_bytes: u64,
    pub log_entries: u64,
    pub pending_requests: u64,
    /// Ops the cluster committed that this replica has not executed yet.
    pub lag_operations: u64,
    /// PrepareOk votes (the primary's own included) of the oldest op waiting for its quorum
    /// longer than a heartbeat interval, else of the newest committed op; 0 on backups.
    pub prepare_ok_votes: u64,
    pub client_sessions_active: u64,
    pub repair_inflight: u64,
    /// Cumulative since start, indexed by `Command` code.
    pub messages_sent: [u64; COMMAND_SLOTS],
    pub messages_received: [u64; COMMAND_SLOTS],
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl ReplicaSnapshot {
    pub fn count_sent(&mut self, command: Command, bytes: usize) {
        self.messages_sent[command as usize] += 1;
        self.bytes_sent += bytes as u64;
    }

    pub fn count_received(&mut self, command: Command, bytes: usize) {
        self.messages_received[command as usize] += 1;
        self.bytes_received += bytes as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// The offsets tracers read; docs/probes.md lists the same table.
    #[test]
    fn layout_is_the_documented_one() {
        assert_eq!(offset_of!(ReplicaSnapshot, status), 5);
        assert_eq!(offset_of!(ReplicaSnapshot, is_primary), 8);
        assert_eq!(offset_of!(ReplicaSnapshot, view), 16);
        assert_eq!(offset_of!(ReplicaSnapshot, op), 24);
        assert_eq!(offset_of!(ReplicaSnapshot, commit), 32);
        assert_eq!(offset_of!(ReplicaSnapshot, lag_operations), 64);
        assert_eq!(offset_of!(ReplicaSnapshot, repair_inflight), 88);
        assert_eq!(offset_of!(ReplicaSnapshot, messages_sent), 96);
        assert_eq!(offset_of!(ReplicaSnapshot, messages_received), 224);
        assert_eq!(offset_of!(ReplicaSnapshot, bytes_received), 360);
        assert_eq!(size_of::<ReplicaSnapshot>(), 368);
    }
}
