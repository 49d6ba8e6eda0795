// CudaPhiModel::ApplySettings: CudaModelOptions' speed and schedule settings, each the option when
// given, else its environment variable (docs/flags.md, "Environment variables"), else the
// measured default (model/cuda_model_options.h). Called once by Init, before any step.
#ifdef PHISHARD_HAVE_CUDA

#include <cstdlib>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "kernels/cuda/gemv_cuda.h"
#include "model/cuda_gemm_choices.h"
#include "model/cuda_model_options.h"
#include "model/cuda_phi_model.h"
#include "model/decode_variant_rules.h"

namespace phishard {
namespace {

// `option` when >= 0; else the environment variable `name` when set (an integer in [0, max],
// INVALID_ARGUMENT naming it and `what` otherwise); else `fallback`. (The variable's name comes
// first: tests/deploy/check_deploy.py finds the variables the code reads as the first argument
// of calls named ...Env.)
absl::StatusOr<int> OptionOrEnv(const char* name, int option, int fallback, int max,
                                const char* what) {
  if (option >= 0) return option;
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  int value = 0;
  if (!absl::SimpleAtoi(v, &value) || value < 0 || value > max) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", v,
                                                   "' must be ", what, " in [0, ", max, "]"));
  }
  return value;
}

// The same for switches of one digit in [0, max]: the message says "0 or 1" / "0, 1 or 2".
absl::StatusOr<int> DigitEnv(const char* name, int option, int fallback, int max) {
  if (option >= 0) return option;
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string_view s(v);
  if (s.size() != 1 || s[0] < '0' || s[0] > '0' + max) {
    const std::string allowed = max == 1   ? "0 or 1"
                                : max == 2 ? "0, 1 or 2"
                                           : absl::StrCat("in [0, ", max, "]");
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, "='", v, "' must be ", allowed));
  }
  return s[0] - '0';
}

}  // namespace

