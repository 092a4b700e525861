//! Cost models: how long a step takes on a GPU, with a breakdown of where the time goes.
//!
//! INTERFACE (fixed): `BatchShape`, `StepCost`, `CostModel`, `Provenance`.
//!
//! Below it: the GPU catalogue ([`gpu_catalogue`], [`find_gpu`]; every number cites its
//! datasheet), the derived roofline model [`AnalyticCost`] with its [`Efficiency`] factors
//! (defaults fitted to the H200 measurements in DESIGN.md, see [`Efficiency`]) for one GPU or
//! a tensor-parallel group of them ([`check_tensor_parallel`]), the KV pool size
//! [`kv_pool_pages_tp`] (what a page is at TP > 1 is documented there), and the calibration
//! profile file format ([`CalibrationProfile`],
//! [`load_profile`]) that `slora-plan calibrate` writes and the calibrated model
//! ([`crate::calibrated::CalibratedCost`]) reads.
//!
//! `step_cost` runs once per simulated step: `AnalyticCost` precomputes every rate in `new`,
//! so a call is a few dozen floating-point operations (about 60 ns), with no allocation.

use serde::{Deserialize, Serialize};
use slora_engine::plan::ContextHistogram;
use slora_engine::{ModelSpec, Nanos, SpecError, StepPlan, TargetModule};
use std::path::{Path, PathBuf};

/// Where a cost figure comes from. Every result is labelled with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// Roofline from datasheet numbers and efficiency factors.
    Derived,
    /// Lookup tables measured by `slora-plan calibrate` on a real GPU.
    Calibrated,
    /// Measured live on a GPU (`simulate --execute`).
    Executed,
}

/// The shape of one step, summarised for a cost model. Built from a `StepPlan` in O(batch).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchShape {
    /// Requests with prefill work this step, and their tokens.
    pub prefill_requests: u32,
    pub prefill_tokens: u32,
    /// Sum over prefill chunks of (query token, key token) pairs attended, causal:
    /// `tokens * context_start + tokens * (tokens + 1) / 2`.
    pub prefill_attention_pairs: u64,
    /// Longest prefill chunk (kernels pad to it within a block).
    pub max_prefill_tokens: u32,
    pub decode_requests: u32,
    /// Sum over decode requests of KV rows read (`context_len + 1`).
    pub decode_context_tokens: u64,
    /// Longest decode context.
    pub max_decode_context: u32,
    /// Decode requests by KV rows read (`context_len + 1`), in power-of-two buckets with each
    /// bucket's row sum, for cost models that see a skewed batch and not only its mean (the
    /// calibrated model). A shape built by hand may leave it empty: cost models then treat
    /// the decode batch as `decode_requests` requests at the mean context.
    pub decode_context_histogram: ContextHistogram,
    /// Tokens (prefill + decode) of requests that use an adapter.
    pub lora_tokens: u32,
    /// The prefill part of `lora_tokens` and of `lora_token_rank`, and the prefill chunks
    /// with an adapter: prompt tokens run a different LoRA kernel (MBGMM) from decode rows.
    #[serde(default)]
    pub prefill_lora_tokens: u32,
    #[serde(default)]
    pub prefill_lora_token_rank: u64,
    #[serde(default)]
    pub prefill_lora_segments: u32,
    /// Sum over those tokens of their adapter's rank (LoRA FLOPs scale with it).
    pub lora_token_rank: u64,
    /// The decode rows with an adapter by rank (power-of-two buckets with their rank sums),
    /// and the largest of those ranks. Empty in a shape built by hand or recorded before
    /// session 9: cost models then price the decode rows at their mean rank.
    #[serde(default)]
    pub decode_rank_histogram: ContextHistogram,
    #[serde(default)]
    pub max_decode_rank: u32,
    /// Distinct adapters of running requests, and the sum of their ranks (weights read once).
    pub distinct_adapters: u32,
    pub distinct_rank_sum: u64,
    /// Adapter bytes the step must copy before compute (blocking loads) and may overlap.
    pub blocking_load_bytes: u64,
    pub prefetch_load_bytes: u64,
}

impl BatchShape {
    /// How far the decode rows' contexts spread: `1 - mean context / longest context`, 0 when
    /// every row reads as many rows (or there are none), toward 1 when one long request sits
    /// among short ones.
    pub fn decode_context_spread(&self) -> f64 {
        let n = self.decode_requests as f64;
        let longest = self.max_decode_context as f64;
        if n == 0.0 || longest == 0.0 {
            return 0.0;
        }
        (1.0 - self.decode_context_tokens as f64 / n / longest).clamp(0.0, 1.0)
    }

    /// Summarises a plan in O(prefill entries + loads). `rank_of[a]` is adapter `a`'s rank.
    /// `distinct_adapters` counts the adapters of all running requests (a chunked prefill
    /// waiting for budget still holds its adapter on the device).
    pub fn from_plan(plan: &StepPlan, rank_of: &[u32]) -> BatchShape {
        // Decode aggregates and the pinned adapters' rank sum come with the plan (the engine
        // gathers them while planning); only the few prefill entries are walked here.
        let d = &plan.decode_stats;
        let mut s = BatchShape {
            decode_requests: plan.decode.len() as u32,
            decode_context_tokens: d.context_tokens,
            max_decode_context: d.max_context,
            decode_context_histogram: d.context_histogram,
            lora_tokens: d.lora_requests,
            lora_token_rank: d.lora_rank_sum,
            decode_rank_histogram: d.rank_histogram,
            max_decode_rank: d.max_rank,
            distinct_adapters: plan.distinct_adapters,
            distinct_rank_sum: plan.distinct_rank_sum,
            ..BatchShape::default()
        };
        for p in &plan.prefill {
            s.prefill_requests += 1;
            s.prefill_tokens += p.tokens;
            let t = p.tokens as u64;
            s.prefill_attention_pairs += t * p.context_start as u64 + t * (t + 1) / 2;
            s.max_prefill_tokens = s.max_prefill_tokens.max(p.tokens);
            if let Some(a) = p.adapter {
                let rank = rank_of[a.0 as usize] as u64 * t;
                s.lora_tokens += p.tokens;
                s.lora_token_rank += rank;
                s.prefill_lora_tokens += p.tokens;
                s.prefill_lora_token_rank += rank;
                s.prefill_lora_segments += 1;
            }
        }
        for l in &plan.loads {
            if l.blocking {
                s.blocking_load_bytes += l.bytes;
            } else {
                s.prefetch_load_bytes += l.bytes;
            }
        }
        s
    }

    pub fn tokens(&self) -> u32 {
        self.prefill_tokens + self.decode_requests
    }
}

/// Time of one step, by part. `total` is what the step takes end to end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepCost {
    pub base_gemm: Nanos,
    pub attention_prefill: Nanos,
    pub attention_decode: Nanos,
    pub lora_shrink: Nanos,
    pub lora_expand: Nanos,
    /// Host-to-device adapter copies the step waits for: blocking loads, plus the part of
    /// prefetch copies that outlasts compute.
    pub adapter_h2d: Nanos,
    pub sampling: Nanos,
    pub fixed_overhead: Nanos,
    /// Tensor-parallel collectives on the critical path: the all-reduces of every layer's
    /// attention and MLP outputs (and the embedding's), and the gather of the LM head's
    /// logits. Zero at TP 1.
    #[serde(default)]
    pub tp_communication: Nanos,
}

impl StepCost {
    /// The parts' names, in the order of [`StepCost::parts`].
    pub const PARTS: [&'static str; 9] = [
        "base_gemm",
        "attention_prefill",
        "attention_decode",
        "lora_shrink",
        "lora_expand",
        "adapter_h2d",
        "sampling",
        "fixed_overhead",
        "tp_communication",
    ];

    pub fn parts(&self) -> [Nanos; 9] {
        [
            self.base_gemm,
            self.attention_prefill,
            self.attention_decode,
            self.lora_shrink,
            self.lora_expand,
            self.adapter_h2d,
            self.sampling,
            self.fixed_overhead,
            self.tp_communication,
        ]
    }

    pub fn total(&self) -> Nanos {
        self.parts().iter().fold(Nanos::ZERO, |a, &b| a + b)
    }
}

/// Predicts step times. Implementations must be deterministic and cheap (called per step).
pub trait CostModel: Send + Sync {
    fn step_cost(&self, batch: &BatchShape) -> StepCost;
    fn provenance(&self) -> Provenance;
    /// One line for reports: GPU, model, TP, source of the numbers.
    fn describe(&self) -> String;
}

// =============================================================================================
// Below the fixed interface: the GPU catalogue, the derived (roofline) cost model, the KV pool
// size, and the calibration profile format.
// =============================================================================================

/// Bytes in a decimal gigabyte, the unit datasheets and our error messages use.
const GB: f64 = 1e9;

// ---------------------------------------------------------------------------------------------
// GPU catalogue
// ---------------------------------------------------------------------------------------------

/// One GPU kind, as its datasheet states it. Sizes and rates are decimal (1 GB = 1e9 bytes),
/// as NVIDIA writes them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSpec {
    /// Catalogue key used in scenarios (`h200`, `h100-sxm`, `l4`, ...).
    pub key: &'static str,
    /// Name for reports.
    pub name: &'static str,
    /// Device memory in bytes, the datasheet figure (141 GB -> 141e9). The driver reserves a
    /// little of it; `kv_pool_pages` takes a utilization factor for that and for fragmentation.
    pub memory_bytes: u64,
    /// Peak device-memory (HBM or GDDR) bandwidth, bytes/s.
    pub hbm_bandwidth: f64,
    /// Dense fp16/bf16 tensor-core rate, FLOP/s, with fp32 accumulate where the datasheet
    /// distinguishes. Never the 2:4-sparsity figure (which is twice this).
    pub dense_fp16_flops: f64,
    /// Streaming multiprocessors (SMs), and their maximum (boost) clock in Hz: together the
    /// SM-cycles per second that kernels bound by the SMs rather than by memory scale with
    /// (decode attention of grouped-query models: [`Efficiency::attention_flops_per_sm_cycle`]).
    pub sm_count: u32,
    pub sm_clock_hz: f64,
    /// Host link (PCIe) bandwidth per direction, bytes/s: half the datasheet's bidirectional
    /// figure, because adapter loads only flow host-to-device.
    pub host_link_bandwidth: f64,
    /// GPU-to-GPU bandwidth of one GPU per direction, bytes/s, over the link a
    /// tensor-parallel all-reduce uses: NVLink where the GPU has it (half the datasheet's
    /// total, which counts both directions), otherwise PCIe peer-to-peer (the per-direction
    /// PCIe figure). A ring all-reduce sends and receives at once on every GPU, so each
    /// direction carries its share: the per-direction figure is the one the derived model
    /// needs ([`AnalyticCost`], `tp_communication`). 0 means unknown: tensor parallelism is
    /// then refused.
    pub interconnect_bandwidth: f64,
    /// Price of one GPU-hour in USD. An assumption (see `sources`): scenarios override it.
    pub price_per_hour_usd: f64,
    /// Where each number comes from.
    pub sources: &'static str,
}

/// The price list every catalogue price comes from. Prices change often: they are a default.
macro_rules! price_list {
    () => {
        " Price: AWS EC2 On-Demand list price, us-east-1, Linux \
(https://aws.amazon.com/ec2/pricing/on-demand/), instance price divided by its GPU count, as \
recorded for this catalogue and not re-checked since; an ASSUMPTION that users override in the \
scenario (discounts, reserved capacity and other clouds differ widely). "
    };
}

static GPU_CATALOGUE: [GpuSpec; 7] = [
    GpuSpec {
        key: "h200",
        name: "NVIDIA H200 SXM 141GB",
        memory_bytes: 141_000_000_000,
        hbm_bandwidth: 4.8e12,
        dense_fp16_flops: 989.4e12,
        sm_count: 132,
        sm_clock_hz: 1.98e9,
        host_link_bandwidth: 64e9,
        interconnect_bandwidth: 450e9,
        price_per_hour_usd: 7.91,
        sources: concat!(
            "NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/), \
H200 SXM column: 141 GB HBM3e, 4.8 TB/s, FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity \
(dense = half = 989.4), NVLink 900 GB/s (450 per direction), PCIe Gen5 128 GB/s (64 per \
direction). 132 SMs at up to 1,980 MHz: the H200 is the H100 SXM5's GH100 chip (NVIDIA H100 Tensor \
Core GPU Architecture whitepaper: 132 SMs), and 1,980 MHz is `nvidia-smi`'s clocks.max.sm on the \
H200s this project measured (docs/fidelity/runs-9).",
            price_list!(),
            "p5en.48xlarge (8x H200) at $63.30/h = $7.91 per GPU-hour."
        ),
    },
    GpuSpec {
        key: "h100-sxm",
        name: "NVIDIA H100 SXM 80GB",
        memory_bytes: 80_000_000_000,
        hbm_bandwidth: 3.35e12,
        dense_fp16_flops: 989.4e12,
        sm_count: 132,
        sm_clock_hz: 1.98e9,
        host_link_bandwidth: 64e9,
        interconnect_bandwidth: 450e9,
        price_per_hour_usd: 6.88,
        sources: concat!(
            "NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/), \
H100 SXM column: 80 GB HBM3, 3.35 TB/s, FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity \
(dense 989.4), NVLink 900 GB/s (450 per direction), PCIe Gen5 128 GB/s. 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5) at up \
to 1,980 MHz (`nvidia-smi`'s clocks.max.sm on the H100 this project measured, \
docs/fidelity/runs-11).",
            price_list!(),
            "p5.48xlarge (8x H100) at \
$55.04/h = $6.88 per GPU-hour."
        ),
    },
    GpuSpec {
        key: "a100-80g",
        name: "NVIDIA A100 SXM4 80GB",
        memory_bytes: 80_000_000_000,
        hbm_bandwidth: 2.039e12,
        dense_fp16_flops: 312e12,
        sm_count: 108,
        sm_clock_hz: 1.41e9,
        host_link_bandwidth: 32e9,
        interconnect_bandwidth: 300e9,
        price_per_hour_usd: 3.43,
        sources: concat!(
            "NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/a100/), \
A100 80GB SXM column: 80 GB HBM2e, 2,039 GB/s, FP16/BF16 Tensor Core 312 TFLOPS dense \
(624 with sparsity), NVLink 600 GB/s (300 per direction), PCIe Gen4 64 GB/s. 108 SMs at a 1,410 MHz \
boost clock (NVIDIA A100 Tensor Core GPU Architecture whitepaper).",
            price_list!(),
            "p4de.24xlarge (8x A100 80GB) \
at $27.45/h = $3.43 per GPU-hour."
        ),
    },
    GpuSpec {
        key: "a100-40g",
        name: "NVIDIA A100 SXM4 40GB",
        memory_bytes: 40_000_000_000,
        hbm_bandwidth: 1.555e12,
        dense_fp16_flops: 312e12,
        sm_count: 108,
        sm_clock_hz: 1.41e9,
        host_link_bandwidth: 32e9,
        interconnect_bandwidth: 300e9,
        price_per_hour_usd: 2.75,
        sources: concat!(
            "NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/a100/), \
A100 40GB SXM column: 40 GB HBM2, 1,555 GB/s, FP16/BF16 Tensor Core 312 TFLOPS dense \
(624 with sparsity), NVLink 600 GB/s (300 per direction), PCIe Gen4 64 GB/s. 108 SMs at a 1,410 MHz \
boost clock (NVIDIA A100 Tensor Core GPU Architecture whitepaper).",
            price_list!(),
            "p4d.24xlarge (8x A100 40GB) \
at $21.96/h = $2.75 per GPU-hour."
        ),
    },
    GpuSpec {
        key: "a10g",
        name: "NVIDIA A10G 24GB",
        memory_bytes: 24_000_000_000,
        hbm_bandwidth: 600e9,
        dense_fp16_flops: 70e12,
        sm_count: 80,
        sm_clock_hz: 1.71e9,
        host_link_bandwidth: 32e9,
        interconnect_bandwidth: 32e9,
        price_per_hour_usd: 1.006,
        sources: concat!(
            "The A10G is an AWS-only variant with no public NVIDIA datasheet. Memory (24 GB \
GDDR6, 600 GB/s) and PCIe Gen4 64 GB/s from the NVIDIA A10 Tensor Core GPU datasheet \
(https://www.nvidia.com/en-us/data-center/products/a10-gpu/), which the A10G shares (no \
NVLink: GPU-to-GPU traffic goes over PCIe, 32 GB/s per direction); the dense \
FP16 tensor rate of 70 TFLOPS (the A10 has 125) is the figure AWS and third-party comparisons \
give for the A10G (Amazon EC2 G5 page https://aws.amazon.com/ec2/instance-types/g5/; Baseten, \
'NVIDIA A10 vs A10G for ML model inference'). 80 SMs at 1,710 MHz: the 35 TFLOPS FP32 those \
comparisons give is 80 SMs x 128 lanes x 2 x 1.71 GHz (the A10 has 72 SMs); an assumption, like \
its tensor rate.",
            price_list!(),
            "g5.xlarge (1x A10G) at $1.006/h."
        ),
    },
    GpuSpec {
        key: "l4",
        name: "NVIDIA L4 24GB",
        memory_bytes: 24_000_000_000,
        hbm_bandwidth: 300e9,
        dense_fp16_flops: 121e12,
        sm_count: 58,
        sm_clock_hz: 2.04e9,
        host_link_bandwidth: 32e9,
        interconnect_bandwidth: 32e9,
        price_per_hour_usd: 0.8048,
        sources: concat!(
            "NVIDIA L4 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/l4/): \
24 GB GDDR6, 300 GB/s, FP16/BF16 Tensor Core 242 TFLOPS with sparsity (dense 121), PCIe Gen4 \
x16 64 GB/s, no NVLink (GPU-to-GPU traffic goes \
over PCIe, 32 GB/s per direction); 58 SMs at a 2,040 MHz boost clock (7,424 CUDA cores at 128 an \
Ada SM; the datasheet's 30.3 TFLOPS FP32 is 7,424 x 2 x 2.04 GHz).",
            price_list!(),
            "g6.xlarge (1x L4) at $0.8048/h."
        ),
    },
    GpuSpec {
        key: "l40s",
        name: "NVIDIA L40S 48GB",
        memory_bytes: 48_000_000_000,
        hbm_bandwidth: 864e9,
        dense_fp16_flops: 362.05e12,
        sm_count: 142,
        sm_clock_hz: 2.52e9,
        host_link_bandwidth: 32e9,
        interconnect_bandwidth: 32e9,
        price_per_hour_usd: 1.861,
        sources: concat!(
            "NVIDIA L40S GPU datasheet (https://www.nvidia.com/en-us/data-center/l40s/): 48 GB \
GDDR6 with ECC, 864 GB/s, FP16/BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity), PCIe \
Gen4 x16 64 GB/s, no NVLink (GPU-to-GPU traffic goes \
over PCIe, 32 GB/s per direction); 142 SMs at a 2,520 MHz boost clock (18,176 CUDA cores at \
128 an Ada SM; the datasheet's 91.6 TFLOPS FP32 is 18,176 x 2 x 2.52 GHz).",
            price_list!(),
            "g6e.xlarge (1x L40S) at $1.861/h."
        ),
    },
];

