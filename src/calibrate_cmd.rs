//! `slora-plan calibrate`: times the GPU executor's own operations (`slora_kernels::calibrate`)
//! and writes them as a calibration profile for the simulator, with its report (grid sizes and
//! the leave-one-out accuracy of interpolating it).

#[cfg(feature = "cuda")]
use slora_sim::cost::{
    CalibrationProfile, DecodeAttentionPoint, LoraPoint, Measured, PrefillAttentionPoint,
    TokensPoint, TransferPoint, PROFILE_FORMAT_VERSION,
};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// Model presets to calibrate (synthetic weights of their shapes).
    #[arg(long = "model", default_value = "llama-7b")]
    pub models: Vec<String>,
    /// Output folder for `<gpu>-<model>.json` and `.md`.
    #[arg(long, default_value = "profiles")]
    pub out: PathBuf,
    /// Timed repetitions per grid point.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

#[derive(Debug, thiserror::Error)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // only a GPU build measures and writes
pub enum CalibrateError {
    #[error("calibrate: {0}")]
    BadInput(String),
    #[error("calibrate: {0}")]
    Gpu(#[from] slora_kernels::Error),
    #[error("calibrate: writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("calibrate: the measured profile is not valid: {0}")]
    Invalid(String),
}

impl CalibrateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CalibrateError::BadInput(_) => 2,
            _ => 1,
        }
    }
}

#[cfg(feature = "cuda")]
fn measured(s: &slora_kernels::calibrate::Stat) -> Measured {
    // A phase too short for the events' resolution reads 0: keep the format's "positive"
    // rule by flooring at one nanosecond.
    let floor = |x: f64| x.max(1e-9);
    Measured {
        median_s: floor(s.median_s),
        p10_s: floor(s.p10_s).min(floor(s.median_s)),
        p90_s: floor(s.p90_s).max(floor(s.median_s)),
        samples: s.samples.max(1),
    }
}

#[cfg(feature = "cuda")]
/// The catalogue key of a GPU the driver names (`NVIDIA H200` → `h200`), if any.
fn catalogue_key(name: &str) -> Option<String> {
    let lower = name.to_lowercase();
    let mut best: Option<&slora_sim::cost::GpuSpec> = None;
    for g in slora_sim::cost::gpu_catalogue() {
        let key = g.key.replace('-', " ");
        let stem = key.split_whitespace().next().unwrap_or(g.key);
        if lower.contains(stem) && best.is_none_or(|b| g.key.len() > b.key.len()) {
            // Prefer the more specific key (`a100-80g` over `a100`) when memory says so.
            best = Some(g);
        }
    }
    best.map(|g| g.key.to_string())
}

/// A LoRA grid `(tokens, adapters, rank, time)` in the profile format.
#[cfg(feature = "cuda")]
fn lora_points(points: &[(u32, u32, u32, slora_kernels::calibrate::Stat)]) -> Vec<LoraPoint> {
    points
        .iter()
        .map(|(tokens, adapters, rank, s)| LoraPoint {
            tokens: *tokens,
            adapters: *adapters,
            rank: *rank,
            time: measured(s),
        })
        .collect()
}

