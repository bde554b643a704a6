//! `Simulator`: one simulated process (an `Mm`) and a CPU for direct calls.
//!
//! Concurrency: the pyclass is `frozen`; its state is an `Arc<Mm>` (which is
//! `Sync` and does its own locking) and a `Mutex<Cpu>` for the direct calls
//! (`mmap`, `read`, `touch`...). Every call into the core runs with the GIL
//! released, and nothing under that mutex touches Python, so a thread that
//! waits for the mutex never holds the GIL another one needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anonfolio::trace::{self, Advice, MmapFlags};
use anonfolio::{Cpu, Mm, RunOptions, RunResult, Sharing, Workload, WorkloadKind};
use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert::{bytes_arg, config_from_py, config_to_py, stats_to_py};
use crate::errors::{config_err, guard, new_err, to_pyerr, IntoPyResult, Kind, Panic};
use crate::vtime::{profile_from_py, time_to_py};

/// A simulated process: its address space, page tables and the physical
/// memory behind them, configured like `/sys/kernel/mm/transparent_hugepage/`.
#[pyclass(module = "anonfolio._anonfolio", name = "Simulator", subclass, frozen)]
pub struct Simulator {
    mm: Arc<Mm>,
    cpu: Mutex<Cpu>,
    /// Wall time spent in replay/run/touch, summed, in nanoseconds.
    elapsed_ns: AtomicU64,
}

/// Runs `f` with the GIL released, catching panics.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> Result<T, Panic> {
    py.allow_threads(|| guard(f))
}

fn flatten<T>(py: Python<'_>, r: Result<anonfolio::Result<T>, Panic>) -> PyResult<T> {
    match r {
        Ok(v) => v.py_err(py),
        Err(p) => Err(p.into_pyerr(py)),
    }
}

fn threads_arg(py: Python<'_>, threads: usize) -> PyResult<usize> {
    if threads == 0 || threads > 1024 {
        return Err(config_err(py, format!("threads: {threads} is outside 1..1024")));
    }
    Ok(threads)
}

impl Simulator {
    /// The options of a replay or a run: `threads` checked, the invariant
    /// check defaulting to the configuration's, `time`'s cost profile.
    fn run_options(
        &self,
        py: Python<'_>,
        threads: usize,
        deterministic: Option<u64>,
        check_invariants: Option<bool>,
        time: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<RunOptions> {
        Ok(RunOptions {
            threads: threads_arg(py, threads)?,
            deterministic,
            check_invariants: check_invariants.unwrap_or(self.mm.config().check_invariants),
            time: time.map(|d| profile_from_py(py, d)).transpose()?,
        })
    }

    /// Runs one direct operation on the simulator's own CPU.
    fn with_cpu<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Mm, &mut Cpu) -> anonfolio::Result<T> + Send,
    ) -> PyResult<T> {
        let mm: &Mm = &self.mm;
        let cpu = &self.cpu;
        flatten(
            py,
            detached(py, move || {
                let mut c = cpu.lock().unwrap_or_else(|p| p.into_inner());
                f(mm, &mut c)
            }),
        )
    }

    fn add_elapsed(&self, secs: f64) {
        self.elapsed_ns.fetch_add((secs.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    /// The dict of a finished replay or workload; raises its error, if any,
    /// with the dict as the exception's `stats`.
    fn result<'py>(&self, py: Python<'py>, r: Result<RunResult, Panic>) -> PyResult<Bound<'py, PyDict>> {
        let r = r.map_err(|p| p.into_pyerr(py))?;
        self.add_elapsed(r.elapsed_s);
        let d = stats_to_py(py, &r.stats, r.elapsed_s)?;
        d.set_item("ops", r.ops_done)?;
        d.set_item("per_cpu_faults", r.per_cpu_faults.clone())?;
        d.set_item("fairness", r.fairness())?;
        if let Some(t) = &r.time {
            d.set_item("time", time_to_py(py, t)?)?;
        }
        match &r.error {
            None => Ok(d),
            Some(e) => {
                let err = to_pyerr(py, e);
                err.value(py).setattr("stats", d)?;
                Err(err)
            }
        }
    }
}

