//! Invariants the simulator checks while a run goes on, after every output a replica releases,
//! rather than only at the end: a violation that later heals (a view that went back and came
//! forward again) is still caught, at the moment it happened.
//!
//! - At most one primary per view, and a view's primary never holds two different entries at
//!   one op: only the primary of a view prepares that view's entries, one per op, which the
//!   view change's nack logic relies on.
//! - A replica's view never goes back, also across a restart from its own durable state (only
//!   a replacement or a replica that must recover may have forgotten it).
//! - A replica's commit never goes back while its process runs.

use std::collections::HashMap;

/// What one replica was last seen at.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    view: u64,
    /// `None` right after a restart: replay starts the commit again from the durable one.
    commit: Option<u64>,
}

/// One replica's state right after it released its outputs.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub replica: u8,
    pub view: u64,
    pub commit: u64,
    pub is_primary: bool,
    pub head_op: u64,
    pub head_checksum: u64,
}

#[derive(Debug, Default)]
pub struct OnlineChecks {
    seen: HashMap<u8, Seen>,
    /// Per view: its primary, and the head checksum it was seen with at each head op.
    primaries: HashMap<u64, u8>,
    primary_heads: HashMap<(u64, u64), u64>,
    /// The first violation, with the simulated time it was seen at.
    violation: Option<String>,
}

impl OnlineChecks {
    /// Checks one replica's state against what was seen before.
    pub fn observe(&mut self, now_ns: u64, observation: Observation) {
        let Observation {
            replica,
            view,
            commit,
            is_primary,
            head_op,
            head_checksum,
        } = observation;
        let seen = *self.seen.entry(replica).or_default();
        if view < seen.view {
            self.fail(
                now_ns,
                format!(
                    "replica {replica}: view went back from {} to {view}",
                    seen.view
                ),
            );
        }
        if let Some(seen_commit) = seen.commit
            && commit < seen_commit
        {
            self.fail(
                now_ns,
                format!("replica {replica}: commit went back from {seen_commit} to {commit}"),
            );
        }
        let seen = self.seen.entry(replica).or_default();
        seen.view = seen.view.max(view);
        seen.commit = Some(
            seen.commit
                .map_or(commit, |seen_commit| seen_commit.max(commit)),
        );
        if !is_primary {
            return;
        }
        let primary = *self.primaries.entry(view).or_insert(replica);
        if primary != replica {
            self.fail(
                now_ns,
                format!("view {view} has two primaries: replicas {primary} and {replica}"),
            );
        }
        let checksum = *self
            .primary_heads
            .entry((view, head_op))
            .or_insert(head_checksum);
        if checksum != head_checksum {
            self.fail(
                now_ns,
                format!("the primary of view {view} held two different entries at op {head_op}"),
            );
        }
    }

    /// A replica restarted: its commit starts again from the durable one; a replacement, or a
    /// replica that must recover, may also have forgotten its view.
    pub fn restarted(&mut self, replica: u8, view_forgotten: bool) {
        let seen = self.seen.entry(replica).or_default();
        seen.commit = None;
        if view_forgotten {
            seen.view = 0;
        }
    }

    pub fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    fn fail(&mut self, now_ns: u64, violation: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("at {:.3} s: {violation}", now_ns as f64 / 1e9));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(replica: u8, view: u64, commit: u64, is_primary: bool) -> Observation {
        Observation {
            replica,
            view,
            commit,
            is_primary,
            head_op: commit,
            head_checksum: u64::from(replica),
        }
    }

    #[test]
    fn each_violation_is_caught() {
        let mut checks = OnlineChecks::default();
        checks.observe(1, observation(0, 3, 10, false));
        checks.observe(2, observation(0, 2, 10, false));
        assert!(checks.violation().unwrap().contains("view went back"));

        let mut checks = OnlineChecks::default();
        checks.observe(1, observation(0, 3, 10, false));
        checks.observe(2, observation(0, 3, 9, false));
        assert!(checks.violation().unwrap().contains("commit went back"));

        let mut checks = OnlineChecks::default();
        checks.observe(1, observation(0, 3, 10, true));
        checks.observe(2, observation(1, 3, 10, true));
        assert!(checks.violation().unwrap().contains("two primaries"));
    }

    #[test]
    fn a_restart_may_replay_its_commit_and_a_replacement_forget_its_view() {
        let mut checks = OnlineChecks::default();
        checks.observe(1, observation(0, 3, 10, false));
        checks.restarted(0, false);
        checks.observe(2, observation(0, 3, 4, false));
        assert_eq!(checks.violation(), None);
        checks.observe(3, observation(0, 2, 4, false));
        assert!(checks.violation().unwrap().contains("view went back"));

        let mut checks = OnlineChecks::default();
        checks.observe(1, observation(0, 3, 10, false));
        checks.restarted(0, true);
        checks.observe(2, observation(0, 0, 0, false));
        assert_eq!(checks.violation(), None);
    }
}
