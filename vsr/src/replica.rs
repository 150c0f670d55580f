//! The replica: Viewstamped Replication (Liskov & Cowling, "VR Revisited") as a deterministic
//! state machine. Every input is an `on_<message>` or `on_<timeout>` call with the current time;
//! every output is a frame in `outbox`, released by `flush` only after the journal and the
//! superblock are durable, so a PrepareOk or a vote never leaves before what it promises is on
//! disk. Time, network and storage are injected: the simulator and the TCP runtime drive the
//! same code.
//!
//! Beyond the paper, entries form a hash chain (`parent` is the previous entry's checksum), so a
//! replica that lacks entries fetches them from any peer and verifies each one against the next
//! trusted entry: this one mechanism serves lagging backups, view changes that ship only a
//! suffix, recovery, and corrupt journal records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{
    Command, Component, PEER_CLIENT, RejectReason, RepairStatus, ReplicaSnapshot, ReplicaStatus,
    SNAPSHOT_VERSION, ViewChangeReason,
};

use crate::client_table::{ClientTable, Lookup};
use crate::journal::{Journal, ReadError};
use crate::kv::{KvStore, OperationResult};
use crate::message::{
    BatchedRequest, Entry, Header, Message, REGISTER_REQUEST_NUMBER, ReplyStatus, SENDER_CLIENT,
    decode_batch, decode_entries, encode_batch, encode_entries,
};
use crate::storage::Storage;
use crate::superblock::{self, SuperblockError, SuperblockState};

pub const REPLICAS_MAX: u8 = 8;

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: u64,
    pub replica: u8,
    pub replica_count: u8,
    /// The primary sends a Commit heartbeat when it has sent nothing else for this long.
    pub heartbeat_interval_ns: u64,
    /// A backup suspects the primary after this much silence; a view change that has not
    /// finished after this long moves on to the next view.
    pub view_change_timeout_ns: u64,
    /// Resend a Prepare, a Recovery or a repair request not answered within this time.
    pub retry_interval_ns: u64,
    /// How often the `state_snapshot` probe fires and the superblock's commit is persisted.
    pub snapshot_interval_ns: u64,
    /// Uncommitted ops the primary keeps in flight.
    pub pipeline_max: u64,
    /// Largest batch of client requests in one op.
    pub batch_bytes_max: usize,
    pub request_queue_max: usize,
    pub client_sessions_max: usize,
    /// Missing entries requested at once while repairing.
    pub repair_window: u64,
    /// Entries shipped at most in one DoViewChange, StartView or RecoveryResponse; anything
    /// older is repaired through the hash chain.
    pub suffix_max: u64,
    /// Different in every process that opens this replica (the runtime takes it from the wall
    /// clock and pid): recovery nonces must not repeat across restarts, and `now_ns` starts
    /// at 0 in every process.
    pub nonce_entropy: u64,
}

impl Config {
    pub fn new(cluster: u64, replica: u8, replica_count: u8) -> Config {
        Config {
            cluster,
            replica,
            replica_count,
            heartbeat_interval_ns: 50_000_000,
            view_change_timeout_ns: 500_000_000,
            retry_interval_ns: 100_000_000,
            snapshot_interval_ns: 500_000_000,
            pipeline_max: 16,
            batch_bytes_max: 256 * 1024,
            request_queue_max: 64 * 1024,
            client_sessions_max: 16 * 1024,
            repair_window: 64,
            suffix_max: 64,
            nonce_entropy: 0,
        }
    }

    pub fn quorum(&self) -> usize {
        self.replica_count as usize / 2 + 1
    }

