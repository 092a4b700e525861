//! Scenario files: one YAML document describing model, GPU, adapters, traffic, policy and
//! SLOs, with an optional `sweep:` over any of its values. The schema is documented field by
//! field in `docs/scenarios.md`.
//!
//! Errors name the file, the field (serde_yaml gives the path and line) and what is allowed.
//! Every check on user values happens in `Scenario::load`/`Scenario::build`, before a run
//! starts, so a run never fails on bad input halfway.
//!
//! # Which cost model a scenario runs on
//!
//! [`Scenario::build`] picks it, in this order:
//!
//! 1. `efficiency:` given: the derived model ([`AnalyticCost`]) with exactly those factors;
//! 2. `gpu_profile:` given: that profile, which must be of the scenario's model shape and TP
//!    degree: calibrated ([`CalibratedCost`]) when it was measured on the scenario's GPU, derived
//!    with efficiencies fitted to it when it was measured on an H200 and the scenario's GPU is
//!    another; any other GPU is an error;
//! 3. otherwise [`calibrated::cost_model_for`] over the profiles embedded in the binary and the
//!    caller's ([`Scenario::build_with_profiles`]): calibrated when one matches GPU, shape and
//!    TP, else derived with fitted or default efficiencies.

use crate::calibrated::{self, CalibratedCost};
use crate::cost::{
    self, AnalyticCost, BatchShape, CalibrationProfile, CostError, CostModel, Efficiency, GpuSpec,
    Provenance, StepCost,
};
use crate::metrics::SloTargets;
use crate::workload::{self, PopularitySpec, WorkloadError, WorkloadSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use slora_engine::{
    AdapterSpec, Admission, EarlyAbort, EngineConfig, FairnessConfig, FairnessKey, ModelSpec,
    Nanos, PoolLayout, QueueOrder, SchedulerConfig, TargetModule,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bad input in a scenario. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: sweep `{key}`: {reason}")]
    Sweep {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Workload {
        path: PathBuf,
        source: Box<WorkloadError>,
    },
    #[error("{path}: {source}")]
    Cost {
        path: PathBuf,
        source: Box<CostError>,
    },
    #[error("{path}: {source}")]
    Engine {
        path: PathBuf,
        source: Box<slora_engine::ConfigError>,
    },
}

/// A model preset name, a full shape, or `{ path: DIR }` of a Hugging Face model folder (its
/// `config.json` gives the shape; relative to the scenario's folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelChoice {
    Preset(String),
    Custom(ModelSpec),
    Path { path: PathBuf },
}

/// Reads a Llama-family shape from a Hugging Face `config.json` (transformers 4 and 5 names).
fn model_from_config(dir: &Path) -> Result<ModelSpec, String> {
    let file = if dir.extension().is_some_and(|e| e == "json") {
        dir.to_path_buf()
    } else {
        dir.join("config.json")
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
    let int = |key: &str| -> Result<u32, String> {
        v.get(key)
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| {
                format!(
                    "{}: field `{key}` is missing or not a positive integer",
                    file.display()
                )
            })
    };
    let heads = int("num_attention_heads")?;
    let theta = v
        .get("rope_theta")
        .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
        .and_then(|x| x.as_f64())
        .unwrap_or(10_000.0);
    let dtype = match v
        .get("torch_dtype")
        .or_else(|| v.get("dtype"))
        .and_then(|x| x.as_str())
    {
        Some("bfloat16") => slora_engine::DType::Bf16,
        Some("float16") | None => slora_engine::DType::Fp16,
        Some(other) => {
            return Err(format!(
                "{}: dtype `{other}` is not supported (float16 or bfloat16)",
                file.display()
            ))
        }
    };
    Ok(ModelSpec {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        hidden_size: int("hidden_size")?,
        num_layers: int("num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: v
            .get("num_key_value_heads")
            .and_then(|x| x.as_u64())
            .map_or(heads, |x| x as u32),
        intermediate_size: int("intermediate_size")?,
        vocab_size: int("vocab_size")?,
        max_position: int("max_position_embeddings")?,
        rope_theta: theta,
        dtype,
    })
}

/// A GPU from the catalogue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// Fraction of GPU memory the server may use (weights + pool + reserve).
    #[serde(default = "default_utilization")]
    pub utilization: f64,
    /// Memory kept for activations, workspaces and the CUDA context, in GB (1e9 bytes).
    #[serde(default = "default_reserve_gb")]
    pub activation_reserve_gb: f64,
    /// `unified` (S-LoRA) or `separate` with a fixed adapter region.
    #[serde(default)]
    pub pool_layout: PoolLayoutSpec,
}

fn default_utilization() -> f64 {
    0.9
}
fn default_reserve_gb() -> f64 {
    2.0
}

impl Default for MemorySpec {
    fn default() -> Self {
        MemorySpec {
            utilization: default_utilization(),
            activation_reserve_gb: default_reserve_gb(),
            pool_layout: PoolLayoutSpec::Unified,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PoolLayoutSpec {
    #[default]
    Unified,
    /// A fixed region for adapter weights, sized to hold `adapter_slots` adapters of the
    /// largest rank in the population (S-LoRA's "no unified pool" ablation).
    Separate { adapter_slots: u32 },
}

/// The adapter population.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterPopulation {
    pub count: u32,
    /// Ranks to draw from.
    pub ranks: Vec<u32>,
    /// Relative weights of `ranks` (default: equal).
    #[serde(default)]
    pub rank_weights: Option<Vec<f64>>,
    #[serde(default = "default_targets")]
    pub targets: Vec<TargetModule>,
    #[serde(default = "default_popularity")]
    pub popularity: PopularitySpec,
}

fn default_targets() -> Vec<TargetModule> {
    TargetModule::ATTENTION.to_vec()
}
fn default_popularity() -> PopularitySpec {
    PopularitySpec::Uniform
}

/// Fairness settings, user-facing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FairnessSpec {
    #[serde(default)]
    pub key: FairnessKey,
    #[serde(default = "one")]
    pub input_weight: f64,
    #[serde(default = "two")]
    pub output_weight: f64,
    /// Client id (adapter id, or tenant id) → weight.
    #[serde(default)]
    pub weights: BTreeMap<u32, f64>,
}

fn one() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}

impl Default for FairnessSpec {
    fn default() -> Self {
        FairnessSpec {
            key: FairnessKey::Adapter,
            input_weight: 1.0,
            output_weight: 2.0,
            weights: BTreeMap::new(),
        }
    }
}

/// Scheduler policy, user-facing (times in seconds). Maps onto `SchedulerConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySpec {
    pub admission: Admission,
    pub order: QueueOrder,
    pub max_batch_size: u32,
    pub max_prefill_tokens: u32,
    pub chunked_prefill: bool,
    pub clustering: bool,
    pub max_adapters_per_batch: Option<u32>,
    pub max_bypass: u32,
    pub lookahead: u32,
    pub fairness: FairnessSpec,
    /// Drop waiting requests that can no longer meet `slo.ttft_s`.
    pub early_abort: bool,
    pub min_time_to_first_token_s: f64,
    pub newest_first_under_overload: bool,
    pub prefetch_depth: u32,
}

