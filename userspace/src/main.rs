//! `vsrscope`: look inside running VSR replicas through their USDT probes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use vsrscope::attach::{SEED_BOUNDS_MS, Tracer};
use vsrscope::liveness::{Liveness, STALE_MARGIN, clock_ns};
use vsrscope::metrics::{
    ExporterState, Family, HISTOGRAMS, Published, PushCounts, QuantileWindow, Reading, Resources,
    families,
};
use vsrscope::otlp::{OtlpEncoder, OtlpExporter, OtlpFlags, OtlpSettings, ReplicaProcess};
use vsrscope::statsd::StatsdEncoder;
use vsrscope::web::{Endpoint, Scrape, WebConfig};
use vsrscope::{build_info, privileges, process, usdt};
use vsrscope_common::histogram::BOUNDS_MAX;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Attach to running VSR replicas through their USDT probes and export their metrics"
)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Targets {
    /// Attach to this process (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Attach to every process running this binary, now and later.
    #[arg(long = "binary")]
    binaries: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct StatsdArgs {
    /// Also push every metric to this StatsD server (UDP HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    statsd: Option<SocketAddr>,
    /// Prepended to every StatsD name.
    #[arg(long, default_value = "", requires = "statsd")]
    statsd_prefix: String,
    /// Seconds between StatsD flushes.
    #[arg(long, default_value_t = 10, requires = "statsd")]
    statsd_interval_s: u64,
    /// Send labels as DogStatsD tags (`|#replica_id:0`) instead of name segments.
    #[arg(long, requires = "statsd")]
    statsd_tags: bool,
}

/// Unset options fall back to the standard OTEL_* environment variables (docs/exporting.md).
#[derive(Debug, clap::Args)]
struct OtlpArgs {
    /// Also push every metric to this OTLP receiver, e.g. an OpenTelemetry Collector at
    /// http://localhost:4317 (or OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// grpc (default) or http/protobuf (or OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long, value_name = "PROTOCOL")]
    otlp_protocol: Option<String>,
    /// Seconds between exports [default: 10, or OTEL_METRIC_EXPORT_INTERVAL in ms].
    #[arg(long, value_name = "SECONDS")]
    otlp_interval_s: Option<u64>,
    /// A header sent with every export, e.g. for authentication (repeatable; or
    /// OTEL_EXPORTER_OTLP_HEADERS).
    #[arg(long = "otlp-header", value_name = "K=V")]
    otlp_headers: Vec<String>,
    /// none (default) or gzip (or OTEL_EXPORTER_OTLP_COMPRESSION).
    #[arg(long, value_name = "none|gzip")]
    otlp_compression: Option<String>,
    /// For https:// endpoints: PEM certificates to trust besides the system's (or
    /// OTEL_EXPORTER_OTLP_CERTIFICATE).
    #[arg(long, value_name = "PATH")]
    otlp_ca_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; its size costs nothing"
)]
enum Command {
    /// List the probes of a binary or a running process: sites, semaphores, arguments.
    List {
        #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
        binary: Option<PathBuf>,
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Attach and serve the metrics on /metrics (default: every running vsr-replica).
    Serve {
        #[command(flatten)]
        targets: Targets,
        /// Where /metrics, /-/healthy and /-/ready are served.
        #[arg(
            long,
            visible_alias = "web.listen-address",
            default_value = "127.0.0.1:9464"
        )]
        listen: SocketAddr,
        /// TLS and basic authentication for the endpoint: the YAML file of Prometheus
        /// exporters (exporter-toolkit), see docs/exporting.md.
        #[arg(long = "web.config.file", value_name = "PATH")]
        web_config_file: Option<PathBuf>,
        /// Quantile gauges (_p50, _p95, _p99) cover this many seconds.
        #[arg(long, default_value_t = 60)]
        quantile_window_s: u64,
        /// The replicas' --snapshot-interval-ms: a replica whose newest snapshot is older than
        /// this plus 1 s is reported down (vsr_replica_up 0), as is one whose process is gone.
        #[arg(long, default_value_t = 500)]
        snapshot_interval_ms: u64,
        /// Attach only while scrapes keep coming: at the first scrape, and detach after
        /// --idle-timeout-s without one. Counters stay monotonic across re-attach.
        #[arg(long)]
        on_demand: bool,
        /// Seconds without a scrape before detaching; fractions allowed (0.5).
        #[arg(long, default_value_t = 60.0, requires = "on_demand", value_parser = idle_timeout)]
        idle_timeout_s: f64,
        /// Replace a histogram's bucket bounds: METRIC=B1,B2,… in milliseconds (repeatable).
        #[arg(long = "buckets", value_name = "METRIC=BOUNDS")]
        buckets: Vec<String>,
        /// Export each program's run count and run time from the kernel's statistics, which
        /// adds two clock reads to every probe hit.
        #[arg(long)]
        program_run_time: bool,
        #[command(flatten)]
        statsd: StatsdArgs,
        #[command(flatten)]
        otlp: OtlpArgs,
    },
    /// Attach, wait for one state snapshot from each replica, print it, detach.
    Snapshot {
        #[command(flatten)]
        targets: Targets,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Give up on replicas that publish no snapshot within this time.
        #[arg(long, default_value_t = 3)]
        wait_s: u64,
    },
    /// Print a completion script for a shell, e.g. `vsrscope completions bash >
    /// /usr/share/bash-completion/completions/vsrscope`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages from these definitions: vsrscope.1 and one per command (vsrscope-serve.1, …).
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// A live view per replica, refreshed in place every second; Ctrl-C to quit.
    Top {
        #[command(flatten)]
        targets: Targets,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
    },
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    // Die quietly on a closed pipe (`vsrscope list … | head`), like other command-line tools.
    // Not `serve`: Rust writes to sockets with write(2), so a scraper or TLS client that hangs
    // up while vsrscope writes to it would kill it with SIGPIPE instead of failing that write.
    if !matches!(arguments.command, Command::Serve { .. }) {
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match arguments.command {
        Command::List { binary, pid } => list(binary, pid),
        Command::Serve {
            targets,
            listen,
            web_config_file,
            quantile_window_s,
            snapshot_interval_ms,
            on_demand,
            idle_timeout_s,
            buckets,
            program_run_time,
            statsd,
            otlp,
        } => bounds_ms(&buckets).and_then(|bounds_ms| {
            anyhow::ensure!(
                statsd.statsd_interval_s > 0,
                "--statsd-interval-s must be at least 1"
            );
            anyhow::ensure!(
                otlp.otlp_interval_s != Some(0),
                "--otlp-interval-s must be at least 1"
            );
            let flags = OtlpFlags {
                endpoint: otlp.otlp_endpoint,
                protocol: otlp.otlp_protocol,
                headers: otlp.otlp_headers,
                interval: otlp.otlp_interval_s.map(Duration::from_secs),
                compression: otlp.otlp_compression,
                ca_file: otlp.otlp_ca_file,
            };
            let otlp = OtlpSettings::resolve(&flags, |name| std::env::var(name).ok())?;
            // Pushes do not count as demand: with --on-demand they would carry totals frozen at
            // the last scrape, or nothing at all before the first.
            anyhow::ensure!(
                !(on_demand && (otlp.is_some() || statsd.statsd.is_some())),
                "--on-demand attaches only while /metrics is scraped; it cannot be combined with \
                 pushing to OTLP or StatsD"
            );
            let web = match web_config_file {
                Some(path) => WebConfig::load(&path)?,
                None => WebConfig::default(),
            };
            let options = ServeOptions {
                listen,
                web,
                window: Duration::from_secs(quantile_window_s),
                stale_after: Duration::from_millis(snapshot_interval_ms) + STALE_MARGIN,
                idle_timeout: on_demand.then(|| Duration::from_secs_f64(idle_timeout_s)),
                bounds_ms,
                program_run_time,
                statsd: statsd.statsd.map(|address| StatsdOptions {
                    address,
                    encoder: StatsdEncoder::new(&statsd.statsd_prefix, statsd.statsd_tags),
                    interval: Duration::from_secs(statsd.statsd_interval_s),
                }),
                otlp,
            };
            serve(&targets, options)
        }),
        Command::Snapshot {
            targets,
            json,
            wait_s,
        } => snapshot(&targets, json, Duration::from_secs(wait_s)),
        Command::Top {
            targets,
            iterations,
        } => top(&targets, iterations),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Arguments::command(),
                "vsrscope",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out_dir } => man_pages(&out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vsrscope: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn man_pages(out_dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    clap_mangen::generate_to(Arguments::command(), out_dir)
        .with_context(|| format!("cannot write man pages into {}", out_dir.display()))?;
    println!("man pages written to {}", out_dir.display());
    Ok(())
}

/// `--idle-timeout-s`: a positive, finite number of seconds.
fn idle_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds < 1e9 => Ok(seconds),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn list(binary: Option<PathBuf>, pid: Option<u32>) -> anyhow::Result<()> {
    let binary = match (binary, pid) {
        (Some(binary), _) => binary,
        (None, Some(pid)) => process::executable(pid)?,
        (None, None) => bail!("give --binary or --pid"),
    };
    let discovery = usdt::discover_file(&binary)?;
    if discovery.sites.is_empty() {
        bail!(
            "{}: no USDT probes (.note.stapsdt is missing or empty)",
            binary.display()
        );
    }
    let base = pid.map(process::load_base).transpose()?;
    println!(
        "{}: {} sites, {} dead notes",
        binary.display(),
        discovery.sites.len(),
        discovery.dead_notes.len()
    );
    for dead in &discovery.dead_notes {
        println!(
            "dead note {}:{} at {:#x}: {}, not attached",
            dead.provider, dead.name, dead.address, dead.reason
        );
    }
    println!(
        "{:<28} {:>12} {:>12} {:>10} {:>9}  arguments",
        "probe", "address", "file offset", "semaphore", "enabled"
    );
    for site in &discovery.sites {
        let enabled = match (pid, base) {
            (Some(pid), Some(base)) if site.semaphore_address != 0 => {
                process::read_semaphore(pid, base + site.semaphore_address)?.to_string()
            }
            _ => "-".into(),
        };
        println!(
            "{:<28} {:>#12x} {:>#12x} {:>#10x} {:>9}  {}",
            format!("{}:{}", site.provider, site.name),
            site.address,
            site.file_offset,
            site.semaphore_offset,
            enabled,
            site.arguments_text
        );
    }
    Ok(())
}

fn seed_bounds_ms() -> Vec<Vec<f64>> {
    SEED_BOUNDS_MS
        .iter()
        .map(|bounds| bounds.to_vec())
        .collect()
}

/// The seed's bounds, with `--buckets METRIC=B1,B2,…` (milliseconds) replacing some.
fn bounds_ms(overrides: &[String]) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut bounds = seed_bounds_ms();
    for option in overrides {
        let (metric, list) = option
            .split_once('=')
            .with_context(|| format!("--buckets {option:?}: expected METRIC=B1,B2,…"))?;
        let names = HISTOGRAMS.map(|(name, _)| name);
        let index = names
            .iter()
            .position(|name| *name == metric)
            .with_context(|| format!("--buckets: {metric} is not one of {}", names.join(", ")))?;
        let values: Vec<f64> = list
            .split(',')
            .map(|value| {
                value
                    .trim()
                    .parse::<f64>()
                    .with_context(|| format!("--buckets {metric}: {value:?} is not a number"))
            })
            .collect::<anyhow::Result<_>>()?;
        let increasing = values.windows(2).all(|pair| pair[0] < pair[1]);
        if values.is_empty() || values.len() > BOUNDS_MAX || !increasing || values[0] <= 0.0 {
            bail!(
                "--buckets {metric}: give 1 to {BOUNDS_MAX} positive, strictly increasing bounds in milliseconds"
            );
        }
        bounds[index] = values;
    }
    Ok(bounds)
}

/// What to attach to: each binary, with the one process to limit it to (or all of them).
type Plan = Vec<(PathBuf, Option<u32>)>;

/// Resolves the targets: pids to their executables, binaries to canonical paths, and by default
/// every distinct executable of the running vsr-replica processes.
fn plan(targets: &Targets) -> anyhow::Result<Plan> {
    let mut plan: Plan = Vec::new();
    for pid in &targets.pids {
        plan.push((process::executable(*pid)?, Some(*pid)));
    }
    for binary in &targets.binaries {
        if !binary.exists() {
            bail!("{}: no such file", binary.display());
        }
        plan.push((binary.canonicalize()?, None));
    }
    if plan.is_empty() {
        let pids = process::find_by_name("vsr-replica");
        if pids.is_empty() {
            bail!(
                "no running vsr-replica found (another user's are seen only with CAP_SYS_PTRACE); \
                 give --pid or --binary"
            );
        }
        let mut binaries: Vec<PathBuf> = pids
            .iter()
            .filter_map(|pid| process::executable(*pid).ok())
            .collect();
        binaries.sort();
        binaries.dedup();
        plan.extend(binaries.into_iter().map(|binary| (binary, None)));
    }
    Ok(plan)
}

/// Attaches to every target of the plan; returns what it attached to, for the log.
fn attach_plan(tracer: &mut Tracer, plan: &Plan) -> anyhow::Result<Vec<String>> {
    let mut described = Vec::new();
    for (binary, pid) in plan {
        let (binary, pid) = (binary.as_path(), *pid);
        let discovery = usdt::discover_file(binary)?;
        let sites = tracer.attach(binary, &discovery, pid)?;
        described.push(match pid {
            Some(pid) => format!("pid {pid} ({}, {sites} sites)", binary.display()),
            None => format!("{} (all processes, {sites} sites)", binary.display()),
        });
    }
    Ok(described)
}

/// Loads the programs and attaches to the targets.
fn attach(targets: &Targets) -> anyhow::Result<(Tracer, Vec<String>)> {
    let plan = plan(targets)?;
    let mut tracer = Tracer::load(&seed_bounds_ms(), false)?;
    let described = attach_plan(&mut tracer, &plan)?;
    Ok((tracer, described))
}

/// Per-process counters from /proc, for rates between two samples of the same process.
#[derive(Debug, Clone, Copy)]
struct ProcessSample {
    at: Instant,
    /// The process sampled: its pid and start since boot.
    process: (u32, u64),
    cpu_ticks: u64,
    write_bytes: u64,
    journal_writes: u64,
    network_bytes: u64,
}

/// Samples the process holding `pid` if `is_publisher(its start since boot)`, else nothing.
fn sample_process(
    pid: u32,
    is_publisher: impl Fn(u64) -> bool,
    journal_writes: u64,
    network_bytes: u64,
) -> Option<(ProcessSample, u64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let write_bytes = io
        .lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())?;
    // Read last: a pid never returns to an earlier process, so if it still belongs to the
    // publisher here, the files above were the publisher's too.
    let fields = process::stat_fields(pid).ok()?;
    let started_ns = fields.get(process::START_TICKS)? * process::tick_ns();
    if !is_publisher(started_ns) {
        return None;
    }
    let cpu_ticks = fields.get(11)? + fields.get(12)?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let sample = ProcessSample {
        at: Instant::now(),
        process: (pid, started_ns),
        cpu_ticks,
        write_bytes,
        journal_writes,
        network_bytes,
    };
    Some((sample, resident_pages * page_size))
}

