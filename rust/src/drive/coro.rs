//! Simulated CPUs as coroutines on one host thread (not a kernel notion).
//!
//! Each CPU's job runs on a stack of its own (a `corosensei` coroutine).
//! At a scheduling point ([`Point`]) the scheduler listens to (the CPU's
//! `points` mask; the others cost one test) the CPU asks the scheduler
//! ([`super::sched`]) whether to hand over; if so it suspends, and the run
//! loop resumes the CPU the scheduler named. A switch is a few register
//! saves, not a host context switch, so any number of CPUs (a thousand and
//! more) interleave at nearly the speed of one.
//!
//! The CPU finds the run through a thread-local pointer to its context,
//! set for the duration of [`run`]; the hook in [`Cpu::sched`] checks that
//! it is called from inside its own coroutine of that run before it
//! suspends, so a hook called anywhere else panics instead of switching
//! stacks it does not own.

use crate::drive::runner::JobResult;
use crate::drive::sched::{Sched, Timed};
use crate::error::Error;
use crate::mm::{Cpu, Point};
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// Bytes of stack per simulated CPU (the fault path is shallow; a debug
/// build needs a few tens of KiB). Mapped lazily, with a guard page.
const STACK_BYTES: usize = 256 << 10;

/// Stacks kept for reuse: mapping a thousand stacks per run would cost
/// more than switching between them.
const POOL_MAX: usize = 4096;

const NONE: usize = usize::MAX;

type Y = Yielder<(), ()>;

/// What the CPUs of one run share with the run loop.
pub(crate) struct Ctx {
    /// The CPU whose coroutine executes, `NONE` while the run loop does.
    running: Cell<usize>,
    /// The CPU a suspending one handed over to.
    next: Cell<usize>,
    /// Each CPU's yielder, set by its coroutine while its body runs.
    yielders: Vec<Cell<*const Y>>,
    pub(crate) sched: RefCell<Sched>,
    /// The run loop is dropping unfinished coroutines (their stacks are
    /// being unwound by corosensei): a body must let that unwind through.
    tearing_down: Cell<bool>,
}

thread_local! {
    /// The address of the context of the run on this thread, 0 if none.
    static CTX: Cell<usize> = const { Cell::new(0) };
    /// The same address while the run is in virtual time, else 0.
    static TIMED: Cell<usize> = const { Cell::new(0) };
    static POOL: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
}

/// Runs in virtual time under way on any thread. The hooks test this
/// before `TIMED`: a thread-local costs a call to `__tls_get_addr` in the
/// Python extension (a shared object), a static one load.
static TIMED_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The context of the run on this thread, if its address is `addr`, and
/// the CPU running there.
#[inline(always)]
fn current(addr: usize) -> Option<&'static Ctx> {
    if CTX.with(Cell::get) != addr || addr == 0 {
        return None;
    }
    // SAFETY: `CTX` holds a context's address only between `run` setting
    // it and the guard in `run` restoring the previous value, which happens
    // before that context is dropped, and only `run` sets it, to the
    // address of its own `Ctx`. The 'static lifetime never escapes the callers below, which use the
    // reference only within the call.
    Some(unsafe { &*(addr as *const Ctx) })
}

/// A scheduling point of CPU `me` in the run whose context is at `addr`.
#[inline]
fn point(addr: usize, me: usize, p: Point) {
    let Some(ctx) = current(addr) else {
        panic!("simulated CPU {me}: scheduling point outside its coroutine run");
    };
    assert_eq!(ctx.running.get(), me, "simulated CPU {me}: scheduling point on another CPU's coroutine");
    let n = ctx.sched.borrow_mut().point(me, p);
    if let Some(n) = n {
        ctx.next.set(n);
        let y = ctx.yielders[me].get();
        assert!(!y.is_null(), "simulated CPU {me}: no yielder");
        // SAFETY: `running == me` holds only while the run loop is inside
        // `resume` of CPU `me`'s coroutine (it sets `running` just before
        // and resets it just after), so this code executes on that
        // coroutine's stack. Its body stored its yielder before calling the
        // job and clears it only after the job returns, so the yielder is
        // alive, and suspending it suspends this very coroutine.
        unsafe { &*y }.suspend(());
    }
}

/// The virtual-time hooks' access to the run on this thread: `f(timed,
/// running_cpu)` when a run in virtual time is active and a CPU's
/// coroutine executes; nothing otherwise (one load of a static).
#[inline(always)]
pub(crate) fn with_timed(f: impl FnOnce(&mut Timed, usize)) {
    if TIMED_RUNS.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        return;
    }
    with_timed_slow(f);
}

