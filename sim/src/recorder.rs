//! The recorder both drivers feed: per-request and per-step records as a run goes, then
//! the aggregates of `metrics`.

use crate::cost::Provenance;
use crate::metrics::*;
use slora_engine::Nanos;

/// Collects records while a driver runs; `finish` turns them into a `RunResult`. Both the
/// simulator and the live driver feed it the same way, so their outputs compare field by field.
pub struct Recorder {
    scenario: String,
    seed: u64,
    provenance: Provenance,
    cost_model: String,
    slo: SloTargets,
    ranks: Vec<u32>,
    page_bytes: u64,
    capacity_pages: u32,
    requests: Vec<RequestRecord>,
    ended: Vec<bool>,
    last_token: Vec<Nanos>,
    steps: Vec<StepRecord>,
    itl: LogHistogram,
    breakdown: [u64; crate::cost::StepCost::PARTS.len()],
}

impl Recorder {
    pub fn new(setup: &crate::scenario::RunSetup, cost: &dyn crate::cost::CostModel) -> Recorder {
        Recorder::with_source(setup, cost.provenance(), cost.describe())
    }

    /// A recorder for a run whose step times come from `provenance` (`Executed` for the live
    /// driver), described in reports as `description`.
    pub fn with_source(
        setup: &crate::scenario::RunSetup,
        provenance: Provenance,
        description: String,
    ) -> Recorder {
        let requests = setup
            .arrivals
            .iter()
            .enumerate()
            .map(|(i, a)| RequestRecord {
                id: i as u64,
                adapter: a.adapter,
                tenant: a.tenant,
                prompt_tokens: a.prompt_tokens,
                output_tokens: a.output_tokens,
                arrival: a.time,
                admitted: None,
                first_token: None,
                finish: None,
                status: RequestStatus::Completed,
                preemptions: 0,
            })
            .collect::<Vec<_>>();
        let n = requests.len();
        Recorder {
            scenario: setup.scenario.name.clone(),
            seed: setup.scenario.seed,
            provenance,
            cost_model: description,
            slo: setup.scenario.slo_targets(),
            ranks: setup.ranks.clone(),
            page_bytes: setup.engine.model.page_bytes(),
            capacity_pages: setup.engine.pool_pages,
            requests,
            ended: vec![false; n],
            last_token: vec![Nanos::ZERO; n],
            steps: Vec::new(),
            itl: LogHistogram::default(),
            breakdown: [0; crate::cost::StepCost::PARTS.len()],
        }
    }

    pub fn rejected(&mut self, index: usize, _reject: &slora_engine::Reject, now: Nanos) {
        let r = &mut self.requests[index];
        r.status = RequestStatus::Rejected;
        r.finish = Some(now);
        self.ended[index] = true;
    }

    pub fn planned(
        &mut self,
        plan: &slora_engine::StepPlan,
        cost: &crate::cost::StepCost,
        model: Nanos,
        now: Nanos,
    ) {
        for p in &plan.prefill {
            let r = &mut self.requests[p.request.0 as usize];
            if r.admitted.is_none() {
                r.admitted = Some(now);
            }
        }
        for a in &plan.aborted {
            let i = a.request.0 as usize;
            let r = &mut self.requests[i];
            r.status = RequestStatus::Aborted;
            r.finish = Some(now);
            self.ended[i] = true;
        }
        for (slot, part) in self.breakdown.iter_mut().zip(cost.parts()) {
            *slot += part.0;
        }
        self.steps.push(StepRecord {
            start: now,
            duration: cost.total(),
            prefill_requests: plan.prefill.len() as u32,
            prefill_tokens: plan.prefill_tokens(),
            decode_requests: plan.decode.len() as u32,
            distinct_adapters: plan.distinct_adapters,
            kv_pages: plan.pool.kv,
            adapter_pages: plan.pool.adapter,
            free_pages: plan.pool.free,
            waiting: plan.waiting,
            loads: plan.loads.len() as u32,
            evictions: plan.evictions.len() as u32,
            aborted: plan.aborted.len() as u32,
            preempted: plan.preempted.len() as u32,
            model,
        });
    }

