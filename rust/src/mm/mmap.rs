//! The system calls that map and unmap (`mm/mmap.c` `do_mmap`, `brk`,
//! `do_brk_flags`, `expand_downwards`; `mm/vma.c` `do_vmi_munmap`), on
//! private anonymous memory.

use crate::error::{Error, Result};
use crate::mm::vma::VmFlags;
use crate::mm::{Cpu, Mm, MmInner};
use crate::trace::{check_range, Advice, MmapFlags};
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// `stack_guard_gap`: 256 pages (1 MiB), the kernel's default, as measured
/// here: a stack does not grow closer than this to an accessible VMA below.
pub const STACK_GUARD_GAP: u64 = 256 << PAGE_SHIFT;

/// `rlimit(RLIMIT_STACK)`: this machine's default soft limit, 8 MiB, which
/// bounds the size a growsdown VMA may reach (`acct_stack_growth`).
pub const RLIMIT_STACK: u64 = 8 << 20;

/// `PAGE_ALIGN()`.
pub(crate) fn page_align(a: u64) -> u64 {
    a.next_multiple_of(PAGE_SIZE)
}

impl Mm {
    /// `mmap(addr, len, prot, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE | flags)`,
    /// then, as separate calls in this order, userfaultfd registration and
    /// `madvise(MADV_HUGEPAGE/NOHUGEPAGE)`. With `populate` (MAP_POPULATE)
    /// the mapping is populated inside the mmap call itself, before the
    /// advice can apply: so `mmap ... hugepage populate` faults with the
    /// flags of a fresh mapping, as a program calling mmap(MAP_POPULATE)
    /// then madvise(MADV_HUGEPAGE) gets.
    pub fn mmap(&self, cpu: &mut Cpu, addr: u64, len: u64, flags: MmapFlags) -> Result<()> {
        check_range(addr, len, 0)?;
        let cfg = &self.cfg;
        let orders = |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage);
        self.with_write_lock(cpu, |mm, t, _| {
            if let Some((start, end, floor, ceiling)) = t.mmap(addr, len, VmFlags::for_mmap(flags), orders)? {
                // MAP_FIXED over the reservation unmapped it first.
                mm.free_pgtables(start, end, floor, ceiling);
            }
            Ok(())
        })?;
        if flags.populate {
            self.mm_populate(cpu, addr, len);
        }
        if !(flags.uffd_wp || flags.hugepage || flags.nohugepage) {
            return Ok(());
        }
        self.with_write_lock(cpu, |_, t, _| {
            let end = addr + len;
            if flags.uffd_wp {
                t.vma_modify_flags(addr, end, orders, |f| f.uffd_wp = true);
            }
            if flags.hugepage {
                t.madvise_flags(addr, end, Advice::HugePage, orders);
            }
            if flags.nohugepage {
                t.madvise_flags(addr, end, Advice::NoHugePage, orders);
            }
            Ok(())
        })
    }

    /// `munmap()`: zaps the range, frees page tables no other VMA needs.
    pub fn munmap(&self, cpu: &mut Cpu, addr: u64, len: u64) -> Result<()> {
        check_range(addr, len, 0)?;
        self.with_write_lock(cpu, |mm, t, cpu| {
            mm.do_vmi_munmap(t, cpu, addr, addr + len, true);
            Ok(())
        })
    }

    /// `brk(addr)`. The first `brk` of a trace sets `mm->start_brk` (what
    /// exec leaves: a break and no heap VMA); each later one grows the heap
    /// with `do_brk_flags` or shrinks it by unmapping above the new
    /// (page-aligned) break. A break the kernel would refuse (below
    /// `start_brk`, growing into the next mapping, or shrinking over a
    /// range with no VMA left in it) is an error: the
    /// kernel's brk returns the old break and a trace that moves it there
    /// cannot be replayed.
    pub fn brk(&self, cpu: &mut Cpu, addr: u64) -> Result<()> {
        if addr >= crate::trace::TASK_SIZE {
            return Err(Error::InvalidRange(format!("brk {addr:#x} is outside user space")));
        }
        let cfg = &self.cfg;
        self.with_write_lock(cpu, |mm, t, cpu| {
            let Some(start_brk) = t.start_brk else {
                t.start_brk = Some(page_align(addr));
                t.brk = page_align(addr);
                return Ok(());
            };
            if addr < start_brk {
                return Err(Error::InvalidRange(format!(
                    "brk {addr:#x} is below the start of the heap {start_brk:#x}: the kernel refuses it"
                )));
            }
            let newbrk = page_align(addr);
            let oldbrk = page_align(t.brk);
            if addr <= t.brk {
                // Always allow shrinking brk.
                if newbrk < oldbrk {
                    // The VMA to cut is searched for in [newbrk, oldbrk)
                    // (`vma_find`); with none there (the heap was unmapped or
                    // moved away) brk fails and the break stays.
                    if t.find_vma(newbrk).is_none_or(|v| v.start >= oldbrk) {
                        return Err(Error::InvalidRange(format!(
                            "brk {addr:#x}: no mapping between it and the break {:#x}: the kernel refuses it",
                            t.brk
                        )));
                    }
                    mm.do_vmi_munmap(t, cpu, newbrk, oldbrk, true);
                }
                t.brk = addr;
                return Ok(());
            }
            if newbrk > oldbrk {
                // Check against existing mmap mappings (vm_start_gap of the next).
                if let Some(next) = t.find_vma(oldbrk) {
                    let gap = if next.flags.growsdown { STACK_GUARD_GAP } else { 0 };
                    if newbrk + PAGE_SIZE > next.start.saturating_sub(gap) {
                        return Err(Error::InvalidRange(format!(
                            "brk {addr:#x} would reach the mapping at {:#x}: the kernel refuses it",
                            next.start
                        )));
                    }
                }
                let orders = |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage);
                // do_brk_flags(): expand the last heap VMA if it ends at the
                // old break and has the same flags; the heap VMA is looked
                // for at or above start_brk only (`vma_prev_limit`), so a
                // VMA below the heap is never expanded by brk.
                let flags = VmFlags::rw();
                let brkvma = t.prev_vma(oldbrk).filter(|v| v.end > start_brk).cloned();
                match brkvma {
                    Some(v) if v.end == oldbrk && v.flags == flags && v.pgoff + v.pages() == oldbrk >> PAGE_SHIFT => {
                        t.resize_vma(v.start, v.start, newbrk)
                    }
                    _ => t.insert_vma(oldbrk, newbrk, flags, 0, oldbrk >> PAGE_SHIFT, orders(flags)),
                }
            }
            t.brk = addr;
            Ok(())
        })
    }

    /// Covers the unmapped parts of `[start, end)` with a PROT_NONE
    /// reservation, as the kernel oracle places a trace so that nothing else
    /// merges with it; its pieces bound `free_pgtables()` on munmap.
    pub fn reserve(&self, cpu: &mut Cpu, start: u64, end: u64) -> Result<()> {
        check_range(start, end.saturating_sub(start), 0)?;
        self.with_write_lock(cpu, |_, t, _| {
            t.reserve(start, end);
            Ok(())
        })
    }

    /// The stack-growth half of `lock_mm_and_find_vma()`: an access at
    /// `addr` below a VM_GROWSDOWN VMA, with no VMA at `addr`, takes the
    /// mmap lock for write and grows the stack down to the page of `addr`
    /// (`expand_stack_locked` -> `expand_downwards`). Returns whether it
    /// grew; a growth the kernel refuses (into the guard gap of an
    /// accessible VMA below, or beyond RLIMIT_STACK) is SIGSEGV.
    pub(crate) fn expand_stack(&self, cpu: &mut Cpu, addr: u64) -> Result<bool> {
        self.with_write_lock(cpu, |_, t, _| {
            let address = addr & !(PAGE_SIZE - 1);
            let Some(vma) = t.find_vma(addr).cloned() else { return Ok(false) };
            if vma.start <= addr || !vma.flags.growsdown {
                return Ok(false);
            }
            // Enforce stack_guard_gap.
            if let Some(prev) = t.prev_vma(vma.start) {
                if !prev.flags.growsdown && prev.flags.accessible() && address - prev.end < STACK_GUARD_GAP {
                    return Err(Error::SegvAccess { addr, what: "stack growth into the guard gap of the VMA below" });
                }
            }
            // acct_stack_growth().
            if vma.end - address > RLIMIT_STACK {
                return Err(Error::SegvAccess { addr, what: "stack growth beyond RLIMIT_STACK" });
            }
            t.resize_vma(vma.start, address, vma.end);
            Ok(true)
        })
    }
}

