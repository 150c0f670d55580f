//! The USDT probes, seen by real bpftrace attached to real replicas, checked against what the
//! load generator and the test itself did.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::cluster::{register_frame, send_malformed_frames};
use testkit::{
    BenchResult, Bpftrace, Cluster, corrupt_middle_byte, map_value, signal, tagged_rows, wait_until,
};

fn program(binary: &Path, probes: &[(&str, &str)]) -> String {
    probes
        .iter()
        .map(|(probe, body)| format!("usdt:{}:vsr:{probe} {{ {body} }}\n", binary.display()))
        .collect()
}

/// Every probe's notes in an ELF file, by name, as `readelf -n` decodes them.
fn probe_notes(binary: &Path) -> Vec<(String, u64)> {
    let output = std::process::Command::new("readelf")
        .arg("-n")
        .arg(binary)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let mut notes = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Name: ") {
            name = Some(rest.to_string());
        }
        if let (Some(rest), Some(probe)) = (line.strip_prefix("Location: "), name.as_ref()) {
            let semaphore = rest.split("Semaphore: 0x").nth(1).unwrap();
            notes.push((
                probe.clone(),
                u64::from_str_radix(semaphore.trim(), 16).unwrap(),
            ));
        }
    }
    notes
}

#[test]
fn normal_operation_probes_agree_with_the_load_generator() {
    let cluster = Cluster::start("probes-normal", 3, &["--snapshot-interval-ms", "100"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let bpftrace = Bpftrace::attach_pid(
        cluster.pid(0),
        &program(
            &cluster.binary,
            &[
                (
                    "prepare_send",
                    "@prepares = count(); if (arg2 != @last_op + 1) { @ops_not_consecutive = count(); } @last_op = arg2; if (arg0 != 0) { @wrong_replica = count(); }",
                ),
                (
                    "prepare_quorum",
                    "@quorums = count(); if (arg3 < 2) { @quorum_too_small = count(); }",
                ),
                ("commit", "@commits = count();"),
                ("commit_execute", "@operations_ok = sum(arg2);"),
                ("client_request", "@requests = count();"),
                (
                    "client_reply",
                    "@replies = count(); @reply_latency_us_total = sum(arg4 / 1000); @reply_latency_ns_max = max(arg4);",
                ),
                (
                    "client_reply_batch",
                    "@batched_replies = sum(arg2); if (*(uint64*)arg3 == 0) { @zero_latency = count(); }",
                ),
                (
                    "journal_write",
                    "@journal_records = sum(arg1); @journal_bytes = sum(arg2);",
                ),
                ("message_send", "@sent_prepares = sum(arg1 == 3);"),
                ("message_recv", "@received_prepare_oks = sum(arg1 == 4);"),
                (
                    "state_snapshot",
                    "printf(\"snapshot %d %d %d %d %d %d\\n\", arg0, *(uint8*)(arg1 + 5), *(uint8*)(arg1 + 6), *(uint8*)(arg1 + 8), *(uint64*)(arg1 + 24), *(uint64*)(arg1 + 32));",
                ),
            ],
        ),
    );
    let record = cluster.directory.0.join("acknowledged.csv");
    let clients = 16;
    let bench = cluster.bench(&[
        "--duration-s",
        "2",
        "--clients",
        &clients.to_string(),
        "--record",
        record.to_str().unwrap(),
    ]);
    assert!(bench.status.success(), "{}", bench.stderr);
    let last_op = |output: &str| {
        tagged_rows(output, "snapshot ")
            .last()
            .map_or(0, |row| row[5])
    };
    // Wait for snapshots taken after the last commit.
    wait_until("a snapshot after the load", Duration::from_secs(5), || {
        let output = bpftrace.output_so_far();
        last_op(&output) > 0 && tagged_rows(&output, "snapshot ").len() > 5
    });
    std::thread::sleep(Duration::from_millis(300));
    let output = bpftrace.finish();
    let value = |name: &str| map_value(&output, name).unwrap_or(0);

    // Ground truth: the load generator's acknowledgements and its per-operation record.
    let acknowledged = bench.acknowledged;
    assert!(acknowledged > 100);
    assert_eq!(
        value("operations_ok"),
        acknowledged,
        "operations executed on the primary"
    );
    assert_eq!(
        value("replies"),
        acknowledged + clients,
        "a reply per operation and per registration"
    );
    assert_eq!(value("requests"), acknowledged + clients);
    assert_eq!(value("batched_replies"), value("replies"));
    assert_eq!(value("zero_latency"), 0);
    let prepares = value("prepares");
    assert!(
        prepares > 0 && value("last_op") == prepares,
        "ops 1..={prepares} prepared in order:\n{output}"
    );
    assert_eq!(value("ops_not_consecutive"), 0);
    assert_eq!(value("wrong_replica"), 0);
    assert_eq!(value("quorums"), prepares);
    assert_eq!(value("commits"), prepares);
    assert_eq!(value("quorum_too_small"), 0);
    // Each prepare goes to both backups; a slow PrepareOk makes the primary send it again.
    assert!(
        value("sent_prepares") >= 2 * prepares,
        "each prepare to both backups"
    );
    assert!(
        value("received_prepare_oks") >= prepares,
        "at least one PrepareOk per op"
    );
    assert!(value("journal_records") >= prepares && value("journal_bytes") > 0);

    let rows: Vec<(u64, u64)> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<u64> = line
                .split(',')
                .take(4)
                .map(|field| field.parse().unwrap())
                .collect();
            (fields[2], fields[3])
        })
        .collect();
    assert_eq!(rows.len() as u64, acknowledged);
    assert!(
        rows.iter().all(|(op, _)| (1..=prepares).contains(op)),
        "reply op numbers lie within the prepared ops"
    );
    // The primary's latency is part of what the client saw, so it can never be larger.
    let client_total_us: u64 = rows.iter().map(|(_, latency_ns)| latency_ns / 1000).sum();
    let client_max_ns = rows
        .iter()
        .map(|(_, latency_ns)| *latency_ns)
        .max()
        .unwrap();
    assert!(
        value("reply_latency_us_total") <= client_total_us,
        "server total {} > client total {client_total_us}",
        value("reply_latency_us_total")
    );
    assert!(value("reply_latency_ns_max") <= client_max_ns);
    assert!(value("reply_latency_us_total") > 0);

    let snapshot = tagged_rows(&output, "snapshot ").last().cloned().unwrap();
    // replica 0, normal status, 3 replicas, primary, op and commit at the last prepared op.
    assert_eq!(snapshot, vec![0, 0, 3, 1, prepares, prepares], "{output}");
}

