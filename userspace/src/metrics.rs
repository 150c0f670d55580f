//! Reading the kernel maps and writing them as the seed's metrics in the Prometheus text format.
//!
//! Histograms are kept in the kernel as per-bucket counts (upper bound inclusive) and made
//! cumulative here, as `le` requires. Quantile gauges come from the fine log-linear buckets,
//! over a sliding window: the sampler keeps periodic copies and a scrape subtracts the oldest
//! copy inside the window from the current counts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, Map, PerCpuArray};
use vsr_probes::{
    Command, Component, RejectReason, RepairStatus, ReplicaSnapshot, SNAPSHOT_VERSION,
    ViewChangeReason,
};
use vsrscope_common::histogram::{self, BOUNDS_MAX, Series};
use vsrscope_common::{REPLICAS_MAX, SnapshotSlot, counter, self_metric};

use crate::attach::{AttachError, PROGRAMS};
use crate::snapshot_slots;

/// Metric name, help text (the seed's description) per histogram id.
pub const HISTOGRAMS: [(&str, &str); histogram::COUNT as usize] = [
    (
        "vsr_prepare_latency_ms",
        "Time from Prepare send to PrepareOk quorum",
    ),
    (
        "vsr_commit_latency_ms",
        "Time from PrepareOk quorum to Commit broadcast",
    ),
    (
        "vsr_client_latency_ms",
        "Total client request latency (Prepare → Commit → Apply)",
    ),
    ("vsr_view_change_latency_ms", "Time to complete view change"),
    ("vsr_recovery_latency_ms", "Time to recover from crash"),
    ("vsr_repair_latency_ms", "Time to repair single log entry"),
    (
        "vsr_state_transfer_latency_ms",
        "Time to complete state transfer",
    ),
];

pub const QUANTILES: [(f64, &str); 3] = [(0.50, "p50"), (0.95, "p95"), (0.99, "p99")];

/// One replica's histogram, summed over CPUs.
#[derive(Debug, Clone)]
pub struct HistogramReading {
    pub buckets: [u64; BOUNDS_MAX + 1],
    pub sum_ns: u64,
    pub count: u64,
    /// Sparse: fine bucket index to count.
    pub fine: BTreeMap<u32, u64>,
}

/// A replica's newest state snapshot and who published it when.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub snapshot: ReplicaSnapshot,
    pub pid: u32,
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) when the probe fired.
    pub published_ns: u64,
}

/// Everything the maps hold at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// By (histogram id, replica id); only series with events.
    pub histograms: BTreeMap<(u32, u32), HistogramReading>,
    /// By replica id; only replicas with any count.
    pub counters: BTreeMap<u32, [u64; counter::SLOTS]>,
    /// By replica id: the newest snapshot, whichever process published it and whether or not
    /// that process still runs.
    pub snapshots: BTreeMap<u32, Published>,
    pub self_counters: [u64; self_metric::SLOTS],
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map, AttachError> {
    ebpf.map(name)
        .ok_or_else(|| AttachError::Load(format!("map {name} missing")))
}

fn read_error(error: impl std::fmt::Display) -> AttachError {
    AttachError::Load(format!("reading maps: {error}"))
}

