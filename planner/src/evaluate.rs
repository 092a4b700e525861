//! One evaluation: a configuration at a request rate and an adapter count, simulated, and
//! summarised with a verdict on what limits it.
//!
//! A configuration is the scenario with a few fields set (GPU, TP degree, policy knobs,
//! adapter count, arrival rate, duration): [`Evaluator::scenario`] clones the base scenario
//! and sets them, so every check and every cost-model choice of `Scenario::build` applies to
//! the plan as to `simulate`. The seed is the scenario's for every evaluation: all candidates
//! see the same request stream at a given rate (common random numbers), so their differences
//! are the configurations', not the dice's.

use crate::spec::{Knobs, RouterChoice};
use serde::{Deserialize, Serialize};
use slora_engine::Admission;
use slora_sim::cost::{CalibrationProfile, Provenance};
use slora_sim::metrics::StepRecord;
use slora_sim::workload::ArrivalSpec;
use slora_sim::{RunResult, RunSetup, Scenario};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a deployment runs on and how: one replica = `tensor_parallel` GPUs of kind `gpu`
/// running the engine with `knobs`; `replicas` of them behind `router`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub gpu: String,
    pub tensor_parallel: u32,
    pub replicas: u32,
    /// `None` for one replica (nothing to route).
    pub router: Option<RouterChoice>,
    pub knobs: Knobs,
}

impl Config {
    pub fn gpus(&self) -> u32 {
        self.tensor_parallel * self.replicas
    }
}

/// What limits a run that misses its SLO (read from a run, so meaningful where it fails).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    /// Requests wait for KV pages: the pool is full (or, under conservative admission,
    /// reserved for the worst case of running requests) while the batch has room.
    KvMemory,
    /// Adapter loads over the host link take a large share of step time.
    AdapterThrashing,
    /// The distinct-adapter cap per batch (`policy.max_adapters_per_batch`) holds requests
    /// back.
    AdapterCap,
    /// The GPU is busy with full batches (or prompt processing at the full prefill budget).
    Compute,
    /// Requests miss the SLO without queueing: one request's own latency at this load
    /// exceeds it.
    PerRequestLatency,
}

impl Bottleneck {
    pub fn label(self) -> &'static str {
        match self {
            Bottleneck::KvMemory => "memory for KV",
            Bottleneck::AdapterThrashing => "adapter thrashing",
            Bottleneck::AdapterCap => "the distinct-adapter cap",
            Bottleneck::Compute => "compute",
            Bottleneck::PerRequestLatency => "per-request latency",
        }
    }
}

/// One simulation, summarised (`plan.json` keeps one per evaluation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub meets_slo: bool,
    /// Fraction of submitted requests that completed within every SLO.
    pub slo_attainment: f64,
    pub submitted: u64,
    pub completed: u64,
    pub aborted: u64,
    pub rejected: u64,
    pub preemptions: u64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p99_s: f64,
    pub e2e_p99_s: f64,
    /// Requests per step, weighted by step time.
    pub mean_batch_size: f64,
    /// Share of the window the GPUs spent in steps (over all replicas).
    pub gpu_busy: f64,
    /// Share of step time with requests waiting.
    pub queued_share: f64,
    /// Mean share of the page pool holding KV and adapters while requests wait.
    pub pool_used_while_queued: f64,
    pub adapter_loads: u64,
    /// Share of step time spent loading adapters (not hidden behind compute).
    pub adapter_h2d_share: f64,
    /// Share of step time in tensor-parallel collectives (0 at TP 1).
    pub tp_communication_share: f64,
    /// What limits the run (meaningful where it misses the SLO).
    pub bottleneck: Option<Bottleneck>,
    /// The figures behind `bottleneck`, in words.
    pub bottleneck_detail: String,
    /// Fleets: distinct adapters routed to each replica, averaged over replicas (where the
    /// router placed the adapter population).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters_per_replica: Option<f64>,
}

/// Builds and runs evaluations of one base scenario. Shared by every search (it is `Sync`).
pub struct Evaluator<'a> {
    /// The scenario with its sweep and `plan:` removed and the seed set.
    base: Scenario,
    path: PathBuf,
    profiles: &'a [CalibrationProfile],
    duration_s: f64,
    min_requests: u64,
    affinity_slack: f64,
    simulations: AtomicU64,
}

