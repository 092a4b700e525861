//! `simulate --execute`: a scenario served live on the GPU by the engine core and the GPU
//! executor, through the same live driver (`slora_sim::live`) whose plans the conformance test
//! checks against the simulator's.
//!
//! One executor is kept for the whole command and reused by every scenario and sweep point of
//! the same model, so kernels are compiled and GEMMs tuned once. Before each run it is warmed
//! up (every kernel compiled, every decode batch-size bucket tuned) outside the timed window.
//! Weights and adapters are synthetic (seeded), of the scenario's shapes; prompts are seeded
//! random token ids; outputs run to the scenario's exact lengths (EOS is ignored, as the
//! simulator assumes).

use slora_sim::replay::RecordedStep;
use slora_sim::{RunResult, RunSetup};

/// One pass of `replay --execute` over a recorded run's plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayPass {
    /// The plans as the run made them, launch by launch as live.
    Recorded,
    /// The same plans with no adapter on any row (loads still copy): the base step, for
    /// what the adapters add to each step.
    NoLora,
    /// The plans as recorded with CUDA events between the phases of each step (every
    /// kernel in line on one stream): the time of each part.
    Phases,
    /// The plans without their adapters, phase-timed: the parts of the base step alone
    /// (whether a phase's excess over the profile comes with the adapters or without them).
    NoLoraPhases,
    /// The plans as recorded with each step's decode rows grouped by adapter
    /// (`GpuExecutor::set_decode_rows_by_adapter`): what placing rows that share an adapter
    /// next to each other saves on the live run's own steps.
    ByAdapter,
}

impl ReplayPass {
    pub fn name(self) -> &'static str {
        match self {
            ReplayPass::Recorded => "recorded",
            ReplayPass::NoLora => "no_lora",
            ReplayPass::Phases => "phases",
            ReplayPass::NoLoraPhases => "no_lora_phases",
            ReplayPass::ByAdapter => "by_adapter",
        }
    }

    /// Whether the pass times each phase.
    pub fn phase_timed(self) -> bool {
        matches!(self, ReplayPass::Phases | ReplayPass::NoLoraPhases)
    }

    /// Whether the pass runs the plans without their adapters.
    pub fn without_adapters(self) -> bool {
        matches!(self, ReplayPass::NoLora | ReplayPass::NoLoraPhases)
    }
}

/// The phase columns of a `Phases` pass, in `ReplayTiming::phases_s`' order.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const PHASE_NAMES: [&str; 7] = [
    "dense",
    "attention_prefill",
    "attention_decode",
    "lora_shrink",
    "lora_expand",
    "lm_head",
    "sampling",
];

/// One recorded step as a replay pass ran it on the GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct ReplayTiming {
    /// Row of the recording's steps.csv.
    pub index: usize,
    /// Host-timed, as the live driver times a step.
    pub executed_s: f64,
    /// GPU seconds per phase (`PHASE_NAMES`), for a `Phases` pass.
    pub phases_s: Option<[f64; 7]>,
    /// Host seconds before the step's first kernel (`GpuExecutor::last_host_prep_s`).
    pub host_prep_s: f64,
}

/// The profile algorithms a live run may adopt, or why it tunes its own: the profile must
/// have recorded them, on a GPU of this name, with this cuBLASLt version (cuBLASLt's
/// algorithms mean nothing to another version). Pure, so that it is tested without a GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn adoptable<'a>(
    profile: Option<&'a slora_sim::scenario::ProfileAlgorithms>,
    gpu_name: &str,
    cublaslt_version: u64,
) -> Result<&'a slora_sim::scenario::ProfileAlgorithms, String> {
    let Some(p) = profile else {
        return Err(
            "the run's cost model has no calibrated profile of this GPU with recorded algorithms"
                .into(),
        );
    };
    if p.gpu_name != gpu_name {
        return Err(format!(
            "the profile ({}) was measured on {}, this GPU is {gpu_name}",
            p.profile, p.gpu_name
        ));
    }
    if p.algorithms.cublaslt_version != cublaslt_version {
        return Err(format!(
            "the profile ({}) recorded them with cuBLASLt {}, this machine has {cublaslt_version}",
            p.profile, p.algorithms.cublaslt_version
        ));
    }
    Ok(p)
}

