#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "model/json_depth.h"
#include "model/text_file.h"
#include "model/torch_checkpoint.h"
#include "nlohmann/json.hpp"

namespace phishard {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// The Rust reference implementation refuses headers above 100 MB; so do we (a corrupt length
// field must not make us parse gigabytes of tensor data as JSON).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// A valid header nests 3 deep ({name: {shape: [..]}}); anything far deeper is garbage, and
// rejecting it before parsing bounds the parser's memory on hostile input.
constexpr int kMaxJsonDepth = 16;

std::string ShapeStr(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Safetensors dtypes that exist in the format but that phishard does not convert, with their
// element width in bits (F6/F4 pack several elements a byte). A tensor of one of them is
// range-checked like any other and listed, and only reading it fails (UNIMPLEMENTED naming the
// tensor): checkpoints may carry buffers nobody reads (I64 position ids, BOOL masks) beside the
// Phi weights, which Hugging Face and upstream LoRAX load by ignoring them. 0 = not a dtype.
int UnsupportedDTypeBits(std::string_view s) {
  static constexpr std::pair<std::string_view, int> kOthers[] = {
      {"BOOL", 8},    {"U8", 8},      {"I8", 8},          {"I16", 16},       {"U16", 16},
      {"I32", 32},    {"I64", 64},    {"U32", 32},        {"U64", 64},       {"F64", 64},
      {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8},     {"F6_E2M3", 6},    {"F6_E3M2", 6},
      {"F4", 4},      {"C64", 64},    {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}};
  for (const auto& [name, bits] : kOthers) {
    if (name == s) return bits;
  }
  return 0;
}

std::string UnsupportedDTypeMessage(std::string_view file, std::string_view dtype,
                                    std::string_view tensor) {
  return absl::StrFormat(
      "weight file '%s': unsupported dtype %s for tensor '%s' (phishard loads only F32, "
      "F16, BF16)",
      file, dtype, tensor);
}

// Parses JSON, reporting a duplicated key in any object (nlohmann silently keeps the last one,
// which for a safetensors header would hide a tensor).
absl::StatusOr<json> ParseJsonNoDuplicates(std::string_view text, const std::string& what) {
  if (JsonNestingDepth(text, kMaxJsonDepth) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: JSON nested deeper than %d levels", what, kMaxJsonDepth));
  }
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  json::parser_callback_t cb = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        break;
      case json::parse_event_t::object_end:
        open_objects.pop_back();
        break;
      default:
        break;
    }
    return true;  // never discard: keeps object_start/object_end balanced
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not valid JSON: ", e.what()));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: duplicate key '%s' in JSON", what, duplicate));
  }
  return j;
}

// Reads a non-negative JSON integer into uint64_t; false for floats, negatives, bools, etc.
bool GetUnsigned(const json& v, uint64_t* out) {
  if (!v.is_number_unsigned()) return false;
  *out = v.get<uint64_t>();
  return true;
}

uint32_t FloatBits(float f) { return std::bit_cast<uint32_t>(f); }
float BitsFloat(uint32_t u) { return std::bit_cast<float>(u); }

// Scalar conversions, bit-exact. Written as selects between all candidate results rather than
// branches so that GCC vectorizes the conversion loops below (2-3x faster than the branchy
// form in a micro-benchmark). FloatToHalfImpl's subnormal candidate relies on the
// default round-to-nearest-even FPU mode, which phishard never changes; -ffast-math (which
// would flush subnormals) must not be used for this file.

// Branch-free select (c ? a : b) as masks; a plain ?: here is turned back into a branch
// around the float ops (which may trap under GCC's default -ftrapping-math) and blocks
// vectorization.
inline uint32_t Select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

inline float HalfToFloatImpl(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + 0x38000000u;  // exponent rebias 15 -> 127
  const uint32_t inf_nan = normal + 0x38000000u;     // exponent 31 -> 255, payload kept
  // Zero / subnormal: em * 2^-24, exact in float.
  const uint32_t sub = FloatBits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  uint32_t r = Select(em >= 0x7c00u, inf_nan, normal);
  r = Select(em < 0x0400u, sub, r);
  return BitsFloat(r | sign);
}

