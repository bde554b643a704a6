//! `anonfolio._anonfolio`: the native module under the `anonfolio` package.
//!
//! Thin wrappers only: the simulator is the `anonfolio` crate. This crate
//! maps its errors to exception classes ([`errors`]), its configuration and
//! statistics to dicts ([`convert`]), and wraps an `Mm` in the `Simulator`
//! class ([`simulator`]). No Rust panic crosses into Python: every call into
//! the core is guarded and a panic becomes `AnonfolioError("internal error: ...")`.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

mod convert;
mod errors;
mod oracle;
mod simulator;
mod vtime;

use errors::{guard_py, IntoPyResult};

/// Parses a byte count: a plain number or one with a binary suffix (`64K`,
/// `64KiB`, `2M`, `1G`, `1T`); raises ConfigError.
#[pyfunction]
fn parse_bytes(py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<u64> {
    guard_py(py, || convert::bytes_arg(py, "size", text))
}

/// The order of a THP size written as sysfs names it (`64kB`) or with a
/// suffix (`64K`, `2M`); raises ConfigError for a size with no
/// `hugepages-*` folder.
#[pyfunction]
fn parse_thp_size(py: Python<'_>, text: String) -> PyResult<usize> {
    guard_py(py, || anonfolio::config::parse_thp_size(&text).py_err(py))
}

/// The sysfs name of an order's size: 4 -> "64kB".
#[pyfunction]
fn size_name(order: usize) -> PyResult<String> {
    if order > anonfolio::MAX_PAGE_ORDER {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "order {order} is above MAX_PAGE_ORDER ({})",
            anonfolio::MAX_PAGE_ORDER
        )));
    }
    Ok(anonfolio::config::size_name(order))
}

/// Validates configuration fields and returns them normalised (every size
/// present, byte counts as ints, fail_orders as a sorted tuple of orders).
#[pyfunction]
#[pyo3(signature = (config = None, **fields))]
fn normalize_config<'py>(
    py: Python<'py>,
    config: Option<&Bound<'py, PyAny>>,
    fields: Option<&Bound<'py, pyo3::types::PyDict>>,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    guard_py(py, || {
        let cfg = convert::config_from_py(py, config, fields)?;
        convert::config_to_py(py, &cfg)
    })
}

/// Parses a trace without running it; returns the number of operations.
/// Raises TraceError (or RangeError) naming the first bad line.
#[pyfunction]
fn check_trace(py: Python<'_>, trace: String) -> PyResult<usize> {
    let r = py.allow_threads(move || {
        errors::guard(move || anonfolio::trace::parse(&trace).map(|ops| ops.len()).map_err(anonfolio::Error::from))
    });
    match r {
        Ok(v) => v.py_err(py),
        Err(p) => Err(p.into_pyerr(py)),
    }
}

/// Test hook, not API: panics with `message`, inside the guard that every
/// call into the core goes through (`guarded=True`: the caller sees
/// `AnonfolioError("internal error: ...")` and nothing is printed) or outside
/// it (`guarded=False`: PyO3 raises its `PanicException` and the process's
/// panic hook prints the panic, as for any panic that is not ours to catch).
/// The test suite uses it to prove both paths.
#[pyfunction]
#[pyo3(signature = (message, *, guarded = true))]
fn _debug_panic(py: Python<'_>, message: String, guarded: bool) -> PyResult<()> {
    if guarded {
        guard_py(py, || panic!("{message}"))
    } else {
        panic!("{message}")
    }
}

#[pymodule]
fn _anonfolio(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("build_profile", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    m.add("PAGE_SIZE", anonfolio::PAGE_SIZE)?;
    m.add("PMD_ORDER", anonfolio::PMD_ORDER)?;
    m.add("MAX_PAGE_ORDER", anonfolio::MAX_PAGE_ORDER)?;
    let sizes: Vec<String> = convert::thp_orders().map(anonfolio::config::size_name).collect();
    m.add("THP_SIZES", PyTuple::new(py, sizes)?)?;
    m.add("MTHP_COUNTERS", PyTuple::new(py, anonfolio::stats::MthpStats::NAMES)?)?;
    m.add("VMSTAT_COUNTERS", PyTuple::new(py, anonfolio::stats::VmStats::NAMES)?)?;
    m.add("RACE_COUNTERS", PyTuple::new(py, anonfolio::stats::RaceStats::NAMES)?)?;
    m.add("FAULT_PATHS", PyTuple::new(py, anonfolio::stats::FaultStats::NAMES)?)?;
    m.add("CONFIG_FIELDS", PyTuple::new(py, convert::CONFIG_FIELDS)?)?;
    errors::register(m)?;
    m.add_class::<simulator::Simulator>()?;
    m.add_function(wrap_pyfunction!(parse_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(vtime::default_cost_profile, m)?)?;
    m.add_function(wrap_pyfunction!(parse_thp_size, m)?)?;
    m.add_function(wrap_pyfunction!(size_name, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_config, m)?)?;
    m.add_function(wrap_pyfunction!(check_trace, m)?)?;
    m.add_function(wrap_pyfunction!(_debug_panic, m)?)?;
    oracle::register(m)?;
    Ok(())
}
