//! `vsrscope serve` as an unprivileged user (nobody) holding only the capabilities measured in
//! docs/vsrscope.md ("Running as a service"), against a real cluster run by root: it attaches,
//! counts what vsr-bench counts, keeps only the capabilities serving still needs, and without a
//! required capability fails with one line naming it.

use std::process::{Command, Output};
use std::time::Duration;

use testkit::{Cluster, Serve, assert_clear_failure, wait_until};

/// The measured set: uprobe perf events need CAP_SYS_ADMIN; another user's `/proc/PID/io`
/// needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
const MEASURED: [&str; 3] = ["sys_admin", "sys_ptrace", "dac_read_search"];

/// Capability bits as the kernel numbers them (`linux/capability.h`).
const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
const CAP_SYS_PTRACE: u64 = 1 << 19;
const CAP_SYS_ADMIN: u64 = 1 << 21;

/// `setpriv` arguments running a program as nobody with exactly `capabilities` (setpriv's
/// names) in its bounding, inheritable and ambient sets, hence in its permitted and effective.
fn as_nobody_with(capabilities: &[&str]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_string())
        .chain(capabilities.iter().map(|name| format!("+{name}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".to_string(),
        "--reuid=nobody".to_string(),
        "--regid=nogroup".to_string(),
        "--clear-groups".to_string(),
        format!("--bounding-set={set}"),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
    ]
}

fn without(removed: &str) -> Vec<&'static str> {
    MEASURED
        .into_iter()
        .filter(|name| *name != removed)
        .collect()
}

fn serve_as_nobody(cluster: &Cluster, capabilities: &[&str], arguments: &[&str]) -> Serve {
    let wrapper = as_nobody_with(capabilities);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Serve::start_wrapped(&wrapper, &cluster.directory.0, arguments)
}

/// `vsrscope serve` as nobody that must fail: its output once it exited.
fn failed_serve(capabilities: &[&str], arguments: &[&str]) -> Output {
    let wrapper = as_nobody_with(capabilities);
    Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(testkit::binary("vsrscope"))
        .arg("serve")
        .args(arguments)
        .args(["--listen", &testkit::free_address().to_string()])
        .output()
        .unwrap()
}

/// One capability set (`CapEff`, `CapPrm`, …) of every thread of `pid`.
fn thread_capabilities(pid: u32, set: &str) -> Vec<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{set}:")))
                .unwrap();
            u64::from_str_radix(line.trim(), 16).unwrap()
        })
        .collect()
}

#[test]
fn unprivileged_serve_with_the_measured_capabilities_counts_every_operation() {
    let cluster = Cluster::start("capabilities", 3, &["--snapshot-interval-ms", "100"]);
    let binary = cluster.binary.to_str().unwrap();
    let serve = serve_as_nobody(&cluster, &MEASURED, &["--binary", binary]);
    let pid = serve.child.id();
    // CAP_SYS_ADMIN was for attaching; the /proc reads of the resource gauges remain.
    let kept = CAP_SYS_PTRACE | CAP_DAC_READ_SEARCH;
    for set in ["CapEff", "CapPrm"] {
        assert_eq!(
            thread_capabilities(pid, set),
            vec![kept; thread_capabilities(pid, set).len()],
            "{set} of every thread after attaching:\n{}",
            serve.log()
        );
    }
    assert_eq!(thread_capabilities(pid, "CapAmb"), vec![0]);
    assert!(
        serve
            .log()
            .contains("capabilities kept after attaching: CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE")
    );

    let bench = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(bench.status.success(), "{}", bench.stderr);
    assert!(bench.acknowledged > 0);
    for replica in 0..3 {
        let series = format!("vsr_operations_total{{replica_id=\"{replica}\",status=\"success\"}}");
        wait_until(
            &format!("replica {replica} to count vsr-bench's operations"),
            Duration::from_secs(10),
            || serve.scrape().value(&series) == Some(bench.acknowledged as f64),
        );
    }
    // Read from /proc/PID/io of root's replicas, every second, after the drop.
    wait_until(
        "the resource gauges of replica 0",
        Duration::from_secs(10),
        || {
            serve
                .scrape()
                .value("vsr_memory_used_bytes{replica_id=\"0\"}")
                .is_some_and(|bytes| bytes > 0.0)
        },
    );
}

#[test]
fn on_demand_keeps_what_attaching_again_needs() {
    let cluster = Cluster::start("capabilities-on-demand", 1, &[]);
    let binary = cluster.binary.to_str().unwrap();
    let serve = serve_as_nobody(&cluster, &MEASURED, &["--binary", binary, "--on-demand"]);
    let pid = serve.child.id();
    let kept = CAP_SYS_ADMIN | CAP_SYS_PTRACE | CAP_DAC_READ_SEARCH;
    assert_eq!(thread_capabilities(pid, "CapEff"), vec![kept]);
    let scraped = serve.scrape();
    assert_eq!(
        scraped.get("vsrscope_attach_failing"),
        0.0,
        "{}",
        serve.log()
    );
    assert!(scraped.get("vsrscope_attached_sites") > 0.0);
}

#[test]
fn a_missing_capability_is_named() {
    let cluster = Cluster::start("capabilities-missing", 1, &[]);
    let binary = cluster.binary.to_str().unwrap();
    // Without it nothing else here meets the kernel's BPF checks: loading fails first.
    let no_admin = failed_serve(&without("sys_admin"), &["--binary", binary]);
    assert_clear_failure(&no_admin, "missing privileges to load eBPF programs");
    assert_clear_failure(&no_admin, "CAP_SYS_ADMIN");
    // A pid names its binary through /proc/PID/exe, another user's only with CAP_SYS_PTRACE.
    let pid = cluster.pid(0).to_string();
    assert_clear_failure(
        &failed_serve(&without("sys_ptrace"), &["--pid", &pid]),
        "needs CAP_SYS_PTRACE",
    );
    // CAP_BPF and CAP_PERFMON load the programs but do not open uprobes on this kernel.
    assert_clear_failure(
        &failed_serve(&["bpf", "perfmon", "sys_ptrace"], &["--binary", binary]),
        "missing privileges to open uprobes: run as root, or grant CAP_SYS_ADMIN",
    );
}
