// Chooses and loads the model backend for one rank: the float32 CPU reference or (when built in)
// the CUDA backend.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/model_backend.h"

namespace phishard {

struct ModelLoadOptions {
  std::filesystem::path model_dir;
  std::string device = "auto";  // "auto" | "cpu" | "cuda"
  std::string dtype;            // "" = backend default; the CPU backend accepts only "float32"
  int rank = 0, world_size = 1;
};

// device "auto" picks cuda when a GPU is visible and the CUDA backend is built in, else cpu.
// Errors: INVALID_ARGUMENT for an unknown device, a dtype the backend cannot compute in, or a
// rank outside [0, world_size); FAILED_PRECONDITION for "cuda" without a usable CUDA backend;
// UNIMPLEMENTED for world_size > 1 on CPU; config/weight errors from loading as they are.
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateModelBackend(const ModelLoadOptions& options);

// True when this binary has a CUDA backend to hand models to (see CreateCudaModelBackend in
// model_factory.cc) and the CUDA runtime reports at least one device.
bool CudaBackendUsable();

}  // namespace phishard
