// Safetensors reader: mmapped files, single or sharded (model.safetensors.index.json).
// Every header field is validated before any tensor is touched (offsets in range, shape x dtype
// size == byte length, no overlapping ranges, no duplicate names across files): a malformed file
// is an absl::Status naming the file and tensor, never a crash. Tensors of dtypes other than
// F32/F16/BF16 are validated too but only fail when read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace phishard {

enum class DType { kF32, kF16, kBF16 };
std::string_view DTypeName(DType d);  // "F32", "F16", "BF16"
size_t DTypeSize(DType d);

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;  // host, points into the mmapped file; nbytes long
  size_t nbytes = 0;
  std::string file;  // file this tensor lives in (for error messages)
  int64_t numel() const;
};

// One mmapped weight file: a .safetensors file (SafetensorsFile) or a PyTorch checkpoint
// (TorchCheckpointFile, model/torch_checkpoint.h).
class WeightFile {
 public:
  virtual ~WeightFile();
  WeightFile(const WeightFile&) = delete;
  WeightFile& operator=(const WeightFile&) = delete;

  // Tensors phishard can read (F32, F16, BF16).
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // Well-formed tensors of any other dtype, name -> dtype ("I64", "BOOL", ...): range-checked
  // like the others, never readable (see UnsupportedDTypeBits).
  const std::map<std::string, std::string>& unsupported() const { return unsupported_; }
  const std::filesystem::path& path() const { return path_; }

 protected:
  WeightFile() = default;
  // Maps `path` read-only into map_ / map_size_ (path_ set); `where` names it in errors, and a
  // file shorter than min_bytes is INVALID_ARGUMENT.
  absl::Status Map(const std::filesystem::path& path, const std::string& where, uint64_t min_bytes);

  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> unsupported_;
};

// One mmapped .safetensors file.
class SafetensorsFile : public WeightFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);

 private:
  SafetensorsFile() = default;
};

// A weight file: a ZIP archive or a *.bin / *.pt / *.pth as a PyTorch checkpoint
// (pytorch_model.bin, adapter_model.bin), anything else as SafetensorsFile.
absl::StatusOr<std::unique_ptr<WeightFile>> OpenWeightFile(const std::filesystem::path& path);

// All weights of a model directory: model.safetensors when both it and an index exist (Hugging
// Face's order), else model.safetensors.index.json when present (only the files it names), else
// every *.safetensors file in the directory; without any of them the same for PyTorch
// checkpoints (pytorch_model.bin, pytorch_model.bin.index.json, every *.bin). A name in two
// files is an error.
class WeightStore {
 public:
  static absl::StatusOr<std::unique_ptr<WeightStore>> OpenDir(const std::filesystem::path& dir);
  // Opens exactly the given files (tests, adapters).
  static absl::StatusOr<std::unique_ptr<WeightStore>> OpenFiles(
      const std::vector<std::filesystem::path>& files);

  // Has and Names cover every tensor of the files; Get of one whose dtype phishard does not
  // convert (I64, BOOL, F8, ...) is UNIMPLEMENTED naming it, so only a tensor the model or
  // adapter actually reads has to be F32/F16/BF16.
  bool Has(std::string_view name) const;
  absl::StatusOr<const TensorView*> Get(std::string_view name) const;
  std::vector<std::string> Names() const;

  // Converts tensor `name` to float32 into `out` (resized), checking its shape equals `shape`
  // (error names the tensor, expected and actual shape).
  absl::Status ReadF32(std::string_view name, absl::Span<const int64_t> shape,
                       std::vector<float>* out) const;
  // Same, converting to IEEE half / bfloat16 bit patterns (for device upload).
  absl::Status ReadF16(std::string_view name, absl::Span<const int64_t> shape,
                       std::vector<uint16_t>* out) const;
  absl::Status ReadBF16(std::string_view name, absl::Span<const int64_t> shape,
                        std::vector<uint16_t>* out) const;

 private:
  // OpenDir for one format: `single` (model.safetensors / pytorch_model.bin) when it and `index`
  // exist, else `index` when it exists, else all_files (the directory's files of the format).
  static absl::StatusOr<std::unique_ptr<WeightStore>> OpenDirFormat(
      const std::filesystem::path& dir, const std::string& single, const std::string& index,
      std::vector<std::filesystem::path> all_files);
  // Records `name` as held by `file`; a name already held is an error naming both files.
  absl::Status AddName(const std::string& name, const std::string& file);

  std::vector<std::unique_ptr<WeightFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> index_;  // readable tensors
  std::map<std::string, std::string, std::less<>> unsupported_;  // name -> Get's error
  std::map<std::string, std::string, std::less<>> files_of_;     // every name -> its file
};

// Scalar conversions (round-to-nearest-even for the narrowing ones).
float HalfToFloat(uint16_t h);
float BF16ToFloat(uint16_t b);
uint16_t FloatToHalf(float f);
uint16_t FloatToBF16(float f);

}  // namespace phishard
