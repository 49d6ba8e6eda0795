#!/usr/bin/env python3
"""Checks the golden fixtures under tests/golden/ against an independent float64 NumPy Phi forward.

Needs only numpy (and the `tokenizers` package, if present, to re-check the demo prompts' ids). This
re-derives every reference value that tools/gen_golden.py took from transformers/peft, from the
checkpoint files alone, using the math of the spec (parallel residual, partial NeoX rotary, GQA,
gelu_new = tanh GELU, LayerNorm with bias, lm_head with bias, unmerged LoRA with alpha/r or
alpha/sqrt(r) scaling). A fixture that disagrees with it is wrong, or the spec is.

Usage: python3 tools/check_golden.py [--golden tests/golden]
"""
import argparse
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The fixtures are float32 computations; float64 here differs by float32 rounding only (~1e-5 on
# logits of magnitude ~10). 1e-3 is far above that and far below the smallest greedy gap (4.8e-3).
LOGIT_TOL = 1e-3
LOGPROB_TOL = 1e-3


def read_safetensors(path):
    """name -> float64 array. bf16 is widened exactly (its bits are the top half of a float32)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = data[begin:end]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif info["dtype"] == "F16":
            a = np.frombuffer(buf, dtype="<f2")
        else:
            raise ValueError(f"{path}: {name}: unsupported dtype {info['dtype']}")
        out[name] = a.astype(np.float64).reshape(info["shape"])
    return out


def read_config(model_dir):
    """Both layouts: 4.x top-level rope keys, 5.x rope_parameters."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    rp = c.get("rope_parameters") or {}
    nh = c["num_attention_heads"]
    hd = c["hidden_size"] // nh
    factor = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))
    if c.get("hidden_act") != "gelu_new":
        raise ValueError(f"{model_dir}: hidden_act {c.get('hidden_act')} not handled here")
    return {
        "L": c["num_hidden_layers"], "nH": nh, "nKV": c.get("num_key_value_heads") or nh,
        "hd": hd, "rot": int(factor * hd), "eps": c["layer_norm_eps"],
        "theta": rp.get("rope_theta", c.get("rope_theta", 10000.0)),
        "qk_ln": bool(c.get("qk_layernorm")), "tied": bool(c.get("tie_word_embeddings")),
        "rope_factor": linear_factor(c),
    }


