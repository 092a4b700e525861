//! The plan: which configurations to search, in which order, and how the results rank.
//!
//! # Stages
//!
//! 1. **Knob screening** (one replica per GPU kind and TP degree): the scenario's own knobs
//!    first, from the scenario's rate (bracket step 2), then every other knob combination from
//!    that knee (step 1.25). The combination with the highest rate at the SLO is the kind's
//!    *best knobs*; ties go to the earlier combination, so the scenario's own wins a tie.
//! 2. **Deployments**: for each kind with its best knobs, one replica (from stage 1) and
//!    fleets of 2 to `max_replicas` replicas (within `max_gpus`) per router, searched from
//!    `replicas ×` the one-replica rate (step 1.25). Then, for each deployment not already
//!    known to fail at or below the target, one evaluation **at the target rate**; if it
//!    meets, the largest adapter count it serves there (integer search from `adapters`,
//!    step 2, up to `max_adapters`).
//! 3. **Capacity curves** (beside stage 2): for each kind, one replica with its best knobs,
//!    the highest rate at each of `capacity_adapters`.
//!
//! Every search start depends on the configuration and the scenario, never on the target,
//! so the rates found do not move when only the target does. Stages 1, 2 and 3 each run
//! their searches in parallel over the cores (rayon); each search is sequential.
//!
//! # Ranking
//!
//! [`rank`] is pure: a deployment qualifies when its evaluation at the target rate meets the
//! SLO; within the budget, the cheapest per hour comes first, then more headroom, fewer
//! GPUs, lower p99 TTFT, and candidate order.

use crate::evaluate::{Bottleneck, Config, Evaluator, RunSummary};
use crate::search::{find_knee, Knee, SearchSpec, SearchTrace};
use crate::spec::{GpuChoice, Knobs, PlanConfig, PriceSource, RouterChoice};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use slora_sim::cost::{CalibrationProfile, Provenance};
use slora_sim::metrics::SloTargets;
use slora_sim::Scenario;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bracketing step of a search started from a guess (a knee of a related configuration).
const NEAR_STEP: f64 = 1.25;
/// Bracketing step of a search started far from its knee.
const FAR_STEP: f64 = 2.0;

/// One evaluation within a search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Offered request rate of the whole deployment, req/s.
    pub rate: f64,
    pub adapters: u32,
    pub summary: RunSummary,
}

/// A search for the highest rate meeting the SLO at a fixed adapter count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateSearch {
    pub adapters: u32,
    pub start: f64,
    pub knee: Knee,
    pub probes: Vec<ProbeRecord>,
}

/// A search for the most adapters served within the SLO at the target rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSearch {
    pub rate: f64,
    pub knee: Knee,
    pub probes: Vec<ProbeRecord>,
}

/// What goes wrong just past a limit: the first failing evaluation above it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breaking {
    /// The rate (req/s) or adapter count of that evaluation.
    pub at: f64,
    pub bottleneck: Option<Bottleneck>,
    pub detail: String,
    pub slo_attainment: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A deployment: ranked for the recommendation.
    Deployment,
    /// A knob combination on one replica that lost the screening to the kind's best knobs.
    KnobScreening,
}

/// One configuration and everything found about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: usize,
    pub role: Role,
    pub config: Config,
    pub gpu_name: String,
    pub gpus: u32,
    pub knobs_text: String,
    pub usd_per_gpu_hour: f64,
    pub price_source: PriceSource,
    /// `usd_per_gpu_hour × gpus`.
    pub usd_per_hour: f64,
    /// `calibrated` on a GPU with a measured profile, `derived` from datasheets.
    pub provenance: Option<Provenance>,
    pub cost_model: Option<String>,
    /// Why it could not be evaluated (model does not fit, TP degree not modelled, ...).
    pub infeasible: Option<String>,
    pub rate_search: Option<RateSearch>,
    /// Highest rate that met the SLO (req/s); see `definitions.meets`.
    pub max_rate: Option<f64>,
    /// Even the search's ceiling met the SLO: the capacity is at least `max_rate`.
    pub max_rate_is_lower_bound: bool,
    pub breaks_first: Option<Breaking>,
    /// The evaluation at the target rate with the target adapter count.
    pub at_target: Option<RunSummary>,
    pub meets_target: bool,
    /// `max_rate / target_rate`.
    pub headroom: Option<f64>,
    /// `usd_per_hour / (output tokens per second at the target × 3600) × 1e6`.
    pub usd_per_million_output_tokens: Option<f64>,
    pub adapter_search: Option<AdapterSearch>,
    pub max_adapters_at_target: Option<u32>,
    pub max_adapters_is_lower_bound: bool,
    pub adapters_break_first: Option<Breaking>,
    pub within_budget: bool,
}

