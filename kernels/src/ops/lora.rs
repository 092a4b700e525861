//! S-LoRA's LoRA kernels over the unified page pool, for adapters of mixed ranks.
//!
//! `y += scale * (x · A^T) · B^T`, in two steps: the *shrink* `v = x · A^T` (`v` is an f32
//! scratch of `max_rank` columns) and the *expand* `y += scale * v · B^T`. Row `i` of `A` and row
//! `i` of `B^T` are gathered from the pool's K and V sides through the adapter's page list
//! (`kernels/README.md`, "Unified pool on the device"); `page_offset` points at the current
//! module's rows, `-1` meaning "no adapter" (that row of `y` is left as it is).
//!
//! - **MBGMV** (decode, one token per request): `lora_mbgmv_shrink`, `lora_mbgmv_expand`
//!   ([`DecodePath::Split`], the default), or `lora_mbgmv_fused` on sm_90+ (one launch over
//!   thread-block clusters, [`DecodePath::Fused`]). Memory bound, so built for 16-byte coalesced
//!   loads with several in flight. `lora_mbgmv_shrink_multi`, `lora_mbgmv_expand_multi`
//!   (`lora_decode_multi`) run the split path for up to three modules sharing `x` (q, k, v
//!   of a layer) in one launch each.
//! - **MBGMM** (prefill, a segment of tokens per adapter): `lora_mbgmm_shrink`,
//!   `lora_mbgmm_expand`, gather GEMMs that stage a tile of adapter rows in shared memory once
//!   and reuse it for every token of a token tile.
//!
//! Neither pads compute to the batch's largest rank: work for rank rows that do not exist is
//! skipped by whole blocks (decode) or by 16-row groups (prefill).
//!
//! Invariants the launch plans check: `W`, `in` and `out` are multiples of 8 (a 16-byte chunk
//! of a row never straddles two pages), `slots = max(ceil(in/W), ceil(out/W))`, and every
//! index the kernels compute fits in `i32`. The wrappers check buffer lengths; 16-byte
//! alignment of the buffers is the caller's (a misaligned one faults). Table *contents* live on the device and are not re-read by the host: check them
//! with [`validate_tables`] and [`validate_segments`] before uploading. The kernels still guard
//! every entry (rank, page-list range, page index, segment bounds) and skip one that would
//! index out of bounds, so bad tables give wrong numbers, never out-of-bounds accesses.
//!
//! Cost: both references and kernels are `O(tokens * rank * (in + out))`; packing is
//! `O(rank * slots * W)`.

use crate::error::{Error, Result};
use crate::sources::KernelSource;

/// The CUDA C source of the LoRA kernels.
pub const SOURCE: KernelSource = KernelSource {
    name: "lora.cu",
    code: include_str!("../../cuda/lora.cu"),
};

// Tile constants of `lora.cu` (its `#define`s; a test checks that they agree).
/// Rank rows per block of the MBGMV shrink (`DS_ROWS`).
pub const DECODE_SHRINK_ROWS: usize = 4;
/// Threads per block of the MBGMV shrink (`DS_THREADS`).
pub const DECODE_SHRINK_THREADS: u32 = 256;
/// Outputs per block of the MBGMV expand (`DE_TILE`).
pub const DECODE_EXPAND_TILE: usize = 256;
/// Threads per block of the MBGMV expand (`32 * DE_WARPS`).
pub const DECODE_EXPAND_THREADS: u32 = 128;
/// Blocks per thread-block cluster (one cluster per request) of the fused MBGMV (`DF_CLUSTER`).
pub const DECODE_FUSED_CLUSTER: usize = 8;
/// Threads per block of the fused MBGMV (`DF_THREADS`).
pub const DECODE_FUSED_THREADS: u32 = 256;
/// Compute capability (x10) from which `lora_mbgmv_fused` exists (thread-block clusters).
pub const DECODE_FUSED_MIN_ARCH: u32 = 90;
/// Tokens per tile of the MBGMM shrink (`PS_TM`).
pub const PREFILL_SHRINK_TOKENS: usize = 32;
/// Rank rows per block of the MBGMM shrink (`PS_TR`).
pub const PREFILL_SHRINK_RANKS: usize = 64;
/// Tokens per tile of the MBGMM expand (`PE_TM`).
pub const PREFILL_EXPAND_TOKENS: usize = 32;
/// Outputs per block of the MBGMM expand (`PE_TN`).
pub const PREFILL_EXPAND_OUTPUTS: usize = 128;
/// Threads per block of both MBGMM kernels (`PS_THREADS`, `PE_THREADS`).
pub const PREFILL_THREADS: u32 = 256;
/// Reduction depth of one step of the MBGMM shrink (`PS_TK`): split-K chunks are multiples.
pub const PREFILL_SHRINK_K: usize = 64;
/// Blocks the MBGMM shrink aims for by splitting its reduction: two per SM of a 132-SM GPU.
/// Fewer (a short prompt on one adapter is a dozen token tiles) leaves most SMs idle.
pub const PREFILL_SHRINK_TARGET_BLOCKS: usize = 264;
/// Most split-K chunks of the MBGMM shrink (each is one more `[T, max_rank]` of partial sums
/// in the scratch, added by `lora_mbgmm_reduce`).
pub const PREFILL_SHRINK_MAX_SPLITS: usize = 16;
/// Tokens per tile of both tensor-core MBGMM kernels (`TS_TM`, `TE_TM`: four warps of 16).
pub const PREFILL_TC_TOKENS: usize = 64;
/// Rank rows per block of the tensor-core MBGMM shrink (`TS_TR`).
pub const PREFILL_TC_SHRINK_RANKS: usize = 64;
/// Outputs per block of the tensor-core MBGMM expand (`TE_TN`).
pub const PREFILL_TC_EXPAND_OUTPUTS: usize = 64;
/// Threads per block of both tensor-core MBGMM kernels (`TS_THREADS`, `TE_THREADS`).
pub const PREFILL_TC_THREADS: u32 = 128;
/// Threads per block of `lora_mbgmm_reduce`.
pub const PREFILL_REDUCE_THREADS: u32 = 256;

/// Most modules one multi-module MBGMV launch takes (`LORA_MAX_MODULES`: q, k and v).
pub const DECODE_MULTI_MAX_MODULES: usize = 3;

/// Elements of one 16-byte load; `W`, `in` and `out` must be multiples of it.
const VEC: usize = 8;
/// Dynamic shared memory a launch may use without opting in to more.
const MAX_DYNAMIC_SHARED: usize = 48 * 1024;
/// CUDA's limit on `gridDim.y` and `gridDim.z`.
const MAX_GRID_YZ: usize = 65_535;
const I32_MAX: usize = i32::MAX as usize;

/// The geometry of one adapted module in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    /// `in` of the module (`A` rows are this wide).
    pub in_features: usize,
    /// `out` of the module (`B^T` rows are this wide).
    pub out_features: usize,
    /// Columns of the `v` scratch; every rank in the tables is at most this.
    pub max_rank: usize,
    /// Page indices per rank row: `max(ceil(in/W), ceil(out/W))`.
    pub slots: usize,
    /// `W`, the pool's page width in elements.
    pub page_width: usize,
    /// Pages in the pool: each side of the layer is `[num_pages, W]`.
    pub num_pages: usize,
}

impl LoraShape {
    /// The shape of a module `in -> out` over pages `W` wide, with `slots` as the README fixes it.
    pub fn new(
        in_features: usize,
        out_features: usize,
        page_width: usize,
        max_rank: usize,
        num_pages: usize,
    ) -> LoraShape {
        LoraShape {
            in_features,
            out_features,
            max_rank,
            slots: slots_for(in_features, out_features, page_width),
            page_width,
            num_pages,
        }
    }

    /// Checks what every kernel and reference relies on.
    pub fn validate(&self, kernel: &'static str) -> Result<()> {
        let bad = |reason: String| Err(Error::Launch { kernel, reason });
        let s = self;
        if s.in_features == 0 || s.out_features == 0 || s.page_width == 0 || s.max_rank == 0 {
            return bad(format!(
                "in ({}), out ({}), page width ({}) and max rank ({}) must all be at least 1",
                s.in_features, s.out_features, s.page_width, s.max_rank
            ));
        }
        for (what, value) in [
            ("in", s.in_features),
            ("out", s.out_features),
            ("page width", s.page_width),
        ] {
            if value % VEC != 0 {
                return bad(format!(
                    "{what} = {value} is not a multiple of {VEC}: rows are loaded 16 bytes at a time"
                ));
            }
        }
        let slots = slots_for(s.in_features, s.out_features, s.page_width);
        if s.slots != slots {
            return bad(format!(
                "slots = {} but a module {} -> {} over pages {} wide takes max(ceil(in/W), ceil(out/W)) = {slots}",
                s.slots, s.in_features, s.out_features, s.page_width
            ));
        }
        if s.num_pages
            .checked_mul(s.page_width)
            .is_none_or(|e| e > I32_MAX)
        {
            return bad(format!(
                "a pool side of {} pages x {} elements overflows i32 indexing",
                s.num_pages, s.page_width
            ));
        }
        if s.max_rank.checked_mul(s.slots).is_none_or(|e| e > I32_MAX) {
            return bad(format!(
                "max rank {} x {} slots overflows i32 indexing",
                s.max_rank, s.slots
            ));
        }
        let shared = DECODE_SHRINK_ROWS * s.slots * 4;
        if shared > MAX_DYNAMIC_SHARED {
            return bad(format!(
                "{} slots per row need {shared} bytes of shared memory in the shrink; at most {MAX_DYNAMIC_SHARED}",
                s.slots
            ));
        }
        Ok(())
    }
}

/// `max(ceil(in/W), ceil(out/W))`: page indices per rank row of a module (README).
pub fn slots_for(in_features: usize, out_features: usize, page_width: usize) -> usize {
    if page_width == 0 {
        return 0;
    }
    in_features
        .div_ceil(page_width)
        .max(out_features.div_ceil(page_width))
}

/// One kernel launch's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub shared_mem: u32,
}

/// The MBGMV launches for `n` decode requests. `n == 0` is valid and launches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDecodePlan {
    pub shape: LoraShape,
    pub n: usize,
    /// `lora_mbgmv_shrink`: block `b * groups + g` computes rank rows
    /// `[4g, 4g + 4)` of request `b` (`groups = ceil(max_rank / 4)`); 256 threads split `in`.
    pub shrink: LaunchDims,
    /// `lora_mbgmv_expand`: block `b * tiles + t` computes outputs `[256t, 256t + 256)` of
    /// request `b`; lane `l` owns 8 consecutive outputs, the 4 warps split the rank rows.
    pub expand: LaunchDims,
    /// `lora_mbgmv_fused` (sm_90+, instead of the two above): blocks `8b .. 8b + 8` form the
    /// cluster of request `b`; block `k` shrinks over the k-th eighth of `in`, the cluster sums
    /// the partial `v` through distributed shared memory, and block `k` expands output tiles
    /// `k, k + 8, ...` of 256 outputs. Dynamic shared memory: `2 * max_rank` floats.
    pub fused: LaunchDims,
}

impl LoraDecodePlan {
    pub fn new(shape: LoraShape, n: usize) -> Result<LoraDecodePlan> {
        const KERNEL: &str = "lora_mbgmv";
        shape.validate(KERNEL)?;
        check_rows(KERNEL, "requests", n, &shape)?;
        let groups = shape.max_rank.div_ceil(DECODE_SHRINK_ROWS);
        let tiles = shape.out_features.div_ceil(DECODE_EXPAND_TILE);
        let shrink_blocks = grid_x(KERNEL, n, groups)?;
        let expand_blocks = grid_x(KERNEL, n, tiles)?;
        let fused_blocks = grid_x(KERNEL, n, DECODE_FUSED_CLUSTER)?;
        let fused_shared = 2 * shape.max_rank * 4;
        if fused_shared > MAX_DYNAMIC_SHARED {
            return Err(Error::Launch {
                kernel: KERNEL,
                reason: format!(
                    "max rank {} needs {fused_shared} bytes of shared memory; at most {MAX_DYNAMIC_SHARED}",
                    shape.max_rank
                ),
            });
        }
        Ok(LoraDecodePlan {
            shape,
            n,
            shrink: LaunchDims {
                grid: (shrink_blocks, 1, 1),
                block: (DECODE_SHRINK_THREADS, 1, 1),
                shared_mem: (DECODE_SHRINK_ROWS * shape.slots * 4) as u32,
            },
            expand: LaunchDims {
                grid: (expand_blocks, 1, 1),
                block: (DECODE_EXPAND_THREADS, 1, 1),
                shared_mem: 0,
            },
            fused: LaunchDims {
                grid: (fused_blocks, 1, 1),
                block: (DECODE_FUSED_THREADS, 1, 1),
                shared_mem: fused_shared as u32,
            },
        })
    }

    /// Nothing to launch.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The plan with the shrink launched over a work list of `blocks` entries (see
    /// [`shrink_work`]) instead of every request's `ceil(max_rank / 4)` row groups.
    pub fn with_shrink_work(mut self, blocks: usize) -> Result<LoraDecodePlan> {
        self.shrink.grid.0 = shrink_work_blocks("lora_mbgmv", self.shrink.grid.0, blocks)?;
        Ok(self)
    }
}

/// The MBGMV shrink's work list for decode requests of ranks `ranks` (per request, in order;
/// 0 for none) and rank columns `max_rank`: one entry `b * groups + g` (`groups =
/// ceil(max_rank / 4)`) for each row group `g < ceil(rank_b / 4)` of each request `b`. Launched
/// over this list, the shrink runs only blocks that have rank rows to compute; over the full
/// grid a batch of mixed ranks launches every request `groups` blocks, and those past its own
/// rank exit at once (about half in a batch of ranks 8..64: at 1.7-2.4 ns each, what made
/// rank-8 steps in a rank-64 executor cost a third more; docs/FIDELITY.md, session 19).
/// Requests whose rank exceeds `max_rank` get no entry (the kernels skip them anyway). Never
/// empty: a batch with no rank rows gets the one entry 0, a block that computes nothing (every
/// rank is 0 or skipped), so that the launch still has a grid.
pub fn shrink_work(ranks: impl IntoIterator<Item = usize>, max_rank: usize) -> Vec<i32> {
    let groups = max_rank.div_ceil(DECODE_SHRINK_ROWS);
    let mut work = Vec::new();
    for (b, rank) in ranks.into_iter().enumerate() {
        if rank > max_rank {
            continue;
        }
        let first = b * groups;
        work.extend((first..first + rank.div_ceil(DECODE_SHRINK_ROWS)).map(|e| e as i32));
    }
    if work.is_empty() {
        work.push(0);
    }
    work
}

/// The order in which the executor lays out a step's decode rows when it groups them by
/// adapter (`GpuExecutor::set_decode_rows_by_adapter`): the indices of `adapters` (each decode
/// row's adapter, in the plan's order; `None` first) sorted by adapter, rows of one adapter in
/// the plan's order. The MBGMV kernels give each row its own blocks, which read that row's
/// adapter rows; in this order the blocks of rows sharing an adapter run next to each other,
/// so the second and later reads of the same rows can come from L2 rather than HBM. Each
/// row's arithmetic does not depend on where it sits, so the order changes no result.
pub fn decode_rows_by_adapter<K: Ord>(adapters: &[K]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..adapters.len()).collect();
    order.sort_by(|&a, &b| adapters[a].cmp(&adapters[b]));
    order
}

/// A shrink grid of `blocks` work-list entries, checked against the full grid's `full` blocks:
/// a list is never empty and never longer than the full grid (each entry is one of its blocks).
fn shrink_work_blocks(kernel: &'static str, full: u32, blocks: usize) -> Result<u32> {
    if blocks == 0 || blocks > full as usize {
        return Err(Error::Launch {
            kernel,
            reason: format!(
                "a shrink work list of {blocks} entries; it holds 1 to {full} (the full grid's blocks)"
            ),
        });
    }
    Ok(blocks as u32)
}

/// Which MBGMV kernels run a decode step.
///
/// Measured on an H200 (L2 flushed before each call; q_proj, GQA k_proj and down_proj shapes;
/// batches 64..256; ranks 16, 64 and mixed): `Split` took less GPU time in 22 of 27 shapes,
/// up to 25% less at batch 256, and `Fused` up to 12% less in the smallest ones (batch 64,
/// out = 1024). `Fused` needs one launch instead of two, so it costs less host time per call.
/// `Split` is the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodePath {
    /// `lora_mbgmv_shrink` then `lora_mbgmv_expand` (any supported device).
    #[default]
    Split,
    /// `lora_mbgmv_fused`: one launch, thread-block clusters (sm_90 and newer only).
    Fused,
}

impl DecodePath {
    /// Whether a device of compute capability `major.minor` has this path's kernels.
    pub fn is_supported(self, major: u32, minor: u32) -> bool {
        match self {
            DecodePath::Split => true,
            DecodePath::Fused => major * 10 + minor >= DECODE_FUSED_MIN_ARCH,
        }
    }
}

/// Which MBGMM kernels run the prompt rows' LoRA.
///
/// `Simt` multiplies in fp32 on the CUDA cores with one shared-memory load per two FMAs,
/// about 8 TFLOP/s on an H200 (the calibration's 4,096-token points); `TensorCore` stages the
/// same tiles for `mma.sync`. `TensorCore` is the default where it exists; `Simt` is kept as
/// the baseline `bench-gpu` measures it against. Both run on every device `Gpu::new` accepts
/// (sm_80 and newer, where `mma.sync` m16n8k16 exists).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillPath {
    /// `lora_mbgmm_shrink_tc` then `lora_mbgmm_expand_tc`.
    #[default]
    TensorCore,
    /// `lora_mbgmm_shrink` then `lora_mbgmm_expand`.
    Simt,
}

impl PrefillPath {
    /// The shrink and expand kernels' names.
    pub fn kernels(self) -> (&'static str, &'static str) {
        match self {
            PrefillPath::TensorCore => ("lora_mbgmm_shrink_tc", "lora_mbgmm_expand_tc"),
            PrefillPath::Simt => ("lora_mbgmm_shrink", "lora_mbgmm_expand"),
        }
    }

    /// (shrink tokens per tile, shrink rank rows per block, expand tokens per tile, expand
    /// outputs per block, threads per block).
    fn tiles(self) -> (usize, usize, usize, usize, u32) {
        match self {
            PrefillPath::TensorCore => (
                PREFILL_TC_TOKENS,
                PREFILL_TC_SHRINK_RANKS,
                PREFILL_TC_TOKENS,
                PREFILL_TC_EXPAND_OUTPUTS,
                PREFILL_TC_THREADS,
            ),
            PrefillPath::Simt => (
                PREFILL_SHRINK_TOKENS,
                PREFILL_SHRINK_RANKS,
                PREFILL_EXPAND_TOKENS,
                PREFILL_EXPAND_OUTPUTS,
                PREFILL_THREADS,
            ),
        }
    }
}

