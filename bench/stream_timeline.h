// phishard_bench --stream-timeline: the decode stream's per-layer timeline
// (CudaPhiModel::set_decode_stream_timeline: %globaltimer stamps of every stream block and every
// attention block beside it) as a table of when each event happens in a layer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace phishard {

// `words`: CudaPhiModel::decode_stream_timeline() of one step of a `layers`-layer model. Times are
// in us from the layer's reference: the last flush of the layer before (when the fold of this
// layer may go). For each event, the min / median / max over the blocks that stamped it, averaged
// over the layers 1 .. layers - 2 (steady state); then the dense waits and the layer period. An
// error line when no block stamped. Then the step's ends: layer 0 (from its first block's start),
// the LM head form (row `layers`, when the words hold it and its blocks stamped) and the span from
// layer 0's first block start to the last flush, against `step_device_ms` (the step's event
// time, upload to download; 0: not printed): what runs outside the stream's kernels.
std::string FormatStreamTimeline(const std::vector<uint64_t>& words, int layers,
                                 const std::string& title, double step_device_ms = 0);

}  // namespace phishard
