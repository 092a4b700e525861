//! Host-side model and adapter weights: Hugging Face Llama checkpoints, PEFT LoRA adapters, and
//! seeded synthetic adapters. No CUDA here; the executor uploads what this module returns.
//!
//! # What is accepted
//!
//! * A Llama-family `config.json` (transformers 4.x or 5.x spellings: `torch_dtype` or `dtype`,
//!   top-level `rope_theta` or `rope_parameters.rope_theta`) in float16 or bfloat16, SiLU, no
//!   biases, default RoPE (any other `rope_type` is refused rather than run wrongly), and
//!   `head_dim == hidden_size / num_attention_heads` (the only head size [`ModelSpec`] expresses).
//! * Weights in `model.safetensors`, or sharded through `model.safetensors.index.json`. Every
//!   tensor must have the config's dtype and the exact Llama shape; extra tensors are ignored.
//! * PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), plain LoRA only
//!   (no DoRA, biases, per-module ranks or layer subsets), adapting every layer.
//!
//! # Element type
//!
//! Everything is held as `half::f16`, the executor's element type. A **bfloat16 checkpoint is
//! converted to float16 on load** (round to nearest even); its [`LlamaWeights::source_dtype`]
//! stays `Bf16` so reports can say so. bf16 has 8 bits of mantissa and f16 has 11, so the
//! conversion loses nothing for values in f16's normal range (about 6.1e-5..65504); smaller
//! magnitudes lose bits as f16 subnormals, and a value beyond 65504 is an error rather than an
//! infinity. Adapter tensors, which peft 0.21 saves as float32 even for an fp16 base, are rounded
//! to f16 the same way; a non-finite value anywhere is an error naming the tensor.
//!
//! # Errors
//!
//! Bad files never panic: each problem is an [`Error::File`] (the file as a whole) or an
//! [`Error::Tensor`] (one tensor: its name, the expected and the found shape or dtype).
//!
//! Loading reads each safetensors file whole (`std::fs::read`; no memory map), one shard at a
//! time, so peak host memory is the weights plus one shard.

use crate::error::{Error, Result};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use slora_engine::spec::{AdapterSpec, DType, ModelSpec, TargetModule};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// What `config.json` says beyond the [`ModelSpec`] shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaExtras {
    /// RMSNorm epsilon (`rms_norm_eps`, default 1e-6 as in transformers' `LlamaConfig`).
    pub rms_norm_eps: f32,
    /// `lm_head` shares `embed_tokens` (`tie_word_embeddings`, default false).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (`eos_token_id` may be one id or a list). Serving ignores EOS, as
    /// S-LoRA's experiments do; this is for reports.
    pub eos_token_ids: Vec<u32>,
}

/// One decoder layer's weights, row-major in the Hugging Face `[out, in]` layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    /// `[H]`
    pub input_layernorm: Vec<f16>,
    /// `[nh*d, H]`
    pub q_proj: Vec<f16>,
    /// `[nkv*d, H]`
    pub k_proj: Vec<f16>,
    /// `[nkv*d, H]`
    pub v_proj: Vec<f16>,
    /// `[H, nh*d]`
    pub o_proj: Vec<f16>,
    /// `[H]`
    pub post_attention_layernorm: Vec<f16>,
    /// `[I, H]`
    pub gate_proj: Vec<f16>,
    /// `[I, H]`
    pub up_proj: Vec<f16>,
    /// `[H, I]`
    pub down_proj: Vec<f16>,
}

impl LayerWeights {
    /// The weight of a projection, `[out, in]` as [`ModelSpec::module_shape`] gives `(in, out)`.
    pub fn projection(&self, module: TargetModule) -> &[f16] {
        match module {
            TargetModule::Q => &self.q_proj,
            TargetModule::K => &self.k_proj,
            TargetModule::V => &self.v_proj,
            TargetModule::O => &self.o_proj,
            TargetModule::Gate => &self.gate_proj,
            TargetModule::Up => &self.up_proj,
            TargetModule::Down => &self.down_proj,
        }
    }

    fn projection_mut(&mut self, module: TargetModule) -> &mut Vec<f16> {
        match module {
            TargetModule::Q => &mut self.q_proj,
            TargetModule::K => &mut self.k_proj,
            TargetModule::V => &mut self.v_proj,
            TargetModule::O => &mut self.o_proj,
            TargetModule::Gate => &mut self.gate_proj,
            TargetModule::Up => &mut self.up_proj,
            TargetModule::Down => &mut self.down_proj,
        }
    }
}

