#include "server/adapter_store.h"

#include <algorithm>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

// The non-empty components of a canonical path ("/a/b" -> "/", "a", "b").
std::vector<fs::path> Components(const fs::path& p) {
  std::vector<fs::path> out;
  for (const fs::path& c : p) {
    if (!c.empty()) out.push_back(c);
  }
  return out;
}

// `p` is `root` or lies below it; both canonical.
bool IsWithin(const fs::path& p, const fs::path& root) {
  const std::vector<fs::path> pc = Components(p), rc = Components(root);
  return rc.size() <= pc.size() && std::equal(rc.begin(), rc.end(), pc.begin());
}

// "a/b/" -> "a/b"; "/" stays.
std::string StripTrailingSlashes(std::string id) {
  while (id.size() > 1 && id.back() == '/') id.pop_back();
  return id;
}

// Rejects what could climb out of a root or confuse the lookup, naming the id.
absl::Status CheckIdSyntax(const std::string& id) {
  if (id.empty()) return absl::InvalidArgumentError("adapter id is empty");
  if (id.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError("adapter id contains a NUL byte");
  }
  if (id.find('\\') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("adapter id '", id, "' contains a backslash"));
  }
  std::vector<std::string> parts = absl::StrSplit(id, '/');
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& p = parts[i];
    if (p == "." || p == "..") {
      return absl::InvalidArgumentError(absl::StrCat("adapter id '", id, "' has a '", p,
                                                     "' component: paths may not climb out of the "
                                                     "adapter roots"));
    }
    if (p.empty() && !(i == 0 && id.front() == '/')) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter id '", id, "' has an empty path component"));
    }
  }
  return absl::OkStatus();
}

bool IsAdapterFile(const fs::path& name) {
  return name == "adapter_config.json" || name == "config.json" || name == "adapter_model.bin" ||
         name.extension() == ".safetensors";
}

// First line of a refs/ file, trimmed.
std::string ReadRef(const fs::path& file) {
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  return std::string(absl::StripAsciiWhitespace(line));
}

}  // namespace

const char* AdapterSourceName(AdapterSourceKind source) {
  switch (source) {
    case AdapterSourceKind::kHub:
      return "hub";
    case AdapterSourceKind::kS3:
      return "s3";
    case AdapterSourceKind::kLocal:
      return "local";
    case AdapterSourceKind::kPbase:
      return "pbase";
  }
  return "unknown";
}

absl::StatusOr<AdapterSourceKind> ParseAdapterSource(std::string_view text, std::string_view what) {
  const std::string s = absl::AsciiStrToLower(std::string(text));
  for (AdapterSourceKind k : {AdapterSourceKind::kHub, AdapterSourceKind::kS3,
                              AdapterSourceKind::kLocal, AdapterSourceKind::kPbase}) {
    if (s == AdapterSourceName(k)) return k;
  }
  return absl::InvalidArgumentError(absl::StrCat(std::string(what), " '", std::string(text),
                                                 "' is not one of hub, s3, local, pbase"));
}

fs::path HubCacheFromEnv(const std::function<const char*(const char*)>& env) {
  auto get = [&](const char* name) -> std::string {
    const char* v = env(name);
    return v == nullptr ? std::string() : std::string(v);
  };
  if (std::string v = get("HUGGINGFACE_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = get("HF_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = get("HF_HOME"); !v.empty()) return fs::path(v) / "hub";
  if (std::string v = get("HOME"); !v.empty()) return fs::path(v) / ".cache/huggingface/hub";
  return {};
}

absl::StatusOr<AdapterStore> AdapterStore::Create(const AdapterStoreOptions& options) {
  AdapterStore store;
  std::error_code ec;
  for (const fs::path& root : options.roots) {
    if (root.empty()) return absl::InvalidArgumentError("--adapter-root: empty directory name");
    const fs::path canonical = fs::canonical(root, ec);
    if (ec || !fs::is_directory(canonical, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--adapter-root '", root.string(),
                                                     "' does not exist or is not a directory"));
    }
    if (std::find(store.roots_.begin(), store.roots_.end(), canonical) == store.roots_.end()) {
      store.roots_.push_back(canonical);
    }
  }
  if (!options.hub_cache.empty()) {
    const fs::path canonical = fs::canonical(options.hub_cache, ec);
    if (!ec && fs::is_directory(canonical, ec)) store.hub_cache_ = canonical;
  }
  return store;
}

std::string AdapterStore::Describe() const {
  std::vector<std::string> parts;
  for (const fs::path& r : roots_) parts.push_back(r.string());
  parts.push_back(hub_cache_.empty() ? std::string("no hub cache")
                                     : absl::StrCat("hub cache ", hub_cache_.string()));
  return absl::StrJoin(parts, ", ");
}

bool AdapterStore::Allowed(const fs::path& canonical) const {
  for (const fs::path& r : roots_) {
    if (IsWithin(canonical, r)) return true;
  }
  return !hub_cache_.empty() && IsWithin(canonical, hub_cache_);
}

