//! State transfer: a replica that needs ops no peer's journal still holds (they fall before
//! every peer's retained interval) fetches a peer's newest checkpoint instead, in checksummed
//! chunks, installs it as its state machine and commit, and repairs the ops after it through
//! the hash chain as usual.
//!
//! A peer offers its checkpoint when asked for an op that its checkpoint covers and its journal
//! dropped; the first chunk is the offer. Chunks are asked for in order from the peer that
//! offered, and from the next peer after a retry interval without an answer; a peer whose
//! checkpoint is newer answers with the first chunk of its own, and the transfer moves to it.
//! Any replica's checkpoint is of committed ops, so any one newer than this replica's commit
//! may be installed.

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, Component, RejectReason};

use super::{Destination, REPLICAS_MAX, Replica, Status};
use crate::checkpoint::{self, CheckpointId};
use crate::checksum::checksum;
use crate::message::{Header, Message};
use crate::storage::{Storage, Zone, read_exact_at};

/// Bytes of checkpoint in one `Checkpoint` message.
pub const CHECKPOINT_CHUNK_BYTES: usize = 1024 * 1024;
/// The largest state a replica accepts from a peer: an offer above it is refused, so a forged
/// size cannot make it allocate without bound.
pub const STATE_BYTES_MAX: u64 = 1 << 30;

#[derive(Debug)]
pub(super) struct Transfer {
    op: u64,
    entry_checksum: u64,
    state_checksum: u64,
    size_bytes: u64,
    /// The peer asked last.
    peer: u8,
    /// The prefix of the state received so far.
    state: Vec<u8>,
    started_ns: u64,
    last_sent_ns: u64,
    attempts: u64,
}

#[derive(Debug, Default)]
pub(super) struct StateTransferState {
    pub(super) transfer: Option<Transfer>,
    /// Checkpoints installed from peers since this replica opened.
    installed: u64,
    /// The checkpoint the newest one superseded: intact in the other slot until the next one
    /// is written, so a peer midway through fetching it can finish.
    pub(super) previous: CheckpointId,
    /// When each peer was last offered this replica's checkpoint: a lagging peer asks for a
    /// window of ops at once, and one offer answers them all.
    offered_ns: [Option<u64>; REPLICAS_MAX as usize],
}

impl<S: Storage> Replica<S> {
    pub fn is_transferring_state(&self) -> bool {
        self.state_transfer.transfer.is_some()
    }

    pub fn state_transfers_installed(&self) -> u64 {
        self.state_transfer.installed
    }

    /// A peer asked for `op`, which this replica no longer holds: offer the checkpoint that
    /// covers it.
    pub(super) fn offer_checkpoint(&mut self, now_ns: u64, to: u8, op: u64) {
        assert!(op <= self.commit);
        let offered_ns = &mut self.state_transfer.offered_ns[usize::from(to)];
        let offered_recently =
            offered_ns.is_some_and(|at| now_ns.saturating_sub(at) < self.config.retry_interval_ns);
        if op <= self.superblock.checkpoint.op && !offered_recently {
            *offered_ns = Some(now_ns);
            self.send_checkpoint_chunk(to, self.superblock.checkpoint, 0);
        }
    }

    fn send_checkpoint_chunk(&mut self, to: u8, id: CheckpointId, offset: u64) {
        if id.op == 0 || offset >= id.size_bytes {
            return;
        }
        let length = (id.size_bytes - offset).min(CHECKPOINT_CHUNK_BYTES as u64) as usize;
        let mut chunk = vec![0u8; length];
        // A local read error is for the scrubber to find; the peer asks someone else.
        if !matches!(
            read_exact_at(
                &mut self.storage,
                Zone::Checkpoint(id.slot),
                offset,
                &mut chunk
            ),
            Ok(true)
        ) {
            return;
        }
        let mut header = self.header(Command::Checkpoint);
        header.op = id.op;
        header.context = id.entry_checksum;
        header.parent = id.state_checksum;
        header.aux = id.size_bytes;
        header.commit = offset;
        self.send(
            Destination::Replica(to),
            Message::new(header, Bytes::from(chunk)),
        );
    }

