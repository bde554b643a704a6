//! anonfolio: a simulator of the Linux anonymous-memory page-fault path with
//! large folios (multi-size THP), modelled on Linux 6.18.
//!
//! The tree follows the kernel's:
//! - [`mm`] is the kernel model, one module per kernel source file it mirrors:
//!   [`mm::memory`] (`mm/memory.c`: `handle_mm_fault`, `do_anonymous_page`,
//!   `alloc_anon_folio`, `do_wp_page`, `zap_pte_range`, `free_pgtables`),
//!   [`mm::huge_memory`] (PMD THP, the huge zero page, `__split_huge_pmd`),
//!   [`mm::page_alloc`] (the buddy allocator and per-CPU lists),
//!   [`mm::memcontrol`] (memcg charge), [`mm::vma`] and [`mm::mmap`] /
//!   [`mm::madvise`] (VMAs and the system calls that change them),
//!   [`mm::rmap`] and [`mm::swap`] (folio mapcounts and references),
//!   [`mm::pgtable`] (entries and tables), [`mm::mm_types`] (`struct page`),
//!   [`mm::mmap_lock`] and [`mm::spinlock`] (the locks), [`mm::vmstat`]
//!   (counters under their sysfs and /proc/vmstat names).
//! - [`policy`] holds each policy's order choice, by its author's name.
//! - [`drive`] is what drives the model: trace replay, built-in workloads,
//!   the multi-CPU runner and the deterministic scheduler.
//! - The trace format is the `anonfolio-trace` crate, re-exported as
//!   [`trace`]; the real-kernel oracle is the `anonfolio-oracle` crate,
//!   which depends on the trace format only.

pub mod config;
pub mod drive;
pub mod error;
pub mod mm;
pub mod policy;
pub(crate) mod sync;

pub use anonfolio_trace as trace;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const PTRS_PER_TABLE: usize = 512;
pub const PMD_SHIFT: u32 = 21;
pub const PMD_SIZE: u64 = 1 << PMD_SHIFT;
/// Order of a PMD-mapped THP (2 MiB), `HPAGE_PMD_ORDER`.
pub const PMD_ORDER: usize = 9;
/// Highest buddy order (`MAX_PAGE_ORDER`, 4 MiB blocks).
pub const MAX_PAGE_ORDER: usize = 10;

pub use config::{Config, Enabled, MemoryConfig, OnRace, Policy, SizeMode};
pub use drive::replay::{replay, replay_path, replay_stream, summarize, TraceSummary};
pub use drive::runner::{RunOptions, RunResult};
pub use drive::vtime::{CostProfile, TimeStats};
pub use drive::workload::{Sharing, Workload, WorkloadKind};
pub use error::{Error, Result};
pub use mm::vmstat::Stats;
pub use mm::{Cpu, Mm};
pub use trace::{Advice, MmapFlags, Op, OpKind};

// Paths the bindings and tests used before the tree followed the kernel's.
pub use drive::{sched, workload};
pub use mm::vmstat as stats;
