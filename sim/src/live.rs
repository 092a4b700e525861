//! The live driver: the same scenario, engine and recorder as the simulator, with a real
//! executor and a clock instead of a cost model and an event queue.
//!
//! Requests are released at their arrival times on a monotonic clock. Between steps the driver
//! submits every request that has arrived (with its true arrival time, even when it arrived
//! while a step ran: a server's scheduler sees it at the next iteration), asks the engine for
//! a plan, runs it on the executor, and records the step's end when the executor returns,
//! which is when the step's tokens are on the host. With nothing to run it sleeps until the
//! next arrival.
//!
//! The clock is a parameter so that the driver can also run on virtual time: a
//! [`VirtualClock`] advances by each step's reported duration, and with the same executor the
//! driver then makes exactly the plans of the discrete-event simulator (the conformance test).

use crate::cost::{BatchShape, StepCost};
use crate::des::{PlanObserver, Progress, SimError};
use crate::metrics::RunResult;
use crate::recorder::Recorder;
use crate::scenario::RunSetup;
use slora_engine::{Executor, Nanos, RequestId, RequestMeta, Scheduler};
use std::time::{Duration, Instant};

/// Time as the live driver sees it.
pub trait Clock {
    /// Time since the run started.
    fn now(&mut self) -> Nanos;
    /// Returns once `now() >= t`.
    fn wait_until(&mut self, t: Nanos);
    /// A step that started at `start` reported `elapsed`; a virtual clock moves to its end.
    fn step_done(&mut self, start: Nanos, elapsed: Nanos);
}

/// The monotonic wall clock, from the moment it is created.
pub struct WallClock {
    start: Instant,
}

impl WallClock {
    pub fn start() -> WallClock {
        WallClock {
            start: Instant::now(),
        }
    }
}

impl Clock for WallClock {
    fn now(&mut self) -> Nanos {
        Nanos(self.start.elapsed().as_nanos() as u64)
    }

    fn wait_until(&mut self, t: Nanos) {
        // Sleep most of the way (the OS wakes late by up to ~100 µs), then spin the rest, so
        // requests are released within microseconds of their arrival times.
        const SPIN: Duration = Duration::from_micros(200);
        loop {
            let now = self.now();
            if now >= t {
                return;
            }
            let left = Duration::from_nanos((t - now).0);
            if left > SPIN {
                std::thread::sleep(left - SPIN);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn step_done(&mut self, _start: Nanos, _elapsed: Nanos) {}
}

/// Simulated time that moves only when told: by waiting, or by a step's reported duration.
#[derive(Default)]
pub struct VirtualClock {
    now: Nanos,
}

impl Clock for VirtualClock {
    fn now(&mut self) -> Nanos {
        self.now
    }

    fn wait_until(&mut self, t: Nanos) {
        self.now = self.now.max(t);
    }

    fn step_done(&mut self, start: Nanos, elapsed: Nanos) {
        self.now = self.now.max(start + elapsed);
    }
}

/// What the live driver needs from an executor beyond running plans: requests' prompts must
/// be on it before their prefill, and their state can go once they end.
pub trait Backend: Executor {
    /// A request arrived (before the engine sees it). `index` is its place in the arrival
    /// list, for backends that derive a synthetic prompt from it.
    fn admit(&mut self, index: usize, meta: &RequestMeta) -> Result<(), String>;
    /// A request completed, was aborted or rejected: its state may be dropped.
    fn release(&mut self, id: RequestId);
}

/// A failure of the live driver: the engine's, or the executor's.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error("executor: {0}")]
    Exec(String),
}

impl From<slora_engine::EngineError> for LiveError {
    fn from(e: slora_engine::EngineError) -> Self {
        LiveError::Sim(SimError::Engine(e))
    }
}

/// Serves `setup`'s arrivals on `backend`, timed by `clock`, to completion.
pub fn serve(
    setup: &RunSetup,
    mut recorder: Recorder,
    backend: &mut dyn Backend,
    clock: &mut dyn Clock,
    progress: Option<Progress<'_>>,
    mut on_plan: Option<PlanObserver<'_>>,
) -> Result<RunResult, LiveError> {
    let mut scheduler = Scheduler::new(setup.engine.clone()).map_err(SimError::from)?;
    let arrivals = &setup.arrivals;
    let total = arrivals.len() as u64;
    let mut next = 0usize;
    loop {
        let now = clock.now();
        // Everything that has arrived by now, with its own arrival time.
        submit_arrived(
            setup,
            &mut scheduler,
            &mut recorder,
            backend,
            &mut next,
            now,
        )?;
        if let Some(report) = progress {
            report(next as u64, total);
        }
        match scheduler.plan_step(now)? {
            Some(plan) => {
                if let Some(observe) = on_plan.as_mut() {
                    observe(&plan);
                }
                for a in &plan.aborted {
                    backend.release(a.request);
                }
                let report = if plan.has_compute() || !plan.loads.is_empty() {
                    backend
                        .execute(&plan)
                        .map_err(|e| LiveError::Exec(e.to_string()))?
                } else {
                    // A plan that only aborts requests does no GPU work.
                    slora_engine::StepReport {
                        step: plan.step,
                        elapsed: Nanos::ZERO,
                    }
                };
                clock.step_done(now, report.elapsed);
                let end = clock.now();
                let measured = StepCost {
                    fixed_overhead: end - now,
                    ..StepCost::default()
                };
                // What the simulator would have charged for this very step: the per-step
                // check of the cost model (`steps.csv`'s `model_s`).
                let model = if plan.has_compute() || !plan.loads.is_empty() {
                    let shape = BatchShape::from_plan(&plan, &setup.ranks);
                    setup.cost.step_cost(&shape).total()
                } else {
                    Nanos::ZERO
                };
                recorder.planned(&plan, &measured, model, now);
                // Requests that arrived while the step ran are submitted before it completes,
                // as the simulator orders an arrival before a step end at the same instant.
                submit_arrived(
                    setup,
                    &mut scheduler,
                    &mut recorder,
                    backend,
                    &mut next,
                    end,
                )?;
                let outcome = scheduler.complete_step(
                    &slora_engine::StepReport {
                        step: report.step,
                        elapsed: end - now,
                    },
                    end,
                )?;
                recorder.completed(&outcome, end);
                for f in &outcome.finished {
                    backend.release(f.request);
                }
            }
            None => match arrivals.get(next) {
                Some(a) => clock.wait_until(a.time),
                None if scheduler.has_work() => {
                    return Err(SimError::Stuck {
                        now,
                        waiting: scheduler.waiting_len(),
                    }
                    .into())
                }
                None => break,
            },
        }
    }
    if let Some(report) = progress {
        report(total, total);
    }
    Ok(recorder.finish(&scheduler))
}

/// Submits the arrivals from `*next` on whose time is at most `upto`, each at its own arrival
/// time, after handing it to the backend.
fn submit_arrived(
    setup: &RunSetup,
    scheduler: &mut Scheduler,
    recorder: &mut Recorder,
    backend: &mut dyn Backend,
    next: &mut usize,
    upto: Nanos,
) -> Result<(), LiveError> {
    while let Some(a) = setup.arrivals.get(*next).filter(|a| a.time <= upto) {
        let meta = a.meta(*next);
        let id = meta.id;
        backend.admit(*next, &meta).map_err(LiveError::Exec)?;
        if let Err(reject) = scheduler.submit(meta, a.time) {
            recorder.rejected(*next, &reject, a.time);
            backend.release(id);
        }
        *next += 1;
    }
    Ok(())
}
