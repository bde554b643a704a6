//! Trace replay, serially or on many simulated CPUs.

use crate::drive::runner::{finish, run_cpus, RunOptions, RunResult};
use crate::error::Error;
use crate::mm::{Cpu, Mm, Point};
use crate::trace::{Op, OpKind, TASK_SIZE};
use crate::PMD_SIZE;
use std::time::Instant;

/// Runs one operation on `cpu`.
#[inline]
pub fn run_op(mm: &Mm, cpu: &mut Cpu, op: &Op) -> crate::Result<()> {
    let r = match op.kind {
        OpKind::Write { addr } => mm.access(cpu, addr, true),
        OpKind::Read { addr } => mm.access(cpu, addr, false),
        OpKind::Mmap { addr, len, flags } => mm.mmap(cpu, addr, len, flags),
        OpKind::Munmap { addr, len } => mm.munmap(cpu, addr, len),
        OpKind::Madvise { addr, len, advice } => mm.madvise(cpu, addr, len, advice),
        OpKind::Mprotect { addr, len, prot } => mm.mprotect(cpu, addr, len, prot),
        OpKind::Mremap { old_addr, old_len, new_addr, new_len } => mm.mremap(cpu, old_addr, old_len, new_addr, new_len),
        OpKind::Brk { addr } => mm.brk(cpu, addr),
    };
    r.map_err(|e| Error::AtLine(op.line, Box::new(e)))
}

/// A stretch of the trace between two VMA operations: each thread's
/// accesses in it, then the VMA operation that ends it (if any).
struct Segment<'a> {
    accesses: Vec<Vec<&'a Op>>,
    barrier: Option<&'a Op>,
}

/// Whether an operation changes VMAs: those are barriers between threads.
fn is_barrier(op: &Op) -> bool {
    !matches!(op.kind, OpKind::Write { .. } | OpKind::Read { .. })
}

fn segments(ops: &[Op], ncpus: usize) -> Vec<Segment<'_>> {
    let mut out = vec![Segment { accesses: vec![Vec::new(); ncpus], barrier: None }];
    for op in ops {
        let last = out.last_mut().expect("one segment at least");
        if is_barrier(op) {
            last.barrier = Some(op);
            out.push(Segment { accesses: vec![Vec::new(); ncpus], barrier: None });
        } else {
            last.accesses[op.thread as usize].push(op);
        }
    }
    out
}

/// A barrier the simulated CPUs wait at by spinning through the scheduler
/// (a wait is a [`Point::Blocked`]), so that it works on host threads and
/// under the deterministic scheduler alike. Not a kernel mechanism: it is
/// how a recorded order ("every earlier line is done") is kept.
struct SpinBarrier {
    n: usize,
    arrived: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicUsize,
    /// A CPU failed: nobody waits any more.
    failed: std::sync::atomic::AtomicBool,
}

impl SpinBarrier {
    /// Returns false if another CPU failed (the run is over).
    fn wait(&self, cpu: &mut Cpu) -> bool {
        use std::sync::atomic::Ordering::*;
        let gen = self.generation.load(Acquire);
        if self.arrived.fetch_add(1, AcqRel) + 1 == self.n {
            self.arrived.store(0, Relaxed);
            self.generation.fetch_add(1, Release);
            return !self.failed.load(Acquire);
        }
        while self.generation.load(Acquire) == gen {
            if self.failed.load(Acquire) {
                return false;
            }
            cpu.preempt(Point::Blocked);
            std::thread::yield_now();
        }
        !self.failed.load(Acquire)
    }
}

/// Runs trace operations on `nthreads` CPUs at once, each thread its own
/// lines in file order. VMA operations are barriers: every earlier line of
/// any thread is done before one runs, and no later line starts before it
/// is done; between barriers the threads' accesses run at once.
fn run_parallel_ops(mm: &Mm, ops: &[Op], nthreads: usize, opts: &RunOptions) -> RunResult {
    let n = nthreads.max(opts.threads).max(1);
    let cpus: Vec<Cpu> = (0..n).map(|i| mm.cpu(i)).collect();
    let segs = segments(ops, n);
    let barrier =
        SpinBarrier { n, arrived: Default::default(), generation: Default::default(), failed: Default::default() };
    run_cpus(mm, cpus, opts, |t, cpu| {
        let mut done = 0u64;
        let r = (|| {
            for seg in &segs {
                for op in &seg.accesses[t] {
                    cpu.preempt(Point::OpBoundary);
                    run_op(mm, cpu, op)?;
                    done += 1;
                }
                let Some(op) = seg.barrier else { continue };
                if !barrier.wait(cpu) {
                    return Ok(());
                }
                if op.thread as usize == t {
                    run_op(mm, cpu, op)?;
                    done += 1;
                }
                if !barrier.wait(cpu) {
                    return Ok(());
                }
            }
            Ok(())
        })();
        r.map(|()| done).map_err(|e| {
            barrier.failed.store(true, std::sync::atomic::Ordering::Release);
            (done, e)
        })
    })
}

