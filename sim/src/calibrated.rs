//! The calibrated cost model: step costs looked up in the kernel times that `slora-plan
//! calibrate` measured on a real GPU ([`CalibrationProfile`]), labelled
//! [`Provenance::Calibrated`]; the accuracy of a profile against itself ([`leave_one_out`],
//! [`profile_report`]); the efficiency fit that carries an H200 calibration over to the
//! catalogue's other GPUs ([`fit_efficiency`]); the profiles embedded in the binary
//! ([`embedded_profiles`]) and the choice between calibrated and derived ([`cost_model_for`]).
//!
//! # Interpolation
//!
//! Every grid is interpolated piecewise-linearly between its measured points, multilinearly
//! over several axes, in the coordinate where the kernel's time is closest to affine:
//!
//! * `base_gemm`, `lm_head` (tokens): linear in tokens. A GEMM streams its weights once and
//!   adds a fixed cost per token row, so the time is affine in tokens on both sides of the
//!   roofline's bend; a log axis would bow every affine segment.
//! * `attention_decode` (batch, context): bilinear in (batch, context), exact for any time of
//!   the form `a + b·batch + c·context + d·batch·context` (launch, per-request work, the
//!   critical path of one request, KV rows read).
//! * `attention_prefill` (tokens, context): linear in context (attended pairs and so time are
//!   affine in it at a fixed chunk), and along tokens linear in the chunk's *attended pairs*
//!   `tokens·context + tokens·(tokens+1)/2` at that context. The causal part grows with the
//!   square of the chunk; in pairs that is a straight line, where a linear token axis would
//!   overestimate mid-segment by up to 11% between grid points a factor 2 apart.
//! * `lora_shrink`, `lora_expand` (tokens, adapters, rank): trilinear, exact for any
//!   multilinear time (activations per token, adapter rows per adapter, FLOPs per token·rank).
//! * `host_to_device` (bytes): linear in bytes (latency + bytes / bandwidth is affine).
//!
//! Beyond a grid's range a value continues along its outermost segment, with the slope
//! clamped at zero from below (a noisy last segment never makes a longer step cheaper), and
//! is clamped at zero (never negative). An axis measured at one value only is constant along
//! it. Inside the grid the interpolant is monotone wherever the measurements are; no input
//! gives NaN (every axis value and every time is finite, and segments have positive width).
//!
//! How a step's shape (sums, and a histogram of decode contexts) becomes grid lookups is
//! written down in [`CalibratedCost`]'s documentation, part by part.
//!
//! `step_cost` allocates nothing: a dozen binary searches over axes of a few dozen values and,
//! for decode, at most 136 bilinear lookups (16 histogram buckets, every suffix of them). With
//! 256 decode requests over 8 buckets, two prefill chunks and LoRA it takes about 0.4 µs (the
//! derived model: 0.05 µs), against the engine's 2.4-4.6 µs per iteration.

use crate::cost::{
    attention_flops_per_context_row, check_targets, find_gpu, gemm_groups, lora_elems,
    AnalyticCost, BatchShape, CalibrationProfile, CostError, CostModel, Efficiency, ExtraChunks,
    GpuSpec, Measured, Provenance, SmoothMax, StepCost,
};
use serde::Serialize;
use slora_engine::plan::ContextHistogram;
use slora_engine::{ModelSpec, Nanos, TargetModule};
use std::fmt::Write as _;
use std::path::Path;

// =============================================================================================
// Interpolation
// =============================================================================================

/// Where `x` falls on a sorted axis: the segment `lo..=hi` and the weight `w` of `hi`
/// (`0..=1` inside the segment, outside it beyond the axis' range).
#[derive(Clone, Copy, Debug, Default)]
struct Segment {
    lo: usize,
    hi: usize,
    w: f64,
}

/// O(log n). An axis of one value gives the segment `0..=0`.
fn locate(axis: &[f64], x: f64) -> Segment {
    let n = axis.len();
    if n < 2 {
        return Segment::default();
    }
    let lo = axis
        .partition_point(|&v| v <= x)
        .saturating_sub(1)
        .min(n - 2);
    let hi = lo + 1;
    Segment {
        lo,
        hi,
        w: (x - axis[lo]) / (axis[hi] - axis[lo]),
    }
}

/// The value at weight `w` between `a` (0) and `b` (1). Outside `0..=1` it continues along
/// the segment with its slope clamped at zero from below; the result is never negative.
fn lerp(a: f64, b: f64, w: f64) -> f64 {
    let v = if (0.0..=1.0).contains(&w) {
        a + w * (b - a)
    } else if w > 1.0 {
        b + (w - 1.0) * (b - a).max(0.0)
    } else {
        a + w * (b - a).max(0.0)
    };
    v.max(0.0)
}

/// A complete grid of up to three axes, values row-major with the last axis fastest (the
/// order [`CalibrationProfile`] stores points in).
#[derive(Clone, Debug)]
struct Grid<const N: usize> {
    axes: [Vec<f64>; N],
    strides: [usize; N],
    values: Vec<f64>,
}

impl<const N: usize> Grid<N> {
    /// From a profile grid's points (validated: sorted, complete, no duplicates).
    fn new(points: impl Iterator<Item = ([u64; N], f64)>) -> Grid<N> {
        assert!((1..=3).contains(&N), "grids have one to three axes");
        let (keys, values): (Vec<[u64; N]>, Vec<f64>) = points.unzip();
        let axes: [Vec<f64>; N] = std::array::from_fn(|axis| {
            let mut v: Vec<u64> = keys.iter().map(|k| k[axis]).collect();
            v.sort_unstable();
            v.dedup();
            v.into_iter().map(|x| x as f64).collect()
        });
        let mut strides = [1; N];
        for axis in (0..N.saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * axes[axis + 1].len();
        }
        debug_assert_eq!(values.len(), strides[0] * axes[0].len());
        Grid {
            axes,
            strides,
            values,
        }
    }

    fn eval(&self, x: [f64; N]) -> f64 {
        let segments: [Segment; N] = std::array::from_fn(|a| locate(&self.axes[a], x[a]));
        self.eval_at(&segments)
    }

    /// Multilinear interpolation from the `2^N` corners of the segments' cell, reduced one
    /// axis at a time, the last axis first.
    fn eval_at(&self, segments: &[Segment; N]) -> f64 {
        let mut corners = [0.0; 8];
        for (c, corner) in corners.iter_mut().enumerate().take(1 << N) {
            let mut flat = 0;
            for (axis, s) in segments.iter().enumerate() {
                let high = c >> (N - 1 - axis) & 1 == 1;
                flat += if high { s.hi } else { s.lo } * self.strides[axis];
            }
            *corner = self.values[flat];
        }
        for axis in (0..N).rev() {
            let half = 1 << axis;
            for j in 0..half {
                corners[j] = lerp(corners[2 * j], corners[2 * j + 1], segments[axis].w);
            }
        }
        corners[0]
    }
}

/// Attended (query, key) pairs of a causal chunk of `tokens` after `context` cached rows.
fn causal_pairs(tokens: f64, context: f64) -> f64 {
    tokens * context + tokens * (tokens + 1.0) / 2.0
}

/// The prefill attention grid: linear in context; along tokens, linear in attended pairs.
#[derive(Clone, Debug)]
struct PrefillGrid {
    context: Vec<f64>,
    /// `pairs[j][i]`: the attended pairs of `tokens[i]` at `context[j]`, column `j`'s token
    /// axis in the pairs coordinate (strictly increasing, since tokens are).
    pairs: Vec<Vec<f64>>,
    /// `values[i * context.len() + j]`.
    values: Vec<f64>,
    /// The per-launch cost: the smallest context's column extrapolated to zero pairs.
    launch_s: f64,
}

impl PrefillGrid {
    fn new(profile: &CalibrationProfile) -> PrefillGrid {
        let grid = Grid::<2>::new(
            profile
                .attention_prefill
                .iter()
                .map(|p| ([p.tokens as u64, p.context as u64], p.time.median_s)),
        );
        let [tokens, context] = grid.axes;
        let pairs: Vec<Vec<f64>> = context
            .iter()
            .map(|&c| tokens.iter().map(|&t| causal_pairs(t, c)).collect())
            .collect();
        let nc = context.len();
        let launch_s = if tokens.len() < 2 {
            0.0
        } else {
            let s = locate(&pairs[0], 0.0);
            lerp(grid.values[0], grid.values[nc], s.w).min(grid.values[0])
        };
        PrefillGrid {
            context,
            pairs,
            values: grid.values,
            launch_s,
        }
    }

    /// One chunk of `tokens` (may be fractional: a mean) after `context` cached rows.
    fn eval(&self, tokens: f64, context: f64) -> f64 {
        let nc = self.context.len();
        let column = |j: usize| {
            let s = locate(&self.pairs[j], causal_pairs(tokens, self.context[j]));
            lerp(self.values[s.lo * nc + j], self.values[s.hi * nc + j], s.w)
        };
        let c = locate(&self.context, context);
        if c.lo == c.hi {
            return column(c.lo);
        }
        lerp(column(c.lo), column(c.hi), c.w)
    }
}

// =============================================================================================
// The calibrated cost model
// =============================================================================================

