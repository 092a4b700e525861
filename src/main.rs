//! slora-plan: the command line. Thin by design: parsing, progress, output paths and exit
//! codes live here; every decision lives in the library crates.
//!
//! Exit codes: 0 success, 1 a run failed, 2 bad input (arguments, scenario files, run folders).

mod calibrate_cmd;
mod compare_cmd;
mod execute;
mod plan_cmd;
mod replay_cmd;

use clap::{CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use slora_sim::metrics::{SweepPoint, SweepResult};
use slora_sim::{LoadedScenario, Metrics, RunResult, Scenario, ScenarioError, SimError};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "slora-plan",
    version,
    about = "Capacity planning and serving for many LoRA adapters on one base model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate scenarios: metrics, charts and a report per scenario (no GPU needed); with
    /// --execute or --compare, serve them live on a GPU.
    Simulate {
        /// Scenario YAML files (see docs/scenarios.md). With none, runs the embedded default
        /// scenario (scenarios/default.yaml).
        scenarios: Vec<PathBuf>,
        /// Output folder. Default: out/<scenario name>/. With several scenarios, each gets
        /// DIR/<scenario name>/.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// No progress bar and no summary table.
        #[arg(long)]
        quiet: bool,
        /// Serve the scenario live on the GPU (needs a build with `--features cuda`): the
        /// same engine plans every step, the GPU executor runs it, in real time. Outputs as
        /// for a simulation, labelled `executed`.
        #[arg(long)]
        execute: bool,
        /// Simulate and execute the same scenario and compare them: DIR/simulated,
        /// DIR/executed and DIR/compare (implies --execute).
        #[arg(long)]
        compare: bool,
        /// With --execute or --compare: time cuBLASLt's GEMM candidates on this GPU instead
        /// of adopting the algorithms recorded in the run's calibrated profile (which
        /// `--execute` adopts on a GPU of the profile's name and cuBLASLt version, so that
        /// live steps run what the profile measured).
        #[arg(long)]
        tune_gemms: bool,
        /// Simulate with every step time multiplied by this factor (e.g. 1.01: the cost
        /// model 1% slow): how far the results move with the model's error. Simulation only.
        #[arg(long, value_name = "FACTOR", value_parser = parse_step_time_scale)]
        step_time_scale: Option<f64>,
    },
    /// On a GPU: time the executor's own operations over grids of shapes and write a
    /// calibration profile for the simulator (see docs/FIDELITY.md); with `--refit`, derive
    /// profiles again from saved measurements, without a GPU.
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// Capacity planning: which GPUs, how many, with which settings meet the scenario's SLO
    /// at its target rate for the least money, and how far that grows (runs the simulator).
    Plan(plan_cmd::PlanArgs),
    /// List the model presets, the GPU catalogue with their sizes, and the GPU x model
    /// combinations that have an embedded calibration profile.
    Catalog,
    /// Compare two runs of one scenario (e.g. simulated vs executed): relative errors of
    /// throughput, latency percentiles and SLO attainment, per-adapter p99 TTFT, each latency
    /// against the reference's 90% sampling interval, overlaid CDFs.
    Compare(compare_cmd::CompareArgs),
    /// Make a live run's steps again from its scenario and steps.csv (the engine is
    /// deterministic): each step's measured time beside the cost model's parts for its exact
    /// shape; with --execute, the same plans run again on the GPU (as recorded, without
    /// adapters, with phase timing), to take a mispriced step apart.
    Replay(replay_cmd::ReplayArgs),
    /// On a GPU machine: find the driver, NVRTC and cuBLAS, compile every kernel, check each
    /// against its CPU reference on random data, and optionally check the whole executor
    /// against transformers + peft outputs (see tests/gpu/README.md).
    Doctor {
        /// A folder written by `tests/gpu/reference.py`.
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// On a GPU machine: measure copy bandwidth and GEMM rate, then the LoRA kernels and full
    /// decode and prefill steps of synthetic Llama-7B against them (Markdown for BENCHMARKS.md).
    BenchGpu {
        /// Measure one table only (after the ceilings): `lora-beside`, the decode rows' LoRA
        /// beside the q/k/v and o GEMMs with those GEMMs planned for fewer SMs and the LoRA
        /// stream at the greatest priority; `lora-sharing`, where the decode rows that share
        /// an adapter sit in the batch, and the executor grouping them by adapter.
        #[arg(long, value_enum)]
        only: Option<BenchOnly>,
    },
}

/// `bench-gpu --only`'s tables.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BenchOnly {
    LoraBeside,
    LoraSharing,
}

