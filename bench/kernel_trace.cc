#include "bench/kernel_trace.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#ifdef PHISHARD_HAVE_CUPTI
#include <cupti.h>
#endif

namespace phishard::bench {
namespace {

struct KernelRecord {
  uint64_t start = 0, end = 0, graph_node = 0;
  uint32_t stream = 0;
  int grid = 0, block = 0, smem = 0, regs = 0;
  std::string name;
};

struct State {
  bool enabled = false;
  FILE* out = nullptr;
  std::mutex mu;
  std::vector<KernelRecord> records;  // completed records not yet written
};

State& S() {
  static State s;
  return s;
}

#ifdef PHISHARD_HAVE_CUPTI
constexpr size_t kBufferBytes = size_t{8} << 20;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  // CUPTI wants 8-byte aligned buffers.
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = kBufferBytes;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  std::vector<KernelRecord> got;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {  // host <-> device copies: grid 0, name "memcpy"
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
      const char* kind = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "HtoD"
                         : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "DtoH"
                         : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "DtoD"
                                                                          : "other";
      got.push_back({.start = m->start,
                     .end = m->end,
                     .graph_node = m->graphNodeId,
                     .stream = m->streamId,
                     .name = std::string("memcpy ") + kind + " " + std::to_string(m->bytes) + "B"});
      continue;
    }
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
    got.push_back({.start = k->start,
                   .end = k->end,
                   .graph_node = k->graphNodeId,
                   .stream = k->streamId,
                   .grid = k->gridX * k->gridY * k->gridZ,
                   .block = k->blockX * k->blockY * k->blockZ,
                   .smem = k->staticSharedMemory + k->dynamicSharedMemory,
                   .regs = k->registersPerThread,
                   .name = k->name != nullptr ? k->name : "?"});
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(S().mu);
  S().records.insert(S().records.end(), got.begin(), got.end());
}
#endif

}  // namespace

bool KernelTrace::enabled() { return S().enabled; }

bool KernelTrace::Enable(const std::string& csv) {
#ifdef PHISHARD_HAVE_CUPTI
  State& s = S();
  if (s.enabled) return true;
  s.out = std::fopen(csv.c_str(), "w");
  if (s.out == nullptr) {
    std::fprintf(stderr, "kernel trace: cannot open %s\n", csv.c_str());
    return false;
  }
  if (cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel trace: CUPTI refused the concurrent-kernel activity\n");
    std::fclose(s.out);
    s.out = nullptr;
    return false;
  }
  // Copies too, where CUPTI records them (their rows: grid 0, name "memcpy KIND BYTESB").
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  std::fprintf(s.out, "label,start_ns,end_ns,stream,graph_node,grid,block,smem,regs,name\n");
  s.enabled = true;
  return true;
#else
  std::fprintf(stderr, "kernel trace: built without CUPTI (%s not written)\n", csv.c_str());
  return false;
#endif
}

int KernelTrace::Window(const std::string& label, const std::function<void()>& fn) {
  State& s = S();
  if (!s.enabled) {
    fn();
    return 0;
  }
#ifdef PHISHARD_HAVE_CUPTI
  cuptiActivityFlushAll(1);  // records of earlier work are dropped below by their start time
  uint64_t t0 = 0, t1 = 0;
  cuptiGetTimestamp(&t0);
  fn();
  cuptiGetTimestamp(&t1);
  cuptiActivityFlushAll(1);
  std::vector<KernelRecord> in;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    for (KernelRecord& r : s.records) {
      if (r.start >= t0 && r.start <= t1) in.push_back(std::move(r));
    }
    s.records.clear();
  }
  std::sort(in.begin(), in.end(),
            [](const KernelRecord& a, const KernelRecord& b) { return a.start < b.start; });
  const uint64_t base = in.empty() ? 0 : in.front().start;
  for (const KernelRecord& r : in) {
    // Kernel names may hold commas (template arguments): quoted, inner quotes doubled.
    std::string name;
    for (char c : r.name) name += c == '"' ? std::string("\"\"") : std::string(1, c);
    std::fprintf(s.out, "%s,%llu,%llu,%u,%llu,%d,%d,%d,%d,\"%s\"\n", label.c_str(),
                 static_cast<unsigned long long>(r.start - base),
                 static_cast<unsigned long long>(r.end - base), r.stream,
                 static_cast<unsigned long long>(r.graph_node), r.grid, r.block, r.smem, r.regs,
                 name.c_str());
  }
  std::fflush(s.out);
  return static_cast<int>(in.size());
#else
  return 0;
#endif
}

}  // namespace phishard::bench
