//! Trace replay, serially or on many simulated CPUs.

use crate::drive::runner::{finish, run_cpus, RunOptions, RunResult};
use crate::error::Error;
use crate::mm::{Cpu, Mm, Point};
use crate::trace::{self, Op, OpKind, TraceReader, TASK_SIZE};
use crate::{PAGE_SIZE, PMD_SIZE};
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// Runs one operation on `cpu`.
#[inline]
pub fn run_op(mm: &Mm, cpu: &mut Cpu, op: &Op) -> crate::Result<()> {
    let r = match op.kind {
        OpKind::Write { addr } => mm.access(cpu, addr, true),
        OpKind::Read { addr } => mm.access(cpu, addr, false),
        OpKind::Mmap { addr, len, flags } => mm.mmap(cpu, addr, len, flags),
        OpKind::Munmap { addr, len } => mm.munmap(cpu, addr, len),
        OpKind::Madvise { addr, len, advice } => mm.madvise(cpu, addr, len, advice),
        OpKind::Mprotect { addr, len, prot } => mm.mprotect(cpu, addr, len, prot),
        OpKind::Mremap { old_addr, old_len, new_addr, new_len } => mm.mremap(cpu, old_addr, old_len, new_addr, new_len),
        OpKind::Brk { addr } => mm.brk(cpu, addr),
    };
    // CONFIG_DEBUG_VM: every VMA operation leaves a sound mm.
    let r = r.and_then(|()| match mm.debug_vm && is_barrier(op) {
        true => mm.check_invariants().map_err(Error::Invariant),
        false => Ok(()),
    });
    r.map_err(|e| Error::AtLine(op.line, Box::new(e)))
}

/// Whether an operation changes VMAs: those are barriers between threads.
fn is_barrier(op: &Op) -> bool {
    !matches!(op.kind, OpKind::Write { .. } | OpKind::Read { .. })
}

/// The most accesses one [`Chunk`] holds. A stretch between two VMA
/// operations longer than this runs as several chunks, with a wait between
/// them (no thread runs more than a chunk ahead of the others, which the
/// recorded order allows), so that a streamed trace is held a chunk at a
/// time, never a whole stretch.
pub const CHUNK_OPS: usize = 1 << 16;

/// A stretch of the trace the CPUs run between two waits: each thread's
/// accesses, in file order, then the VMA operation that ends it (if any).
/// Not a kernel structure.
struct Chunk {
    /// The accesses sorted by thread (stably): thread `t`'s are
    /// `ops[starts[t]..starts[t + 1]]`.
    ops: Vec<Op>,
    starts: Vec<usize>,
    /// The accesses in file order, as read (kept for its capacity).
    read: Vec<Op>,
    barrier: Option<Op>,
    /// Nothing follows this chunk.
    last: bool,
}

impl Chunk {
    fn new(ncpus: usize) -> Chunk {
        Chunk { ops: Vec::new(), starts: vec![0; ncpus + 1], read: Vec::new(), barrier: None, last: false }
    }

    fn of(&self, t: usize) -> &[Op] {
        &self.ops[self.starts[t]..self.starts[t + 1]]
    }

    /// Reads the next chunk from `src`: accesses up to [`CHUNK_OPS`], a VMA
    /// operation, the end, or an error (returned; the chunk is then the
    /// last, holding the operations before it).
    fn fill(&mut self, src: &mut impl Iterator<Item = trace::Result<Op>>, ncpus: usize) -> Option<Error> {
        self.read.clear();
        self.barrier = None;
        self.last = false;
        let mut error = None;
        while self.read.len() < CHUNK_OPS {
            match src.next() {
                None => {
                    self.last = true;
                    break;
                }
                Some(Err(e)) => {
                    self.last = true;
                    error = Some(e.into());
                    break;
                }
                Some(Ok(op)) if op.thread as usize >= ncpus => {
                    // Only if the file changed between the two reads.
                    self.last = true;
                    error = Some(Error::Parse(format!(
                        "line {}: thread {} was not in the trace when it was first read",
                        op.line, op.thread
                    )));
                    break;
                }
                Some(Ok(op)) if is_barrier(&op) => {
                    self.barrier = Some(op);
                    break;
                }
                Some(Ok(op)) => self.read.push(op),
            }
        }
        // A counting sort by thread.
        self.starts.iter_mut().for_each(|s| *s = 0);
        for op in &self.read {
            self.starts[op.thread as usize + 1] += 1;
        }
        for t in 0..ncpus {
            self.starts[t + 1] += self.starts[t];
        }
        // Sized by a copy, then every slot overwritten in thread order.
        self.ops.clear();
        self.ops.extend_from_slice(&self.read);
        let mut at = self.starts.clone();
        for op in &self.read {
            let t = op.thread as usize;
            self.ops[at[t]] = *op;
            at[t] += 1;
        }
        error
    }
}