/// Why a live run failed (exit code 1).
#[derive(Debug, thiserror::Error)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // only a GPU build serves
pub enum ExecuteError {
    #[error(transparent)]
    Gpu(#[from] slora_kernels::Error),
    #[error("{0}")]
    Live(#[from] slora_sim::live::LiveError),
    #[error("{0}")]
    Setup(String),
}

/// The GPU side of a command: created on first use, reused across runs.
#[derive(Default)]
pub struct LiveServer {
    #[cfg(feature = "cuda")]
    gpu: Option<gpu::Loaded>,
    /// Time cuBLASLt's GEMM candidates on this machine rather than adopt the algorithms
    /// recorded in the run's calibrated profile (`--tune-gemms`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tune_gemms: bool,
}

impl LiveServer {
    /// A server that, with `tune_gemms`, times its own GEMM algorithms (`--tune-gemms`).
    pub fn new(tune_gemms: bool) -> LiveServer {
        LiveServer {
            #[cfg(feature = "cuda")]
            gpu: None,
            tune_gemms,
        }
    }

    /// Serves `setup` live. The engine's pool is first capped at what the GPU holds, in
    /// `setup` itself, so that a simulation of the same setup (for `--compare`) plans with the
    /// same pool.
    #[cfg(not(feature = "cuda"))]
    pub fn execute(
        &mut self,
        _setup: &mut RunSetup,
        _progress: Option<slora_sim::des::Progress<'_>>,
    ) -> Result<RunResult, ExecuteError> {
        Err(ExecuteError::Gpu(slora_kernels::Error::CudaNotCompiled))
    }

    #[cfg(feature = "cuda")]
    pub fn execute(
        &mut self,
        setup: &mut RunSetup,
        progress: Option<slora_sim::des::Progress<'_>>,
    ) -> Result<RunResult, ExecuteError> {
        gpu::execute(&mut self.gpu, setup, progress, self.tune_gemms)
    }

    /// Runs a recorded live run's plans again on the GPU, back to back (`replay --execute`):
    /// `setup` is the run's scenario; its pool is set to the recording's.
    #[cfg(not(feature = "cuda"))]
    pub fn replay(
        &mut self,
        _setup: &mut RunSetup,
        _recorded: &[RecordedStep],
        _origin: &str,
        _pass: ReplayPass,
    ) -> Result<Vec<ReplayTiming>, ExecuteError> {
        Err(ExecuteError::Gpu(slora_kernels::Error::CudaNotCompiled))
    }

    #[cfg(feature = "cuda")]
    pub fn replay(
        &mut self,
        setup: &mut RunSetup,
        recorded: &[RecordedStep],
        origin: &str,
        pass: ReplayPass,
    ) -> Result<Vec<ReplayTiming>, ExecuteError> {
        gpu::replay(
            &mut self.gpu,
            setup,
            recorded,
            origin,
            pass,
            self.tune_gemms,
        )
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::ExecuteError;
    use super::{ReplayPass, ReplayTiming};
    use slora_engine::{
        AdapterId, EngineConfig, ExecError, Executor, ModelSpec, Nanos, RequestId, RequestMeta,
        Scheduler, StepPlan, StepReport, TargetModule,
    };
    use slora_kernels::executor::{ExecutorConfig, GpuExecutor, HostAdapter, ModelWeights};
    use slora_kernels::gemm::BucketAlgorithm;
    use slora_kernels::gpu::{Gpu, Phase};
    use slora_sim::live::{serve, Backend, WallClock};
    use slora_sim::replay::{use_recorded_pool, RecordedStep};
    use slora_sim::{Provenance, Recorder, RunResult, RunSetup};
    use std::collections::HashMap;

    /// An executor and what it was built for.
    pub struct Loaded {
        exec: GpuExecutor,
        model: ModelSpec,
        max_step_tokens: usize,
        max_rank: u32,
        pool_pages: u32,
        gpu_name: String,
        /// Host rows of synthetic adapters by (rank, targets): every adapter of a shape
        /// shares them (each load still copies its bytes).
        templates: HashMap<(u32, Vec<TargetModule>), HostAdapter>,
        /// Batch sizes already warmed up.
        warmed_batch: u32,
        /// Where the base GEMMs' algorithms come from, for the run's description.
        gemm_source: String,
        /// Whether the GEMMs run algorithms adopted from a profile.
        adopted: bool,
    }

    /// Adopts the base-GEMM algorithms of the profile `setup` is priced with where
    /// [`super::adoptable`] allows, so live steps run what the profile measured; else the
    /// executor keeps tuning its own. Says which in `loaded.gemm_source` and on stderr.
    fn adopt_algorithms(
        loaded: &mut Loaded,
        setup: &RunSetup,
        tune_gemms: bool,
    ) -> Result<(), ExecuteError> {
        let version = slora_kernels::gemm::cublaslt_version();
        let allowed = if tune_gemms {
            Err("--tune-gemms".to_string())
        } else {
            super::adoptable(setup.gemm_algorithms.as_ref(), &loaded.gpu_name, version)
        };
        // Algorithms adopted for an earlier run of this process are not this run's: forget
        // every bucket, and warm up again so that the buckets this run does not adopt are
        // tuned before its timed window, not in it.
        if loaded.adopted {
            loaded.exec.gpu.gemm.set_tuning(true);
            loaded.adopted = false;
            loaded.warmed_batch = 0;
        }
        let source = match allowed {
            Ok(recorded) => {
                let entries: Vec<BucketAlgorithm> = recorded
                    .algorithms
                    .buckets
                    .iter()
                    .map(|b| BucketAlgorithm {
                        tokens: b.tokens as usize,
                        inp: b.inp as usize,
                        out: b.out as usize,
                        accumulate: b.accumulate,
                        algo: b.algo,
                    })
                    .collect();
                let report = loaded.exec.gpu.gemm.adopt(&entries)?;
                loaded.adopted = report.adopted > 0;
                for (e, why) in &report.refused {
                    eprintln!(
                        "GEMM algorithm of the profile not adopted (linear {}->{}, {} tokens): {why}",
                        e.inp, e.out, e.tokens
                    );
                }
                format!(
                    "GEMM algorithms of {} of {} recorded token buckets adopted from the profile ({profile}); buckets without one tuned here",
                    report.adopted,
                    entries.len(),
                    profile = recorded.profile
                )
            }
            Err(why) => format!("GEMM algorithms tuned here ({why})"),
        };
        if source != loaded.gemm_source {
            eprintln!("{source}");
        }
        loaded.gemm_source = source;
        Ok(())
    }

    /// Seeded prompt token ids of request `index`.
    fn prompt(index: usize, len: u32, vocab: u32, seed: u64) -> Vec<u32> {
        let mut x = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..len)
            .map(|_| {
                // splitmix64
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % vocab as u64) as u32
            })
            .collect()
    }

    struct GpuBackend<'a> {
        exec: &'a mut GpuExecutor,
        vocab: u32,
        seed: u64,
        /// A replay's pass, and the phase times of each step it ran (`Phases` only).
        pass: Option<(ReplayPass, Vec<Option<[f64; 7]>>)>,
        /// A replay's host preparation of each step it ran, seconds.
        host_preps: Vec<f64>,
    }

