//! A CPU reference forward pass of a Llama model with per-request LoRA adapters: the oracle for
//! the GPU executor and for checking that [`crate::weights`] loads what transformers loads.
//!
//! # Numerics: Hugging Face `LlamaForCausalLM` in float16, step by step
//!
//! Math is f32; a value is rounded to f16 (`r16`) exactly where PyTorch materialises an fp16
//! tensor when transformers 5 runs the model in fp16:
//!
//! | step | here |
//! |---|---|
//! | embedding | the f16 row |
//! | RMSNorm | `r16(w · r16(x · rsqrt(mean(x²) + eps)))` — HF normalises in f32, casts, then multiplies by the fp16 weight |
//! | linear | f32 dot products, `r16` of the result (cuBLAS/oneDNN accumulate fp16 GEMMs in f32) |
//! | LoRA on a linear `y` | `r16(y + r16(scale · (x·Aᵀ)·Bᵀ))`, `x·Aᵀ` and `·Bᵀ` in f32, unrounded |
//! | RoPE | `cos`, `sin` of `pos · inv_freq` in f32, rounded to f16; `r16(r16(q·cos) + r16(rotate_half(q)·sin))` |
//! | attention | scores, softmax and `P·V` in f32 (as SDPA's fused kernels do), `r16` of the output |
//! | residual add, SiLU, `silu(g)·u` | each `r16` |
//! | logits | `r16` of the LM-head product, returned as f32 |
//!
//! The LoRA row follows peft 0.21's *mixed-batch* path (`adapter_names=`), which the GPU
//! reference uses: peft holds `lora_A`/`lora_B` in float32 (`autocast_adapter_dtype`), casts
//! `x` to f32, computes `lora_B(lora_A(x)) * scaling` in f32, casts that to fp16 and adds it to
//! the fp16 base output. Our adapters are f16 (the loader converts), so they equal peft's
//! weights exactly when the saved float32 values are fp16-representable — `tests/gpu/reference.py`
//! makes them so. peft's single-adapter path instead adds in f32 and rounds once; the two differ
//! by at most one fp16 ulp of the output.
//!
//! Remaining differences from a GPU run are accumulation order (and split-K fp16 reductions
//! that cuBLAS may use), SDPA's internal rounding of probabilities, and libm vs CUDA `cos`/`exp`:
//! a few fp16 ulps of the logits, which is the tolerance the comparisons below allow for.
//!
//! # Cost
//!
//! A request is run token by token with a per-layer K/V cache. Because every position's
//! computation depends only on earlier positions and is done in a fixed order, this gives
//! bit-for-bit the logits of recomputing the full causal forward at each step, at
//! `O(tokens × parameters)` instead of `O(tokens² × parameters)`. Still scalar CPU code: meant
//! for models of a few million parameters.

use crate::error::{Error, Result};
use crate::weights::{LlamaExtras, LlamaWeights, PeftAdapter};
use half::f16;
use slora_engine::spec::{ModelSpec, TargetModule};
use std::path::{Path, PathBuf};

/// One request of a batch: its tokens and the index of its adapter in the `adapters` slice
/// (`None` = base model).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTokens {
    pub tokens: Vec<u32>,
    pub adapter: Option<usize>,
}

/// Logits of every position of every request: `[request][position][vocab]`.
pub fn forward_logits(
    model: &ModelSpec,
    extras: &LlamaExtras,
    w: &LlamaWeights,
    adapters: &[&PeftAdapter],
    batch: &[RequestTokens],
) -> Result<Vec<Vec<Vec<f32>>>> {
    let reference = ReferenceModel::new(model, extras, w, adapters)?;
    batch.iter().map(|req| reference.logits(req)).collect()
}

/// `steps` greedy tokens per request (EOS ignored), continuing each request's tokens.
pub fn greedy_generate(
    model: &ModelSpec,
    extras: &LlamaExtras,
    w: &LlamaWeights,
    adapters: &[&PeftAdapter],
    batch: &[RequestTokens],
    steps: usize,
) -> Result<Vec<Vec<u32>>> {
    let reference = ReferenceModel::new(model, extras, w, adapters)?;
    batch
        .iter()
        .map(|req| reference.greedy(req, steps).map(|g| g.tokens))
        .collect()
}

