//! Real-process test harness shared by the replica's and vsrscope's tests: a cluster of
//! `vsr-replica` processes on loopback, `vsr-bench` runs, and bpftrace sessions attached to the
//! replicas. Every wait is a poll with a deadline.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod observer;
mod sites;

pub use observer::{Metrics, Prometheus, Serve, free_address, http_get};
pub use sites::{RedZoneReport, note_locations, red_zone_sites};

static NEXT_DIRECTORY: AtomicU64 = AtomicU64::new(0);

/// The directory holding the workspace's binaries: the test executable lives in its `deps/`.
pub fn binary_directory() -> PathBuf {
    let test = std::env::current_exe().unwrap();
    test.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

/// A workspace binary, built before the tests run (`cargo build --release`; scripts/test does).
pub fn binary(name: &str) -> PathBuf {
    let path = binary_directory().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --release` first",
        path.display()
    );
    path
}

pub fn replica_binary() -> PathBuf {
    binary("vsr-replica")
}

pub fn bench_binary() -> PathBuf {
    binary("vsr-bench")
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory removed when dropped (kept with `VSR_KEEP_TEST_DATA=1`).
#[derive(Debug)]
pub struct TestDirectory(pub PathBuf);

impl TestDirectory {
    pub fn new(name: &str) -> TestDirectory {
        let index = NEXT_DIRECTORY.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vsr-test-{}-{index}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDirectory(path)
    }
}

impl Drop for TestDirectory {
    fn drop(&mut self) {
        if std::env::var_os("VSR_KEEP_TEST_DATA").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A listener that accepts connections and discards whatever arrives: a replica's address
/// routed here cuts that direction of the link, while the sender's connection stays up.
fn black_hole() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || std::io::copy(&mut stream, &mut std::io::sink()));
        }
    });
    address
}

#[derive(Debug)]
pub struct Cluster {
    pub directory: TestDirectory,
    /// A private copy of the replica binary: a fresh inode per test, so uprobes (and their
    /// semaphore offsets) pinned by another test never collide with ours.
    pub binary: PathBuf,
    pub addresses: Vec<SocketAddr>,
    extra_arguments: Vec<String>,
    children: Vec<Option<Child>>,
    /// A replica whose peers send to a black hole instead of to it: it can send but not
    /// receive, a half-open link.
    inbound_cut: Option<(usize, SocketAddr)>,
}

impl Cluster {
    pub fn start(name: &str, replica_count: usize, extra_arguments: &[&str]) -> Cluster {
        Self::start_with_inbound_cut(name, replica_count, None, extra_arguments)
    }

    /// A cluster in which replica `cut`, if any, never hears its peers (their messages to it
    /// vanish) while everything it sends arrives.
    pub fn start_with_inbound_cut(
        name: &str,
        replica_count: usize,
        cut: Option<usize>,
        extra_arguments: &[&str],
    ) -> Cluster {
        let directory = TestDirectory::new(name);
        let binary = directory.0.join("vsr-replica");
        std::fs::copy(replica_binary(), &binary).unwrap();
        let addresses = (0..replica_count).map(|_| free_address()).collect();
        let mut cluster = Cluster {
            directory,
            binary,
            addresses,
            extra_arguments: with_test_defaults(extra_arguments),
            children: (0..replica_count).map(|_| None).collect(),
            inbound_cut: cut.map(|replica| (replica, black_hole())),
        };
        for replica in 0..replica_count {
            cluster.format_replica(replica, false);
            cluster.start_replica(replica);
        }
        cluster
    }

    /// Loses a stopped replica's data and formats its directory again as a replacement, which
    /// recovers from the cluster (the paper's recovery protocol) before it votes.
    pub fn replace_replica(&self, replica: usize) {
        assert!(!self.is_running(replica), "stop replica {replica} first");
        std::fs::remove_dir_all(self.data_directory(replica)).unwrap();
        self.format_replica(replica, true);
    }

    /// `vsr-replica format` for one replica's data directory, in the cluster that the extra
    /// arguments name (`--cluster`, default 1); `recover` formats a replacement.
    pub fn format_replica(&self, replica: usize, recover: bool) {
        let cluster = self
            .extra_arguments
            .iter()
            .position(|argument| argument == "--cluster")
            .map_or("1", |index| self.extra_arguments[index + 1].as_str());
        let mut command = Command::new(&self.binary);
        command
            .arg("format")
            .args(["--cluster", cluster])
            .args(["--replica", &replica.to_string()])
            .args(["--replica-count", &self.addresses.len().to_string()])
            .arg("--data")
            .arg(self.data_directory(replica));
        if recover {
            command.arg("--recover");
        }
        let output = retry_while_busy(|| command.output());
        assert!(
            output.status.success(),
            "vsr-replica format failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn addresses_argument(&self) -> String {
        self.addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_directory(&self, replica: usize) -> PathBuf {
        self.directory.0.join(format!("replica-{replica}"))
    }

    /// The journal's first segment file (`vsr::storage::FileStorage::journal_segment_file(0)`;
    /// the harness does not link the replica): what a short run wrote to the journal.
    pub fn first_journal_segment(&self, replica: usize) -> PathBuf {
        self.data_directory(replica).join("journal-0000000000.vsr")
    }

    pub fn log_path(&self, replica: usize) -> PathBuf {
        self.directory.0.join(format!("replica-{replica}.log"))
    }

    pub fn log(&self, replica: usize) -> String {
        std::fs::read_to_string(self.log_path(replica)).unwrap_or_default()
    }

    pub fn replica_command(&self, replica: usize) -> Command {
        let mut addresses = self.addresses.clone();
        if let Some((cut, black_hole)) = self.inbound_cut
            && cut != replica
        {
            addresses[cut] = black_hole;
        }
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut command = Command::new(&self.binary);
        command
            .arg("start")
            .arg("--replica")
            .arg(replica.to_string())
            .arg("--addresses")
            .arg(addresses.join(","))
            .arg("--data")
            .arg(self.data_directory(replica))
            .args(&self.extra_arguments);
        command
    }

    /// Starts (or restarts) a replica and waits until it accepts connections.
    pub fn start_replica(&mut self, replica: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(replica))
            .unwrap();
        let child = retry_while_busy(|| {
            self.replica_command(replica)
                .stdout(Stdio::null())
                .stderr(log.try_clone().unwrap())
                .spawn()
        });
        self.children[replica] = Some(child);
        let address = self.addresses[replica];
        wait_until(
            &format!("replica {replica} to listen on {address}"),
            Duration::from_secs(10),
            || std::net::TcpStream::connect(address).is_ok(),
        );
    }

    pub fn pid(&self, replica: usize) -> u32 {
        self.children[replica]
            .as_ref()
            .expect("replica running")
            .id()
    }

    pub fn is_running(&self, replica: usize) -> bool {
        self.children[replica].is_some()
    }

    pub fn kill(&mut self, replica: usize) {
        if let Some(mut child) = self.children[replica].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the replica logs its final state.
    pub fn stop(&mut self, replica: usize) -> ExitStatus {
        let mut child = self.children[replica].take().expect("replica running");
        send_sigterm(child.id());
        child.wait().unwrap()
    }

    /// Waits until the replica's log says it reached `needle`.
    pub fn wait_for_log(&self, replica: usize, needle: &str, timeout: Duration) {
        wait_until(
            &format!("replica {replica} to log {needle:?}"),
            timeout,
            || self.log(replica).contains(needle),
        );
    }

    /// Where the replica's log ends now, for `wait_for_log_since`.
    pub fn log_mark(&self, replica: usize) -> usize {
        self.log(replica).len()
    }

    /// Waits until what the replica logged after `mark` contains `needle`.
    pub fn wait_for_log_since(&self, replica: usize, mark: usize, needle: &str, timeout: Duration) {
        wait_until(
            &format!("replica {replica} to log {needle:?}"),
            timeout,
            || {
                self.log(replica)
                    .get(mark..)
                    .is_some_and(|new| new.contains(needle))
            },
        );
    }

    /// Stops every replica at once and returns each one's final commit number, from its log.
    pub fn stop_all_and_commits(&mut self) -> Vec<u64> {
        let running: Vec<usize> = (0..self.children.len())
            .filter(|r| self.children[*r].is_some())
            .collect();
        for replica in &running {
            send_sigterm(self.pid(*replica));
        }
        for replica in &running {
            self.children[*replica].take().unwrap().wait().unwrap();
        }
        running
            .iter()
            .map(|replica| final_commit(&self.log(*replica)))
            .collect()
    }

    pub fn bench(&self, arguments: &[&str]) -> BenchResult {
        let output = Command::new(bench_binary())
            .arg("--addresses")
            .arg(self.addresses_argument())
            .args(arguments)
            .output()
            .unwrap();
        BenchResult::parse(
            output.status,
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        )
    }

    /// Load that leaves a stopped (SIGSTOP) replica behind what its peers' journals hold, with
    /// `--checkpoint-interval-ops 256`: four clients make batches of at most four 4 KB puts,
    /// thousands of ops and 80 MB of prepares, more than the socket buffers and the primary's
    /// queue to the stopped replica hold (so it misses some), and many checkpoint intervals, so
    /// the others' journals drop the ops it missed. Every write is read back.
    pub fn bench_past_a_stopped_replica(&self) -> BenchResult {
        let result = self.bench(&[
            "--ops",
            "20000",
            "--duration-s",
            "60",
            "--clients",
            "4",
            "--keys",
            "1000",
            "--value-bytes",
            "4000",
            "--verify",
        ]);
        result.assert_verified();
        assert!(result.acknowledged >= 20_000, "{}", result.stdout);
        result
    }

    pub fn bench_in_background(&self, arguments: &[&str]) -> Child {
        Command::new(bench_binary())
            .arg("--addresses")
            .arg(self.addresses_argument())
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// A 2 s view-change timeout unless the test sets one: on a loaded 2-core CI machine an
/// fdatasync can stall the primary past the 500 ms default, and a spurious view change would
/// make tests that watch one primary flaky.
/// Runs a command of the test's copy of the replica binary. The copy was made a moment ago: a
/// process another test forked meanwhile still holds its write descriptor until it execs
/// (ETXTBSY), so that error is retried for a second.
fn retry_while_busy<T>(mut run: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match run() {
            Err(error) if error.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
    run().unwrap()
}

fn with_test_defaults(extra_arguments: &[&str]) -> Vec<String> {
    let mut arguments: Vec<String> = extra_arguments
        .iter()
        .map(|argument| argument.to_string())
        .collect();
    if !arguments
        .iter()
        .any(|argument| argument == "--view-change-timeout-ms")
    {
        arguments.extend(["--view-change-timeout-ms".to_string(), "2000".to_string()]);
    }
    arguments
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for replica in 0..self.children.len() {
            self.kill(replica);
        }
    }
}

fn send_sigterm(pid: u32) {
    signal(pid, "TERM");
}

/// Sends the signal `name` (`STOP`, `CONT`, `USR1`…) to `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// The commit number in a replica's last "stopped; …" log line.
fn final_commit(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("stopped;"))
        .unwrap_or_else(|| panic!("no final state in log:\n{log}"));
    field(line, "commit").unwrap_or_else(|| panic!("no commit in {line:?}"))
}

/// The number after `name ` in a log line.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair[1].parse().ok())
}

