// The fused 1-row MLP kernel of bench/mlp_probe.cu (see its header), shared with
// bench/branch_probe.cu; included inside their namespaces (after the CUDA headers).

#pragma once

// The stage operations (WarpDot, Axpy) are the library's (kernels/cuda/stream_stage.cuh, included
// by every probe at its top).
using cuda::Axpy;
using cuda::WarpDot;

struct FusedMlpArgs {
  const __nv_bfloat16* x;    // [K] (the LayerNorm output)
  const __nv_bfloat16* w1;   // [I, K] fc1.weight
  const __nv_bfloat16* b1;   // [I]
  const __nv_bfloat16* w2t;  // [I, K] fc2.weight transposed
  float* out;                // [K] float32, accumulated into
  int* counters;             // [2]: next chunk, blocks done (zero; left zero)
  int chunks;                // I / R
  int stages;                // ring slots
};

// KC: 16-byte units of a row a lane reads (K = 256 KC); R = KC rows a chunk (one a consumer warp);
// the consumers are KC warps = K / 8 threads (8 output columns each), then one producer warp.
template <int KC>
__global__ void __launch_bounds__(32 * KC + 32, 1) FusedMlp(const FusedMlpArgs a) {
  constexpr int K = 256 * KC, R = KC, kConsumers = 32 * KC;
  constexpr uint32_t kStageBytes = R * K * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = a.stages;
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem);  // [S, R, K]
  __nv_bfloat16* sx = ring + static_cast<size_t>(S) * R * K;     // [K]
  float* sb1 = reinterpret_cast<float*>(sx + K);                 // [S, R]: the stage's fc1 biases
  float* sg = sb1 + S * R;                                       // [2, R]
  int* chunk_of = reinterpret_cast<int*>(sg + 2 * R);            // [S]
  uint64_t* full = reinterpret_cast<uint64_t*>(chunk_of + ((S + 1) & ~1));
  uint64_t* empty = full + S;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::MbarInit(&full[s], 1);
      sm90::MbarInit(&empty[s], KC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  for (int i = tid; i < K / 8; i += blockDim.x) {
    reinterpret_cast<uint4*>(sx)[i] = reinterpret_cast<const uint4*>(a.x)[i];
  }
  __syncthreads();

  if (warp == KC) {  // the producer warp: lane 0 issues, lanes < R fetch the fc1 stage's biases
    for (int it = 0;; it += 2) {
      int c = 0;
      if (lane == 0) c = atomicAdd(&a.counters[0], 1);
      c = __shfl_sync(0xffffffffu, c, 0);
      for (int half = 0; half < 2; ++half) {
        const int i = it + half, s = i % S;
        if (i >= S) sm90::MbarWait(&empty[s], ((i / S) & 1) ^ 1);
        if (c >= a.chunks) {  // no chunk left: a stage that tells the consumers to stop
          if (lane == 0) {
            chunk_of[s] = -1;
            sm90::MbarArrive(&full[s]);
          }
          break;
        }
        if (half == 0 && lane < R) sb1[s * R + lane] = __bfloat162float(a.b1[c * R + lane]);
        __syncwarp();
        if (lane == 0) {
          chunk_of[s] = c;
          sm90::MbarExpect(&full[s], kStageBytes);
          sm90::BulkLoad(ring + static_cast<size_t>(s) * R * K,
                         (half == 0 ? a.w1 : a.w2t) + static_cast<size_t>(c) * R * K, kStageBytes,
                         &full[s]);
        }
      }
      if (c >= a.chunks) break;
    }
  } else {  // the consumers
    float acc[8] = {};
    for (int it = 0, ci = 0;; it += 2, ++ci) {
      int s = it % S;
      sm90::MbarWait(&full[s], (it / S) & 1);
      const int c = chunk_of[s];
      if (c < 0) break;
      {  // fc1: warp w, row w of the chunk
        const float d = WarpDot<KC>(ring + (static_cast<size_t>(s) * R + warp) * K, sx, lane);
        __syncwarp();
        if (lane == 0) {
          const float pre = d + sb1[s * R + warp];
          sg[(ci & 1) * R + warp] = __bfloat162float(__float2bfloat16(cuda::GeluTanh(pre)));
          sm90::MbarArrive(&empty[s]);
        }
      }
      s = (it + 1) % S;
      sm90::MbarWait(&full[s], ((it + 1) / S) & 1);
      asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");  // every g of the chunk
      {  // fc2: thread t, columns [8t, 8t + 8) over the chunk's R rows of w2t
        Axpy<R, K>(ring + static_cast<size_t>(s) * R * K, sg + (ci & 1) * R, tid, acc);
        __syncwarp();
        if (lane == 0) sm90::MbarArrive(&empty[s]);
      }
    }
    float4* o = reinterpret_cast<float4*>(a.out) + 2 * tid;
    atomicAdd(o, make_float4(acc[0], acc[1], acc[2], acc[3]));
    atomicAdd(o + 1, make_float4(acc[4], acc[5], acc[6], acc[7]));
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&a.counters[1], 1) == static_cast<int>(gridDim.x) - 1) {
      a.counters[0] = 0;
      a.counters[1] = 0;
    }
  }
}

int FusedMlpSmem(int kc, int stages) {
  const int k = 256 * kc;
  return stages * kc * k * 2 + k * 2 + stages * kc * 4 + 2 * kc * 4 + ((stages + 1) & ~1) * 4 +
         2 * stages * 8;
}
