#include "server/sequencer.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"

namespace phishard {
namespace {

// Ranks > 0 poll the control channel this often (for Stop() and stale calls).
constexpr absl::Duration kPoll = absl::Milliseconds(200);
// Margin on top of the peers' own waits, for scheduling and the network: up to 5 s, but never
// more than the timeout itself (short timeouts in tests).
absl::Duration Slack(absl::Duration timeout) { return std::min(absl::Seconds(5), timeout); }

// One message: a type letter, the sequence number, then text fields, "\n"-separated (fields have
// their newlines replaced by spaces).
struct Message {
  char type = 0;
  uint64_t seq = 0;
  std::vector<std::string> fields;
};

std::string Encode(char type, uint64_t seq, std::initializer_list<std::string_view> fields = {}) {
  std::string out = absl::StrCat(std::string(1, type), "\n", seq);
  for (std::string_view f : fields) {
    std::string clean(f);
    std::replace(clean.begin(), clean.end(), '\n', ' ');
    absl::StrAppend(&out, "\n", clean);
  }
  return out;
}

bool Decode(std::string_view text, Message* m) {
  std::vector<std::string> parts =
      absl::StrSplit(absl::string_view(text.data(), text.size()), '\n');
  if (parts.size() < 2 || parts[0].size() != 1 || !absl::SimpleAtoi(parts[1], &m->seq)) {
    return false;
  }
  m->type = parts[0][0];
  m->fields.assign(parts.begin() + 2, parts.end());
  return true;
}

std::string Printable(std::string_view text) {
  std::string out(text.substr(0, 120));
  for (char& c : out) {
    if (c == '\n') c = ' ';
  }
  return out;
}

// What identifies a call in rank 0's list of waiting calls: id and request bytes together.
uint64_t CallKey(const std::string& id, uint64_t digest) {
  return RequestDigest(id) ^ (digest * 0x9e3779b97f4a7c15ull);
}

}  // namespace

uint64_t RequestDigest(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

RpcSequencer::RpcSequencer(ControlChannel* control, SequencerOptions options,
                           std::function<void(const std::string&)> on_broken)
    : control_(control), options_(options), on_broken_(std::move(on_broken)) {
  PHI_CHECK(control_ != nullptr && control_->world_size() > 1);
  last_activity_ = absl::Now();
}

RpcSequencer::~RpcSequencer() { Stop(); }

void RpcSequencer::Start(SubmitFn submit) {
  absl::MutexLock lock(&mu_);
  PHI_CHECK(!stopped_) << "RpcSequencer::Start after Stop";
  submit_ = std::move(submit);
  if (rank() != 0 && !follower_.joinable()) follower_ = std::thread([this] { FollowLoop(); });
}

absl::Status RpcSequencer::Refusal() const {
  if (!broken_.empty()) {
    return absl::AbortedError(absl::StrCat("tensor-parallel group is broken: ", broken_));
  }
  return absl::UnavailableError("shard is shutting down");
}

void RpcSequencer::Admit(Call call) {
  std::replace(call.id.begin(), call.id.end(), '\n', ' ');  // as the messages carry it
  absl::Status refused;
  SubmitFn submit;
  {
    absl::MutexLock lock(&mu_);
    if (!broken_.empty() || stopping_ || stopped_ || !submit_) {
      refused = Refusal();
    } else if (rank() != 0) {
      pending_.push_back(Pending{std::move(call), absl::Now()});
      cv_.SignalAll();
      return;  // the follower thread takes it from here
    } else {
      submit = submit_;
    }
  }
  if (!refused.ok()) {
    call.finish(refused);
    return;
  }
  auto shared = std::make_shared<Call>(std::move(call));
  auto status = std::make_shared<absl::Status>();
  const uint64_t key = CallKey(shared->id, shared->digest);
  {
    absl::MutexLock lock(&mu_);
    root_waiting_.push_back(key);
  }
  const bool queued = submit(
      [this, shared, status, key] {
        {
          absl::MutexLock lock(&mu_);
          auto it = std::find(root_waiting_.begin(), root_waiting_.end(), key);
          if (it != root_waiting_.end()) root_waiting_.erase(it);
        }
        *status = Lead(*shared);
      },
      [shared, status] { shared->finish(*status); });
  if (!queued) {
    {
      absl::MutexLock lock(&mu_);
      auto it = std::find(root_waiting_.begin(), root_waiting_.end(), key);
      if (it != root_waiting_.end()) root_waiting_.erase(it);
    }
    shared->finish(absl::UnavailableError("shard is shutting down"));
  }
}

void RpcSequencer::Shutdown() {
  std::deque<Pending> dropped;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    dropped.swap(pending_);
    cv_.SignalAll();
  }
  for (Pending& p : dropped) p.call.finish(absl::UnavailableError("shard is shutting down"));
}

void RpcSequencer::Break(const std::string& reason) {
  std::deque<Pending> dropped;
  absl::Status refusal;
  {
    absl::MutexLock lock(&mu_);
    if (broken_.empty()) broken_ = reason.empty() ? "unknown reason" : reason;
    reported_broken_ = true;  // whoever broke it has been told
    dropped.swap(pending_);
    refusal = Refusal();
    cv_.SignalAll();
  }
  for (Pending& p : dropped) p.call.finish(refusal);
}

void RpcSequencer::Stop() {
  std::deque<Pending> dropped;
  {
    absl::MutexLock lock(&mu_);
    stopped_ = true;
    submit_ = nullptr;
    dropped.swap(pending_);
    cv_.SignalAll();
  }
  if (follower_.joinable()) follower_.join();
  for (Pending& p : dropped) p.call.finish(absl::UnavailableError("shard is shutting down"));
}

void RpcSequencer::Broken(const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    if (reported_broken_ || !broken_.empty()) return;
    reported_broken_ = true;
  }
  PHI_LOG(ERROR) << "tensor-parallel sequencer: " << reason;
  on_broken_(reason);
  Break(reason);  // in case on_broken did not
}

