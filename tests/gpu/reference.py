#!/usr/bin/env python3
"""Independent reference for slora-plan's executor: transformers + peft on seeded random models.

For each config (MHA and GQA Llama, and MHA with adapters on q and v only; or the tiny CI
fixture with --tiny) this script

1. builds a LlamaForCausalLM with seeded random weights (fp16 values, generated on the CPU so a
   cuda run and a cpu run save identical files) and saves it with save_pretrained (config.json +
   model.safetensors);
2. adds PEFT LoRA adapters (ranks 8, 16, 32, 64 with lora_alpha 16, 8, 64, 32 on q,k,v,o_proj;
   config mha-qv: on q_proj and v_proj only, peft's default for Llama)
   whose lora_A AND lora_B are seeded random values (peft would start B at zero, which tests
   nothing). The values are fp16-representable, stored as float32 as peft 0.21 saves them, so the
   Rust loader's float32 -> f16 conversion is exact;
3. runs one mixed batch (right-padded, peft's `adapter_names=`, "__base__" = no adapter) and
   records the logits of every prompt position;
4. runs greedy decoding per request (batch size 1, same adapter_names, KV cache, EOS ignored) for
   --steps tokens, recording each chosen token and the logits it was chosen from.

Output (--out DIR), read by `slora_kernels::reference_model::read_reference_suite`:
  reference.json              format "slora-reference-1": device, dtype, versions, per config
                              the model dir, adapters, requests (adapter, prompt, greedy)
  <config>/model/             the base model
  <config>/adapters/<name>/   each adapter (adapter_config.json + adapter_model.safetensors)
  logits_<config>.safetensors request.<i>.prompt [prompt_len, vocab], request.<i>.decode [steps, vocab]

Usage:  python3 tests/gpu/reference.py --out /tmp/slora-ref            (GPU, fp16)
        python3 tests/gpu/reference.py --out /tmp/ref --device cpu     (CPU, fp16 still works)
        python3 tests/gpu/reference.py --tiny --device cpu --out kernels/tests/fixtures/tiny-llama
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

CONFIGS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta, tie)
    "mha": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1376, vocab_size=1000, rope_theta=10000.0, tie_word_embeddings=False),
    "gqa": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1376, vocab_size=1000, rope_theta=500000.0, tie_word_embeddings=False),
    # The MHA shape again (another seed), its adapters on q_proj and v_proj only: peft's default
    # targets for Llama. No decode row then targets k_proj or o_proj, the executor's case of a
    # module without rows (its f32 delta zeroed by the decode helpers, not by an expand).
    "mha-qv": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=1376, vocab_size=1000, rope_theta=10000.0, tie_word_embeddings=False),
    # The CI fixture: < 200 KB in all, tied embeddings, MLP targets too.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=80, vocab_size=96, rope_theta=10000.0, tie_word_embeddings=True),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name, rank, alpha
ADAPTERS = [("a8", 8, 16), ("a16", 16, 8), ("a32", 32, 64), ("a64", 64, 32)]
PROMPT_LENS = [7, 19, 33, 64, 12]
REQUEST_ADAPTERS = ["a8", "a16", "a32", "a64", None]
TINY_ADAPTERS = [("a4", 4, 8), ("a2qv", 2, 4)]
TINY_TARGETS = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
# Each config's adapters target these modules (ATTENTION where not listed), unless the adapter
# names its own: the fixture's second adapter targets q and v only, so CI checks that case too.
TARGETS = {"tiny": TINY_TARGETS, "mha-qv": ["q_proj", "v_proj"]}
ADAPTER_TARGETS = {"a2qv": ["q_proj", "v_proj"]}
TINY_PROMPT_LENS = [5, 9, 7]
TINY_REQUEST_ADAPTERS = ["a4", None, "a2qv"]


def uniform(gen, shape, bound):
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def build_model(name, seed, max_position):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(CONFIGS[name])
    theta = spec.pop("rope_theta")
    # transformers 5 keeps theta in rope_parameters (and writes that to config.json); 4.x has
    # a top-level rope_theta. The Rust loader reads either.
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = dict(rope_parameters={"rope_type": "default", "rope_theta": theta})
    else:
        rope = dict(rope_theta=theta)
    cfg = LlamaConfig(max_position_embeddings=max_position, rms_norm_eps=1e-5, **rope, **spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # A trained-looking scale (transformers' std-0.02 init makes every logit ~0 and greedy
        # decoding a string of ties): linears U(-1,1)/sqrt(in), embeddings N(0,1), norms ~1.
        for pname, p in sorted(model.named_parameters()):
            if p.dim() == 2 and "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(uniform(gen, p.shape, 1.0 / math.sqrt(p.shape[1])))
            else:
                p.copy_(1.0 + 0.1 * uniform(gen, p.shape, 1.0))
    # Round to fp16 here, once, on the CPU: every device then runs the same values.
    return model.to(torch.float16), cfg


def add_adapters(model, adapters, targets, seed):
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name, rank, alpha in adapters:
        lc = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ADAPTER_TARGETS.get(name, targets),
                        lora_dropout=0.0, bias="none")
        if peft_model is None:
            peft_model = get_peft_model(model, lc, adapter_name=name)
        else:
            peft_model.add_adapter(name, lc)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters()):
            for name, rank, _ in adapters:
                if f".lora_A.{name}." in pname:
                    # [r, in]
                    vals = uniform(gen, p.shape, 1.0 / math.sqrt(p.shape[1]))
                elif f".lora_B.{name}." in pname:
                    # [out, r]: 0.5/sqrt(r) makes scale * x A^T B^T a visible fraction of x W^T.
                    vals = uniform(gen, p.shape, 0.5 / math.sqrt(rank))
                else:
                    continue
                # fp16-representable, kept in peft's dtype (float32 under autocast_adapter_dtype).
                p.copy_(vals.to(torch.float16).to(p.dtype))
    return peft_model


def prompts(vocab, lens, seed):
    gen = torch.Generator().manual_seed(seed + 2000)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


@torch.no_grad()
def batch_prompt_logits(peft_model, prompt_list, names, device):
    """One mixed batch, right-padded: causal attention never looks right, so padding changes
    nothing at real positions, and position ids 0..n-1 stay correct."""
    longest = max(len(p) for p in prompt_list)
    ids = torch.zeros((len(prompt_list), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_list):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    out = peft_model(input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=names)
    return [out.logits[i, : len(p)].float().cpu() for i, p in enumerate(prompt_list)]


@torch.no_grad()
def single_prompt_logits(peft_model, prompt, name, device):
    ids = torch.tensor([prompt], device=device)
    return peft_model(input_ids=ids, adapter_names=[name]).logits[0].float().cpu()


@torch.no_grad()
def greedy(peft_model, prompt, name, steps, device):
    """Manual greedy loop with the KV cache, batch size 1: no EOS, no padding, no logits
    processors (generate's min_new_tokens would mask EOS and change the argmax)."""
    ids = torch.tensor([prompt], device=device)
    out = peft_model(input_ids=ids, adapter_names=[name], use_cache=True)
    tokens, rows = [], []
    for s in range(steps):
        logits = out.logits[0, -1]
        token = int(torch.argmax(logits))
        tokens.append(token)
        rows.append(logits.float().cpu())
        if s + 1 < steps:
            nxt = torch.tensor([[token]], device=device)
            out = peft_model(input_ids=nxt, past_key_values=out.past_key_values,
                             adapter_names=[name], use_cache=True)
    return tokens, torch.stack(rows)


def run_config(name, args, device, dtype, out_dir):
    tiny = name == "tiny"
    adapters = TINY_ADAPTERS if tiny else ADAPTERS
    targets = TARGETS.get(name, ATTENTION)
    lens = TINY_PROMPT_LENS if tiny else PROMPT_LENS
    req_adapters = TINY_REQUEST_ADAPTERS if tiny else REQUEST_ADAPTERS
    steps = args.steps if args.steps is not None else (8 if tiny else 32)
    max_position = 64 if tiny else 256
    seed = args.seed + sum(map(ord, name))

    model, cfg = build_model(name, seed, max_position)
    model_dir = os.path.join(out_dir, name, "model")
    model.save_pretrained(model_dir, safe_serialization=True)

    model = model.to(device=device, dtype=dtype)
    model.eval()
    peft_model = add_adapters(model, adapters, targets, seed)
    peft_model.eval()
    adapters_dir = os.path.join(out_dir, name, "adapters")
    # Non-"default" adapter names are saved into adapters_dir/<name>/.
    peft_model.save_pretrained(adapters_dir, safe_serialization=True)
    # peft's boilerplate model card says nothing here.
    for card in [os.path.join(adapters_dir, "README.md")] + [
            os.path.join(adapters_dir, a, "README.md") for a, _, _ in adapters]:
        if os.path.exists(card):
            os.remove(card)

    vocab = cfg.vocab_size
    prompt_list = prompts(vocab, lens, seed)
    names = [a if a is not None else "__base__" for a in req_adapters]
    batched = batch_prompt_logits(peft_model, prompt_list, names, device)
    batch_vs_single = 0.0
    adapter_effect = 0.0
    tensors, requests = {}, []
    logits_dtype = torch.float16 if (tiny and dtype == torch.float16) else torch.float32
    for i, (prompt, adapter) in enumerate(zip(prompt_list, req_adapters)):
        single = single_prompt_logits(peft_model, prompt, names[i], device)
        batch_vs_single = max(batch_vs_single, float((single - batched[i]).abs().max()))
        if adapter is not None:
            base = single_prompt_logits(peft_model, prompt, "__base__", device)
            adapter_effect = max(adapter_effect, float((single - base).abs().max()))
        tokens, decode_rows = greedy(peft_model, prompt, names[i], steps, device)
        tensors[f"request.{i}.prompt"] = batched[i].to(logits_dtype).contiguous()
        tensors[f"request.{i}.decode"] = decode_rows.to(logits_dtype).contiguous()
        requests.append({"adapter": adapter, "prompt": prompt, "greedy": tokens})
    logits_name = f"logits_{name}.safetensors"
    save_file(tensors, os.path.join(out_dir, logits_name))
    print(f"{name}: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, vocab {vocab}; adapters "
          f"{', '.join(f'{a}(r={r}, alpha={al})' for a, r, al in adapters)}; {len(requests)} requests, "
          f"{steps} greedy steps; batched vs single-request prompt logits max |diff| "
          f"{batch_vs_single:.4g}; adapters move logits by up to {adapter_effect:.3g}")
    return {
        "name": name,
        "model": os.path.join(name, "model"),
        "logits": logits_name,
        "adapters": [{"name": a, "path": os.path.join(name, "adapters", a), "rank": r, "alpha": al,
                      "targets": ADAPTER_TARGETS.get(a, targets)} for a, r, al in adapters],
        "decode_steps": steps,
        "prompt_logits_from": "one right-padded mixed batch (peft adapter_names)",
        "greedy_from": "per request, batch size 1, KV cache, argmax, EOS ignored",
        "batch_vs_single_max_abs": batch_vs_single,
        "adapter_effect_max_abs": adapter_effect,
        "requests": requests,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created; existing files replaced)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                    help="compute dtype; files are always fp16. float32 is a fallback for a CPU "
                         "torch without fp16 kernels and gives a looser comparison")
    ap.add_argument("--configs", default="mha,gqa,mha-qv", help="comma-separated: mha, gqa, mha-qv")
    ap.add_argument("--tiny", action="store_true", help="write the tiny CI fixture instead")
    ap.add_argument("--steps", type=int, default=None, help="greedy steps (32; 8 with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import peft
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("reference.py: no CUDA device; use --device cpu")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.use_deterministic_algorithms(False)
    names = ["tiny"] if args.tiny else [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            sys.exit(f"reference.py: unknown config {n!r}; known: mha, gqa, mha-qv")
    os.makedirs(args.out, exist_ok=True)
    for n in names:
        shutil.rmtree(os.path.join(args.out, n), ignore_errors=True)

    started = time.time()
    configs = [run_config(n, args, device, dtype, args.out) for n in names]
    reference = {
        "format": "slora-reference-1",
        "device": device.type,
        "device_name": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "seed": args.seed,
        "configs": configs,
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}/reference.json ({len(configs)} configs) in {time.time() - started:.1f} s "
          f"with torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__} "
          f"on {reference['device_name']} ({args.dtype})")


if __name__ == "__main__":
    main()
