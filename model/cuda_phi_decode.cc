// CudaPhiModel's decode path: the batch padded to a graph bucket whose CUDA graph is replayed
// (captured at Warmup, CaptureDecodeGraphs), its inputs uploaded at fixed offsets, and the
// requested logits rows copied out through pinned staging (CopyLogitsOut, shared with prefill).
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/device_event.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"

namespace phishard {
namespace {

using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;
using cuda_model::VocabPad;

// set_decode_stream_host_logits: the staging's first word before a step whose LM head form
// writes it — a NaN with a payload no float operation produces (the GPU's NaNs are canonical).
constexpr uint32_t kHostLogitsSentinelBits = 0x7fbadbadu;

// The decode path's inputs, at fixed offsets for the life of the buffer (`rows` rows, `ints`
// block-table entries): info = {live sequences, block-table pitch, 0, 0}, then per row the slot,
// token id, position and context length, then the block tables [live, pitch], so a step
// uploads only the prefix it uses; after them the fused decode attention's split counters
// (int32 [rows, heads]: zeroed at allocation, never uploaded, left zero by every launch).
struct DecodeLayout {
  size_t info, slots, ids, positions, context_lens, block_tables, merge_counters, total;
};

DecodeLayout MakeDecodeLayout(int rows, int64_t ints, int heads) {
  DecodeLayout d;
  cuda_model::OffsetTaker offsets{16};  // consecutive sub-buffers, each 16-byte aligned
  d.info = offsets.Take(sizeof(int32_t) * 4);
  d.slots = offsets.Take(sizeof(int64_t) * rows);
  d.ids = offsets.Take(sizeof(int32_t) * rows);
  d.positions = offsets.Take(sizeof(int32_t) * rows);
  d.context_lens = offsets.Take(sizeof(int32_t) * rows);
  d.block_tables = offsets.Take(sizeof(int32_t) * static_cast<size_t>(ints));
  d.merge_counters = offsets.Take(sizeof(int32_t) * static_cast<size_t>(rows) * heads);
  d.total = offsets.off;
  return d;
}

// Host copy of the logits out of pinned staging; big decode batches (256 x 51200 floats = 52 MB)
// would spend milliseconds in one memcpy, so those are split over a few threads.
void CopyOut(float* dst, const float* src, size_t floats) {
  const size_t bytes = floats * sizeof(float);
  constexpr size_t kPerThread = size_t{8} << 20;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t parts = std::min<size_t>({bytes / kPerThread, hw / 2, 8});
  if (parts <= 1) {
    std::memcpy(dst, src, bytes);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t i = 1; i < parts; ++i) {
    const size_t a = floats * i / parts, b = floats * (i + 1) / parts;
    pool.emplace_back([=] { std::memcpy(dst + a, src + a, (b - a) * sizeof(float)); });
  }
  std::memcpy(dst, src, floats / parts * sizeof(float));
  for (std::thread& t : pool) t.join();
}

}  // namespace

size_t CudaPhiModel::DecodeBufferBytes(int rows, int64_t table_ints, int heads) {
  return MakeDecodeLayout(rows, table_ints, heads).total;
}

void CudaPhiModel::SetDecodeVariant(int rows, int variant, StepInputs* in) const {
  in->fc1_narrow = (variant & kVariantFc1Narrow) != 0;
  in->short_regs = (variant & kVariantFoldShort) != 0 && VariantRules().ShortRegsRows(rows);
  in->fold_short = (variant & kVariantFoldShort) != 0 && !in->short_regs;
  in->warp_heads = (variant & kVariantWarpHeads) != 0;
  in->stream_one_in_flight = (variant & kVariantStreamLong) != 0;
}

absl::Status CudaPhiModel::EnqueueDecode(int rows, int variant) {
  const DecodeLayout dl =
      MakeDecodeLayout(decode_rows_, decode_table_ints_, config_.num_attention_heads);
  char* md = static_cast<char*>(decode_dev_);
  StepInputs in;
  in.tokens = rows;
  in.ids = reinterpret_cast<const int32_t*>(md + dl.ids);
  in.positions = reinterpret_cast<const int32_t*>(md + dl.positions);
  in.slots = reinterpret_cast<const int64_t*>(md + dl.slots);
  in.context_lens = reinterpret_cast<const int32_t*>(md + dl.context_lens);
  in.block_tables = reinterpret_cast<const int32_t*>(md + dl.block_tables);
  in.num_seqs = rows;
  in.step_info = reinterpret_cast<const int32_t*>(md + dl.info);
  in.merge_counters = reinterpret_cast<int32_t*>(md + dl.merge_counters);
  in.merge_counters_len = static_cast<size_t>(decode_rows_) * config_.num_attention_heads;
  in.decode = true;
  in.min_live = std::max(1, rows / 2);  // the bucket below holds every smaller batch
  SetDecodeVariant(rows, variant, &in);
  in.max_q_len = 1;
  bool logits_done = false;
  const absl::StatusOr<bool> streamed =
      TryEnqueueStreamDecode(in, &logits_done);  // model/cuda_phi_stream.cc
  PHI_RETURN_IF_ERROR(streamed.status());
  if (logits_done) return absl::OkStatus();
  if (!*streamed) {
    const absl::StatusOr<bool> mega = TryEnqueueMegaDecode(in);  // model/cuda_phi_mega.cc
    PHI_RETURN_IF_ERROR(mega.status());
    if (!*mega) PHI_RETURN_IF_ERROR(EnqueueLayers(in));
  }
  const ArenaLayout al = MakeArenaLayout(config_, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  return EnqueueLogits(a + al.h, rows, reinterpret_cast<float*>(a + al.logits));
}

absl::Status CudaPhiModel::DecodeStep(const ForwardBatch& batch, std::vector<float>* logits,
                                      absl::Span<const float>* view) {
  const int S = static_cast<int>(batch.seqs.size());
  const int B = graphs_->Bucket(S);
  int pitch = 1;
  for (const SequenceInput& seq : batch.seqs) {
    pitch = std::max(pitch, KvBlockAllocator::BlocksFor(seq.context_len, kv_block_size_));
  }
  if (B > decode_rows_ || static_cast<int64_t>(B) * pitch > decode_table_ints_) {
    PHI_LOG(WARNING) << "decode step of " << S << " sequences x " << pitch
                     << " blocks exceeds the decode input buffer: growing it (graphs are "
                     << "captured again)";
    PHI_RETURN_IF_ERROR(EnsureDecodeCapacity(B, pitch));
  }
  const DecodeLayout dl =
      MakeDecodeLayout(decode_rows_, decode_table_ints_, config_.num_attention_heads);
  char* mh = static_cast<char*>(decode_host_);
  auto* info = reinterpret_cast<int32_t*>(mh + dl.info);
  auto* slots = reinterpret_cast<int64_t*>(mh + dl.slots);
  auto* ids = reinterpret_cast<int32_t*>(mh + dl.ids);
  auto* positions = reinterpret_cast<int32_t*>(mh + dl.positions);
  auto* ctx_lens = reinterpret_cast<int32_t*>(mh + dl.context_lens);
  auto* tables = reinterpret_cast<int32_t*>(mh + dl.block_tables);
  info[0] = S;
  info[1] = pitch;
  for (int i = 0; i < B; ++i) {
    if (i < S) {
      const SequenceInput& seq = batch.seqs[i];
      const int pos = batch.positions[i];
      slots[i] = static_cast<int64_t>(seq.block_table[pos / kv_block_size_]) * kv_block_size_ +
                 pos % kv_block_size_;
      ids[i] = batch.token_ids[i];
      positions[i] = pos;
      ctx_lens[i] = seq.context_len;
      const int n = std::min(pitch, static_cast<int>(seq.block_table.size()));
      int32_t* row = tables + static_cast<size_t>(i) * pitch;
      std::copy(seq.block_table.begin(), seq.block_table.begin() + n, row);
      std::fill(row + n, row + pitch, 0);
    } else {  // padding row: writes no KV slot, attends to nothing
      slots[i] = -1;
      ids[i] = 0;
      positions[i] = 0;
      ctx_lens[i] = 0;
    }
  }
  const size_t upload = dl.block_tables + sizeof(int32_t) * static_cast<size_t>(S) * pitch;
  PHI_RETURN_IF_ERROR(PlanLora(batch, /*decode=*/true, B));
  // Steps with adapter rows have their own graphs (the LoRA launches are part of them). Base
  // steps whose contexts change a choice (DecodeVariant) replay that variant of their bucket.
  const bool lora = lora_->active();
  CudaGraphRunner& graphs = lora ? *lora_graphs_ : *graphs_;
  const int variant = lora ? 0 : DecodeVariantOf(batch, B);
  // set_decode_stream_host_logits: the stream's LM head form writes a 1-row step's logits into
  // the staging itself; a sentinel in its first word shows after the step whether it did.
  const bool host_row0 = stream_host_logits_ && StreamTakesDecode(B) && StreamHeadForm() &&
                         batch.logit_rows.size() == 1 && batch.logit_rows[0] == 0 &&
                         !(greedy_step_ && !batch.greedy_rows.empty() && batch.greedy_rows[0] != 0);
  if (host_row0) std::memcpy(logits_host_, &kHostLogitsSentinelBits, sizeof(float));
  StepTimerStart();
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceCopyToDevice(decode_dev_, decode_host_, upload, stream_),
                                   "decode inputs upload"));
  PhaseTimerStart(0);
  if (use_graphs_ && graphs.Has(B, variant)) {
    PHI_RETURN_IF_ERROR(graphs.Replay(B, stream_, variant));
    last_decode_splits_ =
        PagedDecodeCudaMaxSplits(std::max(1, B / 2), config_.num_attention_heads, multiprocessors_);
  } else {
    PHI_RETURN_IF_ERROR(EnqueueDecode(B, variant));
    if (use_graphs_) {
      // Captured after the bucket's first eager step, so module loading and cuBLASLt's plan
      // building happen outside the capture. A failed capture leaves the model eager.
      absl::Status st = graphs.Capture(
          B, stream_, [&] { return EnqueueDecode(B, variant); }, variant);
      if (!st.ok()) {
        // Nothing ran during the capture (the eager step above did the work), so an op refusing
        // to be captured is no device fault; a real one shows in the step's sync below.
        // Ranks must all replay or all run eager (their NCCL calls pair up): no fallback.
        if (shard_.sharded()) return TpFailed(st, "decode graph capture");
        PHI_LOG(WARNING) << "decode steps stay eager: " << st;
        healthy_ = true;
        use_graphs_ = false;
        DropGraphs();
      }
    }
  }
  PhaseTimerStop(0);
  PhaseTimerStart(1);
  const ArenaLayout al = MakeArenaLayout(config_, arena_tokens_);
  return CopyLogitsOut(batch,
                       reinterpret_cast<const float*>(static_cast<char*>(arena_) + al.logits), B,
                       logits, view, host_row0);
}

