//! The oracle's own picture of the trace's address space, run over the whole
//! trace before anything touches the kernel.
//!
//! It answers two questions the replay cannot leave to the kernel:
//! - which accesses the kernel would answer with SIGSEGV (outside every VMA,
//!   a write to a read-only VMA, any access to a `PROT_NONE` VMA), so that
//!   they are reported with their line before anything runs;
//! - where the trace grows into space it never mapped, which inside the
//!   oracle's `PROT_NONE` reservation is not free: there the reservation is
//!   unmapped first ("punched"), so that the kernel sees the empty address
//!   space the trace describes. The punches are the whole gap the growth
//!   goes into: for a `brk` that grows the heap, from the rounded-up old
//!   break to the next mapping above (or the end of the trace's span); for
//!   an access below a `MAP_GROWSDOWN` VMA, from the end of the mapping
//!   below (or the start of the span) to the VMA's start; for an `mremap`
//!   that grows in place, from the old end to the next mapping above.
//!
//! Whether the kernel then allows the growth (the heap's one-page gap below
//! the next VMA, the stack guard gap, `RLIMIT_STACK`) and whether it accepts
//! a VMA operation is the kernel's to say: the replay reports what it refused.
//! The picture only follows the operations as the kernel does them when they
//! succeed, so that the checks after them are right.

use crate::{Error, Result, PAGE};
use anonfolio_trace::{Advice, Op, OpKind, Prot};

/// A piece of a VMA: what the access checks need. The kernel's own VMAs may
/// be merged where pieces are not; that changes no answer here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    start: u64,
    end: u64,
    prot: Prot,
    growsdown: bool,
}

/// A system call the replay makes for the operation at `op` (an index into
/// the trace's operations), in trace addresses, where the trace's own
/// operation cannot be passed to the kernel as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Punch {
    pub op: usize,
    pub call: Call,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// Unmap the reservation in `[start, end)` (before the operation).
    Unreserve { start: u64, end: u64 },
    /// The operation's `madvise` on `[start, end)` only: the trace's range
    /// has holes, which in the oracle are reservation (a VMA the advice
    /// would reach, where the kernel in the trace's address space finds
    /// nothing: `madvise_walk_vmas` skips it and says ENOMEM, which the
    /// replay accepts as the kernel does for the mapped parts).
    Madvise { start: u64, end: u64 },
    /// The operation's same-size `mremap` move of `[start, end)` to
    /// `start + delta`, one maximal run of VMAs at a time: the kernel moves
    /// every VMA of the range (6.17+) and leaves holes where they are.
    Move { start: u64, end: u64, delta: u64 },
    /// Nothing to pass to the kernel: the operation reaches no VMA of the
    /// trace (a madvise of holes only, ENOMEM, which the replay accepts).
    Skip,
}

struct Picture {
    /// Sorted, disjoint.
    vmas: Vec<Piece>,
    /// The reservation pieces still mapped, sorted, disjoint (trace addresses).
    reserved: Vec<(u64, u64)>,
    /// The trace's span `[lo, hi)`: gaps that reach no mapping end here.
    lo: u64,
    hi: u64,
    /// `mm->start_brk` and `mm->brk`, once the first `brk` set them.
    brk: Option<(u64, u64)>,
}

fn page_up(a: u64) -> u64 {
    a.div_ceil(PAGE) * PAGE
}

/// Removes `[a, b)` from a sorted list of disjoint ranges; returns what was removed.
fn cut(v: &mut Vec<(u64, u64)>, a: u64, b: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(v.len() + 1);
    let mut removed = Vec::new();
    for &(s, e) in v.iter() {
        if e <= a || s >= b {
            out.push((s, e));
            continue;
        }
        if s < a {
            out.push((s, a));
        }
        removed.push((s.max(a), e.min(b)));
        if e > b {
            out.push((b, e));
        }
    }
    *v = out;
    removed
}

impl Picture {
    fn covering(&self, addr: u64) -> Option<&Piece> {
        self.vmas.iter().find(|p| p.start <= addr && addr < p.end)
    }

    fn insert(&mut self, p: Piece) {
        let i = self.vmas.partition_point(|q| q.start < p.start);
        self.vmas.insert(i, p);
    }

    /// Splits the pieces at `a` and `b` and removes those inside `[a, b)`.
    fn remove(&mut self, a: u64, b: u64) -> Vec<Piece> {
        let mut out = Vec::with_capacity(self.vmas.len() + 1);
        let mut removed = Vec::new();
        for &p in &self.vmas {
            if p.end <= a || p.start >= b {
                out.push(p);
                continue;
            }
            if p.start < a {
                out.push(Piece { end: a, ..p });
            }
            removed.push(Piece { start: p.start.max(a), end: p.end.min(b), ..p });
            if p.end > b {
                out.push(Piece { start: b, ..p });
            }
        }
        self.vmas = out;
        removed
    }