// ---- rank 0 ------------------------------------------------------------------------------------

absl::Status RpcSequencer::Lead(Call& call) {
  {
    absl::MutexLock lock(&mu_);
    if (!broken_.empty() || stopping_ || stopped_) return Refusal();
  }
  const uint64_t seq = ++next_seq_;
  const std::string& id = call.id;
  // The calls queued behind this one: a peer holding a call that is not among them (nor this
  // one) knows rank 0 never received it.
  std::string waiting;
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t k : root_waiting_)
      absl::StrAppend(&waiting, waiting.empty() ? "" : ",", absl::StrFormat("%016x", k));
  }
  absl::Status st = control_->BroadcastFromRoot(
      Encode('R', seq, {absl::StrFormat("%016x", call.digest), id, waiting}), options_.timeout);
  if (!st.ok()) {
    Broken(absl::StrCat("cannot announce ", id, " to the other ranks: ", st.message()));
    return absl::AbortedError(absl::StrCat(id, ": not run: ", st.message()));
  }
  // A peer answers once its own copy arrived, or after `timeout` without it.
  absl::StatusOr<std::vector<std::string>> acks =
      control_->GatherToRoot(options_.timeout + Slack(options_.timeout));
  if (!acks.ok()) {
    const std::string why =
        absl::StrCat("no answer to the announcement of ", id, " within ",
                     absl::FormatDuration(options_.timeout + Slack(options_.timeout)), ": ",
                     acks.status().message());
    Broken(why);
    return absl::AbortedError(absl::StrCat(id, ": not run: ", why));
  }
  std::vector<std::string> problems;
  for (int r = 1; r < world_size(); ++r) {
    Message m;
    if (!Decode((*acks)[r], &m) || m.type != 'A' || m.seq != seq || m.fields.empty()) {
      const std::string why = absl::StrFormat(
          "ranks out of step: rank %d answered the announcement of %s (seq %d) with '%s'", r, id,
          seq, Printable((*acks)[r]));
      Broken(why);
      return absl::AbortedError(absl::StrCat(id, ": not run: ", why));
    }
    if (m.fields[0] != "ok") {
      problems.push_back(absl::StrCat("rank ", r, ": ", m.fields.size() > 1 ? m.fields[1] : "?"));
    }
  }
  if (!problems.empty()) {
    const std::string why = absl::StrJoin(problems, "; ");
    if (absl::Status s = control_->BroadcastFromRoot(Encode('X', seq, {why}), options_.timeout);
        !s.ok()) {
      Broken(absl::StrCat("cannot tell the other ranks to skip ", id, ": ", s.message()));
    }
    PHI_LOG(WARNING) << id << " refused by the tensor-parallel sequencer: " << why;
    return absl::AbortedError(
        absl::StrCat(id, " was not run on any rank: ", why,
                     " (collective RPCs must reach every shard with identical requests)"));
  }
  if (absl::Status s = control_->BroadcastFromRoot(Encode('G', seq), options_.timeout); !s.ok()) {
    Broken(absl::StrCat("cannot start ", id, " on the other ranks: ", s.message()));
    return absl::AbortedError(absl::StrCat(id, ": not run: ", s.message()));
  }
  absl::Status result = call.run();
  if (!result.ok()) ErrorRound(seq, id);
  return result;
}

