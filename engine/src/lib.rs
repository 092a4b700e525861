//! slora-engine: the one scheduling and memory core of slora-plan.
//!
//! The engine is a pure state machine: it holds no clock, no thread, no I/O and no device.
//! The discrete-event simulator and the live GPU executor are two drivers of it; both call
//! [`Scheduler::submit`], [`Scheduler::plan_step`] and [`Scheduler::complete_step`], and
//! both run the [`StepPlan`]s it returns through an [`Executor`]. Every policy decision is made
//! here, once, so a simulation predicts a live run of the same policy.
//!
//! Layers, mechanism first: [`pool`] (pages, O(1) free list) → [`adapter_cache`] (residency,
//! pins, LRU) → [`scheduler`] (admission, ordering, clustering, fairness, early abort).

pub mod adapter_cache;
pub mod config;
mod fairness;
pub mod plan;
pub mod pool;
pub mod request;
pub mod scheduler;
pub mod spec;
pub mod testing;
mod time;

pub use adapter_cache::{AdapterCache, AdapterStats, Residency};
pub use config::{
    Admission, ConfigError, EarlyAbort, EngineConfig, FairnessConfig, FairnessKey, QueueOrder,
    SchedulerConfig,
};
pub use plan::{
    AdapterLoad, ContextHistogram, DecodeStats, DecodeWork, Emitted, ExecError, Executor, PageSpan,
    PrefillWork, StepOutcome, StepPlan, StepReport,
};
pub use pool::{PageId, PageOwner, PoolLayout, PoolUsage};
pub use request::{AbortReason, Aborted, Finished, Reject, RequestId, RequestMeta, TenantId};
pub use scheduler::{EngineCounters, EngineError, Scheduler};
pub use spec::{AdapterId, AdapterSpec, DType, ModelSpec, SpecError, TargetModule};
pub use time::Nanos;
