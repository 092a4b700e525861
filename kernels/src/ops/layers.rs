//! Per-token layers of the Llama forward pass (`cuda/layers.cu`): embedding lookup, RMSNorm,
//! fused residual add + RMSNorm, rotary position embedding, SiLU-gated MLP activation and the
//! residual add.
//!
//! Numerics: fp16 in and out (raw bits on the device), f32 in between, and an fp16 rounding at
//! exactly the points where HF transformers' Llama materialises an fp16 tensor, so the output
//! matches a PyTorch fp16 run up to the last bit of f32 transcendental functions and summation
//! order. Each kernel's doc says where it rounds.
//!
//! Each kernel has:
//! - a pure launch plan (`*_plan`): checks shapes, buffer lengths (at least the needed number of
//!   elements; extra elements are left alone) and that every per-row index and every `[T, X]`
//!   element count fits `i32`, and computes grid and block. Row offsets are 64-bit in the
//!   kernels, so only those bounds matter;
//! - a CPU reference (`*_ref`) on `half::f16` host slices that rounds where the kernel does;
//! - (feature `cuda`) the launch on `Gpu::stream`, which does nothing for zero tokens.
//!
//! All kernels are memory-bound: rows use 16-byte (8 × fp16) accesses when the row length is a
//! multiple of 8 and every buffer is 16-byte aligned (checked in the kernel, as a view may start
//! at any element), else a scalar path. `check_on_gpu` runs both paths against the references.

use crate::error::{Error, Result};
use crate::sources::KernelSource;
use half::f16;

#[cfg(feature = "cuda")]
use crate::gpu::{driver_err, Gpu};
#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

pub const SOURCE: KernelSource = KernelSource {
    name: "layers.cu",
    code: include_str!("../../cuda/layers.cu"),
};

/// Threads per block of the chunked kernels (`embedding`, `silu_mul`, `add`); equals
/// `LAYERS_CHUNK_THREADS` in `layers.cu`.
pub const CHUNK_THREADS: u32 = 256;
/// Elements one block of a chunked kernel covers (8 per thread); equals `LAYERS_CHUNK`.
pub const CHUNK: usize = CHUNK_THREADS as usize * 8;

/// Grid and block of one launch (1-D blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
}

impl Launch {
    /// A launch with no blocks (zero tokens): the wrappers skip it.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Plan of the one-block-per-row norms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPlan {
    pub hidden: i32,
    pub eps: f32,
    pub launch: Launch,
}

/// Plan of `embedding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingPlan {
    pub hidden: i32,
    pub vocab: i32,
    pub launch: Launch,
}

/// Plan of the chunked elementwise kernels (`silu_mul`: `n` = intermediate size; `add`: `n` =
/// element count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementwisePlan {
    pub n: i32,
    pub launch: Launch,
}

/// Shape of a `rope` call: `q` is `[tokens, num_heads * head_dim]`, `k` is
/// `[tokens, num_kv_heads * head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    pub tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `rope_theta` of the model config (10000 for Llama 2, 500000 for Llama 3).
    pub theta: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopePlan {
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub theta: f32,
    pub launch: Launch,
}

pub(crate) fn launch_error(kernel: &'static str, reason: impl Into<String>) -> Error {
    Error::Launch {
        kernel,
        reason: reason.into(),
    }
}

/// `value` as an `i32` kernel argument, or an error naming it.
pub(crate) fn to_i32(kernel: &'static str, what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        launch_error(
            kernel,
            format!("{what} = {value} does not fit a 32-bit index"),
        )
    })
}

/// `a * b` elements, checked to fit `i32` (the kernels index rows with `int`).
pub(crate) fn elements(kernel: &'static str, what: &str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(n) if n <= i32::MAX as usize => Ok(n),
        _ => Err(launch_error(
            kernel,
            format!("{what} has {a} × {b} elements, more than a 32-bit index can address"),
        )),
    }
}

/// A buffer must hold at least `need` elements.
pub(crate) fn check_len(kernel: &'static str, what: &str, len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(launch_error(
            kernel,
            format!("`{what}` has {len} elements but the shape needs {need}"),
        ));
    }
    Ok(())
}

fn positive(kernel: &'static str, what: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(launch_error(kernel, format!("{what} must be positive")));
    }
    Ok(())
}

/// Threads of a one-block-per-row kernel: one per 8 elements (one 16-byte access each, all in
/// flight at once), a multiple of 32 (the block reductions need whole warps), at most 1024.
fn row_threads(hidden: usize) -> u32 {
    (hidden.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Blocks along a row of `n` elements for the chunked kernels (grid.y, at most 65535).
fn chunks(kernel: &'static str, n: usize) -> Result<u32> {
    let c = n.div_ceil(CHUNK);
    if c > 65_535 {
        return Err(launch_error(
            kernel,
            format!("rows of {n} elements need {c} blocks along grid.y; the limit is 65535"),
        ));
    }
    Ok(c as u32)
}

fn row_plan(kernel: &'static str, tokens: usize, hidden: usize, eps: f32) -> Result<RowPlan> {
    positive(kernel, "hidden", hidden)?;
    elements(kernel, "[tokens, hidden]", tokens, hidden)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(launch_error(
            kernel,
            format!("eps = {eps} must be finite and >= 0"),
        ));
    }
    Ok(RowPlan {
        hidden: to_i32(kernel, "hidden", hidden)?,
        eps,
        launch: Launch {
            grid: (tokens as u32, 1, 1),
            block: row_threads(hidden),
        },
    })
}

/// `embedding`: `ids [tokens]`, `table [vocab, hidden]`, `out [tokens, hidden]`, `bad_ids [1]`.
pub fn embedding_plan(
    tokens: usize,
    hidden: usize,
    vocab: usize,
    ids_len: usize,
    table_len: usize,
    out_len: usize,
    bad_ids_len: usize,
) -> Result<EmbeddingPlan> {
    const K: &str = "embedding";
    positive(K, "hidden", hidden)?;
    positive(K, "vocab", vocab)?;
    let n = elements(K, "out [tokens, hidden]", tokens, hidden)?;
    // The table row offset is 64-bit in the kernel; only its size must be representable.
    let table = vocab
        .checked_mul(hidden)
        .ok_or_else(|| launch_error(K, "vocab × hidden overflows"))?;
    check_len(K, "ids", ids_len, tokens)?;
    check_len(K, "table", table_len, table)?;
    check_len(K, "out", out_len, n)?;
    check_len(K, "bad_ids", bad_ids_len, 1)?;
    Ok(EmbeddingPlan {
        hidden: to_i32(K, "hidden", hidden)?,
        vocab: to_i32(K, "vocab", vocab)?,
        launch: Launch {
            grid: (tokens as u32, chunks(K, hidden)?, 1),
            block: CHUNK_THREADS,
        },
    })
}

/// `rms_norm`: `x [tokens, hidden]`, `weight [hidden]`, `out [tokens, hidden]`.
pub fn rms_norm_plan(
    tokens: usize,
    hidden: usize,
    eps: f32,
    x_len: usize,
    weight_len: usize,
    out_len: usize,
) -> Result<RowPlan> {
    const K: &str = "rms_norm";
    let plan = row_plan(K, tokens, hidden, eps)?;
    check_len(K, "x", x_len, tokens * hidden)?;
    check_len(K, "weight", weight_len, hidden)?;
    check_len(K, "out", out_len, tokens * hidden)?;
    Ok(plan)
}

/// Plan of `add_rms_norm`: the row plan and the first row that gets a delta added.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AddRmsNormPlan {
    pub rows: RowPlan,
    /// `tokens` when there is no delta.
    pub delta_row0: i32,
}

