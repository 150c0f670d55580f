//! Opening a data directory, and the paper's recovery protocol: a replica that restarted
//! replays its durable committed prefix, then asks the cluster for the current view and log
//! (Recovery, answered by RecoveryResponse) and does not vote until a quorum has answered.

use std::collections::{BTreeMap, HashMap};
use std::io;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, Component, RejectReason, ReplicaSnapshot, SNAPSHOT_VERSION};

use super::normal::{Execution, Pipeline};
use super::repair::{RepairState, decode_suffix};
use super::view_change::ViewChangeState;
use super::{Config, Destination, OpenError, Replica, Status};
use crate::client_table::ClientTable;
use crate::journal::{Journal, JournalScan};
use crate::kv::KvStore;
use crate::message::{Entry, Header, Message, encode_entries};
use crate::prng::Prng;
use crate::storage::Storage;
use crate::superblock;

#[derive(Debug)]
pub(super) struct RecoveryResponse {
    pub(super) view: u64,
    pub(super) op: u64,
    pub(super) commit: u64,
    pub(super) head_checksum: u64,
    pub(super) entries: Vec<Entry>,
}

#[derive(Debug)]
pub(super) struct RecoveryState {
    /// Unique per attempt, so an answer to an earlier attempt is never taken for this one.
    pub(super) nonce: u64,
    pub(super) started_ns: u64,
    pub(super) last_sent_ns: u64,
    pub(super) responses: HashMap<u8, RecoveryResponse>,
}

impl<S: Storage> Replica<S> {
    /// Formats a new replica's storage: view 0, an empty log. `recovering` formats a
    /// replacement for a replica that lost its data: it does not vote until the cluster has
    /// told it the current view and log, since the replica it replaces may have promised
    /// (PrepareOk, DoViewChange) what this one no longer holds.
    pub fn format(config: &Config, storage: &mut S, recovering: bool) -> Result<(), OpenError> {
        config.validate_format(recovering)?;
        superblock::format(
            storage,
            config.cluster,
            config.replica,
            config.replica_count,
            recovering,
        )?;
        Ok(())
    }

