//! `slora-plan bench-gpu`: the executor's performance against the GPU's own measured
//! ceilings (device-to-device copy bandwidth and cuBLAS GEMM rate, measured in the same run).
//! Every figure is a median over repeated runs; bytes and FLOPs are counted from the shapes.

use crate::error::Result;

/// Which of `bench-gpu`'s tables to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchSection {
    /// Every table.
    All,
    /// The ceilings and the decode rows' LoRA beside the GEMMs only (a short GPU call).
    LoraBeside,
    /// The ceilings and where the decode rows that share an adapter sit only (a short GPU
    /// call).
    LoraSharing,
}

/// Runs the benchmarks of `section`; returns Markdown lines (tables) for BENCHMARKS.md.
pub fn gpu_benchmarks(section: BenchSection) -> Result<Vec<String>> {
    imp::gpu_benchmarks(section)
}

/// Output tokens of each request in the decode benchmark: enough for 15 timed steps.
#[cfg(any(feature = "cuda", test))]
const DECODE_OUTPUT: u32 = 40;

/// The adapter of the decode benchmark's request `b` when every request has its own: spread
/// over the 1,000 registered adapters so that the ranks cycle (ids `3b` are distinct for
/// `b < 334`).
#[cfg(any(feature = "cuda", test))]
fn distinct_adapter(b: usize) -> slora_engine::AdapterId {
    slora_engine::AdapterId((b * 3 % 1000) as u32)
}

