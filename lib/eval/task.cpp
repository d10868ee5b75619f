// Task descriptions: the YAML file naming a JSONL data file, the field names and the scoring
// settings (eval.h shows the keys). Validated up front: unknown keys get a did-you-mean, wrong
// types name the file and line, data paths are resolved relative to the YAML file.
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <functional>

#include "core/core.h"
#include "eval/eval.h"

namespace llmtune::eval {
namespace {

using Setter = std::function<void(TaskSpec&, const YAML::Node&, const std::string& where)>;

template <class T>
T as(const YAML::Node& n, const std::string& where, const char* what) {
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    fail("{}: expected {}", where, what);
  }
}

Setter str(std::string TaskSpec::*f) {
  return [f](TaskSpec& t, const YAML::Node& n, const std::string& w) {
    if (!n.IsScalar()) fail("{}: expected a string", w);
    t.*f = n.as<std::string>();
  };
}
Setter path(fs::path TaskSpec::*f) {
  return [f](TaskSpec& t, const YAML::Node& n, const std::string& w) {
    if (!n.IsScalar()) fail("{}: expected a file path", w);
    t.*f = n.as<std::string>();
  };
}
Setter integer(int64_t TaskSpec::*f, int64_t lo) {
  return [f, lo](TaskSpec& t, const YAML::Node& n, const std::string& w) {
    auto v = as<int64_t>(n, w, "an integer");
    if (v < lo) fail("{}: must be >= {} (got {})", w, lo, v);
    t.*f = v;
  };
}
Setter real(double TaskSpec::*f, double lo) {
  return [f, lo](TaskSpec& t, const YAML::Node& n, const std::string& w) {
    auto v = as<double>(n, w, "a number");
    if (v < lo) fail("{}: must be >= {} (got {})", w, lo, v);
    t.*f = v;
  };
}
Setter boolean(bool TaskSpec::*f) {
  return [f](TaskSpec& t, const YAML::Node& n, const std::string& w) { t.*f = as<bool>(n, w, "true or false"); };
}

const std::vector<std::pair<std::string, Setter>>& keys() {
  static const std::vector<std::pair<std::string, Setter>> table = {
      {"task", str(&TaskSpec::name)},
      {"type", str(&TaskSpec::type)},
      {"data", path(&TaskSpec::data)},
      {"fewshot_data", path(&TaskSpec::fewshot_data)},
      {"limit", integer(&TaskSpec::limit, 0)},
      {"context_field", str(&TaskSpec::context_field)},
      {"choices_field", str(&TaskSpec::choices_field)},
      {"gold_field", str(&TaskSpec::gold_field)},
      {"num_fewshot", integer(&TaskSpec::num_fewshot, 0)},
      {"fewshot_delimiter", str(&TaskSpec::fewshot_delimiter)},
      {"target_delimiter", str(&TaskSpec::target_delimiter)},
      {"description", str(&TaskSpec::description)},
      {"prompt_field", str(&TaskSpec::prompt_field)},
      {"messages_field", str(&TaskSpec::messages_field)},
      {"answer_field", str(&TaskSpec::answer_field)},
      {"system_prompt", str(&TaskSpec::system_prompt)},
      {"chat_template", str(&TaskSpec::chat_template)},
      {"scoring", str(&TaskSpec::scoring)},
      {"regex", str(&TaskSpec::regex)},
      {"ignore_case", boolean(&TaskSpec::ignore_case)},
      {"strip", boolean(&TaskSpec::strip)},
      {"max_new_tokens", integer(&TaskSpec::max_new_tokens, 1)},
      {"do_sample", boolean(&TaskSpec::do_sample)},
      {"temperature", real(&TaskSpec::temperature, 0)},
      {"top_p", real(&TaskSpec::top_p, 0)},
      {"top_k", integer(&TaskSpec::top_k, 0)},
      {"seed", [](TaskSpec& t, const YAML::Node& n, const std::string& w) {
         t.seed = static_cast<uint64_t>(as<int64_t>(n, w, "an integer"));
       }},
  };
  return table;
}

}  // namespace

