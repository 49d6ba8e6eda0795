// `download-weights`, `tokenize` and `generate`: the subcommands that need no gRPC server.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/model_factory.h"
#include "model/model_path.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/adapter_store.h"
#include "server/cli.h"
#include "server/stopping_criteria.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

int FailWith(std::string_view command, const absl::Status& status) {
  std::cerr << "phishard " << command << ": " << status.message() << std::endl;
  return 1;
}

std::optional<std::string> OptionalRevision(const std::string& revision) {
  if (revision.empty()) return std::nullopt;
  return revision;
}

// Weight files of `dir` with `extension`, in WeightStore::OpenDir's order: model{ext} alone when
// it and an index both exist, else the files named by model{ext}.index.json when it exists (each
// must exist), else every file with the extension.
absl::StatusOr<std::vector<fs::path>> WeightFiles(const fs::path& dir,
                                                  const std::string& extension) {
  std::vector<fs::path> files;
  const fs::path index = dir / absl::StrCat("model", extension, ".index.json");
  const fs::path single = dir / absl::StrCat("model", extension);
  std::error_code ec;
  if (fs::exists(index, ec) && fs::is_regular_file(single, ec)) return std::vector{single};
  if (fs::exists(index, ec)) {
    std::ifstream in(index);
    nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index.string(), ": not a safetensors index (no weight_map object)"));
    }
    std::vector<std::string> names;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index.string(), ": weight_map[\"", tensor, "\"] is not a file name"));
      }
      names.push_back(file.get<std::string>());
    }
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
    for (const std::string& n : names) {
      if (!fs::is_regular_file(dir / n, ec)) {
        return absl::NotFoundError(
            absl::StrCat(index.string(), " names ", n, ", which is not in ", dir.string()));
      }
      files.push_back(dir / n);
    }
    return files;
  }
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.is_regular_file(ec) && absl::EndsWith(entry.path().filename().string(), extension)) {
      files.push_back(entry.path());
    }
  }
  if (files.empty() && extension == ".safetensors") {
    // As serve (WeightStore::OpenDir): a directory with only PyTorch checkpoints is read as it
    // is (model/torch_checkpoint.h), where upstream would convert it to safetensors first.
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.is_regular_file(ec) && entry.path().extension() == ".bin") {
        files.push_back(entry.path());
      }
    }
  }
  if (files.empty()) {
    return absl::NotFoundError(absl::StrCat("no *", extension,
                                            " (or PyTorch *.bin) weight files in ", dir.string(),
                                            " (this shard reads local files only)"));
  }
  return files;
}

}  // namespace

int RunDownloadWeights(const DownloadWeightsOptions& o) {
  if (o.source != "hub" && o.source != "local") {
    return FailWith("download-weights",
                    absl::UnimplementedError(absl::StrCat(
                        "--source ", o.source,
                        ": only local weights are supported (a directory or the Hugging Face "
                        "cache)")));
  }
  fs::path dir;
  if (const char* override_dir = std::getenv("WEIGHTS_CACHE_OVERRIDE");
      override_dir != nullptr && *override_dir != '\0') {
    dir = override_dir;  // spec §1.4: the directory holding the weight files directly
  } else {
    absl::StatusOr<fs::path> resolved = ResolveModelDir(o.model_id, OptionalRevision(o.revision));
    if (!resolved.ok()) return FailWith("download-weights", resolved.status());
    dir = *resolved;
  }
  absl::StatusOr<std::vector<fs::path>> files = WeightFiles(dir, o.extension);
  if (!files.ok()) return FailWith("download-weights", files.status());
  if (!o.adapter_id.empty() && o.adapter_id != "__base_model__") {
    // Resolved exactly as `serve --adapter-id` will (AdapterStore: --adapter-source, the adapter
    // roots, by default the model directory, then the hub cache): the launcher runs this step
    // first and aborts on failure, so it must accept every id serve accepts, and only those.
    absl::StatusOr<AdapterSourceKind> source =
        ParseAdapterSource(o.adapter_source, "--adapter-source");
    if (!source.ok()) return FailWith("download-weights", source.status());
    AdapterStoreOptions so;
    for (const std::string& r : o.adapter_roots) so.roots.emplace_back(r);
    if (so.roots.empty()) so.roots.push_back(dir);
    so.hub_cache = HubCacheFromEnv(ProcessEnv());
    absl::StatusOr<AdapterStore> store = AdapterStore::Create(so);
    if (!store.ok()) return FailWith("download-weights", store.status());
    absl::StatusOr<fs::path> adapter = store->Resolve(o.adapter_id, *source);
    if (!adapter.ok()) return FailWith("download-weights", adapter.status());
    std::error_code ec;
    if (!fs::exists(*adapter / "adapter_config.json", ec)) {
      return FailWith("download-weights", absl::NotFoundError(absl::StrCat(
                                              "adapter ", o.adapter_id, ": no ",
                                              (*adapter / "adapter_config.json").string())));
    }
  }
  PHI_LOG(INFO) << "Files are already present on the host. Skipping download. (" << files->size()
                << " weight file(s) in " << dir.string() << ")";
  return 0;
}

