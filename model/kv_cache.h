// KV block bookkeeping (no device memory, no pointers): a pool of `num_blocks` blocks of
// `block_size` token slots each. The KV tensors themselves live in the model backend:
// per layer K and V of shape [num_blocks, nKV, block_size, head_dim] (kernels/kv_layout.h).
#pragma once

#include <cstdint>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace phishard {

inline constexpr int kKvBlockSize = 16;

class KvBlockAllocator {
 public:
  KvBlockAllocator(int num_blocks, int block_size = kKvBlockSize);

  // Takes `n` free blocks with ids >= `first` (lowest ids first, block 0 last: the LoRAX router
  // keeps block 0 for its health probe, so requests without router blocks leave it to the probe
  // while any other block is free) or fails with RESOURCE_EXHAUSTED, taking none. `first` > 0
  // confines the shard's own allocations to the tail [first, num_blocks) (server/batch_engine.h:
  // the blocks kept back from the router after Warmup).
  absl::StatusOr<std::vector<int32_t>> Allocate(int n, int first = 0);
  // Takes exactly `blocks` (ids chosen by the LoRAX router's block allocator) or fails taking
  // none: INVALID_ARGUMENT for an id outside [0, num_blocks) or listed twice, FAILED_PRECONDITION
  // for an id already in use. The message names the position in `blocks` and the id.
  absl::Status Take(absl::Span<const int32_t> blocks);
  // Returns blocks to the pool. Double frees / out-of-range ids are programmer errors (CHECK).
  void Free(absl::Span<const int32_t> blocks);
  void Reset();  // everything free again

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_used() const { return num_blocks_ - num_free(); }
  // Free blocks with ids >= `first` (O(that count)); NumFreeFrom(0) == num_free().
  int NumFreeFrom(int first) const;
  static int BlocksFor(int tokens, int block_size = kKvBlockSize) {
    return (tokens + block_size - 1) / block_size;
  }

 private:
  int num_blocks_;
  int block_size_;
  // Free ids in hand-out order (1, 2, ..., num_blocks - 1, then 0).
  struct BlockZeroLast {
    bool operator()(int32_t a, int32_t b) const {
      return (a == 0 ? INT32_MAX : a - 1) < (b == 0 ? INT32_MAX : b - 1);
    }
  };
  std::set<int32_t, BlockZeroLast> free_;
  std::vector<uint8_t> in_use_;
};

}  // namespace phishard
