//! What `slora-plan calibrate` measured, as plain data: no CUDA needed to read, write or fit
//! it. `calibrate` (behind the `cuda` feature) fills a [`Calibration`] on the GPU; the binary
//! saves it beside the profile it derives, so a profile can be derived again from the same
//! measurements (`slora-plan calibrate --refit`) when the fitting changes, without a GPU.

use serde::{Deserialize, Serialize};
use slora_engine::{ModelSpec, TargetModule};

/// Robust statistics of one point (seconds).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stat {
    pub median_s: f64,
    pub p10_s: f64,
    pub p90_s: f64,
    pub samples: u32,
}

impl Stat {
    /// The median and the 10th and 90th percentiles (nearest rank) of `v`; `v` is not empty.
    pub fn of(mut v: Vec<f64>) -> Stat {
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Stat {
            median_s: q(0.5),
            p10_s: q(0.1),
            p90_s: q(0.9),
            samples: v.len() as u32,
        }
    }
}

/// Everything `calibrate` measured for one model on one GPU.
///
/// Phase grids (`base_gemm` ... `lora_prefill_expand`) are GPU times between CUDA events
/// recorded around each phase of real steps; the `*_steps` fields are whole steps timed on the
/// host as the executor runs them, without events. Events cost launch slots and split the
/// work into serialised pieces, so where a phase is a few microseconds per layer (LoRA at small
/// batches) the event-timed sum overstates what the phase adds to a step: the LoRA grids are
/// scaled to the whole steps with and without adapters, and the other whole steps check the
/// sum of the parts (`slora-plan calibrate`'s report).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Date of the measurement, ISO 8601 (filled by the caller, which has a clock).
    #[serde(default)]
    pub date: String,
    pub gpu_name: String,
    pub gpu_memory_bytes: u64,
    pub driver_version: String,
    pub cuda_version: String,
    pub model: ModelSpec,
    pub lora_targets: Vec<TargetModule>,
    pub base_gemm: Vec<(u32, Stat)>,
    pub lm_head: Vec<(u32, Stat)>,
    pub attention_prefill: Vec<(u32, u32, Stat)>,
    pub attention_decode: Vec<(u32, u32, Stat)>,
    pub lora_shrink: Vec<(u32, u32, u32, Stat)>,
    pub lora_expand: Vec<(u32, u32, u32, Stat)>,
    pub lora_prefill_shrink: Vec<(u32, u32, u32, Stat)>,
    pub lora_prefill_expand: Vec<(u32, u32, u32, Stat)>,
    pub host_to_device: Vec<(u64, Stat)>,
    pub fixed_overhead: Stat,
    pub sampling_per_token: Stat,
    /// Whole decode steps as the executor runs them (host-timed, no events): `(batch,
    /// context, seconds)`, for checking a cost model's sum of parts against real steps.
    pub decode_steps: Vec<(u32, u32, Stat)>,
    /// Of the same steps, the host seconds before the first kernel was enqueued (the step's
    /// tables built and uploaded: `GpuExecutor::last_host_prep_s`), `(batch, context,
    /// seconds)`. From session 25; empty in measurements taken before. Not used by the fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_step_prep: Vec<(u32, u32, Stat)>,
    /// Whole steps with a prompt, as a server runs them: one prompt of `prefill` tokens
    /// (context 0) beside `decode` decode rows at context `MIXED_CONTEXT`, the requests on
    /// the LoRA grid's adapters of rank `mixed_rank` round robin (`min(decode + 1, adapters)`
    /// distinct); host-timed, no events.
    pub mixed_steps: Vec<(u32, u32, Stat)>,
    pub mixed_rank: u32,
    /// Distinct adapters the mixed steps' requests take round robin.
    pub mixed_adapters: u32,
    /// The LoRA decode grid's steps, whole and host-timed: `(tokens, adapters, rank, seconds)`
    /// at the points of `lora_shrink`, and `lora_base_steps` the same steps without adapters
    /// `(tokens, seconds)`: their difference is what the adapters add to a step.
    #[serde(default)]
    pub lora_steps: Vec<(u32, u32, u32, Stat)>,
    #[serde(default)]
    pub lora_base_steps: Vec<(u32, Stat)>,
    /// The same for prompt segments: `(tokens, segments, rank, seconds)` at the points of
    /// `lora_prefill_shrink`, and without adapters `(tokens, segments, seconds)`.
    #[serde(default)]
    pub lora_prefill_steps: Vec<(u32, u32, u32, Stat)>,
    #[serde(default)]
    pub lora_prefill_base_steps: Vec<(u32, u32, Stat)>,
    /// Whole decode steps with adapters of mixed ranks: `(rows, seconds)` at context 16 (as
    /// `lora_steps`), row `i` on an adapter of rank `mixed_rank_ranks[i % len]`, the first
    /// `min(rows, mixed_rank_adapters)` of them distinct; host-timed. The LoRA grids time one
    /// rank at a time; these check how a mixed batch is priced. Empty before session 8.
    #[serde(default)]
    pub mixed_rank_steps: Vec<(u32, Stat)>,
    #[serde(default)]
    pub mixed_rank_ranks: Vec<u32>,
    #[serde(default)]
    pub mixed_rank_adapters: u32,
    /// Whole decode steps with adapters of mixed ranks, by mix (from session 9; replaces the
    /// three fields above, which stay for measurements taken before).
    #[serde(default)]
    pub rank_mixes: Vec<RankMixSteps>,
    /// Decode steps whose requests read different numbers of cached rows, without adapters
    /// (from session 11): the `attention_decode` grid measures batches of one context, and
    /// live batches mix contexts of 9 to 1,000 rows (docs/FIDELITY.md, session 10: their
    /// attention cost 5-13% more at 16-47 rows than the grid says at the same rows and mean
    /// context). Empty in measurements taken before.
    #[serde(default)]
    pub spread_decode_steps: Vec<SpreadDecodeStep>,
    /// What decode rows' LoRA adds to a step under conditions the LoRA grid holds fixed (from
    /// session 18; absent before, and not written when empty). The grid's whole steps are at
    /// context 16 with rows on their adapters round robin; a live S1 cell's rank-8 LoRA added
    /// 22-38% less at 64-159 rows than the grid prices (docs/FIDELITY.md, session 18), so
    /// these steps vary the context and the popularity one at a time. Not used by the fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_condition_steps: Vec<LoraConditionStep>,
    /// What decode rows' LoRA adds to steps whose requests read different numbers of cached
    /// rows, as a server's do: every grid rank mixed, and the lowest and the highest alone
    /// (from session 23; absent before, and not written when empty). Host 29's live replays
    /// of S2 and GQA cells (docs/FIDELITY.md, session 23) found the adapters adding 10-34%
    /// less than the grid prices from 96 rows, while the grid's own mixed-rank steps at
    /// context 16 match it within 1-3%. Not used by the fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_spread_steps: Vec<LoraSpreadStep>,
    /// The cuBLASLt version (`cublasLtGetVersion`) and the base GEMMs' algorithm for each
    /// token bucket the calibration's executor tuned: `(bucket top, in, out, accumulate,
    /// cuBLASLt's opaque algorithm)`. The grids above were measured with these algorithms, so
    /// a server that adopts them runs what the profile prices (from session 16; empty before).
    #[serde(default)]
    pub cublaslt_version: Option<u64>,
    #[serde(default)]
    pub gemm_algorithms: Vec<GemmBucket>,
}

