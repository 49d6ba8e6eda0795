#include "model/model_path.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// The hub cache root, in huggingface_hub's order of precedence, and where it came from.
bool HubCacheRoot(fs::path* root, std::string* from) {
  if (std::string v = Env("HUGGINGFACE_HUB_CACHE"); !v.empty()) {
    *root = v;
    *from = "$HUGGINGFACE_HUB_CACHE";
  } else if (v = Env("HF_HUB_CACHE"); !v.empty()) {
    *root = v;
    *from = "$HF_HUB_CACHE";
  } else if (v = Env("HF_HOME"); !v.empty()) {
    *root = fs::path(v) / "hub";
    *from = "$HF_HOME/hub";
  } else if (v = Env("HOME"); !v.empty()) {
    *root = fs::path(v) / ".cache" / "huggingface" / "hub";
    *from = "~/.cache/huggingface/hub";
  } else {
    return false;
  }
  return true;
}

// "org/name" or "name": one or two non-empty components, none of them "." or "..".
bool IsRepoId(const std::string& id) {
  std::vector<std::string> parts = absl::StrSplit(id, '/');
  if (parts.size() > 2) return false;
  for (const std::string& p : parts) {
    if (p.empty() || p == "." || p == ".." || p.find('\\') != std::string::npos) return false;
  }
  return true;
}

// A revision or ref name is used as a relative path under snapshots/ or refs/ (refs may hold
// slashes, e.g. "pr/1"); it must not climb out.
bool IsSafeRelative(const std::string& rev) {
  const fs::path p(rev);
  if (rev.empty() || p.is_absolute()) return false;
  for (const fs::path& part : p) {
    if (part == ".." || part == ".") return false;
  }
  return true;
}

// Reads refs/REF (a commit hash, possibly with a trailing newline).
bool ReadRef(const fs::path& ref_file, std::string* hash) {
  std::error_code ec;
  if (!fs::is_regular_file(ref_file, ec)) return false;
  std::ifstream in(ref_file);
  std::string line;
  std::getline(in, line);
  *hash = std::string(absl::StripAsciiWhitespace(line));
  return true;
}

}  // namespace

absl::StatusOr<fs::path> ResolveModelDir(std::string_view model_id_sv,
                                         std::optional<std::string> revision) {
  const std::string model_id(model_id_sv);  // Debian's absl::string_view is not std's
  if (model_id.empty()) return absl::InvalidArgumentError("model id is empty");
  if (revision.has_value() && revision->empty()) revision.reset();
  std::error_code ec;
  std::vector<std::string> searched;

  // 1. A directory on disk.
  const fs::path local(model_id);
  if (fs::is_directory(local, ec)) return fs::absolute(local, ec).lexically_normal();
  searched.push_back(absl::StrCat("local directory '", fs::absolute(local, ec).string(), "'"));

  auto not_found = [&](const std::string& why) {
    return absl::NotFoundError(absl::StrCat("model '", model_id, "' not found (", why,
                                            "); searched: ", absl::StrJoin(searched, "; ")));
  };

  // 2. The Hugging Face hub cache.
  if (!IsRepoId(model_id)) return not_found("not a directory and not a hub id ORG/NAME");
  fs::path root;
  std::string root_from;
  if (!HubCacheRoot(&root, &root_from)) {
    return not_found(
        "no hub cache: none of HUGGINGFACE_HUB_CACHE, HF_HUB_CACHE, HF_HOME, HOME set");
  }
  const fs::path repo =
      root / absl::StrCat("models--", absl::StrReplaceAll(model_id, {{"/", "--"}}));
  searched.push_back(absl::StrCat("hub cache '", repo.string(), "' (from ", root_from, ")"));
  if (!fs::is_directory(repo, ec)) return not_found("not in the hub cache");
  const fs::path snapshots = repo / "snapshots";

  auto snapshot_for_ref = [&](const std::string& ref) -> absl::StatusOr<fs::path> {
    const fs::path ref_file = repo / "refs" / ref;
    std::string hash;
    if (!ReadRef(ref_file, &hash)) return not_found(absl::StrCat("no ref '", ref, "'"));
    if (!IsSafeRelative(hash)) {
      return absl::InvalidArgumentError(
          absl::StrCat("ref file '", ref_file.string(), "' holds '", hash, "', not a commit"));
    }
    const fs::path dir = snapshots / hash;
    if (!fs::is_directory(dir, ec)) {
      return absl::NotFoundError(absl::StrCat("ref file '", ref_file.string(), "' points to '",
                                              hash, "', but '", dir.string(),
                                              "' does not exist (incomplete download?)"));
    }
    return dir;
  };

  if (revision.has_value()) {
    if (!IsSafeRelative(*revision)) {
      return absl::InvalidArgumentError(
          absl::StrCat("revision '", *revision, "' is not a commit hash or ref name"));
    }
    if (fs::is_directory(snapshots / *revision, ec)) return snapshots / *revision;
    searched.push_back(absl::StrCat("snapshot '", (snapshots / *revision).string(), "'"));
    searched.push_back(absl::StrCat("ref '", (repo / "refs" / *revision).string(), "'"));
    return snapshot_for_ref(*revision);
  }

  if (fs::exists(repo / "refs" / "main", ec)) return snapshot_for_ref("main");
  searched.push_back(absl::StrCat("ref '", (repo / "refs" / "main").string(), "'"));
  std::vector<std::string> snaps;
  for (const fs::directory_entry& e : fs::directory_iterator(snapshots, ec)) {
    if (e.is_directory(ec)) snaps.push_back(e.path().filename().string());
  }
  std::sort(snaps.begin(), snaps.end());
  if (snaps.size() == 1) return snapshots / snaps[0];
  searched.push_back(absl::StrCat("snapshots in '", snapshots.string(), "'"));
  if (snaps.empty()) return not_found("no refs/main and no snapshot");
  return absl::FailedPreconditionError(absl::StrCat(
      "model '", model_id, "': no refs/main in '", repo.string(), "' and ", snaps.size(),
      " snapshots (", absl::StrJoin(snaps, ", "), "); pass a revision to choose one"));
}

}  // namespace phishard