/// `add_rms_norm`: `residual [tokens, hidden]` (updated in place), `x [tokens, hidden]`,
/// `weight [hidden]`, `out [tokens, hidden]`; with `delta = Some((first_row, len))`, rows
/// `first_row..tokens` of `x` get `delta [tokens - first_row, hidden]` added first.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_plan(
    tokens: usize,
    hidden: usize,
    eps: f32,
    residual_len: usize,
    x_len: usize,
    weight_len: usize,
    out_len: usize,
    delta: Option<(usize, usize)>,
) -> Result<AddRmsNormPlan> {
    const K: &str = "add_rms_norm";
    let plan = row_plan(K, tokens, hidden, eps)?;
    check_len(K, "residual", residual_len, tokens * hidden)?;
    check_len(K, "x", x_len, tokens * hidden)?;
    check_len(K, "weight", weight_len, hidden)?;
    check_len(K, "out", out_len, tokens * hidden)?;
    let delta_row0 = match delta {
        None => tokens,
        Some((first_row, len)) => {
            if first_row > tokens {
                return Err(launch_error(
                    K,
                    format!("the delta starts at row {first_row}, past the {tokens} rows"),
                ));
            }
            check_len(K, "delta", len, (tokens - first_row) * hidden)?;
            first_row
        }
    };
    Ok(AddRmsNormPlan {
        rows: plan,
        delta_row0: to_i32(K, "delta row", delta_row0)?,
    })
}

/// `rope`: one block per token; a thread per (head, i < head_dim/2) pair, up to 512.
pub fn rope_plan(
    shape: &RopeShape,
    q_len: usize,
    k_len: usize,
    positions_len: usize,
) -> Result<RopePlan> {
    const K: &str = "rope";
    positive(K, "num_heads", shape.num_heads)?;
    positive(K, "head_dim", shape.head_dim)?;
    if shape.head_dim % 2 != 0 {
        return Err(launch_error(
            K,
            format!("head_dim = {} must be even (rotate-half)", shape.head_dim),
        ));
    }
    if !(shape.theta.is_finite() && shape.theta > 0.0) {
        return Err(launch_error(
            K,
            format!("theta = {} must be finite and positive", shape.theta),
        ));
    }
    let q_width = elements(K, "num_heads × head_dim", shape.num_heads, shape.head_dim)?;
    let k_width = elements(
        K,
        "num_kv_heads × head_dim",
        shape.num_kv_heads,
        shape.head_dim,
    )?;
    let q = elements(K, "q [tokens, num_heads × head_dim]", shape.tokens, q_width)?;
    let k = elements(
        K,
        "k [tokens, num_kv_heads × head_dim]",
        shape.tokens,
        k_width,
    )?;
    let pairs = (shape.num_heads + shape.num_kv_heads) * (shape.head_dim / 2);
    to_i32(K, "head pairs per token", pairs)?;
    check_len(K, "q", q_len, q)?;
    check_len(K, "k", k_len, k)?;
    check_len(K, "positions", positions_len, shape.tokens)?;
    Ok(RopePlan {
        num_heads: to_i32(K, "num_heads", shape.num_heads)?,
        num_kv_heads: to_i32(K, "num_kv_heads", shape.num_kv_heads)?,
        head_dim: to_i32(K, "head_dim", shape.head_dim)?,
        theta: shape.theta,
        launch: Launch {
            grid: (shape.tokens as u32, 1, 1),
            block: (pairs.div_ceil(32) * 32).clamp(32, 512) as u32,
        },
    })
}

/// `silu_mul`: `gate_up [tokens, 2 × intermediate]`, `out [tokens, intermediate]`.
pub fn silu_mul_plan(
    tokens: usize,
    intermediate: usize,
    gate_up_len: usize,
    out_len: usize,
) -> Result<ElementwisePlan> {
    const K: &str = "silu_mul";
    positive(K, "intermediate", intermediate)?;
    let gate_up = elements(
        K,
        "gate_up [tokens, 2 × intermediate]",
        tokens,
        intermediate.saturating_mul(2),
    )?;
    check_len(K, "gate_up", gate_up_len, gate_up)?;
    check_len(K, "out", out_len, tokens * intermediate)?;
    Ok(ElementwisePlan {
        n: to_i32(K, "intermediate", intermediate)?,
        launch: Launch {
            grid: (tokens as u32, chunks(K, intermediate)?, 1),
            block: CHUNK_THREADS,
        },
    })
}

/// Plan of `split_qkv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitQkvPlan {
    pub q_width: i32,
    pub kv_width: i32,
    /// First row that gets the LoRA deltas added (`tokens` when there are none).
    pub delta_row0: i32,
    pub launch: Launch,
}

/// `split_qkv`: `qkv [tokens, q_width + 2 × kv_width]` → `q [tokens, q_width]`,
/// `k` and `v [tokens, kv_width]`; with `delta = Some((first_row, [dq, dk, dv] lengths))`,
/// rows `first_row..tokens` also get `dq [tokens - first_row, q_width]` (and `dk`, `dv` of
/// `kv_width`) added.
pub fn split_qkv_plan(
    tokens: usize,
    q_width: usize,
    kv_width: usize,
    lens: [usize; 4],
    delta: Option<(usize, [usize; 3])>,
) -> Result<SplitQkvPlan> {
    const K: &str = "split_qkv";
    positive(K, "q_width", q_width)?;
    positive(K, "kv_width", kv_width)?;
    let total = q_width.saturating_add(kv_width.saturating_mul(2));
    let qkv = elements(K, "qkv [tokens, q_width + 2 × kv_width]", tokens, total)?;
    check_len(K, "qkv", lens[0], qkv)?;
    check_len(K, "q", lens[1], tokens * q_width)?;
    check_len(K, "k", lens[2], tokens * kv_width)?;
    check_len(K, "v", lens[3], tokens * kv_width)?;
    let delta_row0 = match delta {
        None => tokens,
        Some((first_row, [dq, dk, dv])) => {
            if first_row > tokens {
                return Err(launch_error(
                    K,
                    format!("the deltas start at row {first_row}, past the {tokens} rows"),
                ));
            }
            let rows = tokens - first_row;
            check_len(K, "dq", dq, rows * q_width)?;
            check_len(K, "dk", dk, rows * kv_width)?;
            check_len(K, "dv", dv, rows * kv_width)?;
            first_row
        }
    };
    Ok(SplitQkvPlan {
        q_width: to_i32(K, "q_width", q_width)?,
        kv_width: to_i32(K, "kv_width", kv_width)?,
        delta_row0: to_i32(K, "delta row", delta_row0)?,
        launch: Launch {
            grid: (tokens as u32, chunks(K, total)?, 1),
            block: CHUNK_THREADS,
        },
    })
}