fn resources(previous: &ProcessSample, current: &ProcessSample, memory_bytes: u64) -> Resources {
    let seconds = current
        .at
        .duration_since(previous.at)
        .as_secs_f64()
        .max(1e-3);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
    Resources {
        memory_bytes,
        cpu_percent: 100.0 * rate(current.cpu_ticks, previous.cpu_ticks) / ticks_per_second,
        disk_iops: rate(current.journal_writes, previous.journal_writes),
        disk_bytes_per_second: rate(current.write_bytes, previous.write_bytes),
        network_bytes_per_second: rate(current.network_bytes, previous.network_bytes),
    }
}

struct Shared {
    tracer: Tracer,
    plan: Plan,
    /// With `--on-demand`: detach after this long without a scrape.
    idle_timeout: Option<Duration>,
    last_scrape: Instant,
    bounds_ms: Vec<Vec<f64>>,
    window: QuantileWindow,
    /// A replica whose newest snapshot is older than this is down.
    stale_after: Duration,
    /// When the tracer last attached (`CLOCK_MONOTONIC`).
    attached_ns: u64,
    /// Every replica that ever published a snapshot, and whether it is up.
    up: BTreeMap<u32, bool>,
    samples: BTreeMap<u32, ProcessSample>,
    resources: BTreeMap<u32, Resources>,
    state: ExporterState,
}

