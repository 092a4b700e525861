//! `slora-plan doctor`: the first thing to run on a GPU box. It finds the driver, NVRTC and
//! cuBLAS, compiles every kernel, checks each against its CPU reference on fresh random data,
//! and (with a reference folder from `tests/gpu/reference.py`) runs the whole executor, driven
//! by the engine, against transformers + peft.
//!
//! The same functions exist without the `cuda` feature and return `Error::CudaNotCompiled`,
//! so callers need no `cfg`.

use crate::error::Result;
use crate::reference_model::ConfigCheck;
use std::path::Path;

/// One kernel check: worst error against the CPU reference.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub kernel: String,
    pub max_abs_err: f64,
    pub rel_err: f64,
    pub passed: bool,
}

/// Device, driver, NVRTC and cuBLAS, in a few lines.
pub fn device_summary() -> Result<Vec<String>> {
    imp::device_summary()
}

/// Compiles every module and checks every kernel on the GPU.
pub fn kernel_checks() -> Result<Vec<CheckRow>> {
    imp::kernel_checks()
}

/// Runs each configuration of a reference folder through the engine and the GPU executor
/// (prefill of the mixed batch, then greedy decoding) and compares with transformers + peft.
/// Each configuration runs twice: with the decode rows' LoRA beside the base GEMMs (how the
/// executor serves) and in line after them.
pub fn reference_check(dir: &Path) -> Result<Vec<ReferenceRun>> {
    imp::reference_check(dir)
}

/// One run of a reference configuration through the executor.
pub struct ReferenceRun {
    /// The comparison with transformers + peft.
    pub check: ConfigCheck,
    /// How many of its decode steps replayed a captured CUDA graph.
    pub graph_replays: u64,
    /// For the last run (in line): its logits against the overlapped run's and the first
    /// in-line run's, bit for bit.
    pub bit_compare: Option<BitComparison>,
    /// For run 5 (the decode rows grouped by adapter, LoRA beside the GEMMs): logit rows that
    /// differ in any bit from run 2 (the same but in the plan's order), and the rows compared.
    /// Each row's arithmetic does not depend on where it sits, so 0 is expected; cuBLAS does
    /// not promise it, so it is reported, and the run is held to the reference.
    pub grouped_vs_served: Option<(usize, usize)>,
}

/// How many logit rows of the last in-line run differ in any bit from the other runs of the
/// same executor.
pub struct BitComparison {
    pub rows: usize,
    /// Against the run with the decode rows' LoRA beside the GEMMs: must be 0 (the same
    /// function, so the same bits).
    pub overlapped_vs_in_line: usize,
    /// Against the first in-line run: must be 0 too (no kernel adds floats in an order that
    /// varies from run to run).
    pub in_line_vs_in_line: usize,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;
    use crate::error::Error;