/// The index of the largest logit, the first one on ties (as `torch.argmax`). NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || (logits[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated tokens.
    pub tokens: Vec<u32>,
    /// `logits[s]` is the distribution `tokens[s]` was taken from.
    pub logits: Vec<Vec<f32>>,
}

const KERNEL: &str = "reference_model";

fn bad(reason: String) -> Error {
    Error::Launch {
        kernel: KERNEL,
        reason,
    }
}

#[inline]
fn r16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn to_f32(xs: &[f16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// Dot product with eight independent f32 accumulators (closer to a GEMM's blocked sum than one
/// long serial chain, and vectorisable).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for k in chunks * 8..a.len() {
        tail += a[k] * b[k];
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}

/// `W x` for a row-major `[out, in]` `W`, unrounded.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

fn module_index(m: TargetModule) -> usize {
    TargetModule::ALL
        .iter()
        .position(|&t| t == m)
        .unwrap_or_default()
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    /// Indexed like [`TargetModule::ALL`].
    proj: Vec<Vec<f32>>,
}

/// `(A [r, in], B [out, r])` of one module of one layer, in f32.
type LoraPair = (Vec<f32>, Vec<f32>);

struct Adapter {
    scale: f32,
    /// `[layer][module index]`.
    layers: Vec<Vec<Option<LoraPair>>>,
}

/// The model's weights converted to f32 once, with the RoPE inverse frequencies.
pub struct ReferenceModel {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    max_position: usize,
    eps: f32,
    inv_freq: Vec<f32>,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Vec<f32>,
    adapters: Vec<Adapter>,
}

/// A request's K/V cache: per layer, one f16-valued row of `kv_heads * head_dim` per position.
struct Sequence {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl ReferenceModel {
    /// Checks shapes (weights and every adapter against `model`) and converts to f32.
    pub fn new(
        model: &ModelSpec,
        extras: &LlamaExtras,
        w: &LlamaWeights,
        adapters: &[&PeftAdapter],
    ) -> Result<ReferenceModel> {
        model.validate().map_err(|e| bad(e.to_string()))?;
        w.check_shapes(model)?;
        let head_dim = model.head_dim() as usize;
        if head_dim % 2 != 0 {
            return Err(bad(format!("RoPE needs an even head_dim, got {head_dim}")));
        }
        let theta = model.rope_theta as f32;
        // transformers: 1 / base ** (arange(0, d, 2).float() / d), all f32.
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let layers = w
            .layers
            .iter()
            .map(|l| Layer {
                input_norm: to_f32(&l.input_layernorm),
                post_norm: to_f32(&l.post_attention_layernorm),
                proj: TargetModule::ALL
                    .iter()
                    .map(|&m| to_f32(l.projection(m)))
                    .collect(),
            })
            .collect();
        let mut converted = Vec::with_capacity(adapters.len());
        for adapter in adapters {
            adapter.check_shapes(model)?;
            let layers = (0..model.num_layers)
                .map(|l| {
                    TargetModule::ALL
                        .iter()
                        .map(|&m| {
                            // Only the declared targets, as the executor packs them.
                            adapter
                                .module(l, m)
                                .filter(|_| adapter.targets.contains(&m))
                                .map(|(a, b)| (to_f32(a), to_f32(b)))
                        })
                        .collect()
                })
                .collect();
            converted.push(Adapter {
                scale: adapter.scale(),
                layers,
            });
        }
        Ok(ReferenceModel {
            hidden: model.hidden_size as usize,
            heads: model.num_heads as usize,
            kv_heads: model.num_kv_heads as usize,
            head_dim,
            vocab: model.vocab_size as usize,
            max_position: model.max_position as usize,
            eps: extras.rms_norm_eps,
            inv_freq,
            embed: to_f32(&w.embed_tokens),
            layers,
            norm: to_f32(&w.norm),
            lm_head: to_f32(w.lm_head()),
            adapters: converted,
        })
    }

    fn check_request(&self, req: &RequestTokens, extra: usize) -> Result<()> {
        if req.tokens.is_empty() {
            return Err(bad("a request needs at least one token".into()));
        }
        if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(bad(format!(
                "token {t} is outside the vocabulary of {} tokens",
                self.vocab
            )));
        }
        if let Some(a) = req.adapter.filter(|&a| a >= self.adapters.len()) {
            return Err(bad(format!(
                "adapter index {a} but only {} adapters were given",
                self.adapters.len()
            )));
        }
        let total = req.tokens.len() + extra;
        if total > self.max_position {
            return Err(bad(format!(
                "{total} positions exceed max_position_embeddings {}",
                self.max_position
            )));
        }
        Ok(())
    }

    fn new_sequence(&self) -> Sequence {
        Sequence {
            k: vec![Vec::new(); self.layers.len()],
            v: vec![Vec::new(); self.layers.len()],
            len: 0,
        }
    }

    /// Logits at every position of the request.
    pub fn logits(&self, req: &RequestTokens) -> Result<Vec<Vec<f32>>> {
        self.check_request(req, 0)?;
        let mut seq = self.new_sequence();
        Ok(req
            .tokens
            .iter()
            .map(|&t| self.push(&mut seq, t, req.adapter))
            .collect())
    }

    /// `steps` greedy tokens after the request's tokens.
    pub fn greedy(&self, req: &RequestTokens, steps: usize) -> Result<Generation> {
        self.check_request(req, steps.saturating_sub(1))?;
        let mut seq = self.new_sequence();
        let mut last = Vec::new();
        for &t in &req.tokens {
            last = self.push(&mut seq, t, req.adapter);
        }
        let mut out = Generation {
            tokens: Vec::with_capacity(steps),
            logits: Vec::with_capacity(steps),
        };
        for s in 0..steps {
            let token = argmax(&last);
            out.tokens.push(token);
            out.logits.push(std::mem::take(&mut last));
            if s + 1 < steps {
                last = self.push(&mut seq, token, req.adapter);
            }
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean_sq + self.eps).sqrt();
        x.iter()
            .zip(weight)
            .map(|(&v, &w)| r16(w * r16(v * inv)))
            .collect()
    }

    /// A projection with the request's LoRA, if its adapter targets this module.
    fn project(
        &self,
        layer: usize,
        module: TargetModule,
        x: &[f32],
        adapter: Option<usize>,
    ) -> Vec<f32> {
        let mi = module_index(module);
        let mut y: Vec<f32> = matvec(&self.layers[layer].proj[mi], x)
            .into_iter()
            .map(r16)
            .collect();
        let lora = adapter.and_then(|a| {
            let ad = &self.adapters[a];
            ad.layers[layer][mi].as_ref().map(|ab| (ad.scale, ab))
        });
        if let Some((scale, (a, b))) = lora {
            let shrunk = matvec(a, x); // [r], f32 as in peft
            let expanded = matvec(b, &shrunk); // [out]
            for (yo, e) in y.iter_mut().zip(expanded) {
                *yo = r16(*yo + r16(e * scale));
            }
        }
        y
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|&f| {
                let angle = pos as f32 * f;
                (r16(angle.cos()), r16(angle.sin()))
            })
            .unzip();
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (lo, hi) = (head[i], head[i + half]);
                // rotate_half(x) = [-x[half..], x[..half]]; cos/sin repeat over both halves.
                head[i] = r16(r16(lo * cos[i]) + r16(-hi * sin[i]));
                head[i + half] = r16(r16(hi * cos[i]) + r16(lo * sin[i]));
            }
        }
    }

    /// Runs one token through the model, appending its K/V to `seq`; returns its logits.
    fn push(&self, seq: &mut Sequence, token: u32, adapter: Option<usize>) -> Vec<f32> {
        let (h, d) = (self.hidden, self.head_dim);
        let pos = seq.len;
        let t = token as usize;
        let mut x: Vec<f32> = self.embed[t * h..(t + 1) * h].to_vec();
        let group = self.heads / self.kv_heads;
        let kv_width = self.kv_heads * d;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(&x, &layer.input_norm);
            let mut q = self.project(l, TargetModule::Q, &xn, adapter);
            let mut k = self.project(l, TargetModule::K, &xn, adapter);
            let v = self.project(l, TargetModule::V, &xn, adapter);
            self.rope(&mut q, pos);
            self.rope(&mut k, pos);
            seq.k[l].extend_from_slice(&k);
            seq.v[l].extend_from_slice(&v);
            let (keys, values) = (&seq.k[l], &seq.v[l]);
            let mut attn = vec![0f32; h];
            let mut scores = vec![0f32; pos + 1];
            for head in 0..self.heads {
                let kvh = head / group;
                let qh = &q[head * d..(head + 1) * d];
                for (j, s) in scores.iter_mut().enumerate() {
                    let kj = &keys[j * kv_width + kvh * d..j * kv_width + (kvh + 1) * d];
                    *s = dot(qh, kj) * scale;
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut attn[head * d..(head + 1) * d];
                for (j, &p) in scores.iter().enumerate() {
                    let vj = &values[j * kv_width + kvh * d..j * kv_width + (kvh + 1) * d];
                    for (o, &vv) in out.iter_mut().zip(vj) {
                        *o += p * vv;
                    }
                }
                for o in out.iter_mut() {
                    *o = r16(*o / sum);
                }
            }
            let o = self.project(l, TargetModule::O, &attn, adapter);
            for (xi, oi) in x.iter_mut().zip(o) {
                *xi = r16(*xi + oi);
            }
            let xn = self.rms_norm(&x, &layer.post_norm);
            let gate = self.project(l, TargetModule::Gate, &xn, adapter);
            let up = self.project(l, TargetModule::Up, &xn, adapter);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| r16(r16(g / (1.0 + (-g).exp())) * u))
                .collect();
            let down = self.project(l, TargetModule::Down, &act, adapter);
            for (xi, di) in x.iter_mut().zip(down) {
                *xi = r16(*xi + di);
            }
        }
        seq.len += 1;
        let xn = self.rms_norm(&x, &self.norm);
        matvec(&self.lm_head, &xn).into_iter().map(r16).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Reference suites written by tests/gpu/reference.py