impl Shared {
    /// Attaches if detached (on-demand mode); the maps, and so every counter, persist across
    /// detach and re-attach. A failed attach leaves nothing attached, so the next scrape tries
    /// every target again, and is exported (`vsrscope_attach_failing`): counters that stopped
    /// moving must not pass for an idle cluster.
    fn ensure_attached(&mut self) -> anyhow::Result<()> {
        if self.tracer.attached_sites() > 0 {
            return Ok(());
        }
        match attach_plan(&mut self.tracer, &self.plan) {
            Ok(targets) => {
                for target in targets {
                    eprintln!("vsrscope: attached to {target}");
                }
                self.attached_ns = clock_ns(libc::CLOCK_MONOTONIC);
                self.state.attach_failing = false;
            }
            Err(error) => {
                self.tracer.detach_all();
                self.state.attach_failures += 1;
                self.state.attach_failing = true;
                self.state.attached_sites = 0;
                return Err(error);
            }
        }
        self.state.attached_sites = self.tracer.attached_sites();
        Ok(())
    }

    /// On-demand mode: when the current scrape-free stretch reaches `timeout`, or, once it has,
    /// a timeout from now.
    fn idle_check_due(&self, timeout: Duration) -> Instant {
        let due = self.last_scrape + timeout;
        let now = Instant::now();
        if due > now { due } else { now + timeout }
    }

