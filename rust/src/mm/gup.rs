//! `mm/gup.c`: faulting pages in on a process's behalf, for
//! `MADV_POPULATE_READ/WRITE` (`faultin_page_range`) and `MAP_POPULATE`
//! (`__mm_populate` -> `populate_vma_page_range`). Each page that is not
//! already mapped as the access needs is faulted in with `handle_mm_fault`
//! (`faultin_page`), which counts the fault exactly as a user fault
//! (`mm_account_fault` bumps `pgfault` and the task's `min_flt` before it
//! skips the perf events for a fault without registers): one per folio
//! installed, one per zero-page PTE, one per COW of the zero page.

use crate::error::{Error, Result};
use crate::mm::{Cpu, Mm};
use crate::PAGE_SIZE;

impl Mm {
    /// `faultin_page_range()` for `madvise(MADV_POPULATE_READ/WRITE)`. A
    /// write populate of a VMA without VM_WRITE, or any populate of a
    /// PROT_NONE VMA, is EINVAL (`check_vma_flags`); an unmapped page is
    /// ENOMEM. Both stop after what came before was populated, as the
    /// kernel leaves it; the trace cannot continue past a call the kernel
    /// refused, so they are errors.
    pub fn faultin_page_range(&self, cpu: &mut Cpu, start: u64, end: u64, write: bool) -> Result<()> {
        let pc = cpu.percpu();
        let g = self.mmap_read_lock(&pc, cpu);
        let mut a = start;
        while a < end {
            let Some(vma) = self.lookup(&g, cpu, a) else {
                return Err(Error::InvalidRange(format!("madvise populate: {a:#x} is not mapped (ENOMEM)")));
            };
            let (vend, flags) = (vma.end.min(end), vma.flags);
            if (write && !flags.write) || !flags.accessible() {
                return Err(Error::InvalidRange(format!(
                    "madvise populate_{}: the VMA at {a:#x} is {} (EINVAL)",
                    if write { "write" } else { "read" },
                    flags.prot().name()
                )));
            }
            while a < vend {
                self.access_locked(&g, cpu, a, write)?;
                a += PAGE_SIZE;
            }
        }
        drop(g);
        cpu.sync_pcp_gauge();
        Ok(())
    }

    /// `mm_populate()` of a new mapping (MAP_POPULATE):
    /// `populate_vma_page_range()` faults with FOLL_WRITE on a writable
    /// private VMA (real folios) and as reads on a read-only one (the zero
    /// page); a PROT_NONE VMA gets nothing. Errors are ignored, as
    /// `mm_populate` ignores them.
    pub(crate) fn mm_populate(&self, cpu: &mut Cpu, start: u64, len: u64) {
        let pc = cpu.percpu();
        let g = self.mmap_read_lock(&pc, cpu);
        let mut a = start;
        while a < start + len {
            let Some(vma) = self.lookup(&g, cpu, a) else { break };
            let (vend, flags) = (vma.end.min(start + len), vma.flags);
            if flags.accessible() {
                while a < vend {
                    if self.access_locked(&g, cpu, a, flags.write).is_err() {
                        break;
                    }
                    a += PAGE_SIZE;
                }
            }
            a = vend;
        }
        drop(g);
        cpu.sync_pcp_gauge();
    }
}
