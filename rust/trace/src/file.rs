//! Opening a trace file: plain text, or compressed with zstd or gzip,
//! which are read directly (decompressed as they stream, never whole).
//! The format is told by the file's first bytes, not its name.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// How a trace file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// Zstandard (frame magic `28 b5 2f fd`, RFC 8878).
    Zstd,
    /// gzip (magic `1f 8b`, RFC 1952); concatenated members are read on.
    Gzip,
}

impl Compression {
    /// The format whose magic `head` starts with.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// Reads up to `buf.len()` bytes, fewer only at the end.
fn read_head(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Wraps `src` in the decompressor its first bytes call for. The bytes
/// looked at are put back in front, so `src` need not seek (a pipe works).
pub fn decompressed<R: Read + Send + 'static>(mut src: R) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    let mut head = [0u8; 4];
    let n = read_head(&mut src, &mut head)?;
    let c = Compression::sniff(&head[..n]);
    let whole = io::Cursor::new(head).take(n as u64).chain(src);
    let r: Box<dyn Read + Send> = match c {
        Compression::None => Box::new(whole),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(whole)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
    };
    Ok((r, c))
}

/// Opens the trace at `path`, decompressing zstd and gzip as it is read.
pub fn open(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    decompressed(File::open(path)?).map(|(r, _)| r)
}