// Requested rows of the device logits [rows, VocabPad(V)] -> pinned staging (one 2-D copy per
// run of consecutive rows) -> `logits` [R, V], or `*view` onto the staging itself; ends the step
// with its stream sync.
absl::Status CudaPhiModel::CopyLogitsOut(const ForwardBatch& batch, const float* d_logits,
                                         int step_rows, std::vector<float>* logits,
                                         absl::Span<const float>* view, bool host_row0) {
  const int V = full_config_.vocab_size, R = static_cast<int>(batch.logit_rows.size());
  // ForwardGreedy: marked rows are chosen on the device and not downloaded.
  const bool greedy = greedy_step_ && !batch.greedy_rows.empty();
  if (greedy) PHI_RETURN_IF_ERROR(EnqueueGreedyPicks(batch, d_logits, step_rows));
  const auto skip = [&](int r) {
    return (greedy && batch.greedy_rows[r] != 0) || (host_row0 && r == 0);
  };
  for (int r = 0; r < R;) {
    if (skip(r)) {
      ++r;
      continue;
    }
    int n = 1;
    while (r + n < R && !skip(r + n) && batch.logit_rows[r + n] == batch.logit_rows[r] + n) ++n;
    PHI_RETURN_IF_ERROR(DownloadLogitRows(logits_host_ + static_cast<size_t>(r) * V, d_logits,
                                          batch.logit_rows[r], n, step_rows));
    r += n;
  }
  PhaseTimerStop(1);
  if (absl::Status st = SyncStep(); !st.ok()) {
    healthy_ = false;
    return st;
  }
  if (host_row0 && std::memcmp(logits_host_, &kHostLogitsSentinelBits, sizeof(float)) == 0) {
    // The step did not write them (a bug in the conditions): download them after all.
    if (host_logits_misses_++ == 0) {
      PHI_LOG(ERROR) << "decode stream: the step's logits were not written to the host staging; "
                        "downloading them (counted in decode_stream_host_logits_misses)";
    }
    PHI_RETURN_IF_ERROR(DownloadLogitRows(logits_host_, d_logits, 0, 1, step_rows));
    if (absl::Status st = SyncStep(); !st.ok()) {
      healthy_ = false;
      return st;
    }
  }
  StepTimerStop();
  if (view != nullptr) {
    *view = absl::Span<const float>(logits_host_, static_cast<size_t>(R) * V);
    return absl::OkStatus();
  }
  logits->resize(static_cast<size_t>(R) * V);
  if (R > 0) CopyOut(logits->data(), logits_host_, static_cast<size_t>(R) * V);
  return absl::OkStatus();
}

