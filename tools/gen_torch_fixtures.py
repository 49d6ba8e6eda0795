#!/usr/bin/env python3
"""Writes the PyTorch-checkpoint fixtures of tests/data/torch/ (model/torch_checkpoint.h) with torch.

Needs torch, transformers (5.x), safetensors (the GPU machine has them). Every file is what torch /
transformers write themselves, from weights already in the repo, so the tests can compare the
pickle reader against the safetensors one bit for bit:
  model-bin/          tests/golden/phi-mha-hd64's state dict (bf16 as stored) the way
                      transformers 4.x save_pretrained(safe_serialization=False) wrote it:
                      torch.save(model.state_dict()) to pytorch_model.bin (5.x writes only
                      safetensors)
  model-bin-sharded/  the same in 3 shards (pytorch_model-0000i-of-00003.bin) with 4.x's
                      pytorch_model.bin.index.json
  adapter-bin/        tests/golden/adapters/lora-r4-qv-fc2 as older peft versions saved adapters:
                      torch.save(state_dict) to adapter_model.bin, adapter_config.json copied
  misc/mixed.bin      torch.save of {f32, f16, bf16, i64, a view at a storage offset, two names
                      sharing a storage}; misc/mixed.json holds their values
  misc/noncontig.bin  a transposed (non-contiguous) tensor
  misc/legacy.bin     the pre-1.6 format (_use_new_zipfile_serialization=False)
Usage: python3 gen_torch_fixtures.py --out DIR   (then copy DIR/* to tests/data/torch/)
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PhiForCausalLM

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    src = REPO / "tests" / "golden" / "phi-mha-hd64"
    model = PhiForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    state = model.state_dict()  # an OrderedDict with _metadata, as torch.save gets it from HF
    d = out / "model-bin"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "pytorch_model.bin")
    shutil.copyfile(src / "config.json", d / "config.json")
    d = out / "model-bin-sharded"
    d.mkdir(parents=True, exist_ok=True)
    names = list(state)
    parts = [names[i::3] for i in range(3)]
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        torch.save({k: state[k] for k in part}, d / fname)
        for k in part:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    shutil.copyfile(src / "config.json", d / "config.json")

    adapter = REPO / "tests" / "golden" / "adapters" / "lora-r4-qv-fc2"
    d = out / "adapter-bin"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), d / "adapter_model.bin")
    shutil.copyfile(adapter / "adapter_config.json", d / "adapter_config.json")

    d = out / "misc"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 4, generator=g)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "i64": torch.arange(10, dtype=torch.int64),
        "view": base[2:],           # storage offset 8 elements, contiguous
        "shared_a": base,           # shares the storage with "view"
        "scalar": torch.tensor(2.5),
    }
    torch.save(tensors, d / "mixed.bin")
    expect = {k: v.float().flatten().tolist() for k, v in tensors.items() if k != "i64"}
    expect_shapes = {k: list(v.shape) for k, v in tensors.items()}
    (d / "mixed.json").write_text(json.dumps({"values": expect, "shapes": expect_shapes}) + "\n")
    torch.save({"t": torch.randn(3, 4, generator=g).t()}, d / "noncontig.bin")
    torch.save({"w": torch.randn(2, 2, generator=g)}, d / "legacy.bin",
               _use_new_zipfile_serialization=False)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(p.relative_to(out), p.stat().st_size)


if __name__ == "__main__":
    main()
