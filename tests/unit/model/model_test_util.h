// Helpers for the model tests: fixture paths (from LLMTUNE_FIXTURES, failing loudly when absent),
// golden tensors written by scripts/fixtures/model_make.py, and small comparisons.
#pragma once
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "io/io.h"
#include "model/model.h"

namespace model_test {

namespace fs = std::filesystem;

inline fs::path fixture_dir(const std::string& name) {
  const char* env = std::getenv("LLMTUNE_FIXTURES");
  if (!env) FAIL("LLMTUNE_FIXTURES is not set; run: python scripts/fixtures/model_make.py --out <build>/fixtures");
  fs::path d = fs::path(env) / "model" / name;
  if (!fs::exists(d / "golden.safetensors"))
    FAIL("missing fixture " << d.string() << "; run: python scripts/fixtures/model_make.py --out " << env);
  return d;
}

struct Golden {
  std::shared_ptr<llmtune::io::SafetensorsFile> file;
  torch::Tensor operator[](const std::string& name) const { return file->load(name).clone(); }
};

inline Golden golden(const std::string& name) {
  return Golden{llmtune::io::SafetensorsFile::open(fixture_dir(name) / "golden.safetensors")};
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat) - b.to(torch::kFloat)).abs().max().item<double>();
}

// Largest absolute difference relative to the largest magnitude of the reference b.
inline double max_rel(const torch::Tensor& a, const torch::Tensor& b) {
  return max_abs_diff(a, b) / std::max(1e-12, b.to(torch::kFloat).abs().max().item<double>());
}

inline std::vector<int64_t> to_vec(const torch::Tensor& t) {
  auto c = t.to(torch::kLong).contiguous().reshape({-1});
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace model_test
