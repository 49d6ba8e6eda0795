// The whole of a text file as one string, for the readers of model/ (config.json,
// generation_config.json, a safetensors index, tokenizer.json, tokenizer_config.json,
// adapter_config.json): bytes as stored, no newline translation.
#pragma once

#include <filesystem>
#include <string>

#include "absl/status/statusor.h"

namespace phishard {

// NOT_FOUND "cannot open 'PATH'" when the file cannot be opened, DATA_LOSS "error reading 'PATH'"
// when reading it fails part way.
absl::StatusOr<std::string> ReadTextFile(const std::filesystem::path& path);

}  // namespace phishard
