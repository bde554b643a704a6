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
//!
//! The mmap lock is modelled here as 6.18 takes it, not as the simulator's
//! host-level guard (which excludes every reader for a whole write section,
//! to keep the VMA tree sound): a fault takes its VMA's lock
//! (`lock_vma_under_rcu`, a reference on `vma->vm_refcnt`, whose cache line
//! moves between the CPUs faulting in the same VMA) and falls back to
//! `mmap_read_lock` only when a writer has write-locked that VMA
//! (`vma_start_write`, which lasts until `mmap_write_downgrade` or
//! `mmap_write_unlock`); a munmap holds the lock for write while it detaches
//! its VMAs and for read while it zaps and frees. The host-level waits for
//! the guard cost no virtual time: a CPU's clock is set back to where its
//! wait began, and what the kernel would wait for is charged instead.

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
    /// A TLB flush through `flush_tlb_mm_range`: `tlb_finish_mmu` ending an
    /// unmap, and `ptep_clear_flush` of the zero page's entry in
    /// `wp_page_copy`.
    TlbFlush,
    /// Per existing VMA a write section changes (`__split_vma`,
    /// `vma_expand`, the detach in `vms_gather_munmap_vmas`): its
    /// `vma_start_write` and maple-tree store, with the mmap lock held for
    /// write.
    VmaWrite,
    /// Entry and exit of a system call that changes VMAs (mmap, munmap, madvise).
    Syscall,
}

pub const NR_STEPS: usize = 26;

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
        Step::VmaWrite,
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
            Step::VmaWrite => "vma_write",
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
    /// `mm->mmap_lock` in virtual time: a writer waiting for other writers
    /// and for readers (a munmap zapping after its downgrade, a fault that
    /// fell back), and a fault whose VMA is write-locked waiting in
    /// `mmap_read_lock` for the writer's downgrade or unlock.
    MmapLock,
    /// The per-VMA lock's reference count (`vma->vm_refcnt`): its cache
    /// line coming from the last CPU that took or dropped a reference, and
    /// the wait behind other CPUs' transfers of it.
    VmaLock,
    /// Waits at [`crate::mm::Point::Blocked`] that are not the mmap lock's:
    /// replay's barriers between threads (not a kernel lock).
    Blocked,
}

pub const NR_LOCKS: usize = 7;

impl LockClass {
    pub const ALL: [LockClass; NR_LOCKS] = [
        LockClass::Ptl,
        LockClass::PageTableLock,
        LockClass::ZoneLock,
        LockClass::LruLock,
        LockClass::MmapLock,
        LockClass::VmaLock,
        LockClass::Blocked,
    ];
    pub fn name(self) -> &'static str {
        match self {
            LockClass::Ptl => "ptl",
            LockClass::PageTableLock => "page_table_lock",
            LockClass::ZoneLock => "zone_lock",
            LockClass::LruLock => "lru_lock",
            LockClass::MmapLock => "mmap_lock",
            LockClass::VmaLock => "vma_lock",
            LockClass::Blocked => "barriers",
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
            (Step::VmaWrite, 300.0),
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

/// Holds of the mmap lock for read remembered per CPU: every fault that
/// fell back leaves one, and a munmap's zap (a long one) must not be
/// forgotten among other CPUs' while writers still arrive inside it.
const READ_HOLDS: usize = 4;

/// A lock's recent holds in virtual time, a ring.
#[derive(Clone, Default)]
struct LockState {
    holds: Vec<Hold>,
    next: usize,
}

impl LockState {
    fn push_ring(&mut self, h: Hold, cap: usize) {
        if self.holds.len() < cap {
            self.holds.push(h);
        } else {
            self.holds[self.next] = h;
            self.next = (self.next + 1) % cap;
        }
    }
    /// The end of a hold by another CPU that covers `t`, if any.
    fn covering(&self, t: u64, me: usize) -> Option<u64> {
        self.holds.iter().filter(|h| h.holder != me && h.from <= t && t < h.to).map(|h| h.to).max()
    }
    fn push(&mut self, h: Hold) {
        self.push_ring(h, HOLDS);
    }
    /// The latest end of the holds by other CPUs (those `of` accepts)
    /// that end after `t`.
    fn ending_after(&self, t: u64, me: usize, of: impl Fn(usize) -> bool) -> Option<u64> {
        self.holds.iter().filter(|h| h.holder != me && h.to > t && of(h.holder)).map(|h| h.to).max()
    }
}

/// The extent of a VMA a writer write-locked (`vma_start_write`) from
/// `from` until its downgrade or unlock at `to` (not a kernel structure:
/// the kernel marks the VMA itself, with `vm_lock_seq`).
#[derive(Clone, Copy)]
struct VmaWriteLock {
    from: u64,
    to: u64,
    holder: usize,
    start: u64,
    end: u64,
}

/// VMA write locks remembered (a ring): a write section locks a few VMAs.
const VMA_WRITE_LOCKS: usize = 64;

/// What a CPU holds of the mmap lock in virtual time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MmapHeld {
    None,
    /// For write since `from` (`mmap_write_lock`).
    Write {
        from: u64,
    },
    /// For read since `from`, after `mmap_write_downgrade`.
    Downgraded {
        from: u64,
    },
}

/// How the current fault of a CPU holds its VMA.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FaultLock {
    None,
    /// The per-VMA lock of the VMA known by `key` (a reference on its
    /// `vm_refcnt`).
    Vma {
        key: usize,
    },
    /// `vma_start_read` failed: `mmap_read_lock`, taken at `from`.
    MmapRead {
        from: u64,
    },
}