/// Pool pages the decode benchmark's batch holds at its largest when every request has its
/// own adapter (the case with the most adapter rows): each request's KV rows, as the engine
/// reserves them, and its adapter's rows.
#[cfg(any(feature = "cuda", test))]
fn decode_batch_pages(
    model: &slora_engine::ModelSpec,
    specs: &[slora_engine::AdapterSpec],
    batch: usize,
    prompt: u32,
    output: u32,
) -> u64 {
    let request = slora_engine::RequestMeta::new(0, None, prompt, output);
    let kv = batch as u64 * request.worst_case_pages();
    let adapters: u64 = (0..batch)
        .map(|b| specs[distinct_adapter(b).0 as usize].pages(model))
        .sum();
    kv + adapters
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use crate::error::{Error, Result};
    pub fn gpu_benchmarks(_section: super::BenchSection) -> Result<Vec<String>> {
        Err(Error::CudaNotCompiled)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::device;
    use crate::error::Result;
    use crate::executor::{ExecutorConfig, GpuExecutor, ModelWeights};
    use crate::gpu::{driver_err, Gpu, Phase, PhaseTimes};
    use crate::ops::lora;
    use crate::weights::synthetic_adapter;
    use half::f16;
    use slora_engine::{
        AdapterId, EngineConfig, Executor, ModelSpec, Nanos, PoolLayout, RequestId, RequestMeta,
        Scheduler, SchedulerConfig, TargetModule,
    };

    /// Median milliseconds of `reps` runs of `f`, timed with device events after 3 warm-ups.
    fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = gpu
                .stream
                .record_event(flags)
                .map_err(driver_err("event"))?;
            f()?;
            let end = gpu
                .stream
                .record_event(flags)
                .map_err(driver_err("event"))?;
            end.synchronize().map_err(driver_err("event sync"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("event time"))? as f64);
        }
        Ok(median(&mut times))
    }

    /// Milliseconds per call of `call`, captured `GRAPH_CALLS` times into one CUDA graph and
    /// the graph replayed (median of 10 replays, see `time_ms`), as a decode step runs it.
    fn graph_ms_per_call(gpu: &Gpu, mut call: impl FnMut() -> Result<()>) -> Result<f64> {
        const GRAPH_CALLS: usize = 20;
        gpu.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(driver_err("beginning capture"))?;
        let mut captured = Ok(());
        for _ in 0..GRAPH_CALLS {
            captured = captured.and_then(|_| call());
        }
        let graph = gpu
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(driver_err("ending capture"))?;
        captured?;
        let graph = graph.ok_or_else(|| crate::Error::Plan {
            step: 0,
            reason: "graph capture produced no graph".into(),
        })?;
        Ok(time_ms(gpu, 10, || {
            graph.launch().map_err(driver_err("graph replay"))
        })? / GRAPH_CALLS as f64)
    }

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    pub fn gpu_benchmarks(section: super::BenchSection) -> Result<Vec<String>> {
        let gpu = Gpu::new(0)?;
        let info = gpu.info()?;
        let mut out = vec![format!("GPU: {} ({} SMs)", info.name, info.multiprocessors)];

        // Ceiling 1: device-to-device copy, bytes read + written.
        let n = 1usize << 30;
        let src = device::alloc::<f16>(&gpu, n, "copy source")?;
        let mut dst = device::alloc::<f16>(&gpu, n, "copy destination")?;
        let ms = time_ms(&gpu, 10, || {
            gpu.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver_err("copy"))
        })?;
        let copy_bw = (2 * n * 2) as f64 / (ms * 1e-3);
        out.push(format!(
            "D2D copy of {} GiB: {ms:.3} ms, {:.0} GB/s (read + write)",
            (n * 2) >> 30,
            copy_bw / 1e9
        ));
        drop((src, dst));

        // Ceiling 2: cuBLAS fp16 GEMM 8192^3 on random data.
        let m = 8192usize;
        let mut a = device::alloc::<f16>(&gpu, m * m, "gemm a")?;
        let mut b = device::alloc::<f16>(&gpu, m * m, "gemm b")?;
        let mut c = device::alloc::<f16>(&gpu, m * m, "gemm c")?;
        device::fill_uniform(&gpu, &mut a, 1, 1.0)?;
        device::fill_uniform(&gpu, &mut b, 2, 1.0)?;
        let ms = time_ms(&gpu, 10, || {
            device::linear(&gpu, &a, &b, &mut c, m, m, m, false)
        })?;
        let gemm_rate = 2.0 * (m as f64).powi(3) / (ms * 1e-3);
        out.push(format!(
            "cuBLAS fp16 GEMM 8192^3: {ms:.3} ms, {:.0} TFLOP/s",
            gemm_rate / 1e12
        ));
        drop((a, b, c));

        if section == super::BenchSection::All {
            out.extend(mbgmv(&gpu, copy_bw)?);
        }
        out.extend(decode_steps(gpu, copy_bw, gemm_rate, section)?);
        Ok(out)
    }

    /// MBGMV (shrink + expand) on a 4096 -> 4096 projection, every request a distinct adapter,
    /// ranks cycling 8, 16, 32, 64. The adapters' rows are rotated over several disjoint sets
    /// of pages totalling well over the 60 MB L2, so repeated calls read HBM, not the cache.
    /// Timed two ways: launch by launch (events around each call), and as the executor runs
    /// it, inside a CUDA graph (20 calls captured, replays timed, divided by 20).
    fn mbgmv(gpu: &Gpu, copy_bw: f64) -> Result<Vec<String>> {
        let (inp, outp, w) = (4096usize, 4096usize, 4096usize);
        let ranks = [8usize, 16, 32, 64];
        let mut lines = vec![
            String::new(),
            "| batch | bytes (MB) | launched alone (µs) | GB/s | % of copy bandwidth | in a CUDA graph (µs) | GB/s | % of copy bandwidth | in a graph, no dependent launch (µs) | its % of copy bandwidth | in a graph, shrink over the work list (µs) | its % of copy bandwidth |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        for batch in [1usize, 8, 32, 64, 128, 256] {
            let rank: Vec<i32> = (0..batch).map(|i| ranks[i % 4] as i32).collect();
            let mut offset = Vec::with_capacity(batch);
            let mut total = 0i32;
            for &r in &rank {
                offset.push(total);
                total += r;
            }
            let pages = total as usize;
            let rank_sum: usize = rank.iter().map(|&r| r as usize).sum();
            let bytes =
                (rank_sum * (inp + outp) * 2 + batch * inp * 2 + batch * outp * 2 * 2) as f64;
            // Enough disjoint page sets that one round of calls reads >= 256 MB.
            let sets = ((256e6 / bytes).ceil() as usize).clamp(2, 64);
            let pool_pages = pages * sets;
            let mut pool = device::alloc::<f16>(gpu, 2 * pool_pages * w, "bench pool")?;
            device::fill_uniform(gpu, &mut pool, 3, 0.05)?;
            let mut x = device::alloc::<f16>(gpu, batch * inp, "x")?;
            device::fill_uniform(gpu, &mut x, 4, 1.0)?;
            let mut y = device::alloc::<f16>(gpu, batch * outp, "y")?;
            let mut scratch = device::alloc::<f32>(gpu, batch * 64, "scratch")?;
            let mut page_tables = Vec::with_capacity(sets);
            for set in 0..sets {
                let ids: Vec<i32> = (0..pages).map(|p| (set * pages + p) as i32).collect();
                page_tables.push(gpu.stream.clone_htod(&ids).map_err(driver_err("pages"))?);
            }
            let d_off = gpu
                .stream
                .clone_htod(&offset)
                .map_err(driver_err("offsets"))?;
            let d_rank = gpu.stream.clone_htod(&rank).map_err(driver_err("ranks"))?;
            let work = lora::shrink_work(rank.iter().map(|&r| r as usize), 64);
            let d_work = gpu
                .stream
                .clone_htod(&work)
                .map_err(driver_err("shrink work"))?;
            let d_scale = gpu
                .stream
                .clone_htod(&vec![0.5f32; batch])
                .map_err(driver_err("scales"))?;
            let shape = lora::LoraShape::new(inp, outp, w, 64, pool_pages);
            let k_side = pool.slice(..pool_pages * w);
            let v_side = pool.slice(pool_pages * w..);
            let mut next = 0usize;
            let work_view = d_work.slice(..);
            // Over the full grid (`listed` false) or the work list, as the executor runs it.
            let mut call = |next: &mut usize, listed: bool| -> Result<()> {
                let table = &page_tables[*next % sets];
                *next += 1;
                lora::lora_decode_with(
                    gpu,
                    &gpu.stream,
                    &x.slice(..),
                    &k_side,
                    &v_side,
                    &table.slice(..),
                    &d_off.slice(..),
                    &d_rank.slice(..),
                    &d_scale.slice(..),
                    &mut scratch.slice_mut(..),
                    &mut y.slice_mut(..),
                    listed.then_some(&work_view),
                    shape,
                    lora::DecodePath::Split,
                )
            };
            let alone = time_ms(gpu, 50, || call(&mut next, false))?;
            // The same calls captured into a graph, as in a decode step, with the expand as
            // the shrink's dependent and (the baseline, in the same run) launched after it the
            // classic way; then the shrink over the work list.
            let in_graph = graph_ms_per_call(gpu, || call(&mut next, false))?;
            let was_dependent = gpu.dependent_launch_enabled();
            gpu.set_dependent_launch(false);
            let plain = graph_ms_per_call(gpu, || call(&mut next, false));
            gpu.set_dependent_launch(was_dependent);
            let plain = plain?;
            let listed = graph_ms_per_call(gpu, || call(&mut next, true))?;
            let (bw_alone, bw_graph) = (bytes / (alone * 1e-3), bytes / (in_graph * 1e-3));
            lines.push(format!(
                "| {batch} | {:.2} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.0}% | {:.1} | {:.0}% | {:.1} | {:.0}% |",
                bytes / 1e6,
                alone * 1e3,
                bw_alone / 1e9,
                100.0 * bw_alone / copy_bw,
                in_graph * 1e3,
                bw_graph / 1e9,
                100.0 * bw_graph / copy_bw,
                plain * 1e3,
                100.0 * bytes / (plain * 1e-3) / copy_bw,
                listed * 1e3,
                100.0 * bytes / (listed * 1e-3) / copy_bw
            ));
        }
        lines.insert(1, "MBGMV, Llama-7B q_proj shape (4096 -> 4096), all-distinct adapters, ranks 8/16/32/64, L2-cold rotation:".into());
        Ok(lines)
    }

    /// Full steps of synthetic Llama-7B driven by the engine: decode at context ~512 for
    /// several batch sizes, with adapters (distinct per request, from 1,000 registered with
    /// mixed ranks) and without; and one prefill of 4,096 tokens across 8 adapters.
    fn decode_steps(
        gpu: Gpu,
        copy_bw: f64,
        gemm_rate: f64,
        section: super::BenchSection,
    ) -> Result<Vec<String>> {
        let model = ModelSpec::preset("llama-7b").map_err(|e| crate::Error::Plan {
            step: 0,
            reason: e.to_string(),
        })?;
        let ranks = [8u32, 16, 32, 64];
        let max_batch = 256usize;
        let prompt = 512u32;
        // 200,000 pages hold batch 256 at this context with its distinct adapters; a GPU with
        // less memory (an H100's 80 GB) gets what its free memory holds, and the batch sizes
        // that do not fit are reported as such rather than failing the whole benchmark.
        let pool_pages =
            GpuExecutor::pool_pages_from_free_memory(&gpu, &model, 8192 + max_batch, 64, 0.9)?
                .min(200_000);
        let cfg = ExecutorConfig {
            model: model.clone(),
            rms_norm_eps: 1e-5,
            pool_pages,
            max_step_tokens: 8192 + max_batch,
            max_rank: 64,
            record_prompt_logits: false,
        };
        let mut exec = GpuExecutor::new(gpu, cfg, ModelWeights::Synthetic { seed: 7 })?;
        let targets = TargetModule::ATTENTION.to_vec();
        let templates: Vec<_> = ranks
            .iter()
            .map(|&r| synthetic_adapter(&model, r, &targets, 2.0 * r as f32, r as u64))
            .collect();
        for (i, t) in templates.iter().enumerate() {
            exec.register_adapter(AdapterId(i as u32), t)?;
        }
        for i in 4..1000u32 {
            let like = exec
                .host_adapter(AdapterId(i % 4))
                .map(|h| h.share())
                .ok_or_else(|| crate::Error::Plan {
                    step: 0,
                    reason: "template adapter missing".into(),
                })?;
            exec.register_shared(AdapterId(i), &like);
        }
        let specs: Vec<_> = (0..1000u32)
            .map(|i| slora_engine::AdapterSpec {
                rank: ranks[(i % 4) as usize],
                targets: targets.clone(),
            })
            .collect();
        // The embedding table is not streamed: a step reads one row per token.
        let weight_bytes = model.weight_bytes() as f64
            - (model.vocab_size as f64 * model.hidden_size as f64 * 2.0);
        let mut lines = vec![
            String::new(),
            format!("Decode step, synthetic Llama-7B, context 512, engine-driven (host-timed, uploads and sync included); \"with adapters\" is the executor's default, the decode rows' LoRA beside the base GEMMs up to {} decode rows and in line above:", crate::executor::LORA_OVERLAP_MAX_DECODE_ROWS),
            "| batch | with adapters (ms) | without (ms) | adapter overhead | LoRA in line, same run (ms) | its overhead | Zipf(1) adapters (ms) | Zipf overhead | distinct (Zipf) | with adapters, no CUDA graph (ms) | no graph, LoRA in line (ms) | no dependent launch: with adapters / in line (ms) | shrink over the full grid, same run (ms) | its overhead | bytes moved (GB) | GB/s | % of copy bandwidth |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        let mut phase_lines = vec![
            String::new(),
            "Where a decode step's GPU time goes (with adapters, launch by launch, CUDA events between phases; GB/s = the phase's bytes over its time):".into(),
            "| batch | dense (ms) | dense GB/s | attention (ms) | attention GB/s | LoRA shrink (ms) | LoRA expand (ms) | LM head + sampling (ms) | sum of phases (ms) | step, host-timed (ms) |".into(),
            "|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        let mut next_id = 0u64;
        let distinct = DecodeBatch {
            model: &model,
            specs: &specs,
            pool_pages,
            max_batch,
            prompt,
            adapters: BatchAdapters::Distinct,
        };
        if section == super::BenchSection::LoraBeside {
            lines.extend(lora_beside_variants(&mut exec, distinct, &mut next_id)?);
            return Ok(lines);
        }
        if section == super::BenchSection::LoraSharing {
            lines.extend(lora_sharing_placement(&mut exec, distinct, &mut next_id)?);
            return Ok(lines);
        }
        let dependent_default = exec.gpu.dependent_launch_enabled();
        for batch in [1usize, 32, 64, 128, 256] {
            let needed =
                super::decode_batch_pages(&model, &specs, batch, prompt, super::DECODE_OUTPUT);
            if needed > pool_pages as u64 {
                let skipped = format!(
                    "| {batch} | not run: the batch holds {needed} pool pages at its largest; this GPU's free memory gives the pool {pool_pages} |"
                );
                lines.push(skipped.clone());
                phase_lines.push(skipped);
                continue;
            }
            let mut times = [0.0f64; 10];
            let mut adapter_bytes = 0f64;
            let mut zipf_distinct = 0u32;
            // Zipf(1) popularity over the 1,000 adapters, sampled deterministically at the
            // batch's quantiles: the typical batch of a skewed population, where popular
            // adapters share rows (S-LoRA's power-law workloads).
            let zipf = crate::measurement::zipf_quantiles(batch as u32, 1000);
            let mut phases: Vec<PhaseTimes> = Vec::new();
            // (adapters: 0 none, 1 distinct, 2 Zipf; CUDA graphs; phase timing; the decode
            // rows' LoRA on its own stream beside the base GEMMs, or in line after them; the
            // MBGMV expand launched as the shrink's dependent, the default from sm_90; the
            // MBGMV shrink over the step's work list, the default, or the full grid)
            for (k, (adapters, graphs, timing, overlap, dependent, listed)) in [
                (1u8, true, false, true, true, true),
                (0, true, false, true, true, true),
                (2, true, false, true, true, true),
                (1, false, false, true, true, true),
                (1, false, true, false, true, true),
                (1, true, false, false, true, true),
                (1, false, false, false, true, true),
                (1, true, false, true, false, true),
                (1, true, false, false, false, true),
                (1, true, false, true, true, false),
            ]
            .into_iter()
            .enumerate()
            {
                exec.gpu.set_dependent_launch(dependent);
                exec.set_shrink_work_list(listed);
                exec.set_cuda_graphs(graphs);
                exec.set_phase_timing(timing);
                exec.set_lora_overlap(overlap);
                let run = DecodeBatch {
                    model: &model,
                    specs: &specs,
                    pool_pages,
                    max_batch,
                    prompt,
                    adapters: match adapters {
                        0 => BatchAdapters::None,
                        1 => BatchAdapters::Distinct,
                        _ => BatchAdapters::Popular(&zipf),
                    },
                }
                .run(&mut exec, batch, &mut next_id)?;
                if adapters == 1 && !timing {
                    adapter_bytes = run.adapter_bytes;
                }
                if adapters == 2 {
                    zipf_distinct = run.distinct_adapters;
                }
                if timing {
                    phases = run.phases;
                }
                times[k] = run.median_ms;
            }
            exec.set_phase_timing(false);
            exec.set_shrink_work_list(true);
            exec.gpu.set_dependent_launch(dependent_default);
            let kv_bytes = batch as f64 * (prompt as f64 + 8.0) * model.kv_bytes_per_token() as f64;
            let bytes = weight_bytes + kv_bytes + adapter_bytes;
            let bw = bytes / (times[0] * 1e-3);
            lines.push(format!(
                "| {batch} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:+.1}% | {:.2} | {:+.1}% | {zipf_distinct} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:+.1}% | {:.2} | {:.0} | {:.0}% |",
                times[0],
                times[1],
                100.0 * (times[0] / times[1] - 1.0),
                times[5],
                100.0 * (times[5] / times[1] - 1.0),
                times[2],
                100.0 * (times[2] / times[1] - 1.0),
                times[3],
                times[6],
                times[7],
                times[8],
                times[9],
                100.0 * (times[9] / times[1] - 1.0),
                bytes / 1e9,
                bw / 1e9,
                100.0 * bw / copy_bw
            ));
            let phase = |p: Phase| median(&mut phases.iter().map(|t| t.get(p)).collect::<Vec<_>>());
            let dense = phase(Phase::Dense);
            let attn = phase(Phase::AttentionDecode);
            let lm_bytes = (model.vocab_size as f64) * model.hidden_size as f64 * 2.0;
            phase_lines.push(format!(
                "| {batch} | {dense:.2} | {:.0} | {attn:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                (weight_bytes - lm_bytes) / (dense * 1e-3) / 1e9,
                kv_bytes / (attn * 1e-3) / 1e9,
                phase(Phase::LoraShrink),
                phase(Phase::LoraExpand),
                phase(Phase::LmHead) + phase(Phase::Sampling),
                median(&mut phases.iter().map(|t| t.total()).collect::<Vec<_>>()),
                times[4],
            ));
        }

        lines.extend(phase_lines);
        lines.push(String::new());
        lines.push("Base GEMMs of the decode steps above: cuBLASLt's first-choice algorithm vs the fastest of its top 8, timed once per shape (events, median of 5; weights from HBM):".into());
        lines.push(
            "| tokens | in -> out | heuristic (µs) | tuned (µs) | tuned GB/s | gain |".into(),
        );
        lines.push("|---|---|---|---|---|---|".into());
        for r in exec.gpu.gemm.report() {
            if r.tokens > 256 {
                continue;
            }
            let bytes = 2.0 * (r.inp * r.out + r.tokens * (r.inp + r.out)) as f64;
            let planned_for = if r.sm_target > 0 {
                format!(" ({} SMs)", r.sm_target)
            } else {
                String::new()
            };
            lines.push(format!(
                "| {} | {} -> {}{planned_for} | {:.1} | {:.1} | {:.0} | {:+.1}% |",
                r.tokens,
                r.inp,
                r.out,
                r.heuristic_ms * 1e3,
                r.chosen_ms * 1e3,
                bytes / (r.chosen_ms * 1e-3) / 1e9,
                100.0 * (r.heuristic_ms / r.chosen_ms - 1.0)
            ));
        }
        exec.set_cuda_graphs(true);
        exec.set_lora_overlap(true);
        lines.extend(lora_beside_variants(&mut exec, distinct, &mut next_id)?);
        lines.extend(lora_sharing_placement(&mut exec, distinct, &mut next_id)?);
        // Prefill steps: the prompt rows' LoRA on tensor cores (the default) and on the SIMT
        // baseline, and the same prompts without adapters, measured in the same run.
        lines.push(String::new());
        lines.push("Prefill steps (one step each, host-timed; adapters resident before the timed step; distinct adapters of ranks 8-64 cycling per request):".into());
        lines.push("| prompts x tokens | without adapters (ms) | LoRA on tensor cores (ms) | its overhead | LoRA SIMT, same run (ms) | its overhead |".into());
        lines.push("|---|---|---|---|---|---|".into());
        let mut prefill_ms = Vec::new();
        for (requests, tokens) in [(1u32, 256u32), (1, 1024), (8, 512)] {
            let mut row = [0.0f64; 3];
            for (k, (adapters, path)) in [
                (false, lora::PrefillPath::TensorCore),
                (true, lora::PrefillPath::TensorCore),
                (true, lora::PrefillPath::Simt),
            ]
            .into_iter()
            .enumerate()
            {
                exec.set_prefill_lora_path(path);
                let mut times = Vec::new();
                for rep in 0..6u32 {
                    let t = prefill_step(
                        &mut exec,
                        &model,
                        &specs,
                        pool_pages,
                        (requests, tokens, adapters, rep),
                        &mut next_id,
                    )?;
                    if rep > 0 {
                        times.push(t);
                    }
                }
                row[k] = median(&mut times);
                if (requests, tokens, adapters, path)
                    == (8, 512, true, lora::PrefillPath::TensorCore)
                {
                    prefill_ms = times;
                }
            }
            lines.push(format!(
                "| {requests} x {tokens} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:+.1}% |",
                row[0],
                row[1],
                100.0 * (row[1] / row[0] - 1.0),
                row[2],
                100.0 * (row[2] / row[0] - 1.0)
            ));
        }
        exec.set_prefill_lora_path(lora::PrefillPath::default());
        let ms = median(&mut prefill_ms);
        let h = model.hidden_size as f64;
        let linear_params =
            (model.parameter_count() - model.vocab_size as u64 * model.hidden_size as u64) as f64;
        let tokens = 4096.0;
        let attention = 4.0 * 8.0 * (512.0 * 513.0 / 2.0) * h * model.num_layers as f64;
        let lora: f64 = 8.0
            * 512.0
            * 2.0
            * 4.0
            * 2.0
            * h
            * model.num_layers as f64
            * (8.0 + 16.0 + 32.0 + 64.0)
            / 4.0;
        let flops = 2.0 * linear_params * tokens + attention + lora;
        lines.push(String::new());
        lines.push(format!(
            "Prefill of 4,096 tokens (8 requests x 512, 8 distinct adapters of ranks 8-64, LoRA on tensor cores): {ms:.1} ms, {:.0} TFLOP/s = {:.0}% of the measured cuBLAS rate",
            flops / (ms * 1e-3) / 1e12,
            100.0 * flops / (ms * 1e-3) / gemm_rate
        ));
        Ok(lines)
    }

    /// Host-timed milliseconds of one prefill step of `requests` prompts of `tokens` tokens
    /// (`shape` = (requests, tokens, with adapters, a salt for the token ids)), each on its own
    /// adapter of `specs` when `with adapters`. One-token requests on the same adapters run to
    /// completion first on the same engine, so the adapters are resident and the timed step is
    /// the prefill alone (an error if it still plans loads).
    /// The decode rows' LoRA beside the q/k/v and o GEMMs, and ways of giving it SMs: as
    /// served (both streams at one priority, the GEMMs planned for the whole GPU); the q/k/v
    /// and o GEMMs planned for fewer SMs (`GpuExecutor::set_beside_gemm_sms`), in the steps
    /// with adapters and in those without, so that the overhead compares like GEMMs; and
    /// each with the LoRA stream at the greatest priority (`Gpu::set_urgent_lora`).
    /// Interleaved over three rounds (median of the rounds' medians), at the batches where
    /// the LoRA runs beside the GEMMs.
    fn lora_beside_variants(
        exec: &mut GpuExecutor,
        distinct: DecodeBatch<'_>,
        next_id: &mut u64,
    ) -> Result<Vec<String>> {
        let sms = exec.gpu.info()?.multiprocessors.max(1) as u32;
        let none = DecodeBatch {
            adapters: BatchAdapters::None,
            ..distinct
        };
        // SMs left to the LoRA (the q/k/v and o GEMMs are planned for the rest, with
        // adapters and without), and for each, the LoRA stream at its usual or the greatest
        // priority.
        let left_sms = [0u32, 8, 16, 32];
        let mut lines = vec![
            String::new(),
            format!("The decode rows' LoRA beside the q/k/v and o GEMMs (all-distinct adapters, context 512; host-timed decode steps, median of 3 interleaved rounds of medians): SMs left by planning those GEMMs (with adapters and without) for fewer of the GPU's {sms} (cuBLASLt's SM-count target), and the LoRA stream at the greatest priority or not:"),
            "| batch | SMs left | without adapters (ms) | with adapters (ms) | adapter overhead | urgent LoRA stream (ms) | its overhead | against the whole-GPU step without adapters: with / urgent |".into(),
            "|---|---|---|---|---|---|---|---|".into(),
        ];
        for batch in [1usize, 16, 32, 48] {
            if batch > crate::executor::LORA_OVERLAP_MAX_DECODE_ROWS {
                continue;
            }
            // [SMs left][without, with, urgent] -> one median per round
            let mut times = vec![[Vec::new(), Vec::new(), Vec::new()]; left_sms.len()];
            let kinds = [(&none, false), (&distinct, false), (&distinct, true)];
            for round in 0..3 {
                for (k, &left) in left_sms.iter().enumerate() {
                    exec.set_beside_gemm_sms(if left == 0 {
                        0
                    } else {
                        sms.saturating_sub(left).max(1)
                    });
                    // Each round starts at another of the three, so that each runs once in
                    // each position: session 24's first version always ran the served form
                    // right after the step without adapters, and could not tell a gain from
                    // an order effect.
                    for i in 0..kinds.len() {
                        let v = (i + round) % kinds.len();
                        let (run, urgent) = kinds[v];
                        exec.set_urgent_lora(urgent);
                        times[k][v].push(run.run(exec, batch, next_id)?.median_ms);
                    }
                }
            }
            exec.set_urgent_lora(false);
            exec.set_beside_gemm_sms(0);
            let whole_gpu_base = median(&mut times[0][0].clone());
            for (k, &left) in left_sms.iter().enumerate() {
                let [base, with, urgent] = [0, 1, 2].map(|v| median(&mut times[k][v].clone()));
                lines.push(format!(
                    "| {batch} | {left} | {base:.2} | {with:.2} | {:+.1}% | {urgent:.2} | {:+.1}% | {:+.1}% / {:+.1}% |",
                    100.0 * (with / base - 1.0),
                    100.0 * (urgent / base - 1.0),
                    100.0 * (with / whole_gpu_base - 1.0),
                    100.0 * (urgent / whole_gpu_base - 1.0),
                ));
            }
        }
        Ok(lines)
    }

    /// Where the decode rows that share an adapter sit in the batch, and the executor's
    /// grouping of them (`GpuExecutor::set_decode_rows_by_adapter`). Two populations, each
    /// placed two ways (the same adapters on the same number of rows):
    /// - two rows per adapter (S2's live steps with 100 adapters have 1.5-2 from 64 rows),
    ///   round robin (row b on adapter b mod batch/2: how `calibrate`'s grids share) or
    ///   adjacent (rows 2j and 2j + 1 on adapter j);
    /// - Zipf(1) over the 1,000 adapters at the batch's quantiles, adjacent (sorted, as in the
    ///   decode table) or interleaved (row b takes quantile 37 b mod batch).
    ///
    /// The round-robin and interleaved batches are measured again with the executor grouping
    /// rows by adapter, which should cost what the adjacent ones do. Host-timed decode steps
    /// (CUDA graphs, the LoRA as served), median of 3 rounds of 12-step medians, each round
    /// in another order; overheads against the same batch without adapters.
    fn lora_sharing_placement(
        exec: &mut GpuExecutor,
        distinct: DecodeBatch<'_>,
        next_id: &mut u64,
    ) -> Result<Vec<String>> {
        let mut lines = vec![
            String::new(),
            "Where decode rows that share an adapter sit (ranks 8-64 mixed, context 512; host-timed decode steps, median of 3 rounds; overhead against the same batch without adapters; \"grouped\": the executor lays out rows by adapter):".into(),
            "| batch | without adapters (ms) | 2 rows an adapter, round robin | adjacent | round robin, grouped | Zipf(1) adjacent | Zipf(1) interleaved | interleaved, grouped | distinct (Zipf) |".into(),
            "|---|---|---|---|---|---|---|---|---|".into(),
        ];
        for batch in [32usize, 64, 128, 256] {
            let needed = super::decode_batch_pages(
                distinct.model,
                distinct.specs,
                batch,
                distinct.prompt,
                super::DECODE_OUTPUT,
            );
            if batch > distinct.max_batch || needed > distinct.pool_pages as u64 {
                lines.push(format!(
                    "| {batch} | not run: the batch holds {needed} pool pages at its largest; the pool has {} |",
                    distinct.pool_pages
                ));
                continue;
            }
            let pairs = batch / 2;
            let round_robin: Vec<u32> = (0..batch)
                .map(|b| super::distinct_adapter(b % pairs).0)
                .collect();
            let adjacent: Vec<u32> = (0..batch)
                .map(|b| super::distinct_adapter(b / 2).0)
                .collect();
            let zipf = crate::measurement::zipf_quantiles(batch as u32, 1000);
            let interleaved: Vec<u32> = (0..batch).map(|b| zipf[b * 37 % batch]).collect();
            // (adapters, the executor grouping rows by adapter)
            let runs: [(BatchAdapters<'_>, bool); 7] = [
                (BatchAdapters::None, false),
                (BatchAdapters::Popular(&round_robin), false),
                (BatchAdapters::Popular(&adjacent), false),
                (BatchAdapters::Popular(&round_robin), true),
                (BatchAdapters::Popular(&zipf), false),
                (BatchAdapters::Popular(&interleaved), false),
                (BatchAdapters::Popular(&interleaved), true),
            ];
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
            let mut zipf_distinct = 0;
            for round in 0..3 {
                for i in 0..runs.len() {
                    let k = (i + round * 3) % runs.len();
                    let (adapters, grouped) = runs[k];
                    exec.set_decode_rows_by_adapter(grouped);
                    let run = DecodeBatch {
                        adapters,
                        ..distinct
                    }
                    .run(exec, batch, next_id)?;
                    if k == 4 {
                        zipf_distinct = run.distinct_adapters;
                    }
                    times[k].push(run.median_ms);
                }
            }
            exec.set_decode_rows_by_adapter(false);
            let t: Vec<f64> = times.iter_mut().map(|v| median(v)).collect();
            let cell = |k: usize| format!("{:.2} ms, {:+.1}%", t[k], 100.0 * (t[k] / t[0] - 1.0));
            lines.push(format!(
                "| {batch} | {:.2} | {} | {} | {} | {} | {} | {} | {zipf_distinct} |",
                t[0],
                cell(1),
                cell(2),
                cell(3),
                cell(4),
                cell(5),
                cell(6)
            ));
        }
        Ok(lines)
    }

    /// Which adapters a measured decode batch's requests use.
    #[derive(Clone, Copy)]
    enum BatchAdapters<'a> {
        None,
        /// Each request its own adapter (`distinct_adapter`): the worst case.
        Distinct,
        /// Request `b` on adapter `ids[b]` (a popularity's quantiles).
        Popular(&'a [u32]),
    }

    /// A decode batch of synthetic requests at one context, driven by the engine through
    /// the executor with the executor's switches as the caller set them.
    #[derive(Clone, Copy)]
    struct DecodeBatch<'a> {
        model: &'a ModelSpec,
        specs: &'a [slora_engine::AdapterSpec],
        pool_pages: u32,
        max_batch: usize,
        prompt: u32,
        adapters: BatchAdapters<'a>,
    }

    /// What [`DecodeBatch::run`] measured.
    struct DecodeRun {
        /// Median host-timed milliseconds of the decode steps at the full batch, the first
        /// three (capture, tuning) left out.
        median_ms: f64,
        /// Bytes of the distinct adapters' rows a step reads.
        adapter_bytes: f64,
        distinct_adapters: u32,
        /// Per-phase times of the steps after the first three (phase timing on only).
        phases: Vec<PhaseTimes>,
    }

    impl DecodeBatch<'_> {
        /// Prefills `batch` requests, then times up to 15 decode steps of the whole batch.
        fn run(
            &self,
            exec: &mut GpuExecutor,
            batch: usize,
            next_id: &mut u64,
        ) -> Result<DecodeRun> {
            let plan_err = |step: u64, e: String| crate::Error::Plan { step, reason: e };
            exec.reset();
            let mut engine = Scheduler::new(EngineConfig {
                model: self.model.clone(),
                adapters: self.specs.to_vec(),
                pool_pages: self.pool_pages,
                pool_layout: PoolLayout::Unified,
                scheduler: SchedulerConfig {
                    max_batch_size: self.max_batch as u32,
                    max_prefill_tokens: 8192,
                    ..SchedulerConfig::default()
                },
            })
            .map_err(|e| plan_err(0, e.to_string()))?;
            for b in 0..batch {
                let id = RequestId(*next_id);
                *next_id += 1;
                let tokens: Vec<u32> = (0..self.prompt)
                    .map(|t| (t * 7919 + b as u32 * 104_729) % 32000)
                    .collect();
                exec.add_request(id, tokens)?;
                let adapter = match self.adapters {
                    BatchAdapters::None => None,
                    BatchAdapters::Distinct => Some(super::distinct_adapter(b)),
                    BatchAdapters::Popular(ids) => Some(AdapterId(ids[b])),
                };
                engine
                    .submit(
                        RequestMeta {
                            id,
                            adapter,
                            tenant: None,
                            prompt_tokens: self.prompt,
                            output_tokens: super::DECODE_OUTPUT,
                        },
                        Nanos::ZERO,
                    )
                    .map_err(|e| plan_err(0, e.to_string()))?;
            }
            let mut now = Nanos::ZERO;
            let mut decode_ms = Vec::new();
            let mut measured = DecodeRun {
                median_ms: f64::NAN,
                adapter_bytes: 0.0,
                distinct_adapters: 0,
                phases: Vec::new(),
            };
            while let Some(plan) = engine
                .plan_step(now)
                .map_err(|e| plan_err(0, e.to_string()))?
            {
                let report = exec
                    .execute(&plan)
                    .map_err(|e| plan_err(plan.step, e.to_string()))?;
                if plan.prefill.is_empty() && plan.decode.len() == batch {
                    decode_ms.push(report.elapsed.0 as f64 / 1e6);
                    if decode_ms.len() == 1 {
                        measured.adapter_bytes =
                            plan.distinct_rank_sum as f64 * 2.0 * 1024.0 * 1024.0;
                        measured.distinct_adapters = plan.distinct_adapters;
                    }
                    if decode_ms.len() > 3 {
                        measured.phases.extend(exec.last_phase_times.clone());
                    }
                }
                now = now + report.elapsed;
                let outcome = engine
                    .complete_step(&report, now)
                    .map_err(|e| plan_err(plan.step, e.to_string()))?;
                for f in outcome.finished {
                    exec.remove_request(f.request);
                }
                if decode_ms.len() >= 15 {
                    break;
                }
            }
            let skip = decode_ms.len().min(3);
            measured.median_ms = median(&mut decode_ms[skip..].to_vec());
            Ok(measured)
        }
    }

    fn prefill_step(
        exec: &mut GpuExecutor,
        model: &ModelSpec,
        specs: &[slora_engine::AdapterSpec],
        pool_pages: u32,
        shape: (u32, u32, bool, u32),
        next_id: &mut u64,
    ) -> Result<f64> {
        let (requests, tokens, adapters, salt) = shape;
        let plan_err = |step: u64, e: String| crate::Error::Plan { step, reason: e };
        exec.reset();
        let mut engine = Scheduler::new(EngineConfig {
            model: model.clone(),
            adapters: specs.to_vec(),
            pool_pages,
            pool_layout: PoolLayout::Unified,
            scheduler: SchedulerConfig {
                max_prefill_tokens: (requests * tokens).max(1),
                ..SchedulerConfig::default()
            },
        })
        .map_err(|e| plan_err(0, e.to_string()))?;
        let mut now = Nanos::ZERO;
        for (prompt, timed) in [(1u32, false), (tokens, true)] {
            for b in 0..requests {
                let id = RequestId(*next_id);
                *next_id += 1;
                exec.add_request(
                    id,
                    (0..prompt)
                        .map(|t| (t * 31 + b * 17 + salt) % 32000)
                        .collect(),
                )?;
                engine
                    .submit(
                        RequestMeta {
                            id,
                            adapter: adapters.then_some(AdapterId(b * 5)),
                            tenant: None,
                            prompt_tokens: prompt,
                            output_tokens: 1,
                        },
                        now,
                    )
                    .map_err(|e| plan_err(0, e.to_string()))?;
            }
            while let Some(plan) = engine
                .plan_step(now)
                .map_err(|e| plan_err(0, e.to_string()))?
            {
                if timed && !plan.loads.is_empty() {
                    return Err(plan_err(
                        plan.step,
                        format!(
                            "the timed prefill step still loads {} adapters",
                            plan.loads.len()
                        ),
                    ));
                }
                let report = exec
                    .execute(&plan)
                    .map_err(|e| plan_err(plan.step, e.to_string()))?;
                if timed {
                    return Ok(report.elapsed.0 as f64 / 1e6);
                }
                now = now + report.elapsed;
                let outcome = engine
                    .complete_step(&report, now)
                    .map_err(|e| plan_err(plan.step, e.to_string()))?;
                for f in outcome.finished {
                    exec.remove_request(f.request);
                }
            }
        }
        Err(plan_err(0, "no prefill planned".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slora_engine::{AdapterSpec, ModelSpec, TargetModule};

    #[test]
    fn decode_batch_pages_counts_kv_rows_and_each_distinct_adapter() {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let ranks = [8u32, 16, 32, 64];
        let specs: Vec<_> = (0..1000)
            .map(|i| AdapterSpec {
                rank: ranks[i % 4],
                targets: TargetModule::ATTENTION.to_vec(),
            })
            .collect();
        // Llama-7B's page is one 4,096-wide row, so a rank-r adapter on q, k, v and o holds
        // 4r pages; request b has adapter 3b, whose rank is ranks[3b % 4].
        // 512 + 40 - 1 = 551 KV rows a request at its largest.
        assert_eq!(DECODE_OUTPUT, 40);
        assert_eq!(
            decode_batch_pages(&model, &specs, 1, 512, DECODE_OUTPUT),
            551 + 4 * 8
        );
        assert_eq!(
            decode_batch_pages(&model, &specs, 4, 512, DECODE_OUTPUT),
            4 * 551 + 4 * (8 + 64 + 32 + 16)
        );
        // Batch 256: 64 of each rank. It fits the 200,000 pages an H200 gives the benchmark,
        // not the ~120,000 an H100's 80 GB give after the weights.
        let batch_256 = decode_batch_pages(&model, &specs, 256, 512, DECODE_OUTPUT);
        assert_eq!(batch_256, 256 * 551 + 4 * 64 * (8 + 16 + 32 + 64));
        assert!((150_000..200_000).contains(&batch_256), "{batch_256}");
        // Distinct ids: every request of the largest batch has its own adapter.
        let ids: std::collections::BTreeSet<_> = (0..256).map(distinct_adapter).collect();
        assert_eq!(ids.len(), 256);
    }
}
