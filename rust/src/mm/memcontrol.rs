//! `mm/memcontrol.c`: the memory cgroup the mm is charged to, a page counter with a limit
//! (`memory.max`) and a per-CPU charge stock, as `try_charge_memcg()` and
//! `consume_stock()` have it. Reclaim is not modelled: a charge over the
//! limit fails.

// The page counter takes part in no ordering protocol: std atomics even
// under loom.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// `MEMCG_CHARGE_BATCH`: pages pre-charged into a CPU's stock at a time.
pub const MEMCG_CHARGE_BATCH: u64 = 64;

/// The memcg, on cache lines of its own: its counter is shared by every CPU.
#[repr(align(128))]
pub struct MemCg {
    /// Pages charged (including CPUs' stocks).
    usage: AtomicU64,
    /// `memory.max` in pages; u64::MAX is unlimited.
    limit: u64,
    pub failcnt: AtomicU64,
}

impl MemCg {
    pub fn new(limit_bytes: Option<u64>) -> MemCg {
        MemCg {
            usage: AtomicU64::new(0),
            limit: limit_bytes.map_or(u64::MAX, |b| b / crate::PAGE_SIZE),
            failcnt: AtomicU64::new(0),
        }
    }

    /// `page_counter_try_charge()`.
    fn page_counter_try_charge(&self, nr: u64) -> bool {
        let new = self.usage.fetch_add(nr, Relaxed) + nr;
        if new > self.limit {
            self.usage.fetch_sub(nr, Relaxed);
            return false;
        }
        true
    }

    /// `mem_cgroup_charge()` for `nr` pages from a CPU whose stock is `stock`.
    #[inline(always)]
    pub fn mem_cgroup_charge(&self, stock: &mut u64, nr: u64) -> bool {
        if *stock >= nr {
            *stock -= nr;
            return true;
        }
        self.try_charge_memcg(stock, nr)
    }

    #[cold]
    fn try_charge_memcg(&self, stock: &mut u64, nr: u64) -> bool {
        let batch = nr.max(MEMCG_CHARGE_BATCH);
        if self.page_counter_try_charge(batch) {
            *stock += batch - nr;
            return true;
        }
        // Near the limit: give back the stock and try the exact amount.
        self.drain_stock(stock);
        if self.page_counter_try_charge(nr) {
            return true;
        }
        self.failcnt.fetch_add(1, Relaxed);
        false
    }

    /// `mem_cgroup_uncharge()`: into the stock, which is trimmed to a batch.
    #[inline(always)]
    pub fn mem_cgroup_uncharge(&self, stock: &mut u64, nr: u64) {
        *stock += nr;
        if *stock > 2 * MEMCG_CHARGE_BATCH {
            self.usage.fetch_sub(*stock - MEMCG_CHARGE_BATCH, Relaxed);
            *stock = MEMCG_CHARGE_BATCH;
        }
    }

    /// `drain_stock()`.
    pub fn drain_stock(&self, stock: &mut u64) {
        if *stock > 0 {
            self.usage.fetch_sub(*stock, Relaxed);
            *stock = 0;
        }
    }

    /// The `force:` path of `try_charge_memcg()` (`__GFP_NOFAIL`): charged
    /// even over the limit.
    pub fn force_charge(&self, nr: u64) {
        self.usage.fetch_add(nr, Relaxed);
    }

    /// Uncharges kernel memory (a freed page table) straight from the
    /// counter (`memcg_kmem_uncharge_page`, not through a CPU's stock).
    pub fn uncharge_kmem(&self, nr: u64) {
        self.usage.fetch_sub(nr, Relaxed);
    }

    /// Usage in pages, stocks included.
    pub fn usage(&self) -> u64 {
        self.usage.load(Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn limit_is_exact() {
        let m = MemCg::new(Some(100 * crate::PAGE_SIZE));
        let mut stock = 0;
        let mut n = 0;
        while m.mem_cgroup_charge(&mut stock, 1) {
            n += 1;
        }
        assert_eq!(n, 100);
        assert!(!m.mem_cgroup_charge(&mut stock, 16));
        m.mem_cgroup_uncharge(&mut stock, 16);
        assert!(m.mem_cgroup_charge(&mut stock, 16));
    }
}
