//! Loom model-checks the shipped fault path: `Mm::access` on two or three
//! simulated CPUs as loom threads, with the core built under `cfg(loom)`,
//! which switches its page-table entries, `struct page` words, spinlocks and
//! mmap-lock words to loom's atomics (see `rust/src/sync.rs`). Loom runs
//! every interleaving up to a preemption bound, and every value the C11
//! model lets each load return. Nothing here copies the fault path.
//!
//! After the threads join, the invariant checker (`Mm::check_invariants`)
//! verifies the state: every PTE maps a page of a live folio, mapcounts and
//! refcounts equal the entries, no page is mapped twice, nothing leaked.
//! Each scenario also asserts, over all executions, that the race paths it
//! is about were reached (from the core's own counters).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_fault`
#![cfg(loom)]

use anonfolio::{Config, Error, Mm, Policy, Stats};
use std::sync::{Arc, Mutex};

const BASE: u64 = 0x7f00_0000_0000;
const PAGE: u64 = 4096;

/// One CPU's accesses: (page index in the first PTE table, write).
type Program = &'static [(u64, bool)];

/// What the executions reached, from the core's counters.
#[derive(Default, Debug, Clone, Copy)]
struct Reached {
    races: bool,
    retries: bool,
    retries_twice: bool,
    refaults: bool,
    spurious: bool,
    wp_copy: bool,
    ptl_contended: bool,
    segv: bool,
}

impl Reached {
    fn add(&mut self, s: &Stats, segv: bool) {
        self.races |= s.race.races > 0;
        self.retries |= s.race.retries > 0;
        self.retries_twice |= s.race.retries > 1;
        self.refaults |= s.race.refaults > 0;
        self.spurious |= s.fault.spurious > 0;
        self.wp_copy |= s.fault.wp_copy > 0;
        self.ptl_contended |= s.ptl.contended > 0;
        self.segv |= segv;
    }
}

fn config(policy: Policy, sizes: &[&str]) -> Config {
    let mut c = Config { policy, ..Default::default() };
    for s in sizes {
        c.set_size_mode(s).unwrap();
    }
    c.set_size_mode("2048kB=never").unwrap();
    c.memory.phys_bytes = 16 << 20;
    c
}

/// The stack of each modelled CPU's thread.
const CPU_STACK: usize = 1 << 20;

/// Runs `progs`, each on a CPU of one mm
/// whose first PTE table exists (page 511 was written first, unless
/// `fresh_table`), then checks the invariants; returns what was reached.
fn scenario(
    name: &'static str,
    cfg: Config,
    bound: usize,
    fresh_table: bool,
    progs: &'static [Program],
    munmap_by: Option<usize>,
) -> Reached {
    let reached = Arc::new(Mutex::new(Reached::default()));
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let mut b = loom::model::Builder::new();
    // The setup and the invariant check read thousands of atomics (the
    // memory map, whole tables); each load is a branch to loom.
    b.max_branches = 1 << 20;
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        b.preemption_bound = Some(bound);
    }
    {
        let (reached, runs) = (reached.clone(), runs.clone());
        b.check(move || {
            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mm = Mm::new(cfg.clone()).unwrap();
            let mut setup = mm.cpu(99);
            mm.mmap(&mut setup, BASE, 2 << 20, anonfolio::MmapFlags { hugepage: true, ..Default::default() }).unwrap();
            if !fresh_table {
                mm.access(&mut setup, BASE + 511 * PAGE, true).unwrap();
            }
            drop(setup);
            let run = move |mm: Mm, id: usize| -> bool {
                let mut cpu = mm.cpu(id);
                if munmap_by == Some(id) {
                    mm.munmap(&mut cpu, BASE, 16 * PAGE).unwrap();
                    return false;
                }
                for &(i, write) in progs[id] {
                    match mm.access(&mut cpu, BASE + i * PAGE, write) {
                        Ok(()) => {}
                        // Only a concurrent munmap may take the page away.
                        Err(Error::Segv(_)) if munmap_by.is_some() => return true,
                        Err(e) => panic!("CPU {id}: {e}"),
                    }
                }
                false
            };
            // Every CPU on a thread of its own with a host-sized stack: the
            // model's main thread has the generator's 32 KiB, which the
            // inlined fault path outgrows with loom's atomics.
            let hs: Vec<_> = (0..progs.len())
                .map(|id| {
                    let mm = mm.clone();
                    loom::thread::Builder::new().stack_size(CPU_STACK).spawn(move || run(mm, id)).unwrap()
                })
                .collect();
            let mut segv = false;
            for h in hs {
                segv |= h.join().unwrap();
            }
            if let Err(e) = mm.check_invariants() {
                panic!("{name}: {e}");
            }
            let s = mm.stats();
            // Every access that did not fault away mapped its page.
            if munmap_by.is_none() {
                let written: std::collections::BTreeSet<u64> =
                    progs.iter().flat_map(|p| p.iter()).filter(|a| a.1).map(|a| a.0).collect();
                assert!(s.rss_pages as usize >= written.len() + usize::from(!fresh_table), "{name}: {s:?}");
            }
            reached.lock().unwrap().add(&s, segv);
        });
    }
    let r = *reached.lock().unwrap();
    eprintln!(
        "{name}: {} executions in {:.1?}; reached {r:?}",
        runs.load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed()
    );
    r
}