/// A `vm_refcnt` cache line: the CPU that last changed it, and the
/// transfers of it in virtual time (each one a hold of the line).
#[derive(Clone)]
struct RefcntLine {
    last: usize,
    holds: LockState,
}

/// No CPU (a line not touched yet).
const NO_CPU: usize = usize::MAX;

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
    /// The mmap lock in virtual time: its holds for write and for read.
    mmap_write: LockState,
    /// Per CPU (see [`READ_HOLDS`]).
    mmap_read: Vec<LockState>,
    mmap_held: Vec<MmapHeld>,
    /// VMA write locks, and the latest end among them (a fault after it
    /// need not look).
    vma_wlocks: Vec<VmaWriteLock>,
    vma_wlocks_next: usize,
    vma_wlocks_end: u64,
    /// `vm_refcnt` lines, by VMA.
    refcnt: AddrMap<RefcntLine>,
    /// Each CPU's current fault: how it holds its VMA, and the address.
    fault_lock: Vec<FaultLock>,
    fault_addr: Vec<u64>,
    /// Each CPU's last fault under a per-VMA lock: (address, start, end),
    /// what a writer's `vma_start_write` waits for.
    last_fault: Vec<(u64, u64, u64)>,
    /// Virtual time each CPU spent at blocked points (ns, count), and where
    /// a host-level wait for the mmap lock began: (clock, those figures).
    blocked_by: Vec<(u64, u64)>,
    host_wait: Vec<Option<(u64, (u64, u64))>>,
    /// The mm of each CPU's task: the mmap lock and the VMA locks are
    /// shared only between CPUs of one mm (all of them, unless a workload
    /// runs processes, [`set_mm`]).
    mm_of: Vec<usize>,
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
            mmap_write: LockState::default(),
            mmap_read: vec![LockState::default(); ncpus],
            mmap_held: vec![MmapHeld::None; ncpus],
            vma_wlocks: Vec::new(),
            vma_wlocks_next: 0,
            vma_wlocks_end: 0,
            refcnt: AddrMap::default(),
            fault_lock: vec![FaultLock::None; ncpus],
            fault_addr: vec![0; ncpus],
            last_fault: vec![(0, 0, 0); ncpus],
            blocked_by: vec![(0, 0); ncpus],
            host_wait: vec![None; ncpus],
            mm_of: vec![0; ncpus],
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

    /// Time CPU `me` spent waiting at a blocked point.
    pub(crate) fn blocked(&mut self, me: usize, ns: u64) {
        self.lock_wait[LockClass::Blocked as usize] += ns;
        self.lock_contended[LockClass::Blocked as usize] += 1;
        let b = &mut self.blocked_by[me];
        b.0 += ns;
        b.1 += 1;
    }

    fn waited(&mut self, k: LockClass, ns: u64) {
        if ns > 0 {
            self.lock_wait[k as usize] += ns;
            self.lock_contended[k as usize] += 1;
        }
    }

    /// A host-level wait for the mmap lock's guard begins (the outermost one
    /// counts).
    fn host_wait_begin(&mut self, clock: u64, me: usize) {
        if self.host_wait[me].is_none() {
            self.host_wait[me] = Some((clock, self.blocked_by[me]));
        }
    }

    /// It ends: the clock goes back to where it began and the spinning it
    /// did is uncounted, so that only the waits modelled below cost time.
    fn host_wait_end(&mut self, clock: &mut u64, me: usize) {
        let Some((c, (ns, n))) = self.host_wait[me].take() else { return };
        let (now_ns, now_n) = self.blocked_by[me];
        self.lock_wait[LockClass::Blocked as usize] -= now_ns - ns;
        self.lock_contended[LockClass::Blocked as usize] -= now_n - n;
        self.blocked_by[me] = (ns, n);
        *clock = c;
    }

    /// `mmap_write_lock()` in virtual time: waits until every hold by
    /// another CPU, for write or for read, that ends later has ended. Not
    /// only those under way at this time: a writer's host-level wait can
    /// end after a writer that arrived later in virtual time went through,
    /// and the rwsem's queue would have put this one after it.
    fn mmap_write_lock(&mut self, clock: &mut u64, me: usize) {
        let start = *clock;
        let mine = self.mm_of[me];
        let w = self.mmap_write.ending_after(*clock, me, |c| self.mm_of[c] == mine);
        let r = self
            .mmap_read
            .iter()
            .enumerate()
            .filter(|(c, _)| self.mm_of[*c] == mine)
            .filter_map(|(_, h)| h.ending_after(*clock, me, |_| true))
            .max();
        if let Some(to) = w.max(r) {
            *clock = to + self.cacheline;
        }
        self.waited(LockClass::MmapLock, *clock - start);
        self.mmap_held[me] = MmapHeld::Write { from: *clock };
    }

    /// The end of the write hold (downgrade or unlock): `vma_start_write`
    /// of `wlocked` first waits for the faults in flight in them
    /// (`__vma_enter_locked`), then the `nr` VMAs are changed, and they stay
    /// write-locked with the hold.
    fn mmap_write_end(&mut self, clock: &mut u64, me: usize, from: u64, wlocked: &[(u64, u64)], nr: u64) {
        let start = *clock;
        let mut until = *clock;
        for (cpu, &(addr, f, t)) in self.last_fault.iter().enumerate() {
            if cpu != me
                && self.mm_of[cpu] == self.mm_of[me]
                && f <= from
                && from < t
                && wlocked.iter().any(|&(s, e)| s <= addr && addr < e)
            {
                until = until.max(t + self.cacheline);
            }
        }
        *clock = until;
        self.waited(LockClass::VmaLock, *clock - start);
        self.advance(clock, Step::VmaWrite, nr);
        self.mmap_write.push(Hold { from, to: *clock, holder: me });
        for &(s, e) in wlocked {
            let w = VmaWriteLock { from, to: *clock, holder: me, start: s, end: e };
            if self.vma_wlocks.len() < VMA_WRITE_LOCKS {
                self.vma_wlocks.push(w);
            } else {
                self.vma_wlocks[self.vma_wlocks_next] = w;
                self.vma_wlocks_next = (self.vma_wlocks_next + 1) % VMA_WRITE_LOCKS;
            }
            self.vma_wlocks_end = self.vma_wlocks_end.max(*clock);
        }
    }

    fn mmap_write_downgrade(&mut self, clock: &mut u64, me: usize, wlocked: &[(u64, u64)], nr: u64) {
        if let MmapHeld::Write { from } = self.mmap_held[me] {
            self.mmap_write_end(clock, me, from, wlocked, nr);
            self.mmap_held[me] = MmapHeld::Downgraded { from: *clock };
        }
    }

    fn mmap_write_unlock(&mut self, clock: &mut u64, me: usize, wlocked: &[(u64, u64)], nr: u64) {
        match self.mmap_held[me] {
            MmapHeld::Write { from } => self.mmap_write_end(clock, me, from, wlocked, nr),
            MmapHeld::Downgraded { from } => {
                self.mmap_read[me].push_ring(Hold { from, to: *clock, holder: me }, READ_HOLDS);
            }
            MmapHeld::None => {}
        }
        self.mmap_held[me] = MmapHeld::None;
    }

    /// Whether another CPU had write-locked the VMA at `addr` at `t`.
    fn vma_write_locked(&self, t: u64, me: usize, addr: u64) -> bool {
        t < self.vma_wlocks_end
            && self.vma_wlocks.iter().any(|w| {
                w.holder != me
                    && self.mm_of[w.holder] == self.mm_of[me]
                    && w.from <= t
                    && t < w.to
                    && w.start <= addr
                    && addr < w.end
            })
    }

    /// An atomic read-modify-write of the `vm_refcnt` of the VMA `key`:
    /// free if this CPU changed it last, else one cache-line transfer, after
    /// the transfers to other CPUs in progress at this time.
    fn refcnt_rmw(&mut self, clock: &mut u64, me: usize, key: usize) {
        let line = self.refcnt.entry(key).or_insert_with(|| RefcntLine { last: NO_CPU, holds: LockState::default() });
        if line.last == me {
            return;
        }
        let start = *clock;
        while let Some(to) = line.holds.covering(*clock, me) {
            *clock = to;
        }
        if line.last != NO_CPU {
            let from = *clock;
            *clock += self.cacheline;
            line.holds.push(Hold { from, to: *clock, holder: me });
        }
        line.last = me;
        self.waited(LockClass::VmaLock, *clock - start);
    }

    /// `lock_vma_under_rcu()` for a fault at `addr` in the VMA `key`; on
    /// failure (the VMA is write-locked), `mmap_read_lock()`.
    fn lock_vma_under_rcu(&mut self, clock: &mut u64, me: usize, addr: u64, key: usize) {
        self.fault_addr[me] = addr;
        if self.vma_write_locked(*clock, me, addr) {
            let start = *clock;
            let mine = self.mm_of[me];
            while let Some(to) = self
                .mmap_write
                .holds
                .iter()
                .filter(|h| h.holder != me && self.mm_of[h.holder] == mine && h.from <= *clock && *clock < h.to)
                .map(|h| h.to)
                .max()
            {
                *clock = to + self.cacheline;
            }
            self.waited(LockClass::MmapLock, *clock - start);
            self.fault_lock[me] = FaultLock::MmapRead { from: *clock };
        } else {
            // VMAs of different mms are different lines.
            let key = key ^ (self.mm_of[me] << 48);
            self.refcnt_rmw(clock, me, key);
            self.fault_lock[me] = FaultLock::Vma { key };
        }
    }

    /// `vma_end_read()` or `mmap_read_unlock()` at the end of a fault.
    fn fault_unlock(&mut self, clock: &mut u64, me: usize) {
        match std::mem::replace(&mut self.fault_lock[me], FaultLock::None) {
            FaultLock::None => {}
            FaultLock::Vma { key } => {
                self.refcnt_rmw(clock, me, key);
                self.last_fault[me] = (self.fault_addr[me], self.fault_start[me], *clock);
            }
            FaultLock::MmapRead { from } => {
                self.mmap_read[me].push_ring(Hold { from, to: *clock, holder: me }, READ_HOLDS);
            }
        }
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

/// The fault begun last on this CPU returns to user space, dropping what
/// it held of its VMA.
#[inline(always)]
pub fn fault_end() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.fault_unlock(clock, me);
        vt.advance(clock, Step::FaultExit, 1);
        let l = *clock - vt.fault_start[me];
        vt.latencies.push(l);
    });
}

