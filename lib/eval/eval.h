// llmtune::eval — measuring a model: perplexity (sliding window), multiple-choice log-likelihood
// tasks scored the way the LM Evaluation Harness scores them (acc, acc_norm, standard errors),
// generation tasks (chat-templated prompts, greedy or sampled, exact match / regex / substring),
// results JSON + Markdown reports, before/after tables, and a TensorBoard event-file writer.
// Caveats: few-shot examples are taken in file order (the harness's `first_n` sampler), not sampled.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::config {
struct Recipe;
}

namespace llmtune::eval {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Task descriptions: a small YAML file next to a JSONL data file (see readme-eval.md).
//
//   task: quiz                       # name (default: the YAML file's stem)
//   type: multiple_choice            # or: generate
//   data: quiz.jsonl                 # relative to the YAML file
//   context_field: question          # multiple_choice: doc_to_text
//   choices_field: choices           #   doc_to_choice (list of strings)
//   gold_field: label                #   doc_to_target (index, or the gold choice's text)
//   num_fewshot: 2                   #   first N other records, harness `first_n` order
//   fewshot_delimiter: "\n\n"  target_delimiter: " "  description: ""
//   prompt_field / messages_field / answer_field / system_prompt / chat_template   # generate
//   scoring: exact_match | regex | contains   regex: "answer: (\\w+)"  ignore_case: true
//   max_new_tokens: 16  do_sample: false  temperature: 1  top_k: 0  top_p: 1  seed: 0
struct TaskSpec {
  std::string name;
  std::string type = "multiple_choice";  // multiple_choice | generate
  fs::path data, fewshot_data;           // fewshot_data empty = `data` (the scored doc is excluded)
  fs::path source;                       // the YAML file ("" when built in code)
  int64_t limit = 0;                     // > 0: only the first N records
  // multiple_choice
  std::string context_field = "context", choices_field = "choices", gold_field = "gold";
  int64_t num_fewshot = 0;
  std::string fewshot_delimiter = "\n\n", target_delimiter = " ", description;
  // generate
  std::string prompt_field = "prompt", messages_field, answer_field = "answer";
  std::string system_prompt;
  std::string chat_template;  // "" tokenizer default, "none" raw prompt text, or a built-in name
  std::string scoring = "exact_match";  // exact_match | regex | contains
  std::string regex;                    // regex scoring: first capture group (or the match) vs answer
  bool ignore_case = false, strip = true;
  int64_t max_new_tokens = 32;
  bool do_sample = false;
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;

