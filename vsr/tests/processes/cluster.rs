//! A real cluster: `vsr-replica` processes on loopback TCP with journals on disk, driven by
//! `vsr-bench`, whose own acknowledgements and read-back are the ground truth.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use vsr::message::{Entry, Header, Message, SENDER_CLIENT};
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
    cluster.start_replica(0);
    cluster.wait_for_log(0, "Recovering in view 0", Duration::from_secs(10));
    cluster.wait_for_log(0, "Normal in view 1", Duration::from_secs(20));
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
    let journal = cluster.data_directory(2).join("journal.vsr");
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
    let starts: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("listening"))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(
        starts[1].contains("Recovering"),
        "a restart recovers first: {}",
        starts[1]
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
/// body, unknown replica, and garbage (header checksum). Returns once all are written.
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
    stream.write_all(&[0xabu8; 96]).unwrap();
    stream.flush().unwrap();
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

fn run_replica(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(replica_binary())
        .args(arguments)
        .output()
        .unwrap()
}

#[test]
fn bad_configuration_gets_a_clear_error() {
    let directory = TestDirectory::new("bad-config");
    let file = directory.0.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let addresses = "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3";
    let file_argument = file.to_str().unwrap();
    assert_clear_failure(
        &run_replica(&[
            "--replica",
            "0",
            "--addresses",
            addresses,
            "--data",
            file_argument,
        ]),
        "not a directory",
    );
    let data = directory.0.join("data");
    let data_argument = data.to_str().unwrap();
    assert_clear_failure(
        &run_replica(&[
            "--replica",
            "3",
            "--addresses",
            addresses,
            "--data",
            data_argument,
        ]),
        "replica index 3",
    );
    assert_clear_failure(
        &run_replica(&[
            "--replica",
            "0",
            "--addresses",
            "127.0.0.1",
            "--data",
            data_argument,
        ]),
        "bad address",
    );

    // A data directory formatted for one cluster is refused by another.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let single = format!("127.0.0.1:{port}");
    let mut first = std::process::Command::new(replica_binary())
        .args([
            "--replica",
            "0",
            "--addresses",
            &single,
            "--data",
            data_argument,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    testkit::wait_until("the replica to listen", Duration::from_secs(5), || {
        TcpStream::connect(&single).is_ok()
    });
    first.kill().unwrap();
    first.wait().unwrap();
    assert_clear_failure(
        &run_replica(&[
            "--replica",
            "0",
            "--addresses",
            &single,
            "--data",
            data_argument,
            "--cluster",
            "2",
        ]),
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
        &run_replica(&[
            "--replica",
            "0",
            "--addresses",
            &single,
            "--data",
            data_argument,
        ]),
        "every copy fails its checksum",
    );

    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    let fresh = directory.0.join("fresh");
    assert_clear_failure(
        &run_replica(&[
            "--replica",
            "0",
            "--addresses",
            &taken_address,
            "--data",
            fresh.to_str().unwrap(),
        ]),
        "cannot listen",
    );
}
