//! `mm/mprotect.c`: `do_mprotect_pkey` -> `mprotect_fixup` (VMA split and
//! merge by `vma_modify_flags`) -> `change_protection` ->
//! `change_pmd_range` -> `change_huge_pmd` / `change_pte_range`.

use crate::error::{Error, Result};
use crate::mm::huge_memory::align_down;
use crate::mm::pgtable::*;
use crate::mm::vma::{VmFlags, Vma, VmaTree};
use crate::mm::{Cpu, Mm, MmInner};
use crate::trace::{check_range, Prot};
use crate::{PAGE_SIZE, PMD_SIZE};
use std::sync::atomic::Ordering::*;

impl Mm {
    /// `mprotect(addr, len, prot)`. VMA by VMA from `addr`: a range that
    /// starts outside every VMA changes nothing, and one with a hole is
    /// changed up to the hole; both are the kernel's ENOMEM, so an error
    /// (a trace line the kernel refused cannot be replayed past).
    pub fn mprotect(&self, cpu: &mut Cpu, addr: u64, len: u64, prot: Prot) -> Result<()> {
        check_range(addr, len, 0)?;
        let end = addr + len;
        self.with_write_lock(cpu, |mm, t, cpu| {
            let mut a = addr;
            while a < end {
                let Some(v) = t.lookup(a).cloned() else {
                    return Err(Error::InvalidRange(if a == addr {
                        format!("mprotect {addr:#x}+{len:#x}: not mapped (ENOMEM)")
                    } else {
                        format!(
                            "mprotect {addr:#x}+{len:#x}: nothing is mapped at {a:#x} (ENOMEM; what lies before it was changed)"
                        )
                    }));
                };
                let e = v.end.min(end);
                mm.mprotect_fixup(t, cpu, &v, a, e, prot);
                a = e;
            }
            Ok(())
        })
    }
}

