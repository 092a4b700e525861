//! Property tests: the core's invariants hold on random request and adapter streams under
//! every combination of policies. `replay(.., check = true)` recounts the pool, the adapter
//! cache, pins and reservations after every plan and every completion.

mod common;
use common::*;
use proptest::prelude::*;
use slora_engine::testing::{replay, ReplayLog};
use slora_engine::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
struct Case {
    ranks: Vec<u32>,
    pool_pages: u32,
    separate_slots: Option<u32>,
    sched: SchedulerConfig,
    arrivals: Vec<(Nanos, RequestMeta)>,
}

fn scheduler_config() -> impl Strategy<Value = SchedulerConfig> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(1u32..4),
        any::<bool>(),
        proptest::option::of((20u64..400, 0u64..30, any::<bool>())),
        0u32..4,
        (1u32..24, 16u32..200, 1u32..16, 0u32..8),
    )
        .prop_map(
            |(
                optimistic,
                vtc,
                clustering,
                cap,
                chunked,
                abort,
                prefetch,
                (batch, budget, lookahead, bypass),
            )| {
                SchedulerConfig {
                    admission: if optimistic {
                        Admission::Optimistic
                    } else {
                        Admission::Conservative
                    },
                    order: if vtc {
                        QueueOrder::Vtc
                    } else {
                        QueueOrder::Fcfs
                    },
                    max_batch_size: batch,
                    max_prefill_tokens: budget,
                    chunked_prefill: chunked,
                    clustering,
                    max_adapters_per_batch: cap,
                    max_bypass: bypass,
                    lookahead,
                    fairness: FairnessConfig::default(),
                    early_abort: abort.map(|(slo, min, newest)| EarlyAbort {
                        ttft_slo: ms(slo),
                        min_time_to_first_token: ms(min),
                        newest_first_under_overload: newest,
                    }),
                    prefetch_depth: prefetch,
                }
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(1u32..9, 0..12),
        60u32..600,
        proptest::option::of(1u32..4),
        scheduler_config(),
        proptest::collection::vec((0u64..30, 0u32..14, 1u32..120, 1u32..40, 0u32..3), 1..60),
    )
        .prop_map(|(ranks, pool_pages, separate_slots, sched, raw)| {
            let mut t = 0;
            let arrivals = raw
                .into_iter()
                .enumerate()
                .map(|(i, (gap, adapter, prompt, output, tenant))| {
                    t += gap;
                    // Adapter ids past the registered ones use the base model.
                    let adapter = (adapter < ranks.len() as u32).then_some(adapter);
                    let meta =
                        RequestMeta::new(i as u64, adapter, prompt, output).with_tenant(tenant);
                    (ms(t), meta)
                })
                .collect();
            Case {
                ranks,
                pool_pages,
                separate_slots,
                sched,
                arrivals,
            }
        })
}

fn build(case: &Case) -> Option<Scheduler> {
    let mut cfg = config(&case.ranks, case.pool_pages, case.sched.clone());
    if let Some(slots) = case.separate_slots {
        let largest = case.ranks.iter().max().copied().unwrap_or(1) * 4;
        cfg.pool_layout = PoolLayout::Separate {
            adapter_pages: slots * largest,
        };
    }
    // Random pools can be too small for the largest adapter: that is a config error, and
    // must be reported as one, never a panic.
    Scheduler::new(cfg).ok()
}

