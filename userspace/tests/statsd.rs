//! `vsrscope serve --statsd` against a real StatsD server: Etsy's `statsd` daemon from npm
//! (installed by scripts/setup), which sums the counter increments it receives. Its flush
//! interval is set to an hour, so what it holds is the sum of everything vsrscope sent; that sum
//! must equal the load generator's acknowledged operations and what `/metrics` shows, and must
//! stay there while vsrscope keeps flushing (sending running totals as `|c` would multiply it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regex::Regex;
use testkit::{Cluster, Serve, free_address, wait_until};

/// The statsd daemon on loopback; killed when dropped.
struct StatsdDaemon {
    child: Child,
    port: u16,
    management: SocketAddr,
}

impl StatsdDaemon {
    fn start(directory: &Path) -> StatsdDaemon {
        let daemon = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/npm/node_modules/statsd/stats.js");
        assert!(
            daemon.exists(),
            "{} is missing: scripts/setup installs the statsd daemon from npm",
            daemon.display()
        );
        let (port, management) = (free_address().port(), free_address());
        let config = directory.join("statsd-config.js");
        std::fs::write(
            &config,
            format!(
                "{{ address: \"127.0.0.1\", port: {port}, mgmt_address: \"127.0.0.1\", \
                 mgmt_port: {}, flushInterval: 3600000, backends: [] }}\n",
                management.port()
            ),
        )
        .unwrap();
        let child = Command::new("node")
            .arg(&daemon)
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed");
        let statsd = StatsdDaemon {
            child,
            port,
            management,
        };
        wait_until("statsd to listen", Duration::from_secs(20), || {
            TcpStream::connect(statsd.management).is_ok()
        });
        statsd
    }

    /// `counters` or `gauges` from the management interface, parsed.
    fn values(&self, kind: &str) -> BTreeMap<String, f64> {
        let mut stream = TcpStream::connect(self.management).unwrap();
        stream.write_all(format!("{kind}\n").as_bytes()).unwrap();
        let mut text = String::new();
        for line in BufReader::new(stream).lines() {
            let line = line.unwrap();
            if line == "END" {
                break;
            }
            text.push_str(&line);
        }
        Regex::new(r"'([^']+)': ([-0-9.e+]+)")
            .unwrap()
            .captures_iter(&text)
            .map(|capture| (capture[1].to_string(), capture[2].parse().unwrap()))
            .collect()
    }
}

impl Drop for StatsdDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn statsd_receives_increases_that_sum_to_ground_truth() {
    let cluster = Cluster::start("statsd", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let statsd = StatsdDaemon::start(&cluster.directory.0);
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--statsd",
            &format!("127.0.0.1:{}", statsd.port),
            "--statsd-interval-s",
            "1",
        ],
    );
    let bench = cluster.bench(&["--duration-s", "3", "--clients", "16"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    let operations = "vsr_operations_total.replica_id_0.status_success";
    wait_until(
        "StatsD to hold every acknowledged operation",
        Duration::from_secs(20),
        || statsd.values("counters").get(operations) == Some(&(bench.acknowledged as f64)),
    );
    let metrics = serve.scrape();
    assert_eq!(
        metrics.get("vsr_operations_total{replica_id=\"0\",status=\"success\"}"),
        bench.acknowledged as f64
    );
    // Three more flushes: the sums must not move (increases, not running totals).
    std::thread::sleep(Duration::from_millis(3500));
    let counters = statsd.values("counters");
    assert_eq!(counters.get(operations), Some(&(bench.acknowledged as f64)));
    // Histogram buckets arrive as per-bucket counts that add up to the count, as in /metrics.
    let buckets: f64 = counters
        .iter()
        .filter(|(name, _)| name.starts_with("vsr_client_latency_ms.bucket.replica_id_0."))
        .map(|(_, value)| value)
        .sum();
    let count = counters["vsr_client_latency_ms.count.replica_id_0"];
    assert_eq!(buckets, count);
    assert_eq!(
        count,
        serve
            .scrape()
            .get("vsr_client_latency_ms_count{replica_id=\"0\"}")
    );
    // Gauges carry real values.
    let gauges = statsd.values("gauges");
    assert_eq!(gauges.get("vsr_quorum_size.replica_id_0"), Some(&2.0));
    assert_eq!(gauges.get("vsr_cluster_size.replica_id_1"), Some(&3.0));
    assert!(gauges["vsr_memory_used_bytes.replica_id_2"] > 0.0);
}

#[test]
fn sends_to_a_port_nobody_listens_on_are_counted_as_failures() {
    let directory = testkit::TestDirectory::new("statsd-unreachable");
    // A UDP port with no listener (the socket that found it is closed at once): the kernel
    // answers every datagram with ICMP port unreachable.
    let nobody = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let serve = Serve::start(
        &directory.0,
        &[
            "--binary",
            testkit::replica_binary().to_str().unwrap(),
            "--statsd",
            &nobody.to_string(),
            "--statsd-interval-s",
            "1",
        ],
    );
    wait_until(
        "failed StatsD flushes to be counted",
        Duration::from_secs(20),
        || {
            serve
                .scrape()
                .value("vsrscope_push_failures_total{exporter=\"statsd\"}")
                .is_some_and(|failures| failures >= 2.0)
        },
    );
    assert!(
        serve.log().contains("statsd push failed"),
        "{}",
        serve.log()
    );
}