/// The PROT_NONE reservation a trace is placed in (as the kernel oracle
/// places it): its mmaps' span rounded out to 2 MiB, plus 2 MiB each side.
pub fn trace_span(ops: &[Op]) -> Option<(u64, u64)> {
    let (lo, hi) = ops.iter().fold((u64::MAX, 0), |(lo, hi), o| match o.kind {
        OpKind::Mmap { addr, len, .. } => (lo.min(addr), hi.max(addr + len)),
        _ => (lo, hi),
    });
    if lo >= hi {
        return None;
    }
    let lo = (lo & !(PMD_SIZE - 1)).saturating_sub(PMD_SIZE);
    let hi = (hi.next_multiple_of(PMD_SIZE) + PMD_SIZE).min(TASK_SIZE);
    Some((lo, hi))
}

/// Replays a parsed trace. Each `@T` thread runs its own lines in order.
/// The trace runs inside a PROT_NONE reservation ([`trace_span`]), as on
/// the kernel oracle, so that page tables are freed on munmap exactly when
/// the kernel frees them there.
pub fn replay(mm: &Mm, ops: &[Op], opts: &RunOptions) -> RunResult {
    if let Some((lo, hi)) = trace_span(ops) {
        let mut cpu = mm.cpu(0);
        if let Err(e) = mm.reserve(&mut cpu, lo, hi) {
            return finish(mm, vec![cpu], 0.0, 0, Some(e), false);
        }
    }
    let nthreads = ops.iter().map(|o| o.thread as usize + 1).max().unwrap_or(1);
    if opts.threads > 1 || opts.deterministic.is_some() {
        return run_parallel_ops(mm, ops, nthreads, opts);
    }
    // Serially, in file order; each trace thread still has its own CPU.
    let mut cpus: Vec<Cpu> = (0..nthreads).map(|i| mm.cpu(i)).collect();
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut error = None;
    for op in ops {
        let cpu = &mut cpus[op.thread as usize];
        if let Err(e) = run_op(mm, cpu, op) {
            error = Some(e);
            break;
        }
        done += 1;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    finish(mm, cpus, elapsed, done, error, opts.check_invariants)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::{Config, Policy};
    use crate::trace::parse;

    /// CPU 0 writes page 0 while CPU 1 reads page 8 of the same 64 KiB
    /// range: if CPU 1's zero-page PTE lands between CPU 0's lockless
    /// estimate and its re-check, CPU 0 loses the race.
    const RACE: &str = "mmap 0x7f0000000000 0x200000\n@0 w 0x7f0000000000\n@1 r 0x7f0000008000\n";

    fn run(policy: Policy, seed: u64) -> RunResult {
        let mut c = Config { policy, ..Default::default() };
        for s in ["16kB=always", "32kB=always", "64kB=always", "2048kB=never"] {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 64 << 20;
        let mm = Mm::new(c).unwrap();
        let r = replay(
            &mm,
            &parse(RACE).unwrap(),
            &RunOptions { threads: 2, deterministic: Some(seed), check_invariants: true },
        );
        assert!(r.error.is_none(), "{:?}", r.error);
        r
    }

    /// The first seed under which CPU 0 loses the race.
    fn racing_seed(policy: Policy) -> u64 {
        (0..200).find(|&s| run(policy, s).stats.race.races > 0).expect("some seed races")
    }

    /// The mmap is on thread 0 and the writes on threads 1 and 2: they
    /// must wait for it, under every seed and on real threads.
    #[test]
    fn vma_operations_are_barriers_between_threads() {
        let mut t = String::from("mmap 0x7f0000000000 0x100000\n");
        for i in 0..64u64 {
            t += &format!("@{} w {:#x}\n", 1 + i % 2, 0x7f0000000000u64 + i * 4096);
        }
        t += "@0 munmap 0x7f0000000000 0x10000\n@1 w 0x7f0000010000\n@2 w 0x7f0000040000\n";
        let ops = parse(&t).unwrap();
        for det in [None, Some(0), Some(1), Some(2), Some(3), Some(7), Some(11), Some(13)] {
            let mut c = Config::default();
            c.memory.phys_bytes = 64 << 20;
            let mm = Mm::new(c).unwrap();
            let r = replay(&mm, &ops, &RunOptions { threads: 3, deterministic: det, check_invariants: true });
            assert!(r.error.is_none(), "{det:?}: {:?}", r.error);
            // 64 pages written, 16 unmapped, one more (page 64) written after.
            assert_eq!(r.stats.rss_pages, 64 - 16 + 1, "{det:?}");
            assert_eq!(r.stats.rss_peak_pages, 64, "{det:?}: the peak was before the munmap");
            assert_eq!(r.ops_done, ops.len() as u64);
        }
    }

    #[test]
    fn a_chosen_race_reproduces_with_its_outcome() {
        for policy in [Policy::Upstream, Policy::V1, Policy::Preferred] {
            let seed = racing_seed(policy);
            let a = run(policy, seed);
            let b = run(policy, seed);
            assert_eq!(a.stats, b.stats, "{policy:?}: same seed, same result");
            let s = &a.stats;
            assert_eq!(s.race.races, 1);
            assert_eq!(s.race.folios_wasted, 1);
            assert_eq!(s.race.pages_wasted, 16, "the lost folio was the 64 KiB one");
            match policy {
                Policy::V1 => {
                    // Re-checked under the PTL, retried one order lower: 32 KiB.
                    assert_eq!(s.race.retries, 1);
                    assert_eq!(s.race.refaults, 0);
                    assert_eq!(s.faults(), 2);
                    assert_eq!(s.mthp[3].anon_fault_alloc, 1);
                }
                Policy::Upstream => {
                    // Dropped, refaulted, and the new estimate picks 32 KiB.
                    assert_eq!(s.race.retries, 0);
                    assert_eq!(s.race.refaults, 1);
                    assert_eq!(s.faults(), 3);
                    assert_eq!(s.mthp[3].anon_fault_alloc, 1);
                }
                Policy::Preferred => {
                    // Dropped, refaulted; 64 KiB no longer fits: order 0.
                    assert_eq!(s.race.refaults, 1);
                    assert_eq!(s.faults(), 3);
                    assert_eq!(s.folio_orders[0], 1);
                    assert_eq!(s.rss_pages, 1);
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod policy_tests {
    use super::*;
    use crate::config::{Config, Policy};
    use crate::trace::parse;

    /// Page 5 populated, then a write to page 0 with only 64kB enabled.
    fn folio_orders(policy: Policy) -> [u64; 10] {
        let mut c = Config { policy, ..Default::default() };
        c.set_size_mode("64kB=always").unwrap();
        c.set_size_mode("2048kB=never").unwrap();
        c.memory.phys_bytes = 64 << 20;
        c.check_invariants = true;
        let mm = Mm::new(c).unwrap();
        let t = "mmap 0x7f0000000000 0x200000 nohugepage\nw 0x7f0000005000\nmadvise 0x7f0000000000 0x200000 hugepage\nw 0x7f0000000000\n";
        let r =
            replay(&mm, &parse(t).unwrap(), &RunOptions { threads: 1, check_invariants: true, ..Default::default() });
        assert!(r.error.is_none(), "{:?}", r.error);
        r.stats.folio_orders
    }

    #[test]
    fn each_policy_picks_its_order_around_a_populated_pte() {
        // upstream: the 64 KiB range is not empty and no other size is on: order 0.
        assert_eq!(folio_orders(Policy::Upstream)[..5], [2, 0, 0, 0, 0]);
        // v1: every order down to 2; 0..3 is empty: a 16 KiB folio.
        assert_eq!(folio_orders(Policy::V1)[..5], [1, 0, 1, 0, 0]);
        // preferred: 64 KiB or nothing: order 0.
        assert_eq!(folio_orders(Policy::Preferred)[..5], [2, 0, 0, 0, 0]);
    }
}