    impl Executor for GpuBackend<'_> {
        fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
            let Some((pass, phases)) = &mut self.pass else {
                return self.exec.execute(plan);
            };
            let report = if pass.without_adapters() {
                // The same plan with no adapter on any row: loads still copy, no LoRA
                // kernel runs.
                let mut bare = plan.clone();
                bare.prefill.iter_mut().for_each(|p| p.adapter = None);
                bare.decode.iter_mut().for_each(|d| d.adapter = None);
                self.exec.execute(&bare)?
            } else {
                self.exec.execute(plan)?
            };
            if pass.phase_timed() {
                let times = self.exec.last_phase_times.take();
                phases.push(times.map(|t| PHASES.map(|p| t.get(p) * 1e-3)));
            }
            self.host_preps.push(self.exec.last_host_prep_s);
            Ok(report)
        }
    }

    impl Backend for GpuBackend<'_> {
        fn admit(&mut self, index: usize, meta: &RequestMeta) -> Result<(), String> {
            self.exec
                .add_request(
                    meta.id,
                    prompt(index, meta.prompt_tokens, self.vocab, self.seed),
                )
                .map_err(|e| e.to_string())
        }
        fn release(&mut self, id: RequestId) {
            self.exec.remove_request(id);
        }
    }

    fn setup_err(e: impl std::fmt::Display) -> ExecuteError {
        ExecuteError::Setup(e.to_string())
    }

    /// Registers the scenario's adapters (synthetic, shared host rows per shape).
    fn register(loaded: &mut Loaded, engine: &EngineConfig) -> Result<(), ExecuteError> {
        for (i, spec) in engine.adapters.iter().enumerate() {
            let key = (spec.rank, spec.targets.clone());
            if !loaded.templates.contains_key(&key) {
                let template = slora_kernels::weights::synthetic_adapter(
                    &loaded.model,
                    spec.rank,
                    &spec.targets,
                    2.0 * spec.rank as f32,
                    spec.rank as u64,
                );
                loaded
                    .exec
                    .register_adapter(AdapterId(i as u32), &template)?;
                let host = loaded
                    .exec
                    .host_adapter(AdapterId(i as u32))
                    .map(|h| h.share())
                    .ok_or_else(|| setup_err("a registered adapter is missing"))?;
                loaded.templates.insert(key, host);
            } else {
                loaded
                    .exec
                    .register_shared(AdapterId(i as u32), &loaded.templates[&key]);
            }
        }
        Ok(())
    }

    /// Runs small engine-driven batches of every GEMM bucket's top size up to the scenario's
    /// largest (prompts of 8 tokens, 3 outputs, on adapter 0 when there is one): compiles
    /// every kernel and tunes the GEMMs of each token bucket a decode batch or a prompt of
    /// up to 8 × that size falls in, before the clock starts (a tuning met while serving
    /// stalls that step by tens of milliseconds).
    fn warm_up(loaded: &mut Loaded, engine: &EngineConfig) -> Result<(), ExecuteError> {
        let max_batch = engine.scheduler.max_batch_size;
        if loaded.warmed_batch >= max_batch {
            return Ok(());
        }
        let mut next_id = u64::MAX / 2;
        for b in slora_kernels::measurement::bucket_tops(max_batch) {
            let mut scheduler = Scheduler::new(engine.clone()).map_err(setup_err)?;
            for k in 0..b {
                let id = RequestId(next_id);
                next_id += 1;
                loaded
                    .exec
                    .add_request(id, prompt(k as usize, 8, loaded.model.vocab_size, 1))?;
                scheduler
                    .submit(
                        RequestMeta {
                            id,
                            adapter: (!engine.adapters.is_empty()).then_some(AdapterId(0)),
                            tenant: None,
                            prompt_tokens: 8,
                            output_tokens: 3,
                        },
                        Nanos::ZERO,
                    )
                    .map_err(|r| setup_err(format!("warm-up request rejected: {r:?}")))?;
            }
            let mut now = Nanos::ZERO;
            while let Some(plan) = scheduler.plan_step(now).map_err(setup_err)? {
                let report = loaded.exec.execute(&plan).map_err(setup_err)?;
                now = now + report.elapsed;
                let outcome = scheduler.complete_step(&report, now).map_err(setup_err)?;
                for f in outcome.finished {
                    loaded.exec.remove_request(f.request);
                }
            }
        }
        loaded.warmed_batch = max_batch;
        loaded.exec.reset();
        Ok(())
    }

    /// The executor for `setup`'s model, reused from `slot` when it fits (else built anew),
    /// with the engine's pool capped at what the GPU holds, the scenario's adapters
    /// registered and every kernel warmed up.
    fn prepare<'a>(
        slot: &'a mut Option<Loaded>,
        setup: &mut RunSetup,
        tune_gemms: bool,
    ) -> Result<&'a mut Loaded, ExecuteError> {
        let model = setup.engine.model.clone();
        let sched = &setup.engine.scheduler;
        let max_step_tokens = (sched.max_prefill_tokens + sched.max_batch_size) as usize;
        let max_rank = setup.ranks.iter().copied().max().unwrap_or(0).max(1);
        let fits = slot.as_ref().is_some_and(|l| {
            l.model == model && l.max_step_tokens >= max_step_tokens && l.max_rank >= max_rank
        });
        if !fits {
            // Free the old executor's memory before sizing the new pool.
            *slot = None;
            let gpu = Gpu::new(0)?;
            let gpu_name = gpu.info()?.name;
            let pool_pages = GpuExecutor::pool_pages_from_free_memory(
                &gpu,
                &model,
                max_step_tokens,
                max_rank,
                setup.scenario.memory.utilization,
            )?;
            let cfg = ExecutorConfig {
                model: model.clone(),
                rms_norm_eps: 1e-5,
                pool_pages,
                max_step_tokens,
                max_rank,
                record_prompt_logits: false,
            };
            let mut exec = GpuExecutor::new(gpu, cfg, ModelWeights::Synthetic { seed: 7 })?;
            // Live batches change almost every step, so a captured graph would rarely be
            // replayed; steps run launch by launch, as `calibrate` measures them.
            exec.set_cuda_graphs(false);
            *slot = Some(Loaded {
                exec,
                model: model.clone(),
                max_step_tokens,
                max_rank,
                pool_pages,
                gpu_name,
                templates: HashMap::new(),
                warmed_batch: 0,
                gemm_source: String::new(),
                adopted: false,
            });
        }
        let loaded = slot.as_mut().expect("set above");
        setup.engine.pool_pages = setup.engine.pool_pages.min(loaded.pool_pages);
        loaded.exec.reset();
        // Before the warm-up, which tunes every bucket that has no algorithm yet.
        adopt_algorithms(loaded, setup, tune_gemms)?;
        register(loaded, &setup.engine)?;
        warm_up(loaded, &setup.engine)?;
        Ok(loaded)
    }

    pub fn execute(
        slot: &mut Option<Loaded>,
        setup: &mut RunSetup,
        progress: Option<slora_sim::des::Progress<'_>>,
        tune_gemms: bool,
    ) -> Result<RunResult, ExecuteError> {
        let loaded = prepare(slot, setup, tune_gemms)?;
        let description = format!(
            "executed live on {} (synthetic {} weights, seed 7; engine pool {} pages; launch by launch; {})",
            loaded.gpu_name, setup.engine.model.name, setup.engine.pool_pages, loaded.gemm_source
        );
        let recorder = Recorder::with_source(setup, Provenance::Executed, description);
        let mut backend = GpuBackend {
            exec: &mut loaded.exec,
            vocab: setup.engine.model.vocab_size,
            seed: setup.scenario.seed,
            pass: None,
            host_preps: Vec::new(),
        };
        let run = serve(
            setup,
            recorder,
            &mut backend,
            &mut WallClock::start(),
            progress,
            None,
        )?;
        loaded.exec.reset();
        Ok(run)
    }

    /// The GPU's phases, in `ReplayTiming::phases`' order.
    const PHASES: [Phase; 7] = [
        Phase::Dense,
        Phase::AttentionPrefill,
        Phase::AttentionDecode,
        Phase::LoraShrink,
        Phase::LoraExpand,
        Phase::LmHead,
        Phase::Sampling,
    ];

    pub fn replay(
        slot: &mut Option<Loaded>,
        setup: &mut RunSetup,
        recorded: &[RecordedStep],
        origin: &str,
        pass: ReplayPass,
        tune_gemms: bool,
    ) -> Result<Vec<ReplayTiming>, ExecuteError> {
        // The recorded pool, checked against this GPU's (capped by `prepare`).
        let wanted = recorded.first().map_or(0, |r| r.pool_pages);
        setup.engine.pool_pages = u32::try_from(wanted).unwrap_or(u32::MAX).max(1);
        let loaded = prepare(slot, setup, tune_gemms)?;
        use_recorded_pool(setup, recorded, Some(loaded.pool_pages as u64), origin)
            .map_err(|e| ExecuteError::Setup(e.to_string()))?;
        loaded.exec.set_phase_timing(pass.phase_timed());
        loaded
            .exec
            .set_decode_rows_by_adapter(pass == ReplayPass::ByAdapter);
        let mut timings = Vec::new();
        let result = {
            let mut backend = GpuBackend {
                exec: &mut loaded.exec,
                vocab: setup.engine.model.vocab_size,
                seed: setup.scenario.seed,
                pass: Some((pass, Vec::new())),
                host_preps: Vec::new(),
            };
            let result = slora_sim::replay::replay(setup, recorded, &mut backend, &mut |s| {
                timings.push(ReplayTiming {
                    index: s.index,
                    executed_s: s.executed.as_secs_f64(),
                    phases_s: None,
                    host_prep_s: 0.0,
                })
            });
            if let Some((_, phases)) = backend.pass.take() {
                for (t, p) in timings.iter_mut().zip(phases) {
                    t.phases_s = p;
                }
            }
            for (t, prep) in timings.iter_mut().zip(&backend.host_preps) {
                t.host_prep_s = *prep;
            }
            result
        };
        loaded.exec.set_phase_timing(false);
        loaded.exec.set_decode_rows_by_adapter(false);
        loaded.exec.reset();
        let summary = result.map_err(|e| ExecuteError::Setup(e.to_string()))?;
        if summary.drifted > 0 || summary.replayed < summary.recorded {
            // The model's replay of the same recording says the same (the plans do not depend
            // on the backend); the steps still ran, so their times are kept.
            eprintln!(
                "{origin}: warning: the replay drifted from the recording ({} of {} steps made \
                 again, {} with other prompt tokens or decode rows)",
                summary.replayed, summary.recorded, summary.drifted
            );
        }
        Ok(timings)
    }
}

