// Every generate.v1.LoraxService RPC, as raw request bytes, through the real service: the
// LoraxService handlers (raw-bytes parse, ExplainParseFailure, proto conversion, validation, the
// executor) on a BatchEngine over the deterministic fake backend of tests/server/fake_model.h
// (its KV reads go through the block tables, so a wrong table is an INTERNAL error, not silent)
// with the demo model's tokenizer and config, and a real AdapterService whose only adapter root is
// the demo model's directory (adapters/prose inside it), served in process
// (grpc::Server::InProcessChannel: no socket). The fake backend accepts the adapter registry but
// does not apply adapters: the adapter RPCs run their real disk, budget and slot logic.
//
// An input is a sequence of calls against one shard state, each `[op u8][len u16][len bytes]`:
//   op % 18 in 0..12: that RPC (kMethods order) with the bytes as its request;
//   13 Decode of the batch the shard last returned; 14 Decode concatenating the last two;
//   15 FilterBatch of the last batch keeping the requests whose bit is set in the first byte;
//   16 ClearCache of the last batch; 17 a Prefill built field by field from the bytes (edge
//   values included), which reaches the engine far more often than mutated wire bytes.
// Properties checked on every call:
//   - the status is one a client is meant to see (OK, INVALID_ARGUMENT, NOT_FOUND,
//     RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNIMPLEMENTED, and PERMISSION_DENIED for adapter
//     ids leading outside the roots); INTERNAL/UNKNOWN means an invariant broke;
//   - an OK response parses as its generated type (so every string is valid UTF-8);
//   - Prefill/Decode: one generation per live request, equal-length token lists, a CachedBatch
//     whose request_ids/size/max_tokens agree with the requests it holds, max_tokens % 16 == 0;
//   - after the input, ClearCache(all) returns every KV block (no leak) and Health is OK.
// Each input starts from an empty cache and no adapter loaded; a Warmup in the input triggers a
// re-warmup afterwards, adapters it loaded are offloaded.
//
// PHISHARD_FUZZ_WRITE_SEEDS=DIR: writes the seed inputs to DIR and exits (tests/fuzz/corpus/
// rpc_fuzzer was made that way). PHISHARD_FUZZ_VERBOSE=1 prints every call and its status.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "grpcpp/grpcpp.h"
#include "model/phi_config.h"
#include "server/adapter_service.h"
#include "server/batch_engine.h"
#include "server/client.h"
#include "server/lorax_service.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/integration/raw_grpc.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

constexpr const char* kMethods[] = {"Info",          "ServiceDiscovery", "ClearCache",
                                    "FilterBatch",   "Warmup",           "Prefill",
                                    "Embed",         "Classify",         "Decode",
                                    "Health",        "DownloadAdapter",  "LoadAdapter",
                                    "OffloadAdapter"};
constexpr int kNumMethods = 13;
enum Op : uint8_t {
  kOpWarmup = 4,
  kOpPrefill = 5,
  kOpDecode = 8,
  kOpDecodeLast = 13,
  kOpDecodeLastTwo = 14,
  kOpFilterLast = 15,
  kOpClearLast = 16,
  kOpStructuredPrefill = 17,
  kNumOps = 18
};
constexpr int kPoolBlocks = 256;  // fake "memory": Warmup sizes the pool from it

// The fake backend with the demo model's config (adapter shapes are checked against it), taking
// the adapter registry without applying it.
class FuzzModel : public testing_fake::FakeModel {
 public:
  explicit FuzzModel(PhiConfig config)
      : FakeModel(config.vocab_size, config.max_position_embeddings), config_(std::move(config)) {}
  const PhiConfig& config() const override { return config_; }
  absl::Status SetAdapterRegistry(const AdapterRegistry*) override { return absl::OkStatus(); }

 private:
  PhiConfig config_;
};

PhiConfig DemoConfigOrDie() {
  absl::StatusOr<PhiConfig> c = LoadPhiConfig(std::string(PHISHARD_MODELS) + "/tiny-phi-code");
  PHI_CHECK(c.ok()) << "fuzz setup: " << c.status();
  return *c;
}

struct Shard {
  FuzzModel model{DemoConfigOrDie()};
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<BatchEngine> engine;
  std::unique_ptr<AdapterService> adapters;
  std::unique_ptr<LoraxService> service;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<grpc::Channel> channel;
};