/// Step costs interpolated in a [`CalibrationProfile`] measured on one GPU for one model
/// shape and TP degree. Labelled [`Provenance::Calibrated`]. The interpolation in each grid
/// is described in the [module documentation](self); `f` below is a grid so interpolated. Per
/// part, for a step of `T = prefill_tokens + decode_requests` tokens of which
/// `S = prefill_requests + decode_requests` sample:
///
/// * `base_gemm`: `base_gemm(T') + lm_head(S)`, `T'` being `T` rounded up to the profile's
///   token quantum where that applies (above 128 tokens, up to the profile's limit, never past
///   the next measured count).
/// * `attention_decode`, `attention_prefill`, `lora_shrink`, `lora_expand`: the sections below.
/// * `adapter_h2d`: `host_to_device(blocking bytes)` (one copy of that size, at the bandwidth
///   measured for that size), plus what `host_to_device(prefetch bytes)` lasts beyond the rest
///   of the step: prefetches overlap compute on the copy engine, as in [`AnalyticCost`].
/// * `sampling`: `S × sampling_per_token`; `fixed_overhead`: the profile's, once per step,
///   plus, in a step with `P > 0` prompt tokens, the profile's `prompt_step_excess` at `P`
///   (linear between its points, falling linearly to zero below the first, held beyond the
///   last) times the share of those tokens that have an adapter: it was measured on prompts
///   with one, and prompts without cost their parts (the calibration's steps of prompts
///   without adapters: within about 3% of the parts at 64-256 tokens, 4-6% above them with
///   the excess).
///
/// # Decode attention
///
/// The grid measures `batch` requests that all read the same `context` rows. A real batch
/// mixes contexts; the engine hands over a histogram of them (power-of-two buckets with exact
/// per-bucket means, [`ContextHistogram`]). With `B` decode requests, `n_k` of them in bucket
/// `k` at mean context `m_k`:
///
/// ```text
/// share(K) = sum over k in K of (n_k / B_K) * f(B_K, m_k),   B_K = sum over k in K of n_k
/// time     = max( max over suffixes K of the buckets (longest first) of share(K),
///                 f(1, max_decode_context) )
/// ```
///
/// `share(all buckets)` is the main estimate: each request costs its share of a whole batch of
/// this size at its own context, so what a launch costs once (launch latency, the split-K
/// reduce) is counted once and not once per bucket, and the curvature of `f` in context is
/// followed bucket by bucket where a mean would flatten it (for a time affine in context the
/// two agree exactly). The suffixes say that a batch takes at least as long as its longest
/// requests would alone: when the GPU is not saturated (`f` flat in batch), a few long
/// contexts set the kernel's critical path and the mean understates it; `share` alone would
/// even make adding a short request to a long one look cheaper. The last term is the single
/// longest request alone. A shape without a histogram (built by hand) is one bucket at the
/// mean context.
///
/// With the profile's `decode_spread_excess`, a batch of spread contexts then adds what
/// `calibrate`'s batches spread evenly from 16 rows cost beyond this estimate at its rows, in
/// proportion to its spread `s = 1 - mean context / longest context` over theirs (at most all
/// of it; rows held flat beyond the measured range): `time + min(s / s_measured, 1) · excess`,
/// never below zero. A batch of one context (`s = 0`) is unchanged.
///
/// # Prefill attention
///
/// The executor runs all of a step's chunks in one variable-length launch per layer; the grid
/// measures one chunk per launch. The shape carries the chunks' sums, which suffice: the step
/// is modelled as `n = prefill_requests` equal chunks of `t = prefill_tokens / n` tokens that
/// attend the step's pairs (each chunk at the context `c` that gives `pairs / n` pairs; `c >= 0`
/// because the causal pairs are convex in the chunk size), sharing one launch:
///
/// ```text
/// time = max( f(t, c) + (n - 1) * (k * (f(t, c) - launch) + q),  f(max_prefill_tokens, 0) )
/// ```
///
/// where `launch` is the grid's smallest-context column extrapolated to zero pairs, and `k`,
/// `q` the profile's `prefill_extra_chunks` (1 and 0 when absent). With `k = 1` and a time
/// affine in tokens and pairs (launch + KV traffic per token + FLOPs per pair) this is exact
/// whatever the mix of chunks; but a chunk alone does not fill the GPU (a 256-token chunk is
/// 4 tiles per head), and the chunks after the first run in what it leaves idle, so
/// `calibrate` fits `k` (0.72-1.00 on the H100 and H200) and a cost per prompt `q` on whole
/// steps of several prompts. The second term: the step takes at least as long as its longest
/// chunk would alone (its critical path when chunks are very uneven).
///
/// # LoRA
///
/// Each of shrink and expand is looked up at the step's `lora_tokens` and `distinct_adapters`
/// (clamped to `1..=tokens`, as every grid point has), at one rank. The grid measures adapters
/// of one rank; in a mixed batch the rank-dependent work has a part paid per adapter (its A or
/// B rows read once: `distinct_rank_sum`) and a part paid per token (FLOPs, and rows re-read
/// per token: `lora_token_rank`). The grid tells them apart: at fixed tokens and adapters the
/// time's slope in rank is `s = c·adapters + d·tokens`, and `c = ds/d(adapters)` is read off
/// the grid cell (or `d = ds/d(tokens)` when one adapter count was measured). The lookup uses
/// the rank `w·token_rank + (1 - w)·adapter_rank` (the two means) with the per-token share
/// `w = 1 - c·adapters / s` clamped to `[0, 1]` (a half when neither can be read), so the result
/// always lies between the grid at the two mean ranks, and is exact when all ranks are equal.
/// For decode rows, distinct adapters beyond the grid's largest count `A` count as
/// `A + share · (a - A)`, the profile's `lora_adapters_beyond_grid` (1 when absent: the grid
/// extrapolated linearly).
///
/// When the scenario's adapters target other projections than the profile measured
/// (`lora_targets`), LoRA times are scaled by the ratio of the summed input widths (shrink) and
/// output widths (expand): an approximation, named in [`CostModel::describe`].
#[derive(Clone, Debug)]
pub struct CalibratedCost {
    description: String,
    base_gemm: Grid<1>,
    lm_head: Grid<1>,
    prefill: PrefillGrid,
    decode: Grid<2>,
    lora_shrink: Grid<3>,
    lora_expand: Grid<3>,
    /// Shrink and expand of prefill segments (MBGMM), when the profile measured them apart
    /// from decode rows.
    lora_prefill: Option<(Grid<3>, Grid<3>)>,
    host_to_device: Grid<1>,
    fixed_s: f64,
    /// Charged once more per step with prompt tokens (see the profile field).
    prefill_step_s: f64,
    /// Token quantum of the base GEMMs above 128 tokens (see the profile field); 1 = none.
    gemm_quantum: f64,
    /// Above this token count the quantum does not apply (see the profile field).
    gemm_quantum_max_tokens: f64,
    /// Up to this token count the grid holds every GEMM token bucket's top, and a count costs
    /// what the next measured count costs (the profile's `base_gemm_bucket_tops_to`; 0 = none).
    gemm_bucket_tops_to: f64,
    sampling_s: f64,
    shrink_scale: f64,
    expand_scale: f64,
    /// The profile's `lora_rank_mix` by rows, and its row range (held flat beyond it);
    /// `None`: none measured.
    rank_mix: Option<(Grid<1>, f64, f64)>,
    /// The profile's `prompt_step_excess` by prompt tokens, from a point (0, 0), and its last
    /// prompt size (held flat beyond); `None`: none measured.
    prompt_excess: Option<(Grid<1>, f64)>,
    /// The profile's `decode_spread_excess`: (extra seconds, spread) by rows, and the row
    /// range (held flat beyond it); `None`: none measured.
    spread_excess: Option<SpreadExcess>,
    /// The profile's `lora_adapters_beyond_grid` (1: the grids extrapolated linearly).
    adapters_beyond_grid: f64,
    /// The profile's `prefill_extra_chunks` (share 1 and nothing per prompt when absent).
    extra_chunks: ExtraChunks,
}

/// [`CalibratedCost`]'s form of the profile's `decode_spread_excess`.
#[derive(Clone, Debug)]
struct SpreadExcess {
    /// The excess minus `lowest_s`: grids are clamped at zero, and the excess may be negative
    /// (the grid's estimate above the measured time).
    extra_above_lowest: Grid<1>,
    lowest_s: f64,
    spread: Grid<1>,
    first_rows: f64,
    last_rows: f64,
}

impl SpreadExcess {
    /// What a decode batch of this shape costs beyond the grid's estimate, seconds.
    fn of(&self, b: &BatchShape) -> f64 {
        let spread = b.decode_context_spread();
        if spread == 0.0 {
            return 0.0;
        }
        let rows = (b.decode_requests as f64).clamp(self.first_rows, self.last_rows);
        let reference = self.spread.eval([rows]);
        let share = if reference > 0.0 {
            (spread / reference).min(1.0)
        } else {
            0.0
        };
        share * (self.extra_above_lowest.eval([rows]) + self.lowest_s)
    }
}

/// Fields of two model shapes that change kernel times, as `field: profile X, wanted Y`. The
/// name, `max_position` and `rope_theta` do not change a kernel's time and are not compared.
pub fn shape_mismatches(profile: &ModelSpec, wanted: &ModelSpec) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |field: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{field}: profile {a}, wanted {b}"));
        }
    };
    for (field, a, b) in [
        ("hidden_size", profile.hidden_size, wanted.hidden_size),
        ("num_layers", profile.num_layers, wanted.num_layers),
        ("num_heads", profile.num_heads, wanted.num_heads),
        ("num_kv_heads", profile.num_kv_heads, wanted.num_kv_heads),
        (
            "intermediate_size",
            profile.intermediate_size,
            wanted.intermediate_size,
        ),
        ("vocab_size", profile.vocab_size, wanted.vocab_size),
    ] {
        cmp(field, a.to_string(), b.to_string());
    }
    cmp(
        "dtype",
        format!("{:?}", profile.dtype).to_lowercase(),
        format!("{:?}", wanted.dtype).to_lowercase(),
    );
    out
}

/// `GPU x model, date` of a profile, for messages.
pub fn profile_label(p: &CalibrationProfile) -> String {
    format!("{} x {}, {}", p.gpu_name, p.model.name, p.date)
}

fn join_targets(targets: &[TargetModule]) -> String {
    targets
        .iter()
        .map(|t| t.peft_name())
        .collect::<Vec<_>>()
        .join(",")
}