// Out of line with the thread-local read, so that the compiler cannot hoist
// the (shared-object) TLS address computation into the fault path.
#[cold]
#[inline(never)]
fn with_timed_slow(f: impl FnOnce(&mut Timed, usize)) {
    let addr = TIMED.with(Cell::get);
    if addr == 0 {
        return;
    }
    let Some(ctx) = current(addr) else { return };
    let me = ctx.running.get();
    if me == NONE {
        return;
    }
    let Ok(mut s) = ctx.sched.try_borrow_mut() else { return };
    if let Sched::Timed(t) = &mut *s {
        f(t, me);
    }
}

/// Restores `CTX` when the run ends, also when unwinding.
struct CtxGuard(usize, usize, bool);

impl CtxGuard {
    fn enter(addr: usize, timed: usize) -> CtxGuard {
        if timed != 0 {
            TIMED_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        CtxGuard(CTX.with(|c| c.replace(addr)), TIMED.with(|c| c.replace(timed)), timed != 0)
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        CTX.with(|c| c.set(self.0));
        TIMED.with(|c| c.set(self.1));
        if self.2 {
            TIMED_RUNS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn take_stack() -> std::io::Result<DefaultStack> {
    match POOL.with(|p| p.borrow_mut().pop()) {
        Some(s) => Ok(s),
        None => DefaultStack::new(STACK_BYTES),
    }
}

fn give_stack(s: DefaultStack) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(s);
        }
    });
}

/// The coroutines of a run; dropping unfinished ones unwinds their stacks,
/// which their bodies must not catch.
struct Coros<'c> {
    ctx: &'c Ctx,
    list: Vec<Option<Coroutine<(), (), JobResult, DefaultStack>>>,
}

impl Drop for Coros<'_> {
    fn drop(&mut self) {
        self.ctx.tearing_down.set(true);
        self.list.clear();
    }
}

