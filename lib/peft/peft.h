// llmtune::peft — parameter-efficient fine-tuning on top of llmtune::model: LoRA/rsLoRA wrappers
// installed through TransformerImpl::replace_linear, target selection and freezing (adapters,
// modules_to_save, Axolotl `unfrozen_parameters`), and PEFT-compatible adapter files
// (adapter_config.json + adapter_model.safetensors) in both directions, plus merging into dense
// weights. Only LoRA is implemented; other PEFT methods are listed in one registry (methods.cpp)
// and refused with a clear message. fan_in_fan_out, rank_pattern/alpha_pattern are refused.
#pragma once
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "model/model.h"

namespace llmtune::config {
struct Recipe;
}

namespace llmtune::peft {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Configuration (formats.md §5.1)

struct LoraConfig {
  int64_t r = 8;
  double alpha = 8;
  double dropout = 0.0;
  bool use_rslora = false;
  bool use_dora = false;  // refused for now (registry entry exists)
  // Entries are full module names or suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj");
  // a single entry that is not a plain dotted name is a regex fully matched against the full name
  // (PEFT's string form); "all-linear" means every linear except lm_head.
  std::vector<std::string> target_modules;
  bool target_linear = false;                // Axolotl lora_target_linear (== "all-linear")
  std::vector<std::string> modules_to_save;  // e.g. embed_tokens, lm_head: trained in full, saved whole
  std::string bias = "none";                 // none | all | lora_only
  std::string base_model_name_or_path;
  bool inference_mode = false;

  double scaling() const;  // alpha / r, or alpha / sqrt(r) with use_rslora
  // From recipe keys adapter, lora_r, lora_alpha, lora_dropout, lora_target_modules,
  // lora_target_linear, lora_modules_to_save, peft_use_rslora, peft_use_dora, base_model.
  static LoraConfig from_recipe(const config::Recipe& recipe);
  // adapter_config.json as PEFT's LoraConfig writes it; `targets` = the wrapped module names
  // (written as suffixes when that is exact, else as full names).
  nlohmann::json to_adapter_json(const std::vector<std::string>& targets) const;
  // Parses adapter_config.json (peft_type must be LORA); unknown keys are ignored.
  static LoraConfig from_adapter_json(const nlohmann::json& j, const std::string& source);
};

// ---------------------------------------------------------------------------------------------
// Method registry: every PEFT type llmtune knows, whether it is implemented, and how to load it.

struct MethodInfo {
  std::string peft_type;       // as in adapter_config.json: "LORA", "IA3", ...
  std::string recipe_adapter;  // Axolotl `adapter:` value, "" if none
  std::string summary;
  bool implemented = false;
};
const std::vector<MethodInfo>& methods();
// Throws Error naming the supported types if `peft_type` is unknown or not implemented.
const MethodInfo& require_method(const std::string& peft_type, const std::string& source);

// ---------------------------------------------------------------------------------------------
// LoRA wrapper: base_layer (frozen) + lora_A [r,in] + lora_B [out,r]; adapter weights are fp32
// (like PEFT's autocast_adapter_dtype) and the result is cast back to the base's dtype.

class LoraLinearImpl : public model::LinearBaseImpl {
 public:
  // PEFT init: A kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) drawn from `gen`
  // (or torch's default generator), B = 0.
  LoraLinearImpl(model::LinearPtr base, int64_t r, double scaling, double dropout,
                 std::optional<uint64_t> seed = std::nullopt);
  torch::Tensor forward(const torch::Tensor& x) override;  // base(x) + B(A(dropout(x))) * scaling
  int64_t in_features() const override { return base_layer->in_features(); }
  int64_t out_features() const override { return base_layer->out_features(); }

  // The effective dense weight W + scaling * B A in fp32 (recursing into stacked adapters).
  torch::Tensor merged_weight_fp32() const;
  torch::Tensor base_bias() const;  // the innermost dense bias (undefined if none)
  // A plain DenseLinear with the merged weight in the base dtype (base bias copied).
  model::LinearPtr merge() const;
  // The innermost plain linear (through stacked adapters).
  std::shared_ptr<model::DenseLinearImpl> dense_base() const;

