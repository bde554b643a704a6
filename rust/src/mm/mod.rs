//! The kernel model: one module per kernel source file it mirrors, with the
//! kernel's names. This file holds the address space (`struct mm_struct`)
//! and the simulated CPUs that fault into it.
//!
//! A simulated CPU ([`Cpu`]) is the simulator's own notion, not a kernel
//! structure: it owns what the kernel keeps per CPU for the fault path (the
//! per-CPU page lists, the memcg charge stock) and the counters it bumps.

pub mod debug_vm;
pub mod gup;
pub mod huge_memory;
pub mod madvise;
pub mod memcontrol;
pub mod memory;
pub mod mm_types;
pub mod mmap;
pub mod mmap_lock;
pub mod mprotect;
pub mod mremap;
pub mod page_alloc;
pub mod pgtable;
pub mod rmap;
pub mod spinlock;
pub mod swap;
pub mod vma;
pub mod vmstat;

use crate::config::{Config, OnRace};
use crate::error::{Error, Result};
use crate::sync::Mutex;
use crossbeam_utils::CachePadded;
use memcontrol::MemCg;
use mmap_lock::{MmapLock, MmapReadGuard, MmapWriteGuard};
use page_alloc::{FailInject, PageAlloc, PerCpuPages};
use pgtable::PageTable;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use vma::{Vma, VmaInfo};
use vmstat::{Counter, CpuCounters, LockCounters, Stats};

/// Places in the fault path where another CPU can overtake this one; a
/// deterministic scheduler switches CPUs there. Not kernel names: each is a
/// window in which the kernel's CPU holds no lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The MMU's walk failed and the fault handler begins (the exception
    /// entry, before `handle_mm_fault` reads the page table): another CPU
    /// may map the page meanwhile, and the handler then finds it present
    /// (a spurious fault) or loses the race under the PTL.
    FaultEntry,
    /// After the lockless `pte_range_none` estimate, before allocating.
    AfterEstimate,
    /// After the folio is allocated and charged, before the PTL.
    AfterAlloc,
    /// About to take the PTL.
    BeforeLock,
    /// Between two accesses of a CPU. Only the scheduler in virtual time
    /// switches here (before each access it runs the CPU with the smallest
    /// clock); the seeded one does not listen. What other CPUs do first
    /// under the mmap read lock cannot change an access that hits a
    /// present, permitted entry (their faults fill empty entries, or
    /// replace the zero page, which reads the same), and what clears or
    /// downgrades entries takes the lock for write: a replay runs it as a
    /// barrier between its CPUs' accesses, a workload's CPU lets it in only
    /// at a [`Point::Blocked`]. An access that misses reaches
    /// [`Point::FaultEntry`].
    OpBoundary,
    /// Waiting for the mmap lock or a barrier: someone else must run.
    Blocked,
}

impl Point {
    /// This point's bit in a scheduler's [`Cpu::points`] mask.
    #[inline(always)]
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Every point.
    pub const ALL: u8 = (1 << (Point::Blocked as u8 + 1)) - 1;
}

/// What one CPU publishes: its counters and its mmap-lock reader word.
#[derive(Default)]
pub struct PerCpu {
    pub counters: CpuCounters,
    /// Split PTE-table locks.
    pub ptl: LockCounters,
    /// `mm->page_table_lock`.
    pub page_table_lock: LockCounters,
    /// `zone->lock`.
    pub zone_lock: LockCounters,
    /// The mmap lock, write side.
    pub mmap_lock: LockCounters,
    /// Pages on this CPU's per-CPU lists.
    pub pcp_pages: Counter,
    reader: crate::sync::AtomicU32,
}

impl PerCpu {
    /// Adds every figure of `o` to this record (a retiring CPU's into the
    /// mm's record of retired CPUs).
    fn absorb(&self, o: &PerCpu) {
        self.counters.absorb(&o.counters);
        for (a, b) in [
            (&self.ptl, &o.ptl),
            (&self.page_table_lock, &o.page_table_lock),
            (&self.zone_lock, &o.zone_lock),
            (&self.mmap_lock, &o.mmap_lock),
        ] {
            a.absorb(b);
        }
        self.pcp_pages.add(o.pcp_pages.get());
    }
}

