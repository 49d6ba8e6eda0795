// The execution model of the shard, in process and deterministic: one FIFO executor for model
// work, Health/Info never waiting behind a step, Ping only ever on the executor thread, device
// faults turning the shard unhealthy (LoraxService.Health and grpc.health.v1 Check/Watch), and a
// graceful shutdown that finishes the RPC in flight and refuses new ones.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <future>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "proto/health.grpc.pb.h"
#include "server/batch_engine.h"
#include "server/client.h"
#include "server/lorax_service.h"
#include "server/shard_server.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
namespace hv1 = ::grpc::health::v1;
using Clock = std::chrono::steady_clock;

// ---- SerialExecutor / ShardHealth --------------------------------------------------------------

TEST(SerialExecutor, RunsTasksInSubmissionOrderOnOneThread) {
  std::vector<int> order;
  std::set<std::thread::id> threads;
  {
    SerialExecutor ex;
    for (int i = 0; i < 200; ++i) {
      ASSERT_TRUE(ex.Submit([&, i] {
        order.push_back(i);
        threads.insert(std::this_thread::get_id());
      }));
    }
    ex.Stop();  // runs everything admitted before returning
    EXPECT_FALSE(ex.Submit([] {}));
  }
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(order[i], i);
  EXPECT_EQ(threads.size(), 1u);
  EXPECT_EQ(threads.count(std::this_thread::get_id()), 0u);
}

TEST(SerialExecutor, SubmitIfIdleRefusesWhileATaskRunsOrWaits) {
  SerialExecutor ex;
  std::promise<void> entered, release;
  std::shared_future<void> release_f = release.get_future().share();
  ASSERT_TRUE(ex.Submit([&] {
    entered.set_value();
    release_f.wait();
  }));
  entered.get_future().wait();
  EXPECT_FALSE(ex.idle());
  EXPECT_FALSE(ex.SubmitIfIdle([] {}));
  release.set_value();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (!ex.idle() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::promise<void> ran;
  ASSERT_TRUE(ex.SubmitIfIdle([&] { ran.set_value(); }));
  EXPECT_EQ(ran.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
}

TEST(ShardHealth, KeepsTheFirstReasonAndNotifiesOnce) {
  ShardHealth h;
  int calls = 0;
  bool last = true;
  const int id = h.Subscribe([&](bool serving) {
    ++calls;
    last = serving;
  });
  EXPECT_TRUE(h.serving());
  h.SetNotServing("first");
  h.SetNotServing("second");
  EXPECT_FALSE(h.serving());
  EXPECT_EQ(h.reason(), "first");
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(last);
  h.Unsubscribe(id);
}

// ---- in-process server with a controllable fake backend ----------------------------------------

// FakeModel whose Forward can be held at a gate, and whose Ping records where and when it ran.
class GatedModel : public testing_fake::FakeModel {
 public:
  absl::Status Forward(const ForwardBatch& b, std::vector<float>* logits) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      forward_thread_ = std::this_thread::get_id();
      in_forward_ = true;
      ++forward_entries_;
      cv_.notify_all();
      cv_.wait(lock, [this] { return open_; });
    }
    absl::Status s = FakeModel::Forward(b, logits);
    std::lock_guard<std::mutex> lock(mu_);
    in_forward_ = false;
    return s;
  }
  absl::Status Ping() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++pings_;
    ping_threads_.push_back(std::this_thread::get_id());
    if (in_forward_) ping_during_forward_ = true;
    return ping_status_;
  }

  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool WaitForEntries(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return forward_entries_ >= n; });
  }
  int forward_entries() {
    std::lock_guard<std::mutex> lock(mu_);
    return forward_entries_;
  }
  int pings() {
    std::lock_guard<std::mutex> lock(mu_);
    return pings_;
  }
  bool ping_during_forward() {
    std::lock_guard<std::mutex> lock(mu_);
    return ping_during_forward_;
  }
  bool pings_on_forward_thread() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto t : ping_threads_) {
      if (t != forward_thread_) return false;
    }
    return true;
  }
  void set_ping_status(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    ping_status_ = std::move(s);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  bool in_forward_ = false;
  bool ping_during_forward_ = false;
  int forward_entries_ = 0;
  int pings_ = 0;
  std::thread::id forward_thread_;
  std::vector<std::thread::id> ping_threads_;
  absl::Status ping_status_;
};

