//! vsrscope's eBPF programs: one uprobe program per `vsr` probe that feeds a metric, attached to
//! every site of that probe. Each site's attach cookie indexes `SITE_SPECS`, which says where the
//! site's arguments live (register, memory at register + offset, or a constant), so one
//! program serves every site however the compiler placed the arguments.
//!
//! Everything lands in per-CPU maps (no locks, no cross-CPU cache traffic on the hot path); the
//! loader sums the CPUs when it reads. Nothing is dropped silently: a hit that cannot be
//! recorded increments a `SELF_COUNTERS` slot.
#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::{
    bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_loop,
    bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_probe_read_user_buf,
};
use aya_ebpf::macros::{map, uprobe};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::ProbeContext;
use vsrscope_common::histogram::{self, BOUNDS_MAX, Bounds, FINE_BUCKETS, Series};
use vsrscope_common::{
    ARG_CONSTANT, ARG_REGISTER, ARG_REGISTER_DEREF, ARGS_MAX, REPLICAS_MAX, SITES_MAX,
    SNAPSHOT_BYTES, SiteSpec, SnapshotSlot, counter, program, self_metric,
};

#[map]
static SITE_SPECS: Array<SiteSpec> = Array::with_max_entries(SITES_MAX, 0);

#[map]
static HISTOGRAM_BOUNDS: Array<Bounds> = Array::with_max_entries(histogram::COUNT, 0);

/// Index `histogram * REPLICAS_MAX + replica_id`.
#[map]
static HISTOGRAMS: PerCpuArray<Series> =
    PerCpuArray::with_max_entries(histogram::COUNT * REPLICAS_MAX, 0);

/// Index `replica_id`.
#[map]
static COUNTERS: PerCpuArray<counter::Counters> = PerCpuArray::with_max_entries(REPLICAS_MAX, 0);

/// Index `replica_id`: the newest state snapshot.
#[map]
static SNAPSHOTS: Array<SnapshotSlot> = Array::with_max_entries(REPLICAS_MAX, 0);

/// Where `state_snapshot` reads the replica's memory first: a read that faults then leaves the
/// published slot untouched, and the slot's write section is a plain copy.
#[map]
static SNAPSHOT_SCRATCH: PerCpuArray<SnapshotSlot> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SELF_COUNTERS: PerCpuArray<self_metric::SelfCounters> = PerCpuArray::with_max_entries(1, 0);

/// The most latencies one `client_reply_batch` hit records; the rest are counted as lost.
const BATCH_LATENCIES_MAX: u64 = 65_536;

fn count_self(slot: usize, amount: u64) {
    if let Some(counters) = SELF_COUNTERS.get_ptr_mut(0) {
        if slot < self_metric::SLOTS {
            unsafe { (*counters).values[slot] += amount };
        }
    }
}

/// The site's arguments, decoded per its spec. `None` (counted as lost) when the cookie has no
/// spec or an argument cannot be read.
struct Arguments<'a> {
    ctx: &'a ProbeContext,
    site: &'a SiteSpec,
}

