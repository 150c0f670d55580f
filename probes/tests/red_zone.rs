//! A probe site in a leaf function that keeps values in stack memory around it, hit 10^6 times
//! under vsrscope and under bpftrace: every value must read back intact, and no function holding
//! a site may touch the red zone. Linux ≥ 6.17 turns an attached uprobe on our 5-byte `nop`
//! into a `call` to its trampoline, which pushes a return address below the stack pointer; a
//! leaf function that the compiler lets keep data there (the red zone) across the site loses it.
//!
//! Needs root (uprobes), bpftrace and a built vsrscope (`cargo build --release`). One executable
//! plays both parts (hence `harness = false`): run by cargo it is the test; run with
//! `VSR_RED_ZONE_CALLS=N` it is the traced program, started from a private copy so that each
//! tracer gets a fresh inode.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{Bpftrace, Serve, TestDirectory, map_value, red_zone_sites};

const CALLS: u64 = 1_000_000;
const REPLICA_ID: u8 = 7;

/// Values in stack memory (their address escapes through `black_box`), a probe between
/// writing and re-reading them, and no call: a leaf function, which the compiler is free to give
/// no frame and whose locals it may then keep below `%rsp` — unless the probe site forbids it.
#[inline(never)]
fn values_survive_probe(seed: u64) -> bool {
    let expected = |index: usize| seed.rotate_left(8 * index as u32) ^ index as u64;
    let mut values: [u64; 8] = std::array::from_fn(expected);
    black_box(&mut values);
    vsr_probes::prepare_quorum(|| (REPLICA_ID, seed, seed & 0xffff, 2));
    // Volatile reads of each value where it lies: the memory the probe ran next to, not a copy.
    values.iter().enumerate().all(|(index, value)| {
        // SAFETY: `value` is a reference to an initialised u64.
        unsafe { std::ptr::read_volatile(value) == expected(index) }
    })
}

/// The traced program's part: prints how many calls lost a value.
fn traced(calls: u64) {
    let corrupted = (0..calls)
        .filter(|seed| !values_survive_probe(*seed))
        .count();
    println!("calls {calls} corrupted {corrupted}");
}

/// A fresh copy of this executable.
fn copy_of_self(directory: &Path, name: &str) -> PathBuf {
    let copy = directory.join(name);
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    copy
}

/// Runs the traced program and returns its count of calls that lost a value.
fn corrupted_calls(binary: &Path) -> u64 {
    let output = Command::new(binary)
        .env("VSR_RED_ZONE_CALLS", CALLS.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "traced program failed: {output:?}");
    testkit::field(&stdout, "corrupted").unwrap_or_else(|| panic!("no count in {stdout:?}"))
}

fn main() {
    if let Ok(calls) = std::env::var("VSR_RED_ZONE_CALLS") {
        traced(calls.parse().expect("VSR_RED_ZONE_CALLS is a count"));
        return;
    }
    let directory = TestDirectory::new("red-zone");

    let binary = copy_of_self(&directory.0, "traced-by-vsrscope");
    let serve = Serve::start(&directory.0, &["--binary", binary.to_str().unwrap()]);
    let corrupted = corrupted_calls(&binary);
    let hits = serve.scrape().get(&format!(
        "vsr_prepare_latency_ms_count{{replica_id=\"{REPLICA_ID}\"}}"
    ));
    drop(serve);
    assert_eq!(corrupted, 0, "calls that lost a value under vsrscope");
    assert_eq!(hits, CALLS as f64, "vsrscope saw every hit");

    let binary = copy_of_self(&directory.0, "traced-by-bpftrace");
    let bpftrace = Bpftrace::attach_binary(&format!(
        "usdt:{}:vsr:prepare_quorum {{ @hits = count(); }}",
        binary.display()
    ));
    let corrupted = corrupted_calls(&binary);
    let output = bpftrace.finish();
    assert_eq!(corrupted, 0, "calls that lost a value under bpftrace");
    assert_eq!(map_value(&output, "hits"), Some(CALLS), "{output}");

    let report = red_zone_sites(&std::env::current_exe().unwrap());
    assert!(report.checked > 0, "no probe site found in this executable");
    assert!(
        report.offending.is_empty(),
        "probe sites in code that uses the red zone:\n{}",
        report.offending.join("\n")
    );
    println!("red_zone: {CALLS} hits each under vsrscope and bpftrace, no value lost");
}
