#!/usr/bin/env python3
"""PyTorch SDPA timings for the shapes of tests/gpu/cuda_attention_bench_test.cc.

Runs on the GPU machine (its python3 holds torch): for each shape and each SDPA backend
(FlashAttention, cuDNN, memory-efficient) it times the causal attention forward in bf16 and prints
lines in the bench test's format,

  RESULT impl=sdpa-flash shape=h32d80_s4096 ms=0.3000 tflops=286.3

so tools/attn_gpu_check.sh can print one table. FLOP are counted as in the bench test: 4 x hd x
heads x (query, key) pairs kept by the causal mask, S^2 / 2 pairs for a full prefill. A cached
prefix (q_len < context) uses the bottom-right causal mask (torch.nn.attention.bias). Each time
is the median of 15 launches, each between its own CUDA events, after 3 warm-ups. A backend that
refuses a shape prints `unsupported` and the reason.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (heads, head_dim, q_len, context_len, batch) -- same as the C++ bench.
SHAPES = {
    "h32d80_s512": (32, 80, 512, 512, 1),
    "h32d80_s1024": (32, 80, 1024, 1024, 1),
    "h32d80_s2048": (32, 80, 2048, 2048, 1),
    "h32d80_s4096": (32, 80, 4096, 4096, 1),
    "h32d80_s8192": (32, 80, 8192, 8192, 1),
    "h32d80_b8_s1024": (32, 80, 1024, 1024, 8),
    "h32d80_b8_s2048": (32, 80, 2048, 2048, 8),
    "h32d64_s2048": (32, 64, 2048, 2048, 1),
    "h32d64_s4096": (32, 64, 4096, 4096, 1),
    "h32d64_s8192": (32, 64, 8192, 8192, 1),
    "h32d80_q512_ctx4096": (32, 80, 512, 4096, 1),
    # A tensor-parallel rank of Phi-2 at TP=2 (16 of the 32 heads).
    "h16d80_s1024": (16, 80, 1024, 1024, 1),
    "h16d80_s2048": (16, 80, 2048, 2048, 1),
}
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def pairs(q_len, ctx):
    if q_len == ctx:
        return 0.5 * q_len * q_len
    return sum(ctx - q_len + i + 1 for i in range(q_len))


def median_ms(fn, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated SDPA backends (" + ", ".join(BACKENDS) + ")")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    for name in args.shapes.split(","):
        heads, hd, q_len, ctx, batch = SHAPES[name]
        q = torch.randn(batch, heads, q_len, hd, device=dev, dtype=torch.bfloat16)
        k = torch.randn(batch, heads, ctx, hd, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, heads, ctx, hd, device=dev, dtype=torch.bfloat16)
        flop = 4.0 * hd * heads * pairs(q_len, ctx) * batch
        if q_len == ctx:
            kwargs = {"is_causal": True}
        else:
            from torch.nn.attention.bias import causal_lower_right
            kwargs = {"attn_mask": causal_lower_right(q_len, ctx)}
        ref = None
        for bname in args.backends.split(","):
            backend = BACKENDS[bname]
            try:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
                    torch.cuda.synchronize()
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
            except Exception as e:  # a backend that cannot run this shape
                msg = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
                print(f"RESULT impl=sdpa-{bname} shape={name} unsupported ({msg})", flush=True)
                continue
            diff = 0.0 if ref is None else (out.float() - ref).abs().max().item()
            if ref is None:
                ref = out.float()
            print(f"RESULT impl=sdpa-{bname} shape={name} ms={ms:.4f} "
                  f"tflops={flop / (ms * 1e-3) / 1e12:.1f} max_diff_vs_first={diff:.2g}",
                  flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
