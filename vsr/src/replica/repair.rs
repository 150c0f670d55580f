//! Repair through the hash chain: entries above `commit` are trusted only once they chain to the
//! head, so an entry fetched from any peer (or read back from a local journal) is verified
//! against the next trusted one, and missing or corrupt ops are requested from peers.

use std::collections::BTreeMap;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, RejectReason, RepairStatus};

use super::{Destination, Replica, Status};
use crate::journal::ReadError;
use crate::message::{Entry, Header, Message, decode_entries};
use crate::storage::Storage;

#[derive(Debug)]
pub(super) struct Repair {
    pub(super) requested_ns: u64,
    pub(super) last_sent_ns: u64,
    pub(super) attempts: u64,
}

#[derive(Debug, Default)]
pub(super) struct RepairState {
    /// Ops requested from peers and not yet verified.
    pub(super) pending: BTreeMap<u64, Repair>,
}

impl<S: Storage> Replica<S> {
    /// Keeps an entry that some peer sent for an op we lack, to be verified by the chain.
    pub(super) fn accept_repair(&mut self, entry: Entry) {
        if entry.op > self.commit && entry.op <= self.op && !self.entries.contains_key(&entry.op) {
            self.candidates.insert(entry.op, entry);
        }
    }

    /// Verifies candidates downwards from the trusted part of the chain and requests what is
    /// still missing. When the chain becomes whole, acknowledges the uncommitted ops.
    pub(super) fn walk_chain(&mut self, now_ns: u64) {
        self.chain_low = self.chain_low.max(self.commit);
        let had_gap = self.chain_low > self.commit;
        while self.chain_low > self.commit {
            let op = self.chain_low;
            let expected = if op == self.op {
                self.head_checksum
            } else {
                self.entries[&(op + 1)].parent
            };
            if self
                .entries
                .get(&op)
                .is_some_and(|entry| entry.checksum == expected)
            {
                self.chain_low -= 1;
                continue;
            }
            self.entries.remove(&op);
            match self.candidates.remove(&op) {
                Some(candidate) if candidate.checksum == expected => {
                    self.repaired(now_ns, op, RepairStatus::Success);
                    self.journal.append(&candidate);
                    self.entries.insert(op, candidate);
                    // A primary that lacked an op it is collecting votes for holds it now.
                    if let Some(votes) = self.pipeline.votes.get_mut(&op) {
                        votes.replicas |= 1 << self.config.replica;
                    }
                    self.chain_low -= 1;
                }
                Some(_) => {
                    // Stale (an old view's entry) or from a faulty peer: ask again.
                    self.repaired(now_ns, op, RepairStatus::Failure);
                    break;
                }
                None => break,
            }
        }
        self.candidates.retain(|op, _| *op > self.commit);
        if self.chain_low > self.commit {
            if self.status == Status::Normal {
                let low = self
                    .chain_low
                    .saturating_sub(self.config.repair_window)
                    .max(self.commit);
                for op in (low + 1..=self.chain_low).rev() {
                    if !self.candidates.contains_key(&op) {
                        self.request_repair(now_ns, op, None);
                    }
                }
            }
        } else if had_gap {
            self.acknowledge_uncommitted();
        }
    }

    /// Sends PrepareOk for every op the primary may still be waiting for.
    pub(super) fn acknowledge_uncommitted(&mut self) {
        self.send_prepare_oks(self.commit_max + 1, self.op);
    }

    /// Ends a repair that was requested (a stale local entry that never was is not reported).
    pub(super) fn repaired(&mut self, now_ns: u64, op: u64, status: RepairStatus) {
        let Some(repair) = self.repair.pending.get(&op) else {
            return;
        };
        let (replica_id, latency_ns) = (
            self.config.replica,
            now_ns.saturating_sub(repair.requested_ns),
        );
        probe::repair_done(|| (replica_id, op, latency_ns, status as u8));
        if status == RepairStatus::Success {
            self.repair.pending.remove(&op);
        }
    }

    pub(super) fn request_repair(&mut self, now_ns: u64, op: u64, to: Option<u8>) {
        if self.repair.pending.contains_key(&op) {
            return;
        }
        let replica_id = self.config.replica;
        probe::repair_request(|| (replica_id, op));
        self.repair.pending.insert(
            op,
            Repair {
                requested_ns: now_ns,
                last_sent_ns: now_ns,
                attempts: 0,
            },
        );
        self.send_repair(op, to);
    }

    pub(super) fn send_repair(&mut self, op: u64, to: Option<u8>) {
        let attempts = self
            .repair
            .pending
            .get(&op)
            .map_or(0, |repair| repair.attempts);
        let target = to.unwrap_or_else(|| self.repair_peer(op, attempts));
        let mut header = self.header(Command::RequestPrepare);
        header.op = op;
        self.send(
            Destination::Replica(target),
            Message::new(header, Bytes::new()),
        );
    }

