//! Engine configuration: every policy is chosen here, and nothing else in the engine reads
//! settings from anywhere. `EngineConfig::validate` is the one place that judges user values.

use crate::pool::PoolLayout;
use crate::spec::{AdapterSpec, ModelSpec, SpecError};
use crate::time::Nanos;
use serde::{Deserialize, Serialize};

/// A configuration value that cannot work: names the field and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// How requests are admitted to the running batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// S-LoRA: admit only if the request's worst-case KV pages (prompt + all output) plus the
    /// pages of an adapter it must load fit beside what running requests may still claim.
    /// Never preempts.
    #[default]
    Conservative,
    /// Admit when the pages needed *now* fit; when a later step runs out of pages, preempt
    /// the running requests that arrived last and recompute them later (vLLM's default).
    Optimistic,
}

/// The order in which waiting requests are considered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueOrder {
    /// First come, first served (by submission order).
    #[default]
    Fcfs,
    /// Virtual token counter fairness: the backlogged client with the least weighted
    /// service goes first (Sheng et al., "Fairness in Serving Large Language Models").
    Vtc,
}

/// Whose service the fairness counters measure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FairnessKey {
    #[default]
    Adapter,
    Tenant,
}

/// Virtual token counter settings (used when `order` is `vtc`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FairnessConfig {
    pub key: FairnessKey,
    /// Cost of one prompt token in the counter.
    pub input_weight: f64,
    /// Cost of one output token in the counter (the VTC paper uses 2: decode costs more).
    pub output_weight: f64,
    /// Per-client weights `(client id, weight)`; a client with weight 2 gets twice the
    /// service of one with weight 1 when both are backlogged. Unlisted clients weigh 1.
    /// With `key: adapter` the client id is the adapter id.
    pub weights: Vec<(u32, f64)>,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        FairnessConfig {
            key: FairnessKey::Adapter,
            input_weight: 1.0,
            output_weight: 2.0,
            weights: Vec::new(),
        }
    }
}

/// Early abort: drop waiting requests whose first token can no longer arrive in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyAbort {
    /// The first-token SLO: a request's deadline is `arrival + ttft_slo`.
    pub ttft_slo: Nanos,
    /// The least time a first token can take once a request is admitted (one prefill step).
    /// A waiting request is dropped when `now + min_time_to_first_token > deadline`.
    /// S-LoRA uses 0.5 s.
    pub min_time_to_first_token: Nanos,
    /// Under overload, admit the newest waiting requests first (S-LoRA's abort queue), so
    /// that the requests that can still make their deadline are the ones served.
    pub newest_first_under_overload: bool,
}

/// Scheduler policies and knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub admission: Admission,
    pub order: QueueOrder,
    /// Most requests in the running batch.
    pub max_batch_size: u32,
    /// Most prompt tokens prefilled in one step. Too small starves new requests (TTFT grows);
    /// too large makes decode steps that carry a prefill slow (TPOT spikes).
    pub max_prefill_tokens: u32,
    /// Split prompts longer than the remaining budget over several steps. Without it a prompt
    /// longer than `max_prefill_tokens` is rejected.
    pub chunked_prefill: bool,
    /// Prefer waiting requests whose adapter is already in the batch, then those whose adapter
    /// is on the device, over strict queue order (adapter clustering).
    pub clustering: bool,
    /// Most distinct adapters in one batch; `None` = no cap.
    pub max_adapters_per_batch: Option<u32>,
    /// How often clustering may pass over the request at the head of the queue before it must
    /// be served: bounds the starvation clustering can cause.
    pub max_bypass: u32,
    /// How many waiting requests the policies look at to choose the next one.
    pub lookahead: u32,
    pub fairness: FairnessConfig,
    pub early_abort: Option<EarlyAbort>,
    /// Start loading the adapters of this many upcoming waiting requests while the current
    /// step computes (only into pages nobody else may claim).
    pub prefetch_depth: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            admission: Admission::Conservative,
            order: QueueOrder::Fcfs,
            max_batch_size: 256,
            max_prefill_tokens: 4096,
            chunked_prefill: false,
            clustering: false,
            max_adapters_per_batch: None,
            max_bypass: 16,
            lookahead: 64,
            fairness: FairnessConfig::default(),
            early_abort: None,
            prefetch_depth: 8,
        }
    }
}

