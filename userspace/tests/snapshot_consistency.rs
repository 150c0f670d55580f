//! A state snapshot read from the kernel map is one snapshot, never a mix of two. This test is
//! the traced process: a thread publishes snapshots through the real `state_snapshot` probe
//! every 5 µs (a replica does every 100 ms or more), each with every counter field set to the
//! same number, while vsrscope's eBPF
//! program, attached to this process, copies them into its map and the main thread reads them
//! the way `serve` does. A copy that mixes two snapshots holds two different numbers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vsr_probes::{ReplicaSnapshot, SNAPSHOT_VERSION};
use vsrscope::attach::{SEED_BOUNDS_MS, Tracer};
use vsrscope::metrics::Reading;

const REPLICA: u8 = 5;

fn fill(snapshot: &mut ReplicaSnapshot, number: u64) {
    for field in [
        &mut snapshot.view,
        &mut snapshot.op,
        &mut snapshot.commit,
        &mut snapshot.log_bytes,
        &mut snapshot.log_entries,
        &mut snapshot.pending_requests,
        &mut snapshot.lag_operations,
        &mut snapshot.prepare_ok_votes,
        &mut snapshot.client_sessions_active,
        &mut snapshot.repair_inflight,
        &mut snapshot.bytes_sent,
        &mut snapshot.bytes_received,
    ] {
        *field = number;
    }
    snapshot.messages_sent.fill(number);
    snapshot.messages_received.fill(number);
}

/// The distinct numbers in a snapshot `fill` wrote: one, unless it mixes snapshots.
fn numbers(snapshot: &ReplicaSnapshot) -> Vec<u64> {
    let mut numbers: Vec<u64> = [
        snapshot.view,
        snapshot.op,
        snapshot.commit,
        snapshot.log_bytes,
        snapshot.log_entries,
        snapshot.pending_requests,
        snapshot.lag_operations,
        snapshot.prepare_ok_votes,
        snapshot.client_sessions_active,
        snapshot.repair_inflight,
        snapshot.bytes_sent,
        snapshot.bytes_received,
    ]
    .into_iter()
    .chain(snapshot.messages_sent)
    .chain(snapshot.messages_received)
    .collect();
    numbers.sort();
    numbers.dedup();
    numbers
}

/// Between publications: a reader needs a quiet moment of a few microseconds, which a replica
/// leaves it for all but a microsecond of every snapshot interval.
const PUBLISH_INTERVAL: Duration = Duration::from_micros(5);

fn publish_until(stop: &AtomicBool) {
    let mut snapshot = ReplicaSnapshot {
        version: SNAPSHOT_VERSION,
        replica_id: REPLICA,
        ..ReplicaSnapshot::default()
    };
    let mut number = 0;
    while !stop.load(Ordering::Relaxed) {
        number += 1;
        fill(&mut snapshot, number);
        let address = std::hint::black_box(&snapshot) as *const ReplicaSnapshot as u64;
        let size = size_of::<ReplicaSnapshot>() as u32;
        vsr_probes::state_snapshot(|| (REPLICA, address, size));
        let published = Instant::now();
        while published.elapsed() < PUBLISH_INTERVAL {
            std::hint::spin_loop();
        }
    }
}

#[test]
fn a_snapshot_read_never_mixes_two_snapshots() {
    let executable = std::env::current_exe().unwrap();
    let discovery = vsrscope::usdt::discover_file(&executable).unwrap();
    let bounds: Vec<Vec<f64>> = SEED_BOUNDS_MS.iter().map(|b| b.to_vec()).collect();
    let mut tracer = Tracer::load(&bounds, false).unwrap();
    tracer
        .attach(&executable, &discovery, Some(std::process::id()))
        .unwrap();
    let stop = AtomicBool::new(false);
    let (reads, distinct, mixed) = std::thread::scope(|scope| {
        scope.spawn(|| publish_until(&stop));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut reads, mut seen, mut mixed) = (0, Vec::new(), Vec::new());
        while Instant::now() < deadline {
            let reading = Reading::read(tracer.ebpf()).unwrap();
            let Some(published) = reading.snapshots.get(&u32::from(REPLICA)) else {
                continue;
            };
            reads += 1;
            let numbers = numbers(&published.snapshot);
            seen.push(numbers[0]);
            if numbers.len() > 1 {
                mixed.push(numbers);
            }
        }
        stop.store(true, Ordering::Relaxed);
        seen.dedup();
        (reads, seen.len(), mixed)
    });
    eprintln!(
        "{reads} reads, {distinct} distinct snapshots, {} mixed",
        mixed.len()
    );
    assert!(
        distinct > 100,
        "the publisher kept publishing during the reads"
    );
    assert!(
        mixed.is_empty(),
        "{} of {reads} reads mixed snapshots, e.g. {:?}",
        mixed.len(),
        mixed.first()
    );
}
