//! Workload generation: arrival times, adapter choice, prompt and output lengths.
//!
//! [`generate`] turns a [`WorkloadSpec`] into a time-sorted `Vec<Arrival>`, either from a
//! synthetic arrival process or by replaying a CSV trace in the Azure LLM inference format.
//!
//! # Determinism
//!
//! Every random draw comes from the one `ChaCha8Rng` the caller passes in, in a fixed order,
//! so the same spec and seed give an identical vector. Synthetic requests draw, in order:
//! the gap to the previous arrival, the adapter (a base-model coin, skipped when
//! `base_model_fraction` is 0, then the popularity law, skipped when there are no adapters),
//! the tenant (when `tenants` is set), the prompt length and the output length. Trace rows
//! draw only the adapter and tenant, in that order, after the rows are sorted by time.
//!
//! # Popularity laws
//!
//! * `uniform`: every adapter equally likely.
//! * `power { alpha }`: S-LoRA's convention. Draw `X` with density `alpha * x^(alpha - 1)` on
//!   `[0, 1]` (numpy's `random.power(alpha)`, sampled as `U^(1/alpha)`), and take adapter
//!   `floor(X * n)`. So `P(adapter <= k) = ((k + 1) / n)^alpha`: alpha = 1 is uniform, and
//!   alpha < 1 concentrates requests on the *low* indices (alpha = 0.1 with 10 adapters sends
//!   79% of requests to adapter 0). Alpha > 1 skews towards the high indices instead. Note
//!   this is the opposite direction from Zipf's exponent: smaller alpha means more skew.
//! * `zipf { s }`: the adapter with 1-based rank `k` has weight `k^-s` and id `k - 1`; s = 0
//!   is uniform and larger s is more skewed towards adapter 0.
//!
//! # Cost
//!
//! O(1) expected work per request for every law (the Zipf sampler is rejection-based with a
//! bounded expected number of tries); the output vector is allocated once up front, with no
//! per-request allocation. A trace is read into memory whole (the Azure traces are < 1 MB).

use rand::distr::Uniform;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Gamma, LogNormal, Zipf};
use serde::{Deserialize, Serialize};
use slora_engine::Nanos;
use std::path::{Path, PathBuf};

/// How requests arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "process", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArrivalSpec {
    /// Exponential gaps with mean `1 / rate`.
    Poisson { rate: f64 },
    /// Gamma gaps with mean `1 / rate` and coefficient of variation `cv` (cv = 1 is Poisson;
    /// larger is burstier). S-LoRA's generator uses this.
    Gamma { rate: f64, cv: f64 },
}

/// A length distribution (tokens), clamped to at least 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthSpec {
    Fixed {
        value: u32,
    },
    /// Integers uniform on `[min, max]`, both included.
    Uniform {
        min: u32,
        max: u32,
    },
    /// Log-normal with the given median and `sigma` (of the underlying normal), clamped to
    /// `[min, max]`.
    LogNormal {
        median: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
}

/// How requests pick adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "law", rename_all = "snake_case", deny_unknown_fields)]
pub enum PopularitySpec {
    Uniform,
    /// S-LoRA's convention: adapter `floor(X * n)` with `X ~ power(alpha)` (density
    /// `alpha * x^(alpha - 1)` on `[0, 1]`, numpy's `random.power`). alpha = 1 is uniform;
    /// alpha < 1 skews towards adapter 0 (the smaller alpha, the stronger the skew); alpha > 1
    /// skews towards the last adapter. Must be > 0.
    Power {
        alpha: f64,
    },
    /// Zipf with exponent `s`: the adapter of 1-based rank `k` (adapter id `k - 1`) has weight
    /// `k^-s`; s = 0 is uniform, larger s skews towards adapter 0. Must be >= 0.
    Zipf {
        s: f64,
    },
}

/// Trace replay from a CSV file in the Azure LLM inference trace format
/// (`TIMESTAMP,ContextTokens,GeneratedTokens`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    /// Relative paths are resolved against the scenario file's folder.
    pub path: PathBuf,
    /// Multiply inter-arrival times by this (0.5 = twice as fast). Must be > 0.
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Replay only the first this-many data rows of the file (in file order, before sorting).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Clamp prompt lengths to this (traces have long tails). Lengths are also raised to at
    /// least 1.
    #[serde(default)]
    pub max_prompt_tokens: Option<u32>,
    /// Clamp output lengths to this; also raised to at least 1.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
}

fn one() -> f64 {
    1.0
}

/// One generated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    pub time: Nanos,
    pub adapter: Option<u32>,
    pub tenant: Option<u32>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

impl Arrival {
    /// What the engine is told when this arrival (the `index`-th of its list) is submitted;
    /// every driver (simulator, fleet, live) submits it the same way.
    pub fn meta(&self, index: usize) -> slora_engine::RequestMeta {
        slora_engine::RequestMeta {
            id: slora_engine::RequestId(index as u64),
            adapter: self.adapter.map(slora_engine::AdapterId),
            tenant: self.tenant.map(slora_engine::TenantId),
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
        }
    }
}

/// The `workload:` section of a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Required unless `trace` is given (a trace carries its own arrival times).
    #[serde(default)]
    pub arrivals: Option<ArrivalSpec>,
    /// Simulated seconds of arrivals; at least one of `duration_s` and `requests` (both: the
    /// first reached ends the stream). A trace without either replays in full.
    #[serde(default)]
    pub duration_s: Option<f64>,
    #[serde(default)]
    pub requests: Option<u64>,
    /// Prompt lengths (ignored with a trace).
    #[serde(default)]
    pub input: Option<LengthSpec>,
    /// Output lengths (ignored with a trace).
    #[serde(default)]
    pub output: Option<LengthSpec>,
    #[serde(default)]
    pub trace: Option<TraceSpec>,
    /// Fraction of requests that use the base model with no adapter, in `[0, 1]`.
    #[serde(default)]
    pub base_model_fraction: f64,
    /// Number of tenants; each request's tenant is drawn uniformly. `None`: tenants are not
    /// modelled (fairness can still be keyed by adapter).
    #[serde(default)]
    pub tenants: Option<u32>,
}

/// The most requests one workload may produce. An `Arrival` is 32 bytes, so this caps the
/// vector at 1.6 GB; a slip such as `requests: 1000000000000` fails here instead of exhausting memory.
pub const MAX_REQUESTS: u64 = 50_000_000;

/// The header the trace reader expects (Azure LLM inference trace 2023).
const TRACE_HEADER: &str = "TIMESTAMP,ContextTokens,GeneratedTokens";

