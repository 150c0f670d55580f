//! A fixed amount of work for instruction counting: a 3-replica cluster in the simulator with
//! no faults, 8 clients each completing the same number of requests, with no disk, network or
//! clock in the way. The same seed and count give the same instructions every run, so
//! `valgrind --tool=callgrind` on a build with the probes compiled in and one without measures
//! exactly what the (detached) probe sites cost. Used by `scripts/bench`.
//!
//!   simulated_ops [REQUESTS_PER_CLIENT]    (default 2,000)

use vsr::simulator::{Faults, Simulator};

const SEED: u64 = 1;
const CLIENTS: usize = 8;
const SETTLE_LIMIT_NS: u64 = 3_600_000_000_000;

fn main() {
    let requests_per_client: u64 = match std::env::args().nth(1) {
        None => 2_000,
        Some(text) => match text.parse() {
            Ok(count) => count,
            Err(_) => {
                eprintln!("simulated_ops: {text:?} is not a request count");
                std::process::exit(2);
            }
        },
    };
    let mut simulator = Simulator::new(SEED, 3, CLIENTS, requests_per_client);
    simulator.faults = Faults::none();
    if !simulator.heal_and_settle(SETTLE_LIMIT_NS) {
        eprintln!("simulated_ops: did not settle: {}", simulator.describe());
        std::process::exit(1);
    }
    println!("operations={}", simulator.acknowledged.len());
}