    fn primary_of(&self, view: u64) -> u8 {
        (view % u64::from(self.replica_count)) as u8
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Superblock(#[from] SuperblockError),
    #[error("journal: {0}")]
    Journal(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Replica(u8),
    /// A client connection, as numbered by the transport.
    Client(u64),
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Replica(u8),
    Client(u64),
}

impl Source {
    fn peer_code(self) -> u8 {
        match self {
            Source::Replica(replica) => replica,
            Source::Client(_) => PEER_CLIENT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub destination: Destination,
    pub frame: Bytes,
}

#[derive(Debug)]
struct QueuedRequest {
    request: BatchedRequest,
}

#[derive(Debug)]
struct PendingReply {
    request_number: u64,
    connection: u64,
    arrival_ns: u64,
}

#[derive(Debug)]
struct Votes {
    replicas: u8,
    prepared_ns: u64,
    last_sent_ns: u64,
    quorum_ns: Option<u64>,
}

#[derive(Debug)]
struct DoViewChange {
    log_view: u64,
    op: u64,
    commit: u64,
    head_checksum: u64,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct RecoveryResponse {
    view: u64,
    op: u64,
    commit: u64,
    head_checksum: u64,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Repair {
    requested_ns: u64,
    last_sent_ns: u64,
    attempts: u64,
}

#[derive(Debug)]
pub struct Replica<S: Storage> {
    config: Config,
    storage: S,
    journal: Journal,
    superblock: SuperblockState,
    superblock_dirty: bool,

    status: ReplicaStatus,
    view: u64,
    /// The last view in which this replica was in normal status.
    log_view: u64,
    /// Highest op in the log (the head of the hash chain).
    op: u64,
    head_checksum: u64,
    /// Highest op executed here; every op up to it is committed.
    commit: u64,
    /// Highest op this replica knows to be committed anywhere in the cluster.
    commit_max: u64,
    /// Verified entries above `commit`: they chain to the head.
    entries: BTreeMap<u64, Entry>,
    /// Entries above `commit` not (yet) verified against the chain: from the local journal
    /// after a restart, or from repair responses that arrived out of order.
    candidates: BTreeMap<u64, Entry>,
    /// `entries` holds every op in `(chain_low, op]`.
    chain_low: u64,

    kv: KvStore,
    client_table: ClientTable,

    // Primary.
    request_queue: VecDeque<QueuedRequest>,
    queued_bytes: usize,
    /// Requests queued or prepared but not executed: client id to request number.
    in_flight: HashMap<u64, u64>,
    pending_replies: HashMap<u64, PendingReply>,
    votes: BTreeMap<u64, Votes>,
    /// PrepareOk votes (own included) of the newest op this primary committed.
    committed_op_votes: u8,
    last_sent_to_backups_ns: u64,

    // Backup.
    last_heard_primary_ns: u64,

    // View change.
    view_change_started_ns: u64,
    start_view_change_votes: u8,
    do_view_change_sent: bool,
    do_view_changes: HashMap<u8, DoViewChange>,
    last_view_change_send_ns: u64,

    // Recovery.
    recovery_nonce: u64,
    recovery_started_ns: u64,
    recovery_last_sent_ns: u64,
    recovery_responses: HashMap<u8, RecoveryResponse>,

    repairs: BTreeMap<u64, Repair>,
    repair_peer_next: u8,

    snapshot: ReplicaSnapshot,
    next_snapshot_ns: u64,
    reply_latencies_ns: Vec<u64>,
    outbox: Vec<Outgoing>,
}

impl<S: Storage> Replica<S> {
    /// Opens the replica's storage. A new data directory starts in normal status in view 0; a
    /// restarted replica replays its journal up to its durable commit, then recovers.
    pub fn open(config: Config, mut storage: S, now_ns: u64) -> Result<Replica<S>, OpenError> {
        if config.replica_count == 0 || config.replica_count > REPLICAS_MAX {
            return Err(OpenError::Config(format!(
                "replica count {} is not in 1..={REPLICAS_MAX}",
                config.replica_count
            )));
        }
        if config.replica >= config.replica_count {
            return Err(OpenError::Config(format!(
                "replica index {} is not below the replica count {}",
                config.replica, config.replica_count
            )));
        }
        let opened = superblock::open(
            &mut storage,
            config.cluster,
            config.replica,
            config.replica_count,
        )?;
        let (journal, scan) = Journal::open(&mut storage)?;
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
            status: ReplicaStatus::Normal,
            view: state.view,
            log_view: state.log_view,
            op: 0,
            head_checksum: 0,
            commit: 0,
            commit_max: state.commit,
            entries: BTreeMap::new(),
            candidates: BTreeMap::new(),
            chain_low: 0,
            kv: KvStore::default(),
            request_queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: HashMap::new(),
            pending_replies: HashMap::new(),
            votes: BTreeMap::new(),
            committed_op_votes: quorum_size,
            last_sent_to_backups_ns: now_ns,
            last_heard_primary_ns: now_ns,
            view_change_started_ns: now_ns,
            start_view_change_votes: 0,
            do_view_change_sent: false,
            do_view_changes: HashMap::new(),
            last_view_change_send_ns: now_ns,
            recovery_nonce: 0,
            recovery_started_ns: now_ns,
            recovery_last_sent_ns: now_ns,
            recovery_responses: HashMap::new(),
            repairs: BTreeMap::new(),
            repair_peer_next: 0,
            reply_latencies_ns: Vec::new(),
            outbox: Vec::new(),
        };
        replica.replay_journal(state.commit)?;
        if !opened.formatted {
            replica.start_recovery(now_ns);
        }
        Ok(replica)
    }

    /// Executes the durable committed prefix and loads everything above it as candidates.
    fn replay_journal(&mut self, durable_commit: u64) -> io::Result<()> {
        let mut trusted = true;
        for op in 1..=self.journal.op_max() {
            let entry = match self.journal.read(&mut self.storage, op)? {
                Ok(entry) => entry,
                Err(ReadError::Missing | ReadError::Corrupt) => {
                    trusted = false;
                    continue;
                }
            };
            if op <= durable_commit && trusted && entry.parent == self.head_checksum {
                self.head_checksum = entry.checksum;
                self.op = op;
                self.commit_max = self.commit_max.max(op);
                self.execute(&entry, 0);
            } else if op <= durable_commit {
                // Committed and intact, so it is the committed entry: it anchors the chain for
                // the corrupt ones below it.
                self.entries.insert(op, entry);
            } else {
                self.candidates.insert(op, entry);
            }
        }
        if let Some((&top, entry)) = self.entries.last_key_value() {
            self.op = top;
            self.head_checksum = entry.checksum;
            self.chain_low = top - 1;
        } else {
            self.chain_low = self.op;
        }
        self.walk_chain(0);
        Ok(())
    }

    pub fn replica_id(&self) -> u8 {
        self.config.replica
    }

    pub fn status(&self) -> ReplicaStatus {
        self.status
    }

    pub fn view(&self) -> u64 {
        self.view
    }

    pub fn op(&self) -> u64 {
        self.op
    }

    pub fn commit(&self) -> u64 {
        self.commit
    }

    pub fn is_primary(&self) -> bool {
        self.status == ReplicaStatus::Normal
            && self.config.primary_of(self.view) == self.config.replica
    }

    /// Protocol state in one line, for simulator failures and logs.
    pub fn describe(&self) -> String {
        format!(
            "{:?} view {} log_view {} op {} commit {} commit_max {} chain_low {} entries {:?}..{:?} candidates {} repairs {:?}",
            self.status,
            self.view,
            self.log_view,
            self.op,
            self.commit,
            self.commit_max,
            self.chain_low,
            self.entries.keys().next(),
            self.entries.keys().next_back(),
            self.candidates.len(),
            self.repairs.keys().take(4).collect::<Vec<_>>(),
        )
    }

    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Reads an executed op back from the journal, for checks that committed prefixes match.
    pub fn committed_entry(&mut self, op: u64) -> Option<Entry> {
        assert!(op <= self.commit);
        self.journal.read(&mut self.storage, op).ok()?.ok()
    }

    // ---------------------------------------------------------------- inputs

    /// A frame the transport could not accept as a message.
    pub fn on_rejected(&mut self, reason: RejectReason, source: Source) {
        let replica_id = self.config.replica;
        probe::byzantine_rejection(|| (replica_id, reason as u8, source.peer_code()));
    }

    pub fn on_message(&mut self, now_ns: u64, source: Source, message: Message) {
        if let Err(reason) = message.validate(self.config.replica_count) {
            return self.on_rejected(reason, source);
        }
        let sender_valid = match source {
            Source::Client(_) => message.header.replica == SENDER_CLIENT,
            Source::Replica(replica) => message.header.replica == replica,
        };
        if !sender_valid {
            return self.on_rejected(RejectReason::UnknownReplica, source);
        }
        let command = message.header.command;
        let bytes = message.header.size;
        self.snapshot.count_received(command, bytes as usize);
        let replica_id = self.config.replica;
        probe::message_recv(|| (replica_id, command as u8, bytes, source.peer_code()));
        let header = message.header;
        let result = match (command, source) {
            (Command::Request, Source::Client(connection)) => {
                self.on_request(now_ns, connection, message);
                Ok(())
            }
            (_, Source::Client(_)) => Err(RejectReason::UnknownReplica),
            (Command::Prepare, Source::Replica(from)) => self.on_prepare(now_ns, from, message),
            (Command::PrepareOk, _) => {
                self.on_prepare_ok(now_ns, &header);
                Ok(())
            }
            (Command::Commit, _) => {
                self.on_commit(now_ns, &header);
                Ok(())
            }
            (Command::StartViewChange, _) => {
                self.on_start_view_change(now_ns, &header);
                Ok(())
            }
            (Command::DoViewChange, _) => self.on_do_view_change(now_ns, &message),
            (Command::StartView, _) => self.on_start_view(now_ns, &message),
            (Command::Recovery, _) => {
                self.on_recovery(&header);
                Ok(())
            }
            (Command::RecoveryResponse, _) => self.on_recovery_response(now_ns, &message),
            (Command::RequestPrepare, _) => {
                self.on_request_prepare(&header);
                Ok(())
            }
            (Command::RequestStartView, _) => {
                self.on_request_start_view(&header);
                Ok(())
            }
            (Command::Request | Command::Reply, _) => Err(RejectReason::InvalidFields),
        };
        if let Err(reason) = result {
            self.on_rejected(reason, source);
        }
    }

    /// The transport lost an established connection to a replica.
    pub fn on_peer_disconnected(&mut self, now_ns: u64, replica: u8) {
        let primary = self.config.primary_of(self.view);
        if self.status == ReplicaStatus::Normal && replica == primary && !self.is_primary() {
            self.start_view_change(now_ns, self.view + 1, ViewChangeReason::PrimaryDisconnected);
        }
    }

    /// An operator asked this replica to abandon the current view.
    pub fn on_operator_view_change(&mut self, now_ns: u64) {
        if self.status != ReplicaStatus::Recovering {
            self.start_view_change(now_ns, self.view + 1, ViewChangeReason::OperatorRequest);
        }
    }

    pub fn on_tick(&mut self, now_ns: u64) {
        match self.status {
            ReplicaStatus::Normal if self.is_primary() => self.on_primary_tick(now_ns),
            ReplicaStatus::Normal => {
                if now_ns.saturating_sub(self.last_heard_primary_ns)
                    > self.config.view_change_timeout_ns
                {
                    self.start_view_change(now_ns, self.view + 1, ViewChangeReason::PrimaryTimeout);
                }
            }
            ReplicaStatus::ViewChange => self.on_view_change_tick(now_ns),
            ReplicaStatus::Recovering => {
                if now_ns.saturating_sub(self.recovery_last_sent_ns) > self.config.retry_interval_ns
                {
                    self.send_recovery(now_ns);
                }
            }
            ReplicaStatus::StateTransfer => {
                unreachable!("state transfer is not a status this replica enters")
            }
        }
        self.on_repair_tick(now_ns);
        if now_ns >= self.next_snapshot_ns {
            self.next_snapshot_ns = now_ns + self.config.snapshot_interval_ns;
            if self.commit > self.superblock.commit && self.status == ReplicaStatus::Normal {
                self.superblock_dirty = true;
            }
            self.publish_snapshot(now_ns);
        }
    }

    /// Ends a batch of inputs: the primary prepares queued requests, the journal and superblock
    /// become durable (the group commit), and only then are the outputs released.
    pub fn flush(&mut self, now_ns: u64) -> io::Result<Vec<Outgoing>> {
        if self.is_primary() {
            self.prepare_queued(now_ns);
        }
        if self.journal.has_pending() {
            let started = std::time::Instant::now();
            let stats = self.journal.flush(&mut self.storage)?;
            let replica_id = self.config.replica;
            probe::journal_write(|| {
                (
                    replica_id,
                    stats.records,
                    stats.bytes,
                    started.elapsed().as_nanos() as u64,
                )
            });
        }
        if self.superblock_dirty {
            self.superblock_dirty = false;
            self.superblock.view = self.view;
            self.superblock.log_view = self.log_view;
            // Never claim a commit the journal cannot replay: executed ops are durable.
            self.superblock.commit = self.superblock.commit.max(self.commit);
            superblock::write(&mut self.storage, &mut self.superblock)?;
        }
        Ok(std::mem::take(&mut self.outbox))
    }

    // ---------------------------------------------------------------- normal operation

    fn on_request(&mut self, now_ns: u64, connection: u64, message: Message) {
        let header = message.header;
        let replica_id = self.config.replica;
        if self.status != ReplicaStatus::Normal {
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
        if let Some(&in_flight) = self.in_flight.get(&client_id)
            && in_flight >= request_number
        {
            probe::duplicate_request(|| (replica_id, client_id, request_number));
            if in_flight == request_number {
                // The retry came on a new connection: reply there when it commits.
                if let Some(pending) = self.pending_replies.get_mut(&client_id) {
                    pending.connection = connection;
                }
            }
            return;
        }
        if self.request_queue.len() >= self.config.request_queue_max {
            return;
        }
        let bytes = message.body.len() as u32;
        probe::client_request(|| (replica_id, client_id, request_number, bytes));
        self.in_flight.insert(client_id, request_number);
        self.pending_replies.insert(
            client_id,
            PendingReply {
                request_number,
                connection,
                arrival_ns: now_ns,
            },
        );
        self.queued_bytes += message.body.len();
        self.request_queue.push_back(QueuedRequest {
            request: BatchedRequest {
                client_id,
                request_number,
                operation: message.body,
            },
        });
    }

    fn prepare_queued(&mut self, now_ns: u64) {
        while !self.request_queue.is_empty() && self.op - self.commit < self.config.pipeline_max {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            while let Some(queued) = self.request_queue.front() {
                let size = queued.request.operation.len() + 20;
                if !batch.is_empty() && batch_bytes + size > self.config.batch_bytes_max {
                    break;
                }
                batch_bytes += size;
                self.queued_bytes -= queued.request.operation.len();
                batch.push(self.request_queue.pop_front().unwrap().request);
            }
            let entry = Entry::new(
                self.op + 1,
                self.view,
                self.head_checksum,
                encode_batch(&batch),
            );
            let (replica_id, view, op, requests, bytes) = (
                self.config.replica,
                self.view,
                entry.op,
                batch.len() as u32,
                entry.body.len() as u32,
            );
            probe::prepare_send(|| (replica_id, view, op, requests, bytes));
            self.append(entry.clone());
            self.votes.insert(
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

    fn prepare_message(&self, entry: &Entry) -> Message {
        let mut header = self.header(Command::Prepare);
        header.op = entry.op;
        header.commit = self.commit_max.max(self.commit);
        header.context = entry.checksum;
        header.parent = entry.parent;
        header.aux = entry.view;
        Message::new(header, entry.body.clone())
    }

    /// Appends a verified entry at the head of the chain and journals it.
    fn append(&mut self, entry: Entry) {
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

    fn on_prepare(&mut self, now_ns: u64, from: u8, message: Message) -> Result<(), RejectReason> {
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
        let from_primary =
            from == self.config.primary_of(header.view) && from != self.config.replica;
        if header.view > self.view && from_primary && self.status != ReplicaStatus::Recovering {
            self.request_start_view(header.view, from);
            return Ok(());
        }
        if self.status != ReplicaStatus::Normal {
            return Ok(());
        }
        if header.view == self.view && from_primary {
            self.last_heard_primary_ns = now_ns;
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
    fn send_prepare_oks(&mut self, from: u64, to: u64) {
        if self.is_primary() || self.chain_low > self.commit || self.status != ReplicaStatus::Normal
        {
            return;
        }
        for op in from.max(self.commit + 1)..=to {
            let Some(checksum) = self.entries.get(&op).map(|entry| entry.checksum) else {
                continue;
            };
            self.send_prepare_ok(op, checksum);
        }
    }

    fn send_prepare_ok(&mut self, op: u64, checksum: u64) {
        let mut header = self.header(Command::PrepareOk);
        header.op = op;
        header.context = checksum;
        let primary = self.config.primary_of(self.view);
        self.send(
            Destination::Replica(primary),
            Message::new(header, Bytes::new()),
        );
    }

    fn on_prepare_ok(&mut self, now_ns: u64, header: &Header) {
        if header.view != self.view || !self.is_primary() {
            return;
        }
        let Some(entry) = self.entries.get(&header.op) else {
            return;
        };
        if entry.checksum != header.context {
            return;
        }
        let Some(votes) = self.votes.get_mut(&header.op) else {
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
    fn commit_primary(&mut self, now_ns: u64) {
        while self.commit < self.op {
            let op = self.commit + 1;
            let quorum_ns = match self.votes.get(&op) {
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
            self.execute(&entry, now_ns);
            // An op committed in an earlier view had a quorum then; its voters are not known here.
            self.committed_op_votes = self
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

    fn on_commit(&mut self, now_ns: u64, header: &Header) {
        let from_primary = header.replica == self.config.primary_of(header.view);
        if header.view > self.view && from_primary && self.status != ReplicaStatus::Recovering {
            return self.request_start_view(header.view, header.replica);
        }
        if header.view != self.view || !from_primary || self.status != ReplicaStatus::Normal {
            return;
        }
        self.last_heard_primary_ns = now_ns;
        self.commit_max = self.commit_max.max(header.commit);
        if header.op > self.op {
            // We missed prepares: fetch the primary's head, then repair down the chain.
            self.request_repair(now_ns, header.op, Some(header.replica));
        }
        self.commit_backup(now_ns);
    }

    fn commit_backup(&mut self, now_ns: u64) {
        if self.is_primary() {
            return self.commit_primary(now_ns);
        }
        while self.commit < self.commit_max.min(self.op) {
            let Some(entry) = self.entries.remove(&(self.commit + 1)) else {
                break;
            };
            self.execute(&entry, now_ns);
        }
        self.chain_low = self.chain_low.max(self.commit);
    }

    /// Executes a committed op: every request against the state machine and client table, and
    /// on the primary, a reply to every client still connected.
    fn execute(&mut self, entry: &Entry, now_ns: u64) {
        assert_eq!(entry.op, self.commit + 1, "ops execute in order, once");
        let replica_id = self.config.replica;
        let requests = decode_batch(&entry.body).unwrap_or_else(|_| {
            panic!(
                "op {} passed its checksum but its batch does not decode",
                entry.op
            )
        });
        let is_primary = self.is_primary();
        let (mut operations_ok, mut operations_failed) = (0u32, 0u32);
        self.reply_latencies_ns.clear();
        for request in &requests {
            let (client_id, request_number) = (request.client_id, request.request_number);
            let (status, reply) = match self.client_table.lookup(client_id, request_number) {
                // Registration changes nothing but the table, so running it again after the
                // session was evicted is harmless; every later request is at most once.
                Lookup::New if request_number == REGISTER_REQUEST_NUMBER => {
                    self.record_session(client_id, request_number, entry.op, Bytes::new());
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
                    self.record_session(client_id, request_number, entry.op, reply.clone());
                    (ReplyStatus::Ok, reply)
                }
                Lookup::Evicted => (ReplyStatus::SessionEvicted, Bytes::new()),
                Lookup::Executed(_) | Lookup::Stale => continue,
            };
            if self.in_flight.get(&client_id) == Some(&request_number) {
                self.in_flight.remove(&client_id);
            }
            if !is_primary {
                continue;
            }
            let Some(pending) = self.pending_replies.remove(&client_id) else {
                continue;
            };
            if pending.request_number != request_number {
                self.pending_replies.insert(client_id, pending);
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
        let op = entry.op;
        probe::commit_execute(|| (replica_id, op, operations_ok, operations_failed));
        if !self.reply_latencies_ns.is_empty() {
            let (count, address) = (
                self.reply_latencies_ns.len() as u32,
                self.reply_latencies_ns.as_ptr() as u64,
            );
            probe::client_reply_batch(|| (replica_id, op, count, address));
        }
    }

    fn record_session(&mut self, client_id: u64, request_number: u64, op: u64, reply: Bytes) {
        if let Some(evicted) = self
            .client_table
            .record(client_id, request_number, op, reply)
        {
            let (replica_id, sessions) = (self.config.replica, self.client_table.len() as u32);
            probe::session_evict(|| (replica_id, evicted, sessions));
        }
    }

    fn send_reply(
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

    fn on_primary_tick(&mut self, now_ns: u64) {
        let backups_missing: Vec<(u64, u8)> = self
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
            self.votes.get_mut(&op).unwrap().last_sent_ns = now_ns;
            self.last_sent_to_backups_ns = now_ns;
        }
        if now_ns.saturating_sub(self.last_sent_to_backups_ns) >= self.config.heartbeat_interval_ns
        {
            let mut header = self.header(Command::Commit);
            header.commit = self.commit;
            header.op = self.op;
            self.broadcast(Message::new(header, Bytes::new()));
            self.last_sent_to_backups_ns = now_ns;
        }
    }

    // ---------------------------------------------------------------- repair

    /// Keeps an entry that some peer sent for an op we lack, to be verified by the chain.
    fn accept_repair(&mut self, entry: Entry) {
        if entry.op > self.commit && entry.op <= self.op && !self.entries.contains_key(&entry.op) {
            self.candidates.insert(entry.op, entry);
        }
    }

    /// Verifies candidates downwards from the trusted part of the chain and requests what is
    /// still missing. When the chain becomes whole, acknowledges the uncommitted ops.
    fn walk_chain(&mut self, now_ns: u64) {
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
            if self.status == ReplicaStatus::Normal {
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
    fn acknowledge_uncommitted(&mut self) {
        self.send_prepare_oks(self.commit_max + 1, self.op);
    }

    /// Ends a repair that was requested (a stale local entry that never was is not reported).
    fn repaired(&mut self, now_ns: u64, op: u64, status: RepairStatus) {
        let Some(repair) = self.repairs.get(&op) else {
            return;
        };
        let (replica_id, latency_ns) = (
            self.config.replica,
            now_ns.saturating_sub(repair.requested_ns),
        );
        probe::repair_done(|| (replica_id, op, latency_ns, status as u8));
        if status == RepairStatus::Success {
            self.repairs.remove(&op);
        }
    }

    fn request_repair(&mut self, now_ns: u64, op: u64, to: Option<u8>) {
        if self.repairs.contains_key(&op) {
            return;
        }
        let replica_id = self.config.replica;
        probe::repair_request(|| (replica_id, op));
        self.repairs.insert(
            op,
            Repair {
                requested_ns: now_ns,
                last_sent_ns: now_ns,
                attempts: 0,
            },
        );
        self.send_repair(op, to);
    }

    fn send_repair(&mut self, op: u64, to: Option<u8>) {
        let target = to.unwrap_or_else(|| self.next_repair_peer());
        let mut header = self.header(Command::RequestPrepare);
        header.op = op;
        self.send(
            Destination::Replica(target),
            Message::new(header, Bytes::new()),
        );
    }

    fn next_repair_peer(&mut self) -> u8 {
        let count = self.config.replica_count;
        loop {
            self.repair_peer_next = (self.repair_peer_next + 1) % count;
            if self.repair_peer_next != self.config.replica || count == 1 {
                return self.repair_peer_next;
            }
        }
    }

    fn on_repair_tick(&mut self, now_ns: u64) {
        let commit = self.commit;
        let replica_id = self.config.replica;
        self.repairs.retain(|op, _| {
            let keep = *op > commit;
            if !keep {
                let op = *op;
                probe::repair_done(|| (replica_id, op, 0, RepairStatus::Success as u8));
            }
            keep
        });
        let due: Vec<u64> = self
            .repairs
            .iter()
            .filter(|(_, repair)| {
                now_ns.saturating_sub(repair.last_sent_ns) > self.config.retry_interval_ns
            })
            .map(|(op, _)| *op)
            .collect();
        for op in due {
            let repair = self.repairs.get_mut(&op).unwrap();
            repair.last_sent_ns = now_ns;
            repair.attempts += 1;
            self.send_repair(op, None);
        }
    }

    fn on_request_prepare(&mut self, header: &Header) {
        if self.status == ReplicaStatus::Recovering {
            return;
        }
        let entry = if header.op <= self.commit {
            match self.journal.read(&mut self.storage, header.op) {
                Ok(Ok(entry)) => entry,
                _ => return,
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
    fn install_head(&mut self, now_ns: u64, head_op: u64, head_checksum: u64, suffix: Vec<Entry>) {
        assert!(head_op >= self.commit, "a new head never undoes a commit");
        let previous = std::mem::take(&mut self.entries);
        for (op, entry) in previous {
            self.candidates.entry(op).or_insert(entry);
        }
        if self.journal.op_max() > head_op {
            self.journal.truncate(head_op.max(1));
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
            if let Some(repair) = self.repairs.remove(&entry.op) {
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

    // ---------------------------------------------------------------- view change

    fn start_view_change(&mut self, now_ns: u64, view: u64, reason: ViewChangeReason) {
        assert!(view > self.view, "views only move forward");
        let (replica_id, view_old) = (self.config.replica, self.view);
        probe::view_change_start(|| (replica_id, view_old, view, reason as u8));
        if self.status == ReplicaStatus::Normal {
            self.log_view = self.view;
        }
        self.view = view;
        self.status = ReplicaStatus::ViewChange;
        self.view_change_started_ns = now_ns;
        self.start_view_change_votes = 1 << self.config.replica;
        self.do_view_change_sent = false;
        self.do_view_changes.clear();
        self.abandon_primary_state();
        self.superblock_dirty = true;
        self.send_start_view_change(now_ns);
        self.maybe_send_do_view_change(now_ns);
    }

    /// Clients whose requests were queued here retry against the new primary.
    fn abandon_primary_state(&mut self) {
        self.request_queue.clear();
        self.queued_bytes = 0;
        self.in_flight.clear();
        self.pending_replies.clear();
        self.votes.clear();
        // No evidence against a quorum until this replica leads again and an op stalls.
        self.committed_op_votes = self.config.quorum() as u8;
    }

    fn send_start_view_change(&mut self, now_ns: u64) {
        self.last_view_change_send_ns = now_ns;
        let header = self.header(Command::StartViewChange);
        self.broadcast(Message::new(header, Bytes::new()));
    }

    fn on_start_view_change(&mut self, now_ns: u64, header: &Header) {
        if self.status == ReplicaStatus::Recovering || header.view < self.view {
            return;
        }
        if header.view > self.view {
            self.start_view_change(now_ns, header.view, ViewChangeReason::HigherView);
        }
        if self.status == ReplicaStatus::ViewChange && header.view == self.view {
            self.start_view_change_votes |= 1 << header.replica;
            self.maybe_send_do_view_change(now_ns);
        }
    }

    fn maybe_send_do_view_change(&mut self, now_ns: u64) {
        if self.do_view_change_sent
            || (self.start_view_change_votes.count_ones() as usize) < self.config.quorum()
        {
            return;
        }
        self.do_view_change_sent = true;
        let do_view_change = self.own_do_view_change();
        let primary = self.config.primary_of(self.view);
        if primary == self.config.replica {
            self.do_view_changes.insert(primary, do_view_change);
            self.maybe_start_view(now_ns);
        } else {
            let message = self.do_view_change_message(&do_view_change);
            self.send(Destination::Replica(primary), message);
        }
    }

    fn own_do_view_change(&self) -> DoViewChange {
        DoViewChange {
            log_view: self.log_view,
            op: self.op,
            commit: self.commit_max.max(self.commit).min(self.op),
            head_checksum: self.head_checksum,
            entries: self.suffix(self.commit).into_iter().cloned().collect(),
        }
    }

    /// Our verified entries above `after`, newest `suffix_max` at most.
    fn suffix(&self, after: u64) -> Vec<&Entry> {
        let low = after
            .max(self.chain_low)
            .max(self.op.saturating_sub(self.config.suffix_max));
        self.entries
            .range(low + 1..)
            .map(|(_, entry)| entry)
            .collect()
    }

    fn do_view_change_message(&self, do_view_change: &DoViewChange) -> Message {
        let mut header = self.header(Command::DoViewChange);
        header.op = do_view_change.op;
        header.commit = do_view_change.commit;
        header.context = do_view_change.head_checksum;
        header.aux = do_view_change.log_view;
        let entries: Vec<&Entry> = do_view_change.entries.iter().collect();
        Message::new(header, encode_entries(&entries))
    }

    fn on_do_view_change(&mut self, now_ns: u64, message: &Message) -> Result<(), RejectReason> {
        let header = message.header;
        if self.status == ReplicaStatus::Recovering || header.view < self.view {
            return Ok(());
        }
        if self.config.primary_of(header.view) != self.config.replica {
            return Err(RejectReason::InvalidFields);
        }
        let entries = decode_suffix(&message.body, header.op, header.context)?;
        if header.view > self.view {
            self.start_view_change(now_ns, header.view, ViewChangeReason::HigherView);
        }
        if self.status != ReplicaStatus::ViewChange {
            // Already started the view: the sender missed our StartView.
            self.on_request_start_view(&header);
            return Ok(());
        }
        self.do_view_changes.insert(
            header.replica,
            DoViewChange {
                log_view: header.aux,
                op: header.op,
                commit: header.commit,
                head_checksum: header.context,
                entries,
            },
        );
        self.start_view_change_votes |= 1 << header.replica;
        self.maybe_send_do_view_change(now_ns);
        self.maybe_start_view(now_ns);
        Ok(())
    }

    fn maybe_start_view(&mut self, now_ns: u64) {
        if self.do_view_changes.len() < self.config.quorum()
            || !self.do_view_changes.contains_key(&self.config.replica)
        {
            return;
        }
        let commit_max = self
            .do_view_changes
            .values()
            .map(|dvc| dvc.commit)
            .max()
            .unwrap();
        let commit_min = self
            .do_view_changes
            .values()
            .map(|dvc| dvc.commit)
            .min()
            .unwrap();
        let best = self
            .do_view_changes
            .iter()
            .max_by_key(|(replica, dvc)| (dvc.log_view, dvc.op, **replica == self.config.replica))
            .map(|(replica, _)| *replica)
            .unwrap();
        let best = self.do_view_changes.remove(&best).unwrap();
        self.do_view_changes.clear();
        if best.op != self.op || best.head_checksum != self.head_checksum {
            self.install_head(now_ns, best.op, best.head_checksum, best.entries);
        }
        self.commit_max = self.commit_max.max(commit_max);
        self.enter_normal(now_ns);
        let uncommitted: Vec<u64> = ((self.commit_max + 1)..=self.op).collect();
        for op in uncommitted {
            let has_entry = self.entries.contains_key(&op);
            self.votes.insert(
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
                    self.in_flight
                        .insert(request.client_id, request.request_number);
                }
            }
        }
        let start_view = self.start_view_message(commit_min);
        self.broadcast(start_view);
        self.last_sent_to_backups_ns = now_ns;
        self.walk_chain(now_ns);
        self.commit_primary(now_ns);
    }

    fn start_view_message(&self, after: u64) -> Message {
        let mut header = self.header(Command::StartView);
        header.op = self.op;
        header.commit = self.commit_max.max(self.commit);
        header.context = self.head_checksum;
        Message::new(header, encode_entries(&self.suffix(after)))
    }

    fn enter_normal(&mut self, now_ns: u64) {
        let (replica_id, view, latency_ns) = (
            self.config.replica,
            self.view,
            now_ns.saturating_sub(self.view_change_started_ns),
        );
        self.status = ReplicaStatus::Normal;
        self.log_view = self.view;
        self.last_heard_primary_ns = now_ns;
        self.superblock_dirty = true;
        let is_primary = self.is_primary() as u8;
        probe::view_change_done(|| (replica_id, view, latency_ns, is_primary));
    }

    fn on_start_view(&mut self, now_ns: u64, message: &Message) -> Result<(), RejectReason> {
        let header = message.header;
        if self.config.primary_of(header.view) != header.replica {
            return Err(RejectReason::InvalidFields);
        }
        let stale = header.view < self.view
            || (header.view == self.view && self.status == ReplicaStatus::Normal);
        if self.status == ReplicaStatus::Recovering || stale {
            return Ok(());
        }
        let entries = decode_suffix(&message.body, header.op, header.context)?;
        if header.op < self.commit {
            return Err(RejectReason::InvalidFields);
        }
        if self.status == ReplicaStatus::Normal {
            self.view_change_started_ns = now_ns;
        }
        self.view = header.view;
        self.abandon_primary_state();
        if header.op != self.op || header.context != self.head_checksum {
            self.install_head(now_ns, header.op, header.context, entries);
        }
        self.commit_max = self.commit_max.max(header.commit);
        self.enter_normal(now_ns);
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
        self.acknowledge_uncommitted();
        Ok(())
    }

    fn request_start_view(&mut self, view: u64, primary: u8) {
        let mut header = self.header(Command::RequestStartView);
        header.view = view;
        self.send(
            Destination::Replica(primary),
            Message::new(header, Bytes::new()),
        );
    }

    fn on_request_start_view(&mut self, header: &Header) {
        if header.view == self.view && self.is_primary() {
            let start_view = self.start_view_message(self.commit);
            self.send(Destination::Replica(header.replica), start_view);
        }
    }

    fn on_view_change_tick(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.view_change_started_ns) > self.config.view_change_timeout_ns {
            return self.start_view_change(
                now_ns,
                self.view + 1,
                ViewChangeReason::ViewChangeTimeout,
            );
        }
        if now_ns.saturating_sub(self.last_view_change_send_ns) > self.config.retry_interval_ns {
            self.send_start_view_change(now_ns);
            if self.do_view_change_sent && !self.do_view_changes.contains_key(&self.config.replica)
            {
                let message = self.do_view_change_message(&self.own_do_view_change());
                let primary = self.config.primary_of(self.view);
                self.send(Destination::Replica(primary), message);
            }
        }
    }

    // ---------------------------------------------------------------- recovery

    fn start_recovery(&mut self, now_ns: u64) {
        self.status = ReplicaStatus::Recovering;
        self.recovery_started_ns = now_ns;
        // Unique per attempt; only needs to differ from earlier attempts of this replica, also
        // those of an earlier process that crashed while recovering.
        self.recovery_nonce = self.config.nonce_entropy
            ^ now_ns
            ^ (self.superblock.sequence << 32)
            ^ u64::from(self.config.replica);
        let (replica_id, nonce, commit) = (self.config.replica, self.recovery_nonce, self.commit);
        probe::recovery_start(|| (replica_id, nonce, commit));
        self.send_recovery(now_ns);
    }

    fn send_recovery(&mut self, now_ns: u64) {
        self.recovery_last_sent_ns = now_ns;
        let mut header = self.header(Command::Recovery);
        header.request_number = self.recovery_nonce;
        header.commit = self.commit;
        self.broadcast(Message::new(header, Bytes::new()));
    }

    fn on_recovery(&mut self, header: &Header) {
        if self.status != ReplicaStatus::Normal {
            return;
        }
        let mut response = self.header(Command::RecoveryResponse);
        response.request_number = header.request_number;
        let body = if self.is_primary() {
            response.op = self.op;
            response.commit = self.commit_max.max(self.commit);
            response.context = self.head_checksum;
            response.aux = 1;
            let from = header
                .commit
                .max(self.op.saturating_sub(self.config.suffix_max));
            let mut suffix = Vec::new();
            for op in from + 1..=self.op {
                let entry = if op <= self.commit {
                    match self.journal.read(&mut self.storage, op) {
                        Ok(Ok(entry)) => entry,
                        _ => {
                            suffix.clear();
                            continue;
                        }
                    }
                } else if let Some(entry) = self.entries.get(&op) {
                    entry.clone()
                } else {
                    suffix.clear();
                    continue;
                };
                suffix.push(entry);
            }
            encode_entries(&suffix.iter().collect::<Vec<_>>())
        } else {
            Bytes::new()
        };
        self.send(
            Destination::Replica(header.replica),
            Message::new(response, body),
        );
    }

    fn on_recovery_response(&mut self, now_ns: u64, message: &Message) -> Result<(), RejectReason> {
        let header = message.header;
        if self.status != ReplicaStatus::Recovering || header.request_number != self.recovery_nonce
        {
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
        self.recovery_responses.insert(
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
        if self.recovery_responses.len() < self.config.quorum() {
            return Ok(());
        }
        let view = self
            .recovery_responses
            .values()
            .map(|response| response.view)
            .max()
            .unwrap();
        let primary = self.config.primary_of(view);
        let Some(primary_response) = self
            .recovery_responses
            .remove(&primary)
            .filter(|r| r.view == view)
        else {
            return Ok(());
        };
        self.recovery_responses.clear();
        self.view = view;
        self.view_change_started_ns = now_ns;
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
        self.status = ReplicaStatus::Normal;
        self.log_view = view;
        self.last_heard_primary_ns = now_ns;
        self.superblock_dirty = true;
        let (replica_id, latency_ns) = (self.config.replica, now_ns - self.recovery_started_ns);
        probe::recovery_done(|| (replica_id, view, op, latency_ns));
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
        self.acknowledge_uncommitted();
        Ok(())
    }

    // ---------------------------------------------------------------- output

    fn header(&self, command: Command) -> Header {
        let mut header = Header::new(command, self.config.cluster, self.config.replica);
        header.view = self.view;
        header
    }

    fn other_replicas(&self) -> impl Iterator<Item = u8> + use<S> {
        let me = self.config.replica;
        (0..self.config.replica_count).filter(move |replica| *replica != me)
    }

    fn broadcast(&mut self, message: Message) {
        let frame = message.encode();
        for replica in self.other_replicas() {
            self.send_frame(
                Destination::Replica(replica),
                message.header.command,
                frame.clone(),
            );
        }
    }

    fn send(&mut self, destination: Destination, message: Message) {
        let command = message.header.command;
        self.send_frame(destination, command, message.encode());
    }

    fn send_frame(&mut self, destination: Destination, command: Command, frame: Bytes) {
        let bytes = frame.len();
        self.snapshot.count_sent(command, bytes);
        let replica_id = self.config.replica;
        let peer = match destination {
            Destination::Replica(replica) => replica,
            Destination::Client(_) => PEER_CLIENT,
        };
        probe::message_send(|| (replica_id, command as u8, bytes as u32, peer));
        self.outbox.push(Outgoing { destination, frame });
    }

    /// PrepareOk votes (own included) as a quorum health signal: those of the oldest op that has
    /// waited a heartbeat interval or longer for its quorum, else those that committed the newest
    /// op. Younger ops do not count: under load the newest op has only the primary's own vote
    /// for the millisecond until the backups answer, which says nothing about the quorum.
    fn quorum_votes(&self, now_ns: u64) -> u8 {
        self.votes
            .values()
            .find(|votes| {
                votes.quorum_ns.is_none()
                    && now_ns.saturating_sub(votes.prepared_ns) >= self.config.heartbeat_interval_ns
            })
            .map_or(self.committed_op_votes, |votes| {
                votes.replicas.count_ones() as u8
            })
    }

    fn publish_snapshot(&mut self, now_ns: u64) {
        let quorum_votes = self.quorum_votes(now_ns);
        let is_primary = self.is_primary();
        let snapshot = &mut self.snapshot;
        snapshot.status = self.status as u8;
        snapshot.is_primary = is_primary as u8;
        snapshot.view = self.view;
        snapshot.op = self.op;
        snapshot.commit = self.commit;
        snapshot.log_bytes = self.journal.size_bytes();
        snapshot.log_entries = self.journal.entry_count();
        snapshot.pending_requests = if is_primary {
            (self.request_queue.len() + self.pending_replies.len()) as u64
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
        snapshot.repair_inflight = self.repairs.len() as u64;
        let (replica_id, address, size) = (
            self.config.replica,
            snapshot as *const ReplicaSnapshot as u64,
            std::mem::size_of::<ReplicaSnapshot>() as u32,
        );
        probe::state_snapshot(|| (replica_id, address, size));
    }
}

/// Decodes a shipped log suffix and checks that it is one chain ending at the stated head.
fn decode_suffix(
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
