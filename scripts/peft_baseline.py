#!/usr/bin/env python3
"""S-LoRA's "PEFT" baseline (issue 5): HuggingFace transformers + peft serving the S2 workload
with mixed-adapter batches, measured at each batch size so its best one can be reported.

What it measures
  * Base model: Llama-7B shape (hidden 4096, 32 layers, 32 heads / 32 KV heads, intermediate
    11008, vocab 32000, rms eps 1e-6, rope theta 10000), random fp16 weights (normal std 0.02,
    norms 1) made directly on the GPU; nothing is downloaded. Attention: sdpa.
  * n = 100 LoRA adapters through peft (``get_peft_model`` for a0, then add_adapter's work for
    the rest, see "Building the adapters" below), ranks cycling 64, 32, 16, 8 (adapter i has rank ranks[i % 4]), lora_alpha = 2 * r,
    on q_proj, k_proj, v_proj, o_proj, dropout 0; every lora_A / lora_B weight is redrawn as
    normal(0, 0.01) in the model's dtype (peft would zero B, making adapters no-ops). A warm-up
    check asserts that a 1-token forward under a0 and a1 gives different logits.
  * Requests: input and output lengths uniform on the integers [8, 512], random prompt ids,
    adapter uniform over the n adapters (seeded, default seed 7) - our scenario's
    ``input: {dist: uniform, min: 8, max: 512}`` and the same for output.
  * Serving: static batching in arrival order, the way HF ``generate`` serves: consecutive
    requests in batches of B, prompts left-padded to the longest in the batch, one
    ``peft_model.generate(..., adapter_names=[per-request adapter], max_new_tokens =
    min_new_tokens = longest output in the batch, do_sample=False)`` per batch with no EOS, so
    every row decodes until the batch's longest output (the honest cost of static batching).
    Mixed adapters go through peft's ``adapter_names=`` (peft >= 0.10), which runs each LoRA
    layer once per distinct adapter in the batch. A request is served when its batch finishes;
    its useful output tokens are its own drawn output length. Timed: the ``generate`` calls
    only (building the padded batch on the CPU is not counted).
  * For each batch size (default 1,4,8,16,32,64; run largest first by default, --order desc, so
    that the sizes most likely to be PEFT's best are measured before the deadline) it runs
    batches while --per-batch-size-s lasts (always at least one full batch; a further batch only
    if its estimate fits the budget), timed with CUDA synchronised, and records requests, useful
    output tokens, wall time, req/s, output tok/s, s per batch and peak GPU memory. CUDA OOM is
    recorded per batch size. A global --deadline-s (from the script's start, model build
    included) is respected: before every batch its time is estimated from the measured
    per-decode-step cost (same size, else inter/extrapolated from the other sizes) and the batch
    is not started if it would end past the deadline. A batch still decoding at
    --hard-deadline-s (default deadline + 120) is cut short, not counted, and its full-batch
    time is estimated from the steps it did, so the files are written before an outer time limit.
  * Building the adapters: by default (--add-mode fast) adapters a1.. are added with peft's own
    LoraModel._create_and_replace on each already-wrapped layer, which is what add_adapter does
    minus its whole-model scans (quadratic in the adapter count: about 70 s for 100 adapters on
    32 layers, vs about 15 s); the model is the same (checked: identical state-dict keys, shapes,
    layer attributes and outputs), every layer is checked to hold every adapter at its rank, and
    any failure falls back to add_adapter (--add-mode peft forces it).

Command (remote H200; torch, transformers, peft installed; no internet):

    python3 scripts/peft_baseline.py --out $OUT/peft

    (ends by about 420 s from its start, 540 s at worst - the hard deadline - so it fits a
    600 s command; set --deadline-s / --hard-deadline-s for other limits)

    # the same with everything spelled out:
    python3 scripts/peft_baseline.py --out $OUT/peft --adapters 100 --ranks 64,32,16,8 \\
        --batch-sizes 1,4,8,16,32,64 --per-batch-size-s 60 --deadline-s 420 --seed 7

    # CPU smoke test of the logic with a tiny model:
    python3 scripts/peft_baseline.py --tiny --device cpu --batch-sizes 1,2,4 \\
        --per-batch-size-s 3 --deadline-s 30 --adapters 6 --out out/peft_tiny

Writes OUT/peft_baseline.json (config, versions, GPU, every batch size's results and batches,
the best batch size by req/s) and OUT/peft_baseline.md (the table), rewritten after every
batch so a run cut short still leaves what it measured. Prints the table and a last line
``best: B=.. X req/s``.
"""

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
import traceback

