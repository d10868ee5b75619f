// `llmtune pretrain RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: causal-LM pretraining
// (random init or continued) on raw text through a filtered, memory-mapped token cache; the stage is
// pretrain::run_pretrain.
#include "cli/commands.h"
#include "config/config.h"
#include "core/core.h"
#include "pretrain/pretrain.h"

namespace llmtune::cli {

RunFn setup_pretrain(CLI::App& app) {
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
  app.add_flag("--dry-run", o->dry_run, "Build (or reuse) the filtered token cache and print the plan; no training");
  app.add_flag("--no-progress", o->no_progress, "No progress bar");
  return [o]() {
    auto recipe = config::load_recipe(o->path, o->sets);
    pretrain::PretrainOptions po;
    po.resume = o->resume;
    po.dry_run = o->dry_run;
    po.progress = !o->no_progress;
    return pretrain::run_pretrain(recipe, po);
  };
}

static const CommandRegistration register_pretrain{
    {10, "pretrain", "Pretrain a causal LM on raw text (random init or continued), with corpus filters", setup_pretrain}};

}  // namespace llmtune::cli
