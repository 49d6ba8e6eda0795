// AdapterStore: adapter ids -> directories on local disk, confined to the adapter roots and the
// Hugging Face cache. Every escape route a request could try (.., absolute paths, symlinked
// directories and files, hub refs) is built for real in a temporary directory.
#include "server/adapter_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace phishard {
namespace {

namespace fs = std::filesystem;

class TempTree {
 public:
  TempTree() {
    char tmpl[] = "/tmp/phadsXXXXXX";
    path_ = fs::path(::mkdtemp(tmpl));
  }
  ~TempTree() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  // A directory that looks like a PEFT adapter to the store (it never parses the files).
  fs::path Adapter(const fs::path& rel) const {
    const fs::path dir = path_ / rel;
    fs::create_directories(dir);
    std::ofstream(dir / "adapter_config.json") << "{}";
    std::ofstream(dir / "adapter_model.safetensors") << "x";
    return dir;
  }

 private:
  fs::path path_;
};

AdapterStore MakeStore(std::vector<fs::path> roots, fs::path hub = {}) {
  absl::StatusOr<AdapterStore> s = AdapterStore::Create({.roots = roots, .hub_cache = hub});
  EXPECT_TRUE(s.ok()) << s.status();
  return *std::move(s);
}

void ExpectError(const absl::StatusOr<fs::path>& r, absl::StatusCode code,
                 const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "resolved to " << r.value();
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

TEST(AdapterStore, LocalIdsResolveUnderTheRootsInOrder) {
  TempTree t;
  const fs::path a = t.Adapter("r1/team/prose");
  const fs::path b = t.Adapter("r2/other");
  t.Adapter("r2/team/prose");  // shadowed by r1's
  AdapterStore store = MakeStore({t.path() / "r1", t.path() / "r2"});
  EXPECT_EQ(store.Resolve("team/prose", AdapterSourceKind::kLocal).value(), fs::canonical(a));
  EXPECT_EQ(store.Resolve("team/prose/", AdapterSourceKind::kLocal).value(), fs::canonical(a));
  EXPECT_EQ(store.Resolve("other", AdapterSourceKind::kLocal).value(), fs::canonical(b));
  // An absolute path inside a root, whatever the source says.
  EXPECT_EQ(store.Resolve(b.string(), AdapterSourceKind::kLocal).value(), fs::canonical(b));
  EXPECT_EQ(store.Resolve(b.string(), AdapterSourceKind::kHub).value(), fs::canonical(b));
  // A symlink that stays inside the roots is fine.
  fs::create_directory_symlink(a, t.path() / "r2" / "alias");
  EXPECT_EQ(store.Resolve("alias", AdapterSourceKind::kLocal).value(), fs::canonical(a));
  ExpectError(store.Resolve("missing", AdapterSourceKind::kLocal), absl::StatusCode::kNotFound,
              "adapter 'missing' not found under the adapter roots");
  ExpectError(store.Resolve((t.path() / "r1/nope").string(), AdapterSourceKind::kLocal),
              absl::StatusCode::kNotFound, "no such directory");
  std::ofstream(t.path() / "r1" / "plainfile") << "x";
  ExpectError(store.Resolve("plainfile", AdapterSourceKind::kLocal), absl::StatusCode::kNotFound,
              "is not a directory");
}

TEST(AdapterStore, MalformedIdsAreInvalidArguments) {
  TempTree t;
  t.Adapter("root/prose");
  AdapterStore store = MakeStore({t.path() / "root"});
  for (const std::string& id :
       std::vector<std::string>{"../root/prose", "prose/../prose", "./prose", "a//b", "a\\b",
                                "/tmp/../etc", std::string("pro\0se", 6), ""}) {
    SCOPED_TRACE(id);
    const absl::StatusOr<fs::path> r = store.Resolve(id, AdapterSourceKind::kLocal);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  ExpectError(store.Resolve("a/b/c", AdapterSourceKind::kHub), absl::StatusCode::kInvalidArgument,
              "is not a hub id ORG/NAME");
}

TEST(AdapterStore, NothingOutsideTheRootsIsReachable) {
  TempTree t;
  t.Adapter("root/prose");
  const fs::path outside = t.Adapter("outside/secret");
  AdapterStore store = MakeStore({t.path() / "root"});
  // Absolute path outside.
  ExpectError(store.Resolve(outside.string(), AdapterSourceKind::kLocal),
              absl::StatusCode::kPermissionDenied, "outside the adapter roots");
  ExpectError(store.Resolve("/etc", AdapterSourceKind::kLocal), absl::StatusCode::kPermissionDenied,
              "outside the adapter roots");
  // A directory symlink in the root that leads out.
  fs::create_directory_symlink(outside, t.path() / "root" / "escape");
  ExpectError(store.Resolve("escape", AdapterSourceKind::kLocal),
              absl::StatusCode::kPermissionDenied,
              "resolves to '" + fs::canonical(outside).string());
  // A symlink one level down (root/dir/link -> ../../outside).
  fs::create_directories(t.path() / "root" / "dir");
  fs::create_directory_symlink("../../outside/secret", t.path() / "root" / "dir" / "link");
  ExpectError(store.Resolve("dir/link", AdapterSourceKind::kLocal),
              absl::StatusCode::kPermissionDenied, "outside the adapter roots");
  // A real directory inside whose weight file is a link out.
  const fs::path sneaky = t.path() / "root" / "sneaky";
  fs::create_directories(sneaky);
  std::ofstream(sneaky / "adapter_config.json") << "{}";
  fs::create_symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors");
  ExpectError(store.Resolve("sneaky", AdapterSourceKind::kLocal),
              absl::StatusCode::kPermissionDenied, "adapter_model.safetensors' is a link to");
  // The same for the config file.
  const fs::path sneaky2 = t.path() / "root" / "sneaky2";
  fs::create_directories(sneaky2);
  fs::create_symlink(outside / "adapter_config.json", sneaky2 / "adapter_config.json");
  ExpectError(store.Resolve("sneaky2", AdapterSourceKind::kLocal),
              absl::StatusCode::kPermissionDenied, "adapter_config.json' is a link to");
  // The root itself being a symlink is fine: roots are canonicalised.
  fs::create_directory_symlink(t.path() / "root", t.path() / "rootlink");
  AdapterStore via_link = MakeStore({t.path() / "rootlink"});
  EXPECT_TRUE(via_link.Resolve("prose", AdapterSourceKind::kLocal).ok());
  EXPECT_FALSE(via_link.Resolve("escape", AdapterSourceKind::kLocal).ok());
}

// models--ORG--NAME/{refs/main, snapshots/SHA/<links into ../../blobs>} as huggingface_hub
// writes it.
fs::path MakeHubRepo(const fs::path& hub, const std::string& org_name, const std::string& sha,
                     bool write_ref = true) {
  std::string folder = "models--" + org_name;
  for (size_t p = folder.find('/'); p != std::string::npos; p = folder.find('/')) {
    folder.replace(p, 1, "--");
  }
  const fs::path repo = hub / folder;
  fs::create_directories(repo / "blobs");
  fs::create_directories(repo / "snapshots" / sha);
  std::ofstream(repo / "blobs" / "cfg") << "{}";
  std::ofstream(repo / "blobs" / "w") << "x";
  fs::create_symlink("../../blobs/cfg", repo / "snapshots" / sha / "adapter_config.json");
  fs::create_symlink("../../blobs/w", repo / "snapshots" / sha / "adapter_model.safetensors");
  if (write_ref) {
    fs::create_directories(repo / "refs");
    std::ofstream(repo / "refs" / "main") << sha << "\n";
  }
  return repo / "snapshots" / sha;
}

TEST(AdapterStore, HubIdsComeFromTheLocalCacheOnly) {
  TempTree t;
  const fs::path hub = t.path() / "hub";
  const fs::path snap = MakeHubRepo(hub, "org/lora", "abc123");
  fs::create_directories(t.path() / "root");
  AdapterStore store = MakeStore({t.path() / "root"}, hub);
  for (AdapterSourceKind s :
       {AdapterSourceKind::kHub, AdapterSourceKind::kS3, AdapterSourceKind::kPbase}) {
    EXPECT_EQ(store.Resolve("org/lora", s).value(), fs::canonical(snap)) << AdapterSourceName(s);
  }
  ExpectError(
      store.Resolve("org/absent", AdapterSourceKind::kHub), absl::StatusCode::kFailedPrecondition,
      "is not in the local cache (no '" + (fs::canonical(hub) / "models--org--absent").string());
  ExpectError(store.Resolve("org/absent", AdapterSourceKind::kS3),
              absl::StatusCode::kFailedPrecondition, "phishard does not download adapters");
  // No refs/main: the only snapshot; two snapshots: ambiguous.
  const fs::path only = MakeHubRepo(hub, "org/noref", "s1", /*write_ref=*/false);
  EXPECT_EQ(store.Resolve("org/noref", AdapterSourceKind::kHub).value(), fs::canonical(only));
  MakeHubRepo(hub, "org/noref", "s2", false);
  ExpectError(store.Resolve("org/noref", AdapterSourceKind::kHub),
              absl::StatusCode::kFailedPrecondition, "2 snapshots");
  // refs/main pointing at a missing snapshot, or trying to climb.
  MakeHubRepo(hub, "org/badref", "s1");
  std::ofstream(hub / "models--org--badref" / "refs" / "main") << "../../../etc";
  ExpectError(store.Resolve("org/badref", AdapterSourceKind::kHub),
              absl::StatusCode::kFailedPrecondition, "not a commit hash");
  std::ofstream(hub / "models--org--badref" / "refs" / "main") << "deadbeef";
  ExpectError(store.Resolve("org/badref", AdapterSourceKind::kHub),
              absl::StatusCode::kFailedPrecondition, "missing snapshot");
  // A cached snapshot whose file links out of the cache.
  const fs::path evil = MakeHubRepo(hub, "org/evil", "e1");
  std::ofstream(t.path() / "secret") << "x";
  fs::remove(evil / "adapter_model.safetensors");
  fs::create_symlink(t.path() / "secret", evil / "adapter_model.safetensors");
  ExpectError(store.Resolve("org/evil", AdapterSourceKind::kHub),
              absl::StatusCode::kPermissionDenied, "is a link to");
  // Relative LOCAL ids are also looked up in the cache (upstream's place for them).
  const fs::path plain = hub / "my-local-adapter";
  fs::create_directories(plain);
  std::ofstream(plain / "adapter_config.json") << "{}";
  EXPECT_EQ(store.Resolve("my-local-adapter", AdapterSourceKind::kLocal).value(),
            fs::canonical(plain));
  // Without a cache a hub id cannot resolve.
  AdapterStore no_hub = MakeStore({t.path() / "root"});
  ExpectError(no_hub.Resolve("org/lora", AdapterSourceKind::kHub),
              absl::StatusCode::kFailedPrecondition, "no Hugging Face cache directory");
}

TEST(AdapterStore, CreateChecksTheRoots) {
  TempTree t;
  absl::StatusOr<AdapterStore> s =
      AdapterStore::Create({.roots = {t.path() / "nope"}, .hub_cache = {}});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("--adapter-root"), std::string::npos) << s.status();
  // A missing hub cache is simply "no cache".
  s = AdapterStore::Create({.roots = {t.path()}, .hub_cache = t.path() / "no-hub"});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->hub_cache().empty());
}

TEST(AdapterStore, SourcesAndHubCacheEnvironment) {
  EXPECT_EQ(ParseAdapterSource("LOCAL", "x").value(), AdapterSourceKind::kLocal);
  EXPECT_EQ(ParseAdapterSource("hub", "x").value(), AdapterSourceKind::kHub);
  EXPECT_EQ(ParseAdapterSource("Pbase", "x").value(), AdapterSourceKind::kPbase);
  EXPECT_EQ(ParseAdapterSource("s3", "x").value(), AdapterSourceKind::kS3);
  const absl::StatusOr<AdapterSourceKind> bad = ParseAdapterSource("ftp", "--adapter-source");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--adapter-source 'ftp'"), std::string::npos);

  std::map<std::string, std::string> env;
  auto fn = [&](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  EXPECT_TRUE(HubCacheFromEnv(fn).empty());
  env["HOME"] = "/home/u";
  EXPECT_EQ(HubCacheFromEnv(fn), fs::path("/home/u/.cache/huggingface/hub"));
  env["HF_HOME"] = "/hf";
  EXPECT_EQ(HubCacheFromEnv(fn), fs::path("/hf/hub"));
  env["HF_HUB_CACHE"] = "/c2";
  EXPECT_EQ(HubCacheFromEnv(fn), fs::path("/c2"));
  env["HUGGINGFACE_HUB_CACHE"] = "/c1";
  EXPECT_EQ(HubCacheFromEnv(fn), fs::path("/c1"));
}

}  // namespace
}  // namespace phishard