/// A barrier the simulated CPUs wait at by spinning through the scheduler
/// (a wait is a [`Point::Blocked`]), so that it works on host threads and
/// under the deterministic scheduler alike. Not a kernel mechanism: it is
/// how a recorded order ("every earlier line is done") is kept.
struct SpinBarrier {
    n: usize,
    arrived: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicUsize,
    /// A CPU failed: nobody waits any more.
    failed: std::sync::atomic::AtomicBool,
}

impl SpinBarrier {
    /// Returns false if another CPU failed (the run is over).
    fn wait(&self, cpu: &mut Cpu) -> bool {
        use std::sync::atomic::Ordering::*;
        let gen = self.generation.load(Acquire);
        if self.arrived.fetch_add(1, AcqRel) + 1 == self.n {
            self.arrived.store(0, Relaxed);
            self.generation.fetch_add(1, Release);
            return !self.failed.load(Acquire);
        }
        while self.generation.load(Acquire) == gen {
            if self.failed.load(Acquire) {
                return false;
            }
            cpu.preempt(Point::Blocked);
            std::thread::yield_now();
        }
        !self.failed.load(Acquire)
    }
}

/// Runs trace operations on `nthreads` CPUs at once, each thread its own
/// lines in file order. VMA operations are barriers: every earlier line of
/// any thread is done before one runs, and no later line starts before it
/// is done; between barriers the threads' accesses run at once. The
/// operations come from `src` a [`Chunk`] at a time: CPU 0 reads the next
/// one (into the other of two) once it has run its part of the current
/// one, so at most two chunks are held, and the in-memory and the streamed
/// replay of a trace wait at the same points (the same seed gives the same
/// run). A bad line ends the run after the operations before it, with its
/// error unless one of those failed first.
fn run_parallel_ops<S>(mm: &Mm, mut src: S, nthreads: usize, opts: &RunOptions) -> RunResult
where
    S: Iterator<Item = trace::Result<Op>> + Send,
{
    let n = nthreads.max(opts.threads).max(1);
    let cpus: Vec<Cpu> = (0..n).map(|i| mm.cpu(i)).collect();
    let mut first = Chunk::new(n);
    let parse_error = Mutex::new(first.fill(&mut src, n));
    let src = Mutex::new(src);
    let chunks = [RwLock::new(first), RwLock::new(Chunk::new(n))];
    let barrier =
        SpinBarrier { n, arrived: Default::default(), generation: Default::default(), failed: Default::default() };
    let mut r = run_cpus(mm, cpus, opts, |t, cpu| {
        let mut done = 0u64;
        let r = (|| {
            for k in 0.. {
                // By the protocol nobody writes chunk k now: these locks
                // are never contended (a wait here would stall the
                // deterministic scheduler).
                let cur = chunks[k % 2].read().unwrap_or_else(|p| p.into_inner());
                for op in cur.of(t) {
                    cpu.preempt(Point::OpBoundary);
                    run_op(mm, cpu, op)?;
                    done += 1;
                }
                let (op, last) = (cur.barrier, cur.last);
                drop(cur);
                if last {
                    return Ok(());
                }
                if t == 0 {
                    // Chunk k - 1, in the other buffer, was left by every
                    // CPU at its last wait, which CPU 0 passed.
                    let mut next = chunks[(k + 1) % 2].write().unwrap_or_else(|p| p.into_inner());
                    let mut src = src.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(e) = next.fill(&mut *src, n) {
                        *parse_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
                if !barrier.wait(cpu) {
                    return Ok(());
                }
                if let Some(op) = op {
                    if op.thread as usize == t {
                        run_op(mm, cpu, &op)?;
                        done += 1;
                    }
                    if !barrier.wait(cpu) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        r.map(|()| done).map_err(|e| {
            barrier.failed.store(true, std::sync::atomic::Ordering::Release);
            (done, e)
        })
    });
    if r.error.is_none() {
        r.error = parse_error.into_inner().unwrap_or_else(|p| p.into_inner());
    }
    r
}

/// The addresses a line names (for `brk`, up to the page above the
/// rounded-up break, which the heap must leave free).
fn op_range(k: &OpKind) -> (u64, u64) {
    match *k {
        OpKind::Mmap { addr, len, .. }
        | OpKind::Munmap { addr, len }
        | OpKind::Madvise { addr, len, .. }
        | OpKind::Mprotect { addr, len, .. } => (addr, addr + len),
        OpKind::Mremap { old_addr, old_len, new_addr, new_len } => {
            (old_addr.min(new_addr), (old_addr + old_len).max(new_addr + new_len))
        }
        OpKind::Brk { addr } => (addr, addr.next_multiple_of(PAGE_SIZE) + PAGE_SIZE),
        OpKind::Write { addr } | OpKind::Read { addr } => (addr, addr + 1),
    }
}

/// Widens `(lo, hi)` (the span so far) by `op` for [`trace_span`].
fn span_add((lo, hi): (u64, u64), op: &Op) -> (u64, u64) {
    let (s, e) = op_range(&op.kind);
    (lo.min(s), hi.max(e))
}

/// The reservation around the span `(lo, hi)` of the addresses a trace names.
fn span_reservation((lo, hi): (u64, u64)) -> Option<(u64, u64)> {
    if lo >= hi {
        return None;
    }
    let lo = (lo & !(PMD_SIZE - 1)).saturating_sub(PMD_SIZE);
    let hi = (hi.next_multiple_of(PMD_SIZE) + PMD_SIZE).min(TASK_SIZE);
    Some((lo, hi))
}

/// The PROT_NONE reservation a trace is placed in (as the kernel oracle
/// places it): the span of every address its lines name, rounded out to
/// 2 MiB, plus 2 MiB each side.
pub fn trace_span(ops: &[Op]) -> Option<(u64, u64)> {
    span_reservation(ops.iter().fold((u64::MAX, 0), span_add))
}

/// Places the trace in its reservation; the error if that failed.
fn reserve(mm: &Mm, span: Option<(u64, u64)>) -> Option<Error> {
    let (lo, hi) = span?;
    let mut cpu = mm.cpu(0);
    mm.reserve(&mut cpu, lo, hi).err()
}

/// Replays a parsed trace. Each `@T` thread runs its own lines in order.
/// The trace runs inside a PROT_NONE reservation ([`trace_span`]), as on
/// the kernel oracle, so that page tables are freed on munmap exactly when
/// the kernel frees them there.
pub fn replay(mm: &Mm, ops: &[Op], opts: &RunOptions) -> RunResult {
    if let Some(e) = reserve(mm, trace_span(ops)) {
        return finish(mm, vec![mm.cpu(0)], 0.0, 0, Some(e), false);
    }
    let nthreads = ops.iter().map(|o| o.thread as usize + 1).max().unwrap_or(1);
    if runs_parallel(opts) {
        return run_parallel_ops(mm, ops.iter().map(|op| Ok(*op)), nthreads, opts);
    }
    // Serially, in file order; each trace thread still has its own CPU.
    let mut cpus: Vec<Cpu> = (0..nthreads).map(|i| mm.cpu(i)).collect();
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut error = None;
    for op in ops {
        let cpu = &mut cpus[op.thread as usize];
        if let Err(e) = run_op(mm, cpu, op) {
            error = Some(e);
            break;
        }
        done += 1;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    finish(mm, cpus, elapsed, done, error, opts.check_invariants)
}

/// What a streamed replay on several CPUs needs to know before it starts,
/// found by a first read of the trace ([`summarize`]): how many CPUs the
/// in-memory [`replay`] would run it on. A serial replay needs none (its
/// CPUs come as their threads do). Not a kernel structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceSummary {
    /// One more than the highest `@T` thread.
    pub nthreads: usize,
    /// Operations before the end or the first bad line.
    pub ops: u64,
}

/// Reads a trace through to its end, or to its first bad line, as
/// `parse_prefix` would, holding one buffer: its [`TraceSummary`].
pub fn summarize<R: Read>(src: R) -> TraceSummary {
    let mut r = TraceReader::new(src);
    let (mut threads, mut ops) = (0u32, 0u64);
    while let Ok(Some(op)) = r.next_op() {
        threads = threads.max(op.thread);
        ops += 1;
    }
    TraceSummary { nthreads: threads as usize + 1, ops }
}

/// The PROT_NONE reservation a streamed trace runs in: all of user space,
/// since the span of its lines ([`trace_span`]) is known only once it is
/// read. Every figure comes out as inside the span's reservation: the
/// lines that place VMAs (the VMA operations; a stack growing down stays
/// joined to its VMA) lie at least 2 MiB inside both, and the reservation
/// counts only through the pieces next to them, whose ends bound
/// `free_pgtables()` (`prev_end`, `next_start`), and which the two share.
/// An access outside every VMA is a SIGSEGV either way.
pub const STREAM_RESERVATION: (u64, u64) = (0, TASK_SIZE);

/// Whether a run goes through [`run_cpus`] rather than serially.
fn runs_parallel(opts: &RunOptions) -> bool {
    opts.threads > 1 || opts.deterministic.is_some() || opts.time.is_some()
}

/// Operations the serial streamed replay parses at a time, between two
/// looks at the clock (`elapsed_s` counts simulating only, as in
/// [`replay`]).
const BATCH: usize = 256;

/// Replays a trace as it is read from `src`, holding a buffer of it (and,
/// with threads, two [`Chunk`]s), never the whole: the same run as
/// [`replay`] of `parse_prefix` of the same text (the figures of what ran
/// before a bad line, and that line's error unless an operation failed
/// first). Serially the trace is read once and `summary` is not needed; on
/// several CPUs ([`RunOptions::threads`], `deterministic`, `time`) it must
/// be the [`summarize`] of the same text, read before.
pub fn replay_stream<R: Read + Send>(mm: &Mm, summary: Option<&TraceSummary>, src: R, opts: &RunOptions) -> RunResult {
    let mut reader = TraceReader::new(src);
    if !runs_parallel(opts) {
        return replay_stream_serial(mm, &mut reader, opts);
    }
    let Some(summary) = summary else {
        let e = Error::Config("a streamed replay on several CPUs needs the trace's summary (summarize)".into());
        return finish(mm, vec![mm.cpu(0)], 0.0, 0, Some(e), false);
    };
    if summary.ops > 0 {
        if let Some(e) = reserve(mm, Some(STREAM_RESERVATION)) {
            return finish(mm, vec![mm.cpu(0)], 0.0, 0, Some(e), false);
        }
    }
    run_parallel_ops(mm, &mut reader, summary.nthreads.max(1), opts)
}

/// [`replay_stream`] on one host thread, in file order, reading the trace
/// once: the reservation is taken before the first operation, each trace
/// thread's CPU when its first line comes.
fn replay_stream_serial<R: Read>(mm: &Mm, reader: &mut TraceReader<R>, opts: &RunOptions) -> RunResult {
    let mut cpus: Vec<Cpu> = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut elapsed = Duration::ZERO;
    let mut done = 0u64;
    let mut error = None;
    let mut reserved = false;
    loop {
        batch.clear();
        let parse_error = reader.read_batch(&mut batch, BATCH);
        if !reserved && !batch.is_empty() {
            // As [`replay`] reserves for any trace with an operation.
            if let Some(e) = reserve(mm, Some(STREAM_RESERVATION)) {
                return finish(mm, vec![mm.cpu(0)], 0.0, 0, Some(e), false);
            }
            reserved = true;
        }
        let t0 = Instant::now();
        let r = run_serial(mm, &mut cpus, &batch);
        elapsed += t0.elapsed();
        match r {
            Ok(n) => done += n,
            Err((n, e)) => {
                done += n;
                error = Some(e);
                // [`replay`] has a CPU for every thread of the lines it
                // parsed, up to the first bad one, whether they ran or not.
                let mut nthreads = batch.iter().map(|op| op.thread as usize + 1).fold(cpus.len(), usize::max);
                while let Ok(Some(op)) = reader.next_op() {
                    nthreads = nthreads.max(op.thread as usize + 1);
                }
                cpus.extend((cpus.len()..nthreads).map(|i| mm.cpu(i)));
                break;
            }
        }
        if let Some(e) = parse_error {
            error = Some(e.into());
            break;
        }
        if batch.len() < BATCH {
            break;
        }
    }
    if cpus.is_empty() {
        cpus.push(mm.cpu(0));
    }
    finish(mm, cpus, elapsed.as_secs_f64(), done, error, opts.check_invariants)
}

/// Runs `ops` in order, each on its thread's CPU (made when first needed),
/// a run of one thread's accesses under one hold of its mmap read lock (as
/// a fault loop, and the built-in workloads, hold it): the figures of
/// [`run_op`] one at a time, without a locked store and fence per access.
/// Only for a serial run: no other CPU takes the lock meanwhile, but one
/// that asked would still get it between two accesses.
fn run_serial(mm: &Mm, cpus: &mut Vec<Cpu>, ops: &[Op]) -> crate::drive::runner::JobResult {
    let mut i = 0;
    while i < ops.len() {
        let thread = ops[i].thread;
        let t = thread as usize;
        if t >= cpus.len() {
            cpus.extend((cpus.len()..=t).map(|i| mm.cpu(i)));
        }
        let cpu = &mut cpus[t];
        if is_barrier(&ops[i]) {
            run_op(mm, cpu, &ops[i]).map_err(|e| (i as u64, e))?;
            i += 1;
            continue;
        }
        let pc = cpu.percpu();
        let mut g = mm.mmap_read_lock(&pc, cpu);
        while let Some(op) = ops.get(i) {
            let (addr, write) = match op.kind {
                OpKind::Write { addr } if op.thread == thread => (addr, true),
                OpKind::Read { addr } if op.thread == thread => (addr, false),
                _ => break,
            };
            match mm.access_held(&pc, g, cpu, addr, write) {
                Ok(held) => g = held,
                Err(e) => {
                    cpu.sync_pcp_gauge();
                    return Err((i as u64, Error::AtLine(op.line, Box::new(e))));
                }
            }
            i += 1;
            g.yield_to_writer(|| cpu.preempt(Point::Blocked));
        }
        drop(g);
        cpu.sync_pcp_gauge();
    }
    Ok(ops.len() as u64)
}

/// Replays the trace file at `path`, plain or compressed (zstd, gzip),
/// streamed: read once by [`replay_stream`], or, on several CPUs, first by
/// [`summarize`] and then again (the file must not change meanwhile). An
/// error opening it is returned before anything runs; one reading it ends
/// the run as a bad line does.
pub fn replay_path(mm: &Mm, path: &Path, opts: &RunOptions) -> std::io::Result<RunResult> {
    let summary = if runs_parallel(opts) { Some(summarize(trace::open(path)?)) } else { None };
    let src = trace::open(path)?;
    Ok(replay_stream(mm, summary.as_ref(), src, opts))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::{Config, Policy};
    use crate::trace::parse;

    /// CPU 0 writes page 0 while CPU 1 reads page 8 of the same 64 KiB
    /// range: if CPU 1's zero-page PTE lands between CPU 0's lockless
    /// estimate and its re-check, CPU 0 loses the race.
    const RACE: &str = "mmap 0x7f0000000000 0x200000\n@0 w 0x7f0000000000\n@1 r 0x7f0000008000\n";

    fn run(policy: Policy, seed: u64) -> RunResult {
        let mut c = Config { policy, ..Default::default() };
        for s in ["16kB=always", "32kB=always", "64kB=always", "2048kB=never"] {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 64 << 20;
        let mm = Mm::new(c).unwrap();
        let r = replay(
            &mm,
            &parse(RACE).unwrap(),
            &RunOptions { threads: 2, deterministic: Some(seed), check_invariants: true, ..Default::default() },
        );
        assert!(r.error.is_none(), "{:?}", r.error);
        r
    }

    /// The first seed under which CPU 0 loses the race.
    fn racing_seed(policy: Policy) -> u64 {
        (0..200).find(|&s| run(policy, s).stats.race.races > 0).expect("some seed races")
    }

    /// The mmap is on thread 0 and the writes on threads 1 and 2: they
    /// must wait for it, under every seed and on real threads.
    #[test]
    fn vma_operations_are_barriers_between_threads() {
        let mut t = String::from("mmap 0x7f0000000000 0x100000\n");
        for i in 0..64u64 {
            t += &format!("@{} w {:#x}\n", 1 + i % 2, 0x7f0000000000u64 + i * 4096);
        }
        t += "@0 munmap 0x7f0000000000 0x10000\n@1 w 0x7f0000010000\n@2 w 0x7f0000040000\n";
        let ops = parse(&t).unwrap();
        for det in [None, Some(0), Some(1), Some(2), Some(3), Some(7), Some(11), Some(13)] {
            let mut c = Config::default();
            c.memory.phys_bytes = 64 << 20;
            let mm = Mm::new(c).unwrap();
            let r = replay(
                &mm,
                &ops,
                &RunOptions { threads: 3, deterministic: det, check_invariants: true, ..Default::default() },
            );
            assert!(r.error.is_none(), "{det:?}: {:?}", r.error);
            // 64 pages written, 16 unmapped, one more (page 64) written after.
            assert_eq!(r.stats.rss_pages, 64 - 16 + 1, "{det:?}");
            assert_eq!(r.stats.rss_peak_pages, 64, "{det:?}: the peak was before the munmap");
            assert_eq!(r.ops_done, ops.len() as u64);
        }
    }

    /// The reservation covers what every line names, as the oracle's does:
    /// a heap's break (and the page above it) and an mremap target too.
    #[test]
    fn the_trace_span_covers_every_line_not_just_mmaps() {
        let ops = parse("brk 0x7f0000000000\nbrk 0x7f0000201001\nw 0x7f0000000000\n").unwrap();
        assert_eq!(trace_span(&ops), Some((0x7f0000000000 - PMD_SIZE, 0x7f0000400000 + PMD_SIZE)));
        let ops = parse("mmap 0x7f0000000000 0x1000\nmremap 0x7f0000000000 0x1000 0x7f0010000000 0x1000\n").unwrap();
        assert_eq!(trace_span(&ops).unwrap().1, 0x7f0010000000 + 2 * PMD_SIZE);
    }

    #[test]
    fn a_chosen_race_reproduces_with_its_outcome() {
        for policy in [Policy::Upstream, Policy::V1, Policy::Preferred] {
            let seed = racing_seed(policy);
            let a = run(policy, seed);
            let b = run(policy, seed);
            assert_eq!(a.stats, b.stats, "{policy:?}: same seed, same result");
            let s = &a.stats;
            assert_eq!(s.race.races, 1);
            assert_eq!(s.race.folios_wasted, 1);
            assert_eq!(s.race.pages_wasted, 16, "the lost folio was the 64 KiB one");
            match policy {
                Policy::V1 => {
                    // Re-checked under the PTL, retried one order lower: 32 KiB.
                    assert_eq!(s.race.retries, 1);
                    assert_eq!(s.race.refaults, 0);
                    assert_eq!(s.faults(), 2);
                    assert_eq!(s.mthp[3].anon_fault_alloc, 1);
                }
                Policy::Upstream => {
                    // Dropped, refaulted, and the new estimate picks 32 KiB.
                    assert_eq!(s.race.retries, 0);
                    assert_eq!(s.race.refaults, 1);
                    assert_eq!(s.faults(), 3);
                    assert_eq!(s.mthp[3].anon_fault_alloc, 1);
                }
                Policy::Preferred => {
                    // Dropped, refaulted; 64 KiB no longer fits: order 0.
                    assert_eq!(s.race.refaults, 1);
                    assert_eq!(s.faults(), 3);
                    assert_eq!(s.folio_orders[0], 1);
                    assert_eq!(s.rss_pages, 1);
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod policy_tests {
    use super::*;
    use crate::config::{Config, Policy};
    use crate::trace::parse;

    /// Page 5 populated, then a write to page 0 with only 64kB enabled.
    fn folio_orders(policy: Policy) -> [u64; 10] {
        let mut c = Config { policy, ..Default::default() };
        c.set_size_mode("64kB=always").unwrap();
        c.set_size_mode("2048kB=never").unwrap();
        c.memory.phys_bytes = 64 << 20;
        c.check_invariants = true;
        let mm = Mm::new(c).unwrap();
        let t = "mmap 0x7f0000000000 0x200000 nohugepage\nw 0x7f0000005000\nmadvise 0x7f0000000000 0x200000 hugepage\nw 0x7f0000000000\n";
        let r =
            replay(&mm, &parse(t).unwrap(), &RunOptions { threads: 1, check_invariants: true, ..Default::default() });
        assert!(r.error.is_none(), "{:?}", r.error);
        r.stats.folio_orders
    }

    #[test]
    fn each_policy_picks_its_order_around_a_populated_pte() {
        // upstream: the 64 KiB range is not empty and no other size is on: order 0.
        assert_eq!(folio_orders(Policy::Upstream)[..5], [2, 0, 0, 0, 0]);
        // v1: every order down to 2; 0..3 is empty: a 16 KiB folio.
        assert_eq!(folio_orders(Policy::V1)[..5], [1, 0, 1, 0, 0]);
        // preferred: 64 KiB or nothing: order 0.
        assert_eq!(folio_orders(Policy::Preferred)[..5], [2, 0, 0, 0, 0]);
    }
}

#[cfg(all(test, not(loom)))]
mod stream_tests {
    use super::*;
    use crate::config::Config;
    use crate::mm::vmstat::Stats;
    use crate::trace::{parse, parse_prefix};
    use std::io::Write;

    fn mm() -> Mm {
        let mut c = Config::default();
        for s in ["16kB=always", "64kB=always", "2048kB=inherit"] {
            c.set_size_mode(s).unwrap();
        }
        c.memory.phys_bytes = 1 << 30;
        Mm::new(c).unwrap()
    }

    fn in_memory(text: &str, opts: &RunOptions) -> RunResult {
        let (ops, parse_error) = parse_prefix(text);
        let mut r = replay(&mm(), &ops, opts);
        if r.error.is_none() {
            r.error = parse_error.map(Into::into);
        }
        r
    }

    /// As `replay_path` reads a file: once serially, twice on several CPUs.
    fn streamed(text: &[u8], opts: &RunOptions) -> RunResult {
        let summary = runs_parallel(opts).then(|| summarize(text));
        replay_stream(&mm(), summary.as_ref(), text, opts)
    }

    /// The figures two runs must share (`elapsed_s` aside).
    fn same(a: &RunResult, b: &RunResult) -> bool {
        let key = |r: &RunResult| -> (Stats, u64, Option<String>, Vec<u64>) {
            (r.stats.clone(), r.ops_done, r.error.as_ref().map(|e| e.to_string()), r.per_cpu_faults.clone())
        };
        key(a) == key(b)
    }

    fn kernel_cases() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_cases");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "trace"))
            .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap()))
            .collect();
        v.sort();
        assert!(v.len() >= 50);
        v
    }

    #[test]
    fn a_streamed_replay_is_the_in_memory_replay() {
        let serial = RunOptions { threads: 1, check_invariants: true, ..Default::default() };
        for (name, text) in kernel_cases() {
            let a = in_memory(&text, &serial);
            let b = streamed(text.as_bytes(), &serial);
            assert!(same(&a, &b), "{name}:\n{:?}\n{:?}", a.stats, b.stats);
            let ops = parse(&text).unwrap();
            let nthreads = ops.iter().map(|o| o.thread as usize + 1).max().unwrap_or(1);
            assert_eq!(summarize(text.as_bytes()), TraceSummary { nthreads, ops: ops.len() as u64 }, "{name}");
        }
    }

    /// The streamed replay runs in all of user space, the in-memory one in
    /// the span of the lines it parsed: traces whose accesses lie far
    /// outside their VMA operations (a stack growing 6 MiB down, a write
    /// far above that fails), whose munmaps free page tables at the edges
    /// of that span, whose bad line is followed by mmaps far away, or
    /// whose later threads never run, must come out the same, serially and
    /// under seeds.
    #[test]
    fn a_streamed_replay_outside_the_span_is_the_in_memory_replay() {
        let b = 0x7f00_0000_0000u64;
        let mut stack = format!("mmap {:#x} 0x10000 growsdown\n", b + (64 << 20));
        for k in 1..=24u64 {
            // Down to 6 MiB below the VMA, 256 KiB at a time.
            stack += &format!("w {:#x}\n", b + (64 << 20) - k * (256 << 10));
        }
        stack += &format!("munmap {:#x} 0x10000\nw {:#x}\nr {:#x}\n", b + (64 << 20), b + (58 << 20), b + (59 << 20));
        let edges = format!(
            "mmap {b:#x} 0x600000\nw {b:#x}\nw {:#x}\nw {:#x}\nmunmap {b:#x} 0x200000\nmunmap {:#x} 0x200000\n\
             w {:#x}\nw {:#x}\n",
            b + 0x2ff000,
            b + 0x5ff000,
            b + 0x400000,
            b + 0x300000,
            b + (1 << 39)
        );
        let after_bad =
            format!("mmap {b:#x} 0x200000\nw {b:#x}\nw 0xzz\nmmap {:#x} 0x1000\n@5 w {b:#x}\n", b - (1 << 40));
        let later_threads =
            format!("mmap {b:#x} 0x200000\n@1 w {b:#x}\nw {:#x}\n@3 w {b:#x}\n@2 r {b:#x}\n", b + (1 << 30));
        let then_bad = format!("{later_threads}w 0xzz\n@7 w {b:#x}\n");
        for t in [stack, edges, after_bad, later_threads, then_bad] {
            let serial = RunOptions { threads: 1, check_invariants: true, ..Default::default() };
            let a = in_memory(&t, &serial);
            let b = streamed(t.as_bytes(), &serial);
            assert!(same(&a, &b), "{t}:\n{a:?}\n{b:?}");
            assert!(a.stats.faults() > 0, "{t}");
            for seed in [1, 5] {
                let opts =
                    RunOptions { threads: 2, deterministic: Some(seed), check_invariants: true, ..Default::default() };
                let (a, b) = (in_memory(&t, &opts), streamed(t.as_bytes(), &opts));
                assert!(same(&a, &b), "{t} seed {seed}:\n{a:?}\n{b:?}");
            }
        }
    }

    #[test]
    fn a_bad_line_stops_the_streamed_replay_where_it_stops_the_text() {
        let serial = RunOptions { threads: 1, ..Default::default() };
        for t in [
            "mmap 0x7f0000000000 0x200000\nw 0x7f0000000000\nw 0x7f00000zz000\nmmap 0x7f1000000000 0x1000\n",
            "mmap 0x7f0000000000 0x200000\nw 0x7f0000000000\nw 0x7f0000400000\nw 0x7f0000001000\n",
            "mmap 0x7f0000000000 0x200000\n@2 w 0x7f0000000000\nmunmap 0x7f0000000000 0x3\n",
            "w 0x1000\n",
        ] {
            let a = in_memory(t, &serial);
            let b = streamed(t.as_bytes(), &serial);
            assert!(a.error.is_some(), "{t}");
            assert!(same(&a, &b), "{t}:\n{a:?}\n{b:?}");
        }
    }

    /// Threads with VMA operations as barriers, under several seeds: the
    /// streamed replay waits where the in-memory one does, so the same seed
    /// gives the same run; and a trace with stretches longer than a chunk
    /// (the mmap on thread 0, the writes on 1 and 2) still loses nothing.
    #[test]
    fn a_streamed_threaded_replay_keeps_the_barriers_and_the_seeds_run() {
        let mut t = String::from("mmap 0x7f0000000000 0x40000000\n");
        // Whole 64 KiB folios.
        let pages = CHUNK_OPS as u64 * 2 + 112;
        for i in 0..pages {
            t += &format!("@{} w {:#x}\n", 1 + i % 2, 0x7f0000000000u64 + i * 4096);
        }
        t += "@0 munmap 0x7f0000000000 0x200000\n@1 w 0x7f0000200000\n@2 r 0x7f0000000000\n";
        for det in [Some(0), Some(1), Some(7), None] {
            let opts = RunOptions { threads: 3, deterministic: det, check_invariants: true, ..Default::default() };
            let b = streamed(t.as_bytes(), &opts);
            // The last read is of an unmapped page: SIGSEGV, every line
            // before it done but the other thread's last write, in the same
            // stretch, which may see the failure first and stop (on host
            // threads, or when a seed runs the read first).
            let want = pages + 2..=pages + 3;
            assert!(want.contains(&b.ops_done), "{det:?}: {} ops, {:?}", b.ops_done, b.error);
            assert!(matches!(b.error.as_ref().map(Error::inner), Some(Error::Segv(0x7f00_0000_0000))), "{det:?}");
            assert_eq!(b.stats.rss_peak_pages, pages, "{det:?}");
            if det.is_some() {
                let a = in_memory(&t, &opts);
                assert!(same(&a, &b), "{det:?}:\n{:?}\n{:?}", a.stats, b.stats);
            }
        }
        for (name, text) in kernel_cases().into_iter().step_by(4) {
            for seed in [3, 11] {
                let opts =
                    RunOptions { threads: 2, deterministic: Some(seed), check_invariants: true, ..Default::default() };
                let a = in_memory(&text, &opts);
                let b = streamed(text.as_bytes(), &opts);
                assert!(same(&a, &b), "{name} seed {seed}");
            }
        }
    }

    fn write_file(path: &std::path::Path, bytes: &[u8]) {
        std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
    }

    #[test]
    fn gzip_and_zstd_traces_replay_as_the_plain_file() {
        let dir = std::env::temp_dir().join(format!("anonfolio-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let serial = RunOptions { threads: 1, check_invariants: true, ..Default::default() };
        for (name, text) in kernel_cases().into_iter().step_by(5) {
            let plain = dir.join("t.trace");
            write_file(&plain, text.as_bytes());
            let zst = dir.join("t.trace.zst");
            write_file(&zst, &zstd::encode_all(text.as_bytes(), 3).unwrap());
            let gz = dir.join("t.trace.gz");
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            write_file(&gz, &e.finish().unwrap());
            let a = replay_path(&mm(), &plain, &serial).unwrap();
            assert!(a.error.is_none(), "{name}: {:?}", a.error);
            assert!(a.stats.faults() > 0);
            for p in [&zst, &gz] {
                let b = replay_path(&mm(), p, &serial).unwrap();
                assert!(same(&a, &b), "{name} as {}", p.display());
            }
            // A truncated compressed trace is an error naming a line.
            let bytes = std::fs::read(&zst).unwrap();
            write_file(&zst, &bytes[..bytes.len() / 2]);
            let c = replay_path(&mm(), &zst, &serial).unwrap();
            let msg = c.error.expect("a truncated trace fails").to_string();
            assert!(msg.starts_with("line ") && msg.contains("cannot read the trace"), "{msg}");
        }
        assert_eq!(replay_path(&mm(), &dir.join("missing"), &serial).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A source that makes a sequential first-touch trace of `lines` pages
    /// as it is read, and at every read checks that the replay is not
    /// reading ahead of what it ran by more than `ahead` bytes (the faults
    /// so far tell how many lines ran: one each).
    struct Watched<'a> {
        mm: &'a Mm,
        next: u64,
        lines: u64,
        handed_out: u64,
        ahead: u64,
        most_ahead: u64,
        pending: Vec<u8>,
    }

    const LINE: u64 = 17; // "w 0x7f00xxxxx000\n"

    impl Read for Watched<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let ran = self.mm.stats().faults();
            while (self.pending.len() as u64) < out.len() as u64 && self.next < self.lines {
                writeln!(self.pending, "w {:#x}", 0x7f00_0000_0000u64 + self.next * 4096).unwrap();
                self.next += 1;
            }
            let n = out.len().min(self.pending.len());
            out[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            self.handed_out += n as u64;
            // What the replay holds now, at most: all it was given but the
            // lines it ran.
            let ahead = self.handed_out.saturating_sub(ran * LINE);
            self.most_ahead = self.most_ahead.max(ahead);
            assert!(ahead <= self.ahead, "{ahead} bytes read ahead of the {ran} lines run");
            Ok(n)
        }
    }

    /// Replays `lines` generated lines from a [`Watched`] source allowed to
    /// be `ahead` bytes ahead of the run.
    fn watched_replay(lines: u64, opts: &RunOptions, ahead: u64) -> u64 {
        let mut c = Config::default();
        c.memory.phys_bytes = (lines + 1024) * 4096;
        let mm = Mm::new(c).unwrap();
        let base = 0x7f00_0000_0000u64;
        let summary = TraceSummary { nthreads: 1, ops: lines };
        let mut cpu = mm.cpu(0);
        mm.mmap(&mut cpu, base, lines * 4096, Default::default()).unwrap();
        drop(cpu);
        let mut src = Watched { mm: &mm, next: 0, lines, handed_out: 0, ahead, most_ahead: 0, pending: Vec::new() };
        let r = replay_stream(&mm, Some(&summary), &mut src, opts);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.ops_done, lines);
        assert_eq!(r.stats.rss_pages, lines);
        assert_eq!(src.handed_out, lines * LINE);
        src.most_ahead
    }

    /// By construction, not by timing: 10^7 lines replay while the serial
    /// replay never holds more than a buffer and a batch of them, and the
    /// threaded one more than a buffer and two chunks.
    #[test]
    fn a_streamed_replay_holds_a_buffer_never_the_trace() {
        // A read and the part of a line before it.
        let buffer = crate::trace::stream::READ_SIZE as u64 + LINE;
        let serial = RunOptions { threads: 1, ..Default::default() };
        let most = watched_replay(10_000_000, &serial, buffer + BATCH as u64 * LINE);
        assert!(most > buffer / 2, "the source was read as the replay went ({most})");
        let threads = RunOptions { threads: 2, ..Default::default() };
        let most = watched_replay(1_000_000, &threads, buffer + 2 * CHUNK_OPS as u64 * LINE);
        assert!(most > buffer / 2, "{most}");
    }
}
