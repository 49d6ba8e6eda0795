#include "model/model_factory.h"

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/device_info.h"
#include "model/cpu_phi_model.h"
#include "model/cuda_phi_model.h"

namespace phishard {
namespace {

// --- CUDA backend hook -------------------------------------------------------------------------
// model/cuda_phi_model.h (built when PHISHARD_HAVE_CUDA): dtype "", "float16", "bfloat16"; one
// GPU per rank, cuda:{rank % visible devices} (the NCCL communicator's device, spec §1.5).
#if defined(PHISHARD_HAVE_CUDA) && PHISHARD_HAVE_CUDA
constexpr bool kCudaBackendBuiltIn = true;

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCudaModelBackend(
    const ModelLoadOptions& options) {
  if (options.world_size != 1 && (options.comm == nullptr || options.comm->rank() != options.rank ||
                                  options.comm->world_size() != options.world_size ||
                                  options.comm->memory_space() != MemorySpace::kDevice)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "rank %d of world_size %d on device 'cuda' needs the group's device (NCCL) communicator of "
        "that rank and size (create it before loading the model)",
        options.rank, options.world_size));
  }
  const int visible = CudaDeviceCount();
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> model = CudaPhiModel::Load(
      options.model_dir, CudaModelOptions{.dtype = options.dtype,
                                          .device = visible > 0 ? options.rank % visible : 0,
                                          .comm = options.world_size > 1 ? options.comm : nullptr});
  if (!model.ok()) return model.status();
  return std::unique_ptr<ModelBackend>(*std::move(model));
}
#else
constexpr bool kCudaBackendBuiltIn = false;

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCudaModelBackend(
    const ModelLoadOptions& options) {
  (void)options;
  return absl::FailedPreconditionError(
      "device 'cuda': this build has no CUDA model backend (built without nvcc); use --device cpu");
}
#endif
// ------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCpuModelBackend(
    const ModelLoadOptions& options) {
  if (!options.dtype.empty() && options.dtype != "float32") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "dtype '%s' is not available on device 'cpu': the CPU backend computes in float32 "
        "(pass dtype float32 or none)",
        options.dtype));
  }
  if (options.world_size != 1 && (options.comm == nullptr || options.comm->rank() != options.rank ||
                                  options.comm->world_size() != options.world_size)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "rank %d of world_size %d on device 'cpu' needs the group's communicator of that rank and "
        "size (create it before loading the model)",
        options.rank, options.world_size));
  }
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> model = CpuPhiModel::Load(
      options.model_dir, CpuParallel{.comm = options.comm, .ranks_on_host = options.ranks_on_host});
  if (!model.ok()) return model.status();
  return std::unique_ptr<ModelBackend>(*std::move(model));
}

}  // namespace

bool CudaBackendUsable() { return kCudaBackendBuiltIn && CudaDeviceCount() > 0; }

absl::StatusOr<std::string> ResolveDevice(const std::string& device) {
  if (device == "cpu" || device == "cuda") return device;
  if (device == "auto") return std::string(CudaBackendUsable() ? "cuda" : "cpu");
  return absl::InvalidArgumentError(
      absl::StrFormat("device '%s' is not one of auto, cpu, cuda", device));
}

absl::Status CheckTensorParallelSupport(const std::string& device, int world_size) {
  absl::StatusOr<std::string> resolved = ResolveDevice(device);
  if (!resolved.ok()) return resolved.status();
  // Both backends shard (CPU over Gloo, CUDA over NCCL); the split itself (heads, intermediate
  // size divisible by world_size) is checked when the weights load. A CUDA rank that could not
  // load is refused here, before it makes its peers wait in the rendezvous.
  if (world_size <= 1 || *resolved == "cpu" || CudaBackendUsable()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "tensor parallelism (WORLD_SIZE=%d) on device 'cuda' needs %s; use --device cpu to shard "
      "on the CPU",
      world_size,
      kCudaBackendBuiltIn ? "a visible CUDA device (check CUDA_VISIBLE_DEVICES and the driver)"
                          : "a build with the CUDA backend"));
}

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateModelBackend(const ModelLoadOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rank %d / world_size %d: need world_size >= 1 and 0 <= rank < world_size",
                        options.rank, options.world_size));
  }
  if (options.device == "cpu") return CreateCpuModelBackend(options);
  if (options.device == "cuda") {
    if (!kCudaBackendBuiltIn) return CreateCudaModelBackend(options);
    if (CudaDeviceCount() == 0) {
      return absl::FailedPreconditionError(
          "device 'cuda': no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)");
    }
    return CreateCudaModelBackend(options);
  }
  if (options.device == "auto") {
    return CudaBackendUsable() ? CreateCudaModelBackend(options) : CreateCpuModelBackend(options);
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("device '%s' is not one of auto, cpu, cuda", options.device));
}

}  // namespace phishard