/// What the modules of one multi-module MBGMV launch share: they read the same `x` (so `in`),
/// the same pool layer and the same adapter page lists. Module `m` adds its own `out` (and
/// its own tables); [`LoraMultiShape::module`] gives its [`LoraShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraMultiShape {
    /// `in` of every module.
    pub in_features: usize,
    /// `W`, the pool's page width in elements.
    pub page_width: usize,
    /// Columns of each module's part of the `v` scratch; every rank is at most this.
    pub max_rank: usize,
    /// Pages in the pool: each side of the layer is `[num_pages, W]`.
    pub num_pages: usize,
}

impl LoraMultiShape {
    /// The shape of the module `in -> out_features` (its `slots` follow from `out`).
    pub fn module(&self, out_features: usize) -> LoraShape {
        LoraShape::new(
            self.in_features,
            out_features,
            self.page_width,
            self.max_rank,
            self.num_pages,
        )
    }
}

/// The multi-module MBGMV launches for `n` decode requests and 1..=3 modules of outputs
/// `outs` (e.g. q, k and v of a layer): one shrink and one expand launch for all of them.
/// The `v` scratch is module-major, `[modules, n, max_rank]`: module `m`'s part is laid out as
/// the single-module kernels' `[n, max_rank]`. `n == 0` is valid and launches nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraDecodeMultiPlan {
    /// Module `m`'s shape (`shape.module(outs[m])`), one per module.
    pub modules: Vec<LoraShape>,
    pub n: usize,
    /// `lora_mbgmv_shrink_multi`: block `(b * groups + g, m)` computes rank rows
    /// `[4g, 4g + 4)` of request `b` for module `m` (`groups = ceil(max_rank / 4)`); dynamic
    /// shared memory for 4 x the largest `slots` ints.
    pub shrink: LaunchDims,
    /// `lora_mbgmv_expand_multi`: `tiles_m = ceil(out_m / 256)`, `tiles = sum tiles_m`; block
    /// `b * tiles + t` computes request `b`, tile `t` of the modules' tiles laid end to end
    /// (module 0's first).
    pub expand: LaunchDims,
}

impl LoraDecodeMultiPlan {
    pub fn new(shape: LoraMultiShape, outs: &[usize], n: usize) -> Result<LoraDecodeMultiPlan> {
        const KERNEL: &str = "lora_mbgmv_multi";
        let bad = |reason: String| {
            Err(Error::Launch {
                kernel: KERNEL,
                reason,
            })
        };
        if outs.is_empty() || outs.len() > DECODE_MULTI_MAX_MODULES {
            return bad(format!(
                "{} modules; one launch takes 1 to {DECODE_MULTI_MAX_MODULES}",
                outs.len()
            ));
        }
        let modules: Vec<LoraShape> = outs.iter().map(|&out| shape.module(out)).collect();
        for m in &modules {
            m.validate(KERNEL)?;
            check_rows(KERNEL, "requests", n, m)?;
        }
        // v is [modules, n, max_rank]: its last index must fit in i32.
        if outs
            .len()
            .checked_mul(n)
            .and_then(|e| e.checked_mul(shape.max_rank))
            .is_none_or(|e| e > I32_MAX)
        {
            return bad(format!(
                "a v scratch of {} modules x {n} requests x max rank {} overflows i32 indexing",
                outs.len(),
                shape.max_rank
            ));
        }
        let groups = shape.max_rank.div_ceil(DECODE_SHRINK_ROWS);
        let tiles: usize = outs.iter().map(|o| o.div_ceil(DECODE_EXPAND_TILE)).sum();
        let shrink_blocks = grid_x(KERNEL, n, groups)?;
        let expand_blocks = grid_x(KERNEL, n, tiles)?;
        let max_slots = modules.iter().map(|m| m.slots).max().unwrap_or(0);
        Ok(LoraDecodeMultiPlan {
            n,
            shrink: LaunchDims {
                grid: (shrink_blocks, outs.len() as u32, 1),
                block: (DECODE_SHRINK_THREADS, 1, 1),
                // Each module's validate() checked 4 x its slots ints fit.
                shared_mem: (DECODE_SHRINK_ROWS * max_slots * 4) as u32,
            },
            expand: LaunchDims {
                grid: (expand_blocks, 1, 1),
                block: (DECODE_EXPAND_THREADS, 1, 1),
                shared_mem: 0,
            },
            modules,
        })
    }

    /// Nothing to launch.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Elements of the `v` scratch the launch writes: `modules * n * max_rank`.
    pub fn v_len(&self) -> usize {
        self.modules.len() * self.n * self.modules[0].max_rank
    }

    /// The plan with the shrink launched over a work list of `blocks` entries, one for all
    /// modules (see [`shrink_work`]; give each request its highest rank over the modules).
    pub fn with_shrink_work(mut self, blocks: usize) -> Result<LoraDecodeMultiPlan> {
        self.shrink.grid.0 = shrink_work_blocks("lora_mbgmv_multi", self.shrink.grid.0, blocks)?;
        Ok(self)
    }
}

/// The MBGMM launches for `num_tokens` prefill tokens in `num_segments` segments, the longest
/// `max_segment_len` tokens (it sizes `grid.x` only: the kernels stride over token tiles, so
/// a wrong value costs speed, never tokens), on the kernels of `path`. A plan with no tokens
/// launches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraPrefillPlan {
    pub shape: LoraShape,
    pub num_tokens: usize,
    pub num_segments: usize,
    pub path: PrefillPath,
    /// The shrink: grid (token tiles in the longest segment, ceil(max_rank / rank rows) ×
    /// k_splits, segments); block (x, y, z) computes token tiles `x, x + grid.x, ...` of
    /// segment z for the rank tile `y % tiles` over the reduction chunk `y / tiles` of
    /// `k_chunk` inputs.
    pub shrink: LaunchDims,
    /// Inputs per split-K chunk of the shrink (a multiple of 64), and the number of chunks.
    pub k_chunk: usize,
    pub k_splits: usize,
    /// `lora_mbgmm_reduce` over the `T * max_rank` entries of `v` when `k_splits > 1`.
    pub reduce: Option<LaunchDims>,
    /// The expand: grid (token tiles, ceil(out / outputs per block), segments); block
    /// (x, y, z) computes output tile y of token tiles `x, x + grid.x, ...` of segment z.
    pub expand: LaunchDims,
}

impl LoraPrefillPlan {
    pub fn new(
        shape: LoraShape,
        num_tokens: usize,
        num_segments: usize,
        max_segment_len: usize,
        path: PrefillPath,
    ) -> Result<LoraPrefillPlan> {
        const KERNEL: &str = "lora_mbgmm";
        shape.validate(KERNEL)?;
        check_rows(KERNEL, "tokens", num_tokens, &shape)?;
        let bad = |reason: String| {
            Err(Error::Launch {
                kernel: KERNEL,
                reason,
            })
        };
        if num_segments > MAX_GRID_YZ {
            return bad(format!(
                "{num_segments} segments; one launch takes at most {MAX_GRID_YZ}"
            ));
        }
        if max_segment_len > num_tokens {
            return bad(format!(
                "the longest segment ({max_segment_len} tokens) is longer than the batch ({num_tokens} tokens)"
            ));
        }
        let (shrink_tokens, shrink_ranks, expand_tokens, expand_outputs, threads) = path.tiles();
        let rank_tiles = shape.max_rank.div_ceil(shrink_ranks);
        let out_tiles = shape.out_features.div_ceil(expand_outputs);
        if rank_tiles > MAX_GRID_YZ || out_tiles > MAX_GRID_YZ {
            return bad(format!(
                "{rank_tiles} rank tiles or {out_tiles} output tiles exceed gridDim.y's {MAX_GRID_YZ}"
            ));
        }
        let empty = num_tokens == 0 || num_segments == 0;
        let segments = if empty { 0 } else { num_segments as u32 };
        let shrink_x = max_segment_len.div_ceil(shrink_tokens).max(1) as u32;
        let expand_x = max_segment_len.div_ceil(expand_tokens).max(1) as u32;
        // Split the reduction until the shrink has about two blocks per SM.
        let base_blocks = (shrink_x as usize * rank_tiles * num_segments.max(1)).max(1);
        let k_steps = shape.in_features.div_ceil(PREFILL_SHRINK_K).max(1);
        let wanted = PREFILL_SHRINK_TARGET_BLOCKS
            .div_ceil(base_blocks)
            .clamp(1, PREFILL_SHRINK_MAX_SPLITS)
            .min(k_steps);
        let k_chunk = k_steps.div_ceil(wanted) * PREFILL_SHRINK_K;
        let k_splits = shape.in_features.div_ceil(k_chunk).max(1);
        if rank_tiles * k_splits > MAX_GRID_YZ {
            return bad(format!(
                "{rank_tiles} rank tiles x {k_splits} reduction chunks exceed gridDim.y's {MAX_GRID_YZ}"
            ));
        }
        // The kernels index the scratch (v, then k_splits chunks of partial sums) with i32.
        let scratch = (k_splits + 1) * num_tokens * shape.max_rank;
        if scratch > I32_MAX {
            return bad(format!(
                "{k_splits} reduction chunks of {num_tokens} tokens x {} rank rows ({scratch} elements) overflow i32",
                shape.max_rank
            ));
        }
        let v_len = num_tokens * shape.max_rank;
        let reduce = (k_splits > 1 && !empty).then(|| LaunchDims {
            grid: (v_len.div_ceil(PREFILL_REDUCE_THREADS as usize) as u32, 1, 1),
            block: (PREFILL_REDUCE_THREADS, 1, 1),
            shared_mem: 0,
        });
        Ok(LoraPrefillPlan {
            shape,
            num_tokens,
            num_segments,
            path,
            k_chunk,
            k_splits,
            shrink: LaunchDims {
                grid: (shrink_x, (rank_tiles * k_splits) as u32, segments),
                block: (threads, 1, 1),
                shared_mem: 0,
            },
            reduce,
            expand: LaunchDims {
                grid: (expand_x, out_tiles as u32, segments),
                block: (threads, 1, 1),
                shared_mem: 0,
            },
        })
    }

    /// Nothing to launch.
    pub fn is_empty(&self) -> bool {
        self.num_tokens == 0 || self.num_segments == 0
    }

    /// Elements of the f32 scratch the launch uses: `v` (`[T, max_rank]`, first), then, when
    /// the reduction is split, one `[T, max_rank]` of partial sums per chunk.
    pub fn scratch_len(&self) -> usize {
        let v = self.num_tokens * self.shape.max_rank;
        if self.k_splits > 1 {
            v * (self.k_splits + 1)
        } else {
            v
        }
    }

    /// The most scratch any plan of `tokens` tokens at `max_rank` needs
    /// ([`LoraPrefillPlan::scratch_len`] at the largest split): what a caller allocates once.
    pub fn max_scratch_len(tokens: usize, max_rank: usize) -> usize {
        (PREFILL_SHRINK_MAX_SPLITS + 1) * tokens * max_rank
    }
}

/// `rows` rows of x, y and v must be indexable with i32.
fn check_rows(kernel: &'static str, what: &str, rows: usize, shape: &LoraShape) -> Result<()> {
    let widest = shape
        .in_features
        .max(shape.out_features)
        .max(shape.max_rank);
    if rows.checked_mul(widest).is_none_or(|e| e > I32_MAX) {
        return Err(Error::Launch {
            kernel,
            reason: format!("{rows} {what} x {widest} columns overflows i32 indexing"),
        });
    }
    Ok(())
}

fn grid_x(kernel: &'static str, rows: usize, per_row: usize) -> Result<u32> {
    match rows.checked_mul(per_row) {
        Some(blocks) if blocks <= I32_MAX => Ok(blocks as u32),
        _ => Err(Error::Launch {
            kernel,
            reason: format!("{rows} x {per_row} blocks exceed gridDim.x's {I32_MAX}"),
        }),
    }
}

/// Per-request (decode) or per-segment (prefill) tables, on the host.
#[derive(Clone, Copy, Debug)]
pub struct LoraTables<'a> {
    /// The page lists of this step's adapters, concatenated.
    pub adapter_pages: &'a [i32],
    /// Where the current module's rows start in `adapter_pages`; `-1`: no adapter.
    pub page_offset: &'a [i32],
    /// The adapter's rank (ignored where `page_offset` is `-1`).
    pub rank: &'a [i32],
    /// `lora_alpha / r`.
    pub scale: &'a [f32],
}

impl LoraTables<'_> {
    fn len(&self) -> usize {
        self.page_offset.len()
    }

    /// `(page_offset, rank, scale)` of entry `e`, or `None` for no adapter. Assumes validated.
    fn entry(&self, e: usize) -> Option<(usize, usize, f32)> {
        let po = self.page_offset[e];
        (po >= 0).then(|| (po as usize, self.rank[e] as usize, self.scale[e]))
    }
}

/// Checks tables against the shape: equal lengths; each entry is `-1` or a page list of
/// `rank * slots` pages inside `adapter_pages`, each page in the pool, with `1 <= rank <=
/// max_rank` and a finite scale.
pub fn validate_tables(kernel: &'static str, shape: &LoraShape, t: &LoraTables<'_>) -> Result<()> {
    let bad = |reason: String| Err(Error::Launch { kernel, reason });
    let n = t.len();
    if t.rank.len() != n || t.scale.len() != n {
        return bad(format!(
            "page_offset, rank and scale have {n}, {} and {} entries; they must be equal",
            t.rank.len(),
            t.scale.len()
        ));
    }
    if t.adapter_pages.len() > I32_MAX {
        return bad(format!(
            "{} adapter pages overflow i32 indexing",
            t.adapter_pages.len()
        ));
    }
    for e in 0..n {
        let (po, r, sc) = (t.page_offset[e], t.rank[e], t.scale[e]);
        if po == -1 {
            continue;
        }
        if po < 0 {
            return bad(format!(
                "entry {e}: page_offset {po} is neither -1 nor an offset"
            ));
        }
        if r < 1 || r as usize > shape.max_rank {
            return bad(format!(
                "entry {e}: rank {r} is outside 1..={}",
                shape.max_rank
            ));
        }
        if !sc.is_finite() {
            return bad(format!("entry {e}: scale {sc} is not finite"));
        }
        let (start, len) = (po as usize, r as usize * shape.slots);
        let Some(list) = t.adapter_pages.get(start..start + len) else {
            return bad(format!(
                "entry {e}: rank {r} x {} slots from offset {po} runs past the {} adapter pages",
                shape.slots,
                t.adapter_pages.len()
            ));
        };
        if let Some(&p) = list
            .iter()
            .find(|&&p| p < 0 || p as usize >= shape.num_pages)
        {
            return bad(format!(
                "entry {e}: page {p} is outside the pool of {} pages",
                shape.num_pages
            ));
        }
    }
    Ok(())
}

/// Checks prefill segments: `seg_start` has `segments + 1` entries, starts at 0, never
/// decreases and ends at `num_tokens`. Returns the longest segment's length.
pub fn validate_segments(
    kernel: &'static str,
    seg_start: &[i32],
    num_tokens: usize,
) -> Result<usize> {
    let bad = |reason: String| Err(Error::Launch { kernel, reason });
    let (Some(&first), Some(&last)) = (seg_start.first(), seg_start.last()) else {
        return bad("seg_start is empty; it needs segments + 1 entries".into());
    };
    if first != 0 || last < 0 || last as usize != num_tokens {
        return bad(format!(
            "seg_start runs from {first} to {last}; it must run from 0 to the {num_tokens} tokens"
        ));
    }
    let mut longest = 0;
    for (s, w) in seg_start.windows(2).enumerate() {
        if w[1] < w[0] {
            return bad(format!("segment {s} runs backwards: {} .. {}", w[0], w[1]));
        }
        longest = longest.max((w[1] - w[0]) as usize);
    }
    Ok(longest)
}

/// One page of an adapter module, ready to copy into the pool: `k_row` goes to the K side of
/// `page`, `v_row` to its V side, both `W` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedPage<T> {
    pub page: i32,
    pub k_row: Vec<T>,
    pub v_row: Vec<T>,
}

/// Lays out one module of an adapter in the README layout. `a` is PEFT's `lora_A`
/// (`[rank, in]`, row-major), `b` is `lora_B` (`[out, rank]`), `pages` the module's part of the
/// adapter's page list (`rank * slots` pages: rank row `i`, slot `s` at `i * slots + s`).
/// Returns one entry per page, in `pages` order: slot `s` of row `i` holds `A[i, sW..sW+W]` on
/// the K side and `B[sW..sW+W, i]` (column `i` of `B`, i.e. row `i` of `B^T`) on the V side,
/// zero past the row's end.
pub fn pack_adapter_rows<T: Copy + Default>(
    in_features: usize,
    out_features: usize,
    page_width: usize,
    rank: usize,
    a: &[T],
    b: &[T],
    pages: &[i32],
) -> Result<Vec<PackedPage<T>>> {
    const KERNEL: &str = "pack_adapter_rows";
    let bad = |reason: String| {
        Err(Error::Launch {
            kernel: KERNEL,
            reason,
        })
    };
    if page_width == 0 || rank == 0 {
        return bad(format!(
            "page width {page_width} and rank {rank} must be at least 1"
        ));
    }
    let slots = slots_for(in_features, out_features, page_width);
    if a.len() != rank * in_features || b.len() != out_features * rank {
        return bad(format!(
            "A has {} elements and B {}; rank {rank} with in {in_features} and out {out_features} needs {} and {}",
            a.len(),
            b.len(),
            rank * in_features,
            out_features * rank
        ));
    }
    if pages.len() != rank * slots {
        return bad(format!(
            "{} pages given; rank {rank} x {slots} slots needs {}",
            pages.len(),
            rank * slots
        ));
    }
    let mut packed = Vec::with_capacity(pages.len());
    for i in 0..rank {
        for s in 0..slots {
            let lo = s * page_width;
            let mut k_row = vec![T::default(); page_width];
            let mut v_row = vec![T::default(); page_width];
            for (c, j) in (lo..in_features.min(lo + page_width)).enumerate() {
                k_row[c] = a[i * in_features + j];
            }
            for (c, o) in (lo..out_features.min(lo + page_width)).enumerate() {
                v_row[c] = b[o * rank + i];
            }
            packed.push(PackedPage {
                page: pages[i * slots + s],
                k_row,
                v_row,
            });
        }
    }
    Ok(packed)
}