impl Candidate {
    fn new(id: usize, role: Role, config: Config, gpu: &GpuChoice) -> Candidate {
        let gpus = config.gpus();
        Candidate {
            id,
            role,
            gpu_name: gpu.name.to_string(),
            gpus,
            knobs_text: config.knobs.describe(),
            usd_per_gpu_hour: gpu.usd_per_gpu_hour,
            price_source: gpu.price_source,
            usd_per_hour: gpu.usd_per_gpu_hour * gpus as f64,
            config,
            provenance: None,
            cost_model: None,
            infeasible: None,
            rate_search: None,
            max_rate: None,
            max_rate_is_lower_bound: false,
            breaks_first: None,
            at_target: None,
            meets_target: false,
            headroom: None,
            usd_per_million_output_tokens: None,
            adapter_search: None,
            max_adapters_at_target: None,
            max_adapters_is_lower_bound: false,
            adapters_break_first: None,
            within_budget: true,
        }
    }

    /// `2 × h200 (TP 1, adapter_affinity)`, `1 × a100-80g (TP 2)`.
    pub fn label(&self) -> String {
        let c = &self.config;
        let router = c
            .router
            .map(|r| format!(", {}", r.name()))
            .unwrap_or_default();
        format!(
            "{} × {} (TP {}{router})",
            c.replicas, c.gpu, c.tensor_parallel
        )
    }

    fn set_rate_search(&mut self, search: RateSearch, target: f64) {
        self.max_rate = search.knee.value();
        self.max_rate_is_lower_bound = matches!(search.knee, Knee::AtLeast { .. });
        self.headroom = self.max_rate.map(|r| r / target);
        self.breaks_first = first_failure(&search.probes, |p| p.rate);
        if self.max_rate.is_none() && self.infeasible.is_none() {
            self.infeasible = Some(format!(
                "does not meet the SLO at any rate tried down to {} req/s{}",
                short(search.knee.first_failure().unwrap_or(0.0)),
                self.breaks_first
                    .as_ref()
                    .map(|b| format!(": {}", b.detail))
                    .unwrap_or_default()
            ));
        }
        self.rate_search = Some(search);
    }
}

/// The highest rate at the SLO of one GPU kind and TP degree for one adapter count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityPoint {
    pub adapters: u32,
    pub max_rate: Option<f64>,
    pub is_lower_bound: bool,
    pub infeasible: Option<String>,
    pub search: Option<RateSearch>,
}

/// One line of the capacity chart: one replica of a GPU kind and TP degree, best knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityCurve {
    pub gpu: String,
    pub tensor_parallel: u32,
    pub knobs: Knobs,
    pub points: Vec<CapacityPoint>,
}

/// One step of a cost curve: rates up to `up_to_rate` cost `usd_per_hour`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostStep {
    pub up_to_rate: f64,
    pub usd_per_hour: f64,
    pub candidate: usize,
}

/// The cheapest deployment for each rate: of one GPU kind and TP degree, or of all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostCurve {
    pub label: String,
    /// `None` for the curve over every kind.
    pub gpu: Option<String>,
    pub tensor_parallel: Option<u32>,
    /// Ascending in both rate and cost.
    pub steps: Vec<CostStep>,
}

/// A ranked recommendation (the figures are the candidate's, copied for reading).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub rank: usize,
    pub candidate: usize,
    pub label: String,
    pub gpu: String,
    pub gpus: u32,
    pub tensor_parallel: u32,
    pub replicas: u32,
    pub router: Option<RouterChoice>,
    pub knobs: String,
    pub max_rate: f64,
    pub max_rate_is_lower_bound: bool,
    pub headroom: f64,
    pub usd_per_hour: f64,
    pub usd_per_million_output_tokens: Option<f64>,
    pub provenance: Option<Provenance>,
    pub price_source: PriceSource,
    pub ttft_p99_at_target_s: f64,
    pub tpot_p99_at_target_s: f64,
    pub max_adapters_at_target: Option<u32>,
    pub max_adapters_is_lower_bound: bool,
}

/// The plan's answer in one word, with what it rests on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    /// At least one deployment meets the target within the budget.
    Recommended,
    /// Deployments meet the target, but none within the budget.
    OverBudget {
        budget_usd_per_hour: f64,
        cheapest_usd_per_hour: f64,
        cheapest_candidate: usize,
    },
    /// No deployment tried meets the target rate.
    NoneMeetsTarget {
        /// The highest rate any deployment sustains, and which.
        best_max_rate: Option<f64>,
        best_candidate: Option<usize>,
    },
}

/// How far the top recommendation grows, and what then.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Growth {
    pub candidate: usize,
    pub max_rate: Option<f64>,
    pub rate_limit: Option<Breaking>,
    pub max_adapters: Option<u32>,
    pub adapter_limit: Option<Breaking>,
    /// The cheapest deployment whose highest rate is at least twice the target.
    pub for_twice_the_target: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    pub rate: f64,
    pub adapters: u32,
    pub budget_usd_per_hour: Option<f64>,
    pub max_gpus: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchSettings {
    pub granularity: f64,
    pub duration_s: f64,
    pub min_requests: u64,
    pub max_adapters: u32,
    pub max_rate: f64,
    pub seed: u64,
    pub gpus: Vec<String>,
    pub tensor_parallel: Vec<u32>,
    pub max_replicas: u32,
    pub routers: Vec<RouterChoice>,
    pub affinity_slack: f64,
    pub knob_combinations: usize,
    pub capacity_adapters: Vec<u32>,
}

