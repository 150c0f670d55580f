//! The capabilities vsrscope needs, and giving up those it no longer needs once attached.
//!
//! Measured on Linux 6.18 as an unprivileged user (docs/vsrscope.md, "Running as a service"):
//! creating the maps and loading the programs needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN;
//! opening a uprobe perf event needs CAP_SYS_ADMIN (the kernel no longer accepts CAP_PERFMON
//! there); reading `/proc/PID/exe` and `/proc/PID/io` of another user's replica needs
//! CAP_SYS_PTRACE, and the `io` file (mode 0400) also CAP_DAC_READ_SEARCH. Once attached, map
//! reads go through descriptors vsrscope already holds, so only the `/proc` reads remain,
//! unless `--on-demand` opens uprobes again later.
//!
//! Capabilities belong to a thread: lowering them here changes the calling thread and every
//! thread it starts afterwards, never a thread already running.

use caps::errors::CapsError;
use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

/// What attaching checks: `bpf_capable()` and `perfmon_capable()` (either is also met by
/// CAP_SYS_ADMIN) and CAP_SYS_ADMIN itself for uprobe perf events.
pub const ATTACH: [Capability; 3] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
];

/// What sampling another user's replica in `/proc` checks: the ptrace access check, and read
/// permission on its owner-only `io` file.
pub const READ_PROC: [Capability; 2] =
    [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("cannot read the {set:?} capability set: {error}")]
    Read { set: CapSet, error: CapsError },
    #[error("cannot lower the {set:?} capability set: {error}")]
    Lower { set: CapSet, error: CapsError },
}

/// The capabilities `serve` still needs once attached: the `/proc` reads, and with on-demand
/// attaching everything attaching needs.
pub fn needed_after_attach(on_demand: bool) -> Vec<Capability> {
    let mut needed = READ_PROC.to_vec();
    if on_demand {
        needed.extend(ATTACH);
    }
    needed
}

/// Lowers the calling thread's effective and permitted sets to those of `keep` it holds, and
/// empties its inheritable and ambient sets (vsrscope runs no other program). Returns what it
/// kept. Irreversible: the permitted set never grows again without an exec.
pub fn keep_only(keep: &[Capability]) -> Result<CapsHashSet, PrivilegeError> {
    let permitted = read(CapSet::Permitted)?;
    let kept: CapsHashSet = keep
        .iter()
        .copied()
        .filter(|capability| permitted.contains(capability))
        .collect();
    // Ambient first: the kernel requires it to stay within permitted and inheritable.
    lower(CapSet::Ambient, &CapsHashSet::new())?;
    lower(CapSet::Inheritable, &CapsHashSet::new())?;
    // Effective before permitted: effective must stay within permitted at every step.
    lower(CapSet::Effective, &kept)?;
    lower(CapSet::Permitted, &kept)?;
    Ok(kept)
}

/// Those of `needed` missing from the calling thread's effective set (none when it cannot tell).
pub fn missing(needed: &[Capability]) -> Vec<Capability> {
    let effective = read(CapSet::Effective).unwrap_or_default();
    needed
        .iter()
        .copied()
        .filter(|capability| !effective.contains(capability))
        .collect()
}

/// Capability names in kernel order, comma-separated, or "none".
pub fn names<'a>(capabilities: impl IntoIterator<Item = &'a Capability>) -> String {
    let mut sorted: Vec<Capability> = capabilities.into_iter().copied().collect();
    sorted.sort_by_key(Capability::index);
    if sorted.is_empty() {
        return "none".to_string();
    }
    sorted
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn read(set: CapSet) -> Result<CapsHashSet, PrivilegeError> {
    caps::read(None, set).map_err(|error| PrivilegeError::Read { set, error })
}

fn lower(set: CapSet, to: &CapsHashSet) -> Result<(), PrivilegeError> {
    caps::set(None, set, to).map_err(|error| PrivilegeError::Lower { set, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kernel_order() {
        assert_eq!(
            names(&[Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH]),
            "CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE"
        );
        assert_eq!(names(&[]), "none");
    }

    #[test]
    fn on_demand_keeps_what_attaching_needs() {
        assert!(!needed_after_attach(false).contains(&Capability::CAP_SYS_ADMIN));
        assert!(needed_after_attach(true).contains(&Capability::CAP_SYS_ADMIN));
        assert!(needed_after_attach(true).contains(&Capability::CAP_SYS_PTRACE));
    }
}
