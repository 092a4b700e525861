//! Model and adapter shapes, and the page geometry they imply.
//!
//! # Page geometry (unified paging, S-LoRA)
//!
//! The pool is a set of *page indices*. One index names, in every layer, one row of
//! `page_width` elements in the K-side buffer and one row of the same width in the V-side
//! buffer. A KV token of a request takes exactly one index (its K row and its V row).
//!
//! For multi-head models the KV row is `H` wide, so `page_width = H`, as in S-LoRA. For
//! grouped-query models (fewer KV heads than query heads) the KV row is only
//! `kv_heads * head_dim` wide. We choose `page_width = kv_heads * head_dim` so that KV, which
//! dominates the pool, wastes nothing; an adapter row wider than a page is split over
//! consecutive *slots* `ceil(width / page_width)`, which need not be contiguous pages: each
//! page index is independent. A rank-`r` adapter on a module `in -> out` stores `r` rows of
//! `A` (each `in` wide) on the K side and `r` rows of `B^T` (each `out` wide) on the V side of
//! the same indices, so it takes `r * max(ceil(in / w), ceil(out / w))` indices, where `w` is
//! the page width. For Llama-7B (MHA) on q,k,v,o that is `4r`, S-LoRA's figure; for Llama-3-8B
//! (GQA, w = 1024) a q_proj row of 4096 takes 4 indices, so q,k,v,o take `16r`. The pages an
//! adapter occupies are therefore often more bytes than its weights: both figures are
//! reported, `weight_bytes` (what a PEFT file holds) and `pages` (what it costs the pool).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of weights, KV cache and adapter rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[serde(alias = "float16", alias = "f16", alias = "half")]
    Fp16,
    #[serde(alias = "bfloat16", alias = "bf16")]
    Bf16,
}

impl DType {
    pub const fn bytes(self) -> u64 {
        match self {
            DType::Fp16 | DType::Bf16 => 2,
        }
    }
}

/// Errors in a model or adapter shape. Each names the field and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown model preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
    #[error("model `{model}`: field `{field}` {reason}")]
    InvalidModel {
        model: String,
        field: &'static str,
        reason: String,
    },
    #[error("adapter {adapter}: field `{field}` {reason}")]
    InvalidAdapter {
        adapter: u32,
        field: &'static str,
        reason: String,
    },
}

/// The shape of a Llama-family decoder, as in a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub intermediate_size: u32,
    pub vocab_size: u32,
    pub max_position: u32,
    pub rope_theta: f64,
    pub dtype: DType,
}

