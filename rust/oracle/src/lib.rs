#![cfg(target_os = "linux")]
//! The kernel oracle: an anonfolio trace replayed on the real Linux kernel, in
//! this process, and what the kernel reported about it.
//!
//! How a trace is placed:
//! - A `PROT_NONE` reservation (`MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE`)
//!   covers the trace's span, rounded out to 2 MiB, plus 2 MiB on each side.
//!   Its traced part starts on a 2 MiB boundary, and a trace address `a`
//!   becomes `base + (a - align_down(lowest trace address, 2 MiB))`, so every
//!   address keeps its offset inside its 2 MiB page (and so its PMD and folio
//!   alignment). Nothing else can merge with the trace's VMAs: their
//!   neighbours are `PROT_NONE`.
//! - `mmap` is `mmap(MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS, PROT_READ|PROT_WRITE)`
//!   over the reservation, then `madvise(MADV_HUGEPAGE/MADV_NOHUGEPAGE)` if
//!   flagged, then, for `uffd-wp`, `UFFDIO_REGISTER` in write-protect mode on
//!   a userfaultfd opened before the loop.
//! - `munmap` is a real `munmap`: it leaves a hole inside the reservation's
//!   span, as the kernel examples did.
//! - `madvise` is `madvise(MADV_DONTNEED/MADV_HUGEPAGE/MADV_NOHUGEPAGE)`. A
//!   range that is partly unmapped gets `ENOMEM` from the kernel after the
//!   advice was applied to the mapped part; that is not an error here.
//! - `w` is a volatile one-byte write, `r` a volatile one-byte read.
//! - Threads: the lines of every thread (`@T`) run on the calling thread, in
//!   the order of the trace file (a serial interleaving). The kernel oracle
//!   has no concurrency.
//!
//! Before the loop the trace's own VMA set is simulated (an interval list):
//! an access outside every VMA the trace created, or an `mmap` over an
//! existing one, is reported with its line instead of crashing the process.
//!
//! What is measured:
//! - `faults`: minor faults of the calling thread (`getrusage(RUSAGE_THREAD)`,
//!   which equals `RUSAGE_SELF` for a single-threaded process but is not
//!   disturbed by other threads of the host process, e.g. Python threads
//!   while the GIL is released), across the loop, less the harness overhead
//!   measured by running the same loop with no operations. A warm-up replay
//!   of a small synthetic trace that uses every operation runs first, so the
//!   loop's code and data pages are already present.
//! - `rss_bytes`: the sum of `Rss:` in `/proc/self/smaps` over the mappings
//!   inside the reservation, read after the loop, before anything is unmapped.
//! - `mthp`: deltas across the loop of `hugepages-*/stats/*`; the gauges
//!   `nr_anon` and `nr_anon_partially_mapped` too, read before the final unmap.
//!   These counters are system-wide: other processes faulting large folios at
//!   the same time show up here.
//! - `vmstat`: deltas of `/proc/vmstat` THP counters (also system-wide).
//! - `elapsed_s`: wall seconds of the loop.
//! - `folio_orders`: this process's own folios inside the reservation by
//!   order, read from its pagemap and `/proc/kpageflags` after the loop,
//!   before anything is unmapped ([`folios_by_order`]); not system-wide.
//!
//! The loop itself does not allocate: operations are translated into a
//! flat array beforehand, and errors are recorded in a fixed-size slot.

use anonfolio_trace::{Advice, Op, OpKind};
use std::fmt;

