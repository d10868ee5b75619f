// Reports of one or several runs: the results JSON (one file per `llmtune eval` call), a short
// Markdown report and the terminal table, both with runs side by side, the change from the first
// run, and a few generations next to each other. Identity of a checkpoint is cheap on purpose:
// config files are hashed (FNV-1a), weight files are named with size and modification time.
#include <chrono>
#include <ctime>
#include <fstream>

#include "core/core.h"
#include "eval/eval_impl.h"

#ifndef LLMTUNE_VERSION
#define LLMTUNE_VERSION "dev"
#endif

namespace llmtune::eval {
namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string one_line(std::string s, size_t max = 60) {
  for (auto& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  if (s.size() > max) {
    size_t cut = max - 3;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // keep UTF-8 whole
    s = s.substr(0, cut) + "...";
  }
  return s;
}

std::string md_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += "\\|";
    else if (c == '`') out += "'";
    else out += c;
  }
  return out;
}

struct Row {
  std::string name;
  std::vector<std::optional<Metric>> cells;
  bool percent = true;
};

// One row per (task, metric) in first-appearance order, plus perplexity.
std::vector<Row> table_rows(const std::vector<RunResult>& runs) {
  std::vector<Row> rows;
  auto row_for = [&](const std::string& name, bool percent) -> Row& {
    for (auto& r : rows)
      if (r.name == name) return r;
    rows.push_back({name, std::vector<std::optional<Metric>>(runs.size()), percent});
    return rows.back();
  };
  for (size_t i = 0; i < runs.size(); ++i)
    for (const auto& t : runs[i].tasks)
      for (const auto& [k, v] : t.metrics) row_for(t.task + " " + k, true).cells[i] = v;
  for (size_t i = 0; i < runs.size(); ++i)
    if (runs[i].perplexity) row_for("perplexity", false).cells[i] = Metric{runs[i].perplexity->perplexity, 0};
  return rows;
}

std::string cell(const std::optional<Metric>& m, bool percent) {
  if (!m) return "-";
  if (!percent) return fmt::format("{:.3f}", m->value);
  return fmt::format("{:.1f} ± {:.1f}", 100 * m->value, 100 * m->stderr_);
}

std::string delta(const Row& r) {
  if (r.cells.size() < 2 || !r.cells.front() || !r.cells.back()) return "";
  const double d = r.cells.back()->value - r.cells.front()->value;
  return r.percent ? fmt::format("{:+.1f}", 100 * d) : fmt::format("{:+.3f}", d);
}

// Generation examples: task -> first n samples per run.
struct Example {
  std::string task, prompt, target;
  std::vector<std::string> outputs;
};
std::vector<Example> examples_of(const std::vector<RunResult>& runs, int64_t n) {
  std::vector<Example> out;
  if (runs.empty()) return out;
  for (const auto& t : runs[0].tasks) {
    if (t.type != "generate") continue;
    for (int64_t i = 0; i < n && i < static_cast<int64_t>(t.samples.size()); ++i) {
      Example e{t.task, t.samples[static_cast<size_t>(i)].prompt, t.samples[static_cast<size_t>(i)].target, {}};
      for (const auto& run : runs) {
        std::string o = "-";
        for (const auto& rt : run.tasks)
          if (rt.task == t.task && i < static_cast<int64_t>(rt.samples.size())) o = rt.samples[static_cast<size_t>(i)].output;
        e.outputs.push_back(o);
      }
      out.push_back(std::move(e));
    }
  }
  return out;
}

}  // namespace

nlohmann::json describe_checkpoint(const fs::path& dir) {
  nlohmann::json j = {{"path", fs::absolute(dir).lexically_normal().string()}};
  if (!fs::is_directory(dir)) return j;
  nlohmann::json files = nlohmann::json::object();
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.ends_with(".json")) {
      std::ifstream in(e.path(), std::ios::binary);
      std::string text((std::istreambuf_iterator<char>(in)), {});
      files[name] = {{"bytes", text.size()}, {"fnv1a", fmt::format("{:016x}", fnv1a(text))}};
    } else if (name.ends_with(".safetensors")) {
      // Seconds since the Unix epoch (file_clock's own epoch is not the Unix one).
      const auto mtime = std::chrono::duration_cast<std::chrono::seconds>(
          std::chrono::file_clock::to_sys(fs::last_write_time(e.path())).time_since_epoch()).count();
      files[name] = {{"bytes", fs::file_size(e.path())}, {"mtime", mtime}};
    }
  }
  j["files"] = files;
  return j;
}

