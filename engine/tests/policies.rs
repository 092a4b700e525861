//! Each policy does what it claims, on crafted request streams.

mod common;
use common::*;
use slora_engine::testing::{replay, FakeExecutor};
use slora_engine::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

fn mean_distinct_adapters(log: &testing::ReplayLog) -> f64 {
    let steps: Vec<_> = log.plans.iter().filter(|(_, p)| p.has_compute()).collect();
    let total: u32 = steps
        .iter()
        .map(|(_, p)| {
            let set: BTreeSet<_> = p
                .prefill
                .iter()
                .map(|w| w.adapter)
                .chain(p.decode.iter().map(|w| w.adapter))
                .collect();
            set.len() as u32
        })
        .sum();
    total as f64 / steps.len() as f64
}

#[test]
fn clustering_reduces_distinct_adapters_per_batch() {
    // 8 adapters, 256 requests interleaved round-robin, all queued at once.
    let arrivals: Vec<_> = (0..256)
        .map(|i| {
            (
                Nanos::ZERO,
                RequestMeta::new(i, Some((i % 8) as u32), 16, 8),
            )
        })
        .collect();
    let run = |clustering: bool| {
        let sched = SchedulerConfig {
            max_batch_size: 16,
            clustering,
            lookahead: 256,
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(config(&[4; 8], 4096, sched)).unwrap();
        replay(&mut s, &mut fake(), &arrivals, true).unwrap()
    };
    let fcfs = mean_distinct_adapters(&run(false));
    let clustered = mean_distinct_adapters(&run(true));
    assert!(fcfs > 7.0, "FCFS mixes all adapters: {fcfs}");
    assert!(
        clustered < fcfs / 2.0,
        "clustering {clustered} vs FCFS {fcfs}"
    );
}

#[test]
fn the_adapter_cap_bounds_every_batch() {
    let arrivals: Vec<_> = (0..200)
        .map(|i| {
            (
                ms(i),
                RequestMeta::new(i, Some((i * 7 % 10) as u32), 20, 12),
            )
        })
        .collect();
    let sched = SchedulerConfig {
        max_adapters_per_batch: Some(3),
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[8; 10], 8192, sched)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert!(log.plans.iter().all(|(_, p)| p.distinct_adapters <= 3));
    assert!(log.plans.iter().any(|(_, p)| p.distinct_adapters == 3));
    assert_eq!(s.counters().finished, 200);
}

#[test]
fn clustering_starvation_is_bounded_by_max_bypass() {
    // Request 0 uses adapter 1; a stream of adapter-0 requests would always be preferred.
    let mut arrivals = vec![(Nanos::ZERO, RequestMeta::new(0, Some(0), 8, 200))];
    arrivals.push((ms(1), RequestMeta::new(1, Some(1), 8, 4)));
    for i in 2..300 {
        arrivals.push((ms(1), RequestMeta::new(i, Some(0), 8, 4)));
    }
    let sched = SchedulerConfig {
        max_batch_size: 4,
        clustering: true,
        max_bypass: 5,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[4, 4], 4096, sched)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let admitted_order: Vec<u64> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.prefill.iter().map(|w| w.request.0))
        .collect();
    let pos = admitted_order.iter().position(|&r| r == 1).unwrap();
    // Request 0 is admitted first; then at most 5 bypasses before request 1.
    assert!(pos <= 1 + 5, "request 1 admitted at position {pos}");
}

/// Service (weighted tokens) per tenant up to each step, from plans and outcomes.
fn service_gaps(
    log: &testing::ReplayLog,
    tenant_of: &HashMap<RequestId, u32>,
    last_step: usize,
) -> f64 {
    let mut service = [0.0f64; 2];
    let mut max_gap = 0.0f64;
    for ((_, plan), (_, outcome)) in log.plans.iter().zip(&log.outcomes).take(last_step) {
        for w in plan.prefill.iter().filter(|w| w.context_start == 0) {
            service[tenant_of[&w.request] as usize] += w.tokens as f64;
        }
        for e in &outcome.emitted {
            service[tenant_of[&e.request] as usize] += 2.0;
        }
        max_gap = max_gap.max((service[0] - service[1]).abs());
    }
    max_gap
}

