//! `slora-plan calibrate`: the executor's own operations timed over grids of shapes, for the
//! simulator's calibrated cost model.
//!
//! Every point runs real executor steps on hand-made plans (the engine is not needed to reach
//! a shape: requests are given KV pages directly, see `GpuExecutor::add_prefilled`), launch by
//! launch with CUDA events between the phases of the step (`gpu::Phase`), so one step yields
//! the dense, attention, LoRA, LM-head and sampling times of its shape. The per-step time
//! outside the phases (building and uploading the step's tables, launch gaps, the final
//! synchronisation and read-back) is the host-timed step without events minus the sum of its
//! phases. Adapter loads are timed as the executor does them: pinned host → staging on the
//! copy stream, scatter into pool pages, until the copy's event completes. Every LoRA point's
//! step is also timed whole, with its adapters and without (host-timed, no events): what the
//! adapters add to a step, which the event-timed phases overstate (see `measurement`).
//!
//! The KV pages of a point are laid out by a multiplicative permutation of the pool, so
//! neighbouring requests read distant pages, as a long-running server's do; a grid point
//! whose batch × context exceeds the pool reuses pages (timing only reads them; the engine
//! never plans such a step, so those points only anchor interpolation).

use crate::error::Result;
use crate::executor::{ExecutorConfig, GpuExecutor, ModelWeights};
use crate::gpu::{Gpu, Phase, PhaseTimes};
use crate::measurement::{bucket_tops, GEMM_TUNE_MAX_TOKENS};
use crate::weights::synthetic_adapter;
use slora_engine::{
    AdapterId, AdapterLoad, DecodeWork, Executor, ModelSpec, PageId, PageSpan, PrefillWork,
    RequestId, StepPlan, TargetModule,
};
use std::time::Instant;

pub use crate::measurement::{
    zipf_rows, Calibration, LoraConditionStep, LoraSpreadStep, RankMixSteps, SpreadDecodeStep,
    SpreadPattern, Stat, LORA_CONDITION_ADAPTERS, LORA_CONDITION_CONTEXTS, LORA_CONDITION_TOKENS,
    LORA_DECODE_ADAPTERS, LORA_DECODE_TOKENS, LORA_SHARED_ADAPTERS, LORA_SPREAD_PATTERNS,
    LORA_SPREAD_TOKENS, MIXED_CONTEXT, MIXED_SHAPES, SHARING_ADJACENT, SHARING_ROUND_ROBIN,
    SPREAD_BATCHES, SPREAD_PATTERNS,
};

/// The axes measured. Multi-axis grids are complete (every combination).
#[derive(Clone, Debug)]
pub struct Grid {
    /// Decode batch sizes: base GEMMs, LM head and decode attention at these token counts.
    pub decode_batches: Vec<u32>,
    /// Context lengths of the decode attention grid.
    pub decode_contexts: Vec<u32>,
    /// Prefill token counts for the base GEMMs, above the largest decode batch (a prefill
    /// plan's dense phase is not a decode plan's at the same count: at 192 tokens it measured
    /// 7.0 ms against 6.6 ms for a decode batch of 256). Dense from 320 to 1,024: the
    /// executor tunes a GEMM algorithm per power-of-two bucket, so the cost is a staircase
    /// there (384 tokens cost 13.3 ms, 576 cost 13.4 ms, 320 cost 8.3 ms), and a
    /// prompt of a few hundred tokens beside decode rows (the commonest mixed step) falls
    /// between the power-of-two points; interpolating across a step was off by up to 19%.
    pub prefill_tokens: Vec<u32>,
    /// Prefill attention: chunk tokens × cached context.
    pub prefill_chunk_tokens: Vec<u32>,
    pub prefill_contexts: Vec<u32>,
    /// LoRA of decode rows (MBGMV): tokens × distinct adapters × rank.
    pub lora_tokens: Vec<u32>,
    pub lora_adapters: Vec<u32>,
    pub lora_ranks: Vec<u32>,
    /// LoRA of prompt segments (MBGMM): tokens × segments (one adapter each) × rank.
    pub lora_prefill_tokens: Vec<u32>,
    pub lora_prefill_segments: Vec<u32>,
    /// Decode batches of spread contexts: these sizes, each in every pattern.
    pub spread_batches: Vec<u32>,
    pub spread_patterns: Vec<SpreadPattern>,
    /// Timed repetitions per point (after one warm-up).
    pub reps: usize,
}

