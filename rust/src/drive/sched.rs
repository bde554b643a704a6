//! The deterministic scheduler's decisions: which simulated CPU runs next.
//!
//! The mechanics (each CPU a coroutine, switched on one host thread) are in
//! [`super::coro`]; this file only decides. Two policies:
//!
//! - [`Seeded`]: at each point where the fault path can be overtaken
//!   ([`Point`]: the fault's entry, the windows inside it, a wait) a seeded
//!   generator decides whether to hand over and to whom, with the
//!   probability `Config::preempt`. It is not asked between accesses
//!   ([`Point::OpBoundary`] says why that changes no outcome): an access
//!   that hits runs on without a call, which is what lets a thousand CPUs
//!   interleave at nearly the speed of one. Nothing depends on host timing,
//!   so the same seed gives the same run, bit for bit, with any number of
//!   CPUs. (A seed's interleaving differs from the one the thread-based
//!   scheduler this replaced gave: the draws are mapped to a choice by a
//!   multiply instead of a division.)
//! - [`Timed`]: in virtual time (`--time`), the CPU with the smallest clock
//!   runs, checked at every point, between accesses too; the seed only
//!   orders CPUs whose clocks are equal.
//!
//! No CPU is ever switched out inside a spinlock's critical section (the
//! points lie outside them), so spinlocks are never found held in host
//! terms; the waits for the mmap lock and replay's barriers are
//! [`Point::Blocked`], which always hands over.

use crate::drive::vtime::VTime;
use crate::mm::Point;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// splitmix64, the generator every seeded decision draws from.
#[inline]
pub(crate) fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The scheduler of a run, of either kind.
pub(crate) enum Sched {
    Seeded(Seeded),
    Timed(Box<Timed>),
}

impl Sched {
    pub(crate) fn first(&mut self) -> Option<usize> {
        match self {
            Sched::Seeded(s) => s.first(),
            Sched::Timed(t) => t.first(),
        }
    }
    #[inline]
    pub(crate) fn point(&mut self, me: usize, p: Point) -> Option<usize> {
        match self {
            Sched::Seeded(s) => s.point(me, p),
            Sched::Timed(t) => t.point(me, p),
        }
    }
    pub(crate) fn finish(&mut self, me: usize) -> Option<usize> {
        match self {
            Sched::Seeded(s) => s.finish(me),
            Sched::Timed(t) => t.finish(me),
        }
    }
    /// The points at which this scheduler is asked ([`Point::bit`]).
    pub(crate) fn points(&self) -> u8 {
        match self {
            Sched::Seeded(_) => Seeded::POINTS,
            Sched::Timed(_) => Timed::POINTS,
        }
    }
}

/// What a scheduler tells the CPU at a point: keep running, or hand over.
pub(crate) trait Decide {
    /// The first CPU to run.
    fn first(&mut self) -> Option<usize>;
    /// CPU `me` reached point `p`: the CPU to switch to, if any.
    fn point(&mut self, me: usize, p: Point) -> Option<usize>;
    /// CPU `me` has nothing left to run: who runs next.
    fn finish(&mut self, me: usize) -> Option<usize>;
}

/// `r` mapped onto `0..n` by a multiply and a shift (Lemire's reduction):
/// uniform enough for a scheduler and without a division.
#[inline(always)]
fn below(r: u64, n: usize) -> usize {
    ((u128::from(r) * n as u128) >> 64) as usize
}

/// Seeded switches with a fixed probability per point.
pub(crate) struct Seeded {
    /// Unfinished CPUs, ascending.
    alive: Vec<usize>,
    rng: u64,
    first: Option<usize>,
    /// A draw below this switches: the probability of a switch at a
    /// fault-path point (widens race windows) scaled to 2^64.
    threshold: u64,
    /// Whether every draw switches (probability 1).
    always: bool,
}