Shard& TheShard() {
  static Shard* s = [] {
    auto* shard = new Shard();
    shard->model.memory_blocks = kPoolBlocks;
    shard->model.eos_id = 0;
    shard->tokenizer = fuzz::LoadTokenizerOrDie(std::string(PHISHARD_MODELS) + "/tiny-phi-code");
    BatchEngineOptions eo;
    eo.memory_wiggle_room = 1.0;
    shard->engine = std::make_unique<BatchEngine>(&shard->model, shard->tokenizer.get(), eo);
    AdapterServiceOptions ao;
    ao.store.roots = {std::string(PHISHARD_MODELS) + "/tiny-phi-code"};
    ao.device_memory_bytes = int64_t{1} << 30;  // 10 % of it: ~100 MiB of adapters
    ao.num_slots = 4;                           // small, so "slots full" is reachable
    absl::StatusOr<std::unique_ptr<AdapterService>> adapters =
        AdapterService::Create(&shard->model, ao);
    PHI_CHECK(adapters.ok()) << "fuzz setup: " << adapters.status();
    shard->adapters = *std::move(adapters);
    LoraxServiceOptions so;
    so.urls = {"unix:///tmp/fuzz-0"};
    so.adapters = shard->adapters.get();
    shard->service = std::make_unique<LoraxService>(shard->engine.get(), &shard->model, so);
    grpc::ServerBuilder builder;
    builder.SetMaxReceiveMessageSize(std::numeric_limits<int>::max());
    builder.RegisterService(shard->service.get());
    shard->server = builder.BuildAndStart();
    PHI_CHECK(shard->server != nullptr) << "fuzz setup: in-process gRPC server did not start";
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    shard->channel = shard->server->InProcessChannel(args);
    return shard;
  }();
  return *s;
}

