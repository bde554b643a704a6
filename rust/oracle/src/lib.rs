#![cfg(target_os = "linux")]
//! The kernel oracle: an anonfolio trace replayed on the real Linux kernel, in
//! a child process forked for it, and what the kernel reported about it.
//!
//! Why a child process: `brk` must be the kernel's own. The heap VMA that
//! `do_brk_flags` makes never merges with a VMA below `mm->start_brk`
//! (`brk` looks for the VMA to expand no lower than `start_brk`), while an
//! `mmap` of the same range merges with a compatible neighbour; so an
//! emulation by `mmap`/`mremap` gets the VMA boundaries, and with them the
//! folio orders beside the heap, wrong exactly where real programs have
//! their heap (ASLR off: right above the bss). The real `brk` moves the
//! heap of the process that calls it, which in this process would break
//! malloc; the child allocates nothing after the fork, sets
//! `mm->start_brk = mm->brk` to the trace's first `brk` address with
//! `prctl(PR_SET_MM, PR_SET_MM_MAP)` (which, unlike `PR_SET_MM_START_BRK`,
//! needs no CAP_SYS_RESOURCE) and then calls `brk(2)` for every later line.
//! The test `brk_heap_never_merges_with_the_vma_below_start_brk` checks the
//! resulting `[heap]` VMA in the child's `/proc/PID/maps`. The child also
//! takes any SIGSEGV the kernel sends: the parent reports it with the line
//! in progress.
//!
//! How a trace is placed:
//! - A `PROT_NONE` reservation (`MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE`)
//!   covers the trace's span (every address a line names; for `brk`, up to
//!   one page above the rounded-up break), rounded out to 2 MiB, plus 2 MiB
//!   on each side. Its traced part starts on a 2 MiB boundary, and a trace
//!   address `a` becomes `base + (a - align_down(lowest trace address, 2
//!   MiB))`, so every address keeps its offset inside its 2 MiB page (and so
//!   its PMD and folio alignment). The reservation is made before the fork;
//!   nothing else maps in the child, so the holes the trace makes stay holes.
//! - `mmap` is `mmap(MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS|flags, prot)` over
//!   the reservation (`prot=`: PROT_READ|PROT_WRITE, PROT_READ, PROT_NONE;
//!   flags: `populate` MAP_POPULATE, `growsdown` MAP_GROWSDOWN, `noreserve`
//!   MAP_NORESERVE, `stack` MAP_STACK), then `madvise(MADV_HUGEPAGE/
//!   MADV_NOHUGEPAGE)` if flagged (after MAP_POPULATE has faulted, as a
//!   program's advice would come), then, for `uffd-wp`, `UFFDIO_REGISTER` in
//!   write-protect mode on a userfaultfd the child opens.
//! - `munmap` is a real `munmap`: it leaves a hole inside the reservation's
//!   span, as the kernel examples did.
//! - `mprotect` is `mprotect(2)`; `mremap` is `mremap(2)` in place (no
//!   flags) when the addresses are equal, else `MREMAP_MAYMOVE|MREMAP_FIXED`.
//! - `madvise` is `madvise(2)` with the named advice. A range that is partly
//!   unmapped gets `ENOMEM` from the kernel after the advice was applied to
//!   the mapped part; that is not an error here.
//! - `w` is a volatile one-byte write, `r` a volatile one-byte read.
//! - Threads: the lines of every thread (`@T`) run on the child's one
//!   thread, in the order of the trace file (a serial interleaving, which
//!   keeps every VMA operation a barrier). The kernel oracle has no
//!   concurrency.
//!
//! The reservation is a VMA where the trace has empty address space, so the
//! oracle's picture of the trace's VMAs (module `picture`) decides, before
//! anything runs, how each line reaches the kernel:
//! - where the trace grows into space it never mapped (a `brk` that grows
//!   the heap, an access below a `growsdown` VMA, an `mremap` that grows in
//!   place), the reservation of the whole gap grown into is unmapped first
//!   (from the old end to the next mapping, or the end of the span; below a
//!   stack, from the mapping below, or the start of the span);
//! - a `madvise` over holes is given to the covered runs only
//!   (`MADV_POPULATE_*`: up to the first hole, where the kernel stops), a
//!   same-size `mremap` move is made one run of VMAs at a time (the kernel
//!   moves every VMA of the range and leaves the holes);
//! - what the kernel would refuse in the trace's address space and would not
//!   here is reported with its line: an `mprotect` that is not all mapped
//!   (ENOMEM), an `mremap` whose old address is not mapped (EFAULT);
//! - an access the kernel answers with SIGSEGV is reported with its line
//!   without running anything: outside every VMA, a write to a read-only
//!   VMA, any access to a PROT_NONE one; below a growsdown VMA the kernel
//!   decides (stack guard gap, RLIMIT_STACK) and the parent reports the
//!   child's SIGSEGV with its line.
//!
//! A VMA operation the kernel refuses while replaying (mmap, munmap,
//! mprotect, mremap, madvise other than ENOMEM, or a `brk` that leaves the
//! break where it was) stops the replay: its line and errno are reported.
//!
//! What is measured:
//! - `faults`: minor faults of the child's thread (`getrusage(RUSAGE_THREAD)`),
//!   across the loop, less the harness overhead measured by running the same
//!   loop with no operations. A warm-up replay of a small synthetic trace that
//!   uses every operation runs first in the child, so the loop's code, stack
//!   and data pages are present there (after a fork, the first write to each
//!   inherited page is a copy-on-write fault). Faults taken inside system
//!   calls through GUP (MAP_POPULATE, MADV_POPULATE_*) are counted as the
//!   kernel counts them: in the task's `min_flt`.
//! - `rss_bytes`: the sum of `Rss:` in the child's `/proc/PID/smaps` over the
//!   mappings inside the reservation, read by the parent after the loop,
//!   while the child is stopped, before anything is unmapped.
//!   [`kernel_replay_inspect`] lets a caller read more of the stopped child
//!   (its maps, its pagemap).
//! - `mthp`: deltas across the loop of `hugepages-*/stats/*`; the gauges
//!   `nr_anon` and `nr_anon_partially_mapped` too, read before the final unmap.
//!   These counters are system-wide: other processes faulting large folios at
//!   the same time show up here.
//! - `vmstat`: deltas of `/proc/vmstat` THP counters (also system-wide).
//! - `elapsed_s`: wall seconds of the loop.
//!
//! The loop itself does not allocate: operations are translated into a
//! flat array before the fork, and what the child reports is written into
//! memory it shares with the parent.
use anonfolio_trace::{Advice, Op, OpKind, Prot};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

