#include "model/kv_cache.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace phishard {

KvBlockAllocator::KvBlockAllocator(int num_blocks, int block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  PHI_CHECK(num_blocks >= 0);
  PHI_CHECK(block_size > 0);
  Reset();
}

void KvBlockAllocator::Reset() {
  free_.clear();
  for (int b = 0; b < num_blocks_; ++b) free_.insert(free_.end(), b);
  in_use_.assign(num_blocks_, 0);
}

int KvBlockAllocator::NumFreeFrom(int first) const {
  if (first <= 0) return num_free();
  // Ids >= first (first >= 1) sort together, before block 0 (free_ hands block 0 out last).
  const int n = static_cast<int>(std::distance(free_.lower_bound(first), free_.end()));
  return n - (num_blocks_ > 0 && !in_use_[0] ? 1 : 0);
}

absl::StatusOr<std::vector<int32_t>> KvBlockAllocator::Allocate(int n, int first) {
  PHI_CHECK(n >= 0);
  PHI_CHECK(first >= 0);
  const int available = NumFreeFrom(first);
  if (n > available) {
    if (first > 0) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KV cache exhausted: need %d blocks of %d tokens, %d of blocks [%d, %d) free", n,
          block_size_, available, first, num_blocks_));
    }
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache exhausted: need %d blocks of %d tokens, %d of %d free", n, block_size_,
        num_free(), num_blocks_));
  }
  std::vector<int32_t> out(n);
  // Block 0 sorts last, so lower_bound(0) would point at it: first == 0 starts at the front.
  auto it = first > 0 ? free_.lower_bound(first) : free_.begin();
  for (int i = 0; i < n; ++i) {
    out[i] = *it;
    it = free_.erase(it);
    in_use_[out[i]] = 1;
  }
  return out;
}

absl::Status KvBlockAllocator::Take(absl::Span<const int32_t> blocks) {
  for (size_t k = 0; k < blocks.size(); ++k) {
    const int32_t b = blocks[k];
    if (b < 0 || b >= num_blocks_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "blocks[%d] = %d is outside the KV cache of %d blocks", k, b, num_blocks_));
    }
    if (std::find(blocks.begin(), blocks.begin() + k, b) != blocks.begin() + k) {
      return absl::InvalidArgumentError(absl::StrFormat("blocks[%d] = %d is listed twice", k, b));
    }
    if (in_use_[b]) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "blocks[%d] = %d is already in use by another request (of this batch, or of a cached "
          "batch not yet filtered or cleared)",
          k, b));
    }
  }
  for (int32_t b : blocks) {
    in_use_[b] = 1;
    free_.erase(b);
  }
  return absl::OkStatus();
}

void KvBlockAllocator::Free(absl::Span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    PHI_CHECK(b >= 0 && b < num_blocks_) << "KV block id " << b << " out of range";
    PHI_CHECK(in_use_[b]) << "KV block " << b << " freed twice";
    in_use_[b] = 0;
    free_.insert(b);
  }
}

}  // namespace phishard