    /// On-demand mode: detach once scrapes stopped, so unobserved replicas run at detached speed.
    fn detach_if_idle(&mut self) {
        let idle = self
            .idle_timeout
            .is_some_and(|timeout| self.last_scrape.elapsed() >= timeout);
        if idle && self.tracer.attached_sites() > 0 {
            self.tracer.detach_all();
            self.state.attached_sites = 0;
            eprintln!(
                "vsrscope: no scrape for {:?}: detached",
                self.idle_timeout.unwrap()
            );
        }
    }

    fn families(&self, reading: &Reading) -> Vec<Family> {
        let mut families = families(
            reading,
            &self.window,
            &self.bounds_ms,
            &self.up,
            &self.resources,
            &self.state,
        );
        families.push(build_info::family());
        families
    }

    /// Reads the maps; keeps the quantile window, liveness and the resource rates current. The
    /// reading keeps only the snapshots of replicas that are up.
    fn sample(&mut self) -> Option<Reading> {
        let mut reading = match Reading::read(self.tracer.ebpf()) {
            Ok(reading) => reading,
            Err(error) => {
                self.state.map_read_errors += 1;
                eprintln!("vsrscope: {error}");
                return None;
            }
        };
        let now = Instant::now();
        self.window.record(now, &reading);
        self.state.program_run_time = self
            .tracer
            .program_stats()
            .into_iter()
            .map(|(program, runs, time)| (program, runs, time.as_secs_f64()))
            .collect();
        let liveness = Liveness::now(self.attached_ns, self.stale_after);
        for (replica, published) in &reading.snapshots {
            let started_ns = process::start_since_boot_ns(published.pid).ok();
            self.up
                .insert(*replica, liveness.is_up(published.published_ns, started_ns));
        }
        // A dead replica's last snapshot and resources must not pass for its current state.
        reading.snapshots.retain(|replica, _| self.up[replica]);
        self.samples
            .retain(|replica, _| reading.snapshots.contains_key(replica));
        self.resources
            .retain(|replica, _| reading.snapshots.contains_key(replica));
        for (replica, published) in &reading.snapshots {
            let journal_writes = reading
                .counters
                .get(replica)
                .map_or(0, |c| c[vsrscope_common::counter::JOURNAL_WRITES]);
            let Some((current, memory)) = sample_process(
                published.pid,
                |started_ns| liveness.published_by(published.published_ns, Some(started_ns)),
                journal_writes,
                published.snapshot.bytes_sent + published.snapshot.bytes_received,
            ) else {
                self.samples.remove(replica);
                self.resources.remove(replica);
                continue;
            };
            match self.samples.get(replica) {
                Some(previous) if previous.process == current.process => {
                    self.resources
                        .insert(*replica, resources(previous, &current, memory));
                }
                // A restarted replica: no rate spans two processes.
                _ => {
                    self.resources.remove(replica);
                }
            }
            self.samples.insert(*replica, current);
        }
        Some(reading)
    }
}

