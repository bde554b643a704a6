//! The deterministic scheduler's decisions: which simulated CPU runs next.
//!
//! The mechanics (each CPU a coroutine, switched on one host thread) are in
//! [`super::coro`]; this file only decides. Two policies:
//!
//! - [`Seeded`]: at each point where the fault path can be overtaken
//!   ([`Point`]) a seeded generator decides whether to hand over and to
//!   whom, with the probability `Config::preempt`. Nothing depends on host
//!   timing, so the same seed gives the same run, bit for bit, with any
//!   number of CPUs. The draws are those of the thread-based scheduler this
//!   replaced (same generator, same candidates in the same order), so a seed
//!   gives the same interleaving it gave there.
//! - [`Timed`]: in virtual time (`--time`), the CPU with the smallest clock
//!   runs; the seed only orders CPUs whose clocks are equal.
//!
//! No CPU is ever switched out inside a spinlock's critical section (the
//! points lie outside them), so spinlocks are never found held in host
//! terms; the waits for the mmap lock and replay's barriers are
//! [`Point::Blocked`], which always hands over.

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

/// Seeded switches with a fixed probability per point.
pub(crate) struct Seeded {
    /// Unfinished CPUs, ascending.
    alive: Vec<usize>,
    rng: u64,
    first: Option<usize>,
    /// Probability of a switch at a fault-path point (widens race windows).
    switch_prob: f64,
}

impl Seeded {
    pub(crate) fn new(ncpus: usize, seed: u64, switch_prob: f64) -> Seeded {
        let mut rng = seed;
        let first = (next(&mut rng) % ncpus.max(1) as u64) as usize;
        Seeded { alive: (0..ncpus).collect(), rng, first: (ncpus > 0).then_some(first), switch_prob }
    }

    /// A uniform pick among the unfinished CPUs other than `me`, in
    /// ascending order of id (as the thread-based scheduler listed them).
    fn pick_other(&mut self, me: usize) -> Option<usize> {
        let pos = self.alive.binary_search(&me);
        let others = self.alive.len() - usize::from(pos.is_ok());
        if others == 0 {
            return None;
        }
        let k = (next(&mut self.rng) % others as u64) as usize;
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
        let switch = p == Point::Blocked || {
            let r = (next(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
            r < self.switch_prob
        };
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
    /// The CPUs waiting to run (not the running one, not finished ones).
    ready: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// What a CPU waiting for the mmap lock or a barrier spends on one look
    /// at the word it waits on (one cache-line transfer); its clock moves
    /// past the earliest other CPU's by this, so waiting always progresses.
    spin_ns: u64,
}

impl Timed {
    pub(crate) fn new(ncpus: usize, seed: u64, spin_ns: u64) -> Timed {
        let mut rng = seed;
        let key: Vec<u64> = (0..ncpus).map(|_| next(&mut rng)).collect();
        let ready = (0..ncpus).map(|i| Reverse((0, key[i], i))).collect();
        Timed { clock: vec![0; ncpus], key, ready, spin_ns: spin_ns.max(1) }
    }
}

impl Decide for Timed {
    fn first(&mut self) -> Option<usize> {
        self.ready.pop().map(|Reverse((_, _, i))| i)
    }

    #[inline]
    fn point(&mut self, me: usize, p: Point) -> Option<usize> {
        let &Reverse((t, k, _)) = self.ready.peek()?;
        if p == Point::Blocked {
            // Spins until something changes: that is no earlier than the
            // earliest other CPU's next step.
            self.clock[me] = self.clock[me].max(t) + self.spin_ns;
        }
        if (t, k) < (self.clock[me], self.key[me]) {
            let Reverse((_, _, n)) = self.ready.pop().expect("peeked");
            self.ready.push(Reverse((self.clock[me], self.key[me], me)));
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

    /// The thread-based scheduler's pick, kept here to hold the new one to it.
    fn old_pick(done: &[bool], me: usize, rng: &mut u64) -> Option<usize> {
        let others: Vec<usize> = (0..done.len()).filter(|&i| i != me && !done[i]).collect();
        if others.is_empty() {
            return None;
        }
        Some(others[(next(rng) % others.len() as u64) as usize])
    }

    #[test]
    fn seeded_draws_the_thread_based_schedulers_sequence() {
        let n = 37;
        let mut s = Seeded::new(n, 5, 0.5);
        let mut rng = 5u64;
        assert_eq!(s.first(), Some((next(&mut rng) % n as u64) as usize));
        let mut done = vec![false; n];
        let mut me = 3;
        for step in 0..5000u64 {
            if step % 131 == 0 && done.iter().filter(|d| !**d).count() > 1 {
                done[me] = true;
                let want = old_pick(&done, me, &mut rng);
                assert_eq!(s.finish(me), want, "finish at {step}");
                me = want.unwrap();
                continue;
            }
            let p = if step % 7 == 0 { Point::Blocked } else { Point::AfterAlloc };
            let switch = p == Point::Blocked || ((next(&mut rng) >> 11) as f64 / (1u64 << 53) as f64) < 0.5;
            let want = if switch { old_pick(&done, me, &mut rng) } else { None };
            assert_eq!(s.point(me, p), want, "point at {step}");
            if let Some(w) = want {
                me = w;
            }
        }
    }

    #[test]
    fn timed_runs_the_earliest_clock_and_blocked_waits_progress() {
        let mut t = Timed::new(3, 1, 10);
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