impl CalibratedCost {
    /// A calibrated model of `model` at `tensor_parallel` from `profile`. `targets` are the
    /// projections the scenario's adapters adapt. Errors when the profile is invalid, when its
    /// model shape or TP degree differs from the ones asked for (naming every differing field),
    /// or when `targets` is empty or repeats a projection.
    pub fn new(
        profile: &CalibrationProfile,
        model: &ModelSpec,
        tensor_parallel: u32,
        targets: &[TargetModule],
    ) -> Result<CalibratedCost, CostError> {
        profile.validate(Path::new(&format!("<{}>", profile_label(profile))))?;
        model.validate()?;
        let mut mismatches = shape_mismatches(&profile.model, model);
        if profile.tensor_parallel != tensor_parallel {
            mismatches.push(format!(
                "tensor_parallel: profile {}, wanted {tensor_parallel}",
                profile.tensor_parallel
            ));
        }
        if !mismatches.is_empty() {
            return Err(CostError::ProfileMismatch {
                profile: profile_label(profile),
                wanted: format!("model `{}` at TP {tensor_parallel}", model.name),
                mismatches: mismatches.join("; "),
            });
        }
        check_targets(targets)?;
        let (want_in, want_out) = lora_elems(model, targets);
        let (have_in, have_out) = lora_elems(model, &profile.lora_targets);
        let scaled = {
            let (mut a, mut b) = (targets.to_vec(), profile.lora_targets.clone());
            a.sort_unstable();
            b.sort_unstable();
            a != b
        };
        let mut description = format!(
            "calibrated: {} x {}, TP {}, kernel times measured {} (driver {}, CUDA {})",
            profile.gpu_name,
            model.name,
            tensor_parallel,
            profile.date,
            profile.driver_version,
            profile.cuda_version
        );
        if let Some(source) = &profile.decode_spread_excess_from {
            let _ = write!(
                description,
                "; decode attention over spread contexts as measured on {source}"
            );
        }
        if scaled {
            let _ = write!(
                description,
                "; LoRA times scaled from {} to {} by module widths",
                join_targets(&profile.lora_targets),
                join_targets(targets)
            );
        }
        let lora = |points: &[crate::cost::LoraPoint]| {
            Grid::<3>::new(points.iter().map(|p| {
                (
                    [p.tokens as u64, p.adapters as u64, p.rank as u64],
                    p.time.median_s,
                )
            }))
        };
        let tokens = |points: &[crate::cost::TokensPoint]| {
            Grid::<1>::new(points.iter().map(|p| ([p.tokens as u64], p.time.median_s)))
        };
        Ok(CalibratedCost {
            description,
            base_gemm: tokens(&profile.base_gemm),
            lm_head: tokens(&profile.lm_head),
            prefill: PrefillGrid::new(profile),
            decode: Grid::new(
                profile
                    .attention_decode
                    .iter()
                    .map(|p| ([p.batch as u64, p.context as u64], p.time.median_s)),
            ),
            lora_shrink: lora(&profile.lora_shrink),
            lora_expand: lora(&profile.lora_expand),
            lora_prefill: (!profile.lora_prefill_shrink.is_empty()
                && !profile.lora_prefill_expand.is_empty())
            .then(|| {
                (
                    lora(&profile.lora_prefill_shrink),
                    lora(&profile.lora_prefill_expand),
                )
            }),
            host_to_device: Grid::new(
                profile
                    .host_to_device
                    .iter()
                    .map(|p| ([p.bytes], p.time.median_s)),
            ),
            fixed_s: profile.fixed_overhead.median_s,
            prefill_step_s: profile
                .prefill_step_overhead
                .map_or(0.0, |m| m.median_s.max(0.0)),
            gemm_quantum: profile.base_gemm_token_quantum.unwrap_or(1).max(1) as f64,
            gemm_quantum_max_tokens: profile
                .base_gemm_token_quantum_max_tokens
                .map_or(f64::INFINITY, f64::from),
            gemm_bucket_tops_to: profile.base_gemm_bucket_tops_to.map_or(0.0, f64::from),
            sampling_s: profile.sampling_per_token.median_s,
            shrink_scale: want_in / have_in,
            expand_scale: want_out / have_out,
            rank_mix: profile
                .lora_rank_mix
                .first()
                .zip(profile.lora_rank_mix.last())
                .map(|(first, last)| {
                    let points = profile.lora_rank_mix.iter();
                    (
                        Grid::new(points.map(|p| ([p.rows as u64], p.toward_highest))),
                        first.rows as f64,
                        last.rows as f64,
                    )
                }),
            adapters_beyond_grid: profile.lora_adapters_beyond_grid.unwrap_or(1.0),
            extra_chunks: profile.prefill_extra_chunks.unwrap_or(ExtraChunks {
                share: 1.0,
                per_prompt_s: 0.0,
            }),
            spread_excess: profile
                .decode_spread_excess
                .first()
                .zip(profile.decode_spread_excess.last())
                .map(|(first, last)| {
                    let points = &profile.decode_spread_excess;
                    let lowest_s = points.iter().map(|p| p.extra_s).fold(0.0, f64::min);
                    SpreadExcess {
                        extra_above_lowest: Grid::new(
                            points
                                .iter()
                                .map(|p| ([p.rows as u64], p.extra_s - lowest_s)),
                        ),
                        lowest_s,
                        spread: Grid::new(points.iter().map(|p| ([p.rows as u64], p.spread))),
                        first_rows: first.rows as f64,
                        last_rows: last.rows as f64,
                    }
                }),
            prompt_excess: profile.prompt_step_excess.last().map(|last| {
                let points = std::iter::once(([0u64], 0.0)).chain(
                    profile
                        .prompt_step_excess
                        .iter()
                        .map(|p| ([p.prompt_tokens as u64], p.extra_s)),
                );
                (Grid::new(points), last.prompt_tokens as f64)
            }),
        })
    }

    /// Decode attention of the step, seconds: the model is in the
    /// "Decode attention" section of [`CalibratedCost`].
    fn attention_decode(&self, b: &BatchShape) -> f64 {
        let n = b.decode_requests;
        if n == 0 {
            return 0.0;
        }
        let mut count = [0.0; ContextHistogram::BUCKETS];
        let mut context = [Segment::default(); ContextHistogram::BUCKETS];
        let mut len = 0;
        let contexts = &self.decode.axes[1];
        if b.decode_context_histogram.requests() == n {
            for (k, (c, mean)) in b.decode_context_histogram.buckets().enumerate() {
                count[k] = c as f64;
                context[k] = locate(contexts, mean);
                len = k + 1;
            }
        } else {
            count[0] = n as f64;
            context[0] = locate(contexts, b.decode_context_tokens as f64 / n as f64);
            len = 1;
        }
        let mut time: f64 = 0.0;
        let mut batch = 0.0;
        for first in (0..len).rev() {
            batch += count[first];
            let batch_segment = locate(&self.decode.axes[0], batch);
            let mut sum = 0.0;
            for k in first..len {
                sum += count[k] * self.decode.eval_at(&[batch_segment, context[k]]);
            }
            time = time.max(sum / batch);
        }
        if b.max_decode_context > 0 {
            time = time.max(self.decode.eval([1.0, b.max_decode_context as f64]));
        }
        if let Some(excess) = &self.spread_excess {
            time = (time + excess.of(b)).max(0.0);
        }
        time
    }

    /// Prefill attention of the step, seconds: the model is in the
    /// "Prefill attention" section of [`CalibratedCost`].
    fn attention_prefill(&self, b: &BatchShape) -> f64 {
        if b.prefill_tokens == 0 {
            return 0.0;
        }
        let n = b.prefill_requests.max(1) as f64;
        let t = b.prefill_tokens as f64 / n;
        let context = ((b.prefill_attention_pairs as f64 / n - t * (t + 1.0) / 2.0) / t).max(0.0);
        let one = self.prefill.eval(t, context);
        let ExtraChunks {
            share,
            per_prompt_s,
        } = self.extra_chunks;
        let all = one + (n - 1.0) * (share * (one - self.prefill.launch_s).max(0.0) + per_prompt_s);
        if b.max_prefill_tokens > 0 {
            all.max(self.prefill.eval(b.max_prefill_tokens as f64, 0.0))
        } else {
            all
        }
    }

    /// One LoRA kernel's time, seconds, for `tokens` tokens of `adapters` distinct adapters
    /// whose mean rank is `token_rank` per token and `adapter_rank` per adapter: the model is in
    /// the "LoRA" section of [`CalibratedCost`].
    fn lora_time(
        grid: &Grid<3>,
        tokens: f64,
        adapters: f64,
        token_rank: f64,
        adapter_rank: f64,
    ) -> f64 {
        if (token_rank - adapter_rank).abs() <= 1e-9 * token_rank {
            return grid.eval([tokens, adapters, token_rank]);
        }
        let w = Self::token_share(grid, tokens, adapters, 0.5 * (token_rank + adapter_rank));
        grid.eval([tokens, adapters, w * token_rank + (1.0 - w) * adapter_rank])
    }

    /// The per-token share `w` of the rank slope at (tokens, adapters, rank); see `lora_time`.
    fn token_share(grid: &Grid<3>, tokens: f64, adapters: f64, rank: f64) -> f64 {
        let [t_axis, a_axis, r_axis] = &grid.axes;
        if r_axis.len() < 2 {
            return 0.5;
        }
        let s: [Segment; 3] = [
            locate(t_axis, tokens),
            locate(a_axis, adapters),
            locate(r_axis, rank),
        ];
        let at = |t: usize, a: usize, r: usize| {
            grid.values[t * grid.strides[0] + a * grid.strides[1] + r]
        };
        let dr = r_axis[s[2].hi] - r_axis[s[2].lo];
        let slope = |t: usize, a: usize| (at(t, a, s[2].hi) - at(t, a, s[2].lo)) / dr;
        // Derivatives are read inside the cell: weights clamped to it.
        let (wt, wa) = (s[0].w.clamp(0.0, 1.0), s[1].w.clamp(0.0, 1.0));
        let slope_at_a =
            |a: usize| slope(s[0].lo, a) + wt * (slope(s[0].hi, a) - slope(s[0].lo, a));
        let slope_at_t =
            |t: usize| slope(t, s[1].lo) + wa * (slope(t, s[1].hi) - slope(t, s[1].lo));
        let total = slope_at_a(s[1].lo) + wa * (slope_at_a(s[1].hi) - slope_at_a(s[1].lo));
        if total <= 0.0 {
            return 0.5;
        }
        let w = if a_axis.len() >= 2 {
            let per_adapter =
                (slope_at_a(s[1].hi) - slope_at_a(s[1].lo)) / (a_axis[s[1].hi] - a_axis[s[1].lo]);
            1.0 - per_adapter * adapters / total
        } else if t_axis.len() >= 2 {
            let per_token =
                (slope_at_t(s[0].hi) - slope_at_t(s[0].lo)) / (t_axis[s[0].hi] - t_axis[s[0].lo]);
            per_token * tokens / total
        } else {
            0.5
        };
        if w.is_finite() {
            w.clamp(0.0, 1.0)
        } else {
            0.5
        }
    }

    /// One decode-row LoRA kernel's time over `tokens` rows: `lora_time` at the rows' mean
    /// ranks, moved toward the time at the batch's highest rank as far as the profile's rank
    /// mixes measured at this many rows (see `CalibrationProfile::lora_rank_mix`). Rows of
    /// one rank, whose highest rank is their mean, are exact.
    fn decode_lora_time(
        &self,
        grid: &Grid<3>,
        b: &BatchShape,
        tokens: f64,
        adapters: f64,
        token_rank: f64,
        adapter_rank: f64,
    ) -> f64 {
        // Distinct adapters beyond the grid's largest count add only a share of its last slope
        // (see `CalibrationProfile::lora_adapters_beyond_grid`).
        let measured = grid.axes[1].last().copied().unwrap_or(adapters);
        let adapters = if adapters > measured {
            measured + self.adapters_beyond_grid * (adapters - measured)
        } else {
            adapters
        };
        let mean = Self::lora_time(grid, tokens, adapters, token_rank, adapter_rank);
        let highest_rank = b.max_decode_rank as f64;
        let Some((toward, first, last)) = &self.rank_mix else {
            return mean;
        };
        if highest_rank <= token_rank * (1.0 + 1e-9) {
            return mean;
        }
        let toward = toward.eval([tokens.clamp(*first, *last)]).clamp(0.0, 1.0);
        let highest = grid.eval([tokens, adapters, highest_rank]);
        mean + toward * (highest - mean).max(0.0)
    }

