//! `vsrscope serve --otlp-*` against real receivers: a receiver built on the official
//! OpenTelemetry protobufs (PyPI `opentelemetry-proto` + `grpcio`, testkit/receivers/
//! otlp_receiver.py) that records every `ExportMetricsServiceRequest` it decodes, and the `rotel`
//! collector (PyPI, an independent implementation) receiving over gRPC and HTTP and forwarding
//! to that receiver. What arrives must equal the load generator's acknowledged operations and
//! what `/metrics` shows once the load has stopped. scripts/setup installs both into target/venv.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::{Cluster, Metrics, Serve, free_address, wait_until};

fn venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv");
    assert!(
        venv.join("bin/python").exists(),
        "{} is missing: scripts/setup installs the OTLP receivers",
        venv.display()
    );
    venv
}

/// The protobuf-based receiver; killed when dropped.
struct Receiver {
    child: Child,
    grpc_port: u16,
    http_port: u16,
    journal: PathBuf,
}

impl Receiver {
    fn start(directory: &Path, name: &str, refuse: u32) -> Receiver {
        Receiver::start_on(
            directory,
            name,
            refuse,
            free_address().port(),
            free_address().port(),
            &[],
        )
    }

    /// `extra`: more receiver arguments (its TLS certificate and key).
    fn start_on(
        directory: &Path,
        name: &str,
        refuse: u32,
        grpc_port: u16,
        http_port: u16,
        extra: &[&str],
    ) -> Receiver {
        let journal = directory.join(format!("{name}.jsonl"));
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/receivers/otlp_receiver.py");
        let mut child = Command::new(venv().join("bin/python"))
            .arg(script)
            .args(["--grpc-port", &grpc_port.to_string()])
            .args(["--http-port", &http_port.to_string()])
            .args(["--refuse", &refuse.to_string()])
            .args(extra)
            // grpcio logs every failed TLS handshake (the untrusted case) at INFO.
            .env("GRPC_VERBOSITY", "ERROR")
            .arg("--out")
            .arg(&journal)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "the receiver did not start");
        Receiver {
            child,
            grpc_port,
            http_port,
            journal,
        }
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn received(&self) -> Received {
        Received::from_requests(&self.requests())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rotel, receiving OTLP over gRPC and HTTP and forwarding over gRPC; killed when dropped.
struct Rotel {
    child: Child,
    grpc_port: u16,
    http_port: u16,
}

impl Rotel {
    fn start(forward_to: &Receiver) -> Rotel {
        let agent = venv().join("lib/python3.11/site-packages/rotel/rotel-agent");
        let (grpc_port, http_port) = (free_address().port(), free_address().port());
        let child = Command::new(agent)
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--exporter", "otlp", "--otlp-exporter-protocol", "grpc"])
            .args([
                "--otlp-exporter-endpoint",
                &format!("http://127.0.0.1:{}", forward_to.grpc_port),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let rotel = Rotel {
            child,
            grpc_port,
            http_port,
        };
        wait_until("rotel to listen", Duration::from_secs(20), || {
            [rotel.grpc_port, rotel.http_port]
                .iter()
                .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok())
        });
        rotel
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn string_attributes(attributes: &Value) -> BTreeMap<String, String> {
    attributes
        .as_array()
        .into_iter()
        .flatten()
        .map(|attribute| {
            let value = &attribute["value"];
            let text = value["string_value"]
                .as_str()
                .map(str::to_string)
                .or_else(|| value["int_value"].as_str().map(str::to_string))
                .unwrap_or_else(|| value.to_string());
            (attribute["key"].as_str().unwrap().to_string(), text)
        })
        .collect()
}

/// protobuf JSON writes 64-bit integers as strings.
fn integer(value: &Value) -> u64 {
    value
        .as_str()
        .map(|text| text.parse().unwrap())
        .or_else(|| value.as_u64())
        .unwrap_or(0)
}

/// The newest data point of every series, whatever request (and however batched) it came in.
#[derive(Debug, Default)]
struct Received {
    /// By (service.name, service.instance.id): the resource's attributes.
    resources: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// By (service.name, metric, attributes as `k=v,…`): (metric kind, data point).
    points: BTreeMap<(String, String, String), (String, Value)>,
}

impl Received {
    fn from_requests(requests: &[Value]) -> Received {
        let mut received = Received::default();
        for request in requests {
            for resource_metrics in request["request"]["resource_metrics"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let resource = string_attributes(&resource_metrics["resource"]["attributes"]);
                let service = resource["service.name"].clone();
                received.resources.insert(
                    (service.clone(), resource["service.instance.id"].clone()),
                    resource,
                );
                for scope in resource_metrics["scope_metrics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    for metric in scope["metrics"].as_array().into_iter().flatten() {
                        let name = metric["name"].as_str().unwrap().to_string();
                        for kind in ["sum", "gauge", "histogram"] {
                            for point in
                                metric[kind]["data_points"].as_array().into_iter().flatten()
                            {
                                let attributes = string_attributes(&point["attributes"])
                                    .iter()
                                    .map(|(key, value)| format!("{key}={value}"))
                                    .collect::<Vec<_>>()
                                    .join(",");
                                let key = (service.clone(), name.clone(), attributes);
                                let newer = received.points.get(&key).is_none_or(|(_, old)| {
                                    integer(&old["time_unix_nano"])
                                        <= integer(&point["time_unix_nano"])
                                });
                                if newer {
                                    received
                                        .points
                                        .insert(key, (kind.to_string(), point.clone()));
                                }
                            }
                        }
                    }
                }
            }
        }
        received
    }

    fn point(&self, service: &str, metric: &str, attributes: &str) -> Option<&(String, Value)> {
        self.points.get(&(
            service.to_string(),
            metric.to_string(),
            attributes.to_string(),
        ))
    }

    fn integer(&self, service: &str, metric: &str, attributes: &str) -> Option<u64> {
        self.point(service, metric, attributes)
            .map(|(_, point)| integer(&point["as_int"]))
    }
}

/// What a received histogram says against the same series in `/metrics`: count, sum and every
/// bucket's own count (the exposition's are cumulative).
fn assert_histogram_matches(
    received: &Received,
    service: &str,
    metrics: &Metrics,
    name: &str,
    replica: u32,
) {
    let (kind, point) = received
        .point(service, name, &format!("replica_id={replica}"))
        .unwrap_or_else(|| panic!("{name} of replica {replica} not received"));
    assert_eq!(kind, "histogram");
    let count = integer(&point["count"]);
    assert_eq!(
        count as f64,
        metrics.get(&format!("{name}_count{{replica_id=\"{replica}\"}}"))
    );
    let sum = point["sum"].as_f64().unwrap();
    let exposed_sum = metrics.get(&format!("{name}_sum{{replica_id=\"{replica}\"}}"));
    assert!(
        (sum - exposed_sum).abs() <= 1e-9 * exposed_sum.max(1.0),
        "{sum} vs {exposed_sum}"
    );
    let buckets: Vec<u64> = point["bucket_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(integer)
        .collect();
    let bounds: Vec<f64> = point["explicit_bounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect();
    assert_eq!(buckets.len(), bounds.len() + 1);
    assert_eq!(buckets.iter().sum::<u64>(), count);
    let mut below = 0.0;
    for (bound, own) in bounds.iter().zip(&buckets) {
        let cumulative = metrics.get(&format!(
            "{name}_bucket{{replica_id=\"{replica}\",le=\"{bound}\"}}"
        ));
        assert_eq!(*own as f64, cumulative - below, "{name} bucket le={bound}");
        below = cumulative;
    }
}

fn operations(replica: u32) -> String {
    format!("replica_id={replica},status=success")
}

/// Waits until `service`'s latest export says every replica committed `acknowledged` operations.
fn wait_for_operations(receiver: &Receiver, service: &str, acknowledged: u64, timeout: Duration) {
    wait_until(
        &format!("{service}: every acknowledged operation to reach the receiver"),
        timeout,
        || {
            let received = receiver.received();
            (0..3).all(|replica| {
                received.integer(service, "vsr_operations_total", &operations(replica))
                    == Some(acknowledged)
            })
        },
    );
}

#[test]
fn otlp_over_grpc_equals_ground_truth_and_metrics() {
    let cluster = Cluster::start("otlp-grpc", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let receiver = Receiver::start(&cluster.directory.0, "received", 0);
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{}", receiver.grpc_port),
            "--otlp-interval-s",
            "1",
            "--otlp-header",
            "x-tenant=ledger-team",
        ],
    );
    let bench = cluster.bench(&["--duration-s", "3", "--clients", "16"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    wait_for_operations(
        &receiver,
        "vsr-replica",
        bench.acknowledged,
        Duration::from_secs(20),
    );
    // The load is over: one more export, then /metrics and the receiver describe the same state.
    let exports = receiver.requests().len();
    wait_until("one more export", Duration::from_secs(10), || {
        receiver.requests().len() > exports
    });
    let metrics = serve.scrape();
    let received = receiver.received();
    for replica in 0..3 {
        assert_eq!(
            metrics.get(&format!(
                "vsr_operations_total{{replica_id=\"{replica}\",status=\"success\"}}"
            )),
            bench.acknowledged as f64
        );
        // Gauges carry real values.
        let gauge = |name: &str| {
            let (kind, point) = received
                .point("vsr-replica", name, &format!("replica_id={replica}"))
                .unwrap_or_else(|| panic!("{name} of replica {replica}"));
            assert_eq!(kind, "gauge");
            point
                .get("as_int")
                .map(|value| integer(value) as f64)
                .or_else(|| point["as_double"].as_f64())
                .unwrap()
        };
        assert_eq!(gauge("vsr_quorum_size"), 2.0);
        assert_eq!(gauge("vsr_cluster_size"), 3.0);
        assert_eq!(
            gauge("vsr_commit_number"),
            metrics.get(&format!("vsr_commit_number{{replica_id=\"{replica}\"}}"))
        );
        assert!(gauge("vsr_memory_used_bytes") > 0.0);
        // Each replica is its own resource.
        let instance = received
            .resources
            .iter()
            .find(|((service, instance), _)| {
                service == "vsr-replica" && instance.ends_with(&format!("/replica-{replica}"))
            })
            .map(|(_, attributes)| attributes.clone())
            .unwrap_or_else(|| {
                panic!(
                    "no resource for replica {replica}: {:?}",
                    received.resources.keys()
                )
            });
        assert_eq!(
            instance["process.pid"],
            cluster.pid(replica as usize).to_string()
        );
        assert!(!instance["host.name"].is_empty());
    }
    // The primary measures the latencies.
    for histogram in [
        "vsr_client_latency_ms",
        "vsr_prepare_latency_ms",
        "vsr_commit_latency_ms",
    ] {
        assert_histogram_matches(&received, "vsr-replica", &metrics, histogram, 0);
    }
    // Counters are cumulative monotonic sums with a start time.
    let (kind, point) = received
        .point("vsr-replica", "vsr_operations_total", &operations(0))
        .unwrap();
    assert_eq!(kind, "sum");
    assert!(integer(&point["start_time_unix_nano"]) > 0);
    assert!(integer(&point["start_time_unix_nano"]) < integer(&point["time_unix_nano"]));
    // vsrscope's own resource, and the header on every request.
    assert!(
        received
            .integer("vsrscope", "vsrscope_attached_sites", "")
            .unwrap()
            > 0
    );
    assert!(
        receiver
            .requests()
            .iter()
            .all(|request| request["headers"]["x-tenant"] == "ledger-team")
    );
    assert_eq!(
        metrics.get("vsrscope_push_failures_total{exporter=\"otlp\"}"),
        0.0
    );
    assert!(metrics.get("vsrscope_pushes_total{exporter=\"otlp\"}") >= 3.0);
}

#[test]
fn rotel_receives_over_grpc_and_http_from_flags_and_environment() {
    let cluster = Cluster::start("otlp-rotel", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let receiver = Receiver::start(&cluster.directory.0, "forwarded", 0);
    let rotel = Rotel::start(&receiver);
    let binary = cluster.binary.to_str().unwrap().to_string();
    // Two vsrscopes at once, told apart by service.name: one configured by flags (gRPC), one by
    // the standard environment alone (HTTP/protobuf).
    let grpc_endpoint = format!("http://127.0.0.1:{}", rotel.grpc_port);
    let over_grpc = Serve::start_with_environment(
        &cluster.directory.0,
        &[
            "--binary",
            &binary,
            "--otlp-endpoint",
            &grpc_endpoint,
            "--otlp-interval-s",
            "1",
        ],
        &[("OTEL_SERVICE_NAME", "ledger-grpc")],
    );
    let http_endpoint = format!("http://127.0.0.1:{}", rotel.http_port);
    let over_http = Serve::start_with_environment(
        &cluster.directory.0,
        &["--binary", &binary],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &http_endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_SERVICE_NAME", "ledger-http"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test,team=storage%20core",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ],
    );
    let bench = cluster.bench(&["--duration-s", "3", "--clients", "16"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    for service in ["ledger-grpc", "ledger-http"] {
        wait_for_operations(
            &receiver,
            service,
            bench.acknowledged,
            Duration::from_secs(30),
        );
    }
    let exports = receiver.requests().len();
    wait_until("one more export", Duration::from_secs(10), || {
        receiver.requests().len() > exports + 1
    });
    let received = receiver.received();
    for serve in [&over_grpc, &over_http] {
        assert!(serve.log().contains("exporting OTLP"), "{}", serve.log());
    }
    assert_histogram_matches(
        &received,
        "ledger-grpc",
        &over_grpc.scrape(),
        "vsr_client_latency_ms",
        0,
    );
    assert_histogram_matches(
        &received,
        "ledger-http",
        &over_http.scrape(),
        "vsr_client_latency_ms",
        0,
    );
    let resource = received
        .resources
        .iter()
        .find(|((service, _), _)| service == "ledger-http")
        .map(|(_, attributes)| attributes)
        .unwrap();
    assert_eq!(resource["deployment.environment"], "test");
    assert_eq!(resource["team"], "storage core");
}

#[test]
fn a_receiver_that_restarts_or_refuses_loses_nothing_cumulative() {
    let cluster = Cluster::start("otlp-restart", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let receiver = Receiver::start(&cluster.directory.0, "before", 0);
    let (grpc_port, http_port) = (receiver.grpc_port, receiver.http_port);
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{http_port}"),
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-compression",
            "gzip",
            "--otlp-interval-s",
            "1",
        ],
    );
    let bench = cluster.bench_in_background(&["--duration-s", "6", "--clients", "16"]);
    wait_until("a first export under load", Duration::from_secs(10), || {
        receiver
            .received()
            .integer("vsr-replica", "vsr_operations_total", &operations(0))
            .unwrap_or(0)
            > 0
    });
    drop(receiver);
    // While the receiver is down, exports fail, are counted, and /metrics keeps serving.
    wait_until(
        "a failed export to be counted",
        Duration::from_secs(20),
        || {
            serve
                .scrape()
                .get("vsrscope_push_failures_total{exporter=\"otlp\"}")
                >= 1.0
        },
    );
    // It comes back refusing its first two requests (UNAVAILABLE/503): vsrscope retries.
    let receiver = Receiver::start_on(&cluster.directory.0, "after", 2, grpc_port, http_port, &[]);
    let bench = testkit::BenchResult::from_child(bench);
    assert!(bench.status.success(), "{}", bench.stderr);
    wait_for_operations(
        &receiver,
        "vsr-replica",
        bench.acknowledged,
        Duration::from_secs(20),
    );
    let metrics = serve.scrape();
    assert_eq!(
        metrics.get("vsr_operations_total{replica_id=\"0\",status=\"success\"}"),
        bench.acknowledged as f64
    );
    assert!(
        receiver
            .requests()
            .iter()
            .all(|request| request["headers"]["content-encoding"] == "gzip")
    );
}

#[test]
fn a_slow_receiver_times_out_without_stalling_metrics() {
    let directory = testkit::TestDirectory::new("otlp-slow");
    let receiver = Receiver::start_on(
        &directory.0,
        "slow",
        0,
        free_address().port(),
        free_address().port(),
        &["--delay-ms", "3000"],
    );
    let endpoint = format!("http://127.0.0.1:{}", receiver.grpc_port);
    // No replica runs: vsrscope exports its own metrics only, which is enough to export.
    let serve = Serve::start_with_environment(
        &directory.0,
        &[
            "--binary",
            testkit::replica_binary().to_str().unwrap(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-interval-s",
            "1",
        ],
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "300")],
    );
    // Every scrape in the loop is answered while exports keep timing out.
    wait_until(
        "timed-out exports to be counted",
        Duration::from_secs(30),
        || {
            serve
                .scrape()
                .value("vsrscope_push_failures_total{exporter=\"otlp\"}")
                .is_some_and(|failures| failures >= 3.0)
        },
    );
    assert!(
        serve.log().contains("DeadlineExceeded") || serve.log().contains("Cancelled"),
        "{}",
        serve.log()
    );
}

#[test]
fn tls_endpoints_with_a_trusted_certificate_and_refusal_without() {
    let cluster = Cluster::start("otlp-tls", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let directory = &cluster.directory.0;
    // A private CA and a server certificate it signed, as an operator's collector would have.
    let path = |name: &str| directory.join(name).to_str().unwrap().to_string();
    let (authority, certificate, key) = (path("ca.pem"), path("cert.pem"), path("key.pem"));
    std::fs::write(
        directory.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl_steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=vsrscope-test-ca",
            "-keyout",
            &path("ca.key"),
            "-out",
            &authority,
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &path("leaf.csr"),
        ],
        &[
            "x509",
            "-req",
            "-in",
            &path("leaf.csr"),
            "-CA",
            &authority,
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &path("leaf.ext"),
            "-out",
            &certificate,
        ],
    ];
    for step in openssl_steps {
        let openssl = Command::new("openssl").args(step).output().unwrap();
        assert!(
            openssl.status.success(),
            "openssl {step:?}: {}",
            String::from_utf8_lossy(&openssl.stderr)
        );
    }
    let receiver = Receiver::start_on(
        directory,
        "tls",
        0,
        free_address().port(),
        free_address().port(),
        &["--tls-cert", &certificate, "--tls-key", &key],
    );
    let binary = cluster.binary.to_str().unwrap().to_string();
    let grpc = format!("https://localhost:{}", receiver.grpc_port);
    let http = format!("https://localhost:{}", receiver.http_port);
    let trusted = |endpoint: &str, protocol: &str, service: &str| {
        Serve::start_with_environment(
            directory,
            &[
                "--binary",
                &binary,
                "--otlp-endpoint",
                endpoint,
                "--otlp-protocol",
                protocol,
                "--otlp-interval-s",
                "1",
            ],
            &[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &authority),
                ("OTEL_SERVICE_NAME", service),
            ],
        )
    };
    let _over_grpc = trusted(&grpc, "grpc", "tls-grpc");
    let _over_http = trusted(&http, "http/protobuf", "tls-http");
    // Without the CA file, the private CA is not trusted: exports fail and are counted.
    let untrusted = Serve::start(
        directory,
        &[
            "--binary",
            &binary,
            "--otlp-endpoint",
            &http,
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-interval-s",
            "1",
        ],
    );
    let bench = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    for service in ["tls-grpc", "tls-http"] {
        wait_for_operations(
            &receiver,
            service,
            bench.acknowledged,
            Duration::from_secs(20),
        );
    }
    wait_until(
        "the untrusted exports to be counted as failed",
        Duration::from_secs(20),
        || {
            untrusted
                .scrape()
                .get("vsrscope_push_failures_total{exporter=\"otlp\"}")
                >= 1.0
        },
    );
    assert!(
        untrusted.log().contains("certificate"),
        "{}",
        untrusted.log()
    );
    assert!(
        receiver
            .received()
            .resources
            .keys()
            .all(|(service, _)| service != "vsr-replica")
    );
}

#[test]
fn bad_export_settings_are_refused_before_attaching() {
    let endpoint = ["--otlp-endpoint", "http://c:4317"];
    /// Arguments, environment, and what the error must say.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                "--otlp-endpoint",
                "https://c:4317",
                "--otlp-ca-file",
                "/nonexistent.pem",
            ],
            vec![],
            "OTLP CA file /nonexistent.pem",
        ),
        (
            vec!["--otlp-endpoint", "collector:4317"],
            vec![],
            "expected http[s]://HOST:PORT",
        ),
        (
            [&endpoint[..], &["--otlp-protocol", "http/json"]].concat(),
            vec![],
            "grpc and http/protobuf",
        ),
        (
            [&endpoint[..], &["--otlp-interval-s", "0"]].concat(),
            vec![],
            "--otlp-interval-s must be at least 1",
        ),
        (
            [&endpoint[..], &["--otlp-header", "novalue"]].concat(),
            vec![],
            "expected K=V",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_METRIC_EXPORT_INTERVAL", "often"),
            ],
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
        (
            vec!["--on-demand", "--statsd", "127.0.0.1:8125"],
            vec![],
            "cannot be combined with pushing",
        ),
        (
            vec!["--on-demand"],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
            "cannot be combined with pushing",
        ),
        (
            vec!["--statsd", "127.0.0.1:8125", "--statsd-interval-s", "0"],
            vec![],
            "--statsd-interval-s must be at least 1",
        ),
    ];
    for (arguments, environment, reason) in cases {
        let output = Command::new(testkit::binary("vsrscope"))
            .arg("serve")
            .args(&arguments)
            .envs(environment.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{arguments:?} {environment:?} was accepted"
        );
        assert!(
            stderr.contains(reason),
            "{arguments:?} {environment:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    }
}
