// The ids a tokenizer.json `post_processor` puts around one encoded sequence: what transformers'
// `tokenizer(text)` (add_special_tokens=True, the default, and what upstream LoRAX's shard calls
// on prompts it tokenizes itself) adds. Phi's own files say ByteLevel (which only moves offsets:
// no ids); a fine-tune may carry a TemplateProcessing that prepends a BOS or appends an EOS.
//   null, ByteLevel                 -> nothing
//   TemplateProcessing              -> the SpecialToken pieces of its "single" template before
//                                      and after its one Sequence piece ($A)
//   Sequence of the above           -> their concatenation
// Anything else (BertProcessing, RobertaProcessing, a "single" template without exactly one
// Sequence) is UNIMPLEMENTED naming the field; a malformed entry is INVALID_ARGUMENT.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/bpe_json.h"

namespace phishard {

struct PostProcessorIds {
  std::vector<int32_t> prefix;  // before the sequence
  std::vector<int32_t> suffix;  // after it
};

// `post` is tokenizer.json's "post_processor" value, nullptr when absent or null.
absl::StatusOr<PostProcessorIds> ParsePostProcessor(const bpe_json::Json* post);

}  // namespace phishard
