//! vsrscope against real parts: a 3-replica cluster under `vsr-bench` load, uprobes in this
//! kernel, bpftrace as an independent second observer, and a real Prometheus scraping
//! `/metrics`. Ground truth is the load generator's record and bpftrace's own aggregation of the
//! same probes, never vsrscope's output.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::{
    Bpftrace, Cluster, Prometheus, Serve, TestDirectory, assert_clear_failure, http_get,
    tagged_rows, wait_until,
};

const SEED_PREPARE_BOUNDS_MS: [f64; 9] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0];

fn vsrscope_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vsrscope"))
}

/// The rank-⌈q·n⌉ value, the definition the quantile gauges approximate.
fn exact_quantile(sorted: &[u64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

#[test]
fn metrics_match_ground_truth_and_a_real_prometheus_reads_them() {
    let cluster = Cluster::start("vsrscope-accuracy", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--quantile-window-s",
            "600",
        ],
    );
    let prometheus = Prometheus::start(&cluster.directory.0, serve.address);
    // bpftrace observes the same probes on the primary, independently of vsrscope.
    let observer = Bpftrace::attach_pid(
        cluster.pid(0),
        &format!(
            "usdt:{binary}:vsr:prepare_quorum {{ printf(\"quorum %d\\n\", arg2); }}\n\
             usdt:{binary}:vsr:client_reply {{ printf(\"reply %d\\n\", arg4); }}\n",
            binary = cluster.binary.display()
        ),
    );
    let clients = 16u64;
    let bench = cluster.bench(&["--duration-s", "3", "--clients", &clients.to_string()]);
    assert!(bench.status.success(), "{}", bench.stderr);
    let acknowledged = bench.acknowledged;
    // Backups execute the last ops when the next heartbeat tells them the commit number.
    wait_until(
        "every replica to count every operation",
        Duration::from_secs(10),
        || {
            let metrics = serve.scrape();
            (0..3).all(|replica| {
                metrics.value(&format!(
                    "vsr_operations_total{{replica_id=\"{replica}\",status=\"success\"}}"
                )) == Some(acknowledged as f64)
            })
        },
    );
    let observed = observer.finish();
    let metrics = serve.scrape();

    // Prepare latency: count and every seed bucket exactly as bpftrace saw them.
    let mut quorum_ns: Vec<u64> = tagged_rows(&observed, "quorum ")
        .into_iter()
        .map(|row| row[0])
        .collect();
    quorum_ns.sort_unstable();
    assert!(!quorum_ns.is_empty());
    assert_eq!(
        metrics.get("vsr_prepare_latency_ms_count{replica_id=\"0\"}"),
        quorum_ns.len() as f64
    );
    for bound in SEED_PREPARE_BOUNDS_MS {
        let expected = quorum_ns
            .iter()
            .filter(|ns| **ns as f64 <= bound * 1e6)
            .count();
        assert_eq!(
            metrics.get(&format!(
                "vsr_prepare_latency_ms_bucket{{replica_id=\"0\",le=\"{bound}\"}}"
            )),
            expected as f64,
            "le={bound}"
        );
    }
    let sum_ms = quorum_ns.iter().sum::<u64>() as f64 / 1e6;
    assert!(
        (metrics.get("vsr_prepare_latency_ms_sum{replica_id=\"0\"}") - sum_ms).abs()
            < 1e-6 * sum_ms.max(1.0)
    );

    // Client latency: one event per reply (operations and registrations), quantiles within 2%.
    let mut reply_ns: Vec<u64> = tagged_rows(&observed, "reply ")
        .into_iter()
        .map(|row| row[0])
        .collect();
    reply_ns.sort_unstable();
    assert_eq!(reply_ns.len() as u64, acknowledged + clients);
    assert_eq!(
        metrics.get("vsr_client_latency_ms_count{replica_id=\"0\"}"),
        reply_ns.len() as f64
    );
    for (q, suffix) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        let exact_ms = exact_quantile(&reply_ns, q) / 1e6;
        let gauge = metrics.get(&format!(
            "vsr_client_latency_ms_{suffix}{{replica_id=\"0\"}}"
        ));
        assert!(
            (gauge - exact_ms).abs() <= 0.02 * exact_ms,
            "{suffix}: gauge {gauge} vs exact {exact_ms}"
        );
    }

    // Gauges from the snapshot probe: three normal replicas in view 0, one primary.
    for replica in 0..3 {
        assert_eq!(
            metrics.get(&format!("vsr_replica_status{{replica_id=\"{replica}\"}}")),
            0.0
        );
        assert_eq!(
            metrics.get(&format!("vsr_cluster_size{{replica_id=\"{replica}\"}}")),
            3.0
        );
        assert_eq!(
            metrics.get(&format!("vsr_quorum_size{{replica_id=\"{replica}\"}}")),
            2.0
        );
        assert!(
            metrics.get(&format!(
                "vsr_memory_used_bytes{{replica_id=\"{replica}\"}}"
            )) > 1e6
        );
    }
    assert_eq!(
        metrics.get("vsr_op_number{replica_id=\"0\"}"),
        quorum_ns.len() as f64
    );
    assert!(metrics.get("vsr_bytes_written_total{replica_id=\"0\"}") > 0.0);
    assert!(
        metrics.get("vsr_messages_sent_total{replica_id=\"0\",message_type=\"prepare\"}")
            >= 2.0 * quorum_ns.len() as f64
    );
    assert_eq!(
        metrics.get("vsrscope_lost_events_total{cause=\"unrecordable_hit\"}"),
        0.0
    );

    // promtool parses the exposition. Its lint objects to names the seed prescribes (`_ms`,
    // `_per_sec`, gauges ending in `_count`); those stay, as the seed is the requirement. Any
    // other finding, or a parse error (exit 1), fails.
    let exposition = cluster.directory.0.join("metrics.txt");
    std::fs::write(&exposition, &metrics.text).unwrap();
    let promtool = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", exposition.display()))
        .output()
        .unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    let other_findings: Vec<&str> = findings
        .lines()
        .filter(|line| !line.starts_with("vsr_"))
        .collect();
    assert!(
        matches!(promtool.status.code(), Some(0 | 3)),
        "promtool could not parse it: {findings}"
    );
    assert!(
        other_findings.is_empty(),
        "promtool findings on vsrscope's own names: {other_findings:?}"
    );

    // The real Prometheus scraped it: counters, histogram quantiles and metadata work.
    let load = cluster.bench_in_background(&["--duration-s", "6", "--clients", "8"]);
    wait_until(
        "Prometheus to see operations/s under load",
        Duration::from_secs(30),
        || {
            let response =
                prometheus.query("sum(rate(vsr_operations_total{status=\"success\"}[3s])) > 0");
            response.contains("\"result\":[{")
        },
    );
    let quantile = prometheus
        .query("histogram_quantile(0.99, sum by (le) (rate(vsr_client_latency_ms_bucket[5s])))");
    assert!(
        quantile.contains("\"status\":\"success\"") && quantile.contains("\"result\":[{"),
        "{quantile}"
    );
    let metadata = http_get(
        prometheus.address,
        "/api/v1/metadata?metric=vsr_prepare_latency_ms",
    );
    assert!(metadata.contains("\"type\":\"histogram\""), "{metadata}");
    let metadata = http_get(
        prometheus.address,
        "/api/v1/metadata?metric=vsr_view_number",
    );
    assert!(metadata.contains("\"type\":\"gauge\""), "{metadata}");
    let _ = testkit::BenchResult::from_child(load);
}

