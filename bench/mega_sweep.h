// phishard_bench --mega-sweep / --mega-timeline: the persistent decode kernel
// (CudaModelOptions::decode_megakernel, kernels/cuda/decode_mega_cuda.h) against the op-by-op path
// at batch 1, its tunings, and its phase timeline (bench/mega_timeline.h).
#pragma once

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_ceilings.h"
#include "bench/bench_steps.h"
#include "bench/mega_timeline.h"
#include "model/cuda_phi_model.h"

namespace phishard::bench {

struct MegaSweepOptions {
  int rounds = 0;           // --mega-sweep
  std::string forms;        // --mega-forms
  std::string tunings;      // --mega-tunings
  int timeline = 0;         // --mega-timeline (layers; 0 off)
  std::string timeline_pf;  // --mega-timeline-pf
  int timeline_form = -1;   // --mega-timeline-form
  int model_layers = 0;     // the model's decoder layers
};

// Rounds of b1 decode at contexts 128 / 1024 / 4096, op-by-op then each form, alternated in this
// process; then each tuning at context 1024. Returns 2 (a message printed) for a malformed
// --mega-forms / --mega-tunings entry, else 0.
inline int MegaSweep(CudaPhiModel& m, Bench& bench, const MegaSweepOptions& o,
                     std::vector<Row>* rows) {
  // The persistent decode kernel (CudaModelOptions::decode_megakernel) against the op-by-op
  // path at batch 1, alternated in this process: off, on, off, on, ... per context.
  const bool mega0 = m.decode_megakernel();
  std::vector<std::pair<int, int>> forms;  // (form, ring stages); form -2: op-by-op
  forms.push_back({-2, 0});
  for (absl::string_view f : absl::StrSplit(o.forms, ',', absl::SkipEmpty())) {
    std::vector<absl::string_view> parts = absl::StrSplit(f, 's');
    int v = -1, st = 0;
    if (parts.size() > 2 || !absl::SimpleAtoi(parts[0], &v) ||
        (parts.size() == 2 && !absl::SimpleAtoi(parts[1], &st))) {
      std::fprintf(stderr, "--mega-forms: '%s' is not FORM or FORMsSTAGES\n",
                   std::string(f).c_str());
      return 2;
    }
    forms.push_back({v, st});
  }
  for (int round = 0; round < o.rounds; ++round) {
    for (int ctx : {128, 1024, 4096}) {
      for (auto [form, stages] : forms) {
        const bool on = form != -2;
        BENCH_OK(m.set_decode_megakernel(on));
        if (on) m.set_decode_megakernel_tuning(0, stages, 0, 0, form);
        const int64_t launches = m.mega_decode_launches();
        Row r;
        const std::string name = !on ? "mega0"
                                 : stages == 0
                                     ? absl::StrFormat("mega1 form%d", form)
                                     : absl::StrFormat("mega1 form%d stages%d", form, stages);
        if (bench.Decode(1, ctx, name, &r)) {
          if (on && m.mega_decode_launches() == launches) r.note += " (kernel NOT used)";
          PrintRow(r);
          rows->push_back(r);
        }
      }
    }
  }
  m.set_decode_megakernel_tuning(0, 0);
  // Ring depth, stage size and grid at context 1024: how much the ring's cover of the stalls
  // matters (blocks, stages, stage KiB; 0: the kernel's default).
  BENCH_OK(m.set_decode_megakernel(true));
  for (absl::string_view spec : absl::StrSplit(o.tunings, ',', absl::SkipEmpty())) {
    std::vector<int> v;
    bool parsed = true;
    for (absl::string_view f : absl::StrSplit(spec, '.')) {
      int x = 0;
      parsed = parsed && absl::SimpleAtoi(f, &x);
      v.push_back(x);
    }
    if (!parsed || v.size() < 4 || v.size() > 5) {
      std::fprintf(stderr, "--mega-tunings: '%s' is not BLOCKS.STAGES.KB.PREFETCHKB[.FORM]\n",
                   std::string(spec).c_str());
      return 2;
    }
    const int blocks = v[0], stages = v[1], kb = v[2], pf = v[3];
    const int form = v.size() == 5 ? v[4] : -1;
    m.set_decode_megakernel_tuning(blocks, stages, kb, pf, form);
    const int64_t launches = m.mega_decode_launches();
    Row r;
    const std::string name =
        absl::StrFormat("mega1 blocks%d stages%d kb%d pf%d form%d", blocks, stages, kb, pf, form);
    if (bench.Decode(1, 1024, name, &r)) {
      if (m.mega_decode_launches() == launches) r.note += " (kernel NOT used)";
      PrintRow(r);
      rows->push_back(r);
    }
  }
  m.set_decode_megakernel_tuning(0, 0);
  BENCH_OK(m.set_decode_megakernel(mega0));
  return 0;
}

// One graph decode case with the kernel's timeline on at each context (and each L2 lookahead at
// context 1024); the table printed is of its last step.
inline void MegaTimeline(CudaPhiModel& m, Bench& bench, const MegaSweepOptions& o) {
  // One graph decode case with the kernel's timeline on; the table is of its last step.
  const bool mega0 = m.decode_megakernel();
  BENCH_OK(m.set_decode_megakernel(true));
  std::vector<std::pair<int, int>> cases = {{128, 0}, {1024, 0}, {4096, 0}};
  for (absl::string_view f : absl::StrSplit(o.timeline_pf, ',', absl::SkipEmpty())) {
    int pf = 0;
    if (absl::SimpleAtoi(f, &pf)) cases.push_back({1024, pf});
  }
  for (auto [ctx, pf] : cases) {
    m.set_decode_megakernel_tuning(0, 0, 0, pf, o.timeline_form);
    BENCH_OK(m.set_decode_megakernel_timeline(o.timeline));
    Row r;
    const std::string name = absl::StrFormat("mega1 timeline pf%d form%d", pf, o.timeline_form);
    if (!bench.Decode(1, ctx, name, &r)) continue;
    PrintRow(r);
    absl::StatusOr<std::vector<uint64_t>> tl = m.decode_megakernel_timeline();
    BENCH_OK(tl.status());
    std::printf("%s", FormatMegaTimeline(*tl, o.timeline, o.model_layers,
                                         absl::StrFormat("timeline b1 ctx%d pf%d", ctx, pf))
                          .c_str());
  }
  BENCH_OK(m.set_decode_megakernel_timeline(0));
  m.set_decode_megakernel_tuning(0, 0);
  BENCH_OK(m.set_decode_megakernel(mega0));
}

}  // namespace phishard::bench