#[derive(Debug)]
pub struct BenchResult {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub acknowledged: u64,
    pub evictions: u64,
}

impl BenchResult {
    pub fn parse(status: ExitStatus, stdout: &str, stderr: &str) -> BenchResult {
        let line = stdout
            .lines()
            .find(|line| line.starts_with("result:"))
            .unwrap_or_else(|| {
                panic!("vsr-bench printed no result ({status}):\n{stdout}\n{stderr}")
            });
        let value = |key: &str| -> f64 {
            line.split_whitespace()
                .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        BenchResult {
            status,
            acknowledged: value("acknowledged") as u64,
            evictions: value("evictions") as u64,
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        }
    }

    pub fn from_child(child: Child) -> BenchResult {
        let output = child.wait_with_output().unwrap();
        BenchResult::parse(
            output.status,
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        )
    }

    pub fn assert_verified(&self) {
        assert!(
            self.status.success(),
            "vsr-bench failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stdout.contains(" 0 mismatches, 0 not read"),
            "verification failed:\n{}",
            self.stdout
        );
    }
}

/// A bpftrace session. The program gets a `BEGIN` that prints READY, and `attach` returns only
/// once that line appeared, so every probe is attached before the test drives any event.
#[derive(Debug)]
pub struct Bpftrace {
    child: Child,
    output: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    errors: Arc<Mutex<String>>,
    /// The line that proved the session attached.
    ready: String,
}

impl Bpftrace {
    /// Attaches to one process (`-p`), the way an operator looks at one replica.
    pub fn attach_pid(pid: u32, program: &str) -> Bpftrace {
        Bpftrace::start(&["-p", &pid.to_string()], program)
    }

