// PyTorch checkpoints (`torch.save` of a state dict: pytorch_model.bin, adapter_model.bin, *.pt)
// read without Python, mmapped like safetensors (model/safetensors.h).
//
// Format (torch >= 1.6, the zip container): an uncompressed ("stored") ZIP archive, ZIP64 when
// large, holding
//   <archive>/data.pkl      the state dict, pickled (protocol 2; newer writers may use up to 5)
//   <archive>/data/<key>    each storage's raw little-endian bytes
//   <archive>/byteorder     "little" (absent in older files: little)
// In data.pkl every tensor is torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
// requires_grad, hooks[, metadata]) with the storage a persistent id ('storage', <dtype class
// e.g. torch.BFloat16Storage>, key, location, numel).
//
// This is a restricted unpickler, not Python's: it knows exactly the opcodes and the globals a
// state dict needs (collections.OrderedDict, the tensor / parameter rebuild functions, the storage
// classes) and refuses anything else with INVALID_ARGUMENT naming it, so a malicious pickle can
// do nothing but fail. Every offset, length and count is checked against the file before use.
// Tensors must be contiguous views of their storage (state dicts are); F32 / F16 / BF16 are
// readable, other dtypes (I64 position ids, BOOL masks) are listed as unsupported, as in
// safetensors files. The legacy pre-1.6 format (a bare pickle stream) is refused by name.
#pragma once

#include <filesystem>
#include <memory>

#include "absl/status/statusor.h"
#include "model/safetensors.h"

namespace phishard {

class TorchCheckpointFile : public WeightFile {
 public:
  static absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> Open(
      const std::filesystem::path& path);

 private:
  TorchCheckpointFile() = default;
};

}  // namespace phishard
