// The 1-row decode layer as one weight stream (kernels/cuda/decode_stream_cuda.h) over a chain of
// layers, against a naive double-precision reference of the same math with the dtype roundings
// at the same points (x, qkv, the activation, each h). The attention output of every layer is
// given (random; attn_heads 0, or the heads-done counter already at the target), so this tests
// the stream, the fold and the grid sums; the attention beside it is another kernel.
//
// Tolerances: the reference rounds the same values to the dtype, so the two differ by float32
// vs double accumulation (~1e-6 relative), the grid roundings of the sums (<= q_c / 2 an item,
// q_c <= max(|h_c|, rms h) 2^-16: ~1e-4 relative to h after ~1,300 items) and where those tip a
// dtype rounding the other way (one ulp of that element: 2^-8 bf16, 2^-11 fp16), and each tipped
// element feeds the next layer. Measured over 2-3 layers (perf-log 2026-11-30 19:31-19:39): norm
// rel up to 3.4e-3 in bf16 (~0.9 of its 2^-8 ulp) and 6.9e-4 in fp16 (~1.4 of its 2^-11 ulp; the
// grid rounding is a larger share of fp16's finer ulp); the bounds below are ~2x those.
//
// Exactness: the grid makes the sums independent of which block ran which item, so runs with
// different block counts (different item partitions) and repeated runs must agree bit for bit.
// q/k/v outputs start as NaN (an unwritten row shows up).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/cuda/decode_stream_cuda.h"
#include "kernels/device.h"
#include "kernels/gemm.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

struct StreamCase {
  int hidden, heads, kv_heads, head_dim, inter, layers;
  DataType dtype;
  GemmEpilogue act;
};

// One layer's host weights (rounded to the dtype) and device copies (fc2 / dense also transposed).
struct LayerData {
  std::vector<float> ln_w, ln_b, qkv_w, qkv_b, fc1_w, fc1_b, fc2_w, fc2_b, dense_w, dense_b, attn;
  DeviceBuffer d_ln_w, d_ln_b, d_qkv_w, d_qkv_b, d_fc1_w, d_fc1_b, d_fc2_wt, d_fc2_b, d_dense_wt,
      d_dense_b, d_attn;
};

// w [rows, cols] -> w^T [cols, rows].
std::vector<float> Transpose(const std::vector<float>& w, int rows, int cols) {
  std::vector<float> t(w.size());
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      t[static_cast<size_t>(c) * rows + r] = w[static_cast<size_t>(r) * cols + c];
    }
  }
  return t;
}

std::vector<float> Scaled(size_t n, uint32_t seed, float scale) {
  std::vector<float> v = RandomVector(n, seed);
  for (float& x : v) x *= scale;
  return v;
}

DeviceBuffer Upload(std::vector<float>& v, DataType t) {  // rounds v to t in place
  return DeviceBuffer::From(Encode(v, t));
}