/// A process holding `pid`, which must be free: the kernel gives the next process the pid after
/// `ns_last_pid`, unless another process on the host takes it first (then try again).
fn occupy_pid(pid: u32) -> std::process::Child {
    for _ in 0..100 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    panic!("could not start a process with pid {pid}");
}

/// The replica-state and resource series of one replica in an exposition.
fn replica_gauges(metrics: &testkit::Metrics, replica: u32) -> Vec<String> {
    let suffix = format!("{{replica_id=\"{replica}\"}}");
    metrics
        .text
        .lines()
        .filter_map(|line| line.split_once(' ').map(|(series, _)| series))
        .filter(|series| series.ends_with(&suffix))
        .filter(|series| {
            [
                "vsr_replica_status",
                "vsr_view_number",
                "vsr_commit_number",
                "vsr_prepare_ok_votes",
                "vsr_memory_used_bytes",
                "vsr_cpu_utilization_percent",
            ]
            .iter()
            .any(|name| series.starts_with(&format!("{name}{{")))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn primary_failure_and_restart_show_up_and_attach_by_path_covers_the_new_process() {
    let mut cluster = Cluster::start("vsrscope-faults", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(1, "Normal in view 0", Duration::from_secs(5));
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--snapshot-interval-ms",
            "100",
        ],
    );
    let load = cluster.bench_in_background(&["--duration-s", "5", "--clients", "16", "--verify"]);
    wait_until("every replica's gauges", Duration::from_secs(5), || {
        let metrics = serve.scrape();
        (0..3).all(|replica| replica_gauges(&metrics, replica).len() == 6)
    });
    let dead_pid = cluster.pid(0);
    cluster.kill(0);
    let killed = std::time::Instant::now();
    // Its pid handed at once to another process, whose CPU and memory are not the replica's.
    let mut impostor = occupy_pid(dead_pid);
    // Down within the snapshot interval and margin (1.1 s) plus a sampling second; state and
    // resource gauges gone with it. Ground truth: the replica's process is gone.
    assert!(!cluster.is_running(0));
    wait_until(
        "replica 0 reported down",
        Duration::from_millis(2_100),
        || {
            let metrics = serve.scrape();
            metrics.value("vsr_replica_up{replica_id=\"0\"}") == Some(0.0)
                && replica_gauges(&metrics, 0).is_empty()
        },
    );
    eprintln!(
        "replica 0 reported down {:?} after kill -9",
        killed.elapsed()
    );
    // And it stays down, through samples taken while the impostor holds its pid.
    let stays_down_until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < stays_down_until {
        let metrics = serve.scrape();
        assert_eq!(metrics.value("vsr_replica_up{replica_id=\"0\"}"), Some(0.0));
        assert_eq!(replica_gauges(&metrics, 0), Vec::<String>::new());
        std::thread::sleep(Duration::from_millis(200));
    }
    impostor.kill().unwrap();
    impostor.wait().unwrap();
    wait_until(
        "the view change in the metrics",
        Duration::from_secs(15),
        || {
            let metrics = serve.scrape();
            metrics
                .value("vsr_view_changes_total{replica_id=\"1\",reason=\"primary_disconnected\"}")
                == Some(1.0)
                && metrics.value("vsr_view_change_latency_ms_count{replica_id=\"1\"}") == Some(1.0)
                && metrics.value("vsr_view_number{replica_id=\"1\"}") == Some(1.0)
        },
    );
    // Its disk replaced: a replica that lost its data recovers before it votes.
    cluster.replace_replica(0);
    cluster.start_replica(0);
    let new_pid = cluster.pid(0);
    wait_until(
        "the restarted replica's recovery in the metrics",
        Duration::from_secs(20),
        || {
            let metrics = serve.scrape();
            metrics.value("vsr_recovery_latency_ms_count{replica_id=\"0\"}") == Some(1.0)
                && metrics.value("vsr_view_number{replica_id=\"0\"}") == Some(1.0)
                && metrics.value("vsr_replica_status{replica_id=\"0\"}") == Some(0.0)
                && metrics.value("vsr_replica_up{replica_id=\"0\"}") == Some(1.0)
        },
    );
    testkit::BenchResult::from_child(load).assert_verified();
    assert!(serve.log().contains("all processes"));
    assert!(std::path::Path::new(&format!("/proc/{new_pid}")).exists());
}

/// Every semaphore of the replica, read from its memory.
fn semaphores(pid: u32) -> Vec<(String, u16)> {
    let binary = vsrscope::process::executable(pid).unwrap();
    let base = vsrscope::process::load_base(pid).unwrap();
    let discovery = vsrscope::usdt::discover_file(&binary).unwrap();
    let mut values: Vec<(String, u16)> = discovery
        .sites
        .iter()
        .map(|site| {
            (
                site.name.clone(),
                vsrscope::process::read_semaphore(pid, base + site.semaphore_address).unwrap(),
            )
        })
        .collect();
    values.dedup();
    values
}

/// Ids of the loaded programs vsrscope names `prepare_quorum` and `client_reply_batch`
/// (truncated by the kernel to `client_reply_ba`), whoever loaded them.
fn loaded_vsrscope_programs() -> BTreeSet<u64> {
    let output = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool is installed (scripts/setup)");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|line| {
            line.contains("name prepare_quorum") || line.contains("name client_reply_ba")
        })
        .filter_map(|line| line.split(':').next()?.trim().parse().ok())
        .collect()
}

