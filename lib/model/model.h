// llmtune::model — the Llama-family decoder (Llama 1/2/3, TinyLlama, SmolLM, Mistral, Qwen2) in one
// definition: config.json parsing, the transformer with HF parameter names, KV cache, loading/saving
// HF checkpoints, generation and the chunked causal-LM loss. Shapes: B batch, T time, C hidden,
// H heads, D head dim, V vocab. CPU and CUDA both work; numerics follow transformers' eager path.
#pragma once
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace llmtune::model {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Configuration (formats.md §2.1, §2.4, §2.5)

// RoPE settings, normalised from either transformers-v5 `rope_parameters` or legacy
// `rope_theta` + `rope_scaling` (`rope_type` or `type`).
struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | llama3 | yarn | longrope
  double theta = 10000.0;
  std::optional<double> factor;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;      // llama3
  std::optional<int64_t> original_max_position_embeddings;   // llama3, yarn, longrope
  std::optional<double> attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim;  // yarn, longrope
  bool truncate = true;                                      // yarn
  std::vector<double> short_factor, long_factor;             // longrope
  // The dict transformers writes as `rope_parameters` (includes rope_theta and rope_type).
  nlohmann::json to_json() const;
};

struct ModelConfig {
  std::string model_type = "llama";  // llama | mistral | qwen2
  std::vector<std::string> architectures;
  int64_t vocab_size = 32000, hidden_size = 4096, intermediate_size = 11008;
  int64_t num_hidden_layers = 32, num_attention_heads = 32, num_key_value_heads = 32, head_dim = 128;
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;
  RopeConfig rope;
  bool attention_bias = false;  // llama: bias on q,k,v and o
  bool mlp_bias = false;        // llama: bias on gate/up/down
  bool qkv_bias = false;        // derived: attention_bias (llama) or always (qwen2)
  bool o_bias = false;          // derived: attention_bias (llama); never for mistral/qwen2
  bool tie_word_embeddings = false;
  std::optional<int64_t> sliding_window;  // effective window (mistral; qwen2 only when use_sliding_window)
  std::vector<bool> layer_sliding;        // per layer: does this layer use the sliding window
  std::optional<int64_t> bos_token_id, pad_token_id;
  std::vector<int64_t> eos_token_ids;  // config may hold an int or a list
  std::string dtype = "float32";       // storage dtype named by torch_dtype (v4) / dtype (v5)
  nlohmann::json raw;                  // the parsed file, kept so to_json() preserves unknown keys

  // Throws llmtune::Error naming `source` and the key for anything missing, mistyped or unsupported.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source = "config.json");
  static ModelConfig from_file(const fs::path& path);
  // What transformers (v4 and v5) reads back: architectures, model_type, sizes, both rope spellings,
  // both dtype spellings, family-specific keys.
  nlohmann::json to_json() const;
  torch::ScalarType torch_dtype() const;  // `dtype` as a ScalarType (float32 if unknown)
  bool is_sliding(int64_t layer) const { return sliding_window && layer_sliding.at(layer); }
};

// ---------------------------------------------------------------------------------------------
// Linear layers: one interface, one factory, replaceable by HF module name.
//
// Rule for wrappers (PEFT, quantization): `replace_linear("model.layers.3.self_attn.q_proj", m)`
// re-registers `m` under the same child name, so m's own parameters appear as
// `model.layers.3.self_attn.q_proj.<m's names>`. A LoRA wrapper that keeps the original as child
// "base_layer" and adds "lora_A"/"lora_B" children therefore yields
// `...q_proj.base_layer.weight`, `...q_proj.lora_A.weight` — the live-module names PEFT uses.
// save_pretrained refuses non-dense linears (merge or dequantize first).
class LinearBaseImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;  // [..., in] -> [..., out]
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
};
using LinearPtr = std::shared_ptr<LinearBaseImpl>;

