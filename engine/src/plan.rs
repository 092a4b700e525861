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
    /// How the KV rows read (`context_len + 1`) are spread over the decode requests, so a cost
    /// model can see a skewed batch (a few long contexts among many short ones) and not only
    /// its mean.
    pub context_histogram: ContextHistogram,
    /// The decode requests with an adapter by rank (the same power-of-two buckets, each with
    /// its rank sum), and the largest rank: the MBGMV kernels' time depends on the mix of
    /// ranks, not only on their mean (a batch's highest-rank blocks finish last).
    #[serde(default)]
    pub rank_histogram: ContextHistogram,
    #[serde(default)]
    pub max_rank: u32,
}

/// Decode requests by KV rows read (or, as `DecodeStats::rank_histogram`, by adapter rank),
/// in power-of-two buckets: bucket `b` holds `rows` in
/// `[2^b, 2^(b+1))`, the last bucket everything from `2^15` = 32,768 rows up. Each bucket keeps
/// its count and the sum of its rows, so its mean is exact and, for any cost affine in the
/// context, the histogram loses nothing.
///
/// Fixed size (192 bytes, no allocation); [`ContextHistogram::add`] is O(1): a
/// `leading_zeros` and two additions, cheap enough for the scheduler's per-request loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextHistogram {
    /// Requests per bucket.
    pub counts: [u32; ContextHistogram::BUCKETS],
    /// Sum of the rows of the bucket's requests.
    pub rows: [u64; ContextHistogram::BUCKETS],
}

impl ContextHistogram {
    pub const BUCKETS: usize = 16;

    /// The bucket of a request reading `rows` KV rows (0 and 1 both go to bucket 0).
    pub fn bucket(rows: u32) -> usize {
        let log2 = 31 - (rows | 1).leading_zeros() as usize;
        log2.min(Self::BUCKETS - 1)
    }

    /// Counts one request reading `rows` KV rows.
    pub fn add(&mut self, rows: u32) {
        let b = Self::bucket(rows);
        self.counts[b] += 1;
        self.rows[b] += rows as u64;
    }

    /// Requests counted.
    pub fn requests(&self) -> u32 {
        self.counts.iter().sum()
    }

    /// Rows counted over all requests.
    pub fn total_rows(&self) -> u64 {
        self.rows.iter().sum()
    }

    /// `(requests, mean rows)` of each non-empty bucket, shortest contexts first.
    pub fn buckets(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        self.counts
            .iter()
            .zip(&self.rows)
            .filter(|(&n, _)| n > 0)
            .map(|(&n, &rows)| (n, rows as f64 / n as f64))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_histogram_buckets_by_power_of_two() {
        assert_eq!(ContextHistogram::bucket(0), 0);
        assert_eq!(ContextHistogram::bucket(1), 0);
        assert_eq!(ContextHistogram::bucket(2), 1);
        assert_eq!(ContextHistogram::bucket(3), 1);
        assert_eq!(ContextHistogram::bucket(4), 2);
        assert_eq!(ContextHistogram::bucket(32_767), 14);
        assert_eq!(ContextHistogram::bucket(32_768), 15);
        assert_eq!(ContextHistogram::bucket(u32::MAX), 15);
        let mut h = ContextHistogram::default();
        for rows in [10, 12, 15, 1000, 100_000] {
            h.add(rows);
        }
        assert_eq!(h.requests(), 5);
        assert_eq!(h.total_rows(), 101_037);
        let buckets: Vec<(u32, f64)> = h.buckets().collect();
        assert_eq!(buckets, vec![(3, 37.0 / 3.0), (1, 1000.0), (1, 100_000.0)]);
    }
}
