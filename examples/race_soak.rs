//! `cargo run --release --example race_soak -- FAULTS [THREADS]`: CPUs
//! interleaved page by page inside the same 64 KiB ranges, round after
//! round, rotating the policy and the enabled sizes, with the invariant
//! checker after every round, until FAULTS faults have been simulated.
use anonfolio::{workload, Config, Mm, Policy, RunOptions, Sharing, Workload, WorkloadKind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let sizes: [&[&str]; 3] = [&["64kB=always"], &["16kB=always", "64kB=always"], &[]];
    let (mut faults, mut races, mut wasted, mut contended, mut round) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let t0 = std::time::Instant::now();
    while faults < target {
        let mut cfg = Config::default();
        cfg.set_size_mode("2048kB=never").unwrap();
        for s in sizes[(round % 3) as usize] {
            cfg.set_size_mode(s).unwrap();
        }
        cfg.policy = [Policy::Upstream, Policy::V1, Policy::Preferred][(round / 3 % 3) as usize];
        cfg.memory.phys_bytes = 1 << 30;
        let mm = Mm::new(cfg).unwrap();
        let w = Workload {
            kind: WorkloadKind::Sequential,
            size: 64 << 20,
            sharing: Sharing::Interleaved,
            ..Default::default()
        };
        let r = workload::run_workload(
            &mm,
            &w,
            &RunOptions { threads, deterministic: None, check_invariants: true, ..Default::default() },
        );
        if let Some(e) = r.error {
            eprintln!("round {round}: {e}");
            std::process::exit(1);
        }
        assert_eq!(r.stats.rss_pages, (64 << 20) / 4096, "every page touched is mapped exactly once");
        faults += r.stats.faults();
        races += r.stats.race.races;
        wasted += r.stats.race.pages_wasted;
        contended += r.stats.ptl.contended;
        round += 1;
    }
    println!(
        "rounds={round} faults={faults} races={races} pages_wasted={wasted} ptl_contended={contended} invariants=clean elapsed={:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
