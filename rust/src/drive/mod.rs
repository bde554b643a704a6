//! What drives the model (none of it mirrors a kernel file): trace replay,
//! the built-in workloads, the multi-CPU runner, the deterministic
//! scheduler, the coroutines it switches, and virtual time.

pub mod coro;
pub mod replay;
pub mod runner;
pub mod sched;
pub mod vtime;
pub mod workload;