#[test]
fn vtc_bounds_the_service_gap_between_backlogged_tenants() {
    // Tenant 0 floods (4 of every 5 requests); both stay backlogged throughout.
    let mut arrivals = Vec::new();
    let mut tenant_of = HashMap::new();
    for i in 0..1000u64 {
        let tenant = if i % 5 == 4 { 1 } else { 0 };
        tenant_of.insert(RequestId(i), tenant);
        arrivals.push((
            Nanos::ZERO,
            RequestMeta::new(i, None, 100, 50).with_tenant(tenant),
        ));
    }
    let run = |order: QueueOrder| {
        let sched = SchedulerConfig {
            max_batch_size: 8,
            order,
            fairness: FairnessConfig {
                key: FairnessKey::Tenant,
                ..FairnessConfig::default()
            },
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(config(&[], 1 << 16, sched)).unwrap();
        let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
        // Only while both are backlogged: tenant 1 has 200 requests, so VTC exhausts it once 400
        // have been admitted (600 left waiting, all of tenant 0).
        let cutoff = log
            .plans
            .iter()
            .position(|(_, p)| p.waiting <= 600)
            .unwrap_or(log.plans.len());
        service_gaps(&log, &tenant_of, cutoff)
    };
    // One request is 100 prompt + 2*50 output = 200 units; 8 run at once.
    let bound = 2.0 * 8.0 * 200.0;
    let vtc = run(QueueOrder::Vtc);
    let fcfs = run(QueueOrder::Fcfs);
    assert!(vtc <= bound, "VTC gap {vtc} exceeds {bound}");
    assert!(
        fcfs > 10.0 * bound,
        "FCFS gap {fcfs} should grow without bound"
    );
}

#[test]
fn vtc_weights_divide_service() {
    // Tenant 1 has weight 3: while both are backlogged it gets ~3x tenant 0's service.
    let mut arrivals = Vec::new();
    for i in 0..600u64 {
        arrivals.push((
            Nanos::ZERO,
            RequestMeta::new(i, None, 50, 25).with_tenant((i % 2) as u32),
        ));
    }
    let sched = SchedulerConfig {
        max_batch_size: 4,
        order: QueueOrder::Vtc,
        fairness: FairnessConfig {
            key: FairnessKey::Tenant,
            weights: vec![(1, 3.0)],
            ..FairnessConfig::default()
        },
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[], 1 << 16, sched)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let first_200: Vec<u64> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.prefill.iter().map(|w| w.request.0))
        .take(200)
        .collect();
    let tenant1 = first_200.iter().filter(|&&r| r % 2 == 1).count() as f64;
    let ratio = tenant1 / (200.0 - tenant1);
    assert!((2.5..3.5).contains(&ratio), "service ratio {ratio}");
}

#[test]
fn early_abort_drops_exactly_the_requests_that_cannot_meet_the_slo() {
    // One request at a time, 10 ms per step, 10 output tokens: each request holds the GPU
    // for 100 ms. SLO 150 ms, and a first token takes at least one step (10 ms).
    let ea = EarlyAbort {
        ttft_slo: ms(150),
        min_time_to_first_token: ms(10),
        newest_first_under_overload: false,
    };
    let sched = SchedulerConfig {
        max_batch_size: 1,
        early_abort: Some(ea),
        ..SchedulerConfig::default()
    };
    let arrivals: Vec<_> = [0, 0, 0, 0, 50, 120, 250]
        .iter()
        .enumerate()
        .map(|(i, &t)| (ms(t), RequestMeta::new(i as u64, None, 4, 10)))
        .collect();
    let mut s = Scheduler::new(config(&[], 4096, sched)).unwrap();
    let mut exec = FakeExecutor::new(ms(10), Nanos::ZERO);
    let log = replay(&mut s, &mut exec, &arrivals, true).unwrap();
    // r0 runs 0-100 ms. At 100 ms: r1..r3 (deadline 150) could still start: r1 is admitted
    // (first token 110 ms). At 200 ms r2, r3 (deadline 150) are past hope and dropped; r4
    // (arrived 50, deadline 200) would need 200+10 > 200: dropped. r5 (deadline 270) runs
    // 200-300 ms. At 300 ms r6 (arrived 250, deadline 400) runs.
    let aborted: BTreeSet<u64> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.aborted.iter().map(|a| a.request.0))
        .collect();
    assert_eq!(aborted, BTreeSet::from([2, 3, 4]));
    // Every request that was served met its SLO.
    let mut first_token = BTreeMap::new();
    for (t, o) in &log.outcomes {
        for e in o.emitted.iter().filter(|e| e.token_index == 0) {
            first_token.insert(e.request.0, *t);
        }
    }
    for (id, t) in &first_token {
        let arrival = arrivals[*id as usize].0;
        assert!(
            *t - arrival <= ms(150),
            "request {id}: TTFT {}",
            *t - arrival
        );
    }
    let c = s.counters();
    assert_eq!(c.finished + c.aborted + c.rejected, c.submitted);
    assert_eq!((c.finished, c.aborted), (4, 3));
}

