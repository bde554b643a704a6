//! Loom model of the anonymous fault path's race handling (rust/src/fault.rs).
//!
//! Two simulated CPUs fault on one PTE table. Each step below is a copy of
//! the real code with the same atomic orderings, rewritten on loom's atomics
//! so that loom explores every interleaving (up to a preemption bound) and
//! every value a Relaxed/Acquire load may return under the C11 model:
//!
//! - `SpinLock` is `locks.rs`: compare_exchange_weak(Acquire, Relaxed), a
//!   contended loop spinning on a Relaxed load, unlock by a Release store. It
//!   guards a `loom::cell::UnsafeCell` (the real lock's `data`), so a lock
//!   that did not order its critical sections would be reported as a race.
//! - `PteTable` is `pgtable.rs`: `get` = Acquire load (`ptep_get_lockless`),
//!   `range_none`/`first_set` = Relaxed loads, `set_ptes` = Release stores.
//! - `Page` is the folio head of `page_alloc.rs`: `count` and `info` written
//!   with Relaxed stores, at allocation outside the PTL and at mapping under it.
//! - The allocator is the per-CPU (pcp) fast path: each CPU hands out its own
//!   naturally aligned folios, so it needs no shared state.
//! - `access` is `access_locked`, `handle_pte_fault`, `do_anonymous_page`,
//!   `alloc_anon_folio` (all three policies) and `do_wp_page`.
//!
//! Not modelled: the PMD level (the PTE table exists before the threads
//! start), memcg charging and allocation failures (both always succeed), zap
//! (which runs under the mmap lock for write and so never races a fault).
//!
//! After both threads join, `check` verifies the final state against the
//! per-CPU logs and counters; every scenario also asserts, over all explored
//! executions, that the race paths it is about were actually reached.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release --test loom_race`
//! (see tests/LOOM.md).
#![cfg(loom)]
// VMA_START is 0, but the bounds checks are kept as fault.rs has them.
#![allow(clippy::absurd_extreme_comparisons)]

use anonfolio::fault::{folio_mk_pte, pte_order};
use anonfolio::page_alloc::{MAPCOUNT_MASK, ORDER_MASK, ORDER_SHIFT, PG_HEAD};
use anonfolio::pgtable::{pte_pfn, PTE_PFN_SHIFT, PTE_WRITE, PTE_ZERO, ZERO_PTE};
use anonfolio::Policy;
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use loom::sync::Arc;
use std::sync::Mutex;

/// PTEs in the model's table: an order-2 folio covers 4, an order-3 one all 8.
const NPTE: usize = 8;
/// The model's `PMD_ORDER - 1`: the highest PTE-mapped order.
const MAX_PTE_ORDER: usize = 3;
/// Enabled mTHP orders (`vma.orders` below the PMD order): 8 and 4 pages.
const ORDERS: u32 = (1 << 3) | (1 << 2);
/// Every PTE-mapped mTHP order: 8, 4 and 2 pages.
const ALL_ORDERS: u32 = (1 << 3) | (1 << 2) | (1 << 1);
/// Folios each CPU may allocate in one execution (a bound, asserted).
const SLOTS: usize = 6;
/// At most this many CPUs (loom threads, the model's main thread included).
const MAX_CPUS: usize = 3;
/// The VMA covers the whole table (`thp_vma_suitable_order` always holds).
const VMA_START: usize = 0;
const VMA_END: usize = NPTE;

// ---------------------------------------------------------------------------
// locks.rs

struct SpinLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

impl<T> SpinLock<T> {
    fn new(data: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), data: UnsafeCell::new(data) }
    }

    /// `SpinLock::lock`: fast path of one CAS, then `lock_contended`.
    fn lock(&self, cpu: &mut Cpu) -> SpinGuard<'_, T> {
        cpu.c.ptl_acquisitions += 1;
        if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            cpu.c.ptl_contended += 1;
            loop {
                while self.locked.load(Relaxed) {
                    // spin_loop()/yield_now(): loom must switch threads here.
                    loom::thread::yield_now();
                }
                if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_ok() {
                    break;
                }
            }
        }
        SpinGuard { lock: self }
    }
}

struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinGuard<'_, T> {
    fn with_mut<R>(&mut self, f: impl FnOnce(*mut T) -> R) -> R {
        self.lock.data.with_mut(f)
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Release);
    }
}

// ---------------------------------------------------------------------------
// pgtable.rs

struct PteTable {
    /// The PTL; its data counts critical sections (a race detector witness).
    ptl: SpinLock<u64>,
    ptes: [AtomicU64; NPTE],
}