#[test]
fn sigkill_of_vsrscope_leaves_no_probe_enabled_and_no_program_loaded() {
    let cluster = Cluster::start("vsrscope-sigkill", 1, &[]);
    let pid = cluster.pid(0);
    assert!(
        semaphores(pid).iter().all(|(_, value)| *value == 0),
        "{:?}",
        semaphores(pid)
    );
    // Another vsrscope on the machine (another test) has programs of its own: only those this
    // one loaded must go.
    let before = loaded_vsrscope_programs();
    let mut serve = Serve::start(&cluster.directory.0, &["--pid", &pid.to_string()]);
    let enabled: Vec<String> = semaphores(pid)
        .into_iter()
        .filter(|(_, value)| *value > 0)
        .map(|(name, _)| name)
        .collect();
    assert!(
        enabled.contains(&"prepare_quorum".to_string())
            && enabled.contains(&"state_snapshot".to_string()),
        "{enabled:?}"
    );
    assert!(
        !enabled.contains(&"client_reply".to_string()),
        "vsrscope leaves per-request probes off: {enabled:?}"
    );
    let loaded: BTreeSet<u64> = loaded_vsrscope_programs()
        .difference(&before)
        .copied()
        .collect();
    assert!(!loaded.is_empty());
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    wait_until("semaphores back to 0", Duration::from_secs(10), || {
        semaphores(pid).iter().all(|(_, value)| *value == 0)
    });
    wait_until("programs unloaded", Duration::from_secs(10), || {
        loaded_vsrscope_programs().is_disjoint(&loaded)
    });
    let bench = cluster.bench(&["--duration-s", "1", "--clients", "4", "--verify"]);
    bench.assert_verified();
}

