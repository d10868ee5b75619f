// llmtune::train stages — the entry points of the training subcommands, each one function that
// reads a validated recipe top to bottom (model → adapter → data → objective → loop → outputs).
// Included by train/train.h; the CLI calls these. `reward`/`dpo` (lib/align) and `pretrain`
// (lib/pretrain) take the same StageOptions.
#pragma once
#include <cstdint>
#include <string>

namespace llmtune::config {
struct Recipe;
}

namespace llmtune::train {

struct StageOptions {
  std::string resume;      // "" = recipe's resume keys; "auto" = newest checkpoint; or a checkpoint dir
  bool dry_run = false;    // validate recipe + data, print the plan (and a JSON line), do not train
  bool progress = true;    // progress bar
};

// The sft stage (formats.md / DESIGN.md): loads base_model (bf16/fp16/fp32 per the recipe), applies
// LoRA or full fine-tuning (lib/peft), prepares the datasets, trains the causal-LM loss on target
// tokens with run_training, and writes the adapter (or the full model), tokenizer files and
// recipe.resolved.yaml to output_dir. SIGINT stops after the current step with a checkpoint.
// Returns the process exit code (0); user errors throw llmtune::Error.
int run_sft(const config::Recipe& recipe, const StageOptions& options = {});

}  // namespace llmtune::train
