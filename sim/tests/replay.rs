//! A recorded run made again (`slora_sim::replay`): a run served by the live driver on a fake
//! executor whose step times jitter (so that no cost model reproduces them), written as a
//! `steps.csv`, parsed back and replayed, must give every plan of the run again, each with
//! its recorded span, even when the run's pool differs from its scenario's.

use slora_engine::testing::FakeExecutor;
use slora_engine::{ExecError, Executor, Nanos, RequestId, RequestMeta, StepPlan, StepReport};
use slora_sim::live::{serve, Backend, VirtualClock};
use slora_sim::metrics::StepRecord;
use slora_sim::replay::{parse_steps_csv, replay, use_recorded_pool, ReplayError};
use slora_sim::{Provenance, Recorder, RunSetup, Scenario};
use std::path::Path;

fn setup() -> RunSetup {
    let text = "name: replay\nseed: 5\nmodel: llama-7b\ngpu: h200\n\
        adapters: { count: 300, ranks: [8, 16, 32, 64], popularity: { law: zipf, s: 1.0 } }\n\
        workload:\n  arrivals: { process: gamma, rate: 40, cv: 3.0 }\n  requests: 1500\n  \
        input: { dist: uniform, min: 8, max: 512 }\n  output: { dist: uniform, min: 8, max: 256 }\n\
        policy: { early_abort: true }\nslo: { ttft_s: 1.0 }\n";
    let loaded = Scenario::parse(text, Path::new("replay.yaml")).unwrap();
    loaded.points[0]
        .scenario
        .build(Path::new("replay.yaml"))
        .unwrap()
}

/// The fake executor with a deterministic ±30% jitter per step, recording what it ran.
struct Jittery {
    exec: FakeExecutor,
    plans: Vec<StepPlan>,
}

impl Executor for Jittery {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
        self.plans.push(plan.clone());
        let base = self.exec.execute(plan)?.elapsed;
        let h = plan.step.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1023
        Ok(StepReport {
            step: plan.step,
            elapsed: Nanos((base.0 as f64 * (0.7 + 0.6 * h as f64 / 1023.0)) as u64),
        })
    }
}

impl Backend for Jittery {
    fn admit(&mut self, _index: usize, _meta: &RequestMeta) -> Result<(), String> {
        Ok(())
    }
    fn release(&mut self, _id: RequestId) {}
}

fn jittery() -> Jittery {
    Jittery {
        exec: FakeExecutor::new(Nanos::from_micros(3_000), Nanos::from_micros(60)),
        plans: Vec::new(),
    }
}

/// The columns the replay reads, in another order than the recorder's, with one it ignores.
fn steps_csv(steps: &[StepRecord]) -> String {
    let mut text = String::from(
        "free_pages,start_s,waiting,duration_s,decode_requests,prefill_tokens,loads,adapter_pages,kv_pages\n",
    );
    for s in steps {
        text.push_str(&format!(
            "{},{:.9},{},{:.9},{},{},{},{},{}\n",
            s.free_pages,
            s.start.as_secs_f64(),
            s.waiting,
            s.duration.as_secs_f64(),
            s.decode_requests,
            s.prefill_tokens,
            s.loads,
            s.adapter_pages,
            s.kv_pages
        ));
    }
    text
}

/// Serves `setup` on the jittery executor: the run's plans and its steps.csv.
fn record(setup: &RunSetup) -> (Vec<StepPlan>, String) {
    let mut backend = jittery();
    let recorder = Recorder::with_source(setup, Provenance::Executed, "jittery".into());
    let run = serve(
        setup,
        recorder,
        &mut backend,
        &mut VirtualClock::default(),
        None,
        None,
    )
    .unwrap();
    (backend.plans, steps_csv(&run.steps))
}

