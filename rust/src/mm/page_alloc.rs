//! Physical memory (`mm/page_alloc.c`): the memory map (`struct page` per
//! frame), a buddy allocator with per-order free lists under `zone->lock`,
//! and per-CPU page lists for the orders the kernel keeps there
//! (`pcp_allowed_order()`: orders <= PAGE_ALLOC_COSTLY_ORDER and the PMD
//! order).
//!
//! Memory costs the host nothing until used: the memory map is a
//! `MAP_NORESERVE` mapping the host fills on first touch, and frames above
//! the zone's `frontier` have never been handed out, so they need no free
//! list entries (they are free `MAX_PAGE_ORDER` blocks, implicitly).

use crate::error::{Error, Result};
use crate::mm::mm_types::*;
use crate::mm::spinlock::SpinLock;
use crate::mm::vmstat::LockCounters;
use crate::{MAX_PAGE_ORDER, PMD_ORDER};
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub const PAGE_ALLOC_COSTLY_ORDER: usize = 3;
/// Pages moved between the zone and a per-CPU list at a time.
pub const PCP_BATCH: u64 = 63;
/// A per-CPU list holding more pages than this is drained by a batch.
pub const PCP_HIGH: u64 = 2 * (PCP_BATCH << PCP_BATCH_SCALE_MAX);
/// `CONFIG_PCP_BATCH_SCALE_MAX`: a CPU that keeps allocating refills up to
/// `PCP_BATCH << 5` order-0 pages at a time (`nr_pcp_alloc()`, 6.7+).
pub const PCP_BATCH_SCALE_MAX: u32 = 5;

/// `pcp_allowed_order()`.
#[inline(always)]
pub fn pcp_allowed_order(order: usize) -> bool {
    order <= PAGE_ALLOC_COSTLY_ORDER || order == PMD_ORDER
}

#[inline(always)]
fn pcp_index(order: usize) -> usize {
    if order == PMD_ORDER {
        PAGE_ALLOC_COSTLY_ORDER + 1
    } else {
        order
    }
}

pub const NR_PCP_LISTS: usize = PAGE_ALLOC_COSTLY_ORDER + 2;

/// What a [`FrameArray`] may hold. Outside loom: types for which all-zero
/// bytes are a valid value, since the array is fresh anonymous memory that
/// the host zero-fills as it is first touched. Under loom, whose atomics are
/// not plain memory, anything with a default.
#[cfg(not(loom))]
/// # Safety
/// Every all-zero bit pattern must be a valid `Self`.
unsafe trait FrameElem {}
#[cfg(loom)]
trait FrameElem: Default {}

// SAFETY: `Page` is two atomics (outside loom), and an all-zero atomic is a
// valid atomic holding 0.
#[cfg(not(loom))]
unsafe impl FrameElem for Page {}
#[cfg(loom)]
impl FrameElem for Page {}
// SAFETY: an all-zero `AtomicU64` is a valid one holding 0.
#[cfg(not(loom))]
unsafe impl FrameElem for AtomicU64 {}
#[cfg(loom)]
impl FrameElem for AtomicU64 {}

/// A fixed array of `len` elements, backed lazily by the host (reserved,
/// not committed: a 4 TiB machine's memory map costs nothing until its
/// frames are used). The memory map and the written-frames bitmap.
struct FrameArray<T: FrameElem> {
    #[cfg(not(loom))]
    base: *mut T,
    #[cfg(loom)]
    items: Box<[T]>,
    len: usize,
}

// SAFETY: the array is a fixed array of atomics owned by the allocator;
// the raw pointer is its base, valid for `len` elements until drop.
unsafe impl<T: FrameElem + Send> Send for FrameArray<T> {}
// SAFETY: as above; every access goes through the elements' atomics.
unsafe impl<T: FrameElem + Sync> Sync for FrameArray<T> {}

impl<T: FrameElem> FrameArray<T> {
    #[cfg(not(loom))]
    fn new(len: usize, what: &str) -> Result<FrameArray<T>> {
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: mmap of fresh private anonymous memory has no
        // preconditions; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        // No MADV_HUGEPAGE here: host huge pages for the map made runs
        // erratic (compaction stalls) and slower at the median.
        if p == libc::MAP_FAILED {
            return Err(Error::Config(format!(
                "cannot reserve {what} for {len} simulated pages ({bytes} bytes of host address space)"
            )));
        }
        Ok(FrameArray { base: p as *mut T, len })
    }

