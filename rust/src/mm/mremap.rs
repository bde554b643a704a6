//! `mm/mremap.c`: resizing in place (`vma_expand` / shrinking by
//! unmapping the tail) and moving (`move_vma` -> `copy_vma` +
//! `move_page_tables` -> `move_huge_pmd` / `move_normal_pmd` /
//! `move_ptes`). Moved pages keep their folios and are not faulted again.

use crate::error::{Error, Result};
use crate::mm::pgtable::*;
use crate::mm::vma::VmaTree;
use crate::mm::{Cpu, Mm, MmInner};
use crate::trace::check_range;
use crate::{PAGE_SHIFT, PAGE_SIZE, PMD_SIZE};
use std::sync::atomic::Ordering::*;

fn efault(what: String) -> Error {
    Error::InvalidRange(format!("mremap: {what} (EFAULT)"))
}

impl Mm {
    /// What the kernel's `mremap` did, as a trace line records it: the
    /// mapping at `old_addr` of `old_len` bytes now lies at `new_addr` with
    /// `new_len` bytes. Equal addresses resize in place; others move
    /// (`MREMAP_MAYMOVE|MREMAP_FIXED`: whatever was mapped at the target is
    /// unmapped first). A same-size move may span several VMAs and holes
    /// (6.17+: each VMA moves to its offset); a resize must lie in one VMA.
    /// Ranges the kernel refuses are errors.
    pub fn mremap(&self, cpu: &mut Cpu, old_addr: u64, old_len: u64, new_addr: u64, new_len: u64) -> Result<()> {
        check_range(old_addr, old_len, 0)?;
        check_range(new_addr, new_len, 0)?;
        self.with_write_lock(cpu, |mm, t, cpu| {
            let old_end = old_addr + old_len;
            let Some(vma) = t.lookup(old_addr).cloned() else {
                return Err(efault(format!("nothing is mapped at {old_addr:#x}")));
            };
            if new_addr == old_addr {
                return mm.mremap_in_place(t, cpu, old_addr, old_len, new_len, vma.start, vma.end);
            }
            if new_addr < old_end && old_addr < new_addr + new_len {
                return Err(Error::InvalidRange(format!(
                    "mremap: the new range {new_addr:#x}+{new_len:#x} overlaps the old one (EINVAL)"
                )));
            }
            if old_len == new_len {
                // remap_move(): each VMA of the range moves in turn. One
                // armed by userfaultfd may not be part of a batch
                // (vma_multi_allowed): EFAULT when it is not the first, or
                // is the first and more follow; what moved before stays
                // moved. The trace's holes split the call, as the kernel
                // oracle gives such a move to each mapped run on its own
                // (its holes are reservation VMAs that must stay).
                let pieces = t.pieces(old_addr, old_end);
                for (i, &(s, e)) in pieces.iter().enumerate() {
                    let first = i == 0 || pieces[i - 1].1 != s;
                    let more = pieces.get(i + 1).is_some_and(|n| n.0 == e);
                    let v = t.lookup(s).expect("a piece is mapped");
                    if v.flags.uffd_wp && (!first || more) {
                        return Err(efault(format!(
                            "the userfaultfd-armed VMA at {:#x} cannot move with others",
                            v.start
                        )));
                    }
                    mm.move_vma(t, cpu, s, e, new_addr + (s - old_addr), e - s);
                }
                return Ok(());
            }
            // check_prep_vma(): a shrink may cross VMA boundaries in the
            // part it unmaps; only what moves must lie in one VMA.
            if old_addr + old_len.min(new_len) > vma.end {
                return Err(efault(format!("{old_addr:#x}+{old_len:#x} is not one mapping")));
            }
            if new_len < old_len {
                // The tail is unmapped first, then the rest moves.
                mm.do_vmi_munmap(t, cpu, old_addr + new_len, old_end, false);
                mm.move_vma(t, cpu, old_addr, old_addr + new_len, new_addr, new_len);
            } else {
                mm.move_vma(t, cpu, old_addr, old_end, new_addr, new_len);
            }
            Ok(())
        })
    }
}

