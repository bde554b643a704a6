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
use anonfolio_trace::{Op, OpKind, Prot};

/// A piece of a VMA: what the access checks need. The kernel's own VMAs may
/// be merged where pieces are not; that changes no answer here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    start: u64,
    end: u64,
    prot: Prot,
    growsdown: bool,
}

/// A reservation range to unmap before the operation at `op` (an index into
/// the trace's operations), in trace addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Punch {
    pub op: usize,
    pub start: u64,
    pub end: u64,
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
            out.extend(cut(&mut self.reserved, a, b).into_iter().map(|(start, end)| Punch { op, start, end }));
        }
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
            OpKind::Madvise { .. } => {}
            OpKind::Mprotect { addr, len, prot } => {
                for p in pic.remove(addr, addr + len) {
                    pic.insert(Piece { prot, ..p });
                }
            }
            OpKind::Mremap { old_addr, old_len, new_addr, new_len } => {
                let old_end = old_addr + old_len;
                if new_addr == old_addr {
                    if new_len < old_len {
                        pic.unmap(old_addr + new_len, old_end);
                    } else if new_len > old_len {
                        // Grows in place (vma_expandable): the gap above must be free.
                        let Some(&top) = pic.covering(old_end - 1) else { continue };
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
                    let moved = pic.remove(old_addr, old_end);
                    let moved_res = cut(&mut pic.reserved, old_addr, old_end);
                    for p in &moved {
                        pic.unmap(p.start.wrapping_add(delta), p.end.wrapping_add(delta));
                    }
                    for &(s, e) in &moved_res {
                        pic.unmap(s.wrapping_add(delta), e.wrapping_add(delta));
                    }
                    for p in moved {
                        pic.insert(Piece { start: p.start.wrapping_add(delta), end: p.end.wrapping_add(delta), ..p });
                    }
                    for (s, e) in moved_res {
                        pic.reserved.push((s.wrapping_add(delta), e.wrapping_add(delta)));
                    }
                    pic.reserved.sort_unstable();
                } else {
                    let Some(&first) = pic.covering(old_addr) else { continue };
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
        assert_eq!(run(t).unwrap(), vec![Punch { op: 1, start: 0x204000, end: 0x80_0000 }]);
        let t = "mmap 0x200000 0x4000\nmremap 0x200000 0x4000 0x200000 0x2000\nw 0x203000\n";
        assert!(run(t).is_err());
    }

    #[test]
    fn growth_punches_the_gap_it_grows_into() {
        let t = "mmap 0x200000 0x1000\nmmap 0x400000 0x10000 growsdown\nw 0x3ff000\nw 0x300000\n";
        assert_eq!(run(t).unwrap(), vec![Punch { op: 2, start: 0x201000, end: 0x400000 }]);
        let t = "brk 0x500000\nbrk 0x501001\nw 0x501fff\nbrk 0x500000\nw 0x500000\n";
        let e = run(t).unwrap_err().to_string();
        assert!(e.starts_with("line 5: segmentation fault: access at 0x500000"), "{e}");
        assert_eq!(
            run("mmap 0x600000 0x1000\nbrk 0x500000\nbrk 0x501001\n").unwrap(),
            vec![Punch { op: 2, start: 0x500000, end: 0x600000 }]
        );
        // A write below a VMA that does not grow down is outside every VMA.
        assert!(run("mmap 0x400000 0x10000\nw 0x3ff000\n").is_err());
    }
}
