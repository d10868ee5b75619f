// Internal helpers shared by the eval sources (not part of the public header): JSONL reading with
// file:line errors and field lookup with a message listing the fields a record has.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/eval.h"

namespace llmtune::eval::detail {

// Every non-blank line of a JSONL file, parsed (Error names file and line when malformed).
std::vector<nlohmann::json> read_jsonl(const fs::path& path);
// doc[field], or Error naming the task, record index and the fields present.
const nlohmann::json& field(const nlohmann::json& doc, const std::string& name, const TaskSpec& task, int64_t index);
// Unicode code points in UTF-8 text (Python's len() of the decoded string).
int64_t count_code_points(const std::string& s);
// ASCII-only lowercase and whitespace strip, for the generation scorers.
std::string strip(const std::string& s);
std::string lower(const std::string& s);

}  // namespace llmtune::eval::detail
