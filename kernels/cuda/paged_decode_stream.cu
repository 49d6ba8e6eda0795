// Register-direct streaming decode attention (PagedDecodeVariant::kStream): K and V go from
// global memory straight into registers with 16-byte `ld.global.nc.L1::no_allocate` loads (no
// shared-memory staging, no L1 allocation), the way a device copy streams bytes; QK, the online
// softmax and PV run on those registers. Same math and outputs as the other kernels up to float
// rounding (kernels/cuda/paged_decode_cuda.h; PagedAttentionCpu is the reference).
//
// Opt-in, not kAuto's pick: it tested whether the shared-memory round trip of the pipelined
// kernel is what makes the decode attention need ~0.20 J/GB against the copy's 0.14 (perf-log
// dmma2). It is not: this kernel needs the same energy per byte (0.194-0.210 J/GB at b256 ctx
// 1024 against 0.200-0.206; L1 allocation or not; a first form with 2 lanes a key executed 0.43x
// the pipelined kernel's instructions), holds fewer bytes in flight (714 µs a launch burst against
// 672, 720-738 sustained against 708-716), and in the model's steps it took ~1125 µs a layer
// against 687 (unexplained; presumably latency: each layer reads another 4 GB of the pool, cold
// in the TLBs, where the bench rereads the same 2.7 GB; not verified).
//
// One block of kW warps per (query head, sequence, split); grid (num_heads, num_seqs, splits),
// the head fastest so the blocks in flight read neighbouring rows of the same cache slots (GQA:
// each query head's block reads its KV head's rows, group times the bytes, the repeats from L2).
// Inside a warp, groups of kLpk lanes own one key each (kG = 32 / kLpk keys a warp-iteration); lane
// cl of a group holds the 16-byte slices j = cl + kLpk i (i < kPer) of that key's K and V rows and
// of q and the output (head dim 80, kLpk 4: 3 slices a lane, the last one on lanes 0-1 only). Warp
// w takes the warp-iterations w, w + kW, ... of the block's keys; each lane keeps kS iterations of
// K / V in a register ring (kS - 1 in flight while one is consumed); the block ids of 32
// iterations are read at once, one per lane, and shuffled to the warp when their turn comes.
// Online softmax with a lazy maximum: the running max (log2 units) moves only when a score
// exceeds it by more than kLazyLog2 (so weights stay <= 2^8, far from float overflow), and the
// rescale of the accumulator is rare instead of every key. Groups are merged by shuffles at the
// end, warps through shared memory (kW > 1); several splits go to PagedDecodeMergeKernel as for the
// pipelined kernel.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"

namespace phishard {
namespace paged_decode {
namespace {

constexpr float kLazyLog2 = 8.0f;

// 16 bytes from global memory, through the non-coherent path, not allocated in L1 (each K / V
// byte is read once a launch).
__device__ __forceinline__ uint4 LoadStream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

template <int HD, int kLpk>
struct StreamForm {
  static constexpr int kC = HD / 8;                    // 16-byte slices of a row
  static constexpr int kPer = (kC + kLpk - 1) / kLpk;  // slices a lane
  static constexpr int kG = 32 / kLpk;                 // keys a warp-iteration
  static_assert(kG <= 16 && 16 % kG == 0, "a warp-iteration sits in one 16-slot block");
};

template <typename T, int HD, bool kBlock16, int kLpk, int kW, int kS>
__global__ void __launch_bounds__(kW * 32) PagedDecodeStreamKernel(const Args a) {
  using F = StreamForm<HD, kLpk>;
  constexpr int C = F::kC, P = F::kPer, G = F::kG;
  const int h = blockIdx.x;
  const int s = blockIdx.y;
  const int sp = blockIdx.z;
  const int ctx = a.context_lens[s];
  T* out_row = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h) * HD;
  if (ctx <= 0) {  // padding row
    if (sp == 0) {
      for (int d = threadIdx.x; d < HD; d += kW * 32) out_row[d] = cuda::FromFloat<T>(0.0f);
    }
    return;
  }
  int splits = 1;
  const int split_len = SplitLen(a, ctx, &splits);
  if (sp >= splits) return;
  const int k_begin = sp * split_len;
  const int k_end = min(ctx, k_begin + split_len);
  const int pitch = a.step_info ? a.step_info[1] : a.max_blocks;
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * pitch;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int grp = lane / kLpk;
  const int cl = lane % kLpk;
  const T* kc = static_cast<const T*>(a.k_cache) + static_cast<size_t>(h / a.group) * HD;
  const T* vc = static_cast<const T*>(a.v_cache) + static_cast<size_t>(h / a.group) * HD;
  // Warp-iterations of the block (kG keys each) and of this warp (w, w + kW, ...).
  const int n_block = (k_end - k_begin + G - 1) / G;
  const int n_warp = n_block > warp ? (n_block - warp + kW - 1) / kW : 0;