int RunTokenize(const TokenizeOptions& o) {
  absl::StatusOr<fs::path> dir = ResolveModelDir(o.model, std::nullopt);
  if (!dir.ok()) return FailWith("tokenize", dir.status());
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromDir(*dir);
  if (!tok.ok()) return FailWith("tokenize", tok.status());
  nlohmann::json out;
  out["ids"] = (*tok)->EncodeWithSpecialTokens(o.text);
  std::cout << out.dump() << std::endl;
  return 0;
}

int RunGenerate(const GenerateOptions& o) {
  absl::StatusOr<fs::path> dir = ResolveModelDir(o.model, std::nullopt);
  if (!dir.ok()) return FailWith("generate", dir.status());
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromDir(*dir);
  if (!tok.ok()) return FailWith("generate", tok.status());
  ModelLoadOptions load;
  load.model_dir = *dir;
  load.device = o.device;
  load.dtype = o.dtype;
  absl::StatusOr<std::unique_ptr<ModelBackend>> model = CreateModelBackend(load);
  if (!model.ok()) return FailWith("generate", model.status());
  ModelBackend& m = **model;
  const PhiConfig& cfg = m.config();

  const std::vector<int32_t> prompt = (*tok)->EncodeWithSpecialTokens(o.prompt);
  if (prompt.empty()) {
    return FailWith("generate", absl::InvalidArgumentError("--prompt encodes to no tokens"));
  }
  const int total = static_cast<int>(prompt.size()) + o.max_new_tokens;
  if (total > cfg.max_position_embeddings) {
    return FailWith("generate", absl::InvalidArgumentError(absl::StrFormat(
                                    "prompt (%d tokens) + --max-new-tokens %d exceeds the "
                                    "model's max_position_embeddings %d",
                                    prompt.size(), o.max_new_tokens, cfg.max_position_embeddings)));
  }
  absl::StatusOr<std::vector<int32_t>> checked_eos = CheckedEosTokenIds(cfg, **tok);
  if (!checked_eos.ok()) return FailWith("generate", checked_eos.status());
  const std::vector<int32_t> eos = *std::move(checked_eos);

  // One sequence: exactly the blocks it needs (the last generated token is never fed back).
  const int num_blocks = KvBlockAllocator::BlocksFor(total - 1);
  if (absl::Status s = m.AllocateKvCache(num_blocks, kKvBlockSize); !s.ok()) {
    return FailWith("generate", s);
  }
  KvBlockAllocator allocator(num_blocks);
  absl::StatusOr<std::vector<int32_t>> blocks = allocator.Allocate(num_blocks);
  if (!blocks.ok()) return FailWith("generate", blocks.status());

  ForwardBatch fb;
  fb.token_ids = prompt;
  for (int p = 0; p < static_cast<int>(prompt.size()); ++p) fb.positions.push_back(p);
  fb.seqs.push_back(
      SequenceInput{static_cast<int>(prompt.size()), static_cast<int>(prompt.size()), *blocks, 0});
  fb.logit_rows = {static_cast<int32_t>(prompt.size()) - 1};

  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  double prefill_s = 0;
  int position = static_cast<int>(prompt.size());
  for (int step = 0; step < o.max_new_tokens; ++step) {
    if (absl::Status s = m.Forward(fb, &logits); !s.ok()) return FailWith("generate", s);
    if (step == 0) {
      prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    // Greedy: argmax, and its log-softmax over the raw logits (double accumulation).
    const float* row = logits.data();
    const int v = cfg.vocab_size;
    const int best = static_cast<int>(std::max_element(row, row + v) - row);
    double sum = 0;
    for (int k = 0; k < v; ++k) sum += std::exp(static_cast<double>(row[k]) - row[best]);
    ids.push_back(best);
    logprobs.push_back(static_cast<float>(-std::log(sum)));
    if (!o.ignore_eos && std::find(eos.begin(), eos.end(), best) != eos.end()) break;
    if (step + 1 == o.max_new_tokens) break;
    fb.token_ids = {best};
    fb.positions = {position};
    fb.seqs[0].num_new_tokens = 1;
    fb.seqs[0].context_len = ++position;
    fb.logit_rows = {0};
  }
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string text = (*tok)->Decode(ids, /*skip_special_tokens=*/true);
  if (o.json) {
    nlohmann::json out;
    out["ids"] = ids;
    out["text"] = text;
    out["logprobs"] = logprobs;
    std::cout << out.dump() << std::endl;
  } else {
    std::cout << text << std::endl;
  }
  const double decode_s = total_s - prefill_s;
  std::cerr << absl::StrFormat(
                   "%d prompt tokens, %d generated on %s (%s): prefill %.1f ms, decode %.1f "
                   "tokens/s",
                   prompt.size(), ids.size(), m.device_type(), m.dtype_name(), prefill_s * 1e3,
                   ids.size() > 1 ? (ids.size() - 1) / std::max(decode_s, 1e-9) : 0.0)
            << std::endl;
  return 0;
}

}  // namespace phishard