/// `(name, hidden, layers, heads, kv_heads, intermediate, vocab, max_position, rope_theta)`,
/// taken from each model's published `config.json`.
type PresetRow = (&'static str, u32, u32, u32, u32, u32, u32, u32, f64);
const PRESETS: &[PresetRow] = &[
    ("llama-7b", 4096, 32, 32, 32, 11008, 32000, 2048, 10_000.0),
    ("llama-13b", 5120, 40, 40, 40, 13824, 32000, 2048, 10_000.0),
    ("llama-30b", 6656, 60, 52, 52, 17920, 32000, 2048, 10_000.0),
    ("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, 10_000.0),
    (
        "llama-3-8b",
        4096,
        32,
        32,
        8,
        14336,
        128_256,
        8192,
        500_000.0,
    ),
    ("mistral-7b", 4096, 32, 32, 8, 14336, 32000, 32768, 10_000.0),
];

impl ModelSpec {
    /// Names of the built-in presets, in catalogue order.
    pub fn preset_names() -> impl Iterator<Item = &'static str> {
        PRESETS.iter().map(|row| row.0)
    }

    /// A preset by name (fp16).
    pub fn preset(name: &str) -> Result<ModelSpec, SpecError> {
        let row =
            PRESETS
                .iter()
                .find(|row| row.0 == name)
                .ok_or_else(|| SpecError::UnknownPreset {
                    name: name.to_string(),
                    known: Self::preset_names().collect::<Vec<_>>().join(", "),
                })?;
        let (name, hidden, layers, heads, kv_heads, inter, vocab, max_pos, theta) = *row;
        Ok(ModelSpec {
            name: name.to_string(),
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            intermediate_size: inter,
            vocab_size: vocab,
            max_position: max_pos,
            rope_theta: theta,
            dtype: DType::Fp16,
        })
    }

    /// Checks the shape is self-consistent (heads divide the hidden size, KV heads divide
    /// the heads, nothing is zero).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &'static str, reason: String| SpecError::InvalidModel {
            model: self.name.clone(),
            field,
            reason,
        };
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position", self.max_position),
        ] {
            if value == 0 {
                return Err(bad(field, "must be at least 1, got 0".into()));
            }
        }
        if self.hidden_size % self.num_heads != 0 {
            return Err(bad(
                "num_heads",
                format!(
                    "must divide hidden_size {}, got {}",
                    self.hidden_size, self.num_heads
                ),
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(bad(
                "num_kv_heads",
                format!(
                    "must divide num_heads {}, got {}",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(
                "rope_theta",
                format!("must be a positive number, got {}", self.rope_theta),
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> u32 {
        self.hidden_size / self.num_heads
    }

    /// Width of one token's K (or V) row in one layer.
    pub fn kv_width(&self) -> u32 {
        self.num_kv_heads * self.head_dim()
    }

    pub fn is_gqa(&self) -> bool {
        self.num_kv_heads < self.num_heads
    }

    /// Elements per page row (see the module doc): the KV row width.
    pub fn page_width(&self) -> u32 {
        self.kv_width()
    }

    /// Bytes one page index costs over all layers, K side and V side.
    pub fn page_bytes(&self) -> u64 {
        2 * self.num_layers as u64 * self.page_width() as u64 * self.dtype.bytes()
    }

    /// Bytes of KV cache per token over all layers (equal to `page_bytes`).
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.num_layers as u64 * self.kv_width() as u64 * self.dtype.bytes()
    }

    /// `(in, out)` of a projection.
    pub fn module_shape(&self, module: TargetModule) -> (u32, u32) {
        let (h, kv, i) = (self.hidden_size, self.kv_width(), self.intermediate_size);
        match module {
            TargetModule::Q | TargetModule::O => (h, h),
            TargetModule::K | TargetModule::V => (h, kv),
            TargetModule::Gate | TargetModule::Up => (h, i),
            TargetModule::Down => (i, h),
        }
    }

    /// Parameters of the base model (untied embeddings and LM head, as in Llama).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer: u64 = TargetModule::ALL
            .iter()
            .map(|&m| {
                let (i, o) = self.module_shape(m);
                i as u64 * o as u64
            })
            .sum::<u64>()
            + 2 * h;
        2 * self.vocab_size as u64 * h + self.num_layers as u64 * per_layer + h
    }

    pub fn weight_bytes(&self) -> u64 {
        self.parameter_count() * self.dtype.bytes()
    }
}

/// A projection that an adapter may target, named as PEFT names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TargetModule {
    #[serde(rename = "q_proj", alias = "q")]
    Q,
    #[serde(rename = "k_proj", alias = "k")]
    K,
    #[serde(rename = "v_proj", alias = "v")]
    V,
    #[serde(rename = "o_proj", alias = "o")]
    O,
    #[serde(rename = "gate_proj", alias = "gate")]
    Gate,
    #[serde(rename = "up_proj", alias = "up")]
    Up,
    #[serde(rename = "down_proj", alias = "down")]
    Down,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];
    pub const ATTENTION: [TargetModule; 4] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
    ];

    pub fn peft_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

/// Dense adapter id: adapters are registered with the engine up front and numbered
/// `0..n` in registration order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct AdapterId(pub u32);

impl fmt::Display for AdapterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "adapter#{}", self.0)
    }
}

/// A LoRA adapter's shape: rank and the projections it adapts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub rank: u32,
    pub targets: Vec<TargetModule>,
}

impl AdapterSpec {
    /// A rank-`rank` adapter on q, k, v and o, the setting of S-LoRA's experiments.
    pub fn attention(rank: u32) -> AdapterSpec {
        AdapterSpec {
            rank,
            targets: TargetModule::ATTENTION.to_vec(),
        }
    }

