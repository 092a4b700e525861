//! A small deterministic executor for tests, benchmarks and the conformance check between
//! drivers: it runs nothing and says a step took `fixed + per_token * tokens`.

use crate::plan::{ExecError, Executor, StepPlan, StepReport};
use crate::time::Nanos;

#[derive(Clone, Debug)]
pub struct FakeExecutor {
    pub fixed: Nanos,
    pub per_token: Nanos,
    /// Plans executed, in order, when `record` is on.
    pub executed: Vec<StepPlan>,
    pub record: bool,
}

impl FakeExecutor {
    pub fn new(fixed: Nanos, per_token: Nanos) -> Self {
        FakeExecutor {
            fixed,
            per_token,
            executed: Vec::new(),
            record: false,
        }
    }

    pub fn recording(mut self) -> Self {
        self.record = true;
        self
    }
}

impl Executor for FakeExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
        let tokens = plan.prefill_tokens() as u64 + plan.decode.len() as u64;
        if self.record {
            self.executed.push(plan.clone());
        }
        Ok(StepReport {
            step: plan.step,
            elapsed: self.fixed + Nanos(self.per_token.0.saturating_mul(tokens)),
        })
    }
}

use crate::plan::StepOutcome;
use crate::request::{Reject, RequestMeta};
use crate::scheduler::{EngineError, Scheduler};

/// Everything that happened in a [`replay`].
#[derive(Clone, Debug, Default)]
pub struct ReplayLog {
    /// `(start time, plan)` of every step.
    pub plans: Vec<(Nanos, StepPlan)>,
    /// `(end time, outcome)` of every step.
    pub outcomes: Vec<(Nanos, StepOutcome)>,
    pub rejected: Vec<Reject>,
    pub end: Nanos,
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("at {now}: {waiting} requests wait but the scheduler plans nothing (stuck)")]
    Stuck { now: Nanos, waiting: usize },
    #[error("invariant broken after step {step}: {message}")]
    Invariant { step: u64, message: String },
}

/// A minimal synchronous driver for engine tests: submits `arrivals` (sorted by time) as
/// time passes, runs each plan on `executor`, and advances time by the reported duration.
/// With `check` it verifies every scheduler invariant after each call. The simulator is the
/// real driver; this one exists so that the engine's own tests need no other crate.
pub fn replay(
    scheduler: &mut Scheduler,
    executor: &mut dyn Executor,
    arrivals: &[(Nanos, RequestMeta)],
    check: bool,
) -> Result<ReplayLog, ReplayError> {
    let mut log = ReplayLog::default();
    let mut now = Nanos::ZERO;
    let mut next = 0;
    let verify = |s: &Scheduler, step: u64| -> Result<(), ReplayError> {
        if check {
            s.check_invariants()
                .map_err(|message| ReplayError::Invariant { step, message })?;
        }
        Ok(())
    };
    loop {
        while next < arrivals.len() && arrivals[next].0 <= now {
            if let Err(reject) = scheduler.submit(arrivals[next].1, arrivals[next].0) {
                log.rejected.push(reject);
            }
            next += 1;
        }
        match scheduler.plan_step(now)? {
            Some(plan) => {
                verify(scheduler, plan.step)?;
                let report = executor.execute(&plan)?;
                let start = now;
                now = now + report.elapsed;
                let outcome = scheduler.complete_step(&report, now)?;
                verify(scheduler, plan.step)?;
                log.plans.push((start, plan));
                log.outcomes.push((now, outcome));
            }
            None if next < arrivals.len() => now = now.max(arrivals[next].0),
            None if scheduler.has_work() => {
                return Err(ReplayError::Stuck {
                    now,
                    waiting: scheduler.waiting_len(),
                })
            }
            None => break,
        }
    }
    log.end = now;
    Ok(log)
}