const MTHP: &[&str] = &["16kB=always", "32kB=always"];

/// Upstream, both CPUs write the same page: the loser's re-check under the
/// PTL finds the range taken, it drops its folio; the re-executed access
/// finds the PTE.
#[test]
fn upstream_same_page() {
    let r =
        scenario("upstream_same_page", config(Policy::Upstream, MTHP), 2, false, &[&[(2, true)], &[(2, true)]], None);
    assert!(r.races && r.ptl_contended, "{r:?}");
}

/// Upstream, a write whose 32 KiB range loses to a zero-page read elsewhere
/// in it: not mapped, the PTE still none, so the access faults again and
/// maps a smaller folio.
#[test]
fn upstream_refault_after_lost_race() {
    let r = scenario(
        "upstream_refault_after_lost_race",
        config(Policy::Upstream, MTHP),
        2,
        false,
        &[&[(5, false)], &[(2, true)]],
        None,
    );
    assert!(r.races && r.refaults, "{r:?}");
}

/// v1, a lost race with the faulting PTE still none: it retries one order
/// lower inside the same fault, without refaulting.
#[test]
fn v1_lower_order_retry() {
    let r = scenario("v1_lower_order_retry", config(Policy::V1, MTHP), 2, false, &[&[(5, false)], &[(2, true)]], None);
    assert!(r.races && r.retries, "{r:?}");
}

/// v1: the retry one order lower can lose again (32 KiB, then 16 KiB, then
/// order 0) when the other CPU maps into both ranges, one read at a time.
#[test]
fn v1_lower_order_retry_twice() {
    let r = scenario(
        "v1_lower_order_retry_twice",
        config(Policy::V1, MTHP),
        3,
        false,
        &[&[(2, true)], &[(7, false), (1, false)]],
        None,
    );
    assert!(r.retries_twice, "{r:?}");
}

/// Preferred, a write racing a read elsewhere in its range: the lost race
/// refaults and falls back to order 0.
#[test]
fn preferred_vs_read() {
    let r =
        scenario("preferred_vs_read", config(Policy::Preferred, MTHP), 2, false, &[&[(5, false)], &[(2, true)]], None);
    assert!(r.races && r.refaults, "{r:?}");
}

/// A zero-page read and a write on the same page: the write either wins, or
/// finds the zero page and copies it (do_wp_page).
#[test]
fn read_vs_write_same_page() {
    let r = scenario(
        "read_vs_write_same_page",
        config(Policy::Upstream, MTHP),
        2,
        false,
        &[&[(3, false)], &[(3, true)]],
        None,
    );
    assert!(r.wp_copy && r.races, "{r:?}");
}

/// Two CPUs fault where no PTE table exists yet: both allocate one and the
/// loser of `pmd_install` frees its copy (the checker finds no second table).
#[test]
fn pte_table_install_race() {
    let r =
        scenario("pte_table_install_race", config(Policy::Upstream, &[]), 2, true, &[&[(0, true)], &[(1, true)]], None);
    assert!(!r.races, "order-0 writes to different pages cannot lose: {r:?}");
}

/// A fault against a munmap of its range: the mmap lock orders them, so the
/// access either maps before the zap (which frees it) or faults with SIGSEGV
/// after; nothing is left mapped or leaked either way.
#[test]
fn fault_against_munmap() {
    let r = scenario("fault_against_munmap", config(Policy::Upstream, MTHP), 2, false, &[&[(2, true)], &[]], Some(1));
    assert!(r.segv, "some execution must run the munmap first: {r:?}");
}