impl Default for PolicySpec {
    fn default() -> Self {
        let d = SchedulerConfig::default();
        PolicySpec {
            admission: d.admission,
            order: d.order,
            max_batch_size: d.max_batch_size,
            max_prefill_tokens: d.max_prefill_tokens,
            chunked_prefill: d.chunked_prefill,
            clustering: d.clustering,
            max_adapters_per_batch: d.max_adapters_per_batch,
            max_bypass: d.max_bypass,
            lookahead: d.lookahead,
            fairness: FairnessSpec::default(),
            early_abort: false,
            min_time_to_first_token_s: 0.0,
            newest_first_under_overload: false,
            prefetch_depth: d.prefetch_depth,
        }
    }
}

/// Latency objectives (seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    #[serde(default)]
    pub ttft_s: Option<f64>,
    #[serde(default)]
    pub tpot_s: Option<f64>,
    #[serde(default)]
    pub e2e_s: Option<f64>,
    #[serde(default = "default_attainment")]
    pub attainment_target: f64,
}

fn default_attainment() -> f64 {
    0.9
}

impl Default for SloSpec {
    fn default() -> Self {
        SloSpec {
            ttft_s: None,
            tpot_s: None,
            e2e_s: None,
            attainment_target: default_attainment(),
        }
    }
}