/// Accepted spellings besides the keys themselves (after lower-casing, `_`/space -> `-`).
const GPU_ALIASES: [(&str, &str); 6] = [
    ("h100", "h100-sxm"),
    ("h200-sxm", "h200"),
    ("a100-80gb", "a100-80g"),
    ("a100-40gb", "a100-40g"),
    ("l40-s", "l40s"),
    ("a10-g", "a10g"),
];

/// The built-in GPU kinds, in catalogue order. Each entry's `sources` cites its datasheet and
/// the price list used.
pub fn gpu_catalogue() -> &'static [GpuSpec] {
    &GPU_CATALOGUE
}

/// Looks up a GPU by catalogue key, case-insensitively (`H100_SXM`, `h100`, `h100-sxm` all
/// work). The error lists every known key.
pub fn find_gpu(key: &str) -> Result<&'static GpuSpec, CostError> {
    let wanted: String = key
        .trim()
        .chars()
        .map(|c| match c {
            '_' | ' ' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let canonical = GPU_ALIASES
        .iter()
        .find(|(alias, _)| *alias == wanted)
        .map_or(wanted.as_str(), |(_, target)| target);
    GPU_CATALOGUE
        .iter()
        .find(|g| g.key == canonical)
        .ok_or_else(|| CostError::UnknownGpu {
            key: key.to_string(),
            known: known_gpu_keys(),
        })
}

fn known_gpu_keys() -> String {
    GPU_CATALOGUE
        .iter()
        .map(
            |g| match GPU_ALIASES.iter().find(|(_, target)| *target == g.key) {
                Some((alias, _)) if g.key == "h100-sxm" => format!("{} (alias {alias})", g.key),
                _ => g.key.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join(", ")
}

impl GpuSpec {
    /// Checks a GPU's numbers are usable (scenarios may describe GPUs of their own).
    pub fn validate(&self) -> Result<(), CostError> {
        let bad = |field: &'static str, value: f64, expected: &str| CostError::InvalidGpu {
            gpu: self.name.to_string(),
            field,
            reason: format!("must be {expected}, got {value}"),
        };
        if self.memory_bytes == 0 {
            return Err(bad("memory_bytes", 0.0, "at least 1"));
        }
        if self.sm_count == 0 {
            return Err(bad("sm_count", 0.0, "at least 1"));
        }
        for (field, value) in [
            ("hbm_bandwidth", self.hbm_bandwidth),
            ("dense_fp16_flops", self.dense_fp16_flops),
            ("sm_clock_hz", self.sm_clock_hz),
            ("host_link_bandwidth", self.host_link_bandwidth),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(bad(field, value, "a positive finite number"));
            }
        }
        for (field, value) in [
            ("interconnect_bandwidth", self.interconnect_bandwidth),
            ("price_per_hour_usd", self.price_per_hour_usd),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(bad(field, value, "a finite number >= 0"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors of the cost models, the catalogue and calibration profiles. Each names the field
/// and the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("unknown GPU `{key}`; known GPUs: {known}")]
    UnknownGpu { key: String, known: String },
    #[error("GPU `{gpu}`: field `{field}` {reason}")]
    InvalidGpu {
        gpu: String,
        field: &'static str,
        reason: String,
    },
    #[error(
        "model `{model}` does not fit on {gpu}{}: its weights take {:.2} GB{} but only {:.2} GB \
         are usable{} ({:.2} GB x memory utilization {utilization} - {:.2} GB activation \
         reserve){}",
        at_tensor_parallel(*.tensor_parallel),
        *.weight_bytes as f64 / GB,
        per_gpu_share(*.tensor_parallel),
        usable_bytes(*.memory_bytes, *.utilization, *.reserve_bytes) / GB,
        if *.tensor_parallel > 1 { " per GPU" } else { "" },
        *.memory_bytes as f64 / GB,
        *.reserve_bytes as f64 / GB,
        more_gpus_hint(*.tensor_parallel)
    )]
    ModelDoesNotFit {
        model: String,
        gpu: String,
        /// Weight bytes each GPU holds: all of them at TP 1, about 1/TP of them above.
        weight_bytes: u64,
        /// One GPU's memory.
        memory_bytes: u64,
        utilization: f64,
        /// Kept on each GPU.
        reserve_bytes: u64,
        tensor_parallel: u32,
    },
    #[error(
        "model `{model}` on {gpu} leaves {:.3} GB after weights and reserve, less than one KV \
         page of {page_bytes} bytes: lower `activation_reserve` or raise the memory utilization",
        *.free_bytes / GB
    )]
    NoKvSpace {
        model: String,
        gpu: String,
        free_bytes: f64,
        page_bytes: u64,
    },
    #[error("efficiency factor `{field}` must be {expected}, got {value}")]
    InvalidEfficiency {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("`{field}` {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Model(#[from] SpecError),
    #[error("calibration profile {}: cannot read it: {source}", .path.display())]
    ProfileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("calibration profile {}: not a valid profile: {source}", .path.display())]
    ProfileParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("calibration profile {}: field `{field}` {reason}", .path.display())]
    ProfileInvalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(
        "calibration profile `{profile}` cannot model {wanted}: {mismatches}; measure this \
         configuration with `slora-plan calibrate`, or use the derived cost model"
    )]
    ProfileMismatch {
        /// The profile: GPU, model and date.
        profile: String,
        /// What was asked for (the scenario's model, TP degree or GPU).
        wanted: String,
        /// Each differing field as `field: profile X, wanted Y`.
        mismatches: String,
    },
}

/// " at tensor_parallel N" for N > 1, for error messages.
fn at_tensor_parallel(tp: u32) -> String {
    if tp > 1 {
        format!(" at tensor_parallel {tp}")
    } else {
        String::new()
    }
}

/// " per GPU (1/N of them)" for N > 1, for error messages.
fn per_gpu_share(tp: u32) -> String {
    if tp > 1 {
        format!(" per GPU (1/{tp} of them)")
    } else {
        String::new()
    }
}

/// What to try when weights do not fit, for error messages.
fn more_gpus_hint(tp: u32) -> String {
    match TENSOR_PARALLEL_DEGREES.iter().find(|&&d| d > tp) {
        Some(next) => format!(
            "; a larger `tensor_parallel` ({next} or more) splits the weights over more GPUs"
        ),
        None => "; use a GPU with more memory".to_string(),
    }
}

/// `memory * utilization - reserve` in bytes (may be negative when nothing is usable).
fn usable_bytes(memory_bytes: u64, utilization: f64, reserve_bytes: u64) -> f64 {
    memory_bytes as f64 * utilization - reserve_bytes as f64
}

// ---------------------------------------------------------------------------------------------
// Efficiency factors
// ---------------------------------------------------------------------------------------------

/// How far below datasheet peaks real kernels run. Every field has a default; a scenario may
/// override any subset (`efficiency: { lora_kernel: 0.4 }`).
///
/// # How the defaults were obtained
///
/// The base-GEMM factors (`weight_streaming`, `tensor_core`, `gemm_fill_tokens`,
/// `roofline_sharpness`) are a minimax fit of [`AnalyticCost`]'s base-GEMM formula to the seven
/// H200 measurements in DESIGN.md ("Reference measurements on an H200", 2026-11-28, cuBLAS
/// fp16): the six Llama-7B linear-layer step times (batch 1, 32, 64, 128, 256, 512: 3.71, 3.85,
/// 3.87, 4.13, 5.53, 10.25 ms; 12.95 GB of weights) and the 8192^3 GEMM at ~870 TFLOP/s. The
/// fit (factors rounded to 3 digits) leaves at most 5.1% error on every point: -2.7, -5.0,
/// -3.5, -0.2, +5.1, -5.0% for the six batches and 826 TFLOP/s (-5.0%) for the 8192^3 GEMM;
/// the tests `h200_reference_table` and `square_gemm_reaches_the_measured_tensor_rate` check
/// it.
/// The formula is a roofline per GEMM with two refinements the data demands: a smooth maximum
/// (the step time rises from 3.71 to 3.87 ms while still memory-bound, then bends over
/// gradually between batch 128 and 256), and a fixed `gemm_fill_tokens` of padding work per
/// GEMM (batch 256 and 512 reach only 600 and 647 TFLOP/s, far below the 870 of a square
/// 8192 GEMM, because a few hundred rows do not fill the GPU's waves of tiles).
///
/// The D2D copy (4,275 GB/s counting read and write, 0.89 of 4.8 TB/s) is the ceiling of any
/// streaming kernel; the fitted cuBLAS weight stream reaches 0.748. The other defaults are not
/// covered by the table; each field's doc says where its value comes from. Calibration
/// (`slora-plan calibrate`) replaces all of them with measurements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Efficiency {
    /// Fraction of peak memory bandwidth at which GEMMs stream weights and activations.
    /// Fitted: 0.748 (3.59 TB/s on the H200; the D2D copy shows 4.28 TB/s is the ceiling).
    pub weight_streaming: f64,
    /// Fraction of peak memory bandwidth at which attention reads and writes KV rows. Not
    /// measured: set equal to `weight_streaming`, since the paged kernels read whole 8 KiB
    /// (Llama-7B) K and V rows, as streaming as a GEMM's weight reads.
    pub kv_read: f64,
    /// Decode attention's FLOPs (QK^T and PV: 4 x hidden per context row and layer) that one
    /// SM completes per clock where the kernel waits on its SMs, not on HBM. Our decode kernel
    /// does its dot products on the CUDA cores with warp shuffles; for a grouped-query model
    /// (four query heads per KV row, a quarter of the bytes per FLOP) that is what binds: the
    /// H100 and the H200, which share SMs and clocks but not HBM, run Llama-3-8B's decode
    /// attention in the same time (docs/FIDELITY.md, session 12), where bandwidth would make
    /// the H100 1.43x slower. Decode attention costs the longer of its KV bytes at `kv_read`
    /// and its FLOPs at this rate times [`GpuSpec::sm_count`] x [`GpuSpec::sm_clock_hz`].
    /// Fitted (`fit_efficiency`) on the H200 Llama-3-8B profile: 24.4; for a multi-head
    /// model, bandwidth binds on every catalogue GPU and the rate is not identified.
    pub attention_flops_per_sm_cycle: f64,
    /// Fraction of the dense fp16 tensor-core peak that a large GEMM reaches. Fitted: 0.847
    /// (838 TFLOP/s on the H200 before the fill penalty below).
    pub tensor_core: f64,
    /// Extra rows of work each GEMM pays, in tokens: compute time is that of
    /// `tokens + gemm_fill_tokens` rows, so efficiency is `tokens / (tokens + fill)` of
    /// `tensor_core` (half at 118 tokens, 0.81 at 512, 0.99 at 8192). Fitted: 118.
    pub gemm_fill_tokens: f64,
    /// Exponent `p` of the smooth maximum `(mem^p + compute^p)^(1/p)` used for GEMMs; larger
    /// is sharper (infinite = the plain roofline). Fitted: 8.
    pub roofline_sharpness: f64,
    /// Fraction of both peak bandwidth and peak tensor rate that the LoRA shrink/expand kernels
    /// reach, counting every token's adapter rows as read (our MBGMV/MBGMM do not share rows
    /// between a batch's tokens). Fitted on the H200 profile of 2026-11-28 (`fit_efficiency`,
    /// median over the slower half of its LoRA grids): 0.68.
    pub lora_kernel: f64,
    /// Fraction of the per-direction host-link bandwidth that pinned host-to-device copies
    /// reach. Not measured here: 0.8, what `bandwidthTest`-style pinned copies typically reach
    /// on PCIe Gen4/Gen5 x16 (~26 of 32 GB/s, ~52 of 64 GB/s).
    pub host_link: f64,
    /// Seconds each small kernel adds to a step beyond its modelled work (launch latency and
    /// the idle gap before the next kernel; no CUDA graphs). Not measured: 2 us, an estimate for
    /// eager launches through the driver API. The base GEMMs' own launches are inside the
    /// cuBLAS measurement and not counted here.
    pub kernel_launch_s: f64,
    /// Kernels per layer that pay `kernel_launch_s`: our executor launches about 10 (two
    /// RMSNorms, RoPE, KV write, attention, SiLU-mul, two residual adds, LoRA shrink and
    /// expand). With `kernel_launch_s` this gives 0.64 ms per Llama-7B step.
    pub kernels_per_layer: u32,
    /// Seconds of per-step host work on the critical path: copying the batch's page tables and
    /// indices to the device, reading back sampled tokens, synchronising. Not measured: 50 us.
    pub step_overhead_s: f64,
    /// Passes over one sampled token's fp32 logits (vocab x 4 bytes) that sampling makes at
    /// `weight_streaming` bandwidth: max, sum of exponentials, the top-p threshold, the draw.
    /// Not measured: 4.
    pub sampling_logit_passes: f64,
    /// Fraction of the per-direction GPU-to-GPU bandwidth
    /// ([`GpuSpec::interconnect_bandwidth`]) that tensor-parallel collectives reach (NCCL's
    /// "bus bandwidth" over the link's peak). Not measured here: 0.8, an estimate for large
    /// ring all-reduces within one node. Used only when `tensor_parallel > 1`.
    pub interconnect: f64,
    /// Seconds each tensor-parallel collective costs beyond moving its bytes: launch, the
    /// handshake between GPUs and the ring's hops. Not measured here: 10 us, an estimate
    /// between a one-shot all-reduce over NVLink (a few us) and an NCCL ring on small messages
    /// (10-20 us); decode steps of small batches are dominated by it. Used only when
    /// `tensor_parallel > 1`.
    pub all_reduce_latency_s: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency {
            weight_streaming: 0.748,
            kv_read: 0.748,
            attention_flops_per_sm_cycle: 24.4,
            tensor_core: 0.847,
            gemm_fill_tokens: 118.0,
            roofline_sharpness: 8.0,
            lora_kernel: 0.68,
            host_link: 0.8,
            kernel_launch_s: 2.0e-6,
            kernels_per_layer: 10,
            step_overhead_s: 50e-6,
            sampling_logit_passes: 4.0,
            interconnect: 0.8,
            all_reduce_latency_s: 10e-6,
        }
    }
}

