// A byte-level BPE tokenizer saved in the "slow" format only — vocab.json + merges.txt (and
// optionally added_tokens.json), no tokenizer.json — as transformers loads it: its fast tokenizer
// is converted from the slow one by GPT2Converter (convert_slow_tokenizer.py; CodeGenTokenizer,
// Phi's tokenizer class, and GPT2Tokenizer use it). TokenizerJsonFromSlowFiles writes the
// tokenizer.json that conversion produces, for Tokenizer::FromJson:
//   model            BPE over vocab.json and merges.txt's lines but "#version" headers (as
//                    transformers 5 reads the file; 4.x dropped line 0 and the text after the
//                    last newline whatever they held);
//   pre_tokenizer    ByteLevel, add_prefix_space from tokenizer_config.json (default false);
//   decoder          ByteLevel;
//   post_processor   TemplateProcessing "bos $A" when tokenizer_config.json's add_bos_token is
//                    true (bos_token then must be in the vocabulary), else ByteLevel (no-op);
//   added_tokens     none: added_tokens.json (transformers' legacy file) goes to FromJson as
//                    next to a tokenizer.json (Tokenizer::FromJson's added_tokens_json: read only
//                    without added_tokens_decoder, entries numbered as tokenizers' add_tokens
//                    numbers them, special when a named special token has their text);
// and the tokenizer_config.json to use with it: the file's, plus bos / eos / unk_token set to the
// slow classes' default "<|endoftext|>" where neither file has the key (transformers takes the
// class defaults then; a key set to null has none). transformers' fast CodeGen / GPT2 classes
// refuse add_bos_token = true at load; the slow classes prepend bos, and so does this.
// tokenizer_config.json's added_tokens_decoder and named special tokens are then applied by
// FromJson as for any tokenizer.json. Errors are INVALID_ARGUMENT naming the file and entry.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace phishard {

struct SlowFilesJson {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
};

// tokenizer_config_json, special_tokens_map_json: "" when the file is absent.
absl::StatusOr<SlowFilesJson> TokenizerJsonFromSlowFiles(std::string_view vocab_json,
                                                         std::string_view merges_txt,
                                                         std::string_view tokenizer_config_json,
                                                         std::string_view special_tokens_map_json);

}  // namespace phishard
