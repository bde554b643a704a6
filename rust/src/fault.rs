//! The anonymous page-fault path, after `mm/memory.c` and
//! `mm/huge_memory.c` of Linux 6.18: `handle_mm_fault` ->
//! `__handle_mm_fault` -> `do_huge_pmd_anonymous_page` or
//! `handle_pte_fault` -> `do_anonymous_page` / `do_wp_page`.

use crate::config::{OnRace, Policy};
use crate::error::{Error, Result};
use crate::mm::{Cpu, MmInner, Point};
use crate::page_alloc::{ORDER_SHIFT, PG_HEAD, PG_PMD_MAPPED};
use crate::pgtable::*;
use crate::vma::Vma;
use crate::{PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_SIZE};
use std::sync::atomic::{AtomicU64, Ordering::*};

/// The folio order a PTE's page belongs to, kept in software bits of the
/// entry so that zap finds the folio head without a compound_head walk.
pub const PTE_ORDER_SHIFT: u32 = 3;

#[inline(always)]
pub fn pte_order(pte: u64) -> usize {
    ((pte >> PTE_ORDER_SHIFT) & 0xf) as usize
}

/// `folio_mk_pte()` + `pte_mkwrite(pte_mkdirty())` for the first page of a folio.
#[inline(always)]
pub fn folio_mk_pte(pfn: u64, order: usize) -> u64 {
    mk_pte(pfn, true) | (order as u64) << PTE_ORDER_SHIFT
}

/// `VM_FAULT_OOM`: the only error inside the fault path. A zero-sized
/// type, so results carry no drop glue on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oom;

type VmResult<T> = std::result::Result<T, Oom>;

/// What a fault handler returns: the access is satisfied, or the CPU must
/// re-execute it (and may fault again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Done,
    Retry,
}

#[inline(always)]
fn align_down(a: u64, size: u64) -> u64 {
    a & !(size - 1)
}

/// `highest_order()`.
#[inline(always)]
fn highest_order(orders: u32) -> usize {
    31 - orders.leading_zeros() as usize
}

/// `next_order()`: drops `prev` and returns the next highest.
#[inline(always)]
fn next_order(orders: &mut u32, prev: usize) -> usize {
    *orders &= !(1 << prev);
    if *orders == 0 {
        0
    } else {
        highest_order(*orders)
    }
}

/// `thp_vma_suitable_order()`: the naturally aligned range lies in the VMA.
#[inline(always)]
fn suitable(vma: &Vma, addr: u64, order: usize) -> bool {
    let size = PAGE_SIZE << order;
    let haddr = align_down(addr, size);
    haddr >= vma.start && haddr + size <= vma.end
}

impl MmInner {
    /// The MMU: performs the access if the page table allows it, faulting
    /// (and re-executing) until it does. The caller holds the mmap lock for read.
    #[inline(always)]
    pub(crate) fn access_locked(&self, cpu: &mut Cpu, addr: u64, write: bool) -> Result<()> {
        let mut tries = 0u32;
        loop {
            let walked = self.pt.pmd_offset(addr);
            if let Some(pmd) = walked {
                let v = pmd.load(Acquire);
                if v != 0 {
                    if pmd_huge(v) {
                        if !write || v & PMD_HUGE_ZERO == 0 {
                            return Ok(());
                        }
                    } else {
                        let pte = PageTable::pte_table(v).get(pte_index(addr));
                        if pte != 0 && (!write || pte & PTE_WRITE != 0) {
                            return Ok(());
                        }
                    }
                }
            }
            if tries > 0 {
                cpu.c().race.refaults.inc();
            }
            tries += 1;
            let Some(vma) = self.lookup(cpu, addr) else {
                return Err(Error::Segv(addr));
            };
            // SAFETY: the VMA lives while we hold the mmap lock for read;
            // detach the borrow from `cpu`.
            let vma: &Vma = unsafe { &*(vma as *const Vma) };
            if self.handle_mm_fault(cpu, vma, addr, write, walked).map_err(|_| Error::Oom(addr))? == Fault::Done {
                return Ok(());
            }
        }
    }