T0 = time.monotonic()


def elapsed():
    return time.monotonic() - T0


def log(msg):
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def parse_ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(
        description="S-LoRA's PEFT baseline: transformers + peft, static mixed-adapter batches",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Deadline is measured from the script's start (imports and model build included).",
    )
    p.add_argument("--out", default="out/peft_baseline", help="output folder")
    p.add_argument("--adapters", type=int, default=100, help="number of LoRA adapters")
    p.add_argument("--ranks", default=None, help="ranks cycled over adapters (default 64,32,16,8; tiny 8,4)")
    p.add_argument("--batch-sizes", default="1,4,8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--per-batch-size-s", type=float, default=60.0, help="time budget per batch size")
    p.add_argument("--deadline-s", type=float, default=420.0, help="global deadline from script start")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths U[2,16] for CPU tests")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: float16 on cuda, float32 on cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--input-min", type=int, default=None)
    p.add_argument("--input-max", type=int, default=None)
    p.add_argument("--output-min", type=int, default=None)
    p.add_argument("--output-max", type=int, default=None)
    p.add_argument("--lora-std", type=float, default=0.01, help="std of lora_A / lora_B weights")
    p.add_argument("--base-std", type=float, default=0.02, help="std of base weights")
    p.add_argument("--add-mode", default="fast", choices=["fast", "peft"],
                   help="fast: peft's _create_and_replace per LoRA layer (same model, ~5x faster for 100 "
                        "adapters); peft: add_adapter (whole-model scans per adapter); fast falls back "
                        "to peft")
    p.add_argument("--order", default="desc", choices=["desc", "given"],
                   help="run order of the batch sizes: desc (largest first, so the sizes most likely "
                        "to be the best are measured before the deadline) or as given")
    p.add_argument("--hard-deadline-s", type=float, default=None,
                   help="a batch still decoding at this time (from script start) is cut short and not "
                        "counted (default: deadline + 120)")
    p.add_argument("--progress-s", type=float, default=30.0, help="progress line inside long batches")
    p.add_argument("--estimate-margin", type=float, default=1.15,
                   help="safety factor on the estimated time of the next batch")
    return p


# ---------------------------------------------------------------- requests


class Requests:
    """Request i: (input_len, output_len, adapter index), drawn in order from one seeded RNG,
    extended lazily so every batch size sees the same stream. Prompt ids come from a generator
    seeded per request."""

    def __init__(self, seed, n_adapters, in_range, out_range, vocab):
        self.rng = random.Random(seed)
        self.seed = seed
        self.n_adapters = n_adapters
        self.in_range = in_range
        self.out_range = out_range
        self.vocab = vocab
        self.items = []

    def get(self, i):
        while len(self.items) <= i:
            il = self.rng.randint(*self.in_range)
            ol = self.rng.randint(*self.out_range)
            ad = self.rng.randrange(self.n_adapters)
            self.items.append((il, ol, ad))
        return self.items[i]

    def prompt(self, torch, i):
        il = self.get(i)[0]
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(3, self.vocab, (il,), generator=g, dtype=torch.long)


def make_batch(torch, reqs, start, bsz, device):
    items = [reqs.get(start + j) for j in range(bsz)]
    max_in = max(it[0] for it in items)
    ids = torch.zeros((bsz, max_in), dtype=torch.long)
    mask = torch.zeros((bsz, max_in), dtype=torch.long)
    for j in range(bsz):
        p = reqs.prompt(torch, start + j)
        ids[j, max_in - len(p):] = p
        mask[j, max_in - len(p):] = 1
    names = [f"a{it[2]}" for it in items]
    return items, ids.to(device), mask.to(device), names


# ---------------------------------------------------------------- model


