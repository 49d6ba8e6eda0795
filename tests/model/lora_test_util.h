// Helpers shared by the LoRA tests: an in-memory tensor set that can be read from and written to
// float32 safetensors files, and adapter directories built from it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace phishard::lora_test {

namespace fs = std::filesystem;

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
using TensorMap = std::map<std::string, Tensor>;

// Every tensor of `files` (or of every *.safetensors of a directory) as float32.
inline TensorMap ReadTensors(const fs::path& dir) {
  TensorMap out;
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenDir(dir);
  EXPECT_TRUE(store.ok()) << store.status();
  if (!store.ok()) return out;
  for (const std::string& name : (*store)->Names()) {
    const TensorView* v = *(*store)->Get(name);
    Tensor& t = out[name];
    t.shape = v->shape;
    const absl::Status st = (*store)->ReadF32(name, t.shape, &t.data);
    EXPECT_TRUE(st.ok()) << st;
  }
  return out;
}

// Writes `tensors` as one F32 safetensors file.
inline void WriteSafetensors(const fs::path& path, const TensorMap& tensors) {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const size_t bytes = t.data.size() * sizeof(float);
    header[name] = {
        {"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), sizeof(n));
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors) {
    out.write(reinterpret_cast<const char*>(t.data.data()),
              static_cast<std::streamsize>(t.data.size() * sizeof(float)));
  }
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

inline nlohmann::json ReadJsonFile(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

inline void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// Writes adapter_config.json + adapter_model.safetensors into `dir` (created).
inline void WriteAdapter(const fs::path& dir, const nlohmann::json& config,
                         const TensorMap& tensors) {
  fs::create_directories(dir);
  WriteText(dir / "adapter_config.json", config.dump(2));
  WriteSafetensors(dir / "adapter_model.safetensors", tensors);
}

inline std::vector<float> RandomValues(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A temporary directory removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = fs::temp_directory_path() /
            (tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

}  // namespace phishard::lora_test
