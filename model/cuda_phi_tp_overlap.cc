// CudaPhiModel's overlapped sharded prefill (issue #6, docs/tensor-parallel.md). A long prefill
// step splits its rows into N chunks (model/tp_prefill_split.h) for the ops next to each layer's
// all-reduce, the row-wise tail (dense + fc2 into h) and the next layer's row-wise head
// (LayerNorm, qkv, rotary + KV write); attention and fc1 run on all rows as before. Each chunk's
// all-reduce of its rows of h goes to a high-priority communication stream:
//
//   model stream: ... attn fc1 | tail c0 | tail c1 || head c0 | head c1 | attn fc1 | tail c0 ...
//   comm stream :                 AR c0 ---- AR c1 ---->
//
// AR c0 runs beside tail c1, AR c1 beside the next layer's head c0; head c waits only for AR c.
// So at N = 2 the whole all-reduce can hide behind about a third of each layer's work, while
// the big kernels (attention, fc1) keep all rows. All-reduces go to one stream in an order that
// depends only on the step's rows and the chunk settings: every rank enqueues the same NCCL calls
// in the same order.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {

TpPrefillOverlap::~TpPrefillOverlap() {
  if (comm_stream != nullptr) DeviceStreamSync(comm_stream);
  for (DeviceEvent* e : computed) DeviceEventDestroy(e);
  for (DeviceEvent* e : reduced) DeviceEventDestroy(e);
  if (comm_stream != nullptr) DeviceStreamDestroy(comm_stream);
}

absl::Status CudaPhiModel::InitTpOverlap(const CudaModelOptions& options) {
  tp_overlap_ = std::make_unique<TpPrefillOverlap>();
  int chunks = options.tp_prefill_chunks;
  if (chunks == 0) {
    absl::StatusOr<int> env = TpPrefillChunksFromEnv(kTpPrefillChunksDefault);
    if (!env.ok()) return env.status();
    chunks = *env;
  }
  return set_tp_prefill_chunks(chunks, options.tp_prefill_min_rows);
}

absl::Status CudaPhiModel::set_tp_prefill_chunks(int chunks, int min_rows) {
  if (chunks < 1 || chunks > kMaxPrefillChunks || min_rows < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CudaModelOptions: tp_prefill_chunks = %d must be in [1, %d] and tp_prefill_min_rows = "
        "%d >= 1",
        chunks, kMaxPrefillChunks, min_rows));
  }
  tp_overlap_->chunks = chunks;
  tp_overlap_->min_rows = min_rows;
  return absl::OkStatus();
}

int CudaPhiModel::tp_prefill_chunks() const { return tp_overlap_->chunks; }
int CudaPhiModel::last_prefill_chunks() const { return tp_overlap_->last_chunks; }

absl::Status CudaPhiModel::EnqueuePrefillLayers(const StepInputs& in) {
  TpPrefillOverlap& o = *tp_overlap_;
  o.last_chunks = 1;
  // Steps with adapter rows stay whole: the LoRA hooks are planned for the step's rows.
  if (comm_ == nullptr || o.chunks < 2 || in.decode || lora_->active()) return EnqueueLayers(in);
  PrefillRowChunks chunks;
  chunks.ranges = SplitPrefillRows(in.tokens, o.chunks, o.min_rows);
  const int N = static_cast<int>(chunks.ranges.size());
  if (N < 2) return EnqueueLayers(in);

  // A device error from here on may leave some rank's collectives unpaired: the model fails.
  auto device = [&](int err, const char* what) { return TpFailed(DeviceStatus(err, what), what); };
  if (o.comm_stream == nullptr) {
    PHI_RETURN_IF_ERROR(
        device(DeviceStreamCreateHighPriority(&o.comm_stream), "communication stream create"));
  }
  while (static_cast<int>(o.computed.size()) < N) {
    DeviceEvent* e = nullptr;
    PHI_RETURN_IF_ERROR(device(DeviceEventCreate(&e), "event create"));
    o.computed.push_back(e);
    PHI_RETURN_IF_ERROR(device(DeviceEventCreate(&e), "event create"));
    o.reduced.push_back(e);
  }
  const int H = config_.hidden_size;
  const size_t row_bytes = static_cast<size_t>(H) * DataTypeSize(dtype_);
  char* h = static_cast<char*>(arena_) + cuda_model::MakeArenaLayout(config_, arena_tokens_).h;
  // Every layer's head waits for its rows' all-reduce of the layer before (at 0: the embedding).
  chunks.before_head = [&](int /*layer*/, int c) -> absl::Status {
    return device(DeviceStreamWaitEvent(stream_, o.reduced[c]), "event wait");
  };
  chunks.after_tail = [&](int layer, int c) -> absl::Status {
    PHI_RETURN_IF_ERROR(device(DeviceEventRecord(o.computed[c], stream_), "event record"));
    PHI_RETURN_IF_ERROR(device(DeviceStreamWaitEvent(o.comm_stream, o.computed[c]), "event wait"));
    if (!tp_skip_collectives_) {
      const RowRange& rr = chunks.ranges[c];
      absl::Status st = comm_->EnqueueOverlappedAllReduceSum(
          h + static_cast<size_t>(rr.begin) * row_bytes, static_cast<size_t>(rr.rows) * H, dtype_,
          o.comm_stream);
      PHI_RETURN_IF_ERROR(TpFailed(st, layer < 0 ? "embedding all-reduce" : "layer all-reduce"));
    }
    return device(DeviceEventRecord(o.reduced[c], o.comm_stream), "event record");
  };
  StepInputs chunked = in;
  chunked.chunks = &chunks;
  PHI_RETURN_IF_ERROR(EnqueueLayers(chunked));
  o.last_chunks = N;
  // The communication stream runs its all-reduces in order: the last one done means all are.
  return device(DeviceStreamWaitEvent(stream_, o.reduced[N - 1]), "event wait");
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
