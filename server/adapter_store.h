// AdapterStore: where an adapter id from a DownloadAdapter / LoadAdapter request (or from
// --adapter-id / --preloaded-adapter-ids) lives on local disk. The shard never downloads: every
// source resolves to a directory that must already exist, and every path it hands out is confined
// to directories the operator allowed, so a request cannot make the shard read arbitrary files.
//
// Resolution (spec §7.1, offline):
//   LOCAL, or any source with an absolute id:
//     "/abs/dir"  -> that directory, if it lies inside an adapter root or the hub cache;
//     "rel/dir"   -> the first of ROOT/rel/dir over the adapter roots in order, then
//                    HUB_CACHE/rel/dir (upstream's place for relative LOCAL ids).
//   HUB, S3, PBASE ("org/name" or "name"):
//     HUB_CACHE/models--org--name/snapshots/<refs/main, else the only snapshot>; when absent,
//     FAILED_PRECONDITION "... is not in the local cache; phishard does not download adapters".
//
// Confinement: ids with "." / ".." components, backslashes, NUL bytes or empty components are
// INVALID_ARGUMENT. The directory and every file the adapter loader reads in it
// (adapter_config.json, config.json, *.safetensors) are resolved through realpath (every symlink
// followed) and must lie inside an adapter root or the hub cache; otherwise PERMISSION_DENIED
// naming the id and where it leads. (The hub cache's snapshot files are symlinks into its blobs/
// folder, which is inside the cache.) Roots are canonicalised once at Create.
//
// Thread-safe: const after Create, only reads the filesystem.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace phishard {

// Same numbers as generate.v1.AdapterSource.
enum class AdapterSourceKind { kHub = 0, kS3 = 1, kLocal = 2, kPbase = 3 };
// "hub", "s3", "local", "pbase".
const char* AdapterSourceName(AdapterSourceKind source);
// Case-insensitive "hub" | "s3" | "local" | "pbase" (the launcher's --adapter-source values);
// INVALID_ARGUMENT naming `what` otherwise.
absl::StatusOr<AdapterSourceKind> ParseAdapterSource(std::string_view text, std::string_view what);

// The Hugging Face hub cache in huggingface_hub's order: $HUGGINGFACE_HUB_CACHE, $HF_HUB_CACHE,
// $HF_HOME/hub, $HOME/.cache/huggingface/hub; empty when none is set. `env` returns nullptr for
// unset variables.
std::filesystem::path HubCacheFromEnv(const std::function<const char*(const char*)>& env);

struct AdapterStoreOptions {
  // Directories adapters may come from (--adapter-root). Each must exist.
  std::vector<std::filesystem::path> roots;
  // The hub cache; "" or a missing directory = none (HUB/S3/PBASE ids then fail with
  // FAILED_PRECONDITION).
  std::filesystem::path hub_cache;
};

class AdapterStore {
 public:
  // INVALID_ARGUMENT naming --adapter-root for a root that does not exist or is not a directory.
  static absl::StatusOr<AdapterStore> Create(const AdapterStoreOptions& options);

  // The canonical directory of adapter `id` from `source` (see the top of this file). NOT_FOUND
  // when a LOCAL id exists under no root, FAILED_PRECONDITION when a hub id is not cached,
  // INVALID_ARGUMENT for a malformed id, PERMISSION_DENIED when it leads outside the roots. Every
  // message names the id.
  absl::StatusOr<std::filesystem::path> Resolve(std::string_view id,
                                                AdapterSourceKind source) const;

  const std::vector<std::filesystem::path>& roots() const { return roots_; }
  const std::filesystem::path& hub_cache() const { return hub_cache_; }  // "" = none
  // "ROOT1, ROOT2, hub cache HUB" for messages and logs.
  std::string Describe() const;

 private:
  AdapterStore() = default;
  absl::StatusOr<std::filesystem::path> ResolveLocal(const std::string& id) const;
  absl::StatusOr<std::filesystem::path> ResolveHub(const std::string& id,
                                                   AdapterSourceKind source) const;
  // OK when canonical `dir` and the adapter files in it lie inside an allowed root.
  absl::Status CheckConfined(const std::string& id, const std::filesystem::path& dir) const;
  bool Allowed(const std::filesystem::path& canonical) const;

  std::vector<std::filesystem::path> roots_;  // canonical
  std::filesystem::path hub_cache_;           // canonical, or empty
};

}  // namespace phishard
