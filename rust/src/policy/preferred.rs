//! The reviewers' alternative, taken up in Ryan Roberts' v2 to v4 of the
//! series: only the preferred order (`anon_folio_order()`, here the largest
//! allowable size) if its range fits and is empty, else order 0.

use crate::mm::huge_memory::{align_down, highest_order, thp_vma_suitable_order};
use crate::mm::pgtable::{pte_index, PteTable};
use crate::mm::vma::Vma;
use crate::mm::{Cpu, MmInner, Point};
use crate::PAGE_SIZE;

/// `anon_folio_order()`: the preferred order.
#[inline]
pub fn anon_folio_order(orders: u32) -> usize {
    highest_order(orders)
}

/// The preferred order if it fits in the VMA and its range is all none,
/// allocated and charged; `None` is the order-0 fallback.
pub fn alloc_anon_folio(
    mm: &MmInner,
    cpu: &mut Cpu,
    vma: &Vma,
    t: &PteTable,
    addr: u64,
    orders: u32,
) -> Option<(u64, usize)> {
    let order = anon_folio_order(orders);
    let a = align_down(addr, PAGE_SIZE << order);
    let fits = thp_vma_suitable_order(vma, addr, order) && t.pte_range_none(pte_index(a), 1 << order);
    cpu.preempt(Point::AfterEstimate);
    if fits {
        return mm.try_alloc_order(cpu, order).map(|pfn| (pfn, order));
    }
    None
}
