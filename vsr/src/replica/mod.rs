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

//!
//! One file per protocol phase: `normal` (requests, prepares, commits), `view_change`,
//! `recovery` (opening the data directory and the paper's recovery protocol), `repair` (the hash
//! chain and fetching missing entries) and `snapshot` (the state published to tracers). Each
//! phase keeps its state in its own struct.

mod checkpoint;
mod nack;
mod normal;
mod recovery;
mod repair;
mod scrub;
mod snapshot;
mod state_transfer;
mod view_change;

use std::io;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{
    Command, PEER_CLIENT, RejectReason, ReplicaSnapshot, ReplicaStatus, ViewChangeReason,
};

use crate::checkpoint::{self as checkpoint_file, CheckpointId};
use crate::client_table::ClientTable;
use crate::journal::Journal;
use crate::kv::KvStore;
use crate::message::{
    BatchedRequest, Entry, HEADER_SIZE, Header, LIST_PREFIX_SIZE, MESSAGE_SIZE_MAX, Message,
    OP_HEADERS_BYTES_MAX, SENDER_CLIENT,
};
use crate::prng::Prng;
use crate::storage::{Storage, Zone};
use crate::superblock::{self, SuperblockError, SuperblockState};

use normal::Pipeline;
use recovery::RecoveryState;
use repair::RepairState;
use scrub::ScrubState;
use state_transfer::StateTransferState;
use view_change::ViewChangeState;

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
    /// Largest body of one op: a batch of client requests, encoded.
    pub batch_bytes_max: usize,
    /// Largest operation a client may send; a larger one is answered `TooLarge`, never
    /// prepared. Fits in one batch, so no op outgrows `batch_bytes_max`.
    pub request_bytes_max: usize,
    pub request_queue_max: usize,
    pub client_sessions_max: usize,
    /// An op more than this above the replica's commit is refused: the journal's index grows
    /// with the highest op held (8 bytes an op), so no message can make the replica allocate
    /// for ops it has not committed beyond this window. A replica further behind than this
    /// would need state transfer.
    pub op_ahead_max: u64,
    /// Missing entries requested at once while repairing.
    pub repair_window: u64,
    /// Entries shipped at most in one DoViewChange, StartView or RecoveryResponse; anything
    /// older is repaired through the hash chain.
    pub suffix_max: u64,
    /// Body bytes at most of one DoViewChange, StartView or RecoveryResponse: the newest
    /// entries that fit are shipped, the rest repaired, so a view change is never a message
    /// too large to deliver.
    pub suffix_bytes_max: usize,
    /// Committed ops between two checkpoints of the state machine: a restart replays at most
    /// this many ops (plus the uncommitted suffix) from the journal.
    pub checkpoint_interval_ops: u64,
    /// Committed journal records the scrubber reads back per second (0: no scrubbing); each
    /// tour also checks the checkpoint and the superblock copies.
    pub scrub_ops_per_second: u64,
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
            request_bytes_max: crate::kv::OPERATION_SIZE_MAX,
            request_queue_max: 64 * 1024,
            client_sessions_max: 16 * 1024,
            op_ahead_max: 1 << 20,
            repair_window: 64,
            suffix_max: 64,
            suffix_bytes_max: 1024 * 1024,
            checkpoint_interval_ops: 2048,
            scrub_ops_per_second: 512,
            nonce_entropy: 0,
        }
    }

    pub fn validate(&self) -> Result<(), OpenError> {
        if self.replica_count == 0 || self.replica_count > REPLICAS_MAX {
            return Err(OpenError::Config(format!(
                "replica count {} is not in 1..={REPLICAS_MAX}",
                self.replica_count
            )));
        }
        if self.replica >= self.replica_count {
            return Err(OpenError::Config(format!(
                "replica index {} is not below the replica count {}",
                self.replica, self.replica_count
            )));
        }
        let body_bytes_max = MESSAGE_SIZE_MAX - HEADER_SIZE;
        if self.batch_bytes_max > body_bytes_max
            || self.suffix_bytes_max + OP_HEADERS_BYTES_MAX > body_bytes_max
            || self.suffix_bytes_max < LIST_PREFIX_SIZE
        {
            return Err(OpenError::Config(format!(
                "a batch ({} bytes) and a view change's suffix ({} bytes, plus {OP_HEADERS_BYTES_MAX} \
                 of op headers) must fit in a message body of {body_bytes_max} bytes (a suffix \
                 takes at least {LIST_PREFIX_SIZE})",
                self.batch_bytes_max, self.suffix_bytes_max
            )));
        }
        if self.checkpoint_interval_ops == 0 {
            return Err(OpenError::Config(
                "the checkpoint interval must be at least 1 op".to_string(),
            ));
        }
        if self.request_bytes_max == 0
            || LIST_PREFIX_SIZE + BatchedRequest::encoded_size(self.request_bytes_max)
                > self.batch_bytes_max
        {
            return Err(OpenError::Config(format!(
                "the request limit ({} bytes) must be at least 1 and leave one request, with \
                 its framing, within a batch of {} bytes",
                self.request_bytes_max, self.batch_bytes_max
            )));
        }
        Ok(())
    }

    /// What `format` checks before it writes anything.
    pub fn validate_format(&self, recovering: bool) -> Result<(), OpenError> {
        self.validate()?;
        if recovering && self.replica_count == 1 {
            return Err(OpenError::Config(
                "a 1-replica cluster has no peer to recover from".to_string(),
            ));
        }
        Ok(())
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
    #[error(
        "the checkpoint fails its checksum and the journal no longer holds the ops it covered; \
         with no peer to fetch them from, this replica's state is lost"
    )]
    StateLost,
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

