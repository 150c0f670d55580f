//! `vsr-bench`: drives a VSR cluster with many client sessions and measures what it saw.
//!
//! Its counts and latencies are the ground truth that vsrscope's metrics are checked against:
//! every acknowledged operation can be written to a file with its client-side latency, and
//! `--verify` reads every written key back to prove no acknowledged write was lost.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vsr::client::{Client, ReplyOutcome};
use vsr::kv::{Operation, OperationResult};
use vsr::message::Message;
use vsr::prng::Prng;
use vsr::runtime::parse_addresses;
use vsr::transport::{read_frame, spawn_writer};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Distribution {
    Uniform,
    /// Zipf with exponent 0.99: a few hot keys, as in YCSB.
    Zipf,
}

#[derive(Debug, Parser)]
#[command(version, about = "Load generator and checker for a VSR cluster")]
struct Arguments {
    /// Every replica's address, in replica order.
    #[arg(long)]
    addresses: String,
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    /// Concurrent client sessions, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// TCP connections to each replica that the sessions share.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Fixed target rate in operations per second; without it, closed loop (as fast as replies come).
    #[arg(long)]
    rate: Option<u64>,
    /// Stop issuing after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Stop issuing after this many operations (whichever comes first).
    #[arg(long)]
    ops: Option<u64>,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Percentage of operations that are gets; the rest are puts.
    #[arg(long, default_value_t = 0)]
    get_percent: u64,
    /// A request not answered within this time is resent to the next replica.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
    /// Write every acknowledged operation (client id, request number, op, latency) as CSV.
    #[arg(long)]
    record: Option<PathBuf>,
    /// After the load, read every written key back and check it holds the latest acknowledged value.
    #[arg(long)]
    verify: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("vsr-bench: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(arguments)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(error) => {
            eprintln!("vsr-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Register,
    Put { key: u64, value: Bytes },
    Get { key: u64 },
}

#[derive(Debug)]
struct Session {
    client: Client,
    group: usize,
    pending: Option<Pending>,
    /// When the operation should have started: its latency counts from here, so a saturated
    /// cluster cannot hide queueing delay (no coordinated omission).
    intended: Instant,
    sent: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Acknowledged {
    client_id: u64,
    request_number: u64,
    op: u64,
    latency_ns: u64,
    is_put: bool,
}

/// Writes per key: the acknowledged put with the highest op, and puts never acknowledged.
#[derive(Debug, Default)]
struct KeyHistory {
    latest_op: u64,
    latest_values: Vec<Bytes>,
    unacknowledged: Vec<Bytes>,
}

struct Connections {
    addresses: Vec<SocketAddr>,
    cluster: u64,
    writers: HashMap<(usize, u8), mpsc::Sender<Bytes>>,
    failed_at: HashMap<(usize, u8), Instant>,
    replies: mpsc::Sender<(usize, u8, Option<Message>)>,
}

impl Connections {
    async fn send(&mut self, group: usize, replica: u8, frame: Bytes) {
        let key = (group, replica);
        if !self.writers.contains_key(&key) {
            if self
                .failed_at
                .get(&key)
                .is_some_and(|at| at.elapsed() < Duration::from_millis(100))
            {
                return;
            }
            match TcpStream::connect(self.addresses[replica as usize]).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let (mut reader, writer) = stream.into_split();
                    self.writers.insert(key, spawn_writer(writer));
                    let (replies, cluster) = (self.replies.clone(), self.cluster);
                    tokio::spawn(async move {
                        while let Ok(message) = read_frame(&mut reader, cluster).await {
                            if replies.send((group, replica, Some(message))).await.is_err() {
                                return;
                            }
                        }
                        let _ = replies.send((group, replica, None)).await;
                    });
                }
                Err(_) => {
                    self.failed_at.insert(key, Instant::now());
                    return;
                }
            }
        }
        if let Some(writer) = self.writers.get(&key) {
            let _ = writer.try_send(frame);
        }
    }
}

struct Bench {
    arguments: Arguments,
    prng: Prng,
    zipf_cdf: Vec<f64>,
    sessions: Vec<Session>,
    by_client: HashMap<u64, usize>,
    next_client_id: u64,
    connections: Connections,
    acknowledged: Vec<Acknowledged>,
    history: HashMap<u64, KeyHistory>,
    issued: u64,
    retries: u64,
    evictions: u64,
    /// Requests the cluster refused as larger than its request limit: never executed.
    too_large: u64,
    verify_queue: Vec<u64>,
    verify_mismatches: Vec<String>,
    verified: u64,
    /// Set once the load is over and reads are checks, not load.
    verifying: bool,
}

async fn run(arguments: Arguments) -> anyhow::Result<bool> {
    let addresses = parse_addresses(&arguments.addresses)?;
    anyhow::ensure!(
        !addresses.is_empty() && addresses.len() < 256,
        "between 1 and 255 addresses"
    );
    anyhow::ensure!(
        arguments.clients > 0 && arguments.connections > 0,
        "--clients and --connections must be positive"
    );
    anyhow::ensure!(arguments.keys > 0, "--keys must be positive");
    anyhow::ensure!(
        arguments.get_percent <= 100,
        "--get-percent is a percentage"
    );
    anyhow::ensure!(
        arguments.value_bytes >= 16,
        "--value-bytes must be at least 16 (values carry their writer)"
    );
    anyhow::ensure!(
        arguments.value_bytes <= vsr::kv::VALUE_SIZE_MAX,
        "--value-bytes above {}",
        vsr::kv::VALUE_SIZE_MAX
    );
    anyhow::ensure!(arguments.rate != Some(0), "--rate must be positive");
    let (replies, mut inbox) = mpsc::channel(64 * 1024);
    let replica_count = addresses.len() as u8;
    let next_client_id = (u64::from(std::process::id()) << 32) | 1;
    let mut bench = Bench {
        prng: Prng::new(arguments.seed),
        zipf_cdf: zipf_cdf(arguments.keys, 0.99),
        sessions: Vec::new(),
        by_client: HashMap::new(),
        next_client_id,
        connections: Connections {
            addresses,
            cluster: arguments.cluster,
            writers: HashMap::new(),
            failed_at: HashMap::new(),
            replies,
        },
        acknowledged: Vec::new(),
        history: HashMap::new(),
        issued: 0,
        retries: 0,
        evictions: 0,
        too_large: 0,
        verify_queue: Vec::new(),
        verify_mismatches: Vec::new(),
        verified: 0,
        verifying: false,
        arguments,
    };
    let start = Instant::now();
    for index in 0..bench.arguments.clients {
        let client_id = bench.new_client_id();
        bench.by_client.insert(client_id, index);
        bench.sessions.push(Session {
            client: Client::new(bench.arguments.cluster, replica_count, client_id),
            group: index % bench.arguments.connections,
            pending: None,
            intended: start,
            sent: start,
        });
    }
    let load_end = start + Duration::from_secs_f64(bench.arguments.duration_s);
    bench.drive(&mut inbox, start, load_end, true).await;
    let load_elapsed = start.elapsed();
    bench.report(load_elapsed);
    bench.write_record()?;
    anyhow::ensure!(
        bench.too_large == 0,
        "the cluster refused {} requests as too large: --value-bytes {} exceeds the replicas' \
         --request-bytes-max",
        bench.too_large,
        bench.arguments.value_bytes
    );
    if bench.arguments.verify {
        bench.verify_queue = bench.history.keys().copied().collect();
        bench.verifying = true;
        let verify_start = Instant::now();
        bench
            .drive(
                &mut inbox,
                verify_start,
                verify_start + Duration::from_secs(120),
                false,
            )
            .await;
        let unverified = bench.verify_queue.len() as u64
            + bench
                .sessions
                .iter()
                .filter(|s| s.pending.is_some())
                .count() as u64;
        println!(
            "verify: {} keys read back, {} mismatches, {} not read",
            bench.verified,
            bench.verify_mismatches.len(),
            unverified
        );
        for mismatch in bench.verify_mismatches.iter().take(10) {
            println!("verify: {mismatch}");
        }
        return Ok(bench.verify_mismatches.is_empty() && unverified == 0);
    }
    Ok(true)
}

impl Bench {
    fn new_client_id(&mut self) -> u64 {
        let id = self.next_client_id;
        self.next_client_id += 1;
        id
    }

