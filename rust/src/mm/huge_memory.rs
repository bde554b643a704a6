//! `mm/huge_memory.c` (and the helpers of `include/linux/huge_mm.h`): PMD
//! THP faults, the huge zero page, splitting a PMD mapping, and zapping a
//! PMD-mapped THP.

use crate::mm::memory::{Fault, VmResult};
use crate::mm::mm_types::{PG_NONZERO, PG_PARTIALLY_MAPPED, PG_PMD_MAPPED};
use crate::mm::pgtable::*;
use crate::mm::vma::{Vma, VmaTree};
use crate::mm::{Cpu, MmInner, Point};
use crate::sync::AtomicU64;
use crate::{PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_SIZE};
use std::sync::atomic::Ordering::*;
use std::sync::Arc;

#[inline(always)]
pub(crate) fn align_down(a: u64, size: u64) -> u64 {
    a & !(size - 1)
}

/// `highest_order()`.
#[inline(always)]
pub(crate) fn highest_order(orders: u32) -> usize {
    31 - orders.leading_zeros() as usize
}

/// `next_order()`: drops `prev` and returns the next highest.
#[inline(always)]
pub(crate) fn next_order(orders: &mut u32, prev: usize) -> usize {
    *orders &= !(1 << prev);
    if *orders == 0 {
        0
    } else {
        highest_order(*orders)
    }
}

/// `thp_vma_suitable_order()`: the naturally aligned range lies in the VMA.
#[inline(always)]
pub(crate) fn thp_vma_suitable_order(vma: &Vma, addr: u64, order: usize) -> bool {
    let size = PAGE_SIZE << order;
    let haddr = align_down(addr, size);
    haddr >= vma.start && haddr + size <= vma.end
}