#[pymethods]
impl Simulator {
    /// Simulator(config=None, **fields)
    #[new]
    #[pyo3(signature = (config = None, **fields))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let cfg = config_from_py(py, config, fields)?;
        let mm = flatten(py, detached(py, move || Mm::new(cfg)))?;
        let cpu = mm.cpu(0);
        Ok(Simulator { mm: Arc::new(mm), cpu: Mutex::new(cpu), elapsed_ns: AtomicU64::new(0) })
    }

    /// The configuration, as a dict of `anonfolio.Config` fields.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config_to_py(py, self.mm.config())
    }

    #[pyo3(signature = (addr, length, *, hugepage = false, nohugepage = false, uffd_wp = false))]
    fn mmap(
        &self,
        py: Python<'_>,
        addr: u64,
        length: &Bound<'_, PyAny>,
        hugepage: bool,
        nohugepage: bool,
        uffd_wp: bool,
    ) -> PyResult<()> {
        let len = bytes_arg(py, "length", length)?;
        if hugepage && nohugepage {
            return Err(new_err(py, Kind::Range, "mmap cannot be both hugepage and nohugepage".into(), &[]));
        }
        let flags = MmapFlags { hugepage, nohugepage, uffd_wp, ..Default::default() };
        self.with_cpu(py, move |mm, cpu| mm.mmap(cpu, addr, len, flags))
    }

    fn munmap(&self, py: Python<'_>, addr: u64, length: &Bound<'_, PyAny>) -> PyResult<()> {
        let len = bytes_arg(py, "length", length)?;
        self.with_cpu(py, move |mm, cpu| mm.munmap(cpu, addr, len))
    }

    fn madvise(&self, py: Python<'_>, addr: u64, length: &Bound<'_, PyAny>, advice: String) -> PyResult<()> {
        let len = bytes_arg(py, "length", length)?;
        let advice = Advice::parse(&advice).ok_or_else(|| {
            config_err(py, format!("unknown advice {advice:?} (want dontneed, hugepage or nohugepage)"))
        })?;
        self.with_cpu(py, move |mm, cpu| mm.madvise(cpu, addr, len, advice))
    }

    /// One user read of the byte at `addr`.
    fn read(&self, py: Python<'_>, addr: u64) -> PyResult<()> {
        self.with_cpu(py, move |mm, cpu| mm.access(cpu, addr, false))
    }

    /// One user write of the byte at `addr`.
    fn write(&self, py: Python<'_>, addr: u64) -> PyResult<()> {
        self.with_cpu(py, move |mm, cpu| mm.access(cpu, addr, true))
    }

    /// One access per address, in order; returns how many were done.
    #[pyo3(signature = (addrs, write = true))]
    fn touch(&self, py: Python<'_>, addrs: &Bound<'_, PyAny>, write: bool) -> PyResult<u64> {
        let v: Vec<u64> = match addrs.extract::<PyReadonlyArray1<'_, u64>>() {
            Ok(a) => match a.as_slice() {
                Ok(s) => s.to_vec(),
                Err(_) => a.as_array().iter().copied().collect(),
            },
            Err(_) => addrs.extract::<Vec<u64>>().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(
                    "addrs: expected a 1-D array of uint64 or a sequence of ints >= 0",
                )
            })?,
        };
        let mm: &Mm = &self.mm;
        let cpu = &self.cpu;
        let r = detached(py, move || {
            let mut c = cpu.lock().unwrap_or_else(|p| p.into_inner());
            let t = std::time::Instant::now();
            let mut res = Ok(());
            for (i, &a) in v.iter().enumerate() {
                if let Err(e) = mm.access(&mut c, a, write) {
                    res = Err((i, e));
                    break;
                }
            }
            (t.elapsed().as_secs_f64(), v.len(), res)
        });
        let (secs, n, res) = r.map_err(|p| p.into_pyerr(py))?;
        self.add_elapsed(secs);
        match res {
            Ok(()) => Ok(n as u64),
            Err((i, e)) => {
                let err = to_pyerr(py, &e);
                let v = err.value(py);
                v.setattr("index", i)?;
                v.setattr("args", (format!("addrs[{i}]: {e}"),))?;
                Err(err)
            }
        }
    }

    /// Replays a trace (the text, in the format of docs/trace-format.md).
    #[pyo3(signature = (trace, *, threads = 1, deterministic = None, check_invariants = None, time = None))]
    fn replay<'py>(
        &self,
        py: Python<'py>,
        trace: String,
        threads: usize,
        deterministic: Option<u64>,
        check_invariants: Option<bool>,
        time: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = self.run_options(py, threads, deterministic, check_invariants, time)?;
        let mm: &Mm = &self.mm;
        let r = detached(py, move || {
            let (ops, parse_error) = trace::parse_prefix(&trace);
            drop(trace);
            let mut r = anonfolio::replay(mm, &ops, &opts);
            if r.error.is_none() {
                r.error = parse_error.map(Into::into);
            }
            r
        });
        self.result(py, r)
    }

    /// Replays the trace file at `path` (plain, zstd or gzip), streamed
    /// through a fixed buffer, never held whole: read once, or, on several
    /// CPUs, twice (first for how many threads it has).
    #[pyo3(signature = (path, *, threads = 1, deterministic = None, check_invariants = None, time = None))]
    fn replay_file<'py>(
        &self,
        py: Python<'py>,
        path: std::path::PathBuf,
        threads: usize,
        deterministic: Option<u64>,
        check_invariants: Option<bool>,
        time: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = self.run_options(py, threads, deterministic, check_invariants, time)?;
        let mm: &Mm = &self.mm;
        let r =
            detached(py, move || anonfolio::replay_path(mm, &path, &opts).map_err(|e| (e, path.display().to_string())));
        match r {
            Ok(Ok(r)) => self.result(py, Ok(r)),
            // FileNotFoundError, PermissionError...: an OSError naming the file.
            Ok(Err((e, name))) => {
                let errno = e.raw_os_error().unwrap_or(0);
                let msg = e.to_string();
                let msg = msg.split(" (os error").next().unwrap_or(&msg).to_string();
                Err(pyo3::exceptions::PyOSError::new_err((errno, msg, name)))
            }
            Err(p) => Err(p.into_pyerr(py)),
        }
    }

    /// Runs a built-in workload over a fresh VMA of `size` bytes.
    #[pyo3(signature = (
        workload = None, size = None, *, stride = None, fraction = None, seed = None,
        threads = 1, sharing = None, iterations = None, deterministic = None, check_invariants = None,
        advice = None, time = None, processes = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        workload: Option<String>,
        size: Option<&Bound<'py, PyAny>>,
        stride: Option<u64>,
        fraction: Option<f64>,
        seed: Option<u64>,
        threads: usize,
        sharing: Option<String>,
        iterations: Option<u64>,
        deterministic: Option<u64>,
        check_invariants: Option<bool>,
        advice: Option<String>,
        time: Option<&Bound<'py, PyDict>>,
        processes: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = self.run_options(py, threads, deterministic, check_invariants, time)?;
        let kind = WorkloadKind::parse(workload.as_deref().unwrap_or("sequential")).py_err(py)?;
        if processes && kind != WorkloadKind::PageFault1 {
            return Err(config_err(py, "processes: only page_fault1 runs as processes"));
        }
        let sharing = Sharing::parse(sharing.as_deref().unwrap_or("disjoint")).py_err(py)?;
        let advice = advice.as_deref().map(anonfolio::workload::WorkloadAdvice::parse).transpose().py_err(py)?;
        let mut w = Workload { kind, sharing, advice, processes, ..Workload::default() };
        if let Some(s) = size {
            w.size = bytes_arg(py, "size", s)?;
        }
        if let Some(s) = stride {
            if s == 0 {
                return Err(config_err(py, "stride: must be at least 1 page"));
            }
            w.stride = s;
        }
        if let Some(f) = fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(config_err(py, format!("fraction: {f} is outside (0, 1]")));
            }
            w.fraction = f;
        }
        if let Some(s) = seed {
            w.seed = s;
        }
        if let Some(i) = iterations {
            if i == 0 {
                return Err(config_err(py, "iterations: must be at least 1"));
            }
            w.iterations = i;
        }
        let mm: &Mm = &self.mm;
        let r = detached(py, move || anonfolio::workload::run_workload(mm, &w, &opts));
        self.result(py, r)
    }

    /// A snapshot of every counter, summed over CPUs.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mm: &Mm = &self.mm;
        let s = detached(py, move || mm.stats()).map_err(|p| p.into_pyerr(py))?;
        stats_to_py(py, &s, self.elapsed_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }

    /// The VMAs, lowest first, as dicts: start, end, hugepage, nohugepage, uffd_wp.
    fn vmas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mm: &Mm = &self.mm;
        let v = detached(py, move || mm.vmas()).map_err(|p| p.into_pyerr(py))?;
        let out = PyList::empty(py);
        for vma in v {
            let d = PyDict::new(py);
            d.set_item("start", vma.start)?;
            d.set_item("end", vma.end)?;
            d.set_item("hugepage", vma.hugepage)?;
            d.set_item("nohugepage", vma.nohugepage)?;
            d.set_item("uffd_wp", vma.uffd_wp)?;
            d.set_item("prot", vma.prot.name())?;
            d.set_item("account", vma.account)?;
            d.set_item("noreserve", vma.noreserve)?;
            d.set_item("growsdown", vma.growsdown)?;
            d.set_item("dontcopy", vma.dontcopy)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Checks mapcounts, RSS and the conservation of pages; raises
    /// InvariantError naming the first violation.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        let mm: &Mm = &self.mm;
        let cpu = &self.cpu;
        // The direct-call CPU stays alive between calls; give its per-CPU
        // pages back first (drain_local_pages), as the check counts free
        // pages and those of finished CPUs.
        match detached(py, move || {
            cpu.lock().unwrap_or_else(|p| p.into_inner()).drain();
            mm.check_invariants()
        }) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(new_err(py, Kind::Invariant, m, &[])),
            Err(p) => Err(p.into_pyerr(py)),
        }
    }

    fn __repr__(&self) -> String {
        let c = self.mm.config();
        let sizes: Vec<String> = crate::convert::thp_orders()
            .filter(|&o| c.sizes[o] != anonfolio::SizeMode::Never)
            .map(|o| format!("{}={}", anonfolio::config::size_name(o), c.sizes[o].name()))
            .collect();
        format!(
            "<Simulator enabled={} {} policy={}>",
            c.enabled.name(),
            if sizes.is_empty() { "(no mTHP sizes)".to_string() } else { sizes.join(" ") },
            c.policy.name()
        )
    }
}