    /// `handle_mm_fault()` / `__handle_mm_fault()`.
    /// `pmd` is the entry the MMU's walk found, if the tables down to it exist.
    pub(crate) fn handle_mm_fault(&self, cpu: &mut Cpu, vma: &Vma, addr: u64, write: bool, pmd: Option<&AtomicU64>) -> VmResult<Fault> {
        cpu.c().vm.pgfault.inc();
        let pmd = match pmd {
            Some(p) => p,
            None => self.pt.pmd_alloc(addr, &cpu.pc.page_table_lock),
        };
        let mut pmdval = pmd.load(Acquire);
        if pmdval == 0 && vma.orders & (1 << PMD_ORDER) != 0 {
            if let Some(r) = self.do_huge_pmd_anonymous_page(cpu, vma, pmd, addr, write)? {
                return Ok(r);
            }
            pmdval = pmd.load(Acquire);
        }
        if pmd_huge(pmdval) {
            if !(write && pmdval & PMD_HUGE_ZERO != 0) {
                cpu.c().fault.spurious.inc();
                return Ok(Fault::Done);
            }
            // do_huge_pmd_wp_page() on the huge zero page.
            if let Some(r) = self.do_huge_zero_wp_pmd(cpu, pmd) {
                return Ok(r);
            }
            self.split_huge_zero_pmd(cpu, pmd);
        }
        self.handle_pte_fault(cpu, vma, pmd, addr, write)
    }

    /// `vmf_anon_prepare()`: the VMA gets its anon_vma on the first fault
    /// that maps anonymous memory (not on a zero-page read at PTE level),
    /// which decides which neighbours it can merge with later.
    #[inline(always)]
    fn vmf_anon_prepare(&self, vma: &Vma) {
        if vma.anon_vma() == 0 {
            let id = self.new_anon_vma();
            let _ = vma.anon_vma.compare_exchange(0, id, Relaxed, Relaxed);
        }
    }

    /// `handle_pte_fault()`.
    fn handle_pte_fault(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, write: bool) -> VmResult<Fault> {
        let v = pmd.load(Acquire);
        if v == 0 {
            return self.do_anonymous_page(cpu, vma, pmd, addr, write);
        }
        if pmd_huge(v) {
            return Ok(Fault::Retry);
        }
        let pte = PageTable::pte_table(v).get(pte_index(addr));
        if pte == 0 {
            return self.do_anonymous_page(cpu, vma, pmd, addr, write);
        }
        if write && pte & PTE_WRITE == 0 {
            return self.do_wp_page(cpu, vma, pmd, addr, pte);
        }
        // Present and permitted: another CPU got here first. The kernel
        // takes the PTL to re-check (`pte_same`) before returning.
        let t = PageTable::pte_table(v);
        let _g = t.ptl.lock(&cpu.pc.ptl);
        cpu.c().fault.spurious.inc();
        Ok(Fault::Done)
    }

    /// `vma_alloc_folio()` with injected failures. The caller initialises
    /// the folio's `struct page` when it maps it.
    #[inline(always)]
    fn vma_alloc_folio(&self, cpu: &mut Cpu, order: usize) -> Option<u64> {
        if cpu.fail.should_fail(order) {
            return None;
        }
        let pfn = self.alloc.alloc(&mut cpu.pcp, order, &cpu.pc.zone_lock)?;
        cpu.c().vm.pgalloc.add(1 << order);
        // The struct page is written when the folio is mapped, under the
        // lock: a store that misses the cache here would stall the PTL's
        // locked compare-exchange behind it.
        Some(pfn)
    }

    /// `folio_put()` of a folio that was never mapped (or no longer is).
    #[inline]
    pub(crate) fn free_folio(&self, cpu: &mut Cpu, pfn: u64, order: usize, charged: bool) {
        if charged {
            self.memcg.uncharge(&mut cpu.stock, 1 << order);
        }
        cpu.c().vm.pgfree.add(1 << order);
        self.alloc.free(&mut cpu.pcp, pfn, order, &cpu.pc.zone_lock);
    }

    /// A folio allocated for a fault that lost its race.
    fn waste_folio(&self, cpu: &mut Cpu, pfn: u64, order: usize) {
        let c = cpu.c();
        c.race.races.inc();
        c.race.folios_wasted.inc();
        c.race.pages_wasted.add(1 << order);
        self.free_folio(cpu, pfn, order, true);
    }

    /// `folio_prealloc()`: an order-0 zeroed, charged folio, or OOM.
    fn folio_prealloc(&self, cpu: &mut Cpu) -> VmResult<u64> {
        let pfn = self.vma_alloc_folio(cpu, 0).ok_or(Oom)?;
        if !self.memcg.charge(&mut cpu.stock, 1) {
            self.free_folio(cpu, pfn, 0, false);
            return Err(Oom);
        }
        Ok(pfn)
    }

