//! The Llama / PEFT loaders on files written here with the safetensors crate (good and bad
//! ones), and the CPU reference against transformers: always on the committed tiny fixture, and
//! on a full `tests/gpu/reference.py` output when `SLORA_REFERENCE_DIR` points at one.

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use slora_engine::spec::{DType, ModelSpec, TargetModule};
use slora_kernels::reference_model::{
    check_suite_on_cpu, forward_logits, read_reference_suite, RequestTokens,
};
use slora_kernels::weights::{
    check_adapter_fits, load_llama, load_peft_adapter, read_llama_config, synthetic_adapter,
    LlamaExtras, LlamaWeights, PeftAdapter,
};
use slora_kernels::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Writing test files

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f16_tensor(shape: Vec<usize>, xs: &[f16]) -> Tensor {
    Tensor {
        dtype: Dtype::F16,
        shape,
        data: xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
    }
}

fn bf16_tensor(shape: Vec<usize>, xs: &[f16]) -> Tensor {
    Tensor {
        dtype: Dtype::BF16,
        shape,
        data: xs
            .iter()
            .flat_map(|x| half::bf16::from_f32(x.to_f32()).to_bits().to_le_bytes())
            .collect(),
    }
}

fn f32_tensor(shape: Vec<usize>, xs: &[f32]) -> Tensor {
    Tensor {
        dtype: Dtype::F32,
        shape,
        data: xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A fresh, empty directory under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("slora-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small_model() -> ModelSpec {
    ModelSpec {
        name: "model".into(),
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 48,
        vocab_size: 40,
        max_position: 64,
        rope_theta: 10_000.0,
        dtype: DType::Fp16,
    }
}

fn config_json(m: &ModelSpec, tie: bool) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "intermediate_size": m.intermediate_size,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "dtype": "float16",
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
    })
}

