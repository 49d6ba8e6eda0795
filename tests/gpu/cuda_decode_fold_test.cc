// The fused decode attention (PagedDecodeCudaPlan::fold_rotary + merge_counters,
// kernels/cuda/paged_decode_cuda.h) against the launches it replaces: RotaryKvWriteCuda, then
// PagedDecodeCuda with the merge kernel. The fused form runs the same float operations in the
// same order, so the comparison is bit for bit (no tolerance): the attention output and both
// caches (every byte, NaN poison included) after each launch, and the counters back at zero.
// The unfused launches are checked against the CPU references by cuda_ops_test
// (CudaRotaryKvWrite) and cuda_graph_test (CudaPagedDecode), so this ties the fused form to them.
// Every cache slot no key uses, and the new token's own slot, start as NaN: a fused block that
// read the new row from the cache instead of its registers, or a read past a context, shows up.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/device.h"
#include "kernels/device_graph.h"
#include "model/kv_cache.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

constexpr DataType kHalfTypes[] = {DataType::kBF16, DataType::kF16};

struct FoldCase {
  std::vector<int> ctx;  // per sequence, including the new token; 0 = padding row
  int live;              // step_info[0]; the rows from it on are padding (ctx 0)
  int num_heads, num_kv_heads, head_dim, block_size, rotary_dim;
  int extra_stride = 0;  // qkv row pitch past q | k | v (a multiple of 8)
};

// One case's host data: qkv rows, block tables, caches with NaN in every slot no key < ctx - 1
// owns (the new token's slot included), positions ctx - 1 and slots of key ctx - 1.
struct FoldData {
  int S, pitch, num_blocks, width, stride;
  std::vector<char> qkv, k, v;
  std::vector<int32_t> tables, ctx, positions, info;
  std::vector<int64_t> slots;
};

