//! What a plan searches and against which targets: the scenario's `plan:` section
//! ([`PlanSpec`], documented field by field in `docs/scenarios.md`), command-line overrides
//! ([`PlanOverrides`]), and the two merged and checked ([`PlanConfig`]).
//!
//! Every check on user values happens in [`PlanConfig::resolve`], before anything runs:
//! unknown GPUs, a target rate that is not a positive number, knob values the scenario schema
//! rejects, a scenario without a latency SLO or without an arrival rate to vary.

use serde::{Deserialize, Serialize};
use slora_engine::Admission;
use slora_sim::cost::{self, GpuSpec};
use slora_sim::scenario::PoolLayoutSpec;
use slora_sim::{Scenario, ScenarioError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tensor-parallel degrees a plan may try (GPUs per replica).
pub const TENSOR_PARALLEL_DEGREES: [u32; 4] = [1, 2, 4, 8];

/// Bad input to a plan: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// `field` is `plan.<name>` for a value from the scenario, `--flag` for one from the
    /// command line.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// How the fleet's router sends each request to a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterChoice {
    /// Replica `i mod n` for the `i`-th request.
    RoundRobin,
    /// The replica with the fewest requests in flight.
    LeastOutstanding,
    /// The adapter's home replica, unless home is busier than `affinity_slack` times the
    /// least-loaded replica (then the least loaded).
    AdapterAffinity,
}

impl RouterChoice {
    pub fn name(self) -> &'static str {
        match self {
            RouterChoice::RoundRobin => "round_robin",
            RouterChoice::LeastOutstanding => "least_outstanding",
            RouterChoice::AdapterAffinity => "adapter_affinity",
        }
    }

    pub fn parse(text: &str) -> Result<RouterChoice, String> {
        match text.trim().replace('-', "_").to_ascii_lowercase().as_str() {
            "round_robin" => Ok(RouterChoice::RoundRobin),
            "least_outstanding" => Ok(RouterChoice::LeastOutstanding),
            "adapter_affinity" => Ok(RouterChoice::AdapterAffinity),
            _ => Err(format!(
                "unknown router `{text}`; known: round_robin, least_outstanding, adapter_affinity"
            )),
        }
    }
}

/// One value or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Policy knobs to try, each a list of values (absent: the scenario's own value). Every
/// combination is tried on one replica of each GPU kind and TP degree; the best carries over
/// to fleets of that kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobSpec {
    /// `policy.max_prefill_tokens` values.
    #[serde(default)]
    pub max_prefill_tokens: Option<Vec<u32>>,
    /// `policy.max_adapters_per_batch` values; `null` is no cap.
    #[serde(default)]
    pub max_adapters_per_batch: Option<Vec<Option<u32>>>,
    /// `policy.admission` values: `conservative`, `optimistic`.
    #[serde(default)]
    pub admission: Option<Vec<Admission>>,
    /// `policy.early_abort` values (true needs `slo.ttft_s`).
    #[serde(default)]
    pub early_abort: Option<Vec<bool>>,
    /// `memory.pool_layout` values: `unified`, `{ separate: { adapter_slots: N } }`.
    #[serde(default)]
    pub pool: Option<Vec<PoolKnob>>,
}

/// A `memory.pool_layout` value as the `plan.knobs.pool` list writes it: `unified` or
/// `{ separate: { adapter_slots: N } }` (a plain mapping; the scenario's own field takes
/// serde_yaml's tagged form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PoolKnob {
    Named(PoolName),
    Separate { separate: AdapterSlots },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolName {
    Unified,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSlots {
    pub adapter_slots: u32,
}

impl PoolKnob {
    pub fn layout(&self) -> PoolLayoutSpec {
        match self {
            PoolKnob::Named(PoolName::Unified) => PoolLayoutSpec::Unified,
            PoolKnob::Separate { separate } => PoolLayoutSpec::Separate {
                adapter_slots: separate.adapter_slots,
            },
        }
    }
}

/// How each search runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettingsSpec {
    /// Relative granularity of every bisection (default 0.02).
    #[serde(default)]
    pub granularity: Option<f64>,
    /// Simulated seconds of arrivals per evaluation (default 120).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Least requests per evaluation: at low rates the duration stretches to reach it
    /// (default 200).
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// Ceiling of the adapters-at-target search (default 16 × `adapters`).
    #[serde(default)]
    pub max_adapters: Option<u32>,
    /// Ceiling of the rate searches, req/s (default 100 × `target_rate`).
    #[serde(default)]
    pub max_rate: Option<f64>,
}

