# Sourced by the TP device scripts (tools/device_tp_check.sh, tools/device_tp_targets_check.sh):
# `served`, a TP=1 `serve` against a TP=N `launch` of one model through the router-style client.
# The caller sets B (bundle bin folder), ROOT (repo root) and OUT (log folder).
# shellcheck shell=bash

# served MODEL_DIR TAG N: TP=1 serve and TP=N launch of MODEL_DIR, the golden prompts through the
# router-style client against both; prints SERVED ... and writes $OUT/served_TAG.json.
served() {
  local model=$1 tag=$2 n=$3 out="/tmp/served_$2"
  rm -rf "$out" && mkdir -p "$out"
  python3 - "$ROOT/tests/golden/tiny-phi-code.json" > "$out/prompts.txt" <<'PY'
import json, sys
for c in json.load(open(sys.argv[1]))["cases"]:
    print(json.dumps(c["prompt"]))
PY
  for w in 1 "$n"; do
    local uds="$out/s$w"
    if [ "$w" = 1 ]; then
      $B/phishard serve "$model" --device cuda --uds-path "$uds" > "$out/serve$w.log" 2>&1 &
    else
      $B/phishard launch --num-shard "$w" --uds-path "$uds" "$model" --device cuda \
        > "$out/serve$w.log" 2>&1 &
    fi
    local pid=$! ok=0
    for _ in $(seq 1 240); do
      if [ -S "$uds-$((w - 1))" ] && $B/phishard client health --uds-path "$uds" > /dev/null 2>&1; then
        ok=1
        break
      fi
      sleep 0.25
    done
    if [ $ok = 1 ]; then
      local first=1
      while read -r p; do
        prompt=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]))' "$p")
        extra=()
        [ $first = 1 ] && extra=(--startup)
        first=0
        $B/phishard client generate --uds-path "$uds" --prompt "$prompt" --max-new-tokens 16 \
          --json "${extra[@]}" >> "$out/gen$w.jsonl" 2>> "$out/client$w.log" ||
          echo '{"error": "client failed"}' >> "$out/gen$w.jsonl"
      done < "$out/prompts.txt"
    else
      echo "TP=$w did not come up" >> "$out/client$w.log"
    fi
    kill -TERM $pid 2> /dev/null
    for _ in $(seq 1 60); do kill -0 $pid 2> /dev/null || break; sleep 0.25; done
    kill -KILL $pid 2> /dev/null
    wait $pid 2> /dev/null
    echo "== TP=$w serve log (tail)"
    tail -5 "$out/serve$w.log"
    cat "$out/client$w.log" 2> /dev/null | tail -5
  done
  python3 - "$out" "$n" "$tag" "$OUT/served_$tag.json" <<'PY'
import json, sys
out, n, tag, dst = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def load(w):
    try:
        return [json.loads(l) for l in open(f"{out}/gen{w}.jsonl")]
    except OSError:
        return []
a, b = load(1), load(n)
same = sum(1 for x, y in zip(a, b) if "ids" in x and x.get("ids") == y.get("ids"))
diffs = []
for i, (x, y) in enumerate(zip(a, b)):
    if "ids" not in x or "ids" not in y:
        diffs.append({"case": i, "error": [x.get("error"), y.get("error")]})
        continue
    k = next((j for j, (p, q) in enumerate(zip(x["ids"], y["ids"])) if p != q), None)
    upto = len(x["ids"]) if k is None else k
    lp = max((abs(p - q) for p, q in zip(x["logprobs"][:upto], y["logprobs"][:upto])),
             default=0.0)
    d = {"case": i, "first_diff_step": k, "max_logprob_diff_before": lp}
    if k is not None:  # a near-tie when the two picks' logprobs are this close
        d["tp1_pick"] = [x["ids"][k], x["logprobs"][k]]
        d["tpn_pick"] = [y["ids"][k], y["logprobs"][k]]
    diffs.append(d)
json.dump({"model": tag, "world": int(n), "prompts": len(a), "tp1": a, "tpn": b,
           "identical_ids": same, "cases": diffs}, open(dst, "w"), indent=1)
print(f"SERVED {tag} TP={n} vs TP=1: {same}/{len(a)} generations identical "
      f"({len(b)} answers from TP={n})")
for d in diffs:
    print(" ", d)
PY
}