std::vector<LayerData> MakeLayers(const StreamCase& c) {
  const int H = c.hidden, I = c.inter, NQ = (c.heads + 2 * c.kv_heads) * c.head_dim;
  const int A = c.heads * c.head_dim;
  std::vector<LayerData> layers(c.layers);
  for (int l = 0; l < c.layers; ++l) {
    LayerData& d = layers[l];
    const uint32_t s = 1000 * (l + 1);
    d.ln_w = RandomVector(H, s + 1, 0.5f, 1.5f);
    d.ln_b = Scaled(H, s + 2, 0.1f);
    d.qkv_w = Scaled(static_cast<size_t>(NQ) * H, s + 3, 1.0f / std::sqrt(static_cast<float>(H)));
    d.qkv_b = Scaled(NQ, s + 4, 0.1f);
    d.fc1_w = Scaled(static_cast<size_t>(I) * H, s + 5, 2.0f / std::sqrt(static_cast<float>(H)));
    d.fc1_b = Scaled(I, s + 6, 0.1f);
    d.fc2_w = Scaled(static_cast<size_t>(H) * I, s + 7, 1.0f / std::sqrt(static_cast<float>(I)));
    d.fc2_b = Scaled(H, s + 8, 0.1f);
    d.dense_w = Scaled(static_cast<size_t>(H) * A, s + 9, 1.0f / std::sqrt(static_cast<float>(A)));
    d.dense_b = Scaled(H, s + 10, 0.1f);
    d.attn = RandomVector(A, s + 11);
    d.d_ln_w = Upload(d.ln_w, c.dtype);
    d.d_ln_b = Upload(d.ln_b, c.dtype);
    d.d_qkv_w = Upload(d.qkv_w, c.dtype);
    d.d_qkv_b = Upload(d.qkv_b, c.dtype);
    d.d_fc1_w = Upload(d.fc1_w, c.dtype);
    d.d_fc1_b = Upload(d.fc1_b, c.dtype);
    Encode(d.fc2_w, c.dtype);
    Encode(d.dense_w, c.dtype);
    std::vector<float> fc2_wt = Transpose(d.fc2_w, H, I), dense_wt = Transpose(d.dense_w, H, A);
    d.d_fc2_wt = Upload(fc2_wt, c.dtype);
    d.d_dense_wt = Upload(dense_wt, c.dtype);
    d.d_fc2_b = Upload(d.fc2_b, c.dtype);
    d.d_dense_b = Upload(d.dense_b, c.dtype);
    d.d_attn = Upload(d.attn, c.dtype);
  }
  return layers;
}

float Round(double x, DataType t) {
  std::vector<float> v = {static_cast<float>(x)};
  Encode(v, t);
  return v[0];
}

// The reference chain: qkv of every layer and the final h.
void Reference(const StreamCase& c, const std::vector<LayerData>& layers, std::vector<float> h,
               std::vector<std::vector<float>>* qkv_out, std::vector<float>* h_out) {
  const int H = c.hidden, I = c.inter, NQ = (c.heads + 2 * c.kv_heads) * c.head_dim;
  const int A = c.heads * c.head_dim;
  qkv_out->assign(c.layers, {});
  for (int l = 0; l < c.layers; ++l) {
    const LayerData& d = layers[l];
    double mean = 0, var = 0;
    for (float v : h) mean += v;
    mean /= H;
    for (float v : h) var += (v - mean) * (v - mean);
    var /= H;
    std::vector<float> x(H);
    for (int i = 0; i < H; ++i) {
      x[i] = Round((h[i] - mean) / std::sqrt(var + 1e-5) * d.ln_w[i] + d.ln_b[i], c.dtype);
    }
    std::vector<float>& qkv = (*qkv_out)[l];
    qkv.resize(NQ);
    for (int r = 0; r < NQ; ++r) {
      double s = d.qkv_b[r];
      for (int i = 0; i < H; ++i)
        s += static_cast<double>(d.qkv_w[static_cast<size_t>(r) * H + i]) * x[i];
      qkv[r] = Round(s, c.dtype);
    }
    std::vector<float> g(I);
    for (int r = 0; r < I; ++r) {
      double s = d.fc1_b[r];
      for (int i = 0; i < H; ++i)
        s += static_cast<double>(d.fc1_w[static_cast<size_t>(r) * H + i]) * x[i];
      g[r] = Round(c.act == GemmEpilogue::kGeluErf ? testing_util::NaiveGeluErf(s)
                                                   : testing_util::NaiveGeluTanh(s),
                   c.dtype);
    }
    for (int o = 0; o < H; ++o) {
      double s = 0;
      for (int r = 0; r < I; ++r)
        s += static_cast<double>(d.fc2_w[static_cast<size_t>(o) * I + r]) * g[r];
      for (int j = 0; j < A; ++j)
        s += static_cast<double>(d.dense_w[static_cast<size_t>(o) * A + j]) * d.attn[j];
      h[o] = Round(h[o] + s + d.dense_b[o] + d.fc2_b[o], c.dtype);
    }
  }
  *h_out = h;
}