inline float BF16ToFloatImpl(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

inline uint16_t FloatToHalfImpl(float f) {
  const uint32_t all = FloatBits(f);
  const uint32_t sign = (all >> 16) & 0x8000u;
  const uint32_t u = all & 0x7fffffffu;
  // Normal result: rebias the exponent (127 -> 15, i.e. add (15 - 127) << 23 mod 2^32) and
  // round the mantissa 23 -> 10 bits to nearest even; a carry out of the mantissa bumps the
  // exponent, up to Inf at 0x7c00.
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  // |f| < 2^-14: a half subnormal or zero. Adding 0.5 puts the half's subnormal LSB (2^-24)
  // at the float mantissa's LSB, so the FPU's round-to-nearest-even add does the rounding.
  const uint32_t sub = FloatBits(BitsFloat(u) + 0.5f) - 0x3f000000u;
  const uint32_t nan = 0x7e00u | ((u >> 13) & 0x3ffu);  // quiet, top payload bits kept
  uint32_t r = Select(u < 0x38800000u, sub, normal);
  r = Select(u >= 0x47800000u, 0x7c00u, r);  // >= 65536 (incl. Inf) rounds to Inf
  r = Select(u > 0x7f800000u, nan, r);
  return static_cast<uint16_t>(r | sign);
}

inline uint16_t FloatToBF16Impl(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even; -> Inf
  const uint32_t nan = (u >> 16) | 0x0040u;  // quiet it, keep sign and top payload
  return static_cast<uint16_t>(Select((u & 0x7fffffffu) > 0x7f800000u, nan, rounded));
}

// Conversion loops over n elements of unaligned little-endian source bytes, one function per
// (source, destination) pair. Each is a plain loop that GCC vectorizes; on x86-64 each also gets
// an AVX2 clone chosen at load time (ifunc): SSE2 lacks the 32 -> 16 bit packs these need.
// Measured on a 16-core H200 host, all tensors of a synthetic Phi-2 (5.56 GB F16, page cache
// warm, one thread): to F16 (memcpy) 1.1 s, to F32 2.3 s, to BF16 2.8 s (4.0-4.9 s without
// the AVX2 clone).
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define PHI_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef PHI_VECTOR_CLONES
#define PHI_VECTOR_CLONES
#endif

template <typename Src, typename Out, typename F>
inline void ConvertLoop(const std::byte* src, size_t n, Out* out, F convert) {
  for (size_t i = 0; i < n; ++i) {
    Src s;
    std::memcpy(&s, src + sizeof(Src) * i, sizeof(Src));
    out[i] = convert(s);
  }
}

PHI_VECTOR_CLONES void F16ToF32(const std::byte* src, size_t n, float* out) {
  ConvertLoop<uint16_t>(src, n, out, [](uint16_t h) { return HalfToFloatImpl(h); });
}
PHI_VECTOR_CLONES void BF16ToF32(const std::byte* src, size_t n, float* out) {
  ConvertLoop<uint16_t>(src, n, out, [](uint16_t b) { return BF16ToFloatImpl(b); });
}
PHI_VECTOR_CLONES void F32ToF16(const std::byte* src, size_t n, uint16_t* out) {
  ConvertLoop<float>(src, n, out, [](float f) { return FloatToHalfImpl(f); });
}
PHI_VECTOR_CLONES void F32ToBF16(const std::byte* src, size_t n, uint16_t* out) {
  ConvertLoop<float>(src, n, out, [](float f) { return FloatToBF16Impl(f); });
}
// Cross 16-bit conversions go through float, which holds either exactly: one rounding.
PHI_VECTOR_CLONES void F16ToBF16(const std::byte* src, size_t n, uint16_t* out) {
  ConvertLoop<uint16_t>(src, n, out,
                        [](uint16_t h) { return FloatToBF16Impl(HalfToFloatImpl(h)); });
}
PHI_VECTOR_CLONES void BF16ToF16(const std::byte* src, size_t n, uint16_t* out) {
  ConvertLoop<uint16_t>(src, n, out,
                        [](uint16_t b) { return FloatToHalfImpl(BF16ToFloatImpl(b)); });
}

void ConvertToF32(const TensorView& t, float* out) {
  // An empty tensor's destination is an empty vector's data(), possibly nullptr: memcpy with a
  // null pointer is undefined even for 0 bytes (found by tests/fuzz/safetensors_fuzzer).
  if (t.nbytes == 0) return;
  const size_t n = t.nbytes / DTypeSize(t.dtype);
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out, t.data, t.nbytes);
      return;
    case DType::kF16:
      return F16ToF32(t.data, n, out);
    case DType::kBF16:
      return BF16ToF32(t.data, n, out);
  }
}

