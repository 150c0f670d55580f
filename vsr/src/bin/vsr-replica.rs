//! `vsr-replica`: one replica of a VSR cluster, over TCP, with its journal in a data directory.
//! `vsr-replica format` creates the data directory; `vsr-replica start` runs the replica.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vsr::replica::{Config, Replica};
use vsr::runtime;
use vsr::storage::FileStorage;

#[derive(Debug, Parser)]
#[command(version, about = "One replica of a Viewstamped Replication cluster")]
struct Arguments {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Create a replica's data directory (journal and superblock), durably.
    Format(FormatArguments),
    /// Run a formatted replica: it resumes from its durable state.
    Start(StartArguments),
}

#[derive(Debug, clap::Args)]
struct FormatArguments {
    /// Cluster id: messages and data directories of other clusters are rejected.
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    /// This replica's index in the cluster.
    #[arg(long)]
    replica: u8,
    #[arg(long)]
    replica_count: u8,
    /// Directory for the journal and superblock; created if missing, refused if it already
    /// holds a replica.
    #[arg(long)]
    data: PathBuf,
    /// Format a replacement for a replica whose data was lost, in a cluster that has data: it
    /// does not vote until the cluster has told it the current view and log.
    #[arg(long)]
    recover: bool,
}

#[derive(Debug, clap::Args)]
struct StartArguments {
    /// This replica's index into --addresses.
    #[arg(long)]
    replica: u8,
    /// Every replica's address, in replica order: host:port,host:port,…
    #[arg(long)]
    addresses: String,
    /// The data directory `vsr-replica format` created.
    #[arg(long)]
    data: PathBuf,
    /// Cluster id: messages and data directories of other clusters are rejected.
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    /// Silence from the primary before a view change; also the view change's own deadline.
    #[arg(long, default_value_t = 500)]
    view_change_timeout_ms: u64,
    #[arg(long, default_value_t = 100)]
    retry_ms: u64,
    /// How often the state_snapshot probe fires.
    #[arg(long, default_value_t = 500)]
    snapshot_interval_ms: u64,
    #[arg(long, default_value_t = 16)]
    pipeline_max: u64,
    #[arg(long, default_value_t = 16 * 1024)]
    client_sessions_max: usize,
    /// Ops above the commit a message may name; beyond it the message is refused, so no
    /// peer can make the journal index allocate for ops not committed (8 bytes an op).
    #[arg(long, default_value_t = 1 << 20)]
    op_ahead_max: u64,
    /// Largest client operation accepted; a larger one is answered "too large", never
    /// prepared. The default fits the largest valid key-value operation.
    #[arg(long, default_value_t = vsr::kv::OPERATION_SIZE_MAX)]
    request_bytes_max: usize,
    /// Committed ops between two checkpoints of the state machine; a restart replays at most
    /// this many committed ops from the journal.
    #[arg(long, default_value_t = Config::new(0, 0, 1).checkpoint_interval_ops)]
    checkpoint_interval_ops: u64,
    /// Committed journal records the background scrubber reads back per second (0: off); each
    /// tour also checks the checkpoint and the superblock copies.
    #[arg(long, default_value_t = Config::new(0, 0, 1).scrub_ops_per_second)]
    scrub_ops_per_second: u64,
}

fn main() -> ExitCode {
    let result = match Arguments::parse().command {
        Commands::Format(arguments) => format(arguments),
        Commands::Start(arguments) => start(arguments),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vsr-replica: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn format(arguments: FormatArguments) -> anyhow::Result<()> {
    let config = Config::new(
        arguments.cluster,
        arguments.replica,
        arguments.replica_count,
    );
    // Before anything is created: a refused format leaves no half-made directory behind.
    config.validate_format(arguments.recover)?;
    let data = &arguments.data;
    if data.exists() && !data.is_dir() {
        anyhow::bail!("--data {}: not a directory", data.display());
    }
    let mut storage = FileStorage::create(data)
        .map_err(|error| anyhow::anyhow!("data directory {}: {error}", data.display()))?;
    Replica::format(&config, &mut storage, arguments.recover)
        .map_err(|error| anyhow::anyhow!("data directory {}: {error}", data.display()))?;
    eprintln!(
        "vsr-replica: formatted {} as replica {} of {} in cluster {}{}",
        data.display(),
        arguments.replica,
        arguments.replica_count,
        arguments.cluster,
        if arguments.recover {
            " (a replacement: it recovers from the cluster before it votes)"
        } else {
            ""
        }
    );
    Ok(())
}

fn start(arguments: StartArguments) -> anyhow::Result<()> {
    let addresses = runtime::parse_addresses(&arguments.addresses)?;
    let replica_count = u8::try_from(addresses.len())
        .map_err(|_| anyhow::anyhow!("{} addresses: at most 255 replicas", addresses.len()))?;
    let mut config = Config::new(arguments.cluster, arguments.replica, replica_count);
    let milliseconds = |ms: u64| ms * 1_000_000;
    config.heartbeat_interval_ns = milliseconds(arguments.heartbeat_ms);
    config.view_change_timeout_ns = milliseconds(arguments.view_change_timeout_ms);
    config.retry_interval_ns = milliseconds(arguments.retry_ms);
    config.snapshot_interval_ns = milliseconds(arguments.snapshot_interval_ms);
    config.pipeline_max = arguments.pipeline_max;
    anyhow::ensure!(config.pipeline_max > 0, "--pipeline-max must be at least 1");
    config.op_ahead_max = arguments.op_ahead_max;
    anyhow::ensure!(
        config.op_ahead_max >= config.pipeline_max,
        "--op-ahead-max must be at least --pipeline-max"
    );
    config.client_sessions_max = arguments.client_sessions_max;
    anyhow::ensure!(
        config.client_sessions_max > 0,
        "--client-sessions-max must be at least 1"
    );
    config.request_bytes_max = arguments.request_bytes_max;
    config.checkpoint_interval_ops = arguments.checkpoint_interval_ops;
    config.scrub_ops_per_second = arguments.scrub_ops_per_second;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    config.nonce_entropy = since_epoch.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40);
    if arguments.data.exists() && !arguments.data.is_dir() {
        anyhow::bail!("--data {}: not a directory", arguments.data.display());
    }
    let storage = FileStorage::open(&arguments.data)
        .map_err(|error| anyhow::anyhow!("data directory {}: {error}", arguments.data.display()))?;
    let replica = Replica::open(config, storage, 0)
        .map_err(|error| anyhow::anyhow!("data directory {}: {error}", arguments.data.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(runtime::run(replica, addresses, arguments.cluster))
}
