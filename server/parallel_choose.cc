#include "server/parallel_choose.h"

#include <algorithm>
#include <thread>

namespace phishard {

void ChooseRows(absl::Span<const ChooseTask> tasks, int vocab_size, int max_threads,
                ChooseScratch* scratch, std::vector<TokenChoice>* out) {
  const int n = static_cast<int>(tasks.size());
  out->resize(n);
  if (max_threads <= 0) {
    max_threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 16);
  }
  const int threads = std::clamp(n / kMinRowsPerThread, 1, max_threads);
  if (static_cast<int>(scratch->workspaces.size()) < threads) {
    scratch->workspaces.resize(threads);
  }
  // Worker w takes rows w, w + threads, ...: neighbouring rows (often similar requests) spread
  // evenly, and no row is shared.
  auto work = [&](int w) {
    ChooserWorkspace* ws = &scratch->workspaces[w];
    for (int i = w; i < n; i += threads) {
      const ChooseTask& t = tasks[i];
      (*out)[i] = t.chooser->Choose(absl::MakeConstSpan(t.logits, vocab_size), t.history, ws);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (std::thread& t : pool) t.join();
}

}  // namespace phishard
