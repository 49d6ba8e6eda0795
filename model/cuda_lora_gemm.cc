// The GEMM form of CudaLora for long steps (model/cuda_lora.h, kernels/cuda/lora_gemm_cuda.h):
// per layer, gather the step's adapters into concatenated A / B matrices, cuBLASLt shrinks into
// a float32 t, mask to each row's own adapter window (scale applied, rounded to the storage
// type), cuBLASLt expands with beta = 1 into the base outputs: one GEMM over every row against
// the concatenated B, or (segmented steps) one GEMM per segment against its adapter's columns.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/sgmv_cuda.h"
#include "model/cuda_lora.h"

namespace phishard {
namespace {

constexpr size_t kAlign = 256;
constexpr int kMaxGemmAdapters = 64;
// Widest concatenated rank axis: the expand GEMMs multiply by R (the work for other adapters'
// rows is zeros), so more adapters than this per step run the SGMV kernels instead.
constexpr int kMaxGemmRankCols = 256;

size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

constexpr int kQ = 0, kK = 1, kV = 2, kDense = 3, kFc1 = 4, kFc2 = 5;
// Column blocks of t / T: q, k, v, fc1 (x = the LayerNorm output), dense, fc2.
constexpr int kBlockTarget[6] = {kQ, kK, kV, kFc1, kDense, kFc2};

}  // namespace

void CudaLora::FreeGemm() {
  if (gemm_ws_) DeviceFree(gemm_ws_);
  if (gemm_map_dev_) DeviceFree(gemm_map_dev_);
  if (gemm_map_host_) DeviceFreeHost(gemm_map_host_);
  gemm_ws_ = gemm_map_dev_ = gemm_map_host_ = nullptr;
  gemm_map_rows_ = 0;
  gemm_.reset();
  DeviceEventDestroy(prefetch_fork_ev_);
  DeviceEventDestroy(prefetch_done_ev_);
  prefetch_fork_ev_ = prefetch_done_ev_ = nullptr;
}

absl::Status CudaLora::EnsureGemmBuffers(int rows, cudaStream_t stream) {
  if (gemm_failed_) return absl::OkStatus();
  if (gemm_ == nullptr) {
    if (KernelStatus st = CudaGemm::Create(kLoraGemmCublasBytes, &gemm_); st != KernelStatus::kOk) {
      PHI_LOG(WARNING) << "LoRA GEMM form unavailable (cuBLASLt setup failed on device " << device_
                       << "): long steps use the SGMV kernels";
      DeviceGetLastError();
      gemm_failed_ = true;
      return absl::OkStatus();
    }
    gemm_->RequireFloat32SplitK();  // the expands' hi + lo (kernels/cuda/gemm_cuda.h)
  }
  if (prefetch_fork_ev_ == nullptr) {  // GemmPrefetch's (none: every layer gathers in line)
    if (DeviceEventCreate(&prefetch_fork_ev_) != 0 || DeviceEventCreate(&prefetch_done_ev_) != 0) {
      DeviceGetLastError();
      DeviceEventDestroy(prefetch_fork_ev_);
      prefetch_fork_ev_ = nullptr;
    }
  }
  if (gemm_ws_ == nullptr) {
    if (int err = DeviceMalloc(&gemm_ws_, kLoraGemmWorkspaceBytes); err != 0) {
      DeviceGetLastError();
      gemm_ws_ = nullptr;
      return absl::ResourceExhaustedError(
          absl::StrFormat("cannot allocate %d bytes of LoRA GEMM workspace on CUDA device %d: %s",
                          kLoraGemmWorkspaceBytes, device_, DeviceErrorString(err)));
    }
  }
  const size_t map_bytes = kMaxGemmAdapters * sizeof(LoraStepAdapter) + sizeof(int32_t) * rows;
  if (rows > gemm_map_rows_) {
    if (int err = DeviceStreamSync(stream); err != 0) {  // the old staging may still be read
      DeviceGetLastError();
      return absl::InternalError(absl::StrFormat("CUDA synchronize failed on device %d: %s",
                                                 device_, DeviceErrorString(err)));
    }
    if (gemm_map_dev_) DeviceFree(gemm_map_dev_);
    if (gemm_map_host_) DeviceFreeHost(gemm_map_host_);
    gemm_map_dev_ = gemm_map_host_ = nullptr;
    gemm_map_rows_ = 0;
    int err = DeviceMalloc(&gemm_map_dev_, map_bytes);
    if (err == 0) err = DeviceMallocHost(&gemm_map_host_, map_bytes);
    if (err != 0) {
      DeviceGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrFormat("cannot allocate the LoRA GEMM row map (%d rows) on CUDA device %d: %s",
                          rows, device_, DeviceErrorString(err)));
    }
    gemm_map_rows_ = rows;
  }
  return absl::OkStatus();
}

