//! Loading the eBPF programs and attaching them to USDT sites, with kernel-managed semaphores.
//!
//! aya 0.14 attaches uprobes with a cookie but cannot pass a `ref_ctr_offset`, so each site's
//! perf event is opened here with the semaphore's file offset in `config` bits 32–63 and the
//! aya-loaded program is linked to it with `BPF_LINK_CREATE` (carrying the cookie). The kernel
//! then raises the semaphore in every process that maps the binary — including ones started
//! later — and lowers it when the link's file descriptors close, which also happens when
//! vsrscope is killed: no probe is left enabled and no uprobe is left behind.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::maps::Array;
use aya::programs::UProbe;
use aya::{Ebpf, include_bytes_aligned};
use caps::Capability;
use thiserror::Error;
use vsrscope_common::histogram::{self, BOUNDS_MAX, Bounds};
use vsrscope_common::{ARGS_MAX, ArgSpec, SITES_MAX, SiteSpec};

use crate::cookie_slots::CookieSlots;
use crate::privileges;
use crate::usdt::{Discovery, Site};

/// The compiled `vsrscope-ebpf` object.
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vsrscope"));

/// The provider every program attaches to.
pub const PROVIDER: &str = "vsr";

/// Programs in the object, each named after the probe it attaches to.
pub const PROGRAMS: &[&str] = &vsrscope_common::program::NAMES;

/// The seed's bucket bounds in milliseconds, per histogram id (`vsrscope_common::histogram`).
pub const SEED_BOUNDS_MS: [&[f64]; histogram::COUNT as usize] = [
    &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0],
    &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0],
    &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
    &[10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
    &[100.0, 500.0, 1000.0, 5000.0, 10000.0, 30000.0],
    &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0],
    &[1000.0, 5000.0, 10000.0, 30000.0, 60000.0],
];

#[derive(Debug, Error)]
pub enum AttachError {
    #[error(
        "missing privileges to load eBPF programs: run as root, or grant CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this process lacks {missing} ({error})"
    )]
    LoadPermission { missing: String, error: String },
    #[error(
        "missing privileges to open uprobes: run as root, or grant CAP_SYS_ADMIN (the kernel refuses CAP_PERFMON for uprobe perf events); this process lacks {missing} ({error})"
    )]
    UprobePermission { missing: String, error: String },
    #[error("this kernel has no uprobe support (/sys/bus/event_source/devices/uprobe is missing)")]
    NoUprobes,
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error(
        "{binary}: no `{PROVIDER}` probes to attach to (was it built with the `probes` feature?)"
    )]
    NoProbes { binary: PathBuf },
    #[error(
        "{binary}: attaching {probe} at offset {offset:#x}: {error}{hint}",
        hint = if error.raw_os_error() == Some(libc::EINVAL) {
            " (a uprobe left at this offset with a different semaphore? the binary needs a new inode)"
        } else {
            ""
        }
    )]
    Uprobe {
        binary: PathBuf,
        probe: String,
        offset: u64,
        error: std::io::Error,
    },
    #[error("more than {SITES_MAX} probe sites attached at once")]
    TooManySites,
}

