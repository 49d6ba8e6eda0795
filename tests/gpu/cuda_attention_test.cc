// Paged attention on CUDA (prefill tensor-core kernel, decode split-K kernel + merge) against the
// CPU reference on the same bf16/fp16-rounded Q, K and V. Block tables are shuffled (not
// contiguous), unused cache slots hold NaN (a read of one poisons the output), and the output is
// NaN-poisoned before every launch. Prefill cases run every query tiling of the kernel, each
// launched twice: the two outputs must agree bit for bit (a race shows up as a moving result).
//
// Tolerance: OneRoundingTol (gpu_test_util.h): the device's extra roundings are the output
// (2^-9 relative in bf16) and, on the tensor-core path, the softmax probabilities before P·V
// (another 2^-9 relative per weight, averaging out over the keys); softmax and sums are float32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/paged_attention_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Compare;
using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

struct Seq {
  int q_len, context_len;
};

struct AttnCase {
  std::string name;
  int num_heads, num_kv_heads, head_dim;
  std::vector<Seq> seqs;
  int block_size = 16;
};

constexpr PrefillTiling kAllTilings[] = {PrefillTiling::kAuto, PrefillTiling::kQ128,
                                         PrefillTiling::kQ128Warps8, PrefillTiling::kWgmma,
                                         PrefillTiling::kWgmmaWs};

struct RunOptions {
  DataType dtype = DataType::kBF16;
  AttentionKernel kernel = AttentionKernel::kAuto;
  int force_splits = 0;
  int expect_splits = -1;  // >= 0: check the decode split count used
  std::vector<PrefillTiling> tilings = {PrefillTiling::kAuto};
  float scale_sign = 1.0f;  // -1: a negative softmax scale (the prefill kernels negate Q or S)
  // PagedAttentionCudaPlan::store_new_k / _v: the new tokens' K/V sit in their q rows only (their
  // cache slots NaN on the device), and the launch must store them there.
  bool store_new_kv = false;
};

