//! slora-planner: capacity planning. Which GPUs, how many, with which settings meet an SLO at
//! the lowest cost, and how far they grow, answered by running the simulator in-process.
//!
//! - [`spec`]: the scenario's `plan:` section and command-line overrides, merged and checked
//!   into a [`PlanConfig`] (all bad input is found there, before anything runs).
//! - [`search`]: the search itself, a pure function over a yes/no probe (bisection to a
//!   stated relative granularity), unit-tested on synthetic curves.
//! - [`evaluate`]: one evaluation, a configuration at a rate and an adapter count built from
//!   the scenario and simulated, summarised with what limits it.
//! - [`plan`]: the stages (knob screening, deployments, capacity curves), run in parallel
//!   over the cores, and the ranking.
//! - [`summary`]: the plan in plain language.
//!
//! ```no_run
//! # use slora_planner::*;
//! # use std::path::Path;
//! let path = Path::new("scenarios/plan-example.yaml");
//! let text = std::fs::read_to_string(path).unwrap();
//! let loaded = slora_sim::Scenario::parse(&text, path).unwrap();
//! let spec = PlanSpec::from_scenario_text(&text, path).unwrap();
//! let config = PlanConfig::resolve(&loaded.base, &spec, &PlanOverrides::default(), path).unwrap();
//! let result = run_plan(&loaded.base, path, &config, &[], None);
//! print!("{}", summary_text(&result));
//! ```

pub mod evaluate;
pub mod plan;
pub mod search;
pub mod spec;
pub mod summary;

pub use evaluate::{Bottleneck, Config, RunSummary};
pub use plan::{
    run_plan, Candidate, PlanProgress, PlanResult, ProgressFn, Recommendation, Role, Verdict,
};
pub use search::{find_knee, Knee, SearchSpec};
pub use spec::{Knobs, PlanConfig, PlanError, PlanOverrides, PlanSpec, RouterChoice};
pub use summary::summary_text;
