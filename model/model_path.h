// Resolves a model id to a local directory without any network access:
//   1. an existing directory path;
//   2. a Hugging Face cache layout: $HUGGINGFACE_HUB_CACHE (else $HF_HUB_CACHE, else
//      $HF_HOME/hub, else ~/.cache/huggingface/hub)/models--ORG--NAME/snapshots/REV, where REV is
//      `revision` if given (a commit hash or a ref name resolved through refs/REF), else refs/main,
//      else the only snapshot.
// An id that resolves nowhere is NOT_FOUND with a message listing the places searched.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace phishard {

absl::StatusOr<std::filesystem::path> ResolveModelDir(std::string_view model_id,
                                                      std::optional<std::string> revision = {});

}  // namespace phishard
