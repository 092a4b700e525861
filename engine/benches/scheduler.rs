//! Cost of the core per iteration: `plan_step` + `complete_step` in a saturated steady state
//! with 2,000 adapters (S-LoRA S2 ranks 8/16/32/64 on Llama-7B) and 256 running requests, as
//! on an H200. Each iteration finishes about one request; a fresh one is submitted for every
//! request that ends, so the batch stays full and a queue of 64 keeps admissions flowing.
//!
//! `cargo bench -p slora-engine --bench scheduler`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use slora_engine::testing::FakeExecutor;
use slora_engine::*;
use std::hint::black_box;

const ADAPTERS: u32 = 2000;
const RUNNING: u32 = 256;
const QUEUED: u32 = 64;

/// A tiny deterministic generator (the engine has no RNG dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % (hi - lo + 1) as u64) as u32
    }
}

struct Bench {
    sched: Scheduler,
    exec: FakeExecutor,
    rng: Lcg,
    next_id: u64,
    now: Nanos,
}

impl Bench {
    fn new(policy: SchedulerConfig) -> Bench {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let ranks = [8, 16, 32, 64];
        let adapters = (0..ADAPTERS)
            .map(|i| AdapterSpec::attention(ranks[i as usize % 4]))
            .collect();
        // H200: 141 GB less 13.5 GB of weights, in 512 KiB pages.
        let pool_pages = ((141e9 - 13.5e9) / model.page_bytes() as f64) as u32;
        let cfg = EngineConfig {
            model,
            adapters,
            pool_pages,
            pool_layout: PoolLayout::Unified,
            scheduler: SchedulerConfig {
                max_batch_size: RUNNING,
                ..policy
            },
        };
        let mut b = Bench {
            sched: Scheduler::new(cfg).unwrap(),
            exec: FakeExecutor::new(Nanos::from_millis(20), Nanos::ZERO),
            rng: Lcg(42),
            next_id: 0,
            now: Nanos::ZERO,
        };
        for _ in 0..RUNNING + QUEUED {
            b.submit();
        }
        // Warm up to steady state: everything admitted, lengths staggered.
        for _ in 0..2000 {
            b.iteration();
        }
        b
    }

    fn submit(&mut self) {
        let meta = RequestMeta::new(
            self.next_id,
            Some(self.rng.range(0, ADAPTERS - 1)),
            self.rng.range(8, 512),
            self.rng.range(8, 512),
        );
        self.next_id += 1;
        self.sched.submit(meta, self.now).unwrap();
    }

    fn iteration(&mut self) -> usize {
        let plan = self.sched.plan_step(self.now).unwrap().unwrap();
        let report = self.exec.execute(&plan).unwrap();
        self.now = self.now + report.elapsed;
        let outcome = self.sched.complete_step(&report, self.now).unwrap();
        let ended = outcome.finished.len() + plan.aborted.len();
        for _ in 0..ended {
            self.submit();
        }
        plan.decode.len()
    }
}

fn policies() -> Vec<(&'static str, SchedulerConfig)> {
    let base = SchedulerConfig::default();
    vec![
        ("fcfs", base.clone()),
        (
            "clustering",
            SchedulerConfig {
                clustering: true,
                ..base.clone()
            },
        ),
        (
            "vtc",
            SchedulerConfig {
                order: QueueOrder::Vtc,
                ..base.clone()
            },
        ),
        (
            "optimistic_abort",
            SchedulerConfig {
                admission: Admission::Optimistic,
                early_abort: Some(EarlyAbort {
                    ttft_slo: Nanos::from_secs(6),
                    min_time_to_first_token: Nanos::from_millis(500),
                    newest_first_under_overload: true,
                }),
                ..base
            },
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_and_complete_step/2000_adapters/256_running");
    for (name, policy) in policies() {
        let mut b = Bench::new(policy);
        let batch = b.iteration();
        assert!(
            batch >= (RUNNING as usize) * 9 / 10,
            "{name}: batch of {batch} is not full"
        );
        group.bench_function(name, |bench| {
            bench.iter_batched_ref(|| (), |_| black_box(b.iteration()), BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
