// llmtune::config — Axolotl-style YAML recipes parsed once into typed structs and validated
// up front. Key names follow Axolotl wherever Axolotl has the concept; llmtune-only keys are
// marked "(llmtune)". The key registry (name, type, default, help, status) lives in schema.cpp.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace llmtune::config {

// `bf16: true | false | auto` (auto = use bf16 if the device supports it).
enum class Tristate { off, on, automatic };

using StrMap = std::map<std::string, std::string>;
using RolesMap = std::map<std::string, std::vector<std::string>>;

// One entry of `datasets:` / `test_datasets:` / `pretraining_dataset:`. Defaults in comments.
// `type` names a prompt strategy (alpaca, completion, chat_template, chatml.intel, ...);
// the data module validates it. A `type:` given as a map (Axolotl's custom prompt format)
// becomes type "user_defined" plus the format fields below.
struct DatasetConfig {
  std::optional<std::string> path;          // required: hub id, local file or directory
  std::optional<std::string> type;          // prompt strategy
  std::string split = "train";
  std::optional<std::string> name;          // dataset config/subset name
  std::vector<std::string> data_files;      // files inside `path`
  std::optional<std::string> ds_type;       // json|jsonl|csv|parquet|text|arrow (guessed from extension)
  std::optional<std::string> revision;
  std::optional<int64_t> shards;            // split into N shards...
  std::optional<int64_t> shards_idx;        // ...and keep this one
  std::optional<bool> preprocess_shards;    // accepted, no effect
  std::optional<bool> trust_remote_code;    // accepted, no effect
  // chat_template strategy
  std::string field_messages = "messages";
  StrMap message_property_mappings = {{"content", "content"}, {"role", "role"}};
  std::optional<std::string> message_field_training;
  std::optional<std::string> message_field_training_detail;
  RolesMap roles;                           // canonical role -> source role names; empty = identity
  std::vector<std::string> roles_to_train = {"assistant"};
  std::string train_on_eos = "turn";        // all|turn|last|none
  std::optional<std::string> train_on_eot;  // default: train_on_eos
  std::optional<std::string> chat_template; // overrides the top-level chat_template
  std::optional<std::string> chat_template_jinja;
  bool drop_system_message = false;
  std::optional<std::string> field_chosen;    // preference data (chat_template.default)
  std::optional<std::string> field_rejected;
  std::optional<std::string> field_prompt;      // preference/RL data: prompt (string or messages), default "prompt"
  std::optional<std::string> field_margin;      // reward data: Bradley-Terry margin column, default "margin" if present
  std::optional<std::string> field_completion;  // KTO unpaired data: completion, default "completion"
  std::optional<std::string> field_label;       // KTO unpaired data: desirable (bool), default "label"
  std::vector<std::string> filters;             // (llmtune) keep records matching every `field op value`
  // instruction formats (alpaca & user_defined)
  std::optional<std::string> field_system;
  std::optional<std::string> field_instruction;
  std::optional<std::string> field_input;
  std::optional<std::string> field_output;
  std::optional<std::string> system_prompt;
  std::optional<std::string> system_format;
  std::optional<std::string> format;
  std::optional<std::string> no_input_format;
  // completion / pretraining text
  std::string field = "text";
  std::optional<std::string> text_column;   // pretraining_dataset: column with the text
  std::string text_split = "line";          // (llmtune) .txt files: line|paragraph|file
  double weight = 1.0;                      // (llmtune) share of each epoch: 0.5 = half, 2 = twice
  bool operator==(const DatasetConfig&) const = default;
};