/// Everything a plan found: `plan.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanResult {
    pub scenario: String,
    pub verdict: Verdict,
    pub targets: Targets,
    pub slo: SloTargets,
    pub search: SearchSettings,
    /// Simulations run.
    pub simulations: u64,
    pub recommendations: Vec<Recommendation>,
    pub growth: Option<Growth>,
    pub candidates: Vec<Candidate>,
    pub capacity_curves: Vec<CapacityCurve>,
    pub cost_curves: Vec<CostCurve>,
    /// Deployments meeting the target on the cost / p99 TTFT Pareto front, cheapest first.
    pub pareto: Vec<usize>,
    pub notes: Vec<String>,
    pub definitions: BTreeMap<String, String>,
}

impl PlanResult {
    pub fn candidate(&self, id: usize) -> Option<&Candidate> {
        self.candidates.get(id)
    }
}

/// How far a plan has got: searches finished of those planned, and simulations run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanProgress {
    pub searches_done: u64,
    pub searches_total: u64,
    pub simulations: u64,
}

pub type ProgressFn<'a> = &'a (dyn Fn(PlanProgress) + Sync);

/// Runs the plan: every search of the module documentation, then the ranking. Failures of
/// single configurations are recorded on them (`infeasible`), never fatal.
pub fn run_plan(
    base: &Scenario,
    path: &Path,
    config: &PlanConfig,
    profiles: &[CalibrationProfile],
    progress: Option<ProgressFn<'_>>,
) -> PlanResult {
    let ev = Evaluator::new(
        base,
        path,
        profiles,
        config.seed,
        config.duration_s,
        config.min_requests,
        config.affinity_slack,
    );
    let base_rate = base.offered_rate().unwrap_or(config.target_rate);
    let n = config.adapters;
    let kinds: Vec<(&GpuChoice, u32)> = config
        .gpus
        .iter()
        .flat_map(|g| config.tensor_parallel.iter().map(move |&tp| (g, tp)))
        .collect();

    // Every search planned, for the progress bar: screening, deployments (rate search and
    // target), capacity points.
    let fleets_per_kind =
        |tp: u32| config.replicas_for(tp).iter().filter(|&&r| r > 1).count() * config.routers.len();
    let total: u64 = kinds
        .iter()
        .map(|&(_, tp)| {
            (config.knobs.len() + 1 + fleets_per_kind(tp) + config.capacity_adapters.len() - 1)
                as u64
        })
        .sum();
    let done = AtomicU64::new(0);
    let tick = || {
        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(report) = progress {
            report(PlanProgress {
                searches_done: d,
                searches_total: total,
                simulations: ev.simulations(),
            });
        }
    };
    let searcher = Searcher {
        ev: &ev,
        config,
        floor: base_rate.min(config.target_rate) / 1000.0,
    };

    // Stage 1: knob screening, one replica per kind.
    let mut candidates: Vec<Candidate> = Vec::new();
    for &(gpu, tp) in &kinds {
        for knobs in &config.knobs {
            let c = Config {
                gpu: gpu.key.to_string(),
                tensor_parallel: tp,
                replicas: 1,
                router: None,
                knobs: knobs.clone(),
            };
            candidates.push(Candidate::new(
                candidates.len(),
                Role::KnobScreening,
                c,
                gpu,
            ));
        }
    }
    let per_kind = config.knobs.len();
    let first_of_kind: Vec<usize> = (0..kinds.len()).map(|k| k * per_kind).collect();
    let screened: Vec<Candidate> = first_of_kind
        .par_iter()
        .map(|&i| {
            let mut c = candidates[i].clone();
            searcher.search_rate(&mut c, n, base_rate, FAR_STEP);
            tick();
            c
        })
        .collect();
    for c in screened {
        let id = c.id;
        candidates[id] = c;
    }
    let others: Vec<usize> = (0..candidates.len())
        .filter(|i| i % per_kind != 0)
        .collect();
    let screened: Vec<Candidate> = others
        .par_iter()
        .map(|&i| {
            let mut c = candidates[i].clone();
            let own = &candidates[i - i % per_kind];
            let start = own.max_rate.unwrap_or(base_rate);
            let step = if own.max_rate.is_some() {
                NEAR_STEP
            } else {
                FAR_STEP
            };
            searcher.search_rate(&mut c, n, start, step);
            tick();
            c
        })
        .collect();
    for c in screened {
        let id = c.id;
        candidates[id] = c;
    }
    // The best knobs of each kind: highest rate at the SLO; the earlier combination on a tie.
    let best: Vec<usize> = (0..kinds.len())
        .map(|k| {
            let range = k * per_kind..(k + 1) * per_kind;
            range.clone().fold(range.start, |best, i| {
                if candidates[i].max_rate.unwrap_or(-1.0)
                    > candidates[best].max_rate.unwrap_or(-1.0)
                {
                    i
                } else {
                    best
                }
            })
        })
        .collect();
    for &b in &best {
        candidates[b].role = Role::Deployment;
    }

    // Stage 2 and 3: deployments and capacity points, all in parallel.
    enum Job {
        /// A one-replica deployment from stage 1: the target part only.
        Target(usize),
        /// A fleet: rate search, then the target part.
        Fleet(usize),
        Capacity {
            kind: usize,
            adapters: u32,
        },
    }
    let mut jobs = Vec::new();
    for (k, &(gpu, tp)) in kinds.iter().enumerate() {
        let single = best[k];
        jobs.push(Job::Target(single));
        for r in config.replicas_for(tp).into_iter().filter(|&r| r > 1) {
            for &router in &config.routers {
                let c = Config {
                    replicas: r,
                    router: Some(router),
                    ..candidates[single].config.clone()
                };
                let id = candidates.len();
                candidates.push(Candidate::new(id, Role::Deployment, c, gpu));
                jobs.push(Job::Fleet(id));
            }
        }
        for &count in config.capacity_adapters.iter().filter(|&&c| c != n) {
            jobs.push(Job::Capacity {
                kind: k,
                adapters: count,
            });
        }
    }
    enum Done {
        Candidate(Box<Candidate>),
        Capacity { kind: usize, point: CapacityPoint },
    }
    let single_of_kind: BTreeMap<(String, u32), usize> = kinds
        .iter()
        .enumerate()
        .map(|(k, &(g, tp))| ((g.key.to_string(), tp), best[k]))
        .collect();
    let finished: Vec<Done> = jobs
        .par_iter()
        .map(|job| {
            let out = match *job {
                Job::Target(i) => {
                    let mut c = candidates[i].clone();
                    searcher.at_target(&mut c);
                    Done::Candidate(Box::new(c))
                }
                Job::Fleet(i) => {
                    let mut c = candidates[i].clone();
                    let single = &candidates
                        [single_of_kind[&(c.config.gpu.clone(), c.config.tensor_parallel)]];
                    let (start, step) = match single.max_rate {
                        Some(r) => (r * c.config.replicas as f64, NEAR_STEP),
                        None => (base_rate, FAR_STEP),
                    };
                    searcher.search_rate(&mut c, n, start, step);
                    searcher.at_target(&mut c);
                    Done::Candidate(Box::new(c))
                }
                Job::Capacity { kind, adapters } => {
                    let mut c = candidates[best[kind]].clone();
                    let (start, step) = match c.max_rate {
                        Some(r) => (r, FAR_STEP),
                        None => (base_rate, FAR_STEP),
                    };
                    c.infeasible = None;
                    c.rate_search = None;
                    c.max_rate = None;
                    c.max_rate_is_lower_bound = false;
                    searcher.search_rate(&mut c, adapters, start, step);
                    Done::Capacity {
                        kind,
                        point: CapacityPoint {
                            adapters,
                            max_rate: c.max_rate,
                            is_lower_bound: c.max_rate_is_lower_bound,
                            infeasible: c.infeasible,
                            search: c.rate_search,
                        },
                    }
                }
            };
            tick();
            out
        })
        .collect();

    let mut curves: Vec<CapacityCurve> = kinds
        .iter()
        .enumerate()
        .map(|(k, &(g, tp))| {
            let c = &candidates[best[k]];
            CapacityCurve {
                gpu: g.key.to_string(),
                tensor_parallel: tp,
                knobs: c.config.knobs.clone(),
                points: Vec::new(),
            }
        })
        .collect();
    for d in finished {
        match d {
            Done::Candidate(c) => {
                let id = c.id;
                candidates[id] = *c;
            }
            Done::Capacity { kind, point } => curves[kind].points.push(point),
        }
    }
    for (k, curve) in curves.iter_mut().enumerate() {
        let c = &candidates[best[k]];
        curve.points.push(CapacityPoint {
            adapters: n,
            max_rate: c.max_rate,
            is_lower_bound: c.max_rate_is_lower_bound,
            infeasible: c.infeasible.clone(),
            search: None,
        });
        curve.points.sort_by_key(|p| p.adapters);
    }

    let mut notes = Vec::new();
    if !base.sweep.is_empty() {
        notes.push(
            "the scenario's `sweep:` is ignored: a plan searches its own dimensions".to_string(),
        );
    }
    let ranked = rank(&mut candidates, config);
    let cost_curves = cost_curves(&candidates, &kinds);
    let pareto = pareto_front(&candidates);
    let growth = ranked.0.first().map(|r| {
        let c = &candidates[r.candidate];
        Growth {
            candidate: c.id,
            max_rate: c.max_rate,
            rate_limit: c.breaks_first.clone(),
            max_adapters: c.max_adapters_at_target,
            adapter_limit: c.adapters_break_first.clone(),
            for_twice_the_target: cheapest_for(&candidates, 2.0 * config.target_rate, config),
        }
    });
    PlanResult {
        scenario: base.name.clone(),
        verdict: ranked.1,
        targets: Targets {
            rate: config.target_rate,
            adapters: n,
            budget_usd_per_hour: config.budget_usd_per_hour,
            max_gpus: config.max_gpus,
        },
        slo: base.slo_targets(),
        search: SearchSettings {
            granularity: config.granularity,
            duration_s: config.duration_s,
            min_requests: config.min_requests,
            max_adapters: config.max_adapters,
            max_rate: config.max_rate,
            seed: config.seed,
            gpus: config.gpus.iter().map(|g| g.key.to_string()).collect(),
            tensor_parallel: config.tensor_parallel.clone(),
            max_replicas: config.max_replicas,
            routers: config.routers.clone(),
            affinity_slack: config.affinity_slack,
            knob_combinations: config.knobs.len(),
            capacity_adapters: config.capacity_adapters.clone(),
        },
        simulations: ev.simulations(),
        recommendations: ranked.0,
        growth,
        candidates,
        capacity_curves: curves,
        cost_curves,
        pareto,
        notes,
        definitions: definitions(config),
    }
}