/// `lock_vma_under_rcu()` of the running CPU's fault at `addr`, in the VMA
/// that starts at `vma_start` (what tells VMAs apart in virtual time).
#[inline(always)]
pub fn lock_vma_under_rcu(addr: u64, vma_start: u64) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.lock_vma_under_rcu(clock, me, addr, vma_start as usize);
    });
}

/// The running CPU's task belongs to mm `id` from now on (see
/// [`crate::drive::workload::Workload::processes`]); every CPU starts in mm 0.
#[inline(always)]
pub fn set_mm(id: usize) {
    with(|t, me| {
        let (_, vt) = t.parts(me);
        vt.mm_of[me] = id;
    });
}

/// The running CPU starts waiting for the mmap lock's host-level guard.
#[inline(always)]
pub fn host_wait_begin() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.host_wait_begin(*clock, me);
    });
}

/// Its wait for the guard is over (see [`VTime::host_wait_end`]).
#[inline(always)]
pub fn host_wait_end() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.host_wait_end(clock, me);
    });
}

/// `mmap_write_lock()` in virtual time, once the guard is held.
#[inline(always)]
pub fn mmap_write_lock() {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.mmap_write_lock(clock, me);
    });
}

/// `mmap_write_downgrade()` of a munmap, with the extents of the VMAs its
/// write section write-locked and the number of VMAs it changed.
#[inline(always)]
pub fn mmap_write_downgrade(wlocked: &[(u64, u64)], nr: u64) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.mmap_write_downgrade(clock, me, wlocked, nr);
    });
}

