//! The live driver and the discrete-event simulator make the same plans when they see the same
//! step times: both drive the engine with one fake executor (the live driver on virtual time),
//! and every plan, request record and step record must be identical.

use slora_engine::testing::FakeExecutor;
use slora_engine::{ExecError, Executor, Nanos, RequestId, RequestMeta, StepPlan, StepReport};
use slora_sim::des::simulate_with;
use slora_sim::live::{serve, Backend, VirtualClock};
use slora_sim::{Provenance, Recorder, RunSetup, Scenario, StepCost};
use std::path::Path;

fn setup(text: &str) -> RunSetup {
    let loaded = Scenario::parse(text, Path::new("conformance.yaml")).unwrap();
    loaded.points[0]
        .scenario
        .build(Path::new("conformance.yaml"))
        .unwrap()
}

/// The fake executor as a live backend, checking the driver's bookkeeping: every request is
/// admitted before the engine plans it, and released once.
struct FakeBackend {
    exec: FakeExecutor,
    admitted: Vec<bool>,
    released: Vec<bool>,
}

impl Executor for FakeBackend {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
        for p in &plan.prefill {
            assert!(
                self.admitted[p.request.0 as usize],
                "planned before admitted"
            );
        }
        self.exec.execute(plan)
    }
}

impl Backend for FakeBackend {
    fn admit(&mut self, index: usize, meta: &RequestMeta) -> Result<(), String> {
        assert_eq!(meta.id, RequestId(index as u64));
        assert!(!self.admitted[index], "admitted twice");
        self.admitted[index] = true;
        Ok(())
    }
    fn release(&mut self, id: RequestId) {
        let i = id.0 as usize;
        assert!(!self.released[i], "{id} released twice");
        self.released[i] = true;
    }
}

fn scenario_text(rate: f64, extra: &str) -> String {
    format!(
        "name: conformance\nseed: 11\nmodel: llama-7b\ngpu: h200\n\
         adapters: {{ count: 200, ranks: [8, 16, 32, 64], popularity: {{ law: zipf, s: 1.0 }} }}\n\
         workload:\n  arrivals: {{ process: gamma, rate: {rate}, cv: 2.0 }}\n  requests: 3000\n  \
         input: {{ dist: uniform, min: 8, max: 512 }}\n  output: {{ dist: uniform, min: 8, max: 256 }}\n\
         slo: {{ ttft_s: 2.0 }}\n{extra}"
    )
}

fn both_drivers(text: &str) {
    let setup = setup(text);
    let fake = || FakeExecutor::new(Nanos::from_micros(2_000), Nanos::from_micros(40));

    let mut des_plans: Vec<StepPlan> = Vec::new();
    let mut des_exec = fake();
    let mut timer = |plan: &StepPlan, _: &slora_sim::BatchShape| StepCost {
        fixed_overhead: des_exec.execute(plan).unwrap().elapsed,
        ..StepCost::default()
    };
    let mut record_des = |p: &StepPlan| des_plans.push(p.clone());
    let recorder = Recorder::with_source(&setup, Provenance::Executed, "fake".into());
    let simulated =
        simulate_with(&setup, recorder, &mut timer, None, Some(&mut record_des)).unwrap();

    let mut live_plans: Vec<StepPlan> = Vec::new();
    let mut record_live = |p: &StepPlan| live_plans.push(p.clone());
    let n = setup.arrivals.len();
    let mut backend = FakeBackend {
        exec: fake(),
        admitted: vec![false; n],
        released: vec![false; n],
    };
    let recorder = Recorder::with_source(&setup, Provenance::Executed, "fake".into());
    let live = serve(
        &setup,
        recorder,
        &mut backend,
        &mut VirtualClock::default(),
        None,
        Some(&mut record_live),
    )
    .unwrap();

    assert!(des_plans.len() > 100, "too few steps to mean anything");
    assert_eq!(des_plans.len(), live_plans.len(), "number of plans");
    for (i, (a, b)) in des_plans.iter().zip(&live_plans).enumerate() {
        assert_eq!(a, b, "plan {i} differs");
    }
    assert_eq!(simulated.requests, live.requests);
    let (s, l): (Vec<_>, Vec<_>) = (
        simulated
            .steps
            .iter()
            .map(|s| (s.start, s.duration, s.model))
            .collect(),
        live.steps
            .iter()
            .map(|s| (s.start, s.duration, s.model))
            .collect(),
    );
    // Equal step records, the cost model's price of each step (`model_s`) included: both
    // drivers price the same plans with the scenario's cost model.
    assert_eq!(s, l);
    assert!(
        live.steps.iter().any(|s| s.model != s.duration),
        "the fake executor's times should differ from the cost model's, or `model` proves nothing"
    );
    assert!(
        backend.released.iter().all(|&r| r),
        "a request was never released"
    );
}

#[test]
fn live_driver_on_virtual_time_makes_the_simulators_plans() {
    both_drivers(&scenario_text(20.0, ""));
}

#[test]
fn conformance_holds_under_overload_with_early_abort_and_vtc() {
    both_drivers(&scenario_text(
        200.0,
        "policy:\n  admission: optimistic\n  early_abort: true\n  order: vtc\n  clustering: true\n  newest_first_under_overload: true\n",
    ));
}

#[test]
fn a_simulation_records_each_steps_duration_as_its_price() {
    // In a plain simulation the cost model is the timer: `model` must equal `duration` for
    // every step.
    let setup = setup(&scenario_text(12.0, ""));
    let run = slora_sim::simulate(&setup, None).unwrap();
    assert!(run.steps.len() > 100, "too few steps to mean anything");
    assert!(run.steps.iter().all(|s| s.model == s.duration));
    assert!(run.steps.iter().any(|s| s.duration > Nanos::ZERO));
}