    /// LoRA shrink and expand of the step, seconds.
    fn lora(&self, b: &BatchShape) -> (f64, f64) {
        if b.lora_tokens == 0 {
            return (0.0, 0.0);
        }
        if let Some((shrink, expand)) = &self.lora_prefill {
            // Decode rows (MBGMV) and prompt segments (MBGMM) are different kernels, launched
            // one after the other: price each on its own grid and add.
            let mut total = (0.0, 0.0);
            let decode_tokens = b.lora_tokens.saturating_sub(b.prefill_lora_tokens);
            if decode_tokens > 0 {
                let tokens = decode_tokens as f64;
                let token_rank =
                    b.lora_token_rank.saturating_sub(b.prefill_lora_token_rank) as f64 / tokens;
                let adapters = (b.distinct_adapters as f64).clamp(1.0, tokens);
                let adapter_rank = if b.distinct_adapters > 0 && b.distinct_rank_sum > 0 {
                    b.distinct_rank_sum as f64 / b.distinct_adapters as f64
                } else {
                    token_rank
                };
                total.0 += self.shrink_scale
                    * self.decode_lora_time(
                        &self.lora_shrink,
                        b,
                        tokens,
                        adapters,
                        token_rank,
                        adapter_rank,
                    );
                total.1 += self.expand_scale
                    * self.decode_lora_time(
                        &self.lora_expand,
                        b,
                        tokens,
                        adapters,
                        token_rank,
                        adapter_rank,
                    );
            }
            if b.prefill_lora_tokens > 0 {
                let tokens = b.prefill_lora_tokens as f64;
                let rank = b.prefill_lora_token_rank as f64 / tokens;
                let segments = (b.prefill_lora_segments as f64).clamp(1.0, tokens);
                total.0 +=
                    self.shrink_scale * Self::lora_time(shrink, tokens, segments, rank, rank);
                total.1 +=
                    self.expand_scale * Self::lora_time(expand, tokens, segments, rank, rank);
            }
            return total;
        }
        let tokens = b.lora_tokens as f64;
        // No step has more distinct adapters than tokens (grid points that name more were
        // measured with one adapter per token); the engine's count also holds the adapters
        // of running requests without a token this step (a chunked prefill waiting).
        let adapters = (b.distinct_adapters as f64).clamp(1.0, tokens);
        let token_rank = b.lora_token_rank as f64 / tokens;
        let adapter_rank = if b.distinct_adapters > 0 && b.distinct_rank_sum > 0 {
            b.distinct_rank_sum as f64 / b.distinct_adapters as f64
        } else {
            token_rank
        };
        // One grid for decode rows and prompt tokens alike: the rank-mix term is measured on
        // decode rows, so it applies to steps of decode rows only.
        let time = |grid: &Grid<3>| {
            if b.prefill_lora_tokens == 0 {
                self.decode_lora_time(grid, b, tokens, adapters, token_rank, adapter_rank)
            } else {
                Self::lora_time(grid, tokens, adapters, token_rank, adapter_rank)
            }
        };
        (
            self.shrink_scale * time(&self.lora_shrink),
            self.expand_scale * time(&self.lora_expand),
        )
    }

    /// The token count a base GEMM of `tokens` costs like: below 128 tokens the GEMMs stream
    /// their weights whatever the count (the grid is dense there); above, cuBLAS's tiles
    /// round the count up to the profile's quantum (up to the profile's largest count for it),
    /// but never past the next measured count.
    /// Where the grid is sparser than the quantum, rounding keeps interpolation off the
    /// staircase's risers; where it is denser, the measured points are the staircase: a count
    /// costs at most what the next point above it costs (the executor tunes one algorithm per
    /// token bucket, and `calibrate` measures inside and at the top of the buckets). Rounding
    /// 136 decode rows to 192 crossed two buckets and priced live steps of 129-159 rows 2-4%
    /// high (docs/FIDELITY.md, session 8).
    ///
    /// Where the grid holds the top of every bucket (the profile's `base_gemm_bucket_tops_to`),
    /// a count up to there costs what the next measured count costs, with no interpolation:
    /// buckets run different algorithms, and a line between two of them priced live steps of
    /// 41-63 rows 1-2% low and of 70-95 rows 1-2% high (docs/FIDELITY.md, session 16).
    fn gemm_tokens(&self, tokens: f64) -> f64 {
        let next_measured = || {
            let axis = &self.base_gemm.axes[0];
            axis.get(axis.partition_point(|&v| v < tokens)).copied()
        };
        if tokens <= self.gemm_bucket_tops_to {
            return next_measured().unwrap_or(tokens);
        }
        if tokens <= 128.0 || tokens > self.gemm_quantum_max_tokens {
            return tokens;
        }
        let rounded = (tokens / self.gemm_quantum).ceil() * self.gemm_quantum;
        next_measured().map_or(rounded, |next| rounded.min(next))
    }

    fn copy_seconds(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            0.0
        } else {
            self.host_to_device.eval([bytes as f64])
        }
    }
}

impl CostModel for CalibratedCost {
    fn step_cost(&self, b: &BatchShape) -> StepCost {
        let tokens = b.prefill_tokens as f64 + b.decode_requests as f64;
        let sampled = b.prefill_requests as f64 + b.decode_requests as f64;
        let mut base = 0.0;
        if tokens > 0.0 {
            base += self.base_gemm.eval([self.gemm_tokens(tokens)]);
        }
        if sampled > 0.0 {
            base += self.lm_head.eval([sampled]);
        }
        let attention_prefill = self.attention_prefill(b);
        let attention_decode = self.attention_decode(b);
        let (lora_shrink, lora_expand) = self.lora(b);
        let sampling = sampled * self.sampling_s;
        let fixed = self.fixed_s
            + if b.prefill_tokens > 0 {
                self.prefill_step_s
                    + self.prompt_excess.as_ref().map_or(0.0, |(grid, last)| {
                        // Measured on prompts with an adapter: charged in proportion to the
                        // prompt tokens that have one (a prompt without costs its parts).
                        let with_lora = (b.prefill_lora_tokens as f64 / b.prefill_tokens as f64)
                            .clamp(0.0, 1.0);
                        grid.eval([(b.prefill_tokens as f64).min(*last)]) * with_lora
                    })
            } else {
                0.0
            };
        let rest = base
            + attention_prefill
            + attention_decode
            + lora_shrink
            + lora_expand
            + sampling
            + fixed;
        // As in AnalyticCost: blocking copies precede compute; prefetch copies overlap it.
        let blocking = self.copy_seconds(b.blocking_load_bytes);
        let prefetch = self.copy_seconds(b.prefetch_load_bytes);
        let adapter_h2d = blocking + (prefetch - rest).max(0.0);
        StepCost {
            base_gemm: Nanos::from_secs_f64(base),
            attention_prefill: Nanos::from_secs_f64(attention_prefill),
            attention_decode: Nanos::from_secs_f64(attention_decode),
            lora_shrink: Nanos::from_secs_f64(lora_shrink),
            lora_expand: Nanos::from_secs_f64(lora_expand),
            adapter_h2d: Nanos::from_secs_f64(adapter_h2d),
            sampling: Nanos::from_secs_f64(sampling),
            fixed_overhead: Nanos::from_secs_f64(fixed),
            // A profile is measured at its own TP degree: its collectives are inside the
            // measured phases, not a part of their own.
            tp_communication: Nanos::ZERO,
        }
    }

    fn provenance(&self) -> Provenance {
        Provenance::Calibrated
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

// =============================================================================================
// Leave-one-out accuracy
// =============================================================================================

/// One leave-one-out prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooPoint {
    /// The point's axis values, by axis name.
    pub point: Vec<(&'static str, u64)>,
    /// The axis along which it was predicted from its two neighbours.
    pub axis: &'static str,
    pub measured_s: f64,
    pub predicted_s: f64,
    /// `predicted / measured - 1`.
    pub relative_error: f64,
}

/// Leave-one-out accuracy of one grid.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridLoo {
    pub grid: &'static str,
    /// Measured points in the grid.
    pub points: usize,
    /// Predictions made: one per point and axis along which the point has a neighbour on
    /// both sides.
    pub predictions: usize,
    /// Median and largest `|predicted / measured - 1|`; `None` without predictions.
    pub median_abs_error: Option<f64>,
    pub max_abs_error: Option<f64>,
    /// The prediction with the largest error.
    pub worst: Option<LooPoint>,
}

/// Leave-one-out accuracy of every grid of a profile: see [`leave_one_out`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooReport {
    pub grids: Vec<GridLoo>,
}

/// One grid's points as (axis values, time) with its axis names, and the coordinate its
/// interpolation uses along each axis (given the whole point).
struct GridPoints<'a> {
    name: &'static str,
    axes: &'static [&'static str],
    points: Vec<(Vec<u64>, f64)>,
    coordinate: &'a dyn Fn(usize, &[u64]) -> f64,
}

/// How well each grid predicts its own points: every point that has a neighbour on both
/// sides along an axis is dropped and predicted from those two neighbours, with the
/// interpolation [`CalibratedCost`] uses along that axis (linear in the axis value, or in the
/// attended pairs along the prefill's tokens), as if that slice of the grid had not been
/// measured. Edge points have nothing to be interpolated from and are not predicted.
///
/// Small errors mean the grid is dense enough for piecewise-linear interpolation; a large
/// error names the segment where more points are needed (or where the measurement is noisy).
pub fn leave_one_out(profile: &CalibrationProfile) -> LooReport {
    let identity = |axis: usize, key: &[u64]| key[axis] as f64;
    let prefill = |axis: usize, key: &[u64]| {
        if axis == 0 {
            causal_pairs(key[0] as f64, key[1] as f64)
        } else {
            key[axis] as f64
        }
    };
    let tokens = |name, points: &[crate::cost::TokensPoint]| GridPoints {
        name,
        axes: &["tokens"],
        points: points
            .iter()
            .map(|p| (vec![p.tokens as u64], p.time.median_s))
            .collect(),
        coordinate: &identity,
    };
    let lora = |name, points: &[crate::cost::LoraPoint]| GridPoints {
        name,
        axes: &["tokens", "adapters", "rank"],
        points: points
            .iter()
            .map(|p| {
                (
                    vec![p.tokens as u64, p.adapters as u64, p.rank as u64],
                    p.time.median_s,
                )
            })
            .collect(),
        coordinate: &identity,
    };
    let grids = [
        tokens("base_gemm", &profile.base_gemm),
        tokens("lm_head", &profile.lm_head),
        GridPoints {
            name: "attention_prefill",
            axes: &["tokens", "context"],
            points: profile
                .attention_prefill
                .iter()
                .map(|p| (vec![p.tokens as u64, p.context as u64], p.time.median_s))
                .collect(),
            coordinate: &prefill,
        },
        GridPoints {
            name: "attention_decode",
            axes: &["batch", "context"],
            points: profile
                .attention_decode
                .iter()
                .map(|p| (vec![p.batch as u64, p.context as u64], p.time.median_s))
                .collect(),
            coordinate: &identity,
        },
        lora("lora_shrink", &profile.lora_shrink),
        lora("lora_expand", &profile.lora_expand),
        lora("lora_prefill_shrink", &profile.lora_prefill_shrink),
        lora("lora_prefill_expand", &profile.lora_prefill_expand),
        GridPoints {
            name: "host_to_device",
            axes: &["bytes"],
            points: profile
                .host_to_device
                .iter()
                .map(|p| (vec![p.bytes], p.time.median_s))
                .collect(),
            coordinate: &identity,
        },
    ];
    LooReport {
        grids: grids
            .iter()
            .filter(|g| !g.points.is_empty())
            .map(grid_loo)
            .collect(),
    }
}

