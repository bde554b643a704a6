//! `cargo run --release --example replay -- TRACE [--thp-enabled M] [--thp SIZE=MODE]... [--policy P]`:
//! the core alone, without Python; prints faults, Rss and per-size counters.
use anonfolio::{config, replay, trace, Config, Mm, RunOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = Config::default();
    let mut path = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--thp-enabled" => {
                i += 1;
                cfg.enabled = config::Enabled::parse(&args[i]).unwrap();
            }
            "--thp" => {
                i += 1;
                cfg.set_size_mode(&args[i]).unwrap();
            }
            "--policy" => {
                i += 1;
                cfg.policy = config::Policy::parse(&args[i]).unwrap();
            }
            p => path = Some(p.to_string()),
        }
        i += 1;
    }
    let text = std::fs::read_to_string(path.expect("TRACE")).unwrap();
    let ops = trace::parse(&text).unwrap();
    let mm = Mm::new(cfg).unwrap();
    let r = replay(&mm, &ops, &RunOptions { threads: 1, check_invariants: true, ..Default::default() });
    if let Some(e) = r.error {
        eprintln!("error: {e}");
    }
    let s = r.stats;
    print!("faults={} rss_bytes={}", s.faults(), s.rss_pages * 4096);
    for (o, m) in s.mthp.iter().enumerate() {
        if m.pairs().iter().any(|(_, v)| *v != 0) {
            print!(
                " {}:alloc={},fallback={},split_deferred={}",
                config::size_name(o),
                m.anon_fault_alloc,
                m.anon_fault_fallback,
                m.split_deferred
            );
        }
    }
    println!(" elapsed={:.6}", r.elapsed_s);
}
