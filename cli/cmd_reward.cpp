// `llmtune reward RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: trains a Bradley–Terry
// reward model (LoRA or full; saved as *ForSequenceClassification); align::run_reward.
// `llmtune reward --score MODEL_DIR --data pairs.jsonl`: scores preference pairs with a trained reward
// model and prints one JSON line per pair (token ids and both scores).
#include <cstdio>

#include "align/align.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::cli {

namespace {

int score_pairs(const std::string& model_dir, const std::string& data, const std::string& chat_template,
                int64_t batch_size) {
  auto tokenizer = tok::Tokenizer::load(model_dir);
  auto rm = align::load_reward_model(model_dir);
  config::DatasetConfig d;
  d.path = data;
  align::PreferenceDataOptions po;
  po.sequence_len = 1 << 30;
  po.chat_template = chat_template;
  auto pd = align::load_preference_data({d}, {}, po, *tokenizer);
  const int32_t pad = tokenizer->pad_id().value_or(tokenizer->eos_id().value_or(0));
  torch::NoGradGuard ng;
  double correct = 0;
  for (size_t s = 0; s < pd.train.size(); s += static_cast<size_t>(batch_size)) {
    std::vector<int64_t> idx;
    for (size_t i = s; i < std::min(pd.train.size(), s + static_cast<size_t>(batch_size)); ++i) idx.push_back(static_cast<int64_t>(i));
    auto b = align::make_preference_batch(pd.train, idx, align::DataKind::paired, pad);
    auto sc = align::reward_scores(rm, b.input_ids, b.attention_mask);
    const int64_t B = static_cast<int64_t>(idx.size());
    for (int64_t k = 0; k < B; ++k) {
      const auto& ex = pd.train[static_cast<size_t>(idx[k])];
      std::vector<int32_t> c = ex.prompt, r = ex.prompt;
      c.insert(c.end(), ex.chosen.begin(), ex.chosen.end());
      r.insert(r.end(), ex.rejected.begin(), ex.rejected.end());
      const double sw = sc[k].item<double>(), sl = sc[B + k].item<double>();
      correct += sw > sl;
      nlohmann::json line = {{"chosen_ids", c}, {"rejected_ids", r}, {"chosen_score", sw}, {"rejected_score", sl}};
      std::printf("%s\n", line.dump().c_str());
    }
  }
  log::info(fmt::format("reward: {} pairs scored, pairwise accuracy {:.4f}", pd.train.size(),
                        pd.train.empty() ? 0.0 : correct / static_cast<double>(pd.train.size())));
  return 0;
}

}  // namespace

RunFn setup_reward(CLI::App& app) {
  struct Opts {
    std::string path;
    std::vector<std::string> sets;
    std::string resume;
    bool dry_run = false;
    bool no_progress = false;
    std::string score_model, score_data, chat_template;
    int64_t batch_size = 8;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("recipe", o->path, "Recipe (.yaml) with preference pairs (prompt/chosen/rejected)");
  app.add_option("--set", o->sets, "Override a recipe key: --set key=value (repeatable)");
  app.add_option("--resume", o->resume, "Continue from a checkpoint: `auto` (newest in output_dir) or a checkpoint dir");
  app.add_flag("--dry-run", o->dry_run, "Load the model and data, print the counts and the plan; no training");
  app.add_flag("--no-progress", o->no_progress, "No progress bar");
  app.add_option("--score", o->score_model, "Instead of training: score the pairs of --data with this reward model dir");
  app.add_option("--data", o->score_data, "With --score: a .jsonl/.json/.csv of prompt/chosen/rejected records");
  app.add_option("--chat-template", o->chat_template, "With --score: chat template for message lists (default: the tokenizer's)");
  app.add_option("--batch-size", o->batch_size, "With --score: pairs per forward pass")->check(CLI::PositiveNumber);
  return [o]() {
    if (!o->score_model.empty()) {
      if (o->score_data.empty()) fail("llmtune reward --score MODEL needs --data FILE (preference pairs to score)");
      return score_pairs(o->score_model, o->score_data, o->chat_template, o->batch_size);
    }
    if (o->path.empty()) fail("llmtune reward needs a recipe (or --score MODEL --data FILE)");
    auto recipe = config::load_recipe(o->path, o->sets);
    align::StageOptions so;
    so.resume = o->resume;
    so.dry_run = o->dry_run;
    so.progress = !o->no_progress;
    return align::run_reward(recipe, so);
  };
}

static const CommandRegistration register_reward{
    {35, "reward", "Train a Bradley-Terry reward model (LoRA or full), or score pairs with one", setup_reward}};

}  // namespace llmtune::cli
