// Golden parity: every fixture tokenizer (scripts/fixtures/tokenizer_make.py) encodes all corpus
// lines to exactly the ids the Python references produced (tokenizers / sentencepiece), with and
// without special tokens, and decodes them to the same text. Also prints a tokens/s figure.
#include <sentencepiece_processor.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/core.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace fs = std::filesystem;
using llmtune::tok::Tokenizer;
using nlohmann::json;

namespace {

struct Golden {
  std::vector<int32_t> ids, plain;
  std::string dec, dec_skip;
};

std::vector<Golden> read_golden(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE(in.good());
  std::vector<Golden> out;
  std::string line;
  while (std::getline(in, line)) {
    const auto j = json::parse(line);
    out.push_back({j["ids"].get<std::vector<int32_t>>(), j["ids_plain"].get<std::vector<int32_t>>(),
                   j["dec"].get<std::string>(), j["dec_skip"].get<std::string>()});
  }
  return out;
}

std::string show_ids(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 40; ++i) s += (i ? " " : "") + std::to_string(v[i]);
  if (v.size() > 40) s += " ...";
  return s;
}

// First index where two id lists differ, to make a failure readable.
size_t first_diff(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

// Unigram segmentations with equal Viterbi score are ties that libsentencepiece 0.1.97 (Debian,
// used here) and Python sentencepiece 0.2.x break differently; such a line is accepted only if
// both id lists have the same total piece score and decode to the same text.
struct TieJudge {
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
  explicit TieJudge(const fs::path& dir) {
    if (!fs::exists(dir / "tokenizer.model") || fs::exists(dir / "tokenizer.json")) return;
    sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    REQUIRE(sp->Load((dir / "tokenizer.model").string()).ok());
  }
  bool tie(const std::vector<int32_t>& a, const std::vector<int32_t>& b) const {
    if (!sp) return false;
    double sa = 0, sb = 0;
    for (int32_t id : a) sa += sp->GetScore(id);
    for (int32_t id : b) sb += sp->GetScore(id);
    std::string da, db;
    return std::abs(sa - sb) < 1e-3 && sp->Decode(std::vector<int>(a.begin(), a.end()), &da).ok() &&
           sp->Decode(std::vector<int>(b.begin(), b.end()), &db).ok() && da == db;
  }
};

void check_tokenizer(const std::string& name) {
  const fs::path root = tok_test::fixtures();
  const auto corpus = tok_test::corpus();
  const auto golden = read_golden(root / (name + ".golden.jsonl"));
  REQUIRE(golden.size() == corpus.size());
  auto tok = Tokenizer::load(root / name);

  const double t0 = llmtune::now_seconds();
  const auto ids = tok->encode_batch(corpus, true, 1);
  const double t1 = llmtune::now_seconds();
  const auto par = tok->encode_batch(corpus, true, 0);
  const double t2 = llmtune::now_seconds();
  size_t total = 0;
  for (const auto& v : ids) total += v.size();
  std::printf("[%s] %s: %zu lines, %zu tokens; 1 thread %.0f tok/s, all cores %.0f tok/s (cached words)\n",
              name.c_str(), tok->engine().c_str(), corpus.size(), total, total / (t1 - t0), total / (t2 - t1));
  REQUIRE(par == ids);

  const TieJudge judge(root / name);
  size_t bad_ids = 0, bad_plain = 0, bad_dec = 0, bad_skip = 0, ties = 0;
  std::string report;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const auto& g = golden[i];
    const auto plain = tok->encode(corpus[i], false);
    const auto dec = tok->decode(g.ids, false);
    const auto skip = tok->decode(g.ids, true);
    auto note = [&](const char* what, const std::string& detail) {
      if (report.size() < 6000)
        report += fmt::format("  line {} {}: text {:?}\n{}", i, what, corpus[i].substr(0, 160), detail);
    };
    if (ids[i] != g.ids && judge.tie(ids[i], g.ids) && judge.tie(plain, g.plain)) {
      ++ties;
    } else if (ids[i] != g.ids) {
      ++bad_ids;
      const size_t d = first_diff(ids[i], g.ids);
      note("ids",
           fmt::format("    at {}: got  [{}]\n          want [{}]\n", d, show_ids({ids[i].begin() + d, ids[i].end()}),
                       show_ids({g.ids.begin() + d, g.ids.end()})));
    }
    if (plain != g.plain && !judge.tie(plain, g.plain)) {
      ++bad_plain;
      if (ids[i] == g.ids)
        note("ids (no specials)", fmt::format("    got [{}]\n    want [{}]\n", show_ids(plain), show_ids(g.plain)));
    }
    if (dec != g.dec) {
      ++bad_dec;
      note("decode", fmt::format("    got  {:?}\n    want {:?}\n", dec.substr(0, 200), g.dec.substr(0, 200)));
    }
    if (skip != g.dec_skip) {
      ++bad_skip;
      note("decode(skip_special)",
           fmt::format("    got  {:?}\n    want {:?}\n", skip.substr(0, 200), g.dec_skip.substr(0, 200)));
    }
  }
  if (ties)
    std::printf("[%s] %zu lines differ only by equal-score unigram ties (sentencepiece 0.1.97 vs 0.2.x)\n",
                name.c_str(), ties);
  if (bad_ids + bad_plain + bad_dec + bad_skip)
    std::printf("[%s] mismatches: ids %zu, ids without specials %zu, decode %zu, decode skip %zu (of %zu)\n%s",
                name.c_str(), bad_ids, bad_plain, bad_dec, bad_skip, corpus.size(), report.c_str());
  CHECK(bad_ids == 0);
  CHECK(bad_plain == 0);
  CHECK(bad_dec == 0);
  CHECK(bad_skip == 0);
}

}  // namespace

TEST_CASE("golden gpt2 (tokenizer.json, legacy merges)", "[golden]") { check_tokenizer("gpt2"); }
TEST_CASE("golden llama3-style byte-level BPE", "[golden]") { check_tokenizer("llama3"); }
TEST_CASE("golden qwen2-style byte-level BPE", "[golden]") { check_tokenizer("qwen2"); }
TEST_CASE("golden smollm-style byte-level BPE", "[golden]") { check_tokenizer("smollm"); }
TEST_CASE("golden mistral tokenizer.json (legacy Prepend/Replace)", "[golden]") { check_tokenizer("mistral_legacy"); }
TEST_CASE("golden mistral tokenizer.json (Metaspace first)", "[golden]") { check_tokenizer("mistral_first"); }
TEST_CASE("golden mistral tokenizer.json (as transformers converts)", "[golden]") {
  check_tokenizer("mistral_converted");
}
TEST_CASE("golden sentencepiece bpe tokenizer.json", "[golden]") { check_tokenizer("sp_bpe_json"); }
TEST_CASE("golden mistral tokenizer.model", "[golden]") { check_tokenizer("mistral_spm"); }
TEST_CASE("golden sentencepiece unigram tokenizer.model", "[golden]") { check_tokenizer("sp_unigram"); }
TEST_CASE("golden sentencepiece bpe+byte_fallback tokenizer.model", "[golden]") { check_tokenizer("sp_bpe"); }