fn vsrscope(arguments: &[&str]) -> std::process::Output {
    Command::new(vsrscope_binary())
        .args(arguments)
        .output()
        .unwrap()
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let directory = TestDirectory::new("vsrscope-bad-input");
    let not_elf = directory.0.join("notes.txt");
    std::fs::write(&not_elf, b"not an executable").unwrap();
    let not_elf = not_elf.to_str().unwrap();
    assert_clear_failure(
        &vsrscope(&["serve", "--pid", "999999"]),
        "no process with pid 999999",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--binary", not_elf]),
        "not an ELF file",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--binary", "/bin/true"]),
        "no `vsr` probes",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--binary", "/no/such/file"]),
        "no such file",
    );
    assert_clear_failure(
        &vsrscope(&["list", "--binary", "/bin/true"]),
        "no USDT probes",
    );
    assert_clear_failure(
        &vsrscope(&["list", "--pid", "999999"]),
        "no process with pid 999999",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--buckets", "vsr_nope_ms=1,2"]),
        "is not one of vsr_prepare_latency_ms",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--buckets", "vsr_prepare_latency_ms=5,1"]),
        "strictly increasing",
    );
    assert_clear_failure(
        &vsrscope(&["serve", "--buckets", "vsr_prepare_latency_ms=1,x"]),
        "\"x\" is not a number",
    );
    let no_probes = std::env::var("VSR_NO_PROBES_REPLICA")
        .expect("scripts/test builds the no-probe replica and sets VSR_NO_PROBES_REPLICA");
    assert_clear_failure(
        &vsrscope(&["list", "--binary", &no_probes]),
        "no USDT probes",
    );

    let replica = testkit::replica_binary();
    let unprivileged = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(vsrscope_binary())
        .args(["serve", "--binary", replica.to_str().unwrap()])
        .output()
        .unwrap();
    assert_clear_failure(&unprivileged, "CAP_BPF and CAP_PERFMON");
}

