// CUDA entry point of the greedy token choice (kernels/greedy_pick.h). Device pointers (logits,
// out and workspace, which is required); at most 65,535 rows a launch. Deterministic: a fixed
// reduction order, so every rank of a tensor-parallel group that holds the same all-gathered logits
// gets the same pairs.
#pragma once

#include "kernels/device.h"
#include "kernels/greedy_pick.h"

namespace phishard {

KernelStatus GreedyPickCuda(const GreedyPickParams& p, cudaStream_t stream);

}  // namespace phishard