/// A directory written by `tests/gpu/reference.py`: models, adapters, and what transformers +
/// peft computed for a mixed batch (see `tests/gpu/README.md` for the format).
#[derive(Clone, Debug)]
pub struct ReferenceSuite {
    pub dir: PathBuf,
    /// Where transformers ran (`cuda` or `cpu`) and in which dtype.
    pub device: String,
    pub dtype: String,
    /// `torch`, `transformers`, `peft` versions, as recorded.
    pub versions: Vec<(String, String)>,
    pub configs: Vec<ReferenceConfig>,
}

/// One model with its adapters and batch.
#[derive(Clone, Debug)]
pub struct ReferenceConfig {
    pub name: String,
    pub model_dir: PathBuf,
    /// `(name, directory)` of each adapter; requests index into this list.
    pub adapters: Vec<(String, PathBuf)>,
    pub requests: Vec<ReferenceRequest>,
}

#[derive(Clone, Debug)]
pub struct ReferenceRequest {
    /// Index into [`ReferenceConfig::adapters`]; `None` = base model.
    pub adapter: Option<usize>,
    pub prompt: Vec<u32>,
    /// transformers' greedy continuation (EOS disabled).
    pub greedy: Vec<u32>,
    /// `[prompt position][vocab]`, from the mixed batch.
    pub prompt_logits: Vec<Vec<f32>>,
    /// `[step][vocab]`: the logits `greedy[step]` was chosen from.
    pub decode_logits: Vec<Vec<f32>>,
}

