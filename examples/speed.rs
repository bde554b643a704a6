//! Speed and host-memory measurements (used by `benches/speed.py`).
//!
//! Simulator:
//!   `cargo run --release --example speed -- SIZE [SIZE=MODE ...] [--threads N]
//!    [--sharing disjoint|interleaved] [--workload KIND] [--policy P] [--enabled MODE]
//!    [--reps N]`
//! runs the workload (default: one CPU writing every page of SIZE in order)
//! on a fresh mm `--reps` times (default 1) and prints, for the best run,
//! ns per page and the host bytes per mapped page (VmRSS delta and VmHWM
//! delta of this process, and what the simulator counts itself).
//!
//! Real kernel:
//!   `speed --kernel SIZE [--huge] [--reps N]`
//! maps SIZE with mmap, advises it MADV_NOHUGEPAGE (order-0 faults), or with
//! `--huge` MADV_HUGEPAGE on every 2 MiB piece but its first 64 KiB (so no
//! 2 MiB-aligned range lies in one VM_HUGEPAGE VMA and no PMD THP can be
//! used: with `hugepages-64kB/enabled=madvise` every fault maps a 64 KiB
//! folio), then writes one byte a page in order and unmaps. A first round
//! warms the host's memory; the best of `--reps` timed rounds is printed.
//!
//! Output is one line of `key=value` pairs.
use anonfolio::{config, workload, Config, Enabled, Mm, Policy, RunOptions, Sharing, Workload, WorkloadKind};
use std::time::Instant;

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn die(msg: &str) -> ! {
    eprintln!("speed: {msg}");
    std::process::exit(2)
}

struct Args {
    size: u64,
    modes: Vec<String>,
    threads: usize,
    sharing: Sharing,
    kind: WorkloadKind,
    policy: Policy,
    enabled: Option<Enabled>,
    reps: usize,
    kernel: bool,
    huge: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 64 << 30,
        modes: vec![],
        threads: 1,
        sharing: Sharing::Disjoint,
        kind: WorkloadKind::Sequential,
        policy: Policy::Upstream,
        enabled: None,
        reps: 1,
        kernel: false,
        huge: false,
    };
    let mut it = std::env::args().skip(1);
    let mut size_seen = false;
    while let Some(s) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| die(&format!("{name} needs a value")));
        match s.as_str() {
            "--threads" => a.threads = val("--threads").parse().unwrap_or_else(|_| die("bad --threads")),
            "--sharing" => a.sharing = Sharing::parse(&val("--sharing")).unwrap_or_else(|e| die(&e.to_string())),
            "--workload" => a.kind = WorkloadKind::parse(&val("--workload")).unwrap_or_else(|e| die(&e.to_string())),
            "--policy" => a.policy = Policy::parse(&val("--policy")).unwrap_or_else(|e| die(&e.to_string())),
            "--enabled" => a.enabled = Some(Enabled::parse(&val("--enabled")).unwrap_or_else(|e| die(&e.to_string()))),
            "--reps" => a.reps = val("--reps").parse().unwrap_or_else(|_| die("bad --reps")),
            "--kernel" => a.kernel = true,
            "--huge" => a.huge = true,
            m if m.contains('=') => a.modes.push(m.to_string()),
            sz if !size_seen => {
                a.size = config::parse_bytes(sz).unwrap_or_else(|e| die(&e.to_string()));
                size_seen = true;
            }
            other => die(&format!("unexpected argument {other:?}")),
        }
    }
    a.reps = a.reps.max(1);
    a
}