#[test]
fn a_replay_makes_every_plan_of_the_recorded_run_again() {
    // The run planned with a smaller pool than its scenario's (as a GPU that holds fewer
    // pages caps it): the replay must take the recording's.
    let mut live = setup();
    let scenario_pool = live.engine.pool_pages;
    live.engine.pool_pages = 24_000;
    let (plans, csv) = record(&live);
    assert!(plans.len() > 500, "too few steps to mean anything");
    let recorded = parse_steps_csv(&csv, "steps.csv").unwrap();

    let mut again = setup();
    assert_eq!(again.engine.pool_pages, scenario_pool);
    use_recorded_pool(&mut again, &recorded, None, "steps.csv").unwrap();
    assert_eq!(again.engine.pool_pages, 24_000);
    let mut inner = jittery();
    let mut spans = Vec::new();
    let summary = replay(&again, &recorded, &mut inner, &mut |s| {
        assert!(!s.drifted, "step {} drifted", s.index);
        spans.push((s.index, s.span_s));
    })
    .unwrap();
    assert_eq!(summary.recorded, plans.len());
    assert_eq!(summary.replayed, plans.len());
    assert_eq!((summary.drifted, summary.beyond), (0, 0));
    assert_eq!(inner.plans.len(), plans.len());
    for (i, (a, b)) in plans.iter().zip(&inner.plans).enumerate() {
        assert_eq!(a, b, "plan {i} differs");
    }
    // Each step is given the time from its recorded start to the next one's.
    for w in spans.windows(2) {
        let (i, span) = w[0];
        let (j, _) = w[1];
        let want = recorded[j].start_s - recorded[i].start_s;
        if j == i + 1 {
            assert!(
                (span - want).abs() < 1e-12,
                "step {i}: span {span} != {want}"
            );
        }
    }

    // With the scenario's own pool the same recording is not the same run: the replay
    // notices (the pool is what makes it the run's).
    let own = setup();
    let summary = replay(
        &own,
        &recorded,
        &mut slora_sim::replay::NoBackend,
        &mut |_| {},
    )
    .unwrap();
    assert!(
        summary.drifted > 0 || summary.beyond > 0 || summary.replayed < summary.recorded,
        "a pool of {scenario_pool} pages instead of 24,000 should change the plans: {summary:?}"
    );
}

#[test]
fn bad_recordings_are_named_by_file_line_and_column() {
    let header = "start_s,duration_s,prefill_tokens,decode_requests,loads,kv_pages,adapter_pages,free_pages\n";
    let err = |text: &str| {
        parse_steps_csv(text, "run/steps.csv")
            .unwrap_err()
            .to_string()
    };

    let e = err("start_s,duration_s,decode_requests\n0,1,2\n");
    assert!(
        e.contains("run/steps.csv") && e.contains("`prefill_tokens`"),
        "{e}"
    );
    let e = err(&format!(
        "{header}0.1,0.01,5,0,0,1,2,3\n0.2,abc,0,1,0,1,2,3\n"
    ));
    assert!(
        e.contains("line 3") && e.contains("`duration_s`") && e.contains("abc"),
        "{e}"
    );
    let e = err(&format!(
        "{header}0.1,0.01,5,0,0,1,2,3\n0.2,0.01,2.5,1,0,1,2,3\n"
    ));
    assert!(
        e.contains("line 3") && e.contains("`prefill_tokens`") && e.contains("2.5"),
        "{e}"
    );
    let e = err(&format!(
        "{header}0.3,0.01,5,0,0,1,2,3\n0.2,0.01,0,1,0,1,2,3\n"
    ));
    assert!(e.contains("line 3") && e.contains("before"), "{e}");
    let e = err(&format!("{header}0.1,-0.01,5,0,0,1,2,3\n"));
    assert!(e.contains("line 2") && e.contains("-0.01"), "{e}");
    let e = err(header);
    assert!(e.contains("no steps"), "{e}");
    let e = err("");
    assert!(e.contains("empty"), "{e}");

    // Rows of two runs, or a GPU smaller than the recorded pool.
    let two = parse_steps_csv(
        &format!("{header}0.1,0.01,5,0,0,1,2,3\n0.2,0.01,0,1,0,2,2,3\n"),
        "run/steps.csv",
    )
    .unwrap();
    let mut s = setup();
    let e = use_recorded_pool(&mut s, &two, None, "run/steps.csv").unwrap_err();
    assert!(matches!(e, ReplayError::Pool { recorded: 6, .. }), "{e}");
    assert!(e.to_string().contains("7 pages"), "{e}");
    let one = &two[..1];
    let e = use_recorded_pool(&mut s, one, Some(5), "run/steps.csv")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run/steps.csv") && e.contains("6 pages") && e.contains("only 5"),
        "{e}"
    );
}
