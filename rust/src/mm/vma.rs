//! VMAs (`mm/vma.c`): private anonymous mappings, with the kernel's
//! splitting on partial munmap/madvise (`split_vma`) and merging of adjacent
//! compatible VMAs (`vma_merge_existing_range`, `is_mergeable_vma`,
//! `is_mergeable_anon_vma`), and `vma_modify_flags`.

use crate::error::{Error, Result};
use crate::trace::{Advice, MmapFlags};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The `vm_flags` bits that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmFlags {
    /// VM_HUGEPAGE (MADV_HUGEPAGE).
    pub hugepage: bool,
    /// VM_NOHUGEPAGE (MADV_NOHUGEPAGE).
    pub nohugepage: bool,
    /// VM_UFFD_WP: registered with userfaultfd, so `userfaultfd_armed()`.
    pub uffd_wp: bool,
}

impl From<MmapFlags> for VmFlags {
    fn from(f: MmapFlags) -> Self {
        VmFlags { hugepage: f.hugepage, nohugepage: f.nohugepage, uffd_wp: f.uffd_wp }
    }
}

#[derive(Debug)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub flags: VmFlags,
    /// The anon_vma id, 0 until the first fault (`vmf_anon_prepare`).
    /// Split halves share it; VMAs with different ones do not merge.
    pub anon_vma: AtomicU64,
    /// The orders `thp_vma_allowable_orders()` gives for a fault, cached at
    /// creation since the knobs are fixed for a run.
    pub orders: u32,
}

impl Vma {
    fn new(start: u64, end: u64, flags: VmFlags, anon_vma: u64, orders: u32) -> Arc<Vma> {
        Arc::new(Vma { start, end, flags, anon_vma: AtomicU64::new(anon_vma), orders })
    }
    pub fn anon_vma(&self) -> u64 {
        self.anon_vma.load(Relaxed)
    }
}

/// Public view of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaInfo {
    pub start: u64,
    pub end: u64,
    pub hugepage: bool,
    pub nohugepage: bool,
    pub uffd_wp: bool,
}

/// The VMA set (`mm->mm_mt`), keyed by start. Changed only under the mmap
/// lock held for write; read by faults under the read side.
#[derive(Default)]
pub struct VmaTree {
    map: BTreeMap<u64, Arc<Vma>>,
    /// Bumped by every change, so per-CPU lookup caches know to refresh.
    pub seq: u64,
    /// PROT_NONE reservation pieces (start -> end), as the kernel oracle
    /// places a trace: not accessible, never merged, but they are the
    /// neighbours that bound `free_pgtables()`.
    reserved: BTreeMap<u64, u64>,
}

/// `is_mergeable_vma()` and `is_mergeable_anon_vma()`.
fn compatible(a: &Vma, b: &Vma) -> bool {
    // is_mergeable_vma() + is_mergeable_anon_vma(): same flags, and the
    // anon_vmas agree or one side has none yet.
    a.flags == b.flags && (a.anon_vma() == 0 || b.anon_vma() == 0 || a.anon_vma() == b.anon_vma())
}

impl VmaTree {
    /// `find_vma()` restricted to VMAs containing `addr` (`vma_lookup`).
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<&Arc<Vma>> {
        self.map.range(..=addr).next_back().map(|(_, v)| v).filter(|v| addr < v.end)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Vma>> {
        self.map.values()
    }

    pub fn infos(&self) -> Vec<VmaInfo> {
        self.map
            .values()
            .map(|v| VmaInfo {
                start: v.start,
                end: v.end,
                hugepage: v.flags.hugepage,
                nohugepage: v.flags.nohugepage,
                uffd_wp: v.flags.uffd_wp,
            })
            .collect()
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.map.range(..end).next_back().is_some_and(|(_, v)| v.end > start)
    }

    /// The end of the VMA (or reservation) below `addr` (the `floor` of
    /// `free_pgtables`), 0 if none.
    pub fn prev_end(&self, addr: u64) -> u64 {
        let v = self.map.range(..addr).next_back().map_or(0, |(_, v)| v.end.min(addr));
        let r = self.reserved.range(..addr).next_back().map_or(0, |(_, &e)| e.min(addr));
        v.max(r)
    }

    /// The start of the first VMA (or reservation) at or above `addr` (the
    /// `ceiling`), 0 if none.
    pub fn next_start(&self, addr: u64) -> u64 {
        let v = self.map.range(addr..).next().map(|(_, v)| v.start);
        let r = self.reserved.range(addr..).next().map(|(&s, _)| s);
        match (v, r) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        }
    }

