// The decode fast path: the graph-friendly decode attention against its CPU reference, and
// CudaPhiModel's CUDA-graph decode steps against its own eager launches (the GEMV kernels they
// use are tested in cuda_gemv_test.cc).
//
// Kernel tolerance: each output is rounded once to its 16-bit type after float32 arithmetic, so
// OneRoundingTol (4x the rounding unit, see gpu_test_util.h) applies. The tensor-core kernel
// (kTensorCore) rounds its operands too: q and K / V are 16-bit already (exact products, float32
// sums) and its softmax weights go in as a 16-bit high part plus the 16-bit rounding of the rest
// (~16 bits, 2^-17 relative), far below the output's one rounding, so the same bound holds.
// Model tests compare bit for bit: a replayed graph runs the very launches the eager step runs,
// and a padding row changes nothing any real row computes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/gemv_cuda.h"  // kGemvMaxRows
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/device.h"
#include "kernels/kv_layout.h"
#include "kernels/paged_attention.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using gpu_test::Compare;
using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using gpu_test::OneRoundingTol;
using testing_util::RandomVector;

constexpr DataType kHalfTypes[] = {DataType::kBF16, DataType::kF16};

// ---------------------------------------------------------------------------------------------
// Graph-friendly decode attention vs PagedAttentionCpu.
struct DecodeCase {
  std::vector<int> ctx;  // per sequence; 0 = padding row
  int live;              // step_info[0] (< ctx.size(): the tail rows are padding)
  int num_heads, num_kv_heads, head_dim, block_size;
  // q scaled by this and rounded to the case's dtype (the reference then reads the same values):
  // scores over a wide range, so later keys pass a group's reference max by more than the
  // pipelined kernel's lazy-rescale slack (kRescaleSlack) and its rescale runs mid-stream.
  float q_scale = 1.0f;
};

// One case's inputs on the device and its CPU reference, shared by every split bound and kernel
// variant run on it (building the pool of the long cases dominated the test's time). Poisons
// every cache slot no sequence owns (K and V NaN: a read past a context shows up) and uses a
// table pitch wider than needed. bad_ids: one table entry of each live sequence (its second block
// where it has two, else its first) is out of [0, num_blocks) (-1 or past the pool); the kernels
// read it as zero K/V, the reference reads an all-zero block appended to the pool.
struct PreparedDecode {
  DecodeCase c;
  DataType t;
  bool device_info;
  DeviceBuffer d_q, d_k, d_v, d_ctx, d_tables, d_info;
  PagedAttentionParams p;  // .out set by each run
  std::vector<float> ref;  // [S, heads x head_dim]
  bool ref_ok = true;      // the CPU reference ran
};

