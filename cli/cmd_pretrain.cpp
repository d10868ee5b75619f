// `llmtune pretrain RECIPE [--set k=v]... [--resume auto|DIR] [--dry-run]`: causal-LM pretraining
// (random init or continued) on raw text through a filtered, memory-mapped token cache; the stage is
// pretrain::run_pretrain.
#include "cli/commands.h"
#include "cli/stage_args.h"
#include "config/config.h"
#include "core/core.h"
#include "pretrain/pretrain.h"

namespace llmtune::cli {

RunFn setup_pretrain(CLI::App& app) {
  auto a = add_stage_args(app, "Recipe (.yaml)", "Build (or reuse) the filtered token cache and print the plan; no training");
  return [a]() { return pretrain::run_pretrain(a->load_recipe("pretrain"), a->stage_options()); };
}

static const CommandRegistration register_pretrain{
    {10, "pretrain", "Pretrain a causal LM on raw text (random init or continued), with corpus filters", setup_pretrain}};

}  // namespace llmtune::cli
