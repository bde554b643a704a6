//! The page table: four levels of 512 entries (x86-64 with 4 KiB pages).
//!
//! Entries are atomic 64-bit words. Faults read them without a lock
//! (`ptep_get_lockless`), as the kernel does, and write them under the lock
//! that protects them: the split PTE-table lock for PTEs, the mm-wide
//! `page_table_lock` for PMDs and the upper levels.

use crate::locks::SpinLock;
use crate::stats::LockCounters;
use crate::PTRS_PER_TABLE;
use std::sync::atomic::{AtomicU64, Ordering::*};

// PTE bits.
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITE: u64 = 1 << 1;
/// Maps the shared zero page (`pte_special` with `my_zero_pfn`).
pub const PTE_ZERO: u64 = 1 << 2;
pub const PTE_PFN_SHIFT: u32 = 12;

// PMD bits. A PMD is none (0), a PTE-table pointer (low bits clear), or a
// huge mapping with `PMD_HUGE` set.
pub const PMD_HUGE: u64 = 1 << 0;
pub const PMD_HUGE_ZERO: u64 = 1 << 1;

#[inline(always)]
pub fn pte_none(pte: u64) -> bool {
    pte == 0
}
#[inline(always)]
pub fn pte_pfn(pte: u64) -> u64 {
    pte >> PTE_PFN_SHIFT
}
#[inline(always)]
pub fn mk_pte(pfn: u64, write: bool) -> u64 {
    (pfn << PTE_PFN_SHIFT) | PTE_PRESENT | if write { PTE_WRITE } else { 0 }
}
pub const ZERO_PTE: u64 = PTE_PRESENT | PTE_ZERO;

#[inline(always)]
pub fn pmd_huge(pmd: u64) -> bool {
    pmd & PMD_HUGE != 0
}
#[inline(always)]
pub fn mk_huge_pmd(pfn: u64) -> u64 {
    (pfn << PTE_PFN_SHIFT) | PMD_HUGE
}
pub const HUGE_ZERO_PMD: u64 = PMD_HUGE | PMD_HUGE_ZERO;

#[inline(always)]
pub fn pgd_index(addr: u64) -> usize {
    ((addr >> 39) & 511) as usize
}
#[inline(always)]
pub fn pud_index(addr: u64) -> usize {
    ((addr >> 30) & 511) as usize
}
#[inline(always)]
pub fn pmd_index(addr: u64) -> usize {
    ((addr >> 21) & 511) as usize
}
#[inline(always)]
pub fn pte_index(addr: u64) -> usize {
    ((addr >> 12) & 511) as usize
}

/// A PTE table and its split lock (`ptlock_ptr(page)`).
#[repr(C, align(64))]
pub struct PteTable {
    pub ptl: SpinLock,
    pub ptes: [AtomicU64; PTRS_PER_TABLE],
}

/// Where PTE tables come from: chunks of host memory on host huge pages
/// (one host fault per 2 MiB of tables instead of one per table), with
/// freed tables kept for reuse. All-zero memory is an empty, unlocked table.
struct PteArena {
    inner: std::sync::Mutex<ArenaInner>,
}

struct ArenaInner {
    chunks: Vec<(*mut u8, usize)>,
    free: Vec<*mut PteTable>,
    next: usize,
    end: usize,
}

const ARENA_CHUNK: usize = 32 << 20;

impl PteArena {
    fn new() -> PteArena {
        PteArena { inner: std::sync::Mutex::new(ArenaInner { chunks: Vec::new(), free: Vec::new(), next: 0, end: 0 }) }
    }

    fn alloc(&self) -> *mut PteTable {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = a.free.pop() {
            // SAFETY: a table we handed out before and got back; no one uses it.
            unsafe { std::ptr::write_bytes(t, 0, 1) };
            return t;
        }
        let size = std::mem::size_of::<PteTable>();
        if a.next + size > a.end {
            // SAFETY: a fresh private anonymous mapping, zero-filled.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ARENA_CHUNK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(std::alloc::Layout::new::<PteTable>());
            }
            unsafe { libc::madvise(p, ARENA_CHUNK, libc::MADV_HUGEPAGE) };
            a.chunks.push((p as *mut u8, ARENA_CHUNK));
            a.next = p as usize;
            a.end = p as usize + ARENA_CHUNK;
        }
        let t = a.next as *mut PteTable;
        a.next += size;
        t
    }

    fn free(&self, t: *mut PteTable) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).free.push(t);
    }
}