/// Runs the searches of one candidate.
struct Searcher<'a, 'b> {
    ev: &'a Evaluator<'b>,
    config: &'a PlanConfig,
    floor: f64,
}

impl Searcher<'_, '_> {
    /// The highest rate at the SLO with `adapters` adapters, from `start` with bracketing
    /// `step`; sets the candidate's cost provenance, or why it cannot run.
    fn search_rate(&self, c: &mut Candidate, adapters: u32, start: f64, step: f64) {
        let start = start.clamp(self.floor, self.config.max_rate);
        match self.ev.check(&c.config, start, adapters) {
            Ok((provenance, description)) => {
                c.provenance = Some(provenance);
                c.cost_model = Some(description);
            }
            Err(reason) => {
                c.infeasible = Some(reason);
                return;
            }
        }
        let spec = SearchSpec {
            start,
            step,
            granularity: self.config.granularity,
            floor: self.floor,
            ceiling: self.config.max_rate,
            integer: false,
        };
        let config = &c.config;
        let result = find_knee(&spec, |rate| {
            self.ev
                .run(config, rate, adapters)
                .map(|s| (s.meets_slo, s))
        });
        match result {
            Ok(trace) => {
                c.set_rate_search(rate_search(adapters, start, trace), self.config.target_rate)
            }
            Err(reason) => c.infeasible = Some(reason),
        }
    }