/// Why the command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    BadInput(#[from] ScenarioError),
    #[error(transparent)]
    Compare(#[from] compare_cmd::CompareError),
    #[error("{scenario}: {source}")]
    Run { scenario: String, source: SimError },
    #[error("doctor: {0}")]
    Gpu(#[from] slora_kernels::Error),
    #[error("bench-gpu: {0}")]
    BenchGpu(slora_kernels::Error),
    #[error(transparent)]
    Calibrate(#[from] calibrate_cmd::CalibrateError),
    #[error(transparent)]
    Plan(#[from] plan_cmd::PlanCmdError),
    #[error(transparent)]
    Replay(#[from] replay_cmd::ReplayCmdError),
    #[error("{scenario}: live run: {source}")]
    Execute {
        scenario: String,
        source: execute::ExecuteError,
    },
    #[error("doctor: {failed} check(s) failed")]
    ChecksFailed { failed: usize },
    #[error("{scenario}: writing outputs: {source}")]
    Output {
        scenario: String,
        source: slora_reports::ReportError,
    },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::BadInput(_) => 2,
            CliError::Compare(e) => e.exit_code(),
            CliError::Calibrate(e) => e.exit_code(),
            CliError::Plan(e) => e.exit_code(),
            CliError::Replay(e) => e.exit_code(),
            CliError::Execute { .. } => 1,
            CliError::Run { .. }
            | CliError::Output { .. }
            | CliError::Gpu(_)
            | CliError::BenchGpu(_)
            | CliError::ChecksFailed { .. } => 1,
        }
    }
}

/// `--step-time-scale`'s value: a finite factor above zero.
fn parse_step_time_scale(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("the factor must be finite and above 0, got {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// The default scenario, embedded so `slora-plan simulate` works from any folder.
const DEFAULT_SCENARIO: &str = include_str!("../scenarios/default.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate {
            scenarios,
            out,
            seed,
            quiet,
            execute,
            compare,
            tune_gemms,
            step_time_scale,
        } => {
            if step_time_scale.is_some() && (execute || compare) {
                // A live run's steps take the time they take, and the policy must see the
                // model the live run saw: scaling is for simulations alone.
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "--step-time-scale scales simulated step times: it cannot be given with --execute or --compare",
                    )
                    .exit();
            }
            if tune_gemms && !(execute || compare) {
                // What it changes happens only on the GPU: without a live run it would be
                // silently ignored.
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "--tune-gemms changes how a live run picks its GEMM algorithms: give it with --execute or --compare",
                    )
                    .exit();
            }
            simulate(
                &scenarios,
                out.as_deref(),
                seed,
                quiet,
                Mode::from_flags(execute, compare),
                tune_gemms,
                step_time_scale,
            )
        }
        Command::Calibrate(args) => calibrate_cmd::run(&args).map_err(CliError::from),
        Command::Plan(args) => plan_cmd::run(&args).map_err(CliError::from),
        Command::Catalog => {
            catalog();
            Ok(())
        }
        Command::Compare(args) => compare_cmd::run(&args).map_err(CliError::from),
        Command::Replay(args) => replay_cmd::run(&args).map_err(CliError::from),
        Command::Doctor { reference } => doctor(reference.as_deref()),
        Command::BenchGpu { only } => slora_kernels::bench::gpu_benchmarks(match only {
            None => slora_kernels::bench::BenchSection::All,
            Some(BenchOnly::LoraBeside) => slora_kernels::bench::BenchSection::LoraBeside,
            Some(BenchOnly::LoraSharing) => slora_kernels::bench::BenchSection::LoraSharing,
        })
        .map(|lines| lines.iter().for_each(|l| println!("{l}")))
        .map_err(CliError::BenchGpu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slora-plan: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // thiserror's `transparent` repeats the message: print only new causes.
                let text = s.to_string();
                if !e.to_string().contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                source = s.source();
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn doctor(reference: Option<&Path>) -> Result<(), CliError> {
    for line in slora_kernels::doctor::device_summary()? {
        println!("{line}");
    }
    let rows = slora_kernels::doctor::kernel_checks()?;
    println!(
        "\n{:<44} {:>12} {:>12}  result",
        "kernel check", "max |err|", "rel err"
    );
    let mut failed = 0;
    for r in &rows {
        failed += usize::from(!r.passed);
        println!(
            "{:<44} {:>12.3e} {:>12.3e}  {}",
            r.kernel,
            r.max_abs_err,
            r.rel_err,
            if r.passed { "pass" } else { "FAIL" }
        );
    }
    if let Some(dir) = reference {
        println!("\nexecutor vs transformers + peft ({}):", dir.display());
        for run in slora_kernels::doctor::reference_check(dir)? {
            let check = &run.check;
            println!("{check}");
            println!(
                "  ({} decode steps replayed a captured CUDA graph)",
                run.graph_replays
            );
            match check.verdict(1e-2) {
                Ok(()) => println!("  -> pass"),
                Err(why) => {
                    failed += 1;
                    println!("  -> FAIL: {why}");
                }
            }
            if let Some(bits) = &run.bit_compare {
                let line = format!(
                    "{} of {} logit rows differ in some bit from the run with the LoRA beside the GEMMs ({} between the two in-line runs)",
                    bits.overlapped_vs_in_line, bits.rows, bits.in_line_vs_in_line
                );
                // Every kernel is deterministic (no float atomics since session 6), and the
                // two LoRA paths compute the same bits: any differing row is a regression.
                if bits.overlapped_vs_in_line == 0 && bits.in_line_vs_in_line == 0 {
                    println!("  -> pass: {line}");
                } else {
                    failed += 1;
                    println!("  -> FAIL: {line}");
                }
            }
            if let Some((differ, rows)) = run.grouped_vs_served {
                println!(
                    "  ({differ} of {rows} logit rows differ in some bit from the run in the plan's row order)"
                );
            }
        }
    }
    if failed > 0 {
        return Err(CliError::ChecksFailed { failed });
    }
    println!("\nall checks passed");
    Ok(())
}

fn catalog() {
    println!("Model presets (fp16):");
    println!(
        "  {:<12} {:>7} {:>7} {:>6} {:>8} {:>10} {:>12} {:>14}",
        "name",
        "hidden",
        "layers",
        "heads",
        "kv_heads",
        "weights GB",
        "KV KiB/token",
        "r=16 q,k,v,o MiB"
    );
    for name in slora_engine::ModelSpec::preset_names() {
        let m = slora_engine::ModelSpec::preset(name).expect("presets are valid");
        let adapter = slora_engine::AdapterSpec::attention(16);
        println!(
            "  {:<12} {:>7} {:>7} {:>6} {:>8} {:>10.2} {:>12} {:>14.1}",
            name,
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.num_kv_heads,
            m.weight_bytes() as f64 / 1e9,
            m.kv_bytes_per_token() / 1024,
            adapter.weight_bytes(&m) as f64 / (1 << 20) as f64,
        );
    }
    println!("\nGPU catalogue (derived cost model; see sim/src/cost.rs for sources):");
    println!(
        "  {:<10} {:<28} {:>8} {:>10} {:>12} {:>12} {:>10} {:>8}",
        "key", "name", "mem GB", "HBM TB/s", "fp16 TFLOP/s", "SMs x GHz", "host GB/s", "$/hour"
    );
    for g in slora_sim::cost::gpu_catalogue() {
        println!(
            "  {:<10} {:<28} {:>8.0} {:>10.2} {:>12.0} {:>12} {:>10.0} {:>8.2}",
            g.key,
            g.name,
            g.memory_bytes as f64 / 1e9,
            g.hbm_bandwidth / 1e12,
            g.dense_fp16_flops / 1e12,
            format!("{} x {:.2}", g.sm_count, g.sm_clock_hz / 1e9),
            g.host_link_bandwidth / 1e9,
            g.price_per_hour_usd,
        );
    }
    // A scenario of one of these GPU x model x TP combinations runs on measured kernel costs;
    // every other one on the derived model above.
    println!("\nCalibrated profiles embedded (sim/profiles; the rest is derived):");
    println!(
        "  {:<10} {:<14} {:>3} {:<12} measured on",
        "gpu", "model", "TP", "date"
    );
    for (_, p) in slora_sim::embedded_profiles() {
        println!(
            "  {:<10} {:<14} {:>3} {:<12} {} (driver {})",
            p.gpu_key.as_deref().unwrap_or("-"),
            p.model.name,
            p.tensor_parallel,
            p.date,
            p.gpu_name,
            p.driver_version
        );
    }
}

/// What `simulate` does with each scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Simulate,
    Execute,
    /// Simulate and execute, then compare.
    Compare,
}

impl Mode {
    fn from_flags(execute: bool, compare: bool) -> Mode {
        match (execute, compare) {
            (_, true) => Mode::Compare,
            (true, false) => Mode::Execute,
            _ => Mode::Simulate,
        }
    }
}

fn simulate(
    paths: &[PathBuf],
    out: Option<&Path>,
    seed: Option<u64>,
    quiet: bool,
    mode: Mode,
    tune_gemms: bool,
    step_time_scale: Option<f64>,
) -> Result<(), CliError> {
    // Load and check every scenario before running any: bad input fails fast and whole.
    let mut loaded = Vec::new();
    if paths.is_empty() {
        loaded.push(Scenario::parse(
            DEFAULT_SCENARIO,
            Path::new("scenarios/default.yaml"),
        )?);
    }
    for path in paths {
        loaded.push(Scenario::load(path)?);
    }
    if let Some(seed) = seed {
        for l in &mut loaded {
            l.base.seed = seed;
            for p in &mut l.points {
                p.scenario.seed = seed;
            }
        }
    }
    let several = loaded.len() > 1;
    let mut summaries = Vec::new();
    let mut live = execute::LiveServer::new(tune_gemms);
    for l in &loaded {
        let dir = match (out, several) {
            (Some(dir), false) => dir.to_path_buf(),
            (Some(dir), true) => dir.join(&l.base.name),
            (None, _) => Path::new("out").join(&l.base.name),
        };
        let metrics = run_scenario(l, &dir, quiet, mode, &mut live, step_time_scale)?;
        summaries.push((l.base.name.clone(), dir, metrics));
    }
    if !quiet {
        print_summary(&summaries);
    }
    Ok(())
}

/// A progress bar that appears only once a run has taken more than a second, on a terminal.
struct Progress {
    bar: ProgressBar,
    started: Instant,
    visible: std::sync::atomic::AtomicBool,
    enabled: bool,
}

impl Progress {
    fn new(len: u64, unit: &str, quiet: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress {
            bar,
            started: Instant::now(),
            visible: false.into(),
            enabled: !quiet && std::io::stderr().is_terminal(),
        }
    }

    fn set(&self, pos: u64) {
        if self.enabled
            && !self.visible.load(Ordering::Relaxed)
            && self.started.elapsed() > Duration::from_secs(1)
        {
            self.visible.store(true, Ordering::Relaxed);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        self.bar.set_position(pos);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// One run of `setup` in `mode`, written under `dir`: the simulation or the live run there,
/// or for `Compare` both (`simulated/`, `executed/`) and their comparison (`compare/`).
/// Returns the primary run (the executed one when there is one).
fn run_live(
    name: &str,
    setup: &mut slora_sim::RunSetup,
    dir: &Path,
    quiet: bool,
    mode: Mode,
    live: &mut execute::LiveServer,
) -> Result<RunResult, CliError> {
    let out_err = |source| CliError::Output {
        scenario: name.to_string(),
        source,
    };
    let progress = Progress::new(setup.arrivals.len() as u64, "requests", quiet);
    progress.bar.set_message(format!("{name} (live)"));
    let report = |done: u64, _total: u64| progress.set(done);
    let executed = live
        .execute(setup, Some(&report))
        .map_err(|source| CliError::Execute {
            scenario: name.to_string(),
            source,
        })?;
    progress.finish();
    if mode == Mode::Execute {
        slora_reports::write_run(dir, &executed).map_err(out_err)?;
        return Ok(executed);
    }
    // The simulation runs on the setup as executed (its pool capped at what the GPU holds).
    let simulated = slora_sim::simulate(setup, None).map_err(|source| CliError::Run {
        scenario: name.to_string(),
        source,
    })?;
    let (exec_dir, sim_dir) = (dir.join("executed"), dir.join("simulated"));
    slora_reports::write_run(&exec_dir, &executed).map_err(out_err)?;
    slora_reports::write_run(&sim_dir, &simulated).map_err(out_err)?;
    let bad = |e| CliError::Compare(compare_cmd::CompareError::BadRun(e));
    let reference = slora_reports::load_run(&exec_dir).map_err(bad)?;
    let predicted = slora_reports::load_run(&sim_dir).map_err(bad)?;
    let cmp = slora_reports::compare(&reference, &predicted);
    slora_reports::write_comparison(&cmp, &reference, &predicted, &dir.join("compare"))
        .map_err(|e| CliError::Compare(compare_cmd::CompareError::Output(e)))?;
    if !quiet {
        print!("{}", cmp.to_markdown());
    }
    Ok(executed)
}

fn run_scenario(
    l: &LoadedScenario,
    dir: &Path,
    quiet: bool,
    mode: Mode,
    live: &mut execute::LiveServer,
    step_time_scale: Option<f64>,
) -> Result<Metrics, CliError> {
    let name = l.base.name.clone();
    let run_err = |source| CliError::Run {
        scenario: name.clone(),
        source,
    };
    let out_err = |source| CliError::Output {
        scenario: name.clone(),
        source,
    };
    // Build every point first: a point whose model does not fit is bad input (exit 2).
    let mut setups = l
        .points
        .iter()
        .map(|p| {
            let mut setup = p.scenario.build(&l.path)?;
            if let Some(scale) = step_time_scale {
                setup.cost = Box::new(slora_sim::cost::ScaledCost::new(setup.cost, scale));
            }
            Ok(setup)
        })
        .collect::<Result<Vec<_>, ScenarioError>>()?;

    if mode != Mode::Simulate {
        // Live runs one after another on the one GPU.
        if l.base.sweep.is_empty() {
            return run_live(&name, &mut setups[0], dir, quiet, mode, live).map(|r| r.metrics);
        }
        let mut points = Vec::new();
        for (index, (setup, point)) in setups.iter_mut().zip(&l.points).enumerate() {
            let point_dir = dir
                .join("points")
                .join(point_label(index, &point.parameters));
            let label = format!("{name} (sweep point {index})");
            let run = run_live(&label, setup, &point_dir, quiet, mode, live)?;
            points.push(sweep_point(point, run.metrics));
        }
        let sweep = SweepResult {
            scenario: name.clone(),
            points,
        };
        slora_reports::write_sweep(dir, &sweep).map_err(out_err)?;
        return Ok(sweep
            .points
            .last()
            .map(|p| p.metrics.clone())
            .unwrap_or_default());
    }

    if l.base.sweep.is_empty() {
        let setup = &setups[0];
        let progress = Progress::new(setup.arrivals.len() as u64, "requests", quiet);
        progress.bar.set_message(name.clone());
        let report = |done: u64, _total: u64| progress.set(done);
        let run = slora_sim::simulate(setup, Some(&report)).map_err(run_err)?;
        progress.finish();
        slora_reports::write_run(dir, &run).map_err(out_err)?;
        return Ok(run.metrics);
    }

    // A sweep: points in parallel over the cores, each writing its own report.
    let progress = Progress::new(setups.len() as u64, "points", quiet);
    progress.bar.set_message(name.clone());
    let done = AtomicU64::new(0);
    let results: Vec<Result<SweepPoint, CliError>> = setups
        .par_iter()
        .zip(l.points.par_iter())
        .enumerate()
        .map(|(index, (setup, point))| {
            let run: RunResult =
                slora_sim::simulate(setup, None).map_err(|source| CliError::Run {
                    scenario: format!("{name} (sweep point {index})"),
                    source,
                })?;
            let point_dir = dir
                .join("points")
                .join(point_label(index, &point.parameters));
            slora_reports::write_run(&point_dir, &run).map_err(|source| CliError::Output {
                scenario: format!("{name} (sweep point {index})"),
                source,
            })?;
            progress.set(done.fetch_add(1, Ordering::Relaxed) + 1);
            Ok(sweep_point(point, run.metrics))
        })
        .collect();
    progress.finish();
    let points = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let sweep = SweepResult {
        scenario: name.clone(),
        points,
    };
    slora_reports::write_sweep(dir, &sweep).map_err(out_err)?;
    // The summary line of a sweep shows its best point that meets the SLO, else the last.
    let best = sweep
        .points
        .iter()
        .filter(|p| p.metrics.meets_slo)
        .max_by(|a, b| {
            a.metrics
                .throughput
                .requests_per_s
                .total_cmp(&b.metrics.throughput.requests_per_s)
        })
        .or(sweep.points.last())
        .map(|p| p.metrics.clone())
        .unwrap_or_default();
    Ok(best)
}

/// A sweep point's row: its parameters, adapters and offered rate (the scenario's own, else
/// the run's) beside the run's metrics.
fn sweep_point(point: &slora_sim::scenario::SweepPointSpec, metrics: Metrics) -> SweepPoint {
    SweepPoint {
        parameters: point.parameters.clone(),
        adapters: point.scenario.adapters.count,
        offered_rate: point
            .scenario
            .offered_rate()
            .unwrap_or(metrics.throughput.offered_requests_per_s),
        metrics,
    }
}

/// `007-adapters.count=100,workload.arrivals.rate=4`, made safe for a folder name.
fn point_label(
    index: usize,
    parameters: &std::collections::BTreeMap<String, serde_json::Value>,
) -> String {
    let params: Vec<String> = parameters
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{}={}", k.rsplit('.').next().unwrap_or(k), v)
        })
        .collect();
    let label: String = format!("{index:03}-{}", params.join(","))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.=,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    label.chars().take(120).collect()
}

fn print_summary(rows: &[(String, PathBuf, Metrics)]) {
    println!(
        "{:<24} {:<10} {:>9} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}  output",
        "scenario",
        "costs",
        "completed",
        "aborted",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "SLO %"
    );
    for (name, dir, m) in rows {
        let provenance = m
            .provenance
            .map(|p| format!("{p:?}").to_lowercase())
            .unwrap_or_default();
        println!(
            "{:<24} {:<10} {:>9} {:>8} {:>9.2} {:>10.0} {:>8.3}s {:>8.3}s {:>8.4}s {:>8.4}s {:>6.1}%  {}",
            name,
            provenance,
            m.requests.completed,
            m.requests.aborted,
            m.throughput.requests_per_s,
            m.throughput.output_tokens_per_s,
            m.ttft_s.p50,
            m.ttft_s.p99,
            m.tpot_s.p50,
            m.tpot_s.p99,
            m.slo_attainment * 100.0,
            dir.display()
        );
    }
}
