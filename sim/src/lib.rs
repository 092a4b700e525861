//! slora-sim: a discrete-event simulator that drives the `slora-engine` core with a cost
//! model instead of a GPU. It re-implements no policy: every decision comes from the engine.

pub mod calibrated;
pub mod cost;
pub mod des;
pub mod fleet;
pub mod live;
pub mod metrics;
pub mod recorder;
pub mod replay;
pub mod scenario;
pub mod workload;

pub use calibrated::{cost_model_for, embedded_profiles, CalibratedCost};
pub use cost::{BatchShape, CostModel, Provenance, StepCost};
pub use des::{simulate, Event, EventQueue, SimError};
pub use fleet::{simulate_fleet, FleetResult, FleetSpec, ReplicaSummary, RouterPolicy};
pub use metrics::{Metrics, RunResult, SweepPoint, SweepResult};
pub use recorder::Recorder;
pub use scenario::{LoadedScenario, RunSetup, Scenario, ScenarioError};