/// Classifies a load failure by its whole cause chain (aya puts the errno in a source).
fn load_error(error: impl std::error::Error) -> AttachError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if text.contains("EPERM") || text.contains("Operation not permitted") || text.contains("EACCES")
    {
        AttachError::LoadPermission {
            missing: privileges::names(&privileges::missing(&[
                Capability::CAP_BPF,
                Capability::CAP_PERFMON,
            ])),
            error: text,
        }
    } else {
        AttachError::Load(text)
    }
}

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`), all the uprobe PMU reads.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    breakpoint_type: u32,
    config1: u64,
    config2: u64,
}

/// `union bpf_attr` as `BPF_LINK_CREATE` reads it for a perf event target.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    program_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
    reserved: [u64; 4],
}

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

fn uprobe_pmu_type() -> Result<u32, AttachError> {
    let text = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .map_err(|_| AttachError::NoUprobes)?;
    text.trim().parse().map_err(|_| AttachError::NoUprobes)
}

/// Opens a uprobe perf event at `file_offset` in `binary`, with the kernel managing the
/// semaphore at `semaphore_offset`; `pid` limits it to one process.
fn open_uprobe(
    pmu: u32,
    binary: &Path,
    file_offset: u64,
    semaphore_offset: u64,
    pid: Option<u32>,
) -> std::io::Result<OwnedFd> {
    let path = CString::new(binary.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = PerfEventAttr {
        kind: pmu,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: semaphore_offset << 32,
        config1: path.as_ptr() as u64,
        config2: file_offset,
        ..PerfEventAttr::default()
    };
    // Any process (pid -1) needs a cpu; the uprobe still fires on every cpu.
    let (pid, cpu) = match pid {
        Some(pid) => (pid as libc::c_int, -1),
        None => (-1, 0),
    };
    // SAFETY: `attr` and `path` outlive the call; the kernel copies both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid,
            cpu,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn link_program(
    program: BorrowedFd<'_>,
    perf_event: BorrowedFd<'_>,
    cookie: u64,
) -> std::io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        program_fd: program.as_raw_fd() as u32,
        target_fd: perf_event.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        bpf_cookie: cookie,
        ..LinkCreateAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr` prefix of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// One attached site; dropping it detaches (and lowers the semaphore).
#[derive(Debug)]
struct Attachment {
    cookie: u32,
    _link: OwnedFd,
    _perf_event: OwnedFd,
}

/// The loaded programs and everything attached with them.
#[derive(Debug)]
pub struct Tracer {
    ebpf: Ebpf,
    pmu: u32,
    cookies: CookieSlots,
    attachments: Vec<Attachment>,
    /// Held while the kernel keeps per-program run time (`BPF_ENABLE_STATS`).
    run_time_stats: Option<OwnedFd>,
}

