// The per-item pieces of bench/layer_probe.cu's LayerStream (included inside its namespace, after
// LayerArgs; the warp dot and the axpy of a stage are bench/fused_mlp.cuh's): the consumers'
// barrier, the LayerNorm fold at a layer's start, and the attention item of the "attention in the
// stream" form.

__device__ __forceinline__ void ConsumerSync(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

// The LayerNorm of h_in + acc_in (the residual; the previous layer's blocks all done first) into
// sx, every consumer thread 8 columns (K = 8 x consumers); block 0 also writes the residual out.
template <int KC>
__device__ __forceinline__ void LnFold(const LayerArgs& a, bf16* sx, float* sred, int tid,
                                       float (&magic)[8]) {
  constexpr int K = 256 * KC, kConsumers = 32 * KC;
  const int warp = tid >> 5, lane = tid & 31;
  if (a.prev_ctr != nullptr && tid == 0) {
    WaitAtLeast(a.prev_ctr + kBlocksDone, static_cast<int>(gridDim.x));
  }
  ConsumerSync(kConsumers);
  if (a.prev_slots != nullptr) {  // this block's columns of the previous layer's slots
    const int G = gridDim.x;
    const int c0 = K * blockIdx.x / G, nc = K * (blockIdx.x + 1) / G - c0;  // <= 20 at Phi-2
    float* part = reinterpret_cast<float*>(sx);  // [16, nc] scratch (sx is written below)
    if (tid < 16 * nc) {
      const int c = tid % nc, q = tid / nc;
      float t = 0.0f;
      for (int b = q; b < G; b += 16)
        t += __ldcg(a.prev_slots + static_cast<size_t>(b) * K + c0 + c);
      part[q * nc + c] = t;
    }
    ConsumerSync(kConsumers);
    if (tid < nc) {
      float t = 0.0f;
      for (int q = 0; q < 16; ++q) t += part[q * nc + tid];
      a.prev_colsum[c0 + tid] = t;
    }
    __threadfence();
    ConsumerSync(kConsumers);
    if (tid == 0) {
      atomicAdd(const_cast<int*>(a.prev_ctr) + kReduced, 1);
      WaitAtLeast(a.prev_ctr + kReduced, G);
    }
    ConsumerSync(kConsumers);
  }
  float v[8];
  const uint4 hv = __ldcg(reinterpret_cast<const uint4*>(a.h_in) + tid);
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w};
  float4 a0 = make_float4(0, 0, 0, 0), a1 = a0;
  if (a.prev_colsum != nullptr) {
    a0 = __ldcg(reinterpret_cast<const float4*>(a.prev_colsum) + 2 * tid);
    a1 = __ldcg(reinterpret_cast<const float4*>(a.prev_colsum) + 2 * tid + 1);
  } else if (a.acc_in != nullptr && a.fixed_point) {
    long long q[8] = {};
    for (int c = 0; c < a.acc_copies; ++c) {
      const long long* src =
          reinterpret_cast<const long long*>(a.acc_in) + static_cast<size_t>(c) * K;
#pragma unroll
      for (int e = 0; e < 8; ++e) q[e] += __ldcg(src + 8 * tid + e);
    }
    a0 =
        make_float4(q[0] / kFixedScale, q[1] / kFixedScale, q[2] / kFixedScale, q[3] / kFixedScale);
    a1 =
        make_float4(q[4] / kFixedScale, q[5] / kFixedScale, q[6] / kFixedScale, q[7] / kFixedScale);
  } else if (a.acc_in != nullptr) {
    for (int c = 0; c < a.acc_copies; ++c) {
      const float4* src = reinterpret_cast<const float4*>(a.acc_in + static_cast<size_t>(c) * K);
      const float4 p0 = __ldcg(src + 2 * tid), p1 = __ldcg(src + 2 * tid + 1);
      a0 = make_float4(a0.x + p0.x, a0.y + p0.y, a0.z + p0.z, a0.w + p0.w);
      a1 = make_float4(a1.x + p1.x, a1.y + p1.y, a1.z + p1.z, a1.w + p1.w);
    }
  }
  float ad[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
  if (a.prev_mlp != nullptr) {  // owner form: bf16(attn_out + mlp_out), then + h below (HF's order)
    const uint4 av = __ldcg(reinterpret_cast<const uint4*>(a.prev_attn) + tid);
    const uint4 mv = __ldcg(reinterpret_cast<const uint4*>(a.prev_mlp) + tid);
    const uint32_t aa[4] = {av.x, av.y, av.z, av.w}, ma[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 af = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&aa[e]));
      const float2 mf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ma[e]));
      ad[2 * e] = __bfloat162float(__float2bfloat16(af.x + mf.x));
      ad[2 * e + 1] = __bfloat162float(__float2bfloat16(af.y + mf.y));
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ha[e]));
    v[2 * e] = __bfloat162float(__float2bfloat16(f.x + ad[2 * e]));
    v[2 * e + 1] = __bfloat162float(__float2bfloat16(f.y + ad[2 * e + 1]));
    sum += v[2 * e] + v[2 * e + 1];
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) sred[warp] = sum;
  ConsumerSync(kConsumers);
  float mean = 0.0f;
  for (int w = 0; w < KC; ++w) mean += sred[w];
  mean /= K;
  float sq = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) sq += (v[e] - mean) * (v[e] - mean);
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
  if (lane == 0) sred[32 + warp] = sq;
  ConsumerSync(kConsumers);
  float var = 0.0f;
  for (int w = 0; w < KC; ++w) var += sred[32 + w];
  const float rstd = rsqrtf(var / K + 1e-5f);
  const float rms = sqrtf(var / K + mean * mean);