    /// The evaluation at the target rate and, if it meets, the adapter search. Skipped when
    /// the rate search already failed at or below the target.
    fn at_target(&self, c: &mut Candidate) {
        let target = self.config.target_rate;
        let n = self.config.adapters;
        let Some(search) = &c.rate_search else {
            return;
        };
        if c.infeasible.is_some()
            || search
                .probes
                .iter()
                .any(|p| !p.summary.meets_slo && p.rate <= target)
        {
            return;
        }
        let at_target = match self.ev.run(&c.config, target, n) {
            Ok(s) => s,
            Err(reason) => {
                c.infeasible = Some(reason);
                return;
            }
        };
        c.meets_target = at_target.meets_slo;
        if at_target.output_tokens_per_s > 0.0 {
            c.usd_per_million_output_tokens =
                Some(c.usd_per_hour / (at_target.output_tokens_per_s * 3600.0) * 1e6);
        }
        c.at_target = Some(at_target.clone());
        if !c.meets_target {
            return;
        }
        let spec = SearchSpec {
            start: n as f64,
            step: FAR_STEP,
            granularity: self.config.granularity,
            floor: n as f64,
            ceiling: self.config.max_adapters as f64,
            integer: true,
        };
        let config = &c.config;
        let result = find_knee(&spec, |count| {
            let count = count as u32;
            if count == n {
                return Ok((true, (count, at_target.clone())));
            }
            self.ev
                .run(config, target, count)
                .map(|s| (s.meets_slo, (count, s)))
        });
        match result {
            Ok(trace) => {
                let probes: Vec<ProbeRecord> = trace
                    .probes
                    .into_iter()
                    .map(|p| ProbeRecord {
                        rate: target,
                        adapters: p.detail.0,
                        summary: p.detail.1,
                    })
                    .collect();
                c.max_adapters_at_target = trace.knee.value().map(|v| v as u32);
                c.max_adapters_is_lower_bound = matches!(trace.knee, Knee::AtLeast { .. });
                c.adapters_break_first = first_failure(&probes, |p| p.adapters as f64);
                c.adapter_search = Some(AdapterSearch {
                    rate: target,
                    knee: trace.knee,
                    probes,
                });
            }
            Err(reason) => c.infeasible = Some(reason),
        }
    }
}

fn rate_search(adapters: u32, start: f64, trace: SearchTrace<RunSummary>) -> RateSearch {
    RateSearch {
        adapters,
        start,
        knee: trace.knee,
        probes: trace
            .probes
            .into_iter()
            .map(|p| ProbeRecord {
                rate: p.value,
                adapters,
                summary: p.detail,
            })
            .collect(),
    }
}

/// The failing probe with the smallest `key` (rate or adapter count).
fn first_failure(probes: &[ProbeRecord], key: impl Fn(&ProbeRecord) -> f64) -> Option<Breaking> {
    probes
        .iter()
        .filter(|p| !p.summary.meets_slo)
        .min_by(|a, b| key(a).total_cmp(&key(b)))
        .map(|p| Breaking {
            at: key(p),
            bottleneck: p.summary.bottleneck,
            detail: p.summary.bottleneck_detail.clone(),
            slo_attainment: p.summary.slo_attainment,
        })
}

