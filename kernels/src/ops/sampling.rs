//! Token selection from f32 logits (`cuda/sampling.cu`): greedy `argmax` and nucleus sampling
//! `sample_top_p`, one block per row.
//!
//! `argmax` returns the first index of the largest value; NaN counts as larger than every
//! number (torch.argmax's rule), so a row with a NaN returns its first NaN.
//!
//! `sample_top_p` is specified so that the CPU reference [`sample_top_p_ref`] returns the same
//! ids bit for bit, whatever the GPU's summation order (the self-check compares ids exactly):
//! 1. `z = logit / temperature`, `zmax = max(logits) / temperature` (NaN logits ignored);
//!    `e = det_exp(z − zmax)` in [0, 1], an exp built from IEEE-rounded `+ − ×` only (the
//!    kernel uses `__fadd_rn`-style intrinsics, never contracted into FMAs; libm's `expf` and
//!    CUDA's differ in the last bit); `e` is 0 below `z − zmax < −87` and for NaN.
//! 2. Integer weights `w = rint(e · 2^40)`: all sums are exact u64 sums, so order-independent.
//!    Tokens below ~e^−28 of the top token get weight 0 and are never drawn.
//! 3. `W = Σ w`; `need = clamp(ceil(top_p · W), 1, W)` in f64. The threshold `tau` is the
//!    largest `e` (compared as its f32 bits) such that the tokens with `e ≥ tau` weigh at least
//!    `need`; all of them are kept, so **tokens tied with the threshold are all kept** (the kept
//!    mass can exceed the smallest possible set's by the tied tokens). `K` = their mass.
//! 4. `r = min(floor(u · K), K − 1)` with `u` clamped into [0, 1] (NaN → 0); the token is the
//!    kept token, in index order, at which the running sum of kept weights first exceeds `r`.
//!    Walking in index order (not by probability) makes the id a monotone function of `u`;
//!    the distribution is the same.
//! 5. If `W = 0` (every logit −inf or NaN, or the largest is +inf, or `logit / temperature`
//!    overflows) the result is `argmax` of the raw logits.
//!
//! The GPU finds `tau` with a three-pass radix select over the key bits (11 + 10 + 10 bits,
//! shared-memory histograms of weights), reading the row (from L2) five times in all; no sort.
//! Precondition checked by the plan: `vocab ≤ 2^22`, so `W < 2^63`.

use crate::error::Result;
use crate::ops::layers::{check_len, elements, launch_error, to_i32, Launch};
use crate::sources::KernelSource;

#[cfg(feature = "cuda")]
use crate::gpu::{driver_err, Gpu};
#[cfg(feature = "cuda")]
use crate::ops::layers::{download, upload, upload_at, CheckResult, TestRng};
#[cfg(feature = "cuda")]
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

pub const SOURCE: KernelSource = KernelSource {
    name: "sampling.cu",
    code: include_str!("../../cuda/sampling.cu"),
};

/// Threads per block of both kernels; equals `SAMPLE_THREADS` in `sampling.cu` (which divides
/// the 2048- and 1024-bucket histograms evenly).
pub const SAMPLE_THREADS: u32 = 512;
/// Largest vocabulary `sample_top_p` accepts: `vocab · 2^40 < 2^63` keeps the weight sums exact.
pub const MAX_VOCAB: usize = 1 << 22;
/// `w = rint(e · WEIGHT_SCALE)`.
const WEIGHT_SCALE: f32 = (1u64 << 40) as f32;

/// Temperature and nucleus mass of a `sample_top_p` call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Finite and > 0.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token of nonzero weight.
    pub top_p: f32,
}

/// Plan of both kernels: one block of [`SAMPLE_THREADS`] per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingPlan {
    pub vocab: i32,
    pub launch: Launch,
}

fn rows_plan(
    kernel: &'static str,
    rows: usize,
    vocab: usize,
    logits_len: usize,
    ids_len: usize,
) -> Result<SamplingPlan> {
    if vocab == 0 {
        return Err(launch_error(kernel, "vocab must be positive"));
    }
    let n = elements(kernel, "logits [rows, vocab]", rows, vocab)?;
    check_len(kernel, "logits", logits_len, n)?;
    check_len(kernel, "ids", ids_len, rows)?;
    Ok(SamplingPlan {
        vocab: to_i32(kernel, "vocab", vocab)?,
        launch: Launch {
            grid: (rows as u32, 1, 1),
            block: SAMPLE_THREADS,
        },
    })
}