#pragma unroll
  for (int e = 0; e < 8; ++e) magic[e] = GridMagic(fmaxf(fabsf(v[e]), rms));
  const uint4 wv = reinterpret_cast<const uint4*>(a.ln_w)[tid];
  const uint4 bv = reinterpret_cast<const uint4*>(a.ln_b)[tid];
  const uint32_t wa[4] = {wv.x, wv.y, wv.z, wv.w}, ba[4] = {bv.x, bv.y, bv.z, bv.w};
  uint32_t xo[4], hn[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 wf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wa[e]));
    const float2 bf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ba[e]));
    const __nv_bfloat162 r = __floats2bfloat162_rn((v[2 * e] - mean) * rstd * wf.x + bf.x,
                                                   (v[2 * e + 1] - mean) * rstd * wf.y + bf.y);
    xo[e] = *reinterpret_cast<const uint32_t*>(&r);
    const __nv_bfloat162 hr = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
    hn[e] = *reinterpret_cast<const uint32_t*>(&hr);
  }
  reinterpret_cast<uint4*>(sx)[tid] = make_uint4(xo[0], xo[1], xo[2], xo[3]);
  if (blockIdx.x == 0)
    reinterpret_cast<uint4*>(a.h_out)[tid] = make_uint4(hn[0], hn[1], hn[2], hn[3]);
  ConsumerSync(kConsumers);
}

// One attention item of the stream: (head, split) = (idx / splits, idx % splits); K and V of its
// kAttnKeys keys are in the stage ([K rows][V rows], 80 wide), q comes from the layer's q/k/v rows
// once every block has counted its q/k/v chunks. Writes the split's partial (o, max, sum); the
// last split of the head merges them into o and counts the head done.
template <int KC>
__device__ __forceinline__ void AttendStage(const LayerArgs& a, int idx, const bf16* stage,
                                            float* sq, float* sp, float* sred, int* sflag,
                                            int tid) {
  constexpr int kConsumers = 32 * KC;
  const int h = idx / a.splits, split = idx % a.splits;
  const int ctx = __ldg(a.ctx_len);
  const int nkeys = min(kAttnKeys, ctx - split * kAttnKeys);
  if (tid == 0) WaitAtLeast(a.ctr + kQkvDone, a.q_chunks);
  ConsumerSync(kConsumers);
  if (tid < kHd) sq[tid] = __bfloat162float(__ldcg(a.qkv + h * kHd + tid));
  ConsumerSync(kConsumers);
  const bf16* sk = stage;
  const bf16* sv = stage + kAttnKeys * kHd;
  float sc = -INFINITY;
  if (tid < kAttnKeys && tid < nkeys) {
    float d = 0.0f;
#pragma unroll
    for (int c = 0; c < kHd / 8; ++c) {
      const uint4 u = reinterpret_cast<const uint4*>(sk + tid * kHd)[c];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e]));
        d = fmaf(sq[c * 8 + 2 * e], f.x, fmaf(sq[c * 8 + 2 * e + 1], f.y, d));
      }
    }
    sc = d * a.scale_log2;
  }
  // max and sum over the kAttnKeys threads (warps 0 and 1)
  float mx = sc;
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0 && tid < kAttnKeys) sred[tid >> 5] = mx;
  ConsumerSync(kConsumers);
  mx = fmaxf(sred[0], sred[1]);
  const float p = tid < kAttnKeys && sc != -INFINITY ? exp2f(sc - mx) : 0.0f;
  if (tid < kAttnKeys) sp[tid] = p;
  float sum = p;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if ((tid & 31) == 0 && tid < kAttnKeys) sred[2 + (tid >> 5)] = sum;
  ConsumerSync(kConsumers);
  float* part = a.partials + (static_cast<size_t>(h) * a.splits + split) * (kHd + 2);
  if (tid < kHd) {
    float o0 = 0.0f;
    for (int k = 0; k < nkeys; ++k) o0 = fmaf(sp[k], __bfloat162float(sv[k * kHd + tid]), o0);
    part[tid] = o0;
  }
  if (tid == 0) {
    part[kHd] = mx;
    part[kHd + 1] = sred[2] + sred[3];
  }
  __threadfence();
  ConsumerSync(kConsumers);
  if (tid == 0) sflag[0] = atomicAdd(a.split_ctr + h, 1) == a.splits - 1;
  ConsumerSync(kConsumers);
  if (sflag[0] == 0) return;
  __threadfence();
  if (tid < kHd) {
    const float* base = a.partials + static_cast<size_t>(h) * a.splits * (kHd + 2);
    float m_all = -INFINITY;
    for (int sp_i = 0; sp_i < a.splits; ++sp_i)
      m_all = fmaxf(m_all, __ldcg(base + sp_i * (kHd + 2) + kHd));
    float acc = 0.0f, l_all = 0.0f;
    for (int sp_i = 0; sp_i < a.splits; ++sp_i) {
      const float* ps = base + sp_i * (kHd + 2);
      const float m = __ldcg(ps + kHd);
      const float w = m == -INFINITY ? 0.0f : exp2f(m - m_all);
      acc = fmaf(w, __ldcg(ps + tid), acc);
      l_all = fmaf(w, __ldcg(ps + kHd + 1), l_all);
    }
    const_cast<bf16*>(a.o)[h * kHd + tid] = __float2bfloat16(acc / l_all);
  }
  ConsumerSync(kConsumers);
  if (tid == 0) {
    __threadfence();
    atomicAdd(a.ctr + kHeadsDone, 1);
  }
}

