// TrainingMonitor: what the training loop's hooks call to run eval tasks at each evaluation and to
// mirror metrics.jsonl into TensorBoard (scalars, plus a Markdown table of sample generations per
// generation task). Rank 0 does the work; the trainer calls it on every rank so collectives match.
#include <algorithm>
#include <cmath>

#include "config/config.h"
#include "core/core.h"
#include "io/io.h"
#include "eval/eval_impl.h"

namespace llmtune::eval {
namespace {

std::string md_cell(std::string s, size_t max = 200) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += "\\|";
    else if (c == '\n' || c == '\r') out += ' ';
    else out += c;
  }
  if (out.size() > max) out = out.substr(0, max) + "...";
  return out;
}

}  // namespace

TrainingMonitor::TrainingMonitor(std::vector<TaskSpec> tasks, const fs::path& tensorboard_dir, RunOptions options,
                                 int rank)
    : tasks_(std::move(tasks)), options_(std::move(options)), rank_(rank) {
  options_.progress = false;
  if (rank_ == 0 && !tensorboard_dir.empty()) {
    tb_ = std::make_unique<TensorBoardWriter>(tensorboard_dir);
    log::info(fmt::format("TensorBoard events: {}", tb_->path().string()));
  }
}

std::map<std::string, double> TrainingMonitor::evaluate(model::TransformerImpl& model, const tok::Tokenizer& tokenizer,
                                                        int64_t step) {
  std::map<std::string, double> out;
  if (rank_ != 0) return out;
  for (const auto& t : tasks_) {
    auto r = run_task(model, tokenizer, t, options_);
    for (const auto& [k, v] : flat_metrics(r)) out[k] = v;
    std::string summary;
    for (const auto& [k, v] : r.metrics) summary += fmt::format(" {} {:.4f}", k, v.value);
    log::info(fmt::format("eval task {} at step {}:{} ({} records, {:.1f}s)", t.name, step, summary, r.n, r.seconds));
    if (tb_ && r.type == "generate") {
      std::string md = "| prompt | output | reference | correct |\n|---|---|---|---|\n";
      for (size_t i = 0; i < r.samples.size() && i < 8; ++i) {
        const auto& s = r.samples[i];
        md += fmt::format("| {} | {} | {} | {} |\n", md_cell(s.prompt), md_cell(s.output), md_cell(s.target),
                          s.correct ? "yes" : "no");
      }
      tb_->add_text("samples/" + t.name, md, step);
    }
  }
  if (tb_) tb_->flush();
  return out;
}

void TrainingMonitor::log(const nlohmann::json& line) {
  if (!tb_ || !line.is_object() || !line.contains("step")) return;
  const int64_t step = line["step"].get<int64_t>();
  bool is_eval = false;  // eval lines carry eval_* keys only (eval_loss, eval_<task>/<metric>)
  for (const auto& kv : line.items()) is_eval = is_eval || kv.key().rfind("eval_", 0) == 0;
  for (const auto& [k, v] : line.items()) {
    if (k == "step" || !v.is_number()) continue;
    const double x = v.get<double>();
    if (!std::isfinite(x)) continue;
    std::string tag;
    if (is_eval) {
      if (k == "epoch") continue;
      tag = k.rfind("eval_", 0) == 0 ? "eval/" + k.substr(5) : "eval/" + k;
    } else {
      tag = "train/" + (k == "lr" ? std::string("learning_rate") : k);
    }
    tb_->add_scalar(tag, x, step);
  }
  tb_->flush();
}

std::unique_ptr<TrainingMonitor> monitor_from_recipe(const config::Recipe& recipe, int rank, bool with_tensorboard) {
  const bool tb = recipe.use_tensorboard.value_or(false) && with_tensorboard;
  if (recipe.eval_tasks.empty() && !tb) return nullptr;
  const fs::path recipe_dir = recipe.source.name.empty() || recipe.source.name == "<string>"
                                  ? fs::path() : fs::path(recipe.source.name).parent_path();
  std::vector<TaskSpec> tasks;
  for (const auto& t : recipe.eval_tasks) tasks.push_back(TaskSpec::load(resolve_task_path(t, recipe_dir)));
  RunOptions o;
  o.batch_size = recipe.eval_batch_size.value_or(recipe.micro_batch_size);
  if (recipe.base_model) o.model_dir = io::resolve_model_path(*recipe.base_model);
  return std::make_unique<TrainingMonitor>(std::move(tasks), tb ? fs::path(recipe.output_dir) / "runs" : fs::path(), o, rank);
}

}  // namespace llmtune::eval