impl Default for Grid {
    fn default() -> Grid {
        Grid {
            // Dense, with points just past 64 and 128: GEMM algorithms are tuned per token
            // bucket (`gemm::bucket_top`) and kernel plans change with the batch, so decode costs jump
            // just past a power of two (live runs: up to 2 ms at batch 129-160 against a
            // straight line from 128 to 256).
            decode_batches: vec![1, 8, 16, 32, 48, 64, 72, 96, 128, 136, 160, 192, 224, 256],
            decode_contexts: vec![64, 256, 512, 1024, 2048],
            prefill_tokens: vec![
                320, 384, 448, 512, 576, 640, 768, 896, 1024, 1536, 2048, 4096, 8192,
            ],
            prefill_chunk_tokens: vec![16, 32, 64, 128, 256, 512, 1024, 2048],
            prefill_contexts: vec![0, 512, 1536],
            lora_tokens: LORA_DECODE_TOKENS.to_vec(),
            lora_adapters: LORA_DECODE_ADAPTERS.to_vec(),
            lora_ranks: vec![8, 16, 32, 64],
            lora_prefill_tokens: vec![16, 64, 256, 1024, 4096],
            lora_prefill_segments: vec![1, 4, 16],
            spread_batches: SPREAD_BATCHES.to_vec(),
            spread_patterns: SPREAD_PATTERNS.to_vec(),
            reps: 5,
        }
    }
}

/// The NVIDIA driver's version as the kernel module reports it (Linux), else what CUDA says.
fn driver_version(cuda_driver_api: i32) -> String {
    std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|text| {
            let line = text.lines().next()?.to_string();
            // "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release
            // Build ...": the first word that is a dotted number.
            line.split_whitespace()
                .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("unknown (CUDA driver API {cuda_driver_api})"))
}

/// State of one calibration: the executor and the page layout.
struct Bench {
    exec: GpuExecutor,
    /// Pages `[0, kv_pages)` hold KV rows; adapters live above.
    kv_pages: u32,
    next_kv: u64,
    next_request: u64,
    next_step: u64,
    vocab: u32,
    /// `GpuExecutor::last_host_prep_s` of each host-timed run of the last `measure`.
    host_preps: Vec<f64>,
}

impl Bench {
    /// The `i`-th KV page handed out: a multiplicative permutation of the KV region (odd
    /// multiplier coprime with the region size), so consecutive pages are far apart.
    fn kv_page(&mut self) -> i32 {
        let i = self.next_kv;
        self.next_kv += 1;
        let n = self.kv_pages as u64;
        ((i.wrapping_mul(2_654_435_761) + 12_345) % n) as i32
    }

    fn request(&mut self, context: u32, extra_tokens: u32) -> (RequestId, Vec<u32>, Vec<i32>) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let tokens: Vec<u32> = (0..context + extra_tokens)
            .map(|t| (t.wrapping_mul(7919) ^ id.0 as u32).wrapping_mul(2_246_822_519) % self.vocab)
            .collect();
        let pages: Vec<i32> = (0..context).map(|_| self.kv_page()).collect();
        (id, tokens, pages)
    }

    /// Runs `plan` once: host seconds of the whole step, and its phases when `timed`.
    fn run(&mut self, plan: &StepPlan, timed: bool) -> Result<(f64, Option<PhaseTimes>)> {
        self.exec.set_phase_timing(timed);
        let start = Instant::now();
        self.exec.execute(plan).map_err(|e| crate::Error::Plan {
            step: plan.step,
            reason: e.to_string(),
        })?;
        let host = start.elapsed().as_secs_f64();
        let phases = if timed {
            self.exec.last_phase_times.clone()
        } else {
            None
        };
        self.exec.set_phase_timing(false);
        Ok((host, phases))
    }

    /// A decode step of `batch` requests at `context`, adapters assigned round robin.
    fn decode_plan(&mut self, batch: u32, context: u32, adapters: &[AdapterId]) -> StepPlan {
        self.decode_plan_of(&vec![context; batch as usize], adapters)
    }

    /// A decode step of one request per entry of `contexts`, at that context, adapters
    /// assigned round robin.
    fn decode_plan_of(&mut self, contexts: &[u32], adapters: &[AdapterId]) -> StepPlan {
        let mut plan = StepPlan {
            step: self.next_step,
            ..StepPlan::default()
        };
        self.next_step += 1;
        // Where the batch reads more rows than the KV region holds, pages repeat; the new
        // tokens' pages must still differ (each is the slot one token is written to).
        let mut new_pages = std::collections::HashSet::with_capacity(contexts.len());
        for (b, &context) in contexts.iter().enumerate() {
            let (id, tokens, pages) = self.request(context, 1);
            self.exec.add_prefilled(id, tokens, pages);
            let mut page = self.kv_page();
            while !new_pages.insert(page) {
                page = self.kv_page();
            }
            let page = PageId(page as u32);
            plan.decode.push(DecodeWork {
                request: id,
                adapter: (!adapters.is_empty()).then(|| adapters[b % adapters.len()]),
                context_len: context,
                page,
            });
        }
        plan
    }

    /// One prefill step: chunks of `(tokens, context)`, adapters round robin.
    fn prefill_plan(&mut self, chunks: &[(u32, u32)], adapters: &[AdapterId]) -> StepPlan {
        let mut plan = StepPlan {
            step: self.next_step,
            ..StepPlan::default()
        };
        self.next_step += 1;
        for (k, &(tokens, context)) in chunks.iter().enumerate() {
            let (id, all_tokens, pages) = self.request(context, tokens);
            self.exec.add_prefilled(id, all_tokens, pages);
            let start = plan.pages.len() as u32;
            for _ in 0..tokens {
                let p = self.kv_page();
                plan.pages.push(PageId(p as u32));
            }
            plan.prefill.push(PrefillWork {
                request: id,
                adapter: (!adapters.is_empty()).then(|| adapters[k % adapters.len()]),
                context_start: context,
                tokens,
                pages: PageSpan { start, len: tokens },
                emits_token: true,
            });
        }
        plan
    }

    /// A decode step of `batch` rows with one prompt chunk of `tokens` added (the prompt on
    /// `adapters[batch]`).
    fn mixed_plan(&mut self, tokens: u32, batch: u32, adapters: &[AdapterId]) -> StepPlan {
        let mut plan = self.decode_plan(batch, MIXED_CONTEXT, &adapters[..batch as usize]);
        let (id, all_tokens, pages) = self.request(0, tokens);
        self.exec.add_prefilled(id, all_tokens, pages);
        let start = plan.pages.len() as u32;
        for _ in 0..tokens {
            let p = self.kv_page();
            plan.pages.push(PageId(p as u32));
        }
        plan.prefill.push(PrefillWork {
            request: id,
            adapter: Some(adapters[batch as usize]),
            context_start: 0,
            tokens,
            pages: PageSpan { start, len: tokens },
            emits_token: true,
        });
        plan
    }

    fn release(&mut self, plan: &StepPlan) {
        for p in &plan.prefill {
            self.exec.remove_request(p.request);
        }
        for d in &plan.decode {
            self.exec.remove_request(d.request);
        }
    }

    /// Phases (medians over reps) and host-timed step (median) of plans made by `make`.
    fn measure(
        &mut self,
        reps: usize,
        mut make: impl FnMut(&mut Bench) -> StepPlan,
    ) -> Result<(Vec<PhaseTimes>, Vec<f64>)> {
        // Warm-up: compiles kernels, tunes GEMMs for the shape.
        let plan = make(self);
        self.run(&plan, false)?;
        self.release(&plan);
        let mut phases = Vec::with_capacity(reps);
        let mut hosts = Vec::with_capacity(reps);
        self.host_preps.clear();
        for _ in 0..reps {
            let plan = make(self);
            let (_, p) = self.run(&plan, true)?;
            self.release(&plan);
            phases.extend(p);
            let plan = make(self);
            let (host, _) = self.run(&plan, false)?;
            self.host_preps.push(self.exec.last_host_prep_s);
            self.release(&plan);
            hosts.push(host);
        }
        Ok((phases, hosts))
    }
}