impl MmInner {
    /// A resize in place of `[addr, addr+old_len)`, which starts in the VMA
    /// `[vstart, vend)`. Shrinking unmaps the tail (across VMAs too);
    /// growing needs the old range to end the VMA and the space after it to
    /// be free (`vma_expandable`), then `vma_expand` lengthens it and it may
    /// merge with the VMA that follows.
    #[allow(clippy::too_many_arguments)]
    fn mremap_in_place(
        &self,
        t: &mut VmaTree,
        cpu: &mut Cpu,
        addr: u64,
        old_len: u64,
        new_len: u64,
        vstart: u64,
        vend: u64,
    ) -> Result<()> {
        let (old_end, new_end) = (addr + old_len, addr + new_len);
        if new_len <= old_len {
            if new_len < old_len {
                self.do_vmi_munmap(t, cpu, new_end, old_end, false);
            }
            return Ok(());
        }
        if old_end > vend {
            return Err(efault(format!("{addr:#x}+{old_len:#x} is not one mapping")));
        }
        if old_end != vend {
            return Err(Error::InvalidRange(format!(
                "mremap: cannot grow {addr:#x}+{old_len:#x} in place: its VMA goes on to {vend:#x} (ENOMEM)"
            )));
        }
        if let Some(next) = t.find_vma(old_end).filter(|n| n.start < new_end) {
            return Err(Error::InvalidRange(format!(
                "mremap: cannot grow {addr:#x}+{old_len:#x} in place: {:#x} is mapped (ENOMEM)",
                next.start.max(old_end)
            )));
        }
        // The PROT_NONE reservation the trace is placed in is not one of
        // the program's mappings: it gives way, as for an mmap.
        t.resize_vma(vstart, vstart, new_end);
        t.merge_at(vstart, new_end);
        Ok(())
    }

    /// `move_vma()` of `[s, e)` (inside one VMA) to `new_addr`, the new VMA
    /// being `new_len >= e - s` bytes long (a move that also grows).
    fn move_vma(&self, t: &mut VmaTree, cpu: &mut Cpu, s: u64, e: u64, new_addr: u64, new_len: u64) {
        // MREMAP_FIXED: the target is unmapped first.
        self.do_vmi_munmap(t, cpu, new_addr, new_addr + new_len, false);
        // The moved part is split off its VMA (a PMD mapping cut there is
        // split first).
        self.vma_adjust_trans_huge(t, cpu, s, e);
        let orig = t.lookup(s).cloned().expect("the moved range is mapped");
        t.split_vma(s);
        t.split_vma(e);
        let (gone, extent) = t.munmap(s, e);
        let v = gone.first().expect("the moved range is mapped").clone();
        debug_assert!(gone.len() == 1 && v.start == s && v.end == e);
        // copy_vma(): a VMA that has pages keeps vm_pgoff (its pages'
        // index), so it merges only where that stays contiguous; one
        // without gets the new address's, and merges like a new mmap.
        let pgoff = if v.anon_vma() == 0 { new_addr >> PAGE_SHIFT } else { v.pgoff };
        self.move_page_tables(cpu, s, new_addr, e - s);
        t.insert_and_merge(new_addr, new_addr + new_len, v.flags, v.anon_vma(), pgoff, v.orders);
        // mremap_userfaultfd_prep(): a userfaultfd without
        // UFFD_FEATURE_EVENT_REMAP (the kernel oracle's asks for no
        // features) is dropped from the new VMA once the move is done, so
        // its faults get large folios again.
        if v.flags.uffd_wp {
            t.userfaultfd_reset_ctx(new_addr);
            // copy_vma() runs before the source range is unmapped: an
            // unfaulted source VMA the new range touches, its page offsets
            // continuing, is merged into the new VMA ("vma_merge with
            // self"), so the reset covers what is left of it too.
            let with_self = orig.anon_vma() == 0
                && ((orig.end == new_addr && orig.pgoff + orig.pages() == new_addr >> PAGE_SHIFT)
                    || (orig.start == new_addr + new_len && (new_addr + new_len) >> PAGE_SHIFT == orig.pgoff));
            if with_self {
                if orig.start < s {
                    t.userfaultfd_reset_ctx(orig.start);
                }
                if e < orig.end {
                    t.userfaultfd_reset_ctx(e);
                }
            }
        }
        // The old range's page tables go as an munmap's would.
        if let Some((a, b)) = extent {
            self.free_pgtables(a, b, t.prev_end(a), t.next_start(b));
        }
    }