void RunCase(const AttnCase& c, const RunOptions& o) {
  SCOPED_TRACE(testing::Message() << c.name << " " << DataTypeName(o.dtype) << " kernel "
                                  << static_cast<int>(o.kernel) << " splits " << o.force_splits);
  const int bs = c.block_size, hd = c.head_dim;
  const int S = static_cast<int>(c.seqs.size());
  const int q_stride = (c.num_heads + 2 * c.num_kv_heads) * hd;  // q inside a fused qkv row
  int T = 0, max_q = 0, max_ctx = 0, total_blocks = 0, max_blocks = 0;
  for (const Seq& s : c.seqs) {
    T += s.q_len;
    max_q = std::max(max_q, s.q_len);
    max_ctx = std::max(max_ctx, s.context_len);
    const int nb = (s.context_len + bs - 1) / bs;
    total_blocks += nb;
    max_blocks = std::max(max_blocks, nb);
  }
  const int num_blocks = total_blocks + 7;  // spare blocks stay NaN
  std::mt19937 rng(T * 131 + max_ctx);
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(S) * max_blocks, 0);
  std::vector<int32_t> cu(S + 1, 0), ctx(S);
  const size_t kv_row = static_cast<size_t>(c.num_kv_heads) * hd;
  const size_t cache_elems = static_cast<size_t>(num_blocks) * bs * kv_row;
  std::vector<float> k = RandomVector(cache_elems, rng(), -1, 1);
  std::vector<float> v = RandomVector(cache_elems, rng(), -1, 1);
  std::vector<char> used(static_cast<size_t>(num_blocks) * bs, 0);
  for (int s = 0, next = 0; s < S; ++s) {
    cu[s + 1] = cu[s] + c.seqs[s].q_len;
    ctx[s] = c.seqs[s].context_len;
    const int nb = (ctx[s] + bs - 1) / bs;
    for (int b = 0; b < nb; ++b) tables[static_cast<size_t>(s) * max_blocks + b] = ids[next++];
    for (int p = 0; p < ctx[s]; ++p) {
      used[static_cast<size_t>(tables[static_cast<size_t>(s) * max_blocks + p / bs]) * bs +
           p % bs] = 1;
    }
  }
  for (size_t slot = 0; slot < used.size(); ++slot) {
    if (used[slot]) continue;
    testing_util::FillCacheSlot(k.data(), slot, testing_util::kNaN, bs, c.num_kv_heads, hd);
    testing_util::FillCacheSlot(v.data(), slot, testing_util::kNaN, bs, c.num_kv_heads, hd);
  }
  // Scores of O(3) (q, k in [-1, 1], scale 1/sqrt(hd) over hd terms) keep the softmax non-trivial.
  std::vector<float> q = RandomVector(static_cast<size_t>(T) * q_stride, rng(), -1, 1);
  DeviceBuffer d_q = DeviceBuffer::From(Encode(q, o.dtype));
  DeviceBuffer d_k = DeviceBuffer::From(Encode(k, o.dtype));  // NaN stays NaN when encoded
  DeviceBuffer d_v = DeviceBuffer::From(Encode(v, o.dtype));
  DeviceBuffer d_cu = DeviceBuffer::From(cu);
  DeviceBuffer d_ctx = DeviceBuffer::From(ctx);
  DeviceBuffer d_tables = DeviceBuffer::From(tables);
  DeviceBuffer d_out(static_cast<size_t>(T) * c.num_heads * hd * DataTypeSize(o.dtype));
  d_out.Poison();
  const size_t ws_bytes = PagedAttentionCudaWorkspaceBytes(T, c.num_heads, hd, 16);
  DeviceBuffer d_ws(ws_bytes);

  PagedAttentionParams p{.q = d_q.get(),
                         .k_cache = d_k.get(),
                         .v_cache = d_v.get(),
                         .out = d_out.get(),
                         .cu_q_lens = d_cu.as<int32_t>(),
                         .context_lens = d_ctx.as<int32_t>(),
                         .block_tables = d_tables.as<int32_t>(),
                         .num_seqs = S,
                         .num_tokens = T,
                         .max_blocks_per_seq = max_blocks,
                         .num_blocks = num_blocks,
                         .block_size = bs,
                         .num_heads = c.num_heads,
                         .num_kv_heads = c.num_kv_heads,
                         .head_dim = hd,
                         .q_stride = q_stride,
                         .scale = o.scale_sign / std::sqrt(static_cast<float>(hd)),
                         .dtype = o.dtype};
  // Store mode: each new token's K/V (the reference cache's values at its slot) copied into its
  // q row's K/V columns, and its slot poisoned in the device cache; after the launch the device
  // cache must equal the reference cache byte for byte (NaN where no sequence has a token).
  std::vector<char> cache_k_bytes, cache_v_bytes;
  if (o.store_new_kv) {
    cache_k_bytes = Encode(k, o.dtype);
    cache_v_bytes = Encode(v, o.dtype);
    std::vector<float> q_rows = q, k_dev = k, v_dev = v;
    for (int s = 0; s < S; ++s) {
      for (int j = 0; j < c.seqs[s].q_len; ++j) {
        const int pos = ctx[s] - c.seqs[s].q_len + j;
        const size_t slot =
            static_cast<size_t>(tables[static_cast<size_t>(s) * max_blocks + pos / bs]) * bs +
            pos % bs;
        float* row = q_rows.data() + static_cast<size_t>(cu[s] + j) * q_stride;
        testing_util::CopyCacheSlotToRow(k.data(), slot, row + c.num_heads * hd, bs,
                                         c.num_kv_heads, hd);
        testing_util::CopyCacheSlotToRow(v.data(), slot, row + c.num_heads * hd + kv_row, bs,
                                         c.num_kv_heads, hd);
        testing_util::FillCacheSlot(k_dev.data(), slot, testing_util::kNaN, bs, c.num_kv_heads,
                                    hd);
        testing_util::FillCacheSlot(v_dev.data(), slot, testing_util::kNaN, bs, c.num_kv_heads,
                                    hd);
      }
    }
    const std::vector<char> qb = Encode(q_rows, o.dtype);
    d_q.Upload(qb.data(), qb.size());
    d_k = DeviceBuffer::From(Encode(k_dev, o.dtype));
    d_v = DeviceBuffer::From(Encode(v_dev, o.dtype));
    p.q = d_q.get();
    p.k_cache = d_k.get();
    p.v_cache = d_v.get();
  }
  const std::vector<char> poisoned_k = o.store_new_kv ? d_k.DownloadBytes() : std::vector<char>();
  const std::vector<char> poisoned_v = o.store_new_kv ? d_v.DownloadBytes() : std::vector<char>();
  std::vector<float> ref(static_cast<size_t>(T) * c.num_heads * hd, 0.0f);
  PagedAttentionParams pc = p;
  pc.q = q.data();
  pc.k_cache = k.data();
  pc.v_cache = v.data();
  pc.out = ref.data();
  pc.cu_q_lens = cu.data();
  pc.context_lens = ctx.data();
  pc.block_tables = tables.data();
  pc.dtype = DataType::kF32;
  ASSERT_EQ(PagedAttentionCpu(pc), KernelStatus::kOk);

  if (o.store_new_kv && max_q == 1) {  // a decode launch: the fused store is refused there
    PagedAttentionCudaPlan plan{.max_q_len = 1, .max_context_len = max_ctx};
    plan.store_new_k = d_k.get();
    plan.store_new_v = d_v.get();
    EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
    return;
  }
  // kWgmmaWs with one and with two heads a block (PagedAttentionCudaPlan::prefill_heads_per_block;
  // test shapes are too small for its own choice of two).
  std::vector<std::pair<PrefillTiling, int>> runs;
  for (PrefillTiling tiling : o.tilings) {
    runs.push_back({tiling, tiling == PrefillTiling::kWgmmaWs ? 1 : 0});
    if (tiling == PrefillTiling::kWgmmaWs) runs.push_back({tiling, 2});
  }
  for (const auto& [tiling, heads_per_block] : runs) {
    SCOPED_TRACE(testing::Message() << "prefill tiling " << static_cast<int>(tiling)
                                    << ", heads a block " << heads_per_block);
    const bool wgmma = tiling == PrefillTiling::kWgmma || tiling == PrefillTiling::kWgmmaWs;
    const bool decode_launch =
        o.kernel == AttentionKernel::kDecode || (o.kernel == AttentionKernel::kAuto && max_q == 1);
    if (wgmma && !decode_launch && hd != 32 && hd != 64 && hd != 80) {
      // The wgmma kernels are built for head dims 32, 64 and 80 only: refused before any launch
      // (the generic kernel of the other head dims too: an explicit tiling it does not have).
      PagedAttentionCudaPlan plan{.max_q_len = max_q,
                                  .max_context_len = max_ctx,
                                  .kernel = o.kernel,
                                  .prefill_tiling = tiling};
      EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
      continue;
    }
    PagedAttentionCudaPlan plan{.max_q_len = max_q,
                                .max_context_len = max_ctx,
                                .kernel = o.kernel,
                                .workspace = d_ws.get(),
                                .workspace_bytes = ws_bytes,
                                .num_multiprocessors = 132,
                                .force_splits = o.force_splits,
                                .prefill_tiling = tiling,
                                .prefill_heads_per_block = heads_per_block};
    if (o.store_new_kv) {
      plan.store_new_k = d_k.get();
      plan.store_new_v = d_v.get();
      if (tiling == PrefillTiling::kWgmma) {  // not supported there: refused, nothing written
        EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
        continue;
      }
      d_k.Upload(poisoned_k.data(), poisoned_k.size());  // the tiling before stored into them
      d_v.Upload(poisoned_v.data(), poisoned_v.size());
    }
    std::vector<char> first;
    for (int launch = 0; launch < 2; ++launch) {
      d_out.Poison();
      int splits = -1;
      ASSERT_EQ(PagedAttentionCuda(p, plan, nullptr, &splits), KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      if (o.expect_splits >= 0) {
        EXPECT_EQ(splits, o.expect_splits);
      }
      std::vector<char> bytes = d_out.DownloadBytes();
      if (launch == 1) {
        EXPECT_TRUE(bytes == first) << "two launches on the same inputs differ (a race?)";
        break;
      }
      if (o.store_new_kv) {
        EXPECT_TRUE(d_k.DownloadBytes() == cache_k_bytes) << "K cache after the fused store";
        EXPECT_TRUE(d_v.DownloadBytes() == cache_v_bytes) << "V cache after the fused store";
      }
      const std::vector<float> out = Decode(bytes, o.dtype);
      const gpu_test::Diff d = Compare(out, ref);
      EXPECT_EQ(d.nonfinite, 0u) << "unwritten output or a read of an unused (NaN) cache slot";
      EXPECT_LE(d.rel, gpu_test::OneRoundingTol(o.dtype)) << gpu_test::ToString(d);
      first = std::move(bytes);
    }
  }
}

