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
                    if next - a == PMD_SIZE {
                        // change_huge_pmd().
                        let _g = self.pt.page_table_lock.lock(&cpu.pc.page_table_lock);
                        let bits = if !flags.accessible() {
                            PMD_PROTNONE
                        } else if !flags.write {
                            PMD_RDONLY
                        } else {
                            0
                        };
                        pmd.store((v & !PMD_PROT_MASK) | bits, Release);
                    } else {
                        self.split_huge_pmd(cpu, pmd);
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
