//! Statistics under the kernel's names (`mm/vmstat.c` for /proc/vmstat, the
//! per-size `hugepages-*/stats` of `mm/huge_memory.c`), lock figures and race
//! costs.
//!
//! Counters live per simulated CPU and are bumped with a plain load and
//! store (the owner is the only writer), as the kernel's per-CPU counters
//! are; readers sum over CPUs.

use crate::PMD_ORDER;
// One writer per counter and no protocol: std atomics even under loom.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter with one writer (its CPU) and any number of readers.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline(always)]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline(always)]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline(always)]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    #[inline(always)]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $($(#[$fm])* pub $f: Counter),* }
        /// A snapshot of the counters, summed over CPUs.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $snap { $($(#[$fm])* pub $f: u64),* }
        impl $name {
            pub fn add_to(&self, s: &mut $snap) { $( s.$f = s.$f.wrapping_add(self.$f.get()); )* }
            /// Adds `o`'s counts to these (the caller is their one writer).
            pub fn absorb(&self, o: &$name) { $( self.$f.add(o.$f.get()); )* }
        }
        impl $snap {
            pub const NAMES: &'static [&'static str] = &[$(stringify!($f)),*];
            pub fn pairs(&self) -> Vec<(&'static str, u64)> { vec![$((stringify!($f), self.$f)),*] }
            pub fn add(&mut self, o: &$snap) { $( self.$f = self.$f.wrapping_add(o.$f); )* }
        }
    };
}

counters!(
    /// `hugepages-<size>kB/stats/*` for one order.
    MthpCounters, MthpStats {
    anon_fault_alloc,
    anon_fault_fallback,
    anon_fault_fallback_charge,
    split,
    split_deferred,
    /// A gauge: large anon folios of this order that exist.
    nr_anon,
    /// A gauge: of those, the ones queued for deferred split because they
    /// are partially mapped.
    nr_anon_partially_mapped,
});

counters!(
    /// `/proc/vmstat` events where the kernel has them.
    VmCounters, VmStats {
    pgfault,
    thp_fault_alloc,
    thp_fault_fallback,
    thp_fault_fallback_charge,
    thp_split_pmd,
    /// A THP (PMD order) split into order-0 folios (`split_folio`).
    thp_split_page,
    thp_deferred_split_page,
    thp_zero_page_alloc,
    /// Order-0 pages and folios freed back to the allocator, in pages.
    pgfree,
    /// Pages handed out by the allocator.
    pgalloc,
});

counters!(
    /// What each lost race cost (issue 3's question).
    RaceCounters, RaceStats {
    /// The re-check under the PTL found the range no longer empty.
    races,
    /// `v1`: retried one order lower inside the same fault.
    retries,
    /// The fault returned without mapping and the access faulted again.
    refaults,
    /// Folios allocated, zeroed and freed unused after a lost race.
    folios_wasted,
    /// Their pages: zeroed for nothing.
    pages_wasted,
});

counters!(
    /// How faults were resolved, by path.
    FaultCounters, FaultStats {
    /// do_anonymous_page() mapped a new folio.
    anonymous,
    /// A read fault mapped the shared zero page.
    zero_page,
    /// A read fault mapped the huge zero page with a PMD.
    huge_zero_page,
    /// do_wp_page() copied the zero page into an order-0 folio.
    wp_copy,
    /// do_huge_pmd_anonymous_page() mapped a PMD THP.
    pmd_thp,
    /// A write to the huge zero page got a THP.
    huge_zero_wp,
    /// The fault found the PTE already populated (spurious, e.g. after a race).
    spurious,
});

/// Everything a simulated CPU counts.
#[derive(Default, Debug)]
pub struct CpuCounters {
    pub mthp: [MthpCounters; PMD_ORDER + 1],
    pub vm: VmCounters,
    pub race: RaceCounters,
    pub fault: FaultCounters,
    /// Folios mapped by faults, by order (order 0 included).
    pub folio_orders: [Counter; PMD_ORDER + 1],
    /// Pages of RSS (MM_ANONPAGES) this CPU added minus what it removed.
    pub rss: Counter,
}

