//! What a request is to the engine: a few integers. Its text, its tokens and its timestamps
//! for metrics live with the drivers.

use crate::spec::AdapterId;
use crate::time::Nanos;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A request id chosen by the driver; unique among live requests.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request#{}", self.0)
    }
}

/// A tenant (customer) for fairness accounting, when fairness is keyed by tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub u32);

/// A request as submitted. Output lengths are known in advance (EOS is ignored, as in
/// S-LoRA's experiments), so the simulator and the executor process the same tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMeta {
    pub id: RequestId,
    /// `None` runs the base model alone.
    pub adapter: Option<AdapterId>,
    pub tenant: Option<TenantId>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

impl RequestMeta {
    /// A request in one line, for tests and examples.
    pub fn new(id: u64, adapter: Option<u32>, prompt_tokens: u32, output_tokens: u32) -> Self {
        RequestMeta {
            id: RequestId(id),
            adapter: adapter.map(AdapterId),
            tenant: None,
            prompt_tokens,
            output_tokens,
        }
    }

    pub fn with_tenant(mut self, tenant: u32) -> Self {
        self.tenant = Some(TenantId(tenant));
        self
    }

    /// KV rows the request holds at its largest: the prompt and every output token but the
    /// last, whose KV is never written.
    pub fn worst_case_pages(&self) -> u64 {
        self.prompt_tokens as u64 + self.output_tokens as u64 - 1
    }
}

/// Why `submit` refused a request. A rejected request has ended: it is reported, not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Reject {
    #[error("{id}: prompt is empty")]
    EmptyPrompt { id: RequestId },
    #[error("{id}: output_tokens is 0; a request generates at least one token")]
    NoOutput { id: RequestId },
    #[error("{id}: unknown {adapter}; the engine has {registered} adapters (ids 0..{registered})")]
    UnknownAdapter {
        id: RequestId,
        adapter: AdapterId,
        registered: u32,
    },
    #[error("{id}: id is already in use by a live request")]
    DuplicateId { id: RequestId },
    #[error(
        "{id}: needs {needed} pages (KV at its longest plus its adapter) but the pool can give a \
         request at most {capacity}"
    )]
    TooLarge {
        id: RequestId,
        needed: u64,
        capacity: u64,
    },
    #[error(
        "{id}: prompt of {prompt} tokens exceeds the prefill budget of {budget} tokens and \
         chunked prefill is off"
    )]
    PromptExceedsBudget {
        id: RequestId,
        prompt: u32,
        budget: u32,
    },
    #[error("{id}: tenant {tenant} is above the largest supported tenant id {max}")]
    TenantOutOfRange {
        id: RequestId,
        tenant: u32,
        max: u32,
    },
}

impl Reject {
    /// A stable label for metrics and reports.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::EmptyPrompt { .. } => "empty_prompt",
            Reject::NoOutput { .. } => "no_output",
            Reject::UnknownAdapter { .. } => "unknown_adapter",
            Reject::DuplicateId { .. } => "duplicate_id",
            Reject::TooLarge { .. } => "too_large",
            Reject::PromptExceedsBudget { .. } => "prompt_exceeds_budget",
            Reject::TenantOutOfRange { .. } => "tenant_out_of_range",
        }
    }
}

/// Why the engine gave up on a queued request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortReason {
    /// Its first token could no longer arrive within the TTFT SLO (early abort).
    TtftSloUnreachable,
}

/// A request the engine dropped before serving it fully.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aborted {
    pub request: RequestId,
    pub adapter: Option<AdapterId>,
    pub reason: AbortReason,
    pub arrival: Nanos,
}

/// A request that generated all of its output tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub request: RequestId,
    pub adapter: Option<AdapterId>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub arrival: Nanos,
    /// Times it was preempted and recomputed (optimistic admission only).
    pub preemptions: u32,
}