    #[cfg(loom)]
    fn new(len: usize, _what: &str) -> Result<FrameArray<T>> {
        Ok(FrameArray { items: (0..len).map(|_| T::default()).collect(), len })
    }

    #[inline(always)]
    fn get(&self, i: usize) -> &T {
        assert!(i < self.len, "pfn {i:#x} is outside the memory map");
        #[cfg(not(loom))]
        // SAFETY: `i < len`, the mapping holds `len` elements, and
        // zero-filled memory is a valid `T` (`FrameElem`).
        return unsafe { &*self.base.add(i) };
        #[cfg(loom)]
        return &self.items[i];
    }

    /// The `nr` elements from `i` on: one bounds check for a whole folio.
    #[inline(always)]
    fn range(&self, i: usize, nr: usize) -> &[T] {
        assert!(i <= self.len && nr <= self.len - i, "pfns {i:#x}+{nr} are outside the memory map");
        #[cfg(not(loom))]
        // SAFETY: `i + nr <= len`, the mapping holds `len` contiguous
        // elements, and zero-filled memory is a valid `T`.
        return unsafe { std::slice::from_raw_parts(self.base.add(i), nr) };
        #[cfg(loom)]
        return &self.items[i..i + nr];
    }
}

#[cfg(not(loom))]
impl<T: FrameElem> Drop for FrameArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no reference into it outlives
        // the allocator that owns the array.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, (self.len * std::mem::size_of::<T>()).max(1));
        }
    }
}

struct Zone {
    /// Free block heads per order.
    free: [Vec<u32>; MAX_PAGE_ORDER + 1],
    /// Frames at and above this have never been allocated.
    frontier: u64,
    /// Free pages on the lists (not counting above the frontier).
    nr_free: u64,
    rng: u64,
}

/// Per-CPU page lists (`struct per_cpu_pages`), owned by one simulated CPU.
#[derive(Default)]
pub struct PerCpuPages {
    lists: [Vec<u32>; NR_PCP_LISTS],
    /// Pages (not blocks) on the lists.
    pub count: u64,
}

/// Allocator figures that every CPU shares.
#[derive(Default)]
pub struct AllocShared {
    pub pinned: AtomicU64,
}

pub struct PageAlloc {
    /// The memory map: one [`Page`] per frame.
    map: FrameArray<Page>,
    /// `zone->lock` and the free lists, on cache lines of their own (no
    /// false sharing with `map`, which every fault reads).
    zone: CachePadded<SpinLock<Zone>>,
    /// `zone.frontier`, readable without the lock (host memory figures).
    frontier: AtomicU64,
    pub phys_pages: u64,
    fragmentation: f64,
    pub shared: AllocShared,
    /// One bit a frame: a user store reached the page after the fault that
    /// mapped it (the fault's own store is `PG_NONZERO` in its `struct
    /// page`). A bitmap, not a page flag, so that the MMU's first store to
    /// each page of a large folio touches one word per 64 pages that stays
    /// in the cache, not each `struct page` (1024 interleaved CPUs missed
    /// the cache on most of those). Clear for every free frame. Not a
    /// kernel structure: the kernel reads the page's contents.
    written: FrameArray<AtomicU64>,
}

#[inline(always)]
fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

/// A uniform float in [0, 1) from a xorshift state.
#[inline(always)]
pub fn rand_unit(s: &mut u64) -> f64 {
    (xorshift(s) >> 11) as f64 / (1u64 << 53) as f64
}