  // kBlock16: the cache block of this warp's iterations n0 + lane, read once for 32 of them
  // (iteration n's keys all sit in one 16-slot block: k_begin is a multiple of 64, kG divides 16).
  int tbl = 0;
  auto table_ahead = [&](int n0) {
    const int n = n0 + lane;
    tbl = n < n_warp ? table[(k_begin + (warp + n * kW) * G) >> 4] : 0;
  };
  if constexpr (kBlock16) table_ahead(0);

  // This lane's slices of q, pre-scaled to log2 units; slices past the head are zeros.
  float q[P][8];
  {
    const T* q_row = static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride + h * HD;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int j = cl + kLpk * i;
      if (j < C) {
        Unpack8<T>(*reinterpret_cast<const uint4*>(q_row + 8 * j), q[i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[i][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[i][e] = 0.0f;
      }
    }
  }
  float m = -INFINITY, l = 0.0f;
  float acc[P][8];
#pragma unroll
  for (int i = 0; i < P; ++i) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
  }

  struct Stage {
    uint4 k[P], v[P];
  };
  // Loads iteration n (this lane's key k_begin + (warp + n kW) kG + grp) into st; keys past the
  // split and bad block ids read as zeros (masked by the key index in compute).
  auto load = [&](Stage& st, int n) {
    const int key0 = k_begin + (warp + n * kW) * G;
    const int key = key0 + grp;
    int blk = -1, off = 0;
    if constexpr (kBlock16) {
      if (n >= 32 && n < n_warp && (n & 31) == 0) table_ahead(n);  // warp-uniform
      blk = __shfl_sync(0xffffffffu, tbl, n & 31);
      off = (key0 & 15) + grp;
    } else if (n < n_warp && key < k_end) {
      blk = table[key / a.block_size];
      off = key % a.block_size;
    }
    const bool in = n < n_warp && key < k_end && blk >= 0 && blk < a.num_blocks;
    const size_t row = (static_cast<size_t>(blk) * a.block_size + off) * a.kv_row;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int j = cl + kLpk * i;
      if (in && j < C) {
        st.k[i] = LoadStream(kc + row + 8 * j);
        st.v[i] = LoadStream(vc + row + 8 * j);
      } else {
        st.k[i] = make_uint4(0, 0, 0, 0);
        st.v[i] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto compute = [&](const Stage& st, int n) {
    const int key = k_begin + (warp + n * kW) * G + grp;
    const bool valid = n < n_warp && key < k_end;
    float d = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (C % kLpk == 0 || cl + kLpk * i < C) {
        float kf[8];
        Unpack8<T>(st.k[i], kf);
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[i][e], kf[e], d);
      }
    }
#pragma unroll
    for (int o = 1; o < kLpk; o *= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
    // Lazy max: m = -inf until the group's first valid key, then moved only by a jump of more
    // than kLazyLog2; l and acc are always relative to the current m.
    if (valid && d > m + kLazyLog2) {
      const float alpha = m == -INFINITY ? 0.0f : exp2f(m - d);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] *= alpha;
      }
      m = d;
    }
    const float p = valid ? exp2f(d - m) : 0.0f;
    l += p;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (C % kLpk == 0 || cl + kLpk * i < C) {
        float vf[8];
        Unpack8<T>(st.v[i], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(p, vf[e], acc[i][e]);
      }
    }
  };

  // Register ring: before consuming slot r of iteration n, the load of iteration n + kS - 1
  // goes into the slot consumed last. Loop bounds are warp-uniform (every lane reaches every
  // shuffle).
  Stage ring[kS];
#pragma unroll
  for (int r = 0; r < kS - 1; ++r) load(ring[r], r);
  for (int n0 = 0; n0 < n_warp; n0 += kS) {
#pragma unroll
    for (int r = 0; r < kS; ++r) {
      const int n = n0 + r;
      if (n >= n_warp) break;
      if (n + kS - 1 < n_warp) load(ring[(r + kS - 1) % kS], n + kS - 1);
      compute(ring[r], n);
    }
  }
  // A programmatic dependent may start its prologue once every block is past its loads.
  asm volatile("griddepcontrol.launch_dependents;" :::);