#[test]
fn view_change_and_recovery_probes_fire_with_reasons_and_latencies() {
    let mut cluster = Cluster::start("probes-view-change", 3, &[]);
    cluster.wait_for_log(1, "Normal in view 0", Duration::from_secs(5));
    let view_change = Bpftrace::attach_pid(
        cluster.pid(1),
        &program(
            &cluster.binary,
            &[
                (
                    "view_change_start",
                    "printf(\"start %d %d %d %d\\n\", arg0, arg1, arg2, arg3);",
                ),
                (
                    "view_change_done",
                    "printf(\"done %d %d %d %d\\n\", arg0, arg1, arg2 > 0, arg3);",
                ),
            ],
        ),
    );
    // By path, not pid: the replica this must see does not exist yet.
    let recovery = Bpftrace::attach_binary(&program(
        &cluster.binary,
        &[
            (
                "recovery_start",
                "printf(\"recovery_start %d %d\\n\", arg0, arg1 > 0);",
            ),
            (
                "recovery_done",
                "printf(\"recovery_done %d %d %d\\n\", arg0, arg1, arg3 > 0);",
            ),
        ],
    ));
    let bench = cluster.bench_in_background(&["--duration-s", "4", "--clients", "16", "--verify"]);
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill(0);
    wait_until(
        "the view change on replica 1",
        Duration::from_secs(10),
        || view_change.output_so_far().contains("done "),
    );
    // Its disk is replaced: only a replica that lost its data runs the recovery protocol.
    cluster.replace_replica(0);
    cluster.start_replica(0);
    wait_until("recovery of replica 0", Duration::from_secs(20), || {
        recovery.output_so_far().contains("recovery_done")
    });
    BenchResult::from_child(bench).assert_verified();
    let view_change = view_change.finish();
    let recovery = recovery.finish();
    // Replica 1 saw its primary's connection drop, moved 0 -> 1, and leads view 1.
    assert_eq!(
        tagged_rows(&view_change, "start ").first(),
        Some(&vec![1, 0, 1, 1]),
        "{view_change}"
    );
    assert_eq!(
        tagged_rows(&view_change, "done ").first(),
        Some(&vec![1, 1, 1, 1]),
        "{view_change}"
    );
    assert_eq!(
        tagged_rows(&recovery, "recovery_start "),
        vec![vec![0, 1]],
        "{recovery}"
    );
    assert_eq!(
        tagged_rows(&recovery, "recovery_done "),
        vec![vec![0, 1, 1]],
        "{recovery}"
    );
}

