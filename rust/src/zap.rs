//! Unmapping: `zap_page_range_single()` / `unmap_page_range()` for munmap
//! and MADV_DONTNEED, with rmap removal and deferred split of partially
//! unmapped large folios.

use crate::fault::pte_order;
use crate::mm::{Cpu, MmInner};
use crate::page_alloc::{MAPCOUNT_MASK, PG_PARTIALLY_MAPPED};
use crate::pgtable::*;
use crate::{PAGE_SIZE, PMD_ORDER, PMD_SIZE, PTRS_PER_TABLE};
use std::sync::atomic::Ordering::*;

impl MmInner {
    /// Zaps `[start, end)`. The caller holds the mmap lock for write.
    /// `reclaim_pt` is MADV_DONTNEED's `zap_details.reclaim_pt`
    /// (CONFIG_PT_RECLAIM): a PTE table whose whole range is zapped is freed.
    pub(crate) fn zap_page_range(&self, cpu: &mut Cpu, start: u64, end: u64, reclaim_pt: bool) {
        let mut a = start;
        while a < end {
            let pmd_end = ((a & !(PMD_SIZE - 1)) + PMD_SIZE).min(end);
            if let Some(pmd) = self.pt.pmd_offset(a) {
                let v = pmd.load(Acquire);
                if v != 0 && pmd_huge(v) {
                    if a & (PMD_SIZE - 1) == 0 && pmd_end - a == PMD_SIZE {
                        self.zap_huge_pmd(cpu, pmd);
                    } else {
                        // Partial: split the PMD mapping, then zap PTEs.
                        self.split_huge_pmd(cpu, pmd);
                    }
                }
                let v = pmd.load(Acquire);
                if v != 0 && !pmd_huge(v) {
                    self.zap_pte_range(cpu, PageTable::pte_table(v), pte_index(a), pte_index(pmd_end - PAGE_SIZE) + 1);
                    // reclaim_pt_is_enabled(): the zap spanned the whole table,
                    // so it is empty now; try_to_free_pte() frees it.
                    if reclaim_pt && pmd_end - a >= PMD_SIZE {
                        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
                        self.pt.free_pte_table(pmd);
                    }
                }
            }
            a = pmd_end;
        }
        cpu.sync_pcp_gauge();
    }

    /// `zap_huge_pmd()`.
    fn zap_huge_pmd(&self, cpu: &mut Cpu, pmd: &std::sync::atomic::AtomicU64) {
        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
        let v = pmd.swap(0, AcqRel);
        if v == HUGE_ZERO_PMD {
            return;
        }
        let pfn = pte_pfn(v);
        cpu.c().rss.sub(512);
        let p = self.alloc.page(pfn);
        p.set_info(p.info() & !MAPCOUNT_MASK);
        self.folio_unmapped(cpu, pfn, PMD_ORDER);
    }

    /// `zap_pte_range()` over `ptes[from..to)`, batching the PTEs of one
    /// folio as `zap_present_ptes()`/`folio_pte_batch()` do.
    fn zap_pte_range(&self, cpu: &mut Cpu, t: &PteTable, from: usize, to: usize) {
        let g = t.ptl.lock(&cpu.pc.ptl);
        let mut i = from;
        while i < to {
            let pte = t.get(i);
            if pte == 0 {
                i += 1;
                continue;
            }
            t.get_and_clear(i);
            if pte & PTE_ZERO != 0 {
                i += 1;
                continue;
            }
            let order = pte_order(pte);
            let pfn = pte_pfn(pte);
            let head = pfn & !((1u64 << order) - 1);
            let mut nr = 1usize;
            while i + nr < to && t.get(i + nr) == pte + ((nr as u64) << PTE_PFN_SHIFT) && (pfn + nr as u64) < head + (1 << order) {
                t.get_and_clear(i + nr);
                nr += 1;
            }
            self.folio_remove_rmap_ptes(cpu, head, order, nr as u32);
            i += nr;
        }
        drop(g);
        debug_assert!(to <= PTRS_PER_TABLE);
    }

    /// `folio_remove_rmap_ptes()` and the reference drop that follows.
    fn folio_remove_rmap_ptes(&self, cpu: &mut Cpu, head: u64, order: usize, nr: u32) {
        let p = self.alloc.page(head);
        let info = p.info();
        let left = (info & MAPCOUNT_MASK) - nr;
        let mut newinfo = (info & !MAPCOUNT_MASK) | left;
        // Queue for deferred split if some pages were unmapped and some remain.
        if order > 0 && left > 0 && info & PG_PARTIALLY_MAPPED == 0 {
            newinfo |= PG_PARTIALLY_MAPPED;
            let c = cpu.c();
            c.mthp[order].split_deferred.inc();
            c.mthp[order].nr_anon_partially_mapped.inc();
            if order == PMD_ORDER {
                c.vm.thp_deferred_split_page.inc();
            }
        }
        p.set_info(newinfo);
        cpu.c().rss.sub(nr as u64);
        let refs = p.count.load(Relaxed) - nr;
        p.count.store(refs, Relaxed);
        if refs == 0 {
            self.folio_unmapped(cpu, head, order);
        }
    }

    /// The last reference is gone: undo the large-folio gauges and free.
    fn folio_unmapped(&self, cpu: &mut Cpu, head: u64, order: usize) {
        let info = self.alloc.page(head).info();
        if order > 0 {
            let c = cpu.c();
            c.mthp[order].nr_anon.sub(1);
            if info & PG_PARTIALLY_MAPPED != 0 {
                c.mthp[order].nr_anon_partially_mapped.sub(1);
            }
        }
        self.free_folio(cpu, head, order, true);
    }
}
