//! The streamed replay at full size, for `benches/replay_speed.py`:
//!
//! ```text
//! replay_speed gen LINES OUT       # mmap of LINES pages, then one `w` a page in order
//! replay_speed read FILE           # read(2) the file through, 256 KiB at a time, page aligned (no parsing)
//! replay_speed parse FILE          # open (decompressing), parse in batches as the replay does, count: no simulation
//! replay_speed replay FILE [--threads N] [--deterministic SEED]
//! replay_speed in-memory FILE      # as before streaming: the text, then parse_prefix, then replay
//! ```
//!
//! Each prints one `key=value` line: `lines`, `bytes`, `wall_s` (the whole
//! command after start-up: opening, reading the trace, simulating),
//! `elapsed_s` (the simulator's own figure), `first_pass_s` (the
//! in-memory replay's reading and parsing, or the threaded replay's first
//! read; 0 for a serial streamed replay, which reads the trace once), and
//! `hwm_kib` (the process's VmHWM, its peak resident memory).
use anonfolio::{replay, replay_stream, summarize, trace, Config, Mm, RunOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

fn hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user and system) of this process so far: on a shared
/// machine, what it cost on one core, whatever else ran.
fn cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn die(msg: String) -> ! {
    eprintln!("replay_speed: {msg}");
    std::process::exit(2)
}

/// `mmap BASE LINES*4096` and a write to each page in order.
fn gen(lines: u64, out: &Path) {
    let base = 0x7f00_0000_0000u64;
    let f = std::fs::File::create(out).unwrap_or_else(|e| die(format!("{}: {e}", out.display())));
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    writeln!(w, "# sequential first touch: {lines} pages written once each, in order").unwrap();
    writeln!(w, "mmap {base:#x} {:#x}", lines * 4096).unwrap();
    let mut line = *b"w 0x000000000000\n";
    for k in 0..lines {
        let a = base + k * 4096;
        for (i, c) in line[4..16].iter_mut().enumerate() {
            *c = b"0123456789abcdef"[((a >> (44 - 4 * i)) & 0xf) as usize];
        }
        w.write_all(&line).unwrap();
    }
    w.flush().unwrap();
    println!("lines={} bytes={}", lines + 2, std::fs::metadata(out).unwrap().len());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(arg)) = (args.first(), args.get(1)) else {
        die("usage: replay_speed gen|read|parse|replay|in-memory ...".into())
    };
    let mut opts = RunOptions { threads: 1, ..Default::default() };
    let mut i = if cmd == "gen" { 3 } else { 2 };
    while i < args.len() {
        let v = args.get(i + 1).and_then(|v| v.parse().ok());
        match (args[i].as_str(), v) {
            ("--threads", Some(n)) => opts.threads = n as usize,
            ("--deterministic", Some(s)) => opts.deterministic = Some(s),
            _ => die(format!("bad option {}", args[i])),
        }
        i += 2;
    }
    let t0 = Instant::now();
    let path = Path::new(arg);
    let open = || trace::open(path).unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
    match cmd.as_str() {
        "gen" => {
            let lines = arg.parse().unwrap_or_else(|_| die(format!("bad LINES {arg}")));
            let out = args.get(2).unwrap_or_else(|| die("gen LINES OUT".into()));
            gen(lines, Path::new(out));
        }
        "read" => {
            let mut f = std::fs::File::open(path).unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
            // Into a page-aligned buffer, as the parser reads.
            let mut buf = vec![0u8; trace::stream::READ_SIZE + 4096];
            let at = buf.as_ptr().align_offset(4096);
            let buf = &mut buf[at..at + trace::stream::READ_SIZE];
            let mut bytes = 0u64;
            loop {
                match f.read(buf) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(e) => die(format!("{}: {e}", path.display())),
                }
            }
            println!(
                "bytes={bytes} wall_s={:.4} cpu_s={:.4} hwm_kib={}",
                t0.elapsed().as_secs_f64(),
                cpu_s(),
                hwm_kib()
            );
        }
        "parse" => {
            // In batches, as the serial replay reads.
            let mut r = trace::TraceReader::new(open());
            let (mut ops, mut batch) = (0u64, Vec::with_capacity(256));
            loop {
                batch.clear();
                if let Some(e) = r.read_batch(&mut batch, 256) {
                    die(e.to_string());
                }
                ops += batch.len() as u64;
                if batch.len() < 256 {
                    break;
                }
            }
            println!(
                "lines={} ops={ops} bytes={} wall_s={:.4} cpu_s={:.4} hwm_kib={}",
                r.lines(),
                r.bytes(),
                t0.elapsed().as_secs_f64(),
                cpu_s(),
                hwm_kib()
            );
        }
        "replay" | "in-memory" => {
            let mm = Mm::new(Config::default()).unwrap_or_else(|e| die(e.to_string()));
            let t1 = Instant::now();
            let (r, first_s) = if cmd == "replay" {
                // One read serially; a first one for the CPUs' count with threads.
                let threaded = opts.threads > 1 || opts.deterministic.is_some();
                let summary = threaded.then(|| summarize(open()));
                let first_s = t1.elapsed().as_secs_f64();
                (replay_stream(&mm, summary.as_ref(), open(), &opts), first_s)
            } else {
                let mut text = String::new();
                open().read_to_string(&mut text).unwrap_or_else(|e| die(e.to_string()));
                let (ops, parse_error) = trace::parse_prefix(&text);
                let first_s = t1.elapsed().as_secs_f64();
                let mut r = replay(&mm, &ops, &opts);
                r.error = r.error.or(parse_error.map(Into::into));
                (r, first_s)
            };
            let wall = t0.elapsed().as_secs_f64();
            if let Some(e) = &r.error {
                die(e.to_string());
            }
            println!(
                "ops={} faults={} rss_bytes={} wall_s={wall:.4} cpu_s={:.4} first_pass_s={first_s:.4} elapsed_s={:.4} hwm_kib={}",
                r.ops_done,
                r.stats.faults(),
                r.stats.rss_pages * 4096,
                cpu_s(),
                r.elapsed_s,
                hwm_kib()
            );
        }
        _ => die(format!("unknown command {cmd}")),
    }
}