    /// Attaches to a binary: covers processes started later too.
    pub fn attach_binary(program: &str) -> Bpftrace {
        Bpftrace::start(&[], program)
    }

    /// Runs one of `scripts/bpftrace`'s tools on `binary` (with `-p` when a pid is given).
    /// Tools print a "Tracing vsr …" banner from `BEGIN`, which bpftrace runs once every probe
    /// is attached.
    pub fn run_tool(tool: &str, pid: Option<u32>, binary: &Path, arguments: &[&str]) -> Bpftrace {
        let tool = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts/bpftrace")
            .join(tool);
        let mut command = Command::new("bpftrace");
        command.args(["-B", "line"]);
        if let Some(pid) = pid {
            command.arg("-p").arg(pid.to_string());
        }
        command.arg(&tool).arg(binary).args(arguments);
        Bpftrace::spawn(command, "Tracing vsr", &tool.display().to_string())
    }

    fn start(arguments: &[&str], program: &str) -> Bpftrace {
        let program = format!("BEGIN {{ printf(\"READY\\n\"); }}\n{program}");
        let mut command = Command::new("bpftrace");
        command
            .args(["-B", "line"])
            .args(arguments)
            .arg("-e")
            .arg(&program);
        Bpftrace::spawn(command, "READY", &program)
    }