absl::Status AdapterStore::CheckConfined(const std::string& id, const fs::path& dir) const {
  if (!Allowed(dir)) {
    return absl::PermissionDeniedError(absl::StrCat("adapter '", id, "' resolves to '",
                                                    dir.string(), "', outside the adapter roots (",
                                                    Describe(), "); see --adapter-root"));
  }
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("adapter '", id, "': cannot list '", dir.string(), "': ", ec.message()));
  }
  for (const fs::directory_entry& e : it) {
    if (!IsAdapterFile(e.path().filename())) continue;
    std::error_code fe;
    const fs::path real = fs::canonical(e.path(), fe);
    if (fe) continue;  // dangling: the loader sees no such file and says so
    if (!Allowed(real)) {
      return absl::PermissionDeniedError(
          absl::StrCat("adapter '", id, "': '", e.path().string(), "' is a link to '",
                       real.string(), "', outside the adapter roots (", Describe(), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<fs::path> AdapterStore::Resolve(std::string_view id_sv,
                                               AdapterSourceKind source) const {
  const std::string id = StripTrailingSlashes(std::string(id_sv));
  if (absl::Status s = CheckIdSyntax(id); !s.ok()) return s;
  if (source == AdapterSourceKind::kLocal || id.front() == '/') return ResolveLocal(id);
  return ResolveHub(id, source);
}

absl::StatusOr<fs::path> AdapterStore::ResolveLocal(const std::string& id) const {
  std::error_code ec;
  std::vector<fs::path> candidates;
  if (id.front() == '/') {
    candidates.push_back(id);
  } else {
    for (const fs::path& r : roots_) candidates.push_back(r / id);
    if (!hub_cache_.empty()) candidates.push_back(hub_cache_ / id);
  }
  for (const fs::path& c : candidates) {
    if (!fs::exists(c, ec)) continue;
    const fs::path real = fs::canonical(c, ec);
    if (ec) {
      return absl::NotFoundError(
          absl::StrCat("adapter '", id, "': cannot resolve '", c.string(), "': ", ec.message()));
    }
    // Checked before anything else so that a symlink out of a root is reported as such.
    if (!Allowed(real)) {
      return absl::PermissionDeniedError(
          absl::StrCat("adapter '", id, "' resolves to '", real.string(),
                       "', outside the adapter roots (", Describe(), "); see --adapter-root"));
    }
    if (!fs::is_directory(real, ec)) {
      return absl::NotFoundError(
          absl::StrCat("adapter '", id, "': '", real.string(), "' is not a directory"));
    }
    if (absl::Status s = CheckConfined(id, real); !s.ok()) return s;
    return real;
  }
  if (id.front() == '/') {
    return absl::NotFoundError(absl::StrCat("adapter '", id, "': no such directory"));
  }
  return absl::NotFoundError(absl::StrCat("adapter '", id, "' not found under the adapter roots (",
                                          Describe(),
                                          "); a LOCAL adapter id is a directory relative to one "
                                          "of them, or an absolute path inside one"));
}

absl::StatusOr<fs::path> AdapterStore::ResolveHub(const std::string& id,
                                                  AdapterSourceKind source) const {
  const std::string where =
      absl::StrCat("adapter '", id, "' (source ", AdapterSourceName(source), ")");
  const std::vector<std::string> parts = absl::StrSplit(id, '/');
  if (parts.size() > 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " is not a hub id ORG/NAME (use adapter_source LOCAL for directories)"));
  }
  const std::string no_download =
      "; phishard does not download adapters: put it in the Hugging Face cache first (e.g. "
      "`huggingface-cli download ORG/NAME`) or use adapter_source LOCAL";
  if (hub_cache_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(where,
                     " is not in the local cache (no Hugging Face cache directory: set "
                     "HUGGINGFACE_HUB_CACHE)",
                     no_download));
  }
  const fs::path repo =
      hub_cache_ / absl::StrCat("models--", absl::StrReplaceAll(id, {{"/", "--"}}));
  std::error_code ec;
  if (!fs::is_directory(repo, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, " is not in the local cache (no '", repo.string(), "')", no_download));
  }
  fs::path snapshot;
  const fs::path ref = repo / "refs" / "main";
  if (fs::is_regular_file(ref, ec)) {
    const std::string hash = ReadRef(ref);
    if (hash.empty() || absl::StrContains(hash, "/") || hash == "." || hash == "..") {
      return absl::FailedPreconditionError(
          absl::StrCat(where, ": '", ref.string(), "' holds '", hash, "', not a commit hash"));
    }
    snapshot = repo / "snapshots" / hash;
    if (!fs::is_directory(snapshot, ec)) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, ": '", ref.string(), "' points to a missing snapshot '",
                       snapshot.string(), "' (incomplete download?)", no_download));
    }
  } else {
    std::vector<fs::path> snaps;
    for (const fs::directory_entry& e : fs::directory_iterator(repo / "snapshots", ec)) {
      if (e.is_directory(ec)) snaps.push_back(e.path());
    }
    if (snaps.size() != 1) {
      return absl::FailedPreconditionError(absl::StrCat(where, ": '", repo.string(),
                                                        "' has no refs/main and ", snaps.size(),
                                                        " snapshots (need exactly one)"));
    }
    snapshot = snaps[0];
  }
  const fs::path real = fs::canonical(snapshot, ec);
  if (ec) {
    return absl::NotFoundError(
        absl::StrCat(where, ": cannot resolve '", snapshot.string(), "': ", ec.message()));
  }
  if (absl::Status s = CheckConfined(id, real); !s.ok()) return s;
  return real;
}

}  // namespace phishard