/// One decode step of [`Calibration::lora_condition_steps`]: `tokens` rows at `context`
/// cached rows each, on `adapters` adapters of `rank`, round robin or by Zipf(1) popularity
/// ([`zipf_rows`]); the step with its adapters and the same rows without (host-timed, no
/// events, as the grid's `lora_steps` and `lora_base_steps`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConditionStep {
    pub tokens: u32,
    pub adapters: u32,
    pub rank: u32,
    pub context: u32,
    /// Rows on the adapters by Zipf(1) popularity instead of round robin.
    pub zipf: bool,
    pub with: Stat,
    pub without: Stat,
}

/// One decode step of [`Calibration::lora_spread_steps`]: one request per entry of
/// `contexts` (cached rows, batch order), row `i` on an adapter of rank `ranks[i % len]`,
/// the first `min(rows, adapters)` rows on distinct adapters (every rank: as the widest of
/// [`Calibration::rank_mixes`]; one rank: that rank's grid adapters); the step with its
/// adapters and the same rows without, measured together (host-timed, no events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpreadStep {
    /// [`SpreadPattern::name`] of the pattern the contexts follow.
    pub pattern: String,
    pub contexts: Vec<u32>,
    pub ranks: Vec<u32>,
    pub adapters: u32,
    pub with: Stat,
    pub without: Stat,
    /// How rows share the `adapters` when there are more rows than adapters: empty, row `i` on
    /// adapter `i % adapters` (rows sharing one are as far apart as they can be, as in the
    /// grids); [`SHARING_ADJACENT`], each adapter's rows next to each other (session 24's
    /// lead: a block that reads an adapter's rows soon after another may find them in the
    /// L2, as live batches' popular adapters may).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sharing: String,
}

