// Regression tests for what the fuzz targets (tests/fuzz) found in model/ parsers. Each input
// also lives in the target's seed corpus, replayed in every build; these tests pin the
// behaviour in a plain build, where the original failure (a sanitizer report) would not show.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/json_depth.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"

namespace phishard {
namespace {

// `depth` nested lists as the value of `key`, inside an otherwise plausible object.
std::string Nested(const std::string& prefix, int depth) {
  return prefix + std::string(depth, '[') + std::string(depth, ']') + "}";
}

// 300,000 levels: nlohmann's dump() (quoting the bad value in the error message) recursed once
// per level and overflowed the stack — under ASan and in a Release build alike.
constexpr int kDeep = 300000;

TEST(FuzzRegressions, DeeplyNestedConfigJsonIsAnErrorNotAStackOverflow) {
  absl::StatusOr<PhiConfig> c =
      ParsePhiConfig(Nested(R"({"model_type":"phi","hidden_size":)", kDeep), "deep/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("deep/config.json"), std::string::npos) << c.status();
  EXPECT_NE(c.status().message().find("nested deeper than 64"), std::string::npos) << c.status();
}

TEST(FuzzRegressions, DeeplyNestedAdapterConfigIsAnErrorNotAStackOverflow) {
  absl::StatusOr<LoraAdapterConfig> c =
      ParseLoraAdapterConfig(Nested(R"({"peft_type":"LORA","r":)", kDeep), "a/adapter_config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("a/adapter_config.json"), std::string::npos) << c.status();
}

TEST(FuzzRegressions, DeeplyNestedTokenizerJsonIsAnErrorNotAStackOverflow) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t =
      Tokenizer::FromJson(Nested(R"({"model":)", kDeep), "");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("nested deeper"), std::string::npos) << t.status();
}

TEST(FuzzRegressions, NestingWithinTheLimitStillGetsTheFieldError) {
  // 60 levels: accepted by the guard, rejected by the field check that names the field.
  absl::StatusOr<PhiConfig> c =
      ParsePhiConfig(Nested(R"({"model_type":"phi","hidden_size":)", 60), "config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("'hidden_size' must be a positive integer"),
            std::string::npos)
      << c.status();
  // Brackets inside strings do not count.
  EXPECT_EQ(JsonNestingDepth(R"({"a":"[[[[[[[[[[\"{{{{","b":[1]})", 100), 2);
}

TEST(FuzzRegressions, EmptyTensorsConvertWithoutTouchingMemory) {
  // An empty tensor converted into an empty vector: memcpy(nullptr, src, 0) was undefined
  // behaviour (UBSan, tests/fuzz/safetensors_fuzzer).
  const std::string header = R"({"e":{"dtype":"F32","shape":[0,7],"data_offsets":[0,0]},)"
                             R"("h":{"dtype":"F16","shape":[3,0],"data_offsets":[0,0]},)"
                             R"("b":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  file += header;
  char tmpl[] = "/tmp/phsfzXXXXXX";
  const int fd = ::mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, file.data(), file.size()), static_cast<ssize_t>(file.size()));
  ::close(fd);
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenFiles({tmpl});
  ASSERT_TRUE(store.ok()) << store.status();
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"e", {0, 7}}, {"h", {3, 0}}, {"b", {0}}}) {
    std::vector<float> f32(5, 1.0f);
    std::vector<uint16_t> u16(5, 1);
    ASSERT_TRUE((*store)->ReadF32(name, shape, &f32).ok()) << name;
    EXPECT_TRUE(f32.empty()) << name;
    ASSERT_TRUE((*store)->ReadF16(name, shape, &u16).ok()) << name;
    EXPECT_TRUE(u16.empty()) << name;
    u16.assign(3, 1);
    ASSERT_TRUE((*store)->ReadBF16(name, shape, &u16).ok()) << name;
    EXPECT_TRUE(u16.empty()) << name;
  }
  std::filesystem::remove(tmpl);
}

}  // namespace
}  // namespace phishard