impl MmInner {
    /// `mprotect_fixup()` of `[start, end)` inside `vma`.
    fn mprotect_fixup(&self, t: &mut VmaTree, cpu: &mut Cpu, vma: &Vma, start: u64, end: u64, prot: Prot) {
        let old = vma.flags;
        let mut new = VmFlags { read: prot.readable(), write: prot.writable(), ..old };
        // A private mapping that becomes writable is charged to the commit
        // limit and gets VM_ACCOUNT, unless MAP_NORESERVE said not to; a
        // mapping made read-only keeps it.
        if new.write && !(old.account || old.write || old.noreserve) {
            new.account = true;
        }
        if new == old {
            return;
        }
        self.vma_adjust_trans_huge(t, cpu, start, end);
        let cfg = &self.cfg;
        t.vma_modify_flags(
            start,
            end,
            |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage),
            |f| {
                f.read = new.read;
                f.write = new.write;
                f.account = new.account;
            },
        );
        self.change_protection(cpu, start, end, new);
    }

    /// `change_protection()` over `[start, end)` to the protection of
    /// `flags`. Making a private VMA writable is done with
    /// MM_CP_TRY_CHANGE_WRITABLE (`vma_wants_manual_pte_write_upgrade`):
    /// every page of an exclusive anonymous folio (all of them here: no
    /// fork) becomes writable at once (`can_change_pte_writable`,
    /// `can_change_pmd_writable`), so writing it again takes no fault; the
    /// zero page stays read-only. PROT_NONE keeps pages mapped but not
    /// present to the MMU. The caller has split any PMD mapping the range
    /// cuts (`vma_adjust_trans_huge`).
    pub(crate) fn change_protection(&self, cpu: &mut Cpu, start: u64, end: u64, flags: VmFlags) {
        let mut a = start;
        while a < end {
            let next = (align_down(a, PMD_SIZE) + PMD_SIZE).min(end);
            if let Some(pmd) = self.pt.pmd_offset(a) {
                let v = pmd.load(Acquire);
                if v != 0 && pmd_huge(v) {
                    // change_huge_pmd(): the VMA split left no huge PMD
                    // that the range cuts.
                    debug_assert_eq!(next - a, PMD_SIZE, "vma_adjust_trans_huge split it");
                    {
                        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
                        let bits = if !flags.accessible() {
                            PMD_PROTNONE
                        } else if !flags.write {
                            PMD_RDONLY
                        } else {
                            0
                        };
                        pmd.store((v & !PMD_PROT_MASK) | bits, Release);
                    }
                }
                let v = pmd.load(Acquire);
                if v != 0 && !pmd_huge(v) {
                    // SAFETY: a table PMD of this mm; the caller holds the
                    // mmap lock for write, so only this thread frees tables.
                    let t = unsafe { PageTable::pte_table(v) };
                    self.change_pte_range(cpu, t, pte_index(a), pte_index(next - PAGE_SIZE) + 1, flags);
                }
            }
            a = next;
        }
    }

    /// `change_pte_range()` over `ptes[from..to)`.
    fn change_pte_range(&self, cpu: &mut Cpu, t: &PteTable, from: usize, to: usize, flags: VmFlags) {
        let _g = t.ptl.lock(&cpu.pc.ptl);
        for e in &t.ptes[from..to] {
            let pte = e.load(Relaxed);
            if pte_none(pte) {
                continue;
            }
            let bits = if !flags.accessible() {
                PTE_PROTNONE
            } else if flags.write && pte & PTE_ZERO == 0 {
                PTE_PRESENT | PTE_WRITE
            } else {
                PTE_PRESENT
            };
            e.store((pte & !PTE_PROT_MASK) | bits, Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::testing::*;
    use crate::trace::Prot;

    /// Findings 1: 1 MiB of 64K folios, mprotect(r) of one folio's range:
    /// 3 VMAs, a read there is fine, a write is SIGSEGV counting 0 faults;
    /// back to rw merges to 1 VMA and the 16 pages write with 0 faults.
    #[test]
    fn mprotect_read_only_splits_segvs_writes_and_rw_again_takes_no_fault() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 1 << 20, hg()).unwrap();
        touch(&mm, &mut cpu, B, 1 << 20, true);
        assert_eq!(faults(&mm), 16);
        mm.mprotect(&mut cpu, B + 64 * K, 64 * K, Prot::Read).unwrap();
        let v = mm.vmas();
        assert_eq!(v.len(), 3);
        assert_eq!((v[1].prot, v[1].account), (Prot::Read, true), "VM_ACCOUNT stays");
        mm.access(&mut cpu, B + 64 * K, false).unwrap();
        assert!(is_segv(mm.access(&mut cpu, B + 64 * K, true)));
        assert_eq!(faults(&mm), 16, "a SIGSEGV counts no fault");
        assert_eq!(mm.stats().rss_pages, 256);
        mm.mprotect(&mut cpu, B + 64 * K, 64 * K, Prot::ReadWrite).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        touch(&mm, &mut cpu, B + 64 * K, 64 * K, true);
        assert_eq!(faults(&mm), 16, "mprotect(rw) made the exclusive folio's PTEs writable");
        assert_eq!(mm.stats().mthp[4].split, 0);
        check(&mm);
    }

    /// With the huge zero page off, a read of a read-only advised VMA maps
    /// a PMD THP read-only (`maybe_pmd_mkwrite`): a write is SIGSEGV with
    /// no fault, in it and in the PTEs an munmap splits it into;
    /// mprotect(rw) of the whole PMD makes it writable again without a
    /// fault. (Checked on the kernel with the same trace.)
    #[test]
    fn a_read_fault_thp_of_a_read_only_vma_is_mapped_read_only() {
        let mut c = crate::Config::default();
        c.set_size_mode("2048kB=inherit").unwrap();
        c.use_zero_page = false;
        c.memory.phys_bytes = 256 << 20;
        let mm = crate::Mm::new(c).unwrap();
        let mut cpu = mm.cpu(0);
        let r = crate::trace::MmapFlags { prot: Prot::Read, ..hg() };
        mm.mmap(&mut cpu, B, 4 << 20, r).unwrap();
        mm.access(&mut cpu, B, false).unwrap();
        mm.access(&mut cpu, B + (2 << 20), false).unwrap();
        assert_eq!((faults(&mm), mm.stats().mthp[9].nr_anon), (2, 2));
        assert!(is_segv(mm.access(&mut cpu, B + 0x1000, true)));
        mm.munmap(&mut cpu, B + (3 << 20), 4096).unwrap();
        mm.mprotect(&mut cpu, B, 2 << 20, Prot::ReadWrite).unwrap();
        mm.access(&mut cpu, B + 0x1000, true).unwrap();
        assert!(is_segv(mm.access(&mut cpu, B + (2 << 20), true)), "the PTEs the munmap split the PMD into");
        assert_eq!(faults(&mm), 2);
        check(&mm);
    }

    /// PROT_NONE on one page inside a 64K folio: read and write are
    /// SIGSEGV with 0 faults, the page stays mapped; back to rw, 0 faults.
    #[test]
    fn prot_none_keeps_the_page_mapped_and_forbids_every_access() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 192 * K, hg()).unwrap();
        touch(&mm, &mut cpu, B, 192 * K, true);
        mm.mprotect(&mut cpu, B + 0x24000, 0x1000, Prot::None).unwrap();
        assert_eq!(mm.vmas().len(), 3);
        assert!(is_segv(mm.access(&mut cpu, B + 0x24000, false)));
        assert!(is_segv(mm.access(&mut cpu, B + 0x24000, true)));
        mm.access(&mut cpu, B + 0x25000, true).unwrap();
        assert_eq!(faults(&mm), 3);
        assert_eq!(mm.stats().rss_pages, 48, "the PROT_NONE page stays mapped");
        check(&mm);
        mm.mprotect(&mut cpu, B + 0x24000, 0x1000, Prot::ReadWrite).unwrap();
        mm.access(&mut cpu, B + 0x24000, true).unwrap();
        assert_eq!((faults(&mm), mm.vmas().len()), (3, 1));
    }

    /// A VMA boundary inside a PMD THP splits the PMD mapping (thp_split_pmd
    /// +1), not the folio; the whole 2 MiB made read-only splits nothing;
    /// rw again writes all 512 pages with 0 faults either way.
    #[test]
    fn mprotect_inside_a_pmd_thp_splits_the_pmd_mapping_only() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 4 << 20, hg()).unwrap();
        mm.access(&mut cpu, B, true).unwrap();
        mm.access(&mut cpu, B + (2 << 20), true).unwrap();
        mm.mprotect(&mut cpu, B + 0x5000, 0x1000, Prot::Read).unwrap();
        let s = mm.stats();
        assert_eq!((s.vm.thp_split_pmd, s.mthp[9].split, s.mthp[9].split_deferred, s.mthp[9].nr_anon), (1, 0, 0, 2));
        assert_eq!(mm.vmas().len(), 3);
        mm.mprotect(&mut cpu, B + 0x5000, 0x1000, Prot::ReadWrite).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        touch(&mm, &mut cpu, B, 2 << 20, true);
        assert_eq!(faults(&mm), 2);
        // The whole aligned second 2 MiB.
        mm.mprotect(&mut cpu, B + (2 << 20), 2 << 20, Prot::Read).unwrap();
        assert!(is_segv(mm.access(&mut cpu, B + (2 << 20), true)));
        mm.access(&mut cpu, B + (2 << 20), false).unwrap();
        assert_eq!(mm.stats().vm.thp_split_pmd, 1, "change_huge_pmd splits nothing");
        mm.mprotect(&mut cpu, B + (2 << 20), 2 << 20, Prot::ReadWrite).unwrap();
        touch(&mm, &mut cpu, B + (2 << 20), 2 << 20, true);
        assert_eq!(faults(&mm), 2);
        check(&mm);
    }

    /// PROT_READ 128K advised: 32 read faults on the zero page (RSS 0, no
    /// VM_ACCOUNT); mprotect(rw) adds VM_ACCOUNT; 32 writes are 32 order-0
    /// copies though 64kB is enabled. 2 MiB read: 1 fault, huge zero page;
    /// rw then a write: 1 fault, a PMD THP.
    #[test]
    fn zero_page_reads_in_a_read_only_vma_copy_to_order_0_after_mprotect_rw() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 128 * K, prot(Prot::Read)).unwrap();
        mm.madvise(&mut cpu, B, 128 * K, crate::Advice::HugePage).unwrap();
        assert!(!mm.vmas()[0].account);
        touch(&mm, &mut cpu, B, 128 * K, false);
        assert_eq!((faults(&mm), mm.stats().rss_pages), (32, 0));
        mm.mprotect(&mut cpu, B, 128 * K, Prot::ReadWrite).unwrap();
        assert!(mm.vmas()[0].account);
        touch(&mm, &mut cpu, B, 128 * K, true);
        let s = mm.stats();
        assert_eq!((s.faults(), s.folio_orders[0], s.mthp[4].anon_fault_alloc), (64, 32, 0));
        let h = B + (4 << 20);
        mm.mmap(&mut cpu, h, 2 << 20, prot(Prot::Read)).unwrap();
        mm.madvise(&mut cpu, h, 2 << 20, crate::Advice::HugePage).unwrap();
        touch(&mm, &mut cpu, h, 2 << 20, false);
        assert_eq!(faults(&mm), 65);
        mm.mprotect(&mut cpu, h, 2 << 20, Prot::ReadWrite).unwrap();
        mm.access(&mut cpu, h + 0x3000, true).unwrap();
        let s = mm.stats();
        assert_eq!((s.faults(), s.mthp[9].anon_fault_alloc, s.vm.thp_fault_alloc), (66, 1, 1));
        check(&mm);
    }

    /// A range with a hole: the part before it is changed, then ENOMEM; a
    /// range starting in a hole changes nothing. MAP_NORESERVE never gets
    /// VM_ACCOUNT from mprotect(rw).
    #[test]
    fn mprotect_over_a_hole_changes_up_to_it_and_is_refused() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 64 * K, Default::default()).unwrap();
        mm.mmap(&mut cpu, B + 68 * K, 64 * K, Default::default()).unwrap();
        let e = mm.mprotect(&mut cpu, B, 132 * K, Prot::Read).unwrap_err();
        assert!(e.to_string().contains("ENOMEM"), "{e}");
        let v = mm.vmas();
        assert_eq!((v[0].prot, v[1].prot), (Prot::Read, Prot::ReadWrite));
        assert!(mm.mprotect(&mut cpu, B + 64 * K, 4 * K, Prot::Read).is_err());
        let nr = crate::trace::MmapFlags { prot: Prot::None, noreserve: true, ..Default::default() };
        mm.mmap(&mut cpu, B + (4 << 20), 1 << 20, nr).unwrap();
        mm.mprotect(&mut cpu, B + (4 << 20), 256 * K, Prot::ReadWrite).unwrap();
        mm.madvise(&mut cpu, B + (4 << 20), 256 * K, crate::Advice::HugePage).unwrap();
        let v = mm.vmas();
        assert!(!v[2].account && v[2].noreserve);
        touch(&mm, &mut cpu, B + (4 << 20), 256 * K, true);
        assert_eq!(mm.stats().mthp[4].anon_fault_alloc, 4, "same orders as an mmap'd VMA");
    }
}
