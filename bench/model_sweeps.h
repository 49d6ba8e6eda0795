// phishard_bench's alternated sweeps of one model setting each (--NAME-rounds / --NAME-cases /
// --NAME, bench/setting_sweep.h): the flags and the runs, in the order phishard_bench runs them.
#pragma once

#include <vector>

#include "CLI/CLI.hpp"
#include "bench/bench_steps.h"
#include "bench/setting_sweep.h"
#include "model/cuda_phi_model.h"

namespace phishard::bench {

struct ModelSettingSweeps {
  IntSettingSweep fc1_sms{.name = "fc1-sms",
                          .label = "fc1sms",
                          .title = "decode fc1 SM target sweep",
                          .cases = "4x1024,8x1024,16x1024,32x1024,8x4096",
                          .values = "0,24,33"};
  IntSettingSweep fc1_min_kv{.name = "fc1-min-kv",
                             .label = "fc1minkv",
                             .title = "decode fc1 SM target K/V bound sweep",
                             .cases = "8x128,8x512,8x1024,16x512,8x4096",
                             .values = "0,8192,1073741824"};
  IntSettingSweep fold_short{.name = "fold-short-ctx",
                             .label = "foldshort",
                             .title = "decode fold of short-context steps sweep",
                             .cases = "16x128,32x128,32x256,16x512,32x1024",
                             .values = "0,256"};
  IntSettingSweep fc2_defer{.name = "fc2-defer",
                            .label = "fc2defer",
                            .title = "decode fc2 deferred to the next LayerNorm sweep",
                            .cases = "8x128,8x1024,12x1024,16x1024,8x4096,16x4096",
                            .values = "0,1"};
  IntSettingSweep short_regs{.name = "short-regs",
                             .label = "shortregs",
                             .title = "decode short-context register-staged attention sweep",
                             .cases = "64x128,128x128,256x128,256x256,128x512",
                             .values = "0,256"};
  IntSettingSweep short_regs_ctx{
      .name = "short-regs-ctx",
      .label = "shortregsctx",
      .title = "decode short-context register-staged attention context bound sweep",
      .cases = "128x192,256x160,256x192,256x256",
      .values = "160,256"};
  IntSettingSweep dense_bulk{.name = "dense-bulk",
                             .label = "densebulk",
                             .title = "decode dense bulk GEMV sweep",
                             .cases = "1x1024,2x1024,4x1024,1x4096",
                             .values = "0,1"};
  // Graph replay against eager launches alternated: the fixed table's graph / eager rows run
  // minutes apart, and under the 700 W cap the later rows inherit what ran before them.
  IntSettingSweep graphs{.name = "graphs",
                         .label = "graphs",
                         .title = "decode graph replay against eager launches",
                         .cases = "256x1024,1x1024",
                         .values = "1,0"};
  IntSettingSweep warp_heads{.name = "warp-heads",
                             .label = "warpheads",
                             .title = "decode one-warp-a-head attention sweep",
                             .cases = "128x128,160x128,192x512,256x128,256x1024",
                             .values = "0,1"};

  // The decode stream (model/cuda_phi_stream.cc) against the op-by-op 1-row path.
  IntSettingSweep stream{.name = "stream",
                         .label = "stream",
                         .title = "decode stream against op by op",
                         .cases = "1x128,1x1024,1x4096",
                         .values = "1,0"};
  IntSettingSweep stream_preload{.name = "stream-preload",
                                 .label = "preload",
                                 .title = "decode stream attention's K/V stages before its wait",
                                 .cases = "1x128,1x1024,1x4096",
                                 .values = "0,1,2"};
  IntSettingSweep stream_blocks{.name = "stream-blocks",
                                .label = "blocks",
                                .title = "decode stream kernel's grid (0: every SM)",
                                .cases = "1x128,1x1024,1x4096",
                                .values = "0,120,108"};
  IntSettingSweep stream_head{.name = "stream-head",
                              .label = "head",
                              .title = "decode stream: the LM head as a stream launch",
                              .cases = "1x128,1x1024,1x4096",
                              .values = "0,1"};
  IntSettingSweep stream_inflight{.name = "stream-inflight",
                                  .label = "oneinflight",
                                  .title =
                                      "decode stream: one copy in flight a block from "
                                      "this context (-1: never)",
                                  .cases = "1x128,1x1024,1x4096",
                                  .values = "-1,0"};
  IntSettingSweep stream_host_logits{.name = "stream-host-logits",
                                     .label = "hostlogits",
                                     .title = "decode stream: the LM head writes the host logits",
                                     .cases = "1x128,1x1024,1x4096",
                                     .values = "0,1",
                                     .mode = "graph"};  // (greedy steps download no logits)
  IntSettingSweep stream_poll{.name = "stream-poll",
                              .label = "poll",
                              .title = "decode stream: dense waits on the attention output itself",
                              .cases = "1x128,1x1024,1x4096",
                              .values = "0,1"};
  IntSettingSweep stream_attn_smem{.name = "stream-attn-smem",
                                   .label = "attnsmem",
                                   .title = "decode stream dense chunks' attention output in smem",
                                   .cases = "1x128,1x1024,1x4096",
                                   .values = "0,1"};