#[test]
fn newest_first_under_overload_serves_the_latest_arrival() {
    let ea = EarlyAbort {
        ttft_slo: Nanos::from_secs(100),
        min_time_to_first_token: Nanos::ZERO,
        newest_first_under_overload: true,
    };
    let sched = SchedulerConfig {
        max_batch_size: 1,
        early_abort: Some(ea),
        ..SchedulerConfig::default()
    };
    let arrivals: Vec<_> = (0..50)
        .map(|i| (Nanos::ZERO, RequestMeta::new(i, None, 4, 2)))
        .collect();
    let mut s = Scheduler::new(config(&[], 4096, sched.clone())).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert_eq!(log.plans[0].1.prefill[0].request, RequestId(49));
    // Without the flag, FCFS.
    let mut fcfs = sched;
    fcfs.early_abort = Some(EarlyAbort {
        newest_first_under_overload: false,
        ..ea
    });
    let mut s = Scheduler::new(config(&[], 4096, fcfs)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert_eq!(log.plans[0].1.prefill[0].request, RequestId(0));
}

fn peak_batch(layout: PoolLayout) -> (u32, u64) {
    // 40 adapters of rank 16 (64 pages each), every request a different adapter.
    let arrivals: Vec<_> = (0..400)
        .map(|i| {
            (
                Nanos::ZERO,
                RequestMeta::new(i, Some((i % 40) as u32), 24, 16),
            )
        })
        .collect();
    let mut cfg = config(&[16; 40], 1200, SchedulerConfig::default());
    cfg.pool_layout = layout;
    let mut s = Scheduler::new(cfg).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let peak = log.plans.iter().map(|(_, p)| p.batch_size()).max().unwrap();
    (peak, log.end.0)
}

#[test]
fn separate_adapter_memory_admits_fewer_requests_than_the_unified_pool() {
    let (unified, unified_time) = peak_batch(PoolLayout::Unified);
    // A server without unified paging must pick the split in advance. Typical splits (room
    // for a few adapters) admit strictly fewer; no split admits more.
    for adapter_slots in 1..=17u32 {
        let layout = PoolLayout::Separate {
            adapter_pages: adapter_slots * 64,
        };
        let (separate, separate_time) = peak_batch(layout);
        assert!(
            separate <= unified,
            "{adapter_slots} slots: {separate} > unified {unified}"
        );
        assert!(
            separate_time >= unified_time,
            "{adapter_slots} slots finished sooner"
        );
        if adapter_slots <= 8 {
            assert!(
                separate < unified,
                "{adapter_slots} adapter slots: peak batch {separate} vs unified {unified}"
            );
        }
    }
}

#[test]
fn prefetch_loads_adapters_of_waiting_requests_without_blocking() {
    // Batch of 1: while request 0 runs, request 1's adapter is prefetched, so its admission
    // needs no blocking load.
    let arrivals = vec![
        (Nanos::ZERO, RequestMeta::new(0, Some(0), 8, 20)),
        (Nanos::ZERO, RequestMeta::new(1, Some(1), 8, 4)),
    ];
    let sched = SchedulerConfig {
        max_batch_size: 1,
        prefetch_depth: 4,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[8, 8], 1024, sched)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let loads: Vec<_> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.loads.iter().copied())
        .collect();
    assert_eq!(loads.len(), 2);
    assert!(loads[0].blocking && loads[0].adapter == AdapterId(0));
    assert!(!loads[1].blocking && loads[1].adapter == AdapterId(1));
    assert_eq!(
        loads[1].bytes,
        AdapterSpec::attention(8).weight_bytes(&tiny_model())
    );
    // With prefetch off, request 1 loads its adapter when admitted, blocking.
    let mut s = Scheduler::new(config(
        &[8, 8],
        1024,
        SchedulerConfig {
            max_batch_size: 1,
            prefetch_depth: 0,
            ..SchedulerConfig::default()
        },
    ))
    .unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert!(log
        .plans
        .iter()
        .flat_map(|(_, p)| &p.loads)
        .all(|l| l.blocking));
}

