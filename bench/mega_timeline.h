// phishard_bench --mega-timeline: the persistent decode kernel's phase timeline
// (DecodeMegaParams::timeline, kernels/cuda/decode_mega_cuda.h) as a table of per-phase times.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace phishard {

// `words`: CudaPhiModel::decode_megakernel_timeline() of one launch recorded over `layers`
// layers ([blocks_cap, layers + 1, kDecodeMegaEvents]). Returns the table (Markdown) of each
// phase's mean / max over (block, layer) and its value in the block that arrived last at the
// phase's grid barrier (the critical block), in us at the SM clock measured from the blocks'
// clock64 / %globaltimer; the last recorded layer is left out when it is the model's last (no
// barrier C). An error line when no block wrote its row.
std::string FormatMegaTimeline(const std::vector<uint64_t>& words, int layers, int model_layers,
                               const std::string& title);

}  // namespace phishard