  // The groups of the warp (lanes cl, cl + kLpk, ... hold the same slices).
#pragma unroll
  for (int off = kLpk; off < 32; off *= 2) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    const float m_new = fmaxf(m, m_o);
    float fa, fb;
    Rescale(m, m_new, &fa);
    Rescale(m_o, m_new, &fb);
    l = l * fa + l_o * fb;
#pragma unroll
    for (int i = 0; i < P; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, acc[i][e], off);
        acc[i][e] = acc[i][e] * fa + o * fb;
      }
    }
    m = m_new;
  }
  const size_t idx = (static_cast<size_t>(s) * a.num_heads + h) * a.max_splits + sp;
  // Lanes 0 .. kLpk - 1 hold the merged state of `o_m`, `o_l`, `o` (their slices).
  auto store = [&](float o_m, float o_l, const float(&o)[P][8]) {
    const float inv = 1.0f / o_l;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int j = cl + kLpk * i;
      if (j >= C) continue;
      if (splits == 1) {
        alignas(16) T w[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = cuda::FromFloat<T>(o[i][e] * inv);
        *reinterpret_cast<uint4*>(out_row + 8 * j) = *reinterpret_cast<const uint4*>(w);
      } else {
        float4* dst = reinterpret_cast<float4*>(a.partial_o + idx * HD + 8 * j);
        dst[0] = make_float4(o[i][0] * inv, o[i][1] * inv, o[i][2] * inv, o[i][3] * inv);
        dst[1] = make_float4(o[i][4] * inv, o[i][5] * inv, o[i][6] * inv, o[i][7] * inv);
      }
    }
    if (splits > 1 && cl == 0) {
      a.partial_ml[idx * 2] = o_m;
      a.partial_ml[idx * 2 + 1] = o_l;
    }
  };
  if constexpr (kW == 1) {
    if (lane < kLpk) store(m, l, acc);
  } else {
    __shared__ float s_m[kW];
    __shared__ float s_l[kW];
    __shared__ __align__(16) float s_acc[kW][HD];
    if (lane < kLpk) {
      if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
      }
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int j = cl + kLpk * i;
        if (j < C) {
#pragma unroll
          for (int e = 0; e < 8; ++e) s_acc[warp][8 * j + e] = acc[i][e];
        }
      }
    }
    __syncthreads();
    if (warp == 0 && lane < kLpk) {
      float mm = -INFINITY;
#pragma unroll
      for (int w = 0; w < kW; ++w) mm = fmaxf(mm, s_m[w]);
      float f[kW], ll = 0.0f;
#pragma unroll
      for (int w = 0; w < kW; ++w) {
        Rescale(s_m[w], mm, &f[w]);
        ll = fmaf(s_l[w], f[w], ll);
      }
      float o[P][8];
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int j = cl + kLpk * i;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float x = 0.0f;
          if (j < C) {
#pragma unroll
            for (int w = 0; w < kW; ++w) x = fmaf(s_acc[w][8 * j + e], f[w], x);
          }
          o[i][e] = x;
        }
      }
      store(mm, ll, o);
    }
  }
}

// The form measured best (perf-log dmma2 run 1, b256 ctx 1024 head dim 80, sustained µs a launch):
// 4 lanes a key, 2 warps a block, 4 stages: 738 against 757-804 for 2 lanes a key (5 slices a
// lane, no padding) with 1, 2 or 4 warps and 2-3 stages, 4 lanes with 3 stages, and ld.global.nc
// with L1 allocation (786 as without it).
constexpr int kStreamLpk = 4;
constexpr int kStreamWarps = 2;
constexpr int kStreamStages = 4;

}  // namespace

KernelStatus LaunchPagedDecodeStream(const Args& a, int head_dim, DataType dtype,
                                     cudaStream_t stream) {
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel =
          a.block_size == 16
              ? PagedDecodeStreamKernel<T, HD, true, kStreamLpk, kStreamWarps, kStreamStages>
              : PagedDecodeStreamKernel<T, HD, false, kStreamLpk, kStreamWarps, kStreamStages>;
      kernel<<<dim3(a.blocks_per_seq, a.num_seqs, a.max_splits), kStreamWarps * 32, 0, stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode
}  // namespace phishard
