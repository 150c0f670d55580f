//! The `vsr` USDT provider: the one contract between the replica and every tracer.
//!
//! Each probe is a function taking a closure that returns its arguments. The closure runs only
//! inside the branch guarded by the probe's semaphore, so while nobody is attached a probe costs
//! one compare and a not-taken jump, and its arguments are never computed. With the `probes`
//! feature off the functions are empty and the binary carries no `.note.stapsdt` at all.
//!
//! Every argument is an integer (pointers travel as `u64` addresses) and every probe takes the
//! replica id first, so a tracer can always label a hit without reading replica memory. Units
//! are in the argument names. The reference for operators is `docs/probes.md`, checked against
//! [`PROBES`] by a test.

mod codes;
mod snapshot;

pub use codes::{
    Command, Component, PEER_CLIENT, RejectReason, RepairStatus, ReplicaStatus, ViewChangeReason,
};
pub use snapshot::{ReplicaSnapshot, SNAPSHOT_VERSION};

/// One probe as tracers see it: its name and its argument names, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub arguments: &'static [&'static str],
}

/// The stapsdt argument spec of one argument of type `$ty` passed in the register family
/// `$q`/`$d`/`$w`/`$b` (64/32/16/8-bit names): the declared width, not the register's, so
/// tracers see each argument with its own type.
#[cfg(feature = "probes")]
macro_rules! argument_spec {
    (u8, $q:literal, $d:literal, $w:literal, $b:literal) => {
        concat!("1@%", $b)
    };
    (u16, $q:literal, $d:literal, $w:literal, $b:literal) => {
        concat!("2@%", $w)
    };
    (u32, $q:literal, $d:literal, $w:literal, $b:literal) => {
        concat!("4@%", $d)
    };
    (u64, $q:literal, $d:literal, $w:literal, $b:literal) => {
        concat!("8@%", $q)
    };
}

/// One probe site: a 5-byte `nop` and the SystemTap v3 note that describes it.
///
/// Arguments go in the System V argument registers, in order, as `usdt`, `<sys/sdt.h>` and
/// every tracer expect. The `nop` is the 5-byte form (`0f 1f 44 00 00`) rather than `nop`'s
/// 1 byte, because Linux ≥ 6.17 rewrites a uprobe on exactly that instruction into a call
/// to a trampoline instead of a trap: the attached cost per hit halves (docs/probes.md).
/// That `call` pushes a return address below the stack pointer, into the x86-64 red zone, so
/// the asm must not promise `nostack`: without it the compiler keeps nothing live in the red
/// zone across the site (it gives the function a frame instead), and the push lands on free
/// stack.
///
/// The note section is linked to the site's code section (`SHF_LINK_ORDER`, the `o` flag), so
/// a linker that discards the code (`--gc-sections`) discards its notes too, instead of leaving
/// notes that point at address 0 for every tracer to warn about. The flag needs a symbol in
/// the code section, and one asm block may be emitted many times in one object (inlining,
/// unrolling), so the symbol's name is numbered: `.Lvsr_sites` counts the sites of the object
/// and `.altmacro`'s `%` pastes its value into the name. `.stapsdt.base` lets tracers detect
/// prelink moving the text after the notes were written.
#[cfg(feature = "probes")]
macro_rules! probe_site {
    // Every argument has its register: emit the site.
    (
        $name:ident, $semaphore:ident,
        [$first_spec:expr $(, $spec:expr)*], [$($value:ident => $register:tt,)+], [$($free:tt)*],
    ) => {
        // SAFETY: the asm only emits a nop and non-allocated note data; it reads the argument
        // registers as inputs and touches no memory or flags. A tracer may push to the stack
        // at the nop, which is why `nostack` is not promised.
        unsafe {
            ::core::arch::asm!(
                concat!(
                    "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n",
                    ".ifndef .Lvsr_sites\n",
                    ".set .Lvsr_sites, 0\n",
                    ".endif\n",
                    ".set .Lvsr_sites, .Lvsr_sites + 1\n",
                    ".altmacro\n",
                    ".macro vsr_note_section vsr_site_number\n",
                    ".Lvsr_site_\\vsr_site_number:\n",
                    ".pushsection .note.stapsdt, \"o\", \"note\", .Lvsr_site_\\vsr_site_number\n",
                    ".endm\n",
                    "vsr_note_section %(.Lvsr_sites)\n",
                    ".purgem vsr_note_section\n",
                    ".noaltmacro\n",
                    ".balign 4\n",
                    ".4byte 992f-991f, 994f-993f, 3\n",
                    "991: .asciz \"stapsdt\"\n",
                    "992: .balign 4\n",
                    "993: .8byte 990b\n",
                    ".8byte _.stapsdt.base\n",
                    ".8byte {semaphore}\n",
                    ".asciz \"vsr\"\n",
                    ".asciz \"", stringify!($name), "\"\n",
                    ".asciz \"", $first_spec, $(" ", $spec,)* "\"\n",
                    "994: .balign 4\n",
                    ".popsection\n",
                    ".ifndef _.stapsdt.base\n",
                    ".pushsection .stapsdt.base, \"aGR\", \"progbits\", .stapsdt.base, comdat\n",
                    ".weak _.stapsdt.base\n",
                    ".hidden _.stapsdt.base\n",
                    "_.stapsdt.base: .space 1\n",
                    ".size _.stapsdt.base, 1\n",
                    ".popsection\n",
                    ".endif\n",
                ),
                semaphore = sym $semaphore,
                $(in($register) u64::from($value),)+
                options(att_syntax, nomem, preserves_flags),
            );
        }
    };
    // Give the next argument the next free argument register.
    (
        $name:ident, $semaphore:ident,
        [$($spec:expr),*], [$($placed:tt)*],
        [($q:tt, $d:literal, $w:literal, $b:literal) $($free:tt)*],
        $argument:ident: $ty:ident, $($rest:tt)*
    ) => {
        probe_site!(
            $name, $semaphore,
            [$($spec,)* argument_spec!($ty, $q, $d, $w, $b)],
            [$($placed)* $argument => $q,],
            [$($free)*],
            $($rest)*
        )
    };
}

