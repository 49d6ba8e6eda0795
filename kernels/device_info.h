// What accelerators this process can see. Answers 0 when built without CUDA, when no driver is
// installed, or when the runtime reports an error (a CPU-only machine with the toolkit installed).
#pragma once

namespace phishard {

int CudaDeviceCount();

}  // namespace phishard
