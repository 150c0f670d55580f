//! Whether a replica is up: the process that published its newest state snapshot still runs,
//! and that snapshot is fresh.
//!
//! The kernel map keeps a replica's last snapshot after the replica dies, and its pid may be
//! given to another process. Without this check a killed replica would keep reporting its last
//! status, view and votes (which kept the Quorum Lost rule quiet), and its reused pid would lend
//! another process's CPU and memory to it.

use std::time::Duration;

/// A replica whose newest snapshot is older than its snapshot interval plus this is down: the
/// replica publishes from its tick loop, so a busy or descheduled replica publishes late.
pub const STALE_MARGIN: Duration = Duration::from_secs(1);

/// The verdict for one sample of the maps.
///
/// Snapshots are stamped by `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`); /proc dates a process's
/// start on `CLOCK_BOOTTIME`, which runs ahead of it by the time the machine spent suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// `CLOCK_MONOTONIC` at the sample.
    pub now_ns: u64,
    /// `CLOCK_BOOTTIME` minus `CLOCK_MONOTONIC`.
    pub boot_offset_ns: u64,
    /// When vsrscope last attached (`CLOCK_MONOTONIC`): after an on-demand re-attach the newest
    /// snapshot predates the attach through no fault of the replica.
    pub watching_since_ns: u64,
    pub stale_after: Duration,
    /// The resolution of process start times in /proc.
    pub tick_ns: u64,
}

impl Liveness {
    /// The verdict for a sample taken now.
    pub fn now(watching_since_ns: u64, stale_after: Duration) -> Liveness {
        let monotonic_ns = clock_ns(libc::CLOCK_MONOTONIC);
        Liveness {
            now_ns: monotonic_ns,
            boot_offset_ns: clock_ns(libc::CLOCK_BOOTTIME).saturating_sub(monotonic_ns),
            watching_since_ns,
            stale_after,
            tick_ns: crate::process::tick_ns(),
        }
    }

    /// Whether the process that holds the publishing pid now (started at `started_ns` since
    /// boot, none if no process holds it) published the snapshot stamped `published_ns`: it
    /// must have started at least one clock tick before. /proc rounds starts down to the tick,
    /// so this rules out every process that took the pid after the publisher died; a replica
    /// that published within its first tick is only counted from its next snapshot.
    pub fn published_by(&self, published_ns: u64, started_ns: Option<u64>) -> bool {
        started_ns.is_some_and(|started_ns| {
            started_ns + self.tick_ns <= published_ns + self.boot_offset_ns
        })
    }

    /// Up: the publisher still runs and the snapshot is at most `stale_after` old.
    pub fn is_up(&self, published_ns: u64, started_ns: Option<u64>) -> bool {
        let age_ns = self
            .now_ns
            .saturating_sub(published_ns.max(self.watching_since_ns));
        self.published_by(published_ns, started_ns)
            && u128::from(age_ns) <= self.stale_after.as_nanos()
    }
}

/// The current time of `clock` in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec to write to; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut time) };
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn liveness() -> Liveness {
        Liveness {
            now_ns: 100 * SECOND,
            boot_offset_ns: 7 * SECOND,
            watching_since_ns: 10 * SECOND,
            stale_after: Duration::from_millis(1_500),
            tick_ns: 10_000_000,
        }
    }

    #[test]
    fn a_running_publisher_with_a_fresh_snapshot_is_up() {
        // Started at monotonic 50 s, which is 57 s on the boot clock.
        assert!(liveness().is_up(99 * SECOND, Some(57 * SECOND)));
    }

    #[test]
    fn a_gone_process_is_down_however_fresh_its_snapshot() {
        assert!(!liveness().is_up(100 * SECOND, None));
    }

    #[test]
    fn a_process_that_took_the_pid_after_the_snapshot_did_not_publish_it() {
        let liveness = liveness();
        let published = 99 * SECOND;
        let published_on_boot_clock = published + liveness.boot_offset_ns;
        // Started later, or within the snapshot's tick (its start rounded down to it).
        for started in [
            published_on_boot_clock + 1,
            published_on_boot_clock - 5_000_000,
        ] {
            assert!(!liveness.is_up(published, Some(started)), "{started}");
        }
        assert!(liveness.is_up(published, Some(published_on_boot_clock - 10_000_000)));
        // The boot clock runs ahead: a publisher that started a second before its snapshot has
        // a start time above the snapshot's monotonic stamp.
        let started = published_on_boot_clock - SECOND;
        assert!(started > published);
        assert!(liveness.published_by(published, Some(started)));
    }

    #[test]
    fn a_snapshot_older_than_the_interval_and_margin_is_stale() {
        let liveness = liveness();
        let started = Some(SECOND);
        assert!(liveness.is_up(100 * SECOND - 1_500_000_000, started));
        assert!(!liveness.is_up(100 * SECOND - 1_500_000_001, started));
    }

    #[test]
    fn age_counts_from_the_attach_when_the_snapshot_predates_it() {
        let reattached = Liveness {
            watching_since_ns: 99 * SECOND,
            ..liveness()
        };
        assert!(reattached.is_up(20 * SECOND, Some(SECOND)));
        assert!(!liveness().is_up(20 * SECOND, Some(SECOND)));
    }
}
