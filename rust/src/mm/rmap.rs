//! `mm/rmap.c`: a folio's mapcount as page-table entries map and unmap it,
//! and the deferred split of a large folio that is left partially mapped.
//! Only anonymous, exclusive folios exist here (one process, no fork), so
//! the anon_vma chain itself is not modelled: a VMA's anon_vma is an id
//! that decides merging (see [`super::vma`]).

use crate::mm::mm_types::{Page, MAPCOUNT_MASK, PG_PARTIALLY_MAPPED, PG_PMD_MAPPED};
use crate::mm::{Cpu, MmInner};
use crate::PMD_ORDER;

impl MmInner {
    /// `folio_add_new_anon_rmap()`: a new folio of `order`, mapped by `nr`
    /// PTEs, or by one PMD (`flags` has `PG_PMD_MAPPED`, `nr` = 512);
    /// counts `nr_anon` for a large folio (`mod_mthp_stat(MTHP_STAT_NR_ANON,
    /// 1)`). `flags` are the head's page flags, set in the same store as
    /// the mapcount (`PG_NONZERO` too when the fault's store lands on it).
    #[inline(always)]
    pub(crate) fn folio_add_new_anon_rmap(&self, cpu: &Cpu, folio: &Page, order: usize, nr: u32, flags: u32) {
        folio.init_folio(order, flags, nr);
        // In virtual time also folio_add_lru_vma(), which every caller does next.
        crate::drive::vtime::rmap_and_lru_add(order > 0);
        if order > 0 {
            cpu.c().mthp[order].nr_anon.inc();
        }
    }

    /// `folio_remove_rmap_ptes()`: `nr` PTEs no longer map pages of the
    /// folio at `head`. A large folio left partly mapped is queued for
    /// deferred split (`deferred_split_folio(folio, true)`), once.
    pub(crate) fn folio_remove_rmap_ptes(&self, cpu: &Cpu, head: u64, order: usize, nr: u32) {
        let folio = self.alloc.page(head);
        let info = folio.info();
        let left = (info & MAPCOUNT_MASK) - nr;
        let mut newinfo = (info & !MAPCOUNT_MASK) | left;
        if order > 0 && left > 0 && info & PG_PARTIALLY_MAPPED == 0 {
            newinfo |= PG_PARTIALLY_MAPPED;
            let c = cpu.c();
            c.mthp[order].split_deferred.inc();
            c.mthp[order].nr_anon_partially_mapped.inc();
            if order == PMD_ORDER {
                c.vm.thp_deferred_split_page.inc();
            }
        }
        folio.set_info(newinfo);
    }

    /// `folio_remove_rmap_pmd()`: the PMD that mapped the whole folio is gone.
    pub(crate) fn folio_remove_rmap_pmd(&self, _cpu: &Cpu, head: u64) {
        let folio = self.alloc.page(head);
        folio.set_info(folio.info() & !(MAPCOUNT_MASK | PG_PMD_MAPPED));
    }
}