/// `add`: `x [n] += y [n]`.
pub fn add_plan(n: usize, x_len: usize, y_len: usize) -> Result<ElementwisePlan> {
    const K: &str = "add";
    let n32 = to_i32(K, "n", n)?;
    check_len(K, "x", x_len, n)?;
    check_len(K, "y", y_len, n)?;
    Ok(ElementwisePlan {
        n: n32,
        launch: Launch {
            grid: (n.div_ceil(CHUNK) as u32, 1, 1),
            block: CHUNK_THREADS,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// CPU references. They panic on inconsistent lengths: they are test oracles, not entry points.

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `out[t] = table[ids[t]]`; an id outside `[0, vocab)` gives a zero row and is counted (the
/// second result), as the kernel does.
pub fn embedding_ref(ids: &[i32], table: &[f16], vocab: usize, hidden: usize) -> (Vec<f16>, usize) {
    assert!(table.len() >= vocab * hidden);
    let mut out = vec![f16::ZERO; ids.len() * hidden];
    let mut bad = 0;
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        match usize::try_from(id) {
            Ok(id) if id < vocab => row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]),
            _ => bad += 1,
        }
    }
    (out, bad)
}

/// HF LlamaRMSNorm on one row: `variance = mean(x²)` (f32; summed here in f64),
/// `h = f16(x * 1/sqrt(variance + eps))`, `out = f16(weight * h)`.
fn rms_norm_row(x: &[f16], weight: &[f16], eps: f32, out: &mut [f16]) {
    let sum_sq: f64 = x.iter().map(|v| (v.to_f64()) * v.to_f64()).sum();
    let variance = (sum_sq / x.len() as f64) as f32;
    let inv_rms = 1.0 / (variance + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = f16::from_f32(f16_round(v.to_f32() * inv_rms) * w.to_f32());
    }
}

/// `rms_norm` on `x [tokens, hidden]` with `weight [hidden]`.
pub fn rms_norm_ref(x: &[f16], weight: &[f16], hidden: usize, eps: f32) -> Vec<f16> {
    assert_eq!(x.len() % hidden, 0);
    assert_eq!(weight.len(), hidden);
    let mut out = vec![f16::ZERO; x.len()];
    for (row, out_row) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        rms_norm_row(row, weight, eps, out_row);
    }
    out
}

/// `residual = f16(residual + x)` in place, then returns `rms_norm(residual)`.
pub fn add_rms_norm_ref(
    residual: &mut [f16],
    x: &[f16],
    weight: &[f16],
    hidden: usize,
    eps: f32,
) -> Vec<f16> {
    add_ref(residual, x);
    rms_norm_ref(residual, weight, hidden, eps)
}

/// [`add_rms_norm_ref`] with the f32 `delta` added to the rows of `x` from `first_row` on
/// first (`x = f16(x + delta)`, then as without).
pub fn add_rms_norm_delta_ref(
    residual: &mut [f16],
    x: &[f16],
    weight: &[f16],
    hidden: usize,
    eps: f32,
    first_row: usize,
    delta: &[f32],
) -> Vec<f16> {
    let mut x = x.to_vec();
    for (a, d) in x[first_row * hidden..].iter_mut().zip(delta) {
        *a = f16::from_f32(a.to_f32() + d);
    }
    add_rms_norm_ref(residual, &x, weight, hidden, eps)
}

/// `x = f16(x + y)` elementwise.
pub fn add_ref(x: &mut [f16], y: &[f16]) {
    assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a = f16::from_f32(a.to_f32() + b.to_f32());
    }
}

/// HF rotate-half RoPE in place on `q` and `k`; see `rope` in `layers.cu` for the rounding.
pub fn rope_ref(q: &mut [f16], k: &mut [f16], positions: &[i32], shape: &RopeShape) {
    let d = shape.head_dim;
    let half = d / 2;
    assert_eq!(q.len(), shape.tokens * shape.num_heads * d);
    assert_eq!(k.len(), shape.tokens * shape.num_kv_heads * d);
    assert_eq!(positions.len(), shape.tokens);
    let inv_freqs: Vec<f32> = (0..half)
        .map(|i| 1.0 / shape.theta.powf((2 * i) as f32 / d as f32))
        .collect();
    let q_rows = q.chunks_exact_mut(shape.num_heads * d);
    let k_rows = k.chunks_exact_mut(shape.num_kv_heads * d);
    for ((q_row, k_row), &pos) in q_rows.zip(k_rows).zip(positions) {
        for (i, &inv_freq) in inv_freqs.iter().enumerate() {
            let (s, c) = (pos as f32 * inv_freq).sin_cos();
            let (c, s) = (f16_round(c), f16_round(s));
            for head in q_row.chunks_exact_mut(d).chain(k_row.chunks_exact_mut(d)) {
                let x1 = head[i].to_f32();
                let x2 = head[i + half].to_f32();
                head[i] = f16::from_f32(f16_round(x1 * c) + f16_round(-x2 * s));
                head[i + half] = f16::from_f32(f16_round(x2 * c) + f16_round(x1 * s));
            }
        }
    }
}

/// `out[t, j] = f16(f16(silu(gate[t, j])) * up[t, j])` with `gate_up [tokens, 2I]`.
/// `split_qkv` on the host: the q, k and v column blocks of each row.
pub fn split_qkv_ref(
    qkv: &[f16],
    q_width: usize,
    kv_width: usize,
) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
    let total = q_width + 2 * kv_width;
    assert_eq!(qkv.len() % total, 0);
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in qkv.chunks_exact(total) {
        q.extend_from_slice(&row[..q_width]);
        k.extend_from_slice(&row[q_width..q_width + kv_width]);
        v.extend_from_slice(&row[q_width + kv_width..]);
    }
    (q, k, v)
}

/// `split_qkv` with f32 deltas on the host: rows `first_row..` of q, k and v get `dq`, `dk`,
/// `dv` added in f32, then rounded to fp16 once.
pub fn split_qkv_add_ref(
    qkv: &[f16],
    q_width: usize,
    kv_width: usize,
    first_row: usize,
    [dq, dk, dv]: [&[f32]; 3],
) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
    let (mut q, mut k, mut v) = split_qkv_ref(qkv, q_width, kv_width);
    for (out, delta, width) in [
        (&mut q, dq, q_width),
        (&mut k, dk, kv_width),
        (&mut v, dv, kv_width),
    ] {
        for (x, d) in out[first_row * width..].iter_mut().zip(delta) {
            *x = f16::from_f32(x.to_f32() + d);
        }
    }
    (q, k, v)
}

pub fn silu_mul_ref(gate_up: &[f16], intermediate: usize) -> Vec<f16> {
    assert_eq!(gate_up.len() % (2 * intermediate), 0);
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * intermediate) {
        let (gate, up) = row.split_at(intermediate);
        out.extend(gate.iter().zip(up).map(|(g, u)| {
            let g = g.to_f32();
            let act = f16_round(g / (1.0 + (-g).exp()));
            f16::from_f32(act * u.to_f32())
        }));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Launches.

/// `out[t] = table[ids[t]]` for `t < tokens`. Out-of-range ids give zero rows and increment
/// `bad_ids[0]` (not reset here: zero it before a batch of calls you want to check).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    gpu: &Gpu,
    ids: &CudaView<'_, i32>,
    table: &CudaView<'_, f16>,
    out: &mut CudaViewMut<'_, f16>,
    bad_ids: &mut CudaViewMut<'_, i32>,
    tokens: usize,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    let plan = embedding_plan(
        tokens,
        hidden,
        vocab,
        ids.len(),
        table.len(),
        out.len(),
        bad_ids.len(),
    )?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "embedding")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder
        .arg(ids)
        .arg(table)
        .arg(out)
        .arg(bad_ids)
        .arg(&plan.hidden)
        .arg(&plan.vocab);
    // SAFETY: the argument list matches `embedding(const int*, const half_t*, half_t*, int*, int,
    // int)`; the plan checked that ids, table, out and bad_ids hold the elements the grid
    // touches, and the kernel reads no table row for an id outside [0, vocab).
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching embedding"))?;
    Ok(())
}

/// `out = rms_norm(x) * weight` row by row (`x`, `out`: `[tokens, hidden]`).
#[cfg(feature = "cuda")]
pub fn rms_norm(
    gpu: &Gpu,
    x: &CudaView<'_, f16>,
    weight: &CudaView<'_, f16>,
    out: &mut CudaViewMut<'_, f16>,
    tokens: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    let plan = rms_norm_plan(tokens, hidden, eps, x.len(), weight.len(), out.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "rms_norm")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder
        .arg(x)
        .arg(weight)
        .arg(out)
        .arg(&plan.hidden)
        .arg(&plan.eps);
    // SAFETY: the argument list matches `rms_norm(const half_t*, const half_t*, half_t*, int,
    // float)`; the plan checked that x and out hold tokens × hidden elements and weight hidden,
    // and grid.x = tokens. `out` is a distinct mutable view, so it cannot alias the inputs.
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching rms_norm"))?;
    Ok(())
}

