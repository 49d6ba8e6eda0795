// CudaPhiModel::ForwardGreedy: greedy token choice on the device for the rows a step marks
// (ForwardBatch::greedy_rows), so a batch-256 decode step of greedy requests downloads 256
// (id, logprob) pairs (2 KB) instead of 256 x V float32 logits (52 MB for Phi-2).
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>

#include "absl/strings/str_format.h"
#include "kernels/cuda/greedy_pick_cuda.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {

using cuda_model::VocabPad;

absl::Status CudaPhiModel::ForwardGreedy(const ForwardBatch& batch, absl::Span<const float>* logits,
                                         absl::Span<const GreedyPick>* picks) {
  *picks = {};
  const bool decode = std::all_of(batch.seqs.begin(), batch.seqs.end(),
                                  [](const SequenceInput& s) { return s.num_new_tokens == 1; });
  const bool any = std::any_of(batch.greedy_rows.begin(), batch.greedy_rows.end(),
                               [](uint8_t g) { return g != 0; });
  // Prefill steps (a few logit rows) and decode batches above the largest bucket: full rows on
  // the host, picks by GreedyPickCpu.
  if (!any || !healthy_ || !decode || static_cast<int>(batch.seqs.size()) > graphs_->max_batch()) {
    return ModelBackend::ForwardGreedy(batch, logits, picks);
  }
  *logits = {};
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  DeviceSet(device_);
  greedy_step_ = true;
  const absl::Status st = DecodeStep(batch, nullptr, logits);
  greedy_step_ = false;
  if (!st.ok()) return st;
  const size_t R = batch.logit_rows.size();
  picks_view_.assign(R, GreedyPick{});
  for (size_t r = 0; r < R; ++r) {
    if (batch.greedy_rows[r]) picks_view_[r] = picks_host_[batch.logit_rows[r]];
  }
  *picks = absl::MakeConstSpan(picks_view_);
  return absl::OkStatus();
}

absl::Status CudaPhiModel::ReserveGreedyPicks(int rows) {
  if (rows <= picks_rows_) return absl::OkStatus();
  // The previous step's sync means no kernel or copy is in flight on these buffers.
  if (picks_dev_) DeviceFree(picks_dev_);
  if (picks_host_) DeviceFreeHost(picks_host_);
  picks_dev_ = picks_host_ = nullptr;
  picks_rows_ = 0;
  const int V = full_config_.vocab_size;
  const int part_cols = shard_.lm_head_parallel ? config_.vocab_size : V;
  // Device: [rows] pairs, then the kernel's per-chunk workspace for `rows` rows.
  const size_t pair_bytes = cuda_model::AlignUp(sizeof(GreedyPick) * rows);
  const size_t bytes = pair_bytes + GreedyPickWorkspaceBytes(rows, V, part_cols);
  void* d = nullptr;
  void* h = nullptr;
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&d, bytes), "malloc (greedy picks)"));
  picks_dev_ = static_cast<GreedyPick*>(d);
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceMallocHost(&h, sizeof(GreedyPick) * rows), "host malloc (greedy picks)"));
  picks_host_ = static_cast<GreedyPick*>(h);
  picks_rows_ = rows;
  return absl::OkStatus();
}

absl::Status CudaPhiModel::EnqueueGreedyPicks(const ForwardBatch& batch, const float* d_logits,
                                              int step_rows) {
  // Device rows [0, rows) cover every marked row (logit_rows ascend); unmarked ones among them
  // are picked too (a few microseconds of reading, no transfer worth avoiding).
  int rows = 0;
  for (size_t r = 0; r < batch.logit_rows.size(); ++r) {
    if (batch.greedy_rows[r]) rows = batch.logit_rows[r] + 1;
  }
  if (rows == 0) return absl::OkStatus();
  const int V = full_config_.vocab_size;
  // Finish reserved graphs_->max_batch() rows; ForwardGreedy sends no larger step here.
  PHI_RETURN_IF_ERROR(ReserveGreedyPicks(rows));
  // The workspace sits after picks_rows_ pairs.
  void* workspace =
      reinterpret_cast<char*>(picks_dev_) + cuda_model::AlignUp(sizeof(GreedyPick) * picks_rows_);
  // The full rows: [step_rows, VocabPad(V)] here, or the vocab-parallel all-gather
  // [W, step_rows, VocabPad(V / W)] (model/cuda_phi_tp.cc), the same on every rank.
  GreedyPickParams p{.out = picks_dev_, .workspace = workspace, .rows = rows, .cols = V};
  if (shard_.lm_head_parallel) {
    p.logits = tp_logits_;
    p.part_cols = config_.vocab_size;
    p.row_stride = VocabPad(config_.vocab_size);
    p.part_stride = static_cast<int64_t>(step_rows) * p.row_stride;
  } else {
    p.logits = d_logits;
    p.part_cols = p.cols;
    p.row_stride = VocabPad(p.cols);
  }
  PHI_RETURN_IF_ERROR(KernelResult(GreedyPickCuda(p, stream_), "greedy pick"));
  return DeviceStatus(DeviceCopyToHost(picks_host_, picks_dev_, sizeof(GreedyPick) * rows, stream_),
                      "greedy picks download");
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
