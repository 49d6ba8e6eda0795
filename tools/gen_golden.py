#!/usr/bin/env python3
"""Generates phishard's golden reference fixtures (tests/golden/) with Hugging Face transformers + peft.

Needs torch, transformers (5.x), peft, tokenizers, safetensors. Runs on CUDA (TF32 off) or on CPU; all
reference math is float32 with `attn_implementation="eager"`, models in eval mode, fixed seeds.

Phases (all by default; `--phases` picks some, each writes its own files, a failing phase does not stop
the others and makes the exit status 1):
  random   tests/golden/phi-mha-hd64/, phi-gqa-hd80/, phi-qkln-tied/, phi-rope-linear/: random-weight PhiForCausalLM
           checkpoints saved in bf16 (config.json, model.safetensors) and golden.json computed in
           float32 from those bf16 values, after loading them back with from_pretrained
           (`--random-models` picks some of them).
  tiny     tests/golden/tiny-phi-code.json: the demo model models/tiny-phi-code (real bf16 weights and
           tokenizer) on a few Python prompts.
  adapters tests/golden/tiny-phi-code-adapters.json and tests/golden/adapters/<name>/: the repo's real
           LoRA adapter `prose` plus two random LoRA adapters made here, run unmerged through peft.

The file format is described in tools/README.md.
Usage: python3 gen_golden.py --out OUTDIR [--device cuda|cpu] [--phases random,tiny,adapters]
                             [--random-models NAME,...]
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# cuBLAS needs this before CUDA starts to give bit-reproducible results under deterministic mode.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_DIR = REPO / "models" / "tiny-phi-code"
GREEDY_STEPS = 16
# Random models are re-seeded until every greedy decision has a top1-top2 logit gap of at least this.
# float32 implementations that sum in a different order differ by ~1e-5 in these logits, so 1e-2
# leaves three orders of magnitude before a reordering could flip a greedy token.
MIN_GAP_RANDOM = 1e-2
MAX_SEED_ATTEMPTS = 25

RANDOM_MODELS = [
    # MHA, head_dim 64 (Phi-1.5 style), rotary 0.5 -> 32 dims; config rewritten in the transformers
    # 4.x layout like microsoft/phi-1_5 (num_key_value_heads and eos/bos null, torch_dtype).
    dict(name="phi-mha-hd64", layout="4.x", hidden_size=128, num_attention_heads=2,
         num_key_value_heads=None, intermediate_size=512, partial_rotary_factor=0.5,
         eos_token_id=None, bos_token_id=None, seed=1000),
    # GQA (4 query heads over 2 KV heads, so h/2 and h%2 head mappings differ), head_dim 80 (Phi-2
    # style), rotary 0.4 -> 32 dims; config as transformers 5.x writes it (rope_parameters).
    dict(name="phi-gqa-hd80", layout="5.x", hidden_size=320, num_attention_heads=4,
         num_key_value_heads=2, intermediate_size=384, partial_rotary_factor=0.4,
         eos_token_id=2, bos_token_id=1, seed=2000),
    # qk_layernorm (a LayerNorm over head_dim on every q / k head before the rotary) with tied
    # input / output embeddings (no lm_head.weight in the file; lm_head.bias stays), GQA 4 / 2,
    # head_dim 64, rotary 0.5 -> 32 dims; transformers 5.x config layout.
    dict(name="phi-qkln-tied", layout="5.x", hidden_size=256, num_attention_heads=4,
         num_key_value_heads=2, intermediate_size=512, partial_rotary_factor=0.5,
         eos_token_id=2, bos_token_id=1, seed=3000, qk_layernorm=True, tie=True),
    # Linear RoPE scaling (factor 2: every frequency halved), MHA, head_dim 64, rotary 0.5; config
    # in the transformers 4.x layout with `rope_scaling: {"type": "linear", "factor": 2.0}`.
    dict(name="phi-rope-linear", layout="4.x", hidden_size=128, num_attention_heads=2,
         num_key_value_heads=None, intermediate_size=256, partial_rotary_factor=0.5,
         eos_token_id=None, bos_token_id=None, seed=4000, rope_linear=2.0),
]
RANDOM_VOCAB = 512
RANDOM_LAYERS = 2
RANDOM_PROMPT_LENGTHS = [1, 5, 16, 17, 41]

LONG_PROMPT = '''import json
import os


def load_config(path: str) -> dict:
    """Read a JSON config file and return it as a dict."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object")
    return data
