//! Streaming the trace: [`TraceReader`] turns any [`Read`] into operations
//! one line at a time, through a buffer of fixed size, so that a trace of
//! 10^8 lines is never held whole.
//!
//! The lines real traces are made of, `w 0xADDR` and `r 0xADDR` (with or
//! without `@T`), are parsed straight from the bytes ([`fast_access`]); any
//! other line (VMA operations, comments, decimal numbers, odd spacing, and
//! every bad line) goes through [`crate::parse_line`], so that the
//! operations and the error messages are those of the text parser, line
//! for line. Neither path allocates for a line that parses.

use crate::{parse_line, Error, Op, OpKind, Result, TASK_SIZE};
use std::io::{ErrorKind, Read};
use std::mem::MaybeUninit;

/// Bytes the reader asks its source for at a time; also the buffer's size
/// unless a single line is longer.
pub const READ_SIZE: usize = 256 << 10;

/// The page size reads are aligned to.
const PAGE: usize = 4096;

/// The index of the first page boundary in `buf` with a page below it
/// (`buf` must have two pages more than it reads at once).
fn aligned_in(buf: &[u8]) -> usize {
    PAGE + buf[PAGE..].as_ptr().align_offset(PAGE)
}

/// Parses `[@T ]w|r 0xHEX` ending in `\n` or `\r\n` at the start of `b`:
/// the operation and the bytes of its line. `None` for any other shape (or
/// a line near the end of `b`), which the general parser then decides, so
/// this only has to agree with it on the lines it accepts: `@T` in 1-7
/// decimal digits below 2^20, one space each, 1-16 hex digits below
/// `TASK_SIZE`.
#[inline(always)]
fn fast_access(b: &[u8], lineno: u64) -> Option<(Op, usize)> {
    // The longest line this takes is 31 bytes, and it reads the 16 bytes
    // after `0x` and one more: with 40 bytes there is no bounds check to
    // fail on the way.
    if b.len() < 40 {
        return None;
    }
    let mut i = 0;
    let mut thread = 0u32;
    if b[0] == b'@' {
        i = 1;
        while i <= 7 && b[i].is_ascii_digit() {
            thread = thread * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        if i == 1 || thread >= 1 << 20 || b[i] != b' ' {
            return None;
        }
        i += 1;
    }
    let head = u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let write = if head == u32::from_le_bytes(*b"w 0x") {
        true
    } else if head == u32::from_le_bytes(*b"r 0x") {
        false
    } else {
        return None;
    };
    i += 4;
    // i <= 13: the 18 bytes from i lie in the 40.
    let (not_hex, value) = hex16(b[i..i + 16].try_into().unwrap());
    // The digits: a 17th is no line end, which the match below rejects.
    let n = (not_hex | 1 << 16).trailing_zeros() as usize;
    if n == 0 {
        return None;
    }
    // The first n nibbles are digits, the rest shifted out.
    let addr = value >> (4 * (16 - n));
    i += n;
    match b[i] {
        b'\n' => i += 1,
        b'\r' if b[i + 1] == b'\n' => i += 2,
        _ => return None,
    }
    if addr >= TASK_SIZE {
        return None;
    }
    let kind = if write { OpKind::Write { addr } } else { OpKind::Read { addr } };
    Some((Op { thread, line: lineno as u32, kind }, i))
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` that is `0`-`9`, and of each that is
/// `a`-`f` or `A`-`F`, the other bits clear.
#[inline(always)]
fn hex_classes(w: u64) -> (u64, u64) {
    // Per byte (below 0x80, so that no sum carries into the next byte):
    // the high bit of `b + (0x80 - lo)` says b >= lo, of `b + (0x7f - hi)`
    // that b > hi.
    let ascii = !w & HI;
    let x = w & !HI;
    let digit = (x + LO * (0x80 - b'0' as u64)) & !(x + LO * (0x7f - b'9' as u64));
    let y = x | (LO * 0x20);
    let alpha = (y + LO * (0x80 - b'a' as u64)) & !(y + LO * (0x7f - b'f' as u64));
    (digit & ascii & HI, alpha & ascii & HI)
}

/// The nibbles of the 8 bytes of `nib` (each below 16), the first most
/// significant.
#[inline(always)]
fn gather(nib: u64) -> u64 {
    // Byte k holds digit k; gather them, the first most significant.
    let v = nib.swap_bytes();
    let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    (v | (v >> 16)) & 0x0000_0000_ffff_ffff
}

/// The 16 bytes of `b` read as hex digits: a mask with bit k set if byte k
/// is not one (so that a line's check is one test against the bits it
/// needs), and the value of all 16 read as digits, the first most
/// significant (a byte that is not a digit gives a nibble of garbage, its
/// low four bits, and only that nibble). With SSE2, which every x86-64
/// has: 16 bytes in some 25 instructions, against 60 for two words of
/// [`hex_classes`] and [`gather`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn hex16(b: &[u8; 16]) -> (u32, u64) {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline, so these intrinsics
    // exist on every CPU this runs on; the one load reads the 16 bytes of
    // `b` (unaligned load), nothing else is read or written.
    unsafe {
        let v = _mm_loadu_si128(b.as_ptr().cast::<__m128i>());
        let set = |c: u8| _mm_set1_epi8(c as i8);
        // `lo <= b < lo + n` is `b - lo < n` unsigned, which is `b - lo +
        // 0x80 < n + 0x80` signed (the only compare SSE2 has): one add and
        // one compare a range.
        let below = |x: __m128i, lo: u8, n: u8| _mm_cmplt_epi8(_mm_add_epi8(x, set(0x80 - lo)), set(0x80 + n));
        let digit = below(v, b'0', 10);
        let alpha = below(_mm_or_si128(v, set(0x20)), b'a', 6);
        let not_hex = !_mm_movemask_epi8(_mm_or_si128(digit, alpha)) as u32 & 0xffff;
        // '0'-'9' have their value in the low nibble, 'a'-'f' and 'A'-'F'
        // their value minus 9: add 9 where alpha (the bytes' high bits
        // are cut off below).
        let nib = _mm_add_epi8(v, _mm_and_si128(alpha, set(9)));
        // Each 16-bit lane holds digits 2j (low byte) and 2j + 1: put the
        // pair's value in its high byte (the first digit's nibble shifted
        // to the top, which clears the rest), move that down, then pack
        // the 8 bytes, in order.
        let first = _mm_slli_epi16(nib, 12);
        let second = _mm_and_si128(nib, _mm_set1_epi16(0x0f00));
        let pair = _mm_srli_epi16(_mm_or_si128(first, second), 8);
        let packed = _mm_packus_epi16(pair, _mm_setzero_si128());
        (not_hex, (_mm_cvtsi128_si64(packed) as u64).swap_bytes())
    }
}

