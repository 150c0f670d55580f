//! The deterministic simulator: replicas, clients, a faulty network and faulty disks in one
//! thread, driven by a seeded PRNG and a simulated clock. The same seed gives the same run, so a
//! failing seed printed by a test reproduces exactly.
//!
//! Faults: crash and restart (a power loss: unsynced writes lost, the first possibly torn), a
//! crash of every replica at once (a kill -9 of each process: what was written survives,
//! synced or not), a replica whose data is lost and that is re-formatted as a replacement,
//! network partitions, message loss, duplication, delay and reordering, corruption of a
//! crashed replica's journal or superblock, and replicas crashed for good (never restarted,
//! not even when the run heals: the rest must keep committing without them). Apart from the
//! crash of the whole cluster, at most `f` replicas are down, recovering or partitioned at a
//! time, which is what VSR promises to survive.

use std::collections::HashMap;
use std::io;

use bytes::Bytes;

use crate::checkpoint::encode_state;
use crate::checksum::checksum;
use crate::client::{Client, ReplyOutcome};
use crate::client_table::{ClientTable, Lookup};
use crate::kv::{KvStore, Operation};
use crate::message::{Entry, LIST_PREFIX_SIZE, Message, REGISTER_REQUEST_NUMBER, decode_batch};
use crate::online_checks::{Observation, OnlineChecks};
use crate::prng::Prng;
use crate::replica::{Config, Destination, Outgoing, Replica, Source, Status};
use crate::storage::{CHECKPOINT_SLOTS, Storage, Zone};

/// In-memory storage with the failure modes of a real disk: writes are volatile until synced,
/// a crash may tear the last unsynced write, and bytes can rot.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    durable: HashMap<Zone, Vec<u8>>,
    unsynced: Vec<(Zone, u64, Vec<u8>)>,
    /// Syncs that still complete before a scheduled power failure.
    syncs_before_power_cut: Option<u32>,
    /// The power failed: nothing written since reaches the disk.
    power_cut: bool,
}

impl MemoryStorage {
    fn apply(zone_bytes: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
        let end = offset as usize + bytes.len();
        if zone_bytes.len() < end {
            zone_bytes.resize(end, 0);
        }
        zone_bytes[offset as usize..end].copy_from_slice(bytes);
    }

    /// Fails the power after `syncs` more syncs complete, in the middle of what the replica is
    /// writing: between a journal write and its sync, or the journal and the superblock.
    pub fn cut_power_after_syncs(&mut self, syncs: u32) {
        self.syncs_before_power_cut = Some(syncs);
    }

    /// Whether the scheduled power failure happened; clears the schedule.
    pub fn take_power_cut(&mut self) -> bool {
        self.syncs_before_power_cut = None;
        std::mem::take(&mut self.power_cut)
    }

    /// A process crash: the kernel still holds every write, synced or not.
    pub fn crash_process(&mut self) {
        self.crash_keep_torn_writes();
    }

    /// Loses every unsynced write.
    pub fn crash(&mut self) {
        self.unsynced.clear();
    }

    /// Unsynced writes reach the disk as they are (for tests that build a torn write by hand).
    pub fn crash_keep_torn_writes(&mut self) {
        for (zone, offset, bytes) in std::mem::take(&mut self.unsynced) {
            Self::apply(self.durable.entry(zone).or_default(), offset, &bytes);
        }
    }

    /// Loses unsynced writes except a random prefix of the first one: a torn write.
    pub fn crash_torn(&mut self, prng: &mut Prng) {
        if let Some((zone, offset, bytes)) = self.unsynced.first().cloned() {
            let kept = prng.below(bytes.len() as u64 + 1) as usize;
            Self::apply(
                self.durable.entry(zone).or_default(),
                offset,
                &bytes[..kept],
            );
        }
        self.crash();
    }

    pub fn corrupt_byte(&mut self, zone: Zone, offset: u64) {
        if let Some(byte) = self
            .durable
            .get_mut(&zone)
            .and_then(|bytes| bytes.get_mut(offset as usize))
        {
            *byte ^= 0x5a;
        }
    }

    pub fn durable_size(&self, zone: Zone) -> u64 {
        self.durable
            .get(&zone)
            .map_or(0, |bytes| bytes.len() as u64)
    }
}

impl Storage for MemoryStorage {
    fn read_at(&mut self, zone: Zone, offset: u64, buffer: &mut [u8]) -> io::Result<usize> {
        let size = self.size(zone)?;
        let start = offset.min(size);
        let count = buffer.len().min((size - start) as usize);
        let buffer = &mut buffer[..count];
        buffer.fill(0);
        let durable = self.durable.get(&zone).map_or(&[][..], Vec::as_slice);
        let overlays = std::iter::once((0, durable)).chain(
            self.unsynced
                .iter()
                .filter(|(write_zone, _, _)| *write_zone == zone)
                .map(|(_, write_offset, bytes)| (*write_offset, bytes.as_slice())),
        );
        // Later writes over earlier ones, as `apply` would leave them, without copying the zone.
        for (write_offset, bytes) in overlays {
            let from = start.max(write_offset);
            let to = (start + count as u64).min(write_offset + bytes.len() as u64);
            if from < to {
                buffer[(from - start) as usize..(to - start) as usize].copy_from_slice(
                    &bytes[(from - write_offset) as usize..(to - write_offset) as usize],
                );
            }
        }
        Ok(count)
    }

