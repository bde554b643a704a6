//! `kernel_replay(trace_text) -> dict`: the trace on the real kernel (see
//! the `anonfolio-oracle` crate). THP settings are whatever sysfs holds; the Python
//! wrapper `anonfolio.kernel.kernel_replay` sets them and restores them.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{guard, new_err, to_pyerr, Kind};

/// kernel_replay(trace_text: str) -> dict
///
/// Replays a trace on the running Linux kernel, in this process, with the THP
/// settings sysfs holds now, and returns what the kernel reported:
/// `faults`, `rss_bytes`, `anon_huge_bytes`, `elapsed_s`,
/// `mthp` ({size: {counter: delta}}), `vmstat` ({name: delta}), `kernel`
/// (the release) and `harness_faults` (the overhead subtracted from faults).
/// A trace that does not parse raises ValueError (TraceError/RangeError)
/// naming the line, and so does a VMA operation the kernel refused (RangeError,
/// errno named); an access the kernel answers with SIGSEGV raises
/// SegmentationFault (`line`, `address`); an oracle failure (no
/// userfaultfd, a syscall of the harness refused) raises OSError
/// (OracleError). The GIL is released during the replay.
#[cfg(target_os = "linux")]
#[pyfunction]
#[pyo3(name = "kernel_replay", signature = (trace_text))]
fn kernel_replay_py<'py>(py: Python<'py>, trace_text: &str) -> PyResult<Bound<'py, PyDict>> {
    let ops = anonfolio::trace::parse(trace_text).map_err(|e| to_pyerr(py, &e.into()))?;
    let run = py
        .allow_threads(|| guard(|| anonfolio_oracle::kernel_replay(&ops)))
        .map_err(|p| p.into_pyerr(py))?
        .map_err(|e| oracle_pyerr(py, e))?;
    let d = PyDict::new(py);
    d.set_item("faults", run.faults)?;
    d.set_item("rss_bytes", run.rss_bytes)?;
    d.set_item("anon_huge_bytes", run.anon_huge_bytes)?;
    d.set_item("elapsed_s", run.elapsed_s)?;
    let mthp = PyDict::new(py);
    for (size, counters) in &run.mthp {
        let c = PyDict::new(py);
        for (name, v) in counters {
            c.set_item(*name, *v)?;
        }
        mthp.set_item(size, c)?;
    }
    d.set_item("mthp", mthp)?;
    let vm = PyDict::new(py);
    for (name, v) in &run.vmstat {
        vm.set_item(*name, *v)?;
    }
    d.set_item("vmstat", vm)?;
    d.set_item("kernel", &run.kernel_release)?;
    d.set_item("harness_faults", run.harness_faults)?;
    Ok(d)
}

/// The oracle's error as the engine's, so that it maps to the same
/// exception classes as a simulated run's; `None` for a SIGSEGV inside a
/// VMA, which the engine's errors do not spell.
#[cfg(target_os = "linux")]
fn oracle_error(e: &anonfolio_oracle::Error) -> Option<anonfolio::Error> {
    use anonfolio::Error as E;
    use anonfolio_oracle::Error as O;
    Some(match e {
        O::Oracle(m) => E::Oracle(m.clone()),
        O::Overlap(m) => E::Overlap(m.clone()),
        O::Refused(m) => E::InvalidRange(m.clone()),
        O::Segv(a) => E::Segv(*a),
        O::SegvAccess { .. } => return None,
        O::Trace(t) => t.clone().into(),
        O::AtLine(n, e) => E::AtLine(*n, Box::new(oracle_error(e)?)),
    })
}

/// The exception for an oracle error: as the engine's error would raise,
/// or `SegmentationFault` with `line` and `address` for an access a VMA's
/// protection (or a stack that cannot grow) refused.
#[cfg(target_os = "linux")]
fn oracle_pyerr(py: Python<'_>, e: anonfolio_oracle::Error) -> PyErr {
    if let Some(engine) = oracle_error(&e) {
        return to_pyerr(py, &engine);
    }
    let (mut line, mut inner) = (None, &e);
    while let anonfolio_oracle::Error::AtLine(n, next) = inner {
        line = line.or(Some(*n));
        inner = next;
    }
    let mut attrs: Vec<(&str, PyObject)> = Vec::new();
    if let Some(l) = line {
        let Ok(l) = l.into_pyobject(py);
        attrs.push(("line", l.into_any().unbind()));
    }
    if let anonfolio_oracle::Error::SegvAccess { addr, .. } = inner {
        let Ok(a) = addr.into_pyobject(py);
        attrs.push(("address", a.into_any().unbind()));
    }
    new_err(py, Kind::Segv, e.to_string(), &attrs)
}

#[cfg(not(target_os = "linux"))]
#[pyfunction]
#[pyo3(name = "kernel_replay", signature = (trace_text))]
fn kernel_replay_py<'py>(py: Python<'py>, trace_text: &str) -> PyResult<Bound<'py, PyDict>> {
    let _ = trace_text;
    Err(to_pyerr(py, &anonfolio::Error::Oracle("the kernel oracle needs Linux".into())))
}

/// Adds `kernel_replay` to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kernel_replay_py, m)?)
}