def linear_factor(c):
    """Linear RoPE scaling's factor (5.x rope_parameters wins over 4.x rope_scaling), else 1."""
    for rs in (c.get("rope_parameters"), c.get("rope_scaling")):
        if rs:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind == "linear":
                return float(rs["factor"])
            if kind != "default":
                raise ValueError(f"RoPE scaling {kind} not handled here")
            return 1.0
    return 1.0


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rotary(x, rot, theta, factor=1.0):
    """x [T, heads, hd]; rotate-half on the first `rot` dims, position p = row index; linear
    scaling divides every frequency by `factor`."""
    t = x.shape[0]
    inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot) / factor
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]  # [T, rot/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :rot // 2], x[..., rot // 2:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def forward(w, cfg, ids, lora=None):
    """Logits [T, V] of the whole sequence. lora: module name -> (A [r,in], B [out,r], scale)."""
    lora = lora or {}

    def linear(name, x):
        y = x @ w[name + ".weight"].T + w[name + ".bias"]
        if name in lora:
            a, b, s = lora[name]
            y = y + (x @ a.T) @ b.T * s
        return y

    t, nh, nkv, hd = len(ids), cfg["nH"], cfg["nKV"], cfg["hd"]
    h = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["L"]):
        p = f"model.layers.{i}."
        n = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], cfg["eps"])
        q = linear(p + "self_attn.q_proj", n).reshape(t, nh, hd)
        k = linear(p + "self_attn.k_proj", n).reshape(t, nkv, hd)
        if cfg["qk_ln"]:  # over head_dim, before the rotary
            q = layer_norm(q, w[p + "self_attn.q_layernorm.weight"],
                           w[p + "self_attn.q_layernorm.bias"], cfg["eps"])
            k = layer_norm(k, w[p + "self_attn.k_layernorm.weight"],
                           w[p + "self_attn.k_layernorm.bias"], cfg["eps"])
        q = rotary(q, cfg["rot"], cfg["theta"], cfg["rope_factor"])
        k = rotary(k, cfg["rot"], cfg["theta"], cfg["rope_factor"])
        v = linear(p + "self_attn.v_proj", n).reshape(t, nkv, hd)
        att = np.empty((t, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        attn = linear(p + "self_attn.dense", att.reshape(t, nh * hd))
        mlp = linear(p + "mlp.fc2", gelu_tanh(linear(p + "mlp.fc1", n)))
        h = h + attn + mlp
    h = layer_norm(h, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], cfg["eps"])
    if cfg["tied"] and "lm_head.weight" not in w:
        return h @ w["model.embed_tokens.weight"].T + w["lm_head.bias"]
    return linear("lm_head", h)


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Report:
    def __init__(self):
        self.failures = []

    def check(self, ok, what):
        if not ok:
            self.failures.append(what)
            print("  FAIL", what)


def check_greedy(rep, w, cfg, case, tag, lora=None):
    """One forward over prompt + greedy ids gives every greedy step's logits (rows T-1 .. T+14).
    Returns the logits of the prompt positions and the largest logprob error."""
    ids, greedy = case["prompt_ids"], case["greedy_ids"]
    logits = forward(w, cfg, ids + greedy, lora)
    t = len(ids)
    steps = logits[t - 1:t - 1 + len(greedy)]
    lsm = log_softmax(steps)
    rep.check(list(steps.argmax(-1)) == greedy, f"{tag}: greedy ids differ")
    lp_err = float(np.abs(lsm[np.arange(len(greedy)), greedy] - case["greedy_logprobs"]).max())
    rep.check(lp_err < LOGPROB_TOL, f"{tag}: greedy logprob error {lp_err:.3g}")
    top2 = np.sort(steps, -1)[:, -2:]
    gap = float((top2[:, 1] - top2[:, 0]).min())
    rep.check(abs(gap - case["min_top2_gap"]) < 2 * LOGIT_TOL, f"{tag}: min_top2_gap {gap:.4g}")
    return logits[:t], lp_err


def check_random(rep, model_dir):
    w, cfg = read_safetensors(model_dir / "model.safetensors"), read_config(model_dir)
    g = json.loads((model_dir / "golden.json").read_text())
    worst = 0.0
    for case in g["cases"]:
        tag = f"{model_dir.name} T={len(case['prompt_ids'])}"
        logits, _ = check_greedy(rep, w, cfg, case, tag)
        err = float(np.abs(logits - np.array(case["logits"])).max())
        worst = max(worst, err)
        rep.check(err < LOGIT_TOL, f"{tag}: logits error {err:.3g}")
    print(f"{model_dir.name}: {len(g['cases'])} cases, max |logit - golden| {worst:.3g}")


def check_tiny(rep, golden, model_dir):
    w, cfg = read_safetensors(model_dir / "model.safetensors"), read_config(model_dir)
    g = json.loads(golden.read_text())
    try:
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except ImportError:
        tok = None
    worst = 0.0
    for case in g["cases"]:
        tag = f"tiny {case['prompt'][:20]!r}"
        if tok is not None:
            rep.check(tok.encode(case["prompt"]).ids == case["prompt_ids"], f"{tag}: prompt ids")
            rep.check(tok.decode(case["greedy_ids"], skip_special_tokens=False)
                      == case["greedy_text"], f"{tag}: greedy text")
        logits, _ = check_greedy(rep, w, cfg, case, tag)
        err = float(np.abs(logits[-1] - np.array(case["last_logits"])).max())
        lsm = log_softmax(logits)
        ids = case["prompt_ids"]
        pre = [lsm[k - 1, ids[k]] for k in range(1, len(ids))]
        pre_err = float(np.abs(np.array(pre) - case["prefill_logprobs"][1:]).max()) if pre else 0.0
        rep.check(case["prefill_logprobs"][0] is None, f"{tag}: prefill_logprobs[0] not null")
        rep.check(err < LOGIT_TOL, f"{tag}: last_logits error {err:.3g}")
        rep.check(pre_err < LOGPROB_TOL, f"{tag}: prefill logprob error {pre_err:.3g}")
        worst = max(worst, err)
    print(f"{golden.name}: {len(g['cases'])} cases, max |last logit - golden| {worst:.3g}")


def read_lora(path):
    """module name (e.g. model.layers.0.self_attn.q_proj) -> (A, B, scale) from a PEFT adapter."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    t = read_safetensors(path / "adapter_model.safetensors")
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            out[mod] = (t[k], t[k.replace("lora_A", "lora_B")], scale)
    return out


def check_adapters(rep, golden, model_dir):
    w, cfg = read_safetensors(model_dir / "model.safetensors"), read_config(model_dir)
    g = json.loads(golden.read_text())
    loras = {a["name"]: read_lora(REPO / a["path"]) for a in g["adapters"]}
    worst = 0.0
    for case in g["cases"]:
        tag = f"adapter {case['adapter']} {case['prompt'][:20]!r}"
        logits, _ = check_greedy(rep, w, cfg, case, tag, loras[case["adapter"]])
        err = float(np.abs(logits[-1] - np.array(case["last_logits"])).max())
        rep.check(err < LOGIT_TOL, f"{tag}: last_logits error {err:.3g}")
        worst = max(worst, err)
    print(f"{golden.name}: {len(g['cases'])} cases over {sorted(loras)}, "
          f"max |last logit - golden| {worst:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--golden", default=str(REPO / "tests" / "golden"))
    args = ap.parse_args()
    gold = Path(args.golden)
    tiny = REPO / "models" / "tiny-phi-code"
    rep = Report()
    for d in sorted(p for p in gold.iterdir() if (p / "golden.json").exists()):
        check_random(rep, d)
    check_tiny(rep, gold / "tiny-phi-code.json", tiny)
    check_adapters(rep, gold / "tiny-phi-code-adapters.json", tiny)
    if rep.failures:
        print(f"{len(rep.failures)} checks failed")
        sys.exit(1)
    print("all golden fixtures agree with the float64 NumPy reference")


if __name__ == "__main__":
    main()
