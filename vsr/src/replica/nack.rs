//! Cutting back a view change's head past ops that no live replica can complete. A backup that
//! missed prepares 5–6 but got 7 reports head 7; if the old primary, the only holder of 5–6, is
//! gone for good, a new primary that adopts head 7 asks for 5–6 forever. So each DoViewChange
//! says, per op of the newest part of its sender's log, whether the sender holds it, never
//! acknowledged it (a nack), or may have acknowledged it but lacks it (corrupt), and the new
//! primary cuts the head back below the lowest op that a nack quorum never acknowledged.
//!
//! Safe because a committed op was acknowledged by a replication quorum, and a nack quorum is
//! large enough to include one of those replicas: so many nacks prove an op uncommitted, and
//! every op above it too (ops commit in order). A replica nacks only what it can vouch for:
//! an op above its head, or an op it lacks above `nack_floor` (see `ViewChangeState`).

use std::collections::HashMap;

use super::view_change::DoViewChange;
use super::{Replica, Status};
use crate::message::{OP_HEADERS_MAX, OpHeader, OpStatus};

/// `OpHeader::view` when the sender holds no entry for the op that it could vouch for.
const VIEW_NONE: u64 = u64::MAX;

/// The checksum of `op` in the suffix of verified entries `dvc` shipped.
fn shipped_checksum(dvc: &DoViewChange, op: u64) -> Option<u64> {
    dvc.entries.iter().find_map(|entry| {
        if entry.op == op {
            Some(entry.checksum)
        } else {
            (entry.op == op + 1).then_some(entry.parent)
        }
    })
}
use crate::storage::Storage;

impl DoViewChange {
    /// What the sender said about `op`, if it is in its header list.
    fn header(&self, op: u64) -> Option<&OpHeader> {
        let low = self.op + 1 - self.headers.len() as u64;
        (op >= low && op <= self.op).then(|| &self.headers[(op - low) as usize])
    }

    /// Whether the sender never acknowledged `op`. Ops below its header list are not nacked:
    /// nothing said is nothing proven.
    pub(super) fn nacks(&self, op: u64) -> bool {
        op > self.op
            || self
                .header(op)
                .is_some_and(|header| header.status == OpStatus::Nack)
    }

    /// The checksum of `op` in the log of view `log_view`, if this sender's report proves it:
    /// an op it executed (committed, so in every later log), its verified chain if its own
    /// log is of that view, or an entry it holds that was prepared in that view (only that
    /// view's primary prepares entries of that view, one per op, all in its log).
    fn checksum_in_log_of(&self, log_view: u64, op: u64) -> Option<u64> {
        if self.log_view == log_view && op == self.op {
            return Some(self.head_checksum);
        }
        let header = self.header(op)?;
        let proven = header.committed
            || (header.chained && self.log_view == log_view)
            || (header.status == OpStatus::Present && header.view == log_view);
        (proven && header.checksum != 0).then_some(header.checksum)
    }
}

impl<S: Storage> Replica<S> {
    /// Replicas that must never have acknowledged an op to prove it uncommitted: with fewer,
    /// the others could still form a replication quorum.
    fn nack_quorum(&self) -> usize {
        self.config.replica_count as usize - self.config.quorum() + 1
    }

    /// The head the new primary starts its view with: `best`'s, or, if a nack quorum among
    /// `do_view_changes` proves some op above `commit_floor` uncommitted, the highest op below
    /// it whose checksum `best` knows (everything cut lies above the proven op).
    pub(super) fn head_after_nacks(
        &self,
        best: &DoViewChange,
        do_view_changes: &HashMap<u8, DoViewChange>,
        commit_floor: u64,
    ) -> (u64, u64) {
        assert!(do_view_changes.len() >= self.config.quorum());
        if commit_floor >= best.op {
            return (best.op, best.head_checksum);
        }
        let low = commit_floor.max(best.op.saturating_sub(OP_HEADERS_MAX as u64)) + 1;
        let proven = (low..=best.op).find(|op| {
            do_view_changes
                .values()
                .filter(|dvc| dvc.nacks(*op))
                .count()
                >= self.nack_quorum()
        });
        let Some(proven) = proven else {
            return (best.op, best.head_checksum);
        };
        // Everything above `proven` is uncommitted too: cut as close to it as a checksum of
        // the chosen log is known.
        (proven - 1..=best.op)
            .find_map(|op| {
                do_view_changes
                    .values()
                    .find_map(|dvc| dvc.checksum_in_log_of(best.log_view, op))
                    .or_else(|| shipped_checksum(best, op))
                    .map(|checksum| (op, checksum))
            })
            .expect("the head's checksum is known")
    }

    /// What this replica says about the newest ops of its log, oldest first, ending at its head.
    pub(super) fn op_headers(&self) -> Vec<OpHeader> {
        let low = self
            .commit
            .max(self.op.saturating_sub(OP_HEADERS_MAX as u64 - 1))
            .max(1);
        (low..=self.op).map(|op| self.op_header(op)).collect()
    }

    fn op_header(&self, op: u64) -> OpHeader {
        assert!(op >= self.commit && op <= self.op);
        let chained = self.chain_checksum(op);
        let held = self.entries.get(&op).or_else(|| self.candidates.get(&op));
        let status = if op == self.commit || held.is_some() {
            OpStatus::Present
        } else if op <= self.view_change.nack_floor {
            OpStatus::Corrupt
        } else {
            OpStatus::Nack
        };
        // A held entry that does not chain is a stale one: its view proves nothing.
        let view = held
            .filter(|entry| chained.is_none_or(|checksum| checksum == entry.checksum))
            .map_or(VIEW_NONE, |entry| entry.view);
        let checksum = match (chained, held) {
            (Some(checksum), _) => checksum,
            (None, Some(entry)) => entry.checksum,
            (None, None) => 0,
        };
        OpHeader {
            checksum,
            view,
            status,
            chained: chained.is_some(),
            committed: op == self.commit,
        }
    }

    /// The checksum of `op` in this replica's verified chain, if it knows it.
    fn chain_checksum(&self, op: u64) -> Option<u64> {
        if op == self.op {
            Some(self.head_checksum)
        } else if op == self.commit {
            Some(self.commit_checksum)
        } else if let Some(entry) = self.entries.get(&op) {
            Some(entry.checksum)
        } else {
            self.entries.get(&(op + 1)).map(|entry| entry.parent)
        }
    }

    /// Called once the journal is durable: a replica that holds every op up to its head has
    /// acknowledged nothing it lacks, so from now on it nacks what it lacks above that head.
    pub(super) fn advance_nack_floor(&mut self) {
        if self.status != Status::Recovering && self.chain_low == self.commit {
            self.view_change.nack_floor = self.op;
        }
    }
}