/// Converts a measurement into the simulator's profile format.
#[cfg(feature = "cuda")]
pub fn to_profile(c: &slora_kernels::calibrate::Calibration, date: &str) -> CalibrationProfile {
    CalibrationProfile {
        format_version: PROFILE_FORMAT_VERSION,
        gpu_name: c.gpu_name.clone(),
        gpu_key: catalogue_key(&c.gpu_name),
        gpu_memory_bytes: c.gpu_memory_bytes,
        driver_version: c.driver_version.clone(),
        cuda_version: c.cuda_version.clone(),
        date: date.to_string(),
        model: c.model.clone(),
        tensor_parallel: 1,
        lora_targets: c.lora_targets.clone(),
        base_gemm: c
            .base_gemm
            .iter()
            .map(|(t, s)| TokensPoint {
                tokens: *t,
                time: measured(s),
            })
            .collect(),
        lm_head: c
            .lm_head
            .iter()
            .map(|(t, s)| TokensPoint {
                tokens: *t,
                time: measured(s),
            })
            .collect(),
        attention_prefill: c
            .attention_prefill
            .iter()
            .map(|(t, x, s)| PrefillAttentionPoint {
                tokens: *t,
                context: *x,
                time: measured(s),
            })
            .collect(),
        attention_decode: c
            .attention_decode
            .iter()
            .map(|(b, x, s)| DecodeAttentionPoint {
                batch: *b,
                context: *x,
                time: measured(s),
            })
            .collect(),
        lora_shrink: lora_points(&c.lora_shrink),
        lora_expand: lora_points(&c.lora_expand),
        lora_prefill_shrink: lora_points(&c.lora_prefill_shrink),
        lora_prefill_expand: lora_points(&c.lora_prefill_expand),
        host_to_device: c
            .host_to_device
            .iter()
            .map(|(b, s)| TransferPoint {
                bytes: *b,
                time: measured(s),
            })
            .collect(),
        fixed_overhead: measured(&c.fixed_overhead),
        sampling_per_token: measured(&c.sampling_per_token),
        prefill_step_overhead: None,
        base_gemm_token_quantum: None,
    }
}

/// The shape of a whole step of `Calibration::mixed_steps`.
#[cfg(feature = "cuda")]
fn mixed_shape(tokens: u32, batch: u32, rank: u32, adapters: u32) -> slora_sim::BatchShape {
    let context = slora_kernels::calibrate::MIXED_CONTEXT + 1;
    let mut hist = slora_engine::ContextHistogram::default();
    for _ in 0..batch {
        hist.add(context);
    }
    let distinct = (batch + 1).min(adapters.max(1));
    slora_sim::BatchShape {
        prefill_requests: 1,
        prefill_tokens: tokens,
        prefill_attention_pairs: tokens as u64 * (tokens as u64 + 1) / 2,
        max_prefill_tokens: tokens,
        decode_requests: batch,
        decode_context_tokens: batch as u64 * context as u64,
        max_decode_context: if batch > 0 { context } else { 0 },
        decode_context_histogram: hist,
        lora_tokens: tokens + batch,
        lora_token_rank: (tokens + batch) as u64 * rank as u64,
        prefill_lora_tokens: tokens,
        prefill_lora_token_rank: tokens as u64 * rank as u64,
        prefill_lora_segments: 1,
        distinct_adapters: distinct,
        distinct_rank_sum: distinct as u64 * rank as u64,
        ..Default::default()
    }
}