absl::Status CudaPhiModel::CaptureDecodeGraphs(int max_batch) {
  if (kv_ == nullptr) {
    return absl::FailedPreconditionError("decode graphs need the KV cache (AllocateKvCache first)");
  }
  // The GEMM tuning (model/cuda_gemm_tune.cc; first call only). Its failure keeps the
  // heuristic's picks and goes on to the capture, as every tensor-parallel rank must (its padding
  // steps run the all-reduces); a broken device fails the capture itself.
  if (absl::Status st = TuneGemms(max_batch); !st.ok()) {
    Log(LogLevel::kWarning,
        absl::StrCat("GEMM tuning failed, cuBLASLt's heuristic picks kept: ", st.message()));
  }
  if (!use_graphs_) return absl::OkStatus();
  DeviceSet(device_);
  lora_->Deactivate();  // base-model graphs: no adapter rows
  const DecodeLayout dl =
      MakeDecodeLayout(decode_rows_, decode_table_ints_, config_.num_attention_heads);
  for (int b : graphs_->buckets()) {
    if (b > max_batch) continue;
    // An all-padding step: live 0, no KV slot written, every attention row empty.
    char* mh = static_cast<char*>(decode_host_);
    auto* info = reinterpret_cast<int32_t*>(mh + dl.info);
    info[0] = 0;
    info[1] = 1;
    for (int i = 0; i < b; ++i) {
      reinterpret_cast<int64_t*>(mh + dl.slots)[i] = -1;
      reinterpret_cast<int32_t*>(mh + dl.ids)[i] = 0;
      reinterpret_cast<int32_t*>(mh + dl.positions)[i] = 0;
      reinterpret_cast<int32_t*>(mh + dl.context_lens)[i] = 0;
    }
    PHI_RETURN_IF_ERROR(DeviceStatus(
        DeviceCopyToDevice(decode_dev_, decode_host_, dl.block_tables, stream_), "upload"));
    // Every variant a step of the bucket may be in (DecodeVariantPossible).
    for (int v = 0; v < kDecodeGraphVariants; ++v) {
      if (graphs_->Has(b, v) || !DecodeVariantPossible(b, v)) continue;
      PHI_RETURN_IF_ERROR(EnqueueDecode(b, v));
      if (absl::Status st = graphs_->Capture(
              b, stream_, [&] { return EnqueueDecode(b, v); }, v);
          !st.ok()) {
        healthy_ = true;  // as in DecodeStep: a refused capture ran nothing
        use_graphs_ = false;
        DropGraphs();
        return st;
      }
      PHI_RETURN_IF_ERROR(SyncStep());
    }
  }
  return absl::OkStatus();
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
