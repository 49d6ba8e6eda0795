// Tests for model/model_path: local directories and a fake Hugging Face hub cache built in a
// temp dir (refs/main, explicit revisions, ref names, the env var precedence, errors).
#include "model/model_path.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr const char* kEnvVars[] = {"HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE", "HF_HOME", "HOME"};
constexpr const char* kSha1 = "0123456789abcdef0123456789abcdef01234567";
constexpr const char* kSha2 = "fedcba9876543210fedcba9876543210fedcba98";

class ModelPathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "phishard_hub_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    tmp_ = tmpl;
    for (const char* v : kEnvVars) {
      if (const char* old = getenv(v)) saved_[v] = old;
      unsetenv(v);
    }
    cache_ = tmp_ / "hub";
    setenv("HUGGINGFACE_HUB_CACHE", cache_.c_str(), 1);
  }
  void TearDown() override {
    for (const char* v : kEnvVars) {
      auto it = saved_.find(v);
      if (it != saved_.end()) {
        setenv(v, it->second.c_str(), 1);
      } else {
        unsetenv(v);
      }
    }
    fs::remove_all(tmp_);
  }

  // Creates ROOT/models--ORG--NAME/snapshots/SHA (with a config.json) and returns it.
  static fs::path MakeSnapshot(const fs::path& root, const std::string& folder,
                               const std::string& sha) {
    fs::path snap = root / folder / "snapshots" / sha;
    fs::create_directories(snap);
    std::ofstream(snap / "config.json") << "{}";
    return snap;
  }
  static void WriteRef(const fs::path& root, const std::string& folder, const std::string& ref,
                       const std::string& sha) {
    fs::path p = root / folder / "refs" / ref;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << sha;  // huggingface_hub writes the hash without a newline
  }

  fs::path tmp_, cache_;
  std::map<std::string, std::string> saved_;
};

TEST_F(ModelPathTest, ExistingDirectory) {
  fs::path d = tmp_ / "my-model";
  fs::create_directories(d);
  auto r = ResolveModelDir(d.string());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, d);
  // Relative paths resolve against the working directory and come back absolute.
  auto rel = ResolveModelDir("models/tiny-phi-code");
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_TRUE(rel->is_absolute());
  EXPECT_TRUE(fs::exists(*rel / "config.json"));
}

TEST_F(ModelPathTest, HubCacheRefsMain) {
  const fs::path snap = MakeSnapshot(cache_, "models--microsoft--phi-2", kSha1);
  MakeSnapshot(cache_, "models--microsoft--phi-2", kSha2);  // an older download
  WriteRef(cache_, "models--microsoft--phi-2", "main", std::string(kSha1) + "\n");
  auto r = ResolveModelDir("microsoft/phi-2");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, snap);
}

TEST_F(ModelPathTest, ExplicitRevisionHashAndRefName) {
  MakeSnapshot(cache_, "models--microsoft--phi-2", kSha1);
  const fs::path snap2 = MakeSnapshot(cache_, "models--microsoft--phi-2", kSha2);
  WriteRef(cache_, "models--microsoft--phi-2", "main", kSha1);
  WriteRef(cache_, "models--microsoft--phi-2", "pr/3", kSha2);

  auto r = ResolveModelDir("microsoft/phi-2", std::string(kSha2));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, snap2);
  r = ResolveModelDir("microsoft/phi-2", std::string("pr/3"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, snap2);
  r = ResolveModelDir("microsoft/phi-2", std::string(""));  // empty = no revision
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->filename(), kSha1);

  r = ResolveModelDir("microsoft/phi-2", std::string("v9"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr("v9"), HasSubstr((cache_ / "models--microsoft--phi-2").string())));

  r = ResolveModelDir("microsoft/phi-2", std::string("../../etc"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelPathTest, SingleSnapshotWithoutRefs) {
  const fs::path snap = MakeSnapshot(cache_, "models--gpt2", kSha1);  // id without an org
  auto r = ResolveModelDir("gpt2");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, snap);
}

TEST_F(ModelPathTest, SeveralSnapshotsWithoutRefsIsAmbiguous) {
  MakeSnapshot(cache_, "models--org--m", kSha1);
  MakeSnapshot(cache_, "models--org--m", kSha2);
  auto r = ResolveModelDir("org/m");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(kSha1), HasSubstr(kSha2), HasSubstr("revision")));
}