def model_config(args):
    if args.tiny:
        c = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024)
    else:
        c = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 max_position_embeddings=2048)
    if args.layers:
        c["num_hidden_layers"] = args.layers
    c.update(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
             pad_token_id=0, bos_token_id=1, eos_token_id=None, use_cache=True,
             initializer_range=args.base_std)
    return c


def set_default_dtype(torch, dtype):
    """Set torch's default dtype where this torch allows it; returns the previous one."""
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
    except Exception:
        pass
    return prev


def build_base(torch, args, cfg_kwargs, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        config = LlamaConfig(attn_implementation=args.attn, **cfg_kwargs)
    except TypeError:
        config = LlamaConfig(**cfg_kwargs)
    config.eos_token_id = None
    prev = set_default_dtype(torch, dtype)
    try:
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        except (AttributeError, TypeError):  # torch < 2.0: no device context manager
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device)
    if any(prm.dtype != dtype for prm in model.parameters()):
        model = model.to(dtype)
    # Explicit cheap init (whatever transformers did or skipped): normal(0, std), norms 1.
    with torch.no_grad():
        for _, prm in model.named_parameters():
            if prm.dim() >= 2:
                prm.normal_(0.0, args.base_std)
            else:
                prm.fill_(1.0)
    model.eval()
    try:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        model.generation_config.bos_token_id = 1
    except Exception:
        pass
    return model, config


