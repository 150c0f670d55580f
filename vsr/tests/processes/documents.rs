//! The operator documents are executed: every command of `docs/one-liners.md` and
//! `docs/perf.md` runs against a live cluster under load, and its output must match the
//! `<!-- expect: REGEX -->` beside it, so the documents cannot drift from the probes.
//! `VSR_ONE_LINERS_OUTPUT=DIR` / `VSR_PERF_OUTPUT=DIR` write each command's output to DIR
//! (`lesson-N.txt` / `step-N.txt`), which is how the outputs shown in the documents are made.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regex::Regex;
use testkit::{BenchResult, Cluster, TestDirectory, interrupt, wait_until};

/// One command of a document, numbered in document order.
#[derive(Debug)]
struct Lesson {
    number: usize,
    command: String,
    expect: Regex,
}

/// Every one-line `sh` block that starts with `program`, with the `<!-- expect: … -->` after it.
fn lessons(markdown: &str, program: &str) -> Vec<Lesson> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut found = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let command = lines.get(index + 1).copied().unwrap_or("");
        if *line != "```sh" || !command.starts_with(program) {
            continue;
        }
        assert_eq!(lines[index + 2], "```", "one line per lesson: {command}");
        let expect = lines[index + 3]
            .strip_prefix("<!-- expect: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
            .unwrap_or_else(|| panic!("no expect comment after {command}"));
        found.push(Lesson {
            number: found.len() + 1,
            command: command.to_string(),
            expect: Regex::new(expect).unwrap(),
        });
    }
    found
}

fn document(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs")
            .join(name),
    )
    .unwrap()
}

fn save_output(variable: &str, name: &str, output: &str) {
    if let Some(directory) = std::env::var_os(variable) {
        std::fs::write(Path::new(&directory).join(name), output).unwrap();
    }
}

/// Runs a lesson the way a reader pastes it: in bash, with `R` and `PID` set.
fn spawn(lesson: &Lesson, binary: &Path, pid: u32) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec {}", lesson.command))
        .env("R", binary)
        .env("PID", pid.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads a child's stdout on a thread, so a full pipe never stalls it.
fn collect(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    })
}

#[test]
fn every_one_liner_in_the_tutorial_runs_and_prints_what_it_teaches() {
    let lessons = lessons(&document("one-liners.md"), "bpftrace ");
    assert!(lessons.len() >= 10, "found {} lessons", lessons.len());
    let cluster = Cluster::start("one-liners", 3, &[]);
    cluster.wait_for_log(1, "Normal in view 0", Duration::from_secs(5));
    let (binary, primary) = (cluster.binary.clone(), cluster.pid(0));

    // Listing needs no process and exits by itself; the others trace until interrupted.
    let (listings, tracers): (Vec<&Lesson>, Vec<&Lesson>) = lessons
        .iter()
        .partition(|lesson| lesson.command.starts_with("bpftrace -l"));
    let mut outputs: Vec<(usize, String)> = listings
        .iter()
        .map(|lesson| {
            let output = spawn(lesson, &binary, primary).wait_with_output().unwrap();
            assert!(output.status.success(), "{}", lesson.command);
            (
                lesson.number,
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        })
        .collect();
    let mut running: Vec<(usize, Child, std::thread::JoinHandle<String>)> = Vec::new();
    for lesson in &tracers {
        let mut child = spawn(lesson, &binary, primary);
        let stdout = collect(&mut child);
        running.push((lesson.number, child, stdout));
    }
    let errors: Vec<_> = running
        .iter_mut()
        .map(|(_, child, _)| {
            let mut stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            })
        })
        .collect();
    // Compiling takes bpftrace a second or two; attaching, milliseconds. The load starts once
    // every one-liner holds its probes, and runs for seconds.
    wait_until(
        "every one-liner to compile and attach",
        Duration::from_secs(60),
        || {
            running.iter_mut().all(|(_, child, _)| {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "a one-liner exited early"
                );
                attached(child.id())
            })
        },
    );
    let bench = cluster.bench_in_background(&["--duration-s", "4", "--clients", "16", "--verify"]);
    std::thread::sleep(Duration::from_secs(2));
    // An operator-requested view change, for the lesson that prints a stack at a rare event.
    let status = Command::new("kill")
        .args(["-USR1", &cluster.pid(1).to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    BenchResult::from_child(bench).assert_verified();
    for ((number, mut child, stdout), stderr) in running.into_iter().zip(errors) {
        let status = interrupt(&mut child);
        let text = stdout.join().unwrap();
        let stderr = stderr.join().unwrap();
        assert!(
            status.success(),
            "lesson {number} failed ({status}):\n{stderr}"
        );
        outputs.push((number, text));
    }
    outputs.sort_by_key(|(number, _)| *number);
    for (lesson, (number, output)) in lessons.iter().zip(&outputs) {
        assert_eq!(lesson.number, *number);
        save_output(
            "VSR_ONE_LINERS_OUTPUT",
            &format!("lesson-{number}.txt"),
            output,
        );
        assert!(
            lesson.expect.is_match(output),
            "lesson {number} ({}) printed no match for {}:\n{output}",
            lesson.command,
            lesson.expect
        );
    }
}

/// Whether bpftrace has attached its programs: it holds a perf event or BPF link per probe,
/// visible as `anon_inode:[perf_event]` or `anon_inode:bpf_link` among its open files.
fn attached(pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        std::fs::read_link(entry.path())
            .map(|target| {
                let target = target.to_string_lossy();
                target.contains("perf_event") || target.contains("bpf_link")
            })
            .unwrap_or(false)
    })
}

/// Deletes every `sdt_vsr` perf event, also when the test fails half way: a leftover event
/// would make the next run's `perf probe` fail.
struct PerfEvents;

impl PerfEvents {
    fn delete() {
        let _ = Command::new("perf")
            .args(["probe", "-q", "-d", "sdt_vsr:*"])
            .output();
    }
}

impl Drop for PerfEvents {
    fn drop(&mut self) {
        PerfEvents::delete();
    }
}

#[test]
fn every_perf_command_in_the_guide_runs_against_a_live_replica() {
    let steps = lessons(&document("perf.md"), "perf ");
    assert!(steps.len() >= 8, "found {} steps", steps.len());
    PerfEvents::delete();
    let _cleanup = PerfEvents;
    let cluster = Cluster::start("perf-doc", 3, &[]);
    cluster.wait_for_log(0, "Normal in view 0", Duration::from_secs(5));
    let scratch = TestDirectory::new("perf-doc-scratch");
    let mut load = cluster.bench_in_background(&["--duration-s", "120", "--clients", "16"]);
    for step in &steps {
        let output = Command::new("bash")
            .arg("-c")
            .arg(format!("exec 2>&1\n{}", step.command))
            .env("R", &cluster.binary)
            .env("PID", cluster.pid(0).to_string())
            .current_dir(&scratch.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        save_output(
            "VSR_PERF_OUTPUT",
            &format!("step-{}.txt", step.number),
            &text,
        );
        assert!(
            output.status.success(),
            "perf step {} was refused ({}): {}\n{text}",
            step.number,
            output.status,
            step.command
        );
        assert!(
            step.expect.is_match(&text),
            "perf step {} ({}) printed no match for {}:\n{text}",
            step.number,
            step.command,
            step.expect
        );
    }
    let _ = load.kill();
    let _ = load.wait();
}