impl Drop for PteArena {
    fn drop(&mut self) {
        for &(p, len) in &self.inner.get_mut().unwrap_or_else(|p| p.into_inner()).chunks {
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}

impl PteTable {

    /// `ptep_get_lockless()`.
    #[inline(always)]
    pub fn get(&self, i: usize) -> u64 {
        self.ptes[i].load(Acquire)
    }

    /// `pte_range_none()`: every PTE of `ptes[i..i+nr]` is none.
    #[inline(always)]
    pub fn range_none(&self, i: usize, nr: usize) -> bool {
        self.ptes[i..i + nr].iter().all(|p| p.load(Relaxed) == 0)
    }

    /// The index of the first populated PTE in `[i, i+nr)`, or `i+nr`.
    #[inline(always)]
    pub fn first_set(&self, i: usize, nr: usize) -> usize {
        self.ptes[i..i + nr].iter().position(|p| p.load(Relaxed) != 0).map_or(i + nr, |k| i + k)
    }

    /// `set_ptes()`: maps `nr` consecutive pages from `pte` in one call.
    /// The caller holds the PTL. Release ordering publishes the folio (the
    /// kernel's `__folio_mark_uptodate` barrier) before the entries.
    #[inline(always)]
    pub fn set_ptes(&self, i: usize, pte: u64, nr: usize) {
        let step = if pte & PTE_ZERO != 0 { 0 } else { 1 << PTE_PFN_SHIFT };
        for (k, e) in self.ptes[i..i + nr].iter().enumerate() {
            e.store(pte + step * k as u64, Release);
        }
    }

    /// `ptep_get_and_clear()`.
    #[inline(always)]
    pub fn get_and_clear(&self, i: usize) -> u64 {
        self.ptes[i].swap(0, AcqRel)
    }
}

/// A table of the upper levels (PGD, PUD) or the PMD level: 512 words.
#[repr(C, align(64))]
pub struct Table {
    pub e: [AtomicU64; PTRS_PER_TABLE],
}

impl Table {
    fn new() -> Box<Table> {
        // SAFETY: all-zero is a valid table of none entries.
        unsafe { Box::<Table>::new_zeroed().assume_init() }
    }
}

/// The mm's page table: the PGD and the mm-wide `page_table_lock`.
pub struct PageTable {
    pgd: Box<Table>,
    arena: PteArena,
    pub page_table_lock: SpinLock,
    /// `mm->pgtables_bytes / PAGE_SIZE` for PTE tables (`nr_ptes`).
    pub nr_ptes: AtomicU64,
    /// Upper-level and PMD tables.
    pub nr_dirs: AtomicU64,
}

unsafe impl Send for PageTable {}
unsafe impl Sync for PageTable {}

impl Default for PageTable {
    fn default() -> Self {
        PageTable {
            pgd: Table::new(),
            arena: PteArena::new(),
            page_table_lock: SpinLock::new(()),
            nr_ptes: AtomicU64::new(0),
            nr_dirs: AtomicU64::new(0),
        }
    }
}

impl PageTable {
    /// Walks to the PMD entry for `addr` without allocating.
    #[inline(always)]
    pub fn pmd_offset(&self, addr: u64) -> Option<&AtomicU64> {
        let pud = self.pgd.e[pgd_index(addr)].load(Acquire);
        if pud == 0 {
            return None;
        }
        // SAFETY: non-zero upper entries point at live `Table`s; tables are
        // freed only with the mmap lock held for write, which excludes walkers.
        let pud = unsafe { &*(pud as *const Table) };
        let pmdt = pud.e[pud_index(addr)].load(Acquire);
        if pmdt == 0 {
            return None;
        }
        let pmdt = unsafe { &*(pmdt as *const Table) };
        Some(&pmdt.e[pmd_index(addr)])
    }

    /// `p4d_alloc`/`pud_alloc`/`pmd_alloc`: walks to the PMD entry,
    /// installing missing tables under `page_table_lock` (the loser of a race
    /// frees its copy).
    #[inline(always)]
    pub fn pmd_alloc(&self, addr: u64, lc: &LockCounters) -> &AtomicU64 {
        let pud = self.dir_alloc(&self.pgd.e[pgd_index(addr)], lc);
        let pmdt = self.dir_alloc(&pud.e[pud_index(addr)], lc);
        &pmdt.e[pmd_index(addr)]
    }

    #[inline(always)]
    fn dir_alloc<'a>(&'a self, slot: &'a AtomicU64, lc: &LockCounters) -> &'a Table {
        let mut v = slot.load(Acquire);
        if v == 0 {
            v = self.dir_install(slot, lc);
        }
        unsafe { &*(v as *const Table) }
    }

    #[cold]
    fn dir_install(&self, slot: &AtomicU64, lc: &LockCounters) -> u64 {
        let new = Box::into_raw(Table::new()) as u64;
        let _g = self.page_table_lock.lock(lc);
        let cur = slot.load(Acquire);
        if cur != 0 {
            drop(unsafe { Box::from_raw(new as *mut Table) });
            return cur;
        }
        slot.store(new, Release);
        self.nr_dirs.fetch_add(1, Relaxed);
        new
    }

    /// `pte_alloc()` / `pmd_install()`: makes sure the PMD points at a PTE
    /// table. Returns false if the PMD maps a huge page instead.
    #[inline]
    pub fn pte_alloc(&self, pmd: &AtomicU64, lc: &LockCounters) -> bool {
        let v = pmd.load(Acquire);
        if v != 0 {
            return !pmd_huge(v);
        }
        let new = self.arena.alloc() as u64;
        let _g = self.page_table_lock.lock(lc);
        let cur = pmd.load(Acquire);
        if cur != 0 {
            // Another CPU installed one first: free ours.
            self.arena.free(new as *mut PteTable);
            return !pmd_huge(cur);
        }
        pmd.store(new, Release);
        self.nr_ptes.fetch_add(1, Relaxed);
        true
    }

    /// Installs a fresh PTE table whose entries are given, for splitting a
    /// PMD mapping. The caller holds `page_table_lock` and the mmap lock for
    /// write (`__split_huge_pmd` under the PMD lock).
    pub fn install_split_table(&self, pmd: &AtomicU64, fill: impl Fn(usize) -> u64) {
        let t = self.arena.alloc();
        // SAFETY: a fresh table nobody else can see yet.
        for (i, e) in unsafe { &*t }.ptes.iter().enumerate() {
            e.store(fill(i), Relaxed);
        }
        pmd.store(t as u64, Release);
        self.nr_ptes.fetch_add(1, Relaxed);
    }

    /// The PTE table a (non-huge, non-none) PMD value points at.
    #[inline(always)]
    pub fn pte_table(pmdval: u64) -> &'static PteTable {
        debug_assert!(pmdval != 0 && !pmd_huge(pmdval));
        // SAFETY: see `pmd_offset`; the 'static is a lie bounded by the mmap lock.
        unsafe { &*(pmdval as *const PteTable) }
    }

    /// `free_pte_range()`: clears the PMD and frees its (empty) PTE table.
    /// The caller holds the mmap lock for write.
    pub fn free_pte_table(&self, pmd: &AtomicU64) {
        let v = pmd.swap(0, AcqRel);
        if v != 0 && !pmd_huge(v) {
            self.arena.free(v as *mut PteTable);
            self.nr_ptes.fetch_sub(1, Relaxed);
        }
    }

    /// Calls `f(pmd_start_addr, pmd_entry)` for every PMD entry that exists
    /// in `[start, end)`.
    pub fn for_each_pmd(&self, start: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64)) {
        let mut a = start & !(crate::PMD_SIZE - 1);
        while a < end {
            if let Some(p) = self.pmd_offset(a) {
                f(a, p);
            }
            a += crate::PMD_SIZE;
        }
    }