/// A Llama model's weights on the host, as f16 (see the module doc for bf16 checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    /// The checkpoint's dtype before conversion to f16.
    pub source_dtype: DType,
    /// `[V, H]`
    pub embed_tokens: Vec<f16>,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[H]`.
    pub norm: Vec<f16>,
    /// `[V, H]`; `None` when tied to `embed_tokens` (use [`LlamaWeights::lm_head`]).
    pub lm_head: Option<Vec<f16>>,
}

impl LlamaWeights {
    /// The LM head, `[V, H]`: its own tensor, or `embed_tokens` when the two are tied.
    pub fn lm_head(&self) -> &[f16] {
        self.lm_head.as_deref().unwrap_or(&self.embed_tokens)
    }

    /// Seeded host weights for tests and the CPU reference on small shapes. These are NOT the
    /// values of the executor's device-side synthetic weights; use them where both sides are
    /// given the same host tensors. Scales follow a trained Llama (norm weights near 1,
    /// projections `U(-1,1)/sqrt(in)`), so activations stay in fp16 range at any depth.
    pub fn synthetic(model: &ModelSpec, tie_word_embeddings: bool, seed: u64) -> LlamaWeights {
        let mut rng = SplitMix64::new(seed ^ 0x6c6c_616d_6177_6569);
        let h = model.hidden_size as usize;
        let v = model.vocab_size as usize;
        let dense = |rows: usize, cols: usize, rng: &mut SplitMix64| -> Vec<f16> {
            let bound = 1.0 / (cols as f32).sqrt();
            (0..rows * cols)
                .map(|_| f16::from_f32(rng.uniform() * bound))
                .collect()
        };
        let norm = |rng: &mut SplitMix64| -> Vec<f16> {
            (0..h)
                .map(|_| f16::from_f32(1.0 + 0.1 * rng.uniform()))
                .collect()
        };
        // Embeddings as in transformers' init (std 0.02 is tiny; use a unit-ish scale so the
        // first RMSNorm sees varied rows).
        let embed_tokens = dense(v, h, &mut rng);
        let mut layers = Vec::with_capacity(model.num_layers as usize);
        for _ in 0..model.num_layers {
            let mut layer = LayerWeights {
                input_layernorm: norm(&mut rng),
                q_proj: Vec::new(),
                k_proj: Vec::new(),
                v_proj: Vec::new(),
                o_proj: Vec::new(),
                post_attention_layernorm: norm(&mut rng),
                gate_proj: Vec::new(),
                up_proj: Vec::new(),
                down_proj: Vec::new(),
            };
            for module in TargetModule::ALL {
                let (input, output) = model.module_shape(module);
                *layer.projection_mut(module) = dense(output as usize, input as usize, &mut rng);
            }
            layers.push(layer);
        }
        let final_norm = norm(&mut rng);
        let lm_head = (!tie_word_embeddings).then(|| dense(v, h, &mut rng));
        LlamaWeights {
            source_dtype: DType::Fp16,
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
        }
    }

    /// Checks every tensor's length against `model` (for weights built in code rather than
    /// loaded, which checks shapes as it reads).
    pub fn check_shapes(&self, model: &ModelSpec) -> Result<()> {
        let source = PathBuf::from("<host weights>");
        let bad = |tensor: String, expected: usize, got: usize| Error::Tensor {
            path: source.clone(),
            tensor,
            reason: format!("expected {expected} elements, got {got}"),
        };
        let (h, v) = (model.hidden_size as usize, model.vocab_size as usize);
        if self.layers.len() != model.num_layers as usize {
            return Err(Error::File {
                path: source.clone(),
                reason: format!(
                    "expected {} layers, got {}",
                    model.num_layers,
                    self.layers.len()
                ),
            });
        }
        let check = |name: String, got: usize, expected: usize| -> Result<()> {
            if got == expected {
                Ok(())
            } else {
                Err(bad(name, expected, got))
            }
        };
        check(EMBED.into(), self.embed_tokens.len(), v * h)?;
        check(NORM.into(), self.norm.len(), h)?;
        check(LM_HEAD.into(), self.lm_head().len(), v * h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            check(
                layer_norm_name(l, "input_layernorm"),
                layer.input_layernorm.len(),
                h,
            )?;
            check(
                layer_norm_name(l, "post_attention_layernorm"),
                layer.post_attention_layernorm.len(),
                h,
            )?;
            for module in TargetModule::ALL {
                let (input, output) = model.module_shape(module);
                check(
                    projection_name(l, module),
                    layer.projection(module).len(),
                    input as usize * output as usize,
                )?;
            }
        }
        Ok(())
    }
}

const CONFIG: &str = "config.json";
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

fn projection_name(layer: usize, module: TargetModule) -> String {
    let block = match module {
        TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
        TargetModule::Gate | TargetModule::Up | TargetModule::Down => "mlp",
    };
    format!("model.layers.{layer}.{block}.{}.weight", module.peft_name())
}

fn layer_norm_name(layer: usize, which: &str) -> String {
    format!("model.layers.{layer}.{which}.weight")
}

// ---------------------------------------------------------------------------------------------
// config.json

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// Typed access to a JSON object with errors that name the file and field.
struct JsonFields<'a> {
    path: &'a Path,
    object: &'a serde_json::Map<String, Value>,
}

impl<'a> JsonFields<'a> {
    fn new(path: &'a Path, value: &'a Value) -> Result<Self> {
        match value.as_object() {
            Some(object) => Ok(JsonFields { path, object }),
            None => Err(Error::File {
                path: path.to_path_buf(),
                reason: "expected a JSON object at the top level".into(),
            }),
        }
    }

    fn err(&self, reason: String) -> Error {
        Error::File {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// The field, treating JSON `null` as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn u32_opt(&self, field: &str) -> Result<Option<u32>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.err(format!(
                    "field `{field}` must be a non-negative integer below 2^32, got {v}"
                ))),
            },
        }
    }

    fn u32(&self, field: &str) -> Result<u32> {
        self.u32_opt(field)?
            .ok_or_else(|| self.err(format!("required field `{field}` is missing")))
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(format!("field `{field}` must be a number, got {v}"))),
            },
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{field}` must be true or false, got {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{field}` must be a string, got {v}"))),
        }
    }
}

/// Reads a Hugging Face Llama `config.json` from `dir`. The returned spec is validated and
/// named after the directory.
pub fn read_llama_config(dir: &Path) -> Result<(ModelSpec, LlamaExtras)> {
    let path = dir.join(CONFIG);
    let value = read_json(&path)?;
    let f = JsonFields::new(&path, &value)?;

    if let Some(model_type) = f.str_opt("model_type")? {
        match model_type {
            "llama" => {}
            "mistral" => {
                // Mistral is Llama plus sliding-window attention; without a window (or one
                // covering every position) it is exactly Llama.
                let window = f.u32_opt("sliding_window")?;
                let max_pos = f.u32_opt("max_position_embeddings")?.unwrap_or(0);
                if let Some(w) = window.filter(|&w| w < max_pos) {
                    return Err(f.err(format!(
                        "sliding_window {w} < max_position_embeddings {max_pos}: sliding-window \
                         attention is not supported"
                    )));
                }
            }
            other => {
                return Err(f.err(format!(
                    "model_type `{other}` is not supported; slora-plan runs Llama-family models \
                     (model_type `llama` or `mistral`)"
                )))
            }
        }
    }

    let hidden_size = f.u32("hidden_size")?;
    let num_layers = f.u32("num_hidden_layers")?;
    let num_heads = f.u32("num_attention_heads")?;
    let num_kv_heads = f.u32_opt("num_key_value_heads")?.unwrap_or(num_heads);
    let intermediate_size = f.u32("intermediate_size")?;
    let vocab_size = f.u32("vocab_size")?;
    let max_position = f.u32("max_position_embeddings")?;

    // transformers 5 writes `dtype`, 4.x `torch_dtype`.
    let dtype_name = match f.str_opt("dtype")? {
        Some(d) => d,
        None => f.str_opt("torch_dtype")?.ok_or_else(|| {
            f.err(
                "neither `dtype` nor `torch_dtype` is given; expected \"float16\" or \"bfloat16\""
                    .into(),
            )
        })?,
    };
    let dtype = match dtype_name {
        "float16" => DType::Fp16,
        "bfloat16" => DType::Bf16,
        other => {
            return Err(f.err(format!(
                "dtype `{other}` is not supported; expected \"float16\" or \"bfloat16\" \
                 (convert the checkpoint, e.g. `model.half().save_pretrained(...)`)"
            )))
        }
    };

    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(f.err(format!(
                "hidden_act `{act}` is not supported; Llama uses \"silu\""
            )));
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if f.bool_opt(field)? == Some(true) {
            return Err(f.err(format!(
                "`{field}: true` is not supported: the executor has no bias terms"
            )));
        }
    }
    if let Some(head_dim) = f.u32_opt("head_dim")? {
        if u64::from(head_dim) * u64::from(num_heads) != u64::from(hidden_size) {
            return Err(f.err(format!(
                "head_dim {head_dim} × num_attention_heads {num_heads} != hidden_size \
                 {hidden_size}; only head_dim = hidden_size / heads is supported"
            )));
        }
    }

    // RoPE: transformers 5 nests theta and type in `rope_parameters`; 4.x has top-level
    // `rope_theta` and an optional `rope_scaling`.
    let mut rope_theta = f.f64_opt("rope_theta")?;
    for field in ["rope_scaling", "rope_parameters"] {
        let Some(rope) = f.get(field) else { continue };
        let Some(obj) = rope.as_object() else {
            return Err(f.err(format!("field `{field}` must be an object, got {rope}")));
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(f.err(format!(
                "{field} of type `{kind}` is not supported (only plain RoPE, rope_type \
                 \"default\"); running it as plain RoPE would give wrong results past the \
                 original context"
            )));
        }
        if let Some(theta) = obj.get("rope_theta").filter(|v| !v.is_null()) {
            match theta.as_f64() {
                Some(t) => rope_theta = Some(t),
                None => {
                    return Err(f.err(format!("{field}.rope_theta must be a number, got {theta}")))
                }
            }
        }
    }

    let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
    if rms_norm_eps <= 0.0 {
        return Err(f.err(format!("rms_norm_eps must be positive, got {rms_norm_eps}")));
    }
    let eos_token_ids = match f.get("eos_token_id") {
        None => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| f.err(format!("eos_token_id entries must be integers, got {v}")))
            })
            .collect::<Result<_>>()?,
        Some(_) => vec![f.u32("eos_token_id")?],
    };

    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string());
    let spec = ModelSpec {
        name,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        intermediate_size,
        vocab_size,
        max_position,
        rope_theta: rope_theta.unwrap_or(10_000.0),
        dtype,
    };
    spec.validate().map_err(|e| f.err(e.to_string()))?;
    let extras = LlamaExtras {
        rms_norm_eps: rms_norm_eps as f32,
        tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        bos_token_id: f.u32_opt("bos_token_id")?,
        eos_token_ids,
    };
    Ok((spec, extras))
}

// ---------------------------------------------------------------------------------------------
// safetensors reading

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            format!("not found ({what})")
        } else {
            format!("cannot read {what}: {e}")
        },
    })
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!(
            "not a valid safetensors file ({e}); {} bytes on disk — truncated or still downloading?",
            bytes.len()
        ),
    })
}

fn dtype_name(dtype: Dtype) -> String {
    dtype.to_string()
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Converts a tensor's bytes to f16, rounding f32 and bf16 to nearest; an element that is not
/// finite after conversion is an error naming its index.
fn to_f16(path: &Path, tensor: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f16>> {
    let out: Vec<f16> = match dtype {
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| {
                f16::from_f32(half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            })
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                reason: format!("dtype {other} cannot be converted to f16"),
            })
        }
    };
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        let original = match dtype {
            Dtype::F32 => f32::from_le_bytes([
                data[4 * i],
                data[4 * i + 1],
                data[4 * i + 2],
                data[4 * i + 3],
            ]),
            Dtype::BF16 => {
                half::bf16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32()
            }
            _ => out[i].to_f32(),
        };
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: format!(
                "element {i} is {original} ({dtype}), which is not a finite f16 value \
                 (|x| <= 65504)"
            ),
        });
    }
    Ok(out)
}

/// Takes tensor `name` from `st`, checking its exact shape and dtype.
fn take_exact(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    shape: &[usize],
    dtype: Dtype,
) -> Result<Vec<f16>> {
    let view = st.tensor(name).map_err(|_| Error::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason: format!(
            "missing (expected shape {} {})",
            shape_str(shape),
            dtype_name(dtype)
        ),
    })?;
    if view.shape() != shape || view.dtype() != dtype {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            reason: format!(
                "expected shape {} {}, got {} {}",
                shape_str(shape),
                dtype_name(dtype),
                shape_str(view.shape()),
                dtype_name(view.dtype())
            ),
        });
    }
    to_f16(path, name, view.dtype(), view.data())
}

// ---------------------------------------------------------------------------------------------
// Llama weights

/// Every tensor a Llama model needs, with its shape.
fn llama_tensor_list(model: &ModelSpec, extras: &LlamaExtras) -> Vec<(String, Vec<usize>)> {
    let h = model.hidden_size as usize;
    let v = model.vocab_size as usize;
    let mut list = vec![(EMBED.to_string(), vec![v, h])];
    for l in 0..model.num_layers as usize {
        list.push((layer_norm_name(l, "input_layernorm"), vec![h]));
        list.push((layer_norm_name(l, "post_attention_layernorm"), vec![h]));
        for module in TargetModule::ALL {
            let (input, output) = model.module_shape(module);
            list.push((
                projection_name(l, module),
                vec![output as usize, input as usize],
            ));
        }
    }
    list.push((NORM.to_string(), vec![h]));
    if !extras.tie_word_embeddings {
        list.push((LM_HEAD.to_string(), vec![v, h]));
    }
    list
}

/// Loads a Llama checkpoint from `dir`: `config.json` and `model.safetensors`, or shards listed
/// in `model.safetensors.index.json`.
pub fn load_llama(dir: &Path) -> Result<(ModelSpec, LlamaExtras, LlamaWeights)> {
    let (model, extras) = read_llama_config(dir)?;
    let st_dtype = match model.dtype {
        DType::Fp16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    };
    let wanted = llama_tensor_list(&model, &extras);

    // Which file holds each tensor.
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    let mut by_file: BTreeMap<PathBuf, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    if single.exists() {
        by_file.insert(single, wanted);
    } else if index.exists() {
        let value = read_json(&index)?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::File {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        for (name, shape) in wanted {
            let file = map
                .get(&name)
                .and_then(Value::as_str)
                .ok_or_else(|| Error::Tensor {
                    path: index.clone(),
                    tensor: name.clone(),
                    reason: format!(
                        "missing from weight_map (expected shape {} {st_dtype})",
                        shape_str(&shape)
                    ),
                })?;
            if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
                return Err(Error::Tensor {
                    path: index.clone(),
                    tensor: name,
                    reason: format!("shard name `{file}` is not a plain file name"),
                });
            }
            by_file
                .entry(dir.join(file))
                .or_default()
                .push((name, shape));
        }
    } else {
        return Err(Error::File {
            path: dir.to_path_buf(),
            reason: format!("has neither {SINGLE_FILE} nor {INDEX_FILE}"),
        });
    }

    let mut tensors: HashMap<String, Vec<f16>> = HashMap::new();
    for (path, names) in &by_file {
        let bytes = read_file(path, "model weights")?;
        let st = parse_safetensors(path, &bytes)?;
        for (name, shape) in names {
            let data = take_exact(&st, path, name, shape, st_dtype)?;
            tensors.insert(name.clone(), data);
        }
    }

    // Every wanted tensor was inserted above or an error returned; `take` cannot miss.
    let mut take = |name: &str| tensors.remove(name).unwrap_or_default();
    let embed_tokens = take(EMBED);
    let mut layers = Vec::with_capacity(model.num_layers as usize);
    for l in 0..model.num_layers as usize {
        layers.push(LayerWeights {
            input_layernorm: take(&layer_norm_name(l, "input_layernorm")),
            q_proj: take(&projection_name(l, TargetModule::Q)),
            k_proj: take(&projection_name(l, TargetModule::K)),
            v_proj: take(&projection_name(l, TargetModule::V)),
            o_proj: take(&projection_name(l, TargetModule::O)),
            post_attention_layernorm: take(&layer_norm_name(l, "post_attention_layernorm")),
            gate_proj: take(&projection_name(l, TargetModule::Gate)),
            up_proj: take(&projection_name(l, TargetModule::Up)),
            down_proj: take(&projection_name(l, TargetModule::Down)),
        });
    }
    let norm = take(NORM);
    let lm_head = (!extras.tie_word_embeddings).then(|| take(LM_HEAD));
    let weights = LlamaWeights {
        source_dtype: model.dtype,
        embed_tokens,
        layers,
        norm,
        lm_head,
    };
    weights.check_shapes(&model)?;
    Ok((model, extras, weights))
}

// ---------------------------------------------------------------------------------------------
// PEFT adapters

/// A LoRA adapter's weights on the host, as f16.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    /// Where it came from (its directory, or a `synthetic(...)` description), for errors.
    pub source: PathBuf,
    pub rank: u32,
    pub alpha: f32,
    /// rsLoRA scaling (`alpha / sqrt(r)`) instead of `alpha / r`.
    pub use_rslora: bool,
    /// Adapted projections, in [`TargetModule::ALL`] order (the order of the adapter's pages,
    /// see the layout contract).
    pub targets: Vec<TargetModule>,
    /// `lora_A` per `(layer, module)`: `[r, in]`, row-major.
    pub a: BTreeMap<(u32, TargetModule), Vec<f16>>,
    /// `lora_B` per `(layer, module)`: `[out, r]`, row-major.
    pub b: BTreeMap<(u32, TargetModule), Vec<f16>>,
}

impl PeftAdapter {
    /// The factor PEFT multiplies the LoRA output by: `alpha / r`, or `alpha / sqrt(r)` with
    /// rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank.max(1) as f32;
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// The adapter's shape, as the engine sees it.
    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            rank: self.rank,
            targets: self.targets.clone(),
        }
    }

    /// `(A [r, in], B [out, r])` of one layer's module, if the adapter targets it.
    pub fn module(&self, layer: u32, module: TargetModule) -> Option<(&[f16], &[f16])> {
        let a = self.a.get(&(layer, module))?;
        let b = self.b.get(&(layer, module))?;
        Some((a, b))
    }

    /// Checks every `A` and `B` against `model` and the rank (for adapters built in code).
    pub fn check_shapes(&self, model: &ModelSpec) -> Result<()> {
        self.spec().validate(model, 0).map_err(|e| Error::File {
            path: self.source.clone(),
            reason: e.to_string(),
        })?;
        let r = self.rank as usize;
        for l in 0..model.num_layers {
            for &m in &self.targets {
                let (input, output) = model.module_shape(m);
                let name = adapter_tensor_name(l as usize, m, 'A');
                let (a, b) = self.module(l, m).ok_or_else(|| Error::Tensor {
                    path: self.source.clone(),
                    tensor: name.clone(),
                    reason: "missing".into(),
                })?;
                for (which, got, want) in [
                    ('A', a.len(), r * input as usize),
                    ('B', b.len(), output as usize * r),
                ] {
                    if got != want {
                        return Err(Error::Tensor {
                            path: self.source.clone(),
                            tensor: adapter_tensor_name(l as usize, m, which),
                            reason: format!("expected {want} elements, got {got}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

const ADAPTER_CONFIG: &str = "adapter_config.json";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

fn adapter_tensor_name(layer: usize, module: TargetModule, which: char) -> String {
    let block = match module {
        TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
        TargetModule::Gate | TargetModule::Up | TargetModule::Down => "mlp",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.lora_{which}.weight",
        module.peft_name()
    )
}

fn module_from_name(name: &str) -> Option<TargetModule> {
    TargetModule::ALL
        .into_iter()
        .find(|m| m.peft_name() == name)
}

/// Parses `…layers.N.<block>.<module>.lora_A[.<adapter name>].weight` into
/// `(N, module, 'A' | 'B')`; `None` for anything else.
fn parse_adapter_key(key: &str) -> Option<(u32, TargetModule, char)> {
    let parts: Vec<&str> = key.split('.').collect();
    let at = parts.iter().position(|&p| p == "layers")?;
    let layer: u32 = parts.get(at + 1)?.parse().ok()?;
    let module = module_from_name(parts.get(at + 3)?)?;
    let which = match *parts.get(at + 4)? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    let rest = &parts[at + 5..];
    let ok = matches!(rest, ["weight"] | [_, "weight"]);
    ok.then_some((layer, module, which))
}

/// Which projections `target_modules` allows: a list of names (a dotted name counts by its last
/// part, as PEFT matches suffixes), or one string. A single string that is a projection name is
/// that one module; `all-linear` or any other string (PEFT treats it as a regex) allows every
/// projection, and the tensors in the file decide.
fn config_targets(f: &JsonFields<'_>) -> Result<Option<BTreeSet<TargetModule>>> {
    let Some(value) = f.get("target_modules") else {
        return Err(f.err("required field `target_modules` is missing".into()));
    };
    let names: Vec<&str> = match value {
        Value::String(s) => match module_from_name(s) {
            Some(m) => return Ok(Some(BTreeSet::from([m]))),
            None => return Ok(None),
        },
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    f.err(format!("target_modules entries must be strings, got {v}"))
                })
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(f.err(format!(
                "target_modules must be a list of module names or a string, got {other}"
            )))
        }
    };
    let mut set = BTreeSet::new();
    for name in names {
        let last = name.rsplit('.').next().unwrap_or(name);
        match module_from_name(last) {
            Some(m) => {
                set.insert(m);
            }
            None => {
                return Err(f.err(format!(
                    "target module `{name}` is not a projection of a Llama model (expected \
                     q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)"
                )))
            }
        }
    }
    Ok(Some(set))
}

/// Loads a PEFT LoRA adapter from `dir` and checks it against `model`: every layer must have
/// `lora_A` `[r, in]` and `lora_B` `[out, r]` for each targeted projection, with `r` from
/// `adapter_config.json`.
pub fn load_peft_adapter(dir: &Path, model: &ModelSpec) -> Result<PeftAdapter> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let value = read_json(&config_path)?;
    let f = JsonFields::new(&config_path, &value)?;

    if let Some(kind) = f.str_opt("peft_type")? {
        if kind != "LORA" {
            return Err(f.err(format!(
                "peft_type `{kind}` is not supported; expected \"LORA\""
            )));
        }
    }
    let rank = f.u32("r")?;
    if rank == 0 {
        return Err(f.err("r must be at least 1, got 0".into()));
    }
    // PEFT's LoraConfig default.
    let alpha = f.f64_opt("lora_alpha")?.unwrap_or(8.0) as f32;
    let use_rslora = f.bool_opt("use_rslora")?.unwrap_or(false);
    if let Some(bias) = f.str_opt("bias")? {
        if bias != "none" {
            return Err(f.err(format!(
                "bias `{bias}` is not supported; only adapters without bias terms (\"none\")"
            )));
        }
    }
    for (field, what) in [
        ("fan_in_fan_out", "transposed (Conv1D-style) weights"),
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias terms"),
    ] {
        if f.bool_opt(field)? == Some(true) {
            return Err(f.err(format!("`{field}: true` ({what}) is not supported")));
        }
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if let Some(v) = f.get(field) {
            if v.as_object().is_some_and(|o| !o.is_empty()) {
                return Err(f.err(format!(
                    "per-module ranks or alphas (`{field}`: {v}) are not supported"
                )));
            }
        }
    }
    for field in [
        "layers_to_transform",
        "modules_to_save",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
    ] {
        if let Some(v) = f.get(field) {
            let empty = v.as_array().is_some_and(Vec::is_empty)
                || v.as_object().is_some_and(serde_json::Map::is_empty);
            if !empty {
                return Err(f.err(format!(
                    "`{field}` ({v}) is not supported: adapters must adapt the same \
                     projections in every layer and nothing else"
                )));
            }
        }
    }
    let allowed = config_targets(&f)?;

    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::File {
            path: dir.join("adapter_model.bin"),
            reason: "pickled adapters are not supported; re-save with \
                     save_pretrained(..., safe_serialization=True)"
                .into(),
        });
    }
    let bytes = read_file(&weights_path, "adapter weights")?;
    let st = parse_safetensors(&weights_path, &bytes)?;

    let tensor_err = |tensor: &str, reason: String| Error::Tensor {
        path: weights_path.clone(),
        tensor: tensor.to_string(),
        reason,
    };
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    let mut found = BTreeSet::new();
    let mut names: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    for (name, view) in names {
        let Some((layer, module, which)) = parse_adapter_key(&name) else {
            return Err(tensor_err(
                &name,
                "not a LoRA weight this loader understands (expected \
                 `base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A|lora_B.weight`)"
                    .into(),
            ));
        };
        if layer >= model.num_layers {
            return Err(tensor_err(
                &name,
                format!(
                    "layer {layer} does not exist: model `{}` has {} layers",
                    model.name, model.num_layers
                ),
            ));
        }
        if let Some(allowed) = &allowed {
            if !allowed.contains(&module) {
                return Err(tensor_err(
                    &name,
                    format!(
                        "adapts {module}, which target_modules in {ADAPTER_CONFIG} does not list"
                    ),
                ));
            }
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(tensor_err(
                &name,
                format!("expected F32, F16 or BF16, got {}", view.dtype()),
            ));
        }
        let (input, output) = model.module_shape(module);
        let shape = view.shape();
        let (expected, role) = match which {
            'A' => ([rank as usize, input as usize], "[r, in]"),
            _ => ([output as usize, rank as usize], "[out, r]"),
        };
        if shape != expected {
            let mut reason = format!(
                "expected shape {} ({role} for {module} of `{}` with r = {rank}), got {}",
                shape_str(&expected),
                model.name,
                shape_str(shape)
            );
            let rank_axis = if which == 'A' { 0 } else { 1 };
            if shape.len() == 2 && shape[rank_axis] != rank as usize {
                reason.push_str(&format!(
                    ": the tensor has rank {} but {ADAPTER_CONFIG} says r = {rank}",
                    shape[rank_axis]
                ));
            } else if shape.len() == 2 {
                reason.push_str(": the adapter was trained for a model of another size");
            }
            return Err(tensor_err(&name, reason));
        }
        let data = to_f16(&weights_path, &name, view.dtype(), view.data())?;
        let slot = if which == 'A' { &mut a } else { &mut b };
        if slot.insert((layer, module), data).is_some() {
            return Err(tensor_err(
                &name,
                format!("a second lora_{which} for layer {layer} {module}"),
            ));
        }
        found.insert(module);
    }
    if found.is_empty() {
        return Err(Error::File {
            path: weights_path.clone(),
            reason: "holds no LoRA weights".into(),
        });
    }
    if let Some(allowed) = &allowed {
        if let Some(missing) = allowed.difference(&found).next() {
            return Err(Error::File {
                path: weights_path.clone(),
                reason: format!(
                    "{ADAPTER_CONFIG} lists {missing} in target_modules but the file has no \
                     {missing} weights"
                ),
            });
        }
    }
    let targets: Vec<TargetModule> = found.into_iter().collect();
    for l in 0..model.num_layers {
        for &m in &targets {
            for (which, map) in [('A', &a), ('B', &b)] {
                if !map.contains_key(&(l, m)) {
                    return Err(tensor_err(
                        &adapter_tensor_name(l as usize, m, which),
                        format!(
                            "missing: the adapter targets {m} but has no lora_{which} for layer \
                             {l} (adapters must cover every layer)"
                        ),
                    ));
                }
            }
        }
    }
    let adapter = PeftAdapter {
        source: dir.to_path_buf(),
        rank,
        alpha,
        use_rslora,
        targets,
        a,
        b,
    };
    adapter.spec().validate(model, 0).map_err(|e| Error::File {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(adapter)
}

/// Checks that `adapter` fits in a pool of `pool_pages` pages at all (its page count from
/// [`AdapterSpec::pages`]), so an adapter that could never be loaded is refused up front.
pub fn check_adapter_fits(adapter: &PeftAdapter, model: &ModelSpec, pool_pages: u64) -> Result<()> {
    let spec = adapter.spec();
    let pages = spec.pages(model);
    if pages > pool_pages {
        return Err(Error::File {
            path: adapter.source.clone(),
            reason: format!(
                "a rank-{} adapter on {} needs {pages} pages of the pool ({} bytes of weights) \
                 but the pool has only {pool_pages} pages",
                adapter.rank,
                spec.targets
                    .iter()
                    .map(|t| t.peft_name())
                    .collect::<Vec<_>>()
                    .join(","),
                spec.weight_bytes(model)
            ),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Synthetic adapters

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to fill weights; every
/// seed gives a different, reproducible stream.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`, from the top 24 bits (exact in f32).
    pub fn uniform(&mut self) -> f32 {
        let bits = (self.next_u64() >> 40) as f32; // 0 .. 2^24
        bits / (1u32 << 23) as f32 - 1.0
    }
}