    /// Opens a formatted replica and resumes from its durable state: it replays its committed
    /// prefix, then takes part at once in its durable view, whatever the rest of the cluster is
    /// doing (every replica restarting together included). Only a replica that cannot vouch
    /// for its view and log (a replacement, a journal whose head it cannot read, a damaged
    /// superblock copy) recovers first.
    pub fn open(config: Config, mut storage: S, now_ns: u64) -> Result<Replica<S>, OpenError> {
        config.validate()?;
        let opened = superblock::open(
            &mut storage,
            config.cluster,
            config.replica,
            config.replica_count,
        )?;
        let (journal, scan) = Journal::open(&mut storage, opened.state.journal_start)?;
        let replica_id = config.replica;
        for _ in 0..opened.corrupt_copies {
            probe::checksum_failure(|| (replica_id, Component::Superblock as u8, 0));
        }
        for op in &scan.corrupt_ops {
            probe::checksum_failure(|| (replica_id, Component::Log as u8, *op));
        }
        for _ in 0..scan.corrupt_headers {
            probe::checksum_failure(|| (replica_id, Component::Log as u8, 0));
        }

        let state = opened.state;
        let quorum_size = config.quorum() as u8;
        let view_change = ViewChangeState::new(now_ns, config.view_change_timeout_ns);
        let prng = Prng::new(config.nonce_entropy ^ (u64::from(replica_id) << 56));
        let mut replica = Replica {
            client_table: ClientTable::new(config.client_sessions_max),
            snapshot: ReplicaSnapshot {
                version: SNAPSHOT_VERSION,
                replica_id,
                cluster_size: config.replica_count,
                quorum_size,
                ..ReplicaSnapshot::default()
            },
            next_snapshot_ns: now_ns,
            config,
            storage,
            journal,
            superblock: state,
            superblock_dirty: false,
            superblock_damaged: opened.corrupt_copies > 0,
            status: Status::Normal,
            view: state.view,
            log_view: state.log_view,
            op: 0,
            head_checksum: 0,
            commit: 0,
            commit_checksum: 0,
            commit_max: state.commit,
            entries: BTreeMap::new(),
            candidates: BTreeMap::new(),
            chain_low: 0,
            kv: KvStore::default(),
            pending_checkpoint: None,
            executed: None,
            pipeline: Pipeline::new(quorum_size),
            last_sent_to_backups_ns: now_ns,
            last_heard_primary_ns: now_ns,
            view_change,
            prng,
            recovery: RecoveryState {
                nonce: 0,
                started_ns: now_ns,
                last_sent_ns: now_ns,
                responses: HashMap::new(),
            },
            repair: RepairState::default(),
            state_transfer: Default::default(),
            scrub: Default::default(),
            journaled_at_open: BTreeMap::new(),
            reply_latencies_ns: Vec::new(),
            outbox: Vec::new(),
        };
        // A damaged superblock copy may have been the newest, acted on before the crash: the
        // copy that won may be of an older view, so this replica cannot vouch for its view.
        let checkpoint_loaded = replica.load_checkpoint()?;
        if !checkpoint_loaded {
            replica.superblock.checkpoint = Default::default();
        }
        // Without its checkpoint, a journal that no longer starts at op 1 cannot rebuild the
        // state: the replica starts empty and fetches a checkpoint from its peers.
        let journal_whole = replica.journal.op_min() <= 1;
        if !checkpoint_loaded && !journal_whole && replica.config.replica_count == 1 {
            return Err(OpenError::StateLost);
        }
        let journal_vouches = replica.replay_journal(&scan)?;
        replica.remember_journaled_ops();
        let state_certain =
            journal_vouches && opened.corrupt_copies == 0 && (checkpoint_loaded || journal_whole);
        // Committed ops that a checkpoint covers were not replayed, so nothing repaired them:
        // peers may still ask for them, so they are fetched again (counted above, once).
        let covered: Vec<u64> = scan
            .corrupt_ops
            .iter()
            .copied()
            .filter(|op| *op >= replica.journal.op_min() && *op <= replica.commit)
            .collect();
        for op in covered {
            replica.schedule_scrub_repair(op);
        }
        replica.resume(now_ns, state_certain);
        Ok(replica)
    }