impl Efficiency {
    /// Checks every factor is in its range; the error names the field and its value.
    pub fn validate(&self) -> Result<(), CostError> {
        let check = |field: &'static str, value: f64, ok: bool, expected: &'static str| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(CostError::InvalidEfficiency {
                    field,
                    value,
                    expected,
                })
            }
        };
        const FRACTION: &str = "a fraction in (0, 1]";
        for (field, v) in [
            ("weight_streaming", self.weight_streaming),
            ("kv_read", self.kv_read),
            ("tensor_core", self.tensor_core),
            ("lora_kernel", self.lora_kernel),
            ("host_link", self.host_link),
            ("interconnect", self.interconnect),
        ] {
            check(field, v, v > 0.0 && v <= 1.0, FRACTION)?;
        }
        let v = self.attention_flops_per_sm_cycle;
        check(
            "attention_flops_per_sm_cycle",
            v,
            v > 0.0 && v <= 4096.0,
            "FLOPs per SM-cycle in (0, 4096] (a Hopper SM's tensor cores do about 3,800)",
        )?;
        let v = self.gemm_fill_tokens;
        check(
            "gemm_fill_tokens",
            v,
            (0.0..=1e6).contains(&v),
            "a number of tokens in [0, 1e6]",
        )?;
        let v = self.roofline_sharpness;
        check(
            "roofline_sharpness",
            v,
            (1.0..=1000.0).contains(&v),
            "an exponent in [1, 1000] (1 adds memory and compute time, large is a plain max)",
        )?;
        for (field, v) in [
            ("kernel_launch_s", self.kernel_launch_s),
            ("step_overhead_s", self.step_overhead_s),
            ("all_reduce_latency_s", self.all_reduce_latency_s),
        ] {
            check(field, v, (0.0..1.0).contains(&v), "seconds in [0, 1)")?;
        }
        let v = self.kernels_per_layer as f64;
        check("kernels_per_layer", v, v <= 1000.0, "at most 1000")?;
        let v = self.sampling_logit_passes;
        check(
            "sampling_logit_passes",
            v,
            (0.0..=1000.0).contains(&v),
            "a number of passes in [0, 1000]",
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor parallelism
// ---------------------------------------------------------------------------------------------

/// The tensor-parallel degrees the derived model covers: the GPUs of one NVLink (or PCIe) node
/// that split every layer Megatron-style.
pub const TENSOR_PARALLEL_DEGREES: [u32; 4] = [1, 2, 4, 8];

/// Checks that `model` can be split over `tensor_parallel` GPUs the way the derived model
/// assumes (Megatron-style, as vLLM does it): a degree in [`TENSOR_PARALLEL_DEGREES`] that
/// divides the attention heads, the KV heads and the MLP width, so every GPU holds the same
/// whole heads and columns. A degree above the KV heads would replicate KV heads on several
/// GPUs (vLLM does that); it is refused here, because the pool's page geometry assumes each
/// GPU holds a distinct `1/TP` of every KV row. Errors name the field `tensor_parallel` and
/// the model field that does not divide.
pub fn check_tensor_parallel(model: &ModelSpec, tensor_parallel: u32) -> Result<(), CostError> {
    let tp = tensor_parallel;
    let bad = |reason: String| CostError::InvalidArgument {
        field: "tensor_parallel",
        reason,
    };
    if !TENSOR_PARALLEL_DEGREES.contains(&tp) {
        return Err(bad(format!(
            "is {tp}; the derived model covers tensor-parallel degrees 1, 2, 4 and 8 (the GPUs \
             of one node)"
        )));
    }
    if tp > model.num_kv_heads {
        return Err(bad(format!(
            "is {tp}, more than the {} KV heads (`num_kv_heads`) of `{}`: GPUs would have to hold \
             replicated KV heads, which is not modelled; use tensor_parallel <= {}",
            model.num_kv_heads, model.name, model.num_kv_heads
        )));
    }
    for (field, value) in [
        ("num_heads", model.num_heads),
        ("num_kv_heads", model.num_kv_heads),
        ("intermediate_size", model.intermediate_size),
    ] {
        if value % tp != 0 {
            return Err(bad(format!(
                "is {tp}, which does not divide the {value} of `{}`'s `{field}`: every GPU must \
                 hold the same number of whole heads and MLP columns",
                model.name
            )));
        }
    }
    Ok(())
}

/// Weight bytes one GPU holds at `tensor_parallel`: every layer's projections, the embedding
/// and the LM head split `1/TP` each (vocabulary-parallel embedding and head), the RMSNorm
/// weights replicated on every GPU.
pub fn per_gpu_weight_bytes(model: &ModelSpec, tensor_parallel: u32) -> u64 {
    let tp = tensor_parallel.max(1) as u64;
    let h = model.hidden_size as u64;
    let norm_params = model.num_layers as u64 * 2 * h + h;
    let norm_bytes = norm_params * model.dtype.bytes();
    let split = model.weight_bytes() - norm_bytes;
    split.div_ceil(tp) + norm_bytes
}

// ---------------------------------------------------------------------------------------------
// The derived cost model
// ---------------------------------------------------------------------------------------------

/// A group of GEMMs that see the same tokens: their weight bytes, the activation bytes each
/// token adds (input read, output written) and the FLOPs each token costs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmGroup {
    pub(crate) weight_bytes: f64,
    pub(crate) act_bytes_per_token: f64,
    pub(crate) flops_per_token: f64,
}

/// The two GEMM groups of a step: every layer's q,k,v,o,gate,up,down (per token), and the LM
/// head (per sampled token). Shared by [`AnalyticCost`] and the efficiency fit of the
/// calibrated model, so both use one formula.
pub(crate) fn gemm_groups(model: &ModelSpec) -> (GemmGroup, GemmGroup) {
    gemm_groups_tp(model, 1)
}

/// [`gemm_groups`] for one GPU of `tp` (Megatron-style): q,k,v and gate,up are split by output
/// columns (each GPU reads the whole input and writes `1/tp` of the output), o and down by
/// input rows (each reads `1/tp` of the input and writes a whole partial sum, which the
/// all-reduce then adds), the LM head by vocabulary. Weights and FLOPs are `1/tp` of the
/// whole; at `tp = 1` the groups are the whole model's.
pub(crate) fn gemm_groups_tp(model: &ModelSpec, tp: u32) -> (GemmGroup, GemmGroup) {
    let tp = f64::from(tp.max(1));
    let dtype = model.dtype.bytes() as f64;
    let layers = model.num_layers as f64;
    let hidden = model.hidden_size as f64;
    let vocab = model.vocab_size as f64;
    let mut params = 0.0;
    for m in TargetModule::ALL {
        let (i, o) = model.module_shape(m);
        params += i as f64 * o as f64;
    }
    // Activation elements each token moves through the GEMMs, with q,k,v fused into one
    // GEMM and gate,up into another (as the executor and the reference table run them):
    // the fused GEMM reads its input once.
    let kv_width = model.kv_width() as f64;
    let inter = model.intermediate_size as f64;
    let io_elems = (hidden + (hidden + 2.0 * kv_width) / tp)
        + (hidden / tp + hidden)
        + (hidden + 2.0 * inter / tp)
        + (inter / tp + hidden);
    (
        GemmGroup {
            weight_bytes: params * layers * dtype / tp,
            act_bytes_per_token: io_elems * layers * dtype,
            flops_per_token: 2.0 * params * layers / tp,
        },
        GemmGroup {
            weight_bytes: vocab * hidden * dtype / tp,
            act_bytes_per_token: (hidden + vocab / tp) * dtype,
            flops_per_token: 2.0 * vocab * hidden / tp,
        },
    )
}

/// Decode attention's FLOPs per context row read, whole model: QK^T and PV, 2 FLOPs per
/// multiply-add over num_heads * head_dim = hidden per layer. The derived model prices them and
/// `fit_efficiency` fits their rate, so both count them here.
pub(crate) fn attention_flops_per_context_row(model: &ModelSpec) -> f64 {
    4.0 * model.hidden_size as f64 * model.num_layers as f64
}

/// Sum over `targets` of each module's input width and of its output width, times the layers:
/// the elements a LoRA shrink reads per token (and per rank row of A), and an expand writes.
pub(crate) fn lora_elems(model: &ModelSpec, targets: &[TargetModule]) -> (f64, f64) {
    let (mut lora_in, mut lora_out) = (0.0, 0.0);
    for &m in targets {
        let (i, o) = model.module_shape(m);
        lora_in += i as f64;
        lora_out += o as f64;
    }
    let layers = model.num_layers as f64;
    (lora_in * layers, lora_out * layers)
}

/// The adapted projections of a cost model: at least one, none twice (both cost models).
pub(crate) fn check_targets(targets: &[TargetModule]) -> Result<(), CostError> {
    if targets.is_empty() {
        return Err(CostError::InvalidArgument {
            field: "targets",
            reason: "must name at least one adapted projection (S-LoRA adapts q_proj, k_proj, \
                     v_proj, o_proj)"
                .into(),
        });
    }
    if let Some((i, m)) = targets
        .iter()
        .enumerate()
        .find(|(i, m)| targets[..*i].contains(m))
    {
        return Err(CostError::InvalidArgument {
            field: "targets",
            reason: format!("lists {m} twice (entry {i})"),
        });
    }
    Ok(())
}

/// Roofline step costs from a GPU's datasheet numbers and [`Efficiency`] factors, for GPUs we
/// cannot measure. Labelled [`Provenance::Derived`].
///
/// Per part, for a step of `T = prefill_tokens + decode_requests` tokens of which
/// `S = prefill_requests + decode_requests` sample a token:
///
/// * `base_gemm`: q,k,v,o,gate,up,down of every layer for `T` tokens, weights streamed once per
///   step, plus the LM head for `S` tokens. Each group takes the smooth maximum of memory time
///   (weights + activations at `weight_streaming`) and compute time (`2 * params` FLOPs per
///   token over `T + gemm_fill_tokens` rows at `tensor_core`).
/// * `attention_decode`: `decode_context_tokens` KV rows read at `kv_read` (or their `4H` FLOPs
///   per row and layer at `tensor_core`, whichever is longer; always the reads in practice).
/// * `attention_prefill`: `4 * H * layers` FLOPs per attended pair (QK^T and PV, causal) at
///   `tensor_core`, or the new KV rows written at `kv_read`, whichever is longer.
/// * `lora_shrink` / `lora_expand`: `2 * rank` FLOPs per token per input (shrink) or output
///   (expand) element of each adapted module, against the bytes moved: each token's adapter
///   rows of A (shrink) or B (expand), as our MBGMV/MBGMM read them (at least every distinct
///   adapter's once), plus the activations (x read by shrink; y read and written by expand);
///   both at `lora_kernel`, the longer wins.
/// * `adapter_h2d`: blocking loads over the host link, plus the part of prefetch copies that
///   outlasts the rest of the step (they overlap compute on a copy engine).
/// * `sampling`: `sampling_logit_passes` passes over each sampled token's fp32 logits.
/// * `fixed_overhead`: `kernels_per_layer * layers * kernel_launch_s + step_overhead_s`.
/// * `tp_communication`: zero at TP 1 (see below).
///
/// # Tensor parallelism
///
/// At `tensor_parallel = TP > 1` a replica is `TP` GPUs that split every layer Megatron-style
/// (as vLLM does), and a step costs what one of them does, since they run in lockstep:
///
/// * `base_gemm`: weights and FLOPs `1/TP` per GPU ([`per_gpu_weight_bytes`]); q,k,v and
///   gate,up split by output columns (each GPU reads the whole input), o and down by input
///   rows (each GPU writes a whole partial sum); the LM head split by vocabulary.
/// * attention: each GPU holds `num_kv_heads / TP` KV heads and `num_heads / TP` query heads,
///   so KV bytes per row and attention FLOPs are `1/TP` ([`check_tensor_parallel`] requires TP
///   to divide both).
/// * LoRA: split as S-LoRA's tensor-parallel scheme does, aligned with the base projection:
///   adapter weights and FLOPs `1/TP` per GPU; activations as the base projection's (whole
///   input for column-split modules, `1/TP` for row-split ones, and the reverse for outputs).
///   The collectives of the rank-`r` intermediates (`T * r` elements, at most 64/4096 of the
///   base all-reduce) are fused into the base model's, as in S-LoRA, and not charged.
/// * `adapter_h2d`: each GPU copies its `1/TP` of an adapter over its own host link, in
///   parallel.
/// * `sampling`: unchanged (one GPU samples from the gathered logits).
/// * `tp_communication`, with `B = interconnect * interconnect_bandwidth` (per GPU and
///   direction) and `l = all_reduce_latency_s`: `2 * layers + 1` ring all-reduces (after
///   every layer's attention output and MLP output, and after the vocabulary-parallel
///   embedding) of `T * H * dtype` bytes, each taking `l + 2 (TP-1)/TP * T * H * dtype / B`
///   (a ring moves `2 (TP-1)/TP` of the buffer through every GPU), plus the gather of the
///   logits to one GPU, `l + (TP-1)/TP * S * vocab * dtype / B`. Nothing overlaps them.
///
/// The step time is non-decreasing in every `BatchShape` field. `step_cost` does a few dozen
/// floating-point operations and at most four `powf`, allocates nothing.
#[derive(Clone, Debug)]
pub struct AnalyticCost {
    gpu: GpuSpec,
    model: ModelSpec,
    tensor_parallel: u32,
    eff: Efficiency,
    targets: Vec<TargetModule>,
    // Rates and sizes precomputed by `new`, so `step_cost` is arithmetic only; all per GPU.
    layers: GemmGroup,
    lm_head: GemmGroup,
    weight_bw: f64,
    tensor_flops: f64,
    kv_bw: f64,
    kv_bytes_per_token: f64,
    attention_flops_per_row: f64,
    /// Decode attention's FLOP/s where its SMs, not HBM, bind (see
    /// [`Efficiency::attention_flops_per_sm_cycle`]).
    attention_sm_flops: f64,
    /// Sum over adapted modules and layers of the module's input width, and output width
    /// (the whole model's).
    lora_in_elems: f64,
    lora_out_elems: f64,
    /// The share of those one GPU holds as adapter weights (`1/TP`), and the shares of the
    /// input and output widths it reads or writes as activations (1 at TP 1).
    lora_weight_share: f64,
    lora_in_act_share: f64,
    lora_out_act_share: f64,
    dtype_bytes: f64,
    lora_bw: f64,
    lora_flops: f64,
    /// Host-to-device bandwidth of the replica: every GPU's link, each carrying its share.
    host_bw: f64,
    sampling_s_per_token: f64,
    fixed_s: f64,
    /// Tensor-parallel collectives (all zero at TP 1): all-reduces per step, the seconds one
    /// costs beyond its bytes, and seconds per token of all-reduce and per sampled token of
    /// the logits gather.
    all_reduces_per_step: f64,
    collective_latency_s: f64,
    all_reduce_s_per_token: f64,
    gather_s_per_sampled: f64,
    smooth_max: SmoothMax,
}

