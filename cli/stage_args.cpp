#include "cli/stage_args.h"

#include "core/core.h"

namespace llmtune::cli {

config::Recipe StageArgs::load_recipe(const char* command) const {
  if (recipe_path.empty()) fail("llmtune {} needs a recipe (.yaml)", command);
  return config::load_recipe(recipe_path, sets);
}

train::StageOptions StageArgs::stage_options() const {
  train::StageOptions so = options;
  so.progress = !no_progress;
  return so;
}

std::shared_ptr<StageArgs> add_stage_args(CLI::App& app, const std::string& recipe_help, const std::string& dry_run_help,
                                          bool recipe_required) {
  auto a = std::make_shared<StageArgs>();
  auto* recipe = app.add_option("recipe", a->recipe_path, recipe_help);
  if (recipe_required) recipe->required();
  app.add_option("--set", a->sets, "Override a recipe key: --set key=value (repeatable)");
  app.add_option("--resume", a->options.resume,
                 "Continue from a checkpoint: `auto` (newest in output_dir) or a checkpoint dir");
  app.add_flag("--dry-run", a->options.dry_run, dry_run_help);
  app.add_flag("--no-progress", a->no_progress, "No progress bar");
  return a;
}

}  // namespace llmtune::cli
