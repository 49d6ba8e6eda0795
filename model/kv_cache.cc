#include "model/kv_cache.h"

#include <algorithm>

#include "common/logging.h"
#include "absl/strings/str_format.h"

namespace phishard {

KvBlockAllocator::KvBlockAllocator(int num_blocks, int block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  PHI_CHECK(num_blocks >= 0);
  PHI_CHECK(block_size > 0);
  Reset();
}

void KvBlockAllocator::Reset() {
  free_.clear();
  free_.reserve(num_blocks_);
  // Highest id at the bottom of the stack so low ids are handed out first.
  for (int b = num_blocks_ - 1; b >= 0; --b) free_.push_back(b);
  in_use_.assign(num_blocks_, 0);
}

absl::StatusOr<std::vector<int32_t>> KvBlockAllocator::Allocate(int n) {
  PHI_CHECK(n >= 0);
  if (n > num_free()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache exhausted: need %d blocks of %d tokens, %d of %d free", n, block_size_,
        num_free(), num_blocks_));
  }
  std::vector<int32_t> out(n);
  for (int i = 0; i < n; ++i) {
    out[i] = free_.back();
    free_.pop_back();
    in_use_[out[i]] = 1;
  }
  return out;
}

void KvBlockAllocator::Free(absl::Span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    PHI_CHECK(b >= 0 && b < num_blocks_) << "KV block id " << b << " out of range";
    PHI_CHECK(in_use_[b]) << "KV block " << b << " freed twice";
    in_use_[b] = 0;
    free_.push_back(b);
  }
}

}  // namespace phishard