mod picture;
use picture::Call;

/// What can stop a kernel replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The kernel or the host refused something (a syscall, a file, no Linux).
    Oracle(String),
    /// The trace maps over an existing mapping.
    Overlap(String),
    /// The trace accesses memory outside every VMA it made (SIGSEGV).
    Segv(u64),
    /// An access the kernel answers with SIGSEGV inside a VMA (its
    /// protection forbids it), or one it answered so while replaying.
    SegvAccess { addr: u64, write: bool, why: &'static str },
    /// A VMA operation of the trace that the kernel refused (errno named).
    Refused(String),
    /// The trace does not parse.
    Trace(anonfolio_trace::Error),
    /// An error raised by the operation on a given trace line.
    AtLine(u32, Box<Error>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Oracle(m) => write!(f, "kernel oracle: {m}"),
            Error::Overlap(m) | Error::Refused(m) => f.write_str(m),
            Error::Segv(a) => write!(f, "segmentation fault: access at {a:#x} is outside every VMA"),
            Error::SegvAccess { addr, write, why } => {
                write!(f, "segmentation fault: {} at {addr:#x}: {why}", if *write { "write" } else { "read" })
            }
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

/// Opens a userfaultfd and does the `UFFDIO_API` handshake. It allocates
/// nothing, as it runs in the replaying child: on failure it returns what
/// failed last and its errno.
fn open_uffd() -> std::result::Result<libc::c_int, (&'static str, i32)> {
    let mut failed = ("userfaultfd()", 0);
    for flags in [libc::O_CLOEXEC | UFFD_USER_MODE_ONLY, libc::O_CLOEXEC] {
        // SAFETY: plain syscall with integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            return uffd_handshake(r as libc::c_int);
        }
        failed = ("userfaultfd()", errno());
    }
    let path = b"/dev/userfaultfd\0";
    // SAFETY: NUL-terminated path.
    let dev = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(if errno() == libc::ENOENT { failed } else { ("open /dev/userfaultfd", errno()) });
    }
    // SAFETY: ioctl on the device we just opened.
    let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC) };
    let e = errno();
    // SAFETY: closing our own fd.
    unsafe { libc::close(dev) };
    if fd < 0 {
        return Err(("/dev/userfaultfd USERFAULTFD_IOC_NEW", e));
    }
    uffd_handshake(fd)
}

fn uffd_handshake(fd: libc::c_int) -> std::result::Result<libc::c_int, (&'static str, i32)> {
    let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: `api` is a valid uffdio_api for the duration of the call.
    let r = unsafe { libc::ioctl(fd, UFFDIO_API as _, &mut api as *mut UffdioApi) };
    if r < 0 {
        let e = errno();
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        return Err(("UFFDIO_API", e));
    }
    Ok(fd)
}

/// The symbolic name of the errnos VMA operations return.
fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EINVAL => "EINVAL",
        libc::EEXIST => "EEXIST",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EAGAIN => "EAGAIN",
        libc::EBUSY => "EBUSY",
        libc::ENOSPC => "ENOSPC",
        libc::ENOENT => "ENOENT",
        libc::ENOSYS => "ENOSYS",
        _ => "errno",
    }
}

fn errno_text(e: i32) -> String {
    format!("{} ({})", errno_name(e), strerror(e))
}

// ---------------------------------------------------------------------------
// The trace as the loop sees it

const PR_SET_MM: libc::c_int = 35;
const PR_SET_MM_MAP: libc::c_ulong = 14;

/// `struct prctl_mm_map` (include/uapi/linux/prctl.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}

impl PrctlMmMap {
    /// This process's mm fields, from `/proc/self/stat` (a fork inherits them).
    fn current() -> Result<PrctlMmMap> {
        let text = std::fs::read_to_string("/proc/self/stat")
            .map_err(|e| Error::Oracle(format!("cannot read /proc/self/stat: {e}")))?;
        // Field 3 (the state) follows the command's closing parenthesis.
        let rest = text.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest.split_whitespace().map(|t| t.parse().unwrap_or(0)).collect();
        let at = |n: usize| f.get(n - 3).copied().unwrap_or(0);
        if f.len() < 49 {
            return Err(Error::Oracle("/proc/self/stat has too few fields for the mm's bounds".into()));
        }
        Ok(PrctlMmMap {
            start_code: at(26),
            end_code: at(27),
            start_stack: at(28),
            start_data: at(45),
            end_data: at(46),
            start_brk: at(47),
            brk: at(47),
            arg_start: at(48),
            arg_end: at(49),
            env_start: at(50),
            env_end: at(51),
            auxv: 0,
            auxv_size: 0,
            exe_fd: u32::MAX,
        })
    }
}

