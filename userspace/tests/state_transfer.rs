//! State transfer seen through vsrscope: a backup stopped (SIGSTOP) while its peers checkpoint
//! far past its head catches up by fetching a peer's checkpoint after SIGCONT, and vsrscope
//! exports one `vsr_state_transfer_latency_ms` sample for it, and the replica's commit back
//! level with its peers'. Ground truth: the replica's own log line for the installed checkpoint.

use std::time::Duration;

use testkit::{Cluster, Metrics, Serve, signal, wait_until};

fn transfers(metrics: &Metrics, replica: usize) -> f64 {
    metrics
        .value(&format!(
            "vsr_state_transfer_latency_ms_count{{replica_id=\"{replica}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn a_replica_that_fell_behind_its_peers_checkpoints_is_seen_transferring_state() {
    let cluster = Cluster::start(
        "state-transfer-metrics",
        3,
        &[
            "--checkpoint-interval-ops",
            "256",
            "--snapshot-interval-ms",
            "100",
        ],
    );
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(10));
    let serve = Serve::start(
        &cluster.directory.0,
        &["--binary", cluster.binary.to_str().unwrap()],
    );
    wait_until(
        "replica 2's first snapshot",
        Duration::from_secs(10),
        || {
            serve
                .scrape()
                .value("vsr_replica_status{replica_id=\"2\"}")
                .is_some()
        },
    );
    assert_eq!(
        transfers(&serve.scrape(), 2),
        0.0,
        "exported at zero from attach"
    );
    signal(cluster.pid(2), "STOP");
    cluster.bench_past_a_stopped_replica();
    signal(cluster.pid(2), "CONT");
    cluster.wait_for_log(2, "(state transfer)", Duration::from_secs(20));
    let mut metrics = serve.scrape();
    wait_until(
        "vsrscope to count the transfer",
        Duration::from_secs(10),
        || {
            metrics = serve.scrape();
            transfers(&metrics, 2) == 1.0
        },
    );
    let latency_ms = metrics
        .value("vsr_state_transfer_latency_ms_sum{replica_id=\"2\"}")
        .unwrap();
    assert!(latency_ms > 0.0, "a transfer takes time: {latency_ms} ms");
    for replica in [0, 1] {
        assert_eq!(
            transfers(&metrics, replica),
            0.0,
            "replica {replica} never fell behind"
        );
    }
    wait_until(
        "replica 2 back in normal status",
        Duration::from_secs(10),
        || serve.scrape().value("vsr_replica_status{replica_id=\"2\"}") == Some(0.0),
    );
}