    /// Executes the durable committed ops after the checkpoint, each op only once its successor's parent (or,
    /// for op `commit`, the superblock) confirms it, so an older record of an op whose newest
    /// record was lost is never executed as committed. Everything above becomes candidates for
    /// the chain. Returns whether the journal vouches for its head: only then may this replica
    /// vote before it has heard from the cluster.
    fn replay_journal(&mut self, scan: &JournalScan) -> io::Result<bool> {
        let durable_commit = self.superblock.commit;
        // What the checkpoint covers may be gone from the journal.
        let op_max = self.journal.op_max().max(self.commit);
        let mut unconfirmed: Option<Entry> = None;
        let mut op = self.commit + 1;
        while op <= durable_commit.min(op_max) {
            let Ok(entry) = self.journal.read(&mut self.storage, op)? else {
                break;
            };
            let tip = unconfirmed
                .as_ref()
                .map_or(self.commit_checksum, |previous| previous.checksum);
            if entry.parent != tip {
                break;
            }
            if let Some(previous) = unconfirmed.replace(entry) {
                self.execute(&previous, 0, Execution::Replay);
            }
            op += 1;
        }
        if let Some(last) = unconfirmed {
            if last.op == durable_commit && last.checksum == self.superblock.commit_checksum {
                self.execute(&last, 0, Execution::Replay);
            } else {
                self.candidates.insert(last.op, last);
            }
        }
        for op in self.commit + 1..=op_max {
            if let Ok(entry) = self.journal.read(&mut self.storage, op)? {
                self.candidates.entry(op).or_insert(entry);
            }
        }
        self.op = self.commit;
        self.head_checksum = self.commit_checksum;
        self.chain_low = self.commit;
        let head_certain = scan.corrupt_headers == 0 && op_max >= durable_commit;
        if self.config.replica_count == 1 {
            // No peer holds a copy: the log is the longest chain the journal still holds.
            while let Some(next) = self.candidates.remove(&(self.op + 1)) {
                if next.parent != self.head_checksum {
                    break;
                }
                self.op = next.op;
                self.head_checksum = next.checksum;
                self.entries.insert(next.op, next);
            }
            self.candidates.clear();
            if op_max > self.op {
                self.journal.truncate(self.op.max(1));
            }
            self.chain_low = self.commit;
            return Ok(true);
        }
        let pinned = self
            .journal
            .pinned_head()
            .filter(|(op, _)| *op > self.commit);
        if let Some((head_op, head_checksum)) = pinned {
            // A head adopted from another replica: what the journal holds below it is
            // verified against it, and older records of another log are repaired over.
            self.op = head_op;
            self.head_checksum = head_checksum;
            self.chain_low = head_op;
        } else if op_max > self.commit {
            // The newest record is the head; if it cannot be read, its checksum is unknown.
            let Some(head) = self.candidates.remove(&op_max) else {
                return Ok(false);
            };
            self.op = op_max;
            self.head_checksum = head.checksum;
            self.entries.insert(op_max, head);
            self.chain_low = op_max - 1;
        }
        Ok(head_certain)
    }

    /// Notes the entries the journal holds above the executed prefix: the process before may
    /// have executed, and tracers counted, any of them (the superblock's commit trails
    /// execution by up to a snapshot interval).
    fn remember_journaled_ops(&mut self) {
        let above_commit = self.entries.values().chain(self.candidates.values());
        self.journaled_at_open = above_commit
            .map(|entry| (entry.op, entry.checksum))
            .collect();
    }

    /// Takes part again in the durable view: as its primary (re-collecting votes for the ops it
    /// holds), as a backup, or in the view change it was in.
    fn resume(&mut self, now_ns: u64, state_certain: bool) {
        if self.superblock.recovering || (!state_certain && self.config.replica_count > 1) {
            return self.start_recovery(now_ns);
        }
        if self.config.replica_count == 1 || self.log_view == self.view {
            self.log_view = self.view;
            self.status = Status::Normal;
            self.last_heard_primary_ns = now_ns;
            self.walk_chain(now_ns);
            if self.is_primary() {
                self.adopt_pipeline(now_ns);
                self.commit_primary(now_ns);
            }
        } else {
            self.status = Status::ViewChange;
            self.view_change = ViewChangeState::new(now_ns, self.config.view_change_timeout_ns);
            self.view_change.start_view_change_votes = 1 << self.config.replica;
            self.walk_chain(now_ns);
            self.send_start_view_change(now_ns);
        }
    }

    pub(super) fn start_recovery(&mut self, now_ns: u64) {
        self.status = Status::Recovering;
        // Until it completes, a restart recovers again, whatever the journal then looks like.
        self.superblock_dirty = true;
        self.recovery.started_ns = now_ns;
        // Unique per attempt; only needs to differ from earlier attempts of this replica, also
        // those of an earlier process that crashed while recovering.
        self.recovery.nonce = self.config.nonce_entropy
            ^ now_ns
            ^ (self.superblock.sequence << 32)
            ^ u64::from(self.config.replica);
        let (replica_id, nonce, commit) = (self.config.replica, self.recovery.nonce, self.commit);
        probe::recovery_start(|| (replica_id, nonce, commit));
        self.send_recovery(now_ns);
    }

