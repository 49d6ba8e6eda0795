// Device helpers the CUDA benchmark programs share (phishard_kernel_bench's kernel_bench.cc and
// sustain.cc, the probes): a runtime-call check, an event timer, an allocation and a random fill
// that end the program with a message naming the program when they fail. CUDA builds only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "kernels/device.h"
#include "kernels/paged_attention.h"

namespace phishard::bench {

// Ends the program with `prog`, the call and CUDA's message when a runtime call fails.
#define PHI_BENCH_CHECK(prog, call)                                                       \
  do {                                                                                    \
    const cudaError_t phi_bench_e = (call);                                               \
    if (phi_bench_e != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%s: %s: %s\n", prog, #call, cudaGetErrorString(phi_bench_e)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

inline void DieUnless(bool ok, const char* prog, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "%s: %s failed\n", prog, what);
    std::exit(1);
  }
}

// Milliseconds between two recorded events.
inline float ElapsedMsOrDie(cudaEvent_t a, cudaEvent_t b, const char* prog) {
  float ms = 0;
  PHI_BENCH_CHECK(prog, cudaEventElapsedTime(&ms, a, b));
  return ms;
}

// `bytes` of device memory (never freed by the benches: they run once and exit).
inline void* DeviceAllocOrDie(size_t bytes, const char* prog) {
  void* p = nullptr;
  DieUnless(DeviceMalloc(&p, bytes) == 0, prog, "DeviceMalloc");
  return p;
}

// `count` elements of `t` uniform in [-spread, spread) from `seed` (RandomFillCuda), on `s`.
inline void RandomFillOrDie(void* p, size_t count, uint64_t seed, DataType t, cudaStream_t s,
                            const char* prog, float spread = 1.0f) {
  DieUnless(RandomFillCuda({.data = p,
                            .count = static_cast<int64_t>(count),
                            .spread = spread,
                            .seed = seed,
                            .dtype = t},
                           s) == KernelStatus::kOk,
            prog, "RandomFill");
}

// One layer's decode attention on the device, as the decode benches time it: `seqs` sequences of
// `ctx` tokens, MHA `heads` x `head_dim` bf16, blocks of `block_size` slots with each sequence's
// blocks consecutive in the pool, random q (rows of a fused q/k/v projection) / K / V, a split
// workspace for up to kPagedDecodeMaxSplits splits.
struct DecodeAttentionInputs {
  PagedAttentionParams p;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  size_t kv_bytes = 0;        // of K (V the same)
  std::vector<int32_t> host;  // [seqs] context lengths, then the [seqs, blocks] block table
  std::vector<void*> buffers;
  void Free() {
    for (void* b : buffers) DeviceFree(b);
    buffers.clear();
  }
};

inline DecodeAttentionInputs MakeDecodeAttentionInputs(int seqs, int ctx, int heads, int head_dim,
                                                       int block_size, cudaStream_t s,
                                                       const char* prog) {
  DecodeAttentionInputs in;
  const int blocks_per = (ctx + block_size - 1) / block_size;
  const size_t table = static_cast<size_t>(seqs) * blocks_per;
  in.kv_bytes = table * block_size * heads * head_dim * 2;
  in.workspace_bytes = PagedDecodeCudaWorkspaceBytes(seqs, heads, head_dim, kPagedDecodeMaxSplits);
  auto alloc = [&](size_t bytes) {
    in.buffers.push_back(DeviceAllocOrDie(bytes, prog));
    return in.buffers.back();
  };
  void* k = alloc(in.kv_bytes);
  void* v = alloc(in.kv_bytes);
  void* q = alloc(size_t{2} * seqs * 3 * heads * head_dim);
  void* out = alloc(size_t{2} * seqs * heads * head_dim);
  in.workspace = alloc(in.workspace_bytes > 16 ? in.workspace_bytes : 16);
  int32_t* meta = static_cast<int32_t*>(alloc(size_t{4} * (seqs + table)));
  RandomFillOrDie(k, in.kv_bytes / 2, 8, DataType::kBF16, s, prog);
  RandomFillOrDie(v, in.kv_bytes / 2, 9, DataType::kBF16, s, prog);
  RandomFillOrDie(q, size_t{3} * seqs * heads * head_dim, 10, DataType::kBF16, s, prog);
  in.host.assign(seqs + table, ctx);
  for (size_t i = 0; i < table; ++i) in.host[seqs + i] = static_cast<int32_t>(i);
  DeviceCopyToDevice(meta, in.host.data(), in.host.size() * 4, s);
  DieUnless(DeviceStreamSync(s) == 0, prog, "decode attention inputs");
  in.p = PagedAttentionParams{.q = q,
                              .k_cache = k,
                              .v_cache = v,
                              .out = out,
                              .context_lens = meta,
                              .block_tables = meta + seqs,
                              .num_seqs = seqs,
                              .num_tokens = seqs,
                              .max_blocks_per_seq = blocks_per,
                              .num_blocks = static_cast<int>(table),
                              .block_size = block_size,
                              .num_heads = heads,
                              .num_kv_heads = heads,
                              .head_dim = head_dim,
                              .q_stride = 3 * heads * head_dim,
                              .scale = 0.1118f,
                              .dtype = DataType::kBF16};
  return in;
}

// A plan for PagedDecodeCuda on `in` with its own zeroed split-merge counters (the in-kernel
// merge), 132 SMs.
inline PagedDecodeCudaPlan DecodePlanOrDie(const DecodeAttentionInputs& in, const char* prog) {
  constexpr int kCounters = 4096;
  void* counters = DeviceAllocOrDie(size_t{4} * kCounters, prog);
  PHI_BENCH_CHECK(prog, cudaMemset(counters, 0, size_t{4} * kCounters));
  return PagedDecodeCudaPlan{.workspace = in.workspace,
                             .workspace_bytes = in.workspace_bytes,
                             .num_multiprocessors = 132,
                             .merge_counters = static_cast<int32_t*>(counters),
                             .merge_counters_len = kCounters};
}

}  // namespace phishard::bench
