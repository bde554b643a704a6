//! `madvise()` (`mm/madvise.c`): MADV_DONTNEED zaps, MADV_FREE marks pages
//! lazily freed (`madvise_free_pte_range`), MADV_HUGEPAGE / MADV_NOHUGEPAGE
//! (`hugepage_madvise`) and MADV_DONTFORK / MADV_DOFORK change the VMA
//! flags, MADV_POPULATE_READ / WRITE fault the range in through GUP
//! (`madvise_populate`, [`super::gup`]).

use crate::error::Result;
use crate::mm::huge_memory::align_down;
use crate::mm::pgtable::*;
use crate::mm::vma::{advise_flags, VmFlags, VmaTree};
use crate::mm::{Cpu, Mm, MmInner};
use crate::trace::{check_range, Advice};
use crate::{PAGE_SIZE, PMD_SIZE};
use std::sync::atomic::Ordering::Acquire;

impl Mm {
    /// `madvise()`. DONTNEED zaps what is mapped (`madvise_dontneed_single_vma`),
    /// FREE marks it lazyfree (`madvise_free_single_vma`); the flag advice
    /// changes the VMA flags. A range with unmapped parts is applied where
    /// mapped, as the kernel does before returning ENOMEM. POPULATE_READ /
    /// WRITE stop at the first unmapped page (ENOMEM, likewise not an
    /// error); a VMA that forbids the access is EINVAL, an error.
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
                        mm.madvise_free_pte_range(cpu, t, s, e);
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
    pub(crate) fn madvise_free_pte_range(&self, cpu: &mut Cpu, vmas: &VmaTree, start: u64, end: u64) {
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
                    self.split_folio(cpu, vmas, pte_pfn(v), pmd_start, false);
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
                            if self.split_folio(cpu, vmas, head, va, true) {
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

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::testing::*;
    use crate::Advice;

    /// Findings 5: MADV_FREE wholly over four 64K folios splits nothing and
    /// keeps RSS; a later write takes no fault. Over half of two folios:
    /// both split to order 0 (split +2, split_deferred +2, nr_anon -2),
    /// RSS unchanged, writes to the freed pages take no fault.
    #[test]
    fn madv_free_keeps_whole_folios_and_splits_the_ones_it_cuts() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 256 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        mm.madvise(&mut cpu, B, 256 * K, Advice::Free).unwrap();
        let s = mm.stats();
        assert_eq!((s.mthp[4].split, s.mthp[4].nr_anon, s.rss_pages), (0, 4, 64));
        touch(&mm, &mut cpu, B, 256 * K, true);
        touch(&mm, &mut cpu, B, 256 * K, false);
        assert_eq!(faults(&mm), 4);
        mm.madvise(&mut cpu, B + 0x8000, 0x10000, Advice::Free).unwrap();
        let m = mm.stats().mthp[4];
        assert_eq!((m.split, m.split_deferred, m.nr_anon, m.nr_anon_partially_mapped), (2, 2, 2, 0));
        assert_eq!(mm.stats().rss_pages, 64);
        check(&mm);
        touch(&mm, &mut cpu, B + 0x8000, 0x10000, true);
        assert_eq!(faults(&mm), 4);
        // One 4K page inside a 64K folio.
        mm.madvise(&mut cpu, B + 0x23000, 0x1000, Advice::Free).unwrap();
        assert_eq!(mm.stats().mthp[4].split, 3);
        // The split pages are order-0 folios now: unmapping one frees one page.
        mm.munmap(&mut cpu, B + 0x21000, 0x1000).unwrap();
        assert_eq!((mm.stats().rss_pages, mm.stats().mthp[4].split_deferred), (63, 3));
        check(&mm);
    }

    /// A whole PMD THP stays PMD-mapped; the first 64K of one splits the
    /// PMD and the folio to 512 order-0 pages (thp_split_pmd +1, split +1,
    /// thp_split_page +1, no split_deferred). Pages that were written keep
    /// their data and take no fault after; pages never written hold zeroes
    /// and the split maps them to the shared zero page, so a write to one
    /// is a copy (one fault).
    #[test]
    fn madv_free_of_part_of_a_pmd_thp_splits_it_to_order_0() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 4 << 20, hg()).unwrap();
        mm.access(&mut cpu, B, true).unwrap();
        touch(&mm, &mut cpu, B + 0x1000, 0x1f000, true);
        mm.access(&mut cpu, B + (2 << 20), true).unwrap();
        mm.madvise(&mut cpu, B + (2 << 20), 2 << 20, Advice::Free).unwrap();
        assert_eq!(mm.stats().vm.thp_split_pmd, 0);
        mm.madvise(&mut cpu, B, 64 * K, Advice::Free).unwrap();
        let s = mm.stats();
        assert_eq!((s.vm.thp_split_pmd, s.mthp[9].split, s.vm.thp_split_page), (1, 1, 1));
        assert_eq!((s.mthp[9].split_deferred, s.mthp[9].nr_anon), (0, 1));
        assert_eq!(s.rss_pages, 32 + 512, "480 zero-filled pages went to the zero page");
        touch(&mm, &mut cpu, B, 128 * K, true);
        assert_eq!(faults(&mm), 2, "the written pages take no fault");
        touch(&mm, &mut cpu, B, 4 << 20, true);
        assert_eq!(faults(&mm), 2 + 480);
        check(&mm);
        mm.munmap(&mut cpu, B, 4 << 20).unwrap();
        check(&mm);
    }

    /// MADV_POPULATE_WRITE faults pages in without storing into them: a
    /// split by MADV_FREE then finds them zero-filled and maps them to the
    /// zero page; a user write stores, and its page is kept.
    #[test]
    fn a_split_maps_pages_no_user_write_reached_to_the_zero_page() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 128 * K, hg()).unwrap();
        mm.madvise(&mut cpu, B, 128 * K, Advice::PopulateWrite).unwrap();
        mm.access(&mut cpu, B + 0x3000, true).unwrap();
        assert_eq!((faults(&mm), mm.stats().rss_pages), (2, 32));
        mm.madvise(&mut cpu, B + 0x8000, 0x10000, Advice::Free).unwrap();
        assert_eq!(mm.stats().rss_pages, 1);
        check(&mm);
        mm.access(&mut cpu, B + 0x3000, true).unwrap();
        mm.access(&mut cpu, B + 0x4000, true).unwrap();
        assert_eq!((faults(&mm), mm.stats().folio_orders[0]), (3, 1));
        // A folio on pages that held data before holds zeroes again
        // (folio_zero_user): freed and faulted anew, its unwritten pages go
        // to the zero page on a split too.
        let c = B + (4 << 20);
        mm.mmap(&mut cpu, c, 64 * K, hg()).unwrap();
        touch(&mm, &mut cpu, c, 64 * K, true);
        mm.munmap(&mut cpu, c, 64 * K).unwrap();
        mm.mmap(&mut cpu, c, 64 * K, hg()).unwrap();
        mm.access(&mut cpu, c, true).unwrap();
        let rss = mm.stats().rss_pages;
        mm.madvise(&mut cpu, c + 0x8000, 0x1000, Advice::Free).unwrap();
        assert_eq!(rss - mm.stats().rss_pages, 15);
        check(&mm);
    }

    /// The write that faults a large folio in stores into its own page,
    /// wherever that page lies in the folio: a split keeps that page (and
    /// the ones written after) and sends the rest to the zero page.
    #[test]
    fn a_split_keeps_the_page_the_faulting_write_stored_into() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 64 * K, hg()).unwrap();
        mm.access(&mut cpu, B + 0x5000, true).unwrap();
        mm.access(&mut cpu, B + 0x9000, true).unwrap();
        assert_eq!((faults(&mm), mm.stats().mthp[4].nr_anon), (1, 1));
        mm.madvise(&mut cpu, B + 0xf000, 0x1000, Advice::Free).unwrap();
        assert_eq!(mm.stats().rss_pages, 2, "pages 5 and 9 hold data, 14 went to the zero page");
        mm.access(&mut cpu, B + 0x5000, true).unwrap();
        mm.access(&mut cpu, B + 0x9000, true).unwrap();
        assert_eq!(faults(&mm), 1, "the written pages take no fault");
        check(&mm);
    }

    /// A PMD THP on frames a freed 64K folio used before: the 64K folio's
    /// written page kept its mark in its tail `struct page` when freed, so
    /// a new THP must zero-fill its tails (`folio_zero_user`): MADV_FREE of
    /// part of it then sends every page but the one written to the zero page.
    #[test]
    fn a_pmd_thp_on_reused_frames_holds_no_stale_written_page() {
        let mut c = crate::Config::default();
        for s in ["64kB=madvise", "2048kB=inherit"] {
            c.set_size_mode(s).unwrap();
        }
        // One PMD block of memory (and a page for the tables): the THP
        // gets the frames the 64K folio had.
        c.memory.phys_bytes = 4 << 20;
        let mm = crate::Mm::new(c).unwrap();
        let mut cpu = mm.cpu(0);
        mm.mmap(&mut cpu, B + 64 * K, 64 * K, hg()).unwrap();
        // The fault's store lands on tail page 5: its mark is in that
        // page's `struct page` (later stores go to the written bitmap,
        // which a free clears).
        mm.access(&mut cpu, B + 64 * K + 5 * 4 * K, true).unwrap();
        assert_eq!(mm.stats().mthp[4].nr_anon, 1);
        mm.munmap(&mut cpu, B + 64 * K, 64 * K).unwrap();
        mm.mmap(&mut cpu, B, 2 << 20, hg()).unwrap();
        mm.access(&mut cpu, B, true).unwrap();
        assert_eq!(mm.stats().mthp[9].nr_anon, 1);
        mm.madvise(&mut cpu, B + (1 << 20), 4 * K, Advice::Free).unwrap();
        assert_eq!(mm.stats().rss_pages, 1, "only page 0 was written");
        check(&mm);
    }

    /// A 64K folio one page of which mremap moved away is split by MADV_FREE
    /// of a page at either place: split_folio() finds the moved page by its
    /// index in the moved VMA (rmap), as the kernel's rmap walk does. Only
    /// the written page keeps its data; the moved page, never written, goes
    /// to the zero page with the rest.
    #[test]
    fn madv_free_splits_a_folio_part_of_which_mremap_moved() {
        for free_at in [B + 0x4000, B + (4 << 20)] {
            let (mm, mut cpu) = mm();
            mm.mmap(&mut cpu, B, 64 * K, hg()).unwrap();
            mm.access(&mut cpu, B + 0x1000, true).unwrap();
            mm.mremap(&mut cpu, B + 0xf000, 0x1000, B + (4 << 20), 0x1000).unwrap();
            assert_eq!((mm.stats().mthp[4].nr_anon, mm.stats().rss_pages), (1, 16));
            mm.madvise(&mut cpu, free_at, 0x1000, Advice::Free).unwrap();
            let m = mm.stats().mthp[4];
            assert_eq!((m.split, m.split_deferred, m.nr_anon), (1, 1, 0), "free at {free_at:#x}");
            assert_eq!(mm.stats().rss_pages, 1, "free at {free_at:#x}");
            check(&mm);
        }
    }

    /// MADV_FREE of zero-page PTEs changes nothing: 32 writes after are 32
    /// ordinary zero-page copies.
    #[test]
    fn madv_free_skips_the_zero_page() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 128 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 128 * K, false);
        mm.madvise(&mut cpu, B, 128 * K, Advice::Free).unwrap();
        touch(&mm, &mut cpu, B, 128 * K, true);
        assert_eq!((faults(&mm), mm.stats().folio_orders[0]), (64, 32));
    }

    /// MADV_DONTFORK on 16K in the middle of a faulted 192K VMA: 3 VMAs,
    /// the 64K folio under it not split; MADV_DOFORK merges back into 1.
    #[test]
    fn dontfork_splits_the_vma_not_the_folio_and_dofork_merges_it_back() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 192 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 192 * K, true);
        mm.madvise(&mut cpu, B + 0x14000, 0x4000, Advice::DontFork).unwrap();
        let v = mm.vmas();
        assert_eq!((v.len(), v[1].dontcopy, v[0].dontcopy), (3, true, false));
        let s = mm.stats();
        assert_eq!((s.mthp[4].split, s.mthp[4].split_deferred, s.mthp[4].nr_anon), (0, 0, 3));
        mm.madvise(&mut cpu, B + 0x14000, 0x4000, Advice::DoFork).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        check(&mm);
    }
}