impl AnalyticCost {
    /// A derived cost model for `model` on `tensor_parallel` GPUs of kind `gpu` (one replica;
    /// TP in [`TENSOR_PARALLEL_DEGREES`], checked by [`check_tensor_parallel`]). `targets` are
    /// the projections the adapters adapt (pass the union when adapters differ: an upper
    /// bound); `TargetModule::ATTENTION` is S-LoRA's setting. Errors when one GPU's share of
    /// the weights (see [`per_gpu_weight_bytes`]) does not fit in its memory.
    pub fn new(
        gpu: &GpuSpec,
        model: &ModelSpec,
        tensor_parallel: u32,
        eff: Efficiency,
        targets: &[TargetModule],
    ) -> Result<Self, CostError> {
        gpu.validate()?;
        model.validate()?;
        eff.validate()?;
        check_tensor_parallel(model, tensor_parallel)?;
        if tensor_parallel > 1 && gpu.interconnect_bandwidth <= 0.0 {
            return Err(CostError::InvalidArgument {
                field: "tensor_parallel",
                reason: format!(
                    "is {tensor_parallel}, but {} has no GPU-to-GPU bandwidth \
                     (`interconnect_bandwidth` is 0), so its all-reduces cannot be priced",
                    gpu.name
                ),
            });
        }
        check_targets(targets)?;
        let weights_per_gpu = per_gpu_weight_bytes(model, tensor_parallel);
        if weights_per_gpu >= gpu.memory_bytes {
            return Err(CostError::ModelDoesNotFit {
                model: model.name.clone(),
                gpu: gpu.name.to_string(),
                weight_bytes: weights_per_gpu,
                memory_bytes: gpu.memory_bytes,
                utilization: 1.0,
                reserve_bytes: 0,
                tensor_parallel,
            });
        }

        let tp = f64::from(tensor_parallel);
        let dtype = model.dtype.bytes() as f64;
        let layers = model.num_layers as f64;
        let hidden = model.hidden_size as f64;
        let vocab = model.vocab_size as f64;
        let (layer_gemms, lm_head) = gemm_groups_tp(model, tensor_parallel);
        let (lora_in_elems, lora_out_elems) = lora_elems(model, targets);
        // Activation widths one GPU's LoRA kernels read (shrink) and write (expand): as its
        // base projection, column-split (q, k, v, gate, up) or row-split (o, down).
        let (mut in_act, mut out_act) = (0.0, 0.0);
        for &m in targets {
            let (i, o) = model.module_shape(m);
            let (i, o) = (i as f64, o as f64);
            match m {
                TargetModule::O | TargetModule::Down => {
                    in_act += i / tp;
                    out_act += o;
                }
                _ => {
                    in_act += i;
                    out_act += o / tp;
                }
            }
        }
        let (in_act, out_act) = (in_act * layers, out_act * layers);
        let weight_bw = eff.weight_streaming * gpu.hbm_bandwidth;
        let link_bw = eff.interconnect * gpu.interconnect_bandwidth;
        let parallel = tensor_parallel > 1;
        Ok(AnalyticCost {
            layers: layer_gemms,
            lm_head,
            weight_bw,
            tensor_flops: eff.tensor_core * gpu.dense_fp16_flops,
            kv_bw: eff.kv_read * gpu.hbm_bandwidth,
            kv_bytes_per_token: model.kv_bytes_per_token() as f64 / tp,
            attention_flops_per_row: attention_flops_per_context_row(model) / tp,
            attention_sm_flops: eff.attention_flops_per_sm_cycle
                * f64::from(gpu.sm_count)
                * gpu.sm_clock_hz,
            lora_in_elems,
            lora_out_elems,
            lora_weight_share: 1.0 / tp,
            lora_in_act_share: in_act / lora_in_elems,
            lora_out_act_share: out_act / lora_out_elems,
            dtype_bytes: dtype,
            lora_bw: eff.lora_kernel * gpu.hbm_bandwidth,
            lora_flops: eff.lora_kernel * gpu.dense_fp16_flops,
            host_bw: eff.host_link * gpu.host_link_bandwidth * tp,
            sampling_s_per_token: eff.sampling_logit_passes * vocab * 4.0 / weight_bw,
            fixed_s: eff.kernels_per_layer as f64 * layers * eff.kernel_launch_s
                + eff.step_overhead_s,
            all_reduces_per_step: if parallel { 2.0 * layers + 1.0 } else { 0.0 },
            collective_latency_s: if parallel {
                eff.all_reduce_latency_s
            } else {
                0.0
            },
            all_reduce_s_per_token: if parallel {
                2.0 * (tp - 1.0) / tp * hidden * dtype / link_bw
            } else {
                0.0
            },
            gather_s_per_sampled: if parallel {
                (tp - 1.0) / tp * vocab * dtype / link_bw
            } else {
                0.0
            },
            tensor_parallel,
            smooth_max: SmoothMax::new(eff.roofline_sharpness),
            gpu: gpu.clone(),
            model: model.clone(),
            eff,
            targets: targets.to_vec(),
        })
    }

    pub fn gpu(&self) -> &GpuSpec {
        &self.gpu
    }

    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    pub fn efficiency(&self) -> &Efficiency {
        &self.eff
    }

    pub fn targets(&self) -> &[TargetModule] {
        &self.targets
    }

    /// GPUs per replica.
    pub fn tensor_parallel(&self) -> u32 {
        self.tensor_parallel
    }

    /// Seconds of tensor-parallel collectives for a step of `tokens` tokens, `sampled` of
    /// which sample (0 at TP 1, and for a step without tokens).
    fn communication_seconds(&self, tokens: f64, sampled: f64) -> f64 {
        if self.all_reduces_per_step == 0.0 || tokens <= 0.0 {
            return 0.0;
        }
        let all_reduces = self.all_reduces_per_step
            * (self.collective_latency_s + tokens * self.all_reduce_s_per_token);
        let gather = if sampled > 0.0 {
            self.collective_latency_s + sampled * self.gather_s_per_sampled
        } else {
            0.0
        };
        all_reduces + gather
    }

    /// Seconds for one GEMM group over `tokens` tokens (0 for no tokens).
    fn gemm_seconds(&self, g: &GemmGroup, tokens: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let memory = (g.weight_bytes + tokens * g.act_bytes_per_token) / self.weight_bw;
        let compute = g.flops_per_token * (tokens + self.eff.gemm_fill_tokens) / self.tensor_flops;
        self.smooth_max.of(memory, compute)
    }
}

/// The smooth maximum `(a^p + b^p)^(1/p)` of a memory time and a compute time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmoothMax {
    p: f64,
    /// `k` when `p = 2^k` (the default 8 has k = 3): then `r^p` is `k` squarings and the
    /// `p`-th root `k` square roots, several times cheaper than two `powf` in a function called
    /// once per simulated step.
    squarings: Option<u32>,
}

impl SmoothMax {
    pub(crate) fn new(p: f64) -> SmoothMax {
        SmoothMax {
            p,
            squarings: (0..=9).find(|&k| f64::from(1u32 << k) == p),
        }
    }

    /// Computed as `hi * (1 + (lo/hi)^p)^(1/p)` with `hi = max(a, b)`, so that small times
    /// (1e-6 s)^8 cannot underflow. Non-decreasing in both arguments, between `max(a, b)` and
    /// `2^(1/p) * max(a, b)`. Arguments must be >= 0.
    pub(crate) fn of(self, a: f64, b: f64) -> f64 {
        let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
        if hi <= 0.0 {
            return 0.0;
        }
        let ratio = lo / hi;
        // Below 1e-3 the correction is under 1e-3^p / p: for p >= 4 it is below f64 precision
        // relative to `hi`, so skipping it changes nothing and saves the work.
        if ratio < 1e-3 && self.p >= 4.0 {
            return hi;
        }
        match self.squarings {
            Some(k) => {
                let mut x = ratio;
                for _ in 0..k {
                    x *= x;
                }
                let mut root = 1.0 + x;
                for _ in 0..k {
                    root = root.sqrt();
                }
                hi * root
            }
            None => hi * (1.0 + ratio.powf(self.p)).powf(self.p.recip()),
        }
    }
}

impl CostModel for AnalyticCost {
    fn step_cost(&self, b: &BatchShape) -> StepCost {
        // f64 sums: u32 additions of user-sized fields could overflow.
        let tokens = b.prefill_tokens as f64 + b.decode_requests as f64;
        let sampled = b.prefill_requests as f64 + b.decode_requests as f64;

        let base =
            self.gemm_seconds(&self.layers, tokens) + self.gemm_seconds(&self.lm_head, sampled);

        // The decode kernel works on the CUDA cores (no tensor cores): its FLOPs go at the
        // SMs' rate, which binds for grouped-query models (fewer KV bytes per FLOP).
        let decode_rows = b.decode_context_tokens as f64;
        let attention_decode = (decode_rows * self.kv_bytes_per_token / self.kv_bw)
            .max(decode_rows * self.attention_flops_per_row / self.attention_sm_flops);

        let attention_prefill = (b.prefill_attention_pairs as f64 * self.attention_flops_per_row
            / self.tensor_flops)
            .max(b.prefill_tokens as f64 * self.kv_bytes_per_token / self.kv_bw);

        let token_rank = b.lora_token_rank as f64;
        let rank_sum = b.distinct_rank_sum as f64;
        let lora_tokens = b.lora_tokens as f64;
        // Per GPU: `lora_weight_share` of every adapter's A and B, and the activations of
        // its slice of each projection (all shares are 1 at TP 1).
        let (w, x, y) = (
            self.lora_weight_share,
            self.lora_in_act_share,
            self.lora_out_act_share,
        );
        // Our MBGMV and MBGMM read each token's adapter rows: nothing is shared between the
        // tokens of one adapter (the calibrated H200 profile's LoRA times follow tokens x rank
        // and are almost flat in the number of distinct adapters). So the rows read are the
        // tokens' rank sum, and at least the distinct adapters' (each is read once).
        let rows_read = token_rank.max(rank_sum);
        let shrink_bytes =
            (rows_read * w + lora_tokens * x) * self.lora_in_elems * self.dtype_bytes;
        let lora_shrink = (shrink_bytes / self.lora_bw)
            .max(2.0 * token_rank * self.lora_in_elems * w / self.lora_flops);
        let expand_bytes =
            (rows_read * w + 2.0 * lora_tokens * y) * self.lora_out_elems * self.dtype_bytes;
        let lora_expand = (expand_bytes / self.lora_bw)
            .max(2.0 * token_rank * self.lora_out_elems * w / self.lora_flops);

        let sampling = sampled * self.sampling_s_per_token;
        let fixed = self.fixed_s;
        let communication = self.communication_seconds(tokens, sampled);

        // Blocking copies finish before compute starts; prefetch copies run on the copy engine
        // beside the step and only delay it by what outlasts everything else. The step time is
        // then `blocking + max(rest, prefetch)`, non-decreasing in both.
        let rest = base
            + attention_decode
            + attention_prefill
            + lora_shrink
            + lora_expand
            + sampling
            + fixed
            + communication;
        let blocking = b.blocking_load_bytes as f64 / self.host_bw;
        let prefetch = b.prefetch_load_bytes as f64 / self.host_bw;
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
            tp_communication: Nanos::from_secs_f64(communication),
        }
    }

    fn provenance(&self) -> Provenance {
        Provenance::Derived
    }

    fn describe(&self) -> String {
        format!(
            "derived: {} x {}, TP {}, roofline from datasheet numbers with efficiency factors \
             (defaults fitted to H200 cuBLAS measurements)",
            self.gpu.name, self.model.name, self.tensor_parallel
        )
    }
}

/// Another cost model with every step time multiplied by `scale`: how far a simulation's
/// results move when the model prices steps a given share high or low (`simulate
/// --step-time-scale`). Near a system's knee a percent of step time moves the latency tail by
/// tens of percent (docs/FIDELITY.md, session 19), and this measures by how much.
pub struct ScaledCost {
    inner: Box<dyn CostModel>,
    scale: f64,
}

impl ScaledCost {
    /// `scale` must be finite and above zero (the command line checks it).
    pub fn new(inner: Box<dyn CostModel>, scale: f64) -> ScaledCost {
        debug_assert!(scale.is_finite() && scale > 0.0, "scale {scale}");
        ScaledCost { inner, scale }
    }
}

impl CostModel for ScaledCost {
    fn step_cost(&self, batch: &BatchShape) -> StepCost {
        let c = self.inner.step_cost(batch);
        let s = |t: Nanos| Nanos::from_secs_f64(t.as_secs_f64() * self.scale);
        StepCost {
            base_gemm: s(c.base_gemm),
            attention_prefill: s(c.attention_prefill),
            attention_decode: s(c.attention_decode),
            lora_shrink: s(c.lora_shrink),
            lora_expand: s(c.lora_expand),
            adapter_h2d: s(c.adapter_h2d),
            sampling: s(c.sampling),
            fixed_overhead: s(c.fixed_overhead),
            tp_communication: s(c.tp_communication),
        }
    }

    fn provenance(&self) -> Provenance {
        self.inner.provenance()
    }

    fn describe(&self) -> String {
        format!(
            "{}; every step time x {} (--step-time-scale)",
            self.inner.describe(),
            self.scale
        )
    }
}

/// Pages of `model.page_bytes()` that fit in `memory_bytes * memory_utilization - weights -
/// activation_reserve_bytes` on one GPU: [`kv_pool_pages_tp`] at `tensor_parallel = 1`.
pub fn kv_pool_pages(
    gpu: &GpuSpec,
    model: &ModelSpec,
    memory_utilization: f64,
    activation_reserve_bytes: u64,
) -> Result<u32, CostError> {
    kv_pool_pages_tp(gpu, model, 1, memory_utilization, activation_reserve_bytes)
}