    fn load_budget_left(&self, now: Instant, load_end: Instant) -> bool {
        now < load_end && self.arguments.ops.is_none_or(|ops| self.issued < ops)
    }

    /// Issues operations until the phase ends, then waits for the ones in flight.
    async fn drive(
        &mut self,
        inbox: &mut mpsc::Receiver<(usize, u8, Option<Message>)>,
        start: Instant,
        end: Instant,
        load: bool,
    ) {
        let drain_deadline = Duration::from_secs(10);
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        loop {
            let now = Instant::now();
            let issuing = if load {
                self.load_budget_left(now, end)
            } else {
                !self.verify_queue.is_empty() && now < end
            };
            let in_flight = self
                .sessions
                .iter()
                .any(|session| session.pending.is_some());
            if !issuing && !in_flight {
                return;
            }
            if !issuing && now > end.max(start) + drain_deadline {
                return;
            }
            self.issue(start, now, issuing, load).await;
            self.resend_timed_out(now).await;
            tokio::select! {
                reply = inbox.recv() => {
                    let mut next = reply;
                    while let Some((group, replica, message)) = next.take() {
                        self.on_reply(group, replica, message).await;
                        next = inbox.try_recv().ok();
                    }
                }
                _ = ticker.tick() => {}
            }
        }
    }

