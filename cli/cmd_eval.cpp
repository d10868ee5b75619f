// `llmtune eval`: measure models. `eval --model A [--model B | --adapter X] --task T.yaml ...` runs
// multiple-choice (LM Evaluation Harness scoring) and generation tasks on each model, optionally
// perplexity on held-out text, prints runs side by side with a few generations, and writes one
// results JSON + Markdown report per call. `eval perplexity` scores a .txt/.jsonl file in windows
// of --max-length advancing by --stride (transformers' sliding window), counting every scored token.
#include <chrono>
#include <ctime>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"
#include "eval/eval.h"
#include "io/io.h"

namespace llmtune::cli {
namespace {

namespace fs = std::filesystem;

struct PerplexityOpts {
  std::string model, tokenizer, data, field = "text", dtype = "fp32";
  int64_t max_length = 0, stride = 0;
  int threads = 0;
  bool json = false;
  std::vector<std::string> adapters;
};

int run_perplexity(const PerplexityOpts& o) {
  set_threads(o.threads);
  auto lm = load_model_and_tokenizer(o.model, o.tokenizer, o.dtype, o.adapters);
  auto docs = eval::read_documents(o.data, o.field);
  auto r = eval::perplexity(*lm.model, *lm.tokenizer, docs, o.max_length, o.stride);
  if (o.json) {
    std::cout << r.to_json().dump() << std::endl;
  } else {
    std::cout << fmt::format("documents {}  tokens {}  scored {}  mean loss {:.6f}  perplexity {:.4f}\n", r.documents,
                             r.tokens, r.scored_tokens, r.mean_nll, r.perplexity);
  }
  return 0;
}

struct TaskOpts {
  std::vector<std::string> models, adapters, tasks, labels;
  std::string tokenizer, dtype = "fp32", perplexity_data, perplexity_field = "text", output = "eval-results";
  int64_t batch_size = 8, max_length = 0, limit = 0, examples = 3, ppl_max_length = 0, ppl_stride = 0;
  int threads = 0;
  bool no_base = false, json = false, no_bos = false;
};

std::string dir_label(const std::string& path) {
  auto p = fs::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string().empty() ? path : p.filename().string();
}

int run_tasks(const TaskOpts& o) {
  set_threads(o.threads);
  if (o.models.empty()) fail("give --model DIR (twice, or with --adapter, to compare before/after)");
  if (o.tasks.empty() && o.perplexity_data.empty())
    fail("nothing to evaluate: give --task TASK.yaml (repeatable) and/or --perplexity-data FILE");
  if (!o.adapters.empty() && o.models.size() != 1)
    fail("--adapter compares one base model with and without adapters; give a single --model");

  // Runs: each --model; or the base then base + each adapter.
  struct Plan {
    std::string model;
    std::vector<std::string> adapters;
    std::string label;
  };
  std::vector<Plan> plans;
  for (const auto& m : o.models) plans.push_back({m, {}, dir_label(m)});
  if (!o.adapters.empty()) {
    if (o.no_base) plans.clear();
    for (const auto& a : o.adapters) plans.push_back({o.models[0], {a}, dir_label(o.models[0]) + "+" + dir_label(a)});
  }
  if (!o.labels.empty()) {
    if (o.labels.size() != plans.size())
      fail("--label was given {} times for {} runs; give one per run, in order", o.labels.size(), plans.size());
    for (size_t i = 0; i < plans.size(); ++i) plans[i].label = o.labels[i];
  }

  std::vector<eval::TaskSpec> specs;
  for (const auto& t : o.tasks) {
    auto spec = eval::TaskSpec::load(eval::resolve_task_path(t));
    if (o.limit > 0) spec.limit = o.limit;
    specs.push_back(std::move(spec));
  }
  std::vector<std::string> ppl_docs;
  if (!o.perplexity_data.empty()) ppl_docs = eval::read_documents(o.perplexity_data, o.perplexity_field);

  std::vector<eval::RunResult> runs;
  for (const auto& plan : plans) {
    log::info(fmt::format("eval: {}", plan.label));
    auto lm = load_model_and_tokenizer(plan.model, o.tokenizer, o.dtype, plan.adapters);
    eval::RunResult run;
    run.label = plan.label;
    run.identity = {{"model", eval::describe_checkpoint(lm.dir)}, {"dtype", o.dtype}};
    if (!plan.adapters.empty()) {
      run.identity["adapters"] = nlohmann::json::array();
      for (const auto& a : plan.adapters)
        run.identity["adapters"].push_back(
            eval::describe_checkpoint(io::resolve_model_path(a, {.files = {"adapter_config.json", "adapter_model.safetensors"}})));
    }
    eval::RunOptions ro;
    ro.batch_size = o.batch_size;
    ro.max_length = o.max_length;
    ro.add_special_tokens = !o.no_bos;
    ro.model_dir = lm.dir;
    for (const auto& spec : specs) {
      torch::manual_seed(static_cast<int64_t>(spec.seed));
      run.tasks.push_back(eval::run_task(*lm.model, *lm.tokenizer, spec, ro));
    }
    if (!ppl_docs.empty()) {
      run.perplexity = eval::perplexity(*lm.model, *lm.tokenizer, ppl_docs, o.ppl_max_length, o.ppl_stride);
      run.perplexity_data = o.perplexity_data;
    }
    runs.push_back(std::move(run));
  }

  nlohmann::json settings = {{"tasks", o.tasks}, {"batch_size", o.batch_size}, {"max_length", o.max_length},
                             {"limit", o.limit}, {"dtype", o.dtype}, {"add_special_tokens", !o.no_bos},
                             {"perplexity_data", o.perplexity_data}, {"perplexity_max_length", o.ppl_max_length},
                             {"perplexity_stride", o.ppl_stride}, {"threads", o.threads}};
  auto results = eval::results_json(runs, settings);
  std::string json_path, md_path;
  if (!o.output.empty() && o.output != "-") {
    std::error_code ec;
    fs::create_directories(o.output, ec);
    if (ec) fail("cannot create --output directory {}: {}", o.output, ec.message());
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char stamp[32];
    std::strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", std::localtime(&now));
    std::string base = fmt::format("{}/results-{}", o.output, stamp);
    for (int i = 1; fs::exists(base + ".json"); ++i) base = fmt::format("{}/results-{}-{}", o.output, stamp, i);
    json_path = base + ".json";
    md_path = base + ".md";
    std::ofstream(json_path) << results.dump(2) << '\n';
    std::ofstream md(md_path);
    md << eval::markdown_report(runs, o.examples);
    if (!md) fail("cannot write {}", md_path);
  }
  std::cout << eval::text_table(runs, o.examples);
  if (!json_path.empty()) std::cout << fmt::format("\nresults: {}\nreport:  {}\n", json_path, md_path);
  if (o.json) std::cout << results.dump() << std::endl;
  return 0;
}

}  // namespace

RunFn setup_eval(CLI::App& app) {
  app.require_subcommand(0, 1);
  auto t = std::make_shared<TaskOpts>();
  app.add_option("--model", t->models, "Model directory or hub id (repeat to compare models side by side)");
  app.add_option("--adapter", t->adapters,
                 "PEFT adapter directory: adds a run of --model with it (repeatable; the base runs first)");
  app.add_option("--task", t->tasks, "Task YAML file (repeatable); see the eval section of the README");
  app.add_option("--label", t->labels, "Column name for each run, in order (default: directory names)");
  app.add_option("--tokenizer", t->tokenizer, "Tokenizer directory (default: each model's)");
  app.add_option("--perplexity-data", t->perplexity_data, "Also report perplexity on this .txt/.jsonl file");
  app.add_option("--perplexity-field", t->perplexity_field, "JSONL field for --perplexity-data")->capture_default_str();
  app.add_option("--perplexity-max-length", t->ppl_max_length, "Perplexity window (default: min(context, 2048))");
  app.add_option("--perplexity-stride", t->ppl_stride, "Perplexity window step (default: the window)");
  app.add_option("--output", t->output, "Directory for results-<time>.json and .md (\"-\" = write none)")
      ->capture_default_str();
  app.add_option("--batch-size", t->batch_size, "Sequences per forward / prompts per generation batch")
      ->capture_default_str();
  app.add_option("--max-length", t->max_length, "Context limit for log-likelihoods (default: the model's)");
  app.add_option("--limit", t->limit, "Only the first N records of each task");
  app.add_option("--examples", t->examples, "Generations shown side by side per generation task")->capture_default_str();
  app.add_option("--dtype", t->dtype, "fp32 | bf16 | fp16 | auto")->capture_default_str();
  app.add_option("--threads", t->threads, "CPU threads (default: all cores)");
  app.add_flag("--no-base", t->no_base, "With --adapter: skip the run of the base model alone");
  app.add_flag("--no-bos", t->no_bos, "Encode log-likelihood requests without special tokens (harness add_bos_token=False)");
  app.add_flag("--json", t->json, "Also print the results JSON as the last line");

  auto* ppl = app.add_subcommand("perplexity", "Mean loss and perplexity over a text or JSONL file");
  auto o = std::make_shared<PerplexityOpts>();
  ppl->add_option("--model", o->model, "Model directory or hub id")->required();
  ppl->add_option("--tokenizer", o->tokenizer, "Tokenizer directory (default: the model's)");
  ppl->add_option("--data", o->data, "A .txt file (one document) or .jsonl (one document per record)")->required();
  ppl->add_option("--field", o->field, "JSONL field holding the text")->capture_default_str();
  ppl->add_option("--max-length", o->max_length, "Window length (default: min(context, 2048))");
  ppl->add_option("--stride", o->stride, "Window step (default: --max-length, i.e. no overlap)");
  ppl->add_option("--adapter", o->adapters, "PEFT LoRA adapter directory applied unmerged (repeatable, in order)");
  ppl->add_option("--dtype", o->dtype, "fp32 | bf16 | fp16 | auto")->capture_default_str();
  ppl->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  ppl->add_flag("--json", o->json, "Print the result as one JSON line");
  return [o, t, ppl]() { return ppl->parsed() ? run_perplexity(*o) : run_tasks(*t); };
}

static const CommandRegistration register_eval{
    {110, "eval", "Evaluate models: tasks (multiple choice, generation), perplexity, before/after tables", setup_eval}};

}  // namespace llmtune::cli
