//! Spinlocks as the kernel has them: a test-and-set word, a fast path of one
//! compare-exchange, and a slow path that spins on a plain load (so the
//! cache line stays shared while it is held), backs off, then yields the
//! host CPU so that more simulated CPUs than host cores still make progress.
//!
//! Figures (acquisitions, contended acquisitions, spins) are kept by the
//! acquiring CPU in its own counters, so counting costs no shared writes.

use crate::stats::LockCounters;
use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering::*};

/// Spins before the waiter starts yielding its host thread.
const SPINS_BEFORE_YIELD: u32 = 128;

pub struct SpinLock<T = ()> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

unsafe impl<T: Send> Send for SpinLock<T> {}
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T: Default> Default for SpinLock<T> {
    fn default() -> Self {
        SpinLock::new(T::default())
    }
}

impl<T> SpinLock<T> {
    pub const fn new(data: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), data: UnsafeCell::new(data) }
    }

    /// `spin_lock()`.
    #[inline(always)]
    pub fn lock<'a>(&'a self, st: &LockCounters) -> SpinGuard<'a, T> {
        st.acquisitions.inc();
        if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            self.lock_contended(st);
        }
        SpinGuard { lock: self }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self, st: &LockCounters) {
        st.contended.inc();
        let mut spins = 0u64;
        let mut backoff = 1u32;
        loop {
            while self.locked.load(Relaxed) {
                spins += 1;
                if backoff < SPINS_BEFORE_YIELD {
                    for _ in 0..backoff {
                        std::hint::spin_loop();
                    }
                    backoff *= 2;
                } else {
                    std::thread::yield_now();
                }
            }
            if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_ok() {
                break;
            }
        }
        st.spins.add(spins);
    }

    /// Access without locking, for a caller that excludes everyone else
    /// (e.g. holds the mmap lock for write, or owns the lock exclusively).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        self.lock.locked.store(false, Release);
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        unsafe { &mut *self.lock.data.get() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn excludes_and_counts() {
        let lock = Arc::new(SpinLock::new(0u64));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    let st = LockCounters::default();
                    for _ in 0..20_000 {
                        *lock.lock(&st) += 1;
                    }
                    (st.acquisitions.get(), st.contended.get())
                })
            })
            .collect();
        let mut acq = 0;
        for h in hs {
            acq += h.join().unwrap().0;
        }
        assert_eq!(*lock.lock(&LockCounters::default()), 80_000);
        assert_eq!(acq, 80_000);
    }
}