  void AddFlags(CLI::App& app) {
    stream.AddFlags(app, "set_decode_stream", "1 (on) or 0 (off)");
    stream_preload.AddFlags(app, "set_decode_stream_preload", "stages (0-2)");
    stream_blocks.AddFlags(app, "set_decode_stream_blocks", "blocks (0: every SM)");
    stream_attn_smem.AddFlags(app, "set_decode_stream_attn_smem", "0 or 1");
    stream_head.AddFlags(app, "set_decode_stream_head", "0 or 1");
    stream_inflight.AddFlags(app, "set_decode_stream_one_in_flight_ctx",
                             "contexts from which (0: every step; -1: none)");
    stream_poll.AddFlags(app, "set_decode_stream_poll", "0 or 1");
    stream_host_logits.AddFlags(app, "set_decode_stream_host_logits", "0 or 1");
    fc1_sms.AddFlags(app, "set_decode_fc1_sms, applied to every step size 1-256 here",
                     "SM count targets (0: every SM)");
    fc1_min_kv.AddFlags(app, "set_decode_fc1_sms_min_kv_tokens",
                        "summed-context bounds in tokens (0: every step of the row range)");
    fold_short.AddFlags(app, "set_decode_fold_short's mean-context bound",
                        "mean contexts in tokens (0: off)");
    fc2_defer.AddFlags(app, "set_decode_fc2_defer (steps with fc1's SM target)",
                       "0 (off) or 1 (on)");
    short_regs.AddFlags(app, "set_decode_short_regs_rows", "row bounds (0: off)");
    short_regs_ctx.AddFlags(app, "set_decode_short_regs_ctx", "mean-context bounds (tokens)");
    dense_bulk.AddFlags(app, "set_decode_dense_bulk_rows", "row bounds (0: cuBLASLt)");
    graphs.AddFlags(app, "set_cuda_graphs", "1 graph replays, 0 the same kernels launched eagerly");
    warp_heads.AddFlags(app, "set_decode_warp_heads", "0 (off) or 1 (on)");
  }

  // Each sweep with rounds > 0, the model's setting restored after it.
  void Run(CudaPhiModel& m, Bench& bench, std::vector<Row>* rows) const {
    const int fc1_sms0 = m.decode_fc1_sms(), fc1_min_kv0 = m.decode_fc1_sms_min_kv_tokens();
    fc1_sms.Run(
        bench,
        [&m](int v) {
          m.set_decode_fc1_sms(v, 1, 256);
          m.set_decode_fc1_sms_min_kv_tokens(0);  // every step: the target alone
        },
        [&m, fc1_sms0, fc1_min_kv0] {
          m.set_decode_fc1_sms(fc1_sms0);
          m.set_decode_fc1_sms_min_kv_tokens(fc1_min_kv0);
        },
        rows);
    const int fold_short_rows0 = m.decode_fold_short_rows();
    const int fold_short_ctx0 = m.decode_fold_short_ctx();
    fold_short.Run(
        bench, [&m, fold_short_rows0](int v) { m.set_decode_fold_short(fold_short_rows0, v); },
        [&m, fold_short_rows0, fold_short_ctx0] {
          m.set_decode_fold_short(fold_short_rows0, fold_short_ctx0);
        },
        rows);
    short_regs.Run(
        bench, [&m] { return m.decode_short_regs_rows(); },
        [&m](int v) { m.set_decode_short_regs_rows(v); }, rows);
    short_regs_ctx.Run(
        bench, [&m] { return m.decode_short_regs_ctx(); },
        [&m](int v) { m.set_decode_short_regs_ctx(v); }, rows);
    fc2_defer.Run(
        bench, [&m] { return m.decode_fc2_defer() ? 1 : 0; },
        [&m](int v) { m.set_decode_fc2_defer(v != 0); }, rows);
    fc1_min_kv.Run(
        bench, [&m] { return m.decode_fc1_sms_min_kv_tokens(); },
        [&m](int v) { m.set_decode_fc1_sms_min_kv_tokens(v); }, rows);
    dense_bulk.Run(
        bench, [&m] { return m.decode_dense_bulk_rows(); },
        [&m](int v) { m.set_decode_dense_bulk_rows(v); }, rows);
    warp_heads.Run(
        bench, [&m] { return m.decode_warp_heads() ? 1 : 0; },
        [&m](int v) { m.set_decode_warp_heads(v != 0); }, rows);
    stream.Run(
        bench, [&m] { return m.decode_stream() ? 1 : 0; },
        [&m](int v) { BENCH_OK(m.set_decode_stream(v != 0)); }, rows);
    stream_preload.Run(
        bench, [&m] { return m.decode_stream_preload(); },
        [&m](int v) { m.set_decode_stream_preload(v); }, rows);
    stream_blocks.Run(
        bench, [&m] { return m.decode_stream_blocks(); },
        [&m](int v) { m.set_decode_stream_blocks(v); }, rows);
    stream_attn_smem.Run(
        bench, [&m] { return m.decode_stream_attn_smem() ? 1 : 0; },
        [&m](int v) { m.set_decode_stream_attn_smem(v != 0); }, rows);
    stream_head.Run(
        bench, [&m] { return m.decode_stream_head() ? 1 : 0; },
        [&m](int v) { m.set_decode_stream_head(v != 0); }, rows);
    stream_inflight.Run(
        bench, [&m] { return m.decode_stream_one_in_flight_ctx(); },
        [&m](int v) { m.set_decode_stream_one_in_flight_ctx(v); }, rows);
    stream_poll.Run(
        bench, [&m] { return m.decode_stream_poll() ? 1 : 0; },
        [&m](int v) { BENCH_OK(m.set_decode_stream_poll(v != 0)); }, rows);
    stream_host_logits.Run(
        bench, [&m] { return m.decode_stream_host_logits() ? 1 : 0; },
        [&m](int v) { m.set_decode_stream_host_logits(v != 0); }, rows);
    graphs.Run(
        bench, [&m] { return m.cuda_graphs() ? 1 : 0; }, [&m](int v) { m.set_cuda_graphs(v != 0); },
        rows);
  }
};

}  // namespace phishard::bench
