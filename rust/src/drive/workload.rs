//! Built-in access patterns, generated on the fly (no address lists).

use crate::drive::runner::{finish, run_cpus, JobResult, RunOptions, RunResult};
use crate::error::{Error, Result};
use crate::mm::{Cpu, Mm, Point};
use crate::trace::MmapFlags;
use crate::PAGE_SIZE;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Every page, ascending.
    Sequential,
    /// Every page, descending.
    Reverse,
    /// Every `stride`-th page.
    Stride,
    /// A seeded random order over `fraction` of the pages (default all).
    Random,
    /// Each page with probability `fraction` (default 0.1), ascending.
    Sparse,
    /// will-it-scale's page_fault1: map, write a byte a page, unmap, repeat.
    PageFault1,
}

impl WorkloadKind {
    pub fn parse(s: &str) -> Result<WorkloadKind> {
        Ok(match s {
            "sequential" => WorkloadKind::Sequential,
            "reverse" => WorkloadKind::Reverse,
            "stride" => WorkloadKind::Stride,
            "random" => WorkloadKind::Random,
            "sparse" => WorkloadKind::Sparse,
            "page_fault1" => WorkloadKind::PageFault1,
            _ => {
                return Err(Error::Config(format!(
                    "unknown workload {s:?} (want sequential, reverse, stride, random, sparse or page_fault1)"
                )))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Sequential => "sequential",
            WorkloadKind::Reverse => "reverse",
            WorkloadKind::Stride => "stride",
            WorkloadKind::Random => "random",
            WorkloadKind::Sparse => "sparse",
            WorkloadKind::PageFault1 => "page_fault1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Each thread its own contiguous slice.
    Disjoint,
    /// Threads take turns page by page over the whole range.
    Interleaved,
}

impl Sharing {
    pub fn parse(s: &str) -> Result<Sharing> {
        match s {
            "disjoint" => Ok(Sharing::Disjoint),
            "interleaved" => Ok(Sharing::Interleaved),
            _ => Err(Error::Config(format!("unknown sharing {s:?} (want disjoint or interleaved)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Sharing::Disjoint => "disjoint",
            Sharing::Interleaved => "interleaved",
        }
    }
}

/// The advice the workload's VMA gets right after its mmap (`madvise(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadAdvice {
    /// `MADV_HUGEPAGE`: sizes at `madvise` (and `inherit` under a top-level
    /// `madvise`) are allowed.
    Hugepage,
    /// `MADV_NOHUGEPAGE`: no large folio at all.
    NoHugepage,
    /// No madvise: only sizes at `always` (or `inherit` under `always`).
    None,
}

impl WorkloadAdvice {
    pub fn parse(s: &str) -> Result<WorkloadAdvice> {
        match s {
            "hugepage" => Ok(WorkloadAdvice::Hugepage),
            "nohugepage" => Ok(WorkloadAdvice::NoHugepage),
            "none" => Ok(WorkloadAdvice::None),
            _ => Err(Error::Config(format!("unknown advice {s:?} (want hugepage, nohugepage or none)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WorkloadAdvice::Hugepage => "hugepage",
            WorkloadAdvice::NoHugepage => "nohugepage",
            WorkloadAdvice::None => "none",
        }
    }
    fn flags(self) -> MmapFlags {
        MmapFlags {
            hugepage: self == WorkloadAdvice::Hugepage,
            nohugepage: self == WorkloadAdvice::NoHugepage,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Bytes mapped (for page_fault1: per thread, default 128 MiB).
    pub size: u64,
    /// Pages between touches for `stride`.
    pub stride: u64,
    /// Fraction of pages for `random`/`sparse`; 0 means the default.
    pub fraction: f64,
    pub seed: u64,
    /// page_fault1 rounds.
    pub iterations: u64,
    pub sharing: Sharing,
    /// The VMA's advice; None is the workload's own ([`Workload::advice`]).
    pub advice: Option<WorkloadAdvice>,
    /// page_fault1 as will-it-scale's process mode: each CPU a task of its
    /// own mm. The simulator still has one mm; the regions lie apart (as in
    /// different address spaces nothing merges), and in virtual time each
    /// CPU's mmap lock and VMA locks are its own, while `zone->lock`, the
    /// lruvec lock and the page allocator stay shared, as between processes.
    pub processes: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            kind: WorkloadKind::Sequential,
            size: 1 << 30,
            stride: 1,
            fraction: 0.0,
            seed: 0,
            iterations: 1,
            sharing: Sharing::Disjoint,
            advice: None,
            processes: false,
        }
    }
}

/// Where the workload's VMA starts: 1 GiB aligned, far from anything.
pub const WORKLOAD_BASE: u64 = 0x1000_0000_0000;

/// A bijection on [0, 2^k) mixed enough to look random; cycle-walked to [0, n).
struct Permutation {
    n: u64,
    mask: u64,
    k: u32,
    a: u64,
    b: u64,
    c: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Permutation {
        let k = 64 - n.max(2).saturating_sub(1).leading_zeros();
        let mut s = seed ^ 0x2545_f491_4f6c_dd1d | 1;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        Permutation { n, mask: (1u64 << k) - 1, k, a: r() | 1, b: r(), c: r() | 1 }
    }
    #[inline]
    fn f(&self, mut x: u64) -> u64 {
        let h = (self.k / 2).max(1);
        for _ in 0..2 {
            x = x.wrapping_mul(self.a).wrapping_add(self.b) & self.mask;
            x ^= x >> h;
            x = x.wrapping_mul(self.c) & self.mask;
        }
        x
    }
    #[inline]
    fn get(&self, i: u64) -> u64 {
        let mut x = self.f(i);
        while x >= self.n {
            x = self.f(x);
        }
        x
    }
}

#[inline]
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Workload {
    /// The advice the VMA gets: the one asked for, else MADV_HUGEPAGE, except
    /// page_fault1, which will-it-scale maps without advice.
    pub fn advice(&self) -> WorkloadAdvice {
        self.advice.unwrap_or(match self.kind {
            WorkloadKind::PageFault1 => WorkloadAdvice::None,
            _ => WorkloadAdvice::Hugepage,
        })
    }

    fn check(&self) -> Result<()> {
        if self.size == 0 || !self.size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Config(format!("size {} is not a positive multiple of 4096", self.size)));
        }
        if self.size > 1 << 46 {
            return Err(Error::Config(format!("size {} is larger than the 64 TiB this simulator maps", self.size)));
        }
        if self.stride == 0 {
            return Err(Error::Config("stride must be at least 1 page".into()));
        }
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(Error::Config(format!("fraction {} is outside 0..1", self.fraction)));
        }
        Ok(())
    }

    fn fraction_or(&self, d: f64) -> f64 {
        if self.fraction > 0.0 {
            self.fraction
        } else {
            d
        }
    }

    /// The number of touches in the whole pattern (over all threads).
    pub fn touches(&self) -> u64 {
        let n = self.size / PAGE_SIZE;
        match self.kind {
            WorkloadKind::Sequential | WorkloadKind::Reverse | WorkloadKind::PageFault1 => n,
            WorkloadKind::Stride => n.div_ceil(self.stride),
            WorkloadKind::Random => ((n as f64) * self.fraction_or(1.0)).ceil() as u64,
            WorkloadKind::Sparse => n, // candidates; each kept with probability `fraction`
        }
    }

    /// The page touched at step `i` of the pattern, or None if step `i`
    /// touches nothing (sparse).
    #[inline]
    pub fn page(&self, perm: Option<&PermutationRef>, i: u64) -> Option<u64> {
        let n = self.size / PAGE_SIZE;
        match self.kind {
            WorkloadKind::Sequential | WorkloadKind::PageFault1 => Some(i),
            WorkloadKind::Reverse => Some(n - 1 - i),
            WorkloadKind::Stride => Some(i * self.stride),
            WorkloadKind::Random => Some(perm.expect("random needs a permutation").0.get(i)),
            WorkloadKind::Sparse => {
                let f = self.fraction_or(0.1);
                ((mix(i ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 11) as f64 / (1u64 << 53) as f64) < f
            }
            .then_some(i),
        }
    }

    /// Which steps of the pattern thread `t` of `nt` runs, as (start, end, step).
    pub fn share(&self, t: u64, nt: u64) -> (u64, u64, u64) {
        let total = self.touches();
        match self.sharing {
            Sharing::Disjoint => {
                let per = total.div_ceil(nt);
                ((t * per).min(total), ((t + 1) * per).min(total), 1)
            }
            Sharing::Interleaved => (t, total, nt),
        }
    }
}

pub struct PermutationRef(Permutation);

/// Runs a built-in workload.
pub fn run_workload(mm: &Mm, w: &Workload, opts: &RunOptions) -> RunResult {
    let threads = opts.threads.max(1);
    if let Err(e) = w.check() {
        return finish(mm, vec![], 0.0, 0, Some(e), false);
    }
    let perm = (w.kind == WorkloadKind::Random).then(|| PermutationRef(Permutation::new(w.size / PAGE_SIZE, w.seed)));
    if threads > 1 || opts.deterministic.is_some() || opts.time.is_some() {
        return run_parallel_workload(mm, w, perm.as_ref(), threads, opts);
    }
    let mut cpu = mm.cpu(0);
    if let Err(e) = map_workload(mm, &mut cpu, w) {
        return finish(mm, vec![cpu], 0.0, 0, Some(e), false);
    }
    let t0 = Instant::now();
    let r = run_share(mm, &mut cpu, w, perm.as_ref(), 0, 1);
    let elapsed = t0.elapsed().as_secs_f64();
    let (done, err) = match r {
        Ok(n) => (n, None),
        Err((n, e)) => (n, Some(e)),
    };
    finish(mm, vec![cpu], elapsed, done, err, opts.check_invariants)
}

/// Runs thread `t`'s share of a workload on `cpu`; returns operations done.
fn run_share(mm: &Mm, cpu: &mut Cpu, w: &Workload, perm: Option<&PermutationRef>, t: u64, nt: u64) -> JobResult {
    let mut done = 0u64;
    if w.kind == WorkloadKind::PageFault1 {
        // Each task maps its own region, as will-it-scale's threads do: the
        // kernel places them side by side (top-down, each below the last,
        // PMD-aligned when the size is a multiple of 2 MiB), so that
        // adjacent regions merge into one VMA and every munmap splits it.
        // Processes' regions are in different mms: apart, never merged.
        let base = if w.processes {
            crate::drive::vtime::set_mm(t as usize);
            WORKLOAD_BASE + t * (w.size.next_multiple_of(crate::PMD_SIZE) + crate::PMD_SIZE)
        } else {
            WORKLOAD_BASE + t * w.size
        };
        for _ in 0..w.iterations.max(1) {
            mm.mmap(cpu, base, w.size, w.advice().flags()).map_err(|e| (done, e))?;
            let r = touch_pages(mm, cpu, (0..w.size / PAGE_SIZE).map(|p| base + p * PAGE_SIZE), true);
            done += r.map_err(|(n, e)| (done + n, e))?;
            mm.munmap(cpu, base, w.size).map_err(|e| (done, e))?;
        }
        return Ok(done);
    }
    let (s, e, step) = w.share(t, nt);
    let addrs = (s..e).step_by(step as usize).filter_map(|i| w.page(perm, i)).map(|p| WORKLOAD_BASE + p * PAGE_SIZE);
    touch_pages(mm, cpu, addrs, false)
}

/// Writes one byte of each page in `addrs` under one hold of the mmap lock
/// for read, letting waiting writers in between accesses (another task's
/// mmap/munmap waits for this one). `switch_first` puts the scheduling
/// point before each access instead of after it.
#[inline]
fn touch_pages(mm: &Mm, cpu: &mut Cpu, addrs: impl Iterator<Item = u64>, switch_first: bool) -> JobResult {
    let pc = cpu.percpu();
    let mut g = mm.mmap_read_lock(&pc, cpu);
    let mut done = 0u64;
    for a in addrs {
        if switch_first {
            cpu.preempt(Point::OpBoundary);
        }
        if let Err(e) = mm.access_locked(&g, cpu, a, true) {
            drop(g);
            cpu.sync_pcp_gauge();
            return Err((done, e));
        }
        done += 1;
        if !switch_first {
            cpu.preempt(Point::OpBoundary);
        }
        g.yield_to_writer(|| cpu.preempt(Point::Blocked));
    }
    drop(g);
    cpu.sync_pcp_gauge();
    Ok(done)
}

/// Maps the workload's VMA, with its advice ([`Workload::advice`]).
pub fn map_workload(mm: &Mm, cpu: &mut Cpu, w: &Workload) -> Result<()> {
    if w.kind == WorkloadKind::PageFault1 {
        return Ok(());
    }
    mm.mmap(cpu, WORKLOAD_BASE, w.size, w.advice().flags())
}

pub(crate) fn run_parallel_workload(
    mm: &Mm,
    w: &Workload,
    perm: Option<&PermutationRef>,
    threads: usize,
    opts: &RunOptions,
) -> RunResult {
    let mut cpus: Vec<Cpu> = (0..threads).map(|i| mm.cpu(i)).collect();
    if let Err(e) = map_workload(mm, &mut cpus[0], w) {
        return finish(mm, cpus, 0.0, 0, Some(e), false);
    }
    let nt = threads as u64;
    run_cpus(mm, cpus, opts, |t, cpu| run_share(mm, cpu, w, perm, t as u64, nt))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::{Config, Policy};

    fn cfg(policy: Policy, sizes: &[&str]) -> Config {
        let mut c = Config { policy, ..Default::default() };
        for s in sizes {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 1 << 30;
        c
    }

    fn run(c: Config, w: &Workload, threads: usize, det: Option<u64>) -> RunResult {
        let mm = Mm::new(c).unwrap();
        let r = run_workload(
            &mm,
            w,
            &RunOptions { threads, deterministic: det, check_invariants: true, ..Default::default() },
        );
        assert!(r.error.is_none(), "{:?}", r.error);
        r
    }

    #[test]
    fn patterns_touch_what_they_say() {
        let c = || cfg(Policy::Upstream, &["2048kB=never"]);
        let mk =
            |kind, stride, fraction| Workload { kind, size: 4 << 20, stride, fraction, seed: 3, ..Default::default() };
        assert_eq!(run(c(), &mk(WorkloadKind::Sequential, 1, 0.0), 1, None).stats.faults(), 1024);
        assert_eq!(run(c(), &mk(WorkloadKind::Reverse, 1, 0.0), 1, None).stats.faults(), 1024);
        assert_eq!(run(c(), &mk(WorkloadKind::Stride, 3, 0.0), 1, None).stats.faults(), 342);
        assert_eq!(run(c(), &mk(WorkloadKind::Random, 1, 0.0), 1, None).stats.faults(), 1024);
        assert_eq!(run(c(), &mk(WorkloadKind::Random, 1, 0.5), 1, None).stats.faults(), 512);
        let sparse = run(c(), &mk(WorkloadKind::Sparse, 1, 0.1), 1, None).stats.faults();
        assert!((60..150).contains(&sparse), "{sparse}");
        let pf1 = Workload { kind: WorkloadKind::PageFault1, size: 1 << 20, iterations: 3, ..Default::default() };
        let r = run(c(), &pf1, 2, None);
        assert_eq!(r.stats.faults(), 2 * 3 * 256);
        assert_eq!(r.stats.rss_pages, 0);
    }

    #[test]
    fn advice_decides_which_sizes_the_vma_gets() {
        // Kernel defaults: enabled=madvise, 2048kB=inherit; 64kB=always on top.
        let c = || cfg(Policy::Upstream, &["64kB=always"]);
        let mk = |kind, advice| Workload { kind, size: 4 << 20, advice, ..Default::default() };
        let hp = run(c(), &mk(WorkloadKind::Sequential, None), 1, None).stats;
        assert_eq!(hp.faults(), 2, "advised: two PMD THPs");
        let none = run(c(), &mk(WorkloadKind::Sequential, Some(WorkloadAdvice::None)), 1, None).stats;
        assert_eq!(none.faults(), 64, "unadvised: 64kB folios only");
        let no = run(c(), &mk(WorkloadKind::Sequential, Some(WorkloadAdvice::NoHugepage)), 1, None).stats;
        assert_eq!(no.faults(), 1024, "MADV_NOHUGEPAGE: order 0 only");
        // page_fault1 is unadvised by default, as will-it-scale maps it.
        let pf1 = Workload { kind: WorkloadKind::PageFault1, size: 4 << 20, ..Default::default() };
        assert_eq!(pf1.advice(), WorkloadAdvice::None);
        assert_eq!(run(c(), &pf1, 1, None).stats.faults(), 64);
    }

    #[test]
    fn interleaved_threads_lose_nothing() {
        for policy in [Policy::Upstream, Policy::V1, Policy::Preferred] {
            let w = Workload { size: 16 << 20, sharing: Sharing::Interleaved, ..Default::default() };
            let r = run(cfg(policy, &["64kB=always", "16kB=always", "2048kB=never"]), &w, 2, None);
            assert_eq!(r.stats.rss_pages, 4096, "{policy:?}");
        }
    }

    #[test]
    fn a_cpu_overtaken_at_fault_entry_finds_the_page_mapped_a_spurious_fault() {
        // Only a switch between the failed walk and the handler's look at
        // the entry makes a fault spurious: the seeded scheduler does not
        // switch before accesses, so these come from Point::FaultEntry.
        let w = Workload { size: 4 << 20, sharing: Sharing::Interleaved, ..Default::default() };
        let r = run(cfg(Policy::Upstream, &["64kB=always", "2048kB=never"]), &w, 8, Some(1));
        assert!(r.stats.fault.spurious > 0, "{:?}", r.stats.fault);
        assert_eq!(r.stats.rss_pages, 1024);
    }

    #[test]
    fn deterministic_runs_repeat_bit_for_bit() {
        for policy in [Policy::Upstream, Policy::V1, Policy::Preferred] {
            let w = Workload { size: 4 << 20, sharing: Sharing::Interleaved, ..Default::default() };
            let c = || cfg(policy, &["64kB=always", "16kB=always", "2048kB=never"]);
            let a = run(c(), &w, 8, Some(42));
            let b = run(c(), &w, 8, Some(42));
            assert_eq!(a.stats, b.stats, "{policy:?}");
            assert_eq!(a.per_cpu_faults, b.per_cpu_faults);
            assert!(a.stats.race.races > 0, "{policy:?}: interleaved CPUs should race");
            assert_eq!(a.stats.rss_pages, 1024);
        }
    }
}