#[test]
fn corruption_and_repair_probes_fire_on_restart() {
    let mut cluster = Cluster::start("probes-corruption", 3, &[]);
    let bench = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(bench.status.success());
    assert!(cluster.stop(2).success());
    corrupt_middle_byte(&cluster.first_journal_segment(2));
    let bpftrace = Bpftrace::attach_binary(&program(
        &cluster.binary,
        &[
            (
                "checksum_failure",
                "if (arg0 == 2) { printf(\"checksum_failure %d %d\\n\", arg0, arg1); }",
            ),
            (
                "repair_request",
                "if (arg0 == 2) { @repair_requests = count(); }",
            ),
            (
                "repair_done",
                "if (arg0 == 2 && arg3 == 0) { printf(\"repaired %d\\n\", arg1); }",
            ),
        ],
    ));
    cluster.start_replica(2);
    wait_until("a repair on replica 2", Duration::from_secs(20), || {
        bpftrace.output_so_far().contains("repaired")
    });
    let output = bpftrace.finish();
    assert!(
        tagged_rows(&output, "checksum_failure ")
            .iter()
            .any(|row| row == &vec![2, 0]),
        "log checksum failure:\n{output}"
    );
    assert!(
        map_value(&output, "repair_requests").unwrap_or(0) >= 1,
        "{output}"
    );
}

#[test]
fn rejected_messages_duplicates_and_evictions_are_reported() {
    let cluster = Cluster::start("probes-rejections", 3, &["--client-sessions-max", "4"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let bpftrace = Bpftrace::attach_pid(
        cluster.pid(0),
        &program(
            &cluster.binary,
            &[
                (
                    "byzantine_rejection",
                    "printf(\"reject %d %d\\n\", arg0, arg1);",
                ),
                (
                    "duplicate_request",
                    "printf(\"duplicate %d %d\\n\", arg1, arg2);",
                ),
                ("session_evict", "printf(\"evict %d\\n\", arg2);"),
            ],
        ),
    );
    send_malformed_frames(cluster.addresses[0]);
    // The same registration twice: the second gets the stored reply and counts as a duplicate.
    let mut client = TcpStream::connect(cluster.addresses[0]).unwrap();
    for _ in 0..2 {
        client.write_all(&register_frame(1, 4242)).unwrap();
        let mut reply = [0u8; 96];
        client.read_exact(&mut reply).unwrap();
    }
    let bench = cluster.bench(&["--duration-s", "1", "--clients", "8"]);
    assert!(bench.status.success() && bench.evictions > 0);
    let expected_reasons: BTreeSet<u64> = [0, 1, 2, 6].into();
    wait_until("all rejections", Duration::from_secs(10), || {
        let seen: BTreeSet<u64> = tagged_rows(&bpftrace.output_so_far(), "reject ")
            .iter()
            .map(|row| row[1])
            .collect();
        seen == expected_reasons
    });
    let output = bpftrace.finish();
    assert!(
        tagged_rows(&output, "reject ")
            .iter()
            .all(|row| row[0] == 0)
    );
    assert_eq!(
        tagged_rows(&output, "duplicate "),
        vec![vec![4242, 1]],
        "{output}"
    );
    let evictions = tagged_rows(&output, "evict ");
    assert!(
        !evictions.is_empty() && evictions.iter().all(|row| row[0] == 4),
        "{output}"
    );
}

/// Reads a probe semaphore (a `u16`) from the live process.
fn semaphore_value(pid: u32, binary: &Path, address: u64) -> u16 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find(|line| {
            line.ends_with(binary.to_str().unwrap())
                && line.split_whitespace().nth(2) == Some("00000000")
        })
        .map(|line| u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap())
        .expect("the binary's first mapping");
    let memory = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut value = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&memory, &mut value, base + address).unwrap();
    u16::from_le_bytes(value)
}