class InProcessShard : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("phishard_exec_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
        Tokenizer::FromDir(std::filesystem::path(PHISHARD_MODELS) / "tiny-phi-code");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
    BatchEngineOptions eo;
    eo.max_kv_blocks = 256;
    engine_ = std::make_unique<BatchEngine>(&model_, tokenizer_.get(), eo);
    opts_.uds_path = (dir_ / "s").string();
    LoraxServiceOptions so;
    so.urls = ShardUrls(opts_);
    service_ = std::make_unique<LoraxService>(engine_.get(), &model_, so);
    absl::StatusOr<std::unique_ptr<ShardServer>> server = ShardServer::Start(opts_, service_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client_ = ShardClient::Connect("unix:" + server_->socket_path(), /*timeout_s=*/30);
    auto channel =
        grpc::CreateChannel("unix:" + server_->socket_path(), grpc::InsecureChannelCredentials());
    health_ = hv1::Health::NewStub(channel);
    absl::StatusOr<pb::WarmupResponse> w = client_->Warmup(RouterWarmupRequest(40, 60, 48));
    ASSERT_TRUE(w.ok()) << w.status();
  }
  void TearDown() override {
    model_.Open();
    if (server_) server_->Shutdown();
    std::filesystem::remove_all(dir_);
  }

  pb::PrefillRequest SmallPrefill(uint64_t batch_id, uint64_t request_id, uint32_t max_new) {
    pb::PrefillRequest req;
    req.mutable_batch()->set_id(batch_id);
    *req.mutable_batch()->add_requests() =
        RouterRequest(request_id, "def f(x):", {12, 13, 14, 15}, 100, max_new);
    return req;
  }

  hv1::HealthCheckResponse::ServingStatus Check(const std::string& service,
                                                grpc::Status* status = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    hv1::HealthCheckRequest req;
    req.set_service(service);
    hv1::HealthCheckResponse resp;
    grpc::Status st = health_->Check(&ctx, req, &resp);
    if (status != nullptr) *status = st;
    return resp.status();
  }

  std::filesystem::path dir_;
  GatedModel model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<BatchEngine> engine_;
  ShardServerOptions opts_;
  std::unique_ptr<LoraxService> service_;
  std::unique_ptr<ShardServer> server_;
  std::unique_ptr<ShardClient> client_;
  std::unique_ptr<hv1::Health::Stub> health_;
};

TEST_F(InProcessShard, HealthAndInfoDoNotWaitBehindARunningStep) {
  model_.Close();
  const int entries = model_.forward_entries();
  auto prefill =
      std::async(std::launch::async, [&] { return client_->Prefill(SmallPrefill(3, 1, 4)); });
  ASSERT_TRUE(model_.WaitForEntries(entries + 1));
  const int pings_before = model_.pings();

  const auto t0 = Clock::now();
  EXPECT_TRUE(client_->Health().ok());
  absl::StatusOr<pb::InfoResponse> info = client_->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(Check(""), hv1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Check("generate.v1.LoraxService"), hv1::HealthCheckResponse::SERVING);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(s, 2.0) << "health/info waited for the step";
  // The step is still held: nothing above could have been queued behind it and answered.
  EXPECT_EQ(prefill.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  EXPECT_EQ(model_.pings(), pings_before) << "Ping must not run while a step holds the device";

  model_.Open();
  absl::StatusOr<pb::PrefillResponse> r = prefill.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generations_size(), 1);
  EXPECT_FALSE(model_.ping_during_forward());
}

