// phishard_chooser_bench: host time of choosing the next tokens of one decode step from its
// float32 logits (server/parallel_choose.h), batch x vocab rows of random logits, greedy and
// sampling (temperature 0.7, top-k 50, top-p 0.9) requests, one thread vs the default pool.
// This is the host work the batch engine does after every Forward, beside the GPU step.
//
//   phishard_chooser_bench [--batch 256] [--vocab 51200] [--steps 5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "server/parallel_choose.h"

namespace phishard {
namespace {

double TimeStep(int batch, int vocab, int threads, bool sample, int steps) {
  std::vector<NextTokenChooser> choosers;
  SamplingParams p;
  if (sample) {
    p.do_sample = true;
    p.temperature = 0.7f;
    p.top_k = 50;
    p.top_p = 0.9f;
  }
  for (int i = 0; i < batch; ++i) {
    p.seed = i;
    choosers.emplace_back(p, vocab);
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(batch) * vocab);
  for (float& x : logits) x = dist(rng);
  const std::vector<int32_t> history = {1, 2, 3};
  std::vector<ChooseTask> tasks;
  for (int i = 0; i < batch; ++i) {
    tasks.push_back({&choosers[i], logits.data() + static_cast<size_t>(i) * vocab, history});
  }
  ChooseScratch scratch;
  std::vector<TokenChoice> out;
  ChooseRows(tasks, vocab, threads, &scratch, &out);  // warm-up (workspaces)
  std::vector<double> ms;
  for (int s = 0; s < steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    ChooseRows(tasks, vocab, threads, &scratch, &out);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int Main(int argc, char** argv) {
  CLI::App app{"phishard_chooser_bench: host time of one step's token choices"};
  int batch = 256, vocab = 51200, steps = 5;
  app.add_option("--batch", batch, "rows (requests) in the step");
  app.add_option("--vocab", vocab, "logits row width");
  app.add_option("--steps", steps, "timed steps (median)");
  CLI11_PARSE(app, argc, argv);
  std::printf("chooser: %d rows x %d logits, %u hardware threads\n", batch, vocab,
              std::thread::hardware_concurrency());
  for (bool sample : {false, true}) {
    for (int threads : {1, 0}) {
      std::printf("chooser %-8s threads %-7s %9.2f ms a step\n", sample ? "sampling" : "greedy",
                  threads == 1 ? "1" : "default", TimeStep(batch, vocab, threads, sample, steps));
    }
  }
  return 0;
}

}  // namespace
}  // namespace phishard

int main(int argc, char** argv) { return phishard::Main(argc, argv); }