    /// Checks rank and targets against the model. `index` names the adapter in errors.
    pub fn validate(&self, model: &ModelSpec, index: u32) -> Result<(), SpecError> {
        let bad = |field: &'static str, reason: String| SpecError::InvalidAdapter {
            adapter: index,
            field,
            reason,
        };
        if self.rank == 0 {
            return Err(bad("rank", "must be at least 1, got 0".into()));
        }
        if self.rank > model.hidden_size {
            return Err(bad(
                "rank",
                format!(
                    "{} exceeds the hidden size {} of {}: a LoRA rank above H adds nothing",
                    self.rank, model.hidden_size, model.name
                ),
            ));
        }
        if self.targets.is_empty() {
            return Err(bad(
                "targets",
                "must name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj".into(),
            ));
        }
        let mut seen = self.targets.clone();
        seen.sort();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad("targets", format!("lists {} twice", w[0])));
        }
        Ok(())
    }

    /// Bytes of the adapter's weights over all layers (`A` and `B` of every target).
    pub fn weight_bytes(&self, model: &ModelSpec) -> u64 {
        let per_layer: u64 = self
            .targets
            .iter()
            .map(|&m| {
                let (i, o) = model.module_shape(m);
                self.rank as u64 * (i as u64 + o as u64)
            })
            .sum();
        per_layer * model.num_layers as u64 * model.dtype.bytes()
    }

    /// Page indices the adapter occupies in the unified pool (module doc).
    pub fn pages(&self, model: &ModelSpec) -> u64 {
        let w = model.page_width() as u64;
        self.targets
            .iter()
            .map(|&m| {
                let (i, o) = model.module_shape(m);
                let slots = (i as u64).div_ceil(w).max((o as u64).div_ceil(w));
                self.rank as u64 * slots
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_7b_sizes_match_the_design() {
        let m = ModelSpec::preset("llama-7b").unwrap();
        m.validate().unwrap();
        // One KV token = 512 KiB over all layers.
        assert_eq!(m.kv_bytes_per_token(), 512 * 1024);
        assert_eq!(m.page_bytes(), 512 * 1024);
        // A rank-r adapter on q,k,v,o = r * 2 MiB = 4r KV tokens.
        let a = AdapterSpec::attention(16);
        assert_eq!(a.weight_bytes(&m), 16 * 2 * 1024 * 1024);
        assert_eq!(a.pages(&m), 64);
        // 6.74 B parameters.
        let params = m.parameter_count();
        assert!((6_700_000_000..6_800_000_000).contains(&params), "{params}");
    }

    #[test]
    fn every_preset_is_valid_and_gqa_is_flagged() {
        for name in ModelSpec::preset_names() {
            let m = ModelSpec::preset(name).unwrap();
            m.validate().unwrap();
            assert_eq!(
                m.is_gqa(),
                matches!(name, "llama-2-70b" | "llama-3-8b" | "mistral-7b"),
                "{name}"
            );
        }
        let l70 = ModelSpec::preset("llama-2-70b").unwrap();
        assert!((68_000_000_000..70_000_000_000).contains(&l70.parameter_count()));
        assert_eq!(l70.kv_bytes_per_token(), 2 * 80 * 1024 * 2);
    }

    #[test]
    fn gqa_adapter_rows_span_several_pages() {
        let m = ModelSpec::preset("llama-3-8b").unwrap();
        assert_eq!(m.page_width(), 1024);
        let a = AdapterSpec::attention(8);
        // q,o: 4096 wide rows -> 4 slots; k,v: A rows 4096 wide -> 4 slots.
        assert_eq!(a.pages(&m), 8 * 16);
        // Bytes are what the PEFT file holds: q,o 2*(4096+4096), k,v 2*(4096+1024), per rank.
        assert_eq!(a.weight_bytes(&m), 8 * 32 * 2 * (2 * 8192 + 2 * 5120));
    }

    #[test]
    fn mlp_targets_are_sized_honestly() {
        let m = ModelSpec::preset("llama-7b").unwrap();
        let a = AdapterSpec {
            rank: 8,
            targets: vec![TargetModule::Gate, TargetModule::Up, TargetModule::Down],
        };
        // 11008-wide rows need ceil(11008 / 4096) = 3 slots each.
        assert_eq!(a.pages(&m), 8 * 9);
        assert_eq!(a.weight_bytes(&m), 8 * 3 * (4096 + 11008) * 32 * 2);
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let m = ModelSpec::preset("llama-7b").unwrap();
        let err = AdapterSpec::attention(0).validate(&m, 3).unwrap_err();
        assert!(err.to_string().contains("adapter 3: field `rank`"), "{err}");
        let err = AdapterSpec::attention(5000).validate(&m, 1).unwrap_err();
        assert!(
            err.to_string().contains("exceeds the hidden size 4096"),
            "{err}"
        );
        let dup = AdapterSpec {
            rank: 4,
            targets: vec![TargetModule::Q, TargetModule::Q],
        };
        assert!(dup
            .validate(&m, 0)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let mut bad = m.clone();
        bad.num_kv_heads = 5;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_kv_heads"));
        let err = ModelSpec::preset("gpt-5").unwrap_err();
        assert!(err.to_string().contains("llama-7b"), "{err}");
    }
}