    pub fn completed(&mut self, outcome: &slora_engine::StepOutcome, now: Nanos) {
        for e in &outcome.emitted {
            let i = e.request.0 as usize;
            if e.token_index == 0 {
                self.requests[i].first_token = Some(now);
            } else {
                self.itl.record(now - self.last_token[i]);
            }
            self.last_token[i] = now;
        }
        for f in &outcome.finished {
            let i = f.request.0 as usize;
            let r = &mut self.requests[i];
            r.status = RequestStatus::Completed;
            r.finish = Some(now);
            r.preemptions = f.preemptions;
            self.ended[i] = true;
        }
    }

    fn meets_slo(&self, r: &RequestRecord) -> bool {
        if r.status != RequestStatus::Completed {
            return false;
        }
        let within = |limit: Option<f64>, value: Option<f64>| match (limit, value) {
            (None, _) => true,
            (Some(l), Some(v)) => v <= l,
            (Some(_), None) => true,
        };
        within(self.slo.ttft_s, r.ttft().map(Nanos::as_secs_f64))
            && within(self.slo.tpot_s, r.tpot())
            && within(self.slo.e2e_s, r.e2e().map(Nanos::as_secs_f64))
    }

    pub fn finish(self, scheduler: &slora_engine::Scheduler) -> RunResult {
        self.finish_replicas(&[scheduler])
    }