std::unique_ptr<PreparedDecode> PrepareDecodeCase(const DecodeCase& c, DataType t, bool device_info,
                                                  bool bad_ids) {
  auto pd = std::make_unique<PreparedDecode>();
  pd->c = c;
  pd->t = t;
  pd->device_info = device_info;
  const int S = static_cast<int>(c.ctx.size());
  const int bs = c.block_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  int max_ctx = 1;
  for (int x : c.ctx) max_ctx = std::max(max_ctx, x);
  const int pitch = KvBlockAllocator::BlocksFor(max_ctx, bs) + 2;
  const int num_blocks = S * pitch + 3;
  std::mt19937 rng(S * 131 + hd);
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(S) * pitch, 0);
  std::vector<char> owned(static_cast<size_t>(num_blocks) * bs, 0);
  for (int s = 0, next = 0; s < S; ++s) {
    for (int b = 0; b < KvBlockAllocator::BlocksFor(c.ctx[s], bs); ++b) {
      const int blk = ids[next++];
      tables[static_cast<size_t>(s) * pitch + b] = blk;
      for (int o = 0; o < bs && b * bs + o < c.ctx[s]; ++o) owned[blk * bs + o] = 1;
    }
  }
  // Reference table: bad ids -> block num_blocks (zeros, appended to the reference's pool).
  std::vector<int32_t> ref_tables = tables;
  if (bad_ids) {
    for (int s = 0; s < S; ++s) {
      const int n = KvBlockAllocator::BlocksFor(c.ctx[s], bs);
      if (n == 0) continue;
      const size_t at = static_cast<size_t>(s) * pitch + (n > 1 ? 1 : 0);
      tables[at] = s % 2 == 0 ? -1 : num_blocks + s;
      ref_tables[at] = num_blocks;
    }
  }
  const int q_stride = (nh + 2 * nkv) * hd;
  std::vector<float> q = RandomVector(static_cast<size_t>(S) * q_stride, S + hd, -2.0f, 2.0f);
  if (c.q_scale != 1.0f) {
    for (float& x : q) x *= c.q_scale;
    q = Decode(Encode(q, t), t);
  }
  const size_t slot_elems = static_cast<size_t>(nkv) * hd;
  std::vector<float> k = RandomVector(num_blocks * bs * slot_elems, 11 + S);
  std::vector<float> v = RandomVector(num_blocks * bs * slot_elems, 12 + S);
  std::vector<char> kb = Encode(k, t), vb = Encode(v, t);
  for (size_t slot = 0; slot < owned.size(); ++slot) {
    if (owned[slot]) continue;
    // 0xFFFF: a NaN in bf16 and fp16.
    testing_util::FillCacheSlot(reinterpret_cast<uint16_t*>(kb.data()), slot, uint16_t{0xFFFF}, bs,
                                nkv, hd);
    testing_util::FillCacheSlot(reinterpret_cast<uint16_t*>(vb.data()), slot, uint16_t{0xFFFF}, bs,
                                nkv, hd);
  }
  std::vector<int32_t> ctx(c.ctx.begin(), c.ctx.end());
  const std::vector<int32_t> info = {c.live, pitch, 0, 0};
  pd->d_q = DeviceBuffer::From(Encode(q, t));
  pd->d_k = DeviceBuffer::From(kb);
  pd->d_v = DeviceBuffer::From(vb);
  pd->d_ctx = DeviceBuffer::From(ctx);
  pd->d_tables = DeviceBuffer::From(tables);
  pd->d_info = DeviceBuffer::From(info);
  pd->p = PagedAttentionParams{.q = pd->d_q.get(),
                               .k_cache = pd->d_k.get(),
                               .v_cache = pd->d_v.get(),
                               .context_lens = pd->d_ctx.as<int32_t>(),
                               .block_tables = pd->d_tables.as<int32_t>(),
                               .num_seqs = S,
                               .num_tokens = S,
                               .max_blocks_per_seq = device_info ? 0 : pitch,
                               .num_blocks = num_blocks,
                               .block_size = bs,
                               .num_heads = nh,
                               .num_kv_heads = nkv,
                               .head_dim = hd,
                               .q_stride = q_stride,
                               .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                               .dtype = t};

  // Reference over the live rows only (the CPU op has no padding rows).
  std::vector<float> kf = Decode(kb, t), vf = Decode(vb, t);
  kf.resize(kf.size() + static_cast<size_t>(KvBlockElems(bs, nkv, hd)), 0.0f);
  vf.resize(vf.size() + static_cast<size_t>(KvBlockElems(bs, nkv, hd)), 0.0f);
  pd->ref.assign(static_cast<size_t>(S) * nh * hd, 0.0f);
  for (int s = 0; s < S; ++s) {
    if (c.ctx[s] <= 0) continue;
    const std::vector<int32_t> one_cu = {0, 1}, one_ctx = {c.ctx[s]};
    std::vector<int32_t> one_table(ref_tables.begin() + static_cast<size_t>(s) * pitch,
                                   ref_tables.begin() + static_cast<size_t>(s + 1) * pitch);
    std::vector<float> one_out(static_cast<size_t>(nh) * hd);
    PagedAttentionParams pc = pd->p;
    pc.q = q.data() + static_cast<size_t>(s) * q_stride;
    pc.k_cache = kf.data();
    pc.v_cache = vf.data();
    pc.out = one_out.data();
    pc.cu_q_lens = one_cu.data();
    pc.context_lens = one_ctx.data();
    pc.block_tables = one_table.data();
    pc.num_seqs = 1;
    pc.num_tokens = 1;
    pc.max_blocks_per_seq = pitch;
    pc.num_blocks = num_blocks + 1;
    pc.dtype = DataType::kF32;
    const KernelStatus st = PagedAttentionCpu(pc);
    EXPECT_EQ(st, KernelStatus::kOk);
    pd->ref_ok = pd->ref_ok && st == KernelStatus::kOk;
    std::copy(one_out.begin(), one_out.end(), pd->ref.begin() + static_cast<size_t>(s) * nh * hd);
  }
  return pd;
}