absl::Status CudaLora::PlanGemm(const ForwardBatch& batch, cudaStream_t stream) {
  gemm_step_ = false;
  gemm_double_ = false;
  gemm_qkv_merge_step_ = false;
  if (prefetch_layer_ >= 0) {  // a step that stopped early: its prefetch reads the row map
    prefetch_layer_ = -1;
    if (int err = DeviceStreamWaitEvent(stream, prefetch_done_ev_); err != 0) {
      DeviceGetLastError();
      return absl::InternalError(absl::StrFormat("CUDA stream wait failed on device %d: %s",
                                                 device_, DeviceErrorString(err)));
    }
  }
  qkv_first_layer_ = -1;
  if (gemm_failed_) return absl::OkStatus();
  const PhiConfig& c = config_;
  const int H = c.hidden_size, A = c.num_attention_heads * c.head_dim, I = c.intermediate_size;
  const int nq = c.num_attention_heads * c.head_dim, nkv = c.num_key_value_heads * c.head_dim;
  if (((H | A | I) & 7) != 0) return absl::OkStatus();  // the gather copies 16-byte rows
  // The step's adapters in order of first use, each at a window of width max rank (rounded to 8).
  const int S = static_cast<int>(batch.seqs.size());
  const int T = batch.num_tokens();
  std::vector<int> index_of(slots_.size(), -1);
  std::vector<LoraStepAdapter> ads;
  int R = 0, max_width = 0;
  for (int i = 0; i < S; ++i) {
    const int slot = seq_slot_[i];
    if (slot < 0 || index_of[slot] >= 0) continue;
    const int width = (slots_[slot].max_rank + 7) / 8 * 8;
    if (static_cast<int>(ads.size()) == kMaxGemmAdapters || R + width > kMaxGemmRankCols) {
      return absl::OkStatus();
    }
    index_of[slot] = static_cast<int>(ads.size());
    ads.push_back({slot, R, width, 0});
    R += width;
    max_width = std::max(max_width, width);
  }
  if (R == 0) return absl::OkStatus();
  // The step's runs of rows, in row order: adapter segments (one adapter's consecutive rows) and
  // base runs (rows without an adapter); sequences without new tokens do not break a run. Built
  // once here: whether the step is segmented decides the workspace layout below.
  std::vector<LoraSegment> segments, base_runs;
  int adapter_rows = 0;
  for (int i = 0, row = 0, last = -2; i < S; ++i) {
    const int a = seq_slot_[i] < 0 ? -1 : index_of[seq_slot_[i]];
    const int n = batch.seqs[i].num_new_tokens;
    if (n > 0) {
      std::vector<LoraSegment>& runs = a < 0 ? base_runs : segments;
      if (a == last) {
        runs.back().rows += n;
      } else {
        runs.push_back({row, n, a < 0 ? 0 : ads[a].col, a < 0 ? 0 : ads[a].width});
      }
      last = a;
      if (a >= 0) adapter_rows += n;
    }
    row += n;
  }
  const int num_segments = static_cast<int>(segments.size());
  const bool segmented =
      num_segments <= gemm_max_segments_ && adapter_rows >= gemm_segment_rows_ * num_segments;
  // Workspace layout (see cuda_lora.h).
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = AlignUp(off + bytes);
    return at;
  };
  const size_t t_off = take(static_cast<size_t>(T) * 6 * R * sizeof(float));
  const int tw = gemm_split_t_ ? 2 : 1;  // T columns per rank column (hi, lo)
  const size_t tm_off = take(static_cast<size_t>(T) * 6 * tw * R * 2);
  const size_t mats_off = off;
  // The layer's matrices; a second set (the next layer's, GemmPrefetch) when it fits too.
  struct MatOffsets {
    size_t aq, ad, af, bq, bk, bv, bf, br, bqkv = 0;
  };
  // B_qkv of the merged q / k / v expand: [nq + 2 nkv, 3 w W per adapter].
  const int qkv_ldb = 3 * tw * max_width * static_cast<int>(ads.size());
  const size_t bqkv_bytes = static_cast<size_t>(nq + 2 * nkv) * qkv_ldb * 2;
  auto take_mats = [&](bool merged) {
    MatOffsets o;
    o.aq = take(static_cast<size_t>(4) * R * H * 2);
    o.ad = take(static_cast<size_t>(R) * A * 2);
    o.af = take(static_cast<size_t>(R) * I * 2);
    o.bq = take(static_cast<size_t>(nq) * tw * R * 2);
    o.bk = take(static_cast<size_t>(nkv) * tw * R * 2);
    o.bv = take(static_cast<size_t>(nkv) * tw * R * 2);
    o.bf = take(static_cast<size_t>(I) * tw * R * 2);
    o.br = take(static_cast<size_t>(H) * 2 * tw * R * 2);
    if (merged) o.bqkv = take(bqkv_bytes);
    return o;
  };
  // With B_qkv when two sets of it fit (segmented steps), else without.
  bool merged = gemm_qkv_merge_ && segmented;
  MatOffsets m0 = take_mats(merged), m1 = take_mats(merged);
  if (merged && off > kLoraGemmWorkspaceBytes) {
    merged = false;
    off = mats_off;
    m0 = take_mats(false);
    m1 = take_mats(false);
  }
  const bool two_sets = off <= kLoraGemmWorkspaceBytes;
  if (!two_sets) {  // one set (the first) is all the step needs
    off = mats_off;
    m0 = take_mats(false);
    if (off > kLoraGemmWorkspaceBytes) return absl::OkStatus();
  }

  if (absl::Status st = EnsureGemmBuffers(T, stream); !st.ok() || gemm_failed_) return st;
  auto* ad_host = static_cast<LoraStepAdapter*>(gemm_map_host_);
  auto* rows_host = reinterpret_cast<int32_t*>(ad_host + kMaxGemmAdapters);
  std::copy(ads.begin(), ads.end(), ad_host);
  for (int i = 0, row = 0; i < S; ++i) {  // the row -> adapter index map
    const int n = batch.seqs[i].num_new_tokens;
    std::fill_n(rows_host + row, n, seq_slot_[i] < 0 ? -1 : index_of[seq_slot_[i]]);
    row += n;
  }
  gemm_segments_ = std::move(segments);
  gemm_base_runs_ = std::move(base_runs);
  gemm_segmented_ = segmented;
  gemm_ldt_ = 6 * tw * (gemm_segmented_ ? max_width : R);
  gemm_shrink_segmented_ = gemm_segmented_ && gemm_segment_shrink_ && !gemm_sgmv_shrink_;
  gemm_qkv_merge_step_ = merged && gemm_segmented_;
  gemm_qkv_ldb_ = qkv_ldb;
  gemm_qkv_segments_.clear();
  for (const LoraSegment& g : gemm_segments_) {
    const int a =
        static_cast<int>(std::find_if(ads.begin(), ads.end(),
                                      [&](const LoraStepAdapter& d) { return d.col == g.col; }) -
                         ads.begin());
    gemm_qkv_segments_.push_back({g.row, g.rows, a * max_width, max_width});
  }
  const size_t map_bytes = kMaxGemmAdapters * sizeof(LoraStepAdapter) + sizeof(int32_t) * T;
  if (int err = DeviceCopyToDevice(gemm_map_dev_, gemm_map_host_, map_bytes, stream); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA LoRA row map upload failed on device %d: %s",
                                               device_, DeviceErrorString(err)));
  }
  char* ws = static_cast<char*>(gemm_ws_);
  for (int set = 0; set < 2; ++set) {
    const MatOffsets& o = set == 1 && two_sets ? m1 : m0;
    GemmBufs& g = gemm_sets_[set];
    g.t = reinterpret_cast<float*>(ws + t_off);
    g.tm = ws + tm_off;
    g.a_qkvf = ws + o.aq;
    g.a_dense = ws + o.ad;
    g.a_fc2 = ws + o.af;
    g.b_q = ws + o.bq;
    g.b_k = ws + o.bk;
    g.b_v = ws + o.bv;
    g.b_fc1 = ws + o.bf;
    g.b_res = ws + o.br;
    g.b_qkv = merged ? ws + o.bqkv : nullptr;
  }
  if (gemm_qkv_merge_step_) {
    // B_qkv's zeros (off the diagonal, past each adapter's width) and T's unused columns (an
    // adapter narrower than W): never written by the gathers / masks, read by the merged expand.
    const size_t tm_bytes = static_cast<size_t>(T) * gemm_ldt_ * 2;
    int err = DeviceMemset(ws + tm_off, 0, tm_bytes, stream);
    for (int set = 0; set < 2 && err == 0; ++set) {
      err = DeviceMemset(gemm_sets_[set].b_qkv, 0, bqkv_bytes, stream);
    }
    if (err != 0) {
      DeviceGetLastError();
      return absl::InternalError(absl::StrFormat(
          "CUDA LoRA workspace zeroing failed on device %d: %s", device_, DeviceErrorString(err)));
    }
  }
  gb_ = gemm_sets_[0];
  gemm_double_ = two_sets;
  gemm_r_ = R;
  gemm_adapters_ = static_cast<int>(ads.size());
  gemm_max_width_ = max_width;
  gemm_step_ = true;
  return absl::OkStatus();
}

