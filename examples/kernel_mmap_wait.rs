//! What a munmap holds off in this machine's kernel (the check behind the
//! virtual-time model of the mmap lock, see `docs/cost-profile.md`).
//!
//! `cargo run --release --example kernel_mmap_wait [-- --size 1G]`
//!
//! One thread maps SIZE (default 1 GiB) of private anonymous memory, writes
//! a byte a page, then unmaps it. Meanwhile a second thread maps and unmaps
//! one page in a loop, and a third writes fresh pages of a VMA of its own
//! (MADV_NOHUGEPAGE, so it never merges with the first). In 6.18 the munmap
//! holds the mmap lock for write only while it detaches its VMA and then
//! for read while it zaps: the second thread's mmap (a writer) waits for the
//! whole zap, the third thread's faults (per-VMA locks) for none of it.
//! Prints the munmap's duration and the slowest mmap and fault of the other
//! threads, with when they began. No THP knob is touched.
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn die(msg: &str) -> ! {
    eprintln!("kernel_mmap_wait: {msg}");
    std::process::exit(2)
}

/// A private anonymous mapping of `len` bytes.
fn map(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping; the kernel picks the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        die("mmap failed");
    }
    p as *mut u8
}

fn main() {
    let mut size = 1usize << 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                let v = args.next().unwrap_or_else(|| die("--size needs a value"));
                size = match v.strip_suffix('G') {
                    Some(g) => g.parse::<usize>().unwrap_or_else(|_| die("bad --size")) << 30,
                    None => match v.strip_suffix('M') {
                        Some(m) => m.parse::<usize>().unwrap_or_else(|_| die("bad --size")) << 20,
                        None => v.parse().unwrap_or_else(|_| die("bad --size")),
                    },
                };
                if size == 0 || !size.is_multiple_of(4096) {
                    die("--size must be a positive multiple of 4096");
                }
            }
            _ => die(&format!("unknown argument {a:?}")),
        }
    }
    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // (start of the munmap, its end)
    let unmap = Arc::new(Mutex::new((Instant::now(), Instant::now())));
    let zapper = {
        let (ready, stop, unmap) = (ready.clone(), stop.clone(), unmap.clone());
        std::thread::spawn(move || {
            let p = map(size);
            let mut off = 0;
            while off < size {
                // SAFETY: within the mapping of `size` bytes made above.
                unsafe { std::ptr::write_volatile(p.add(off), 1) };
                off += 4096;
            }
            ready.store(true, SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            let t0 = Instant::now();
            // SAFETY: the mapping made above, no longer used.
            unsafe { libc::munmap(p as *mut libc::c_void, size) };
            *unmap.lock().unwrap() = (t0, Instant::now());
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, SeqCst);
        })
    };
    let mapper = {
        let (ready, stop) = (ready.clone(), stop.clone());
        std::thread::spawn(move || {
            while !ready.load(SeqCst) {
                std::hint::spin_loop();
            }
            let mut slowest = (Duration::ZERO, Instant::now());
            while !stop.load(SeqCst) {
                let t = Instant::now();
                let q = map(4096);
                let d = t.elapsed();
                // SAFETY: the one-page mapping just made.
                unsafe { libc::munmap(q as *mut libc::c_void, 4096) };
                if d > slowest.0 {
                    slowest = (d, t);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            slowest
        })
    };
    let faulter = {
        let (ready, stop) = (ready.clone(), stop.clone());
        std::thread::spawn(move || {
            let len = 256usize << 20;
            let p = map(len);
            // SAFETY: advice on the mapping just made; different flags keep
            // it from merging with the zapper's VMA.
            unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
            while !ready.load(SeqCst) {
                std::hint::spin_loop();
            }
            let mut slowest = (Duration::ZERO, Instant::now());
            let mut off = 0;
            while !stop.load(SeqCst) && off < len {
                let t = Instant::now();
                // SAFETY: within the mapping of `len` bytes made above.
                unsafe { std::ptr::write_volatile(p.add(off), 1) };
                let d = t.elapsed();
                if d > slowest.0 {
                    slowest = (d, t);
                }
                off += 4096;
                if (off >> 12) % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
            slowest
        })
    };
    zapper.join().unwrap();
    let (m, f) = (mapper.join().unwrap(), faulter.join().unwrap());
    let (t0, t1) = *unmap.lock().unwrap();
    let at = |t: Instant| {
        t.checked_duration_since(t0).map_or_else(|| -(t0.duration_since(t).as_secs_f64()), |d| d.as_secs_f64())
    };
    println!(
        "munmap_ms={:.1} slowest_mmap_ms={:.2} mmap_began_ms={:.1} slowest_fault_ms={:.3} fault_began_ms={:.1}",
        (t1 - t0).as_secs_f64() * 1e3,
        m.0.as_secs_f64() * 1e3,
        at(m.1) * 1e3,
        f.0.as_secs_f64() * 1e3,
        at(f.1) * 1e3
    );
}
