//! `slora-plan plan`: which GPUs, how many, with which settings meet the scenario's SLO at
//! its target rate for the least money, and how far that grows (crate `slora-planner`).
//!
//! Exit codes: 0 a recommendation; 1 the plan ran but nothing tried meets the target (within
//! the budget), or the outputs could not be written (the report is written whenever
//! possible, and says why); 2 bad input (scenario, `plan:` section, flags, profiles).

use crate::Progress;
use slora_planner::{
    run_plan, summary_text, PlanConfig, PlanError, PlanOverrides, PlanSpec, RouterChoice, Verdict,
};
use slora_sim::cost::{self, CalibrationProfile};
use slora_sim::Scenario;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A scenario YAML file, usually with a `plan:` section (docs/scenarios.md, "Capacity
    /// planning"). Flags below replace the section's values.
    pub scenario: PathBuf,
    /// Output folder. Default: out/<scenario name>-plan/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar and no summary (errors and a missing answer are still reported).
    #[arg(long)]
    pub quiet: bool,
    /// Requests per second the whole deployment must sustain within the SLO.
    #[arg(long, value_name = "REQ_PER_S")]
    pub target_rate: Option<f64>,
    /// Adapters to serve (default: plan.adapters, else adapters.count).
    #[arg(long, value_name = "N")]
    pub adapters: Option<u32>,
    /// GPU kinds to consider, comma-separated catalogue keys (`slora-plan catalog`), e.g.
    /// `h200,h100,a100-80g,l40s`.
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    pub gpus: Option<Vec<String>>,
    /// Tensor-parallel degrees (GPUs per replica) to try, comma-separated: 1, 2, 4, 8.
    #[arg(long, value_delimiter = ',', value_name = "DEGREES")]
    pub tp: Option<Vec<u32>>,
    /// Replica counts tried: 1 to this (default 8). More finds larger fleets and costs
    /// simulation time.
    #[arg(long, value_name = "N")]
    pub max_replicas: Option<u32>,
    /// Most GPUs in one configuration (TP × replicas).
    #[arg(long, value_name = "N")]
    pub max_gpus: Option<u32>,
    /// Most USD per hour a recommendation may cost (prices per GPU-hour from the catalogue
    /// unless the scenario's plan.prices_usd_per_gpu_hour sets them).
    #[arg(long, value_name = "USD_PER_HOUR")]
    pub budget: Option<f64>,
    /// Fleet routers to compare, comma-separated: round_robin, least_outstanding,
    /// adapter_affinity.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub router: Option<Vec<String>>,
    /// Relative granularity of the rate and adapter searches (default 0.02 = 2%). Smaller is
    /// more precise and needs more simulations (about one more per halving).
    #[arg(long, value_name = "FRACTION")]
    pub granularity: Option<f64>,
    /// Simulated seconds of arrivals per evaluation (default 120). Shorter runs are faster
    /// and see less of a slowly growing queue.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Override the scenario's seed (every evaluation uses it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recommendations listed (default 5).
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    /// A calibration profile (from `slora-plan calibrate`) to use where it matches a GPU kind,
    /// model and TP degree, beside the embedded ones. Repeatable.
    #[arg(long = "profile", value_name = "FILE")]
    pub profiles: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanCmdError {
    #[error(transparent)]
    BadInput(#[from] PlanError),
    #[error("--profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
    #[error("--router: {0}")]
    Router(String),
    #[error("{scenario}: {message} (report: {})", dir.display())]
    NoAnswer {
        scenario: String,
        message: String,
        dir: PathBuf,
    },
    #[error("{scenario}: writing outputs: {source}")]
    Output {
        scenario: String,
        source: slora_reports::ReportError,
    },
}

impl PlanCmdError {
    pub fn exit_code(&self) -> u8 {
        match self {
            PlanCmdError::BadInput(_) | PlanCmdError::Profile { .. } | PlanCmdError::Router(_) => 2,
            PlanCmdError::NoAnswer { .. } | PlanCmdError::Output { .. } => 1,
        }
    }
}

pub fn run(args: &PlanArgs) -> Result<(), PlanCmdError> {
    let path = args.scenario.as_path();
    let text = std::fs::read_to_string(path).map_err(|source| {
        PlanError::Scenario(slora_sim::ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let loaded = Scenario::parse(&text, path).map_err(PlanError::from)?;
    let spec = PlanSpec::from_scenario_text(&text, path)?;
    let routers = args
        .router
        .as_ref()
        .map(|names| {
            names
                .iter()
                .map(|n| RouterChoice::parse(n))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(PlanCmdError::Router)?;
    let flags = PlanOverrides {
        target_rate: args.target_rate,
        adapters: args.adapters,
        gpus: args.gpus.clone(),
        tensor_parallel: args.tp.clone(),
        max_replicas: args.max_replicas,
        max_gpus: args.max_gpus,
        budget_usd_per_hour: args.budget,
        routers,
        granularity: args.granularity,
        duration_s: args.duration,
        seed: args.seed,
        top: args.top,
    };
    let config = PlanConfig::resolve(&loaded.base, &spec, &flags, path)?;
    let profiles = load_profiles(&args.profiles)?;
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => Path::new("out").join(format!("{}-plan", loaded.base.name)),
    };

    let started = Instant::now();
    let progress = Progress::new(0, "searches", args.quiet);
    progress
        .bar
        .set_message(format!("{} (plan)", loaded.base.name));
    let report = |p: slora_planner::PlanProgress| {
        progress.bar.set_length(p.searches_total);
        progress.bar.set_message(format!(
            "{} (plan, {} simulations)",
            loaded.base.name, p.simulations
        ));
        progress.set(p.searches_done);
    };
    let result = run_plan(&loaded.base, path, &config, &profiles, Some(&report));
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();

    slora_reports::write_plan(&dir, &result).map_err(|source| PlanCmdError::Output {
        scenario: loaded.base.name.clone(),
        source,
    })?;
    if !args.quiet {
        print!("{}", summary_text(&result));
        println!(
            "\n{} simulations in {elapsed:.1} s on {} threads. Report: {} (plan.html, plan.md, \
             plan.json, charts).",
            slora_planner::summary::group(result.simulations),
            rayon::current_num_threads(),
            dir.display()
        );
    }
    match &result.verdict {
        Verdict::Recommended => Ok(()),
        Verdict::OverBudget {
            budget_usd_per_hour,
            cheapest_usd_per_hour,
            ..
        } => Err(PlanCmdError::NoAnswer {
            scenario: result.scenario.clone(),
            message: format!(
                "no configuration within the budget of ${budget_usd_per_hour:.2}/hour meets {} \
                 req/s; the cheapest that does costs ${cheapest_usd_per_hour:.2}/hour",
                config.target_rate
            ),
            dir,
        }),
        Verdict::NoneMeetsTarget { best_max_rate, .. } => Err(PlanCmdError::NoAnswer {
            scenario: result.scenario.clone(),
            message: format!(
                "no configuration tried meets {} req/s with {} adapters within the SLO{}",
                config.target_rate,
                config.adapters,
                best_max_rate
                    .map(|r| format!("; the most any sustains is {r:.3} req/s"))
                    .unwrap_or_else(|| "; none meets it at any rate tried".into())
            ),
            dir,
        }),
    }
}

fn load_profiles(paths: &[PathBuf]) -> Result<Vec<CalibrationProfile>, PlanCmdError> {
    paths
        .iter()
        .map(|p| {
            cost::load_profile(p).map_err(|e| PlanCmdError::Profile {
                path: p.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}