// `trl:` section: TRL config names for the online RL stages (GRPO as in Axolotl, PPO llmtune).
struct TrlConfig {
  std::optional<double> beta;                    // GRPO KL coefficient (TRL default 0.04)
  std::optional<int64_t> max_completion_length;  // GRPO (default 256)
  std::optional<int64_t> num_generations;        // GRPO group size (default 8)
  std::vector<std::string> reward_funcs;         // GRPO reward functions / reward model paths
  std::vector<double> reward_weights;
  std::optional<double> temperature;             // sampling (default 1.0 grpo, 0.7 ppo)
  std::optional<bool> use_vllm;                  // accepted, no effect
  std::optional<bool> log_completions;           // accepted, no effect
  std::optional<std::string> reward_model_path;  // PPO: trained reward model (llmtune reward output)
  int64_t num_ppo_epochs = 4;
  int64_t num_mini_batches = 1;
  double kl_coef = 0.05;
  double cliprange = 0.2;
  double cliprange_value = 0.2;
  double vf_coef = 0.1;
  double gamma = 1.0;
  double lam = 0.95;
  bool whiten_rewards = false;
  int64_t response_length = 53;
  std::optional<double> missing_eos_penalty;
  double top_p = 1.0;                            // (llmtune) nucleus sampling for rollouts
  bool adaptive_kl = false;                      // PPO: adaptive KL controller (Ziegler et al.)
  double target_kl = 6.0;                        // PPO: its target KL per sequence
  double kl_horizon = 10000;                     // PPO: its horizon (in rollout samples)
  std::optional<std::string> reward_pattern;     // regex reward: pattern ({answer} = reference answer)
  bool operator==(const TrlConfig&) const = default;
};

// Where a recipe came from; deliberately not part of a recipe's value (always compares equal).
struct SourceInfo {
  std::string name;  // file path or "<string>"
  bool operator==(const SourceInfo&) const { return true; }
};