FoldData MakeData(const FoldCase& c, DataType t) {
  FoldData d;
  d.S = static_cast<int>(c.ctx.size());
  const int bs = c.block_size, hd = c.head_dim, nkv = c.num_kv_heads;
  int max_ctx = 1;
  for (int x : c.ctx) max_ctx = std::max(max_ctx, x);
  d.pitch = KvBlockAllocator::BlocksFor(max_ctx, bs) + 1;
  d.num_blocks = d.S * d.pitch + 2;
  std::mt19937 rng(d.S * 977 + hd + bs);
  std::vector<int32_t> ids(d.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  d.tables.assign(static_cast<size_t>(d.S) * d.pitch, 0);
  std::vector<char> owned(static_cast<size_t>(d.num_blocks) * bs, 0);
  d.slots.assign(d.S, -1);
  d.positions.assign(d.S, 0);
  for (int s = 0, next = 0; s < d.S; ++s) {
    for (int b = 0; b < KvBlockAllocator::BlocksFor(c.ctx[s], bs); ++b) {
      const int blk = ids[next++];
      d.tables[static_cast<size_t>(s) * d.pitch + b] = blk;
      for (int o = 0; o < bs && b * bs + o < c.ctx[s] - 1; ++o) owned[blk * bs + o] = 1;
    }
    if (c.ctx[s] > 0) {
      const int key = c.ctx[s] - 1;
      d.slots[s] =
          static_cast<int64_t>(d.tables[static_cast<size_t>(s) * d.pitch + key / bs]) * bs +
          key % bs;
      d.positions[s] = key;
    }
  }
  d.width = (c.num_heads + 2 * nkv) * hd;
  d.stride = d.width + c.extra_stride;
  std::vector<float> qkv = RandomVector(static_cast<size_t>(d.S) * d.stride, d.S + hd, -2.0f, 2.0f);
  const size_t slot_elems = static_cast<size_t>(nkv) * hd;
  std::vector<float> k = RandomVector(d.num_blocks * bs * slot_elems, 21 + d.S);
  std::vector<float> v = RandomVector(d.num_blocks * bs * slot_elems, 22 + d.S);
  d.qkv = Encode(qkv, t);
  d.k = Encode(k, t);
  d.v = Encode(v, t);
  for (size_t slot = 0; slot < owned.size(); ++slot) {
    if (owned[slot]) continue;
    // 0xFFFF: a NaN in bf16 and fp16.
    testing_util::FillCacheSlot(reinterpret_cast<uint16_t*>(d.k.data()), slot, uint16_t{0xFFFF}, bs,
                                nkv, hd);
    testing_util::FillCacheSlot(reinterpret_cast<uint16_t*>(d.v.data()), slot, uint16_t{0xFFFF}, bs,
                                nkv, hd);
  }
  d.ctx.assign(c.ctx.begin(), c.ctx.end());
  d.info = {c.live, d.pitch, 0, 0};
  return d;
}

// Device copies of one case for one form (fused or not).
struct FoldDevice {
  DeviceBuffer qkv, k, v, ctx, tables, info, positions, slots, out, ws, counters;
  size_t ws_bytes = 0;
  PagedAttentionParams p;
  PagedDecodeCudaPlan plan;
  RotaryKvWriteParams rot;
};

void SetupDevice(const FoldCase& c, DataType t, const FoldData& d, int max_splits,
                 PagedDecodeVariant variant, FoldDevice* f) {
  f->qkv = DeviceBuffer::From(d.qkv);
  f->k = DeviceBuffer::From(d.k);
  f->v = DeviceBuffer::From(d.v);
  f->ctx = DeviceBuffer::From(d.ctx);
  f->tables = DeviceBuffer::From(d.tables);
  f->info = DeviceBuffer::From(d.info);
  f->positions = DeviceBuffer::From(d.positions);
  f->slots = DeviceBuffer::From(d.slots);
  f->out = DeviceBuffer(static_cast<size_t>(d.S) * c.num_heads * c.head_dim * 2);
  f->out.Poison();
  f->ws_bytes = PagedDecodeCudaWorkspaceBytes(d.S, c.num_heads, c.head_dim, max_splits);
  f->ws = DeviceBuffer(std::max<size_t>(f->ws_bytes, 16));
  f->ws.Poison();
  f->counters = DeviceBuffer::From(std::vector<int32_t>(static_cast<size_t>(d.S) * c.num_heads));
  f->p = PagedAttentionParams{.q = f->qkv.get(),
                              .k_cache = f->k.get(),
                              .v_cache = f->v.get(),
                              .out = f->out.get(),
                              .context_lens = f->ctx.as<int32_t>(),
                              .block_tables = f->tables.as<int32_t>(),
                              .num_seqs = d.S,
                              .num_tokens = d.S,
                              .max_blocks_per_seq = 0,
                              .num_blocks = d.num_blocks,
                              .block_size = c.block_size,
                              .num_heads = c.num_heads,
                              .num_kv_heads = c.num_kv_heads,
                              .head_dim = c.head_dim,
                              .q_stride = d.stride,
                              .scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim)),
                              .dtype = t};
  f->rot = RotaryKvWriteParams{.qkv = f->qkv.get(),
                               .positions = f->positions.as<int32_t>(),
                               .slots = f->slots.as<int64_t>(),
                               .k_cache = f->k.get(),
                               .v_cache = f->v.get(),
                               .num_slots = static_cast<int64_t>(d.num_blocks) * c.block_size,
                               .block_size = c.block_size,
                               .num_tokens = d.S,
                               .qkv_stride = d.stride,
                               .num_heads = c.num_heads,
                               .num_kv_heads = c.num_kv_heads,
                               .head_dim = c.head_dim,
                               .rotary_dim = c.rotary_dim,
                               .theta = 10000.0f,
                               .dtype = t};
  f->plan = PagedDecodeCudaPlan();
  f->plan.step_info = f->info.as<int32_t>();
  f->plan.max_splits = max_splits;
  f->plan.workspace = f->ws.get();
  f->plan.workspace_bytes = f->ws_bytes;
  f->plan.num_multiprocessors = 132;
  f->plan.variant = variant;
}

void MakeFused(FoldDevice* f) {
  f->plan.fold_rotary = true;
  f->plan.rotary = f->rot;
  f->plan.merge_counters = f->counters.as<int32_t>();
  f->plan.merge_counters_len = f->counters.bytes() / sizeof(int32_t);
}

// The fused form's output and caches equal the unfused ones' bit for bit; its qkv is untouched
// and its counters are zero again.
// check_qkv: only where the register-staged kernel ran fused (with the pipelined kernel the fused
// form runs the rotary launch, which rotates qkv in place as the unfused one does).
void ExpectSame(const FoldData& d, const FoldDevice& fused, const FoldDevice& plain, bool check_qkv,
                const char* what) {
  SCOPED_TRACE(what);
  EXPECT_TRUE(fused.out.DownloadBytes() == plain.out.DownloadBytes()) << "attention output";
  EXPECT_TRUE(fused.k.DownloadBytes() == plain.k.DownloadBytes()) << "K cache";
  EXPECT_TRUE(fused.v.DownloadBytes() == plain.v.DownloadBytes()) << "V cache";
  if (check_qkv) {
    EXPECT_TRUE(fused.qkv.DownloadBytes() == d.qkv) << "qkv must stay unrotated";
  }
  const std::vector<char> cb = fused.counters.DownloadBytes();
  EXPECT_TRUE(std::all_of(cb.begin(), cb.end(), [](char b) { return b == 0; })) << "counters";
}