/// One scenario file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelChoice,
    /// A GPU catalogue key (`h200`, `h100-sxm`, `a100-80g`, ...).
    pub gpu: String,
    #[serde(default = "default_tp")]
    pub tensor_parallel: u32,
    #[serde(default)]
    pub memory: MemorySpec,
    /// Override of the derived cost model's efficiency factors. Selects the derived model
    /// whatever calibration profiles exist; excludes `gpu_profile`.
    #[serde(default)]
    pub efficiency: Option<Efficiency>,
    /// A calibration profile (JSON from `slora-plan calibrate`) to take step costs from,
    /// relative to the scenario's folder. See the module documentation for how it is used.
    #[serde(default)]
    pub gpu_profile: Option<PathBuf>,
    pub adapters: AdapterPopulation,
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub policy: PolicySpec,
    #[serde(default)]
    pub slo: SloSpec,
    /// `dotted.path: [values...]`: the scenario is run once per combination.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<serde_yaml::Value>>,
    /// The `plan:` section of `slora-plan plan` (its schema and checks are the planner's,
    /// crate `slora-planner`); kept as raw YAML here so a scenario with one also simulates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_yaml::Value>,
}

fn default_seed() -> u64 {
    42
}
fn default_tp() -> u32 {
    1
}

/// A loaded scenario: the base, the file it came from, and its sweep points (one point,
/// the base itself, when there is no sweep).
#[derive(Clone, Debug)]
pub struct LoadedScenario {
    pub path: PathBuf,
    pub base: Scenario,
    pub points: Vec<SweepPointSpec>,
}

#[derive(Clone, Debug)]
pub struct SweepPointSpec {
    pub parameters: BTreeMap<String, serde_json::Value>,
    pub scenario: Scenario,
}