    pub(super) fn send_recovery(&mut self, now_ns: u64) {
        self.recovery.last_sent_ns = now_ns;
        let mut header = self.header(Command::Recovery);
        header.request_number = self.recovery.nonce;
        header.commit = self.commit;
        self.broadcast(Message::new(header, Bytes::new()));
    }

    pub(super) fn on_recovery(&mut self, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::Recovery);
        if self.status != Status::Normal {
            return;
        }
        let mut response = self.header(Command::RecoveryResponse);
        response.request_number = header.request_number;
        let body = if self.is_primary() {
            response.op = self.op;
            response.commit = self.commit_max.max(self.commit);
            response.context = self.head_checksum;
            response.aux = 1;
            // Newest first, down to what the recovering replica has or the first op this
            // replica cannot read: the suffix must end at the head and have no holes.
            let from = header
                .commit
                .max(self.op.saturating_sub(self.config.suffix_max));
            let mut newest_first = Vec::new();
            for op in (from + 1..=self.op).rev() {
                let entry = if op <= self.commit {
                    match self.journal.read(&mut self.storage, op) {
                        Ok(Ok(entry)) => entry,
                        _ => break,
                    }
                } else if let Some(entry) = self.entries.get(&op) {
                    entry.clone()
                } else {
                    break;
                };
                newest_first.push(entry);
            }
            let suffix = self.fit_suffix(newest_first.iter());
            encode_entries(&suffix)
        } else {
            Bytes::new()
        };
        self.send(
            Destination::Replica(header.replica),
            Message::new(response, body),
        );
    }

    pub(super) fn on_recovery_response(
        &mut self,
        now_ns: u64,
        message: &Message,
    ) -> Result<(), RejectReason> {
        self.assert_invariants();
        assert_eq!(message.header.command, Command::RecoveryResponse);
        let header = message.header;
        if self.status != Status::Recovering || header.request_number != self.recovery.nonce {
            return Ok(());
        }
        let from_primary = header.aux == 1;
        if from_primary && self.config.primary_of(header.view) != header.replica {
            return Err(RejectReason::InvalidFields);
        }
        let entries = if from_primary {
            decode_suffix(&message.body, header.op, header.context)?
        } else {
            Vec::new()
        };
        self.recovery.responses.insert(
            header.replica,
            RecoveryResponse {
                view: header.view,
                op: header.op,
                commit: header.commit,
                head_checksum: header.context,
                entries,
            },
        );
        // f + 1 answers, one of them from the primary of the highest view among them.
        if self.recovery.responses.len() < self.config.quorum() {
            return Ok(());
        }
        let view = self
            .recovery
            .responses
            .values()
            .map(|response| response.view)
            .max()
            .unwrap();
        let primary = self.config.primary_of(view);
        let Some(primary_response) = self
            .recovery
            .responses
            .remove(&primary)
            .filter(|r| r.view == view)
        else {
            return Ok(());
        };
        self.recovery.responses.clear();
        self.view = view;
        self.view_change.started_ns = now_ns;
        let RecoveryResponse {
            op,
            commit,
            head_checksum,
            entries,
            ..
        } = primary_response;
        if op < self.commit {
            // The primary's log is shorter than our durable commit: impossible unless it lost
            // committed state. Try again later rather than adopt it.
            return Ok(());
        }
        if op != self.op || head_checksum != self.head_checksum {
            self.install_head(now_ns, op, head_checksum, entries);
        }
        self.commit_max = self.commit_max.max(commit);
        self.status = Status::Normal;
        self.view_change.reset_for_normal();
        self.log_view = view;
        self.last_heard_primary_ns = now_ns;
        self.superblock_dirty = true;
        let (replica_id, latency_ns) = (self.config.replica, now_ns - self.recovery.started_ns);
        probe::recovery_done(|| (replica_id, view, op, latency_ns));
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
        self.acknowledge_uncommitted();
        Ok(())
    }
}
