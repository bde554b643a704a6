//! `madvise()` (`mm/madvise.c`): MADV_DONTNEED zaps, MADV_HUGEPAGE and
//! MADV_NOHUGEPAGE change the VMA flags (`hugepage_madvise`).

use crate::error::Result;
use crate::mm::vma::VmFlags;
use crate::mm::{Cpu, Mm};
use crate::trace::{check_range, Advice};
use crate::PMD_SIZE;

impl Mm {
    /// `madvise()`. DONTNEED zaps what is mapped (`madvise_dontneed_single_vma`);
    /// HUGEPAGE/NOHUGEPAGE change the VMA flags. A range with unmapped parts
    /// is applied where mapped, as the kernel does before returning ENOMEM.
    pub fn madvise(&self, cpu: &mut Cpu, addr: u64, len: u64, advice: Advice) -> Result<()> {
        check_range(addr, len, 0)?;
        let cfg = &self.cfg;
        self.with_write_lock(cpu, |mm, t, cpu| {
            let end = addr + len;
            match advice {
                Advice::DontNeed => {
                    for (s, e) in t.pieces(addr, end) {
                        mm.unmap_page_range(cpu, s, e, true);
                    }
                }
                _ => {
                    // vma_adjust_trans_huge(): a VMA split inside a PMD-mapped
                    // range splits the PMD mapping first.
                    for b in [addr, end] {
                        if b % PMD_SIZE != 0 && !t.is_boundary(b) {
                            let v = t.lookup(b).expect("inside a VMA");
                            let wants = match advice {
                                Advice::HugePage => !v.flags.hugepage || v.flags.nohugepage,
                                _ => v.flags.hugepage || !v.flags.nohugepage,
                            };
                            if wants {
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