impl CpuCounters {
    /// Adds `o`'s counts to these (the caller is their one writer).
    pub fn absorb(&self, o: &CpuCounters) {
        for (a, b) in self.mthp.iter().zip(o.mthp.iter()) {
            a.absorb(b);
        }
        self.vm.absorb(&o.vm);
        self.race.absorb(&o.race);
        self.fault.absorb(&o.fault);
        for (a, b) in self.folio_orders.iter().zip(o.folio_orders.iter()) {
            a.add(b.get());
        }
        self.rss.add(o.rss.get());
    }
}

/// Figures of one lock or a class of locks.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockStats {
    pub acquisitions: u64,
    /// Acquisitions that found the lock held.
    pub contended: u64,
    /// Spin iterations while waiting.
    pub spins: u64,
}

impl LockStats {
    pub fn add(&mut self, o: &LockStats) {
        self.acquisitions += o.acquisitions;
        self.contended += o.contended;
        self.spins += o.spins;
    }
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![("acquisitions", self.acquisitions), ("contended", self.contended), ("spins", self.spins)]
    }
}

/// Physical memory figures.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub phys_pages: u64,
    /// Pages in folios (mapped, on the deferred split queue, or in flight).
    pub used_pages: u64,
    /// Pages on the per-CPU lists.
    pub pcp_pages: u64,
    /// Pages pinned by injected fragmentation.
    pub pinned_pages: u64,
    /// PTE tables allocated (`nr_ptes`).
    pub nr_ptes: u64,
    /// memcg usage in pages.
    pub memcg_usage: u64,
    /// memcg charge failures.
    pub memcg_charge_fail: u64,
    /// Host bytes used by the simulation's page tables and memory map.
    pub host_bytes: u64,
}

/// A snapshot of every figure.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct Stats {
    pub mthp: [MthpStats; PMD_ORDER + 1],
    pub vm: VmStats,
    pub race: RaceStats,
    pub fault: FaultStats,
    pub folio_orders: [u64; PMD_ORDER + 1],
    /// Resident anonymous pages (`MM_ANONPAGES`; the zero pages do not count).
    pub rss_pages: u64,
    /// The most resident anonymous pages at any point (`mm->hiwater_rss`,
    /// as VmHWM reports it: the larger of the mark and the current RSS).
    pub rss_peak_pages: u64,
    /// Split PTE-table locks, summed.
    pub ptl: LockStats,
    /// The mm-wide `page_table_lock` (PMD installs, PMD THP).
    pub page_table_lock: LockStats,
    /// The buddy allocator's `zone->lock`.
    pub zone_lock: LockStats,
    /// The mmap lock (taken for write by mmap/munmap/madvise).
    pub mmap_lock: LockStats,
    pub mem: MemStats,
}

impl Stats {
    /// Page faults as the kernel counts them (`pgfault`, minor faults).
    pub fn faults(&self) -> u64 {
        self.vm.pgfault
    }

    pub fn add_cpu(&mut self, c: &CpuCounters) {
        for (s, m) in self.mthp.iter_mut().zip(c.mthp.iter()) {
            m.add_to(s);
        }
        c.vm.add_to(&mut self.vm);
        c.race.add_to(&mut self.race);
        c.fault.add_to(&mut self.fault);
        for (s, o) in self.folio_orders.iter_mut().zip(c.folio_orders.iter()) {
            *s = s.wrapping_add(o.get());
        }
        self.rss_pages = self.rss_pages.wrapping_add(c.rss.get());
    }
}

/// Per-CPU figures of one class of locks; bumped by the acquiring CPU.
#[derive(Default, Debug)]
pub struct LockCounters {
    pub acquisitions: Counter,
    pub contended: Counter,
    pub spins: Counter,
}

impl LockCounters {
    /// Adds `o`'s counts to these (the caller is their one writer).
    pub fn absorb(&self, o: &LockCounters) {
        self.acquisitions.add(o.acquisitions.get());
        self.contended.add(o.contended.get());
        self.spins.add(o.spins.get());
    }

    pub fn add_to(&self, s: &mut LockStats) {
        s.acquisitions += self.acquisitions.get();
        s.contended += self.contended.get();
        s.spins += self.spins.get();
    }
}