    /// [`Recorder::finish`] for a run spread over several engines (a fleet of replicas, each
    /// fed its share of the requests under their global ids): engine counters (preemptions,
    /// adapter loads, evictions, bytes) and per-adapter loads and evictions are summed over
    /// `schedulers`. With one scheduler it is `finish`.
    pub fn finish_replicas(self, schedulers: &[&slora_engine::Scheduler]) -> RunResult {
        let reqs = &self.requests;
        debug_assert!(self.ended.iter().all(|&e| e), "a request never ended");
        let count = |s: RequestStatus| reqs.iter().filter(|r| r.status == s).count() as u64;
        let completed: Vec<&RequestRecord> = reqs
            .iter()
            .filter(|r| r.status == RequestStatus::Completed)
            .collect();
        let start = reqs.iter().map(|r| r.arrival).min().unwrap_or(Nanos::ZERO);
        let end = reqs.iter().filter_map(|r| r.finish).max().unwrap_or(start);
        let last_arrival = reqs.iter().map(|r| r.arrival).max().unwrap_or(start);
        let window = (end - start).as_secs_f64();
        let per_s = |x: f64| if window > 0.0 { x / window } else { 0.0 };
        let output_tokens: u64 = completed.iter().map(|r| r.output_tokens as u64).sum();
        let prompt_tokens: u64 = completed.iter().map(|r| r.prompt_tokens as u64).sum();
        let good = reqs.iter().filter(|r| self.meets_slo(r)).count() as u64;
        let arrival_span = (last_arrival - start).as_secs_f64();
        let throughput = Throughput {
            window_s: window,
            offered_requests_per_s: if arrival_span > 0.0 {
                (reqs.len() as f64 - 1.0).max(0.0) / arrival_span
            } else {
                0.0
            },
            requests_per_s: per_s(completed.len() as f64),
            output_tokens_per_s: per_s(output_tokens as f64),
            total_tokens_per_s: per_s((output_tokens + prompt_tokens) as f64),
            goodput_requests_per_s: per_s(good as f64),
        };
        let secs = |f: &dyn Fn(&RequestRecord) -> Option<f64>| -> Summary {
            summarize(completed.iter().filter_map(|r| f(r)).collect())
        };
        let ttft_s = secs(&|r| r.ttft().map(Nanos::as_secs_f64));
        let tpot_s = secs(&|r| r.tpot());
        let e2e_s = secs(&|r| r.e2e().map(Nanos::as_secs_f64));
        let queueing_s = secs(&|r| r.queueing().map(Nanos::as_secs_f64));
        let slo_attainment = if reqs.is_empty() {
            0.0
        } else {
            good as f64 / reqs.len() as f64
        };

        // Time-weighted means over steps.
        let busy: f64 = self.steps.iter().map(|s| s.duration.0 as f64).sum();
        let weighted = |f: &dyn Fn(&StepRecord) -> f64| -> f64 {
            if busy > 0.0 {
                self.steps
                    .iter()
                    .map(|s| f(s) * s.duration.0 as f64)
                    .sum::<f64>()
                    / busy
            } else {
                0.0
            }
        };
        let batch = BatchMetrics {
            steps: self.steps.len() as u64,
            mean_batch_size: weighted(&|s| (s.prefill_requests + s.decode_requests) as f64),
            max_batch_size: self
                .steps
                .iter()
                .map(|s| s.prefill_requests + s.decode_requests)
                .max()
                .unwrap_or(0),
            mean_distinct_adapters: weighted(&|s| s.distinct_adapters as f64),
            max_distinct_adapters: self
                .steps
                .iter()
                .map(|s| s.distinct_adapters)
                .max()
                .unwrap_or(0),
        };
        let pool = PoolMetrics {
            capacity_pages: self.capacity_pages,
            page_bytes: self.page_bytes,
            mean_kv_pages: weighted(&|s| s.kv_pages as f64),
            mean_adapter_pages: weighted(&|s| s.adapter_pages as f64),
            mean_free_pages: weighted(&|s| s.free_pages as f64),
            peak_kv_pages: self.steps.iter().map(|s| s.kv_pages).max().unwrap_or(0),
            peak_adapter_pages: self
                .steps
                .iter()
                .map(|s| s.adapter_pages)
                .max()
                .unwrap_or(0),
        };
        let mut c = slora_engine::EngineCounters::default();
        for s in schedulers {
            let own = s.counters();
            c.preemptions += own.preemptions;
            c.adapter_loads += own.adapter_loads;
            c.adapter_evictions += own.adapter_evictions;
            c.adapter_load_bytes += own.adapter_load_bytes;
        }
        let adapter_traffic = AdapterTraffic {
            loads: c.adapter_loads,
            evictions: c.adapter_evictions,
            h2d_bytes: c.adapter_load_bytes,
        };
        let step_time_breakdown_s = crate::cost::StepCost::PARTS
            .iter()
            .zip(self.breakdown)
            .map(|(name, ns)| (name.to_string(), ns as f64 / 1e9))
            .collect();

        // Per adapter: requests grouped by adapter id.
        let mut by_adapter: Vec<Vec<f64>> = vec![Vec::new(); self.ranks.len()];
        let mut counts = vec![(0u64, 0u64); self.ranks.len()];
        for r in reqs {
            if let Some(a) = r.adapter {
                let a = a as usize;
                if a < counts.len() {
                    counts[a].0 += 1;
                    if let (RequestStatus::Completed, Some(t)) = (r.status, r.ttft()) {
                        counts[a].1 += 1;
                        by_adapter[a].push(t.as_secs_f64());
                    }
                }
            }
        }
        let per_adapter = by_adapter
            .into_iter()
            .enumerate()
            .map(|(a, ttfts)| {
                let mut stats = slora_engine::AdapterStats::default();
                for s in schedulers {
                    let own = s.adapters().stats(slora_engine::AdapterId(a as u32));
                    stats.loads += own.loads;
                    stats.evictions += own.evictions;
                }
                let s = summarize(ttfts);
                AdapterMetrics {
                    adapter: a as u32,
                    rank: self.ranks[a],
                    requests: counts[a].0,
                    completed: counts[a].1,
                    ttft_p50_s: s.p50,
                    ttft_p99_s: s.p99,
                    loads: stats.loads,
                    evictions: stats.evictions,
                }
            })
            .collect();
        let metrics = Metrics {
            scenario: self.scenario.clone(),
            provenance: Some(self.provenance),
            cost_model: self.cost_model.clone(),
            seed: self.seed,
            throughput,
            requests: RequestCounts {
                submitted: reqs.len() as u64,
                completed: completed.len() as u64,
                aborted: count(RequestStatus::Aborted),
                rejected: count(RequestStatus::Rejected),
                preemptions: c.preemptions,
            },
            ttft_s,
            tpot_s,
            itl_s: self.itl.summary(),
            e2e_s,
            queueing_s,
            slo: self.slo.clone(),
            slo_attainment,
            meets_slo: !reqs.is_empty() && slo_attainment >= self.slo.attainment_target,
            batch,
            pool,
            adapter_traffic,
            step_time_breakdown_s,
            per_adapter,
            definitions: definitions(),
        };
        RunResult {
            metrics,
            requests: self.requests,
            steps: self.steps,
        }
    }
}
