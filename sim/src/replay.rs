//! A recorded live run's plans, made again: the step-by-step check of a cost model, and of
//! the executor against itself.
//!
//! A live run's `steps.csv` has one row per step but not the batch's whole shape (the context
//! of every request, the ranks of its adapters). The engine is deterministic, so replaying the
//! same arrivals through the live driver on a [`VirtualClock`], with every step reported as
//! lasting exactly as long as it did live (from its recorded start to the next one's, host
//! work between steps included), makes the same plans at the same instants. Each plan is
//! also handed to an inner [`Backend`]: one that does nothing (the cost model's check) or
//! the GPU executor (the same plans run again back to back, to see which part of a step a
//! cost model misprices, and whether a step's time is reproducible at all).
//!
//! The engine's pool is set to the one the live run planned with (the sum of `kv_pages`,
//! `adapter_pages` and `free_pages` in its first row): the GPU that served it may have held
//! a different number of pages than the scenario asks for, and a different pool makes
//! different plans.

use crate::cost::BatchShape;
use crate::des::SimError;
use crate::live::{serve, Backend, LiveError, VirtualClock};
use crate::recorder::Recorder;
use crate::scenario::RunSetup;
use slora_engine::{ExecError, Executor, Nanos, RequestId, RequestMeta, StepPlan, StepReport};

/// One row of a live run's `steps.csv`: what the replay needs of it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedStep {
    pub start_s: f64,
    pub duration_s: f64,
    pub prefill_tokens: u32,
    pub decode_requests: u32,
    pub loads: u32,
    /// `kv_pages + adapter_pages + free_pages`: the pool the engine planned with.
    pub pool_pages: u64,
}

impl RecordedStep {
    /// Whether the live driver ran this plan on the executor (compute or adapter loads);
    /// plans that only abort requests are recorded with no executor call behind them.
    pub fn ran_on_executor(&self) -> bool {
        self.prefill_tokens > 0 || self.decode_requests > 0 || self.loads > 0
    }
}

/// Why a recording could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{origin}: {reason}")]
    Steps { origin: String, reason: String },
    #[error("{origin}: the run planned with a pool of {recorded} pages; {reason}")]
    Pool {
        origin: String,
        recorded: u64,
        reason: String,
    },
    #[error("{0}")]
    Live(#[from] LiveError),
}

const COLUMNS: [&str; 7] = [
    "start_s",
    "duration_s",
    "prefill_tokens",
    "decode_requests",
    "loads",
    "kv_pages",
    "adapter_pages",
];

/// Parses a `steps.csv` written by the recorder. `origin` (the file's name) is in every
/// error, with the line and the column at fault.
pub fn parse_steps_csv(text: &str, origin: &str) -> Result<Vec<RecordedStep>, ReplayError> {
    let err = |reason: String| ReplayError::Steps {
        origin: origin.to_string(),
        reason,
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| err("empty file: no header row".into()))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            err(format!(
                "no column `{name}` in the header (a live run's steps.csv has {})",
                COLUMNS.join(", ") + ", free_pages"
            ))
        })
    };
    let [start, duration, prefill, decode, loads, kv, adapter] = COLUMNS.map(col);
    let (start, duration, prefill, decode, loads, kv, adapter) =
        (start?, duration?, prefill?, decode?, loads?, kv?, adapter?);
    let free = col("free_pages")?;
    let mut steps = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        let line_no = i + 2;
        let num = |c: usize| -> Result<f64, ReplayError> {
            let cell = cells.get(c).copied().unwrap_or("");
            cell.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    err(format!(
                        "line {line_no}, column `{}`: `{cell}` is not a non-negative number",
                        header[c]
                    ))
                })
        };
        let whole = |c: usize| -> Result<u64, ReplayError> {
            let v = num(c)?;
            if v.fract() != 0.0 {
                return Err(err(format!(
                    "line {line_no}, column `{}`: {v} is not a whole number",
                    header[c]
                )));
            }
            Ok(v as u64)
        };
        steps.push(RecordedStep {
            start_s: num(start)?,
            duration_s: num(duration)?,
            prefill_tokens: whole(prefill)? as u32,
            decode_requests: whole(decode)? as u32,
            loads: whole(loads)? as u32,
            pool_pages: whole(kv)? + whole(adapter)? + whole(free)?,
        });
        if let [.., before, last] = steps.as_slice() {
            if last.start_s < before.start_s {
                return Err(err(format!(
                    "line {line_no}: start_s {} is before the previous step's {}",
                    last.start_s, before.start_s
                )));
            }
        }
    }
    if steps.is_empty() {
        return Err(err("no steps after the header".into()));
    }
    Ok(steps)
}

/// One replayed step that matches a recorded one.
pub struct ReplayedStep<'a> {
    /// Row of `steps.csv` (0-based, header excluded).
    pub index: usize,
    pub recorded: &'a RecordedStep,
    /// From the recorded start to the next recorded start (at least the step's duration):
    /// the time the replay lets pass.
    pub span_s: f64,
    pub plan: &'a StepPlan,
    pub shape: &'a BatchShape,
    /// What the inner backend reported for it.
    pub executed: Nanos,
    /// The replayed plan's prompt tokens or decode rows differ from the recorded step's:
    /// the replay has drifted from the run.
    pub drifted: bool,
}