/// Fits `prefill_step_overhead` on the whole steps with a prompt (measured minus the parts'
/// prediction, median, at least zero) and returns the check table, before and after.
#[cfg(feature = "cuda")]
fn fit_prefill_overhead(
    c: &slora_kernels::calibrate::Calibration,
    profile: &mut CalibrationProfile,
    adapters: u32,
) -> Result<String, CalibrateError> {
    use slora_sim::CostModel;
    let predict = |profile: &CalibrationProfile| -> Result<Vec<f64>, CalibrateError> {
        let cost = slora_sim::CalibratedCost::new(
            profile,
            &c.model,
            1,
            &slora_engine::TargetModule::ATTENTION,
        )
        .map_err(|e| CalibrateError::Invalid(e.to_string()))?;
        Ok(c.mixed_steps
            .iter()
            .map(|(t, b, _)| {
                cost.step_cost(&mixed_shape(*t, *b, c.mixed_rank, adapters))
                    .total()
                    .as_secs_f64()
            })
            .collect())
    };
    if c.mixed_steps.is_empty() {
        return Ok(String::new());
    }
    // The base GEMMs' token quantum: the one whose parts best predict these whole steps.
    let mean_error = |pred: &[f64]| -> f64 {
        c.mixed_steps
            .iter()
            .zip(pred)
            .map(|((_, _, s), p)| (p / s.median_s - 1.0).abs())
            .sum::<f64>()
            / pred.len() as f64
    };
    let mut quanta = Vec::new();
    for q in [None, Some(64u32), Some(128), Some(256)] {
        profile.base_gemm_token_quantum = q;
        quanta.push((q, mean_error(&predict(profile)?)));
    }
    let best = quanta
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|q| q.0)
        .unwrap_or(None);
    profile.base_gemm_token_quantum = best;
    let before = predict(profile)?;
    let mut residuals: Vec<f64> = c
        .mixed_steps
        .iter()
        .zip(&before)
        .map(|((_, _, s), p)| s.median_s - p)
        .collect();
    residuals.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| residuals[((residuals.len() - 1) as f64 * p).round() as usize].max(1e-9);
    profile.prefill_step_overhead = Some(Measured {
        median_s: q(0.5),
        p10_s: q(0.1).min(q(0.5)),
        p90_s: q(0.9).max(q(0.5)),
        samples: residuals.len() as u32,
    });
    let after = predict(profile)?;
    let mut lines = vec![
        String::new(),
        String::new(),
        "## Whole steps with a prompt: measured vs the parts".into(),
        String::new(),
        format!(
            "One prompt (context 0) beside decode rows at context {}, adapters of rank {}; host-timed as the executor runs them. Mean absolute error of the parts by base-GEMM token quantum: {}; chosen: {}. `prefill_step_overhead` = the median of measured − parts = {:.0} µs.",
            slora_kernels::calibrate::MIXED_CONTEXT + 1,
            c.mixed_rank,
            quanta
                .iter()
                .map(|(q, e)| format!(
                    "{} {:.1}%",
                    q.map_or("none".to_string(), |q| q.to_string()),
                    e * 100.0
                ))
                .collect::<Vec<_>>()
                .join(", "),
            best.map_or("none".to_string(), |q| q.to_string()),
            q(0.5) * 1e6
        ),
        String::new(),
        "| prompt tokens | decode rows | measured (ms) | parts (ms) | error | with the overhead (ms) | error |".into(),
        "|---|---|---|---|---|---|---|".into(),
    ];
    for (((t, b, s), p0), p1) in c.mixed_steps.iter().zip(&before).zip(&after) {
        lines.push(format!(
            "| {t} | {b} | {:.3} | {:.3} | {:+.1}% | {:.3} | {:+.1}% |",
            s.median_s * 1e3,
            p0 * 1e3,
            (p0 / s.median_s - 1.0) * 100.0,
            p1 * 1e3,
            (p1 / s.median_s - 1.0) * 100.0
        ));
    }
    Ok(lines.join("\n"))
}

/// Today's date, ISO 8601, from the system clock (UTC).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = slora_sim::workload::civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(feature = "cuda")]
/// How well the profile's own sum of parts predicts whole decode steps measured beside it.
fn step_check(
    c: &slora_kernels::calibrate::Calibration,
    profile: &CalibrationProfile,
) -> Result<String, CalibrateError> {
    let cost = slora_sim::CalibratedCost::new(
        profile,
        &c.model,
        1,
        &slora_engine::TargetModule::ATTENTION,
    )
    .map_err(|e| CalibrateError::Invalid(e.to_string()))?;
    use slora_sim::CostModel;
    let mut lines = vec![
        String::new(),
        "## Whole decode steps: measured vs the profile's prediction".into(),
        String::new(),
        "Host-timed steps as the executor runs them (no events), no adapters; the prediction is `CalibratedCost` on the same shape.".into(),
        String::new(),
        "| batch | context | measured (ms) | predicted (ms) | error |".into(),
        "|---|---|---|---|---|".into(),
    ];
    let mut errors = Vec::new();
    for (batch, context, stat) in &c.decode_steps {
        let mut hist = slora_engine::ContextHistogram::default();
        for _ in 0..*batch {
            hist.add(context + 1);
        }
        let shape = slora_sim::BatchShape {
            decode_requests: *batch,
            decode_context_tokens: *batch as u64 * (*context as u64 + 1),
            max_decode_context: context + 1,
            decode_context_histogram: hist,
            ..Default::default()
        };
        let predicted = cost.step_cost(&shape).total().as_secs_f64();
        let err = predicted / stat.median_s - 1.0;
        errors.push(err.abs());
        lines.push(format!(
            "| {batch} | {context} | {:.3} | {:.3} | {:+.1}% |",
            stat.median_s * 1e3,
            predicted * 1e3,
            err * 100.0
        ));
    }
    errors.sort_by(|a, b| a.total_cmp(b));
    if let Some(max) = errors.last() {
        lines.push(String::new());
        lines.push(format!(
            "Median absolute error {:.1}%, largest {:.1}% over {} steps.",
            errors[errors.len() / 2] * 100.0,
            max * 100.0,
            errors.len()
        ));
    }
    Ok(lines.join("\n"))
}