/// Ranks the deployments that meet the target (see the module documentation) and marks
/// each candidate's `within_budget`. Pure: the same candidates give the same ranking.
pub fn rank(candidates: &mut [Candidate], config: &PlanConfig) -> (Vec<Recommendation>, Verdict) {
    for c in candidates.iter_mut() {
        c.within_budget = config
            .budget_usd_per_hour
            .is_none_or(|b| c.usd_per_hour <= b + 1e-9);
    }
    let mut meeting: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.role == Role::Deployment && c.meets_target)
        .collect();
    meeting.sort_by(|a, b| {
        a.usd_per_hour
            .total_cmp(&b.usd_per_hour)
            .then(
                b.headroom
                    .unwrap_or(0.0)
                    .total_cmp(&a.headroom.unwrap_or(0.0)),
            )
            .then(a.gpus.cmp(&b.gpus))
            .then(ttft_p99(a).total_cmp(&ttft_p99(b)))
            .then(a.id.cmp(&b.id))
    });
    let within: Vec<&Candidate> = meeting
        .iter()
        .copied()
        .filter(|c| c.within_budget)
        .collect();
    let recommendations: Vec<Recommendation> = within
        .iter()
        .take(config.top)
        .enumerate()
        .map(|(i, c)| recommendation(i + 1, c))
        .collect();
    let verdict = if !within.is_empty() {
        Verdict::Recommended
    } else if let Some(cheapest) = meeting.first() {
        Verdict::OverBudget {
            budget_usd_per_hour: config.budget_usd_per_hour.unwrap_or(0.0),
            cheapest_usd_per_hour: cheapest.usd_per_hour,
            cheapest_candidate: cheapest.id,
        }
    } else {
        let best = candidates
            .iter()
            .filter(|c| c.role == Role::Deployment && c.max_rate.is_some())
            .max_by(|a, b| {
                a.max_rate
                    .unwrap_or(0.0)
                    .total_cmp(&b.max_rate.unwrap_or(0.0))
                    .then(b.id.cmp(&a.id))
            });
        Verdict::NoneMeetsTarget {
            best_max_rate: best.and_then(|c| c.max_rate),
            best_candidate: best.map(|c| c.id),
        }
    };
    (recommendations, verdict)
}

fn ttft_p99(c: &Candidate) -> f64 {
    c.at_target.as_ref().map_or(f64::INFINITY, |s| s.ttft_p99_s)
}

fn recommendation(rank: usize, c: &Candidate) -> Recommendation {
    let t = c.at_target.clone().unwrap_or_default();
    Recommendation {
        rank,
        candidate: c.id,
        label: c.label(),
        gpu: c.config.gpu.clone(),
        gpus: c.gpus,
        tensor_parallel: c.config.tensor_parallel,
        replicas: c.config.replicas,
        router: c.config.router,
        knobs: c.knobs_text.clone(),
        max_rate: c.max_rate.unwrap_or(0.0),
        max_rate_is_lower_bound: c.max_rate_is_lower_bound,
        headroom: c.headroom.unwrap_or(0.0),
        usd_per_hour: c.usd_per_hour,
        usd_per_million_output_tokens: c.usd_per_million_output_tokens,
        provenance: c.provenance,
        price_source: c.price_source,
        ttft_p99_at_target_s: t.ttft_p99_s,
        tpot_p99_at_target_s: t.tpot_p99_s,
        max_adapters_at_target: c.max_adapters_at_target,
        max_adapters_is_lower_bound: c.max_adapters_is_lower_bound,
    }
}

/// The cheapest deployment (within the budget) whose highest rate at the SLO reaches `rate`.
fn cheapest_for(candidates: &[Candidate], rate: f64, config: &PlanConfig) -> Option<usize> {
    candidates
        .iter()
        .filter(|c| c.role == Role::Deployment && c.max_rate.is_some_and(|r| r >= rate))
        .filter(|c| {
            config
                .budget_usd_per_hour
                .is_none_or(|b| c.usd_per_hour <= b + 1e-9)
        })
        .min_by(|a, b| {
            a.usd_per_hour
                .total_cmp(&b.usd_per_hour)
                .then(a.gpus.cmp(&b.gpus))
                .then(a.id.cmp(&b.id))
        })
        .map(|c| c.id)
}

/// Staircases of the cheapest deployment per rate: one per GPU kind and TP degree, and one
/// over all (first). A deployment is a step when it sustains more than every cheaper one.
pub fn cost_curves(candidates: &[Candidate], kinds: &[(&GpuChoice, u32)]) -> Vec<CostCurve> {
    let staircase = |filter: &dyn Fn(&Candidate) -> bool| -> Vec<CostStep> {
        let mut pool: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.role == Role::Deployment && c.max_rate.is_some() && filter(c))
            .collect();
        pool.sort_by(|a, b| {
            a.usd_per_hour
                .total_cmp(&b.usd_per_hour)
                .then(
                    b.max_rate
                        .unwrap_or(0.0)
                        .total_cmp(&a.max_rate.unwrap_or(0.0)),
                )
                .then(a.id.cmp(&b.id))
        });
        let mut steps: Vec<CostStep> = Vec::new();
        for c in pool {
            let rate = c.max_rate.unwrap_or(0.0);
            if steps.last().is_none_or(|s| rate > s.up_to_rate) {
                steps.push(CostStep {
                    up_to_rate: rate,
                    usd_per_hour: c.usd_per_hour,
                    candidate: c.id,
                });
            }
        }
        steps
    };
    let mut curves = vec![CostCurve {
        label: "cheapest of all".to_string(),
        gpu: None,
        tensor_parallel: None,
        steps: staircase(&|_| true),
    }];
    for &(g, tp) in kinds {
        curves.push(CostCurve {
            label: format!("{} TP {tp}", g.key),
            gpu: Some(g.key.to_string()),
            tensor_parallel: Some(tp),
            steps: staircase(&|c: &Candidate| {
                c.config.gpu == g.key && c.config.tensor_parallel == tp
            }),
        });
    }
    curves
}