/// `mmap_write_unlock()` (or `mmap_read_unlock()` after a downgrade), with
/// the extents write-locked and the VMAs changed since the write lock (or
/// the downgrade) was taken.
#[inline(always)]
pub fn mmap_write_unlock(wlocked: &[(u64, u64)], nr: u64) {
    with(|t, me| {
        let (clock, vt) = t.parts(me);
        vt.mmap_write_unlock(clock, me, wlocked, nr);
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

    #[test]
    fn a_writer_waits_for_a_zap_under_the_downgraded_lock_and_faults_do_not() {
        let p = CostProfile::default();
        let mut vt = VTime::new(&p, 3, 10, 20);
        let line = p.cacheline_ns as u64;
        // CPU 0: write lock at 1000, detaches [0x10000, 0x20000) (one VMA
        // changed), downgrades, zaps until 50000.
        let mut c0 = 1000;
        vt.mmap_write_lock(&mut c0, 0);
        vt.mmap_write_downgrade(&mut c0, 0, &[(0x10000, 0x20000)], 1);
        let down = c0;
        assert_eq!(down, 1000 + p.step_ns[Step::VmaWrite as usize] as u64);
        c0 = 50_000;
        vt.mmap_write_unlock(&mut c0, 0, &[], 0);
        // A fault in the write-locked VMA before the downgrade falls back
        // and waits for it; one elsewhere, or after it, does not wait.
        let mut c1 = 1100;
        vt.lock_vma_under_rcu(&mut c1, 1, 0x18000, 0x10000);
        assert_eq!(c1, down + line);
        assert_eq!(vt.fault_lock[1], FaultLock::MmapRead { from: down + line });
        let mut c2 = 1100;
        vt.lock_vma_under_rcu(&mut c2, 2, 0x30000, 0x30000);
        assert_eq!(c2, 1100);
        let mut c2 = down + 10;
        vt.lock_vma_under_rcu(&mut c2, 2, 0x18000, 0x10000);
        assert_eq!(c2, down + 10, "the zap after the downgrade holds off no fault");
        // A writer arriving during the zap waits for its end.
        let mut w = 20_000;
        vt.mmap_write_lock(&mut w, 2);
        assert_eq!(w, 50_000 + line);
        assert_eq!(vt.lock_wait[LockClass::MmapLock as usize], (down + line - 1100) + (50_000 + line - 20_000));
    }

    #[test]
    fn a_vm_refcnt_line_costs_a_transfer_only_when_another_cpu_changed_it_last() {
        let p = CostProfile::default();
        let mut vt = VTime::new(&p, 2, 10, 20);
        let line = p.cacheline_ns as u64;
        let mut c0 = 0;
        vt.refcnt_rmw(&mut c0, 0, 7);
        vt.refcnt_rmw(&mut c0, 0, 7);
        assert_eq!(c0, 0, "a line no other CPU touched is local");
        let mut c1 = 0;
        vt.refcnt_rmw(&mut c1, 1, 7);
        assert_eq!(c1, line);
        // CPU 0 at 10 finds CPU 1's transfer in progress: waits for it, then
        // takes the line back.
        let mut c0 = 10;
        vt.refcnt_rmw(&mut c0, 0, 7);
        assert_eq!(c0, 2 * line);
        let mut c1 = 0;
        vt.refcnt_rmw(&mut c1, 1, 8);
        assert_eq!(c1, 0, "another VMA's line");
    }

    use crate::config::Config;
    use crate::drive::runner::{run_cpus, RunOptions, RunResult};
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
        // Four CPUs map and unmap side by side: their regions merge into one
        // VMA, whose vm_refcnt line they share, and each one's mmap and munmap
        // waits for the others' zaps under the downgraded lock.
        assert!(ns(&t.lock_wait_ns, "mmap_lock") > 0);
        assert!(ns(&t.lock_wait_ns, "vma_lock") > 0);
        assert_eq!(ns(&t.lock_wait_ns, "barriers"), 0, "the guard's host-level waits cost no virtual time");
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
    /// CPU 0 unmaps the first half of an 8 MiB VMA whose pages are all
    /// present (a long zap) while CPU 1 faults 64 pages, in the other half
    /// of that VMA (which the munmap splits, so write-locks) or in a VMA of
    /// its own.
    fn fault_beside_munmap(own_vma: bool) -> TimeStats {
        let mut c = Config::default();
        c.set_size_mode("2048kB=never").unwrap();
        c.memory.phys_bytes = 1 << 30;
        let mm = Mm::new(c).unwrap();
        let (x, y) = (crate::drive::workload::WORKLOAD_BASE, crate::drive::workload::WORKLOAD_BASE + (1 << 30));
        // Set up outside virtual time, CPU 1's per-CPU list filled too (by
        // a fault in a third VMA), so that no refill lengthens a fault.
        let mut cpus = vec![mm.cpu(0), mm.cpu(1)];
        let z = y + (1 << 30);
        mm.mmap(&mut cpus[0], x, 8 << 20, Default::default()).unwrap();
        mm.mmap(&mut cpus[0], y, 1 << 20, Default::default()).unwrap();
        mm.mmap(&mut cpus[0], z, 1 << 20, Default::default()).unwrap();
        for p in 0..1024 {
            mm.access(&mut cpus[0], x + p * 4096, true).unwrap();
        }
        mm.access(&mut cpus[1], z, true).unwrap();
        let target = if own_vma { y } else { x + (4 << 20) };
        // A write section long enough (three VMAs changed at 5 us) that
        // CPU 1's faults land in it whichever CPU runs first.
        let mut p = CostProfile::default();
        p.set("vma_write_ns", 5000.0).unwrap();
        let opts = RunOptions { threads: 2, deterministic: Some(0), check_invariants: true, time: Some(p) };
        let r = run_cpus(&mm, cpus, &opts, |t, cpu| {
            if t == 0 {
                return mm.munmap(cpu, x, 4 << 20).map(|_| 1).map_err(|e| (0, e));
            }
            for p in 0..64 {
                mm.access(cpu, target + p * 4096, true).map_err(|e| (p, e))?;
            }
            Ok(64)
        });
        assert!(r.error.is_none(), "{:?}", r.error);
        r.time.unwrap()
    }

    #[test]
    fn a_fault_waits_for_a_munmap_only_in_the_vma_it_write_locks_and_not_for_its_zap() {
        let split = fault_beside_munmap(false);
        let zap = ns(&split.breakdown_ns, "zap_pte") + ns(&split.breakdown_ns, "zap_folio");
        assert!(zap > 50_000, "a long zap: {zap} ns");
        // A fault in the VMA being split waits for the munmap's write hold
        // (the detach), not for the zap after the downgrade.
        let waited = ns(&split.lock_wait_ns, "mmap_lock");
        assert!(waited > 0, "no fault fell back to mmap_read_lock");
        assert!(waited < 25_000, "a fault waited {waited} ns: for the zap too");
        assert!(split.latency_max_ns < 30_000, "a fault took {} ns", split.latency_max_ns);
        // A fault in another VMA waits for nothing, and the munmap for no
        // fault of it.
        let own = fault_beside_munmap(true);
        assert_eq!(ns(&own.lock_wait_ns, "mmap_lock"), 0);
        assert_eq!(ns(&own.lock_wait_ns, "vma_lock"), 0);
        assert_eq!(ns(&own.lock_wait_ns, "barriers"), 0);
    }
}