KernelStatus CudaLora::Gemm(const GemmParams& p, DataType y_dtype, cudaStream_t stream) {
  const KernelStatus st = gemm_->Run(p, y_dtype, stream);
  if (st != KernelStatus::kOk) {
    PHI_LOG(ERROR) << "LoRA GEMM [" << p.m << " x " << p.n << " x " << p.k
                   << "] failed: " << gemm_->last_error();
  }
  return st;
}

KernelStatus CudaLora::GemmSegmentExpand(int t_col, int parts, const void* b, int ldb, void* y,
                                         int ldy, int n, GemmEpilogue act, cudaStream_t stream,
                                         bool accumulate) {
  const KernelStatus st =
      LoraSegmentExpandCuda(*gemm_,
                            {.t = gb_.tm,
                             .ldt = gemm_ldt_,
                             .t_col = t_col,
                             .b = b,
                             .ldb = ldb,
                             .y = y,
                             .ldy = ldy,
                             .n = n,
                             .parts = parts,
                             .segments = gemm_segments_.data(),
                             .num_segments = static_cast<int>(gemm_segments_.size()),
                             .act = act,
                             .dtype = dtype_,
                             .accumulate = accumulate},
                            stream);
  if (st != KernelStatus::kOk) {
    PHI_LOG(ERROR) << "LoRA segment expand [n " << n << ", parts " << parts
                   << "] failed: " << gemm_->last_error();
  }
  return st;
}