/// Writes packed pages into a host image of one layer's pool sides (`[num_pages, W]` each).
pub fn write_packed_pages<T: Copy>(
    k_side: &mut [T],
    v_side: &mut [T],
    page_width: usize,
    packed: &[PackedPage<T>],
) -> Result<()> {
    for p in packed {
        let range = usize::try_from(p.page)
            .ok()
            .map(|q| q * page_width..(q + 1) * page_width)
            .filter(|r| r.end <= k_side.len() && r.end <= v_side.len());
        let (Some(range), true) = (
            range,
            p.k_row.len() == page_width && p.v_row.len() == page_width,
        ) else {
            return Err(Error::Launch {
                kernel: "write_packed_pages",
                reason: format!(
                    "page {} with rows of {} and {} elements does not fit pool sides of {} and {} elements (W = {page_width})",
                    p.page,
                    p.k_row.len(),
                    p.v_row.len(),
                    k_side.len(),
                    v_side.len()
                ),
            });
        };
        k_side[range.clone()].copy_from_slice(&p.k_row);
        v_side[range].copy_from_slice(&p.v_row);
    }
    Ok(())
}

/// A host image of one layer's pool: both sides `[num_pages, W]`.
#[derive(Clone, Copy, Debug)]
pub struct HostPool<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
}

/// Element `col` of row `i` of a module stored from `pages[po..]` on `side` (README layout).
fn pool_element<T: Copy + Into<f32>>(
    side: &[T],
    pages: &[i32],
    po: usize,
    i: usize,
    col: usize,
    shape: &LoraShape,
) -> f64 {
    let w = shape.page_width;
    let page = pages[po + i * shape.slots + col / w] as usize;
    f64::from(side[page * w + col % w].into())
}

/// `v[i] = sum_j x[j] * A[i, j]` for one token, in f64.
fn shrink_row<T: Copy + Into<f32>>(
    shape: &LoraShape,
    k: &[T],
    pages: &[i32],
    po: usize,
    r: usize,
    x: &[T],
) -> Vec<f64> {
    (0..r)
        .map(|i| {
            (0..shape.in_features)
                .map(|j| f64::from(x[j].into()) * pool_element(k, pages, po, i, j, shape))
                .sum()
        })
        .collect()
}

/// `y[o] += scale * sum_i v[i] * B^T[i, o]` for one token.
fn expand_row<T: Copy + Into<f32>>(
    shape: &LoraShape,
    v_side: &[T],
    pages: &[i32],
    po: usize,
    scale: f32,
    v: &[f64],
    y: &mut [f32],
) {
    for (o, y_o) in y.iter_mut().enumerate() {
        let dot: f64 = v
            .iter()
            .enumerate()
            .map(|(i, &vi)| vi * pool_element(v_side, pages, po, i, o, shape))
            .sum();
        *y_o = (f64::from(*y_o) + f64::from(scale) * dot) as f32;
    }
}

fn check_len(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::Launch {
        kernel,
        reason: format!("{what} has {got} elements; the shape needs {want}"),
    })
}

fn check_host_buffers<T>(
    kernel: &'static str,
    shape: &LoraShape,
    pool: &HostPool<'_, T>,
    rows: usize,
    x: usize,
    v: usize,
    y: usize,
) -> Result<()> {
    let side = shape.num_pages * shape.page_width;
    check_len(kernel, "the pool's K side", pool.k.len(), side)?;
    check_len(kernel, "the pool's V side", pool.v.len(), side)?;
    check_len(kernel, "x", x, rows * shape.in_features)?;
    check_len(kernel, "v", v, rows * shape.max_rank)?;
    check_len(kernel, "y", y, rows * shape.out_features)
}

/// CPU reference of MBGMV: for each request `b` with an adapter, writes `v[b, i]` for
/// `i < rank[b]` (others untouched) and adds `scale[b] * v[b] · B^T` to `y[b]` (computed in
/// f64). `x: [n, in]`, `v: [n, max_rank]`, `y: [n, out]`, `n = tables.page_offset.len()`.
pub fn lora_decode_ref<T: Copy + Into<f32>>(
    shape: &LoraShape,
    pool: HostPool<'_, T>,
    tables: &LoraTables<'_>,
    x: &[T],
    v: &mut [f32],
    y: &mut [f32],
) -> Result<()> {
    const KERNEL: &str = "lora_decode_ref";
    shape.validate(KERNEL)?;
    validate_tables(KERNEL, shape, tables)?;
    let n = tables.len();
    check_host_buffers(KERNEL, shape, &pool, n, x.len(), v.len(), y.len())?;
    for b in 0..n {
        if let Some(entry) = tables.entry(b) {
            lora_row_ref(shape, &pool, tables.adapter_pages, entry, b, x, v, y);
        }
    }
    Ok(())
}

/// The reference for one row (a decode request or a prompt token) `t` with table entry
/// `(page offset, rank, scale)`: `v[t, ..rank] = x[t] · A^T` and `y[t] += scale * v[t] · B^T`,
/// both computed in f64.
#[allow(clippy::too_many_arguments)]
fn lora_row_ref<T: Copy + Into<f32>>(
    shape: &LoraShape,
    pool: &HostPool<'_, T>,
    pages: &[i32],
    (po, r, scale): (usize, usize, f32),
    t: usize,
    x: &[T],
    v: &mut [f32],
    y: &mut [f32],
) {
    let (inf, outf, mr) = (shape.in_features, shape.out_features, shape.max_rank);
    let vt = shrink_row(shape, pool.k, pages, po, r, &x[t * inf..(t + 1) * inf]);
    for (dst, &src) in v[t * mr..t * mr + r].iter_mut().zip(&vt) {
        *dst = src as f32;
    }
    expand_row(
        shape,
        pool.v,
        pages,
        po,
        scale,
        &vt,
        &mut y[t * outf..(t + 1) * outf],
    );
}

/// One module of [`lora_decode_multi_ref`], on the host.
#[derive(Debug)]
pub struct HostModuleOut<'a> {
    /// Where this module's rows start in `adapter_pages`, per request; `-1`: no adapter.
    pub page_offset: &'a [i32],
    /// Per request, as in [`LoraTables`].
    pub rank: &'a [i32],
    /// Per request, as in [`LoraTables`].
    pub scale: &'a [f32],
    /// `out` of the module.
    pub out_features: usize,
    /// `[n, out]`, added to in place.
    pub y: &'a mut [f32],
}

/// CPU reference of the multi-module MBGMV: [`lora_decode_ref`] for each module `m` with the
/// shared `adapter_pages`, `x: [n, in]` and pool, the module's tables and `y`, and
/// `v[m * n * max_rank..][..n * max_rank]` of the module-major `v: [modules, n, max_rank]`.
/// `n = modules[0].page_offset.len()`; every module's tables must have `n` entries.
pub fn lora_decode_multi_ref<T: Copy + Into<f32>>(
    shape: &LoraMultiShape,
    pool: HostPool<'_, T>,
    adapter_pages: &[i32],
    modules: &mut [HostModuleOut<'_>],
    x: &[T],
    v: &mut [f32],
) -> Result<()> {
    const KERNEL: &str = "lora_decode_multi_ref";
    let n = modules.first().map_or(0, |m| m.page_offset.len());
    let outs: Vec<usize> = modules.iter().map(|m| m.out_features).collect();
    let plan = LoraDecodeMultiPlan::new(*shape, &outs, n)?;
    check_len(KERNEL, "v", v.len(), plan.v_len())?;
    if n == 0 {
        return Ok(());
    }
    for (m, (module, v_m)) in modules
        .iter_mut()
        .zip(v.chunks_mut(n * shape.max_rank))
        .enumerate()
    {
        let tables = LoraTables {
            adapter_pages,
            page_offset: module.page_offset,
            rank: module.rank,
            scale: module.scale,
        };
        check_len(
            KERNEL,
            "a module's page_offset",
            module.page_offset.len(),
            n,
        )?;
        lora_decode_ref(&plan.modules[m], pool, &tables, x, v_m, module.y)?;
    }
    Ok(())
}

/// CPU reference of MBGMM: the MBGMV reference applied to every token of every segment, the
/// tokens `seg_start[s] .. seg_start[s + 1]` using entry `s` of the tables.
/// `x: [T, in]`, `v: [T, max_rank]`, `y: [T, out]`, `T = seg_start.last()`.
pub fn lora_prefill_ref<T: Copy + Into<f32>>(
    shape: &LoraShape,
    pool: HostPool<'_, T>,
    tables: &LoraTables<'_>,
    seg_start: &[i32],
    x: &[T],
    v: &mut [f32],
    y: &mut [f32],
) -> Result<()> {
    const KERNEL: &str = "lora_prefill_ref";
    shape.validate(KERNEL)?;
    validate_tables(KERNEL, shape, tables)?;
    let tokens = x.len() / shape.in_features;
    validate_segments(KERNEL, seg_start, tokens)?;
    check_len(KERNEL, "seg_start", seg_start.len(), tables.len() + 1)?;
    check_host_buffers(KERNEL, shape, &pool, tokens, x.len(), v.len(), y.len())?;
    for s in 0..tables.len() {
        let Some(entry) = tables.entry(s) else {
            continue;
        };
        for t in seg_start[s] as usize..seg_start[s + 1] as usize {
            lora_row_ref(shape, &pool, tables.adapter_pages, entry, t, x, v, y);
        }
    }
    Ok(())
}

/// One line of a GPU self-check.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    pub kernel: String,
    pub max_abs_err: f64,
    /// `||out - ref|| / ||ref||`; for `y`, the norms are of the LoRA delta `ref - y_before`.
    pub rel_err: f64,
    pub passed: bool,
}

// ---------------------------------------------------------------------------------------------
// Random test scenarios: shared by the CPU tests and the GPU self-check.

/// SplitMix64: a small deterministic generator, so tests need no new dependency.
#[cfg(any(test, feature = "cuda"))]
struct SplitMix(u64);

#[cfg(any(test, feature = "cuda"))]
impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), never exactly representable trouble: 24 random bits.
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn f16s(&mut self, len: usize, amplitude: f32) -> Vec<half::f16> {
        (0..len)
            .map(|_| half::f16::from_f32(self.uniform() * amplitude))
            .collect()
    }
}

/// One adapter's module as dense PEFT matrices, and where its rows are in the pool.
#[cfg(any(test, feature = "cuda"))]
struct DenseAdapter {
    rank: usize,
    scale: f32,
    /// `[rank, in]` (read by the CPU tests' dense oracle only).
    #[cfg_attr(not(test), allow(dead_code))]
    a: Vec<half::f16>,
    /// `[out, rank]`.
    #[cfg_attr(not(test), allow(dead_code))]
    b: Vec<half::f16>,
    page_offset: i32,
}

/// A pool holding several adapters of mixed ranks at scattered pages, the rest random junk
/// (so a wrong page index shows), each adapter's page list starting with pages of an earlier
/// module (so `page_offset` is not the list's start).
#[cfg(any(test, feature = "cuda"))]
struct Scenario {
    shape: LoraShape,
    k_pool: Vec<half::f16>,
    v_pool: Vec<half::f16>,
    adapter_pages: Vec<i32>,
    adapters: Vec<DenseAdapter>,
}

#[cfg(any(test, feature = "cuda"))]
impl Scenario {
    fn build(
        rng: &mut SplitMix,
        in_features: usize,
        out_features: usize,
        page_width: usize,
        ranks: &[usize],
    ) -> Result<Scenario> {
        let slots = slots_for(in_features, out_features, page_width);
        let earlier_slots = 2; // the module before this one in the adapter's targets
        let needed: usize = ranks.iter().map(|r| r * (earlier_slots + slots)).sum();
        let num_pages = needed + 37;
        let max_rank = ranks.iter().copied().max().unwrap_or(1);
        let shape = LoraShape::new(in_features, out_features, page_width, max_rank, num_pages);
        let mut order: Vec<i32> = (0..num_pages as i32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut k_pool = rng.f16s(num_pages * page_width, 1.0);
        let mut v_pool = rng.f16s(num_pages * page_width, 1.0);
        let mut adapter_pages = Vec::new();
        let mut adapters = Vec::new();
        let mut next = 0;
        for (k, &r) in ranks.iter().enumerate() {
            let list = &order[next..next + r * (earlier_slots + slots)];
            next += list.len();
            let page_offset = (adapter_pages.len() + r * earlier_slots) as i32;
            adapter_pages.extend_from_slice(list);
            // Entries of size ~sqrt(3/len) keep v and the delta of y near 1, like base outputs.
            let a = rng.f16s(r * in_features, (3.0 / in_features as f32).sqrt());
            let b = rng.f16s(out_features * r, (3.0 / r as f32).sqrt());
            let packed = pack_adapter_rows(
                in_features,
                out_features,
                page_width,
                r,
                &a,
                &b,
                &list[r * earlier_slots..],
            )?;
            write_packed_pages(&mut k_pool, &mut v_pool, page_width, &packed)?;
            adapters.push(DenseAdapter {
                rank: r,
                scale: 0.5 + 0.25 * k as f32,
                a,
                b,
                page_offset,
            });
        }
        Ok(Scenario {
            shape,
            k_pool,
            v_pool,
            adapter_pages,
            adapters,
        })
    }

    /// `(page_offset, rank, scale)` for entries using `which` adapter (`None`: no adapter; its
    /// rank is set to a nonzero value the kernels must ignore).
    fn tables(&self, which: &[Option<usize>]) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        let mut po = Vec::new();
        let mut rank = Vec::new();
        let mut scale = Vec::new();
        for w in which {
            match w {
                Some(k) => {
                    let a = &self.adapters[*k];
                    po.push(a.page_offset);
                    rank.push(a.rank as i32);
                    scale.push(a.scale);
                }
                None => {
                    po.push(-1);
                    rank.push(16);
                    scale.push(1.0);
                }
            }
        }
        (po, rank, scale)
    }

    /// `scale * x A^T B^T` from the dense matrices, in f64: the oracle for the oracle.
    #[cfg(test)]
    fn dense_delta(&self, adapter: usize, x: &[half::f16]) -> Vec<f64> {
        let a = &self.adapters[adapter];
        let (inf, outf, r) = (self.shape.in_features, self.shape.out_features, a.rank);
        let v: Vec<f64> = (0..r)
            .map(|i| {
                (0..inf)
                    .map(|j| f64::from(x[j].to_f32()) * f64::from(a.a[i * inf + j].to_f32()))
                    .sum()
            })
            .collect();
        (0..outf)
            .map(|o| {
                f64::from(a.scale)
                    * (0..r)
                        .map(|i| v[i] * f64::from(a.b[o * r + i].to_f32()))
                        .sum::<f64>()
            })
            .collect()
    }
}

/// Decode requests of the self-check: every rank, repeats, one request without an adapter.
#[cfg(any(test, feature = "cuda"))]
const DECODE_USES: [Option<usize>; 11] = [
    Some(0),
    Some(1),
    Some(2),
    Some(3),
    None,
    Some(1),
    Some(3),
    Some(0),
    Some(2),
    Some(1),
    Some(3),
];
/// Prefill segments of the self-check: lengths (one empty, one of a single token, some
/// longer than a token tile) and adapters.
#[cfg(any(test, feature = "cuda"))]
const PREFILL_SEGMENTS: [(usize, Option<usize>); 7] = [
    (5, Some(2)),
    (1, None),
    (70, Some(3)),
    (0, Some(1)),
    (33, Some(0)),
    (40, Some(1)),
    (9, Some(3)),
];
/// `(in, out, W)` of the self-check: ragged tails (in = 392 is 6 k-tiles and 8 elements,
/// out = 1000 ends mid-tile and mid-page, 8 slots) and a GQA-like k_proj (4 slots, V side of
/// slots 1..3 unused).
#[cfg(any(test, feature = "cuda"))]
const CHECK_GEOMETRIES: [(usize, usize, usize); 2] = [(392, 1000, 128), (2048, 512, 512)];
#[cfg(any(test, feature = "cuda"))]
const CHECK_RANKS: [usize; 4] = [8, 16, 32, 64];

#[cfg(any(test, feature = "cuda"))]
fn segment_starts() -> Vec<i32> {
    let mut starts = vec![0i32];
    for (len, _) in PREFILL_SEGMENTS {
        starts.push(starts.last().copied().unwrap_or(0) + len as i32);
    }
    starts
}

/// One module of an adapter in a [`MultiScenario`]: where its rows start and, for the CPU
/// tests' dense oracle, its PEFT matrices.
#[cfg(any(test, feature = "cuda"))]
struct DenseModule {
    page_offset: i32,
    /// `[rank, in]`.
    #[cfg_attr(not(test), allow(dead_code))]
    a: Vec<half::f16>,
    /// `[out, rank]`.
    #[cfg_attr(not(test), allow(dead_code))]
    b: Vec<half::f16>,
}

/// An adapter of a [`MultiScenario`]: one rank and scale for all its modules; `None` for a
/// module it does not target.
#[cfg(any(test, feature = "cuda"))]
struct MultiAdapter {
    rank: usize,
    scale: f32,
    modules: Vec<Option<DenseModule>>,
}

/// Like [`Scenario`], for modules that share `in` (q, k, v): each adapter's page list holds an
/// earlier module's pages, then the rows of each module it targets, in module order (README:
/// `m_off = r * (sum of slots of earlier modules)`), so every module's `page_offset` differs.
/// Adapter [`MULTI_SKIP`]`.0` does not target module [`MULTI_SKIP`]`.1`.
#[cfg(any(test, feature = "cuda"))]
struct MultiScenario {
    shape: LoraMultiShape,
    outs: Vec<usize>,
    k_pool: Vec<half::f16>,
    v_pool: Vec<half::f16>,
    adapter_pages: Vec<i32>,
    adapters: Vec<MultiAdapter>,
}

/// `(adapter, module)` left out of [`MultiScenario`]'s adapters (an adapter of q and v only).
#[cfg(any(test, feature = "cuda"))]
const MULTI_SKIP: (usize, usize) = (2, 1);

