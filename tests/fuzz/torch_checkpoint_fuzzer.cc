// PyTorch checkpoint reader (model/torch_checkpoint.h: the ZIP container and the restricted
// unpickler) on arbitrary files, the whole input being the file. It lives in a memfd
// (/proc/self/fd/N): TorchCheckpointFile::Open mmaps a path. When Open succeeds, every tensor
// must be F32 / F16 / BF16 with nbytes == numel x dtype size, the same file must open as a
// WeightStore, and every tensor must convert (each byte of it is read: a view outside the
// mapping faults); a tensor of another dtype must be listed and refuse every read.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/torch_checkpoint.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  const int fd = memfd_create("torch_fuzz", MFD_CLOEXEC);
  PHI_CHECK(fd >= 0) << "memfd_create failed";
  PHI_CHECK(::write(fd, data, size) == static_cast<ssize_t>(size));
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> f = TorchCheckpointFile::Open(path);
  if (f.ok()) {
    for (const auto& [name, t] : (*f)->tensors()) {
      FUZZ_CHECK(static_cast<uint64_t>(t.numel()) * DTypeSize(t.dtype) == t.nbytes) << name;
      FUZZ_CHECK(t.nbytes <= size) << name << " larger than the file";
    }
    absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenFiles({path});
    FUZZ_CHECK(store.ok()) << "Open accepted what OpenFiles refuses: " << store.status();
    std::vector<float> f32;
    for (const std::string& name : (*store)->Names()) {
      absl::StatusOr<const TensorView*> got = (*store)->Get(name);
      if ((*f)->unsupported().contains(name)) {
        FUZZ_CHECK(got.status().code() == absl::StatusCode::kUnimplemented) << name;
        continue;
      }
      FUZZ_CHECK(got.ok()) << name << ": " << got.status();
      if ((*got)->nbytes > (1u << 20)) continue;  // keep each input fast
      FUZZ_CHECK((*store)->ReadF32(name, (*got)->shape, &f32).ok()) << name;
    }
  } else {
    FUZZ_CHECK(!f.status().message().empty());
  }
  ::close(fd);
  return 0;
}