void RunFoldCase(const FoldCase& c, DataType t, int max_splits, PagedDecodeVariant variant,
                 int graph_replays) {
  SCOPED_TRACE(testing::Message() << DataTypeName(t) << " seqs " << c.ctx.size() << " heads "
                                  << c.num_heads << "/" << c.num_kv_heads << " head_dim "
                                  << c.head_dim << " block " << c.block_size << " rotary "
                                  << c.rotary_dim << " splits " << max_splits << " variant "
                                  << static_cast<int>(variant));
  const FoldData d = MakeData(c, t);
  FoldDevice plain, fused;
  SetupDevice(c, t, d, max_splits, variant, &plain);
  SetupDevice(c, t, d, max_splits, variant, &fused);
  MakeFused(&fused);
  ASSERT_EQ(RotaryKvWriteCuda(plain.rot, nullptr), KernelStatus::kOk);
  int bound_plain = 0, bound_fused = 0;
  ASSERT_EQ(PagedDecodeCuda(plain.p, plain.plan, nullptr, &bound_plain), KernelStatus::kOk);
  ASSERT_EQ(PagedDecodeCuda(fused.p, fused.plan, nullptr, &bound_fused), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  EXPECT_EQ(bound_fused, bound_plain);
  // The new rows reached the cache (the poison of their slots is gone) and no output is NaN.
  const std::vector<char> k_after = fused.k.DownloadBytes();
  EXPECT_FALSE(k_after == d.k) << "no K row written";
  for (float x : gpu_test::Decode(fused.out.DownloadBytes(), t)) ASSERT_TRUE(std::isfinite(x));
  const bool registers = variant == PagedDecodeVariant::kRegisterStages;
  ExpectSame(d, fused, plain, registers, "first launch");
  if (graph_replays == 0) return;

  // Graph replays of the fused launch: the same bits every time (the new row is written again
  // with the same values and still never read from the cache; the counters restart at zero).
  cudaStream_t stream = nullptr;
  PHI_ASSERT_CUDA(DeviceStreamCreate(&stream));
  PHI_ASSERT_CUDA(DeviceGraphBeginCapture(stream));
  const KernelStatus st = PagedDecodeCuda(fused.p, fused.plan, stream);
  DeviceGraph* graph = nullptr;
  PHI_ASSERT_CUDA(DeviceGraphEndCapture(stream, &graph));
  ASSERT_EQ(st, KernelStatus::kOk);
  for (int r = 0; r < graph_replays; ++r) {
    fused.out.Poison();
    fused.ws.Poison();
    PHI_ASSERT_CUDA(DeviceGraphLaunch(graph, stream));
    gpu_test::ExpectDeviceClean(stream);
    ExpectSame(d, fused, plain, registers, "graph replay");
  }
  DeviceGraphDestroy(graph);
  DeviceStreamDestroy(stream);
}

const std::vector<FoldCase>& Cases() {
  static const std::vector<FoldCase> cases = {
      {{1}, 1, 4, 4, 80, 16, 32},                            // one key: the new token alone
      {{1000}, 1, 32, 32, 80, 16, 32},                       // Phi-2, long
      {{15, 16, 17, 63, 64, 65, 129}, 7, 8, 8, 64, 16, 32},  // block and split edges
      {{300, 5, 0, 0}, 2, 4, 2, 80, 16, 32},                 // GQA, padding rows
      {{100, 37, 1}, 3, 8, 1, 64, 16, 64},                   // group 8, full rotary
      {{77, 200, 3}, 3, 8, 8, 32, 7, 16, 8},                 // odd block size, head_dim 32, pitch
      {{33, 250}, 2, 4, 4, 80, 5, 0},                        // no rotary, block size 5
      {{4096, 2049}, 2, 32, 32, 80, 16, 32},                 // large angles
      // The other head dims: tiny checkpoints (16, rotary 8 / 6: partial rotary 0.5 / 0.4) and
      // custom ones (96, 128: two 16-byte slices a lane, 128 = one element a thread).
      {{15, 17, 65, 300, 0}, 4, 4, 4, 16, 16, 8},
      {{1, 129, 1000}, 3, 8, 2, 16, 7, 6},
      {{64, 65, 2049, 0}, 3, 8, 2, 96, 16, 32},
      {{17, 1000, 130}, 3, 8, 1, 128, 16, 64},
      {{63, 250}, 2, 4, 4, 128, 12, 128}};
  return cases;
}

TEST(CudaDecodeFold, BitIdenticalToRotaryAttentionMergeAcrossShapesAndSplits) {
  PHI_REQUIRE_GPU();
  for (const FoldCase& c : Cases()) {
    for (DataType t : kHalfTypes) {
      for (int splits : {1, 3, 16}) {
        RunFoldCase(c, t, splits, PagedDecodeVariant::kRegisterStages, /*graph_replays=*/0);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// kAuto may pick the pipelined kernel (GQA, big grids): then fold_rotary runs the rotary launch
// before it. Either way the same bits.
TEST(CudaDecodeFold, AutoVariantIsBitIdentical) {
  PHI_REQUIRE_GPU();
  for (const FoldCase& c : Cases()) {
    RunFoldCase(c, DataType::kBF16, 16, PagedDecodeVariant::kAuto, /*graph_replays=*/0);
    if (HasFatalFailure()) return;
  }
}

TEST(CudaDecodeFold, GraphReplaysAreBitIdentical) {
  PHI_REQUIRE_GPU();
  RunFoldCase({{1000}, 1, 32, 32, 80, 16, 32}, DataType::kBF16, 16,
              PagedDecodeVariant::kRegisterStages, /*graph_replays=*/3);
  RunFoldCase({{300, 5, 0, 0}, 2, 4, 2, 80, 16, 32}, DataType::kF16, 3,
              PagedDecodeVariant::kRegisterStages, /*graph_replays=*/2);
}

// Small enough for compute-sanitizer (memcheck, racecheck): splits merged in the kernel, GQA
// (one writer of the new row, the other blocks of the group reading it from shared memory),
// padding rows, one key.
TEST(CudaDecodeFold, SmallCasesForSanitizer) {
  PHI_REQUIRE_GPU();
  RunFoldCase({{70, 3, 0}, 2, 4, 2, 80, 16, 32}, DataType::kBF16, 4,
              PagedDecodeVariant::kRegisterStages, /*graph_replays=*/1);
  RunFoldCase({{1, 33}, 2, 2, 2, 64, 16, 64}, DataType::kF16, 3,
              PagedDecodeVariant::kRegisterStages, /*graph_replays=*/0);
}

// Parameters that do not describe the attention's own rows are refused with an error status
// before anything is launched.
TEST(CudaDecodeFold, RefusesMismatchedRotary) {
  PHI_REQUIRE_GPU();
  const FoldCase c{{20, 9}, 2, 4, 4, 64, 16, 32};
  const FoldData d = MakeData(c, DataType::kBF16);
  FoldDevice f;
  SetupDevice(c, DataType::kBF16, d, 3, PagedDecodeVariant::kRegisterStages, &f);
  MakeFused(&f);
  auto expect = [&](auto mutate, KernelStatus want, const char* what) {
    PagedDecodeCudaPlan plan = f.plan;
    mutate(&plan);
    EXPECT_EQ(PagedDecodeCuda(f.p, plan, nullptr), want) << what;
  };
  const std::vector<float> delta(static_cast<size_t>(d.S) * d.width, 0.0f);
  expect([](PagedDecodeCudaPlan* p) { p->rotary.num_heads = 2; }, KernelStatus::kInvalidShape,
         "heads");
  expect([](PagedDecodeCudaPlan* p) { p->rotary.qkv_stride = 8; }, KernelStatus::kInvalidShape,
         "stride");
  expect([](PagedDecodeCudaPlan* p) { p->rotary.rotary_dim = 66; }, KernelStatus::kInvalidShape,
         "rotary_dim");
  expect([](PagedDecodeCudaPlan* p) { p->rotary.write_cache = false; }, KernelStatus::kInvalidShape,
         "write_cache");
  expect([&](PagedDecodeCudaPlan* p) { p->rotary.fold_delta = delta.data(); },
         KernelStatus::kInvalidShape, "LoRA fold");
  expect([](PagedDecodeCudaPlan* p) { p->rotary.v_cache = p->rotary.k_cache; },
         KernelStatus::kInvalidShape, "caches");
  expect([](PagedDecodeCudaPlan* p) { p->rotary.slots = nullptr; }, KernelStatus::kNullPointer,
         "slots");
  expect([](PagedDecodeCudaPlan* p) { p->merge_counters_len = 1; }, KernelStatus::kInvalidShape,
         "counters");
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