/// The presets named by `--model`, checked (bad input exits 2 with or without a GPU).
fn models(args: &CalibrateArgs) -> Result<Vec<slora_engine::ModelSpec>, CalibrateError> {
    let mut models = Vec::new();
    for name in &args.models {
        models.push(slora_engine::ModelSpec::preset(name).map_err(|e| {
            CalibrateError::BadInput(format!(
                "--model {name}: {e} (presets: {})",
                slora_engine::ModelSpec::preset_names()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?);
    }
    if args.reps == 0 {
        return Err(CalibrateError::BadInput("--reps must be at least 1".into()));
    }
    Ok(models)
}

#[cfg(not(feature = "cuda"))]
pub fn run(args: &CalibrateArgs) -> Result<(), CalibrateError> {
    models(args)?;
    Err(CalibrateError::Gpu(slora_kernels::Error::CudaNotCompiled))
}

#[cfg(feature = "cuda")]
pub fn run(args: &CalibrateArgs) -> Result<(), CalibrateError> {
    use std::path::Path;
    let models = models(args)?;
    std::fs::create_dir_all(&args.out).map_err(|source| CalibrateError::Write {
        path: args.out.clone(),
        source,
    })?;
    let grid = slora_kernels::calibrate::Grid {
        reps: args.reps,
        ..Default::default()
    };
    for model in &models {
        let started = std::time::Instant::now();
        let progress = |what: &str| eprintln!("calibrate {}: {what}", model.name);
        let c = slora_kernels::calibrate::calibrate(model, &grid, &progress)?;
        let mut profile = to_profile(&c, &today());
        let adapters = grid.lora_adapters.iter().copied().max().unwrap_or(1);
        let mixed = fit_prefill_overhead(&c, &mut profile, adapters)?;
        profile
            .validate(Path::new("(measured)"))
            .map_err(|e| CalibrateError::Invalid(e.to_string()))?;
        let stem = format!(
            "{}-{}",
            profile
                .gpu_key
                .clone()
                .unwrap_or_else(|| c.gpu_name.to_lowercase().replace(' ', "-")),
            model.name
        );
        let json = args.out.join(format!("{stem}.json"));
        let text = serde_json::to_string_pretty(&profile).expect("profiles serialize");
        std::fs::write(&json, text).map_err(|source| CalibrateError::Write {
            path: json.clone(),
            source,
        })?;
        let mut report = slora_sim::calibrated::profile_report(&profile);
        report.push_str(&step_check(&c, &profile)?);
        report.push_str(&mixed);
        report.push_str(&format!(
            "\n\nMeasured in {:.0} s with `slora-plan calibrate --model {} --reps {}`.\n",
            started.elapsed().as_secs_f64(),
            model.name,
            args.reps
        ));
        let md = args.out.join(format!("{stem}.md"));
        std::fs::write(&md, &report).map_err(|source| CalibrateError::Write {
            path: md.clone(),
            source,
        })?;
        println!("{report}");
        println!("wrote {} and {}", json.display(), md.display());
    }
    Ok(())
}