macro_rules! probes {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ident),+); )*) => {
        $(
            $(#[$doc])*
            #[inline(always)]
            pub fn $name(arguments: impl FnOnce() -> ($($ty,)+)) {
                #[cfg(feature = "probes")]
                {
                    /// Raised by the kernel (uprobe `ref_ctr_offset`) while a tracer is attached.
                    #[unsafe(link_section = ".probes")]
                    static SEMAPHORE: ::core::sync::atomic::AtomicU16 =
                        ::core::sync::atomic::AtomicU16::new(0);
                    if SEMAPHORE.load(::core::sync::atomic::Ordering::Relaxed) != 0 {
                        let ($($arg,)+) = arguments();
                        probe_site!(
                            $name, SEMAPHORE, [], [],
                            [
                                ("rdi", "edi", "di", "dil") ("rsi", "esi", "si", "sil")
                                ("rdx", "edx", "dx", "dl") ("rcx", "ecx", "cx", "cl")
                                ("r8", "r8d", "r8w", "r8b") ("r9", "r9d", "r9w", "r9b")
                            ],
                            $($arg: $ty,)+
                        );
                    }
                }
                #[cfg(not(feature = "probes"))]
                let _ = arguments;
            }
        )*

        /// Every probe of the provider, in declaration order.
        pub const PROBES: &[ProbeSpec] = &[
            $( ProbeSpec { name: stringify!($name), arguments: &[$(stringify!($arg)),+] }, )*
        ];
    };
}

