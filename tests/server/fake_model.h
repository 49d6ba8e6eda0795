// A deterministic stand-in for a Phi backend, for BatchEngine tests. Its "KV cache" stores the
// token id written at each slot; the logits predicting position p+1 are a hash of every token at
// positions 0..p *read back through the block table*. So a wrong block table, a missing KV write
// or two sequences sharing blocks changes the output (or fails: reading a never-written slot is
// an INTERNAL error), exactly like a real paged-attention model, but in microseconds.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "model/forward_batch.h"
#include "model/model_backend.h"
#include "model/phi_config.h"

namespace phishard {
namespace testing_fake {

inline uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Logits row [vocab] predicting the token after `context`, values in [-3, 3); `eos` gets +10 once
// the context reaches `eos_at_length` tokens (0 = never).
inline std::vector<float> FakeLogits(const std::vector<int32_t>& context, int vocab, int32_t eos,
                                     size_t eos_at_length) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < context.size(); ++i)
    h = Mix(h ^ (static_cast<uint64_t>(context[i]) << 20) ^ i);
  std::vector<float> row(vocab);
  for (int v = 0; v < vocab; ++v) {
    row[v] = static_cast<float>((Mix(h ^ static_cast<uint64_t>(v)) >> 40) * 0x1.0p-24 * 6.0 - 3.0);
  }
  if (eos_at_length > 0 && context.size() >= eos_at_length) row[eos] = 10.0f;
  return row;
}

class FakeModel : public ModelBackend {
 public:
  explicit FakeModel(int vocab_size = 4095, int max_position_embeddings = 1024) {
    config_.model_type = "phi";
    config_.vocab_size = vocab_size;
    config_.max_position_embeddings = max_position_embeddings;
  }

  const PhiConfig& config() const override { return config_; }
  std::string device_type() const override { return "cpu"; }
  std::string dtype_name() const override { return "torch.float32"; }

  absl::StatusOr<int> MaxKvBlocks(double memory_fraction, int max_batch_tokens) const override {
    last_max_batch_tokens = max_batch_tokens;
    return static_cast<int>(memory_blocks * memory_fraction);
  }
  absl::Status AllocateKvCache(int num_blocks, int block_size) override {
    ++allocations;
    if (num_blocks < 1 || (alloc_limit > 0 && num_blocks > alloc_limit)) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("fake: cannot allocate %d KV blocks", num_blocks));
    }
    block_size_ = block_size;
    num_blocks_ = num_blocks;
    slots_.assign(static_cast<size_t>(num_blocks) * block_size, -1);
    return absl::OkStatus();
  }
  int kv_num_blocks() const override { return num_blocks_; }

  absl::Status Forward(const ForwardBatch& b, std::vector<float>* logits) override {
    ++forwards;
    if (fail_next_forward.has_value()) {
      absl::Status s = *fail_next_forward;
      fail_next_forward.reset();
      return s;
    }
    if (num_blocks_ == 0) return absl::FailedPreconditionError("fake: no KV cache");
    // Where each new token lives: sequence and position.
    std::vector<int> seq_of(b.num_tokens()), pos_of(b.num_tokens());
    int t = 0;
    for (size_t s = 0; s < b.seqs.size(); ++s) {
      const SequenceInput& seq = b.seqs[s];
      for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
        if (t >= b.num_tokens()) return absl::InternalError("fake: seqs cover too many tokens");
        const int pos = seq.context_len - seq.num_new_tokens + j;
        if (b.positions[t] != pos) return absl::InternalError("fake: bad position");
        seq_of[t] = static_cast<int>(s);
        pos_of[t] = pos;
        absl::StatusOr<size_t> slot = Slot(seq, pos);
        if (!slot.ok()) return slot.status();
        if (b.token_ids[t] < 0 || b.token_ids[t] >= config_.vocab_size) {
          return absl::InternalError("fake: token id out of range");
        }
        slots_[*slot] = b.token_ids[t];
      }
    }
    if (t != b.num_tokens()) return absl::InternalError("fake: seqs cover too few tokens");
    tokens_fed += t;
    logits->clear();
    for (int32_t row : b.logit_rows) {
      const SequenceInput& seq = b.seqs[seq_of[row]];
      std::vector<int32_t> context;
      for (int q = 0; q <= pos_of[row]; ++q) {
        absl::StatusOr<size_t> slot = Slot(seq, q);
        if (!slot.ok()) return slot.status();
        if (slots_[*slot] < 0) {
          return absl::InternalError(absl::StrFormat("fake: position %d read before written", q));
        }
        context.push_back(slots_[*slot]);
      }
      const std::vector<float> r = FakeLogits(context, config_.vocab_size, eos_id, eos_at_length);
      logits->insert(logits->end(), r.begin(), r.end());
    }
    if (nan_logits_next_forward) {  // a NaN hidden state: every logit of every row NaN
      nan_logits_next_forward = false;
      logits->assign(logits->size(), std::numeric_limits<float>::quiet_NaN());
    }
    return absl::OkStatus();
  }

  absl::Status Ping() override { return absl::OkStatus(); }

  // Knobs.
  int memory_blocks = 4096;  // what MaxKvBlocks reports at memory_fraction 1
  int alloc_limit = 0;       // > 0: AllocateKvCache of more blocks fails
  std::optional<absl::Status> fail_next_forward;
  bool nan_logits_next_forward = false;  // the next Forward succeeds with NaN logits
  int32_t eos_id = 0;
  size_t eos_at_length = 0;
  // Counters.
  int allocations = 0;
  int forwards = 0;
  int64_t tokens_fed = 0;
  mutable int last_max_batch_tokens = -1;

 private:
  absl::StatusOr<size_t> Slot(const SequenceInput& seq, int pos) const {
    const int bi = pos / block_size_;
    if (bi >= static_cast<int>(seq.block_table.size())) {
      return absl::InternalError(absl::StrFormat("fake: position %d beyond the block table", pos));
    }
    const int block = seq.block_table[bi];
    if (block < 0 || block >= num_blocks_) {
      return absl::InternalError(absl::StrFormat("fake: block %d out of range", block));
    }
    return static_cast<size_t>(block) * block_size_ + pos % block_size_;
  }

  PhiConfig config_;
  int block_size_ = 16;
  int num_blocks_ = 0;
  std::vector<int32_t> slots_;
};

}  // namespace testing_fake
}  // namespace phishard