/// [`LoraSpreadStep::sharing`] of steps whose rows on one adapter are adjacent.
pub const SHARING_ADJACENT: &str = "adjacent";
/// [`LoraSpreadStep::sharing`] of the same steps' baseline, rows round robin over the same
/// adapters (the grids' way), named so that the report sets the two side by side.
pub const SHARING_ROUND_ROBIN: &str = "round robin";
/// Distinct adapters of the shared mixed-rank steps of [`Calibration::lora_spread_steps`]:
/// fewer than their rows, as in live cells of 100 adapters at 96-256 rows.
pub const LORA_SHARED_ADAPTERS: u32 = 64;

/// Context patterns of [`Calibration::lora_spread_steps`]: the LoRA grid's own context (16,
/// every row), one long context for every row, and two spreads a server's batches have.
pub const LORA_SPREAD_PATTERNS: [SpreadPattern; 4] = [
    SpreadPattern::Even { lo: 16, hi: 16 },
    SpreadPattern::Even { lo: 512, hi: 512 },
    SpreadPattern::Even { lo: 16, hi: 1024 },
    SpreadPattern::Even { lo: 256, hi: 512 },
];

/// Decode rows of [`Calibration::lora_spread_steps`]: where live LoRA parted from the grid,
/// and below it where it did not.
pub const LORA_SPREAD_TOKENS: [u32; 6] = [32, 64, 96, 128, 160, 192];

/// Decode rows and contexts of [`Calibration::lora_condition_steps`]: the rows where live
/// rank-8 LoRA parted from the grid, the grid's own context and two a server's requests have.
pub const LORA_CONDITION_TOKENS: [u32; 2] = [64, 128];
pub const LORA_CONDITION_CONTEXTS: [u32; 3] = [16, 256, 512];
/// Distinct adapters of [`Calibration::lora_condition_steps`] (on the grid's adapters axis).
pub const LORA_CONDITION_ADAPTERS: u32 = 4;

/// Which of `adapters` adapters each of `rows` rows takes under Zipf(1) popularity, in
/// order: row `b` takes the adapter at quantile `(b + 0.5) / rows` of the distribution, so
/// the shares are exact up to rounding (4 adapters: 48, 24, 16 and 12% of the rows) and no
/// seed is needed. `bench-gpu`'s Zipf column draws its batches so.
pub fn zipf_quantiles(rows: u32, adapters: u32) -> Vec<u32> {
    let weights: Vec<f64> = (1..=adapters.max(1)).map(|k| 1.0 / f64::from(k)).collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    (0..rows)
        .map(|b| {
            let u = (f64::from(b) + 0.5) / f64::from(rows);
            cdf.partition_point(|&c| c < u).min(cdf.len() - 1) as u32
        })
        .collect()
}

/// [`zipf_quantiles`] over a fixed shuffle of the rows: the same shares, with the rows of one
/// adapter scattered over the batch as a server's are (not side by side, which would change
/// what the kernels find in L2).
pub fn zipf_rows(rows: u32, adapters: u32) -> Vec<u32> {
    let in_order = zipf_quantiles(rows, adapters);
    let mut order: Vec<u32> = (0..rows).collect();
    order.sort_by_key(|&b| b.wrapping_mul(0x9E37_79B1));
    let mut adapter_of = vec![0; rows as usize];
    for (k, &row) in order.iter().enumerate() {
        adapter_of[row as usize] = in_order[k];
    }
    adapter_of
}

/// One token bucket's base-GEMM algorithm: `(bucket top, in, out, accumulate, algorithm)`.
pub type GemmBucket = (u32, u32, u32, bool, [u64; 8]);

/// One decode step of requests at different contexts ([`SpreadPattern`]), no adapters: its
/// attention phase (GPU time between events) and the whole step (host-timed, no events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadDecodeStep {
    /// [`SpreadPattern::name`] of the pattern the contexts follow.
    pub pattern: String,
    /// Each request's cached rows, in batch order (the decode row reads them and its own).
    pub contexts: Vec<u32>,
    pub attention: Stat,
    pub step: Stat,
}