/// A simulated CPU: its per-CPU page lists, memcg stock, counters and VMA
/// lookup cache. One thread drives a CPU at a time.
pub struct Cpu {
    pub id: usize,
    pub(crate) mm: Arc<MmInner>,
    pub(crate) pc: Arc<CachePadded<PerCpu>>,
    pub(crate) pcp: PerCpuPages,
    pub(crate) stock: u64,
    pub(crate) fail: FailInject,
    /// `vmacache` (gone from the kernel since the maple tree): the last VMA
    /// found, valid while the tree's `seq` is `vma_seq`.
    vma_seq: u64,
    vma: *const Vma,
    /// Set while the fault of a user store is handled, cleared by a handler
    /// that marks the faulting page written as it maps it, so that the
    /// store need not walk the table again to mark it (not a kernel field).
    pub(crate) store_pending: bool,
    /// A deterministic scheduler's hook, called at each [`Point`] whose
    /// bit is in `points`.
    pub sched: Option<Box<dyn FnMut(Point) + Send>>,
    /// The points the scheduler listens to ([`Point::bit`]): one test of a
    /// byte of the CPU at the others, instead of a call.
    pub points: u8,
}

// SAFETY: `vma` is the only field that is not Send. It points into an
// `Arc<Vma>` owned by the VMA tree of `mm`, and is dereferenced only under
// that mm's mmap lock while the tree's `seq` equals `vma_seq` (see
// `MmInner::lookup`), from whichever thread drives the CPU; `Vma` is Sync.
unsafe impl Send for Cpu {}

impl Cpu {
    #[inline(always)]
    pub(crate) fn c(&self) -> &CpuCounters {
        &self.pc.counters
    }

    /// This CPU's published record (its reader word is what a read guard
    /// borrows).
    pub fn percpu(&self) -> Arc<CachePadded<PerCpu>> {
        self.pc.clone()
    }

    #[inline(always)]
    pub(crate) fn preempt(&mut self, p: Point) {
        if self.points & p.bit() == 0 {
            return;
        }
        if let Some(f) = self.sched.as_mut() {
            f(p);
        }
    }

    /// Faults this CPU has handled.
    pub fn faults(&self) -> u64 {
        self.c().vm.pgfault.get()
    }

    /// Gives the per-CPU pages and the memcg stock back (`drain_local_pages`).
    pub fn drain(&mut self) {
        let mm = self.mm.clone();
        mm.alloc.drain_pcp(&mut self.pcp, u64::MAX, &self.pc.zone_lock);
        self.pc.pcp_pages.sub(self.pc.pcp_pages.get());
        mm.memcg.drain_stock(&mut self.stock);
    }

    #[inline(always)]
    pub(crate) fn sync_pcp_gauge(&self) {
        let g = &self.pc.pcp_pages;
        if g.get() != self.pcp.count {
            g.sub(g.get());
            g.add(self.pcp.count);
        }
    }
}

impl Drop for Cpu {
    /// The CPU goes offline: its pages go back, and its record joins the
    /// retired CPUs' so that a long-lived mm keeps one record per live CPU.
    fn drop(&mut self) {
        self.drain();
        let mut cpus = self.mm.cpus.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cpus.iter().position(|p| Arc::ptr_eq(p, &self.pc)) {
            cpus.swap_remove(i);
        }
        self.mm.retired.absorb(&self.pc);
    }
}

pub struct MmInner {
    pub cfg: Config,
    /// `cfg.on_race()`, resolved once.
    pub on_race: OnRace,
    /// `ANONFOLIO_DEBUG_VM`: check the invariants after every run.
    pub debug_vm: bool,
    pub pt: PageTable,
    pub alloc: PageAlloc,
    pub memcg: MemCg,
    /// On cache lines of its own: every fault reads its writer word.
    pub(crate) mmap_lock: CachePadded<MmapLock>,
    /// Live CPUs, whose reader words a writer waits for.
    cpus: Mutex<Vec<Arc<CachePadded<PerCpu>>>>,
    /// The figures of CPUs that are gone; written with `cpus` held.
    retired: CachePadded<PerCpu>,
    next_anon_vma: AtomicU64,
    pub huge_zero_used: AtomicBool,
    /// `mm->hiwater_rss`, in pages.
    hiwater_rss: CachePadded<AtomicU64>,
}

/// The simulated process's mm. Cheap to clone; every clone is the same mm.
#[derive(Clone)]
pub struct Mm {
    pub(crate) inner: Arc<MmInner>,
}

