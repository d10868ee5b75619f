// Recipe keys → TrainOptions: fractional epochs and eval/save steps, per-epoch counts, defaults.
#include <catch2/catch.hpp>

#include "config/config.h"
#include "train/train.h"

namespace tr = llmtune::train;

namespace {
llmtune::config::Recipe recipe(const std::string& extra) {
  return llmtune::config::parse_recipe("base_model: ./m\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"
                                       "output_dir: ./out\n" + extra, "test.yaml");
}
}  // namespace

TEST_CASE("train_options_from_recipe resolves steps like the recipe keys say", "[recipe]") {
  // 100 micro-batches per epoch, accumulation 4 → 25 steps per epoch.
  auto o = tr::train_options_from_recipe(
      recipe("gradient_accumulation_steps: 4\nnum_epochs: 2\nlearning_rate: 0.001\nlr_scheduler: cosine\n"
             "cosine_min_lr_ratio: 0.1\nwarmup_ratio: 0.05\nevals_per_epoch: 5\nsaves_per_epoch: 1\n"
             "save_total_limit: 3\nweight_decay: 0.01\nloraplus_lr_ratio: 16\nauto_resume_from_checkpoints: true\n"),
      100);
  CHECK(o.max_steps == -1);
  CHECK(o.num_epochs == 2);
  CHECK(o.eval_steps == 5);
  CHECK(o.save_steps == 25);
  CHECK(o.save_total_limit == 3);
  CHECK(o.logging_steps == 1);  // 0.5% of 50 steps, at least 1
  CHECK(o.resume == "auto");
  CHECK(o.optimizer.name == "adamw");
  CHECK(o.optimizer.lr == 0.001);
  CHECK(o.optimizer.loraplus_lr_ratio == 16);
  CHECK(o.schedule.type == "cosine");
  CHECK(o.schedule.min_lr_ratio == 0.1);
  CHECK(o.schedule.warmup_ratio == 0.05);
  CHECK(o.output_dir == "./out");

  auto f = tr::train_options_from_recipe(recipe("num_epochs: 1.5\neval_steps: 0.1\nsave_steps: 0.5\n"), 40);
  CHECK(f.max_steps == 60);
  CHECK(f.eval_steps == 6);
  CHECK(f.save_steps == 30);
  CHECK_THROWS_WITH(tr::train_options_from_recipe(recipe("num_epochs: 1.5\n"), -1), Catch::Contains("max_steps"));
}