/// How `serve` exports.
struct ServeOptions {
    listen: SocketAddr,
    web: WebConfig,
    window: Duration,
    stale_after: Duration,
    idle_timeout: Option<Duration>,
    bounds_ms: Vec<Vec<f64>>,
    program_run_time: bool,
    statsd: Option<StatsdOptions>,
    otlp: Option<OtlpSettings>,
}

/// Where and how `serve` pushes to StatsD.
struct StatsdOptions {
    address: SocketAddr,
    encoder: StatsdEncoder,
    interval: Duration,
}

fn serve(targets: &Targets, options: ServeOptions) -> anyhow::Result<()> {
    let ServeOptions {
        listen,
        web,
        window,
        stale_after,
        idle_timeout,
        bounds_ms,
        program_run_time,
        statsd,
        otlp,
    } = options;
    // Kernel-map counters count from here: the start time of every cumulative OTLP series.
    let started_unix_ns = unix_now_ns();
    let plan = plan(targets)?;
    let tracer = Tracer::load(&bounds_ms, program_run_time)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Bound before capabilities are lowered: a port below 1024 needs CAP_NET_BIND_SERVICE.
    let listener = runtime
        .block_on(TcpListener::bind(listen))
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shared = Arc::new(Mutex::new(Shared {
        tracer,
        plan,
        idle_timeout,
        last_scrape: Instant::now(),
        bounds_ms,
        window: QuantileWindow::new(window),
        stale_after,
        attached_ns: clock_ns(libc::CLOCK_MONOTONIC),
        up: BTreeMap::new(),
        samples: BTreeMap::new(),
        resources: BTreeMap::new(),
        state: ExporterState::default(),
    }));
    // The attaching thread starts with every capability vsrscope was given and ends once
    // attached; this thread, and every thread it starts from here on, holds only what serving
    // still needs (privileges.rs).
    let attaching = idle_timeout
        .is_none()
        .then(|| attach_in_background(shared.clone()));
    let kept = privileges::keep_only(&privileges::needed_after_attach(idle_timeout.is_some()))?;
    runtime.block_on(async move {
        // Served while attaching: /-/healthy answers, /-/ready and /metrics say 503 until then.
        let endpoint = Arc::new(Endpoint::new(Scraper(shared.clone()), web));
        let scheme = endpoint.scheme();
        tokio::spawn(endpoint.clone().serve(listener));
        match attaching {
            Some(attaching) => {
                attaching.await?;
                eprintln!(
                    "vsrscope: capabilities kept after attaching: {}",
                    privileges::names(&kept)
                );
            }
            None => eprintln!(
                "vsrscope: on demand: attaching at the first scrape; capabilities kept: {}",
                privileges::names(&kept)
            ),
        }
        endpoint.set_ready();
        eprintln!("vsrscope: serving {scheme}://{listen}/metrics");
        let sampler = shared.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticker.tick().await;
                sampler.lock().unwrap().sample();
            }
        });
        if let Some(timeout) = idle_timeout {
            tokio::spawn(detach_when_idle(shared.clone(), timeout));
        }
        let (shutdown, shutdown_seen) = tokio::sync::watch::channel(false);
        let mut pushers = Vec::new();
        if let Some(statsd) = statsd {
            let local = if statsd.address.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let socket = tokio::net::UdpSocket::bind(local).await?;
            // Connected, so the kernel reports an ICMP "port unreachable" as a failed send, which
            // an unconnected socket never sees.
            socket
                .connect(statsd.address)
                .await
                .with_context(|| format!("StatsD address {}", statsd.address))?;
            eprintln!(
                "vsrscope: pushing to StatsD at {} every {:?}",
                statsd.address, statsd.interval
            );
            shared
                .lock()
                .unwrap()
                .state
                .pushes
                .insert(STATSD, PushCounts::default());
            pushers.push(tokio::spawn(push_statsd(
                statsd,
                socket,
                shared.clone(),
                shutdown_seen.clone(),
            )));
        }
        if let Some(settings) = otlp {
            let exporter = OtlpExporter::new(&settings)?;
            let encoder = OtlpEncoder::new(
                settings.resource.clone(),
                host_name(),
                std::process::id(),
                started_unix_ns,
            );
            eprintln!(
                "vsrscope: exporting OTLP ({:?}) to {} every {:?}",
                settings.protocol, settings.endpoint, settings.interval
            );
            shared
                .lock()
                .unwrap()
                .state
                .pushes
                .insert(OTLP, PushCounts::default());
            pushers.push(tokio::spawn(push_otlp(
                exporter,
                encoder,
                settings.interval,
                shared.clone(),
                shutdown_seen.clone(),
            )));
        }
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        // One last push each, so receivers get the final totals.
        let _ = shutdown.send(true);
        for pusher in pushers {
            let _ = tokio::time::timeout(Duration::from_secs(5), pusher).await;
        }
        shared.lock().unwrap().tracer.detach_all();
        eprintln!("vsrscope: detached");
        Ok(())
    })
}