/// The scenario's `plan:` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Requests per second the whole deployment must sustain within the SLO.
    #[serde(default)]
    pub target_rate: Option<f64>,
    /// Adapters to serve (default: `adapters.count`).
    #[serde(default)]
    pub adapters: Option<u32>,
    /// GPU catalogue keys to consider (default: the scenario's `gpu`).
    #[serde(default)]
    pub gpus: Option<Vec<String>>,
    /// Tensor-parallel degrees (GPUs per replica) to consider (default: the scenario's).
    #[serde(default)]
    pub tensor_parallel: Option<Vec<u32>>,
    /// Replica counts tried: 1 to this (default 8).
    #[serde(default)]
    pub max_replicas: Option<u32>,
    /// Most GPUs in one configuration (TP × replicas; default: no limit).
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Most USD per hour a recommendation may cost (default: no limit).
    #[serde(default)]
    pub budget_usd_per_hour: Option<f64>,
    /// USD per GPU-hour by catalogue key, replacing the catalogue's price.
    #[serde(default)]
    pub prices_usd_per_gpu_hour: BTreeMap<String, f64>,
    /// The fleet's router, or a list to compare (default `adapter_affinity`).
    #[serde(default)]
    pub router: Option<OneOrMany<RouterChoice>>,
    /// Adapter-affinity routing sends a request away from its adapter's home replica when
    /// home would hold more than this many times the least-loaded replica's outstanding
    /// requests (default 3, the fleet driver's; at least 1).
    #[serde(default)]
    pub affinity_slack: Option<f64>,
    #[serde(default)]
    pub knobs: KnobSpec,
    /// Adapter counts of the capacity chart (default: adapters / 100, / 10, × 1, × 2, × 4).
    #[serde(default)]
    pub capacity_adapters: Option<Vec<u32>>,
    #[serde(default)]
    pub search: SearchSettingsSpec,
    /// Recommendations listed (default 5).
    #[serde(default)]
    pub top: Option<usize>,
}

/// Reads only the `plan:` section of a scenario text, so its errors carry YAML lines.
#[derive(Deserialize)]
struct PlanOnly {
    #[serde(default)]
    plan: Option<PlanSpec>,
}

impl PlanSpec {
    /// The `plan:` section of scenario text (an empty spec when there is none).
    pub fn from_scenario_text(text: &str, path: &Path) -> Result<PlanSpec, PlanError> {
        let only: PlanOnly = serde_yaml::from_str(text).map_err(|e| PlanError::Parse {
            path: path.to_path_buf(),
            message: describe_yaml_error(&e),
        })?;
        Ok(only.plan.unwrap_or_default())
    }
}

fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let mut msg = e.to_string();
    if let Some(loc) = e.location() {
        if !msg.contains("line") {
            msg = format!("{msg} (line {}, column {})", loc.line(), loc.column());
        }
    }
    msg
}

/// Values from the command line; each replaces the `plan:` section's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanOverrides {
    pub target_rate: Option<f64>,
    pub adapters: Option<u32>,
    pub gpus: Option<Vec<String>>,
    pub tensor_parallel: Option<Vec<u32>>,
    pub max_replicas: Option<u32>,
    pub max_gpus: Option<u32>,
    pub budget_usd_per_hour: Option<f64>,
    pub routers: Option<Vec<RouterChoice>>,
    pub granularity: Option<f64>,
    pub duration_s: Option<f64>,
    pub seed: Option<u64>,
    pub top: Option<usize>,
}

/// One combination of policy knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Knobs {
    pub max_prefill_tokens: u32,
    pub max_adapters_per_batch: Option<u32>,
    pub admission: Admission,
    pub early_abort: bool,
    pub pool: PoolLayoutSpec,
}

impl Knobs {
    /// The scenario's own knobs.
    pub fn of(s: &Scenario) -> Knobs {
        Knobs {
            max_prefill_tokens: s.policy.max_prefill_tokens,
            max_adapters_per_batch: s.policy.max_adapters_per_batch,
            admission: s.policy.admission,
            early_abort: s.policy.early_abort,
            pool: s.memory.pool_layout.clone(),
        }
    }