fn suite_err(path: &Path, reason: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason,
    }
}

fn json_tokens(path: &Path, v: Option<&serde_json::Value>, what: &str) -> Result<Vec<u32>> {
    v.and_then(|v| v.as_array())
        .ok_or_else(|| suite_err(path, format!("`{what}` must be a list of token ids")))?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| suite_err(path, format!("`{what}` holds a non-token {t}")))
        })
        .collect()
}

fn json_str<'a>(path: &Path, v: &'a serde_json::Value, field: &str) -> Result<&'a str> {
    v.get(field)
        .and_then(|s| s.as_str())
        .ok_or_else(|| suite_err(path, format!("missing string field `{field}`")))
}

/// Reads a `[rows, vocab]` F32 or F16 tensor into rows of f32.
fn logits_rows(
    st: &safetensors::SafeTensors<'_>,
    path: &Path,
    name: &str,
    rows: usize,
) -> Result<Vec<Vec<f32>>> {
    let view = st.tensor(name).map_err(|_| Error::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason: "missing".into(),
    })?;
    let shape = view.shape().to_vec();
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => view
            .data()
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                reason: format!("expected F32 or F16 logits, got {other}"),
            })
        }
    };
    if shape.len() != 2 || shape[0] != rows || shape[1] == 0 {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            reason: format!("expected shape [{rows}, vocab], got {shape:?}"),
        });
    }
    Ok(values.chunks_exact(shape[1]).map(|r| r.to_vec()).collect())
}

