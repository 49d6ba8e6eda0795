// Decode attention with the stages filled by Hopper bulk copies (PagedDecodeVariant::kBulk,
// opt-in): the pipelined kernel's grid, split rule, 32-key tiles x 4 shared-memory stages, stage
// layout and compute roles (PipeConsumer, kernels/cuda/paged_decode_pipe.cuh), with each stage
// filled by a few large requests instead of 16-byte cp.async ones. Same math and outputs as the
// pipelined kernel (the same products and sums in the same order;
// kernels/cuda/paged_decode_cuda.h).
//
// Blocks of 16 slots only (PagedDecodeCuda falls back to the pipelined kernel otherwise): in the
// cache (kernels/kv_layout.h) the 16 keys of one (block, KV head) are one contiguous run of
// 16 x head_dim elements (2,560 bytes at Phi-2's head_dim 80, a multiple of 16 at every head dim,
// 16-byte aligned since the caches are), and a stage's K rows (V rows) are exactly the tile's two
// runs one after the other. So a tile is at most 4 cp.async.bulk copies (K and V of its two
// blocks), issued by lane 0 of warp 0, completing on the stage's mbarrier (expect_tx = the bytes
// issued). Per tile:
//   - a block past the context (the tile's second, at the end of a split) is not copied: its stage
//     rows keep whatever they held; their keys are masked by index and, since they may hold
//     anything (NaN), their V rows are read as zeros (PipeConsumer::Tile<true>);
//   - a block whose first key is in the context is copied whole (its slots past the context may be
//     NaN: masked the same way);
//   - a block id outside [0, num_blocks) reads as zero K/V, as in the other kernels: warp 0 writes
//     zeros to its stage rows instead of copying.
// The full barrier of a stage counts warp 0's 32 lanes (lane 0 arrives with the transaction
// bytes, the others after their zero stores, if any); every active warp waits on it. A stage is
// released by the block barrier at the top of the next tile (every consumer is past it), after
// which warp 0 refills it (a proxy fence first: generic reads, then async-proxy writes). Warp 0
// reads the block ids of the tile after next while it computes, so the refill does not wait on a
// table load.
#include <cstdint>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"
#include "kernels/cuda/paged_decode_pipe.cuh"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace paged_decode {
namespace {

using sm90::BulkLoad;
using sm90::MbarArrive;
using sm90::MbarExpect;
using sm90::MbarInit;
using sm90::MbarWait;

// The pipelined kernel's tiles and stages (kernels/cuda/paged_decode.cu).
constexpr int kBulkTile = 32;
constexpr int kBulkStages = 4;
constexpr int kBulkBlockSize = 16;

template <typename T, int HD, int kTile, int kStages>
__global__ void __launch_bounds__(kThreads, 4) PagedDecodeBulkKernel(const Args a) {
  using L = PipeSmem<HD, kTile, kStages>;
  constexpr int kRuns = kTile / kBulkBlockSize;                    // cache blocks a tile: 2
  constexpr uint32_t kRunBytes = kBulkBlockSize * HD * sizeof(T);  // one (block, KV head) run
  static_assert(kRunBytes % 16 == 0 && L::kStageBytes == size_t{2} * kRuns * kRunBytes,
                "a stage's K (V) rows are the tile's runs back to back");
  static_assert(kKeysPerIter % kTile == 0, "splits start on tiles");
  // [kStages][K rows kTile x HD | V rows kTile x HD] T, shared.
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_m[kWarps];
  __shared__ float s_l[kWarps];
  __shared__ float s_acc[kWarps][HD];
  __shared__ uint64_t full[kStages];  // stage landed (warp 0's 32 arrivals + its bytes)

  BlockWork<T> bw;  // sequence bw.s, query heads bw.h0 .., keys [bw.k_begin, bw.k_end)
  if (!BlockPrologue<T, HD, kMaxHeadsPerBlock>(a, &bw)) return;
  const int n_tiles = (bw.k_end - bw.k_begin + kTile - 1) / kTile;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const bool producer = threadIdx.x < 32;
  const int lane = threadIdx.x & 31;
  // Elements from a cache block's start to the run of KV head kvh.
  const int run_off = static_cast<int>(KvRunOffset(0, bw.kvh, kBulkBlockSize, a.num_kv_heads, HD));

  // Block ids of tile t (0 for a block past the context: not read).
  auto tile_ids = [&](int t, int* blk) {
    const int key0 = bw.k_begin + t * kTile;
#pragma unroll
    for (int b = 0; b < kRuns; ++b) {
      blk[b] = key0 + kBulkBlockSize * b < bw.k_end ? bw.table[(key0 >> 4) + b] : 0;
    }
  };
  // Warp 0 (all lanes): tile t, block ids blk, into stage st.
  auto issue = [&](int t, int st, const int* blk) {
    const int key0 = bw.k_begin + t * kTile;
    unsigned char* dk = smem + static_cast<size_t>(st) * L::kStageBytes;
    unsigned char* dv = dk + L::kStageBytes / 2;
    bool copy[kRuns];
    bool zeroed = false;
    uint32_t bytes = 0;
#pragma unroll
    for (int b = 0; b < kRuns; ++b) {
      const bool in_ctx = key0 + kBulkBlockSize * b < bw.k_end;
      copy[b] = in_ctx && blk[b] >= 0 && blk[b] < a.num_blocks;
      if (copy[b]) bytes += 2 * kRunBytes;
      if (in_ctx && !copy[b]) {  // a bad id: zero K/V rows (rare)
        for (int i = lane; i < static_cast<int>(kRunBytes / 16); i += 32) {
          reinterpret_cast<uint4*>(dk + b * kRunBytes)[i] = make_uint4(0, 0, 0, 0);
          reinterpret_cast<uint4*>(dv + b * kRunBytes)[i] = make_uint4(0, 0, 0, 0);
        }
        zeroed = true;
      }
    }
    // The zeros (generic proxy) before the bulk copies that refill this stage later.
    if (zeroed) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    if (lane == 0) {
      // This stage's previous tile was read (generic proxy) by every consumer before the block
      // barrier; the copies below write it through the async proxy.
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      MbarExpect(&full[st], bytes);
#pragma unroll
      for (int b = 0; b < kRuns; ++b) {
        if (!copy[b]) continue;
        // a.block_elems a 32-bit launch argument: one 32 x 32 -> 64-bit multiply-add.
        const int64_t off = static_cast<int64_t>(blk[b]) * a.block_elems + run_off;
        BulkLoad(dk + b * kRunBytes, kc + off, kRunBytes, &full[st]);
        BulkLoad(dv + b * kRunBytes, vc + off, kRunBytes, &full[st]);
      }
    } else {
      MbarArrive(&full[st]);
    }
  };

  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) MbarInit(&full[st], 32);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();  // the barriers are initialised before anyone arrives or waits
  int next[kRuns];  // warp 0: block ids of the next tile to issue
  if (producer) {
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < n_tiles) {
        tile_ids(t, next);
        issue(t, t, next);
      }
    }
    if (kStages - 1 < n_tiles) tile_ids(kStages - 1, next);
  }

  PipeConsumer<T, HD, kTile> pc;  // compute roles, all warp-uniform; warp 0 is always active
  pc.Init(a, bw);

  for (int t = 0; t < n_tiles; ++t) {
    if (t > 0) __syncthreads();  // every consumer is past tile t - 1: stage (t - 1) % kStages free
    const int refill = t + kStages - 1;
    if (producer && refill < n_tiles) {
      issue(refill, refill % kStages, next);
      if (refill + 1 < n_tiles) tile_ids(refill + 1, next);
    }
    if (!pc.active) continue;
    MbarWait(&full[t % kStages], static_cast<uint32_t>((t / kStages) & 1));
    const uint4* sk =
        reinterpret_cast<const uint4*>(smem + static_cast<size_t>(t % kStages) * L::kStageBytes);
    pc.template Tile<true>(sk, bw.k_begin + t * kTile, bw.k_end);
  }
  // Every issued copy has landed (warp 0, always active, waited on each tile). A programmatic
  // dependent may start its prologue once every block is past its loads.
  asm volatile("griddepcontrol.launch_dependents;" :::);

  pc.Finish(a, bw, s_m, s_l, s_acc);
}

}  // namespace

KernelStatus LaunchPagedDecodeBulk(const Args& a, int head_dim, DataType dtype,
                                   cudaStream_t stream) {
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel = PagedDecodeBulkKernel<T, HD, kBulkTile, kBulkStages>;
      const size_t smem = PipeSmem<HD, kBulkTile, kBulkStages>::kBytes;
      // Static shared memory (merge scratch, barriers) counts against the 48 KiB default too.
      if (smem + 4096 > 48 * 1024 &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)) != cudaSuccess) {
        return KernelStatus::kDeviceError;
      }
      const dim3 grid(a.blocks_per_seq, a.num_seqs, a.max_splits);
      kernel<<<grid, kThreads, smem, stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode
}  // namespace phishard
