//! What the scheduler decides each iteration (`StepPlan`), what the driver reports back
//! (`StepReport`), and the seam both drivers implement (`Executor`).
//!
//! A plan carries *deltas*: the pages newly assigned this step. An executor that needs a
//! request's whole page table (the GPU one does, for attention) keeps its own copy, appending
//! the pages of each step and dropping a request's table when it finishes, is preempted or
//! is aborted. Sending deltas keeps planning O(batch), whatever the context lengths.

use crate::pool::{PageId, PoolUsage};
use crate::request::{Aborted, Finished, RequestId};
use crate::spec::AdapterId;
use crate::time::Nanos;
use serde::{Deserialize, Serialize};

/// A range of `StepPlan::pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSpan {
    pub start: u32,
    pub len: u32,
}

/// Prompt tokens of one request processed this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillWork {
    pub request: RequestId,
    pub adapter: Option<AdapterId>,
    /// KV rows the request already holds (non-zero for the later chunks of a chunked prefill).
    pub context_start: u32,
    /// Tokens processed this step; their KV rows go to `pages`, in order.
    pub tokens: u32,
    pub pages: PageSpan,
    /// Whether this chunk completes the prompt, so the step samples a token for the request.
    pub emits_token: bool,
}

/// One decode token of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeWork {
    pub request: RequestId,
    pub adapter: Option<AdapterId>,
    /// KV rows before this step; the new row (for the last sampled token) is written to `page`
    /// and attention runs over `context_len + 1` rows.
    pub context_len: u32,
    pub page: PageId,
}

/// A host-to-device copy of an adapter's weights into pool pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterLoad {
    pub adapter: AdapterId,
    pub rank: u32,
    pub bytes: u64,
    pub pages: PageSpan,
    /// A request in this step uses the adapter, so compute waits for the copy. Otherwise it
    /// is a prefetch for a waiting request and overlaps compute. Either way it completes by
    /// the end of the step.
    pub blocking: bool,
}

/// One iteration, decided by the scheduler, to be run exactly as stated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub step: u64,
    pub prefill: Vec<PrefillWork>,
    pub decode: Vec<DecodeWork>,
    /// Adapters whose pages were taken back (before any load or KV write of this step).
    pub evictions: Vec<AdapterId>,
    pub loads: Vec<AdapterLoad>,
    /// Pages referenced by `PrefillWork::pages` and `AdapterLoad::pages`.
    pub pages: Vec<PageId>,
    /// Waiting requests dropped by early abort; they have ended.
    pub aborted: Vec<Aborted>,
    /// Running requests sent back to the queue (optimistic admission); their pages are free
    /// and their KV must be recomputed when they are admitted again.
    pub preempted: Vec<RequestId>,
    /// Pool counters after this plan's allocations.
    pub pool: PoolUsage,
    /// Requests left waiting after this plan.
    pub waiting: u32,
    /// Distinct adapters used by running requests, and the sum of their ranks.
    pub distinct_adapters: u32,
    pub distinct_rank_sum: u64,
    /// Aggregates of `decode`, gathered while planning so a cost model need not walk it.
    pub decode_stats: DecodeStats,
}

/// Sums over a plan's decode work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeStats {
    /// KV rows attention reads: `context_len + 1` per decode request.
    pub context_tokens: u64,
    pub max_context: u32,
    /// Decode requests that use an adapter, and the sum of those adapters' ranks.
    pub lora_requests: u32,
    pub lora_rank_sum: u64,
}

impl StepPlan {
    pub fn pages_of(&self, span: PageSpan) -> &[PageId] {
        &self.pages[span.start as usize..(span.start + span.len) as usize]
    }

    /// Whether the step runs the model at all (a plan may only abort or prefetch).
    pub fn has_compute(&self) -> bool {
        !self.prefill.is_empty() || !self.decode.is_empty()
    }

    pub fn prefill_tokens(&self) -> u32 {
        self.prefill.iter().map(|p| p.tokens).sum()
    }

    /// Requests that compute this step.
    pub fn batch_size(&self) -> u32 {
        (self.prefill.len() + self.decode.len()) as u32
    }
}

/// What a driver reports after running a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    /// Wall (or simulated) time the step took, loads included.
    pub elapsed: Nanos,
}

/// A token that became available to a request's client when a step completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emitted {
    pub request: RequestId,
    pub adapter: Option<AdapterId>,
    /// 0 for the first token.
    pub token_index: u32,
}

/// The consequences of a completed step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub step: u64,
    pub emitted: Vec<Emitted>,
    pub finished: Vec<Finished>,
}

/// Why an executor could not run a plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error("device error in step {step}: {message}")]
    Device { step: u64, message: String },
    #[error("step {step} cannot be executed: {reason}")]
    InvalidPlan { step: u64, reason: String },
}

/// The seam between the engine and the world: the simulator's cost model and the GPU
/// executor both implement it, and both run the plans the same scheduler makes.
pub trait Executor {
    /// Run one iteration exactly as planned; report how long it took.
    fn execute(&mut self, plan: &StepPlan) -> Result<StepReport, ExecError>;
}