    /// Host bytes used by all tables.
    pub fn host_bytes(&self) -> u64 {
        self.nr_ptes.load(Relaxed) * std::mem::size_of::<PteTable>() as u64
            + (self.nr_dirs.load(Relaxed) + 1) * std::mem::size_of::<Table>() as u64
    }

    /// Visits every PTE table (for invariant checks).
    pub fn for_each_pte_table(&self, mut f: impl FnMut(u64, u64)) {
        for (gi, pud) in self.pgd.e.iter().enumerate() {
            let pud = pud.load(Acquire);
            if pud == 0 {
                continue;
            }
            let pud = unsafe { &*(pud as *const Table) };
            for (ui, pmdt) in pud.e.iter().enumerate() {
                let pmdt = pmdt.load(Acquire);
                if pmdt == 0 {
                    continue;
                }
                let pmdt = unsafe { &*(pmdt as *const Table) };
                for (mi, pmd) in pmdt.e.iter().enumerate() {
                    let v = pmd.load(Acquire);
                    if v != 0 {
                        let addr = ((gi as u64) << 39) | ((ui as u64) << 30) | ((mi as u64) << 21);
                        f(addr, v);
                    }
                }
            }
        }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        for pud in self.pgd.e.iter() {
            let pud = pud.load(Relaxed);
            if pud == 0 {
                continue;
            }
            let pud = unsafe { Box::from_raw(pud as *mut Table) };
            for pmdt in pud.e.iter() {
                let pmdt = pmdt.load(Relaxed);
                if pmdt == 0 {
                    continue;
                }
                // PTE tables go with the arena.
                drop(unsafe { Box::from_raw(pmdt as *mut Table) });
            }
        }
    }
}