/// Everything the engine needs: the model, the adapter population, the pool and the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub model: ModelSpec,
    /// Adapters, numbered by position (`AdapterId(i)` is `adapters[i]`).
    pub adapters: Vec<AdapterSpec>,
    /// Pages in the pool (see `spec` for what one page holds).
    pub pool_pages: u32,
    pub pool_layout: PoolLayout,
    pub scheduler: SchedulerConfig,
}

/// Largest tenant id the fairness counters index (they are a dense vector).
pub const MAX_TENANT_ID: u32 = 1 << 20;

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        for (i, a) in self.adapters.iter().enumerate() {
            a.validate(&self.model, i as u32)?;
        }
        if self.adapters.len() > u32::MAX as usize / 2 {
            return Err(ConfigError::invalid("adapters", "too many adapters"));
        }
        let largest = self
            .adapters
            .iter()
            .map(|a| a.pages(&self.model))
            .max()
            .unwrap_or(0);
        match self.pool_layout {
            PoolLayout::Unified => {
                if (self.pool_pages as u64) <= largest {
                    return Err(ConfigError::invalid(
                        "pool_pages",
                        format!(
                            "the pool of {} pages cannot hold the largest adapter ({largest} pages) \
                             and one token of KV",
                            self.pool_pages
                        ),
                    ));
                }
            }
            PoolLayout::Separate { adapter_pages } => {
                if (adapter_pages as u64) < largest {
                    return Err(ConfigError::invalid(
                        "pool_layout.adapter_pages",
                        format!(
                            "the adapter region of {adapter_pages} pages is smaller than the \
                             largest adapter ({largest} pages)"
                        ),
                    ));
                }
                if adapter_pages >= self.pool_pages {
                    return Err(ConfigError::invalid(
                        "pool_layout.adapter_pages",
                        format!(
                            "the adapter region of {adapter_pages} pages leaves no KV pages in a \
                             pool of {}",
                            self.pool_pages
                        ),
                    ));
                }
            }
        }
        if self.pool_pages == 0 {
            return Err(ConfigError::invalid(
                "pool_pages",
                "must be at least 1, got 0",
            ));
        }
        self.scheduler.validate()
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("scheduler.max_batch_size", self.max_batch_size),
            ("scheduler.max_prefill_tokens", self.max_prefill_tokens),
            ("scheduler.lookahead", self.lookahead),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::invalid(field, "must be at least 1, got 0"));
            }
        }
        if self.max_adapters_per_batch == Some(0) {
            return Err(ConfigError::invalid(
                "scheduler.max_adapters_per_batch",
                "must be at least 1 (omit it for no cap), got 0",
            ));
        }
        let f = &self.fairness;
        for (field, w) in [
            ("scheduler.fairness.input_weight", f.input_weight),
            ("scheduler.fairness.output_weight", f.output_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be a finite number >= 0, got {w}"),
                ));
            }
        }
        for &(client, w) in &f.weights {
            if !(w.is_finite() && w > 0.0) {
                return Err(ConfigError::invalid(
                    "scheduler.fairness.weights",
                    format!("weight of client {client} must be a finite number > 0, got {w}"),
                ));
            }
            if client > MAX_TENANT_ID {
                return Err(ConfigError::invalid(
                    "scheduler.fairness.weights",
                    format!("client id {client} is above the largest supported id {MAX_TENANT_ID}"),
                ));
            }
        }
        if let Some(ea) = self.early_abort {
            if ea.ttft_slo == Nanos::ZERO {
                return Err(ConfigError::invalid(
                    "scheduler.early_abort.ttft_slo",
                    "must be greater than 0",
                ));
            }
        }
        Ok(())
    }
}
