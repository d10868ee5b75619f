// Plumbing shared by the training stages (sft in lib/train, reward/dpo in lib/align, pretrain...):
// device and precision from a recipe, tokenizer files next to the outputs, SIGINT → stop after the
// current step. Internal to the stage implementations (not for the CLI); sft.cpp still has its own
// copies of these pieces and can switch to them.
#pragma once
#include <torch/torch.h>

#include <filesystem>

#include "train/train.h"

namespace llmtune::train {

// CUDA when available, else CPU.
torch::Device stage_device();
// fp16: true → fp16; bf16: true → bf16; bf16: auto → bf16 on CUDA only; else fp32 (as run_sft does).
Precision stage_precision(const config::Recipe& recipe, const torch::Device& device);
torch::ScalarType precision_dtype(Precision p);
// Copies tokenizer.json / tokenizer.model / tokenizer_config.json / special_tokens_map.json /
// chat_template.jinja / added_tokens.json / vocab.json / merges.txt that exist in `from`.
void stage_copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to);

// While alive: the first SIGINT makes requested() true (the loop's should_stop then checkpoints and
// stops); the second falls through to the default handler. Restores the previous handler.
class SigintStop {
 public:
  SigintStop();
  ~SigintStop();
  SigintStop(const SigintStop&) = delete;
  SigintStop& operator=(const SigintStop&) = delete;
  static bool requested();

 private:
  void (*previous_)(int);
};

}  // namespace llmtune::train