TaskSpec TaskSpec::load(const fs::path& yaml_path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(yaml_path.string());
  } catch (const YAML::BadFile&) {
    fail("cannot read the task file {}", yaml_path.string());
  } catch (const YAML::Exception& e) {
    fail("{}:{}: invalid YAML ({})", yaml_path.string(), e.mark.line + 1, e.msg);
  }
  if (!root.IsMap()) fail("{}: a task file is a mapping of keys (task, type, data, ...)", yaml_path.string());
  TaskSpec t;
  t.source = yaml_path;
  std::vector<std::string> names;
  for (const auto& [k, s] : keys()) names.push_back(k);
  for (const auto& kv : root) {
    const std::string key = kv.first.as<std::string>();
    const std::string where = fmt::format("{}:{}: key `{}`", yaml_path.string(), kv.second.Mark().line + 1, key);
    auto it = std::find_if(keys().begin(), keys().end(), [&](const auto& p) { return p.first == key; });
    if (it == keys().end()) {
      auto near = closest_match(key, names);
      fail("{}:{}: unknown task key `{}`{}", yaml_path.string(), kv.first.Mark().line + 1, key,
           near ? fmt::format(" (did you mean `{}`?)", *near) : std::string());
    }
    it->second(t, kv.second, where);
  }
  if (t.name.empty()) t.name = yaml_path.stem().string();
  if (t.type != "multiple_choice" && t.type != "generate")
    fail("{}: type `{}` is not a task type; use multiple_choice or generate", yaml_path.string(), t.type);
  if (t.scoring != "exact_match" && t.scoring != "regex" && t.scoring != "contains")
    fail("{}: scoring `{}` is unknown; use exact_match, regex or contains", yaml_path.string(), t.scoring);
  if (t.scoring == "regex" && t.regex.empty())
    fail("{}: scoring: regex needs a `regex:` with the answer in its first group", yaml_path.string());
  if (t.data.empty()) fail("{}: `data:` (the JSONL file with the records) is required", yaml_path.string());
  const fs::path dir = yaml_path.parent_path();
  if (t.data.is_relative()) t.data = dir / t.data;
  if (!t.fewshot_data.empty() && t.fewshot_data.is_relative()) t.fewshot_data = dir / t.fewshot_data;
  if (!fs::is_regular_file(t.data)) fail("{}: data file {} does not exist", yaml_path.string(), t.data.string());
  return t;
}

nlohmann::json TaskSpec::to_json() const {
  nlohmann::json j = {{"task", name}, {"type", type}, {"data", data.string()}, {"limit", limit}};
  if (!source.empty()) j["source"] = source.string();
  if (type == "multiple_choice") {
    j.update({{"context_field", context_field}, {"choices_field", choices_field}, {"gold_field", gold_field},
              {"num_fewshot", num_fewshot}, {"fewshot_delimiter", fewshot_delimiter},
              {"target_delimiter", target_delimiter}, {"description", description},
              {"fewshot_data", fewshot_data.empty() ? data.string() : fewshot_data.string()},
              {"fewshot_sampler", "first_n"}});
  } else {
    j.update({{"prompt_field", prompt_field}, {"messages_field", messages_field}, {"answer_field", answer_field},
              {"system_prompt", system_prompt}, {"chat_template", chat_template.empty() ? "tokenizer_default" : chat_template},
              {"scoring", scoring}, {"regex", regex}, {"ignore_case", ignore_case}, {"strip", strip},
              {"max_new_tokens", max_new_tokens}, {"do_sample", do_sample}, {"temperature", temperature},
              {"top_k", top_k}, {"top_p", top_p}, {"seed", seed}});
  }
  return j;
}

fs::path resolve_task_path(const std::string& arg, const fs::path& base_dir) {
  std::vector<fs::path> tries = {arg};
  if (!base_dir.empty() && fs::path(arg).is_relative()) tries.push_back(base_dir / arg);
  for (const auto& p : tries) {
    if (fs::is_regular_file(p)) return p;
    if (fs::is_directory(p)) {
      for (const char* ext : {".yaml", ".yml"})
        if (fs::is_regular_file(p / (p.filename().string() + ext))) return p / (p.filename().string() + ext);
    }
  }
  fail("task `{}` not found: pass a task YAML file (see `llmtune eval --help`){}", arg,
       base_dir.empty() ? "" : fmt::format(" (also looked in {})", base_dir.string()));
}

}  // namespace llmtune::eval