    /// Sets these knobs on `s`.
    pub fn apply(&self, s: &mut Scenario) {
        s.policy.max_prefill_tokens = self.max_prefill_tokens;
        s.policy.max_adapters_per_batch = self.max_adapters_per_batch;
        s.policy.admission = self.admission;
        s.policy.early_abort = self.early_abort;
        s.memory.pool_layout = self.pool.clone();
    }

    /// `prefill 4096, no adapter cap, conservative, early abort, unified pool`.
    pub fn describe(&self) -> String {
        format!(
            "prefill {}, {}, {}, {}, {}",
            self.max_prefill_tokens,
            match self.max_adapters_per_batch {
                Some(n) => format!("≤ {n} adapters/batch"),
                None => "no adapter cap".into(),
            },
            match self.admission {
                Admission::Conservative => "conservative",
                Admission::Optimistic => "optimistic",
            },
            if self.early_abort {
                "early abort"
            } else {
                "no early abort"
            },
            match &self.pool {
                PoolLayoutSpec::Unified => "unified pool".to_string(),
                PoolLayoutSpec::Separate { adapter_slots } =>
                    format!("separate pool ({adapter_slots} adapter slots)"),
            }
        )
    }
}

/// Where a price comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceSource {
    /// The GPU catalogue's list price (`sim/src/cost.rs` cites it).
    Catalogue,
    /// The scenario's `plan.prices_usd_per_gpu_hour`.
    Scenario,
}

/// A GPU kind the plan considers, with its price.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuChoice {
    pub key: &'static str,
    pub name: &'static str,
    pub usd_per_gpu_hour: f64,
    pub price_source: PriceSource,
}

/// Everything a plan needs, merged from the scenario, its `plan:` section and the flags, and
/// checked.
#[derive(Clone, Debug, Serialize)]
pub struct PlanConfig {
    pub target_rate: f64,
    pub adapters: u32,
    pub gpus: Vec<GpuChoice>,
    pub tensor_parallel: Vec<u32>,
    /// Replica counts tried, ascending (already cut to `max_gpus`).
    pub max_replicas: u32,
    pub max_gpus: Option<u32>,
    pub budget_usd_per_hour: Option<f64>,
    pub routers: Vec<RouterChoice>,
    pub affinity_slack: f64,
    /// Every combination of the knob lists, the scenario's own first when it is among them.
    pub knobs: Vec<Knobs>,
    pub capacity_adapters: Vec<u32>,
    pub granularity: f64,
    pub duration_s: f64,
    pub min_requests: u64,
    pub max_adapters: u32,
    pub max_rate: f64,
    pub top: usize,
    pub seed: u64,
}

/// Most knob combinations a plan accepts: each costs a search per GPU kind and TP degree.
pub const MAX_KNOB_COMBINATIONS: usize = 256;