#[test]
fn probes_are_disabled_until_attached_and_again_after() {
    let cluster = Cluster::start("probes-semaphores", 1, &[]);
    let pid = cluster.pid(0);
    let notes = probe_notes(&cluster.binary);
    let semaphores: HashMap<String, u64> = notes.into_iter().collect();
    for (probe, address) in &semaphores {
        assert_eq!(
            semaphore_value(pid, &cluster.binary, *address),
            0,
            "{probe} enabled with nobody attached"
        );
    }
    let quorum = semaphores["prepare_quorum"];
    let bpftrace = Bpftrace::attach_pid(
        pid,
        &program(&cluster.binary, &[("prepare_quorum", "@ = count();")]),
    );
    assert_ne!(
        semaphore_value(pid, &cluster.binary, quorum),
        0,
        "attached probe is enabled"
    );
    assert_eq!(
        semaphore_value(pid, &cluster.binary, semaphores["commit"]),
        0,
        "other probes stay off"
    );
    bpftrace.finish();
    wait_until("the semaphore to drop", Duration::from_secs(5), || {
        semaphore_value(pid, &cluster.binary, quorum) == 0
    });
}

#[test]
fn every_probe_is_in_the_binary_and_the_reference_and_a_no_probe_build_has_none() {
    let binary = testkit::replica_binary();
    let in_binary: BTreeSet<String> = probe_notes(&binary)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let declared: BTreeSet<String> = vsr_probes::PROBES
        .iter()
        .map(|probe| probe.name.to_string())
        .collect();
    assert_eq!(
        in_binary, declared,
        "every declared probe has a site in vsr-replica, and no other"
    );
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/probes.md")).unwrap();
    for probe in vsr_probes::PROBES {
        let heading = format!("### `{}(", probe.name);
        let section = reference
            .split(&heading)
            .nth(1)
            .unwrap_or_else(|| panic!("docs/probes.md lacks {heading}"));
        let signature = section.lines().next().unwrap();
        for argument in probe.arguments {
            assert!(
                signature.contains(argument),
                "docs/probes.md: {} lacks argument {argument}",
                probe.name
            );
        }
    }
    let no_probes = std::env::var("VSR_NO_PROBES_REPLICA")
        .expect("scripts/test builds the no-probe replica and sets VSR_NO_PROBES_REPLICA");
    let sections = std::process::Command::new("readelf")
        .arg("-SW")
        .arg(&no_probes)
        .output()
        .unwrap();
    assert!(sections.status.success());
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        sections.contains(".text") && !sections.contains("stapsdt"),
        "no-probe build carries notes"
    );
}

#[test]
fn view_change_reasons_operator_request_and_primary_timeout() {
    let cluster = Cluster::start("probes-reasons", 3, &[]);
    cluster.wait_for_log(1, "Normal in view 0", Duration::from_secs(5));
    let bpftrace = Bpftrace::attach_binary(&program(
        &cluster.binary,
        &[(
            "view_change_start",
            "printf(\"start %d %d %d %d\\n\", arg0, arg1, arg2, arg3);",
        )],
    ));
    // An operator asks replica 2 to abandon view 0; the others follow it to view 1.
    signal(cluster.pid(2), "USR1");
    cluster.wait_for_log(1, "Normal in view 1", Duration::from_secs(10));
    // Freeze the primary of view 1 without closing its connections: the backups time out.
    signal(cluster.pid(1), "STOP");
    cluster.wait_for_log(0, "Normal in view 2", Duration::from_secs(10));
    signal(cluster.pid(1), "CONT");
    let output = bpftrace.finish();
    let rows = tagged_rows(&output, "start ");
    assert!(
        rows.contains(&vec![2, 0, 1, 2]),
        "operator_request on replica 2:\n{output}"
    );
    assert!(
        rows.contains(&vec![0, 1, 2, 0]) || rows.contains(&vec![2, 1, 2, 0]),
        "primary_timeout:\n{output}"
    );
    assert!(
        rows.iter().any(|row| row[1..] == [0, 1, 3]),
        "higher_view on the followers:\n{output}"
    );
}