// Plain y = x W^T + b with HF parameter names `weight` [out, in] and optional `bias` [out].
class DenseLinearImpl : public LinearBaseImpl {
 public:
  DenseLinearImpl(int64_t in, int64_t out, bool bias, torch::TensorOptions options);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return weight.size(1); }
  int64_t out_features() const override { return weight.size(0); }
  torch::Tensor weight, bias;  // bias undefined when absent
};

struct LinearSpec {
  std::string name;  // HF module name, e.g. "model.layers.3.self_attn.q_proj" or "lm_head"
  int64_t in_features = 0, out_features = 0;
  bool bias = false;
  torch::TensorOptions options;
};
using LinearFactory = std::function<LinearPtr(const LinearSpec&)>;
LinearPtr make_dense_linear(const LinearSpec& spec);  // the default factory

// ---------------------------------------------------------------------------------------------
// KV cache: per layer K/V buffers [B, Hkv, capacity, D] grown by doubling, plus the key padding
// mask [B, length] so positions and masks stay right with left-padded batches.
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t batch, int64_t capacity, torch::TensorOptions options);
  int64_t length() const { return length_; }
  int64_t batch() const { return batch_; }
  // Writes K/V [B, Hkv, T, D] for `layer` at [length, length+T) and returns views of [0, length+T).
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, const torch::Tensor& k, const torch::Tensor& v);
  // Key validity for cached positions [B, length] (bool); appended by the model each forward.
  const torch::Tensor& key_mask() const { return key_mask_; }
  void append_mask(const torch::Tensor& mask_bt);  // called by the model after the layers ran
  void crop(int64_t length);                       // drop positions >= length
  void reset() { crop(0); }

 private:
  void reserve(int64_t needed);
  int64_t batch_, capacity_, length_ = 0, pending_ = 0;
  std::vector<torch::Tensor> k_, v_;
  torch::Tensor key_mask_;
};

// ---------------------------------------------------------------------------------------------
// Transformer

// ---------------------------------------------------------------------------------------------
// PEFT hooks (filled by llmtune::peft; absent = the plain model). Kept to two small interfaces so
// the forward pass stays readable.
//
// VirtualTokens: every sequence sees N extra leading positions, either as input embeddings (prompt
// tuning: [N, C], prepended before the first layer) or as per-layer key/value prefixes (prefix
// tuning: per layer (K, V) each [Hkv, N, D], placed in front of the keys, already "rotated").
// Real tokens then sit at positions N.., as in PEFT. They are added only when the KV cache is
// absent or empty (a cache keeps them after the first forward); hidden states of prompt-tuning
// positions are dropped from the output, so callers see [B, T, C] for T input tokens.
class VirtualTokensImpl : public torch::nn::Module {
 public:
  virtual int64_t num_virtual_tokens() const = 0;
  virtual torch::Tensor input_embeddings() { return {}; }                            // [N, C] or undefined
  virtual std::vector<std::pair<torch::Tensor, torch::Tensor>> key_values() { return {}; }  // per layer, or empty
};
using VirtualTokensPtr = std::shared_ptr<VirtualTokensImpl>;

// SublayerAdapter: maps a sublayer's output [B, T, C] before it is added to the residual stream
// (bottleneck adapters after attention and after the MLP).
class SublayerAdapterImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& y) = 0;
};
using SublayerAdapterPtr = std::shared_ptr<SublayerAdapterImpl>;

struct ForwardOptions {
  std::optional<torch::Tensor> position_ids;    // [B,T] int64; default: from attention mask / segments / arange
  std::optional<torch::Tensor> attention_mask;  // [B,T] 1 = token, 0 = padding (left or right)
  std::optional<torch::Tensor> segment_ids;     // [B,T] packed sequences: attend only within a segment
  std::optional<torch::Tensor> inputs_embeds;   // [B,T,C] replaces the embedding lookup (input_ids may be undefined)
  KVCache* cache = nullptr;                     // incremental decoding: reads and appends
  bool gradient_checkpointing = false;          // recompute each decoder layer in backward
};

