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
    /// `faultin_page_range()` for `madvise(MADV_POPULATE_READ/WRITE)`. An
    /// unmapped page stops it (ENOMEM) after what came before was
    /// populated; as for every madvise of a range with holes, the replay
    /// goes on as the program did. A write populate of a VMA without
    /// VM_WRITE, or any populate of a PROT_NONE VMA, is EINVAL
    /// (`check_vma_flags`), which the kernel refuses: an error.
    pub fn faultin_page_range(&self, cpu: &mut Cpu, start: u64, end: u64, write: bool) -> Result<()> {
        let pc = cpu.percpu();
        let g = self.mmap_read_lock(&pc, cpu);
        let mut a = start;
        while a < end {
            let Some(vma) = self.lookup(&g, cpu, a) else { break };
            let (vend, flags) = (vma.end.min(end), vma.flags);
            if (write && !flags.write) || !flags.accessible() {
                return Err(Error::InvalidRange(format!(
                    "madvise populate_{}: the VMA at {a:#x} is {} (EINVAL)",
                    if write { "write" } else { "read" },
                    flags.prot().name()
                )));
            }
            while a < vend {
                self.access_inner::<false>(&g, cpu, a, write)?;
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
                    if self.access_inner::<false>(&g, cpu, a, flags.write).is_err() {
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

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::testing::*;
    use crate::trace::Prot;
    use crate::Advice;

    /// Findings 6: MADV_POPULATE_WRITE of 256K advised = 4 faults, 4 64K
    /// folios; again: 0. POPULATE_READ = 64 faults, zero pages, RSS 0; a
    /// POPULATE_WRITE over them = 64 order-0 copies. 2M aligned: READ 1
    /// fault (huge zero page), WRITE 1 fault (PMD THP).
    #[test]
    fn populate_faults_count_like_user_faults() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 256 * K, hg()).unwrap();
        mm.madvise(&mut cpu, B, 256 * K, Advice::PopulateWrite).unwrap();
        assert_eq!((faults(&mm), mm.stats().mthp[4].anon_fault_alloc), (4, 4));
        mm.madvise(&mut cpu, B, 256 * K, Advice::PopulateWrite).unwrap();
        touch(&mm, &mut cpu, B, 256 * K, true);
        assert_eq!(faults(&mm), 4);
        let r = B + (4 << 20);
        mm.mmap(&mut cpu, r, 256 * K, hg()).unwrap();
        mm.madvise(&mut cpu, r, 256 * K, Advice::PopulateRead).unwrap();
        assert_eq!((faults(&mm), mm.stats().rss_pages), (68, 64));
        mm.madvise(&mut cpu, r, 256 * K, Advice::PopulateWrite).unwrap();
        assert_eq!((faults(&mm), mm.stats().folio_orders[0]), (132, 64));
        let h = B + (8 << 20);
        mm.mmap(&mut cpu, h, 4 << 20, hg()).unwrap();
        mm.madvise(&mut cpu, h, 2 << 20, Advice::PopulateRead).unwrap();
        assert_eq!(faults(&mm), 133);
        mm.madvise(&mut cpu, h + (2 << 20), 2 << 20, Advice::PopulateWrite).unwrap();
        let s = mm.stats();
        assert_eq!((s.faults(), s.mthp[9].anon_fault_alloc), (134, 1));
        check(&mm);
    }

    /// POPULATE_WRITE on PROT_READ and POPULATE_READ on PROT_NONE are
    /// EINVAL with no fault; POPULATE_READ on PROT_READ maps zero pages; a
    /// hole stops it after populating up to it (ENOMEM, not an error).
    #[test]
    fn populate_refuses_what_the_vma_forbids_and_stops_at_a_hole() {
        let (mm, mut cpu) = mm();
        mm.mmap(&mut cpu, B, 64 * K, prot(Prot::Read)).unwrap();
        let e = mm.madvise(&mut cpu, B, 64 * K, Advice::PopulateWrite).unwrap_err();
        assert!(e.to_string().contains("EINVAL"), "{e}");
        assert_eq!(faults(&mm), 0);
        mm.madvise(&mut cpu, B, 64 * K, Advice::PopulateRead).unwrap();
        assert_eq!(faults(&mm), 16);
        mm.mmap(&mut cpu, B + (2 << 20), 64 * K, prot(Prot::None)).unwrap();
        let e = mm.madvise(&mut cpu, B + (2 << 20), 64 * K, Advice::PopulateRead).unwrap_err();
        assert!(e.to_string().contains("EINVAL"), "{e}");
        let w = B + (4 << 20);
        mm.mmap(&mut cpu, w, 32 * K, Default::default()).unwrap();
        mm.mmap(&mut cpu, w + 36 * K, 32 * K, Default::default()).unwrap();
        mm.madvise(&mut cpu, w, 68 * K, Advice::PopulateWrite).unwrap();
        assert_eq!((faults(&mm), mm.stats().rss_pages), (24, 8), "populated up to the hole only");
    }
}