/// The replica's protocol status. Tracers see it as a `ReplicaStatus` code, mapped only where
/// the snapshot is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Normal,
    ViewChange,
    /// Must not vote until a quorum has told it the current view and log.
    Recovering,
}

impl Status {
    pub fn probe_code(self) -> ReplicaStatus {
        match self {
            Status::Normal => ReplicaStatus::Normal,
            Status::ViewChange => ReplicaStatus::ViewChange,
            Status::Recovering => ReplicaStatus::Recovering,
        }
    }
}

#[derive(Debug)]
pub struct Replica<S: Storage> {
    config: Config,
    storage: S,
    journal: Journal,
    superblock: SuperblockState,
    superblock_dirty: bool,
    /// Some copy failed its checksum at open: every copy is rewritten once recovered.
    superblock_damaged: bool,

    status: Status,
    view: u64,
    /// The last view in which this replica was in normal status.
    log_view: u64,
    /// Highest op in the log (the head of the hash chain).
    op: u64,
    head_checksum: u64,
    /// Highest op executed here; every op up to it is committed.
    commit: u64,
    /// The checksum of op `commit`'s entry: the tip of the executed chain.
    commit_checksum: u64,
    /// Highest op this replica knows to be committed anywhere in the cluster.
    commit_max: u64,
    /// Verified entries above `commit`: they chain to the head.
    entries: std::collections::BTreeMap<u64, Entry>,
    /// Entries above `commit` not (yet) verified against the chain: from the local journal
    /// after a restart, or from repair responses that arrived out of order.
    candidates: std::collections::BTreeMap<u64, Entry>,
    /// `entries` holds every op in `(chain_low, op]`.
    chain_low: u64,

    kv: KvStore,
    client_table: ClientTable,
    /// Every op executed since the last `take_executed`, for a checker that follows the
    /// committed log as it grows (the simulator); `None` keeps nothing.
    executed: Option<Vec<Entry>>,
    /// The state after the newest op that completed a checkpoint interval, encoded when that
    /// op executed and written by the next `flush`.
    pending_checkpoint: Option<(CheckpointId, Bytes)>,

    pipeline: Pipeline,
    /// When the primary last sent backups anything; a heartbeat is due after an interval of silence.
    last_sent_to_backups_ns: u64,
    /// When a backup last heard its primary; a view change is due after a timeout of silence.
    last_heard_primary_ns: u64,
    view_change: ViewChangeState,
    /// Jitter for timeouts: seeded per process (`Config::nonce_entropy`), so in the simulator
    /// a seed replays exactly.
    prng: Prng,
    recovery: RecoveryState,
    repair: RepairState,
    state_transfer: StateTransferState,
    scrub: ScrubState,