// Per-forward tensors shared by every layer (computed once from positions and masks).
struct LayerInputs {
  torch::Tensor cos, sin;                 // [B,T,D] in activation dtype
  torch::Tensor mask_full, mask_sliding;  // [B,1,T,Tk] bool (true = attend), undefined -> see is_causal
  bool causal_full = false, causal_sliding = false;  // use SDPA's is_causal instead of a mask
  KVCache* cache = nullptr;
  // Prefix tuning without a cache: per layer (K, V) [B, Hkv, N, D] put in front of the keys.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> prefix;
};

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, torch::TensorOptions options);
  torch::Tensor forward(const torch::Tensor& x);  // fp32 normalise, cast back, times weight
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t vocab, int64_t dim, torch::TensorOptions options);
  torch::Tensor forward(const torch::Tensor& ids);
  torch::Tensor weight;  // [V, C]
};
TORCH_MODULE(Embedding);

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& c, int64_t layer, const std::string& prefix, const LinearFactory& f,
                torch::TensorOptions o);
  torch::Tensor forward(const torch::Tensor& x, const LayerInputs& in);
  LinearPtr q_proj, k_proj, v_proj, o_proj;
  int64_t layer, n_heads, n_kv_heads, head_dim;
  bool sliding;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(const ModelConfig& c, const std::string& prefix, const LinearFactory& f, torch::TensorOptions o);
  torch::Tensor forward(const torch::Tensor& x);  // down(silu(gate(x)) * up(x))
  LinearPtr gate_proj, up_proj, down_proj;
};
TORCH_MODULE(MLP);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const ModelConfig& c, int64_t layer, const LinearFactory& f, torch::TensorOptions o);
  torch::Tensor forward(const torch::Tensor& x, const LayerInputs& in);
  // PEFT bottleneck adapters on the attention / MLP outputs (registered as "attn_adapter" /
  // "mlp_adapter"; null removes).
  void set_adapters(SublayerAdapterPtr attn, SublayerAdapterPtr mlp);
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  SublayerAdapterPtr attn_adapter, mlp_adapter;
};
TORCH_MODULE(DecoderLayer);

// The `model.` prefix of HF names: embed_tokens, layers, norm.
class DecoderStackImpl : public torch::nn::Module {
 public:
  DecoderStackImpl(const ModelConfig& c, const LinearFactory& f, torch::TensorOptions o);
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<DecoderLayer> layer_list;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(DecoderStack);

class TransformerImpl : public torch::nn::Module {
 public:
  // Parameters are allocated uninitialised in `options` (dtype/device); call init_weights() for a
  // fresh model, or use load_pretrained(). `factory` builds every linear (default: dense).
  explicit TransformerImpl(ModelConfig config, torch::TensorOptions options = torch::kFloat,
                           LinearFactory factory = {});

  const ModelConfig& config() const { return config_; }
  // Final-normed hidden states [B,T,C]. input_ids [B,T] int64 (ignored if opts.inputs_embeds).
  torch::Tensor hidden_states(const torch::Tensor& input_ids, const ForwardOptions& opts = {});
  // [..., C] -> [..., V] in the model dtype (tied: embedding matrix; else the lm_head linear).
  torch::Tensor lm_head_logits(const torch::Tensor& hidden);
  // Convenience: logits [B,T,V] = lm_head_logits(hidden_states(input_ids, opts)).
  torch::Tensor forward(const torch::Tensor& input_ids, const ForwardOptions& opts = {});
  torch::Tensor embed(const torch::Tensor& input_ids);  // [B,T] -> [B,T,C]

  // Linear slots by HF module name: 7 per layer (q,k,v,o,gate,up,down) + "lm_head" when untied.
  std::vector<std::string> linear_names() const;
  LinearPtr get_linear(const std::string& name) const;  // throws Error (with did-you-mean) if unknown
  void replace_linear(const std::string& name, LinearPtr module);

