//! `vsrscope serve` and a real Prometheus, for the tests that check what they export.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{binary, wait_until};

/// A loopback address with a port nobody listens on right now.
pub fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `vsrscope serve` in the background; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Serve {
    pub child: Child,
    pub address: SocketAddr,
    log: PathBuf,
}

impl Serve {
    pub fn start(directory: &Path, arguments: &[&str]) -> Serve {
        Serve::start_with_environment(directory, arguments, &[])
    }

    /// With extra environment variables (the `OTEL_*` configuration, say).
    pub fn start_with_environment(
        directory: &Path,
        arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Serve {
        Serve::start_through(&[], directory, arguments, environment)
    }

    /// Started through `wrapper`, a command that runs the program named after its own arguments
    /// (`setpriv --reuid=nobody …`, say).
    pub fn start_wrapped(wrapper: &[&str], directory: &Path, arguments: &[&str]) -> Serve {
        Serve::start_through(wrapper, directory, arguments, &[])
    }

    fn start_through(
        wrapper: &[&str],
        directory: &Path,
        arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Serve {
        let address = free_address();
        let log = directory.join(format!("vsrscope-{}.log", address.port()));
        let vsrscope = binary("vsrscope");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_arguments)) => {
                let mut command = Command::new(program);
                command.args(wrapper_arguments).arg(vsrscope);
                command
            }
            None => Command::new(vsrscope),
        };
        let child = command
            .arg("serve")
            .args(arguments)
            .arg("--listen")
            .arg(address.to_string())
            .envs(environment.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            address,
            log,
        };
        wait_until(
            "vsrscope to serve /metrics",
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&serve.log)
                    .unwrap_or_default()
                    .contains("serving")
            },
        );
        serve
    }

    pub fn scrape(&self) -> Metrics {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        Metrics::parse(body)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed exposition: sample lines by their full series text (`name{labels}`).
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                (
                    series.to_string(),
                    value
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                )
            })
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    pub fn value(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    pub fn get(&self, series: &str) -> f64 {
        self.value(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.text))
    }
}

/// A real Prometheus (Debian's 2.42) scraping one target every second; killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub address: SocketAddr,
}

impl Prometheus {
    pub fn start(directory: &Path, target: SocketAddr) -> Prometheus {
        Prometheus::start_with_rules(directory, target, &[])
    }

    /// Also loads rule files, evaluated every second.
    pub fn start_with_rules(directory: &Path, target: SocketAddr, rules: &[&Path]) -> Prometheus {
        let rule_files: String = rules
            .iter()
            .map(|rule| format!("  - '{}'\n", rule.display()))
            .collect();
        Prometheus::start_with_config(
            directory,
            &format!(
                "rule_files:\n{rule_files}scrape_configs:\n  - job_name: vsrscope\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
    }

    /// With `config` after the global settings (scrape and evaluate every second): scrape jobs
    /// over TLS or with authentication, say.
    pub fn start_with_config(directory: &Path, config: &str) -> Prometheus {
        let address = free_address();
        let path = directory.join("prometheus.yml");
        std::fs::write(
            &path,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{config}"),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/setup)");
        Prometheus { child, address }
    }

    /// Runs an instant query through the HTTP API; returns the raw JSON.
    pub fn query(&self, promql: &str) -> String {
        let encoded: String = promql
            .bytes()
            .map(|byte| match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (byte as char).to_string(),
                _ => format!("%{byte:02X}"),
            })
            .collect();
        http_get(self.address, &format!("/api/v1/query?query={encoded}"))
    }

    /// The value of an instant query with exactly one series, if it has one.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let response = self.query(promql);
        let (_, body) = response.split_once("\r\n\r\n")?;
        let json: serde_json::Value = serde_json::from_str(body).ok()?;
        match json["data"]["result"].as_array()?.as_slice() {
            [series] => series["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET; the whole response, or empty if nothing listens.
pub fn http_get(address: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return String::new();
    };
    // HTTP/1.0: the body comes whole, never chunked.
    let request = format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}
