//! VMAs (`mm/vma.c`): private anonymous mappings, with the kernel's
//! splitting on partial munmap/madvise (`split_vma`) and merging of adjacent
//! compatible VMAs (`vma_merge_existing_range`, `is_mergeable_vma`,
//! `is_mergeable_anon_vma`), and `vma_modify_flags`.

use crate::error::{Error, Result};
use crate::trace::{Advice, MmapFlags, Prot};
use crate::PAGE_SHIFT;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The `vm_flags` bits that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmFlags {
    /// VM_READ.
    pub read: bool,
    /// VM_WRITE.
    pub write: bool,
    /// VM_ACCOUNT: the mapping is charged to the commit limit (a private
    /// writable mapping without MAP_NORESERVE).
    pub account: bool,
    /// VM_NORESERVE (MAP_NORESERVE).
    pub noreserve: bool,
    /// VM_GROWSDOWN (MAP_GROWSDOWN): a stack that `expand_downwards` grows.
    pub growsdown: bool,
    /// VM_DONTCOPY (MADV_DONTFORK).
    pub dontcopy: bool,
    /// VM_HUGEPAGE (MADV_HUGEPAGE).
    pub hugepage: bool,
    /// VM_NOHUGEPAGE (MADV_NOHUGEPAGE, or MAP_STACK).
    pub nohugepage: bool,
    /// VM_UFFD_WP: registered with userfaultfd, so `userfaultfd_armed()`.
    pub uffd_wp: bool,
}

impl VmFlags {
    /// What `do_mmap()` gives a new private anonymous mapping:
    /// `calc_vm_prot_bits()`, `calc_vm_flag_bits()` (MAP_GROWSDOWN ->
    /// VM_GROWSDOWN, MAP_STACK -> VM_NOHUGEPAGE), MAP_NORESERVE ->
    /// VM_NORESERVE, and VM_ACCOUNT from `accountable_mapping()` (private
    /// and writable, not NORESERVE). The advice and userfaultfd
    /// registration a trace line adds come after, as separate calls.
    pub fn for_mmap(f: MmapFlags) -> VmFlags {
        let write = f.prot.writable();
        VmFlags {
            read: f.prot.readable(),
            write,
            account: write && !f.noreserve,
            noreserve: f.noreserve,
            growsdown: f.growsdown,
            nohugepage: f.stack,
            ..VmFlags::default()
        }
    }

    /// A plain read/write private anonymous VMA (`VM_DATA_DEFAULT_FLAGS |
    /// VM_ACCOUNT`, as `brk` makes the heap).
    pub fn rw() -> VmFlags {
        VmFlags { read: true, write: true, account: true, ..VmFlags::default() }
    }

    /// The protection these flags give.
    pub fn prot(&self) -> Prot {
        match (self.read, self.write) {
            (_, true) => Prot::ReadWrite,
            (true, false) => Prot::Read,
            (false, false) => Prot::None,
        }
    }

    /// `vma_is_accessible()`: any of VM_READ, VM_WRITE (VM_EXEC is never set here).
    pub fn accessible(&self) -> bool {
        self.read || self.write
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
    /// `vm_pgoff`: for anonymous memory, the page index of the address the
    /// VMA's pages were first mapped at (`addr >> PAGE_SHIFT` at mmap). A
    /// moved VMA that has an anon_vma keeps it, so it merges only where its
    /// pages' indices stay contiguous (`can_vma_merge_before/after`).
    pub pgoff: u64,
    /// The orders `thp_vma_allowable_orders()` gives for a fault, cached at
    /// creation since the knobs are fixed for a run.
    pub orders: u32,
}

impl Vma {
    fn new(start: u64, end: u64, flags: VmFlags, anon_vma: u64, pgoff: u64, orders: u32) -> Arc<Vma> {
        Arc::new(Vma { start, end, flags, anon_vma: AtomicU64::new(anon_vma), pgoff, orders })
    }
    pub fn anon_vma(&self) -> u64 {
        self.anon_vma.load(Relaxed)
    }
    /// `vma_pages()`.
    pub fn pages(&self) -> u64 {
        (self.end - self.start) >> PAGE_SHIFT
    }
}

/// Public view of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaInfo {
    pub start: u64,
    pub end: u64,
    /// `rw`, `r` or `none`.
    pub prot: Prot,
    pub hugepage: bool,
    pub nohugepage: bool,
    pub uffd_wp: bool,
    /// VM_ACCOUNT.
    pub account: bool,
    /// VM_NORESERVE.
    pub noreserve: bool,
    /// VM_GROWSDOWN.
    pub growsdown: bool,
    /// VM_DONTCOPY.
    pub dontcopy: bool,
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
    /// `mm->start_brk` (set by the first `brk` of a trace: the model has no
    /// exec) and `mm->brk`. Fields of `mm_struct` in the kernel, kept here
    /// because they change under the mmap write lock with the tree.
    pub start_brk: Option<u64>,
    pub brk: u64,
    /// The extents of the VMAs changed since the write lock was taken or
    /// this list last taken: those a write section write-locks
    /// (`vma_start_write`), for virtual time (the kernel marks the VMA
    /// itself, with `vm_lock_seq`).
    write_locked: Vec<(u64, u64)>,
    /// Existing VMAs changed (split, merged, resized or detached) since
    /// then: each costs a `vma_start_write` and a tree store.
    vmas_written: u64,
}