/// `residual += x` (fp16) in place, then `out = rms_norm(residual) * weight`; with a
/// `delta`, rows `delta.first_row..` of `x` get it added first (see [`RowDelta`]).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    gpu: &Gpu,
    residual: &mut CudaViewMut<'_, f16>,
    x: &CudaView<'_, f16>,
    weight: &CudaView<'_, f16>,
    out: &mut CudaViewMut<'_, f16>,
    tokens: usize,
    hidden: usize,
    eps: f32,
    delta: Option<&RowDelta<'_>>,
) -> Result<()> {
    let plan = add_rms_norm_plan(
        tokens,
        hidden,
        eps,
        residual.len(),
        x.len(),
        weight.len(),
        out.len(),
        delta.map(|d| (d.first_row, d.delta.len())),
    )?;
    if plan.rows.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "add_rms_norm")?;
    let mut builder = gpu.stream.launch_builder(&f);
    let null: u64 = 0;
    builder
        .arg(residual)
        .arg(x)
        .arg(weight)
        .arg(out)
        .arg(&plan.rows.hidden)
        .arg(&plan.rows.eps);
    match delta {
        Some(d) => builder.arg(&d.delta),
        None => builder.arg(&null),
    };
    builder.arg(&plan.delta_row0);
    // SAFETY: the argument list matches `add_rms_norm(half_t*, const half_t*, const half_t*,
    // half_t*, int, float, const half_t*, int)` (a null delta when there is none, which the
    // kernel then never reads); the plan checked every length against tokens × hidden
    // (weight: hidden; the delta: the rows from `delta_row0` on) and grid.x = tokens. The two
    // mutable views are distinct borrows: no aliasing.
    unsafe { builder.launch(plan.rows.launch.config()) }
        .map_err(driver_err("launching add_rms_norm"))?;
    Ok(())
}

/// A delta (f32, unrounded) that [`add_rms_norm`] adds to rows `first_row..tokens` of its `x`:
/// `delta [tokens - first_row, hidden]`.
#[cfg(feature = "cuda")]
pub struct RowDelta<'a> {
    pub first_row: usize,
    pub delta: CudaView<'a, f32>,
}

/// Rotary embedding in place on `q` and `k` at `positions [tokens]`.
#[cfg(feature = "cuda")]
pub fn rope(
    gpu: &Gpu,
    q: &mut CudaViewMut<'_, f16>,
    k: &mut CudaViewMut<'_, f16>,
    positions: &CudaView<'_, i32>,
    shape: &RopeShape,
) -> Result<()> {
    let plan = rope_plan(shape, q.len(), k.len(), positions.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "rope")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder
        .arg(q)
        .arg(k)
        .arg(positions)
        .arg(&plan.num_heads)
        .arg(&plan.num_kv_heads)
        .arg(&plan.head_dim)
        .arg(&plan.theta);
    // SAFETY: the argument list matches `rope(half_t*, half_t*, const int*, int, int, int,
    // float)`; the plan checked q, k and positions against tokens and the head counts, and
    // grid.x = tokens.
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching rope"))?;
    Ok(())
}

/// `out = silu(gate) * up`: `gate_up [tokens, 2 × intermediate]` → `out [tokens, intermediate]`.
#[cfg(feature = "cuda")]
pub fn silu_mul(
    gpu: &Gpu,
    gate_up: &CudaView<'_, f16>,
    out: &mut CudaViewMut<'_, f16>,
    tokens: usize,
    intermediate: usize,
) -> Result<()> {
    let plan = silu_mul_plan(tokens, intermediate, gate_up.len(), out.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "silu_mul")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder.arg(gate_up).arg(out).arg(&plan.n);
    // SAFETY: the argument list matches `silu_mul(const half_t*, half_t*, int)`; the plan checked
    // gate_up (tokens × 2I) and out (tokens × I), grid = (tokens, ceil(I / CHUNK)).
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching silu_mul"))?;
    Ok(())
}

/// Splits one fused q/k/v GEMM output `[tokens, qw + 2 kvw]` into `q`, `k` and `v`.
#[cfg(feature = "cuda")]
pub fn split_qkv(
    gpu: &Gpu,
    qkv: &CudaView<'_, f16>,
    [q, k, v]: [&mut CudaViewMut<'_, f16>; 3],
    tokens: usize,
    q_width: usize,
    kv_width: usize,
    delta: Option<&QkvDelta<'_>>,
) -> Result<()> {
    let plan = split_qkv_plan(
        tokens,
        q_width,
        kv_width,
        [qkv.len(), q.len(), k.len(), v.len()],
        delta.map(|d| (d.first_row, [d.dq.len(), d.dk.len(), d.dv.len()])),
    )?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "split_qkv")?;
    let mut builder = gpu.stream.launch_builder(&f);
    let null: u64 = 0;
    builder
        .arg(qkv)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&plan.q_width)
        .arg(&plan.kv_width);
    match delta {
        Some(d) => builder.arg(&d.dq).arg(&d.dk).arg(&d.dv),
        None => builder.arg(&null).arg(&null).arg(&null),
    };
    builder.arg(&plan.delta_row0);
    // SAFETY: the argument list matches `split_qkv(const half_t*, half_t*, half_t*, half_t*,
    // int, int, const half_t*, const half_t*, const half_t*, int)` (null delta pointers when
    // there are none, which the kernel then never reads); the plan checked every length
    // against tokens and the widths, the deltas' against the rows from `delta_row0` on.
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching split_qkv"))?;
    Ok(())
}

/// The decode rows' LoRA deltas (f32, unrounded) that [`split_qkv`] adds to q, k and v: rows
/// `first_row..tokens` get `dq [tokens - first_row, q_width]`, `dk` and `dv` (`kv_width`).
#[cfg(feature = "cuda")]
pub struct QkvDelta<'a> {
    pub first_row: usize,
    pub dq: CudaView<'a, f32>,
    pub dk: CudaView<'a, f32>,
    pub dv: CudaView<'a, f32>,
}

/// `x[i] += y[i]` (fp16) for `i < n`.
#[cfg(feature = "cuda")]
pub fn add(gpu: &Gpu, x: &mut CudaViewMut<'_, f16>, y: &CudaView<'_, f16>, n: usize) -> Result<()> {
    let plan = add_plan(n, x.len(), y.len())?;
    if plan.launch.is_empty() {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "add")?;
    let mut builder = gpu.stream.launch_builder(&f);
    builder.arg(x).arg(y).arg(&plan.n);
    // SAFETY: the argument list matches `add(half_t*, const half_t*, int)`; the plan checked that
    // x and y hold n elements, and the kernel touches indices below n only.
    unsafe { builder.launch(plan.launch.config()) }.map_err(driver_err("launching add"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Self-checks: random inputs, shared with `sampling`.

/// One comparison of a kernel against its CPU reference.
#[derive(Clone, Debug)]
pub struct CheckResult {
    /// Kernel and case, e.g. `rms_norm [T=300, H=4096]`.
    pub kernel: String,
    /// Largest |gpu − reference| (fp16 outputs); for ids, the number of mismatches.
    pub max_abs_err: f64,
    /// `max_abs_err / max |reference|` (fp16 outputs); for ids, the mismatch fraction.
    pub rel_err: f64,
    pub passed: bool,
}

/// Relative-error bound for fp16 outputs: a few fp16 ulps (2^-10 ≈ 1e-3) of slack for f32
/// transcendental functions and summation order deciding a rounding differently.
pub const FP16_REL_TOLERANCE: f64 = 1e-2;

/// SplitMix64: a small deterministic generator for test and check inputs (no dependency).
#[cfg(any(test, feature = "cuda"))]
pub(crate) struct TestRng(u64);

#[cfg(any(test, feature = "cuda"))]
impl TestRng {
    pub(crate) fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub(crate) fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in [0, n).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    pub(crate) fn f16s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(self.range(lo, hi))).collect()
    }
}

/// Compares fp16 results. NaN or infinity where the reference differs counts as an infinite
/// error, so a poisoned output that was never written fails.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn compare_f16(kernel: String, got: &[f16], want: &[f16]) -> CheckResult {
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.to_f64(), w.to_f64());
        let diff = if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else if g == w {
            0.0 // the same infinity
        } else {
            f64::INFINITY
        };
        if w.is_finite() {
            max_ref = max_ref.max(w.abs());
        }
        max_abs = max_abs.max(diff);
    }
    let rel_err = if max_ref > 0.0 {
        max_abs / max_ref
    } else {
        max_abs
    };
    CheckResult {
        kernel,
        max_abs_err: max_abs,
        rel_err,
        passed: got.len() == want.len() && rel_err < FP16_REL_TOLERANCE,
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn upload<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream
        .clone_htod(host)
        .map_err(driver_err("copying check inputs to the GPU"))
}