/// Runs `job(t, cpu)` for every CPU as coroutines on this thread, switched
/// where `sched` decides; returns each CPU's result (in CPU order) and the
/// scheduler (whose state, in virtual time, holds the clocks).
pub(crate) fn run<F>(cpus: &mut [Cpu], sched: Sched, job: &F) -> (Vec<JobResult>, Sched)
where
    F: Fn(usize, &mut Cpu) -> JobResult,
{
    let n = cpus.len();
    let ctx = Ctx {
        running: Cell::new(NONE),
        next: Cell::new(NONE),
        yielders: (0..n).map(|_| Cell::new(std::ptr::null())).collect(),
        sched: RefCell::new(sched),
        tearing_down: Cell::new(false),
    };
    let addr = &ctx as *const Ctx as usize;
    let timed = if matches!(*ctx.sched.borrow(), Sched::Timed(_)) { addr } else { 0 };
    let _restore = CtxGuard::enter(addr, timed);
    let mut results: Vec<Option<JobResult>> = (0..n).map(|_| None).collect();
    {
        let mut coros = Coros { ctx: &ctx, list: Vec::with_capacity(n) };
        let points = ctx.sched.borrow().points();
        for (i, cpu) in cpus.iter_mut().enumerate() {
            cpu.sched = Some(Box::new(move |p| point(addr, i, p)));
            cpu.points = points;
            let stack = match take_stack() {
                Ok(s) => s,
                Err(e) => {
                    results[i] = Some(Err((0, Error::Config(format!("cannot map a stack for CPU {i}: {e}")))));
                    coros.list.push(None);
                    continue;
                }
            };
            let c = &ctx;
            let body = move |y: &Y, ()| -> JobResult {
                c.yielders[i].set(y as *const Y);
                let r = catch_unwind(AssertUnwindSafe(|| job(i, cpu)));
                c.yielders[i].set(std::ptr::null());
                match r {
                    Ok(r) => r,
                    Err(p) if c.tearing_down.get() => resume_unwind(p),
                    Err(p) => Err((0, crate::drive::runner::cpu_panicked(i, &*p))),
                }
            };
            // SAFETY: the body borrows `ctx`, `job` and one CPU of `cpus`,
            // all of which outlive `coros`: it is dropped at the end of this
            // block (also when unwinding), and dropping a coroutine either
            // finds it finished or unwinds its stack to the end.
            coros.list.push(Some(unsafe { Coroutine::with_stack_unchecked(stack, body) }));
        }
        let mut cur = ctx.sched.borrow_mut().first();
        while let Some(i) = cur {
            let Some(co) = coros.list[i].as_mut() else {
                // Never started (no stack): it is finished.
                cur = ctx.sched.borrow_mut().finish(i);
                continue;
            };
            ctx.running.set(i);
            let r = co.resume(());
            ctx.running.set(NONE);
            cur = match r {
                CoroutineResult::Yield(()) => Some(ctx.next.get()),
                CoroutineResult::Return(r) => {
                    results[i] = Some(r);
                    if let Some(co) = coros.list[i].take() {
                        give_stack(co.into_stack());
                    }
                    ctx.sched.borrow_mut().finish(i)
                }
            };
        }
    }
    for cpu in cpus.iter_mut() {
        cpu.sched = None;
        cpu.points = 0;
    }
    let out = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err((0, Error::Config(format!("simulated CPU {i} never finished"))))))
        .collect();
    (out, ctx.sched.into_inner())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::drive::sched::{Sched, Seeded};
    use crate::mm::Mm;

    #[test]
    fn a_hook_called_outside_its_run_panics_instead_of_switching() {
        let mm = Mm::new(Config::default()).unwrap();
        let mut cpus = vec![mm.cpu(0), mm.cpu(1)];
        let stolen = RefCell::new(None);
        let (r, _) = run(&mut cpus, Sched::Seeded(Seeded::new(2, 0, 1.0)), &|t, cpu: &mut Cpu| {
            cpu.preempt(Point::OpBoundary);
            if t == 0 {
                *stolen.borrow_mut() = cpu.sched.take();
            }
            Ok(1)
        });
        assert!(r.iter().all(|r| r.is_ok()));
        let mut h = stolen.into_inner().expect("the hook of CPU 0");
        let e = catch_unwind(AssertUnwindSafe(|| h(Point::OpBoundary))).expect_err("must refuse");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("outside its coroutine run"), "{msg}");
    }

    #[test]
    fn seeded_cpus_run_on_between_accesses_and_hand_over_at_fault_entry() {
        let mm = Mm::new(Config::default()).unwrap();
        let n = 3;
        let mut cpus: Vec<Cpu> = (0..n).map(|i| mm.cpu(i)).collect();
        let order = RefCell::new(Vec::new());
        let (r, _) = run(&mut cpus, Sched::Seeded(Seeded::new(n, 4, 1.0)), &|t, cpu: &mut Cpu| {
            for _ in 0..3 {
                order.borrow_mut().push(t);
                cpu.preempt(Point::OpBoundary);
            }
            order.borrow_mut().push(t);
            cpu.preempt(Point::FaultEntry);
            order.borrow_mut().push(t);
            Ok(1)
        });
        assert!(r.iter().all(|r| r.is_ok()));
        let order = order.into_inner();
        for t in 0..n {
            let at: Vec<usize> = order.iter().enumerate().filter(|&(_, &c)| c == t).map(|(i, _)| i).collect();
            assert_eq!(at.len(), 5);
            assert_eq!(at[3] - at[0], 3, "CPU {t} was switched out between accesses: {order:?}");
            assert!(at[4] > at[3] + 1, "CPU {t} ran on at its fault entry with p = 1: {order:?}");
        }
    }

    #[test]
    fn a_thousand_and_twenty_four_cpus_take_turns() {
        let mm = Mm::new(Config::default()).unwrap();
        let n = 1024;
        let mut cpus: Vec<Cpu> = (0..n).map(|i| mm.cpu(i)).collect();
        let order = RefCell::new(Vec::new());
        let (r, _) = run(&mut cpus, Sched::Seeded(Seeded::new(n, 9, 0.5)), &|t, cpu: &mut Cpu| {
            for _ in 0..4 {
                order.borrow_mut().push(t);
                cpu.preempt(Point::Blocked);
            }
            Ok(4)
        });
        assert_eq!(r.iter().map(|r| *r.as_ref().unwrap()).sum::<u64>(), 4 * n as u64);
        let order = order.into_inner();
        assert_eq!(order.len(), 4 * n);
        // Blocked always hands over: no CPU runs twice in a row while others are left.
        let repeats = order.windows(2).filter(|w| w[0] == w[1]).count();
        assert!(repeats < 8, "{repeats} back-to-back turns");
    }
}
