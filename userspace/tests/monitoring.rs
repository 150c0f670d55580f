//! The monitoring artefacts against real parts: the Prometheus rules checked and unit-tested by
//! promtool, the Grafana dashboards regenerated, every panel query and every alert run by a real
//! Prometheus scraping `vsrscope serve` on a live cluster through real faults, and the runbook's
//! links and commands checked against the rules and the CLI.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use regex::Regex;
use testkit::{
    BenchResult, Cluster, Prometheus, Serve, TestDirectory, binary, corrupt_middle_byte,
    free_address, http_get, wait_until,
};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repository().join(relative))
        .unwrap_or_else(|error| panic!("{relative}: {error}"))
}

fn rules_path() -> PathBuf {
    repository().join("dashboards/prometheus/vsr-alerts.yml")
}

fn dashboards() -> Vec<(String, serde_json::Value)> {
    let mut found: Vec<_> = std::fs::read_dir(repository().join("dashboards/grafana"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(found.len() >= 4, "dashboards: {found:?}");
    found
}

/// Every panel query of every dashboard, as Grafana would send it with `replica` = All.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                queries.push((
                    file.clone(),
                    panel["title"].as_str().unwrap().to_string(),
                    expr.replace("$replica", ".*")
                        .replace("$__rate_interval", "1m"),
                ));
            }
        }
    }
    queries
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules_path())
        .output()
        .expect("promtool is installed (scripts/setup)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let unit_tests = Command::new("promtool")
        .args(["test", "rules", "vsr-alerts.test.yml"])
        .current_dir(repository().join("dashboards/prometheus"))
        .output()
        .unwrap();
    assert!(
        unit_tests.status.success(),
        "{}{}",
        String::from_utf8_lossy(&unit_tests.stdout),
        String::from_utf8_lossy(&unit_tests.stderr)
    );
    // Every alert of the seed's table has a unit test.
    let tests = read("dashboards/prometheus/vsr-alerts.test.yml");
    for alert in alert_names() {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "no unit test for {alert}"
        );
    }
}

fn alert_names() -> Vec<String> {
    let names: Vec<String> = Regex::new(r"(?m)^\s+- alert: (\w+)$")
        .unwrap()
        .captures_iter(&read("dashboards/prometheus/vsr-alerts.yml"))
        .map(|capture| capture[1].to_string())
        .collect();
    assert_eq!(
        names.len(),
        10,
        "the seed's eight alerts, VsrscopePushFailing and VsrscopeAttachFailing: {names:?}"
    );
    names
}

