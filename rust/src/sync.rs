//! The atomics the race protocol runs on, switched to loom's under
//! `cfg(loom)` (crossbeam's pattern), so that the loom tests model-check
//! the shipped fault path, table install and zap, not a copy of them.
//!
//! Only what other CPUs race on goes through here: page-table entries,
//! `struct page` words, spinlock words, the mmap lock and the CPU registry. Per-CPU counters
//! have one writer and take part in no protocol, so they stay on std's
//! atomics (under loom they would only multiply the interleavings).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
// The CPU registry and the writers' mutex publish the reader words a
// writer waits on: loom must see the ordering they give.
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// Gives the host CPU away while waiting for another simulated CPU.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}
