//! Normal operation: the primary queues client requests, prepares them in batches and commits
//! each op once a quorum holds it durably; backups append prepares in order, acknowledge them,
//! and execute what the primary reports committed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, RejectReason};

use super::{Destination, Replica, Status};
use crate::client_table::Lookup;
use crate::kv::OperationResult;
use crate::message::{
    BatchedRequest, Entry, Header, LIST_PREFIX_SIZE, Message, REGISTER_REQUEST_NUMBER, ReplyStatus,
    decode_batch, encode_batch,
};
use crate::storage::Storage;

/// Why an op is executed: committed now, or rebuilt from the journal at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Execution {
    Commit,
    Replay,
}

#[derive(Debug)]
pub(super) struct PendingReply {
    pub(super) request_number: u64,
    pub(super) connection: u64,
    pub(super) arrival_ns: u64,
}

/// PrepareOk votes for one op the primary has prepared.
#[derive(Debug)]
pub(super) struct Votes {
    /// A bit per replica, own included.
    pub(super) replicas: u8,
    pub(super) prepared_ns: u64,
    pub(super) last_sent_ns: u64,
    pub(super) quorum_ns: Option<u64>,
}

/// The primary's side of normal operation: requests waiting to be prepared, and prepared ops
/// waiting for their quorum. Dropped whenever the replica leaves the view.
#[derive(Debug)]
pub(super) struct Pipeline {
    pub(super) request_queue: VecDeque<BatchedRequest>,
    pub(super) queued_bytes: usize,
    /// Requests queued or prepared but not executed: client id to request number.
    pub(super) in_flight: HashMap<u64, u64>,
    pub(super) pending_replies: HashMap<u64, PendingReply>,
    pub(super) votes: BTreeMap<u64, Votes>,
    /// PrepareOk votes (own included) of the newest op this primary committed.
    pub(super) committed_op_votes: u8,
}

impl Pipeline {
    pub(super) fn new(quorum: u8) -> Pipeline {
        Pipeline {
            request_queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: HashMap::new(),
            pending_replies: HashMap::new(),
            votes: BTreeMap::new(),
            committed_op_votes: quorum,
        }
    }

    pub(super) fn clear(&mut self, quorum: u8) {
        *self = Pipeline::new(quorum);
    }
}

impl<S: Storage> Replica<S> {
    pub(super) fn on_request(&mut self, now_ns: u64, connection: u64, message: Message) {
        self.assert_invariants();
        assert_eq!(message.header.command, Command::Request);
        let header = message.header;
        let replica_id = self.config.replica;
        // Any replica can tell, whatever its status: the client learns at once that retrying
        // elsewhere cannot help.
        if message.body.len() > self.config.request_bytes_max {
            return self.send_reply(connection, &header, 0, ReplyStatus::TooLarge, Bytes::new());
        }
        if self.status != Status::Normal {
            return;
        }
        if !self.is_primary() {
            return self.send_reply(
                connection,
                &header,
                0,
                ReplyStatus::NotPrimary,
                Bytes::new(),
            );
        }
        let (client_id, request_number) = (header.client_id, header.request_number);
        match self.client_table.lookup(client_id, request_number) {
            Lookup::Executed(session) => {
                let (op, reply) = (session.op, session.reply.clone());
                probe::duplicate_request(|| (replica_id, client_id, request_number));
                return self.send_reply(connection, &header, op, ReplyStatus::Ok, reply);
            }
            Lookup::Stale => return,
            Lookup::Evicted => {
                return self.send_reply(
                    connection,
                    &header,
                    0,
                    ReplyStatus::SessionEvicted,
                    Bytes::new(),
                );
            }
            Lookup::New => {}
        }
        if let Some(&in_flight) = self.pipeline.in_flight.get(&client_id)
            && in_flight >= request_number
        {
            probe::duplicate_request(|| (replica_id, client_id, request_number));
            if in_flight == request_number {
                // The retry came on a new connection: reply there when it commits.
                if let Some(pending) = self.pipeline.pending_replies.get_mut(&client_id) {
                    pending.connection = connection;
                }
            }
            return;
        }
        if self.pipeline.request_queue.len() >= self.config.request_queue_max {
            return;
        }
        let bytes = message.body.len() as u32;
        probe::client_request(|| (replica_id, client_id, request_number, bytes));
        self.pipeline.in_flight.insert(client_id, request_number);
        self.pipeline.pending_replies.insert(
            client_id,
            PendingReply {
                request_number,
                connection,
                arrival_ns: now_ns,
            },
        );
        self.pipeline.queued_bytes += message.body.len();
        self.pipeline.request_queue.push_back(BatchedRequest {
            client_id,
            request_number,
            operation: message.body,
        });
    }

