//! Virtual time (`--time`): what each modelled step of the fault path and
//! of unmapping costs, the locks held and waited for in that time, and the
//! figures a run in virtual time reports. None of this is a kernel
//! structure; the step names are the kernel functions whose cost they stand
//! for.
//!
//! Each simulated CPU keeps a clock (in [`super::sched::Timed`]); the hooks
//! below, placed at the modelled steps of `mm/`, advance the clock of the
//! CPU whose coroutine runs. A spinlock found held in virtual time (its
//! last holder released it at a later virtual time than this CPU's clock)
//! is waited for until that release plus one cache-line transfer. The
//! scheduler runs the CPU with the smallest clock, so races and contention
//! come from timing. Outside a run in virtual time every hook is one
//! thread-local load and a branch.

use crate::drive::coro;
use crate::drive::sched::Timed;
use std::collections::HashMap;

/// The modelled steps, each with the kernel function it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Exception entry to `handle_mm_fault` (`exc_page_fault`, `do_user_addr_fault`).
    FaultEntry,
    /// Back from `handle_mm_fault` to user space.
    FaultExit,
    /// `lock_vma_under_rcu` / `find_vma`.
    VmaLookup,
    /// `__handle_mm_fault`'s walk down to the PMD.
    PtWalk,
    /// `__pte_alloc`: a PTE table allocated, zeroed and installed.
    PteAlloc,
    /// `rmqueue_pcplist` that finds its per-CPU list non-empty.
    PcpAlloc,
    /// `rmqueue_bulk`, per block moved from the buddy lists (zone->lock held).
    RmqueueBulk,
    /// `rmqueue_buddy` for an order without per-CPU lists (zone->lock held).
    RmqueueBuddy,
    /// `mem_cgroup_charge`, per folio.
    MemcgCharge,
    /// `folio_zero_user` / `clear_page`, per KiB (page by page, so linear).
    ZeroKib,
    /// `folio_add_new_anon_rmap`, per folio.
    Rmap,
    /// `folio_add_lru_vma` into the per-CPU folio batch, per folio.
    LruAdd,
    /// `folio_batch_move_lru`, per folio moved under the lruvec lock.
    LruMove,
    /// `set_ptes` / `set_pmd_at`, per entry.
    SetPte,
    /// `spin_lock` + `spin_unlock` of an uncontended spinlock.
    SpinLock,
    /// `zap_present_ptes`, per entry cleared.
    ZapPte,
    /// `zap_present_folio_ptes` per folio batch: rmap removal, reference drop.
    ZapFolio,
    /// `free_frozen_pages` onto a per-CPU list, per folio.
    FreePcp,
    /// `__free_one_page` into the buddy lists, per block (zone->lock held).
    FreeBuddy,
    /// `free_pages_prepare` (`free_tail_page_prepare` and the page checks),
    /// per page of a freed folio: what makes freeing linear in its size.
    FreePage,
    /// `__page_cache_release` of a freed folio, under the lruvec lock.
    LruDel,
    /// A large folio's own work at fault time (`prep_compound_page`, the
    /// mTHP order checks and counters), per large folio.
    PrepLargeFolio,
    /// A large folio's own work when it is freed (`folio_undo_large_rmappable`,
    /// the deferred-split checks, `free_pages_prepare` of a compound page),
    /// per large folio.
    FreeLargeFolio,
    /// `tlb_finish_mmu`: the TLB flush that ends an unmap.
    TlbFlush,
    /// Entry and exit of a system call that changes VMAs (mmap, munmap, madvise).
    Syscall,
}

pub const NR_STEPS: usize = 25;

impl Step {
    pub const ALL: [Step; NR_STEPS] = [
        Step::FaultEntry,
        Step::FaultExit,
        Step::VmaLookup,
        Step::PtWalk,
        Step::PteAlloc,
        Step::PcpAlloc,
        Step::RmqueueBulk,
        Step::RmqueueBuddy,
        Step::MemcgCharge,
        Step::ZeroKib,
        Step::Rmap,
        Step::LruAdd,
        Step::LruMove,
        Step::SetPte,
        Step::SpinLock,
        Step::ZapPte,
        Step::ZapFolio,
        Step::FreePcp,
        Step::FreeBuddy,
        Step::FreePage,
        Step::LruDel,
        Step::PrepLargeFolio,
        Step::FreeLargeFolio,
        Step::TlbFlush,
        Step::Syscall,
    ];