/// Attaches on a thread of its own, so the endpoint answers meanwhile. The thread keeps the
/// capabilities it started with; the future resolves once it attached and exited, so no thread
/// holds them afterwards.
fn attach_in_background(
    shared: Arc<Mutex<Shared>>,
) -> impl std::future::Future<Output = anyhow::Result<()>> {
    let (done, attached) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let _ = done.send(shared.lock().unwrap().ensure_attached());
    });
    async move {
        let result = attached
            .await
            .context("the attaching thread ended without an answer")?;
        // It sent its last message: joining waits only for its exit.
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?;
        result
    }
}

/// On-demand mode: detaches as soon as `timeout` passed without a scrape, on its own timer so
/// a sub-second timeout is honoured.
async fn detach_when_idle(shared: Arc<Mutex<Shared>>, timeout: Duration) {
    loop {
        let due = shared.lock().unwrap().idle_check_due(timeout);
        tokio::time::sleep_until(due.into()).await;
        shared.lock().unwrap().detach_if_idle();
    }
}

const STATSD: &str = "statsd";
const OTLP: &str = "otlp";

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// When a push exporter pushes: every interval, and once more when `shutdown` turns true.
struct Schedule {
    ticker: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
    finished: bool,
}

impl Schedule {
    fn new(interval: Duration, shutdown: tokio::sync::watch::Receiver<bool>) -> Schedule {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        // A push that outlasts the interval (a slow receiver) delays the next; none pile up.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Schedule {
            ticker,
            shutdown,
            finished: false,
        }
    }

    /// Waits until the next push is due; false once the final push is done.
    async fn next(&mut self) -> bool {
        if self.finished {
            return false;
        }
        tokio::select! {
            _ = self.ticker.tick() => {}
            _ = self.shutdown.wait_for(|stop| *stop) => self.finished = true,
        }
        true
    }
}

