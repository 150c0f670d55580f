//! `vsrscope serve --on-demand` over many attach/detach cycles and through a failed attach,
//! against a real replica. Whether vsrscope is attached is read from the replica's own probe
//! semaphore (the kernel raises it while a uprobe is on the probe), and counts are compared
//! with `vsr-bench`'s acknowledged operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::{BenchResult, Cluster, Serve};

const OPERATIONS: &str = "vsr_operations_total{replica_id=\"0\",status=\"success\"}";

/// One probe's semaphore in a running replica.
struct Semaphore {
    pid: u32,
    address: u64,
}

impl Semaphore {
    fn of(pid: u32, probe: &str) -> Semaphore {
        let binary = vsrscope::process::executable(pid).unwrap();
        let discovery = vsrscope::usdt::discover_file(&binary).unwrap();
        let site = discovery
            .sites
            .iter()
            .find(|site| site.name == probe)
            .unwrap_or_else(|| panic!("no {probe} site"));
        Semaphore {
            pid,
            address: vsrscope::process::load_base(pid).unwrap() + site.semaphore_address,
        }
    }

    fn enabled(&self) -> bool {
        vsrscope::process::read_semaphore(self.pid, self.address).unwrap() > 0
    }
}

/// Polls every millisecond, finer than testkit's 20 ms, for sub-second idle timeouts.
fn wait_briefly(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn detaches(serve: &Serve) -> usize {
    serve.log().matches(": detached").count()
}

/// Load while a second thread keeps scraping, so a short idle timeout never detaches. Returns
/// the bench result and the operations vsrscope counted meanwhile, or `None` when vsrscope
/// detached anyway (a scrape delayed past the idle timeout on a loaded machine).
fn counted_under_load(cluster: &Cluster, serve: &Serve) -> Option<(BenchResult, f64)> {
    // Absent until the replica's first operation on main's exporter.
    let before = serve.scrape().value(OPERATIONS).unwrap_or(0.0);
    let detached_before = detaches(serve);
    let done = Arc::new(AtomicBool::new(false));
    let bench = std::thread::scope(|scope| {
        let keeper = {
            let done = done.clone();
            scope.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    serve.scrape();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let bench = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
        done.store(true, Ordering::Relaxed);
        keeper.join().unwrap();
        bench
    });
    assert!(bench.status.success(), "{}", bench.stderr);
    let counted = serve.scrape().get(OPERATIONS) - before;
    (detaches(serve) == detached_before).then_some((bench, counted))
}

/// The operations vsrscope counts equal vsr-bench's, retried when vsrscope detached meanwhile.
fn assert_counts_load(cluster: &Cluster, serve: &Serve) {
    for _attempt in 0..3 {
        if let Some((bench, counted)) = counted_under_load(cluster, serve) {
            assert_eq!(counted, bench.acknowledged as f64, "{}", serve.log());
            return;
        }
    }
    panic!("vsrscope detached during every load run:\n{}", serve.log());
}

fn serve_on_demand(cluster: &Cluster, idle_timeout_s: &str) -> Serve {
    Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--on-demand",
            "--idle-timeout-s",
            idle_timeout_s,
        ],
    )
}

/// Past the 28 cycles after which cookie slots ran out before they were reused. More do not
/// fit a test run: the kernel detaches a perf-event uprobe under a global mutex with an RCU
/// grace period each, about 2.7 s for the replica's 36 sites here. A thousand cycles of slot
/// reuse are covered by `cookie_slots`' unit tests.
const CYCLES: usize = 30;

#[test]
fn on_demand_survives_repeated_attach_cycles() {
    let cluster = Cluster::start("on-demand-cycles", 1, &["--snapshot-interval-ms", "100"]);
    let semaphore = Semaphore::of(cluster.pid(0), "commit_execute");
    let serve = serve_on_demand(&cluster, "0.05");
    let started = Instant::now();
    for cycle in 0..CYCLES {
        serve.scrape();
        assert!(
            semaphore.enabled(),
            "cycle {cycle}: the scrape did not attach:\n{}",
            serve.log()
        );
        wait_briefly(
            &format!("cycle {cycle} to detach"),
            Duration::from_secs(30),
            || !semaphore.enabled(),
        );
    }
    wait_briefly("the last detach to finish", Duration::from_secs(30), || {
        detaches(&serve) == CYCLES
    });
    eprintln!("{CYCLES} attach/detach cycles in {:?}", started.elapsed());
    assert_counts_load(&cluster, &serve);
}

fn rename(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap();
}

#[test]
fn a_failed_on_demand_attach_is_exported_and_retried() {
    let cluster = Cluster::start("on-demand-failure", 1, &["--snapshot-interval-ms", "100"]);
    let semaphore = Semaphore::of(cluster.pid(0), "commit_execute");
    // Longer than a detach elsewhere on the machine can stall a scrape (the kernel unregisters
    // uprobes one at a time under one lock, seconds for a whole replica): the load below must
    // not see this vsrscope detach while it scrapes every few milliseconds.
    let serve = serve_on_demand(&cluster, "5");
    let attached = serve.scrape();
    assert!(semaphore.enabled());
    assert_eq!(attached.get("vsrscope_attach_failing"), 0.0);
    wait_briefly("detach", Duration::from_secs(30), || !semaphore.enabled());
    // The running replica keeps its inode; only the path vsrscope attaches by is gone, as
    // during an upgrade that replaces the binary.
    let moved = PathBuf::from(format!("{}.moved", cluster.binary.display()));
    rename(&cluster.binary, &moved);
    let failed = serve.scrape();
    rename(&moved, &cluster.binary);
    assert!(!semaphore.enabled());
    assert_eq!(
        failed.get("vsrscope_attach_failing"),
        1.0,
        "{}",
        failed.text
    );
    assert_eq!(failed.get("vsrscope_attach_failures_total"), 1.0);
    assert_eq!(failed.get("vsrscope_attached_sites"), 0.0);
    let recovered = serve.scrape();
    assert!(semaphore.enabled(), "the next scrape attaches again");
    assert_eq!(recovered.get("vsrscope_attach_failing"), 0.0);
    assert_eq!(recovered.get("vsrscope_attach_failures_total"), 1.0);
    assert_counts_load(&cluster, &serve);
}
