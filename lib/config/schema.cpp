// The recipe key registry: every key llmtune knows, one line each, with its member, help and
// status (implemented / accepted no-op / refused with a reason / alias). Defaults live in the
// struct initializers in config.h and are printed from a default-constructed struct.
#include <algorithm>

#include "config/schema_impl.h"

namespace llmtune::config::detail {
namespace {

using S = KeyStatus;

template <class T, class M>
Field<T> key(const char* group, const char* name, M T::*m, const char* help) {
  Field<T> f;
  f.name = name; f.member = Member<T>(m); f.group = group; f.help = help;
  return f;
}
template <class T, class M>
Field<T> noop(const char* group, const char* name, M T::*m, const char* help, const char* why) {
  Field<T> f = key<T>(group, name, m, help);
  f.status = S::accepted_noop; f.note = why;
  return f;
}
// Refused when set to anything but its default (the member exists so contradictions can be
// reported first, e.g. load_in_4bit with load_in_8bit).
template <class T, class M>
Field<T> refused_field(const char* group, const char* name, M T::*m, const char* help, const char* why) {
  Field<T> f = key<T>(group, name, m, help);
  f.status = S::refused; f.note = why;
  return f;
}
// Refused unless null/false/0/empty; no member.
template <class T>
Field<T> refused(const char* group, const char* name, const char* why) {
  Field<T> f;
  f.name = name; f.group = group; f.status = S::refused; f.note = why; f.help = "not implemented";
  return f;
}
template <class T>
Field<T> alias(const char* group, const char* name, const char* target) {
  Field<T> f;
  f.name = name; f.group = group; f.status = S::alias; f.note = target;
  f.help = std::string("alias of ") + target;
  return f;
}

using R = Recipe;
constexpr const char* kAttn = "llmtune chooses its attention kernel itself (SDPA-style on CPU and CUDA)";
constexpr const char* kKernel = "a fused-kernel switch of another toolkit; llmtune's kernels compute the same result";
constexpr const char* kWandb = "llmtune logs to output_dir/metrics.jsonl; it has no Weights & Biases integration";
constexpr const char* kMlflow = "llmtune logs to output_dir/metrics.jsonl; it has no MLflow integration";
constexpr const char* kHub = "llmtune never uploads to the Hugging Face Hub";
constexpr const char* kDerived = "llmtune reads the architecture from the model's config.json";
constexpr const char* kLoader = "a data-loader setting of the Python stack; llmtune's loader has no equivalent";
constexpr const char* kRelora = "ReLoRA (periodic LoRA merge-and-restart) is not implemented";
constexpr const char* kLisa = "LISA (layerwise importance sampling) is not implemented";

}  // namespace

const std::vector<Field<Recipe>>& recipe_fields() {
  static const std::vector<Field<Recipe>> t = {
      // --- model ---
      key("model", "base_model", &R::base_model, "HF hub id or local directory of the model to train (required by training stages)"),
      key("model", "base_model_config", &R::base_model_config, "where config.json lives when it differs from base_model"),
      key("model", "revision_of_model", &R::revision_of_model, "hub revision (branch, tag or commit) of base_model"),
      key("model", "tokenizer_config", &R::tokenizer_config, "directory or hub id of the tokenizer (default: base_model)"),
      noop("model", "tokenizer_type", &R::tokenizer_type, "transformers tokenizer class", "llmtune picks the tokenizer from tokenizer.json / tokenizer.model"),
      noop("model", "tokenizer_use_fast", &R::tokenizer_use_fast, "use the fast tokenizer", "llmtune has one tokenizer implementation"),
      noop("model", "tokenizer_legacy", &R::tokenizer_legacy, "sentencepiece legacy mode", "llmtune follows the tokenizer files as saved"),
      noop("model", "model_type", &R::model_type, "transformers model class", kDerived),
      noop("model", "trust_remote_code", &R::trust_remote_code, "allow running model code from the hub", "llmtune never runs model code from the hub"),
      noop("model", "is_llama_derived_model", &R::is_llama_derived_model, "architecture hint", kDerived),
      noop("model", "is_mistral_derived_model", &R::is_mistral_derived_model, "architecture hint", kDerived),
      noop("model", "is_qwen_derived_model", &R::is_qwen_derived_model, "architecture hint", kDerived),
      noop("model", "is_falcon_derived_model", &R::is_falcon_derived_model, "architecture hint", kDerived),
      key("model", "resize_token_embeddings_to_32x", &R::resize_token_embeddings_to_32x, "pad the vocabulary to a multiple of 32"),
      key("model", "mean_resizing_embeddings", &R::mean_resizing_embeddings, "initialize new token embeddings to the mean embedding"),
      key("model", "random_init_weights", &R::random_init_weights, "pretrain: start from random weights (shape from base_model_config / base_model config.json / model_config)"),
      key("model", "model_config", &R::model_config, "(llmtune) config.json keys for a fresh model, e.g. {hidden_size: 256, num_hidden_layers: 4}"),
      refused<R>("model", "rope_scaling", "overriding RoPE scaling from the recipe is not implemented; the model's config.json value is used"),
      refused<R>("model", "overrides_of_model_config", "overriding config.json values from the recipe is not implemented; edit a local copy of config.json"),
      // --- tokens and templates ---
      key("tokens", "special_tokens", &R::special_tokens, "override special tokens: {bos_token, eos_token, pad_token, unk_token}"),
      key("tokens", "tokens", &R::tokens, "extra tokens to add to the vocabulary"),
      key("tokens", "eot_tokens", &R::eot_tokens, "end-of-turn tokens for chat_template label masks (default: EOS plus the special token the chat template writes after an assistant turn, e.g. <|im_end|>)"),
      key("tokens", "chat_template", &R::chat_template, "chat template name (llama3, chatml, ...), tokenizer_default or jinja"),
      key("tokens", "chat_template_jinja", &R::chat_template_jinja, "a Jinja chat template (with chat_template: jinja)"),
      key("tokens", "default_system_message", &R::default_system_message, "system message inserted when a conversation has none"),
      // --- data ---
      key("data", "datasets", &R::datasets, "training datasets (list of entries; see datasets[] keys)"),
      key("data", "test_datasets", &R::test_datasets, "evaluation datasets (instead of val_set_size)"),
      key("data", "pretraining_dataset", &R::pretraining_dataset, "streamed raw-text datasets for pretraining"),
      key("data", "pretraining_document_mask", &R::pretraining_document_mask, "(llmtune) pretrain: windows keep documents apart (no attention across, positions restart)"),
      key("data", "filters", &R::filters, "(llmtune) pretrain document filters: min_chars, max_chars, dedup, near_dedup, language, perplexity"),
      key("data", "dataset_prepared_path", &R::dataset_prepared_path, "cache directory for the tokenized dataset"),
      key("data", "shuffle_merged_datasets", &R::shuffle_merged_datasets, "shuffle after merging datasets"),
      key("data", "dataset_shard_num", &R::dataset_shard_num, "split the merged dataset into N shards...").with_range(1, 1e18),
      key("data", "dataset_shard_idx", &R::dataset_shard_idx, "...and train on this shard").with_range(0, 1e18),
      key("data", "val_set_size", &R::val_set_size, "held-out fraction (< 1) or count (>= 1) of the training data for eval").with_range(0, 1e18),
      key("data", "sequence_len", &R::sequence_len, "maximum tokens per training sequence").with_range(1, 1e9),
      key("data", "max_prompt_len", &R::max_prompt_len, "preference stages: maximum prompt tokens").with_range(1, 1e9),
      key("data", "excess_length_strategy", &R::excess_length_strategy, "what to do with samples longer than sequence_len").with_choices({"drop", "truncate"}),
      key("data", "min_sample_len", &R::min_sample_len, "drop samples shorter than this many tokens").with_range(0, 1e9),
      key("data", "skip_invalid", &R::skip_invalid, "(llmtune) skip and count malformed records instead of failing"),
      key("data", "sample_packing", &R::sample_packing, "pack several samples into one sequence (no attention across samples)"),
      key("data", "eval_sample_packing", &R::eval_sample_packing, "pack eval samples").with_default_doc("= sample_packing"),
      key("data", "pad_to_sequence_len", &R::pad_to_sequence_len, "pad every batch to sequence_len"),
      key("data", "train_on_inputs", &R::train_on_inputs, "compute the loss on prompt tokens too"),
      key("data", "group_by_length", &R::group_by_length, "batch samples of similar length together"),
      noop("data", "dataset_processes", &R::dataset_processes, "tokenization processes", "llmtune tokenizes with its own thread pool"),
      noop("data", "dataset_num_proc", &R::dataset_num_proc, "tokenization processes", "llmtune tokenizes with its own thread pool"),
      noop("data", "push_dataset_to_hub", &R::push_dataset_to_hub, "hub repo for the prepared dataset", kHub),
      noop("data", "hf_use_auth_token", &R::hf_use_auth_token, "use the hub token", "llmtune reads HF_TOKEN from the environment when downloading"),
      noop("data", "sample_packing_eff_est", &R::sample_packing_eff_est, "packing efficiency estimate", "llmtune packs exactly and counts steps from the packed data"),
      noop("data", "sample_packing_group_size", &R::sample_packing_group_size, "multipack group size", "llmtune's packer has no group size"),
      noop("data", "sample_packing_bin_size", &R::sample_packing_bin_size, "multipack bin size", "llmtune's packer has no bin size"),
      noop("data", "dataloader_num_workers", &R::dataloader_num_workers, "loader workers", kLoader),
      noop("data", "dataloader_pin_memory", &R::dataloader_pin_memory, "pin loader memory", kLoader),
      noop("data", "dataloader_prefetch_factor", &R::dataloader_prefetch_factor, "loader prefetch", kLoader),
      noop("data", "dataloader_drop_last", &R::dataloader_drop_last, "drop the last partial batch", kLoader),
      noop("data", "remove_unused_columns", &R::remove_unused_columns, "drop unused dataset columns", kLoader),
      noop("data", "skip_prepare_dataset", &R::skip_prepare_dataset, "tokenize on the fly",
           "llmtune tokenizes once and caches in dataset_prepared_path when set"),
      refused<R>("data", "max_packed_sequence_len", "removed from Axolotl; use sample_packing: true with sequence_len"),
      // --- adapter ---
      key("adapter", "adapter", &R::adapter, "parameter-efficient method; unset = full fine-tune")
          .with_choices({"lora", "qlora", "ia3", "bitfit", "prompt_tuning", "prefix_tuning", "bottleneck"}),
      key("adapter", "lora_model_dir", &R::lora_model_dir, "existing PEFT adapter directory to continue training"),
      key("adapter", "lora_r", &R::lora_r, "LoRA rank").with_range(1, 1e9),
      key("adapter", "lora_alpha", &R::lora_alpha, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)").with_range(1, 1e9),
      key("adapter", "lora_dropout", &R::lora_dropout, "dropout on the LoRA input").with_range(0, 1, false, true),
      key("adapter", "lora_target_modules", &R::lora_target_modules, "module names to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
      key("adapter", "lora_target_linear", &R::lora_target_linear, "adapt every linear projection (all seven in Llama)"),
      key("adapter", "lora_modules_to_save", &R::lora_modules_to_save, "modules trained in full and saved with the adapter (embed_tokens, lm_head)"),
      refused_field("adapter", "lora_fan_in_fan_out", &R::lora_fan_in_fan_out, "weights stored transposed",
                    "fan_in_fan_out is for GPT-2 style Conv1D weights; Llama-family models use nn.Linear layout, so leave it false"),
      key("adapter", "peft_use_dora", &R::peft_use_dora, "DoRA: weight-decomposed LoRA"),
      key("adapter", "peft_use_rslora", &R::peft_use_rslora, "rank-stabilized LoRA scaling alpha / sqrt(r)"),
      key("adapter", "loraplus_lr_ratio", &R::loraplus_lr_ratio, "LoRA+: learning-rate ratio of B over A").with_range(0, 1e9, true),
      key("adapter", "loraplus_lr_embedding", &R::loraplus_lr_embedding, "LoRA+: learning rate of embedding adapters").with_range(0, 1e9, true),
      key("adapter", "num_virtual_tokens", &R::num_virtual_tokens, "(llmtune) prompt/prefix tuning: number of virtual tokens").with_range(1, 1e6),
      key("adapter", "ia3_feedforward_modules", &R::ia3_feedforward_modules, "(llmtune) IA3: modules whose input is scaled"),
      key("adapter", "prompt_tuning_init_text", &R::prompt_tuning_init_text, "(llmtune) prompt tuning: initialise the virtual tokens from this text (PEFT's TEXT init); empty = random"),
      key("adapter", "prefix_projection", &R::prefix_projection, "(llmtune) prefix tuning: train the prefixes through PEFT's two-layer MLP"),
      key("adapter", "prefix_encoder_hidden_size", &R::prefix_encoder_hidden_size, "(llmtune) prefix tuning: width of that MLP").with_default_doc("key/value width").with_range(0, 1e9),
      key("adapter", "bottleneck_size", &R::bottleneck_size, "(llmtune) bottleneck adapters: inner width").with_range(1, 1e9),
      key("adapter", "bottleneck_activation", &R::bottleneck_activation, "(llmtune) bottleneck adapters: non-linearity (identity makes them mergeable)")
          .with_choices({"relu", "gelu", "silu", "tanh", "identity"}),
      key("adapter", "unfrozen_parameters", &R::unfrozen_parameters, "full fine-tune only these parameters (regular expressions)"),
      noop("adapter", "lora_on_cpu", &R::lora_on_cpu, "keep LoRA weights on CPU", "llmtune places adapters with their base layer"),
      noop("adapter", "lora_mlp_kernel", &R::lora_mlp_kernel, "Axolotl Triton LoRA kernel", kKernel),
      noop("adapter", "lora_qkv_kernel", &R::lora_qkv_kernel, "Axolotl Triton LoRA kernel", kKernel),
      noop("adapter", "lora_o_kernel", &R::lora_o_kernel, "Axolotl Triton LoRA kernel", kKernel),
      refused<R>("adapter", "peft_layers_to_transform", "restricting LoRA to some layers is not implemented; use lora_target_modules"),
      refused<R>("adapter", "relora_steps", kRelora),
      refused<R>("adapter", "relora_warmup_steps", kRelora),
      refused<R>("adapter", "relora_anneal_steps", kRelora),
      refused<R>("adapter", "relora_prune_ratio", kRelora),
      refused<R>("adapter", "relora_cpu_offload", kRelora),
      refused<R>("adapter", "lisa_n_layers", kLisa),
      refused<R>("adapter", "lisa_step_interval", kLisa),
      refused<R>("adapter", "lisa_layers_attribute", kLisa),
      // --- quantization ---
      key("quantization", "load_in_4bit", &R::load_in_4bit, "load frozen base weights in 4-bit NF4/FP4 (QLoRA; needs adapter: qlora)"),
      key("quantization", "load_in_8bit", &R::load_in_8bit, "load frozen base weights as int8 with per-row absmax (LoRA on an 8-bit base; needs adapter: lora)"),
      key("quantization", "bnb_4bit_quant_type", &R::bnb_4bit_quant_type, "4-bit data type").with_choices({"nf4", "fp4"}),
      key("quantization", "bnb_4bit_compute_dtype", &R::bnb_4bit_compute_dtype, "dtype the 4-bit weights are dequantized to")
          .with_choices({"bfloat16", "float16", "float32"}),
      key("quantization", "bnb_4bit_use_double_quant", &R::bnb_4bit_use_double_quant, "quantize the NF4 block scales too"),
      key("quantization", "bnb_config_kwargs", &R::bnb_config_kwargs,
          "Axolotl's {bnb_4bit_quant_type, bnb_4bit_use_double_quant, llm_int8_has_fp16_weight}; folded into the keys above"),
      key("quantization", "gptq", &R::gptq,
          "base_model is a GPTQ checkpoint (HF layout, e.g. from `llmtune quantize --format gptq`): train LoRA over its "
          "frozen quantized weights (needs adapter: lora; llmtune sft). AWQ bases need no key"),
      // --- optimization ---
      key("optimization", "micro_batch_size", &R::micro_batch_size, "sequences per device per forward pass").with_range(1, 1e9),
      key("optimization", "gradient_accumulation_steps", &R::gradient_accumulation_steps, "micro-batches per optimizer step").with_range(1, 1e9),
      key("optimization", "eval_batch_size", &R::eval_batch_size, "sequences per eval forward pass").with_range(1, 1e9).with_default_doc("= micro_batch_size"),
      key("optimization", "num_epochs", &R::num_epochs, "passes over the training data (fractional allowed)").with_range(0, 1e9, true),
      key("optimization", "max_steps", &R::max_steps, "stop after this many optimizer steps (overrides num_epochs)"),
      key("optimization", "learning_rate", &R::learning_rate, "peak learning rate").with_range(0, 1e9, true),
      key("optimization", "lr_scheduler", &R::lr_scheduler, "learning-rate schedule after warmup")
          .with_choices({"cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"}),
      key("optimization", "cosine_min_lr_ratio", &R::cosine_min_lr_ratio, "cosine floor as a fraction of learning_rate").with_range(0, 1),
      key("optimization", "min_lr", &R::min_lr, "(llmtune) absolute learning-rate floor of the cosine schedule").with_range(0, 1e9),
      key("optimization", "warmup_steps", &R::warmup_steps, "linear warmup steps (default: no warmup)").with_range(0, 1e12),
      key("optimization", "warmup_ratio", &R::warmup_ratio, "linear warmup as a fraction of total steps").with_range(0, 1),
      key("optimization", "optimizer", &R::optimizer, "optimizer (adamw_8bit: block-wise 8-bit AdamW states)").with_choices({"adamw_torch", "adamw_8bit", "sgd"}),
      key("optimization", "adam_beta1", &R::adam_beta1, "AdamW beta1").with_range(0, 1, false, true),
      key("optimization", "adam_beta2", &R::adam_beta2, "AdamW beta2").with_range(0, 1, false, true),
      key("optimization", "adam_epsilon", &R::adam_epsilon, "AdamW epsilon").with_range(0, 1, true),
      key("optimization", "weight_decay", &R::weight_decay, "decoupled weight decay").with_range(0, 1e9),
      key("optimization", "max_grad_norm", &R::max_grad_norm, "clip the global gradient norm to this (0 = no clipping)").with_range(0, 1e18),
      key("optimization", "neftune_noise_alpha", &R::neftune_noise_alpha, "NEFTune: uniform noise on input embeddings, scale alpha / sqrt(T*C)").with_range(0, 1e9),
      alias<R>("optimization", "noisy_embedding_alpha", "neftune_noise_alpha"),
      key("optimization", "seed", &R::seed, "seed of data order, dropout and initialization"),
      key("optimization", "loss_watchdog_threshold", &R::loss_watchdog_threshold, "stop if the loss stays above this..."),
      key("optimization", "loss_watchdog_patience", &R::loss_watchdog_patience, "...for this many logged steps").with_range(1, 1e9),
      key("optimization", "early_stopping_patience", &R::early_stopping_patience, "stop after this many evals without improvement").with_range(1, 1e9),
      refused<R>("optimization", "batch_size", "deprecated in Axolotl; set micro_batch_size and gradient_accumulation_steps"),
      refused<R>("optimization", "auto_find_batch_size", "automatic batch-size search is not implemented; set micro_batch_size"),
      refused<R>("optimization", "lr_scheduler_kwargs", "scheduler keyword arguments are not implemented; use cosine_min_lr_ratio / min_lr"),
      refused<R>("optimization", "sequence_parallel_degree", "sequence parallelism is not implemented"),
      // --- precision and memory ---
      key("precision", "bf16", &R::bf16, "bfloat16 mixed precision: true, false or auto (bf16 if the device supports it)"),
      key("precision", "fp16", &R::fp16, "float16 mixed precision with loss scaling"),
      noop("precision", "tf32", &R::tf32, "TF32 matmuls on Ampere+", "llmtune sets the matmul precision itself"),
      key("precision", "gradient_checkpointing", &R::gradient_checkpointing, "recompute activations in the backward pass to save memory"),
      noop("precision", "gradient_checkpointing_kwargs", &R::gradient_checkpointing_kwargs, "checkpointing options", "options of PyTorch's Python checkpoint API (use_reentrant) do not apply"),
      key("precision", "loss_chunk_tokens", &R::loss_chunk_tokens, "llmtune: tokens per chunk of the cross-entropy (only one chunk's [N, vocab] logits live at once; larger = faster, more memory)").with_range(1, 1e12),
      noop("precision", "torch_compile", &R::torch_compile, "torch.compile the model", "llmtune is compiled ahead of time"),
      refused<R>("precision", "bfloat16", "loading weights in pure bf16 without mixed precision is not implemented; use bf16: true"),
      refused<R>("precision", "float16", "loading weights in pure fp16 is not implemented; use fp16: true"),
      // --- attention and kernels ---
      noop("kernels", "flash_attention", &R::flash_attention, "FlashAttention-2", kAttn),
      noop("kernels", "sdp_attention", &R::sdp_attention, "PyTorch SDPA", kAttn),
      noop("kernels", "xformers_attention", &R::xformers_attention, "xFormers attention", kAttn),
      noop("kernels", "flex_attention", &R::flex_attention, "FlexAttention", kAttn),
      noop("kernels", "attn_implementation", &R::attn_implementation, "transformers attention backend", kAttn),
      noop("kernels", "flash_attn_cross_entropy", &R::flash_attn_cross_entropy, "fused cross entropy", kKernel),
      noop("kernels", "flash_attn_rms_norm", &R::flash_attn_rms_norm, "fused RMSNorm", kKernel),
      noop("kernels", "flash_attn_fuse_qkv", &R::flash_attn_fuse_qkv, "fused QKV", kKernel),
      noop("kernels", "flash_attn_fuse_mlp", &R::flash_attn_fuse_mlp, "fused MLP", kKernel),
      noop("kernels", "flash_optimum", &R::flash_optimum, "BetterTransformer", kKernel),
      noop("kernels", "unsloth_cross_entropy_loss", &R::unsloth_cross_entropy_loss, "Unsloth kernel", kKernel),
      noop("kernels", "unsloth_rms_norm", &R::unsloth_rms_norm, "Unsloth kernel", kKernel),
      noop("kernels", "unsloth_rope", &R::unsloth_rope, "Unsloth kernel", kKernel),
      noop("kernels", "unsloth_lora_mlp", &R::unsloth_lora_mlp, "Unsloth kernel", kKernel),
      noop("kernels", "unsloth_lora_qkv", &R::unsloth_lora_qkv, "Unsloth kernel", kKernel),
      noop("kernels", "unsloth_lora_o", &R::unsloth_lora_o, "Unsloth kernel", kKernel),
      noop("kernels", "plugins", &R::plugins, "Axolotl plugins (Liger, cut cross entropy)", "Python plugins do not apply; llmtune's loss is already chunked"),
      noop("kernels", "liger_rope", &R::liger_rope, "Liger kernel", kKernel),
      noop("kernels", "liger_rms_norm", &R::liger_rms_norm, "Liger kernel", kKernel),
      noop("kernels", "liger_glu_activation", &R::liger_glu_activation, "Liger kernel", kKernel),
      noop("kernels", "liger_layer_norm", &R::liger_layer_norm, "Liger kernel", kKernel),
      noop("kernels", "liger_fused_linear_cross_entropy", &R::liger_fused_linear_cross_entropy, "Liger kernel", "llmtune's loss is already chunked over the vocabulary"),
      noop("kernels", "cut_cross_entropy", &R::cut_cross_entropy, "Cut Cross Entropy", "llmtune's loss is already chunked over the vocabulary"),
      refused<R>("kernels", "s2_attention", "shifted sparse attention (LongLoRA S2-Attn) is not implemented"),
      // --- evaluation, saving, logging ---
      key("checkpoints", "eval_strategy", &R::eval_strategy, "when to evaluate").with_choices({"no", "steps", "epoch"}),
      key("checkpoints", "eval_steps", &R::eval_steps, "evaluate every N steps (or this fraction of total steps if < 1)").with_range(0, 1e12, true),
      key("checkpoints", "evals_per_epoch", &R::evals_per_epoch, "evaluations per epoch").with_range(0, 1e9),
      key("checkpoints", "eval_tasks", &R::eval_tasks, "(llmtune) task YAML files run at every evaluation; metrics go to metrics.jsonl (see llmtune eval)"),
      key("checkpoints", "save_strategy", &R::save_strategy, "when to save checkpoints").with_choices({"no", "steps", "epoch"}),
      key("checkpoints", "save_steps", &R::save_steps, "save every N steps (or this fraction of total steps if < 1)").with_range(0, 1e12, true),
      key("checkpoints", "saves_per_epoch", &R::saves_per_epoch, "checkpoints per epoch").with_range(0, 1e9),
      key("checkpoints", "save_total_limit", &R::save_total_limit, "keep at most this many checkpoints").with_range(1, 1e9),
      refused_field("checkpoints", "save_safetensors", &R::save_safetensors, "write safetensors",
                    "llmtune always writes safetensors and never pickles"),
      key("checkpoints", "logging_steps", &R::logging_steps, "log metrics every N steps").with_range(1, 1e12)
          .with_default_doc("max(1, min(10, 0.5% of total steps))"),
      key("checkpoints", "output_dir", &R::output_dir, "where the adapter/model, checkpoints and metrics go"),
      key("checkpoints", "resume_from_checkpoint", &R::resume_from_checkpoint, "checkpoint directory to resume from"),
      key("checkpoints", "auto_resume_from_checkpoints", &R::auto_resume_from_checkpoints, "resume from the newest checkpoint in output_dir"),
      noop("checkpoints", "eval_table_size", &R::eval_table_size, "W&B prediction table size", kWandb),
      noop("checkpoints", "eval_max_new_tokens", &R::eval_max_new_tokens, "W&B prediction table length", kWandb),
      key("checkpoints", "use_tensorboard", &R::use_tensorboard, "write TensorBoard event files (scalars, sample generations) to output_dir/runs"),
      noop("checkpoints", "include_tokens_per_second", &R::include_tokens_per_second, "log throughput", "llmtune always logs tokens/s"),
      noop("checkpoints", "debug", &R::debug, "print tokenized samples", "use `llmtune tokenize` to inspect tokenization"),
      noop("checkpoints", "strict", &R::strict, "Axolotl strict config loading", "llmtune always refuses unknown keys"),
      noop("logging", "wandb_project", &R::wandb_project, "W&B project", kWandb),
      noop("logging", "wandb_entity", &R::wandb_entity, "W&B entity", kWandb),
      noop("logging", "wandb_name", &R::wandb_name, "W&B run name", kWandb),
      noop("logging", "wandb_watch", &R::wandb_watch, "W&B gradient watching", kWandb),
      noop("logging", "wandb_log_model", &R::wandb_log_model, "W&B model upload", kWandb),
      noop("logging", "wandb_mode", &R::wandb_mode, "W&B mode", kWandb),
      noop("logging", "wandb_run_id", &R::wandb_run_id, "W&B run id", kWandb),
      noop("logging", "mlflow_tracking_uri", &R::mlflow_tracking_uri, "MLflow server", kMlflow),
      noop("logging", "mlflow_experiment_name", &R::mlflow_experiment_name, "MLflow experiment", kMlflow),
      noop("logging", "mlflow_run_name", &R::mlflow_run_name, "MLflow run", kMlflow),
      noop("logging", "hf_mlflow_log_artifacts", &R::hf_mlflow_log_artifacts, "MLflow artifacts", kMlflow),
      noop("logging", "hub_model_id", &R::hub_model_id, "hub repo to push to", kHub),
      noop("logging", "hub_strategy", &R::hub_strategy, "when to push", kHub),
      noop("logging", "hub_private_repo", &R::hub_private_repo, "private hub repo", kHub),
      refused<R>("checkpoints", "do_bench_eval", "Axolotl's benchmark eval is not implemented; use eval_tasks"),
      refused<R>("checkpoints", "bench_dataset", "Axolotl's benchmark eval is not implemented; use eval_tasks"),
      refused<R>("checkpoints", "eval_causal_lm_metrics", "generation metrics (sacrebleu, comet, ...) are not implemented; use eval_tasks"),
      // --- preference and RL ---
      key("rl", "rl", &R::rl, "preference/RL objective (unset = supervised)").with_choices({"dpo", "ipo", "kto", "orpo", "simpo", "grpo", "ppo"}),
      key("rl", "rl_beta", &R::rl_beta, "DPO-family beta (strength of the reference-model KL)").with_range(0, 1e9, true),
      alias<R>("rl", "dpo_beta", "rl_beta"),
      key("rl", "dpo_loss_type", &R::dpo_loss_type, "DPO loss variant (default: sigmoid; ipo for rl: ipo)").with_choices({"sigmoid", "hinge", "ipo", "robust"}),
      key("rl", "dpo_label_smoothing", &R::dpo_label_smoothing, "conservative/robust DPO label smoothing").with_range(0, 0.5, false, true),
      key("rl", "rpo_alpha", &R::rpo_alpha, "RPO: weight of the NLL term on chosen responses").with_range(0, 1e9),
      key("rl", "simpo_gamma", &R::simpo_gamma, "SimPO target reward margin"),
      key("rl", "cpo_alpha", &R::cpo_alpha, "SimPO/CPO: weight of the NLL term").with_range(0, 1e9),
      key("rl", "orpo_alpha", &R::orpo_alpha, "ORPO: weight of the odds-ratio term (default 0.1)").with_range(0, 1e9),
      key("rl", "kto_desirable_weight", &R::kto_desirable_weight, "KTO: weight of desirable examples").with_range(0, 1e9),
      key("rl", "kto_undesirable_weight", &R::kto_undesirable_weight, "KTO: weight of undesirable examples").with_range(0, 1e9),
      key("rl", "precompute_ref_log_probs", &R::precompute_ref_log_probs, "compute reference log-probs once before training"),
      key("rl", "reward_model", &R::reward_model, "train a Bradley-Terry reward model (llmtune reward)"),
      key("rl", "num_labels", &R::num_labels, "outputs of the reward head (1 for reward models)").with_range(1, 1e6),
      key("rl", "center_rewards_coefficient", &R::center_rewards_coefficient, "reward model: penalty on the mean reward").with_range(0, 1e9),
      key("rl", "trl", &R::trl, "online RL settings with TRL's names (see trl keys)"),
      refused<R>("rl", "process_reward_model", "process reward models are not implemented; use reward_model: true"),
      refused<R>("rl", "dpo_use_weighting", "WPO weighting is not implemented"),
      // --- distributed ---
      key("distributed", "deepspeed", &R::deepspeed, "DeepSpeed JSON path or dict; only zero_optimization.stage is used (-> zero_stage)"),
      key("distributed", "fsdp", &R::fsdp, "FSDP options (full_shard, auto_wrap, offload)"),
      key("distributed", "fsdp_config", &R::fsdp_config, "FSDP settings (fsdp_* keys)"),
      key("distributed", "zero_stage", &R::zero_stage, "(llmtune) ZeRO stage 0-3 of llmtune's native sharding").with_range(0, 3).with_default_doc("from deepspeed, else 0"),
      key("distributed", "ddp_backend", &R::ddp_backend, "process-group backend").with_choices({"nccl", "gloo"}).with_default_doc("nccl on CUDA, gloo on CPU"),
      key("distributed", "ddp_timeout", &R::ddp_timeout, "collective timeout in seconds").with_range(1, 1e9),
      key("distributed", "ddp_bucket_cap_mb", &R::ddp_bucket_cap_mb, "DDP gradient bucket size in MiB").with_range(1, 1e6).with_default_doc("25"),
      noop("distributed", "ddp_broadcast_buffers", &R::ddp_broadcast_buffers, "DDP buffer broadcast", "Llama-family models have no buffers to broadcast"),
      noop("distributed", "ddp_find_unused_parameters", &R::ddp_find_unused_parameters, "DDP unused-parameter search", "llmtune reduces exactly the trainable parameters"),
      noop("distributed", "local_rank", &R::local_rank, "process rank on the node", "the launcher sets LOCAL_RANK in the environment"),
      refused<R>("distributed", "fsdp_version", "choosing an FSDP version is not implemented; llmtune has one FSDP"),
  };
  return t;
}

const std::vector<Field<DatasetConfig>>& dataset_fields() {
  using D = DatasetConfig;
  static const std::vector<Field<D>> t = {
      key("dataset", "path", &D::path, "hub id, local file or directory (required)"),
      key("dataset", "type", &D::type, "prompt strategy: alpaca, completion, chat_template, ... or a custom format map"),
      key("dataset", "split", &D::split, "split to read"),
      key("dataset", "name", &D::name, "dataset config/subset name"),
      key("dataset", "data_files", &D::data_files, "files to read inside path"),
      key("dataset", "ds_type", &D::ds_type, "file format (default: from the extension)")
          .with_choices({"json", "jsonl", "csv", "parquet", "text", "arrow"}),
      key("dataset", "revision", &D::revision, "hub revision"),
      key("dataset", "shards", &D::shards, "split this dataset into N shards...").with_range(1, 1e18),
      key("dataset", "shards_idx", &D::shards_idx, "...and keep this one").with_range(0, 1e18),
      noop("dataset", "preprocess_shards", &D::preprocess_shards, "Axolotl preprocessing shards", "llmtune preprocesses in one pass"),
      noop("dataset", "trust_remote_code", &D::trust_remote_code, "run dataset loading scripts", "llmtune never runs dataset scripts"),
      key("dataset", "field_messages", &D::field_messages, "chat_template: column holding the message list"),
      key("dataset", "message_property_mappings", &D::message_property_mappings, "chat_template: {role: <field>, content: <field>}"),
      alias<D>("dataset", "message_field_role", "message_property_mappings.role"),
      alias<D>("dataset", "message_field_content", "message_property_mappings.content"),
      key("dataset", "message_field_training", &D::message_field_training, "chat_template: per-message bool field overriding roles_to_train"),
      key("dataset", "message_field_training_detail", &D::message_field_training_detail, "chat_template: per-message character spans to train on"),
      key("dataset", "roles", &D::roles, "chat_template: {canonical role: [source role names]} (default: identity)"),
      key("dataset", "roles_to_train", &D::roles_to_train, "chat_template: roles whose tokens get labels"),
      key("dataset", "train_on_eos", &D::train_on_eos, "chat_template: label the EOS token after all / trained turns / the last turn / none")
          .with_choices({"all", "turn", "last", "none"}),
      key("dataset", "train_on_eot", &D::train_on_eot, "chat_template: the same for end-of-turn tokens")
          .with_choices({"all", "turn", "last", "none"}).with_default_doc("= train_on_eos"),
      key("dataset", "chat_template", &D::chat_template, "chat template for this dataset (default: the top-level one)"),
      key("dataset", "chat_template_jinja", &D::chat_template_jinja, "Jinja chat template for this dataset"),
      key("dataset", "drop_system_message", &D::drop_system_message, "drop system messages from conversations"),
      key("dataset", "field_chosen", &D::field_chosen, "preference data: chosen response field"),
      key("dataset", "field_rejected", &D::field_rejected, "preference data: rejected response field"),
      key("dataset", "field_prompt", &D::field_prompt, "preference/RL data: prompt field, a string or a message list").with_default_doc("prompt"),
      key("dataset", "field_margin", &D::field_margin, "reward data: margin column of the Bradley-Terry loss").with_default_doc("margin, when present"),
      key("dataset", "field_completion", &D::field_completion, "KTO unpaired data: completion field").with_default_doc("completion"),
      key("dataset", "field_label", &D::field_label, "KTO unpaired data: desirable (true) / undesirable (false) field").with_default_doc("label"),
      key("dataset", "filters", &D::filters, "(llmtune) keep only records matching every expression `field op value` (op: == != >= <= > <), e.g. 'status != \"tie\"'"),
      key("dataset", "field_system", &D::field_system, "instruction formats: system field"),
      key("dataset", "field_instruction", &D::field_instruction, "instruction formats: instruction field"),
      key("dataset", "field_input", &D::field_input, "instruction formats: input field"),
      key("dataset", "field_output", &D::field_output, "instruction formats: output field"),
      key("dataset", "system_prompt", &D::system_prompt, "custom format: system prompt"),
      key("dataset", "system_format", &D::system_format, "custom format: how {system} is rendered"),
      key("dataset", "format", &D::format, "custom format: prompt with {instruction} and {input}"),
      key("dataset", "no_input_format", &D::no_input_format, "custom format: prompt when input is empty"),
      key("dataset", "field", &D::field, "completion: the text field"),
      key("dataset", "text_column", &D::text_column, "pretraining_dataset: the text column").with_default_doc("= field"),
      key("dataset", "text_split", &D::text_split, "(llmtune) .txt files: one sample per line, per blank-line paragraph, or per file")
          .with_choices({"line", "paragraph", "file"}),
      key("dataset", "weight", &D::weight, "(llmtune) share of each epoch (0.5 = a seeded half, 2 = every sample twice)")
          .with_range(0, 1e6, true),
  };
  return t;
}

const std::vector<Field<TrlConfig>>& trl_fields() {
  using T = TrlConfig;
  static const std::vector<Field<T>> t = {
      key("trl", "beta", &T::beta, "GRPO: KL coefficient (default 0.04)").with_range(0, 1e9),
      key("trl", "max_completion_length", &T::max_completion_length, "GRPO: maximum generated tokens (default 256)").with_range(1, 1e9),
      key("trl", "num_generations", &T::num_generations, "GRPO: completions per prompt (default 8)").with_range(2, 1e9),
      key("trl", "reward_funcs", &T::reward_funcs, "reward functions (exact_match, regex) or a reward model directory; PPO and GRPO"),
      key("trl", "reward_weights", &T::reward_weights, "GRPO: weight of each reward function"),
      key("trl", "temperature", &T::temperature, "sampling temperature (default 1.0 for grpo, 0.7 for ppo)").with_range(0, 1e9, true),
      noop("trl", "use_vllm", &T::use_vllm, "generate with vLLM", "llmtune generates with its own KV-cache sampler"),
      noop("trl", "log_completions", &T::log_completions, "log sampled completions", "llmtune logs metrics only"),
      key("trl", "reward_model_path", &T::reward_model_path, "PPO: reward model directory (output of llmtune reward)"),
      key("trl", "num_ppo_epochs", &T::num_ppo_epochs, "PPO: optimization epochs per rollout batch").with_range(1, 1e9),
      key("trl", "num_mini_batches", &T::num_mini_batches, "PPO: mini-batches per rollout batch").with_range(1, 1e9),
      key("trl", "kl_coef", &T::kl_coef, "PPO: KL penalty coefficient").with_range(0, 1e9),
      key("trl", "cliprange", &T::cliprange, "PPO: policy ratio clip").with_range(0, 1e9, true),
      key("trl", "cliprange_value", &T::cliprange_value, "PPO: value clip").with_range(0, 1e9, true),
      key("trl", "vf_coef", &T::vf_coef, "PPO: value loss coefficient").with_range(0, 1e9),
      key("trl", "gamma", &T::gamma, "PPO: discount").with_range(0, 1),
      key("trl", "lam", &T::lam, "PPO: GAE lambda").with_range(0, 1),
      key("trl", "whiten_rewards", &T::whiten_rewards, "PPO: whiten rewards"),
      key("trl", "response_length", &T::response_length, "PPO: generated tokens per rollout").with_range(1, 1e9),
      key("trl", "missing_eos_penalty", &T::missing_eos_penalty, "PPO/GRPO: reward penalty when no EOS is generated"),
      key("trl", "top_p", &T::top_p, "(llmtune) PPO/GRPO: nucleus sampling for rollouts (1 = off)").with_range(0, 1, true),
      key("trl", "adaptive_kl", &T::adaptive_kl, "(llmtune) PPO: adapt kl_coef towards target_kl (Ziegler et al. 2019)"),
      key("trl", "target_kl", &T::target_kl, "(llmtune) PPO: target KL per sequence for adaptive_kl (default 6)").with_range(0, 1e9, true),
      key("trl", "kl_horizon", &T::kl_horizon, "(llmtune) PPO: adaptive_kl horizon in samples (default 10000)").with_range(0, 1e12, true),
      key("trl", "reward_pattern", &T::reward_pattern, "(llmtune) reward_funcs: [regex]: pattern searched in the completion; {answer} = the record's answer"),
  };
  return t;
}

const std::vector<ValueRule>& value_rules() {
  static const std::vector<ValueRule> t = {
      {"optimizer", "adamw", false, "adamw_torch", "the same AdamW update"},
      {"optimizer", "adamw_hf", false, "adamw_torch", "the same AdamW update"},
      {"optimizer", "adamw_torch_fused", false, "adamw_torch", "the same AdamW update (llmtune's step is already fused)"},
      {"optimizer", "adamw_apex_fused", false, "adamw_torch", "the same AdamW update"},
      {"optimizer", "paged_adamw_32bit", false, "adamw_torch",
       "paging optimizer states to host memory needs CUDA unified memory; without it paging is a no-op and the update is the same AdamW"},
      {"optimizer", "adamw_bnb_8bit", false, "adamw_8bit", "the same block-wise 8-bit AdamW"},
      {"optimizer", "paged_adamw_8bit", false, "adamw_8bit",
       "paging optimizer states to host memory needs CUDA unified memory; without it paging is a no-op and the update is the same 8-bit AdamW"},
      {"optimizer", "adafactor", true, "", "Adafactor is not implemented; use adamw_torch"},
      {"optimizer", "lion_8bit", true, "", "Lion is not implemented; use adamw_torch"},
      {"optimizer", "lion_32bit", true, "", "Lion is not implemented; use adamw_torch"},
      {"optimizer", "galore_adamw", true, "", "GaLore is not implemented; use adamw_torch with an adapter"},
      {"optimizer", "schedule_free_adamw", true, "", "schedule-free AdamW is not implemented; use adamw_torch"},
      {"optimizer", "ademamix", true, "", "AdEMAMix is not implemented; use adamw_torch"},
      {"optimizer", "muon", true, "", "Muon is not implemented; use adamw_torch"},
      {"lr_scheduler", "one_cycle", true, "", "the one-cycle schedule is not implemented; use cosine or linear with warmup"},
      {"lr_scheduler", "rex", true, "", "the REX schedule is not implemented; use cosine or linear"},
      {"lr_scheduler", "log_sweep", true, "", "the log-sweep schedule is not implemented"},
      {"lr_scheduler", "cosine_with_restarts", true, "", "cosine with restarts is not implemented; use cosine"},
      {"lr_scheduler", "polynomial", true, "", "the polynomial schedule is not implemented; use linear or cosine"},
      {"lr_scheduler", "inverse_sqrt", true, "", "the inverse-sqrt schedule is not implemented; use cosine or linear"},
      {"lr_scheduler", "reduce_lr_on_plateau", true, "", "reduce-on-plateau is not implemented; use cosine or linear"},
      {"lr_scheduler", "warmup_stable_decay", true, "", "warmup-stable-decay is not implemented; use cosine or linear"},
      {"adapter", "llama-adapter", true, "", "LLaMA-Adapter is not implemented; use lora, qlora, ia3 or prefix_tuning"},
      {"adapter", "dora", true, "", "DoRA is written `adapter: lora` with `peft_use_dora: true` (as in Axolotl)"},
      {"bnb_4bit_compute_dtype", "bf16", false, "bfloat16", "the same dtype"},
      {"bnb_4bit_compute_dtype", "fp16", false, "float16", "the same dtype"},
      {"bnb_4bit_compute_dtype", "fp32", false, "float32", "the same dtype"},
      {"dpo_loss_type", "exo_pair", true, "", "EXO is not implemented; use sigmoid, hinge, ipo or robust"},
      {"dpo_loss_type", "nca_pair", true, "", "NCA is not implemented; use sigmoid, hinge, ipo or robust"},
      {"dpo_loss_type", "bco_pair", true, "", "BCO is not implemented; use sigmoid, hinge, ipo or robust"},
      {"dpo_loss_type", "sppo_hard", true, "", "SPPO is not implemented; use sigmoid, hinge, ipo or robust"},
      {"dpo_loss_type", "apo_zero", true, "", "APO is not implemented; use sigmoid, hinge, ipo or robust"},
      {"dpo_loss_type", "apo_down", true, "", "APO is not implemented; use sigmoid, hinge, ipo or robust"},
  };
  return t;
}

const std::vector<std::string>& custom_format_keys() {
  static const std::vector<std::string> k = {"system_prompt", "system_format", "field_system", "field_instruction",
                                             "field_input",   "field_output",  "format",       "no_input_format"};
  return k;
}

}  // namespace llmtune::config::detail