    /// The name of the step in profiles (`NAME_ns`) and in `breakdown_ns`.
    pub fn name(self) -> &'static str {
        match self {
            Step::FaultEntry => "fault_entry",
            Step::FaultExit => "fault_exit",
            Step::VmaLookup => "vma_lookup",
            Step::PtWalk => "pt_walk",
            Step::PteAlloc => "pte_alloc",
            Step::PcpAlloc => "pcp_alloc",
            Step::RmqueueBulk => "rmqueue_bulk",
            Step::RmqueueBuddy => "rmqueue_buddy",
            Step::MemcgCharge => "memcg_charge",
            Step::ZeroKib => "zero_per_kib",
            Step::Rmap => "rmap",
            Step::LruAdd => "lru_add",
            Step::LruMove => "lru_move",
            Step::SetPte => "set_pte",
            Step::SpinLock => "spin_lock",
            Step::ZapPte => "zap_pte",
            Step::ZapFolio => "zap_folio",
            Step::FreePcp => "free_pcp",
            Step::FreeBuddy => "free_buddy",
            Step::FreePage => "free_page",
            Step::LruDel => "lru_del",
            Step::PrepLargeFolio => "prep_large_folio",
            Step::FreeLargeFolio => "free_large_folio",
            Step::TlbFlush => "tlb_flush",
            Step::Syscall => "syscall",
        }
    }
}

/// The locks a run in virtual time tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockClass {
    /// Split PTE-table locks.
    Ptl,
    /// `mm->page_table_lock`.
    PageTableLock,
    /// `zone->lock`.
    ZoneLock,
    /// The lruvec lock (`lruvec->lru_lock`), modelled only in virtual time.
    LruLock,
    /// Waits at [`crate::mm::Point::Blocked`]: the mmap lock and replay's
    /// barriers between threads (not a kernel lock).
    Blocked,
}

pub const NR_LOCKS: usize = 5;

impl LockClass {
    pub const ALL: [LockClass; NR_LOCKS] =
        [LockClass::Ptl, LockClass::PageTableLock, LockClass::ZoneLock, LockClass::LruLock, LockClass::Blocked];
    pub fn name(self) -> &'static str {
        match self {
            LockClass::Ptl => "ptl",
            LockClass::PageTableLock => "page_table_lock",
            LockClass::ZoneLock => "zone_lock",
            LockClass::LruLock => "lru_lock",
            LockClass::Blocked => "mmap_lock_and_barriers",
        }
    }
}

/// What each step costs, in nanoseconds, and what moving a lock's cache
/// line from one CPU to another costs. See `docs/cost-profile.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct CostProfile {
    /// Per [`Step`], in the order of [`Step::ALL`].
    pub step_ns: [f64; NR_STEPS],
    /// A cache-line transfer: added to a wait for a lock found held, and
    /// what one look at a word spun on costs.
    pub cacheline_ns: f64,
}