KernelStatus CudaLora::GemmSegmentShrink(const void* x, int ldx, int k, const void* a, int blocks,
                                         int t_col, cudaStream_t stream) {
  const KernelStatus st =
      LoraSegmentShrinkCuda(*gemm_,
                            {.x = x,
                             .ldx = ldx,
                             .k = k,
                             .a = a,
                             .blocks = blocks,
                             .t = gb_.t,
                             .ldt = 6 * gemm_max_width_,
                             .t_col = t_col,
                             .segments = gemm_segments_.data(),
                             .num_segments = static_cast<int>(gemm_segments_.size()),
                             .dtype = dtype_},
                            stream);
  if (st != KernelStatus::kOk) {
    PHI_LOG(ERROR) << "LoRA segment shrink [k " << k << ", blocks " << blocks
                   << "] failed: " << gemm_->last_error();
  }
  return st;
}

// T blocks [first, first + n) from t (the GEMM shrinks' concatenated layout, the segmented
// shrinks' compact one, or the SGMV shrinks' per-module one).
KernelStatus CudaLora::GemmMask(int layer, int first_block, int num_blocks, cudaStream_t stream) {
  const int R = gemm_r_, tw = gemm_split_t_ ? 2 : 1;
  const auto* ads = static_cast<const LoraStepAdapter*>(gemm_map_dev_);
  LoraMaskParams mp;
  mp.t = gemm_sgmv_shrink_ ? t_dev_ : gb_.t;
  mp.ldt = gemm_sgmv_shrink_ ? 6 * rank_cap_ : 6 * R;
  mp.t_per_module = gemm_sgmv_shrink_;
  for (int b = 0; b < 6; ++b) mp.t_block_col[b] = kBlockTarget[b] * rank_cap_;
  mp.out = gb_.tm;
  mp.ldo = gemm_ldt_;
  mp.split = gemm_split_t_;
  if (gemm_shrink_segmented_) {
    // A row's own q, k, v, fc1 blocks at b width_a, dense at 4 W, fc2 at 5 W (GemmSegmentShrink).
    const int W = gemm_max_width_;
    mp.ldt = 6 * W;
    mp.t_per_module = true;
    for (int b = 0; b < 6; ++b) {
      mp.t_block_col[b] = b < 4 ? 0 : b * W;
      mp.t_block_slot[b] = b < 4 ? b : 0;
    }
  }
  if (gemm_segmented_) {
    // Blocks q, k, v, fc1 of tw W columns, then dense and fc2 side by side per adapter.
    const int W = gemm_max_width_;
    mp.compact = true;
    mp.compact_width = W;
    for (int b = 0; b < 6; ++b) {
      mp.out_block_col[b] = std::min(b, 4) * tw * W;
      mp.out_block_slot[b] = b == 5 ? 1 : 0;
    }
  }
  mp.row_adapter = reinterpret_cast<const int32_t*>(ads + kMaxGemmAdapters);
  mp.adapters = ads;
  mp.num_adapters = gemm_adapters_;
  mp.table = table_dev_;
  mp.stride = stride();
  mp.num_slots = static_cast<int>(slots_.size());
  mp.rows = rows_;
  mp.rank_cols = R;
  mp.first_block = first_block;
  mp.num_blocks = num_blocks;
  // A module no adapter of the step has (its shrink did not run) is masked to zeros by rank 0.
  for (int b = 0; b < 6; ++b) mp.entries[b] = Entry(layer, kBlockTarget[b]);
  mp.dtype = dtype_;
  return LoraMaskCuda(mp, stream);
}

