// `llmtune sft RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: supervised fine-tuning
// (LoRA or full) from an Axolotl-style recipe; the stage itself is train::run_sft.
#include "cli/commands.h"
#include "config/config.h"
#include "core/core.h"
#include "train/train.h"

namespace llmtune::cli {

RunFn setup_sft(CLI::App& app) {
  struct Opts {
    std::string path;
    std::vector<std::string> sets;
    std::string resume;
    bool dry_run = false;
    bool no_progress = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("recipe", o->path, "Recipe (.yaml)")->required();
  app.add_option("--set", o->sets, "Override a recipe key: --set key=value (repeatable)");
  app.add_option("--resume", o->resume, "Continue from a checkpoint: `auto` (newest in output_dir) or a checkpoint dir");
  app.add_flag("--dry-run", o->dry_run, "Validate the recipe and data, print the plan (steps, params, memory); no training");
  app.add_flag("--no-progress", o->no_progress, "No progress bar");
  return [o]() {
    auto recipe = config::load_recipe(o->path, o->sets);
    train::SftOptions so;
    so.resume = o->resume;
    so.dry_run = o->dry_run;
    so.progress = !o->no_progress;
    return train::run_sft(recipe, so);
  };
}

static const CommandRegistration register_sft{{20, "sft", "Supervised fine-tuning (LoRA or full) from a recipe", setup_sft}};

}  // namespace llmtune::cli
