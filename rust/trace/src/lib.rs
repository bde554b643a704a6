//! The anonfolio trace format: one memory operation a line (the format is
//! documented in the repository's `docs/trace-format.md`).
//!
//! ```text
//! mmap    ADDR LEN [hugepage|nohugepage] [uffd-wp]
//! munmap  ADDR LEN
//! madvise ADDR LEN dontneed|hugepage|nohugepage
//! w ADDR | r ADDR
//! @T <any of the above>
//! ```

use std::fmt;

/// Bytes in a base page (x86-64).
pub const PAGE_SIZE: u64 = 4096;

/// A trace line that does not parse, or a range operand the kernel would
/// refuse with EINVAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A line that does not parse.
    Parse(String),
    /// A range that is not page aligned, empty, or outside user space.
    InvalidRange(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Parse(m) | Error::InvalidRange(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    DontNeed,
    HugePage,
    NoHugePage,
}

impl Advice {
    pub fn parse(s: &str) -> Option<Advice> {
        match s {
            "dontneed" => Some(Advice::DontNeed),
            "hugepage" => Some(Advice::HugePage),
            "nohugepage" => Some(Advice::NoHugePage),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Advice::DontNeed => "dontneed",
            Advice::HugePage => "hugepage",
            Advice::NoHugePage => "nohugepage",
        }
    }
}

/// Extra properties of a new mapping, as `mmap` + `madvise` would give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmapFlags {
    pub hugepage: bool,
    pub nohugepage: bool,
    /// Registered with userfaultfd in write-protect mode: the VMA is
    /// `userfaultfd_armed()`, so faults map order 0.
    pub uffd_wp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Mmap { addr: u64, len: u64, flags: MmapFlags },
    Munmap { addr: u64, len: u64 },
    Madvise { addr: u64, len: u64, advice: Advice },
    Write { addr: u64 },
    Read { addr: u64 },
}

/// One parsed trace line: the simulated thread that runs it, and where it
/// came from (1-based line number) so errors can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub thread: u32,
    pub line: u32,
    pub kind: OpKind,
}

/// Highest user address on x86-64 with 4-level tables (47 bits).
pub const TASK_SIZE: u64 = 1 << 47;

pub fn parse_number(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

fn num(tok: Option<&str>, what: &str, lineno: usize) -> Result<u64> {
    let t = tok.ok_or_else(|| Error::Parse(format!("line {lineno}: missing {what}")))?;
    parse_number(t).ok_or_else(|| Error::Parse(format!("line {lineno}: malformed number {t:?} for {what}")))
}

/// Checks a range operand of mmap/munmap/madvise: page aligned, non-empty,
/// inside user space.
pub fn check_range(addr: u64, len: u64, lineno: usize) -> Result<()> {
    let at = if lineno > 0 { format!("line {lineno}: ") } else { String::new() };
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(Error::InvalidRange(format!("{at}address {addr:#x} is not page aligned")));
    }
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(Error::InvalidRange(format!("{at}length {len:#x} is not a positive multiple of the page size")));
    }
    match addr.checked_add(len) {
        Some(end) if end <= TASK_SIZE => Ok(()),
        _ => Err(Error::InvalidRange(format!(
            "{at}range {addr:#x}+{len:#x} is outside user space (below {TASK_SIZE:#x})"
        ))),
    }
}

