//! The deterministic scheduler's cost (used by `benches/sched_speed.py`).
//!
//! `cargo run --release --example sched_speed -- [--size 1G] [--reps 5]
//!  [--cpus 64,1024] [--advice hugepage|nohugepage|none] [SIZE=MODE ...]`
//!
//! In one process, alternating so that every figure sees the same machine
//! state: one free-running CPU writing every page of SIZE (no scheduler),
//! and N simulated CPUs taking turns page by page over the same range
//! (`--sharing interleaved --deterministic 1`), each a coroutine switched at
//! the fault path's points with the default probability. Prints one line
//! per configuration: min, median and max seconds of `--reps` runs and the
//! ratio of the medians to the free-running CPU's. The workload is advised
//! MADV_HUGEPAGE unless `--advice` says otherwise: under the kernel's
//! default knobs the GiB is then 512 PMD THPs, and `--advice none` makes it
//! the folios of the sizes at `always` (16,384 of them for `64kB=always`).
use anonfolio::workload::WorkloadAdvice;
use anonfolio::{workload, Config, Mm, RunOptions, Sharing, Workload};

fn die(msg: &str) -> ! {
    eprintln!("sched_speed: {msg}");
    std::process::exit(2)
}

fn bytes(s: &str) -> u64 {
    let (n, m) = match s.trim_end_matches("iB").trim_end_matches('B').chars().last() {
        Some('K') => (&s[..s.find('K').unwrap()], 1u64 << 10),
        Some('M') => (&s[..s.find('M').unwrap()], 1 << 20),
        Some('G') => (&s[..s.find('G').unwrap()], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().unwrap_or_else(|_| die(&format!("bad size {s:?}"))) * m
}

fn run_once(cfg: &Config, size: u64, advice: Option<WorkloadAdvice>, cpus: usize) -> (f64, u64, u64) {
    let mm = Mm::new(cfg.clone()).unwrap_or_else(|e| die(&e.to_string()));
    let w = Workload { size, sharing: Sharing::Interleaved, advice, ..Default::default() };
    let opts = if cpus == 0 {
        RunOptions { threads: 1, ..Default::default() }
    } else {
        RunOptions { threads: cpus, deterministic: Some(1), ..Default::default() }
    };
    let r = workload::run_workload(&mm, &w, &opts);
    if let Some(e) = r.error {
        die(&e.to_string());
    }
    (r.elapsed_s, r.stats.faults(), r.stats.race.races)
}

fn main() {
    let mut size = 1u64 << 30;
    let mut reps = 5usize;
    let mut ncpus = vec![64usize, 1024];
    let mut cfg = Config::default();
    cfg.memory.phys_bytes = 4 << 30;
    let mut modes = Vec::new();
    let mut advice = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = bytes(&args.next().unwrap_or_else(|| die("--size needs a value"))),
            "--advice" => {
                let v = args.next().unwrap_or_else(|| die("--advice needs a value"));
                advice = Some(WorkloadAdvice::parse(&v).unwrap_or_else(|e| die(&e.to_string())));
            }
            "--reps" => {
                reps = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&r| r > 0)
                    .unwrap_or_else(|| die("--reps needs a count of at least 1"))
            }
            "--cpus" => {
                ncpus = args
                    .next()
                    .unwrap_or_else(|| die("--cpus needs a list"))
                    .split(',')
                    .map(|v| v.parse().unwrap_or_else(|_| die("bad --cpus")))
                    .collect()
            }
            m if m.contains('=') => {
                cfg.set_size_mode(m).unwrap_or_else(|e| die(&e.to_string()));
                modes.push(m.to_string());
            }
            _ => die(&format!("unknown argument {a:?}")),
        }
    }
    // Index 0 is the free-running CPU.
    let configs: Vec<usize> = std::iter::once(0).chain(ncpus.iter().copied()).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut faults = vec![0u64; configs.len()];
    let mut races = vec![0u64; configs.len()];
    // One warm-up round, then `reps` rounds alternating the configurations.
    for round in 0..=reps {
        for (k, &n) in configs.iter().enumerate() {
            let (t, f, r) = run_once(&cfg, size, advice, n);
            if round > 0 {
                times[k].push(t);
            }
            faults[k] = f;
            races[k] = r;
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (_, base, _) = med(&mut times[0].clone());
    println!(
        "size={size} modes={} advice={} reps={reps}",
        if modes.is_empty() { "default".into() } else { modes.join(",") },
        advice.map_or("hugepage (default)".to_string(), |a| format!("{a:?}").to_lowercase())
    );
    for (k, &n) in configs.iter().enumerate() {
        let (lo, m, hi) = med(&mut times[k]);
        let what = if n == 0 { "free-running 1 CPU".to_string() } else { format!("{n} CPUs interleaved, seed 1") };
        println!(
            "config={what:?} min_s={lo:.4} median_s={m:.4} max_s={hi:.4} ratio={:.2} ratio_min={:.2} ratio_max={:.2} faults={} races={}",
            m / base,
            lo / base,
            hi / base,
            faults[k],
            races[k]
        );
    }
}