// Every head dim of PagedAttentionCudaSupportsHeadDim: Phi-1.5 / Phi-2 (64, 80), tiny test
// checkpoints (16, 32), larger custom ones (96, 128).
constexpr int kHeadDims[] = {16, 32, 64, 80, 96, 128};

std::vector<AttnCase> PrefillCases() {
  std::vector<AttnCase> cases;
  for (int hd : kHeadDims) {
    const bool production = hd == 64 || hd == 80;
    for (auto [nh, nkv] : {std::pair{4, 4}, std::pair{8, 2}}) {
      const std::string tag =
          "hd" + std::to_string(hd) + "_h" + std::to_string(nh) + "_kv" + std::to_string(nkv);
      // The other head dims take the lengths around the 16-row / 64-key tile edges only.
      const std::vector<int> lens =
          production || hd == 32
              ? std::vector<int>{1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 130, 257}
              : std::vector<int>{1, 17, 64, 65, 129, 257};
      for (int n : lens) {
        cases.push_back({tag + "_len" + std::to_string(n), nh, nkv, hd, {{n, n}}});
      }
      // Cached prefix (q_len < context) across block and 64-key tile boundaries.
      cases.push_back({tag + "_prefix", nh, nkv, hd, {{17, 100}, {1, 16}, {64, 129}}});
      // Mixed varlen batch, including decode-like rows.
      cases.push_back(
          {tag + "_mixed", nh, nkv, hd, {{1, 1}, {5, 37}, {16, 16}, {17, 300}, {70, 70}}});
      // Several query tiles after a prefix that is no multiple of a key tile (the diagonal
      // crosses tiles at an offset), and block sizes other than 16 (12 takes the division path).
      cases.push_back({tag + "_prefix_tiles", nh, nkv, hd, {{300, 333}, {129, 1000}}});
      cases.push_back({tag + "_bs12", nh, nkv, hd, {{100, 130}, {37, 37}}, 12});
      cases.push_back({tag + "_bs32", nh, nkv, hd, {{200, 250}, {1, 33}}, 32});
    }
  }
  cases.push_back({"hd80_long_prefill", 2, 1, 80, {{1000, 1000}}});
  cases.push_back({"hd80_phi2_heads", 32, 32, 80, {{300, 300}}});
  cases.push_back({"hd64_long_prefix", 2, 2, 64, {{64, 4096}}});
  cases.push_back({"hd128_long_prefill", 4, 2, 128, {{1000, 1000}}});
  cases.push_back({"hd16_long_prefix", 4, 4, 16, {{70, 2000}}});
  return cases;
}

