#include "model/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "absl/status/status.h"

namespace phishard {
namespace {

// Lowest ids first, but block 0 last: the router's health probe writes it.
TEST(KvBlockAllocator, HandsOutLowestIdsFirstBlockZeroLastAndCounts) {
  KvBlockAllocator a(8, 16);
  EXPECT_EQ(a.num_blocks(), 8);
  EXPECT_EQ(a.block_size(), 16);
  EXPECT_EQ(a.num_free(), 8);
  absl::StatusOr<std::vector<int32_t>> got = a.Allocate(3);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(a.num_free(), 5);
  EXPECT_EQ(a.num_used(), 3);
  absl::StatusOr<std::vector<int32_t>> none = a.Allocate(0);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  EXPECT_EQ(a.num_free(), 5);
}

TEST(KvBlockAllocator, ExhaustionTakesNothing) {
  KvBlockAllocator a(4);
  ASSERT_TRUE(a.Allocate(3).ok());
  absl::StatusOr<std::vector<int32_t>> too_many = a.Allocate(2);
  ASSERT_FALSE(too_many.ok());
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_many.status().message().find("1 of 4 free"), std::string::npos)
      << too_many.status();
  EXPECT_EQ(a.num_free(), 1);  // the failed call took nothing
  absl::StatusOr<std::vector<int32_t>> last = a.Allocate(1);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, (std::vector<int32_t>{0}));
  EXPECT_EQ(a.Allocate(1).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(KvBlockAllocator, FreedBlocksAreReusedAndNeverHandedOutTwice) {
  KvBlockAllocator a(6);
  std::vector<int32_t> first = *a.Allocate(4);  // 1..4
  a.Free({first[1], first[2]});                 // 1, 2 back
  EXPECT_EQ(a.num_free(), 4);
  std::vector<int32_t> second = *a.Allocate(4);
  // Every block handed out is distinct from the ones still held (0 and 3).
  std::set<int32_t> held = {first[0], first[3]};
  for (int32_t b : second) {
    EXPECT_TRUE(b >= 0 && b < 6);
    EXPECT_TRUE(held.insert(b).second) << "block " << b << " handed out twice";
  }
  EXPECT_EQ(held.size(), 6u);
  EXPECT_EQ(a.num_free(), 0);
}

TEST(KvBlockAllocator, ResetFreesEverything) {
  KvBlockAllocator a(5);
  ASSERT_TRUE(a.Allocate(5).ok());
  EXPECT_EQ(a.num_free(), 0);
  a.Reset();
  EXPECT_EQ(a.num_free(), 5);
  std::vector<int32_t> all = *a.Allocate(5);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

// Allocate(n, first) hands out only the tail [first, num_blocks): the blocks the engine keeps back
// from the router after Warmup. Block 0 and everything below `first` stay free; the tail's
// exhaustion takes nothing and says which range ran out.
TEST(KvBlockAllocator, AllocateFromATailNeverTouchesTheIdsBelowIt) {
  KvBlockAllocator a(10);
  EXPECT_EQ(a.NumFreeFrom(0), 10);
  EXPECT_EQ(a.NumFreeFrom(7), 3);
  EXPECT_EQ(a.NumFreeFrom(10), 0);
  ASSERT_TRUE(a.Take({8}).ok());  // a router block inside the tail (the engine refuses those)
  EXPECT_EQ(a.NumFreeFrom(7), 2);
  EXPECT_EQ(*a.Allocate(2, 7), (std::vector<int32_t>{7, 9}));
  EXPECT_EQ(a.NumFreeFrom(7), 0);
  absl::StatusOr<std::vector<int32_t>> more = a.Allocate(1, 7);
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(more.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(more.status().message().find("need 1 blocks of 16 tokens, 0 of blocks [7, 10) free"),
            std::string::npos)
      << more.status();
  EXPECT_EQ(a.num_free(), 7) << "blocks 0..6 untouched";
  EXPECT_EQ(a.NumFreeFrom(1), 6) << "block 0 is not counted in a tail that starts above it";
  a.Free({7});
  EXPECT_EQ(*a.Allocate(1, 7), (std::vector<int32_t>{7}));
  // From 0 the whole pool again, block 0 last.
  EXPECT_EQ(*a.Allocate(7), (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 0}));
}

// The router's block ids (Info.requires_block_allocator): taken exactly, never handed out by
// Allocate while held, refused whole when any id is bad.
TEST(KvBlockAllocator, TakeClaimsTheRoutersIdsOrNothing) {
  KvBlockAllocator a(8);
  ASSERT_TRUE(a.Take({5, 1}).ok());
  EXPECT_EQ(a.num_free(), 6);
  // Allocate skips the taken ids, lowest first (block 0 last).
  EXPECT_EQ(*a.Allocate(3), (std::vector<int32_t>{2, 3, 4}));
  absl::Status held = a.Take({6, 5});
  EXPECT_EQ(held.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(held.message().find("blocks[1] = 5 is already in use"), std::string::npos) << held;
  absl::Status outside = a.Take({6, 8});
  EXPECT_EQ(outside.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(outside.message().find("blocks[1] = 8 is outside the KV cache of 8 blocks"),
            std::string::npos)
      << outside;
  absl::Status twice = a.Take({6, 7, 6});
  EXPECT_EQ(twice.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(twice.message().find("blocks[2] = 6 is listed twice"), std::string::npos) << twice;
  EXPECT_EQ(a.num_free(), 3) << "failed takes take nothing";
  EXPECT_EQ(*a.Allocate(3), (std::vector<int32_t>{6, 7, 0}));
  // Freed router ids return to the pool like any other.
  a.Free({5, 1});
  EXPECT_EQ(*a.Allocate(2), (std::vector<int32_t>{1, 5}));
  EXPECT_EQ(a.num_free(), 0);
  EXPECT_TRUE(a.Take({}).ok());
}

TEST(KvBlockAllocator, BlocksFor) {
  EXPECT_EQ(KvBlockAllocator::BlocksFor(0), 0);
  EXPECT_EQ(KvBlockAllocator::BlocksFor(1), 1);
  EXPECT_EQ(KvBlockAllocator::BlocksFor(15), 1);
  EXPECT_EQ(KvBlockAllocator::BlocksFor(16), 1);
  EXPECT_EQ(KvBlockAllocator::BlocksFor(17), 2);
  EXPECT_EQ(KvBlockAllocator::BlocksFor(33, 8), 5);
}

TEST(KvBlockAllocatorDeathTest, DoubleFreeAndBadIdsAreProgrammerErrors) {
  KvBlockAllocator a(3);
  std::vector<int32_t> got = *a.Allocate(1);
  a.Free(got);
  EXPECT_DEATH(a.Free(got), "freed twice");
  EXPECT_DEATH(a.Free({7}), "out of range");
}

}  // namespace
}  // namespace phishard
