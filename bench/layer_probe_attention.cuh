// The attention of bench/layer_probe.cu (included inside its namespace): the one-shot decode
// attention of bench/attn_load_probe.cu (every K/V row of a block of KEYS keys requested by
// cp.async at its start, split partials merged by the last block of a head), changed to run
// beside LayerStream: its K/V loads go out before q exists; thread 0 then waits for the layer's
// q/k/v counter; the merging block of each head adds one to the heads-done counter. Launched as a
// programmatic dependent of LayerStream without griddepcontrol.wait (which would wait for the
// whole stream, whose dense chunks wait for this kernel).

struct AttnArgs {
  const bf16* q;  // [3 * heads * 80]: q of head h at h * q_head_stride
  int q_head_stride;
  const bf16* k;  // [blocks, heads, 16, 80]
  const bf16* v;
  bf16* out;  // [heads * 80]
  const int32_t* ctx_lens;
  const int32_t* table;
  int max_blocks, heads;
  float scale_log2;
  float* partials;    // [heads, splits, 82]
  int32_t* counters;  // [heads], zero; left zero
  const int* qkv_done;
  int qkv_target;
  int* heads_done;
  // Non-null: per-head q/k/v order; head h's item waits for head_ready[h] >= head_target instead
  // of the whole q/k/v counter.
  const int* head_ready;
  int head_target;
};

// One (head, split) item: keys [split * KEYS, split * KEYS + KEYS) of head h; `wait`: thread 0
// waits for the layer's q/k/v counter after the K/V loads went out (false once this block has
// seen it for this layer). Ends with a block barrier (shared memory free for the next item).
template <int KEYS>
__device__ __forceinline__ void AttendItem(const AttnArgs& a, int h, int split, int splits,
                                           bool wait, unsigned char* smem) {
  constexpr int kPer = (KEYS + kAttnThreads - 1) / kAttnThreads;
  constexpr int kChunks = kHd / 8;
  bf16* sK = reinterpret_cast<bf16*>(smem);  // [KEYS, 80]
  bf16* sV = sK + KEYS * kHd;
  float* sP = reinterpret_cast<float*>(sV + KEYS * kHd);  // [KEYS]
  __shared__ float sQ[kHd];
  __shared__ float sRed[8];
  __shared__ int sLast;
  const int tid = threadIdx.x;
  int blk[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int key = split * KEYS + tid + i * kAttnThreads;
    blk[i] =
        tid + i * kAttnThreads < KEYS && key / kBs < a.max_blocks ? __ldg(a.table + key / kBs) : -1;
  }
  const int ctx = __ldg(a.ctx_lens);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = tid + i * kAttnThreads;
    if (blk[i] < 0) continue;
    const size_t off =
        ((static_cast<size_t>(blk[i]) * a.heads + h) * kBs + (split * KEYS + r) % kBs) * kHd;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      CpAsync16(sK + r * kHd + c * 8, a.k + off + c * 8);
      CpAsync16(sV + r * kHd + c * 8, a.v + off + c * 8);
    }
  }
  if (tid == 0) {
    if (a.head_ready != nullptr) {
      WaitAtLeast(a.head_ready + h, a.head_target);
    } else if (wait) {
      WaitAtLeast(a.qkv_done, a.qkv_target);
    }
  }
  __syncthreads();
  if (tid < kHd) sQ[tid] = __bfloat162float(__ldcg(a.q + h * a.q_head_stride + tid));
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  float s[kPer];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = tid + i * kAttnThreads;
    const int key = split * KEYS + r;
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (r >= KEYS) break;  // (fewer keys than threads: no row)
      const uint4 u = *reinterpret_cast<const uint4*>(sK + r * kHd + c * 8);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const __nv_bfloat162 kv = *reinterpret_cast<const __nv_bfloat162*>(&w[e]);
        dot = fmaf(sQ[c * 8 + 2 * e], __low2float(kv), dot);
        dot = fmaf(sQ[c * 8 + 2 * e + 1], __high2float(kv), dot);
      }
    }
    s[i] = key < ctx && blk[i] >= 0 ? dot * a.scale_log2 : -INFINITY;
    mx = fmaxf(mx, s[i]);
  }
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) sRed[tid >> 5] = mx;
  __syncthreads();
  mx = fmaxf(fmaxf(sRed[0], sRed[1]), fmaxf(sRed[2], sRed[3]));
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const float p = mx == -INFINITY ? 0.0f : exp2f(s[i] - mx);
    if (tid + i * kAttnThreads < KEYS) sP[tid + i * kAttnThreads] = p;
    sum += p;
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();
  if ((tid & 31) == 0) sRed[4 + (tid >> 5)] = sum;
  __syncthreads();
  const float l = sRed[4] + sRed[5] + sRed[6] + sRed[7];
  float* part = a.partials + (static_cast<size_t>(h) * splits + split) * (kHd + 2);
  if (tid < kHd) {
    float o0 = 0.0f, o1 = 0.0f;
#pragma unroll 8
    for (int r = 0; r < KEYS; r += 2) {
      o0 = fmaf(sP[r], __bfloat162float(sV[r * kHd + tid]), o0);
      o1 = fmaf(sP[r + 1], __bfloat162float(sV[(r + 1) * kHd + tid]), o1);
    }
    part[tid] = o0 + o1;
  }
  if (tid == 0) {
    part[kHd] = mx;
    part[kHd + 1] = l;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int done = atomicAdd(a.counters + h, 1);
    sLast = done == static_cast<int>(splits) - 1;
  }
  __syncthreads();
  const bool last = sLast;
  __syncthreads();  // sLast read by all before the next item may write it
  if (!last) return;
  __threadfence();
  if (tid < kHd) {
    const float* base = a.partials + static_cast<size_t>(h) * splits * (kHd + 2);
    float m_all = -INFINITY;
    for (int sp = 0; sp < static_cast<int>(splits); ++sp) {
      m_all = fmaxf(m_all, __ldcg(base + sp * (kHd + 2) + kHd));
    }
    float acc = 0.0f, l_all = 0.0f;
    for (int sp = 0; sp < static_cast<int>(splits); ++sp) {
      const float* ps = base + sp * (kHd + 2);
      const float m = __ldcg(ps + kHd);
      const float w = m == -INFINITY ? 0.0f : exp2f(m - m_all);
      acc = fmaf(w, __ldcg(ps + tid), acc);
      l_all = fmaf(w, __ldcg(ps + kHd + 1), l_all);
    }
    a.out[h * kHd + tid] = __float2bfloat16(acc / l_all);
  }
  __syncthreads();
  if (tid == 0) {
    a.counters[h] = 0;
    __threadfence();
    atomicAdd(a.heads_done, 1);
  }
}

