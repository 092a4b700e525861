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
    /// For the in-line run: how many logit rows differ in any bit from the run with the LoRA
    /// beside the GEMMs, out of how many (the two must compute the same bits).
    pub differing_from_overlap: Option<(usize, usize)>,
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
            // Twice: the decode rows' LoRA on its own stream beside the base GEMMs (how the
            // executor serves) and in line after them (the baseline), each against the
            // reference.
            let mut overlap_logits: HashMap<(RequestId, u32), Vec<f32>> = HashMap::new();
            for overlap in [true, false] {
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
                let gpu = Gpu::new(0)?;
                let mut exec = GpuExecutor::new(
                    gpu,
                    ExecutorConfig {
                        model: model.clone(),
                        rms_norm_eps: extras.rms_norm_eps,
                        pool_pages,
                        max_step_tokens: max_prompt + config.requests.len() + 8,
                        max_rank: adapters.iter().map(|a| a.rank).max().unwrap_or(1),
                        record_prompt_logits: true,
                    },
                    ModelWeights::Host(&weights),
                )?;
                exec.set_lora_overlap(overlap);
                for (i, a) in adapters.iter().enumerate() {
                    exec.register_adapter(AdapterId(i as u32), a)?;
                }
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
                        "{} (LoRA {})",
                        config.name,
                        if overlap {
                            "beside the GEMMs"
                        } else {
                            "in line"
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
                let differing_from_overlap = if overlap {
                    overlap_logits = logits;
                    None
                } else {
                    let differing = logits
                        .iter()
                        .filter(|(k, row)| {
                            overlap_logits.get(k).is_none_or(|o| {
                                o.len() != row.len()
                                    || o.iter()
                                        .zip(row.iter())
                                        .any(|(a, b)| a.to_bits() != b.to_bits())
                            })
                        })
                        .count();
                    Some((
                        differing + overlap_logits.len().saturating_sub(logits.len()),
                        logits.len(),
                    ))
                };
                out.push(ReferenceRun {
                    check,
                    graph_replays: exec.graph_replays,
                    differing_from_overlap,
                });
            }
        }
        Ok(out)
    }
}