/// How the contexts of a measured decode batch spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpreadPattern {
    /// Evenly over `lo..=hi` (the midpoints of `batch` equal slices), as a server's running
    /// requests are when prompts and outputs are uniform in length.
    Even { lo: u32, hi: u32 },
    /// A quarter of the requests (rounded up) at `long`, the rest at `short`: a batch of mostly
    /// short requests with a few long ones.
    Quarter { short: u32, long: u32 },
}

/// The patterns `calibrate` measures: three even spreads from 16 rows (S-LoRA's workloads
/// give contexts of up to 1,024; the Azure conversation trace, up to a few thousand), one
/// narrow spread, and mostly short requests with a few long ones.
pub const SPREAD_PATTERNS: [SpreadPattern; 5] = [
    SpreadPattern::Even { lo: 16, hi: 512 },
    SpreadPattern::Even { lo: 16, hi: 1024 },
    SpreadPattern::Even { lo: 16, hi: 2048 },
    SpreadPattern::Even { lo: 256, hi: 512 },
    SpreadPattern::Quarter {
        short: 64,
        long: 1024,
    },
];

/// Decode batch sizes of the spread steps: where live steps lie, densest at 8-64 rows. From
/// session 23 also between the attention grid's batch sizes (40, 56, 80, 112, 160, 224): with
/// few KV heads decode attention jumps where a wave of blocks fills (Llama-3-8B: 48-64 requests
/// at 512 cached rows, 96-128 at 256), and a spread batch smears the jump by an amount only a
/// batch between the grid's points shows (docs/FIDELITY.md, session 23). The spread excess is
/// fitted at every size measured, so it follows the smeared jump.
pub const SPREAD_BATCHES: [u32; 16] = [
    8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
];

impl SpreadPattern {
    /// A stable name for the measurement file and reports (`even-16-1024`, `quarter-64-1024`).
    pub fn name(&self) -> String {
        match *self {
            SpreadPattern::Even { lo, hi } => format!("even-{lo}-{hi}"),
            SpreadPattern::Quarter { short, long } => format!("quarter-{short}-{long}"),
        }
    }

    /// The contexts of a batch of `batch` requests, in batch order. The order is a fixed
    /// permutation (`i -> i * 7919 mod batch`; 7919 is prime, so it is one for every batch
    /// below it), so long and short requests alternate in the grid as in a server's batch
    /// rather than sitting in one run of blocks.
    pub fn contexts(&self, batch: u32) -> Vec<u32> {
        let n = batch as u64;
        let sorted: Vec<u32> = match *self {
            SpreadPattern::Even { lo, hi } => (0..n)
                .map(|i| lo + ((hi - lo) as u64 * (2 * i + 1) / (2 * n)) as u32)
                .collect(),
            SpreadPattern::Quarter { short, long } => {
                let longs = n.div_ceil(4);
                (0..n)
                    .map(|i| if i < longs { long } else { short })
                    .collect()
            }
        };
        (0..n)
            .map(|i| sorted[((i * 7919) % n.max(1)) as usize])
            .collect()
    }
}

/// Whole decode steps whose rows take adapters of several ranks: `rows` decode rows at context
/// 16 (as `Calibration::lora_steps`), row `i` on an adapter of rank `ranks[i % ranks.len()]`,
/// the first `min(rows, adapters)` rows on distinct adapters and the rest repeating them;
/// host-timed. With `adapters` on the LoRA grid's adapters axis, each step has one-rank
/// counterparts in `lora_steps` (same rows, same distinct adapters): the mix's cost against
/// theirs is what a cost model of mixed ranks must reproduce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankMixSteps {
    pub ranks: Vec<u32>,
    pub adapters: u32,
    /// `(rows, seconds)`.
    pub steps: Vec<(u32, Stat)>,
}

impl Calibration {
    /// Every mix measured: `rank_mixes`, or the single mix of a measurement taken before them.
    pub fn all_rank_mixes(&self) -> Vec<RankMixSteps> {
        let mut mixes = self.rank_mixes.clone();
        if mixes.is_empty()
            && !self.mixed_rank_steps.is_empty()
            && !self.mixed_rank_ranks.is_empty()
        {
            mixes.push(RankMixSteps {
                ranks: self.mixed_rank_ranks.clone(),
                adapters: self.mixed_rank_adapters,
                steps: self.mixed_rank_steps.clone(),
            });
        }
        mixes
    }
}