// The attention warps of a LayerStream block (kAttnWarps warps, `at` = 0..127): per layer with
// aw_items > 0, (head, split) items from the layer's kAttnNext counter. An item's K and V rows go
// out by cp.async first; the first item of a layer then waits for the layer's q/k/v counter
// (the K/V of that item are in flight meanwhile); scores, softmax, P.V, the split's partial; the
// last split of a head merges into o and counts kHeadsDone. Named barrier 2 (their own), so the
// weight consumers never wait for them.
constexpr int kAttnWarps = 4;
constexpr int kAttnWarpSmem = 2 * kAttnKeys * kHd * 2 + kHd * 4 + kAttnKeys * 4 + 8 * 4 + 16;

__device__ __forceinline__ void AttnSync() {
  asm volatile("bar.sync 2, %0;" ::"n"(32 * kAttnWarps) : "memory");
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
}

__device__ __forceinline__ void AttentionWarps(const LayerArgs* layers, int num_layers,
                                               unsigned char* smem, int at) {
  constexpr int kT = 32 * kAttnWarps;
  bf16* sK = reinterpret_cast<bf16*>(smem);  // [kAttnKeys, 80]
  bf16* sV = sK + kAttnKeys * kHd;
  float* sQ = reinterpret_cast<float*>(sV + kAttnKeys * kHd);  // [80]
  float* sP = sQ + kHd;                                        // [kAttnKeys]
  float* sRed = sP + kAttnKeys;                                // [8]
  int* sInt = reinterpret_cast<int*>(sRed + 8);                // [0] item, [1] last
  for (int l = 0; l < num_layers; ++l) {
    const LayerArgs& a = layers[l];
    if (a.aw_items == 0) continue;
    const int ctx = __ldg(a.ctx_len);
    bool waited = false;
    for (;;) {
      if (at == 0) sInt[0] = atomicAdd(&a.ctr[kAttnNext], 1);
      AttnSync();
      const int item = sInt[0];
      AttnSync();
      if (item >= a.aw_items) break;
      const int h = item / a.splits, split = item % a.splits;
      // K / V of the split's keys: kAttnKeys rows x 10 16-byte chunks, K and V.
      for (int i = at; i < kAttnKeys * (kHd / 8); i += kT) {
        const int r = i / (kHd / 8), c = i % (kHd / 8);
        const int key = split * kAttnKeys + r;
        const int b = key / kBs;
        if (key >= ctx || b >= a.max_blocks) continue;
        const int phys = __ldg(a.table + b);
        const size_t off =
            ((static_cast<size_t>(phys) * a.heads + h) * kBs + key % kBs) * kHd + c * 8;
        CpAsync16(sK + r * kHd + c * 8, a.kc + off);
        CpAsync16(sV + r * kHd + c * 8, a.vc + off);
      }
      if (!waited) {
        if (at == 0) WaitAtLeast(a.ctr + kQkvDone, a.q_chunks);
        waited = true;
      }
      AttnSync();
      if (at < kHd) sQ[at] = __bfloat162float(__ldcg(a.qkv + h * kHd + at));
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      AttnSync();
      const int nkeys = min(kAttnKeys, ctx - split * kAttnKeys);
      float sc = -INFINITY;
      if (at < nkeys) {
        float d = 0.0f;
#pragma unroll
        for (int c = 0; c < kHd / 8; ++c) {
          const uint4 u = reinterpret_cast<const uint4*>(sK + at * kHd)[c];
          const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e]));
            d = fmaf(sQ[c * 8 + 2 * e], f.x, fmaf(sQ[c * 8 + 2 * e + 1], f.y, d));
          }
        }
        sc = d * a.scale_log2;
      }
      float mx = sc;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if ((at & 31) == 0) sRed[at >> 5] = mx;
      AttnSync();
      mx = fmaxf(fmaxf(sRed[0], sRed[1]), fmaxf(sRed[2], sRed[3]));
      const float p = sc != -INFINITY ? exp2f(sc - mx) : 0.0f;
      if (at < kAttnKeys) sP[at] = p;
      float sum = p;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if ((at & 31) == 0) sRed[4 + (at >> 5)] = sum;
      AttnSync();
      float* part = a.partials + (static_cast<size_t>(h) * a.splits + split) * (kHd + 2);
      if (at < kHd) {
        float o0 = 0.0f;
        for (int k = 0; k < nkeys; ++k) o0 = fmaf(sP[k], __bfloat162float(sV[k * kHd + at]), o0);
        part[at] = o0;
      }
      if (at == 0) {
        part[kHd] = mx;
        part[kHd + 1] = sRed[4] + sRed[5] + sRed[6] + sRed[7];
      }
      __threadfence();
      AttnSync();
      if (at == 0) sInt[1] = atomicAdd(a.split_ctr + h, 1) == a.splits - 1;
      AttnSync();
      if (sInt[1] != 0) {
        __threadfence();
        if (at < kHd) {
          const float* base = a.partials + static_cast<size_t>(h) * a.splits * (kHd + 2);
          float m_all = -INFINITY;
          for (int i = 0; i < a.splits; ++i) {
            m_all = fmaxf(m_all, __ldcg(base + i * (kHd + 2) + kHd));
          }
          float acc = 0.0f, l_all = 0.0f;
          for (int i = 0; i < a.splits; ++i) {
            const float* ps = base + i * (kHd + 2);
            const float m = __ldcg(ps + kHd);
            const float w = m == -INFINITY ? 0.0f : exp2f(m - m_all);
            acc = fmaf(w, __ldcg(ps + at), acc);
            l_all = fmaf(w, __ldcg(ps + kHd + 1), l_all);
          }
          const_cast<bf16*>(a.o)[h * kHd + at] = __float2bfloat16(acc / l_all);
        }
        AttnSync();
        if (at == 0) {
          __threadfence();
          atomicAdd(a.ctr + kHeadsDone, 1);
        }
      }
      AttnSync();  // sK / sV / sInt free for the next item
    }
  }
}