impl Default for CostProfile {
    /// Round figures of the order published for x86 (a 4 KiB anonymous
    /// fault of about 2 us in a VM, zeroing at about 13 GB/s); the profile
    /// `anonfolio calibrate` writes replaces them with this machine's.
    fn default() -> Self {
        let mut p = CostProfile { step_ns: [0.0; NR_STEPS], cacheline_ns: 60.0 };
        for (s, v) in [
            (Step::FaultEntry, 350.0),
            (Step::FaultExit, 150.0),
            (Step::VmaLookup, 40.0),
            (Step::PtWalk, 30.0),
            (Step::PteAlloc, 500.0),
            (Step::PcpAlloc, 60.0),
            (Step::RmqueueBulk, 25.0),
            (Step::RmqueueBuddy, 250.0),
            (Step::MemcgCharge, 40.0),
            (Step::ZeroKib, 75.0),
            (Step::Rmap, 30.0),
            (Step::LruAdd, 20.0),
            (Step::LruMove, 30.0),
            (Step::SetPte, 5.0),
            (Step::SpinLock, 20.0),
            (Step::ZapPte, 10.0),
            (Step::ZapFolio, 60.0),
            (Step::FreePcp, 40.0),
            (Step::FreeBuddy, 60.0),
            (Step::FreePage, 10.0),
            (Step::LruDel, 25.0),
            (Step::PrepLargeFolio, 300.0),
            (Step::FreeLargeFolio, 200.0),
            (Step::TlbFlush, 500.0),
            (Step::Syscall, 300.0),
        ] {
            p.step_ns[s as usize] = v;
        }
        p
    }
}

impl CostProfile {
    /// Sets one cost by its profile key (`fault_entry_ns`, ...,
    /// `cacheline_ns`). Unknown keys and negative or non-finite costs are
    /// errors, so that a misspelt key is never silently ignored.
    pub fn set(&mut self, key: &str, ns: f64) -> crate::Result<()> {
        if !ns.is_finite() || ns < 0.0 {
            return Err(crate::Error::Config(format!("cost profile: {key} = {ns} is not a non-negative number")));
        }
        if key == "cacheline_ns" {
            self.cacheline_ns = ns;
            return Ok(());
        }
        let Some(s) = key.strip_suffix("_ns").and_then(|k| Step::ALL.iter().find(|s| s.name() == k)) else {
            return Err(crate::Error::Config(format!(
                "cost profile: unknown cost {key:?} (want one of {}, cacheline_ns)",
                Step::ALL.iter().map(|s| format!("{}_ns", s.name())).collect::<Vec<_>>().join(", ")
            )));
        };
        self.step_ns[*s as usize] = ns;
        Ok(())
    }

    /// Every key with its cost, as a profile lists them.
    pub fn pairs(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> =
            Step::ALL.iter().map(|s| (format!("{}_ns", s.name()), self.step_ns[*s as usize])).collect();
        v.push(("cacheline_ns".into(), self.cacheline_ns));
        v
    }
}

/// `FOLIO_BATCH_SIZE` (`include/linux/pagevec.h`, 31 in 6.18): folios a CPU
/// gathers before taking the lruvec lock once for all of them.
pub const FOLIO_BATCH_SIZE: u32 = 31;

/// One hold of a lock in virtual time: `[from, to)` by `holder`.
#[derive(Clone, Copy)]
struct Hold {
    from: u64,
    to: u64,
    holder: usize,
}

/// Holds remembered per lock. A CPU's critical sections run without a
/// switch, so a CPU can run ahead and leave holds in the future of the
/// others' clocks (a munmap zapping thousands of folios, each freed under
/// the lruvec lock): a CPU arriving at `t` waits only if `t` falls inside
/// one of them, as it would have on the machine.
const HOLDS: usize = 32;

/// A lock's recent holds in virtual time, a ring.
#[derive(Clone, Default)]
struct LockState {
    holds: Vec<Hold>,
    next: usize,
}

impl LockState {
    /// The end of a hold by another CPU that covers `t`, if any.
    fn covering(&self, t: u64, me: usize) -> Option<u64> {
        self.holds.iter().filter(|h| h.holder != me && h.from <= t && t < h.to).map(|h| h.to).max()
    }
    fn push(&mut self, h: Hold) {
        if self.holds.len() < HOLDS {
            self.holds.push(h);
        } else {
            self.holds[self.next] = h;
            self.next = (self.next + 1) % HOLDS;
        }
    }
}

/// A hasher for lock addresses (no DoS to fear): a multiply.
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// The lruvec lock has no address in the model: this stands for it.
const LRU_LOCK: usize = 1;

