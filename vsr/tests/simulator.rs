//! Seeded simulation sweep: random faults, then heal; every run must keep every acknowledged
//! write, agree on committed prefixes, reply linearizably, and make progress once healed.
//!
//! `VSR_SIM_SEEDS=N` sets the sweep size; `VSR_SIM_SEED=S` reruns one seed, and with
//! `VSR_SIM_TRACE=1` prints every fault and restart with the replicas' states.

use vsr::simulator::Simulator;

const SIMULATED_RUN_NS: u64 = 20_000_000_000;
const SETTLE_LIMIT_NS: u64 = 60_000_000_000;

fn run_seed(seed: u64) -> Result<String, String> {
    let replica_count = [1, 3, 3, 3, 5][(seed % 5) as usize];
    let mut simulator = Simulator::new(seed, replica_count, 6, 150);
    simulator.trace = std::env::var_os("VSR_SIM_TRACE").is_some();
    let faults = simulator.faults.clone();
    simulator.run(SIMULATED_RUN_NS);
    let settled = simulator.heal_and_settle(SETTLE_LIMIT_NS);
    simulator
        .check()
        .map_err(|error| format!("{error}; at the end: {}", simulator.describe()))?;
    if !settled {
        return Err(format!(
            "did not settle within {} s after healing: {}",
            SETTLE_LIMIT_NS / 1_000_000_000,
            simulator.describe()
        ));
    }
    Ok(format!(
        "seed {seed}: {} replicas, {} acknowledged, {} crashes, {} corruptions, {} replacements, {:?}",
        replica_count,
        simulator.acknowledged.len(),
        simulator.crashes,
        simulator.corruptions,
        simulator.replacements,
        faults
    ))
}

#[test]
fn seeded_sweep_keeps_acknowledged_writes_and_agrees() {
    let seeds: Vec<u64> = match std::env::var("VSR_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("VSR_SIM_SEED is a number")],
        Err(_) => {
            let count: u64 = std::env::var("VSR_SIM_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1000);
            (0..count).collect()
        }
    };
    let mut failures = Vec::new();
    for seed in seeds {
        // A replica's assertion failing is a failure of this seed: report it with the line
        // that reruns it, like any other.
        let outcome = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {message}"))
        });
        match outcome {
            Ok(summary) => eprintln!("{summary}"),
            Err(error) => {
                eprintln!("seed {seed} FAILED: {error}");
                failures.push(format!("seed {seed}: {error} (rerun: VSR_SIM_SEED={seed} cargo test --release --test simulator)"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