impl<'a> Evaluator<'a> {
    pub fn new(
        base: &Scenario,
        path: &Path,
        profiles: &'a [CalibrationProfile],
        seed: u64,
        duration_s: f64,
        min_requests: u64,
        affinity_slack: f64,
    ) -> Evaluator<'a> {
        let mut base = base.clone();
        base.sweep.clear();
        base.seed = seed;
        Evaluator {
            base,
            path: path.to_path_buf(),
            profiles,
            duration_s,
            min_requests,
            affinity_slack,
            simulations: AtomicU64::new(0),
        }
    }

    /// Simulations run so far.
    pub fn simulations(&self) -> u64 {
        self.simulations.load(Ordering::Relaxed)
    }

    /// The scenario of `config` at `rate` (req/s, the whole deployment's) with `adapters`
    /// adapters: `max(duration_s, min_requests / rate)` seconds of arrivals.
    pub fn scenario(&self, config: &Config, rate: f64, adapters: u32) -> Scenario {
        let mut s = self.base.clone();
        s.gpu = config.gpu.clone();
        s.tensor_parallel = config.tensor_parallel;
        config.knobs.apply(&mut s);
        s.adapters.count = adapters;
        s.workload.arrivals = match s.workload.arrivals {
            Some(ArrivalSpec::Gamma { cv, .. }) => Some(ArrivalSpec::Gamma { rate, cv }),
            _ => Some(ArrivalSpec::Poisson { rate }),
        };
        s.workload.duration_s = Some(self.duration_s.max(self.min_requests as f64 / rate));
        s.workload.requests = None;
        s
    }

    /// Builds `config` once to see whether it can run at all (the model fits, the TP degree
    /// is supported, ...) and which cost model it gets: `(provenance, description)`.
    pub fn check(
        &self,
        config: &Config,
        rate: f64,
        adapters: u32,
    ) -> Result<(Provenance, String), String> {
        let setup = self.setup(config, rate, adapters)?;
        Ok((setup.cost.provenance(), setup.cost.describe()))
    }

    fn setup(&self, config: &Config, rate: f64, adapters: u32) -> Result<RunSetup, String> {
        self.scenario(config, rate, adapters)
            .build_with_profiles(&self.path, self.profiles)
            .map_err(|e| e.to_string())
    }

    /// Simulates `config` at `rate` with `adapters` adapters.
    pub fn run(&self, config: &Config, rate: f64, adapters: u32) -> Result<RunSummary, String> {
        let setup = self.setup(config, rate, adapters)?;
        self.simulations.fetch_add(1, Ordering::Relaxed);
        let (run, adapters_per_replica) =
            fleet::simulate_replicas(&setup, config, self.affinity_slack).map_err(|e| {
                format!("simulation at {rate} req/s with {adapters} adapters failed: {e}")
            })?;
        let mut summary = summarize(&run, &setup.scenario, config.replicas);
        summary.adapters_per_replica = adapters_per_replica;
        Ok(summary)
    }
}

/// The one seam to the simulator's fleet driver: one replica runs the engine directly
/// (`slora_sim::simulate`); more go through `slora_sim::fleet` (one request stream, the
/// router in front, each replica the engine core).
mod fleet {
    use super::Config;
    use crate::spec::RouterChoice;
    use slora_sim::fleet::{simulate_fleet, FleetResult, FleetSpec, RouterPolicy};
    use slora_sim::{RunResult, RunSetup};

    fn policy(router: RouterChoice) -> RouterPolicy {
        match router {
            RouterChoice::RoundRobin => RouterPolicy::RoundRobin,
            RouterChoice::LeastOutstanding => RouterPolicy::LeastOutstanding,
            RouterChoice::AdapterAffinity => RouterPolicy::AdapterAffinity,
        }
    }

    /// The run, and for a fleet the mean distinct adapters routed to each replica.
    pub(super) fn simulate_replicas(
        setup: &RunSetup,
        config: &Config,
        affinity_slack: f64,
    ) -> Result<(RunResult, Option<f64>), String> {
        if config.replicas == 1 {
            return slora_sim::simulate(setup, None)
                .map(|run| (run, None))
                .map_err(|e| e.to_string());
        }
        let spec = FleetSpec {
            replicas: config.replicas,
            router: policy(config.router.unwrap_or(RouterChoice::AdapterAffinity)),
            affinity_slack,
        };
        let FleetResult {
            combined,
            per_replica,
            ..
        } = simulate_fleet(setup, &spec, None).map_err(|e| e.to_string())?;
        let adapters = per_replica
            .iter()
            .map(|r| f64::from(r.distinct_adapters))
            .sum::<f64>()
            / per_replica.len().max(1) as f64;
        Ok((combined, Some(adapters)))
    }
}