// One launch a layer: block (h, split).
template <int KEYS>
__global__ void __launch_bounds__(kAttnThreads) WaitingAttn(const AttnArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  asm volatile("griddepcontrol.launch_dependents;" :::);  // the next layer's stream may start
  AttendItem<KEYS>(a, blockIdx.x, blockIdx.y, gridDim.y, true, smem);
}

// One launch a step, beside the whole-step LayerStream: every block takes (head, split) items of
// layer 0, then of layer 1, ... from each layer's counter (AttnArgs of the layers in `layers`).
template <int KEYS>
__global__ void __launch_bounds__(kAttnThreads)
    StepAttn(const AttnArgs* __restrict__ layers, int num_layers, int splits, int* const* next) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int sItem;
  for (int l = 0; l < num_layers; ++l) {
    const AttnArgs& a = layers[l];
    bool wait = true;
    for (;;) {
      if (threadIdx.x == 0) sItem = atomicAdd(next[l], 1);
      __syncthreads();
      const int item = sItem;
      __syncthreads();
      if (item >= a.heads * splits) break;
      AttendItem<KEYS>(a, item / splits, item % splits, splits, wait, smem);
      wait = false;
    }
  }
}

template <int KEYS>
constexpr int AttnSmem() {
  return 2 * KEYS * kHd * 2 + KEYS * 4;
}

void SetAttentionSmem() {
  LP_CHECK(cudaFuncSetAttribute(WaitingAttn<32>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                AttnSmem<32>()));
  LP_CHECK(
      cudaFuncSetAttribute(WaitingAttn<32>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  LP_CHECK(cudaFuncSetAttribute(WaitingAttn<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                AttnSmem<64>()));
  LP_CHECK(cudaFuncSetAttribute(WaitingAttn<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                AttnSmem<128>()));
  LP_CHECK(
      cudaFuncSetAttribute(WaitingAttn<64>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  LP_CHECK(cudaFuncSetAttribute(StepAttn<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                AttnSmem<64>()));
  LP_CHECK(cudaFuncSetAttribute(StepAttn<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                AttnSmem<128>()));
  LP_CHECK(cudaFuncSetAttribute(StepAttn<64>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  LP_CHECK(
      cudaFuncSetAttribute(StepAttn<128>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  LP_CHECK(
      cudaFuncSetAttribute(WaitingAttn<128>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
}

// Launches of the probe's programmatic dependents; dies on a launch error.
template <typename... KernelArgs, typename... Args>
void LaunchPdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
               Args&&... args) {
  if (cuda::LaunchMaybeProgrammatic(kernel, grid, block, smem, st, true,
                                    std::forward<Args>(args)...) != KernelStatus::kOk) {
    std::fprintf(stderr, "%s: programmatic launch failed\n", kProg);
    std::exit(1);
  }
}

// As a programmatic dependent of the kernel before it on `st` (LayerStream).
void LaunchAttention(const AttnArgs& a, int keys, int ctx, cudaStream_t st) {
  const dim3 grid(a.heads, (ctx + keys - 1) / keys);
  if (keys == 32) {
    LaunchPdl(WaitingAttn<32>, grid, dim3(kAttnThreads), AttnSmem<32>(), st, a);
  } else if (keys == 64) {
    LaunchPdl(WaitingAttn<64>, grid, dim3(kAttnThreads), AttnSmem<64>(), st, a);
  } else {
    LaunchPdl(WaitingAttn<128>, grid, dim3(kAttnThreads), AttnSmem<128>(), st, a);
  }
}

// The step's attention as a programmatic dependent of the whole-step LayerStream: `blocks` blocks.
void LaunchStepAttention(const AttnArgs* layers, int num_layers, int keys, int ctx, int blocks,
                         int* const* next, cudaStream_t st) {
  const int splits = (ctx + keys - 1) / keys;
  if (keys == 64) {
    LaunchPdl(StepAttn<64>, dim3(blocks), dim3(kAttnThreads), AttnSmem<64>(), st, layers,
              num_layers, splits, next);
  } else {
    LaunchPdl(StepAttn<128>, dim3(blocks), dim3(kAttnThreads), AttnSmem<128>(), st, layers,
              num_layers, splits, next);
  }
}
