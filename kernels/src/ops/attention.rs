//! Attention over the unified pool's non-contiguous pages (Llama; MHA and GQA).
//!
//! Three kernels, each with a pure launch plan (validates shapes and host tables, computes the
//! grid) and a CPU reference (f64 arithmetic on a host image of the pool):
//!
//! - [`kv_store`]: copies the K and V rows of new tokens into their pages.
//! - [`decode_attention`]: one query token per request, variable context lengths. Split-K:
//!   each block handles [`DECODE_PARTITION`] context rows of one (request, KV head) and serves
//!   every query head of the GQA group from the rows it reads, so each KV row is read from
//!   memory once per (request, KV head). Requests longer than one partition are combined by a
//!   second kernel (`decode_attention_reduce`, flash-decoding style).
//! - [`prefill_attention`]: causal attention of the prefill tokens of a step, one segment per
//!   request chunk (chunked prefill: a chunk may start after `context_start` rows already in
//!   the pool). Flash-attention style: a block keeps 64 queries of one head in shared memory
//!   and streams the KV rows through shared-memory tiles of 32 with an online softmax.
//!
//! Layout (kernels/README.md): the kernels take one layer's `[2, pages, W]` region of the pool
//! (see [`layer_kv_range`]): K side first, V side `pages * W` elements later; the KV row of a
//! token at page `p` is `W = num_kv_heads * head_dim` elements at `p * W`, element
//! `kv_head * head_dim + i`. Query head `h` reads KV head `h / (num_heads / num_kv_heads)`.
//! `q` and `o` are `[rows, num_heads * head_dim]`. Softmax scale `1 / sqrt(head_dim)`.
//!
//! Invariants the plans establish (so the kernels need no bounds checks): head_dim is 64 or
//! 128; every page in a table is in `0..pages`; every table slice lies inside `kv_pages`;
//! every `int` index of the kernels fits `i32` (page offsets are computed in 64 bits, since
//! one side of a large pool can exceed 2^31 elements); grid dimensions are within CUDA's
//! limits. Plans cost O(table length) on the host.

use crate::error::{Error, Result};
use crate::sources::KernelSource;

/// The CUDA C of the attention kernels.
pub const SOURCE: KernelSource = KernelSource {
    name: "attention.cu",
    code: include_str!("../../cuda/attention.cu"),
};

/// Head dims with a compiled kernel (`*_d64`, `*_d128`).
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];
/// Threads per block of `kv_store` (one thread per 16-byte chunk of a row).
pub const KV_STORE_THREADS: u32 = 256;
/// Threads per block of `decode_attention_*`.
pub const DECODE_THREADS: u32 = 128;
/// Context rows per decode block. Requests longer than this are split over several blocks
/// and combined by `decode_attention_reduce`; shorter ones finish in one block.
pub const DECODE_PARTITION: usize = 256;
/// Query heads whose partial sums a decode thread keeps in registers at once; larger GQA
/// groups are served in passes (re-reading K/V, mostly from L2).
pub const DECODE_HEADS_PER_PASS: usize = 8;
/// Threads per block of `prefill_attention_*`.
pub const PREFILL_THREADS: u32 = 128;
/// Query rows per prefill block.
pub const PREFILL_QUERY_TILE: usize = 64;
/// KV rows per shared-memory tile of the prefill kernel.
pub const PREFILL_KEY_TILE: usize = 32;
/// The most dynamic shared memory a plan asks for: the smallest opt-in limit of the GPUs we
/// run on (sm_86/sm_89 allow 99 KB per block; sm_80 163 KB, sm_90 227 KB).
pub const MAX_SHARED_MEM_BYTES: usize = 99 * 1024;
/// Above this a kernel must opt in to more dynamic shared memory (a function attribute).
pub const DEFAULT_SHARED_MEM_BYTES: usize = 48 * 1024;

const DECODE_WARPS: usize = DECODE_THREADS as usize / 32;
const MAX_GRID_YZ: usize = 65_535;
const I32_MAX: usize = i32::MAX as usize;

const KV_STORE: &str = "kv_store";
const DECODE: &str = "decode_attention";
const PREFILL: &str = "prefill_attention";

fn launch_error(kernel: &'static str, reason: impl Into<String>) -> Error {
    Error::Launch {
        kernel,
        reason: reason.into(),
    }
}

/// `a * b * ...` as usize, or an error naming `what` when it overflows.
fn product(kernel: &'static str, what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| {
            launch_error(
                kernel,
                format!("{what} ({factors:?} multiplied) overflows usize"),
            )
        })
}

/// Fails when `value` (a count of elements, rows...) does not fit an `i32` kernel index.
fn fits_i32(kernel: &'static str, what: &str, value: usize) -> Result<()> {
    if value > I32_MAX {
        return Err(launch_error(
            kernel,
            format!(
                "{what} = {value} exceeds i32::MAX ({I32_MAX}); the kernel indexes it with `int`"
            ),
        ));
    }
    Ok(())
}

/// Every entry of a page table names a page of the pool.
fn pages_in_pool(kernel: &'static str, what: &str, table: &[i32], pool_pages: usize) -> Result<()> {
    match table
        .iter()
        .position(|&p| p < 0 || p as usize >= pool_pages)
    {
        Some(i) => Err(launch_error(
            kernel,
            format!(
                "{what}[{i}] = {} is not a page of the pool (0..{pool_pages})",
                table[i]
            ),
        )),
        None => Ok(()),
    }
}

/// A non-negative table entry as usize.
fn non_negative(kernel: &'static str, what: &str, index: usize, value: i32) -> Result<usize> {
    usize::try_from(value)
        .map_err(|_| launch_error(kernel, format!("{what}[{index}] = {value} is negative")))
}

/// Grid and block of one launch, and its dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchDims {
    /// A grid with no block (nothing to do): the launch wrappers skip it.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }
}