/// Counts a push and whether it failed, for `vsrscope_push{es,_failures}_total`; logs failures
/// sparingly (the 1st, 2nd, 4th, 8th…).
fn record_push(shared: &Mutex<Shared>, exporter: &'static str, failure: Option<String>) {
    let failed = {
        let mut shared = shared.lock().unwrap();
        let counts = shared.state.pushes.entry(exporter).or_default();
        counts.attempted += 1;
        counts.failed += u64::from(failure.is_some());
        counts.failed
    };
    if let Some(reason) = failure
        && failed.is_power_of_two()
    {
        eprintln!("vsrscope: {exporter} push failed ({failed} so far): {reason}");
    }
}

/// Every interval, the metrics as StatsD datagrams. UDP is fire-and-forget: a StatsD server
/// that is down loses those flushes' increases, never the totals `/metrics` serves.
async fn push_statsd(
    mut statsd: StatsdOptions,
    socket: tokio::net::UdpSocket,
    shared: Arc<Mutex<Shared>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut schedule = Schedule::new(statsd.interval, shutdown);
    while schedule.next().await {
        let datagrams = {
            let mut shared = shared.lock().unwrap();
            let Some(reading) = shared.sample() else {
                continue;
            };
            statsd.encoder.datagrams(&shared.families(&reading))
        };
        let mut failure = None;
        for datagram in datagrams {
            if let Err(error) = socket.send(datagram.as_bytes()).await {
                failure = Some(format!("sending to {}: {error}", statsd.address));
            }
        }
        record_push(&shared, STATSD, failure);
    }
}

/// Every interval, the metrics as one OTLP export request of cumulative totals; a failed
/// export is retried until the next is due, then dropped (the next carries newer totals).
async fn push_otlp(
    mut exporter: OtlpExporter,
    encoder: OtlpEncoder,
    interval: Duration,
    shared: Arc<Mutex<Shared>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut schedule = Schedule::new(interval, shutdown);
    while schedule.next().await {
        let request = {
            let mut shared = shared.lock().unwrap();
            let Some(reading) = shared.sample() else {
                continue;
            };
            let replicas = reading
                .snapshots
                .iter()
                .filter_map(|(replica, Published { pid, .. })| {
                    let started_unix_ns = process::start_time_unix_ns(*pid).ok()?;
                    Some((
                        *replica,
                        ReplicaProcess {
                            pid: *pid,
                            started_unix_ns,
                        },
                    ))
                })
                .collect();
            encoder.request(&shared.families(&reading), &replicas, unix_now_ns())
        };
        let outcome = exporter.export(&request, Instant::now() + interval).await;
        record_push(&shared, OTLP, outcome.err().map(|error| error.to_string()));
    }
}

/// `/metrics` of `serve`: attaches first in on-demand mode, reads the maps, times the scrape.
struct Scraper(Arc<Mutex<Shared>>);

impl Scrape for Scraper {
    fn scrape(&self) -> Option<Vec<Family>> {
        let started = Instant::now();
        let mut shared = self.0.lock().unwrap();
        shared.last_scrape = started;
        if let Err(error) = shared.ensure_attached() {
            eprintln!("vsrscope: attach on demand: {error:#}");
        }
        let reading = shared.sample()?;
        let families = shared.families(&reading);
        shared.state.last_scrape_seconds = started.elapsed().as_secs_f64();
        Some(families)
    }
}