// Mode 2 of the attention warps: each of the kAttnWarps warps takes its own (head, split) items of
// kWarpKeys keys (no barrier beyond its warp): lane = key for the scores, lanes over dimensions for
// P.V and the merge; several items of a block in flight at once.
constexpr int kWarpKeys = 32;
constexpr int kWarpItemSmem = 2 * kWarpKeys * kHd * 2 + kHd * 4;  // K, V, q
constexpr int kAttnWarpItemSmem = kAttnWarps * kWarpItemSmem;

__device__ __forceinline__ void AttentionWarpItems(const LayerArgs* layers, int num_layers,
                                                   unsigned char* smem, int w, int lane) {
  bf16* sK = reinterpret_cast<bf16*>(smem + w * kWarpItemSmem);  // [kWarpKeys, 80]
  bf16* sV = sK + kWarpKeys * kHd;
  float* sQ = reinterpret_cast<float*>(sV + kWarpKeys * kHd);  // [80]
  constexpr int kDims = (kHd + 31) / 32;                       // dimensions a lane
  for (int l = 0; l < num_layers; ++l) {
    const LayerArgs& a = layers[l];
    if (a.aw_items == 0) continue;
    const int ctx = __ldg(a.ctx_len);
    bool waited = false;
    for (;;) {
      int item = 0;
      if (lane == 0) item = atomicAdd(&a.ctr[kAttnNext], 1);
      item = __shfl_sync(0xffffffffu, item, 0);
      if (item >= a.aw_items) break;
      const int h = item / a.splits, split = item % a.splits;
      for (int i = lane; i < kWarpKeys * (kHd / 8); i += 32) {
        const int r = i / (kHd / 8), c = i % (kHd / 8);
        const int key = split * kWarpKeys + r;
        const int b = key / kBs;
        if (key >= ctx || b >= a.max_blocks) continue;
        const int phys = __ldg(a.table + b);
        const size_t off =
            ((static_cast<size_t>(phys) * a.heads + h) * kBs + key % kBs) * kHd + c * 8;
        CpAsync16(sK + r * kHd + c * 8, a.kc + off);
        CpAsync16(sV + r * kHd + c * 8, a.vc + off);
      }
      if (!waited) {
        if (lane == 0) WaitAtLeast(a.ctr + kQkvDone, a.q_chunks);
        __syncwarp();
        waited = true;
      }
#pragma unroll
      for (int j = 0; j < kDims; ++j) {
        const int d = lane + 32 * j;
        if (d < kHd) sQ[d] = __bfloat162float(__ldcg(a.qkv + h * kHd + d));
      }
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      __syncwarp();
      const int nkeys = min(kWarpKeys, ctx - split * kWarpKeys);
      float sc = -INFINITY;
      if (lane < nkeys) {
        float d = 0.0f;
#pragma unroll
        for (int c = 0; c < kHd / 8; ++c) {
          const uint4 u = reinterpret_cast<const uint4*>(sK + lane * kHd)[c];
          const uint32_t wd[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wd[e]));
            d = fmaf(sQ[c * 8 + 2 * e], f.x, fmaf(sQ[c * 8 + 2 * e + 1], f.y, d));
          }
        }
        sc = d * a.scale_log2;
      }
      float mx = sc;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float p = sc != -INFINITY ? exp2f(sc - mx) : 0.0f;
      float sum = p;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      float* part = a.partials + (static_cast<size_t>(h) * a.splits + split) * (kHd + 2);
      float o_acc[kDims] = {};
      for (int k = 0; k < nkeys; ++k) {
        const float pk = __shfl_sync(0xffffffffu, p, k);
#pragma unroll
        for (int j = 0; j < kDims; ++j) {
          const int d = lane + 32 * j;
          if (d < kHd) o_acc[j] = fmaf(pk, __bfloat162float(sV[k * kHd + d]), o_acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kDims; ++j) {
        const int d = lane + 32 * j;
        if (d < kHd) part[d] = o_acc[j];
      }
      if (lane == 0) {
        part[kHd] = mx;
        part[kHd + 1] = sum;
      }
      __threadfence();
      __syncwarp();
      int last = 0;
      if (lane == 0) last = atomicAdd(a.split_ctr + h, 1) == a.splits - 1;
      last = __shfl_sync(0xffffffffu, last, 0);
      if (last) {
        __threadfence();
        const float* base = a.partials + static_cast<size_t>(h) * a.splits * (kHd + 2);
        // lane i holds split i's (and i + 32's, ...) max and sum
        float m_all = -INFINITY;
        for (int i = lane; i < a.splits; i += 32)
          m_all = fmaxf(m_all, __ldcg(base + i * (kHd + 2) + kHd));
        for (int o = 16; o > 0; o >>= 1)
          m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, o));
        float out[kDims] = {}, l_all = 0.0f;
        for (int i = 0; i < a.splits; ++i) {
          const float* ps = base + i * (kHd + 2);
          const float m = __ldcg(ps + kHd);
          const float wgt = m == -INFINITY ? 0.0f : exp2f(m - m_all);
          l_all = fmaf(wgt, __ldcg(ps + kHd + 1), l_all);
#pragma unroll
          for (int j = 0; j < kDims; ++j) {
            const int d = lane + 32 * j;
            if (d < kHd) out[j] = fmaf(wgt, __ldcg(ps + d), out[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < kDims; ++j) {
          const int d = lane + 32 * j;
          if (d < kHd) const_cast<bf16*>(a.o)[h * kHd + d] = __float2bfloat16(out[j] / l_all);
        }
        __threadfence();
        __syncwarp();
        if (lane == 0) atomicAdd(a.ctr + kHeadsDone, 1);
      }
      __syncwarp();  // sK / sV / sQ free for the next item
    }
  }
}
