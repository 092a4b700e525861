//! The discrete-event driver: the engine core, a cost model for step times, and an event
//! queue for simulated time.
//!
//! Events are a closed enum; the queue orders them by `(time, insertion sequence)`, so events
//! at the same instant run in the order they were scheduled, and scheduling an event before
//! the current time is an error. Arrivals are pushed one at a time (the next when the
//! previous fires), so the queue never holds more than two events and a million-request run
//! costs no more memory than its records.

use crate::cost::{BatchShape, CostModel, StepCost};
use crate::metrics::RunResult;
use crate::recorder::Recorder;
use crate::scenario::RunSetup;
use slora_engine::{EngineError, Nanos, Scheduler, StepPlan, StepReport};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// What can happen in a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Request `index` of the arrival list reaches the server.
    Arrival(usize),
    /// The step in flight finishes.
    StepDone,
}

/// A run that could not complete. Exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("event at {at} scheduled in the past (now {now})")]
    PastEvent { now: Nanos, at: Nanos },
    #[error("engine protocol error: {0}")]
    Engine(#[from] EngineError),
    #[error("engine configuration: {0}")]
    Config(#[from] slora_engine::ConfigError),
    #[error("at {now}: {waiting} requests wait but the engine plans nothing")]
    Stuck { now: Nanos, waiting: usize },
}

/// Min-queue of events by time, ties broken by insertion order.
#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<(Nanos, u64, EventKey)>>,
    next_seq: u64,
    now: Nanos,
}

/// `Event` with a total order for the heap (the order is never used to break ties: the
/// sequence number before it always differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct EventKey(u8, usize);

impl From<Event> for EventKey {
    fn from(e: Event) -> Self {
        match e {
            Event::Arrival(i) => EventKey(0, i),
            Event::StepDone => EventKey(1, 0),
        }
    }
}

impl From<EventKey> for Event {
    fn from(k: EventKey) -> Self {
        match k.0 {
            0 => Event::Arrival(k.1),
            _ => Event::StepDone,
        }
    }
}

impl EventQueue {
    pub fn now(&self) -> Nanos {
        self.now
    }

    pub fn push(&mut self, at: Nanos, event: Event) -> Result<(), SimError> {
        if at < self.now {
            return Err(SimError::PastEvent { now: self.now, at });
        }
        self.heap.push(Reverse((at, self.next_seq, event.into())));
        self.next_seq += 1;
        Ok(())
    }

