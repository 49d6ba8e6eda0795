#include "model/lora_shard.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/phi_weights.h"

namespace phishard {
namespace {

bool IsRowParallel(LoraTarget t) { return t == LoraTarget::kDense || t == LoraTarget::kFc2; }

// First global output row of a column-parallel target held by `shard` (KV heads may be
// replicated, so this is not always rank x local rows).
int64_t ColumnParallelBegin(const PhiShard& shard, const PhiConfig& base, LoraTarget t) {
  switch (t) {
    case LoraTarget::kQProj:
      return static_cast<int64_t>(shard.q_head_begin) * base.head_dim;
    case LoraTarget::kKProj:
    case LoraTarget::kVProj:
      return static_cast<int64_t>(shard.kv_head_begin) * base.head_dim;
    case LoraTarget::kFc1:
      return shard.intermediate_begin;
    case LoraTarget::kLmHead:
      return shard.lm_head_begin;
    case LoraTarget::kDense:
    case LoraTarget::kFc2:
      break;
  }
  return 0;
}

}  // namespace

absl::StatusOr<PhiConfig> LoraShardConfig(const PhiConfig& base, int world_size) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("world_size must be >= 1, got %d", world_size));
  }
  // The base weights' layout (phi_weights.h) decides every split, KV-head replication included.
  absl::StatusOr<PhiShard> shard = MakePhiShard(base, 0, world_size);
  if (!shard.ok()) return shard.status();
  return LocalPhiConfig(base, *shard);
}

absl::StatusOr<LoraAdapter> ShardLoraAdapter(const LoraAdapter& full, const PhiConfig& base,
                                             int rank, int world_size) {
  absl::StatusOr<PhiConfig> local = LoraShardConfig(base, world_size);
  if (!local.ok()) return local.status();
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rank %d is outside [0, %d)", rank, world_size));
  }
  absl::StatusOr<PhiShard> shard = MakePhiShard(base, rank, world_size);
  if (!shard.ok()) return shard.status();
  if (full.num_layers() != base.num_hidden_layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter '%s' has %d layers but the base model has %d", full.name(),
                        full.num_layers(), base.num_hidden_layers));
  }
  LoraAdapter out(world_size == 1 ? full.name() : absl::StrCat(full.name(), "@rank", rank),
                  full.num_layers());
  for (LoraTarget t : kAllLoraTargets) {
    const int64_t in = LoraTargetDims(base, t).first;
    const auto [local_in, local_out] = LoraTargetDims(*local, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : full.num_layers()); ++l) {
      const LoraModule& m = full.module(l, t);
      if (!m.present()) continue;
      LoraModule s;
      s.rank = m.rank;
      s.scale = m.scale;
      if (IsRowParallel(t)) {
        // A [r, in] -> columns [rank · in/W, (rank + 1) · in/W); B replicated.
        const int64_t c0 = rank * local_in;
        s.a.reserve(static_cast<size_t>(m.rank) * local_in);
        for (int k = 0; k < m.rank; ++k) {
          const float* row = m.a.data() + k * in;
          s.a.insert(s.a.end(), row + c0, row + c0 + local_in);
        }
        s.b = m.b;
      } else {
        // A replicated; B [out, r] -> rows of this rank's outputs (all of them when replicated).
        const int64_t r0 = ColumnParallelBegin(*shard, base, t);
        s.a = m.a;
        s.b.assign(m.b.begin() + r0 * m.rank, m.b.begin() + (r0 + local_out) * m.rank);
      }
      if (absl::Status st = out.SetModule(*local, l, t, std::move(s)); !st.ok()) return st;
    }
  }
  return out;
}

}  // namespace phishard