    pub(super) fn on_request_checkpoint(&mut self, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::RequestCheckpoint);
        if self.status == Status::Recovering {
            return;
        }
        // A peer fetching the checkpoint this one superseded may finish it; one asking for an
        // older one gets the start of ours.
        let (current, previous) = (self.superblock.checkpoint, self.state_transfer.previous);
        let (id, offset) = if header.op == current.op {
            (current, header.commit)
        } else if header.op == previous.op && previous.op > 0 {
            (previous, header.commit)
        } else {
            (current, 0)
        };
        self.send_checkpoint_chunk(header.replica, id, offset);
    }

    pub(super) fn on_checkpoint(
        &mut self,
        now_ns: u64,
        message: &Message,
    ) -> Result<(), RejectReason> {
        self.assert_invariants();
        let header = &message.header;
        assert_eq!(header.command, Command::Checkpoint);
        let chunk_end = header.commit + message.body.len() as u64;
        if header.op == 0 || chunk_end > header.aux || header.aux > STATE_BYTES_MAX {
            return Err(RejectReason::InvalidFields);
        }
        if header.op <= self.commit {
            // The peer no longer holds the ops its checkpoint covers: a rotten record of one
            // that this replica's checkpoint covers too is not worth waiting for.
            let covered = header.op.min(self.superblock.checkpoint.op);
            self.forget_scrub_repairs_through(covered);
            return Ok(());
        }
        if self.status != Status::Normal {
            return Ok(());
        }
        let newer = self
            .state_transfer
            .transfer
            .as_ref()
            .is_none_or(|transfer| header.op > transfer.op);
        if newer {
            if header.commit != 0 {
                return Ok(());
            }
            let previous = self.state_transfer.transfer.take();
            let (replica_id, op, commit) = (self.config.replica, header.op, self.commit);
            if previous.is_none() {
                probe::state_transfer_start(|| (replica_id, op, commit));
            }
            self.state_transfer.transfer = Some(Transfer {
                op: header.op,
                entry_checksum: header.context,
                state_checksum: header.parent,
                size_bytes: header.aux,
                peer: header.replica,
                state: Vec::new(),
                started_ns: previous.map_or(now_ns, |transfer| transfer.started_ns),
                last_sent_ns: now_ns,
                attempts: 0,
            });
        }
        let transfer = self.state_transfer.transfer.as_mut().unwrap();
        let same = (transfer.op, transfer.state_checksum, transfer.size_bytes)
            == (header.op, header.parent, header.aux);
        if !same || header.commit != transfer.state.len() as u64 {
            return Ok(());
        }
        transfer.state.extend_from_slice(&message.body);
        transfer.peer = header.replica;
        transfer.attempts = 0;
        if (transfer.state.len() as u64) < transfer.size_bytes {
            self.request_checkpoint_chunk(now_ns);
            return Ok(());
        }
        let transfer = self.state_transfer.transfer.take().unwrap();
        self.install_checkpoint(now_ns, transfer);
        Ok(())
    }

    fn request_checkpoint_chunk(&mut self, now_ns: u64) {
        let transfer = self.state_transfer.transfer.as_mut().unwrap();
        transfer.last_sent_ns = now_ns;
        let (to, op, offset) = (transfer.peer, transfer.op, transfer.state.len() as u64);
        let mut header = self.header(Command::RequestCheckpoint);
        header.op = op;
        header.commit = offset;
        self.send(Destination::Replica(to), Message::new(header, Bytes::new()));
    }

    /// Asks the next peer for the chunk the last one did not send.
    pub(super) fn on_state_transfer_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        let Some(transfer) = self.state_transfer.transfer.as_mut() else {
            return;
        };
        if self.status != Status::Normal || transfer.op <= self.commit {
            self.state_transfer.transfer = None;
            return;
        }
        if now_ns.saturating_sub(transfer.last_sent_ns) <= self.config.retry_interval_ns {
            return;
        }
        transfer.attempts += 1;
        let (op, attempts) = (transfer.op, transfer.attempts);
        let peer = self.repair_peer(op, attempts);
        self.state_transfer.transfer.as_mut().unwrap().peer = peer;
        self.request_checkpoint_chunk(now_ns);
    }

    /// Makes a received checkpoint this replica's state machine and commit; the next flush
    /// writes it and names it in the superblock.
    fn install_checkpoint(&mut self, now_ns: u64, transfer: Transfer) {
        assert!(transfer.op > self.commit);
        let replica_id = self.config.replica;
        let state = Bytes::from(transfer.state);
        let decoded = (checksum(&state) == transfer.state_checksum)
            .then(|| checkpoint::decode_state(&state, self.config.client_sessions_max))
            .flatten();
        let chains = self
            .entries
            .get(&(transfer.op + 1))
            .is_none_or(|next| next.parent == transfer.entry_checksum);
        let Some((kv, client_table)) = decoded.filter(|_| chains) else {
            // Damaged in flight or at its source: start again on the next tick.
            probe::checksum_failure(|| (replica_id, Component::Checkpoint as u8, transfer.op));
            return;
        };
        let op = transfer.op;
        self.kv = kv;
        self.client_table = client_table;
        self.commit = op;
        self.commit_checksum = transfer.entry_checksum;
        self.commit_max = self.commit_max.max(op);
        if self.op < op {
            self.op = op;
            self.head_checksum = transfer.entry_checksum;
            self.entries.clear();
        }
        self.entries.retain(|entry_op, _| *entry_op > op);
        self.candidates.retain(|entry_op, _| *entry_op > op);
        self.chain_low = self.chain_low.max(op);
        self.repair.pending.retain(|pending_op, _| *pending_op > op);
        self.pipeline.votes.retain(|vote_op, _| *vote_op > op);
        // Whatever the journal held up to here is of no use now, and may be of another view.
        self.journal.discard_before(op + 1);
        self.pending_checkpoint = Some((
            CheckpointId {
                op,
                entry_checksum: transfer.entry_checksum,
                state_checksum: transfer.state_checksum,
                size_bytes: transfer.size_bytes,
                slot: self.superblock.checkpoint.next_slot(),
            },
            state,
        ));
        self.state_transfer.installed += 1;
        let (bytes, latency_ns) = (transfer.size_bytes, now_ns - transfer.started_ns);
        probe::state_transfer_done(|| (replica_id, op, bytes, latency_ns));
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use vsr_probes::{Command, ReplicaStatus};

    use super::super::{Config, Replica, Source};
    use crate::message::{Header, Message};
    use crate::simulator::MemoryStorage;

    #[test]
    fn a_replica_fetching_a_checkpoint_publishes_status_3() {
        let config = Config::new(1, 1, 3);
        let mut storage = MemoryStorage::default();
        Replica::format(&config, &mut storage, false).unwrap();
        let mut backup = Replica::open(config, storage, 0).unwrap();
        // The first of two chunks of a peer's checkpoint of op 100.
        let mut header = Header::new(Command::Checkpoint, 1, 0);
        header.op = 100;
        header.aux = 2048;
        header.commit = 0;
        backup.on_message(
            1,
            Source::Replica(0),
            Message::new(header, Bytes::from(vec![0; 1024])),
        );
        assert!(backup.is_transferring_state());
        backup.on_tick(2);
        assert_eq!(backup.snapshot.status, ReplicaStatus::StateTransfer as u8);
        // A forged size beyond the bound is refused, not allocated for.
        header.op = 200;
        header.aux = super::STATE_BYTES_MAX + 1;
        backup.on_message(3, Source::Replica(0), Message::new(header, Bytes::new()));
        assert_eq!(backup.state_transfer.transfer.as_ref().unwrap().op, 100);
    }
}