fn snapshot(targets: &Targets, json: bool, wait: Duration) -> anyhow::Result<()> {
    let (tracer, _) = attach(targets)?;
    let mut expected = targets.pids.len();
    for binary in &targets.binaries {
        expected += process::find_by_executable(&binary.canonicalize()?).len();
    }
    let deadline = Instant::now() + wait;
    let reading = loop {
        let reading = Reading::read(tracer.ebpf())?;
        let complete = expected > 0 && reading.snapshots.len() >= expected;
        if complete || Instant::now() >= deadline {
            break reading;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(tracer);
    if reading.snapshots.is_empty() {
        bail!(
            "no replica published a state snapshot within {} s",
            wait.as_secs()
        );
    }
    if json {
        let entries: Vec<String> = reading
            .snapshots
            .iter()
            .map(|(replica, Published { snapshot: s, pid, .. })| {
                format!(
                    "{{\"replica_id\":{replica},\"pid\":{pid},\"status\":{},\"is_primary\":{},\"view\":{},\"op\":{},\"commit\":{},\"lag_operations\":{},\"log_bytes\":{},\"log_entries\":{},\"pending_requests\":{},\"prepare_ok_votes\":{},\"client_sessions_active\":{}}}",
                    s.status, s.is_primary, s.view, s.op, s.commit, s.lag_operations, s.log_bytes, s.log_entries, s.pending_requests, s.prepare_ok_votes, s.client_sessions_active
                )
            })
            .collect();
        println!("[{}]", entries.join(","));
    } else {
        println!(
            "{:>7} {:>7} {:>8} {:>7} {:>10} {:>10} {:>7} {:>12}",
            "replica", "pid", "status", "view", "op", "commit", "lag", "log bytes"
        );
        for (
            replica,
            Published {
                snapshot: s, pid, ..
            },
        ) in &reading.snapshots
        {
            let status = vsr_probes::ReplicaStatus::from_u8(s.status)
                .map_or("unknown", |status| status.label());
            let role = if s.is_primary == 1 { "*" } else { "" };
            println!(
                "{:>7} {:>7} {:>8} {:>7} {:>10} {:>10} {:>7} {:>12}",
                format!("{replica}{role}"),
                pid,
                status,
                s.view,
                s.op,
                s.commit,
                s.lag_operations,
                s.log_bytes
            );
        }
    }
    Ok(())
}

/// Client latency quantile of one replica over the window, in milliseconds, or "-".
fn client_quantile(reading: &Reading, window: &QuantileWindow, replica: u32, q: f64) -> String {
    reading
        .histograms
        .get(&(vsrscope_common::histogram::CLIENT, replica))
        .and_then(|histogram| {
            window.quantile_ms(
                (vsrscope_common::histogram::CLIENT, replica),
                &histogram.fine,
                q,
            )
        })
        .map_or("-".into(), |ms| format!("{ms:.2}"))
}

fn top(targets: &Targets, iterations: Option<u64>) -> anyhow::Result<()> {
    let (tracer, described) = attach(targets)?;
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let flag = interrupted.clone();
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { set_flag_on_signal(signal, flag) };
    }
    let mut window = QuantileWindow::new(Duration::from_secs(10));
    let mut previous: Option<(Instant, BTreeMap<u32, u64>)> = None;
    let mut refreshes = 0;
    while !interrupted.load(std::sync::atomic::Ordering::Relaxed)
        && iterations.is_none_or(|limit| refreshes < limit)
    {
        let reading = Reading::read(tracer.ebpf())?;
        let now = Instant::now();
        window.record(now, &reading);
        let operations: BTreeMap<u32, u64> = reading
            .counters
            .iter()
            .map(|(replica, values)| {
                (
                    *replica,
                    values[vsrscope_common::counter::OPERATIONS_SUCCESS],
                )
            })
            .collect();
        // Clear the screen and home the cursor, then redraw.
        let mut screen = String::from("\x1b[2J\x1b[H");
        screen.push_str(&format!("vsrscope top — {}\n\n", described.join("; ")));
        screen.push_str(&format!(
            "{:>8} {:>11} {:>6} {:>10} {:>8} {:>9} {:>9} {:>6}\n",
            "replica", "status", "view", "commit", "ops/s", "p50 ms", "p99 ms", "lag"
        ));
        for (replica, Published { snapshot, .. }) in &reading.snapshots {
            let status = vsr_probes::ReplicaStatus::from_u8(snapshot.status)
                .map_or("unknown", |status| status.label());
            let rate = previous.as_ref().map_or("-".to_string(), |(at, before)| {
                let delta = operations
                    .get(replica)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(before.get(replica).copied().unwrap_or(0));
                format!(
                    "{:.0}",
                    delta as f64 / now.duration_since(*at).as_secs_f64()
                )
            });
            screen.push_str(&format!(
                "{:>8} {:>11} {:>6} {:>10} {:>8} {:>9} {:>9} {:>6}\n",
                format!(
                    "{replica}{}",
                    if snapshot.is_primary == 1 { "*" } else { "" }
                ),
                status,
                snapshot.view,
                snapshot.commit,
                rate,
                client_quantile(&reading, &window, *replica, 0.50),
                client_quantile(&reading, &window, *replica, 0.99),
                snapshot.lag_operations
            ));
        }
        screen.push_str("\n* primary; latencies over the last 10 s; Ctrl-C to quit\n");
        print!("{screen}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        previous = Some((now, operations));
        refreshes += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// Sets `flag` when `signal` arrives.
///
/// # Safety
/// Replaces the process's handler for `signal`.
unsafe fn set_flag_on_signal(signal: libc::c_int, flag: Arc<std::sync::atomic::AtomicBool>) {
    static FLAG: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn handler(_: libc::c_int) {
        if let Some(flag) = FLAG.get() {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // SAFETY: `handler` only touches an atomic through an already-initialised OnceLock.
    unsafe {
        libc::signal(
            signal,
            handler as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}
