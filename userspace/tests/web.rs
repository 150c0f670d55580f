//! The `/metrics` endpoint as its clients see it. A plain HTTP client checks keep-alive, `HEAD`,
//! gzip, OpenMetrics negotiation, the landing page and health on one connection; promtool and
//! the Prometheus Python client's strict OpenMetrics parser check both formats; a real
//! Prometheus scrapes over TLS with basic auth (`--web.config.file`), and gets `up` 0 with
//! wrong credentials (401) or over plain HTTP (refused). scripts/setup installs Prometheus,
//! openssl and, into target/venv, `prometheus-client` and `bcrypt`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use testkit::{Cluster, Prometheus, Serve, assert_clear_failure, binary, wait_until};

/// What Prometheus 2.x sends: OpenMetrics preferred, the text format accepted.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    python
}

/// One response read off a connection that stays open.
struct Response {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

/// Reads one response; a response to `HEAD` has a Content-Length but no body.
fn read_response(reader: &mut impl BufRead, head: bool) -> Response {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let length: usize = response
        .header("content-length")
        .expect("a Content-Length: the body comes whole")
        .parse()
        .unwrap();
    if !head {
        response.body.resize(length, 0);
        reader.read_exact(&mut response.body).unwrap();
    }
    response
}

/// A client on one kept-alive connection: each request waits for its response.
struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    fn open(address: SocketAddr) -> Connection {
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Connection {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let headers: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n");
        self.writer.write_all(request.as_bytes()).unwrap();
        read_response(&mut self.reader, method == "HEAD")
    }
}

fn gunzip(body: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// `promtool check metrics` parses the exposition (exit 1 would be a parse error). Its lint
/// objects to names the seed prescribes, as in tests/vsrscope.rs; and, since promtool 2.42
/// reads every input as the text format, to an OpenMetrics counter's `_total` samples, which
/// it takes for a family without help. Any other finding fails.
fn assert_promtool_parses(directory: &Path, name: &str, exposition: &str) {
    let path = directory.join(name);
    std::fs::write(&path, exposition).unwrap();
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool is installed (scripts/setup)");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    assert!(
        matches!(promtool.status.code(), Some(0 | 3)),
        "promtool could not parse {name}: {findings}"
    );
    let other: Vec<&str> = findings
        .lines()
        .filter(|line| !line.starts_with("vsr_"))
        .filter(|line| {
            let counter = line
                .strip_suffix("_total no help text")
                .is_some_and(|family| exposition.contains(&format!("# TYPE {family} counter\n")));
            !counter
        })
        .collect();
    assert!(other.is_empty(), "promtool findings in {name}: {other:?}");
}

/// The Prometheus Python client's OpenMetrics parser, which enforces the specification
/// (`# EOF`, counter samples ending in `_total`, histogram buckets); returns each family as
/// "name type samples".
fn openmetrics_families(exposition: &str) -> String {
    let mut parser = Command::new(python())
        .arg("-c")
        .arg(
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             for family in text_string_to_metric_families(sys.stdin.read()):\n\
             \x20   print(family.name, family.type, len(family.samples))\n",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "not valid OpenMetrics: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn serve_binary(cluster: &Cluster, extra: &[&str]) -> Serve {
    let mut arguments = vec!["--binary", cluster.binary.to_str().unwrap()];
    arguments.extend_from_slice(extra);
    Serve::start(&cluster.directory.0, &arguments)
}

/// `serve` over TLS with the certificate `certificates` made: its web.yml names the files
/// relative to itself, as exporter-toolkit reads them, and ends with `more`.
fn serve_tls(cluster: &Cluster, more: &str) -> Serve {
    let web_config = cluster.directory.0.join("web.yml");
    std::fs::write(
        &web_config,
        format!("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n{more}"),
    )
    .unwrap();
    serve_binary(
        cluster,
        &["--web.config.file", web_config.to_str().unwrap()],
    )
}

#[test]
fn one_connection_serves_head_gzip_openmetrics_and_the_other_pages() {
    let cluster = Cluster::start("web-plain", 3, &["--snapshot-interval-ms", "100"]);
    let serve = serve_binary(&cluster, &[]);
    let bench = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(bench.acknowledged > 0, "{}", bench.stdout);
    let mut connection = Connection::open(serve.address);

    let text = connection.send("GET", "/metrics", &[]);
    assert_eq!(text.status, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(text.header("content-encoding"), None);
    let text = text.text();
    assert!(
        text.contains("# TYPE vsr_operations_total counter\n")
            && text.contains("vsr_operations_total{replica_id=\"0\",status=\"success\"} "),
        "{text}"
    );

    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let build_info = format!(
        "vsrscope_build_info{{version=\"{}\",revision=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        String::from_utf8_lossy(&revision.stdout).trim()
    );
    assert!(text.contains(&build_info), "{build_info} in\n{text}");

    // HEAD: a GET's headers and no body, so the next response on the connection follows at once.
    let head = connection.send("HEAD", "/metrics", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        head.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 1000
    );

    let open = connection.send(
        "GET",
        "/metrics",
        &[("Accept", PROMETHEUS_ACCEPT), ("Accept-Encoding", "gzip")],
    );
    assert_eq!(open.status, 200);
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(open.header("content-encoding"), Some("gzip"));
    let open = gunzip(&open.body);
    assert!(open.ends_with("\n# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE vsr_operations counter\n")
            && open.contains("vsr_operations_total{replica_id=\"0\",status=\"success\"} "),
        "{open}"
    );
    let families = openmetrics_families(&open);
    for (family, kind, replicas) in [
        ("vsr_operations", "counter", 3),
        ("vsr_client_latency_ms", "histogram", 1),
        ("vsr_view_number", "gauge", 3),
        ("vsrscope_program_hits", "counter", 1),
    ] {
        let samples = families
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{family} {kind} ")))
            .and_then(|samples| samples.parse::<usize>().ok());
        assert!(
            samples.is_some_and(|samples| samples >= replicas),
            "{family} {kind} with samples in\n{families}"
        );
    }
    assert_promtool_parses(&cluster.directory.0, "metrics.txt", &text);
    assert_promtool_parses(&cluster.directory.0, "metrics.om.txt", &open);

    let text_gzip = connection.send("GET", "/metrics", &[("Accept-Encoding", "gzip, br")]);
    assert_eq!(text_gzip.header("content-encoding"), Some("gzip"));
    assert!(gunzip(&text_gzip.body).contains("# TYPE vsr_operations_total counter\n"));

    let landing = connection.send("GET", "/", &[]);
    assert_eq!(landing.status, 200);
    assert_eq!(
        landing.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        landing.text().contains("<a href=\"metrics\">"),
        "{}",
        landing.text()
    );
    assert_eq!(connection.send("GET", "/-/healthy", &[]).status, 200);
    assert_eq!(connection.send("GET", "/-/ready", &[]).status, 200);
    assert_eq!(connection.send("GET", "/nothing", &[]).status, 404);
    assert_eq!(connection.send("DELETE", "/metrics", &[]).status, 405);
    // Every answer above came on the connection opened first.
    assert_eq!(connection.send("GET", "/-/healthy", &[]).status, 200);
}

fn openssl(directory: &Path, arguments: &[&str]) {
    let output = Command::new("openssl")
        .args(arguments)
        .current_dir(directory)
        .output()
        .expect("openssl is installed (scripts/setup)");
    assert!(
        output.status.success(),
        "openssl {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

const ELLIPTIC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA (`ca.pem`, `ca.key`) and a server certificate for 127.0.0.1 that it signed
/// (`server.pem`, `server.key`), made by openssl.
fn certificates(directory: &Path) {
    openssl(
        directory,
        &[
            &[
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=vsrscope test CA",
            ][..],
            &ELLIPTIC,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    signed(
        directory,
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
}

/// `NAME.pem` and `NAME.key`: a certificate with `extensions` that the test CA signed.
fn signed(directory: &Path, name: &str, extensions: &str) {
    let (key, request, certificate, extension_file) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        directory,
        &[
            &["req", "-subj", &format!("/CN={name}")][..],
            &ELLIPTIC,
            &["-keyout", &key, "-out", &request],
        ]
        .concat(),
    );
    std::fs::write(
        directory.join(&extension_file),
        format!("basicConstraints=CA:FALSE\n{extensions}"),
    )
    .unwrap();
    openssl(
        directory,
        &[
            "x509",
            "-req",
            "-in",
            &request,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extension_file,
            "-out",
            &certificate,
        ],
    );
}

/// A bcrypt hash made by the Python `bcrypt` package, independent of vsrscope's.
fn bcrypt_hash(password: &str) -> String {
    let output = Command::new(python())
        .arg("-c")
        .arg("import bcrypt, sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(rounds=6)).decode())")
        .arg(password)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to 127.0.0.1 trusting the test's CA, its handshake done.
fn tls_connect(address: SocketAddr, ca: &Path) -> TlsStream {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, TcpStream::connect(address).unwrap());
    stream.conn.complete_io(&mut stream.sock).unwrap();
    stream
}

/// One HTTPS request (closing the connection); the status and body.
fn https_get(address: SocketAddr, ca: &Path, authorization: Option<&str>) -> (u16, String) {
    let mut stream = tls_connect(address, ca);
    let authorization = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{authorization}\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, false);
    (response.status, response.text())
}

/// The certificate the server presents in a handshake (DER).
fn served_certificate(address: SocketAddr, ca: &Path) -> Vec<u8> {
    let stream = tls_connect(address, ca);
    stream.conn.peer_certificates().unwrap()[0].to_vec()
}

/// The certificate in a PEM file (DER).
fn certificate_file(path: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

fn basic(user_password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// `up` of a Prometheus scrape job, once it has one.
fn up(prometheus: &Prometheus, job: &str) -> Option<String> {
    let json: Value = serde_json::from_str(
        prometheus
            .query(&format!("up{{job=\"{job}\"}}"))
            .split_once("\r\n\r\n")?
            .1,
    )
    .ok()?;
    Some(json["data"]["result"][0]["value"][1].as_str()?.to_string())
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_nothing_else_gets_in() {
    let cluster = Cluster::start("web-tls", 3, &[]);
    let directory = &cluster.directory.0;
    certificates(directory);
    let serve = serve_tls(
        &cluster,
        &format!(
            "basic_auth_users:\n  prometheus: {}\n",
            bcrypt_hash("scrape-secret")
        ),
    );
    assert!(
        serve
            .log()
            .contains(&format!("serving https://{}/metrics", serve.address)),
        "{}",
        serve.log()
    );
    let ca = directory.join("ca.pem");

    let (status, body) = https_get(serve.address, &ca, Some(&basic("prometheus:scrape-secret")));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE vsr_view_number gauge"), "{body}");
    for wrong in [
        Some(basic("prometheus:wrong")),
        Some(basic("nobody:scrape-secret")),
        None,
    ] {
        let (status, body) = https_get(serve.address, &ca, wrong.as_deref());
        assert_eq!(status, 401, "{wrong:?}: {body}");
        assert!(!body.contains("vsr_"), "{body}");
    }

    // Plain HTTP to the TLS listener: refused with the reason, never served.
    let plain = testkit::http_get(serve.address, "/metrics");
    assert!(
        plain.starts_with("HTTP/1.0 400 Bad Request")
            && plain.contains("Client sent an HTTP request to an HTTPS server."),
        "{plain}"
    );
    assert!(!plain.contains("vsr_"), "{plain}");

    let target = serve.address;
    let ca = ca.display();
    let prometheus = Prometheus::start_with_config(
        directory,
        &format!(
            "scrape_configs:\n\
             \x20 - job_name: tls\n    scheme: https\n    tls_config: {{ ca_file: '{ca}' }}\n    basic_auth: {{ username: prometheus, password: scrape-secret }}\n    static_configs: [{{ targets: ['{target}'] }}]\n\
             \x20 - job_name: wrong-password\n    scheme: https\n    tls_config: {{ ca_file: '{ca}' }}\n    basic_auth: {{ username: prometheus, password: guess }}\n    static_configs: [{{ targets: ['{target}'] }}]\n\
             \x20 - job_name: plain-http\n    basic_auth: {{ username: prometheus, password: scrape-secret }}\n    static_configs: [{{ targets: ['{target}'] }}]\n"
        ),
    );
    wait_until(
        "Prometheus to scrape every job once",
        Duration::from_secs(60),
        || {
            ["tls", "wrong-password", "plain-http"]
                .iter()
                .all(|job| up(&prometheus, job).is_some())
        },
    );
    wait_until(
        "up 1 over TLS with basic auth",
        Duration::from_secs(30),
        || up(&prometheus, "tls").as_deref() == Some("1"),
    );
    assert_eq!(up(&prometheus, "wrong-password").as_deref(), Some("0"));
    assert_eq!(up(&prometheus, "plain-http").as_deref(), Some("0"));
    let targets = testkit::http_get(prometheus.address, "/api/v1/targets");
    assert!(targets.contains("401 Unauthorized"), "{targets}");
    // The OpenMetrics Prometheus negotiated arrived whole: a counter's series by its sample name.
    let operations = prometheus.query("vsrscope_program_hits_total{job=\"tls\"}");
    assert!(operations.contains("\"result\":[{"), "{operations}");

    // A key that is not the certificate's is refused at start.
    std::fs::write(
        directory.join("mismatched.yml"),
        "tls_server_config:\n  cert_file: server.pem\n  key_file: ca.key\n",
    )
    .unwrap();
    let mismatched = Command::new(binary("vsrscope"))
        .args(["serve", "--pid", "1", "--web.config.file"])
        .arg(directory.join("mismatched.yml"))
        .output()
        .unwrap();
    assert_clear_failure(&mismatched, "cert_file and key_file");
}

#[test]
fn a_bad_web_config_file_stops_serve_with_one_line() {
    let directory = testkit::TestDirectory::new("web-config");
    let run = |yaml: Option<&str>| {
        let path = directory.0.join("web.yml");
        match yaml {
            Some(yaml) => std::fs::write(&path, yaml).unwrap(),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        Command::new(binary("vsrscope"))
            .args(["serve", "--pid", "1", "--web.config.file"])
            .arg(&path)
            .output()
            .unwrap()
    };
    assert_clear_failure(&run(None), "web.yml: No such file");
    assert_clear_failure(
        &run(Some("basic_auth_users:\n  prometheus: plain-password\n")),
        "basic_auth_users: prometheus: not a bcrypt hash",
    );
    assert_clear_failure(
        &run(Some(
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
        )),
        "missing.pem",
    );
    assert_clear_failure(&run(Some("tls_server_config: [\n")), "--web.config.file");
}

#[test]
fn required_client_certificates_admit_only_clients_the_ca_signed() {
    let cluster = Cluster::start("web-mtls", 1, &[]);
    let directory = &cluster.directory.0;
    certificates(directory);
    signed(directory, "client", "extendedKeyUsage=clientAuth\n");
    let serve = serve_tls(
        &cluster,
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n  min_version: TLS13\n",
    );
    let (target, directory_text) = (serve.address, directory.display());
    let prometheus = Prometheus::start_with_config(
        directory,
        &format!(
            "scrape_configs:\n\
             \x20 - job_name: client-certificate\n    scheme: https\n    tls_config: {{ ca_file: '{directory_text}/ca.pem', cert_file: '{directory_text}/client.pem', key_file: '{directory_text}/client.key' }}\n    static_configs: [{{ targets: ['{target}'] }}]\n\
             \x20 - job_name: no-client-certificate\n    scheme: https\n    tls_config: {{ ca_file: '{directory_text}/ca.pem' }}\n    static_configs: [{{ targets: ['{target}'] }}]\n"
        ),
    );
    wait_until(
        "up 1 with a client certificate",
        Duration::from_secs(60),
        || up(&prometheus, "client-certificate").as_deref() == Some("1"),
    );
    wait_until(
        "Prometheus to try without a client certificate",
        Duration::from_secs(30),
        || up(&prometheus, "no-client-certificate").is_some(),
    );
    assert_eq!(
        up(&prometheus, "no-client-certificate").as_deref(),
        Some("0")
    );
    assert!(
        serve
            .log()
            .contains("vsrscope: TLS handshake with 127.0.0.1:"),
        "the refusal is logged with its reason: {}",
        serve.log()
    );
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let cluster = Cluster::start("web-renewal", 1, &[]);
    let directory = &cluster.directory.0;
    certificates(directory);
    let serve = serve_tls(&cluster, "");
    let ca = directory.join("ca.pem");
    let first = certificate_file(&directory.join("server.pem"));
    assert_eq!(served_certificate(serve.address, &ca), first);
    // Clients that hang up right after the handshake, while vsrscope writes its session
    // tickets: each costs a failed write, not vsrscope's life (SIGPIPE stays ignored in serve).
    for _ in 0..20 {
        drop(tls_connect(serve.address, &ca));
    }
    assert_eq!(https_get(serve.address, &ca, None).0, 200);

    // Renewal: a new key and certificate from the same CA, written over the old files.
    signed(
        directory,
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    let renewed = certificate_file(&directory.join("server.pem"));
    assert_ne!(renewed, first);
    wait_until(
        "the renewed certificate to be served",
        Duration::from_secs(10),
        || served_certificate(serve.address, &ca) == renewed,
    );
    assert_eq!(https_get(serve.address, &ca, None).0, 200);
    assert!(
        serve.log().contains("vsrscope: TLS certificate reloaded"),
        "{}",
        serve.log()
    );
}