    /// Covers the unmapped parts of `[start, end)` with a PROT_NONE
    /// reservation.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let mut a = start;
        for (s, e) in self.pieces(start, end) {
            if a < s {
                self.reserved.insert(a, s);
            }
            a = e;
        }
        if a < end {
            self.reserved.insert(a, end);
        }
    }

    /// Removes `[start, end)` from the reservation (mmap over it, or munmap);
    /// returns the extent of what it removed.
    fn unreserve(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        let hit: Vec<(u64, u64)> =
            self.reserved.range(..end).filter(|(_, &e)| e > start).map(|(&s, &e)| (s, e)).collect();
        let mut extent: Option<(u64, u64)> = None;
        for (s, e) in hit {
            self.reserved.remove(&s);
            if s < start {
                self.reserved.insert(s, start);
            }
            if e > end {
                self.reserved.insert(end, e);
            }
            let (a, b) = (s.max(start), e.min(end));
            extent = Some(extent.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        extent
    }

    /// Whether `addr` lies at a VMA's start or outside every VMA (so a
    /// change starting there splits nothing).
    pub fn is_boundary(&self, addr: u64) -> bool {
        self.lookup(addr).is_none_or(|v| v.start == addr)
    }

    /// `mmap()` of a private anonymous range (no MAP_FIXED replacement:
    /// overlapping an existing VMA is an error here).
    /// Returns what a MAP_FIXED mmap over reservation pieces unmapped first,
    /// as `(start, end, floor, ceiling)` for `free_pgtables()`.
    pub fn mmap(
        &mut self,
        start: u64,
        len: u64,
        flags: VmFlags,
        orders: impl Fn(VmFlags) -> u32,
    ) -> Result<Option<(u64, u64, u64, u64)>> {
        let end = start + len;
        if self.overlaps(start, end) {
            return Err(Error::Overlap(format!("mmap {start:#x}+{len:#x} overlaps an existing mapping")));
        }
        // The neighbours outside the range bound the page tables freed with
        // the replaced pieces (vms_gather_munmap_vmas: prev end, next start).
        let replaced = self.unreserve(start, end).map(|(s, e)| (s, e, self.prev_end(start), self.next_start(end)));
        self.map.insert(start, Vma::new(start, end, flags, 0, orders(flags)));
        self.seq += 1;
        self.vma_merge(start, end);
        Ok(replaced)
    }

    /// `split_vma()` at `addr`, if a VMA spans it.
    fn split_vma(&mut self, addr: u64) {
        let Some(v) = self.lookup(addr).cloned() else { return };
        if v.start == addr {
            return;
        }
        let av = v.anon_vma();
        self.map.insert(v.start, Vma::new(v.start, addr, v.flags, av, v.orders));
        self.map.insert(addr, Vma::new(addr, v.end, v.flags, av, v.orders));
        self.seq += 1;
    }

    /// Removes `[start, end)`: returns the VMAs removed and the extent of
    /// everything unmapped (VMAs and reservation), for `free_pgtables()`.
    pub fn munmap(&mut self, start: u64, end: u64) -> (Vec<Arc<Vma>>, Option<(u64, u64)>) {
        let mut extent = self.unreserve(start, end);
        self.split_vma(start);
        self.split_vma(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        let out: Vec<_> = keys.iter().filter_map(|k| self.map.remove(k)).collect();
        if !out.is_empty() {
            self.seq += 1;
        }
        for v in &out {
            extent = Some(extent.map_or((v.start, v.end), |(x, y)| (x.min(v.start), y.max(v.end))));
        }
        (out, extent)
    }

    /// The mapped pieces of `[start, end)`, after splitting at its ends.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = vec![];
        if let Some(v) = self.lookup(start) {
            out.push((start, v.end.min(end)));
        }
        for (_, v) in self.map.range(start + 1..end) {
            out.push((v.start, v.end.min(end)));
        }
        out
    }

    /// `madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE)`: changes the flags of the
    /// covered parts, splitting and merging as `vma_modify_flags()` does.
    /// Returns false if part of the range was unmapped (the kernel's ENOMEM,
    /// after applying the advice to what is mapped).
    pub fn madvise_flags(&mut self, start: u64, end: u64, advice: Advice, orders: impl Fn(VmFlags) -> u32) -> bool {
        self.vma_modify_flags(start, end, orders, |f| match advice {
            Advice::HugePage => {
                f.hugepage = true;
                f.nohugepage = false;
            }
            Advice::NoHugePage => {
                f.nohugepage = true;
                f.hugepage = false;
            }
            _ => {}
        })
    }

    /// `vma_modify_flags()` over the mapped parts of `[start, end)`; returns
    /// false if part of the range was unmapped.
    pub fn vma_modify_flags(
        &mut self,
        start: u64,
        end: u64,
        orders: impl Fn(VmFlags) -> u32,
        change: impl Fn(&mut VmFlags),
    ) -> bool {
        let pieces = self.pieces(start, end);
        let covered: u64 = pieces.iter().map(|(s, e)| e - s).sum();
        for (s, e) in pieces {
            let v = self.lookup(s).cloned().expect("piece is mapped");
            let mut f = v.flags;
            change(&mut f);
            if f == v.flags {
                continue;
            }
            self.split_vma(s);
            self.split_vma(e);
            let v = self.map.remove(&s).expect("split");
            self.map.insert(s, Vma::new(s, e, f, v.anon_vma(), orders(f)));
            self.seq += 1;
            self.vma_merge(s, e);
        }
        covered == end - start
    }

    /// Merges the VMA at `[start, end)` with compatible neighbours
    /// (`vma_merge_existing_range` / `vma_merge_new_range`).
    fn vma_merge(&mut self, start: u64, end: u64) {
        let mut start = start;
        // With the previous VMA.
        if let Some(prev) = self.map.range(..start).next_back().map(|(_, v)| v.clone()) {
            let cur = self.map[&start].clone();
            if prev.end == start && compatible(&prev, &cur) {
                self.map.remove(&start);
                let av = prev.anon_vma().max(cur.anon_vma());
                self.map.insert(prev.start, Vma::new(prev.start, cur.end, cur.flags, av, cur.orders));
                start = prev.start;
                self.seq += 1;
            }
        }
        // With the next one.
        if let Some(next) = self.map.get(&end).cloned() {
            let cur = self.map[&start].clone();
            if compatible(&cur, &next) {
                self.map.remove(&end);
                let av = cur.anon_vma().max(next.anon_vma());
                self.map.insert(start, Vma::new(start, next.end, cur.flags, av, cur.orders));
                self.seq += 1;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn o(_: VmFlags) -> u32 {
        0
    }

    #[test]
    fn split_and_merge() {
        let mut t = VmaTree::default();
        t.mmap(0x10000, 0x10000, VmFlags::default(), o).unwrap();
        t.mmap(0x20000, 0x10000, VmFlags::default(), o).unwrap();
        assert_eq!(t.infos().len(), 1, "adjacent compatible mmaps merge");
        assert!(t.mmap(0x18000, 0x1000, VmFlags::default(), o).is_err());
        t.madvise_flags(0x14000, 0x16000, Advice::HugePage, o);
        assert_eq!(t.infos().len(), 3);
        t.madvise_flags(0x14000, 0x16000, Advice::NoHugePage, o);
        assert_eq!(t.infos().len(), 3);
        let h = VmFlags { hugepage: true, ..Default::default() };
        t.madvise_flags(0x10000, 0x30000, Advice::HugePage, o);
        assert_eq!(t.infos().len(), 1, "advice over the whole range merges back");
        assert_eq!(t.lookup(0x2ffff).unwrap().flags, h);
        t.munmap(0x18000, 0x19000);
        assert_eq!(t.infos().len(), 2);
        assert!(t.lookup(0x18000).is_none());
        assert_eq!(t.prev_end(0x18000), 0x18000);
        assert_eq!(t.next_start(0x18000), 0x19000);
        t.reserve(0x0, 0x40000);
        assert_eq!(t.prev_end(0x18000), 0x18000);
        assert_eq!(t.prev_end(0x8000), 0x8000, "the reservation below the first VMA bounds it");
        assert_eq!(t.next_start(0x30000), 0x30000);
        let (gone, extent) = t.munmap(0x0, 0x40000);
        assert_eq!(gone.len(), 2);
        assert_eq!(extent, Some((0x0, 0x40000)));
        assert_eq!(t.next_start(0), 0);
    }

    #[test]
    fn different_anon_vmas_do_not_merge() {
        let mut t = VmaTree::default();
        t.mmap(0x10000, 0x10000, VmFlags::default(), o).unwrap();
        t.lookup(0x10000).unwrap().anon_vma.store(1, Relaxed);
        t.mmap(0x30000, 0x10000, VmFlags::default(), o).unwrap();
        t.lookup(0x30000).unwrap().anon_vma.store(2, Relaxed);
        t.mmap(0x20000, 0x10000, VmFlags::default(), o).unwrap();
        // The new VMA merges with the previous one only.
        assert_eq!(t.infos().len(), 2);
        assert_eq!(t.lookup(0x2ffff).unwrap().start, 0x10000);
    }
}
