//! The GPU executor: runs the engine's `StepPlan`s on an NVIDIA GPU.
//!
//! It makes no decision of its own. The engine says which requests prefill which tokens into
//! which pages, which decode, which adapters load into which pages; the executor mirrors the
//! page tables it is told about, copies adapter rows, and runs the Llama forward pass:
//!
//! ```text
//! embedding → for each layer:
//!   rms_norm → q,k,v GEMMs (+ LoRA shrink/expand over pool pages) → RoPE → store K,V rows in
//!   their pages → paged attention (prefill: causal, variable length; decode: batched) →
//!   o GEMM (+ LoRA) → residual add + rms_norm → gate_up GEMM → silu·mul → down GEMM → add
//! → final rms_norm on the rows that sample → lm_head → argmax
//! ```
//!
//! Prefill rows come first in every activation buffer, decode rows after them, so the two
//! attention kernels and the two LoRA kernels each see one contiguous block of rows.

use crate::device::{self, DeviceWeights};
use crate::error::{Error, Result};
use crate::gpu::{driver_err, Gpu, Phase, PhaseTimes};
use crate::ops::{attention, layers, lora, sampling};
use crate::packing;
use crate::weights::PeftAdapter;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, PinnedHostSlice};
use half::f16;
use slora_engine::{
    AdapterId, ExecError, Executor, ModelSpec, RequestId, StepPlan, StepReport, TargetModule,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Where the base model's weights come from.
pub enum ModelWeights<'a> {
    /// Loaded from safetensors (see `weights::load_llama`).
    Host(&'a crate::weights::LlamaWeights),
    /// Generated on the device from a seed (no download needed).
    Synthetic { seed: u64 },
}

/// Sizes the executor allocates for.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    pub model: ModelSpec,
    pub rms_norm_eps: f32,
    /// Pages of the unified pool (the engine's `pool_pages`).
    pub pool_pages: u32,
    /// Most token rows one step may carry (prefill budget + batch size).
    pub max_step_tokens: usize,
    /// Largest adapter rank that will be registered.
    pub max_rank: u32,
    /// Compute logits for every prompt position (for correctness checks), not only the rows
    /// that sample.
    pub record_prompt_logits: bool,
}

/// An adapter in host memory, packed as pool rows: `[layers][K side, V side][pages][W]`,
/// shared between synthetic adapters of the same shape so thousands fit in host memory
/// (each load still copies its bytes to the device).
pub struct HostAdapter {
    pub rank: u32,
    pub scale: f32,
    pub targets: Vec<TargetModule>,
    pub pages: usize,
    /// Page-locked, so loads copy at full link speed and asynchronously.
    pub packed: Arc<PinnedHostSlice<f16>>,
}

impl HostAdapter {
    /// Another handle on the same packed host rows (synthetic populations share them).
    pub fn share(&self) -> HostAdapter {
        HostAdapter {
            rank: self.rank,
            scale: self.scale,
            targets: self.targets.clone(),
            pages: self.pages,
            packed: self.packed.clone(),
        }
    }
}

struct RequestState {
    /// Prompt followed by every sampled token.
    tokens: Vec<u32>,
    /// KV pages in token order (the engine's page table, mirrored from the plans).
    pages: Vec<i32>,
}

/// Logits of the last step, when recorded: `(request, position, logits)` rows.
pub type RecordedLogits = Vec<(RequestId, u32, Vec<f32>)>;

struct Buffers {
    hidden: CudaSlice<f16>,
    residual: CudaSlice<f16>,
    normed: CudaSlice<f16>,
    /// The fused q/k/v GEMM's output, split into `q`, `k` and `v`.
    qkv: CudaSlice<f16>,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    attn: CudaSlice<f16>,
    gate_up: CudaSlice<f16>,
    mlp: CudaSlice<f16>,
    lora_scratch: CudaSlice<f32>,
    /// The decode rows' LoRA deltas of q, k, v and o, computed on the LoRA stream while the
    /// base GEMMs run, and added by `split_qkv` and `add_rms_norm` (see `forward`). f32, so
    /// that adding them later rounds exactly as the in-line expand does.
    lora_dq: CudaSlice<f32>,
    lora_dk: CudaSlice<f32>,
    lora_dv: CudaSlice<f32>,
    lora_do: CudaSlice<f32>,
    /// The LoRA stream's own `v` scratch: the prefill rows' LoRA uses `lora_scratch` on the
    /// compute stream at the same time.
    lora_side_scratch: CudaSlice<f32>,
    sample_rows: CudaSlice<f16>,
    logits16: CudaSlice<f16>,
    logits32: CudaSlice<f32>,
}

pub struct GpuExecutor {
    pub gpu: Gpu,
    cfg: ExecutorConfig,
    weights: DeviceWeights,
    pool: CudaSlice<f16>,
    adapters: HashMap<AdapterId, HostAdapter>,
    /// Page lists of adapters on the device.
    resident: HashMap<AdapterId, Vec<i32>>,
    requests: HashMap<RequestId, RequestState>,
    buffers: Buffers,
    /// Every per-step table (token ids, positions, page tables, LoRA tables, ...) travels in
    /// one upload into these persistent buffers: one host-to-device copy per step instead of
    /// dozens of allocations and copies.
    tables_i32: CudaSlice<i32>,
    tables_f32: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    scalars: CudaSlice<i32>,
    /// Whether decode-only steps run as captured CUDA graphs (off after a failed capture).
    graphs_enabled: bool,
    /// The captured decode graph and the batch shape it is valid for.
    graph: Option<(GraphKey, cudarc::driver::CudaGraph)>,
    /// The last decode shape run launch by launch: a shape is captured the second time in a
    /// row it is seen, so one-off shapes never pay for a capture, and the first run of a
    /// shape tunes its GEMMs (which a capture cannot).
    last_eager_key: Option<GraphKey>,
    /// Bumped whenever a buffer a graph points into is reallocated.
    buffer_generation: u64,
    /// Decode steps run by replaying a captured graph (for reports and checks).
    pub graph_replays: u64,
    /// Staging buffers of the loads issued by the step in flight (freed when it completes).
    load_staging: Vec<(CudaSlice<f16>, CudaSlice<i32>)>,
    /// Count of out-of-range token ids the embedding kernel met (ids are checked on the host
    /// first, so it stays 0; never read on the hot path).
    bad_ids: CudaSlice<i32>,
    pub last_logits: RecordedLogits,
    /// Whether steps record per-phase GPU times (runs launch by launch while on).
    phase_timing: bool,
    /// Per-phase GPU times of the last step run with phase timing on.
    pub last_phase_times: Option<PhaseTimes>,
    /// Host seconds of the last step before its first kernel was enqueued: plan checks,
    /// adapter loads issued, the step's tables built and uploaded. The page tables grow with
    /// the step's cached rows; `calibrate` reports this beside what its whole decode steps
    /// cost over the parts (docs/FIDELITY.md, session 25).
    pub last_host_prep_s: f64,
    /// When the step being run began (set by `run`).
    step_started: Instant,
    /// Whether the decode rows' LoRA runs on the LoRA stream beside the base GEMMs (the
    /// default) or in line on the compute stream (always so while phase timing is on, so
    /// that each phase's events bracket its own kernels).
    lora_overlap: bool,
    /// Whether the decode rows' MBGMV shrink runs over the step's work list (only the rank-row
    /// groups each row has: the default) or over the full grid of `ceil(max_rank / 4)` groups
    /// a row (the baseline `bench-gpu` compares against).
    shrink_work_list: bool,
    /// Whether a step's decode rows are laid out grouped by adapter
    /// (`lora::decode_rows_by_adapter`) instead of in the plan's order (the default); see
    /// [`GpuExecutor::set_decode_rows_by_adapter`].
    decode_rows_by_adapter: bool,
    /// SMs the q/k/v and o GEMMs are planned for while the decode rows' LoRA runs beside
    /// them (0, the default: the whole GPU); see [`GpuExecutor::set_beside_gemm_sms`].
    beside_sm_target: u32,
    /// Which MBGMM kernels run the prompt rows' LoRA (tensor cores unless `bench-gpu` asks
    /// for the SIMT baseline).
    prefill_lora_path: lora::PrefillPath,
}