/// A seeded random adapter of the given shape: `A ~ U(-1,1)/sqrt(in)`, `B ~ U(-1,1)/sqrt(r) ×
/// 0.1`, so `x A^T B^T` has about a tenth of the size of `x` and activations stay finite at
/// any depth, yet the adapter visibly changes the logits. (PEFT initialises `B` to zero; a
/// synthetic adapter with zero `B` would test nothing.) `targets` are sorted into
/// [`TargetModule::ALL`] order and deduplicated.
pub fn synthetic_adapter(
    model: &ModelSpec,
    rank: u32,
    targets: &[TargetModule],
    alpha: f32,
    seed: u64,
) -> PeftAdapter {
    let targets: Vec<TargetModule> = targets
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rng = SplitMix64::new(seed ^ 0x6164_6170_7465_7221);
    let r = rank as usize;
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for l in 0..model.num_layers {
        for &m in &targets {
            let (input, output) = model.module_shape(m);
            let a_bound = 1.0 / (input as f32).sqrt();
            let b_bound = 0.1 / (r.max(1) as f32).sqrt();
            let a_data: Vec<f16> = (0..r * input as usize)
                .map(|_| f16::from_f32(rng.uniform() * a_bound))
                .collect();
            let b_data: Vec<f16> = (0..output as usize * r)
                .map(|_| f16::from_f32(rng.uniform() * b_bound))
                .collect();
            a.insert((l, m), a_data);
            b.insert((l, m), b_data);
        }
    }
    PeftAdapter {
        source: PathBuf::from(format!("synthetic(rank={rank}, seed={seed})")),
        rank,
        alpha,
        use_rslora: false,
        targets,
        a,
        b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_keys_parse_with_and_without_adapter_name() {
        assert_eq!(
            parse_adapter_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, TargetModule::Q, 'A'))
        );
        assert_eq!(
            parse_adapter_key(
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"
            ),
            Some((0, TargetModule::Down, 'B'))
        );
        assert_eq!(
            parse_adapter_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
            ),
            None
        );
        assert_eq!(
            parse_adapter_key("base_model.model.lm_head.lora_A.weight"),
            None
        );
    }

    #[test]
    fn splitmix_is_reproducible_and_in_range() {
        let mut x = SplitMix64::new(7);
        let mut y = SplitMix64::new(7);
        for _ in 0..1000 {
            let u = x.uniform();
            assert_eq!(u, y.uniform());
            assert!((-1.0..1.0).contains(&u));
        }
        assert_ne!(SplitMix64::new(1).next_u64(), SplitMix64::new(2).next_u64());
    }

    #[test]
    fn rslora_scale() {
        let m = ModelSpec::preset("llama-7b").unwrap();
        let mut a = synthetic_adapter(&m, 16, &[TargetModule::Q], 32.0, 1);
        assert_eq!(a.scale(), 2.0);
        a.use_rslora = true;
        assert_eq!(a.scale(), 8.0);
    }
}