/// How a replay went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Recorded steps that ran on the executor.
    pub recorded: usize,
    /// Of them, how many the replay made again.
    pub replayed: usize,
    /// Replayed steps whose prompt tokens or decode rows differ from the recording.
    pub drifted: usize,
    /// Plans the replay made beyond the recording (each given the cost model's time).
    pub beyond: usize,
}

/// The inner backend, wrapped so that each step reports its recorded span.
struct Replaying<'a, 'r> {
    setup: &'a RunSetup,
    inner: &'a mut dyn Backend,
    recorded: &'r [RecordedStep],
    /// Indices of `recorded` that ran on the executor, in order.
    work: Vec<usize>,
    next: usize,
    summary: ReplaySummary,
    on_step: &'a mut dyn FnMut(&ReplayedStep<'_>),
}

impl Executor for Replaying<'_, '_> {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
        let executed = self.inner.execute(plan)?.elapsed;
        let shape = BatchShape::from_plan(plan, &self.setup.ranks);
        let Some(&i) = self.work.get(self.next) else {
            self.summary.beyond += 1;
            return Ok(StepReport {
                step: plan.step,
                elapsed: self.setup.cost.step_cost(&shape).total(),
            });
        };
        self.next += 1;
        let r = &self.recorded[i];
        let drifted = r.prefill_tokens != plan.prefill_tokens()
            || r.decode_requests != plan.decode.len() as u32;
        self.summary.replayed += 1;
        self.summary.drifted += usize::from(drifted);
        let span_s = self
            .recorded
            .get(i + 1)
            .map_or(r.duration_s, |n| (n.start_s - r.start_s).max(r.duration_s));
        (self.on_step)(&ReplayedStep {
            index: i,
            recorded: r,
            span_s,
            plan,
            shape: &shape,
            executed,
            drifted,
        });
        Ok(StepReport {
            step: plan.step,
            elapsed: Nanos::from_secs_f64(span_s),
        })
    }
}

impl Backend for Replaying<'_, '_> {
    fn admit(&mut self, index: usize, meta: &RequestMeta) -> Result<(), String> {
        self.inner.admit(index, meta)
    }
    fn release(&mut self, id: RequestId) {
        self.inner.release(id)
    }
}

/// Sets `setup`'s pool to the one the recorded run planned with. Fails when `limit` (the
/// pages the replaying executor holds) is smaller.
pub fn use_recorded_pool(
    setup: &mut RunSetup,
    recorded: &[RecordedStep],
    limit: Option<u64>,
    origin: &str,
) -> Result<(), ReplayError> {
    let pages = recorded.first().map_or(0, |r| r.pool_pages);
    let pool_err = |reason: String| ReplayError::Pool {
        origin: origin.to_string(),
        recorded: pages,
        reason,
    };
    if let Some(r) = recorded.iter().find(|r| r.pool_pages != pages) {
        return Err(pool_err(format!(
            "a later row (start_s {}) sums to {} pages: not one run's steps.csv",
            r.start_s, r.pool_pages
        )));
    }
    if let Some(limit) = limit.filter(|&l| l < pages) {
        return Err(pool_err(format!(
            "this GPU's pool holds only {limit} (free more memory or raise memory.utilization)"
        )));
    }
    setup.engine.pool_pages = u32::try_from(pages)
        .map_err(|_| pool_err("more than a u32 of pages".into()))?
        .max(1);
    Ok(())
}

/// Replays `recorded` (a live run of `setup`'s scenario) through the live driver, each plan
/// run on `inner` and reported to `on_step`. Call [`use_recorded_pool`] first.
pub fn replay(
    setup: &RunSetup,
    recorded: &[RecordedStep],
    inner: &mut dyn Backend,
    on_step: &mut dyn FnMut(&ReplayedStep<'_>),
) -> Result<ReplaySummary, ReplayError> {
    let work: Vec<usize> = (0..recorded.len())
        .filter(|&i| recorded[i].ran_on_executor())
        .collect();
    let mut backend = Replaying {
        setup,
        inner,
        recorded,
        summary: ReplaySummary {
            recorded: work.len(),
            ..ReplaySummary::default()
        },
        work,
        next: 0,
        on_step,
    };
    let recorder = Recorder::new(setup, setup.cost.as_ref());
    serve(
        setup,
        recorder,
        &mut backend,
        &mut VirtualClock::default(),
        None,
        None,
    )?;
    Ok(backend.summary)
}

/// A backend that runs nothing (each step takes no time of its own): replays for the cost
/// model's check, without a GPU.
#[derive(Default)]
pub struct NoBackend;

impl Executor for NoBackend {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError> {
        Ok(StepReport {
            step: plan.step,
            elapsed: Nanos::ZERO,
        })
    }
}

impl Backend for NoBackend {
    fn admit(&mut self, _index: usize, _meta: &RequestMeta) -> Result<(), String> {
        Ok(())
    }
    fn release(&mut self, _id: RequestId) {}
}

impl From<SimError> for ReplayError {
    fn from(e: SimError) -> Self {
        ReplayError::Live(LiveError::Sim(e))
    }
}