/// Why measurements cannot be combined: `origin` (a file) and the field where it parts from
/// the first measurement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {field}: {reason}")]
pub struct MergeError {
    pub origin: String,
    pub field: String,
    pub reason: String,
}

impl Calibration {
    /// The point-wise median of several measurements of one model on one kind of GPU, each
    /// named by `origin` (for errors): every point's median is the median of its medians,
    /// its p10 and p90 the lowest and highest of theirs, its samples their sum; the date is
    /// the latest. The measurements must agree in everything else (model, GPU, targets, the
    /// grids' points), or the error names the first field where one parts from the first.
    ///
    /// One calibration's grid points scatter by a few percent between runs and machines,
    /// and where the cost model carries a segment beyond its grid the scatter grows with
    /// the distance: five H200 calibrations priced the LoRA of the same live steps of
    /// 200-256 rows between 3.8 and 6.6 ms. A median over machines averages that out.
    pub fn median_of(measurements: &[(String, Calibration)]) -> Result<Calibration, MergeError> {
        let Some((_, first)) = measurements.first() else {
            return Err(MergeError {
                origin: "(none)".into(),
                field: String::new(),
                reason: "no measurements to combine".into(),
            });
        };
        // What a measurement is of, first: the grids of two models part somewhere less telling.
        for (origin, c) in &measurements[1..] {
            let of = |field: &str, got: String, want: String| {
                MergeError {
                origin: origin.clone(),
                field: field.into(),
                reason: format!(
                    "{got} where {} has {want} (only measurements of one model on one kind of GPU combine)",
                    measurements[0].0
                ),
            }
            };
            if c.model != first.model {
                return Err(of("model", c.model.name.clone(), first.model.name.clone()));
            }
            if c.gpu_name != first.gpu_name {
                return Err(of("gpu_name", c.gpu_name.clone(), first.gpu_name.clone()));
            }
            if c.lora_targets != first.lora_targets {
                let names = |t: &[TargetModule]| format!("{t:?}");
                return Err(of(
                    "lora_targets",
                    names(&c.lora_targets),
                    names(&first.lora_targets),
                ));
            }
        }
        // The GEMM algorithms describe the executor that measured, not a point: kept where
        // every measurement ran the same ones, else dropped (medians over different
        // algorithms are no one algorithm's cost, and a server adopting one set would not
        // run what the combined grid prices).
        let same_algorithms = measurements[1..].iter().all(|(_, c)| {
            c.cublaslt_version == first.cublaslt_version
                && c.gemm_algorithms == first.gemm_algorithms
        });
        let values: Vec<(&str, serde_json::Value)> = measurements
            .iter()
            .map(|(o, c)| {
                let mut c = c.clone();
                c.cublaslt_version = None;
                c.gemm_algorithms.clear();
                (o.as_str(), serde_json::to_value(c).expect("serializes"))
            })
            .collect();
        let merged = merge_values(&values, "")?;
        let mut out: Calibration = serde_json::from_value(merged).map_err(|e| MergeError {
            origin: measurements[0].0.clone(),
            field: String::new(),
            reason: format!("the combination does not read back: {e}"),
        })?;
        out.date = measurements
            .iter()
            .map(|(_, c)| c.date.clone())
            .max()
            .unwrap_or_else(|| first.date.clone());
        if same_algorithms {
            out.cublaslt_version = first.cublaslt_version;
            out.gemm_algorithms = first.gemm_algorithms.clone();
        }
        Ok(out)
    }
}

/// Fields that may differ between measurements: the date (the latest is kept), and what
/// a machine's software or memory size says of it (the first measurement's is kept).
const MAY_DIFFER: [&str; 4] = ["date", "driver_version", "cuda_version", "gpu_memory_bytes"];