impl PageAlloc {
    pub fn new(phys_bytes: u64, fragmentation: f64, seed: u64) -> Result<PageAlloc> {
        let block = crate::PAGE_SIZE << MAX_PAGE_ORDER;
        let phys_pages = (phys_bytes / block) * (1 << MAX_PAGE_ORDER);
        if phys_pages == 0 {
            return Err(Error::Config(format!("physical memory {phys_bytes} is smaller than one {block}-byte block")));
        }
        if phys_pages > u32::MAX as u64 {
            return Err(Error::Config(format!(
                "physical memory {phys_bytes} is above the 16 TiB this simulator can address"
            )));
        }
        if !(0.0..=1.0).contains(&fragmentation) {
            return Err(Error::Config(format!("fragmentation {fragmentation} is outside 0..1")));
        }
        Ok(PageAlloc {
            map: FrameArray::new(phys_pages as usize, "a memory map")?,
            frontier: AtomicU64::new(0),
            zone: CachePadded::new(SpinLock::new(Zone {
                free: Default::default(),
                frontier: 0,
                nr_free: 0,
                rng: seed ^ 0x9e37_79b9_7f4a_7c15 | 1,
            })),
            phys_pages,
            fragmentation,
            shared: AllocShared::default(),
            written: FrameArray::new(phys_pages.div_ceil(64) as usize, "a bitmap of written frames")?,
        })
    }

    /// The address `zone->lock` is known by in virtual time.
    pub(crate) fn zone_lock_addr(&self) -> usize {
        crate::drive::vtime::lock_addr(&*self.zone)
    }

    /// `pfn_to_page()`. Panics for a frame outside the memory map.
    #[inline(always)]
    pub fn page(&self, pfn: u64) -> &Page {
        self.map.get(pfn as usize)
    }

    /// The MMU's store into the page at `pfn` (see `written`): one load of
    /// a word, and an atomic or at the page's first store only.
    #[inline(always)]
    pub fn mark_written(&self, pfn: u64) {
        let w = self.written.get((pfn >> 6) as usize);
        let bit = 1u64 << (pfn & 63);
        if w.load(Relaxed) & bit == 0 {
            w.fetch_or(bit, Relaxed);
        }
    }

    /// Whether a user store reached the page at `pfn` after its fault.
    #[inline(always)]
    pub fn written(&self, pfn: u64) -> bool {
        self.written.get((pfn >> 6) as usize).load(Relaxed) & (1 << (pfn & 63)) != 0
    }

    /// Clears the written bits of a block being freed. Whole words belong
    /// to the block alone (blocks are aligned to their size) and nothing
    /// maps it any more, so a plain store is enough; a smaller block shares
    /// its word with frames other CPUs may be storing into.
    #[inline(always)]
    fn clear_written(&self, pfn: u64, order: usize) {
        let nr = 1u64 << order;
        if nr >= 64 {
            for w in self.written.range((pfn >> 6) as usize, (nr >> 6) as usize) {
                if w.load(Relaxed) != 0 {
                    w.store(0, Relaxed);
                }
            }
        } else {
            let w = self.written.get((pfn >> 6) as usize);
            let mask = ((1u64 << nr) - 1) << (pfn & 63);
            if w.load(Relaxed) & mask != 0 {
                w.fetch_and(!mask, Relaxed);
            }
        }
    }

    /// The `struct page`s of the `nr` frames from `pfn` (a folio's).
    #[inline(always)]
    pub fn folio_pages(&self, pfn: u64, nr: usize) -> &[Page] {
        self.map.range(pfn as usize, nr)
    }

    /// `rmqueue()`: a block of `2^order` pages for a CPU, from its per-CPU
    /// list when the order has one (`rmqueue_pcplist`), else from the buddy
    /// lists under `zone->lock` (`rmqueue_buddy`). `None` when memory is
    /// exhausted. Only the per-CPU pop is inline: it is every fault's.
    #[inline(always)]
    pub fn rmqueue(&self, pcp: &mut PerCpuPages, order: usize, zl: &LockCounters) -> Option<u64> {
        if pcp_allowed_order(order) {
            let i = pcp_index(order);
            if let Some(pfn) = pcp.lists[i].pop() {
                crate::drive::vtime::step(crate::drive::vtime::Step::PcpAlloc);
                pcp.count -= 1 << order;
                return Some(pfn as u64);
            }
            self.rmqueue_bulk(pcp, order, zl)
        } else {
            self.rmqueue_buddy(order, zl)
        }
    }