impl Reading {
    pub fn read(ebpf: &Ebpf) -> Result<Reading, AttachError> {
        let mut reading = Reading::default();
        let histograms: PerCpuArray<_, Series> =
            PerCpuArray::try_from(map(ebpf, "HISTOGRAMS")?).map_err(read_error)?;
        for histogram in 0..histogram::COUNT {
            for replica in 0..REPLICAS_MAX {
                let per_cpu = histograms
                    .get(&(histogram * REPLICAS_MAX + replica), 0)
                    .map_err(read_error)?;
                let mut total = HistogramReading::empty();
                for series in per_cpu.iter() {
                    for (sum, value) in total.buckets.iter_mut().zip(series.buckets) {
                        *sum += value;
                    }
                    total.sum_ns += series.sum_ns;
                    total.count += series.count;
                    for (index, value) in series
                        .fine
                        .iter()
                        .enumerate()
                        .filter(|(_, value)| **value > 0)
                    {
                        *total.fine.entry(index as u32).or_default() += value;
                    }
                }
                if total.count > 0 {
                    reading.histograms.insert((histogram, replica), total);
                }
            }
        }
        let counters: PerCpuArray<_, counter::Counters> =
            PerCpuArray::try_from(map(ebpf, "COUNTERS")?).map_err(read_error)?;
        for replica in 0..REPLICAS_MAX {
            let mut total = [0u64; counter::SLOTS];
            for per_cpu in counters.get(&replica, 0).map_err(read_error)?.iter() {
                for (sum, value) in total.iter_mut().zip(per_cpu.values) {
                    *sum += value;
                }
            }
            if total.iter().any(|value| *value > 0) {
                reading.counters.insert(replica, total);
            }
        }
        let snapshots: Array<_, SnapshotSlot> =
            Array::try_from(map(ebpf, "SNAPSHOTS")?).map_err(read_error)?;
        for replica in 0..REPLICAS_MAX {
            let Some(slot) = snapshot_slots::read(&snapshots, replica)? else {
                continue;
            };
            // SAFETY: the slot holds `size_of::<ReplicaSnapshot>()` bytes copied from one, and
            // every field is an integer, so any bytes are a valid value.
            let snapshot: ReplicaSnapshot =
                unsafe { std::ptr::read_unaligned(slot.bytes.as_ptr().cast()) };
            if snapshot.version == SNAPSHOT_VERSION {
                reading.snapshots.insert(
                    replica,
                    Published {
                        snapshot,
                        pid: slot.pid,
                        published_ns: slot.updated_ns,
                    },
                );
            }
        }
        let self_counters: PerCpuArray<_, self_metric::SelfCounters> =
            PerCpuArray::try_from(map(ebpf, "SELF_COUNTERS")?).map_err(read_error)?;
        for per_cpu in self_counters.get(&0, 0).map_err(read_error)?.iter() {
            for (sum, value) in reading.self_counters.iter_mut().zip(per_cpu.values) {
                *sum += value;
            }
        }
        Ok(reading)
    }
}

impl HistogramReading {
    fn empty() -> HistogramReading {
        HistogramReading {
            buckets: [0; BOUNDS_MAX + 1],
            sum_ns: 0,
            count: 0,
            fine: BTreeMap::new(),
        }
    }
}

/// Sparse fine buckets of every series, by (histogram id, replica id).
type FineBuckets = BTreeMap<(u32, u32), BTreeMap<u32, u64>>;

/// Counter slot, label name and label value of one series of a counter family.
type CounterSeries = (usize, &'static str, &'static str);

/// Periodic copies of the fine buckets, for quantiles over a sliding window.
#[derive(Debug)]
pub struct QuantileWindow {
    window: Duration,
    history: VecDeque<(Instant, FineBuckets)>,
}

impl QuantileWindow {
    pub fn new(window: Duration) -> QuantileWindow {
        QuantileWindow {
            window,
            history: VecDeque::new(),
        }
    }

    pub fn record(&mut self, now: Instant, reading: &Reading) {
        let fine = reading
            .histograms
            .iter()
            .map(|(key, histogram)| (*key, histogram.fine.clone()))
            .collect();
        self.history.push_back((now, fine));
        // Keep one copy at or before the window's start, to subtract from.
        while self.history.len() > 1 && now.duration_since(self.history[1].0) >= self.window {
            self.history.pop_front();
        }
    }

    /// The `q` quantile of one series over the window, in milliseconds.
    pub fn quantile_ms(
        &self,
        key: (u32, u32),
        current: &BTreeMap<u32, u64>,
        q: f64,
    ) -> Option<f64> {
        quantile_ns(&self.windowed(key, current), q).map(|ns| ns / 1e6)
    }

    /// Events of one series inside the window: current counts minus the oldest kept copy.
    fn windowed(&self, key: (u32, u32), current: &BTreeMap<u32, u64>) -> BTreeMap<u32, u64> {
        let base = self.history.front().and_then(|(_, fine)| fine.get(&key));
        current
            .iter()
            .map(|(index, count)| {
                (
                    *index,
                    count - base.and_then(|base| base.get(index)).copied().unwrap_or(0),
                )
            })
            .filter(|(_, count)| *count > 0)
            .collect()
    }
}