// Every tiling this GPU runs (kWgmma / kWgmmaWs need a compute capability 9.0 device and an
// sm_90a build).
std::vector<PrefillTiling> AllTilings() {
  std::vector<PrefillTiling> tilings;
  for (PrefillTiling t : kAllTilings) {
    const bool hopper_only = t == PrefillTiling::kWgmma || t == PrefillTiling::kWgmmaWs;
    if (!hopper_only || PagedAttentionPrefillWgmmaAvailable()) tilings.push_back(t);
  }
  return tilings;
}

TEST(CudaPagedAttention, PrefillMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (const AttnCase& c : PrefillCases()) {
    RunCase(c, {.dtype = DataType::kBF16, .tilings = AllTilings()});
    if (HasFatalFailure()) return;
  }
}

// The fused K/V store (PagedAttentionCudaPlan::store_new_k / _v) over the same sweep: new keys
// read from the q rows (their cache slots are NaN: reading one poisons the output), the cache
// written exactly (cached prefixes, several sequences, GQA, block sizes 12/16/32).
TEST(CudaPagedAttention, PrefillStoresNewKvFromQRows) {
  PHI_REQUIRE_GPU();
  for (const AttnCase& c : PrefillCases()) {
    RunCase(c, {.dtype = DataType::kBF16, .tilings = AllTilings(), .store_new_kv = true});
    if (HasFatalFailure()) return;
  }
  RunCase({"store_fp16_mixed", 8, 2, 80, {{1, 1}, {5, 37}, {17, 300}, {70, 70}}},
          {.dtype = DataType::kF16, .tilings = AllTilings(), .store_new_kv = true});
}

