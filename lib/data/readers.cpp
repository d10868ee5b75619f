// Dataset file readers: JSON Lines, JSON (array of records, or {"data": [...]}), CSV (RFC 4180 with a
// header row) and plain text (per line, per blank-line paragraph, or the whole file). Every record becomes
// a JSON object; malformed input fails with file:line unless skip_invalid, which skips and counts instead.
#include <fstream>
#include <sstream>

#include "core/core.h"
#include "data/data.h"

namespace llmtune::data {
namespace {

std::string lower_ext(const std::string& name) {
  auto dot = name.find_last_of('.');
  if (dot == std::string::npos) return "";
  std::string ext = name.substr(dot + 1);
  for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return ext;
}

std::string detect_format(const std::string& name, const std::string& requested) {
  if (requested != "auto" && !requested.empty()) {
    if (requested == "txt") return "text";
    if (requested == "json" || requested == "jsonl" || requested == "csv" || requested == "text") return requested;
    auto hint = closest_match(requested, {"json", "jsonl", "csv", "text"});
    fail("{}: unknown dataset file format `{}`{}; use one of json, jsonl, csv, text", name, requested,
         hint ? fmt::format(" (did you mean `{}`?)", *hint) : "");
  }
  std::string ext = lower_ext(name);
  if (ext == "jsonl" || ext == "ndjson") return "jsonl";
  if (ext == "json") return "json";
  if (ext == "csv") return "csv";
  if (ext == "txt" || ext == "text" || ext == "md") return "text";
  fail("{}: cannot tell the file format from the extension `.{}`; name it .jsonl/.json/.csv/.txt or set "
       "ds_type: jsonl|json|csv|text on the dataset",
       name, ext);
}

std::string_view strip_bom(std::string_view s) {
  if (s.size() >= 3 && static_cast<unsigned char>(s[0]) == 0xEF && static_cast<unsigned char>(s[1]) == 0xBB &&
      static_cast<unsigned char>(s[2]) == 0xBF)
    s.remove_prefix(3);
  return s;
}

bool blank(std::string_view s) {
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) return false;
  return true;
}

const char* type_name(const nlohmann::json& j) { return j.type_name(); }

// One message from nlohmann's parse error without its "[json.exception.parse_error.101] " prefix.
std::string short_parse_error(const std::exception& e) {
  std::string m = e.what();
  auto p = m.find("] ");
  if (m.rfind("[json.exception", 0) == 0 && p != std::string::npos) m = m.substr(p + 2);
  return m;
}

void parse_jsonl(std::string_view text, RecordSet& out, const ReadOptions& opt) {
  int64_t line_no = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    ++line_no;
    pos = (nl == std::string_view::npos) ? text.size() + 1 : nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (blank(line)) continue;
    std::string problem;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
      if (!j.is_object()) problem = fmt::format("expected a JSON object per line, got {}", type_name(j));
    } catch (const nlohmann::json::parse_error& e) {
      problem = fmt::format("malformed JSON ({})", short_parse_error(e));
    }
    if (!problem.empty()) {
      if (!opt.skip_invalid) fail("{}:{}: {}; fix the line or set skip_invalid: true", out.source, line_no, problem);
      ++out.skipped_invalid;
      continue;
    }
    out.records.push_back(std::move(j));
    out.lines.push_back(line_no);
  }
}

void parse_json(std::string_view text, RecordSet& out, const ReadOptions& opt) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // `datasets` reads .json files holding JSON Lines too; so do we.
    size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string_view::npos && text[first] == '{') return parse_jsonl(text, out, opt);
    fail("{}: malformed JSON ({}); fix the file", out.source, short_parse_error(e));
  }
  const nlohmann::json* list = &doc;
  if (doc.is_object()) {
    // {"data": [...]} (or any single key holding the list of records)
    if (doc.size() == 1 && doc.begin()->is_array()) {
      list = &*doc.begin();
    } else {
      fail("{}: expected a JSON array of records (or {{\"data\": [...]}}), got an object with keys {}; "
           "convert it to JSON Lines or an array",
           out.source, [&] {
             std::string k;
             for (auto it = doc.begin(); it != doc.end(); ++it) k += (k.empty() ? "" : ", ") + it.key();
             return k;
           }());
    }
  } else if (!doc.is_array()) {
    fail("{}: expected a JSON array of records, got {}", out.source, type_name(doc));
  }
  for (size_t i = 0; i < list->size(); ++i) {
    const auto& r = (*list)[i];
    if (!r.is_object()) {
      if (!opt.skip_invalid)
        fail("{}: element {} of the array is {}, not an object; fix it or set skip_invalid: true", out.source, i + 1,
             type_name(r));
      ++out.skipped_invalid;
      continue;
    }
    out.records.push_back(r);
    out.lines.push_back(0);
  }
}

// RFC 4180: fields split by commas, optionally double-quoted; "" inside quotes is a quote; quoted fields may
// span lines; CRLF or LF ends a row. Returns rows with the 1-based line each starts on.
struct CsvRow {
  std::vector<std::string> fields;
  int64_t line = 0;
  std::string error;
};