/// Most decode rows for which the decode rows' LoRA runs beside the base GEMMs. Two H200 runs
/// of `bench-gpu` (docs/fidelity/runs-5, BENCHMARKS.md) measured the overlap 2–7% faster at
/// batches 1 and 32, in a graph and launch by launch, and within ±2% either way at 64–256 (the
/// GEMMs' blocks then hold the SMs, so the LoRA kernels only fill their tails): above this the
/// LoRA runs in line.
pub const LORA_OVERLAP_MAX_DECODE_ROWS: usize = 48;

/// What a captured decode graph depends on: every kernel argument (sizes and addresses of
/// the step tables and scratch buffers) is a function of these.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GraphKey {
    rows: usize,
    max_rank: usize,
    shrink_blocks: usize,
    adapter_pages: usize,
    lora: Vec<(u8, bool)>,
    partitions: usize,
    overlap_lora: bool,
    urgent_lora: bool,
    beside_sm_target: u32,
    kv_offset: usize,
    generation: u64,
}

/// Host staging of a step's tables; each table starts 16-byte aligned.
#[derive(Default)]
struct TableArena {
    ints: Vec<i32>,
    floats: Vec<f32>,
}

impl TableArena {
    fn ints(&mut self, v: &[i32]) -> std::ops::Range<usize> {
        while self.ints.len() % 4 != 0 {
            self.ints.push(0);
        }
        let start = self.ints.len();
        self.ints.extend_from_slice(v);
        start..self.ints.len()
    }

    fn floats(&mut self, v: &[f32]) -> std::ops::Range<usize> {
        while self.floats.len() % 4 != 0 {
            self.floats.push(0.0);
        }
        let start = self.floats.len();
        self.floats.extend_from_slice(v);
        start..self.floats.len()
    }
}