    /// `rmqueue_bulk()`: refills the empty per-CPU list of `order` with a
    /// batch under the zone lock, then takes one block from it.
    #[inline(never)]
    fn rmqueue_bulk(&self, pcp: &mut PerCpuPages, order: usize, zl: &LockCounters) -> Option<u64> {
        let i = pcp_index(order);
        let n = if order == 0 { PCP_BATCH << PCP_BATCH_SCALE_MAX } else { (PCP_BATCH >> order).max(2) };
        let mut z = self.zone.lock(zl);
        let list = &mut pcp.lists[i];
        let mut got = 0u64;
        while got < n {
            if (order..=MAX_PAGE_ORDER).all(|o| z.free[o].is_empty()) && !self.carve(&mut z) {
                break;
            }
            // A whole free block that fits in the batch is split into
            // `order` pieces at once: the same pages __rmqueue_smallest()
            // would hand out one by one, without the intermediate lists.
            if let Some(o) = (order + 1..=MAX_PAGE_ORDER)
                .find(|&o| !z.free[o].is_empty())
                .filter(|&o| z.free[order].is_empty() && (1u64 << (o - order)) <= n - got)
            {
                let head = z.free[o].pop().expect("non-empty") as u64;
                self.page(head).set_info(0);
                z.nr_free -= 1 << o;
                // Ascending pfns come off the end of the list first.
                let step = 1u64 << order;
                list.extend((0..(1u64 << (o - order))).rev().map(|k| (head + k * step) as u32));
                got += 1 << (o - order);
                continue;
            }
            match self.__rmqueue_smallest(&mut z, order) {
                Some(pfn) => {
                    list.push(pfn as u32);
                    got += 1;
                }
                None => break,
            }
        }
        pcp.count += got << order;
        crate::drive::vtime::step_n(crate::drive::vtime::Step::RmqueueBulk, got);
        drop(z);
        let pfn = pcp.lists[i].pop()?;
        pcp.count -= 1 << order;
        Some(pfn as u64)
    }

    /// `rmqueue_buddy()`: an order without a per-CPU list, from the buddy
    /// lists under `zone->lock`.
    #[inline(never)]
    fn rmqueue_buddy(&self, order: usize, zl: &LockCounters) -> Option<u64> {
        let mut z = self.zone.lock(zl);
        crate::drive::vtime::step(crate::drive::vtime::Step::RmqueueBuddy);
        self.__rmqueue_smallest(&mut z, order)
    }

    /// `free_frozen_pages()`: frees a block, to the per-CPU list when its
    /// order has one (`free_frozen_page_commit`, which drains a batch to the
    /// zone when the list grows past its high mark), else to the buddy lists
    /// (`free_one_page`).
    #[inline]
    pub fn free_frozen_pages(&self, pcp: &mut PerCpuPages, pfn: u64, order: usize, zl: &LockCounters) {
        self.page(pfn).set_info(0);
        self.clear_written(pfn, order);
        if pcp_allowed_order(order) {
            let i = pcp_index(order);
            pcp.lists[i].push(pfn as u32);
            crate::drive::vtime::step(crate::drive::vtime::Step::FreePcp);
            pcp.count += 1 << order;
            if pcp.count > PCP_HIGH {
                self.drain_pcp(pcp, PCP_BATCH, zl);
            }
        } else {
            let mut z = self.zone.lock(zl);
            crate::drive::vtime::step(crate::drive::vtime::Step::FreeBuddy);
            self.__free_one_page(&mut z, pfn, order);
        }
    }

    /// `free_pcppages_bulk()`: returns at least `pages` pages to the zone
    /// (all when `pages` is u64::MAX), taking from every list in turn.
    pub fn drain_pcp(&self, pcp: &mut PerCpuPages, pages: u64, zl: &LockCounters) {
        if pcp.count == 0 {
            return;
        }
        let mut z = self.zone.lock(zl);
        let mut freed = 0u64;
        // Oldest first (the kernel frees from the tail), each list in turn,
        // a share of `pages` from each.
        while freed < pages && pcp.count > 0 {
            for i in 0..NR_PCP_LISTS {
                let order = if i == PAGE_ALLOC_COSTLY_ORDER + 1 { PMD_ORDER } else { i };
                let want = ((pages - freed).div_ceil(1 << order)).min(pcp.lists[i].len() as u64) as usize;
                crate::drive::vtime::step_n(crate::drive::vtime::Step::FreeBuddy, want as u64);
                for pfn in pcp.lists[i].drain(..want) {
                    self.__free_one_page(&mut z, pfn as u64, order);
                }
                pcp.count -= (want as u64) << order;
                freed += (want as u64) << order;
                if freed >= pages {
                    break;
                }
            }
        }
    }

