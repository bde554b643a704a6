//! The simulator's CONFIG_DEBUG_VM (`mm/debug.c` has the kernel's dump
//! helpers; these checks are the simulator's own): after a run, every
//! present entry maps a live folio, mapcounts and refcounts agree with the
//! entries, no page is mapped twice, RSS agrees, and no page is lost.

use crate::mm::mm_types::{PG_HEAD, PG_PMD_MAPPED};
use crate::mm::pgtable::{pmd_huge, pte_order, pte_pfn, PageTable, PMD_HUGE_ZERO, PTE_ZERO};
use crate::mm::vmstat::LockCounters;
use crate::mm::Mm;
use crate::{PAGE_SIZE, PMD_ORDER, PTRS_PER_TABLE};
use std::collections::HashMap;

impl Mm {
    /// Checks that every present PTE maps a page of a live folio, that each
    /// folio's mapcount equals the entries mapping it, that no page is mapped
    /// twice, that RSS agrees, and that no page was lost or made up. It takes
    /// the mmap lock for write, so it waits for accesses in flight; it counts
    /// in no CPU's figures. CPUs still alive keep pages on their per-CPU
    /// lists; those count as free.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        // Locks taken here are not the simulated process's: uncounted.
        let lc = LockCounters::default();
        let (_w, _, _) = self.mmap_lock.write(|| self.live_cpus(), |p| &p.reader, || {});
        let alloc = &self.alloc;
        // head pfn -> pages of it mapped
        let mut mapped: HashMap<u64, u64> = HashMap::new();
        let frontier = alloc.frontier();
        let mut seen = vec![0u64; (frontier as usize).div_ceil(64)];
        let mut mark = |pfn: u64| -> std::result::Result<(), String> {
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            if w >= seen.len() {
                return Err(format!("pfn {pfn:#x} was never allocated"));
            }
            if seen[w] & (1 << b) != 0 {
                return Err(format!("pfn {pfn:#x} is mapped twice"));
            }
            seen[w] |= 1 << b;
            Ok(())
        };
        let mut rss = 0u64;
        let mut err = None;
        self.pt.for_each_pmd_entry(|addr, pmdval| {
            if err.is_some() {
                return;
            }
            let r = (|| -> std::result::Result<(), String> {
                if pmd_huge(pmdval) {
                    if pmdval & PMD_HUGE_ZERO != 0 {
                        return Ok(());
                    }
                    let pfn = pte_pfn(pmdval);
                    let p = alloc.page(pfn);
                    if p.info() & (PG_HEAD | PG_PMD_MAPPED) != PG_HEAD | PG_PMD_MAPPED || p.order() != PMD_ORDER {
                        return Err(format!("PMD at {addr:#x} maps pfn {pfn:#x}, which is no PMD-mapped THP"));
                    }
                    for k in 0..512 {
                        mark(pfn + k)?;
                    }
                    *mapped.entry(pfn).or_default() += 512;
                    rss += 512;
                    return Ok(());
                }
                // SAFETY: a table PMD of this mm, read under its mmap write lock.
                let t = unsafe { PageTable::pte_table(pmdval) };
                for i in 0..PTRS_PER_TABLE {
                    let pte = t.get(i);
                    if pte == 0 || pte & PTE_ZERO != 0 {
                        continue;
                    }
                    let pfn = pte_pfn(pte);
                    let order = pte_order(pte);
                    let head = pfn & !((1u64 << order) - 1);
                    if pfn >= alloc.phys_pages {
                        return Err(format!(
                            "PTE at {:#x} maps pfn {pfn:#x}, outside memory",
                            addr + i as u64 * PAGE_SIZE
                        ));
                    }
                    let hp = alloc.page(head);
                    if hp.info() & PG_HEAD == 0 || hp.order() != order {
                        return Err(format!(
                            "PTE at {:#x} maps pfn {pfn:#x}, not a page of a live order-{order} folio",
                            addr + i as u64 * PAGE_SIZE
                        ));
                    }
                    mark(pfn)?;
                    *mapped.entry(head).or_default() += 1;
                    rss += 1;
                }
                Ok(())
            })();
            if let Err(e) = r {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let mut folio_pages = 0u64;
        for (&head, &n) in &mapped {
            let p = alloc.page(head);
            if p.mapcount() as u64 != n {
                return Err(format!("folio {head:#x} has mapcount {} but {n} entries map it", p.mapcount()));
            }
            let want_ref = if p.info() & PG_PMD_MAPPED != 0 { 1 } else { n };
            if p.folio_ref_count() as u64 != want_ref {
                return Err(format!("folio {head:#x} has refcount {} but should have {want_ref}", p.folio_ref_count()));
            }
            folio_pages += 1 << p.order();
        }
        // Every folio head in the memory map is mapped (none leaked).
        let heads = (0..frontier).filter(|&pfn| alloc.page(pfn).info() & PG_HEAD != 0).count() as u64;
        if heads != mapped.len() as u64 {
            return Err(format!("{heads} folios exist but {} are mapped: folios leaked", mapped.len()));
        }
        let s = self.stats();
        if s.rss_pages != rss {
            return Err(format!("RSS counter says {} pages but page tables map {rss}", s.rss_pages));
        }
        let free = alloc.check_free_lists(&lc)?;
        let total = free + s.mem.pcp_pages + s.mem.pinned_pages + folio_pages;
        if total != alloc.phys_pages {
            return Err(format!(
                "pages not conserved: free {free} + per-CPU {} + pinned {} + folios {folio_pages} = {total}, not {}",
                s.mem.pcp_pages, s.mem.pinned_pages, alloc.phys_pages
            ));
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::mm::mm_types::{MAPCOUNT_MASK, PG_HEAD};
    use crate::mm::pgtable::{pte_pfn, PageTable};
    use crate::mm::Mm;
    use crate::trace::MmapFlags;
    use crate::Config;
    use std::sync::atomic::Ordering::Relaxed;

    const BASE: u64 = 0x7f00_0000_0000;

    fn mm_with_a_64k_folio() -> (Mm, u64, u64) {
        let mut c = Config::default();
        c.set_size_mode("64kB=always").unwrap();
        c.memory.phys_bytes = 64 << 20;
        let mm = Mm::new(c).unwrap();
        let mut cpu = mm.cpu(0);
        mm.mmap(&mut cpu, BASE, 0x20_0000, MmapFlags::default()).unwrap();
        mm.access(&mut cpu, BASE, true).unwrap();
        drop(cpu);
        let pmd = mm.pt.pmd_offset(BASE).unwrap().load(Relaxed);
        // SAFETY: a table PMD of `mm`; no CPU runs, nothing frees tables.
        let pfn = pte_pfn(unsafe { PageTable::pte_table(pmd) }.get(0));
        (mm, pmd, pfn)
    }

    #[test]
    fn the_checker_passes_a_sound_mm_and_catches_corruption() {
        let (mm, pmd, pfn) = mm_with_a_64k_folio();
        mm.check_invariants().unwrap();
        // A mapcount that disagrees with the PTEs.
        let p = mm.alloc.page(pfn);
        let info = p.info();
        p.set_info((info & !MAPCOUNT_MASK) | 15);
        assert!(mm.check_invariants().unwrap_err().contains("mapcount"));
        p.set_info(info);
        // A refcount that does.
        p.count.store(3, Relaxed);
        assert!(mm.check_invariants().unwrap_err().contains("refcount"));
        p.count.store(16, Relaxed);
        mm.check_invariants().unwrap();
        // A page mapped twice.
        // SAFETY: as in `mm_with_a_64k_folio`.
        let t = unsafe { PageTable::pte_table(pmd) };
        let pte = t.get(0);
        t.ptes[100].store(pte, Relaxed);
        assert!(mm.check_invariants().unwrap_err().contains("mapped twice"));
        t.ptes[100].store(0, Relaxed);
        // A folio nobody maps: leaked.
        let leak = mm.alloc.page(pfn + 64);
        leak.set_info(PG_HEAD);
        assert!(mm.check_invariants().unwrap_err().contains("leaked"));
    }

    #[test]
    fn reading_stats_twice_gives_the_same_figures() {
        let (mm, _, _) = mm_with_a_64k_folio();
        let a = mm.stats();
        let _ = mm.vmas();
        assert_eq!(a, mm.stats());
    }

    #[test]
    fn cpu_records_retire_with_their_cpu() {
        let (mm, _, _) = mm_with_a_64k_folio();
        let before = mm.stats();
        for i in 0..100 {
            let mut cpu = mm.cpu(i);
            mm.access(&mut cpu, BASE + 0x10_0000, false).unwrap();
        }
        assert_eq!(mm.nr_cpus(), 0, "dropped CPUs leave no record behind");
        let after = mm.stats();
        assert_eq!(after.faults(), before.faults() + 1, "their figures stay counted");
    }
}