// Every matrix of `layer` into m (zeros where an adapter lacks a module), so that the GEMMs
// never read stale values: T's other columns are exact zeros, but 0 x NaN would not be.
KernelStatus CudaLora::GemmGather(int layer, const GemmBufs& m, cudaStream_t stream) {
  const PhiConfig& c = config_;
  const int H = c.hidden_size, A = c.num_attention_heads * c.head_dim, I = c.intermediate_size;
  const int nq = c.num_attention_heads * c.head_dim, nkv = c.num_key_value_heads * c.head_dim;
  const int R = gemm_r_;
  LoraGatherParams gp;
  auto job = [&](void* dst, bool is_b, int target, int dim, int ld, int base, int col_mul = 1,
                 int width_slot = 0, int index_mul = 0) {
    gp.jobs[gp.num_jobs++] = {dst,  is_b,    Entry(layer, target), dim,      ld,
                              base, col_mul, width_slot,           index_mul};
  };
  // A_qkvf: blocks q, k, v, fc1 of R rows, or (segmented shrinks) adapter a's four blocks side
  // by side at rows 4 col_a (one GEMM of n = 4 width_a a segment).
  const bool seg_a = gemm_shrink_segmented_;
  job(m.a_qkvf, false, kQ, H, 0, 0, seg_a ? 4 : 1, 0);
  job(m.a_qkvf, false, kK, H, 0, seg_a ? 0 : R, seg_a ? 4 : 1, seg_a ? 1 : 0);
  job(m.a_qkvf, false, kV, H, 0, seg_a ? 0 : 2 * R, seg_a ? 4 : 1, seg_a ? 2 : 0);
  job(m.a_qkvf, false, kFc1, H, 0, seg_a ? 0 : 3 * R, seg_a ? 4 : 1, seg_a ? 3 : 0);
  job(m.a_dense, false, kDense, A, 0, 0);
  job(m.a_fc2, false, kFc2, I, 0, 0);
  // B blocks match T's: [B] per module, or [B | B] against [T_hi | T_lo] when T is split.
  const int tw = gemm_split_t_ ? 2 : 1;
  // Segmented steps: adapter a's parts side by side at tw col_a ([B | B] per adapter; the
  // residual's [B_dense | B_dense | B_fc2 | B_fc2] at 2 tw col_a), matching the compact T.
  // Merged q / k / v expand: B_qkv [nq + 2 nkv, ldb], adapter a's block at columns 3 tw W a,
  // in it B_q's rows 0 .. nq at [0, tw W), B_k's next nkv rows at [tw W, 2 tw W), B_v's at
  // [2 tw W, 3 tw W) (each [B | B] at width_a; the rest stays PlanGemm's zeros).
  const int W = gemm_max_width_, ldq = gemm_qkv_ldb_;
  char* bqkv = static_cast<char*>(m.b_qkv);
  const bool merged = GemmQkvMerged(layer);
  for (int h = 0; h < tw && merged; ++h) {
    job(bqkv, true, kQ, nq, ldq, 0, 0, h, 3 * tw * W);
    job(bqkv + static_cast<size_t>(nq) * ldq * 2, true, kK, nkv, ldq, tw * W, 0, h, 3 * tw * W);
    job(bqkv + static_cast<size_t>(nq + nkv) * ldq * 2, true, kV, nkv, ldq, 2 * tw * W, 0, h,
        3 * tw * W);
  }
  for (int h = 0; h < tw && gemm_segmented_; ++h) {
    if (!merged) {
      job(m.b_q, true, kQ, nq, tw * R, 0, tw, h);
      job(m.b_k, true, kK, nkv, tw * R, 0, tw, h);
      job(m.b_v, true, kV, nkv, tw * R, 0, tw, h);
    }
    job(m.b_fc1, true, kFc1, I, tw * R, 0, tw, h);
    job(m.b_res, true, kDense, H, 2 * tw * R, 0, 2 * tw, h);
    job(m.b_res, true, kFc2, H, 2 * tw * R, 0, 2 * tw, tw + h);
  }
  for (int h = 0; h < tw && !gemm_segmented_; ++h) {
    job(m.b_q, true, kQ, nq, tw * R, h * R);
    job(m.b_k, true, kK, nkv, tw * R, h * R);
    job(m.b_v, true, kV, nkv, tw * R, h * R);
    job(m.b_fc1, true, kFc1, I, tw * R, h * R);
    job(m.b_res, true, kDense, H, 2 * tw * R, h * R);
    job(m.b_res, true, kFc2, H, 2 * tw * R, tw * R + h * R);
  }
  gp.table = table_dev_;
  gp.stride = stride();
  gp.num_slots = static_cast<int>(slots_.size());
  gp.adapters = static_cast<const LoraStepAdapter*>(gemm_map_dev_);
  gp.num_adapters = gemm_adapters_;
  gp.max_width = gemm_max_width_;
  gp.chunks_per_thread = gather_chunks_;
  gp.dtype = dtype_;
  return LoraGatherCuda(gp, stream);
}

bool CudaLora::GemmQkvMerged(int layer) const {
  return gemm_qkv_merge_step_ && Launch(Entry(layer, kQ)) && Launch(Entry(layer, kK)) &&
         Launch(Entry(layer, kV));
}

bool CudaLora::GemmLayerAdapted(int layer) const {
  bool any = false;
  for (int t : {kQ, kK, kV, kFc1, kDense, kFc2}) any = any || Launch(Entry(layer, t));
  return any;
}

KernelStatus CudaLora::GemmLayerMats(int layer, cudaStream_t stream) {
  gb_ = gemm_sets_[gemm_double_ ? layer & 1 : 0];
  if (prefetch_layer_ >= 0) {  // a prefetch is in flight: wait for it, whichever layer it has
    const bool mine = prefetch_layer_ == layer;
    prefetch_layer_ = -1;
    if (DeviceStreamWaitEvent(stream, prefetch_done_ev_) != 0) {
      DeviceGetLastError();
      return KernelStatus::kDeviceError;
    }
    if (mine) return KernelStatus::kOk;
  }
  return GemmGather(layer, gb_, stream);
}