    fn write_at(&mut self, zone: Zone, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if !self.power_cut {
            self.unsynced.push((zone, offset, bytes.to_vec()));
        }
        Ok(())
    }

    fn sync(&mut self, zone: Zone) -> io::Result<()> {
        match self.syncs_before_power_cut {
            _ if self.power_cut => return Ok(()),
            Some(0) => {
                self.power_cut = true;
                return Ok(());
            }
            Some(syncs) => self.syncs_before_power_cut = Some(syncs - 1),
            None => {}
        }
        let (synced, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unsynced)
            .into_iter()
            .partition(|(write_zone, _, _)| *write_zone == zone);
        self.unsynced = rest;
        for (_, offset, bytes) in synced {
            Self::apply(self.durable.entry(zone).or_default(), offset, &bytes);
        }
        Ok(())
    }

    fn discard(&mut self, zone: Zone, offset: u64) -> io::Result<()> {
        if self.power_cut {
            return Ok(());
        }
        // Zeroed, not freed: a read of discarded bytes finds nothing, as a deleted segment.
        if let Some(bytes) = self.durable.get_mut(&zone) {
            let end = (offset as usize).min(bytes.len());
            bytes[..end].fill(0);
        }
        Ok(())
    }

    fn size(&mut self, zone: Zone) -> io::Result<u64> {
        let mut size = self.durable_size(zone);
        for (write_zone, offset, bytes) in &self.unsynced {
            if *write_zone == zone {
                size = size.max(offset + bytes.len() as u64);
            }
        }
        Ok(size)
    }
}

/// How hostile a run is. Percentages are per message or per step.
#[derive(Debug, Clone)]
pub struct Faults {
    pub loss_percent: u64,
    pub duplicate_percent: u64,
    /// Extra delay on some messages reorders them.
    pub delay_max_ns: u64,
    pub crash_percent_per_second: u64,
    pub partition_percent_per_second: u64,
    pub corrupt_on_crash_percent: u64,
    /// A crashed replica's data is lost and it comes back re-formatted as a replacement.
    pub replace_on_crash_percent: u64,
    /// When every replica crashes at once, if at all.
    pub cluster_crash_ns: Option<u64>,
    /// A byte of a running replica's journal rots: its scrubber must find and repair it.
    pub corrupt_running_percent_per_second: u64,
    /// A crash is for good: the replica never comes back (at most f of them).
    pub permanent_crash_percent: u64,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            loss_percent: 0,
            duplicate_percent: 0,
            delay_max_ns: 1_000_000,
            crash_percent_per_second: 0,
            partition_percent_per_second: 0,
            corrupt_on_crash_percent: 0,
            replace_on_crash_percent: 0,
            cluster_crash_ns: None,
            corrupt_running_percent_per_second: 0,
            permanent_crash_percent: 0,
        }
    }

    /// A random mix, so a sweep of seeds covers many combinations.
    pub fn random(prng: &mut Prng) -> Faults {
        Faults {
            loss_percent: prng.below(10),
            duplicate_percent: prng.below(10),
            delay_max_ns: 1_000_000 + prng.below(50_000_000),
            crash_percent_per_second: prng.below(40),
            partition_percent_per_second: prng.below(30),
            corrupt_on_crash_percent: prng.below(60),
            replace_on_crash_percent: prng.below(20),
            cluster_crash_ns: prng
                .chance(30)
                .then(|| (1 + prng.below(18)) * 1_000_000_000),
            corrupt_running_percent_per_second: prng.below(30),
            permanent_crash_percent: if prng.chance(25) { prng.below(100) } else { 0 },
        }
    }
}

/// Which way a partitioned replica is cut off from the other replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Both,
    /// It still sends but hears nothing: a half-open link, the case where one replica's view
    /// changes must not drag the others out of a working view.
    Inbound,
}

#[derive(Debug, Clone, Copy)]
struct Partition {
    replica: u8,
    until_ns: u64,
    cut: Cut,
}

#[derive(Debug)]
struct InFlight {
    deliver_ns: u64,
    sequence: u64,
    source: Source,
    destination: Destination,
    frame: Bytes,
}

#[derive(Debug)]
enum Node {
    Up(Box<Replica<MemoryStorage>>),
    Down {
        storage: MemoryStorage,
        restart_ns: u64,
        /// Its data is lost: it restarts re-formatted as a replacement.
        replaced: bool,
        /// Never restarts, not even when the run heals.
        permanent: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The machine loses power: unsynced writes are lost, the first one possibly torn.
    PowerLoss,
    /// The process is killed: the kernel keeps every write.
    Process,
}

/// One acknowledged request, as its client saw it.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub client_id: u64,
    pub request_number: u64,
    pub operation: Bytes,
    pub op: u64,
    pub result: Bytes,
}