struct RunOut {
  std::vector<char> qkv, h, sums;
  std::vector<int32_t> counters;
};

// The chain on the device: layer l reads h_{l-1} (h[l - 1]) and writes h_l (h[l]; layer 0's h_0
// is the embedding row in h[0]); the fold after the last layer writes h[layers].
RunOut RunChain(const StreamCase& c, const std::vector<LayerData>& layers,
                const std::vector<char>& h0, int blocks, bool heads_preset) {
  const int H = c.hidden, NQ = (c.heads + 2 * c.kv_heads) * c.head_dim, L = c.layers;
  const size_t es = DataTypeSize(c.dtype);
  DeviceBuffer h(es * H * (L + 1)), qkv(es * NQ * L);
  DeviceBuffer sums(sizeof(float) * kDecodeStreamCopies * H * L);
  DeviceBuffer counters(sizeof(int32_t) * kDecodeStreamCounterInts * L);
  h.Poison();
  qkv.Poison();
  EXPECT_EQ(DeviceMemset(sums.get(), 0, sums.bytes(), nullptr), 0);
  std::vector<int32_t> ctr(static_cast<size_t>(kDecodeStreamCounterInts) * L, 0);
  if (heads_preset) {
    for (int l = 0; l < L; ++l) ctr[l * kDecodeStreamCounterInts + kStreamHeadsDone] = c.heads;
  }
  counters.Upload(ctr.data(), ctr.size() * sizeof(int32_t));
  h.Upload(h0.data(), h0.size());
  auto hp = [&](int l) { return h.as<char>() + es * H * l; };
  auto sp = [&](int l) {
    return sums.as<float>() + static_cast<size_t>(kDecodeStreamCopies) * H * l;
  };
  auto cp = [&](int l) { return counters.as<int32_t>() + kDecodeStreamCounterInts * l; };
  for (int l = 0; l < L; ++l) {
    const LayerData& d = layers[l];
    DecodeStreamParams p;
    p.layer = DecodeStreamLayer{.ln_w = d.d_ln_w.get(),
                                .ln_b = d.d_ln_b.get(),
                                .qkv_w = d.d_qkv_w.get(),
                                .qkv_b = d.d_qkv_b.get(),
                                .fc1_w = d.d_fc1_w.get(),
                                .fc1_b = d.d_fc1_b.get(),
                                .fc2_wt = d.d_fc2_wt.get(),
                                .dense_wt = d.d_dense_wt.get(),
                                .h_in = hp(l == 0 ? 0 : l - 1),
                                .sums_in = l == 0 ? nullptr : sp(l - 1),
                                .prev_dense_b = l == 0 ? nullptr : layers[l - 1].d_dense_b.get(),
                                .prev_fc2_b = l == 0 ? nullptr : layers[l - 1].d_fc2_b.get(),
                                .prev_counters = l == 0 ? nullptr : cp(l - 1),
                                .h_out = hp(l),
                                .qkv = qkv.as<char>() + es * NQ * l,
                                .attn = d.d_attn.get(),
                                .sums = sp(l),
                                .counters = cp(l)};
    p.hidden = H;
    p.intermediate = c.inter;
    p.num_heads = c.heads;
    p.num_kv_heads = c.kv_heads;
    p.head_dim = c.head_dim;
    p.act = c.act;
    p.dtype = c.dtype;
    p.attn_heads = heads_preset ? c.heads : 0;
    p.blocks = blocks;
    p.programmatic_launch = l > 0;
    EXPECT_TRUE(DecodeStreamCudaSupports(p));
    EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kOk) << "layer " << l;
  }
  DecodeStreamFoldParams f;
  f.h_in = hp(L - 1);
  f.sums = sp(L - 1);
  f.dense_b = layers[L - 1].d_dense_b.get();
  f.fc2_b = layers[L - 1].d_fc2_b.get();
  f.h_out = hp(L);
  f.hidden = H;
  f.dtype = c.dtype;
  EXPECT_EQ(DecodeStreamFoldCuda(f, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  RunOut out;
  out.qkv = qkv.DownloadBytes();
  out.h = h.DownloadBytes();
  out.sums = sums.DownloadBytes();
  std::vector<char> cb = counters.DownloadBytes();
  out.counters.resize(cb.size() / sizeof(int32_t));
  std::memcpy(out.counters.data(), cb.data(), cb.size());
  return out;
}

// Each layer's S as the next fold reads it: the copies added in order (float32).
std::vector<float> LayerSums(const RunOut& r, int H, int L) {
  std::vector<float> s(static_cast<size_t>(H) * L, 0.0f);
  const float* f = reinterpret_cast<const float*>(r.sums.data());
  for (int l = 0; l < L; ++l) {
    for (int c = 0; c < kDecodeStreamCopies; ++c) {
      for (int i = 0; i < H; ++i) {
        s[static_cast<size_t>(l) * H + i] +=
            f[(static_cast<size_t>(l) * kDecodeStreamCopies + c) * H + i];
      }
    }
  }
  return s;
}

int SmCount() {
  int dev = 0;
  DeviceProps props;
  EXPECT_EQ(DeviceGetCurrent(&dev), 0);
  EXPECT_EQ(DeviceGetProps(dev, &props), 0);
  return props.multiprocessors;
}

void RunCase(const StreamCase& c) {
  PHI_REQUIRE_GPU();
  const int H = c.hidden, NQ = (c.heads + 2 * c.kv_heads) * c.head_dim, L = c.layers;
  SCOPED_TRACE("hidden " + std::to_string(H) + " heads " + std::to_string(c.heads) + "/" +
               std::to_string(c.kv_heads) + " x " + std::to_string(c.head_dim) + " inter " +
               std::to_string(c.inter) + " " + DataTypeName(c.dtype));
  std::vector<LayerData> layers = MakeLayers(c);
  std::vector<float> h0 = Scaled(H, 7, 2.0f);
  const std::vector<char> h0_bytes = Encode(h0, c.dtype);
  std::vector<std::vector<float>> ref_qkv;
  std::vector<float> ref_h;
  Reference(c, layers, h0, &ref_qkv, &ref_h);

  const int sms = SmCount();
  const RunOut a = RunChain(c, layers, h0_bytes, 0, false);
  // q/k/v of every layer and the final h against the reference.
  const double tol = c.dtype == DataType::kBF16 ? 8e-3 : 1.5e-3;
  const std::vector<float> qkv = gpu_test::Decode(a.qkv, c.dtype);
  for (int l = 0; l < L; ++l) {
    const std::vector<float> got(qkv.begin() + static_cast<size_t>(NQ) * l,
                                 qkv.begin() + static_cast<size_t>(NQ) * (l + 1));
    const gpu_test::Diff d = gpu_test::Compare(got, ref_qkv[l]);
    EXPECT_EQ(d.nonfinite, 0u) << "layer " << l << " q/k/v rows unwritten";
    EXPECT_LT(d.rel, tol) << "layer " << l << " q/k/v: " << gpu_test::ToString(d);
    std::printf("layer %d q/k/v: %s\n", l, gpu_test::ToString(d).c_str());
  }
  const std::vector<float> h = gpu_test::Decode(a.h, c.dtype);
  const std::vector<float> h_last(h.begin() + static_cast<size_t>(H) * L, h.end());
  const gpu_test::Diff dh = gpu_test::Compare(h_last, ref_h);
  EXPECT_EQ(dh.nonfinite, 0u);
  EXPECT_LT(dh.rel, tol) << "final h: " << gpu_test::ToString(dh);
  std::printf("final h: %s\n", gpu_test::ToString(dh).c_str());
  // Counters: every item taken once plus one end per block, every block done, every q/k/v chunk
  // published; the heads-done counter is the attention's and stays as it was.
  const int R = H / 256;
  const int items = NQ / R + c.inter / R + c.heads * c.head_dim / R;
  for (int l = 0; l < L; ++l) {
    const int32_t* ctr = a.counters.data() + kDecodeStreamCounterInts * l;
    EXPECT_EQ(ctr[kStreamNext], items + sms) << "layer " << l;
    EXPECT_EQ(ctr[kStreamBlocksDone], sms) << "layer " << l;
    EXPECT_EQ(ctr[kStreamQkvDone], NQ / R) << "layer " << l;
    EXPECT_EQ(ctr[kStreamHeadsDone], 0) << "layer " << l;
  }

  // Bit identity: again with the same grid, and with 7 blocks (another item partition, the
  // dense chunks now waiting on a heads-done counter already at its target).
  const RunOut b = RunChain(c, layers, h0_bytes, 0, false);
  const RunOut s7 = RunChain(c, layers, h0_bytes, 7, true);
  const std::vector<float> sa = LayerSums(a, H, L);
  for (const RunOut* o : {&b, &s7}) {
    const char* what = o == &b ? "repeat" : "7 blocks";
    EXPECT_TRUE(o->qkv == a.qkv) << what << ": q/k/v bits differ";
    EXPECT_TRUE(o->h == a.h) << what << ": h bits differ";
    const std::vector<float> so = LayerSums(*o, H, L);
    EXPECT_EQ(std::memcmp(so.data(), sa.data(), sa.size() * sizeof(float)), 0)
        << what << ": layer sums differ";
  }
  EXPECT_EQ(s7.counters[kStreamBlocksDone], 7);
}

TEST(CudaDecodeStream, SmallBf16) {
  RunCase({256, 8, 8, 32, 1024, 3, DataType::kBF16, GemmEpilogue::kGeluTanh});
}
TEST(CudaDecodeStream, SmallF16Erf) {
  RunCase({256, 8, 8, 32, 1024, 3, DataType::kF16, GemmEpilogue::kGeluErf});
}
TEST(CudaDecodeStream, GqaHeadDim64) {
  RunCase({512, 8, 2, 64, 2048, 3, DataType::kBF16, GemmEpilogue::kGeluTanh});
}
TEST(CudaDecodeStream, Phi15Shape) {
  RunCase({2048, 32, 32, 64, 8192, 2, DataType::kF16, GemmEpilogue::kGeluTanh});
}
TEST(CudaDecodeStream, Phi2Shape) {
  RunCase({2560, 32, 32, 80, 10240, 2, DataType::kBF16, GemmEpilogue::kGeluTanh});
}

TEST(CudaDecodeStream, RefusesWhatItDoesNotHandle) {
  PHI_REQUIRE_GPU();
  DecodeStreamParams p;
  p.hidden = 2560;
  p.intermediate = 10240;
  p.num_heads = p.num_kv_heads = 32;
  p.head_dim = 80;
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kNullPointer);
  p.hidden = 2304;  // 256 x 9: no instance
  EXPECT_FALSE(DecodeStreamCudaSupports(p));
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kInvalidShape);
  p.hidden = 2560;
  p.intermediate = 10245;  // not a multiple of R = 10
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kInvalidShape);
  p.intermediate = 10240;
  p.dtype = DataType::kF32;
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kBF16;
  p.act = GemmEpilogue::kNone;
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kInvalidShape);
  p.act = GemmEpilogue::kGeluTanh;
  p.stages = 9;
  EXPECT_EQ(DecodeStreamLayerCuda(p, nullptr), KernelStatus::kInvalidShape);
  DecodeStreamFoldParams f;
  f.hidden = 2560;
  EXPECT_EQ(DecodeStreamFoldCuda(f, nullptr), KernelStatus::kNullPointer);
  f.hidden = 12;
  EXPECT_EQ(DecodeStreamFoldCuda(f, nullptr), KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace phishard
