//! The scrubber: corruption that appears while a replica runs (bit rot, a misdirected write) is
//! found by reading back, at a limited rate, every committed journal record the replica still
//! keeps, the checkpoint its superblock names and every superblock copy, once per tour. A
//! corrupt record is counted once and fetched again from a peer (verified through the hash
//! chain: the next op's parent, or the commit checksum); a damaged superblock copy is rewritten
//! with the others; a damaged checkpoint is replaced by a fresh one of the current state.

use std::collections::BTreeSet;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, Component, RepairStatus};

use super::{Destination, Replica, Status};
use crate::checkpoint;
use crate::journal::ReadError;
use crate::message::{Entry, Message};
use crate::storage::Storage;
use crate::superblock;

#[derive(Debug, Default)]
pub(super) struct ScrubState {
    /// The next op to read in this tour; the tour ends after `tour_last_op`.
    next_op: u64,
    tour_last_op: u64,
    tour_started_ns: u64,
    tour_ops: u64,
    tour_corruptions: u32,
    /// Reads the rate allows and not yet spent, in thousandths of a read.
    credit_milli: u64,
    last_tick_ns: u64,
    /// Committed ops whose record was found corrupt, each counted once, until a peer's copy
    /// replaces it.
    corrupt_ops: BTreeSet<u64>,
    last_repair_sent_ns: u64,
    tours_completed: u64,
    /// The current tour's end was reported (`scrub_tour_done`); the next waits for its turn.
    tour_reported: bool,
}

/// A tour starts at most this often: an idle replica's short journal is not reread in a loop.
const SCRUB_TOUR_INTERVAL_MIN_NS: u64 = 1_000_000_000;

impl ScrubState {
    /// The first few committed ops awaiting a peer's copy, for `describe`.
    pub(super) fn corrupt_ops_preview(&self) -> Vec<u64> {
        self.corrupt_ops.iter().take(4).copied().collect()
    }
}

impl<S: Storage> Replica<S> {
    pub fn scrub_tours_completed(&self) -> u64 {
        self.scrub.tours_completed
    }

    /// Committed ops found corrupt and not yet replaced by a peer's copy.
    pub fn scrub_corrupt_ops(&self) -> usize {
        self.scrub.corrupt_ops.len()
    }

