// `llmtune sft RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: supervised fine-tuning
// (LoRA or full) from an Axolotl-style recipe; the stage itself is train::run_sft.
#include "cli/commands.h"
#include "cli/stage_args.h"
#include "config/config.h"
#include "core/core.h"
#include "train/train.h"

namespace llmtune::cli {

RunFn setup_sft(CLI::App& app) {
  auto a = add_stage_args(app, "Recipe (.yaml)",
                          "Validate the recipe and data, print the plan (steps, params, memory); no training");
  return [a]() { return train::run_sft(a->load_recipe("sft"), a->stage_options()); };
}

static const CommandRegistration register_sft{{20, "sft", "Supervised fine-tuning (LoRA or full) from a recipe", setup_sft}};

}  // namespace llmtune::cli
