//! anonfolio: a simulator of the Linux anonymous-memory page-fault path with
//! large folios (multi-size THP), modelled on Linux 6.18's `mm/memory.c`.
//!
//! The pieces, by the kernel's names:
//! - [`pgtable`]: a 4-level page table with atomic entries, `pte_offset_map_lock`,
//!   `pte_range_none`, `set_ptes`, PMD-mapped THP.
//! - [`locks`]: spinlocks with cheap counters: the split PTE-table locks, the
//!   mm-wide `page_table_lock`, `zone->lock`, and the mmap lock.
//! - [`page_alloc`]: a buddy allocator with per-CPU lists, fragmentation and
//!   failure injection; [`memcg`]: charge limits.
//! - [`vma`]: VMAs with mmap, munmap, madvise, splitting and merging.
//! - [`fault`]: `handle_mm_fault`, `do_anonymous_page`, `alloc_anon_folio`,
//!   `do_huge_pmd_anonymous_page`, `do_wp_page`, per [`config::Policy`].
//! - [`zap`]: `zap_pte_range`, rmap removal, deferred split.
//! - [`stats`]: counters named as in sysfs and /proc/vmstat.
//! - [`replay`] and [`workload`]: traces and built-in access patterns.
//! - [`oracle`]: the same trace on the real kernel.

pub mod config;
pub mod error;
pub mod fault;
pub mod locks;
pub mod memcg;
pub mod mm;
pub mod page_alloc;
pub mod pgtable;
pub mod replay;
pub mod sched;
pub mod stats;
pub mod trace;
pub mod vma;
pub mod workload;
pub mod zap;
#[cfg(target_os = "linux")]
pub mod oracle;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const PTRS_PER_TABLE: usize = 512;
pub const PMD_SHIFT: u32 = 21;
pub const PMD_SIZE: u64 = 1 << PMD_SHIFT;
/// Order of a PMD-mapped THP (2 MiB).
pub const PMD_ORDER: usize = 9;
/// Highest buddy order (`MAX_PAGE_ORDER`, 4 MiB blocks).
pub const MAX_PAGE_ORDER: usize = 10;

pub use config::{Config, Enabled, MemoryConfig, OnRace, Policy, SizeMode};
pub use error::{Error, Result};
pub use mm::{Cpu, Mm};
pub use replay::{replay, RunOptions, RunResult};
pub use stats::Stats;
pub use trace::{Advice, MmapFlags, Op, OpKind};
pub use workload::{Sharing, Workload, WorkloadKind};