/// Everything that can be wrong with a workload: a bad scenario value, or a trace file that
/// cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A value is out of its allowed range, e.g. `workload.arrivals.rate = -1: must be > 0`.
    #[error("{field} = {value}: must be {allowed}")]
    InvalidField {
        /// Path of the field in the scenario, e.g. `workload.arrivals.rate`.
        field: String,
        /// The value as written.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// A field that this workload needs is absent.
    #[error("{field} is missing: {why}")]
    MissingField { field: String, why: &'static str },
    /// The workload would produce more than [`MAX_REQUESTS`] requests.
    #[error(
        "{field}: the workload would produce more than {limit} requests (about {expected}); \
         lower `requests`, `duration_s` or the arrival rate"
    )]
    TooManyRequests {
        field: String,
        expected: String,
        limit: u64,
    },
    /// The trace file could not be opened or read.
    #[error("cannot read trace file {path}: {source}")]
    TraceIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The trace file's first line is not the expected header.
    #[error(
        "trace file {path}, line 1: header {found:?} has no column {missing:?}; expected \
         {TRACE_HEADER:?} (Azure LLM inference trace format)"
    )]
    TraceHeader {
        path: PathBuf,
        found: String,
        missing: &'static str,
    },
    /// A data row could not be parsed.
    #[error("trace file {path}, line {line}, column {column} ({column_name}): {text:?}: {reason}")]
    TraceRow {
        path: PathBuf,
        /// 1-based line number in the file (the header is line 1).
        line: u64,
        /// 1-based column (field) number.
        column: usize,
        column_name: &'static str,
        /// The offending field, or the whole line when a field is missing.
        text: String,
        reason: String,
    },
    /// The trace has a header but no data rows.
    #[error("trace file {path} has no data rows after the header")]
    TraceEmpty { path: PathBuf },
}

fn invalid(field: &str, value: impl std::fmt::Display, allowed: &str) -> WorkloadError {
    WorkloadError::InvalidField {
        field: field.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

/// `Ok` when `value` is finite and > 0.
fn check_positive(field: &str, value: f64) -> Result<(), WorkloadError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, value, "> 0 and finite"))
    }
}

impl ArrivalSpec {
    fn validate_at(&self, field: &str) -> Result<(), WorkloadError> {
        match *self {
            ArrivalSpec::Poisson { rate } => check_positive(&format!("{field}.rate"), rate),
            ArrivalSpec::Gamma { rate, cv } => {
                check_positive(&format!("{field}.rate"), rate)?;
                check_positive(&format!("{field}.cv"), cv)
            }
        }
    }

    fn rate(&self) -> f64 {
        match *self {
            ArrivalSpec::Poisson { rate } | ArrivalSpec::Gamma { rate, .. } => rate,
        }
    }
}

impl LengthSpec {
    fn validate_at(&self, field: &str) -> Result<(), WorkloadError> {
        let check_bounds = |min: u32, max: u32| {
            if min < 1 {
                return Err(invalid(
                    &format!("{field}.min"),
                    min,
                    ">= 1 (a request has at least one token)",
                ));
            }
            if max < min {
                return Err(invalid(
                    &format!("{field}.max"),
                    max,
                    &format!(">= {field}.min ({min})"),
                ));
            }
            Ok(())
        };
        match *self {
            LengthSpec::Fixed { value } => {
                if value < 1 {
                    return Err(invalid(
                        &format!("{field}.value"),
                        value,
                        ">= 1 (a request has at least one token)",
                    ));
                }
                Ok(())
            }
            LengthSpec::Uniform { min, max } => check_bounds(min, max),
            LengthSpec::LogNormal {
                median,
                sigma,
                min,
                max,
            } => {
                check_positive(&format!("{field}.median"), median)?;
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(invalid(&format!("{field}.sigma"), sigma, ">= 0 and finite"));
                }
                check_bounds(min, max)
            }
        }
    }
}

impl PopularitySpec {
    /// Checks the law's parameter, naming it as `adapters.popularity.<param>` (where the law
    /// sits in a scenario). [`PopularitySpec::validate_at`] takes another path.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        self.validate_at("adapters.popularity")
    }

    /// Like [`PopularitySpec::validate`], with errors naming `<field>.alpha` / `<field>.s`.
    pub fn validate_at(&self, field: &str) -> Result<(), WorkloadError> {
        match *self {
            PopularitySpec::Uniform => Ok(()),
            PopularitySpec::Power { alpha } => check_positive(&format!("{field}.alpha"), alpha),
            PopularitySpec::Zipf { s } => {
                if s.is_finite() && s >= 0.0 {
                    Ok(())
                } else {
                    Err(invalid(
                        &format!("{field}.s"),
                        s,
                        ">= 0 and finite (0 is uniform)",
                    ))
                }
            }
        }
    }
}

impl TraceSpec {
    fn validate_at(&self, field: &str) -> Result<(), WorkloadError> {
        check_positive(&format!("{field}.time_scale"), self.time_scale)?;
        if self.limit == Some(0) {
            return Err(invalid(
                &format!("{field}.limit"),
                0,
                ">= 1 (leave it out to replay every row)",
            ));
        }
        if self.max_prompt_tokens == Some(0) {
            return Err(invalid(&format!("{field}.max_prompt_tokens"), 0, ">= 1"));
        }
        if self.max_output_tokens == Some(0) {
            return Err(invalid(&format!("{field}.max_output_tokens"), 0, ">= 1"));
        }
        Ok(())
    }
}

