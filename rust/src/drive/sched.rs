//! Deterministic interleaving of simulated CPUs.
//!
//! Every simulated CPU runs on a host thread of its own, but only the CPU
//! holding the baton runs. At the points where the kernel's fault path can
//! be overtaken ([`Point`]) and between operations, a seeded generator
//! decides whether to hand the baton to another CPU and to which. Nothing
//! depends on host timing, so the same seed gives the same run, bit for bit,
//! with any number of CPUs.
//!
//! No CPU is ever parked inside a spinlock's critical section (the points
//! lie outside them), so spinlocks are never found held; the waits for the
//! mmap lock hand the baton on ([`Point::Blocked`]).

use crate::mm::Point;
use std::sync::{Arc, Condvar, Mutex};

struct State {
    cur: usize,
    done: Vec<bool>,
    rng: u64,
}

pub struct DetSched {
    st: Mutex<State>,
    cv: Condvar,
    /// Probability of a switch at a fault-path point (widens race windows).
    switch_prob: f64,
}

#[inline]
fn next(s: &mut u64) -> u64 {
    // splitmix64
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DetSched {
    pub fn new(ncpus: usize, seed: u64, switch_prob: f64) -> Arc<DetSched> {
        let mut rng = seed;
        let cur = (next(&mut rng) % ncpus.max(1) as u64) as usize;
        Arc::new(DetSched {
            st: Mutex::new(State { cur, done: vec![false; ncpus], rng }),
            cv: Condvar::new(),
            switch_prob,
        })
    }

    /// Blocks until CPU `me` holds the baton.
    pub fn wait_turn(&self, me: usize) {
        let mut st = self.st.lock().unwrap();
        while st.cur != me {
            st = self.cv.wait(st).unwrap();
        }
    }

    /// Picks the next CPU among the unfinished ones other than `me`.
    fn pick_other(st: &mut State, me: usize) -> Option<usize> {
        let others: Vec<usize> = (0..st.done.len()).filter(|&i| i != me && !st.done[i]).collect();
        if others.is_empty() {
            return None;
        }
        Some(others[(next(&mut st.rng) % others.len() as u64) as usize])
    }

    /// A preemption point of CPU `me`: maybe hand the baton on, then wait
    /// for it to come back. `blocked` forces a switch (when there is anyone
    /// to switch to).
    pub fn point(&self, me: usize, blocked: bool) {
        let mut st = self.st.lock().unwrap();
        debug_assert_eq!(st.cur, me);
        let switch = blocked || {
            let r = (next(&mut st.rng) >> 11) as f64 / (1u64 << 53) as f64;
            r < self.switch_prob
        };
        if !switch {
            return;
        }
        if let Some(n) = Self::pick_other(&mut st, me) {
            st.cur = n;
            self.cv.notify_all();
            while st.cur != me {
                st = self.cv.wait(st).unwrap();
            }
        }
    }

    /// CPU `me` has nothing left to run.
    pub fn finish(&self, me: usize) {
        let mut st = self.st.lock().unwrap();
        st.done[me] = true;
        if let Some(n) = Self::pick_other(&mut st, me) {
            st.cur = n;
            self.cv.notify_all();
        }
    }

    /// The hook to install in a CPU's `sched`.
    pub fn hook(self: &Arc<Self>, me: usize) -> Box<dyn FnMut(Point) + Send> {
        let s = self.clone();
        Box::new(move |p| s.point(me, p == Point::Blocked))
    }
}