#[cfg(any(test, feature = "cuda"))]
impl MultiScenario {
    fn build(
        rng: &mut SplitMix,
        in_features: usize,
        outs: &[usize],
        page_width: usize,
        ranks: &[usize],
    ) -> Result<MultiScenario> {
        let targets = |k: usize, m: usize| (k, m) != MULTI_SKIP;
        let slots: Vec<usize> = outs
            .iter()
            .map(|&o| slots_for(in_features, o, page_width))
            .collect();
        let earlier_slots = 2; // a module before these in the adapter's targets
        let needed: usize = ranks
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let own: usize = (0..outs.len())
                    .filter(|&m| targets(k, m))
                    .map(|m| slots[m])
                    .sum();
                r * (earlier_slots + own)
            })
            .sum();
        let num_pages = needed + 37;
        let max_rank = ranks.iter().copied().max().unwrap_or(1);
        let shape = LoraMultiShape {
            in_features,
            page_width,
            max_rank,
            num_pages,
        };
        let mut order: Vec<i32> = (0..num_pages as i32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut k_pool = rng.f16s(num_pages * page_width, 1.0);
        let mut v_pool = rng.f16s(num_pages * page_width, 1.0);
        let mut adapter_pages = Vec::new();
        let mut adapters = Vec::new();
        let mut next = 0;
        for (k, &r) in ranks.iter().enumerate() {
            // The earlier module's pages: junk this launch must not read.
            adapter_pages.extend_from_slice(&order[next..next + r * earlier_slots]);
            next += r * earlier_slots;
            let mut modules = Vec::new();
            for (m, &out) in outs.iter().enumerate() {
                if !targets(k, m) {
                    modules.push(None);
                    continue;
                }
                let list = &order[next..next + r * slots[m]];
                next += list.len();
                let page_offset = adapter_pages.len() as i32;
                adapter_pages.extend_from_slice(list);
                let a = rng.f16s(r * in_features, (3.0 / in_features as f32).sqrt());
                let b = rng.f16s(out * r, (3.0 / r as f32).sqrt());
                let packed = pack_adapter_rows(in_features, out, page_width, r, &a, &b, list)?;
                write_packed_pages(&mut k_pool, &mut v_pool, page_width, &packed)?;
                modules.push(Some(DenseModule { page_offset, a, b }));
            }
            adapters.push(MultiAdapter {
                rank: r,
                scale: 0.5 + 0.25 * k as f32,
                modules,
            });
        }
        Ok(MultiScenario {
            shape,
            outs: outs.to_vec(),
            k_pool,
            v_pool,
            adapter_pages,
            adapters,
        })
    }

    /// Per module `(page_offset, rank, scale)` for requests using `which` adapter (`None`: no
    /// adapter, with a nonzero rank the kernels must ignore; a module the adapter does not
    /// target: -1, rank 0 and scale 0, as the executor builds them).
    fn tables(&self, which: &[Option<usize>]) -> Vec<(Vec<i32>, Vec<i32>, Vec<f32>)> {
        (0..self.outs.len())
            .map(|m| {
                let mut po = Vec::new();
                let mut rank = Vec::new();
                let mut scale = Vec::new();
                for w in which {
                    let adapter = w.map(|k| &self.adapters[k]);
                    match adapter.map(|a| (a, a.modules[m].as_ref())) {
                        Some((a, Some(d))) => {
                            po.push(d.page_offset);
                            rank.push(a.rank as i32);
                            scale.push(a.scale);
                        }
                        Some((_, None)) => {
                            po.push(-1);
                            rank.push(0);
                            scale.push(0.0);
                        }
                        None => {
                            po.push(-1);
                            rank.push(16);
                            scale.push(1.0);
                        }
                    }
                }
                (po, rank, scale)
            })
            .collect()
    }

    /// `scale * x A^T B^T` of `adapter`'s `module` from the dense matrices, in f64; `None`
    /// where the adapter does not target the module.
    #[cfg(test)]
    fn dense_delta(&self, adapter: usize, module: usize, x: &[half::f16]) -> Option<Vec<f64>> {
        let a = &self.adapters[adapter];
        let d = a.modules[module].as_ref()?;
        let (inf, outf, r) = (self.shape.in_features, self.outs[module], a.rank);
        let v: Vec<f64> = (0..r)
            .map(|i| {
                (0..inf)
                    .map(|j| f64::from(x[j].to_f32()) * f64::from(d.a[i * inf + j].to_f32()))
                    .sum()
            })
            .collect();
        Some(
            (0..outf)
                .map(|o| {
                    f64::from(a.scale)
                        * (0..r)
                            .map(|i| v[i] * f64::from(d.b[o * r + i].to_f32()))
                            .sum::<f64>()
                })
                .collect(),
        )
    }
}

/// `(in, outs, W)` of the multi-module self-check: GQA q/k/v (k, v 4x narrower than q), three
/// different outs over W = 128 with ragged tails (q 8 slots, k and v 4: slots differ by module),
/// and two modules, the second wider, so unused module slots are exercised.
#[cfg(any(test, feature = "cuda"))]
const MULTI_CHECK_GEOMETRIES: [(usize, &[usize], usize); 3] = [
    (2048, &[2048, 512, 512], 512),
    (392, &[1000, 264, 136], 128),
    (1024, &[256, 1024], 128),
];
/// Mixed ranks of the multi-module self-check: 10 and 36 end inside a 4-row shrink group.
#[cfg(any(test, feature = "cuda"))]
const MULTI_CHECK_RANKS: [usize; 4] = [8, 10, 64, 36];

// ---------------------------------------------------------------------------------------------
// Launches (feature `cuda`).

#[cfg(feature = "cuda")]
pub use launch::{
    check_on_gpu, lora_decode, lora_decode_multi, lora_decode_with, lora_prefill, LoraOut,
    ModuleOut,
};

#[cfg(feature = "cuda")]
mod launch {
    use super::*;
    use crate::gpu::{driver_err, Gpu, KernelArg};
    use cudarc::driver::{
        CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
        PushKernelArg,
    };
    use half::f16;

    /// Where a decode expand puts its result: added to fp16 `y` in place (the in-line path,
    /// rounded once), or written whole into an f32 delta (zeros for a row without an adapter
    /// for the module; no zeroing before) that `split_qkv` / `add_rms_norm` add later with the
    /// same two operations, so that both paths give the same bits.
    pub trait LoraOut: DeviceRepr + cudarc::driver::ValidAsZeroBits {
        /// Whether the expand writes the output whole rather than adding to it: then a module
        /// that no request's adapter targets, which launches nothing, must be zeroed instead.
        const WRITES_WHOLE: bool;
        /// The single-module expand kernel for this output type.
        const EXPAND: &'static str;
        /// The multi-module expand kernel for this output type.
        const EXPAND_MULTI: &'static str;
        /// Whether the fused cluster kernel (which writes fp16 only) can serve it.
        const FUSED: bool;
    }

    impl LoraOut for f16 {
        const WRITES_WHOLE: bool = false;
        const EXPAND: &'static str = "lora_mbgmv_expand";
        const EXPAND_MULTI: &'static str = "lora_mbgmv_expand_multi";
        const FUSED: bool = true;
    }

    impl LoraOut for f32 {
        const WRITES_WHOLE: bool = true;
        const EXPAND: &'static str = "lora_mbgmv_expand_f32";
        const EXPAND_MULTI: &'static str = "lora_mbgmv_expand_multi_f32";
        const FUSED: bool = false;
    }

    /// A view's device address as a kernel parameter (event tracking is off: see `Gpu::new`).
    fn ptr<T>(stream: &CudaStream, view: &CudaView<T>) -> KernelArg {
        KernelArg::Ptr(view.device_ptr(stream).0)
    }

    fn ptr_mut<T>(stream: &CudaStream, view: &mut CudaViewMut<T>) -> KernelArg {
        KernelArg::Ptr(view.device_ptr_mut(stream).0)
    }

    /// A launch error of `Gpu::launch_kernel`, naming the kernel.
    fn relabel(e: Error, kernel: &str) -> Error {
        match e {
            Error::Driver { message, .. } => Error::Driver {
                context: format!("launching {kernel}"),
                message,
            },
            other => other,
        }
    }

