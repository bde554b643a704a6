//! `mm/memory.c` of Linux 6.18, the anonymous parts: the fault path
//! (`handle_mm_fault` -> `__handle_mm_fault` -> `handle_pte_fault` ->
//! `do_anonymous_page` with `alloc_anon_folio`, or `do_wp_page` on the
//! zero page) and unmapping (`unmap_page_range` -> `zap_pmd_range` ->
//! `zap_pte_range`, and `free_pgtables`). The PMD-level paths are in
//! [`super::huge_memory`]; each policy's order choice in [`crate::policy`].
//!
//! Every function here runs with the mmap lock held: faults for read (an
//! [`MmapReadGuard`] is where the fault path starts), unmapping for write.

use crate::config::{OnRace, Policy};
use crate::drive::vtime::{self, Step};
use crate::error::{Error, Result};
use crate::mm::huge_memory::align_down;
use crate::mm::mm_types::PG_NONZERO;
use crate::mm::mmap_lock::MmapReadGuard;
use crate::mm::pgtable::*;
use crate::mm::vma::Vma;
use crate::mm::{Cpu, MmInner, Point};
use crate::sync::AtomicU64;
use crate::{PAGE_SIZE, PMD_ORDER, PMD_SIZE, PTRS_PER_TABLE};
use std::sync::atomic::Ordering::*;

/// `VM_FAULT_OOM`: the only error inside the fault path. A zero-sized
/// type, so results carry no drop glue on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oom;

pub(crate) type VmResult<T> = std::result::Result<T, Oom>;

/// What a fault handler left behind. The kernel returns 0 for both (a
/// `vm_fault_t` with no error bit) and the CPU re-executes the access; the
/// simulator tells them apart (not a kernel name) so that only after
/// `NotMapped`, a lost race, does it walk the page table again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The handler mapped the address.
    Mapped,
    /// It returned without mapping it (another CPU changed the entry first).
    NotMapped,
}

/// x86's `access_error()`: what the VMA forbids about this access, if anything.
#[inline(always)]
pub(crate) fn access_error(vma: &Vma, write: bool) -> Option<&'static str> {
    if write && !vma.flags.write {
        Some(if vma.flags.read { "write to a read-only VMA" } else { "write to a PROT_NONE VMA" })
    } else if !write && !vma.flags.accessible() {
        Some("read of a PROT_NONE VMA")
    } else {
        None
    }
}

impl MmInner {
    /// The MMU: performs the access if the page table allows it, faulting
    /// (and re-executing) until it does. `g` is this CPU's hold of the mmap
    /// lock for read.
    #[inline(always)]
    pub fn access_locked(&self, g: &MmapReadGuard<'_>, cpu: &mut Cpu, addr: u64, write: bool) -> Result<()> {
        self.access_inner::<true>(g, cpu, addr, write)
    }

    /// [`Self::access_locked`]; `STORE`: a write access stores into the
    /// page (a user write), which GUP's write faults do not (`faultin_page`
    /// maps the page writable and leaves it zero-filled).
    #[inline(always)]
    pub(crate) fn access_inner<const STORE: bool>(
        &self,
        g: &MmapReadGuard<'_>,
        cpu: &mut Cpu,
        addr: u64,
        write: bool,
    ) -> Result<()> {
        assert!(std::ptr::eq(g.lock(), &*self.mmap_lock), "a read guard of another mm");
        let mut tries = 0u32;
        let mut mapped = false;
        loop {
            let walked = self.pt.pmd_offset(addr);
            if let Some(pmd) = walked {
                let v = pmd.load(Acquire);
                if v != 0 {
                    if pmd_huge(v) {
                        if v & PMD_PROTNONE == 0 && (!write || v & (PMD_HUGE_ZERO | PMD_RDONLY) == 0) {
                            if STORE && write {
                                self.alloc.mark_written(pte_pfn(v) + pte_index(addr) as u64);
                            }
                            return Ok(());
                        }
                    } else {
                        // SAFETY: a table PMD of this mm, loaded under `g`.
                        let pte = unsafe { PageTable::pte_table(v) }.get(pte_index(addr));
                        if pte_present(pte) && (!write || pte_write(pte)) {
                            if STORE && write {
                                self.alloc.mark_written(pte_pfn(pte));
                            }
                            return Ok(());
                        }
                    }
                }
            }
            if mapped {
                // Mapped, yet not writable to this walk: nothing to store.
                return Ok(());
            }
            if tries > 0 {
                cpu.c().race.refaults.inc();
            }
            tries += 1;
            cpu.preempt(Point::FaultEntry);
            vtime::fault_begin();
            vtime::step(Step::VmaLookup);
            let Some(vma) = self.lookup(g, cpu, addr) else {
                return Err(Error::Segv(addr));
            };
            vtime::lock_vma_under_rcu(addr, vma.start);
            // access_error(): checked by the arch fault handler before
            // handle_mm_fault, so a SIGSEGV here counts no fault.
            if let Some(what) = access_error(vma, write) {
                vtime::fault_end();
                return Err(Error::SegvAccess { addr, what });
            }
            cpu.store_pending = STORE && write;
            let r = self.handle_mm_fault(cpu, vma, addr, write, walked);
            // Still pending: no handler marked the page (GUP's faults never
            // set it).
            let pending = std::mem::take(&mut cpu.store_pending);
            vtime::fault_end();
            if r.map_err(|_| Error::Oom(addr))? == Fault::Mapped {
                if !pending {
                    return Ok(());
                }
                // A write re-executes the access after the fault, as the
                // CPU does: the walk then finds the entry and stores into
                // the page.
                mapped = true;
            }
        }
    }