/// `argmax`: `logits [rows, vocab]` f32, `ids [rows]` i32.
pub fn argmax_plan(
    rows: usize,
    vocab: usize,
    logits_len: usize,
    ids_len: usize,
) -> Result<SamplingPlan> {
    rows_plan("argmax", rows, vocab, logits_len, ids_len)
}

/// `sample_top_p`: `logits [rows, vocab]` f32, `uniforms [rows]` f32, `ids [rows]` i32.
pub fn sample_top_p_plan(
    rows: usize,
    vocab: usize,
    params: SamplingParams,
    logits_len: usize,
    uniforms_len: usize,
    ids_len: usize,
) -> Result<SamplingPlan> {
    const K: &str = "sample_top_p";
    let plan = rows_plan(K, rows, vocab, logits_len, ids_len)?;
    check_len(K, "uniforms", uniforms_len, rows)?;
    if vocab > MAX_VOCAB {
        return Err(launch_error(
            K,
            format!("vocab = {vocab} exceeds {MAX_VOCAB}: the integer weight sums could overflow"),
        ));
    }
    if !(params.temperature.is_finite() && params.temperature > 0.0) {
        return Err(launch_error(
            K,
            format!(
                "temperature = {} must be finite and > 0 (use argmax for greedy)",
                params.temperature
            ),
        ));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(launch_error(
            K,
            format!("top_p = {} must be in (0, 1]", params.top_p),
        ));
    }
    Ok(plan)
}

// ---------------------------------------------------------------------------------------------
// CPU references (panic on inconsistent lengths: they are test oracles).

/// argmax's order: NaN above every number, then larger values, then lower indices. A strict
/// total order on (value, index), so the winner does not depend on the reduction order.
fn arg_better(v: f32, i: usize, best_v: f32, best_i: usize) -> bool {
    match (v.is_nan(), best_v.is_nan()) {
        (true, true) => i < best_i,
        (true, false) => true,
        (false, true) => false,
        (false, false) => v > best_v || (v == best_v && i < best_i),
    }
}

fn argmax_row(row: &[f32]) -> i32 {
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for (i, &v) in row.iter().enumerate() {
        if arg_better(v, i, best.0, best.1) {
            best = (v, i);
        }
    }
    best.1 as i32
}

/// `ids[r]` = first index of the largest logit of row `r` (NaN counts as largest).
pub fn argmax_ref(logits: &[f32], vocab: usize) -> Vec<i32> {
    assert_eq!(logits.len() % vocab, 0);
    logits.chunks_exact(vocab).map(argmax_row).collect()
}