/// `is_mergeable_vma()`, `is_mergeable_anon_vma()` and the `vm_pgoff`
/// check of `can_vma_merge_after()`: `a` ends where `b` starts, same flags,
/// the anon_vmas agree or one side has none yet, and `b`'s pages follow
/// `a`'s in page index.
fn compatible(a: &Vma, b: &Vma) -> bool {
    a.end == b.start
        && a.flags == b.flags
        && (a.anon_vma() == 0 || b.anon_vma() == 0 || a.anon_vma() == b.anon_vma())
        && a.pgoff + a.pages() == b.pgoff
}

/// The `vm_flags` change of an advice (`madvise_vma_behavior`:
/// `hugepage_madvise` for HUGEPAGE/NOHUGEPAGE, VM_DONTCOPY for
/// DONTFORK/DOFORK); other advice changes no flag.
pub fn advise_flags(advice: Advice, f: &mut VmFlags) {
    match advice {
        Advice::HugePage => {
            f.hugepage = true;
            f.nohugepage = false;
        }
        Advice::NoHugePage => {
            f.nohugepage = true;
            f.hugepage = false;
        }
        Advice::DontFork => f.dontcopy = true,
        Advice::DoFork => f.dontcopy = false,
        _ => {}
    }
}

impl VmaTree {
    /// Inserts `v`, write-locking it and what it replaces.
    fn put(&mut self, v: Arc<Vma>) {
        self.write_locked.push((v.start, v.end));
        if let Some(old) = self.map.insert(v.start, v) {
            self.write_locked.push((old.start, old.end));
            self.vmas_written += 1;
        }
    }

    /// Removes the VMA starting at `start`, write-locking it.
    fn take(&mut self, start: &u64) -> Option<Arc<Vma>> {
        let v = self.map.remove(start);
        if let Some(v) = &v {
            self.write_locked.push((v.start, v.end));
            self.vmas_written += 1;
        }
        v
    }