// PHISHARD_FUZZ_VERBOSE=1: one line per call on stderr (to see what a corpus input does).
bool Verbose() {
  static const bool verbose = std::getenv("PHISHARD_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

std::string MethodPath(int m) { return std::string("/generate.v1.LoraxService/") + kMethods[m]; }

grpc::Status Call(int method, const std::string& request, std::string* response) {
  return integration::RawUnary(TheShard().channel, MethodPath(method), request, response, 60);
}

// The shard state every input starts from: warmed as the router warms it at a small size (spec
// §3.2: 2 requests of 32 tokens, 48 prefill tokens, 40 total), pool kPoolBlocks. The restore runs
// after every input that called Warmup, so its batch is made cheap: greedy, no prefill logprobs
// (the router's own warmup sorts the 4k vocabulary for top-p/typical-p and takes a log-softmax
// per prompt token, which made restores half of all fuzzing time). The limits the engine keeps
// (max_input_length, max_prefill_tokens, max_new_tokens) are the router's; the router's exact
// warmup batch is fuzzed as the seed `router_startup`.
pb::WarmupRequest RestoreWarmupRequest() {
  pb::WarmupRequest w = RouterWarmupRequest(32, 48, 40);
  for (pb::Request& r : *w.mutable_batch()->mutable_requests()) {
    r.clear_parameters();
    r.mutable_parameters()->set_temperature(1.0f);
    r.mutable_parameters()->set_top_p(1.0f);
    r.mutable_parameters()->set_typical_p(1.0f);
    r.mutable_parameters()->set_repetition_penalty(1.0f);
    r.set_prefill_logprobs(false);
  }
  return w;
}

void WarmupOrDie() {
  static const pb::WarmupRequest w = RestoreWarmupRequest();
  std::string resp;
  const grpc::Status st = Call(kOpWarmup, w.SerializeAsString(), &resp);
  PHI_CHECK(st.ok()) << "fuzz setup: Warmup failed: " << st.error_message();
}

bool StatusAllowed(int method, grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::UNIMPLEMENTED:
      return true;
    case grpc::StatusCode::PERMISSION_DENIED:  // an adapter id leading outside the roots
      return method >= 10;
    case grpc::StatusCode::INTERNAL:  // Embed / Classify: the spec's answer for Phi
      return method == 6 || method == 7;
    default:
      return false;
  }
}

// What the fuzzer knows about the shard's cached batches: the last CachedBatch the shard returned
// for each id, and which of its requests finished (carried generated_text).
struct Tracker {
  std::vector<uint64_t> order;  // batch ids, most recent last
  std::map<uint64_t, pb::CachedBatch> cached;
  std::map<uint64_t, std::set<uint64_t>> finished;  // batch id -> finished request ids

  void Drop(uint64_t id) {
    cached.erase(id);
    finished.erase(id);
    std::erase(order, id);
  }
  void Put(const pb::CachedBatch& b) {
    cached[b.id()] = b;
    std::erase(order, b.id());
    order.push_back(b.id());
  }
  // Live (unfinished) request ids of batch `id`, in batch order.
  std::vector<uint64_t> Live(uint64_t id) const {
    std::vector<uint64_t> live;
    auto it = cached.find(id);
    if (it == cached.end()) return live;
    auto f = finished.find(id);
    for (uint64_t r : it->second.request_ids()) {
      if (f == finished.end() || !f->second.count(r)) live.push_back(r);
    }
    return live;
  }
};

void CheckCachedBatch(const pb::CachedBatch& b, const std::vector<uint64_t>& expected_ids) {
  FUZZ_CHECK(b.size() == static_cast<uint32_t>(b.request_ids_size()))
      << "CachedBatch.size " << b.size() << " vs " << b.request_ids_size() << " ids";
  FUZZ_CHECK(std::vector<uint64_t>(b.request_ids().begin(), b.request_ids().end()) == expected_ids)
      << "CachedBatch.request_ids not the requests sent, in order";
  FUZZ_CHECK(b.max_tokens() % 16 == 0) << "max_tokens " << b.max_tokens();
  FUZZ_CHECK(b.max_tokens() >= 16 * b.size()) << "a request holds no KV block";
  FUZZ_CHECK(b.current_tokens() <= b.size());
}

// Generations of one step: one per live request of `expected` (all requests for Prefill), none
// for unknown ids, equal-length lists.
template <class Resp>
void CheckStep(const Resp& r, const std::vector<uint64_t>& live) {
  std::set<uint64_t> want(live.begin(), live.end());
  std::set<uint64_t> seen;
  for (const pb::Generation& g : r.generations()) {
    FUZZ_CHECK(want.count(g.request_id())) << "generation for unknown request " << g.request_id();
    FUZZ_CHECK(seen.insert(g.request_id()).second) << "two generations for " << g.request_id();
    const pb::NextTokens& t = g.next_tokens();
    FUZZ_CHECK(t.ids_size() == 1 && t.logprobs_size() == 1 && t.texts_size() == 1 &&
               t.is_special_size() == 1)
        << "request " << g.request_id() << ": next_tokens lists are not one token each";
    FUZZ_CHECK(t.alternative_tokens_size() == 0 || t.alternative_tokens_size() == 1);
    FUZZ_CHECK(t.ids(0) < 4095u) << "token id " << t.ids(0) << " outside the vocabulary";
    // A chosen token's logprob is a log-probability under whatever parameters (extreme ones
    // included): never NaN, never above 0; an alternative's never NaN.
    FUZZ_CHECK(!std::isnan(t.logprobs(0)) && t.logprobs(0) <= 0.0f)
        << "request " << g.request_id() << ": token logprob " << t.logprobs(0);
    for (const pb::AlternativeTokens& alt : t.alternative_tokens()) {
      for (float lp : alt.logprobs()) {
        FUZZ_CHECK(!std::isnan(lp)) << "request " << g.request_id() << ": alternative logprob NaN";
      }
    }
    if (g.has_prefill_tokens()) {
      const pb::PrefillTokens& p = g.prefill_tokens();
      FUZZ_CHECK(p.ids_size() == p.logprobs_size() && p.ids_size() == p.texts_size());
      FUZZ_CHECK(p.ids_size() == static_cast<int>(g.prefill_tokens_length()));
      // The first prompt token has no logprob (NaN, as upstream); the others are finite or -inf.
      for (int k = 1; k < p.logprobs_size(); ++k) {
        FUZZ_CHECK(!std::isnan(p.logprobs(k)) && p.logprobs(k) <= 0.0f)
            << "request " << g.request_id() << ": prompt logprob " << k << " = " << p.logprobs(k);
      }
    }
  }
  FUZZ_CHECK(seen.size() == want.size())
      << seen.size() << " generations for " << want.size() << " live requests";
}

struct Session {
  Tracker tracker;
  bool warmed = true;  // false after a Warmup call: the pool may be gone or resized
  std::map<uint32_t, pb::AdapterParameters> loaded;  // adapter index -> what LoadAdapter got
};

// Records which requests of batch `id` finished in this step; true when all of `all` did.
template <class Resp>
bool AbsorbStep(Session& s, uint64_t id, const Resp& r, const std::vector<uint64_t>& all) {
  std::set<uint64_t>& done = s.tracker.finished[id];
  for (const pb::Generation& g : r.generations()) {
    if (g.has_generated_text()) done.insert(g.request_id());
  }
  for (uint64_t rid : all) {
    if (!done.count(rid)) return false;
  }
  return true;
}

// Builds a Prefill from bytes, field by field, including values no sane router sends.
pb::PrefillRequest StructuredPrefill(fuzz::ByteReader& in) {
  static const float kFloats[] = {0.0f,
                                  1.0f,
                                  0.5f,
                                  2.0f,
                                  -1.0f,
                                  1e-30f,
                                  1e30f,
                                  std::numeric_limits<float>::quiet_NaN(),
                                  std::numeric_limits<float>::infinity(),
                                  0.999f,
                                  1e-38f,
                                  3e38f,
                                  -3e38f,
                                  1e-45f};
  auto f = [&] { return kFloats[in.U8() % 14]; };
  pb::PrefillRequest p;
  pb::Batch* b = p.mutable_batch();
  b->set_id(in.U8() % 8);
  const int n = 1 + in.U8() % 4;
  const bool tokenized = in.U8() % 4 != 0;
  for (int i = 0; i < n; ++i) {
    pb::Request* r = b->add_requests();
    r->set_id(in.U8() % 16);
    const int len = in.U8() % 40;
    std::string text;
    for (int k = 0; k < len; ++k) {
      const uint16_t v = in.U16();
      if (tokenized) r->mutable_tokenized_inputs()->add_ids(v % 4200);  // some >= vocab
      text.push_back(static_cast<char>(0x20 + v % 0x5f));
    }
    r->set_inputs(text);
    r->set_truncate(in.U8() % 48);
    r->set_prefill_logprobs(in.U8() % 3 == 0);
    pb::NextTokenChooserParameters* q = r->mutable_parameters();
    const uint8_t flags = in.U8();
    q->set_temperature((flags & 1) ? f() : 1.0f);
    q->set_top_k((flags & 2) ? in.U8() % 8 : 0);
    q->set_top_p((flags & 4) ? f() : 1.0f);
    q->set_typical_p((flags & 8) ? f() : 1.0f);
    q->set_do_sample(flags & 16);
    q->set_seed(in.U32());
    q->set_repetition_penalty((flags & 32) ? f() : 1.0f);
    q->set_frequency_penalty((flags & 64) ? f() : 0.0f);
    q->set_presence_penalty((flags & 64) ? f() : 0.0f);
    q->set_watermark(flags & 128);
    q->set_return_k_alternatives(in.U8() % 6);
    pb::StoppingCriteriaParameters* st = r->mutable_stopping_parameters();
    st->set_max_new_tokens(in.U8() % 40);
    st->set_ignore_eos_token(in.U8() % 2);
    const int stops = in.U8() % 3;
    for (int k = 0; k < stops; ++k) st->add_stop_sequences(std::string(in.Bytes(1 + in.U8() % 3)));
    r->set_adapter_index(in.U8() % 3);
  }
  b->set_size(static_cast<uint32_t>(n));
  return p;
}

// Runs one op (ops that need a cached batch do nothing without one).
void RunOp(Session& s, uint8_t op, std::string_view payload) {
  std::string resp;
  int method = op;
  std::string request(payload);
  std::vector<uint64_t> expected_ids;  // Prefill/Decode: the requests the answer must cover
  std::vector<uint64_t> live;          // ... and the live ones among them
  std::vector<uint64_t> decoded;       // Decode: the batch ids sent
  fuzz::ByteReader in(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());

  if (op == kOpStructuredPrefill) {
    method = kOpPrefill;
    request = StructuredPrefill(in).SerializeAsString();
  } else if (op == kOpDecodeLast || op == kOpDecodeLastTwo) {
    const size_t k = op == kOpDecodeLast ? 1 : 2;
    if (s.tracker.order.size() < k) return;
    method = kOpDecode;
    pb::DecodeRequest d;
    for (size_t i = s.tracker.order.size() - k; i < s.tracker.order.size(); ++i) {
      *d.add_batches() = s.tracker.cached[s.tracker.order[i]];
    }
    request = d.SerializeAsString();
  } else if (op == kOpFilterLast) {
    if (s.tracker.order.empty()) return;
    method = 3;
    const pb::CachedBatch& b = s.tracker.cached[s.tracker.order.back()];
    const uint8_t mask = in.U8();
    pb::FilterBatchRequest fr;
    fr.set_batch_id(b.id());
    for (int i = 0; i < b.request_ids_size(); ++i) {
      if (mask & (1u << (i % 8))) fr.add_request_ids(b.request_ids(i));
    }
    request = fr.SerializeAsString();
  } else if (op == kOpClearLast) {
    if (s.tracker.order.empty()) return;
    method = 2;
    pb::ClearCacheRequest c;
    c.set_id(s.tracker.order.back());
    request = c.SerializeAsString();
  }

  // What the shard must answer with, from the request as the shard will read it.
  if (method == kOpPrefill) {
    pb::PrefillRequest p;
    if (p.ParseFromString(request)) {
      for (const pb::Request& r : p.batch().requests()) expected_ids.push_back(r.id());
      live = expected_ids;
    }
  } else if (method == kOpDecode) {
    pb::DecodeRequest d;
    if (d.ParseFromString(request)) {
      for (const pb::CachedBatch& b : d.batches()) {
        decoded.push_back(b.id());
        auto it = s.tracker.cached.find(b.id());
        if (it == s.tracker.cached.end()) continue;
        for (uint64_t id : it->second.request_ids()) expected_ids.push_back(id);
        for (uint64_t id : s.tracker.Live(b.id())) live.push_back(id);
      }
    }
  }

  const grpc::Status st = Call(method, request, &resp);
  if (Verbose()) {
    std::fprintf(stderr, "op %2d %-16s %5zu bytes -> %d %s\n", op, kMethods[method], request.size(),
                 st.error_code(), st.error_message().c_str());
  }
  FUZZ_CHECK(StatusAllowed(method, st.error_code()))
      << kMethods[method] << " answered status " << st.error_code() << ": " << st.error_message();
  if (method == kOpWarmup) {
    // Whatever happened, the old cache is gone (BatchEngine::Warmup empties it first).
    s.warmed = false;
    s.tracker = Tracker();
  }
  if (!st.ok()) {
    FUZZ_CHECK(!st.error_message().empty()) << kMethods[method] << " failed without a message";
    if (method == kOpDecode) {
      // A failed Decode leaves the shard's batches untouched only when nothing was popped; the
      // router clears them anyway, and so do we (and forget them).
      for (uint64_t id : decoded) s.tracker.Drop(id);
      pb::ClearCacheRequest c;
      for (uint64_t id : decoded) {
        c.set_id(id);
        FUZZ_CHECK(Call(2, c.SerializeAsString(), nullptr).ok());
      }
    }
    return;
  }

  switch (method) {
    case kOpPrefill: {
      pb::PrefillResponse r;
      FUZZ_CHECK(r.ParseFromString(resp)) << "Prefill response does not parse (UTF-8?)";
      pb::PrefillRequest p;
      PHI_CHECK(p.ParseFromString(request));
      CheckStep(r, live);
      s.tracker.Drop(p.batch().id());  // a new batch under this id (the engine refused reuse)
      const bool all_done = AbsorbStep(s, p.batch().id(), r, expected_ids);
      if (r.has_batch()) {
        FUZZ_CHECK(!all_done) << "Prefill stored a batch whose requests all finished";
        FUZZ_CHECK(r.batch().id() == p.batch().id());
        CheckCachedBatch(r.batch(), expected_ids);
        s.tracker.Put(r.batch());
      } else {
        FUZZ_CHECK(all_done) << "Prefill dropped a batch with unfinished requests";
        s.tracker.Drop(p.batch().id());
      }
      break;
    }
    case kOpDecode: {
      pb::DecodeResponse r;
      FUZZ_CHECK(r.ParseFromString(resp)) << "Decode response does not parse (UTF-8?)";
      CheckStep(r, live);
      // Concatenation (§4.9): everything now lives under the first id.
      std::set<uint64_t> done;
      for (uint64_t id : decoded) {
        done.insert(s.tracker.finished[id].begin(), s.tracker.finished[id].end());
        s.tracker.Drop(id);
      }
      s.tracker.finished[decoded.at(0)] = done;
      const bool all_done = AbsorbStep(s, decoded[0], r, expected_ids);
      if (r.has_batch()) {
        FUZZ_CHECK(!all_done) << "Decode kept a batch whose requests all finished";
        FUZZ_CHECK(r.batch().id() == decoded[0]) << "Decode changed the batch id";
        CheckCachedBatch(r.batch(), expected_ids);
        s.tracker.Put(r.batch());
      } else {
        FUZZ_CHECK(all_done) << "Decode dropped a batch with unfinished requests";
        s.tracker.Drop(decoded[0]);
      }
      break;
    }
    case 3: {  // FilterBatch
      pb::FilterBatchResponse r;
      FUZZ_CHECK(r.ParseFromString(resp));
      FUZZ_CHECK(r.has_batch()) << "FilterBatch answered without a batch (spec §2.3)";
      pb::FilterBatchRequest fr;
      PHI_CHECK(fr.ParseFromString(request));
      CheckCachedBatch(r.batch(),
                       std::vector<uint64_t>(fr.request_ids().begin(), fr.request_ids().end()));
      s.tracker.Put(r.batch());
      break;
    }
    case 2: {  // ClearCache
      pb::ClearCacheRequest c;
      PHI_CHECK(c.ParseFromString(request));
      if (c.has_id()) {
        s.tracker.Drop(c.id());
      } else {
        s.tracker = Tracker();
      }
      break;
    }
    case 11: {  // LoadAdapter
      pb::LoadAdapterRequest l;
      PHI_CHECK(l.ParseFromString(request));
      pb::LoadAdapterResponse r;
      FUZZ_CHECK(r.ParseFromString(resp));
      if (r.loaded()) s.loaded[l.adapter_index()] = l.adapter_parameters();
      break;
    }
    case 12: {  // OffloadAdapter
      pb::OffloadAdapterRequest o;
      PHI_CHECK(o.ParseFromString(request));
      pb::OffloadAdapterResponse r;
      FUZZ_CHECK(r.ParseFromString(resp));
      if (r.offloaded()) s.loaded.erase(o.adapter_index());
      break;
    }
    case 10: {  // DownloadAdapter
      pb::DownloadAdapterResponse r;
      FUZZ_CHECK(r.ParseFromString(resp));
      FUZZ_CHECK(std::isfinite(r.memory_fraction()) && r.memory_fraction() >= 0 &&
                 r.memory_fraction() <= 1)
          << "memory_fraction " << r.memory_fraction();
      break;
    }
    case kOpWarmup: {
      pb::WarmupResponse r;
      FUZZ_CHECK(r.ParseFromString(resp));
      FUZZ_CHECK(r.has_max_supported_total_tokens()) << "Warmup OK without the field (§2.3)";
      FUZZ_CHECK(r.max_supported_total_tokens() % 16 == 0);
      s.warmed = true;
      break;
    }
    default:
      break;
  }
}

void EndOfInput(Session& s) {
  Shard& shard = TheShard();
  for (const auto& [index, params] : s.loaded) {
    pb::OffloadAdapterRequest o;
    *o.mutable_adapter_parameters() = params;
    o.set_adapter_index(index);
    std::string resp;
    FUZZ_CHECK(Call(12, o.SerializeAsString(), &resp).ok()) << "Offload of index " << index;
  }
  FUZZ_CHECK(shard.adapters->registry() == nullptr || shard.adapters->registry()->num_loaded() == 0)
      << "adapters still loaded after offloading every index LoadAdapter reported";
  FUZZ_CHECK(Call(2, pb::ClearCacheRequest().SerializeAsString(), nullptr).ok());
  // The RPC has been answered, so the executor is idle: the engine may be read from here.
  FUZZ_CHECK(shard.engine->num_cached_batches() == 0);
  FUZZ_CHECK(shard.engine->kv_blocks_free() == shard.engine->kv_blocks_total())
      << "KV blocks leaked: " << shard.engine->kv_blocks_free() << " free of "
      << shard.engine->kv_blocks_total();
  FUZZ_CHECK(Call(9, pb::HealthRequest().SerializeAsString(), nullptr).ok())
      << "Health failed after the input";
  if (!s.warmed || shard.engine->kv_blocks_total() != kPoolBlocks) WarmupOrDie();
}

// ---- seeds ----------------------------------------------------------------------------------

std::string Record(uint8_t op, const std::string& payload) {
  std::string r;
  r.push_back(static_cast<char>(op));
  r.push_back(static_cast<char>(payload.size() & 0xff));
  r.push_back(static_cast<char>(payload.size() >> 8));
  return r + payload;
}

pb::PrefillRequest SeedPrefill(uint64_t batch_id, std::vector<uint64_t> ids, int max_new,
                               bool tokenized) {
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(batch_id);
  for (uint64_t id : ids) {
    std::vector<uint32_t> tok;
    if (tokenized) tok = {100, 200, static_cast<uint32_t>(300 + id)};
    *p.mutable_batch()->add_requests() = RouterRequest(id, "def f(x):\n", tok, 64, max_new);
  }
  p.mutable_batch()->set_size(static_cast<uint32_t>(ids.size()));
  return p;
}

void WriteSeeds(const std::string& dir) {
  std::map<std::string, std::string> seeds;
  for (int m = 0; m < kNumMethods; ++m) seeds[std::string("empty_") + kMethods[m]] = Record(m, "");
  seeds["router_startup"] = Record(2, "") + Record(0, "") +
                            Record(kOpWarmup, RouterWarmupRequest(32, 48, 40).SerializeAsString()) +
                            Record(9, "");
  seeds["prefill_decode_filter_clear"] =
      Record(kOpPrefill, SeedPrefill(1, {10, 11, 12}, 6, true).SerializeAsString()) +
      Record(kOpDecodeLast, "") + Record(kOpFilterLast, "\x05") + Record(kOpDecodeLast, "") +
      Record(kOpDecodeLast, "") + Record(kOpClearLast, "");
  seeds["prefill_text_concat"] =
      Record(kOpPrefill, SeedPrefill(0, {1, 2}, 5, false).SerializeAsString()) +
      Record(kOpPrefill, SeedPrefill(7, {3}, 3, true).SerializeAsString()) +
      Record(kOpDecodeLastTwo, "") + Record(kOpDecodeLast, "") + Record(kOpDecodeLast, "");
  {
    pb::PrefillRequest p = SeedPrefill(3, {5}, 4, false);
    pb::Request* r = p.mutable_batch()->mutable_requests(0);
    r->set_prefill_logprobs(true);
    r->mutable_parameters()->set_do_sample(true);
    r->mutable_parameters()->set_temperature(0.7f);
    r->mutable_parameters()->set_top_k(5);
    r->mutable_parameters()->set_return_k_alternatives(3);
    r->mutable_stopping_parameters()->add_stop_sequences("\n");
    seeds["prefill_sampling_logprobs_stops"] =
        Record(kOpPrefill, p.SerializeAsString()) + Record(kOpDecodeLast, "");
  }
  {
    // The router's health probe batch (spec §3.8).
    pb::PrefillRequest p;
    p.mutable_batch()->set_id(std::numeric_limits<uint64_t>::max());
    *p.mutable_batch()->add_requests() =
        RouterRequest(std::numeric_limits<uint64_t>::max(), "liveness", {75}, 1, 1);
    seeds["health_probe_prefill"] = Record(kOpPrefill, p.SerializeAsString());
  }
  {
    pb::PrefillRequest p = SeedPrefill(4, {1}, 2, false);
    p.mutable_batch()->mutable_requests(0)->set_inputs(std::string("ab\xff\xfe", 4));
    seeds["prefill_invalid_utf8"] = Record(kOpPrefill, p.SerializeAsString());
  }
  {
    pb::DecodeRequest d;
    d.add_batches()->set_id(42);
    pb::FilterBatchRequest f;
    f.set_batch_id(42);
    f.add_request_ids(1);
    pb::ClearCacheRequest c;
    c.set_id(0);
    seeds["unknown_batches"] = Record(kOpDecode, d.SerializeAsString()) +
                               Record(3, f.SerializeAsString()) + Record(2, c.SerializeAsString());
  }
  {
    // The demo adapter under the root, loaded at 3, used by a request, offloaded; then ids that
    // try to leave the root.
    auto params = [](const std::string& id) {
      pb::AdapterParameters p;
      p.add_adapter_ids(id);
      return p;
    };
    pb::DownloadAdapterRequest d;
    *d.mutable_adapter_parameters() = params("adapters/prose");
    d.set_adapter_source(pb::LOCAL);
    pb::LoadAdapterRequest l;
    *l.mutable_adapter_parameters() = params("adapters/prose");
    l.set_adapter_source(pb::LOCAL);
    l.set_adapter_index(3);
    pb::PrefillRequest p = SeedPrefill(9, {1, 2}, 3, true);
    p.mutable_batch()->mutable_requests(1)->set_adapter_index(3);
    pb::OffloadAdapterRequest o;
    *o.mutable_adapter_parameters() = params("adapters/prose");
    o.set_adapter_index(3);
    std::string escape;
    for (const char* id :
         {"../../../etc", "/etc", "adapters/../adapters/prose", "a\\b", "org/not-cached"}) {
      pb::LoadAdapterRequest e;
      *e.mutable_adapter_parameters() = params(id);
      e.set_adapter_source(id[0] == 'o' ? pb::HUB : pb::LOCAL);
      e.set_adapter_index(5);
      escape += Record(11, e.SerializeAsString());
    }
    pb::LoadAdapterRequest merge;
    merge.mutable_adapter_parameters()->add_adapter_ids("adapters/prose");
    merge.mutable_adapter_parameters()->add_adapter_ids("adapters/prose");
    merge.mutable_adapter_parameters()->add_weights(0.5f);
    merge.mutable_adapter_parameters()->add_weights(0.5f);
    merge.set_adapter_source(pb::LOCAL);
    merge.set_adapter_index(4);
    seeds["adapter_prose_lifecycle"] =
        Record(10, d.SerializeAsString()) + Record(11, l.SerializeAsString()) +
        Record(kOpPrefill, p.SerializeAsString()) + Record(kOpDecodeLast, "") +
        Record(11, merge.SerializeAsString()) + Record(12, o.SerializeAsString());
    seeds["adapter_escapes"] = escape;
  }
  {
    pb::DownloadAdapterRequest d;
    d.mutable_adapter_parameters()->add_adapter_ids("__base_model__");
    d.set_api_token("hf_secret");
    pb::LoadAdapterRequest l;
    l.mutable_adapter_parameters()->add_adapter_ids("org/adapter");
    l.set_adapter_index(3);
    l.set_adapter_source(pb::LOCAL);
    pb::OffloadAdapterRequest o;
    o.mutable_adapter_parameters()->add_adapter_ids("org/adapter");
    o.set_adapter_index(3);
    seeds["adapters"] = Record(10, d.SerializeAsString()) + Record(11, l.SerializeAsString()) +
                        Record(12, o.SerializeAsString());
  }
  {
    // StructuredPrefill's byte layout, spelled out: batch 2 with 2 requests, tokenized.
    const uint8_t b[] = {
        2, 1, 1,                           // batch id, n - 1, tokenized
        5, 3, 100,  0, 200,  0,    44, 1,  // request 5: 3 ids (100, 200, 300)
        8, 1, 0x11, 2, 7,    0,    0,  0,  // truncate 8, no logprobs, do_sample T=0.5, seed 7
        2, 6, 0,    1, 0,    '\n', 0,      // 2 alternatives, max_new 6, eos on, stop "\n", base
        6, 2, 7,    0, 0xa0, 0x0f,         // request 6: ids 7, 4000
        0, 0, 0,    1, 0,    0,    0,      // no truncate, prefill logprobs, greedy, seed 1
        0, 3, 1,    0, 1};                 // max_new 3, ignore eos, no stops, adapter 1
    seeds["structured_prefill"] =
        Record(kOpStructuredPrefill, std::string(reinterpret_cast<const char*>(b), sizeof(b))) +
        Record(kOpDecodeLast, "") + Record(kOpFilterLast, "\x01") + Record(kOpDecodeLast, "");
  }
  for (const auto& [name, bytes] : seeds) {
    std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
  }
  std::printf("wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
}

}  // namespace
}  // namespace phishard

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace phishard;
  fuzz::QuietLogs();
  // protobuf logs every string field with invalid UTF-8 it parses or serializes: noise here.
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  if (const char* dir = std::getenv("PHISHARD_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  WarmupOrDie();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  fuzz::ByteReader in(data, size);
  Session s;
  int calls = 0;
  while (!in.empty() && calls++ < 24) {
    const uint8_t op = in.U8() % kNumOps;
    const uint16_t len = in.U16();
    RunOp(s, op, in.Bytes(len));
  }
  EndOfInput(s);
  return 0;
}