/// The attention shape of a model (kernels/README.md: `nh`, `nkv`, `d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> AttentionShape {
        AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    /// Query heads per KV head (1 for MHA).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of a `q`/`o` row: `num_heads * head_dim`.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of a KV row, the pool's page width `W = num_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `1 / sqrt(head_dim)`.
    pub fn softmax_scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The kernels' softmax runs in base 2: scores times `log2(e) / sqrt(head_dim)`.
    pub fn softmax_scale_log2(&self) -> f32 {
        (std::f64::consts::LOG2_E * self.softmax_scale()) as f32
    }

    fn validate(&self, kernel: &'static str) -> Result<()> {
        if self.num_heads == 0 || self.num_kv_heads == 0 {
            return Err(launch_error(
                kernel,
                format!(
                    "num_heads = {} and num_kv_heads = {} must both be positive",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(launch_error(
                kernel,
                format!(
                    "num_heads = {} is not a multiple of num_kv_heads = {}",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(launch_error(
                kernel,
                format!(
                    "head_dim = {} is not supported; the kernels are compiled for head_dim {:?}",
                    self.head_dim, SUPPORTED_HEAD_DIMS
                ),
            ));
        }
        fits_i32(
            kernel,
            "num_heads * head_dim",
            product(kernel, "q row width", &[self.num_heads, self.head_dim])?,
        )
    }
}

/// The pool's page count as the kernels' `int pages`, and the layer region's size.
fn check_pool(kernel: &'static str, shape: &AttentionShape, pool_pages: usize) -> Result<()> {
    if pool_pages == 0 {
        return Err(launch_error(kernel, "the pool has no pages"));
    }
    fits_i32(kernel, "pool pages", pool_pages)?;
    product(
        kernel,
        "layer KV elements",
        &[2, pool_pages, shape.kv_width()],
    )
    .map(|_| ())
}

/// Elements of layer `layer`'s `[2, pool_pages, kv_width]` region within the whole pool
/// (`layers * 2 * pool_pages * kv_width` elements): the `layer_kv` every kernel here takes.
pub fn layer_kv_range(layer: usize, pool_pages: usize, kv_width: usize) -> std::ops::Range<usize> {
    let side = pool_pages * kv_width;
    2 * layer * side..2 * (layer + 1) * side
}

fn check_len(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(launch_error(
            kernel,
            format!("{what} has {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// kv_store

/// Launch plan of `kv_store`: `tokens` rows of K and V (`[tokens, W]`) to pages `slot_pages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvStorePlan {
    pub shape: AttentionShape,
    pub pool_pages: usize,
    pub tokens: usize,
    pub launch: LaunchDims,
}

/// Plans `kv_store`. Checks the shape, that every slot page is in the pool and that no two
/// tokens share a page (their writes would race), and that `tokens * W` fits `i32`.
pub fn plan_kv_store(
    shape: AttentionShape,
    pool_pages: usize,
    slot_pages: &[i32],
) -> Result<KvStorePlan> {
    shape.validate(KV_STORE)?;
    check_pool(KV_STORE, &shape, pool_pages)?;
    let tokens = slot_pages.len();
    let elems = product(KV_STORE, "tokens * W", &[tokens, shape.kv_width()])?;
    fits_i32(KV_STORE, "tokens * W", elems)?;
    pages_in_pool(KV_STORE, "slot_pages", slot_pages, pool_pages)?;
    let mut sorted = slot_pages.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(launch_error(
            KV_STORE,
            format!(
                "page {} is the slot of two tokens; each new token needs its own page",
                w[0]
            ),
        ));
    }
    let chunks = elems / 8;
    let blocks = chunks.div_ceil(KV_STORE_THREADS as usize);
    Ok(KvStorePlan {
        shape,
        pool_pages,
        tokens,
        launch: LaunchDims {
            grid: (blocks as u32, 1, 1),
            block: (KV_STORE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
    })
}

/// CPU reference of `kv_store` on a host image of one layer (`[2, pool_pages, W]`, any
/// element type: it copies).
pub fn kv_store_cpu<T: Copy>(
    shape: AttentionShape,
    pool_pages: usize,
    layer_kv: &mut [T],
    k: &[T],
    v: &[T],
    slot_pages: &[i32],
) -> Result<()> {
    let plan = plan_kv_store(shape, pool_pages, slot_pages)?;
    let w = shape.kv_width();
    check_len(KV_STORE, "layer_kv", layer_kv.len(), 2 * pool_pages * w)?;
    check_len(KV_STORE, "k", k.len(), plan.tokens * w)?;
    check_len(KV_STORE, "v", v.len(), plan.tokens * w)?;
    let v_side = pool_pages * w;
    for (t, &page) in slot_pages.iter().enumerate() {
        let dst = page as usize * w;
        layer_kv[dst..dst + w].copy_from_slice(&k[t * w..(t + 1) * w]);
        layer_kv[v_side + dst..v_side + dst + w].copy_from_slice(&v[t * w..(t + 1) * w]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decode

/// Host copies of the decode tables (the executor uploads the same slices).
#[derive(Clone, Copy, Debug)]
pub struct DecodeTables<'a> {
    /// Page tables of the step's requests, concatenated; request `b`'s rows `0..ctx_len[b]`
    /// are at `kv_pages[table_offset[b] ..]`, in token order.
    pub kv_pages: &'a [i32],
    pub table_offset: &'a [i32],
    /// KV rows to attend, the current token's (already stored) included; at least 1.
    pub ctx_len: &'a [i32],
}

/// Launch plan of decode attention for `requests` query rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub shape: AttentionShape,
    pub pool_pages: usize,
    pub requests: usize,
    pub kv_pages_len: usize,
    pub max_ctx: usize,
    /// `ceil(max_ctx / DECODE_PARTITION)`: the grid's z.
    pub partitions: usize,
    /// f32 elements of scratch the launch needs (0 when `partitions == 1`): partial outputs
    /// `[requests, num_heads, partitions, head_dim]`, then max and sum `[.., partitions, 2]`.
    pub workspace_elems: usize,
    /// Query heads a thread serves per pass over K and V: the smallest power of two at
    /// least `min(group size, DECODE_HEADS_PER_PASS)`.
    pub heads_per_pass: usize,
    /// `decode_attention_d{64,128}_g{heads_per_pass}`.
    pub kernel: &'static str,
    /// Grid `(num_kv_heads, requests, partitions)`, 128 threads.
    pub attention: LaunchDims,
    /// `decode_attention_reduce`, grid `(num_heads, requests)`, `head_dim` threads; only when
    /// some request spans more than one partition.
    pub reduce: Option<LaunchDims>,
}

const DECODE_KERNELS: [[&str; 4]; 2] = [
    [
        "decode_attention_d64_g1",
        "decode_attention_d64_g2",
        "decode_attention_d64_g4",
        "decode_attention_d64_g8",
    ],
    [
        "decode_attention_d128_g1",
        "decode_attention_d128_g2",
        "decode_attention_d128_g4",
        "decode_attention_d128_g8",
    ],
];

/// The decode kernel of a (validated) shape and its heads per pass: each thread keeps
/// `heads_per_pass * 8` partial sums in registers, so the smallest instance that covers the
/// group (up to 8, then passes) keeps the most blocks resident.
fn decode_kernel(shape: &AttentionShape) -> (&'static str, usize) {
    let heads = shape
        .group_size()
        .min(DECODE_HEADS_PER_PASS)
        .next_power_of_two();
    let column = heads.trailing_zeros() as usize;
    let row = usize::from(shape.head_dim == 128);
    (DECODE_KERNELS[row][column], heads)
}

/// Dynamic shared memory of a decode block, bytes: logits `[g][PARTITION]`, cross-warp sums
/// `[WARPS][min(g, 8)][d]`, max and sum `[g][2]`, all f32.
pub fn decode_shared_mem_bytes(shape: &AttentionShape) -> usize {
    let g = shape.group_size();
    4 * (g * DECODE_PARTITION
        + DECODE_WARPS * g.min(DECODE_HEADS_PER_PASS) * shape.head_dim
        + 2 * g)
}

/// The scratch a decode step of up to `max_requests` requests of up to `max_ctx` rows needs,
/// in f32 elements: allocate once with this and pass it to every [`decode_attention`].
pub fn decode_workspace_elems(
    shape: &AttentionShape,
    max_requests: usize,
    max_ctx: usize,
) -> usize {
    let partitions = max_ctx.div_ceil(DECODE_PARTITION);
    if partitions <= 1 {
        return 0;
    }
    max_requests * shape.num_heads * partitions * (shape.head_dim + 2)
}

/// Plans decode attention. Checks the shape, the tables (equal lengths, `ctx_len >= 1`,
/// `table_offset + ctx_len <= kv_pages.len()`, pages in the pool), the shared memory, the
/// grid limits and every `i32` index (q/o rows, the workspace).
pub fn plan_decode(
    shape: AttentionShape,
    pool_pages: usize,
    tables: &DecodeTables<'_>,
) -> Result<DecodePlan> {
    shape.validate(DECODE)?;
    check_pool(DECODE, &shape, pool_pages)?;
    let requests = tables.ctx_len.len();
    check_len(DECODE, "table_offset", tables.table_offset.len(), requests)?;
    fits_i32(DECODE, "kv_pages length", tables.kv_pages.len())?;
    if requests > MAX_GRID_YZ {
        return Err(launch_error(
            DECODE,
            format!("{requests} requests exceed the grid's y limit ({MAX_GRID_YZ})"),
        ));
    }
    fits_i32(
        DECODE,
        "requests * num_heads * head_dim",
        product(DECODE, "q elements", &[requests, shape.q_width()])?,
    )?;
    let mut max_ctx = 0;
    for b in 0..requests {
        let ctx = non_negative(DECODE, "ctx_len", b, tables.ctx_len[b])?;
        let offset = non_negative(DECODE, "table_offset", b, tables.table_offset[b])?;
        if ctx == 0 {
            return Err(launch_error(
                DECODE,
                format!("ctx_len[{b}] = 0; a decode request attends at least its own token"),
            ));
        }
        if offset + ctx > tables.kv_pages.len() {
            return Err(launch_error(
                DECODE,
                format!(
                    "request {b}: table_offset {offset} + ctx_len {ctx} runs past kv_pages (length {})",
                    tables.kv_pages.len()
                ),
            ));
        }
        max_ctx = max_ctx.max(ctx);
    }
    pages_in_pool(DECODE, "kv_pages", tables.kv_pages, pool_pages)?;
    let partitions = max_ctx.div_ceil(DECODE_PARTITION);
    if partitions > MAX_GRID_YZ {
        return Err(launch_error(
            DECODE,
            format!("{partitions} partitions of {DECODE_PARTITION} rows exceed the grid's z limit ({MAX_GRID_YZ})"),
        ));
    }
    let workspace_elems = if partitions > 1 {
        let elems = product(
            DECODE,
            "workspace elements",
            &[requests, shape.num_heads, partitions, shape.head_dim + 2],
        )?;
        fits_i32(DECODE, "workspace elements", elems)?;
        elems
    } else {
        0
    };
    let shared = decode_shared_mem_bytes(&shape);
    if shared > MAX_SHARED_MEM_BYTES {
        return Err(launch_error(
            DECODE,
            format!(
                "a GQA group of {} query heads needs {shared} bytes of shared memory per block (at most {MAX_SHARED_MEM_BYTES})",
                shape.group_size()
            ),
        ));
    }
    let (kernel, heads_per_pass) = decode_kernel(&shape);
    let reduce = (partitions > 1).then_some(LaunchDims {
        grid: (shape.num_heads as u32, requests as u32, 1),
        block: (shape.head_dim as u32, 1, 1),
        shared_mem_bytes: 0,
    });
    Ok(DecodePlan {
        shape,
        pool_pages,
        requests,
        kv_pages_len: tables.kv_pages.len(),
        max_ctx,
        partitions,
        heads_per_pass,
        workspace_elems,
        kernel,
        attention: LaunchDims {
            grid: (
                shape.num_kv_heads as u32,
                requests as u32,
                partitions as u32,
            ),
            block: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        },
        reduce,
    })
}

/// Softmax attention of one query head over the KV rows at pages `rows` (f64 throughout),
/// written to `out` (`head_dim` values).
fn attend_paged<T: Copy + Into<f64>>(
    shape: &AttentionShape,
    pool_pages: usize,
    layer_kv: &[T],
    q_head: &[T],
    head: usize,
    rows: &[i32],
    out: &mut [f32],
) {
    let (d, w) = (shape.head_dim, shape.kv_width());
    let col = (head / shape.group_size()) * d;
    let v_side = pool_pages * w;
    let scale = shape.softmax_scale();
    let scores: Vec<f64> = rows
        .iter()
        .map(|&p| {
            let k = &layer_kv[p as usize * w + col..][..d];
            q_head
                .iter()
                .zip(k)
                .map(|(&a, &b)| a.into() * b.into())
                .sum::<f64>()
                * scale
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0;
        for (&p, &wt) in rows.iter().zip(&weights) {
            acc += wt * layer_kv[v_side + p as usize * w + col + i].into();
        }
        *o = (acc / total) as f32;
    }
}

/// CPU reference of decode attention: `q` `[requests, num_heads * head_dim]` against the host
/// image of one layer (`[2, pool_pages, W]`); returns `o` in the same layout.
pub fn decode_attention_cpu<T: Copy + Into<f64>>(
    shape: AttentionShape,
    pool_pages: usize,
    layer_kv: &[T],
    q: &[T],
    tables: &DecodeTables<'_>,
) -> Result<Vec<f32>> {
    let plan = plan_decode(shape, pool_pages, tables)?;
    let (d, qw) = (shape.head_dim, shape.q_width());
    check_len(
        DECODE,
        "layer_kv",
        layer_kv.len(),
        2 * pool_pages * shape.kv_width(),
    )?;
    check_len(DECODE, "q", q.len(), plan.requests * qw)?;
    let mut o = vec![0f32; plan.requests * qw];
    for b in 0..plan.requests {
        let offset = tables.table_offset[b] as usize;
        let rows = &tables.kv_pages[offset..offset + tables.ctx_len[b] as usize];
        for h in 0..shape.num_heads {
            let at = b * qw + h * d;
            attend_paged(
                &shape,
                pool_pages,
                layer_kv,
                &q[at..at + d],
                h,
                rows,
                &mut o[at..at + d],
            );
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Prefill

/// Host copies of the prefill tables.
#[derive(Clone, Copy, Debug)]
pub struct PrefillTables<'a> {
    /// Page tables of the step's requests, concatenated; segment `s`'s rows
    /// `0..context_start[s] + chunk_len` are at `kv_pages[table_offset[s] ..]`.
    pub kv_pages: &'a [i32],
    /// `segments + 1` entries, non-decreasing, from 0 to the token count: segment `s` is
    /// tokens `seg_start[s]..seg_start[s + 1]` of `q`/`o`.
    pub seg_start: &'a [i32],
    /// KV rows the request held before this chunk; the chunk's own rows follow them.
    pub context_start: &'a [i32],
    pub table_offset: &'a [i32],
}

/// Launch plan of prefill attention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    pub shape: AttentionShape,
    pub pool_pages: usize,
    pub tokens: usize,
    pub segments: usize,
    pub kv_pages_len: usize,
    /// The longest chunk.
    pub max_chunk: usize,
    /// `ceil(max_chunk / PREFILL_QUERY_TILE)`: the grid's y.
    pub query_tiles: usize,
    /// `prefill_attention_d64` or `prefill_attention_d128`.
    pub kernel: &'static str,
    /// Grid `(num_heads, query_tiles, segments)`, 128 threads, static shared memory only.
    pub launch: LaunchDims,
}

/// Static shared memory of a prefill block, bytes: Q tile, K and V tiles (rows padded by 8
/// halves), and the p tile (f32, rows padded by 1).
pub fn prefill_shared_mem_bytes(head_dim: usize) -> usize {
    let row = 2 * (head_dim + 8);
    PREFILL_QUERY_TILE * row
        + 2 * PREFILL_KEY_TILE * row
        + 4 * PREFILL_QUERY_TILE * (PREFILL_KEY_TILE + 1)
}

/// Plans prefill attention. Checks the shape, the segment table (starts at 0,
/// non-decreasing), the per-segment tables (`table_offset + context_start + chunk_len <=
/// kv_pages.len()`), pages in the pool, grid limits and every `i32` index.
pub fn plan_prefill(
    shape: AttentionShape,
    pool_pages: usize,
    tables: &PrefillTables<'_>,
) -> Result<PrefillPlan> {
    shape.validate(PREFILL)?;
    check_pool(PREFILL, &shape, pool_pages)?;
    let segments = tables.context_start.len();
    check_len(PREFILL, "table_offset", tables.table_offset.len(), segments)?;
    check_len(PREFILL, "seg_start", tables.seg_start.len(), segments + 1)?;
    fits_i32(PREFILL, "kv_pages length", tables.kv_pages.len())?;
    if segments > MAX_GRID_YZ {
        return Err(launch_error(
            PREFILL,
            format!("{segments} segments exceed the grid's z limit ({MAX_GRID_YZ})"),
        ));
    }
    if tables.seg_start[0] != 0 {
        return Err(launch_error(
            PREFILL,
            format!("seg_start[0] = {}, expected 0", tables.seg_start[0]),
        ));
    }
    let mut max_chunk = 0;
    for s in 0..segments {
        let (a, b) = (tables.seg_start[s], tables.seg_start[s + 1]);
        if b < a {
            return Err(launch_error(
                PREFILL,
                format!("seg_start decreases at segment {s}: {a} then {b}"),
            ));
        }
        let chunk = (b - a) as usize;
        let context = non_negative(PREFILL, "context_start", s, tables.context_start[s])?;
        let offset = non_negative(PREFILL, "table_offset", s, tables.table_offset[s])?;
        if offset + context + chunk > tables.kv_pages.len() {
            return Err(launch_error(
                PREFILL,
                format!(
                    "segment {s}: table_offset {offset} + context_start {context} + chunk {chunk} runs past kv_pages (length {})",
                    tables.kv_pages.len()
                ),
            ));
        }
        max_chunk = max_chunk.max(chunk);
    }
    let tokens = tables.seg_start[segments] as usize;
    fits_i32(
        PREFILL,
        "tokens * num_heads * head_dim",
        product(PREFILL, "q elements", &[tokens, shape.q_width()])?,
    )?;
    pages_in_pool(PREFILL, "kv_pages", tables.kv_pages, pool_pages)?;
    let query_tiles = max_chunk.div_ceil(PREFILL_QUERY_TILE);
    if query_tiles > MAX_GRID_YZ {
        return Err(launch_error(
            PREFILL,
            format!("a chunk of {max_chunk} tokens needs {query_tiles} query tiles, over the grid's y limit ({MAX_GRID_YZ})"),
        ));
    }
    let kernel = if shape.head_dim == 64 {
        "prefill_attention_d64"
    } else {
        "prefill_attention_d128"
    };
    Ok(PrefillPlan {
        shape,
        pool_pages,
        tokens,
        segments,
        kv_pages_len: tables.kv_pages.len(),
        max_chunk,
        query_tiles,
        kernel,
        launch: LaunchDims {
            grid: (shape.num_heads as u32, query_tiles as u32, segments as u32),
            block: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
    })
}

/// CPU reference of prefill attention: `q` `[tokens, num_heads * head_dim]`; token `t` of
/// segment `s` sits at position `context_start[s] + (t - seg_start[s])` and attends KV rows
/// `0..=position` of its table. Returns `o` in `q`'s layout.
pub fn prefill_attention_cpu<T: Copy + Into<f64>>(
    shape: AttentionShape,
    pool_pages: usize,
    layer_kv: &[T],
    q: &[T],
    tables: &PrefillTables<'_>,
) -> Result<Vec<f32>> {
    let plan = plan_prefill(shape, pool_pages, tables)?;
    let (d, qw) = (shape.head_dim, shape.q_width());
    check_len(
        PREFILL,
        "layer_kv",
        layer_kv.len(),
        2 * pool_pages * shape.kv_width(),
    )?;
    check_len(PREFILL, "q", q.len(), plan.tokens * qw)?;
    let mut o = vec![0f32; plan.tokens * qw];
    for s in 0..plan.segments {
        let table = &tables.kv_pages[tables.table_offset[s] as usize..];
        let start = tables.seg_start[s] as usize;
        for t in start..tables.seg_start[s + 1] as usize {
            let position = tables.context_start[s] as usize + (t - start);
            let rows = &table[..=position];
            for h in 0..shape.num_heads {
                let at = t * qw + h * d;
                attend_paged(
                    &shape,
                    pool_pages,
                    layer_kv,
                    &q[at..at + d],
                    h,
                    rows,
                    &mut o[at..at + d],
                );
            }
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Deterministic test data (CPU tests and the GPU self-check).

/// SplitMix64: small, deterministic, good enough for test data; no dependency.
#[cfg(any(test, feature = "cuda"))]
struct TestRng(u64);

#[cfg(any(test, feature = "cuda"))]
impl TestRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A random permutation of `0..n` as pages: scattered, non-contiguous page tables.
    fn permutation(&mut self, n: usize) -> Vec<i32> {
        let mut v: Vec<i32> = (0..n as i32).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }

    fn values(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| amplitude * self.uniform()).collect()
    }
}

/// One row of `check_on_gpu` (feature `cuda`).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    pub kernel: String,
    pub max_abs_err: f64,
    /// `||out - ref|| / ||ref||`.
    pub rel_err: f64,
    pub passed: bool,
}

/// fp16 outputs pass when `||out - ref|| / ||ref||` is below this.
pub const CHECK_TOLERANCE: f64 = 1e-2;

// ---------------------------------------------------------------------------------------------
// Launches (feature `cuda`)

#[cfg(feature = "cuda")]
pub use device::*;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::gpu::{driver_err, Gpu};
    use cudarc::driver::sys::CUfunction_attribute_enum;
    use cudarc::driver::{
        CudaFunction, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use half::f16;

    fn config(dims: LaunchDims) -> LaunchConfig {
        LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_mem_bytes,
        }
    }

    /// The kernels move 16 bytes at a time, so every fp16 base pointer must be 16-byte
    /// aligned (a cudarc allocation is; a view must start at a multiple of 8 elements).
    fn aligned16<T>(
        gpu: &Gpu,
        kernel: &'static str,
        what: &str,
        view: &impl DevicePtr<T>,
    ) -> Result<()> {
        let (ptr, _record_read) = view.device_ptr(&gpu.stream);
        if ptr % 16 != 0 {
            return Err(launch_error(
                kernel,
                format!("{what} starts at {ptr:#x}, not 16-byte aligned (views must start at a multiple of 8 halves)"),
            ));
        }
        Ok(())
    }

    /// Lets `f` use `bytes` of dynamic shared memory when that is over the 48 KB default.
    fn allow_shared(f: &CudaFunction, kernel: &str, bytes: u32) -> Result<()> {
        if bytes as usize > DEFAULT_SHARED_MEM_BYTES {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(driver_err(format!(
                "allowing {bytes} bytes of shared memory for `{kernel}`"
            )))?;
        }
        Ok(())
    }

    /// Device copies of [`DecodeTables`] (the same values the plan checked).
    pub struct DecodeTablesOnDevice<'a> {
        pub kv_pages: CudaView<'a, i32>,
        pub table_offset: CudaView<'a, i32>,
        pub ctx_len: CudaView<'a, i32>,
    }

    /// Device copies of [`PrefillTables`] (the same values the plan checked).
    pub struct PrefillTablesOnDevice<'a> {
        pub kv_pages: CudaView<'a, i32>,
        pub seg_start: CudaView<'a, i32>,
        pub context_start: CudaView<'a, i32>,
        pub table_offset: CudaView<'a, i32>,
    }

    /// Stores `k`, `v` (`[tokens, W]`) at `slot_pages` (`[tokens]`) in `layer_kv`, one layer's
    /// `[2, pages, W]` region of the pool ([`layer_kv_range`]). `slot_pages` must hold the
    /// values `plan` was made from. Asynchronous on `gpu.stream`.
    pub fn kv_store(
        gpu: &Gpu,
        plan: &KvStorePlan,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
        slot_pages: &CudaView<'_, i32>,
        layer_kv: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let w = plan.shape.kv_width();
        check_len(KV_STORE, "k", k.len(), plan.tokens * w)?;
        check_len(KV_STORE, "v", v.len(), plan.tokens * w)?;
        check_len(KV_STORE, "slot_pages", slot_pages.len(), plan.tokens)?;
        check_len(
            KV_STORE,
            "layer_kv",
            layer_kv.len(),
            2 * plan.pool_pages * w,
        )?;
        if plan.launch.is_empty() {
            return Ok(());
        }
        aligned16(gpu, KV_STORE, "k", k)?;
        aligned16(gpu, KV_STORE, "v", v)?;
        aligned16(gpu, KV_STORE, "layer_kv", layer_kv)?;
        let f = gpu.function(SOURCE, "kv_store")?;
        let (tokens, width, pages) = (plan.tokens as i32, w as i32, plan.pool_pages as i32);
        let mut launch = gpu.stream.launch_builder(&f);
        launch
            .arg(k)
            .arg(v)
            .arg(slot_pages)
            .arg(layer_kv)
            .arg(&tokens)
            .arg(&width)
            .arg(&pages);
        // SAFETY: the arguments match `kv_store`'s parameters in order and type (three
        // pointers, the pool pointer, three ints). The plan checked every slot page is in
        // 0..pages and tokens * W fits i32, and the lengths and 16-byte alignment of every
        // buffer were checked above, so each thread's 16-byte reads and writes are in bounds.
        unsafe { launch.launch(config(plan.launch)) }.map_err(driver_err("launching kv_store"))?;
        Ok(())
    }

    /// Decode attention: `q` `[requests, num_heads * head_dim]` over `layer_kv` (one layer's
    /// `[2, pages, W]` region) into `o` (same shape as `q`). `workspace` holds at least
    /// `plan.workspace_elems` f32 (any length when that is 0; see
    /// [`decode_workspace_elems`]). The device tables must hold the values `plan` was made
    /// from. One or two launches, asynchronous on `gpu.stream`.
    pub fn decode_attention(
        gpu: &Gpu,
        plan: &DecodePlan,
        q: &CudaView<'_, f16>,
        layer_kv: &CudaView<'_, f16>,
        tables: &DecodeTablesOnDevice<'_>,
        workspace: &mut CudaViewMut<'_, f32>,
        o: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let qw = plan.shape.q_width();
        check_len(DECODE, "q", q.len(), plan.requests * qw)?;
        check_len(DECODE, "o", o.len(), plan.requests * qw)?;
        check_len(
            DECODE,
            "layer_kv",
            layer_kv.len(),
            2 * plan.pool_pages * plan.shape.kv_width(),
        )?;
        check_len(DECODE, "kv_pages", tables.kv_pages.len(), plan.kv_pages_len)?;
        check_len(
            DECODE,
            "table_offset",
            tables.table_offset.len(),
            plan.requests,
        )?;
        check_len(DECODE, "ctx_len", tables.ctx_len.len(), plan.requests)?;
        if workspace.len() < plan.workspace_elems {
            return Err(launch_error(
                DECODE,
                format!(
                    "workspace has {} f32, the plan needs {}",
                    workspace.len(),
                    plan.workspace_elems
                ),
            ));
        }
        if plan.attention.is_empty() {
            return Ok(());
        }
        aligned16(gpu, DECODE, "q", q)?;
        aligned16(gpu, DECODE, "o", o)?;
        aligned16(gpu, DECODE, "layer_kv", layer_kv)?;
        let f = gpu.function(SOURCE, plan.kernel)?;
        allow_shared(&f, plan.kernel, plan.attention.shared_mem_bytes)?;
        let pages = plan.pool_pages as i32;
        let num_heads = plan.shape.num_heads as i32;
        let num_kv_heads = plan.shape.num_kv_heads as i32;
        let max_parts = plan.partitions as i32;
        let head_dim = plan.shape.head_dim as i32;
        let scale_log2 = plan.shape.softmax_scale_log2();
        // The partial max/sum pairs follow the partial outputs in the workspace.
        let partial_o_elems =
            plan.workspace_elems / (plan.shape.head_dim + 2) * plan.shape.head_dim;
        let (mut partial_o, mut partial_ml) = workspace.split_at_mut(partial_o_elems);
        let mut launch = gpu.stream.launch_builder(&f);
        launch
            .arg(q)
            .arg(layer_kv)
            .arg(&pages)
            .arg(&tables.kv_pages)
            .arg(&tables.table_offset)
            .arg(&tables.ctx_len)
            .arg(&mut *o)
            .arg(&mut partial_o)
            .arg(&mut partial_ml)
            .arg(&num_heads)
            .arg(&num_kv_heads)
            .arg(&max_parts)
            .arg(&scale_log2);
        // SAFETY: the arguments match `decode_attention_d{64,128}`'s parameters in order and
        // type. The plan checked the tables (offsets + lengths inside kv_pages, pages inside
        // the pool), i32 indices and the shared memory size; lengths and alignment of the
        // buffers were checked above. Partial buffers are written only when `partitions > 1`,
        // and then they hold `workspace_elems` f32 as laid out by the plan.
        unsafe { launch.launch(config(plan.attention)) }
            .map_err(driver_err(format!("launching {}", plan.kernel)))?;
        if let Some(reduce) = plan.reduce {
            let f = gpu.function(SOURCE, "decode_attention_reduce")?;
            let mut launch = gpu.stream.launch_builder(&f);
            launch
                .arg(&mut partial_o)
                .arg(&mut partial_ml)
                .arg(&tables.ctx_len)
                .arg(&mut *o)
                .arg(&num_heads)
                .arg(&head_dim)
                .arg(&max_parts);
            // SAFETY: the arguments match `decode_attention_reduce`'s parameters; it reads the
            // partials the launch above wrote for requests with more than one partition
            // (`nparts <= max_parts`, so inside the workspace) and writes their rows of `o`.
            unsafe { launch.launch(config(reduce)) }
                .map_err(driver_err("launching decode_attention_reduce"))?;
        }
        Ok(())
    }

    /// Prefill attention: `q` `[tokens, num_heads * head_dim]` (segments concatenated) over
    /// `layer_kv` (one layer's `[2, pages, W]` region; the chunks' own KV rows already
    /// stored) into `o` (same shape). The device tables must hold the values `plan` was made
    /// from. Asynchronous on `gpu.stream`.
    pub fn prefill_attention(
        gpu: &Gpu,
        plan: &PrefillPlan,
        q: &CudaView<'_, f16>,
        layer_kv: &CudaView<'_, f16>,
        tables: &PrefillTablesOnDevice<'_>,
        o: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let qw = plan.shape.q_width();
        check_len(PREFILL, "q", q.len(), plan.tokens * qw)?;
        check_len(PREFILL, "o", o.len(), plan.tokens * qw)?;
        check_len(
            PREFILL,
            "layer_kv",
            layer_kv.len(),
            2 * plan.pool_pages * plan.shape.kv_width(),
        )?;
        check_len(
            PREFILL,
            "kv_pages",
            tables.kv_pages.len(),
            plan.kv_pages_len,
        )?;
        check_len(
            PREFILL,
            "seg_start",
            tables.seg_start.len(),
            plan.segments + 1,
        )?;
        check_len(
            PREFILL,
            "context_start",
            tables.context_start.len(),
            plan.segments,
        )?;
        check_len(
            PREFILL,
            "table_offset",
            tables.table_offset.len(),
            plan.segments,
        )?;
        if plan.launch.is_empty() {
            return Ok(());
        }
        aligned16(gpu, PREFILL, "q", q)?;
        aligned16(gpu, PREFILL, "o", o)?;
        aligned16(gpu, PREFILL, "layer_kv", layer_kv)?;
        let f = gpu.function(SOURCE, plan.kernel)?;
        let pages = plan.pool_pages as i32;
        let num_heads = plan.shape.num_heads as i32;
        let num_kv_heads = plan.shape.num_kv_heads as i32;
        let max_tiles = plan.query_tiles as i32;
        let scale_log2 = plan.shape.softmax_scale_log2();
        let mut launch = gpu.stream.launch_builder(&f);
        launch
            .arg(q)
            .arg(layer_kv)
            .arg(&pages)
            .arg(&tables.kv_pages)
            .arg(&tables.seg_start)
            .arg(&tables.context_start)
            .arg(&tables.table_offset)
            .arg(o)
            .arg(&num_heads)
            .arg(&num_kv_heads)
            .arg(&max_tiles)
            .arg(&scale_log2);
        // SAFETY: the arguments match `prefill_attention_d{64,128}`'s parameters in order and
        // type. The plan checked the segment table (non-decreasing from 0 to tokens), every
        // table slice inside kv_pages, pages inside the pool and i32 indices; lengths and
        // alignment of the buffers were checked above.
        unsafe { launch.launch(config(plan.launch)) }
            .map_err(driver_err(format!("launching {}", plan.kernel)))?;
        Ok(())
    }

    fn compare(kernel: String, got: &[f16], want: &[f32], exact: bool) -> CheckResult {
        let (mut max_abs, mut diff2, mut ref2) = (0f64, 0f64, 0f64);
        for (&g, &w) in got.iter().zip(want) {
            let (g, w) = (g.to_f64(), w as f64);
            let d = (g - w).abs();
            // NaN (a poisoned, unwritten output) must fail, and f64::max would drop it.
            max_abs = if d.is_nan() || d > max_abs {
                d
            } else {
                max_abs
            };
            diff2 += d * d;
            ref2 += w * w;
        }
        let rel_err = diff2.sqrt() / ref2.sqrt();
        let passed = got.len() == want.len()
            && if exact {
                max_abs == 0.0
            } else {
                rel_err.is_finite() && rel_err < CHECK_TOLERANCE
            };
        CheckResult {
            kernel,
            max_abs_err: max_abs,
            rel_err,
            passed,
        }
    }

    fn to_f16(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    /// Runs every attention kernel on random data against its CPU reference: MHA and GQA
    /// (groups of 1, 2, 4 and 12: each heads-per-pass instance, and a group needing two register
    /// passes), head_dim 64 and 128, a 2-layer pool
    /// with shuffled pages (layer 1 is used, so layer offsets matter), decode contexts from 1
    /// to 3 partitions, and a prefill batch with chunked segments (`context_start > 0`), a
    /// one-token chunk and an empty one. Outputs are poisoned with NaN first.
    pub fn check_on_gpu(gpu: &Gpu) -> Result<Vec<CheckResult>> {
        let mut rng = TestRng(0x5107_a77e_2024);
        let mut rows = Vec::new();
        for (label, shape) in [
            ("MHA 4/4 d128", AttentionShape::new(4, 4, 128)),
            ("GQA 8/2 d128", AttentionShape::new(8, 2, 128)),
            ("GQA 12/1 d64", AttentionShape::new(12, 1, 64)),
            ("GQA 6/3 d64", AttentionShape::new(6, 3, 64)),
        ] {
            rows.extend(check_shape(gpu, label, shape, &mut rng)?);
        }
        Ok(rows)
    }

    fn check_shape(
        gpu: &Gpu,
        label: &str,
        shape: AttentionShape,
        rng: &mut TestRng,
    ) -> Result<Vec<CheckResult>> {
        const LAYERS: usize = 2;
        const LAYER: usize = 1;
        let (w, qw) = (shape.kv_width(), shape.q_width());
        let decode_ctx = [1usize, 5, 256, 257, 600, 33];
        // (context_start, chunk length) per prefill segment.
        let prefill = [
            (0usize, 70usize),
            (100, 33),
            (5, 1),
            (0, 130),
            (7, 0),
            (300, 65),
        ];
        let stored = 40usize;
        let needed = decode_ctx.iter().sum::<usize>()
            + prefill.iter().map(|(c, n)| c + n).sum::<usize>()
            + stored
            + decode_ctx.len();
        let pool_pages = needed + 37;
        let mut free_pages = rng.permutation(pool_pages).into_iter();
        let mut take = |n: usize| -> Vec<i32> { free_pages.by_ref().take(n).collect() };

        let mut pool: Vec<f16> = to_f16(&rng.values(LAYERS * 2 * pool_pages * w, 1.0));
        let mut pool_dev = gpu
            .stream
            .clone_htod(&pool)
            .map_err(driver_err("uploading the check pool"))?;
        let layer = layer_kv_range(LAYER, pool_pages, w);
        let upload_i32 = |v: &[i32]| {
            gpu.stream
                .clone_htod(v)
                .map_err(driver_err("uploading a check table"))
        };
        let upload_f16 = |v: &[f16]| {
            gpu.stream
                .clone_htod(v)
                .map_err(driver_err("uploading check data"))
        };
        let download = |v: &cudarc::driver::CudaSlice<f16>| {
            gpu.stream
                .clone_dtoh(v)
                .map_err(driver_err("downloading a check result"))
        };
        let mut rows = Vec::new();

        // kv_store: compare the whole pool, so stray writes (other layer, other pages) show.
        let slot_pages = take(stored);
        let k = to_f16(&rng.values(stored * w, 1.0));
        let v = to_f16(&rng.values(stored * w, 1.0));
        let plan = plan_kv_store(shape, pool_pages, &slot_pages)?;
        kv_store_cpu(
            shape,
            pool_pages,
            &mut pool[layer.clone()],
            &k,
            &v,
            &slot_pages,
        )?;
        let (k_dev, v_dev, slots_dev) =
            (upload_f16(&k)?, upload_f16(&v)?, upload_i32(&slot_pages)?);
        kv_store(
            gpu,
            &plan,
            &k_dev.slice(..),
            &v_dev.slice(..),
            &slots_dev.slice(..),
            &mut pool_dev.slice_mut(layer.clone()),
        )?;
        let pool_back = download(&pool_dev)?;
        let want: Vec<f32> = pool.iter().map(|x| x.to_f32()).collect();
        rows.push(compare(
            format!("kv_store {label}"),
            &pool_back,
            &want,
            true,
        ));

        // Decode: a decoy page between requests' tables, so offsets must be right.
        let mut kv_pages = Vec::new();
        let mut table_offset = Vec::new();
        for &ctx in &decode_ctx {
            kv_pages.extend(take(1));
            table_offset.push(kv_pages.len() as i32);
            kv_pages.extend(take(ctx));
        }
        let ctx_len: Vec<i32> = decode_ctx.iter().map(|&c| c as i32).collect();
        let tables = DecodeTables {
            kv_pages: &kv_pages,
            table_offset: &table_offset,
            ctx_len: &ctx_len,
        };
        let plan = plan_decode(shape, pool_pages, &tables)?;
        let q = to_f16(&rng.values(plan.requests * qw, 2.0));
        let want = decode_attention_cpu(shape, pool_pages, &pool[layer.clone()], &q, &tables)?;
        let (kv_dev, off_dev, ctx_dev) = (
            upload_i32(&kv_pages)?,
            upload_i32(&table_offset)?,
            upload_i32(&ctx_len)?,
        );
        let q_dev = upload_f16(&q)?;
        let mut o_dev = upload_f16(&vec![f16::NAN; plan.requests * qw])?;
        let mut workspace = gpu
            .stream
            .alloc_zeros::<f32>(plan.workspace_elems.max(1))
            .map_err(driver_err("allocating the decode workspace"))?;
        decode_attention(
            gpu,
            &plan,
            &q_dev.slice(..),
            &pool_dev.slice(layer.clone()),
            &DecodeTablesOnDevice {
                kv_pages: kv_dev.slice(..),
                table_offset: off_dev.slice(..),
                ctx_len: ctx_dev.slice(..),
            },
            &mut workspace.slice_mut(..),
            &mut o_dev.slice_mut(..),
        )?;
        rows.push(compare(
            format!("decode_attention {label}"),
            &download(&o_dev)?,
            &want,
            false,
        ));

        // Prefill: each segment's table holds its context rows then its chunk's rows.
        let mut kv_pages = Vec::new();
        let (mut seg_start, mut context_start, mut table_offset) =
            (vec![0i32], Vec::new(), Vec::new());
        for &(context, chunk) in &prefill {
            kv_pages.extend(take(1));
            table_offset.push(kv_pages.len() as i32);
            kv_pages.extend(take(context + chunk));
            context_start.push(context as i32);
            seg_start.push(seg_start.last().copied().unwrap_or(0) + chunk as i32);
        }
        let tables = PrefillTables {
            kv_pages: &kv_pages,
            seg_start: &seg_start,
            context_start: &context_start,
            table_offset: &table_offset,
        };
        let plan = plan_prefill(shape, pool_pages, &tables)?;
        let q = to_f16(&rng.values(plan.tokens * qw, 2.0));
        let want = prefill_attention_cpu(shape, pool_pages, &pool[layer.clone()], &q, &tables)?;
        let kv_dev = upload_i32(&kv_pages)?;
        let (seg_dev, ctx0_dev, off_dev) = (
            upload_i32(&seg_start)?,
            upload_i32(&context_start)?,
            upload_i32(&table_offset)?,
        );
        let q_dev = upload_f16(&q)?;
        let mut o_dev = upload_f16(&vec![f16::NAN; plan.tokens * qw])?;
        prefill_attention(
            gpu,
            &plan,
            &q_dev.slice(..),
            &pool_dev.slice(layer.clone()),
            &PrefillTablesOnDevice {
                kv_pages: kv_dev.slice(..),
                seg_start: seg_dev.slice(..),
                context_start: ctx0_dev.slice(..),
                table_offset: off_dev.slice(..),
            },
            &mut o_dev.slice_mut(..),
        )?;
        rows.push(compare(
            format!("prefill_attention {label}"),
            &download(&o_dev)?,
            &want,
            false,
        ));
        gpu.synchronize()?;
        Ok(rows)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Needs a GPU: `cargo test -p slora-kernels --features cuda -- --ignored attention`.
        #[test]
        fn attention_kernels_match_cpu_reference_on_gpu() {
            let Some(gpu) =
                crate::gpu::gpu_for_test("attention_kernels_match_cpu_reference_on_gpu")
            else {
                return;
            };
            let rows = check_on_gpu(&gpu).expect("check runs");
            for r in &rows {
                println!(
                    "{:<36} max_abs_err {:.3e} rel_err {:.3e} {}",
                    r.kernel,
                    r.max_abs_err,
                    r.rel_err,
                    if r.passed { "ok" } else { "FAILED" }
                );
            }
            assert!(rows.iter().all(|r| r.passed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(e: Error) -> String {
        match e {
            Error::Launch { reason, .. } => reason,
            other => panic!("expected a launch error, got {other}"),
        }
    }

    /// Naive dense causal attention, independent of the paged code: `q` `[nq, nh, d]` at
    /// `positions`, K and V `[rows, nkv, d]` of one request; full score vector, softmax, sum.
    fn dense_attention(
        shape: &AttentionShape,
        q: &[f32],
        positions: &[usize],
        k: &[f32],
        v: &[f32],
    ) -> Vec<f64> {
        let (nh, d, w) = (shape.num_heads, shape.head_dim, shape.kv_width());
        let g = nh / shape.num_kv_heads;
        let mut out = vec![0f64; positions.len() * nh * d];
        for (n, &pos) in positions.iter().enumerate() {
            for h in 0..nh {
                let kvh = h / g;
                let qh = &q[(n * nh + h) * d..][..d];
                let mut scores = vec![0f64; pos + 1];
                for (j, s) in scores.iter_mut().enumerate() {
                    let kr = &k[j * w + kvh * d..][..d];
                    *s = (0..d).map(|i| qh[i] as f64 * kr[i] as f64).sum::<f64>()
                        / (d as f64).sqrt();
                }
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..d {
                    out[(n * nh + h) * d + i] = (0..=pos)
                        .map(|j| e[j] * v[j * w + kvh * d + i] as f64)
                        .sum::<f64>()
                        / z;
                }
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    /// A pool image with random contents, and per request its dense K/V rows written to
    /// scattered pages with `kv_store_cpu`.
    struct Fixture {
        shape: AttentionShape,
        pool_pages: usize,
        layer_kv: Vec<f32>,
        free: Vec<i32>,
        rng: TestRng,
    }

    impl Fixture {
        fn new(shape: AttentionShape, pool_pages: usize, seed: u64) -> Fixture {
            let mut rng = TestRng(seed);
            let layer_kv = rng.values(2 * pool_pages * shape.kv_width(), 1.0);
            let free = rng.permutation(pool_pages);
            Fixture {
                shape,
                pool_pages,
                layer_kv,
                free,
                rng,
            }
        }

        fn take(&mut self, n: usize) -> Vec<i32> {
            self.free.split_off(self.free.len() - n)
        }

        /// Stores `rows` random KV rows on fresh pages; returns (pages, dense K, dense V).
        fn request(&mut self, rows: usize) -> (Vec<i32>, Vec<f32>, Vec<f32>) {
            let pages = self.take(rows);
            let w = self.shape.kv_width();
            let k = self.rng.values(rows * w, 1.0);
            let v = self.rng.values(rows * w, 1.0);
            kv_store_cpu(
                self.shape,
                self.pool_pages,
                &mut self.layer_kv,
                &k,
                &v,
                &pages,
            )
            .unwrap();
            (pages, k, v)
        }
    }

    const SHAPES: [(usize, usize, usize); 4] = [(4, 4, 64), (8, 2, 128), (12, 1, 64), (2, 2, 128)];

    #[test]
    fn kv_store_cpu_writes_exactly_the_slot_rows() {
        let shape = AttentionShape::new(4, 2, 64);
        let mut fx = Fixture::new(shape, 50, 1);
        let before = fx.layer_kv.clone();
        let (pages, k, v) = fx.request(7);
        let w = shape.kv_width();
        let v_side = 50 * w;
        for p in 0..50usize {
            let slot = pages.iter().position(|&x| x as usize == p);
            let (kr, vr) = (
                &fx.layer_kv[p * w..][..w],
                &fx.layer_kv[v_side + p * w..][..w],
            );
            match slot {
                Some(t) => {
                    assert_eq!(kr, &k[t * w..][..w]);
                    assert_eq!(vr, &v[t * w..][..w]);
                }
                None => {
                    assert_eq!(kr, &before[p * w..][..w]);
                    assert_eq!(vr, &before[v_side + p * w..][..w]);
                }
            }
        }
    }

    #[test]
    fn decode_cpu_matches_dense_attention_mha_and_gqa() {
        for (i, &(nh, nkv, d)) in SHAPES.iter().enumerate() {
            let shape = AttentionShape::new(nh, nkv, d);
            let ctx = [1usize, 7, 300, 40, 257];
            let mut fx = Fixture::new(shape, 700, 10 + i as u64);
            let (mut kv_pages, mut table_offset, mut dense) = (Vec::new(), Vec::new(), Vec::new());
            for &c in &ctx {
                kv_pages.extend(fx.take(1)); // a decoy entry: offsets must be honoured
                table_offset.push(kv_pages.len() as i32);
                let (pages, k, v) = fx.request(c);
                kv_pages.extend(pages);
                dense.push((k, v));
            }
            let ctx_len: Vec<i32> = ctx.iter().map(|&c| c as i32).collect();
            let tables = DecodeTables {
                kv_pages: &kv_pages,
                table_offset: &table_offset,
                ctx_len: &ctx_len,
            };
            let q = fx.rng.values(ctx.len() * shape.q_width(), 2.0);
            let o = decode_attention_cpu(shape, fx.pool_pages, &fx.layer_kv, &q, &tables).unwrap();
            for (b, (k, v)) in dense.iter().enumerate() {
                let qw = shape.q_width();
                let want = dense_attention(&shape, &q[b * qw..][..qw], &[ctx[b] - 1], k, v);
                let err = max_diff(&o[b * qw..][..qw], &want);
                assert!(err < 1e-5, "shape {shape:?} request {b}: max error {err}");
            }
        }
    }

    #[test]
    fn prefill_cpu_matches_dense_causal_attention_with_chunks() {
        for (i, &(nh, nkv, d)) in SHAPES.iter().enumerate() {
            let shape = AttentionShape::new(nh, nkv, d);
            // (context_start, chunk): fresh, chunked, one token, empty, chunked long.
            let segs = [(0usize, 9usize), (13, 4), (3, 1), (2, 0), (70, 66)];
            let mut fx = Fixture::new(shape, 300, 20 + i as u64);
            let (mut kv_pages, mut table_offset, mut dense) = (Vec::new(), Vec::new(), Vec::new());
            let (mut seg_start, mut context_start) = (vec![0i32], Vec::new());
            for &(c, n) in &segs {
                kv_pages.extend(fx.take(2));
                table_offset.push(kv_pages.len() as i32);
                let (pages, k, v) = fx.request(c + n);
                kv_pages.extend(pages);
                dense.push((k, v));
                context_start.push(c as i32);
                seg_start.push(*seg_start.last().unwrap() + n as i32);
            }
            let tables = PrefillTables {
                kv_pages: &kv_pages,
                seg_start: &seg_start,
                context_start: &context_start,
                table_offset: &table_offset,
            };
            let tokens = *seg_start.last().unwrap() as usize;
            let qw = shape.q_width();
            let q = fx.rng.values(tokens * qw, 2.0);
            let o = prefill_attention_cpu(shape, fx.pool_pages, &fx.layer_kv, &q, &tables).unwrap();
            for (s, (k, v)) in dense.iter().enumerate() {
                let (c, n) = segs[s];
                let t0 = seg_start[s] as usize;
                let positions: Vec<usize> = (c..c + n).collect();
                let want = dense_attention(&shape, &q[t0 * qw..(t0 + n) * qw], &positions, k, v);
                let err = max_diff(&o[t0 * qw..(t0 + n) * qw], &want);
                assert!(err < 1e-5, "shape {shape:?} segment {s}: max error {err}");
            }
        }
    }

    #[test]
    fn references_accept_an_fp16_pool_image() {
        let shape = AttentionShape::new(8, 2, 64);
        let mut fx = Fixture::new(shape, 64, 3);
        let (pages, _, _) = fx.request(20);
        let q = fx.rng.values(shape.q_width(), 2.0);
        let half_pool: Vec<half::f16> = fx
            .layer_kv
            .iter()
            .map(|&x| half::f16::from_f32(x))
            .collect();
        let half_q: Vec<half::f16> = q.iter().map(|&x| half::f16::from_f32(x)).collect();
        let rounded_pool: Vec<f32> = half_pool.iter().map(|x| x.to_f32()).collect();
        let rounded_q: Vec<f32> = half_q.iter().map(|x| x.to_f32()).collect();
        let tables = DecodeTables {
            kv_pages: &pages,
            table_offset: &[0],
            ctx_len: &[20],
        };
        let a = decode_attention_cpu(shape, 64, &half_pool, &half_q, &tables).unwrap();
        let b = decode_attention_cpu(shape, 64, &rounded_pool, &rounded_q, &tables).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn plans_reject_unsupported_shapes() {
        let tables = DecodeTables {
            kv_pages: &[0],
            table_offset: &[0],
            ctx_len: &[1],
        };
        let e = reason(plan_decode(AttentionShape::new(4, 4, 96), 8, &tables).unwrap_err());
        assert!(
            e.contains("head_dim = 96") && e.contains("[64, 128]"),
            "{e}"
        );
        let e = reason(plan_decode(AttentionShape::new(6, 4, 128), 8, &tables).unwrap_err());
        assert!(e.contains("not a multiple"), "{e}");
        let e = reason(plan_kv_store(AttentionShape::new(4, 0, 128), 8, &[0]).unwrap_err());
        assert!(e.contains("positive"), "{e}");
        // A group so large its logits overflow shared memory.
        let e = reason(plan_decode(AttentionShape::new(128, 1, 128), 8, &tables).unwrap_err());
        assert!(e.contains("shared memory"), "{e}");
    }

    #[test]
    fn plans_reject_bad_tables() {
        let shape = AttentionShape::new(4, 4, 64);
        let e = reason(plan_kv_store(shape, 8, &[1, 8]).unwrap_err());
        assert!(e.contains("slot_pages[1] = 8"), "{e}");
        let e = reason(plan_kv_store(shape, 8, &[3, -1]).unwrap_err());
        assert!(e.contains("slot_pages[1] = -1"), "{e}");
        let e = reason(plan_kv_store(shape, 8, &[3, 5, 3]).unwrap_err());
        assert!(e.contains("page 3"), "{e}");

        let decode = |kv: &[i32], off: &[i32], ctx: &[i32]| {
            plan_decode(
                shape,
                8,
                &DecodeTables {
                    kv_pages: kv,
                    table_offset: off,
                    ctx_len: ctx,
                },
            )
        };
        assert!(reason(decode(&[0, 1, 2], &[0, 2], &[2, 2]).unwrap_err())
            .contains("runs past kv_pages"));
        assert!(reason(decode(&[0, 1, 2], &[0], &[0]).unwrap_err()).contains("ctx_len[0] = 0"));
        assert!(reason(decode(&[0, 1, 9], &[0], &[2]).unwrap_err()).contains("kv_pages[2] = 9"));
        assert!(reason(decode(&[0, 1, 2], &[-1], &[2]).unwrap_err()).contains("negative"));
        assert!(
            reason(decode(&[0, 1, 2], &[0, 1], &[2]).unwrap_err()).contains("table_offset has 2")
        );

        let prefill = |seg: &[i32], ctx0: &[i32], off: &[i32]| {
            plan_prefill(
                shape,
                8,
                &PrefillTables {
                    kv_pages: &[0, 1, 2, 3, 4],
                    seg_start: seg,
                    context_start: ctx0,
                    table_offset: off,
                },
            )
        };
        assert!(prefill(&[0, 2, 3], &[0, 2], &[0, 2]).is_ok());
        assert!(reason(prefill(&[0, 2, 3], &[0, 3], &[0, 2]).unwrap_err()).contains("segment 1"));
        assert!(reason(prefill(&[1, 2], &[0], &[0]).unwrap_err()).contains("seg_start[0] = 1"));
        assert!(reason(prefill(&[0, 3, 2], &[0, 0], &[0, 0]).unwrap_err()).contains("decreases"));
        assert!(reason(prefill(&[0, 3], &[0, 0], &[0]).unwrap_err()).contains("table_offset has 1"));
    }

    #[test]
    fn plans_reject_i32_overflow() {
        // 524,288 tokens of W = 4096 halves: exactly 2^31 elements.
        let shape = AttentionShape::new(32, 32, 128);
        let slots: Vec<i32> = (0..524_288).collect();
        let e = reason(plan_kv_store(shape, 600_000, &slots).unwrap_err());
        assert!(e.contains("tokens * W"), "{e}");

        // Decode scratch: 600 requests, 32 heads, 900 partitions, 130 floats each > 2^31.
        let long = 900 * DECODE_PARTITION as i32;
        let kv: Vec<i32> = vec![0; long as usize];
        let mut ctx = vec![1i32; 600];
        ctx[0] = long;
        let e = reason(
            plan_decode(
                shape,
                8,
                &DecodeTables {
                    kv_pages: &kv,
                    table_offset: &[0; 600],
                    ctx_len: &ctx,
                },
            )
            .unwrap_err(),
        );
        assert!(e.contains("workspace"), "{e}");

        // Prefill q: 2^31 / 4096 tokens.
        let e = reason(
            plan_prefill(
                shape,
                8,
                &PrefillTables {
                    kv_pages: &[],
                    seg_start: &[0, 524_288],
                    context_start: &[0],
                    table_offset: &[0],
                },
            )
            .unwrap_err(),
        );
        assert!(e.contains("runs past kv_pages") || e.contains("i32"), "{e}");
        let e = reason(plan_kv_store(shape, I32_MAX + 1, &[0]).unwrap_err());
        assert!(e.contains("pool pages"), "{e}");
    }

    #[test]
    fn decode_plan_grid_partitions_and_workspace() {
        let shape = AttentionShape::new(32, 8, 128);
        let kv = vec![0i32; 1000];
        let short = plan_decode(
            shape,
            4,
            &DecodeTables {
                kv_pages: &kv,
                table_offset: &[0, 10, 300],
                ctx_len: &[1, 256, 100],
            },
        )
        .unwrap();
        assert_eq!(short.partitions, 1);
        assert_eq!(short.workspace_elems, 0);
        assert!(short.reduce.is_none());
        assert_eq!(
            (short.kernel, short.heads_per_pass),
            ("decode_attention_d128_g4", 4)
        );
        assert_eq!(short.attention.grid, (8, 3, 1));
        assert_eq!(short.attention.block, (128, 1, 1));
        // g = 4: logits 4*256, sums 4 warps * 4 heads * 128, stats 8; f32.
        assert_eq!(
            short.attention.shared_mem_bytes as usize,
            4 * (1024 + 2048 + 8)
        );

        let long = plan_decode(
            shape,
            4,
            &DecodeTables {
                kv_pages: &kv,
                table_offset: &[0, 0],
                ctx_len: &[257, 600],
            },
        )
        .unwrap();
        assert_eq!(long.partitions, 3);
        assert_eq!(long.max_ctx, 600);
        assert_eq!(long.workspace_elems, 2 * 32 * 3 * 130);
        assert_eq!(long.workspace_elems, decode_workspace_elems(&shape, 2, 600));
        assert_eq!(long.attention.grid, (8, 2, 3));
        let reduce = long.reduce.unwrap();
        assert_eq!((reduce.grid, reduce.block), ((32, 2, 1), (128, 1, 1)));

        let empty = plan_decode(
            shape,
            4,
            &DecodeTables {
                kv_pages: &[],
                table_offset: &[],
                ctx_len: &[],
            },
        )
        .unwrap();
        assert!(empty.attention.is_empty());
    }

    #[test]
    fn prefill_and_kv_store_plan_grids() {
        let shape = AttentionShape::new(32, 8, 64);
        let kv = vec![1i32; 400];
        let plan = plan_prefill(
            shape,
            4,
            &PrefillTables {
                kv_pages: &kv,
                seg_start: &[0, 65, 65, 75],
                context_start: &[0, 9, 200],
                table_offset: &[0, 65, 80],
            },
        )
        .unwrap();
        assert_eq!(
            (plan.tokens, plan.segments, plan.max_chunk, plan.query_tiles),
            (75, 3, 65, 2)
        );
        assert_eq!(plan.launch.grid, (32, 2, 3));
        assert_eq!(plan.kernel, "prefill_attention_d64");
        assert!(prefill_shared_mem_bytes(128) <= DEFAULT_SHARED_MEM_BYTES);
        assert_eq!(prefill_shared_mem_bytes(128), 43_264);

        let store = plan_kv_store(shape, 100, &[5, 6, 7]).unwrap();
        // 3 rows of 512 halves = 192 chunks of 8: one block of 256.
        assert_eq!(store.launch.grid, (1, 1, 1));
        assert_eq!(store.launch.block, (256, 1, 1));
        assert!(plan_kv_store(shape, 100, &[]).unwrap().launch.is_empty());
    }

    #[test]
    fn decode_kernel_covers_the_group_with_the_fewest_registers() {
        for (nh, nkv, d, name, heads) in [
            (32, 32, 128, "decode_attention_d128_g1", 1),
            (8, 4, 64, "decode_attention_d64_g2", 2),
            (12, 4, 128, "decode_attention_d128_g4", 4),
            (64, 8, 128, "decode_attention_d128_g8", 8),
            (12, 2, 64, "decode_attention_d64_g8", 8),
            (12, 1, 64, "decode_attention_d64_g8", 8),
        ] {
            assert_eq!(
                decode_kernel(&AttentionShape::new(nh, nkv, d)),
                (name, heads)
            );
            assert!(SOURCE
                .code
                .contains(&format!("ATTN_DECODE_KERNEL({d}, {heads})")));
        }
    }

    #[test]
    fn presets_fit_shared_memory() {
        // Llama-2 7B/13B (MHA), Llama-3 8B (GQA 4), 70B (GQA 8).
        for shape in [
            AttentionShape::new(32, 32, 128),
            AttentionShape::new(40, 40, 128),
            AttentionShape::new(32, 8, 128),
            AttentionShape::new(64, 8, 128),
        ] {
            assert!(
                decode_shared_mem_bytes(&shape) <= DEFAULT_SHARED_MEM_BYTES,
                "{shape:?}"
            );
        }
    }

    #[test]
    fn layer_range_follows_the_readme() {
        // layers * 2 * pages * W: layer 1 of pages 10, W 64 starts at 2*10*64.
        assert_eq!(layer_kv_range(1, 10, 64), 1280..2560);
        assert_eq!(layer_kv_range(0, 10, 64), 0..1280);
    }

    /// The block sizes in attention.cu and here must agree.
    #[test]
    fn constants_match_the_cuda_source() {
        let define = |name: &str| -> usize {
            let line = SOURCE
                .code
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("#define {name} missing"));
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(define("ATTN_KV_STORE_THREADS"), KV_STORE_THREADS as usize);
        assert_eq!(define("ATTN_DECODE_THREADS"), DECODE_THREADS as usize);
        assert_eq!(define("ATTN_DECODE_PARTITION"), DECODE_PARTITION);
        assert_eq!(define("ATTN_DECODE_GMAX"), DECODE_HEADS_PER_PASS);
        assert_eq!(define("ATTN_PREFILL_THREADS"), PREFILL_THREADS as usize);
        assert_eq!(define("ATTN_PREFILL_BQ"), PREFILL_QUERY_TILE);
        assert_eq!(define("ATTN_PREFILL_BK"), PREFILL_KEY_TILE);
    }
}
