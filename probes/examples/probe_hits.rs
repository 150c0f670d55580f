//! Fires one probe in a tight loop and reports nanoseconds per call: the cost of a probe site
//! detached (semaphore 0) or attached (a uprobe trap per hit). Used by `scripts/bench`.
//!
//!   probe_hits [HITS]    (default 2,000,000)

use std::time::Instant;

fn main() {
    let hits: u64 = std::env::args()
        .nth(1)
        .and_then(|text| text.parse().ok())
        .unwrap_or(2_000_000);
    let started = Instant::now();
    for op in 0..hits {
        // The arguments are cheap and depend on the loop so the call cannot be hoisted.
        vsr_probes::prepare_quorum(|| (0, op, op & 0xffff, 2));
    }
    let elapsed = started.elapsed();
    println!("ns_per_hit={:.2}", elapsed.as_nanos() as f64 / hits as f64);
}