TEST(CudaPagedAttention, PrefillNegativeScale) {
  PHI_REQUIRE_GPU();
  RunCase({"neg_scale", 4, 2, 80, {{130, 200}, {17, 17}}},
          {.dtype = DataType::kBF16, .tilings = AllTilings(), .scale_sign = -1.0f});
}

TEST(CudaPagedAttention, PrefillFp16MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (const AttnCase& c : PrefillCases()) {
    if (c.name.find("mixed") == std::string::npos && c.name.find("long") == std::string::npos) {
      continue;
    }
    RunCase(c, {.dtype = DataType::kF16, .tilings = AllTilings()});
    if (HasFatalFailure()) return;
  }
}

// From 1024 query tokens kAuto takes kWgmmaWs (on Hopper): the long cases run it both forced and
// chosen, once with the fused K/V store after a cached prefix that is no multiple of a key tile
// (4133 rows: 21 tiles of 192 + 101, the store's last tile partial).
TEST(CudaPagedAttention, LongPrefill4096) {
  PHI_REQUIRE_GPU();
  RunCase({"hd80_4096", 2, 1, 80, {{4096, 4096}}},
          {.dtype = DataType::kBF16, .tilings = AllTilings()});
  RunCase({"hd80_4133_prefix_store", 2, 1, 80, {{4133, 4200}}},
          {.dtype = DataType::kBF16, .tilings = AllTilings(), .store_new_kv = true});
}

// kAuto's table (PrefillTiling): kWgmmaWs at head dims 64 and 80 from 1024 query tokens where it
// runs (kQ128 at head dim 80 from 4096 where it does not); below, and for other head dims, the
// mma.sync tilings. Forced tilings pass through unchanged.
TEST(CudaPagedAttention, AutoTilingTakesWarpSpecialisedFrom1024Queries) {
  PHI_REQUIRE_GPU();
  const bool ws = PagedAttentionPrefillWgmmaAvailable();
  auto pick = [](int head_dim, int max_q_len, PrefillTiling forced = PrefillTiling::kAuto) {
    PagedAttentionParams p;
    p.head_dim = head_dim;
    PagedAttentionCudaPlan plan{.max_q_len = max_q_len, .prefill_tiling = forced};
    return PagedAttentionPrefillTiling(p, plan);
  };
  EXPECT_EQ(pick(80, 4096), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128);
  EXPECT_EQ(pick(80, 16384), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128);
  EXPECT_EQ(pick(80, 2048), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(80, 1024), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(64, 4096), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(64, 1024), ws ? PrefillTiling::kWgmmaWs : PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(80, 1023), PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(64, 512), PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(32, 8192), PrefillTiling::kQ128Warps8);
  for (int hd : {16, 96, 128}) {  // no wgmma kernel for these: never picked
    EXPECT_EQ(pick(hd, 8192), PrefillTiling::kQ128Warps8);
    EXPECT_EQ(pick(hd, 64), PrefillTiling::kQ128Warps8);
  }
  EXPECT_EQ(pick(80, 8192, PrefillTiling::kQ128Warps8), PrefillTiling::kQ128Warps8);
  EXPECT_EQ(pick(80, 64, PrefillTiling::kWgmmaWs), PrefillTiling::kWgmmaWs);
}

