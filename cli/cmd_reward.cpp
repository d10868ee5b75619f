// `llmtune reward RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: trains a Bradley–Terry
// reward model (LoRA or full; saved as *ForSequenceClassification); align::run_reward.
// `llmtune reward --score MODEL_DIR --data pairs.jsonl`: scores preference pairs with a trained reward
// model and prints one JSON line per pair (token ids and both scores).
#include <cstdio>

#include "align/align.h"
#include "cli/commands.h"
#include "cli/stage_args.h"
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
  struct ScoreOpts {
    std::string model, data, chat_template;
    int64_t batch_size = 8;
  };
  auto a = add_stage_args(app, "Recipe (.yaml) with preference pairs (prompt/chosen/rejected)",
                          "Load the model and data, print the counts and the plan; no training",
                          /*recipe_required=*/false);
  auto s = std::make_shared<ScoreOpts>();
  app.add_option("--score", s->model, "Instead of training: score the pairs of --data with this reward model dir");
  app.add_option("--data", s->data, "With --score: a .jsonl/.json/.csv of prompt/chosen/rejected records");
  app.add_option("--chat-template", s->chat_template, "With --score: chat template for message lists (default: the tokenizer's)");
  app.add_option("--batch-size", s->batch_size, "With --score: pairs per forward pass")->check(CLI::PositiveNumber);
  return [a, s]() {
    if (!s->model.empty()) {
      if (s->data.empty()) fail("llmtune reward --score MODEL needs --data FILE (preference pairs to score)");
      return score_pairs(s->model, s->data, s->chat_template, s->batch_size);
    }
    if (a->recipe_path.empty()) fail("llmtune reward needs a recipe (or --score MODEL --data FILE)");
    return align::run_reward(a->load_recipe("reward"), a->stage_options());
  };
}

static const CommandRegistration register_reward{
    {35, "reward", "Train a Bradley-Terry reward model (LoRA or full), or score pairs with one", setup_reward}};

}  // namespace llmtune::cli