TEST_F(ModelPathTest, RefPointsToMissingSnapshot) {
  MakeSnapshot(cache_, "models--org--m", kSha1);
  WriteRef(cache_, "models--org--m", "main", kSha2);
  auto r = ResolveModelDir("org/m");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), AllOf(HasSubstr(kSha2), HasSubstr("refs/main")));
}

TEST_F(ModelPathTest, NotFoundListsPlacesSearched) {
  auto r = ResolveModelDir("org/absent-model");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  const std::string msg(r.status().message());
  EXPECT_THAT(msg, AllOf(HasSubstr("org/absent-model"), HasSubstr("local directory"),
                         HasSubstr((cache_ / "models--org--absent-model").string()),
                         HasSubstr("$HUGGINGFACE_HUB_CACHE")));
  // Empty snapshots folder: nothing to pick.
  fs::create_directories(cache_ / "models--org--empty" / "snapshots");
  r = ResolveModelDir("org/empty");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  // Something that is neither a directory nor a hub id.
  r = ResolveModelDir("/no/such/dir/anywhere");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("/no/such/dir/anywhere"));
  EXPECT_EQ(ResolveModelDir("").status().code(), absl::StatusCode::kInvalidArgument);
}

// Model ids, revisions and refs files are joined under the hub cache; none may lead out of it.
// (A local directory given as the model is the operator's choice and is taken as is.)
TEST_F(ModelPathTest, HubIdsRevisionsAndRefsCannotClimbOutOfTheCache) {
  MakeSnapshot(cache_, "models--org--m", kSha1);
  WriteRef(cache_, "models--org--m", "main", kSha1);
  fs::create_directories(tmp_ / "etc");  // what a climb from the cache would reach
  for (const std::string& id : {"org/..", "../org", "org/../../etc", "org/m/../../../etc", "a/b/c",
                                "org\\m", "org//m", "org/./m"}) {
    SCOPED_TRACE(id);
    auto r = ResolveModelDir(id);
    ASSERT_FALSE(r.ok()) << "resolved to " << *r;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("not a hub id ORG/NAME"));
  }
  for (const std::string& rev :
       {"../../etc", "/etc", "..", ".", "pr/../../../../etc", "main/../../../../etc"}) {
    SCOPED_TRACE(rev);
    auto r = ResolveModelDir("org/m", rev);
    ASSERT_FALSE(r.ok()) << "resolved to " << *r;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("is not a commit hash or ref name"));
  }
  for (const std::string& ref : {"../../../etc", "/etc", ".."}) {
    SCOPED_TRACE(ref);
    WriteRef(cache_, "models--org--m", "main", ref);
    auto r = ResolveModelDir("org/m");
    ASSERT_FALSE(r.ok()) << "resolved to " << *r;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("not a commit"));
  }
}

// The resolved path, or the error text as a path (so a failure shows in EXPECT_EQ, no crash).
fs::path ResolveOrError(const std::string& id) {
  auto r = ResolveModelDir(id);
  return r.ok() ? *r : fs::path(r.status().ToString());
}

TEST_F(ModelPathTest, CacheRootPrecedence) {
  const fs::path a = tmp_ / "a", b = tmp_ / "b", home = tmp_ / "home", hf_home = tmp_ / "hfh";
  const fs::path in_a = MakeSnapshot(a, "models--o--m", kSha1);
  const fs::path in_b = MakeSnapshot(b, "models--o--m", kSha1);
  const fs::path in_hf_home = MakeSnapshot(hf_home / "hub", "models--o--m", kSha1);
  const fs::path in_home = MakeSnapshot(home / ".cache/huggingface/hub", "models--o--m", kSha1);
  setenv("HUGGINGFACE_HUB_CACHE", a.c_str(), 1);
  setenv("HF_HUB_CACHE", b.c_str(), 1);
  setenv("HF_HOME", hf_home.c_str(), 1);
  setenv("HOME", home.c_str(), 1);
  EXPECT_EQ(ResolveOrError("o/m"), in_a);
  unsetenv("HUGGINGFACE_HUB_CACHE");
  EXPECT_EQ(ResolveOrError("o/m"), in_b);
  unsetenv("HF_HUB_CACHE");
  EXPECT_EQ(ResolveOrError("o/m"), in_hf_home);
  unsetenv("HF_HOME");
  EXPECT_EQ(ResolveOrError("o/m"), in_home);
  unsetenv("HOME");
  auto r = ResolveModelDir("o/m");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace phishard