impl MmInner {
    /// `do_vmi_munmap()` of `[start, end)`: removes the VMAs (splitting at
    /// the ends), zaps their pages, frees page tables no neighbour needs.
    /// With `unlock` (munmap, brk), the mmap lock is downgraded to read
    /// once the VMAs are detached (`vms_complete_munmap_vmas`): in virtual
    /// time only, as the tree stays behind the write guard.
    pub(crate) fn do_vmi_munmap(
        &self,
        t: &mut crate::mm::vma::VmaTree,
        cpu: &mut Cpu,
        start: u64,
        end: u64,
        unlock: bool,
    ) {
        // vma_adjust_trans_huge() is done by zap_pmd_range for a partly
        // unmapped PMD.
        let (gone, extent) = t.munmap(start, end);
        if unlock {
            let (wlocked, nr) = t.take_write_locked();
            crate::drive::vtime::mmap_write_downgrade(&wlocked, nr);
        }
        for v in &gone {
            self.unmap_page_range(cpu, v.start, v.end, false);
        }
        if let Some((s, e)) = extent {
            self.free_pgtables(s, e, t.prev_end(s), t.next_start(e));
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::testing::*;
    use crate::trace::Prot;

    /// Findings 2: the first brk sets start_brk and maps nothing; a grow
    /// makes one rw+VM_ACCOUNT heap VMA to PAGE_ALIGN(brk); after
    /// MADV_HUGEPAGE on it a further grow is a second VMA (flags differ)
    /// whose faults are order 0; later grows expand that one.
    #[test]
    fn brk_makes_the_heap_and_a_grow_after_advice_is_a_new_vma() {
        let (mm, mut cpu) = mm();
        mm.brk(&mut cpu, B).unwrap();
        assert!(mm.vmas().is_empty(), "no heap VMA until the first grow");
        mm.brk(&mut cpu, B + (1 << 20) + 100).unwrap();
        let v = mm.vmas();
        assert_eq!((v.len(), v[0].start, v[0].end, v[0].account), (1, B, B + (1 << 20) + 0x1000, true));
        touch(&mm, &mut cpu, B, 64 * K, true);
        assert_eq!(faults(&mm), 16, "unadvised: order 0");
        mm.madvise(&mut cpu, B, (1 << 20) + 0x1000, crate::Advice::HugePage).unwrap();
        touch(&mm, &mut cpu, B + 256 * K, 256 * K, true);
        assert_eq!(mm.stats().mthp[4].anon_fault_alloc, 4);
        mm.brk(&mut cpu, B + (2 << 20)).unwrap();
        assert_eq!(mm.vmas().len(), 2);
        mm.brk(&mut cpu, B + (3 << 20)).unwrap();
        assert_eq!(mm.vmas().len(), 2, "a later grow expands the last heap VMA");
        let f = faults(&mm);
        touch(&mm, &mut cpu, B + (2 << 20) - 256 * K, 256 * K, true);
        assert_eq!(faults(&mm) - f, 64);
        check(&mm);
    }

    /// The heap never merges through brk with a VMA below start_brk, even
    /// with the same flags; an mmap right below the heap merges into it;
    /// one right above it merges too and then blocks brk growth.
    #[test]
    fn brk_never_merges_below_start_brk_but_an_mmap_merges_into_the_heap() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B - 64 * K, 64 * K, Default::default()).unwrap();
        mm.brk(&mut cpu, B).unwrap();
        mm.brk(&mut cpu, B + 64 * K).unwrap();
        assert_eq!(mm.vmas().len(), 2);
        let (mm, mut cpu) = crate::mm::testing::mm();
        mm.brk(&mut cpu, B).unwrap();
        mm.brk(&mut cpu, B + 64 * K).unwrap();
        mm.mmap(&mut cpu, B - 64 * K, 64 * K, Default::default()).unwrap();
        assert_eq!(mm.vmas().len(), 1, "the mmap path merges with the heap");
        mm.mmap(&mut cpu, B + 64 * K, 64 * K, Default::default()).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        assert!(mm.brk(&mut cpu, B + 68 * K).is_err(), "the range above the break is mapped");
        assert!(mm.brk(&mut cpu, B - 0x1000).is_err(), "below start_brk");
        // brk(start_brk) removes the heap; the VMA merged from below stays.
        mm.brk(&mut cpu, B).unwrap();
        let v = mm.vmas();
        assert_eq!((v[0].start, v[0].end), (B - 64 * K, B));
    }