impl<'a> Arguments<'a> {
    fn of(ctx: &'a ProbeContext) -> Option<Arguments<'a>> {
        let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
        let site = SITE_SPECS.get(cookie)?;
        Some(Arguments { ctx, site })
    }

    #[inline(always)]
    fn get(&self, index: usize) -> Option<u64> {
        if index >= ARGS_MAX || index as u32 >= self.site.arg_count {
            return None;
        }
        let spec = &self.site.args[index];
        let raw = match spec.kind {
            ARG_CONSTANT => spec.value as u64,
            ARG_REGISTER | ARG_REGISTER_DEREF => {
                let offset = spec.register_offset as usize;
                // struct pt_regs on x86-64 is 21 u64 registers.
                if offset > 20 * 8 {
                    return None;
                }
                // Variable offsets into the context are refused by the verifier; read it as memory.
                let register_address =
                    unsafe { (self.ctx.regs as *const u8).add(offset) } as *const u64;
                let register = unsafe { bpf_probe_read_kernel(register_address) }.ok()?;
                if spec.kind == ARG_REGISTER {
                    register
                } else {
                    let address = (register as i64).wrapping_add(spec.value) as *const u64;
                    unsafe { bpf_probe_read_user(address) }.ok()?
                }
            }
            _ => return None,
        };
        let bits = (spec.size.unsigned_abs() as u32) * 8;
        if bits == 0 || bits > 64 {
            return None;
        }
        if bits == 64 {
            return Some(raw);
        }
        let shift = 64 - bits;
        Some(if spec.size < 0 {
            (((raw << shift) as i64) >> shift) as u64
        } else {
            (raw << shift) >> shift
        })
    }
}

/// Runs `handler` with the decoded arguments, counting the hit or its loss.
#[inline(always)]
fn handle(
    ctx: &ProbeContext,
    program: usize,
    handler: impl FnOnce(&Arguments) -> Option<()>,
) -> u32 {
    let handled = Arguments::of(ctx).and_then(|arguments| handler(&arguments));
    match handled {
        Some(()) => count_self(self_metric::HITS + program, 1),
        None => count_self(self_metric::LOST, 1),
    }
    0
}

fn replica_index(replica_id: u64) -> Option<u32> {
    (replica_id < u64::from(REPLICAS_MAX)).then_some(replica_id as u32)
}

#[inline(always)]
fn record(histogram: u32, replica_id: u64, value_ns: u64) -> Option<()> {
    let replica = replica_index(replica_id)?;
    let bounds = HISTOGRAM_BOUNDS.get(histogram)?;
    let series = HISTOGRAMS.get_ptr_mut(histogram * REPLICAS_MAX + replica)?;
    let mut bucket = BOUNDS_MAX;
    for index in 0..BOUNDS_MAX {
        if value_ns <= bounds.bounds_ns[index] {
            bucket = index;
            break;
        }
    }
    let fine = histogram::fine_index(value_ns);
    if fine >= FINE_BUCKETS || bucket > BOUNDS_MAX {
        return None;
    }
    unsafe {
        (*series).buckets[bucket] += 1;
        (*series).sum_ns += value_ns;
        (*series).count += 1;
        (*series).fine[fine] += 1;
    }
    Some(())
}

#[inline(always)]
fn add(replica_id: u64, slot: usize, amount: u64) -> Option<()> {
    let replica = replica_index(replica_id)?;
    let counters = COUNTERS.get_ptr_mut(replica)?;
    if slot >= counter::SLOTS {
        return None;
    }
    unsafe { (*counters).values[slot] += amount };
    Some(())
}

/// `slot_base + code`, refusing codes beyond their group.
#[inline(always)]
fn add_labelled(
    replica_id: u64,
    slot_base: usize,
    code: u64,
    width: usize,
    amount: u64,
) -> Option<()> {
    if code >= width as u64 {
        return None;
    }
    add(replica_id, slot_base + code as usize, amount)
}

#[uprobe]
pub fn prepare_quorum(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::PREPARE_QUORUM, |a| {
        record(histogram::PREPARE, a.get(0)?, a.get(2)?)
    })
}

#[uprobe]
pub fn commit(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::COMMIT, |a| {
        record(histogram::COMMIT, a.get(0)?, a.get(2)?)
    })
}

/// What `bpf_loop` hands `record_batched_latency`. Never written by the callback: a context
/// that changes every iteration keeps the verifier from converging on the loop body.
struct Batch {
    replica_id: u64,
    address: u64,
}

/// One iteration of the batch loop: record latency `index`, or count it lost.
extern "C" fn record_batched_latency(index: u64, batch: *mut c_void) -> i64 {
    // SAFETY: `batch` is the `Batch` on `client_reply_batch`'s stack, passed to bpf_loop.
    let batch = unsafe { &*(batch as *const Batch) };
    let recorded = unsafe { bpf_probe_read_user((batch.address + index * 8) as *const u64) }
        .ok()
        .and_then(|latency_ns| record(histogram::CLIENT, batch.replica_id, latency_ns));
    if recorded.is_none() {
        count_self(self_metric::LOST_BATCH_LATENCIES, 1);
    }
    0
}

/// A loop over the batch through `bpf_loop`: the verifier checks the body once instead of
/// unrolling every iteration.
#[uprobe]
pub fn client_reply_batch(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::CLIENT_REPLY_BATCH, |a| {
        let count = a.get(2)?;
        let mut batch = Batch {
            replica_id: a.get(0)?,
            address: a.get(3)?,
        };
        let iterations = count.min(BATCH_LATENCIES_MAX);
        unsafe {
            bpf_loop(
                iterations as u32,
                record_batched_latency as *mut c_void,
                &mut batch as *mut Batch as *mut c_void,
                0,
            )
        };
        if count > iterations {
            count_self(self_metric::LOST_BATCH_LATENCIES, count - iterations);
        }
        Some(())
    })
}

#[uprobe]
pub fn view_change_done(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::VIEW_CHANGE_DONE, |a| {
        record(histogram::VIEW_CHANGE, a.get(0)?, a.get(2)?)
    })
}