    /// `__rmqueue_smallest()`, plus carving fresh blocks from the frontier.
    #[allow(non_snake_case)]
    fn __rmqueue_smallest(&self, z: &mut Zone, order: usize) -> Option<u64> {
        loop {
            for o in order..=MAX_PAGE_ORDER {
                if let Some(pfn) = z.free[o].pop() {
                    let pfn = pfn as u64;
                    self.page(pfn).set_info(0);
                    z.nr_free -= 1 << o;
                    self.expand(z, pfn, order, o);
                    return Some(pfn);
                }
            }
            if !self.carve(z) {
                return None;
            }
        }
    }

    /// Takes the next never-used MAX_PAGE_ORDER block onto the free lists,
    /// pinning pages in some of its pageblocks when fragmentation is on.
    fn carve(&self, z: &mut Zone) -> bool {
        let n = 1u64 << MAX_PAGE_ORDER;
        if z.frontier + n > self.phys_pages {
            return false;
        }
        let pfn = z.frontier;
        z.frontier += n;
        self.frontier.store(z.frontier, Relaxed);
        self.add_free(z, pfn, MAX_PAGE_ORDER);
        if self.fragmentation > 0.0 {
            let pb = 1u64 << PMD_ORDER;
            for b in 0..(n / pb) {
                if rand_unit(&mut z.rng) < self.fragmentation {
                    let off = xorshift(&mut z.rng) % pb;
                    self.take_pfn(z, pfn + b * pb + off);
                }
            }
        }
        true
    }

    /// Removes one specific free frame from the buddy lists and pins it, as
    /// an unmovable allocation would: what makes high orders scarce.
    fn take_pfn(&self, z: &mut Zone, pfn: u64) {
        for o in 0..=MAX_PAGE_ORDER {
            let head = pfn & !((1u64 << o) - 1);
            let info = self.page(head).info();
            if info & PG_BUDDY != 0 && ((info & ORDER_MASK) >> ORDER_SHIFT) as usize == o {
                self.del_free(z, head, o);
                // Split down, keeping the halves without `pfn` free.
                let mut start = head;
                let mut order = o;
                while order > 0 {
                    order -= 1;
                    let half = 1u64 << order;
                    if pfn < start + half {
                        self.add_free(z, start + half, order);
                    } else {
                        self.add_free(z, start, order);
                        start += half;
                    }
                }
                self.page(pfn).set_info(PG_PINNED);
                self.shared.pinned.fetch_add(1, Relaxed);
                return;
            }
        }
    }

    /// `expand()`: splits a block of `high` order down to `low`, putting the
    /// upper halves on the free lists.
    #[inline]
    fn expand(&self, z: &mut Zone, pfn: u64, low: usize, mut high: usize) {
        while high > low {
            high -= 1;
            self.add_free(z, pfn + (1 << high), high);
        }
    }

    #[inline]
    fn add_free(&self, z: &mut Zone, pfn: u64, order: usize) {
        let p = self.page(pfn);
        p.count.store(z.free[order].len() as u32, Relaxed);
        p.set_info(PG_BUDDY | (order as u32) << ORDER_SHIFT);
        z.free[order].push(pfn as u32);
        z.nr_free += 1 << order;
    }

    #[inline]
    fn del_free(&self, z: &mut Zone, pfn: u64, order: usize) {
        let p = self.page(pfn);
        let idx = p.count.load(Relaxed) as usize;
        let list = &mut z.free[order];
        debug_assert_eq!(list[idx] as u64, pfn);
        list.swap_remove(idx);
        if idx < list.len() {
            self.page(list[idx] as u64).count.store(idx as u32, Relaxed);
        }
        p.set_info(0);
        z.nr_free -= 1 << order;
    }