/// Summarises a run and says what limits it. `scenario` is the run's (for the policy
/// limits), `replicas` how many engines shared its steps.
pub fn summarize(run: &RunResult, scenario: &Scenario, replicas: u32) -> RunSummary {
    let m = &run.metrics;
    let busy: f64 = run.steps.iter().map(|s| s.duration.0 as f64).sum();
    let window_ns = m.throughput.window_s * 1e9 * replicas.max(1) as f64;
    let queued: Vec<&StepRecord> = run.steps.iter().filter(|s| s.waiting > 0).collect();
    let queued_ns: f64 = queued.iter().map(|s| s.duration.0 as f64).sum();
    let while_queued = |f: &dyn Fn(&StepRecord) -> f64| -> f64 {
        if queued_ns > 0.0 {
            queued
                .iter()
                .map(|s| f(s) * s.duration.0 as f64)
                .sum::<f64>()
                / queued_ns
        } else {
            0.0
        }
    };
    let capacity = m.pool.capacity_pages.max(1) as f64;
    let breakdown_total: f64 = m.step_time_breakdown_s.values().sum();
    let part = |name: &str| m.step_time_breakdown_s.get(name).copied().unwrap_or(0.0);
    let share = |part: f64| {
        if breakdown_total > 0.0 {
            part / breakdown_total
        } else {
            0.0
        }
    };
    let mut summary = RunSummary {
        meets_slo: m.meets_slo,
        slo_attainment: m.slo_attainment,
        submitted: m.requests.submitted,
        completed: m.requests.completed,
        aborted: m.requests.aborted,
        rejected: m.requests.rejected,
        preemptions: m.requests.preemptions,
        requests_per_s: m.throughput.requests_per_s,
        output_tokens_per_s: m.throughput.output_tokens_per_s,
        ttft_p50_s: m.ttft_s.p50,
        ttft_p99_s: m.ttft_s.p99,
        tpot_p50_s: m.tpot_s.p50,
        tpot_p99_s: m.tpot_s.p99,
        e2e_p99_s: m.e2e_s.p99,
        mean_batch_size: m.batch.mean_batch_size,
        gpu_busy: if window_ns > 0.0 {
            busy / window_ns
        } else {
            0.0
        },
        queued_share: if busy > 0.0 { queued_ns / busy } else { 0.0 },
        pool_used_while_queued: while_queued(&|s| (s.kv_pages + s.adapter_pages) as f64 / capacity),
        adapter_loads: m.adapter_traffic.loads,
        adapter_h2d_share: share(part("adapter_h2d")),
        tp_communication_share: share(part("tp_communication")),
        bottleneck: None,
        bottleneck_detail: String::new(),
        adapters_per_replica: None,
    };
    if m.requests.submitted > 0 {
        let limits = Limits {
            max_batch_size: scenario.policy.max_batch_size,
            max_prefill_tokens: scenario.policy.max_prefill_tokens,
            max_adapters_per_batch: scenario.policy.max_adapters_per_batch,
            admission: scenario.policy.admission,
        };
        let batch_q = while_queued(&|s| (s.prefill_requests + s.decode_requests) as f64);
        let distinct_q = while_queued(&|s| s.distinct_adapters as f64);
        let prefill_full_q = while_queued(&|s| {
            f64::from(u8::from(
                s.prefill_tokens as f64 >= 0.8 * limits.max_prefill_tokens as f64,
            ))
        });
        let (b, detail) = classify(&summary, &limits, batch_q, distinct_q, prefill_full_q);
        summary.bottleneck = Some(b);
        summary.bottleneck_detail = detail;
    }
    summary
}

/// The policy limits a run was under.
struct Limits {
    max_batch_size: u32,
    max_prefill_tokens: u32,
    max_adapters_per_batch: Option<u32>,
    admission: Admission,
}

