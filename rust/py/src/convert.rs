//! Conversions between the core's types and plain Python objects: the
//! configuration (a dict with the fields of `anonfolio.Config`) and the
//! statistics (a dict with the keys of the JSON contract).

use anonfolio::config::{self, Enabled, Policy, SizeMode};
use anonfolio::{Config, Stats, MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, PMD_ORDER};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString, PyTuple};

use crate::errors::{config_err, IntoPyResult};

/// The fields a configuration dict may have, as `anonfolio.Config` names them.
pub const CONFIG_FIELDS: &[&str] = &[
    "enabled",
    "hugepages",
    "use_zero_page",
    "policy",
    "on_race",
    "preempt",
    "memory",
    "memcg_limit",
    "fragmentation",
    "fail_orders",
    "fail_rate",
    "seed",
    "check_invariants",
];

/// A byte count: a non-negative int, or a string such as `"64K"`, `"2MiB"`.
pub fn bytes_arg(py: Python<'_>, what: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if v.is_instance_of::<PyBool>() {
        return Err(config_err(py, format!("{what}: expected a byte count, got a bool")));
    }
    if let Ok(s) = v.downcast::<PyString>() {
        let s = s.to_cow()?;
        return config::parse_bytes(&s)
            .py_err(py)
            .map_err(|_| config_err(py, format!("{what}: malformed byte count {s:?} ({})", config::BYTES_SUFFIXES)));
    }
    if v.is_instance_of::<PyInt>() || v.hasattr("__index__")? {
        return v.extract::<u64>().map_err(|_| {
            config_err(
                py,
                format!(
                    "{what}: {} is not a byte count (0 .. 2**64-1)",
                    v.repr().map(|r| r.to_string()).unwrap_or_default()
                ),
            )
        });
    }
    Err(PyTypeError::new_err(format!("{what}: expected an int or a string like '64K', got {}", v.get_type().name()?)))
}

fn str_arg(py: Python<'_>, what: &str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    match v.downcast::<PyString>() {
        Ok(s) => Ok(s.to_cow()?.into_owned()),
        Err(_) => Err(config_err(py, format!("{what}: expected a string, got {}", v.get_type().name()?))),
    }
}

fn bool_arg(py: Python<'_>, what: &str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    v.extract::<bool>().map_err(|_| {
        config_err(
            py,
            format!(
                "{what}: expected True or False, got {}",
                v.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ),
        )
    })
}

fn fraction_arg(py: Python<'_>, what: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.is_instance_of::<PyBool>()
        || !(v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>() || v.hasattr("__float__")?)
    {
        return Err(config_err(py, format!("{what}: expected a number between 0 and 1")));
    }
    let f: f64 = v.extract().map_err(|_| config_err(py, format!("{what}: expected a number between 0 and 1")))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(config_err(py, format!("{what}: {f} is outside 0..1")));
    }
    Ok(f)
}

/// A buddy order given as an int (0..=MAX_PAGE_ORDER) or a size (`"64kB"`).
fn order_arg(py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    let bad = || {
        config_err(
            py,
            format!(
                "fail_orders: {} is neither an order 0..{MAX_PAGE_ORDER} nor a size 4kB..4096kB",
                v.repr().map(|r| r.to_string()).unwrap_or_default()
            ),
        )
    };
    if v.is_instance_of::<PyBool>() {
        return Err(bad());
    }
    if let Ok(s) = v.downcast::<PyString>() {
        let b = config::parse_bytes(&s.to_cow()?).map_err(|_| bad())?;
        if b < PAGE_SIZE || !b.is_power_of_two() {
            return Err(bad());
        }
        let order = (b.trailing_zeros() - PAGE_SHIFT) as usize;
        return if order <= MAX_PAGE_ORDER { Ok(order) } else { Err(bad()) };
    }
    match v.extract::<usize>() {
        Ok(o) if o <= MAX_PAGE_ORDER => Ok(o),
        _ => Err(bad()),
    }
}

fn is_mapping(v: &Bound<'_, PyAny>) -> bool {
    v.downcast::<PyDict>().is_ok() || v.downcast::<PyMapping>().is_ok()
}

