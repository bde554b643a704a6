//! The mmap lock (`include/linux/mmap_lock.h`), which guards the VMA tree.
//!
//! The read side is a per-CPU reader word (a "big reader" lock, not the
//! kernel's rwsem) so that faults on different CPUs share no cache line; the
//! write side announces itself and waits for every reader word to clear.
//! Both sides are RAII guards: the tree is reachable only through one, and a
//! panic inside a section releases it while unwinding.

use crate::mm::vma::VmaTree;
use crate::sync::{AtomicBool, AtomicU32, Mutex, MutexGuard};
use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering::*;

pub struct MmapLock {
    /// A writer holds or waits for the lock: readers back off.
    writer: AtomicBool,
    /// Serialises writers.
    wlock: Mutex<()>,
    tree: UnsafeCell<VmaTree>,
}

// SAFETY: the tree is reached only through the guards below: shared
// references under a read guard, whose reader word keeps writers out
// (`write` waits for every registered reader word to clear after announcing
// itself with SeqCst, and a reader re-checks `writer` with SeqCst after
// setting its word), and a mutable one under the write guard, which excludes
// readers and, through `wlock`, other writers. `VmaTree` is Send + Sync.
unsafe impl Sync for MmapLock {}
// SAFETY: owning the lock owns the tree, which is Send.
unsafe impl Send for MmapLock {}

impl Default for MmapLock {
    fn default() -> Self {
        MmapLock { writer: AtomicBool::new(false), wlock: Mutex::new(()), tree: UnsafeCell::new(VmaTree::default()) }
    }
}

/// `mmap_read_lock()` held by one CPU: the VMA tree, read-only.
pub struct MmapReadGuard<'a> {
    lock: &'a MmapLock,
    reader: &'a AtomicU32,
}

/// `mmap_write_lock()`: the VMA tree, writable.
pub struct MmapWriteGuard<'a> {
    lock: &'a MmapLock,
    _writers: MutexGuard<'a, ()>,
}

impl MmapLock {
    /// `mmap_read_lock()` with the CPU's reader word; calls `on_block` each
    /// time it finds a writer and must wait.
    /// A wait costs no virtual time (see [`crate::drive::vtime`]): the
    /// guard excludes more than the kernel's lock does.
    #[inline]
    pub fn read<'a>(&'a self, reader: &'a AtomicU32, mut on_block: impl FnMut()) -> MmapReadGuard<'a> {
        let mut waited = false;
        loop {
            reader.store(1, SeqCst);
            if !self.writer.load(SeqCst) {
                if waited {
                    crate::drive::vtime::host_wait_end();
                }
                return MmapReadGuard { lock: self, reader };
            }
            reader.store(0, SeqCst);
            if !waited {
                waited = true;
                crate::drive::vtime::host_wait_begin();
            }
            while self.writer.load(Relaxed) {
                on_block();
                crate::sync::yield_now();
            }
        }
    }

    /// `mmap_write_lock()`: waits for the other writers, announces itself,
    /// then waits for the reader word of every CPU that `readers` lists.
    /// `readers` is called after the announcement, so a CPU it misses
    /// registered later and will see the writer when it tries to read.
    /// `on_block` runs at each wait (a deterministic scheduler switches CPUs
    /// there; in virtual time the wait costs nothing, see [`Self::read`]);
    /// returns the guard, the waits, and whether another writer held the
    /// lock.
    pub fn write<'a, R>(
        &'a self,
        readers: impl FnOnce() -> Vec<R>,
        word: impl Fn(&R) -> &AtomicU32,
        mut on_block: impl FnMut(),
    ) -> (MmapWriteGuard<'a>, u64, bool) {
        let mut contended = false;
        crate::drive::vtime::host_wait_begin();
        let writers = match self.wlock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                contended = true;
                loop {
                    on_block();
                    match self.wlock.try_lock() {
                        Ok(g) => break g,
                        Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                        Err(std::sync::TryLockError::WouldBlock) => crate::sync::yield_now(),
                    }
                }
            }
        };
        self.writer.store(true, SeqCst);
        // The guard exists from here, so a panic below still clears `writer`.
        let mut g = MmapWriteGuard { lock: self, _writers: writers };
        let mut waits = 0u64;
        for r in readers() {
            while word(&r).load(SeqCst) != 0 {
                waits += 1;
                on_block();
                crate::sync::yield_now();
            }
        }
        crate::drive::vtime::host_wait_end();
        // Every write section may change the tree: per-CPU lookup caches
        // keyed by `seq` must not trust what they hold.
        g.seq += 1;
        g.take_write_locked();
        (g, waits, contended)
    }
}

impl MmapReadGuard<'_> {
    /// The lock this guard holds, to check a guard belongs to an mm.
    #[inline(always)]
    pub fn lock(&self) -> &MmapLock {
        self.lock
    }

    /// Lets a waiting writer in between two accesses of a batch (as a fault
    /// loop that drops and retakes the lock would); `&mut self` proves no
    /// reference into the tree outlives the release.
    #[inline(always)]
    pub fn yield_to_writer(&mut self, on_block: impl FnMut()) {
        if self.lock.writer.load(Relaxed) {
            self.reader.store(0, Release);
            let g = self.lock.read(self.reader, on_block);
            std::mem::forget(g);
        }
    }
}

impl Deref for MmapReadGuard<'_> {
    type Target = VmaTree;
    #[inline(always)]
    fn deref(&self) -> &VmaTree {
        // SAFETY: this CPU's reader word is set and no writer was announced
        // when it was (see `read`), so no `&mut` to the tree exists until
        // the word clears, which only this guard's drop or `&mut self`
        // methods do.
        unsafe { &*self.lock.tree.get() }
    }
}

impl Drop for MmapReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.reader.store(0, Release);
    }
}

impl Deref for MmapWriteGuard<'_> {
    type Target = VmaTree;
    fn deref(&self) -> &VmaTree {
        // SAFETY: the write guard excludes readers and other writers.
        unsafe { &*self.lock.tree.get() }
    }
}

impl DerefMut for MmapWriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut VmaTree {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.tree.get() }
    }
}

impl Drop for MmapWriteGuard<'_> {
    fn drop(&mut self) {
        self.lock.writer.store(false, SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_write_section_lets_readers_in() {
        let lock = std::sync::Arc::new(MmapLock::default());
        let word = AtomicU32::new(0);
        let l = lock.clone();
        let r = std::thread::spawn(move || {
            let (_g, _, _) = l.write(Vec::<()>::new, |_| unreachable!(), || {});
            panic!("inside the write lock");
        })
        .join();
        assert!(r.is_err());
        // Would spin forever if the panic had left `writer` set.
        let g = lock.read(&word, || {});
        assert_eq!(g.iter().count(), 0);
        drop(g);
        // And writers still get in (the poisoned mutex is recovered).
        let (g, _, _) = lock.write(|| vec![&word], |w| *w, || {});
        drop(g);
    }
}