// A whole recipe. Every key of the registry that has a meaning in llmtune (or is accepted as a
// no-op) has a field here. Dependent defaults (eval_batch_size, eval_sample_packing,
// train_on_eot, zero_stage from deepspeed) are filled in by parsing.
struct Recipe {
  SourceInfo source;
  // --- model ---
  std::optional<std::string> base_model;
  std::optional<std::string> base_model_config;
  std::optional<std::string> revision_of_model;
  std::optional<std::string> tokenizer_config;
  std::optional<std::string> tokenizer_type;       // no-op
  std::optional<bool> tokenizer_use_fast;          // no-op
  std::optional<bool> tokenizer_legacy;            // no-op
  std::optional<std::string> model_type;           // no-op
  bool trust_remote_code = false;                  // no-op
  std::optional<bool> is_llama_derived_model;      // no-op
  std::optional<bool> is_mistral_derived_model;    // no-op
  std::optional<bool> is_qwen_derived_model;       // no-op
  std::optional<bool> is_falcon_derived_model;     // no-op
  bool resize_token_embeddings_to_32x = false;
  bool mean_resizing_embeddings = false;
  bool random_init_weights = false;                // pretrain: fresh random weights of base_model's config.json shape
  std::optional<nlohmann::json> model_config;      // (llmtune) config.json keys for a fresh model (over base_model_config)
  // --- tokens and templates ---
  StrMap special_tokens;
  std::vector<std::string> tokens;
  std::vector<std::string> eot_tokens;
  std::optional<std::string> chat_template;
  std::optional<std::string> chat_template_jinja;
  std::optional<std::string> default_system_message;
  // --- data ---
  std::vector<DatasetConfig> datasets;
  std::vector<DatasetConfig> test_datasets;
  std::vector<DatasetConfig> pretraining_dataset;
  bool pretraining_document_mask = false;          // (llmtune) pretrain: no attention across documents in a window
  std::optional<nlohmann::json> filters;           // (llmtune) pretrain: document filters {min_chars, dedup, near_dedup, language, perplexity...}
  std::optional<std::string> dataset_prepared_path;
  bool shuffle_merged_datasets = true;
  std::optional<int64_t> dataset_shard_num;
  std::optional<int64_t> dataset_shard_idx;
  double val_set_size = 0.0;
  int64_t sequence_len = 512;
  std::optional<int64_t> max_prompt_len;
  std::string excess_length_strategy = "drop";
  int64_t min_sample_len = 2;
  bool skip_invalid = false;                       // (llmtune) skip malformed records instead of failing
  bool sample_packing = false;
  std::optional<bool> eval_sample_packing;         // default: sample_packing
  bool pad_to_sequence_len = false;
  bool train_on_inputs = false;
  bool group_by_length = false;
  std::optional<int64_t> dataset_processes;        // no-op
  std::optional<int64_t> dataset_num_proc;         // no-op
  std::optional<std::string> push_dataset_to_hub;  // no-op
  std::optional<bool> hf_use_auth_token;           // no-op
  std::optional<double> sample_packing_eff_est;    // no-op
  std::optional<int64_t> sample_packing_group_size;  // no-op
  std::optional<int64_t> sample_packing_bin_size;    // no-op
  std::optional<int64_t> dataloader_num_workers;   // no-op
  std::optional<bool> dataloader_pin_memory;       // no-op
  std::optional<int64_t> dataloader_prefetch_factor;  // no-op
  std::optional<bool> dataloader_drop_last;        // no-op
  std::optional<bool> remove_unused_columns;       // no-op
  std::optional<bool> skip_prepare_dataset;        // no-op
  // --- adapter ---
  std::optional<std::string> adapter;              // lora|qlora|ia3|bitfit|prompt_tuning|prefix_tuning|bottleneck
  std::optional<std::string> lora_model_dir;
  int64_t lora_r = 8;
  int64_t lora_alpha = 8;
  double lora_dropout = 0.0;
  std::vector<std::string> lora_target_modules;
  bool lora_target_linear = false;
  std::vector<std::string> lora_modules_to_save;
  bool lora_fan_in_fan_out = false;                // refused when true
  bool peft_use_dora = false;
  bool peft_use_rslora = false;
  std::optional<double> loraplus_lr_ratio;
  std::optional<double> loraplus_lr_embedding;
  int64_t num_virtual_tokens = 20;                 // (llmtune) prompt/prefix tuning
  std::vector<std::string> ia3_feedforward_modules;  // (llmtune)
  std::string prompt_tuning_init_text;              // (llmtune) prompt tuning: init from this text's embeddings
  bool prefix_projection = false;                  // (llmtune) prefix tuning: PEFT's reparameterisation MLP
  int64_t prefix_encoder_hidden_size = 0;          // (llmtune) prefix MLP width; 0 = PEFT's default (token_dim)
  int64_t bottleneck_size = 64;                    // (llmtune) bottleneck adapters: inner width
  std::string bottleneck_activation = "relu";      // (llmtune) relu | gelu | silu | tanh | identity (identity = mergeable)
  std::vector<std::string> unfrozen_parameters;
  std::optional<bool> lora_on_cpu;                 // no-op
  std::optional<bool> lora_mlp_kernel;             // no-op
  std::optional<bool> lora_qkv_kernel;             // no-op
  std::optional<bool> lora_o_kernel;               // no-op
  // --- quantization ---
  bool load_in_4bit = false;
  bool load_in_8bit = false;                       // int8 per-row absmax frozen base (LoRA)
  std::string bnb_4bit_quant_type = "nf4";
  std::string bnb_4bit_compute_dtype = "bfloat16";
  bool bnb_4bit_use_double_quant = true;
  bool gptq = false;                               // refused when true
  std::optional<nlohmann::json> bnb_config_kwargs; // folded into the bnb_4bit_* keys, then cleared
  // --- optimization ---
  int64_t micro_batch_size = 1;
  int64_t gradient_accumulation_steps = 1;
  std::optional<int64_t> eval_batch_size;          // default: micro_batch_size
  double num_epochs = 1.0;
  std::optional<int64_t> max_steps;
  double learning_rate = 5e-5;
  std::string lr_scheduler = "cosine";
  std::optional<double> cosine_min_lr_ratio;
  std::optional<double> min_lr;                    // (llmtune) absolute floor
  std::optional<int64_t> warmup_steps;
  std::optional<double> warmup_ratio;
  std::string optimizer = "adamw_torch";
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  std::optional<double> neftune_noise_alpha;
  int64_t seed = 42;
  std::optional<double> loss_watchdog_threshold;
  std::optional<int64_t> loss_watchdog_patience;
  std::optional<int64_t> early_stopping_patience;
  // --- precision and memory ---
  Tristate bf16 = Tristate::off;
  bool fp16 = false;
  bool tf32 = false;                               // no-op
  bool gradient_checkpointing = false;
  std::optional<nlohmann::json> gradient_checkpointing_kwargs;  // no-op
  std::optional<bool> torch_compile;               // no-op
  int64_t loss_chunk_tokens = 256;                 // llmtune: rows of logits alive at once in the loss
  // --- attention and kernels (all no-ops: llmtune picks its own kernels) ---
  std::optional<bool> flash_attention;
  std::optional<bool> sdp_attention;
  std::optional<bool> xformers_attention;
  std::optional<bool> flex_attention;
  std::optional<std::string> attn_implementation;
  std::optional<bool> flash_attn_cross_entropy;
  std::optional<bool> flash_attn_rms_norm;
  std::optional<bool> flash_attn_fuse_qkv;
  std::optional<bool> flash_attn_fuse_mlp;
  std::optional<bool> flash_optimum;
  std::optional<bool> unsloth_cross_entropy_loss;
  std::optional<bool> unsloth_rms_norm;
  std::optional<bool> unsloth_rope;
  std::optional<bool> unsloth_lora_mlp;
  std::optional<bool> unsloth_lora_qkv;
  std::optional<bool> unsloth_lora_o;
  std::vector<std::string> plugins;
  std::optional<bool> liger_rope;
  std::optional<bool> liger_rms_norm;
  std::optional<bool> liger_glu_activation;
  std::optional<bool> liger_layer_norm;
  std::optional<bool> liger_fused_linear_cross_entropy;
  std::optional<bool> cut_cross_entropy;
  // --- evaluation, saving, logging ---
  std::optional<std::string> eval_strategy;        // no|steps|epoch
  std::optional<double> eval_steps;                // steps, or a fraction of total steps if < 1
  std::optional<int64_t> evals_per_epoch;
  std::vector<std::string> eval_tasks;             // (llmtune) eval tasks run after training
  std::optional<std::string> save_strategy;        // no|steps|epoch
  std::optional<double> save_steps;
  std::optional<int64_t> saves_per_epoch;
  std::optional<int64_t> save_total_limit;
  bool save_safetensors = true;                    // refused when false
  std::optional<int64_t> logging_steps;            // default: max(1, min(10, 0.5% of steps))
  std::string output_dir = "./model-out";
  std::optional<std::string> resume_from_checkpoint;
  bool auto_resume_from_checkpoints = false;
  std::optional<int64_t> eval_table_size;          // no-op
  std::optional<int64_t> eval_max_new_tokens;      // no-op
  std::optional<bool> use_tensorboard;             // no-op
  std::optional<bool> include_tokens_per_second;   // no-op
  std::optional<bool> debug;                       // no-op
  bool strict = false;                             // no-op
  std::optional<std::string> wandb_project;        // no-ops from here to hub_private_repo
  std::optional<std::string> wandb_entity;
  std::optional<std::string> wandb_name;
  std::optional<nlohmann::json> wandb_watch;
  std::optional<nlohmann::json> wandb_log_model;
  std::optional<std::string> wandb_mode;
  std::optional<std::string> wandb_run_id;
  std::optional<std::string> mlflow_tracking_uri;
  std::optional<std::string> mlflow_experiment_name;
  std::optional<std::string> mlflow_run_name;
  std::optional<bool> hf_mlflow_log_artifacts;
  std::optional<std::string> hub_model_id;
  std::optional<std::string> hub_strategy;
  std::optional<bool> hub_private_repo;
  // --- preference and RL stages ---
  std::optional<std::string> rl;                   // dpo|ipo|kto|orpo|simpo|grpo|ppo
  double rl_beta = 0.1;                            // alias: dpo_beta
  std::optional<std::string> dpo_loss_type;        // sigmoid|hinge|ipo|robust (default from rl)
  double dpo_label_smoothing = 0.0;
  std::optional<double> rpo_alpha;
  double simpo_gamma = 0.5;
  double cpo_alpha = 1.0;
  std::optional<double> orpo_alpha;
  double kto_desirable_weight = 1.0;
  double kto_undesirable_weight = 1.0;
  bool precompute_ref_log_probs = false;
  bool reward_model = false;
  std::optional<int64_t> num_labels;
  std::optional<double> center_rewards_coefficient;
  TrlConfig trl;
  // --- distributed ---
  std::optional<nlohmann::json> deepspeed;         // path or inline dict; only the ZeRO stage is used
  std::vector<std::string> fsdp;                   // full_shard, auto_wrap, offload, ...
  std::optional<nlohmann::json> fsdp_config;
  std::optional<int64_t> zero_stage;               // (llmtune) 0..3; default from deepspeed
  std::optional<std::string> ddp_backend;          // nccl|gloo (default: nccl on CUDA, gloo on CPU)
  std::optional<int64_t> ddp_timeout;              // seconds
  std::optional<int64_t> ddp_bucket_cap_mb;        // no-op
  std::optional<bool> ddp_broadcast_buffers;       // no-op
  std::optional<bool> ddp_find_unused_parameters;  // no-op
  std::optional<int64_t> local_rank;               // no-op (the launcher sets LOCAL_RANK)