#[test]
fn lru_eviction_makes_room_and_unpinned_adapters_are_reused_without_reload() {
    // Pool fits 2 rank-8 adapters (32 pages each) plus a little KV.
    let arrivals: Vec<_> = [0u32, 1, 0, 2, 0]
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            (
                ms(i as u64 * 1000),
                RequestMeta::new(i as u64, Some(a), 4, 2),
            )
        })
        .collect();
    let sched = SchedulerConfig {
        prefetch_depth: 0,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[8, 8, 8], 72, sched)).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let loads: Vec<u32> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.loads.iter().map(|l| l.adapter.0))
        .collect();
    let evictions: Vec<u32> = log
        .plans
        .iter()
        .flat_map(|(_, p)| p.evictions.iter().map(|a| a.0))
        .collect();
    // 0 and 1 load; 0 is reused; 2 evicts 1 (least recently used), 0 is reused again.
    assert_eq!(loads, vec![0, 1, 2]);
    assert_eq!(evictions, vec![1]);
    assert_eq!(s.adapters().stats(AdapterId(1)).evictions, 1);
}

#[test]
fn optimistic_admission_preempts_and_recomputes() {
    // 64 pages; four requests of 8 prompt + 24 output = 31 pages worst case each. All four
    // fit at first (8 pages each) but cannot all grow: the newest are preempted.
    let arrivals: Vec<_> = (0..4)
        .map(|i| (Nanos::ZERO, RequestMeta::new(i, None, 8, 24)))
        .collect();
    let sched = SchedulerConfig {
        admission: Admission::Optimistic,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[], 64, sched.clone())).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert!(s.counters().preemptions > 0);
    assert_eq!(s.counters().finished, 4);
    // Each request emitted each token index exactly once.
    let mut seen = BTreeSet::new();
    for (_, o) in &log.outcomes {
        for e in &o.emitted {
            assert!(
                seen.insert((e.request.0, e.token_index)),
                "token emitted twice: {e:?}"
            );
        }
    }
    assert_eq!(seen.len(), 4 * 24);
    // Conservative admission never preempts: it runs at most two at a time.
    let mut s = Scheduler::new(config(&[], 64, SchedulerConfig::default())).unwrap();
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    assert_eq!(s.counters().preemptions, 0);
    assert!(log.plans.iter().all(|(_, p)| p.batch_size() <= 2));
}

#[test]
fn chunked_prefill_splits_long_prompts_over_steps() {
    let sched = SchedulerConfig {
        max_prefill_tokens: 100,
        chunked_prefill: true,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config(&[], 4096, sched)).unwrap();
    let arrivals = vec![(Nanos::ZERO, RequestMeta::new(0, None, 250, 3))];
    let log = replay(&mut s, &mut fake(), &arrivals, true).unwrap();
    let chunks: Vec<(u32, u32, bool)> = log
        .plans
        .iter()
        .flat_map(|(_, p)| {
            p.prefill
                .iter()
                .map(|w| (w.context_start, w.tokens, w.emits_token))
        })
        .collect();
    assert_eq!(
        chunks,
        vec![(0, 100, false), (100, 100, false), (200, 50, true)]
    );
    // Without chunking, such a prompt is rejected with the budget named.
    let mut s = Scheduler::new(config(
        &[],
        4096,
        SchedulerConfig {
            max_prefill_tokens: 100,
            ..SchedulerConfig::default()
        },
    ))
    .unwrap();
    let err = s
        .submit(RequestMeta::new(0, None, 250, 3), Nanos::ZERO)
        .unwrap_err();
    assert!(err.to_string().contains("prefill budget of 100"), "{err}");
}