/// What limits a run, from its summary and step-time-weighted means over the steps with
/// requests waiting (`batch_q` requests per step, `distinct_q` adapters per step,
/// `prefill_full_q` the share of those steps whose prefill used 80%+ of its budget). The
/// first rule that applies wins:
///
/// 1. queueing under 5% of step time: the SLO is missed per request (`PerRequestLatency`);
/// 2. adapter loads 15%+ of step time: `AdapterThrashing`;
/// 3. distinct adapters per batch at 90%+ of their cap: `AdapterCap`;
/// 4. batch at 90%+ of `max_batch_size`, or prefill at its budget in half the queued steps:
///    `Compute`;
/// 5. otherwise requests wait with batch room and prefill budget to spare, which in this
///    engine means pages: preemptions, a nearly full pool, or worst-case reservations
///    (`KvMemory`).
fn classify(
    s: &RunSummary,
    limits: &Limits,
    batch_q: f64,
    distinct_q: f64,
    prefill_full_q: f64,
) -> (Bottleneck, String) {
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
    // Tensor-parallel collectives are compute-side time worth naming when they weigh.
    let tp = if s.tp_communication_share >= 0.05 {
        format!(
            "; TP all-reduces take {} of step time",
            pct(s.tp_communication_share)
        )
    } else {
        String::new()
    };
    if s.queued_share < 0.05 {
        return (
            Bottleneck::PerRequestLatency,
            format!(
                "requests miss the SLO without queueing (requests wait in {} of step time): \
                 TTFT p99 {:.3} s, TPOT p99 {:.4} s at a mean batch of {:.0}",
                pct(s.queued_share),
                s.ttft_p99_s,
                s.tpot_p99_s,
                s.mean_batch_size
            ),
        );
    }
    if s.adapter_h2d_share >= 0.15 {
        return (
            Bottleneck::AdapterThrashing,
            format!(
                "adapter loads take {} of step time ({} loads for {} requests)",
                pct(s.adapter_h2d_share),
                s.adapter_loads,
                s.submitted
            ),
        );
    }
    if let Some(cap) = limits.max_adapters_per_batch {
        if distinct_q >= 0.9 * cap as f64 {
            return (
                Bottleneck::AdapterCap,
                format!(
                    "batches hold {distinct_q:.0} distinct adapters against a cap of {cap} \
                     while requests wait"
                ),
            );
        }
    }
    if batch_q >= 0.9 * limits.max_batch_size as f64 {
        return (
            Bottleneck::Compute,
            format!(
                "batches are full ({batch_q:.0} of max_batch_size {}) and the GPUs busy {} of \
                 the time{tp}",
                limits.max_batch_size,
                pct(s.gpu_busy)
            ),
        );
    }
    if prefill_full_q >= 0.5 {
        return (
            Bottleneck::Compute,
            format!(
                "prompt processing: {} of the steps with requests waiting use their full \
                 prefill budget ({} tokens); the GPUs are busy {} of the time{tp}",
                pct(prefill_full_q),
                limits.max_prefill_tokens,
                pct(s.gpu_busy)
            ),
        );
    }
    let how = if s.preemptions > 0 {
        format!("{} preemptions", s.preemptions)
    } else if limits.admission == Admission::Conservative {
        "conservative admission reserves each request's worst-case pages".to_string()
    } else {
        "the pool is full".to_string()
    };
    (
        Bottleneck::KvMemory,
        format!(
            "requests wait with room in the batch ({batch_q:.0} of {}): KV and adapters fill {} \
             of the page pool and {how}",
            limits.max_batch_size,
            pct(s.pool_used_while_queued)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_batch_size: 256,
            max_prefill_tokens: 4096,
            max_adapters_per_batch: Some(32),
            admission: Admission::Conservative,
        }
    }

    fn queued() -> RunSummary {
        RunSummary {
            queued_share: 0.6,
            submitted: 1000,
            ..RunSummary::default()
        }
    }

    #[test]
    fn the_first_matching_rule_names_the_bottleneck() {
        let l = limits();
        let calm = RunSummary {
            queued_share: 0.01,
            ..queued()
        };
        assert_eq!(
            classify(&calm, &l, 10.0, 5.0, 0.0).0,
            Bottleneck::PerRequestLatency
        );
        let loads = RunSummary {
            adapter_h2d_share: 0.3,
            ..queued()
        };
        assert_eq!(
            classify(&loads, &l, 250.0, 31.0, 1.0).0,
            Bottleneck::AdapterThrashing
        );
        assert_eq!(
            classify(&queued(), &l, 100.0, 31.0, 0.0).0,
            Bottleneck::AdapterCap
        );
        assert_eq!(
            classify(&queued(), &l, 250.0, 10.0, 0.0).0,
            Bottleneck::Compute
        );
        assert_eq!(
            classify(&queued(), &l, 100.0, 10.0, 0.7).0,
            Bottleneck::Compute
        );
        let (b, detail) = classify(&queued(), &l, 100.0, 10.0, 0.1);
        assert_eq!(b, Bottleneck::KvMemory);
        assert!(detail.contains("worst-case"), "{detail}");
    }
}
