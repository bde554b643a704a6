//! Errors the engine reports. Every one is bad input or a simulated
//! condition a caller can act on; none is a panic.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A trace or option that does not parse.
    Parse(String),
    /// A range that is not page aligned, empty, or outside user space.
    InvalidRange(String),
    /// mmap over an existing mapping (this simulator has no MAP_FIXED replace).
    Overlap(String),
    /// An access outside every VMA: the process would get SIGSEGV.
    Segv(u64),
    /// An access the VMA does not permit (a write to a read-only VMA, any
    /// access to a PROT_NONE one, a stack growth the kernel refuses): the
    /// process would get SIGSEGV. `what` says why.
    SegvAccess { addr: u64, what: &'static str },
    /// An option value out of its domain (unknown size, mode, policy...).
    Config(String),
    /// The simulated machine ran out of physical memory (VM_FAULT_OOM).
    Oom(u64),
    /// The kernel oracle could not run (not Linux, no permission, syscall failed).
    Oracle(String),
    /// The invariant checker found the simulated state inconsistent.
    Invariant(String),
    /// An error raised by the operation on a given trace line.
    AtLine(u32, Box<Error>),
}

impl Error {
    /// The error without its line wrapper.
    pub fn inner(&self) -> &Error {
        match self {
            Error::AtLine(_, e) => e.inner(),
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Parse(m) | Error::InvalidRange(m) | Error::Overlap(m) | Error::Config(m) => f.write_str(m),
            Error::Segv(a) => write!(f, "segmentation fault: access at {a:#x} is outside every VMA"),
            Error::SegvAccess { addr, what } => write!(f, "segmentation fault: {what} at {addr:#x}"),
            Error::Oom(a) => write!(f, "out of memory handling the fault at {a:#x} (VM_FAULT_OOM)"),
            Error::Oracle(m) => write!(f, "kernel oracle: {m}"),
            Error::Invariant(m) => write!(f, "invariant violated: {m}"),
            Error::AtLine(n, e) => write!(f, "line {n}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<anonfolio_trace::Error> for Error {
    fn from(e: anonfolio_trace::Error) -> Self {
        match e {
            anonfolio_trace::Error::Parse(m) => Error::Parse(m),
            anonfolio_trace::Error::InvalidRange(m) => Error::InvalidRange(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