  // normal(0, initializer_range) for embeddings/linears, zero biases, unit norms; seeded.
  void init_weights(uint64_t seed);
  // Parameters of the lm head used by the chunked loss (lm_head's, or the tied embedding).
  std::vector<torch::Tensor> lm_head_parameters();
  // Expected shape of a checkpoint tensor and the config fields that imply it, for messages.
  std::string shape_explanation(const std::string& tensor_name) const;
  // PEFT prompt/prefix tuning: registered as child "prompt_encoder" (null removes).
  void set_virtual_tokens(VirtualTokensPtr v);
  const VirtualTokensPtr& virtual_tokens() const { return virtual_tokens_; }
  // For PEFT merges that change the architecture flags (BitFit adds biases): edit, then keep the
  // modules consistent yourself.
  ModelConfig& mutable_config() { return config_; }
  // How the decoder layers are run. The default calls each layer (through checkpoint() when
  // gradient checkpointing is on). Fully sharded data parallelism (lib/dist) installs a runner
  // that gathers a layer's parameters around its forward and its recomputation in backward.
  // `checkpointed`: the caller asked for recompute-in-backward. Null restores the default.
  using LayerRunner = std::function<torch::Tensor(DecoderLayerImpl& layer, const torch::Tensor& x,
                                                  const LayerInputs& in, bool checkpointed)>;
  void set_layer_runner(LayerRunner runner) { layer_runner_ = std::move(runner); }
  bool has_layer_runner() const { return static_cast<bool>(layer_runner_); }

  DecoderStack decoder{nullptr};  // registered as "model" (HF prefix)