impl Scenario {
    /// Reads, parses and validates a scenario file and expands its sweep.
    pub fn load(path: &Path) -> Result<LoadedScenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses scenario text; `path` names it in errors and anchors relative trace paths.
    pub fn parse(text: &str, path: &Path) -> Result<LoadedScenario, ScenarioError> {
        let base: Scenario = serde_yaml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_path_buf(),
            message: describe_yaml_error(&e),
        })?;
        base.validate(path)?;
        let points = if base.sweep.is_empty() {
            vec![SweepPointSpec {
                parameters: BTreeMap::new(),
                scenario: base.clone(),
            }]
        } else {
            let raw: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| ScenarioError::Parse {
                    path: path.to_path_buf(),
                    message: describe_yaml_error(&e),
                })?;
            expand_sweep(&raw, &base.sweep, path)?
        };
        Ok(LoadedScenario {
            path: path.to_path_buf(),
            base,
            points,
        })
    }

    /// The model's shape; `path` names the scenario file (relative model paths start there).
    pub fn model_spec(&self, path: &Path) -> Result<ModelSpec, String> {
        let m = match &self.model {
            ModelChoice::Preset(name) => ModelSpec::preset(name).map_err(|e| e.to_string())?,
            ModelChoice::Custom(spec) => spec.clone(),
            ModelChoice::Path { path: dir } => {
                let base = path.parent().unwrap_or(Path::new("."));
                model_from_config(&base.join(dir))?
            }
        };
        m.validate().map_err(|e| e.to_string())?;
        Ok(m)
    }

    /// Checks every user value that does not need the cost model.
    pub fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let bad = |field: &str, reason: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        if self
            .name
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(bad(
                "name",
                format!(
                    "`{}` may use only letters, digits, `-`, `_` and `.` (it names the output folder)",
                    self.name
                ),
            ));
        }
        let model = self.model_spec(path).map_err(|e| bad("model", e))?;
        cost::find_gpu(&self.gpu).map_err(|e| bad("gpu", e.to_string()))?;
        if self.efficiency.is_some() && self.gpu_profile.is_some() {
            return Err(bad(
                "efficiency",
                "and `gpu_profile` exclude each other: `efficiency` sets the derived model's \
                 factors, `gpu_profile` replaces the derived model with measured costs"
                    .into(),
            ));
        }
        cost::check_tensor_parallel(&model, self.tensor_parallel).map_err(|e| match e {
            CostError::InvalidArgument { reason, .. } => bad("tensor_parallel", reason),
            other => bad("tensor_parallel", other.to_string()),
        })?;
        let m = &self.memory;
        if !(m.utilization > 0.0 && m.utilization <= 1.0) {
            return Err(bad(
                "memory.utilization",
                format!("must be in (0, 1], got {}", m.utilization),
            ));
        }
        if !(m.activation_reserve_gb.is_finite() && m.activation_reserve_gb >= 0.0) {
            return Err(bad(
                "memory.activation_reserve_gb",
                format!("must be a number >= 0, got {}", m.activation_reserve_gb),
            ));
        }
        if let PoolLayoutSpec::Separate { adapter_slots: 0 } = m.pool_layout {
            return Err(bad(
                "memory.pool_layout.separate.adapter_slots",
                "must be at least 1".into(),
            ));
        }
        let a = &self.adapters;
        if a.ranks.is_empty() && a.count > 0 {
            return Err(bad("adapters.ranks", "must list at least one rank".into()));
        }
        for &r in &a.ranks {
            if r == 0 || r > model.hidden_size {
                return Err(bad(
                    "adapters.ranks",
                    format!(
                        "rank {r} is not in 1..={} (the hidden size of {})",
                        model.hidden_size, model.name
                    ),
                ));
            }
        }
        if let Some(w) = &a.rank_weights {
            if w.len() != a.ranks.len() {
                return Err(bad(
                    "adapters.rank_weights",
                    format!("has {} weights for {} ranks", w.len(), a.ranks.len()),
                ));
            }
            if w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.iter().sum::<f64>() <= 0.0 {
                return Err(bad(
                    "adapters.rank_weights",
                    "weights must be finite, >= 0, and not all 0".into(),
                ));
            }
        }
        if a.targets.is_empty() {
            return Err(bad(
                "adapters.targets",
                "must name at least one module".into(),
            ));
        }
        a.popularity
            .validate()
            .map_err(|source| ScenarioError::Workload {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        self.workload
            .validate()
            .map_err(|source| ScenarioError::Workload {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        let p = &self.policy;
        if !(p.min_time_to_first_token_s.is_finite() && p.min_time_to_first_token_s >= 0.0) {
            return Err(bad(
                "policy.min_time_to_first_token_s",
                format!("must be a number >= 0, got {}", p.min_time_to_first_token_s),
            ));
        }
        if p.early_abort && self.slo.ttft_s.is_none() {
            return Err(bad(
                "policy.early_abort",
                "needs `slo.ttft_s`: early abort drops requests that cannot meet it".into(),
            ));
        }
        for (field, v) in [
            ("slo.ttft_s", self.slo.ttft_s),
            ("slo.tpot_s", self.slo.tpot_s),
            ("slo.e2e_s", self.slo.e2e_s),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(field, format!("must be a number > 0, got {v}")));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.slo.attainment_target) {
            return Err(bad(
                "slo.attainment_target",
                format!("must be in [0, 1], got {}", self.slo.attainment_target),
            ));
        }
        // The engine judges the policy values it owns (batch sizes, budgets, weights); its
        // `scheduler.*` fields are this file's `policy.*`.
        self.scheduler_config()
            .validate()
            .map_err(|source| match source {
                slora_engine::ConfigError::Invalid { field, reason } => ScenarioError::Invalid {
                    path: path.to_path_buf(),
                    field: field.replacen("scheduler.", "policy.", 1),
                    reason,
                },
                other => ScenarioError::Engine {
                    path: path.to_path_buf(),
                    source: Box::new(other),
                },
            })?;
        Ok(())
    }

    pub fn scheduler_config(&self) -> SchedulerConfig {
        let p = &self.policy;
        SchedulerConfig {
            admission: p.admission,
            order: p.order,
            max_batch_size: p.max_batch_size,
            max_prefill_tokens: p.max_prefill_tokens,
            chunked_prefill: p.chunked_prefill,
            clustering: p.clustering,
            max_adapters_per_batch: p.max_adapters_per_batch,
            max_bypass: p.max_bypass,
            lookahead: p.lookahead,
            fairness: FairnessConfig {
                key: p.fairness.key,
                input_weight: p.fairness.input_weight,
                output_weight: p.fairness.output_weight,
                weights: p.fairness.weights.iter().map(|(&k, &v)| (k, v)).collect(),
            },
            early_abort: match (p.early_abort, self.slo.ttft_s) {
                (true, Some(ttft)) => Some(EarlyAbort {
                    ttft_slo: Nanos::from_secs_f64(ttft),
                    min_time_to_first_token: Nanos::from_secs_f64(p.min_time_to_first_token_s),
                    newest_first_under_overload: p.newest_first_under_overload,
                }),
                _ => None,
            },
            prefetch_depth: p.prefetch_depth,
        }
    }

    pub fn slo_targets(&self) -> SloTargets {
        SloTargets {
            ttft_s: self.slo.ttft_s,
            tpot_s: self.slo.tpot_s,
            e2e_s: self.slo.e2e_s,
            attainment_target: self.slo.attainment_target,
        }
    }

    /// Offered request rate (req/s) of the arrival process, if it has one.
    pub fn offered_rate(&self) -> Option<f64> {
        match &self.workload.arrivals {
            Some(workload::ArrivalSpec::Poisson { rate }) => Some(*rate),
            Some(workload::ArrivalSpec::Gamma { rate, .. }) => Some(*rate),
            None => None,
        }
    }

    /// Everything a run needs, derived from the scenario with its seed: engine config, cost
    /// model and the request stream. All randomness comes from one ChaCha8 generator seeded
    /// with `seed`: adapter ranks first, then the workload. The cost model is chosen as the
    /// [module documentation](self) says, among the embedded calibration profiles.
    pub fn build(&self, path: &Path) -> Result<RunSetup, ScenarioError> {
        self.build_with_profiles(path, &[])
    }

    /// [`Scenario::build`] with `extra` calibration profiles (a command line's) as candidates
    /// beside the embedded ones: the newest that matches the scenario's GPU, model shape and TP
    /// makes the run calibrated. A scenario's own `gpu_profile` takes precedence over both, and
    /// `efficiency` over all.
    pub fn build_with_profiles(
        &self,
        path: &Path,
        extra: &[CalibrationProfile],
    ) -> Result<RunSetup, ScenarioError> {
        let model = self
            .model_spec(path)
            .map_err(|reason| ScenarioError::Invalid {
                path: path.to_path_buf(),
                field: "model".into(),
                reason,
            })?;
        let cost_err = |source| ScenarioError::Cost {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let gpu: &'static GpuSpec = cost::find_gpu(&self.gpu).map_err(cost_err)?;
        let reserve = (self.memory.activation_reserve_gb * 1e9) as u64;
        let pool_pages = cost::kv_pool_pages_tp(
            gpu,
            &model,
            self.tensor_parallel,
            self.memory.utilization,
            reserve,
        )
        .map_err(cost_err)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let ranks = self.draw_ranks(&mut rng);
        let adapters: Vec<AdapterSpec> = ranks
            .iter()
            .map(|&rank| AdapterSpec {
                rank,
                targets: self.adapters.targets.clone(),
            })
            .collect();
        let pool_layout = match self.memory.pool_layout {
            PoolLayoutSpec::Unified => PoolLayout::Unified,
            PoolLayoutSpec::Separate { adapter_slots } => {
                let largest = adapters.iter().map(|a| a.pages(&model)).max().unwrap_or(0);
                PoolLayout::Separate {
                    adapter_pages: (largest * adapter_slots as u64).min(u32::MAX as u64) as u32,
                }
            }
        };
        let engine = EngineConfig {
            model: model.clone(),
            adapters,
            pool_pages,
            pool_layout,
            scheduler: self.scheduler_config(),
        };
        engine.validate().map_err(|source| ScenarioError::Engine {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let (cost, gemm_algorithms) = self.cost_model(path, gpu, &model, extra)?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let arrivals = workload::generate(
            &self.workload,
            self.adapters.count,
            &self.adapters.popularity,
            &mut rng,
            base_dir,
        )
        .map_err(|source| ScenarioError::Workload {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(RunSetup {
            scenario: self.clone(),
            engine,
            cost,
            arrivals,
            ranks,
            gemm_algorithms,
        })
    }

    /// The run's cost model (see the module documentation), and the GEMM algorithms of the
    /// profile it prices with when that profile was measured on the scenario's GPU; `path`
    /// is the scenario file.
    fn cost_model(
        &self,
        path: &Path,
        gpu: &'static GpuSpec,
        model: &ModelSpec,
        extra: &[CalibrationProfile],
    ) -> Result<(Box<dyn CostModel>, Option<ProfileAlgorithms>), ScenarioError> {
        let cost_err = |source| ScenarioError::Cost {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let tp = self.tensor_parallel;
        let targets = &self.adapters.targets;
        if let Some(eff) = &self.efficiency {
            let inner =
                AnalyticCost::new(gpu, model, tp, eff.clone(), targets).map_err(cost_err)?;
            let description = format!(
                "derived: {} x {}, TP {tp}, roofline from datasheet numbers with the scenario's \
                 efficiency factors",
                gpu.name, model.name
            );
            let cost: Box<dyn CostModel> = Box::new(Described {
                inner: Box::new(inner),
                description,
            });
            return Ok((cost, None));
        }
        if let Some(file) = &self.gpu_profile {
            return self.named_profile_cost(path, file, gpu, model);
        }
        let embedded = embedded_profiles();
        let profiles: std::borrow::Cow<[CalibrationProfile]> = if extra.is_empty() {
            embedded.into()
        } else {
            [embedded, extra].concat().into()
        };
        let cost =
            calibrated::cost_model_for(gpu, model, tp, targets, &profiles).map_err(cost_err)?;
        let algorithms = calibrated::calibrated_profile(gpu, model, tp, &profiles)
            .and_then(ProfileAlgorithms::of);
        Ok((cost, algorithms))
    }

    /// The cost model from the scenario's `gpu_profile: file`. Errors name the scenario file,
    /// the field and the profile's path.
    fn named_profile_cost(
        &self,
        path: &Path,
        file: &Path,
        gpu: &'static GpuSpec,
        model: &ModelSpec,
    ) -> Result<(Box<dyn CostModel>, Option<ProfileAlgorithms>), ScenarioError> {
        let resolved = path.parent().unwrap_or(Path::new(".")).join(file);
        let bad = |reason: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            field: "gpu_profile".into(),
            reason,
        };
        // Errors of reading and parsing name the path already; the others name the profile by
        // its GPU, model and date.
        let in_profile = |e: CostError| bad(format!("{}: {e}", resolved.display()));
        let profile = cost::load_profile(&resolved).map_err(|e| bad(e.to_string()))?;
        let (tp, targets) = (self.tensor_parallel, &self.adapters.targets);
        // Checks the model shape and TP degree, whichever GPU the profile was measured on.
        let calibrated = CalibratedCost::new(&profile, model, tp, targets).map_err(in_profile)?;
        let measured_on = profile
            .gpu_key
            .as_deref()
            .and_then(|k| cost::find_gpu(k).ok());
        let h200 = cost::find_gpu("h200").map_err(in_profile)?;
        let mut algorithms = None;
        let inner: Box<dyn CostModel> = match measured_on {
            Some(g) if g.key == gpu.key => {
                algorithms = ProfileAlgorithms::of(&profile);
                Box::new(calibrated)
            }
            Some(g) if g.key == h200.key && tp == 1 => {
                calibrated::cost_model_for(gpu, model, tp, targets, std::slice::from_ref(&profile))
                    .map_err(in_profile)?
            }
            _ => {
                return Err(bad(format!(
                    "calibration profile {} was measured on {} ({}), not on the scenario's {}: \
                     a profile gives calibrated costs on its own GPU, and an H200 profile fits \
                     the derived model's efficiencies for other GPUs",
                    resolved.display(),
                    profile.gpu_name,
                    profile.gpu_key.as_deref().map_or_else(
                        || "no catalogue `gpu_key`".to_string(),
                        |k| format!("`gpu_key` {k}")
                    ),
                    gpu.name
                )))
            }
        };
        let description = format!("{}; profile {}", inner.describe(), resolved.display());
        Ok((Box::new(Described { inner, description }), algorithms))
    }

    fn draw_ranks(&self, rng: &mut ChaCha8Rng) -> Vec<u32> {
        let a = &self.adapters;
        if a.ranks.is_empty() {
            return Vec::new();
        }
        let weights = a
            .rank_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; a.ranks.len()]);
        let total: f64 = weights.iter().sum();
        (0..a.count)
            .map(|_| {
                let mut x = rng.random::<f64>() * total;
                for (i, w) in weights.iter().enumerate() {
                    if x < *w {
                        return a.ranks[i];
                    }
                    x -= w;
                }
                *a.ranks.last().unwrap_or(&1)
            })
            .collect()
    }
}

/// The profiles embedded in the binary, parsed once per process (a sweep builds every point).
fn embedded_profiles() -> &'static [CalibrationProfile] {
    static EMBEDDED: std::sync::OnceLock<Vec<CalibrationProfile>> = std::sync::OnceLock::new();
    EMBEDDED.get_or_init(|| {
        calibrated::embedded_profiles()
            .into_iter()
            .map(|(_, profile)| profile)
            .collect()
    })
}

/// A cost model with a description that says more about where its numbers come from (the
/// scenario's efficiency factors, the profile file).
struct Described {
    inner: Box<dyn CostModel>,
    description: String,
}

impl CostModel for Described {
    fn step_cost(&self, batch: &BatchShape) -> StepCost {
        self.inner.step_cost(batch)
    }
    fn provenance(&self) -> Provenance {
        self.inner.provenance()
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// A scenario made runnable.
pub struct RunSetup {
    pub scenario: Scenario,
    pub engine: EngineConfig,
    pub cost: Box<dyn CostModel>,
    pub arrivals: Vec<workload::Arrival>,
    /// Rank of each adapter, by id.
    pub ranks: Vec<u32>,
    /// The base-GEMM algorithms of the calibrated profile `cost` prices with, when it was
    /// measured on the scenario's GPU and recorded them: `--execute` adopts them.
    pub gemm_algorithms: Option<ProfileAlgorithms>,
}

/// A calibrated profile's base-GEMM algorithms
/// ([`CalibrationProfile::gemm_algorithms`](crate::cost::CalibrationProfile)) and where they
/// come from.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileAlgorithms {
    /// The GPU's name as the profile's driver reported it (`NVIDIA H200`).
    pub gpu_name: String,
    /// `GPU x model, date` of the profile.
    pub profile: String,
    pub algorithms: cost::GemmAlgorithms,
}

impl ProfileAlgorithms {
    fn of(p: &CalibrationProfile) -> Option<ProfileAlgorithms> {
        Some(ProfileAlgorithms {
            gpu_name: p.gpu_name.clone(),
            profile: calibrated::profile_label(p),
            algorithms: p.gemm_algorithms.clone()?,
        })
    }
}

/// serde_yaml's message already carries the field path and the line and column; make the
/// common "unknown field" case name what is allowed (serde lists the expected fields).
fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let mut msg = e.to_string();
    if let Some(loc) = e.location() {
        if !msg.contains("line") {
            msg = format!("{msg} (line {}, column {})", loc.line(), loc.column());
        }
    }
    msg
}

fn expand_sweep(
    raw: &serde_yaml::Value,
    sweep: &BTreeMap<String, Vec<serde_yaml::Value>>,
    path: &Path,
) -> Result<Vec<SweepPointSpec>, ScenarioError> {
    let sweep_err = |key: &str, reason: String| ScenarioError::Sweep {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let mut total = 1usize;
    for (key, values) in sweep {
        if values.is_empty() {
            return Err(sweep_err(key, "lists no values".into()));
        }
        if key == "sweep" || key.starts_with("sweep.") || key == "name" {
            return Err(sweep_err(key, "cannot be swept".into()));
        }
        total = total.saturating_mul(values.len());
    }
    if total > 100_000 {
        return Err(sweep_err(
            sweep.keys().next().map_or("", |k| k.as_str()),
            format!("expands to {total} points; at most 100,000 are allowed"),
        ));
    }
    let keys: Vec<&String> = sweep.keys().collect();
    let mut points = Vec::with_capacity(total);
    for index in 0..total {
        let mut doc = raw.clone();
        if let serde_yaml::Value::Mapping(m) = &mut doc {
            m.remove("sweep");
        }
        let mut rest = index;
        let mut parameters = BTreeMap::new();
        // Last key varies fastest, so points come out in a readable nested order.
        let mut choice = vec![0usize; keys.len()];
        for (k, key) in keys.iter().enumerate().rev() {
            let n = sweep[*key].len();
            choice[k] = rest % n;
            rest /= n;
        }
        for (k, key) in keys.iter().enumerate() {
            let value = sweep[*key][choice[k]].clone();
            set_path(&mut doc, key, value.clone()).map_err(|reason| sweep_err(key, reason))?;
            let json = serde_json::to_value(&value).unwrap_or(serde_json::Value::Null);
            parameters.insert((*key).clone(), json);
        }
        let scenario: Scenario = serde_yaml::from_value(doc).map_err(|e| {
            sweep_err(
                &keys
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                format!("point {index} is not a valid scenario: {e}"),
            )
        })?;
        scenario.validate(path).map_err(|e| {
            sweep_err(
                &keys
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                format!("point {index}: {e}"),
            )
        })?;
        points.push(SweepPointSpec {
            parameters,
            scenario,
        });
    }
    Ok(points)
}

/// Sets `a.b.c` in a YAML document, creating mappings on the way.
fn set_path(
    doc: &mut serde_yaml::Value,
    dotted: &str,
    value: serde_yaml::Value,
) -> Result<(), String> {
    let parts: Vec<&str> = dotted.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("is not a dotted field path like `workload.arrivals.rate`".into());
    }
    let mut node = doc;
    for (i, part) in parts.iter().enumerate() {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *node = serde_yaml::Value::Mapping(Default::default());
                match node {
                    serde_yaml::Value::Mapping(m) => m,
                    _ => unreachable!("just assigned a mapping"),
                }
            }
            _ => {
                return Err(format!(
                    "`{}` is not a mapping, so it has no field `{part}`",
                    parts[..i].join(".")
                ))
            }
        };
        let key = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(serde_yaml::Value::Null);
    }
    Ok(())
}
