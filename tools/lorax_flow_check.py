#!/usr/bin/env python3
"""Drives a running shard through the LoRAX router's call sequence with a Python gRPC client
compiled from a generate.proto of your choice -- LoRAX's own file (predibase/lorax
proto/generate.proto) to check wire compatibility, or ours -- and checks that every response
parses and makes sense. Exit status 0 when every check passed, 1 otherwise.

  pip install grpcio-tools   # test tooling only; the shard itself does not need it
  build/bin/phishard serve models/tiny-phi-code --uds-path /tmp/lorax-server --device cpu &
  python3 tools/lorax_flow_check.py --socket /tmp/lorax-server-0 --proto /path/to/lorax/generate.proto \
      --adapter adapters/prose

One rank (W = 1): with more ranks, a rank emits only the generations it owns (id % W).
Requests carry router-allocated blocks and slots when Info.requires_block_allocator says so
(and the proto has that field), as the router's block allocator hands them out.
Sequence (spec section 3): ServiceDiscovery, ClearCache(None), Info, the router's exact warmup
batch, Health and the health probe Prefill (ids u64::MAX), Prefill of a mixed batch (greedy with
prefill logprobs; sampled with seed and alternatives), a second Prefill, Decode of both batches
concatenated (running batch first), FilterBatch after each finish, ClearCache(id), the
Download/Load/Offload cycle for the base model and (--adapter) a LOCAL adapter, Embed/Classify
(must fail), ClearCache(None).
"""
import argparse
import math
import os
import sys
import tempfile

U64_MAX = 2**64 - 1


def compile_proto(proto):
    from grpc_tools import protoc  # pylint: disable=import-outside-toplevel
    out = tempfile.mkdtemp(prefix="lorax_flow_")
    proto = os.path.abspath(proto)
    rc = protoc.main(["protoc", f"-I{os.path.dirname(proto)}", f"--python_out={out}",
                      f"--grpc_python_out={out}", proto])
    if rc != 0:
        sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)


