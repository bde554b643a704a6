//! The address space (`struct mm_struct`) and the simulated CPUs that fault
//! into it.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::memcg::MemCg;
use crate::page_alloc::{FailInject, PageAlloc, PerCpuPages, PG_HEAD, PG_PMD_MAPPED};
use crate::pgtable::{pmd_huge, pte_pfn, PageTable, PTE_ZERO};
use crate::stats::{Counter, CpuCounters, LockCounters, Stats};
use crate::trace::{check_range, Advice, MmapFlags};
use crate::vma::{Vma, VmaInfo, VmaTree, VmFlags};
use crate::PAGE_SIZE;
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};

/// Places in the fault path where another CPU can overtake this one; a
/// deterministic scheduler switches CPUs there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// After the lockless `pte_range_none` estimate, before allocating.
    AfterEstimate,
    /// After the folio is allocated and charged, before the PTL.
    AfterAlloc,
    /// About to take the PTL.
    BeforeLock,
    /// Between two operations of a CPU.
    OpBoundary,
    /// Waiting for the mmap lock: someone else must run.
    Blocked,
}

/// What one CPU publishes: its counters and its mmap-lock reader slot.
#[repr(align(128))]
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
    reader: AtomicU32,
}

/// A simulated CPU: its per-CPU page lists, memcg stock, counters and
/// lookup cache. One thread drives a CPU at a time.
#[repr(align(128))]
pub struct Cpu {
    pub id: usize,
    pub(crate) mm: Arc<MmInner>,
    pub(crate) pc: Arc<PerCpu>,
    pub(crate) pcp: PerCpuPages,
    pub(crate) stock: u64,
    pub(crate) fail: FailInject,
    vma_seq: u64,
    vma: *const Vma,
    pub(crate) read_held: bool,
    /// A deterministic scheduler's hook, called at each [`Point`].
    pub sched: Option<Box<dyn FnMut(Point) + Send>>,
}

unsafe impl Send for Cpu {}

impl Cpu {
    #[inline(always)]
    pub(crate) fn c(&self) -> &CpuCounters {
        &self.pc.counters
    }

