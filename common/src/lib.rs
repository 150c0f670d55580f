//! The layout contract between `vsrscope-ebpf` (kernel) and `vsrscope` (loader).
//!
//! Map names are metric families; map values are fixed-size `#[repr(C)]` arrays indexed by
//! replica, so one map read fetches a whole series family. `no_std`, no allocation: the same
//! definitions compile for `bpfel-unknown-none` and for the host.
#![no_std]

/// Replica ids 0..REPLICAS_MAX get series; a hit from a higher id is counted as lost.
pub const REPLICAS_MAX: u32 = 8;
/// USDT probes on x86-64 pass at most six arguments.
pub const ARGS_MAX: usize = 6;
/// Sites (attach points) the spec map can describe; one cookie each.
pub const SITES_MAX: u32 = 1024;

/// Where one USDT argument lives, decoded from its `.note.stapsdt` spec (`-4@-20(%rbp)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ArgSpec {
    /// The constant (`ARG_CONSTANT`) or the displacement (`ARG_REGISTER_DEREF`).
    pub value: i64,
    /// Byte offset of the register in `struct pt_regs`.
    pub register_offset: u16,
    pub kind: u8,
    /// Size in bytes (1, 2, 4, 8); negative when the value is signed.
    pub size: i8,
    pub padding: [u8; 4],
}

pub const ARG_CONSTANT: u8 = 0;
pub const ARG_REGISTER: u8 = 1;
pub const ARG_REGISTER_DEREF: u8 = 2;

/// Every argument of one probe site; indexed in the spec map by the site's attach cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SiteSpec {
    pub args: [ArgSpec; ARGS_MAX],
    pub arg_count: u32,
    pub padding: u32,
}

/// Latency histograms, one per seed metric with an event in the replica.
pub mod histogram {
    pub const PREPARE: u32 = 0;
    pub const COMMIT: u32 = 1;
    pub const CLIENT: u32 = 2;
    pub const VIEW_CHANGE: u32 = 3;
    pub const RECOVERY: u32 = 4;
    pub const REPAIR: u32 = 5;
    pub const STATE_TRANSFER: u32 = 6;
    pub const COUNT: u32 = 7;

    /// Seed bucket bounds per histogram, in nanoseconds, upper bound inclusive; unused
    /// trailing bounds are `u64::MAX`. The last slot counts values above every bound (+Inf).
    pub const BOUNDS_MAX: usize = 15;
    /// Log-linear buckets for quantiles: values below `LINEAR_MAX` exactly, then 64
    /// sub-buckets per power of two (relative width 1/64, midpoint error under 0.8%).
    pub const SUB_BUCKET_BITS: u32 = 6;
    pub const LINEAR_MAX: u64 = 2 << SUB_BUCKET_BITS;
    pub const FINE_BUCKETS: usize = 3776;

    /// Index of `value` among the fine buckets.
    #[inline(always)]
    pub fn fine_index(value: u64) -> usize {
        if value < LINEAR_MAX {
            return value as usize;
        }
        let msb = most_significant_bit(value);
        let shift = msb - SUB_BUCKET_BITS;
        let sub = (value >> shift) as usize - (1 << SUB_BUCKET_BITS);
        LINEAR_MAX as usize + ((msb - SUB_BUCKET_BITS - 1) as usize) * (1 << SUB_BUCKET_BITS) + sub
    }

    /// The smallest value that lands in fine bucket `index`, and the first that does not.
    pub fn fine_range(index: usize) -> (u64, u64) {
        if index < LINEAR_MAX as usize {
            return (index as u64, index as u64 + 1);
        }
        let relative = index - LINEAR_MAX as usize;
        let msb = (relative >> SUB_BUCKET_BITS) as u32 + SUB_BUCKET_BITS + 1;
        let sub = (relative & ((1 << SUB_BUCKET_BITS) - 1)) as u64;
        let shift = msb - SUB_BUCKET_BITS;
        let low = ((1u64 << SUB_BUCKET_BITS) + sub) << shift;
        (low, low.saturating_add(1 << shift))
    }

    /// Binary search instead of `leading_zeros`, which the BPF backend cannot lower.
    #[inline(always)]
    fn most_significant_bit(mut value: u64) -> u32 {
        let mut msb = 0;
        for shift in [32u32, 16, 8, 4, 2, 1] {
            if value >> shift != 0 {
                value >>= shift;
                msb += shift;
            }
        }
        msb
    }

    /// One histogram series (one metric, one replica): seed buckets, sum, count, fine buckets.
    #[derive(Debug, Clone, Copy)]
    #[repr(C)]
    pub struct Series {
        pub buckets: [u64; BOUNDS_MAX + 1],
        pub sum_ns: u64,
        pub count: u64,
        pub fine: [u64; FINE_BUCKETS],
    }

    /// The bucket bounds of one histogram, loaded by the loader.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(C)]
    pub struct Bounds {
        pub bounds_ns: [u64; BOUNDS_MAX],
    }
}

