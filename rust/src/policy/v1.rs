//! The seed patch, "mm: Allocate large folios for anonymous memory" (v1,
//! June 2023): estimate with `calc_anon_folio_order_alloc()`, allocate with
//! `try_vma_alloc_movable_folio()` from that order down to 2 (never 1),
//! charge with GFP_KERNEL (a failure is OOM). Its retry one order lower
//! after a lost race is in `do_anonymous_page` (`OnRace::RetryLower`).

use crate::mm::huge_memory::{align_down, highest_order};
use crate::mm::memory::{Oom, VmResult};
use crate::mm::pgtable::{pte_index, PteTable};
use crate::mm::vma::Vma;
use crate::mm::{Cpu, MmInner, Point};
use crate::PAGE_SIZE;

/// `calc_anon_folio_order_alloc()`: the highest order from `order` down
/// to 2 whose aligned range lies in the VMA and has no populated PTE; 0 if
/// none. The scan remembers the first populated PTE it found, so a smaller
/// range known to be clear (or known to hold it) is not read again.
pub fn calc_anon_folio_order_alloc(vma: &Vma, t: &PteTable, addr: u64, mut order: usize) -> usize {
    let mut first_set: Option<usize> = None;
    while order > 1 {
        let nr = 1usize << order;
        let a = align_down(addr, PAGE_SIZE << order);
        let i = pte_index(a);
        if a >= vma.start && a + (PAGE_SIZE << order) <= vma.end {
            match first_set {
                // PTEs covered by this order are known to be none.
                Some(f) if i + nr <= f => return order,
                // A populated PTE is known to be in this range.
                Some(f) if i <= f => {}
                _ => {
                    let f = t.first_set(i, nr);
                    if f == i + nr {
                        return order;
                    }
                    first_set = Some(f);
                }
            }
        }
        order -= 1;
    }
    0
}

/// v1's allocation in `do_anonymous_page`: `max_anon_folio_order()` is the
/// highest order in `orders`; then `calc_anon_folio_order_alloc()` and
/// `try_vma_alloc_movable_folio()`. `None` is the order-0 fallback.
pub fn alloc_anon_folio(
    mm: &MmInner,
    cpu: &mut Cpu,
    vma: &Vma,
    t: &PteTable,
    addr: u64,
    orders: u32,
) -> VmResult<Option<(u64, usize)>> {
    let mut order = calc_anon_folio_order_alloc(vma, t, addr, highest_order(orders));
    cpu.preempt(Point::AfterEstimate);
    // try_vma_alloc_movable_folio(): every order down to 2.
    while order > 1 {
        if let Some(pfn) = mm.vma_alloc_folio(cpu, order) {
            // v1 charges with GFP_KERNEL: failure is OOM.
            if !mm.memcg.mem_cgroup_charge(&mut cpu.stock, 1 << order) {
                mm.free_unmapped_folio(cpu, pfn, order, false);
                cpu.c().mthp[order].anon_fault_fallback_charge.inc();
                return Err(Oom);
            }
            return Ok(Some((pfn, order)));
        }
        cpu.c().mthp[order].anon_fault_fallback.inc();
        order -= 1;
    }
    Ok(None)
}