// ---- ranks > 0 ---------------------------------------------------------------------------------

void RpcSequencer::FollowLoop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (stopped_) return;
    }
    absl::StatusOr<std::string> msg = control_->ReceiveFromRoot(kPoll);
    if (msg.ok()) {
      FollowOne(*msg);
      continue;
    }
    if (absl::IsDeadlineExceeded(msg.status())) {
      ExpireStale();
      continue;
    }
    // The connection to rank 0 is gone. When rank 0 left on purpose (or the group is being torn
    // down) the abort watch says so within milliseconds: give it a moment to Break() first, so
    // that this is not mistaken for a failure.
    bool quiet = false;
    {
      const absl::Time until = absl::Now() + absl::Seconds(1);
      absl::MutexLock lock(&mu_);
      while (broken_.empty() && !stopped_ && !stopping_ && absl::Now() < until) {
        cv_.WaitWithDeadline(&mu_, until);
      }
      quiet = !broken_.empty() || stopped_ || stopping_;
    }
    if (!quiet) {
      Broken(absl::StrCat("rank ", rank(),
                          " lost its control connection to rank 0: ", msg.status().message()));
    }
    return;
  }
}

void RpcSequencer::FollowOne(const std::string& announcement) {
  Message m;
  if (!Decode(announcement, &m) || m.type != 'R' || m.fields.size() != 3) {
    Broken(
        absl::StrFormat("ranks out of step: rank %d expected an announcement from rank 0, got "
                        "'%s'",
                        rank(), Printable(announcement)));
    return;
  }
  const uint64_t seq = m.seq;
  const std::string& id = m.fields[1];
  uint64_t digest = 0;
  absl::flat_hash_set<uint64_t> root_waiting;
  bool well_formed = absl::SimpleHexAtoi(m.fields[0], &digest);
  for (absl::string_view k : absl::StrSplit(m.fields[2], ',', absl::SkipEmpty())) {
    uint64_t key = 0;
    well_formed = well_formed && absl::SimpleHexAtoi(k, &key);
    root_waiting.insert(key);
  }
  if (!well_formed) {
    Broken(absl::StrCat("malformed announcement from rank 0: '", Printable(announcement), "'"));
    return;
  }
  ExpireAbsent(root_waiting, CallKey(id, digest));

  // Wait for this rank's own copy of `id`.
  std::optional<Call> mine;
  std::optional<Call> mismatched;
  std::pair<std::string, std::string> answer = {"ok", ""};
  {
    absl::MutexLock lock(&mu_);
    follower_busy_ = true;
    last_activity_ = absl::Now();
    const absl::Time deadline = absl::Now() + options_.timeout;
    auto find = [&]() -> std::deque<Pending>::iterator {
      for (auto it = pending_.begin(); it != pending_.end(); ++it) {
        if (it->call.id == id && it->call.digest == digest) return it;
      }
      for (auto it = pending_.begin(); it != pending_.end(); ++it) {
        if (it->call.id == id) return it;
      }
      return pending_.end();
    };
    auto it = find();
    while (it == pending_.end() && broken_.empty() && !stopping_ && !stopped_ &&
           absl::Now() < deadline) {
      cv_.WaitWithDeadline(&mu_, deadline);  // Admit, Break, Shutdown and Stop signal
      it = find();
    }
    if (it != pending_.end()) {
      if (it->call.digest == digest) {
        mine = std::move(it->call);
      } else {
        mismatched = std::move(it->call);
        answer = {"mismatch", absl::StrFormat("rank %d received %s with different request bytes "
                                              "than rank 0 (digest %016x, rank 0 %016x)",
                                              rank(), id, mismatched->digest, digest)};
      }
      pending_.erase(it);
    } else if (stopping_ || stopped_) {
      answer = {"missing", absl::StrFormat("rank %d is shutting down", rank())};
    } else {
      answer = {"missing", absl::StrFormat("rank %d did not receive %s within %s", rank(), id,
                                           absl::FormatDuration(options_.timeout))};
    }
  }
  if (mismatched.has_value()) {
    mismatched->finish(absl::AbortedError(absl::StrCat(
        id,
        " was not run on any rank: this rank's request differs from rank 0's (collective RPCs "
        "must reach every shard with identical requests)")));
  }
  auto done = [&](absl::Status st, std::optional<Call>& call) {
    if (call.has_value()) call->finish(st);
    absl::MutexLock lock(&mu_);
    follower_busy_ = false;
    last_activity_ = absl::Now();
  };

  if (absl::Status s =
          control_->SendToRoot(Encode('A', seq, {answer.first, answer.second}), options_.timeout);
      !s.ok()) {
    Broken(absl::StrCat("cannot answer rank 0's announcement of ", id, ": ", s.message()));
    return done(absl::AbortedError(absl::StrCat(id, ": not run: ", s.message())), mine);
  }
  // Rank 0 decides once every rank answered (each waits up to `timeout` for its copy).
  absl::StatusOr<std::string> verdict =
      control_->ReceiveFromRoot(2 * options_.timeout + Slack(options_.timeout));
  Message v;
  if (!verdict.ok() || !Decode(*verdict, &v) || v.seq != seq || (v.type != 'G' && v.type != 'X')) {
    const std::string why =
        verdict.ok()
            ? absl::StrCat("ranks out of step: expected rank 0's verdict on ", id, ", got '",
                           Printable(*verdict), "'")
            : absl::StrCat("no verdict from rank 0 on ", id, ": ", verdict.status().message());
    Broken(why);
    return done(absl::AbortedError(absl::StrCat(id, ": not run: ", why)), mine);
  }
  if (v.type == 'X') {
    const std::string why = v.fields.empty() ? "?" : v.fields[0];
    PHI_LOG(WARNING) << id << " refused by the tensor-parallel sequencer: " << why;
    return done(absl::AbortedError(absl::StrCat(
                    id, " was not run on any rank: ", why,
                    " (collective RPCs must reach every shard with identical requests)")),
                mine);
  }
  PHI_CHECK(mine.has_value()) << "rank 0 started " << id << " that this rank did not accept";
  SubmitFn submit;
  {
    absl::MutexLock lock(&mu_);
    submit = submit_;
  }
  auto call = std::make_shared<Call>(*std::move(mine));
  auto status = std::make_shared<absl::Status>();
  absl::Notification ran;
  const bool queued = submit && submit(
                                    [this, call, status, seq, &ran] {
                                      *status = call->run();
                                      if (!status->ok()) ErrorRound(seq, call->id);
                                      ran.Notify();
                                    },
                                    [call, status] { call->finish(*status); });
  if (!queued) {
    // Rank 0 runs it (and its collectives) without us: the group cannot go on.
    Broken(absl::StrCat("rank ", rank(), " cannot run ", id, ": its executor has stopped"));
    call->finish(absl::UnavailableError("shard is shutting down"));
  } else {
    ran.WaitForNotification();  // the next announcement only after this call (and its rounds)
  }
  absl::MutexLock lock(&mu_);
  follower_busy_ = false;
  last_activity_ = absl::Now();
}