/// Applies one field to `cfg`.
fn apply_field(py: Python<'_>, cfg: &mut Config, key: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
    match key {
        "enabled" => cfg.enabled = Enabled::parse(&str_arg(py, key, v)?).py_err(py)?,
        "hugepages" => {
            if v.is_none() {
                return Ok(());
            }
            if !is_mapping(v) {
                return Err(config_err(py, "hugepages: expected a mapping like {'64kB': 'always'}"));
            }
            let items = v.call_method0("items")?;
            for item in items.try_iter()? {
                let (size, mode): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
                let size = str_arg(py, "hugepages size", &size)?;
                let order = config::parse_thp_size(&size).py_err(py)?;
                let mode = str_arg(py, "hugepages mode", &mode)?;
                cfg.sizes[order] = SizeMode::parse(&mode)
                    .map_err(|_| {
                        anonfolio::Error::Config(format!(
                            "hugepages-{}: unknown mode {mode:?} (want always, inherit, madvise or never)",
                            config::size_name(order)
                        ))
                    })
                    .py_err(py)?;
            }
        }
        "use_zero_page" => cfg.use_zero_page = bool_arg(py, key, v)?,
        "policy" => cfg.policy = Policy::parse(&str_arg(py, key, v)?).py_err(py)?,
        "preempt" => cfg.preempt = fraction_arg(py, key, v)?,
        "on_race" => {
            cfg.on_race =
                if v.is_none() { None } else { Some(anonfolio::OnRace::parse(&str_arg(py, key, v)?).py_err(py)?) }
        }
        "memory" => {
            let b = bytes_arg(py, key, v)?;
            if b < PAGE_SIZE << MAX_PAGE_ORDER {
                return Err(config_err(py, format!("memory: {b} bytes is less than one 4 MiB block")));
            }
            cfg.memory.phys_bytes = b;
        }
        "memcg_limit" => {
            cfg.memory.memcg_limit_bytes = if v.is_none() { None } else { Some(bytes_arg(py, key, v)?) };
        }
        "fragmentation" => cfg.memory.fragmentation = fraction_arg(py, key, v)?,
        "fail_orders" => {
            let mut mask = 0u32;
            if !v.is_none() {
                if v.is_instance_of::<PyString>() || v.is_instance_of::<PyInt>() {
                    mask |= 1 << order_arg(py, v)?;
                } else {
                    for o in v
                        .try_iter()
                        .map_err(|_| config_err(py, "fail_orders: expected a sequence of orders or sizes"))?
                    {
                        mask |= 1 << order_arg(py, &o?)?;
                    }
                }
            }
            cfg.memory.fail_orders = mask;
        }
        "fail_rate" => cfg.memory.fail_rate = fraction_arg(py, key, v)?,
        "seed" => {
            cfg.memory.seed = v
                .extract::<u64>()
                .ok()
                .filter(|_| !v.is_instance_of::<PyBool>())
                .ok_or_else(|| config_err(py, "seed: expected an int 0 .. 2**64-1"))?
        }
        "check_invariants" => cfg.check_invariants = bool_arg(py, key, v)?,
        other => {
            return Err(config_err(
                py,
                format!("unknown configuration field {other:?} (fields: {})", CONFIG_FIELDS.join(", ")),
            ))
        }
    }
    Ok(())
}

/// Builds a core [`Config`] from `config` (None, a dict of fields, any
/// mapping, or an object with a `_to_native()` method returning one, such as
/// `anonfolio.Config`) with `overrides` (keyword fields) applied on top.
pub fn config_from_py(
    py: Python<'_>,
    config: Option<&Bound<'_, PyAny>>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<Config> {
    let mut cfg = Config::default();
    if let Some(c) = config.filter(|c| !c.is_none()) {
        let fields = if let Ok(d) = c.downcast::<PyDict>() {
            d.clone()
        } else if c.hasattr("_to_native")? {
            c.call_method0("_to_native")?.downcast_into::<PyDict>()?
        } else if is_mapping(c) {
            PyDict::from_sequence(&c.call_method0("items")?)?
        } else {
            return Err(PyTypeError::new_err(format!(
                "config: expected an anonfolio.Config or a dict of its fields, got {}",
                c.get_type().name()?
            )));
        };
        apply_dict(py, &mut cfg, &fields)?;
    }
    if let Some(o) = overrides {
        apply_dict(py, &mut cfg, o)?;
    }
    Ok(cfg)
}

fn apply_dict(py: Python<'_>, cfg: &mut Config, d: &Bound<'_, PyDict>) -> PyResult<()> {
    // Known fields in their documented order (so the first error reported
    // is the first bad field), then any unknown key, which is an error.
    for name in CONFIG_FIELDS {
        if let Some(v) = d.get_item(name)? {
            apply_field(py, cfg, name, &v)?;
        }
    }
    for (k, v) in d.iter() {
        let key: String = k.extract().map_err(|_| config_err(py, "configuration keys must be strings"))?;
        if !CONFIG_FIELDS.contains(&key.as_str()) {
            apply_field(py, cfg, &key, &v)?;
        }
    }
    Ok(())
}