void ConvertToF16(const TensorView& t, uint16_t* out) {
  if (t.nbytes == 0) return;
  const size_t n = t.nbytes / DTypeSize(t.dtype);
  switch (t.dtype) {
    case DType::kF32:
      return F32ToF16(t.data, n, out);
    case DType::kF16:
      std::memcpy(out, t.data, t.nbytes);
      return;
    case DType::kBF16:
      return BF16ToF16(t.data, n, out);
  }
}

void ConvertToBF16(const TensorView& t, uint16_t* out) {
  if (t.nbytes == 0) return;
  const size_t n = t.nbytes / DTypeSize(t.dtype);
  switch (t.dtype) {
    case DType::kF32:
      return F32ToBF16(t.data, n, out);
    case DType::kF16:
      return F16ToBF16(t.data, n, out);
    case DType::kBF16:
      std::memcpy(out, t.data, t.nbytes);
      return;
  }
}

}  // namespace

std::string_view DTypeName(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t DTypeSize(DType d) {
  switch (d) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

int64_t TensorView::numel() const {
  // Open guarantees: either a dimension is 0 (the others may be huge), or the product equals
  // nbytes / dtype size and so cannot overflow.
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions (see the *Impl versions above).

float HalfToFloat(uint16_t h) { return HalfToFloatImpl(h); }
float BF16ToFloat(uint16_t b) { return BF16ToFloatImpl(b); }
uint16_t FloatToHalf(float f) { return FloatToHalfImpl(f); }
uint16_t FloatToBF16(float f) { return FloatToBF16Impl(f); }

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

WeightFile::~WeightFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::Status WeightFile::Map(const fs::path& path, const std::string& where, uint64_t min_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot open ", where, ": ", std::strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::InternalError(msg);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(where, " is not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < min_bytes) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is %d bytes, too short to be one (at least %d)", where, file_size, min_bytes));
  }
  void* map = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat("mmap of ", where, " failed: ", std::strerror(map_err)));
  }
  path_ = path;
  map_ = map;
  map_size_ = file_size;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const fs::path& path) {
  const std::string where = absl::StrCat("safetensors file '", path.string(), "'");
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  // 8 bytes: the header length field.
  PHI_RETURN_IF_ERROR(file->Map(path, where, 8));
  const uint64_t file_size = file->map_size_;
  const auto* bytes = static_cast<const std::byte*>(file->map_);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<uint64_t>(bytes[i]);
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d exceeds the %d-byte limit (corrupt or not a safetensors file)", where,
        header_len, kMaxHeaderBytes));
  }
  if (header_len > file_size - 8) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header length %d runs past the end of the %d-byte file", where,
                        header_len, file_size));
  }
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + 8), header_len);
  absl::StatusOr<json> header = ParseJsonNoDuplicates(header_text, where);
  if (!header.ok()) return header.status();
  if (!header->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header is not a JSON object but ", header->type_name()));
  }

  const std::byte* buffer = bytes + 8 + header_len;
  const uint64_t buffer_size = file_size - 8 - header_len;
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header->items()) {
    const std::string tw = absl::StrCat(where, ": tensor '", name, "'");
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": __metadata__ is not an object but ", entry.type_name()));
      }
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "%s: __metadata__['%s'] is %s, expected a string", where, k, v.type_name()));
        }
      }
      continue;
    }
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(tw, ": entry is ", entry.type_name(), ", expected an object"));
    }
    // dtype
    const auto dt = entry.find("dtype");
    if (dt == entry.end() || !dt->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(tw, ": missing or non-string 'dtype'"));
    }
    const std::string& dts = dt->get_ref<const std::string&>();
    std::optional<DType> dtype;
    uint64_t bits = 0;  // element width
    if (dts == "F32") {
      dtype = DType::kF32;
    } else if (dts == "F16") {
      dtype = DType::kF16;
    } else if (dts == "BF16") {
      dtype = DType::kBF16;
    } else if (const int b = UnsupportedDTypeBits(dts); b > 0) {
      bits = static_cast<uint64_t>(b);
    } else {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: unknown dtype '%s' for tensor '%s'", where, dts, name));
    }
    if (dtype.has_value()) bits = 8 * DTypeSize(*dtype);
    // shape
    const auto sh = entry.find("shape");
    if (sh == entry.end() || !sh->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(tw, ": missing or non-list 'shape'"));
    }
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    bool overflow = false, zero_dim = false;
    for (const json& d : *sh) {
      uint64_t dim;
      if (!GetUnsigned(d, &dim) || dim > static_cast<uint64_t>(INT64_MAX)) {
        return absl::InvalidArgumentError(
            absl::StrCat(tw, ": shape ", sh->dump(), " is not a list of non-negative integers"));
      }
      shape.push_back(static_cast<int64_t>(dim));
      overflow |= __builtin_mul_overflow(numel, dim, &numel);
      zero_dim |= dim == 0;
    }
    uint64_t nbits = 0;
    overflow |= __builtin_mul_overflow(numel, bits, &nbits);
    uint64_t nbytes = nbits / 8;
    // A zero dimension makes the tensor empty whatever the other dimensions are (a product
    // that overflowed before reaching it is harmless). Note a wrapped product can be 0 too, so
    // test the dimensions, not numel.
    if (zero_dim) {
      overflow = false;
      nbits = nbytes = 0;
    }
    // data_offsets
    const auto off = entry.find("data_offsets");
    uint64_t begin = 0, end = 0;
    if (off == entry.end() || !off->is_array() || off->size() != 2 ||
        !GetUnsigned((*off)[0], &begin) || !GetUnsigned((*off)[1], &end)) {
      return absl::InvalidArgumentError(
          absl::StrCat(tw, ": 'data_offsets' must be two non-negative integers [begin, end], got ",
                       off == entry.end() ? std::string("nothing") : off->dump()));
    }
    if (begin > end) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: data_offsets [%d, %d] has begin > end", tw, begin, end));
    }
    if (end > buffer_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: data_offsets [%d, %d] run past the %d-byte data buffer (file truncated?)", tw, begin,
          end, buffer_size));
    }
    if (overflow || nbits % 8 != 0 || nbytes != end - begin) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: shape %s x %s (%d bits) needs %s bytes but data_offsets [%d, %d] span %d", tw,
          ShapeStr(shape), dts, bits,
          overflow         ? std::string("more than 2^64")
          : nbits % 8 == 0 ? absl::StrCat(nbytes)
                           : absl::StrCat(nbits, " bits, not whole"),
          begin, end, end - begin));
    }
    if (!dtype.has_value()) {
      auto [it, inserted] = file->unsupported_.emplace(name, dts);
      PHI_CHECK(inserted) << "duplicate key passed the JSON check: " << name;
      if (begin != end) ranges.push_back({begin, end, &it->first});
      continue;
    }
    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    view.shape = std::move(shape);
    view.data = buffer + begin;
    view.nbytes = static_cast<size_t>(nbytes);
    view.file = path.string();
    auto [it, inserted] = file->tensors_.emplace(name, std::move(view));
    PHI_CHECK(inserted) << "duplicate key passed the JSON check: " << name;
    if (begin != end) ranges.push_back({begin, end, &it->first});
  }

  // Overlap check: sorted by begin, every range must start at or after the furthest end so far.
  // Gaps are allowed (harmless, and some writers align tensors).
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* furthest = nullptr;
  for (const Range& r : ranges) {
    if (furthest != nullptr && r.begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' bytes [%d, %d) overlap tensor '%s' bytes [%d, %d)", where, *r.name,
          r.begin, r.end, *furthest->name, furthest->begin, furthest->end));
    }
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
  }
  return file;
}