impl GpuExecutor {
    /// Pool pages that fit in `fraction` of the GPU memory left once `model`'s weights and the
    /// activation buffers for steps of `max_step_tokens` rows are accounted for (the engine's
    /// `pool_pages` for a live run). Errors name the sizes when nothing is left.
    pub fn pool_pages_from_free_memory(
        gpu: &Gpu,
        model: &ModelSpec,
        max_step_tokens: usize,
        max_rank: u32,
        fraction: f64,
    ) -> Result<u32> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::Plan {
                step: 0,
                reason: format!("the pool's memory fraction must be in (0, 1], got {fraction}"),
            });
        }
        let free = gpu.info()?.free_memory;
        let (h, i, v) = (
            model.hidden_size as u64,
            model.intermediate_size as u64,
            model.vocab_size as u64,
        );
        let t = max_step_tokens.max(1) as u64;
        // hidden, residual, normed, qkv, q, k, v, attention, gate_up, mlp, sampled rows (fp16),
        // the LoRA deltas of q, k, v and o, both LoRA scratches and f32 logits, plus fp16
        // logits: what `new` allocates (q, k and v counted at the MHA width, an upper bound
        // for GQA).
        let activations = t * (10 * h + 3 * i + h) * 2
            + t * 4 * h * 4
            + (lora::LoraPrefillPlan::max_scratch_len(t as usize, max_rank as usize) as u64
                + 3 * t * max_rank as u64)
                * 4
            + t * v * 6;
        let fixed = DeviceWeights::bytes(model) + activations;
        let usable = (free as f64 * fraction) as u64;
        if usable <= fixed {
            return Err(Error::OutOfMemory {
                what: format!(
                    "{} weights ({:.2} GB) and activations for {t} tokens ({:.2} GB), at memory fraction {fraction}",
                    model.name,
                    DeviceWeights::bytes(model) as f64 / 1e9,
                    activations as f64 / 1e9
                ),
                needed_gb: fixed as f64 / 1e9,
                available_gb: usable as f64 / 1e9,
            });
        }
        Ok(((usable - fixed) / model.page_bytes()).min(u32::MAX as u64) as u32)
    }

    pub fn new(gpu: Gpu, cfg: ExecutorConfig, weights: ModelWeights<'_>) -> Result<GpuExecutor> {
        let m = &cfg.model;
        let (free, _) =
            cudarc::driver::result::mem_get_info().map_err(driver_err("cuMemGetInfo"))?;
        let pool_elems =
            m.num_layers as usize * 2 * cfg.pool_pages as usize * m.page_width() as usize;
        let needed = DeviceWeights::bytes(m) + pool_elems as u64 * 2;
        if needed > free as u64 {
            return Err(Error::OutOfMemory {
                what: format!("{} weights and a pool of {} pages", m.name, cfg.pool_pages),
                needed_gb: needed as f64 / 1e9,
                available_gb: free as f64 / 1e9,
            });
        }
        let weights = match weights {
            ModelWeights::Host(w) => DeviceWeights::upload(&gpu, m, w)?,
            ModelWeights::Synthetic { seed } => DeviceWeights::synthetic(&gpu, m, seed)?,
        };
        let pool = device::alloc::<f16>(&gpu, pool_elems, "the unified page pool")?;
        let t = cfg.max_step_tokens.max(1);
        let (h, i, v) = (
            m.hidden_size as usize,
            m.intermediate_size as usize,
            m.vocab_size as usize,
        );
        let (qw, kvw) = ((m.num_heads * m.head_dim()) as usize, m.kv_width() as usize);
        let buffers = Buffers {
            hidden: device::alloc(&gpu, t * h, "hidden states")?,
            residual: device::alloc(&gpu, t * h, "residual")?,
            normed: device::alloc(&gpu, t * h, "normed")?,
            qkv: device::alloc(&gpu, t * (qw + 2 * kvw), "qkv")?,
            q: device::alloc(&gpu, t * qw, "q")?,
            k: device::alloc(&gpu, t * kvw, "k")?,
            v: device::alloc(&gpu, t * kvw, "v")?,
            attn: device::alloc(&gpu, t * qw, "attention output")?,
            gate_up: device::alloc(&gpu, t * 2 * i, "gate_up")?,
            mlp: device::alloc(&gpu, t * i, "mlp")?,
            // Three modules' `v` at once for the fused q/k/v decode path; a prompt's `v` and
            // its split-K partial sums (more than three times `v`).
            lora_scratch: device::alloc(
                &gpu,
                lora::LoraPrefillPlan::max_scratch_len(t, cfg.max_rank.max(1) as usize)
                    .max(3 * t * cfg.max_rank.max(1) as usize),
                "LoRA scratch",
            )?,
            lora_dq: device::alloc(&gpu, t * qw, "LoRA delta of q")?,
            lora_dk: device::alloc(&gpu, t * kvw, "LoRA delta of k")?,
            lora_dv: device::alloc(&gpu, t * kvw, "LoRA delta of v")?,
            lora_do: device::alloc(&gpu, t * h, "LoRA delta of o")?,
            lora_side_scratch: device::alloc(
                &gpu,
                3 * t * cfg.max_rank.max(1) as usize,
                "LoRA scratch of the LoRA stream",
            )?,
            sample_rows: device::alloc(&gpu, t * h, "sampled rows")?,
            logits16: device::alloc(&gpu, t * v, "logits")?,
            logits32: device::alloc(&gpu, t * v, "logits (f32)")?,
        };
        let tables_i32 = device::alloc(&gpu, 1 << 16, "step tables")?;
        let tables_f32 = device::alloc(&gpu, 1 << 12, "step tables")?;
        let workspace = device::alloc(&gpu, 1, "decode workspace")?;
        let scalars = device::alloc(&gpu, t.max(1), "sampled ids")?;
        let bad_ids = device::alloc(&gpu, 1, "bad token counter")?;
        Ok(GpuExecutor {
            gpu,
            cfg,
            weights,
            pool,
            adapters: HashMap::new(),
            resident: HashMap::new(),
            requests: HashMap::new(),
            buffers,
            tables_i32,
            tables_f32,
            workspace,
            scalars,
            bad_ids,
            load_staging: Vec::new(),
            graphs_enabled: true,
            graph: None,
            last_eager_key: None,
            buffer_generation: 0,
            graph_replays: 0,
            last_logits: Vec::new(),
            phase_timing: false,
            last_phase_times: None,
            last_host_prep_s: 0.0,
            step_started: Instant::now(),
            lora_overlap: true,
            shrink_work_list: true,
            decode_rows_by_adapter: false,
            beside_sm_target: 0,
            prefill_lora_path: lora::PrefillPath::default(),
        })
    }

    /// Records the GPU time of each phase of every step (`last_phase_times`); steps then run
    /// launch by launch, since events inside a replayed graph cannot be read.
    pub fn set_phase_timing(&mut self, on: bool) {
        self.phase_timing = on;
        self.last_phase_times = None;
    }

    /// Runs decode-only steps as CUDA graphs (the default) or launch by launch.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs_enabled = on;
        self.graph = None;
    }

    /// Runs the decode rows' LoRA on a second stream, concurrently with the base GEMMs that
    /// read the same input (the default, for steps of at most
    /// `LORA_OVERLAP_MAX_DECODE_ROWS` decode rows), or always in line after them (the baseline
    /// `bench-gpu` compares against).
    pub fn set_lora_overlap(&mut self, on: bool) {
        self.lora_overlap = on;
        self.graph = None;
    }

    /// Launches the decode rows' MBGMV shrink over the step's work list of rank-row groups
    /// (the default) or over every row's `ceil(max_rank / 4)` groups, the blocks past a row's
    /// rank exiting at once (the baseline `bench-gpu` compares against).
    pub fn set_shrink_work_list(&mut self, on: bool) {
        self.shrink_work_list = on;
        self.graph = None;
    }

    /// Lays out each step's decode rows grouped by adapter (rows sharing one next to each
    /// other) instead of in the plan's order (off by default). Every per-row kernel computes
    /// each row as before; what changes is which MBGMV blocks run together, and so whether
    /// rows that share an adapter read its rows from L2 (docs/FIDELITY.md, session 25).
    /// `bench-gpu --only lora-sharing` and `replay --passes by-adapter` measure it.
    pub fn set_decode_rows_by_adapter(&mut self, on: bool) {
        self.decode_rows_by_adapter = on;
        self.graph = None;
    }

    /// Plans the q/k/v and o GEMMs of steps of at most `LORA_OVERLAP_MAX_DECODE_ROWS` rows
    /// (those the decode rows' LoRA runs beside) for `sm_target` SMs (0: the whole GPU, the
    /// default), with adapters or without. At decode batches those GEMMs are weight streams
    /// whose blocks fill every SM, so the LoRA kernels beside them only run in their tails;
    /// a GEMM sized for fewer SMs may leave the rest to the LoRA. `bench-gpu` measures it.
    pub fn set_beside_gemm_sms(&mut self, sm_target: u32) {
        self.beside_sm_target = sm_target;
        self.graph = None;
    }

    /// Runs the decode rows' LoRA beside the GEMMs at the device's greatest stream priority
    /// (off by default; see [`Gpu::set_urgent_lora`]).
    pub fn set_urgent_lora(&mut self, on: bool) {
        self.gpu.set_urgent_lora(on);
        self.graph = None;
    }

    /// Runs the prompt rows' LoRA on the tensor-core MBGMM kernels (the default) or on the
    /// SIMT ones (the baseline `bench-gpu` compares against).
    pub fn set_prefill_lora_path(&mut self, path: lora::PrefillPath) {
        self.prefill_lora_path = path;
    }

    /// Forgets every request and every resident adapter (for a new engine over the same pool).
    pub fn reset(&mut self) {
        self.requests.clear();
        self.resident.clear();
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.cfg
    }

    /// Registers adapter `id`'s weights in host memory (packed as pool rows).
    pub fn register_adapter(&mut self, id: AdapterId, adapter: &PeftAdapter) -> Result<()> {
        let m = &self.cfg.model;
        if adapter.rank > self.cfg.max_rank {
            return Err(Error::Plan {
                step: 0,
                reason: format!(
                    "{id} has rank {} but the executor was sized for ranks up to {}",
                    adapter.rank, self.cfg.max_rank
                ),
            });
        }
        adapter.check_shapes(m)?;
        let packed = packing::pack_adapter(
            m,
            adapter.rank,
            &adapter.targets,
            &|layer, module| adapter.module(layer, module).map(|(a, _)| a),
            &|layer, module| adapter.module(layer, module).map(|(_, b)| b),
        )?;
        // SAFETY: the pinned buffer is filled completely before any use.
        let mut pinned = unsafe { self.gpu.ctx.alloc_pinned::<f16>(packed.len()) }
            .map_err(driver_err("allocating pinned host memory for an adapter"))?;
        pinned
            .as_mut_slice()
            .map_err(driver_err("filling pinned memory"))?
            .copy_from_slice(&packed);
        let pages = slora_engine::AdapterSpec {
            rank: adapter.rank,
            targets: adapter.targets.clone(),
        }
        .pages(m) as usize;
        self.adapters.insert(
            id,
            HostAdapter {
                rank: adapter.rank,
                scale: adapter.scale(),
                targets: adapter.targets.clone(),
                pages,
                packed: Arc::new(pinned),
            },
        );
        Ok(())
    }

    /// Registers an adapter that shares packed host rows with another of the same shape.
    pub fn register_shared(&mut self, id: AdapterId, like: &HostAdapter) {
        self.adapters.insert(
            id,
            HostAdapter {
                rank: like.rank,
                scale: like.scale,
                targets: like.targets.clone(),
                pages: like.pages,
                packed: like.packed.clone(),
            },
        );
    }

    pub fn host_adapter(&self, id: AdapterId) -> Option<&HostAdapter> {
        self.adapters.get(&id)
    }

    /// Gives a request its prompt tokens before the engine first schedules it.
    pub fn add_request(&mut self, id: RequestId, prompt: Vec<u32>) -> Result<()> {
        let vocab = self.cfg.model.vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(Error::Plan {
                step: 0,
                reason: format!("{id}: token id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        self.requests.insert(
            id,
            RequestState {
                tokens: prompt,
                pages: Vec::new(),
            },
        );
        Ok(())
    }

    /// Forgets a request that finished (or was aborted) and returns its tokens.
    /// A request whose first `pages.len()` tokens already have KV rows in `pages` (their
    /// contents are whatever the pool holds): `calibrate` times decode and chunked-prefill
    /// steps at long contexts without running the prefills first.
    pub fn add_prefilled(&mut self, id: RequestId, tokens: Vec<u32>, pages: Vec<i32>) {
        self.requests.insert(id, RequestState { tokens, pages });
    }

    pub fn remove_request(&mut self, id: RequestId) -> Option<Vec<u32>> {
        self.requests.remove(&id).map(|r| r.tokens)
    }

    pub fn tokens(&self, id: RequestId) -> Option<&[u32]> {
        self.requests.get(&id).map(|r| r.tokens.as_slice())
    }

    fn plan_err(step: u64, reason: String) -> Error {
        Error::Plan { step, reason }
    }

    /// Copies every load of the plan into its pages (all before compute; see the module doc
    /// of `AdapterLoad`: a load completes within its step).
    fn load_adapters(&mut self, plan: &StepPlan) -> Result<Option<CudaEvent>> {
        let m = &self.cfg.model;
        for ev in &plan.evictions {
            self.resident.remove(ev);
        }
        if plan.loads.is_empty() {
            return Ok(None);
        }
        let copy = self.gpu.copy_stream.clone();
        for load in &plan.loads {
            let host = self.adapters.get(&load.adapter).ok_or_else(|| {
                Self::plan_err(
                    plan.step,
                    format!("{} is loaded but was never registered", load.adapter),
                )
            })?;
            let pages: Vec<i32> = plan
                .pages_of(load.pages)
                .iter()
                .map(|p| p.0 as i32)
                .collect();
            if pages.len() != host.pages {
                return Err(Self::plan_err(
                    plan.step,
                    format!(
                        "{} needs {} pages, the plan gives {}",
                        load.adapter,
                        host.pages,
                        pages.len()
                    ),
                ));
            }
            // A real host-to-device copy of every byte, each load, from pinned memory on the
            // copy stream; then one scatter of the rows into their (non-contiguous) pages.
            // SAFETY: the staging buffer is fully overwritten by the copy before the scatter
            // reads it (both on the copy stream, in order).
            let mut staging = unsafe { copy.alloc::<f16>(host.packed.len()) }
                .map_err(driver_err("allocating adapter staging"))?;
            copy.memcpy_htod(host.packed.as_ref(), &mut staging)
                .map_err(driver_err(format!(
                    "copying {} to the device",
                    load.adapter
                )))?;
            let page_ids = copy
                .clone_htod(&pages)
                .map_err(driver_err("uploading adapter pages"))?;
            device::scatter_rows(
                &self.gpu,
                &copy,
                &staging,
                &mut self.pool,
                &page_ids,
                pages.len(),
                m.num_layers as usize,
                m.page_width() as usize,
                self.cfg.pool_pages as usize,
            )?;
            self.load_staging.push((staging, page_ids));
            self.resident.insert(load.adapter, pages);
        }
        let done = copy
            .record_event(None)
            .map_err(driver_err("recording the loads' event"))?;
        // Compute waits only for loads this step uses; prefetches overlap the step.
        if plan.loads.iter().any(|l| l.blocking) {
            self.gpu
                .stream
                .wait(&done)
                .map_err(driver_err("waiting for blocking adapter loads"))?;
        }
        Ok(Some(done))
    }

    fn run(&mut self, plan: &StepPlan) -> Result<()> {
        self.step_started = Instant::now();
        self.last_host_prep_s = 0.0;
        for a in &plan.aborted {
            self.requests.remove(&a.request);
        }
        for p in &plan.preempted {
            if let Some(r) = self.requests.get_mut(p) {
                r.pages.clear();
            }
        }
        let loads = self.load_adapters(plan)?;
        let result = if plan.has_compute() {
            if self.phase_timing {
                self.gpu.start_phase_timing();
                let r = self.forward(plan);
                let times = self.gpu.finish_phase_timing();
                r.and_then(|()| {
                    self.last_phase_times = Some(times?);
                    Ok(())
                })
            } else {
                self.forward(plan)
            }
        } else {
            Ok(())
        };
        // Every load completes within its step (the engine marks it resident when the step
        // completes); prefetches have overlapped the forward pass.
        if let Some(done) = loads {
            done.synchronize()
                .map_err(driver_err("waiting for adapter loads"))?;
        }
        self.load_staging.clear();
        result
    }

    /// The model's forward pass over the plan's prefill and decode rows, and sampling.
    fn forward(&mut self, plan: &StepPlan) -> Result<()> {
        let step = plan.step;
        let m = self.cfg.model.clone();
        let (h, i_size, vocab) = (
            m.hidden_size as usize,
            m.intermediate_size as usize,
            m.vocab_size as usize,
        );
        let (nh, nkv, d) = (
            m.num_heads as usize,
            m.num_kv_heads as usize,
            m.head_dim() as usize,
        );
        let (qw, kvw) = (nh * d, nkv * d);

        // ---- Host-side tables for this step ------------------------------------------------
        let mut token_ids: Vec<i32> = Vec::new();
        let mut positions: Vec<i32> = Vec::new();
        let mut slots: Vec<i32> = Vec::new();
        let mut kv_table: Vec<i32> = Vec::new();
        // Prefill segments.
        let mut seg_start: Vec<i32> = vec![0];
        let mut seg_context: Vec<i32> = Vec::new();
        let mut seg_table: Vec<i32> = Vec::new();
        let mut seg_adapter: Vec<Option<AdapterId>> = Vec::new();
        // Decode rows.
        let mut dec_table: Vec<i32> = Vec::new();
        let mut dec_len: Vec<i32> = Vec::new();
        let mut dec_adapter: Vec<Option<AdapterId>> = Vec::new();
        // Rows whose logits are needed: (row, request, position).
        let mut sample: Vec<(i32, RequestId, u32, bool)> = Vec::new();

        for p in &plan.prefill {
            let r = self.requests.get_mut(&p.request).ok_or_else(|| {
                Self::plan_err(step, format!("{} prefills but was never added", p.request))
            })?;
            let start = p.context_start as usize;
            let end = start + p.tokens as usize;
            if end > r.tokens.len() || r.pages.len() != start {
                return Err(Self::plan_err(
                    step,
                    format!(
                        "{}: prefill of tokens {start}..{end} but the request has {} tokens and {} pages",
                        p.request,
                        r.tokens.len(),
                        r.pages.len()
                    ),
                ));
            }
            r.pages
                .extend(plan.pages_of(p.pages).iter().map(|pg| pg.0 as i32));
            let row0 = token_ids.len() as i32;
            for (k, &t) in r.tokens[start..end].iter().enumerate() {
                token_ids.push(t as i32);
                positions.push((start + k) as i32);
            }
            slots.extend(plan.pages_of(p.pages).iter().map(|pg| pg.0 as i32));
            seg_table.push(kv_table.len() as i32);
            kv_table.extend_from_slice(&r.pages);
            seg_context.push(start as i32);
            seg_start.push(token_ids.len() as i32);
            seg_adapter.push(p.adapter);
            if self.cfg.record_prompt_logits {
                for k in 0..p.tokens {
                    let last = k + 1 == p.tokens;
                    sample.push((
                        row0 + k as i32,
                        p.request,
                        p.context_start + k,
                        last && p.emits_token,
                    ));
                }
            } else if p.emits_token {
                sample.push((row0 + p.tokens as i32 - 1, p.request, end as u32 - 1, true));
            }
        }
        let prefill_rows = token_ids.len();
        // Grouped by adapter only when asked: the plan's order costs nothing to keep.
        let grouped: Option<Vec<usize>> = self.decode_rows_by_adapter.then(|| {
            let adapters: Vec<Option<AdapterId>> = plan.decode.iter().map(|d| d.adapter).collect();
            lora::decode_rows_by_adapter(&adapters)
        });
        for i in 0..plan.decode.len() {
            let dw = &plan.decode[grouped.as_ref().map_or(i, |order| order[i])];
            let r = self.requests.get_mut(&dw.request).ok_or_else(|| {
                Self::plan_err(step, format!("{} decodes but was never added", dw.request))
            })?;
            let pos = dw.context_len as usize;
            if r.tokens.len() != pos + 1 || r.pages.len() != pos {
                return Err(Self::plan_err(
                    step,
                    format!(
                        "{}: decode at position {pos} but the request has {} tokens and {} pages",
                        dw.request,
                        r.tokens.len(),
                        r.pages.len()
                    ),
                ));
            }
            r.pages.push(dw.page.0 as i32);
            sample.push((token_ids.len() as i32, dw.request, pos as u32, true));
            token_ids.push(r.tokens[pos] as i32);
            positions.push(pos as i32);
            slots.push(dw.page.0 as i32);
            dec_table.push(kv_table.len() as i32);
            kv_table.extend_from_slice(&r.pages);
            dec_len.push(pos as i32 + 1);
            dec_adapter.push(dw.adapter);
        }
        let rows = token_ids.len();
        let decode_rows = rows - prefill_rows;
        if rows > self.cfg.max_step_tokens {
            return Err(Self::plan_err(
                step,
                format!(
                    "{rows} token rows exceed the executor's {} ",
                    self.cfg.max_step_tokens
                ),
            ));
        }

        // LoRA tables: page lists of the adapters used, and per module the offset of its rows.
        let mut adapter_pages: Vec<i32> = Vec::new();
        let mut adapter_base: HashMap<AdapterId, usize> = HashMap::new();
        for a in seg_adapter.iter().chain(dec_adapter.iter()).flatten() {
            if adapter_base.contains_key(a) {
                continue;
            }
            let pages = self.resident.get(a).ok_or_else(|| {
                Self::plan_err(step, format!("{a} is used but not resident on the device"))
            })?;
            adapter_base.insert(*a, adapter_pages.len());
            adapter_pages.extend_from_slice(pages);
        }
        let module_tables = |module: TargetModule,
                             list: &[Option<AdapterId>]|
         -> (Vec<i32>, Vec<i32>, Vec<f32>) {
            let mut off = Vec::with_capacity(list.len());
            let mut rank = Vec::with_capacity(list.len());
            let mut scale = Vec::with_capacity(list.len());
            for a in list {
                match a.and_then(|a| self.adapters.get(&a).map(|h| (a, h))) {
                    Some((a, host)) if host.targets.contains(&module) => {
                        off.push(
                            (adapter_base[&a]
                                + packing::module_row_offset(&m, host.rank, &host.targets, module))
                                as i32,
                        );
                        rank.push(host.rank as i32);
                        scale.push(host.scale);
                    }
                    _ => {
                        off.push(-1);
                        rank.push(0);
                        scale.push(0.0);
                    }
                }
            }
            (off, rank, scale)
        };

        // ---- Upload: one copy of every table ---------------------------------------------------
        let mut arena = TableArena::default();
        let r_tokens = arena.ints(&token_ids);
        let r_pos = arena.ints(&positions);
        let r_slots = arena.ints(&slots);
        let r_seg_start = arena.ints(&seg_start);
        let r_seg_ctx = arena.ints(&seg_context);
        let r_seg_tab = arena.ints(&seg_table);
        let r_dec_tab = arena.ints(&dec_table);
        let r_dec_len = arena.ints(&dec_len);
        let r_apages = arena.ints(&adapter_pages);
        let sample_rows: Vec<i32> = sample.iter().map(|s| s.0).collect();
        let r_sample = arena.ints(&sample_rows);
        let mut lora_ranges: HashMap<(TargetModule, bool), LoraRanges> = HashMap::new();
        // The LoRA kernels' rank columns: the highest rank this step's rows have, not the
        // executor's largest. The MBGMV shrink launches ceil(max_rank / 4) blocks per row and
        // the rows of lower ranks leave the rest idle, so a batch of rank-8 rows in an
        // executor sized for rank 64 paid for 16 blocks a row (calibrate's rank-8 grid ran
        // 34-44% above live S1 steps served with max rank 8; docs/FIDELITY.md, session 19).
        let mut step_max_rank = 0usize;
        // Each decode row's highest rank over the modules: the MBGMV shrink's work list.
        let mut dec_row_rank = vec![0usize; dec_adapter.len()];
        for module in TargetModule::ATTENTION {
            for (is_decode, list) in [(false, &seg_adapter), (true, &dec_adapter)] {
                if list.is_empty() {
                    continue;
                }
                let (o, r, sc) = module_tables(module, list);
                step_max_rank = step_max_rank.max(r.iter().copied().max().unwrap_or(0) as usize);
                if is_decode {
                    for (highest, &rank) in dec_row_rank.iter_mut().zip(&r) {
                        *highest = (*highest).max(rank as usize);
                    }
                }
                lora_ranges.insert(
                    (module, is_decode),
                    LoraRanges {
                        offset: arena.ints(&o),
                        rank: arena.ints(&r),
                        scale: arena.floats(&sc),
                    },
                );
            }
        }
        // At least 1: the LoRA shapes are checked even where no row has an adapter.
        let max_rank = step_max_rank.clamp(1, self.cfg.max_rank.max(1) as usize);
        // The decode rows' MBGMV shrink launches only the rank-row groups each row has (the
        // full grid, ceil(max_rank / 4) groups a row, left about half its blocks idle in a
        // batch of ranks 8..64).
        let r_shrink_work = (self.shrink_work_list && !dec_adapter.is_empty())
            .then(|| arena.ints(&lora::shrink_work(dec_row_rank, max_rank)));
        // Last: it grows every decode step, and everything before it keeps its offsets, so a
        // captured decode graph stays valid while the batch is unchanged.
        let r_kv = arena.ints(&kv_table);
        let r_kv_start = r_kv.start;
        if arena.ints.len() > self.tables_i32.len() {
            self.tables_i32 = device::alloc(
                &self.gpu,
                arena.ints.len().next_power_of_two(),
                "step tables",
            )?;
            self.buffer_generation += 1;
        }
        if arena.floats.len() > self.tables_f32.len() {
            self.tables_f32 = device::alloc(
                &self.gpu,
                arena.floats.len().next_power_of_two(),
                "step tables",
            )?;
            self.buffer_generation += 1;
        }
        if !arena.ints.is_empty() {
            self.gpu
                .stream
                .memcpy_htod(
                    &arena.ints,
                    &mut self.tables_i32.slice_mut(..arena.ints.len()),
                )
                .map_err(driver_err("uploading the step's tables"))?;
        }
        if !arena.floats.is_empty() {
            self.gpu
                .stream
                .memcpy_htod(
                    &arena.floats,
                    &mut self.tables_f32.slice_mut(..arena.floats.len()),
                )
                .map_err(driver_err("uploading the step's LoRA scales"))?;
        }
        let any_lora = !adapter_pages.is_empty();
        // The decode rows' LoRA goes on the LoRA stream when some decode row has an adapter:
        // its shrink and expand then overlap the q/k/v and o GEMMs, which read the same input
        // and at decode batch sizes leave bandwidth and SMs idle (launch gaps, tails, too few
        // output tiles). Phase timing needs every kernel in line on the compute stream.
        let overlap_lora = any_lora
            && self.lora_overlap
            && !self.phase_timing
            && decode_rows <= LORA_OVERLAP_MAX_DECODE_ROWS
            && dec_adapter.iter().any(Option::is_some);
        // The SM target of the q/k/v and o GEMMs (`set_beside_gemm_sms`) holds for every step
        // of at most LORA_OVERLAP_MAX_DECODE_ROWS rows, with adapters or not, so that a step
        // and the same step without adapters differ by the LoRA alone, not by the GEMMs'
        // algorithms.
        let beside_sms =
            if self.lora_overlap && !self.phase_timing && rows <= LORA_OVERLAP_MAX_DECODE_ROWS {
                self.beside_sm_target
            } else {
                0
            };
        let ti = &self.tables_i32;
        let tf = &self.tables_f32;
        let d_tokens = ti.slice(r_tokens);
        let d_pos = ti.slice(r_pos);
        let d_slots = ti.slice(r_slots);
        let d_kv = ti.slice(r_kv);
        let d_seg_start = ti.slice(r_seg_start);
        let d_seg_ctx = ti.slice(r_seg_ctx);
        let d_seg_tab = ti.slice(r_seg_tab);
        let d_dec_tab = ti.slice(r_dec_tab);
        let d_dec_len = ti.slice(r_dec_len);
        let d_apages = ti.slice(r_apages);
        let d_sample = ti.slice(r_sample);
        let shrink_blocks = r_shrink_work.as_ref().map_or(0, |r| r.len());
        let d_shrink_work = r_shrink_work.map(|r| ti.slice(r));
        let lora_dev: HashMap<(TargetModule, bool), LoraTablesDev<'_>> = lora_ranges
            .iter()
            .map(|(k, r)| {
                (
                    *k,
                    LoraTablesDev {
                        offset: ti.slice(r.offset.clone()),
                        rank: ti.slice(r.rank.clone()),
                        scale: tf.slice(r.scale.clone()),
                    },
                )
            })
            .collect();
        let max_segment_len = seg_start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);

        // Attention plans: one per step, shared by every layer (the tables do not change).
        let shape = attention::AttentionShape::new(nh, nkv, d);
        let pool_pages = self.cfg.pool_pages as usize;
        let store_plan = attention::plan_kv_store(shape, pool_pages, &slots)?;
        let prefill_plan = if prefill_rows > 0 {
            Some(attention::plan_prefill(
                shape,
                pool_pages,
                &attention::PrefillTables {
                    kv_pages: &kv_table,
                    seg_start: &seg_start,
                    context_start: &seg_context,
                    table_offset: &seg_table,
                },
            )?)
        } else {
            None
        };
        let decode_plan = if decode_rows > 0 {
            Some(attention::plan_decode(
                shape,
                pool_pages,
                &attention::DecodeTables {
                    kv_pages: &kv_table,
                    table_offset: &dec_table,
                    ctx_len: &dec_len,
                },
            )?)
        } else {
            None
        };
        let max_ctx = dec_len.iter().copied().max().unwrap_or(1) as usize;
        let ws_elems = attention::decode_workspace_elems(&shape, decode_rows.max(1), max_ctx);
        if ws_elems > self.workspace.len() {
            self.workspace =
                device::alloc::<f32>(&self.gpu, ws_elems.next_power_of_two(), "decode workspace")?;
            self.buffer_generation += 1;
        }

        let n_sample = sample.len();
        self.last_host_prep_s = self.step_started.elapsed().as_secs_f64();
        // ---- Forward --------------------------------------------------------------------------
        // Decode-only steps run as a CUDA graph: captured the first time a batch shape is seen,
        // replayed (one launch instead of ~20 per layer) while it is unchanged. Any capture
        // failure turns graphs off for this executor and the step runs launch by launch.
        let graph_key =
            (decode_rows > 0 && prefill_rows == 0 && self.graphs_enabled && !self.phase_timing)
                .then(|| GraphKey {
                    rows,
                    max_rank: step_max_rank,
                    shrink_blocks,
                    adapter_pages: adapter_pages.len(),
                    lora: {
                        let mut k: Vec<(u8, bool)> =
                            lora_ranges.keys().map(|(m, d)| (*m as u8, *d)).collect();
                        k.sort_unstable();
                        k
                    },
                    partitions: decode_plan.as_ref().map_or(0, |p| p.partitions),
                    overlap_lora,
                    urgent_lora: self.gpu.urgent_lora(),
                    beside_sm_target: self.beside_sm_target,
                    kv_offset: r_kv_start,
                    generation: self.buffer_generation,
                });
        let replay = graph_key.is_some()
            && self.graph.as_ref().map(|(k, _)| Some(k)) == Some(graph_key.as_ref());
        if replay {
            let (_, graph) = self.graph.as_ref().expect("checked above");
            graph
                .launch()
                .map_err(driver_err("replaying the decode graph"))?;
            self.graph_replays += 1;
        } else {
            let capture = graph_key.is_some() && graph_key == self.last_eager_key;
            self.last_eager_key = if capture { None } else { graph_key.clone() };
            if capture {
                self.graph = None;
                self.gpu
                    .stream
                    .begin_capture(
                        cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
                    )
                    .map_err(driver_err("beginning graph capture"))?;
            }
            let mut enqueue = || -> Result<()> {
                let g = &self.gpu;
                let b = &mut self.buffers;
                let w = &self.weights;
                let eps = self.cfg.rms_norm_eps;
                g.mark(Phase::Dense)?;
                layers::embedding(
                    g,
                    &d_tokens.slice(..rows),
                    &w.embed.slice(..),
                    &mut b.hidden.slice_mut(..rows * h),
                    &mut self.bad_ids.slice_mut(..),
                    rows,
                    h,
                    vocab,
                )?;
                let rope_shape = layers::RopeShape {
                    tokens: rows,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: d,
                    theta: m.rope_theta as f32,
                };
                let lora_step = LoraStep {
                    g,
                    pages: &d_apages,
                    tables: &lora_dev,
                    seg_start: &d_seg_start,
                    prefill_rows,
                    decode_rows,
                    max_rank,
                    shrink_work: d_shrink_work.as_ref(),
                    max_segment_len,
                    pool_pages,
                    page_w: kvw,
                    prefill_path: self.prefill_lora_path,
                };
                for (l, lw) in w.layers.iter().enumerate() {
                    let layer = attention::layer_kv_range(l, pool_pages, kvw);
                    let side = pool_pages * kvw;
                    // Attention block: residual += previous output (layer 0: residual = embeddings).
                    if l == 0 {
                        g.stream
                            .memcpy_dtod(
                                &b.hidden.slice(..rows * h),
                                &mut b.residual.slice_mut(..rows * h),
                            )
                            .map_err(driver_err("residual copy"))?;
                        layers::rms_norm(
                            g,
                            &b.residual.slice(..rows * h),
                            &lw.input_norm.slice(..),
                            &mut b.normed.slice_mut(..rows * h),
                            rows,
                            h,
                            eps,
                        )?;
                    } else {
                        layers::add_rms_norm(
                            g,
                            &mut b.residual.slice_mut(..rows * h),
                            &b.hidden.slice(..rows * h),
                            &lw.input_norm.slice(..),
                            &mut b.normed.slice_mut(..rows * h),
                            rows,
                            h,
                            eps,
                            None,
                        )?;
                    }
                    let (p_rows, n_rows) = (prefill_rows, decode_rows);
                    if overlap_lora {
                        // The decode rows' q/k/v deltas, beside the q/k/v GEMM (both read
                        // `normed`); split_qkv adds them after the join.
                        g.fork_lora()?;
                        let ctx = LoraLayer::new(&lora_step, &self.pool, layer.clone(), side);
                        let s = g.lora();
                        let dq = b.lora_dq.slice_mut(..n_rows * qw);
                        let dk = b.lora_dk.slice_mut(..n_rows * kvw);
                        let dv = b.lora_dv.slice_mut(..n_rows * kvw);
                        lora_qkv_decode(
                            &ctx,
                            s,
                            h,
                            [
                                (TargetModule::Q, qw),
                                (TargetModule::K, kvw),
                                (TargetModule::V, kvw),
                            ],
                            &b.normed,
                            [dq, dk, dv],
                            &mut b.lora_side_scratch,
                        )?;
                    }
                    device::linear_on_sms(
                        g,
                        &b.normed.slice(..rows * h),
                        &lw.qkv,
                        &mut b.qkv.slice_mut(..rows * (qw + 2 * kvw)),
                        rows,
                        h,
                        qw + 2 * kvw,
                        beside_sms,
                    )?;
                    let qkv_delta = overlap_lora.then(|| layers::QkvDelta {
                        first_row: p_rows,
                        dq: b.lora_dq.slice(..n_rows * qw),
                        dk: b.lora_dk.slice(..n_rows * kvw),
                        dv: b.lora_dv.slice(..n_rows * kvw),
                    });
                    if overlap_lora {
                        g.join_lora()?;
                    }
                    layers::split_qkv(
                        g,
                        &b.qkv.slice(..rows * (qw + 2 * kvw)),
                        [
                            &mut b.q.slice_mut(..rows * qw),
                            &mut b.k.slice_mut(..rows * kvw),
                            &mut b.v.slice_mut(..rows * kvw),
                        ],
                        rows,
                        qw,
                        kvw,
                        qkv_delta.as_ref(),
                    )?;
                    if any_lora {
                        let ctx = LoraLayer::new(&lora_step, &self.pool, layer.clone(), side);
                        // Prefill segments module by module; decode rows of q, k and v in one
                        // fused shrink and one fused expand (they share x and the adapter).
                        for (module, out_w, y) in [
                            (TargetModule::Q, qw, &mut b.q),
                            (TargetModule::K, kvw, &mut b.k),
                            (TargetModule::V, kvw, &mut b.v),
                        ] {
                            lora_apply(
                                &ctx,
                                module,
                                h,
                                out_w,
                                &b.normed,
                                y,
                                &mut b.lora_scratch,
                                false,
                            )?;
                        }
                        if !overlap_lora {
                            lora_qkv_decode(
                                &ctx,
                                &g.stream,
                                h,
                                [
                                    (TargetModule::Q, qw),
                                    (TargetModule::K, kvw),
                                    (TargetModule::V, kvw),
                                ],
                                &b.normed,
                                [
                                    b.q.slice_mut(p_rows * qw..(p_rows + n_rows) * qw),
                                    b.k.slice_mut(p_rows * kvw..(p_rows + n_rows) * kvw),
                                    b.v.slice_mut(p_rows * kvw..(p_rows + n_rows) * kvw),
                                ],
                                &mut b.lora_scratch,
                            )?;
                        }
                    }
                    g.mark(Phase::Dense)?;
                    layers::rope(
                        g,
                        &mut b.q.slice_mut(..rows * qw),
                        &mut b.k.slice_mut(..rows * kvw),
                        &d_pos.slice(..rows),
                        &rope_shape,
                    )?;
                    attention::kv_store(
                        g,
                        &store_plan,
                        &b.k.slice(..rows * kvw),
                        &b.v.slice(..rows * kvw),
                        &d_slots.slice(..rows),
                        &mut self.pool.slice_mut(layer.clone()),
                    )?;
                    let layer_kv = self.pool.slice(layer.clone());
                    if let Some(plan) = &prefill_plan {
                        g.mark(Phase::AttentionPrefill)?;
                        let tables = attention::PrefillTablesOnDevice {
                            kv_pages: d_kv.slice(..),
                            seg_start: d_seg_start.slice(..),
                            context_start: d_seg_ctx.slice(..),
                            table_offset: d_seg_tab.slice(..),
                        };
                        attention::prefill_attention(
                            g,
                            plan,
                            &b.q.slice(..prefill_rows * qw),
                            &layer_kv,
                            &tables,
                            &mut b.attn.slice_mut(..prefill_rows * qw),
                        )?;
                    }
                    if let Some(plan) = &decode_plan {
                        g.mark(Phase::AttentionDecode)?;
                        let tables = attention::DecodeTablesOnDevice {
                            kv_pages: d_kv.slice(..),
                            table_offset: d_dec_tab.slice(..),
                            ctx_len: d_dec_len.slice(..),
                        };
                        attention::decode_attention(
                            g,
                            plan,
                            &b.q.slice(prefill_rows * qw..rows * qw),
                            &layer_kv,
                            &tables,
                            &mut self.workspace.slice_mut(..),
                            &mut b.attn.slice_mut(prefill_rows * qw..rows * qw),
                        )?;
                    }
                    g.mark(Phase::Dense)?;
                    if overlap_lora {
                        // The decode rows' o delta, beside the o GEMM (both read `attn`);
                        // add_rms_norm adds it to the GEMM's output after the join.
                        g.fork_lora()?;
                        let ctx = LoraLayer::new(&lora_step, &self.pool, layer.clone(), side);
                        let mut d_o = b.lora_do.slice_mut(..n_rows * h);
                        lora_decode_on(
                            &ctx,
                            g.lora(),
                            TargetModule::O,
                            qw,
                            h,
                            &b.attn.slice(p_rows * qw..(p_rows + n_rows) * qw),
                            &mut d_o,
                            &mut b.lora_side_scratch,
                        )?;
                    }
                    device::linear_on_sms(
                        g,
                        &b.attn.slice(..rows * qw),
                        &lw.o,
                        &mut b.hidden.slice_mut(..rows * h),
                        rows,
                        qw,
                        h,
                        beside_sms,
                    )?;
                    if any_lora {
                        let ctx = LoraLayer::new(&lora_step, &self.pool, layer.clone(), side);
                        lora_apply(
                            &ctx,
                            TargetModule::O,
                            qw,
                            h,
                            &b.attn,
                            &mut b.hidden,
                            &mut b.lora_scratch,
                            !overlap_lora,
                        )?;
                    }
                    let o_delta = overlap_lora.then(|| layers::RowDelta {
                        first_row: p_rows,
                        delta: b.lora_do.slice(..n_rows * h),
                    });
                    if overlap_lora {
                        g.join_lora()?;
                    }
                    // MLP block: residual += attention output; normed = rms_norm(residual).
                    g.mark(Phase::Dense)?;
                    layers::add_rms_norm(
                        g,
                        &mut b.residual.slice_mut(..rows * h),
                        &b.hidden.slice(..rows * h),
                        &lw.post_norm.slice(..),
                        &mut b.normed.slice_mut(..rows * h),
                        rows,
                        h,
                        eps,
                        o_delta.as_ref(),
                    )?;
                    device::linear(
                        g,
                        &b.normed.slice(..rows * h),
                        &lw.gate_up,
                        &mut b.gate_up.slice_mut(..rows * 2 * i_size),
                        rows,
                        h,
                        2 * i_size,
                        false,
                    )?;
                    layers::silu_mul(
                        g,
                        &b.gate_up.slice(..rows * 2 * i_size),
                        &mut b.mlp.slice_mut(..rows * i_size),
                        rows,
                        i_size,
                    )?;
                    device::linear(
                        g,
                        &b.mlp.slice(..rows * i_size),
                        &lw.down,
                        &mut b.hidden.slice_mut(..rows * h),
                        rows,
                        i_size,
                        h,
                        false,
                    )?;
                }
                // residual += last MLP output; normed = final norm.
                g.mark(Phase::LmHead)?;
                layers::add_rms_norm(
                    g,
                    &mut b.residual.slice_mut(..rows * h),
                    &b.hidden.slice(..rows * h),
                    &w.norm.slice(..),
                    &mut b.normed.slice_mut(..rows * h),
                    rows,
                    h,
                    eps,
                    None,
                )?;
                device::gather_rows(
                    g,
                    &b.normed.slice(..rows * h),
                    &d_sample,
                    &mut b.sample_rows.slice_mut(..n_sample * h),
                    n_sample,
                    h,
                )?;
                device::linear(
                    g,
                    &b.sample_rows.slice(..n_sample * h),
                    &w.lm_head,
                    &mut b.logits16.slice_mut(..n_sample * vocab),
                    n_sample,
                    h,
                    vocab,
                    false,
                )?;
                device::cast_f16_f32(
                    g,
                    &b.logits16.slice(..n_sample * vocab),
                    &mut b.logits32.slice_mut(..n_sample * vocab),
                    n_sample * vocab,
                )?;
                let mut d_ids = self.scalars.slice_mut(..n_sample);
                g.mark(Phase::Sampling)?;
                sampling::argmax(
                    g,
                    &b.logits32.slice(..n_sample * vocab),
                    &mut d_ids,
                    n_sample,
                    vocab,
                )?;
                Ok(())
            };
            let enqueued = enqueue();
            if capture {
                use cudarc::driver::sys::CUgraphInstantiate_flags as Flags;
                // Kernel nodes carry their capture stream's priority; only this flag makes
                // a replay honour it (the urgent LoRA stream's). The graph allocates
                // nothing, so it needs no auto-free.
                let flags = if self.gpu.urgent_lora() {
                    Flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
                } else {
                    Flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
                };
                let captured = self.gpu.stream.end_capture(flags);
                match (enqueued, captured) {
                    (Ok(()), Ok(Some(graph))) => {
                        graph
                            .launch()
                            .map_err(driver_err("launching the decode graph"))?;
                        self.graph = graph_key.map(|k| (k, graph));
                    }
                    _ => {
                        // Capture is not possible here: turn graphs off and run eagerly (a
                        // genuine launch error shows up again in the eager run).
                        self.graphs_enabled = false;
                        enqueue()?;
                    }
                }
            } else {
                enqueued?;
            }
        }
        let g = &self.gpu;
        let b = &mut self.buffers;
        let d_ids = self.scalars.slice(..n_sample);
        let ids = g
            .stream
            .clone_dtoh(&d_ids)
            .map_err(driver_err("reading sampled ids"))?;
        if self.cfg.record_prompt_logits {
            let all = g
                .stream
                .clone_dtoh(&b.logits32.slice(..n_sample * vocab))
                .map_err(driver_err("reading logits"))?;
            self.last_logits = sample
                .iter()
                .enumerate()
                .map(|(k, s)| (s.1, s.2, all[k * vocab..(k + 1) * vocab].to_vec()))
                .collect();
        }
        g.synchronize()?;
        for (k, s) in sample.iter().enumerate() {
            if s.3 {
                if let Some(r) = self.requests.get_mut(&s.1) {
                    r.tokens.push(ids[k] as u32);
                }
            }
        }
        Ok(())
    }
}

