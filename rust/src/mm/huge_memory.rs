//! `mm/huge_memory.c` (and the helpers of `include/linux/huge_mm.h`): PMD
//! THP faults, the huge zero page, splitting a PMD mapping, and zapping a
//! PMD-mapped THP.

use crate::mm::memory::{Fault, VmResult};
use crate::mm::mm_types::PG_PMD_MAPPED;
use crate::mm::pgtable::*;
use crate::mm::vma::Vma;
use crate::mm::{Cpu, MmInner, Point};
use crate::sync::AtomicU64;
use crate::{PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_SIZE};
use std::sync::atomic::Ordering::*;

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
    fn map_anon_folio_pmd_pf(&self, cpu: &Cpu, pmd: &AtomicU64, pfn: u64) {
        let folio = self.alloc.page(pfn);
        folio.folio_set_count(1);
        self.folio_add_new_anon_rmap(cpu, folio, PMD_ORDER, 512, true);
        pmd.store(mk_huge_pmd(pfn), Release);
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
            // mm_get_huge_zero_folio(): the first user allocates it.
            if !self.huge_zero_used.swap(true, Relaxed) {
                cpu.c().vm.thp_zero_page_alloc.inc();
            }
            pmd.store(HUGE_ZERO_PMD, Release);
            cpu.c().fault.huge_zero_page.inc();
            return Ok(Some(Fault::Mapped));
        }
        let r = self.map_new_pmd_folio(cpu, pmd, 0);
        if r == Some(Fault::Mapped) {
            cpu.c().fault.pmd_thp.inc();
        }
        Ok(r)
    }

    /// Allocates a charged PMD-order folio and maps it if the PMD still holds
    /// `expected` under `page_table_lock`, else drops it (a lost race): the
    /// part `do_huge_pmd_anonymous_page` and `do_huge_zero_wp_pmd` share
    /// (not a kernel function). `None` is VM_FAULT_FALLBACK.
    fn map_new_pmd_folio(&self, cpu: &mut Cpu, pmd: &AtomicU64, expected: u64) -> Option<Fault> {
        let pfn = self.vma_alloc_anon_folio_pmd(cpu)?;
        cpu.preempt(Point::AfterAlloc);
        let g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        if pmd.load(Acquire) != expected {
            drop(g);
            self.waste_folio(cpu, pfn, PMD_ORDER);
            return Some(Fault::NotMapped);
        }
        self.map_anon_folio_pmd_pf(cpu, pmd, pfn);
        Some(Fault::Mapped)
    }

    /// `do_huge_zero_wp_pmd()`: a write to the huge zero page gets a THP.
    /// `None` is VM_FAULT_FALLBACK (split the PMD, then the PTE path).
    pub(crate) fn do_huge_zero_wp_pmd(&self, cpu: &mut Cpu, pmd: &AtomicU64) -> Option<Fault> {
        let r = self.map_new_pmd_folio(cpu, pmd, HUGE_ZERO_PMD);
        if r == Some(Fault::Mapped) {
            cpu.c().fault.huge_zero_wp.inc();
        }
        r
    }

    /// `__split_huge_zero_page_pmd()`: 512 zero-page PTEs.
    pub(crate) fn split_huge_zero_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        if pmd.load(Acquire) == HUGE_ZERO_PMD {
            self.pt.install_split_table(pmd, |_| ZERO_PTE);
            cpu.c().vm.thp_split_pmd.inc();
        }
    }

    /// `__split_huge_pmd()` of a PMD-mapped THP: the folio stays whole and
    /// becomes PTE-mapped (a reference per PTE). The caller holds the mmap
    /// lock for write, which excludes faults.
    pub(crate) fn split_huge_pmd(&self, cpu: &Cpu, pmd: &AtomicU64) {
        let v = pmd.load(Acquire);
        if v == HUGE_ZERO_PMD {
            return self.split_huge_zero_pmd(cpu, pmd);
        }
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let pfn = pte_pfn(v);
        let folio = self.alloc.page(pfn);
        // folio_ref_add(HPAGE_PMD_NR - 1): one reference per PTE now.
        folio.folio_ref_add(511);
        folio.set_info(folio.info() & !PG_PMD_MAPPED);
        let pte = folio_mk_pte(pfn, PMD_ORDER);
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
        if v == HUGE_ZERO_PMD {
            return;
        }
        let pfn = pte_pfn(v);
        crate::drive::vtime::zap_folio_ptes(1);
        cpu.c().rss.sub(512);
        self.folio_remove_rmap_pmd(cpu, pfn);
        self.folio_put_refs(cpu, pfn, PMD_ORDER, 1);
    }
}
