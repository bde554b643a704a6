//! The system calls that map and unmap (`mm/mmap.c` `do_mmap`, `mm/vma.c`
//! `do_vmi_munmap`), on private anonymous memory.

use crate::error::Result;
use crate::mm::vma::VmFlags;
use crate::mm::{Cpu, Mm};
use crate::trace::{check_range, Advice, MmapFlags};

impl Mm {
    /// `mmap(addr, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE)`,
    /// then `madvise(MADV_HUGEPAGE/NOHUGEPAGE)` and userfaultfd registration as flagged.
    pub fn mmap(&self, cpu: &mut Cpu, addr: u64, len: u64, flags: MmapFlags) -> Result<()> {
        check_range(addr, len, 0)?;
        let cfg = &self.cfg;
        // As the trace means it: mmap(), then userfaultfd registration and
        // madvise() on the new range, each of which may split and merge.
        let orders = |f: VmFlags| cfg.allowable_orders(f.hugepage, f.nohugepage);
        self.with_write_lock(cpu, |mm, t, _| {
            if let Some((start, end, floor, ceiling)) = t.mmap(addr, len, VmFlags::default(), orders)? {
                // MAP_FIXED over the reservation unmapped it first.
                mm.free_pgtables(start, end, floor, ceiling);
            }
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
            let end = addr + len;
            let (gone, extent) = t.munmap(addr, end);
            for v in &gone {
                mm.unmap_page_range(cpu, v.start, v.end, false);
            }
            if let Some((start, end)) = extent {
                mm.free_pgtables(start, end, t.prev_end(start), t.next_start(end));
            }
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
}