    fn config(dims: &LaunchDims) -> LaunchConfig {
        LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_mem,
        }
    }

    fn i32_of(kernel: &'static str, what: &str, value: usize) -> Result<i32> {
        i32::try_from(value).map_err(|_| Error::Launch {
            kernel,
            reason: format!("{what} = {value} overflows i32"),
        })
    }

    /// Lengths only: the 16-byte alignment the kernels need is documented, not checked
    /// (reading a view's address costs two driver calls per buffer while cudarc tracks events,
    /// and a misaligned view faults with `CUDA_ERROR_MISALIGNED_ADDRESS`, never reads or writes
    /// out of bounds).
    #[allow(clippy::too_many_arguments)]
    fn check_device_buffers<Y>(
        kernel: &'static str,
        shape: &LoraShape,
        rows: usize,
        entries: usize,
        bufs: (&CudaView<f16>, &CudaView<f16>, &CudaView<f16>),
        tables: (&CudaView<i32>, &CudaView<f32>),
        v_scratch: &CudaViewMut<f32>,
        y: &CudaViewMut<Y>,
    ) -> Result<()> {
        let (x, k_pool, v_pool) = bufs;
        let (rank, scale) = tables;
        let side = shape.num_pages * shape.page_width;
        check_len(kernel, "the K side of the pool layer", k_pool.len(), side)?;
        check_len(kernel, "the V side of the pool layer", v_pool.len(), side)?;
        check_len(kernel, "x", x.len(), rows * shape.in_features)?;
        check_len(kernel, "y", y.len(), rows * shape.out_features)?;
        check_len(kernel, "rank", rank.len(), entries)?;
        check_len(kernel, "scale", scale.len(), entries)?;
        if v_scratch.len() < rows * shape.max_rank {
            return Err(Error::Launch {
                kernel,
                reason: format!(
                    "v scratch has {} elements; {rows} rows x max rank {} need {}",
                    v_scratch.len(),
                    shape.max_rank,
                    rows * shape.max_rank
                ),
            });
        }
        Ok(())
    }

    /// `(major, minor)` from the `Gpu`'s `sm_XY` architecture name.
    fn compute_capability(gpu: &Gpu) -> (u32, u32) {
        let cc = gpu
            .arch()
            .trim_start_matches("sm_")
            .parse::<u32>()
            .unwrap_or(0);
        (cc / 10, cc % 10)
    }

    /// MBGMV for `n = page_offset.len()` decode requests, on `gpu.stream`:
    /// `v_scratch[b, i] = x[b] · A_b[i]` for `i < rank[b]`, then
    /// `y[b] += scale[b] * v_scratch[b, ..rank[b]] · B_b^T`; requests with `page_offset == -1`
    /// are skipped (their `y` row is untouched). Runs [`DecodePath::Split`].
    ///
    /// `x: [n, in]`, `y: [n, out]` exactly; `v_scratch` at least `[n, max_rank]`;
    /// `k_pool_layer`/`v_pool_layer` the layer's K and V sides (`[num_pages, W]` each);
    /// `adapter_pages`, `page_offset`, `rank`, `scale` as in [`LoraTables`] (validate them on
    /// the host with [`validate_tables`] before uploading). x, y and both pool sides must start
    /// 16-byte aligned: true of every allocation and of views sliced at multiples of 8
    /// elements; a misaligned view makes the kernel fault with `CUDA_ERROR_MISALIGNED_ADDRESS`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_decode(
        gpu: &Gpu,
        x: &CudaView<f16>,
        k_pool_layer: &CudaView<f16>,
        v_pool_layer: &CudaView<f16>,
        adapter_pages: &CudaView<i32>,
        page_offset: &CudaView<i32>,
        rank: &CudaView<i32>,
        scale: &CudaView<f32>,
        v_scratch: &mut CudaViewMut<f32>,
        y: &mut CudaViewMut<f16>,
        shape: LoraShape,
    ) -> Result<()> {
        lora_decode_with(
            gpu,
            &gpu.stream,
            x,
            k_pool_layer,
            v_pool_layer,
            adapter_pages,
            page_offset,
            rank,
            scale,
            v_scratch,
            y,
            None,
            shape,
            DecodePath::Split,
        )
    }

    /// [`lora_decode`] on a chosen stream and path; [`DecodePath::Fused`] on a device older
    /// than sm_90 is a launch error. The caller orders `stream` against the work that writes
    /// `x` and reads `y` (e.g. [`Gpu::fork_lora`] / [`Gpu::join_lora`]). `shrink_work`: the
    /// split path's shrink runs over this list (from [`shrink_work`] on the requests' ranks and
    /// `shape.max_rank`) instead of the full grid; the fused path ignores it.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_decode_with<Y: LoraOut>(
        gpu: &Gpu,
        stream: &CudaStream,
        x: &CudaView<f16>,
        k_pool_layer: &CudaView<f16>,
        v_pool_layer: &CudaView<f16>,
        adapter_pages: &CudaView<i32>,
        page_offset: &CudaView<i32>,
        rank: &CudaView<i32>,
        scale: &CudaView<f32>,
        v_scratch: &mut CudaViewMut<f32>,
        y: &mut CudaViewMut<Y>,
        shrink_work: Option<&CudaView<i32>>,
        shape: LoraShape,
        path: DecodePath,
    ) -> Result<()> {
        const KERNEL: &str = "lora_mbgmv";
        let n = page_offset.len();
        let mut plan = LoraDecodePlan::new(shape, n)?;
        if let (Some(work), false) = (shrink_work, plan.is_empty()) {
            plan = plan.with_shrink_work(work.len())?;
        }
        check_device_buffers(
            KERNEL,
            &shape,
            n,
            n,
            (x, k_pool_layer, v_pool_layer),
            (rank, scale),
            v_scratch,
            y,
        )?;
        if plan.is_empty() {
            return Ok(());
        }
        let n_i = i32_of(KERNEL, "requests", n)?;
        let in_i = shape.in_features as i32;
        let out_i = shape.out_features as i32;
        let max_rank_i = shape.max_rank as i32;
        let slots_i = shape.slots as i32;
        let w_i = shape.page_width as i32;
        let pages_i = shape.num_pages as i32;
        let adapter_pages_i = i32_of(KERNEL, "adapter pages", adapter_pages.len())?;

        if path == DecodePath::Fused {
            if !Y::FUSED {
                return Err(Error::Launch {
                    kernel: KERNEL,
                    reason: "the fused decode writes fp16 outputs only; an f32 delta takes the split path".into(),
                });
            }
            let (major, minor) = compute_capability(gpu);
            if !path.is_supported(major, minor) {
                return Err(Error::Launch {
                    kernel: KERNEL,
                    reason: format!(
                        "the fused decode needs thread-block clusters (sm_90 or newer); this GPU is {}",
                        gpu.arch()
                    ),
                });
            }
            gpu.mark(crate::gpu::Phase::LoraShrink)?;
            let fused = gpu.function(SOURCE, "lora_mbgmv_fused")?;
            let mut b = stream.launch_builder(&fused);
            b.arg(x)
                .arg(k_pool_layer)
                .arg(v_pool_layer)
                .arg(adapter_pages)
                .arg(page_offset)
                .arg(rank)
                .arg(scale)
                .arg(&mut *v_scratch)
                .arg(y)
                .arg(&n_i)
                .arg(&in_i)
                .arg(&out_i)
                .arg(&max_rank_i)
                .arg(&slots_i)
                .arg(&w_i)
                .arg(&pages_i)
                .arg(&adapter_pages_i);
            // SAFETY: the arguments match `lora_mbgmv_fused`'s parameters in order and type. The
            // grid is a multiple of the kernel's compile-time cluster size (8 blocks per
            // request) and the dynamic shared memory is the 2 * max_rank floats it indexes
            // (ranks above max_rank are skipped by the kernel). Shape, lengths and alignment
            // were checked above and table entries are guarded in the kernel, so it reads x,
            // the pool sides and the tables and writes `v_scratch[n, max_rank]` and `y[n, out]`
            // only within the checked lengths.
            unsafe { b.launch(config(&plan.fused)) }
                .map_err(driver_err("launching lora_mbgmv_fused"))?;
            return Ok(());
        }

        gpu.mark(crate::gpu::Phase::LoraShrink)?;

        let shrink = gpu.function(SOURCE, "lora_mbgmv_shrink")?;
        let mut b = stream.launch_builder(&shrink);
        b.arg(x)
            .arg(k_pool_layer)
            .arg(adapter_pages)
            .arg(page_offset)
            .arg(rank)
            .arg(&mut *v_scratch)
            .arg(&n_i)
            .arg(&in_i)
            .arg(&max_rank_i)
            .arg(&slots_i)
            .arg(&w_i)
            .arg(&pages_i)
            .arg(&adapter_pages_i);
        let null: u64 = 0;
        match shrink_work {
            Some(work) => b.arg(work),
            None => b.arg(&null),
        };
        // SAFETY: the arguments match `lora_mbgmv_shrink`'s parameters in order and type (the
        // work list, or a null pointer for the full grid). The plan checked the shape (i32
        // indexing, multiples of 8, dynamic shared memory for 4 x slots ints) and that a work
        // list has one entry per block of the grid; we checked every buffer's length and
        // alignment above; the kernel bounds-checks each work entry, table entry and page
        // index before using it, so it reads `x[n, in]`, the pool sides and the tables and
        // writes `v_scratch[n, max_rank]` only within those lengths.
        unsafe { b.launch(config(&plan.shrink)) }
            .map_err(driver_err("launching lora_mbgmv_shrink"))?;

        gpu.mark(crate::gpu::Phase::LoraExpand)?;

        let expand = gpu.function(SOURCE, Y::EXPAND)?;
        let args = [
            ptr(stream, &v_scratch.as_view()),
            ptr(stream, v_pool_layer),
            ptr(stream, adapter_pages),
            ptr(stream, page_offset),
            ptr(stream, rank),
            ptr(stream, scale),
            ptr_mut(stream, y),
            KernelArg::I32(n_i),
            KernelArg::I32(out_i),
            KernelArg::I32(max_rank_i),
            KernelArg::I32(slots_i),
            KernelArg::I32(w_i),
            KernelArg::I32(pages_i),
            KernelArg::I32(adapter_pages_i),
        ];
        let dims = &plan.expand;
        // SAFETY: as for the shrink: arguments in order and type, lengths and alignment
        // checked, table entries guarded in the kernel. Launched as the shrink's dependent:
        // before its `griddepcontrol.wait` the kernel reads only the tables, the pool's V side
        // and `y` (all complete before the shrink started), so the `v_scratch` rows of the
        // shrink are read, and `y[n, out]` written in bounds, only once the shrink has
        // finished; every thread waits, so the expand cannot finish before the shrink.
        unsafe {
            gpu.launch_kernel(
                stream,
                &expand,
                dims.grid,
                dims.block,
                dims.shared_mem,
                &args,
                true,
            )
        }
        .map_err(|e| relabel(e, Y::EXPAND))?;
        Ok(())
    }

    /// One module of [`lora_decode_multi`]: its own rows of the adapters and its output.
    pub struct ModuleOut<'a, Y = f16> {
        /// `[n]`: where this module's rows start in `adapter_pages`, per request; `-1` where
        /// the request has no adapter or its adapter does not target this module (that row of
        /// `y` is left as it is).
        pub page_offset: CudaView<'a, i32>,
        /// `[n]`: the rank of the request's adapter (ignored where `page_offset` is -1).
        pub rank: CudaView<'a, i32>,
        /// `[n]`: `lora_alpha / r` of the request's adapter.
        pub scale: CudaView<'a, f32>,
        /// `out` of the module.
        pub out_features: usize,
        /// `[n, out]` exactly: fp16, added to in place, or an f32 delta, written whole; 16-byte aligned.
        pub y: CudaViewMut<'a, Y>,
    }

    /// Multi-module MBGMV: [`lora_decode`] for 1..=3 modules that share `x`, the pool layer
    /// and `adapter_pages`, e.g. q, k and v of a layer, in one `lora_mbgmv_shrink_multi` and
    /// one `lora_mbgmv_expand_multi` launch on `stream` instead of two launches per
    /// module. Each module brings its own tables (the executor's per-module `offset`, `rank`,
    /// `scale` as they are: an adapter that does not target a module has -1 there). Same math
    /// and numerics per module `m`: `v_m[b, i] = x[b] · A_{b,m}[i]` (f32) for
    /// `i < rank_m[b]`, then `y_m[b] += scale_m[b] * v_m[b, ..rank_m[b]] · B_{b,m}^T`, rounded
    /// to fp16 once.
    ///
    /// `n = modules[0].page_offset.len()`; `x: [n, in]`; every module's `page_offset`, `rank`,
    /// `scale: [n]` and `y: [n, out_m]`; `v_scratch` at least `[modules, n, max_rank]`
    /// (module-major: module `m`'s part starts at `m * n * max_rank`, so it needs `modules`
    /// times the single-module scratch). Each module must be a valid [`LoraShape`]
    /// (`shape.module(out_m)`), whose `slots` locate its rows; check each module's tables on
    /// the host with [`validate_tables`] and that shape before uploading. Alignment as for
    /// [`lora_decode`]. `shrink_work` as for [`lora_decode_with`], one list for all modules
    /// (each request's highest rank over the modules).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_decode_multi<Y: LoraOut>(
        gpu: &Gpu,
        stream: &CudaStream,
        x: &CudaView<f16>,
        k_pool_layer: &CudaView<f16>,
        v_pool_layer: &CudaView<f16>,
        adapter_pages: &CudaView<i32>,
        modules: &mut [ModuleOut<'_, Y>],
        v_scratch: &mut CudaViewMut<f32>,
        shrink_work: Option<&CudaView<i32>>,
        shape: LoraMultiShape,
    ) -> Result<()> {
        const KERNEL: &str = "lora_mbgmv_multi";
        let n = modules.first().map_or(0, |m| m.page_offset.len());
        let outs: Vec<usize> = modules.iter().map(|m| m.out_features).collect();
        let mut plan = LoraDecodeMultiPlan::new(shape, &outs, n)?;
        if let (Some(work), false) = (shrink_work, plan.is_empty()) {
            plan = plan.with_shrink_work(work.len())?;
        }
        let side = shape.num_pages * shape.page_width;
        check_len(
            KERNEL,
            "the K side of the pool layer",
            k_pool_layer.len(),
            side,
        )?;
        check_len(
            KERNEL,
            "the V side of the pool layer",
            v_pool_layer.len(),
            side,
        )?;
        check_len(KERNEL, "x", x.len(), n * shape.in_features)?;
        for (m, module) in modules.iter().enumerate() {
            check_len(KERNEL, &format!("module {m}'s rank"), module.rank.len(), n)?;
            check_len(
                KERNEL,
                &format!("module {m}'s scale"),
                module.scale.len(),
                n,
            )?;
            check_len(
                KERNEL,
                &format!("module {m}'s page_offset"),
                module.page_offset.len(),
                n,
            )?;
            check_len(
                KERNEL,
                &format!("module {m}'s y"),
                module.y.len(),
                n * module.out_features,
            )?;
        }
        if v_scratch.len() < plan.v_len() {
            return Err(Error::Launch {
                kernel: KERNEL,
                reason: format!(
                    "v scratch has {} elements; {} modules x {n} requests x max rank {} need {}",
                    v_scratch.len(),
                    modules.len(),
                    shape.max_rank,
                    plan.v_len()
                ),
            });
        }
        if plan.is_empty() {
            return Ok(());
        }
        let n_i = i32_of(KERNEL, "requests", n)?;
        let in_i = shape.in_features as i32;
        let max_rank_i = shape.max_rank as i32;
        let w_i = shape.page_width as i32;
        let pages_i = shape.num_pages as i32;
        let adapter_pages_i = i32_of(KERNEL, "adapter pages", adapter_pages.len())?;
        let count_i = modules.len() as i32;
        // Per-module sizes in the kernels' three fixed slots; slots past `count` are never
        // read (0 here, null pointers below).
        let mut slots_i = [0i32; DECODE_MULTI_MAX_MODULES];
        let mut outs_i = [0i32; DECODE_MULTI_MAX_MODULES];
        for (m, s) in plan.modules.iter().enumerate() {
            slots_i[m] = s.slots as i32;
            outs_i[m] = s.out_features as i32;
        }
        let null: u64 = 0;
        let mut offsets: Vec<&CudaView<i32>> = Vec::with_capacity(modules.len());
        let mut ranks: Vec<&CudaView<i32>> = Vec::with_capacity(modules.len());
        let mut scales: Vec<&CudaView<f32>> = Vec::with_capacity(modules.len());
        let mut ys: Vec<&mut CudaViewMut<Y>> = Vec::with_capacity(modules.len());
        for module in modules.iter_mut() {
            offsets.push(&module.page_offset);
            ranks.push(&module.rank);
            scales.push(&module.scale);
            ys.push(&mut module.y);
        }

        gpu.mark(crate::gpu::Phase::LoraShrink)?;

        let shrink = gpu.function(SOURCE, "lora_mbgmv_shrink_multi")?;
        let mut b = stream.launch_builder(&shrink);
        b.arg(x).arg(k_pool_layer).arg(adapter_pages);
        for slot in 0..DECODE_MULTI_MAX_MODULES {
            match offsets.get(slot) {
                Some(&po) => b.arg(po),
                None => b.arg(&null),
            };
        }
        for slot in 0..DECODE_MULTI_MAX_MODULES {
            match ranks.get(slot) {
                Some(&rank) => b.arg(rank),
                None => b.arg(&null),
            };
        }
        b.arg(&mut *v_scratch)
            .arg(&n_i)
            .arg(&in_i)
            .arg(&max_rank_i)
            .arg(&slots_i[0])
            .arg(&slots_i[1])
            .arg(&slots_i[2])
            .arg(&w_i)
            .arg(&pages_i)
            .arg(&adapter_pages_i)
            .arg(&count_i);
        match shrink_work {
            Some(work) => b.arg(work),
            None => b.arg(&null),
        };
        // SAFETY: the arguments match `lora_mbgmv_shrink_multi`'s parameters in order and type
        // (a null u64 for the pointer of each module slot past `count`, which the kernel never
        // reads: grid.y = count; the work list or a null pointer for the full grid, one
        // bounds-checked entry per block of grid.x). The plan checked every module's shape (i32 indexing,
        // multiples of 8, shared memory for 4 x the largest slots ints) and that
        // `modules * n * max_rank` fits in i32; lengths were checked above; the kernel
        // bounds-checks each table entry and page index, so it reads `x[n, in]`, the pool
        // sides and the tables and writes `v_scratch[modules, n, max_rank]` only in bounds.
        unsafe { b.launch(config(&plan.shrink)) }
            .map_err(driver_err("launching lora_mbgmv_shrink_multi"))?;

        gpu.mark(crate::gpu::Phase::LoraExpand)?;

        let expand = gpu.function(SOURCE, Y::EXPAND_MULTI)?;
        let null_arg = KernelArg::Ptr(0);
        let mut args = vec![
            ptr(stream, &v_scratch.as_view()),
            ptr(stream, v_pool_layer),
            ptr(stream, adapter_pages),
        ];
        for slot in 0..DECODE_MULTI_MAX_MODULES {
            args.push(offsets.get(slot).map_or(null_arg, |po| ptr(stream, po)));
        }
        for slot in 0..DECODE_MULTI_MAX_MODULES {
            args.push(ranks.get(slot).map_or(null_arg, |rank| ptr(stream, rank)));
        }
        for slot in 0..DECODE_MULTI_MAX_MODULES {
            args.push(
                scales
                    .get(slot)
                    .map_or(null_arg, |scale| ptr(stream, scale)),
            );
        }
        let mut ys = ys.into_iter();
        for _ in 0..DECODE_MULTI_MAX_MODULES {
            args.push(ys.next().map_or(null_arg, |y| ptr_mut(stream, y)));
        }
        args.extend(
            [
                n_i,
                outs_i[0],
                outs_i[1],
                outs_i[2],
                max_rank_i,
                slots_i[0],
                slots_i[1],
                slots_i[2],
                w_i,
                pages_i,
                adapter_pages_i,
                count_i,
            ]
            .map(KernelArg::I32),
        );
        let dims = &plan.expand;
        // SAFETY: as for the shrink: arguments in order and type (null pointers only in module
        // slots past `count`, whose tiles the grid does not contain), lengths checked, table
        // entries guarded in the kernel. Launched as the shrink's dependent: before its
        // `griddepcontrol.wait` it reads only the tables, the pool's V side and each module's
        // `y` (all complete before the shrink started), so the `v_scratch` rows of the shrink
        // are read, and each module's `y[n, out_m]` written in bounds, only once the shrink
        // has finished; every thread waits, so the expand cannot finish before the shrink.
        unsafe {
            gpu.launch_kernel(
                stream,
                &expand,
                dims.grid,
                dims.block,
                dims.shared_mem,
                &args,
                true,
            )
        }
        .map_err(|e| relabel(e, Y::EXPAND_MULTI))?;
        Ok(())
    }

    /// MBGMM for a prefill batch of `T = x.len() / in` tokens in `S = page_offset.len()`
    /// segments, on `gpu.stream`, with the kernels of `path`: tokens `seg_start[s] ..
    /// seg_start[s + 1]` use entry `s` of the tables, with the same math and buffer rules as
    /// [`lora_decode`] (`x: [T, in]`, `y: [T, out]`). `scratch` holds at least
    /// [`LoraPrefillPlan::scratch_len`] elements (at most
    /// [`LoraPrefillPlan::max_scratch_len`]); `v` (`[T, max_rank]`) is its first part.
    /// `seg_start` has `S + 1` entries (check them on the host with [`validate_segments`],
    /// which also returns `max_segment_len`, the longest segment: it sizes the grid only).
    /// No atomics: the same inputs give the same bits every run.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_prefill(
        gpu: &Gpu,
        x: &CudaView<f16>,
        k_pool_layer: &CudaView<f16>,
        v_pool_layer: &CudaView<f16>,
        adapter_pages: &CudaView<i32>,
        seg_start: &CudaView<i32>,
        page_offset: &CudaView<i32>,
        rank: &CudaView<i32>,
        scale: &CudaView<f32>,
        scratch: &mut CudaViewMut<f32>,
        y: &mut CudaViewMut<f16>,
        shape: LoraShape,
        max_segment_len: usize,
        path: PrefillPath,
    ) -> Result<()> {
        const KERNEL: &str = "lora_mbgmm";
        let segments = page_offset.len();
        let tokens = x.len() / shape.in_features.max(1);
        let plan = LoraPrefillPlan::new(shape, tokens, segments, max_segment_len, path)?;
        let v_len = tokens * shape.max_rank;
        {
            // The common checks see v as the first [T, max_rank] of the scratch.
            let v_part = scratch.slice_mut(..v_len.min(scratch.len()));
            check_device_buffers(
                KERNEL,
                &shape,
                tokens,
                segments,
                (x, k_pool_layer, v_pool_layer),
                (rank, scale),
                &v_part,
                y,
            )?;
        }
        if scratch.len() < plan.scratch_len() {
            return Err(Error::Launch {
                kernel: KERNEL,
                reason: format!(
                    "the scratch holds {} f32, the launch needs {} ({} reduction chunks of {tokens} tokens x {} rank rows, and v)",
                    scratch.len(),
                    plan.scratch_len(),
                    plan.k_splits,
                    shape.max_rank
                ),
            });
        }
        check_len(KERNEL, "seg_start", seg_start.len(), segments + 1)?;
        if plan.is_empty() {
            return Ok(());
        }
        let segments_i = i32_of(KERNEL, "segments", segments)?;
        let tokens_i = i32_of(KERNEL, "tokens", tokens)?;
        let in_i = shape.in_features as i32;
        let out_i = shape.out_features as i32;
        let max_rank_i = shape.max_rank as i32;
        let slots_i = shape.slots as i32;
        let w_i = shape.page_width as i32;
        let pages_i = shape.num_pages as i32;
        let adapter_pages_i = i32_of(KERNEL, "adapter pages", adapter_pages.len())?;
        let k_chunk_i = i32_of(KERNEL, "k_chunk", plan.k_chunk)?;
        let (shrink_name, expand_name) = path.kernels();

        gpu.mark(crate::gpu::Phase::LoraShrink)?;
        {
            // With a split reduction the chunks' partial sums go after v and are reduced into
            // it; with one chunk the shrink writes v directly.
            let (mut v, mut partials) = scratch.split_at_mut(v_len);
            let part = if plan.reduce.is_some() {
                &mut partials
            } else {
                &mut v
            };
            let shrink = gpu.function(SOURCE, shrink_name)?;
            let mut b = gpu.stream.launch_builder(&shrink);
            b.arg(x)
                .arg(k_pool_layer)
                .arg(adapter_pages)
                .arg(seg_start)
                .arg(page_offset)
                .arg(rank)
                .arg(&mut *part)
                .arg(&segments_i)
                .arg(&tokens_i)
                .arg(&in_i)
                .arg(&max_rank_i)
                .arg(&slots_i)
                .arg(&w_i)
                .arg(&pages_i)
                .arg(&adapter_pages_i)
                .arg(&k_chunk_i);
            // SAFETY: the arguments match the shrink's parameters in order and type; lengths,
            // alignment and i32 indexing were checked above (`part` holds k_splits * T *
            // max_rank when split, T * max_rank otherwise); the kernel skips segments whose
            // bounds leave `0..tokens` and table entries or pages out of range, so it writes
            // only `part[c, t, i]` for c < k_splits, t < T, i < max_rank.
            unsafe { b.launch(config(&plan.shrink)) }
                .map_err(driver_err(format!("launching {shrink_name}")))?;
            if let Some(dims) = &plan.reduce {
                let count_i = i32_of(KERNEL, "v entries", v_len)?;
                let splits_i = i32_of(KERNEL, "k_splits", plan.k_splits)?;
                let reduce = gpu.function(SOURCE, "lora_mbgmm_reduce")?;
                let part_read = partials.as_view();
                let mut b = gpu.stream.launch_builder(&reduce);
                b.arg(&part_read).arg(&mut v).arg(&count_i).arg(&splits_i);
                // SAFETY: `lora_mbgmm_reduce(part, v, count, k_splits)` reads
                // `part[0 .. k_splits * count]` (the partials hold that many: scratch_len was
                // checked) and writes `v[0 .. count]`, count = T * max_rank.
                unsafe { b.launch(config(dims)) }
                    .map_err(driver_err("launching lora_mbgmm_reduce"))?;
            }
        }

        gpu.mark(crate::gpu::Phase::LoraExpand)?;

        let expand = gpu.function(SOURCE, expand_name)?;
        let v_read = scratch.slice(..v_len);
        let mut b = gpu.stream.launch_builder(&expand);
        b.arg(&v_read)
            .arg(v_pool_layer)
            .arg(adapter_pages)
            .arg(seg_start)
            .arg(page_offset)
            .arg(rank)
            .arg(scale)
            .arg(y)
            .arg(&segments_i)
            .arg(&tokens_i)
            .arg(&out_i)
            .arg(&max_rank_i)
            .arg(&slots_i)
            .arg(&w_i)
            .arg(&pages_i)
            .arg(&adapter_pages_i);
        // SAFETY: as for the shrink; it reads v's rows below each segment's rank (written by
        // the shrink or the reduce on this stream) and read-modify-writes `y[T, out]` in
        // bounds, 4 or 8 bytes at a time at even offsets of a 16-byte aligned base.
        unsafe { b.launch(config(&plan.expand)) }
            .map_err(driver_err(format!("launching {expand_name}")))?;
        Ok(())
    }

    fn to_f64(v: &[f16]) -> Vec<f64> {
        v.iter().map(|h| f64::from(h.to_f32())).collect()
    }

    fn norm(v: impl Iterator<Item = f64>) -> f64 {
        v.map(|e| e * e).sum::<f64>().sqrt()
    }

    /// Compares `v` on the rows that have an adapter and the columns below their rank.
    fn compare_v(
        kernel: String,
        got: &[f32],
        want: &[f32],
        max_rank: usize,
        ranks: &[usize],
    ) -> CheckResult {
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (row, &r) in ranks.iter().enumerate() {
            g.extend(
                got[row * max_rank..row * max_rank + r]
                    .iter()
                    .map(|&e| f64::from(e)),
            );
            w.extend(
                want[row * max_rank..row * max_rank + r]
                    .iter()
                    .map(|&e| f64::from(e)),
            );
        }
        let max_abs_err = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let rel_err = norm(g.iter().zip(&w).map(|(a, b)| a - b))
            / norm(w.iter().copied()).max(f64::MIN_POSITIVE);
        let finite = g.iter().all(|e| e.is_finite());
        CheckResult {
            kernel,
            max_abs_err,
            rel_err,
            passed: finite && !w.is_empty() && rel_err < 1e-3,
        }
    }

    /// Compares `y` against the reference: the relative error of the LoRA delta, and rows
    /// without an adapter must come back bit-identical.
    fn compare_y(
        kernel: String,
        got: &[f16],
        want: &[f32],
        before: &[f16],
        out: usize,
        touched: &[bool],
    ) -> CheckResult {
        let got64 = to_f64(got);
        let before64 = to_f64(before);
        let want64: Vec<f64> = want.iter().map(|&e| f64::from(e)).collect();
        let max_abs_err = got64
            .iter()
            .zip(&want64)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let rel_err = norm(got64.iter().zip(&want64).map(|(a, b)| a - b))
            / norm(want64.iter().zip(&before64).map(|(a, b)| a - b)).max(f64::MIN_POSITIVE);
        let untouched_kept = touched
            .iter()
            .enumerate()
            .filter(|(_, &t)| !t)
            .all(|(row, _)| got[row * out..(row + 1) * out] == before[row * out..(row + 1) * out]);
        let finite = got64.iter().all(|e| e.is_finite());
        CheckResult {
            kernel,
            max_abs_err,
            rel_err,
            passed: finite && untouched_kept && rel_err < 1e-2,
        }
    }

    /// Runs both kernels on random pools holding adapters of ranks 8, 16, 32 and 64 at
    /// scattered pages (two module geometries), with one request and one segment without an
    /// adapter, and compares with the CPU references. Outputs: `v` (poisoned with NaN first)
    /// and `y` (random base outputs, added to in place). One `CheckResult` per kernel and
    /// geometry.
    pub fn check_on_gpu(gpu: &Gpu) -> Result<Vec<CheckResult>> {
        let mut rng = SplitMix(0x5eed_10a4);
        let mut results = Vec::new();
        for (inf, outf, w) in CHECK_GEOMETRIES {
            let sc = Scenario::build(&mut rng, inf, outf, w, &CHECK_RANKS)?;
            let shape = sc.shape;
            let tag = format!("in={inf} out={outf} W={w}");
            let copy = |what: &str| driver_err(format!("lora self-check: copying {what}"));
            let k_pool = gpu
                .stream
                .clone_htod(&sc.k_pool)
                .map_err(copy("the K side"))?;
            let v_pool = gpu
                .stream
                .clone_htod(&sc.v_pool)
                .map_err(copy("the V side"))?;
            let pages = gpu
                .stream
                .clone_htod(&sc.adapter_pages)
                .map_err(copy("adapter pages"))?;
            let host_pool = HostPool {
                k: &sc.k_pool,
                v: &sc.v_pool,
            };

            // Decode.
            let n = DECODE_USES.len();
            let (po, rank, scale) = sc.tables(&DECODE_USES);
            let tables = LoraTables {
                adapter_pages: &sc.adapter_pages,
                page_offset: &po,
                rank: &rank,
                scale: &scale,
            };
            validate_tables("lora self-check", &shape, &tables)?;
            let x = rng.f16s(n * inf, 1.0);
            let y0 = rng.f16s(n * outf, 1.0);
            let poison = vec![f32::NAN; n * shape.max_rank];
            let mut v_ref = poison.clone();
            let mut y_ref: Vec<f32> = y0.iter().map(|h| h.to_f32()).collect();
            lora_decode_ref(&shape, host_pool, &tables, &x, &mut v_ref, &mut y_ref)?;
            let x_d = gpu.stream.clone_htod(&x).map_err(copy("x"))?;
            let po_d = gpu.stream.clone_htod(&po).map_err(copy("page_offset"))?;
            let rank_d = gpu.stream.clone_htod(&rank).map_err(copy("rank"))?;
            let scale_d = gpu.stream.clone_htod(&scale).map_err(copy("scale"))?;
            let ranks: Vec<usize> = DECODE_USES
                .iter()
                .map(|u| u.map_or(0, |k| sc.adapters[k].rank))
                .collect();
            let touched: Vec<bool> = DECODE_USES.iter().map(Option::is_some).collect();
            // The split path's shrink over a work list as the executor builds it, plus two
            // entries out of range that must compute nothing.
            let mut work = shrink_work(ranks.iter().copied(), shape.max_rank);
            work.extend([-1, i32::MAX]);
            let work_d = gpu.stream.clone_htod(&work).map_err(copy("shrink work"))?;
            // Both paths where the device has both, so the fallback stays tested; the split
            // one over the full grid and over the work list.
            let (major, minor) = compute_capability(gpu);
            let paths = [
                (DecodePath::Split, false),
                (DecodePath::Split, true),
                (DecodePath::Fused, false),
            ];
            let paths = paths
                .into_iter()
                .filter(|(p, _)| p.is_supported(major, minor));
            let mut y_split_listed = None;
            for (path, listed) in paths {
                let mut v_d = gpu.stream.clone_htod(&poison).map_err(copy("v"))?;
                let mut y_d = gpu.stream.clone_htod(&y0).map_err(copy("y"))?;
                let work_view = work_d.as_view();
                lora_decode_with(
                    gpu,
                    &gpu.stream,
                    &x_d.as_view(),
                    &k_pool.as_view(),
                    &v_pool.as_view(),
                    &pages.as_view(),
                    &po_d.as_view(),
                    &rank_d.as_view(),
                    &scale_d.as_view(),
                    &mut v_d.as_view_mut(),
                    &mut y_d.as_view_mut(),
                    listed.then_some(&work_view),
                    shape,
                    path,
                )?;
                let v_got = gpu.stream.clone_dtoh(&v_d).map_err(copy("v back"))?;
                let y_got = gpu.stream.clone_dtoh(&y_d).map_err(copy("y back"))?;
                let (v_name, y_name) = match (path, listed) {
                    (DecodePath::Split, false) => ("lora_mbgmv_shrink", "lora_mbgmv_expand"),
                    (DecodePath::Split, true) => (
                        "lora_mbgmv_shrink, work list",
                        "lora_mbgmv_expand, after the work list",
                    ),
                    (DecodePath::Fused, _) => ("lora_mbgmv_fused (v)", "lora_mbgmv_fused (y)"),
                };
                results.push(compare_v(
                    format!("{v_name} ({tag})"),
                    &v_got,
                    &v_ref,
                    shape.max_rank,
                    &ranks,
                ));
                results.push(compare_y(
                    format!("{y_name} ({tag})"),
                    &y_got,
                    &y_ref,
                    &y0,
                    outf,
                    &touched,
                ));
                if (path, listed) == (DecodePath::Split, true) {
                    y_split_listed = Some(y_got);
                }
            }
            // The same into an f32 delta (the executor's o delta on the LoRA stream), poisoned
            // with NaN before: the expand must write it whole (zeros for the request without
            // an adapter), and y0 + delta must be the in-place result's very bits.
            if let Some(in_place) = y_split_listed {
                let mut v_d = gpu.stream.clone_htod(&poison).map_err(copy("v"))?;
                let mut delta_d = gpu
                    .stream
                    .clone_htod(&vec![f32::NAN; n * outf])
                    .map_err(copy("delta"))?;
                let work_view = work_d.as_view();
                lora_decode_with(
                    gpu,
                    &gpu.stream,
                    &x_d.as_view(),
                    &k_pool.as_view(),
                    &v_pool.as_view(),
                    &pages.as_view(),
                    &po_d.as_view(),
                    &rank_d.as_view(),
                    &scale_d.as_view(),
                    &mut v_d.as_view_mut(),
                    &mut delta_d.as_view_mut(),
                    Some(&work_view),
                    shape,
                    DecodePath::Split,
                )?;
                let delta = gpu
                    .stream
                    .clone_dtoh(&delta_d)
                    .map_err(copy("delta back"))?;
                results.push(delta_matches_in_place(
                    format!("lora_mbgmv_expand_f32: y0 + delta == in place, bit for bit ({tag}"),
                    &y0,
                    &delta,
                    &in_place,
                ));
            }

            // Prefill.
            let seg_start = segment_starts();
            let uses: Vec<Option<usize>> = PREFILL_SEGMENTS.iter().map(|&(_, u)| u).collect();
            let (po, rank, scale) = sc.tables(&uses);
            let tables = LoraTables {
                adapter_pages: &sc.adapter_pages,
                page_offset: &po,
                rank: &rank,
                scale: &scale,
            };
            validate_tables("lora self-check", &shape, &tables)?;
            let tokens = *seg_start.last().unwrap_or(&0) as usize;
            let longest = validate_segments("lora self-check", &seg_start, tokens)?;
            let x = rng.f16s(tokens * inf, 1.0);
            let y0 = rng.f16s(tokens * outf, 1.0);
            let v_len = tokens * shape.max_rank;
            let mut v_ref = vec![f32::NAN; v_len];
            let mut y_ref: Vec<f32> = y0.iter().map(|h| h.to_f32()).collect();
            lora_prefill_ref(
                &shape, host_pool, &tables, &seg_start, &x, &mut v_ref, &mut y_ref,
            )?;
            let x_d = gpu.stream.clone_htod(&x).map_err(copy("x"))?;
            let seg_d = gpu
                .stream
                .clone_htod(&seg_start)
                .map_err(copy("seg_start"))?;
            let po_d = gpu.stream.clone_htod(&po).map_err(copy("page_offset"))?;
            let rank_d = gpu.stream.clone_htod(&rank).map_err(copy("rank"))?;
            let scale_d = gpu.stream.clone_htod(&scale).map_err(copy("scale"))?;
            let mut ranks = Vec::new();
            let mut touched = Vec::new();
            for &(len, u) in &PREFILL_SEGMENTS {
                ranks.extend(std::iter::repeat_n(
                    u.map_or(0, |k| sc.adapters[k].rank),
                    len,
                ));
                touched.extend(std::iter::repeat_n(u.is_some(), len));
            }
            for path in [PrefillPath::TensorCore, PrefillPath::Simt] {
                // NaN everywhere the kernels should not read: a skipped entry that leaked
                // into y would show.
                let poison =
                    vec![f32::NAN; LoraPrefillPlan::max_scratch_len(tokens, shape.max_rank)];
                let mut scratch_d = gpu.stream.clone_htod(&poison).map_err(copy("scratch"))?;
                // y0 through this path's kernels: y back, and the scratch (v first).
                let run = |scratch_d: &mut cudarc::driver::CudaSlice<f32>| -> Result<Vec<f16>> {
                    let mut y_d = gpu.stream.clone_htod(&y0).map_err(copy("y"))?;
                    lora_prefill(
                        gpu,
                        &x_d.as_view(),
                        &k_pool.as_view(),
                        &v_pool.as_view(),
                        &pages.as_view(),
                        &seg_d.as_view(),
                        &po_d.as_view(),
                        &rank_d.as_view(),
                        &scale_d.as_view(),
                        &mut scratch_d.as_view_mut(),
                        &mut y_d.as_view_mut(),
                        shape,
                        longest,
                        path,
                    )?;
                    gpu.stream.clone_dtoh(&y_d).map_err(copy("y back"))
                };
                let y_got = run(&mut scratch_d)?;
                let v_got = gpu
                    .stream
                    .clone_dtoh(&scratch_d.slice(..v_len))
                    .map_err(copy("v back"))?;
                let (v_name, y_name) = path.kernels();
                // Split-K partial sums are stored and reduced in order, not added by atomics:
                // a second run on the same inputs must give the same bits.
                let y_again = run(&mut scratch_d)?;
                let differ = y_got
                    .iter()
                    .zip(&y_again)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                results.push(CheckResult {
                    kernel: format!("{y_name} twice, same bits ({tag}): {differ} differ"),
                    max_abs_err: 0.0,
                    rel_err: 0.0,
                    passed: differ == 0,
                });
                results.push(compare_v(
                    format!("{v_name} ({tag})"),
                    &v_got,
                    &v_ref,
                    shape.max_rank,
                    &ranks,
                ));
                results.push(compare_y(
                    format!("{y_name} ({tag})"),
                    &y_got,
                    &y_ref,
                    &y0,
                    outf,
                    &touched,
                ));
            }
        }
        results.extend(check_multi_on_gpu(gpu, &mut rng)?);
        Ok(results)
    }

    /// Adds an f32 `delta` to `y0` the way `split_qkv` and `add_rms_norm` do (one f32 add,
    /// rounded once) and counts the values whose bits differ from the expand's in-place result.
    /// `name` is completed with the count and a closing parenthesis.
    fn delta_matches_in_place(
        name: String,
        y0: &[f16],
        delta: &[f32],
        in_place: &[f16],
    ) -> CheckResult {
        let mut differing = 0usize;
        let mut max_abs = 0f64;
        for ((&before, &d), &want) in y0.iter().zip(delta).zip(in_place) {
            let added = f16::from_f32(before.to_f32() + d);
            if added.to_bits() != want.to_bits() {
                differing += 1;
                let err = (added.to_f64() - want.to_f64()).abs();
                // A NaN (a value the expand left unwritten) counts as an infinite error.
                max_abs = max_abs.max(if err.is_nan() { f64::INFINITY } else { err });
            }
        }
        CheckResult {
            kernel: format!("{name}; {differing} differ)"),
            max_abs_err: max_abs,
            rel_err: differing as f64 / delta.len().max(1) as f64,
            passed: differing == 0 && delta.len() == in_place.len(),
        }
    }

    /// The multi-module MBGMV on [`MULTI_CHECK_GEOMETRIES`]: adapters of ranks
    /// [`MULTI_CHECK_RANKS`] with one that does not target module 1 and one request without an
    /// adapter, against [`lora_decode_multi_ref`]. One `v` and one `y` row per module and
    /// geometry.
    fn check_multi_on_gpu(gpu: &Gpu, rng: &mut SplitMix) -> Result<Vec<CheckResult>> {
        let mut results = Vec::new();
        let copy = |what: &str| driver_err(format!("lora multi self-check: copying {what}"));
        for (inf, outs, w) in MULTI_CHECK_GEOMETRIES {
            let sc = MultiScenario::build(rng, inf, outs, w, &MULTI_CHECK_RANKS)?;
            let shape = sc.shape;
            let count = outs.len();
            let n = DECODE_USES.len();
            let tables = sc.tables(&DECODE_USES);
            for (m, (po, rank, scale)) in tables.iter().enumerate() {
                let t = LoraTables {
                    adapter_pages: &sc.adapter_pages,
                    page_offset: po,
                    rank,
                    scale,
                };
                validate_tables("lora multi self-check", &shape.module(outs[m]), &t)?;
            }
            let x = rng.f16s(n * inf, 1.0);
            let y0: Vec<Vec<f16>> = outs.iter().map(|&o| rng.f16s(n * o, 1.0)).collect();
            let poison = vec![f32::NAN; count * n * shape.max_rank];
            let mut v_ref = poison.clone();
            let mut y_ref: Vec<Vec<f32>> = y0
                .iter()
                .map(|y| y.iter().map(|h| h.to_f32()).collect())
                .collect();
            {
                let mut host: Vec<HostModuleOut<'_>> = y_ref
                    .iter_mut()
                    .zip(&tables)
                    .zip(outs)
                    .map(|((y, (po, rank, scale)), &out)| HostModuleOut {
                        page_offset: po,
                        rank,
                        scale,
                        out_features: out,
                        y,
                    })
                    .collect();
                lora_decode_multi_ref(
                    &shape,
                    HostPool {
                        k: &sc.k_pool,
                        v: &sc.v_pool,
                    },
                    &sc.adapter_pages,
                    &mut host,
                    &x,
                    &mut v_ref,
                )?;
            }

            let k_pool = gpu
                .stream
                .clone_htod(&sc.k_pool)
                .map_err(copy("the K side"))?;
            let v_pool = gpu
                .stream
                .clone_htod(&sc.v_pool)
                .map_err(copy("the V side"))?;
            let pages = gpu
                .stream
                .clone_htod(&sc.adapter_pages)
                .map_err(copy("adapter pages"))?;
            let x_d = gpu.stream.clone_htod(&x).map_err(copy("x"))?;
            let mut tables_d = Vec::new();
            for (po, rank, scale) in &tables {
                tables_d.push((
                    gpu.stream.clone_htod(po).map_err(copy("page_offset"))?,
                    gpu.stream.clone_htod(rank).map_err(copy("rank"))?,
                    gpu.stream.clone_htod(scale).map_err(copy("scale"))?,
                ));
            }
            // The shrink's work list as the executor builds it: each request's highest rank
            // over the modules.
            let highest: Vec<usize> = (0..n)
                .map(|b| {
                    tables
                        .iter()
                        .map(|(po, rank, _)| if po[b] < 0 { 0 } else { rank[b] as usize })
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let work_d = gpu
                .stream
                .clone_htod(&shrink_work(highest, shape.max_rank))
                .map_err(copy("shrink work"))?;
            let work_view = work_d.as_view();
            // One run of the fused kernels on fresh copies of `y0` and a poisoned `v`: (`v`,
            // every module's `y`) read back. On the LoRA stream it is forked and joined as the
            // executor runs it, so the check also covers that ordering (the inputs were
            // written on the compute stream); there its shrink runs over the work list, as in
            // the executor, and on the compute stream over the full grid.
            let run = |on_lora_stream: bool| -> Result<(Vec<f32>, Vec<Vec<f16>>)> {
                let mut y_d = Vec::new();
                for y0_m in &y0 {
                    y_d.push(gpu.stream.clone_htod(y0_m).map_err(copy("y"))?);
                }
                let mut v_d = gpu.stream.clone_htod(&poison).map_err(copy("v"))?;
                let mut modules: Vec<ModuleOut<'_>> = tables_d
                    .iter()
                    .zip(y_d.iter_mut())
                    .zip(outs)
                    .map(|(((po, rank, scale), y_m), &out)| ModuleOut {
                        page_offset: po.as_view(),
                        rank: rank.as_view(),
                        scale: scale.as_view(),
                        out_features: out,
                        y: y_m.as_view_mut(),
                    })
                    .collect();
                let stream = if on_lora_stream {
                    gpu.fork_lora()?;
                    &gpu.lora_stream
                } else {
                    &gpu.stream
                };
                lora_decode_multi(
                    gpu,
                    stream,
                    &x_d.as_view(),
                    &k_pool.as_view(),
                    &v_pool.as_view(),
                    &pages.as_view(),
                    &mut modules,
                    &mut v_d.as_view_mut(),
                    on_lora_stream.then_some(&work_view),
                    shape,
                )?;
                if on_lora_stream {
                    gpu.join_lora()?;
                }
                drop(modules);
                let v_back = gpu.stream.clone_dtoh(&v_d).map_err(copy("v back"))?;
                let mut y_back = Vec::new();
                for y_m in &y_d {
                    y_back.push(gpu.stream.clone_dtoh(y_m).map_err(copy("y back"))?);
                }
                Ok((v_back, y_back))
            };
            let (v_got, y_got_all) = run(true)?;
            let tag = format!("in={inf} outs={outs:?} W={w}");
            let mut y_in_place: Vec<Vec<f16>> = Vec::with_capacity(count);
            let mr = shape.max_rank;
            for m in 0..count {
                let y_got = y_got_all[m].clone();
                let (po, rank, _) = &tables[m];
                let ranks: Vec<usize> = po
                    .iter()
                    .zip(rank)
                    .map(|(&p, &r)| if p < 0 { 0 } else { r as usize })
                    .collect();
                let touched: Vec<bool> = po.iter().map(|&p| p >= 0).collect();
                let part = m * n * mr..(m + 1) * n * mr;
                results.push(compare_v(
                    format!("lora_mbgmv_shrink_multi module {m} ({tag})"),
                    &v_got[part.clone()],
                    &v_ref[part],
                    mr,
                    &ranks,
                ));
                results.push(compare_y(
                    format!("lora_mbgmv_expand_multi module {m} ({tag})"),
                    &y_got,
                    &y_ref[m],
                    &y0[m],
                    outs[m],
                    &touched,
                ));
                y_in_place.push(y_got);
            }

            // The same launched the classic way (the expand after the shrink, not as its
            // programmatic dependent) and over the full grid: the arithmetic is the same, so
            // must be the bits. On a device without dependent launches both runs are classic.
            let was_dependent = gpu.dependent_launch_enabled();
            gpu.set_dependent_launch(!was_dependent);
            let classic = run(false);
            gpu.set_dependent_launch(was_dependent);
            let (v_classic, y_classic) = classic?;
            let same_v = v_classic
                .iter()
                .zip(&v_got)
                .filter(|(a, b)| {
                    a.is_nan() == b.is_nan() && (a.is_nan() || a.to_bits() == b.to_bits())
                })
                .count()
                == v_got.len();
            for m in 0..count {
                let differing = y_classic[m]
                    .iter()
                    .zip(&y_in_place[m])
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                let passed = differing == 0 && same_v;
                results.push(CheckResult {
                    kernel: format!(
                        "lora_mbgmv_expand_multi module {m}: dependent launch over the work list == classic over the full grid, bit for bit ({tag}; {differing} differ{})",
                        if same_v { "" } else { ", v differs" }
                    ),
                    max_abs_err: 0.0,
                    rel_err: differing as f64 / y_in_place[m].len().max(1) as f64,
                    passed,
                });
            }

            // The same into f32 deltas (the executor's LoRA stream), poisoned with NaN before:
            // the expand must write them whole (zeros for a request without an adapter for the
            // module), and adding each delta to y0 the way split_qkv and add_rms_norm do must
            // give the in-place result's very bits.
            let mut deltas_d = Vec::new();
            for &out in outs {
                deltas_d.push(
                    gpu.stream
                        .clone_htod(&vec![f32::NAN; n * out])
                        .map_err(copy("delta"))?,
                );
            }
            let mut v_d = gpu.stream.clone_htod(&poison).map_err(copy("v"))?;
            {
                let mut modules: Vec<ModuleOut<'_, f32>> = tables_d
                    .iter()
                    .zip(deltas_d.iter_mut())
                    .zip(outs)
                    .map(|(((po, rank, scale), d_m), &out)| ModuleOut {
                        page_offset: po.as_view(),
                        rank: rank.as_view(),
                        scale: scale.as_view(),
                        out_features: out,
                        y: d_m.as_view_mut(),
                    })
                    .collect();
                gpu.fork_lora()?;
                lora_decode_multi(
                    gpu,
                    &gpu.lora_stream,
                    &x_d.as_view(),
                    &k_pool.as_view(),
                    &v_pool.as_view(),
                    &pages.as_view(),
                    &mut modules,
                    &mut v_d.as_view_mut(),
                    Some(&work_view),
                    shape,
                )?;
                gpu.join_lora()?;
            }
            for m in 0..count {
                let delta = gpu
                    .stream
                    .clone_dtoh(&deltas_d[m])
                    .map_err(copy("delta back"))?;
                results.push(delta_matches_in_place(
                    format!(
                        "lora_mbgmv_expand_multi_f32 module {m}: y0 + delta == in place, bit for bit ({tag}"
                    ),
                    &y0[m],
                    &delta,
                    &y_in_place[m],
                ));
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> LoraShape {
        LoraShape::new(4096, 1024, 1024, 64, 10_000)
    }

    fn launch_reason(e: Error) -> String {
        match e {
            Error::Launch { reason, .. } => reason,
            other => panic!("expected a launch error, got {other}"),
        }
    }

    /// The GPU self-check; `cargo test -p slora-kernels --features cuda -- --ignored` on a
    /// machine with an NVIDIA GPU (sm_80+, NVRTC and cuBLAS libraries) runs it.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_self_check_passes() {
        let Some(gpu) = crate::gpu::gpu_for_test("gpu_self_check_passes") else {
            return;
        };
        let results = check_on_gpu(&gpu).expect("the self-check runs");
        for r in &results {
            println!(
                "{:<48} max_abs_err {:.3e} rel_err {:.3e} {}",
                r.kernel,
                r.max_abs_err,
                r.rel_err,
                if r.passed { "ok" } else { "FAILED" }
            );
        }
        assert!(results.iter().all(|r| r.passed), "{results:#?}");
    }

    #[test]
    fn rust_constants_match_the_cuda_defines() {
        let define = |name: &str| -> usize {
            let line = SOURCE
                .code
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("no #define {name}"));
            let value = line.split_whitespace().nth(2).unwrap();
            value
                .parse()
                .unwrap_or_else(|_| panic!("#define {name} {value} is not a number"))
        };
        assert_eq!(define("LORA_VEC"), VEC);
        assert_eq!(define("DS_ROWS"), DECODE_SHRINK_ROWS);
        assert_eq!(define("DS_THREADS"), DECODE_SHRINK_THREADS as usize);
        assert_eq!(32 * define("DE_WARPS"), DECODE_EXPAND_THREADS as usize);
        assert_eq!(define("LORA_VEC") * 32, DECODE_EXPAND_TILE); // DE_TILE = 32 * LORA_VEC
        assert_eq!(define("DF_CLUSTER"), DECODE_FUSED_CLUSTER);
        assert_eq!(32 * define("DF_WARPS"), DECODE_FUSED_THREADS as usize);
        assert_eq!(define("PS_TM"), PREFILL_SHRINK_TOKENS);
        assert_eq!(define("PS_TR"), PREFILL_SHRINK_RANKS);
        assert_eq!(define("PS_THREADS"), PREFILL_THREADS as usize);
        assert_eq!(define("PE_TM"), PREFILL_EXPAND_TOKENS);
        assert_eq!(define("PE_TN"), PREFILL_EXPAND_OUTPUTS);
        assert_eq!(define("PE_THREADS"), PREFILL_THREADS as usize);
        assert_eq!(define("TS_TM"), PREFILL_TC_TOKENS);
        assert_eq!(define("TE_TM"), PREFILL_TC_TOKENS);
        assert_eq!(define("TS_TR"), PREFILL_TC_SHRINK_RANKS);
        assert_eq!(define("TE_TN"), PREFILL_TC_EXPAND_OUTPUTS);
        assert_eq!(define("TS_THREADS"), PREFILL_TC_THREADS as usize);
        assert_eq!(define("TE_THREADS"), PREFILL_TC_THREADS as usize);
        assert_eq!(define("TS_TK"), PREFILL_SHRINK_K); // split-K chunks are whole stages
        assert!(SOURCE
            .code
            .contains("__launch_bounds__(256)\nlora_mbgmm_reduce("));
        assert_eq!(PREFILL_REDUCE_THREADS, 256);
        assert_eq!(define("LORA_MAX_MODULES"), DECODE_MULTI_MAX_MODULES);
        for kernel in [
            "lora_mbgmv_fused",
            "lora_mbgmv_shrink",
            "lora_mbgmv_expand",
            "lora_mbgmv_shrink_multi",
            "lora_mbgmv_expand_multi",
            "lora_mbgmm_shrink",
            "lora_mbgmm_expand",
            "lora_mbgmm_shrink_tc",
            "lora_mbgmm_expand_tc",
            "lora_mbgmm_reduce",
        ] {
            assert!(
                SOURCE.code.contains(&format!("\n{kernel}(")),
                "{kernel} missing"
            );
        }
    }

    #[test]
    fn slots_follow_the_readme() {
        assert_eq!(slots_for(4096, 4096, 4096), 1); // Llama-7B q_proj
        assert_eq!(slots_for(4096, 1024, 1024), 4); // Llama-3-8B k_proj
        assert_eq!(slots_for(14336, 4096, 1024), 14); // Llama-3-8B down_proj
        assert_eq!(slots_for(11008, 4096, 4096), 3);
        assert_eq!(shape().slots, 4);
    }

    #[test]
    fn decode_plan_covers_ranks_and_outputs() {
        let plan = LoraDecodePlan::new(shape(), 64).unwrap();
        // 64 requests x ceil(64 / 4) row groups; 64 x ceil(1024 / 256) output tiles.
        assert_eq!(plan.shrink.grid, (64 * 16, 1, 1));
        assert_eq!(plan.shrink.block, (256, 1, 1));
        assert_eq!(plan.shrink.shared_mem, 4 * 4 * 4);
        assert_eq!(plan.expand.grid, (64 * 4, 1, 1));
        assert_eq!(plan.expand.block, (128, 1, 1));
        // One cluster of 8 blocks per request; partial and full v in shared memory.
        assert_eq!(plan.fused.grid, (64 * 8, 1, 1));
        assert_eq!(plan.fused.block, (256, 1, 1));
        assert_eq!(plan.fused.shared_mem, 2 * 64 * 4);
        assert!(!plan.is_empty());
        // A ragged out and max rank round up.
        let plan = LoraDecodePlan::new(LoraShape::new(392, 1000, 128, 13, 50), 3).unwrap();
        assert_eq!(plan.shrink.grid.0, 3 * 4);
        assert_eq!(plan.expand.grid.0, 3 * 4);
        assert!(LoraDecodePlan::new(shape(), 0).unwrap().is_empty());
    }

    /// Rows sharing an adapter become adjacent, rows without one come first, and rows of
    /// one adapter keep the plan's order; every row appears once.
    #[test]
    fn decode_rows_by_adapter_groups_rows_stably() {
        let adapters = [
            Some(7u32),
            None,
            Some(3),
            Some(7),
            None,
            Some(3),
            Some(9),
            Some(7),
        ];
        let order = decode_rows_by_adapter(&adapters);
        assert_eq!(order, vec![1, 4, 2, 5, 0, 3, 7, 6]);
        let keys: Vec<_> = order.iter().map(|&i| adapters[i]).collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
        assert!(decode_rows_by_adapter::<Option<u32>>(&[]).is_empty());
        let distinct = [Some(2u32), Some(0), Some(1)];
        assert_eq!(decode_rows_by_adapter(&distinct), vec![1, 2, 0]);
    }

    #[test]
    fn shrink_work_lists_only_the_groups_below_each_rank() {
        // max rank 64: 16 groups a request. Ranks 8, 0 (no adapter), 64, 13, and 80 (above
        // the rank columns: the kernels skip it, so no block for it).
        let work = shrink_work([8, 0, 64, 13, 80], 64);
        let mut want = vec![0, 1];
        want.extend(2 * 16..3 * 16);
        want.extend([3 * 16, 3 * 16 + 1, 3 * 16 + 2, 3 * 16 + 3]);
        assert_eq!(work, want);
        // Every entry is a block of the full grid, and no group of the full grid that has
        // rank rows is missing.
        let full = LoraDecodePlan::new(shape(), 5).unwrap();
        assert!(work.iter().all(|&e| (e as u32) < full.shrink.grid.0));
        // Nothing to compute: one entry, a block that computes nothing.
        assert_eq!(shrink_work([0, 0, 0], 64), vec![0]);
        assert_eq!(shrink_work(std::iter::empty(), 64), vec![0]);
        // A batch of rank-8 rows in rank-64 columns launches 2 blocks a row, not 16.
        assert_eq!(shrink_work([8; 32], 64).len(), 64);
    }

    #[test]
    fn plans_launch_the_shrink_over_a_work_list() {
        let plan = LoraDecodePlan::new(shape(), 64)
            .unwrap()
            .with_shrink_work(100)
            .unwrap();
        assert_eq!(plan.shrink.grid, (100, 1, 1));
        // The expand and the fused path keep their grids.
        assert_eq!(plan.expand.grid, (64 * 4, 1, 1));
        assert_eq!(plan.fused.grid, (64 * 8, 1, 1));
        let full = 64 * 16;
        for bad in [0, full + 1] {
            let reason = launch_reason(
                LoraDecodePlan::new(shape(), 64)
                    .unwrap()
                    .with_shrink_work(bad)
                    .unwrap_err(),
            );
            assert!(
                reason.contains(&format!("{bad} entries")) && reason.contains("1 to 1024"),
                "{reason}"
            );
        }
        let shared = LoraMultiShape {
            in_features: 4096,
            page_width: 1024,
            max_rank: 64,
            num_pages: 10_000,
        };
        let multi = LoraDecodeMultiPlan::new(shared, &[4096, 1024, 1024], 64)
            .unwrap()
            .with_shrink_work(7)
            .unwrap();
        assert_eq!(multi.shrink.grid, (7, 3, 1));
        assert_eq!(multi.expand.grid, (64 * 24, 1, 1));
        assert!(LoraDecodeMultiPlan::new(shared, &[4096], 2)
            .unwrap()
            .with_shrink_work(33)
            .is_err());
    }

    #[test]
    fn multi_decode_plan_covers_modules_ranks_and_outputs() {
        let shared = LoraMultiShape {
            in_features: 4096,
            page_width: 1024,
            max_rank: 64,
            num_pages: 10_000,
        };
        // q, k, v of a GQA layer: 4096 -> 4096, 1024, 1024.
        let plan = LoraDecodeMultiPlan::new(shared, &[4096, 1024, 1024], 64).unwrap();
        assert_eq!(plan.modules.len(), 3);
        assert_eq!(
            plan.modules[1],
            LoraShape::new(4096, 1024, 1024, 64, 10_000)
        );
        // 64 requests x 16 row groups, one grid row per module.
        assert_eq!(plan.shrink.grid, (64 * 16, 3, 1));
        assert_eq!(plan.shrink.block, (256, 1, 1));
        assert_eq!(plan.shrink.shared_mem, 4 * 4 * 4); // 4 slots for every module
                                                       // 64 requests x (16 + 4 + 4) output tiles laid end to end.
        assert_eq!(plan.expand.grid, (64 * 24, 1, 1));
        assert_eq!(plan.expand.block, (128, 1, 1));
        assert_eq!(plan.v_len(), 3 * 64 * 64);
        // Modules with different slots: shared memory for the largest.
        let narrow = LoraMultiShape {
            page_width: 128,
            in_features: 392,
            max_rank: 13,
            num_pages: 50,
        };
        let plan = LoraDecodeMultiPlan::new(narrow, &[1000, 136], 3).unwrap();
        assert_eq!(plan.modules[0].slots, 8);
        assert_eq!(plan.modules[1].slots, 4);
        assert_eq!(plan.shrink.shared_mem, 4 * 8 * 4);
        assert_eq!(plan.shrink.grid, (3 * 4, 2, 1));
        assert_eq!(plan.expand.grid, (3 * (4 + 1), 1, 1));
        assert!(LoraDecodeMultiPlan::new(shared, &[4096], 0)
            .unwrap()
            .is_empty());
        // Refused: no module, four modules, a bad out, a v scratch past i32.
        let reason = |outs: &[usize], n| {
            launch_reason(LoraDecodeMultiPlan::new(shared, outs, n).unwrap_err())
        };
        assert!(reason(&[], 4).contains("0 modules"));
        assert!(reason(&[8, 8, 8, 8], 4).contains("4 modules"));
        assert!(reason(&[4096, 1020], 4).contains("multiple of 8"));
        let wide = LoraMultiShape {
            in_features: 8,
            page_width: 8,
            max_rank: 4096,
            num_pages: 10,
        };
        // 3 x 200_000 x 4096 > i32::MAX, while one module's 200_000 x 4096 is not.
        assert!(LoraDecodeMultiPlan::new(wide, &[8], 200_000).is_ok());
        let r = launch_reason(LoraDecodeMultiPlan::new(wide, &[8, 8, 8], 200_000).unwrap_err());
        assert!(r.contains("v scratch"), "{r}");
    }

    /// Runs the multi-module reference on `sc`, returning `(v, ys)`.
    #[allow(clippy::type_complexity)]
    fn multi_ref(
        sc: &MultiScenario,
        tables: &[(Vec<i32>, Vec<i32>, Vec<f32>)],
        x: &[half::f16],
        y0: &[Vec<half::f16>],
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let n = tables[0].0.len();
        let mut v = vec![f32::NAN; sc.outs.len() * n * sc.shape.max_rank];
        let mut ys: Vec<Vec<f32>> = y0
            .iter()
            .map(|y| y.iter().map(|h| h.to_f32()).collect())
            .collect();
        let mut modules: Vec<HostModuleOut<'_>> = ys
            .iter_mut()
            .zip(tables)
            .zip(&sc.outs)
            .map(|((y, (po, rank, scale)), &out)| HostModuleOut {
                page_offset: po,
                rank,
                scale,
                out_features: out,
                y,
            })
            .collect();
        let pool = HostPool {
            k: &sc.k_pool,
            v: &sc.v_pool,
        };
        lora_decode_multi_ref(&sc.shape, pool, &sc.adapter_pages, &mut modules, x, &mut v).unwrap();
        (v, ys)
    }

    #[test]
    fn multi_decode_reference_equals_single_module_references() {
        let mut rng = SplitMix(17);
        for (inf, outs, w) in MULTI_CHECK_GEOMETRIES {
            let sc = MultiScenario::build(&mut rng, inf, outs, w, &MULTI_CHECK_RANKS).unwrap();
            let n = DECODE_USES.len();
            let mr = sc.shape.max_rank;
            let tables = sc.tables(&DECODE_USES);
            let x = rng.f16s(n * inf, 1.0);
            let y0: Vec<Vec<half::f16>> = outs.iter().map(|&o| rng.f16s(n * o, 1.0)).collect();
            let (v, ys) = multi_ref(&sc, &tables, &x, &y0);
            let pool = HostPool {
                k: &sc.k_pool,
                v: &sc.v_pool,
            };
            for (m, &out) in outs.iter().enumerate() {
                let (po, rank, scale) = &tables[m];
                let t = LoraTables {
                    adapter_pages: &sc.adapter_pages,
                    page_offset: po,
                    rank,
                    scale,
                };
                let mut v1 = vec![f32::NAN; n * mr];
                let mut y1: Vec<f32> = y0[m].iter().map(|h| h.to_f32()).collect();
                lora_decode_ref(&sc.shape.module(out), pool, &t, &x, &mut v1, &mut y1).unwrap();
                assert_eq!(y1, ys[m], "module {m} y");
                let part = &v[m * n * mr..(m + 1) * n * mr];
                assert!(
                    part.iter()
                        .zip(&v1)
                        .all(|(a, b)| a == b || (a.is_nan() && b.is_nan())),
                    "module {m} v"
                );
            }
        }
    }

    #[test]
    fn multi_decode_reference_matches_dense_lora() {
        let mut rng = SplitMix(19);
        for (inf, outs, w) in MULTI_CHECK_GEOMETRIES {
            let sc = MultiScenario::build(&mut rng, inf, outs, w, &MULTI_CHECK_RANKS).unwrap();
            let n = DECODE_USES.len();
            let tables = sc.tables(&DECODE_USES);
            let po: Vec<&Vec<i32>> = tables.iter().map(|t| &t.0).collect();
            // Every module's rows start somewhere else, and the skipped module is -1.
            let (k, m) = MULTI_SKIP;
            let b_skip = DECODE_USES.iter().position(|u| *u == Some(k)).unwrap();
            if m < outs.len() {
                assert_eq!(po[m][b_skip], -1);
            }
            for b in 0..n {
                let live: Vec<i32> = po.iter().map(|p| p[b]).filter(|&p| p >= 0).collect();
                let mut dedup = live.clone();
                dedup.dedup();
                assert_eq!(live, dedup, "request {b}: modules share rows");
            }
            let x = rng.f16s(n * inf, 1.0);
            let y0: Vec<Vec<half::f16>> = outs.iter().map(|&o| rng.f16s(n * o, 1.0)).collect();
            let (_, ys) = multi_ref(&sc, &tables, &x, &y0);
            let mut checked = 0;
            for (m, &out) in outs.iter().enumerate() {
                for (b, u) in DECODE_USES.iter().enumerate() {
                    let row = &ys[m][b * out..(b + 1) * out];
                    let before: Vec<f64> = y0[m][b * out..(b + 1) * out]
                        .iter()
                        .map(|h| f64::from(h.to_f32()))
                        .collect();
                    let delta = u.and_then(|k| sc.dense_delta(k, m, &x[b * inf..(b + 1) * inf]));
                    match delta {
                        None => {
                            assert!(row.iter().zip(&before).all(|(&g, &w)| f64::from(g) == w));
                        }
                        Some(delta) => {
                            let want: Vec<f64> =
                                before.iter().zip(&delta).map(|(y, d)| y + d).collect();
                            assert_close(row, &want, &format!("module {m} request {b}"));
                            checked += 1;
                        }
                    }
                }
            }
            assert!(checked >= outs.len() * (n - 3), "{checked} rows checked");
        }
    }

    #[test]
    fn fused_decode_needs_sm_90() {
        assert!(DecodePath::Split.is_supported(8, 0));
        assert!(!DecodePath::Fused.is_supported(8, 0));
        assert!(!DecodePath::Fused.is_supported(8, 9));
        assert!(DecodePath::Fused.is_supported(9, 0));
        assert!(DecodePath::Fused.is_supported(10, 0));
        assert_eq!(DecodePath::default(), DecodePath::Split);
        // The kernel is compiled only where clusters exist.
        let guard = SOURCE.code.find("__CUDA_ARCH__ >= 900").unwrap();
        assert!(guard < SOURCE.code.find("\nlora_mbgmv_fused(").unwrap());
    }

    #[test]
    fn prefill_plan_covers_segments_tokens_and_outputs() {
        let plan = LoraPrefillPlan::new(shape(), 300, 5, 100, PrefillPath::Simt).unwrap();
        // ceil(100 / 32) token tiles, one rank tile, split-K to reach ~264 blocks.
        assert_eq!(plan.shrink.grid.0, 4);
        assert_eq!(plan.shrink.grid.2, 5);
        assert_eq!(plan.shrink.grid.1 as usize, plan.k_splits);
        // About the target (chunks are whole 64-input steps, so it rounds).
        assert!(4 * plan.k_splits * 5 >= PREFILL_SHRINK_TARGET_BLOCKS * 3 / 4);
        assert_eq!(plan.expand.grid, (4, 8, 5)); // ceil(1024 / 128)
        assert_eq!(plan.shrink.block, (256, 1, 1));
        let wide = LoraShape::new(4096, 1024, 1024, 65, 10_000);
        let p = LoraPrefillPlan::new(wide, 300, 5, 100, PrefillPath::Simt).unwrap();
        assert_eq!(p.shrink.grid.1 as usize, 2 * p.k_splits); // two rank tiles per chunk
                                                              // The chunks tile the reduction exactly, in whole 64-input steps.
        for (in_f, tokens, segs) in [(4096, 1, 1), (4096, 4096, 8), (11008, 300, 1), (64, 5, 1)] {
            let shape = LoraShape::new(in_f, 1024, 1024, 64, 10_000);
            let p = LoraPrefillPlan::new(shape, tokens, segs, tokens / segs, PrefillPath::Simt)
                .unwrap();
            assert_eq!(p.k_chunk % PREFILL_SHRINK_K, 0);
            assert!(p.k_splits * p.k_chunk >= in_f && (p.k_splits - 1) * p.k_chunk < in_f);
            assert!(p.k_splits <= PREFILL_SHRINK_MAX_SPLITS);
        }
        let plan = LoraPrefillPlan::new(shape(), 0, 0, 0, PrefillPath::Simt).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.shrink.grid.2, 0);
        assert!(plan.reduce.is_none());
    }

    #[test]
    fn tensor_core_prefill_plan_tiles_64_tokens_and_reduces_split_chunks() {
        let tc = PrefillPath::TensorCore;
        assert_eq!(PrefillPath::default(), tc);
        let plan = LoraPrefillPlan::new(shape(), 300, 5, 100, tc).unwrap();
        assert_eq!(plan.shrink.grid.0, 2); // ceil(100 / 64)
        assert_eq!(plan.expand.grid, (2, 16, 5)); // ceil(1024 / 64) output tiles
        assert_eq!(plan.shrink.block, (128, 1, 1));
        assert_eq!(plan.expand.block, (128, 1, 1));
        // Split: v, then one [T, max_rank] of partial sums per chunk, reduced over all of v.
        assert!(plan.k_splits > 1);
        let v_len = 300 * shape().max_rank;
        assert_eq!(plan.scratch_len(), v_len * (plan.k_splits + 1));
        let reduce = plan.reduce.expect("a split reduction is reduced");
        assert!(reduce.grid.0 as usize * reduce.block.0 as usize >= v_len);
        assert!(plan.scratch_len() <= LoraPrefillPlan::max_scratch_len(300, shape().max_rank));
        // Enough token tiles: one chunk, the shrink writes v itself.
        let long = LoraPrefillPlan::new(shape(), 20_000, 1, 20_000, tc).unwrap();
        assert_eq!(long.k_splits, 1);
        assert!(long.reduce.is_none());
        assert_eq!(long.scratch_len(), 20_000 * shape().max_rank);
        // The scratch of a huge split batch would overflow the kernels' i32 indexing.
        let wide = LoraShape::new(4096, 1024, 1024, 1024, 10_000);
        let reason = launch_reason(LoraPrefillPlan::new(wide, 400_000, 1, 64, tc).unwrap_err());
        assert!(
            reason.contains("reduction chunks of 400000 tokens"),
            "{reason}"
        );
    }

    #[test]
    fn plans_reject_shapes_the_kernels_cannot_run() {
        let ok = shape();
        let cases = [
            (
                LoraShape {
                    in_features: 4100,
                    ..ok
                },
                "multiple of 8",
            ),
            (LoraShape::new(4096, 1024, 1020, 64, 10), "multiple of 8"),
            (LoraShape { slots: 3, ..ok }, "slots = 3"),
            (LoraShape { max_rank: 0, ..ok }, "at least 1"),
            (
                LoraShape {
                    num_pages: 3_000_000,
                    ..ok
                },
                "overflows i32",
            ),
            (LoraShape::new(8 * 4096, 8, 8, 64, 10), "shared memory"),
        ];
        for (s, want) in cases {
            let reason = launch_reason(LoraDecodePlan::new(s, 4).unwrap_err());
            assert!(reason.contains(want), "{reason:?} lacks {want:?}");
        }
        let reason = launch_reason(LoraDecodePlan::new(ok, 600_000).unwrap_err());
        assert!(reason.contains("overflows i32"), "{reason}");
        let simt = PrefillPath::Simt;
        let reason = launch_reason(LoraPrefillPlan::new(ok, 100, 70_000, 10, simt).unwrap_err());
        assert!(reason.contains("segments"), "{reason}");
        let reason = launch_reason(LoraPrefillPlan::new(ok, 100, 4, 101, simt).unwrap_err());
        assert!(reason.contains("longest segment"), "{reason}");
    }

    #[test]
    fn tables_are_checked_entry_by_entry() {
        let s = LoraShape::new(64, 64, 32, 4, 20); // 2 slots
        let pages: Vec<i32> = (0..16).collect();
        let check = |po: &[i32], rank: &[i32], pages: &[i32]| {
            let scale = vec![1.0f32; po.len()];
            validate_tables(
                "test",
                &s,
                &LoraTables {
                    adapter_pages: pages,
                    page_offset: po,
                    rank,
                    scale: &scale,
                },
            )
        };
        check(&[0, -1, 8], &[4, 99, 4], &pages).unwrap();
        let reason = |r: Result<()>| launch_reason(r.unwrap_err());
        assert!(reason(check(&[0], &[5], &pages)).contains("rank 5"));
        assert!(reason(check(&[0], &[0], &pages)).contains("rank 0"));
        assert!(reason(check(&[9], &[4], &pages)).contains("runs past"));
        assert!(reason(check(&[-2], &[4], &pages)).contains("neither -1"));
        let mut bad_pages = pages.clone();
        bad_pages[3] = 20;
        assert!(reason(check(&[0], &[4], &bad_pages)).contains("page 20"));
        assert!(reason(check(&[0, 0], &[4], &pages)).contains("must be equal"));
    }

    #[test]
    fn segments_must_tile_the_batch() {
        assert_eq!(validate_segments("t", &[0, 5, 5, 12], 12).unwrap(), 7);
        assert_eq!(validate_segments("t", &[0], 0).unwrap(), 0);
        assert!(validate_segments("t", &[], 0).is_err());
        assert!(validate_segments("t", &[1, 12], 12).is_err());
        assert!(validate_segments("t", &[0, 12], 13).is_err());
        assert!(validate_segments("t", &[0, 6, 5, 12], 12).is_err());
    }

    #[test]
    fn packing_round_trips_through_the_pool_layout() {
        let mut rng = SplitMix(7);
        // in spans 3 slots (the last partial), out 2: the V side of slot 2 must be zeros.
        let (inf, outf, w, r) = (40, 24, 16, 3);
        let slots = slots_for(inf, outf, w);
        assert_eq!(slots, 3);
        let a: Vec<f32> = (0..r * inf).map(|_| rng.uniform()).collect();
        let b: Vec<f32> = (0..outf * r).map(|_| rng.uniform()).collect();
        let num_pages = 30;
        let mut order: Vec<i32> = (0..num_pages).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let pages = &order[..r * slots];
        let packed = pack_adapter_rows(inf, outf, w, r, &a, &b, pages).unwrap();
        assert_eq!(packed.len(), r * slots);
        assert!(packed.iter().zip(pages).all(|(p, &q)| p.page == q));
        let mut k = vec![f32::NAN; num_pages as usize * w];
        let mut v = vec![f32::NAN; num_pages as usize * w];
        write_packed_pages(&mut k, &mut v, w, &packed).unwrap();
        let s = LoraShape::new(inf, outf, w, r, num_pages as usize);
        for i in 0..r {
            for j in 0..inf {
                assert_eq!(
                    pool_element(&k, pages, 0, i, j, &s),
                    f64::from(a[i * inf + j])
                );
            }
            for o in 0..outf {
                assert_eq!(
                    pool_element(&v, pages, 0, i, o, &s),
                    f64::from(b[o * r + i])
                );
            }
            // Past the row's end the pages hold zeros, not whatever was there before.
            assert!(packed[i * slots + 2].k_row[inf - 2 * w..]
                .iter()
                .all(|&e| e == 0.0));
            assert!(packed[i * slots + 2].v_row.iter().all(|&e| e == 0.0));
        }
        assert!(pack_adapter_rows(inf, outf, w, r, &a, &b, &pages[1..]).is_err());
        assert!(pack_adapter_rows(inf, outf, w, r, &a[1..], &b, pages).is_err());
        let mut far = packed.clone();
        far[0].page = num_pages;
        assert!(write_packed_pages(&mut k, &mut v, w, &far).is_err());
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let err: f64 = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (f64::from(g) - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let size: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
        assert!(size > 0.1, "{what}: the oracle is near zero ({size})");
        assert!(err / size < 1e-6, "{what}: relative error {}", err / size);
    }

    #[test]
    fn decode_reference_matches_dense_lora() {
        let mut rng = SplitMix(11);
        for (inf, outf, w) in CHECK_GEOMETRIES {
            let sc = Scenario::build(&mut rng, inf, outf, w, &CHECK_RANKS).unwrap();
            let n = DECODE_USES.len();
            let (po, rank, scale) = sc.tables(&DECODE_USES);
            let tables = LoraTables {
                adapter_pages: &sc.adapter_pages,
                page_offset: &po,
                rank: &rank,
                scale: &scale,
            };
            let x = rng.f16s(n * inf, 1.0);
            let y0 = rng.f16s(n * outf, 1.0);
            let mut v = vec![f32::NAN; n * sc.shape.max_rank];
            let mut y: Vec<f32> = y0.iter().map(|h| h.to_f32()).collect();
            let pool = HostPool {
                k: &sc.k_pool,
                v: &sc.v_pool,
            };
            lora_decode_ref(&sc.shape, pool, &tables, &x, &mut v, &mut y).unwrap();
            for (b, u) in DECODE_USES.iter().enumerate() {
                let row = &y[b * outf..(b + 1) * outf];
                let before: Vec<f64> = y0[b * outf..(b + 1) * outf]
                    .iter()
                    .map(|h| f64::from(h.to_f32()))
                    .collect();
                let vrow = &v[b * sc.shape.max_rank..(b + 1) * sc.shape.max_rank];
                match u {
                    None => {
                        assert!(row.iter().zip(&before).all(|(&g, &w)| f64::from(g) == w));
                        assert!(vrow.iter().all(|e| e.is_nan()));
                    }
                    Some(k) => {
                        let delta = sc.dense_delta(*k, &x[b * inf..(b + 1) * inf]);
                        let want: Vec<f64> =
                            before.iter().zip(&delta).map(|(y, d)| y + d).collect();
                        assert_close(row, &want, &format!("decode request {b}"));
                        let r = sc.adapters[*k].rank;
                        assert!(vrow[..r].iter().all(|e| e.is_finite()));
                        assert!(
                            vrow[r..].iter().all(|e| e.is_nan()),
                            "v past the rank was written"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prefill_reference_matches_dense_lora() {
        let mut rng = SplitMix(13);
        let (inf, outf, w) = CHECK_GEOMETRIES[0];
        let sc = Scenario::build(&mut rng, inf, outf, w, &CHECK_RANKS).unwrap();
        let seg_start = segment_starts();
        let uses: Vec<Option<usize>> = PREFILL_SEGMENTS.iter().map(|&(_, u)| u).collect();
        let (po, rank, scale) = sc.tables(&uses);
        let tables = LoraTables {
            adapter_pages: &sc.adapter_pages,
            page_offset: &po,
            rank: &rank,
            scale: &scale,
        };
        let tokens = *seg_start.last().unwrap() as usize;
        let x = rng.f16s(tokens * inf, 1.0);
        let y0 = rng.f16s(tokens * outf, 1.0);
        let mut v = vec![f32::NAN; tokens * sc.shape.max_rank];
        let mut y: Vec<f32> = y0.iter().map(|h| h.to_f32()).collect();
        let pool = HostPool {
            k: &sc.k_pool,
            v: &sc.v_pool,
        };
        lora_prefill_ref(&sc.shape, pool, &tables, &seg_start, &x, &mut v, &mut y).unwrap();
        for (s, &(_, u)) in PREFILL_SEGMENTS.iter().enumerate() {
            for t in seg_start[s] as usize..seg_start[s + 1] as usize {
                let row = &y[t * outf..(t + 1) * outf];
                let before: Vec<f64> = y0[t * outf..(t + 1) * outf]
                    .iter()
                    .map(|h| f64::from(h.to_f32()))
                    .collect();
                match u {
                    None => assert!(row.iter().zip(&before).all(|(&g, &w)| f64::from(g) == w)),
                    Some(k) => {
                        let delta = sc.dense_delta(k, &x[t * inf..(t + 1) * inf]);
                        let want: Vec<f64> =
                            before.iter().zip(&delta).map(|(y, d)| y + d).collect();
                        assert_close(row, &want, &format!("segment {s} token {t}"));
                    }
                }
            }
        }
        // Mismatched segment tables are refused.
        let short = &seg_start[..seg_start.len() - 1];
        assert!(lora_prefill_ref(&sc.shape, pool, &tables, short, &x, &mut v, &mut y).is_err());
    }

    #[test]
    fn references_accept_f32_pools() {
        let s = LoraShape::new(8, 8, 8, 2, 3);
        // Page 2 holds row 0 of A (all 1) and of B^T (all 2); page 0 row 1 (A: j, B^T: 1).
        let mut k = vec![0.0f32; 24];
        let mut v = vec![0.0f32; 24];
        k[16..24].fill(1.0);
        v[16..24].fill(2.0);
        for (j, e) in k[..8].iter_mut().enumerate() {
            *e = j as f32;
        }
        v[0..8].fill(1.0);
        let x: Vec<f32> = (0..8).map(|j| 1.0 + j as f32).collect();
        let pages = [2, 0];
        let tables = LoraTables {
            adapter_pages: &pages,
            page_offset: &[0],
            rank: &[2],
            scale: &[0.5],
        };
        let mut vs = vec![0.0f32; 2];
        let mut y = vec![1.0f32; 8];
        lora_decode_ref(&s, HostPool { k: &k, v: &v }, &tables, &x, &mut vs, &mut y).unwrap();
        // v0 = sum(1..=8) = 36, v1 = sum j * (1 + j) = 168; y = 1 + 0.5 * (2 * 36 + 168).
        assert_eq!(vs, [36.0, 168.0]);
        assert!(y.iter().all(|&e| e == 121.0), "{y:?}");
    }
}