nlohmann::json results_json(const std::vector<RunResult>& runs, const nlohmann::json& settings,
                            int64_t max_samples) {
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  nlohmann::json j = {{"llmtune_version", LLMTUNE_VERSION}, {"created", stamp}, {"settings", settings}};
  nlohmann::json jr = nlohmann::json::array();
  for (const auto& run : runs) {
    nlohmann::json tasks = nlohmann::json::object();
    for (const auto& t : run.tasks) {
      nlohmann::json metrics = nlohmann::json::object();
      for (const auto& [k, v] : t.metrics) {
        metrics[k] = v.value;
        metrics[k + "_stderr"] = v.stderr_;
      }
      nlohmann::json samples = nlohmann::json::array();
      for (const auto& s : t.samples) {
        if (max_samples >= 0 && static_cast<int64_t>(samples.size()) >= max_samples) break;
        nlohmann::json js = {{"index", s.index}, {"target", s.target}, {"output", s.output}, {"correct", s.correct}};
        if (t.type == "multiple_choice") {
          js["loglikelihoods"] = s.loglikelihoods;
          js["gold"] = s.gold;
          js["pred"] = s.pred;
          js["pred_norm"] = s.pred_norm;
        } else {
          js["prompt"] = s.prompt;
        }
        samples.push_back(std::move(js));
      }
      tasks[t.task] = {{"type", t.type}, {"n", t.n}, {"metrics", metrics}, {"seconds", t.seconds},
                       {"settings", t.settings}, {"samples", samples}};
    }
    nlohmann::json r = {{"label", run.label}, {"identity", run.identity}, {"tasks", tasks}};
    if (run.perplexity) {
      r["perplexity"] = run.perplexity->to_json();
      r["perplexity"]["data"] = run.perplexity_data;
    }
    jr.push_back(std::move(r));
  }
  j["runs"] = jr;
  return j;
}

std::string markdown_report(const std::vector<RunResult>& runs, int64_t n_examples) {
  std::string md = "# llmtune eval\n\n";
  for (const auto& r : runs) {
    // A run assembled by hand (tests, other tools) may carry no identity at all.
    const nlohmann::json identity = r.identity.is_object() ? r.identity : nlohmann::json::object();
    md += fmt::format("- **{}**: `{}`", md_escape(r.label), identity.value("model", nlohmann::json::object()).value("path", ""));
    if (identity.contains("adapters"))
      for (const auto& a : identity["adapters"]) md += fmt::format(" + adapter `{}`", a.value("path", ""));
    md += "\n";
  }
  md += "\n| metric |";
  for (const auto& r : runs) md += " " + md_escape(r.label) + " |";
  if (runs.size() >= 2) md += " change |";
  md += "\n|---|";
  for (size_t i = 0; i < runs.size(); ++i) md += "---:|";
  if (runs.size() >= 2) md += "---:|";
  md += "\n";
  for (const auto& row : table_rows(runs)) {
    md += "| " + md_escape(row.name) + (row.percent ? " (%)" : "") + " |";
    for (const auto& c : row.cells) md += " " + cell(c, row.percent) + " |";
    if (runs.size() >= 2) md += " " + delta(row) + " |";
    md += "\n";
  }
  md += "\nAccuracies in percent ± standard error of the mean; perplexity on ";
  md += runs.empty() || runs[0].perplexity_data.empty() ? std::string("(none)") : "`" + runs[0].perplexity_data + "`";
  md += ".\n";
  auto ex = examples_of(runs, n_examples);
  if (!ex.empty()) {
    md += "\n## Generations\n\n| task | prompt | reference |";
    for (const auto& r : runs) md += " " + md_escape(r.label) + " |";
    md += "\n|---|---|---|";
    for (size_t i = 0; i < runs.size(); ++i) md += "---|";
    md += "\n";
    for (const auto& e : ex) {
      md += fmt::format("| {} | {} | {} |", md_escape(e.task), md_escape(one_line(e.prompt, 80)), md_escape(one_line(e.target, 40)));
      for (const auto& o : e.outputs) md += " " + md_escape(one_line(o, 80)) + " |";
      md += "\n";
    }
  }
  return md;
}

std::string text_table(const std::vector<RunResult>& runs, int64_t n_examples) {
  auto rows = table_rows(runs);
  size_t w0 = 6;
  for (const auto& r : rows) w0 = std::max(w0, r.name.size() + (r.percent ? 4 : 0));
  std::vector<size_t> w;
  for (size_t i = 0; i < runs.size(); ++i) {
    size_t m = std::min<size_t>(std::max<size_t>(runs[i].label.size(), 13), 30);
    w.push_back(m);
  }
  std::string out = fmt::format("{:<{}}", "metric", w0);
  for (size_t i = 0; i < runs.size(); ++i) out += fmt::format("  {:>{}}", one_line(runs[i].label, w[i]), w[i]);
  if (runs.size() >= 2) out += "   change";
  out += "\n";
  for (const auto& r : rows) {
    out += fmt::format("{:<{}}", r.name + (r.percent ? " (%)" : ""), w0);
    for (size_t i = 0; i < r.cells.size(); ++i) {
      // "±" is 2 bytes / 1 column: pad by code points.
      std::string c = cell(r.cells[i], r.percent);
      const auto cols = static_cast<size_t>(detail::count_code_points(c));
      out += "  " + std::string(w[i] > cols ? w[i] - cols : 0, ' ') + c;
    }
    if (runs.size() >= 2) out += fmt::format("   {:>6}", delta(r));
    out += "\n";
  }
  auto ex = examples_of(runs, n_examples);
  if (!ex.empty()) {
    out += "\ngenerations:\n";
    for (const auto& e : ex) {
      out += fmt::format("  [{}] {}   (reference: {})\n", e.task, one_line(e.prompt, 70), one_line(e.target, 30));
      for (size_t i = 0; i < runs.size(); ++i)
        out += fmt::format("    {:<{}} -> {}\n", one_line(runs[i].label, 24), std::min<size_t>(24, runs[i].label.size()),
                           one_line(e.outputs[i], 70));
    }
  }
  return out;
}

}  // namespace llmtune::eval