/// Reads `reference.json` and the logits files it names from `dir`.
pub fn read_reference_suite(dir: &Path) -> Result<ReferenceSuite> {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| suite_err(&path, format!("cannot read: {e}")))?;
    let root: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| suite_err(&path, format!("not valid JSON: {e}")))?;
    let format = root.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != "slora-reference-1" {
        return Err(suite_err(
            &path,
            format!("format `{format}` is not `slora-reference-1`"),
        ));
    }
    let versions = root
        .get("versions")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut configs = Vec::new();
    let list = root
        .get("configs")
        .and_then(|c| c.as_array())
        .ok_or_else(|| suite_err(&path, "missing list `configs`".into()))?;
    for c in list {
        let name = json_str(&path, c, "name")?.to_string();
        let model_dir = dir.join(json_str(&path, c, "model")?);
        let logits_path = dir.join(json_str(&path, c, "logits")?);
        let mut adapters = Vec::new();
        for a in c
            .get("adapters")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            adapters.push((
                json_str(&path, a, "name")?.to_string(),
                dir.join(json_str(&path, a, "path")?),
            ));
        }
        let bytes = std::fs::read(&logits_path)
            .map_err(|e| suite_err(&logits_path, format!("cannot read: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| suite_err(&logits_path, format!("not a valid safetensors file: {e}")))?;
        let mut requests = Vec::new();
        let reqs = c
            .get("requests")
            .and_then(|r| r.as_array())
            .ok_or_else(|| suite_err(&path, format!("config `{name}`: missing list `requests`")))?;
        for (i, r) in reqs.iter().enumerate() {
            let adapter = match r.get("adapter").and_then(|a| a.as_str()) {
                None => None,
                Some(an) => Some(adapters.iter().position(|(n, _)| n == an).ok_or_else(|| {
                    suite_err(&path, format!("request {i} names unknown adapter `{an}`"))
                })?),
            };
            let prompt = json_tokens(&path, r.get("prompt"), "prompt")?;
            let greedy = json_tokens(&path, r.get("greedy"), "greedy")?;
            let prompt_logits = logits_rows(
                &st,
                &logits_path,
                &format!("request.{i}.prompt"),
                prompt.len(),
            )?;
            let decode_logits = logits_rows(
                &st,
                &logits_path,
                &format!("request.{i}.decode"),
                greedy.len(),
            )?;
            requests.push(ReferenceRequest {
                adapter,
                prompt,
                greedy,
                prompt_logits,
                decode_logits,
            });
        }
        configs.push(ReferenceConfig {
            name,
            model_dir,
            adapters,
            requests,
        });
    }
    Ok(ReferenceSuite {
        dir: dir.to_path_buf(),
        device: root
            .get("device")
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_string(),
        dtype: root
            .get("dtype")
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_string(),
        versions,
        configs,
    })
}

/// Running maximum of the difference between two sets of logits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LogitStats {
    /// Largest `|got - want|`.
    pub max_abs: f32,
    /// Largest `|got - want| / max(|want| over that row)`: the error relative to the row's
    /// logit scale (element-wise relative error is meaningless for logits near zero).
    pub max_rel: f32,
    /// Rows compared, and rows whose argmax agrees.
    pub rows: usize,
    pub argmax_agree: usize,
    /// Logits compared, and those that are bit-for-bit equal.
    pub elements: usize,
    pub exact: usize,
}