#[derive(Debug)]
struct SimClient {
    client: Client,
    operation: Option<Bytes>,
    sent_ns: u64,
    requests_left: u64,
}

const TICK_NS: u64 = 10_000_000;
const CLIENT_TIMEOUT_NS: u64 = 300_000_000;
const CLUSTER: u64 = 0x5eed;

#[derive(Debug)]
pub struct Simulator {
    prng: Prng,
    pub faults: Faults,
    config: Config,
    now_ns: u64,
    nodes: Vec<Node>,
    network: Vec<InFlight>,
    sequence: u64,
    partition: Option<Partition>,
    /// Per replica: the commit it must reach before a replacement holds the history again.
    /// Until then it counts against the fault budget like a crashed replica: losing the
    /// other copies of history while it catches up is more than f faults.
    catch_up_commit: Vec<u64>,
    clients: Vec<SimClient>,
    next_client_id: u64,
    pub acknowledged: Vec<Acknowledged>,
    /// The committed log as replicas executed it (op `n` at index `n - 1`): recorded while the
    /// run goes on, since journals drop what checkpoints cover.
    committed: Vec<Entry>,
    /// Per replica: the highest op whose committed entry was compared with `committed`.
    observed_commit: Vec<u64>,
    /// Safety violations seen while running, reported by `check`.
    violations: Vec<String>,
    pub crashes: u64,
    /// Checkpoints installed by state transfer, counted when a replica goes down and at the end.
    state_transfers: u64,
    /// Per replica whose running journal was corrupted: its scrub tours then. It counts as
    /// faulty until a whole tour has run since and nothing it found awaits repair.
    scrub_pending: Vec<Option<u64>>,
    pub corruptions_running: u64,
    /// Power failures in the middle of a flush.
    pub power_cuts: u64,
    pub corruptions: u64,
    pub replacements: u64,
    /// Replicas crashed for good.
    pub lost: u64,
    /// Invariants checked after every output a replica releases.
    online_checks: OnlineChecks,
    /// Print every fault and restart with the replicas' states (`VSR_SIM_TRACE=1`).
    pub trace: bool,
}

impl Simulator {
    pub fn new(
        seed: u64,
        replica_count: u8,
        client_count: usize,
        requests_per_client: u64,
    ) -> Simulator {
        let mut prng = Prng::new(seed);
        let faults = Faults::random(&mut prng);
        let mut config = Config::new(CLUSTER, 0, replica_count);
        // Small enough that some seeds evict sessions; big enough that most do not.
        config.client_sessions_max = if prng.chance(30) {
            client_count.max(2) - 1
        } else {
            1024
        };
        config.pipeline_max = 1 + prng.below(8);
        config.batch_bytes_max = 64 + prng.below(4096) as usize;
        // Some operations (see `random_operation`) are above the limit in some seeds.
        config.request_bytes_max = (40 + prng.below(200) as usize).min(config.batch_bytes_max - 24);
        config.suffix_max = 2 + prng.below(16);
        // From "no entry fits" (the whole suffix travels by repair) to tens of entries.
        config.suffix_bytes_max = LIST_PREFIX_SIZE + prng.below(8192) as usize;
        config.repair_window = 1 + prng.below(16);
        // Often enough that restarts load checkpoints and replay a suffix.
        config.checkpoint_interval_ops = 1 + prng.below(48);
        config.scrub_ops_per_second = 64 + prng.below(1024);
        let nodes = (0..replica_count)
            .map(|replica| {
                let config = Config {
                    replica,
                    nonce_entropy: prng.next_u64(),
                    ..config.clone()
                };
                let mut storage = MemoryStorage::default();
                Replica::format(&config, &mut storage, false).unwrap();
                let mut replica = Replica::open(config, storage, 0).unwrap();
                replica.record_executed();
                Node::Up(Box::new(replica))
            })
            .collect();
        let clients = (0..client_count)
            .map(|index| SimClient {
                client: Client::new(CLUSTER, replica_count, index as u64 + 1),
                operation: None,
                sent_ns: 0,
                requests_left: requests_per_client,
            })
            .collect();
        Simulator {
            prng,
            faults,
            config,
            now_ns: 0,
            nodes,
            network: Vec::new(),
            sequence: 0,
            partition: None,
            catch_up_commit: vec![0; replica_count as usize],
            clients,
            next_client_id: client_count as u64 + 1,
            acknowledged: Vec::new(),
            committed: Vec::new(),
            observed_commit: vec![0; replica_count as usize],
            violations: Vec::new(),
            crashes: 0,
            state_transfers: 0,
            scrub_pending: vec![None; replica_count as usize],
            corruptions_running: 0,
            power_cuts: 0,
            corruptions: 0,
            replacements: 0,
            lost: 0,
            online_checks: OnlineChecks::default(),
            trace: false,
        }
    }

    pub fn state_transfers(&self) -> u64 {
        let up: u64 = self
            .nodes
            .iter()
            .map(|node| match node {
                Node::Up(replica) => replica.state_transfers_installed(),
                Node::Down { .. } => 0,
            })
            .sum();
        self.state_transfers + up
    }

    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    fn replica_count(&self) -> u8 {
        self.config.replica_count
    }