#[cfg(feature = "cuda")]
pub(crate) fn download<T: DeviceRepr>(gpu: &Gpu, view: &CudaView<'_, T>) -> Result<Vec<T>> {
    gpu.stream
        .clone_dtoh(view)
        .map_err(driver_err("copying check results from the GPU"))
}

/// `host` uploaded after `offset` filler elements: `slice(offset..)` of the result is a view
/// `offset` elements past an allocation's start (offset 1: misaligned for 16-byte accesses).
#[cfg(feature = "cuda")]
pub(crate) fn upload_at<T: DeviceRepr + Copy>(
    gpu: &Gpu,
    host: &[T],
    offset: usize,
) -> Result<CudaSlice<T>> {
    let mut padded = Vec::with_capacity(offset + host.len());
    if let Some(&first) = host.first() {
        padded.resize(offset, first);
    }
    padded.extend_from_slice(host);
    upload(gpu, &padded)
}

/// One case of the layer checks: a realistic shape (vectorised path) or an odd one at an
/// unaligned offset (scalar path).
#[cfg(feature = "cuda")]
struct LayerCase {
    tokens: usize,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    rope: RopeShape,
    offset: usize,
    label: &'static str,
}

/// Runs every kernel of this module on fresh random inputs (outputs poisoned with NaN first)
/// and compares with the CPU references: realistic Llama-7B sizes (T = 300, H = 4096,
/// I = 11008, vocab 32000, 32 + 8 heads of 128) through the 16-byte path, then odd sizes at a
/// misaligned offset through the scalar path.
#[cfg(feature = "cuda")]
pub fn check_on_gpu(gpu: &Gpu) -> Result<Vec<CheckResult>> {
    let cases = [
        LayerCase {
            tokens: 300,
            hidden: 4096,
            intermediate: 11008,
            vocab: 32000,
            rope: RopeShape {
                tokens: 300,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 128,
                theta: 10_000.0,
            },
            offset: 0,
            label: "T=300, H=4096",
        },
        LayerCase {
            tokens: 37,
            hidden: 1003,
            intermediate: 2731,
            vocab: 517,
            rope: RopeShape {
                tokens: 37,
                num_heads: 5,
                num_kv_heads: 3,
                head_dim: 66,
                theta: 500_000.0,
            },
            offset: 1,
            label: "T=37, H=1003, unaligned",
        },
    ];
    let mut rng = TestRng::new(0x0051_0a1a_7e25);
    let mut results = Vec::new();
    for case in &cases {
        check_case(gpu, case, &mut rng, &mut results)?;
    }
    Ok(results)
}