    /// `move_page_tables()`: moves the entries of `[old, old+len)` to
    /// `new`, one PMD extent at a time. A PMD-mapped THP whose extent is a
    /// whole PMD on both sides moves as is (`move_huge_pmd`); otherwise its
    /// PMD is split and its PTEs move (the folio stays whole, now
    /// PTE-mapped). A PTE table moves whole when both sides are PMD-aligned
    /// over the extent (`move_normal_pmd`), else PTE by PTE (`move_ptes`),
    /// folios untouched (a large folio may end up virtually misaligned).
    fn move_page_tables(&self, cpu: &mut Cpu, old: u64, new: u64, len: u64) {
        let mut off = 0;
        while off < len {
            let (o, n) = (old + off, new + off);
            let extent = (PMD_SIZE - o % PMD_SIZE).min(PMD_SIZE - n % PMD_SIZE).min(len - off);
            off += extent;
            let Some(src) = self.pt.pmd_offset(o) else { continue };
            let v = src.load(Acquire);
            if v == 0 {
                continue;
            }
            if extent == PMD_SIZE {
                // move_huge_pmd() / move_normal_pmd(): the destination PMD
                // must be none.
                let dst = self.pt.pmd_alloc(n, &cpu.pc.page_table_lock);
                if dst.load(Acquire) == 0 {
                    let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
                    dst.store(v, Release);
                    src.store(0, Release);
                    continue;
                }
            }
            if pmd_huge(v) {
                self.split_huge_pmd(cpu, src);
            }
            let v = src.load(Acquire);
            // SAFETY: a table PMD of this mm; the caller holds the mmap
            // lock for write, so only this thread frees tables.
            let st = unsafe { PageTable::pte_table(v) };
            let dst = self.pt.pmd_alloc(n, &cpu.pc.page_table_lock);
            if dst.load(Acquire) == 0 {
                // move_ptes() allocates the target table as a fault would;
                // the charge cannot fail the move here (the kernel would
                // return ENOMEM; the model charges it over the limit).
                let (table, _) = self.pt.pte_alloc(dst, &cpu.pc.page_table_lock);
                debug_assert!(table, "the move target was unmapped: no huge PMD there");
                self.memcg.force_charge(1);
            }
            // SAFETY: as above; `pte_alloc` left a table in `dst`.
            let dt = unsafe { PageTable::pte_table(dst.load(Acquire)) };
            let _g = st.ptl.lock(&cpu.pc.ptl);
            let _g2 = (!std::ptr::eq(st, dt)).then(|| dt.ptl.lock(&cpu.pc.ptl));
            let (i, j) = (pte_index(o), pte_index(n));
            for k in 0..(extent / PAGE_SIZE) as usize {
                let pte = st.ptep_get_and_clear(i + k);
                if pte != 0 {
                    dt.ptes[j + k].store(pte, Release);
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::testing::*;

    fn folios_of_64k(mm: &crate::Mm) -> u64 {
        mm.stats().mthp[4].nr_anon
    }

    /// Findings 4: 256K of 64K folios moved (aligned or 4K past) take 0
    /// faults afterwards and stay large; growing the misaligned one in
    /// place by 60K and writing the 15 new pages: 6 faults, 3 16K folios.
    #[test]
    fn a_moved_range_keeps_its_folios_and_is_not_faulted_again() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 256 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        let n = B + (8 << 20);
        mm.mremap(&mut cpu, B, 256 * K, n, 256 * K).unwrap();
        touch(&mm, &mut cpu, n, 256 * K, true);
        assert_eq!((faults(&mm), folios_of_64k(&mm)), (4, 4));
        assert!(mm.access(&mut cpu, B, true).is_err(), "the old place is empty");
        let m = B + (16 << 20) + 0x1000;
        mm.mremap(&mut cpu, n, 256 * K, m, 256 * K).unwrap();
        touch(&mm, &mut cpu, m, 256 * K, true);
        let s = mm.stats();
        assert_eq!((s.faults(), s.mthp[4].nr_anon, s.mthp[4].split, s.mthp[4].split_deferred), (4, 4, 0, 0));
        assert!(mm.vmas()[0].hugepage);
        check(&mm);
        mm.mremap(&mut cpu, m, 256 * K, m, 256 * K + 60 * K).unwrap();
        touch(&mm, &mut cpu, m + 256 * K, 60 * K, true);
        let s = mm.stats();
        assert_eq!((s.faults(), s.mthp[2].anon_fault_alloc, s.folio_orders[0]), (10, 3, 3));
        check(&mm);
    }

    /// A userfaultfd-WP VMA moved by mremap leaves its userfaultfd (no
    /// UFFD_FEATURE_EVENT_REMAP): its faults get 64K folios again. One
    /// grown in place stays registered: order 0.
    #[test]
    fn a_moved_uffd_wp_vma_is_no_longer_armed() {
        let (mm, mut cpu) = mm();
        let uffd = crate::trace::MmapFlags { uffd_wp: true, ..hg() };
        mm.mmap(&mut cpu, B, 64 * K, uffd).unwrap();
        mm.mremap(&mut cpu, B, 64 * K, B, 128 * K).unwrap();
        touch(&mm, &mut cpu, B + 64 * K, 16 * K, true);
        assert_eq!((faults(&mm), folios_of_64k(&mm)), (4, 0), "grown in place: still armed");
        let n = B + (4 << 20);
        mm.mremap(&mut cpu, B, 128 * K, n, 256 * K).unwrap();
        assert!(!mm.vmas()[0].uffd_wp);
        touch(&mm, &mut cpu, n + 128 * K, 64 * K, true);
        assert_eq!((faults(&mm), folios_of_64k(&mm)), (5, 1));
        check(&mm);
    }

    /// An unfaulted uffd-wp VMA whose middle moves to just below it: the
    /// kernel's copy_vma() merges the new range with the source VMA
    /// itself, so the userfaultfd goes from both pieces left of it.
    #[test]
    fn a_move_that_merges_with_its_own_vma_disarms_all_of_it() {
        let (mm, mut cpu) = mm();
        let uffd = crate::trace::MmapFlags { uffd_wp: true, ..hg() };
        mm.mmap(&mut cpu, B + (1 << 20), 1 << 20, uffd).unwrap();
        mm.mremap(&mut cpu, B + (1 << 20) + 256 * K, 64 * K, B + (1 << 20) - 64 * K, 64 * K).unwrap();
        assert!(mm.vmas().iter().all(|v| !v.uffd_wp));
        touch(&mm, &mut cpu, B + (1 << 20) + 128 * K, 64 * K, true);
        touch(&mm, &mut cpu, B + (1 << 20) + 384 * K, 64 * K, true);
        assert_eq!((faults(&mm), folios_of_64k(&mm)), (2, 2));
        check(&mm);
    }

    /// A PMD THP moved 2M-aligned stays PMD-mapped; moved 4K past a 2M
    /// boundary its PMD is split (thp_split_pmd +1), the folio stays whole.
    #[test]
    fn a_pmd_thp_moves_whole_when_aligned_and_is_pte_mapped_when_not() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 2 << 20, hg()).unwrap();
        mm.access(&mut cpu, B, true).unwrap();
        mm.mremap(&mut cpu, B, 2 << 20, B + (4 << 20), 2 << 20).unwrap();
        touch(&mm, &mut cpu, B + (4 << 20), 2 << 20, true);
        assert_eq!((faults(&mm), mm.stats().vm.thp_split_pmd), (1, 0));
        mm.mremap(&mut cpu, B + (4 << 20), 2 << 20, B + (8 << 20) + 0x1000, 2 << 20).unwrap();
        touch(&mm, &mut cpu, B + (8 << 20) + 0x1000, 2 << 20, true);
        let s = mm.stats();
        assert_eq!((s.faults(), s.vm.thp_split_pmd, s.mthp[9].nr_anon, s.mthp[9].split), (1, 1, 1, 0));
        check(&mm);
    }

    /// Shrinking 256K of 64K folios to 0x13000 in place: split_deferred +1,
    /// partially mapped +1, 2 folios freed; a PMD THP shrunk to 1M+4K:
    /// thp_split_pmd +1, split deferred, the folio stays order 9.
    #[test]
    fn a_shrink_that_cuts_a_large_folio_defers_its_split() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 256 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        mm.mremap(&mut cpu, B, 256 * K, B, 0x13000).unwrap();
        let m = mm.stats().mthp[4];
        assert_eq!((m.split_deferred, m.nr_anon_partially_mapped, m.nr_anon), (1, 1, 2));
        let h = B + (4 << 20);
        mm.mmap(&mut cpu, h, 2 << 20, hg()).unwrap();
        mm.access(&mut cpu, h, true).unwrap();
        mm.mremap(&mut cpu, h, 2 << 20, h, (1 << 20) + 0x1000).unwrap();
        let s = mm.stats();
        assert_eq!((s.vm.thp_split_pmd, s.mthp[9].split_deferred, s.vm.thp_deferred_split_page), (1, 1, 1));
        assert_eq!((s.mthp[9].nr_anon, s.rss_pages), (1, 19 + 257));
        check(&mm);
    }