impl Tracer {
    /// Loads and verifies every program, and writes the histogram bounds.
    /// With `run_time_stats`, the kernel also times every program run (two clock reads per
    /// probe hit), for `Tracer::program_stats`.
    pub fn load(bounds_ms: &[Vec<f64>], run_time_stats: bool) -> Result<Tracer, AttachError> {
        let pmu = uprobe_pmu_type()?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(load_error)?;
        for name in PROGRAMS {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| {
                    AttachError::Load(format!("program {name} missing from the object"))
                })?
                .try_into()
                .map_err(load_error)?;
            program.load().map_err(load_error)?;
        }
        let mut bounds_map: Array<_, Bounds> = Array::try_from(
            ebpf.map_mut("HISTOGRAM_BOUNDS")
                .ok_or_else(|| AttachError::Load("HISTOGRAM_BOUNDS missing".into()))?,
        )
        .map_err(load_error)?;
        for (index, bounds) in bounds_ms.iter().enumerate() {
            bounds_map
                .set(index as u32, bounds_ns(bounds), 0)
                .map_err(load_error)?;
        }
        let run_time_stats = if run_time_stats {
            Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(load_error)?)
        } else {
            None
        };
        Ok(Tracer {
            ebpf,
            pmu,
            cookies: CookieSlots::default(),
            attachments: Vec::new(),
            run_time_stats,
        })
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn attached_sites(&self) -> usize {
        self.attachments.len()
    }

    /// Attaches every program to every site of its probe in `binary`; to one process if `pid`
    /// is given, else to every process of the binary, now and later. Returns the sites attached.
    /// On failure nothing of this binary stays attached.
    pub fn attach(
        &mut self,
        binary: &Path,
        discovery: &Discovery,
        pid: Option<u32>,
    ) -> Result<usize, AttachError> {
        let mut attached = Vec::new();
        let result = self.attach_sites(binary, discovery, pid, &mut attached);
        match result {
            Ok(()) => {
                let count = attached.len();
                self.attachments.extend(attached);
                Ok(count)
            }
            Err(error) => {
                self.release(attached);
                Err(error)
            }
        }
    }

    /// Attaches site after site, pushing each to `attached` as it succeeds.
    fn attach_sites(
        &mut self,
        binary: &Path,
        discovery: &Discovery,
        pid: Option<u32>,
        attached: &mut Vec<Attachment>,
    ) -> Result<(), AttachError> {
        let sites: Vec<&Site> = PROGRAMS
            .iter()
            .flat_map(|name| discovery.sites_of(PROVIDER, name))
            .collect();
        if sites.is_empty() {
            return Err(AttachError::NoProbes {
                binary: binary.to_path_buf(),
            });
        }
        attached.reserve(sites.len());
        for site in sites {
            let cookie = self.cookies.take().ok_or(AttachError::TooManySites)?;
            let attachment = self.attach_site(binary, site, pid, cookie);
            match attachment {
                Ok(attachment) => attached.push(attachment),
                Err(error) => {
                    self.cookies.release(cookie);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Writes `site`'s spec at `cookie` and attaches its program with that cookie.
    fn attach_site(
        &mut self,
        binary: &Path,
        site: &Site,
        pid: Option<u32>,
        cookie: u32,
    ) -> Result<Attachment, AttachError> {
        let mut spec = SiteSpec {
            arg_count: site.arguments.len() as u32,
            ..SiteSpec::default()
        };
        let arguments: [ArgSpec; ARGS_MAX] =
            std::array::from_fn(|index| site.arguments.get(index).copied().unwrap_or_default());
        spec.args = arguments;
        let mut specs: Array<_, SiteSpec> = Array::try_from(
            self.ebpf
                .map_mut("SITE_SPECS")
                .ok_or_else(|| AttachError::Load("SITE_SPECS missing".into()))?,
        )
        .map_err(load_error)?;
        specs.set(cookie, spec, 0).map_err(load_error)?;
        let uprobe_error = |error: std::io::Error| match error.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => AttachError::UprobePermission {
                missing: privileges::names(&privileges::missing(&[Capability::CAP_SYS_ADMIN])),
                error: error.to_string(),
            },
            _ => AttachError::Uprobe {
                binary: binary.to_path_buf(),
                probe: site.name.clone(),
                offset: site.file_offset,
                error,
            },
        };
        let perf_event = open_uprobe(
            self.pmu,
            binary,
            site.file_offset,
            site.semaphore_offset,
            pid,
        )
        .map_err(uprobe_error)?;
        let program: &UProbe = self
            .ebpf
            .program(&site.name)
            .ok_or_else(|| AttachError::Load(format!("program {} missing", site.name)))?
            .try_into()
            .map_err(load_error)?;
        let program_fd = program.fd().map_err(load_error)?;
        let link = link_program(program_fd.as_fd(), perf_event.as_fd(), u64::from(cookie))
            .map_err(uprobe_error)?;
        Ok(Attachment {
            cookie,
            _link: link,
            _perf_event: perf_event,
        })
    }

    /// Detaches `attachments` and frees their cookies.
    fn release(&mut self, attachments: Vec<Attachment>) {
        for attachment in attachments {
            let cookie = attachment.cookie;
            // Closing the link and perf event detaches before the slot can be reused.
            drop(attachment);
            self.cookies.release(cookie);
        }
    }

    /// Each program's run count and total run time as the kernel counted them, when run-time
    /// statistics are on.
    pub fn program_stats(&self) -> Vec<(&'static str, u64, std::time::Duration)> {
        if self.run_time_stats.is_none() {
            return Vec::new();
        }
        PROGRAMS
            .iter()
            .filter_map(|name| {
                let program: &UProbe = self.ebpf.program(name)?.try_into().ok()?;
                let info = program.info().ok()?;
                Some((*name, info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// Detaches everything; the programs stay loaded and counters keep their values.
    pub fn detach_all(&mut self) {
        let attachments = std::mem::take(&mut self.attachments);
        self.release(attachments);
    }
}

fn bounds_ns(bounds_ms: &[f64]) -> Bounds {
    let mut bounds = Bounds {
        bounds_ns: [u64::MAX; BOUNDS_MAX],
    };
    for (slot, bound) in bounds.bounds_ns.iter_mut().zip(bounds_ms) {
        *slot = (bound * 1_000_000.0).round() as u64;
    }
    bounds
}