impl WorkloadSpec {
    /// Checks every range and the combination rules, naming fields as `workload.<path>`.
    /// Fields that a trace makes unnecessary (`arrivals`, `input`, `output`) are still checked
    /// when present, although the trace replay ignores them.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        if let Some(arrivals) = &self.arrivals {
            arrivals.validate_at("workload.arrivals")?;
        }
        if let Some(input) = &self.input {
            input.validate_at("workload.input")?;
        }
        if let Some(output) = &self.output {
            output.validate_at("workload.output")?;
        }
        if let Some(trace) = &self.trace {
            trace.validate_at("workload.trace")?;
        }
        if let Some(duration) = self.duration_s {
            check_positive("workload.duration_s", duration)?;
        }
        if let Some(requests) = self.requests {
            if requests == 0 {
                return Err(invalid("workload.requests", 0, ">= 1"));
            }
            if requests > MAX_REQUESTS {
                return Err(invalid(
                    "workload.requests",
                    requests,
                    &format!("<= {MAX_REQUESTS}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.base_model_fraction) {
            return Err(invalid(
                "workload.base_model_fraction",
                self.base_model_fraction,
                "in [0, 1]",
            ));
        }
        if self.tenants == Some(0) {
            return Err(invalid(
                "workload.tenants",
                0,
                ">= 1 (leave it out to not model tenants)",
            ));
        }
        if self.trace.is_some() {
            return Ok(());
        }
        let Some(arrivals) = &self.arrivals else {
            return Err(WorkloadError::MissingField {
                field: "workload.arrivals".into(),
                why: "an arrival process (poisson or gamma) is required unless `trace` is given",
            });
        };
        if self.input.is_none() {
            return Err(WorkloadError::MissingField {
                field: "workload.input".into(),
                why: "a prompt length distribution is required unless `trace` is given",
            });
        }
        if self.output.is_none() {
            return Err(WorkloadError::MissingField {
                field: "workload.output".into(),
                why: "an output length distribution is required unless `trace` is given",
            });
        }
        match (self.duration_s, self.requests) {
            (None, None) => Err(WorkloadError::MissingField {
                field: "workload.duration_s".into(),
                why: "give `duration_s`, `requests` or both, so the arrival stream ends",
            }),
            (Some(duration), None) => {
                let expected = arrivals.rate() * duration;
                if expected > MAX_REQUESTS as f64 {
                    Err(WorkloadError::TooManyRequests {
                        field: "workload.duration_s".into(),
                        expected: format!("{expected:.0}"),
                        limit: MAX_REQUESTS,
                    })
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// Gap sampler for the synthetic arrival process, built once per `generate`.
enum GapSampler {
    Exp(Exp<f64>),
    Gamma(Gamma<f64>),
}

impl GapSampler {
    fn new(spec: &ArrivalSpec) -> Result<GapSampler, WorkloadError> {
        match *spec {
            ArrivalSpec::Poisson { rate } => Exp::new(rate).map(GapSampler::Exp).map_err(|e| {
                invalid(
                    "workload.arrivals.rate",
                    rate,
                    &format!("a usable exponential rate ({e})"),
                )
            }),
            ArrivalSpec::Gamma { rate, cv } => {
                // Gamma(k, theta) has mean k*theta and cv 1/sqrt(k): k = 1/cv^2 and
                // theta = 1/(rate*k) give mean 1/rate with the requested cv.
                let shape = 1.0 / (cv * cv);
                let scale = 1.0 / (rate * shape);
                Gamma::new(shape, scale).map(GapSampler::Gamma).map_err(|e| {
                    invalid(
                        "workload.arrivals",
                        format!("{{rate: {rate}, cv: {cv}}}"),
                        &format!("parameters giving a finite gamma shape 1/cv^2 and scale 1/(rate*shape) ({e})"),
                    )
                })
            }
        }
    }

    /// Seconds to the next arrival.
    fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        match self {
            GapSampler::Exp(d) => d.sample(rng),
            GapSampler::Gamma(d) => d.sample(rng),
        }
    }
}

/// Token-length sampler, built once per `generate`.
enum LengthSampler {
    Fixed(u32),
    Uniform(Uniform<u32>),
    LogNormal {
        dist: LogNormal<f64>,
        min: u32,
        max: u32,
    },
}

impl LengthSampler {
    fn new(spec: &LengthSpec, field: &str) -> Result<LengthSampler, WorkloadError> {
        match *spec {
            LengthSpec::Fixed { value } => Ok(LengthSampler::Fixed(value)),
            LengthSpec::Uniform { min, max } => Uniform::new_inclusive(min, max)
                .map(LengthSampler::Uniform)
                .map_err(|e| {
                    invalid(
                        &format!("{field}.max"),
                        max,
                        &format!(">= {field}.min ({min}) ({e})"),
                    )
                }),
            LengthSpec::LogNormal {
                median,
                sigma,
                min,
                max,
            } => LogNormal::new(median.ln(), sigma)
                .map(|dist| LengthSampler::LogNormal { dist, min, max })
                .map_err(|e| {
                    invalid(
                        &format!("{field}.sigma"),
                        sigma,
                        &format!(">= 0 and finite ({e})"),
                    )
                }),
        }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        match self {
            LengthSampler::Fixed(value) => *value,
            LengthSampler::Uniform(dist) => dist.sample(rng),
            LengthSampler::LogNormal { dist, min, max } => {
                // The float-to-int cast saturates, and the clamp keeps an overflowing exp()
                // (infinity) at `max`; validation guarantees min >= 1.
                let x = dist
                    .sample(rng)
                    .round()
                    .clamp(f64::from(*min), f64::from(*max));
                x as u32
            }
        }
    }
}

/// Adapter sampler for one popularity law over `n` adapters.
enum AdapterSampler {
    /// No adapters exist: every request is base-model.
    NoAdapters,
    Uniform(Uniform<u32>),
    /// `floor(U^(1/alpha) * n)`, S-LoRA's `numpy.random.power(alpha)` convention.
    Power {
        inv_alpha: f64,
        n: u32,
    },
    /// Rank `k` (1-based, weight `k^-s`) maps to adapter `k - 1`.
    Zipf {
        dist: Zipf<f64>,
        n: u32,
    },
}

impl AdapterSampler {
    fn new(popularity: &PopularitySpec, n: u32) -> Result<AdapterSampler, WorkloadError> {
        if n == 0 {
            return Ok(AdapterSampler::NoAdapters);
        }
        Ok(match *popularity {
            PopularitySpec::Uniform => AdapterSampler::Uniform(
                Uniform::new(0, n)
                    .map_err(|e| invalid("adapters.count", n, &format!(">= 1 ({e})")))?,
            ),
            PopularitySpec::Power { alpha } => AdapterSampler::Power {
                inv_alpha: 1.0 / alpha,
                n,
            },
            PopularitySpec::Zipf { s } => AdapterSampler::Zipf {
                // rand_distr's Zipf is exact (rejection sampling) and handles s = 0 as uniform.
                dist: Zipf::new(f64::from(n), s).map_err(|e| {
                    invalid(
                        "adapters.popularity.s",
                        s,
                        &format!(">= 0 and finite ({e})"),
                    )
                })?,
                n,
            },
        })
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> Option<u32> {
        match self {
            AdapterSampler::NoAdapters => None,
            AdapterSampler::Uniform(dist) => Some(dist.sample(rng)),
            AdapterSampler::Power { inv_alpha, n } => {
                let u: f64 = rng.random();
                let x = u.powf(*inv_alpha);
                // x < 1 in exact arithmetic; the clamp guards float rounding at the top end.
                Some(((x * f64::from(*n)) as u32).min(n - 1))
            }
            AdapterSampler::Zipf { dist, n } => {
                let rank = dist.sample(rng);
                Some((rank as u32).clamp(1, *n) - 1)
            }
        }
    }
}

/// Per-request draws shared by synthetic and trace workloads: adapter then tenant.
struct RequestPicker {
    adapters: AdapterSampler,
    base_model_fraction: f64,
    tenants: Option<Uniform<u32>>,
}

impl RequestPicker {
    fn new(
        spec: &WorkloadSpec,
        adapters: u32,
        popularity: &PopularitySpec,
    ) -> Result<RequestPicker, WorkloadError> {
        let tenants = match spec.tenants {
            Some(t) => Some(
                Uniform::new(0, t)
                    .map_err(|e| invalid("workload.tenants", t, &format!(">= 1 ({e})")))?,
            ),
            None => None,
        };
        Ok(RequestPicker {
            adapters: AdapterSampler::new(popularity, adapters)?,
            base_model_fraction: spec.base_model_fraction,
            tenants,
        })
    }

    fn adapter(&self, rng: &mut ChaCha8Rng) -> Option<u32> {
        if matches!(self.adapters, AdapterSampler::NoAdapters) {
            return None;
        }
        // Skipping the coin when the fraction is 0 keeps the stream of draws (and so the
        // output for a seed) the same as a workload that never mentions the base model.
        if self.base_model_fraction > 0.0 && rng.random::<f64>() < self.base_model_fraction {
            return None;
        }
        self.adapters.sample(rng)
    }

    fn tenant(&self, rng: &mut ChaCha8Rng) -> Option<u32> {
        self.tenants.as_ref().map(|d| d.sample(rng))
    }
}

/// Generates the workload's requests, sorted by arrival time.
///
/// Synthetic workloads start at time 0 and the first request arrives one drawn gap later; the
/// stream ends at `duration_s` (arrivals after it are dropped) or after `requests` requests,
/// whichever comes first. With `spec.trace`, the trace's rows are replayed instead (see
/// [`TraceSpec`]); the first row arrives at time 0.
///
/// Each request uses the base model (`adapter: None`) with probability `base_model_fraction`,
/// otherwise an adapter in `0..adapters` drawn from `popularity`; with `adapters == 0` every
/// request is base-model. `base_dir` resolves a relative trace path (the scenario's folder).
///
/// Validates `spec` and `popularity` first. Uses only `rng`, so a seed fixes the output.
pub fn generate(
    spec: &WorkloadSpec,
    adapters: u32,
    popularity: &PopularitySpec,
    rng: &mut ChaCha8Rng,
    base_dir: &Path,
) -> Result<Vec<Arrival>, WorkloadError> {
    spec.validate()?;
    popularity.validate()?;
    let picker = RequestPicker::new(spec, adapters, popularity)?;
    if let Some(trace) = &spec.trace {
        return replay_trace(spec, trace, &picker, rng, base_dir);
    }
    // validate() guarantees these are present without a trace.
    let (Some(arrivals), Some(input), Some(output)) = (&spec.arrivals, &spec.input, &spec.output)
    else {
        return Err(WorkloadError::MissingField {
            field: "workload.arrivals".into(),
            why: "arrivals, input and output are required unless `trace` is given",
        });
    };
    let gaps = GapSampler::new(arrivals)?;
    let input = LengthSampler::new(input, "workload.input")?;
    let output = LengthSampler::new(output, "workload.output")?;

    let requests = spec.requests.unwrap_or(MAX_REQUESTS).min(MAX_REQUESTS);
    let duration = spec.duration_s.unwrap_or(f64::INFINITY);
    // Reserve for the expected count (plus slack for the randomness) so the vector is
    // allocated once; `requests` alone may be far above what the duration allows.
    let expected = (arrivals.rate() * duration * 1.05 + 64.0).min(requests as f64);
    let mut out = Vec::with_capacity(expected as usize);

    let mut t = 0.0_f64;
    loop {
        t += gaps.sample(rng);
        if t > duration {
            break;
        }
        if out.len() as u64 >= requests {
            if spec.requests.is_some() {
                break;
            }
            return Err(WorkloadError::TooManyRequests {
                field: "workload.duration_s".into(),
                expected: format!("{:.0}", arrivals.rate() * duration),
                limit: MAX_REQUESTS,
            });
        }
        let adapter = picker.adapter(rng);
        let tenant = picker.tenant(rng);
        out.push(Arrival {
            time: Nanos::from_secs_f64(t),
            adapter,
            tenant,
            prompt_tokens: input.sample(rng),
            output_tokens: output.sample(rng),
        });
    }
    Ok(out)
}

/// One parsed trace row before adapters are assigned.
struct TraceRow {
    /// Nanoseconds since 1970-01-01 (the timestamps carry no zone; only differences matter).
    timestamp_ns: i128,
    prompt_tokens: u32,
    output_tokens: u32,
}

fn replay_trace(
    spec: &WorkloadSpec,
    trace: &TraceSpec,
    picker: &RequestPicker,
    rng: &mut ChaCha8Rng,
    base_dir: &Path,
) -> Result<Vec<Arrival>, WorkloadError> {
    let path = if trace.path.is_absolute() {
        trace.path.clone()
    } else {
        base_dir.join(&trace.path)
    };
    let text = std::fs::read_to_string(&path).map_err(|source| WorkloadError::TraceIo {
        path: path.clone(),
        source,
    })?;
    let mut rows = parse_trace(&text, trace, &path)?;
    // Real traces are in time order, where this is a linear pass; the sort is stable, so
    // rows with equal timestamps keep their file order.
    rows.sort_by_key(|r| r.timestamp_ns);

    let requests = spec.requests.unwrap_or(u64::MAX);
    let duration_ns = spec
        .duration_s
        .map_or(u64::MAX, |d| Nanos::from_secs_f64(d).0);
    let first = rows.first().map_or(0, |r| r.timestamp_ns);
    let mut out = Vec::with_capacity(
        rows.len()
            .min(usize::try_from(requests).unwrap_or(usize::MAX)),
    );
    for row in &rows {
        if out.len() as u64 >= requests {
            break;
        }
        // Sorted, so the difference is >= 0; a day of nanoseconds (8.6e13) is exact in f64.
        let offset_ns = (row.timestamp_ns - first) as f64;
        let time = Nanos::from_secs_f64(offset_ns * trace.time_scale / 1e9);
        if time.0 > duration_ns {
            break;
        }
        let adapter = picker.adapter(rng);
        let tenant = picker.tenant(rng);
        out.push(Arrival {
            time,
            adapter,
            tenant,
            prompt_tokens: row.prompt_tokens,
            output_tokens: row.output_tokens,
        });
    }
    Ok(out)
}

/// Parses the CSV text into rows, honouring `limit` and the token clamps.
fn parse_trace(text: &str, trace: &TraceSpec, path: &Path) -> Result<Vec<TraceRow>, WorkloadError> {
    const NAMES: [&str; 3] = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];
    // Excel and some exporters prefix a UTF-8 byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    // Find columns by name so an exporter that reorders or adds columns still works.
    let header_fields: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut index = [0usize; 3];
    for (slot, name) in index.iter_mut().zip(NAMES) {
        *slot = header_fields
            .iter()
            .position(|f| *f == name)
            .ok_or_else(|| WorkloadError::TraceHeader {
                path: path.to_path_buf(),
                found: header.to_string(),
                missing: name,
            })?;
    }
    let ts_col = index[0];
    let needed = index.iter().max().map_or(0, |c| c + 1);

    let limit = trace.limit.unwrap_or(u64::MAX);
    let max_prompt = trace.max_prompt_tokens.unwrap_or(u32::MAX);
    let max_output = trace.max_output_tokens.unwrap_or(u32::MAX);
    let mut rows = Vec::with_capacity(text.len() / 40);
    let mut fields: Vec<&str> = Vec::with_capacity(needed);
    for (i, line) in lines.enumerate() {
        if rows.len() as u64 >= limit {
            break;
        }
        let line_no = i as u64 + 2;
        if line.trim().is_empty() {
            continue;
        }
        // `slot` indexes NAMES (0 timestamp, 1 prompt, 2 output).
        let row_error = |slot: usize, text: &str, reason: String| WorkloadError::TraceRow {
            path: path.to_path_buf(),
            line: line_no,
            column: index[slot] + 1,
            column_name: NAMES[slot],
            text: text.to_string(),
            reason,
        };
        fields.clear();
        fields.extend(line.split(',').map(str::trim));
        if fields.len() < needed {
            let missing = index.iter().position(|c| *c >= fields.len()).unwrap_or(0);
            let reason = format!(
                "the row has {} fields, the header {}",
                fields.len(),
                header_fields.len()
            );
            return Err(row_error(missing, line, reason));
        }
        let timestamp_ns = parse_timestamp(fields[ts_col])
            .map_err(|reason| row_error(0, fields[ts_col], reason))?;
        let tokens = |slot: usize, max: u32| -> Result<u32, WorkloadError> {
            let raw = fields[index[slot]];
            let value = parse_digits(raw).ok_or_else(|| {
                row_error(
                    slot,
                    raw,
                    "expected a non-negative integer token count".into(),
                )
            })?;
            // A request needs at least one token each way; the Azure traces have no zero
            // rows, but other exports may.
            Ok(u32::try_from(value).unwrap_or(u32::MAX).clamp(1, max))
        };
        let prompt_tokens = tokens(1, max_prompt)?;
        let output_tokens = tokens(2, max_output)?;
        rows.push(TraceRow {
            timestamp_ns,
            prompt_tokens,
            output_tokens,
        });
    }
    if rows.is_empty() {
        return Err(WorkloadError::TraceEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

/// Parses a string of ASCII digits (no sign, no spaces) into a u64; `None` on anything else,
/// including overflow.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fffffffff]` (a `T` may replace the space; up to 9 fractional
/// digits) into nanoseconds since 1970-01-01. The zone is ignored: only differences are used.
fn parse_timestamp(s: &str) -> Result<i128, String> {
    const FORMAT: &str = "expected a timestamp like 2023-11-16 18:15:46.6805900";
    let (date, time) = s.split_once([' ', 'T']).ok_or_else(|| FORMAT.to_string())?;
    let mut date_parts = date.split('-');
    let mut time_parts = time.split(':');
    let next =
        |parts: &mut std::str::Split<'_, char>, digits: usize, what: &str| -> Result<u64, String> {
            let part = parts
                .next()
                .ok_or_else(|| format!("{FORMAT} (no {what})"))?;
            if part.len() != digits {
                return Err(format!(
                    "{FORMAT} ({what} {part:?} should have {digits} digits)"
                ));
            }
            parse_digits(part).ok_or_else(|| format!("{FORMAT} ({what} {part:?} is not a number)"))
        };
    let year = next(&mut date_parts, 4, "year")?;
    let month = next(&mut date_parts, 2, "month")?;
    let day = next(&mut date_parts, 2, "day")?;
    let hour = next(&mut time_parts, 2, "hour")?;
    let minute = next(&mut time_parts, 2, "minute")?;
    let seconds = time_parts
        .next()
        .ok_or_else(|| format!("{FORMAT} (no seconds)"))?;
    if date_parts.next().is_some() || time_parts.next().is_some() {
        return Err(FORMAT.to_string());
    }
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let second = if whole.len() == 2 {
        parse_digits(whole)
    } else {
        None
    }
    .ok_or_else(|| format!("{FORMAT} (seconds {whole:?} should be 2 digits)"))?;
    if fraction.len() > 9 || (seconds.contains('.') && fraction.is_empty()) {
        return Err(format!(
            "{FORMAT} (1 to 9 fractional digits, got {:?})",
            fraction
        ));
    }
    let frac_ns = if fraction.is_empty() {
        0
    } else {
        let value = parse_digits(fraction)
            .ok_or_else(|| format!("{FORMAT} (fraction {fraction:?} is not a number)"))?;
        value * 10u64.pow(9 - fraction.len() as u32)
    };

    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not in 1..=12"));
    }
    let month_days = days_in_month(year, month as u32);
    if day < 1 || day > u64::from(month_days) {
        return Err(format!(
            "day {day} is not in 1..={month_days} for {year}-{month:02}"
        ));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!(
            "time {hour:02}:{minute:02}:{second:02} is not a valid time of day"
        ));
    }
    // i128: i64 nanoseconds only reach the year 2262, and four-digit years go to 9999.
    let days = days_from_civil(year as i64, month as u32, day as u32);
    let secs = i128::from(days) * 86_400 + i128::from(hour * 3600 + minute * 60 + second);
    Ok(secs * 1_000_000_000 + i128::from(frac_ns))
}

fn is_leap(year: u64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: u64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`): counting years from March puts the leap day last, so each 400-year
/// era has a fixed length of 146,097 days.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400; // [0, 399]
    let month_from_march = i64::from((month + 9) % 12); // March = 0
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of `days_from_civil`: the proleptic Gregorian `(year, month, day)` of a day
/// counted from 1970-01-01 (calibration profiles are dated with it).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097; // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // March = 0
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn poisson(rate: f64, requests: u64) -> WorkloadSpec {
        WorkloadSpec {
            arrivals: Some(ArrivalSpec::Poisson { rate }),
            duration_s: None,
            requests: Some(requests),
            input: Some(LengthSpec::Fixed { value: 8 }),
            output: Some(LengthSpec::Fixed { value: 4 }),
            trace: None,
            base_model_fraction: 0.0,
            tenants: None,
        }
    }

    fn run(
        spec: &WorkloadSpec,
        adapters: u32,
        popularity: &PopularitySpec,
        seed: u64,
    ) -> Vec<Arrival> {
        generate(spec, adapters, popularity, &mut rng(seed), Path::new("."))
            .expect("valid workload")
    }

    /// Share of requests per adapter index (base-model requests excluded).
    fn shares(arrivals: &[Arrival], n: u32) -> Vec<f64> {
        let mut counts = vec![0u64; n as usize];
        for a in arrivals {
            counts[a.adapter.expect("adapter") as usize] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / arrivals.len() as f64)
            .collect()
    }

    fn gaps(arrivals: &[Arrival]) -> Vec<f64> {
        let mut prev = 0.0;
        arrivals
            .iter()
            .map(|a| {
                let t = a.time.as_secs_f64();
                let gap = t - prev;
                prev = t;
                gap
            })
            .collect()
    }

    fn mean_cv(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn same_seed_same_output_different_seed_different() {
        let mut spec = poisson(10.0, 2_000);
        spec.input = Some(LengthSpec::LogNormal {
            median: 100.0,
            sigma: 1.0,
            min: 1,
            max: 4096,
        });
        spec.output = Some(LengthSpec::Uniform { min: 1, max: 512 });
        spec.base_model_fraction = 0.2;
        spec.tenants = Some(3);
        let law = PopularitySpec::Zipf { s: 1.1 };
        let a = run(&spec, 50, &law, 7);
        assert_eq!(a.len(), 2_000);
        assert_eq!(a, run(&spec, 50, &law, 7));
        assert_ne!(a, run(&spec, 50, &law, 8));
        assert!(
            a.windows(2).all(|w| w[0].time <= w[1].time),
            "arrivals are sorted"
        );
        assert!(
            a[0].time > Nanos(0),
            "the first arrival is one drawn gap after 0"
        );
    }

    #[test]
    fn poisson_rate_and_cv() {
        let a = run(&poisson(50.0, 200_000), 0, &PopularitySpec::Uniform, 1);
        let (mean, cv) = mean_cv(&gaps(&a));
        assert!(
            (1.0 / mean / 50.0 - 1.0).abs() < 0.02,
            "rate {}",
            1.0 / mean
        );
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}");
        assert!(
            a.iter().all(|r| r.adapter.is_none()),
            "no adapters: all base-model"
        );
    }

    #[test]
    fn gamma_gaps_have_target_mean_and_cv() {
        for target in [1.0, 4.0] {
            let mut spec = poisson(20.0, 200_000);
            spec.arrivals = Some(ArrivalSpec::Gamma {
                rate: 20.0,
                cv: target,
            });
            let a = run(&spec, 0, &PopularitySpec::Uniform, 3);
            let (mean, cv) = mean_cv(&gaps(&a));
            assert!(
                (1.0 / mean / 20.0 - 1.0).abs() < 0.05,
                "cv {target}: rate {}",
                1.0 / mean
            );
            assert!(
                (cv / target - 1.0).abs() < 0.05,
                "cv {target}: measured {cv}"
            );
        }
    }

    #[test]
    fn power_law_follows_s_lora_convention() {
        let n = 10;
        let spec = poisson(1.0, 200_000);
        let uniform = shares(&run(&spec, n, &PopularitySpec::Power { alpha: 1.0 }, 4), n);
        for (i, share) in uniform.iter().enumerate() {
            assert!((share - 0.1).abs() < 0.005, "alpha 1, adapter {i}: {share}");
        }
        // P(index <= k) = ((k + 1) / n)^alpha: adapter 0 gets 0.1^0.1 = 0.794.
        let skewed = shares(&run(&spec, n, &PopularitySpec::Power { alpha: 0.1 }, 4), n);
        let expected0 = 0.1f64.powf(0.1);
        assert!(
            (skewed[0] - expected0).abs() < 0.01,
            "alpha 0.1, adapter 0: {}",
            skewed[0]
        );
        let expected_last = 1.0 - 0.9f64.powf(0.1);
        assert!(
            (skewed[9] - expected_last).abs() < 0.003,
            "alpha 0.1, adapter 9: {}",
            skewed[9]
        );
    }

    #[test]
    fn zipf_uniform_at_zero_and_harmonic_head_at_one() {
        let spec = poisson(1.0, 200_000);
        let n = 10;
        let flat = shares(&run(&spec, n, &PopularitySpec::Zipf { s: 0.0 }, 5), n);
        for (i, share) in flat.iter().enumerate() {
            assert!((share - 0.1).abs() < 0.005, "s 0, adapter {i}: {share}");
        }
        let n = 100;
        let skew = shares(&run(&spec, n, &PopularitySpec::Zipf { s: 1.0 }, 5), n);
        let harmonic: f64 = (1..=n).map(|k| 1.0 / f64::from(k)).sum();
        for rank in [1u32, 2, 10] {
            let expected = 1.0 / f64::from(rank) / harmonic;
            let got = skew[rank as usize - 1];
            assert!(
                (got / expected - 1.0).abs() < 0.05,
                "s 1, rank {rank}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn single_adapter_always_chosen() {
        let spec = poisson(1.0, 1_000);
        for law in [
            PopularitySpec::Uniform,
            PopularitySpec::Power { alpha: 0.3 },
            PopularitySpec::Zipf { s: 2.0 },
        ] {
            assert!(
                run(&spec, 1, &law, 6).iter().all(|a| a.adapter == Some(0)),
                "{law:?}"
            );
        }
    }

    #[test]
    fn uniform_lengths_stay_in_bounds_and_hit_both_ends() {
        let mut spec = poisson(1.0, 20_000);
        spec.input = Some(LengthSpec::Uniform { min: 3, max: 9 });
        let a = run(&spec, 0, &PopularitySpec::Uniform, 9);
        assert!(a.iter().all(|r| (3..=9).contains(&r.prompt_tokens)));
        assert!(a.iter().any(|r| r.prompt_tokens == 3));
        assert!(a.iter().any(|r| r.prompt_tokens == 9));
        assert!(a.iter().all(|r| r.output_tokens == 4), "fixed output");
    }

    #[test]
    fn lognormal_median_and_clamps() {
        let mut spec = poisson(1.0, 50_000);
        spec.input = Some(LengthSpec::LogNormal {
            median: 200.0,
            sigma: 0.8,
            min: 10,
            max: 2_000,
        });
        let a = run(&spec, 0, &PopularitySpec::Uniform, 10);
        let mut lengths: Vec<u32> = a.iter().map(|r| r.prompt_tokens).collect();
        lengths.sort_unstable();
        let median = f64::from(lengths[lengths.len() / 2]);
        assert!((median / 200.0 - 1.0).abs() < 0.03, "median {median}");
        assert_eq!(lengths[0], 10, "clamped at min");
        assert_eq!(*lengths.last().expect("non-empty"), 2_000, "clamped at max");
    }

    #[test]
    fn requests_and_duration_caps() {
        let mut spec = poisson(100.0, 500);
        spec.duration_s = Some(1_000.0);
        assert_eq!(
            run(&spec, 0, &PopularitySpec::Uniform, 11).len(),
            500,
            "requests first"
        );

        spec.requests = None;
        spec.duration_s = Some(10.0);
        let a = run(&spec, 0, &PopularitySpec::Uniform, 11);
        assert!(a.last().expect("non-empty").time <= Nanos::from_secs_f64(10.0));
        // 1000 expected, sd ~32.
        assert!(
            (850..=1_150).contains(&a.len()),
            "duration-capped count {}",
            a.len()
        );

        spec.requests = Some(100_000);
        assert_eq!(
            run(&spec, 0, &PopularitySpec::Uniform, 11),
            a,
            "duration first"
        );
    }

    #[test]
    fn base_model_fraction_share_and_tenants() {
        let mut spec = poisson(1.0, 100_000);
        spec.base_model_fraction = 0.3;
        spec.tenants = Some(4);
        let a = run(&spec, 8, &PopularitySpec::Uniform, 12);
        let base = a.iter().filter(|r| r.adapter.is_none()).count() as f64 / a.len() as f64;
        assert!((base - 0.3).abs() < 0.01, "base share {base}");
        assert!(a.iter().all(|r| r.adapter.is_none_or(|x| x < 8)));
        let mut tenants = [0u64; 4];
        for r in &a {
            tenants[r.tenant.expect("tenants modelled") as usize] += 1;
        }
        assert!(
            tenants
                .iter()
                .all(|&c| (c as f64 / a.len() as f64 - 0.25).abs() < 0.01),
            "{tenants:?}"
        );

        spec.base_model_fraction = 1.0;
        assert!(run(&spec, 8, &PopularitySpec::Uniform, 12)
            .iter()
            .all(|r| r.adapter.is_none()));
    }

    /// A file in the temp folder, removed on drop.
    struct TempTrace(PathBuf);

    impl TempTrace {
        fn new(name: &str, text: &str) -> TempTrace {
            let path = std::env::temp_dir()
                .join(format!("slora-workload-{}-{name}.csv", std::process::id()));
            std::fs::write(&path, text).expect("write temp trace");
            TempTrace(path)
        }
    }

    impl Drop for TempTrace {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn trace_spec(path: &Path) -> WorkloadSpec {
        WorkloadSpec {
            arrivals: None,
            duration_s: None,
            requests: None,
            input: None,
            output: None,
            trace: Some(TraceSpec {
                path: path.to_path_buf(),
                time_scale: 1.0,
                limit: None,
                max_prompt_tokens: None,
                max_output_tokens: None,
            }),
            base_model_fraction: 0.0,
            tenants: None,
        }
    }

    fn replay(spec: &WorkloadSpec, base_dir: &Path) -> Result<Vec<Arrival>, WorkloadError> {
        generate(spec, 4, &PopularitySpec::Uniform, &mut rng(13), base_dir)
    }

    #[test]
    fn trace_replay_crosses_midnight_sorts_and_clamps() {
        // CRLF like the real Azure files; one row out of order; a zero-token row.
        let file = TempTrace::new(
            "midnight",
            "TIMESTAMP,ContextTokens,GeneratedTokens\r\n\
             2023-12-31 23:59:59.9000000,100,20\r\n\
             2024-01-01 00:00:00.1500000,5000,0\r\n\
             2023-12-31 23:59:59.9500000,7,3\r\n\
             2024-01-01 00:00:01.9,8,9\r\n",
        );
        let mut spec = trace_spec(&file.0);
        let a = replay(&spec, Path::new("/nonexistent")).expect("absolute path ignores base_dir");
        let times: Vec<u64> = a.iter().map(|r| r.time.0).collect();
        assert_eq!(times, [0, 50_000_000, 250_000_000, 2_000_000_000]);
        assert_eq!(
            (a[1].prompt_tokens, a[1].output_tokens),
            (7, 3),
            "out-of-order row sorted in"
        );
        assert_eq!(a[2].output_tokens, 1, "zero tokens raised to 1");
        assert!(a.iter().all(|r| r.adapter.is_some_and(|x| x < 4)));

        let trace = spec.trace.as_mut().expect("trace");
        trace.max_prompt_tokens = Some(1_000);
        trace.time_scale = 0.5;
        trace.limit = Some(3);
        let a = replay(&spec, Path::new(".")).expect("valid");
        assert_eq!(
            a.iter().map(|r| r.time.0).collect::<Vec<_>>(),
            [0, 25_000_000, 125_000_000]
        );
        assert_eq!(a[2].prompt_tokens, 1_000, "clamped to max_prompt_tokens");

        spec.requests = Some(2);
        assert_eq!(replay(&spec, Path::new(".")).expect("valid").len(), 2);
        spec.requests = None;
        spec.duration_s = Some(0.1);
        assert_eq!(
            replay(&spec, Path::new(".")).expect("valid").len(),
            2,
            "duration on scaled time"
        );
    }

    #[test]
    fn trace_relative_path_resolves_against_base_dir() {
        let file = TempTrace::new(
            "relative",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,2\n",
        );
        let name = file.0.file_name().expect("file name");
        let a = replay(&trace_spec(Path::new(name)), &std::env::temp_dir()).expect("resolved");
        assert_eq!(a.len(), 1);
        let err = replay(&trace_spec(Path::new(name)), Path::new("/nonexistent-dir"))
            .expect_err("missing");
        assert!(matches!(err, WorkloadError::TraceIo { .. }));
        assert!(err.to_string().contains("/nonexistent-dir/"), "{err}");
    }

    #[test]
    fn trace_errors_name_file_line_and_column() {
        let file = TempTrace::new(
            "malformed",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.99,39x,109\n",
        );
        let err = replay(&trace_spec(&file.0), Path::new(".")).expect_err("bad row");
        match &err {
            WorkloadError::TraceRow {
                path,
                line,
                column,
                text,
                ..
            } => {
                assert_eq!(
                    (path, *line, *column, text.as_str()),
                    (&file.0, 3, 2, "39x")
                );
            }
            other => panic!("wrong error {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&file.0.display().to_string()) && message.contains("line 3"),
            "{message}"
        );

        for (row, column) in [
            ("2023-02-29 00:00:00,1,1", 1), // not a leap year
            ("2023-11-16 24:00:00,1,1", 1),
            ("2023-11-16,1,1", 1),
            ("2023-11-16 18:15:46.1234567890,1,1", 1),
            ("2023-11-16 18:15:46,-1,1", 2),
            ("2023-11-16 18:15:46,1", 3),
        ] {
            let file = TempTrace::new(
                "row",
                &format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{row}\n"),
            );
            match replay(&trace_spec(&file.0), Path::new(".")) {
                Err(WorkloadError::TraceRow {
                    line: 2, column: c, ..
                }) if c == column => {}
                other => panic!("{row}: expected a row error in column {column}, got {other:?}"),
            }
        }

        let file = TempTrace::new("header", "time,prompt,output\n2023-11-16 18:15:46,1,1\n");
        let err = replay(&trace_spec(&file.0), Path::new(".")).expect_err("bad header");
        assert!(
            matches!(
                err,
                WorkloadError::TraceHeader {
                    missing: "TIMESTAMP",
                    ..
                }
            ),
            "{err}"
        );
        let file = TempTrace::new("empty", "TIMESTAMP,ContextTokens,GeneratedTokens\n\n");
        let err = replay(&trace_spec(&file.0), Path::new(".")).expect_err("no rows");
        assert!(matches!(err, WorkloadError::TraceEmpty { .. }), "{err}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2023, 11, 16), 19_677);
        assert_eq!(days_from_civil(1600, 2, 29), -135_081);
        for days in [-135_081, -1, 0, 11_017, 19_677, 20_785, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 28),
            2,
            "leap day"
        );
        let ts = parse_timestamp("2023-11-16 18:15:46.6805900").expect("valid");
        assert_eq!(
            ts,
            (19_677 * 86_400 + 18 * 3600 + 15 * 60 + 46) * 1_000_000_000 + 680_590_000
        );
    }

    #[test]
    fn replays_azure_conversation_trace() {
        let traces = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
        if !traces.is_dir() {
            println!("skipping: {} is absent", traces.display());
            return;
        }
        let spec = trace_spec(Path::new("AzureLLMInferenceTrace_conv.csv"));
        let a = generate(
            &spec,
            100,
            &PopularitySpec::Power { alpha: 0.5 },
            &mut rng(14),
            &traces,
        )
        .expect("replays");
        // The file has 19,367 lines (CRLF, no final newline): a header and 19,366 rows.
        assert_eq!(a.len(), 19_366);
        assert_eq!(a[0].time, Nanos(0));
        // 18:15:46.6805900 -> 18:15:50.9951690.
        assert_eq!(a[1].time, Nanos(4_314_579_000));
        assert_eq!((a[0].prompt_tokens, a[0].output_tokens), (374, 44));
        assert!(a.windows(2).all(|w| w[0].time <= w[1].time));
        // The trace spans about 58 minutes.
        let span = a.last().expect("rows").time.as_secs_f64();
        assert!((3_000.0..3_600.0).contains(&span), "span {span}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let law = PopularitySpec::Uniform;
        // A valid synthetic (or trace) spec with one edit applied.
        let edit = |f: &dyn Fn(&mut WorkloadSpec)| {
            let mut s = poisson(1.0, 10);
            f(&mut s);
            s
        };
        let edit_trace = |f: &dyn Fn(&mut TraceSpec)| {
            let mut s = trace_spec(Path::new("t.csv"));
            if let Some(t) = s.trace.as_mut() {
                f(t);
            }
            s
        };
        let log_normal = |median, sigma| {
            Some(LengthSpec::LogNormal {
                median,
                sigma,
                min: 1,
                max: 5,
            })
        };
        let cases: Vec<(WorkloadSpec, &str)> = vec![
            (poisson(0.0, 10), "workload.arrivals.rate"),
            (poisson(f64::INFINITY, 10), "workload.arrivals.rate"),
            (
                edit(&|s| s.arrivals = Some(ArrivalSpec::Gamma { rate: 1.0, cv: 0.0 })),
                "workload.arrivals.cv",
            ),
            (poisson(1.0, 0), "workload.requests"),
            (poisson(1.0, MAX_REQUESTS + 1), "workload.requests"),
            (edit(&|s| s.duration_s = Some(-1.0)), "workload.duration_s"),
            (edit(&|s| s.requests = None), "workload.duration_s"),
            (
                edit(&|s| (s.requests, s.duration_s) = (None, Some(1e8))),
                "workload.duration_s",
            ),
            (edit(&|s| s.arrivals = None), "workload.arrivals"),
            (edit(&|s| s.input = None), "workload.input"),
            (edit(&|s| s.output = None), "workload.output"),
            (
                edit(&|s| s.input = Some(LengthSpec::Fixed { value: 0 })),
                "workload.input.value",
            ),
            (
                edit(&|s| s.input = Some(LengthSpec::Uniform { min: 0, max: 5 })),
                "workload.input.min",
            ),
            (
                edit(&|s| s.output = Some(LengthSpec::Uniform { min: 6, max: 5 })),
                "workload.output.max",
            ),
            (
                edit(&|s| s.input = log_normal(0.0, 1.0)),
                "workload.input.median",
            ),
            (
                edit(&|s| s.input = log_normal(3.0, -1.0)),
                "workload.input.sigma",
            ),
            (
                edit(&|s| s.base_model_fraction = 1.5),
                "workload.base_model_fraction",
            ),
            (
                edit(&|s| s.base_model_fraction = f64::NAN),
                "workload.base_model_fraction",
            ),
            (edit(&|s| s.tenants = Some(0)), "workload.tenants"),
            (
                edit_trace(&|t| t.time_scale = 0.0),
                "workload.trace.time_scale",
            ),
            (edit_trace(&|t| t.limit = Some(0)), "workload.trace.limit"),
            (
                edit_trace(&|t| t.max_output_tokens = Some(0)),
                "workload.trace.max_output_tokens",
            ),
        ];
        for (spec, field) in cases {
            let err = spec.validate().expect_err(field);
            let message = err.to_string();
            assert!(message.starts_with(field), "{field}: {message}");
            // generate() validates too, so bad input never reaches a sampler.
            assert!(
                generate(&spec, 1, &law, &mut rng(0), Path::new(".")).is_err(),
                "{field}"
            );
        }
        assert!(
            trace_spec(Path::new("t.csv")).validate().is_ok(),
            "a trace needs no arrivals, input or output"
        );

        let err = PopularitySpec::Power { alpha: 0.0 }
            .validate()
            .expect_err("alpha 0");
        assert!(
            err.to_string().starts_with("adapters.popularity.alpha"),
            "{err}"
        );
        let err = PopularitySpec::Zipf { s: -0.5 }
            .validate_at("mix.popularity")
            .expect_err("s < 0");
        assert!(
            err.to_string().starts_with("mix.popularity.s = -0.5"),
            "{err}"
        );
        assert!(PopularitySpec::Zipf { s: 0.0 }.validate().is_ok());
    }

    #[test]
    fn spec_parses_from_yaml() {
        let spec: WorkloadSpec = serde_yaml::from_str(
            "arrivals: {process: gamma, rate: 2.0, cv: 3.0}\nrequests: 10\n\
             input: {dist: log_normal, median: 100, sigma: 0.5, min: 1, max: 4096}\n\
             output: {dist: uniform, min: 1, max: 64}\nbase_model_fraction: 0.1\n",
        )
        .expect("parses");
        assert_eq!(
            spec.arrivals,
            Some(ArrivalSpec::Gamma { rate: 2.0, cv: 3.0 })
        );
        spec.validate().expect("valid");
        let law: PopularitySpec = serde_yaml::from_str("{law: power, alpha: 0.5}").expect("parses");
        assert_eq!(law, PopularitySpec::Power { alpha: 0.5 });
    }
}