absl::Status CudaPhiModel::ApplySettings(const CudaModelOptions& options, int cc_major) {
  use_graphs_ = options.cuda_graphs;
  gemv_max_rows_ = options.gemv_max_rows;
  gemv_single_segment_ = options.gemv_single_segment;
  pdl_ = options.pdl && cc_major >= 9;
  const absl::StatusOr<int> mlp_tp =
      DigitEnv("PHISHARD_MLP_STREAM_TP", options.mlp_stream_sharded, 0, 1);
  const absl::StatusOr<int> kv_store =
      DigitEnv("PHISHARD_PREFILL_KV_STORE", -1, prefill_kv_store_ ? 1 : 0, 1);
  const absl::StatusOr<int> last_rows =
      DigitEnv("PHISHARD_PREFILL_LAST_ROWS", -1, prefill_last_rows_ ? 1 : 0, 1);
  const absl::StatusOr<int> mlp_fork =
      DigitEnv("PHISHARD_PREFILL_MLP_FORK", -1, prefill_mlp_fork_ ? 1 : 0, 1);
  const absl::StatusOr<int> gelu_split =
      DigitEnv("PHISHARD_PREFILL_GELU_SPLIT", -1, prefill_gelu_split_ ? 1 : 0, 1);
  const absl::StatusOr<int> join_tp =
      DigitEnv("PHISHARD_MLP_JOIN_TP", options.mlp_join_sharded, 0, 2);
  const absl::StatusOr<int> mlp_mode =
      DigitEnv("PHISHARD_MLP_STREAM", options.mlp_stream, kMlpStreamDefault, 2);
  for (const absl::StatusOr<int>* v :
       {&mlp_tp, &kv_store, &last_rows, &mlp_fork, &gelu_split, &join_tp, &mlp_mode}) {
    PHI_RETURN_IF_ERROR(v->status());
  }
  if (*join_tp > 2) {  // (an option out of range; the variable is checked above)
    return absl::InvalidArgumentError(
        absl::StrFormat("mlp_join_sharded = %d must be 0, 1 or 2", *join_tp));
  }
  mlp_sharded_ = *mlp_tp == 1;
  prefill_kv_store_ = *kv_store == 1;
  prefill_last_rows_ = *last_rows == 1;
  prefill_mlp_fork_ = *mlp_fork == 1;
  prefill_gelu_split_ = *gelu_split == 1;
  mlp_join_sharded_ = *join_tp;
  absl::StatusOr<std::vector<GemmAlgoChoice>> algos = GemmAlgoChoicesFromEnv(dtype_);
  if (!algos.ok()) return algos.status();
  gemm_algos_ = *std::move(algos);
  set_prefill_gemm_algos(true);
  PHI_RETURN_IF_ERROR(set_mlp_stream_mode(*mlp_mode));
  const absl::StatusOr<int> bulk_rows = DigitEnv("PHISHARD_BULK_GEMV_ROWS", options.bulk_gemv_rows,
                                                 kBulkGemvRowsDefault, kGemvMaxRows);
  const absl::StatusOr<int> bulk_pdl =
      DigitEnv("PHISHARD_BULK_GEMV_PDL", options.bulk_gemv_pdl, kBulkGemvPdlDefault, 1);
  const absl::StatusOr<int> bulk_ln =
      DigitEnv("PHISHARD_BULK_GEMV_LN", options.bulk_gemv_ln, kBulkGemvLnDefault, 1);
  for (const absl::StatusOr<int>* v : {&bulk_rows, &bulk_pdl, &bulk_ln}) {
    PHI_RETURN_IF_ERROR(v->status());
  }
  PHI_RETURN_IF_ERROR(set_bulk_gemv(*bulk_rows, *bulk_pdl != 0, *bulk_ln != 0));
  const absl::StatusOr<int> mega =
      DigitEnv("PHISHARD_DECODE_MEGAKERNEL", options.decode_megakernel, 0, 1);
  PHI_RETURN_IF_ERROR(mega.status());
  PHI_RETURN_IF_ERROR(set_decode_megakernel(*mega != 0));
  const absl::StatusOr<int> stream =
      DigitEnv("PHISHARD_DECODE_STREAM", options.decode_stream, kDecodeStreamDefault, 1);
  PHI_RETURN_IF_ERROR(stream.status());
  // Switched on in Finish: it copies fc2 / dense transposed, so it needs the weights uploaded.
  stream_requested_ = *stream != 0;
  const absl::StatusOr<int> fold_rows =
      OptionOrEnv("PHISHARD_DECODE_ATTENTION_FOLD", options.decode_attention_fold_rows,
                  DecodeAttentionFoldRowsDefault(config().head_dim), 65536, "a row count");
  PHI_RETURN_IF_ERROR(fold_rows.status());
  set_decode_attention_fold_rows(*fold_rows);
  const absl::StatusOr<int> fold_short_rows =
      OptionOrEnv("PHISHARD_DECODE_FOLD_SHORT_ROWS", options.decode_fold_short_rows,
                  kDecodeFoldShortRowsDefault, 65536, "a row count (0: off)");
  PHI_RETURN_IF_ERROR(fold_short_rows.status());
  const absl::StatusOr<int> fold_short_ctx =
      OptionOrEnv("PHISHARD_DECODE_FOLD_SHORT_CTX", options.decode_fold_short_ctx,
                  kDecodeFoldShortCtxDefault, 1 << 30, "a token count");
  PHI_RETURN_IF_ERROR(fold_short_ctx.status());
  set_decode_fold_short(*fold_short_rows, *fold_short_ctx);
  const absl::StatusOr<int> short_regs =
      OptionOrEnv("PHISHARD_DECODE_SHORT_REGS_ROWS", options.decode_short_regs_rows,
                  kDecodeShortRegsRowsDefault, 65536, "a row count (0: off)");
  PHI_RETURN_IF_ERROR(short_regs.status());
  set_decode_short_regs_rows(*short_regs);
  const absl::StatusOr<int> short_regs_ctx =
      OptionOrEnv("PHISHARD_DECODE_SHORT_REGS_CTX", options.decode_short_regs_ctx,
                  DecodeShortRegsCtxDefault(config().head_dim), 1 << 30, "a token count");
  PHI_RETURN_IF_ERROR(short_regs_ctx.status());
  set_decode_short_regs_ctx(*short_regs_ctx);
  const absl::StatusOr<int> warp_heads =
      DigitEnv("PHISHARD_DECODE_WARP_HEADS", options.decode_warp_heads, kDecodeWarpHeadsDefault, 1);
  PHI_RETURN_IF_ERROR(warp_heads.status());
  set_decode_warp_heads(*warp_heads != 0);
  set_decode_warp_heads_default_bounds();
  const absl::StatusOr<int> fc1_sms =
      OptionOrEnv("PHISHARD_DECODE_FC1_SMS", options.decode_fc1_sms, kDecodeFc1SmsDefault, 4096,
                  "an SM count (0: every SM)");
  PHI_RETURN_IF_ERROR(fc1_sms.status());
  set_decode_fc1_sms(*fc1_sms);
  const PhiConfig& rc = config();
  const absl::StatusOr<int> fc1_min_kv =
      OptionOrEnv("PHISHARD_DECODE_FC1_SMS_MIN_KV_TOKENS", options.decode_fc1_sms_min_kv_tokens,
                  DecodeFc1SmsMinKvTokensDefault(rc.hidden_size, rc.intermediate_size,
                                                 rc.num_key_value_heads, rc.head_dim),
                  1 << 30, "a token count (0: every step)");
  PHI_RETURN_IF_ERROR(fc1_min_kv.status());
  set_decode_fc1_sms_min_kv_tokens(*fc1_min_kv);
  const absl::StatusOr<int> dense_bulk =
      OptionOrEnv("PHISHARD_DECODE_DENSE_BULK_ROWS", options.decode_dense_bulk_rows,
                  kDecodeDenseBulkRowsDefault, kGemvMaxRows, "a row count");
  PHI_RETURN_IF_ERROR(dense_bulk.status());
  set_decode_dense_bulk_rows(*dense_bulk);
  const absl::StatusOr<int> fc2_defer =
      OptionOrEnv("PHISHARD_DECODE_FC2_DEFER", options.decode_fc2_defer, kDecodeFc2DeferDefault, 1,
                  "0 (off) or 1 (on)");
  PHI_RETURN_IF_ERROR(fc2_defer.status());
  set_decode_fc2_defer(*fc2_defer != 0);
  const absl::StatusOr<int> tune_rows =
      OptionOrEnv("PHISHARD_DECODE_GEMM_TUNE_ROWS", options.decode_gemm_tune_rows,
                  kDecodeGemmTuneRowsDefault, 65536, "a row count (0: off)");
  PHI_RETURN_IF_ERROR(tune_rows.status());
  set_decode_gemm_tune(*tune_rows);
  const absl::StatusOr<int> tune_prefill =
      OptionOrEnv("PHISHARD_PREFILL_GEMM_TUNE", options.prefill_gemm_tune, kPrefillGemmTuneDefault,
                  1, "0 (off) or 1 (on)");
  PHI_RETURN_IF_ERROR(tune_prefill.status());
  set_prefill_gemm_tune(*tune_prefill != 0);
  return absl::OkStatus();
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