// One kernel launch on a prepared case with the given split bound, into a poisoned output and
// workspace: padding rows exactly zero, live rows within one rounding of the reference.
void RunPrepared(const PreparedDecode& pd, int max_splits,
                 PagedDecodeVariant variant = PagedDecodeVariant::kAuto) {
  const DecodeCase& c = pd.c;
  const int S = static_cast<int>(c.ctx.size()), nh = c.num_heads, hd = c.head_dim;
  DeviceBuffer d_out(static_cast<size_t>(S) * nh * hd * 2);
  d_out.Poison();
  const size_t ws_bytes = PagedDecodeCudaWorkspaceBytes(S, nh, hd, kPagedDecodeMaxSplits);
  DeviceBuffer d_ws(std::max<size_t>(ws_bytes, 16));
  d_ws.Poison();
  PagedAttentionParams p = pd.p;
  p.out = d_out.get();
  PagedDecodeCudaPlan plan{.step_info = pd.device_info ? pd.d_info.as<int32_t>() : nullptr,
                           .max_splits = max_splits,
                           .workspace = d_ws.get(),
                           .workspace_bytes = ws_bytes,
                           .num_multiprocessors = 132,
                           .variant = variant};
  int bound = 0;
  ASSERT_EQ(PagedDecodeCuda(p, plan, nullptr, &bound), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  EXPECT_EQ(bound, max_splits);
  const std::vector<float> out = Decode(d_out.DownloadBytes(), pd.t);
  for (int s = 0; s < S; ++s) {
    if (c.ctx[s] > 0) continue;
    for (int i = 0; i < nh * hd; ++i) {
      ASSERT_EQ(out[static_cast<size_t>(s) * nh * hd + i], 0.0f) << "padding row " << s;
    }
  }
  const gpu_test::Diff d = Compare(out, pd.ref);
  EXPECT_EQ(d.nonfinite, 0u);
  EXPECT_LE(d.rel, OneRoundingTol(pd.t)) << gpu_test::ToString(d);
}

// Prepares one case and runs it with every split bound x kernel variant (the trace names both).
void RunDecodeCase(const DecodeCase& c, DataType t, const std::vector<int>& splits,
                   bool device_info, const std::vector<PagedDecodeVariant>& variants,
                   bool bad_ids = false) {
  const std::unique_ptr<PreparedDecode> pd = PrepareDecodeCase(c, t, device_info, bad_ids);
  if (!pd->ref_ok) return;
  for (int sp : splits) {
    for (PagedDecodeVariant v : variants) {
      SCOPED_TRACE(testing::Message() << "splits " << sp << " variant " << static_cast<int>(v));
      RunPrepared(*pd, sp, v);
      if (testing::Test::HasFatalFailure()) return;
    }
  }
}

void RunDecodeCase(const DecodeCase& c, DataType t, int max_splits, bool device_info,
                   PagedDecodeVariant variant = PagedDecodeVariant::kAuto, bool bad_ids = false) {
  RunDecodeCase(c, t, std::vector<int>{max_splits}, device_info, {variant}, bad_ids);
}

// The swept shapes: one key, long contexts, block and tile edges, GQA groups of 2, 3, 4 and 8,
// padding rows, block sizes 5, 7, 12 and 16, every supported head dim.
std::vector<DecodeCase> DecodeCases() {
  return {
      {{1}, 1, 32, 32, 80, 16},                          // one key
      {{1000}, 1, 32, 32, 80, 16},                       // Phi-2, long
      {{15, 16, 17, 63, 64, 65, 129}, 7, 8, 8, 64, 16},  // block and tile edges
      {{300, 5, 0, 0}, 2, 4, 2, 80, 16},                 // GQA, padding rows
      {{77, 200, 3}, 3, 8, 8, 32, 7},                    // odd block size, head_dim 32
      {{4096, 2048}, 2, 32, 32, 80, 16},
      {{100, 37, 1}, 3, 8, 1, 64, 16},  // group 8: two blocks of 4 query heads per KV head
      {{65, 130}, 2, 6, 2, 80, 16},     // group 3: one warp a head, the fourth only copies
      {{33, 250}, 2, 4, 4, 80, 5},      // MHA, block size 5 (not a power of two)
      // The other head dims of PagedDecodeCudaSupportsHeadDim: tiny (16) and custom (96, 128)
      // checkpoints; one and two 16-byte slices a lane, GQA, padding rows, odd block sizes.
      {{15, 16, 17, 65, 300, 0}, 5, 4, 4, 16, 16},
      {{1, 129, 1000}, 3, 8, 2, 16, 7},
      {{64, 65, 2049, 0}, 3, 8, 2, 96, 16},
      {{33, 250}, 2, 6, 2, 96, 5},
      {{17, 1000, 130}, 3, 8, 1, 128, 16},
      {{63, 64, 0}, 2, 4, 4, 128, 12}};
}

TEST(CudaPagedDecode, MatchesCpuReferenceAcrossShapesAndSplits) {
  PHI_REQUIRE_GPU();
  const std::vector<DecodeCase> cases = DecodeCases();
  for (const DecodeCase& c : cases) {
    for (DataType t : kHalfTypes) {
      SCOPED_TRACE(testing::Message()
                   << DataTypeName(t) << " seqs " << c.ctx.size() << " head_dim " << c.head_dim);
      // The production kernels on every case (kAuto picks one of the first two by grid size;
      // the one-warp-a-head kernel where the model asks for it), and kAuto itself in bf16.
      std::vector<PagedDecodeVariant> variants = {PagedDecodeVariant::kPipelined,
                                                  PagedDecodeVariant::kRegisterStages,
                                                  PagedDecodeVariant::kWarpPerHead};
      if (t == DataType::kBF16) variants.push_back(PagedDecodeVariant::kAuto);
      RunDecodeCase(c, t, {1, 3, 16}, /*device_info=*/true, variants);
      if (HasFatalFailure()) return;
    }
  }
  // Host-side pitch and live count (no step_info).
  RunDecodeCase({{40, 41, 1}, 3, 8, 8, 64, 16}, DataType::kBF16, 4, /*device_info=*/false);
}

// The tensor-core kernel (PagedDecodeVariant::kTensorCore, opt-in) on the same cases, both
// types, 1, 3 and 16 splits, and GQA groups wider than its 8 heads a block (16: two blocks a KV
// head) and of one head (MHA: 1 of the mma's 8 columns used).
TEST(CudaPagedDecode, TensorCoreMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  std::vector<DecodeCase> cases = DecodeCases();
  cases.push_back({{200, 31, 1}, 3, 32, 2, 64, 16});  // group 16
  cases.push_back({{1024, 1023, 17, 0}, 3, 32, 32, 80, 16});  // Phi-2 heads, ctx 1024
  for (const DecodeCase& c : cases) {
    for (DataType t : kHalfTypes) {
      SCOPED_TRACE(testing::Message()
                   << DataTypeName(t) << " seqs " << c.ctx.size() << " heads " << c.num_heads << "/"
                   << c.num_kv_heads << " head_dim " << c.head_dim << " block " << c.block_size);
      RunDecodeCase(c, t, {1, 3, 16}, /*device_info=*/true, {PagedDecodeVariant::kTensorCore});
      if (HasFatalFailure()) return;
    }
  }
  RunDecodeCase({{40, 41, 1}, 3, 8, 8, 64, 16}, DataType::kBF16, 4, /*device_info=*/false,
                PagedDecodeVariant::kTensorCore);
}

// Block ids outside [0, num_blocks) read as zero K/V in every kernel; unused slots are NaN as in
// every case. Bad ids
// in a tile's first and second block, one or several splits, MHA and GQA, the Phi-2 shape.
TEST(CudaPagedDecode, BadBlockIdsReadAsZeros) {
  PHI_REQUIRE_GPU();
  const std::vector<DecodeCase> cases = {{{40, 9, 33, 0}, 3, 4, 4, 80, 16},
                                         {{300, 17, 16, 1}, 4, 8, 2, 64, 16},
                                         {{1000, 70}, 2, 32, 32, 80, 16},
                                         {{50, 12}, 2, 4, 2, 80, 7}};
  for (const DecodeCase& c : cases) {
    SCOPED_TRACE(testing::Message() << "seqs " << c.ctx.size() << " heads " << c.num_heads << "/"
                                    << c.num_kv_heads << " block " << c.block_size);
    RunDecodeCase(c, DataType::kBF16, {1, 3}, /*device_info=*/true,
                  {PagedDecodeVariant::kPipelined, PagedDecodeVariant::kRegisterStages,
                   PagedDecodeVariant::kTensorCore, PagedDecodeVariant::kWarpPerHead},
                  /*bad_ids=*/true);
    if (HasFatalFailure()) return;
  }
}

// Scores spread over ~100 log2 units (q x 24): a group's running max moves by more than the lazy
// rescale's slack well after its first keys, so the pipelined kernel's rescale runs mid-stream
// (with q as the other cases draw it, scores span a few units and it rarely runs past the first
// key); every kernel against the reference, MHA and GQA, one and several splits.
TEST(CudaPagedDecode, WideScoresRescaleMidStream) {
  PHI_REQUIRE_GPU();
  const std::vector<DecodeCase> cases = {{{1000, 300, 77, 0}, 4, 32, 32, 80, 16, 24.0f},
                                         {{513, 40, 1}, 3, 8, 2, 64, 16, 24.0f},
                                         {{700, 129}, 2, 4, 4, 96, 16, 24.0f}};
  for (const DecodeCase& c : cases) {
    for (DataType t : kHalfTypes) {
      SCOPED_TRACE(testing::Message()
                   << DataTypeName(t) << " seqs " << c.ctx.size() << " head_dim " << c.head_dim);
      RunDecodeCase(c, t, {1, 3}, /*device_info=*/true,
                    {PagedDecodeVariant::kPipelined, PagedDecodeVariant::kRegisterStages,
                     PagedDecodeVariant::kTensorCore, PagedDecodeVariant::kWarpPerHead});
      if (HasFatalFailure()) return;
    }
  }
}

// Small enough for compute-sanitizer (memcheck, racecheck): splits, padding rows, GQA.
TEST(CudaPagedDecode, SmallCasesForSanitizer) {
  PHI_REQUIRE_GPU();
  RunDecodeCase({{70, 3, 0}, 2, 4, 2, 80, 16}, DataType::kBF16, 4, /*device_info=*/true);
  RunDecodeCase({{33}, 1, 2, 2, 64, 16}, DataType::kF16, 1, /*device_info=*/false);
  RunDecodeCase({{70, 3, 0}, 2, 4, 4, 80, 16}, DataType::kBF16, 4, /*device_info=*/true,
                PagedDecodeVariant::kPipelined);
  RunDecodeCase({{70, 3, 0}, 2, 4, 2, 80, 16}, DataType::kBF16, 4, /*device_info=*/true,
                PagedDecodeVariant::kRegisterStages);
  RunDecodeCase({{70, 3, 0}, 2, 4, 2, 80, 16}, DataType::kBF16, 4, /*device_info=*/true,
                PagedDecodeVariant::kTensorCore);
  RunDecodeCase({{33, 16}, 2, 4, 4, 64, 5}, DataType::kF16, 1, /*device_info=*/true,
                PagedDecodeVariant::kTensorCore);
  RunDecodeCase({{70, 3, 0}, 2, 6, 2, 80, 16}, DataType::kBF16, 4, /*device_info=*/true,
                PagedDecodeVariant::kWarpPerHead);  // 6 heads: the second block's warps 2-3 idle
  RunDecodeCase({{33, 16}, 2, 4, 4, 64, 5}, DataType::kF16, 1, /*device_info=*/true,
                PagedDecodeVariant::kWarpPerHead);
}

// ---------------------------------------------------------------------------------------------
// CudaPhiModel decode graphs.
const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();

std::unique_ptr<CudaPhiModel> Load(const fs::path& dir, CudaModelOptions o) {
  o.reserve_tokens = 512;
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = CudaPhiModel::Load(dir, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

// A fixed workload: 8 sequences of different prompt lengths, prefilled together, then decode
// steps over changing subsets (batch sizes 1..8, several per bucket), contexts crossing block
// boundaries, and steps that ask for only some logit rows.
class Workload {
 public:
  Workload(int vocab, int max_seqs_per_step) : vocab_(vocab), max_(max_seqs_per_step) {
    const int prompts[] = {5, 16, 17, 31, 33, 64, 1, 100};
    for (int s = 0; s < 8; ++s) {
      Seq q;
      q.ctx = prompts[s];
      q.blocks.resize(KvBlockAllocator::BlocksFor(q.ctx + 64));
      std::iota(q.blocks.begin(), q.blocks.end(), s * 16 + 1);  // block 0 owned by nobody
      seqs_.push_back(q);
    }
  }
  static constexpr int kBlocks = 8 * 16 + 1;

  ForwardBatch Prefill() const {
    ForwardBatch b;
    int t = 0;
    for (int s = 0; s < 8; ++s) {
      for (int i = 0; i < seqs_[s].ctx; ++i, ++t) {
        b.token_ids.push_back((s * 97 + i * 13 + 1) % vocab_);
        b.positions.push_back(i);
      }
      b.logit_rows.push_back(t - 1);
      b.seqs.push_back({.num_new_tokens = seqs_[s].ctx,
                        .context_len = seqs_[s].ctx,
                        .block_table = seqs_[s].blocks});
    }
    return b;
  }

  // Step i of the schedule (advances the chosen sequences' contexts).
  ForwardBatch Step(int i) {
    static const std::vector<std::vector<int>> kSchedule = {{0, 1, 2},
                                                            {0, 1, 2, 3},
                                                            {5},
                                                            {4, 6},
                                                            {0, 2, 4},
                                                            {1, 3, 5, 6, 7},
                                                            {0, 1, 2, 3, 4, 5, 6, 7},
                                                            {3},
                                                            {7, 6, 5},
                                                            {2, 3},
                                                            {0, 1, 2, 3, 4, 5}};
    std::vector<int> pick;
    for (int s : kSchedule[i % kSchedule.size()]) {
      if (static_cast<int>(pick.size()) < max_) pick.push_back(s);
    }
    ForwardBatch b;
    for (size_t j = 0; j < pick.size(); ++j) {
      Seq& q = seqs_[pick[j]];
      b.token_ids.push_back((q.ctx * 31 + pick[j] * 7 + i) % vocab_);
      b.positions.push_back(q.ctx);
      b.seqs.push_back({.num_new_tokens = 1, .context_len = q.ctx + 1, .block_table = q.blocks});
      ++q.ctx;
      if (i % 3 != 2 || j % 2 == 0) b.logit_rows.push_back(static_cast<int>(j));
    }
    return b;
  }

 private:
  struct Seq {
    int ctx;
    std::vector<int32_t> blocks;
  };
  int vocab_, max_;
  std::vector<Seq> seqs_;
};

// Runs the workload on `a` and `b` side by side; every step's logits must be identical bits.
void ExpectSameSteps(CudaPhiModel& a, CudaPhiModel& b, int max_seqs, int steps) {
  const int V = a.config().vocab_size;
  Workload wa(V, max_seqs), wb(V, max_seqs);
  std::vector<float> la, lb;
  ASSERT_TRUE(a.Forward(wa.Prefill(), &la).ok());
  ASSERT_TRUE(b.Forward(wb.Prefill(), &lb).ok());
  ASSERT_EQ(la, lb) << "prefill differs";
  for (int i = 0; i < steps; ++i) {
    const ForwardBatch ba = wa.Step(i), bb = wb.Step(i);
    absl::Status sa = a.Forward(ba, &la), sb = b.Forward(bb, &lb);
    ASSERT_TRUE(sa.ok()) << sa;
    ASSERT_TRUE(sb.ok()) << sb;
    ASSERT_EQ(la.size(), ba.logit_rows.size() * V);
    ASSERT_EQ(la.size(), lb.size());
    for (float x : la) ASSERT_TRUE(std::isfinite(x)) << "step " << i;
    ASSERT_EQ(std::memcmp(la.data(), lb.data(), la.size() * sizeof(float)), 0)
        << "step " << i << " (" << ba.seqs.size() << " sequences) differs";
  }
}

class CudaDecodeGraphs : public ::testing::TestWithParam<std::string> {
 protected:
  fs::path Dir() const {
    return GetParam() == "tiny-phi-code" ? kRepo / "models" / "tiny-phi-code"
                                         : kRepo / "tests" / "golden" / GetParam();
  }
};

// Graph replays (including a replay after each bucket's first step, batch sizes inside one
// bucket that differ, and more steps than buckets) give the eager launches' logits bit for bit.
// The graph model also launches its GEMVs as programmatic dependents (PDL), which may only move
// when they run, never what they compute.
TEST_P(CudaDecodeGraphs, ReplayIsBitIdenticalToEager) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> eager =
      Load(Dir(), {.dtype = "bfloat16", .cuda_graphs = false, .pdl = false});
  std::unique_ptr<CudaPhiModel> graph =
      Load(Dir(), {.dtype = "bfloat16", .cuda_graphs = true, .pdl = true});
  ASSERT_TRUE(eager && graph);
  ASSERT_TRUE(eager->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
  ASSERT_TRUE(graph->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
  ExpectSameSteps(*eager, *graph, 8, 33);
  EXPECT_EQ(eager->num_decode_graphs(), 0);
  EXPECT_EQ(graph->num_decode_graphs(), 4);  // buckets 1, 2, 4, 8
  EXPECT_GE(graph->decode_graph_replays(), 33 - 4);
  std::printf("  %s: %d graphs, %zu nodes, %lld replays\n", GetParam().c_str(),
              graph->num_decode_graphs(), graph->decode_graph_nodes(),
              static_cast<long long>(graph->decode_graph_replays()));

  // A new KV pool moves what the graphs point at: they are captured again, still identical.
  ASSERT_TRUE(eager->AllocateKvCache(Workload::kBlocks + 5, kKvBlockSize).ok());
  ASSERT_TRUE(graph->AllocateKvCache(Workload::kBlocks + 5, kKvBlockSize).ok());
  EXPECT_EQ(graph->num_decode_graphs(), 0);
  ExpectSameSteps(*eager, *graph, 8, 12);
  EXPECT_GT(graph->num_decode_graphs(), 0);
}

// Padding rows change nothing: a step padded to its bucket gives the same bits as the same step
// run unpadded (max_graph_batch 1 sends every batch above 1 through the unpadded eager path).
// Both models put every linear layer of up to kGemvMaxRows rows through the GEMV kernel, whose
// per-row arithmetic does not depend on the row count, and the attention's split counts depend
// on the live count alone. A padding row that wrote a KV slot or leaked into a real row would
// show in this or a later step.
TEST_P(CudaDecodeGraphs, PaddingRowsAreHarmless) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> padded = Load(
      Dir(), {.dtype = "bfloat16", .gemv_max_rows = kGemvMaxRows, .gemv_single_segment = true});
  std::unique_ptr<CudaPhiModel> exact = Load(Dir(), {.dtype = "bfloat16",
                                                     .max_graph_batch = 1,
                                                     .gemv_max_rows = kGemvMaxRows,
                                                     .gemv_single_segment = true});
  ASSERT_TRUE(padded && exact);
  ASSERT_TRUE(padded->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
  ASSERT_TRUE(exact->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
  EXPECT_EQ(padded->decode_bucket(3), 4);
  EXPECT_EQ(exact->decode_bucket(3), 0);
  ExpectSameSteps(*padded, *exact, 8, 22);
  EXPECT_GT(padded->decode_graph_replays(), 0);
}

// The decode attention with rotary + K/V write and the split merge folded in
// (set_decode_attention_fold_rows) gives the three launches' logits bit for bit over prefill and
// decode steps (the KV cache it writes feeds every later step), eager and as graph replays, with
// every step folded and with only the buckets of up to 2 rows folded (the others unfused, the
// same KV cache). MHA models take the fused register-staged kernel; the GQA one takes the
// pipelined kernel, where the fold runs the rotary launch before it. Dense stays on cuBLASLt in
// both (decode_dense_bulk_rows 0: the bulk GEMV that 1-row fused steps take by default sums in
// another order; cuda_model_options_test DenseBulkCloseAndOnlyInItsRows covers it).
TEST_P(CudaDecodeGraphs, AttentionFoldIsBitIdentical) {
  PHI_REQUIRE_GPU();
  for (auto [graphs, rows] : {std::pair{false, 65536}, {true, 65536}, {true, 2}}) {
    SCOPED_TRACE(testing::Message() << (graphs ? "graphs" : "eager") << ", fold rows " << rows);
    std::unique_ptr<CudaPhiModel> plain =
        Load(Dir(), {.dtype = "bfloat16", .cuda_graphs = graphs, .decode_attention_fold_rows = 0});
    std::unique_ptr<CudaPhiModel> fused = Load(Dir(), {.dtype = "bfloat16",
                                                       .cuda_graphs = graphs,
                                                       .decode_attention_fold_rows = rows,
                                                       .decode_dense_bulk_rows = 0});
    ASSERT_TRUE(plain && fused);
    ASSERT_TRUE(plain->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
    ASSERT_TRUE(fused->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
    ExpectSameSteps(*fused, *plain, 8, 22);
    EXPECT_GT(fused->decode_attention_fold_steps(), 0);
    EXPECT_EQ(plain->decode_attention_fold_steps(), 0);
    if (graphs) {
      EXPECT_GT(fused->decode_graph_replays(), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaDecodeGraphs,
                         ::testing::Values("tiny-phi-code", "phi-gqa-hd80", "phi-mha-hd64"));

// The fold's default row bound follows the head dim (DecodeAttentionFoldRowsDefault): 16 rows at
// head_dim <= 64 (the demo model: 256 / 8 = 32; phi-mha-hd64), 8 above (phi-gqa-hd80), unless
// PHISHARD_DECODE_ATTENTION_FOLD says otherwise.
TEST(CudaDecodeGraphsDefaults, FoldBoundFollowsTheHeadDim) {
  PHI_REQUIRE_GPU();
  if (std::getenv("PHISHARD_DECODE_ATTENTION_FOLD") != nullptr) {
    GTEST_SKIP() << "PHISHARD_DECODE_ATTENTION_FOLD is set";
  }
  for (auto [dir, want] : {std::pair{kRepo / "models" / "tiny-phi-code", 16},
                           {kRepo / "tests" / "golden" / "phi-mha-hd64", 16},
                           {kRepo / "tests" / "golden" / "phi-gqa-hd80", 8}}) {
    SCOPED_TRACE(dir.string());
    std::unique_ptr<CudaPhiModel> m = Load(dir, {.dtype = "bfloat16"});
    ASSERT_TRUE(m);
    EXPECT_EQ(m->decode_attention_fold_rows(), want);
    std::unique_ptr<CudaPhiModel> set =
        Load(dir, {.dtype = "bfloat16", .decode_attention_fold_rows = 3});
    ASSERT_TRUE(set);
    EXPECT_EQ(set->decode_attention_fold_rows(), 3) << "an explicit option wins";
  }
}

// Warmup capture, and the graphs' memory in MaxKvBlocks.
TEST(CudaDecodeGraphsWarmup, CapturesEveryBucketAndCountsTheirMemory) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m =
      Load(kRepo / "models" / "tiny-phi-code", {.dtype = "bfloat16", .max_graph_batch = 48});
  ASSERT_TRUE(m);
  EXPECT_FALSE(m->CaptureDecodeGraphs(48).ok()) << "needs the KV cache first";
  absl::StatusOr<int> with_graphs = m->MaxKvBlocks(0.5, 512);
  m->set_cuda_graphs(false);
  absl::StatusOr<int> without = m->MaxKvBlocks(0.5, 512);
  m->set_cuda_graphs(true);
  ASSERT_TRUE(with_graphs.ok() && without.ok());
  // 7 buckets (1, 2, 4, 8, 16, 32, 48), the fc1 SM-target variant of buckets 8 and 16 (the
  // default row range 5-16) and the short-context variant of buckets 32 (head_dim 32: the fold
  // covers up to 16 rows, FoldShort 17-32) and 48 (an MHA model: ShortRegs above 32 rows), with
  // the decode stream on also its long-context variant of bucket 1: 11 or 12 graphs x
  // kDecodeGraphBytes, in blocks of this model.
  const int planned = m->decode_stream() ? 12 : 11;
  ASSERT_EQ(m->planned_decode_graphs(), planned);
  const double per_block = 2.0 * 4 * kKvBlockSize * 8 * 32 * 2;
  const double expect = planned * CudaPhiModel::kDecodeGraphBytes / per_block;
  EXPECT_NEAR(*without - *with_graphs, expect, 2.0);

  ASSERT_TRUE(m->AllocateKvCache(Workload::kBlocks, kKvBlockSize).ok());
  ASSERT_TRUE(m->CaptureDecodeGraphs(48).ok());
  EXPECT_EQ(m->num_decode_graphs(), planned);
  // Again, now that every kernel's module is loaded: the difference is the graphs alone.
  m->set_cuda_graphs(false);
  m->set_cuda_graphs(true);
  EXPECT_EQ(m->num_decode_graphs(), 0);
  size_t free_before = 0, free_after = 0, total = 0;
  DeviceMemGetInfo(&free_before, &total);
  ASSERT_TRUE(m->CaptureDecodeGraphs(48).ok());
  DeviceMemGetInfo(&free_after, &total);
  EXPECT_EQ(m->num_decode_graphs(), planned);
  const double used = static_cast<double>(free_before) - static_cast<double>(free_after);
  std::printf("  %d decode graphs (%zu nodes) took %.2f MiB of device memory\n", planned,
              m->decode_graph_nodes(), used / (1 << 20));
  EXPECT_LE(used, planned * CudaPhiModel::kDecodeGraphBytes) << "kDecodeGraphBytes is too small";
  // The first real step of a captured bucket is already a replay.
  Workload w(m->config().vocab_size, 8);
  std::vector<float> logits;
  ASSERT_TRUE(m->Forward(w.Prefill(), &logits).ok());
  const int64_t before = m->decode_graph_replays();
  ASSERT_TRUE(m->Forward(w.Step(0), &logits).ok());
  EXPECT_EQ(m->decode_graph_replays(), before + 1);
}

}  // namespace
}  // namespace phishard