/// The virtual-time state of a run besides the clocks.
pub(crate) struct VTime {
    /// Costs in whole nanoseconds, per step.
    cost: [u64; NR_STEPS],
    cacheline: u64,
    zone_lock: usize,
    page_table_lock: usize,
    locks: AddrMap<LockState>,
    /// Virtual ns per step, summed over CPUs.
    breakdown: [u64; NR_STEPS],
    lock_wait: [u64; NR_LOCKS],
    lock_contended: [u64; NR_LOCKS],
    /// The locks each CPU holds, with when it took them.
    held: Vec<Vec<(usize, u64)>>,
    /// Each CPU's clock when its current fault began.
    fault_start: Vec<u64>,
    latencies: Vec<u64>,
    /// Folios each CPU holds in its lru_add folio batch, and freed folios
    /// waiting for the lruvec lock.
    lru_add: Vec<u32>,
    lru_del: Vec<u32>,
}

impl VTime {
    pub(crate) fn new(p: &CostProfile, ncpus: usize, zone_lock: usize, page_table_lock: usize) -> VTime {
        let mut cost = [0u64; NR_STEPS];
        for (c, v) in cost.iter_mut().zip(p.step_ns) {
            *c = v.round() as u64;
        }
        VTime {
            cost,
            cacheline: p.cacheline_ns.round() as u64,
            zone_lock,
            page_table_lock,
            locks: AddrMap::default(),
            breakdown: [0; NR_STEPS],
            lock_wait: [0; NR_LOCKS],
            lock_contended: [0; NR_LOCKS],
            held: vec![Vec::new(); ncpus],
            fault_start: vec![0; ncpus],
            latencies: Vec::new(),
            lru_add: vec![0; ncpus],
            lru_del: vec![0; ncpus],
        }
    }

    pub(crate) fn cacheline(&self) -> u64 {
        self.cacheline
    }

    #[inline]
    fn advance(&mut self, clock: &mut u64, s: Step, n: u64) {
        let c = self.cost[s as usize] * n;
        *clock += c;
        self.breakdown[s as usize] += c;
    }

    fn class(&self, addr: usize) -> LockClass {
        if addr == self.zone_lock {
            LockClass::ZoneLock
        } else if addr == self.page_table_lock {
            LockClass::PageTableLock
        } else if addr == LRU_LOCK {
            LockClass::LruLock
        } else {
            LockClass::Ptl
        }
    }

    fn acquire(&mut self, clock: &mut u64, me: usize, addr: usize) {
        if let Some(st) = self.locks.get(&addr) {
            let start = *clock;
            while let Some(to) = st.covering(*clock, me) {
                *clock = to + self.cacheline;
            }
            if *clock > start {
                let k = self.class(addr) as usize;
                self.lock_wait[k] += *clock - start;
                self.lock_contended[k] += 1;
            }
        }
        self.held[me].push((addr, *clock));
        self.advance(clock, Step::SpinLock, 1);
    }

    fn release(&mut self, clock: u64, me: usize, addr: usize) {
        let Some(i) = self.held[me].iter().rposition(|&(a, _)| a == addr) else { return };
        let (_, from) = self.held[me].swap_remove(i);
        self.locks.entry(addr).or_default().push(Hold { from, to: clock, holder: me });
    }

    /// Takes the lruvec lock for `n` folios moved by `s`.
    fn lru_locked(&mut self, clock: &mut u64, me: usize, s: Step, n: u32) {
        self.acquire(clock, me, LRU_LOCK);
        self.advance(clock, s, u64::from(n));
        self.release(*clock, me, LRU_LOCK);
    }

    /// Time spent waiting at a blocked point.
    pub(crate) fn blocked(&mut self, ns: u64) {
        self.lock_wait[LockClass::Blocked as usize] += ns;
        self.lock_contended[LockClass::Blocked as usize] += 1;
    }

