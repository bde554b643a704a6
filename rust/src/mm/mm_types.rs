//! `struct page` as the model keeps it (`include/linux/mm_types.h`,
//! `page-flags.h`): 8 bytes a frame, and the folio fields the fault path
//! reads and writes through a folio's head page.

use crate::sync::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;

// `Page::info` layout.
/// The folio's mapcount: pages of it mapped by page-table entries.
pub const MAPCOUNT_MASK: u32 = (1 << 20) - 1;
pub const ORDER_SHIFT: u32 = 20;
pub const ORDER_MASK: u32 = 0xf << ORDER_SHIFT;
/// Head page of an allocated folio (`PG_head`; order 0 folios too, here).
pub const PG_HEAD: u32 = 1 << 24;
/// Head of a free block on a buddy free list (`PageBuddy`).
pub const PG_BUDDY: u32 = 1 << 25;
/// Head of a block on a per-CPU list.
pub const PG_PCP: u32 = 1 << 26;
/// Large folio queued for deferred split because it is partially mapped
/// (`PG_partially_mapped`).
pub const PG_PARTIALLY_MAPPED: u32 = 1 << 27;
/// Large folio mapped by a PMD (the kernel counts this in `_entire_mapcount`).
pub const PG_PMD_MAPPED: u32 = 1 << 28;
/// Pinned by injected fragmentation: never freed (not a kernel flag).
pub const PG_PINNED: u32 = 1 << 29;
/// The page holds data other than zeroes: the user write whose fault mapped
/// it stored into it (not a kernel flag: the kernel reads the page itself,
/// `pages_identical()` with the zero page, when a split looks for pages it
/// can map to the shared zero page). Kept on every page, heads and tails;
/// stores after the fault are marked in `PageAlloc::written`, and a page
/// holds data if either says so.
pub const PG_NONZERO: u32 = 1 << 30;

/// The per-frame `struct page`, 8 bytes. For a folio head, `count` is the
/// refcount (`_refcount`) and `info` holds the order, flags and the folio's
/// mapcount. For a free block head, `count` is its index in its free list.
/// Tails are unused.
///
/// Folio fields change under the lock of the page table that maps the folio
/// (a folio never crosses a PTE table), so plain loads and stores suffice.
#[repr(C)]
#[derive(Default)]
pub struct Page {
    pub count: AtomicU32,
    pub info: AtomicU32,
}

impl Page {
    #[inline(always)]
    pub fn info(&self) -> u32 {
        self.info.load(Relaxed)
    }
    #[inline(always)]
    pub fn set_info(&self, v: u32) {
        self.info.store(v, Relaxed)
    }
    /// `folio_order()`.
    #[inline(always)]
    pub fn order(&self) -> usize {
        ((self.info() & ORDER_MASK) >> ORDER_SHIFT) as usize
    }
    /// `folio_mapcount()`.
    #[inline(always)]
    pub fn mapcount(&self) -> u32 {
        self.info() & MAPCOUNT_MASK
    }
    /// `folio_ref_count()`.
    #[inline(always)]
    pub fn folio_ref_count(&self) -> u32 {
        self.count.load(Relaxed)
    }
    /// `folio_set_count()`: a new folio's references.
    #[inline(always)]
    pub fn folio_set_count(&self, n: u32) {
        self.count.store(n, Relaxed)
    }
    /// `folio_ref_add()`.
    #[inline(always)]
    pub fn folio_ref_add(&self, n: u32) {
        self.count.store(self.count.load(Relaxed) + n, Relaxed)
    }
    /// `folio_ref_sub_and_test()`: drops `n` references; true when none are left.
    #[inline(always)]
    pub fn folio_ref_sub_and_test(&self, n: u32) -> bool {
        let left = self.count.load(Relaxed) - n;
        self.count.store(left, Relaxed);
        left == 0
    }
    /// Whether the store of the fault that mapped this page reached it
    /// ([`PG_NONZERO`]); later stores are `PageAlloc::written`.
    #[inline(always)]
    pub fn nonzero(&self) -> bool {
        self.info() & PG_NONZERO != 0
    }
    /// Marks this page the head of a new folio of `order`, mapped by `nr`
    /// entries: what `folio_add_new_anon_rmap()` leaves in the mapcount.
    #[inline(always)]
    pub fn init_folio(&self, order: usize, flags: u32, mapcount: u32) {
        self.set_info(PG_HEAD | flags | (order as u32) << ORDER_SHIFT | mapcount);
    }
}
