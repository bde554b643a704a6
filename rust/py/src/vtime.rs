//! Virtual time across the boundary: a cost profile from a dict of
//! `NAME_ns` costs, and a run's `time` figures as a dict.

use anonfolio::{CostProfile, TimeStats};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::config_err;

/// A profile from `{"fault_entry_ns": 350.0, ...}`; costs not named keep
/// the built-in figures, an unknown or negative one is a ConfigError.
pub fn profile_from_py(py: Python<'_>, d: &Bound<'_, PyDict>) -> PyResult<CostProfile> {
    let mut p = CostProfile::default();
    for (k, v) in d.iter() {
        let key: String = k.extract().map_err(|_| config_err(py, "cost profile: keys must be strings"))?;
        let ns: f64 = v.extract().map_err(|_| config_err(py, format!("cost profile: {key} is not a number")))?;
        p.set(&key, ns).map_err(|e| config_err(py, e.to_string()))?;
    }
    Ok(p)
}

/// The `time` object of the JSON (docs/json.md), with what more the run measured.
pub fn time_to_py<'py>(py: Python<'py>, t: &TimeStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("elapsed_ns", t.elapsed_ns)?;
    d.set_item("cpu_ns", t.cpu_ns)?;
    d.set_item("faults_timed", t.faults)?;
    let l = PyDict::new(py);
    l.set_item("mean", t.latency_mean_ns)?;
    l.set_item("p50", t.latency_p50_ns)?;
    l.set_item("p99", t.latency_p99_ns)?;
    l.set_item("max", t.latency_max_ns)?;
    d.set_item("fault_latency_ns", l)?;
    for (key, v) in
        [("breakdown_ns", &t.breakdown_ns), ("lock_wait_ns", &t.lock_wait_ns), ("lock_contended", &t.lock_contended)]
    {
        let m = PyDict::new(py);
        for (name, x) in v {
            m.set_item(*name, *x)?;
        }
        d.set_item(key, m)?;
    }
    Ok(d)
}

/// The built-in cost profile, as a list of `(NAME_ns, ns)` pairs.
#[pyfunction]
pub fn default_cost_profile() -> Vec<(String, f64)> {
    CostProfile::default().pairs()
}
