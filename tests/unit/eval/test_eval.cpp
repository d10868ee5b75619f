// Unit tests for lib/eval pieces that need no model: CRC32C and TFRecord framing of the TensorBoard
// writer (parsed back here byte by byte), the harness's standard error, few-shot context building,
// generation scoring, task YAML validation and the report tables.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>
#include <fstream>

#include "core/core.h"
#include "eval/eval.h"

using namespace llmtune;
namespace fs = std::filesystem;

namespace {
fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("llmtune-test-eval-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}
void write(const fs::path& p, const std::string& s) { std::ofstream(p) << s; }
}  // namespace

TEST_CASE("crc32c matches the Castagnoli check value and TFRecord masking") {
  const std::string s = "123456789";
  CHECK(eval::crc32c(s.data(), s.size()) == 0xE3069283u);  // the standard CRC-32C check value
  CHECK(eval::crc32c("", 0) == 0u);
  const uint32_t c = eval::crc32c(s.data(), s.size());
  CHECK(eval::masked_crc32c(s.data(), s.size()) == static_cast<uint32_t>(((c >> 15) | (c << 17)) + 0xa282ead8u));
}

TEST_CASE("TensorBoardWriter frames every record with length, masked CRCs and the protobuf event") {
  auto dir = temp_dir("tb");
  fs::path path;
  {
    eval::TensorBoardWriter w(dir / "runs");
    w.add_scalar("train/loss", 1.5, 7);
    w.add_text("samples/x", "hello", 8);
    path = w.path();
  }
  CHECK(path.filename().string().rfind("events.out.tfevents.", 0) == 0);
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  size_t pos = 0;
  std::vector<std::string> payloads;
  while (pos < bytes.size()) {
    REQUIRE(pos + 12 <= bytes.size());
    uint64_t len;
    uint32_t len_crc, data_crc;
    std::memcpy(&len, bytes.data() + pos, 8);
    std::memcpy(&len_crc, bytes.data() + pos + 8, 4);
    CHECK(len_crc == eval::masked_crc32c(bytes.data() + pos, 8));
    REQUIRE(pos + 12 + len + 4 <= bytes.size());
    std::string payload = bytes.substr(pos + 12, len);
    std::memcpy(&data_crc, bytes.data() + pos + 12 + len, 4);
    CHECK(data_crc == eval::masked_crc32c(payload.data(), payload.size()));
    payloads.push_back(payload);
    pos += 12 + len + 4;
  }
  REQUIRE(payloads.size() == 3);
  CHECK(payloads[0].find("brain.Event:2") != std::string::npos);
  // Event.step = 7 is field 2 varint: bytes 0x10 0x07 right after the 9-byte wall_time field.
  CHECK(payloads[1].substr(9, 2) == std::string("\x10\x07", 2));
  CHECK(payloads[1].find("train/loss") != std::string::npos);
  float v = 1.5f;
  CHECK(payloads[1].find(std::string("\x15", 1) + std::string(reinterpret_cast<char*>(&v), 4)) != std::string::npos);
  CHECK(payloads[2].find("hello") != std::string::npos);
  CHECK(payloads[2].find("text") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("mean_stderr is the sample standard deviation over sqrt(n)") {
  // mean 0.75; squared deviations sum to 0.75; sample variance 0.75 / 3 = 0.25; stderr sqrt(0.25) / sqrt(4).
  CHECK(eval::mean_stderr({1, 0, 1, 1}) == Approx(0.25));
  CHECK(eval::mean_stderr({1}) == 0);
  CHECK(eval::mean_stderr({}) == 0);
}

TEST_CASE("multiple-choice requests: few-shot turns, delimiters, gold by index or text") {
  eval::TaskSpec t;
  t.name = "t";
  t.context_field = "q";
  t.choices_field = "c";
  t.gold_field = "g";
  t.num_fewshot = 1;
  t.description = "D:";
  nlohmann::json a = {{"q", "Qa"}, {"c", {"x", "y"}}, {"g", 1}};
  nlohmann::json b = {{"q", "Qb"}, {"c", {"u", "v"}}, {"g", "u"}};
  int64_t gold = -1;
  // Scoring `a` with the pool [a, b]: a itself is skipped, so b is the one few-shot example.
  auto reqs = eval::multiple_choice_requests(t, a, {a, b}, 0, &gold);
  REQUIRE(reqs.size() == 2);
  CHECK(gold == 1);
  CHECK(reqs[0].context == "D:Qb u\n\nQa");
  CHECK(reqs[0].continuation == " x");
  CHECK(reqs[1].continuation == " y");
  reqs = eval::multiple_choice_requests(t, b, {a, b}, 1, &gold);
  CHECK(gold == 0);
  CHECK(reqs[0].context == "D:Qa y\n\nQb");
  t.num_fewshot = 3;
  CHECK_THROWS_AS(eval::multiple_choice_requests(t, a, {a, b}, 0, &gold), Error);
  t.num_fewshot = 0;
  nlohmann::json bad = {{"q", "Q"}, {"c", {"x"}}, {"g", 5}};
  CHECK_THROWS_WITH(eval::multiple_choice_requests(t, bad, {}, 0, &gold), Catch::Contains("outside the 1 choices"));
  nlohmann::json missing = {{"question", "Q"}};
  CHECK_THROWS_WITH(eval::multiple_choice_requests(t, missing, {}, 0, &gold), Catch::Contains("it has: question"));
}

TEST_CASE("generation scoring: exact match, regex extraction, substring") {
  eval::TaskSpec t;
  t.name = "g";
  CHECK(eval::score_generation(t, " Paris \n", "Paris"));
  CHECK_FALSE(eval::score_generation(t, "paris", "Paris"));
  t.ignore_case = true;
  CHECK(eval::score_generation(t, "paris", "Paris"));
  t.scoring = "regex";
  t.regex = "answer: (\\w+)";
  CHECK(eval::extract_answer(t, "so the answer: Fox.") == "fox");
  CHECK(eval::score_generation(t, "so the answer: Fox.", "fox"));
  CHECK_FALSE(eval::score_generation(t, "no idea", ""));  // nothing extracted never matches
  t.scoring = "contains";
  CHECK(eval::score_generation(t, "The capital is PARIS.", "Paris"));
  CHECK_FALSE(eval::score_generation(t, "London", "Paris"));
}

TEST_CASE("task YAML: keys, defaults, relative data path, clear errors") {
  auto dir = temp_dir("yaml");
  write(dir / "d.jsonl", "{\"context\": \"Q\", \"choices\": [\"a\"], \"gold\": 0}\n");
  write(dir / "ok.yaml", "type: multiple_choice\ndata: d.jsonl\nnum_fewshot: 0\n");
  auto t = eval::TaskSpec::load(dir / "ok.yaml");
  CHECK(t.name == "ok");
  CHECK(t.data == dir / "d.jsonl");
  CHECK(t.target_delimiter == " ");
  CHECK(t.to_json()["fewshot_sampler"] == "first_n");
  write(dir / "typo.yaml", "data: d.jsonl\nnum_fewshots: 2\n");
  CHECK_THROWS_WITH(eval::TaskSpec::load(dir / "typo.yaml"), Catch::Contains("typo.yaml:2") && Catch::Contains("num_fewshot"));
  write(dir / "type.yaml", "data: d.jsonl\nnum_fewshot: two\n");
  CHECK_THROWS_WITH(eval::TaskSpec::load(dir / "type.yaml"), Catch::Contains("expected an integer"));
  write(dir / "nodata.yaml", "data: missing.jsonl\n");
  CHECK_THROWS_WITH(eval::TaskSpec::load(dir / "nodata.yaml"), Catch::Contains("does not exist"));
  write(dir / "re.yaml", "data: d.jsonl\ntype: generate\nscoring: regex\n");
  CHECK_THROWS_WITH(eval::TaskSpec::load(dir / "re.yaml"), Catch::Contains("regex"));
  CHECK(eval::resolve_task_path("ok.yaml", dir) == dir / "ok.yaml");
  CHECK_THROWS_AS(eval::resolve_task_path("nope.yaml", dir), Error);
  fs::remove_all(dir);
}

TEST_CASE("reports put runs side by side with the change and generations") {
  eval::RunResult a, b;
  a.label = "base";
  b.label = "tuned";
  eval::TaskResult ta;
  ta.task = "quiz";
  ta.type = "generate";
  ta.n = 2;
  ta.metrics["exact_match"] = {0.25, 0.1};
  ta.samples = {{0, "Last word: a b", "x", "b", false, {}}};
  eval::TaskResult tb = ta;
  tb.metrics["exact_match"] = {0.75, 0.1};
  tb.samples[0].output = "b";
  a.tasks = {ta};
  b.tasks = {tb};
  auto md = eval::markdown_report({a, b});
  CHECK(md.find("| quiz exact_match (%) | 25.0 ± 10.0 | 75.0 ± 10.0 | +50.0 |") != std::string::npos);
  CHECK(md.find("| quiz | Last word: a b | b | x | b |") != std::string::npos);
  auto txt = eval::text_table({a, b});
  CHECK(txt.find("+50.0") != std::string::npos);
  auto j = eval::results_json({a, b}, {{"k", 1}});
  CHECK(j["runs"][1]["tasks"]["quiz"]["metrics"]["exact_match"] == 0.75);
  CHECK(j["runs"][1]["tasks"]["quiz"]["metrics"]["exact_match_stderr"] == 0.1);
}