    pub fn device_summary() -> Result<Vec<String>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn kernel_checks() -> Result<Vec<CheckRow>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn reference_check(_dir: &Path) -> Result<Vec<ReferenceRun>> {
        Err(Error::CudaNotCompiled)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::error::Error;
    use crate::executor::{ExecutorConfig, GpuExecutor, ModelWeights};
    use crate::gpu::Gpu;
    use crate::reference_model::{read_reference_suite, GreedyCheck, LogitStats};
    use slora_engine::{
        AdapterId, EngineConfig, Executor, Nanos, PoolLayout, RequestId, RequestMeta, Scheduler,
        SchedulerConfig,
    };
    use std::collections::HashMap;

    pub fn device_summary() -> Result<Vec<String>> {
        let gpu = Gpu::new(0)?;
        let info = gpu.info()?;
        Ok(vec![
            format!(
                "GPU 0: {} (compute capability {}.{}, {} multiprocessors)",
                info.name,
                info.compute_capability.0,
                info.compute_capability.1,
                info.multiprocessors
            ),
            format!(
                "memory: {:.1} GB total, {:.1} GB free",
                info.total_memory as f64 / 1e9,
                info.free_memory as f64 / 1e9
            ),
            format!(
                "driver: CUDA {}.{}; NVRTC {}.{}; cuBLAS: handle created",
                info.driver_version / 1000,
                (info.driver_version % 1000) / 10,
                info.nvrtc_version.0,
                info.nvrtc_version.1
            ),
            {
                let model =
                    slora_engine::ModelSpec::preset("llama-7b").map_err(|e| Error::Plan {
                        step: 0,
                        reason: e.to_string(),
                    })?;
                let pages =
                    GpuExecutor::pool_pages_from_free_memory(&gpu, &model, 4096 + 256, 64, 0.9)?;
                format!(
                    "a Llama-7B server at 90% of free memory: {pages} pool pages ({:.1} GB of KV cache and adapters)",
                    pages as f64 * model.page_bytes() as f64 / 1e9
                )
            },
        ])
    }

    pub fn kernel_checks() -> Result<Vec<CheckRow>> {
        let gpu = Gpu::new(0)?;
        let mut rows = Vec::new();
        for source in crate::sources::ALL {
            let started = std::time::Instant::now();
            gpu.module(*source)?;
            rows.push(CheckRow {
                kernel: format!(
                    "compile {} ({:.0} ms)",
                    source.name,
                    started.elapsed().as_secs_f64() * 1e3
                ),
                max_abs_err: 0.0,
                rel_err: 0.0,
                passed: true,
            });
        }
        macro_rules! collect {
            ($checks:expr) => {
                for c in $checks {
                    rows.push(CheckRow {
                        kernel: c.kernel,
                        max_abs_err: c.max_abs_err,
                        rel_err: c.rel_err,
                        passed: c.passed,
                    });
                }
            };
        }
        collect!(crate::ops::layers::check_on_gpu(&gpu)?);
        collect!(crate::ops::sampling::check_on_gpu(&gpu)?);
        collect!(crate::ops::attention::check_on_gpu(&gpu)?);
        collect!(crate::ops::lora::check_on_gpu(&gpu)?);
        collect!([crate::gemm::check_adoption(&gpu)?]);
        Ok(rows)
    }

    pub fn reference_check(dir: &Path) -> Result<Vec<ReferenceRun>> {
        let suite = read_reference_suite(dir)?;
        let mut out = Vec::new();
        for config in &suite.configs {
            let (model, extras, weights) = crate::weights::load_llama(&config.model_dir)?;
            let adapters = config
                .adapters
                .iter()
                .map(|(_, d)| crate::weights::load_peft_adapter(d, &model))
                .collect::<Result<Vec<_>>>()?;
            let pool_pages = 8192u32;
            let max_prompt: usize = config.requests.iter().map(|r| r.prompt.len()).sum();
            let sched = SchedulerConfig {
                max_prefill_tokens: (max_prompt as u32).max(64),
                ..SchedulerConfig::default()
            };
            // One executor, five runs of the batch: a first one in line that tunes the GEMMs
            // (each executor times cuBLASLt's candidates, so two executors may pick different
            // algorithms and differ in the last bits), then in line, with the decode rows'
            // LoRA on its own stream beside the base GEMMs (how the executor serves), in line
            // again, and run 4 (below). The last four are compared with the reference; the
            // overlapped run must give the bits of the in-line runs, which show how far two
            // in-line runs differ at all.
            let gpu = Gpu::new(0)?;
            let mut exec = GpuExecutor::new(
                gpu,
                ExecutorConfig {
                    model: model.clone(),
                    rms_norm_eps: extras.rms_norm_eps,
                    pool_pages,
                    max_step_tokens: max_prompt + config.requests.len() + 8,
                    // Twice the highest rank: every step then runs its LoRA kernels with
                    // fewer rank columns than the executor holds (the step's own highest
                    // rank), as a live executor sized for a scenario's ranks does.
                    max_rank: 2 * adapters.iter().map(|a| a.rank).max().unwrap_or(1),
                    record_prompt_logits: true,
                },
                ModelWeights::Host(&weights),
            )?;
            for (i, a) in adapters.iter().enumerate() {
                exec.register_adapter(AdapterId(i as u32), a)?;
            }
            let mut previous_logits: Vec<HashMap<(RequestId, u32), Vec<f32>>> = Vec::new();
            // Run 4: beside the GEMMs with the LoRA stream at the greatest priority and the
            // q/k/v and o GEMMs planned for 32 SMs fewer (`bench-gpu`'s alternatives to the
            // served form); other GEMM algorithms may change the last bits, so it is held to
            // the reference only. Run 5: as served (run 2) with each step's decode rows
            // grouped by adapter (`set_decode_rows_by_adapter`).
            let sms = exec.gpu.info()?.multiprocessors.max(33) as u32;
            for (run, (overlap, shared_sms, grouped)) in [
                (false, false, false),
                (false, false, false),
                (true, false, false),
                (false, false, false),
                (true, true, false),
                (true, false, true),
            ]
            .into_iter()
            .enumerate()
            {
                exec.reset();
                exec.set_decode_rows_by_adapter(grouped);
                exec.set_lora_overlap(overlap);
                exec.set_urgent_lora(shared_sms);
                exec.set_beside_gemm_sms(if shared_sms { sms - 32 } else { 0 });
                let replays_before = exec.graph_replays;
                let mut engine = Scheduler::new(EngineConfig {
                    model: model.clone(),
                    adapters: adapters.iter().map(|a| a.spec()).collect(),
                    pool_pages,
                    pool_layout: PoolLayout::Unified,
                    scheduler: sched.clone(),
                })
                .map_err(|e| Error::Plan {
                    step: 0,
                    reason: e.to_string(),
                })?;
                for (i, req) in config.requests.iter().enumerate() {
                    let id = RequestId(i as u64);
                    exec.add_request(id, req.prompt.clone())?;
                    let meta = RequestMeta {
                        id,
                        adapter: req.adapter.map(|a| AdapterId(a as u32)),
                        tenant: None,
                        prompt_tokens: req.prompt.len() as u32,
                        output_tokens: req.greedy.len().max(1) as u32,
                    };
                    engine.submit(meta, Nanos::ZERO).map_err(|e| Error::Plan {
                        step: 0,
                        reason: e.to_string(),
                    })?;
                }
                // Drive the engine to completion, keeping every logit row the executor recorded.
                let mut logits: HashMap<(RequestId, u32), Vec<f32>> = HashMap::new();
                let mut now = Nanos::ZERO;
                let mut finished_tokens: HashMap<RequestId, Vec<u32>> = HashMap::new();
                while let Some(plan) = engine.plan_step(now).map_err(|e| Error::Plan {
                    step: 0,
                    reason: e.to_string(),
                })? {
                    let report = exec.execute(&plan).map_err(|e| Error::Plan {
                        step: plan.step,
                        reason: e.to_string(),
                    })?;
                    for (id, pos, row) in exec.last_logits.drain(..) {
                        logits.insert((id, pos), row);
                    }
                    now = now + report.elapsed;
                    let outcome = engine
                        .complete_step(&report, now)
                        .map_err(|e| Error::Plan {
                            step: plan.step,
                            reason: e.to_string(),
                        })?;
                    for f in outcome.finished {
                        if let Some(t) = exec.remove_request(f.request) {
                            finished_tokens.insert(f.request, t);
                        }
                    }
                }
                let mut check = ConfigCheck {
                    name: format!(
                        "{} (run {run}, LoRA {})",
                        config.name,
                        match (overlap, shared_sms, grouped) {
                            (true, true, _) => "beside the GEMMs, urgent, GEMMs 32 SMs short",
                            (true, false, true) => "beside the GEMMs, rows grouped by adapter",
                            (true, false, false) => "beside the GEMMs",
                            _ => "in line",
                        }
                    ),
                    prompt: LogitStats::default(),
                    decode: LogitStats::default(),
                    greedy: Vec::new(),
                };
                for (i, req) in config.requests.iter().enumerate() {
                    let id = RequestId(i as u64);
                    let p = req.prompt.len();
                    for (pos, want) in req.prompt_logits.iter().enumerate() {
                        let got = logits
                            .get(&(id, pos as u32))
                            .map(|v| v.as_slice())
                            .unwrap_or(&[]);
                        check.prompt.add_row(got, want);
                    }
                    let tokens = finished_tokens.get(&id).cloned().unwrap_or_default();
                    let ours: Vec<u32> = tokens.get(p..).map(|t| t.to_vec()).unwrap_or_default();
                    let g = GreedyCheck::compare(&ours, &req.greedy, &req.decode_logits);
                    // Decode logits are comparable while our tokens follow the reference's.
                    for k in 1..=g.matched.min(req.decode_logits.len().saturating_sub(1)) {
                        let pos = (p - 1 + k) as u32;
                        if let Some(got) = logits.get(&(id, pos)) {
                            check.decode.add_row(got, &req.decode_logits[k]);
                        }
                    }
                    check.greedy.push(g);
                }
                // Runs 1 (in line), 2 (overlapped), 3 (in line).
                let bit_compare = (run == 3).then(|| BitComparison {
                    rows: logits.len(),
                    overlapped_vs_in_line: differing_rows(&previous_logits[2], &logits),
                    in_line_vs_in_line: differing_rows(&previous_logits[1], &logits),
                });
                let grouped_vs_served =
                    grouped.then(|| (differing_rows(&previous_logits[2], &logits), logits.len()));
                if run > 0 {
                    out.push(ReferenceRun {
                        check,
                        graph_replays: exec.graph_replays - replays_before,
                        bit_compare,
                        grouped_vs_served,
                    });
                }
                previous_logits.push(logits);
            }
            exec.set_decode_rows_by_adapter(false);
        }
        Ok(out)
    }

    /// Rows present in either map whose logits differ in any bit (or that the other lacks).
    fn differing_rows(
        a: &HashMap<(RequestId, u32), Vec<f32>>,
        b: &HashMap<(RequestId, u32), Vec<f32>>,
    ) -> usize {
        let same = |x: &Vec<f32>, y: &Vec<f32>| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        };
        let in_a = a
            .iter()
            .filter(|(k, row)| b.get(k).is_none_or(|other| !same(row, other)))
            .count();
        in_a + b.keys().filter(|k| !a.contains_key(k)).count()
    }
}
