//! The anonfolio trace format: one memory operation a line (the format is
//! documented in the repository's `docs/trace-format.md`).
//!
//! ```text
//! mmap     ADDR LEN [hugepage|nohugepage] [uffd-wp] [prot=rw|r|none] [populate] [growsdown] [noreserve] [stack]
//! munmap   ADDR LEN
//! brk      ADDR
//! mprotect ADDR LEN rw|r|none
//! mremap   OLD_ADDR OLD_LEN NEW_ADDR NEW_LEN
//! madvise  ADDR LEN dontneed|free|hugepage|nohugepage|populate_read|populate_write|dontfork|dofork
//! w ADDR | r ADDR
//! @T <any of the above>
//! ```
//!
//! ```text
//! mmap    ADDR LEN [hugepage|nohugepage] [uffd-wp]
//! munmap  ADDR LEN
//! madvise ADDR LEN dontneed|hugepage|nohugepage
//! w ADDR | r ADDR
//! @T <any of the above>
//! ```

use std::fmt;

pub mod file;
pub mod stream;
pub use file::{open, Compression};
pub use stream::{SliceOps, TraceReader};

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

/// The advice of `madvise` lines (`MADV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    DontNeed,
    /// `MADV_FREE`: lazily freed.
    Free,
    HugePage,
    NoHugePage,
    /// `MADV_POPULATE_READ`: read-fault the range in (through GUP).
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: write-fault the range in (through GUP).
    PopulateWrite,
    /// `MADV_DONTFORK`: `VM_DONTCOPY`.
    DontFork,
    /// `MADV_DOFORK`: clears `VM_DONTCOPY`.
    DoFork,
}

impl Advice {
    pub const ALL: [Advice; 8] = [
        Advice::DontNeed,
        Advice::Free,
        Advice::HugePage,
        Advice::NoHugePage,
        Advice::PopulateRead,
        Advice::PopulateWrite,
        Advice::DontFork,
        Advice::DoFork,
    ];

    pub fn parse(s: &str) -> Option<Advice> {
        Advice::ALL.into_iter().find(|a| a.name() == s)
    }
    pub fn name(self) -> &'static str {
        match self {
            Advice::DontNeed => "dontneed",
            Advice::Free => "free",
            Advice::HugePage => "hugepage",
            Advice::NoHugePage => "nohugepage",
            Advice::PopulateRead => "populate_read",
            Advice::PopulateWrite => "populate_write",
            Advice::DontFork => "dontfork",
            Advice::DoFork => "dofork",
        }
    }
}

/// A protection as `mmap`'s `prot=` and `mprotect` give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prot {
    /// `PROT_READ|PROT_WRITE`.
    #[default]
    ReadWrite,
    /// `PROT_READ`.
    Read,
    /// `PROT_NONE`.
    None,
}