    async fn issue(&mut self, start: Instant, now: Instant, issuing: bool, load: bool) {
        for index in 0..self.sessions.len() {
            if self.sessions[index].pending.is_some() {
                continue;
            }
            if !self.sessions[index].client.is_registered() {
                let frame = self.sessions[index].client.register();
                self.sessions[index].pending = Some(Pending::Register);
                self.send(index, now, now, frame).await;
                continue;
            }
            if !issuing {
                continue;
            }
            let intended = match (load, self.arguments.rate) {
                (true, Some(rate)) => {
                    let intended =
                        start + Duration::from_secs_f64(self.issued as f64 / rate as f64);
                    if intended > now {
                        return;
                    }
                    intended
                }
                _ => now,
            };
            let pending = if load {
                self.next_operation()
            } else {
                match self.verify_queue.pop() {
                    Some(key) => Pending::Get { key },
                    None => return,
                }
            };
            let operation = match &pending {
                Pending::Put { key, value } => Operation::Put {
                    key: key_bytes(*key),
                    value: value.clone(),
                },
                Pending::Get { key } => Operation::Get {
                    key: key_bytes(*key),
                },
                Pending::Register => unreachable!("registration is issued above"),
            };
            if load {
                self.issued += 1;
            }
            let frame = self.sessions[index].client.request(operation.encode());
            self.sessions[index].pending = Some(pending);
            self.send(index, intended, now, frame).await;
            if load
                && !self.load_budget_left(
                    now,
                    start + Duration::from_secs_f64(self.arguments.duration_s),
                )
            {
                return;
            }
        }
    }

    fn next_operation(&mut self) -> Pending {
        let key = match self.arguments.distribution {
            Distribution::Uniform => self.prng.below(self.arguments.keys),
            Distribution::Zipf => {
                let sample = (self.prng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                self.zipf_cdf.partition_point(|p| *p < sample) as u64
            }
        };
        if self.prng.below(100) < self.arguments.get_percent {
            return Pending::Get { key };
        }
        let mut value = vec![0u8; self.arguments.value_bytes];
        value[..8].copy_from_slice(&self.next_client_id.to_le_bytes());
        value[8..16].copy_from_slice(&self.issued.to_le_bytes());
        Pending::Put {
            key,
            value: Bytes::from(value),
        }
    }

    async fn send(&mut self, index: usize, intended: Instant, now: Instant, frame: Bytes) {
        let session = &mut self.sessions[index];
        session.intended = intended;
        session.sent = now;
        let (group, target) = (session.group, session.client.target());
        self.connections.send(group, target, frame).await;
    }

    async fn resend_timed_out(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.arguments.timeout_ms);
        for index in 0..self.sessions.len() {
            let session = &mut self.sessions[index];
            if session.pending.is_none() || now.duration_since(session.sent) < timeout {
                continue;
            }
            let Some(frame) = session.client.retry() else {
                continue;
            };
            session.sent = now;
            self.retries += 1;
            let (group, target) = (session.group, session.client.target());
            self.connections.send(group, target, frame).await;
        }
    }

    async fn on_reply(&mut self, group: usize, replica: u8, message: Option<Message>) {
        let Some(message) = message else {
            self.connections.writers.remove(&(group, replica));
            return;
        };
        let Some(&index) = self.by_client.get(&message.header.client_id) else {
            return;
        };
        let outcome = self.sessions[index].client.on_reply(&message);
        match outcome {
            ReplyOutcome::Done { op, result } => self.on_done(index, op, result),
            ReplyOutcome::Redirect { target } => {
                if let Some(frame) = self.sessions[index].client.pending_frame() {
                    let group = self.sessions[index].group;
                    self.sessions[index].sent = Instant::now();
                    self.connections.send(group, target, frame).await;
                }
            }
            ReplyOutcome::Evicted => {
                self.evictions += 1;
                if let Some(Pending::Put { key, value }) = self.sessions[index].pending.take() {
                    self.history
                        .entry(key)
                        .or_default()
                        .unacknowledged
                        .push(value);
                }
                let old_id = self.sessions[index].client.client_id();
                self.by_client.remove(&old_id);
                let new_id = self.new_client_id();
                self.by_client.insert(new_id, index);
                self.sessions[index].client.renew(new_id);
            }
            ReplyOutcome::TooLarge => {
                // Refused before it was prepared: the key's history does not change.
                self.too_large += 1;
                self.sessions[index].pending = None;
            }
            ReplyOutcome::Ignore => {}
        }
    }

