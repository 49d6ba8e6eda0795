#!/usr/bin/env python3
"""Instruction counts of a CUDA kernel's loops, from its SASS — no GPU needed.

Kernel work here is often bound by what a loop issues per byte (perf-log 2026-11-30 10:16-10:44),
so counting a loop body's instructions before and after a change is a cheap first check. The
build machine's CUDA toolkit has no cuobjdump; the PyPI wheel has one (a dev tool, not a product
dependency):

  pip download --no-deps nvidia-cuda-cuobjdump -d /tmp/w && python3 -m zipfile -e /tmp/w/*.whl /tmp/cuo
  chmod +x /tmp/cuo/nvidia/cu13/bin/cuobjdump

Then, with an object file of the kernel (e.g. the .cu.o under build-h11/kernels/CMakeFiles/):

  tools/sass_loops.py --cuobjdump /tmp/cuo/nvidia/cu13/bin/cuobjdump OBJ REGEX

prints, for each function whose mangled name matches REGEX, every backward branch (a loop) with
its body's length and most frequent opcodes.
"""
import argparse
import collections
import re
import subprocess
import sys


def functions(sass):
    name, body = None, []
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            if name:
                yield name, body
            name, body = m.group(1), []
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m and name:
            body.append((int(m.group(1), 16), m.group(2).strip()))
    if name:
        yield name, body


def opcode(text):
    words = text.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("obj")
    ap.add_argument("regex", help="matched against the mangled function names")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--top", type=int, default=10, help="opcodes to show a loop")
    args = ap.parse_args()
    sass = subprocess.run([args.cuobjdump, "-sass", args.obj], check=True, capture_output=True,
                          text=True).stdout
    found = False
    for name, body in functions(sass):
        if not re.search(args.regex, name):
            continue
        found = True
        print(f"{name}: {len(body)} instructions")
        for addr, text in body:
            m = re.search(r"BRA (?:`\()?(0x[0-9a-f]+)", text)
            if not m or int(m.group(1), 16) >= addr:
                continue
            start = int(m.group(1), 16)
            loop = [t for a, t in body if start <= a <= addr]
            ops = collections.Counter(opcode(t) for t in loop)
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
            print(f"  loop {start:#x}-{addr:#x}: {len(loop)} instructions ({top})")
    if not found:
        print(f"no function matches {args.regex!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
