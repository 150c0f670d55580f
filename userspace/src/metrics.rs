//! Reading the kernel maps and writing them as the seed's metrics in the Prometheus text format.
//!
//! Histograms are kept in the kernel as per-bucket counts (upper bound inclusive) and made
//! cumulative here, as `le` requires. Quantile gauges come from the fine log-linear buckets,
//! over a sliding window: the sampler keeps periodic copies and a scrape subtracts the oldest
//! copy inside the window from the current counts.

use std::collections::{BTreeMap, VecDeque};
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

/// Everything the maps hold at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// By (histogram id, replica id); only series with events.
    pub histograms: BTreeMap<(u32, u32), HistogramReading>,
    /// By replica id; only replicas with any count.
    pub counters: BTreeMap<u32, [u64; counter::SLOTS]>,
    /// By replica id: the newest snapshot and the pid that published it.
    pub snapshots: BTreeMap<u32, (ReplicaSnapshot, u32)>,
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
                let mut total = HistogramReading {
                    buckets: [0; BOUNDS_MAX + 1],
                    sum_ns: 0,
                    count: 0,
                    fine: BTreeMap::new(),
                };
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
            let slot = snapshots.get(&replica, 0).map_err(read_error)?;
            if slot.updated_ns == 0 {
                continue;
            }
            // SAFETY: the slot holds `size_of::<ReplicaSnapshot>()` bytes copied from one, and
            // every field is an integer, so any bytes are a valid value.
            let snapshot: ReplicaSnapshot =
                unsafe { std::ptr::read_unaligned(slot.bytes.as_ptr().cast()) };
            if snapshot.version == SNAPSHOT_VERSION {
                reading.snapshots.insert(replica, (snapshot, slot.pid));
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
    /// Per program: runs and seconds spent, when the kernel's run-time statistics are on.
    pub program_run_time: Vec<(&'static str, u64, f64)>,
    pub map_read_errors: u64,
    pub last_scrape_seconds: f64,
}

struct Writer {
    text: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{label_value}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

fn replica_label(replica: u32) -> (&'static str, String) {
    ("replica_id", replica.to_string())
}

/// Milliseconds as Prometheus prints them: no trailing zeros, exact for the seed's bounds.
fn milliseconds(nanoseconds: f64) -> String {
    format!("{}", nanoseconds / 1e6)
}

/// Writes the whole exposition.
pub fn exposition(
    reading: &Reading,
    window: &QuantileWindow,
    bounds_ms: &[Vec<f64>],
    resources: &BTreeMap<u32, Resources>,
    state: &ExporterState,
) -> String {
    let mut out = Writer {
        text: String::with_capacity(64 * 1024),
    };
    for (histogram, (name, help)) in HISTOGRAMS.iter().enumerate() {
        let series: Vec<(&(u32, u32), &HistogramReading)> = reading
            .histograms
            .iter()
            .filter(|((id, _), _)| *id == histogram as u32)
            .collect();
        out.family(name, "histogram", help);
        for ((_, replica), reading) in &series {
            let mut cumulative = 0;
            for (index, bound) in bounds_ms[histogram].iter().enumerate() {
                cumulative += reading.buckets[index];
                out.sample(
                    &format!("{name}_bucket"),
                    &[replica_label(*replica), ("le", format!("{bound}"))],
                    cumulative,
                );
            }
            out.sample(
                &format!("{name}_bucket"),
                &[replica_label(*replica), ("le", "+Inf".into())],
                reading.count,
            );
            out.sample(
                &format!("{name}_sum"),
                &[replica_label(*replica)],
                milliseconds(reading.sum_ns as f64),
            );
            out.sample(
                &format!("{name}_count"),
                &[replica_label(*replica)],
                reading.count,
            );
        }
        for (q, suffix) in QUANTILES {
            let family = format!("{name}_{suffix}");
            out.family(
                &family,
                "gauge",
                &format!(
                    "{help}: {suffix} over the last {} s",
                    window.window.as_secs()
                ),
            );
            for ((_, replica), reading) in &series {
                if let Some(value) =
                    window.quantile_ms((histogram as u32, *replica), &reading.fine, q)
                {
                    out.sample(&family, &[replica_label(*replica)], format!("{value}"));
                }
            }
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
    let families: Vec<(&str, &str, Vec<CounterSeries>)> = vec![
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
    ];
    for (name, help, slots) in families {
        out.family(name, "counter", help);
        for (replica, values) in &reading.counters {
            for (slot, label, label_value) in &slots {
                let mut labels = vec![replica_label(*replica)];
                if !label.is_empty() {
                    labels.push((label, label_value.to_string()));
                }
                out.sample(name, &labels, values[*slot]);
            }
        }
    }

    for (name, help, sent) in [
        ("vsr_messages_sent_total", "Total VSR messages sent", true),
        (
            "vsr_messages_received_total",
            "Total VSR messages received",
            false,
        ),
    ] {
        out.family(name, "counter", help);
        for (replica, (snapshot, _)) in &reading.snapshots {
            let counts = if sent {
                &snapshot.messages_sent
            } else {
                &snapshot.messages_received
            };
            for command in Command::ALL {
                out.sample(
                    name,
                    &[
                        replica_label(*replica),
                        ("message_type", command.label().into()),
                    ],
                    counts[*command as usize],
                );
            }
        }
    }

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
        out.family(name, "gauge", help);
        for (replica, (snapshot, _)) in &reading.snapshots {
            out.sample(name, &[replica_label(*replica)], field(snapshot));
        }
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
        out.family(name, "gauge", help);
        for (replica, resource) in resources {
            out.sample(name, &[replica_label(*replica)], field(resource));
        }
    }

    out.family(
        "vsrscope_attached_sites",
        "gauge",
        "USDT sites vsrscope has a uprobe on",
    );
    out.sample("vsrscope_attached_sites", &[], state.attached_sites);
    out.family(
        "vsrscope_program_hits_total",
        "counter",
        "Probe hits handled by each eBPF program",
    );
    for (index, program) in PROGRAMS.iter().enumerate() {
        out.sample(
            "vsrscope_program_hits_total",
            &[("program", program.to_string())],
            reading.self_counters[self_metric::HITS + index],
        );
    }
    if !state.program_run_time.is_empty() {
        out.family(
            "vsrscope_program_runs_total",
            "counter",
            "Program runs counted by the kernel",
        );
        for (program, runs, _) in &state.program_run_time {
            out.sample(
                "vsrscope_program_runs_total",
                &[("program", program.to_string())],
                runs,
            );
        }
        out.family(
            "vsrscope_program_run_seconds_total",
            "counter",
            "Time the kernel spent running each program",
        );
        for (program, _, seconds) in &state.program_run_time {
            out.sample(
                "vsrscope_program_run_seconds_total",
                &[("program", program.to_string())],
                seconds,
            );
        }
    }
    out.family(
        "vsrscope_lost_events_total",
        "counter",
        "Probe hits that could not be recorded",
    );
    out.sample(
        "vsrscope_lost_events_total",
        &[("cause", "unrecordable_hit".into())],
        reading.self_counters[self_metric::LOST],
    );
    out.sample(
        "vsrscope_lost_events_total",
        &[("cause", "batch_overflow".into())],
        reading.self_counters[self_metric::LOST_BATCH_LATENCIES],
    );
    out.family(
        "vsrscope_map_read_errors_total",
        "counter",
        "Failed reads of the kernel maps",
    );
    out.sample("vsrscope_map_read_errors_total", &[], state.map_read_errors);
    out.family(
        "vsrscope_scrape_duration_seconds",
        "gauge",
        "Time the previous scrape took to read maps and render",
    );
    out.sample(
        "vsrscope_scrape_duration_seconds",
        &[],
        state.last_scrape_seconds,
    );
    out.text
}