    /// The peer asked for `op` on its `attempts`-th retry: each retry of an op asks the next
    /// peer, whatever else is being repaired (one shared rotation can send every retry of an op
    /// to the one peer that lacks it).
    pub(super) fn repair_peer(&self, op: u64, attempts: u64) -> u8 {
        let peers = u64::from(self.config.replica_count) - 1;
        if peers == 0 {
            return self.config.replica;
        }
        // The (op + attempts)-th replica other than this one.
        let index = ((op + attempts) % peers) as u8;
        if index < self.config.replica {
            index
        } else {
            index + 1
        }
    }

    pub(super) fn on_repair_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        let commit = self.commit;
        let replica_id = self.config.replica;
        self.repair.pending.retain(|op, _| {
            let keep = *op > commit;
            if !keep {
                let op = *op;
                probe::repair_done(|| (replica_id, op, 0, RepairStatus::Success as u8));
            }
            keep
        });
        let due: Vec<u64> = self
            .repair
            .pending
            .iter()
            .filter(|(_, repair)| {
                now_ns.saturating_sub(repair.last_sent_ns) > self.config.retry_interval_ns
            })
            .map(|(op, _)| *op)
            .collect();
        for op in due {
            let repair = self.repair.pending.get_mut(&op).unwrap();
            repair.last_sent_ns = now_ns;
            repair.attempts += 1;
            self.send_repair(op, None);
        }
    }

    pub(super) fn on_request_prepare(&mut self, now_ns: u64, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::RequestPrepare);
        if self.status == Status::Recovering {
            return;
        }
        let entry = if header.op <= self.commit {
            match self.journal.read(&mut self.storage, header.op) {
                Ok(Ok(entry)) => entry,
                Ok(Err(ReadError::Missing)) => {
                    return self.offer_checkpoint(now_ns, header.replica, header.op);
                }
                Ok(Err(ReadError::Corrupt)) => return self.found_corrupt_op(now_ns, header.op),
                Err(_) => return,
            }
        } else if header.op <= self.chain_low {
            return;
        } else {
            match self.entries.get(&header.op) {
                Some(entry) => entry.clone(),
                None => return,
            }
        };
        let prepare = self.prepare_message(&entry);
        self.send(Destination::Replica(header.replica), prepare);
    }

    /// Makes `(head_op, head_checksum)` the head of our log. `suffix` holds verified entries
    /// ending at the head (possibly none); our own entries above `commit` become candidates,
    /// kept only where they chain, and whatever is still missing is repaired.
    pub(super) fn install_head(
        &mut self,
        now_ns: u64,
        head_op: u64,
        head_checksum: u64,
        suffix: Vec<Entry>,
    ) {
        assert!(head_op >= self.commit, "a new head never undoes a commit");
        let previous = std::mem::take(&mut self.entries);
        for (op, entry) in previous {
            self.candidates.entry(op).or_insert(entry);
        }
        if self.journal.op_max() > head_op {
            self.journal.truncate(head_op.max(1));
        }
        // Durable with the superblock that may claim this log's view: a restart resumes from
        // this head, not from whatever older records above the commit the journal holds.
        if head_op > self.commit {
            self.journal.pin_head(head_op, head_checksum);
        }
        self.candidates.retain(|op, _| *op <= head_op);
        self.op = head_op;
        self.head_checksum = head_checksum;
        self.chain_low = head_op;
        for entry in suffix.into_iter().rev() {
            if entry.op <= self.commit || entry.op != self.chain_low {
                break;
            }
            let expected = if entry.op == head_op {
                head_checksum
            } else {
                self.entries[&(entry.op + 1)].parent
            };
            if entry.checksum != expected {
                break;
            }
            self.candidates.remove(&entry.op);
            if let Some(repair) = self.repair.pending.remove(&entry.op) {
                let (replica_id, op) = (self.config.replica, entry.op);
                let latency_ns = now_ns.saturating_sub(repair.requested_ns);
                probe::repair_done(|| (replica_id, op, latency_ns, RepairStatus::Success as u8));
            }
            self.journal.append(&entry);
            self.entries.insert(entry.op, entry);
            self.chain_low -= 1;
        }
        self.chain_low = self.chain_low.max(self.commit);
    }
}

/// Decodes a shipped log suffix and checks that it is one chain ending at the stated head.
pub(super) fn decode_suffix(
    body: &Bytes,
    head_op: u64,
    head_checksum: u64,
) -> Result<Vec<Entry>, RejectReason> {
    let entries = decode_entries(body)?;
    let chained = entries
        .windows(2)
        .all(|pair| pair[1].op == pair[0].op + 1 && pair[1].parent == pair[0].checksum);
    let ends_at_head = entries
        .last()
        .is_none_or(|last| last.op == head_op && last.checksum == head_checksum);
    if chained && ends_at_head {
        Ok(entries)
    } else {
        Err(RejectReason::InvalidFields)
    }
}