  model::LinearPtr base_layer;
  std::shared_ptr<model::DenseLinearImpl> lora_A, lora_B;
  int64_t r;
  double scaling, dropout;
};
using LoraLinear = std::shared_ptr<LoraLinearImpl>;

// ---------------------------------------------------------------------------------------------
// Targeting and freezing

// Linear names selected by `cfg` (target_modules / target_linear), in model order. Throws Error
// (listing available names) if nothing matches or a listed name/suffix matches nothing.
std::vector<std::string> select_targets(const model::TransformerImpl& model, const LoraConfig& cfg);
// Does `module_name` match `targets` under PEFT's rules (exact, ".suffix", or regex fullmatch)?
bool matches_target(const std::string& module_name, const std::vector<std::string>& targets);

// Wraps the selected linears with fresh LoRA modules, freezes everything else, then unfreezes
// adapters, biases per cfg.bias and modules_to_save. Returns the wrapped names.
std::vector<std::string> apply_lora(model::TransformerImpl& model, const LoraConfig& cfg, uint64_t seed = 0);
// Names of the linears currently wrapped by LoRA.
std::vector<std::string> lora_modules(const model::TransformerImpl& model);
// Parameter names (full, as named_parameters) belonging to `modules_to_save` entries.
std::vector<std::string> modules_to_save_parameters(model::TransformerImpl& model,
                                                    const std::vector<std::string>& modules_to_save);
// Axolotl unfrozen_parameters: freeze everything, then unfreeze parameters whose name matches
// any regex at its start (Python re.match). Returns the unfrozen names; errors if one matches nothing.
std::vector<std::string> unfreeze_matching(torch::nn::Module& model, const std::vector<std::string>& patterns);

struct ParamStats {
  int64_t trainable = 0, total = 0;
  double percent() const { return total ? 100.0 * trainable / total : 0.0; }
  // "trainable params: 1,024 || all params: 10,000 || trainable%: 10.2400" (PEFT's wording)
  std::string to_string() const;
};
ParamStats parameter_stats(torch::nn::Module& model);
void print_trainable_parameters(torch::nn::Module& model);  // log::info(parameter_stats(m).to_string())

// ---------------------------------------------------------------------------------------------
// Adapter files (formats.md §5.2)

// adapter_config.json + adapter_model.safetensors with names `base_model.model.<live name>`:
// lora_A/lora_B weights, biases per cfg.bias, modules_to_save weights. Adapter tensors are saved
// in `dtype` if given (else as held, fp32). Refuses stacked adapters.
void save_adapter(model::TransformerImpl& model, const LoraConfig& cfg, const fs::path& dir,
                  std::optional<torch::ScalarType> dtype = std::nullopt);
// Loads a PEFT (or llmtune) LoRA adapter onto the model, unmerged: wraps every module with
// lora_A/lora_B tensors (stacking over an existing adapter), copies modules_to_save and bias
// tensors in. `trainable`: leave the adapter trainable (continue training, lora_model_dir) —
// otherwise all parameters are frozen. Errors name the tensor, both shapes and the config's r.
LoraConfig load_adapter(model::TransformerImpl& model, const fs::path& dir, bool trainable = false);
LoraConfig read_adapter_config(const fs::path& dir);

// Replaces every LoRA wrapper with a plain DenseLinear holding W + sum of scaling * B A
// (computed in fp32, cast to the base dtype), so model::save_pretrained works.
void merge_all(model::TransformerImpl& model);
// load_adapter for each dir in order, then merge_all.
void merge_adapters(model::TransformerImpl& model, const std::vector<fs::path>& dirs);

// ---------------------------------------------------------------------------------------------
// Training entry point for the sft stage

struct TrainingSetup {
  std::optional<LoraConfig> lora;          // set when the recipe trains a LoRA adapter
  std::vector<std::string> wrapped;        // LoRA-wrapped linear names
  std::vector<std::string> unfrozen;       // full fine-tuning: names unfrozen by unfrozen_parameters
  ParamStats stats;
};
// adapter: lora -> lora_model_dir ? load_adapter(trainable) : apply_lora; no adapter -> full
// fine-tuning (all trainable, or only unfrozen_parameters). Refuses adapters not implemented.
// Prints trainable statistics.
TrainingSetup prepare_for_training(model::TransformerImpl& model, const config::Recipe& recipe, uint64_t seed);
// What the sft stage calls at save time: save_adapter(model, *setup.lora, dir) for LoRA runs,
// model::save_pretrained otherwise.
void save_trained(model::TransformerImpl& model, const TrainingSetup& setup, const fs::path& dir,
                  std::optional<torch::ScalarType> dtype = std::nullopt);

}  // namespace llmtune::peft