probes! {
    /// A client request accepted by the primary (not a duplicate, session valid).
    fn client_request(replica_id: u8, client_id: u64, request_number: u64, bytes: u32);
    /// A reply sent to a client; `latency_ns` runs from the request's arrival at the primary.
    fn client_reply(replica_id: u8, client_id: u64, request_number: u64, op: u64, latency_ns: u64);
    /// All replies of one committed op at once: `latencies_ns_address` points to `count` `u64`
    /// latencies (as in `client_reply`), valid for the duration of the probe.
    fn client_reply_batch(replica_id: u8, op: u64, count: u32, latencies_ns_address: u64);
    /// The primary prepared one op (a batch of `requests` client requests, `bytes` of body).
    fn prepare_send(replica_id: u8, view: u64, op: u64, requests: u32, bytes: u32);
    /// The primary gathered a quorum of PrepareOk for `op`, `latency_ns` after preparing it.
    fn prepare_quorum(replica_id: u8, op: u64, latency_ns: u64, votes: u8);
    /// The primary committed `op`, `latency_ns` after its quorum (waiting for earlier ops included).
    fn commit(replica_id: u8, op: u64, latency_ns: u64);
    /// Any replica executed committed `op` against its state machine.
    fn commit_execute(replica_id: u8, op: u64, operations_ok: u32, operations_failed: u32);
    /// A message handed to the transport; `peer` is a replica index or 255 for a client.
    fn message_send(replica_id: u8, command: u8, bytes: u32, peer: u8);
    /// A message that passed every check and reached the protocol.
    fn message_recv(replica_id: u8, command: u8, bytes: u32, peer: u8);
    /// One group commit: `entries` journal records, `bytes` written and made durable together.
    fn journal_write(replica_id: u8, entries: u32, bytes: u64, latency_ns: u64);
    /// This replica left `view_old` for `view_new` (reason: see `ViewChangeReason`).
    fn view_change_start(replica_id: u8, view_old: u64, view_new: u64, reason: u8);
    /// Normal status reached in `view`, `latency_ns` after this replica's view change started.
    fn view_change_done(replica_id: u8, view: u64, latency_ns: u64, is_primary: u8);
    /// A replica that cannot vouch for its log (a replacement, or a journal header that fails
    /// its checksum) began the recovery protocol from its durable `commit`.
    fn recovery_start(replica_id: u8, nonce: u64, commit: u64);
    /// Recovery finished: the replica rejoined `view` at `op`, `latency_ns` after it started.
    fn recovery_done(replica_id: u8, view: u64, op: u64, latency_ns: u64);
    /// A checkpoint of the state machine after `op` (`bytes` long) is durable, `latency_ns`
    /// after its write began; the superblock names it from the same flush on.
    fn checkpoint_done(replica_id: u8, op: u64, bytes: u64, latency_ns: u64);
    /// This replica needs ops that no peer's journal holds any more: it began fetching a peer's
    /// checkpoint of `checkpoint_op`, from its own `commit`.
    fn state_transfer_start(replica_id: u8, checkpoint_op: u64, commit: u64);
    /// State transfer finished: the checkpoint of `checkpoint_op` (`bytes` long) is this
    /// replica's state, `latency_ns` after the transfer started.
    fn state_transfer_done(replica_id: u8, checkpoint_op: u64, bytes: u64, latency_ns: u64);
    /// The scrubber read back every committed journal record it keeps (`ops`), the checkpoint
    /// and the superblock copies, finding `corruptions` damaged, in `latency_ns`.
    fn scrub_tour_done(replica_id: u8, ops: u64, corruptions: u32, latency_ns: u64);
    /// A checksum mismatch in durable state (component: see `Component`); `op` for the log.
    fn checksum_failure(replica_id: u8, component: u8, op: u64);
    /// A message rejected before the protocol saw it (reason: see `RejectReason`).
    fn byzantine_rejection(replica_id: u8, reason: u8, peer: u8);
    /// The replica asked its peers for a missing or corrupt log entry.
    fn repair_request(replica_id: u8, op: u64);
    /// A repair finished (status: see `RepairStatus`), `latency_ns` after it was first requested.
    fn repair_done(replica_id: u8, op: u64, latency_ns: u64, status: u8);
    /// A request already seen: resent the stored reply, or dropped while it was in flight.
    fn duplicate_request(replica_id: u8, client_id: u64, request_number: u64);
    /// The client table was full and evicted its least recently used session.
    fn session_evict(replica_id: u8, client_id: u64, sessions: u32);
    /// Periodic state: `snapshot_address` points to a `ReplicaSnapshot` of `snapshot_bytes`.
    fn state_snapshot(replica_id: u8, snapshot_address: u64, snapshot_bytes: u32);
}