    /// A shrinking brk with no VMA left between the new break and the old
    /// one (mremap moved the heap away) is refused, as the kernel's brk
    /// fails there; the break stays, so a brk back to it changes nothing
    /// and one lower, over a VMA mapped there since, cuts that VMA.
    #[test]
    fn brk_shrink_with_no_vma_below_the_break_is_refused() {
        let (mm, mut cpu) = mm();
        mm.brk(&mut cpu, B).unwrap();
        mm.brk(&mut cpu, B + 256 * K).unwrap();
        mm.mremap(&mut cpu, B, 256 * K, B + (4 << 20), 256 * K).unwrap();
        assert!(mm.brk(&mut cpu, B + 128 * K).is_err(), "no VMA in [newbrk, oldbrk)");
        mm.brk(&mut cpu, B + 256 * K).unwrap();
        mm.mmap(&mut cpu, B + 64 * K, 64 * K, Default::default()).unwrap();
        mm.brk(&mut cpu, B + 96 * K).unwrap();
        let v = mm.vmas();
        assert_eq!((v[0].start, v[0].end), (B + 64 * K, B + 96 * K));
    }

    /// Shrinking the break into a 64K folio keeps 4 of its pages: split
    /// deferred +1, partially mapped +1, the 3 whole folios above freed.
    #[test]
    fn brk_shrink_inside_a_folio_defers_its_split() {
        let (mm, mut cpu) = mm();
        mm.brk(&mut cpu, B).unwrap();
        mm.brk(&mut cpu, B + 256 * K).unwrap();
        mm.madvise(&mut cpu, B, 256 * K, crate::Advice::HugePage).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        mm.brk(&mut cpu, B + 0x3001).unwrap();
        let s = mm.stats();
        let m = &s.mthp[4];
        assert_eq!((m.split_deferred, m.nr_anon_partially_mapped, m.nr_anon, m.split), (1, 1, 1, 0));
        assert_eq!(s.rss_pages, 4);
        assert_eq!(mm.vmas()[0].end, B + 0x4000);
        mm.access(&mut cpu, B + 0x3fff, true).unwrap();
        assert!(mm.access(&mut cpu, B + 0x4000, true).is_err());
        assert_eq!(faults(&mm), 4);
        check(&mm);
    }