  bool operator==(const Recipe&) const = default;
};

// --- the key registry -------------------------------------------------------------------
enum class KeyStatus { implemented, accepted_noop, refused, alias };
std::string_view to_string(KeyStatus status);

struct KeyInfo {
  std::string section;        // "" (top level), "datasets[]" (also test_datasets, pretraining_dataset), "trl"
  std::string name;           // key name inside its section
  std::string group;          // model, data, adapter, quantization, ... (for printing)
  std::string type;           // "int", "float", "bool", "bool|auto", "string", "list of strings", ...
  std::string default_value;  // YAML text ("null" = unset; "= micro_batch_size" = derived)
  std::string help;           // one line
  KeyStatus status;
  std::string note;           // no-op: why; refused: reason; alias: the canonical key
  std::vector<std::string> choices;  // allowed values for enum-like strings
};
// Every key llmtune knows, in print order: top level, then datasets[] entries, then trl.
const std::vector<KeyInfo>& recipe_keys();
// The table as text for `llmtune inspect --keys`.
std::string format_recipe_keys();

// --- loading ----------------------------------------------------------------------------
// Parses, applies `--set key=value` overrides, fills dependent defaults, checks types,
// unknown keys, contradictions and refused keys; throws llmtune::Error naming file:line:col.
// Notices for accepted no-op keys go to llmtune::log::notice and, if given, to *notices.
Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides = {},
                   std::vector<std::string>* notices = nullptr);
Recipe parse_recipe(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {},
                    std::vector<std::string>* notices = nullptr);
// `--set` on an already-loaded recipe (re-validated as a whole).
Recipe apply_overrides(const Recipe& recipe, const std::vector<std::string>& overrides,
                       std::vector<std::string>* notices = nullptr);

// Stage-specific checks (required keys, rl kind): stage is one of recipe_stages().
void validate_for_stage(const Recipe& recipe, std::string_view stage);
const std::vector<std::string>& recipe_stages();  // pretrain sft dpo reward ppo

// The resolved recipe as YAML with every default filled in; parse_recipe(recipe_to_yaml(r))
// == r. No-op keys are printed only when set; refused keys never (they cannot be set).
std::string recipe_to_yaml(const Recipe& recipe);
// Writes recipe_to_yaml to output_dir/recipe.resolved.yaml (via a temp file + rename).
void save_resolved(const Recipe& recipe, const std::filesystem::path& output_dir);

}  // namespace llmtune::config