/// Per-step LoRA tables of one module on the device (for the prefill segments or the
/// decode rows).
struct LoraTablesDev<'a> {
    offset: CudaView<'a, i32>,
    rank: CudaView<'a, i32>,
    scale: CudaView<'a, f32>,
}

/// Where one module's LoRA tables sit in the step's table upload.
struct LoraRanges {
    offset: std::ops::Range<usize>,
    rank: std::ops::Range<usize>,
    scale: std::ops::Range<usize>,
}

/// What every LoRA launch of a step shares.
struct LoraStep<'a> {
    g: &'a Gpu,
    pages: &'a CudaView<'a, i32>,
    tables: &'a HashMap<(TargetModule, bool), LoraTablesDev<'a>>,
    seg_start: &'a CudaView<'a, i32>,
    prefill_rows: usize,
    decode_rows: usize,
    max_rank: usize,
    /// The decode rows' MBGMV shrink work list (`lora::shrink_work`), or none: the full grid.
    shrink_work: Option<&'a CudaView<'a, i32>>,
    max_segment_len: usize,
    pool_pages: usize,
    page_w: usize,
    prefill_path: lora::PrefillPath,
}

/// A step's LoRA context for one layer: its K and V sides of the pool.
struct LoraLayer<'a> {
    step: &'a LoraStep<'a>,
    k_pool: CudaView<'a, f16>,
    v_pool: CudaView<'a, f16>,
}