fn phase_stat(phases: &[PhaseTimes], pick: impl Fn(&PhaseTimes) -> f64) -> Stat {
    Stat::of(phases.iter().map(|p| pick(p) * 1e-3).collect())
}

/// One LoRA grid point: its `(tokens, adapters or segments, rank)` and the median of `phase`.
fn lora_point(
    (tokens, adapters, rank): (u32, u32, u32),
    phases: &[PhaseTimes],
    phase: Phase,
) -> (u32, u32, u32, Stat) {
    (tokens, adapters, rank, phase_stat(phases, |p| p.get(phase)))
}

/// Measures `model` (synthetic weights) on GPU 0 over `grid`. `progress` gets a line per
/// grid being measured.
pub fn calibrate(model: &ModelSpec, grid: &Grid, progress: &dyn Fn(&str)) -> Result<Calibration> {
    let gpu = Gpu::new(0)?;
    let info = gpu.info()?;
    let max_rank = grid.lora_ranks.iter().copied().max().unwrap_or(64);
    let max_decode = grid.decode_batches.iter().copied().max().unwrap_or(256);
    let max_tokens = [
        grid.prefill_tokens.iter().copied().max().unwrap_or(0),
        grid.lora_prefill_tokens.iter().copied().max().unwrap_or(0),
        grid.prefill_chunk_tokens.iter().copied().max().unwrap_or(0),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
    .max(max_decode) as usize;
    let pool_pages =
        GpuExecutor::pool_pages_from_free_memory(&gpu, model, max_tokens, max_rank, 0.9)?;
    let targets = TargetModule::ATTENTION.to_vec();
    // The decode LoRA grid's adapter counts that fit this GPU's pool with every rank resident.
    let mut grid = grid.clone();
    let pages_of = |rank: u32| {
        slora_engine::AdapterSpec {
            rank,
            targets: targets.clone(),
        }
        .pages(model)
    };
    let fitting = crate::measurement::adapter_counts_that_fit(
        &grid.lora_adapters,
        &grid.lora_ranks,
        pages_of,
        pool_pages as u64,
    );
    if fitting != grid.lora_adapters {
        progress(&format!(
            "the pool ({pool_pages} pages) holds the LoRA grid's adapters up to {} of each rank, not {:?}: the adapters axis stops there",
            fitting.last().copied().unwrap_or(1),
            grid.lora_adapters
        ));
        grid.lora_adapters = fitting;
    }
    let grid = &grid;
    // Adapter region: every (rank, adapter) of the LoRA grid resident at once.
    let max_adapters = grid
        .lora_adapters
        .iter()
        .chain(&grid.lora_prefill_segments)
        .copied()
        .max()
        .unwrap_or(1);
    let adapter_pages: u64 = grid
        .lora_ranks
        .iter()
        .map(|&r| {
            max_adapters as u64
                * slora_engine::AdapterSpec {
                    rank: r,
                    targets: targets.clone(),
                }
                .pages(model)
        })
        .sum();
    if adapter_pages * 2 >= pool_pages as u64 {
        return Err(crate::Error::Plan {
            step: 0,
            reason: format!(
                "the LoRA grid's adapters need {adapter_pages} pages; the pool has {pool_pages}"
            ),
        });
    }
    let cfg = ExecutorConfig {
        model: model.clone(),
        rms_norm_eps: 1e-5,
        pool_pages,
        max_step_tokens: max_tokens + max_decode as usize,
        max_rank,
        record_prompt_logits: false,
    };
    let cuda_version = format!(
        "{}.{}",
        info.driver_version / 1000,
        (info.driver_version % 1000) / 10
    );
    let exec = GpuExecutor::new(gpu, cfg, ModelWeights::Synthetic { seed: 11 })?;
    let mut b = Bench {
        exec,
        kv_pages: pool_pages - adapter_pages as u32,
        next_kv: 0,
        next_request: 0,
        next_step: 0,
        vocab: model.vocab_size,
        host_preps: Vec::new(),
    };
    // The executor runs launch by launch while serving live (see `--execute`): calibrate it so.
    b.exec.set_cuda_graphs(false);
    let reps = grid.reps.max(1);

    // ---- Decode grid: base GEMMs, LM head, sampling, attention, fixed overhead -------------
    progress("decode steps (dense layers, LM head, decode attention, step overhead)");
    let mut base_gemm = Vec::new();
    let mut lm_head = Vec::new();
    let mut attention_decode = Vec::new();
    let mut decode_steps = Vec::new();
    let mut decode_step_prep = Vec::new();
    let mut overheads = Vec::new();
    let mut sampling = Vec::new();
    for &batch in &grid.decode_batches {
        for (ci, &context) in grid.decode_contexts.iter().enumerate() {
            let (phases, hosts) = b.measure(reps, |b| b.decode_plan(batch, context, &[]))?;
            attention_decode.push((
                batch,
                context,
                phase_stat(&phases, |p| p.get(Phase::AttentionDecode)),
            ));
            let host = Stat::of(hosts.clone());
            let sum = phase_stat(&phases, |p| p.total());
            overheads.push((host.median_s - sum.median_s).max(0.0));
            decode_steps.push((batch, context, host));
            decode_step_prep.push((batch, context, Stat::of(b.host_preps.clone())));
            if ci == 0 {
                base_gemm.push((batch, phase_stat(&phases, |p| p.get(Phase::Dense))));
                lm_head.push((batch, phase_stat(&phases, |p| p.get(Phase::LmHead))));
                sampling.extend(
                    phases
                        .iter()
                        .map(|p| p.get(Phase::Sampling) * 1e-3 / batch as f64),
                );
            }
        }
    }
    // ---- Decode steps over spread contexts: the check of the context axis ------------------
    // The grid above gives every request of a batch one context; a server's batch mixes them,
    // and live steps' attention cost more than the grid says at their rows and mean context
    // (docs/FIDELITY.md, session 10).
    progress("decode steps over spread contexts (the check of the context axis)");
    let mut spread_decode_steps = Vec::new();
    for pattern in &grid.spread_patterns {
        for &batch in grid.spread_batches.iter().filter(|&&b| b <= max_decode) {
            let contexts = pattern.contexts(batch);
            let (phases, hosts) = b.measure(reps, |b| b.decode_plan_of(&contexts, &[]))?;
            spread_decode_steps.push(SpreadDecodeStep {
                pattern: pattern.name(),
                contexts,
                attention: phase_stat(&phases, |p| p.get(Phase::AttentionDecode)),
                step: Stat::of(hosts),
            });
        }
    }
    // ---- Base GEMMs at the top of every tuned token bucket ------------------------------------
    // The executor runs one GEMM algorithm per token bucket (`gemm::bucket_top`), chosen by
    // timing candidates, and a bucket's algorithm can cost a few percent more or less than its
    // neighbours'. A bucket the decode grid skips (33-40 rows, 49-56, 65-80, ...) was priced
    // by interpolating over the neighbours' algorithms (docs/FIDELITY.md, session 16): its top
    // is measured here, as a decode step at the shortest context, of which only the dense
    // phase and the LM head are kept.
    progress("base GEMMs at the top of every token bucket");
    let decode_tops = bucket_tops(max_decode)
        .into_iter()
        .filter(|t| !grid.decode_batches.contains(t));
    for batch in decode_tops {
        let context = grid.decode_contexts.first().copied().unwrap_or(64);
        let (phases, _) = b.measure(reps, |b| b.decode_plan(batch, context, &[]))?;
        base_gemm.push((batch, phase_stat(&phases, |p| p.get(Phase::Dense))));
        lm_head.push((batch, phase_stat(&phases, |p| p.get(Phase::LmHead))));
    }
    lm_head.sort_by_key(|p| p.0);
    let fixed_overhead = Stat::of(overheads);
    // The per-token cost of sampling: at the largest batch (a lone argmax is launch-bound).
    let sampling_per_token = Stat::of(
        sampling
            .iter()
            .rev()
            .take(reps)
            .copied()
            .collect::<Vec<_>>(),
    );

    // ---- Base GEMMs at prefill sizes ---------------------------------------------------------
    progress("prefill steps (dense layers at prefill sizes)");
    let mut prefill_tokens = grid.prefill_tokens.clone();
    prefill_tokens.extend(
        bucket_tops(GEMM_TUNE_MAX_TOKENS)
            .into_iter()
            .filter(|&t| t > max_decode && !grid.prefill_tokens.contains(&t)),
    );
    prefill_tokens.sort_unstable();
    for &tokens in &prefill_tokens {
        let chunk = 512u32.min(tokens);
        let chunks: Vec<(u32, u32)> = (0..tokens.div_ceil(chunk))
            .map(|k| (chunk.min(tokens - k * chunk), 0))
            .collect();
        let (phases, _) = b.measure(reps, |b| b.prefill_plan(&chunks, &[]))?;
        base_gemm.push((tokens, phase_stat(&phases, |p| p.get(Phase::Dense))));
    }
    base_gemm.sort_by_key(|p| p.0);
    base_gemm.dedup_by_key(|p| p.0);

    // ---- Prefill attention ---------------------------------------------------------------------
    progress("prefill attention");
    let mut attention_prefill = Vec::new();
    for &tokens in &grid.prefill_chunk_tokens {
        for &context in &grid.prefill_contexts {
            let (phases, _) = b.measure(reps, |b| b.prefill_plan(&[(tokens, context)], &[]))?;
            attention_prefill.push((
                tokens,
                context,
                phase_stat(&phases, |p| p.get(Phase::AttentionPrefill)),
            ));
        }
    }

    // ---- Adapters: register, load (timing each load), LoRA kernels --------------------------
    progress("adapter loads and LoRA kernels");
    let mut host_to_device = Vec::new();
    let mut lora_shrink = Vec::new();
    let mut lora_expand = Vec::new();
    let mut lora_prefill_shrink = Vec::new();
    let mut lora_prefill_expand = Vec::new();
    let mut lora_steps = Vec::new();
    let mut lora_base_steps = Vec::new();
    let mut lora_prefill_steps = Vec::new();
    let mut lora_prefill_base_steps = Vec::new();
    let mut next_adapter_page = b.kv_pages;
    for (ri, &rank) in grid.lora_ranks.iter().enumerate() {
        let template = synthetic_adapter(model, rank, &targets, 2.0 * rank as f32, rank as u64);
        let ids: Vec<AdapterId> = (0..max_adapters)
            .map(|j| AdapterId(ri as u32 * 100_000 + j))
            .collect();
        b.exec.register_adapter(ids[0], &template)?;
        let host = b
            .exec
            .host_adapter(ids[0])
            .map(|h| h.share())
            .ok_or_else(|| crate::Error::Plan {
                step: 0,
                reason: "template adapter missing".into(),
            })?;
        for &id in &ids[1..] {
            b.exec.register_shared(id, &host);
        }
        let pages_each = host.pages as u32;
        let bytes = host.packed.len() as u64 * 2;
        // Each adapter loaded by its own blocking step, host-timed as the executor runs it;
        // the first is a warm-up.
        let mut load_times = Vec::new();
        for (j, &id) in ids.iter().enumerate() {
            let pages: Vec<PageId> = (0..pages_each)
                .map(|k| PageId(next_adapter_page + k))
                .collect();
            next_adapter_page += pages_each;
            let plan = StepPlan {
                step: b.next_step,
                loads: vec![AdapterLoad {
                    adapter: id,
                    rank,
                    bytes,
                    pages: PageSpan {
                        start: 0,
                        len: pages_each,
                    },
                    blocking: true,
                }],
                pages,
                ..StepPlan::default()
            };
            b.next_step += 1;
            let (host_s, _) = b.run(&plan, false)?;
            if j > 0 && j <= reps.max(3) {
                load_times.push(host_s);
            }
        }
        if !load_times.is_empty() {
            host_to_device.push((bytes, Stat::of(load_times)));
        }
        // Decode rows (contexts of 16 keep attention out of the way; the phases are apart).
        for &tokens in &grid.lora_tokens {
            if ri == 0 {
                let (_, hosts) = b.measure(reps, |b| b.decode_plan(tokens, 16, &[]))?;
                lora_base_steps.push((tokens, Stat::of(hosts)));
            }
            for &adapters in &grid.lora_adapters {
                let used = &ids[..adapters.min(tokens) as usize];
                let (phases, hosts) = b.measure(reps, |b| b.decode_plan(tokens, 16, used))?;
                let key = (tokens, adapters, rank);
                lora_steps.push((tokens, adapters, rank, Stat::of(hosts)));
                lora_shrink.push(lora_point(key, &phases, Phase::LoraShrink));
                lora_expand.push(lora_point(key, &phases, Phase::LoraExpand));
            }
        }
        // Prompt segments: the tokens spread evenly over `segments` requests, one adapter each.
        for &tokens in &grid.lora_prefill_tokens {
            for &segments in &grid.lora_prefill_segments {
                let segments = segments.min(tokens);
                let used = &ids[..segments as usize];
                let per = tokens / segments;
                let chunks: Vec<(u32, u32)> = (0..segments)
                    .map(|k| (per + u32::from(k < tokens % segments), 0))
                    .collect();
                if ri == 0 {
                    let (_, hosts) = b.measure(reps, |b| b.prefill_plan(&chunks, &[]))?;
                    lora_prefill_base_steps.push((tokens, segments, Stat::of(hosts)));
                }
                let (phases, hosts) = b.measure(reps, |b| b.prefill_plan(&chunks, used))?;
                let key = (tokens, segments, rank);
                lora_prefill_steps.push((tokens, segments, rank, Stat::of(hosts)));
                lora_prefill_shrink.push(lora_point(key, &phases, Phase::LoraShrink));
                lora_prefill_expand.push(lora_point(key, &phases, Phase::LoraExpand));
            }
        }
    }
    // ---- Whole steps with a prompt: what the sum of the parts misses ----------------------
    progress("whole steps with a prompt (the check of the parts)");
    let mixed_rank = if grid.lora_ranks.contains(&32) {
        32
    } else {
        grid.lora_ranks.first().copied().unwrap_or(8)
    };
    let rank_index = grid
        .lora_ranks
        .iter()
        .position(|&r| r == mixed_rank)
        .unwrap_or(0) as u32;
    let mut mixed_steps = Vec::new();
    let most = MIXED_SHAPES.iter().map(|s| s.1).max().unwrap_or(0) + 1;
    if max_adapters >= most.min(max_adapters) {
        // The LoRA grid's adapters of this rank, round robin.
        let ids: Vec<AdapterId> = (0..most)
            .map(|j| AdapterId(rank_index * 100_000 + j % max_adapters))
            .collect();
        for &(tokens, batch) in &MIXED_SHAPES {
            let (_, hosts) = b.measure(reps, |b| b.mixed_plan(tokens, batch, &ids))?;
            mixed_steps.push((tokens, batch, Stat::of(hosts)));
        }
    }

    // ---- Decode steps with adapters of mixed ranks: the check of the rank axis ------------
    // The LoRA grids time one rank at a time. Live steps of 32-63 rows with ranks 8-64 ran
    // 3-5% longer than the mean rank prices them (docs/FIDELITY.md, session 8), and the
    // MBGMV kernels' blocks do work in proportion to their rank, so a mixed batch ends with
    // its highest-rank blocks. Each mix is measured with as many distinct adapters as the
    // grid's largest count, so every step has one-rank counterparts in `lora_steps`; the last
    // mix repeats the first with every row's adapter distinct (up to the ranks times that count:
    // 256), as live steps of S2 with many adapters have.
    progress("decode steps with mixed ranks (the check of the rank axis)");
    let mut rank_mixes = Vec::new();
    let n_ranks = grid.lora_ranks.len();
    if n_ranks > 1 {
        let all: Vec<usize> = (0..n_ranks).collect();
        let extremes = vec![0, n_ranks - 1];
        let mut mixes = vec![(all.clone(), max_adapters)];
        if n_ranks > 2 {
            mixes.push((extremes, max_adapters));
        }
        mixes.push((all.clone(), max_adapters * n_ranks as u32));
        // Few adapters, each of its own rank, with many rows each, as S2's cells with 5
        // adapters have. A check, not fitted: on one H100 such a mix lay further toward its
        // highest rank at 16-32 rows than the mixes on many adapters (0.71 and 0.44 against
        // 0.19 and 0.13), yet the cost model without a term for it priced these steps within
        // 0.9% (median), and with one 1.9% (docs/FIDELITY.md, session 19).
        let few = LORA_CONDITION_ADAPTERS.min(max_adapters);
        if few as usize >= n_ranks && few < max_adapters {
            mixes.push((all, few));
        }
        for (rank_indices, adapters) in mixes {
            let len = rank_indices.len() as u32;
            // Element k: rank rank_indices[k % len], the (k / len)-th adapter of that rank.
            let per_rank = (adapters / len).clamp(1, max_adapters);
            let cycle: Vec<AdapterId> = (0..per_rank * len)
                .map(|k| {
                    let ri = rank_indices[(k % len) as usize] as u32;
                    AdapterId(ri * 100_000 + k / len)
                })
                .collect();
            let mut steps = Vec::new();
            for &tokens in grid.lora_tokens.iter().filter(|&&t| t >= 16) {
                let used = &cycle[..(tokens as usize).min(cycle.len())];
                let (_, hosts) = b.measure(reps, |b| b.decode_plan(tokens, 16, used))?;
                steps.push((tokens, Stat::of(hosts)));
            }
            rank_mixes.push(RankMixSteps {
                ranks: rank_indices.iter().map(|&i| grid.lora_ranks[i]).collect(),
                adapters: cycle.len() as u32,
                steps,
            });
        }
    }

    // ---- Decode LoRA at spread contexts ---------------------------------------------------
    // The grid and the rank mixes run at context 16. Host 29's live replays of S2 and GQA
    // cells (contexts spread over 9 to 1,000 rows) found the adapters adding 10-34% less than
    // the grid prices from 96 rows, and up to 12% more below (docs/FIDELITY.md, session 23);
    // priced so, S2 and S4 would gain and S1 (rank 8) would lose, so the effect may depend on
    // the rank. The condition steps below vary one context for all rows, on 4 adapters only.
    // Here: every rank of the grid mixed (row i of rank i modulo their count, distinct while
    // the widest mix's adapters last), and the lowest and the highest rank alone (distinct
    // while that rank's adapters last), at the grid's context, at one long context and at
    // two spreads; each step beside the same rows without adapters, measured together.
    progress("decode LoRA at spread contexts (the check of the LoRA grid)");
    let mut lora_spread_steps = Vec::new();
    let rank_count = grid.lora_ranks.len() as u32;
    // (ranks, their adapters in row order): adapter j of rank index ri is ri * 100_000 + j.
    let mut spread_sets: Vec<(Vec<u32>, Vec<AdapterId>)> = Vec::new();
    if rank_count > 0 && max_adapters > 0 {
        spread_sets.push((
            grid.lora_ranks.clone(),
            (0..max_adapters * rank_count)
                .map(|k| AdapterId((k % rank_count) * 100_000 + k / rank_count))
                .collect(),
        ));
        let mut alone = vec![0, rank_count - 1];
        alone.dedup();
        for ri in alone {
            spread_sets.push((
                vec![grid.lora_ranks[ri as usize]],
                (0..max_adapters)
                    .map(|j| AdapterId(ri * 100_000 + j))
                    .collect(),
            ));
        }
    }
    // At the grid's own context, also every rank mixed over fewer adapters than rows, the
    // rows on one adapter round robin (as in the grids) and adjacent: S2's and GQA's live
    // LoRA from 96 rows, 100 adapters shared, cost 10-34% less than priced where S1's rank 8
    // did not (docs/FIDELITY.md, session 24).
    let shared: Vec<AdapterId> = spread_sets
        .first()
        .filter(|(ranks, _)| ranks.len() > 1)
        .map(|(_, cycle)| {
            cycle
                .iter()
                .copied()
                .take(LORA_SHARED_ADAPTERS as usize)
                .collect()
        })
        .unwrap_or_default();
    for (p, pattern) in LORA_SPREAD_PATTERNS.iter().enumerate() {
        for &tokens in LORA_SPREAD_TOKENS.iter().filter(|&&t| t <= max_decode) {
            let contexts = pattern.contexts(tokens);
            let (_, without) = b.measure(reps, |b| b.decode_plan_of(&contexts, &[]))?;
            let without = Stat::of(without);
            let n = shared.len();
            let shared_sets: Vec<(&str, Vec<AdapterId>)> = if p == 0 && n > 0 && tokens as usize > n
            {
                let rows = tokens as usize;
                vec![
                    (SHARING_ROUND_ROBIN, shared.clone()),
                    (
                        SHARING_ADJACENT,
                        (0..rows).map(|r| shared[r * n / rows]).collect(),
                    ),
                ]
            } else {
                Vec::new()
            };
            // (sharing, ranks, the rows' adapters, distinct adapters of the set)
            let sets = spread_sets
                .iter()
                .map(|(ranks, cycle)| {
                    let used = &cycle[..(tokens as usize).min(cycle.len())];
                    ("", ranks, used, cycle.len())
                })
                .chain(
                    shared_sets
                        .iter()
                        .map(|(sharing, rows)| (*sharing, &grid.lora_ranks, rows.as_slice(), n)),
                );
            for (sharing, ranks, used, adapters) in sets {
                let (_, with) = b.measure(reps, |b| b.decode_plan_of(&contexts, used))?;
                lora_spread_steps.push(LoraSpreadStep {
                    pattern: pattern.name(),
                    contexts: contexts.clone(),
                    ranks: ranks.clone(),
                    adapters: adapters as u32,
                    with: Stat::of(with),
                    without,
                    sharing: sharing.into(),
                });
            }
        }
    }

    // ---- Decode LoRA under conditions the grid holds fixed -------------------------------
    // The grid's steps run at context 16 with rows on their adapters round robin. A live S1
    // cell's rank-8 LoRA added 22-38% less at 64-159 rows than its grid priced, while the
    // base step was priced within 0.4% (docs/FIDELITY.md, session 18): the context and the
    // popularity are varied here one at a time, for the lowest and the highest rank, each
    // step beside the same rows without adapters measured in the same minute. On two H100s
    // neither moved the increment by more than -7% to +14%, with no consistent sign: the
    // cause was the executor's rank columns (docs/FIDELITY.md, session 19). Kept as the
    // check that the grid's conditions price live ones.
    progress("decode LoRA at other contexts and popularities (the check of the LoRA grid)");
    let mut lora_condition_steps = Vec::new();
    let condition_adapters = LORA_CONDITION_ADAPTERS.min(max_adapters).max(1);
    let mut condition_ranks: Vec<(usize, u32)> = grid
        .lora_ranks
        .iter()
        .copied()
        .enumerate()
        .filter(|&(i, _)| i == 0 || i + 1 == grid.lora_ranks.len())
        .collect();
    condition_ranks.dedup_by_key(|r| r.1);
    for &tokens in &LORA_CONDITION_TOKENS {
        let popular = zipf_rows(tokens, condition_adapters);
        for &context in &LORA_CONDITION_CONTEXTS {
            let (_, without) = b.measure(reps, |b| b.decode_plan(tokens, context, &[]))?;
            let without = Stat::of(without);
            for &(ri, rank) in &condition_ranks {
                let ids: Vec<AdapterId> = (0..condition_adapters)
                    .map(|j| AdapterId(ri as u32 * 100_000 + j))
                    .collect();
                // One adapter per row: `decode_plan` gives row b `adapters[b % len]`.
                let by_popularity: Vec<AdapterId> =
                    popular.iter().map(|&a| ids[a as usize]).collect();
                for (zipf, rows) in [(false, &ids), (true, &by_popularity)] {
                    let (_, with) = b.measure(reps, |b| b.decode_plan(tokens, context, rows))?;
                    lora_condition_steps.push(LoraConditionStep {
                        tokens,
                        adapters: condition_adapters,
                        rank,
                        context,
                        zipf,
                        with: Stat::of(with),
                        without,
                    });
                }
            }
        }
    }

    host_to_device.sort_by_key(|p| p.0);
    host_to_device.dedup_by_key(|p| p.0);
    // Grids sorted lexicographically by their axes, as the profile format wants.
    lora_shrink.sort_by_key(|p| (p.0, p.1, p.2));
    lora_expand.sort_by_key(|p| (p.0, p.1, p.2));
    lora_prefill_shrink.sort_by_key(|p| (p.0, p.1, p.2));
    lora_prefill_expand.sort_by_key(|p| (p.0, p.1, p.2));
    lora_steps.sort_by_key(|p| (p.0, p.1, p.2));
    lora_prefill_steps.sort_by_key(|p| (p.0, p.1, p.2));
    attention_decode.sort_by_key(|p| (p.0, p.1));
    attention_prefill.sort_by_key(|p| (p.0, p.1));

    Ok(Calibration {
        date: String::new(),
        gpu_name: info.name.clone(),
        gpu_memory_bytes: info.total_memory,
        driver_version: driver_version(info.driver_version),
        cuda_version,
        model: model.clone(),
        lora_targets: targets,
        base_gemm,
        lm_head,
        attention_prefill,
        attention_decode,
        lora_shrink,
        lora_expand,
        lora_prefill_shrink,
        lora_prefill_expand,
        host_to_device,
        fixed_overhead,
        sampling_per_token,
        decode_steps,
        decode_step_prep,
        mixed_steps,
        mixed_rank,
        mixed_adapters: max_adapters,
        lora_steps,
        lora_base_steps,
        lora_prefill_steps,
        lora_prefill_base_steps,
        mixed_rank_steps: Vec::new(),
        mixed_rank_ranks: Vec::new(),
        mixed_rank_adapters: 0,
        rank_mixes,
        spread_decode_steps,
        lora_condition_steps,
        lora_spread_steps,
        cublaslt_version: Some(crate::gemm::cublaslt_version()),
        gemm_algorithms: b
            .exec
            .gpu
            .gemm
            .algorithms()
            .iter()
            .map(|a| {
                (
                    a.tokens as u32,
                    a.inp as u32,
                    a.out as u32,
                    a.accumulate,
                    a.algo,
                )
            })
            .collect(),
    })
}