void RpcSequencer::ErrorRound(uint64_t seq, const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    if (!broken_.empty()) return;  // the group is going down anyway
  }
  if (rank() == 0) {
    absl::StatusOr<std::vector<std::string>> replies = control_->GatherToRoot(options_.timeout);
    if (!replies.ok()) {
      Broken(absl::StrCat(
          id, " failed on rank 0, but not every rank reported failing it within ",
          absl::FormatDuration(options_.timeout),
          " (the ranks diverged, or one waits in a collective): ", replies.status().message()));
      return;
    }
    for (int r = 1; r < world_size(); ++r) {
      Message m;
      if (!Decode((*replies)[r], &m) || m.type != 'F' || m.seq != seq) {
        Broken(absl::StrFormat("%s failed on rank 0 but rank %d answered '%s': the ranks diverged",
                               id, r, Printable((*replies)[r])));
        return;
      }
    }
    if (absl::Status s = control_->BroadcastFromRoot(Encode('V', seq), options_.timeout); !s.ok()) {
      Broken(absl::StrCat("cannot confirm the failure of ", id, ": ", s.message()));
    }
    return;
  }
  if (absl::Status s = control_->SendToRoot(Encode('F', seq), options_.timeout); !s.ok()) {
    Broken(absl::StrCat("cannot report the failure of ", id, " to rank 0: ", s.message()));
    return;
  }
  absl::StatusOr<std::string> v =
      control_->ReceiveFromRoot(2 * options_.timeout + Slack(options_.timeout));
  Message m;
  if (!v.ok() || !Decode(*v, &m) || m.type != 'V' || m.seq != seq) {
    Broken(v.ok() ? absl::StrFormat("%s failed on rank %d but rank 0 went on with '%s': the ranks "
                                    "diverged",
                                    id, rank(), Printable(*v))
                  : absl::StrCat(id, " failed on rank ", rank(),
                                 " and rank 0 did not confirm failing it too (the ranks diverged, "
                                 "or rank 0 waits in a collective): ",
                                 v.status().message()));
  }
}