TEST_F(InProcessShard, IdleHealthIsARealPingOnTheExecutorThread) {
  const int before = model_.pings();
  EXPECT_TRUE(client_->Health().ok());
  EXPECT_EQ(Check(""), hv1::HealthCheckResponse::SERVING);
  EXPECT_EQ(model_.pings(), before + 2);
  EXPECT_TRUE(model_.pings_on_forward_thread());

  grpc::Status st;
  Check("no.such.Service", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(InProcessShard, DeviceFaultMakesTheShardUnhealthyEverywhere) {
  // Watch first: it must see SERVING, then NOT_SERVING when the device goes away.
  grpc::ClientContext watch_ctx;
  hv1::HealthCheckRequest watch_req;
  auto watch = health_->Watch(&watch_ctx, watch_req);
  hv1::HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), hv1::HealthCheckResponse::SERVING);

  // A failing step whose follow-up Ping fails as well: the device is gone.
  model_.fail_next_forward = absl::InternalError("fake: illegal memory access");
  model_.set_ping_status(absl::InternalError("fake: device lost"));
  absl::StatusOr<pb::PrefillResponse> r = client_->Prefill(SmallPrefill(4, 1, 4));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);

  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), hv1::HealthCheckResponse::NOT_SERVING);
  absl::Status h = client_->Health();
  EXPECT_EQ(h.code(), absl::StatusCode::kInternal);
  EXPECT_NE(h.message().find("illegal memory access"), std::string::npos) << h;
  EXPECT_EQ(Check(""), hv1::HealthCheckResponse::NOT_SERVING);
  // Device steps now fail fast; bookkeeping RPCs still answer.
  r = client_->Prefill(SmallPrefill(5, 2, 4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(client_->ClearCache(std::nullopt).ok());
  watch_ctx.TryCancel();
}

TEST_F(InProcessShard, RequestErrorsDoNotMakeTheShardUnhealthy) {
  pb::PrefillRequest bad = SmallPrefill(6, 1, 0);  // max_new_tokens = 0
  absl::StatusOr<pb::PrefillResponse> r = client_->Prefill(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  // An INTERNAL step failure with a healthy Ping is a one-off, not a lost device.
  model_.fail_next_forward = absl::InternalError("fake: transient");
  r = client_->Prefill(SmallPrefill(7, 1, 4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(client_->Health().ok());
  EXPECT_TRUE(client_->Prefill(SmallPrefill(8, 1, 4)).ok());
}

TEST_F(InProcessShard, ShutdownFinishesTheStepInFlightAndRefusesNewWork) {
  model_.Close();
  const int entries = model_.forward_entries();
  auto prefill =
      std::async(std::launch::async, [&] { return client_->Prefill(SmallPrefill(9, 1, 4)); });
  ASSERT_TRUE(model_.WaitForEntries(entries + 1));
  // Queued behind the held step: admitted before shutdown, so they must complete too.
  auto queued_prefill =
      std::async(std::launch::async, [&] { return client_->Prefill(SmallPrefill(10, 2, 4)); });
  auto queued = std::async(std::launch::async, [&] { return client_->ClearCache(std::nullopt); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  auto shutdown = std::async(std::launch::async, [&] { server_->Shutdown(); });
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  absl::Status refused;
  do {  // Shutdown begins asynchronously; poll until new work is refused.
    refused = client_->Health();
  } while (refused.ok() && Clock::now() < deadline);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_EQ(shutdown.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "Shutdown returned while a step was still running";

  model_.Open();
  absl::StatusOr<pb::PrefillResponse> r = prefill.get();
  EXPECT_TRUE(r.ok()) << r.status();
  absl::StatusOr<pb::PrefillResponse> q = queued_prefill.get();
  EXPECT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(queued.get().ok());
  ASSERT_EQ(shutdown.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(std::filesystem::exists(server_->socket_path()));
}

}  // namespace
}  // namespace phishard