/// Pages in the pool of one replica of `tensor_parallel` GPUs of kind `gpu`.
///
/// # What a page is at TP > 1
///
/// The engine's pool is per replica and its geometry does not change with TP: a page index
/// names one token's K and V rows over all layers (or one row of an adapter's A or B), that is
/// `model.page_bytes()` bytes of the replica. Each GPU holds its `num_kv_heads / TP` KV heads
/// of every row (and its `1/TP` slice of adapter rows), so one page index takes
/// `page_bytes / TP` bytes on every GPU, at the same slot: the GPUs allocate in lockstep and
/// share one free list, the engine's.
///
/// So each GPU has `memory_bytes * memory_utilization - activation_reserve_bytes -
/// per_gpu_weight_bytes(model, TP)` bytes for pages (the reserve is kept on every GPU; the
/// weights are split, see [`per_gpu_weight_bytes`]), and the pool has that over
/// `page_bytes / TP` pages: `TP x memory_bytes` in all hold the weights once and `TP` times
/// one GPU's pages' worth of KV.
///
/// Errors when the utilization is not in (0, 1], when TP is not one the model can be split
/// over ([`check_tensor_parallel`]), when one GPU's share of the weights does not fit (with
/// the sizes in GB, per GPU), or when not even one page is left.
pub fn kv_pool_pages_tp(
    gpu: &GpuSpec,
    model: &ModelSpec,
    tensor_parallel: u32,
    memory_utilization: f64,
    activation_reserve_bytes: u64,
) -> Result<u32, CostError> {
    if !(memory_utilization > 0.0 && memory_utilization <= 1.0) {
        return Err(CostError::InvalidArgument {
            field: "memory_utilization",
            reason: format!("must be a fraction in (0, 1], got {memory_utilization}"),
        });
    }
    gpu.validate()?;
    model.validate()?;
    check_tensor_parallel(model, tensor_parallel)?;
    let usable = usable_bytes(
        gpu.memory_bytes,
        memory_utilization,
        activation_reserve_bytes,
    );
    let weights = per_gpu_weight_bytes(model, tensor_parallel);
    if usable <= weights as f64 {
        return Err(CostError::ModelDoesNotFit {
            model: model.name.clone(),
            gpu: gpu.name.to_string(),
            weight_bytes: weights,
            memory_bytes: gpu.memory_bytes,
            utilization: memory_utilization,
            reserve_bytes: activation_reserve_bytes,
            tensor_parallel,
        });
    }
    let free = usable - weights as f64;
    // `check_tensor_parallel` made TP divide the KV heads, so a page's share is exact.
    let page = model.page_bytes() / u64::from(tensor_parallel);
    let pages = (free / page as f64).floor();
    if pages < 1.0 {
        return Err(CostError::NoKvSpace {
            model: model.name.clone(),
            gpu: format!("{}{}", gpu.name, at_tensor_parallel(tensor_parallel)),
            free_bytes: free,
            page_bytes: page,
        });
    }
    if pages > u32::MAX as f64 {
        return Err(CostError::InvalidArgument {
            field: "memory",
            reason: format!(
                "gives {pages} KV pages of {page} bytes per GPU, more than the pool's page \
                 index (u32) can name"
            ),
        });
    }
    Ok(pages as u32)
}

// ---------------------------------------------------------------------------------------------
// Calibration profile: the file `slora-plan calibrate` writes and `CalibratedCost` reads
// ---------------------------------------------------------------------------------------------

/// The profile format this build reads and writes. Bump it on any incompatible change.
pub const PROFILE_FORMAT_VERSION: u32 = 1;

/// Robust statistics of one microbenchmark point, over `samples` timed repetitions (after
/// warm-up). Times are seconds of GPU time, measured with CUDA events around the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// Median time, seconds: what the cost model uses.
    pub median_s: f64,
    /// 10th and 90th percentiles, seconds: the spread, reported beside simulated results.
    pub p10_s: f64,
    pub p90_s: f64,
    /// Timed repetitions the statistics come from (at least 1).
    pub samples: u32,
}

/// One step's dense work for `tokens` token rows: see [`CalibrationProfile::base_gemm`] and
/// [`CalibrationProfile::lm_head`] for what each grid's time covers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensPoint {
    pub tokens: u32,
    pub time: Measured,
}

/// Prefill attention over all layers for ONE chunk of `tokens` new tokens of a request that
/// already holds `context` tokens of KV (0 for a first chunk): `tokens * context +
/// tokens * (tokens + 1) / 2` attended pairs, in one launch per layer (the executor's
/// variable-length kernel with a single segment). The chunk's KV stores are in `base_gemm`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillAttentionPoint {
    pub tokens: u32,
    pub context: u32,
    pub time: Measured,
}

/// Decode attention over all layers for `batch` requests that each read `context` KV rows
/// (their `context_len + 1`: the cached rows and the one written this step), in one launch
/// (plus the split-K reduce) per layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeAttentionPoint {
    pub batch: u32,
    pub context: u32,
    pub time: Measured,
}

/// One LoRA kernel (shrink or expand) over all layers and all of the profile's `lora_targets`
/// (every launch the executor makes for it), for `tokens` tokens spread evenly over `adapters`
/// distinct adapters, all of rank `rank`. Grids are complete, so a point may name more
/// adapters than tokens: it was measured with one adapter per token (no step holds more
/// distinct adapters than tokens), and the cost model clamps a step's count the same way.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraPoint {
    pub tokens: u32,
    pub adapters: u32,
    pub rank: u32,
    pub time: Measured,
}

/// How far a step whose decode rows mix adapter ranks lies toward every row costing what the
/// highest rank costs, at `rows` decode rows: 0 is each row costing what its own rank costs,
/// 1 the whole batch at the highest rank. `calibrate` measures it from whole steps (a mix
/// against each of its ranks alone, same rows and adapters).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankMixPoint {
    pub rows: u32,
    pub toward_highest: f64,
}

/// What a step with `prompt_tokens` prompt tokens costs beyond the sum of its parts, seconds
/// (never below zero): `calibrate` measures whole steps of one prompt alone and beside 32 and
/// 128 decode rows, and takes the median of measured minus the parts' prediction (the prompt
/// alone only, before session 15).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptExcessPoint {
    pub prompt_tokens: u32,
    pub extra_s: f64,
}

/// What decode attention over requests of spread contexts costs beyond the `attention_decode`
/// grid's estimate for the same shape, seconds (signed), at `rows` decode rows, measured on
/// batches whose spread `1 - mean context / longest context` was `spread` (see
/// [`CalibrationProfile::decode_spread_excess`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadExcessPoint {
    pub rows: u32,
    pub extra_s: f64,
    pub spread: f64,
}

/// One host-to-device copy of `bytes` from pinned host memory, as adapter loads do it; the
/// bandwidth at that size is `bytes / time.median_s`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferPoint {
    pub bytes: u64,
    pub time: Measured,
}

/// Kernel costs measured on one GPU for one model, written by `slora-plan calibrate` as JSON.
///
/// Every grid is a list of points sorted by its axes, in the order the fields are declared
/// (lexicographically: `tokens` first, then `context`, ...), each combination present exactly
/// once, and multi-axis grids are complete (every combination of the axis values is measured),
/// so a reader can interpolate without holes. [`load_profile`] checks all of this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationProfile {
    /// [`PROFILE_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// GPU name as the driver reports it (`NVIDIA H200`).
    pub gpu_name: String,
    /// The `gpu_catalogue` key this GPU corresponds to, when there is one (reports take the
    /// price and datasheet figures from it).
    #[serde(default)]
    pub gpu_key: Option<String>,
    /// Device memory the driver reports, bytes.
    pub gpu_memory_bytes: u64,
    /// NVIDIA driver version (`580.95.05`).
    pub driver_version: String,
    /// CUDA version of the driver API (`13.0`).
    pub cuda_version: String,
    /// Date of the measurement, ISO 8601 (`2026-11-28`, optionally followed by a time).
    pub date: String,
    /// The model measured, name and shape. Costs depend on the shape; the name is for reports.
    pub model: ModelSpec,
    /// GPUs the model was split over.
    pub tensor_parallel: u32,
    /// Projections the LoRA kernels were measured on.
    pub lora_targets: Vec<TargetModule>,
    /// All of one step's per-layer dense work for `tokens` token rows, over all layers: the
    /// q,k,v,o,gate_up,down GEMMs plus the RMSNorms, RoPE, SiLU·mul, residual adds and KV
    /// stores the executor launches (everything of a layer but attention and LoRA), weights
    /// streamed once. The embedding lookup is counted here too.
    pub base_gemm: Vec<TokensPoint>,
    /// The final RMSNorm, the LM head GEMM and the logits cast for `tokens` sampled rows.
    pub lm_head: Vec<TokensPoint>,
    /// Prefill attention over all layers for ONE chunk, by (chunk tokens, context already
    /// cached); see [`PrefillAttentionPoint`].
    pub attention_prefill: Vec<PrefillAttentionPoint>,
    /// Decode attention over all layers for `batch` requests that each read `context` KV rows.
    pub attention_decode: Vec<DecodeAttentionPoint>,
    /// LoRA shrink (`x · A^T`) over all layers × `lora_targets`, by (tokens, distinct
    /// adapters, rank). When the `lora_prefill_*` grids are present these are decode rows
    /// (the MBGMV kernels) only; otherwise they price every LoRA token.
    pub lora_shrink: Vec<LoraPoint>,
    /// LoRA expand (`v · B^T`, added into the output) over all layers × `lora_targets`, by
    /// (tokens, distinct adapters, rank); decode rows only as for `lora_shrink`.
    pub lora_expand: Vec<LoraPoint>,
    /// LoRA of prefill segments (the MBGMM kernels), shrink and expand, by (prompt tokens
    /// that use an adapter, segments, rank): a different kernel from the decode rows', with a
    /// different cost curve. Absent (empty) in profiles written before it was measured.
    #[serde(default)]
    pub lora_prefill_shrink: Vec<LoraPoint>,
    #[serde(default)]
    pub lora_prefill_expand: Vec<LoraPoint>,
    /// Host-to-device copies by transfer size, one copy each, from pinned memory.
    pub host_to_device: Vec<TransferPoint>,
    /// Per-step host and launch time on the critical path that no grid above contains:
    /// measured as a minimal step (one decode token, no adapter) minus the GPU time of its
    /// kernels (its points of the grids above). Charged once per step.
    pub fixed_overhead: Measured,
    /// Sampling time per sampled token (after `lm_head`'s logits).
    pub sampling_per_token: Measured,
    /// What a step with prompt tokens costs beyond the sum of its parts: whole steps with a
    /// prompt (alone and beside decode rows) measured as the executor runs them, minus the
    /// parts' prediction; the median, never below zero. Charged once per step with prompt
    /// tokens. Absent in profiles written before it was measured.
    #[serde(default)]
    pub prefill_step_overhead: Option<Measured>,
    /// cuBLAS tiles the token dimension of the base GEMMs: above 128 tokens a step of `t`
    /// tokens costs about what one of `ceil(t / q) · q` tokens costs, a staircase that
    /// interpolating between grid points 256 and 512 apart misses by up to 20% (a prompt of
    /// ~260 tokens beside decode rows). The rounding never passes the next measured token
    /// count (where the grid is denser than `q` its points are the staircase) and stops at
    /// `base_gemm_token_quantum_max_tokens`. `calibrate` picks `q` among 64, 128 and 256 as the
    /// one that best predicts its whole steps with a prompt; absent: plain interpolation.
    #[serde(default)]
    pub base_gemm_token_quantum: Option<u32>,
    /// The largest token count the quantum applies to; above it the base GEMMs are plain
    /// interpolation. The executor tunes one cuBLASLt algorithm per token bucket up to this
    /// count, which makes a staircase; above it cuBLAS's heuristic picks per exact shape, and
    /// rounding there priced live steps with a prompt of more than 512 tokens 2.6-4.0% high
    /// (three hosts) against 1.1-2.1% without (docs/FIDELITY.md, session 8). Absent: the
    /// quantum applies at every count (profiles before session 8).
    #[serde(default)]
    pub base_gemm_token_quantum_max_tokens: Option<u32>,
    /// Decode rows of mixed ranks, by rows (increasing). The MBGMV kernels give each row work
    /// in proportion to its rank; in a batch that fills about one wave of the GPU the kernel
    /// ends with its highest-rank blocks, not at the mean, and the LoRA grid (one rank per
    /// point) cannot see that. Absent (profiles before session 9): mixed decode rows cost
    /// their mean rank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_rank_mix: Vec<RankMixPoint>,
    /// Steps with a prompt, by prompt tokens (increasing): what they cost beyond their parts.
    /// The base GEMMs' grid below 320 tokens is measured on decode steps, and a step that
    /// runs a prompt of 100-300 tokens costs 0.3-0.5 ms more than a decode step of as many
    /// rows (five Llama-7B calibrations: parts 3-8% low on one prompt alone of 100 and 200
    /// tokens; live prompt steps of 64-255 tokens 1.7-2.7% low). Measured on prompts with an
    /// adapter, and charged in proportion to the prompt tokens that have one. Below the first
    /// point the excess falls linearly to zero, beyond the last it stays. Absent (profiles
    /// before session 10): none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_step_excess: Vec<PromptExcessPoint>,
    /// Decode attention over spread contexts, by rows (increasing): what `calibrate`'s steps of
    /// requests spread evenly from 16 rows up cost beyond the `attention_decode` grid's estimate
    /// for their exact shape (its bucket-by-bucket share and longest-request bounds). The grid
    /// measures batches of one context; live batches mix them, and their attention ran 5-13%
    /// above the grid at 16-47 rows (docs/FIDELITY.md, session 10). A batch of spread `s`
    /// (`1 - mean context / longest context`; 0 for one context) is charged
    /// `min(s / spread, 1)` of the excess at its rows (held flat beyond the measured rows).
    /// Absent (profiles before session 11): none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_spread_excess: Vec<SpreadExcessPoint>,
    /// Where `decode_spread_excess` was measured when it was not measured with this profile's
    /// grids (`GPU x model, date` of that profile): a measurement made before `calibrate` had
    /// spread steps may take the term from a calibration of the same model shape on a GPU of
    /// the same SM count and clock (`calibrate --refit ... --spread-excess-from`). Absent:
    /// measured with the rest, or no term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_spread_excess_from: Option<String>,
    /// How much a distinct adapter beyond the decode LoRA grids' largest adapter count adds,
    /// as a share of the grids' last slope in adapters: a step of `a > A` distinct adapters is
    /// looked up at `A + share · (a - A)`. The grids extrapolated linearly (share 1) priced
    /// whole mixed-rank steps of 96-256 distinct adapters 3-18% high on the H100, whose grid
    /// stops at 64: once every row has an adapter of its own, more distinct adapters add
    /// little. `calibrate` fits it on its mixed-rank steps with more distinct adapters than the
    /// grid against the same mix with the grid's count. Absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_adapters_beyond_grid: Option<f64>,
    /// What each prompt chunk after the first adds to a step's prefill attention (the chunks
    /// share one launch). Absent: each adds all of its own time beyond the launch, and nothing
    /// per prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_extra_chunks: Option<ExtraChunks>,
    /// Up to this many tokens the `base_gemm` grid holds the top of every token bucket the
    /// executor tunes one GEMM algorithm for, so a count costs what the next measured count
    /// at or above it costs (its bucket's top, or a point inside the bucket): a staircase, in
    /// place of interpolating between buckets that run different algorithms and of the
    /// quantum. Absent (profiles before session 16, whose grids skip buckets): interpolation
    /// up to 128 tokens and the quantum above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_gemm_bucket_tops_to: Option<u32>,
    /// The base GEMMs' algorithms the grids were measured with, one per token bucket and
    /// weight shape. `--execute` adopts them on a GPU of the profile's name with the same
    /// cuBLASLt version instead of timing its own, so a live step runs what the profile
    /// prices: tuning picks among candidates a few microseconds apart, and two processes on
    /// one GPU could choose differently for a bucket (docs/FIDELITY.md, session 16). Absent:
    /// the server tunes its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm_algorithms: Option<GemmAlgorithms>,
}

