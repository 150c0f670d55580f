//! Checkpointing the state machine: captured when an op that completes a checkpoint interval
//! executes, written by the next flush before the superblock that names it, and loaded when the
//! replica opens so that only the ops after it are replayed.

use std::io;

use vsr_probes as probe;
use vsr_probes::Component;

use super::Replica;
use crate::checkpoint::{self, CheckpointId};
use crate::checksum::checksum;
use crate::storage::Storage;

impl<S: Storage> Replica<S> {
    /// Encodes the state machine as of `commit`, for the next flush to write: at the end of
    /// each checkpoint interval, or at once when the named checkpoint was found damaged.
    pub(super) fn capture_checkpoint(&mut self) {
        assert!(self.commit >= self.superblock.checkpoint.op);
        let state = checkpoint::encode_state(&self.kv, &self.client_table);
        let id = CheckpointId {
            op: self.commit,
            entry_checksum: self.commit_checksum,
            state_checksum: checksum(&state),
            size_bytes: state.len() as u64,
            slot: self.superblock.checkpoint.next_slot(),
        };
        self.pending_checkpoint = Some((id, state));
    }

    /// Starts the state machine from the superblock's checkpoint. Returns false if there is
    /// one and it cannot be used (it fails its checksum): the state machine then starts empty
    /// and the journal replays from op 1.
    pub(super) fn load_checkpoint(&mut self) -> io::Result<bool> {
        assert_eq!(self.commit, 0, "loaded once, before replay");
        let id = self.superblock.checkpoint;
        if id.op == 0 {
            return Ok(true);
        }
        let decoded = checkpoint::read(&mut self.storage, &id)?
            .and_then(|state| checkpoint::decode_state(&state, self.config.client_sessions_max));
        let Some((kv, client_table)) = decoded else {
            let replica_id = self.config.replica;
            probe::checksum_failure(|| (replica_id, Component::Checkpoint as u8, id.op));
            return Ok(false);
        };
        self.kv = kv;
        self.client_table = client_table;
        self.commit = id.op;
        self.commit_checksum = id.entry_checksum;
        Ok(true)
    }
}
