//! Counter and histogram series exist at zero from the moment vsrscope knows their replica, so
//! the first increment is an increase that `rate()` and `increase()` see, not the birth of a
//! series at its value. Checked in the exposition and in a real Prometheus's storage, against
//! `vsr-bench`'s count of acknowledged operations.

use std::time::Duration;

use testkit::{Cluster, Prometheus, Serve, wait_until};

const OPERATIONS: &str = "vsr_operations_total{replica_id=\"0\",status=\"success\"}";

#[test]
fn series_start_at_zero_and_prometheus_sees_the_first_increment() {
    let cluster = Cluster::start("first-increment", 1, &["--snapshot-interval-ms", "100"]);
    let serve = Serve::start(
        &cluster.directory.0,
        &["--binary", cluster.binary.to_str().unwrap()],
    );
    wait_until(
        "the replica's first snapshot",
        Duration::from_secs(10),
        || serve.scrape().value("vsr_replica_up{replica_id=\"0\"}") == Some(1.0),
    );
    let idle = serve.scrape();
    for series in [
        OPERATIONS,
        "vsr_operations_total{replica_id=\"0\",status=\"failure\"}",
        "vsr_duplicate_requests_total{replica_id=\"0\"}",
        "vsr_repairs_total{replica_id=\"0\",status=\"success\"}",
        "vsr_client_latency_ms_count{replica_id=\"0\"}",
        "vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"+Inf\"}",
        "vsr_recovery_latency_ms_sum{replica_id=\"0\"}",
    ] {
        assert_eq!(idle.value(series), Some(0.0), "{series} in:\n{}", idle.text);
    }

    let prometheus = Prometheus::start(&cluster.directory.0, serve.address);
    wait_until(
        "Prometheus to store the zero",
        Duration::from_secs(60),
        || prometheus.value(OPERATIONS) == Some(0.0),
    );
    let bench = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    let acknowledged = bench.acknowledged as f64;
    wait_until(
        "Prometheus to store the load",
        Duration::from_secs(30),
        || prometheus.value(OPERATIONS) == Some(acknowledged),
    );
    let window = format!("{OPERATIONS}[1h]");
    assert_eq!(
        prometheus.value(&format!("min_over_time({window})")),
        Some(0.0)
    );
    // From a zero the whole load is an increase (extrapolation only adds to it).
    let increase = prometheus.value(&format!("increase({window})")).unwrap();
    assert!(
        increase >= acknowledged,
        "increase {increase} < {acknowledged}"
    );
}
