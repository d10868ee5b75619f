// Internal to lib/peft: pieces shared between the per-method files and the dispatchers.
#pragma once
#include "peft/peft.h"

namespace llmtune::peft::detail {

// Adds a zero bias (requires_grad false) to a dense linear that has none; true if added.
bool ensure_bias(model::DenseLinearImpl& d);
// Linear names BitFit trains for `cfg` (every linear but lm_head when target_modules is empty).
std::vector<std::string> bitfit_targets(const model::TransformerImpl& model, const BitFitConfig& cfg);
// The non-LoRA part of merge_all: IA3 wrappers, identity bottlenecks, BitFit bias flags; refuses
// prompt/prefix tuning and non-linear bottlenecks.
void merge_other_methods(model::TransformerImpl& model);
// prepare_for_training for adapter: ia3 | bitfit | prompt_tuning | prefix_tuning | bottleneck
// (fresh, or continued from lora_model_dir).
AdapterConfig prepare_other_method(model::TransformerImpl& model, const config::Recipe& recipe, uint64_t seed,
                                   const std::string& adapter);

}  // namespace llmtune::peft::detail
