//! Checkpoints, a bounded journal and state transfer on a real cluster: replicas on loopback
//! with journals on disk, driven by `vsr-bench`, whose acknowledgements and read-back are the
//! ground truth.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use testkit::{Bpftrace, Cluster, signal, wait_until};

/// Journal segment size (`vsr::storage::JOURNAL_SEGMENT_BYTES`): the journal frees disk in
/// whole segments, so a bound on its disk use has one segment of slack.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Bytes the directory's files occupy on disk (allocated blocks, as `du` counts them).
fn disk_bytes(directory: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap();
    kilobytes * 1024
}

#[test]
fn a_replica_stopped_while_the_others_checkpoint_past_it_catches_up_by_state_transfer() {
    let mut cluster = Cluster::start("state-transfer", 3, &["--checkpoint-interval-ops", "256"]);
    let first = cluster.bench(&["--duration-s", "1", "--clients", "16"]);
    assert!(
        first.status.success() && first.acknowledged > 0,
        "{}",
        first.stdout
    );
    let mark = cluster.log_mark(2);
    signal(cluster.pid(2), "STOP");
    cluster.bench_past_a_stopped_replica();
    signal(cluster.pid(2), "CONT");
    cluster.wait_for_log_since(2, mark, "(state transfer)", Duration::from_secs(20));
    let after = cluster.bench(&["--duration-s", "1", "--clients", "16", "--verify"]);
    after.assert_verified();
    // The last commit reaches the backups with the next heartbeat (50 ms).
    std::thread::sleep(Duration::from_millis(300));
    let commits = cluster.stop_all_and_commits();
    assert!(
        commits.iter().all(|commit| *commit == commits[0]),
        "replica 2 caught up: commits {commits:?}"
    );
}

#[test]
fn the_journal_and_memory_stay_bounded_as_operations_accumulate() {
    let cluster = Cluster::start("bounded", 3, &["--checkpoint-interval-ops", "256"]);
    let first = cluster.bench(&["--ops", "100000", "--duration-s", "300", "--clients", "32"]);
    assert!(first.status.success(), "{}", first.stdout);
    let directory = cluster.data_directory(0);
    let (disk_first, rss_first) = (disk_bytes(&directory), rss_bytes(cluster.pid(0)));
    let more = cluster.bench(&[
        "--ops",
        "300000",
        "--duration-s",
        "300",
        "--clients",
        "32",
        "--verify",
    ]);
    more.assert_verified();
    assert!(more.acknowledged >= 300_000, "{}", more.stdout);
    let (disk_more, rss_more) = (disk_bytes(&directory), rss_bytes(cluster.pid(0)));
    eprintln!(
        "after 100,000 ops: {disk_first} bytes on disk, {rss_first} bytes RSS; \
         after 300,000 more: {disk_more} bytes on disk, {rss_more} bytes RSS"
    );
    assert!(
        disk_more <= disk_first.max(SEGMENT_BYTES) + SEGMENT_BYTES,
        "the data directory grew from {disk_first} to {disk_more} bytes"
    );
    assert!(
        rss_more <= rss_first + rss_first / 4 + 8 * 1024 * 1024,
        "replica 0's RSS grew from {rss_first} to {rss_more} bytes"
    );
}

/// The op, body offset and body size of the first entry record (kind 1, with a body) in a
/// journal segment: records are a 56-byte header (kind at byte 4, op at 16, body size at 48)
/// and the body, 8-byte aligned (docs/replica.md, journal format).
fn first_entry_record(journal: &std::fs::File) -> (u64, u64, u64) {
    let mut offset = 0;
    loop {
        let mut header = [0u8; 56];
        journal.read_exact_at(&mut header, offset).unwrap();
        let op = u64::from_le_bytes(header[16..24].try_into().unwrap());
        let body_bytes = u64::from(u32::from_le_bytes(header[48..52].try_into().unwrap()));
        if header[4] == 1 && body_bytes > 0 {
            return (op, offset + 56, body_bytes);
        }
        offset += (56 + body_bytes).next_multiple_of(8);
    }
}

#[test]
fn a_byte_rotting_in_a_running_replica_is_found_by_the_scrubber_once_and_repaired() {
    // No checkpoint in this run: every record stays in the journal for the scrubber to read.
    let mut cluster = Cluster::start(
        "scrub",
        3,
        &[
            "--checkpoint-interval-ops",
            "1000000",
            "--scrub-ops-per-second",
            "100000",
        ],
    );
    let first = cluster.bench(&["--duration-s", "1", "--clients", "8"]);
    assert!(
        first.status.success() && first.acknowledged > 0,
        "{}",
        first.stdout
    );
    let binary = cluster.binary.display().to_string();
    let trace = Bpftrace::attach_binary(&format!(
        "usdt:{binary}:vsr:checksum_failure /arg0 == 2/ {{ printf(\"corrupt %d %d\\n\", arg1, arg2); }}
         usdt:{binary}:vsr:repair_done /arg0 == 2/ {{ printf(\"repaired %d %d\\n\", arg1, arg3); }}
         usdt:{binary}:vsr:scrub_tour_done /arg0 == 2/ {{ printf(\"tour %d\\n\", arg2); }}"
    ));
    let tours_since = |mark: usize| trace.output_so_far()[mark..].matches("tour ").count();
    wait_until("a scrub tour", Duration::from_secs(10), || {
        tours_since(0) > 0
    });
    // Flip a byte in the body of the journal's first entry record, under the running replica.
    let segment = cluster.first_journal_segment(2);
    let journal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let (op, body_offset, body_bytes) = first_entry_record(&journal);
    let offset = body_offset + body_bytes / 2;
    let mut byte = [0u8; 1];
    journal.read_exact_at(&mut byte, offset).unwrap();
    journal.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
    journal.sync_all().unwrap();
    wait_until(
        "the scrubber to find the op",
        Duration::from_secs(10),
        || trace.output_so_far().contains(&format!("corrupt 0 {op}\n")),
    );
    wait_until(
        "the op repaired from a peer",
        Duration::from_secs(10),
        || {
            trace
                .output_so_far()
                .contains(&format!("repaired {op} 0\n"))
        },
    );
    // Two more tours, and a restart (whose scan meets the rotten record, now superseded) and a
    // tour after it: the corruption is never counted again.
    let repaired = trace.output_so_far().len();
    wait_until("two more tours", Duration::from_secs(10), || {
        tours_since(repaired) >= 2
    });
    assert!(cluster.stop(2).success());
    let restarted = trace.output_so_far().len();
    cluster.start_replica(2);
    wait_until("a tour after the restart", Duration::from_secs(20), || {
        tours_since(restarted) > 0
    });
    let output = trace.finish();
    assert_eq!(output.matches("corrupt ").count(), 1, "{output}");
    let after = cluster.bench(&["--duration-s", "1", "--clients", "8", "--verify"]);
    after.assert_verified();
}