    /// The extents write-locked since the last call (overlapping ones
    /// joined) and the number of existing VMAs changed, emptying both.
    pub fn take_write_locked(&mut self) -> (Vec<(u64, u64)>, u64) {
        let nr = std::mem::take(&mut self.vmas_written);
        let mut v = std::mem::take(&mut self.write_locked);
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(l) if s < l.1 => l.1 = l.1.max(e),
                _ => out.push((s, e)),
            }
        }
        (out, nr)
    }

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
                prot: v.flags.prot(),
                hugepage: v.flags.hugepage,
                nohugepage: v.flags.nohugepage,
                uffd_wp: v.flags.uffd_wp,
                account: v.flags.account,
                noreserve: v.flags.noreserve,
                growsdown: v.flags.growsdown,
                dontcopy: v.flags.dontcopy,
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
    pub(crate) fn unreserve(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
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
        self.put(Vma::new(start, end, flags, 0, start >> PAGE_SHIFT, orders(flags)));
        self.seq += 1;
        self.vma_merge(start, end);
        Ok(replaced)
    }

    /// Inserts a VMA as is, merging with nothing (`vm_area_alloc` +
    /// `vma_iter_store`: what `do_brk_flags` does when it cannot expand).
    pub fn insert_vma(&mut self, start: u64, end: u64, flags: VmFlags, anon_vma: u64, pgoff: u64, orders: u32) {
        self.unreserve(start, end);
        self.put(Vma::new(start, end, flags, anon_vma, pgoff, orders));
        self.seq += 1;
    }

    /// Inserts a VMA and merges it with compatible neighbours
    /// (`copy_vma` -> `vma_merge_new_range`, `__mmap_region`).
    pub fn insert_and_merge(&mut self, start: u64, end: u64, flags: VmFlags, anon_vma: u64, pgoff: u64, orders: u32) {
        self.insert_vma(start, end, flags, anon_vma, pgoff, orders);
        self.vma_merge(start, end);
    }

    /// Moves the VMA starting at `start` to `[new_start, new_end)`, keeping
    /// its flags and anon_vma (`vma_expand` / `vma_shrink`, and
    /// `expand_downwards`, which lowers `vm_start` and `vm_pgoff` together).
    pub fn resize_vma(&mut self, start: u64, new_start: u64, new_end: u64) {
        let v = self.take(&start).expect("a VMA starts there");
        self.unreserve(new_start, new_end);
        let pgoff = (v.pgoff + (new_start >> PAGE_SHIFT)).wrapping_sub(start >> PAGE_SHIFT);
        self.put(Vma::new(new_start, new_end, v.flags, v.anon_vma(), pgoff, v.orders));
        self.seq += 1;
    }

    /// `userfaultfd_reset_ctx()` of the VMA at `addr`: it leaves its
    /// userfaultfd (VM_UFFD_WP cleared) in place, merging with nothing.
    pub fn userfaultfd_reset_ctx(&mut self, addr: u64) {
        let Some(v) = self.lookup(addr).filter(|v| v.flags.uffd_wp).cloned() else { return };
        self.take(&v.start);
        let flags = VmFlags { uffd_wp: false, ..v.flags };
        self.put(Vma::new(v.start, v.end, flags, v.anon_vma(), v.pgoff, v.orders));
        self.seq += 1;
    }

    /// Merges the VMA at `[start, end)` with its neighbours if compatible.
    pub fn merge_at(&mut self, start: u64, end: u64) {
        if self.map.get(&start).is_some_and(|v| v.end == end) {
            self.vma_merge(start, end);
        }
    }

    /// The VMA below `addr` (ending at or before it), `vma_prev()`.
    pub fn prev_vma(&self, addr: u64) -> Option<&Arc<Vma>> {
        self.map.range(..addr).next_back().map(|(_, v)| v).filter(|v| v.end <= addr)
    }

    /// `find_vma()`: the first VMA ending above `addr`.
    pub fn find_vma(&self, addr: u64) -> Option<&Arc<Vma>> {
        self.lookup(addr).or_else(|| self.map.range(addr..).next().map(|(_, v)| v))
    }

    /// Whether a PROT_NONE reservation piece overlaps `[start, end)`.
    pub fn reserved_overlaps(&self, start: u64, end: u64) -> bool {
        self.reserved.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }

    /// `split_vma()` at `addr`, if a VMA spans it.
    pub fn split_vma(&mut self, addr: u64) {
        let Some(v) = self.lookup(addr).cloned() else { return };
        if v.start == addr {
            return;
        }
        let av = v.anon_vma();
        self.put(Vma::new(v.start, addr, v.flags, av, v.pgoff, v.orders));
        let pgoff = v.pgoff + ((addr - v.start) >> PAGE_SHIFT);
        self.put(Vma::new(addr, v.end, v.flags, av, pgoff, v.orders));
        self.seq += 1;
    }

    /// Removes `[start, end)`: returns the VMAs removed and the extent of
    /// everything unmapped (VMAs and reservation), for `free_pgtables()`.
    pub fn munmap(&mut self, start: u64, end: u64) -> (Vec<Arc<Vma>>, Option<(u64, u64)>) {
        let mut extent = self.unreserve(start, end);
        self.split_vma(start);
        self.split_vma(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        let out: Vec<_> = keys.iter().filter_map(|k| self.take(k)).collect();
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
        self.vma_modify_flags(start, end, orders, |f| advise_flags(advice, f))
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
            let v = self.take(&s).expect("split");
            self.put(Vma::new(s, e, f, v.anon_vma(), v.pgoff, orders(f)));
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
            if compatible(&prev, &cur) {
                self.take(&start);
                let av = prev.anon_vma().max(cur.anon_vma());
                self.put(Vma::new(prev.start, cur.end, cur.flags, av, prev.pgoff, cur.orders));
                start = prev.start;
                self.seq += 1;
            }
        }
        // With the next one.
        if let Some(next) = self.map.get(&end).cloned() {
            let cur = self.map[&start].clone();
            if compatible(&cur, &next) {
                self.take(&end);
                let av = cur.anon_vma().max(next.anon_vma());
                self.put(Vma::new(start, next.end, cur.flags, av, cur.pgoff, cur.orders));
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

    /// Findings 3: two adjacent 64K mmaps merge only with equal flags:
    /// VM_ACCOUNT/VM_NORESERVE and VM_NOHUGEPAGE (MAP_STACK) decide.
    #[test]
    fn adjacent_mmaps_merge_only_with_equal_flags() {
        let f = |noreserve, stack, nohugepage| {
            VmFlags::for_mmap(MmapFlags { noreserve, stack, nohugepage, ..Default::default() })
        };
        let (plain, nr, st) = (f(false, false, false), f(true, false, false), f(false, true, false));
        assert!(plain.account && !nr.account && nr.noreserve && st.nohugepage);
        let mut nh = plain;
        advise_flags(Advice::NoHugePage, &mut nh);
        for (a, b, want) in [(plain, plain, 1), (plain, nr, 2), (nr, nr, 1), (plain, st, 2), (st, st, 1), (nh, st, 1)] {
            let mut t = VmaTree::default();
            t.mmap(0x10000, 0x10000, a, o).unwrap();
            t.mmap(0x20000, 0x10000, b, o).unwrap();
            assert_eq!(t.infos().len(), want, "{a:?} | {b:?}");
        }
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