impl PlanConfig {
    /// Merges `spec` and `flags` over `base` (flags win) and checks every value. `path` names
    /// the scenario file in errors.
    pub fn resolve(
        base: &Scenario,
        spec: &PlanSpec,
        flags: &PlanOverrides,
        path: &Path,
    ) -> Result<PlanConfig, PlanError> {
        // The field a value came from: the flag when given, else the plan section's.
        let field = |flag: &str, given: bool, name: &str| {
            if given {
                flag.to_string()
            } else {
                format!("plan.{name}")
            }
        };
        let bad = |field: String, reason: String| PlanError::Invalid {
            path: path.to_path_buf(),
            field,
            reason,
        };

        if base.slo.ttft_s.is_none() && base.slo.tpot_s.is_none() && base.slo.e2e_s.is_none() {
            return Err(bad(
                "slo".into(),
                "a plan needs a latency objective to meet: set at least one of `slo.ttft_s`, \
                 `slo.tpot_s`, `slo.e2e_s`"
                    .into(),
            ));
        }
        if base.workload.trace.is_some() || base.offered_rate().is_none() {
            return Err(bad(
                "workload.arrivals".into(),
                "a plan varies the request rate, so it needs `workload.arrivals` \
                 (`poisson` or `gamma` with a rate); trace replay is not supported by plan"
                    .into(),
            ));
        }

        let f = field("--target-rate", flags.target_rate.is_some(), "target_rate");
        let target_rate = flags.target_rate.or(spec.target_rate).ok_or_else(|| {
            bad(
                "plan.target_rate".into(),
                "is required (in the scenario's `plan:` section or as --target-rate): the \
                     request rate, per second, the deployment must sustain"
                    .into(),
            )
        })?;
        if !(target_rate.is_finite() && target_rate > 0.0) {
            return Err(bad(
                f,
                format!("must be a request rate > 0 (requests per second), got {target_rate}"),
            ));
        }

        let f = field("--adapters", flags.adapters.is_some(), "adapters");
        let adapters = flags
            .adapters
            .or(spec.adapters)
            .unwrap_or(base.adapters.count);
        if adapters == 0 {
            return Err(bad(
                f,
                "must be at least 1: the plan sizes a deployment for a number of adapters".into(),
            ));
        }
        if base.adapters.ranks.is_empty() {
            return Err(bad(
                "adapters.ranks".into(),
                "must list at least one rank".into(),
            ));
        }

        let f = field("--gpus", flags.gpus.is_some(), "gpus");
        let keys = flags
            .gpus
            .clone()
            .or_else(|| spec.gpus.clone())
            .unwrap_or_else(|| vec![base.gpu.clone()]);
        if keys.is_empty() {
            return Err(bad(f, "must name at least one GPU".into()));
        }
        let mut prices = BTreeMap::new();
        for (key, price) in &spec.prices_usd_per_gpu_hour {
            let gpu = cost::find_gpu(key)
                .map_err(|e| bad(format!("plan.prices_usd_per_gpu_hour.{key}"), e.to_string()))?;
            if !(price.is_finite() && *price >= 0.0) {
                return Err(bad(
                    format!("plan.prices_usd_per_gpu_hour.{key}"),
                    format!("must be a price >= 0 (USD per GPU-hour), got {price}"),
                ));
            }
            prices.insert(gpu.key, *price);
        }
        let mut gpus: Vec<GpuChoice> = Vec::new();
        for key in &keys {
            let gpu: &'static GpuSpec =
                cost::find_gpu(key).map_err(|e| bad(f.clone(), e.to_string()))?;
            if gpus.iter().any(|g| g.key == gpu.key) {
                continue;
            }
            let (usd, source) = match prices.get(gpu.key) {
                Some(p) => (*p, PriceSource::Scenario),
                None => (gpu.price_per_hour_usd, PriceSource::Catalogue),
            };
            gpus.push(GpuChoice {
                key: gpu.key,
                name: gpu.name,
                usd_per_gpu_hour: usd,
                price_source: source,
            });
        }

        let f = field("--tp", flags.tensor_parallel.is_some(), "tensor_parallel");
        let mut tensor_parallel = flags
            .tensor_parallel
            .clone()
            .or_else(|| spec.tensor_parallel.clone())
            .unwrap_or_else(|| vec![base.tensor_parallel]);
        tensor_parallel.sort_unstable();
        tensor_parallel.dedup();
        if tensor_parallel.is_empty() {
            return Err(bad(f, "must list at least one degree".into()));
        }
        if let Some(tp) = tensor_parallel
            .iter()
            .find(|tp| !TENSOR_PARALLEL_DEGREES.contains(tp))
        {
            return Err(bad(
                f,
                format!("{tp} is not a tensor-parallel degree; use {TENSOR_PARALLEL_DEGREES:?}"),
            ));
        }

        let f = field(
            "--max-replicas",
            flags.max_replicas.is_some(),
            "max_replicas",
        );
        let max_replicas = flags.max_replicas.or(spec.max_replicas).unwrap_or(8);
        if !(1..=1024).contains(&max_replicas) {
            return Err(bad(f, format!("must be in 1..=1024, got {max_replicas}")));
        }
        let f = field("--max-gpus", flags.max_gpus.is_some(), "max_gpus");
        let max_gpus = flags.max_gpus.or(spec.max_gpus);
        if let Some(n) = max_gpus {
            if n == 0 {
                return Err(bad(f, "must be at least 1".into()));
            }
            if tensor_parallel.iter().all(|tp| *tp > n) {
                return Err(bad(
                    f,
                    format!(
                        "{n} GPUs cannot hold one replica at any tensor-parallel degree tried \
                         ({tensor_parallel:?})"
                    ),
                ));
            }
        }
        let f = field(
            "--budget",
            flags.budget_usd_per_hour.is_some(),
            "budget_usd_per_hour",
        );
        let budget_usd_per_hour = flags.budget_usd_per_hour.or(spec.budget_usd_per_hour);
        if let Some(b) = budget_usd_per_hour {
            if !(b.is_finite() && b > 0.0) {
                return Err(bad(f, format!("must be USD per hour > 0, got {b}")));
            }
        }

        let mut routers = flags
            .routers
            .clone()
            .or_else(|| spec.router.as_ref().map(OneOrMany::to_vec))
            .unwrap_or_else(|| vec![RouterChoice::AdapterAffinity]);
        routers.sort();
        routers.dedup();
        if routers.is_empty() {
            return Err(bad(
                field("--router", flags.routers.is_some(), "router"),
                "must name at least one router".into(),
            ));
        }
        let affinity_slack = spec.affinity_slack.unwrap_or(3.0);
        if !(affinity_slack.is_finite() && affinity_slack >= 1.0) {
            return Err(bad(
                "plan.affinity_slack".into(),
                format!("must be a number >= 1, got {affinity_slack}"),
            ));
        }

        let knobs = knob_combinations(base, &spec.knobs);
        if knobs.len() > MAX_KNOB_COMBINATIONS {
            return Err(bad(
                "plan.knobs".into(),
                format!(
                    "gives {} combinations; at most {MAX_KNOB_COMBINATIONS} are allowed (each is \
                     searched on every GPU kind and TP degree)",
                    knobs.len()
                ),
            ));
        }
        // Each combination must make a valid scenario (engine limits, early abort's SLO).
        for k in &knobs {
            let mut s = base.clone();
            k.apply(&mut s);
            s.validate(path).map_err(|e| {
                bad(
                    "plan.knobs".into(),
                    format!(
                        "the combination `{}` is not a valid scenario: {e}",
                        k.describe()
                    ),
                )
            })?;
        }

        let mut capacity_adapters = spec.capacity_adapters.clone().unwrap_or_else(|| {
            [
                adapters / 100,
                adapters / 10,
                adapters,
                adapters * 2,
                adapters * 4,
            ]
            .to_vec()
        });
        capacity_adapters.retain(|&n| n > 0);
        capacity_adapters.push(adapters);
        capacity_adapters.sort_unstable();
        capacity_adapters.dedup();
        if capacity_adapters.len() > 32 {
            return Err(bad(
                "plan.capacity_adapters".into(),
                format!(
                    "lists {} counts; at most 32 are allowed",
                    capacity_adapters.len()
                ),
            ));
        }

        let s = &spec.search;
        let f = field(
            "--granularity",
            flags.granularity.is_some(),
            "search.granularity",
        );
        let granularity = flags.granularity.or(s.granularity).unwrap_or(0.02);
        if !(granularity.is_finite() && (0.001..=0.5).contains(&granularity)) {
            return Err(bad(
                f,
                format!("must be a relative step in [0.001, 0.5] (0.02 = 2%), got {granularity}"),
            ));
        }
        let f = field(
            "--duration",
            flags.duration_s.is_some(),
            "search.duration_s",
        );
        let duration_s = flags.duration_s.or(s.duration_s).unwrap_or(120.0);
        if !(duration_s.is_finite() && (1.0..=86_400.0).contains(&duration_s)) {
            return Err(bad(
                f,
                format!("must be simulated seconds in [1, 86400], got {duration_s}"),
            ));
        }
        let min_requests = s.min_requests.unwrap_or(200);
        if !(1..=1_000_000).contains(&min_requests) {
            return Err(bad(
                "plan.search.min_requests".into(),
                format!("must be in 1..=1000000, got {min_requests}"),
            ));
        }
        let max_adapters = s.max_adapters.unwrap_or(adapters.saturating_mul(16));
        if max_adapters < adapters {
            return Err(bad(
                "plan.search.max_adapters".into(),
                format!("must be at least `adapters` ({adapters}), got {max_adapters}"),
            ));
        }
        let max_rate = s.max_rate.unwrap_or(target_rate * 100.0);
        if !(max_rate.is_finite() && max_rate >= target_rate) {
            return Err(bad(
                "plan.search.max_rate".into(),
                format!("must be at least the target rate ({target_rate}), got {max_rate}"),
            ));
        }
        let top = flags.top.or(spec.top).unwrap_or(5);
        if top == 0 {
            return Err(bad(
                field("--top", flags.top.is_some(), "top"),
                "must be at least 1".into(),
            ));
        }
        Ok(PlanConfig {
            target_rate,
            adapters,
            gpus,
            tensor_parallel,
            max_replicas,
            max_gpus,
            budget_usd_per_hour,
            routers,
            affinity_slack,
            knobs,
            capacity_adapters,
            granularity,
            duration_s,
            min_requests,
            max_adapters,
            max_rate,
            top,
            seed: flags.seed.unwrap_or(base.seed),
        })
    }