/// The `q` quantile of a fine-bucket histogram in nanoseconds: the midpoint of the bucket that
/// holds the rank-⌈q·n⌉ event (error under 0.8% of the value).
pub fn quantile_ns(fine: &BTreeMap<u32, u64>, q: f64) -> Option<f64> {
    let total: u64 = fine.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (index, count) in fine {
        seen += count;
        if seen >= rank {
            let (low, high) = histogram::fine_range(*index as usize);
            return Some(if high - low <= 1 {
                low as f64
            } else {
                (low as f64 + high as f64 - 1.0) / 2.0
            });
        }
    }
    None
}

/// Per-process resource use, sampled from /proc by the exporter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resources {
    pub memory_bytes: u64,
    pub cpu_percent: f64,
    pub disk_iops: f64,
    pub disk_bytes_per_second: f64,
    pub network_bytes_per_second: f64,
}

/// Self-metrics the exporter adds from outside the kernel.
#[derive(Debug, Clone, Default)]
pub struct ExporterState {
    pub attached_sites: usize,
    /// On-demand attaches that failed, and whether the newest one did.
    pub attach_failures: u64,
    pub attach_failing: bool,
    /// Per program: runs and seconds spent, when the kernel's run-time statistics are on.
    pub program_run_time: Vec<(&'static str, u64, f64)>,
    pub map_read_errors: u64,
    pub last_scrape_seconds: f64,
    /// Per push exporter (`otlp`, `statsd`): pushes attempted and pushes that failed.
    pub pushes: BTreeMap<&'static str, PushCounts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushCounts {
    pub attempted: u64,
    pub failed: u64,
}

/// What a family's values mean, which decides how each exporter writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic since `Origin`.
    Counter,
    Gauge,
    Histogram,
}

/// Since when a counter or histogram has counted: a reset of its origin restarts it from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The kernel maps, created when vsrscope started (they persist across detach/re-attach).
    Exporter,
    /// The replica process's own tallies, carried in its state snapshot.
    ReplicaProcess,
}

/// One metric with every series it has now: the model all exporters render.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub origin: Origin,
    pub points: Vec<Point>,
}

/// One series: the replica it describes (none for vsrscope's own metrics), its other labels in
/// order, and its value.
#[derive(Debug, Clone)]
pub struct Point {
    pub replica: Option<u32>,
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Integer(u64),
    Real(f64),
    Histogram(HistogramPoint),
}

/// A latency histogram in milliseconds: `buckets[i]` counts values in (bounds_ms[i-1],
/// bounds_ms[i]]; the extra last bucket counts values above every bound.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub bounds_ms: Vec<f64>,
    pub buckets: Vec<u64>,
    pub sum_ms: f64,
    pub count: u64,
}

impl Family {
    fn new(name: impl Into<String>, kind: Kind, help: impl Into<String>) -> Family {
        Family {
            name: name.into(),
            help: help.into(),
            kind,
            origin: Origin::Exporter,
            points: Vec::new(),
        }
    }