/// The orders a `hugepages-*` folder exists for (8kB..2048kB).
pub fn thp_orders() -> impl Iterator<Item = usize> {
    1..=PMD_ORDER
}

/// A core [`Config`] as a dict of `anonfolio.Config` fields, normalised:
/// every size present, byte counts as ints, fail_orders as a sorted tuple.
pub fn config_to_py<'py>(py: Python<'py>, cfg: &Config) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("enabled", cfg.enabled.name())?;
    let hp = PyDict::new(py);
    for order in thp_orders() {
        hp.set_item(config::size_name(order), cfg.sizes[order].name())?;
    }
    d.set_item("hugepages", hp)?;
    d.set_item("use_zero_page", cfg.use_zero_page)?;
    d.set_item("policy", cfg.policy.name())?;
    d.set_item("on_race", cfg.on_race.map(|r| r.name()))?;
    d.set_item("preempt", cfg.preempt)?;
    d.set_item("memory", cfg.memory.phys_bytes)?;
    d.set_item("memcg_limit", cfg.memory.memcg_limit_bytes)?;
    d.set_item("fragmentation", cfg.memory.fragmentation)?;
    let orders: Vec<usize> = (0..32).filter(|o| cfg.memory.fail_orders & (1 << o) != 0).collect();
    d.set_item("fail_orders", PyTuple::new(py, orders)?)?;
    d.set_item("fail_rate", cfg.memory.fail_rate)?;
    d.set_item("seed", cfg.memory.seed)?;
    d.set_item("check_invariants", cfg.check_invariants)?;
    Ok(d)
}

fn pairs_dict<'py>(py: Python<'py>, pairs: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in pairs {
        d.set_item(*k, *v)?;
    }
    Ok(d)
}

/// Statistics as the JSON contract names them, plus extra keys: `races`,
/// `fault_paths`, `folio_orders` (a list by order), `memory`.
pub fn stats_to_py<'py>(py: Python<'py>, s: &Stats, elapsed_s: f64) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("faults", s.faults())?;
    d.set_item("rss_bytes", s.rss_pages.saturating_mul(PAGE_SIZE))?;
    d.set_item("rss_peak_bytes", s.rss_peak_pages.saturating_mul(PAGE_SIZE))?;
    d.set_item("elapsed_s", elapsed_s)?;
    let mthp = PyDict::new(py);
    for (order, m) in s.mthp.iter().enumerate() {
        let pairs = m.pairs();
        if pairs.iter().any(|(_, v)| *v != 0) {
            mthp.set_item(config::size_name(order), pairs_dict(py, &pairs)?)?;
        }
    }
    d.set_item("mthp", mthp)?;
    d.set_item("vmstat", pairs_dict(py, &s.vm.pairs())?)?;
    let locks = pairs_dict(py, &s.ptl.pairs())?;
    locks.set_item("ptl", pairs_dict(py, &s.ptl.pairs())?)?;
    locks.set_item("page_table_lock", pairs_dict(py, &s.page_table_lock.pairs())?)?;
    locks.set_item("zone_lock", pairs_dict(py, &s.zone_lock.pairs())?)?;
    locks.set_item("mmap_lock", pairs_dict(py, &s.mmap_lock.pairs())?)?;
    d.set_item("locks", locks)?;
    d.set_item("races", pairs_dict(py, &s.race.pairs())?)?;
    d.set_item("fault_paths", pairs_dict(py, &s.fault.pairs())?)?;
    // A list, not a numpy array: a run that only prints needs no numpy.
    d.set_item("folio_orders", s.folio_orders.to_vec())?;
    let m = &s.mem;
    let mem = pairs_dict(
        py,
        &[
            ("phys_pages", m.phys_pages),
            ("used_pages", m.used_pages),
            ("pcp_pages", m.pcp_pages),
            ("pinned_pages", m.pinned_pages),
            ("nr_ptes", m.nr_ptes),
            ("memcg_usage", m.memcg_usage),
            ("memcg_charge_fail", m.memcg_charge_fail),
            ("host_bytes", m.host_bytes),
        ],
    )?;
    d.set_item("memory", mem)?;
    Ok(d)
}