    /// MREMAP_FIXED onto the middle of a populated 128K VMA of 64K folios:
    /// the target is unmapped first, cutting two folios (split_deferred +2,
    /// partially mapped +2); 3 VMAs there, no merge.
    #[test]
    fn a_move_onto_a_populated_mapping_unmaps_the_target_first() {
        let (mm, mut cpu) = mm();
        let d = B + (4 << 20);
        mm.mmap(&mut cpu, d, 128 * K, hg()).unwrap();
        touch(&mm, &mut cpu, d, 128 * K, true);
        mm.mmap(&mut cpu, B, 64 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 64 * K, true);
        mm.mremap(&mut cpu, B, 64 * K, d + 32 * K, 64 * K).unwrap();
        let m = mm.stats().mthp[4];
        assert_eq!((m.split_deferred, m.nr_anon_partially_mapped, m.nr_anon), (2, 2, 3));
        assert_eq!(mm.vmas().len(), 3);
        assert_eq!(mm.stats().rss_pages, 32);
        check(&mm);
    }

    /// Merging of moved VMAs: the upper part moved away and back merges
    /// again; a faulted VMA moved next to an unfaulted one does not (its
    /// vm_pgoff is kept); an unfaulted one moved there does.
    #[test]
    fn a_moved_vma_merges_only_where_its_page_offsets_continue() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 256 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        let far = B + (8 << 20);
        mm.mremap(&mut cpu, B + 0x18000, 0x28000, far, 0x28000).unwrap();
        assert_eq!(mm.stats().mthp[4].split_deferred, 0, "every page is still mapped");
        assert_eq!(mm.vmas().len(), 2);
        mm.mremap(&mut cpu, far, 0x28000, B + 0x18000, 0x28000).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        check(&mm);
        // Faulted next to unfaulted: 2; unfaulted next to faulted: 1.
        let d = B + (16 << 20);
        mm.mmap(&mut cpu, d, 64 * K, hg()).unwrap();
        mm.mremap(&mut cpu, B, 64 * K, d + 64 * K, 64 * K).unwrap();
        assert_eq!(mm.vmas().iter().filter(|v| v.start >= d).count(), 2);
        // An unfaulted VMA moved right after a faulted (not moved) one.
        let f = B + (32 << 20);
        mm.mmap(&mut cpu, f, 64 * K, hg()).unwrap();
        mm.access(&mut cpu, f, true).unwrap();
        let e = B + (24 << 20);
        mm.mmap(&mut cpu, e, 64 * K, hg()).unwrap();
        mm.mremap(&mut cpu, e, 64 * K, f + 64 * K, 64 * K).unwrap();
        assert_eq!(mm.vmas().iter().filter(|v| v.start >= f).count(), 1, "the unfaulted one merged");
    }

    /// Ranges the kernel refuses: a resize spanning two VMAs, an old range
    /// starting in a hole, a new range overlapping the old, a grow in place
    /// into a mapping. A same-size move of two VMAs succeeds.
    #[test]
    fn mremap_of_what_is_not_one_mapping_is_refused() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 64 * K, Default::default()).unwrap();
        mm.mmap(&mut cpu, B + 64 * K, 64 * K, crate::mm::testing::prot(crate::trace::Prot::Read)).unwrap();
        let n = B + (4 << 20);
        assert!(mm.mremap(&mut cpu, B, 128 * K, n, 256 * K).is_err());
        assert!(mm.mremap(&mut cpu, B + 128 * K, 4 * K, n, 4 * K).is_err());
        assert!(mm.mremap(&mut cpu, B, 64 * K, B + 32 * K, 64 * K).is_err());
        assert!(mm.mremap(&mut cpu, B, 64 * K, B, 128 * K).is_err());
        mm.mremap(&mut cpu, B, 128 * K, n, 128 * K).unwrap();
        let v = mm.vmas();
        assert_eq!((v.len(), v[0].start, v[1].prot), (2, n, crate::trace::Prot::Read));
    }

    /// A move that shrinks may unmap across VMA boundaries and holes: only
    /// the part kept must lie in one VMA (check_prep_vma). The moved 16K
    /// keeps its data; the tail, the hole and the next VMA's head are gone.
    #[test]
    fn a_shrinking_move_may_unmap_across_vmas_and_holes() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 64 * K, hg()).unwrap();
        mm.mmap(&mut cpu, B + 128 * K, 64 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 64 * K, true);
        touch(&mm, &mut cpu, B + 128 * K, 64 * K, true);
        let n = B + (4 << 20);
        assert!(mm.mremap(&mut cpu, B + 32 * K, 128 * K, n, 64 * K).is_err(), "the kept part crosses");
        mm.mremap(&mut cpu, B + 32 * K, 128 * K, n, 16 * K).unwrap();
        let v: Vec<_> = mm.vmas().iter().map(|v| (v.start, v.end)).collect();
        assert_eq!(v, [(B, B + 32 * K), (B + 160 * K, B + 192 * K), (n, n + 16 * K)]);
        touch(&mm, &mut cpu, n, 16 * K, true);
        assert_eq!((faults(&mm), mm.stats().rss_pages), (2, 20));
        check(&mm);
    }

    /// A same-size move of a run of VMAs one of which is armed by
    /// userfaultfd is EFAULT (vma_multi_allowed), the VMAs before it moved
    /// already; alone in its run (the trace's holes split the move) it moves.
    #[test]
    fn a_uffd_wp_vma_does_not_move_with_others() {
        let (mm, mut cpu) = mm();
        let uffd = crate::trace::MmapFlags { uffd_wp: true, ..Default::default() };
        mm.mmap(&mut cpu, B, 64 * K, Default::default()).unwrap();
        mm.mmap(&mut cpu, B + 64 * K, 64 * K, uffd).unwrap();
        let n = B + (4 << 20);
        assert!(mm.mremap(&mut cpu, B, 128 * K, n, 128 * K).is_err());
        let v: Vec<_> = mm.vmas().iter().map(|v| (v.start, v.uffd_wp)).collect();
        assert_eq!(v, [(B + 64 * K, true), (n, false)], "the first VMA moved before the EFAULT");
        mm.mmap(&mut cpu, B + 192 * K, 64 * K, Default::default()).unwrap();
        mm.mremap(&mut cpu, B + 64 * K, 192 * K, n + 64 * K, 192 * K).unwrap();
        let v: Vec<_> = mm.vmas().iter().map(|v| v.start).collect();
        // The moved uffd VMA lost its userfaultfd after copy_vma merged
        // nothing (flags differed then), and the reset merges nothing.
        assert_eq!(v, [n, n + 64 * K, n + 192 * K], "a hole apart, each moves on its own");
    }
}