/// Parses one line; `Ok(None)` for blank and comment lines.
pub fn parse_line(text: &str, lineno: usize) -> Result<Option<Op>> {
    let text = match text.find('#') {
        Some(i) => &text[..i],
        None => text,
    };
    let mut toks = text.split_whitespace().peekable();
    let Some(&first) = toks.peek() else { return Ok(None) };
    let mut thread = 0u32;
    if let Some(t) = first.strip_prefix('@') {
        thread = parse_number(t)
            .filter(|&n| n < 1 << 20)
            .ok_or_else(|| Error::Parse(format!("line {lineno}: malformed thread {first:?}")))? as u32;
        toks.next();
    }
    let op = toks.next().ok_or_else(|| Error::Parse(format!("line {lineno}: missing operation after {first:?}")))?;
    let kind = match op {
        "mmap" => {
            let addr = num(toks.next(), "address", lineno)?;
            let len = num(toks.next(), "length", lineno)?;
            check_range(addr, len, lineno)?;
            let mut flags = MmapFlags::default();
            for t in toks.by_ref() {
                match t {
                    "hugepage" => flags.hugepage = true,
                    "nohugepage" => flags.nohugepage = true,
                    "uffd-wp" => flags.uffd_wp = true,
                    _ => return Err(Error::Parse(format!("line {lineno}: unknown mmap flag {t:?}"))),
                }
            }
            if flags.hugepage && flags.nohugepage {
                return Err(Error::Parse(format!("line {lineno}: mmap cannot be both hugepage and nohugepage")));
            }
            OpKind::Mmap { addr, len, flags }
        }
        "munmap" => {
            let addr = num(toks.next(), "address", lineno)?;
            let len = num(toks.next(), "length", lineno)?;
            check_range(addr, len, lineno)?;
            OpKind::Munmap { addr, len }
        }
        "madvise" => {
            let addr = num(toks.next(), "address", lineno)?;
            let len = num(toks.next(), "length", lineno)?;
            check_range(addr, len, lineno)?;
            let a = toks.next().ok_or_else(|| Error::Parse(format!("line {lineno}: missing advice")))?;
            let advice = Advice::parse(a).ok_or_else(|| {
                Error::Parse(format!("line {lineno}: unknown advice {a:?} (want dontneed, hugepage or nohugepage)"))
            })?;
            OpKind::Madvise { addr, len, advice }
        }
        "w" | "r" => {
            let addr = num(toks.next(), "address", lineno)?;
            if addr >= TASK_SIZE {
                return Err(Error::Parse(format!("line {lineno}: address {addr:#x} is outside user space")));
            }
            if op == "w" {
                OpKind::Write { addr }
            } else {
                OpKind::Read { addr }
            }
        }
        other => return Err(Error::Parse(format!("line {lineno}: unknown operation {other:?}"))),
    };
    if let Some(extra) = toks.next() {
        return Err(Error::Parse(format!("line {lineno}: unexpected {extra:?} after the {op} operands")));
    }
    Ok(Some(Op { thread, line: lineno as u32, kind }))
}

/// Parses a whole trace. Stops at the first bad line.
pub fn parse(text: &str) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if let Some(op) = parse_line(l, i + 1)? {
            ops.push(op);
        }
    }
    Ok(ops)
}

/// Like [`parse`], but keeps the operations before the first bad line so a
/// caller can run them and still report the error.
pub fn parse_prefix(text: &str) -> (Vec<Op>, Option<Error>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let ops = parse("# c\n\nmmap 0x1000 8192 hugepage uffd-wp\n@3 w 0x1fff\nr 4096 # x\nmadvise 0x1000 0x1000 dontneed\nmunmap 0x1000 0x2000\n").unwrap();
        assert_eq!(ops.len(), 5);
        assert_eq!(ops[0].line, 3);
        assert!(matches!(
            ops[0].kind,
            OpKind::Mmap { addr: 0x1000, len: 8192, flags: MmapFlags { hugepage: true, uffd_wp: true, .. } }
        ));
        assert_eq!(ops[1].thread, 3);
        assert!(matches!(ops[1].kind, OpKind::Write { addr: 0x1fff }));
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        for (t, want) in [
            ("mmap 0x1000 0x10zz\n", "line 1: malformed number"),
            ("\nmmap 0x1005 0x1000\n", "line 2: address 0x1005 is not page aligned"),
            ("frobnicate 1\n", "line 1: unknown operation"),
            ("w\n", "line 1: missing address"),
            ("madvise 0x1000 0x1000 sideways\n", "line 1: unknown advice"),
            ("w 0x1000 extra\n", "line 1: unexpected"),
        ] {
            let e = parse(t).unwrap_err().to_string();
            assert!(e.starts_with(want), "{t:?}: {e}");
        }
    }
}
