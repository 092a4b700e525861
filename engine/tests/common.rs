// Shared builders for the engine's integration tests (included with `mod common;`).
#![allow(dead_code)]

use slora_engine::*;

/// A small Llama-shaped model: page width 64, so a rank-r q,k,v,o adapter takes 4r pages.
pub fn tiny_model() -> ModelSpec {
    ModelSpec {
        name: "tiny".into(),
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 4,
        intermediate_size: 128,
        vocab_size: 256,
        max_position: 4096,
        rope_theta: 10_000.0,
        dtype: DType::Fp16,
    }
}

pub fn config(adapter_ranks: &[u32], pool_pages: u32, scheduler: SchedulerConfig) -> EngineConfig {
    EngineConfig {
        model: tiny_model(),
        adapters: adapter_ranks
            .iter()
            .map(|&r| AdapterSpec::attention(r))
            .collect(),
        pool_pages,
        pool_layout: PoolLayout::Unified,
        scheduler,
    }
}

pub fn ms(v: u64) -> Nanos {
    Nanos::from_millis(v)
}

pub fn fake() -> testing::FakeExecutor {
    testing::FakeExecutor::new(ms(10), Nanos::from_micros(10))
}