fn merge_values(
    values: &[(&str, serde_json::Value)],
    path: &str,
) -> Result<serde_json::Value, MergeError> {
    use serde_json::Value;
    let (origin0, first) = &values[0];
    let differ = |origin: &str, reason: String| MergeError {
        origin: origin.to_string(),
        field: if path.is_empty() {
            "(top)".into()
        } else {
            path.to_string()
        },
        reason,
    };
    match first {
        Value::Object(map) if map.contains_key("median_s") => {
            let stats = values
                .iter()
                .map(|(o, v)| {
                    serde_json::from_value::<Stat>(v.clone())
                        .map_err(|e| differ(o, format!("not a measured point: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut medians: Vec<f64> = stats.iter().map(|s| s.median_s).collect();
            medians.sort_by(f64::total_cmp);
            let n = medians.len();
            let median = if n % 2 == 1 {
                medians[n / 2]
            } else {
                (medians[n / 2 - 1] + medians[n / 2]) / 2.0
            };
            let merged = Stat {
                median_s: median,
                p10_s: stats.iter().map(|s| s.p10_s).fold(f64::INFINITY, f64::min),
                p90_s: stats
                    .iter()
                    .map(|s| s.p90_s)
                    .fold(f64::NEG_INFINITY, f64::max),
                samples: stats.iter().map(|s| s.samples).sum(),
            };
            Ok(serde_json::to_value(merged).expect("serializes"))
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, v0) in map {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if path.is_empty() && MAY_DIFFER.contains(&key.as_str()) {
                    out.insert(key.clone(), v0.clone());
                    continue;
                }
                let mut column = Vec::with_capacity(values.len());
                for (o, v) in values {
                    match v.get(key) {
                        Some(x) => column.push((*o, x.clone())),
                        None => {
                            return Err(MergeError {
                                origin: o.to_string(),
                                field,
                                reason: format!("missing (present in {origin0})"),
                            })
                        }
                    }
                }
                out.insert(key.clone(), merge_values(&column, &field)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (o, v) in values {
                let len = v.as_array().map_or(0, |a| a.len());
                if len != items.len() {
                    return Err(differ(
                        o,
                        format!(
                            "{len} entries where {origin0} has {} (not the same grid)",
                            items.len()
                        ),
                    ));
                }
            }
            for i in 0..items.len() {
                let column: Vec<(&str, Value)> =
                    values.iter().map(|(o, v)| (*o, v[i].clone())).collect();
                out.push(merge_values(&column, &format!("{path}[{i}]"))?);
            }
            Ok(Value::Array(out))
        }
        scalar => {
            for (o, v) in &values[1..] {
                if v != scalar {
                    return Err(differ(
                        o,
                        format!("{v} where {origin0} has {scalar} (only measurements of one model, GPU and grid combine)"),
                    ));
                }
            }
            Ok(scalar.clone())
        }
    }
}

/// The top of the token bucket `t` falls in: powers of two up to 16, then four buckets per
/// octave (17..=20, 21..=24, ..., 449..=512). A GEMM's best algorithm changes with the token
/// count; one algorithm per power-of-two octave, tuned at the first size met, cost up to 20%
/// below the octave's top (the algorithm for 72 tokens run at 128), and which size came first
/// depended on the traffic.
pub fn bucket_top(t: usize) -> usize {
    let octave = t.next_power_of_two();
    if octave <= 16 {
        return octave;
    }
    let step = octave / 8;
    t.div_ceil(step) * step
}

/// The tops of the token buckets of 1 to `max` tokens, increasing: the counts at which the
/// executor tunes its GEMM algorithms (its warm-up) and `calibrate` measures them.
pub fn bucket_tops(max: u32) -> Vec<u32> {
    let mut tops: Vec<u32> = (1..=max).map(|t| bucket_top(t as usize) as u32).collect();
    tops.dedup();
    tops
}

/// The largest token count for which the executor tunes one base-GEMM algorithm per token
/// bucket (`gemm::bucket_top`); above it cuBLASLt's heuristic chooses per shape. Profiles
/// carry it: up to here the GEMMs' cost is a staircase over the buckets.
pub const GEMM_TUNE_MAX_TOKENS: u32 = 512;

/// Token counts of the LoRA grid of decode rows (MBGMV) that `calibrate` measures by default.
/// From one row: below its smallest point the grid is flat, and with 16 as the smallest point
/// live steps of 1-15 decode rows were priced 0.4-0.56 ms high (the 16-row point of one
/// rank-8 adapter is 0.61 ms; bench-gpu measures one row's LoRA at 0.04 ms): docs/FIDELITY.md,
/// session 6.
pub const LORA_DECODE_TOKENS: [u32; 10] = [1, 4, 8, 16, 32, 64, 96, 128, 160, 256];
/// Distinct adapters of that grid. The grid is complete, so it holds points with more
/// adapters than tokens (1 token, 4 adapters): a step cannot hold more distinct adapters than
/// rows, so such a point is measured with one adapter per row and stands for every larger
/// count (the cost model clamps a step's adapters to its tokens the same way).
///
/// Up to 64: live decode steps of 128-256 rows hold 86-190 distinct adapters (S2 with 2,000
/// adapters), and a grid that stopped at 16 priced them by carrying its 4-16 slope twelve
/// times its width, so the noise of two points became a few percent of the step. Each
/// calibration's own check showed it: its 64-adapter mix at 256 rows cost 0.47-0.80 ms more
/// than its 16-adapter one, where the parts added 0.00-0.70 ms (docs/FIDELITY.md, session 10).
/// The adapters of every rank of the grid are resident at once: 64 of ranks 8-64 are 15 GB
/// for Llama-7B, 25 GB for Llama-13B; where the pool cannot hold them the axis stops earlier
/// ([`adapter_counts_that_fit`]).
///
/// And 32 between them: the cost does not grow linearly from 16 to 64. Past 64 each adapter
/// adds only 10-40% of the 16-64 slope (the profiles' `lora_adapters_beyond_grid`, H100
/// Llama-7B), and live H100 steps of 64-95 rows with about 59 distinct adapters, interpolated
/// on the 16-64 chord, were priced 2.6% high where the same rows with 5 or 79 adapters were
/// within 0.5% (docs/FIDELITY.md, session 15). The point costs 40 of the grid's measurements.
pub const LORA_DECODE_ADAPTERS: [u32; 5] = [1, 4, 16, 32, 64];

/// The counts of `wanted` (increasing) whose adapters fit the pool: `n` adapters of every rank
/// in `ranks`, all resident at once, may take at most half of `pool_pages` (the other half
/// holds the grids' KV rows). `pages(rank)` is one adapter's pages. The smallest count is
/// always kept, so a GPU too small for 64 adapters of each rank (Llama-13B on an 80 GB one)
/// still calibrates, on a shorter adapters axis; `calibrate` then says so.
pub fn adapter_counts_that_fit(
    wanted: &[u32],
    ranks: &[u32],
    pages: impl Fn(u32) -> u64,
    pool_pages: u64,
) -> Vec<u32> {
    let per_adapter: u64 = ranks.iter().map(|&r| pages(r)).sum();
    let mut fit: Vec<u32> = wanted
        .iter()
        .copied()
        .filter(|&n| n as u64 * per_adapter * 2 < pool_pages)
        .collect();
    if fit.is_empty() {
        fit.extend(wanted.first());
    }
    fit
}

/// Decode context of the decode rows in `Calibration::mixed_steps`.
pub const MIXED_CONTEXT: u32 = 256;
/// `(prompt tokens, decode rows)` of the whole steps measured for the mixed-step check: every
/// prompt size alone and beside 32 and 128 decode rows. No prompt size is a multiple of 64:
/// the steps choose the base GEMMs' token quantum (64, 128, 256 or none), and at multiples of
/// 64 the candidates price alike (session 4's sizes, 32 to 2,048 in powers of two, could not
/// tell 64 from none: 2.0% against 1.9%).
pub const MIXED_SHAPES: [(u32, u32); 21] = [
    (40, 0),
    (40, 32),
    (40, 128),
    (100, 0),
    (100, 32),
    (100, 128),
    (200, 0),
    (200, 32),
    (200, 128),
    (300, 0),
    (300, 32),
    (300, 128),
    (600, 0),
    (600, 32),
    (600, 128),
    (1000, 0),
    (1000, 32),
    (1000, 128),
    (2000, 0),
    (2000, 32),
    (2000, 128),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_then_eighth_octaves() {
        for (t, top) in [
            (1, 1),
            (3, 4),
            (16, 16),
            (17, 20),
            (20, 20),
            (21, 24),
            (33, 40),
            (64, 64),
            (65, 80),
            (72, 80),
            (128, 128),
            (129, 160),
            (136, 160),
            (255, 256),
            (257, 320),
            (384, 384),
            (385, 448),
            (512, 512),
        ] {
            assert_eq!(bucket_top(t), top, "{t}");
        }
        let tops = bucket_tops(512);
        assert_eq!(tops.len(), 25);
        assert_eq!(tops[..6], [1, 2, 4, 8, 16, 20]);
        assert!((1..=512).all(|t| bucket_top(t) >= t));
    }

    #[test]
    fn the_adapters_axis_stops_where_the_pool_does() {
        // Llama-7B: a rank-r adapter on q, k, v, o is 4r pages; ranks 8-64, 212,000 pages.
        let pages = |r: u32| 4 * r as u64;
        let ranks = [8, 16, 32, 64];
        assert_eq!(
            adapter_counts_that_fit(&LORA_DECODE_ADAPTERS, &ranks, pages, 212_000),
            vec![1, 4, 16, 32, 64]
        );
        // 64 of each rank need 30,720 pages, twice that may not pass the pool's half: with
        // 50,000 the axis ends at 32 (30,720 pages for both halves), with 30,000 at 16.
        assert_eq!(
            adapter_counts_that_fit(&LORA_DECODE_ADAPTERS, &ranks, pages, 50_000),
            vec![1, 4, 16, 32]
        );
        assert_eq!(
            adapter_counts_that_fit(&LORA_DECODE_ADAPTERS, &ranks, pages, 30_000),
            vec![1, 4, 16]
        );
        // Never empty.
        assert_eq!(
            adapter_counts_that_fit(&LORA_DECODE_ADAPTERS, &ranks, pages, 10),
            vec![1]
        );
    }

    #[test]
    fn zipf_rows_give_exact_shares_scattered_over_the_batch() {
        let rows = zipf_rows(128, 4);
        let count = |a: u32| rows.iter().filter(|&&x| x == a).count();
        // Zipf(1) over 4: 12/25, 6/25, 4/25, 3/25 of 128 rows (61.4, 30.7, 20.5, 15.4),
        // rounded where the quantiles (k + 0.5) / 128 cross the CDF's steps.
        assert_eq!([count(0), count(1), count(2), count(3)], [61, 31, 21, 15]);
        assert_eq!(rows.len(), 128);
        // Scattered: the most popular adapter's rows are not one block.
        let first = rows.iter().position(|&a| a == 0).unwrap();
        let last = rows.iter().rposition(|&a| a == 0).unwrap();
        assert!(
            last - first + 1 > count(0),
            "adapter 0's rows are side by side"
        );
        assert!(rows[..8].iter().any(|&a| a != 0));
        // The same shares as in order, where adapter 0's rows come first.
        let mut sorted = rows.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, zipf_quantiles(128, 4));
        assert!(zipf_quantiles(128, 4)[..61].iter().all(|&a| a == 0));
        // bench-gpu's batches over 1,000 adapters: the distinct counts its logs record
        // (BENCHMARKS.md, sessions 9-18).
        for (batch, distinct) in [(1, 1), (32, 27), (64, 49), (128, 86), (256, 149)] {
            let mut d = zipf_quantiles(batch, 1000);
            d.dedup();
            assert_eq!(d.len(), distinct, "batch {batch}");
        }
        // One adapter takes every row; no rows, no adapters.
        assert!(zipf_rows(10, 1).iter().all(|&a| a == 0));
        assert!(zipf_rows(0, 4).is_empty());
        assert_eq!(zipf_rows(3, 0), vec![0, 0, 0]);
    }

    #[test]
    fn spread_patterns_give_every_context_once_in_a_shuffled_order() {
        let even = SpreadPattern::Even { lo: 16, hi: 1024 };
        let c = even.contexts(8);
        let mut sorted = c.clone();
        sorted.sort();
        // Midpoints of eight slices of 16..1024 (126 rows each).
        assert_eq!(sorted, vec![79, 205, 331, 457, 583, 709, 835, 961]);
        assert_ne!(c, sorted, "the batch order is shuffled");
        let quarter = SpreadPattern::Quarter {
            short: 64,
            long: 1024,
        }
        .contexts(10);
        assert_eq!(quarter.iter().filter(|&&x| x == 1024).count(), 3);
        assert_eq!(quarter.iter().filter(|&&x| x == 64).count(), 7);
        for pattern in SPREAD_PATTERNS {
            for batch in SPREAD_BATCHES {
                let c = pattern.contexts(batch);
                assert_eq!(c.len(), batch as usize, "{}", pattern.name());
                assert!(c.iter().all(|&x| x >= 16), "{}", pattern.name());
            }
        }
        assert_eq!(even.name(), "even-16-1024");
    }
}