void RpcSequencer::ExpireAbsent(const absl::flat_hash_set<uint64_t>& root_waiting,
                                uint64_t announced) {
  // Rank 0 announced while it had neither these calls queued nor was running them: it never got
  // them. `grace` covers a copy that reaches rank 0 a little later than this rank.
  const absl::Duration grace = std::min(options_.timeout, absl::Seconds(2));
  std::vector<Call> expired;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = pending_.begin(); it != pending_.end();) {
      const uint64_t key = CallKey(it->call.id, it->call.digest);
      if (key != announced && !root_waiting.contains(key) && now - it->arrived > grace) {
        expired.push_back(std::move(it->call));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (Call& c : expired) {
    PHI_LOG(WARNING) << c.id << " expired: rank 0 does not have it";
    c.finish(absl::AbortedError(absl::StrFormat(
        "%s reached rank %d, but rank 0 did not announce it (rank 0 does not have it): collective "
        "RPCs must be sent to every shard (did it reach rank 0?)",
        c.id, rank())));
  }
}

void RpcSequencer::ExpireStale() {
  std::vector<Call> expired;
  {
    absl::MutexLock lock(&mu_);
    if (follower_busy_) return;
    const absl::Time now = absl::Now();
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (now - std::max(it->arrived, last_activity_) > options_.timeout) {
        expired.push_back(std::move(it->call));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (Call& c : expired) {
    PHI_LOG(WARNING) << c.id << " expired: rank 0 did not sequence it";
    c.finish(absl::AbortedError(absl::StrFormat(
        "%s reached rank %d, but rank 0 did not announce it within %s: collective RPCs must be "
        "sent to every shard (did it reach rank 0?)",
        c.id, rank(), absl::FormatDuration(options_.timeout))));
  }
}

}  // namespace phishard