/// [`CalibrationProfile::gemm_algorithms`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmAlgorithms {
    /// `cublasLtGetVersion()` of the calibration: cuBLASLt's algorithms are only meaningful to
    /// the version that made them.
    pub cublaslt_version: u64,
    pub buckets: Vec<GemmBucketAlgorithm>,
}

/// One token bucket's algorithm for one weight shape (`y[t, out] (+)= x[t, inp] · wᵀ`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmBucketAlgorithm {
    /// The bucket's top token count.
    pub tokens: u32,
    pub inp: u32,
    pub out: u32,
    /// Whether the GEMM adds to its output (a residual) rather than overwriting it.
    pub accumulate: bool,
    /// cuBLASLt's opaque `cublasLtMatmulAlgo_t`, its eight words.
    pub algo: [u64; 8],
}

/// [`CalibrationProfile::prefill_extra_chunks`]: a chunk after the first adds `share` of what
/// the prefill attention grid gives it alone beyond the launch, plus `per_prompt_s`. The grid
/// measures one chunk per launch, and a chunk alone leaves SMs idle that the other chunks of
/// the launch fill: whole steps of 4 or 16 prompts cost 4-10% less than the chunks' full times
/// added up, on every calibration (H100 and H200, three models), and live steps of 2-5 prompts
/// were priced 0.4-4.2% high on five machines (docs/FIDELITY.md, session 15). `per_prompt_s` is what steps of many small prompts show
/// beyond their parts (tens of µs a prompt). `calibrate` fits both on its whole steps of one
/// or several prompts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraChunks {
    /// Within [0, 1].
    pub share: f64,
    /// Seconds, at least 0.
    pub per_prompt_s: f64,
}

