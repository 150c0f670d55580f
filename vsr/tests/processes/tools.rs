//! The bpftrace tools of `scripts/bpftrace`, each run against a live cluster and checked
//! against what the load generator and the replicas' own logs say happened.

use std::time::Duration;

use crate::cluster::send_malformed_frames;
use testkit::{BenchResult, Bpftrace, Cluster, corrupt_middle_byte, map_value, wait_until};

/// The sum of the counts of every bucket of the bpftrace histogram `@name` (as printed at exit).
fn histogram_total(output: &str, name: &str) -> u64 {
    let mut lines = output.lines().skip_while(|line| !line.starts_with(name));
    assert!(lines.next().is_some(), "no histogram {name} in:\n{output}");
    lines
        .take_while(|line| line.starts_with(['[', '(']))
        .map(|line| {
            let count = line.split(']').nth(1).or_else(|| line.split(')').nth(1));
            count
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|count| count.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("bad histogram line {line:?}"))
        })
        .sum()
}

/// Data rows of a tool's event table: the lines that start with a number.
fn event_rows(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|line| line.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

#[test]
fn latency_throughput_and_state_tools_agree_with_the_load_generator() {
    let mut cluster = Cluster::start("tools-normal", 3, &[]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let primary = Some(cluster.pid(0));
    let binary = cluster.binary.clone();
    let client = Bpftrace::run_tool("client-latency.bt", primary, &binary, &[]);
    let prepare = Bpftrace::run_tool("prepare-latency.bt", primary, &binary, &[]);
    let commit = Bpftrace::run_tool("commit-latency.bt", primary, &binary, &[]);
    let slow = Bpftrace::run_tool("slow-ops.bt", primary, &binary, &["1"]);
    let journal = Bpftrace::run_tool("journal.bt", None, &binary, &[]);
    let messages = Bpftrace::run_tool("messages.bt", primary, &binary, &[]);
    let sessions = Bpftrace::run_tool("sessions.bt", None, &binary, &[]);
    let state = Bpftrace::run_tool("replica-state.bt", None, &binary, &[]);
    let clients = 16;
    let bench = cluster.bench(&[
        "--duration-s",
        "3",
        "--clients",
        &clients.to_string(),
        "--rate",
        "3000",
    ]);
    assert!(bench.status.success(), "{}", bench.stderr);
    wait_until(
        "a state table with three rows",
        Duration::from_secs(5),
        || {
            let output = state.output_so_far();
            let last = output.rsplit("vsr replica state").next().unwrap_or("");
            last.lines()
                .filter(|line| line.contains(" normal "))
                .count()
                == 3
        },
    );
    let [
        client,
        prepare,
        commit,
        slow,
        journal,
        messages,
        sessions,
        state,
    ] = [
        client, prepare, commit, slow, journal, messages, sessions, state,
    ]
    .map(Bpftrace::finish);
    let commits = cluster.stop_all_and_commits();

    // One reply per acknowledged request and per client registration, all from the primary.
    let replies = bench.acknowledged + clients;
    assert_eq!(
        histogram_total(&client, "@client_latency_us[0]:"),
        replies,
        "{client}"
    );
    assert_eq!(
        histogram_total(&client, "@client_latency_linear_us[0]:"),
        replies
    );
    // Each committed op was prepared and committed once: registrations and puts alike.
    assert_eq!(
        histogram_total(&prepare, "@prepare_latency_us[0]:"),
        commits[0],
        "{prepare}"
    );
    assert_eq!(
        map_value(&commit, "commits[0]"),
        Some(commits[0]),
        "{commit}"
    );
    assert_eq!(
        histogram_total(&commit, "@commit_latency_ns[0]:"),
        commits[0]
    );
    // Slow ops: real op numbers of this run, at least the threshold.
    for row in event_rows(&slow) {
        let fields: Vec<u64> = row
            .split_whitespace()
            .map(|field| field.parse().unwrap())
            .collect();
        assert!(
            (1..=commits[0]).contains(&fields[2]),
            "op out of range: {row}"
        );
        assert!(fields[5] >= 1000, "faster than the threshold: {row}");
    }
    assert!(slow.contains("Slowest ops"), "{slow}");
    // Per-second tools printed per-replica rates while the load ran.
    for replica in 0..3 {
        assert!(
            journal.contains(&format!("@entries_per_s[{replica}]: ")),
            "{journal}"
        );
    }
    assert!(histogram_total(&journal, "@bytes_per_group_commit:") > 0);
    for expected in [
        "@sent_messages_per_s[prepare, replica, 1]: ",
        "@sent_messages_per_s[reply, client, 0]: ",
        "@received_messages_per_s[prepare_ok, replica, 2]: ",
        "@received_bytes_per_s[request, client, 0]: ",
    ] {
        assert!(messages.contains(expected), "{expected} in:\n{messages}");
    }
    assert!(sessions.contains("@requests_per_s[0]: "), "{sessions}");
    let table = state.rsplit("vsr replica state").next().unwrap();
    assert_eq!(table.matches(" primary ").count(), 1, "{table}");
    assert_eq!(table.matches(" backup ").count(), 2, "{table}");
}

#[test]
fn view_change_and_recovery_tools_follow_a_primary_failure() {
    let mut cluster = Cluster::start("tools-view-change", 3, &[]);
    cluster.wait_for_log(1, "Normal in view 0", Duration::from_secs(5));
    let binary = cluster.binary.clone();
    // By path: the recovering replica is a process that does not exist yet.
    let view_changes = Bpftrace::run_tool("view-changes.bt", None, &binary, &[]);
    let recovery = Bpftrace::run_tool("recovery.bt", None, &binary, &[]);
    let bench = cluster.bench_in_background(&["--duration-s", "4", "--clients", "16", "--verify"]);
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill(0);
    wait_until("a new primary", Duration::from_secs(10), || {
        view_changes.output_so_far().contains("as primary")
    });
    // Its disk is replaced: only a replica that lost its data runs the recovery protocol.
    cluster.replace_replica(0);
    cluster.start_replica(0);
    wait_until("recovery of replica 0", Duration::from_secs(20), || {
        recovery.output_so_far().contains("recovered")
    });
    BenchResult::from_child(bench).assert_verified();
    let view_changes = view_changes.finish();
    let recovery = recovery.finish();
    let starts: Vec<&str> = event_rows(&view_changes)
        .into_iter()
        .filter(|row| row.contains(" start "))
        .collect();
    assert!(
        starts
            .iter()
            .any(|row| row.contains("view 0 -> 1, reason primary_")),
        "{view_changes}"
    );
    assert!(
        event_rows(&view_changes)
            .iter()
            .any(|row| row.contains("normal in view 1 as primary")),
        "{view_changes}"
    );
    assert!(
        histogram_total(&view_changes, "@view_change_duration_us:") >= 1,
        "{view_changes}"
    );
    let recovering: Vec<&str> = event_rows(&recovery);
    assert!(
        recovering[0].contains("recovering from durable commit"),
        "{recovery}"
    );
    assert!(
        recovering.iter().any(
            |row| row.split_whitespace().nth(1) == Some("0") && row.contains("recovered: view")
        ),
        "{recovery}"
    );
}

#[test]
fn rejection_and_corruption_tools_name_the_reason_and_the_op() {
    let mut cluster = Cluster::start("tools-faults", 3, &[]);
    let bench = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(bench.status.success());
    let binary = cluster.binary.clone();
    let byzantine = Bpftrace::run_tool("byzantine.bt", Some(cluster.pid(0)), &binary, &[]);
    send_malformed_frames(cluster.addresses[0]);
    wait_until("rejections", Duration::from_secs(10), || {
        byzantine.output_so_far().contains("wrong_cluster")
    });
    let byzantine = byzantine.finish();
    assert!(
        byzantine.contains("@rejections[0, wrong_cluster]: "),
        "{byzantine}"
    );

    assert!(cluster.stop(2).success());
    corrupt_middle_byte(&cluster.first_journal_segment(2));
    let checksums = Bpftrace::run_tool("checksum-failures.bt", None, &binary, &[]);
    cluster.start_replica(2);
    wait_until("a repair on replica 2", Duration::from_secs(20), || {
        checksums.output_so_far().contains("repaired op")
    });
    let checksums = checksums.finish();
    let corrupt_op = event_rows(&checksums)
        .iter()
        .find_map(|row| row.split("corrupt log at op ").nth(1))
        .unwrap_or_else(|| panic!("no log corruption reported:\n{checksums}"))
        .trim()
        .to_string();
    assert!(
        checksums.contains(&format!("repaired op {corrupt_op}: success")),
        "the corrupt op {corrupt_op} is repaired:\n{checksums}"
    );
    assert!(
        checksums.contains("@checksum_failures[2, log]: "),
        "{checksums}"
    );
}