    fn point(&mut self, replica: Option<u32>, labels: Vec<(&'static str, String)>, value: Value) {
        self.points.push(Point {
            replica,
            labels,
            value,
        });
    }
}

/// Replicas vsrscope knows of: every one that published a snapshot or has a count. Each gets
/// every counter and histogram series from then on, at zero until its first event, so that
/// `rate()` and `increase()` see the first increment instead of a series born at its value.
fn known_replicas(reading: &Reading, up: &BTreeMap<u32, bool>) -> BTreeSet<u32> {
    up.keys()
        .chain(reading.counters.keys())
        .chain(reading.histograms.keys().map(|(_, replica)| replica))
        .copied()
        .collect()
}

/// Every metric vsrscope exports, from one reading of the maps. `up` holds every replica that
/// ever published a snapshot; the snapshots of those that are down must already be gone from
/// `reading`, and their resources from `resources`.
pub fn families(
    reading: &Reading,
    window: &QuantileWindow,
    bounds_ms: &[Vec<f64>],
    up: &BTreeMap<u32, bool>,
    resources: &BTreeMap<u32, Resources>,
    state: &ExporterState,
) -> Vec<Family> {
    let mut families = Vec::with_capacity(64);
    let known = known_replicas(reading, up);
    let empty = HistogramReading::empty();
    let no_counts = [0u64; counter::SLOTS];
    for (histogram, (name, help)) in HISTOGRAMS.iter().enumerate() {
        let series: Vec<(u32, &HistogramReading)> = known
            .iter()
            .map(|replica| {
                let reading = reading.histograms.get(&(histogram as u32, *replica));
                (*replica, reading.unwrap_or(&empty))
            })
            .collect();
        let bounds = &bounds_ms[histogram];
        let mut family = Family::new(*name, Kind::Histogram, *help);
        for (replica, reading) in &series {
            let mut buckets = reading.buckets[..bounds.len()].to_vec();
            let bounded: u64 = buckets.iter().sum();
            // CPUs' slots are read one after another while programs may run: never let a
            // bucket that was read after its count make the buckets outnumber the count.
            let count = reading.count.max(bounded);
            buckets.push(count - bounded);
            family.point(
                Some(*replica),
                Vec::new(),
                Value::Histogram(HistogramPoint {
                    bounds_ms: bounds.clone(),
                    buckets,
                    sum_ms: reading.sum_ns as f64 / 1e6,
                    count,
                }),
            );
        }
        families.push(family);
        for (q, suffix) in QUANTILES {
            let mut family = Family::new(
                format!("{name}_{suffix}"),
                Kind::Gauge,
                format!(
                    "{help}: {suffix} over the last {} s",
                    window.window.as_secs()
                ),
            );
            for (replica, reading) in &series {
                if let Some(value) =
                    window.quantile_ms((histogram as u32, *replica), &reading.fine, q)
                {
                    family.point(Some(*replica), Vec::new(), Value::Real(value));
                }
            }
            families.push(family);
        }
    }

    let labelled = |slot: usize,
                    label: &'static str,
                    names: Vec<(usize, &'static str)>|
     -> Vec<(usize, &'static str, &'static str)> {
        names
            .into_iter()
            .map(|(code, value)| (slot + code, label, value))
            .collect()
    };
    let counters: Vec<(&str, &str, Vec<CounterSeries>)> = vec![
        (
            "vsr_operations_total",
            "Total operations committed",
            vec![
                (counter::OPERATIONS_SUCCESS, "status", "success"),
                (counter::OPERATIONS_FAILURE, "status", "failure"),
            ],
        ),
        (
            "vsr_bytes_written_total",
            "Total bytes written to log",
            vec![(counter::BYTES_WRITTEN, "", "")],
        ),
        (
            "vsr_byzantine_rejections_total",
            "Total Byzantine messages rejected",
            labelled(
                counter::BYZANTINE_REJECTIONS,
                "reason",
                RejectReason::ALL
                    .iter()
                    .map(|r| (*r as usize, r.label()))
                    .collect(),
            ),
        ),
        (
            "vsr_checksum_failures_total",
            "Total checksum validation failures",
            labelled(
                counter::CHECKSUM_FAILURES,
                "component",
                Component::ALL
                    .iter()
                    .map(|c| (*c as usize, c.label()))
                    .collect(),
            ),
        ),
        (
            "vsr_repairs_total",
            "Total log repair operations",
            labelled(
                counter::REPAIRS,
                "status",
                RepairStatus::ALL
                    .iter()
                    .map(|s| (*s as usize, s.label()))
                    .collect(),
            ),
        ),
        (
            "vsr_view_changes_total",
            "Total view changes initiated",
            labelled(
                counter::VIEW_CHANGES,
                "reason",
                ViewChangeReason::ALL
                    .iter()
                    .map(|r| (*r as usize, r.label()))
                    .collect(),
            ),
        ),
        (
            "vsr_duplicate_requests_total",
            "Duplicate requests detected",
            vec![(counter::DUPLICATE_REQUESTS, "", "")],
        ),
        (
            "vsr_client_sessions_evicted_total",
            "Total sessions evicted",
            vec![(counter::SESSIONS_EVICTED, "", "")],
        ),
        (
            "vsr_scrub_tours_completed_total",
            "Total scrub tours completed",
            vec![(counter::SCRUB_TOURS, "", "")],
        ),
        (
            "vsr_scrub_corruptions_detected_total",
            "Total corruptions detected",
            vec![(counter::SCRUB_CORRUPTIONS, "", "")],
        ),
    ];
    for (name, help, slots) in counters {
        let mut family = Family::new(name, Kind::Counter, help);
        for replica in &known {
            let values = reading.counters.get(replica).unwrap_or(&no_counts);
            for (slot, label, label_value) in &slots {
                let labels = if label.is_empty() {
                    Vec::new()
                } else {
                    vec![(*label, label_value.to_string())]
                };
                family.point(Some(*replica), labels, Value::Integer(values[*slot]));
            }
        }
        families.push(family);
    }

    let mut scrub_throughput = Family::new(
        "vsr_scrub_throughput_ops_per_sec",
        Kind::Gauge,
        "Scrub throughput: journal records read per second of scrubbing, over the tours \
         finished since attach",
    );
    for replica in &known {
        let values = reading.counters.get(replica).unwrap_or(&no_counts);
        if values[counter::SCRUB_NS] > 0 {
            let ops_per_sec =
                values[counter::SCRUB_OPS] as f64 * 1e9 / values[counter::SCRUB_NS] as f64;
            scrub_throughput.point(Some(*replica), Vec::new(), Value::Real(ops_per_sec));
        }
    }
    families.push(scrub_throughput);

    for (name, help, sent) in [
        ("vsr_messages_sent_total", "Total VSR messages sent", true),
        (
            "vsr_messages_received_total",
            "Total VSR messages received",
            false,
        ),
    ] {
        let mut family = Family::new(name, Kind::Counter, help);
        family.origin = Origin::ReplicaProcess;
        for (replica, Published { snapshot, .. }) in &reading.snapshots {
            let counts = if sent {
                &snapshot.messages_sent
            } else {
                &snapshot.messages_received
            };
            for command in Command::ALL {
                family.point(
                    Some(*replica),
                    vec![("message_type", command.label().into())],
                    Value::Integer(counts[*command as usize]),
                );
            }
        }
        families.push(family);
    }

    let mut up_family = Family::new(
        "vsr_replica_up",
        Kind::Gauge,
        "1 while the replica's process runs and its state snapshots are fresh, 0 after (its state \
         and resource gauges are then absent)",
    );
    for (replica, up) in up {
        up_family.point(Some(*replica), Vec::new(), Value::Integer(u64::from(*up)));
    }
    families.push(up_family);

    type Field = fn(&ReplicaSnapshot) -> u64;
    let gauges: [(&str, &str, Field); 13] = [
        (
            "vsr_replica_status",
            "Current replica status: 0=Normal, 1=ViewChange, 2=Recovering, 3=StateTransfer",
            |s| u64::from(s.status),
        ),
        ("vsr_view_number", "Current view number", |s| s.view),
        ("vsr_commit_number", "Current commit number", |s| s.commit),
        ("vsr_op_number", "Current op number", |s| s.op),
        ("vsr_log_size_bytes", "Log size in bytes", |s| s.log_bytes),
        ("vsr_log_entry_count", "Number of log entries", |s| {
            s.log_entries
        }),
        ("vsr_quorum_size", "Required quorum size", |s| {
            u64::from(s.quorum_size)
        }),
        ("vsr_cluster_size", "Current cluster size", |s| {
            u64::from(s.cluster_size)
        }),
        (
            "vsr_replica_lag_operations",
            "Operations behind leader",
            |s| s.lag_operations,
        ),
        (
            "vsr_pending_requests",
            "Number of pending client requests",
            |s| s.pending_requests,
        ),
        (
            "vsr_prepare_ok_votes",
            "PrepareOk votes for current op",
            |s| s.prepare_ok_votes,
        ),
        (
            "vsr_client_sessions_active",
            "Number of active client sessions",
            |s| s.client_sessions_active,
        ),
        (
            "vsr_repair_inflight_count",
            "Number of inflight repair requests",
            |s| s.repair_inflight,
        ),
    ];
    for (name, help, field) in gauges {
        let mut family = Family::new(name, Kind::Gauge, help);
        for (replica, Published { snapshot, .. }) in &reading.snapshots {
            family.point(Some(*replica), Vec::new(), Value::Integer(field(snapshot)));
        }
        families.push(family);
    }

    type Resource = fn(&Resources) -> f64;
    let resource_gauges: [(&str, &str, Resource); 5] = [
        (
            "vsr_memory_used_bytes",
            "Memory allocated by VSR (resident set of the replica process)",
            |r| r.memory_bytes as f64,
        ),
        (
            "vsr_network_bandwidth_bytes_per_sec",
            "Network I/O rate (VSR messages, both directions)",
            |r| r.network_bytes_per_second,
        ),
        (
            "vsr_disk_iops",
            "Disk operations per second (journal group commits)",
            |r| r.disk_iops,
        ),
        (
            "vsr_disk_bandwidth_bytes_per_sec",
            "Disk I/O bandwidth (bytes written by the process)",
            |r| r.disk_bytes_per_second,
        ),
        (
            "vsr_cpu_utilization_percent",
            "CPU usage by the replica process",
            |r| r.cpu_percent,
        ),
    ];
    for (name, help, field) in resource_gauges {
        let mut family = Family::new(name, Kind::Gauge, help);
        for (replica, resource) in resources {
            family.point(Some(*replica), Vec::new(), Value::Real(field(resource)));
        }
        families.push(family);
    }

    families.extend(self_families(reading, state));
    families
}

/// vsrscope's metrics about itself.
fn self_families(reading: &Reading, state: &ExporterState) -> Vec<Family> {
    let mut families = Vec::new();
    let mut single =
        |name: &str, kind: Kind, help: &str, labels: Vec<(&'static str, String)>, value: Value| {
            let mut family = Family::new(name, kind, help);
            family.point(None, labels, value);
            families.push(family);
        };
    single(
        "vsrscope_attached_sites",
        Kind::Gauge,
        "USDT sites vsrscope has a uprobe on",
        Vec::new(),
        Value::Integer(state.attached_sites as u64),
    );
    single(
        "vsrscope_attach_failing",
        Kind::Gauge,
        "1 while the newest on-demand attach failed: nothing is attached and the replica series \
         are frozen",
        Vec::new(),
        Value::Integer(u64::from(state.attach_failing)),
    );
    single(
        "vsrscope_attach_failures_total",
        Kind::Counter,
        "On-demand attaches that failed",
        Vec::new(),
        Value::Integer(state.attach_failures),
    );
    let mut hits = Family::new(
        "vsrscope_program_hits_total",
        Kind::Counter,
        "Probe hits handled by each eBPF program",
    );
    for (index, program) in PROGRAMS.iter().enumerate() {
        hits.point(
            None,
            vec![("program", program.to_string())],
            Value::Integer(reading.self_counters[self_metric::HITS + index]),
        );
    }
    let mut run_families = Vec::new();
    if !state.program_run_time.is_empty() {
        let mut runs = Family::new(
            "vsrscope_program_runs_total",
            Kind::Counter,
            "Program runs counted by the kernel",
        );
        let mut seconds = Family::new(
            "vsrscope_program_run_seconds_total",
            Kind::Counter,
            "Time the kernel spent running each program",
        );
        for (program, run_count, run_seconds) in &state.program_run_time {
            let labels = vec![("program", program.to_string())];
            runs.point(None, labels.clone(), Value::Integer(*run_count));
            seconds.point(None, labels, Value::Real(*run_seconds));
        }
        run_families = vec![runs, seconds];
    }
    let mut lost = Family::new(
        "vsrscope_lost_events_total",
        Kind::Counter,
        "Probe hits that could not be recorded",
    );
    lost.point(
        None,
        vec![("cause", "unrecordable_hit".into())],
        Value::Integer(reading.self_counters[self_metric::LOST]),
    );
    lost.point(
        None,
        vec![("cause", "batch_overflow".into())],
        Value::Integer(reading.self_counters[self_metric::LOST_BATCH_LATENCIES]),
    );
    let mut read_errors = Family::new(
        "vsrscope_map_read_errors_total",
        Kind::Counter,
        "Failed reads of the kernel maps",
    );
    read_errors.point(None, Vec::new(), Value::Integer(state.map_read_errors));
    let mut scrape = Family::new(
        "vsrscope_scrape_duration_seconds",
        Kind::Gauge,
        "Time the previous scrape took to read maps and render",
    );
    scrape.point(None, Vec::new(), Value::Real(state.last_scrape_seconds));
    families.push(hits);
    families.extend(run_families);
    families.extend([lost, read_errors, scrape]);
    if !state.pushes.is_empty() {
        let mut attempted = Family::new(
            "vsrscope_pushes_total",
            Kind::Counter,
            "Pushes to a push exporter (OTLP export requests, StatsD flushes)",
        );
        let mut failed = Family::new(
            "vsrscope_push_failures_total",
            Kind::Counter,
            "Pushes that did not reach the receiver after every retry",
        );
        for (exporter, counts) in &state.pushes {
            let labels = vec![("exporter", exporter.to_string())];
            attempted.point(None, labels.clone(), Value::Integer(counts.attempted));
            failed.point(None, labels, Value::Integer(counts.failed));
        }
        families.extend([attempted, failed]);
    }
    families
}

/// The families in the Prometheus text format (0.0.4).
pub fn prometheus_text(families: &[Family]) -> String {
    let mut text = String::with_capacity(64 * 1024);
    for family in families {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(text, "# TYPE {} {kind}", family.name);
        for point in &family.points {
            let mut labels = Vec::with_capacity(point.labels.len() + 2);
            if let Some(replica) = point.replica {
                labels.push(("replica_id", replica.to_string()));
            }
            labels.extend(point.labels.iter().cloned());
            match &point.value {
                Value::Integer(value) => sample(&mut text, &family.name, &labels, value),
                Value::Real(value) => sample(&mut text, &family.name, &labels, value),
                Value::Histogram(histogram) => {
                    let bucket = format!("{}_bucket", family.name);
                    let mut cumulative = 0;
                    for (bound, count) in histogram.bounds_ms.iter().zip(&histogram.buckets) {
                        cumulative += count;
                        let mut labels = labels.clone();
                        labels.push(("le", format!("{bound}")));
                        sample(&mut text, &bucket, &labels, cumulative);
                    }
                    let mut infinite = labels.clone();
                    infinite.push(("le", "+Inf".into()));
                    sample(&mut text, &bucket, &infinite, histogram.count);
                    let sum = format!("{}_sum", family.name);
                    sample(&mut text, &sum, &labels, histogram.sum_ms);
                    let count = format!("{}_count", family.name);
                    sample(&mut text, &count, &labels, histogram.count);
                }
            }
        }
    }
    text
}

fn sample(text: &mut String, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
    text.push_str(name);
    if !labels.is_empty() {
        text.push('{');
        for (index, (label, label_value)) in labels.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            let _ = write!(text, "{label}=\"{label_value}\"");
        }
        text.push('}');
    }
    let _ = writeln!(text, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(buckets_prefix: &[u64], count: u64) -> HistogramReading {
        let mut buckets = [0; BOUNDS_MAX + 1];
        buckets[..buckets_prefix.len()].copy_from_slice(buckets_prefix);
        HistogramReading {
            buckets,
            sum_ns: 7_500_000,
            count,
            fine: BTreeMap::new(),
        }
    }

    fn client_latency(reading: &Reading) -> HistogramPoint {
        let bounds_ms: Vec<Vec<f64>> = (0..histogram::COUNT).map(|_| vec![1.0, 5.0]).collect();
        let families = families(
            reading,
            &QuantileWindow::new(Duration::from_secs(60)),
            &bounds_ms,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &ExporterState::default(),
        );
        let family = families
            .iter()
            .find(|family| family.name == "vsr_client_latency_ms")
            .unwrap();
        match &family.points[0].value {
            Value::Histogram(point) => point.clone(),
            other => panic!("not a histogram: {other:?}"),
        }
    }

    #[test]
    fn histogram_buckets_are_per_bucket_and_add_up_to_the_count() {
        let mut reading = Reading::default();
        reading
            .histograms
            .insert((histogram::CLIENT, 0), histogram(&[3, 4], 9));
        let point = client_latency(&reading);
        assert_eq!(point.buckets, vec![3, 4, 2]);
        assert_eq!((point.count, point.sum_ms), (9, 7.5));
        let text = prometheus_text(&families(
            &reading,
            &QuantileWindow::new(Duration::from_secs(60)),
            &(0..histogram::COUNT)
                .map(|_| vec![1.0, 5.0])
                .collect::<Vec<_>>(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            &ExporterState::default(),
        ));
        for line in [
            "vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"1\"} 3",
            "vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"5\"} 7",
            "vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"+Inf\"} 9",
            "vsr_client_latency_ms_sum{replica_id=\"0\"} 7.5",
            "vsr_client_latency_ms_count{replica_id=\"0\"} 9",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_count_read_before_its_bucket_never_leaves_buckets_above_the_count() {
        // Per-CPU slots are read while programs run: a bucket may already hold an event whose
        // count was not yet added when the count was read.
        let mut reading = Reading::default();
        reading
            .histograms
            .insert((histogram::CLIENT, 0), histogram(&[3, 5], 7));
        let point = client_latency(&reading);
        assert_eq!(point.buckets, vec![3, 5, 0]);
        assert_eq!(point.count, 8);
    }
}