/// [`hex16`] without SSE2: two words of [`hex_classes`] and [`gather`].
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn hex16(b: &[u8; 16]) -> (u32, u64) {
    hex16_swar(b)
}

/// [`hex16`] in plain integer arithmetic (the reference it is tested against).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline(always)]
fn hex16_swar(b: &[u8; 16]) -> (u32, u64) {
    let w0 = u64::from_le_bytes(b[..8].try_into().unwrap());
    let w1 = u64::from_le_bytes(b[8..].try_into().unwrap());
    // The high bit of each byte, gathered into the top byte by a multiply.
    let bits = |h: u64| ((h >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32;
    // As `hex16` does: the low nibble, plus 9 where a letter.
    let word = |w: u64| {
        let (digit, alpha) = hex_classes(w);
        (bits(digit | alpha), gather(((w & (LO * 0x0f)) + (alpha >> 7) * 9) & (LO * 0x0f)))
    };
    let ((m0, v0), (m1, v1)) = (word(w0), word(w1));
    (!(m0 | (m1 << 8)) & 0xffff, (v0 << 32) | v1)
}

/// The shape of a plain access line, `w 0x` or `r 0x`, `digits` hex digits
/// (1-16) and `\n`: what the lines of a recorded trace mostly share with
/// the line before them. Not a format notion: a guess that lets
/// [`same_shape_run`] know a line's length before it reads its bytes.
#[derive(Clone, Copy)]
struct Shape {
    digits: usize,
    /// The [`hex16`] mask bits of the bytes that must be digits.
    need: u32,
    /// The highest [`hex16`] value (before its shift to `digits`) whose
    /// address is below `TASK_SIZE`.
    below_task: u64,
}

impl Shape {
    /// The shape of `line` (with its line end), if it is a plain access line.
    fn of(line: &[u8]) -> Option<Shape> {
        let digits = line.len().checked_sub(5)?;
        let plain = matches!(line[0], b'w' | b'r') && line[line.len() - 2] != b'\r';
        if !plain || !(1..=16).contains(&digits) {
            return None;
        }
        // The digits are the top 4 * digits bits of the value: the address
        // is below 2^47 if the value is below 2^(47 + 64 - 4 * digits).
        let below_task = 1u64.checked_shl((111 - 4 * digits) as u32).map_or(u64::MAX, |b| b - 1);
        Some(Shape { digits, need: (1u32 << digits) - 1, below_task })
    }
}

/// The lines of the shape `s` at the start of `b`, parsed as
/// [`fast_access`] would into the slots of `out` in order, the first
/// numbered `lineno`: how many, up to the first line that is not of that
/// shape (which [`fast_access`] then decides), `out`'s length, or the
/// last line whose bytes lie whole in `b`. The lines' lengths are known
/// before their bytes are looked at, so one bounds check covers the run,
/// and the next line's parse need not wait for this one's: the checks
/// only decide a branch, which holds line after line. Reads 20 bytes of
/// each line (21 for 16 digits).
#[inline(never)]
fn same_shape_run(b: &[u8], s: Shape, lineno: u64, out: &mut [MaybeUninit<Op>]) -> usize {
    let len = s.digits + 5;
    // Bytes read from a line's start: the head and 16 bytes of digits,
    // and the line end (byte 4 + digits, below `len`).
    let reach = len.max(20);
    let fit = match b.len().checked_sub(reach) {
        Some(spare) => spare / len + 1,
        None => 0,
    };
    let n = fit.min(out.len());
    debug_assert!(n == 0 || (n - 1) * len + reach <= b.len(), "a run of {n} lines of {len} bytes in {}", b.len());
    let shift = 4 * (16 - s.digits) as u32;
    const W: u32 = u32::from_le_bytes(*b"w 0x");
    const R: u32 = u32::from_le_bytes(*b"r 0x");
    // Line `line - first` of the run starts at `p`.
    let (mut p, first) = (b.as_ptr(), lineno as u32);
    let mut line = first;
    for slot in &mut out[..n] {
        // SAFETY: `p` is `b`'s start plus j * len for line j < n <= fit,
        // and j * len + reach <= (fit - 1) * len + reach <= b.len(): the
        // line's first `reach` bytes lie in `b`, and this reads no other
        // (bytes 0-3, 4-19, and len - 1, which is below reach).
        let (head, digits, end) = unsafe {
            // The line end is the byte before the next line.
            (p.cast::<u32>().read_unaligned(), &*p.add(4).cast::<[u8; 16]>(), *p.add(len - 1))
        };
        let (not_hex, value) = hex16(digits);
        let write = head == W;
        if !write {
            // Tested second, out of the way: a first touch of a sequence
            // is all `w` (an `r` line costs one instruction more).
            unlikely();
            if head != R {
                return line.wrapping_sub(first) as usize;
            }
        }
        if not_hex & s.need != 0 || end != b'\n' || value > s.below_task {
            return line.wrapping_sub(first) as usize;
        }
        // The first `digits` nibbles are digits, the rest shifted out.
        let addr = value >> shift;
        let kind = if write { OpKind::Write { addr } } else { OpKind::Read { addr } };
        slot.write(Op { thread: 0, line, kind });
        p = p.wrapping_add(len);
        line = line.wrapping_add(1);
    }
    n
}

/// Marks the branch that calls it as the rare one, for the code's layout.
#[cold]
fn unlikely() {}

/// The most slots [`TraceReader::read_batch`] reserves at a time.
const RUN: usize = 4096;

/// What the next line at the start of a buffer is.
enum Step {
    /// An operation, and the bytes it took.
    Op(Op, usize),
    /// A blank or comment line of so many bytes.
    Blank(usize),
    /// The line is not complete in the buffer.
    More,
    Err(Error),
}

/// Parses the line at the start of `b` (not empty), the `lineno`-th of the
/// trace. `eof`: nothing follows `b`, so a last line without a newline is
/// complete. `searched`: the first bytes of `b` known to hold no newline
/// (so that a long line arriving in small reads is not scanned again and
/// again).
#[inline(always)]
fn step(b: &[u8], eof: bool, lineno: u64, searched: usize) -> Step {
    if let Some((op, n)) = fast_access(b, lineno) {
        return Step::Op(op, n);
    }
    let (line, n) = match memchr::memchr(b'\n', &b[searched..]) {
        Some(i) => (&b[..searched + i], searched + i + 1),
        None if eof => (b, b.len()),
        None => return Step::More,
    };
    // As `str::lines` gives it.
    let line = if n > line.len() { line.strip_suffix(b"\r").unwrap_or(line) } else { line };
    let Ok(text) = std::str::from_utf8(line) else {
        return Step::Err(Error::Parse(format!("line {lineno}: not UTF-8 text")));
    };
    match parse_line(text, lineno as usize) {
        Ok(Some(op)) => Step::Op(op, n),
        Ok(None) => Step::Blank(n),
        Err(e) => Step::Err(e),
    }
}

/// The operations of a trace in memory, in order: what [`crate::parse`]
/// and [`crate::parse_prefix`] collect. Stops after the first error.
pub struct SliceOps<'a> {
    rest: &'a [u8],
    lineno: u64,
    failed: bool,
}

impl<'a> SliceOps<'a> {
    pub fn new(text: &'a [u8]) -> Self {
        SliceOps { rest: text, lineno: 0, failed: false }
    }
}

impl Iterator for SliceOps<'_> {
    type Item = Result<Op>;

    fn next(&mut self) -> Option<Result<Op>> {
        while !self.rest.is_empty() && !self.failed {
            self.lineno += 1;
            match step(self.rest, true, self.lineno, 0) {
                Step::Op(op, n) => {
                    self.rest = &self.rest[n..];
                    return Some(Ok(op));
                }
                Step::Blank(n) => self.rest = &self.rest[n..],
                Step::Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Step::More => unreachable!("a slice is read to its end"),
            }
        }
        None
    }
}