/// Counter slots per replica. Groups leave room to grow; a label value indexes within its group.
pub mod counter {
    pub const OPERATIONS_SUCCESS: usize = 0;
    pub const OPERATIONS_FAILURE: usize = 1;
    pub const BYTES_WRITTEN: usize = 2;
    pub const JOURNAL_WRITES: usize = 3;
    pub const DUPLICATE_REQUESTS: usize = 4;
    pub const SESSIONS_EVICTED: usize = 5;
    /// + `ViewChangeReason` code.
    pub const VIEW_CHANGES: usize = 8;
    /// + `Component` code.
    pub const CHECKSUM_FAILURES: usize = 16;
    /// + `RepairStatus` code.
    pub const REPAIRS: usize = 20;
    /// + `RejectReason` code (two groups wide).
    pub const BYZANTINE_REJECTIONS: usize = 24;
    pub const SCRUB_TOURS: usize = 40;
    pub const SCRUB_CORRUPTIONS: usize = 41;
    /// Records read and time spent by finished tours: their ratio is the scrub throughput.
    pub const SCRUB_OPS: usize = 42;
    pub const SCRUB_NS: usize = 43;
    pub const GROUP_WIDTH: usize = 8;
    pub const SLOTS: usize = 48;

    #[derive(Debug, Clone, Copy)]
    #[repr(C)]
    pub struct Counters {
        pub values: [u64; SLOTS],
    }
}

/// The eBPF programs, each named after the probe it attaches to; the index is the program's
/// id in the `HITS` self-counters.
pub mod program {
    pub const PREPARE_QUORUM: usize = 0;
    pub const COMMIT: usize = 1;
    pub const CLIENT_REPLY_BATCH: usize = 2;
    pub const VIEW_CHANGE_DONE: usize = 3;
    pub const RECOVERY_DONE: usize = 4;
    pub const REPAIR_DONE: usize = 5;
    pub const COMMIT_EXECUTE: usize = 6;
    pub const JOURNAL_WRITE: usize = 7;
    pub const VIEW_CHANGE_START: usize = 8;
    pub const CHECKSUM_FAILURE: usize = 9;
    pub const BYZANTINE_REJECTION: usize = 10;
    pub const DUPLICATE_REQUEST: usize = 11;
    pub const SESSION_EVICT: usize = 12;
    pub const STATE_SNAPSHOT: usize = 13;
    pub const STATE_TRANSFER_DONE: usize = 14;
    pub const SCRUB_TOUR_DONE: usize = 15;

    pub const NAMES: [&str; 16] = [
        "prepare_quorum",
        "commit",
        "client_reply_batch",
        "view_change_done",
        "recovery_done",
        "repair_done",
        "commit_execute",
        "journal_write",
        "view_change_start",
        "checksum_failure",
        "byzantine_rejection",
        "duplicate_request",
        "session_evict",
        "state_snapshot",
        "state_transfer_done",
        "scrub_tour_done",
    ];
}

/// vsrscope's own health, counted in the kernel.
pub mod self_metric {
    /// Probe hits handled, per program kind (see `program`).
    pub const HITS: usize = 0;
    /// Hits dropped: replica id out of range, a snapshot of an unknown version, unreadable args.
    pub const LOST: usize = 16;
    /// Latencies beyond the batch loop bound of `client_reply_batch`.
    pub const LOST_BATCH_LATENCIES: usize = 17;
    pub const SLOTS: usize = 24;

    #[derive(Debug, Clone, Copy)]
    #[repr(C)]
    pub struct SelfCounters {
        pub values: [u64; SLOTS],
    }
}

/// The latest `ReplicaSnapshot` bytes of each replica, with when and from which process.
pub const SNAPSHOT_BYTES: usize = 368;

/// A seqlock: the kernel writes a slot in place while the loader may be copying it out, so a
/// copy could mix two snapshots. The writer makes `sequence` odd, writes everything else, then
/// makes it even again; the loader keeps a copy only if `sequence` was the same even number
/// just before and just after it.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct SnapshotSlot {
    pub sequence: u64,
    pub bytes: [u8; SNAPSHOT_BYTES],
    pub updated_ns: u64,
    pub pid: u32,
    pub padding: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]` integers and arrays of integers with explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::ArgSpec {}
    unsafe impl aya::Pod for super::SiteSpec {}
    unsafe impl aya::Pod for super::histogram::Series {}
    unsafe impl aya::Pod for super::histogram::Bounds {}
    unsafe impl aya::Pod for super::counter::Counters {}
    unsafe impl aya::Pod for super::self_metric::SelfCounters {}
    unsafe impl aya::Pod for super::SnapshotSlot {}
}

#[cfg(test)]
mod tests {
    use super::histogram::{FINE_BUCKETS, fine_index, fine_range};

    #[test]
    fn fine_buckets_hold_their_values_and_are_narrow() {
        for shift in 0..64 {
            let power = 1u64 << shift;
            for value in [power, power + 1, power + power / 3, power | (power - 1)] {
                let index = fine_index(value);
                assert!(index < FINE_BUCKETS, "{value}");
                let (low, high) = fine_range(index);
                assert!(
                    low <= value && (value < high || high == u64::MAX),
                    "{value} not in [{low}, {high})"
                );
                assert!(
                    high - low <= (low / 64).max(1),
                    "bucket of {value} wider than 1/64"
                );
            }
        }
        assert_eq!(fine_index(u64::MAX), FINE_BUCKETS - 1);
    }

    #[test]
    fn fine_buckets_are_contiguous() {
        for index in 1..FINE_BUCKETS {
            assert_eq!(
                fine_range(index - 1).1,
                fine_range(index).0,
                "gap at {index}"
            );
        }
    }
}
