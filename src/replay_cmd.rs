//! `slora-plan replay SCENARIO --steps RUN`: a live run's steps made again (see
//! `slora_sim::replay`), each with the cost model's parts beside its measured time; with
//! `--execute`, the same plans run again on the GPU, back to back, in one or more passes
//! (as recorded, without their adapters, with phase timing), so that a step the model
//! misprices can be taken apart on the shapes the live run really had.

use crate::execute::{LiveServer, ReplayPass, PHASE_NAMES};
use slora_sim::cost::StepCost;
use slora_sim::replay::{parse_steps_csv, replay, use_recorded_pool, NoBackend, ReplayError};
use slora_sim::{Scenario, ScenarioError};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The scenario the run served (a single point: a fidelity run's loadNN.yaml).
    pub scenario: PathBuf,
    /// The live run's steps.csv (or steps.csv.gz), or the run folder holding it.
    #[arg(long)]
    pub steps: PathBuf,
    /// Write the per-step table (CSV) here. Default: standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also run the replayed plans on the GPU (a `--features cuda` build), back to back, once
    /// per pass of --passes; each pass adds its columns.
    #[arg(long)]
    pub execute: bool,
    /// With --execute, the passes in order: `recorded` (the plans as made), `no-lora` (the
    /// same plans with no adapter on any row), `phases` (as recorded, CUDA events between the
    /// phases of each step), `no-lora-phases` (without adapters, phase-timed), `by-adapter`
    /// (as recorded, each step's decode rows grouped by adapter).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "recorded,no-lora,phases"
    )]
    pub passes: Vec<ReplayPass>,
}

/// Why `replay` failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum ReplayCmdError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("replay: {0}")]
    BadInput(String),
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    #[error("replay: on the GPU, pass {pass}: {source}")]
    Execute {
        pass: &'static str,
        source: crate::execute::ExecuteError,
    },
    #[error("replay: writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ReplayCmdError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ReplayCmdError::Scenario(_) | ReplayCmdError::BadInput(_) => 2,
            ReplayCmdError::Replay(ReplayError::Live(_)) => 1,
            ReplayCmdError::Replay(_) => 2,
            ReplayCmdError::Execute { .. } | ReplayCmdError::Write { .. } => 1,
        }
    }
}

/// `path`, or the steps.csv (or steps.csv.gz) inside it when it is a folder.
fn steps_file(path: &Path) -> Result<PathBuf, ReplayCmdError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    ["steps.csv", "steps.csv.gz"]
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ReplayCmdError::BadInput(format!(
                "{}: a folder without steps.csv or steps.csv.gz (give a live run's folder or its steps.csv)",
                path.display()
            ))
        })
}

/// The median of `xs` (the mean of the middle two for an even count); NaN for none.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// One replayed step: the model's side (always) and each GPU pass's.
struct Row {
    index: usize,
    measured_s: f64,
    model_s: f64,
    cells: String,
    executed: Vec<String>,
}