    #[inline(always)]
    pub(crate) fn preempt(&mut self, p: Point) {
        if let Some(f) = self.sched.as_mut() {
            f(p);
        }
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
    fn drop(&mut self) {
        if self.read_held {
            let mm = self.mm.clone();
            mm.read_unlock(self);
        }
        self.drain();
    }
}

pub struct MmInner {
    pub cfg: Config,
    /// `cfg.on_race()`, resolved once.
    pub on_race: crate::config::OnRace,
    /// `ANONFOLIO_DEBUG_VM`: check the invariants after every run.
    pub debug_vm: bool,
    pub pt: PageTable,
    pub alloc: PageAlloc,
    pub memcg: MemCg,
    vmas: UnsafeCell<VmaTree>,
    writer: AtomicBool,
    wlock: Mutex<()>,
    cpus: Mutex<Vec<Arc<PerCpu>>>,
    next_anon_vma: AtomicU64,
    pub huge_zero_used: AtomicBool,
    /// Counters of work done with no CPU (e.g. teardown).
    pub orphan: Arc<PerCpu>,
}

unsafe impl Send for MmInner {}
unsafe impl Sync for MmInner {}

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
                vmas: UnsafeCell::new(VmaTree::default()),
                writer: AtomicBool::new(false),
                wlock: Mutex::new(()),
                cpus: Mutex::new(Vec::new()),
                next_anon_vma: AtomicU64::new(1),
                huge_zero_used: AtomicBool::new(false),
                orphan: Arc::new(PerCpu::default()),
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
        let pc = Arc::new(PerCpu::default());
        self.cpus.lock().unwrap().push(pc.clone());
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
            read_held: false,
            sched: None,
        }
    }

    /// `mmap(addr, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE)`,
    /// then `madvise(MADV_HUGEPAGE/NOHUGEPAGE)` and userfaultfd registration as flagged.
    pub fn mmap(&self, cpu: &mut Cpu, addr: u64, len: u64, flags: MmapFlags) -> Result<()> {
        check_range(addr, len, 0)?;
        let cfg = &self.cfg;
        // As the trace means it: mmap(), then userfaultfd registration and
        // madvise() on the new range, each of which may split and merge.
        let orders = |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage);
        self.with_write_lock(cpu, |mm, _| {
            let t = mm.vmas_mut();
            if let Some((start, end, floor, ceiling)) = t.mmap(addr, len, VmFlags::default(), orders)? {
                // MAP_FIXED over the reservation unmapped it first.
                mm.free_pgtables(start, end, floor, ceiling);
            }
            let t = mm.vmas_mut();
            let end = addr + len;
            if flags.uffd_wp {
                t.modify_flags(addr, end, orders, |f| f.uffd_wp = true);
            }
            if flags.hugepage {
                t.madvise_flags(addr, end, Advice::HugePage, orders);
            }
            if flags.nohugepage {
                t.madvise_flags(addr, end, Advice::NoHugePage, orders);
            }
            Ok(())
        })
    }

    /// `munmap()`: zaps the range, frees page tables no other VMA needs.
    pub fn munmap(&self, cpu: &mut Cpu, addr: u64, len: u64) -> Result<()> {
        check_range(addr, len, 0)?;
        self.with_write_lock(cpu, |mm, cpu| {
            let end = addr + len;
            let (gone, extent) = mm.vmas_mut().munmap(addr, end);
            for v in &gone {
                mm.zap_page_range(cpu, v.start, v.end, false);
            }
            if let Some((start, end)) = extent {
                let floor = mm.vma_tree().prev_end(start);
                let ceiling = mm.vma_tree().next_start(end);
                mm.free_pgtables(start, end, floor, ceiling);
            }
            Ok(())
        })
    }

    /// `madvise()`. DONTNEED zaps what is mapped; HUGEPAGE/NOHUGEPAGE change
    /// the VMA flags. A range with unmapped parts is applied where mapped,
    /// as the kernel does before returning ENOMEM.
    pub fn madvise(&self, cpu: &mut Cpu, addr: u64, len: u64, advice: Advice) -> Result<()> {
        check_range(addr, len, 0)?;
        let cfg = &self.cfg;
        self.with_write_lock(cpu, |mm, cpu| {
            let end = addr + len;
            match advice {
                Advice::DontNeed => {
                    for (s, e) in mm.vma_tree().pieces(addr, end) {
                        mm.zap_page_range(cpu, s, e, true);
                    }
                }
                _ => {
                    // vma_adjust_trans_huge(): a VMA split inside a PMD-mapped
                    // range splits the PMD mapping first.
                    for b in [addr, end] {
                        if b % crate::PMD_SIZE != 0 && !mm.vma_tree().is_boundary(b) {
                            let v = mm.vma_tree().lookup(b).expect("inside a VMA");
                            let wants = match advice {
                                Advice::HugePage => !v.flags.hugepage || v.flags.nohugepage,
                                _ => v.flags.hugepage || !v.flags.nohugepage,
                            };
                            if wants {
                                mm.split_huge_pmd_address(cpu, b);
                            }
                        }
                    }
                    mm.vmas_mut().madvise_flags(addr, end, advice, |f: VmFlags| {
                        cfg.allowable_orders(f.hugepage, f.nohugepage)
                    });
                }
            }
            Ok(())
        })
    }

    /// Covers the unmapped parts of `[start, end)` with a PROT_NONE
    /// reservation, as the kernel oracle places a trace so that nothing else
    /// merges with it; its pieces bound `free_pgtables()` on munmap.
    pub fn reserve(&self, cpu: &mut Cpu, start: u64, end: u64) -> Result<()> {
        check_range(start, end.saturating_sub(start), 0)?;
        self.with_write_lock(cpu, |mm, _| {
            mm.vmas_mut().reserve(start, end);
            Ok(())
        })
    }

    /// One user access (a one-byte read or write at `addr`); faults as the
    /// MMU would. Takes the mmap lock for read around it.
    #[inline(always)]
    pub fn access(&self, cpu: &mut Cpu, addr: u64, write: bool) -> Result<()> {
        let held = cpu.read_held;
        if !held {
            self.read_lock(cpu);
        }
        let r = self.access_locked(cpu, addr, write);
        if !held {
            self.read_unlock(cpu);
            cpu.sync_pcp_gauge();
        }
        r
    }

    /// Holds the mmap lock for read across many accesses; drop with
    /// [`Mm::end_batch`]. Between accesses [`Mm::access`] lets writers in.
    pub fn begin_batch(&self, cpu: &mut Cpu) {
        if !cpu.read_held {
            self.read_lock(cpu);
        }
    }

    pub fn end_batch(&self, cpu: &mut Cpu) {
        if cpu.read_held {
            self.read_unlock(cpu);
        }
        cpu.sync_pcp_gauge();
    }

    /// A snapshot of all figures, summed over CPUs.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        let cpus = self.cpus.lock().unwrap();
        for pc in cpus.iter().chain(std::iter::once(&self.orphan)) {
            s.add_cpu(&pc.counters);
            pc.ptl.add_to(&mut s.ptl);
            pc.page_table_lock.add_to(&mut s.page_table_lock);
            pc.zone_lock.add_to(&mut s.zone_lock);
            pc.mmap_lock.add_to(&mut s.mmap_lock);
            s.mem.pcp_pages += pc.pcp_pages.get();
        }
        drop(cpus);
        s.mem.phys_pages = self.alloc.phys_pages;
        s.mem.pinned_pages = self.alloc.shared.pinned.load(Relaxed);
        s.mem.used_pages = s.vm.pgalloc.wrapping_sub(s.vm.pgfree);
        s.mem.nr_ptes = self.pt.nr_ptes.load(Relaxed);
        s.mem.memcg_usage = self.memcg.usage();
        s.mem.memcg_charge_fail = self.memcg.failcnt.load(Relaxed);
        s.mem.host_bytes = self.pt.host_bytes() + self.alloc.host_bytes(&self.orphan.zone_lock);
        s
    }

    pub fn vmas(&self) -> Vec<VmaInfo> {
        self.vma_tree().infos()
    }

    /// Checks that every present PTE maps a page of a live folio, that each
    /// folio's mapcount equals the entries mapping it, that no page is mapped
    /// twice, that RSS agrees, and that no page was lost or made up. It takes
    /// the mmap lock for write, so it waits for accesses in flight. CPUs
    /// still alive keep pages on their per-CPU lists; those count as free.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let lc = &self.orphan.page_table_lock;
        // Exclude faults the way mmap/munmap do: the write side of the mmap lock.
        let _w = self.wlock.lock().unwrap();
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        self.wait_for_readers(|| {});
        let _release = Release(&self.writer);
        let alloc = &self.alloc;
        // head pfn -> pages of it mapped
        let mut mapped: HashMap<u64, u64> = HashMap::new();
        let mut seen = vec![0u64; (alloc.frontier(lc) as usize).div_ceil(64)];
        let mut mark = |pfn: u64| -> std::result::Result<(), String> {
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            if w >= seen.len() {
                return Err(format!("pfn {pfn:#x} was never allocated"));
            }
            if seen[w] & (1 << b) != 0 {
                return Err(format!("pfn {pfn:#x} is mapped twice"));
            }
            seen[w] |= 1 << b;
            Ok(())
        };
        let mut rss = 0u64;
        let mut err = None;
        self.pt.for_each_pte_table(|addr, pmdval| {
            if err.is_some() {
                return;
            }
            let r = (|| -> std::result::Result<(), String> {
                if pmd_huge(pmdval) {
                    if pmdval & crate::pgtable::PMD_HUGE_ZERO != 0 {
                        return Ok(());
                    }
                    let pfn = pte_pfn(pmdval);
                    let p = alloc.page(pfn);
                    if p.info() & (PG_HEAD | PG_PMD_MAPPED) != PG_HEAD | PG_PMD_MAPPED || p.order() != crate::PMD_ORDER {
                        return Err(format!("PMD at {addr:#x} maps pfn {pfn:#x}, which is no PMD-mapped THP"));
                    }
                    for k in 0..512 {
                        mark(pfn + k)?;
                    }
                    *mapped.entry(pfn).or_default() += 512;
                    rss += 512;
                    return Ok(());
                }
                let t = PageTable::pte_table(pmdval);
                for i in 0..crate::PTRS_PER_TABLE {
                    let pte = t.get(i);
                    if pte == 0 || pte & PTE_ZERO != 0 {
                        continue;
                    }
                    let pfn = pte_pfn(pte);
                    let order = crate::fault::pte_order(pte);
                    let head = pfn & !((1u64 << order) - 1);
                    let hp = alloc.page(head);
                    if hp.info() & PG_HEAD == 0 || hp.order() != order {
                        return Err(format!(
                            "PTE at {:#x} maps pfn {pfn:#x}, not a page of a live order-{order} folio",
                            addr + i as u64 * PAGE_SIZE
                        ));
                    }
                    mark(pfn)?;
                    *mapped.entry(head).or_default() += 1;
                    rss += 1;
                }
                Ok(())
            })();
            if let Err(e) = r {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let mut folio_pages = 0u64;
        for (&head, &n) in &mapped {
            let p = alloc.page(head);
            if p.mapcount() as u64 != n {
                return Err(format!("folio {head:#x} has mapcount {} but {n} entries map it", p.mapcount()));
            }
            let want_ref = if p.info() & PG_PMD_MAPPED != 0 { 1 } else { n };
            if p.count.load(Relaxed) as u64 != want_ref {
                return Err(format!("folio {head:#x} has refcount {} but should have {want_ref}", p.count.load(Relaxed)));
            }
            folio_pages += 1 << p.order();
        }
        // Every folio head in the memory map is mapped (none leaked).
        let mut heads = 0u64;
        for pfn in 0..alloc.frontier(lc) {
            if alloc.page(pfn).info() & PG_HEAD != 0 {
                heads += 1;
            }
        }
        if heads != mapped.len() as u64 {
            return Err(format!("{heads} folios exist but {} are mapped: folios leaked", mapped.len()));
        }
        let s = self.stats();
        if s.rss_pages != rss {
            return Err(format!("RSS counter says {} pages but page tables map {rss}", s.rss_pages));
        }
        let free = alloc.check_free_lists(lc)?;
        let total = free + s.mem.pcp_pages + s.mem.pinned_pages + folio_pages;
        if total != alloc.phys_pages {
            return Err(format!(
                "pages not conserved: free {free} + per-CPU {} + pinned {} + folios {folio_pages} = {total}, not {}",
                s.mem.pcp_pages, s.mem.pinned_pages, alloc.phys_pages
            ));
        }
        Ok(())
    }
}

impl MmInner {
    #[inline(always)]
    pub(crate) fn vma_tree(&self) -> &VmaTree {
        // SAFETY: changed only under the write side of the mmap lock, which
        // excludes every reader.
        unsafe { &*self.vmas.get() }
    }

    #[allow(clippy::mut_from_ref)]
    fn vmas_mut(&self) -> &mut VmaTree {
        // SAFETY: callers hold the mmap lock for write.
        unsafe { &mut *self.vmas.get() }
    }

    pub(crate) fn new_anon_vma(&self) -> u64 {
        self.next_anon_vma.fetch_add(1, Relaxed)
    }

    /// `find_vma` through the CPU's one-entry cache.
    #[inline(always)]
    pub(crate) fn lookup<'a>(&'a self, cpu: &mut Cpu, addr: u64) -> Option<&'a Vma> {
        let t = self.vma_tree();
        if cpu.vma_seq == t.seq && !cpu.vma.is_null() {
            // SAFETY: the cached VMA is alive while the tree is unchanged.
            let v = unsafe { &*cpu.vma };
            if addr >= v.start && addr < v.end {
                return Some(v);
            }
        }
        let v = t.lookup(addr)?;
        cpu.vma_seq = t.seq;
        cpu.vma = Arc::as_ptr(v);
        Some(v)
    }

    /// `mmap_read_lock()`: a per-CPU reader flag (a "big reader" lock), so
    /// faults on different CPUs share no cache line.
    pub(crate) fn read_lock(&self, cpu: &mut Cpu) {
        loop {
            cpu.pc.reader.store(1, SeqCst);
            if !self.writer.load(SeqCst) {
                cpu.read_held = true;
                return;
            }
            cpu.pc.reader.store(0, SeqCst);
            while self.writer.load(Relaxed) {
                cpu.preempt(Point::Blocked);
                std::thread::yield_now();
            }
        }
    }

    pub(crate) fn read_unlock(&self, cpu: &mut Cpu) {
        cpu.pc.reader.store(0, Release);
        cpu.read_held = false;
    }

    /// Lets a waiting writer in between two accesses of a batch.
    #[inline(always)]
    pub(crate) fn read_yield(&self, cpu: &mut Cpu) {
        if self.writer.load(Relaxed) {
            self.read_unlock(cpu);
            self.read_lock(cpu);
        }
    }

    /// Announces a writer and waits for every CPU's reader flag to clear,
    /// calling `on_wait` each time it has to wait; returns the waits. The
    /// caller holds `wlock` and clears `writer` when done.
    fn wait_for_readers(&self, mut on_wait: impl FnMut()) -> u64 {
        self.writer.store(true, SeqCst);
        let readers: Vec<Arc<PerCpu>> = self.cpus.lock().unwrap().clone();
        let mut spins = 0;
        for pc in readers.iter() {
            while pc.reader.load(SeqCst) != 0 {
                spins += 1;
                on_wait();
                std::thread::yield_now();
            }
        }
        spins
    }

    /// `mmap_write_lock()`: waits for every CPU's reader flag to clear.
    fn with_write_lock<T>(&self, cpu: &mut Cpu, f: impl FnOnce(&MmInner, &mut Cpu) -> Result<T>) -> Result<T> {
        let held = cpu.read_held;
        if held {
            self.read_unlock(cpu);
        }
        cpu.pc.mmap_lock.acquisitions.inc();
        let g = match self.wlock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                cpu.pc.mmap_lock.contended.inc();
                loop {
                    cpu.preempt(Point::Blocked);
                    if let Ok(g) = self.wlock.try_lock() {
                        break g;
                    }
                    std::thread::yield_now();
                }
            }
        };
        let spins = self.wait_for_readers(|| cpu.preempt(Point::Blocked));
        cpu.pc.mmap_lock.spins.add(spins);
        let r = f(self, cpu);
        cpu.sync_pcp_gauge();
        self.writer.store(false, SeqCst);
        drop(g);
        if held {
            self.read_lock(cpu);
        }
        r
    }

    /// `split_huge_pmd_address()`: if a huge PMD maps `addr`, split it.
    fn split_huge_pmd_address(&self, cpu: &Cpu, addr: u64) {
        if let Some(pmd) = self.pt.pmd_offset(addr) {
            if pmd_huge(pmd.load(Acquire)) {
                self.split_huge_pmd(cpu, pmd);
            }
        }
    }

    /// `free_pgtables()`/`free_pgd_range()`: frees the PTE tables of the PMD
    /// ranges in `[start, end)` that lie wholly in `[floor, ceiling)` (the gap
    /// between the neighbouring VMAs; a ceiling of 0 is the top).
    fn free_pgtables(&self, start: u64, end: u64, floor: u64, ceiling: u64) {
        self.pt.for_each_pmd(start, end, |a, pmd| {
            let pmd_end = a + crate::PMD_SIZE;
            if a >= floor && (ceiling == 0 || pmd_end <= ceiling) {
                self.pt.free_pte_table(pmd);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_alloc::MAPCOUNT_MASK;

    fn mm_with_a_64k_folio() -> (Mm, u64) {
        let mut c = Config::default();
        c.set_size_mode("64kB=always").unwrap();
        c.memory.phys_bytes = 64 << 20;
        let mm = Mm::new(c).unwrap();
        let mut cpu = mm.cpu(0);
        mm.mmap(&mut cpu, 0x7f00_0000_0000, 0x20_0000, MmapFlags::default()).unwrap();
        mm.access(&mut cpu, 0x7f00_0000_0000, true).unwrap();
        drop(cpu);
        let pmd = mm.pt.pmd_offset(0x7f00_0000_0000).unwrap().load(Relaxed);
        let pfn = pte_pfn(PageTable::pte_table(pmd).get(0));
        (mm, pfn)
    }

    #[test]
    fn the_checker_passes_a_sound_mm_and_catches_corruption() {
        let (mm, pfn) = mm_with_a_64k_folio();
        mm.check_invariants().unwrap();
        // A mapcount that disagrees with the PTEs.
        let p = mm.alloc.page(pfn);
        let info = p.info();
        p.set_info((info & !MAPCOUNT_MASK) | 15);
        assert!(mm.check_invariants().unwrap_err().contains("mapcount"));
        p.set_info(info);
        // A refcount that does.
        p.count.store(3, Relaxed);
        assert!(mm.check_invariants().unwrap_err().contains("refcount"));
        p.count.store(16, Relaxed);
        mm.check_invariants().unwrap();
        // A page mapped twice.
        let pmd = mm.pt.pmd_offset(0x7f00_0000_0000).unwrap().load(Relaxed);
        let t = PageTable::pte_table(pmd);
        let pte = t.get(0);
        t.ptes[100].store(pte, Relaxed);
        assert!(mm.check_invariants().unwrap_err().contains("mapped twice"));
        t.ptes[100].store(0, Relaxed);
        // A folio nobody maps: leaked.
        let leak = mm.alloc.page(pfn + 64);
        leak.set_info(PG_HEAD);
        assert!(mm.check_invariants().unwrap_err().contains("leaked"));
    }
}