fn run(case: &Case) -> Option<(Scheduler, ReplayLog)> {
    let mut s = build(case)?;
    let log = replay(&mut s, &mut fake(), &case.arrivals, true).unwrap_or_else(|e| panic!("{e}"));
    Some((s, log))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn core_invariants_hold(case in case()) {
        let Some((s, log)) = run(&case) else { return Ok(()) };

        // Every submitted request ends exactly once: finished, aborted or rejected.
        let mut ended = BTreeMap::new();
        for r in &log.rejected {
            let id = match r {
                Reject::EmptyPrompt { id } | Reject::NoOutput { id } | Reject::DuplicateId { id }
                | Reject::UnknownAdapter { id, .. } | Reject::TooLarge { id, .. }
                | Reject::PromptExceedsBudget { id, .. } | Reject::TenantOutOfRange { id, .. } => *id,
            };
            prop_assert!(ended.insert(id, "rejected").is_none());
        }
        for (_, p) in &log.plans {
            for a in &p.aborted {
                prop_assert!(ended.insert(a.request, "aborted").is_none(), "{:?} ended twice", a.request);
            }
        }
        for (_, o) in &log.outcomes {
            for f in &o.finished {
                prop_assert!(ended.insert(f.request, "finished").is_none(), "{:?} ended twice", f.request);
            }
        }
        prop_assert_eq!(ended.len(), case.arrivals.len());
        let c = s.counters();
        prop_assert_eq!(c.finished + c.aborted + c.rejected, c.submitted);
        prop_assert!(!s.has_work());
        prop_assert_eq!(s.pool_usage().kv, 0, "KV pages leaked");

        // Finished requests emitted each output token exactly once, in order.
        let outputs: BTreeMap<RequestId, u32> =
            case.arrivals.iter().map(|(_, m)| (m.id, m.output_tokens)).collect();
        let mut emitted: BTreeMap<RequestId, u32> = BTreeMap::new();
        for (_, o) in &log.outcomes {
            for e in &o.emitted {
                let n = emitted.entry(e.request).or_default();
                prop_assert_eq!(e.token_index, *n, "{:?} out of order", e.request);
                *n += 1;
            }
        }
        for (id, how) in &ended {
            let n = emitted.get(id).copied().unwrap_or(0);
            match *how {
                "finished" => prop_assert_eq!(n, outputs[id]),
                _ => prop_assert_eq!(n, 0),
            }
        }

        for (_, p) in &log.plans {
            // An adapter used by the batch is never evicted from under it: if the step evicts
            // it (it was idle then), the same step loads it again before computing.
            let used: BTreeSet<AdapterId> = p.prefill.iter().filter_map(|w| w.adapter)
                .chain(p.decode.iter().filter_map(|w| w.adapter)).collect();
            let reloaded: BTreeSet<AdapterId> = p.loads.iter().filter(|l| l.blocking).map(|l| l.adapter).collect();
            for ev in &p.evictions {
                prop_assert!(!used.contains(ev) || reloaded.contains(ev),
                    "{ev} evicted while step {} uses it", p.step);
            }
            // Decoding requests were running before this step: their adapters were pinned,
            // so none of them can have been evicted at all.
            for d in &p.decode {
                if let Some(a) = d.adapter {
                    prop_assert!(!p.evictions.contains(&a), "{a} evicted under a decode");
                }
            }
            // Capacity is never exceeded.
            prop_assert_eq!(p.pool.kv + p.pool.adapter + p.pool.free, p.pool.capacity);
            prop_assert!(p.batch_size() <= case.sched.max_batch_size);
            prop_assert!(p.prefill_tokens() <= case.sched.max_prefill_tokens.max(
                p.prefill.iter().map(|w| w.tokens).max().unwrap_or(0)));
            if let Some(cap) = case.sched.max_adapters_per_batch {
                prop_assert!(p.distinct_adapters <= cap);
            }
            // Pages handed out in one plan are distinct.
            let mut pages: Vec<PageId> = p.pages.clone();
            pages.extend(p.decode.iter().map(|d| d.page));
            let n = pages.len();
            pages.sort();
            pages.dedup();
            prop_assert_eq!(pages.len(), n, "a page given out twice in step {}", p.step);
        }
        if case.sched.admission == Admission::Conservative {
            prop_assert_eq!(c.preemptions, 0);
        }
    }

    #[test]
    fn same_inputs_give_the_same_plans(case in case()) {
        let Some((_, a)) = run(&case) else { return Ok(()) };
        let (_, b) = run(&case).unwrap();
        prop_assert_eq!(a.plans, b.plans);
        prop_assert_eq!(a.outcomes, b.outcomes);
    }
}