    /// Replicas that cannot answer a recovering peer: down, still recovering, a replacement
    /// still catching up, or cut off.
    /// Recovery needs f + 1 replicas in normal status, so faults stay within f of these.
    fn faulty_count(&self) -> usize {
        let unavailable = self
            .nodes
            .iter()
            .zip(&self.catch_up_commit)
            .zip(&self.scrub_pending)
            .filter(|((node, catch_up_commit), scrub_pending)| match node {
                Node::Down { .. } => true,
                Node::Up(replica) => {
                    replica.status() == Status::Recovering
                        || replica.commit() < **catch_up_commit
                        || scrub_pending.is_some()
                }
            })
            .count();
        unavailable + self.partition.iter().count()
    }

    fn f(&self) -> usize {
        (self.replica_count() as usize - 1) / 2
    }

    /// Runs for `duration_ns` of simulated time with faults on.
    pub fn run(&mut self, duration_ns: u64) {
        let end = self.now_ns + duration_ns;
        while self.now_ns < end {
            self.step();
        }
    }

    /// Turns faults off, restarts every replica, heals partitions, and runs until every client
    /// finished its requests and all replicas agree, or `limit_ns` passes. Returns whether the
    /// cluster converged.
    pub fn heal_and_settle(&mut self, limit_ns: u64) -> bool {
        self.faults = Faults::none();
        self.partition = None;
        for node in &mut self.nodes {
            if let Node::Down {
                restart_ns,
                permanent: false,
                ..
            } = node
            {
                *restart_ns = 0;
            }
        }
        self.trace_event("heal");
        let end = self.now_ns + limit_ns;
        while self.now_ns < end {
            self.step();
            if self.settled() {
                self.trace_event("settled");
                return self.scrub_through(end);
            }
        }
        false
    }

    /// Runs until every replica's scrubber has toured its whole journal twice more with nothing
    /// awaiting repair (the log no longer grows), so that `check` may expect every record to
    /// read back.
    fn scrub_through(&mut self, end_ns: u64) -> bool {
        let tours_now = self.scrub_tours();
        while self.now_ns < end_ns {
            self.step();
            let scrubbed = self
                .nodes
                .iter()
                .zip(&tours_now)
                .all(|(node, before)| match node {
                    Node::Up(replica) => {
                        replica.scrub_tours_completed() >= before + 2
                            && replica.scrub_corrupt_ops() == 0
                    }
                    Node::Down { .. } => true,
                });
            if scrubbed {
                return true;
            }
        }
        false
    }