    snapshot: ReplicaSnapshot,
    next_snapshot_ns: u64,
    /// The entries (op, checksum) the journal held above the executed prefix when this process
    /// opened it. The process before may have executed, and tracers counted, any of them: the
    /// superblock's commit trails execution by up to a snapshot interval, so they run again
    /// once the cluster's commit reaches them, and fire no execution probe then. Those it had
    /// journaled but not executed go uncounted, at most a pipeline's worth; an op number that
    /// commits with another entry (of a later view) is counted.
    journaled_at_open: std::collections::BTreeMap<u64, u64>,
    reply_latencies_ns: Vec<u64>,
    outbox: Vec<Outgoing>,
}

impl<S: Storage> Replica<S> {
    pub fn replica_id(&self) -> u8 {
        self.config.replica
    }

    pub fn status(&self) -> Status {
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

    /// From now on, keeps every executed op for `take_executed` (a checker's view of the
    /// committed log, which journals drop once checkpoints cover it).
    pub fn record_executed(&mut self) {
        self.executed.get_or_insert_with(Vec::new);
    }

    pub fn take_executed(&mut self) -> Vec<Entry> {
        self.executed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Where the body of committed `op`'s record starts in the journal (for a simulator that
    /// rots records the scrubber reads).
    pub fn journal_body_offset(&self, op: u64) -> Option<u64> {
        self.journal.body_offset(op)
    }

    /// The op of the newest durable checkpoint.
    pub fn checkpoint_op(&self) -> u64 {
        self.superblock.checkpoint.op
    }

    /// Identifies the state machine's state: equal on replicas that executed the same ops.
    pub fn state_checksum(&self) -> u64 {
        crate::checksum::checksum(&checkpoint_file::encode_state(&self.kv, &self.client_table))
    }

    pub fn head_checksum(&self) -> u64 {
        self.head_checksum
    }

    pub fn is_primary(&self) -> bool {
        self.status == Status::Normal && self.config.primary_of(self.view) == self.config.replica
    }

    /// Protocol state in one line, for simulator failures and logs.
    pub fn describe(&self) -> String {
        format!(
            "{:?} view {} log_view {} op {} commit {} commit_max {} checkpoint {} chain_low {} entries {:?}..{:?} candidates {} repairs {:?} scrub {:?}",
            self.status,
            self.view,
            self.log_view,
            self.op,
            self.commit,
            self.commit_max,
            self.superblock.checkpoint.op,
            self.chain_low,
            self.entries.keys().next(),
            self.entries.keys().next_back(),
            self.candidates.len(),
            self.repair.pending.keys().take(4).collect::<Vec<_>>(),
            self.scrub.corrupt_ops_preview(),
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

    /// What holds between any two inputs; every handler asserts it before it acts.
    fn assert_invariants(&self) {
        assert!(
            self.log_view <= self.view,
            "log view above view: {}",
            self.describe()
        );
        assert!(
            self.commit <= self.chain_low && self.chain_low <= self.op,
            "commit, chain and head out of order: {}",
            self.describe()
        );
        assert!(
            self.entries
                .keys()
                .next()
                .is_none_or(|op| *op > self.commit),
            "an executed op is still held as uncommitted: {}",
            self.describe()
        );
        assert!(
            self.status != Status::Normal || self.log_view == self.view,
            "normal outside its log view: {}",
            self.describe()
        );
        assert!(self.status == Status::Normal || self.pipeline.votes.is_empty());
    }

    /// A frame the transport could not accept as a message.
    pub fn on_rejected(&mut self, reason: RejectReason, source: Source) {
        let replica_id = self.config.replica;
        probe::byzantine_rejection(|| (replica_id, reason as u8, source.peer_code()));
    }

    pub fn on_message(&mut self, now_ns: u64, source: Source, message: Message) {
        self.assert_invariants();
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
        let sets_head = matches!(
            message.header.command,
            Command::Prepare | Command::StartView | Command::DoViewChange
        );
        if sets_head && message.header.op > self.commit.saturating_add(self.config.op_ahead_max) {
            return self.on_rejected(RejectReason::OpOutOfWindow, source);
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
                self.on_request_prepare(now_ns, &header);
                Ok(())
            }
            (Command::RequestStartView, _) => {
                self.on_request_start_view(&header);
                Ok(())
            }
            (Command::RequestCheckpoint, _) => {
                self.on_request_checkpoint(&header);
                Ok(())
            }
            (Command::Checkpoint, _) => self.on_checkpoint(now_ns, &message),
            // The transport fixed the connection's replica with it; nothing to do.
            (Command::Hello, _) => Ok(()),
            (Command::Request | Command::Reply, _) => Err(RejectReason::InvalidFields),
        };
        if let Err(reason) = result {
            self.on_rejected(reason, source);
        }
    }

    /// The transport lost an established connection to a replica.
    pub fn on_peer_disconnected(&mut self, now_ns: u64, replica: u8) {
        self.assert_invariants();
        let primary = self.config.primary_of(self.view);
        if self.status == Status::Normal && replica == primary && !self.is_primary() {
            self.suspect_primary(now_ns, ViewChangeReason::PrimaryDisconnected);
        }
    }

    /// An operator asked this replica to abandon the current view.
    pub fn on_operator_view_change(&mut self, now_ns: u64) {
        self.assert_invariants();
        if self.status != Status::Recovering {
            self.start_view_change(now_ns, self.view + 1, ViewChangeReason::OperatorRequest);
        }
    }

    pub fn on_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        match self.status {
            Status::Normal if self.is_primary() => self.on_primary_tick(now_ns),
            Status::Normal => {
                let silent = now_ns.saturating_sub(self.last_heard_primary_ns)
                    > self.config.view_change_timeout_ns;
                let ask_again = self.view_change.suspicion.is_none()
                    || now_ns.saturating_sub(self.view_change.last_sent_ns)
                        > self.config.retry_interval_ns;
                if !silent {
                    self.view_change.suspicion = None;
                } else if ask_again {
                    let reason = self
                        .view_change
                        .suspicion
                        .unwrap_or(ViewChangeReason::PrimaryTimeout);
                    self.suspect_primary(now_ns, reason);
                }
            }
            Status::ViewChange => self.on_view_change_tick(now_ns),
            Status::Recovering => {
                if now_ns.saturating_sub(self.recovery.last_sent_ns) > self.config.retry_interval_ns
                {
                    self.send_recovery(now_ns);
                }
            }
        }
        self.on_repair_tick(now_ns);
        self.on_state_transfer_tick(now_ns);
        self.on_scrub_tick(now_ns);
        if now_ns >= self.next_snapshot_ns {
            self.next_snapshot_ns = now_ns + self.config.snapshot_interval_ns;
            if self.commit > self.superblock.commit && self.status == Status::Normal {
                self.superblock_dirty = true;
            }
            self.publish_snapshot(now_ns);
        }
    }

    /// Ends a batch of inputs: the primary prepares queued requests, the journal and superblock
    /// become durable (the group commit), and only then are the outputs released.
    pub fn flush(&mut self, now_ns: u64) -> io::Result<Vec<Outgoing>> {
        if self.is_primary() && !self.primary_abdicating(now_ns) {
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
        let mut discard_journal_before = None;
        if let Some((id, state)) = self.pending_checkpoint.take() {
            // After the journal: the superblock that names this checkpoint also claims its op
            // committed, and every op up to it must be durable by then.
            let started = std::time::Instant::now();
            checkpoint_file::write(&mut self.storage, id.slot, &state)?;
            if id.slot != self.superblock.checkpoint.slot {
                self.state_transfer.previous = self.superblock.checkpoint;
            }
            self.superblock.checkpoint = id;
            self.superblock_dirty = true;
            // Ops of the interval before the checkpoint stay for peers that lag a little.
            let keep_from = (id.op + 1).saturating_sub(self.config.checkpoint_interval_ops);
            if self.status != Status::Recovering {
                self.journal.discard_before(keep_from);
            }
            if self.journal.start() > self.superblock.journal_start {
                self.superblock.journal_start = self.journal.start();
                discard_journal_before = Some(self.journal.start());
            }
            let replica_id = self.config.replica;
            probe::checkpoint_done(|| {
                let latency_ns = started.elapsed().as_nanos() as u64;
                (replica_id, id.op, id.size_bytes, latency_ns)
            });
        }
        if self.status != Status::Recovering {
            // Whatever a torn or corrupt stretch of the journal hid, this replica's log no
            // longer depends on it: erase it before the superblock stops saying "recovering".
            self.journal.erase_corrupt_runs(&mut self.storage)?;
        }
        self.advance_nack_floor();
        if self.superblock_dirty {
            self.superblock_dirty = false;
            self.superblock.view = self.view;
            self.superblock.log_view = self.log_view;
            self.superblock.recovering = self.status == Status::Recovering;
            // Never claim a commit the journal cannot replay: executed ops are durable. A
            // restarted replica may not have executed its durable commit yet: keep that one.
            if self.commit > self.superblock.commit {
                self.superblock.commit = self.commit;
                self.superblock.commit_checksum = self.commit_checksum;
            }
            let copies = if self.superblock_damaged && self.status != Status::Recovering {
                self.superblock_damaged = false;
                superblock::COPIES
            } else {
                1
            };
            for _ in 0..copies {
                superblock::write(&mut self.storage, &mut self.superblock)?;
            }
        }
        // Only once a durable superblock starts the journal after them.
        if let Some(start) = discard_journal_before {
            self.storage.discard(Zone::Journal, start)?;
        }
        Ok(std::mem::take(&mut self.outbox))
    }

    // ---------------------------------------------------------------- output

    /// The largest body this replica ever builds for `command`: every message it sends fits
    /// in a frame its peers accept, whatever the load.
    fn body_bytes_max(&self, command: Command) -> usize {
        match command {
            Command::Prepare => self.config.batch_bytes_max,
            Command::DoViewChange => self.config.suffix_bytes_max + OP_HEADERS_BYTES_MAX,
            Command::StartView | Command::RecoveryResponse => self.config.suffix_bytes_max,
            Command::Reply => crate::kv::RESULT_SIZE_MAX,
            Command::Checkpoint => state_transfer::CHECKPOINT_CHUNK_BYTES,
            Command::Request
            | Command::PrepareOk
            | Command::Commit
            | Command::StartViewChange
            | Command::Recovery
            | Command::RequestPrepare
            | Command::RequestStartView
            | Command::RequestCheckpoint
            | Command::Hello => 0,
        }
    }

    pub(super) fn header(&self, command: Command) -> Header {
        let mut header = Header::new(command, self.config.cluster, self.config.replica);
        header.view = self.view;
        header
    }

    pub(super) fn other_replicas(&self) -> impl Iterator<Item = u8> + use<S> {
        let me = self.config.replica;
        (0..self.config.replica_count).filter(move |replica| *replica != me)
    }

    pub(super) fn broadcast(&mut self, message: Message) {
        let frame = message.encode();
        for replica in self.other_replicas() {
            self.send_frame(
                Destination::Replica(replica),
                message.header.command,
                frame.clone(),
            );
        }
    }

    pub(super) fn send(&mut self, destination: Destination, message: Message) {
        let command = message.header.command;
        self.send_frame(destination, command, message.encode());
    }

    pub(super) fn send_frame(&mut self, destination: Destination, command: Command, frame: Bytes) {
        let bytes = frame.len();
        assert!(
            bytes <= HEADER_SIZE + self.body_bytes_max(command),
            "a {command:?} of {bytes} bytes exceeds its bound"
        );
        self.snapshot.count_sent(command, bytes);
        let replica_id = self.config.replica;
        let peer = match destination {
            Destination::Replica(replica) => replica,
            Destination::Client(_) => PEER_CLIENT,
        };
        probe::message_send(|| (replica_id, command as u8, bytes as u32, peer));
        self.outbox.push(Outgoing { destination, frame });
    }
}
