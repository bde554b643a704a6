//! The page table: four levels of 512 entries (x86-64 with 4 KiB pages),
//! with the entry encoding of `arch/x86/include/asm/pgtable.h` reduced to
//! what the model needs, and the table walk and allocation of
//! `mm/memory.c` (`__pte_alloc`, `pmd_install`) and `mm/pgtable-generic.c`.
//!
//! Entries are atomic 64-bit words. Faults read them without a lock
//! (`ptep_get_lockless`), as the kernel does, and write them under the lock
//! that protects them: the split PTE-table lock for PTEs, the mm-wide
//! `page_table_lock` for PMDs and the upper levels. A PTE table is freed
//! only under the mmap lock held for write, so a walker holding it for read
//! may use a table it found for as long as it holds it.

use crate::mm::spinlock::SpinLock;
use crate::mm::vmstat::LockCounters;
use crate::sync::AtomicU64;
use crate::{PMD_SIZE, PTRS_PER_TABLE};
use crossbeam_utils::CachePadded;
use std::sync::atomic::Ordering::*;

// ---------------------------------------------------------------------------
// Entry encoding. A PTE is none (0) or present: `pfn << 12 | bits`.

pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITE: u64 = 1 << 1;
/// Maps the shared zero page (`pte_special` with `my_zero_pfn`).
pub const PTE_ZERO: u64 = 1 << 2;
/// The order of the folio the page belongs to, in software bits of the
/// entry (not the kernel's: it finds the folio through `struct page`), so
/// that zap finds the folio head without a `compound_head` walk.
pub const PTE_ORDER_SHIFT: u32 = 3;
pub const PTE_PFN_SHIFT: u32 = 12;
pub const ZERO_PTE: u64 = PTE_PRESENT | PTE_ZERO;
/// x86's `_PAGE_PROTNONE`: a PTE of a PROT_NONE VMA keeps its pfn (the page
/// stays mapped and counted) but is not present to the MMU.
pub const PTE_PROTNONE: u64 = 1 << 7;

// A PMD is none (0), a PTE-table pointer (low bits clear), or a huge
// mapping with `PMD_HUGE` set.
pub const PMD_HUGE: u64 = 1 << 0;
pub const PMD_HUGE_ZERO: u64 = 1 << 1;
pub const HUGE_ZERO_PMD: u64 = PMD_HUGE | PMD_HUGE_ZERO;
/// A huge PMD without `_PAGE_RW` (a read-only VMA's THP).
pub const PMD_RDONLY: u64 = 1 << 2;
/// A huge PMD of a PROT_NONE VMA (`_PAGE_PROTNONE`): mapped, not accessible.
pub const PMD_PROTNONE: u64 = 1 << 3;
/// The protection bits of a huge PMD.
pub const PMD_PROT_MASK: u64 = PMD_RDONLY | PMD_PROTNONE;
/// The protection bits of a PTE.
pub const PTE_PROT_MASK: u64 = PTE_PRESENT | PTE_WRITE | PTE_PROTNONE;

/// `pmd_none()` is 0; the huge zero page, whatever its protection.
#[inline(always)]
pub fn is_huge_zero_pmd(pmd: u64) -> bool {
    pmd & PMD_HUGE_ZERO != 0
}

/// `pte_present()` as the MMU sees it (a PROT_NONE entry is not).
#[inline(always)]
pub fn pte_present(pte: u64) -> bool {
    pte & PTE_PRESENT != 0
}

/// The PTE protection bits the pages of a split huge PMD get
/// (`__split_huge_pmd_locked` copies write and protnone).
#[inline(always)]
pub fn pte_prot_of_pmd(pmd: u64) -> u64 {
    if pmd & PMD_PROTNONE != 0 {
        PTE_PROTNONE
    } else if pmd & PMD_RDONLY != 0 || is_huge_zero_pmd(pmd) {
        PTE_PRESENT
    } else {
        PTE_PRESENT | PTE_WRITE
    }
}