std::vector<AttnCase> DecodeCases() {
  std::vector<AttnCase> cases;
  for (int hd : kHeadDims) {
    for (auto [nh, nkv] : {std::pair{4, 4}, std::pair{8, 2}, std::pair{8, 1}}) {
      const std::string tag =
          "hd" + std::to_string(hd) + "_h" + std::to_string(nh) + "_kv" + std::to_string(nkv);
      cases.push_back({tag + "_batch",
                       nh,
                       nkv,
                       hd,
                       {{1, 1}, {1, 15}, {1, 16}, {1, 17}, {1, 64}, {1, 65}, {1, 255}, {1, 1000}}});
      cases.push_back({tag + "_one", nh, nkv, hd, {{1, 333}}});
    }
  }
  cases.push_back({"hd80_ctx4096", 32, 32, 80, {{1, 4096}, {1, 2049}}});
  cases.push_back({"hd128_ctx2049", 8, 2, 128, {{1, 2049}, {1, 64}}});
  return cases;
}

TEST(CudaPagedAttention, DecodeMatchesCpuReferenceWithEverySplitCount) {
  PHI_REQUIRE_GPU();
  for (const AttnCase& c : DecodeCases()) {
    RunCase(c, {.dtype = DataType::kBF16, .kernel = AttentionKernel::kDecode});  // auto splits
    RunCase(c, {.dtype = DataType::kBF16,
                .kernel = AttentionKernel::kDecode,
                .force_splits = 1,
                .expect_splits = 1});
    RunCase(c, {.dtype = DataType::kBF16, .kernel = AttentionKernel::kDecode, .force_splits = 3});
    RunCase(c, {.dtype = DataType::kBF16, .kernel = AttentionKernel::kDecode, .force_splits = 16});
    // The prefill kernel must give the same answer on decode batches (one code path contract).
    RunCase(c, {.dtype = DataType::kBF16, .kernel = AttentionKernel::kPrefill});
    if (HasFatalFailure()) return;
  }
}