/// What can stop a kernel replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The kernel or the host refused something (a syscall, a file, no Linux).
    Oracle(String),
    /// The trace maps over an existing mapping.
    Overlap(String),
    /// The trace accesses memory outside every VMA it made (SIGSEGV).
    Segv(u64),
    /// The trace does not parse.
    Trace(anonfolio_trace::Error),
    /// An error raised by the operation on a given trace line.
    AtLine(u32, Box<Error>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Oracle(m) => write!(f, "kernel oracle: {m}"),
            Error::Overlap(m) => f.write_str(m),
            Error::Segv(a) => write!(f, "segmentation fault: access at {a:#x} is outside every VMA"),
            Error::Trace(e) => e.fmt(f),
            Error::AtLine(n, e) => write!(f, "line {n}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<anonfolio_trace::Error> for Error {
    fn from(e: anonfolio_trace::Error) -> Self {
        Error::Trace(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
use std::time::Instant;

const PAGE: u64 = 4096;
const PMD: u64 = 2 << 20;
const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// Counters read from `hugepages-<size>/stats/`.
pub const MTHP_COUNTERS: &[&str] = &[
    "anon_fault_alloc",
    "anon_fault_fallback",
    "anon_fault_fallback_charge",
    "split",
    "split_deferred",
    "nr_anon",
    "nr_anon_partially_mapped",
];

/// Counters read from `/proc/vmstat`.
pub const VMSTAT_COUNTERS: &[&str] = &[
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_fault_fallback_charge",
    "thp_split_pmd",
    "thp_split_page",
    "thp_deferred_split_page",
    "thp_zero_page_alloc",
];

/// What the kernel did with one trace.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelRun {
    /// Minor faults of the replay loop, less the harness overhead.
    pub faults: u64,
    /// Rss of the trace's mappings at the end (`/proc/self/smaps`).
    pub rss_bytes: u64,
    /// PMD-mapped part of that (`AnonHugePages:` in smaps).
    pub anon_huge_bytes: u64,
    /// Wall seconds of the loop.
    pub elapsed_s: f64,
    /// Per size (`"64kB"`, ascending), the deltas of `hugepages-*/stats/*`
    /// that exist for that size.
    pub mthp: Vec<(String, Vec<(&'static str, i64)>)>,
    /// Deltas of `/proc/vmstat` THP counters.
    pub vmstat: Vec<(&'static str, i64)>,
    /// `uname -r`.
    pub kernel_release: String,
    /// The harness overhead subtracted from `faults`.
    pub harness_faults: u64,
    /// Folios of this process inside the reservation at the end, by order
    /// (index 0 = order 0), from its own page table ([`folios_by_order`]);
    /// None when `/proc/self/pagemap` or `/proc/kpageflags` cannot be read.
    /// Unlike `mthp`, no other process can change these.
    pub folio_orders: Option<Vec<u64>>,
}

// ---------------------------------------------------------------------------
// userfaultfd (x86-64 / generic ioctl encoding)

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` (24 bytes).
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
const RUSAGE_THREAD: libc::c_int = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn strerror(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// Opens a userfaultfd and does the `UFFDIO_API` handshake.
fn open_uffd() -> Result<libc::c_int> {
    let mut tried = Vec::new();
    let mut fd = -1;
    for flags in [libc::O_CLOEXEC | UFFD_USER_MODE_ONLY, libc::O_CLOEXEC] {
        // SAFETY: plain syscall with integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            fd = r as libc::c_int;
            break;
        }
        tried.push(format!("userfaultfd({flags:#x}): {}", strerror(errno())));
    }
    if fd < 0 {
        let path = b"/dev/userfaultfd\0";
        // SAFETY: NUL-terminated path.
        let dev = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev >= 0 {
            // SAFETY: ioctl on the device we just opened.
            let r = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC) };
            if r >= 0 {
                fd = r;
            } else {
                tried.push(format!("/dev/userfaultfd USERFAULTFD_IOC_NEW: {}", strerror(errno())));
            }
            // SAFETY: closing our own fd.
            unsafe { libc::close(dev) };
        } else {
            tried.push(format!("open /dev/userfaultfd: {}", strerror(errno())));
        }
    }
    if fd < 0 {
        return Err(Error::Oracle(format!(
            "userfaultfd is unavailable, cannot replay uffd-wp mappings ({}); \
             run as root or set vm.unprivileged_userfaultfd=1",
            tried.join("; ")
        )));
    }
    let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: `api` is a valid uffdio_api for the duration of the call.
    let r = unsafe { libc::ioctl(fd, UFFDIO_API as _, &mut api as *mut UffdioApi) };
    if r < 0 {
        let e = errno();
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        return Err(Error::Oracle(format!("userfaultfd UFFDIO_API failed: {}", strerror(e))));
    }
    Ok(fd)
}

// ---------------------------------------------------------------------------
// The trace as the loop sees it

#[derive(Clone, Copy, Debug)]
enum Raw {
    /// `advice` is 0 or a MADV_* value applied after the mmap.
    Mmap {
        p: *mut u8,
        len: usize,
        advice: libc::c_int,
        uffd_wp: bool,
    },
    Munmap {
        p: *mut u8,
        len: usize,
    },
    Madvise {
        p: *mut u8,
        len: usize,
        advice: libc::c_int,
    },
    Write(*mut u8),
    Read(*const u8),
}

#[derive(Clone, Copy, Debug)]
struct RawOp {
    line: u32,
    raw: Raw,
}

/// What went wrong inside the loop (no allocation there).
#[derive(Clone, Copy, Debug)]
struct LoopError {
    line: u32,
    what: &'static str,
    errno: i32,
}

/// The bare replay loop. Returns the first error, if any.
///
/// # Safety
/// Every pointer in `ops` must lie inside a reservation this process owns
/// and that nothing else uses, and every access must fall inside a mapping
/// an earlier op of `ops` made (what `translate` and `check_vmas` ensure).
#[inline(never)]
unsafe fn run_ops(ops: &[RawOp], uffd: libc::c_int) -> Option<LoopError> {
    for op in ops {
        // SAFETY: by the contract above, every mmap/munmap/madvise covers
        // only the reservation, and every access hits a live mapping.
        unsafe {
            match op.raw {
                Raw::Write(p) => std::ptr::write_volatile(p, 1u8),
                Raw::Read(p) => {
                    std::ptr::read_volatile(p);
                }
                Raw::Mmap { p, len, advice, uffd_wp } => {
                    let r = libc::mmap(
                        p.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if r != p.cast() {
                        return Some(LoopError { line: op.line, what: "mmap", errno: errno() });
                    }
                    if advice != 0 && libc::madvise(p.cast(), len, advice) != 0 {
                        return Some(LoopError { line: op.line, what: "madvise after mmap", errno: errno() });
                    }
                    if uffd_wp {
                        let mut reg = UffdioRegister {
                            start: p as u64,
                            len: len as u64,
                            mode: UFFDIO_REGISTER_MODE_WP,
                            ioctls: 0,
                        };
                        if libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister) != 0 {
                            return Some(LoopError {
                                line: op.line,
                                what: "UFFDIO_REGISTER (write-protect mode)",
                                errno: errno(),
                            });
                        }
                    }
                }
                Raw::Munmap { p, len } => {
                    if libc::munmap(p.cast(), len) != 0 {
                        return Some(LoopError { line: op.line, what: "munmap", errno: errno() });
                    }
                }
                Raw::Madvise { p, len, advice } => {
                    if libc::madvise(p.cast(), len, advice) != 0 {
                        let e = errno();
                        // ENOMEM: part of the range is not mapped; the
                        // mapped part was advised all the same.
                        if e != libc::ENOMEM {
                            return Some(LoopError { line: op.line, what: "madvise", errno: e });
                        }
                    }
                }
            }
        }
    }
    None
}

fn thread_minflt() -> u64 {
    // SAFETY: rusage is plain old data, for which all-zero bytes are valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for getrusage to fill.
    unsafe { libc::getrusage(RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt as u64
}

/// The measured section: faults and wall time around `run_ops`.
///
/// # Safety
/// As for [`run_ops`].
#[inline(never)]
unsafe fn measured(ops: &[RawOp], uffd: libc::c_int) -> (u64, f64, Option<LoopError>) {
    let f0 = thread_minflt();
    let t0 = Instant::now();
    // SAFETY: the caller's contract is run_ops's.
    let err = unsafe { run_ops(ops, uffd) };
    let el = t0.elapsed().as_secs_f64();
    let f1 = thread_minflt();
    (f1.wrapping_sub(f0), el, err)
}

// ---------------------------------------------------------------------------
// The trace's VMA set, simulated to reject bad traces before running them

fn op_range(k: &OpKind) -> (u64, u64) {
    match *k {
        OpKind::Mmap { addr, len, .. } | OpKind::Munmap { addr, len } | OpKind::Madvise { addr, len, .. } => {
            (addr, addr + len)
        }
        OpKind::Mprotect { addr, len, .. } => (addr, addr + len),
        OpKind::Mremap { old_addr, old_len, new_addr, new_len } => {
            (old_addr.min(new_addr), (old_addr + old_len).max(new_addr + new_len))
        }
        OpKind::Brk { addr } => (addr, addr + 1),
        OpKind::Write { addr } | OpKind::Read { addr } => (addr, addr + 1),
    }
}

/// The operations this oracle does not replay on the kernel yet.
fn check_supported(ops: &[Op]) -> Result<()> {
    for op in ops {
        let unsupported = match op.kind {
            OpKind::Mprotect { .. } | OpKind::Mremap { .. } | OpKind::Brk { .. } => true,
            OpKind::Madvise { advice, .. } => {
                !matches!(advice, Advice::DontNeed | Advice::HugePage | Advice::NoHugePage)
            }
            OpKind::Mmap { flags, .. } => {
                flags.prot != anonfolio_trace::Prot::ReadWrite
                    || flags.populate
                    || flags.growsdown
                    || flags.noreserve
                    || flags.stack
            }
            _ => false,
        };
        if unsupported {
            return Err(Error::AtLine(
                op.line,
                Box::new(Error::Oracle("this operation is not replayed on the kernel yet".into())),
            ));
        }
    }
    Ok(())
}

/// Checks that every access lies in a VMA the trace created and no mmap
/// overlaps a live one.
fn check_vmas(ops: &[Op]) -> Result<()> {
    let mut vmas: Vec<(u64, u64)> = Vec::new(); // sorted, disjoint
    for op in ops {
        match op.kind {
            OpKind::Mmap { addr, len, .. } => {
                let end = addr + len;
                if vmas.iter().any(|&(s, e)| s < end && addr < e) {
                    return Err(Error::AtLine(
                        op.line,
                        Box::new(Error::Overlap(format!("mmap {addr:#x}+{len:#x} overlaps an existing mapping"))),
                    ));
                }
                let i = vmas.partition_point(|&(s, _)| s < addr);
                vmas.insert(i, (addr, end));
            }
            OpKind::Munmap { addr, len } => {
                let end = addr + len;
                let mut out = Vec::with_capacity(vmas.len() + 1);
                for &(s, e) in &vmas {
                    if e <= addr || s >= end {
                        out.push((s, e));
                        continue;
                    }
                    if s < addr {
                        out.push((s, addr));
                    }
                    if e > end {
                        out.push((end, e));
                    }
                }
                vmas = out;
            }
            // Refused by `check_supported` before this runs.
            OpKind::Madvise { .. } | OpKind::Mprotect { .. } | OpKind::Mremap { .. } | OpKind::Brk { .. } => {}
            OpKind::Write { addr } | OpKind::Read { addr } => {
                if !vmas.iter().any(|&(s, e)| s <= addr && addr < e) {
                    return Err(Error::AtLine(op.line, Box::new(Error::Segv(addr))));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The reservation

struct Reservation {
    /// Start and length of what is reserved (including the guard margins).
    lo: u64,
    len: u64,
    /// Where the 2 MiB-aligned trace base maps.
    base: u64,
}

impl Reservation {
    /// Reserves `span` bytes at a 2 MiB-aligned base, with 2 MiB of
    /// PROT_NONE on each side.
    fn new(span: u64) -> Result<Reservation> {
        let want = span
            .checked_add(3 * PMD)
            .and_then(|x| x.checked_add(2 * PMD))
            .ok_or_else(|| Error::Oracle(format!("trace span {span:#x} is too large to reserve")))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping; nothing is overwritten.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                want as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::Oracle(format!(
                "cannot reserve {want:#x} bytes of address space for the trace: {}",
                strerror(errno())
            )));
        }
        let raw = raw as u64;
        let base = ((raw + PMD - 1) & !(PMD - 1)) + PMD;
        let lo = base - PMD;
        let hi = base + span + PMD;
        // Trim what lies outside [lo, hi).
        // SAFETY: both pieces are parts of the mapping made above.
        unsafe {
            if lo > raw {
                libc::munmap(raw as *mut _, (lo - raw) as usize);
            }
            if raw + want > hi {
                libc::munmap(hi as *mut _, (raw + want - hi) as usize);
            }
        }
        Ok(Reservation { lo, len: hi - lo, base })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the whole range was ours; unmapping holes is harmless.
        unsafe { libc::munmap(self.lo as *mut _, self.len as usize) };
    }
}

struct Fd(libc::c_int);
impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(self.0) };
        }
    }
}

fn advice_value(a: Advice) -> libc::c_int {
    match a {
        Advice::DontNeed => libc::MADV_DONTNEED,
        Advice::HugePage => libc::MADV_HUGEPAGE,
        Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
        Advice::Free => libc::MADV_FREE,
        Advice::PopulateRead => libc::MADV_POPULATE_READ,
        Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
        Advice::DontFork => libc::MADV_DONTFORK,
        Advice::DoFork => libc::MADV_DOFORK,
    }
}

/// Translates the trace into loop operations inside a fresh reservation.
fn translate(ops: &[Op]) -> Result<(Reservation, Vec<RawOp>)> {
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for op in ops {
        let (s, e) = op_range(&op.kind);
        lo = lo.min(s);
        hi = hi.max(e);
    }
    if ops.is_empty() {
        lo = 0;
        hi = 0;
    }
    let alo = lo & !(PMD - 1);
    let ahi = hi.div_ceil(PMD) * PMD;
    let res = Reservation::new(ahi - alo)?;
    let tr = |a: u64| (res.base + (a - alo)) as *mut u8;
    let raw = ops
        .iter()
        .map(|op| {
            let raw = match op.kind {
                OpKind::Mmap { addr, len, flags } => Raw::Mmap {
                    p: tr(addr),
                    len: len as usize,
                    advice: if flags.hugepage {
                        libc::MADV_HUGEPAGE
                    } else if flags.nohugepage {
                        libc::MADV_NOHUGEPAGE
                    } else {
                        0
                    },
                    uffd_wp: flags.uffd_wp,
                },
                OpKind::Munmap { addr, len } => Raw::Munmap { p: tr(addr), len: len as usize },
                OpKind::Madvise { addr, len, advice } => {
                    Raw::Madvise { p: tr(addr), len: len as usize, advice: advice_value(advice) }
                }
                OpKind::Write { addr } => Raw::Write(tr(addr)),
                OpKind::Read { addr } => Raw::Read(tr(addr)),
                // Refused by `check_supported` before this runs.
                OpKind::Mprotect { .. } | OpKind::Mremap { .. } | OpKind::Brk { .. } => {
                    unreachable!("check_supported refuses {:?}", op.kind)
                }
            };
            RawOp { line: op.line, raw }
        })
        .collect();
    Ok((res, raw))
}

// ---------------------------------------------------------------------------
// Reading what the kernel reports

/// The `hugepages-*` folders, smallest first: (size in kB, path).
fn size_dirs() -> Vec<(u64, String)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(THP_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(kb) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")) {
                if let Ok(n) = kb.parse::<u64>() {
                    v.push((n, format!("{THP_DIR}/{name}")));
                }
            }
        }
    }
    v.sort();
    v
}

/// Reads the kernel's counters without allocating, so that taking a
/// snapshot cannot itself fault in new heap pages (which, with a THP knob
/// at `always`, would show up in the very counters being read).
struct Probe {
    /// One `hugepages-*/stats/<counter>` file each: (size index, counter, path).
    files: Vec<(usize, &'static str, std::ffi::CString)>,
    sizes: Vec<String>,
    /// Counters of `/proc/vmstat` found there.
    vmstat: Vec<&'static str>,
    buf: Vec<u8>,
}

const VMSTAT_PATH: &std::ffi::CStr = c"/proc/vmstat";

/// A snapshot: the file values in `Probe::files` order, then `Probe::vmstat`.
type Snap = Vec<i64>;

/// Per size, (counter, delta).
pub type MthpDeltas = Vec<(String, Vec<(&'static str, i64)>)>;

impl Probe {
    fn new() -> Probe {
        let mut files = Vec::new();
        let mut sizes = Vec::new();
        for (i, (kb, dir)) in size_dirs().into_iter().enumerate() {
            sizes.push(format!("{kb}kB"));
            for &c in MTHP_COUNTERS {
                let path = format!("{dir}/stats/{c}");
                if std::fs::metadata(&path).is_ok() {
                    if let Ok(cs) = std::ffi::CString::new(path) {
                        files.push((i, c, cs));
                    }
                }
            }
        }
        let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        let vmstat = VMSTAT_COUNTERS
            .iter()
            .copied()
            .filter(|c| text.lines().any(|l| l.split_whitespace().next() == Some(*c)))
            .collect();
        // Touched, so that reading into it faults nothing.
        let buf = vec![1u8; (text.len() * 4).max(64 << 10)];
        Probe { files, sizes, vmstat, buf }
    }

    fn new_snap(&self) -> Snap {
        vec![0i64; self.files.len() + self.vmstat.len()]
    }

    /// Reads a whole file into `buf` with plain syscalls; returns its length.
    fn read_file(buf: &mut [u8], path: &std::ffi::CStr) -> usize {
        // SAFETY: NUL-terminated path; reads into our own buffer.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return 0;
            }
            let mut n = 0usize;
            while n < buf.len() {
                let r = libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n);
                if r <= 0 {
                    break;
                }
                n += r as usize;
            }
            libc::close(fd);
            n
        }
    }

    fn parse_int(b: &[u8]) -> i64 {
        let mut v = 0i64;
        let mut neg = false;
        for (i, &c) in b.iter().enumerate() {
            match c {
                b'-' if i == 0 => neg = true,
                b'0'..=b'9' => v = v.wrapping_mul(10).wrapping_add((c - b'0') as i64),
                _ => break,
            }
        }
        if neg {
            -v
        } else {
            v
        }
    }

    /// Fills `out` (from [`Probe::new_snap`]) without allocating.
    fn read(&mut self, out: &mut Snap) {
        let Probe { files, vmstat, buf, .. } = self;
        for (k, (_, _, path)) in files.iter().enumerate() {
            let n = Self::read_file(buf, path);
            out[k] = Self::parse_int(&buf[..n]);
        }
        let base = files.len();
        let n = Self::read_file(buf, VMSTAT_PATH);
        for line in buf[..n].split(|&c| c == b'\n') {
            let Some(sp) = line.iter().position(|&c| c == b' ') else { continue };
            let (name, rest) = (&line[..sp], &line[sp + 1..]);
            if let Some(j) = vmstat.iter().position(|c| c.as_bytes() == name) {
                out[base + j] = Self::parse_int(rest);
            }
        }
    }

    fn deltas(&self, before: &Snap, after: &Snap) -> (MthpDeltas, Vec<(&'static str, i64)>) {
        let mut mthp: MthpDeltas = self.sizes.iter().map(|s| (s.clone(), Vec::new())).collect();
        for (k, &(i, c, _)) in self.files.iter().enumerate() {
            mthp[i].1.push((c, after[k] - before[k]));
        }
        let base = self.files.len();
        let vm = self.vmstat.iter().enumerate().map(|(j, &c)| (c, after[base + j] - before[base + j])).collect();
        (mthp, vm)
    }
}

/// (Rss, AnonHugePages) in bytes over the smaps entries inside [lo, hi).
fn smaps_rss(lo: u64, hi: u64) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| Error::Oracle(format!("cannot read /proc/self/smaps: {e}")))?;
    let (mut rss, mut huge) = (0u64, 0u64);
    let mut inside = false;
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = s >= lo && e <= hi;
                continue;
            }
        }
        if !inside {
            continue;
        }
        let kb = |rest: &str| rest.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        if let Some(rest) = l.strip_prefix("Rss:") {
            rss += kb(rest);
        } else if let Some(rest) = l.strip_prefix("AnonHugePages:") {
            huge += kb(rest);
        }
    }
    Ok((rss, huge))
}

/// The anonymous folios mapped in `[lo, hi)` of this process, counted by
/// order, the way the kernel's `tools/mm/thpmaps` reads them (this function
/// has no kernel counterpart): each present page's PFN from
/// `/proc/self/pagemap`, its flags from `/proc/kpageflags`; a page with
/// `KPF_COMPOUND_TAIL` belongs to the nearest `KPF_COMPOUND_HEAD` below it,
/// and a head's order is log2 of 1 + the tails after it. Each folio counts
/// once, even if only some of its pages are still mapped; zero pages
/// (`KPF_ZERO_PAGE`, the huge one too) do not count. Needs CAP_SYS_ADMIN
/// (without it pagemap hides the PFNs, which is reported as an error).
pub fn folios_by_order(lo: u64, hi: u64) -> Result<Vec<u64>> {
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    const PM_PRESENT: u64 = 1 << 63;
    const PM_PFN_MASK: u64 = (1 << 55) - 1;
    const KPF_COMPOUND_HEAD: u64 = 1 << 15;
    const KPF_COMPOUND_TAIL: u64 = 1 << 16;
    const KPF_ZERO_PAGE: u64 = 1 << 24;
    const MAX_FOLIO: u64 = 512;
    let open = |path: &str| std::fs::File::open(path).map_err(|e| Error::Oracle(format!("cannot read {path}: {e}")));
    let (pagemap, kpageflags) = (open("/proc/self/pagemap")?, open("/proc/kpageflags")?);
    let words = |f: &std::fs::File, index: u64, n: usize, what: &str| -> Result<Vec<u64>> {
        let mut buf = vec![0u8; n * 8];
        let got = f.read_at(&mut buf, index * 8).map_err(|e| Error::Oracle(format!("cannot read {what}: {e}")))?;
        Ok(buf[..got - got % 8].chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect())
    };
    let flags = |pfn: u64| -> Result<u64> {
        words(&kpageflags, pfn, 1, "/proc/kpageflags")?
            .first()
            .copied()
            .ok_or_else(|| Error::Oracle(format!("/proc/kpageflags has no PFN {pfn:#x}")))
    };
    let mut heads: HashMap<u64, usize> = HashMap::new();
    let mut vpn = lo / PAGE;
    while vpn < hi / PAGE {
        let n = (hi / PAGE - vpn).min(MAX_FOLIO) as usize;
        let entries = words(&pagemap, vpn, n, "/proc/self/pagemap")?;
        if entries.is_empty() {
            break;
        }
        vpn += entries.len() as u64;
        for e in entries {
            if e & PM_PRESENT == 0 {
                continue;
            }
            let pfn = e & PM_PFN_MASK;
            if pfn == 0 {
                return Err(Error::Oracle("/proc/self/pagemap hides PFNs (needs CAP_SYS_ADMIN)".into()));
            }
            let f = flags(pfn)?;
            if f & KPF_ZERO_PAGE != 0 {
                continue;
            }
            let head = if f & KPF_COMPOUND_TAIL != 0 {
                // The head is within the 511 PFNs below (no anon folio is larger than a PMD).
                let from = pfn.saturating_sub(MAX_FOLIO - 1);
                let below = words(&kpageflags, from, (pfn - from) as usize, "/proc/kpageflags")?;
                match below.iter().rposition(|&b| b & KPF_COMPOUND_HEAD != 0) {
                    Some(i) => from + i as u64,
                    None => return Err(Error::Oracle(format!("PFN {pfn:#x} is a tail without a head"))),
                }
            } else {
                pfn
            };
            if heads.contains_key(&head) {
                continue;
            }
            let order = if head != pfn || f & KPF_COMPOUND_HEAD != 0 {
                let after = words(&kpageflags, head + 1, MAX_FOLIO as usize - 1, "/proc/kpageflags")?;
                let tails = after.iter().take_while(|&&b| b & KPF_COMPOUND_TAIL != 0).count() as u64;
                (tails + 1).trailing_zeros() as usize
            } else {
                0
            };
            heads.insert(head, order);
        }
    }
    let mut out = vec![0u64; 11];
    for order in heads.into_values() {
        out[order.min(10)] += 1;
    }
    Ok(out)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data, for which all-zero bytes are valid.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for uname to fill.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::from("unknown");
    }
    // SAFETY: the kernel NUL-terminates the field.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------
// Warm-up and calibration

/// A small trace in its own scratch area that runs every operation once,
/// so that the loop's code, the vDSO and the syscall paths are warm. Its
/// VMAs are too small for any large folio.
fn warm_up(with_uffd: bool) -> Result<()> {
    use anonfolio_trace::MmapFlags;
    let b = 0x1000_0000u64;
    let m = |addr, flags| OpKind::Mmap { addr, len: 2 * PAGE, flags };
    let mut kinds = vec![
        m(b, MmapFlags { hugepage: true, ..Default::default() }),
        OpKind::Write { addr: b },
        OpKind::Read { addr: b + PAGE },
        OpKind::Write { addr: b + PAGE },
        OpKind::Madvise { addr: b, len: 2 * PAGE, advice: Advice::DontNeed },
        OpKind::Madvise { addr: b, len: PAGE, advice: Advice::NoHugePage },
        OpKind::Madvise { addr: b, len: PAGE, advice: Advice::HugePage },
        OpKind::Write { addr: b },
        OpKind::Munmap { addr: b, len: 2 * PAGE },
        m(b + 8 * PAGE, MmapFlags { nohugepage: true, ..Default::default() }),
        OpKind::Read { addr: b + 8 * PAGE },
        m(b + 16 * PAGE, MmapFlags::default()),
        OpKind::Write { addr: b + 16 * PAGE },
    ];
    if with_uffd {
        kinds.push(m(b + 24 * PAGE, MmapFlags { uffd_wp: true, ..Default::default() }));
        kinds.push(OpKind::Write { addr: b + 24 * PAGE });
    }
    let ops: Vec<Op> =
        kinds.into_iter().enumerate().map(|(i, kind)| Op { thread: 0, line: i as u32 + 1, kind }).collect();
    let uffd = Fd(if with_uffd { open_uffd()? } else { -1 });
    let (res, raw) = translate(&ops)?;
    // SAFETY: `raw` comes from `translate` of a trace `check_vmas` accepted.
    let (_, _, err) = unsafe { measured(&raw, uffd.0) };
    if let Some(e) = err {
        return Err(Error::Oracle(format!("warm-up replay failed at {}: {}", e.what, strerror(e.errno))));
    }
    drop(uffd);
    drop(res);
    Ok(())
}

/// The faults the measuring harness costs by itself: the measured section
/// with no operations, the least of a few runs.
fn harness_overhead() -> u64 {
    // SAFETY: no operations, no pointers.
    (0..5).map(|_| unsafe { measured(&[], -1) }.0).min().unwrap_or(0)
}

// ---------------------------------------------------------------------------

/// Replays `ops` on the running kernel in this process and reports what the
/// kernel did. See the module documentation for the exact procedure.
///
/// THP settings are whatever sysfs holds at the time; set them beforehand.
pub fn kernel_replay(ops: &[Op]) -> Result<KernelRun> {
    check_supported(ops)?;
    check_vmas(ops)?;
    let needs_uffd = ops.iter().any(|op| matches!(op.kind, OpKind::Mmap { flags, .. } if flags.uffd_wp));
    let uffd = Fd(if needs_uffd { open_uffd()? } else { -1 });

    warm_up(needs_uffd)?;
    let harness = harness_overhead();

    let (res, raw) = translate(ops)?;
    let release = kernel_release();
    let mut probe = Probe::new();
    let (mut s0, mut s1) = (probe.new_snap(), probe.new_snap());
    // Warm the probe too (page cache, sysfs attribute buffers, our buffer).
    probe.read(&mut s0);
    probe.read(&mut s1);

    probe.read(&mut s0);
    // SAFETY: `raw` comes from `translate` of a trace `check_vmas` accepted.
    let (faults, elapsed_s, err) = unsafe { measured(&raw, uffd.0) };
    probe.read(&mut s1);
    let (rss_bytes, anon_huge_bytes) = smaps_rss(res.lo, res.lo + res.len)?;
    let folio_orders = folios_by_order(res.lo, res.lo + res.len).ok();

    if let Some(e) = err {
        return Err(Error::AtLine(
            e.line,
            Box::new(Error::Oracle(format!("{} failed: {}", e.what, strerror(e.errno)))),
        ));
    }
    // Unregister (closing the userfaultfd) and unmap only after measuring.
    drop(uffd);
    drop(res);
    let (mthp, vmstat) = probe.deltas(&s0, &s1);

    Ok(KernelRun {
        faults: faults.saturating_sub(harness),
        rss_bytes,
        anon_huge_bytes,
        elapsed_s,
        mthp,
        vmstat,
        kernel_release: release,
        harness_faults: harness,
        folio_orders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anonfolio_trace as trace;

    fn can_run() -> bool {
        // The oracle needs nothing special for order-0 traces; skip only if
        // /proc/self/smaps is unreadable (e.g. a restricted sandbox).
        std::fs::metadata("/proc/self/smaps").is_ok()
    }

    #[test]
    fn order0_writes_fault_once_per_page() {
        if !can_run() {
            eprintln!("skipped: /proc/self/smaps unavailable");
            return;
        }
        // nohugepage: order 0 whatever the THP knobs say.
        let mut t = String::from("mmap 0x7f0000003000 0x10000 nohugepage\n");
        for i in 0..16u64 {
            t += &format!("w {:#x}\n", 0x7f0000003000u64 + i * 4096 + 17);
        }
        let run = kernel_replay(&trace::parse(&t).unwrap()).unwrap();
        assert_eq!(run.faults, 16, "{run:?}");
        assert_eq!(run.rss_bytes, 64 << 10, "{run:?}");
        assert!(!run.kernel_release.is_empty());
        // A second write to each page faults no more; a read of an untouched
        // page maps the zero page, which is not Rss.
        let mut t2 = String::from("mmap 0x1000000 0x5000 nohugepage\n");
        for i in 0..4u64 {
            t2 += &format!("w {:#x}\nw {:#x}\n", 0x1000000 + i * 4096, 0x1000000 + i * 4096 + 8);
        }
        t2 += "r 0x1004000\nmadvise 0x1000000 0x2000 dontneed\nw 0x1000000\n";
        let run = kernel_replay(&trace::parse(&t2).unwrap()).unwrap();
        assert_eq!(run.faults, 6, "{run:?}");
        assert_eq!(run.rss_bytes, 3 * 4096, "{run:?}");
    }

    #[test]
    fn munmap_hole_and_errors_name_the_line() {
        if !can_run() {
            return;
        }
        let t = "mmap 0x200000 0x4000 nohugepage\nw 0x200000\nmunmap 0x201000 0x1000\nw 0x202000\n";
        let run = kernel_replay(&trace::parse(t).unwrap()).unwrap();
        assert_eq!(run.faults, 2);
        assert_eq!(run.rss_bytes, 2 * 4096);
        let t = "mmap 0x200000 0x4000\nw 0x200000\nmunmap 0x201000 0x1000\nw 0x201010\n";
        let e = kernel_replay(&trace::parse(t).unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("line 4: segmentation fault"), "{e}");
        let t = "mmap 0x200000 0x4000\nmmap 0x203000 0x1000\n";
        let e = kernel_replay(&trace::parse(t).unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("line 2: mmap"), "{e}");
        let e = kernel_replay(&trace::parse("r 0x5000\n").unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("line 1:"), "{e}");
    }

    #[test]
    fn addresses_keep_their_offset_in_the_pmd() {
        let ops = trace::parse("mmap 0x7f0000123000 0x3000\nw 0x7f0000125fff\n").unwrap();
        let (res, raw) = translate(&ops).unwrap();
        assert_eq!(res.base % PMD, 0);
        match raw[1].raw {
            Raw::Write(p) => assert_eq!(p as u64 % PMD, 0x125fff),
            _ => unreachable!(),
        }
        assert!(res.lo <= res.base - PMD && res.base + PMD + PMD <= res.lo + res.len);
    }

    #[test]
    fn uffd_wp_maps_order0_or_reports_clearly() {
        let t = "mmap 0x400000 0x10000 uffd-wp\nw 0x400000\nw 0x401000\n";
        match kernel_replay(&trace::parse(t).unwrap()) {
            Ok(run) => {
                assert_eq!(run.faults, 2, "{run:?}");
                assert_eq!(run.rss_bytes, 8192);
            }
            Err(e) => assert!(e.to_string().contains("userfaultfd"), "{e}"),
        }
    }
}