    /// Starts bpftrace and returns once `ready` appeared in its output.
    fn spawn(mut command: Command, ready: &str, program: &str) -> Bpftrace {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bpftrace is installed (scripts/setup)");
        let output = Arc::new(Mutex::new(String::new()));
        let errors = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let error_sink = errors.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            error_sink.lock().unwrap().push_str(&text);
        });
        let mut session = Bpftrace {
            child,
            output,
            reader: Some(reader),
            errors,
            ready: ready.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !session.output.lock().unwrap().contains(ready) {
            if let Ok(Some(status)) = session.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "bpftrace exited ({status}) before attaching:\n{}\n{program}",
                    session.errors.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "bpftrace did not attach within 30 s:\n{}",
                session.errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        session
    }

    pub fn output_so_far(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Stops bpftrace with SIGINT (it prints its maps) and returns everything it printed.
    pub fn finish(mut self) -> String {
        let status = interrupt(&mut self.child);
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let output = self.output.lock().unwrap().clone();
        assert!(
            status.success() || output.contains(&self.ready),
            "bpftrace failed: {}",
            self.errors.lock().unwrap()
        );
        output
    }
}

/// Flips every bit of the byte in the middle of a replica's journal: one corrupt entry.
pub fn corrupt_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 1000,
        "journal too small to corrupt: {} bytes",
        bytes.len()
    );
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// Stops a tracer the way Ctrl-C does, and waits for it. bpftrace can miss a SIGINT that
/// arrives while it is still attaching, so the signal is repeated until it exits.
pub fn interrupt(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let resent = Instant::now() + Duration::from_secs(1);
        while Instant::now() < resent {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            Instant::now() < deadline,
            "process {} ignored SIGINT for 30 s",
            child.id()
        );
    }
}

/// Lines of bpftrace output that start with `tag`, split into their numeric fields.
pub fn tagged_rows(output: &str, tag: &str) -> Vec<Vec<u64>> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix(tag))
        .map(|rest| {
            rest.split_whitespace()
                .map(|word| {
                    word.parse()
                        .unwrap_or_else(|_| panic!("bad field {word:?} in {rest:?}"))
                })
                .collect()
        })
        .collect()
}

/// The value of a bpftrace scalar map printed at exit, like `@name: 42`.
pub fn map_value(output: &str, name: &str) -> Option<u64> {
    let prefix = format!("@{name}: ");
    output
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// A command that must fail on bad input: non-zero exit, one line on stderr naming the problem,
/// and no panic.
pub fn assert_clear_failure(output: &std::process::Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panicked instead of a clear error: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}
