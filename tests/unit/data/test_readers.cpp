// Readers: JSONL/JSON/CSV/text parsing, file:line errors for malformed input, skip_invalid counting.
#include <catch2/catch.hpp>

#include <fstream>

#include "core/core.h"
#include "data/data.h"

using namespace llmtune;
using data::parse_records;
using data::ReadOptions;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("JSONL: records, blank lines, malformed line names file:line", "[data][readers]") {
  std::string text = "{\"a\": 1}\n\n{\"a\": 2}\r\n{\"a\": 3\n{\"a\": 4}\n";
  auto err = error_of([&] { parse_records(text, "data.jsonl"); });
  CHECK(err.find("data.jsonl:4: malformed JSON (") != std::string::npos);
  CHECK(err.find("fix the line or set skip_invalid: true") != std::string::npos);

  ReadOptions skip;
  skip.skip_invalid = true;
  auto rs = parse_records(text, "data.jsonl", skip);
  REQUIRE(rs.records.size() == 3);
  CHECK(rs.skipped_invalid == 1);
  CHECK(rs.records[2]["a"] == 4);
  CHECK(rs.lines == std::vector<int64_t>{1, 3, 5});
  CHECK(rs.where(2) == "record 3 of data.jsonl (line 5)");

  // A JSON value that is not an object is invalid too.
  auto err2 = error_of([&] { parse_records("{\"a\":1}\n[1,2]\n", "x.jsonl"); });
  CHECK(err2.find("x.jsonl:2: expected a JSON object per line, got array") != std::string::npos);
}

TEST_CASE("JSON: arrays, {data: [...]}, and JSON Lines in a .json file", "[data][readers]") {
  auto a = parse_records("[{\"x\": \"1\"}, {\"x\": \"2\"}]", "d.json");
  CHECK(a.records.size() == 2);
  auto b = parse_records("{\"data\": [{\"x\": 1}, {\"x\": 2}, {\"x\": 3}]}", "d.json");
  CHECK(b.records.size() == 3);
  auto c = parse_records("{\"x\": 1}\n{\"x\": 2}\n", "d.json");
  CHECK(c.records.size() == 2);
  CHECK(c.lines[1] == 2);
  auto err = error_of([&] { parse_records("[{\"x\": 1}, 5]", "d.json"); });
  CHECK(err.find("element 2 of the array is number") != std::string::npos);
  auto err2 = error_of([&] { parse_records("{\"a\": [], \"b\": 1}", "d.json"); });
  CHECK(err2.find("keys a, b") != std::string::npos);
}

TEST_CASE("CSV: RFC 4180 quoting, embedded newlines, field-count errors", "[data][readers]") {
  std::string text =
      "instruction,output\r\n"
      "\"Say \"\"hi\"\"\",\"a, b\"\r\n"
      "plain,\"two\nlines\"\n"
      "\n"
      "only-one-field\n"
      "last,row";
  auto err = error_of([&] { parse_records(text, "t.csv"); });
  CHECK(err.find("t.csv:6: malformed CSV (1 fields but the header has 2)") != std::string::npos);
  ReadOptions skip;
  skip.skip_invalid = true;
  auto rs = parse_records(text, "t.csv", skip);
  REQUIRE(rs.records.size() == 3);
  CHECK(rs.skipped_invalid == 1);
  CHECK(rs.records[0]["instruction"] == "Say \"hi\"");
  CHECK(rs.records[0]["output"] == "a, b");
  CHECK(rs.records[1]["output"] == "two\nlines");
  CHECK(rs.records[2]["output"] == "row");
  CHECK(rs.lines == std::vector<int64_t>{2, 3, 7});
  auto err2 = error_of([&] { parse_records("a,b\n\"open,x\n", "u.csv"); });
  CHECK(err2.find("unterminated quoted field") != std::string::npos);
}

TEST_CASE("Text: per line, per paragraph, whole file", "[data][readers]") {
  std::string text = "first line\nsecond line\n\n  \nthird para\ncontinues\n";
  ReadOptions o;
  auto lines = parse_records(text, "c.txt", o);
  CHECK(lines.records.size() == 4);
  CHECK(lines.records[3]["text"] == "continues");
  o.text_split = "paragraph";
  auto paras = parse_records(text, "c.txt", o);
  REQUIRE(paras.records.size() == 2);
  CHECK(paras.records[0]["text"] == "first line\nsecond line");
  CHECK(paras.records[1]["text"] == "third para\ncontinues");
  CHECK(paras.lines == std::vector<int64_t>{1, 5});
  o.text_split = "file";
  auto whole = parse_records(text, "c.txt", o);
  REQUIRE(whole.records.size() == 1);
  CHECK(whole.records[0]["text"] == text);
}

TEST_CASE("Readers: unknown extension and missing files explain what to do", "[data][readers]") {
  CHECK(error_of([] { parse_records("x", "data.parquet"); }).find("ds_type") != std::string::npos);
  CHECK(error_of([] { data::read_records("/nonexistent/dir/d.jsonl"); }).find("does not exist") != std::string::npos);
  ReadOptions o;
  o.format = "jsnl";
  CHECK(error_of([&] { parse_records("{}", "d.x", o); }).find("did you mean `jsonl`") != std::string::npos);
}