/// Deployments meeting the target that no other beats on both cost per hour and p99 TTFT at
/// the target, cheapest first.
pub fn pareto_front(candidates: &[Candidate]) -> Vec<usize> {
    let mut meeting: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.role == Role::Deployment && c.meets_target)
        .collect();
    meeting.sort_by(|a, b| {
        a.usd_per_hour
            .total_cmp(&b.usd_per_hour)
            .then(ttft_p99(a).total_cmp(&ttft_p99(b)))
            .then(a.id.cmp(&b.id))
    });
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for c in meeting {
        if ttft_p99(c) < best {
            best = ttft_p99(c);
            front.push(c.id);
        }
    }
    front
}

/// Four significant digits without trailing zeros.
pub(crate) fn short(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 12) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// The definitions `plan.json` and the reports state.
fn definitions(config: &PlanConfig) -> BTreeMap<String, String> {
    let g = config.granularity * 100.0;
    [
        ("meets", format!(
            "a configuration meets the SLO at a rate when one simulation of it, {} s of arrivals \
             at that rate (longer at low rates, to reach {} requests) with the scenario's seed, \
             has SLO attainment >= the scenario's attainment target: that share of submitted \
             requests completed within every latency limit set (aborted and rejected requests \
             miss)",
            short(config.duration_s), config.min_requests
        )),
        ("max_rate", format!(
            "highest request rate (req/s, whole deployment) found to meet the SLO: a bracketing \
             search then bisection at the geometric mean until the lowest failing rate is \
             within {}% of the highest meeting one; the capacity lies in [max_rate, max_rate \
             × {}). Searches start from the configuration's own related knee, never from the \
             target",
            short(g), short(1.0 + config.granularity)
        )),
        ("meets_target", "the deployment's own evaluation at exactly the target rate with the target adapter count meets the SLO".to_string()),
        ("headroom", "max_rate / target rate".to_string()),
        ("max_adapters_at_target", format!(
            "most adapters served at the target rate within the SLO: integer search from the \
             target count, doubling, then bisection to {}% (or one adapter), up to {}",
            short(g), config.max_adapters
        )),
        ("usd_per_hour", "GPUs × price per GPU-hour (catalogue list price unless the scenario's plan.prices_usd_per_gpu_hour sets it)".to_string()),
        ("usd_per_million_output_tokens", "USD per hour / (output tokens per second completed at the target rate × 3600) × 1e6".to_string()),
        ("provenance", "calibrated: step costs measured on that GPU by `slora-plan calibrate`; derived: a roofline from datasheet numbers".to_string()),
        ("ranking", "deployments meeting the target within the budget, cheapest per hour first; then more headroom, fewer GPUs, lower p99 TTFT at the target".to_string()),
        ("knob_screening", "every knob combination is searched on one replica of each GPU kind and TP degree with the target adapter count; the highest max_rate wins (the scenario's own knobs on a tie) and is used for that kind's fleets".to_string()),
        ("breaks_first", "at the lowest failing evaluation above a limit: requests miss without queueing -> per-request latency; adapter loads >= 15% of step time -> adapter thrashing; distinct adapters >= 90% of their cap -> the adapter cap; batches >= 90% of max_batch_size or the prefill budget full -> compute; otherwise requests wait for pages -> memory for KV".to_string()),
        ("pareto", "deployments meeting the target that no other beats on both USD per hour and p99 TTFT at the target rate".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{PlanOverrides, PlanSpec};

    fn config(target: f64, budget: Option<f64>) -> PlanConfig {
        let base: Scenario = serde_yaml::from_str(
            "name: t\nmodel: llama-7b\ngpu: h200\nadapters: { count: 10, ranks: [8] }\n\
             workload:\n  arrivals: { process: poisson, rate: 5 }\n  duration_s: 20\n  \
             input: { dist: fixed, value: 64 }\n  output: { dist: fixed, value: 32 }\n\
             slo: { ttft_s: 1.0 }\n",
        )
        .unwrap();
        let spec = PlanSpec {
            target_rate: Some(target),
            budget_usd_per_hour: budget,
            ..PlanSpec::default()
        };
        PlanConfig::resolve(&base, &spec, &PlanOverrides::default(), Path::new("t")).unwrap()
    }

    fn gpu(key: &'static str, price: f64) -> GpuChoice {
        GpuChoice {
            key,
            name: key,
            usd_per_gpu_hour: price,
            price_source: PriceSource::Catalogue,
        }
    }

    /// A deployment of `replicas` GPUs of `g` whose capacity is `per_gpu × replicas` and
    /// which "meets" any target up to that.
    fn deployment(id: usize, g: &GpuChoice, replicas: u32, per_gpu: f64, target: f64) -> Candidate {
        let cfg = Config {
            gpu: g.key.to_string(),
            tensor_parallel: 1,
            replicas,
            router: None,
            knobs: Knobs::of(&serde_yaml::from_str::<Scenario>(
                "name: t\nmodel: llama-7b\ngpu: h200\nadapters: { count: 1, ranks: [8] }\nworkload: { arrivals: { process: poisson, rate: 1 }, duration_s: 1, input: { dist: fixed, value: 1 }, output: { dist: fixed, value: 1 } }\n",
            ).unwrap()),
        };
        let mut c = Candidate::new(id, Role::Deployment, cfg, g);
        let cap = per_gpu * replicas as f64;
        c.max_rate = Some(cap);
        c.headroom = Some(cap / target);
        c.meets_target = cap >= target;
        c.at_target = Some(RunSummary {
            meets_slo: c.meets_target,
            ttft_p99_s: 1.0 / replicas as f64,
            ..RunSummary::default()
        });
        c
    }

    fn fleet(target: f64) -> Vec<Candidate> {
        let (big, small) = (gpu("big", 4.0), gpu("small", 1.0));
        let mut all = Vec::new();
        for r in 1..=8 {
            all.push(deployment(all.len(), &big, r, 10.0, target));
            all.push(deployment(all.len(), &small, r, 2.0, target));
        }
        all
    }

    #[test]
    fn the_cheapest_deployment_meeting_the_target_ranks_first() {
        let mut c = fleet(12.0);
        let (recs, verdict) = rank(&mut c, &config(12.0, None));
        assert_eq!(verdict, Verdict::Recommended);
        // small: 6 GPUs ($6) reach 12; big: 2 GPUs ($8).
        assert_eq!((recs[0].gpu.as_str(), recs[0].gpus), ("small", 6));
        assert_eq!((recs[1].gpu.as_str(), recs[1].gpus), ("small", 7));
        assert!(recs
            .windows(2)
            .all(|w| w[0].usd_per_hour <= w[1].usd_per_hour));
    }

    #[test]
    fn doubling_the_target_never_costs_less_or_uses_fewer_gpus_of_a_kind() {
        for target in [1.0, 3.0, 7.5, 12.0, 19.0, 30.0] {
            let mut one = fleet(target);
            let mut two = fleet(2.0 * target);
            let (r1, _) = rank(&mut one, &config(target, None));
            let (r2, _) = rank(&mut two, &config(2.0 * target, None));
            if let (Some(a), Some(b)) = (r1.first(), r2.first()) {
                assert!(b.usd_per_hour >= a.usd_per_hour, "target {target}");
            }
            for kind in ["big", "small"] {
                let best = |r: &[Recommendation]| r.iter().find(|x| x.gpu == kind).map(|x| x.gpus);
                let mut c1 = fleet(target);
                let mut c2 = fleet(2.0 * target);
                c1.retain(|c| c.config.gpu == kind);
                c2.retain(|c| c.config.gpu == kind);
                let (r1, _) = rank(&mut c1, &config(target, None));
                let (r2, _) = rank(&mut c2, &config(2.0 * target, None));
                if let (Some(a), Some(b)) = (best(&r1), best(&r2)) {
                    assert!(b >= a, "{kind} at target {target}: {a} then {b} GPUs");
                }
            }
        }
    }

    #[test]
    fn budget_and_impossible_targets_give_a_verdict() {
        let mut c = fleet(12.0);
        let (recs, verdict) = rank(&mut c, &config(12.0, Some(5.0)));
        assert!(recs.is_empty());
        assert!(
            matches!(verdict, Verdict::OverBudget { cheapest_usd_per_hour, .. } if cheapest_usd_per_hour == 6.0)
        );
        let mut c = fleet(1000.0);
        let (recs, verdict) = rank(&mut c, &config(1000.0, None));
        assert!(recs.is_empty());
        assert!(
            matches!(verdict, Verdict::NoneMeetsTarget { best_max_rate: Some(r), .. } if r == 80.0)
        );
    }

    #[test]
    fn cost_curves_climb_and_the_pareto_front_trades_cost_for_latency() {
        let c = fleet(12.0);
        let (big, small) = (gpu("big", 4.0), gpu("small", 1.0));
        let curves = cost_curves(&c, &[(&big, 1), (&small, 1)]);
        assert_eq!(curves.len(), 3);
        for curve in &curves {
            assert!(curve.steps.windows(2).all(
                |w| w[0].up_to_rate < w[1].up_to_rate && w[0].usd_per_hour <= w[1].usd_per_hour
            ));
        }
        assert_eq!(curves[1].steps.len(), 8);
        let front = pareto_front(&c);
        let costs: Vec<f64> = front.iter().map(|&i| c[i].usd_per_hour).collect();
        assert!(costs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(c[front[0]].usd_per_hour, 6.0);
    }
}