impl LogitStats {
    /// Adds one row; rows of different lengths count as an infinite error.
    pub fn add_row(&mut self, got: &[f32], want: &[f32]) {
        self.rows += 1;
        if got.len() != want.len() {
            self.max_abs = f32::INFINITY;
            self.max_rel = f32::INFINITY;
            return;
        }
        let scale = want
            .iter()
            .fold(0f32, |m, w| m.max(w.abs()))
            .max(f32::MIN_POSITIVE);
        self.elements += want.len();
        for (g, w) in got.iter().zip(want) {
            self.exact += usize::from(g == w);
            let diff = (g - w).abs();
            let diff = if diff.is_nan() { f32::INFINITY } else { diff };
            self.max_abs = self.max_abs.max(diff);
            self.max_rel = self.max_rel.max(diff / scale);
        }
        if argmax(got) == argmax(want) {
            self.argmax_agree += 1;
        }
    }

    pub fn merge(&mut self, other: &LogitStats) {
        self.max_abs = self.max_abs.max(other.max_abs);
        self.max_rel = self.max_rel.max(other.max_rel);
        self.rows += other.rows;
        self.argmax_agree += other.argmax_agree;
        self.elements += other.elements;
        self.exact += other.exact;
    }
}

/// How a greedy continuation compares with the reference's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GreedyCheck {
    pub steps: usize,
    /// Leading tokens that agree.
    pub matched: usize,
    /// At the first disagreement: how far the reference's own logits put our token below its
    /// choice (`want[ref token] - want[our token]`, >= 0). A near-tie (a margin within the
    /// logit tolerance) is an acceptable divergence; later tokens are then incomparable.
    pub margin_at_divergence: Option<f32>,
    /// The largest `|logit|` of the reference's row at the divergence, the scale the margin
    /// is judged against.
    pub scale_at_divergence: f32,
}

impl GreedyCheck {
    pub fn compare(got: &[u32], want: &[u32], want_logits: &[Vec<f32>]) -> GreedyCheck {
        let matched = got.iter().zip(want).take_while(|(g, w)| g == w).count();
        let row = want_logits.get(matched);
        let scale_at_divergence = row.map_or(0.0, |r| r.iter().fold(0f32, |m, x| m.max(x.abs())));
        let margin_at_divergence = (matched < want.len()).then(|| {
            let pick = |t: Option<&u32>| {
                t.and_then(|&t| row.and_then(|r| r.get(t as usize)).copied())
                    .unwrap_or(f32::NEG_INFINITY)
            };
            let margin = pick(want.get(matched)) - pick(got.get(matched));
            if margin.is_nan() {
                f32::INFINITY
            } else {
                margin
            }
        });
        GreedyCheck {
            steps: want.len(),
            matched,
            margin_at_divergence,
            scale_at_divergence,
        }
    }

    /// True when all tokens agree, or the first disagreement is a near-tie: a margin within
    /// `rel_tol` of the row's largest `|logit|`.
    pub fn acceptable(&self, rel_tol: f32) -> bool {
        self.margin_at_divergence
            .is_none_or(|m| m <= rel_tol * self.scale_at_divergence)
    }
}

/// The CPU reference against one config of a suite.
#[derive(Clone, Debug)]
pub struct ConfigCheck {
    pub name: String,
    /// Prompt logits (every position, mixed batch).
    pub prompt: LogitStats,
    /// Decode logits, teacher-forced: our forward over `prompt ++ greedy[..steps-1]` against
    /// the logits transformers chose each greedy token from. Free of divergence effects.
    pub decode: LogitStats,
    /// Our own greedy continuation per request.
    pub greedy: Vec<GreedyCheck>,
}

