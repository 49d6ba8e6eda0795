// KernelTrace: a timeline of every kernel the GPU ran inside chosen windows of a benchmark, from
// CUPTI's concurrent-kernel activity records (start / end on the GPU clock, stream, grid, graph
// node), for questions the per-kernel durations of ncu cannot answer: which kernels of a CUDA
// graph overlapped, when each started, what waited on what. ncu serialises kernels; this does not.
//
// Enable() must run before the CUDA graphs to be traced are instantiated (records of graphs made
// earlier are not guaranteed). Window(label, fn) runs fn (which must leave the GPU idle, e.g. end
// in a stream synchronise), then appends one CSV line per kernel that started inside the window:
//   label,start_ns,end_ns,stream,graph_node,grid,block,smem,regs,name
// (host <-> device copies as rows of grid 0 named "memcpy HtoD|DtoH|DtoD|other BYTESB")
// with start / end relative to the window's first kernel. Built only when CUPTI is found
// (PHISHARD_HAVE_CUPTI); otherwise Enable() returns false.
#pragma once

#include <cstdio>
#include <functional>
#include <string>

namespace phishard::bench {

class KernelTrace {
 public:
  // Starts CUPTI's concurrent-kernel activity; false (with a message on stderr) when CUPTI is not
  // available or refuses. `csv` is opened for writing (header line first).
  static bool Enable(const std::string& csv);
  // Runs `fn` and appends its kernels to the CSV under `label` (no-op apart from fn when not
  // enabled). Returns the number of kernels recorded.
  static int Window(const std::string& label, const std::function<void()>& fn);
  static bool enabled();
};

}  // namespace phishard::bench
