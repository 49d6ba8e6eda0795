// "No cudaMalloc on the step path" (issue: CUDA backend, memory plan): once a model is loaded,
// its KV cache allocated, its decode graphs captured and its adapters placed, prefill and decode
// steps within the reserved sizes (reserve_tokens tokens, the graph buckets' batch sizes) make no
// device or pinned-host allocation: kernels/device.h counts every DeviceMalloc /
// DeviceMallocHost call of the process, and the count must not move across the steps. The
// steps cover every entry point (Forward, ForwardView, ForwardGreedy), several batch sizes and
// lengths, and with adapters the SGMV prefill, the GEMM-form prefill (>= 128 rows), and decode
// steps in beside mode, graphs and eager.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "model/adapter_registry.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "nlohmann/json.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
constexpr int kReserveTokens = 256;

std::unique_ptr<CudaPhiModel> LoadModel(bool graphs) {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = CudaPhiModel::Load(
      kRepo / "models" / "tiny-phi-code",
      {.dtype = "bfloat16", .device = 0, .reserve_tokens = kReserveTokens, .cuda_graphs = graphs});
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  EXPECT_TRUE((*m)->AllocateKvCache(512, kKvBlockSize).ok());
  EXPECT_TRUE((*m)->PrepareDecode(64).ok());
  return *std::move(m);
}

// `lens` sequences prefilled (every row's logits from `all_rows` sequences, else the last row),
// then `steps` decode steps, each through Forward, ForwardView and ForwardGreedy in turn.
void RunSteps(CudaPhiModel& m, const std::vector<int>& lens, const std::vector<uint32_t>& adapters,
              int steps) {
  const int V = m.config().vocab_size;
  ForwardBatch p;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int> ctx;
  int blk = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    const int n = lens[s];
    std::vector<int32_t> table;
    for (int b = 0; b < (n + steps + kKvBlockSize - 1) / kKvBlockSize; ++b) table.push_back(blk++);
    for (int i = 0; i < n; ++i) {
      p.token_ids.push_back(static_cast<int32_t>((31 * s + 7 * i + 5) % V));
      p.positions.push_back(i);
    }
    p.logit_rows.push_back(p.num_tokens() - 1);
    p.seqs.push_back({.num_new_tokens = n,
                      .context_len = n,
                      .block_table = table,
                      .adapter_index = adapters[s % adapters.size()]});
    tables.push_back(table);
    ctx.push_back(n);
  }
  ASSERT_LE(blk, 512);
  std::vector<float> logits;
  ASSERT_TRUE(m.Forward(p, &logits).ok());
  for (int step = 0; step < steps; ++step) {
    ForwardBatch d;
    for (size_t s = 0; s < lens.size(); ++s) {
      d.token_ids.push_back(static_cast<int32_t>((11 * s + 3 * step + 1) % V));
      d.positions.push_back(ctx[s]);
      ++ctx[s];
      d.seqs.push_back({.num_new_tokens = 1,
                        .context_len = ctx[s],
                        .block_table = tables[s],
                        .adapter_index = adapters[s % adapters.size()]});
      d.logit_rows.push_back(static_cast<int32_t>(s));
      d.greedy_rows.push_back(1);
    }
    absl::Span<const float> view;
    absl::Span<const GreedyPick> picks;
    switch (step % 3) {
      case 0:
        ASSERT_TRUE(m.Forward(d, &logits).ok());
        break;
      case 1:
        ASSERT_TRUE(m.ForwardView(d, &view).ok());
        break;
      default:
        ASSERT_TRUE(m.ForwardGreedy(d, &view, &picks).ok());
        ASSERT_EQ(picks.size(), lens.size());
        break;
    }
  }
}

// Steps of several shapes; the first call of each shape included (nothing may be made lazily).
void ExpectNoAllocations(CudaPhiModel& m, const std::vector<uint32_t>& adapters) {
  const long long before = DeviceAllocationCalls();
  RunSteps(m, {7}, adapters, 4);                               // batch 1
  RunSteps(m, {1, 16, 17, 40, 3}, adapters, 4);                // odd lengths, block edges
  RunSteps(m, {kReserveTokens - 56, 56}, adapters, 3);         // a full reserved prefill
  RunSteps(m, std::vector<int>(64, 2), adapters, 3);           // the largest graph bucket
  EXPECT_EQ(DeviceAllocationCalls(), before)
      << "a step within the reserved sizes allocated device or pinned host memory";
}

TEST(CudaStepAllocations, BaseStepsAllocateNothing) {
  PHI_REQUIRE_GPU();
  for (bool graphs : {true, false}) {
    SCOPED_TRACE(graphs ? "graphs" : "eager");
    std::unique_ptr<CudaPhiModel> m = LoadModel(graphs);
    ASSERT_TRUE(m);
    ExpectNoAllocations(*m, {0});
  }
}

TEST(CudaStepAllocations, AdapterStepsAllocateNothingAfterTheLoad) {
  PHI_REQUIRE_GPU();
  std::ifstream in(kRepo / "tests" / "golden" / "tiny-phi-code-adapters.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  for (bool graphs : {true, false}) {
    SCOPED_TRACE(graphs ? "graphs" : "eager");
    std::unique_ptr<CudaPhiModel> m = LoadModel(graphs);
    ASSERT_TRUE(m);
    absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg =
        AdapterRegistry::Create(8, int64_t{256} << 20, 2);
    ASSERT_TRUE(reg.ok()) << reg.status();
    std::vector<uint32_t> adapters = {0};  // base rows between adapter rows
    uint32_t idx = 3;
    for (const nlohmann::json& a : golden.at("adapters")) {
      absl::StatusOr<LoraAdapter> ad =
          LoraAdapter::LoadDir(kRepo / a.at("path").get<std::string>(), m->config());
      ASSERT_TRUE(ad.ok()) << ad.status();
      ASSERT_TRUE((*reg)->Load(idx, *std::move(ad)).ok());
      adapters.push_back(idx++);
    }
    ASSERT_TRUE(m->SetAdapterRegistry(reg->get()).ok());  // the load: copies and step buffers
    ExpectNoAllocations(*m, adapters);
  }
}

}  // namespace
}  // namespace phishard
