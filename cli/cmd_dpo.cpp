// `llmtune dpo RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: preference optimisation
// (rl: dpo with dpo_loss_type sigmoid|hinge|ipo|robust, cDPO via dpo_label_smoothing, or rl: ipo |
// simpo | orpo | kto) from an Axolotl-style recipe; the stage itself is align::run_dpo.
#include "align/align.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/core.h"

namespace llmtune::cli {

RunFn setup_dpo(CLI::App& app) {
  struct Opts {
    std::string path;
    std::vector<std::string> sets;
    std::string resume;
    bool dry_run = false;
    bool no_progress = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("recipe", o->path, "Recipe (.yaml) with rl: dpo | ipo | simpo | orpo | kto")->required();
  app.add_option("--set", o->sets, "Override a recipe key: --set key=value (repeatable)");
  app.add_option("--resume", o->resume, "Continue from a checkpoint: `auto` (newest in output_dir) or a checkpoint dir");
  app.add_flag("--dry-run", o->dry_run, "Load the model and data, print the counts and the plan; no training");
  app.add_flag("--no-progress", o->no_progress, "No progress bar");
  return [o]() {
    auto recipe = config::load_recipe(o->path, o->sets);
    if (!recipe.rl) recipe.rl = "dpo";  // `llmtune dpo` without rl: means DPO (sigmoid)
    if (*recipe.rl == "dpo" && !recipe.dpo_loss_type) recipe.dpo_loss_type = "sigmoid";
    align::StageOptions so;
    so.resume = o->resume;
    so.dry_run = o->dry_run;
    so.progress = !o->no_progress;
    return align::run_dpo(recipe, so);
  };
}

static const CommandRegistration register_dpo{
    {40, "dpo", "Preference optimisation: DPO, IPO, cDPO, hinge, SimPO, ORPO, KTO (LoRA or full)", setup_dpo}};

}  // namespace llmtune::cli