impl MmInner {
    /// `vma_alloc_anon_folio_pmd()`: a charged PMD-order folio, counting
    /// `thp_fault_fallback{,_charge}` when there is none.
    fn vma_alloc_anon_folio_pmd(&self, cpu: &mut Cpu) -> Option<u64> {
        match self.vma_alloc_folio(cpu, PMD_ORDER) {
            Some(pfn) => {
                if self.memcg.mem_cgroup_charge(&mut cpu.stock, 1 << PMD_ORDER) {
                    crate::drive::vtime::step_n(crate::drive::vtime::Step::ZeroKib, PMD_SIZE >> 10);
                    crate::drive::vtime::step(crate::drive::vtime::Step::PrepLargeFolio);
                    return Some(pfn);
                }
                self.free_unmapped_folio(cpu, pfn, PMD_ORDER, false);
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
    /// The PTE table deposited beside the PMD (`pgtable_trans_huge_deposit`)
    /// is charged to the memcg (one page, as measured) by the caller.
    /// `maybe_pmd_mkwrite()`: writable only in a VM_WRITE VMA (a read fault
    /// of a read-only VMA gets a THP when the huge zero page is off).
    fn map_anon_folio_pmd_pf(&self, cpu: &Cpu, pmd: &AtomicU64, pfn: u64, vm_write: bool) {
        let folio = self.alloc.page(pfn);
        // folio_zero_user(): the new folio holds zeroes (the store of a
        // write fault is marked when the access re-executes).
        self.prep_tail_pages(pfn, 512, usize::MAX);
        folio.folio_set_count(1);
        self.folio_add_new_anon_rmap(cpu, folio, PMD_ORDER, 512, PG_PMD_MAPPED);
        pmd.store(mk_huge_pmd(pfn) | if vm_write { 0 } else { PMD_RDONLY }, Release);
        crate::drive::vtime::step(crate::drive::vtime::Step::SetPte);
        let c = cpu.c();
        c.rss.add(512);
        c.vm.thp_fault_alloc.inc();
        c.mthp[PMD_ORDER].anon_fault_alloc.inc();
        c.folio_orders[PMD_ORDER].inc();
    }

    /// `do_huge_pmd_anonymous_page()`. `None` is VM_FAULT_FALLBACK.
    pub(crate) fn do_huge_pmd_anonymous_page(
        &self,
        cpu: &mut Cpu,
        vma: &Vma,
        pmd: &AtomicU64,
        addr: u64,
        write: bool,
    ) -> VmResult<Option<Fault>> {
        let haddr = align_down(addr, PMD_SIZE);
        if haddr < vma.start || haddr + PMD_SIZE > vma.end {
            return Ok(None);
        }
        self.vmf_anon_prepare(vma);
        if !write && self.cfg.use_zero_page {
            let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
            if pmd.load(Acquire) != 0 {
                return Ok(Some(Fault::NotMapped));
            }
            // mm_get_huge_zero_folio(): the first user allocates it (a load
            // first, so later faults do not write the shared line).
            if !self.huge_zero_used.load(Relaxed) && !self.huge_zero_used.swap(true, Relaxed) {
                cpu.c().vm.thp_zero_page_alloc.inc();
            }
            pmd.store(HUGE_ZERO_PMD, Release);
            // The deposited PTE table is charged (the model cannot fail
            // this charge: `pte_alloc_one` would make it VM_FAULT_OOM).
            self.memcg.force_charge(1);
            cpu.c().fault.huge_zero_page.inc();
            return Ok(Some(Fault::Mapped));
        }
        let r = self.map_new_pmd_folio(cpu, pmd, 0, vma.flags.write);
        if r == Some(Fault::Mapped) {
            cpu.c().fault.pmd_thp.inc();
        }
        Ok(r)
    }

    /// Allocates a charged PMD-order folio and maps it if the PMD still holds
    /// `expected` under `page_table_lock`, else drops it (a lost race): the
    /// part `do_huge_pmd_anonymous_page` and `do_huge_zero_wp_pmd` share
    /// (not a kernel function). `None` is VM_FAULT_FALLBACK.
    fn map_new_pmd_folio(&self, cpu: &mut Cpu, pmd: &AtomicU64, expected: u64, vm_write: bool) -> Option<Fault> {
        let pfn = self.vma_alloc_anon_folio_pmd(cpu)?;
        cpu.preempt(Point::AfterAlloc);
        let g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        if pmd.load(Acquire) != expected {
            drop(g);
            self.waste_folio(cpu, pfn, PMD_ORDER);
            return Some(Fault::NotMapped);
        }
        self.map_anon_folio_pmd_pf(cpu, pmd, pfn, vm_write);
        if expected == 0 {
            // A new PMD deposits a PTE table (charged); a huge zero PMD
            // replaced keeps the one it had.
            self.memcg.force_charge(1);
        }
        Some(Fault::Mapped)
    }

    /// `do_huge_zero_wp_pmd()`: a write to the huge zero page gets a THP.
    /// `None` is VM_FAULT_FALLBACK (split the PMD, then the PTE path).
    pub(crate) fn do_huge_zero_wp_pmd(&self, cpu: &mut Cpu, pmd: &AtomicU64) -> Option<Fault> {
        // A write fault: access_error() let it through, so VM_WRITE.
        let r = self.map_new_pmd_folio(cpu, pmd, HUGE_ZERO_PMD, true);
        if r == Some(Fault::Mapped) {
            cpu.c().fault.huge_zero_wp.inc();
        }
        r
    }

    /// `__split_huge_zero_page_pmd()`: 512 zero-page PTEs.
    pub(crate) fn split_huge_zero_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let v = pmd.load(Acquire);
        if pmd_huge(v) && is_huge_zero_pmd(v) {
            let pte = PTE_ZERO | pte_prot_of_pmd(v) & !PTE_WRITE;
            self.pt.install_split_table(pmd, |_| pte);
            cpu.c().vm.thp_split_pmd.inc();
        }
    }

    /// `__split_huge_pmd()` of a PMD-mapped THP: the folio stays whole and
    /// becomes PTE-mapped (a reference per PTE). The caller holds the mmap
    /// lock for write, which excludes faults.
    pub(crate) fn split_huge_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let v = pmd.load(Acquire);
        if is_huge_zero_pmd(v) {
            return self.split_huge_zero_pmd(cpu, pmd);
        }
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let pfn = pte_pfn(v);
        let folio = self.alloc.page(pfn);
        // folio_ref_add(HPAGE_PMD_NR - 1): one reference per PTE now.
        folio.folio_ref_add(511);
        folio.set_info(folio.info() & !PG_PMD_MAPPED);
        let pte = (folio_mk_pte(pfn, PMD_ORDER) & !PTE_PROT_MASK) | pte_prot_of_pmd(v);
        self.pt.install_split_table(pmd, |i| pte + ((i as u64) << PAGE_SHIFT));
        cpu.c().vm.thp_split_pmd.inc();
    }

    /// `split_huge_pmd_address()`: if a huge PMD maps `addr`, split it.
    pub(crate) fn split_huge_pmd_address(&self, cpu: &Cpu, addr: u64) {
        if let Some(pmd) = self.pt.pmd_offset(addr) {
            if pmd_huge(pmd.load(Acquire)) {
                self.split_huge_pmd(cpu, pmd);
            }
        }
    }

    /// `zap_huge_pmd()`: the caller holds the mmap lock for write.
    pub(crate) fn zap_huge_pmd(&self, cpu: &mut Cpu, pmd: &AtomicU64) {
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let v = pmd.swap(0, AcqRel);
        // zap_deposited_table(): the deposited PTE table is freed.
        self.memcg.uncharge_kmem(1);
        if is_huge_zero_pmd(v) {
            return;
        }
        let pfn = pte_pfn(v);
        crate::drive::vtime::zap_folio_ptes(1);
        cpu.c().rss.sub(512);
        self.folio_remove_rmap_pmd(cpu, pfn);
        self.folio_put_refs(cpu, pfn, PMD_ORDER, 1);
    }
}

impl MmInner {
    /// `vma_adjust_trans_huge()`: a VMA about to be split at `start` or
    /// `end` where that is not a PMD boundary has a PMD mapping there split
    /// first (`split_huge_pmd_address`), since a huge PMD cannot span two
    /// VMAs. The caller holds the mmap lock for write.
    pub(crate) fn vma_adjust_trans_huge(&self, t: &VmaTree, cpu: &Cpu, start: u64, end: u64) {
        for b in [start, end] {
            if b % PMD_SIZE != 0 && !t.is_boundary(b) {
                self.split_huge_pmd_address(cpu, b);
            }
        }
    }

