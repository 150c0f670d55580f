//! The cost of recording one latency observation, from inside the process:
//!
//! - `probe`: a `vsr` probe site (`prepare_quorum`). Detached it is a semaphore load and a
//!   not-taken branch; run it while `vsrscope serve --binary` holds this binary and every call
//!   is an attached hit.
//! - `kimberlite`: Kimberlite's in-process metrics (`kimberlite_vsr::METRICS`, a global of
//!   atomics), recording the same prepare latency.
//!
//! With `--threads 2` both threads record into the same metrics at once, which is where shared
//! atomics pay for cache-line traffic. Prints nanoseconds per event, per thread (wall time of
//! each thread's loop divided by its events; the median thread is reported). Used by
//! `scripts/bench`.
//!
//!   per_event probe|kimberlite [--threads N] [--events N]

use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum Recorder {
    Probe,
    Kimberlite,
}

fn record(recorder: Recorder, events: u64) -> Duration {
    let started = Instant::now();
    for op in 0..events {
        // The latency depends on the loop so the call cannot be hoisted.
        let latency_ns = op & 0xffff;
        match recorder {
            Recorder::Probe => vsr_probes::prepare_quorum(|| (0, op, latency_ns, 2)),
            Recorder::Kimberlite => {
                kimberlite_vsr::METRICS.record_prepare_latency(Duration::from_nanos(latency_ns))
            }
        }
    }
    started.elapsed()
}

fn usage(problem: &str) -> ! {
    eprintln!("per_event: {problem}\nusage: per_event probe|kimberlite [--threads N] [--events N]");
    std::process::exit(2);
}

fn main() {
    let mut arguments = std::env::args().skip(1);
    let recorder = match arguments.next().as_deref() {
        Some("probe") => Recorder::Probe,
        Some("kimberlite") => Recorder::Kimberlite,
        other => usage(&format!("unknown recorder {other:?}")),
    };
    let (mut threads, mut events) = (1u64, 2_000_000u64);
    while let Some(flag) = arguments.next() {
        let value = arguments
            .next()
            .and_then(|text| text.parse::<u64>().ok())
            .filter(|value| *value > 0)
            .unwrap_or_else(|| usage(&format!("{flag} needs a positive number")));
        match flag.as_str() {
            "--threads" => threads = value,
            "--events" => events = value,
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    let mut elapsed: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || record(recorder, events)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("recorder thread panicked"))
            .collect()
    });
    elapsed.sort();
    let median = elapsed[elapsed.len() / 2];
    println!(
        "ns_per_event={:.2}",
        median.as_nanos() as f64 / events as f64
    );
}