'''
TINY_PROMPTS = [
    "import os\n",
    "class Config:\n    def __init__(self",
    "def fibonacci(n):\n",
    '# Grüße aus Köln, 世界! 🚀 naïve café\nprint("héllo wörld ✓")\n',
    "import",  # one token
    "The ",
    LONG_PROMPT,  # ~95 tokens
]
ADAPTER_PROMPTS = ["The ", "def fibonacci(n):\n", "import", LONG_PROMPT]
# Token ids ("def fibonacci") run through a random adapter before saving and after reloading it.
PROBE_IDS = [329, 284, 473]

# name, path under the output dir (None: the repo's real adapter), LoraConfig kwargs, B init std.
RANDOM_ADAPTERS = [
    dict(name="lora-r4-qv-fc2", r=4, lora_alpha=8, use_rslora=False,
         target_modules=["q_proj", "v_proj", "fc2"], b_std=0.05, seed=3000),
    dict(name="lora-r16-rslora-all", r=16, lora_alpha=16, use_rslora=True,
         target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], b_std=0.02,
         seed=4000),
]


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def setup_torch(device):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda given but torch sees no CUDA device")
        return torch.cuda.get_device_name(0)
    return "cpu"


def versions(device_name):
    return {
        "generator": (f"transformers {transformers.__version__} torch {torch.__version__} "
                      f"peft {peft.__version__} tools/gen_golden.py"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "device": device_name,
        "compute_dtype": "float32",
        "tf32": False,
        "attn_implementation": "eager",
    }


def f7(values):
    """Floats rounded to 7 significant digits (below float32's 6e-8 relative spacing is not needed)."""
    out = []
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v} in reference output")
        out.append(float(f"{v:.7g}"))
    return out


def write_json(obj, path):
    """One key per line, each case on one line: small, valid JSON, diffable per case."""
    lines = []
    for k, v in obj.items():
        if k == "cases":
            continue
        lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    cases = [" " + json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in obj["cases"]]
    text = "{\n" + ",\n".join(lines) + ',\n "cases": [\n' + ",\n".join(cases) + "\n ]\n}\n"
    if json.loads(text) != json.loads(json.dumps(obj)):
        raise RuntimeError(f"{path}: JSON round trip changed the data")
    Path(path).write_text(text, encoding="utf-8")
    log(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")


@torch.no_grad()
def full_logits(model, ids, device):
    """Teacher-forced logits of the whole sequence: [T, V] float32, on the CPU."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=False).logits[0]
    if out.dtype != torch.float32:
        raise RuntimeError(f"logits came out as {out.dtype}, expected float32")
    return out.float().cpu()


@torch.no_grad()
def run_case(model, prompt_ids, device):
    """Teacher-forced logits of the prompt and a 16-step greedy continuation that recomputes the full
    sequence each step (no KV cache) and never stops at EOS."""
    logits = full_logits(model, prompt_ids, device)
    seq = list(prompt_ids)
    greedy_ids, greedy_lps, gaps = [], [], []
    for step in range(GREEDY_STEPS):
        last = logits[-1] if step == 0 else full_logits(model, seq, device)[-1]
        top2 = torch.topk(last, 2)
        tok = int(torch.argmax(last))
        if tok != int(top2.indices[0]):
            raise RuntimeError("argmax and topk disagree")
        gaps.append(float(top2.values[0] - top2.values[1]))
        # log_softmax in float64 of the float32 logits: the exact value the float32 logits imply.
        greedy_lps.append(float(torch.log_softmax(last.double(), dim=-1)[tok]))
        greedy_ids.append(tok)
        seq.append(tok)
    return dict(logits=logits, greedy_ids=greedy_ids, greedy_logprobs=greedy_lps,
                min_top2_gap=min(gaps))


def prefill_logprobs(logits, ids):
    """[null, lp1, ...]: log_softmax of the logits at position k-1, taken at prompt token k."""
    lsm = torch.log_softmax(logits.double(), dim=-1)
    return [None] + [float(lsm[k - 1, ids[k]]) for k in range(1, len(ids))]


def load_phi(model_dir, device):
    model, info = PhiForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{model_dir}: loading was not clean: {bad}")
    for n, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise RuntimeError(f"{model_dir}: {n} loaded as {p.dtype}, expected float32")
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"attention implementation is {model.config._attn_implementation}")
    return model.to(device).eval()


def check_equals_bf16_file(model, st_path):
    """The float32 model must hold exactly the bf16 values of the file (bf16 -> f32 is exact)."""
    tensors = load_file(str(st_path))
    params = dict(model.named_parameters())
    if set(tensors) != set(params):
        raise RuntimeError(f"{st_path}: tensor names {sorted(set(tensors) ^ set(params))} differ")
    for n, t in tensors.items():
        if t.dtype != torch.bfloat16:
            raise RuntimeError(f"{st_path}: {n} stored as {t.dtype}, expected bfloat16")
        if not torch.equal(params[n].detach().cpu(), t.float()):
            raise RuntimeError(f"{st_path}: {n} differs from the loaded float32 model")


# ----------------------------------------------------------------------------------------------
# Random-weight models
# ----------------------------------------------------------------------------------------------

def expected_weight_names(cfg):
    names = {"model.embed_tokens.weight", "model.final_layernorm.weight",
             "model.final_layernorm.bias", "lm_head.bias"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    modules = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "self_attn.dense", "mlp.fc1", "mlp.fc2"]
    if cfg.qk_layernorm:
        modules += ["self_attn.q_layernorm", "self_attn.k_layernorm"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for m in modules:
            names |= {p + m + ".weight", p + m + ".bias"}
    return names


@torch.no_grad()
def init_random_weights(model, seed):
    """Scaled so activations stay O(1) and logits are spread (std ~6): greedy picks are far from ties.
    Every bias and LayerNorm parameter is nonzero so a dropped bias changes the output."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    for name, p in sorted(model.named_parameters()):
        shape = tuple(p.shape)
        if name == "model.embed_tokens.weight":
            # Tied, it is the LM head too: the head's scale (the input LayerNorm rescales it).
            t = normal(shape, 6.0 / math.sqrt(hidden) if model.config.tie_word_embeddings else 1.0)
        elif name.endswith("layernorm.weight"):
            t = 1.0 + normal(shape, 0.1)
        elif name.endswith("layernorm.bias"):
            t = normal(shape, 0.1)
        elif name == "lm_head.weight":
            t = normal(shape, 6.0 / math.sqrt(hidden))
        elif name == "lm_head.bias":
            t = normal(shape, 0.5)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            t = normal(shape, 1.5 / math.sqrt(shape[1]))  # peakier attention than uniform
        elif name.endswith(("v_proj.weight", "dense.weight", "fc1.weight", "fc2.weight")):
            t = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif name.endswith(("proj.bias", "dense.bias", "fc1.bias", "fc2.bias")):
            t = normal(shape, 0.1)
        else:
            raise RuntimeError(f"no init rule for parameter {name}")
        p.copy_(t)


def make_config(spec):
    scaling = {}
    if spec.get("rope_linear"):  # the top-level kwargs below agree with it
        scaling["rope_parameters"] = {"rope_type": "linear", "factor": spec["rope_linear"],
                                      "rope_theta": 10000.0,
                                      "partial_rotary_factor": spec["partial_rotary_factor"]}
    return PhiConfig(**scaling,
        vocab_size=RANDOM_VOCAB, hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=RANDOM_LAYERS,
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        # Passed as top-level kwargs on purpose: given only inside rope_parameters, PhiConfig would
        # also save its BC default partial_rotary_factor=0.5 at top level, contradicting it.
        partial_rotary_factor=spec["partial_rotary_factor"], rope_theta=10000.0,
        max_position_embeddings=256, hidden_act="gelu_new", layer_norm_eps=1e-5,
        tie_word_embeddings=spec.get("tie", False), resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, eos_token_id=spec["eos_token_id"],
        bos_token_id=spec["bos_token_id"], qk_layernorm=spec.get("qk_layernorm", False))


def layout_config(saved, spec):
    """config.json text for the fixture from the dict transformers 5.x saved."""
    rp = saved.get("rope_parameters") or {}
    want = spec["partial_rotary_factor"]
    if rp.get("partial_rotary_factor") != want or rp.get("rope_theta") != 10000.0:
        raise RuntimeError(f"saved rope_parameters {rp} do not hold factor {want}, theta 10000")
    if spec.get("rope_linear") and (rp.get("rope_type") != "linear"
                                    or rp.get("factor") != spec["rope_linear"]):
        raise RuntimeError(f"saved rope_parameters {rp} do not hold linear {spec['rope_linear']}")
    if saved.get("partial_rotary_factor", want) != want:
        raise RuntimeError(f"saved top-level partial_rotary_factor {saved['partial_rotary_factor']}"
                           f" contradicts rope_parameters {rp}")
    if spec["layout"] == "5.x":
        return dict(saved)
    # transformers 4.x layout (as in microsoft/phi-1_5 and phi-2): rope keys at top level,
    # torch_dtype instead of dtype, no rope_parameters.
    cfg = {k: v for k, v in saved.items()
           if k not in ("rope_parameters", "dtype", "transformers_version")}
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    cfg["rope_scaling"] = ({"type": "linear", "factor": spec["rope_linear"]}
                           if spec.get("rope_linear") else None)
    cfg["torch_dtype"] = "bfloat16"
    if spec["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = None
    return dict(sorted(cfg.items()))


def check_loaded_config(model, spec):
    c = model.config
    hd = spec["hidden_size"] // spec["num_attention_heads"]
    nkv = spec["num_key_value_heads"] or spec["num_attention_heads"]
    attn = model.model.layers[0].self_attn
    checks = {
        "rope_parameters.partial_rotary_factor": (c.rope_parameters["partial_rotary_factor"],
                                                  spec["partial_rotary_factor"]),
        "rope_parameters.rope_theta": (c.rope_parameters["rope_theta"], 10000.0),
        "num_key_value_heads": (c.num_key_value_heads, nkv),
        "head_dim": (attn.head_dim, hd),
        "rotary_ndims": (attn.rotary_ndims, int(spec["partial_rotary_factor"] * hd)),
        "inv_freq length": (model.model.rotary_emb.inv_freq.numel(),
                            int(spec["partial_rotary_factor"] * hd) // 2),
        "hidden_act": (c.hidden_act, "gelu_new"),
        "qk_layernorm": (attn.qk_layernorm, spec.get("qk_layernorm", False)),
        "q_layernorm present": (hasattr(attn, "q_layernorm"), spec.get("qk_layernorm", False)),
        "tied lm_head": (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
                         spec.get("tie", False)),
        "rope_type": (c.rope_parameters.get("rope_type", "default"),
                      "linear" if spec.get("rope_linear") else "default"),
    }
    if spec.get("rope_linear"):  # the loaded frequencies are the default ones / factor
        rot = int(spec["partial_rotary_factor"] * hd)
        base = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
        got = model.model.rotary_emb.inv_freq.detach().cpu()
        if not torch.allclose(got, base / spec["rope_linear"], rtol=1e-6, atol=0):
            raise RuntimeError(f"{spec['name']}: inv_freq {got} is not the default / factor")
    for what, (got, want) in checks.items():
        if got != want:
            raise RuntimeError(f"{spec['name']}: loaded {what} = {got}, expected {want}")


def build_random_model(spec, out_dir, seed, device):
    """Writes config.json + model.safetensors into out_dir and returns the float32 reloaded model."""
    torch.manual_seed(seed)
    cfg = make_config(spec)
    model = PhiForCausalLM(cfg).float()
    init_random_weights(model, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        st = Path(tmp) / "model.safetensors"
        if not st.exists():
            raise RuntimeError(f"save_pretrained wrote {os.listdir(tmp)}, no model.safetensors")
        names = set(load_file(str(st)))
        if names != expected_weight_names(cfg):
            raise RuntimeError(f"saved names differ: {sorted(names ^ expected_weight_names(cfg))}")
        saved = json.loads((Path(tmp) / "config.json").read_text())
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(st, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(layout_config(saved, spec), indent=2) + "\n")
    ref = load_phi(out_dir, device)
    check_loaded_config(ref, spec)
    check_equals_bf16_file(ref, out_dir / "model.safetensors")
    return ref


SELECTED_RANDOM_MODELS = None  # --random-models (None: all)


def phase_random(out, device, meta):
    for spec in RANDOM_MODELS:
        if SELECTED_RANDOM_MODELS is not None and spec["name"] not in SELECTED_RANDOM_MODELS:
            continue
        t0 = time.time()
        out_dir = out / spec["name"]
        gen = torch.Generator().manual_seed(spec["seed"] + 7)  # prompts do not move with re-seeding
        prompts = [torch.randint(0, RANDOM_VOCAB, (n,), generator=gen).tolist()
                   for n in RANDOM_PROMPT_LENGTHS]
        for attempt in range(MAX_SEED_ATTEMPTS):
            seed = spec["seed"] + attempt
            ref = build_random_model(spec, out_dir, seed, device)
            results = [run_case(ref, ids, device) for ids in prompts]
            gap = min(r["min_top2_gap"] for r in results)
            log(f"{spec['name']}: weight seed {seed}: min_top2_gap {gap:.4g}")
            if gap >= MIN_GAP_RANDOM:
                break
        else:
            raise RuntimeError(f"{spec['name']}: no seed gave min_top2_gap >= {MIN_GAP_RANDOM}")
        cpu_check = cross_check_cpu(out_dir, prompts, results, device)
        cases = []
        for ids, r in zip(prompts, results):
            cases.append({
                "prompt_ids": ids,
                "logits": [f7(row) for row in r["logits"].tolist()],
                "greedy_ids": r["greedy_ids"],
                "greedy_logprobs": f7(r["greedy_logprobs"]),
                "min_top2_gap": f7([r["min_top2_gap"]])[0],
            })
        golden = {"name": spec["name"], **meta, "activation": "gelu_new",
                  "eos_token_id": spec["eos_token_id"], "config_layout": spec["layout"],
                  "weight_seed": seed, "greedy_steps": GREEDY_STEPS, "cpu_check": cpu_check,
                  "cases": cases}
        write_json(golden, out_dir / "golden.json")
        log(f"{spec['name']}: done in {time.time() - t0:.1f} s, files {sorted(os.listdir(out_dir))}")


def cross_check_cpu(model_dir, prompts, results, device):
    """Same checkpoint on the CPU: how far float32 CUDA and CPU differ (informs test tolerances)."""
    if device == "cpu":
        return None
    cpu = load_phi(model_dir, "cpu")
    max_diff, same_greedy = 0.0, True
    for ids, r in zip(prompts, results):
        c = run_case(cpu, ids, "cpu")
        max_diff = max(max_diff, float((c["logits"] - r["logits"]).abs().max()))
        same_greedy &= c["greedy_ids"] == r["greedy_ids"]
    log(f"{model_dir.name}: CPU vs {device}: max |dlogit| {max_diff:.3g}, same greedy {same_greedy}")
    return {"max_abs_logit_diff_vs_cpu": max_diff, "greedy_ids_equal_on_cpu": same_greedy}


# ----------------------------------------------------------------------------------------------
# Demo model
# ----------------------------------------------------------------------------------------------

def encode_checked(tok, raw, prompt):
    """HF tokenizer ids (the reference) and the plain tokenizers-library ids of tokenizer.json."""
    ids = list(tok.encode(prompt))
    raw_ids = raw.encode(prompt).ids
    if ids != raw_ids:
        log(f"WARNING: HF tokenizer and tokenizers.Tokenizer disagree on {prompt!r}: "
            f"{ids} vs {raw_ids}")
    return ids, raw_ids


def phase_tiny(out, device, meta):
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    raw = tokenizers.Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))
    model = load_phi(TINY_DIR, device)
    check_equals_bf16_file(model, TINY_DIR / "model.safetensors")
    cases, all_match, prompts_ids, results = [], True, [], []
    for prompt in TINY_PROMPTS:
        ids, raw_ids = encode_checked(tok, raw, prompt)
        all_match &= ids == raw_ids
        r = run_case(model, ids, device)
        prompts_ids.append(ids)
        results.append(r)
        text = tok.decode(r["greedy_ids"])
        log(f"tiny {prompt[:30]!r} ({len(ids)} tok) -> {text!r} gap {r['min_top2_gap']:.3g}")
        cases.append({
            "prompt": prompt,
            "prompt_ids": ids,
            "greedy_ids": r["greedy_ids"],
            "greedy_logprobs": f7(r["greedy_logprobs"]),
            "greedy_text": text,
            "prefill_logprobs": [None] + f7(prefill_logprobs(r["logits"], ids)[1:]),
            "last_logits": f7(r["logits"][-1].tolist()),
            "min_top2_gap": f7([r["min_top2_gap"]])[0],
        })
        if ids != raw_ids:
            cases[-1]["prompt_ids_tokenizers_lib"] = raw_ids
    cpu_check = cross_check_cpu(TINY_DIR, prompts_ids, results, device)
    golden = {"name": "tiny-phi-code", "model_dir": "models/tiny-phi-code", **meta,
              "activation": model.config.hidden_act, "eos_token_id": model.config.eos_token_id,
              "greedy_steps": GREEDY_STEPS,
              "decode_kwargs": {"skip_special_tokens": False,
                                "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces},
              "hf_ids_equal_tokenizers_lib": all_match, "cpu_check": cpu_check, "cases": cases}
    write_json(golden, out / "tiny-phi-code.json")
    log(f"tiny: done in {time.time() - t0:.1f} s")


# ----------------------------------------------------------------------------------------------
# LoRA adapters on the demo model
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def randomize_lora(pm, name, seed, b_std):
    """peft inits B = 0 (no effect); give A a seeded kaiming-like uniform and B small normal values."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for mod_name, mod in sorted(pm.named_modules(), key=lambda kv: kv[0]):
        if not isinstance(mod, LoraLayer) or name not in mod.lora_A:
            continue
        a, b = mod.lora_A[name].weight, mod.lora_B[name].weight  # [r, in], [out, r]
        bound = 1.0 / math.sqrt(a.shape[1])
        a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) * bound)
        b.copy_(torch.randn(b.shape, generator=gen) * b_std)
        n += 1
    return n


def make_random_adapter(spec, out, device):
    base = load_phi(TINY_DIR, device)
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
                     target_modules=spec["target_modules"], lora_dropout=0.0, bias="none")
    pm = get_peft_model(base, cfg, adapter_name=spec["name"])
    n = randomize_lora(pm, spec["name"], spec["seed"], spec["b_std"])
    want = base.config.num_hidden_layers * len(spec["target_modules"])
    if n != want:
        raise RuntimeError(f"{spec['name']}: randomized {n} LoRA layers, expected {want}")
    pm.eval()
    probe = full_logits(pm, PROBE_IDS, device)[-1]
    dst = out / "adapters" / spec["name"]
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)  # writes tmp/<name>/ for a non-default adapter name
        src = Path(tmp) / spec["name"]
        dst.mkdir(parents=True, exist_ok=True)
        for f in ["adapter_config.json", "adapter_model.safetensors"]:
            shutil.copyfile(src / f, dst / f)
    clear_base_model_path(dst / "adapter_config.json")
    return dst, probe


def clear_base_model_path(config_path):
    """peft records the base model's machine-local path; null it like models/.../adapters/prose (the
    field is metadata: loading with an explicit base model ignores it). Same layout as peft writes."""
    cfg = json.loads(config_path.read_text())
    cfg["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def adapter_info(name, path, rel):
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha, rs = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    return {"name": name, "path": rel, "r": r, "lora_alpha": alpha, "use_rslora": rs,
            "scaling": alpha / math.sqrt(r) if rs else alpha / r,
            "target_modules": sorted(cfg["target_modules"])}


def phase_adapters(out, device, meta):
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    raw = tokenizers.Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))
    base = load_phi(TINY_DIR, device)
    base_greedy = {p: run_case(base, encode_checked(tok, raw, p)[0], device)["greedy_ids"]
                   for p in ADAPTER_PROMPTS}
    del base
    adapters = [("prose", TINY_DIR / "adapters" / "prose", "models/tiny-phi-code/adapters/prose",
                 None)]
    for spec in RANDOM_ADAPTERS:
        path, probe = make_random_adapter(spec, out, device)
        adapters.append((spec["name"], path, f"tests/golden/adapters/{spec['name']}", probe))
    infos, cases = [], []
    for name, path, rel, probe in adapters:
        infos.append(adapter_info(name, path, rel))
        pm = PeftModel.from_pretrained(load_phi(TINY_DIR, device), str(path), adapter_name=name)
        pm.eval()
        tensors = load_file(str(path / "adapter_model.safetensors"))
        zero_b = [k for k, t in tensors.items() if "lora_B" in k and not bool(t.abs().max() > 0)]
        if zero_b:
            raise RuntimeError(f"{name}: all-zero lora_B tensors {zero_b[:3]}")
        log(f"adapter {name}: {len(tensors)} tensors, e.g. {sorted(tensors)[0]}, "
            f"dtype {next(iter(tensors.values())).dtype}, {infos[-1]}")
        if probe is not None:
            again = full_logits(pm, PROBE_IDS, device)[-1]
            d = float((again - probe).abs().max())
            if d > 1e-5:
                raise RuntimeError(f"{name}: reloaded adapter differs from the saved one by {d}")
        for prompt in ADAPTER_PROMPTS:
            ids, _ = encode_checked(tok, raw, prompt)
            r = run_case(pm, ids, device)
            differs = r["greedy_ids"] != base_greedy[prompt]
            text = tok.decode(r["greedy_ids"])
            log(f"adapter {name} {prompt[:20]!r} -> {text!r} gap {r['min_top2_gap']:.3g} "
                f"differs from base: {differs}")
            cases.append({
                "adapter": name,
                "prompt": prompt,
                "prompt_ids": ids,
                "greedy_ids": r["greedy_ids"],
                "greedy_logprobs": f7(r["greedy_logprobs"]),
                "greedy_text": text,
                "last_logits": f7(r["logits"][-1].tolist()),
                "min_top2_gap": f7([r["min_top2_gap"]])[0],
                "greedy_differs_from_base": differs,
            })
        del pm
    golden = {"name": "tiny-phi-code-adapters", "base_model": "models/tiny-phi-code", **meta,
              "merged": False, "greedy_steps": GREEDY_STEPS, "adapters": infos, "cases": cases}
    write_json(golden, out / "tiny-phi-code-adapters.json")
    log(f"adapters: done in {time.time() - t0:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (laid out like tests/golden/)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--phases", default="random,tiny,adapters")
    ap.add_argument("--random-models", default="",
                    help="comma-separated names of RANDOM_MODELS for the random phase (default all)")
    args = ap.parse_args()
    global SELECTED_RANDOM_MODELS
    if args.random_models:
        SELECTED_RANDOM_MODELS = set(args.random_models.split(","))
        unknown = SELECTED_RANDOM_MODELS - {s["name"] for s in RANDOM_MODELS}
        if unknown:
            sys.exit(f"unknown --random-models {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = setup_torch(args.device)
    meta = versions(device_name)
    log(f"{meta['generator']} on {device_name}, TF32 off, eager attention, float32")
    phases = {"random": phase_random, "tiny": phase_tiny, "adapters": phase_adapters}
    failed = []
    for name in args.phases.split(","):
        if name not in phases:
            sys.exit(f"unknown phase {name!r}; known: {sorted(phases)}")
        try:
            phases[name](out, args.device, meta)
        except Exception:  # noqa: BLE001 - report and go on with the next phase
            traceback.print_exc()
            failed.append(name)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            log(f"  {p.relative_to(out)}: {p.stat().st_size} bytes")
    if failed:
        log(f"FAILED phases: {failed}")
        sys.exit(1)
    log("all phases done")


if __name__ == "__main__":
    main()
