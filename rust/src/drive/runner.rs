//! The multi-CPU runner: simulated CPUs on host threads of a rayon pool, or
//! as coroutines on this thread under the deterministic scheduler, and the
//! result of a run.

use crate::drive::sched::{Sched, Seeded, Timed};
use crate::drive::vtime::{lock_addr, CostProfile, TimeStats, VTime};
use crate::error::Error;
use crate::mm::vmstat::Stats;
use crate::mm::{Cpu, Mm};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Simulated CPUs (threads). 1 runs serially.
    pub threads: usize,
    /// Run the CPUs with a seeded interleaving instead of host threads.
    pub deterministic: Option<u64>,
    /// Check the invariants at the end (and fail the run if they break).
    pub check_invariants: bool,
    /// Run in virtual time with this cost profile (`--time`): CPUs are
    /// coroutines run in the order of their clocks, seeded ties broken by
    /// `deterministic` (default 0).
    pub time: Option<CostProfile>,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub stats: Stats,
    /// Wall seconds spent simulating.
    pub elapsed_s: f64,
    /// Operations completed.
    pub ops_done: u64,
    /// The first error (its trace line in `Error::AtLine`); the figures are
    /// those of what ran before it.
    pub error: Option<Error>,
    /// Faults handled by each CPU of the run, for fairness.
    pub per_cpu_faults: Vec<u64>,
    /// With [`RunOptions::time`]: the run's figures in virtual time.
    pub time: Option<TimeStats>,
}

impl RunResult {
    /// Jain's fairness index of the per-CPU faults: 1 when every CPU
    /// handled the same number, 1/n when one CPU did all the work.
    pub fn fairness(&self) -> f64 {
        let n = self.per_cpu_faults.len() as f64;
        let sum: f64 = self.per_cpu_faults.iter().map(|&x| x as f64).sum();
        let sq: f64 = self.per_cpu_faults.iter().map(|&x| (x as f64) * (x as f64)).sum();
        if sq == 0.0 {
            1.0
        } else {
            sum * sum / (n * sq)
        }
    }
}

pub(crate) fn finish(
    mm: &Mm,
    cpus: Vec<Cpu>,
    elapsed_s: f64,
    ops_done: u64,
    mut error: Option<Error>,
    check: bool,
) -> RunResult {
    let per_cpu_faults = cpus.iter().map(|c| c.c().vm.pgfault.get()).collect();
    drop(cpus);
    if (check || mm.debug_vm) && error.is_none() {
        if let Err(e) = mm.check_invariants() {
            error = Some(Error::Invariant(e));
        }
    }
    RunResult { stats: mm.stats(), elapsed_s, ops_done, error, per_cpu_faults, time: None }
}

/// What one CPU's job returns: operations done, or those and the error.
pub(crate) type JobResult = std::result::Result<u64, (u64, Error)>;

/// Sums the CPUs' results: operations done and the first error, in CPU order.
fn gather(results: impl IntoIterator<Item = JobResult>) -> (u64, Option<Error>) {
    let mut done = 0;
    let mut err = None;
    for r in results {
        match r {
            Ok(k) => done += k,
            Err((k, e)) => {
                done += k;
                err.get_or_insert(e);
            }
        }
    }
    (done, err)
}

/// Runs `job(t, cpu)` for every CPU at once: on host threads of a rayon
/// pool (one worker per simulated CPU, so a CPU spinning on a lock never
/// starves the holder of a worker), or, with `deterministic`, as coroutines
/// on this thread, one at a time, switched by a seeded scheduler.
pub(crate) fn run_cpus<F>(mm: &Mm, mut cpus: Vec<Cpu>, opts: &RunOptions, job: F) -> RunResult
where
    F: Fn(usize, &mut Cpu) -> JobResult + Sync,
{
    let n = cpus.len();
    if let Some(p) = &opts.time {
        let vt = VTime::new(p, n, mm.alloc.zone_lock_addr(), lock_addr(&*mm.pt.page_table_lock));
        let sched = Sched::Timed(Box::new(Timed::new(n, opts.deterministic.unwrap_or(0), vt)));
        let t0 = Instant::now();
        let (results, sched) = crate::drive::coro::run(&mut cpus, sched, &job);
        let elapsed = t0.elapsed().as_secs_f64();
        let (done, err) = gather(results);
        let mut r = finish(mm, cpus, elapsed, done, err, opts.check_invariants);
        if let Sched::Timed(t) = sched {
            r.time = Some(t.vt.stats(&t.clock));
        }
        return r;
    }
    if let Some(seed) = opts.deterministic {
        let sched = Sched::Seeded(Seeded::new(n, seed, mm.config().preempt));
        let t0 = Instant::now();
        let (results, _) = crate::drive::coro::run(&mut cpus, sched, &job);
        let elapsed = t0.elapsed().as_secs_f64();
        let (done, err) = gather(results);
        return finish(mm, cpus, elapsed, done, err, opts.check_invariants);
    }
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("cpu{i}")).build() {
        Ok(p) => p,
        Err(e) => {
            return finish(mm, cpus, 0.0, 0, Some(Error::Config(format!("cannot start {n} CPU threads: {e}"))), false)
        }
    };
    let results: Mutex<Vec<(usize, JobResult)>> = Mutex::new(Vec::with_capacity(n));
    let t0 = Instant::now();
    pool.scope(|s| {
        for (t, cpu) in cpus.iter_mut().enumerate() {
            let (job, results) = (&job, &results);
            s.spawn(move |_| {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(t, cpu)))
                    .unwrap_or_else(|p| Err((0, cpu_panicked(t, &*p))));
                results.lock().unwrap().push((t, r));
            });
        }
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(t, _)| *t);
    let (done, err) = gather(results.into_iter().map(|(_, r)| r));
    finish(mm, cpus, elapsed, done, err, opts.check_invariants)
}

/// The error of a simulated CPU whose job panicked: its number and the
/// panic's message, so that a bug in the model says where it is.
pub(crate) fn cpu_panicked(cpu: usize, payload: &(dyn std::any::Any + Send)) -> Error {
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    Error::Config(format!("simulated CPU {cpu} panicked: {msg}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cpu_panic_reports_its_message() {
        let e = std::panic::catch_unwind(|| panic!("pte {:#x} mapped twice", 0x1000)).unwrap_err();
        assert_eq!(super::cpu_panicked(3, &*e).to_string(), "simulated CPU 3 panicked: pte 0x1000 mapped twice");
        let e = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        assert_eq!(super::cpu_panicked(0, &*e).to_string(), "simulated CPU 0 panicked: static text");
    }
}