    pub(super) fn prepare_queued(&mut self, now_ns: u64) {
        while !self.pipeline.request_queue.is_empty()
            && self.op - self.commit < self.config.pipeline_max
        {
            let mut batch = Vec::new();
            let mut batch_bytes = LIST_PREFIX_SIZE;
            while let Some(queued) = self.pipeline.request_queue.front() {
                let size = BatchedRequest::encoded_size(queued.operation.len());
                if batch_bytes + size > self.config.batch_bytes_max {
                    // Never on the first request: `request_bytes_max` keeps one within a batch.
                    assert!(
                        !batch.is_empty(),
                        "a request larger than a batch was queued"
                    );
                    break;
                }
                batch_bytes += size;
                self.pipeline.queued_bytes -= queued.operation.len();
                batch.push(self.pipeline.request_queue.pop_front().unwrap());
            }
            let entry = Entry::new(
                self.op + 1,
                self.view,
                self.head_checksum,
                encode_batch(&batch),
            );
            assert!(entry.body.len() <= self.config.batch_bytes_max);
            let (replica_id, view, op, requests, bytes) = (
                self.config.replica,
                self.view,
                entry.op,
                batch.len() as u32,
                entry.body.len() as u32,
            );
            probe::prepare_send(|| (replica_id, view, op, requests, bytes));
            self.append(entry.clone());
            self.pipeline.votes.insert(
                entry.op,
                Votes {
                    replicas: 1 << self.config.replica,
                    prepared_ns: now_ns,
                    last_sent_ns: now_ns,
                    quorum_ns: None,
                },
            );
            let prepare = self.prepare_message(&entry);
            self.broadcast(prepare);
            self.last_sent_to_backups_ns = now_ns;
        }
        // A single-replica cluster is its own quorum.
        self.commit_primary(now_ns);
    }

    /// A primary that starts or resumes leading a view waits for a quorum again for every op it
    /// holds above the commit, counting its own vote, and treats their requests as in flight.
    pub(super) fn adopt_pipeline(&mut self, now_ns: u64) {
        assert!(self.is_primary());
        let uncommitted: Vec<u64> = ((self.commit_max + 1)..=self.op).collect();
        for op in uncommitted {
            let has_entry = self.entries.contains_key(&op);
            self.pipeline.votes.insert(
                op,
                Votes {
                    replicas: if has_entry {
                        1 << self.config.replica
                    } else {
                        0
                    },
                    prepared_ns: now_ns,
                    last_sent_ns: now_ns,
                    quorum_ns: None,
                },
            );
            if let Some(requests) = self
                .entries
                .get(&op)
                .and_then(|entry| decode_batch(&entry.body).ok())
            {
                for request in requests {
                    self.pipeline
                        .in_flight
                        .insert(request.client_id, request.request_number);
                }
            }
        }
    }

    pub(super) fn prepare_message(&self, entry: &Entry) -> Message {
        let mut header = self.header(Command::Prepare);
        header.op = entry.op;
        header.commit = self.commit_max.max(self.commit);
        header.context = entry.checksum;
        header.parent = entry.parent;
        header.aux = entry.view;
        Message::new(header, entry.body.clone())
    }

    /// Appends a verified entry at the head of the chain and journals it.
    pub(super) fn append(&mut self, entry: Entry) {
        assert_eq!(entry.op, self.op + 1);
        assert_eq!(
            entry.parent, self.head_checksum,
            "hash chain broken at op {}",
            entry.op
        );
        self.journal.append(&entry);
        self.op = entry.op;
        self.head_checksum = entry.checksum;
        self.entries.insert(entry.op, entry);
    }