impl<'a> LoraLayer<'a> {
    /// `layer` is the layer's `[2, pages, W]` range of the pool; `side` one side's length.
    fn new(
        step: &'a LoraStep<'a>,
        pool: &'a CudaSlice<f16>,
        layer: std::ops::Range<usize>,
        side: usize,
    ) -> LoraLayer<'a> {
        LoraLayer {
            step,
            k_pool: pool.slice(layer.start..layer.start + side),
            v_pool: pool.slice(layer.start + side..layer.end),
        }
    }
}

/// Adds the LoRA deltas of `module` to `y` for the prefill rows (segments) and decode rows.
#[allow(clippy::too_many_arguments)] // one module: its shapes, input, output, scratch, and whether decode rows are done here
fn lora_apply(
    layer: &LoraLayer<'_>,
    module: TargetModule,
    in_w: usize,
    out_w: usize,
    x: &CudaSlice<f16>,
    y: &mut CudaSlice<f16>,
    scratch: &mut CudaSlice<f32>,
    decode: bool,
) -> Result<()> {
    let c = layer.step;
    let shape = lora::LoraShape::new(in_w, out_w, c.page_w, c.max_rank, c.pool_pages);
    let (p, n) = (c.prefill_rows, c.decode_rows);
    if p > 0 {
        if let Some(t) = c.tables.get(&(module, false)) {
            lora::lora_prefill(
                c.g,
                &x.slice(..p * in_w),
                &layer.k_pool,
                &layer.v_pool,
                &c.pages.slice(..),
                &c.seg_start.slice(..),
                &t.offset.slice(..),
                &t.rank.slice(..),
                &t.scale.slice(..),
                &mut scratch.slice_mut(..),
                &mut y.slice_mut(..p * out_w),
                shape,
                c.max_segment_len,
                c.prefill_path,
            )?;
        }
    }
    if n > 0 && decode {
        lora_decode_on(
            layer,
            &c.g.stream,
            module,
            in_w,
            out_w,
            &x.slice(p * in_w..(p + n) * in_w),
            &mut y.slice_mut(p * out_w..(p + n) * out_w),
            scratch,
        )?;
    }
    Ok(())
}