fn simulate(a: &Args) {
    let mut cfg = Config::default();
    for m in &a.modes {
        cfg.set_size_mode(m).unwrap_or_else(|e| die(&e.to_string()));
    }
    cfg.policy = a.policy;
    if let Some(e) = a.enabled {
        cfg.enabled = e;
    }
    let w = Workload { kind: a.kind, size: a.size, sharing: a.sharing, ..Default::default() };
    let opts = RunOptions { threads: a.threads, ..Default::default() };
    let pages = a.size / 4096;
    let touches = w.touches();
    let mut best: Option<(f64, u64, u64, u64, u64, u64, String)> = None;
    for _ in 0..a.reps {
        let (rss0, hwm0) = (status_kb("VmRSS:"), status_kb("VmHWM:"));
        let mm = Mm::new(cfg.clone()).unwrap_or_else(|e| die(&e.to_string()));
        let cpu0 = cpu_s();
        let r = workload::run_workload(&mm, &w, &opts);
        let cpu = cpu_s() - cpu0;
        if let Some(e) = &r.error {
            die(&format!("run failed: {e}"));
        }
        let (rss1, hwm1) = (status_kb("VmRSS:"), status_kb("VmHWM:"));
        let s = &r.stats;
        let rec = (
            r.elapsed_s,
            s.faults(),
            s.rss_pages,
            (rss1.saturating_sub(rss0)) * 1024,
            (hwm1.saturating_sub(hwm0.max(rss0))) * 1024,
            s.mem.host_bytes,
            format!(
                "cpu_util={:.2} zone_lock={}/{} ptl={}/{} page_table_lock={}/{}",
                cpu / r.elapsed_s.max(1e-9),
                s.zone_lock.contended,
                s.zone_lock.acquisitions,
                s.ptl.contended,
                s.ptl.acquisitions,
                s.page_table_lock.contended,
                s.page_table_lock.acquisitions
            ),
        );
        // Host memory from the first run only: later runs in this process
        // reuse memory the allocator kept.
        if let Some(b) = best.as_mut() {
            if rec.0 < b.0 {
                *b = (rec.0, rec.1, rec.2, b.3, b.4, rec.5, rec.6);
            }
        } else {
            best = Some(rec);
        }
        drop(mm);
    }
    let (el, faults, rss_pages, rss_d, hwm_d, host, locks) = best.unwrap();
    let mapped = rss_pages.max(1) as f64;
    println!(
        "mode=sim pages={pages} touches={touches} faults={faults} mapped_pages={rss_pages} threads={} elapsed_s={el:.4} \
         ns_per_page={:.2} ns_per_fault={:.2} rss_bytes_per_page={:.2} hwm_bytes_per_page={:.2} stats_bytes_per_page={:.2} {locks}",
        a.threads,
        el * 1e9 / touches.max(1) as f64,
        el * 1e9 / faults.max(1) as f64,
        rss_d as f64 / mapped,
        hwm_d as f64 / mapped,
        host as f64 / mapped,
    );
}

/// User plus system CPU seconds of this process (all threads).
fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn minflt() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru.ru_minflt as u64
    }
}

/// One round on the real kernel: returns (seconds touching, pages touched, minor faults).
fn kernel_round(size: u64, huge: bool) -> (f64, u64, u64) {
    const PMD: usize = 2 << 20;
    const SKIP: usize = 64 << 10;
    let len = size as usize;
    // Over-map by 2 MiB to place the range on a 2 MiB boundary.
    // SAFETY: a fresh private anonymous mapping that we alone use and unmap.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + PMD,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        die(&format!("mmap of {len} bytes failed: {}", std::io::Error::last_os_error()));
    }
    let base = ((raw as usize) + PMD - 1) & !(PMD - 1);
    let madv = |p: usize, l: usize, adv: libc::c_int| {
        // SAFETY: the range lies in our mapping.
        if unsafe { libc::madvise(p as *mut libc::c_void, l, adv) } != 0 {
            die(&format!("madvise failed: {}", std::io::Error::last_os_error()));
        }
    };
    // Everything NOHUGEPAGE; with --huge, each 2 MiB piece but its first
    // 64 KiB HUGEPAGE (the NOHUGEPAGE 64 KiB keeps the VMAs apart).
    madv(raw as usize, len + PMD, libc::MADV_NOHUGEPAGE);
    if huge {
        let mut p = base;
        while p < base + len {
            madv(p + SKIP, PMD - SKIP, libc::MADV_HUGEPAGE);
            p += PMD;
        }
    }
    let f0 = minflt();
    let t0 = Instant::now();
    let mut touched = 0u64;
    let mut p = base;
    if huge {
        while p < base + len {
            let mut q = p + SKIP;
            while q < p + PMD {
                // SAFETY: inside our mapping.
                unsafe { std::ptr::write_volatile(q as *mut u8, 1) };
                q += 4096;
                touched += 1;
            }
            p += PMD;
        }
    } else {
        while p < base + len {
            // SAFETY: inside our mapping.
            unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
            p += 4096;
            touched += 1;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let faults = minflt() - f0;
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(raw, len + PMD) };
    (el, touched, faults)
}

fn kernel(a: &Args) {
    let _ = kernel_round(a.size, a.huge); // warm-up: the host's memory, our code
    let mut best = (f64::MAX, 0, 0);
    for _ in 0..a.reps {
        let r = kernel_round(a.size, a.huge);
        if r.0 < best.0 {
            best = r;
        }
    }
    let (el, touched, faults) = best;
    println!(
        "mode=kernel huge={} touches={touched} faults={faults} elapsed_s={el:.4} ns_per_page={:.2} ns_per_fault={:.2} pages_per_fault={:.2}",
        a.huge,
        el * 1e9 / touched.max(1) as f64,
        el * 1e9 / faults.max(1) as f64,
        touched as f64 / faults.max(1) as f64,
    );
}

fn main() {
    let a = parse_args();
    if a.kernel {
        kernel(&a)
    } else {
        simulate(&a)
    }
}
