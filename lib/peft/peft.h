// llmtune::peft — parameter-efficient fine-tuning on top of llmtune::model: LoRA/rsLoRA wrappers
// installed through TransformerImpl::replace_linear, target selection and freezing (adapters,
// modules_to_save, Axolotl `unfrozen_parameters`), and PEFT-compatible adapter files
// (adapter_config.json + adapter_model.safetensors) in both directions, plus merging into dense
// weights. LoRA/rsLoRA/DoRA, IA3, BitFit, prompt tuning, prefix tuning and bottleneck adapters
// (one registry in config.cpp; AdapterConfig + *_any_adapter dispatch on the method). Bottleneck
// and BitFit have no PEFT type: they use llmtune's own documented layout (peft_type "BOTTLENECK" /
// "BITFIT"). fan_in_fan_out, rank_pattern/alpha_pattern are refused.
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
  bool use_dora = false;  // DoRA: adds lora_magnitude_vector per wrapped linear (dora.cpp)
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
  bool disabled = false;  // true: forward is base_layer(x) only (set through DisabledAdapters)

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

  // DoRA (dora.cpp). enable_dora registers `lora_magnitude_vector` [out] (fp32) initialised to the
  // row norms of W + scaling*B A; then forward is base(x) + (s-1) x W^T + s*B A x*scaling with
  // s = m / ||W + scaling*(B A).detach()||_row (the norm detached), as PEFT's DoraLinearLayer.
  void enable_dora();
  bool is_dora() const { return lora_magnitude_vector.defined(); }
  torch::Tensor dora_forward(const torch::Tensor& x);
  torch::Tensor dora_weight_norm() const;  // [out] fp32, no grad
  torch::Tensor lora_magnitude_vector;
};
using LoraLinear = std::shared_ptr<LoraLinearImpl>;

// PEFT's `with model.disable_adapter():` for LoRA/DoRA: while alive, every LoRA wrapper in `model`
// (stacked ones too) computes its base layer only, so the same weights give the adapter-free model
// (the frozen reference of preference training) without a second copy. Restores the previous flags.
class DisabledAdapters {
 public:
  explicit DisabledAdapters(torch::nn::Module& model);
  ~DisabledAdapters();
  DisabledAdapters(const DisabledAdapters&) = delete;
  DisabledAdapters& operator=(const DisabledAdapters&) = delete;
  size_t count() const { return saved_.size(); }  // wrappers switched off

 private:
  std::vector<std::pair<LoraLinear, bool>> saved_;
};

// ---------------------------------------------------------------------------------------------
// IA3 (ia3.cpp, formats.md §5.4): learned vectors `ia3_l` scaling a linear's output ([out, 1]) or,
// for feed-forward modules, its input ([1, in]). fp32 vectors, initialised to 1.

struct Ia3Config {
  std::vector<std::string> target_modules;       // default (Llama): k_proj, v_proj, down_proj
  std::vector<std::string> feedforward_modules;  // default: down_proj (must be a subset of targets)
  std::string base_model_name_or_path;
  bool inference_mode = false;
  static Ia3Config from_recipe(const config::Recipe& recipe);
  nlohmann::json to_adapter_json() const;
  static Ia3Config from_adapter_json(const nlohmann::json& j, const std::string& source);
};

class Ia3LinearImpl : public model::LinearBaseImpl {
 public:
  Ia3LinearImpl(model::LinearPtr base, bool feedforward);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return base_layer->in_features(); }
  int64_t out_features() const override { return base_layer->out_features(); }
  model::LinearPtr merge() const;  // dense copy with W * l (rows or columns; bias scaled for non-ff)
  model::LinearPtr base_layer;
  torch::Tensor ia3_l;
  bool feedforward;
};

// ---------------------------------------------------------------------------------------------
// Prompt tuning and prefix tuning (prompt.cpp): the model's VirtualTokens hook.