    pub fn pop(&mut self) -> Option<(Nanos, Event)> {
        let Reverse((at, _, key)) = self.heap.pop()?;
        self.now = at;
        Some((at, key.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Time of the next event, if any.
    pub fn peek_time(&self) -> Option<Nanos> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }
}

/// Progress callback: `(arrivals submitted, total arrivals)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Runs a scenario to completion (every request completed, aborted or rejected).
pub fn simulate(setup: &RunSetup, progress: Option<Progress<'_>>) -> Result<RunResult, SimError> {
    let cost: &dyn CostModel = setup.cost.as_ref();
    let recorder = Recorder::new(setup, cost);
    let mut step_cost = |_: &StepPlan, shape: &BatchShape| cost.step_cost(shape);
    // The timer is the scenario's cost model: a step's price is its duration.
    drive(setup, recorder, &mut step_cost, false, progress, None)
}

/// What a step of a simulation takes: the cost model's prediction, or (in the conformance
/// test against the live driver) an executor's reported time.
pub type StepTimer<'a> = &'a mut dyn FnMut(&StepPlan, &BatchShape) -> StepCost;

/// Sees every plan as it is made (the conformance test records them).
pub type PlanObserver<'a> = &'a mut dyn FnMut(&StepPlan);

/// The discrete-event loop with step times from `step_time`. All events at one instant are
/// handled before the engine plans, so requests arriving together are planned together (as
/// the live driver does, which submits everything that has arrived before it plans).
pub fn simulate_with(
    setup: &RunSetup,
    recorder: Recorder,
    step_time: StepTimer<'_>,
    progress: Option<Progress<'_>>,
    on_plan: Option<PlanObserver<'_>>,
) -> Result<RunResult, SimError> {
    drive(setup, recorder, step_time, true, progress, on_plan)
}

/// The loop of [`simulate_with`]. `price_apart`: the timer is not the scenario's cost model,
/// so each step is also priced by that model for its record (`StepRecord::model`); otherwise
/// the duration is the price and the model is not asked twice.
fn drive(
    setup: &RunSetup,
    mut recorder: Recorder,
    step_time: StepTimer<'_>,
    price_apart: bool,
    progress: Option<Progress<'_>>,
    mut on_plan: Option<PlanObserver<'_>>,
) -> Result<RunResult, SimError> {
    let mut scheduler = Scheduler::new(setup.engine.clone())?;
    let arrivals = &setup.arrivals;
    let mut queue = EventQueue::default();
    let mut in_flight: Option<(StepPlan, StepCost)> = None;
    if let Some(first) = arrivals.first() {
        queue.push(first.time, Event::Arrival(0))?;
    }
    let total = arrivals.len() as u64;
    while let Some((now, event)) = queue.pop() {
        match event {
            Event::Arrival(i) => {
                if let Err(reject) = scheduler.submit(arrivals[i].meta(i), now) {
                    recorder.rejected(i, &reject, now);
                }
                if let Some(next) = arrivals.get(i + 1) {
                    queue.push(next.time, Event::Arrival(i + 1))?;
                }
                if let Some(report) = progress {
                    if i % 4096 == 0 {
                        report(i as u64, total);
                    }
                }
            }
            Event::StepDone => {
                let (plan, step_cost) = in_flight
                    .take()
                    .expect("a StepDone event is only scheduled with a step in flight");
                let report = StepReport {
                    step: plan.step,
                    elapsed: step_cost.total(),
                };
                let outcome = scheduler.complete_step(&report, now)?;
                recorder.completed(&outcome, now);
            }
        }
        if queue.peek_time() == Some(now) {
            continue;
        }
        if in_flight.is_none() {
            if let Some(plan) = scheduler.plan_step(now)? {
                if let Some(observe) = on_plan.as_mut() {
                    observe(&plan);
                }
                let shape = BatchShape::from_plan(&plan, &setup.ranks);
                // A plan that only aborts requests does no GPU work and takes no time.
                let (step_cost, model) = if plan.has_compute() || !plan.loads.is_empty() {
                    // The timer is the scenario's cost model except in the conformance test,
                    // whose executor's times the live driver's records must match.
                    let cost = step_time(&plan, &shape);
                    let model = if price_apart {
                        setup.cost.step_cost(&shape).total()
                    } else {
                        cost.total()
                    };
                    (cost, model)
                } else {
                    (StepCost::default(), Nanos::ZERO)
                };
                recorder.planned(&plan, &step_cost, model, now);
                queue.push(now + step_cost.total(), Event::StepDone)?;
                in_flight = Some((plan, step_cost));
            } else if queue.is_empty() && scheduler.has_work() {
                return Err(SimError::Stuck {
                    now,
                    waiting: scheduler.waiting_len(),
                });
            }
        }
    }
    if let Some(report) = progress {
        report(total, total);
    }
    Ok(recorder.finish(&scheduler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_time_events_keep_insertion_order_and_the_past_is_refused() {
        let mut q = EventQueue::default();
        q.push(Nanos(5), Event::StepDone).unwrap();
        q.push(Nanos(5), Event::Arrival(1)).unwrap();
        q.push(Nanos(3), Event::Arrival(7)).unwrap();
        q.push(Nanos(5), Event::Arrival(0)).unwrap();
        assert_eq!(q.pop(), Some((Nanos(3), Event::Arrival(7))));
        assert_eq!(q.pop(), Some((Nanos(5), Event::StepDone)));
        assert_eq!(q.pop(), Some((Nanos(5), Event::Arrival(1))));
        assert!(matches!(
            q.push(Nanos(4), Event::StepDone),
            Err(SimError::PastEvent { .. })
        ));
        assert_eq!(q.pop(), Some((Nanos(5), Event::Arrival(0))));
        assert_eq!(q.pop(), None);
    }
}