    /// Replica counts tried for one tensor-parallel degree: 1 to `max_replicas`, keeping
    /// `tp × replicas` within `max_gpus`.
    pub fn replicas_for(&self, tp: u32) -> Vec<u32> {
        let cap = self
            .max_gpus
            .map_or(self.max_replicas, |g| (g / tp).min(self.max_replicas));
        (1..=cap).collect()
    }
}

/// Every combination of the knob lists; a list left out keeps the scenario's value. The
/// scenario's own combination comes first when it is among them (ties in the screening go to
/// it), the rest in list order with the last knob varying fastest.
fn knob_combinations(base: &Scenario, spec: &KnobSpec) -> Vec<Knobs> {
    let own = Knobs::of(base);
    let prefill = spec
        .max_prefill_tokens
        .clone()
        .unwrap_or_else(|| vec![own.max_prefill_tokens]);
    let cap = spec
        .max_adapters_per_batch
        .clone()
        .unwrap_or_else(|| vec![own.max_adapters_per_batch]);
    let admission = spec
        .admission
        .clone()
        .unwrap_or_else(|| vec![own.admission]);
    let abort = spec
        .early_abort
        .clone()
        .unwrap_or_else(|| vec![own.early_abort]);
    let pool = spec.pool.as_ref().map_or_else(
        || vec![own.pool.clone()],
        |list| list.iter().map(PoolKnob::layout).collect(),
    );
    let mut all = Vec::new();
    for &p in &prefill {
        for &c in &cap {
            for &a in &admission {
                for &e in &abort {
                    for l in &pool {
                        let k = Knobs {
                            max_prefill_tokens: p,
                            max_adapters_per_batch: c,
                            admission: a,
                            early_abort: e,
                            pool: l.clone(),
                        };
                        if !all.contains(&k) {
                            all.push(k);
                        }
                    }
                }
            }
        }
    }
    if let Some(i) = all.iter().position(|k| *k == own) {
        let k = all.remove(i);
        all.insert(0, k);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = "name: t\nmodel: llama-7b\ngpu: h200\n\
        adapters: { count: 100, ranks: [8, 16] }\n\
        workload:\n  arrivals: { process: poisson, rate: 5 }\n  duration_s: 20\n  \
        input: { dist: fixed, value: 64 }\n  output: { dist: fixed, value: 32 }\n\
        slo: { ttft_s: 1.0 }\n";

    fn base() -> Scenario {
        serde_yaml::from_str(SCENARIO).unwrap()
    }

    fn resolve(spec: &PlanSpec, flags: &PlanOverrides) -> Result<PlanConfig, PlanError> {
        PlanConfig::resolve(&base(), spec, flags, Path::new("t.yaml"))
    }

    fn with_target(rate: f64) -> PlanSpec {
        PlanSpec {
            target_rate: Some(rate),
            ..PlanSpec::default()
        }
    }

    #[test]
    fn defaults_come_from_the_scenario() {
        let c = resolve(&with_target(10.0), &PlanOverrides::default()).unwrap();
        assert_eq!(c.adapters, 100);
        assert_eq!(c.gpus.len(), 1);
        assert_eq!(c.gpus[0].key, "h200");
        assert_eq!(c.gpus[0].price_source, PriceSource::Catalogue);
        assert_eq!(c.tensor_parallel, vec![1]);
        assert_eq!(c.knobs, vec![Knobs::of(&base())]);
        assert_eq!(c.capacity_adapters, vec![1, 10, 100, 200, 400]);
        assert_eq!(c.replicas_for(1), (1..=8).collect::<Vec<_>>());
        assert_eq!(c.granularity, 0.02);
    }

    #[test]
    fn flags_win_over_the_plan_section() {
        let spec = PlanSpec {
            gpus: Some(vec!["h200".into()]),
            max_gpus: Some(4),
            ..with_target(10.0)
        };
        let flags = PlanOverrides {
            target_rate: Some(20.0),
            gpus: Some(vec!["a100-80g".into(), "H100".into(), "a100_80g".into()]),
            tensor_parallel: Some(vec![2, 1, 2]),
            ..PlanOverrides::default()
        };
        let c = resolve(&spec, &flags).unwrap();
        assert_eq!(c.target_rate, 20.0);
        let keys: Vec<&str> = c.gpus.iter().map(|g| g.key).collect();
        assert_eq!(keys, vec!["a100-80g", "h100-sxm"]);
        assert_eq!(c.tensor_parallel, vec![1, 2]);
        assert_eq!(c.replicas_for(2), vec![1, 2]);
        assert_eq!(c.replicas_for(1), vec![1, 2, 3, 4]);
    }

    #[test]
    fn bad_values_name_their_source() {
        let flags = PlanOverrides {
            target_rate: Some(0.0),
            ..PlanOverrides::default()
        };
        let e = resolve(&with_target(10.0), &flags).unwrap_err().to_string();
        assert!(e.contains("--target-rate") && e.contains("> 0"), "{e}");
        let e = resolve(&PlanSpec::default(), &PlanOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plan.target_rate") && e.contains("required"),
            "{e}"
        );
        let spec = PlanSpec {
            gpus: Some(vec!["h300".into()]),
            ..with_target(1.0)
        };
        let e = resolve(&spec, &PlanOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plan.gpus") && e.contains("h300") && e.contains("a100-80g"),
            "{e}"
        );
        let spec = PlanSpec {
            tensor_parallel: Some(vec![3]),
            ..with_target(1.0)
        };
        let e = resolve(&spec, &PlanOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor_parallel") && e.contains('3'), "{e}");
        let mut spec = with_target(1.0);
        spec.prices_usd_per_gpu_hour.insert("tpu".into(), 1.0);
        let e = resolve(&spec, &PlanOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prices_usd_per_gpu_hour.tpu"), "{e}");
    }

    #[test]
    fn a_plan_needs_a_latency_slo_and_a_rate() {
        let mut s = base();
        s.slo.ttft_s = None;
        let e = PlanConfig::resolve(
            &s,
            &with_target(1.0),
            &PlanOverrides::default(),
            Path::new("t"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("slo.ttft_s"), "{e}");
    }

    #[test]
    fn knob_lists_multiply_and_the_scenarios_own_comes_first() {
        let spec = PlanSpec {
            knobs: KnobSpec {
                max_prefill_tokens: Some(vec![2048, 4096]),
                early_abort: Some(vec![true, false]),
                pool: Some(vec![
                    PoolKnob::Separate {
                        separate: AdapterSlots { adapter_slots: 8 },
                    },
                    PoolKnob::Named(PoolName::Unified),
                ]),
                ..KnobSpec::default()
            },
            ..with_target(1.0)
        };
        let c = resolve(&spec, &PlanOverrides::default()).unwrap();
        assert_eq!(c.knobs.len(), 8);
        assert_eq!(c.knobs[0], Knobs::of(&base()));
    }

    #[test]
    fn the_plan_section_parses_with_lines_in_errors() {
        let text = format!(
            "{SCENARIO}plan:\n  target_rate: 30\n  gpus: [h200, l40s]\n  router: [round_robin, adapter_affinity]\n  \
             knobs:\n    max_adapters_per_batch: [null, 32]\n    pool: [unified, {{ separate: {{ adapter_slots: 64 }} }}]\n"
        );
        let spec = PlanSpec::from_scenario_text(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(spec.target_rate, Some(30.0));
        assert_eq!(
            spec.router.unwrap().to_vec(),
            vec![RouterChoice::RoundRobin, RouterChoice::AdapterAffinity]
        );
        assert_eq!(
            spec.knobs.max_adapters_per_batch,
            Some(vec![None, Some(32)])
        );
        let pools: Vec<PoolLayoutSpec> = spec
            .knobs
            .pool
            .unwrap()
            .iter()
            .map(PoolKnob::layout)
            .collect();
        assert_eq!(
            pools,
            vec![
                PoolLayoutSpec::Unified,
                PoolLayoutSpec::Separate { adapter_slots: 64 }
            ]
        );
        let text = format!("{SCENARIO}plan:\n  target_rate: 30\n  gpu_kinds: [h200]\n");
        let e = PlanSpec::from_scenario_text(&text, Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu_kinds") && e.contains("line"), "{e}");
    }
}