#[test]
fn snapshot_and_top_show_every_replica() {
    let cluster = Cluster::start("vsrscope-snapshot", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(2, "Normal in view 0", Duration::from_secs(5));
    let output = vsrscope(&[
        "snapshot",
        "--binary",
        cluster.binary.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = String::from_utf8_lossy(&output.stdout);
    for replica in 0..3 {
        assert!(
            json.contains(&format!("\"replica_id\":{replica},")),
            "{json}"
        );
    }
    assert_eq!(json.matches("\"is_primary\":1").count(), 1, "{json}");
}

#[test]
fn top_refreshes_a_row_per_replica_with_its_rate() {
    let cluster = Cluster::start("vsrscope-top", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(2, "Normal in view 0", Duration::from_secs(5));
    let load =
        cluster.bench_in_background(&["--duration-s", "5", "--rate", "2000", "--clients", "8"]);
    let output = vsrscope(&[
        "top",
        "--binary",
        cluster.binary.to_str().unwrap(),
        "--iterations",
        "3",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.rsplit("vsrscope top").next().unwrap();
    let rows: Vec<&str> = last
        .lines()
        .filter(|line| line.contains("normal"))
        .collect();
    assert_eq!(rows.len(), 3, "{last}");
    let primaries = rows
        .iter()
        .filter(|row| row.split_whitespace().next().unwrap().ends_with('*'))
        .count();
    assert_eq!(primaries, 1, "one primary: {last}");
    // Every replica executes every op: ops/s near the target rate (more while catching up).
    for row in rows {
        let rate: f64 = row
            .split_whitespace()
            .nth(4)
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{row}"));
        assert!((1000.0..10000.0).contains(&rate), "{row}");
    }
    let _ = testkit::BenchResult::from_child(load);
}

/// Compiles `tests/sdt/fire.c` at `optimisation` into `directory`.
fn compile_sdt_program(directory: &Path, optimisation: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdt/fire.c");
    let binary = directory.join(format!("fire{optimisation}"));
    let status = Command::new("gcc")
        .arg(optimisation)
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "gcc {optimisation} (needs systemtap-sdt-dev, installed by scripts/setup)"
    );
    binary
}

/// `<sys/sdt.h>` marks a site with a 1-byte `nop`.
const NOP1: &[u8] = &[0x90];
/// The replica's probes use the 5-byte `nop` that Linux turns into a trampoline call.
const NOP5: &[u8] = &[0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The bytes at each site's file offset must be the probe's `nop`: proof that the address was
/// translated to the right place in the file, whatever the linker's layout.
fn assert_sites_are_nops(binary: &Path, nop: &[u8]) -> usize {
    let bytes = std::fs::read(binary).unwrap();
    let discovery = vsrscope::usdt::discover_file(binary).unwrap();
    assert!(!discovery.sites.is_empty(), "{}", binary.display());
    for site in &discovery.sites {
        let offset = site.file_offset as usize;
        assert_eq!(
            &bytes[offset..offset + nop.len()],
            nop,
            "{} {} at {:#x}",
            binary.display(),
            site.name,
            site.file_offset
        );
    }
    discovery.sites.len()
}

#[test]
fn c_probes_at_o0_and_o2_decode_stack_register_and_constant_arguments() {
    let directory = TestDirectory::new("vsrscope-sdt");
    let count = 1000u64;
    for optimisation in ["-O0", "-O2"] {
        let binary = compile_sdt_program(&directory.0, optimisation);
        assert_sites_are_nops(&binary, NOP1);
        let discovery = vsrscope::usdt::discover_file(&binary).unwrap();
        let site = &discovery.sites[0];
        let kinds: Vec<u8> = site
            .arguments
            .iter()
            .map(|argument| argument.kind)
            .collect();
        if optimisation == "-O0" {
            assert!(
                kinds.contains(&vsrscope_common::ARG_REGISTER_DEREF),
                "stack arguments at -O0: {}",
                site.arguments_text
            );
        } else {
            assert!(
                kinds.contains(&vsrscope_common::ARG_CONSTANT),
                "a constant at -O2: {}",
                site.arguments_text
            );
        }
        // The eBPF side reads them right: count and exact sum of the fired latencies.
        // Custom buckets and the kernel's run-time statistics ride along.
        let serve = Serve::start(
            &directory.0,
            &[
                "--binary",
                binary.to_str().unwrap(),
                "--buckets",
                "vsr_prepare_latency_ms=1,1.0005,2",
                "--program-run-time",
            ],
        );
        let status = Command::new(&binary)
            .arg(count.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let metrics = serve.scrape();
        assert_eq!(
            metrics.get("vsr_prepare_latency_ms_count{replica_id=\"3\"}"),
            count as f64,
            "{optimisation}"
        );
        let expected_sum_ms = (0..count).map(|op| 1_000_000 + op).sum::<u64>() as f64 / 1e6;
        let sum = metrics.get("vsr_prepare_latency_ms_sum{replica_id=\"3\"}");
        assert!(
            (sum - expected_sum_ms).abs() < 1e-6,
            "{optimisation}: sum {sum} vs {expected_sum_ms}"
        );
        let bucket = |le: &str| {
            metrics.get(&format!(
                "vsr_prepare_latency_ms_bucket{{replica_id=\"3\",le=\"{le}\"}}"
            ))
        };
        assert_eq!(
            bucket("1"),
            1.0,
            "only 1,000,000 ns is ≤ 1 ms (upper bounds are inclusive)"
        );
        assert_eq!(bucket("1.0005"), 501.0, "1,000,000..=1,000,500 ns");
        assert_eq!(bucket("2"), count as f64);
        assert_eq!(
            metrics.get("vsrscope_program_runs_total{program=\"prepare_quorum\"}"),
            count as f64
        );
        assert!(
            metrics.get("vsrscope_program_run_seconds_total{program=\"prepare_quorum\"}") > 0.0
        );
    }
}

#[test]
fn replica_sites_translate_to_nops_with_rust_lld_and_gnu_ld() {
    let [rust_lld, gnu_ld] = replica_builds();
    assert!(assert_sites_are_nops(&rust_lld, NOP5) > 20);
    assert!(assert_sites_are_nops(&gnu_ld, NOP5) > 20);
    let names = |binary: &Path| {
        vsrscope::usdt::discover_file(binary)
            .unwrap()
            .probe_names("vsr")
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&gnu_ld), names(&rust_lld));
}

/// The replica built by rust-lld and the one built by GNU ld (scripts/test sets its path).
fn replica_builds() -> [PathBuf; 2] {
    let gnu_ld = std::env::var("VSR_GNU_LD_REPLICA")
        .expect("scripts/test builds the replica with GNU ld and sets VSR_GNU_LD_REPLICA");
    [testkit::replica_binary(), PathBuf::from(gnu_ld)]
}

/// Every note of the replica describes a live site: notes of code the linker discarded go with
/// it, so vsrscope lists no dead note and bpftrace has none to warn about (`WARNING: invalid
/// address … for probe`). Counted against `readelf`, which lists every note, dead or not.
#[test]
fn replica_notes_all_describe_live_sites() {
    for binary in replica_builds() {
        let discovery = vsrscope::usdt::discover_file(&binary).unwrap();
        assert_eq!(
            discovery.sites.len(),
            testkit::note_locations(&binary).len(),
            "{}: {:?}",
            binary.display(),
            discovery.dead_notes
        );
        let list = vsrscope(&["list", "--binary", binary.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&list.stdout);
        assert!(list.status.success(), "{list:?}");
        assert!(
            stdout.lines().next().unwrap().ends_with(", 0 dead notes")
                && !stdout.contains("dead note "),
            "{stdout}"
        );
        let probes = format!("usdt:{}:vsr:*", binary.display());
        let listing = Command::new("bpftrace")
            .args(["-l", &probes])
            .output()
            .unwrap();
        let one_liner = Command::new("bpftrace")
            .arg("-e")
            .arg(format!(
                "{probes} {{ @hits[probe] = count(); }} BEGIN {{ exit(); }}"
            ))
            .output()
            .unwrap();
        for output in [&listing, &one_liner] {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{output:?}");
            assert!(!stderr.contains("invalid address"), "{stderr}");
        }
        assert!(
            String::from_utf8_lossy(&listing.stdout).contains(":vsr:state_snapshot"),
            "{listing:?}"
        );
    }
}

/// No probe site of the replica sits in a function that keeps data below `%rsp`, where an
/// attached uprobe's trampoline call writes (probes/tests/red_zone.rs shows the damage).
#[test]
fn replica_probe_sites_are_not_in_red_zone_code() {
    for binary in replica_builds() {
        let report = testkit::red_zone_sites(&binary);
        let sites = vsrscope::usdt::discover_file(&binary).unwrap().sites.len();
        assert_eq!(report.checked, sites, "{}", binary.display());
        assert!(
            report.offending.is_empty(),
            "{}:\n{}",
            binary.display(),
            report.offending.join("\n")
        );
    }
}

#[test]
fn on_demand_attaches_while_scraped_and_counters_stay_monotonic() {
    let cluster = Cluster::start("vsrscope-on-demand", 1, &["--snapshot-interval-ms", "100"]);
    let pid = cluster.pid(0);
    let enabled = || semaphores(pid).iter().any(|(_, value)| *value > 0);
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--on-demand",
            "--idle-timeout-s",
            "3",
        ],
    );
    assert!(!enabled(), "nothing attached before the first scrape");
    serve.scrape();
    assert!(enabled(), "the first scrape attaches");
    let first = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(first.status.success());
    let operations = "vsr_operations_total{replica_id=\"0\",status=\"success\"}";
    let counted = serve.scrape().get(operations);
    assert_eq!(counted, first.acknowledged as f64);
    wait_until(
        "detach after 3 s without scrapes",
        Duration::from_secs(15),
        || !enabled(),
    );
    // Unobserved load is not counted; observed load adds to the same counter.
    assert!(
        cluster
            .bench(&["--duration-s", "1", "--clients", "4"])
            .status
            .success()
    );
    serve.scrape();
    let second = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(second.status.success());
    assert_eq!(
        serve.scrape().get(operations),
        counted + second.acknowledged as f64
    );
    assert!(serve.log().contains("detached"));
}
