// LayerNormCuda with a residual fold (LayerNormParams::fold_delta; the LoRA decode step's dense
// delta folded into the next layer's LayerNorm, model/cuda_lora.h BeforeDense): x becomes
// x + delta (float32 add, one rounding to the dtype) and y the LayerNorm of that x. The model
// relies on this giving the bits of the fold (SgmvFoldCuda into h) followed by a plain
// LayerNormCuda, so both outputs are compared bit for bit: x against the host's float32 add
// rounded once (round to nearest even, as the device's conversion), y against a plain
// LayerNormCuda launch on that x (which cuda_ops_test checks against the CPU reference).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cuda/layer_norm_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

constexpr DataType kAllTypes[] = {DataType::kBF16, DataType::kF16, DataType::kF32};

void CheckFold(DataType t, int rows, int cols, int ld_fold) {
  SCOPED_TRACE(testing::Message() << DataTypeName(t) << " rows " << rows << " cols " << cols
                                  << " ld_fold " << ld_fold);
  // h in [2, 4] (offset mean, as cuda_ops_test), deltas ~1e-2 (a LoRA delta's size against h):
  // the rounding of h + delta then differs from h's in most elements.
  std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, rows + cols, 2, 4);
  std::vector<float> w = RandomVector(cols, 3 * cols, 0.5f, 1.5f);
  std::vector<float> b = RandomVector(cols, 5 * cols);
  std::vector<float> delta =
      RandomVector(static_cast<size_t>(rows) * ld_fold, 7 * cols, -1e-2f, 1e-2f);
  // Row 0 as the delta-only kernel writes rows without an adapter: -0.0f (h unchanged).
  for (int c = 0; c < ld_fold; ++c) delta[c] = -0.0f;
  const std::vector<char> x_bytes = Encode(x, t);  // x now holds the device's values
  // The expected folded h: one float32 add, rounded once to the dtype.
  std::vector<float> folded(x.size());
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      folded[static_cast<size_t>(r) * cols + c] =
          x[static_cast<size_t>(r) * cols + c] + delta[static_cast<size_t>(r) * ld_fold + c];
    }
  }
  const std::vector<char> folded_bytes = Encode(folded, t);
  DeviceBuffer d_x = DeviceBuffer::From(x_bytes);
  DeviceBuffer d_x2 = DeviceBuffer::From(folded_bytes);
  DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
  DeviceBuffer d_b = DeviceBuffer::From(Encode(b, t));
  DeviceBuffer d_delta = DeviceBuffer::From(delta);
  DeviceBuffer d_y(x_bytes.size()), d_y2(x_bytes.size());
  d_y.Poison();
  d_y2.Poison();
  LayerNormParams p{.x = d_x.get(),
                    .weight = d_w.get(),
                    .bias = d_b.get(),
                    .y = d_y.get(),
                    .rows = rows,
                    .cols = cols,
                    .eps = 1e-5f,
                    .dtype = t,
                    .fold_delta = d_delta.as<float>(),
                    .ld_fold = ld_fold};
  ASSERT_EQ(LayerNormCuda(p, nullptr), KernelStatus::kOk);
  LayerNormParams plain = p;
  plain.x = d_x2.get();
  plain.y = d_y2.get();
  plain.fold_delta = nullptr;
  plain.ld_fold = 0;
  ASSERT_EQ(LayerNormCuda(plain, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  EXPECT_TRUE(d_x.DownloadBytes() == folded_bytes) << "x is not x + delta rounded once";
  const std::vector<char> y = d_y.DownloadBytes(), y2 = d_y2.DownloadBytes();
  EXPECT_TRUE(y == y2) << "y differs from a plain LayerNorm of the folded x";
  // And not vacuously: the fold changed h somewhere (row 0 alone has only -0.0f deltas).
  if (rows > 1) EXPECT_TRUE(folded_bytes != x_bytes);
  const std::vector<float> yf = Decode(y, t);
  for (float v : yf) ASSERT_TRUE(std::isfinite(v));
}

TEST(CudaLayerNormFold, EqualsFoldThenPlainLayerNormBitForBit) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    // 2560 (Phi-2) / 2048 (Phi-1.5): the vector kernel with the fold inside, decode row counts;
    // 1100 rows: the separate fold kernel, then the warp-per-row LayerNorm; 81 columns: not in
    // 16-byte packs (fold kernel + element-wise LayerNorm); ld_fold not a multiple of 4: delta
    // rows off 16-byte alignment (fold kernel + vector LayerNorm).
    for (int cols : {2560, 2048, 81}) {
      for (int rows : {1, 64, 200, 1100}) {
        if (rows == 1100 && cols != 2560) continue;
        CheckFold(t, rows, cols, cols);
      }
      CheckFold(t, 64, cols, cols + 7680 + 10240);  // the model's delta buffer stride (Phi-2)
      CheckFold(t, 33, cols, cols + 3);
    }
  }
}

TEST(CudaLayerNormFold, RejectsInPlaceAndShortDeltaRows) {
  PHI_REQUIRE_GPU();
  DeviceBuffer d_x(64 * 256 * 2), d_y(64 * 256 * 2), d_w(256 * 2), d_delta(64 * 256 * 4);
  LayerNormParams p{.x = d_x.get(),
                    .weight = d_w.get(),
                    .bias = d_w.get(),
                    .y = d_x.get(),
                    .rows = 64,
                    .cols = 256,
                    .dtype = DataType::kBF16,
                    .fold_delta = d_delta.as<float>()};
  EXPECT_EQ(LayerNormCuda(p, nullptr), KernelStatus::kInvalidShape);  // y == x
  p.y = d_y.get();
  p.ld_fold = 255;
  EXPECT_EQ(LayerNormCuda(p, nullptr), KernelStatus::kInvalidShape);  // rows shorter than cols
  p.ld_fold = 0;
  EXPECT_EQ(LayerNormCuda(p, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
