// `llmtune dpo RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: preference optimisation
// (rl: dpo with dpo_loss_type sigmoid|hinge|ipo|robust, cDPO via dpo_label_smoothing, or rl: ipo |
// simpo | orpo | kto) from an Axolotl-style recipe; the stage itself is align::run_dpo.
#include "align/align.h"
#include "cli/commands.h"
#include "cli/stage_args.h"
#include "config/config.h"
#include "core/core.h"

namespace llmtune::cli {

RunFn setup_dpo(CLI::App& app) {
  auto a = add_stage_args(app, "Recipe (.yaml) with rl: dpo | ipo | simpo | orpo | kto",
                          "Load the model and data, print the counts and the plan; no training");
  return [a]() {
    auto recipe = a->load_recipe("dpo");
    if (!recipe.rl) recipe.rl = "dpo";  // `llmtune dpo` without rl: means DPO (sigmoid)
    if (*recipe.rl == "dpo" && !recipe.dpo_loss_type) recipe.dpo_loss_type = "sigmoid";
    return align::run_dpo(recipe, a->stage_options());
  };
}

static const CommandRegistration register_dpo{
    {40, "dpo", "Preference optimisation: DPO, IPO, cDPO, hinge, SimPO, ORPO, KTO (LoRA or full)", setup_dpo}};

}  // namespace llmtune::cli