    pub(crate) fn stats(&self, clocks: &[u64]) -> TimeStats {
        let mut lat = self.latencies.clone();
        let n = lat.len();
        let pct = |lat: &mut Vec<u64>, q: f64| -> u64 {
            if lat.is_empty() {
                return 0;
            }
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            *lat.select_nth_unstable(i).1
        };
        let p50 = pct(&mut lat, 0.50);
        let p99 = pct(&mut lat, 0.99);
        TimeStats {
            elapsed_ns: clocks.iter().copied().max().unwrap_or(0),
            cpu_ns: clocks.iter().sum(),
            faults: n as u64,
            latency_mean_ns: if n == 0 { 0.0 } else { self.latencies.iter().sum::<u64>() as f64 / n as f64 },
            latency_p50_ns: p50,
            latency_p99_ns: p99,
            latency_max_ns: self.latencies.iter().copied().max().unwrap_or(0),
            breakdown_ns: Step::ALL.iter().map(|s| (s.name(), self.breakdown[*s as usize])).collect(),
            lock_wait_ns: LockClass::ALL.iter().map(|l| (l.name(), self.lock_wait[*l as usize])).collect(),
            lock_contended: LockClass::ALL.iter().map(|l| (l.name(), self.lock_contended[*l as usize])).collect(),
        }
    }
}

/// The `time` figures of a run in virtual time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TimeStats {
    /// From the start to the last CPU's end.
    pub elapsed_ns: u64,
    /// Summed over CPUs (busy and waiting).
    pub cpu_ns: u64,
    /// Faults timed (each `handle_mm_fault` from entry to exit).
    pub faults: u64,
    pub latency_mean_ns: f64,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    pub latency_max_ns: u64,
    /// Virtual ns per step, summed over CPUs.
    pub breakdown_ns: Vec<(&'static str, u64)>,
    /// Virtual ns spent waiting for each lock, summed over CPUs.
    pub lock_wait_ns: Vec<(&'static str, u64)>,
    /// Acquisitions that found the lock held in virtual time.
    pub lock_contended: Vec<(&'static str, u64)>,
}

#[inline(always)]
fn with(f: impl FnOnce(&mut Timed, usize)) {
    coro::with_timed(f);
}

/// One modelled step of the running CPU.
#[inline(always)]
pub fn step(s: Step) {
    step_n(s, 1);
}

/// `n` of a modelled step (entries, KiB, blocks) of the running CPU.
#[inline(always)]
pub fn step_n(s: Step, n: u64) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.advance(clock, s, n);
    });
}

/// A fault begins: `handle_mm_fault` is entered.
#[inline(always)]
pub fn fault_begin() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.fault_start[me] = *clock;
        vt.advance(clock, Step::FaultEntry, 1);
    });
}

/// The fault begun last on this CPU returns to user space.
#[inline(always)]
pub fn fault_end() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.advance(clock, Step::FaultExit, 1);
        let l = *clock - vt.fault_start[me];
        vt.latencies.push(l);
    });
}

/// The running CPU took the spinlock at `addr` (in host terms).
#[inline(always)]
pub fn lock_acquired(addr: usize) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.acquire(clock, me, addr);
    });
}

/// The running CPU released the spinlock at `addr`.
#[inline(always)]
pub fn lock_released(addr: usize) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.release(*clock, me, addr);
    });
}

/// `folio_add_new_anon_rmap()`, then `folio_add_lru_vma()`: into the CPU's
/// folio batch, which moves to the LRU under the lruvec lock when full or
/// when the folio is large (`folio_batch_add` returning no space,
/// `folio_test_large`).
#[inline(always)]
pub fn rmap_and_lru_add(large: bool) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.advance(clock, Step::Rmap, 1);
        vt.advance(clock, Step::LruAdd, 1);
        vt.lru_add[me] += 1;
        if large || vt.lru_add[me] >= FOLIO_BATCH_SIZE {
            let n = std::mem::take(&mut vt.lru_add[me]);
            vt.lru_locked(clock, me, Step::LruMove, n);
        }
    });
}

/// `zap_present_ptes()` of `nr` entries mapping one folio.
#[inline(always)]
pub fn zap_folio_ptes(nr: u64) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.advance(clock, Step::ZapPte, nr);
        vt.advance(clock, Step::ZapFolio, 1);
    });
}