absl::StatusOr<std::unique_ptr<WeightFile>> OpenWeightFile(const fs::path& path) {
  // A ZIP archive (torch.save) starts with a local file header; so do only PyTorch checkpoints
  // among weight files. Without one the name decides (a .bin / .pt / .pth of the legacy format
  // gets the PyTorch reader's message).
  char magic[4] = {};
  std::ifstream(path, std::ios::binary).read(magic, sizeof(magic));
  const bool zip = std::memcmp(magic, "PK\x03\x04", 4) == 0;
  const fs::path ext = path.extension();
  if (!zip && ext != ".bin" && ext != ".pt" && ext != ".pth") {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
    if (!f.ok()) return f.status();
    return std::unique_ptr<WeightFile>(*std::move(f));
  }
  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> f = TorchCheckpointFile::Open(path);
  if (!f.ok()) return f.status();
  return std::unique_ptr<WeightFile>(*std::move(f));
}

// ---------------------------------------------------------------------------------------------
// WeightStore

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::OpenFiles(
    const std::vector<fs::path>& files) {
  if (files.empty()) return absl::InvalidArgumentError("WeightStore::OpenFiles: no files given");
  std::unique_ptr<WeightStore> store(new WeightStore());
  for (const fs::path& p : files) {
    absl::StatusOr<std::unique_ptr<WeightFile>> f = OpenWeightFile(p);
    if (!f.ok()) return f.status();
    for (const auto& [name, view] : (*f)->tensors()) {
      if (absl::Status s = store->AddName(name, view.file); !s.ok()) return s;
      store->index_.emplace(name, &view);
    }
    for (const auto& [name, dtype] : (*f)->unsupported()) {
      if (absl::Status s = store->AddName(name, p.string()); !s.ok()) return s;
      store->unsupported_.emplace(name, UnsupportedDTypeMessage(p.string(), dtype, name));
    }
    store->files_.push_back(*std::move(f));
  }
  return store;
}