/// exp(x) for x ≤ 0 from IEEE-rounded operations only; bit-identical to `det_exp` in
/// `sampling.cu` (Rust never contracts `a * b + c` into an FMA). Cody–Waite reduction
/// x = n·ln2 + r with ln2 split so that n·LN2_HI is exact, e^r by a degree-7 Taylor polynomial
/// (|r| ≤ 0.35), times 2^n from the exponent bits. Relative error below 1e-6.
pub fn det_exp(x: f32) -> f32 {
    if x.is_nan() || x < -87.0 {
        return 0.0;
    }
    let x = x.min(0.0);
    let n = (x * f32::from_bits(0x3fb8_aa3b)).round_ties_even(); // x · log2(e), in [-126, 0]
    let mut r = x - n * f32::from_bits(0x3f31_7200); // LN2_HI
    r -= n * f32::from_bits(0x35bf_be8e); // LN2_LO
    let mut p = f32::from_bits(0x3950_0d01); // 1/5040
    for c in [
        0x3ab6_0b61u32, // 1/720
        0x3c08_8889,    // 1/120
        0x3d2a_aaab,    // 1/24
        0x3e2a_aaab,    // 1/6
        0x3f00_0000,    // 1/2
        0x3f80_0000,    // 1
        0x3f80_0000,    // 1
    ] {
        p = p * r + f32::from_bits(c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// (key, weight) of one token: key = f32 bits of e (ordered like e, as e ≥ 0).
fn token_weight(logit: f32, temperature: f32, zmax: f32) -> (u32, u64) {
    let e = det_exp(logit / temperature - zmax);
    (e.to_bits(), (e * WEIGHT_SCALE).round_ties_even() as u64)
}

fn sample_row(row: &[f32], params: SamplingParams, u: f32) -> i32 {
    let greedy = argmax_row(row);
    let lmax = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let zmax = lmax / params.temperature;
    let weights: Vec<(u32, u64)> = row
        .iter()
        .map(|&l| token_weight(l, params.temperature, zmax))
        .collect();
    let total: u64 = weights.iter().map(|&(_, w)| w).sum();
    if total == 0 {
        return greedy;
    }
    let need = ((params.top_p as f64 * total as f64).ceil() as u64).clamp(1, total);
    // tau: walk distinct keys from the top, each with all its tied tokens, until `need`.
    let mut by_key: Vec<(u32, u64)> = weights.iter().copied().filter(|&(_, w)| w > 0).collect();
    by_key.sort_unstable_by_key(|&(key, _)| std::cmp::Reverse(key));
    let (mut tau, mut kept, mut i) = (0u32, 0u64, 0usize);
    while i < by_key.len() {
        let key = by_key[i].0;
        while i < by_key.len() && by_key[i].0 == key {
            kept += by_key[i].1;
            i += 1;
        }
        if kept >= need {
            tau = key;
            break;
        }
    }
    // Like the kernel's fminf(fmaxf(u, 0), 1): NaN -> 0.
    let u = if u.is_nan() { 0.0 } else { u.clamp(0.0, 1.0) };
    let r = ((u as f64 * kept as f64) as u64).min(kept - 1);
    let mut cum = 0u64;
    for (j, &(key, w)) in weights.iter().enumerate() {
        if key >= tau {
            cum += w;
            if cum > r {
                return j as i32;
            }
        }
    }
    greedy // unreachable: the kept weights sum to `kept` > r
}

/// Nucleus sampling of each row of `logits [rows, vocab]` with `uniforms[row]`; the module doc
/// states the rule, which the kernel follows bit for bit.
pub fn sample_top_p_ref(
    logits: &[f32],
    vocab: usize,
    params: SamplingParams,
    uniforms: &[f32],
) -> Vec<i32> {
    assert_eq!(logits.len(), uniforms.len() * vocab);
    logits
        .chunks_exact(vocab)
        .zip(uniforms)
        .map(|(row, &u)| sample_row(row, params, u))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Launches.

/// `ids[r] = argmax(logits[r])` for `r < rows`.
#[cfg(feature = "cuda")]
pub fn argmax(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    ids: &mut CudaViewMut<'_, i32>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let plan = argmax_plan(rows, vocab, logits.len(), ids.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "argmax")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder.arg(logits).arg(ids).arg(&plan.vocab);
    // SAFETY: the argument list matches `argmax(const float*, int*, int)`; the plan checked that
    // logits holds rows × vocab elements and ids rows, and grid.x = rows.
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching argmax"))?;
    Ok(())
}

/// Nucleus sampling: `ids[r]` drawn from row `r` of `logits` with `uniforms[r]` in [0, 1).
#[cfg(feature = "cuda")]
pub fn sample_top_p(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    uniforms: &CudaView<'_, f32>,
    ids: &mut CudaViewMut<'_, i32>,
    rows: usize,
    vocab: usize,
    params: SamplingParams,
) -> Result<()> {
    let plan = sample_top_p_plan(rows, vocab, params, logits.len(), uniforms.len(), ids.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "sample_top_p")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder
        .arg(logits)
        .arg(uniforms)
        .arg(ids)
        .arg(&plan.vocab)
        .arg(&params.temperature)
        .arg(&params.top_p);
    // SAFETY: the argument list matches `sample_top_p(const float*, const float*, int*, int,
    // float, float)`; the plan checked logits (rows × vocab), uniforms and ids (rows), and
    // grid.x = rows; the kernel's shared memory is static.
    unsafe { builder.launch(plan.launch.config()) }
        .map_err(driver_err("launching sample_top_p"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Self-check.

/// Random logits shaped like a language model's: a N(0, 2) body plus a few strong candidates.
/// Rows `r % 7 == 3` are rounded to multiples of 0.5 so that ties occur (argmax's first-index
/// rule and tied thresholds get exercised).
#[cfg(any(test, feature = "cuda"))]
fn random_logits(rng: &mut crate::ops::layers::TestRng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut logits = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let start = logits.len();
        logits.extend((0..vocab).map(|_| 2.0 * rng.normal()));
        for _ in 0..4 {
            let j = rng.below(vocab);
            logits[start + j] += rng.range(4.0, 10.0);
        }
        if r % 7 == 3 {
            for v in &mut logits[start..] {
                *v = (*v * 2.0).round() / 2.0;
            }
        }
    }
    logits
}

/// Compares ids; `tie_ok(row, got, want)` may accept a different id.
#[cfg(feature = "cuda")]
fn compare_ids(
    kernel: String,
    got: &[i32],
    want: &[i32],
    tie_ok: impl Fn(usize, i32, i32) -> bool,
) -> CheckResult {
    let mismatches = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|&(r, (&g, &w))| g != w && !tie_ok(r, g, w))
        .count()
        + got.len().abs_diff(want.len());
    CheckResult {
        kernel,
        max_abs_err: mismatches as f64,
        rel_err: mismatches as f64 / want.len().max(1) as f64,
        passed: mismatches == 0,
    }
}

/// Runs both kernels on fresh random logits (ids poisoned with −7 first) and compares with the
/// CPU references: 300 rows of 32000 (float4 path), then 37 rows of 32001 at an unaligned
/// offset (scalar path). argmax accepts a different id only if its logit equals the
/// reference's; sample_top_p must match exactly (its rule is order-independent by design).
#[cfg(feature = "cuda")]
pub fn check_on_gpu(gpu: &Gpu) -> Result<Vec<CheckResult>> {
    let mut rng = TestRng::new(0x5a_3b1e);
    let mut results = Vec::new();
    for (rows, vocab, off) in [(300usize, 32000usize, 0usize), (37, 32001, 1)] {
        let label = format!(
            "rows={rows}, vocab={vocab}{}",
            if off > 0 { ", unaligned" } else { "" }
        );
        let mut logits = random_logits(&mut rng, rows, vocab);
        // Special rows: a NaN (argmax returns it; sampling ignores it), all −inf (W = 0:
        // greedy fallback, index 0), and a +inf (W = 0: greedy returns the +inf).
        logits[5 * vocab + 17] = f32::NAN;
        logits[6 * vocab..7 * vocab].fill(f32::NEG_INFINITY);
        logits[8 * vocab + vocab / 2] = f32::INFINITY;
        let d_logits = upload_at(gpu, &logits, off)?;
        let logits_view = d_logits.slice(off..);

        let want = argmax_ref(&logits, vocab);
        let mut d_ids = upload(gpu, &vec![-7i32; rows])?;
        argmax(gpu, &logits_view, &mut d_ids.as_view_mut(), rows, vocab)?;
        let got = download(gpu, &d_ids.as_view())?;
        let value = |r: usize, id: i32| logits.get(r * vocab + id as usize).copied();
        results.push(compare_ids(
            format!("argmax [{label}]"),
            &got,
            &want,
            |r, g, w| (0..vocab as i32).contains(&g) && value(r, g) == value(r, w),
        ));

        for params in [
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
            },
            SamplingParams {
                temperature: 1.3,
                top_p: 0.5,
            },
            SamplingParams {
                temperature: 0.2,
                top_p: 0.05,
            },
        ] {
            let uniforms: Vec<f32> = (0..rows).map(|_| rng.unit()).collect();
            let want = sample_top_p_ref(&logits, vocab, params, &uniforms);
            let d_uniforms = upload(gpu, &uniforms)?;
            let mut d_ids = upload(gpu, &vec![-7i32; rows])?;
            sample_top_p(
                gpu,
                &logits_view,
                &d_uniforms.as_view(),
                &mut d_ids.as_view_mut(),
                rows,
                vocab,
                params,
            )?;
            let got = download(gpu, &d_ids.as_view())?;
            results.push(compare_ids(
                format!(
                    "sample_top_p [{label}, T={}, top_p={}]",
                    params.temperature, params.top_p
                ),
                &got,
                &want,
                |_, _, _| false,
            ));
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a GPU: `cargo test -p slora-kernels --features cuda -- --ignored sampling_matches`
    #[cfg(feature = "cuda")]
    #[test]
    fn sampling_matches_cpu_reference_on_gpu() {
        let Some(gpu) = crate::gpu::gpu_for_test("sampling_matches_cpu_reference_on_gpu") else {
            return;
        };
        let rows = check_on_gpu(&gpu).expect("check runs");
        for r in &rows {
            println!(
                "{:<56} max_abs_err {:.3e} rel_err {:.3e} {}",
                r.kernel,
                r.max_abs_err,
                r.rel_err,
                if r.passed { "ok" } else { "FAILED" }
            );
        }
        assert!(rows.iter().all(|r| r.passed));
    }
    use crate::ops::layers::TestRng;

    #[test]
    fn plans_launch_one_block_per_row() {
        let plan = argmax_plan(300, 32000, 300 * 32000, 300).unwrap();
        assert_eq!(plan.launch.grid, (300, 1, 1));
        assert_eq!(plan.launch.block, SAMPLE_THREADS);
        assert_eq!(plan.vocab, 32000);
        let p = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
        };
        let plan = sample_top_p_plan(3, 128_256, p, 3 * 128_256, 3, 3).unwrap();
        assert_eq!(plan.launch.grid, (3, 1, 1));
        assert!(argmax_plan(0, 10, 0, 0).unwrap().launch.is_empty());
        // The histograms (2048 and 1024 buckets) are split evenly across the threads.
        assert_eq!(2048 % SAMPLE_THREADS, 0);
        assert_eq!(1024 % SAMPLE_THREADS, 0);
    }

    #[test]
    fn plans_reject_bad_shapes_and_params() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
        };
        let e = |r: Result<SamplingPlan>| r.unwrap_err().to_string();
        assert!(e(argmax_plan(2, 10, 19, 2)).contains("`logits`"));
        assert!(e(argmax_plan(2, 10, 20, 1)).contains("`ids`"));
        assert!(e(argmax_plan(2, 0, 20, 2)).contains("vocab"));
        assert!(e(argmax_plan(1 << 20, 1 << 12, usize::MAX, usize::MAX)).contains("32-bit"));
        assert!(e(sample_top_p_plan(2, 10, p, 20, 1, 2)).contains("`uniforms`"));
        assert!(e(sample_top_p_plan(1, MAX_VOCAB + 1, p, usize::MAX, 1, 1)).contains("exceeds"));
        for temperature in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let bad = SamplingParams { temperature, ..p };
            assert!(e(sample_top_p_plan(2, 10, bad, 20, 2, 2)).contains("temperature"));
        }
        for top_p in [0.0, -0.1, 1.01, f32::NAN] {
            let bad = SamplingParams { top_p, ..p };
            assert!(e(sample_top_p_plan(2, 10, bad, 20, 2, 2)).contains("top_p"));
        }
    }

    #[test]
    fn argmax_ref_returns_the_first_maximum() {
        let mut rng = TestRng::new(10);
        let vocab = 1000;
        let logits = random_logits(&mut rng, 20, vocab);
        let ids = argmax_ref(&logits, vocab);
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let first = row.iter().position(|&v| v == max).unwrap();
            assert_eq!(ids[r], first as i32, "row {r}");
        }
        // Ties, NaN, all −inf.
        assert_eq!(argmax_ref(&[1.0, 3.0, 2.0, 3.0], 4), vec![1]);
        assert_eq!(argmax_ref(&[1.0, f32::NAN, 9.0, f32::NAN], 4), vec![1]);
        assert_eq!(argmax_ref(&[f32::NEG_INFINITY; 3], 3), vec![0]);
        assert_eq!(argmax_ref(&[-0.0, 0.0], 2), vec![0]);
    }

    #[test]
    fn det_exp_is_accurate() {
        let mut rng = TestRng::new(11);
        for _ in 0..100_000 {
            let x = rng.range(-87.0, 0.0);
            let want = (x as f64).exp();
            let got = det_exp(x) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "x = {x}: {got} vs {want}"
            );
        }
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-0.0), 1.0);
        assert_eq!(det_exp(-88.0), 0.0);
        assert_eq!(det_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(det_exp(f32::NAN), 0.0);
    }

    /// The kept set and probabilities of textbook nucleus sampling, in f64: sort by
    /// probability, keep the shortest prefix of mass ≥ top_p, renormalise.
    fn naive_nucleus(row: &[f32], params: SamplingParams) -> Vec<f64> {
        let z: Vec<f64> = row
            .iter()
            .map(|&l| l as f64 / params.temperature as f64)
            .collect();
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
        let mut q = vec![0.0; row.len()];
        let mut mass = 0.0;
        for &i in &order {
            q[i] = e[i] / sum;
            mass += e[i] / sum;
            if mass >= params.top_p as f64 {
                break;
            }
        }
        q.iter().map(|&p| p / mass).collect()
    }

    /// Sweeping u over a fine grid, the share of draws landing on each token must be its
    /// renormalised nucleus probability: the draw is a monotone map from u to index order, so
    /// each token's count is within a couple of N · q (grid quantisation, and det_exp's 1e-6
    /// moving a boundary across a grid point). Checked against an independent f64 nucleus.
    #[test]
    fn sample_top_p_ref_draws_the_nucleus_distribution() {
        let mut rng = TestRng::new(12);
        let vocab = 300;
        let logits = random_logits(&mut rng, 6, vocab);
        let n = 4000;
        for params in [
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
            },
            SamplingParams {
                temperature: 1.7,
                top_p: 0.3,
            },
        ] {
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                if r % 7 == 3 {
                    continue; // tied logits: the tie rule differs from a sort's arbitrary order
                }
                let q = naive_nucleus(row, params);
                let mut counts = vec![0usize; vocab];
                for k in 0..n {
                    let u = (k as f32 + 0.5) / n as f32;
                    counts[sample_row(row, params, u) as usize] += 1;
                }
                for j in 0..vocab {
                    let expected = q[j] * n as f64;
                    assert!(
                        (counts[j] as f64 - expected).abs() <= 2.0 + 1e-3 * expected,
                        "{params:?} row {r} token {j}: {} draws, expected {expected:.1}",
                        counts[j]
                    );
                }
            }
        }
    }

    #[test]
    fn sample_top_p_ref_keeps_tied_tokens_and_falls_back_to_greedy() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
        };
        // Four tied top tokens: a tiny top_p keeps all four, and u picks among them in order.
        let row = [0.0, 5.0, 1.0, 5.0, 5.0, 2.0, 5.0];
        let us = [0.0, 0.26, 0.51, 0.99];
        let ids = sample_top_p_ref(&row.repeat(4), 7, p, &us);
        assert_eq!(ids, vec![1, 3, 4, 6]);
        // A tiny top_p with a unique top token is greedy.
        let row = [0.0, 5.0, 1.0, 4.9];
        assert_eq!(sample_top_p_ref(&row, 4, p, &[0.999]), vec![1]);
        // W = 0: all −inf, or a +inf logit, falls back to argmax; NaN logits are never drawn.
        let inf = f32::INFINITY;
        assert_eq!(
            sample_top_p_ref(&[f32::NEG_INFINITY; 3], 3, p, &[0.5]),
            vec![0]
        );
        assert_eq!(sample_top_p_ref(&[1.0, inf, 2.0], 3, p, &[0.5]), vec![1]);
        let all = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        for u in [0.0, 0.3, 0.7, 0.999_999, 1.0, f32::NAN, -1.0] {
            let id = sample_top_p_ref(&[f32::NAN, 0.0, f32::NAN, 0.0], 4, all, &[u])[0];
            assert!(id == 1 || id == 3, "u = {u}: {id}");
        }
    }
}