impl Seeded {
    /// Every point but [`Point::OpBoundary`]: between two accesses nothing
    /// can overtake that [`Point::FaultEntry`] would not see (see there).
    pub(crate) const POINTS: u8 = Point::ALL & !Point::OpBoundary.bit();

    pub(crate) fn new(ncpus: usize, seed: u64, switch_prob: f64) -> Seeded {
        let mut rng = seed;
        let first = below(next(&mut rng), ncpus);
        let p = switch_prob.clamp(0.0, 1.0);
        Seeded {
            alive: (0..ncpus).collect(),
            rng,
            first: (ncpus > 0).then_some(first),
            threshold: (p * 18_446_744_073_709_551_616.0) as u64,
            always: p >= 1.0,
        }
    }

    /// A uniform pick among the unfinished CPUs other than `me`, in
    /// ascending order of id.
    #[inline]
    fn pick_other(&mut self, me: usize) -> Option<usize> {
        let n = self.alive.len();
        // While no CPU has finished, `alive[i] == i`: no search.
        let pos = if self.alive.get(me) == Some(&me) { Ok(me) } else { self.alive.binary_search(&me) };
        let others = n - usize::from(pos.is_ok());
        if others == 0 {
            return None;
        }
        let k = below(next(&mut self.rng), others);
        Some(match pos {
            Ok(p) if k >= p => self.alive[k + 1],
            _ => self.alive[k],
        })
    }
}

impl Decide for Seeded {
    fn first(&mut self) -> Option<usize> {
        self.first.take()
    }

    #[inline]
    fn point(&mut self, me: usize, p: Point) -> Option<usize> {
        if p == Point::OpBoundary {
            return None;
        }
        let switch = p == Point::Blocked || self.always || next(&mut self.rng) < self.threshold;
        if !switch {
            return None;
        }
        self.pick_other(me)
    }

    fn finish(&mut self, me: usize) -> Option<usize> {
        if let Ok(p) = self.alive.binary_search(&me) {
            self.alive.remove(p);
        }
        self.pick_other(me)
    }
}

/// Virtual time: the CPU with the smallest clock runs.
pub(crate) struct Timed {
    /// Each CPU's clock, virtual nanoseconds.
    pub(crate) clock: Vec<u64>,
    /// Seeded tie-break: equal clocks run in the order of these keys.
    key: Vec<u64>,
    /// The CPUs waiting to run (not the running one, not finished ones)
    /// that have work, and those that wait at a blocked point.
    ready: BinaryHeap<Reverse<(u64, u64, usize)>>,
    spinning: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// What a CPU waiting for the mmap lock or a barrier spends on one look
    /// at the word it waits on (one cache-line transfer); its clock moves
    /// past the earliest other CPU's by this, so waiting always progresses.
    spin_ns: u64,
    pub(crate) vt: VTime,
}

impl Timed {
    /// Every point: the clocks decide at each.
    pub(crate) const POINTS: u8 = Point::ALL;

    pub(crate) fn new(ncpus: usize, seed: u64, vt: VTime) -> Timed {
        let mut rng = seed;
        let key: Vec<u64> = (0..ncpus).map(|_| next(&mut rng)).collect();
        let ready = (0..ncpus).map(|i| Reverse((0, key[i], i))).collect();
        Timed { clock: vec![0; ncpus], key, ready, spinning: BinaryHeap::new(), spin_ns: vt.cacheline().max(1), vt }
    }

    /// CPU `me`'s clock and the rest of the virtual-time state.
    #[inline(always)]
    pub(crate) fn parts(&mut self, me: usize) -> (&mut u64, &mut VTime) {
        (&mut self.clock[me], &mut self.vt)
    }
}

impl Decide for Timed {
    fn first(&mut self) -> Option<usize> {
        let a = self.ready.peek().map(|r| r.0);
        let b = self.spinning.peek().map(|r| r.0);
        let h = match (a, b) {
            (None, None) => return None,
            (Some(_), None) => &mut self.ready,
            (None, Some(_)) => &mut self.spinning,
            (Some(a), Some(b)) => {
                if a <= b {
                    &mut self.ready
                } else {
                    &mut self.spinning
                }
            }
        };
        h.pop().map(|Reverse((_, _, i))| i)
    }

