//! Counters through a replica restart: a replica killed with SIGKILL mid-load and started again
//! on its data directory replays its journal without firing execution probes, so its
//! `vsr_operations_total` continues where it stopped instead of jumping by its whole history.
//! Ground truth is `vsr-bench`'s count of acknowledged operations.

use std::time::Duration;

use testkit::{BenchResult, Cluster, Metrics, Serve, wait_until};

/// Ops a restarted replica may count differently from its peers: those journaled but not yet
/// executed when it was killed, which replay executes silently, and its newest executed op,
/// which replay leaves for the cluster to commit again when no successor confirms it. Both
/// are bounded by the pipeline (`pipeline_max`, 16).
const IN_FLIGHT_WINDOW: f64 = 16.0;

fn operations(metrics: &Metrics, replica: usize) -> f64 {
    metrics
        .value(&format!(
            "vsr_operations_total{{replica_id=\"{replica}\",status=\"success\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn a_restarted_replica_continues_its_operations_count() {
    const RESTARTED: usize = 2;
    let mut cluster = Cluster::start("restart-continuity", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(10));
    // By path, so the restarted process is attached too.
    let serve = Serve::start(
        &cluster.directory.0,
        &["--binary", cluster.binary.to_str().unwrap()],
    );
    let bench = cluster.bench_in_background(&["--duration-s", "6", "--clients", "8"]);
    wait_until("load to reach replica 2", Duration::from_secs(20), || {
        operations(&serve.scrape(), RESTARTED) > 2000.0
    });
    cluster.kill(RESTARTED);
    let before_restart = operations(&serve.scrape(), RESTARTED);
    cluster.start_replica(RESTARTED);
    let bench = BenchResult::from_child(bench);
    assert!(bench.status.success(), "{}", bench.stderr);
    let acknowledged = bench.acknowledged as f64;
    assert!(
        acknowledged > before_restart + 1000.0,
        "the load outlasted the restart"
    );
    // Backups learn the newest commit from the primary's next heartbeat.
    wait_until(
        "every peer to count every op",
        Duration::from_secs(20),
        || {
            let metrics = serve.scrape();
            (0..3)
                .filter(|replica| *replica != RESTARTED)
                .all(|replica| operations(&metrics, replica) == acknowledged)
        },
    );
    let commit = |metrics: &Metrics, replica: usize| {
        metrics.value(&format!("vsr_commit_number{{replica_id=\"{replica}\"}}"))
    };
    let mut metrics = serve.scrape();
    wait_until(
        "the restarted replica to commit what its peers did",
        Duration::from_secs(30),
        || {
            metrics = serve.scrape();
            commit(&metrics, RESTARTED).is_some()
                && commit(&metrics, RESTARTED) == commit(&metrics, 0)
        },
    );
    let restarted = operations(&metrics, RESTARTED);
    eprintln!("restarted replica counted {restarted}, its peers {acknowledged}");
    assert!(
        (restarted - acknowledged).abs() <= IN_FLIGHT_WINDOW,
        "restarted replica counted {restarted}, its peers {acknowledged}"
    );
    assert!(
        restarted > before_restart,
        "the new process counts on from {before_restart}"
    );
}
