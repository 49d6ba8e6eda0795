// RotaryKvWriteCuda with the fold (RotaryKvWriteParams::fold_delta; the LoRA decode step's q / k /
// v deltas folded in by the rotary, model/cuda_lora.h FoldIntoRotary): the model relies on it
// giving the bits of the fold (SgmvFoldCuda into qkv) followed by the plain launch, so qkv and
// both caches are compared bit for bit against the plain launch on the host's x + delta rounded
// once (round to nearest even, as the device's conversion). The plain launch is checked against
// the CPU reference by cuda_ops_test. With write_cache = false (a prefill whose attention stores
// the K/V) the folded launch takes the row kernel and the plain one the rotation-only kernel, so
// the bit-for-bit check also ties those two together; both caches must stay untouched.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

constexpr DataType kAllTypes[] = {DataType::kBF16, DataType::kF16, DataType::kF32};

struct Shape {
  int heads, kv_heads, head_dim, rotary_dim;
};

void CheckRotaryFold(DataType t, const Shape& s, int tokens, int extra_ld, bool write_cache) {
  SCOPED_TRACE(testing::Message() << DataTypeName(t) << " heads " << s.heads << "/" << s.kv_heads
                                  << " head_dim " << s.head_dim << " rotary " << s.rotary_dim
                                  << " tokens " << tokens << " ld +" << extra_ld << " write_cache "
                                  << write_cache);
  const int width = (s.heads + 2 * s.kv_heads) * s.head_dim;
  const int stride = width + 16;  // columns past q | k | v stay as they are
  const int ld = width + extra_ld;
  const int num_slots = 2 * tokens + 8;
  std::vector<float> qkv = RandomVector(static_cast<size_t>(tokens) * stride, tokens + width);
  std::vector<float> delta =
      RandomVector(static_cast<size_t>(tokens) * ld, 3 * width, -1e-2f, 1e-2f);
  for (int c = 0; c < ld; ++c) delta[c] = -0.0f;  // a row without an adapter: unchanged
  std::vector<int32_t> positions(tokens);
  std::vector<int64_t> slots(tokens);
  for (int i = 0; i < tokens; ++i) {
    positions[i] = (37 * i) % 1500;
    slots[i] = i == tokens - 1 && tokens > 1 ? -1 : 2 * i + 1;  // the last: a padding row
  }
  const std::vector<char> qkv_bytes = Encode(qkv, t);
  std::vector<float> folded = qkv;
  for (int r = 0; r < tokens; ++r) {
    for (int c = 0; c < width; ++c) {
      folded[static_cast<size_t>(r) * stride + c] += delta[static_cast<size_t>(r) * ld + c];
    }
  }
  const std::vector<char> folded_bytes = Encode(folded, t);
  DeviceBuffer d_a = DeviceBuffer::From(qkv_bytes), d_b = DeviceBuffer::From(folded_bytes);
  DeviceBuffer d_delta = DeviceBuffer::From(delta);
  DeviceBuffer d_pos = DeviceBuffer::From(positions), d_slots = DeviceBuffer::From(slots);
  const size_t cache_bytes =
      static_cast<size_t>(num_slots) * s.kv_heads * s.head_dim * DataTypeSize(t);
  DeviceBuffer ka(cache_bytes), va(cache_bytes), kb(cache_bytes), vb(cache_bytes);
  for (DeviceBuffer* b : {&ka, &va, &kb, &vb}) b->Poison();
  const std::vector<char> poisoned = ka.DownloadBytes();
  RotaryKvWriteParams p{.qkv = d_a.get(),
                        .positions = d_pos.as<int32_t>(),
                        .slots = d_slots.as<int64_t>(),
                        .k_cache = ka.get(),
                        .v_cache = va.get(),
                        .num_slots = num_slots,
                        .block_size = 2,  // divides num_slots; any block size holds the layout
                        .num_tokens = tokens,
                        .qkv_stride = stride,
                        .num_heads = s.heads,
                        .num_kv_heads = s.kv_heads,
                        .head_dim = s.head_dim,
                        .rotary_dim = s.rotary_dim,
                        .theta = 10000.0f,
                        .dtype = t,
                        .fold_delta = d_delta.as<float>(),
                        .ld_fold = ld,
                        .write_cache = write_cache};
  ASSERT_EQ(RotaryKvWriteCuda(p, nullptr), KernelStatus::kOk);
  RotaryKvWriteParams plain = p;
  plain.qkv = d_b.get();
  plain.k_cache = kb.get();
  plain.v_cache = vb.get();
  plain.fold_delta = nullptr;
  plain.ld_fold = 0;
  ASSERT_EQ(RotaryKvWriteCuda(plain, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<char> a = d_a.DownloadBytes(), b = d_b.DownloadBytes();
  EXPECT_TRUE(a == b) << "qkv differs from the plain launch on the folded input";
  EXPECT_TRUE(ka.DownloadBytes() == kb.DownloadBytes()) << "K cache differs";
  EXPECT_TRUE(va.DownloadBytes() == vb.DownloadBytes()) << "V cache differs";
  if (!write_cache) {
    EXPECT_TRUE(ka.DownloadBytes() == poisoned) << "K cache written with write_cache = false";
    EXPECT_TRUE(va.DownloadBytes() == poisoned) << "V cache written with write_cache = false";
  } else if (tokens > 1) {
    EXPECT_TRUE(ka.DownloadBytes() != poisoned);  // the cache write happened
  }
  if (tokens > 1) {
    EXPECT_TRUE(folded_bytes != qkv_bytes);  // the fold changed something
  }
}

TEST(CudaRotaryFold, EqualsFoldThenPlainLaunchBitForBit) {
  PHI_REQUIRE_GPU();
  // Phi-2 (32 heads of 80, rotary 32) and Phi-1.5 (64, rotary 32): 16-byte Packs; head_dim 12 /
  // rotary 4: the element-wise path for 16-bit types. 64 tokens: decode (several head groups a
  // token); 600: whole-row blocks. ld + 20480: the model's delta buffer stride (fc1, dense after).
  const Shape shapes[] = {{32, 32, 80, 32}, {32, 32, 64, 32}, {4, 2, 12, 4}};
  for (DataType t : kAllTypes) {
    for (const Shape& s : shapes) {
      for (bool write_cache : {true, false}) {
        for (int tokens : {1, 64, 600}) CheckRotaryFold(t, s, tokens, 0, write_cache);
        CheckRotaryFold(t, s, 64, 10240 + 2560, write_cache);
      }
    }
  }
}

TEST(CudaRotaryFold, RejectsShortDeltaRows) {
  PHI_REQUIRE_GPU();
  DeviceBuffer qkv(4 * 48 * 2), delta(4 * 48 * 4), pos(4 * 4), slots(4 * 8), cache(64 * 16 * 2);
  RotaryKvWriteParams p{.qkv = qkv.get(),
                        .positions = pos.as<int32_t>(),
                        .slots = slots.as<int64_t>(),
                        .k_cache = cache.get(),
                        .v_cache = cache.get(),
                        .num_slots = 64,
                        .block_size = 16,
                        .num_tokens = 4,
                        .num_heads = 1,
                        .num_kv_heads = 1,
                        .head_dim = 16,
                        .rotary_dim = 8,
                        .dtype = DataType::kBF16,
                        .fold_delta = delta.as<float>(),
                        .ld_fold = 47};
  EXPECT_EQ(RotaryKvWriteCuda(p, nullptr), KernelStatus::kInvalidShape);
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