struct PromptConfig {
  bool prefix = false;  // PREFIX_TUNING (else PROMPT_TUNING)
  int64_t num_virtual_tokens = 20;
  int64_t token_dim = 0, num_layers = 0, num_attention_heads = 0;  // as PEFT derives them (GQA: kv heads)
  std::string init_text;              // prompt tuning TEXT init ("" = RANDOM)
  std::string tokenizer_name_or_path;
  bool prefix_projection = false;
  int64_t encoder_hidden_size = 0;
  std::string base_model_name_or_path;
  // Fills token_dim / num_layers / num_attention_heads from the model (PEFT's rules).
  void derive_sizes(const model::ModelConfig& mc);
  static PromptConfig from_recipe(const config::Recipe& recipe, bool prefix);
  nlohmann::json to_adapter_json() const;
  static PromptConfig from_adapter_json(const nlohmann::json& j, const std::string& source);
};

// Prompt tuning: `embedding` [N, C] prepended to the input embeddings.
class PromptEmbeddingImpl : public model::VirtualTokensImpl {
 public:
  PromptEmbeddingImpl(int64_t n, int64_t dim, torch::TensorOptions o);
  int64_t num_virtual_tokens() const override { return embedding.size(0); }
  torch::Tensor input_embeddings() override { return embedding; }
  torch::Tensor embedding;
};

// Prefix tuning: `embedding` [N, L*2*Hkv*D] directly, or (prefix_projection) embedding [N, token_dim]
// through Linear-Tanh-Linear. prompt_embeddings() is what PEFT saves (always the projected form).
class PrefixEncoderImpl : public model::VirtualTokensImpl {
 public:
  PrefixEncoderImpl(const PromptConfig& cfg, torch::TensorOptions o);
  int64_t num_virtual_tokens() const override { return embedding.size(0); }
  std::vector<std::pair<torch::Tensor, torch::Tensor>> key_values() override;
  torch::Tensor prompt_embeddings();  // [N, L*2*token_dim]
  torch::Tensor embedding;
  std::shared_ptr<model::DenseLinearImpl> transform_0, transform_2;  // set with prefix_projection
  int64_t layers, heads, head_dim;
};

// ---------------------------------------------------------------------------------------------
// BitFit (bitfit.cpp): only biases of the targeted linears train; absent biases are added as zeros.
struct BitFitConfig {
  std::vector<std::string> target_modules;  // default: every linear except lm_head
  std::string base_model_name_or_path;
  static BitFitConfig from_recipe(const config::Recipe& recipe);
  nlohmann::json to_adapter_json() const;
  static BitFitConfig from_adapter_json(const nlohmann::json& j, const std::string& source);
};

// ---------------------------------------------------------------------------------------------
// Bottleneck adapters (bottleneck.cpp): y + up(act(down(y))) on attention and/or MLP outputs
// (Houlsby placement). up is zero-initialised so a fresh adapter is the identity.
struct BottleneckConfig {
  int64_t size = 64;
  std::string activation = "relu";  // relu | gelu | silu | tanh | identity
  bool attn = true, mlp = true;
  std::string base_model_name_or_path;
  static BottleneckConfig from_recipe(const config::Recipe& recipe);
  nlohmann::json to_adapter_json() const;
  static BottleneckConfig from_adapter_json(const nlohmann::json& j, const std::string& source);
};

class BottleneckAdapterImpl : public model::SublayerAdapterImpl {
 public:
  BottleneckAdapterImpl(int64_t dim, int64_t size, std::string activation, uint64_t seed);
  torch::Tensor forward(const torch::Tensor& y) override;
  std::shared_ptr<model::DenseLinearImpl> down_proj, up_proj;
  std::string activation;
};

// ---------------------------------------------------------------------------------------------
// Any method