    /// Unmaps `[a, b)` (VMAs and reservation), as munmap does.
    fn unmap(&mut self, a: u64, b: u64) {
        self.remove(a, b);
        cut(&mut self.reserved, a, b);
    }

    /// The reservation inside `[a, b)`, which the replay unmaps before `op`.
    fn punch(&mut self, op: usize, a: u64, b: u64, out: &mut Vec<Punch>) {
        if a < b {
            let removed = cut(&mut self.reserved, a, b);
            out.extend(removed.into_iter().map(|(start, end)| Punch { op, call: Call::Unreserve { start, end } }));
        }
    }

    /// The maximal runs of `[a, b)` that VMAs cover.
    fn covered_runs(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in self.vmas.iter().filter(|p| p.end > a && p.start < b) {
            let (s, e) = (p.start.max(a), p.end.min(b));
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
        runs
    }

    fn covers(&self, a: u64, b: u64) -> bool {
        self.covered_runs(a, b) == [(a, b)]
    }

    /// The start of the first piece at or above `a`, or the span's end.
    fn next_start(&self, a: u64) -> u64 {
        self.vmas.iter().find(|p| p.end > a).map_or(self.hi, |p| p.start.max(a)).min(self.hi.max(a))
    }

    /// The end of the last piece below `a`, or the span's start.
    fn prev_end(&self, a: u64) -> u64 {
        self.vmas.iter().rev().find(|p| p.start < a).map_or(self.lo, |p| p.end.min(a)).max(self.lo.min(a))
    }
}

fn refused(line: u32, what: String) -> Error {
    Error::AtLine(line, Box::new(Error::Refused(what)))
}

fn segv(line: u32, addr: u64, write: bool, why: &'static str) -> Error {
    Error::AtLine(line, Box::new(Error::SegvAccess { addr, write, why }))
}

/// Runs the picture over `ops`. The reservation covers `[res_lo, res_hi)`
/// and the trace's span `[lo, hi)` (trace addresses). Returns the punches,
/// in operation order, or the first access the kernel would refuse or mmap
/// over a live mapping.
pub(crate) fn check(ops: &[Op], lo: u64, hi: u64, res_lo: u64, res_hi: u64) -> Result<Vec<Punch>> {
    let mut pic = Picture { vmas: Vec::new(), reserved: vec![(res_lo, res_hi)], lo, hi, brk: None };
    let mut punches = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op.kind {
            OpKind::Mmap { addr, len, flags } => {
                let end = addr + len;
                if pic.vmas.iter().any(|p| p.start < end && addr < p.end) {
                    return Err(Error::AtLine(
                        op.line,
                        Box::new(Error::Overlap(format!("mmap {addr:#x}+{len:#x} overlaps an existing mapping"))),
                    ));
                }
                cut(&mut pic.reserved, addr, end);
                pic.insert(Piece { start: addr, end, prot: flags.prot, growsdown: flags.growsdown });
            }
            OpKind::Munmap { addr, len } => pic.unmap(addr, addr + len),
            OpKind::Madvise { addr, len, advice } => {
                let runs = pic.covered_runs(addr, addr + len);
                if runs != [(addr, addr + len)] {
                    // MADV_POPULATE_* stops at the first hole (ENOMEM).
                    let populate = matches!(advice, Advice::PopulateRead | Advice::PopulateWrite);
                    let take =
                        if populate { runs.first().filter(|r| r.0 == addr).into_iter().count() } else { runs.len() };
                    for &(start, end) in &runs[..take] {
                        punches.push(Punch { op: i, call: Call::Madvise { start, end } });
                    }
                    if take == 0 {
                        punches.push(Punch { op: i, call: Call::Skip });
                    }
                }
            }
            OpKind::Mprotect { addr, len, prot } => {
                if !pic.covers(addr, addr + len) {
                    return Err(refused(
                        op.line,
                        format!(
                            "mprotect refused by the kernel: ENOMEM ({addr:#x}+{len:#x} is not all mapped; \
                             do_mprotect_pkey stops at the first hole)"
                        ),
                    ));
                }
                for p in pic.remove(addr, addr + len) {
                    pic.insert(Piece { prot, ..p });
                }
            }
            OpKind::Mremap { old_addr, old_len, new_addr, new_len } => {
                let old_end = old_addr + old_len;
                // vma_lookup(old_addr) first: a hole there is EFAULT (in the
                // oracle it is reservation, which the kernel would move).
                // The rest (one VMA for a resize) the kernel checks itself.
                if pic.covering(old_addr).is_none() {
                    return Err(refused(
                        op.line,
                        format!("mremap refused by the kernel: EFAULT ({old_addr:#x} is not mapped)"),
                    ));
                }
                if new_addr == old_addr {
                    if new_len < old_len {
                        pic.unmap(old_addr + new_len, old_end);
                    } else if new_len > old_len {
                        // Grows in place (vma_expandable): the gap above must be free.
                        let Some(&top) = pic.covering(old_end - 1) else { unreachable!("covered above") };
                        let gap_end = pic.next_start(old_end);
                        pic.punch(i, old_end, gap_end, &mut punches);
                        cut(&mut pic.reserved, old_end, old_addr + new_len);
                        pic.insert(Piece { start: old_end, end: old_addr + new_len, ..top });
                    }
                    continue;
                }
                // A move. Of the same size it takes every VMA of the range,
                // each to its offset (6.17+), the reservation's pieces too;
                // otherwise one VMA, whose tail a shrink unmaps first.
                let delta = new_addr.wrapping_sub(old_addr);
                if new_len == old_len {
                    let runs = pic.covered_runs(old_addr, old_end);
                    if runs != [(old_addr, old_end)] {
                        for &(start, end) in &runs {
                            punches.push(Punch { op: i, call: Call::Move { start, end, delta } });
                        }
                    }
                    let moved = pic.remove(old_addr, old_end);
                    for p in &moved {
                        pic.unmap(p.start.wrapping_add(delta), p.end.wrapping_add(delta));
                    }
                    for p in moved {
                        pic.insert(Piece { start: p.start.wrapping_add(delta), end: p.end.wrapping_add(delta), ..p });
                    }
                } else {
                    let Some(&first) = pic.covering(old_addr) else { unreachable!("covered above") };
                    pic.unmap(old_addr, old_end);
                    pic.unmap(new_addr, new_addr + new_len);
                    pic.insert(Piece { start: new_addr, end: new_addr + new_len, ..first });
                }
            }
            OpKind::Brk { addr } => match pic.brk {
                None => pic.brk = Some((addr, addr)),
                Some((start_brk, cur)) => {
                    if addr < start_brk {
                        // The kernel refuses it: the replay reports that.
                        continue;
                    }
                    let (old, new) = (page_up(cur), page_up(addr));
                    if new > old {
                        let gap_end = pic.next_start(old);
                        pic.punch(i, old, gap_end, &mut punches);
                        cut(&mut pic.reserved, old, new);
                        pic.insert(Piece { start: old, end: new, prot: Prot::ReadWrite, growsdown: false });
                    } else if new < old {
                        pic.unmap(new, old);
                    }
                    pic.brk = Some((start_brk, addr));
                }
            },
            OpKind::Write { addr } | OpKind::Read { addr } => {
                let write = matches!(op.kind, OpKind::Write { .. });
                match pic.covering(addr) {
                    Some(p) if p.prot == Prot::None => {
                        return Err(segv(op.line, addr, write, "the VMA is PROT_NONE"));
                    }
                    Some(p) if write && p.prot == Prot::Read => {
                        return Err(segv(op.line, addr, write, "a write to a read-only VMA"));
                    }
                    Some(_) => {}
                    None => {
                        // Below a MAP_GROWSDOWN VMA the kernel grows it to the
                        // page of the access (expand_downwards), if the stack
                        // guard gap and RLIMIT_STACK allow: that is its call.
                        let Some(k) = pic.vmas.iter().position(|p| p.start > addr) else {
                            return Err(Error::AtLine(op.line, Box::new(Error::Segv(addr))));
                        };
                        let stack = pic.vmas[k];
                        if !stack.growsdown {
                            return Err(Error::AtLine(op.line, Box::new(Error::Segv(addr))));
                        }
                        let page = addr & !(PAGE - 1);
                        let floor = pic.prev_end(addr);
                        pic.punch(i, floor, stack.start, &mut punches);
                        pic.vmas[k].start = page;
                        if stack.prot == Prot::None || (write && stack.prot == Prot::Read) {
                            return Err(segv(op.line, addr, write, "the stack grew, but its VMA forbids the access"));
                        }
                    }
                }
            }
        }
    }
    Ok(punches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anonfolio_trace::parse;

    fn unreserve(op: usize, start: u64, end: u64) -> Punch {
        Punch { op, call: Call::Unreserve { start, end } }
    }

    fn run(t: &str) -> Result<Vec<Punch>> {
        check(&parse(t).unwrap(), 0x10_0000, 0x80_0000, 0, 0xa0_0000)
    }

    #[test]
    fn protections_decide_which_accesses_fault() {
        let e = run("mmap 0x200000 0x4000\nmprotect 0x201000 0x1000 r\nr 0x201000\nw 0x201008\n").unwrap_err();
        assert_eq!(e.to_string(), "line 4: segmentation fault: write at 0x201008: a write to a read-only VMA");
        let e = run("mmap 0x200000 0x4000 prot=none\nr 0x203fff\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: segmentation fault: read at 0x203fff"), "{e}");
        run("mmap 0x200000 0x4000 prot=r\nr 0x200000\nmprotect 0x200000 0x4000 rw\nw 0x200000\n").unwrap();
    }