fn model_tensors(m: &ModelSpec, w: &LlamaWeights) -> BTreeMap<String, Tensor> {
    let (h, v) = (m.hidden_size as usize, m.vocab_size as usize);
    let mut t = BTreeMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        f16_tensor(vec![v, h], &w.embed_tokens),
    );
    t.insert("model.norm.weight".into(), f16_tensor(vec![h], &w.norm));
    if let Some(head) = &w.lm_head {
        t.insert("lm_head.weight".into(), f16_tensor(vec![v, h], head));
    }
    for (l, layer) in w.layers.iter().enumerate() {
        t.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            f16_tensor(vec![h], &layer.input_layernorm),
        );
        t.insert(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            f16_tensor(vec![h], &layer.post_attention_layernorm),
        );
        for module in TargetModule::ALL {
            let (input, output) = m.module_shape(module);
            let block = if matches!(
                module,
                TargetModule::Gate | TargetModule::Up | TargetModule::Down
            ) {
                "mlp"
            } else {
                "self_attn"
            };
            t.insert(
                format!("model.layers.{l}.{block}.{module}.weight"),
                f16_tensor(
                    vec![output as usize, input as usize],
                    layer.projection(module),
                ),
            );
        }
    }
    t
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A model directory with `config.json` and `model.safetensors`, after `edit` changes the
/// tensors.
fn write_model(
    name: &str,
    tie: bool,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> (PathBuf, ModelSpec, LlamaWeights) {
    let m = small_model();
    let w = LlamaWeights::synthetic(&m, tie, 11);
    let dir = temp_dir(name);
    write_json(&dir.join("config.json"), &config_json(&m, tie));
    let mut tensors = model_tensors(&m, &w);
    edit(&mut tensors);
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    (dir, m, w)
}

fn adapter_config(a: &PeftAdapter) -> Value {
    json!({
        "peft_type": "LORA",
        "r": a.rank,
        "lora_alpha": a.alpha,
        "target_modules": a.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": a.use_rslora,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "modules_to_save": null,
        "lora_dropout": 0.0,
    })
}

/// peft's key for one LoRA tensor, with an optional adapter-name segment.
fn lora_key(layer: u32, module: TargetModule, which: char, name: Option<&str>) -> String {
    let block = if matches!(
        module,
        TargetModule::Gate | TargetModule::Up | TargetModule::Down
    ) {
        "mlp"
    } else {
        "self_attn"
    };
    let seg = name.map(|n| format!("{n}.")).unwrap_or_default();
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.{seg}weight")
}

/// Adapter tensors as peft 0.21 saves them: float32.
fn adapter_tensors(a: &PeftAdapter, m: &ModelSpec, name: Option<&str>) -> BTreeMap<String, Tensor> {
    let r = a.rank as usize;
    let mut t = BTreeMap::new();
    for (&(l, module), data) in &a.a {
        let (input, _) = m.module_shape(module);
        let xs: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
        t.insert(
            lora_key(l, module, 'A', name),
            f32_tensor(vec![r, input as usize], &xs),
        );
    }
    for (&(l, module), data) in &a.b {
        let (_, output) = m.module_shape(module);
        let xs: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
        t.insert(
            lora_key(l, module, 'B', name),
            f32_tensor(vec![output as usize, r], &xs),
        );
    }
    t
}

fn write_adapter(
    name: &str,
    edit_config: impl FnOnce(&mut Value),
    edit_tensors: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> (PathBuf, ModelSpec, PeftAdapter) {
    let m = small_model();
    let a = synthetic_adapter(&m, 4, &TargetModule::ATTENTION, 8.0, 21);
    let dir = temp_dir(name);
    let mut config = adapter_config(&a);
    edit_config(&mut config);
    write_json(&dir.join("adapter_config.json"), &config);
    let mut tensors = adapter_tensors(&a, &m, None);
    edit_tensors(&mut tensors);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors);
    (dir, m, a)
}

fn message(err: Error) -> String {
    err.to_string()
}

/// Asserts the error message contains every fragment.
fn assert_mentions(err: Error, fragments: &[&str]) {
    let text = message(err);
    for f in fragments {
        assert!(text.contains(f), "`{f}` missing from: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Llama checkpoints

#[test]
fn single_file_checkpoint_round_trips() {
    let (dir, m, w) = write_model("single", false, |_| {});
    let (spec, extras, loaded) = load_llama(&dir).unwrap();
    assert_eq!(spec.hidden_size, m.hidden_size);
    assert_eq!(spec.num_kv_heads, 2);
    assert_eq!(spec.dtype, DType::Fp16);
    assert_eq!(spec.name, dir.file_name().unwrap().to_string_lossy());
    assert_eq!(extras.rms_norm_eps, 1e-5);
    assert_eq!(extras.eos_token_ids, vec![2, 3]);
    assert_eq!(extras.bos_token_id, Some(1));
    assert!(!extras.tie_word_embeddings);
    assert_eq!(loaded, w);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tied_embeddings_share_the_lm_head() {
    let (dir, _, w) = write_model("tied", true, |_| {});
    let (_, extras, loaded) = load_llama(&dir).unwrap();
    assert!(extras.tie_word_embeddings);
    assert!(loaded.lm_head.is_none());
    assert_eq!(loaded.lm_head(), &w.embed_tokens[..]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sharded_checkpoint_round_trips() {
    let m = small_model();
    let w = LlamaWeights::synthetic(&m, false, 5);
    let dir = temp_dir("sharded");
    write_json(&dir.join("config.json"), &config_json(&m, false));
    let tensors = model_tensors(&m, &w);
    let (mut first, mut second) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), json!(file));
        if i % 2 == 0 {
            first.insert(name, t);
        } else {
            second.insert(name, t);
        }
    }
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &first);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &second);
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": map}),
    );
    let (_, _, loaded) = load_llama(&dir).unwrap();
    assert_eq!(loaded, w);

    // A tensor the index does not list.
    map.remove("model.layers.1.mlp.up_proj.weight");
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": map}),
    );
    assert_mentions(
        load_llama(&dir).unwrap_err(),
        &[
            "model.safetensors.index.json",
            "model.layers.1.mlp.up_proj.weight",
            "missing from weight_map",
            "[48, 32]",
        ],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bf16_checkpoints_are_converted_to_f16() {
    let m = small_model();
    let w = LlamaWeights::synthetic(&m, false, 8);
    let dir = temp_dir("bf16");
    let mut config = config_json(&m, false);
    config["dtype"] = json!("bfloat16");
    write_json(&dir.join("config.json"), &config);
    let tensors: BTreeMap<String, Tensor> = model_tensors(&m, &w)
        .into_iter()
        .map(|(name, t)| {
            let xs: Vec<f16> = t
                .data
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            (name, bf16_tensor(t.shape, &xs))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    let (spec, _, loaded) = load_llama(&dir).unwrap();
    assert_eq!(spec.dtype, DType::Bf16);
    assert_eq!(loaded.source_dtype, DType::Bf16);
    // bf16 keeps 8 mantissa bits: within 2^-8 relative of the f16 originals.
    for (a, b) in loaded.embed_tokens.iter().zip(&w.embed_tokens) {
        let (a, b) = (a.to_f32(), b.to_f32());
        assert!((a - b).abs() <= b.abs() / 256.0 + 1e-7, "{a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A change to `config.json` and what the error must then mention.
type ConfigEdit<'a> = (&'a dyn Fn(&mut Value), &'a [&'a str]);

#[test]
fn config_spellings_defaults_and_refusals() {
    let m = small_model();
    let dir = temp_dir("config");
    let write = |edit: &dyn Fn(&mut Value)| {
        let mut c = config_json(&m, false);
        edit(&mut c);
        write_json(&dir.join("config.json"), &c);
    };
    // transformers 4.x spelling, defaults for kv heads and theta.
    write(&|c| {
        let o = c.as_object_mut().unwrap();
        o.remove("dtype");
        o.remove("rope_parameters");
        o.remove("num_key_value_heads");
        o.remove("tie_word_embeddings");
        o.insert("torch_dtype".into(), json!("float16"));
        o.insert("rope_scaling".into(), Value::Null);
    });
    let (spec, extras) = read_llama_config(&dir).unwrap();
    assert_eq!(spec.num_kv_heads, spec.num_heads);
    assert_eq!(spec.rope_theta, 10_000.0);
    assert!(!extras.tie_word_embeddings);
    write(&|c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = json!(500000.0);
    });
    assert_eq!(read_llama_config(&dir).unwrap().0.rope_theta, 500_000.0);

    let refused: Vec<ConfigEdit<'_>> = vec![
        (
            &|c| c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0}),
            &["rope_scaling", "llama3", "not supported"],
        ),
        (
            &|c| c["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e4}),
            &["rope_parameters", "yarn"],
        ),
        (&|c| c["dtype"] = json!("float32"), &["float32", "float16"]),
        (
            &|c| {
                c.as_object_mut().unwrap().remove("dtype");
            },
            &["dtype"],
        ),
        (
            &|c| c["hidden_act"] = json!("gelu"),
            &["hidden_act", "gelu"],
        ),
        (&|c| c["attention_bias"] = json!(true), &["attention_bias"]),
        (&|c| c["head_dim"] = json!(16), &["head_dim 16"]),
        (&|c| c["model_type"] = json!("gpt2"), &["gpt2"]),
        (
            &|c| c["num_key_value_heads"] = json!(3),
            &["num_kv_heads", "3"],
        ),
        (
            &|c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            },
            &["hidden_size", "missing"],
        ),
        (&|c| c["vocab_size"] = json!(-4), &["vocab_size", "-4"]),
    ];
    for (edit, fragments) in refused {
        write(edit);
        let err = read_llama_config(&dir).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err}");
        let mut all = vec!["config.json"];
        all.extend_from_slice(fragments);
        assert_mentions(err, &all);
    }
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert_mentions(read_llama_config(&dir).unwrap_err(), &["not valid JSON"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_files_are_named() {
    let dir = temp_dir("missing");
    assert_mentions(
        load_llama(&dir).unwrap_err(),
        &["config.json", "cannot read"],
    );
    write_json(
        &dir.join("config.json"),
        &config_json(&small_model(), false),
    );
    assert_mentions(
        load_llama(&dir).unwrap_err(),
        &["neither model.safetensors nor model.safetensors.index.json"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn truncated_safetensors_is_a_file_error() {
    let (dir, _, _) = write_model("truncated", false, |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, 40, 5] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_llama(&dir).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err}");
        assert_mentions(err, &["model.safetensors", "truncated"]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wrong_shape_names_file_tensor_and_both_shapes() {
    let (dir, _, _) = write_model("shape", false, |t| {
        t.insert(
            "model.layers.1.self_attn.k_proj.weight".into(),
            f16_tensor(vec![32, 32], &vec![f16::ZERO; 32 * 32]),
        );
    });
    let err = load_llama(&dir).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err}");
    assert_mentions(
        err,
        &[
            "model.safetensors",
            "model.layers.1.self_attn.k_proj.weight",
            "expected shape [16, 32] F16",
            "got [32, 32] F16",
        ],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wrong_dtype_and_missing_tensor_are_named() {
    let (dir, _, _) = write_model("dtype", false, |t| {
        t.insert("model.norm.weight".into(), f32_tensor(vec![32], &[1.0; 32]));
    });
    assert_mentions(
        load_llama(&dir).unwrap_err(),
        &[
            "model.norm.weight",
            "expected shape [32] F16",
            "got [32] F32",
        ],
    );
    let (dir2, _, _) = write_model("missing-tensor", false, |t| {
        t.remove("lm_head.weight");
    });
    let err = load_llama(&dir2).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err}");
    assert_mentions(err, &["lm_head.weight", "missing", "[40, 32]"]);
    let (dir3, _, _) = write_model("nan", false, |t| {
        let mut xs = vec![f16::ONE; 32];
        xs[7] = f16::NAN;
        t.insert("model.norm.weight".into(), f16_tensor(vec![32], &xs));
    });
    assert_mentions(
        load_llama(&dir3).unwrap_err(),
        &["model.norm.weight", "element 7", "not a finite"],
    );
    for d in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

// ---------------------------------------------------------------------------------------------
// PEFT adapters

#[test]
fn peft_adapter_round_trips_from_float32() {
    let (dir, m, a) = write_adapter("adapter", |_| {}, |_| {});
    let loaded = load_peft_adapter(&dir, &m).unwrap();
    assert_eq!(loaded.rank, 4);
    assert_eq!(loaded.alpha, 8.0);
    assert_eq!(loaded.scale(), 2.0);
    assert_eq!(loaded.targets, TargetModule::ATTENTION.to_vec());
    assert_eq!(loaded.a, a.a);
    assert_eq!(loaded.b, a.b);
    assert_eq!(loaded.spec().pages(&m), a.spec().pages(&m));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn adapter_name_segments_single_string_targets_and_rslora() {
    let m = small_model();
    let a = synthetic_adapter(&m, 8, &[TargetModule::V], 16.0, 2);
    let dir = temp_dir("named");
    let mut config = adapter_config(&a);
    config["target_modules"] = json!("v_proj");
    config["use_rslora"] = json!(true);
    write_json(&dir.join("adapter_config.json"), &config);
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &adapter_tensors(&a, &m, Some("default")),
    );
    let loaded = load_peft_adapter(&dir, &m).unwrap();
    assert_eq!(loaded.targets, vec![TargetModule::V]);
    assert_eq!(loaded.b, a.b);
    assert!((loaded.scale() - 16.0 / 8f32.sqrt()).abs() < 1e-6);
    // A regex (or all-linear) string: the file decides.
    config["target_modules"] = json!(".*\\.(v_proj)");
    write_json(&dir.join("adapter_config.json"), &config);
    assert_eq!(
        load_peft_adapter(&dir, &m).unwrap().targets,
        vec![TargetModule::V]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn adapter_for_another_model_size_is_refused() {
    // lora_A [r, in] with in = 64 while the model's hidden size is 32.
    let (dir, m, _) = write_adapter(
        "wrong-in",
        |_| {},
        |t| {
            t.insert(
                lora_key(0, TargetModule::Q, 'A', None),
                f32_tensor(vec![4, 64], &[0.0; 256]),
            );
        },
    );
    let err = load_peft_adapter(&dir, &m).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err}");
    assert_mentions(
        err,
        &[
            "adapter_model.safetensors",
            "layers.0.self_attn.q_proj.lora_A.weight",
            "expected shape [4, 32]",
            "got [4, 64]",
            "another size",
        ],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn rank_in_config_must_match_the_tensors() {
    let (dir, m, _) = write_adapter("wrong-rank", |c| c["r"] = json!(8), |_| {});
    assert_mentions(
        load_peft_adapter(&dir, &m).unwrap_err(),
        &["lora_A.weight", "rank 4", "r = 8", "expected shape [8, 32]"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn target_modules_must_match_model_and_file() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "lm-head",
            json!(["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]),
            &["target module `lm_head`", "not a projection"],
        ),
        (
            "not-in-file",
            json!(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
            &["lists up_proj", "no up_proj weights"],
        ),
        (
            "not-listed",
            json!(["q_proj", "k_proj", "v_proj"]),
            &["o_proj.lora_A.weight", "does not list"],
        ),
    ];
    for (name, targets, fragments) in cases {
        let (dir, m, _) = write_adapter(name, |c| c["target_modules"] = targets, |_| {});
        assert_mentions(load_peft_adapter(&dir, &m).unwrap_err(), fragments);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn adapter_layers_must_exist_and_be_complete() {
    let (dir, m, _) = write_adapter(
        "extra-layer",
        |_| {},
        |t| {
            t.insert(
                lora_key(2, TargetModule::Q, 'A', None),
                f32_tensor(vec![4, 32], &[0.0; 128]),
            );
        },
    );
    assert_mentions(
        load_peft_adapter(&dir, &m).unwrap_err(),
        &["layers.2.", "layer 2 does not exist", "has 2 layers"],
    );
    let (dir2, m, _) = write_adapter(
        "missing-b",
        |_| {},
        |t| {
            t.remove(&lora_key(1, TargetModule::K, 'B', None));
        },
    );
    let err = load_peft_adapter(&dir2, &m).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err}");
    assert_mentions(err, &["layers.1.self_attn.k_proj.lora_B.weight", "missing"]);
    let (dir3, m, _) = write_adapter(
        "stray",
        |_| {},
        |t| {
            t.insert(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                f32_tensor(vec![32], &[1.0; 32]),
            );
        },
    );
    assert_mentions(
        load_peft_adapter(&dir3, &m).unwrap_err(),
        &["lora_magnitude_vector", "not a LoRA weight"],
    );
    for d in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn unsupported_adapter_options_are_refused() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("bias", json!({"bias": "all"}), &["bias `all`"]),
        ("dora", json!({"use_dora": true}), &["DoRA"]),
        ("fan", json!({"fan_in_fan_out": true}), &["fan_in_fan_out"]),
        (
            "pattern",
            json!({"rank_pattern": {"q_proj": 8}}),
            &["rank_pattern"],
        ),
        (
            "layers",
            json!({"layers_to_transform": [0]}),
            &["layers_to_transform"],
        ),
        ("type", json!({"peft_type": "IA3"}), &["IA3"]),
        ("zero-rank", json!({"r": 0}), &["r must be at least 1"]),
    ];
    for (name, patch, fragments) in cases {
        let (dir, m, _) = write_adapter(
            name,
            |c| {
                for (k, v) in patch.as_object().unwrap() {
                    c[k] = v.clone();
                }
            },
            |_| {},
        );
        let err = load_peft_adapter(&dir, &m).unwrap_err();
        let mut all = vec!["adapter_config.json"];
        all.extend_from_slice(fragments);
        assert_mentions(err, &all);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn adapter_values_beyond_f16_and_bad_dtypes_are_refused() {
    let (dir, m, _) = write_adapter(
        "overflow",
        |_| {},
        |t| {
            let mut xs = vec![0.0f32; 128];
            xs[5] = 1.0e6;
            t.insert(
                lora_key(0, TargetModule::V, 'A', None),
                f32_tensor(vec![4, 32], &xs),
            );
        },
    );
    assert_mentions(
        load_peft_adapter(&dir, &m).unwrap_err(),
        &["v_proj.lora_A.weight", "element 5", "1000000"],
    );
    let (dir2, m, _) = write_adapter(
        "int",
        |_| {},
        |t| {
            t.insert(
                lora_key(0, TargetModule::V, 'A', None),
                Tensor {
                    dtype: Dtype::I32,
                    shape: vec![4, 32],
                    data: vec![0; 512],
                },
            );
        },
    );
    assert_mentions(
        load_peft_adapter(&dir2, &m).unwrap_err(),
        &["expected F32, F16 or BF16, got I32"],
    );
    let dir3 = temp_dir("no-weights");
    write_json(
        &dir3.join("adapter_config.json"),
        &adapter_config(&synthetic_adapter(&m, 4, &[TargetModule::Q], 8.0, 0)),
    );
    assert_mentions(
        load_peft_adapter(&dir3, &m).unwrap_err(),
        &["adapter_model.safetensors", "not found"],
    );
    std::fs::write(dir3.join("adapter_model.safetensors"), b"\x10\x00").unwrap();
    assert_mentions(
        load_peft_adapter(&dir3, &m).unwrap_err(),
        &["adapter_model.safetensors", "not a valid safetensors file"],
    );
    for d in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn adapter_larger_than_the_pool_is_refused() {
    let m = ModelSpec::preset("llama-3-8b").unwrap();
    // Rank 8 on q,k,v,o of a GQA model: 8 × 16 = 128 pages.
    let spec_pages = slora_engine::spec::AdapterSpec::attention(8).pages(&m);
    assert_eq!(spec_pages, 128);
    let small = small_model();
    let a = synthetic_adapter(&small, 8, &TargetModule::ATTENTION, 16.0, 1);
    let need = a.spec().pages(&small);
    check_adapter_fits(&a, &small, need).unwrap();
    let err = check_adapter_fits(&a, &small, need - 1).unwrap_err();
    assert_mentions(
        err,
        &[
            "synthetic(rank=8",
            &format!("needs {need} pages"),
            &format!("only {} pages", need - 1),
        ],
    );
}

#[test]
fn synthetic_adapters_are_seeded_and_keep_activations_finite() {
    let m = small_model();
    let a = synthetic_adapter(&m, 16, &TargetModule::ALL, 32.0, 4);
    assert_eq!(a, synthetic_adapter(&m, 16, &TargetModule::ALL, 32.0, 4));
    assert_ne!(
        a.a,
        synthetic_adapter(&m, 16, &TargetModule::ALL, 32.0, 5).a
    );
    a.check_shapes(&m).unwrap();
    let w = LlamaWeights::synthetic(&m, false, 1);
    let extras = LlamaExtras {
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let batch = [
        RequestTokens {
            tokens: (0..40).collect(),
            adapter: Some(0),
        },
        RequestTokens {
            tokens: (0..40).collect(),
            adapter: None,
        },
    ];
    let out = forward_logits(&m, &extras, &w, &[&a], &batch).unwrap();
    assert!(out.iter().flatten().flatten().all(|x| x.is_finite()));
    let moved = out[0]
        .iter()
        .flatten()
        .zip(out[1].iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 0.05,
        "the adapter should change the logits: {moved}"
    );
}

// ---------------------------------------------------------------------------------------------
// Against transformers + peft

/// Logits within this fraction of their row's largest |logit| of transformers'. Both sides
/// round to fp16 at the same points, so what differs is accumulation order: an ulp or two of
/// fp16 at the row's scale (2^-10 relative is one ulp). Measured: 1 ulp (max_rel 5.2e-4 on the
/// fixture, 1.1e-3 against CPU and H200 runs of the full suite).
const REL_TOL: f32 = 4e-3;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

#[test]
fn tiny_fixture_matches_transformers() {
    let suite = read_reference_suite(&fixture_dir()).unwrap();
    assert_eq!(suite.configs.len(), 1);
    let checks = check_suite_on_cpu(&suite).unwrap();
    for c in &checks {
        println!("{c}");
        c.verdict(REL_TOL).unwrap();
        assert_eq!(c.prompt.rows, 5 + 9 + 7);
        assert_eq!(c.prompt.argmax_agree, c.prompt.rows);
    }
    // The fixture's first adapter targets every projection, its second q and v only (peft's
    // default for Llama: the other modules have no rows for it), and its model ties its
    // embeddings.
    let config = &suite.configs[0];
    let (model, extras, weights) = load_llama(&config.model_dir).unwrap();
    assert!(extras.tie_word_embeddings && weights.lm_head.is_none());
    let adapter = load_peft_adapter(&config.adapters[0].1, &model).unwrap();
    assert_eq!(adapter.targets, TargetModule::ALL.to_vec());
    assert_eq!(adapter.rank, 4);
    let qv = load_peft_adapter(&config.adapters[1].1, &model).unwrap();
    assert_eq!(qv.targets, vec![TargetModule::Q, TargetModule::V]);
    assert_eq!(qv.rank, 2);
    assert_eq!(config.requests[2].adapter, Some(1));
}

#[test]
fn matches_transformers_reference_dir() {
    let Ok(dir) = std::env::var("SLORA_REFERENCE_DIR") else {
        println!("skipped: set SLORA_REFERENCE_DIR to a tests/gpu/reference.py output directory");
        return;
    };
    let suite = read_reference_suite(Path::new(&dir)).unwrap();
    println!(
        "reference: {} on {} ({}), {:?}",
        suite.dir.display(),
        suite.device,
        suite.dtype,
        suite.versions
    );
    // A float32 transformers run is compared with our fp16 model: allow more.
    let tol = if suite.dtype == "float16" {
        REL_TOL
    } else {
        0.02
    };
    for c in check_suite_on_cpu(&suite).unwrap() {
        println!("{c}");
        c.verdict(tol).unwrap();
    }
}