#[test]
fn committed_dashboards_are_what_the_generator_writes() {
    let scratch = TestDirectory::new("dashboards");
    let status = Command::new("python3")
        .arg(repository().join("dashboards/grafana/generate.py"))
        .arg(&scratch.0)
        .status()
        .unwrap();
    assert!(status.success());
    for (file, _) in dashboards() {
        assert_eq!(
            std::fs::read_to_string(scratch.0.join(&file)).unwrap(),
            read(&format!("dashboards/grafana/{file}")),
            "{file} differs from generate.py's output: rerun it"
        );
    }
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn runbook_links_land_on_sections_and_quoted_commands_exist() {
    let runbook = read("docs/runbook.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(anchor)
        .collect();
    let rules = read("dashboards/prometheus/vsr-alerts.yml");
    let urls: Vec<String> = Regex::new(r#"runbook_url: "docs/runbook\.md#([a-z-]+)""#)
        .unwrap()
        .captures_iter(&rules)
        .map(|capture| capture[1].to_string())
        .collect();
    assert_eq!(urls.len(), alert_names().len(), "one runbook_url per alert");
    let playbook = read("docs/incident-playbook.md");
    let linked = Regex::new(r"runbook\.md#([a-z-]+)").unwrap();
    for url in urls
        .iter()
        .cloned()
        .chain(linked.captures_iter(&playbook).map(|c| c[1].to_string()))
    {
        assert!(
            anchors.contains(&url),
            "no runbook section #{url}: {anchors:?}"
        );
    }
    // Every vsrscope invocation quoted in the runbook and playbook: a real subcommand, real flags.
    let invocation = Regex::new(r"vsrscope ([a-z]+)([^`|]*)").unwrap();
    let flag = Regex::new(r"--[a-z-]+").unwrap();
    let tool = Regex::new(r"scripts/bpftrace/([a-z-]+\.bt)").unwrap();
    let mut checked = 0;
    for text in [&runbook, &playbook] {
        for code in code_in(text) {
            for capture in invocation.captures_iter(&code) {
                let subcommand = &capture[1];
                let help = Command::new(binary("vsrscope"))
                    .args([subcommand, "--help"])
                    .output()
                    .unwrap();
                assert!(
                    help.status.success(),
                    "`vsrscope {subcommand}` is quoted but is not a subcommand: {code}"
                );
                let help = String::from_utf8_lossy(&help.stdout);
                for quoted in flag.find_iter(&capture[2]) {
                    assert!(
                        help.contains(quoted.as_str()),
                        "vsrscope {subcommand} has no {}: {code}",
                        quoted.as_str()
                    );
                }
                checked += 1;
            }
        }
        for named in tool.captures_iter(text) {
            let path = repository().join("scripts/bpftrace").join(&named[1]);
            assert!(path.exists(), "no tool {}", &named[1]);
        }
    }
    assert!(checked >= 10, "only {checked} vsrscope commands found");
}

/// The code of a Markdown text: lines of fenced blocks and inline `code` spans.
fn code_in(markdown: &str) -> Vec<String> {
    let mut code = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            code.push(line.to_string());
        } else {
            code.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    code
}

/// The `data.result` of a Prometheus query response is not empty.
fn has_data(response: &str) -> bool {
    let Some(json) = body_json(response) else {
        return false;
    };
    json["status"] == "success"
        && json["data"]["result"]
            .as_array()
            .is_some_and(|result| !result.is_empty())
}

/// The JSON body of an HTTP response from Prometheus.
fn body_json(response: &str) -> Option<serde_json::Value> {
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// The state (`pending`, `firing`) of an alert in Prometheus, if it is active.
fn alert_state(prometheus: &Prometheus, alert: &str) -> Option<String> {
    let json = body_json(&http_get(prometheus.address, "/api/v1/alerts"))?;
    json["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|active| active["labels"]["alertname"] == alert)
        .map(|active| active["state"].as_str().unwrap_or_default().to_string())
}

#[test]
fn every_panel_and_alert_works_against_a_live_cluster() {
    let mut cluster = Cluster::start("monitoring", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    // Pushing StatsD to a port nobody listens on gives the push panel its series.
    let statsd = free_address().to_string();
    let serve = Serve::start(
        &cluster.directory.0,
        &[
            "--binary",
            cluster.binary.to_str().unwrap(),
            "--statsd",
            &statsd,
            "--statsd-interval-s",
            "1",
        ],
    );
    // The rules as shipped, with `for:` shortened so the test need not wait an hour.
    let rules = cluster.directory.0.join("vsr-alerts.yml");
    let shortened = Regex::new(r"for: \d+[smh]")
        .unwrap()
        .replace_all(&read("dashboards/prometheus/vsr-alerts.yml"), "for: 2s")
        .into_owned();
    std::fs::write(&rules, shortened).unwrap();
    let prometheus = Prometheus::start_with_rules(&cluster.directory.0, serve.address, &[&rules]);

    // Events for every panel: load, a corrupt journal entry repaired on restart, malformed
    // frames, the primary killed (view change) and replaced (recovery).
    let first = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(first.status.success(), "{}", first.stderr);
    assert!(cluster.stop(2).success());
    corrupt_middle_byte(&cluster.first_journal_segment(2));
    cluster.start_replica(2);
    let mut garbage = TcpStream::connect(cluster.addresses[1]).unwrap();
    garbage.write_all(&[0xab; 96]).unwrap();
    let load = cluster.bench_in_background(&["--duration-s", "8", "--clients", "16"]);
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(0);
    cluster.wait_for_log(1, "Normal in view 1", Duration::from_secs(10));
    // Its disk replaced: a replica that lost its data recovers before it votes.
    cluster.replace_replica(0);
    cluster.start_replica(0);
    assert!(BenchResult::from_child(load).status.success());
    wait_until(
        "Prometheus to see the recovery",
        Duration::from_secs(30),
        || has_data(&prometheus.query("sum(vsr_recovery_latency_ms_count) > 0")),
    );

    // Every metric a dashboard or rule names exists in the exposition.
    let exposition = serve.scrape().text;
    let metric = Regex::new(r"\b(vsr(?:scope)?_[a-z0-9_]+)").unwrap();
    let mut named: BTreeSet<String> = BTreeSet::new();
    for (_, _, query) in panel_queries() {
        named.extend(metric.captures_iter(&query).map(|c| c[1].to_string()));
    }
    named.extend(
        metric
            .captures_iter(&read("dashboards/prometheus/vsr-alerts.yml"))
            .map(|c| c[1].to_string()),
    );
    for name in &named {
        assert!(
            exposition.contains(&format!("\n{name}{{"))
                || exposition.contains(&format!("\n{name} ")),
            "{name} is named by a dashboard or rule but vsrscope does not export it"
        );
    }

    // Every panel query parses and returns data.
    let label_values = http_get(
        prometheus.address,
        "/api/v1/label/replica_id/values?match%5B%5D=vsr_replica_status",
    );
    assert!(
        label_values.contains("[\"0\",\"1\",\"2\"]"),
        "{label_values}"
    );
    for (file, title, query) in panel_queries() {
        let response = prometheus.query(&query);
        assert!(
            has_data(&response),
            "{file} / {title}: {query} returned no data:\n{response}"
        );
    }

    // End to end: the corrupt entry fired Log Corruption; two replicas down lose the quorum.
    wait_until("Log Corruption to fire", Duration::from_secs(20), || {
        alert_state(&prometheus, "VsrLogCorruption").as_deref() == Some("firing")
    });
    // Load, a view change and recoveries never looked like a lost quorum.
    let false_alarm = prometheus
        .query("count_over_time(ALERTS{alertname=\"VsrQuorumLost\",alertstate=\"firing\"}[10m])");
    assert!(
        !has_data(&false_alarm),
        "Quorum Lost fired on a healthy cluster: {false_alarm}"
    );

    // Replica 1 is the primary of view 1. Its backups die while it is idle: no op waits for
    // votes, so only liveness can tell the quorum is gone.
    assert!(!has_data(
        &prometheus.query("ALERTS{alertname=\"VsrQuorumLost\"}")
    ));
    cluster.kill(0);
    cluster.kill(2);
    quorum_lost_fires_in_time(&prometheus);
    // The runbook's confirmation counts only the live primary as normal, as the processes say.
    let running = (0..3)
        .filter(|replica| cluster.is_running(*replica))
        .count();
    assert_eq!(running, 1);
    wait_until("dead replicas to drop out", Duration::from_secs(5), || {
        prometheus.value("count(vsr_replica_status == 0)") == Some(running as f64)
            && prometheus.value("sum(vsr_replica_up)") == Some(running as f64)
    });

    // Both restarted: they resume in view 1, the cluster is whole and the alert resolves.
    let marks = [cluster.log_mark(0), cluster.log_mark(2)];
    for (replica, mark) in [0, 2].into_iter().zip(marks) {
        cluster.start_replica(replica);
        cluster.wait_for_log_since(replica, mark, "Normal in view 1", Duration::from_secs(10));
    }
    wait_until("Quorum Lost to resolve", Duration::from_secs(20), || {
        alert_state(&prometheus, "VsrQuorumLost").is_none()
            && prometheus.value("sum(vsr_replica_up)") == Some(3.0)
    });

    // The primary and one backup die under load: the dead primary's last votes (a quorum) must
    // not keep the alert quiet.
    let mut stalled = cluster.bench_in_background(&["--duration-s", "30", "--clients", "4"]);
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill(1);
    cluster.kill(0);
    quorum_lost_fires_in_time(&prometheus);
    let _ = stalled.kill();
    let _ = stalled.wait();
}

/// The rules' `for:` in this test (shortened from the seed's 10 s) plus one scrape and one
/// evaluation (1 s each), and slack for a loaded machine.
const QUORUM_LOST_DEADLINE: Duration = Duration::from_secs(2 + 1 + 1 + 3);

/// Quorum Lost fires within the deadline, counted from now (the kills).
fn quorum_lost_fires_in_time(prometheus: &Prometheus) {
    let killed = std::time::Instant::now();
    wait_until("Quorum Lost to fire", QUORUM_LOST_DEADLINE, || {
        alert_state(prometheus, "VsrQuorumLost").as_deref() == Some("firing")
    });
    eprintln!("Quorum Lost firing {:?} after the kills", killed.elapsed());
}