    #[test]
    fn mremap_moves_the_picture() {
        let t = "mmap 0x200000 0x4000\nmremap 0x200000 0x4000 0x400000 0x4000\nw 0x403000\nw 0x200000\n";
        assert_eq!(
            run(t).unwrap_err().to_string(),
            "line 4: segmentation fault: access at 0x200000 is outside every VMA"
        );
        let t = "mmap 0x200000 0x4000\nmremap 0x200000 0x4000 0x200000 0x8000\nw 0x207000\n";
        assert_eq!(run(t).unwrap(), vec![unreserve(1, 0x204000, 0x80_0000)]);
        let t = "mmap 0x200000 0x4000\nmremap 0x200000 0x4000 0x200000 0x2000\nw 0x203000\n";
        assert!(run(t).is_err());
    }

    #[test]
    fn growth_punches_the_gap_it_grows_into() {
        let t = "mmap 0x200000 0x1000\nmmap 0x400000 0x10000 growsdown\nw 0x3ff000\nw 0x300000\n";
        assert_eq!(run(t).unwrap(), vec![unreserve(2, 0x201000, 0x400000)]);
        let t = "brk 0x500000\nbrk 0x501001\nw 0x501fff\nbrk 0x500000\nw 0x500000\n";
        let e = run(t).unwrap_err().to_string();
        assert!(e.starts_with("line 5: segmentation fault: access at 0x500000"), "{e}");
        assert_eq!(
            run("mmap 0x600000 0x1000\nbrk 0x500000\nbrk 0x501001\n").unwrap(),
            vec![unreserve(2, 0x500000, 0x600000)]
        );
        // A write below a VMA that does not grow down is outside every VMA.
        assert!(run("mmap 0x400000 0x10000\nw 0x3ff000\n").is_err());
    }

