// Result of every kernel entry point. Kernels never throw or abort: a bad shape, a null pointer,
// an index out of range or an unsupported dtype comes back as one of these codes, and the caller
// (model/) turns it into an absl::Status naming the op.
#pragma once

namespace phishard {

enum class KernelStatus {
  kOk = 0,
  kInvalidShape,      // a size is <= 0 or sizes disagree with each other
  kNullPointer,       // a required pointer is null
  kOutOfRange,        // an index read from memory (token id, slot, block id) is out of range
  kUnsupportedDtype,  // this entry point does not implement the params' dtype
  kDeviceError,       // CUDA launch or library error (CUDA entry points only)
};

inline constexpr const char* KernelStatusName(KernelStatus s) {
  switch (s) {
    case KernelStatus::kOk:
      return "ok";
    case KernelStatus::kInvalidShape:
      return "invalid shape";
    case KernelStatus::kNullPointer:
      return "null pointer";
    case KernelStatus::kOutOfRange:
      return "index out of range";
    case KernelStatus::kUnsupportedDtype:
      return "unsupported dtype";
    case KernelStatus::kDeviceError:
      return "device error";
  }
  return "unknown kernel status";
}

}  // namespace phishard
