#!/usr/bin/env python3
"""Per-step and per-layer breakdown of a phishard_bench --trace-csv timeline.

Usage: bench/trace_layers.py TRACE.csv[.gz] [LABEL_SUBSTRING] [--layer N]

For each trace window (one decode case: its label, then two steps' kernels; start / end in ns
relative to the window's first kernel) it takes the last step (from its embedding kernel on),
prints the step's span, each kernel kind's count, total and mean time, how much of the span the
decode attention covers and which kernels overlap it, and the timeline of layer N (from one
LayerNorm to the next; default 10): when each kernel started and ended, and its grid. Kernels of a
CUDA graph carry one stream id per graph node, so kinds are told apart by name and grid, not by
stream. Names are demangled with c++filt when it is installed.
"""
import argparse
import collections
import csv
import gzip
import shutil
import subprocess

KINDS = [('PagedDecodePipeSteal', 'attention (steal)'), ('PagedDecodePipe', 'attention'),
         ('PagedDecodeMerge', 'attention merge'), ('PagedDecodeKernel', 'attention (regs)'),
         ('LayerNorm', 'layernorm'), ('Rotary', 'rotary + kv write'), ('Embedding', 'embedding'),
         ('GreedyChunk', 'greedy chunk'), ('GreedyMerge', 'greedy merge'),
         ('splitKreduce', 'cublasLt splitK reduce')]


def read_windows(path):
    opener = gzip.open if path.endswith('.gz') else open
    windows, prev = [], None
    with opener(path, 'rt') as f:
        for r in csv.DictReader(f):
            start = int(r['start_ns'])
            # A window's rows are written in start order; a new window restarts at 0.
            if prev is None or r['label'] != prev[0] or start < prev[1]:
                windows.append((r['label'], []))
            windows[-1][1].append((start, int(r['end_ns']), int(r['grid']), r['name']))
            prev = (r['label'], start)
    return windows


def demangler(names):
    if not shutil.which('c++filt'):
        return {n: n for n in names}
    out = subprocess.run(['c++filt'], input='\n'.join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.split('\n')))


def union_ns(intervals):
    total, cur = 0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('trace')
    ap.add_argument('label', nargs='?', default='')
    ap.add_argument('--layer', type=int, default=10)
    args = ap.parse_args()
    windows = read_windows(args.trace)
    dem = demangler(sorted({k[3] for _, ks in windows for k in ks}))

    def kind(name):
        d = dem.get(name, name)
        for key, v in KINDS:
            if key in d:
                return v
        return d[:44]

    for label, ks in windows:
        if args.label not in label:
            continue
        ks.sort()
        emb = [i for i, k in enumerate(ks) if kind(k[3]) == 'embedding']
        step = ks[emb[-1]:] if emb else ks
        t0, t1 = step[0][0], max(k[1] for k in step)
        print(f'\n=== {label}: last step {(t1 - t0) / 1e3:.1f} us, {len(step)} kernels')
        tot = collections.defaultdict(lambda: [0, 0])
        for k in step:
            key = (kind(k[3]), k[2])
            tot[key][0] += k[1] - k[0]
            tot[key][1] += 1
        for (name, grid), (ns, n) in sorted(tot.items(), key=lambda x: -x[1][0]):
            print(f'  {name:44s} grid {grid:6d} x{n:3d} total {ns / 1e3:9.1f} us, each {ns / n / 1e3:7.1f}')
        att = [(k[0], k[1]) for k in step if kind(k[3]).startswith('attention') and 'merge' not in kind(k[3])]
        if att:
            cover = union_ns(att)
            over = collections.defaultdict(int)
            for k in step:
                if kind(k[3]).startswith('attention'):
                    continue
                for a, b in att:
                    over[kind(k[3])] += max(0, min(b, k[1]) - max(a, k[0]))
            print(f'  attention covers {cover / 1e3:.1f} us, the rest of the step {(t1 - t0 - cover) / 1e3:.1f} us; '
                  f'before the first {(att[0][0] - t0) / 1e3:.1f} us, after the last {(t1 - att[-1][1]) / 1e3:.1f} us')
            busy = ', '.join(f'{n} {v / 1e3:.1f} us' for n, v in sorted(over.items(), key=lambda x: -x[1]) if v)
            print(f'  running beside attention: {busy or "nothing"}')
        lns = [k for k in step if kind(k[3]) == 'layernorm']
        if len(lns) > args.layer + 1:
            a, b = lns[args.layer][0], lns[args.layer + 1][0]
            print(f'  layer {args.layer}: {(b - a) / 1e3:.1f} us (start -> end (duration) grid kernel, us from its LayerNorm)')
            for k in step:
                if a <= k[0] < b:
                    print(f'    {(k[0] - a) / 1e3:8.1f} -> {(k[1] - a) / 1e3:8.1f} ({(k[1] - k[0]) / 1e3:6.1f}) '
                          f'g{k[2]:6d} {kind(k[3])}')


if __name__ == '__main__':
    main()