/// A folio freed by a zap: off the LRU under the lruvec lock, a batch at a
/// time (`folios_put_refs`).
#[inline(always)]
pub fn lru_del() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.lru_del[me] += 1;
        if vt.lru_del[me] >= FOLIO_BATCH_SIZE {
            let n = std::mem::take(&mut vt.lru_del[me]);
            vt.lru_locked(clock, me, Step::LruDel, n);
        }
    });
}

/// `tlb_finish_mmu()`: the flush, then the freed folios still batched.
#[inline(always)]
pub fn tlb_finish_mmu() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.advance(clock, Step::TlbFlush, 1);
        let n = std::mem::take(&mut vt.lru_del[me]);
        if n > 0 {
            vt.lru_locked(clock, me, Step::LruDel, n);
        }
    });
}

/// The address a spinlock is known by in virtual time.
#[inline(always)]
pub fn lock_addr<T>(l: &T) -> usize {
    l as *const T as usize
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn profile_keys_round_trip_and_bad_ones_are_refused() {
        let mut p = CostProfile::default();
        for (k, v) in CostProfile::default().pairs() {
            p.set(&k, v + 1.0).unwrap();
        }
        assert!(p.pairs().iter().zip(CostProfile::default().pairs()).all(|(a, b)| a.1 == b.1 + 1.0));
        assert!(p.set("zero_per_kb_ns", 1.0).unwrap_err().to_string().contains("unknown cost"));
        assert!(p.set("pt_walk_ns", -1.0).is_err());
        assert!(p.set("pt_walk_ns", f64::NAN).is_err());
    }

    #[test]
    fn a_lock_found_held_is_waited_for_until_its_release_plus_a_line() {
        let p = CostProfile::default();
        let mut vt = VTime::new(&p, 3, 10, 20);
        let mut c1 = 1000;
        vt.acquire(&mut c1, 1, 10);
        c1 += 500;
        vt.release(c1, 1, 10);
        // CPU 0 at 1200 finds it held until 1520.
        let mut c0 = 1200;
        vt.acquire(&mut c0, 0, 10);
        assert_eq!(c0, 1520 + p.cacheline_ns as u64 + p.step_ns[Step::SpinLock as usize] as u64);
        assert_eq!(vt.lock_wait[LockClass::ZoneLock as usize], 1520 + 60 - 1200);
        vt.release(c0, 0, 10);
        // Before CPU 1's hold began, or after it ended: no wait.
        for t in [900, 5000] {
            let mut c = t;
            vt.acquire(&mut c, 1, 20);
            vt.release(c, 1, 20);
            let mut c = t + 1;
            vt.acquire(&mut c, 0, 20);
            assert_eq!(c, t + 1 + 20 + 60 - 1 + 20, "CPU 1 holds 20 ns from {t}");
            vt.release(c, 0, 20);
        }
        assert_eq!(vt.lock_contended[LockClass::PageTableLock as usize], 2);
        // A hold in CPU 0's past but in the future of CPU 2's clock: it waits.
        let mut c2 = 1000;
        vt.acquire(&mut c2, 2, 10);
        assert!(c2 > 1520, "{c2}");
    }

    use crate::config::Config;
    use crate::drive::runner::{RunOptions, RunResult};
    use crate::drive::workload::{run_workload, Sharing, Workload, WorkloadKind};
    use crate::mm::Mm;

    fn timed(sizes: &[&str], w: &Workload, threads: usize, seed: u64) -> RunResult {
        let mut c = Config::default();
        for s in sizes {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 1 << 30;
        let mm = Mm::new(c).unwrap();
        let opts = RunOptions {
            threads,
            deterministic: Some(seed),
            check_invariants: true,
            time: Some(CostProfile::default()),
        };
        let r = run_workload(&mm, w, &opts);
        assert!(r.error.is_none(), "{:?}", r.error);
        r
    }

    fn ns(v: &[(&'static str, u64)], k: &str) -> u64 {
        v.iter().find(|(n, _)| *n == k).map(|(_, x)| *x).unwrap()
    }

    #[test]
    fn same_seed_same_virtual_time() {
        let w = Workload { size: 8 << 20, sharing: Sharing::Interleaved, ..Default::default() };
        let sizes = ["16kB=always", "64kB=always", "2048kB=never"];
        let a = timed(&sizes, &w, 8, 3);
        let b = timed(&sizes, &w, 8, 3);
        assert_eq!(a.time, b.time);
        assert_eq!(a.stats, b.stats);
        assert!(a.stats.race.races > 0, "CPUs at the same clocks race");
        assert_eq!(a.stats.rss_pages, 2048);
    }

    #[test]
    fn every_virtual_nanosecond_is_a_step_or_a_wait() {
        let w = Workload { kind: WorkloadKind::PageFault1, size: 4 << 20, iterations: 2, ..Default::default() };
        let r = timed(&["2048kB=never"], &w, 4, 0);
        let t = r.time.unwrap();
        let steps: u64 = t.breakdown_ns.iter().map(|(_, v)| v).sum();
        let waits: u64 = t.lock_wait_ns.iter().map(|(_, v)| v).sum();
        assert_eq!(steps + waits, t.cpu_ns);
        assert_eq!(t.faults, 4 * 2 * 1024);
        // Four CPUs map and unmap at once: their mmap locks wait for each other.
        assert!(ns(&t.lock_wait_ns, "mmap_lock_and_barriers") > 0);
        assert!(ns(&t.breakdown_ns, "zap_pte") > 0 && ns(&t.breakdown_ns, "tlb_flush") > 0);
    }

    #[test]
    fn an_order_0_fault_costs_its_steps_and_zeroing_is_linear_in_size() {
        let p = CostProfile::default();
        let c = |s: Step| p.step_ns[s as usize] as u64;
        let w = Workload { size: 2 << 20, ..Default::default() };
        let r = timed(&["2048kB=never"], &w, 1, 0);
        let t = r.time.unwrap();
        assert_eq!(t.faults, 512);
        // The p50 fault: a per-CPU list hit, no table to allocate, no LRU drain.
        let want = [
            Step::FaultEntry,
            Step::VmaLookup,
            Step::PtWalk,
            Step::PcpAlloc,
            Step::MemcgCharge,
            Step::SpinLock,
            Step::Rmap,
            Step::LruAdd,
            Step::SetPte,
            Step::FaultExit,
        ]
        .iter()
        .map(|&s| c(s))
        .sum::<u64>()
            + 4 * c(Step::ZeroKib);
        assert_eq!(t.latency_p50_ns, want);
        assert_eq!(ns(&t.breakdown_ns, "zero_per_kib"), 2048 * c(Step::ZeroKib));
        let r = timed(&["64kB=always", "2048kB=never"], &w, 1, 0);
        let t64 = r.time.unwrap();
        assert_eq!(t64.faults, 32);
        assert_eq!(ns(&t64.breakdown_ns, "zero_per_kib"), 2048 * c(Step::ZeroKib), "same bytes zeroed");
        assert_eq!(ns(&t64.breakdown_ns, "set_pte"), 512 * c(Step::SetPte));
        assert!(t64.elapsed_ns < t.elapsed_ns, "fewer faults, less time");
    }

    #[test]
    fn two_cpus_take_less_than_twice_one_and_more_than_half() {
        let w = Workload { kind: WorkloadKind::PageFault1, size: 4 << 20, ..Default::default() };
        let one = timed(&["2048kB=never"], &w, 1, 0).time.unwrap();
        let two = timed(&["2048kB=never"], &w, 2, 0).time.unwrap();
        // Each CPU maps and faults its own 4 MiB: the same elapsed time but
        // for what they wait for each other.
        assert!(two.elapsed_ns >= one.elapsed_ns, "{} < {}", two.elapsed_ns, one.elapsed_ns);
        assert!(two.elapsed_ns < one.elapsed_ns * 3 / 2, "{} vs {}", two.elapsed_ns, one.elapsed_ns);
    }
}