    pub(super) fn on_prepare(
        &mut self,
        now_ns: u64,
        from: u8,
        message: Message,
    ) -> Result<(), RejectReason> {
        self.assert_invariants();
        assert_eq!(message.header.command, Command::Prepare);
        let header = message.header;
        let entry = Entry {
            op: header.op,
            view: header.aux,
            parent: header.parent,
            checksum: header.context,
            body: message.body,
        };
        if !entry.checksum_valid() {
            return Err(RejectReason::EntryChecksum);
        }
        if entry.op <= self.commit && self.scrub_awaits(entry.op) {
            self.repair_scrubbed(now_ns, entry);
            return Ok(());
        }
        let from_primary =
            from == self.config.primary_of(header.view) && from != self.config.replica;
        if header.view > self.view && from_primary && self.status != Status::Recovering {
            self.request_start_view(header.view, from);
            return Ok(());
        }
        if self.status != Status::Normal {
            return Ok(());
        }
        if header.view == self.view && from_primary {
            // A retransmission of an op held here is no sign of a primary that can commit.
            if entry.op > self.op {
                self.last_heard_primary_ns = now_ns;
            }
            self.commit_max = self.commit_max.max(header.commit);
            if entry.op == self.op + 1 && entry.parent == self.head_checksum {
                let op = entry.op;
                self.append(entry);
                self.send_prepare_oks(op, op);
            } else if entry.op > self.op {
                self.install_head(now_ns, entry.op, entry.checksum, vec![entry]);
            } else if let Some(existing) = self.entries.get(&entry.op) {
                // A retransmission: our PrepareOk was probably lost.
                if existing.checksum == entry.checksum && self.chain_low <= self.commit {
                    self.send_prepare_oks(entry.op, entry.op);
                }
            } else if entry.op <= self.commit {
                // Executed here already (we learned the commit before this primary did).
                let executed = self.journal.read(&mut self.storage, entry.op);
                if matches!(executed, Ok(Ok(ref ours)) if ours.checksum == entry.checksum) {
                    self.send_prepare_ok(entry.op, entry.checksum);
                }
            } else {
                self.accept_repair(entry);
            }
        } else {
            self.accept_repair(entry);
        }
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
        Ok(())
    }

    /// A backup acknowledges `(from..=to)` if it holds every op up to them.
    pub(super) fn send_prepare_oks(&mut self, from: u64, to: u64) {
        if self.is_primary() || self.chain_low > self.commit || self.status != Status::Normal {
            return;
        }
        for op in from.max(self.commit + 1)..=to {
            let Some(checksum) = self.entries.get(&op).map(|entry| entry.checksum) else {
                continue;
            };
            self.send_prepare_ok(op, checksum);
        }
    }

    pub(super) fn send_prepare_ok(&mut self, op: u64, checksum: u64) {
        let mut header = self.header(Command::PrepareOk);
        header.op = op;
        header.context = checksum;
        let primary = self.config.primary_of(self.view);
        self.send(
            Destination::Replica(primary),
            Message::new(header, Bytes::new()),
        );
    }

