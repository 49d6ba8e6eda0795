// KV block bookkeeping (no device memory, no pointers): a pool of `num_blocks` blocks of
// `block_size` token slots each. The KV tensors themselves live in the model backend:
// per layer K and V of shape [num_blocks, block_size, nKV, head_dim].
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace phishard {

inline constexpr int kKvBlockSize = 16;

class KvBlockAllocator {
 public:
  KvBlockAllocator(int num_blocks, int block_size = kKvBlockSize);

  // Takes `n` free blocks (lowest ids first) or fails with RESOURCE_EXHAUSTED, taking none.
  absl::StatusOr<std::vector<int32_t>> Allocate(int n);
  // Returns blocks to the pool. Double frees / out-of-range ids are programmer errors (CHECK).
  void Free(absl::Span<const int32_t> blocks);
  void Reset();  // everything free again

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_used() const { return num_blocks_ - num_free(); }
  static int BlocksFor(int tokens, int block_size = kKvBlockSize) {
    return (tokens + block_size - 1) / block_size;
  }

 private:
  int num_blocks_;
  int block_size_;
  std::vector<int32_t> free_;     // stack of free ids; back() is handed out first
  std::vector<uint8_t> in_use_;
};

}  // namespace phishard