/// Adds the decode rows' LoRA delta of `module` to `y [decode rows, out_w]` (fp16 in place),
/// or writes it whole into an f32 delta (MBGMV on `stream`; `x [decode rows, in_w]`). Without
/// decode tables for the module: nothing, or the delta zeroed.
#[allow(clippy::too_many_arguments)] // one module on one stream: its shapes, input, output, scratch
fn lora_decode_on<Y: lora::LoraOut>(
    layer: &LoraLayer<'_>,
    stream: &Arc<CudaStream>,
    module: TargetModule,
    in_w: usize,
    out_w: usize,
    x: &CudaView<'_, f16>,
    y: &mut CudaViewMut<'_, Y>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    let c = layer.step;
    let n = c.decode_rows;
    let Some(t) = c.tables.get(&(module, true)) else {
        if Y::WRITES_WHOLE {
            stream
                .memset_zeros(y)
                .map_err(driver_err(format!("zeroing the LoRA delta of {module}")))?;
        }
        return Ok(());
    };
    let shape = lora::LoraShape::new(in_w, out_w, c.page_w, c.max_rank, c.pool_pages);
    lora::lora_decode_with(
        c.g,
        stream,
        x,
        &layer.k_pool,
        &layer.v_pool,
        &c.pages.slice(..),
        &t.offset.slice(..),
        &t.rank.slice(..),
        &t.scale.slice(..),
        &mut scratch.slice_mut(..n * c.max_rank),
        y,
        c.shrink_work,
        shape,
        lora::DecodePath::Split,
    )
}