struct AdapterConfig {
  std::string method;  // lora (DoRA: lora.use_dora) | ia3 | bitfit | prompt_tuning | prefix_tuning | bottleneck
  LoraConfig lora;
  Ia3Config ia3;
  PromptConfig prompt;
  BitFitConfig bitfit;
  BottleneckConfig bottleneck;
  std::string peft_type() const;
  std::string summary() const;  // one line for logs
  bool mergeable() const;       // lora/dora, ia3, bitfit, bottleneck with identity activation
};
AdapterConfig read_any_adapter_config(const fs::path& dir);
// Loads any supported adapter directory onto the model (LoRA/DoRA through load_adapter).
AdapterConfig load_any_adapter(model::TransformerImpl& model, const fs::path& dir, bool trainable = false);
void save_any_adapter(model::TransformerImpl& model, const AdapterConfig& cfg, const fs::path& dir,
                      std::optional<torch::ScalarType> dtype = std::nullopt);
// Installs a fresh adapter of `cfg.method` (not lora) and sets requires_grad: only its tensors train.
// `init_ids` are the token ids of prompt_tuning_init_text (prompt tuning TEXT init), else random.
void apply_method(model::TransformerImpl& model, AdapterConfig& cfg, uint64_t seed,
                  const std::vector<int64_t>& init_ids = {});

// Per-method pieces (used by the dispatchers; public for tests).
std::vector<std::string> apply_ia3(model::TransformerImpl& model, const Ia3Config& cfg);
std::vector<std::string> ia3_modules(const model::TransformerImpl& model);
std::vector<std::string> apply_bitfit(model::TransformerImpl& model, const BitFitConfig& cfg);  // returns bias names
void apply_bottleneck(model::TransformerImpl& model, const BottleneckConfig& cfg, uint64_t seed);
void apply_prompt(model::TransformerImpl& model, PromptConfig& cfg, uint64_t seed, const std::vector<int64_t>& init_ids = {});
// BitFit merge: make the config's attention_bias / mlp_bias match the biases present (adding zero
// biases to the other linears of a group) so save_pretrained writes a checkpoint transformers loads.
void bitfit_normalize_biases(model::TransformerImpl& model);

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

// Replaces every LoRA/DoRA and IA3 wrapper with a plain DenseLinear holding the merged weight
// (computed in fp32, cast to the base dtype), folds identity-activation bottleneck adapters into
// o_proj / down_proj and makes BitFit biases loadable, so model::save_pretrained works. Refuses
// prompt/prefix tuning and non-linear bottleneck adapters (not mergeable), naming them.
void merge_all(model::TransformerImpl& model);
// load_adapter for each dir in order, then merge_all.
void merge_adapters(model::TransformerImpl& model, const std::vector<fs::path>& dirs);

// ---------------------------------------------------------------------------------------------
// QLoRA (qlora.cpp): LoRA over quantized bases (quant::Linear4bit / Linear8bit).

bool has_quantized_base(const model::TransformerImpl& model);
// Device holding a linear's weights (dense, wrapped or quantized; CPU if it has none).
torch::Device linear_device(const model::LinearPtr& m);
// Replaces every quantized linear (bare, or the base inside LoRA wrappers) by a dense linear with
// its dequantized weight in `dtype` (default: the layer's compute dtype). Returns the count.
int64_t dequantize_bases(model::TransformerImpl& model, std::optional<torch::ScalarType> dtype = std::nullopt);
// Writes DIR/llmtune_qlora.json (quant::BaseRecord) when the model has quantized bases; no-op otherwise.
void write_qlora_record(model::TransformerImpl& model, const std::string& base_model, const fs::path& dir);

// ---------------------------------------------------------------------------------------------
// Training entry point for the sft stage

struct TrainingSetup {
  std::optional<LoraConfig> lora;          // set when the recipe trains a LoRA adapter
  std::optional<AdapterConfig> adapter;    // set for the other methods (ia3, bitfit, prompt/prefix, bottleneck)
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