#[inline(always)]
pub fn pte_none(pte: u64) -> bool {
    pte == 0
}
#[inline(always)]
pub fn pte_pfn(pte: u64) -> u64 {
    pte >> PTE_PFN_SHIFT
}
#[inline(always)]
pub fn pte_write(pte: u64) -> bool {
    pte & PTE_WRITE != 0
}
/// The order of the folio a present, non-zero-page PTE maps a page of.
#[inline(always)]
pub fn pte_order(pte: u64) -> usize {
    ((pte >> PTE_ORDER_SHIFT) & 0xf) as usize
}
#[inline(always)]
pub fn mk_pte(pfn: u64, write: bool) -> u64 {
    (pfn << PTE_PFN_SHIFT) | PTE_PRESENT | if write { PTE_WRITE } else { 0 }
}
/// `folio_mk_pte()` + `pte_mkwrite(pte_mkdirty())` for the first page of a folio.
#[inline(always)]
pub fn folio_mk_pte(pfn: u64, order: usize) -> u64 {
    mk_pte(pfn, true) | (order as u64) << PTE_ORDER_SHIFT
}
#[inline(always)]
pub fn pmd_huge(pmd: u64) -> bool {
    pmd & PMD_HUGE != 0
}
#[inline(always)]
pub fn mk_huge_pmd(pfn: u64) -> u64 {
    (pfn << PTE_PFN_SHIFT) | PMD_HUGE
}

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

// ---------------------------------------------------------------------------
// Tables.

/// A PTE table and its split lock (`ptlock_ptr(ptdesc)`). The lock has
/// cache lines of its own, as the kernel's lives in the `ptdesc`, not in the
/// table that other CPUs read without it.
#[repr(C)]
pub struct PteTable {
    pub ptl: CachePadded<SpinLock>,
    pub ptes: [AtomicU64; PTRS_PER_TABLE],
}

