#!/usr/bin/env bash
# Runs phishard_bench and the PyTorch peer (bench/peer_pytorch.py) on this machine's GPU and
# prints one table: our step times, the hardware floor, and the peer's eager and CUDA-graph times
# for the same steps, with peer/ours ratios (> 1: we are faster).
#
#   bench/run_all.sh [--bin PATH/phishard_bench] [--out DIR] [--quick]
# DIR gets bench.json and peer.json (default: a fresh temp dir); the logs go to stdout.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${PHISHARD_BENCH_BIN:-$here/../build/bin/phishard_bench}
out=""
quick=()
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    *) echo "usage: $0 [--bin PATH] [--out DIR] [--quick]" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || out=$(mktemp -d)
mkdir -p "$out"
[ -x "$bin" ] || { echo "run_all.sh: no phishard_bench at $bin (--bin PATH)" >&2; exit 2; }

rc=0
timeout "${BENCH_TIMEOUT_S:-150}" "$bin" --json "$out/bench.json" "${quick[@]}" 2>&1 || rc=1
PYTHONUNBUFFERED=1 timeout "${PEER_TIMEOUT_S:-170}" python3 "$here/peer_pytorch.py" \
  --json "$out/peer.json" 2>&1 || rc=1

python3 - "$out/bench.json" "$out/peer.json" <<'PY'
import json, sys
try:
    ours = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no phishard_bench results: {e}")
try:
    peer = json.load(open(sys.argv[2]))
except Exception as e:
    peer = {"rows": []}
    print(f"(no peer results: {e})")

def ours_row(kind, batch, n, mode="graph"):
    for r in ours["rows"]:
        if r["kind"] != kind or r["batch"] != batch:
            continue
        if kind == "decode" and r["context"] == n and r["mode"] == mode:
            return r
        if kind == "prefill" and r["tokens"] == n:
            return r
    return None

def peer_ms(kind, mode, batch, n):
    for r in peer["rows"]:
        key = "context" if kind == "decode" else "tokens"
        if r["kind"] == kind and r["mode"] == mode and r["batch"] == batch and r.get(key) == n:
            return r.get("ms"), r.get("error")
    return None, "not run"

print(f"\n{ours['device']}: copy {ours['copy_tbps']:.2f} TB/s, bf16 GEMM {ours['gemm_tflops']:.0f} "
      f"TFLOP/s (measured); peer: {peer.get('peer', '?')} torch {peer.get('torch', '?')} "
      f"transformers {peer.get('transformers', '?')}")
hdr = (f"{'step':<24}{'ours ms':>9}{'floor':>8}{'/floor':>7}{'tok/s':>9}"
       f"{'peer eager':>11}{'peer graph':>11}{'eager/ours':>11}{'graph/ours':>11}")
print(hdr)
print("-" * len(hdr))
cases = [("decode", b, 1024) for b in (1, 32, 256)] + [("prefill", 1, 2048)]
for kind, b, n in cases:
    r = ours_row(kind, b, n)
    if r is None:
        print(f"{kind} {b}x{n}: not in phishard_bench results")
        continue
    rate = r["tok_s"] if kind == "decode" else b * n / (r["ms"] * 1e-3)
    pe, ee = peer_ms(kind, "eager", b, n)
    pg, eg = peer_ms(kind, "static_graph", b, n) if kind == "decode" else (None, "-")
    fmt = lambda v: f"{v:>11.3f}" if v else f"{'-':>11}"
    ratio = lambda v: f"{v / r['ms']:>11.2f}" if v else f"{'-':>11}"
    name = f"decode b{b} ctx{n}" if kind == "decode" else f"prefill {b}x{n}"
    print(f"{name:<24}{r['ms']:>9.3f}{r['floor_ms']:>8.3f}{r['ratio']:>7.2f}{rate:>9.0f}"
          f"{fmt(pe)}{fmt(pg)}{ratio(pe)}{ratio(pg)}")
    for e in (ee, eg):
        if e and e not in ("-", "not run"):
            print(f"    peer error: {e}")
PY
exit $rc
