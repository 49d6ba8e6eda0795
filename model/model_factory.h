// Chooses and loads the model backend for one rank: the float32 CPU reference or (when built in)
// the CUDA backend.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/model_backend.h"
#include "parallel/communicator.h"

namespace phishard {

struct ModelLoadOptions {
  std::filesystem::path model_dir;
  std::string device = "auto";  // "auto" | "cpu" | "cuda"
  std::string dtype;            // "" = backend default; the CPU backend accepts only "float32"
  int rank = 0, world_size = 1;
  // Tensor parallelism (world_size > 1): the group's communicator, created before loading (not
  // owned; must outlive the backend), and how many ranks share this host's memory.
  Communicator* comm = nullptr;
  int ranks_on_host = 1;
};

// device "auto" picks cuda when a GPU is visible and the CUDA backend is built in, else cpu.
// Errors: INVALID_ARGUMENT for an unknown device, a dtype the backend cannot compute in, a
// rank outside [0, world_size), or world_size > 1 without a communicator of that rank and size;
// FAILED_PRECONDITION for "cuda" without a usable CUDA backend; config/weight errors as they are
// (INVALID_ARGUMENT naming the config field when the model does not split over world_size).
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateModelBackend(const ModelLoadOptions& options);

// "cpu" or "cuda": what CreateModelBackend would use for `device` ("auto" resolved).
// INVALID_ARGUMENT for an unknown device.
absl::StatusOr<std::string> ResolveDevice(const std::string& device);

// Whether `device` can run world_size ranks, checked before any rendezvous so that a refusal is
// immediate and names the reason. OK for world_size 1.
absl::Status CheckTensorParallelSupport(const std::string& device, int world_size);

// True when this binary has a CUDA backend to hand models to (see CreateCudaModelBackend in
// model_factory.cc) and the CUDA runtime reports at least one device.
bool CudaBackendUsable();

}  // namespace phishard