    /// Findings 7: a growsdown VMA grows to exactly the faulting page (one
    /// fault); page-by-page downward growth is all order 0; a jump to a
    /// 64K-aligned address gets a 64K folio, a 2M-aligned one a PMD THP;
    /// 1 MiB guard gap above an accessible VMA, none above PROT_NONE; no
    /// growth beyond RLIMIT_STACK.
    #[test]
    fn a_stack_grows_to_the_faulting_page_within_its_guard_gap_and_rlimit() {
        let (mm, mut cpu) = mm();
        let top = B + (64 << 20);
        let gd = crate::trace::MmapFlags { growsdown: true, hugepage: true, ..Default::default() };
        mm.mmap(&mut cpu, top - 64 * K, 64 * K, gd).unwrap();
        assert!(mm.vmas()[0].growsdown);
        for i in 1..=32 {
            mm.access(&mut cpu, top - 64 * K - i * 0x1000, true).unwrap();
        }
        assert_eq!((faults(&mm), mm.stats().folio_orders[0]), (32, 32));
        assert_eq!(mm.vmas()[0].start, top - 64 * K - 32 * 0x1000);
        let a = top - (1 << 20) - 64 * K;
        mm.access(&mut cpu, a, true).unwrap();
        assert_eq!(mm.stats().mthp[4].anon_fault_alloc, 1, "window [addr, addr+64K) starts at vm_start");
        let p = top - (6 << 20);
        mm.access(&mut cpu, p, true).unwrap();
        assert_eq!(mm.stats().mthp[9].anon_fault_alloc, 1);
        let f = faults(&mm);
        assert!(is_segv(mm.access(&mut cpu, top - (8 << 20) - 0x5000, true)), "beyond RLIMIT_STACK");
        mm.access(&mut cpu, top - (8 << 20), true).unwrap();
        assert_eq!(faults(&mm), f + 1);
        // Guard gap.
        let (mm, mut cpu) = crate::mm::testing::mm();
        mm.mmap(&mut cpu, B, 64 * K, Default::default()).unwrap();
        let s = B + 64 * K + (2 << 20);
        mm.mmap(&mut cpu, s, 64 * K, gd).unwrap();
        assert!(is_segv(mm.access(&mut cpu, B + 64 * K + 1020 * K, true)));
        assert_eq!(faults(&mm), 0, "a refused growth counts no fault");
        mm.access(&mut cpu, B + 64 * K + 1024 * K, true).unwrap();
        let (mm, mut cpu) = crate::mm::testing::mm();
        mm.mmap(&mut cpu, B, 64 * K, prot(Prot::None)).unwrap();
        mm.mmap(&mut cpu, B + 128 * K, 64 * K, gd).unwrap();
        mm.access(&mut cpu, B + 64 * K, false).unwrap();
        assert_eq!(mm.vmas()[1].start, B + 64 * K, "no gap above a PROT_NONE VMA");
        check(&mm);
    }

