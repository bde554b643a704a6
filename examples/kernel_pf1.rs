//! will-it-scale's page_fault1 as threads, on this machine's kernel (used
//! by `benches/time_check.py`).
//!
//! `cargo run --release --example kernel_pf1 -- --threads N [--size 128M]
//!  [--seconds S] [--advise]`
//!
//! Each thread maps SIZE private anonymous bytes (`--advise`: and
//! MADV_HUGEPAGE, so that an mTHP size in `madvise` mode is used; the
//! caller sets the knobs), writes one byte a page, unmaps, and repeats for
//! S seconds (default 2) after a first warm-up loop. Prints the pages per
//! second of all threads together and per thread, and ns per page.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn die(msg: &str) -> ! {
    eprintln!("kernel_pf1: {msg}");
    std::process::exit(2)
}

/// This thread's CPU time (user and system): what the faults cost it,
/// whatever else shares the cores.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn one_loop(size: usize, advise: bool) -> u64 {
    // SAFETY: a fresh private anonymous mapping of `size` bytes; only this
    // function touches it, within its bounds, and unmaps it before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            die("mmap failed");
        }
        if advise {
            libc::madvise(p, size, libc::MADV_HUGEPAGE);
        }
        let b = p as *mut u8;
        let mut off = 0;
        while off < size {
            std::ptr::write_volatile(b.add(off), 1);
            off += 4096;
        }
        libc::munmap(p, size);
    }
    (size / 4096) as u64
}

fn main() {
    let mut threads = 1usize;
    let mut size = 128usize << 20;
    let mut seconds = 2.0f64;
    let mut advise = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("bad --threads")),
            "--size" => {
                let v = args.next().unwrap_or_else(|| die("--size needs a value"));
                size = match v.strip_suffix('M') {
                    Some(m) => m.parse::<usize>().unwrap_or_else(|_| die("bad --size")) << 20,
                    None => v.parse().unwrap_or_else(|_| die("bad --size")),
                };
            }
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("bad --seconds")),
            "--advise" => advise = true,
            _ => die(&format!("unknown argument {a:?}")),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(std::sync::Barrier::new(threads + 1));
    let pages = Arc::new(AtomicU64::new(0));
    let cpu_ns = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, start, pages, cpu_ns) = (stop.clone(), start.clone(), pages.clone(), cpu_ns.clone());
            std::thread::spawn(move || {
                one_loop(size, advise);
                start.wait();
                let c0 = thread_cpu_ns();
                let mut n = 0;
                while !stop.load(Relaxed) {
                    n += one_loop(size, advise);
                }
                cpu_ns.fetch_add(thread_cpu_ns() - c0, Relaxed);
                pages.fetch_add(n, Relaxed);
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let dt = t0.elapsed().as_secs_f64();
    let n = pages.load(Relaxed) as f64;
    println!(
        "threads={threads} size={size} advise={advise} pages={n} seconds={dt:.3} pages_per_s={:.0} per_thread_pages_per_s={:.0} ns_per_page_per_thread={:.1} cpu_ns_per_page={:.1}",
        n / dt,
        n / dt / threads as f64,
        dt * 1e9 * threads as f64 / n,
        cpu_ns.load(Relaxed) as f64 / n
    );
}