fn grid_loo(g: &GridPoints) -> GridLoo {
    let dims = g.axes.len();
    let axis_values: Vec<Vec<u64>> = (0..dims)
        .map(|a| {
            let mut v: Vec<u64> = g.points.iter().map(|(k, _)| k[a]).collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    let mut strides = vec![1; dims];
    for a in (0..dims.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * axis_values[a + 1].len();
    }
    let position = |a: usize, v: u64| axis_values[a].binary_search(&v).unwrap_or(0);
    let flat = |key: &[u64]| -> usize { (0..dims).map(|a| position(a, key[a]) * strides[a]).sum() };
    let mut predictions = Vec::new();
    for (key, measured) in &g.points {
        for axis in 0..dims {
            let pos = position(axis, key[axis]);
            if pos == 0 || pos + 1 >= axis_values[axis].len() {
                continue;
            }
            let mut below = key.clone();
            below[axis] = axis_values[axis][pos - 1];
            let mut above = key.clone();
            above[axis] = axis_values[axis][pos + 1];
            let (x0, x, x1) = (
                (g.coordinate)(axis, &below),
                (g.coordinate)(axis, key),
                (g.coordinate)(axis, &above),
            );
            let (v0, v1) = (g.points[flat(&below)].1, g.points[flat(&above)].1);
            let predicted = v0 + (x - x0) / (x1 - x0) * (v1 - v0);
            predictions.push(LooPoint {
                point: g.axes.iter().copied().zip(key.iter().copied()).collect(),
                axis: g.axes[axis],
                measured_s: *measured,
                predicted_s: predicted,
                relative_error: predicted / measured - 1.0,
            });
        }
    }
    let mut errors: Vec<f64> = predictions.iter().map(|p| p.relative_error.abs()).collect();
    errors.sort_by(f64::total_cmp);
    let median = match errors.len() {
        0 => None,
        n if n % 2 == 1 => Some(errors[n / 2]),
        n => Some(0.5 * (errors[n / 2 - 1] + errors[n / 2])),
    };
    let worst = predictions
        .iter()
        .max_by(|a, b| a.relative_error.abs().total_cmp(&b.relative_error.abs()))
        .cloned();
    GridLoo {
        grid: g.name,
        points: g.points.len(),
        predictions: predictions.len(),
        median_abs_error: median,
        max_abs_error: errors.last().copied(),
        worst,
    }
}

/// [`human_seconds`] with a sign: `-0.12 ms`.
fn human_seconds_signed(s: f64) -> String {
    if s < 0.0 {
        format!("-{}", human_seconds(-s))
    } else {
        human_seconds(s)
    }
}

/// Seconds for people: `3.71 ms`, `850 µs`, `120 ns`.
fn human_seconds(s: f64) -> String {
    let (value, unit) = if s >= 1.0 {
        (s, "s")
    } else if s >= 1e-3 {
        (s * 1e3, "ms")
    } else if s >= 1e-6 {
        (s * 1e6, "µs")
    } else {
        (s * 1e9, "ns")
    };
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {unit}")
}

fn human_measured(m: &Measured) -> String {
    format!(
        "{} (p10 {}, p90 {}, {} samples)",
        human_seconds(m.median_s),
        human_seconds(m.p10_s),
        human_seconds(m.p90_s),
        m.samples
    )
}

/// `name min–max (count)` for each axis of a grid.
fn axis_ranges<'a>(axes: &[&str], keys: impl Iterator<Item = &'a [u64]> + Clone) -> String {
    axes.iter()
        .enumerate()
        .map(|(a, name)| {
            let mut v: Vec<u64> = keys.clone().map(|k| k[a]).collect();
            v.sort_unstable();
            v.dedup();
            format!(
                "{name} {}–{} ({})",
                v.first().copied().unwrap_or(0),
                v.last().copied().unwrap_or(0),
                v.len()
            )
        })
        .collect::<Vec<_>>()
        .join(" × ")
}

/// A Markdown report of a profile: where and when it was measured, each grid's size and
/// range, and the [`leave_one_out`] table. `slora-plan calibrate` prints it and writes it
/// beside the profile.
pub fn profile_report(profile: &CalibrationProfile) -> String {
    let m = &profile.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Calibration profile: {} x {}\n",
        profile.gpu_name, m.name
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let key = profile.gpu_key.as_deref().unwrap_or("none");
    let _ = writeln!(
        out,
        "| GPU | {} (catalogue key `{key}`), {:.2} GB |",
        profile.gpu_name,
        profile.gpu_memory_bytes as f64 / 1e9
    );
    let _ = writeln!(out, "| driver | {} |", profile.driver_version);
    let _ = writeln!(out, "| CUDA | {} |", profile.cuda_version);
    let _ = writeln!(out, "| date | {} |", profile.date);
    let _ = writeln!(
        out,
        "| model | {}: hidden {}, {} layers, {} heads ({} KV), intermediate {}, vocab {}, {} |",
        m.name,
        m.hidden_size,
        m.num_layers,
        m.num_heads,
        m.num_kv_heads,
        m.intermediate_size,
        m.vocab_size,
        format!("{:?}", m.dtype).to_lowercase()
    );
    let _ = writeln!(out, "| tensor parallel | {} |", profile.tensor_parallel);
    let _ = writeln!(
        out,
        "| LoRA targets | {} |",
        join_targets(&profile.lora_targets)
    );
    let _ = writeln!(
        out,
        "| fixed overhead per step | {} |",
        human_measured(&profile.fixed_overhead)
    );
    let _ = writeln!(
        out,
        "| sampling per token | {} |",
        human_measured(&profile.sampling_per_token)
    );
    if let Some(q) = profile.base_gemm_token_quantum {
        match profile.base_gemm_token_quantum_max_tokens {
            Some(max) => {
                let _ = writeln!(
                    out,
                    "| base GEMM token quantum (above 128 tokens, up to {max}) | {q} |"
                );
            }
            None => {
                let _ = writeln!(out, "| base GEMM token quantum (above 128 tokens) | {q} |");
            }
        }
    }
    if let Some(to) = profile.base_gemm_bucket_tops_to {
        let _ = writeln!(
            out,
            "| base GEMMs up to {to} tokens | every token bucket's top measured: a count costs its bucket's |"
        );
    }
    if let Some(a) = &profile.gemm_algorithms {
        let _ = writeln!(
            out,
            "| base GEMM algorithms | {} buckets recorded (cuBLASLt {}): `--execute` on this GPU adopts them |",
            a.buckets.len(),
            a.cublaslt_version
        );
    }
    if let Some(m) = &profile.prefill_step_overhead {
        let _ = writeln!(
            out,
            "| extra per step with a prompt | {} |",
            human_measured(m)
        );
    }
    if !profile.decode_spread_excess.is_empty() {
        let _ = writeln!(
            out,
            "| decode attention over spread contexts, beyond the grid, by rows (at spread){} | {} |",
            profile
                .decode_spread_excess_from
                .as_ref()
                .map_or(String::new(), |source| format!("; measured on {source}")),
            profile
                .decode_spread_excess
                .iter()
                .map(|p| format!(
                    "{}: {} ({:.2})",
                    p.rows,
                    human_seconds_signed(p.extra_s),
                    p.spread
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(share) = profile.lora_adapters_beyond_grid {
        let _ = writeln!(
            out,
            "| decode LoRA beyond the grid's adapters: share of its last slope | {share:.2} |"
        );
    }
    if let Some(extra) = profile.prefill_extra_chunks {
        let _ = writeln!(
            out,
            "| prefill attention, each chunk after the first: share of its time alone, and per prompt | {:.2}, {} |",
            extra.share,
            human_seconds(extra.per_prompt_s)
        );
    }
    if !profile.prompt_step_excess.is_empty() {
        let _ = writeln!(
            out,
            "| extra per step with a prompt, by prompt tokens | {} |",
            profile
                .prompt_step_excess
                .iter()
                .map(|p| format!("{}: {}", p.prompt_tokens, human_seconds(p.extra_s)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let _ = writeln!(
        out,
        "\n## Grids\n\nMedian GPU times over all layers.\n\n| grid | points | axes | time range |\n\
         |---|---:|---|---|"
    );
    let mut grid_row = |name: &str, axes: &[&str], keys: Vec<Vec<u64>>, times: Vec<f64>| {
        let lo = times.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = times.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} – {} |",
            keys.len(),
            axis_ranges(axes, keys.iter().map(|k| k.as_slice())),
            human_seconds(lo),
            human_seconds(hi)
        );
    };
    let tokens = |points: &[crate::cost::TokensPoint]| {
        (
            points.iter().map(|p| vec![p.tokens as u64]).collect(),
            points.iter().map(|p| p.time.median_s).collect(),
        )
    };
    let lora = |points: &[crate::cost::LoraPoint]| {
        (
            points
                .iter()
                .map(|p| vec![p.tokens as u64, p.adapters as u64, p.rank as u64])
                .collect(),
            points.iter().map(|p| p.time.median_s).collect(),
        )
    };
    let (k, t) = tokens(&profile.base_gemm);
    grid_row("base_gemm", &["tokens"], k, t);
    let (k, t) = tokens(&profile.lm_head);
    grid_row("lm_head", &["tokens"], k, t);
    grid_row(
        "attention_prefill",
        &["tokens", "context"],
        profile
            .attention_prefill
            .iter()
            .map(|p| vec![p.tokens as u64, p.context as u64])
            .collect(),
        profile
            .attention_prefill
            .iter()
            .map(|p| p.time.median_s)
            .collect(),
    );
    grid_row(
        "attention_decode",
        &["batch", "context"],
        profile
            .attention_decode
            .iter()
            .map(|p| vec![p.batch as u64, p.context as u64])
            .collect(),
        profile
            .attention_decode
            .iter()
            .map(|p| p.time.median_s)
            .collect(),
    );
    let (k, t) = lora(&profile.lora_shrink);
    grid_row("lora_shrink", &["tokens", "adapters", "rank"], k, t);
    let (k, t) = lora(&profile.lora_expand);
    grid_row("lora_expand", &["tokens", "adapters", "rank"], k, t);
    if !profile.lora_prefill_shrink.is_empty() {
        let (k, t) = lora(&profile.lora_prefill_shrink);
        grid_row("lora_prefill_shrink", &["tokens", "segments", "rank"], k, t);
        let (k, t) = lora(&profile.lora_prefill_expand);
        grid_row("lora_prefill_expand", &["tokens", "segments", "rank"], k, t);
    }
    grid_row(
        "host_to_device",
        &["bytes"],
        profile
            .host_to_device
            .iter()
            .map(|p| vec![p.bytes])
            .collect(),
        profile
            .host_to_device
            .iter()
            .map(|p| p.time.median_s)
            .collect(),
    );

    let _ = writeln!(
        out,
        "\n## Leave-one-out accuracy\n\nEach point with a measured neighbour on both sides \
         along an axis is predicted from those two neighbours, with the interpolation the \
         calibrated cost model uses along that axis (linear in the axis value; along the \
         prefill's tokens, linear in attended pairs). Error = predicted / measured - 1.\n\n\
         | grid | points | predictions | median abs error | max abs error | worst point |\n\
         |---|---:|---:|---:|---:|---|"
    );
    let pct = |e: Option<f64>| e.map_or("–".to_string(), |e| format!("{:.1}%", e * 100.0));
    for g in leave_one_out(profile).grids {
        let worst = g.worst.as_ref().map_or("–".to_string(), |w| {
            format!(
                "{} along {}: measured {}, predicted {} ({:+.1}%)",
                w.point
                    .iter()
                    .map(|(a, v)| format!("{a} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                w.axis,
                human_seconds(w.measured_s),
                human_seconds(w.predicted_s),
                w.relative_error * 100.0
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            g.grid,
            g.points,
            g.predictions,
            pct(g.median_abs_error),
            pct(g.max_abs_error),
            worst
        );
    }
    out
}

// =============================================================================================
// Efficiency fit: calibrating the derived model on a measured GPU
// =============================================================================================

/// Exponents of the smooth maximum the fit tries (the fit is exact when the truth is one).
const SHARPNESS_CANDIDATES: [f64; 12] = [
    1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0,
];

/// A fitted fraction of a datasheet peak. Up to 5% above 1 is clamped to 1 (measurement noise,
/// or GB against GiB in a datasheet); more means the profile was not measured on this GPU.
fn fraction(field: &'static str, value: f64, gpu: &GpuSpec) -> Result<f64, CostError> {
    if value.is_finite() && value > 0.0 && value <= 1.05 {
        Ok(value.min(1.0))
    } else {
        Err(CostError::InvalidArgument {
            field,
            reason: format!(
                "fitted to {value:.3} of {}'s datasheet peak; a fraction in (0, 1] was \
                 expected: was the profile measured on this GPU?",
                gpu.name
            ),
        })
    }
}

/// The median of `ratio` over the points whose measured time is at least the grid's median:
/// the slower half, where per-launch latencies (which the derived model charges elsewhere, in
/// `fixed_overhead`) matter least.
fn median_ratio_of_slow_half(points: &[(f64, f64)]) -> Option<f64> {
    let mut times: Vec<f64> = points.iter().map(|p| p.0).collect();
    times.sort_by(f64::total_cmp);
    let cut = *times.get(times.len().saturating_sub(1) / 2)?;
    let mut ratios: Vec<f64> = points.iter().filter(|p| p.0 >= cut).map(|p| p.1).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    Some(if n % 2 == 1 {
        ratios[n / 2]
    } else {
        0.5 * (ratios[n / 2 - 1] + ratios[n / 2])
    })
}

/// One GEMM measurement: memory time and compute time at peak rates (fill excluded from the
/// compute time: it is a fitted parameter), and the measured time.
#[derive(Clone, Copy)]
struct GemmSample {
    weight_s: f64,
    act_s_per_token: f64,
    flop_s_per_token: f64,
    tokens: f64,
    measured: f64,
}

/// The base GEMM factors `(weight_streaming, tensor_core, gemm_fill_tokens, sharpness)`.
///
/// For a fixed sharpness `p` and fill, [`AnalyticCost`]'s GEMM time `(M^p/ws^p + C^p/tc^p)^(1/p)`
/// (memory time `M` and compute time `C` at peak rates) is linear in `x = ws^-p`, `y = tc^-p`
/// after raising to the `p`-th power, so `x`, `y` come from a 2x2 least-squares solve with
/// relative residuals. The fill is searched on a grid of 8 tokens and refined by golden
/// section, the sharpness over [`SHARPNESS_CANDIDATES`]; the winner minimises the sum of
/// squared relative errors of the times themselves. When no measurement reaches the
/// compute-bound regime (no point whose FLOPs at the peak rate would take 30% of its measured
/// time), `tensor_core` and `gemm_fill_tokens` are not identified: they keep their defaults
/// and only `ws` is fitted. A rate above peak is returned as fitted, for the caller to refuse.
fn fit_gemms(samples: &[GemmSample]) -> (f64, f64, f64, f64) {
    let d = Efficiency::default();
    let identified = samples
        .iter()
        .any(|s| s.flop_s_per_token * (s.tokens + d.gemm_fill_tokens) >= 0.3 * s.measured);
    // (error, ws, tc)
    let evaluate = |p: f64, fill: f64| -> (f64, f64, f64) {
        let (mut smm, mut smc, mut scc, mut sm, mut sc) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let terms: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| {
                let m = ((s.weight_s + s.tokens * s.act_s_per_token) / s.measured).powf(p);
                let c = (s.flop_s_per_token * (s.tokens + fill) / s.measured).powf(p);
                (m, c)
            })
            .collect();
        for &(m, c) in &terms {
            smm += m * m;
            smc += m * c;
            scc += c * c;
            sm += m;
            sc += c;
        }
        let det = smm * scc - smc * smc;
        let (mut x, mut y) = if det.abs() > 1e-12 * smm * scc {
            ((sm * scc - sc * smc) / det, (sc * smm - sm * smc) / det)
        } else {
            (-1.0, -1.0)
        };
        if !(identified && y.is_finite() && y > 0.0) {
            y = d.tensor_core.powf(-p);
            x = (sm - y * sc) / smm;
        }
        if !(x.is_finite() && x > 0.0) {
            x = d.weight_streaming.powf(-p);
        }
        let (ws, tc) = (x.powf(-1.0 / p), y.powf(-1.0 / p));
        let smooth = SmoothMax::new(p);
        let err: f64 = samples
            .iter()
            .map(|s| {
                let mem = (s.weight_s + s.tokens * s.act_s_per_token) / ws;
                let compute = s.flop_s_per_token * (s.tokens + fill) / tc;
                (smooth.of(mem, compute) / s.measured - 1.0).powi(2)
            })
            .sum();
        (err, ws, tc)
    };
    let mut best = (
        f64::INFINITY,
        d.weight_streaming,
        d.tensor_core,
        d.gemm_fill_tokens,
        d.roofline_sharpness,
    );
    for p in SHARPNESS_CANDIDATES {
        let mut fill_best = (f64::INFINITY, 0.0);
        for step in 0..=256 {
            let fill = step as f64 * 8.0;
            let (err, ..) = evaluate(p, fill);
            if err < fill_best.0 {
                fill_best = (err, fill);
            }
        }
        // Golden section on the bracket around the best grid value.
        let (mut lo, mut hi) = ((fill_best.1 - 8.0).max(0.0), fill_best.1 + 8.0);
        let ratio = 0.5 * (5f64.sqrt() - 1.0);
        for _ in 0..40 {
            let a = hi - ratio * (hi - lo);
            let b = lo + ratio * (hi - lo);
            if evaluate(p, a).0 <= evaluate(p, b).0 {
                hi = b;
            } else {
                lo = a;
            }
        }
        for fill in [0.5 * (lo + hi), fill_best.1] {
            let (err, ws, tc) = evaluate(p, fill);
            if err < best.0 {
                best = (err, ws, tc, fill, p);
            }
        }
    }
    let (_, ws, tc, fill, p) = best;
    if identified {
        (ws, tc, fill, p)
    } else {
        // The fill only shapes the compute side: not identified either.
        (ws, tc, d.gemm_fill_tokens, p)
    }
}

/// Fits [`AnalyticCost`]'s efficiency factors to a profile measured on `gpu`, so that the
/// catalogue's other GPUs can use them with their own datasheet numbers (still labelled
/// derived). Per factor:
///
/// * `weight_streaming`, `tensor_core`, `gemm_fill_tokens`, `roofline_sharpness`: least
///   squares of the relative error of the derived GEMM formula over the `base_gemm` and
///   `lm_head` grids together (see `fit_gemms`).
/// * `kv_read`: the median, over the slower half of the `attention_decode` grid, of (KV bytes
///   read / peak bandwidth) / measured time, but at least `weight_streaming` (see below).
/// * `attention_flops_per_sm_cycle`: the same median of the grid's attention FLOPs per
///   SM-cycle. KV bytes and FLOPs both grow with the context rows, so one profile cannot say
///   which binds; a kernel slower than weight streaming is taken to wait on its SMs.
/// * `lora_kernel`: the same median over both LoRA grids of the derived formula's time at
///   efficiency 1 (the longer of bytes at peak bandwidth and FLOPs at peak rate) / measured.
/// * `host_link`: the same median over `host_to_device` of bytes / (link peak · time).
/// * `sampling_logit_passes`: `sampling_per_token` at the fitted weight-streaming rate.
/// * `kernel_launch_s`, `step_overhead_s`: only their sum per step is observable (the
///   profile's `fixed_overhead`), so both defaults are scaled by one factor to match it;
///   `kernels_per_layer` keeps its default.
///
/// The slower half is used for the medians because the derived model has no per-launch
/// latency in those parts (it charges launches in `fixed_overhead`), so the bandwidth-bound
/// points are the ones its factors describe. Errors when the profile is invalid, was measured
/// with TP > 1, names another GPU than `gpu`, or implies a factor above 1.05 of a peak.
pub fn fit_efficiency(
    profile: &CalibrationProfile,
    gpu: &GpuSpec,
) -> Result<Efficiency, CostError> {
    profile.validate(Path::new(&format!("<{}>", profile_label(profile))))?;
    gpu.validate()?;
    if let Some(key) = &profile.gpu_key {
        let measured_on = find_gpu(key)?;
        if measured_on.key != gpu.key {
            return Err(CostError::ProfileMismatch {
                profile: profile_label(profile),
                wanted: format!("the GPU {}", gpu.name),
                mismatches: format!("gpu_key: profile {}, wanted {}", measured_on.key, gpu.key),
            });
        }
    }
    if profile.tensor_parallel != 1 {
        return Err(CostError::ProfileMismatch {
            profile: profile_label(profile),
            wanted: "TP 1 (the efficiency fit covers one GPU per replica)".into(),
            mismatches: format!(
                "tensor_parallel: profile {}, wanted 1",
                profile.tensor_parallel
            ),
        });
    }
    let model = &profile.model;
    let d = Efficiency::default();
    let bw = gpu.hbm_bandwidth;
    let flops = gpu.dense_fp16_flops;

    let (layers, head) = gemm_groups(model);
    let samples: Vec<GemmSample> = [(layers, &profile.base_gemm), (head, &profile.lm_head)]
        .iter()
        .flat_map(|(g, points)| {
            points.iter().map(move |p| GemmSample {
                weight_s: g.weight_bytes / bw,
                act_s_per_token: g.act_bytes_per_token / bw,
                flop_s_per_token: g.flops_per_token / flops,
                tokens: p.tokens as f64,
                measured: p.time.median_s,
            })
        })
        .collect();
    let (ws, tc, fill, sharpness) = fit_gemms(&samples);
    let weight_streaming = fraction("weight_streaming", ws, gpu)?;
    let tensor_core = fraction("tensor_core", tc, gpu)?;

    let kv_bytes = model.kv_bytes_per_token() as f64;
    let decode: Vec<(f64, f64)> = profile
        .attention_decode
        .iter()
        .map(|p| {
            let t = p.time.median_s;
            (t, p.batch as f64 * p.context as f64 * kv_bytes / bw / t)
        })
        .collect();
    // KV bytes and FLOPs both grow with the context rows, so one profile cannot tell whether
    // HBM or the SMs bind. A kernel that reads its KV rows slower than cuBLAS streams weights
    // is taken to be waiting on its SMs (the GQA kernel: the H100, with the H200's SMs and 70%
    // of its bandwidth, runs it in the H200's time): `kv_read` is never below
    // `weight_streaming`, and the SMs' rate is what the slower half reaches.
    let kv_read = fraction(
        "kv_read",
        median_ratio_of_slow_half(&decode)
            .unwrap_or(d.kv_read)
            .max(weight_streaming),
        gpu,
    )?;
    let flops_per_row = attention_flops_per_context_row(model);
    let sm_cycles_per_s = f64::from(gpu.sm_count) * gpu.sm_clock_hz;
    let attention_arithmetic: Vec<(f64, f64)> = profile
        .attention_decode
        .iter()
        .map(|p| {
            let t = p.time.median_s;
            let rows = p.batch as f64 * p.context as f64;
            (t, rows * flops_per_row / t / sm_cycles_per_s)
        })
        .collect();
    let attention_flops_per_sm_cycle =
        median_ratio_of_slow_half(&attention_arithmetic).unwrap_or(d.attention_flops_per_sm_cycle);

    let dtype = model.dtype.bytes() as f64;
    let (lora_in, lora_out) = lora_elems(model, &profile.lora_targets);
    let mut lora: Vec<(f64, f64)> = Vec::new();
    for (points, elems, activation_passes) in [
        (&profile.lora_shrink, lora_in, 1.0),
        (&profile.lora_expand, lora_out, 2.0),
    ] {
        for p in points {
            let (tokens, rank) = (p.tokens as f64, p.rank as f64);
            // Rows read as the derived model counts them: every token's own (see AnalyticCost).
            let rows = tokens.max(p.adapters as f64) * rank;
            let bytes = (rows + activation_passes * tokens) * elems * dtype;
            let ideal = (bytes / bw).max(2.0 * tokens * rank * elems / flops);
            lora.push((p.time.median_s, ideal / p.time.median_s));
        }
    }
    let lora_kernel = fraction(
        "lora_kernel",
        median_ratio_of_slow_half(&lora).unwrap_or(d.lora_kernel),
        gpu,
    )?;

    let copies: Vec<(f64, f64)> = profile
        .host_to_device
        .iter()
        .map(|p| {
            let t = p.time.median_s;
            (t, p.bytes as f64 / gpu.host_link_bandwidth / t)
        })
        .collect();
    let host_link = fraction(
        "host_link",
        median_ratio_of_slow_half(&copies).unwrap_or(d.host_link),
        gpu,
    )?;

    let sampling_logit_passes = profile.sampling_per_token.median_s * weight_streaming * bw
        / (model.vocab_size as f64 * 4.0);
    let default_fixed = d.kernels_per_layer as f64 * model.num_layers as f64 * d.kernel_launch_s
        + d.step_overhead_s;
    let scale = profile.fixed_overhead.median_s / default_fixed;

    let eff = Efficiency {
        weight_streaming,
        kv_read,
        attention_flops_per_sm_cycle,
        tensor_core,
        gemm_fill_tokens: fill,
        roofline_sharpness: sharpness,
        lora_kernel,
        host_link,
        kernel_launch_s: d.kernel_launch_s * scale,
        kernels_per_layer: d.kernels_per_layer,
        step_overhead_s: d.step_overhead_s * scale,
        sampling_logit_passes,
        // A TP 1 profile has no collectives to fit them on.
        interconnect: d.interconnect,
        all_reduce_latency_s: d.all_reduce_latency_s,
    };
    eff.validate()?;
    Ok(eff)
}

// =============================================================================================
// Embedded profiles and the choice of cost model
// =============================================================================================

/// The profiles in `sim/profiles/`, embedded in the binary: `(file name, JSON)`. To add one,
/// put the file there and add its line, e.g.
/// `("h200-llama-7b.json", include_str!("../profiles/h200-llama-7b.json")),`.
/// The test `embedded_profiles_parse_and_fit` checks every entry.
const EMBEDDED_PROFILES: &[(&str, &str)] = &[
    (
        "h200-llama-7b.json",
        include_str!("../profiles/h200-llama-7b.json"),
    ),
    (
        "h200-llama-13b.json",
        include_str!("../profiles/h200-llama-13b.json"),
    ),
    (
        "h200-llama-3-8b.json",
        include_str!("../profiles/h200-llama-3-8b.json"),
    ),
    (
        "h100-sxm-llama-7b.json",
        include_str!("../profiles/h100-sxm-llama-7b.json"),
    ),
    (
        "h100-sxm-llama-3-8b.json",
        include_str!("../profiles/h100-sxm-llama-3-8b.json"),
    ),
    (
        "h100-sxm-llama-13b.json",
        include_str!("../profiles/h100-sxm-llama-13b.json"),
    ),
];

/// The calibration profiles embedded in the binary, by file name, parsed and validated.
///
/// # Panics
///
/// When an embedded file is not a valid profile: a build defect, which the test
/// `embedded_profiles_parse_and_fit` catches before any release.
pub fn embedded_profiles() -> Vec<(&'static str, CalibrationProfile)> {
    EMBEDDED_PROFILES
        .iter()
        .map(|&(name, text)| {
            let origin = Path::new("sim/profiles").join(name);
            let profile = crate::cost::parse_profile(text, &origin)
                .unwrap_or_else(|e| panic!("embedded calibration profile: {e}"));
            (name, profile)
        })
        .collect()
}

/// Models whose kernels behave alike, for carrying efficiencies from one to another: the same
/// element type, head dimension, and attention kind (multi-head, or grouped-query where one KV
/// row serves several query heads). Names are not compared: they are free text.
pub fn same_family(a: &ModelSpec, b: &ModelSpec) -> bool {
    a.dtype == b.dtype && a.head_dim() == b.head_dim() && a.is_gqa() == b.is_gqa()
}

/// The catalogue GPU a profile was measured on, when it names one.
fn profile_gpu(p: &CalibrationProfile) -> Option<&'static str> {
    p.gpu_key
        .as_deref()
        .and_then(|k| find_gpu(k).ok())
        .map(|g| g.key)
}

/// A derived model whose description names where its efficiencies come from.
struct FittedDerived {
    inner: AnalyticCost,
    description: String,
}

impl CostModel for FittedDerived {
    fn step_cost(&self, batch: &BatchShape) -> StepCost {
        self.inner.step_cost(batch)
    }
    fn provenance(&self) -> Provenance {
        Provenance::Derived
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The profile [`cost_model_for`] prices with as calibrated: the newest of `profiles` measured
/// on `gpu` for this model shape at this TP degree.
pub fn calibrated_profile<'a>(
    gpu: &GpuSpec,
    model: &ModelSpec,
    tensor_parallel: u32,
    profiles: &'a [CalibrationProfile],
) -> Option<&'a CalibrationProfile> {
    profiles
        .iter()
        .filter(|p| {
            profile_gpu(p) == Some(gpu.key)
                && p.tensor_parallel == tensor_parallel
                && shape_mismatches(&p.model, model).is_empty()
        })
        .max_by(|a, b| a.date.cmp(&b.date))
}

/// The cost model for `model` at `tensor_parallel` on `gpu`, given the available `profiles`
/// (usually [`embedded_profiles`] plus any the user passed):
///
/// 1. **calibrated** ([`CalibratedCost`]) when a profile was measured on this GPU (its
///    `gpu_key`) for this model shape at this TP degree; the newest such profile wins;
/// 2. otherwise **derived** ([`AnalyticCost`]) with efficiencies fitted ([`fit_efficiency`])
///    on an H200 profile (TP 1) of the same model shape or, failing that, of the
///    [`same_family`] with the closest parameter count, newest first;
/// 3. otherwise derived with [`Efficiency::default`].
///
/// Every profile embedded today is TP 1, so at `tensor_parallel > 1` the model is derived
/// (step 2 or 3): the TP 1 fit carries the kernels' efficiencies, and the derived model adds
/// the split and the collectives (see [`AnalyticCost`]); its description names the TP degree.
///
/// `targets` are the projections the adapters adapt. Errors when the chosen profile cannot be
/// used (a fit outside the factors' ranges) or the derived model cannot model the request (a
/// TP degree the model cannot be split over, weights that do not fit one GPU's share): a
/// broken profile is reported, never silently skipped.
pub fn cost_model_for(
    gpu: &GpuSpec,
    model: &ModelSpec,
    tensor_parallel: u32,
    targets: &[TargetModule],
    profiles: &[CalibrationProfile],
) -> Result<Box<dyn CostModel>, CostError> {
    if let Some(p) = calibrated_profile(gpu, model, tensor_parallel, profiles) {
        return Ok(Box::new(CalibratedCost::new(
            p,
            model,
            tensor_parallel,
            targets,
        )?));
    }
    let h200 = find_gpu("h200")?;
    let params = |m: &ModelSpec| (m.parameter_count() as f64).max(1.0).ln();
    let reference = profiles
        .iter()
        .filter(|p| {
            profile_gpu(p) == Some(h200.key)
                && p.tensor_parallel == 1
                && same_family(&p.model, model)
        })
        .min_by(|a, b| {
            let distance = |p: &CalibrationProfile| {
                let exact = shape_mismatches(&p.model, model).is_empty();
                (!exact, (params(&p.model) - params(model)).abs())
            };
            let (da, db) = (distance(a), distance(b));
            da.0.cmp(&db.0)
                .then(da.1.total_cmp(&db.1))
                .then(b.date.cmp(&a.date))
        });
    match reference {
        Some(p) => {
            let eff = fit_efficiency(p, h200)?;
            let inner = AnalyticCost::new(gpu, model, tensor_parallel, eff, targets)?;
            // The GQA decode kernel is bound by its SMs, not HBM (on the H100 it ran in the
            // H200's time), so the derived model scales it by SMs x clock; the one GPU that
            // checked it has the H200's SMs, so how it carries to other SMs is not measured.
            // Say so where it applies: on another GPU than the H200 (on the H200, at TP > 1,
            // the factors are its own).
            let caveat = if model.is_gqa() && gpu.key != h200.key {
                "; GQA decode attention priced at the H200's SM rate scaled by SMs x clock, \
                 checked only on the H100 (docs/scenarios.md, \"How far derived goes\")"
            } else {
                ""
            };
            Ok(Box::new(FittedDerived {
                description: format!(
                    "derived: {} x {}, TP {tensor_parallel}, roofline from datasheet numbers with \
                     efficiency factors fitted to the H200 calibration profile of {} ({}){caveat}",
                    gpu.name, model.name, p.model.name, p.date
                ),
                inner,
            }))
        }
        None => Ok(Box::new(AnalyticCost::new(
            gpu,
            model,
            tensor_parallel,
            Efficiency::default(),
            targets,
        )?)),
    }
}

// =============================================================================================
// Synthetic profiles (tests, and a profile's worth of a derived model)
// =============================================================================================

/// The axis values of a synthetic profile (see [`profile_from_cost_model`]).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct SyntheticGrids {
    pub tokens: Vec<u32>,
    pub lm_head_tokens: Vec<u32>,
    pub prefill_tokens: Vec<u32>,
    pub prefill_context: Vec<u32>,
    pub decode_batch: Vec<u32>,
    pub decode_context: Vec<u32>,
    pub lora_tokens: Vec<u32>,
    pub lora_adapters: Vec<u32>,
    pub lora_rank: Vec<u32>,
    pub copy_bytes: Vec<u64>,
}

impl Default for SyntheticGrids {
    /// Axes of the size a calibration would measure: powers of two with midpoints where the
    /// time bends.
    fn default() -> Self {
        SyntheticGrids {
            tokens: vec![
                1, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096, 8192,
            ],
            lm_head_tokens: vec![1, 16, 32, 64, 128, 192, 256, 384, 512],
            prefill_tokens: vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            prefill_context: vec![0, 512, 2048, 8192],
            decode_batch: vec![1, 8, 32, 64, 128, 256, 512],
            decode_context: vec![16, 128, 512, 1024, 2048, 4096, 8192],
            lora_tokens: vec![32, 128, 512, 2048],
            lora_adapters: vec![1, 4, 16, 32],
            lora_rank: vec![8, 16, 32, 64],
            copy_bytes: vec![1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20],
        }
    }
}

/// A calibration profile whose every point is `cost`'s prediction for that point's shape,
/// labelled as measured on catalogue GPU `gpu_key` for `model`. Tests build one from
/// [`AnalyticCost`] to check [`CalibratedCost`] and [`fit_efficiency`] against a known truth.
#[doc(hidden)]
pub fn profile_from_cost_model(
    cost: &dyn CostModel,
    gpu_key: &str,
    model: &ModelSpec,
    lora_targets: &[TargetModule],
    grids: &SyntheticGrids,
) -> CalibrationProfile {
    let measured = |t: Nanos| {
        let s = t.as_secs_f64().max(1e-9);
        Measured {
            median_s: s,
            p10_s: s,
            p90_s: s,
            samples: 1,
        }
    };
    let shape = BatchShape::default;
    let gpu = find_gpu(gpu_key).ok();
    CalibrationProfile {
        format_version: crate::cost::PROFILE_FORMAT_VERSION,
        gpu_name: gpu.map_or(gpu_key.to_string(), |g| g.name.to_string()),
        gpu_key: gpu.map(|g| g.key.to_string()),
        gpu_memory_bytes: gpu.map_or(1, |g| g.memory_bytes),
        driver_version: "synthetic".into(),
        cuda_version: "synthetic".into(),
        date: "2026-01-01".into(),
        model: model.clone(),
        tensor_parallel: 1,
        lora_targets: lora_targets.to_vec(),
        lora_prefill_shrink: Vec::new(),
        lora_prefill_expand: Vec::new(),
        prefill_step_overhead: None,
        base_gemm_token_quantum: None,
        base_gemm_token_quantum_max_tokens: None,
        lora_rank_mix: Vec::new(),
        prompt_step_excess: Vec::new(),
        decode_spread_excess: Vec::new(),
        decode_spread_excess_from: None,
        lora_adapters_beyond_grid: None,
        prefill_extra_chunks: None,
        base_gemm_bucket_tops_to: None,
        gemm_algorithms: None,
        base_gemm: grids
            .tokens
            .iter()
            .map(|&tokens| crate::cost::TokensPoint {
                tokens,
                time: measured(
                    cost.step_cost(&BatchShape {
                        prefill_tokens: tokens,
                        ..shape()
                    })
                    .base_gemm,
                ),
            })
            .collect(),
        lm_head: grids
            .lm_head_tokens
            .iter()
            .map(|&tokens| crate::cost::TokensPoint {
                tokens,
                time: measured(
                    cost.step_cost(&BatchShape {
                        prefill_requests: tokens,
                        ..shape()
                    })
                    .base_gemm,
                ),
            })
            .collect(),
        attention_prefill: grids
            .prefill_tokens
            .iter()
            .flat_map(|&tokens| {
                grids.prefill_context.iter().map(move |&context| {
                    let t = tokens as u64;
                    crate::cost::PrefillAttentionPoint {
                        tokens,
                        context,
                        time: measured(
                            cost.step_cost(&BatchShape {
                                prefill_requests: 1,
                                prefill_tokens: tokens,
                                prefill_attention_pairs: t * context as u64 + t * (t + 1) / 2,
                                max_prefill_tokens: tokens,
                                ..shape()
                            })
                            .attention_prefill,
                        ),
                    }
                })
            })
            .collect(),
        attention_decode: grids
            .decode_batch
            .iter()
            .flat_map(|&batch| {
                grids.decode_context.iter().map(move |&context| {
                    let mut histogram = ContextHistogram::default();
                    for _ in 0..batch {
                        histogram.add(context);
                    }
                    crate::cost::DecodeAttentionPoint {
                        batch,
                        context,
                        time: measured(
                            cost.step_cost(&BatchShape {
                                decode_requests: batch,
                                decode_context_tokens: batch as u64 * context as u64,
                                max_decode_context: context,
                                decode_context_histogram: histogram,
                                ..shape()
                            })
                            .attention_decode,
                        ),
                    }
                })
            })
            .collect(),
        lora_shrink: lora_points(cost, grids, |c| c.lora_shrink, &measured),
        lora_expand: lora_points(cost, grids, |c| c.lora_expand, &measured),
        host_to_device: grids
            .copy_bytes
            .iter()
            .map(|&bytes| crate::cost::TransferPoint {
                bytes,
                time: measured(
                    cost.step_cost(&BatchShape {
                        blocking_load_bytes: bytes,
                        ..shape()
                    })
                    .adapter_h2d,
                ),
            })
            .collect(),
        fixed_overhead: measured(cost.step_cost(&shape()).fixed_overhead),
        sampling_per_token: measured(
            cost.step_cost(&BatchShape {
                decode_requests: 1,
                ..shape()
            })
            .sampling,
        ),
    }
}

fn lora_points(
    cost: &dyn CostModel,
    grids: &SyntheticGrids,
    part: impl Fn(&StepCost) -> Nanos,
    measured: &dyn Fn(Nanos) -> Measured,
) -> Vec<crate::cost::LoraPoint> {
    let mut out = Vec::new();
    for &tokens in &grids.lora_tokens {
        for &adapters in &grids.lora_adapters {
            for &rank in &grids.lora_rank {
                let shape = BatchShape {
                    lora_tokens: tokens,
                    lora_token_rank: tokens as u64 * rank as u64,
                    distinct_adapters: adapters,
                    distinct_rank_sum: adapters as u64 * rank as u64,
                    ..BatchShape::default()
                };
                out.push(crate::cost::LoraPoint {
                    tokens,
                    adapters,
                    rank,
                    time: measured(part(&cost.step_cost(&shape))),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_inside_beyond_and_on_one_value() {
        let axis = [1.0, 2.0, 4.0];
        let s = locate(&axis, 3.0);
        assert_eq!((s.lo, s.hi, s.w), (1, 2, 0.5));
        let s = locate(&axis, 2.0);
        assert_eq!((s.lo, s.hi, s.w), (1, 2, 0.0));
        let s = locate(&axis, 4.0);
        assert_eq!((s.lo, s.hi, s.w), (1, 2, 1.0));
        let s = locate(&axis, 8.0);
        assert_eq!((s.lo, s.hi, s.w), (1, 2, 3.0));
        let s = locate(&axis, 0.0);
        assert_eq!((s.lo, s.hi, s.w), (0, 1, -1.0));
        let s = locate(&[5.0], 100.0);
        assert_eq!((s.lo, s.hi, s.w), (0, 0, 0.0));
    }

    #[test]
    fn lerp_extrapolates_without_falling() {
        assert_eq!(lerp(1.0, 3.0, 0.5), 2.0);
        assert_eq!(lerp(1.0, 3.0, 2.0), 5.0);
        assert_eq!(lerp(1.0, 3.0, -0.25), 0.5);
        assert_eq!(lerp(1.0, 3.0, -10.0), 0.0);
        // A falling last segment is flat beyond the grid, in both directions.
        assert_eq!(lerp(3.0, 1.0, 5.0), 1.0);
        assert_eq!(lerp(3.0, 1.0, -5.0), 3.0);
        assert_eq!(lerp(3.0, 1.0, 0.5), 2.0);
    }

    #[test]
    fn multilinear_grids_are_exact_for_multilinear_functions() {
        let f =
            |t: f64, a: f64, r: f64| 1.0 + 2.0 * t + 3.0 * a + 0.5 * r + t * a + 0.1 * t * r * a;
        let (ts, as_, rs) = ([1u64, 4, 16], [1u64, 2], [8u64, 16, 64]);
        let mut points = Vec::new();
        for &t in &ts {
            for &a in &as_ {
                for &r in &rs {
                    points.push(([t, a, r], f(t as f64, a as f64, r as f64)));
                }
            }
        }
        let grid = Grid::<3>::new(points.into_iter());
        for (t, a, r) in [
            (3.0, 1.5, 20.0),
            (1.0, 1.0, 8.0),
            (10.0, 2.0, 40.0),
            (20.0, 3.0, 100.0),
        ] {
            let (got, want) = (grid.eval([t, a, r]), f(t, a, r));
            assert!(
                (got - want).abs() < 1e-9 * want,
                "({t}, {a}, {r}): {got} vs {want}"
            );
        }
        let flat = Grid::<1>::new([([7u64], 2.5)].into_iter());
        assert_eq!(flat.eval([1.0]), 2.5);
        assert_eq!(flat.eval([1e9]), 2.5);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_seconds(3.71e-3), "3.71 ms");
        assert_eq!(human_seconds(850e-6), "850 µs");
        assert_eq!(human_seconds(1.2e-7), "120 ns");
        assert_eq!(human_seconds(12.34), "12.3 s");
    }
}
