//! `mm/swap.c`: dropping folio references and freeing a folio whose last
//! reference is gone (`folios_put_refs`, `__folio_put`). LRU lists are not
//! modelled (no reclaim).

use crate::mm::mm_types::PG_PARTIALLY_MAPPED;
use crate::mm::{Cpu, MmInner};

impl MmInner {
    /// `folios_put_refs()` for one folio: drops `nr` references and frees
    /// the folio when none are left.
    #[inline]
    pub(crate) fn folio_put_refs(&self, cpu: &mut Cpu, head: u64, order: usize, nr: u32) {
        if self.alloc.page(head).folio_ref_sub_and_test(nr) {
            self.__folio_put(cpu, head, order);
        }
    }

    /// `__folio_put()` of a folio that was mapped: off the deferred split
    /// queue and out of the `nr_anon` gauges (`folio_unqueue_deferred_split`,
    /// `free_pages_prepare`), uncharged, freed.
    #[allow(non_snake_case)]
    pub(crate) fn __folio_put(&self, cpu: &mut Cpu, head: u64, order: usize) {
        crate::drive::vtime::lru_del();
        let info = self.alloc.page(head).info();
        if order > 0 {
            let c = cpu.c();
            c.mthp[order].nr_anon.sub(1);
            if info & PG_PARTIALLY_MAPPED != 0 {
                c.mthp[order].nr_anon_partially_mapped.sub(1);
            }
        }
        self.free_unmapped_folio(cpu, head, order, true);
    }

    /// `folio_put()` of a folio no page table maps: uncharged if it was
    /// charged (`mem_cgroup_uncharge`), then `free_frozen_pages()`.
    #[inline]
    pub(crate) fn free_unmapped_folio(&self, cpu: &mut Cpu, pfn: u64, order: usize, charged: bool) {
        if charged {
            self.memcg.mem_cgroup_uncharge(&mut cpu.stock, 1 << order);
        }
        cpu.c().vm.pgfree.add(1 << order);
        crate::drive::vtime::step_n(crate::drive::vtime::Step::FreePage, 1 << order);
        crate::drive::vtime::step_n(crate::drive::vtime::Step::FreeLargeFolio, u64::from(order > 0));
        self.alloc.free_frozen_pages(&mut cpu.pcp, pfn, order, &cpu.pc.zone_lock);
    }
}
