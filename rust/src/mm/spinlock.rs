//! Spinlocks as the kernel has them (`kernel/locking/spinlock.c`,
//! qspinlock's fast path): a test-and-set word taken with one
//! compare-exchange; a waiter spins on a plain load (so the cache line stays
//! shared while it is held), backs off, then yields the host CPU, so that
//! more simulated CPUs than host cores still make progress.
//!
//! Figures (acquisitions, contended acquisitions, spins) are kept by the
//! acquiring CPU in its own counters, so counting costs no shared writes.

use crate::mm::vmstat::LockCounters;
use crate::sync::AtomicBool;
use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering::*;

pub struct SpinLock<T = ()> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `data` to one holder at a time (the
// compare-exchange makes acquisition exclusive and Acquire/Release orders the
// critical sections), so sharing the lock between threads is sharing `T`
// by moving it between them: `T: Send` suffices, as for std's Mutex.
unsafe impl<T: Send> Send for SpinLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T: Default> Default for SpinLock<T> {
    fn default() -> Self {
        SpinLock::new(T::default())
    }
}

/// One step of waiting for a held lock. Not the kernel's (it spins in
/// `queued_spin_lock_slowpath`); here a waiter must leave the host core to
/// the holder, which may be another thread on the same core.
#[inline]
fn wait(backoff: &crossbeam_utils::Backoff) {
    #[cfg(not(loom))]
    backoff.snooze();
    #[cfg(loom)]
    {
        let _ = backoff;
        crate::sync::yield_now();
    }
}

impl<T> SpinLock<T> {
    pub fn new(data: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), data: UnsafeCell::new(data) }
    }

    /// `spin_lock()`.
    #[inline(always)]
    pub fn lock<'a>(&'a self, st: &LockCounters) -> SpinGuard<'a, T> {
        st.acquisitions.inc();
        if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            self.lock_contended(st);
        }
        crate::drive::vtime::lock_acquired(crate::drive::vtime::lock_addr(self));
        SpinGuard { lock: self }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self, st: &LockCounters) {
        st.contended.inc();
        let backoff = crossbeam_utils::Backoff::new();
        let mut spins = 0u64;
        loop {
            while self.locked.load(Relaxed) {
                spins += 1;
                wait(&backoff);
            }
            if self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_ok() {
                break;
            }
        }
        st.spins.add(spins);
    }

    /// Access without locking: `&mut self` proves no one else holds it.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Holds a [`SpinLock`]; `spin_unlock()` on drop, also when unwinding.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        crate::drive::vtime::lock_released(crate::drive::vtime::lock_addr(self.lock));
        self.lock.locked.store(false, Release);
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the lock, so
        // no one else has a reference into `data`.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference
        // the holder has.
        unsafe { &mut *self.lock.data.get() }
    }
}

#[cfg(all(test, not(loom)))]
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
                    st.acquisitions.get()
                })
            })
            .collect();
        let acq: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(*lock.lock(&LockCounters::default()), 80_000);
        assert_eq!(acq, 80_000);
    }

    #[test]
    fn a_panic_inside_the_critical_section_releases_the_lock() {
        let lock = Arc::new(SpinLock::new(0u64));
        let l = lock.clone();
        let r = std::thread::spawn(move || {
            let _g = l.lock(&LockCounters::default());
            panic!("inside the lock");
        })
        .join();
        assert!(r.is_err());
        // Would spin forever if the guard had not released it.
        *lock.lock(&LockCounters::default()) += 1;
    }
}
