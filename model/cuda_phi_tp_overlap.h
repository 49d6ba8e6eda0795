// Private to the CudaPhiModel sources: the device resources of the overlapped sharded prefill
// (model/cuda_phi_tp_overlap.cc). Plain C++ over kernels/device.h.
#pragma once

#include <vector>

#include "kernels/device.h"
#include "kernels/device_event.h"
#include "model/tp_prefill_split.h"

namespace phishard {

struct TpPrefillOverlap {
  int chunks = 1;  // CudaModelOptions::tp_prefill_chunks, resolved
  int min_rows = kTpPrefillMinRowsDefault;
  int last_chunks = 1;  // of the last prefill step
  // Made at the first chunked step: a high-priority stream for the chunks' all-reduces, and per
  // chunk an event on the model stream after the chunk's tail (`computed`) and one on the
  // communication stream after its all-reduce (`reduced`).
  cudaStream_t comm_stream = nullptr;
  std::vector<DeviceEvent*> computed;
  std::vector<DeviceEvent*> reduced;

  TpPrefillOverlap() = default;
  TpPrefillOverlap(const TpPrefillOverlap&) = delete;
  TpPrefillOverlap& operator=(const TpPrefillOverlap&) = delete;
  ~TpPrefillOverlap();  // the model's device must be current
};

}  // namespace phishard