std::vector<CsvRow> split_csv(std::string_view text) {
  std::vector<CsvRow> rows;
  CsvRow row;
  std::string field;
  int64_t line = 1;
  row.line = 1;
  size_t i = 0;
  bool in_quotes = false, field_started = false, was_quoted = false;
  auto end_field = [&] {
    row.fields.push_back(std::move(field));
    field.clear();
    field_started = was_quoted = false;
  };
  auto end_row = [&] {
    end_field();
    bool empty_row = row.fields.size() == 1 && row.fields[0].empty() && row.error.empty();
    if (!empty_row) rows.push_back(std::move(row));
    row = CsvRow{};
    row.line = line;
  };
  while (i < text.size()) {
    char c = text[i];
    if (in_quotes) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field += '"';
          i += 2;
          continue;
        }
        in_quotes = false;
        ++i;
        continue;
      }
      if (c == '\n') ++line;
      field += c;
      ++i;
      continue;
    }
    if (c == '"') {
      if (field_started && row.error.empty())
        row.error = "a quote inside an unquoted field (quote the whole field and double inner quotes)";
      if (was_quoted && row.error.empty()) row.error = "text after a closing quote";
      in_quotes = true;
      field_started = was_quoted = true;
      ++i;
      continue;
    }
    if (c == ',') {
      end_field();
      ++i;
      continue;
    }
    if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i, c = '\n';
    if (c == '\n') {
      ++line;
      ++i;
      end_row();
      continue;
    }
    if (was_quoted && row.error.empty()) row.error = "text after a closing quote";
    field += c;
    field_started = true;
    ++i;
  }
  if (in_quotes) row.error = "unterminated quoted field (a closing \" is missing)";
  if (field_started || !row.fields.empty() || !row.error.empty()) end_row();
  return rows;
}

void parse_csv(std::string_view text, RecordSet& out, const ReadOptions& opt) {
  auto rows = split_csv(text);
  if (rows.empty()) return;
  if (!rows[0].error.empty()) fail("{}:{}: bad CSV header ({})", out.source, rows[0].line, rows[0].error);
  const auto& header = rows[0].fields;
  for (size_t r = 1; r < rows.size(); ++r) {
    auto& row = rows[r];
    std::string problem = row.error;
    if (problem.empty() && row.fields.size() != header.size())
      problem = fmt::format("{} fields but the header has {}", row.fields.size(), header.size());
    if (!problem.empty()) {
      if (!opt.skip_invalid) fail("{}:{}: malformed CSV ({}); fix the row or set skip_invalid: true", out.source, row.line, problem);
      ++out.skipped_invalid;
      continue;
    }
    nlohmann::json obj = nlohmann::json::object();
    for (size_t c = 0; c < header.size(); ++c) obj[header[c]] = std::move(row.fields[c]);
    out.records.push_back(std::move(obj));
    out.lines.push_back(row.line);
  }
}

void parse_text(std::string_view text, RecordSet& out, const ReadOptions& opt) {
  auto add = [&](std::string doc, int64_t line) {
    out.records.push_back(nlohmann::json{{opt.text_field, std::move(doc)}});
    out.lines.push_back(line);
  };
  if (opt.text_split == "file") {
    if (!blank(text)) add(std::string(text), 1);
    return;
  }
  if (opt.text_split != "line" && opt.text_split != "paragraph")
    fail("{}: text_split `{}` is not one of line, paragraph, file", out.source, opt.text_split);
  bool para = opt.text_split == "paragraph";
  std::string cur;
  int64_t cur_line = 0, line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() : nl + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (!para) {
      if (!blank(line)) add(std::string(line), line_no);
      continue;
    }
    if (blank(line)) {
      if (!cur.empty()) add(std::move(cur), cur_line);
      cur.clear();
      continue;
    }
    if (cur.empty()) cur_line = line_no;
    else cur += '\n';
    cur += line;
  }
  if (para && !cur.empty()) add(std::move(cur), cur_line);
}

}  // namespace

std::string RecordSet::where(size_t i) const {
  int64_t line = i < lines.size() ? lines[i] : 0;
  if (line > 0) return fmt::format("record {} of {} (line {})", i + 1, source, line);
  return fmt::format("record {} of {}", i + 1, source);
}

RecordSet parse_records(const std::string& text, const std::string& name, const ReadOptions& options) {
  RecordSet out;
  out.source = name;
  std::string format = detect_format(name, options.format);
  std::string_view body = strip_bom(text);
  if (format == "jsonl") parse_jsonl(body, out, options);
  else if (format == "json") parse_json(body, out, options);
  else if (format == "csv") parse_csv(body, out, options);
  else parse_text(body, out, options);
  return out;
}

RecordSet read_records(const std::filesystem::path& path, const ReadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    fail("dataset file {} does not exist; check `path:` in the recipe's datasets list", path.string());
  if (std::filesystem::is_directory(path, ec))
    fail("dataset path {} is a directory; point `path:` at a .jsonl/.json/.csv/.txt file", path.string());
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open dataset file {}", path.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse_records(ss.str(), path.string(), options);
}

}  // namespace llmtune::data