impl PteTable {
    fn new() -> Self {
        PteTable { ptl: SpinLock::new(0), ptes: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
    /// `ptep_get_lockless()`: Acquire.
    fn get(&self, i: usize) -> u64 {
        self.ptes[i].load(Acquire)
    }
    /// `pte_range_none()`: Relaxed, stops at the first populated entry.
    fn range_none(&self, i: usize, nr: usize) -> bool {
        self.ptes[i..i + nr].iter().all(|p| p.load(Relaxed) == 0)
    }
    /// `first_set()`: Relaxed.
    fn first_set(&self, i: usize, nr: usize) -> usize {
        self.ptes[i..i + nr].iter().position(|p| p.load(Relaxed) != 0).map_or(i + nr, |k| i + k)
    }
    /// Model bookkeeping only, not in the real code: a plain read of a PTE
    /// under the PTL, with no scheduling point. Loom checks that every store
    /// to the entry happens-before it (all PTE writers hold the PTL).
    fn peek(&self, i: usize) -> u64 {
        unsafe { self.ptes[i].unsync_load() }
    }
    /// `set_ptes()`: Release stores, pfn + k for a folio, the same for zero.
    fn set_ptes(&self, i: usize, pte: u64, nr: usize) {
        let step = if pte & PTE_ZERO != 0 { 0 } else { 1 << PTE_PFN_SHIFT };
        for (k, e) in self.ptes[i..i + nr].iter().enumerate() {
            e.store(pte + step * k as u64, Release);
        }
    }
}

// ---------------------------------------------------------------------------
// page_alloc.rs: folio heads, one per folio the CPUs can allocate.

struct Page {
    count: AtomicU32,
    info: AtomicU32,
}

/// Folio `f` (CPU `f / SLOTS`, slot `f % SLOTS`) starts at pfn `(f + 1) * 8`:
/// aligned to every order up to 3, and never pfn 0.
fn folio_pfn(f: usize) -> u64 {
    (f as u64 + 1) * NPTE as u64
}
fn pfn_folio(pfn: u64) -> Option<usize> {
    let f = (pfn / NPTE as u64).checked_sub(1)? as usize;
    (f < MAX_CPUS * SLOTS).then_some(f)
}

struct Shared {
    t: PteTable,
    pages: Vec<Page>,
    policy: Policy,
    /// `vma.orders` (mTHP orders only; order 0 is always possible).
    orders: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Done,
    Retry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Allocated, not yet mapped or dropped (must not survive a fault).
    Pending,
    /// Mapped at PTE index `i` by `set_ptes`.
    Mapped { i: usize },
    /// Dropped after a lost race on `[i, i + nr)`; `lower` if v1 retried one
    /// order lower; `pte` is the faulting PTE seen under the PTL.
    Wasted { i: usize, lower: bool, pte: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Alloc {
    folio: usize,
    order: usize,
    /// Which access of this CPU allocated it.
    access: usize,
    fate: Fate,
}

/// Per-CPU counters, named as in stats.rs (`race.*`, `fault.*`, `vm.*`).
#[derive(Default, Debug, Clone)]
struct Counters {
    pgfault: u64,
    refaults: u64,
    races: u64,
    folios_wasted: u64,
    pages_wasted: u64,
    retries: u64,
    anonymous: u64,
    zero_page: u64,
    wp_copy: u64,
    spurious: u64,
    rss: u64,
    pgalloc: u64,
    pgfree: u64,
    /// Not in stats.rs: Retry returns of `handle_pte_fault`, and how many of
    /// them found the PTE populated on re-execution.
    retry_returns: u64,
    retry_then_present: u64,
    ptl_acquisitions: u64,
    ptl_contended: u64,
}

struct Cpu {
    id: usize,
    access: usize,
    allocs: Vec<Alloc>,
    c: Counters,
}

// Coverage bits, gathered over all executions of one scenario.
const COV_LOST_RACE: u32 = 1 << 0;
const COV_LOST_RACE_COVERED: u32 = 1 << 1;
const COV_V1_LOWER: u32 = 1 << 2;
const COV_REFAULT: u32 = 1 << 3;
const COV_WP_COPY: u32 = 1 << 4;
const COV_WP_RACE: u32 = 1 << 5;
const COV_CONTENDED: u32 = 1 << 6;
const COV_SPURIOUS: u32 = 1 << 7;
const COV_READ_LOST: u32 = 1 << 8;
const COV_V1_LOWER_TWICE: u32 = 1 << 9;
const COV_NAMES: [&str; 10] = [
    "lost race, faulting PTE none",
    "lost race, faulting PTE covered",
    "v1 retry one order lower",
    "refault after Retry",
    "wp copy of the zero page",
    "wp copy lost its race",
    "contended PTL",
    "spurious fault",
    "read fault found PTE populated",
    "v1 retried lower twice in one fault",
];

fn align_down(i: usize, order: usize) -> usize {
    i & !((1 << order) - 1)
}
/// `highest_order()`.
fn highest_order(orders: u32) -> usize {
    31 - orders.leading_zeros() as usize
}
/// `next_order()`.
fn next_order(orders: &mut u32, prev: usize) -> usize {
    *orders &= !(1 << prev);
    if *orders == 0 {
        0
    } else {
        highest_order(*orders)
    }
}
/// `thp_vma_suitable_order()`.
fn suitable(idx: usize, order: usize) -> bool {
    let a = align_down(idx, order);
    a >= VMA_START && a + (1 << order) <= VMA_END
}

impl Shared {
    fn page(&self, pfn: u64) -> &Page {
        &self.pages[pfn_folio(pfn).expect("pfn of a model folio")]
    }

    /// `vma_alloc_folio()`: refcount 1, head with the order, no mappings.
    fn vma_alloc_folio(&self, cpu: &mut Cpu, order: usize) -> u64 {
        let slot = cpu.allocs.len();
        assert!(slot < SLOTS, "cpu {} allocated more than {SLOTS} folios in one execution", cpu.id);
        let f = cpu.id * SLOTS + slot;
        cpu.allocs.push(Alloc { folio: f, order, access: cpu.access, fate: Fate::Pending });
        cpu.c.pgalloc += 1 << order;
        let p = &self.pages[f];
        p.count.store(1, Relaxed);
        p.info.store(PG_HEAD | (order as u32) << ORDER_SHIFT, Relaxed);
        folio_pfn(f)
    }

    /// `waste_folio()` + `free_folio()`: counters, then `PageAlloc::free`
    /// clears the head's info.
    fn waste_folio(&self, cpu: &mut Cpu, pfn: u64, order: usize, i: usize, lower: bool, pte: u64) {
        cpu.c.races += 1;
        cpu.c.folios_wasted += 1;
        cpu.c.pages_wasted += 1 << order;
        cpu.c.pgfree += 1 << order;
        self.page(pfn).info.store(0, Relaxed);
        let a = cpu.allocs.iter_mut().rev().find(|a| folio_pfn(a.folio) == pfn).unwrap();
        assert_eq!(a.fate, Fate::Pending);
        a.fate = Fate::Wasted { i, lower, pte };
    }

    fn mapped(&self, cpu: &mut Cpu, pfn: u64, i: usize) {
        let a = cpu.allocs.iter_mut().rev().find(|a| folio_pfn(a.folio) == pfn).unwrap();
        assert_eq!(a.fate, Fate::Pending);
        a.fate = Fate::Mapped { i };
    }

    /// `alloc_anon_folio()` of the policy; the caller has `max_order`.
    fn alloc_anon_folio(&self, cpu: &mut Cpu, idx: usize, max_order: usize) -> (u64, usize) {
        let t = &self.t;
        let mut orders = self.orders & ((2 << max_order) - 1);
        if orders != 0 {
            match self.policy {
                Policy::Upstream => {
                    // thp_vma_suitable_orders().
                    let mut order = highest_order(orders);
                    while orders != 0 && !suitable(idx, order) {
                        order = next_order(&mut orders, order);
                    }
                    // The lockless estimate: drop orders whose range is not none.
                    while orders != 0 {
                        let a = align_down(idx, order);
                        if t.range_none(a, 1 << order) {
                            break;
                        }
                        order = next_order(&mut orders, order);
                    }
                    // Point::AfterEstimate. Allocation cannot fail here.
                    if orders != 0 {
                        return (self.vma_alloc_folio(cpu, order), order);
                    }
                }
                Policy::V1 => {
                    // calc_anon_folio_order_alloc(), verbatim.
                    let mut order = highest_order(orders);
                    let mut first_set = usize::MAX;
                    while order > 1 {
                        let nr = 1usize << order;
                        let a = align_down(idx, order);
                        if a >= VMA_START && a + nr <= VMA_END {
                            let i = a;
                            if first_set != usize::MAX && i + nr <= first_set && idx < first_set {
                                break;
                            }
                            if first_set == usize::MAX || i > first_set || i + nr > first_set {
                                let f = t.first_set(i, nr);
                                if f == i + nr {
                                    break;
                                }
                                first_set = f;
                            }
                        }
                        order -= 1;
                    }
                    // try_vma_alloc_movable_folio(): the first order > 1 succeeds.
                    if order > 1 {
                        return (self.vma_alloc_folio(cpu, order), order);
                    }
                }
                Policy::Preferred => {
                    let order = highest_order(orders);
                    let a = align_down(idx, order);
                    let fits = suitable(idx, order) && t.range_none(a, 1 << order);
                    if fits {
                        return (self.vma_alloc_folio(cpu, order), order);
                    }
                }
            }
        }
        // folio_prealloc(): order 0.
        (self.vma_alloc_folio(cpu, 0), 0)
    }

    /// `do_anonymous_page()`.
    fn do_anonymous_page(&self, cpu: &mut Cpu, cov: &mut u32, idx: usize, write: bool) -> Fault {
        let t = &self.t;
        if !write {
            // Read fault: the zero page, order 0, under the PTL.
            let mut g = t.ptl.lock(cpu);
            g.with_mut(|n| unsafe { *n += 1 });
            if t.get(idx) != 0 {
                *cov |= COV_READ_LOST;
                return Fault::Retry;
            }
            t.set_ptes(idx, ZERO_PTE, 1);
            drop(g);
            cpu.c.zero_page += 1;
            return Fault::Done;
        }
        let mut max_order = MAX_PTE_ORDER;
        loop {
            let (pfn, order) = self.alloc_anon_folio(cpu, idx, max_order);
            let nr = 1usize << order;
            let i = align_down(idx, order);
            // Point::AfterAlloc / BeforeLock, then the PTL.
            let mut g = t.ptl.lock(cpu);
            g.with_mut(|n| unsafe { *n += 1 });
            // Re-check under the PTL.
            let unchanged = if nr == 1 { t.get(idx) == 0 } else { t.range_none(i, nr) };
            if !unchanged {
                let pte = t.peek(idx);
                *cov |= if pte == 0 { COV_LOST_RACE } else { COV_LOST_RACE_COVERED };
                if self.policy == Policy::V1 && nr > 1 && t.get(idx) == 0 {
                    // v1: the faulting PTE is still none: retry one order lower.
                    drop(g);
                    self.waste_folio(cpu, pfn, order, i, true, pte);
                    cpu.c.retries += 1;
                    *cov |= if max_order < MAX_PTE_ORDER { COV_V1_LOWER_TWICE } else { COV_V1_LOWER };
                    max_order = order - 1;
                    continue;
                }
                drop(g);
                self.waste_folio(cpu, pfn, order, i, false, pte);
                return Fault::Retry;
            }
            // folio_ref_add(nr - 1), folio_add_new_anon_rmap(), set_ptes().
            let p = self.page(pfn);
            p.count.store(nr as u32, Relaxed);
            p.info.store(PG_HEAD | (order as u32) << ORDER_SHIFT | nr as u32, Relaxed);
            t.set_ptes(i, folio_mk_pte(pfn, order), nr);
            drop(g);
            self.mapped(cpu, pfn, i);
            cpu.c.rss += nr as u64;
            cpu.c.anonymous += 1;
            return Fault::Done;
        }
    }

    /// `do_wp_page()` on the zero page: copy into an order-0 folio.
    fn do_wp_page(&self, cpu: &mut Cpu, cov: &mut u32, idx: usize, orig: u64) -> Fault {
        let t = &self.t;
        let pfn = self.vma_alloc_folio(cpu, 0);
        let mut g = t.ptl.lock(cpu);
        g.with_mut(|n| unsafe { *n += 1 });
        if t.get(idx) != orig {
            let cur = t.peek(idx);
            drop(g);
            *cov |= COV_WP_RACE;
            self.waste_folio(cpu, pfn, 0, idx, false, cur);
            return Fault::Retry;
        }
        let p = self.page(pfn);
        p.count.store(1, Relaxed);
        p.info.store(PG_HEAD | 1, Relaxed);
        t.ptes[idx].store(folio_mk_pte(pfn, 0), Release);
        drop(g);
        self.mapped(cpu, pfn, idx);
        *cov |= COV_WP_COPY;
        cpu.c.rss += 1;
        cpu.c.wp_copy += 1;
        Fault::Done
    }

    /// `handle_mm_fault()` -> `handle_pte_fault()` (the PMD is a PTE table).
    fn handle_pte_fault(&self, cpu: &mut Cpu, cov: &mut u32, idx: usize, write: bool) -> Fault {
        cpu.c.pgfault += 1;
        let pte = self.t.get(idx);
        if pte == 0 {
            return self.do_anonymous_page(cpu, cov, idx, write);
        }
        if write && pte & PTE_WRITE == 0 {
            return self.do_wp_page(cpu, cov, idx, pte);
        }
        *cov |= COV_SPURIOUS;
        cpu.c.spurious += 1;
        Fault::Done
    }

    /// `access_locked()`: the MMU's lockless walk, faulting until it passes.
    fn access(&self, cpu: &mut Cpu, cov: &mut u32, idx: usize, write: bool) {
        let mut tries = 0u32;
        let mut after_retry = false;
        loop {
            let pte = self.t.get(idx);
            if pte != 0 && (!write || pte & PTE_WRITE != 0) {
                if after_retry {
                    cpu.c.retry_then_present += 1;
                }
                break;
            }
            if tries > 0 {
                cpu.c.refaults += 1;
                *cov |= COV_REFAULT;
            }
            tries += 1;
            if self.handle_pte_fault(cpu, cov, idx, write) == Fault::Done {
                break;
            }
            cpu.c.retry_returns += 1;
            after_retry = true;
        }
        assert!(tries <= 4, "cpu {} faulted {tries} times on one access", cpu.id);
        // The access is satisfied: the PTE it needs is there, and through its
        // Acquire load the folio head written before set_ptes()'s Release is
        // visible without the PTL (what `set_ptes`'s comment promises).
        let pte = self.t.get(idx);
        assert!(pte != 0 && (!write || pte & PTE_WRITE != 0), "access to {idx} done but PTE {pte:#x}");
        if pte & PTE_ZERO == 0 {
            let order = pte_order(pte);
            let head = pte_pfn(pte) & !((1u64 << order) - 1);
            let p = self.page(head);
            let info = p.info.load(Relaxed);
            assert_eq!(info, PG_HEAD | (order as u32) << ORDER_SHIFT | 1 << order, "folio head not published with its PTE");
            assert_eq!(p.count.load(Relaxed), 1 << order);
        }
        cpu.access += 1;
    }
}

/// A thread's program: a list of (PTE index, write) accesses.
type Program = &'static [(usize, bool)];

struct Outcome {
    allocs: Vec<Alloc>,
    c: Counters,
    cov: u32,
}

fn run_cpu(sh: &Shared, id: usize, prog: Program) -> Outcome {
    let mut cpu = Cpu { id, access: 0, allocs: Vec::new(), c: Counters::default() };
    let mut cov = 0;
    for &(idx, write) in prog {
        sh.access(&mut cpu, &mut cov, idx, write);
    }
    if cpu.c.ptl_contended > 0 {
        cov |= COV_CONTENDED;
    }
    Outcome { allocs: cpu.allocs, c: cpu.c, cov }
}

/// The final-state checks, run after both threads joined.
fn check(sh: &Shared, progs: &[Program], outs: &[Outcome]) {
    let ptes: Vec<u64> = sh.t.ptes.iter().map(|p| p.load(Relaxed)).collect();
    let ctx = || format!("ptes {ptes:x?}");

    // Every touched PTE is present, and writable where written.
    for prog in progs {
        for &(idx, write) in prog.iter() {
            let pte = ptes[idx];
            assert!(pte != 0, "touched PTE {idx} is none; {}", ctx());
            if write {
                assert!(pte & PTE_WRITE != 0 && pte & PTE_ZERO == 0, "written PTE {idx} not writable; {}", ctx());
            }
        }
    }

    // Every present PTE maps the zero page (at a read-only-touched index) or
    // a page of a live folio, at the offset its folio's mapping implies.
    let mut maps = [0u32; MAX_CPUS * SLOTS];
    let mut zero_ptes = 0;
    for (idx, &pte) in ptes.iter().enumerate() {
        if pte == 0 {
            continue;
        }
        if pte == ZERO_PTE {
            zero_ptes += 1;
            let read_here = progs.iter().any(|p| p.iter().any(|&(i, w)| i == idx && !w));
            let written_here = progs.iter().any(|p| p.iter().any(|&(i, w)| i == idx && w));
            assert!(read_here && !written_here, "zero page at {idx}; {}", ctx());
            continue;
        }
        let order = pte_order(pte);
        let pfn = pte_pfn(pte);
        let head = pfn & !((1u64 << order) - 1);
        let f = pfn_folio(head).unwrap_or_else(|| panic!("PTE {idx} maps a stray pfn {pfn}; {}", ctx()));
        let a = outs
            .get(f / SLOTS)
            .and_then(|o| o.allocs.get(f % SLOTS))
            .unwrap_or_else(|| panic!("PTE {idx} maps unallocated folio {f}; {}", ctx()));
        assert_eq!(a.order, order, "PTE {idx} order");
        let Fate::Mapped { i } = a.fate else { panic!("PTE {idx} maps folio {f} in state {:?}; {}", a.fate, ctx()) };
        assert_eq!(i % (1 << order), 0, "folio {f} mapped unaligned");
        assert_eq!(idx as u64 - i as u64, pfn - head, "PTE {idx} maps the wrong page of folio {f}; {}", ctx());
        assert_eq!(pte, folio_mk_pte(head, order) + ((pfn - head) << PTE_PFN_SHIFT));
        maps[f] += 1;
    }

    // Each folio: mapped ones are whole, with mapcount and refcount equal to
    // the PTEs that map them; dropped ones are freed and unmapped.
    let (mut live, mut freed, mut live_pages, mut wasted_pages) = (0u64, 0u64, 0u64, 0u64);
    for (cpu, o) in outs.iter().enumerate() {
        for (k, a) in o.allocs.iter().enumerate() {
            assert_eq!(a.folio, cpu * SLOTS + k);
            let p = &sh.pages[a.folio];
            let (info, count) = (p.info.load(Relaxed), p.count.load(Relaxed));
            let nr = 1u32 << a.order;
            match a.fate {
                Fate::Pending => panic!("folio {} leaked: neither mapped nor freed", a.folio),
                Fate::Mapped { .. } => {
                    live += 1;
                    live_pages += nr as u64;
                    assert_eq!(maps[a.folio], nr, "folio {} mapped by {} PTEs, not {nr}; {}", a.folio, maps[a.folio], ctx());
                    assert_eq!(info & MAPCOUNT_MASK, maps[a.folio], "folio {} mapcount", a.folio);
                    assert_eq!(info & ORDER_MASK, (a.order as u32) << ORDER_SHIFT);
                    assert!(info & PG_HEAD != 0);
                    assert_eq!(count, maps[a.folio], "folio {} refcount", a.folio);
                }
                Fate::Wasted { i, lower, pte } => {
                    freed += 1;
                    wasted_pages += nr as u64;
                    assert_eq!(maps[a.folio], 0, "freed folio {} still mapped; {}", a.folio, ctx());
                    assert_eq!(info, 0, "freed folio {} head not cleared", a.folio);
                    // The race was real: some PTE of the range it lost is populated
                    // (PTEs are never cleared here).
                    assert!(ptes[i..i + nr as usize].iter().any(|&p| p != 0), "folio {} lost a race to nobody", a.folio);
                    if sh.policy == Policy::V1 && a.order > 1 && pte == 0 {
                        // v1: a lost race with the faulting PTE still none retries
                        // one order lower, within the same access.
                        assert!(lower, "v1 lost race with PTE none did not retry lower");
                        let next = o.allocs.get(k + 1).expect("v1 retry allocated nothing");
                        assert_eq!(next.access, a.access);
                        assert!(next.order < a.order, "v1 retry order {} not below {}", next.order, a.order);
                    } else {
                        assert!(!lower, "retry-lower outside v1's condition");
                    }
                }
            }
        }
    }
    // No leak, and the page-level view agrees: allocated == mapped + freed,
    // where "mapped" is what the PTEs reference and "freed" is what the heads say.
    let allocated: u64 = outs.iter().map(|o| o.allocs.len() as u64).sum();
    let distinct_mapped = maps.iter().filter(|&&m| m > 0).count() as u64;
    let heads_freed = outs.iter().flat_map(|o| o.allocs.iter()).filter(|a| sh.pages[a.folio].info.load(Relaxed) == 0).count() as u64;
    assert_eq!(allocated, distinct_mapped + heads_freed, "folio leak");
    assert_eq!((live, freed), (distinct_mapped, heads_freed));

    // Counters.
    let sum = |f: fn(&Counters) -> u64| outs.iter().map(|o| f(&o.c)).sum::<u64>();
    assert_eq!(sum(|c| c.races), freed, "races");
    assert_eq!(sum(|c| c.folios_wasted), freed, "folios_wasted");
    assert_eq!(sum(|c| c.pages_wasted), wasted_pages, "pages_wasted");
    assert_eq!(sum(|c| c.pgalloc), live_pages + wasted_pages, "pgalloc");
    assert_eq!(sum(|c| c.pgfree), wasted_pages, "pgfree");
    assert_eq!(sum(|c| c.rss), live_pages, "rss");
    assert_eq!(sum(|c| c.rss), ptes.iter().filter(|&&p| p != 0 && p != ZERO_PTE).count() as u64);
    assert_eq!(sum(|c| c.anonymous) + sum(|c| c.wp_copy), live, "mapped folios");
    // Zero-page PTEs are replaced only by a wp copy.
    assert_eq!(sum(|c| c.zero_page), zero_ptes + sum(|c| c.wp_copy), "zero_page");
    let lowered = outs.iter().flat_map(|o| o.allocs.iter()).filter(|a| matches!(a.fate, Fate::Wasted { lower: true, .. })).count();
    assert_eq!(sum(|c| c.retries), lowered as u64, "retries");
    if sh.policy != Policy::V1 {
        assert_eq!(sum(|c| c.retries), 0);
    }
    for (o, prog) in outs.iter().zip(progs.iter()) {
        let c = &o.c;
        // Every Retry re-executes the access: it either finds the PTE or faults again.
        assert_eq!(c.retry_returns, c.refaults + c.retry_then_present, "{c:?}");
        assert!(c.pgfault >= c.refaults && c.pgfault <= c.refaults + prog.len() as u64, "{c:?}");
        // Each wasted folio of a policy that gives up is one Retry (v1's
        // lowered ones are not); a wp copy's lost race is one too.
        let gave_up = o.allocs.iter().filter(|a| matches!(a.fate, Fate::Wasted { lower: false, .. })).count() as u64;
        let read_lost = c.retry_returns - gave_up;
        assert!(c.retry_returns >= gave_up, "{c:?}");
        if prog.iter().all(|&(_, w)| w) {
            assert_eq!(read_lost, 0, "{c:?}");
        }
    }
    // Every PTL critical section went through the lock's data.
    let sections = sh.t.ptl.data.with(|n| unsafe { *n });
    assert_eq!(sections, sum(|c| c.ptl_acquisitions), "PTL sections");
    assert!(!sh.t.ptl.locked.load(Relaxed), "PTL left locked");
}

/// Runs one scenario under loom and checks that `expect` coverage was hit.
/// CPU 0 runs on the model's main thread, the others on spawned threads.
/// `bound` is the preemption bound unless LOOM_MAX_PREEMPTIONS is set.
fn scenario(name: &str, policy: Policy, orders: u32, bound: usize, progs: &'static [Program], expect: u32) {
    assert!(progs.len() >= 2 && progs.len() <= MAX_CPUS);
    let cov = std::sync::Arc::new(Mutex::new(0u32));
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let mut b = loom::model::Builder::new();
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        b.preemption_bound = Some(bound);
    }
    {
        let (cov, runs) = (cov.clone(), runs.clone());
        b.check(move || {
            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sh = Arc::new(Shared {
                t: PteTable::new(),
                pages: (0..progs.len() * SLOTS).map(|_| Page { count: AtomicU32::new(0), info: AtomicU32::new(0) }).collect(),
                policy,
                orders,
            });
            let hs: Vec<_> = (1..progs.len())
                .map(|id| {
                    let sh = sh.clone();
                    loom::thread::spawn(move || run_cpu(&sh, id, progs[id]))
                })
                .collect();
            let mut outs = vec![run_cpu(&sh, 0, progs[0])];
            outs.extend(hs.into_iter().map(|h| h.join().unwrap()));
            check(&sh, progs, &outs);
            *cov.lock().unwrap() |= outs.iter().fold(0, |c, o| c | o.cov);
        });
    }
    let got = *cov.lock().unwrap();
    let names: Vec<&str> = (0..COV_NAMES.len()).filter(|b| got & 1 << b != 0).map(|b| COV_NAMES[b]).collect();
    eprintln!(
        "{name}: {} executions in {:.1?}; reached: {}",
        runs.load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed(),
        names.join(", ")
    );
    let missing: Vec<&str> = (0..COV_NAMES.len()).filter(|b| expect & 1 << b != 0 && got & 1 << b == 0).map(|b| COV_NAMES[b]).collect();
    assert!(missing.is_empty(), "{name}: paths never reached: {missing:?}");
}

// The scenarios. Indices are PTEs of the 8-entry table: [0..4) and [4..8)
// are the order-2 ranges, [0..8) the order-3 one. Two-CPU scenarios run with
// a preemption bound of 5 (those with one read fault are exhausted well
// before it); three-CPU ones with 1, as 2 already takes many minutes.

/// Upstream, both CPUs write the same page: the loser's PTE is covered, it
/// drops its folio and returns Retry; the re-executed access finds the PTE.
#[test]
fn upstream_same_page() {
    scenario(
        "upstream_same_page",
        Policy::Upstream,
        ORDERS,
        5,
        &[&[(2, true)], &[(2, true)]],
        COV_LOST_RACE_COVERED | COV_CONTENDED | COV_SPURIOUS,
    );
}

/// Upstream, neighbouring pages of one order-2 (and order-3) range.
#[test]
fn upstream_neighbouring_pages() {
    scenario(
        "upstream_neighbouring_pages",
        Policy::Upstream,
        ORDERS,
        5,
        &[&[(1, true)], &[(2, true)]],
        COV_LOST_RACE_COVERED | COV_CONTENDED,
    );
}

/// Upstream, a write whose order-3 range loses to a read fault's zero page
/// elsewhere in the range: Retry, the PTE is still none, so the access
/// faults again and maps a smaller folio.
#[test]
fn upstream_refault_after_lost_race() {
    scenario(
        "upstream_refault_after_lost_race",
        Policy::Upstream,
        ORDERS,
        5,
        &[&[(5, false)], &[(2, true)]],
        COV_LOST_RACE | COV_REFAULT | COV_READ_LOST,
    );
}

/// Upstream with orders 3, 2 and 1 enabled, two writes per CPU at both ends
/// of the table: folios of different orders interleave.
#[test]
fn upstream_two_writes_each_all_orders() {
    scenario(
        "upstream_two_writes_each_all_orders",
        Policy::Upstream,
        ALL_ORDERS,
        5,
        &[&[(0, true), (7, true)], &[(3, true), (4, true)]],
        COV_LOST_RACE_COVERED | COV_CONTENDED | COV_SPURIOUS,
    );
}

/// Upstream, three CPUs: two writes in different order-2 halves and a read.
#[test]
fn upstream_three_cpus() {
    scenario(
        "upstream_three_cpus",
        Policy::Upstream,
        ALL_ORDERS,
        1,
        &[&[(0, true)], &[(5, true)], &[(6, false)]],
        COV_LOST_RACE | COV_LOST_RACE_COVERED | COV_REFAULT | COV_READ_LOST | COV_CONTENDED,
    );
}

/// v1, neighbouring pages: the loser's PTE is covered by the winner's folio,
/// so it drops its folio and returns.
#[test]
fn v1_neighbouring_pages() {
    scenario("v1_neighbouring_pages", Policy::V1, ORDERS, 5, &[&[(1, true)], &[(6, true)]], COV_LOST_RACE_COVERED | COV_CONTENDED);
}

/// v1, a lost race with the faulting PTE still none (a zero page was mapped
/// elsewhere in its range): it retries one order lower, without refaulting.
#[test]
fn v1_lower_order_retry() {
    scenario("v1_lower_order_retry", Policy::V1, ORDERS, 5, &[&[(5, false)], &[(2, true)]], COV_LOST_RACE | COV_V1_LOWER);
}

/// v1, one CPU reads a page then writes a neighbour (a zero page, then an
/// order-2 folio beside it) while the other writes the other half.
#[test]
fn v1_two_accesses() {
    scenario("v1_two_accesses", Policy::V1, ORDERS, 5, &[&[(6, false), (1, true)], &[(4, true)]], COV_LOST_RACE | COV_V1_LOWER);
}

/// v1: a retry one order lower can lose again (order 3, then 2, then 0)
/// when the other CPU maps into both ranges, one read fault at a time.
#[test]
fn v1_lower_order_retry_twice() {
    scenario(
        "v1_lower_order_retry_twice",
        Policy::V1,
        ORDERS,
        5,
        &[&[(2, true)], &[(7, false), (1, false)]],
        COV_LOST_RACE | COV_V1_LOWER | COV_V1_LOWER_TWICE | COV_READ_LOST,
    );
}

/// v1, three CPUs: a write racing two read faults in its ranges.
#[test]
fn v1_three_cpus() {
    scenario(
        "v1_three_cpus",
        Policy::V1,
        ORDERS,
        1,
        &[&[(2, true)], &[(7, false)], &[(1, false)]],
        COV_LOST_RACE | COV_V1_LOWER | COV_READ_LOST,
    );
}

/// Preferred, neighbouring pages: order 3 or nothing, Retry on a lost race.
#[test]
fn preferred_neighbouring_pages() {
    scenario(
        "preferred_neighbouring_pages",
        Policy::Preferred,
        ORDERS,
        5,
        &[&[(1, true)], &[(2, true)]],
        COV_LOST_RACE_COVERED | COV_CONTENDED,
    );
}

/// Preferred, a write racing a read elsewhere in its range: the lost race
/// refaults and falls back to order 0.
#[test]
fn preferred_vs_read() {
    scenario("preferred_vs_read", Policy::Preferred, ORDERS, 5, &[&[(5, false)], &[(2, true)]], COV_LOST_RACE | COV_REFAULT);
}

/// A read fault (zero page) and a write fault on the same page: the write
/// either wins, or loses and copies the zero page (do_wp_page).
#[test]
fn read_vs_write_same_page() {
    scenario(
        "read_vs_write_same_page",
        Policy::Upstream,
        ORDERS,
        5,
        &[&[(3, false)], &[(3, true)]],
        COV_LOST_RACE_COVERED | COV_WP_COPY | COV_READ_LOST | COV_REFAULT,
    );
}

/// Two writes to a page that a third CPU reads: the zero page can appear
/// between one writer's lockless check and its do_wp_page re-check, and the
/// two wp copies race each other.
#[test]
fn read_vs_two_writes_same_page() {
    scenario(
        "read_vs_two_writes_same_page",
        Policy::Upstream,
        ORDERS,
        1,
        &[&[(3, true)], &[(3, false)], &[(3, true)]],
        COV_WP_COPY | COV_WP_RACE | COV_READ_LOST | COV_REFAULT,
    );
}