#[cfg(test)]
mod tests {
    use super::adoptable;
    use slora_sim::cost::{GemmAlgorithms, GemmBucketAlgorithm};
    use slora_sim::scenario::ProfileAlgorithms;

    /// A live run adopts a profile's GEMM algorithms only from a profile of its GPU's name
    /// recorded with its cuBLASLt version, and says why not otherwise.
    #[test]
    fn a_live_run_adopts_algorithms_of_its_own_gpu_and_cublaslt_only() {
        let profile = ProfileAlgorithms {
            gpu_name: "NVIDIA H200".into(),
            profile: "NVIDIA H200 x llama-7b, 2026-12-07".into(),
            algorithms: GemmAlgorithms {
                cublaslt_version: 130_100,
                buckets: vec![GemmBucketAlgorithm {
                    tokens: 40,
                    inp: 4096,
                    out: 12288,
                    accumulate: false,
                    algo: [7; 8],
                }],
            },
        };
        let got = adoptable(Some(&profile), "NVIDIA H200", 130_100).unwrap();
        assert_eq!(got.algorithms.buckets.len(), 1);
        let why = adoptable(Some(&profile), "NVIDIA H100 80GB HBM3", 130_100).unwrap_err();
        assert!(
            why.contains("measured on NVIDIA H200") && why.contains("H100"),
            "{why}"
        );
        let why = adoptable(Some(&profile), "NVIDIA H200", 120_900).unwrap_err();
        assert!(
            why.contains("cuBLASLt 130100") && why.contains("120900"),
            "{why}"
        );
        let why = adoptable(None, "NVIDIA H200", 130_100).unwrap_err();
        assert!(why.contains("no calibrated profile"), "{why}");
    }
}