    /// `handle_mm_fault()` / `__handle_mm_fault()`.
    /// `pmd` is the entry the MMU's walk found, if the tables down to it exist.
    pub(crate) fn handle_mm_fault(
        &self,
        cpu: &mut Cpu,
        vma: &Vma,
        addr: u64,
        write: bool,
        pmd: Option<&AtomicU64>,
    ) -> VmResult<Fault> {
        cpu.c().vm.pgfault.inc();
        vtime::step(Step::PtWalk);
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
                return Ok(Fault::Mapped);
            }
            // do_huge_pmd_wp_page() on the huge zero page.
            if let Some(r) = self.do_huge_zero_wp_pmd(cpu, pmd) {
                return Ok(r);
            }
            self.split_huge_zero_pmd(cpu, pmd);
        }
        self.handle_pte_fault(cpu, vma, pmd, addr, write)
    }

    /// `pte_alloc()`: a PTE table for `pmd` if it has none. The table is
    /// charged to the memcg as kernel memory (`pte_alloc_one` allocates with
    /// GFP_PGTABLE_USER, which has __GFP_ACCOUNT): one page per table, as
    /// measured. Returns false if the PMD maps a huge page; a failed charge
    /// is VM_FAULT_OOM (the model has no memcg reclaim).
    #[inline]
    pub(crate) fn pte_alloc(&self, cpu: &mut Cpu, pmd: &AtomicU64) -> VmResult<bool> {
        let v = pmd.load(Acquire);
        if v != 0 {
            return Ok(!pmd_huge(v));
        }
        if !self.memcg.mem_cgroup_charge(&mut cpu.stock, 1) {
            return Err(Oom);
        }
        let (table, ours) = self.pt.pte_alloc(pmd, &cpu.pc.page_table_lock);
        if !ours {
            self.memcg.mem_cgroup_uncharge(&mut cpu.stock, 1);
        }
        Ok(table)
    }

    /// `vmf_anon_prepare()`: the VMA gets its anon_vma on the first fault
    /// that maps anonymous memory (not on a zero-page read at PTE level),
    /// which decides which neighbours it can merge with later.
    #[inline(always)]
    pub(crate) fn vmf_anon_prepare(&self, vma: &Vma) {
        if vma.anon_vma() == 0 {
            let id = self.new_anon_vma();
            let _ = vma.anon_vma.compare_exchange(0, id, Relaxed, Relaxed);
        }
    }

    /// `handle_pte_fault()`: no PTE table, or a none entry, is
    /// `do_pte_missing()`, which for anonymous memory is `do_anonymous_page()`.
    #[inline(always)]
    fn handle_pte_fault(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, write: bool) -> VmResult<Fault> {
        let v = pmd.load(Acquire);
        if pmd_huge(v) {
            return Ok(Fault::NotMapped);
        }
        // vmf->pte and vmf->orig_pte: no entry without a table.
        let entry = if v == 0 {
            None
        } else {
            // SAFETY: a table PMD of this mm, loaded under the mmap read
            // lock the fault path holds (see `access_locked`).
            let t = unsafe { PageTable::pte_table(v) };
            Some((t, t.get(pte_index(addr))))
        };
        let (t, pte) = match entry {
            Some((t, pte)) if !pte_none(pte) => (t, pte),
            _ => return self.do_anonymous_page(cpu, vma, pmd, addr, write),
        };
        if write && !pte_write(pte) {
            return self.do_wp_page(cpu, vma, t, addr, pte);
        }
        // Present and permitted: another CPU got here first. The kernel
        // takes the PTL to re-check (`pte_same`) before returning.
        let _g = t.ptl.lock(&cpu.pc.ptl);
        cpu.c().fault.spurious.inc();
        Ok(Fault::Mapped)
    }

    /// `vma_alloc_folio()` (`mm/mempolicy.c`) with injected failures. The
    /// caller initialises the folio's `struct page` when it maps it.
    #[inline(always)]
    pub(crate) fn vma_alloc_folio(&self, cpu: &mut Cpu, order: usize) -> Option<u64> {
        if cpu.fail.should_fail(order) {
            return None;
        }
        let pfn = self.alloc.rmqueue(&mut cpu.pcp, order, &cpu.pc.zone_lock)?;
        cpu.c().vm.pgalloc.add(1 << order);
        // The struct page is written when the folio is mapped, under the
        // lock: a store that misses the cache here would stall the PTL's
        // locked compare-exchange behind it.
        Some(pfn)
    }

    /// A folio allocated for a fault that lost its race (`release:` in
    /// `do_anonymous_page`: `folio_put()`), counted as wasted.
    pub(crate) fn waste_folio(&self, cpu: &mut Cpu, pfn: u64, order: usize) {
        let c = cpu.c();
        c.race.races.inc();
        c.race.folios_wasted.inc();
        c.race.pages_wasted.add(1 << order);
        self.free_unmapped_folio(cpu, pfn, order, true);
    }

    /// `folio_prealloc()`: an order-0 zeroed, charged folio, or OOM.
    #[inline(always)]
    pub(crate) fn folio_prealloc(&self, cpu: &mut Cpu) -> VmResult<u64> {
        let pfn = self.vma_alloc_folio(cpu, 0).ok_or(Oom)?;
        if !self.memcg.mem_cgroup_charge(&mut cpu.stock, 1) {
            self.free_unmapped_folio(cpu, pfn, 0, false);
            return Err(Oom);
        }
        vtime::step_n(Step::ZeroKib, PAGE_SIZE >> 10);
        Ok(pfn)
    }

    /// One large order as `alloc_anon_folio()` tries it: allocate, charge;
    /// counts `anon_fault_fallback{,_charge}` when either fails.
    #[inline]
    pub(crate) fn try_alloc_order(&self, cpu: &mut Cpu, order: usize) -> Option<u64> {
        if let Some(pfn) = self.vma_alloc_folio(cpu, order) {
            if self.memcg.mem_cgroup_charge(&mut cpu.stock, 1 << order) {
                return Some(pfn);
            }
            cpu.c().mthp[order].anon_fault_fallback_charge.inc();
            self.free_unmapped_folio(cpu, pfn, order, false);
        }
        cpu.c().mthp[order].anon_fault_fallback.inc();
        None
    }

    /// `alloc_anon_folio()` of the configured policy: a charged folio and
    /// its order. `max_order` caps the order (v1's retry one order lower).
    #[inline]
    fn alloc_anon_folio(
        &self,
        cpu: &mut Cpu,
        vma: &Vma,
        t: &PteTable,
        addr: u64,
        max_order: usize,
    ) -> VmResult<(u64, usize)> {
        // userfaultfd_armed(): per-page fidelity, order 0.
        let orders = if vma.flags.uffd_wp { 0 } else { vma.orders & ((1 << PMD_ORDER) - 1) & ((2 << max_order) - 1) };
        if orders != 0 {
            let got = match self.cfg.policy {
                Policy::Upstream => crate::policy::upstream::alloc_anon_folio(self, cpu, vma, t, addr, orders),
                Policy::V1 => crate::policy::v1::alloc_anon_folio(self, cpu, vma, t, addr, orders)?,
                Policy::Preferred => crate::policy::preferred::alloc_anon_folio(self, cpu, vma, t, addr, orders),
            };
            if let Some(folio) = got {
                // folio_zero_user() of whichever policy's folio, and its prep.
                vtime::step_n(Step::ZeroKib, (PAGE_SIZE << folio.1) >> 10);
                vtime::step(Step::PrepLargeFolio);
                return Ok(folio);
            }
        }
        Ok((self.folio_prealloc(cpu)?, 0))
    }

    /// The tail pages' `struct page` of a new large folio: zero-filled
    /// (`folio_zero_user()`), but for page `written`, which a user store is
    /// about to write (none: `usize::MAX`). Out of line: the order-0 path
    /// stays short.
    #[inline(never)]
    pub(crate) fn prep_tail_pages(&self, pfn: u64, nr: usize, written: usize) {
        let pages = self.alloc.folio_pages(pfn, nr);
        for p in &pages[1..] {
            p.set_info(0);
        }
        if (1..nr).contains(&written) {
            pages[written].set_info(PG_NONZERO);
        }
    }

    /// `do_anonymous_page()`.
    #[inline]
    fn do_anonymous_page(&self, cpu: &mut Cpu, vma: &Vma, pmd: &AtomicU64, addr: u64, write: bool) -> VmResult<Fault> {
        if !self.pte_alloc(cpu, pmd)? {
            // A huge PMD appeared meanwhile: re-execute.
            return Ok(Fault::NotMapped);
        }
        // SAFETY: `pte_alloc` left a table in the PMD; the mmap read lock
        // the fault path holds keeps it alive.
        let t = unsafe { PageTable::pte_table(pmd.load(Acquire)) };
        let idx = pte_index(addr);
        if !write {
            // Read fault: map the shared zero page, order 0.
            cpu.preempt(Point::BeforeLock);
            let _g = t.ptl.lock(&cpu.pc.ptl);
            if !pte_none(t.get(idx)) {
                return Ok(Fault::NotMapped);
            }
            t.set_ptes(idx, ZERO_PTE, 1);
            cpu.c().fault.zero_page.inc();
            return Ok(Fault::Mapped);
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
            let unchanged = if nr == 1 { pte_none(t.get(idx)) } else { t.pte_range_none(i, nr) };
            if !unchanged {
                if self.on_race == OnRace::RetryLower && nr > 1 && pte_none(t.get(idx)) {
                    // v1: the faulting PTE is still none: retry one order lower.
                    drop(g);
                    self.waste_folio(cpu, pfn, order);
                    cpu.c().race.retries.inc();
                    max_order = order - 1;
                    continue;
                }
                drop(g);
                self.waste_folio(cpu, pfn, order);
                return Ok(Fault::NotMapped);
            }
            // folio_ref_add(nr - 1), folio_add_new_anon_rmap(), set_ptes().
            let folio = self.alloc.page(pfn);
            // folio_zero_user(): the new folio holds zeroes, but for the page
            // a user store is about to write, marked now while the folio is
            // unpublished (so the store after the fault needs no atomic and
            // no second walk).
            let written = if cpu.store_pending { idx - i } else { usize::MAX };
            cpu.store_pending = false;
            if nr > 1 {
                self.prep_tail_pages(pfn, nr, written);
            }
            // One store for the allocation's reference and folio_ref_add(nr - 1).
            folio.folio_set_count(nr as u32);
            // The head's flags in the mapcount's store: a second write to
            // its cache-missing struct page stalled the PTL's release.
            self.folio_add_new_anon_rmap(cpu, folio, order, nr as u32, if written == 0 { PG_NONZERO } else { 0 });
            t.set_ptes(i, folio_mk_pte(pfn, order), nr);
            drop(g);
            let c = cpu.c();
            // add_mm_counter(MM_ANONPAGES, nr); count_mthp_stat(ANON_FAULT_ALLOC).
            c.rss.add(nr as u64);
            if order > 0 {
                c.mthp[order].anon_fault_alloc.inc();
            }
            c.folio_orders[order].inc();
            c.fault.anonymous.inc();
            return Ok(Fault::Mapped);
        }
    }

    /// `do_wp_page()` on the zero page: `wp_page_copy()` into an order-0 folio.
    fn do_wp_page(&self, cpu: &mut Cpu, vma: &Vma, t: &PteTable, addr: u64, orig: u64) -> VmResult<Fault> {
        self.vmf_anon_prepare(vma);
        let pfn = self.folio_prealloc(cpu)?;
        let idx = pte_index(addr);
        cpu.preempt(Point::BeforeLock);
        let g = t.ptl.lock(&cpu.pc.ptl);
        if t.get(idx) != orig {
            drop(g);
            self.waste_folio(cpu, pfn, 0);
            return Ok(Fault::NotMapped);
        }
        vtime::step(Step::TlbFlush); // ptep_clear_flush() of the zero page's entry
        let folio = self.alloc.page(pfn);
        folio.folio_set_count(1);
        self.folio_add_new_anon_rmap(cpu, folio, 0, 1, 0);
        vtime::step(Step::SetPte); // set_pte_at()
        t.ptes[idx].store(folio_mk_pte(pfn, 0), Release);
        drop(g);
        let c = cpu.c();
        c.rss.inc();
        c.folio_orders[0].inc();
        c.fault.wp_copy.inc();
        Ok(Fault::Mapped)
    }

    // -----------------------------------------------------------------------
    // Unmapping. The caller holds the mmap lock for write.

    /// `unmap_page_range()` over `[start, end)` of one VMA (`unmap_vmas`
    /// for munmap, `zap_page_range_single` for MADV_DONTNEED). `reclaim_pt`
    /// is `zap_details.reclaim_pt` (CONFIG_PT_RECLAIM, MADV_DONTNEED only):
    /// a PTE table whose whole range is zapped is freed.
    pub(crate) fn unmap_page_range(&self, cpu: &mut Cpu, start: u64, end: u64, reclaim_pt: bool) {
        let mut a = start;
        while a < end {
            let next = ((a & !(PMD_SIZE - 1)) + PMD_SIZE).min(end);
            if let Some(pmd) = self.pt.pmd_offset(a) {
                self.zap_pmd_range(cpu, pmd, a, next, reclaim_pt);
            }
            a = next;
        }
        vtime::tlb_finish_mmu();
        cpu.sync_pcp_gauge();
    }

    /// `zap_pmd_range()` for one PMD entry and `[addr, next)` inside it.
    fn zap_pmd_range(&self, cpu: &mut Cpu, pmd: &AtomicU64, addr: u64, next: u64, reclaim_pt: bool) {
        let v = pmd.load(Acquire);
        if v != 0 && pmd_huge(v) {
            if next - addr == PMD_SIZE {
                self.zap_huge_pmd(cpu, pmd);
            } else {
                // Partial: split the PMD mapping, then zap PTEs.
                self.split_huge_pmd(cpu, pmd);
            }
        }
        let v = pmd.load(Acquire);
        if v != 0 && !pmd_huge(v) {
            // SAFETY: a table PMD of this mm; the caller holds the mmap
            // lock for write, so only this thread can free it.
            let t = unsafe { PageTable::pte_table(v) };
            self.zap_pte_range(cpu, t, pte_index(addr), pte_index(next - PAGE_SIZE) + 1);
            // reclaim_pt_is_enabled(): the zap spanned the whole table,
            // so it is empty now; try_to_free_pte() frees it.
            if reclaim_pt && next - addr >= PMD_SIZE {
                let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
                if self.pt.free_pte_table(pmd) {
                    self.memcg.uncharge_kmem(1);
                }
            }
        }
    }

    /// `zap_pte_range()` over `ptes[from..to)`, batching the PTEs of one
    /// folio as `zap_present_ptes()`/`folio_pte_batch()` do.
    fn zap_pte_range(&self, cpu: &mut Cpu, t: &PteTable, from: usize, to: usize) {
        debug_assert!(to <= PTRS_PER_TABLE);
        let _g = t.ptl.lock(&cpu.pc.ptl);
        let mut i = from;
        while i < to {
            let pte = t.get(i);
            if pte_none(pte) {
                i += 1;
                continue;
            }
            t.ptep_get_and_clear(i);
            if pte & PTE_ZERO != 0 {
                vtime::step(Step::ZapPte);
                i += 1;
                continue;
            }
            let order = pte_order(pte);
            let pfn = pte_pfn(pte);
            let head = pfn & !((1u64 << order) - 1);
            // folio_pte_batch(): the following entries map the next pages
            // of the same folio.
            let mut nr = 1usize;
            while i + nr < to
                && t.get(i + nr) == pte + ((nr as u64) << PTE_PFN_SHIFT)
                && (pfn + nr as u64) < head + (1 << order)
            {
                t.ptep_get_and_clear(i + nr);
                nr += 1;
            }
            cpu.c().rss.sub(nr as u64);
            vtime::zap_folio_ptes(nr as u64);
            self.folio_remove_rmap_ptes(cpu, head, order, nr as u32);
            self.folio_put_refs(cpu, head, order, nr as u32);
            i += nr;
        }
    }

    /// `free_pgtables()`/`free_pgd_range()`: frees the PTE tables of the PMD
    /// ranges in `[start, end)` that lie wholly in `[floor, ceiling)` (the gap
    /// between the neighbouring VMAs; a ceiling of 0 is the top).
    pub(crate) fn free_pgtables(&self, start: u64, end: u64, floor: u64, ceiling: u64) {
        self.pt.for_each_pmd(start, end, |a, pmd| {
            let pmd_end = a + PMD_SIZE;
            if a >= floor && (ceiling == 0 || pmd_end <= ceiling) && self.pt.free_pte_table(pmd) {
                self.memcg.uncharge_kmem(1);
            }
        });
    }
}
