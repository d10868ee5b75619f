// The options every training stage command shares (`sft`, `dpo`, `reward`, `pretrain`):
// RECIPE, --set, --resume, --dry-run, --no-progress. Each cmd_*.cpp adds its own extras.
#pragma once
#include <CLI/CLI.hpp>

#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "train/train.h"

namespace llmtune::cli {

struct StageArgs {
  std::string recipe_path;
  std::vector<std::string> sets;
  bool no_progress = false;
  train::StageOptions options;

  // The recipe with --set applied; fails when no recipe was given.
  config::Recipe load_recipe(const char* command) const;
  // resume / dry_run / progress as given on the command line.
  train::StageOptions stage_options() const;
};

// Adds the shared options to `app`; `recipe_help` and `dry_run_help` say what this stage does with them.
std::shared_ptr<StageArgs> add_stage_args(CLI::App& app, const std::string& recipe_help, const std::string& dry_run_help,
                                          bool recipe_required = true);

}  // namespace llmtune::cli