    fn scrub_tours(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|node| match node {
                Node::Up(replica) => replica.scrub_tours_completed(),
                Node::Down { .. } => 0,
            })
            .collect()
    }

    fn trace_event(&self, event: &str) {
        if self.trace {
            eprintln!(
                "{:>8.3} s  {event}: {}",
                self.now_ns as f64 / 1e9,
                self.describe()
            );
        }
    }

    /// One line per replica and the clients still waiting, for failure messages.
    pub fn describe(&self) -> String {
        let mut lines: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| match node {
                Node::Up(replica) => format!("replica {index}: {}", replica.describe()),
                Node::Down { .. } => format!("replica {index}: down"),
            })
            .collect();
        let waiting = self
            .clients
            .iter()
            .filter(|client| client.client.has_pending())
            .count();
        lines.push(format!("{waiting} clients waiting for a reply"));
        lines.join("; ")
    }

    fn settled(&self) -> bool {
        let clients_done = self
            .clients
            .iter()
            .all(|client| client.requests_left == 0 && !client.client.has_pending());
        let replicas: Vec<&Replica<MemoryStorage>> = self
            .nodes
            .iter()
            .filter_map(|node| match node {
                Node::Up(replica) => Some(replica.as_ref()),
                Node::Down { .. } => None,
            })
            .collect();
        clients_done
            && replicas.len() + self.permanent_count() == self.nodes.len()
            && replicas.iter().all(|replica| {
                replica.commit() == replicas[0].commit() && replica.op() == replica.commit()
            })
    }

    fn step(&mut self) {
        self.now_ns += TICK_NS.min(1_000_000);
        self.inject_faults();
        self.restart_due();
        self.clients_send();
        let due: Vec<InFlight> = {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.network)
                .into_iter()
                .partition(|message| message.deliver_ns <= self.now_ns);
            self.network = later;
            due
        };
        let mut due = due;
        due.sort_by_key(|message| (message.deliver_ns, message.sequence));
        for message in due {
            self.deliver(message);
        }
        if self.now_ns.is_multiple_of(TICK_NS) {
            for index in 0..self.nodes.len() {
                if let Node::Up(replica) = &mut self.nodes[index] {
                    replica.on_tick(self.now_ns);
                }
                self.flush(index as u8);
            }
        }
    }

    fn inject_faults(&mut self) {
        if !self.now_ns.is_multiple_of(100_000_000) {
            return;
        }
        self.clear_scrubbed();
        let corrupt = self.faults.corrupt_running_percent_per_second;
        if corrupt > 0 && self.prng.below(1000) < corrupt && self.faulty_count() < self.f() {
            let index = self.prng.below(u64::from(self.replica_count())) as usize;
            self.corrupt_running(index);
        }
        // Per 100 ms step: the per-second percentages divided by ten.
        if let Some(cluster_crash_ns) = self.faults.cluster_crash_ns
            && self.now_ns >= cluster_crash_ns
        {
            self.faults.cluster_crash_ns = None;
            for index in 0..self.nodes.len() {
                self.crash(index, Crash::Process);
            }
        }
        // A 1-replica cluster survives a crash too: it is down until it restarts.
        let crash = self.faults.crash_percent_per_second;
        if crash > 0 && self.prng.below(1000) < crash && self.faulty_count() < self.f().max(1) {
            let index = self.prng.below(u64::from(self.replica_count())) as usize;
            let permanent = self.prng.chance(self.faults.permanent_crash_percent)
                && self.permanent_count() < self.f();
            if permanent {
                self.crash_for_good(index as u8);
            } else {
                self.crash(index, Crash::PowerLoss);
            }
        }
        if let Some(partition) = self.partition
            && self.now_ns >= partition.until_ns
        {
            self.partition = None;
        }
        let partition = self.faults.partition_percent_per_second;
        if partition > 0
            && self.partition.is_none()
            && self.prng.below(1000) < partition
            && self.faulty_count() < self.f()
        {
            let replica = self.prng.below(u64::from(self.replica_count())) as u8;
            // Some last long enough for view changes to back off.
            let duration_max = if self.prng.chance(20) {
                8_000_000_000
            } else {
                2_000_000_000
            };
            let duration = 100_000_000 + self.prng.below(duration_max);
            let cut = if self.prng.chance(30) {
                Cut::Inbound
            } else {
                Cut::Both
            };
            self.cut(replica, cut, duration);
        }
    }

    /// Flips a byte in the body of a committed record of a running replica's journal, as bit
    /// rot would. Only bodies: a rotten header found at a restart, even of a record since
    /// replaced, makes the replica recover, and more of those than f at once is more than
    /// the cluster survives (docs/replica.md, known limits).
    fn corrupt_running(&mut self, index: usize) {
        let Node::Up(replica) = &mut self.nodes[index] else {
            return;
        };
        let low = replica.checkpoint_op() + 1;
        if replica.commit() < low {
            return;
        }
        let op = low + self.prng.below(replica.commit() - low + 1);
        let (Some(body_offset), Some(entry)) = (
            replica.journal_body_offset(op),
            self.committed.get(op as usize - 1),
        ) else {
            return;
        };
        if entry.body.is_empty() {
            return;
        }
        let offset = body_offset + self.prng.below(entry.body.len() as u64);
        replica.storage_mut().corrupt_byte(Zone::Journal, offset);
        self.scrub_pending[index] = Some(replica.scrub_tours_completed());
        self.corruptions_running += 1;
        self.trace_event(&format!(
            "corrupt running replica {index} journal byte {offset}"
        ));
    }

    /// A replica whose running journal was corrupted is whole again once a tour that started
    /// after the corruption finished and nothing it found awaits a peer's copy.
    fn clear_scrubbed(&mut self) {
        for (node, pending) in self.nodes.iter().zip(&mut self.scrub_pending) {
            match node {
                Node::Up(replica) => {
                    if pending.is_some_and(|tours| {
                        replica.scrub_tours_completed() > tours + 1
                            && replica.scrub_corrupt_ops() == 0
                    }) {
                        *pending = None;
                    }
                }
                // Its restart scans the journal: the corruption is found there.
                Node::Down { .. } => *pending = None,
            }
        }
    }

    /// Cuts `replica` off from the other replicas (clients still reach it) for `duration_ns`.
    pub fn cut(&mut self, replica: u8, cut: Cut, duration_ns: u64) {
        self.partition = Some(Partition {
            replica,
            until_ns: self.now_ns + duration_ns,
            cut,
        });
        self.trace_event(&format!(
            "partition replica {replica} ({cut:?}) for {} ms",
            duration_ns / 1_000_000
        ));
    }

    /// The view of each replica that is up.
    pub fn views(&self) -> Vec<Option<u64>> {
        self.nodes
            .iter()
            .map(|node| match node {
                Node::Up(replica) => Some(replica.view()),
                Node::Down { .. } => None,
            })
            .collect()
    }

    /// The replica that is up, normal and primary in the highest view, if any.
    pub fn primary(&self) -> Option<u8> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| match node {
                Node::Up(replica) if replica.is_primary() => Some((replica.view(), index as u8)),
                _ => None,
            })
            .max()
            .map(|(_, index)| index)
    }

    /// The highest commit of any replica that is up.
    pub fn commit_max(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|node| match node {
                Node::Up(replica) => Some(replica.commit()),
                Node::Down { .. } => None,
            })
            .max()
            .unwrap_or(0)
    }

    fn crash(&mut self, index: usize, kind: Crash) {
        let Node::Up(_) = &self.nodes[index] else {
            return;
        };
        self.trace_event(&format!("crash replica {index} ({kind:?})"));
        let restart_ns = self.now_ns + 50_000_000 + self.prng.below(3_000_000_000);
        let placeholder = Node::Down {
            storage: MemoryStorage::default(),
            restart_ns,
            replaced: false,
            permanent: false,
        };
        let Node::Up(replica) = std::mem::replace(&mut self.nodes[index], placeholder) else {
            unreachable!()
        };
        self.state_transfers += replica.state_transfers_installed();
        let mut storage = replica.into_storage();
        self.crashes += 1;
        if kind == Crash::Process {
            storage.crash_process();
            self.nodes[index] = Node::Down {
                storage,
                restart_ns,
                replaced: false,
                permanent: false,
            };
            return;
        }
        storage.crash_torn(&mut self.prng);
        // Losing or corrupting the only copy is not a fault any protocol survives.
        let has_peers = self.replica_count() > 1;
        if has_peers && self.prng.chance(self.faults.replace_on_crash_percent) {
            self.replacements += 1;
            self.nodes[index] = Node::Down {
                storage: MemoryStorage::default(),
                restart_ns,
                replaced: true,
                permanent: false,
            };
            return;
        }
        if has_peers && self.prng.chance(self.faults.corrupt_on_crash_percent) {
            let zone = match self.prng.below(10) {
                0..=6 => Zone::Journal,
                7 | 8 => Zone::Superblock,
                _ => Zone::Checkpoint(self.prng.below(u64::from(CHECKPOINT_SLOTS)) as u8),
            };
            let size = storage.durable_size(zone);
            if size > 0 {
                // One copy of the superblock at most: losing all four is not a fault VSR survives.
                let offset = match zone {
                    Zone::Superblock => self.prng.below(size.min(4096)),
                    Zone::Journal | Zone::Checkpoint(_) => self.prng.below(size),
                };
                storage.corrupt_byte(zone, offset);
                self.corruptions += 1;
                self.trace_event(&format!("corrupt replica {index} {zone:?} byte {offset}"));
            }
        }
        self.nodes[index] = Node::Down {
            storage,
            restart_ns,
            replaced: false,
            permanent: false,
        };
    }

    /// Crashes `replica` for good: it never restarts, not even when the run heals.
    pub fn crash_for_good(&mut self, replica: u8) {
        assert!(
            self.permanent_count() < self.f(),
            "at most f replicas are lost"
        );
        self.crash(replica as usize, Crash::PowerLoss);
        if let Node::Down {
            restart_ns,
            permanent,
            ..
        } = &mut self.nodes[replica as usize]
        {
            *restart_ns = u64::MAX;
            *permanent = true;
        }
        self.lost += 1;
        self.trace_event(&format!("replica {replica} is lost for good"));
    }

    fn permanent_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|node| {
                matches!(
                    node,
                    Node::Down {
                        permanent: true,
                        ..
                    }
                )
            })
            .count()
    }

    fn restart_due(&mut self) {
        for index in 0..self.nodes.len() {
            let due = matches!(&self.nodes[index], Node::Down { restart_ns, .. } if *restart_ns <= self.now_ns);
            if !due {
                continue;
            }
            let Node::Down {
                mut storage,
                replaced,
                ..
            } = std::mem::replace(
                &mut self.nodes[index],
                Node::Down {
                    storage: MemoryStorage::default(),
                    restart_ns: u64::MAX,
                    replaced: false,
                    permanent: false,
                },
            )
            else {
                unreachable!()
            };
            let config = Config {
                replica: index as u8,
                nonce_entropy: self.prng.next_u64(),
                ..self.config.clone()
            };
            if replaced {
                Replica::format(&config, &mut storage, true)
                    .unwrap_or_else(|error| panic!("replica {index} failed to format: {error}"));
                self.catch_up_commit[index] = self.commit_max();
                self.observed_commit[index] = 0;
            }
            let mut replica = Replica::open(config, storage, self.now_ns)
                .unwrap_or_else(|error| panic!("replica {index} failed to reopen: {error}"));
            replica.record_executed();
            let view_forgotten = replaced || replica.status() == Status::Recovering;
            self.online_checks.restarted(index as u8, view_forgotten);
            self.nodes[index] = Node::Up(Box::new(replica));
            self.trace_event(&format!("restart replica {index} (replaced: {replaced})"));
        }
    }

    fn random_operation(&mut self) -> Bytes {
        let key = Bytes::from(format!("k{}", self.prng.below(16)));
        let operation = match self.prng.below(10) {
            0..=5 => Operation::Put {
                key,
                value: Bytes::from(
                    (0..8 + self.prng.below(72))
                        .map(|_| self.prng.next_u64() as u8)
                        .collect::<Vec<u8>>(),
                ),
            },
            6..=8 => Operation::Get { key },
            _ => Operation::Delete { key },
        };
        operation.encode()
    }

    fn clients_send(&mut self) {
        for index in 0..self.clients.len() {
            let client = &mut self.clients[index].client;
            if client.has_pending() {
                if self.now_ns - self.clients[index].sent_ns > CLIENT_TIMEOUT_NS {
                    let frame = self.clients[index].client.retry().unwrap();
                    self.client_send(index, frame);
                }
            } else if !client.is_registered() {
                let frame = client.register();
                self.client_send(index, frame);
            } else if self.clients[index].requests_left > 0 {
                let operation = self.random_operation();
                let client = &mut self.clients[index];
                client.requests_left -= 1;
                client.operation = Some(operation.clone());
                let frame = client.client.request(operation);
                self.client_send(index, frame);
            }
        }
    }

    fn client_send(&mut self, index: usize, frame: Bytes) {
        self.clients[index].sent_ns = self.now_ns;
        let target = self.clients[index].client.target();
        self.enqueue(
            Source::Client(index as u64),
            Destination::Replica(target),
            frame,
        );
    }

    fn enqueue(&mut self, source: Source, destination: Destination, frame: Bytes) {
        if let (Some(partition), Source::Replica(from), Destination::Replica(to)) =
            (self.partition, source, destination)
        {
            let cut = match partition.cut {
                Cut::Both => from == partition.replica || to == partition.replica,
                Cut::Inbound => to == partition.replica,
            };
            if cut {
                return;
            }
        }
        if self.prng.chance(self.faults.loss_percent) {
            return;
        }
        let copies = if self.prng.chance(self.faults.duplicate_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.sequence += 1;
            let delay = 100_000 + self.prng.below(self.faults.delay_max_ns);
            self.network.push(InFlight {
                deliver_ns: self.now_ns + delay,
                sequence: self.sequence,
                source,
                destination,
                frame: frame.clone(),
            });
        }
    }

    fn deliver(&mut self, message: InFlight) {
        match message.destination {
            Destination::Replica(index) => {
                let Node::Up(replica) = &mut self.nodes[index as usize] else {
                    return;
                };
                match Message::decode(&message.frame, CLUSTER) {
                    Ok(decoded) => replica.on_message(self.now_ns, message.source, decoded),
                    Err(reason) => replica.on_rejected(reason, message.source),
                }
                self.flush(index);
            }
            Destination::Client(index) => self.client_receive(index as usize, &message.frame),
        }
    }

    fn flush(&mut self, index: u8) {
        // Rarely, the power fails in the middle of this flush.
        let power_cut = self.prng.below(100_000) < self.faults.crash_percent_per_second
            && self.faulty_count() < self.f().max(1);
        // A checkpointing flush syncs the journal, the checkpoint and the superblock; a cut after
        // all three lands before the journal's segments are deleted.
        let syncs_before_cut = self.prng.below(5) as u32;
        let Node::Up(replica) = &mut self.nodes[index as usize] else {
            return;
        };
        if power_cut {
            replica
                .storage_mut()
                .cut_power_after_syncs(syncs_before_cut);
        }
        let outgoing: Vec<Outgoing> = replica
            .flush(self.now_ns)
            .expect("memory storage does not fail");
        if replica.storage_mut().take_power_cut() {
            // The process died with the machine: nothing it was about to send leaves.
            self.power_cuts += 1;
            self.trace_event(&format!("power cut in a flush of replica {index}"));
            return self.crash(index as usize, Crash::PowerLoss);
        }
        let observation = Observation {
            replica: index,
            view: replica.view(),
            commit: replica.commit(),
            is_primary: replica.is_primary(),
            head_op: replica.op(),
            head_checksum: replica.head_checksum(),
        };
        self.online_checks.observe(self.now_ns, observation);
        for Outgoing { destination, frame } in outgoing {
            self.enqueue(Source::Replica(index), destination, frame);
        }
        self.observe_commits(index as usize);
    }

    /// Adds the ops `index` executed since last time to the committed log, or compares them
    /// with it, and checks that every executed op its checkpoint does not cover reads back
    /// from its journal.
    fn observe_commits(&mut self, index: usize) {
        let Node::Up(replica) = &mut self.nodes[index] else {
            return;
        };
        let executed = replica.take_executed();
        // Ops replayed when it opened, before anything was recorded, are in its journal.
        let replayed_until = executed
            .first()
            .map_or(replica.commit(), |entry| entry.op - 1);
        let replayed = (self.committed.len() as u64 + 1..=replayed_until)
            .map_while(|op| replica.committed_entry(op))
            .collect::<Vec<_>>();
        for entry in replayed.into_iter().chain(executed) {
            let op = entry.op;
            match self.committed.get(op as usize - 1) {
                Some(existing) if existing.checksum != entry.checksum => {
                    self.violations.push(format!(
                        "replica {index}: executed op {op} differs from another replica's"
                    ));
                }
                Some(_) => {}
                None if self.committed.len() as u64 == op - 1 => self.committed.push(entry),
                None => self.violations.push(format!(
                    "replica {index}: executed op {op} before anyone executed op {}",
                    self.committed.len() + 1
                )),
            }
        }
        // A record that does not read back at all may have rotted since it was written: the
        // scrubber repairs it, and `check` expects it back at the end.
        let from = self.observed_commit[index].max(replica.checkpoint_op()) + 1;
        for op in from..=replica.commit() {
            let durable = replica.committed_entry(op).map(|entry| entry.checksum);
            let expected = self
                .committed
                .get(op as usize - 1)
                .map(|entry| entry.checksum);
            if durable.is_some() && durable != expected {
                self.violations.push(format!(
                    "replica {index}: committed op {op} reads back as another entry"
                ));
            }
        }
        self.observed_commit[index] = self.observed_commit[index].max(replica.commit());
    }

    fn client_receive(&mut self, index: usize, frame: &[u8]) {
        let reply = Message::decode(frame, CLUSTER).expect("replicas send valid frames");
        let outcome = self.clients[index].client.on_reply(&reply);
        match outcome {
            ReplyOutcome::Done { op, result } => {
                let client = &mut self.clients[index];
                if let Some(operation) = client.operation.take() {
                    self.acknowledged.push(Acknowledged {
                        client_id: client.client.client_id(),
                        request_number: client.client.request_number(),
                        operation,
                        op,
                        result,
                    });
                }
            }
            ReplyOutcome::Redirect { .. } => {
                let frame = self.clients[index].client.pending_frame().unwrap();
                self.client_send(index, frame);
            }
            ReplyOutcome::Evicted => {
                let client_id = self.next_client_id;
                self.next_client_id += 1;
                let client = &mut self.clients[index];
                client.client.renew(client_id);
                client.operation = None;
            }
            ReplyOutcome::TooLarge => {
                let operation = self.clients[index].operation.take();
                assert!(
                    operation
                        .is_some_and(|operation| operation.len() > self.config.request_bytes_max),
                    "only an oversized request is refused as too large"
                );
            }
            ReplyOutcome::Ignore => {}
        }
    }

    /// Checks the run's safety properties; returns a description of the first violation.
    ///
    /// - Nothing `OnlineChecks` watched while the run went on was violated (one primary per
    ///   view, views and commits never going back).
    /// - Committed prefixes are identical on every replica.
    /// - Replaying the committed log through a model (state machine and client table) gives
    ///   exactly the result every client saw, at the op it was told: linearizable replies, no
    ///   acknowledged write lost, no request executed twice.
    pub fn check(&mut self) -> Result<(), String> {
        if let Some(violation) = self.online_checks.violation() {
            return Err(violation.to_string());
        }
        for index in 0..self.nodes.len() {
            self.observe_commits(index);
        }
        if let Some(violation) = self.violations.first() {
            return Err(violation.clone());
        }
        // Corruption found while running was repaired: every kept committed record reads back.
        for (index, node) in self.nodes.iter_mut().enumerate() {
            let Node::Up(replica) = node else {
                continue;
            };
            for op in replica.checkpoint_op() + 1..=replica.commit() {
                let durable = replica.committed_entry(op).map(|entry| entry.checksum);
                if durable
                    != self
                        .committed
                        .get(op as usize - 1)
                        .map(|entry| entry.checksum)
                {
                    return Err(format!(
                        "replica {index}: committed op {op} does not read back at the end"
                    ));
                }
            }
        }
        let mut model = KvStore::default();
        let mut sessions = ClientTable::new(self.config.client_sessions_max);
        let mut results: HashMap<(u64, u64), (u64, Bytes)> = HashMap::new();
        for entry in &self.committed {
            let op = &entry.op;
            let requests =
                decode_batch(&entry.body).map_err(|reason| format!("op {op}: batch {reason:?}"))?;
            for request in requests {
                if sessions.lookup(request.client_id, request.request_number) != Lookup::New {
                    continue;
                }
                let key = (request.client_id, request.request_number);
                if request.request_number == REGISTER_REQUEST_NUMBER {
                    sessions.record(request.client_id, request.request_number, *op, Bytes::new());
                    continue;
                }
                let result = model.execute(&request.operation).encode();
                sessions.record(
                    request.client_id,
                    request.request_number,
                    *op,
                    result.clone(),
                );
                if results.insert(key, (*op, result)).is_some() {
                    return Err(format!("request {key:?} executed twice"));
                }
            }
        }
        // Checkpoints and replays rebuilt the same state as executing every op once.
        let model_checksum = checksum(&encode_state(&model, &sessions));
        for (index, node) in self.nodes.iter().enumerate() {
            if let Node::Up(replica) = node
                && replica.commit() == self.committed.len() as u64
                && replica.state_checksum() != model_checksum
            {
                return Err(format!(
                    "replica {index}: state at op {} differs from the model's",
                    replica.commit()
                ));
            }
        }
        for acknowledged in &self.acknowledged {
            let key = (acknowledged.client_id, acknowledged.request_number);
            match results.get(&key) {
                None => {
                    return Err(format!(
                        "acknowledged request {key:?} (op {}) is not in the committed log",
                        acknowledged.op
                    ));
                }
                Some((op, result)) if (*op, result) != (acknowledged.op, &acknowledged.result) => {
                    return Err(format!(
                        "request {key:?}: client saw op {} result {:?}, log says op {op} result {result:?}",
                        acknowledged.op, acknowledged.result
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