impl Prot {
    pub fn parse(s: &str) -> Option<Prot> {
        match s {
            "rw" => Some(Prot::ReadWrite),
            "r" => Some(Prot::Read),
            "none" => Some(Prot::None),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Prot::ReadWrite => "rw",
            Prot::Read => "r",
            Prot::None => "none",
        }
    }
    /// `VM_READ`.
    pub fn readable(self) -> bool {
        self != Prot::None
    }
    /// `VM_WRITE`.
    pub fn writable(self) -> bool {
        self == Prot::ReadWrite
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
    /// `prot=`: the mapping's protection (default read/write).
    pub prot: Prot,
    /// `MAP_POPULATE`: fault the whole mapping in at mmap.
    pub populate: bool,
    /// `MAP_GROWSDOWN`: a stack that grows down on an access below it.
    pub growsdown: bool,
    /// `MAP_NORESERVE`: no `VM_ACCOUNT`.
    pub noreserve: bool,
    /// `MAP_STACK`.
    pub stack: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Mmap {
        addr: u64,
        len: u64,
        flags: MmapFlags,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    Madvise {
        addr: u64,
        len: u64,
        advice: Advice,
    },
    Mprotect {
        addr: u64,
        len: u64,
        prot: Prot,
    },
    /// What the kernel's mremap did: the mapping at `old_addr` of
    /// `old_len` bytes now lies at `new_addr` with `new_len` bytes (a
    /// resize in place when the addresses are equal, else a move).
    Mremap {
        old_addr: u64,
        old_len: u64,
        new_addr: u64,
        new_len: u64,
    },
    /// The program break moves to `addr` (the first one sets `start_brk`).
    Brk {
        addr: u64,
    },
    Write {
        addr: u64,
    },
    Read {
        addr: u64,
    },
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
                    "populate" => flags.populate = true,
                    "growsdown" => flags.growsdown = true,
                    "noreserve" => flags.noreserve = true,
                    "stack" => flags.stack = true,
                    _ => match t.strip_prefix("prot=").map(Prot::parse) {
                        Some(Some(p)) => flags.prot = p,
                        Some(None) => {
                            return Err(Error::Parse(format!(
                                "line {lineno}: unknown protection {t:?} (want prot=rw, prot=r or prot=none)"
                            )))
                        }
                        None => return Err(Error::Parse(format!("line {lineno}: unknown mmap flag {t:?}"))),
                    },
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
                let names: Vec<&str> = Advice::ALL.iter().map(|a| a.name()).collect();
                Error::Parse(format!("line {lineno}: unknown advice {a:?} (want one of {})", names.join(", ")))
            })?;
            OpKind::Madvise { addr, len, advice }
        }
        "mprotect" => {
            let addr = num(toks.next(), "address", lineno)?;
            let len = num(toks.next(), "length", lineno)?;
            check_range(addr, len, lineno)?;
            let p = toks.next().ok_or_else(|| Error::Parse(format!("line {lineno}: missing protection")))?;
            let prot = Prot::parse(p)
                .ok_or_else(|| Error::Parse(format!("line {lineno}: unknown protection {p:?} (want rw, r or none)")))?;
            OpKind::Mprotect { addr, len, prot }
        }
        "mremap" => {
            let old_addr = num(toks.next(), "old address", lineno)?;
            let old_len = num(toks.next(), "old length", lineno)?;
            let new_addr = num(toks.next(), "new address", lineno)?;
            let new_len = num(toks.next(), "new length", lineno)?;
            check_range(old_addr, old_len, lineno)?;
            check_range(new_addr, new_len, lineno)?;
            if new_addr != old_addr && new_addr < old_addr + old_len && old_addr < new_addr + new_len {
                return Err(Error::InvalidRange(format!(
                    "line {lineno}: mremap moves {old_addr:#x}+{old_len:#x} onto itself at {new_addr:#x}+{new_len:#x}"
                )));
            }
            OpKind::Mremap { old_addr, old_len, new_addr, new_len }
        }
        "brk" => {
            let addr = num(toks.next(), "address", lineno)?;
            if addr >= TASK_SIZE {
                return Err(Error::InvalidRange(format!("line {lineno}: break {addr:#x} is outside user space")));
            }
            OpKind::Brk { addr }
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
    SliceOps::new(text.as_bytes()).collect()
}

/// Like [`parse`], but keeps the operations before the first bad line so a
/// caller can run them and still report the error.
pub fn parse_prefix(text: &str) -> (Vec<Op>, Option<Error>) {
    let mut ops = Vec::new();
    for op in SliceOps::new(text.as_bytes()) {
        match op {
            Ok(op) => ops.push(op),
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
    fn parses_the_operations_real_programs_make() {
        let t = "mmap 0x10000 0x4000 prot=none populate growsdown noreserve stack\nmprotect 0x10000 0x1000 r\n\
                 mremap 0x10000 0x4000 0x40000 0x8000\nbrk 0x80001\nmadvise 0x40000 0x1000 populate_write\n";
        let ops = parse(t).unwrap();
        let f = MmapFlags {
            prot: Prot::None,
            populate: true,
            growsdown: true,
            noreserve: true,
            stack: true,
            ..Default::default()
        };
        assert_eq!(ops[0].kind, OpKind::Mmap { addr: 0x10000, len: 0x4000, flags: f });
        assert_eq!(ops[1].kind, OpKind::Mprotect { addr: 0x10000, len: 0x1000, prot: Prot::Read });
        assert_eq!(
            ops[2].kind,
            OpKind::Mremap { old_addr: 0x10000, old_len: 0x4000, new_addr: 0x40000, new_len: 0x8000 }
        );
        assert_eq!(ops[3].kind, OpKind::Brk { addr: 0x80001 });
        assert_eq!(ops[4].kind, OpKind::Madvise { addr: 0x40000, len: 0x1000, advice: Advice::PopulateWrite });
        for a in Advice::ALL {
            assert_eq!(Advice::parse(a.name()), Some(a));
        }
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        for (t, want) in [
            ("mmap 0x1000 0x10zz\n", "line 1: malformed number"),
            ("\nmmap 0x1005 0x1000\n", "line 2: address 0x1005 is not page aligned"),
            ("frobnicate 1\n", "line 1: unknown operation"),
            ("w\n", "line 1: missing address"),
            ("madvise 0x1000 0x1000 sideways\n", "line 1: unknown advice"),
            ("mprotect 0x1000 0x1000 rwx\n", "line 1: unknown protection"),
            ("mmap 0x1000 0x1000 prot=x\n", "line 1: unknown protection"),
            ("mremap 0x1000 0x2000 0x2000 0x2000\n", "line 1: mremap moves"),
            ("mremap 0x1000 0x1000 0x5000\n", "line 1: missing new length"),
            ("w 0x1000 extra\n", "line 1: unexpected"),
        ] {
            let e = parse(t).unwrap_err().to_string();
            assert!(e.starts_with(want), "{t:?}: {e}");
        }
    }
}
