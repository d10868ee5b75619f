// Shared by the CLI commands that run a model: resolve `--model` (directory or hub id), load
// the weights in the requested dtype and the tokenizer that sits beside them.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::cli {

struct LoadedModel {
  std::filesystem::path dir;
  model::Transformer model{nullptr};
  std::unique_ptr<tok::Tokenizer> tokenizer;
};

// dtype: "fp32" | "bf16" | "fp16" | "auto" (the checkpoint's own dtype).
torch::ScalarType parse_dtype(const std::string& name, const model::ModelConfig* config = nullptr);
// `adapters`: PEFT LoRA adapter directories applied in order, unmerged (peft::load_adapter).
LoadedModel load_model_and_tokenizer(const std::string& model, const std::string& tokenizer_dir,
                                     const std::string& dtype, const std::vector<std::string>& adapters = {});
// Sets the intra-op thread count (0 = all cores).
void set_threads(int threads);

}  // namespace llmtune::cli
