//! Peer identity over real TCP: a connection speaks for at most one replica, fixed by its first
//! message. Forged replica messages (on a client connection, claiming a replica that is
//! connected already, or claiming the replica itself), with heads far beyond anything
//! committed, are refused and close their connection; the cluster keeps acknowledging writes
//! and no replica's memory grows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use vsr::message::{Entry, Header, Message, encode_entries};
use vsr_probes::Command as Wire;

use super::cluster::register_frame;
use testkit::{BenchResult, Cluster};

const CLUSTER_ID: u64 = 1;
/// A head no replica could index: 8 bytes an op would be 8 TiB of journal index.
const HUGE_OP: u64 = 1 << 40;
/// The most a replica under this test's load may hold; a forged head that got through would
/// ask for terabytes.
const RSS_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// A StartView of view 1, as if from its primary (replica 1), whose head is `HUGE_OP`.
fn forged_start_view() -> Bytes {
    let entry = Entry::new(HUGE_OP, 1, 12345, Bytes::from_static(b"\0\0\0\0"));
    let mut header = Header::new(Wire::StartView, CLUSTER_ID, 1);
    header.view = 1;
    header.op = entry.op;
    header.context = entry.checksum;
    Message::new(header, encode_entries(&[&entry])).encode()
}

/// A Prepare of view 0, as if from its primary (replica 0), for op `HUGE_OP`.
fn forged_prepare() -> Bytes {
    let entry = Entry::new(HUGE_OP, 0, 12345, Bytes::from_static(b"\0\0\0\0"));
    let mut header = Header::new(Wire::Prepare, CLUSTER_ID, 0);
    header.op = entry.op;
    header.context = entry.checksum;
    header.parent = entry.parent;
    Message::new(header, entry.body).encode()
}

/// Sends `frames` on a new connection to `address`, and waits (with a deadline) for the
/// replica to close it.
fn sent_and_closed(address: SocketAddr, frames: &[Bytes]) {
    let mut stream = TcpStream::connect(address).unwrap();
    for frame in frames {
        stream.write_all(frame).unwrap();
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut scratch = [0u8; 4096];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            // A reply to the registration; the close comes after it.
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(error) => panic!("replica at {address} kept a forging connection open: {error}"),
        }
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("replica process {pid} is gone: {error}"));
    assert!(
        !status.contains("State:\tZ"),
        "replica process {pid} exited"
    );
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

#[test]
fn forged_replica_messages_are_refused_and_the_cluster_keeps_serving() {
    let cluster = Cluster::start("forged-peers", 3, &[]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let bench = cluster.bench_in_background(&["--duration-s", "6", "--clients", "16", "--verify"]);
    std::thread::sleep(Duration::from_secs(1));
    for replica in 0..3 {
        let address = cluster.addresses[replica];
        // A client connection that goes on to speak as the primary of a later view.
        sent_and_closed(
            address,
            &[register_frame(CLUSTER_ID, 77), forged_start_view()],
        );
        // A connection claiming a replica that is connected already (or this very replica).
        sent_and_closed(address, &[forged_prepare()]);
        sent_and_closed(address, &[forged_start_view()]);
    }
    let result = BenchResult::from_child(bench);
    result.assert_verified();
    assert!(result.acknowledged > 1000, "{}", result.stdout);
    for replica in 0..3 {
        let rss = rss_bytes(cluster.pid(replica));
        eprintln!("replica {replica}: {} MiB resident", rss >> 20);
        assert!(
            rss < RSS_BYTES_MAX,
            "replica {replica}: {rss} bytes resident"
        );
        let log = cluster.log(replica);
        assert_eq!(
            log.matches("peer_identity").count(),
            3,
            "replica {replica} refused each forging connection once: {log}"
        );
        assert!(
            !log.contains("ViewChange in view"),
            "replica {replica} followed a forged view: {log}"
        );
    }
}