KernelStatus CudaLora::GemmPrefetch(int layer, cudaStream_t stream) {
  if (!gemm_double_ || !gemm_prefetch_ || prefetch_layer_ >= 0 || side_ == nullptr ||
      prefetch_fork_ev_ == nullptr || layer >= config_.num_hidden_layers ||
      !GemmLayerAdapted(layer)) {
    return KernelStatus::kOk;
  }
  // Set layer & 1 was last read by layer - 2, whose every reader ran on `stream` (or on the MLP
  // branch, joined before that layer's dense GEMM) before this point.
  if (DeviceEventRecord(prefetch_fork_ev_, stream) != 0 ||
      DeviceStreamWaitEvent(side_, prefetch_fork_ev_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  const KernelStatus st = GemmGather(layer, gemm_sets_[layer & 1], side_);
  // Recorded even after a failed launch, so that the wait in GemmLayerMats stays well-formed.
  if (DeviceEventRecord(prefetch_done_ev_, side_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  prefetch_layer_ = layer;
  ++prefetched_layers_;
  return st;
}

KernelStatus CudaLora::GemmAfterQkv(int layer, const void* normed, void* qkv, cudaStream_t stream) {
  if (layer == qkv_first_layer_) return KernelStatus::kOk;  // GemmQkvDeltaFirst wrote them
  return GemmQkv(layer, normed, qkv, /*first=*/false, stream);
}

// first: qkv = the deltas (beta = 0, base rows zeroed) before the qkv GEMM, which then adds to
// them (GemmQkvDeltaFirst); otherwise qkv += the deltas after it.
KernelStatus CudaLora::GemmQkv(int layer, const void* normed, void* qkv, bool first,
                               cudaStream_t stream) {
  const PhiConfig& c = config_;
  const int H = c.hidden_size;
  const int nq = c.num_attention_heads * c.head_dim, nkv = c.num_key_value_heads * c.head_dim;
  const int R = gemm_r_, T = rows_, tw = gemm_split_t_ ? 2 : 1;
  if (!GemmLayerAdapted(layer)) return KernelStatus::kOk;
  // The layer's matrices: gathered now, or by the prefetch forked during the layer before.
  if (KernelStatus st = GemmLayerMats(layer, stream); st != KernelStatus::kOk) return st;
  bool qkvf = false;
  for (int t : {kQ, kK, kV, kFc1}) qkvf = qkvf || Launch(Entry(layer, t));
  if (!qkvf) return KernelStatus::kOk;
  // t[:, 0 : 4R] = normed · A_qkvfᵀ (float32), T = mask(t) for blocks q, k, v, fc1.
  PHI_CHECK(T > 0);
  KernelStatus st = KernelStatus::kOk;
  if (gemm_sgmv_shrink_) {
    // Each row's own adapter, into t_dev_ (cuda_lora.h), as the SGMV steps do.
    st = SgmvGroupedShrinkCuda(QkvShrink(layer, normed), stream);
  } else if (gemm_shrink_segmented_) {
    st = GemmSegmentShrink(normed, H, H, gb_.a_qkvf, 4, 0, stream);
  } else {
    st = Gemm({.x = normed,
               .w = gb_.a_qkvf,
               .y = gb_.t,
               .m = T,
               .n = 4 * R,
               .k = H,
               .ldx = H,
               .ldy = 6 * R,
               .dtype = dtype_},
              DataType::kF32, stream);
  }
  if (st != KernelStatus::kOk) return st;
  if ((st = GemmMask(layer, 0, 4, stream)) != KernelStatus::kOk) return st;
  // qkv[:, window of q / k / v] += T_block · B_blockᵀ.
  const int width = nq + 2 * nkv;
  const int offsets[3] = {0, nq, nq + nkv}, outs[3] = {nq, nkv, nkv};
  void* bs[3] = {gb_.b_q, gb_.b_k, gb_.b_v};
  const bool merge = GemmQkvMerged(layer);
  if (merge) {  // qkv (+)= T[:, q | k | v blocks] · B_qkvᵀ, one GEMM a run of segments
    st = LoraSegmentExpandCuda(*gemm_,
                               {.t = gb_.tm,
                                .ldt = gemm_ldt_,
                                .t_col = 0,
                                .b = gb_.b_qkv,
                                .ldb = gemm_qkv_ldb_,
                                .y = qkv,
                                .ldy = width,
                                .n = width,
                                .parts = 3 * tw,
                                .segments = gemm_qkv_segments_.data(),
                                .num_segments = static_cast<int>(gemm_qkv_segments_.size()),
                                .act = GemmEpilogue::kNone,
                                .dtype = dtype_,
                                .accumulate = !first},
                               stream);
    if (st != KernelStatus::kOk) {
      PHI_LOG(ERROR) << "LoRA merged q / k / v expand [n " << width
                     << "] failed: " << gemm_->last_error();
      return st;
    }
    ++qkv_merged_layers_;
  }
  for (int t : {kQ, kK, kV}) {
    if (merge || !Launch(Entry(layer, t))) continue;
    if (gemm_segmented_) {
      st = GemmSegmentExpand(t * tw * gemm_max_width_, tw, bs[t], tw * R,
                             static_cast<char*>(qkv) + static_cast<size_t>(offsets[t]) * 2, width,
                             outs[t], GemmEpilogue::kNone, stream, /*accumulate=*/!first);
      if (st != KernelStatus::kOk) return st;
      continue;
    }
    st = Gemm({.x = static_cast<const char*>(gb_.tm) + static_cast<size_t>(t) * tw * R * 2,
               .w = bs[t],
               .y = static_cast<char*>(qkv) + static_cast<size_t>(offsets[t]) * 2,
               .m = T,
               .n = outs[t],
               .k = tw * R,
               .ldx = 6 * tw * R,
               .ldy = width,
               .accumulate = !first,
               .dtype = dtype_},
              dtype_, stream);
    if (st != KernelStatus::kOk) return st;
  }
  // The segmented expands wrote only the segments' rows: the base rows' qkv = 0 + their GEMM.
  if (first && gemm_segmented_ && (st = ZeroBaseRuns(qkv, width, stream)) != KernelStatus::kOk) {
    return st;
  }
  // Deltas first (unsharded steps): the next layer's gathers beside this layer's qkv GEMM,
  // rotary and attention.
  return first ? GemmPrefetch(layer + 1, stream) : KernelStatus::kOk;
}

KernelStatus CudaLora::ZeroBaseRuns(void* y, int width, cudaStream_t stream) {
  const size_t row_bytes = static_cast<size_t>(width) * DataTypeSize(dtype_);
  for (const LoraSegment& run : gemm_base_runs_) {
    if (int err = DeviceMemset(static_cast<char*>(y) + run.row * row_bytes, 0, run.rows * row_bytes,
                               stream);
        err != 0) {
      PHI_LOG(ERROR) << "LoRA base-row zeroing failed: " << DeviceErrorString(err);
      DeviceGetLastError();
      return KernelStatus::kDeviceError;
    }
  }
  return KernelStatus::kOk;
}

KernelStatus CudaLora::GemmQkvDeltaFirst(int layer, const void* normed, void* qkv, bool* first,
                                         cudaStream_t stream) {
  *first = false;
  if (!gemm_step_ || !gemm_delta_first_) return KernelStatus::kOk;
  for (int t : {kQ, kK, kV}) {
    if (!Launch(Entry(layer, t))) return KernelStatus::kOk;  // a window without a delta: after
  }
  if (KernelStatus st = GemmQkv(layer, normed, qkv, /*first=*/true, stream);
      st != KernelStatus::kOk) {
    return st;
  }
  qkv_first_layer_ = layer;
  ++qkv_first_layers_;
  *first = true;
  return KernelStatus::kOk;
}

absl::Status CudaLora::SetPrefillTuning(absl::string_view spec) {
  const std::vector<std::string> f = absl::StrSplit(spec, ':');
  if (f.size() > 5 || (f[0] != "0" && f[0] != "1") ||
      (f.size() >= 2 && f[1] != "1" && f[1] != "8") ||
      (f.size() >= 3 && f[2] != "0" && f[2] != "1") ||
      (f.size() >= 4 && f[3] != "0" && f[3] != "1") ||
      (f.size() == 5 && f[4] != "0" && f[4] != "1")) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "LoRA prefill tuning '%s': expected F[:G[:P[:M[:E]]]], F the q / k / v deltas first (1) "
        "or after (0), G the gathers' chunks a thread (1 or 8), P the next layer's gathers "
        "prefetched (1) or not (0), M the merged q / k / v expand (1) or three (0), E fc1's "
        "delta + GELU as one kernel (1) or cuBLASLt GEMMs (0)",
        spec));
  }
  gemm_delta_first_ = f[0] == "1";
  if (f.size() >= 2) gather_chunks_ = f[1] == "8" ? 8 : 1;
  if (f.size() >= 3) gemm_prefetch_ = f[2] == "1";
  if (f.size() >= 4) gemm_qkv_merge_ = f[3] == "1";
  if (f.size() == 5) gemm_fc1_kernel_ = f[4] == "1";
  return absl::OkStatus();
}

std::string CudaLora::PrefillTuning() const {
  return absl::StrFormat("%d:%d:%d:%d:%d", gemm_delta_first_ ? 1 : 0, gather_chunks_,
                         gemm_prefetch_ ? 1 : 0, gemm_qkv_merge_ ? 1 : 0, gemm_fc1_kernel_ ? 1 : 0);
}

// mlp = act(mlp + T_fc1 · B_fc1ᵀ): fc1 ran without its activation (SplitFc1); the epilogue (or,
// where cuBLASLt's cannot act on the accumulated sum, CudaGemm's separate kernel) applies it.
// PHISHARD_LORA_GEMM_FUSED_GELU=0 (read at construction) runs the GEMM without the epilogue and
// then the separate activation kernel (a diagnostic switch; the default fuses when CudaGemm's
// probe allows it).
KernelStatus CudaLora::GemmAfterFc1(int layer, void* mlp, GemmEpilogue act, cudaStream_t stream) {
  (void)layer;
  const int R = gemm_r_, I = config_.intermediate_size, tw = gemm_split_t_ ? 2 : 1;
  if (gemm_segmented_) {
    bool done = false;
    if (KernelStatus st = GemmFc1Kernel(mlp, act, stream, &done); st != KernelStatus::kOk || done) {
      return st;
    }
    // The segments' rows with the activation (when fused), then the base rows' activation.
    KernelStatus st = GemmSegmentExpand(3 * tw * gemm_max_width_, tw, gb_.b_fc1, tw * R, mlp, I, I,
                                        gemm_fused_gelu_ ? act : GemmEpilogue::kNone, stream);
    if (st != KernelStatus::kOk) return st;
    if (!gemm_fused_gelu_) {
      return GeluInPlaceCuda({.y = mlp, .rows = rows_, .cols = I, .act = act, .dtype = dtype_},
                             stream);
    }
    for (const LoraSegment& run : gemm_base_runs_) {
      st = GeluInPlaceCuda({.y = static_cast<char*>(mlp) + static_cast<size_t>(run.row) * I * 2,
                            .rows = run.rows,
                            .cols = I,
                            .act = act,
                            .dtype = dtype_},
                           stream);
      if (st != KernelStatus::kOk) return st;
    }
    return KernelStatus::kOk;
  }
  const KernelStatus st =
      Gemm({.x = static_cast<const char*>(gb_.tm) + static_cast<size_t>(3) * tw * R * 2,
            .w = gb_.b_fc1,
            .y = mlp,
            .m = rows_,
            .n = I,
            .k = tw * R,
            .ldx = 6 * tw * R,
            .ldy = I,
            .accumulate = true,
            .epilogue = gemm_fused_gelu_ ? act : GemmEpilogue::kNone,
            .dtype = dtype_},
           dtype_, stream);
  if (st != KernelStatus::kOk || gemm_fused_gelu_) return st;
  return GeluInPlaceCuda({.y = mlp, .rows = rows_, .cols = I, .act = act, .dtype = dtype_}, stream);
}

// h += [T_dense | T_fc2] · B_resᵀ: both deltas in one GEMM (one rounding of h).
KernelStatus CudaLora::GemmAfterResidual(int layer, const void* attn, const void* mlp, void* h,
                                         cudaStream_t stream) {
  const PhiConfig& c = config_;
  const int H = c.hidden_size, A = c.num_attention_heads * c.head_dim, I = c.intermediate_size;
  const int R = gemm_r_, T = rows_, tw = gemm_split_t_ ? 2 : 1;
  const bool dense = Launch(Entry(layer, kDense)), fc2 = Launch(Entry(layer, kFc2));
  if (!dense && !fc2) return KernelStatus::kOk;
  KernelStatus st = KernelStatus::kOk;
  if (gemm_sgmv_shrink_) {
    st = SgmvGroupedShrinkCuda(ResidualShrink(layer, attn, mlp), stream);  // as QkvShrink's
    if (st != KernelStatus::kOk) return st;
  }
  if (gemm_shrink_segmented_) {
    const int W = gemm_max_width_;
    if (dense &&
        (st = GemmSegmentShrink(attn, A, A, gb_.a_dense, 1, 4 * W, stream)) != KernelStatus::kOk) {
      return st;
    }
    if (fc2 &&
        (st = GemmSegmentShrink(mlp, I, I, gb_.a_fc2, 1, 5 * W, stream)) != KernelStatus::kOk) {
      return st;
    }
  }
  if (dense && !gemm_sgmv_shrink_ && !gemm_shrink_segmented_) {
    st = Gemm({.x = attn,
               .w = gb_.a_dense,
               .y = gb_.t + static_cast<size_t>(4) * R,
               .m = T,
               .n = R,
               .k = A,
               .ldx = A,
               .ldy = 6 * R,
               .dtype = dtype_},
              DataType::kF32, stream);
    if (st != KernelStatus::kOk) return st;
  }
  if (fc2 && !gemm_sgmv_shrink_ && !gemm_shrink_segmented_) {
    st = Gemm({.x = mlp,
               .w = gb_.a_fc2,
               .y = gb_.t + static_cast<size_t>(5) * R,
               .m = T,
               .n = R,
               .k = I,
               .ldx = I,
               .ldy = 6 * R,
               .dtype = dtype_},
              DataType::kF32, stream);
    if (st != KernelStatus::kOk) return st;
  }
  if ((st = GemmMask(layer, 4, 2, stream)) != KernelStatus::kOk) return st;
  if (gemm_segmented_) {
    return GemmSegmentExpand(4 * tw * gemm_max_width_, 2 * tw, gb_.b_res, 2 * tw * R, h, H, H,
                             GemmEpilogue::kNone, stream);
  }
  return Gemm({.x = static_cast<const char*>(gb_.tm) + static_cast<size_t>(4) * tw * R * 2,
               .w = gb_.b_res,
               .y = h,
               .m = T,
               .n = H,
               .k = 2 * tw * R,
               .ldx = 6 * tw * R,
               .ldy = H,
               .accumulate = true,
               .dtype = dtype_},
              dtype_, stream);
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