  // Reads and validates a task YAML (Error names file, line and key; unknown keys get a suggestion).
  static TaskSpec load(const fs::path& yaml_path);
  nlohmann::json to_json() const;  // the exact settings, for results files
};

// Resolves a task argument: a .yaml/.yml file, or a directory holding <name>.yaml. `base_dir` is
// tried for relative paths after the working directory (a recipe's folder).
fs::path resolve_task_path(const std::string& arg, const fs::path& base_dir = {});

// ---------------------------------------------------------------------------------------------
// Results
struct Metric {
  double value = 0, stderr_ = 0;
};

struct Sample {  // one scored record
  int64_t index = 0;
  std::string prompt, output, target;  // prompt: generation = the last prompt message; multiple choice = the context
  bool correct = false;
  std::vector<double> loglikelihoods;  // multiple choice: one per choice
  int64_t gold = -1, pred = -1, pred_norm = -1;  // multiple choice indices
};

struct TaskResult {
  std::string task, type;
  int64_t n = 0;
  std::map<std::string, Metric> metrics;  // acc, acc_norm | exact_match / regex_match / contains
  std::vector<Sample> samples;
  double seconds = 0;
  nlohmann::json settings;
};

struct RunOptions {
  int64_t batch_size = 8;      // sequences per forward (multiple choice) or prompts per generate_batch
  int64_t max_length = 0;      // context limit for log-likelihoods (0: the model's max positions)
  // Requests are encoded with the tokenizer's special tokens (BOS when it adds one), as the harness's
  // HFLM does by default (add_bos_token=None); false encodes them without.
  bool add_special_tokens = true;
  fs::path model_dir;          // generation defaults (generation_config.json) come from here if set
  bool progress = true;
};

// sample standard deviation / sqrt(n) (the harness's mean_stderr); 0 when n < 2.
double mean_stderr(const std::vector<double>& values);

// Runs one task on a model (eval mode, no grad; restores neither mode nor RNG: callers do).
TaskResult run_task(model::TransformerImpl& model, const tok::Tokenizer& tokenizer, const TaskSpec& task,
                    const RunOptions& options = {});

// ---- the multiple-choice pieces, exposed for tests -------------------------------------------
struct LoglikelihoodRequest {
  std::string context, continuation;
};
// The harness's encoding: trailing whitespace of the context moves to the continuation; the
// continuation's tokens are enc(context + continuation) minus the enc(context) prefix. An empty
// context becomes [BOS] (or EOS when there is no BOS).
std::pair<std::vector<int64_t>, std::vector<int64_t>> encode_request(const tok::Tokenizer& tokenizer,
                                                                     const LoglikelihoodRequest& request,
                                                                     bool add_special_tokens = true);
struct Loglikelihood {
  double logprob = 0;    // sum of log p(continuation tokens | context)
  bool greedy = false;   // every continuation token is the argmax
  int64_t tokens = 0;
};
std::vector<Loglikelihood> loglikelihoods(model::TransformerImpl& model, const tok::Tokenizer& tokenizer,
                                          const std::vector<LoglikelihoodRequest>& requests,
                                          const RunOptions& options = {});
// Multiple-choice requests of record `doc` (with few-shot context built from `fewshot_docs`).
std::vector<LoglikelihoodRequest> multiple_choice_requests(const TaskSpec& task, const nlohmann::json& doc,
                                                           const std::vector<nlohmann::json>& fewshot_docs,
                                                           int64_t doc_index, int64_t* gold);

// ---- generation scoring, exposed for tests -----------------------------------------------------
// The text compared with the reference after extraction (regex) and normalisation (strip, case).
std::string extract_answer(const TaskSpec& task, const std::string& output);
bool score_generation(const TaskSpec& task, const std::string& output, const std::string& reference);

// ---------------------------------------------------------------------------------------------
// Perplexity: documents scored in windows of max_length advancing by stride (transformers'
// sliding-window recipe: tokens scored by an earlier window serve as context only).
struct PerplexityResult {
  int64_t documents = 0, tokens = 0, scored_tokens = 0, max_length = 0, stride = 0;
  double mean_nll = 0, perplexity = 0;
  nlohmann::json to_json() const;
};
std::vector<std::string> read_documents(const fs::path& path, const std::string& field = "text");
PerplexityResult perplexity(model::TransformerImpl& model, const tok::Tokenizer& tokenizer,
                            const std::vector<std::string>& documents, int64_t max_length = 0, int64_t stride = 0,
                            bool progress = true);

// ---------------------------------------------------------------------------------------------
// A run = one model (+ adapters) evaluated on tasks. Reports for one or several runs.
struct RunResult {
  std::string label;  // column header: model dir name (+ adapter name)
  nlohmann::json identity;  // model path, adapter paths, config/weights fingerprints, dtype
  std::vector<TaskResult> tasks;
  std::optional<PerplexityResult> perplexity;
  std::string perplexity_data;
};

// Identity of a model directory or adapter: path, file sizes and a FNV-1a hash of its config
// JSON files (cheap; weights are identified by size + mtime, not hashed).
nlohmann::json describe_checkpoint(const fs::path& dir);

// {"llmtune_version", "created", "settings", "runs": [{label, identity, tasks: {name: {metrics, n,
// settings, samples}}, perplexity}]}.
nlohmann::json results_json(const std::vector<RunResult>& runs, const nlohmann::json& settings,
                            int64_t max_samples_per_task = -1);
// A short Markdown report: metric table (runs side by side, with ± stderr and the change), then
// a few generations per generation task next to each other.
std::string markdown_report(const std::vector<RunResult>& runs, int64_t examples = 3);
// The same table for a terminal (aligned plain text).
std::string text_table(const std::vector<RunResult>& runs, int64_t examples = 3);

// Flat metric map for logging: "<task>/<metric>" -> value (eval_tasks in metrics.jsonl).
std::map<std::string, double> flat_metrics(const TaskResult& result);

// ---------------------------------------------------------------------------------------------
// TensorBoard event files (TFRecord framing with masked CRC32C; the Event/Summary protobufs are
// encoded by hand). One file per writer: <logdir>/events.out.tfevents.<unix time>.<host>.
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);
uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const fs::path& logdir);
  ~TensorBoardWriter();
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time = -1);
  // Text plugin summary (a rank-0 string tensor; TensorBoard renders it as Markdown).
  void add_text(const std::string& tag, const std::string& text, int64_t step, double wall_time = -1);
  void flush();
  const fs::path& path() const { return path_; }

 private:
  void write_record(const std::string& payload);
  fs::path path_;
  std::ofstream out_;
};

// ---------------------------------------------------------------------------------------------
// Run monitoring for the training loop (train::TrainHooks evaluate_extra / on_log): eval tasks at
// every evaluation (metrics "<task>/<metric>", merged into metrics.jsonl's eval lines as
// "eval_<task>/<metric>") and TensorBoard scalars for every metrics line plus sample generations
// as text. Tasks run on rank 0 only; other ranks get an empty map.
class TrainingMonitor {
 public:
  // tensorboard_dir empty = no event file.
  TrainingMonitor(std::vector<TaskSpec> tasks, const fs::path& tensorboard_dir, RunOptions options, int rank = 0);
  // Runs the tasks (caller: eval mode, no grad, RNG saved); sample generations go to TensorBoard.
  std::map<std::string, double> evaluate(model::TransformerImpl& model, const tok::Tokenizer& tokenizer, int64_t step);
  // One metrics.jsonl line -> TensorBoard scalars: train/<key> (loss, learning_rate, grad_norm,
  // tokens_per_s, ...) or, for eval lines, eval/<key without the eval_ prefix>.
  void log(const nlohmann::json& line);
  bool active() const { return !tasks_.empty() || tb_ != nullptr; }
  const TensorBoardWriter* tensorboard() const { return tb_.get(); }

 private:
  std::vector<TaskSpec> tasks_;
  RunOptions options_;
  int rank_;
  std::unique_ptr<TensorBoardWriter> tb_;
};

// From a recipe: eval_tasks (paths relative to the working directory or the recipe's folder),
// use_tensorboard (events in output_dir/runs, rank 0; not created when with_tensorboard is false,
// e.g. for a dry run). nullptr when the recipe asks for neither.
std::unique_ptr<TrainingMonitor> monitor_from_recipe(const config::Recipe& recipe, int rank = 0,
                                                     bool with_tensorboard = true);

}  // namespace llmtune::eval
