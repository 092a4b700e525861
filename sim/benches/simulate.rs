//! Simulation speed: one hour of simulated traffic on a saturated H200 (Llama-7B, 1,000
//! adapters of S-LoRA S2 ranks 64/32/16/8, U[8, 512] lengths, Gamma cv 1 at 25 req/s, just
//! above the derived capacity of about 24.5 req/s). Target: under 0.36 s on one core
//! (10,000x faster than real time).
//!
//! `cargo bench -p slora-sim --bench simulate`

use criterion::{criterion_group, criterion_main, Criterion};
use slora_sim::{simulate, Scenario};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

const HOUR_AT_SATURATION: &str = include_str!("hour.yaml");

fn bench(c: &mut Criterion) {
    let loaded = Scenario::parse(HOUR_AT_SATURATION, Path::new("hour.yaml")).unwrap();
    let setup = loaded.points[0]
        .scenario
        .build(Path::new("hour.yaml"))
        .unwrap();
    let run = simulate(&setup, None).unwrap();
    eprintln!(
        "one simulated hour: {} requests, {} steps, window {:.0} s, {:.2} req/s, mean batch {:.0}",
        run.metrics.requests.submitted,
        run.metrics.batch.steps,
        run.metrics.throughput.window_s,
        run.metrics.throughput.requests_per_s,
        run.metrics.batch.mean_batch_size
    );
    let mut group = c.benchmark_group("simulate");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("one_hour_saturated_h200_llama7b_1000_adapters", |b| {
        b.iter(|| black_box(simulate(&setup, None).unwrap().metrics.requests.completed))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