class Checker:
    def __init__(self):
        self.failures = 0

    def check(self, ok, what):
        if not ok:
            self.failures += 1
            print(f"FAIL {what}")
        return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="shard socket path, e.g. /tmp/lorax-server-0")
    ap.add_argument("--proto", default=os.path.join(os.path.dirname(__file__), "..", "proto",
                                                    "generate.proto"))
    ap.add_argument("--adapter", default="", help="a LOCAL adapter id the shard may load")
    ap.add_argument("--max-input", type=int, default=0,
                    help="router max_input_length (default: a quarter of the warmup capacity)")
    args = ap.parse_args()
    compile_proto(args.proto)
    import grpc  # pylint: disable=import-outside-toplevel
    import generate_pb2 as pb  # pylint: disable=import-outside-toplevel,import-error
    import generate_pb2_grpc as pbg  # pylint: disable=import-outside-toplevel,import-error

    c = Checker()
    st = pbg.LoraxServiceStub(grpc.insecure_channel("unix://" + args.socket))

    def params(**kw):
        d = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
        d.update(kw)
        return pb.NextTokenChooserParameters(**d)

    # The router's block allocator (spec 3.4) when Info asks for it: blocks from the tail of the
    # free list, block 0 kept for the health probe; without a router tokenizer input_length is
    # `truncate`, so a request holds truncate + max_new_tokens - 1 slots.
    free_blocks, held, allocator = [], {}, False

    def req(rid, text, max_new, **kw):
        truncate = kw.pop("truncate", 64)
        r = pb.Request(
            id=rid, inputs=text, truncate=truncate,
            tokenized_inputs=pb.TokenizedInputs(input_chunks=[pb.InputChunk(text=text)]),
            parameters=kw.pop("parameters", params()),
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=max_new, stop_sequences=kw.pop("stop", [])), **kw)
        if allocator:
            slots = truncate + max_new - 1
            n = -(-slots // info.block_size)
            if rid == U64_MAX:  # the health probe (spec 3.8): block 0, its 16 slots
                blocks, slots = [0], info.block_size
            else:
                blocks = [free_blocks.pop() for _ in range(n)]
                held[rid] = blocks
            r.blocks.extend(blocks)
            r.slots.extend(blocks[p // info.block_size] * info.block_size + p % info.block_size
                           for p in range(slots))
        return r

    def release(rid):
        free_blocks.extend(held.pop(rid, []))

    def check_generation(g, where):
        nt = g.next_tokens
        c.check(len(nt.ids) == len(nt.logprobs) == len(nt.texts) == len(nt.is_special) >= 1,
                f"{where}: request {g.request_id} per-token lists of unequal length: {nt}")
        if nt.alternative_tokens:
            c.check(len(nt.alternative_tokens) == len(nt.ids), f"{where}: alternatives per token")
        if g.HasField("generated_text"):
            c.check(g.generated_text.generated_tokens >= 1, f"{where}: generated_tokens >= 1")

    urls = st.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    c.check(len(urls) >= 1 and all(u.startswith("unix://") for u in urls), f"urls {list(urls)}")
    st.ClearCache(pb.ClearCacheRequest())
    info = st.Info(pb.InfoRequest())
    c.check(not info.HasField("window_size"), "Info.window_size must be absent")
    c.check(info.block_size > 0 and info.supports_generation, f"Info {info}")

    # The router's warmup batch (spec 3.2): ids all 0, no token ids, an image chunk on the first
    # request, prefill logprobs, non-trivial sampling parameters including the watermark.
    max_input = args.max_input or 64
    prefill_budget, total = max_input + 50, max_input + 1
    reqs, n = [], 0
    while n < prefill_budget:
        trunc = min(max_input, prefill_budget - n)
        text = "_test " * max_input
        chunks = [pb.InputChunk(text=text)]
        if not reqs:
            chunks.append(pb.InputChunk(image=pb.Image(data=b"\x89PNG", mimetype="image/jpeg;base64")))
        reqs.append(pb.Request(
            id=0, inputs=text, tokenized_inputs=pb.TokenizedInputs(input_chunks=chunks),
            truncate=trunc, prefill_logprobs=True,
            parameters=params(temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9,
                              repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5,
                              watermark=True),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=total - trunc)))
        n += max_input
    warm = st.Warmup(pb.WarmupRequest(
        batch=pb.Batch(id=0, requests=reqs, size=len(reqs), max_tokens=max_input),
        max_input_length=max_input, max_prefill_tokens=prefill_budget,
        max_new_tokens=total - max_input))
    c.check(warm.HasField("max_supported_total_tokens") and
            warm.max_supported_total_tokens % info.block_size == 0, f"Warmup {warm}")
    # Field 12 exists in LoRAX's newer proto (and ours), not in older copies.
    allocator = getattr(info, "requires_block_allocator", False) and not info.requires_padding
    free_blocks.extend(range(1, warm.max_supported_total_tokens // info.block_size))
    print("router block allocator:", "on" if allocator else "off")

    st.Health(pb.HealthRequest())
    probe = st.Prefill(pb.PrefillRequest(batch=pb.Batch(
        id=U64_MAX, requests=[req(U64_MAX, "liveness", 1, truncate=10)], size=1)))
    c.check(len(probe.generations) == 1 and not probe.HasField("batch"), f"health probe {probe}")

    # Batch 0: greedy with prefill logprobs; sampled with a seed and 3 alternatives.
    p0 = st.Prefill(pb.PrefillRequest(batch=pb.Batch(id=0, size=2, requests=[
        req(0, "def fibonacci(n):\n", 6, prefill_logprobs=True),
        req(1, "import numpy as np\n", 9,
            parameters=params(temperature=0.7, top_k=20, top_p=0.95, do_sample=True, seed=42,
                              return_k_alternatives=3))])))
    seen_final = set()
    for g in p0.generations:
        check_generation(g, "Prefill 0")
        if g.HasField("generated_text"):
            seen_final.add(g.request_id)
            release(g.request_id)
        if g.request_id == 0:
            pt = g.prefill_tokens
            c.check(len(pt.ids) == len(pt.logprobs) == len(pt.texts) == g.prefill_tokens_length,
                    f"prefill tokens {pt}")
            c.check(math.isnan(pt.logprobs[0]), "first prefill logprob must be NaN")
        if g.request_id == 1:
            c.check(len(g.next_tokens.alternative_tokens[0].ids) == 3, "3 alternatives")
    p1 = st.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, size=1, requests=[
        req(2, "class Foo:\n", 20, stop=["\n\n"])])))
    for g in p1.generations:
        check_generation(g, "Prefill 1")
        if g.HasField("generated_text"):
            seen_final.add(g.request_id)
            release(g.request_id)
    batches = [r.batch for r in (p0, p1) if r.HasField("batch")]
    for _ in range(64):
        if not batches:
            break
        d = st.Decode(pb.DecodeRequest(batches=batches))
        finished = []
        for g in d.generations:
            check_generation(g, "Decode")
            if g.HasField("generated_text"):
                finished.append(g.request_id)
                seen_final.add(g.request_id)
                release(g.request_id)
                if g.request_id == 1:
                    c.check(g.generated_text.HasField("seed") and g.generated_text.seed == 42,
                            "sampled request reports its seed")
        if not d.HasField("batch"):
            break
        b = d.batch
        keep = [i for i in b.request_ids if i not in finished]
        if finished and keep:
            f = st.FilterBatch(pb.FilterBatchRequest(batch_id=b.id, request_ids=keep))
            c.check(f.HasField("batch") and list(f.batch.request_ids) == keep, f"FilterBatch {f}")
            b = f.batch
        elif finished:
            st.ClearCache(pb.ClearCacheRequest(id=b.id))
            break
        batches = [b]
    c.check(seen_final == {0, 1, 2}, f"every request finishes within max_new_tokens: {seen_final}")

    base = pb.AdapterParameters(adapter_ids=["__base_model__"])
    dl = st.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=base))
    c.check(not dl.downloaded and dl.memory_fraction == 0, f"base download {dl}")
    c.check(not st.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=base)).loaded, "base load")
    c.check(not st.OffloadAdapter(pb.OffloadAdapterRequest(adapter_parameters=base)).offloaded,
            "base offload")
    if args.adapter:
        ad = pb.AdapterParameters(adapter_ids=[args.adapter])
        dl = st.DownloadAdapter(pb.DownloadAdapterRequest(adapter_parameters=ad,
                                                          adapter_source=pb.LOCAL))
        c.check(dl.downloaded and 0 <= dl.memory_fraction <= 1, f"adapter download {dl}")
        c.check(st.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=ad, adapter_source=pb.LOCAL,
                                                     adapter_index=1)).loaded, "adapter load")
        pa = st.Prefill(pb.PrefillRequest(batch=pb.Batch(id=5, size=1, requests=[
            req(10, "The weather", 3, adapter_index=1)])))
        for g in pa.generations:
            check_generation(g, "adapter Prefill")
        st.ClearCache(pb.ClearCacheRequest(id=5))
        release(10)
        c.check(st.OffloadAdapter(pb.OffloadAdapterRequest(
            adapter_parameters=ad, adapter_source=pb.LOCAL, adapter_index=1)).offloaded,
                "adapter offload")
    for name, call in (("Embed", lambda: st.Embed(pb.EmbedRequest(batch=pb.Batch(id=9)))),
                       ("Classify", lambda: st.Classify(pb.ClassifyRequest(batch=pb.Batch(id=9))))):
        try:
            call()
            c.check(False, f"{name} must fail on a Phi shard")
        except grpc.RpcError as e:
            c.check(e.code() == grpc.StatusCode.INTERNAL, f"{name}: {e.code()} {e.details()}")
    st.ClearCache(pb.ClearCacheRequest())
    print("lorax_flow_check:", "OK" if c.failures == 0 else f"{c.failures} check(s) failed")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
