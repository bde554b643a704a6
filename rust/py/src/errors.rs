//! The exception classes of `anonfolio` and the one mapping from the core's
//! [`anonfolio::Error`] to them; plus the guard that keeps Rust panics from
//! crossing the FFI.
//!
//! The classes are made once, when the module is imported, with
//! `type(name, bases, dict)` so that they can have two bases
//! (`TraceError(AnonfolioError, ValueError)`), which neither
//! `create_exception!` nor a `#[pyclass(extends = ...)]` can express. Each has
//! `__module__ = "anonfolio"` (the public package re-exports them), and the
//! class attributes `line`, `address` and `stats` default to `None`.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};

use anonfolio::Error;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The classes, in the order they are created (a base before its subclasses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Base,
    Trace,
    Segv,
    Config,
    Range,
    Oom,
    Oracle,
    Invariant,
}

const KINDS: [Kind; 8] =
    [Kind::Base, Kind::Trace, Kind::Segv, Kind::Config, Kind::Range, Kind::Oom, Kind::Oracle, Kind::Invariant];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Base => "AnonfolioError",
            Kind::Trace => "TraceError",
            Kind::Segv => "SegmentationFault",
            Kind::Config => "ConfigError",
            Kind::Range => "RangeError",
            Kind::Oom => "OutOfMemory",
            Kind::Oracle => "OracleError",
            Kind::Invariant => "InvariantError",
        }
    }

    fn doc(self) -> &'static str {
        match self {
            Kind::Base => {
                "Base class of every error anonfolio raises. `stats` holds the statistics of what \
                 ran before the error (a dict, as `Simulator.stats()` returns) when the error \
                 stopped a replay or a workload, else None."
            }
            Kind::Trace => {
                "A trace line (or a trace-like argument) that does not parse. `line` is the \
                 1-based line number when known."
            }
            Kind::Segv => {
                "An access outside every VMA: the process would get SIGSEGV. `address` is the \
                 faulting address; `line` the trace line when the access came from a trace."
            }
            Kind::Config => "A configuration value out of its domain: unknown size, mode, policy, byte count...",
            Kind::Range => {
                "A range that is not page aligned, empty, outside user space, or an mmap over an \
                 existing mapping."
            }
            Kind::Oom => {
                "The simulated machine (or memcg) ran out of memory: the fault returned \
                 VM_FAULT_OOM. `address` is the faulting address."
            }
            Kind::Oracle => "The kernel oracle could not run the trace on the real kernel.",
            Kind::Invariant => "A consistency check of the simulated mm failed (a simulator bug).",
        }
    }

    /// Built-in classes mixed in besides the anonfolio base.
    fn extra_base(self, py: Python<'_>) -> Option<Bound<'_, PyType>> {
        match self {
            Kind::Trace | Kind::Config | Kind::Range => Some(py.get_type::<PyValueError>()),
            Kind::Oracle => Some(py.get_type::<pyo3::exceptions::PyOSError>()),
            Kind::Invariant => Some(py.get_type::<PyRuntimeError>()),
            Kind::Base | Kind::Segv | Kind::Oom => None,
        }
    }
}

static CLASSES: GILOnceCell<Vec<Py<PyType>>> = GILOnceCell::new();

fn make_classes(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    let type_ = py.get_type::<PyType>();
    let mut out: Vec<Py<PyType>> = Vec::with_capacity(KINDS.len());
    for kind in KINDS {
        let dict = PyDict::new(py);
        dict.set_item("__module__", "anonfolio")?;
        dict.set_item("__doc__", kind.doc())?;
        let bases = if kind == Kind::Base {
            dict.set_item("line", py.None())?;
            dict.set_item("address", py.None())?;
            dict.set_item("stats", py.None())?;
            PyTuple::new(py, [py.get_type::<PyException>()])?
        } else {
            let base = out[0].bind(py).clone();
            match kind.extra_base(py) {
                Some(extra) => PyTuple::new(py, [base, extra])?,
                None => PyTuple::new(py, [base])?,
            }
        };
        let cls = type_.call1((kind.name(), bases, dict))?.downcast_into::<PyType>()?;
        out.push(cls.unbind());
    }
    Ok(out)
}

/// Creates the classes (once) and adds them to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let classes = CLASSES.get_or_try_init(py, || make_classes(py))?;
    for (kind, cls) in KINDS.iter().zip(classes) {
        m.add(kind.name(), cls.bind(py))?;
    }
    install_panic_hook();
    Ok(())
}

fn class(py: Python<'_>, kind: Kind) -> Bound<'_, PyType> {
    match CLASSES.get(py) {
        Some(v) => v[KINDS.iter().position(|k| *k == kind).unwrap_or(0)].bind(py).clone(),
        // Only reachable if the module failed to initialise.
        None => py.get_type::<PyRuntimeError>(),
    }
}

/// An exception of `kind` with message `msg`; `attrs` are set on the instance.
pub fn new_err(py: Python<'_>, kind: Kind, msg: String, attrs: &[(&str, PyObject)]) -> PyErr {
    let err = PyErr::from_type(class(py, kind), msg);
    if !attrs.is_empty() {
        let value = err.value(py);
        for (k, v) in attrs {
            // Setting an attribute on a fresh exception instance cannot fail
            // in practice; if it does, the exception is still right.
            let _ = value.setattr(*k, v.clone_ref(py));
        }
    }
    err
}

/// `AnonfolioError(msg)`.
pub fn base_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    new_err(py, Kind::Base, msg.into(), &[])
}