impl PteTable {
    #[cfg(loom)]
    fn boxed() -> Box<PteTable> {
        Box::new(PteTable {
            ptl: CachePadded::new(SpinLock::new(())),
            ptes: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// `ptep_get_lockless()`.
    #[inline(always)]
    pub fn get(&self, i: usize) -> u64 {
        self.ptes[i].load(Acquire)
    }

    /// `pte_range_none()`: every PTE of `ptes[i..i+nr]` is none.
    #[inline(always)]
    pub fn pte_range_none(&self, i: usize, nr: usize) -> bool {
        self.ptes[i..i + nr].iter().all(|p| p.load(Relaxed) == 0)
    }

    /// The index of the first populated PTE in `[i, i+nr)`, or `i+nr`
    /// (v1's scan; not a kernel helper).
    #[inline(always)]
    pub fn first_set(&self, i: usize, nr: usize) -> usize {
        self.ptes[i..i + nr].iter().position(|p| p.load(Relaxed) != 0).map_or(i + nr, |k| i + k)
    }

    /// `set_ptes()`: maps `nr` consecutive pages from `pte` in one call.
    /// The caller holds the PTL. Release ordering publishes the folio (the
    /// kernel's `__folio_mark_uptodate` barrier) before the entries.
    #[inline(always)]
    pub fn set_ptes(&self, i: usize, pte: u64, nr: usize) {
        crate::drive::vtime::step_n(crate::drive::vtime::Step::SetPte, nr as u64);
        if nr == 1 {
            self.ptes[i].store(pte, Release);
            return;
        }
        let step = if pte & PTE_ZERO != 0 { 0 } else { 1 << PTE_PFN_SHIFT };
        for (k, e) in self.ptes[i..i + nr].iter().enumerate() {
            e.store(pte + step * k as u64, Release);
        }
    }

    /// `ptep_get_and_clear()`.
    #[inline(always)]
    pub fn ptep_get_and_clear(&self, i: usize) -> u64 {
        self.ptes[i].swap(0, AcqRel)
    }
}

/// Where PTE tables come from: chunks of host memory on host huge pages
/// (one host fault per 2 MiB of tables instead of one per table), with
/// freed tables kept for reuse. All-zero memory is an empty, unlocked table.
/// Under loom, whose atomics are not plain memory, tables are boxed.
struct PteArena {
    inner: std::sync::Mutex<ArenaInner>,
}

#[cfg_attr(loom, allow(dead_code))]
struct ArenaInner {
    chunks: Vec<(*mut u8, usize)>,
    free: Vec<*mut PteTable>,
    next: usize,
    end: usize,
}

#[cfg_attr(loom, allow(dead_code))]
const ARENA_CHUNK: usize = 32 << 20;

impl PteArena {
    fn new() -> PteArena {
        PteArena { inner: std::sync::Mutex::new(ArenaInner { chunks: Vec::new(), free: Vec::new(), next: 0, end: 0 }) }
    }

    /// A zeroed (empty, unlocked) table that no one else can see.
    #[cfg(not(loom))]
    fn alloc(&self) -> *mut PteTable {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = a.free.pop() {
            // SAFETY: a table this arena handed out and got back through
            // `free`, whose caller had unlinked it from every PMD under the
            // mmap write lock: no one refers to it. All-zero bytes are a
            // valid table (atomics and a lock word of 0, no padding invariant).
            unsafe { std::ptr::write_bytes(t, 0, 1) };
            return t;
        }
        let size = std::mem::size_of::<PteTable>();
        let align = std::mem::align_of::<PteTable>();
        a.next = a.next.next_multiple_of(align);
        if a.next + size > a.end {
            // SAFETY: mmap of fresh private anonymous memory has no
            // preconditions; the result is checked below.
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
            // SAFETY: advice on the mapping just made; failure is harmless.
            unsafe { libc::madvise(p, ARENA_CHUNK, libc::MADV_HUGEPAGE) };
            a.chunks.push((p as *mut u8, ARENA_CHUNK));
            a.next = p as usize;
            a.end = p as usize + ARENA_CHUNK;
        }
        // The chunk is page aligned and `next` is kept aligned to the table,
        // and the host zero-fills it: an empty table.
        let t = a.next as *mut PteTable;
        a.next += size;
        t
    }

    #[cfg(loom)]
    fn alloc(&self) -> *mut PteTable {
        Box::into_raw(PteTable::boxed())
    }

    /// Takes back a table that no PMD points at any more.
    fn free(&self, t: *mut PteTable) {
        #[cfg(not(loom))]
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).free.push(t);
        #[cfg(loom)]
        // SAFETY: `t` came from `Box::into_raw` in `alloc` and is unlinked.
        drop(unsafe { Box::from_raw(t) });
    }
}

impl Drop for PteArena {
    fn drop(&mut self) {
        for &(p, len) in &self.inner.get_mut().unwrap_or_else(|p| p.into_inner()).chunks {
            // SAFETY: each chunk is a mapping this arena made; the page
            // table that owns the arena is being dropped, so no table in it
            // is reachable.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}

/// A table of the upper levels (PGD, PUD) or the PMD level: 512 words.
#[repr(C, align(64))]
pub struct Table {
    pub e: [AtomicU64; PTRS_PER_TABLE],
}

impl Table {
    fn new() -> Box<Table> {
        #[cfg(not(loom))]
        // SAFETY: all-zero bytes are a valid table of none entries.
        return unsafe { Box::<Table>::new_zeroed().assume_init() };
        #[cfg(loom)]
        return Box::new(Table { e: std::array::from_fn(|_| AtomicU64::new(0)) });
    }
}

/// The mm's page table: the PGD and the mm-wide `page_table_lock`.
pub struct PageTable {
    pgd: Box<Table>,
    arena: PteArena,
    pub page_table_lock: CachePadded<SpinLock>,
    /// `mm->pgtables_bytes / PAGE_SIZE` for PTE tables (`nr_ptes`). The
    /// counters have cache lines of their own: table installs write them,
    /// while every walk reads `pgd`.
    pub nr_ptes: CachePadded<std::sync::atomic::AtomicU64>,
    /// Upper-level and PMD tables.
    pub nr_dirs: CachePadded<std::sync::atomic::AtomicU64>,
}

// SAFETY: the raw pointers (in entries, as integers, and in the arena) name
// tables this page table owns; entries change only through atomics under the
// locks described at the top of this file, and tables are freed only when no
// walker can hold them (mmap write lock) or on drop.
unsafe impl Send for PageTable {}
// SAFETY: as above.
unsafe impl Sync for PageTable {}

impl Default for PageTable {
    fn default() -> Self {
        PageTable {
            pgd: Table::new(),
            arena: PteArena::new(),
            page_table_lock: CachePadded::new(SpinLock::new(())),
            nr_ptes: Default::default(),
            nr_dirs: Default::default(),
        }
    }
}

/// An upper-level table a non-zero entry points at.
///
/// # Safety
/// `v` must be a non-zero PGD or PUD entry of a live page table: upper
/// tables are freed only when the page table is dropped.
#[inline(always)]
unsafe fn dir<'a>(v: u64) -> &'a Table {
    // SAFETY: by the caller's contract `v` is the address of a live `Table`.
    unsafe { &*(v as *const Table) }
}

impl PageTable {
    /// Walks to the PMD entry for `addr` without allocating.
    #[inline(always)]
    pub fn pmd_offset(&self, addr: u64) -> Option<&AtomicU64> {
        let pud = self.pgd.e[pgd_index(addr)].load(Acquire);
        if pud == 0 {
            return None;
        }
        // SAFETY: a non-zero PGD entry of this live table (see `dir`).
        let pmdt = unsafe { dir(pud) }.e[pud_index(addr)].load(Acquire);
        if pmdt == 0 {
            return None;
        }
        // SAFETY: a non-zero PUD entry of this live table.
        Some(&unsafe { dir(pmdt) }.e[pmd_index(addr)])
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
        // SAFETY: `slot` is an upper entry of this table, now non-zero.
        unsafe { dir(v) }
    }

    #[cold]
    fn dir_install(&self, slot: &AtomicU64, lc: &LockCounters) -> u64 {
        let new = Box::into_raw(Table::new()) as u64;
        let _g = self.page_table_lock.lock(lc);
        let cur = slot.load(Acquire);
        if cur != 0 {
            // SAFETY: `new` came from Box::into_raw above and was never published.
            drop(unsafe { Box::from_raw(new as *mut Table) });
            return cur;
        }
        slot.store(new, Release);
        self.nr_dirs.fetch_add(1, Relaxed);
        new
    }

    /// `pte_alloc()` / `pmd_install()` for a PMD that was none: installs a
    /// PTE table. Returns whether the PMD now points at a table (false: a
    /// huge page appeared), and whether the table is ours (false: another
    /// CPU installed one first and ours was freed).
    #[inline]
    pub fn pte_alloc(&self, pmd: &AtomicU64, lc: &LockCounters) -> (bool, bool) {
        let new = self.arena.alloc() as u64;
        let _g = self.page_table_lock.lock(lc);
        let cur = pmd.load(Acquire);
        if cur != 0 {
            // Another CPU installed one first: free ours.
            self.arena.free(new as *mut PteTable);
            return (!pmd_huge(cur), false);
        }
        pmd.store(new, Release);
        self.nr_ptes.fetch_add(1, Relaxed);
        crate::drive::vtime::step(crate::drive::vtime::Step::PteAlloc);
        (true, true)
    }

    /// Installs a fresh PTE table whose entries are given, for splitting a
    /// PMD mapping (`__split_huge_pmd_locked`). The caller holds
    /// `page_table_lock`.
    pub fn install_split_table(&self, pmd: &AtomicU64, fill: impl Fn(usize) -> u64) {
        let t = self.arena.alloc();
        // SAFETY: a fresh table nobody else can see until the store below.
        for (i, e) in unsafe { &*t }.ptes.iter().enumerate() {
            e.store(fill(i), Relaxed);
        }
        pmd.store(t as u64, Release);
        self.nr_ptes.fetch_add(1, Relaxed);
    }

    /// The PTE table a PMD value points at.
    ///
    /// # Safety
    /// `pmdval` must have been loaded from a PMD entry of a live page table,
    /// be neither none nor huge, and the caller must hold that mm's mmap lock
    /// (for read or write) from that load until it stops using the table:
    /// tables are freed only under the write lock.
    #[inline(always)]
    pub unsafe fn pte_table<'a>(pmdval: u64) -> &'a PteTable {
        debug_assert!(pmdval != 0 && !pmd_huge(pmdval));
        // SAFETY: by the contract, `pmdval` is the address of a live table.
        unsafe { &*(pmdval as *const PteTable) }
    }

    /// `free_pte_range()`: clears the PMD and frees its (empty) PTE table.
    /// The caller holds the mmap lock for write, so no walker holds it.
    /// Returns whether a table was freed.
    pub(crate) fn free_pte_table(&self, pmd: &AtomicU64) -> bool {
        let v = pmd.swap(0, AcqRel);
        if v != 0 && !pmd_huge(v) {
            self.arena.free(v as *mut PteTable);
            self.nr_ptes.fetch_sub(1, Relaxed);
            return true;
        }
        false
    }

    /// Calls `f(pmd_start_addr, pmd_entry)` for every PMD entry that exists
    /// in `[start, end)`.
    pub fn for_each_pmd(&self, start: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64)) {
        let mut a = start & !(PMD_SIZE - 1);
        while a < end {
            if let Some(p) = self.pmd_offset(a) {
                f(a, p);
            }
            a += PMD_SIZE;
        }
    }

    /// Host bytes used by all tables.
    pub fn host_bytes(&self) -> u64 {
        self.nr_ptes.load(Relaxed) * std::mem::size_of::<PteTable>() as u64
            + (self.nr_dirs.load(Relaxed) + 1) * std::mem::size_of::<Table>() as u64
    }

    /// Visits every non-none PMD entry (for invariant checks), with the
    /// address it maps and its value.
    pub fn for_each_pmd_entry(&self, mut f: impl FnMut(u64, u64)) {
        for (gi, pud) in self.pgd.e.iter().enumerate() {
            let pud = pud.load(Acquire);
            if pud == 0 {
                continue;
            }
            // SAFETY: a non-zero PGD entry of this live table.
            for (ui, pmdt) in unsafe { dir(pud) }.e.iter().enumerate() {
                let pmdt = pmdt.load(Acquire);
                if pmdt == 0 {
                    continue;
                }
                // SAFETY: a non-zero PUD entry of this live table.
                for (mi, pmd) in unsafe { dir(pmdt) }.e.iter().enumerate() {
                    let v = pmd.load(Acquire);
                    if v != 0 {
                        f(((gi as u64) << 39) | ((ui as u64) << 30) | ((mi as u64) << 21), v);
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
            // SAFETY: upper tables come from Box::into_raw in `dir_install`
            // and are dropped only here, once, with `&mut self`.
            let pud = unsafe { Box::from_raw(pud as *mut Table) };
            for pmdt in pud.e.iter() {
                let pmdt = pmdt.load(Relaxed);
                if pmdt == 0 {
                    continue;
                }
                #[cfg(loom)]
                // SAFETY: a non-zero PUD entry of this table, not yet freed.
                for pmd in unsafe { dir(pmdt) }.e.iter() {
                    let v = pmd.load(Relaxed);
                    if v != 0 && !pmd_huge(v) {
                        // SAFETY: PTE tables linked from a PMD table were
                        // boxed by the loom arena, and are freed only here or
                        // when unlinked.
                        drop(unsafe { Box::from_raw(v as *mut PteTable) });
                    }
                }
                // PTE tables otherwise go with the arena.
                // SAFETY: as for the PUD table above.
                drop(unsafe { Box::from_raw(pmdt as *mut Table) });
            }
        }
    }
}
