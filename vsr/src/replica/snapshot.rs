//! The state published to tracers: the `state_snapshot` probe points at a `ReplicaSnapshot` that
//! this replica refreshes every snapshot interval.

use vsr_probes as probe;
use vsr_probes::{ReplicaSnapshot, ReplicaStatus};

use super::Replica;
use crate::storage::Storage;

impl<S: Storage> Replica<S> {
    /// PrepareOk votes (own included) as a quorum health signal: those of the oldest op that has
    /// waited a heartbeat interval or longer for its quorum, else those that committed the newest
    /// op. Younger ops do not count: under load the newest op has only the primary's own vote
    /// for the millisecond until the backups answer, which says nothing about the quorum.
    pub(super) fn quorum_votes(&self, now_ns: u64) -> u8 {
        self.pipeline
            .votes
            .values()
            .find(|votes| {
                votes.quorum_ns.is_none()
                    && now_ns.saturating_sub(votes.prepared_ns) >= self.config.heartbeat_interval_ns
            })
            .map_or(self.pipeline.committed_op_votes, |votes| {
                votes.replicas.count_ones() as u8
            })
    }

    pub(super) fn publish_snapshot(&mut self, now_ns: u64) {
        let quorum_votes = self.quorum_votes(now_ns);
        let is_primary = self.is_primary();
        // Status 3 is published, not a protocol status: a transfer runs in normal status.
        let status = if self.is_transferring_state() {
            ReplicaStatus::StateTransfer
        } else {
            self.status.probe_code()
        };
        let snapshot = &mut self.snapshot;
        snapshot.status = status as u8;
        snapshot.is_primary = is_primary as u8;
        snapshot.view = self.view;
        snapshot.op = self.op;
        snapshot.commit = self.commit;
        snapshot.log_bytes = self.journal.size_bytes();
        snapshot.log_entries = self.journal.entry_count();
        snapshot.pending_requests = if is_primary {
            (self.pipeline.request_queue.len() + self.pipeline.pending_replies.len()) as u64
        } else {
            0
        };
        snapshot.lag_operations = self.commit_max.saturating_sub(self.commit);
        snapshot.prepare_ok_votes = if is_primary {
            u64::from(quorum_votes)
        } else {
            0
        };
        snapshot.client_sessions_active = self.client_table.len() as u64;
        snapshot.repair_inflight = self.repair.pending.len() as u64;
        let (replica_id, address, size) = (
            self.config.replica,
            snapshot as *const ReplicaSnapshot as u64,
            std::mem::size_of::<ReplicaSnapshot>() as u32,
        );
        probe::state_snapshot(|| (replica_id, address, size));
    }
}
