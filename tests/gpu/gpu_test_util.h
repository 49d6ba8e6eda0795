// Helpers for the CUDA tests: device buffers, 16-bit conversions (so the CPU reference sees the
// exact values the device sees), NaN poisoning and the ‖out − ref‖ / ‖ref‖ comparison.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "model/safetensors.h"

namespace phishard::gpu_test {

// Skips the test on a machine without a visible CUDA device (CPU CI has the toolkit only).
#define PHI_REQUIRE_GPU()                                      \
  do {                                                         \
    int phi_n_ = 0;                                            \
    ::phishard::DeviceGetCount(&phi_n_);                       \
    if (phi_n_ == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

#define PHI_ASSERT_CUDA(expr)                                                       \
  do {                                                                              \
    const int phi_e_ = (expr);                                                      \
    ASSERT_EQ(phi_e_, 0) << #expr << ": " << ::phishard::DeviceErrorString(phi_e_); \
  } while (0)

inline uint16_t ToBits(float f, DataType t) {
  return t == DataType::kBF16 ? FloatToBF16(f) : FloatToHalf(f);
}
inline float FromBits(uint16_t b, DataType t) {
  return t == DataType::kBF16 ? BF16ToFloat(b) : HalfToFloat(b);
}

// The device representation of `v` in dtype `t` (f32: the floats themselves); `v` is rounded in
// place to the values that representation holds, so the CPU reference computes on them.
inline std::vector<char> Encode(std::vector<float>& v, DataType t) {
  std::vector<char> bytes(v.size() * DataTypeSize(t));
  if (t == DataType::kF32) {
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return bytes;
  }
  auto* b = reinterpret_cast<uint16_t*>(bytes.data());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = ToBits(v[i], t);
    v[i] = FromBits(b[i], t);
  }
  return bytes;
}

inline std::vector<float> Decode(const std::vector<char>& bytes, DataType t) {
  const size_t n = bytes.size() / DataTypeSize(t);
  std::vector<float> v(n);
  if (t == DataType::kF32) {
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
  }
  const auto* b = reinterpret_cast<const uint16_t*>(bytes.data());
  for (size_t i = 0; i < n; ++i) v[i] = FromBits(b[i], t);
  return v;
}

// Owns a device allocation. Upload/Download are synchronous (legacy stream + sync).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0 && DeviceMalloc(&ptr_, bytes_) != 0) {
      ptr_ = nullptr;
      ADD_FAILURE() << "cudaMalloc of " << bytes_ << " bytes failed";
    }
  }
  template <typename T>
  static DeviceBuffer From(const std::vector<T>& host) {
    DeviceBuffer b(host.size() * sizeof(T));
    b.Upload(host.data(), b.bytes_);
    return b;
  }
  ~DeviceBuffer() {
    if (ptr_) DeviceFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

  void Upload(const void* src, size_t n) {
    ASSERT_LE(n, bytes_);
    if (n == 0) return;
    PHI_ASSERT_CUDA(DeviceCopyToDevice(ptr_, src, n, nullptr));
    PHI_ASSERT_CUDA(DeviceStreamSync(nullptr));
  }
  // Every byte 0xFF: NaN in f32, f16 and bf16 alike.
  void Poison() {
    PHI_ASSERT_CUDA(DeviceMemset(ptr_, 0xFF, bytes_, nullptr));
    PHI_ASSERT_CUDA(DeviceStreamSync(nullptr));
  }
  std::vector<char> DownloadBytes() const {
    std::vector<char> out(bytes_);
    if (bytes_ == 0) return out;
    EXPECT_EQ(DeviceCopyToHost(out.data(), ptr_, bytes_, nullptr), 0);
    EXPECT_EQ(DeviceStreamSync(nullptr), 0);
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Waits for `stream` and checks that no launch or execution error happened.
inline void ExpectDeviceClean(cudaStream_t stream) {
  const int sync = DeviceStreamSync(stream);
  EXPECT_EQ(sync, 0) << DeviceErrorString(sync);
  const int last = DeviceGetLastError();
  EXPECT_EQ(last, 0) << DeviceErrorString(last);
}

struct Diff {
  double rel = 0;        // ‖out − ref‖₂ / ‖ref‖₂
  double max_abs = 0;    // max |out − ref|
  size_t nonfinite = 0;  // elements of out that are NaN/Inf (unwritten poison shows up here)
  size_t worst = 0;      // index of max_abs
};

inline Diff Compare(const std::vector<float>& out, const std::vector<float>& ref) {
  Diff d;
  double num = 0, den = 0;
  EXPECT_EQ(out.size(), ref.size());
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) {
      ++d.nonfinite;
      continue;
    }
    const double e = static_cast<double>(out[i]) - ref[i];
    num += e * e;
    den += static_cast<double>(ref[i]) * ref[i];
    if (std::fabs(e) > d.max_abs) {
      d.max_abs = std::fabs(e);
      d.worst = i;
    }
  }
  d.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

// Compares the first n columns of m rows stored with leading dimension ld ([m, ld] row-major).
inline Diff CompareRows(const std::vector<float>& out, const std::vector<float>& ref, int m, int n,
                        int ld) {
  std::vector<float> o, r;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      o.push_back(out[static_cast<size_t>(i) * ld + j]);
      r.push_back(ref[static_cast<size_t>(i) * ld + j]);
    }
  }
  return Compare(o, r);
}

// Columns [n, ld) of out [m, ld] (row-major) after a launch that writes only [m, n]: each must
// still hold `before`'s value (a launch accumulating into y), or the NaN poison when `before` is
// null. Fatal at the first changed column.
inline void ExpectPaddingUntouched(const std::vector<float>& out, int m, int n, int ld,
                                   const std::vector<float>* before) {
  for (int i = 0; i < m; ++i) {
    for (int j = n; j < ld; ++j) {
      const size_t idx = static_cast<size_t>(i) * ld + j;
      if (before != nullptr) {
        ASSERT_EQ(out[idx], (*before)[idx]) << "padding column " << j << " changed";
      } else {
        ASSERT_TRUE(std::isnan(out[idx])) << "padding column " << j << " written";
      }
    }
  }
}

inline std::string ToString(const Diff& d) {
  return "rel " + std::to_string(d.rel) + ", max_abs " + std::to_string(d.max_abs) + " at " +
         std::to_string(d.worst) + ", nonfinite " + std::to_string(d.nonfinite);
}

// Tolerance on ‖out − ref‖ / ‖ref‖ for an op whose device inputs equal the reference's inputs and
// whose output is rounded once to the storage type: the rounding unit is 2^-9 = 1.95e-3 (bf16)
// or 2^-11 = 4.9e-4 (fp16) relative per element, so a correct kernel stays under it; 4x that
// leaves room for float32 summation-order effects and one extra internal rounding (e.g. the
// attention probabilities, which the tensor-core path rounds to the storage type).
inline double OneRoundingTol(DataType t) {
  return t == DataType::kBF16 ? 8e-3 : (t == DataType::kF16 ? 2e-3 : 1e-5);
}

}  // namespace phishard::gpu_test