/// `ConfigError(msg)`.
pub fn config_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    new_err(py, Kind::Config, msg.into(), &[])
}

/// The 1-based trace line a message starts with (`"line 7: ..."`), if any.
pub fn line_of(msg: &str) -> Option<u64> {
    let rest = msg.strip_prefix("line ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    if end == 0 || !rest[end..].starts_with(':') {
        return None;
    }
    rest[..end].parse().ok()
}

/// Maps a core error to its exception: the class by what went wrong, the
/// trace line (from `Error::AtLine` or a `"line N: "` message) as `line`,
/// the faulting address as `address`.
pub fn to_pyerr(py: Python<'_>, e: &Error) -> PyErr {
    let msg = e.to_string();
    let line = match e {
        Error::AtLine(n, _) => Some(u64::from(*n)),
        _ => line_of(&msg),
    };
    let mut attrs: Vec<(&str, PyObject)> = Vec::new();
    if let Some(l) = line {
        let Ok(l) = l.into_pyobject(py);
        attrs.push(("line", l.into_any().unbind()));
    }
    let kind = match e.inner() {
        Error::Parse(_) => Kind::Trace,
        Error::InvalidRange(_) | Error::Overlap(_) => Kind::Range,
        // The core reports a failed check after a run this way.
        Error::Invariant(_) => Kind::Invariant,
        Error::Config(_) => Kind::Config,
        Error::Segv(a) | Error::Oom(a) => {
            let Ok(a) = a.into_pyobject(py);
            attrs.push(("address", a.into_any().unbind()));
            if matches!(e.inner(), Error::Segv(_)) {
                Kind::Segv
            } else {
                Kind::Oom
            }
        }
        Error::SegvAccess { addr, .. } => {
            let Ok(a) = addr.into_pyobject(py);
            attrs.push(("address", a.into_any().unbind()));
            Kind::Segv
        }
        Error::Oracle(_) => Kind::Oracle,
        #[allow(unreachable_patterns)]
        _ => Kind::Base,
    };
    new_err(py, kind, msg, &attrs)
}

/// Converts a core result, for use as `core_call().map_err(|e| to_pyerr(py, &e))`.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_pyerr(py, &e))
    }
}

// ---------------------------------------------------------------------------
// Panics
//
// A panic inside a guarded call becomes `AnonfolioError("internal error: ...")`
// and prints nothing: the exception says it all. Any other panic of the
// process (another extension's, a thread the core spawned) must still reach
// the hook that was there before, so ours is chained and acts only while the
// panicking thread is inside `guard`.

thread_local! {
    /// How deep the current thread is in `guard` calls (they may nest).
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// The message and place of the last panic inside a guarded call on this
    /// thread, taken by `guard` when it catches the unwind.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook once per process; the hook that was set before it
/// (Rust's default, or whoever set one) keeps handling every panic outside
/// a guarded call, and also those inside one when `ANONFOLIO_PANIC_VERBOSE`
/// is set.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let verbose = std::env::var_os("ANONFOLIO_PANIC_VERBOSE").is_some();
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            // try_with: a panic while this thread's locals are being torn
            // down is not ours (and must not panic again here).
            if GUARDED.try_with(Cell::get).unwrap_or(0) == 0 {
                return previous(info);
            }
            let loc = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let msg = payload_str(info.payload());
            let _ = LAST_PANIC.try_with(|last| {
                if let Ok(mut last) = last.try_borrow_mut() {
                    *last = Some(format!("{msg}{loc}"));
                }
            });
            if verbose {
                previous(info);
            }
        }));
    });
}

/// Marks the current thread as inside `guard` while it lives; dropping it
/// (also while unwinding) unmarks it.
struct Guarded;

impl Guarded {
    fn enter() -> Self {
        GUARDED.with(|g| g.set(g.get() + 1));
        Guarded
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    }
}

fn payload_str(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// A panic caught at the FFI boundary, to be raised as
/// `AnonfolioError("internal error: ...")` once attached again.
#[derive(Debug)]
pub struct Panic(pub String);

impl Panic {
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        base_err(py, format!("internal error: {} (this is a bug in anonfolio)", self.0))
    }
}

/// Runs `f`, turning a panic into [`Panic`]. Safe to call with or without
/// the GIL; the closure must not touch Python objects if run detached.
///
/// Only panics on the calling thread are caught here; the core catches those
/// of the threads it runs simulated CPUs on and reports them as errors.
pub fn guard<T>(f: impl FnOnce() -> T) -> Result<T, Panic> {
    let r = {
        let _g = Guarded::enter();
        panic::catch_unwind(AssertUnwindSafe(f))
    };
    r.map_err(|p| {
        let recorded = LAST_PANIC.try_with(|last| last.borrow_mut().take()).ok().flatten();
        Panic(recorded.unwrap_or_else(|| payload_str(&*p)))
    })
}

/// [`guard`] for code that runs attached and returns a `PyResult`.
pub fn guard_py<T>(py: Python<'_>, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    guard(f).unwrap_or_else(|p| Err(p.into_pyerr(py)))
}