pub fn run(args: &ReplayArgs) -> Result<(), ReplayCmdError> {
    let loaded = Scenario::load(&args.scenario)?;
    let [point] = loaded.points.as_slice() else {
        return Err(ReplayCmdError::BadInput(format!(
            "{}: {} sweep points; a recording is of one (give the point's own scenario file)",
            args.scenario.display(),
            loaded.points.len()
        )));
    };
    let mut setup = point.scenario.build(&args.scenario)?;
    let steps_path = steps_file(&args.steps)?;
    let origin = steps_path.display().to_string();
    let text = slora_reports::read_run_text(&steps_path)
        .map_err(|e| ReplayCmdError::BadInput(e.to_string()))?;
    let recorded = parse_steps_csv(&text, &origin)?;
    use_recorded_pool(&mut setup, &recorded, None, &origin)?;

    // The model's side: the replay's plans, priced part by part.
    let cost = setup.cost.as_ref();
    let mut rows: Vec<Row> = Vec::new();
    let summary = replay(&setup, &recorded, &mut NoBackend, &mut |s| {
        let parts = cost.step_cost(s.shape).parts();
        let b = s.shape;
        let mut cells = String::new();
        let _ = write!(
            cells,
            "{},{:.9},{:.9},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.index,
            s.recorded.duration_s,
            s.span_s,
            parts.map(|p| format!("{:.9}", p.as_secs_f64())).join(","),
            b.prefill_tokens,
            b.decode_requests,
            b.decode_context_tokens,
            b.lora_tokens,
            b.lora_token_rank,
            b.prefill_lora_tokens,
            b.distinct_adapters,
            b.distinct_rank_sum,
            b.blocking_load_bytes,
            b.prefetch_load_bytes,
            b.max_decode_rank,
            // rows:rank sum of each non-empty rank bucket (a power of two and above).
            (0..slora_engine::ContextHistogram::BUCKETS)
                .filter(|&k| b.decode_rank_histogram.counts[k] > 0)
                .map(|k| format!(
                    "{}:{}",
                    b.decode_rank_histogram.counts[k], b.decode_rank_histogram.rows[k]
                ))
                .collect::<Vec<_>>()
                .join(" "),
            b.max_decode_context,
            // The KV rows each decode row reads, in the plan's order: the whole shape, for
            // analyses a histogram cannot serve (how a kernel splits its work, say).
            s.plan
                .decode
                .iter()
                .map(|d| (d.context_len + 1).to_string())
                .collect::<Vec<_>>()
                .join(" "),
            // Each prompt chunk as `tokens@context` (the KV rows it already holds).
            s.plan
                .prefill
                .iter()
                .map(|p| format!("{}@{}", p.tokens, p.context_start))
                .collect::<Vec<_>>()
                .join(" "),
        );
        rows.push(Row {
            index: s.index,
            measured_s: s.recorded.duration_s,
            model_s: parts.iter().map(|p| p.as_secs_f64()).sum(),
            cells,
            executed: Vec::new(),
        });
    })?;
    eprintln!(
        "{origin}: {} of {} recorded steps made again, {} with other prompt tokens or decode rows{}",
        summary.replayed,
        summary.recorded,
        summary.drifted,
        if summary.drifted > 0 {
            " (the replay drifted: shapes after the first such step are not the run's)"
        } else {
            ""
        }
    );
    let errors: Vec<f64> = rows
        .iter()
        .filter(|r| r.measured_s > 0.0)
        .map(|r| r.model_s / r.measured_s - 1.0)
        .collect();
    let abs = median(errors.iter().map(|e| e.abs() * 100.0).collect());
    let signed = median(errors.into_iter().map(|e| e * 100.0).collect());
    eprintln!(
        "cost model against the recorded steps: median error {signed:+.2}%, median absolute error {abs:.2}%"
    );

    let mut header = format!(
        "step,measured_s,span_s,{},prefill_tokens,decode_requests,decode_context_tokens,lora_tokens,lora_token_rank,prefill_lora_tokens,distinct_adapters,distinct_rank_sum,blocking_load_bytes,prefetch_load_bytes,max_decode_rank,decode_rank_buckets,max_decode_context,decode_contexts,prefill_chunks",
        StepCost::PARTS.map(|p| format!("{p}_s")).join(",")
    );
    if args.execute {
        let mut server = LiveServer::default();
        for &pass in &args.passes {
            eprintln!("replaying on the GPU: pass {}", pass.name());
            let started = std::time::Instant::now();
            let timings = server
                .replay(&mut setup, &recorded, &origin, pass)
                .map_err(|source| ReplayCmdError::Execute {
                    pass: pass.name(),
                    source,
                })?;
            let _ = write!(
                header,
                ",executed_{0}_s,executed_{0}_host_prep_s",
                pass.name()
            );
            if pass.phase_timed() {
                // `phase_*` for the pass with adapters (as in earlier tables), else prefixed.
                let prefix = if pass.without_adapters() {
                    "no_lora_phase"
                } else {
                    "phase"
                };
                for name in PHASE_NAMES {
                    let _ = write!(header, ",{prefix}_{name}_s");
                }
            }
            // Both replays make the same plans in the same order: the model's rows and the
            // pass's timings pair one to one (checked by index).
            let mut executed = Vec::new();
            for (row, t) in rows.iter_mut().zip(&timings) {
                if row.index != t.index {
                    return Err(ReplayCmdError::BadInput(format!(
                        "{origin}: pass {} ran recorded step {} where the model's replay had {}",
                        pass.name(),
                        t.index,
                        row.index
                    )));
                }
                let mut cell = format!("{:.9},{:.9}", t.executed_s, t.host_prep_s);
                if pass.phase_timed() {
                    for v in t.phases_s.unwrap_or([0.0; 7]) {
                        let _ = write!(cell, ",{v:.9}");
                    }
                }
                row.executed.push(cell);
                executed.push((t.executed_s, row.measured_s, row.model_s));
            }
            let ratio = |f: fn(&(f64, f64, f64)) -> (f64, f64)| {
                median(
                    executed
                        .iter()
                        .map(f)
                        .filter(|(_, b)| *b > 0.0)
                        .map(|(a, b)| a / b - 1.0)
                        .collect(),
                ) * 100.0
            };
            eprintln!(
                "  {} steps in {:.1} s; median of this pass against the recorded steps {:+.2}%, the cost model against this pass {:+.2}%",
                timings.len(),
                started.elapsed().as_secs_f64(),
                ratio(|&(e, m, _)| (e, m)),
                ratio(|&(e, _, p)| (p, e)),
            );
        }
    }
    let mut out = header;
    out.push('\n');
    for r in &rows {
        out.push_str(&r.cells);
        for e in &r.executed {
            out.push(',');
            out.push_str(e);
        }
        out.push('\n');
    }
    match &args.out {
        Some(path) => std::fs::write(path, out).map_err(|source| ReplayCmdError::Write {
            path: path.clone(),
            source,
        })?,
        None => {
            use std::io::Write as _;
            // A closed pipe (`| head`) ends the output quietly.
            let _ = std::io::stdout().write_all(out.as_bytes());
        }
    }
    Ok(())
}
