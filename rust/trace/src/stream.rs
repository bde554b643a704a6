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

/// Bytes the reader asks its source for at a time; also the buffer's size
/// unless a single line is longer.
pub const READ_SIZE: usize = 256 << 10;

/// The hex digit of each byte, or 0xff.
static HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Parses `[@T ]w|r 0xHEX` ending in `\n` or `\r\n` at the start of `b`:
/// the operation and the bytes of its line. `None` for any other shape (or
/// a line not complete in `b`), which the general parser then decides, so
/// this only has to agree with it on the lines it accepts: `@T` in 1-7
/// decimal digits below 2^20, one space each, 1-16 hex digits below
/// `TASK_SIZE`.
#[inline(always)]
fn fast_access(b: &[u8], lineno: u64) -> Option<(Op, usize)> {
    let mut i = 0;
    let mut thread = 0u32;
    if *b.first()? == b'@' {
        i = 1;
        while i <= 7 {
            match b.get(i) {
                Some(&c) if c.is_ascii_digit() => {
                    thread = thread * 10 + u32::from(c - b'0');
                    i += 1;
                }
                _ => break,
            }
        }
        if i == 1 || thread >= 1 << 20 || *b.get(i)? != b' ' {
            return None;
        }
        i += 1;
    }
    let write = match *b.get(i)? {
        b'w' => true,
        b'r' => false,
        _ => return None,
    };
    if b.get(i + 1..i + 4)? != b" 0x" {
        return None;
    }
    i += 4;
    let start = i;
    let mut addr = 0u64;
    // Whole 8-byte words of digits first (the common 12-digit address is
    // one word and a half), then byte by byte.
    while i - start < 16 {
        let Some(v) = b.get(i..i + 8).and_then(|w| hex8(w.try_into().ok()?)) else { break };
        addr = (addr << 32) | v;
        i += 8;
    }
    loop {
        let d = HEX[usize::from(*b.get(i)?)];
        if d == 0xff {
            break;
        }
        addr = (addr << 4) | u64::from(d);
        i += 1;
    }
    if i == start || i - start > 16 {
        return None;
    }
    match *b.get(i)? {
        b'\n' => i += 1,
        b'\r' if b.get(i + 1) == Some(&b'\n') => i += 2,
        _ => return None,
    }
    if addr >= TASK_SIZE {
        return None;
    }
    let kind = if write { OpKind::Write { addr } } else { OpKind::Read { addr } };
    Some((Op { thread, line: lineno as u32, kind }, i))
}

/// The value of eight hex digits, or `None` if any byte is not one.
#[inline(always)]
fn hex8(w: [u8; 8]) -> Option<u64> {
    let mut v = 0u64;
    let mut bad = 0u8;
    for c in w {
        let d = HEX[usize::from(c)];
        bad |= d;
        v = (v << 4) | u64::from(d & 0xf);
    }
    // A digit is at most 0xf: any 0xff sets the high bits.
    (bad < 0x10).then_some(v)
}

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
}

impl<R: Read> TraceReader<R> {
    pub fn new(src: R) -> Self {
        TraceReader {
            src,
            buf: vec![0; READ_SIZE],
            pos: 0,
            end: 0,
            eof: false,
            failed: false,
            searched: 0,
            lineno: 0,
            consumed: 0,
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
    /// is fine). A line longer than the whole buffer doubles it.
    fn refill(&mut self) -> Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        loop {
            match self.src.read(&mut self.buf[self.end..]) {
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
        for _ in 0..max {
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

    /// Every way in: `parse_prefix` (slices), and the reader with reads of
    /// 1, 3, 7 bytes and whole buffers, must give what `by_lines` gives.
    fn assert_same(text: &str) {
        let want = by_lines(text);
        assert_eq!(parse_prefix(text), want, "parse_prefix of {text:?}");
        for chunk in [1, 3, 7, 1 << 20] {
            assert_eq!(streamed(text.as_bytes(), chunk), want, "reads of {chunk} bytes of {text:?}");
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
            for text in [format!("mmap 0x1000 0x1000\n{l}\nr 0x1000\n"), format!("{l}"), format!("\n\n{l}\n")] {
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
            assert_same(&format!("{text}\nw 0x2000\n"));
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
        assert_eq!(cap, READ_SIZE);
        let mut k = 0u64;
        while let Some(op) = r.next_op().unwrap() {
            assert_eq!(op.kind, OpKind::Write { addr: 0x7f00_0000_0000 + k * 4096 });
            k += 1;
            assert_eq!(op.line as u64, k);
            assert!(out.get() <= k * GEN_LINE + READ_SIZE as u64, "line {k}: {} bytes taken", out.get());
        }
        assert_eq!(k, n);
        assert_eq!(out.get(), n * GEN_LINE);
        assert_eq!(r.buffer_capacity(), cap, "the buffer grew");
        assert_eq!(r.bytes(), n * GEN_LINE);
    }
}