    /// Tries one large order: allocate, charge; counts the fallback stats
    /// when either fails, as `alloc_anon_folio()` does.
    #[inline]
    fn try_alloc_order(&self, cpu: &mut Cpu, order: usize) -> Option<u64> {
        if let Some(pfn) = self.vma_alloc_folio(cpu, order) {
            if self.memcg.charge(&mut cpu.stock, 1 << order) {
                return Some(pfn);
            }
            cpu.c().mthp[order].anon_fault_fallback_charge.inc();
            self.free_folio(cpu, pfn, order, false);
        }
        cpu.c().mthp[order].anon_fault_fallback.inc();
        None
    }

    /// `alloc_anon_folio()` of the selected policy. `max_order` caps the
    /// order (v1's retry one order lower). Returns the folio and its order.
    fn alloc_anon_folio(&self, cpu: &mut Cpu, vma: &Vma, t: &PteTable, addr: u64, max_order: usize) -> VmResult<(u64, usize)> {
        // userfaultfd_armed(): per-page fidelity, order 0.
        let mut orders = if vma.flags.uffd_wp { 0 } else { vma.orders & ((1 << PMD_ORDER) - 1) & ((2 << max_order) - 1) };
        if orders != 0 {
            match self.cfg.policy {
                Policy::Upstream => {
                    // thp_vma_suitable_orders(): drop orders until one fits.
                    let mut order = highest_order(orders);
                    while orders != 0 && !suitable(vma, addr, order) {
                        order = next_order(&mut orders, order);
                    }
                    // Drop orders whose aligned range is not all pte_none().
                    while orders != 0 {
                        let a = align_down(addr, PAGE_SIZE << order);
                        if t.range_none(pte_index(a), 1 << order) {
                            break;
                        }
                        order = next_order(&mut orders, order);
                    }
                    cpu.preempt(Point::AfterEstimate);
                    while orders != 0 {
                        if let Some(pfn) = self.try_alloc_order(cpu, order) {
                            return Ok((pfn, order));
                        }
                        order = next_order(&mut orders, order);
                    }
                }
                Policy::V1 => {
                    // calc_anon_folio_order_alloc(): every order from the
                    // largest enabled one down to 2, then 0; never 1.
                    let mut order = highest_order(orders);
                    // Index of the first populated PTE found so far.
                    let mut first_set: Option<usize> = None;
                    while order > 1 {
                        let nr = 1usize << order;
                        let a = align_down(addr, PAGE_SIZE << order);
                        let i = pte_index(a);
                        if a >= vma.start && a + (PAGE_SIZE << order) <= vma.end {
                            match first_set {
                                // PTEs covered by this order are known to be none.
                                Some(f) if i + nr <= f => break,
                                // A populated PTE is known to be in this range.
                                Some(f) if i <= f => {}
                                _ => {
                                    let f = t.first_set(i, nr);
                                    if f == i + nr {
                                        break;
                                    }
                                    first_set = Some(f);
                                }
                            }
                        }
                        order -= 1;
                    }
                    cpu.preempt(Point::AfterEstimate);
                    // try_vma_alloc_movable_folio(): every order down to 2.
                    while order > 1 {
                        if let Some(pfn) = self.vma_alloc_folio(cpu, order) {
                            // v1 charges with GFP_KERNEL: failure is OOM.
                            if !self.memcg.charge(&mut cpu.stock, 1 << order) {
                                self.free_folio(cpu, pfn, order, false);
                                cpu.c().mthp[order].anon_fault_fallback_charge.inc();
                                return Err(Oom);
                            }
                            return Ok((pfn, order));
                        }
                        cpu.c().mthp[order].anon_fault_fallback.inc();
                        order -= 1;
                    }
                }
                Policy::Preferred => {
                    // The preferred order if it fits and is empty, else 0.
                    let order = highest_order(orders);
                    let a = align_down(addr, PAGE_SIZE << order);
                    let fits = suitable(vma, addr, order) && t.range_none(pte_index(a), 1 << order);
                    cpu.preempt(Point::AfterEstimate);
                    if fits {
                        if let Some(pfn) = self.try_alloc_order(cpu, order) {
                            return Ok((pfn, order));
                        }
                    }
                }
            }
        }
        Ok((self.folio_prealloc(cpu)?, 0))
    }