/// A trace read from any [`Read`] (a file, a decompressor, a pipe), one
/// line at a time. It holds one buffer of [`READ_SIZE`] bytes (more only
/// for a single line longer than that), never the trace. Yields each
/// operation with its line number; after the first error (a bad line, or
/// the source failing, reported as a [`Error::Parse`] naming the line it
/// was reading) it yields nothing more.
pub struct TraceReader<R> {
    src: R,
    buf: Vec<u8>,
    /// Where in `buf` reads land: a page boundary, with room below it for
    /// the unread tail of the last read ([`Self::refill`]).
    aligned: usize,
    pos: usize,
    end: usize,
    eof: bool,
    failed: bool,
    /// Bytes from `pos` on known to hold no newline.
    searched: usize,
    /// Lines read so far.
    lineno: u64,
    /// Bytes of the source taken as whole lines so far.
    consumed: u64,
    /// The shape of the last access line [`Self::read_batch`] parsed.
    shape: Option<Shape>,
}

impl<R: Read> TraceReader<R> {
    pub fn new(src: R) -> Self {
        let buf = vec![0; READ_SIZE + 2 * PAGE];
        TraceReader {
            src,
            aligned: aligned_in(&buf),
            buf,
            pos: 0,
            end: 0,
            eof: false,
            failed: false,
            searched: 0,
            lineno: 0,
            consumed: 0,
            shape: None,
        }
    }

