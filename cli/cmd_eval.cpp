// `llmtune eval perplexity`: mean negative log-likelihood and perplexity of a model over a
// file's tokens. A .txt file is one document; a .jsonl file holds one document per record
// (field `text` by default). Each document is encoded with the tokenizer's special tokens and
// scored in windows of --max-length tokens advancing by --stride (the transformers guide's
// sliding window: tokens already scored serve as context only). Counts every scored token.
#include <fstream>
#include <iostream>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"
#include "io/io.h"

namespace llmtune::cli {
namespace {

struct PerplexityOpts {
  std::string model, tokenizer, data, field = "text", dtype = "fp32";
  int64_t max_length = 0, stride = 0;
  int threads = 0;
  bool json = false;
  std::vector<std::string> adapters;
};

std::vector<std::string> read_documents(const std::string& path, const std::string& field) {
  std::vector<std::string> docs;
  bool jsonl = path.size() >= 6 && (path.ends_with(".jsonl") || path.ends_with(".json"));
  if (!jsonl) {
    docs.push_back(io::read_text_file(path));
    return docs;
  }
  std::ifstream in(path);
  if (!in) fail("cannot open {}", path);
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      fail("{}:{}: malformed JSON ({})", path, lineno, e.what());
    }
    if (!j.is_object() || !j.contains(field) || !j[field].is_string()) {
      std::vector<std::string> keys;
      if (j.is_object())
        for (auto& [k, v] : j.items()) keys.push_back(k);
      fail("{}:{}: record has no string field `{}` (it has: {}); choose one with --field", path, lineno, field,
           fmt::join(keys, ", "));
    }
    docs.push_back(j[field].get<std::string>());
  }
  return docs;
}

int run_perplexity(const PerplexityOpts& o) {
  set_threads(o.threads);
  auto lm = load_model_and_tokenizer(o.model, o.tokenizer, o.dtype, o.adapters);
  int64_t max_len = o.max_length > 0 ? o.max_length : std::min<int64_t>(lm.model->config().max_position_embeddings, 2048);
  int64_t stride = o.stride > 0 ? std::min(o.stride, max_len) : max_len;
  auto docs = read_documents(o.data, o.field);
  torch::NoGradGuard no_grad;
  double nll_sum = 0;
  int64_t scored = 0, total_tokens = 0;
  std::vector<std::vector<int32_t>> encoded = lm.tokenizer->encode_batch(docs, true);
  for (const auto& ids32 : encoded) total_tokens += static_cast<int64_t>(ids32.size());
  ProgressBar bar("perplexity", total_tokens, "tok");
  for (const auto& ids32 : encoded) {
    std::vector<int64_t> ids(ids32.begin(), ids32.end());
    const int64_t n = static_cast<int64_t>(ids.size());
    int64_t prev_end = 0;
    for (int64_t begin = 0; begin < n; begin += stride) {
      int64_t end = std::min(begin + max_len, n);
      int64_t target_len = end - prev_end;  // tokens not scored by an earlier window
      auto window = torch::tensor(std::vector<int64_t>(ids.begin() + begin, ids.begin() + end)).unsqueeze(0);
      auto labels = window.clone();
      int64_t ctx = (end - begin) - target_len;
      if (ctx > 0) labels.index_put_({0, torch::indexing::Slice(0, ctx)}, -100);
      if (window.size(1) >= 2) {
        auto hidden = lm.model->hidden_states(window);
        auto loss = model::causal_lm_loss_sum(*lm.model, hidden, labels);
        nll_sum += loss.sum.item<double>();
        scored += loss.n_tokens;
      }
      bar.update(end - prev_end);
      prev_end = end;
      if (end == n) break;
    }
  }
  bar.finish();
  if (scored == 0) fail("{} has fewer than two tokens to score", o.data);
  double mean = nll_sum / scored;
  double ppl = std::exp(mean);
  if (o.json) {
    nlohmann::json j = {{"documents", docs.size()}, {"tokens", total_tokens}, {"scored_tokens", scored},
                        {"mean_nll", mean},         {"perplexity", ppl},      {"max_length", max_len},
                        {"stride", stride}};
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << fmt::format("documents {}  tokens {}  scored {}  mean loss {:.6f}  perplexity {:.4f}\n", docs.size(),
                             total_tokens, scored, mean, ppl);
  }
  return 0;
}

}  // namespace

RunFn setup_eval(CLI::App& app) {
  app.require_subcommand(1);
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
  return [o]() { return run_perplexity(*o); };
}

static const CommandRegistration register_eval{{110, "eval", "Evaluate a model: perplexity over a text or JSONL file", setup_eval}};

}  // namespace llmtune::cli