impl ConfigCheck {
    /// `Ok` when every logit is within `rel_tol` of its row's largest `|logit|` (fp16 carries
    /// about 2^-11 relative; see [`LogitStats::max_rel`]), and every greedy run matches up to a
    /// near-tie within the same tolerance.
    pub fn verdict(&self, rel_tol: f32) -> std::result::Result<(), String> {
        let worst = self.prompt.max_rel.max(self.decode.max_rel);
        if worst.is_nan() || worst > rel_tol {
            return Err(format!(
                "{}: logits differ by up to {worst:.2e} of the row's largest logit (> {rel_tol:.2e}; \
                 max |diff| {})",
                self.name,
                self.prompt.max_abs.max(self.decode.max_abs)
            ));
        }
        if let Some((i, g)) = self
            .greedy
            .iter()
            .enumerate()
            .find(|(_, g)| !g.acceptable(rel_tol))
        {
            return Err(format!(
                "{}: request {i}: greedy tokens diverge at step {} with a margin of {:?}",
                self.name, g.matched, g.margin_at_divergence
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for ConfigCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exact = |s: &LogitStats| 100.0 * s.exact as f64 / s.elements.max(1) as f64;
        let matched: usize = self.greedy.iter().map(|g| g.matched).sum();
        let steps: usize = self.greedy.iter().map(|g| g.steps).sum();
        let ties = self
            .greedy
            .iter()
            .filter(|g| g.margin_at_divergence.is_some())
            .count();
        write!(
            f,
            "{}: prompt logits max |diff| {:.4} (rel {:.1e}, {:.1}% bit-exact, argmax {}/{}); \
             decode logits max |diff| {:.4} (rel {:.1e}, {:.1}% bit-exact, argmax {}/{}); \
             greedy {matched}/{steps} tokens before divergence, {ties} requests diverged",
            self.name,
            self.prompt.max_abs,
            self.prompt.max_rel,
            exact(&self.prompt),
            self.prompt.argmax_agree,
            self.prompt.rows,
            self.decode.max_abs,
            self.decode.max_rel,
            exact(&self.decode),
            self.decode.argmax_agree,
            self.decode.rows,
        )?;
        for (i, g) in self.greedy.iter().enumerate() {
            if let Some(m) = g.margin_at_divergence {
                write!(f, "; request {i} at step {} (margin {m})", g.matched)?;
            }
        }
        Ok(())
    }
}

/// Loads each config's model and adapters with [`crate::weights`], runs the CPU reference on
/// its batch and compares with what transformers computed.
pub fn check_suite_on_cpu(suite: &ReferenceSuite) -> Result<Vec<ConfigCheck>> {
    let mut out = Vec::new();
    for config in &suite.configs {
        let (model, extras, weights) = crate::weights::load_llama(&config.model_dir)?;
        let adapters = config
            .adapters
            .iter()
            .map(|(_, dir)| crate::weights::load_peft_adapter(dir, &model))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&PeftAdapter> = adapters.iter().collect();
        let reference = ReferenceModel::new(&model, &extras, &weights, &refs)?;
        let mut check = ConfigCheck {
            name: config.name.clone(),
            prompt: LogitStats::default(),
            decode: LogitStats::default(),
            greedy: Vec::new(),
        };
        for req in &config.requests {
            let prompt = RequestTokens {
                tokens: req.prompt.clone(),
                adapter: req.adapter,
            };
            for (got, want) in reference.logits(&prompt)?.iter().zip(&req.prompt_logits) {
                check.prompt.add_row(got, want);
            }
            if req.greedy.is_empty() {
                continue;
            }
            let mut forced = prompt.clone();
            forced
                .tokens
                .extend_from_slice(&req.greedy[..req.greedy.len() - 1]);
            let logits = reference.logits(&forced)?;
            for (got, want) in logits[req.prompt.len() - 1..]
                .iter()
                .zip(&req.decode_logits)
            {
                check.decode.add_row(got, want);
            }
            let ours = reference.greedy(&prompt, req.greedy.len())?;
            check.greedy.push(GreedyCheck::compare(
                &ours.tokens,
                &req.greedy,
                &req.decode_logits,
            ));
        }
        out.push(check);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::synthetic_adapter;
    use slora_engine::spec::DType;

    fn tiny(kv_heads: u32) -> (ModelSpec, LlamaExtras, LlamaWeights) {
        let model = ModelSpec {
            name: "tiny".into(),
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: kv_heads,
            intermediate_size: 48,
            vocab_size: 50,
            max_position: 64,
            rope_theta: 10_000.0,
            dtype: DType::Fp16,
        };
        let extras = LlamaExtras {
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let w = LlamaWeights::synthetic(&model, false, 3);
        (model, extras, w)
    }

    #[test]
    fn batch_members_are_independent_and_prefixes_agree() {
        let (m, e, w) = tiny(2);
        let a = synthetic_adapter(&m, 4, &TargetModule::ALL, 8.0, 5);
        let batch = vec![
            RequestTokens {
                tokens: vec![1, 2, 3, 4, 5],
                adapter: Some(0),
            },
            RequestTokens {
                tokens: vec![1, 2, 3],
                adapter: None,
            },
        ];
        let all = forward_logits(&m, &e, &w, &[&a], &batch).unwrap();
        let alone = forward_logits(&m, &e, &w, &[&a], &batch[1..]).unwrap();
        assert_eq!(all[1], alone[0]);
        let prefix = forward_logits(
            &m,
            &e,
            &w,
            &[&a],
            &[RequestTokens {
                tokens: vec![1, 2, 3],
                adapter: Some(0),
            }],
        )
        .unwrap();
        assert_eq!(&all[0][..3], &prefix[0][..]);
        // The adapter changes the logits.
        assert_ne!(all[0][..3], all[1][..]);
        assert!(all.iter().flatten().flatten().all(|x| x.is_finite()));
    }

    #[test]
    fn greedy_equals_recomputing_the_full_forward() {
        let (m, e, w) = tiny(4);
        let a = synthetic_adapter(&m, 2, &TargetModule::ATTENTION, 4.0, 9);
        let req = RequestTokens {
            tokens: vec![7, 8, 9],
            adapter: Some(0),
        };
        let tokens = greedy_generate(&m, &e, &w, &[&a], std::slice::from_ref(&req), 6).unwrap();
        let mut seq = req.clone();
        for &expected in &tokens[0] {
            let logits = forward_logits(&m, &e, &w, &[&a], std::slice::from_ref(&seq)).unwrap();
            assert_eq!(argmax(logits[0].last().unwrap()), expected);
            seq.tokens.push(expected);
        }
    }

    #[test]
    fn zero_b_adapter_is_the_base_model() {
        let (m, e, w) = tiny(1);
        let mut a = synthetic_adapter(&m, 4, &TargetModule::ALL, 8.0, 1);
        for b in a.b.values_mut() {
            b.iter_mut().for_each(|x| *x = f16::ZERO);
        }
        let reqs = [
            RequestTokens {
                tokens: vec![3, 1, 4, 1, 5],
                adapter: Some(0),
            },
            RequestTokens {
                tokens: vec![3, 1, 4, 1, 5],
                adapter: None,
            },
        ];
        let out = forward_logits(&m, &e, &w, &[&a], &reqs).unwrap();
        assert_eq!(out[0], out[1]);
    }

    #[test]
    fn bad_requests_are_errors() {
        let (m, e, w) = tiny(2);
        let run = |tokens: Vec<u32>, adapter| {
            forward_logits(&m, &e, &w, &[], &[RequestTokens { tokens, adapter }])
        };
        assert!(run(vec![], None)
            .unwrap_err()
            .to_string()
            .contains("at least one"));
        assert!(run(vec![50], None)
            .unwrap_err()
            .to_string()
            .contains("outside"));
        assert!(run(vec![1], Some(0))
            .unwrap_err()
            .to_string()
            .contains("adapter index"));
        assert!(run(vec![1; 65], None)
            .unwrap_err()
            .to_string()
            .contains("max_position"));
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 2.0]), 2);
    }

    #[test]
    fn greedy_check_reports_near_ties() {
        let want_logits = vec![vec![0.0, 1.0], vec![1.0, 0.999]];
        let g = GreedyCheck::compare(&[1, 1], &[1, 0], &want_logits);
        assert_eq!(g.matched, 1);
        assert_eq!(g.scale_at_divergence, 1.0);
        assert!(g.acceptable(0.01));
        assert!(!g.acceptable(0.0001));
        assert!(GreedyCheck::compare(&[1, 0], &[1, 0], &want_logits).acceptable(0.0));
    }
}
