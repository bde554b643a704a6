//! What drives the model (none of it mirrors a kernel file): trace replay,
//! the built-in workloads, the multi-CPU runner and the deterministic
//! scheduler.

pub mod replay;
pub mod runner;
pub mod sched;
pub mod workload;