/// The decode rows' LoRA deltas of up to three modules sharing the input `x` (q, k, v): one
/// fused shrink launch and one fused expand launch on `stream` instead of three of each, added
/// to `ys` (each `[decode rows, out]`), or written whole into f32 deltas (zeroed for a module
/// without decode tables).
#[allow(clippy::too_many_arguments)] // three modules on one stream: shapes, input, outputs, scratch
fn lora_qkv_decode<Y: lora::LoraOut>(
    layer: &LoraLayer<'_>,
    stream: &Arc<CudaStream>,
    in_w: usize,
    modules: [(TargetModule, usize); 3],
    x: &CudaSlice<f16>,
    ys: [CudaViewMut<'_, Y>; 3],
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    let c = layer.step;
    let (p, n) = (c.prefill_rows, c.decode_rows);
    if n == 0 {
        return Ok(());
    }
    let mut outs = Vec::with_capacity(3);
    for ((module, out_w), mut y) in modules.into_iter().zip(ys) {
        if let Some(t) = c.tables.get(&(module, true)) {
            outs.push(lora::ModuleOut {
                page_offset: t.offset.slice(..),
                rank: t.rank.slice(..),
                scale: t.scale.slice(..),
                out_features: out_w,
                y,
            });
        } else if Y::WRITES_WHOLE {
            stream
                .memset_zeros(&mut y)
                .map_err(driver_err(format!("zeroing the LoRA delta of {module}")))?;
        }
    }
    if outs.is_empty() {
        return Ok(());
    }
    let shape = lora::LoraMultiShape {
        in_features: in_w,
        page_width: c.page_w,
        max_rank: c.max_rank,
        num_pages: c.pool_pages,
    };
    let count = outs.len();
    lora::lora_decode_multi(
        c.g,
        stream,
        &x.slice(p * in_w..(p + n) * in_w),
        &layer.k_pool,
        &layer.v_pool,
        &c.pages.slice(..),
        &mut outs,
        &mut scratch.slice_mut(..count * n * c.max_rank),
        c.shrink_work,
        shape,
    )
}

impl Executor for GpuExecutor {
    fn execute(&mut self, plan: &StepPlan) -> std::result::Result<StepReport, ExecError> {
        let start = Instant::now();
        self.run(plan).map_err(|e| ExecError::Device {
            step: plan.step,
            message: e.to_string(),
        })?;
        Ok(StepReport {
            step: plan.step,
            elapsed: slora_engine::Nanos(start.elapsed().as_nanos() as u64),
        })
    }
}