    #[inline]
    fn point(&mut self, me: usize, p: Point) -> Option<usize> {
        let a = self.ready.peek().map(|r| r.0);
        let b = self.spinning.peek().map(|r| r.0);
        let (t, k) = match (a, b) {
            (None, None) => return None,
            (Some(x), None) | (None, Some(x)) => (x.0, x.1),
            (Some(x), Some(y)) => {
                let m = x.min(y);
                (m.0, m.1)
            }
        };
        if p == Point::Blocked {
            // Spins until something changes: no earlier than the next step
            // of the earliest CPU that has work (or, when every other CPU
            // waits too, of the earliest of those).
            let until = a.map_or(t, |x| x.0);
            let was = self.clock[me];
            self.clock[me] = was.max(until) + self.spin_ns;
            self.vt.blocked(me, self.clock[me] - was);
        }
        if (t, k) < (self.clock[me], self.key[me]) {
            let n = self.first().expect("peeked");
            let e = Reverse((self.clock[me], self.key[me], me));
            if p == Point::Blocked {
                self.spinning.push(e);
            } else {
                self.ready.push(e);
            }
            return Some(n);
        }
        None
    }

    fn finish(&mut self, _me: usize) -> Option<usize> {
        self.first()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn seeded_picks_every_other_cpu_evenly_and_never_a_finished_one() {
        let n = 37;
        let mut s = Seeded::new(n, 5, 0.5);
        let me = s.first().unwrap();
        let mut hits = vec![0u32; n];
        let mut switches = 0;
        for _ in 0..100_000 {
            if let Some(o) = s.point(me, Point::AfterAlloc) {
                hits[o] += 1;
                switches += 1;
            }
        }
        assert!((48_000..52_000).contains(&switches), "{switches} switches at p = 0.5");
        assert_eq!(hits[me], 0, "never to itself");
        let (lo, hi) = hits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .fold((u32::MAX, 0), |(lo, hi), (_, &h)| (lo.min(h), hi.max(h)));
        assert!(lo > 1100 && hi < 1700, "uneven picks: {lo}..{hi}");
        let gone = (me + 1) % n;
        s.finish(gone);
        for _ in 0..10_000 {
            assert_ne!(s.point(me, Point::Blocked), Some(gone));
        }
    }

    #[test]
    fn seeded_switches_at_fault_entry_but_never_between_accesses() {
        let mut s = Seeded::new(4, 3, 1.0);
        let me = s.first().unwrap();
        assert_eq!(Sched::Seeded(Seeded::new(4, 3, 1.0)).points() & Point::OpBoundary.bit(), 0);
        for _ in 0..100 {
            assert_eq!(s.point(me, Point::OpBoundary), None);
        }
        assert!(s.point(me, Point::FaultEntry).is_some_and(|o| o != me));
    }

    #[test]
    fn timed_runs_the_earliest_clock_and_blocked_waits_progress() {
        let p = crate::drive::vtime::CostProfile { cacheline_ns: 10.0, ..Default::default() };
        let mut t = Timed::new(3, 1, VTime::new(&p, 3, 0, 0));
        let a = t.first().unwrap();
        t.clock[a] = 100;
        // Someone else is at 0: switch.
        let b = t.point(a, Point::AfterAlloc).unwrap();
        assert_ne!(a, b);
        t.clock[b] = 50;
        let c = t.point(b, Point::OpBoundary).unwrap();
        assert!(c != a && c != b, "the third CPU, still at 0, runs");
        // c blocks: its clock passes the earliest other (b at 50).
        let d = t.point(c, Point::Blocked).unwrap();
        assert_eq!(d, b);
        assert_eq!(t.clock[c], 60);
    }
}
