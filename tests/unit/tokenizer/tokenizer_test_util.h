// Shared helpers for the tokenizer tests: where the fixtures are (env LLMTUNE_FIXTURES; a
// missing fixture is a failure with instructions, never a skip) and the corpus lines.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace tok_test {

inline std::filesystem::path fixtures() {
  const char* env = std::getenv("LLMTUNE_FIXTURES");
  const std::filesystem::path root = std::filesystem::path(env ? env : "build/fixtures") / "tokenizer";
  if (!std::filesystem::exists(root / "STAMP"))
    throw std::runtime_error("tokenizer fixtures missing in " + root.string() +
                             ": run scripts/fixtures/tokenizer_make.py --out $LLMTUNE_FIXTURES "
                             "(or scripts/fixtures/make_all.sh) first");
  return root;
}

inline const std::vector<std::string>& corpus() {
  static const std::vector<std::string> lines = [] {
    std::vector<std::string> out;
    std::ifstream in(fixtures() / "corpus.jsonl");
    std::string line;
    while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["text"].get<std::string>());
    if (out.size() < 10000) throw std::runtime_error("tokenizer corpus.jsonl has fewer than 10,000 lines");
    return out;
  }();
  return lines;
}

}  // namespace tok_test