    pub(super) fn on_scrub_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        if self.status == Status::Recovering || self.config.scrub_ops_per_second == 0 {
            return;
        }
        let elapsed_ns = now_ns.saturating_sub(self.scrub.last_tick_ns);
        self.scrub.last_tick_ns = now_ns;
        // After a stall the scrubber resumes at its rate rather than in one burst.
        let credit_max_milli = self.config.scrub_ops_per_second * 100;
        self.scrub.credit_milli = (self.scrub.credit_milli
            + elapsed_ns * self.config.scrub_ops_per_second / 1_000_000)
            .min(credit_max_milli);
        let tour_due = now_ns.saturating_sub(self.scrub.tour_started_ns)
            >= SCRUB_TOUR_INTERVAL_MIN_NS
            || self.scrub.tours_completed == 0;
        if self.scrub.next_op > self.scrub.tour_last_op && tour_due {
            self.start_scrub_tour(now_ns);
        }
        while self.scrub.credit_milli >= 1000 && self.scrub.next_op <= self.scrub.tour_last_op {
            self.scrub.credit_milli -= 1000;
            let op = self.scrub.next_op.max(self.journal.op_min());
            self.scrub.next_op = op + 1;
            if op > self.scrub.tour_last_op {
                break;
            }
            self.scrub.tour_ops += 1;
            if let Ok(Err(ReadError::Corrupt)) = self.journal.read(&mut self.storage, op) {
                self.found_corrupt_op(now_ns, op);
            }
        }
        let tour_ends = self.scrub.next_op > self.scrub.tour_last_op && !self.scrub.tour_reported;
        if tour_ends {
            self.scrub.tour_reported = true;
            self.scrub.tours_completed += 1;
            let replica_id = self.config.replica;
            let (ops, corruptions) = (self.scrub.tour_ops, self.scrub.tour_corruptions);
            let latency_ns = now_ns - self.scrub.tour_started_ns;
            probe::scrub_tour_done(|| (replica_id, ops, corruptions, latency_ns));
        }
        if now_ns.saturating_sub(self.scrub.last_repair_sent_ns) > self.config.retry_interval_ns {
            self.scrub.last_repair_sent_ns = now_ns;
            self.request_scrub_repairs();
        }
    }

    /// A tour covers the ops committed when it starts, after checking the checkpoint and the
    /// superblock copies.
    fn start_scrub_tour(&mut self, now_ns: u64) {
        self.scrub.tour_reported = false;
        self.scrub.next_op = self.journal.op_min().max(1);
        self.scrub.tour_last_op = self.commit;
        self.scrub.tour_started_ns = now_ns;
        self.scrub.tour_ops = 0;
        self.scrub.tour_corruptions = 0;
        let replica_id = self.config.replica;
        let id = self.superblock.checkpoint;
        if id.op > 0 && matches!(checkpoint::read(&mut self.storage, &id), Ok(None)) {
            probe::checksum_failure(|| (replica_id, Component::Checkpoint as u8, id.op));
            self.scrub.tour_corruptions += 1;
            // The state has moved on from it: a checkpoint of the current state replaces it.
            if self.pending_checkpoint.is_none() {
                self.capture_checkpoint();
            }
        }
        let (cluster, count) = (self.config.cluster, self.config.replica_count);
        if let Ok(opened) = superblock::open(&mut self.storage, cluster, replica_id, count)
            && opened.corrupt_copies > 0
        {
            for _ in 0..opened.corrupt_copies {
                probe::checksum_failure(|| (replica_id, Component::Superblock as u8, 0));
            }
            self.scrub.tour_corruptions += opened.corrupt_copies as u32;
            self.superblock_damaged = true;
            self.superblock_dirty = true;
        }
    }

    /// A committed op's record fails its checksum (found by the scrubber or while serving a
    /// peer): counted once, then fetched again.
    pub(super) fn found_corrupt_op(&mut self, now_ns: u64, op: u64) {
        assert!(op <= self.commit);
        if !self.scrub.corrupt_ops.insert(op) {
            return;
        }
        self.scrub.tour_corruptions += 1;
        let replica_id = self.config.replica;
        probe::checksum_failure(|| (replica_id, Component::Log as u8, op));
        probe::repair_request(|| (replica_id, op));
        self.scrub.last_repair_sent_ns = now_ns;
        self.send_scrub_repair(op, 0);
    }

    /// A committed op found corrupt and already counted (when the journal was opened): fetched
    /// again with the ones the scrubber finds.
    pub(super) fn schedule_scrub_repair(&mut self, op: u64) {
        assert!(op <= self.commit);
        if self.scrub.corrupt_ops.insert(op) {
            let replica_id = self.config.replica;
            probe::repair_request(|| (replica_id, op));
        }
    }

    /// Stops waiting for copies of rotten records up to `op`: no peer holds them any more,
    /// and this replica's checkpoint covers them.
    pub(super) fn forget_scrub_repairs_through(&mut self, op: u64) {
        assert!(op <= self.superblock.checkpoint.op);
        self.scrub.corrupt_ops.retain(|corrupt_op| *corrupt_op > op);
    }

    fn request_scrub_repairs(&mut self) {
        let commit = self.commit;
        let journal_op_min = self.journal.op_min();
        // Ops the journal no longer keeps need no copy.
        self.scrub
            .corrupt_ops
            .retain(|op| *op >= journal_op_min && *op <= commit);
        let ops: Vec<u64> = self.scrub.corrupt_ops.iter().take(16).copied().collect();
        for (attempt, op) in ops.into_iter().enumerate() {
            self.send_scrub_repair(op, attempt as u64 + self.scrub.tours_completed);
        }
    }

    fn send_scrub_repair(&mut self, op: u64, attempts: u64) {
        let mut header = self.header(Command::RequestPrepare);
        header.op = op;
        let peer = self.repair_peer(op, attempts);
        if peer != self.config.replica {
            self.send(
                Destination::Replica(peer),
                Message::new(header, Bytes::new()),
            );
        }
    }

    /// Whether `op` is a committed op whose record was found corrupt.
    pub(super) fn scrub_awaits(&self, op: u64) -> bool {
        self.scrub.corrupt_ops.contains(&op)
    }

    /// A peer's copy of a committed op whose record was found corrupt: kept if it is the op
    /// the chain says was committed.
    pub(super) fn repair_scrubbed(&mut self, now_ns: u64, entry: Entry) {
        assert!(self.scrub_awaits(entry.op) && entry.op <= self.commit);
        let expected = if entry.op == self.commit {
            Some(self.commit_checksum)
        } else {
            match self.entries.get(&(entry.op + 1)) {
                Some(next) => Some(next.parent),
                None => match self.journal.read(&mut self.storage, entry.op + 1) {
                    Ok(Ok(next)) => Some(next.parent),
                    _ => None,
                },
            }
        };
        if expected == Some(entry.checksum) {
            self.journal.append(&entry);
            self.scrub.corrupt_ops.remove(&entry.op);
            let (replica_id, op) = (self.config.replica, entry.op);
            let latency_ns = now_ns.saturating_sub(self.scrub.last_repair_sent_ns);
            probe::repair_done(|| (replica_id, op, latency_ns, RepairStatus::Success as u8));
        }
    }
}