    #[test]
    fn holes_split_madvise_and_same_size_moves_into_runs() {
        let t = "mmap 0x200000 0x2000\nmmap 0x204000 0x2000\nmadvise 0x200000 0x6000 free\n\
                 madvise 0x200000 0x6000 populate_write\nmadvise 0x206000 0x1000 dontneed\n";
        let calls: Vec<Call> = run(t).unwrap().into_iter().map(|p| p.call).collect();
        assert_eq!(
            calls,
            vec![
                Call::Madvise { start: 0x200000, end: 0x202000 },
                Call::Madvise { start: 0x204000, end: 0x206000 },
                Call::Madvise { start: 0x200000, end: 0x202000 },
                Call::Skip,
            ]
        );
        let t = "mmap 0x200000 0x2000\nmmap 0x204000 0x2000\nmremap 0x200000 0x6000 0x400000 0x6000\n\
                 w 0x405000\nw 0x403000\n";
        let e = run(t).unwrap_err();
        assert!(e.to_string().starts_with("line 5: segmentation fault: access at 0x403000"), "{e}");
        let t = "mmap 0x200000 0x2000\nmmap 0x204000 0x2000\nmremap 0x200000 0x6000 0x400000 0x6000\n";
        let calls: Vec<Call> = run(t).unwrap().into_iter().map(|p| p.call).collect();
        assert_eq!(
            calls,
            vec![
                Call::Move { start: 0x200000, end: 0x202000, delta: 0x200000 },
                Call::Move { start: 0x204000, end: 0x206000, delta: 0x200000 },
            ]
        );
        let e = run("mmap 0x200000 0x2000\nmremap 0x1ff000 0x2000 0x400000 0x2000\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: mremap refused by the kernel: EFAULT"), "{e}");
        let e = run("mmap 0x200000 0x2000\nmprotect 0x201000 0x2000 r\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: mprotect refused by the kernel: ENOMEM"), "{e}");
    }
}