#[uprobe]
pub fn recovery_done(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::RECOVERY_DONE, |a| {
        record(histogram::RECOVERY, a.get(0)?, a.get(3)?)
    })
}

#[uprobe]
pub fn repair_done(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::REPAIR_DONE, |a| {
        let replica_id = a.get(0)?;
        let status = a.get(3)?;
        add_labelled(replica_id, counter::REPAIRS, status, 2, 1)?;
        if status == 0 {
            record(histogram::REPAIR, replica_id, a.get(2)?)?;
        }
        Some(())
    })
}

#[uprobe]
pub fn commit_execute(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::COMMIT_EXECUTE, |a| {
        let replica_id = a.get(0)?;
        add(replica_id, counter::OPERATIONS_SUCCESS, a.get(2)?)?;
        add(replica_id, counter::OPERATIONS_FAILURE, a.get(3)?)
    })
}

#[uprobe]
pub fn journal_write(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::JOURNAL_WRITE, |a| {
        let replica_id = a.get(0)?;
        add(replica_id, counter::BYTES_WRITTEN, a.get(2)?)?;
        add(replica_id, counter::JOURNAL_WRITES, 1)
    })
}

#[uprobe]
pub fn view_change_start(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::VIEW_CHANGE_START, |a| {
        add_labelled(
            a.get(0)?,
            counter::VIEW_CHANGES,
            a.get(3)?,
            counter::GROUP_WIDTH,
            1,
        )
    })
}

#[uprobe]
pub fn state_transfer_done(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::STATE_TRANSFER_DONE, |a| {
        record(histogram::STATE_TRANSFER, a.get(0)?, a.get(3)?)
    })
}

#[uprobe]
pub fn scrub_tour_done(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::SCRUB_TOUR_DONE, |a| {
        let replica_id = a.get(0)?;
        add(replica_id, counter::SCRUB_TOURS, 1)?;
        add(replica_id, counter::SCRUB_CORRUPTIONS, a.get(2)?)?;
        add(replica_id, counter::SCRUB_OPS, a.get(1)?)?;
        add(replica_id, counter::SCRUB_NS, a.get(3)?)
    })
}

#[uprobe]
pub fn checksum_failure(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::CHECKSUM_FAILURE, |a| {
        add_labelled(a.get(0)?, counter::CHECKSUM_FAILURES, a.get(1)?, 3, 1)
    })
}

#[uprobe]
pub fn byzantine_rejection(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::BYZANTINE_REJECTION, |a| {
        add_labelled(
            a.get(0)?,
            counter::BYZANTINE_REJECTIONS,
            a.get(1)?,
            2 * counter::GROUP_WIDTH,
            1,
        )
    })
}

#[uprobe]
pub fn duplicate_request(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::DUPLICATE_REQUEST, |a| {
        add(a.get(0)?, counter::DUPLICATE_REQUESTS, 1)
    })
}

#[uprobe]
pub fn session_evict(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::SESSION_EVICT, |a| {
        add(a.get(0)?, counter::SESSIONS_EVICTED, 1)
    })
}

#[uprobe]
pub fn state_snapshot(ctx: ProbeContext) -> u32 {
    handle(&ctx, program::STATE_SNAPSHOT, |a| {
        let replica = replica_index(a.get(0)?)?;
        let address = a.get(1)?;
        if a.get(2)? != SNAPSHOT_BYTES as u64 {
            return None;
        }
        let scratch = SNAPSHOT_SCRATCH.get_ptr_mut(0)?;
        let slot = SNAPSHOTS.get_ptr_mut(replica)?;
        unsafe {
            bpf_probe_read_user_buf(address as *const u8, &mut (*scratch).bytes).ok()?;
            // The seqlock's write section (see `SnapshotSlot`). Stores reach other CPUs in
            // program order on x86-64. The BPF backend has no compiler fence: volatile stores
            // stay in order among themselves, and the copy is a helper call the compiler must
            // assume reads and writes the slot, so nothing moves across it.
            let sequence = read_volatile(&(*slot).sequence) | 1;
            write_volatile(&mut (*slot).sequence, sequence);
            let copied = bpf_probe_read_kernel_buf((*scratch).bytes.as_ptr(), &mut (*slot).bytes);
            write_volatile(&mut (*slot).updated_ns, bpf_ktime_get_ns());
            write_volatile(&mut (*slot).pid, (bpf_get_current_pid_tgid() >> 32) as u32);
            // Closed even if the copy failed, so the slot never stays locked.
            write_volatile(&mut (*slot).sequence, sequence + 1);
            copied.ok()?;
        }
        Some(())
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
