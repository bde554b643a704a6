//! Linux 6.8 to 6.18 (`mm/memory.c`, Ryan Roberts' series as merged):
//! the suitable orders, then drop each whose naturally aligned range is not
//! all `pte_none`, then try the rest from the highest down.

use crate::mm::huge_memory::{align_down, highest_order, next_order, thp_vma_suitable_order};
use crate::mm::pgtable::{pte_index, PteTable};
use crate::mm::vma::Vma;
use crate::mm::{Cpu, MmInner, Point};
use crate::PAGE_SIZE;

/// The large-folio part of `alloc_anon_folio()`: a charged folio and its
/// order, or `None` for the order-0 fallback.
#[inline]
pub fn alloc_anon_folio(
    mm: &MmInner,
    cpu: &mut Cpu,
    vma: &Vma,
    t: &PteTable,
    addr: u64,
    mut orders: u32,
) -> Option<(u64, usize)> {
    // thp_vma_suitable_orders(): drop orders until one fits in the VMA.
    let mut order = highest_order(orders);
    while orders != 0 && !thp_vma_suitable_order(vma, addr, order) {
        order = next_order(&mut orders, order);
    }
    // Drop orders whose aligned range is not all pte_none().
    while orders != 0 {
        let a = align_down(addr, PAGE_SIZE << order);
        if t.pte_range_none(pte_index(a), 1 << order) {
            break;
        }
        order = next_order(&mut orders, order);
    }
    cpu.preempt(Point::AfterEstimate);
    while orders != 0 {
        if let Some(pfn) = mm.try_alloc_order(cpu, order) {
            return Some((pfn, order));
        }
        order = next_order(&mut orders, order);
    }
    None
}