/// `mm->start_brk = mm->brk = p` by `prctl(PR_SET_MM, PR_SET_MM_MAP)`,
/// which needs no capability (unlike the single-field `PR_SET_MM_*`:
/// CAP_SYS_RESOURCE). Returns the errno on failure.
///
/// # Safety
/// The process must not use its own heap (glibc's malloc would extend it
/// at the new break): only the replaying child calls this.
unsafe fn set_start_brk(base: &PrctlMmMap, p: *mut u8) -> i32 {
    let map = PrctlMmMap { start_brk: p as u64, brk: p as u64, ..*base };
    // SAFETY: `map` is a valid prctl_mm_map for the duration of the call;
    // it changes only the mm's recorded bounds.
    let r = unsafe {
        libc::prctl(
            PR_SET_MM,
            PR_SET_MM_MAP,
            &map as *const PrctlMmMap as libc::c_ulong,
            std::mem::size_of::<PrctlMmMap>() as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == 0 {
        0
    } else {
        errno()
    }
}

#[derive(Clone, Copy, Debug)]
enum Raw {
    /// `prot`/`flags` are mmap's (`flags` besides MAP_FIXED|MAP_PRIVATE|
    /// MAP_ANONYMOUS); `advice` is 0 or a MADV_* value applied after it.
    Mmap {
        p: *mut u8,
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        advice: libc::c_int,
        uffd_wp: bool,
    },
    Munmap {
        p: *mut u8,
        len: usize,
    },
    /// A piece of the reservation unmapped where the trace grows into
    /// space it never mapped (see the `picture` module).
    Unreserve {
        p: *mut u8,
        len: usize,
    },
    Madvise {
        p: *mut u8,
        len: usize,
        advice: libc::c_int,
    },
    Mprotect {
        p: *mut u8,
        len: usize,
        prot: libc::c_int,
    },
    /// In place when `new == old` (no flags: grow or shrink there, or
    /// fail), else `MREMAP_MAYMOVE|MREMAP_FIXED` to `new`.
    Mremap {
        old: *mut u8,
        old_len: usize,
        new: *mut u8,
        new_len: usize,
    },
    /// The first `brk` of a trace: `mm->start_brk = mm->brk = p` (no VMA),
    /// the other bounds of the mm as `mm` has them.
    StartBrk {
        p: *mut u8,
        mm: *const PrctlMmMap,
    },
    /// `brk(p)`; the kernel must return `p`.
    Brk(*mut u8),
    Write(*mut u8),
    Read(*const u8),
}

#[derive(Clone, Copy, Debug)]
struct RawOp {
    line: u32,
    raw: Raw,
}

/// What went wrong inside the loop (no allocation there). `errno` 0: the
/// call does not set errno (brk).
#[derive(Clone, Copy, Debug)]
struct LoopError {
    line: u32,
    what: &'static str,
    errno: i32,
}

impl LoopError {
    fn into_error(self) -> Error {
        let e = if self.errno == 0 {
            Error::Refused(self.what.to_string())
        } else if matches!(self.what, "mmap" | "munmap" | "mprotect" | "mremap" | "madvise") {
            Error::Refused(format!("{} refused by the kernel: {}", self.what, errno_text(self.errno)))
        } else {
            Error::Oracle(format!("{} failed: {}", self.what, errno_text(self.errno)))
        };
        Error::AtLine(self.line, Box::new(e))
    }
}

/// The bare replay loop. Returns the first error, if any. `line` shows the
/// line in progress, so that a signal the kernel sends can be placed.
///
/// # Safety
/// Every pointer in `ops` must lie inside a reservation this process owns
/// and that nothing else uses, and every access must fall inside a mapping
/// an earlier op of `ops` made or let grow (what `translate` ensures); `brk`
/// operations need a process that does not use its own heap.
#[inline(never)]
unsafe fn run_ops(ops: &[RawOp], uffd: libc::c_int, line: &AtomicU32) -> Option<LoopError> {
    for op in ops {
        line.store(op.line, Ordering::Relaxed);
        let fail = |what| Some(LoopError { line: op.line, what, errno: errno() });
        // SAFETY: by the contract above, every VMA operation covers only
        // the reservation, and every access hits a live mapping.
        unsafe {
            match op.raw {
                Raw::Write(p) => std::ptr::write_volatile(p, 1u8),
                Raw::Read(p) => {
                    std::ptr::read_volatile(p);
                }
                Raw::Mmap { p, len, prot, flags, advice, uffd_wp } => {
                    let r = libc::mmap(
                        p.cast(),
                        len,
                        prot,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                        -1,
                        0,
                    );
                    if r != p.cast() {
                        return fail("mmap");
                    }
                    if advice != 0 && libc::madvise(p.cast(), len, advice) != 0 {
                        return fail("madvise after mmap");
                    }
                    if uffd_wp {
                        let mut reg = UffdioRegister {
                            start: p as u64,
                            len: len as u64,
                            mode: UFFDIO_REGISTER_MODE_WP,
                            ioctls: 0,
                        };
                        if libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister) != 0 {
                            return fail("UFFDIO_REGISTER (write-protect mode)");
                        }
                    }
                }
                Raw::Munmap { p, len } => {
                    if libc::munmap(p.cast(), len) != 0 {
                        return fail("munmap");
                    }
                }
                Raw::Unreserve { p, len } => {
                    if libc::munmap(p.cast(), len) != 0 {
                        return fail("munmap of the reservation");
                    }
                }
                Raw::Madvise { p, len, advice } => {
                    if libc::madvise(p.cast(), len, advice) != 0 {
                        // ENOMEM: part of the range is not mapped; the
                        // mapped part was advised all the same.
                        if errno() != libc::ENOMEM {
                            return fail("madvise");
                        }
                    }
                }
                Raw::Mprotect { p, len, prot } => {
                    if libc::mprotect(p.cast(), len, prot) != 0 {
                        return fail("mprotect");
                    }
                }
                Raw::Mremap { old, old_len, new, new_len } => {
                    let r = if new == old {
                        libc::mremap(old.cast(), old_len, new_len, 0)
                    } else {
                        libc::mremap(old.cast(), old_len, new_len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, new)
                    };
                    if r != new.cast() {
                        return fail("mremap");
                    }
                }
                Raw::StartBrk { p, mm } => {
                    let e = set_start_brk(&*mm, p);
                    if e != 0 {
                        return Some(LoopError {
                            line: op.line,
                            what: "prctl(PR_SET_MM_MAP) setting the heap's start",
                            errno: e,
                        });
                    }
                }
                Raw::Brk(p) => {
                    if libc::syscall(libc::SYS_brk, p) as usize != p as usize {
                        return Some(LoopError {
                            line: op.line,
                            what: "brk refused by the kernel: the break did not move (below the heap's start, \
                                   or a mapping within a page above the new break)",
                            errno: 0,
                        });
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
unsafe fn measured(ops: &[RawOp], uffd: libc::c_int, line: &AtomicU32) -> (u64, f64, Option<LoopError>) {
    let f0 = thread_minflt();
    let t0 = Instant::now();
    // SAFETY: the caller's contract is run_ops's.
    let err = unsafe { run_ops(ops, uffd, line) };
    let el = t0.elapsed().as_secs_f64();
    let f1 = thread_minflt();
    (f1.wrapping_sub(f0), el, err)
}

// ---------------------------------------------------------------------------
// The trace's span

fn page_up(a: u64) -> u64 {
    a.div_ceil(PAGE) * PAGE
}

fn op_range(k: &OpKind) -> (u64, u64) {
    match *k {
        OpKind::Mmap { addr, len, .. } | OpKind::Munmap { addr, len } | OpKind::Madvise { addr, len, .. } => {
            (addr, addr + len)
        }
        OpKind::Mprotect { addr, len, .. } => (addr, addr + len),
        OpKind::Mremap { old_addr, old_len, new_addr, new_len } => {
            (old_addr.min(new_addr), (old_addr + old_len).max(new_addr + new_len))
        }
        // The heap needs a free page above the rounded-up break.
        OpKind::Brk { addr } => (addr, page_up(addr) + PAGE),
        OpKind::Write { addr } | OpKind::Read { addr } => (addr, addr + 1),
    }
}

// ---------------------------------------------------------------------------
// The reservation

struct Reservation {
    /// Start and length of what is reserved (including the guard margins).
    lo: u64,
    len: u64,
    /// Where the 2 MiB-aligned trace base maps.
    base: u64,
    /// The trace address that maps to `base`.
    alo: u64,
    /// The mm's bounds for the first `brk` (`Raw::StartBrk` points here).
    mm: Box<PrctlMmMap>,
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
        Ok(Reservation { lo, len: hi - lo, base, alo: 0, mm: Box::default() })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the whole range was ours; unmapping holes is harmless.
        unsafe { libc::munmap(self.lo as *mut _, self.len as usize) };
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

fn prot_value(p: Prot) -> libc::c_int {
    match p {
        Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        Prot::Read => libc::PROT_READ,
        Prot::None => libc::PROT_NONE,
    }
}

/// Translates the trace into loop operations inside a fresh reservation,
/// after running the oracle's picture of it ([`picture::check`]): an access
/// the kernel would refuse is reported here, with its line, before
/// anything runs.
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
    let punches = picture::check(ops, alo, ahi, alo.saturating_sub(PMD), ahi + PMD)?;
    let mut res = Reservation::new(ahi - alo)?;
    res.alo = alo;
    if ops.iter().any(|op| matches!(op.kind, OpKind::Brk { .. })) {
        *res.mm = PrctlMmMap::current()?;
    }
    let tr = |a: u64| (res.base + (a - alo)) as *mut u8;
    let mut raw = Vec::with_capacity(ops.len() + punches.len());
    let mut punches = punches.into_iter().peekable();
    let mut brk_started = false;
    for (i, op) in ops.iter().enumerate() {
        let mut replaced = false;
        while let Some(pu) = punches.next_if(|pu| pu.op == i) {
            let size = |s: u64, e: u64| (e - s) as usize;
            let r = match (pu.call, op.kind) {
                (Call::Unreserve { start, end }, _) => Raw::Unreserve { p: tr(start), len: size(start, end) },
                (Call::Madvise { start, end }, OpKind::Madvise { advice, .. }) => {
                    Raw::Madvise { p: tr(start), len: size(start, end), advice: advice_value(advice) }
                }
                (Call::Move { start, end, delta }, _) => Raw::Mremap {
                    old: tr(start),
                    old_len: size(start, end),
                    new: tr(start.wrapping_add(delta)),
                    new_len: size(start, end),
                },
                (Call::Skip, _) => {
                    replaced = true;
                    continue;
                }
                (Call::Madvise { .. }, k) => unreachable!("a madvise call for {k:?}"),
            };
            replaced |= !matches!(pu.call, Call::Unreserve { .. });
            raw.push(RawOp { line: op.line, raw: r });
        }
        if replaced {
            continue;
        }
        let r = match op.kind {
            OpKind::Mmap { addr, len, flags } => Raw::Mmap {
                p: tr(addr),
                len: len as usize,
                prot: prot_value(flags.prot),
                flags: if flags.populate { libc::MAP_POPULATE } else { 0 }
                    | if flags.growsdown { libc::MAP_GROWSDOWN } else { 0 }
                    | if flags.noreserve { libc::MAP_NORESERVE } else { 0 }
                    | if flags.stack { libc::MAP_STACK } else { 0 },
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
            OpKind::Mprotect { addr, len, prot } => {
                Raw::Mprotect { p: tr(addr), len: len as usize, prot: prot_value(prot) }
            }
            OpKind::Mremap { old_addr, old_len, new_addr, new_len } => Raw::Mremap {
                old: tr(old_addr),
                old_len: old_len as usize,
                new: tr(new_addr),
                new_len: new_len as usize,
            },
            OpKind::Brk { addr } if !brk_started => {
                brk_started = true;
                Raw::StartBrk { p: tr(addr), mm: &*res.mm }
            }
            OpKind::Brk { addr } => Raw::Brk(tr(addr)),
            OpKind::Write { addr } => Raw::Write(tr(addr)),
            OpKind::Read { addr } => Raw::Read(tr(addr)),
        };
        raw.push(RawOp { line: op.line, raw: r });
    }
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

    /// The length of a snapshot: the file values in `Probe::files` order,
    /// then `Probe::vmstat`.
    fn snap_len(&self) -> usize {
        self.files.len() + self.vmstat.len()
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

    /// Fills `out` ([`Probe::snap_len`] long) without allocating.
    fn read(&mut self, out: &mut [i64]) {
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

    fn deltas(&self, before: &[i64], after: &[i64]) -> (MthpDeltas, Vec<(&'static str, i64)>) {
        let mut mthp: MthpDeltas = self.sizes.iter().map(|s| (s.clone(), Vec::new())).collect();
        for (k, &(i, c, _)) in self.files.iter().enumerate() {
            mthp[i].1.push((c, after[k] - before[k]));
        }
        let base = self.files.len();
        let vm = self.vmstat.iter().enumerate().map(|(j, &c)| (c, after[base + j] - before[base + j])).collect();
        (mthp, vm)
    }
}

/// (Rss, AnonHugePages) in bytes over the smaps entries of process `pid`
/// inside [lo, hi).
fn smaps_rss(pid: libc::pid_t, lo: u64, hi: u64) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Oracle(format!("cannot read {path}: {e}")))?;
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
// The replaying child
//
// The replay runs in a child process forked for it: the real `brk` moves
// the heap of the process that calls it (glibc's malloc in this one would
// then extend the wrong break), and a SIGSEGV the kernel sends kills only
// the child. The child allocates nothing (fork() of a threaded process, and
// a moved break): everything it runs was translated beforehand, and what it
// reports goes into memory shared with the parent.

/// The child's report, at the start of the shared mapping.
#[repr(C)]
struct Report {
    /// The trace line in progress.
    line: AtomicU32,
    state: u32,
    faults: u64,
    harness: u64,
    elapsed: f64,
    err: Option<LoopError>,
    uffd_err: Option<(&'static str, i32)>,
}

const CHILD_DONE: u32 = 1;
const CHILD_NO_UFFD: u32 = 2;
const CHILD_WARM_UP_FAILED: u32 = 3;
const EXIT_SIGSEGV: i32 = 0x5e;
const EXIT_SIGBUS: i32 = 0x5f;

/// A `MAP_SHARED` anonymous mapping: the [`Report`], then two snapshots of
/// `n` counters each.
struct Shared {
    p: *mut u8,
    len: usize,
    n: usize,
}

impl Shared {
    fn new(n: usize) -> Result<Shared> {
        let len = (std::mem::size_of::<Report>() + 16 + 2 * n * 8).div_ceil(PAGE as usize) * PAGE as usize;
        // SAFETY: a fresh shared anonymous mapping; nothing is overwritten.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Oracle(format!("cannot map memory to share with the child: {}", errno_text(errno()))));
        }
        let s = Shared { p: p.cast(), len, n };
        // SAFETY: the mapping is at least size_of::<Report>() bytes, page
        // aligned, and not yet shared with anyone.
        unsafe {
            s.report().write(Report {
                line: AtomicU32::new(0),
                state: 0,
                faults: 0,
                harness: 0,
                elapsed: 0.0,
                err: None,
                uffd_err: None,
            })
        };
        Ok(s)
    }

    fn report(&self) -> *mut Report {
        self.p.cast()
    }

    /// The two snapshots (before and after the loop).
    fn snaps(&self) -> (*mut i64, *mut i64) {
        let off = std::mem::size_of::<Report>().div_ceil(8) * 8;
        // SAFETY: both arrays lie inside the mapping (see `new`'s length).
        unsafe { (self.p.add(off).cast(), self.p.add(off + self.n * 8).cast()) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the child, if any, is gone.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

extern "C" fn on_sigsegv(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(EXIT_SIGSEGV) }
}

extern "C" fn on_sigbus(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(EXIT_SIGBUS) }
}

/// The child's whole life: warm up, measure the harness, snapshot, replay,
/// snapshot, then stop itself (SIGSTOP) so that the parent can read its
/// `/proc/PID/smaps` before killing it.
///
/// # Safety
/// Only in the child of `fork()`, with `warm` and `ops` from `translate`
/// (their reservations alive) and `sh` mapped shared before the fork.
unsafe fn child_main(sh: &Shared, warm: &[RawOp], ops: &[RawOp], probe: &mut Probe, needs_uffd: bool) -> ! {
    // SAFETY: per the contract: the child's own copy of everything, the
    // shared report mapped before the fork; nothing here allocates.
    unsafe {
        // Our handlers, not whatever the host installed (Python's
        // faulthandler, Rust's stack-overflow handler): no core dumps, no
        // output, just the signal's name in the exit status.
        libc::signal(libc::SIGSEGV, on_sigsegv as *const () as libc::sighandler_t);
        libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
        let rep = sh.report();
        let line = &(*rep).line;
        let mut uffd = -1;
        if needs_uffd {
            match open_uffd() {
                Ok(fd) => uffd = fd,
                Err(e) => {
                    (*rep).uffd_err = Some(e);
                    (*rep).state = CHILD_NO_UFFD;
                    libc::_exit(1);
                }
            }
        }
        // The loop's code, stack and the syscall paths, in this process.
        if let (_, _, Some(e)) = measured(warm, uffd, line) {
            (*rep).err = Some(e);
            (*rep).state = CHILD_WARM_UP_FAILED;
            libc::_exit(1);
        }
        (*rep).harness = (0..5).map(|_| measured(&[], -1, line).0).min().unwrap_or(0);
        let (a, b) = sh.snaps();
        let s0 = std::slice::from_raw_parts_mut(a, sh.n);
        let s1 = std::slice::from_raw_parts_mut(b, sh.n);
        // Warm the probe too (page cache, sysfs attribute buffers, its buffer).
        probe.read(s0);
        probe.read(s1);
        probe.read(s0);
        let (faults, elapsed, err) = measured(ops, uffd, line);
        probe.read(s1);
        (*rep).faults = faults;
        (*rep).elapsed = elapsed;
        (*rep).err = err;
        (*rep).state = CHILD_DONE;
        libc::raise(libc::SIGSTOP);
        libc::_exit(0)
    }
}

/// How the child ended.
enum ChildEnd<T> {
    /// It ran the loop (`err` says whether to its end) and stopped; `seen`
    /// is what the parent read of it then.
    Ran { faults: u64, harness: u64, elapsed: f64, err: Option<LoopError>, seen: T },
    /// The kernel sent it SIGSEGV (or SIGBUS) at this line.
    Signal { line: u32, sig: &'static str },
}

fn waitpid(pid: libc::pid_t, flags: libc::c_int) -> Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child; `status` is writable.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Ok(status);
        }
        if errno() != libc::EINTR {
            return Err(Error::Oracle(format!("waitpid of the replaying child: {}", errno_text(errno()))));
        }
    }
}

/// Forks the replaying child, waits for it to stop, calls `at_end` with its
/// pid while it is stopped (its mappings intact), then kills it.
fn run_in_child<T>(
    warm: &[RawOp],
    ops: &[RawOp],
    probe: &mut Probe,
    needs_uffd: bool,
    at_end: impl FnOnce(libc::pid_t) -> Result<T>,
) -> Result<(ChildEnd<T>, Vec<i64>, Vec<i64>)> {
    let sh = Shared::new(probe.snap_len())?;
    // SAFETY: the child runs only `child_main`, which allocates nothing and
    // ends in _exit; the parent continues as usual.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Oracle(format!("cannot fork the replaying child: {}", errno_text(errno()))));
    }
    if pid == 0 {
        // SAFETY: we are the child; `warm`, `ops` and `sh` were made before the fork.
        unsafe { child_main(&sh, warm, ops, probe, needs_uffd) }
    }
    let status = waitpid(pid, libc::WUNTRACED)?;
    // SAFETY: the child stopped or ended: it writes the report no more.
    let rep = unsafe { &*sh.report() };
    let snaps = || {
        let (a, b) = sh.snaps();
        // SAFETY: both arrays of `sh.n` counters lie inside the mapping.
        unsafe { (std::slice::from_raw_parts(a, sh.n).to_vec(), std::slice::from_raw_parts(b, sh.n).to_vec()) }
    };
    if libc::WIFSTOPPED(status) {
        let seen = at_end(pid);
        // SAFETY: our own stopped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        waitpid(pid, 0)?;
        let seen = seen?;
        if rep.state != CHILD_DONE {
            return Err(Error::Oracle("the replaying child stopped before the end of the replay".into()));
        }
        let (s0, s1) = snaps();
        let end = ChildEnd::Ran { faults: rep.faults, harness: rep.harness, elapsed: rep.elapsed, err: rep.err, seen };
        return Ok((end, s0, s1));
    }
    let line = rep.line.load(Ordering::Relaxed);
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        if code == EXIT_SIGSEGV || code == EXIT_SIGBUS {
            let sig = if code == EXIT_SIGSEGV { "SIGSEGV" } else { "SIGBUS" };
            return Ok((ChildEnd::Signal { line, sig }, Vec::new(), Vec::new()));
        }
        match (rep.state, rep.uffd_err, rep.err) {
            (CHILD_NO_UFFD, Some((what, e)), _) => {
                return Err(Error::Oracle(format!(
                    "userfaultfd is unavailable, cannot replay uffd-wp mappings ({what}: {}); \
                     run as root or set vm.unprivileged_userfaultfd=1",
                    errno_text(e)
                )))
            }
            (CHILD_WARM_UP_FAILED, _, Some(e)) => {
                return Err(Error::Oracle(format!("warm-up replay failed at {}: {}", e.what, errno_text(e.errno))))
            }
            _ => {}
        }
        return Err(Error::Oracle(format!("the replaying child exited with status {code} at line {line}")));
    }
    let sig = if libc::WIFSIGNALED(status) { libc::WTERMSIG(status) } else { 0 };
    Err(Error::Oracle(format!("the replaying child was killed by signal {sig} at line {line}")))
}

// ---------------------------------------------------------------------------
// Warm-up

/// A small trace in its own scratch area that runs every operation once
/// (the child runs it before measuring), so that the loop's code, stack,
/// the vDSO and the syscall paths are warm in the child. Its VMAs are too
/// small for any large folio.
fn warm_up_ops(with_uffd: bool) -> Vec<Op> {
    use anonfolio_trace::{MmapFlags, Prot};
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
        OpKind::Madvise { addr: b, len: PAGE, advice: Advice::Free },
        OpKind::Madvise { addr: b, len: 2 * PAGE, advice: Advice::PopulateWrite },
        OpKind::Mprotect { addr: b, len: PAGE, prot: Prot::Read },
        OpKind::Mprotect { addr: b, len: PAGE, prot: Prot::ReadWrite },
        OpKind::Mremap { old_addr: b, old_len: 2 * PAGE, new_addr: b + 32 * PAGE, new_len: 2 * PAGE },
        OpKind::Write { addr: b + 33 * PAGE },
        OpKind::Munmap { addr: b + 32 * PAGE, len: 2 * PAGE },
        m(b + 8 * PAGE, MmapFlags { nohugepage: true, prot: Prot::Read, populate: true, ..Default::default() }),
        OpKind::Read { addr: b + 8 * PAGE },
        m(b + 16 * PAGE, MmapFlags::default()),
        OpKind::Write { addr: b + 16 * PAGE },
        OpKind::Brk { addr: b + 48 * PAGE },
        OpKind::Brk { addr: b + 49 * PAGE },
        OpKind::Write { addr: b + 48 * PAGE },
        OpKind::Brk { addr: b + 48 * PAGE },
    ];
    if with_uffd {
        kinds.push(m(b + 24 * PAGE, MmapFlags { uffd_wp: true, ..Default::default() }));
        kinds.push(OpKind::Write { addr: b + 24 * PAGE });
    }
    kinds.into_iter().enumerate().map(|(i, kind)| Op { thread: 0, line: i as u32 + 1, kind }).collect()
}

// ---------------------------------------------------------------------------

/// Replays `ops` on the running kernel, in a child process forked for it,
/// and reports what the kernel did. See the module documentation for the
/// exact procedure.
///
/// THP settings are whatever sysfs holds at the time; set them beforehand.
pub fn kernel_replay(ops: &[Op]) -> Result<KernelRun> {
    kernel_replay_inspect(ops, |_| Ok(())).map(|(run, ())| run)
}

/// The replaying child after the replay, stopped, its mappings intact.
pub struct Stopped {
    /// Its pid: `/proc/PID/{maps,smaps,pagemap}` are readable now.
    pub pid: libc::pid_t,
    base: u64,
    alo: u64,
}

impl Stopped {
    /// Where a trace address lies in the child.
    pub fn addr(&self, trace_addr: u64) -> u64 {
        self.base + (trace_addr - self.alo)
    }
}

/// [`kernel_replay`], and `inspect` called once the replay has run to its
/// end, with the child stopped (e.g. to read its `/proc/PID/pagemap` or
/// maps); its result comes back beside the run.
pub fn kernel_replay_inspect<T>(ops: &[Op], inspect: impl FnOnce(&Stopped) -> Result<T>) -> Result<(KernelRun, T)> {
    let needs_uffd = ops.iter().any(|op| matches!(op.kind, OpKind::Mmap { flags, .. } if flags.uffd_wp));
    let (res, raw) = translate(ops)?;
    let (warm_res, warm) = translate(&warm_up_ops(needs_uffd))?;
    let release = kernel_release();
    let mut probe = Probe::new();
    let (lo, hi) = (res.lo, res.lo + res.len);
    let (base, alo) = (res.base, res.alo);
    let (end, s0, s1) = run_in_child(&warm, &raw, &mut probe, needs_uffd, |pid| {
        Ok((smaps_rss(pid, lo, hi)?, inspect(&Stopped { pid, base, alo })?))
    })?;
    drop(warm_res);
    drop(res);
    let (faults, harness, elapsed_s, err, ((rss_bytes, anon_huge_bytes), seen)) = match end {
        ChildEnd::Ran { faults, harness, elapsed, err, seen } => (faults, harness, elapsed, err, seen),
        ChildEnd::Signal { line, sig } => {
            let (addr, write) = ops
                .iter()
                .find(|o| o.line == line)
                .map(|o| match o.kind {
                    OpKind::Write { addr } => (addr, true),
                    OpKind::Read { addr } => (addr, false),
                    _ => (0, false),
                })
                .unwrap_or((0, false));
            let why = if sig == "SIGSEGV" {
                "the kernel answered it with SIGSEGV (a stack that cannot grow there, or a protection)"
            } else {
                "the kernel answered it with SIGBUS"
            };
            return Err(Error::AtLine(line, Box::new(Error::SegvAccess { addr, write, why })));
        }
    };
    if let Some(e) = err {
        return Err(e.into_error());
    }
    let (mthp, vmstat) = probe.deltas(&s0, &s1);
    let run = KernelRun {
        faults: faults.saturating_sub(harness),
        rss_bytes,
        anon_huge_bytes,
        elapsed_s,
        mthp,
        vmstat,
        kernel_release: release,
        harness_faults: harness,
    };
    Ok((run, seen))
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

    fn kernel(t: &str) -> Result<KernelRun> {
        kernel_replay(&trace::parse(t).unwrap())
    }

    fn writes(base: u64, pages: u64) -> String {
        (0..pages).map(|i| format!("w {:#x}\n", base + i * PAGE)).collect()
    }

    #[test]
    fn mprotect_read_only_write_is_a_segfault_naming_its_line() {
        let t = "mmap 0x400000 0x4000 nohugepage\nw 0x400000\nmprotect 0x400000 0x1000 r\nr 0x400000\nw 0x400008\n";
        let e = kernel(t).unwrap_err();
        assert_eq!(e.to_string(), "line 5: segmentation fault: write at 0x400008: a write to a read-only VMA");
        let e = kernel("mmap 0x400000 0x4000 nohugepage prot=none\nr 0x401000\n").unwrap_err().to_string();
        assert!(e.starts_with("line 2: segmentation fault: read at 0x401000"), "{e}");
    }

    #[test]
    fn mprotect_runs_on_the_kernel_zero_page_then_write_copies() {
        // A read of a read-only mapping maps the zero page (1 fault, no
        // Rss); after mprotect(rw) the write is a wp fault that copies it.
        let t = "mmap 0x400000 0x2000 nohugepage prot=r\nr 0x400000\nmprotect 0x400000 0x2000 rw\nw 0x400000\n";
        let run = kernel(t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (2, 4096), "{run:?}");
        // mprotect(r) then (rw) of an exclusive page keeps it writable: no fault.
        let t = "mmap 0x400000 0x2000 nohugepage\nw 0x400000\nmprotect 0x400000 0x2000 r\nr 0x400000\n\
                 mprotect 0x400000 0x2000 rw\nw 0x400000\n";
        assert_eq!(kernel(t).unwrap().faults, 1);
        let e = kernel("mmap 0x400000 0x2000\nmprotect 0x400000 0x3000 r\n").unwrap_err().to_string();
        assert!(e.starts_with("line 2: mprotect refused by the kernel: ENOMEM"), "{e}");
    }

    #[test]
    fn mremap_move_carries_the_pages_without_refaulting() {
        let mut t = String::from("mmap 0x400000 0x8000 nohugepage\n");
        t += &writes(0x400000, 8);
        t += "mremap 0x400000 0x8000 0x600000 0x8000\n";
        t += &writes(0x600000, 8);
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (8, 0x8000), "{run:?}");
        let e = kernel(&format!("{t}w 0x400000\n")).unwrap_err().to_string();
        assert!(e.starts_with("line 19: segmentation fault: access at 0x400000 is outside every VMA"), "{e}");
        let e = kernel("mmap 0x400000 0x2000\nmremap 0x500000 0x2000 0x600000 0x2000\n").unwrap_err().to_string();
        assert!(e.starts_with("line 2: mremap refused by the kernel: EFAULT"), "{e}");
    }

    #[test]
    fn mremap_grows_in_place_into_the_space_above() {
        // The reservation above the VMA is unmapped first (else ENOMEM).
        let mut t = String::from("mmap 0x400000 0x4000 nohugepage\n");
        t += &writes(0x400000, 4);
        t += "mremap 0x400000 0x4000 0x400000 0x8000\n";
        t += &writes(0x400000, 8);
        t += "mremap 0x400000 0x8000 0x400000 0x3000\n";
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (8, 0x3000), "{run:?}");
    }

    #[test]
    fn brk_heap_never_merges_with_the_vma_below_start_brk() {
        // A plain rw VMA right below start_brk: the heap brk makes stays a
        // VMA of its own (do_brk_flags looks no lower than start_brk), where
        // an mmap of the same range would have merged with it.
        let t = "mmap 0x7f00000f0000 0x10000\nbrk 0x7f0000100000\nbrk 0x7f0000105010\n";
        let (_, maps) = kernel_replay_inspect(&trace::parse(t).unwrap(), |s| {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.pid)).unwrap();
            let heap = format!("{:x}-{:x} rw-p", s.addr(0x7f0000100000), s.addr(0x7f0000106000));
            let below = format!("{:x}-{:x} rw-p", s.addr(0x7f00000f0000), s.addr(0x7f0000100000));
            Ok((maps.lines().find(|l| l.starts_with(&heap)).map(str::to_string), maps.contains(&below)))
        })
        .unwrap();
        assert!(maps.0.as_deref().is_some_and(|l| l.ends_with("[heap]")), "{maps:?}");
        assert!(maps.1, "the VMA below the heap stays apart: {maps:?}");
    }

    #[test]
    fn brk_growth_faults_per_page_and_a_shrink_unmaps() {
        let mut t = String::from("brk 0x7f0000100000\nbrk 0x7f0000105010\nmadvise 0x7f0000100000 0x6000 nohugepage\n");
        t += &writes(0x7f0000100000, 6);
        t += "brk 0x7f0000101001\nw 0x7f0000101fff\n";
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (6, 2 * 4096), "{run:?}");
        let e = kernel(&format!("{t}w 0x7f0000102000\n")).unwrap_err().to_string();
        assert!(e.starts_with("line 12: segmentation fault: access at 0x7f0000102000"), "{e}");
        let e = kernel("brk 0x500000\nbrk 0x4ff000\n").unwrap_err().to_string();
        assert!(e.starts_with("line 2: brk refused by the kernel"), "{e}");
    }

    #[test]
    fn madvise_free_keeps_pages_mapped_for_a_later_write() {
        let mut t = String::from("mmap 0x400000 0x4000 nohugepage\n");
        t += &writes(0x400000, 4);
        t += "madvise 0x400000 0x4000 free\n";
        t += &writes(0x400000, 4);
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (4, 0x4000), "{run:?}");
        t += "madvise 0x400000 0x4000 dontfork\nmadvise 0x400000 0x4000 dofork\n";
        assert_eq!(kernel(&t).unwrap().faults, 4);
    }

    #[test]
    fn populate_faults_count_as_the_kernel_counts_them() {
        let mut t = String::from("mmap 0x400000 0x4000 nohugepage\nmadvise 0x400000 0x4000 populate_write\n");
        t += &writes(0x400000, 4);
        assert_eq!(kernel(&t).unwrap().faults, 4);
        // populate_read maps zero pages: the writes then copy each one.
        let mut t = String::from("mmap 0x400000 0x4000 nohugepage\nmadvise 0x400000 0x4000 populate_read\n");
        t += &writes(0x400000, 4);
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (8, 0x4000), "{run:?}");
        let run = kernel("mmap 0x400000 0x4000 populate noreserve stack\nw 0x403000\n").unwrap();
        assert_eq!((run.faults, run.rss_bytes), (4, 0x4000), "{run:?}");
        let run = kernel("mmap 0x400000 0x4000 prot=r populate\n").unwrap();
        assert_eq!((run.faults, run.rss_bytes), (4, 0), "{run:?}");
        let e = kernel("mmap 0x400000 0x4000 prot=r\nmadvise 0x400000 0x4000 populate_write\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: madvise refused by the kernel: EINVAL"), "{e}");
    }

    #[test]
    fn growsdown_stack_grows_to_the_page_below_and_keeps_its_guard_gap() {
        let mut t = String::from("mmap 0x7f0000400000 0x4000 growsdown nohugepage\n");
        for i in 1..=4u64 {
            t += &format!("w {:#x}\n", 0x7f0000400000 - i * PAGE + 8);
        }
        let run = kernel(&t).unwrap();
        assert_eq!((run.faults, run.rss_bytes), (4, 0x4000), "{run:?}");
        // An accessible VMA below within stack_guard_gap (1 MiB by default):
        // the kernel refuses to grow the stack and sends SIGSEGV.
        let t = "mmap 0x7f0000000000 0x1000\nmmap 0x7f0000080000 0x4000 growsdown nohugepage\nw 0x7f000007f000\n";
        let e = kernel(t).unwrap_err().to_string();
        assert!(
            e.starts_with("line 3: segmentation fault: write at 0x7f000007f000: the kernel answered it with SIGSEGV"),
            "{e}"
        );
        // Below a PROT_NONE VMA there is no gap.
        let t =
            "mmap 0x7f0000000000 0x1000 prot=none\nmmap 0x7f0000080000 0x4000 growsdown nohugepage\nw 0x7f000007f000\n";
        assert_eq!(kernel(t).unwrap().faults, 1);
    }
}