    /// `__free_one_page()`: merges with free buddies as far as it can.
    #[allow(non_snake_case)]
    fn __free_one_page(&self, z: &mut Zone, mut pfn: u64, mut order: usize) {
        while order < MAX_PAGE_ORDER {
            let buddy = pfn ^ (1 << order);
            let info = self.page(buddy).info();
            if info & PG_BUDDY == 0 || ((info & ORDER_MASK) >> ORDER_SHIFT) as usize != order {
                break;
            }
            self.del_free(z, buddy, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.add_free(z, pfn, order);
    }

    /// Checks that the free lists agree with the memory map; returns the
    /// number of free pages found.
    pub fn check_free_lists(&self, zl: &LockCounters) -> std::result::Result<u64, String> {
        let z = self.zone.lock(zl);
        let mut n = 0;
        for (o, list) in z.free.iter().enumerate() {
            for (i, &pfn) in list.iter().enumerate() {
                let p = self.page(pfn as u64);
                if p.info() != PG_BUDDY | (o as u32) << ORDER_SHIFT || p.count.load(Relaxed) as usize != i {
                    return Err(format!("free block {pfn:#x} of order {o} has a stale struct page"));
                }
                if pfn as u64 & ((1 << o) - 1) != 0 {
                    return Err(format!("free block {pfn:#x} is not aligned to its order {o}"));
                }
                if let Some(k) = (0..1u64 << o).find(|&k| self.written(pfn as u64 + k)) {
                    return Err(format!("free block {pfn:#x} of order {o}: page {k} is still marked written"));
                }
                n += 1 << o;
            }
        }
        if n != z.nr_free {
            return Err(format!("free lists hold {n} pages but the zone counts {}", z.nr_free));
        }
        Ok(n + (self.phys_pages - z.frontier))
    }

    /// Frames ever handed out (below the frontier): what to scan for folios.
    pub fn frontier(&self) -> u64 {
        self.frontier.load(Relaxed)
    }

    /// Host bytes used by the memory map so far (and its written bits).
    pub fn host_bytes(&self) -> u64 {
        self.frontier() * std::mem::size_of::<Page>() as u64 + self.frontier().div_ceil(64) * 8
    }
}

/// A seeded per-CPU random source for failure injection.
pub struct FailInject {
    pub fail_orders: u32,
    pub fail_rate: f64,
    pub rng: u64,
}

impl FailInject {
    /// True when an allocation of `order` should fail.
    #[inline(always)]
    pub fn should_fail(&mut self, order: usize) -> bool {
        if order == 0 {
            return false;
        }
        if self.fail_orders & (1 << order) != 0 {
            return true;
        }
        self.fail_rate > 0.0 && rand_unit(&mut self.rng) < self.fail_rate
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn buddy_splits_and_merges_back() {
        let pa = PageAlloc::new(64 << 20, 0.0, 1).unwrap();
        let zl = LockCounters::default();
        let mut pcp = PerCpuPages::default();
        let total = pa.phys_pages;
        let mut got = vec![];
        for order in [0usize, 4, 2, 9, 5, 0, 8] {
            let pfn = pa.rmqueue(&mut pcp, order, &zl).unwrap();
            assert_eq!(pfn & ((1 << order) - 1), 0, "aligned");
            got.push((pfn, order));
        }
        for (pfn, order) in got {
            pa.free_frozen_pages(&mut pcp, pfn, order, &zl);
        }
        pa.drain_pcp(&mut pcp, u64::MAX, &zl);
        assert_eq!(pcp.count, 0);
        assert_eq!(pa.check_free_lists(&zl).unwrap(), total);
        // Everything merged back into whole MAX_PAGE_ORDER blocks.
        let z = pa.zone.lock(&zl);
        assert!(z.free[..MAX_PAGE_ORDER].iter().all(|l| l.is_empty()));
    }

    #[test]
    fn fragmentation_makes_high_orders_scarce() {
        let pa = PageAlloc::new(64 << 20, 1.0, 7).unwrap();
        let zl = LockCounters::default();
        let mut pcp = PerCpuPages::default();
        // Every pageblock has a pinned page: no order-9 block exists.
        assert!(pa.rmqueue(&mut pcp, PMD_ORDER, &zl).is_none());
        assert!(pa.rmqueue(&mut pcp, 4, &zl).is_some());
        assert_eq!(pa.shared.pinned.load(Relaxed), pa.phys_pages / 512);
    }

    #[test]
    fn exhaustion_returns_none() {
        let pa = PageAlloc::new(4 << 20, 0.0, 1).unwrap();
        let zl = LockCounters::default();
        let mut pcp = PerCpuPages::default();
        for _ in 0..1024 {
            assert!(pa.rmqueue(&mut pcp, 0, &zl).is_some());
        }
        assert!(pa.rmqueue(&mut pcp, 0, &zl).is_none());
    }
}