    /// Lines read so far (the number of the last line read).
    pub fn lines(&self) -> u64 {
        self.lineno
    }

    /// Bytes of the source read as lines so far.
    pub fn bytes(&self) -> u64 {
        self.consumed
    }

    /// Bytes the reader holds for its source: its buffer.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.len()
    }

    /// Keeps the unread tail, then reads more behind it (once: a short read
    /// is fine). The tail goes just below the page boundary `aligned` and
    /// the read lands on it: the kernel copies a file's pages to a page
    /// aligned buffer several times faster than to one that is not (here
    /// 4x: 0.03 s against 0.11 s CPU for 170 MB). A tail too long for the
    /// room below is moved to the start instead; a line longer than the
    /// whole buffer doubles it.
    fn refill(&mut self) -> Result<()> {
        let tail = self.end - self.pos;
        let to = self.aligned.saturating_sub(tail);
        if self.pos != to {
            self.buf.copy_within(self.pos..self.end, to);
            self.pos = to;
            self.end = to + tail;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
            self.aligned = aligned_in(&self.buf);
        }
        // READ_SIZE at a time, more only for a long line.
        let upto = self.buf.len().min((self.end + READ_SIZE).max(self.aligned + READ_SIZE));
        loop {
            match self.src.read(&mut self.buf[self.end..upto]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Parse(format!("line {}: cannot read the trace: {e}", self.lineno + 1)));
                }
            }
        }
    }

    /// The next operation, `Ok(None)` at the end of the trace.
    #[inline]
    pub fn next_op(&mut self) -> Result<Option<Op>> {
        loop {
            if self.failed {
                return Ok(None);
            }
            let b = &self.buf[self.pos..self.end];
            if b.is_empty() {
                if self.eof {
                    return Ok(None);
                }
                if let Err(e) = self.refill() {
                    self.failed = true;
                    return Err(e);
                }
                continue;
            }
            match step(b, self.eof, self.lineno + 1, self.searched) {
                Step::Op(op, n) => {
                    self.advance(n);
                    return Ok(Some(op));
                }
                Step::Blank(n) => self.advance(n),
                Step::More => {
                    self.searched = b.len();
                    if let Err(e) = self.refill() {
                        self.failed = true;
                        return Err(e);
                    }
                }
                Step::Err(e) => {
                    self.lineno += 1;
                    self.failed = true;
                    return Err(e);
                }
            }
        }
    }

    #[inline(always)]
    fn advance(&mut self, n: usize) {
        self.pos += n;
        self.searched = 0;
        self.lineno += 1;
        self.consumed += n as u64;
    }

    /// Appends up to `max` operations to `out`; returns the error that
    /// stopped it, if one did. Fewer than `max` and no error: the end.
    pub fn read_batch(&mut self, out: &mut Vec<Op>, max: usize) -> Option<Error> {
        let want = out.len() + max;
        while out.len() < want {
            // The access lines in the buffer, straight from its bytes;
            // anything else (and the buffer's last bytes) by `next_op`.
            if !self.failed {
                let b = &self.buf[self.pos..self.end];
                let (mut at, mut lineno, mut shape) = (0, self.lineno, self.shape);
                while out.len() < want {
                    if let Some(s) = shape {
                        // Room for the rest of the batch, RUN lines at a
                        // time (`max` may be far more than a trace has).
                        let left = (want - out.len()).min(RUN);
                        out.reserve(left);
                        let slots = &mut out.spare_capacity_mut()[..left];
                        let n = same_shape_run(&b[at..], s, lineno + 1, slots);
                        // SAFETY: `same_shape_run` wrote the first n of
                        // the spare slots, which follow `out`'s elements.
                        unsafe { out.set_len(out.len() + n) };
                        at += n * (s.digits + 5);
                        lineno += n as u64;
                        if n == left {
                            continue;
                        }
                    }
                    let line = &b[at..];
                    let Some((op, n)) = fast_access(line, lineno + 1) else { break };
                    shape = Shape::of(&line[..n]);
                    out.push(op);
                    at += n;
                    lineno += 1;
                }
                self.shape = shape;
                if at > 0 {
                    self.pos += at;
                    self.consumed += at as u64;
                    self.lineno = lineno;
                    self.searched = 0;
                }
                if out.len() == want {
                    break;
                }
            }
            match self.next_op() {
                Ok(Some(op)) => out.push(op),
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
        None
    }
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<Op>;

    fn next(&mut self) -> Option<Result<Op>> {
        self.next_op().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_prefix;

    /// The text parser as it was before this module: `str::lines` and
    /// [`parse_line`] for every line. The reference the streaming parser
    /// must agree with.
    fn by_lines(text: &str) -> (Vec<Op>, Option<Error>) {
        let mut ops = Vec::new();
        for (i, l) in text.lines().enumerate() {
            match parse_line(l, i + 1) {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => {}
                Err(e) => return (ops, Some(e)),
            }
        }
        (ops, None)
    }

    /// A source that hands out its bytes `chunk` at a time (a pipe, a
    /// decompressor), so lines straddle every refill.
    struct Dribble<'a> {
        rest: &'a [u8],
        chunk: usize,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.chunk.min(out.len()).min(self.rest.len());
            out[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            Ok(n)
        }
    }

    fn streamed(text: &[u8], chunk: usize) -> (Vec<Op>, Option<Error>) {
        let mut ops = Vec::new();
        for op in TraceReader::new(Dribble { rest: text, chunk }) {
            match op {
                Ok(op) => ops.push(op),
                Err(e) => return (ops, Some(e)),
            }
        }
        (ops, None)
    }

    /// [`TraceReader::read_batch`], `max` operations at a time.
    fn batched(text: &[u8], chunk: usize, max: usize) -> (Vec<Op>, Option<Error>) {
        let mut r = TraceReader::new(Dribble { rest: text, chunk });
        let mut ops = Vec::new();
        loop {
            let before = ops.len();
            if let Some(e) = r.read_batch(&mut ops, max) {
                return (ops, Some(e));
            }
            assert!(ops.len() - before <= max);
            if ops.len() - before < max {
                return (ops, None);
            }
        }
    }

    /// Every way in: `parse_prefix` (slices), and the reader with reads of
    /// 1, 3, 7 bytes and whole buffers, an operation or a batch at a time,
    /// must give what `by_lines` gives.
    fn assert_same(text: &str) {
        let want = by_lines(text);
        assert_eq!(parse_prefix(text), want, "parse_prefix of {text:?}");
        for chunk in [1, 3, 7, 1 << 20] {
            assert_eq!(streamed(text.as_bytes(), chunk), want, "reads of {chunk} bytes of {text:?}");
            for max in [1, 2, 1000] {
                assert_eq!(batched(text.as_bytes(), chunk, max), want, "batches of {max}, reads of {chunk} bytes");
            }
        }
    }

    fn kernel_cases() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/kernel_cases");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).expect("tests/kernel_cases") {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "trace") {
                out.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
            }
        }
        assert!(out.len() >= 50, "found only {} traces in {}", out.len(), dir.display());
        out
    }

    #[test]
    fn streamed_kernel_cases_give_the_text_parsers_ops() {
        for (name, text) in kernel_cases() {
            let (ops, err) = by_lines(&text);
            assert!(err.is_none(), "{name}: {err:?}");
            assert!(!ops.is_empty(), "{name}");
            assert_same(&text);
            // Also with Windows line ends and no newline at the end.
            assert_same(&text.replace('\n', "\r\n"));
            assert_same(text.trim_end());
        }
    }

    #[test]
    fn bad_lines_fail_with_the_text_parsers_message() {
        let lines = [
            "w 0x1000 extra",
            "w 0x",
            "w 0x+10",
            "w 0x8000000000000",
            "w 0x00000000000000001",
            "w 0x11111111111111111",
            "w 0xffffffffffffffff",
            "w 0x7fffffffffff",
            "w 0x10000000000000000",
            "w 0x1g",
            "w 4096",
            "w 18446744073709551616",
            "r\t0x1000",
            "  w 0x1000",
            "w  0x1000",
            "w 0X1000",
            "@ w 0x1000",
            "@1048575 w 0x1000",
            "@1048576 w 0x1000",
            "@00000001 w 0x1000",
            "@0x3 r 0x1000",
            "@3w 0x1000",
            "@3",
            "@-1 w 0x1000",
            "x 0x1000",
            "W 0x1000",
            "w\u{a0}0x1000",
            "w 0x1000\u{2003}",
            "w 0x1000\r",
            "w 0x10\rz",
            "w \"0x1\\",
            "w 0x1000 # comment",
            "# w 0x1000",
            "mmap 0x1000 0x10zz",
            "mmap 0x1005 0x1000",
            "frobnicate 1",
            "madvise 0x1000 0x1000 sideways",
            "mremap 0x1000 0x1000 0x5000",
            "brk 0x800000000000",
        ];
        for l in lines {
            let tail = "w 0x7f0000001000\nw 0x7f0000002000\nw 0x7f0000003000\n";
            for text in [format!("mmap 0x1000 0x1000\n{l}\n{tail}"), l.to_string(), format!("\n\n{l}\n")] {
                assert_same(&text);
            }
        }
    }

    /// A small generator of lines near the fast path's edges, mutated at
    /// random (seeded): every one must parse, or fail, as the text parser
    /// says.
    #[test]
    fn mutated_lines_agree_with_the_text_parser() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        let alphabet = b"wr@ 0xX19afAF\t\r#mgz-+\n";
        for _ in 0..20_000 {
            let mut line: Vec<u8> = match rnd(4) {
                0 => format!("w {:#x}", rnd(1 << 48)).into_bytes(),
                1 => format!("@{} r {:#x}", rnd(1 << 21), rnd(1 << 47)).into_bytes(),
                2 => format!("w {:#018x}", rnd(1 << 47)).into_bytes(),
                _ => format!("r {}", rnd(1 << 47)).into_bytes(),
            };
            for _ in 0..rnd(3) {
                let at = rnd(line.len() as u64 + 1) as usize;
                match rnd(3) {
                    0 => line.insert(at, alphabet[rnd(alphabet.len() as u64) as usize]),
                    1 if at < line.len() => {
                        line.remove(at);
                    }
                    _ if at < line.len() => line[at] = alphabet[rnd(alphabet.len() as u64) as usize],
                    _ => {}
                }
            }
            let text = String::from_utf8(line).unwrap();
            // Lines after it, so that the fast path (which wants 40 bytes
            // ahead) sees it; and before it, one of the shape most of
            // these had before the mutation, so that the batch reader
            // tries it as a line of that shape first.
            let tail = "w 0x2000\nw 0x7f0000001000\nw 0x7f0000002000\n";
            assert_same(&format!("{text}\n{tail}"));
            assert_same(&format!("w 0x7f0000000000\n{text}\n{tail}"));
        }
    }

    /// Every digit count, after a line of every digit count, and each
    /// with one byte changed to every value (the line end, the prefix, a
    /// digit): the batch reader's guess of the line's shape must never
    /// take a line the text parser reads otherwise.
    #[test]
    fn lines_of_the_last_lines_shape_parse_as_the_text_parser_says() {
        let digits = "7f0123456789abcdefABCDEF";
        for before in 1..=17 {
            for k in 1..=17usize {
                let line = format!("w 0x{}", &digits[..k]);
                let text = format!(
                    "r 0x{}\n{line}\nw 0x1000\n{line}\nw 0x7f0000001000\nw 0x7f0000002000\n",
                    &digits[..before]
                );
                assert_same(&text);
            }
        }
        let line = b"w 0x7f0000001000\n";
        for at in 0..line.len() {
            for c in (0..=255u8).step_by(3).chain([b'\n', b'\r', b'0', b'f', b'F', b'g', b'@', b'x']) {
                let mut l = line.to_vec();
                l[at] = c;
                let mut text = b"w 0x7f0000000000\n".to_vec();
                text.extend_from_slice(&l);
                text.extend_from_slice(b"w 0x7f0000002000\nw 0x7f0000003000\nw 0x7f0000004000\n");
                if let Ok(t) = std::str::from_utf8(&text) {
                    assert_same(t);
                }
            }
        }
    }

    /// `hex16` (SSE2 on x86-64) against its plain version and
    /// `char::to_digit`: every byte value in every position, and words
    /// from a seeded generator.
    #[test]
    fn hex16_reads_sixteen_bytes_as_the_plain_code_does() {
        let check = |b: [u8; 16]| {
            let (not_hex, value) = hex16(&b);
            assert_eq!((not_hex, value), hex16_swar(&b), "{b:?}");
            let n = (not_hex | 1 << 16).trailing_zeros() as usize;
            for (k, c) in b.iter().enumerate() {
                assert_eq!(not_hex >> k & 1 == 0, c.is_ascii_hexdigit(), "{b:?} byte {k}");
            }
            if n > 0 {
                let want = b[..n].iter().fold(0u64, |v, c| v << 4 | (*c as char).to_digit(16).unwrap() as u64);
                assert_eq!(value >> (4 * (16 - n)), want, "{b:?}");
            }
        };
        for pos in 0..16 {
            for c in 0..=255u8 {
                let mut b = *b"0123456789abcdef";
                b[pos] = c;
                check(b);
            }
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"0123456789abcdefABCDEF\n\r wx@g\x80\xff/:`G";
        for _ in 0..100_000 {
            let mut b = [0u8; 16];
            for c in &mut b {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *c = alphabet[(s % alphabet.len() as u64) as usize];
            }
            check(b);
        }
    }

    #[test]
    fn a_bad_line_in_a_run_of_one_shape_fails_on_its_own_number() {
        let line = |k: usize| {
            let rw = if k.is_multiple_of(3) { 'r' } else { 'w' };
            // 12 digits mostly, a stretch of 9 and one of 16 (the longest).
            match k {
                2000..=2300 => format!("{rw} 0x{:09x}", 0x1000 * k),
                4000..=4100 => format!("{rw} 0x{:016x}", 0x1000 * k),
                _ => format!("{rw} 0x{:x}", 0x7f00_0000_0000 + 0x1000 * k),
            }
        };
        let n = 2 * RUN + 100;
        let lines: Vec<String> = (1..=n).map(line).collect();
        let text = lines.join("\n") + "\n";
        let (ops, err) = by_lines(&text);
        assert_eq!((ops.len(), err), (n, None));
        assert_eq!(batched(text.as_bytes(), 1 << 20, 3 * RUN), (ops.clone(), None));
        assert_eq!(batched(text.as_bytes(), 4093, 256), (ops, None));
        // Deep in a run of 12 digits, at the first and last line of a
        // batch of 256, in the runs of 9 and 16 digits.
        for at in [700, 256, 257, 512, 2150, 4050, RUN + 1] {
            let good = &lines[at - 1];
            let mut bad = vec![
                good.replacen("0x", "0X", 1),
                good.replacen(' ', "  ", 1),
                format!("{good}\r"),
                format!("{good}g"),
                format!("x{}", &good[1..]),
                format!("{}z{}", &good[..6], &good[7..]),
                // Past the end of user space, with the line's digit count.
                format!("w 0x{:0w$x}", TASK_SIZE, w = good.len() - 4),
            ];
            // And lines that parse, which a run must take as the text
            // parser does: capitals, the last user address.
            bad.push(good.to_uppercase().replacen("0X", "0x", 1).replacen('W', "w", 1).replacen('R', "r", 1));
            bad.push(format!("r 0x{:0w$x}", TASK_SIZE - 1, w = good.len() - 4));
            for b in bad {
                let mut l = lines.clone();
                l[at - 1] = b.clone();
                let text = l.join("\n") + "\n";
                let want = by_lines(&text);
                match &want.1 {
                    Some(Error::Parse(m) | Error::InvalidRange(m)) => {
                        assert!(m.starts_with(&format!("line {at}:")), "{b:?}: {m}");
                        assert_eq!(want.0.len(), at - 1, "{b:?}");
                    }
                    None => assert_eq!(want.0.len(), n, "{b:?}"),
                }
                for (chunk, max) in [(1 << 20, 256), (1 << 20, 3 * RUN), (4093, 256), (7, 1000)] {
                    assert_eq!(batched(text.as_bytes(), chunk, max), want, "{b:?} at line {at}, reads of {chunk}");
                }
                assert_eq!(parse_prefix(&text), want, "{b:?} at line {at}");
            }
        }
    }

    /// In a run of lines of each digit count 1-16, the highest address of
    /// user space and the lowest above it, of that digit count: the run's
    /// check on the digits' value must cut where the text parser does.
    #[test]
    fn a_run_cuts_at_the_end_of_user_space_for_every_digit_count() {
        for d in 1..=16usize {
            let run = |from: u64| {
                (from..from + 40).map(|k| format!("w 0x{:0d$x}\n", k % (1u64 << (4 * d.min(11))))).collect::<String>()
            };
            let mut edges = vec![format!("r 0x{:0d$x}\n", (1u64 << (4 * d.min(12))) - 1)];
            if d >= 12 {
                edges.push(format!("r 0x{:0d$x}\n", TASK_SIZE - 1));
                edges.push(format!("w 0x{:0d$x}\n", TASK_SIZE));
                edges.push(format!("w 0x{:0d$x}\n", TASK_SIZE + 0x1000));
            }
            for e in edges {
                let text = format!("{}{e}{}", run(1), run(100));
                assert_same(&text);
                if d >= 12 && e.starts_with('w') {
                    let (ops, err) = by_lines(&text);
                    assert_eq!(ops.len(), 40, "{e:?}");
                    assert!(matches!(err, Some(Error::Parse(m)) if m.starts_with("line 41:")), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn a_line_longer_than_the_buffer_parses_whole() {
        let long = format!("w 0x1000 #{}\nr 0x2000\n", "x".repeat(3 * READ_SIZE));
        assert_same(&long);
        let bad = format!("w 0x1000 {}\n", "y".repeat(3 * READ_SIZE));
        assert_same(&bad);
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_its_line() {
        let (ops, err) = streamed(b"w 0x1000\nw 0x2000 # \xff\xfe\nw 0x3000\n", 5);
        assert_eq!(ops.len(), 1);
        assert_eq!(err, Some(Error::Parse("line 2: not UTF-8 text".into())));
    }

    #[test]
    fn a_failing_source_is_an_error_naming_the_line_being_read() {
        struct Fails(usize);
        impl Read for Fails {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("corrupt stream"));
                }
                self.0 -= 1;
                let l = b"w 0x1000\n";
                out[..l.len()].copy_from_slice(l);
                Ok(l.len())
            }
        }
        let mut r = TraceReader::new(Fails(3));
        let ops: Vec<_> = r.by_ref().take_while(|o| o.is_ok()).collect();
        assert_eq!(ops.len(), 3);
        let mut r = TraceReader::new(Fails(3));
        let last = r.by_ref().last().unwrap();
        assert_eq!(last, Err(Error::Parse("line 4: cannot read the trace: corrupt stream".into())));
        assert!(r.next().is_none(), "nothing after an error");
    }

    /// Produces `lines` sequential first-touch lines on the fly and counts
    /// what it handed out; nothing holds them.
    pub(crate) struct Generator {
        pub next: u64,
        pub lines: u64,
        pub handed_out: std::rc::Rc<std::cell::Cell<u64>>,
        pending: Vec<u8>,
    }

    impl Generator {
        pub fn new(lines: u64) -> Self {
            Generator { next: 0, lines, handed_out: Default::default(), pending: Vec::new() }
        }
    }

    /// Bytes of line `k` (0-based) of the generator: `w 0x7f00xxxxx000\n`.
    const GEN_LINE: u64 = 17;

    impl Read for Generator {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            use std::io::Write;
            while self.pending.len() < out.len() && self.next < self.lines {
                let addr = 0x7f00_0000_0000u64 + self.next * 4096;
                writeln!(self.pending, "w {addr:#x}").unwrap();
                self.next += 1;
            }
            let n = out.len().min(self.pending.len());
            out[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            self.handed_out.set(self.handed_out.get() + n as u64);
            Ok(n)
        }
    }

    /// By construction, not by timing: while 10^7 lines go through, the
    /// reader never takes more from its source than the lines it has
    /// returned plus one buffer, and its buffer never grows.
    #[test]
    fn the_reader_holds_one_buffer_never_the_trace() {
        let n = 10_000_000u64;
        let g = Generator::new(n);
        let out = g.handed_out.clone();
        let mut r = TraceReader::new(g);
        let cap = r.buffer_capacity();
        assert_eq!(cap, READ_SIZE + 2 * PAGE);
        let mut k = 0u64;
        while let Some(op) = r.next_op().unwrap() {
            assert_eq!(op.kind, OpKind::Write { addr: 0x7f00_0000_0000 + k * 4096 });
            k += 1;
            assert_eq!(op.line as u64, k);
            // A read and the part of a line before it.
            assert!(out.get() <= (k + 1) * GEN_LINE + READ_SIZE as u64, "line {k}: {} bytes taken", out.get());
        }
        assert_eq!(k, n);
        assert_eq!(out.get(), n * GEN_LINE);
        assert_eq!(r.buffer_capacity(), cap, "the buffer grew");
        assert_eq!(r.bytes(), n * GEN_LINE);
    }
}
