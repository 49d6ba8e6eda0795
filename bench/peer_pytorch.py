#!/usr/bin/env python3
"""The PyTorch peer of phishard_bench: Hugging Face `PhiForCausalLM` with Phi-2's shape, random
bf16 weights, on the same GPU, timed the same way (decode ms per step at a fixed context, prefill
ms per step), printed as JSON.

Modes:
  eager         DynamicCache, one Python-driven forward per step (what `generate` does by default).
  static_graph  StaticCache (fixed-size KV tensors, transformers' compile-friendly cache) and the
                decode step captured once with torch.cuda.CUDAGraph and replayed: the same idea as
                phishard's decode graphs, without torch.compile's minutes of compilation.
The KV caches are filled with random K/V of the wanted context instead of a prefill (the step's
cost does not depend on the values), so a batch of 256 x 1024 needs no 262k-token prefill.

  python3 bench/peer_pytorch.py --json peer.json [--layers 32] [--batches 1,32,256] [--context 1024]
  python3 bench/peer_pytorch.py --selftest    # CPU, tiny shape: API checks and no host syncs
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import PhiConfig, PhiForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache


def phi2_config(layers, tiny=False):
    if tiny:  # CPU self-test shape
        return PhiConfig(vocab_size=512, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, partial_rotary_factor=0.5,
                         attn_implementation="sdpa")
    return PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                     num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=8192, partial_rotary_factor=0.4, rope_theta=10000.0,
                     layer_norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=False,
                     attn_implementation="sdpa")


def build_model(cfg, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(cfg)
    return model.to(dtype=torch.bfloat16).eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def fill_random(cache, cfg, batch, ctx, device, gen):
    """Random K/V of `ctx` positions into every layer of `cache`, one layer at a time (a static
    cache copies them, so only one layer's temporaries are alive: 256 x 1024 is 86 GB of K/V)."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, ctx, hd)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
        v = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
        cache.update(k, v, layer)
        del k, v


def time_steps(fn, steps, device):
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def decode_eager(model, cfg, batch, ctx, steps, device):
    gen = torch.Generator(device=device).manual_seed(batch * 7 + ctx)
    cache = DynamicCache(config=cfg)
    fill_random(cache, cfg, batch, ctx, device, gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
    state = {"pos": ctx}

    def step():
        pos = torch.full((batch, 1), state["pos"], device=device, dtype=torch.long)
        out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        state["pos"] += 1
        return out.logits

    for _ in range(2):
        step()
    return time_steps(step, steps, device)


@torch.inference_mode()
def decode_static_graph(model, cfg, batch, ctx, steps, device, warmup=3):
    gen = torch.Generator(device=device).manual_seed(batch * 7 + ctx)
    cache = StaticCache(config=cfg, max_cache_len=ctx + warmup + steps + 8)
    fill_random(cache, cfg, batch, ctx, device, gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
    # Positions live in a static tensor advanced inside the graph, as the cache's own length is.
    pos = torch.full((batch, 1), ctx, device=device, dtype=torch.long)

    def step():
        out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        pos.add_(1)
        return out.logits

    if device != "cuda":  # self-test: the step runs, nothing to capture
        for _ in range(warmup):
            step()
        return time_steps(step, steps, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # PyTorch's rule: warm up on a side stream before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    graph.replay()
    sync(device)
    ms = time_steps(graph.replay, steps, device)
    assert torch.isfinite(logits.float()).all(), "peer graph produced non-finite logits"
    return ms


@torch.inference_mode()
def prefill(model, cfg, batch, length, steps, device):
    gen = torch.Generator(device=device).manual_seed(length)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device, generator=gen)

    def step():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    step()
    return time_steps(step, steps, device)


def selftest():
    """CPU, tiny shape: every mode runs, and a decode step of the static-cache path does no
    device-to-host read (what would break CUDA-graph capture)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = phi2_config(2, tiny=True)
    model = build_model(cfg, "cpu")
    print("eager", decode_eager(model, cfg, 2, 40, 2, "cpu"))
    print("static", decode_static_graph(model, cfg, 2, 40, 2, "cpu"))
    print("prefill", prefill(model, cfg, 1, 64, 1, "cpu"))

    syncing = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal",
               "aten::is_nonzero"}

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in syncing:
                raise RuntimeError(f"host sync in the decode step: {name}")
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(1)
    cache = StaticCache(config=cfg, max_cache_len=64)
    with torch.inference_mode():
        fill_random(cache, cfg, 3, 20, "cpu", gen)
        ids = torch.randint(0, cfg.vocab_size, (3, 1))
        pos = torch.full((3, 1), 20, dtype=torch.long)
        model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1)  # first call outside: lazy parts
        with NoSync():
            pos.add_(1)
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
    assert out.logits.shape == (3, 1, cfg.vocab_size), out.logits.shape
    print("selftest ok: static-cache decode step has no host sync")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here as well")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", default="1x2048")
    ap.add_argument("--modes", default="eager,static_graph")
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args()
    if args.selftest:
        selftest()
        return 0
    device = "cuda"
    t0 = time.perf_counter()
    cfg = phi2_config(args.layers)
    model = build_model(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    result = {"peer": "transformers PhiForCausalLM", "torch": torch.__version__,
              "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(),
              "layers": args.layers, "params": params, "attn": cfg._attn_implementation,
              "init_s": round(time.perf_counter() - t0, 2), "rows": []}
    modes = args.modes.split(",")
    for batch in [int(b) for b in args.batches.split(",")]:
        for mode in modes:
            row = {"kind": "decode", "mode": mode, "batch": batch, "context": args.context}
            try:
                fn = decode_eager if mode == "eager" else decode_static_graph
                ms = fn(model, cfg, batch, args.context, args.steps, device)
                row.update(ms=round(ms, 4), tok_s=round(batch / ms * 1e3, 1))
            except Exception as e:  # noqa: BLE001 - report and carry on with the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.empty_cache()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    for spec in args.prefill.split(","):
        b, n = (int(x) for x in spec.split("x"))
        row = {"kind": "prefill", "mode": "eager", "batch": b, "tokens": n}
        try:
            ms = prefill(model, cfg, b, n, 5, device)
            row.update(ms=round(ms, 3), tflops=round(2 * b * n * params / ms / 1e9, 1))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
