// Safetensors reader (model/safetensors.h) on arbitrary files. The file lives in a memfd
// (/proc/self/fd/N): SafetensorsFile::Open mmaps a path, and a memfd needs no disk.
// First byte selects how the rest becomes a file:
//   even: the rest is the whole file (length field included);
//   odd:  u16 n, then n bytes of header JSON and the data buffer; the 8-byte length field is
//         written for the fuzzer, so mutations of the JSON are not wasted on a wrong length.
// When Open succeeds, an independent oracle re-reads the header with nlohmann::json and checks
// that every TensorView points at exactly the bytes its data_offsets name (ASan cannot see
// reads past a tensor inside an mmap), that nbytes == numel x dtype size, and the conversions
// to F32/F16/BF16 run over every tensor; a tensor of another dtype must be listed, inside the
// file, and refuse every read.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_util.h"

namespace phishard {
namespace {

std::string BuildFile(fuzz::ByteReader& in) {
  const uint8_t mode = in.U8();
  if (mode % 2 == 0) return std::string(in.Rest());
  const uint16_t n = in.U16();
  const std::string_view header = in.Bytes(n);
  const std::string_view data = in.Rest();
  std::string file(8, '\0');
  uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  file.append(header);
  file.append(data);
  return file;
}

void CheckAgainstOracle(const SafetensorsFile& f, const std::string& file) {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(file[i]);
  const nlohmann::json header = nlohmann::json::parse(file.substr(8, header_len));
  const char* buffer = file.data() + 8 + header_len;
  for (const auto& [name, t] : f.tensors()) {
    FUZZ_CHECK(header.contains(name)) << "tensor '" << name << "' not in the header";
    const auto& off = header[name]["data_offsets"];
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    FUZZ_CHECK(t.nbytes == end - begin) << name;
    FUZZ_CHECK(8 + header_len + end <= file.size()) << name << " runs past the file";
    FUZZ_CHECK(static_cast<uint64_t>(t.numel()) * DTypeSize(t.dtype) == t.nbytes) << name;
    if (t.nbytes > 0) {
      FUZZ_CHECK(std::memcmp(t.data, buffer + begin, t.nbytes) == 0)
          << "tensor '" << name << "' does not point at its data_offsets";
    }
  }
  for (const auto& [name, dtype] : f.unsupported()) {
    FUZZ_CHECK(header.contains(name)) << "tensor '" << name << "' not in the header";
    FUZZ_CHECK(!f.tensors().contains(name)) << "tensor '" << name << "' listed twice";
    FUZZ_CHECK(header[name]["dtype"] == dtype) << name;
    const auto& off = header[name]["data_offsets"];
    FUZZ_CHECK(8 + header_len + off[1].get<uint64_t>() <= file.size())
        << name << " runs past the file";
  }
}

}  // namespace
}  // namespace phishard

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  fuzz::ByteReader in(data, size);
  const std::string file = BuildFile(in);

  const int fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  PHI_CHECK(fd >= 0) << "memfd_create failed";
  PHI_CHECK(::write(fd, file.data(), file.size()) == static_cast<ssize_t>(file.size()));
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  if (f.ok()) {
    CheckAgainstOracle(**f, file);
    absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenFiles({path});
    FUZZ_CHECK(store.ok()) << "Open accepted what OpenFiles refuses: " << store.status();
    std::vector<float> f32;
    std::vector<uint16_t> u16;
    for (const std::string& name : (*store)->Names()) {
      absl::StatusOr<const TensorView*> got = (*store)->Get(name);
      if (f->get()->unsupported().contains(name)) {  // listed, range-checked, never readable
        FUZZ_CHECK(got.status().code() == absl::StatusCode::kUnimplemented) << name;
        FUZZ_CHECK(!(*store)->ReadF32(name, {}, &f32).ok()) << name;
        continue;
      }
      FUZZ_CHECK(got.ok()) << name << ": " << got.status();
      const TensorView* t = *got;
      if (t->nbytes > (1u << 20)) continue;  // keep each input fast
      FUZZ_CHECK((*store)->ReadF32(name, t->shape, &f32).ok()) << name;
      FUZZ_CHECK(static_cast<int64_t>(f32.size()) == t->numel()) << name;
      FUZZ_CHECK((*store)->ReadF16(name, t->shape, &u16).ok()) << name;
      FUZZ_CHECK((*store)->ReadBF16(name, t->shape, &u16).ok()) << name;
      // A wrong expected shape is an error, never a crash.
      std::vector<int64_t> wrong = t->shape;
      wrong.push_back(2);
      FUZZ_CHECK(!(*store)->ReadF32(name, wrong, &f32).ok()) << name;
    }
  } else {
    FUZZ_CHECK(!f.status().message().empty());
  }
  ::close(fd);
  return 0;
}
