//! A real cluster: `vsr-replica` processes on loopback TCP with journals on disk, driven by
//! `vsr-bench`, whose own acknowledgements and read-back are the ground truth.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use vsr::client::{Client, ReplyOutcome};
use vsr::message::{Entry, HEADER_SIZE, Header, Message, SENDER_CLIENT};
use vsr_probes::Command as Wire;

use testkit::{
    BenchResult, Cluster, TestDirectory, assert_clear_failure, corrupt_middle_byte, replica_binary,
};

const CLUSTER_ID: u64 = 1;

#[test]
fn kill_primary_under_load_then_restart_loses_nothing() {
    let mut cluster = Cluster::start("kill-primary", 3, &[]);
    let bench = cluster.bench_in_background(&["--duration-s", "8", "--clients", "32", "--verify"]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(0);
    cluster.wait_for_log(1, "Normal in view 1", Duration::from_secs(10));
    let mark = cluster.log_mark(0);
    cluster.start_replica(0);
    // Its journal is intact: it resumes in its durable view at once, then follows view 1.
    cluster.wait_for_log_since(0, mark, "Normal in view 0", Duration::from_secs(10));
    cluster.wait_for_log_since(0, mark, "Normal in view 1", Duration::from_secs(20));
    assert!(
        !cluster.log(0)[mark..].contains("Recovering"),
        "{}",
        cluster.log(0)
    );
    let result = BenchResult::from_child(bench);
    result.assert_verified();
    assert!(
        result.acknowledged > 1000,
        "load continued: {}",
        result.stdout
    );
    // Idle now: the restarted replica catches up to the same commit as the others.
    let bench = cluster.bench(&["--duration-s", "1", "--clients", "4"]);
    assert!(bench.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let commits = cluster.stop_all_and_commits();
    assert!(
        commits
            .iter()
            .all(|commit| *commit == commits[0] && *commit > 0),
        "commits {commits:?}"
    );
}

#[test]
fn corrupt_journal_entry_is_detected_and_repaired_from_peers() {
    let mut cluster = Cluster::start("corrupt-journal", 3, &[]);
    let first = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(first.status.success() && first.acknowledged > 0);
    assert!(cluster.stop(2).success());
    let journal = cluster.first_journal_segment(2);
    corrupt_middle_byte(&journal);
    cluster.start_replica(2);
    cluster.wait_for_log(2, "Normal in view 0", Duration::from_secs(20));
    let second = cluster.bench(&["--duration-s", "2", "--clients", "16", "--verify"]);
    second.assert_verified();
    std::thread::sleep(Duration::from_millis(300));
    let commits = cluster.stop_all_and_commits();
    assert!(
        commits.iter().all(|commit| *commit == commits[0]),
        "commits {commits:?}"
    );
    let log = cluster.log(2);
    let starts = log
        .lines()
        .filter(|line| line.contains("listening"))
        .count();
    assert_eq!(starts, 2, "{log}");
}

/// Kills every replica of a cluster under load, as a power loss of the whole cluster would,
/// and starts them again: the load generator's acknowledged writes all read back.
fn kill_all_under_load_and_restart(name: &str, replica_count: usize, order: &[&[usize]]) {
    // Checkpoints every 64 ops: the restarts below start from one, not from op 1.
    let mut cluster = Cluster::start(
        name,
        replica_count,
        &[
            "--view-change-timeout-ms",
            "500",
            "--checkpoint-interval-ops",
            "64",
        ],
    );
    let bench = cluster.bench_in_background(&["--duration-s", "8", "--clients", "32", "--verify"]);
    std::thread::sleep(Duration::from_secs(2));
    let marks: Vec<usize> = (0..replica_count).map(|r| cluster.log_mark(r)).collect();
    for step in order {
        for &replica in *step {
            if cluster.is_running(replica) {
                cluster.kill(replica);
            } else {
                cluster.start_replica(replica);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for replica in 0..replica_count {
        if !cluster.is_running(replica) {
            cluster.start_replica(replica);
        }
    }
    let result = BenchResult::from_child(bench);
    result.assert_verified();
    // Service resumed: writes after the restart were acknowledged, and read back.
    let after = cluster.bench(&["--duration-s", "1", "--clients", "8", "--verify"]);
    after.assert_verified();
    assert!(after.acknowledged > 100, "{}", after.stdout);
    for (replica, mark) in marks.into_iter().enumerate() {
        let log = &cluster.log(replica)[mark..];
        assert!(
            !log.contains("Recovering"),
            "an intact replica resumes without recovery: {log}"
        );
        if !order.iter().any(|step| step.contains(&replica)) {
            continue;
        }
        let checkpoint = log
            .lines()
            .find(|line| line.contains("listening on"))
            .and_then(|line| line.split(" checkpoint ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|op| op.parse::<u64>().ok());
        assert!(
            checkpoint.is_some_and(|op| op > 0),
            "replica {replica} restarted from a checkpoint: {log}"
        );
    }
}

#[test]
fn all_replicas_killed_at_once_resume_and_lose_nothing() {
    kill_all_under_load_and_restart("kill-all", 3, &[&[0, 1, 2]]);
}

#[test]
fn overlapping_restarts_resume() {
    // Replica 2 down; replica 1 killed and restarted while 2 is still down; then 2 back.
    kill_all_under_load_and_restart("overlapping", 3, &[&[2], &[1], &[1], &[2]]);
}

#[test]
fn one_replica_cluster_restarts() {
    kill_all_under_load_and_restart("solo-restart", 1, &[&[0]]);
}

#[test]
fn wiped_replica_reformatted_as_replacement_recovers_before_it_votes() {
    let mut cluster = Cluster::start("replacement", 3, &[]);
    let first = cluster.bench(&["--duration-s", "2", "--clients", "16"]);
    assert!(first.status.success() && first.acknowledged > 0);
    cluster.kill(2);
    std::fs::remove_dir_all(cluster.data_directory(2)).unwrap();
    std::fs::create_dir(cluster.data_directory(2)).unwrap();
    // An unformatted directory is refused, never taken for a replica that never voted.
    let mark = cluster.log_mark(2);
    let refused = cluster.replica_command(2).output().unwrap();
    assert_clear_failure(&refused, "vsr-replica format");
    cluster.replace_replica(2);
    cluster.start_replica(2);
    cluster.wait_for_log_since(2, mark, "Recovering in view", Duration::from_secs(10));
    cluster.wait_for_log_since(2, mark, "Normal in view", Duration::from_secs(20));
    let second = cluster.bench(&["--duration-s", "2", "--clients", "16", "--verify"]);
    second.assert_verified();
    std::thread::sleep(Duration::from_millis(300));
    let commits = cluster.stop_all_and_commits();
    assert!(
        commits.iter().all(|commit| *commit == commits[0]),
        "the replacement caught up: commits {commits:?}"
    );
}

/// A valid frame from a client: registration of a session.
pub fn register_frame(cluster: u64, client_id: u64) -> Bytes {
    let mut header = Header::new(Wire::Request, cluster, SENDER_CLIENT);
    header.client_id = client_id;
    header.request_number = 1;
    Message::new(header, Bytes::new()).encode()
}

/// A Prepare claiming to come from a replica index the cluster does not have.
pub fn prepare_from_stranger(cluster: u64) -> Bytes {
    let entry = Entry::new(1, 0, 0, Bytes::from_static(b"\0\0\0\0"));
    let mut header = Header::new(Wire::Prepare, cluster, 7);
    header.op = 1;
    header.context = entry.checksum;
    Message::new(header, entry.body).encode()
}

/// Sends each malformed frame kind the replica must reject: wrong cluster (header), corrupt
/// body, unknown replica, and garbage (header checksum). Returns once all are written. The
/// garbage goes on a connection of its own: a claim of an unknown replica closes its
/// connection.
pub fn send_malformed_frames(address: std::net::SocketAddr) {
    let mut wrong_cluster = TcpStream::connect(address).unwrap();
    wrong_cluster
        .write_all(&register_frame(CLUSTER_ID + 1, 99))
        .unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    let mut header = Header::new(Wire::Request, CLUSTER_ID, SENDER_CLIENT);
    header.client_id = 98;
    header.request_number = 2;
    let mut corrupt_body = Message::new(header, Bytes::from_static(b"payload"))
        .encode()
        .to_vec();
    let last = corrupt_body.len() - 1;
    corrupt_body[last] ^= 1;
    stream.write_all(&corrupt_body).unwrap();
    stream
        .write_all(&prepare_from_stranger(CLUSTER_ID))
        .unwrap();
    let mut garbage = TcpStream::connect(address).unwrap();
    garbage.write_all(&[0xabu8; 96]).unwrap();
}

#[test]
fn malformed_messages_are_rejected_and_the_replica_keeps_serving() {
    let cluster = Cluster::start("malformed", 3, &[]);
    for replica in 0..3 {
        send_malformed_frames(cluster.addresses[replica]);
    }
    let result = cluster.bench(&["--duration-s", "1", "--clients", "8", "--verify"]);
    result.assert_verified();
    assert!(result.acknowledged > 0);
    for replica in 0..3 {
        assert!(
            !cluster.log(replica).contains("panicked"),
            "{}",
            cluster.log(replica)
        );
    }
}

#[test]
fn full_session_table_evicts_and_never_executes_twice() {
    let cluster = Cluster::start("sessions", 3, &["--client-sessions-max", "4"]);
    let result = cluster.bench(&["--duration-s", "2", "--clients", "8", "--verify"]);
    result.assert_verified();
    assert!(
        result.evictions > 0,
        "8 sessions in a table of 4 must evict: {}",
        result.stdout
    );
}

/// One client session over a raw connection to `address`, registered.
fn registered_client(address: std::net::SocketAddr, client_id: u64) -> (Client, TcpStream) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = Client::new(CLUSTER_ID, 3, client_id);
    stream.write_all(&client.register()).unwrap();
    let reply = read_reply(&mut stream);
    assert!(
        matches!(client.on_reply(&reply), ReplyOutcome::Done { .. }),
        "{reply:?}"
    );
    (client, stream)
}

fn read_reply(stream: &mut TcpStream) -> Message {
    let mut header = [0u8; HEADER_SIZE];
    stream.read_exact(&mut header).unwrap();
    let header = Header::decode(&header, CLUSTER_ID).unwrap();
    let mut body = vec![0u8; header.body_size()];
    stream.read_exact(&mut body).unwrap();
    Message::from_parts(header, Bytes::from(body)).unwrap()
}

#[test]
fn oversized_requests_are_refused_and_a_view_change_carries_the_largest_allowed() {
    let mut cluster = Cluster::start("oversized", 3, &[]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    // Two 9 MiB requests in flight used to make every DoViewChange larger than a frame.
    let operation = Bytes::from(vec![7u8; 9 * 1024 * 1024]);
    for client_id in [41, 42] {
        let (mut client, mut stream) = registered_client(cluster.addresses[0], client_id);
        stream
            .write_all(&client.request(operation.clone()))
            .unwrap();
        let reply = read_reply(&mut stream);
        assert_eq!(
            client.on_reply(&reply),
            ReplyOutcome::TooLarge,
            "a 9 MiB operation is refused, not prepared: {reply:?}"
        );
        // The session stays usable.
        stream
            .write_all(&client.request(Bytes::from_static(b"\x02\x01\x00k")))
            .unwrap();
        let reply = read_reply(&mut stream);
        assert!(
            matches!(client.on_reply(&reply), ReplyOutcome::Done { .. }),
            "{reply:?}"
        );
    }
    // The largest valid operations, a full pipeline of them, through a view change.
    let bench = cluster.bench_in_background(&[
        "--duration-s",
        "6",
        "--clients",
        "64",
        "--value-bytes",
        "65536",
        "--keys",
        "256",
        "--verify",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(0);
    cluster.wait_for_log(1, "Normal in view 1", Duration::from_secs(10));
    let result = BenchResult::from_child(bench);
    result.assert_verified();
    // Refused by the replica's own limit, with a clear error from the load generator.
    let small_limit = Cluster::start("request-limit", 3, &["--request-bytes-max", "100"]);
    small_limit.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let refused = small_limit.bench(&["--ops", "10", "--clients", "1", "--value-bytes", "200"]);
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("refused 10 requests as too large"),
        "{}",
        refused.stderr
    );
}

#[test]
fn a_replica_that_cannot_hear_its_peers_does_not_move_the_cluster() {
    // Replica 2 sends to its peers but nothing reaches it: it keeps asking for a view change.
    let cluster = Cluster::start_with_inbound_cut("half-open", 3, Some(2), &[]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let result = cluster.bench(&["--duration-s", "8", "--clients", "16", "--verify"]);
    result.assert_verified();
    assert!(result.acknowledged > 1000, "{}", result.stdout);
    for replica in [0, 1] {
        let log = cluster.log(replica);
        assert!(
            !log.contains("ViewChange in view"),
            "replica {replica} left its working view: {log}"
        );
    }
}

fn run_replica(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(replica_binary())
        .args(arguments)
        .output()
        .unwrap()
}

fn format(data: &str, replica: &str, cluster: &str) -> std::process::Output {
    run_replica(&[
        "format",
        "--cluster",
        cluster,
        "--replica",
        replica,
        "--replica-count",
        "1",
        "--data",
        data,
    ])
}

fn start(addresses: &str, data: &str, extra: &[&str]) -> std::process::Output {
    let mut arguments = vec![
        "start",
        "--replica",
        "0",
        "--addresses",
        addresses,
        "--data",
        data,
    ];
    arguments.extend_from_slice(extra);
    run_replica(&arguments)
}

#[test]
fn bad_configuration_gets_a_clear_error() {
    let directory = TestDirectory::new("bad-config");
    let file = directory.0.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let file_argument = file.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let single = format!("127.0.0.1:{port}");
    assert_clear_failure(&start(&single, file_argument, &[]), "not a directory");
    assert_clear_failure(&format(file_argument, "0", "1"), "not a directory");

    // Never formatted: a missing or empty directory is refused, not taken for a new replica.
    let data = directory.0.join("data");
    let data_argument = data.to_str().unwrap();
    assert_clear_failure(&start(&single, data_argument, &[]), "vsr-replica format");
    std::fs::create_dir(&data).unwrap();
    assert_clear_failure(&start(&single, data_argument, &[]), "vsr-replica format");
    assert_clear_failure(&format(data_argument, "3", "1"), "replica index 3");
    assert_clear_failure(
        &run_replica(&[
            "format",
            "--replica",
            "0",
            "--replica-count",
            "1",
            "--data",
            data_argument,
            "--recover",
        ]),
        "no peer to recover from",
    );
    assert_clear_failure(&start("127.0.0.1", data_argument, &[]), "bad address");

    let formatted = format(data_argument, "0", "1");
    assert!(formatted.status.success(), "{formatted:?}");
    assert_clear_failure(&format(data_argument, "0", "1"), "already holds a replica");
    assert_clear_failure(
        &start(&single, data_argument, &["--checkpoint-interval-ops", "0"]),
        "checkpoint interval must be at least 1",
    );
    // A data directory formatted for one cluster is refused by another, and by another shape.
    assert_clear_failure(
        &start(&single, data_argument, &["--cluster", "2"]),
        "wrong data directory",
    );
    assert_clear_failure(
        &start(&format!("{single},127.0.0.1:1"), data_argument, &[]),
        "wrong data directory",
    );

    // Every superblock copy corrupt: refused, not guessed.
    let superblock = data.join("superblock.vsr");
    let mut bytes = std::fs::read(&superblock).unwrap();
    for copy in 0..4 {
        bytes[copy * 4096 + 20] ^= 0xff;
    }
    std::fs::write(&superblock, bytes).unwrap();
    assert_clear_failure(
        &start(&single, data_argument, &[]),
        "every copy fails its checksum",
    );

    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    let fresh = directory.0.join("fresh");
    let fresh_argument = fresh.to_str().unwrap();
    assert!(format(fresh_argument, "0", "1").status.success());
    assert_clear_failure(&start(&taken_address, fresh_argument, &[]), "cannot listen");
}