    /// `do_anonymous_page()`.
    fn do_anonymous_page(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, write: bool) -> VmResult<Fault> {
        if !self.pt.pte_alloc(pmd, &cpu.pc.page_table_lock) {
            // A huge PMD appeared meanwhile: re-execute.
            return Ok(Fault::Retry);
        }
        let t = PageTable::pte_table(pmd.load(Acquire));
        let idx = pte_index(addr);
        if !write {
            // Read fault: map the shared zero page, order 0.
            cpu.preempt(Point::BeforeLock);
            let _g = t.ptl.lock(&cpu.pc.ptl);
            if t.get(idx) != 0 {
                return Ok(Fault::Retry);
            }
            t.set_ptes(idx, ZERO_PTE, 1);
            cpu.c().fault.zero_page.inc();
            return Ok(Fault::Done);
        }
        self.vmf_anon_prepare(vma);
        let mut max_order = PMD_ORDER - 1;
        loop {
            let (pfn, order) = self.alloc_anon_folio(cpu, vma, t, addr, max_order)?;
            let nr = 1usize << order;
            let i = pte_index(align_down(addr, PAGE_SIZE << order));
            cpu.preempt(Point::AfterAlloc);
            cpu.preempt(Point::BeforeLock);
            let g = t.ptl.lock(&cpu.pc.ptl);
            // Re-check under the PTL: we could have raced with another CPU.
            let unchanged = if nr == 1 { t.get(idx) == 0 } else { t.range_none(i, nr) };
            if !unchanged {
                if self.on_race == OnRace::RetryLower && nr > 1 && t.get(idx) == 0 {
                    // v1: the faulting PTE is still none: retry one order lower.
                    drop(g);
                    self.waste_folio(cpu, pfn, order);
                    cpu.c().race.retries.inc();
                    max_order = order - 1;
                    continue;
                }
                drop(g);
                self.waste_folio(cpu, pfn, order);
                return Ok(Fault::Retry);
            }
            // folio_ref_add(nr - 1), folio_add_new_anon_rmap(), set_ptes().
            let p = self.alloc.page(pfn);
            p.count.store(nr as u32, Relaxed);
            p.set_info(PG_HEAD | (order as u32) << ORDER_SHIFT | nr as u32);
            t.set_ptes(i, folio_mk_pte(pfn, order), nr);
            drop(g);
            let c = cpu.c();
            c.rss.add(nr as u64);
            if order > 0 {
                c.mthp[order].anon_fault_alloc.inc();
                c.mthp[order].nr_anon.inc();
            }
            c.folio_orders[order].inc();
            c.fault.anonymous.inc();
            return Ok(Fault::Done);
        }
    }

    /// `do_wp_page()` on the zero page: `wp_page_copy()` into an order-0 folio.
    fn do_wp_page(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, orig: u64) -> VmResult<Fault> {
        self.vmf_anon_prepare(vma);
        let pfn = self.folio_prealloc(cpu)?;
        let t = PageTable::pte_table(pmd.load(Acquire));
        let idx = pte_index(addr);
        cpu.preempt(Point::BeforeLock);
        let g = t.ptl.lock(&cpu.pc.ptl);
        if t.get(idx) != orig {
            drop(g);
            self.waste_folio(cpu, pfn, 0);
            return Ok(Fault::Retry);
        }
        let p = self.alloc.page(pfn);
        p.count.store(1, Relaxed);
        p.set_info(PG_HEAD | 1);
        t.ptes[idx].store(folio_mk_pte(pfn, 0), Release);
        drop(g);
        let c = cpu.c();
        c.rss.inc();
        c.folio_orders[0].inc();
        c.fault.wp_copy.inc();
        Ok(Fault::Done)
    }

    /// `vma_alloc_anon_folio_pmd()`: a charged PMD-order folio, counting
    /// `thp_fault_fallback{,_charge}` when there is none.
    fn alloc_anon_folio_pmd(&self, cpu: &mut Cpu) -> Option<u64> {
        match self.vma_alloc_folio(cpu, PMD_ORDER) {
            Some(pfn) => {
                if self.memcg.charge(&mut cpu.stock, 1 << PMD_ORDER) {
                    return Some(pfn);
                }
                self.free_folio(cpu, pfn, PMD_ORDER, false);
                let c = cpu.c();
                c.vm.thp_fault_fallback.inc();
                c.vm.thp_fault_fallback_charge.inc();
                c.mthp[PMD_ORDER].anon_fault_fallback.inc();
                c.mthp[PMD_ORDER].anon_fault_fallback_charge.inc();
                None
            }
            None => {
                let c = cpu.c();
                c.vm.thp_fault_fallback.inc();
                c.mthp[PMD_ORDER].anon_fault_fallback.inc();
                None
            }
        }
    }