    fn on_done(&mut self, index: usize, op: u64, result: Bytes) {
        let session = &mut self.sessions[index];
        let latency_ns = session.intended.elapsed().as_nanos() as u64;
        let (client_id, request_number) =
            (session.client.client_id(), session.client.request_number());
        match session.pending.take() {
            Some(Pending::Register) | None => {}
            Some(Pending::Put { key, value }) => {
                let history = self.history.entry(key).or_default();
                if op > history.latest_op {
                    history.latest_op = op;
                    history.latest_values.clear();
                }
                if op == history.latest_op {
                    history.latest_values.push(value);
                }
                self.acknowledged.push(Acknowledged {
                    client_id,
                    request_number,
                    op,
                    latency_ns,
                    is_put: true,
                });
            }
            Some(Pending::Get { key }) if self.verifying => self.check_read(key, result),
            Some(Pending::Get { .. }) => {
                self.acknowledged.push(Acknowledged {
                    client_id,
                    request_number,
                    op,
                    latency_ns,
                    is_put: false,
                });
            }
        }
    }

    fn check_read(&mut self, key: u64, result: Bytes) {
        self.verified += 1;
        let Some(history) = self.history.get(&key) else {
            return;
        };
        let value = match OperationResult::decode(&result) {
            Some(OperationResult::Value(value)) => value,
            _ => None,
        };
        // Unacknowledged puts may or may not have executed; a key only they wrote may be absent.
        let acceptable = match &value {
            Some(value) => {
                history.latest_values.contains(value) || history.unacknowledged.contains(value)
            }
            None => history.latest_values.is_empty(),
        };
        if !acceptable {
            self.verify_mismatches.push(format!(
                "key {key}: read {:?}, latest acknowledged write was at op {}",
                value.map(|value| value.len()),
                history.latest_op
            ));
        }
    }

    fn report(&self, elapsed: Duration) {
        let mut latencies: Vec<u64> = self.acknowledged.iter().map(|ack| ack.latency_ns).collect();
        latencies.sort_unstable();
        let quantile = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            latencies[rank - 1] as f64 / 1e6
        };
        let acknowledged = self.acknowledged.len() as u64;
        let puts = self.acknowledged.iter().filter(|ack| ack.is_put).count();
        let throughput = acknowledged as f64 / elapsed.as_secs_f64();
        let unacknowledged = self
            .sessions
            .iter()
            .filter(|session| {
                matches!(
                    session.pending,
                    Some(Pending::Put { .. } | Pending::Get { .. })
                )
            })
            .count();
        println!(
            "vsr-bench: {} clients, {:.1} s",
            self.arguments.clients,
            elapsed.as_secs_f64()
        );
        println!("  acknowledged   {acknowledged} ({puts} puts)");
        println!("  throughput     {throughput:.0} ops/s");
        println!(
            "  latency ms     p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}",
            quantile(0.50),
            quantile(0.95),
            quantile(0.99),
            quantile(1.0)
        );
        println!(
            "  retries {}  evictions {}  unacknowledged {unacknowledged}",
            self.retries, self.evictions
        );
        println!(
            "result: acknowledged={acknowledged} puts={puts} throughput_ops_s={throughput:.1} p50_ms={:.3} p95_ms={:.3} p99_ms={:.3} max_ms={:.3} retries={} evictions={} unacknowledged={unacknowledged}",
            quantile(0.50),
            quantile(0.95),
            quantile(0.99),
            quantile(1.0),
            self.retries,
            self.evictions
        );
    }

    fn write_record(&self) -> anyhow::Result<()> {
        let Some(path) = &self.arguments.record else {
            return Ok(());
        };
        let file =
            std::fs::File::create(path).with_context(|| format!("--record {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "client_id,request_number,op,latency_ns,kind")?;
        for ack in &self.acknowledged {
            let kind = if ack.is_put { "put" } else { "get" };
            writeln!(
                out,
                "{},{},{},{},{kind}",
                ack.client_id, ack.request_number, ack.op, ack.latency_ns
            )?;
        }
        out.flush()?;
        Ok(())
    }
}

fn key_bytes(key: u64) -> Bytes {
    Bytes::from(format!("key-{key:012}"))
}

fn zipf_cdf(keys: u64, exponent: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=keys)
        .map(|rank| 1.0 / (rank as f64).powf(exponent))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut running = 0.0;
    weights
        .into_iter()
        .map(|weight| {
            running += weight / total;
            running
        })
        .collect()
}