namespace {

// The files of one weight format in a directory (is_regular_file follows symlinks: HF cache
// snapshots are links into blobs/).
absl::StatusOr<std::vector<fs::path>> FilesWithExtension(const fs::path& dir,
                                                         std::string_view ext) {
  std::error_code ec;
  std::vector<fs::path> files;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ext && fs::is_regular_file(e.path(), ec)) files.push_back(e.path());
  }
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot list directory '", dir.string(), "': ", ec.message()));
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::OpenDir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("model directory '", dir.string(), "' does not exist or is not a directory"));
  }
  // Safetensors first, as transformers; PyTorch checkpoints only when there is none.
  for (const auto& [single, index, ext] :
       {std::tuple{"model.safetensors", "model.safetensors.index.json", ".safetensors"},
        std::tuple{"pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"}}) {
    absl::StatusOr<std::vector<fs::path>> files = FilesWithExtension(dir, ext);
    if (!files.ok()) return files.status();
    if (!files->empty() || fs::exists(dir / index, ec)) {
      return OpenDirFormat(dir, single, index, *std::move(files));
    }
  }
  return absl::NotFoundError(
      absl::StrCat("no *.safetensors (or PyTorch *.bin) weight files in "
                   "model directory '",
                   dir.string(), "'"));
}

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::OpenDirFormat(
    const fs::path& dir, const std::string& single, const std::string& index_name,
    std::vector<fs::path> all_files) {
  std::error_code ec;
  const fs::path index_path = dir / index_name;
  // Hugging Face's order: a single model.safetensors wins over an index (a directory re-saved
  // unsharded often keeps the old index, whose shards may be gone).
  const fs::path single_path = dir / single;
  if (fs::exists(index_path, ec) && fs::is_regular_file(single_path, ec)) {
    PHI_LOG(WARNING) << "'" << dir.string() << "' has both " << single << " and " << index_name
                     << ": loading " << single << " (Hugging Face order), ignoring the index";
    return OpenFiles({single_path});
  }
  if (!fs::exists(index_path, ec)) return OpenFiles(all_files);

  const std::string where = absl::StrCat("index '", index_path.string(), "'");
  absl::StatusOr<std::string> text = ReadTextFile(index_path);
  if (!text.ok()) return text.status();
  absl::StatusOr<json> index = ParseJsonNoDuplicates(*text, where);
  if (!index.ok()) return index.status();
  const json* weight_map = nullptr;
  if (index->is_object()) {
    auto it = index->find("weight_map");
    if (it != index->end() && it->is_object()) weight_map = &*it;
  }
  if (weight_map == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": missing 'weight_map' object {tensor name: file name}"));
  }
  std::set<std::string> names;  // sorted, unique file names
  for (const auto& [tensor, file] : weight_map->items()) {
    if (!file.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: weight_map['%s'] is %s, expected a file name string", where, tensor,
                          file.type_name()));
    }
    const fs::path rel(file.get<std::string>());
    bool escapes = rel.empty() || rel.is_absolute();
    for (const fs::path& part : rel) escapes |= (part == "..");
    if (escapes) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: weight_map['%s'] = '%s' is not a file inside the model directory",
                          where, tensor, rel.string()));
    }
    if (names.insert(rel.string()).second && !fs::is_regular_file(dir / rel, ec)) {
      return absl::NotFoundError(
          absl::StrFormat("%s names file '%s' (for tensor '%s'), which does not exist in '%s'",
                          where, rel.string(), tensor, dir.string()));
    }
  }
  if (names.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty weight_map"));
  std::vector<fs::path> files;
  for (const std::string& n : names) files.push_back(dir / n);
  absl::StatusOr<std::unique_ptr<WeightStore>> store = OpenFiles(files);
  if (!store.ok()) return store.status();
  // Every tensor the index promises must be in the file it names.
  for (const auto& [tensor, file] : weight_map->items()) {
    const std::string expected = (dir / file.get<std::string>()).string();
    auto it = (*store)->files_of_.find(tensor);
    if (it == (*store)->files_of_.end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s maps tensor '%s' to '%s', but no weight file holds it", where, tensor, expected));
    }
    if (it->second != expected) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s maps tensor '%s' to '%s', but it is in '%s'", where, tensor, expected, it->second));
    }
  }
  return store;
}

