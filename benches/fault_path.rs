//! Criterion benchmarks of the simulated fault path.
//!
//! `cargo bench --bench fault_path` (about a minute and a half, build excluded).
//!
//! Groups:
//! - `sequential`: one CPU writes every page of 1 GiB in order, at order 0
//!   (`2048kB=never`) and at 64kB (`64kB=always`, `2048kB=never`).
//! - `disjoint_threads`: the same 1 GiB (order 0, and 64kB) split into
//!   disjoint halves on 1 vs 2 simulated CPUs (host threads).
//! - `policies`: upstream / v1 / preferred with 16kB..1024kB all `always`,
//!   every page of 256 MiB written in a seeded random order.
//!
//! Throughput is in elements = pages touched. Each iteration builds a fresh
//! mm and maps the VMA outside the timed part; the time counted is the
//! simulator's own (`RunResult::elapsed_s`: the access loop only, without
//! building or tearing down the mm).
use anonfolio::{workload, Config, Mm, Policy, RunOptions, Sharing, Workload, WorkloadKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn config(policy: Policy, modes: &[&str]) -> Config {
    let mut c = Config { policy, ..Default::default() };
    for m in modes {
        c.set_size_mode(m).unwrap();
    }
    c
}

/// Runs `w` `iters` times on fresh mms; returns the simulated-run time.
fn timed(cfg: &Config, w: &Workload, threads: usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mm = Mm::new(cfg.clone()).unwrap();
        let r = workload::run_workload(&mm, w, &RunOptions { threads, ..Default::default() });
        assert!(r.error.is_none(), "{:?}", r.error);
        total += Duration::from_secs_f64(r.elapsed_s);
        drop(mm);
    }
    total
}

const ORDER0: &[&str] = &["2048kB=never"];
const K64: &[&str] = &["64kB=always", "2048kB=never"];
const ALL_MTHP: &[&str] = &[
    "16kB=always",
    "32kB=always",
    "64kB=always",
    "128kB=always",
    "256kB=always",
    "512kB=always",
    "1024kB=always",
    "2048kB=never",
];

fn quick<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g
}

fn sequential(c: &mut Criterion) {
    let w = Workload { kind: WorkloadKind::Sequential, size: 1 << 30, ..Default::default() };
    let mut g = quick(c, "sequential");
    g.throughput(Throughput::Elements(w.touches()));
    for (name, modes) in [("order0", ORDER0), ("64kB", K64)] {
        let cfg = config(Policy::Upstream, modes);
        g.bench_function(BenchmarkId::new("1GiB", name), |b| b.iter_custom(|n| timed(&cfg, &w, 1, n)));
    }
    g.finish();
}

fn disjoint_threads(c: &mut Criterion) {
    let w =
        Workload { kind: WorkloadKind::Sequential, size: 1 << 30, sharing: Sharing::Disjoint, ..Default::default() };
    let mut g = quick(c, "disjoint_threads");
    g.throughput(Throughput::Elements(w.touches()));
    for (name, modes) in [("order0", ORDER0), ("64kB", K64)] {
        let cfg = config(Policy::Upstream, modes);
        for threads in [1usize, 2] {
            g.bench_function(BenchmarkId::new(name, format!("{threads}cpu")), |b| {
                b.iter_custom(|n| timed(&cfg, &w, threads, n))
            });
        }
    }
    g.finish();
}

fn policies(c: &mut Criterion) {
    let w = Workload { kind: WorkloadKind::Random, size: 256 << 20, seed: 1, ..Default::default() };
    let mut g = quick(c, "policies");
    g.throughput(Throughput::Elements(w.touches()));
    for policy in [Policy::Upstream, Policy::V1, Policy::Preferred] {
        let cfg = config(policy, ALL_MTHP);
        g.bench_function(BenchmarkId::new("random_256MiB_16k-1024k", policy.name()), |b| {
            b.iter_custom(|n| timed(&cfg, &w, 1, n))
        });
    }
    g.finish();
}

criterion_group!(benches, sequential, disjoint_threads, policies);
criterion_main!(benches);
