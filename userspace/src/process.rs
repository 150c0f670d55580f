//! What vsrscope learns about a target process from /proc: its binary, where that binary is
//! mapped, and the current value of a probe semaphore.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("pid {pid}: {reason}")]
    Unreadable { pid: u32, reason: String },
}

/// The executable a process runs, as the kernel sees it (resolves through /proc/PID/exe, so it
/// works across mount namespaces and after the path was replaced).
pub fn executable(pid: u32) -> Result<PathBuf, ProcessError> {
    let link = format!("/proc/{pid}/exe");
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ProcessError::NoSuchProcess(pid));
    }
    std::fs::read_link(&link).map_err(|error| ProcessError::Unreadable {
        pid,
        reason: if error.kind() == std::io::ErrorKind::PermissionDenied {
            format!("{link}: {error} (another user's process: needs CAP_SYS_PTRACE)")
        } else {
            format!("{link}: {error}")
        },
    })
}

/// Load address of the executable's first mapping (file offset 0): add a virtual address from
/// the ELF file to it to get the address in the process.
pub fn load_base(pid: u32) -> Result<u64, ProcessError> {
    let exe = executable(pid)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|error| {
        ProcessError::Unreadable {
            pid,
            reason: format!("maps: {error}"),
        }
    })?;
    let exe = exe.to_string_lossy();
    maps.lines()
        .find(|line| {
            line.ends_with(exe.as_ref()) && line.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|line| u64::from_str_radix(line.split('-').next()?, 16).ok())
        .ok_or_else(|| ProcessError::Unreadable {
            pid,
            reason: format!("{exe} is not mapped"),
        })
}

/// Reads a probe's 2-byte semaphore at `address` (already relocated) in the process.
pub fn read_semaphore(pid: u32, address: u64) -> Result<u16, ProcessError> {
    let memory = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|error| {
        ProcessError::Unreadable {
            pid,
            reason: format!("mem: {error}"),
        }
    })?;
    let mut value = [0u8; 2];
    memory
        .read_exact_at(&mut value, address)
        .map_err(|error| ProcessError::Unreadable {
            pid,
            reason: format!("semaphore at {address:#x}: {error}"),
        })?;
    Ok(u16::from_le_bytes(value))
}

/// Every running process whose executable satisfies `matches`.
fn processes(matches: impl Fn(&std::path::Path) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| executable(*pid).is_ok_and(|path| matches(&path)))
        .collect();
    pids.sort_unstable();
    pids
}

/// Every running process whose executable's file name is `name`.
pub fn find_by_name(name: &str) -> Vec<u32> {
    processes(|path| path.file_name().is_some_and(|file| file == name))
}

/// Every running process of the executable at `path` (canonical).
pub fn find_by_executable(path: &std::path::Path) -> Vec<u32> {
    processes(|executable| executable == path)
}

/// The numeric fields of /proc/PID/stat after the parenthesised command name (which may itself
/// hold spaces and parentheses), as `u64`s: index 11 is utime, 12 stime, 19 starttime.
pub fn stat_fields(pid: u32) -> Result<Vec<u64>, ProcessError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| ProcessError::NoSuchProcess(pid))?;
    let (_, fields) = stat
        .rsplit_once(')')
        .ok_or_else(|| ProcessError::Unreadable {
            pid,
            reason: "malformed /proc/PID/stat".into(),
        })?;
    // The state letter (index 0) is not a number; keep the positions, with 0 in its place.
    Ok(fields
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect())
}

/// Index of `starttime` (clock ticks since boot) in [`stat_fields`].
pub const START_TICKS: usize = 19;

/// Nanoseconds per clock tick, the unit of /proc/PID/stat's times.
pub fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    1_000_000_000 / ticks_per_second
}

/// When the process holding `pid` now started, in nanoseconds since boot (`CLOCK_BOOTTIME`,
/// rounded down to the clock tick). A pid and its start name one process even after the pid is
/// reused.
pub fn start_since_boot_ns(pid: u32) -> Result<u64, ProcessError> {
    stat_fields(pid)?
        .get(START_TICKS)
        .map(|ticks| ticks * tick_ns())
        .ok_or_else(|| ProcessError::Unreadable {
            pid,
            reason: "/proc/PID/stat has no starttime".into(),
        })
}

/// When a process started, in nanoseconds since the Unix epoch (to the kernel's clock tick).
pub fn start_time_unix_ns(pid: u32) -> Result<u64, ProcessError> {
    let since_boot_ns = start_since_boot_ns(pid)?;
    let boot_seconds: u64 = std::fs::read_to_string("/proc/stat")
        .map_err(|error| ProcessError::Unreadable {
            pid,
            reason: format!("/proc/stat: {error}"),
        })?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| ProcessError::Unreadable {
            pid,
            reason: "no btime in /proc/stat".into(),
        })?;
    Ok(boot_seconds * 1_000_000_000 + since_boot_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_started_before_now() {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let started_ns = start_time_unix_ns(std::process::id()).unwrap();
        assert!(started_ns <= now_ns, "{started_ns} after {now_ns}");
        assert!(
            now_ns - started_ns < 3_600 * 1_000_000_000,
            "started an hour ago?"
        );
        // Fields after the command name: state, ppid, … starttime at index 19 and beyond.
        let fields = stat_fields(std::process::id()).unwrap();
        assert!(fields.len() > 19, "{fields:?}");
        assert_eq!(fields[1], u64::from(std::os::unix::process::parent_id()));
        assert!(matches!(
            stat_fields(0),
            Err(ProcessError::NoSuchProcess(0))
        ));
    }
}