def lora_config(r):
    from peft import LoraConfig

    kw = dict(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
              lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        return LoraConfig(init_lora_weights=False, **kw)
    except TypeError:
        return LoraConfig(**kw)


def lora_layer_targets(pm):
    """(key, parent, target_name, target) of every LoRA layer, keys as peft's inject_adapter
    names them (relative to the wrapped transformers model)."""
    from peft.tuners.lora import LoraLayer

    inner = pm.base_model.model
    out = []
    for key, mod in inner.named_modules():
        if isinstance(mod, LoraLayer):
            parent = inner.get_submodule(key.rsplit(".", 1)[0]) if "." in key else inner
            out.append((key, parent, key.rsplit(".", 1)[-1], mod))
    return out


def add_one_fast(pm, name, cfg, targets):
    """What peft's add_adapter does for a LoRA config on already-wrapped layers, without its
    whole-model scans (named_modules, trainable marking, dtype casting) that make adding n
    adapters O(n^2): register the config, then peft's own _create_and_replace on each layer
    (which calls that peft version's LoraLayer.update_layer with the right arguments)."""
    tuner = pm.base_model
    tuner.peft_config[name] = cfg
    for key, parent, target_name, target in targets:
        tuner._create_and_replace(cfg, name, target, target_name, parent, current_key=key)


def add_adapters(torch, model, args, ranks, device, dtype):
    from peft import get_peft_model

    t = time.monotonic()
    mode = args.add_mode
    try:
        ctx = torch.device(device)
    except Exception:
        ctx = None
    prev = set_default_dtype(torch, dtype)
    try:
        if ctx is not None:
            ctx.__enter__()
        try:
            try:
                pm = get_peft_model(model, lora_config(ranks[0]), adapter_name="a0",
                                    autocast_adapter_dtype=False)
            except TypeError:
                pm = get_peft_model(model, lora_config(ranks[0]), adapter_name="a0")
            targets = lora_layer_targets(pm) if mode == "fast" else None
            if mode == "fast" and not targets:
                log("  fast adapter add: no LoRA layers found, using peft's add_adapter")
                mode = "peft"
            for i in range(1, args.adapters):
                name, cfg = f"a{i}", lora_config(ranks[i % len(ranks)])
                if mode == "fast":
                    try:
                        add_one_fast(pm, name, cfg, targets)
                    except Exception as e:  # overwritten by the regular path below
                        log(f"  fast adapter add failed at {name} ({type(e).__name__}: {e}); "
                            "using peft's add_adapter")
                        mode = "peft"
                        pm.base_model.peft_config.pop(name, None)
                if mode == "peft":
                    pm.add_adapter(name, cfg)
                if (i + 1) % 10 == 0 or i + 1 == args.adapters:
                    log(f"  added {i + 1}/{args.adapters} adapters ({time.monotonic() - t:.1f}s)")
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    finally:
        torch.set_default_dtype(prev)
    # Every LoRA layer must hold every adapter at its rank, whichever path built it.
    names = [f"a{i}" for i in range(args.adapters)]
    for key, _, _, target in lora_layer_targets(pm):
        for i, name in enumerate(names):
            assert name in target.lora_A and name in target.lora_B, f"{key} lacks adapter {name}"
            assert target.r[name] == ranks[i % len(ranks)], f"{key}: {name} has rank {target.r[name]}"
    assert set(names) <= set(pm.peft_config.keys()), "adapters missing from peft_config"
    args.add_mode_used = mode
    # Redraw every LoRA weight, non-zero, in the model's dtype, on the device.
    n_layers, n_params, seen = 0, 0, set()
    with torch.no_grad():
        for _, mod in pm.named_modules():
            for attr in ("lora_A", "lora_B"):
                md = getattr(mod, attr, None)
                if not isinstance(md, torch.nn.ModuleDict):
                    continue
                for key in md.keys():
                    lin = md[key]
                    if id(lin) in seen:
                        continue
                    seen.add(id(lin))
                    lin.to(device=device, dtype=dtype)
                    for prm in lin.parameters():
                        prm.normal_(0.0, args.lora_std)
                        n_params += prm.numel()
                if attr == "lora_A":
                    n_layers += 1
    pm.eval()
    return pm, time.monotonic() - t, n_layers, n_params


# ---------------------------------------------------------------- serving


def is_oom(torch, e):
    oom_t = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_t is not None and isinstance(e, oom_t):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def sync(torch, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Watch:
    """A transformers StoppingCriteria (duck-typed, so it works across versions): logs progress
    every --progress-s inside a long batch and stops generation once the hard deadline passes."""

    def __init__(self, torch, label, prompt_len, max_new, hard_deadline, progress_s, tensor_result):
        self.torch, self.label, self.prompt_len, self.max_new = torch, label, prompt_len, max_new
        self.hard_deadline, self.progress_s, self.tensor_result = hard_deadline, progress_s, tensor_result
        self.t0 = time.monotonic()
        self.next_log = self.t0 + progress_s
        self.aborted = False
        self.steps = 0
        self.first_s = None  # prefill + first token
        self.cache = {}

    def __call__(self, input_ids, scores=None, **kwargs):
        now = time.monotonic()
        self.steps = int(input_ids.shape[1] - self.prompt_len)
        if self.first_s is None:
            self.first_s = now - self.t0
        if now >= self.next_log:
            self.next_log = now + self.progress_s
            log(f"  {self.label}: {self.steps}/{self.max_new} tokens after {now - self.t0:.1f}s")
        if self.hard_deadline is not None and elapsed() >= self.hard_deadline and self.steps < self.max_new:
            if not self.aborted:
                log(f"  {self.label}: hard deadline reached at {self.steps}/{self.max_new} tokens; stopping")
            self.aborted = True
        if not self.tensor_result:
            return self.aborted
        key = (input_ids.shape[0], str(input_ids.device), self.aborted)
        if key not in self.cache:
            self.cache[key] = self.torch.full((input_ids.shape[0],), self.aborted, dtype=self.torch.bool,
                                              device=input_ids.device)
        return self.cache[key]


def criteria_want_tensor():
    """transformers >= 4.39 combines stopping criteria as per-row bool tensors; older ones as bools."""
    try:
        import transformers
        from packaging.version import Version

        return Version(transformers.__version__.split("+")[0]) >= Version("4.39.0")
    except Exception:
        return True


def generate(pm, ids, mask, names, max_new, watch=None):
    kw = dict(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=max_new,
              min_new_tokens=max_new, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None,
              use_cache=True)
    if watch is not None:
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([watch])
    return pm.generate(**kw)


def sanity(torch, pm, args, vocab, device):
    """1-token forward under a0 and a1 (and the base): logits must differ; a mixed batch row
    must match the same adapter alone (informational)."""
    g = torch.Generator()
    g.manual_seed(args.seed + 12345)
    x = torch.randint(3, vocab, (1, 1), generator=g).to(device)
    out = {}
    l0 = pm(input_ids=x, adapter_names=["a0"]).logits.float()
    l1 = pm(input_ids=x, adapter_names=["a1"]).logits.float()
    out["max_abs_diff_a0_a1"] = float((l0 - l1).abs().max())
    out["logits_finite"] = bool(torch.isfinite(l0).all() and torch.isfinite(l1).all())
    out["logit_abs_max"] = float(l0.abs().max())
    try:
        lb = pm(input_ids=x, adapter_names=["__base__"]).logits.float()
        out["max_abs_diff_base_a0"] = float((lb - l0).abs().max())
    except Exception as e:  # older peft without __base__
        out["max_abs_diff_base_a0"] = f"n/a ({type(e).__name__})"
    lm = pm(input_ids=x.repeat(2, 1), adapter_names=["a0", "a1"]).logits.float()
    out["mixed_vs_single_max_abs_diff"] = float(max((lm[0] - l0[0]).abs().max(), (lm[1] - l1[0]).abs().max()))
    log(f"sanity: max|logits(a0)-logits(a1)| = {out['max_abs_diff_a0_a1']:.4g}, "
        f"base vs a0 = {out['max_abs_diff_base_a0']}, mixed batch vs single = "
        f"{out['mixed_vs_single_max_abs_diff']:.4g}, finite = {out['logits_finite']}, "
        f"max|logit| = {out['logit_abs_max']:.4g}")
    assert out["logits_finite"], "non-finite logits: random weights too large"
    assert out["max_abs_diff_a0_a1"] > 0.0, "adapters a0 and a1 give identical logits (no-op LoRA?)"
    return out


def estimate_step_s(bsz, step_cost):
    """Seconds per decode step for a batch of bsz, from measured sizes (dict B -> s/step)."""
    if bsz in step_cost:
        return step_cost[bsz], 1.0
    sizes = sorted(step_cost)
    if not sizes:
        return None, 1.0
    lower = [b for b in sizes if b < bsz]
    upper = [b for b in sizes if b > bsz]
    if lower and upper:  # interpolate
        b1, b2 = lower[-1], upper[0]
        s1, s2 = step_cost[b1], step_cost[b2]
        return s1 + (s2 - s1) * (bsz - b1) / (b2 - b1), 1.0
    if upper:  # smaller than every measured size: between flat and proportional
        b2 = upper[0]
        return step_cost[b2] * math.sqrt(bsz / b2), 1.2
    if len(lower) >= 2:  # linear extrapolation from the two largest, never below the largest
        b1, b2 = lower[-2], lower[-1]
        s1, s2 = step_cost[b1], step_cost[b2]
        slope = max(0.0, (s2 - s1) / (b2 - b1))
        return s2 + slope * (bsz - b2), 1.2
    b1 = lower[-1]  # one size only: proportional (pessimistic)
    return step_cost[b1] * bsz / b1, 1.0


def summarize(res):
    wall = res["wall_s"]
    res["req_per_s"] = res["requests"] / wall if wall > 0 else None
    res["output_tok_per_s"] = res["output_tokens"] / wall if wall > 0 else None
    res["s_per_batch"] = wall / res["n_batches"] if res["n_batches"] else None


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(results):
    lines = ["| batch size | batches | requests | wall s | req/s | output tok/s | s per batch | peak GiB | status |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["batch_size"], r["n_batches"], r["requests"], fmt(r["wall_s"], 1),
            fmt(r.get("req_per_s"), 3), fmt(r.get("output_tok_per_s"), 1),
            fmt(r.get("s_per_batch"), 2), fmt(r.get("peak_gib"), 1), r["status"]))
    return "\n".join(lines)


def best_of(results):
    ok = [r for r in results if r["n_batches"] > 0 and r.get("req_per_s")]
    if not ok:
        return None
    return max(ok, key=lambda r: r["req_per_s"])


def write_outputs(out_dir, report):
    os.makedirs(out_dir, exist_ok=True)
    report["elapsed_s"] = elapsed()
    report["best"] = None
    b = best_of(report["results"])
    if b is not None:
        report["best"] = {k: b[k] for k in ("batch_size", "req_per_s", "output_tok_per_s",
                                             "s_per_batch", "requests", "wall_s")}
    tmp = os.path.join(out_dir, "peft_baseline.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out_dir, "peft_baseline.json"))
    c = report["config"]
    md = [
        "# PEFT baseline (transformers + peft, static batches, mixed adapters)",
        "",
        f"Model: {c.get('model_desc')}, {c.get('dtype')} random weights, attention {c.get('attn')}; "
        f"{c['adapters']} adapters, ranks {c['ranks']} cycled, lora_alpha = 2r, "
        f"q/k/v/o; input U[{c['input_range'][0]},{c['input_range'][1]}], output "
        f"U[{c['output_range'][0]},{c['output_range'][1]}], adapter uniform; seed {c['seed']}.",
        f"Device: {report.get('device_name')}; torch {report['versions'].get('torch')}, "
        f"transformers {report['versions'].get('transformers')}, peft {report['versions'].get('peft')}.",
        "Static batching in arrival order, prompts left-padded, every row decodes to the batch's "
        "longest output; req/s and output tok/s count each request's own output length.",
        "",
        table(report["results"]),
        "",
    ]
    if report["best"]:
        md.append(f"Best: B={report['best']['batch_size']}, {report['best']['req_per_s']:.3f} req/s, "
                  f"{report['best']['output_tok_per_s']:.1f} output tok/s.")
    notes = [f"- B={r['batch_size']}: {r['note']}" for r in report["results"] if r.get("note")]
    if notes:
        md += ["", "Notes:"] + notes
    if report.get("fatal_error"):
        md.append(f"Fatal error: {report['fatal_error']}")
    with open(os.path.join(out_dir, "peft_baseline.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def run_size(torch, pm, reqs, bsz, args, device, deadline, step_cost, report, is_cuda, hard_deadline):
    res = dict(batch_size=bsz, status="ok", n_batches=0, requests=0, output_tokens=0,
               generated_tokens=0, wall_s=0.0, peak_gib=None, batches=[], note=None)
    report["results"].append(res)
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_size = time.monotonic()
    start = 0
    while True:
        items = [reqs.get(start + j) for j in range(bsz)]
        max_out = max(it[1] for it in items)
        step_s, margin = estimate_step_s(bsz, step_cost)
        est = None if step_s is None else step_s * max_out * margin * args.estimate_margin
        size_used = time.monotonic() - t_size
        if res["n_batches"] > 0 and (size_used >= args.per_batch_size_s
                                     or (est is not None and size_used + est > args.per_batch_size_s)):
            res["note"] = (f"per-batch-size budget: {size_used:.1f}s used"
                           + ("" if est is None else f", next batch estimated {est:.1f}s"))
            break
        if est is not None and elapsed() + est > deadline:
            res["status"] = "deadline" if res["n_batches"] == 0 else "ok"
            res["note"] = (f"stopped before batch {res['n_batches'] + 1}: estimated {est:.1f}s "
                           f"at {elapsed():.1f}s would pass the {deadline:.0f}s deadline")
            log(f"B={bsz}: {res['note']}")
            break
        if est is None and elapsed() > deadline:
            res["status"] = "deadline"
            res["note"] = "deadline already passed"
            break
        try:
            items, ids, mask, names = make_batch(torch, reqs, start, bsz, device)
            sync(torch, device)
            t = time.monotonic()
            watch = Watch(torch, f"B={bsz} batch {res['n_batches'] + 1}", ids.shape[1], max_out,
                          hard_deadline, args.progress_s, criteria_want_tensor())
            with torch.inference_mode():
                out = generate(pm, ids, mask, names, max_out, watch)
            sync(torch, device)
            dt = time.monotonic() - t
        except Exception as e:
            if is_oom(torch, e):
                res["status"] = "oom"
                res["note"] = f"OOM in batch {res['n_batches'] + 1}: {str(e).splitlines()[0][:200]}"
            else:
                res["status"] = "error"
                res["note"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            log(f"B={bsz}: {res['status']}: {res['note']}")
            ids = mask = out = None
            gc.collect()
            if is_cuda:
                torch.cuda.empty_cache()
            break
        gen_len = int(out.shape[1] - ids.shape[1])
        del out, ids, mask
        if watch.aborted:
            if watch.first_s is not None and gen_len >= 2:
                full = watch.first_s + (dt - watch.first_s) / (gen_len - 1) * (max_out - 1)
            else:
                full = dt / max(1, gen_len) * max_out
            per_step = full / max_out
            res["status"] = "ok" if res["n_batches"] else "cut"
            res["cut_batch"] = dict(max_output=max_out, generated=gen_len, wall_s=dt,
                                    estimated_full_batch_s=per_step * max_out,
                                    estimated_req_per_s=bsz / (per_step * max_out))
            res["note"] = (f"batch {res['n_batches'] + 1} cut at the hard deadline after {gen_len}/{max_out} "
                           f"tokens in {dt:.1f}s (not counted; full batch estimated "
                           f"{per_step * max_out:.1f}s, {bsz / (per_step * max_out):.3f} req/s)")
            step_cost[bsz] = per_step
            if is_cuda:
                res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            log(f"B={bsz}: {res['note']}")
            break
        if gen_len != max_out:
            log(f"  WARNING: generated {gen_len} tokens, asked for {max_out}")
        useful = sum(min(it[1], gen_len) for it in items)
        uniq = len(set(names))
        res["batches"].append(dict(start=start, max_input=max(it[0] for it in items), max_output=max_out,
                                   generated=gen_len, useful_tokens=useful, unique_adapters=uniq,
                                   wall_s=dt, estimated_s=est))
        res["n_batches"] += 1
        res["requests"] += bsz
        res["output_tokens"] += useful
        res["generated_tokens"] += bsz * gen_len
        res["wall_s"] += dt
        step_cost[bsz] = dt / max(1, gen_len)
        if is_cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        summarize(res)
        est_txt = "" if est is None else f" (est {est:.1f}s)"
        log(f"B={bsz} batch {res['n_batches']}: {dt:.2f}s{est_txt}, in<={max(it[0] for it in items)} "
            f"out={max_out}, {uniq} adapters, useful {useful} tok; size total {res['requests']} req "
            f"in {res['wall_s']:.1f}s = {res['req_per_s']:.3f} req/s, {res['output_tok_per_s']:.1f} tok/s")
        write_outputs(args.out, report)
        start += bsz
    summarize(res)
    if is_cuda and res["peak_gib"] is None:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    write_outputs(args.out, report)
    return res


def main():
    args = build_parser().parse_args()
    deadline = args.deadline_s
    ranks = parse_ints(args.ranks) if args.ranks else ([8, 4] if args.tiny else [64, 32, 16, 8])
    batch_sizes = parse_ints(args.batch_sizes)
    lo_hi = (2, 16) if args.tiny else (8, 512)
    in_range = (args.input_min or lo_hi[0], args.input_max or lo_hi[1])
    out_range = (args.output_min or lo_hi[0], args.output_max or lo_hi[1])
    assert args.adapters >= 2, "need at least two adapters (the sanity check compares a0 and a1)"

    report = dict(script="scripts/peft_baseline.py", argv=sys.argv, config={}, versions={},
                  device_name=None, results=[], sanity=None, build=None, fatal_error=None)
    report["config"] = dict(adapters=args.adapters, ranks=ranks, lora_alpha="2*r",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                            lora_std=args.lora_std, base_std=args.base_std, batch_sizes=batch_sizes,
                            per_batch_size_s=args.per_batch_size_s, deadline_s=deadline, seed=args.seed,
                            input_range=list(in_range), output_range=list(out_range), tiny=args.tiny,
                            attn=args.attn, serving="static batches in arrival order, left padding, "
                            "max_new_tokens=min_new_tokens=longest output in batch, greedy, no EOS, "
                            "mixed adapters via peft adapter_names")
    try:
        log("importing torch, transformers, peft")
        import torch
        import transformers
        import peft

        report["versions"] = dict(python=platform.python_version(), torch=torch.__version__,
                                  transformers=transformers.__version__, peft=peft.__version__,
                                  cuda=getattr(torch.version, "cuda", None))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        is_cuda = str(device).startswith("cuda")
        if args.dtype == "auto":
            dtype = torch.float16 if is_cuda else torch.float32
        else:
            dtype = getattr(torch, args.dtype)
        report["config"]["device"] = device
        report["config"]["dtype"] = str(dtype).replace("torch.", "")
        report["device_name"] = torch.cuda.get_device_name(0) if is_cuda else platform.processor() or "cpu"
        log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"device {device} ({report['device_name']}), dtype {dtype}")
        torch.manual_seed(args.seed)

        cfg_kwargs = model_config(args)
        report["config"]["model"] = cfg_kwargs
        report["config"]["model_desc"] = (
            "tiny Llama" if args.tiny else "Llama-7B shape") + (
            f" (hidden {cfg_kwargs['hidden_size']}, {cfg_kwargs['num_hidden_layers']} layers, "
            f"{cfg_kwargs['num_attention_heads']} heads, inter {cfg_kwargs['intermediate_size']}, "
            f"vocab {cfg_kwargs['vocab_size']})")
        t = time.monotonic()
        model, config = build_base(torch, args, cfg_kwargs, device, dtype)
        sync(torch, device)
        t_base = time.monotonic() - t
        report["config"]["attn_effective"] = getattr(config, "_attn_implementation", None)
        n_base = sum(p.numel() for p in model.parameters())
        log(f"built base model: {n_base / 1e9:.3f} B params in {t_base:.1f}s"
            + (f", {torch.cuda.memory_allocated() / 2 ** 30:.1f} GiB allocated" if is_cuda else ""))

        pm, t_ad, n_lora_layers, n_lora = add_adapters(torch, model, args, ranks, device, dtype)
        sync(torch, device)
        log(f"added {args.adapters} adapters in {t_ad:.1f}s ({args.add_mode_used} path): {n_lora_layers} LoRA layers, "
            f"{n_lora / 1e6:.1f} M LoRA params"
            + (f", {torch.cuda.memory_allocated() / 2 ** 30:.1f} GiB allocated" if is_cuda else ""))
        report["build"] = dict(base_s=t_base, adapters_s=t_ad, add_mode=args.add_mode_used, base_params=n_base, lora_params=n_lora,
                               lora_layers=n_lora_layers,
                               allocated_gib=torch.cuda.memory_allocated() / 2 ** 30 if is_cuda else None)

        with torch.inference_mode():
            report["sanity"] = sanity(torch, pm, args, cfg_kwargs["vocab_size"], device)
        # Warm-up: a 2-token generate on a short mixed batch.
        reqs = Requests(args.seed, args.adapters, in_range, out_range, cfg_kwargs["vocab_size"])
        wb = max(1, min(4, max(batch_sizes)))
        t = time.monotonic()
        g = torch.Generator()
        g.manual_seed(args.seed + 999)
        ids = torch.randint(3, cfg_kwargs["vocab_size"], (wb, 8), generator=g).to(device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            o = generate(pm, ids, mask, [f"a{j % args.adapters}" for j in range(wb)], 2)
        sync(torch, device)
        assert o.shape[1] == ids.shape[1] + 2, f"warm-up generated {o.shape[1] - ids.shape[1]} tokens, not 2"
        log(f"warm-up generate (B={wb}, 2 tokens) in {time.monotonic() - t:.2f}s")
        del o, ids, mask
        write_outputs(args.out, report)

        step_cost = {}
        order = sorted(batch_sizes, reverse=True) if args.order == "desc" else list(batch_sizes)
        hard = args.hard_deadline_s if args.hard_deadline_s is not None else deadline + 120.0
        log(f"batch sizes in run order {order}; deadline {deadline:.0f}s, hard deadline {hard:.0f}s, "
            f"{args.per_batch_size_s:.0f}s per batch size")
        for bsz in order:
            log(f"--- batch size {bsz}")
            run_size(torch, pm, reqs, bsz, args, device, deadline, step_cost, report, is_cuda, hard)
            report["results"].sort(key=lambda r: r["batch_size"])
    except Exception as e:
        report["fatal_error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        try:
            write_outputs(args.out, report)
        except Exception:
            traceback.print_exc()
    print(flush=True)
    print(table(report["results"]), flush=True)
    b = best_of(report["results"])
    if b is None:
        print("best: none (no batch size completed a batch)", flush=True)
    else:
        print(f"best: B={b['batch_size']} {b['req_per_s']:.3f} req/s "
              f"({b['output_tok_per_s']:.1f} output tok/s)", flush=True)
    log(f"wrote {os.path.join(args.out, 'peft_baseline.json')} and peft_baseline.md")
    return 1 if report.get("fatal_error") else 0


if __name__ == "__main__":
    sys.exit(main())
