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
            mm.do_vmi_munmap(t, cpu, addr, addr + len);
            Ok(())
        })
    }

    /// `brk(addr)`. The first `brk` of a trace sets `mm->start_brk` (what
    /// exec leaves: a break and no heap VMA); each later one grows the heap
    /// with `do_brk_flags` or shrinks it by unmapping above the new
    /// (page-aligned) break. A break the kernel would refuse (below
    /// `start_brk`, or growing into the next mapping) is an error: the
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
                    mm.do_vmi_munmap(t, cpu, newbrk, oldbrk);
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
    pub(crate) fn do_vmi_munmap(&self, t: &mut crate::mm::vma::VmaTree, cpu: &mut Cpu, start: u64, end: u64) {
        // vma_adjust_trans_huge() is done by zap_pmd_range for a partly
        // unmapped PMD.
        let (gone, extent) = t.munmap(start, end);
        for v in &gone {
            self.unmap_page_range(cpu, v.start, v.end, false);
        }
        if let Some((s, e)) = extent {
            self.free_pgtables(s, e, t.prev_end(s), t.next_start(e));
        }
    }
}