/// Reads and checks a calibration profile (JSON). Errors name the path and the field.
pub fn load_profile(path: &Path) -> Result<CalibrationProfile, CostError> {
    let text = std::fs::read_to_string(path).map_err(|source| CostError::ProfileRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_profile(&text, path)
}

/// Parses and checks a profile held in memory (the embedded H200 profile); `origin` names it
/// in errors.
pub fn parse_profile(text: &str, origin: &Path) -> Result<CalibrationProfile, CostError> {
    let profile: CalibrationProfile =
        serde_json::from_str(text).map_err(|source| CostError::ProfileParse {
            path: origin.to_path_buf(),
            source,
        })?;
    profile.validate(origin)?;
    Ok(profile)
}

impl CalibrationProfile {
    /// Checks the header, that every grid is non-empty, sorted, complete and free of
    /// duplicates, and that every time is positive, finite and ordered `p10 <= median <= p90`.
    pub fn validate(&self, origin: &Path) -> Result<(), CostError> {
        let bad = |field: String, reason: String| CostError::ProfileInvalid {
            path: origin.to_path_buf(),
            field,
            reason,
        };
        if self.format_version != PROFILE_FORMAT_VERSION {
            return Err(bad(
                "format_version".into(),
                format!(
                    "is {}, but this build reads version {PROFILE_FORMAT_VERSION}: re-run \
                     `slora-plan calibrate` with this build",
                    self.format_version
                ),
            ));
        }
        for (field, value) in [
            ("gpu_name", &self.gpu_name),
            ("driver_version", &self.driver_version),
            ("cuda_version", &self.cuda_version),
        ] {
            if value.trim().is_empty() {
                return Err(bad(field.into(), "must not be empty".into()));
            }
        }
        if !looks_like_iso_date(&self.date) {
            return Err(bad(
                "date".into(),
                format!(
                    "must be an ISO 8601 date like 2026-11-28, got `{}`",
                    self.date
                ),
            ));
        }
        if self.gpu_memory_bytes == 0 {
            return Err(bad(
                "gpu_memory_bytes".into(),
                "must be at least 1, got 0".into(),
            ));
        }
        if let Some(key) = &self.gpu_key {
            find_gpu(key).map_err(|e| bad("gpu_key".into(), e.to_string()))?;
        }
        self.model
            .validate()
            .map_err(|e| bad("model".into(), e.to_string()))?;
        if self.tensor_parallel == 0 {
            return Err(bad(
                "tensor_parallel".into(),
                "must be at least 1, got 0".into(),
            ));
        }
        if self.lora_targets.is_empty() {
            return Err(bad(
                "lora_targets".into(),
                "must name the projections the LoRA kernels were measured on".into(),
            ));
        }

        let origin_bad = &bad;
        check_grid(
            origin_bad,
            "base_gemm",
            ["tokens"],
            1,
            self.base_gemm.iter().map(|p| ([p.tokens as u64], &p.time)),
        )?;
        check_grid(
            origin_bad,
            "lm_head",
            ["tokens"],
            1,
            self.lm_head.iter().map(|p| ([p.tokens as u64], &p.time)),
        )?;
        check_grid(
            origin_bad,
            "attention_prefill",
            ["tokens", "context"],
            0,
            self.attention_prefill
                .iter()
                .map(|p| ([p.tokens as u64, p.context as u64], &p.time)),
        )?;
        // A first chunk may start at context 0, but `tokens` must still be at least 1.
        if let Some((i, _)) = self
            .attention_prefill
            .iter()
            .enumerate()
            .find(|(_, p)| p.tokens == 0)
        {
            return Err(bad(
                format!("attention_prefill[{i}].tokens"),
                "must be at least 1, got 0".into(),
            ));
        }
        check_grid(
            origin_bad,
            "attention_decode",
            ["batch", "context"],
            1,
            self.attention_decode
                .iter()
                .map(|p| ([p.batch as u64, p.context as u64], &p.time)),
        )?;
        for (name, grid) in [
            ("lora_shrink", &self.lora_shrink),
            ("lora_expand", &self.lora_expand),
            ("lora_prefill_shrink", &self.lora_prefill_shrink),
            ("lora_prefill_expand", &self.lora_prefill_expand),
        ] {
            if name.starts_with("lora_prefill") && grid.is_empty() {
                continue;
            }
            check_grid(
                origin_bad,
                name,
                ["tokens", "adapters", "rank"],
                1,
                grid.iter()
                    .map(|p| ([p.tokens as u64, p.adapters as u64, p.rank as u64], &p.time)),
            )?;
        }
        check_grid(
            origin_bad,
            "host_to_device",
            ["bytes"],
            1,
            self.host_to_device.iter().map(|p| ([p.bytes], &p.time)),
        )?;
        check_measured(origin_bad, "fixed_overhead".into(), &self.fixed_overhead)?;
        check_measured(
            origin_bad,
            "sampling_per_token".into(),
            &self.sampling_per_token,
        )?;
        for (i, p) in self.lora_rank_mix.iter().enumerate() {
            if !(0.0..=1.0).contains(&p.toward_highest) {
                return Err(bad(
                    format!("lora_rank_mix[{i}].toward_highest"),
                    format!("must lie in [0, 1], got {}", p.toward_highest),
                ));
            }
        }
        check_increasing_axis(
            origin_bad,
            "lora_rank_mix",
            "rows",
            self.lora_rank_mix.iter().map(|p| p.rows),
        )?;
        for (i, p) in self.prompt_step_excess.iter().enumerate() {
            if !(p.extra_s.is_finite() && p.extra_s >= 0.0) {
                return Err(bad(
                    format!("prompt_step_excess[{i}].extra_s"),
                    format!("must be finite and at least 0, got {}", p.extra_s),
                ));
            }
        }
        check_increasing_axis(
            origin_bad,
            "prompt_step_excess",
            "prompt_tokens",
            self.prompt_step_excess.iter().map(|p| p.prompt_tokens),
        )?;
        for (i, p) in self.decode_spread_excess.iter().enumerate() {
            if !p.extra_s.is_finite() {
                return Err(bad(
                    format!("decode_spread_excess[{i}].extra_s"),
                    format!("must be finite, got {}", p.extra_s),
                ));
            }
            if !(p.spread > 0.0 && p.spread <= 1.0) {
                return Err(bad(
                    format!("decode_spread_excess[{i}].spread"),
                    format!("must lie in (0, 1], got {}", p.spread),
                ));
            }
        }
        check_increasing_axis(
            origin_bad,
            "decode_spread_excess",
            "rows",
            self.decode_spread_excess.iter().map(|p| p.rows),
        )?;
        if let Some(share) = self.lora_adapters_beyond_grid {
            if !(0.0..=1.0).contains(&share) {
                return Err(bad(
                    "lora_adapters_beyond_grid".into(),
                    format!("must lie in [0, 1], got {share}"),
                ));
            }
        }
        if let Some(extra) = &self.prefill_extra_chunks {
            if !(0.0..=1.0).contains(&extra.share) {
                return Err(bad(
                    "prefill_extra_chunks.share".into(),
                    format!("must lie in [0, 1], got {}", extra.share),
                ));
            }
            if !(extra.per_prompt_s.is_finite() && extra.per_prompt_s >= 0.0) {
                return Err(bad(
                    "prefill_extra_chunks.per_prompt_s".into(),
                    format!("must be a time of at least 0 s, got {}", extra.per_prompt_s),
                ));
            }
        }
        if self.base_gemm_bucket_tops_to == Some(0) {
            return Err(bad(
                "base_gemm_bucket_tops_to".into(),
                "must be at least 1 token, got 0".into(),
            ));
        }
        if let Some(algorithms) = &self.gemm_algorithms {
            let mut seen = std::collections::HashSet::new();
            for (i, b) in algorithms.buckets.iter().enumerate() {
                for (field, v) in [("tokens", b.tokens), ("inp", b.inp), ("out", b.out)] {
                    if v == 0 {
                        return Err(bad(
                            format!("gemm_algorithms.buckets[{i}].{field}"),
                            "must be at least 1, got 0".into(),
                        ));
                    }
                }
                if !seen.insert((b.tokens, b.inp, b.out, b.accumulate)) {
                    return Err(bad(
                        format!("gemm_algorithms.buckets[{i}]"),
                        format!(
                            "a second algorithm for linear {}->{} at {} tokens (accumulate {})",
                            b.inp, b.out, b.tokens, b.accumulate
                        ),
                    ));
                }
            }
        }
        if let Some(source) = &self.decode_spread_excess_from {
            if self.decode_spread_excess.is_empty() {
                return Err(bad(
                    "decode_spread_excess_from".into(),
                    format!(
                        "names `{source}` as the source of decode_spread_excess, which is empty"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The keys of a one-axis term of a profile (`field[i].key`): each at least 1 and larger than
/// the one before.
fn check_increasing_axis(
    bad: &dyn Fn(String, String) -> CostError,
    field: &str,
    key: &str,
    keys: impl Iterator<Item = u32>,
) -> Result<(), CostError> {
    let mut before = None;
    for (i, k) in keys.enumerate() {
        if k == 0 {
            return Err(bad(
                format!("{field}[{i}].{key}"),
                "must be at least 1, got 0".into(),
            ));
        }
        if let Some(b) = before.filter(|&b| k <= b) {
            return Err(bad(
                format!("{field}[{i}].{key}"),
                format!("must increase: {k} follows {b}"),
            ));
        }
        before = Some(k);
    }
    Ok(())
}

/// `YYYY-MM-DD`, optionally followed by `T...` or ` ...` (a time).
fn looks_like_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() >= 10
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b.len() == 10 || b[10] == b'T' || b[10] == b' ')
}

fn check_measured<F>(bad: &F, field: String, m: &Measured) -> Result<(), CostError>
where
    F: Fn(String, String) -> CostError,
{
    for (name, v) in [
        ("median_s", m.median_s),
        ("p10_s", m.p10_s),
        ("p90_s", m.p90_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(bad(
                format!("{field}.{name}"),
                format!("must be a positive finite number of seconds, got {v}"),
            ));
        }
    }
    if !(m.p10_s <= m.median_s && m.median_s <= m.p90_s) {
        return Err(bad(
            field,
            format!(
                "must satisfy p10_s <= median_s <= p90_s, got {} / {} / {}",
                m.p10_s, m.median_s, m.p90_s
            ),
        ));
    }
    if m.samples == 0 {
        return Err(bad(
            format!("{field}.samples"),
            "must be at least 1, got 0".into(),
        ));
    }
    Ok(())
}

/// Checks one grid: non-empty, every axis value at least `min_axis` (the first axis at least
/// 1 in any case), keys strictly increasing in lexicographic order (sorted, no duplicates),
/// complete (as many points as the product of the distinct values per axis), and every
/// measurement valid.
fn check_grid<'a, F, const N: usize>(
    bad: &F,
    name: &str,
    axes: [&str; N],
    min_axis: u64,
    points: impl Iterator<Item = ([u64; N], &'a Measured)>,
) -> Result<(), CostError>
where
    F: Fn(String, String) -> CostError,
{
    let points: Vec<([u64; N], &Measured)> = points.collect();
    if points.is_empty() {
        return Err(bad(
            name.into(),
            "must hold at least one measured point".into(),
        ));
    }
    for (i, (key, m)) in points.iter().enumerate() {
        for (axis, (&v, &axis_name)) in key.iter().zip(axes.iter()).enumerate() {
            let min = if axis == 0 { min_axis.max(1) } else { min_axis };
            if v < min {
                return Err(bad(
                    format!("{name}[{i}].{axis_name}"),
                    format!("must be at least {min}, got {v}"),
                ));
            }
        }
        if i > 0 && points[i - 1].0 >= *key {
            return Err(bad(
                format!("{name}[{i}]"),
                format!(
                    "({}) = {:?} does not come after the previous point {:?}: points must be \
                     sorted by ({}) with no duplicates",
                    axes.join(", "),
                    key,
                    points[i - 1].0,
                    axes.join(", ")
                ),
            ));
        }
        check_measured(bad, format!("{name}[{i}].time"), m)?;
    }
    let mut product: usize = 1;
    let mut counts = Vec::with_capacity(N);
    for axis in 0..N {
        let mut values: Vec<u64> = points.iter().map(|(k, _)| k[axis]).collect();
        values.sort_unstable();
        values.dedup();
        counts.push(format!("{} {}", values.len(), axes[axis]));
        product = product.saturating_mul(values.len());
    }
    if product != points.len() {
        return Err(bad(
            name.into(),
            format!(
                "is not a complete grid: {} points, but {} values need {product}; measure \
                 every combination",
                points.len(),
                counts.join(" x ")
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn llama7b() -> ModelSpec {
        ModelSpec::preset("llama-7b").unwrap()
    }

    fn derived(gpu_key: &str, model: &ModelSpec) -> AnalyticCost {
        AnalyticCost::new(
            find_gpu(gpu_key).unwrap(),
            model,
            1,
            Efficiency::default(),
            &TargetModule::ATTENTION,
        )
        .unwrap()
    }

    fn decode_batch(batch: u32, context: u32) -> BatchShape {
        BatchShape {
            decode_requests: batch,
            decode_context_tokens: batch as u64 * (context as u64 + 1),
            max_decode_context: context + 1,
            ..BatchShape::default()
        }
    }

    /// DESIGN.md, "Reference measurements on an H200": Llama-7B linear layers, cuBLAS alone.
    const H200_TABLE: [(u32, f64); 6] = [
        (1, 3.71e-3),
        (32, 3.85e-3),
        (64, 3.87e-3),
        (128, 4.13e-3),
        (256, 5.53e-3),
        (512, 10.25e-3),
    ];

    #[test]
    fn h200_reference_table() {
        let model = llama7b();
        let cost = derived("h200", &model);
        // The table's weights: 12.95 GB of linear layers.
        assert!((cost.layers.weight_bytes / 1e9 - 12.95).abs() < 0.01);
        for (batch, measured) in H200_TABLE {
            let predicted = cost.gemm_seconds(&cost.layers, batch as f64);
            let err = predicted / measured - 1.0;
            println!(
                "batch {batch:>3}: measured {:.2} ms, predicted {:.3} ms, error {:+.1}%",
                measured * 1e3,
                predicted * 1e3,
                err * 100.0
            );
            assert!(err.abs() < 0.06, "batch {batch}: error {err:+.3}");
            // The step's base_gemm is the same plus the LM head for the sampled tokens.
            let step = cost
                .step_cost(&decode_batch(batch, 0))
                .base_gemm
                .as_secs_f64();
            assert!(
                step > predicted && step < predicted * 1.05,
                "{step} vs {predicted}"
            );
        }
    }

    #[test]
    fn smooth_max_fast_path_matches_powf() {
        for p in [1.0, 2.0, 3.0, 8.0, 16.0, 512.0] {
            let fast = SmoothMax::new(p);
            let slow = SmoothMax { p, squarings: None };
            assert_eq!(fast.squarings.is_some(), p != 3.0, "{p}");
            for (a, b) in [
                (1.0, 0.5),
                (3e-3, 2.9e-3),
                (1e-6, 4e-6),
                (2.0, 0.0),
                (0.0, 0.0),
            ] {
                let (x, y) = (fast.of(a, b), slow.of(a, b));
                assert!((x - y).abs() <= 1e-12 * x.abs(), "p {p}: {x} vs {y}");
                assert!(x >= a.max(b) && x <= 2f64.powf(1.0 / p) * a.max(b) * (1.0 + 1e-12));
            }
        }
    }

    #[test]
    fn square_gemm_reaches_the_measured_tensor_rate() {
        // fp16 GEMM 8192^3 on the H200: ~870 TFLOP/s measured.
        let cost = derived("h200", &llama7b());
        let n = 8192.0_f64;
        let square = GemmGroup {
            weight_bytes: n * n * 2.0,
            act_bytes_per_token: 2.0 * n * 2.0,
            flops_per_token: 2.0 * n * n,
        };
        let tflops = 2.0 * n * n * n / cost.gemm_seconds(&square, n) / 1e12;
        assert!((tflops / 870.0 - 1.0).abs() < 0.06, "{tflops} TFLOP/s");
    }

    #[test]
    fn fitted_bandwidths_stay_below_the_copy_ceiling() {
        // A D2D copy moves 4,275 GB/s (read + write) on the H200: no kernel streams faster.
        let eff = Efficiency::default();
        let h200 = find_gpu("h200").unwrap();
        for f in [eff.weight_streaming, eff.kv_read, eff.lora_kernel] {
            assert!(f * h200.hbm_bandwidth < 4.275e12);
        }
        eff.validate().unwrap();
    }

    fn shape_from(v: &[u64; 13]) -> BatchShape {
        BatchShape {
            prefill_requests: v[0] as u32,
            prefill_tokens: v[1] as u32,
            prefill_attention_pairs: v[2],
            max_prefill_tokens: v[3] as u32,
            decode_requests: v[4] as u32,
            decode_context_tokens: v[5],
            max_decode_context: v[6] as u32,
            lora_tokens: v[7] as u32,
            lora_token_rank: v[8],
            distinct_adapters: v[9] as u32,
            distinct_rank_sum: v[10],
            blocking_load_bytes: v[11],
            prefetch_load_bytes: v[12],
            decode_context_histogram: ContextHistogram::default(),
            ..BatchShape::default()
        }
    }

    proptest! {
        #[test]
        fn step_time_is_monotone_in_every_field(
            base in prop::array::uniform13(0u64..5_000),
            scale in prop::array::uniform13(prop::sample::select(vec![1u64, 100, 10_000])),
            field in 0usize..13,
            bump in 1u64..100_000,
            gpu in prop::sample::select(vec!["h200", "a100-40g", "l4"]),
            tp in prop::sample::select(vec![1u32, 2, 8]),
        ) {
            let model = llama7b();
            let cost = derived_tp(gpu, &model, tp);
            let mut v = [0u64; 13];
            for i in 0..13 {
                v[i] = base[i] * scale[i];
            }
            let before = cost.step_cost(&shape_from(&v));
            v[field] += bump;
            let after = cost.step_cost(&shape_from(&v));
            prop_assert!(
                after.total() >= before.total(),
                "field {} +{}: {:?} -> {:?}", field, bump, before, after
            );
        }
    }

    #[test]
    fn monotone_across_the_gemm_bend_and_zero() {
        for tp in [1, 4] {
            let cost = derived_tp("h200", &llama7b(), tp);
            let mut last = Nanos::ZERO;
            for batch in 0..2048 {
                let t = cost.step_cost(&decode_batch(batch, 100)).total();
                assert!(t >= last, "TP {tp} batch {batch}: {t} < {last}");
                last = t;
            }
        }
    }

    #[test]
    fn gpu_ordering() {
        let model = llama7b();
        let shapes = [
            decode_batch(1, 10),
            decode_batch(64, 1000),
            decode_batch(512, 2000),
            BatchShape {
                prefill_requests: 4,
                prefill_tokens: 4096,
                prefill_attention_pairs: 4 * 1024 * 1025 / 2,
                max_prefill_tokens: 1024,
                lora_tokens: 4096,
                lora_token_rank: 4096 * 16,
                distinct_adapters: 4,
                distinct_rank_sum: 64,
                blocking_load_bytes: 64 << 20,
                ..BatchShape::default()
            },
        ];
        let h200 = derived("h200", &model);
        let h100 = derived("h100", &model);
        let a100 = derived("a100-80g", &model);
        for s in &shapes {
            let (t200, t100, ta) = (
                h200.step_cost(s).total(),
                h100.step_cost(s).total(),
                a100.step_cost(s).total(),
            );
            assert!(t200 <= t100, "{s:?}: H200 {t200} > H100 {t100}");
            assert!(ta > t100, "{s:?}: A100 {ta} <= H100 {t100}");
        }
    }

    #[test]
    fn catalogue_lookup() {
        for g in gpu_catalogue() {
            g.validate().unwrap();
            assert!(g.sources.contains("https://"), "{}", g.key);
            assert!(g.sources.contains("ASSUMPTION"), "{}", g.key);
            assert!(std::ptr::eq(find_gpu(g.key).unwrap(), g));
            assert!(std::ptr::eq(find_gpu(&g.key.to_uppercase()).unwrap(), g));
        }
        assert_eq!(find_gpu("h100").unwrap().key, "h100-sxm");
        assert_eq!(find_gpu(" H100_SXM ").unwrap().key, "h100-sxm");
        assert_eq!(find_gpu("A100-80GB").unwrap().key, "a100-80g");
        let h200 = find_gpu("h200").unwrap();
        assert_eq!(h200.memory_bytes, 141_000_000_000);
        assert_eq!(h200.hbm_bandwidth, 4.8e12);
        let err = find_gpu("b200").unwrap_err().to_string();
        for key in [
            "h200", "h100-sxm", "a100-80g", "a100-40g", "a10g", "l4", "l40s",
        ] {
            assert!(err.contains(key), "{err}");
        }
        assert!(
            err.contains("`b200`") && err.contains("alias h100"),
            "{err}"
        );
        // The SMs and their clock: each catalogue GPU's FP32 rate (SMs x FP32 lanes x 2 x
        // clock) gives its datasheet figure, and a GPU without them is refused by name.
        for (key, lanes, tflops) in [
            ("h100-sxm", 128.0, 66.9),
            ("a100-80g", 64.0, 19.5),
            ("l40s", 128.0, 91.6),
            ("l4", 128.0, 30.3),
        ] {
            let g = find_gpu(key).unwrap();
            let fp32 = f64::from(g.sm_count) * lanes * 2.0 * g.sm_clock_hz / 1e12;
            assert!(
                (fp32 / tflops - 1.0).abs() < 0.01,
                "{key}: {fp32} TFLOP/s vs {tflops}"
            );
        }
        let mut no_sms = h200.clone();
        no_sms.sm_count = 0;
        let err = no_sms.validate().unwrap_err().to_string();
        assert!(err.contains("`sm_count`") && err.contains("H200"), "{err}");
        let mut no_clock = h200.clone();
        no_clock.sm_clock_hz = f64::NAN;
        let err = no_clock.validate().unwrap_err().to_string();
        assert!(
            err.contains("`sm_clock_hz`") && err.contains("NaN"),
            "{err}"
        );
    }

    #[test]
    fn kv_pool_for_llama_7b_on_h200() {
        let model = llama7b();
        let h200 = find_gpu("h200").unwrap();
        let reserve = 4_000_000_000;
        let pages = kv_pool_pages(h200, &model, 0.9, reserve).unwrap();
        let expected = (126.9e9 - model.weight_bytes() as f64 - reserve as f64) / 524_288.0;
        assert!(
            (pages as f64 - expected).abs() <= 1.0,
            "{pages} vs {expected}"
        );
        // ~208k tokens of KV: S-LoRA-scale pools.
        assert!((200_000..220_000).contains(&pages), "{pages}");
        assert!(kv_pool_pages(h200, &model, 1.0, 0).unwrap() > pages);
        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            let err = kv_pool_pages(h200, &model, bad, 0).unwrap_err().to_string();
            assert!(err.contains("memory_utilization"), "{err}");
        }
        // A reserve that leaves weights but not one page.
        let tight = (0.9 * 141e9) as u64 - model.weight_bytes() - 1000;
        let err = kv_pool_pages(h200, &model, 0.9, tight).unwrap_err();
        assert!(matches!(err, CostError::NoKvSpace { .. }), "{err}");
    }

    #[test]
    fn llama_2_70b_does_not_fit_on_l4() {
        let model = ModelSpec::preset("llama-2-70b").unwrap();
        let l4 = find_gpu("l4").unwrap();
        let err = kv_pool_pages(l4, &model, 0.9, 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("llama-2-70b") && err.contains("L4"), "{err}");
        assert!(err.contains("137.9") && err.contains("20.60 GB"), "{err}");
        let err = AnalyticCost::new(
            l4,
            &model,
            1,
            Efficiency::default(),
            &TargetModule::ATTENTION,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("does not fit") && err.contains("24.00 GB"),
            "{err}"
        );
    }

    #[test]
    fn constructor_rejects_what_it_cannot_model() {
        let model = llama7b();
        let h200 = find_gpu("h200").unwrap();
        for tp in [0, 3, 16] {
            let err = AnalyticCost::new(
                h200,
                &model,
                tp,
                Efficiency::default(),
                &TargetModule::ATTENTION,
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("`tensor_parallel` is") && err.contains("1, 2, 4 and 8"),
                "{err}"
            );
        }
        let err = AnalyticCost::new(h200, &model, 1, Efficiency::default(), &[]).unwrap_err();
        assert!(err.to_string().contains("targets"), "{err}");
        let dup = [TargetModule::Q, TargetModule::Q];
        let err = AnalyticCost::new(h200, &model, 1, Efficiency::default(), &dup).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let eff = Efficiency {
            lora_kernel: 1.5,
            ..Efficiency::default()
        };
        let err = AnalyticCost::new(h200, &model, 1, eff, &TargetModule::ATTENTION)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`lora_kernel`") && err.contains("1.5"),
            "{err}"
        );
        let eff = Efficiency {
            roofline_sharpness: 0.5,
            ..Efficiency::default()
        };
        assert!(eff
            .validate()
            .unwrap_err()
            .to_string()
            .contains("roofline_sharpness"));
    }

    #[test]
    fn efficiency_overrides_keep_the_other_defaults() {
        let eff: Efficiency = serde_json::from_str(r#"{"lora_kernel": 0.4}"#).unwrap();
        assert_eq!(eff.lora_kernel, 0.4);
        assert_eq!(eff.weight_streaming, Efficiency::default().weight_streaming);
        let err = serde_json::from_str::<Efficiency>(r#"{"lora_kernal": 0.4}"#).unwrap_err();
        assert!(err.to_string().contains("lora_kernal"), "{err}");
    }

    #[test]
    fn parts_respond_to_their_inputs() {
        let model = llama7b();
        let cost = derived("h200", &model);
        let base = decode_batch(32, 1000);
        let plain = cost.step_cost(&base);
        assert_eq!(plain.lora_shrink, Nanos::ZERO);
        assert_eq!(plain.adapter_h2d, Nanos::ZERO);
        // 32 x 1001 rows x 512 KiB at 0.748 x 4.8 TB/s = 4.7 ms.
        let decode_ms = plain.attention_decode.as_secs_f64() * 1e3;
        assert!((decode_ms - 4.67).abs() < 0.05, "{decode_ms}");
        // 10 kernels x 32 layers x 2 us + 50 us.
        assert_eq!(plain.fixed_overhead, Nanos::from_micros(690));

        // 32 tokens on 32 distinct rank-16 adapters: 32 x 16 x 2 MiB = 1 GiB of A and B rows,
        // plus the activations (x read by shrink, y read and written by expand) of q,k,v,o.
        // The same 32 tokens on ONE adapter read as many rows (every token its own).
        let shared = BatchShape {
            lora_tokens: 32,
            lora_token_rank: 32 * 16,
            distinct_adapters: 1,
            distinct_rank_sum: 16,
            ..base.clone()
        };
        let one = cost.step_cost(&shared);
        let lora = BatchShape {
            lora_tokens: 32,
            lora_token_rank: 32 * 16,
            distinct_adapters: 32,
            distinct_rank_sum: 32 * 16,
            ..base.clone()
        };
        let c = cost.step_cost(&lora);
        let lora_ms = (c.lora_shrink + c.lora_expand).as_secs_f64() * 1e3;
        let activations = 3.0 * 32.0 * (4.0 * 4096.0) * 32.0 * 2.0;
        let expected_ms = (32.0 * 16.0 * 2.0 * 1048576.0 + activations) / (0.68 * 4.8e12) * 1e3;
        assert!(
            (lora_ms / expected_ms - 1.0).abs() < 0.01,
            "{lora_ms} vs {expected_ms}"
        );
        assert_eq!(
            one.lora_shrink + one.lora_expand,
            c.lora_shrink + c.lora_expand
        );

        // A prefetch shorter than the step hides behind it; a blocking load does not.
        let step = plain.total().as_secs_f64();
        let hidden_bytes = (0.5 * step * 0.8 * 64e9) as u64;
        let prefetch = BatchShape {
            prefetch_load_bytes: hidden_bytes,
            ..base.clone()
        };
        assert_eq!(cost.step_cost(&prefetch).adapter_h2d, Nanos::ZERO);
        let blocking = BatchShape {
            blocking_load_bytes: hidden_bytes,
            ..base.clone()
        };
        let h2d = cost.step_cost(&blocking).adapter_h2d.as_secs_f64();
        assert!((h2d / (0.5 * step) - 1.0).abs() < 1e-3, "{h2d}");
        let long = BatchShape {
            prefetch_load_bytes: 4 * hidden_bytes,
            ..base
        };
        let total = cost.step_cost(&long).total().as_secs_f64();
        assert!(
            (total / (2.0 * step) - 1.0).abs() < 1e-3,
            "{total} vs {step}"
        );
    }

    #[test]
    fn describe_and_provenance() {
        let cost = derived("l40s", &llama7b());
        assert_eq!(cost.provenance(), Provenance::Derived);
        let d = cost.describe();
        assert!(
            d.contains("L40S") && d.contains("llama-7b") && d.contains("derived"),
            "{d}"
        );
    }

    // --- calibration profiles ---

    fn m(median_s: f64) -> Measured {
        Measured {
            median_s,
            p10_s: median_s * 0.98,
            p90_s: median_s * 1.03,
            samples: 20,
        }
    }

    fn sample_profile() -> CalibrationProfile {
        let mut prefill = Vec::new();
        for tokens in [16, 256] {
            for context in [0, 1024] {
                prefill.push(PrefillAttentionPoint {
                    tokens,
                    context,
                    time: m(1e-5 * (tokens + context) as f64),
                });
            }
        }
        let mut decode = Vec::new();
        for batch in [1, 32] {
            for context in [128, 2048] {
                decode.push(DecodeAttentionPoint {
                    batch,
                    context,
                    time: m(1e-7 * (batch * context) as f64),
                });
            }
        }
        let mut lora = Vec::new();
        for tokens in [8, 64] {
            for adapters in [1, 8] {
                for rank in [8, 64] {
                    lora.push(LoraPoint {
                        tokens,
                        adapters,
                        rank,
                        time: m(1e-6 * (tokens + adapters * rank) as f64),
                    });
                }
            }
        }
        CalibrationProfile {
            format_version: PROFILE_FORMAT_VERSION,
            gpu_name: "NVIDIA H200".into(),
            gpu_key: Some("h200".into()),
            gpu_memory_bytes: 150_754_820_096,
            driver_version: "580.95.05".into(),
            cuda_version: "13.0".into(),
            date: "2026-11-28T10:00:00Z".into(),
            model: llama7b(),
            tensor_parallel: 1,
            lora_targets: TargetModule::ATTENTION.to_vec(),
            base_gemm: [1, 64, 512]
                .iter()
                .map(|&tokens| TokensPoint {
                    tokens,
                    time: m(3.7e-3 + 1e-5 * tokens as f64),
                })
                .collect(),
            lm_head: vec![TokensPoint {
                tokens: 1,
                time: m(8e-5),
            }],
            attention_prefill: prefill,
            attention_decode: decode,
            lora_shrink: lora.clone(),
            lora_expand: lora,
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
            host_to_device: [1 << 20, 64 << 20]
                .iter()
                .map(|&bytes| TransferPoint {
                    bytes,
                    time: m(bytes as f64 / 50e9),
                })
                .collect(),
            fixed_overhead: m(6e-4),
            sampling_per_token: m(2e-7),
        }
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("slora-cost-{}-{name}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn profile_round_trip() {
        let profile = sample_profile();
        let path = temp_file(
            "round-trip",
            &serde_json::to_string_pretty(&profile).unwrap(),
        );
        let loaded = load_profile(&path).unwrap();
        std::fs::remove_file(&path).ok();
        // serde_json's default float parser may be one ulp off the written shortest decimal
        // (its `float_roundtrip` feature is off), so numbers compare to 1e-15 relative.
        let (a, b) = (
            serde_json::to_value(&loaded).unwrap(),
            serde_json::to_value(&profile).unwrap(),
        );
        assert!(json_close(&a, &b), "{a}\n{b}");
    }

    fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
            }
            _ => a == b,
        }
    }

    fn profile_error(mutate: impl FnOnce(&mut CalibrationProfile), name: &str) -> String {
        let mut profile = sample_profile();
        mutate(&mut profile);
        let path = temp_file(name, &serde_json::to_string(&profile).unwrap());
        let err = load_profile(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(err.contains(&path.display().to_string()), "{err}");
        err
    }

    #[test]
    fn bad_profiles_name_path_and_field() {
        let err = profile_error(|p| p.base_gemm.swap(0, 1), "unsorted");
        assert!(
            err.contains("base_gemm[1]") && err.contains("sorted"),
            "{err}"
        );
        let err = profile_error(|p| p.attention_decode[2].time.median_s = -1.0, "negative");
        assert!(err.contains("attention_decode[2].time.median_s"), "{err}");
        let err = profile_error(|p| p.attention_decode[1].time.p90_s = 0.0, "zero");
        assert!(err.contains("attention_decode[1].time.p90_s"), "{err}");
        let err = profile_error(|p| p.lora_shrink.clear(), "empty");
        assert!(
            err.contains("`lora_shrink`") && err.contains("at least one"),
            "{err}"
        );
        let err = profile_error(
            |p| {
                p.lora_expand.pop();
            },
            "incomplete",
        );
        assert!(
            err.contains("`lora_expand`") && err.contains("complete grid"),
            "{err}"
        );
        let err = profile_error(|p| p.format_version = 99, "version");
        assert!(
            err.contains("format_version") && err.contains("99"),
            "{err}"
        );
        let err = profile_error(|p| p.date = "28/11/2026".into(), "date");
        assert!(err.contains("`date`"), "{err}");
        let err = profile_error(|p| p.fixed_overhead.p10_s = 1.0, "spread");
        assert!(
            err.contains("fixed_overhead") && err.contains("p10_s <= median_s"),
            "{err}"
        );
        let err = profile_error(|p| p.host_to_device[0].bytes = 0, "zero-bytes");
        assert!(err.contains("host_to_device[0].bytes"), "{err}");
        // A source named for a term that is not there.
        let err = profile_error(
            |p| p.decode_spread_excess_from = Some("NVIDIA H100 x llama-7b, 2026-12-06".into()),
            "spread-source",
        );
        assert!(
            err.contains("decode_spread_excess_from") && err.contains("H100"),
            "{err}"
        );

        // Not JSON of the right shape, and no file at all.
        let path = temp_file("garbage", r#"{"format_version": 1, "gpu_nam": "x"}"#);
        let err = load_profile(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(
            err.contains("gpu_nam") && err.contains(&path.display().to_string()),
            "{err}"
        );
        let missing = std::env::temp_dir().join("slora-cost-no-such-profile.json");
        let err = load_profile(&missing).unwrap_err().to_string();
        assert!(
            err.contains("cannot read") && err.contains("no-such-profile"),
            "{err}"
        );
    }

    // --- tensor parallelism ---

    fn derived_tp(gpu_key: &str, model: &ModelSpec, tp: u32) -> AnalyticCost {
        AnalyticCost::new(
            find_gpu(gpu_key).unwrap(),
            model,
            tp,
            Efficiency::default(),
            &TargetModule::ATTENTION,
        )
        .unwrap()
    }

    #[test]
    fn tensor_parallel_decode_is_faster_but_not_twice_as_fast() {
        let model = llama7b();
        let one = derived_tp("h200", &model, 1);
        let two = derived_tp("h200", &model, 2);
        for (batch, context) in [(1, 128), (32, 512), (128, 1024)] {
            let shape = decode_batch(batch, context);
            let (c1, c2) = (one.step_cost(&shape), two.step_cost(&shape));
            assert_eq!(c1.tp_communication, Nanos::ZERO);
            assert!(c2.tp_communication > Nanos::ZERO);
            let speedup = c1.total().as_secs_f64() / c2.total().as_secs_f64();
            assert!(
                speedup > 1.0 && speedup < 2.0,
                "batch {batch}: TP 2 speedup {speedup:.3}"
            );
            // The split parts halve (up to rounding to whole nanoseconds).
            for (whole, half) in [
                (c1.attention_decode, c2.attention_decode),
                (c1.lora_shrink, c2.lora_shrink),
            ] {
                assert!(half.0.abs_diff(whole.0 / 2) <= 1, "{whole} vs {half}");
            }
            assert!(c2.base_gemm < c1.base_gemm);
            assert_eq!(c1.fixed_overhead, c2.fixed_overhead);
            assert_eq!(c1.sampling, c2.sampling);
        }
    }

    #[test]
    fn tensor_parallel_communication_follows_the_ring_formula() {
        let model = llama7b();
        let eff = Efficiency::default();
        for (gpu_key, tp) in [("h200", 2u32), ("h200", 8), ("a100-80g", 4), ("l40s", 2)] {
            let gpu = find_gpu(gpu_key).unwrap();
            let cost = derived_tp(gpu_key, &model, tp);
            let shape = BatchShape {
                prefill_requests: 1,
                prefill_tokens: 500,
                prefill_attention_pairs: 500 * 501 / 2,
                max_prefill_tokens: 500,
                ..decode_batch(64, 300)
            };
            let (t, s) = (564.0, 65.0);
            let bw = eff.interconnect * gpu.interconnect_bandwidth;
            let p = tp as f64;
            let all_reduce = eff.all_reduce_latency_s + 2.0 * (p - 1.0) / p * t * 4096.0 * 2.0 / bw;
            let gather = eff.all_reduce_latency_s + (p - 1.0) / p * s * 32000.0 * 2.0 / bw;
            let want = 65.0 * all_reduce + gather;
            let got = cost.step_cost(&shape).tp_communication.as_secs_f64();
            assert!(
                (got / want - 1.0).abs() < 1e-6,
                "{gpu_key} TP {tp}: {got} vs {want}"
            );
        }
        // PCIe cards pay far more for the same collectives than NVLink ones.
        let shape = decode_batch(64, 300);
        let nvlink = derived_tp("h200", &model, 2)
            .step_cost(&shape)
            .tp_communication;
        let pcie = derived_tp("l40s", &model, 2)
            .step_cost(&shape)
            .tp_communication;
        assert!(pcie > nvlink, "{pcie} vs {nvlink}");
        // A step without tokens (loads only) has no collectives.
        let loads = BatchShape {
            blocking_load_bytes: 1 << 20,
            ..BatchShape::default()
        };
        assert_eq!(
            derived_tp("h200", &model, 4)
                .step_cost(&loads)
                .tp_communication,
            Nanos::ZERO
        );
    }

    #[test]
    fn tensor_parallel_splits_weights_and_multiplies_kv_pages() {
        let model = llama7b();
        let h200 = find_gpu("h200").unwrap();
        let reserve = 2_000_000_000;
        let norms = (32 * 2 * 4096 + 4096) * 2;
        assert_eq!(per_gpu_weight_bytes(&model, 1), model.weight_bytes());
        assert_eq!(
            per_gpu_weight_bytes(&model, 4),
            (model.weight_bytes() - norms).div_ceil(4) + norms
        );
        assert_eq!(
            kv_pool_pages_tp(h200, &model, 1, 0.9, reserve).unwrap(),
            kv_pool_pages(h200, &model, 0.9, reserve).unwrap()
        );
        let mut last = 0;
        for tp in [1, 2, 4, 8] {
            let pages = kv_pool_pages_tp(h200, &model, tp, 0.9, reserve).unwrap();
            // Each GPU keeps `page_bytes / TP` of every page in what its weight share leaves.
            let free = 0.9 * 141e9 - reserve as f64 - per_gpu_weight_bytes(&model, tp) as f64;
            let want = (free / (model.page_bytes() / tp as u64) as f64).floor();
            assert_eq!(pages as f64, want, "TP {tp}");
            assert!(
                pages > last * 2 - last.min(1),
                "TP {tp}: {pages} after {last}"
            );
            last = pages;
        }
    }

    #[test]
    fn llama_2_70b_needs_two_80gb_gpus() {
        let model = ModelSpec::preset("llama-2-70b").unwrap();
        let h100 = find_gpu("h100").unwrap();
        let reserve = 2_000_000_000;
        let err = kv_pool_pages_tp(h100, &model, 1, 0.9, reserve).unwrap_err();
        assert!(matches!(err, CostError::ModelDoesNotFit { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("does not fit") && text.contains("137.9") && text.contains("2 or more"),
            "{text}"
        );
        let err = AnalyticCost::new(
            h100,
            &model,
            1,
            Efficiency::default(),
            &TargetModule::ATTENTION,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not fit"), "{err}");
        for tp in [2, 4, 8] {
            assert!(kv_pool_pages_tp(h100, &model, tp, 0.9, reserve).unwrap() > 1000);
            let cost = derived_tp("h100", &model, tp);
            assert!(
                cost.describe().contains(&format!("TP {tp}")),
                "{}",
                cost.describe()
            );
        }
        // Eight L4s hold it too, two do not; the message gives the per-GPU share.
        let l4 = find_gpu("l4").unwrap();
        assert!(kv_pool_pages_tp(l4, &model, 8, 0.9, 1_000_000_000).is_ok());
        let err = kv_pool_pages_tp(l4, &model, 2, 0.9, 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at tensor_parallel 2")
                && err.contains("68.9")
                && err.contains("per GPU (1/2 of them)"),
            "{err}"
        );
    }

    #[test]
    fn tensor_parallel_must_split_heads_evenly() {
        // Llama-2-70B has 8 KV heads: 16 GPUs would replicate them (and 16 is no degree).
        let gqa = ModelSpec::preset("llama-2-70b").unwrap();
        let err = check_tensor_parallel(&gqa, 16).unwrap_err().to_string();
        assert!(err.contains("`tensor_parallel`"), "{err}");
        // A model with 4 KV heads cannot go to TP 8.
        let small_kv = ModelSpec {
            num_kv_heads: 4,
            name: "gqa-4".into(),
            ..llama7b()
        };
        let err = check_tensor_parallel(&small_kv, 8).unwrap_err().to_string();
        assert!(
            err.contains("`tensor_parallel`")
                && err.contains("`num_kv_heads`")
                && err.contains("replicated"),
            "{err}"
        );
        assert!(check_tensor_parallel(&small_kv, 4).is_ok());
        // Llama-30B has 52 heads: 4 divides them, 8 does not.
        let odd = ModelSpec::preset("llama-30b").unwrap();
        assert!(check_tensor_parallel(&odd, 4).is_ok());
        let err = check_tensor_parallel(&odd, 8).unwrap_err().to_string();
        assert!(
            err.contains("`tensor_parallel`") && err.contains("`num_heads`") && err.contains("52"),
            "{err}"
        );
        let err = AnalyticCost::new(
            find_gpu("h200").unwrap(),
            &odd,
            8,
            Efficiency::default(),
            &TargetModule::ATTENTION,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`num_heads`"), "{err}");
    }

    #[test]
    fn tensor_parallel_one_is_the_single_gpu_model() {
        // TP 1 has no collectives and every shape costs what it did before TP existed: the
        // shares are exactly 1, so no floating-point result moves.
        let cost = derived("h200", &llama7b());
        assert_eq!(cost.tensor_parallel(), 1);
        assert_eq!(cost.lora_weight_share, 1.0);
        assert_eq!(cost.lora_in_act_share, 1.0);
        assert_eq!(cost.lora_out_act_share, 1.0);
        assert!(cost.describe().contains("TP 1"));
    }
}
