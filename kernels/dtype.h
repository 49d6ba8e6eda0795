// Element types a kernel params struct can describe. The CPU reference ops compute in float32 and
// accept kF32 only; the CUDA ops accept kF16/kBF16 (and kF32 where noted) over the same structs.
// No Abseil here: kernels/ stays framework-free.
#pragma once

#include <cstddef>

namespace phishard {

enum class DataType { kF32, kF16, kBF16 };

inline constexpr size_t DataTypeSize(DataType t) { return t == DataType::kF32 ? 4 : 2; }

inline constexpr const char* DataTypeName(DataType t) {
  switch (t) {
    case DataType::kF32:
      return "f32";
    case DataType::kF16:
      return "f16";
    case DataType::kBF16:
      return "bf16";
  }
  return "unknown";
}

}  // namespace phishard