#[test]
fn bad_configuration_is_rejected_with_the_field_named() {
    let cases: Vec<(EngineConfig, &str)> = vec![
        (
            config(&[0], 1000, SchedulerConfig::default()),
            "field `rank`",
        ),
        (
            config(&[65], 1000, SchedulerConfig::default()),
            "exceeds the hidden size 64",
        ),
        (
            config(&[16], 64, SchedulerConfig::default()),
            "`pool_pages`",
        ),
        (
            config(
                &[4],
                1000,
                SchedulerConfig {
                    max_prefill_tokens: 0,
                    ..Default::default()
                },
            ),
            "scheduler.max_prefill_tokens",
        ),
        (
            config(
                &[4],
                1000,
                SchedulerConfig {
                    max_batch_size: 0,
                    ..Default::default()
                },
            ),
            "scheduler.max_batch_size",
        ),
        (
            config(
                &[4],
                1000,
                SchedulerConfig {
                    max_adapters_per_batch: Some(0),
                    ..Default::default()
                },
            ),
            "max_adapters_per_batch",
        ),
        (
            config(
                &[4],
                1000,
                SchedulerConfig {
                    fairness: FairnessConfig {
                        weights: vec![(0, -1.0)],
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
            "weight of client 0",
        ),
        (
            EngineConfig {
                pool_layout: PoolLayout::Separate { adapter_pages: 8 },
                ..config(&[4], 1000, SchedulerConfig::default())
            },
            "smaller than the largest adapter (16 pages)",
        ),
    ];
    for (cfg, expected) in cases {
        let err = Scheduler::new(cfg).unwrap_err().to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
}

#[test]
fn bad_requests_are_rejected_not_queued() {
    let mut s = Scheduler::new(config(&[4], 200, SchedulerConfig::default())).unwrap();
    let now = Nanos::ZERO;
    assert!(matches!(
        s.submit(RequestMeta::new(1, None, 0, 4), now),
        Err(Reject::EmptyPrompt { .. })
    ));
    assert!(matches!(
        s.submit(RequestMeta::new(2, None, 4, 0), now),
        Err(Reject::NoOutput { .. })
    ));
    assert!(matches!(
        s.submit(RequestMeta::new(3, Some(9), 4, 4), now),
        Err(Reject::UnknownAdapter { .. })
    ));
    let err = s
        .submit(RequestMeta::new(4, Some(0), 150, 50), now)
        .unwrap_err();
    assert!(err.to_string().contains("needs 215 pages"), "{err}");
    s.submit(RequestMeta::new(5, None, 4, 4), now).unwrap();
    assert!(matches!(
        s.submit(RequestMeta::new(5, None, 4, 4), now),
        Err(Reject::DuplicateId { .. })
    ));
    assert_eq!(s.waiting_len(), 1);
    assert_eq!(s.counters().rejected, 5);
}

#[test]
fn the_protocol_is_enforced() {
    let mut s = Scheduler::new(config(&[], 100, SchedulerConfig::default())).unwrap();
    assert_eq!(s.plan_step(Nanos::ZERO).unwrap(), None);
    s.submit(RequestMeta::new(0, None, 4, 4), Nanos::ZERO)
        .unwrap();
    let plan = s.plan_step(Nanos::ZERO).unwrap().unwrap();
    assert!(matches!(
        s.plan_step(Nanos::ZERO),
        Err(EngineError::StepInFlight { .. })
    ));
    let wrong = StepReport {
        step: plan.step + 1,
        elapsed: ms(1),
    };
    assert!(matches!(
        s.complete_step(&wrong, ms(1)),
        Err(EngineError::StepMismatch { .. })
    ));
    let right = StepReport {
        step: plan.step,
        elapsed: ms(1),
    };
    let out = s.complete_step(&right, ms(1)).unwrap();
    assert_eq!(out.emitted.len(), 1);
}