#[cfg(feature = "cuda")]
fn check_case(
    gpu: &Gpu,
    case: &LayerCase,
    rng: &mut TestRng,
    results: &mut Vec<CheckResult>,
) -> Result<()> {
    let (t, h, off) = (case.tokens, case.hidden, case.offset);
    let name = |kernel: &str| format!("{kernel} [{}]", case.label);
    let poison = |n: usize| vec![f16::NAN; n];
    let eps = 1e-5f32;

    // embedding, with two out-of-range ids (-1 and vocab) among valid ones.
    {
        let mut ids: Vec<i32> = (0..t).map(|_| rng.below(case.vocab) as i32).collect();
        ids[t / 3] = -1;
        ids[2 * t / 3] = case.vocab as i32;
        let table = rng.f16s(case.vocab * h, -1.0, 1.0);
        let (want, want_bad) = embedding_ref(&ids, &table, case.vocab, h);
        let d_ids = upload(gpu, &ids)?;
        let d_table = upload_at(gpu, &table, off)?;
        let mut d_out = upload_at(gpu, &poison(t * h), off)?;
        let mut d_bad = upload(gpu, &[0i32])?;
        embedding(
            gpu,
            &d_ids.as_view(),
            &d_table.slice(off..),
            &mut d_out.slice_mut(off..),
            &mut d_bad.as_view_mut(),
            t,
            h,
            case.vocab,
        )?;
        let got = download(gpu, &d_out.slice(off..))?;
        let bad = download(gpu, &d_bad.as_view())?;
        let mut r = compare_f16(name("embedding"), &got, &want);
        r.passed &= bad[0] as usize == want_bad;
        results.push(r);
    }

    // rms_norm
    let weight = rng.f16s(h, 0.2, 1.8);
    let d_weight = upload_at(gpu, &weight, off)?;
    {
        let x = rng.f16s(t * h, -3.0, 3.0);
        let want = rms_norm_ref(&x, &weight, h, eps);
        let d_x = upload_at(gpu, &x, off)?;
        let mut d_out = upload_at(gpu, &poison(t * h), off)?;
        rms_norm(
            gpu,
            &d_x.slice(off..),
            &d_weight.slice(off..),
            &mut d_out.slice_mut(off..),
            t,
            h,
            eps,
        )?;
        let got = download(gpu, &d_out.slice(off..))?;
        results.push(compare_f16(name("rms_norm"), &got, &want));
    }

    // add_rms_norm: both the updated residual and the normalised output.
    {
        let mut residual = rng.f16s(t * h, -4.0, 4.0);
        let x = rng.f16s(t * h, -2.0, 2.0);
        let mut d_residual = upload_at(gpu, &residual, off)?;
        let want = add_rms_norm_ref(&mut residual, &x, &weight, h, eps);
        let d_x = upload_at(gpu, &x, off)?;
        let mut d_out = upload_at(gpu, &poison(t * h), off)?;
        add_rms_norm(
            gpu,
            &mut d_residual.slice_mut(off..),
            &d_x.slice(off..),
            &d_weight.slice(off..),
            &mut d_out.slice_mut(off..),
            t,
            h,
            eps,
            None,
        )?;
        let got_residual = download(gpu, &d_residual.slice(off..))?;
        let got = download(gpu, &d_out.slice(off..))?;
        results.push(compare_f16(
            name("add_rms_norm (residual)"),
            &got_residual,
            &residual,
        ));
        results.push(compare_f16(name("add_rms_norm (out)"), &got, &want));

        // With a delta on the rows from `first_row` on (a step's decode rows).
        let first_row = t / 2;
        let delta: Vec<f32> = rng
            .f16s((t - first_row) * h, -1.0, 1.0)
            .iter()
            .map(|x| x.to_f32() * 1.000_3)
            .collect();
        let mut residual = rng.f16s(t * h, -4.0, 4.0);
        let mut d_residual = upload_at(gpu, &residual, off)?;
        let want = add_rms_norm_delta_ref(&mut residual, &x, &weight, h, eps, first_row, &delta);
        let d_delta = upload_at(gpu, &delta, off)?;
        let mut d_out = upload_at(gpu, &poison(t * h), off)?;
        add_rms_norm(
            gpu,
            &mut d_residual.slice_mut(off..),
            &d_x.slice(off..),
            &d_weight.slice(off..),
            &mut d_out.slice_mut(off..),
            t,
            h,
            eps,
            Some(&RowDelta {
                first_row,
                delta: d_delta.slice(off..),
            }),
        )?;
        let got_residual = download(gpu, &d_residual.slice(off..))?;
        let got = download(gpu, &d_out.slice(off..))?;
        results.push(compare_f16(
            name("add_rms_norm + delta (residual)"),
            &got_residual,
            &residual,
        ));
        results.push(compare_f16(name("add_rms_norm + delta (out)"), &got, &want));
    }

    // rope: positions up to 8192, q and k in place.
    {
        let s = &case.rope;
        let mut q = rng.f16s(s.tokens * s.num_heads * s.head_dim, -3.0, 3.0);
        let mut k = rng.f16s(s.tokens * s.num_kv_heads * s.head_dim, -3.0, 3.0);
        let positions: Vec<i32> = (0..s.tokens).map(|_| rng.below(8192) as i32).collect();
        let mut d_q = upload_at(gpu, &q, off)?;
        let mut d_k = upload_at(gpu, &k, off)?;
        let d_pos = upload(gpu, &positions)?;
        rope_ref(&mut q, &mut k, &positions, s);
        rope(
            gpu,
            &mut d_q.slice_mut(off..),
            &mut d_k.slice_mut(off..),
            &d_pos.as_view(),
            s,
        )?;
        let got_q = download(gpu, &d_q.slice(off..))?;
        let got_k = download(gpu, &d_k.slice(off..))?;
        results.push(compare_f16(name("rope (q)"), &got_q, &q));
        results.push(compare_f16(name("rope (k)"), &got_k, &k));
    }

    // split_qkv: the rope case's head counts give q and kv widths.
    {
        let (qw, kvw) = (
            case.rope.num_heads * case.rope.head_dim,
            case.rope.num_kv_heads * case.rope.head_dim,
        );
        let qkv = rng.f16s(t * (qw + 2 * kvw), -4.0, 4.0);
        let (want_q, want_k, want_v) = split_qkv_ref(&qkv, qw, kvw);
        let d_qkv = upload_at(gpu, &qkv, off)?;
        let mut d_q = upload_at(gpu, &poison(t * qw), off)?;
        let mut d_k = upload_at(gpu, &poison(t * kvw), off)?;
        let mut d_v = upload_at(gpu, &poison(t * kvw), off)?;
        split_qkv(
            gpu,
            &d_qkv.slice(off..),
            [
                &mut d_q.slice_mut(off..),
                &mut d_k.slice_mut(off..),
                &mut d_v.slice_mut(off..),
            ],
            t,
            qw,
            kvw,
            None,
        )?;
        for (what, d, want) in [
            ("q", &d_q, &want_q),
            ("k", &d_k, &want_k),
            ("v", &d_v, &want_v),
        ] {
            let got = download(gpu, &d.slice(off..))?;
            results.push(compare_f16(
                name(&format!("split_qkv ({what})")),
                &got,
                want,
            ));
        }

        // With the decode rows' LoRA deltas added to the rows from `first_row` on (the rows
        // before it, a step's prefill rows, must come out as plain copies).
        let first_row = t / 2;
        let rows = t - first_row;
        let f32s = |v: Vec<f16>| -> Vec<f32> {
            // Not fp16 values: the deltas are unrounded f32.
            v.iter().map(|x| x.to_f32() * 1.000_3).collect()
        };
        let (dq, dk, dv) = (
            f32s(rng.f16s(rows * qw, -1.0, 1.0)),
            f32s(rng.f16s(rows * kvw, -1.0, 1.0)),
            f32s(rng.f16s(rows * kvw, -1.0, 1.0)),
        );
        let (want_q, want_k, want_v) = split_qkv_add_ref(&qkv, qw, kvw, first_row, [&dq, &dk, &dv]);
        let (d_dq, d_dk, d_dv) = (
            upload_at(gpu, &dq, off)?,
            upload_at(gpu, &dk, off)?,
            upload_at(gpu, &dv, off)?,
        );
        let mut d_q = upload_at(gpu, &poison(t * qw), off)?;
        let mut d_k = upload_at(gpu, &poison(t * kvw), off)?;
        let mut d_v = upload_at(gpu, &poison(t * kvw), off)?;
        let delta = QkvDelta {
            first_row,
            dq: d_dq.slice(off..),
            dk: d_dk.slice(off..),
            dv: d_dv.slice(off..),
        };
        split_qkv(
            gpu,
            &d_qkv.slice(off..),
            [
                &mut d_q.slice_mut(off..),
                &mut d_k.slice_mut(off..),
                &mut d_v.slice_mut(off..),
            ],
            t,
            qw,
            kvw,
            Some(&delta),
        )?;
        for (what, d, want) in [
            ("q", &d_q, &want_q),
            ("k", &d_k, &want_k),
            ("v", &d_v, &want_v),
        ] {
            let got = download(gpu, &d.slice(off..))?;
            results.push(compare_f16(
                name(&format!("split_qkv + LoRA deltas ({what})")),
                &got,
                want,
            ));
        }
    }

    // silu_mul
    {
        let i = case.intermediate;
        let gate_up = rng.f16s(t * 2 * i, -6.0, 6.0);
        let want = silu_mul_ref(&gate_up, i);
        let d_gate_up = upload_at(gpu, &gate_up, off)?;
        let mut d_out = upload_at(gpu, &poison(t * i), off)?;
        silu_mul(
            gpu,
            &d_gate_up.slice(off..),
            &mut d_out.slice_mut(off..),
            t,
            i,
        )?;
        let got = download(gpu, &d_out.slice(off..))?;
        results.push(compare_f16(name("silu_mul"), &got, &want));
    }

    // add
    {
        let mut x = rng.f16s(t * h, -4.0, 4.0);
        let y = rng.f16s(t * h, -4.0, 4.0);
        let mut d_x = upload_at(gpu, &x, off)?;
        let d_y = upload_at(gpu, &y, off)?;
        add_ref(&mut x, &y);
        add(gpu, &mut d_x.slice_mut(off..), &d_y.slice(off..), t * h)?;
        let got = download(gpu, &d_x.slice(off..))?;
        results.push(compare_f16(name("add"), &got, &x));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a GPU:
    /// `cargo test -p slora-kernels --features cuda -- --ignored layers_match_cpu_reference_on_gpu`
    #[cfg(feature = "cuda")]
    #[test]
    fn layers_match_cpu_reference_on_gpu() {
        let Some(gpu) = crate::gpu::gpu_for_test("layers_match_cpu_reference_on_gpu") else {
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

    fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
        (got - want).abs() <= rel * want.abs() + abs
    }

    #[test]
    fn row_threads_cover_the_row_in_whole_warps() {
        assert_eq!(row_threads(4096), 512);
        assert_eq!(row_threads(8192), 1024);
        assert_eq!(row_threads(16384), 1024);
        assert_eq!(row_threads(1), 32);
        assert_eq!(row_threads(1003), 128);
        for h in 1..5000 {
            assert_eq!(row_threads(h) % 32, 0);
        }
    }

    #[test]
    fn norm_plans_launch_one_block_per_token() {
        let plan = rms_norm_plan(300, 4096, 1e-5, 300 * 4096, 4096, 300 * 4096).unwrap();
        assert_eq!(plan.launch.grid, (300, 1, 1));
        assert_eq!(plan.launch.block, 512);
        assert_eq!(plan.hidden, 4096);
        let plan = add_rms_norm_plan(7, 5120, 1e-6, 7 * 5120, 7 * 5120, 5120, 7 * 5120, None)
            .unwrap()
            .rows;
        assert_eq!(plan.launch.grid, (7, 1, 1));
        assert_eq!(plan.launch.block, 640);
        // Zero tokens: a valid, empty launch.
        assert!(rms_norm_plan(0, 4096, 1e-5, 0, 4096, 0)
            .unwrap()
            .launch
            .is_empty());
    }

    #[test]
    fn norm_plans_reject_bad_shapes() {
        let e = |r: Result<RowPlan>| r.unwrap_err().to_string();
        assert!(e(rms_norm_plan(2, 8, 1e-5, 15, 8, 16)).contains("`x` has 15"));
        assert!(e(rms_norm_plan(2, 8, 1e-5, 16, 7, 16)).contains("`weight`"));
        assert!(e(rms_norm_plan(2, 8, 1e-5, 16, 8, 15)).contains("`out`"));
        assert!(e(rms_norm_plan(2, 0, 1e-5, 16, 8, 16)).contains("hidden must be positive"));
        assert!(e(rms_norm_plan(2, 8, f32::NAN, 16, 8, 16)).contains("eps"));
        assert!(e(rms_norm_plan(
            1 << 20,
            4096,
            1e-5,
            usize::MAX,
            4096,
            usize::MAX
        ))
        .contains("32-bit"));
        let e_add = |r: Result<AddRmsNormPlan>| r.unwrap_err().to_string();
        assert!(e_add(add_rms_norm_plan(2, 8, 1e-5, 15, 16, 8, 16, None)).contains("`residual`"));
        assert!(e_add(add_rms_norm_plan(2, 8, 1e-5, 16, 15, 8, 16, None)).contains("`x`"));
        assert!(
            e_add(add_rms_norm_plan(2, 8, 1e-5, 16, 16, 8, 16, Some((1, 7)))).contains("`delta`")
        );
        assert!(
            e_add(add_rms_norm_plan(2, 8, 1e-5, 16, 16, 8, 16, Some((3, 0))))
                .contains("past the 2 rows")
        );
        let p = add_rms_norm_plan(2, 8, 1e-5, 16, 16, 8, 16, Some((1, 8))).unwrap();
        assert_eq!(p.delta_row0, 1);
    }

    #[test]
    fn chunked_plans_split_rows_into_2048_element_blocks() {
        let plan = silu_mul_plan(300, 11008, 300 * 2 * 11008, 300 * 11008).unwrap();
        assert_eq!(plan.launch.grid, (300, 6, 1));
        assert_eq!(plan.launch.block, CHUNK_THREADS);
        assert_eq!(plan.n, 11008);
        let plan = embedding_plan(3, 4096, 32000, 3, 32000 * 4096, 3 * 4096, 1).unwrap();
        assert_eq!(plan.launch.grid, (3, 2, 1));
        assert_eq!((plan.hidden, plan.vocab), (4096, 32000));
        let plan = add_plan(4097, 4097, 4097).unwrap();
        assert_eq!(plan.launch.grid, (3, 1, 1));
        assert!(add_plan(0, 0, 0).unwrap().launch.is_empty());
        // A table larger than i32 elements is fine (64-bit row offsets); ids and out are not.
        assert!(embedding_plan(1, 8192, 300_000, 1, 8192 * 300_000, 8192, 1).is_ok());
    }

    #[test]
    fn chunked_plans_reject_bad_shapes() {
        let e = |r: Result<ElementwisePlan>| r.unwrap_err().to_string();
        assert!(e(silu_mul_plan(2, 8, 31, 16)).contains("`gate_up`"));
        let p = split_qkv_plan(
            3,
            4096,
            1024,
            [3 * 6144, 3 * 4096, 3 * 1024, 3 * 1024],
            None,
        )
        .unwrap();
        assert_eq!(p.launch.grid, (3, 3, 1));
        assert_eq!(p.delta_row0, 3, "no deltas: no row gets one");
        let p = split_qkv_plan(
            3,
            4096,
            1024,
            [3 * 6144, 3 * 4096, 3 * 1024, 3 * 1024],
            Some((1, [2 * 4096, 2 * 1024, 2 * 1024])),
        )
        .unwrap();
        assert_eq!(p.delta_row0, 1);
        let e_split = |r: Result<SplitQkvPlan>| r.unwrap_err().to_string();
        assert!(e_split(split_qkv_plan(
            3,
            4096,
            1024,
            [3 * 6144, 3 * 4096, 3 * 1023, 3 * 1024],
            None
        ))
        .contains("`k`"));
        assert!(e_split(split_qkv_plan(3, 0, 1024, [0, 0, 0, 0], None)).contains("positive"));
        // Deltas of the decode rows: each sized to the rows from its first on, which must
        // exist.
        let lens = [3 * 6144, 3 * 4096, 3 * 1024, 3 * 1024];
        assert!(e_split(split_qkv_plan(
            3,
            4096,
            1024,
            lens,
            Some((1, [2 * 4096, 1024, 2 * 1024]))
        ))
        .contains("`dk`"));
        assert!(
            e_split(split_qkv_plan(3, 4096, 1024, lens, Some((4, [0, 0, 0]))))
                .contains("past the 3 rows")
        );
        assert!(e(silu_mul_plan(2, 8, 32, 15)).contains("`out`"));
        assert!(e(silu_mul_plan(2, 0, 32, 16)).contains("positive"));
        assert!(e(silu_mul_plan(1 << 16, 1 << 15, usize::MAX, usize::MAX)).contains("32-bit"));
        assert!(e(add_plan(10, 9, 10)).contains("`x`"));
        assert!(e(add_plan(10, 10, 9)).contains("`y`"));
        assert!(e(add_plan(1 << 31, usize::MAX, usize::MAX)).contains("32-bit"));
        let e = |r: Result<EmbeddingPlan>| r.unwrap_err().to_string();
        assert!(e(embedding_plan(3, 8, 10, 2, 80, 24, 1)).contains("`ids`"));
        assert!(e(embedding_plan(3, 8, 10, 3, 79, 24, 1)).contains("`table`"));
        assert!(e(embedding_plan(3, 8, 10, 3, 80, 23, 1)).contains("`out`"));
        assert!(e(embedding_plan(3, 8, 10, 3, 80, 24, 0)).contains("`bad_ids`"));
        assert!(e(embedding_plan(3, 8, 0, 3, 80, 24, 1)).contains("vocab"));
    }

    #[test]
    fn rope_plan_checks_heads_and_buffers() {
        let s = RopeShape {
            tokens: 300,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            theta: 10_000.0,
        };
        let plan = rope_plan(&s, 300 * 4096, 300 * 1024, 300).unwrap();
        assert_eq!(plan.launch.grid, (300, 1, 1));
        assert_eq!(plan.launch.block, 512);
        assert_eq!(
            (plan.num_heads, plan.num_kv_heads, plan.head_dim),
            (32, 8, 128)
        );
        let small = RopeShape {
            num_heads: 1,
            num_kv_heads: 0,
            head_dim: 2,
            ..s
        };
        assert_eq!(rope_plan(&small, 300 * 2, 0, 300).unwrap().launch.block, 32);
        let e = |s: RopeShape, q, k, p| rope_plan(&s, q, k, p).unwrap_err().to_string();
        assert!(e(s, 300 * 4096 - 1, 300 * 1024, 300).contains("`q`"));
        assert!(e(s, 300 * 4096, 300 * 1024 - 1, 300).contains("`k`"));
        assert!(e(s, 300 * 4096, 300 * 1024, 299).contains("`positions`"));
        assert!(e(
            RopeShape { head_dim: 127, ..s },
            usize::MAX,
            usize::MAX,
            300
        )
        .contains("even"));
        assert!(e(RopeShape { theta: 0.0, ..s }, usize::MAX, usize::MAX, 300).contains("theta"));
        assert!(e(
            RopeShape {
                tokens: 1 << 20,
                ..s
            },
            usize::MAX,
            usize::MAX,
            usize::MAX
        )
        .contains("32-bit"));
    }

    #[test]
    fn embedding_ref_copies_rows_and_zeroes_bad_ids() {
        let mut rng = TestRng::new(1);
        let (vocab, hidden) = (50, 12);
        let table = rng.f16s(vocab * hidden, -1.0, 1.0);
        let ids = [3, 49, -1, 0, 50, 17];
        let (out, bad) = embedding_ref(&ids, &table, vocab, hidden);
        assert_eq!(bad, 2);
        for (t, &id) in ids.iter().enumerate() {
            for j in 0..hidden {
                let want = if (0..vocab as i32).contains(&id) {
                    table[id as usize * hidden + j]
                } else {
                    f16::ZERO
                };
                assert_eq!(out[t * hidden + j].to_bits(), want.to_bits());
            }
        }
    }

    /// The reference against the textbook formula in f64 with no intermediate rounding: they
    /// differ by the two fp16 roundings (each at most 2^-11 relative).
    #[test]
    fn rms_norm_ref_matches_the_formula() {
        let mut rng = TestRng::new(2);
        let (tokens, hidden, eps) = (5, 4096, 1e-5f32);
        let x = rng.f16s(tokens * hidden, -3.0, 3.0);
        let w = rng.f16s(hidden, -1.5, 1.5);
        let out = rms_norm_ref(&x, &w, hidden, eps);
        for t in 0..tokens {
            let row = &x[t * hidden..(t + 1) * hidden];
            let ms = row.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / hidden as f64;
            let scale = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..hidden {
                let want = row[j].to_f64() * scale * w[j].to_f64();
                let got = out[t * hidden + j].to_f64();
                assert!(
                    close(got, want, 1.5e-3, 1e-6),
                    "t {t} j {j}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn add_rms_norm_delta_ref_adds_the_delta_to_x_from_the_first_row_on() {
        let mut rng = TestRng::new(4);
        let (tokens, hidden, eps, first_row) = (4, 64, 1e-6f32, 1);
        let residual0 = rng.f16s(tokens * hidden, -4.0, 4.0);
        let x = rng.f16s(tokens * hidden, -2.0, 2.0);
        let w = rng.f16s(hidden, 0.5, 1.5);
        let delta: Vec<f32> = rng
            .f16s((tokens - first_row) * hidden, -1.0, 1.0)
            .iter()
            .map(|x| x.to_f32() * 1.000_3)
            .collect();
        let mut with = residual0.clone();
        let out = add_rms_norm_delta_ref(&mut with, &x, &w, hidden, eps, first_row, &delta);
        // The same as adding `x + delta` (rounded once) without a delta.
        let mut x_plus = x.clone();
        for (a, d) in x_plus[first_row * hidden..].iter_mut().zip(&delta) {
            *a = f16::from_f32(a.to_f32() + d);
        }
        let mut plain = residual0.clone();
        let want = add_rms_norm_ref(&mut plain, &x_plus, &w, hidden, eps);
        assert_eq!(with, plain);
        assert_eq!(out, want);
        // Row 0 is untouched by the delta.
        let mut row0 = residual0[..hidden].to_vec();
        add_rms_norm_ref(&mut row0, &x[..hidden], &w, hidden, eps);
        assert_eq!(&with[..hidden], &row0[..]);
        assert_ne!(&with[hidden..], &residual0[hidden..]);
    }

    #[test]
    fn add_rms_norm_ref_adds_then_normalises() {
        let mut rng = TestRng::new(3);
        let (tokens, hidden, eps) = (4, 1000, 1e-6f32);
        let residual0 = rng.f16s(tokens * hidden, -4.0, 4.0);
        let x = rng.f16s(tokens * hidden, -2.0, 2.0);
        let w = rng.f16s(hidden, 0.5, 1.5);
        let mut residual = residual0.clone();
        let out = add_rms_norm_ref(&mut residual, &x, &w, hidden, eps);
        for i in 0..tokens * hidden {
            let want = residual0[i].to_f64() + x[i].to_f64();
            assert!(close(residual[i].to_f64(), want, 4.9e-4, 1e-7));
        }
        for t in 0..tokens {
            let row = &residual[t * hidden..(t + 1) * hidden];
            let ms = row.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / hidden as f64;
            let scale = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..hidden {
                let want = row[j].to_f64() * scale * w[j].to_f64();
                assert!(close(out[t * hidden + j].to_f64(), want, 1.5e-3, 1e-6));
            }
        }
    }

    /// RoPE against the rotation written in f64: (x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin)
    /// with angle pos · theta^(−2i/d). The reference's error: fp16 cos/sin (2.5e-4 each), the
    /// f32 angle (pos < 4096: ~2.4e-4) and three fp16 roundings.
    #[test]
    fn rope_ref_rotates_pairs() {
        let mut rng = TestRng::new(4);
        let shape = RopeShape {
            tokens: 6,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            theta: 10_000.0,
        };
        let d = shape.head_dim;
        let q0 = rng.f16s(shape.tokens * shape.num_heads * d, -3.0, 3.0);
        let k0 = rng.f16s(shape.tokens * shape.num_kv_heads * d, -3.0, 3.0);
        let positions: Vec<i32> = (0..shape.tokens).map(|_| rng.below(4096) as i32).collect();
        let (mut q, mut k) = (q0.clone(), k0.clone());
        rope_ref(&mut q, &mut k, &positions, &shape);
        let check = |before: &[f16], after: &[f16], heads: usize| {
            for (t, &pos) in positions.iter().enumerate() {
                for h in 0..heads {
                    let base = (t * heads + h) * d;
                    for i in 0..d / 2 {
                        let angle =
                            pos as f64 * (shape.theta as f64).powf(-((2 * i) as f64) / d as f64);
                        let (s, c) = angle.sin_cos();
                        let x1 = before[base + i].to_f64();
                        let x2 = before[base + i + d / 2].to_f64();
                        let tol = 4e-3 * (x1.abs() + x2.abs()) + 1e-4;
                        let y1 = after[base + i].to_f64();
                        let y2 = after[base + i + d / 2].to_f64();
                        assert!((y1 - (x1 * c - x2 * s)).abs() <= tol, "t {t} h {h} i {i}");
                        assert!((y2 - (x2 * c + x1 * s)).abs() <= tol, "t {t} h {h} i {i}");
                    }
                }
            }
        };
        check(&q0, &q, shape.num_heads);
        check(&k0, &k, shape.num_kv_heads);
    }

    #[test]
    fn split_qkv_add_ref_adds_the_deltas_from_the_first_row_on() {
        let qkv: Vec<f16> = (0..2 * 8).map(|i| f16::from_f32(i as f32)).collect();
        let (dq, dk, dv) = ([0.5f32, 0.5, 0.5, 0.5], [-1.0f32, 1.0], [2.0f32, 0.25]);
        let (q, k, v) = split_qkv_add_ref(&qkv, 4, 2, 1, [&dq, &dk, &dv]);
        let f = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_eq!(f(&q), [0.0, 1.0, 2.0, 3.0, 8.5, 9.5, 10.5, 11.5]);
        assert_eq!(f(&k), [4.0, 5.0, 11.0, 14.0]);
        assert_eq!(f(&v), [6.0, 7.0, 16.0, 15.25]);
    }

    #[test]
    fn split_qkv_ref_takes_each_rows_column_blocks() {
        let qkv: Vec<f16> = (0..2 * 8).map(|i| f16::from_f32(i as f32)).collect();
        let (q, k, v) = split_qkv_ref(&qkv, 4, 2);
        let f = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_eq!(f(&q), [0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(f(&k), [4.0, 5.0, 12.0, 13.0]);
        assert_eq!(f(&v), [6.0, 7.0, 14.0, 15.0]);
    }

    #[test]
    fn silu_mul_ref_matches_the_formula() {
        let mut rng = TestRng::new(5);
        let (tokens, inter) = (3, 700);
        let gate_up = rng.f16s(tokens * 2 * inter, -8.0, 8.0);
        let out = silu_mul_ref(&gate_up, inter);
        assert_eq!(out.len(), tokens * inter);
        for t in 0..tokens {
            for j in 0..inter {
                let g = gate_up[t * 2 * inter + j].to_f64();
                let u = gate_up[t * 2 * inter + inter + j].to_f64();
                let want = g / (1.0 + (-g).exp()) * u;
                assert!(close(out[t * inter + j].to_f64(), want, 1.5e-3, 1e-6));
            }
        }
    }

    #[test]
    fn add_ref_rounds_the_sum_to_fp16() {
        let mut rng = TestRng::new(6);
        let x0 = rng.f16s(999, -4.0, 4.0);
        let y = rng.f16s(999, -4.0, 4.0);
        let mut x = x0.clone();
        add_ref(&mut x, &y);
        for i in 0..x.len() {
            let want = x0[i].to_f64() + y[i].to_f64();
            assert!(close(x[i].to_f64(), want, 4.9e-4, 1e-7));
        }
    }

    #[test]
    fn compare_f16_flags_poison_and_large_errors() {
        let want = vec![f16::from_f32(1.0), f16::from_f32(-2.0)];
        let same = compare_f16("k".into(), &want, &want);
        assert!(same.passed && same.max_abs_err == 0.0);
        let poisoned = compare_f16("k".into(), &[f16::NAN, f16::from_f32(-2.0)], &want);
        assert!(!poisoned.passed);
        let off = compare_f16(
            "k".into(),
            &[f16::from_f32(1.1), f16::from_f32(-2.0)],
            &want,
        );
        assert!(!off.passed);
        let near = compare_f16(
            "k".into(),
            &[f16::from_f32(1.001), f16::from_f32(-2.0)],
            &want,
        );
        assert!(near.passed);
    }
}