    pub(super) fn on_prepare_ok(&mut self, now_ns: u64, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::PrepareOk);
        if header.view != self.view || !self.is_primary() {
            return;
        }
        let Some(entry) = self.entries.get(&header.op) else {
            return;
        };
        if entry.checksum != header.context {
            return;
        }
        let Some(votes) = self.pipeline.votes.get_mut(&header.op) else {
            return;
        };
        votes.replicas |= 1 << header.replica;
        let count = votes.replicas.count_ones();
        if count as usize >= self.config.quorum() && votes.quorum_ns.is_none() {
            votes.quorum_ns = Some(now_ns);
            let (replica_id, op, latency_ns) =
                (self.config.replica, header.op, now_ns - votes.prepared_ns);
            probe::prepare_quorum(|| (replica_id, op, latency_ns, count as u8));
        }
        self.commit_primary(now_ns);
    }

    /// Commits in op order every op that has its quorum (or was committed in an earlier view).
    pub(super) fn commit_primary(&mut self, now_ns: u64) {
        while self.commit < self.op {
            let op = self.commit + 1;
            let quorum_ns = match self.pipeline.votes.get(&op) {
                _ if op <= self.commit_max => None,
                Some(votes) => match votes.quorum_ns {
                    Some(quorum_ns) => Some(quorum_ns),
                    None if votes.replicas.count_ones() as usize >= self.config.quorum() => {
                        Some(now_ns)
                    }
                    None => break,
                },
                None => break,
            };
            let Some(entry) = self.entries.remove(&op) else {
                break;
            };
            self.execute(&entry, now_ns, Execution::Commit);
            // An op committed in an earlier view had a quorum then; its voters are not known here.
            self.pipeline.committed_op_votes = self
                .pipeline
                .votes
                .remove(&op)
                .map_or(self.config.quorum() as u8, |votes| {
                    votes.replicas.count_ones() as u8
                });
            self.commit_max = self.commit_max.max(op);
            if let Some(quorum_ns) = quorum_ns {
                let (replica_id, latency_ns) = (self.config.replica, now_ns - quorum_ns);
                probe::commit(|| (replica_id, op, latency_ns));
            }
        }
        self.chain_low = self.chain_low.max(self.commit);
    }

    pub(super) fn on_commit(&mut self, now_ns: u64, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::Commit);
        let from_primary = header.replica == self.config.primary_of(header.view);
        if header.view > self.view && from_primary && self.status != Status::Recovering {
            return self.request_start_view(header.view, header.replica);
        }
        if header.view != self.view || !from_primary || self.status != Status::Normal {
            return;
        }
        self.last_heard_primary_ns = now_ns;
        self.commit_max = self.commit_max.max(header.commit);
        if header.op > self.commit.saturating_add(self.config.op_ahead_max) {
            // So far behind that the head's Prepare would be refused: ask for the next op to
            // execute, which a peer that compacted it answers with its checkpoint.
            self.request_repair(now_ns, self.commit + 1, Some(header.replica));
        } else if header.op > self.op {
            // We missed prepares: fetch the primary's head, then repair down the chain.
            self.request_repair(now_ns, header.op, Some(header.replica));
        }
        self.commit_backup(now_ns);
    }

    pub(super) fn commit_backup(&mut self, now_ns: u64) {
        if self.is_primary() {
            return self.commit_primary(now_ns);
        }
        while self.commit < self.commit_max.min(self.op) {
            let Some(entry) = self.entries.remove(&(self.commit + 1)) else {
                break;
            };
            self.execute(&entry, now_ns, Execution::Commit);
        }
        self.chain_low = self.chain_low.max(self.commit);
    }

    /// Executes a committed op: every request against the state machine and client table, and
    /// on the primary, a reply to every client still connected. A replayed op (the durable
    /// prefix rebuilt at open), or any op the journal held at open, may have been executed and
    /// counted by an earlier process: it fires no execution or eviction probe, so tracers count
    /// each commit once across restarts.
    pub(super) fn execute(&mut self, entry: &Entry, now_ns: u64, execution: Execution) {
        assert_eq!(entry.op, self.commit + 1, "ops execute in order, once");
        assert_eq!(
            entry.parent, self.commit_checksum,
            "ops execute along the chain"
        );
        // An op the previous process journaled may have executed there; the same op number
        // with another entry (of a later view) never did.
        let journaled_before = self.journaled_at_open.remove(&entry.op) == Some(entry.checksum);
        let traced = execution == Execution::Commit && !journaled_before;
        let replica_id = self.config.replica;
        // Only a forged Prepare can carry a body that passes its checksum and does not decode
        // (a primary encodes every batch). Every replica executes the same bytes, so each one
        // reads it as no requests: the replicas stay identical, and a committed forgery cannot
        // stop a replica at every restart.
        let requests = decode_batch(&entry.body).unwrap_or_default();
        let is_primary = self.is_primary();
        let (mut operations_ok, mut operations_failed) = (0u32, 0u32);
        self.reply_latencies_ns.clear();
        for request in &requests {
            let (client_id, request_number) = (request.client_id, request.request_number);
            let (status, reply) = match self.client_table.lookup(client_id, request_number) {
                // Registration changes nothing but the table, so running it again after the
                // session was evicted is harmless; every later request is at most once.
                Lookup::New if request_number == REGISTER_REQUEST_NUMBER => {
                    self.record_session(client_id, request_number, entry.op, Bytes::new(), traced);
                    (ReplyStatus::Ok, Bytes::new())
                }
                Lookup::New => {
                    let result = self.kv.execute(&request.operation);
                    if result == OperationResult::Invalid {
                        operations_failed += 1;
                    } else {
                        operations_ok += 1;
                    }
                    let reply = result.encode();
                    self.record_session(client_id, request_number, entry.op, reply.clone(), traced);
                    (ReplyStatus::Ok, reply)
                }
                Lookup::Evicted => (ReplyStatus::SessionEvicted, Bytes::new()),
                Lookup::Executed(_) | Lookup::Stale => continue,
            };
            if self.pipeline.in_flight.get(&client_id) == Some(&request_number) {
                self.pipeline.in_flight.remove(&client_id);
            }
            if !is_primary {
                continue;
            }
            let Some(pending) = self.pipeline.pending_replies.remove(&client_id) else {
                continue;
            };
            if pending.request_number != request_number {
                self.pipeline.pending_replies.insert(client_id, pending);
                continue;
            }
            let latency_ns = now_ns.saturating_sub(pending.arrival_ns);
            self.reply_latencies_ns.push(latency_ns);
            let mut header = self.header(Command::Reply);
            header.client_id = client_id;
            header.request_number = request_number;
            self.send_reply(pending.connection, &header, entry.op, status, reply);
            let op = entry.op;
            probe::client_reply(|| (replica_id, client_id, request_number, op, latency_ns));
        }
        self.commit = entry.op;
        self.commit_checksum = entry.checksum;
        if let Some(executed) = &mut self.executed {
            executed.push(entry.clone());
        }
        let op = entry.op;
        if op.is_multiple_of(self.config.checkpoint_interval_ops)
            && op > self.superblock.checkpoint.op
        {
            self.capture_checkpoint();
        }
        if traced {
            probe::commit_execute(|| (replica_id, op, operations_ok, operations_failed));
        }
        if !self.reply_latencies_ns.is_empty() {
            let (count, address) = (
                self.reply_latencies_ns.len() as u32,
                self.reply_latencies_ns.as_ptr() as u64,
            );
            probe::client_reply_batch(|| (replica_id, op, count, address));
        }
    }

    pub(super) fn record_session(
        &mut self,
        client_id: u64,
        request_number: u64,
        op: u64,
        reply: Bytes,
        traced: bool,
    ) {
        let evicted = self
            .client_table
            .record(client_id, request_number, op, reply);
        if let Some(evicted) = evicted.filter(|_| traced) {
            let (replica_id, sessions) = (self.config.replica, self.client_table.len() as u32);
            probe::session_evict(|| (replica_id, evicted, sessions));
        }
    }

    pub(super) fn send_reply(
        &mut self,
        connection: u64,
        request: &Header,
        op: u64,
        status: ReplyStatus,
        body: Bytes,
    ) {
        let mut header = self.header(Command::Reply);
        header.client_id = request.client_id;
        header.request_number = request.request_number;
        header.op = op;
        header.aux = status as u64;
        self.send(Destination::Client(connection), Message::new(header, body));
    }

    /// The oldest prepare has waited a view-change timeout for its quorum: the backups are
    /// gone or cannot reach this primary. It stops heartbeating and preparing new ops, so the
    /// backups that still hear it time out and change the view instead of being held in a
    /// view that cannot commit; it keeps retransmitting what lacks votes (a retransmission
    /// does not count as hearing the primary at a backup that holds the op), so a backup
    /// that only missed the op can still complete the quorum.
    pub(super) fn primary_abdicating(&self, now_ns: u64) -> bool {
        self.pipeline.votes.values().next().is_some_and(|votes| {
            votes.quorum_ns.is_none()
                && now_ns.saturating_sub(votes.prepared_ns) > self.config.view_change_timeout_ns
        })
    }

    pub(super) fn on_primary_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        let backups_missing: Vec<(u64, u8)> = self
            .pipeline
            .votes
            .iter()
            .filter(|(_, votes)| {
                now_ns.saturating_sub(votes.last_sent_ns) > self.config.retry_interval_ns
            })
            .map(|(op, votes)| (*op, votes.replicas))
            .collect();
        for (op, voted) in backups_missing {
            let Some(entry) = self.entries.get(&op) else {
                continue;
            };
            let prepare = self.prepare_message(entry);
            for replica in self.other_replicas() {
                if voted & (1 << replica) == 0 {
                    self.send(Destination::Replica(replica), prepare.clone());
                }
            }
            self.pipeline.votes.get_mut(&op).unwrap().last_sent_ns = now_ns;
        }
        let heartbeat_due = now_ns.saturating_sub(self.last_sent_to_backups_ns)
            >= self.config.heartbeat_interval_ns;
        if heartbeat_due && !self.primary_abdicating(now_ns) {
            let mut header = self.header(Command::Commit);
            header.commit = self.commit;
            header.op = self.op;
            self.broadcast(Message::new(header, Bytes::new()));
            self.last_sent_to_backups_ns = now_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use vsr_probes::Command;

    use super::super::{Config, Replica, Source};
    use crate::message::{Entry, Header, Message};
    use crate::simulator::MemoryStorage;

    #[test]
    fn a_committed_entry_whose_batch_does_not_decode_executes_as_no_requests() {
        let config = Config::new(1, 1, 3);
        let mut storage = MemoryStorage::default();
        Replica::format(&config, &mut storage, false).unwrap();
        let mut backup = Replica::open(config.clone(), storage, 0).unwrap();
        // A forged Prepare "from the primary": a valid entry checksum over a body that is no batch.
        let entry = Entry::new(1, 0, 0, Bytes::from_static(&[0xff; 9]));
        let mut header = Header::new(Command::Prepare, 1, 0);
        header.op = entry.op;
        header.commit = entry.op;
        header.context = entry.checksum;
        header.parent = entry.parent;
        backup.on_message(1, Source::Replica(0), Message::new(header, entry.body));
        backup.flush(1).unwrap();
        assert_eq!(backup.commit(), 1, "executed, as every replica would");
        // The next snapshot tick makes the commit durable, so a restart replays the op.
        backup.on_tick(2);
        backup.flush(2).unwrap();
        // And again when the journal is replayed at the next start.
        let reopened = Replica::open(config, backup.into_storage(), 0).unwrap();
        assert_eq!(reopened.commit(), 1);
    }

    #[test]
    fn a_head_beyond_the_op_window_is_refused_without_growing_the_journal_index() {
        let mut config = Config::new(1, 1, 3);
        config.op_ahead_max = 1000;
        let mut storage = MemoryStorage::default();
        Replica::format(&config, &mut storage, false).unwrap();
        let mut backup = Replica::open(config, storage, 0).unwrap();
        let far = Entry::new(1001, 0, 7, Bytes::from_static(b"\0\0\0\0"));
        let mut prepare = Header::new(Command::Prepare, 1, 0);
        prepare.op = far.op;
        prepare.context = far.checksum;
        prepare.parent = far.parent;
        backup.on_message(
            1,
            Source::Replica(0),
            Message::new(prepare, far.body.clone()),
        );
        let mut start_view = Header::new(Command::StartView, 1, 2);
        start_view.view = 2;
        start_view.op = far.op;
        start_view.context = far.checksum;
        let body = crate::message::encode_entries(&[&far]);
        backup.on_message(2, Source::Replica(2), Message::new(start_view, body));
        backup.flush(2).unwrap();
        assert_eq!(
            (backup.op(), backup.view()),
            (0, 0),
            "{}",
            backup.describe()
        );
        assert_eq!(backup.journal.op_max(), 0, "no index for ops never held");
        // Within the window, the same head is taken (and repaired down the chain).
        let near = Entry::new(1000, 0, 7, Bytes::from_static(b"\0\0\0\0"));
        prepare.op = near.op;
        prepare.context = near.checksum;
        backup.on_message(
            3,
            Source::Replica(0),
            Message::new(prepare, near.body.clone()),
        );
        assert_eq!(backup.op(), 1000, "{}", backup.describe());
    }

    #[test]
    fn a_backup_too_far_behind_for_the_head_asks_for_its_next_op() {
        let mut config = Config::new(1, 1, 3);
        config.op_ahead_max = 1000;
        let mut storage = MemoryStorage::default();
        Replica::format(&config, &mut storage, false).unwrap();
        let mut backup = Replica::open(config, storage, 0).unwrap();
        let mut commit = Header::new(Command::Commit, 1, 0);
        commit.op = 5000;
        commit.commit = 5000;
        backup.on_message(1, Source::Replica(0), Message::new(commit, Bytes::new()));
        let asked: Vec<u64> = backup
            .flush(1)
            .unwrap()
            .iter()
            .filter_map(|outgoing| Message::decode(&outgoing.frame, 1).ok())
            .filter(|message| message.header.command == Command::RequestPrepare)
            .map(|message| message.header.op)
            .collect();
        // The head's Prepare would be refused as out of the window; op 1 is answered by a
        // peer's journal or, once compacted, its checkpoint.
        assert_eq!(asked, vec![1]);
    }
}
