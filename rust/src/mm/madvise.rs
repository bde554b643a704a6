//! `madvise()` (`mm/madvise.c`): MADV_DONTNEED zaps, MADV_FREE marks pages
//! lazily freed (`madvise_free_pte_range`), MADV_HUGEPAGE / MADV_NOHUGEPAGE
//! (`hugepage_madvise`) and MADV_DONTFORK / MADV_DOFORK change the VMA
//! flags, MADV_POPULATE_READ / WRITE fault the range in through GUP
//! (`madvise_populate`, [`super::gup`]).

use crate::error::Result;
use crate::mm::huge_memory::align_down;
use crate::mm::pgtable::*;
use crate::mm::vma::{advise_flags, VmFlags};
use crate::mm::{Cpu, Mm, MmInner};
use crate::trace::{check_range, Advice};
use crate::{PAGE_SIZE, PMD_SIZE};
use std::sync::atomic::Ordering::Acquire;

impl Mm {
    /// `madvise()`. DONTNEED zaps what is mapped (`madvise_dontneed_single_vma`),
    /// FREE marks it lazyfree (`madvise_free_single_vma`); the flag advice
    /// changes the VMA flags. A range with unmapped parts is applied where
    /// mapped, as the kernel does before returning ENOMEM. POPULATE_READ /
    /// WRITE stop at an unmapped page or a VMA that forbids the access
    /// (ENOMEM / EINVAL: an error).
    pub fn madvise(&self, cpu: &mut Cpu, addr: u64, len: u64, advice: Advice) -> Result<()> {
        check_range(addr, len, 0)?;
        let end = addr + len;
        match advice {
            // madvise_populate() runs under the mmap read lock.
            Advice::PopulateRead => return self.faultin_page_range(cpu, addr, end, false),
            Advice::PopulateWrite => return self.faultin_page_range(cpu, addr, end, true),
            _ => {}
        }
        let cfg = &self.cfg;
        self.with_write_lock(cpu, |mm, t, cpu| {
            match advice {
                Advice::DontNeed => {
                    for (s, e) in t.pieces(addr, end) {
                        mm.unmap_page_range(cpu, s, e, true);
                    }
                }
                Advice::Free => {
                    for (s, e) in t.pieces(addr, end) {
                        mm.madvise_free_pte_range(cpu, s, e);
                    }
                }
                _ => {
                    // vma_adjust_trans_huge(): a VMA split inside a PMD-mapped
                    // range splits the PMD mapping first; only a VMA whose
                    // flags change is split.
                    for b in [addr, end] {
                        if let Some(v) = t.lookup(b).filter(|v| v.start != b) {
                            let mut f = v.flags;
                            advise_flags(advice, &mut f);
                            if f != v.flags && b % PMD_SIZE != 0 {
                                mm.split_huge_pmd_address(cpu, b);
                            }
                        }
                    }
                    t.madvise_flags(addr, end, advice, |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage));
                }
            }
            Ok(())
        })
    }
}

impl MmInner {
    /// `madvise_free_pte_range()` (with `madvise_free_huge_pmd`) over
    /// `[start, end)` of one VMA, with no memory pressure: a folio wholly
    /// in the range stays mapped, marked lazyfree (clean and old: nothing
    /// the model tracks, since nothing reclaims it; a later access takes no
    /// fault). A large folio only partly in the range is split to order 0
    /// (`split_folio`), and so is a PMD-mapped THP only partly in it.
    /// Zero-page entries and none entries are skipped.
    pub(crate) fn madvise_free_pte_range(&self, cpu: &mut Cpu, start: u64, end: u64) {
        let mut a = start;
        while a < end {
            let pmd_start = align_down(a, PMD_SIZE);
            let next = (pmd_start + PMD_SIZE).min(end);
            if let Some(pmd) = self.pt.pmd_offset(a) {
                let v = pmd.load(Acquire);
                if v != 0 && pmd_huge(v) && !is_huge_zero_pmd(v) && next - a != PMD_SIZE {
                    // madvise_free_huge_pmd(), part of the PMD: split_folio()
                    // of the PMD-mapped folio, which unmap_folio() splits at
                    // the PMD first.
                    self.split_huge_pmd(cpu, pmd);
                    self.split_folio(cpu, pte_pfn(v), pmd_start, false);
                }
                let v = pmd.load(Acquire);
                if v != 0 && !pmd_huge(v) {
                    // SAFETY: a table PMD of this mm; the caller holds the
                    // mmap lock for write, so only this thread frees tables.
                    let t = unsafe { PageTable::pte_table(v) };
                    let (from, to) = (pte_index(a), pte_index(next - PAGE_SIZE) + 1);
                    let mut i = from;
                    while i < to {
                        let pte = t.get(i);
                        let order = pte_order(pte);
                        if pte == 0 || pte & PTE_ZERO != 0 || order == 0 {
                            i += 1;
                            continue;
                        }
                        let pfn = pte_pfn(pte);
                        let head = pfn & !((1u64 << order) - 1);
                        // The PTEs from here that map the next pages of the folio.
                        let mut nr = 1;
                        while i + nr < to
                            && t.get(i + nr) == pte + ((nr as u64) << PTE_PFN_SHIFT)
                            && pfn + (nr as u64) < head + (1 << order)
                        {
                            nr += 1;
                        }
                        if nr < 1 << order {
                            let va = pmd_start + (i as u64) * PAGE_SIZE - (pfn - head) * PAGE_SIZE;
                            if self.split_folio(cpu, head, va, true) {
                                // Order 0 now: look at the same PTE again.
                                continue;
                            }
                        }
                        i += nr;
                    }
                }
            }
            a = next;
        }
        cpu.sync_pcp_gauge();
    }
}
