// Dataset types against goldens from scripts/fixtures/data_make.py (an independent Python reference of
// Axolotl's rules using HF `tokenizers` + jinja2, chat turn boundaries by token diffing), plus the pipeline:
// missing-field messages, skip_invalid, drop/truncate counts, validation split, weights and the cache.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <fstream>

#include "core/core.h"
#include "data/data.h"
#include "tokenizer/tokenizer.h"

using namespace llmtune;
namespace fs = std::filesystem;

namespace {

fs::path fixtures() {
  const char* f = std::getenv("LLMTUNE_FIXTURES");
  if (!f || !fs::exists(fs::path(f) / "data" / "STAMP"))
    FAIL("data fixtures missing: run scripts/fixtures/data_make.py --out $LLMTUNE_FIXTURES (LLMTUNE_FIXTURES="
         << (f ? f : "unset") << ")");
  return fs::path(f);
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

std::vector<nlohmann::json> read_lines(const fs::path& p) {
  std::ifstream f(p);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / fmt::format("llmtune-data-{}-{}", tag, ::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Compares a RecordFormatter's output over a dataset file with the golden file, record by record.
void check_against_golden(const tok::Tokenizer& t, const data::DatasetSpec& spec, const data::DataOptions& o,
                          const fs::path& golden, int64_t* trained_checked) {
  data::RecordFormatter f(spec, o, t);
  data::ReadOptions ro;
  auto rs = data::read_records(spec.path, ro);
  auto gold = read_lines(golden);
  REQUIRE(rs.records.size() == gold.size());
  for (size_t i = 0; i < gold.size(); ++i) {
    auto got = f.format(rs.records[i], rs.where(i));
    INFO(golden.filename().string() << " " << rs.where(i));
    REQUIRE(got.size() == gold[i].size());
    for (size_t k = 0; k < got.size(); ++k) {
      auto ids = gold[i][k]["input_ids"].get<std::vector<int32_t>>();
      auto labels = gold[i][k]["labels"].get<std::vector<int32_t>>();
      REQUIRE(got[k].input_ids == ids);
      REQUIRE(got[k].labels() == labels);
      for (int32_t l : labels) *trained_checked += l != -100;
    }
  }
}

}  // namespace

TEST_CASE("dataset types match the Python reference (Axolotl rules) on real tokenizers", "[data][golden]") {
  fs::path fx = fixtures();
  auto manifest = read_json(fx / "data" / "manifest.json");
  for (auto& [name, info] : manifest["tokenizers"].items()) {
    SECTION(name) {
      auto t = tok::Tokenizer::load(fx / "tokenizer" / name);
      data::DataOptions o;
      o.sequence_len = 4096;
      o.eot_tokens = info["eot_tokens"].get<std::vector<std::string>>();
      std::string tpl = info["template"];
      if (tpl != "tokenizer") o.chat_template = slurp(fx / "data" / tpl);
      int64_t trained = 0;
      auto spec = [&](const std::string& file, const std::string& type) {
        data::DatasetSpec s;
        s.path = (fx / "data" / file).string();
        s.type = type;
        return s;
      };
      auto g = [&](const std::string& c) { return fx / "data" / "golden" / (name + "." + c + ".jsonl"); };
      check_against_golden(*t, spec("alpaca.jsonl", "alpaca"), o, g("alpaca"), &trained);
      check_against_golden(*t, spec("io.jsonl", "input_output"), o, g("io"), &trained);
      check_against_golden(*t, spec("chat.jsonl", "chat_template"), o, g("chat"), &trained);
      check_against_golden(*t, spec("sharegpt.jsonl", "chat_template"), o, g("sharegpt"), &trained);
      data::DataOptions oi = o;
      oi.train_on_inputs = true;
      check_against_golden(*t, spec("alpaca.jsonl", "alpaca"), oi, g("alpaca_inputs"), &trained);
      data::DataOptions oc = o;
      oc.sequence_len = manifest["completion_sequence_len"].get<int64_t>();
      check_against_golden(*t, spec("text.txt", "completion"), oc, g("completion"), &trained);
      CHECK(trained > 1000);  // the comparison covered real masks, not empty ones
    }
  }
}

TEST_CASE("alpaca: the prompt is masked exactly, response + EOS trained", "[data][alpaca]") {
  fs::path fx = fixtures();
  auto t = tok::Tokenizer::load(fx / "tokenizer" / "llama3");
  data::DataOptions o;
  data::DatasetSpec s;
  s.type = "alpaca";
  data::RecordFormatter f(s, o, *t);
  nlohmann::json r = {{"instruction", "Name a colour."}, {"input", ""}, {"output", "Blue."}};
  auto ex = f.format(r, "record 1 of inline").at(0);
  auto prompt = t->encode(data::alpaca_prompt("Name a colour.", ""), true);
  auto resp = t->encode("Blue.", false);
  REQUIRE(ex.input_ids.size() == prompt.size() + resp.size() + 1);
  auto labels = ex.labels();
  for (size_t i = 0; i < prompt.size(); ++i) CHECK(labels[i] == -100);
  for (size_t i = 0; i < resp.size(); ++i) CHECK(labels[prompt.size() + i] == resp[i]);
  CHECK(labels.back() == *t->eos_id());
  CHECK(data::alpaca_prompt("Do X", "with Y").find("### Input:\nwith Y\n\n### Response:\n") != std::string::npos);
}

TEST_CASE("records with a missing field name the fields they have and the key to map", "[data][errors]") {
  fs::path fx = fixtures();
  auto t = tok::Tokenizer::load(fx / "tokenizer" / "qwen2");
  data::DataOptions o;
  data::DatasetSpec s;
  s.type = "alpaca";
  data::RecordFormatter f(s, o, *t);
  nlohmann::json r = {{"question", "q"}, {"answer", "a"}};
  auto e = error_of([&] { f.format(r, "record 12 of data.jsonl"); });
  CHECK(e == "record 12 of data.jsonl has no field `instruction`; it has: answer, question. Map fields with "
             "field_instruction: <name>");
  data::DatasetSpec c;
  c.type = "chat_template";
  data::RecordFormatter fc(c, o, *t);
  auto e2 = error_of([&] { fc.format({{"dialog", nlohmann::json::array()}}, "record 3 of chat.jsonl"); });
  CHECK(e2.find("record 3 of chat.jsonl has no field `messages`; it has: dialog. Map fields with field_messages") !=
        std::string::npos);
  // Role/content keys through message_property_mappings, role names through `roles`.
  c.message_property_mappings = {{"role", "speaker"}, {"content", "text"}};
  c.roles = {{"user", {"asker"}}, {"assistant", {"bot"}}};
  data::RecordFormatter fm(c, o, *t);
  nlohmann::json conv = {{"messages", {{{"speaker", "asker"}, {"text", "hi"}}, {{"speaker", "bot"}, {"text", "yo"}}}}};
  auto ex = fm.format(conv, "record 1").at(0);
  std::string trained;
  std::vector<int32_t> tr;
  for (size_t i = 0; i < ex.input_ids.size(); ++i)
    if (ex.trained[i]) tr.push_back(ex.input_ids[i]);
  CHECK(t->decode(tr) == "yo<|im_end|>");
}

TEST_CASE("prepare: skip_invalid counts, drop/truncate counts, split, weights, cache hit", "[data][prepare]") {
  fs::path fx = fixtures();
  auto t = tok::Tokenizer::load(fx / "tokenizer" / "qwen2");
  auto dir = temp_dir("prepare");
  // 40 good alpaca records + one malformed line + one record lacking `output`.
  std::string good = slurp(fx / "data" / "alpaca.jsonl");
  {
    std::ofstream f(dir / "mixed.jsonl");
    f << good << "{\"instruction\": \"broken\n" << "{\"instruction\": \"no output\"}\n";
  }
  data::DataOptions o;
  o.dataset_prepared_path = (dir / "cache").string();
  o.sequence_len = 4096;
  data::DatasetSpec s;
  s.path = (dir / "mixed.jsonl").string();
  s.type = "alpaca";
  o.datasets = {s};
  auto e = error_of([&] { data::prepare(o, *t); });
  CHECK(e.find("mixed.jsonl:41: malformed JSON (") != std::string::npos);
  o.skip_invalid = true;
  auto p = data::prepare(o, *t);
  REQUIRE(p.summary.datasets.size() == 1);
  CHECK(p.summary.datasets[0].records == 41);
  CHECK(p.summary.datasets[0].invalid_skipped == 2);
  CHECK(p.summary.datasets[0].examples == 40);
  CHECK(p.summary.datasets[0].cache == "miss");
  CHECK(p.summary.to_string().find("2 invalid skipped") != std::string::npos);

  // Second run: served from the cache file, same tokens.
  auto p2 = data::prepare(o, *t);
  CHECK(p2.summary.datasets[0].cache == "hit");
  CHECK(p2.summary.cache_hits == 1);
  CHECK(fs::exists(p2.summary.datasets[0].cache_file));
  CHECK(p2.train->tokens == p.train->tokens);
  CHECK(p2.train->trained == p.train->trained);
  CHECK(p2.summary.datasets[0].invalid_skipped == 2);  // counts survive the cache
  // A setting that changes tokenization misses the cache.
  o.train_on_inputs = true;
  CHECK(data::prepare(o, *t).summary.datasets[0].cache == "miss");
  o.train_on_inputs = false;

  // Lengths from the golden file (independent tokenization) decide which examples are long.
  auto gold = read_lines(fx / "data" / "golden" / "qwen2.alpaca.jsonl");
  std::vector<size_t> lengths;
  for (auto& g : gold) lengths.push_back(g[0]["input_ids"].size());
  std::vector<size_t> sorted(lengths);
  std::sort(sorted.begin(), sorted.end());
  o.sequence_len = static_cast<int64_t>(sorted[sorted.size() / 2]);
  int64_t longer = std::count_if(lengths.begin(), lengths.end(), [&](size_t l) { return int64_t(l) > o.sequence_len; });
  REQUIRE(longer > 0);
  auto dropped = data::prepare(o, *t);
  CHECK(dropped.summary.datasets[0].dropped_long == longer);
  CHECK(dropped.summary.datasets[0].examples == 40 - longer);
  o.excess_length_strategy = "truncate";
  auto truncated = data::prepare(o, *t);
  // A truncated example whose response was cut off entirely has no trained token left and is dropped.
  int64_t untrained = 0;
  for (auto& g : gold) {
    auto labels = g[0]["labels"].get<std::vector<int32_t>>();
    bool any = false;
    for (int64_t k = 1; k < std::min<int64_t>(o.sequence_len, labels.size()); ++k) any |= labels[k] != -100;
    untrained += !any;
  }
  CHECK(truncated.summary.datasets[0].truncated == longer);
  CHECK(truncated.summary.datasets[0].dropped_untrained == untrained);
  CHECK(truncated.summary.datasets[0].examples == 40 - untrained);
  for (size_t i = 0; i < truncated.train->size(); ++i) CHECK(truncated.train->length(i) <= o.sequence_len);
  o.excess_length_strategy = "drop";
  o.sequence_len = 4096;

  // Validation split: fraction rounds up, disjoint, deterministic from the seed.
  o.val_set_size = 0.1;
  auto a = data::prepare(o, *t), b = data::prepare(o, *t);
  CHECK(a.val->size() == 4);
  CHECK(a.train->size() == 36);
  CHECK(a.val->tokens == b.val->tokens);
  o.seed = 43;
  CHECK(data::prepare(o, *t).val->tokens != a.val->tokens);
  o.val_set_size = 0;

  // Mixing: a second dataset with weight 0.5 contributes a seeded half of its examples; weight 2 doubles.
  data::DatasetSpec io;
  io.path = (fx / "data" / "io.jsonl").string();
  io.type = "input_output";
  io.weight = 0.5;
  o.datasets = {s, io};
  auto m = data::prepare(o, *t);
  CHECK(m.train->size() == 40 + 6);
  o.datasets[1].weight = 2;
  CHECK(data::prepare(o, *t).train->size() == 40 + 24);
  fs::remove_all(dir);
}

TEST_CASE("chat_template: the template's turn-end token is trained when EOS differs and eot_tokens is unset",
          "[data][chat]") {
  // The embedded default model: EOS is </s>, its ChatML template closes turns with <|im_end|>.
  const char* src = std::getenv("LLMTUNE_SOURCE_DIR");
  REQUIRE(src);
  auto t = tok::Tokenizer::load(fs::path(src) / "models" / "default");
  REQUIRE(t->decode({*t->eos_id()}) == "</s>");
  data::DatasetSpec c;
  c.type = "chat_template";
  nlohmann::json conv = {{"messages", {{{"role", "user"}, {"content", "Capital of Ghana?"}},
                                       {{"role", "assistant"}, {"content", "Accra"}}}}};
  auto trained_text = [&](const data::DataOptions& o) {
    data::RecordFormatter f(c, o, *t);
    auto ex = f.format(conv, "record 1").at(0);
    std::vector<int32_t> tr;
    for (size_t i = 0; i < ex.input_ids.size(); ++i)
      if (ex.trained[i]) tr.push_back(ex.input_ids[i]);
    return t->decode(tr);
  };
  data::DataOptions o;
  CHECK(trained_text(o) == "Accra<|im_end|>");  // decode drops the leading ▁
  // An explicit eot_tokens list is used as given (Axolotl's behaviour): only the content is trained here.
  o.eot_tokens = {"</s>"};
  CHECK(trained_text(o) == "Accra");
}