    /// `map_anon_folio_pmd_pf()`: the caller holds `page_table_lock`.
    fn map_anon_folio_pmd(&self, cpu: &Cpu, pmd: &AtomicU64, pfn: u64) {
        let p = self.alloc.page(pfn);
        p.count.store(1, Relaxed);
        p.set_info(PG_HEAD | PG_PMD_MAPPED | (PMD_ORDER as u32) << ORDER_SHIFT | 512);
        pmd.store(mk_huge_pmd(pfn), Release);
        let c = cpu.c();
        c.rss.add(512);
        c.vm.thp_fault_alloc.inc();
        c.mthp[PMD_ORDER].anon_fault_alloc.inc();
        c.mthp[PMD_ORDER].nr_anon.inc();
        c.folio_orders[PMD_ORDER].inc();
    }

    /// `do_huge_pmd_anonymous_page()`. `None` is VM_FAULT_FALLBACK.
    fn do_huge_pmd_anonymous_page(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, write: bool) -> VmResult<Option<Fault>> {
        let haddr = align_down(addr, PMD_SIZE);
        if haddr < vma.start || haddr + PMD_SIZE > vma.end {
            return Ok(None);
        }
        self.vmf_anon_prepare(vma);
        if !write && self.cfg.use_zero_page {
            let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
            if pmd.load(Acquire) != 0 {
                return Ok(Some(Fault::Retry));
            }
            if !self.huge_zero_used.swap(true, Relaxed) {
                cpu.c().vm.thp_zero_page_alloc.inc();
            }
            pmd.store(HUGE_ZERO_PMD, Release);
            cpu.c().fault.huge_zero_page.inc();
            return Ok(Some(Fault::Done));
        }
        let r = self.map_new_pmd_folio(cpu, pmd, 0);
        if r == Some(Fault::Done) {
            cpu.c().fault.pmd_thp.inc();
        }
        Ok(r)
    }

    /// Allocates a charged PMD-order folio and maps it if the PMD still holds
    /// `expected` under `page_table_lock`, else drops it (a lost race).
    /// `None` is VM_FAULT_FALLBACK: no folio could be had.
    fn map_new_pmd_folio(&self, cpu: &mut Cpu, pmd: &AtomicU64, expected: u64) -> Option<Fault> {
        let pfn = self.alloc_anon_folio_pmd(cpu)?;
        cpu.preempt(Point::AfterAlloc);
        let g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        if pmd.load(Acquire) != expected {
            drop(g);
            self.waste_folio(cpu, pfn, PMD_ORDER);
            return Some(Fault::Retry);
        }
        self.map_anon_folio_pmd(cpu, pmd, pfn);
        Some(Fault::Done)
    }

    /// `do_huge_zero_wp_pmd()`: a write to the huge zero page gets a THP.
    /// `None` is VM_FAULT_FALLBACK (split the PMD, then the PTE path).
    fn do_huge_zero_wp_pmd(&self, cpu: &mut Cpu, pmd: &AtomicU64) -> Option<Fault> {
        let r = self.map_new_pmd_folio(cpu, pmd, HUGE_ZERO_PMD);
        if r == Some(Fault::Done) {
            cpu.c().fault.huge_zero_wp.inc();
        }
        r
    }

    /// `__split_huge_pmd()` of the huge zero page: 512 zero-page PTEs.
    pub(crate) fn split_huge_zero_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        if pmd.load(Acquire) == HUGE_ZERO_PMD {
            self.pt.install_split_table(pmd, |_| ZERO_PTE);
            cpu.c().vm.thp_split_pmd.inc();
        }
    }

    /// `__split_huge_pmd()` of a PMD-mapped THP: the folio stays whole and
    /// becomes PTE-mapped (refcount one per PTE). The caller excludes faults.
    pub(crate) fn split_huge_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let v = pmd.load(Acquire);
        if v == HUGE_ZERO_PMD {
            return self.split_huge_zero_pmd(cpu, pmd);
        }
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let pfn = pte_pfn(v);
        let p = self.alloc.page(pfn);
        p.count.store(512, Relaxed);
        p.set_info(p.info() & !PG_PMD_MAPPED);
        let pte = folio_mk_pte(pfn, PMD_ORDER);
        self.pt.install_split_table(pmd, |i| pte + ((i as u64) << PAGE_SHIFT));
        cpu.c().vm.thp_split_pmd.inc();
    }
}