    /// MAP_STACK is VM_NOHUGEPAGE: with 64kB at `always` an unadvised
    /// stack mapping faults order 0; MADV_HUGEPAGE clears it (64K folios).
    #[test]
    fn map_stack_is_nohugepage_until_advised() {
        let mut c = crate::Config::default();
        c.set_size_mode("64kB=always").unwrap();
        c.memory.phys_bytes = 64 << 20;
        let mm = crate::Mm::new(c).unwrap();
        let mut cpu = mm.cpu(0);
        let st = crate::trace::MmapFlags { stack: true, ..Default::default() };
        mm.mmap(&mut cpu, B, 256 * K, st).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        assert_eq!(faults(&mm), 64);
        let st = crate::trace::MmapFlags { stack: true, hugepage: true, ..Default::default() };
        mm.mmap(&mut cpu, B + (2 << 20), 256 * K, st).unwrap();
        touch(&mm, &mut cpu, B + (2 << 20), 256 * K, true);
        assert_eq!((faults(&mm), mm.stats().mthp[4].anon_fault_alloc), (68, 4));
    }

    /// MAP_POPULATE faults inside mmap, before the trace's `hugepage`
    /// advice: 256K populate = 64 order-0 faults; read-only = 64 zero pages.
    #[test]
    fn map_populate_faults_before_the_advice_applies() {
        let (mm, mut cpu) = mm();
        let f = crate::trace::MmapFlags { populate: true, hugepage: true, ..Default::default() };
        mm.mmap(&mut cpu, B, 256 * K, f).unwrap();
        let s = mm.stats();
        assert_eq!((s.faults(), s.folio_orders[0], s.mthp[4].anon_fault_alloc, s.rss_pages), (64, 64, 0, 64));
        assert!(mm.vmas()[0].hugepage);
        let r = crate::trace::MmapFlags { populate: true, prot: Prot::Read, ..Default::default() };
        mm.mmap(&mut cpu, B + (4 << 20), 256 * K, r).unwrap();
        assert_eq!((faults(&mm), mm.stats().rss_pages), (128, 64));
        check(&mm);
    }
}