 private:
  LayerInputs prepare(int64_t B, int64_t T, torch::Device device, torch::ScalarType act_dtype,
                      const ForwardOptions& opts, torch::Tensor* new_key_mask, int64_t prefix_len = 0);
  ModelConfig config_;
  VirtualTokensPtr virtual_tokens_;
  LayerRunner layer_runner_;
  LinearPtr lm_head_;  // null when tied
  torch::Tensor inv_freq_;  // [D/2] fp32 for the configured rope (non-dynamic part)
  double attention_scaling_ = 1.0;
  struct Slot {
    torch::nn::Module* parent;
    std::string child;
    LinearPtr* member;
  };
  std::vector<std::pair<std::string, Slot>> slots_;
};
TORCH_MODULE(Transformer);

// ---------------------------------------------------------------------------------------------
// Loading and saving HF checkpoints

struct LoadOptions {
  torch::Device device = torch::kCPU;
  LinearFactory factory;  // modules it builds must expose HF-named `weight`/`bias` parameters
};
// Reads DIR/config.json and the safetensors weights (single or sharded) through io::CheckpointReader.
// Every expected tensor must exist with the right shape and every stored tensor must be used
// (`rotary_emb.inv_freq` ignored; a stored lm_head.weight is ignored when tied). dtype: kFloat,
// kBFloat16 or kHalf (stored tensors are converted).
Transformer load_pretrained(const fs::path& dir, torch::ScalarType dtype = torch::kFloat,
                            const LoadOptions& options = {});
// HF-named tensors for saving (tied lm_head omitted); refuses non-dense linears.
std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(TransformerImpl& model,
                                                                 std::optional<torch::ScalarType> dtype = {});
// Writes config.json, generation_config.json and model.safetensors (or shards + index).
void save_pretrained(TransformerImpl& model, const fs::path& dir, std::optional<torch::ScalarType> dtype = {},
                     int64_t max_shard_bytes = 5'000'000'000LL);

// ---------------------------------------------------------------------------------------------
// Generation

struct GenerationConfig {
  int64_t max_new_tokens = 128;
  bool do_sample = false;  // false: greedy
  double temperature = 1.0;
  int64_t top_k = 50;    // HF default; 0 disables
  double top_p = 1.0;    // 1 disables
  double repetition_penalty = 1.0;  // HF: over prompt+generated tokens, logit>0 divided, <0 multiplied
  std::vector<int64_t> eos_token_ids;  // stop when one is produced (it is returned, not streamed)
  std::optional<int64_t> pad_token_id;  // left padding for batches (default: pad, else eos, else 0)
  uint64_t seed = 0;
  // Defaults from the model config, then DIR/generation_config.json if it exists.
  static GenerationConfig from_model_dir(const fs::path& dir, const ModelConfig& config);
};
// Returns the generated tokens (prompt excluded; a final eos included). on_token is called for every
// generated non-eos token; returning false stops generation after that token.
std::vector<int64_t> generate(TransformerImpl& model, const std::vector<int64_t>& prompt_ids,
                              const GenerationConfig& config,
                              const std::function<bool(int64_t token)>& on_token = {});
// Several prompts at once, left-padded with an attention mask. on_token(row, token); returning false
// stops that row. Rows stop independently at eos.
std::vector<std::vector<int64_t>> generate_batch(
    TransformerImpl& model, const std::vector<std::vector<int64_t>>& prompts, const GenerationConfig& config,
    const std::function<bool(int64_t row, int64_t token)>& on_token = {});
// Applies repetition penalty, temperature, top-k, top-p (HF order and semantics) to logits [N,V] fp32.
torch::Tensor process_logits(const torch::Tensor& logits, const std::vector<std::vector<int64_t>>& seen,
                             const GenerationConfig& config);

// ---------------------------------------------------------------------------------------------
// Losses and log-probabilities, chunked over tokens so [B,T,V] fp32 logits never exist at once.

// Runs fn(inputs) without keeping its activations; backward recomputes it. Gradients flow to
// `inputs` and `params` (any that require grad). Used for gradient checkpointing and chunked losses.
torch::Tensor checkpoint(const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& fn,
                         const std::vector<torch::Tensor>& inputs, const std::vector<torch::Tensor>& params);

struct LossSum {
  torch::Tensor sum;     // scalar fp32, differentiable when hidden/head parameters require grad
  int64_t n_tokens = 0;  // labels != -100 after the shift
};
// HF causal-LM loss as a sum: position t predicts labels[t+1]; -100 ignored. hidden [B,T,C],
// labels [B,T]. The mean HF reports is sum / n_tokens. Chunks of `chunk_tokens` rows are recomputed
// in backward, so only one chunk's logits are alive at a time.
LossSum causal_lm_loss_sum(TransformerImpl& model, const torch::Tensor& hidden, const torch::Tensor& labels,
                           int64_t chunk_tokens = 1024);
// Same with any head: head(hidden_rows [N,C]) -> logits [N,V]; head_params receive gradients.
LossSum causal_lm_loss_sum(const std::function<torch::Tensor(const torch::Tensor&)>& head,
                           const std::vector<torch::Tensor>& head_params, const torch::Tensor& hidden,
                           const torch::Tensor& labels, int64_t chunk_tokens = 1024);
// log p(targets[b,t] | hidden[b,t]) as [B,T] fp32 (0 where target == -100); no shift applied.
torch::Tensor token_log_probs(TransformerImpl& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                              int64_t chunk_tokens = 1024);
// Evaluation: NLL summed over ids[:,1:] (masked by attention_mask if given), no grad.
LossSum sequence_nll(TransformerImpl& model, const torch::Tensor& input_ids,
                     const std::optional<torch::Tensor>& attention_mask = std::nullopt, int64_t chunk_tokens = 1024);

// ---------------------------------------------------------------------------------------------
// RoPE tables (exposed for tests and for modules that need them)

// inv_freq [D/2] fp32 and cos/sin scaling for `seq_len` (dynamic/longrope depend on it; pass 0
// for the init-time value).
std::pair<torch::Tensor, double> rope_inv_freq(const ModelConfig& config, int64_t seq_len = 0);

}  // namespace llmtune::model