// Head dims of no tuned kernel (paged_attention_generic.cu): HF's own tiny test shape (8), odd
// multiples of 8 (24, 48, 112), one that is not (20: no 16-byte vectors anywhere) and the largest
// (256), MHA and GQA, through every entry mode: prefill with cached prefixes and varlen rows,
// the fused K/V store, decode batches, and the tilings the generic kernel refuses.
TEST(CudaPagedAttention, GenericHeadDimsMatchCpuReference) {
  PHI_REQUIRE_GPU();
  for (int hd : {8, 20, 24, 48, 112, 256}) {
    ASSERT_FALSE(PagedAttentionCudaSupportsHeadDim(hd)) << hd;
    for (auto [nh, nkv] : {std::pair{4, 4}, std::pair{6, 2}}) {
      const std::string tag = "generic_hd" + std::to_string(hd) + "_h" + std::to_string(nh) +
                              "_kv" + std::to_string(nkv);
      const AttnCase prefill{tag + "_prefill", nh, nkv, hd, {{1, 1}, {17, 100}, {40, 40}, {5, 33}}};
      const AttnCase bs12{tag + "_bs12", nh, nkv, hd, {{30, 50}, {1, 13}}, 12};
      const AttnCase decode{tag + "_decode", nh, nkv, hd, {{1, 1}, {1, 16}, {1, 17}, {1, 300}}};
      for (DataType t : {DataType::kBF16, DataType::kF16}) {
        RunCase(prefill, {.dtype = t, .tilings = AllTilings()});
        RunCase(prefill, {.dtype = t, .tilings = AllTilings(), .store_new_kv = true});
        RunCase(bs12, {.dtype = t, .store_new_kv = true});
        RunCase(decode, {.dtype = t, .kernel = AttentionKernel::kDecode, .expect_splits = 1});
        RunCase(decode, {.dtype = t, .kernel = AttentionKernel::kPrefill});
        RunCase(decode, {.dtype = t, .store_new_kv = true});  // refused on a decode launch
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(CudaPagedAttention, DecodeFp16) {
  PHI_REQUIRE_GPU();
  for (const AttnCase& c : DecodeCases()) {
    RunCase(c, {.dtype = DataType::kF16, .kernel = AttentionKernel::kDecode, .force_splits = 3});
    if (HasFatalFailure()) return;
  }
}

TEST(CudaPagedAttention, AutoSplitsUseTheWorkspaceForShortBatches) {
  PHI_REQUIRE_GPU();
  // One sequence x 32 KV heads = 32 blocks < 4 x 132 SMs asks for ceil(528 / 32) = 17 splits,
  // capped at 16: 4096 keys / 16 = 256 keys (4 tiles) a split.
  RunCase({"split_auto", 32, 32, 80, {{1, 4096}}},
          {.dtype = DataType::kBF16, .kernel = AttentionKernel::kAuto, .expect_splits = 16});
  // 128 sequences x 8 KV heads = 1024 blocks already fill the GPU: no split.
  RunCase({"split_many_seqs", 8, 8, 64, std::vector<Seq>(128, Seq{1, 100})},
          {.dtype = DataType::kBF16, .kernel = AttentionKernel::kAuto, .expect_splits = 1});
}

// Small enough for compute-sanitizer (memcheck, racecheck): both kernels, GQA, a partial tile,
// a cached prefix and the split merge.
TEST(CudaPagedAttention, SmallCasesForSanitizer) {
  PHI_REQUIRE_GPU();
  RunCase({"sanitizer_prefill", 4, 2, 80, {{17, 40}, {1, 3}, {70, 70}, {130, 150}}},
          {.tilings = AllTilings()});
  RunCase({"sanitizer_decode", 8, 2, 64, {{1, 200}, {1, 17}}},
          {.kernel = AttentionKernel::kDecode, .force_splits = 3});
}

TEST(CudaPagedAttention, RejectsUnsupportedShapes) {
  PHI_REQUIRE_GPU();
  DeviceBuffer buf(1 << 16);
  PagedAttentionParams p{.q = buf.get(),
                         .k_cache = buf.get(),
                         .v_cache = buf.get(),
                         .out = buf.get(),
                         .cu_q_lens = buf.as<int32_t>(),
                         .context_lens = buf.as<int32_t>(),
                         .block_tables = buf.as<int32_t>(),
                         .num_seqs = 1,
                         .num_tokens = 1,
                         .max_blocks_per_seq = 1,
                         .num_blocks = 1,
                         .block_size = 16,
                         .num_heads = 2,
                         .num_kv_heads = 2,
                         .head_dim = 48,
                         .scale = 0.1f,
                         .dtype = DataType::kBF16};
  PagedAttentionCudaPlan plan{.max_q_len = 1, .max_context_len = 1};
  for (int hd : {257, 320}) {  // past the generic kernel's lanes
    p.head_dim = hd;
    EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape) << hd;
    EXPECT_FALSE(PagedAttentionCudaSupportsHeadDim(hd)) << hd;
  }
  p.head_dim = 48;  // the generic kernel's: still the dtype rule
  p.dtype = DataType::kF32;
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kBF16;
  if (PagedAttentionPrefillWgmmaAvailable()) {  // a supported head dim the wgmma kernels lack
    PagedAttentionCudaPlan wg{.max_q_len = 1,
                              .max_context_len = 1,
                              .kernel = AttentionKernel::kPrefill,
                              .prefill_tiling = PrefillTiling::kWgmmaWs};
    p.head_dim = 128;
    EXPECT_EQ(PagedAttentionCuda(p, wg, nullptr), KernelStatus::kInvalidShape);
    wg.prefill_tiling = PrefillTiling::kWgmma;
    EXPECT_EQ(PagedAttentionCuda(p, wg, nullptr), KernelStatus::kInvalidShape);
  }
  p.head_dim = 80;
  p.dtype = DataType::kF32;
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kBF16;
  p.num_kv_heads = 3;
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
  p.num_kv_heads = 2;
  plan.kernel = AttentionKernel::kDecode;
  plan.max_q_len = 2;
  p.num_tokens = 2;
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);  // decode q_len 2
  plan.kernel = AttentionKernel::kPrefill;
  p.scale = 0.0f;  // the prefill kernel's masked scores would be 0 x -inf
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
  p.scale = 0.1f;
  p.num_seqs = 65536;  // a grid dimension
  p.num_tokens = 65536;
  EXPECT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kInvalidShape);
  EXPECT_FALSE(PagedAttentionCudaSupportsHeadDim(48));
  for (int hd : {16, 32, 64, 80, 96, 128}) EXPECT_TRUE(PagedAttentionCudaSupportsHeadDim(hd)) << hd;
}

}  // namespace
}  // namespace phishard
