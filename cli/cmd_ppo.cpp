// `llmtune ppo RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: online RL from prompts:
// rl: ppo (default; value head, GAE, clipped policy and value losses) or rl: grpo (groups of samples,
// group-normalised advantages, k3 KL to the reference); the stage itself is align::run_ppo.
#include "align/align.h"
#include "cli/commands.h"
#include "cli/stage_args.h"
#include "config/config.h"
#include "core/core.h"

namespace llmtune::cli {

RunFn setup_ppo(CLI::App& app) {
  auto a = add_stage_args(app, "Recipe (.yaml) with rl: ppo | grpo and a reward (trl.reward_funcs or trl.reward_model_path)",
                          "Load the model and prompts, print the counts and the plan; no training");
  return [a]() {
    auto recipe = a->load_recipe("ppo");
    if (!recipe.rl) recipe.rl = "ppo";  // `llmtune ppo` without rl: means PPO
    return align::run_ppo(recipe, a->stage_options());
  };
}

static const CommandRegistration register_ppo{
    {45, "ppo", "Online RL: PPO (value head, GAE, KL penalty) or GRPO (group advantages), LoRA or full", setup_ppo}};

}  // namespace llmtune::cli