    /// `split_folio()` of the PTE-mapped large anonymous folio at `head`,
    /// whose page `k` would be mapped at `va + k * PAGE_SIZE`: every page
    /// becomes an order-0 folio (`__split_folio_to_order`); mapped pages
    /// that hold data keep their PTE (`remap_page`) with one reference and
    /// mapcount each, mapped pages that hold only zeroes are mapped to the
    /// shared zero page instead, and all others are freed. Counts `split` (and `thp_split_page` for a
    /// PMD-order folio), takes the folio out of `nr_anon` and off the
    /// deferred split queue. `unmap_counts_deferred`: the folio was
    /// PTE-mapped before this split began, so `unmap_folio` (one PTE at a
    /// time through rmap) leaves it partially mapped on the way and
    /// `deferred_split_folio` counts `split_deferred` once, as measured on
    /// 6.18; a folio split straight from its PMD mapping is not.
    ///
    /// A page mapped elsewhere than at `va` (mremap moved part of the
    /// folio away) is found as `rmap_walk_anon()` finds it: its index
    /// (`folio->index + k`, the linear index of `va + k * PAGE_SIZE` in
    /// `vma`, which a move keeps in `vm_pgoff`) in each VMA of the same
    /// anon_vma. Returns false, splitting nothing, if some mapped page is
    /// still not found. The caller holds the mmap lock for write, which
    /// excludes faults, and no PTL.
    pub(crate) fn split_folio(
        &self,
        cpu: &mut Cpu,
        t: &VmaTree,
        head: u64,
        va: u64,
        unmap_counts_deferred: bool,
    ) -> bool {
        let folio = self.alloc.page(head);
        let info = folio.info();
        let order = folio.order();
        let nr = 1u64 << order;
        debug_assert!(order > 0 && info & PG_PMD_MAPPED == 0);
        // The PTE at `a`, if it maps page `k`.
        let pte_at = |a: u64, k: u64| -> Option<&AtomicU64> {
            let pmd = self.pt.pmd_offset(a)?;
            let v = pmd.load(Acquire);
            if v == 0 || pmd_huge(v) {
                return None;
            }
            // SAFETY: a table PMD of this mm; the caller holds the mmap
            // write lock, so no table is freed meanwhile.
            let e = &unsafe { PageTable::pte_table(v) }.ptes[pte_index(a)];
            let pte = e.load(Acquire);
            (pte != 0 && pte & PTE_ZERO == 0 && pte_pfn(pte) == head + k && pte_order(pte) == order).then_some(e)
        };
        // The PTE of each page, if one maps it: at `va` unless moved.
        let mut slots: Vec<Option<&AtomicU64>> = (0..nr).map(|k| pte_at(va.wrapping_add(k * PAGE_SIZE), k)).collect();
        let mut found = slots.iter().filter(|s| s.is_some()).count() as u32;
        if found != folio.mapcount() {
            // rmap_walk_anon(): the VMA that maps a page at its place in
            // `va` gives the folio's index; a moved page lies in a VMA of
            // the same anon_vma whose vm_pgoff range holds its index.
            let Some(home) = (0..nr).find(|&k| slots[k as usize].is_some()).and_then(|k| t.lookup(va + k * PAGE_SIZE))
            else {
                return false;
            };
            let index = home.pgoff.wrapping_add((va >> PAGE_SHIFT).wrapping_sub(home.start >> PAGE_SHIFT));
            let av = home.anon_vma();
            for w in t.iter().filter(|w| w.anon_vma() == av && !Arc::ptr_eq(w, home)) {
                let (lo, hi) = (index.max(w.pgoff), (index + nr).min(w.pgoff + w.pages()));
                for i in lo..hi {
                    let k = i - index;
                    if slots[k as usize].is_none() {
                        slots[k as usize] = pte_at(w.start + ((i - w.pgoff) << PAGE_SHIFT), k);
                        found += slots[k as usize].is_some() as u32;
                    }
                }
            }
            if found != folio.mapcount() {
                return false;
            }
        }
        let c = cpu.c();
        if unmap_counts_deferred && info & PG_PARTIALLY_MAPPED == 0 {
            c.mthp[order].split_deferred.inc();
            if order == PMD_ORDER {
                c.vm.thp_deferred_split_page.inc();
            }
        }
        c.mthp[order].split.inc();
        if order == PMD_ORDER {
            c.vm.thp_split_page.inc();
        }
        c.mthp[order].nr_anon.sub(1);
        if info & PG_PARTIALLY_MAPPED != 0 {
            c.mthp[order].nr_anon_partially_mapped.sub(1);
        }
        for k in 0..nr {
            let page = self.alloc.page(head + k);
            match slots[k as usize] {
                Some(e) => {
                    let pte = e.load(Acquire);
                    if !page.nonzero() && !self.alloc.written(head + k) {
                        // remap_page() with RMP_USE_SHARED_ZEROPAGE:
                        // try_to_map_unused_to_zeropage() maps a page that
                        // holds only zeroes to the shared zero page (keeping
                        // its protection) and frees it.
                        let prot = if pte & PTE_PROTNONE != 0 { PTE_PROTNONE } else { PTE_PRESENT };
                        e.store(PTE_ZERO | prot, Release);
                        cpu.c().rss.sub(1);
                        page.init_folio(0, 0, 0);
                        self.free_unmapped_folio(cpu, head + k, 0, true);
                        continue;
                    }
                    e.store(pte & !(0xf << PTE_ORDER_SHIFT), Release);
                    page.init_folio(0, PG_NONZERO, 1);
                    page.folio_set_count(1);
                }
                None => {
                    page.init_folio(0, 0, 0);
                    self.free_unmapped_folio(cpu, head + k, 0, true);
                }
            }
        }
        true
    }
}