absl::Status WeightStore::AddName(const std::string& name, const std::string& file) {
  auto [it, inserted] = files_of_.emplace(name, file);
  if (!inserted) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor '%s' appears in two weight files: '%s' and '%s'", name, it->second, file));
  }
  return absl::OkStatus();
}

bool WeightStore::Has(std::string_view name) const {
  return files_of_.find(name) != files_of_.end();
}

absl::StatusOr<const TensorView*> WeightStore::Get(std::string_view name) const {
  if (auto u = unsupported_.find(name); u != unsupported_.end()) {
    return absl::UnimplementedError(u->second);
  }
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::vector<std::string> paths;
    for (const auto& f : files_) paths.push_back(f->path().string());
    return absl::NotFoundError(absl::StrFormat("tensor '%s' not found in weight files: %s", name,
                                               absl::StrJoin(paths, ", ")));
  }
  return it->second;
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(files_of_.size());
  for (const auto& [name, file] : files_of_) names.push_back(name);
  return names;
}

namespace {
absl::StatusOr<const TensorView*> GetWithShape(const WeightStore& store, std::string_view name,
                                               absl::Span<const int64_t> shape) {
  absl::StatusOr<const TensorView*> t = store.Get(name);
  if (!t.ok()) return t.status();
  if (absl::Span<const int64_t>((*t)->shape) != shape) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor '%s' in '%s' has shape %s, expected %s", name, (*t)->file,
                        ShapeStr((*t)->shape), ShapeStr(shape)));
  }
  return t;
}
}  // namespace

absl::Status WeightStore::ReadF32(std::string_view name, absl::Span<const int64_t> shape,
                                  std::vector<float>* out) const {
  absl::StatusOr<const TensorView*> t = GetWithShape(*this, name, shape);
  if (!t.ok()) return t.status();
  out->resize((*t)->nbytes / DTypeSize((*t)->dtype));
  ConvertToF32(**t, out->data());
  return absl::OkStatus();
}

absl::Status WeightStore::ReadF16(std::string_view name, absl::Span<const int64_t> shape,
                                  std::vector<uint16_t>* out) const {
  absl::StatusOr<const TensorView*> t = GetWithShape(*this, name, shape);
  if (!t.ok()) return t.status();
  out->resize((*t)->nbytes / DTypeSize((*t)->dtype));
  ConvertToF16(**t, out->data());
  return absl::OkStatus();
}

absl::Status WeightStore::ReadBF16(std::string_view name, absl::Span<const int64_t> shape,
                                   std::vector<uint16_t>* out) const {
  absl::StatusOr<const TensorView*> t = GetWithShape(*this, name, shape);
  if (!t.ok()) return t.status();
  out->resize((*t)->nbytes / DTypeSize((*t)->dtype));
  ConvertToBF16(**t, out->data());
  return absl::OkStatus();
}

}  // namespace phishard