impl std::ops::Deref for Mm {
    type Target = MmInner;
    fn deref(&self) -> &MmInner {
        &self.inner
    }
}

impl Mm {
    /// A new, empty mm. With `ANONFOLIO_DEBUG_VM` set in the environment
    /// (as the test suites set it) every run ends with the invariant check,
    /// whatever the configuration says: the simulator's CONFIG_DEBUG_VM.
    pub fn new(cfg: Config) -> Result<Mm> {
        let debug_vm = std::env::var_os("ANONFOLIO_DEBUG_VM").is_some_and(|v| !v.is_empty() && v != "0");
        let m = &cfg.memory;
        if !(0.0..=1.0).contains(&cfg.preempt) {
            return Err(Error::Config(format!("preempt probability {} is outside 0..1", cfg.preempt)));
        }
        if !(0.0..=1.0).contains(&m.fail_rate) {
            return Err(Error::Config(format!("fail rate {} is outside 0..1", m.fail_rate)));
        }
        let alloc = PageAlloc::new(m.phys_bytes, m.fragmentation, m.seed)?;
        let memcg = MemCg::new(m.memcg_limit_bytes);
        Ok(Mm {
            inner: Arc::new(MmInner {
                pt: PageTable::default(),
                alloc,
                memcg,
                mmap_lock: CachePadded::new(MmapLock::default()),
                cpus: Mutex::new(Vec::new()),
                retired: CachePadded::new(PerCpu::default()),
                next_anon_vma: AtomicU64::new(1),
                huge_zero_used: AtomicBool::new(false),
                hiwater_rss: CachePadded::new(AtomicU64::new(0)),
                on_race: cfg.on_race(),
                debug_vm,
                cfg,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// A new simulated CPU of this mm.
    pub fn cpu(&self, id: usize) -> Cpu {
        let pc = Arc::new(CachePadded::new(PerCpu::default()));
        self.cpus.lock().unwrap_or_else(|p| p.into_inner()).push(pc.clone());
        let m = &self.cfg.memory;
        Cpu {
            id,
            mm: self.inner.clone(),
            pc,
            pcp: PerCpuPages::default(),
            stock: 0,
            fail: FailInject {
                fail_orders: m.fail_orders,
                fail_rate: m.fail_rate,
                rng: (m.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            },
            vma_seq: u64::MAX,
            vma: std::ptr::null(),
            store_pending: false,
            sched: None,
            points: 0,
        }
    }

    /// One user access (a one-byte read or write at `addr`); faults as the
    /// MMU would. Takes the mmap lock for read around it.
    pub fn access(&self, cpu: &mut Cpu, addr: u64, write: bool) -> Result<()> {
        let pc = cpu.percpu();
        let g = self.mmap_read_lock(&pc, cpu);
        let r = self.access_held(&pc, g, cpu, addr, write).map(drop);
        cpu.sync_pcp_gauge();
        r
    }

    /// [`Mm::access`] by a CPU that already holds the mmap lock for read
    /// (`g`, taken with its record `pc`), so that a run of one thread's
    /// accesses takes the lock once, as a fault loop does: the same access,
    /// the lock dropped and retaken only for a stack growth. Gives the
    /// guard back, or drops it with an error. The caller syncs the per-CPU
    /// page gauge ([`Cpu::sync_pcp_gauge`]) when it lets go of the lock.
    #[inline(always)]
    pub(crate) fn access_held<'a>(
        &'a self,
        pc: &'a PerCpu,
        g: MmapReadGuard<'a>,
        cpu: &mut Cpu,
        addr: u64,
        write: bool,
    ) -> Result<MmapReadGuard<'a>> {
        match self.access_locked(&g, cpu, addr, write) {
            Ok(()) => Ok(g),
            Err(Error::Segv(a)) => {
                drop(g);
                if !self.expand_stack(cpu, addr)? {
                    return Err(Error::Segv(a));
                }
                // The stack grew to cover `addr`: the fault proceeds (one fault).
                let g = self.mmap_read_lock(pc, cpu);
                self.access_locked(&g, cpu, addr, write).map(|()| g)
            }
            Err(e) => Err(e),
        }
    }

    /// A snapshot of all figures, summed over CPUs. Reading changes nothing.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        let cpus = self.cpus.lock().unwrap_or_else(|p| p.into_inner());
        for pc in cpus.iter().map(|p| &***p).chain(std::iter::once(&*self.retired)) {
            s.add_cpu(&pc.counters);
            pc.ptl.add_to(&mut s.ptl);
            pc.page_table_lock.add_to(&mut s.page_table_lock);
            pc.zone_lock.add_to(&mut s.zone_lock);
            pc.mmap_lock.add_to(&mut s.mmap_lock);
            s.mem.pcp_pages += pc.pcp_pages.get();
        }
        drop(cpus);
        s.rss_peak_pages = s.rss_pages.max(self.hiwater_rss.load(Relaxed));
        s.mem.phys_pages = self.alloc.phys_pages;
        s.mem.pinned_pages = self.alloc.shared.pinned.load(Relaxed);
        s.mem.used_pages = s.vm.pgalloc.wrapping_sub(s.vm.pgfree);
        s.mem.nr_ptes = self.pt.nr_ptes.load(Relaxed);
        s.mem.memcg_usage = self.memcg.usage();
        s.mem.memcg_charge_fail = self.memcg.failcnt.load(Relaxed);
        s.mem.host_bytes = self.pt.host_bytes() + self.alloc.host_bytes();
        s
    }

    /// The VMAs, read under the mmap lock (a reader word of its own, so any
    /// thread may call this while CPUs run).
    pub fn vmas(&self) -> Vec<VmaInfo> {
        let mut cpu = self.cpu(usize::MAX);
        let pc = cpu.percpu();
        let g = self.mmap_read_lock(&pc, &mut cpu);
        g.infos()
    }

    /// Live simulated CPUs (their records; retired ones are folded away).
    pub fn nr_cpus(&self) -> usize {
        self.cpus.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl MmInner {
    /// The records of the live CPUs (for a writer to wait on).
    fn live_cpus(&self) -> Vec<Arc<CachePadded<PerCpu>>> {
        self.cpus.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn new_anon_vma(&self) -> u64 {
        self.next_anon_vma.fetch_add(1, Relaxed)
    }

    /// `mmap_read_lock()` for `cpu`, whose record `pc` is; a wait for a
    /// writer is a scheduling point.
    #[inline]
    pub fn mmap_read_lock<'a>(&'a self, pc: &'a PerCpu, cpu: &mut Cpu) -> MmapReadGuard<'a> {
        // The CPU's caches (VMA, PMD slot) and the writers' view of the
        // readers rely on both: checked, not assumed.
        assert!(std::ptr::eq(&*cpu.mm, self), "simulated CPU {} belongs to another mm", cpu.id);
        assert!(std::ptr::eq(pc, &**cpu.pc), "the reader word must be the CPU's own");
        self.mmap_lock.read(&pc.reader, || cpu.preempt(Point::Blocked))
    }

    /// `mmap_write_lock()` for `cpu`, counted in its figures; waits for
    /// every live CPU's reader word.
    pub(crate) fn mmap_write_lock<'a>(&'a self, cpu: &mut Cpu) -> MmapWriteGuard<'a> {
        assert!(std::ptr::eq(&*cpu.mm, self), "simulated CPU {} belongs to another mm", cpu.id);
        assert_eq!(
            cpu.pc.reader.load(Relaxed),
            0,
            "simulated CPU {} takes the mmap lock for write while holding it for read",
            cpu.id
        );
        cpu.pc.mmap_lock.acquisitions.inc();
        let (g, waits, contended) =
            self.mmap_lock.write(|| self.live_cpus(), |p| &p.reader, || cpu.preempt(Point::Blocked));
        if contended {
            cpu.pc.mmap_lock.contended.inc();
        }
        cpu.pc.mmap_lock.spins.add(waits);
        g
    }

    /// `update_hiwater_rss()`: RSS only falls when something is zapped, and
    /// zaps happen under the mmap write lock, so marking it there (faults
    /// are excluded) keeps the exact peak.
    fn update_hiwater_rss(&self) {
        let cpus = self.cpus.lock().unwrap_or_else(|p| p.into_inner());
        let rss = cpus
            .iter()
            .map(|p| &***p)
            .chain(std::iter::once(&*self.retired))
            .fold(0u64, |a, p| a.wrapping_add(p.counters.rss.get()));
        drop(cpus);
        self.hiwater_rss.fetch_max(rss, Relaxed);
    }

    /// Runs `f` under the mmap write lock, as the system calls that change
    /// VMAs do.
    pub(crate) fn with_write_lock<T>(
        &self,
        cpu: &mut Cpu,
        f: impl FnOnce(&MmInner, &mut MmapWriteGuard<'_>, &mut Cpu) -> Result<T>,
    ) -> Result<T> {
        crate::drive::vtime::step(crate::drive::vtime::Step::Syscall);
        let mut g = self.mmap_write_lock(cpu);
        crate::drive::vtime::mmap_write_lock();
        self.update_hiwater_rss();
        let r = f(self, &mut g, cpu);
        cpu.sync_pcp_gauge();
        let (wlocked, nr) = g.take_write_locked();
        crate::drive::vtime::mmap_write_unlock(&wlocked, nr);
        drop(g);
        r
    }

    /// `find_vma()` restricted to VMAs containing `addr` (`vma_lookup`),
    /// through the CPU's one-entry cache.
    #[inline(always)]
    pub(crate) fn lookup<'g>(&self, g: &'g MmapReadGuard<'_>, cpu: &mut Cpu, addr: u64) -> Option<&'g Vma> {
        if cpu.vma_seq == g.seq && !cpu.vma.is_null() {
            // SAFETY: the pointer was taken from this tree when its `seq`
            // was `vma_seq`; every write section bumps `seq`, so the tree is
            // unchanged since and still owns the `Arc<Vma>`; the read guard
            // `g` keeps writers out for `'g`.
            let v = unsafe { &*cpu.vma };
            if addr >= v.start && addr < v.end {
                return Some(v);
            }
        }
        let v = g.lookup(addr)?;
        cpu.vma_seq = g.seq;
        cpu.vma = Arc::as_ptr(v);
        Some(v)
    }
}

/// What the tests of the new operations share: an mm configured as the
/// kernel measurements were taken (top-level `madvise`, 16kB and 64kB
/// `madvise`, 2048kB `inherit`), and short names for its figures.
#[cfg(all(test, not(loom)))]
pub(crate) mod testing {
    use super::*;
    use crate::trace::{MmapFlags, Prot};

    pub const B: u64 = 0x7f00_0000_0000;
    pub const K: u64 = 1024;

    pub fn mm() -> (Mm, Cpu) {
        let mut c = Config::default();
        for s in ["16kB=madvise", "64kB=madvise", "2048kB=inherit"] {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 256 << 20;
        let mm = Mm::new(c).unwrap();
        let cpu = mm.cpu(0);
        (mm, cpu)
    }

    pub fn hg() -> MmapFlags {
        MmapFlags { hugepage: true, ..Default::default() }
    }

    pub fn prot(p: Prot) -> MmapFlags {
        MmapFlags { prot: p, ..Default::default() }
    }

    /// Writes (or reads) every page of `[a, a+len)`.
    pub fn touch(mm: &Mm, cpu: &mut Cpu, a: u64, len: u64, write: bool) {
        for p in (a..a + len).step_by(crate::PAGE_SIZE as usize) {
            mm.access(cpu, p, write).unwrap();
        }
    }

    pub fn faults(mm: &Mm) -> u64 {
        mm.stats().faults()
    }

    pub fn is_segv(r: Result<()>) -> bool {
        matches!(r, Err(Error::SegvAccess { .. }) | Err(Error::Segv(_)))
    }

    /// The invariant checker must pass.
    pub fn check(mm: &Mm) {
        mm.check_invariants().unwrap();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::testing::*;

    /// A CPU carries caches of its own mm (the last VMA found); used on
    /// another mm they would point into the wrong tree, so the lock refuses.
    #[test]
    #[should_panic(expected = "belongs to another mm")]
    fn a_cpu_of_one_mm_cannot_access_another() {
        let (a, _ca) = mm();
        let (b, mut cb) = mm();
        b.mmap(&mut cb, B, 1 << 20, Default::default()).unwrap();
        a.mmap(&mut cb, B, 1 << 20, Default::default()).unwrap();
    }

    #[test]
    #[should_panic(expected = "belongs to another mm")]
    fn a_cpu_of_one_mm_cannot_fault_in_another() {
        let (a, mut ca) = mm();
        let (b, mut cb) = mm();
        a.mmap(&mut ca, B, 1 << 20, Default::default()).unwrap();
        b.mmap(&mut cb, B, 1 << 20, Default::default()).unwrap();
        let _ = a.access(&mut cb, B, true);
    }
}
