// Whole-recipe checks after parsing: dependent defaults, contradictory keys (named together
// with where each was set), refused keys, keys that have no effect, and per-stage requirements.
#include <algorithm>
#include <fstream>
#include <regex>

#include "config/schema_impl.h"
#include "core/core.h"

namespace llmtune::config {
namespace detail {
namespace {

// zero_stage from a DeepSpeed config: an inline dict, a readable JSON file, or a file name
// like zero2.json / zero3_bf16.json (Axolotl's bundled configs, which users rarely have).
std::optional<int64_t> deepspeed_stage(const nlohmann::json& ds, ParseContext& ctx) {
  nlohmann::json cfg;
  if (ds.is_object()) {
    cfg = ds;
  } else if (ds.is_string()) {
    std::string p = ds.get<std::string>();
    std::vector<std::filesystem::path> tries = {p};
    if (!ctx.source_dir.empty()) tries.insert(tries.begin(), std::filesystem::path(ctx.source_dir) / p);
    for (const auto& t : tries) {
      std::ifstream in(t);
      if (!in) continue;
      try {
        cfg = nlohmann::json::parse(in);
      } catch (const std::exception& e) {
        fail("deepspeed config {} ({}) is not valid JSON: {}", t.string(), ctx.where("deepspeed"), e.what());
      }
      break;
    }
    if (cfg.is_null()) {
      std::smatch m;
      std::string name = std::filesystem::path(p).filename().string();
      if (std::regex_search(name, m, std::regex("zero([0-3])"))) {
        ctx.notices.push_back(fmt::format("`deepspeed: {}` not found; using ZeRO stage {} from its name", p, m[1].str()));
        return std::stoi(m[1].str());
      }
      fail("`deepspeed: {}` ({}): file not found and its name does not say the ZeRO stage; set `zero_stage: 0..3` instead",
           p, ctx.where("deepspeed"));
    }
  } else {
    fail("`deepspeed` ({}) must be a path to a DeepSpeed JSON file or an inline map", ctx.where("deepspeed"));
  }
  auto zo = cfg.find("zero_optimization");
  if (zo == cfg.end() || !zo->is_object() || !zo->contains("stage")) return 0;
  const auto& st = (*zo)["stage"];
  if (!st.is_number_integer() || st.get<int64_t>() < 0 || st.get<int64_t>() > 3)
    fail("`deepspeed` ({}): zero_optimization.stage must be 0, 1, 2 or 3", ctx.where("deepspeed"));
  if (zo->value("offload_optimizer", nlohmann::json()).is_object() || zo->value("offload_param", nlohmann::json()).is_object())
    ctx.warnings.push_back("DeepSpeed CPU offload settings are not implemented; only the ZeRO stage is used");
  return st.get<int64_t>();
}

}  // namespace

void resolve_and_check(Recipe& r, ParseContext& ctx) {
  auto both = [&](const char* a, const char* b, const std::string& why) {
    fail("`{}` ({}) and `{}` ({}) contradict: {}", a, ctx.where(a), b, ctx.where(b), why);
  };
  // --- dependent defaults ---
  if (!r.eval_batch_size) r.eval_batch_size = r.micro_batch_size;
  if (!r.eval_sample_packing) r.eval_sample_packing = r.sample_packing;
  if (r.fsdp.size() == 1 && r.fsdp[0].find(' ') != std::string::npos) {  // "full_shard auto_wrap"
    std::vector<std::string> parts;
    std::string cur;
    for (char c : r.fsdp[0] + " ") {
      if (c == ' ') { if (!cur.empty()) parts.push_back(cur); cur.clear(); }
      else cur += c;
    }
    r.fsdp = parts;
  }
  if (r.deepspeed) {
    auto stage = deepspeed_stage(*r.deepspeed, ctx);
    if (r.zero_stage && stage && *r.zero_stage != *stage)
      both("zero_stage", "deepspeed", fmt::format("zero_stage is {} but the DeepSpeed config says stage {}", *r.zero_stage, *stage));
    if (!r.zero_stage) r.zero_stage = stage;
  }
  if (r.bnb_config_kwargs) {  // Axolotl's spelling of the bitsandbytes options
    const auto& kw = *r.bnb_config_kwargs;
    if (!kw.is_object()) fail("`bnb_config_kwargs` ({}) must be a map", ctx.where("bnb_config_kwargs"));
    for (const auto& [k, v] : kw.items()) {
      auto str = [&] {
        if (!v.is_string()) fail("bnb_config_kwargs.{} ({}) must be a string", k, ctx.where("bnb_config_kwargs"));
        return v.get<std::string>();
      };
      if (k == "bnb_4bit_quant_type" && (str() == "nf4" || str() == "fp4")) r.bnb_4bit_quant_type = str();
      else if (k == "bnb_4bit_compute_dtype" && (str() == "bfloat16" || str() == "float16" || str() == "float32"))
        r.bnb_4bit_compute_dtype = str();
      else if (k == "bnb_4bit_use_double_quant" && v.is_boolean()) r.bnb_4bit_use_double_quant = v.get<bool>();
      else if (k == "llm_int8_has_fp16_weight") {
        // Only meaningful for 8-bit loading, which is refused anyway.
      } else {
        fail("bnb_config_kwargs.{}: {} ({}) is not supported; llmtune understands bnb_4bit_quant_type (nf4|fp4), "
             "bnb_4bit_compute_dtype and bnb_4bit_use_double_quant (bool)", k, v.dump(), ctx.where("bnb_config_kwargs"));
      }
    }
    r.bnb_config_kwargs.reset();
  }
  if (r.rl == "dpo" && !r.dpo_loss_type) r.dpo_loss_type = "sigmoid";
  if (r.rl == "ipo" && !r.dpo_loss_type) r.dpo_loss_type = "ipo";

  // --- contradictions ---
  if (r.warmup_steps && r.warmup_ratio) both("warmup_steps", "warmup_ratio", "set only one way of giving the warmup length");
  if (r.bf16 == Tristate::on && r.fp16) both("bf16", "fp16", "choose one mixed-precision dtype");
  if (r.sample_packing && (r.adapter == "prompt_tuning" || r.adapter == "prefix_tuning"))
    both("sample_packing", "adapter", "virtual tokens are prepended to one sequence per row; packed rows hold several");
  if (r.load_in_4bit && r.load_in_8bit) both("load_in_4bit", "load_in_8bit", "choose one quantization of the base weights");
  if (r.adapter == "qlora" && !r.load_in_4bit)
    both("adapter", "load_in_4bit", "`adapter: qlora` trains LoRA on a 4-bit base, so it needs `load_in_4bit: true` (as in Axolotl)");
  if (r.load_in_8bit && r.adapter != "lora")
    both("load_in_8bit", "adapter", "8-bit weights are frozen; train LoRA on them with `adapter: lora`");
  if (r.load_in_4bit && r.adapter != "qlora")
    both("load_in_4bit", "adapter",
         "4-bit weights cannot be trained directly; use `adapter: qlora` (LoRA on the frozen 4-bit base)");
  if (r.gptq) {  // Axolotl's key: LoRA over a GPTQ checkpoint (checked against base_model by the stage)
    if (r.load_in_4bit) both("gptq", "load_in_4bit", "the base is already quantized; drop load_in_4bit (and use adapter: lora)");
    if (r.load_in_8bit) both("gptq", "load_in_8bit", "the base is already quantized; drop load_in_8bit");
    if (r.adapter != "lora")
      both("gptq", "adapter", "the quantized weights are frozen; train LoRA on them with `adapter: lora` (as in Axolotl)");
  }
  if (r.max_steps && *r.max_steps <= 0)
    fail("`max_steps: {}` ({}) must be positive; remove it to train for num_epochs", *r.max_steps, ctx.where("max_steps"));
  if (r.eval_steps && r.evals_per_epoch) both("eval_steps", "evals_per_epoch", "set only one evaluation interval");
  if (r.save_steps && r.saves_per_epoch) both("save_steps", "saves_per_epoch", "set only one checkpoint interval");
  if (r.cosine_min_lr_ratio && r.min_lr) both("cosine_min_lr_ratio", "min_lr", "set the learning-rate floor only once");
  if (r.val_set_size > 0 && !r.test_datasets.empty())
    both("val_set_size", "test_datasets", "evaluate either on a held-out split or on test_datasets");
  if (r.val_set_size >= 1 && r.val_set_size != static_cast<double>(static_cast<int64_t>(r.val_set_size)))
    fail("`val_set_size: {}` ({}) must be a fraction below 1 or a whole number of samples", r.val_set_size, ctx.where("val_set_size"));
  if (!r.fsdp.empty() && r.zero_stage.value_or(0) > 0)
    both("fsdp", r.deepspeed ? "deepspeed" : "zero_stage", "shard with FSDP or with ZeRO, not both");
  if (r.rl && r.reward_model) both("rl", "reward_model", "a reward model is trained by `llmtune reward` without `rl`");
  if (r.rl == "ipo" && r.dpo_loss_type != "ipo")
    both("rl", "dpo_loss_type", "`rl: ipo` is DPO with the IPO loss; drop dpo_loss_type or set it to ipo");
  if (r.peft_use_dora && r.adapter && *r.adapter != "lora" && *r.adapter != "qlora")
    both("peft_use_dora", "adapter", "DoRA is a LoRA variant; use adapter: lora or qlora");
  if (!r.unfrozen_parameters.empty() && r.adapter)
    both("unfrozen_parameters", "adapter", "unfrozen_parameters selects weights for a full fine-tune; adapters train their own weights");
  if (r.dataset_shard_idx && !r.dataset_shard_num)
    fail("`dataset_shard_idx` ({}) needs `dataset_shard_num`", ctx.where("dataset_shard_idx"));
  if (r.dataset_shard_idx && r.dataset_shard_num && *r.dataset_shard_idx >= *r.dataset_shard_num)
    both("dataset_shard_idx", "dataset_shard_num", "the shard index must be below the number of shards");
  if (r.eval_strategy == "no" && (r.eval_steps || r.evals_per_epoch))
    both("eval_strategy", r.eval_steps ? "eval_steps" : "evals_per_epoch", "evaluation is turned off but an interval is set");
  if (r.save_strategy == "no" && (r.save_steps || r.saves_per_epoch))
    both("save_strategy", r.save_steps ? "save_steps" : "saves_per_epoch", "saving is turned off but an interval is set");
  if (r.trl.reward_weights.size() && r.trl.reward_weights.size() != r.trl.reward_funcs.size())
    fail("trl.reward_weights ({}) has {} entries but trl.reward_funcs has {}", ctx.where("trl"), r.trl.reward_weights.size(),
         r.trl.reward_funcs.size());
  auto check_datasets = [&](const std::vector<DatasetConfig>& ds, const char* key) {
    for (size_t i = 0; i < ds.size(); ++i) {
      if (ds[i].shards_idx && !ds[i].shards)
        fail("{}[{}] ({}) sets shards_idx without shards", key, i, ctx.where(key));
      if (ds[i].shards_idx && ds[i].shards && *ds[i].shards_idx >= *ds[i].shards)
        fail("{}[{}] ({}): shards_idx {} must be below shards {}", key, i, ctx.where(key), *ds[i].shards_idx, *ds[i].shards);
    }
  };
  check_datasets(r.datasets, "datasets");
  check_datasets(r.test_datasets, "test_datasets");
  check_datasets(r.pretraining_dataset, "pretraining_dataset");

  // --- refused keys (after contradictions, so a pair is reported as a pair) ---
  if (!ctx.refusals.empty()) {
    std::string msg = ctx.refusals.front();
    if (ctx.refusals.size() > 1) msg += fmt::format(" (and {} more refused key(s))", ctx.refusals.size() - 1);
    throw Error(msg);
  }

  // --- keys set without effect ---
  if (!r.adapter) {
    static const Recipe def{};
    auto unused = [&](const char* k, bool is_set) {
      if (is_set) ctx.warnings.push_back(fmt::format("`{}` ({}) has no effect without `adapter` (this is a full fine-tune)", k, ctx.where(k)));
    };
    unused("lora_r", r.lora_r != def.lora_r);
    unused("lora_alpha", r.lora_alpha != def.lora_alpha);
    unused("lora_dropout", r.lora_dropout != def.lora_dropout);
    unused("lora_target_modules", !r.lora_target_modules.empty());
    unused("lora_target_linear", r.lora_target_linear);
    unused("lora_modules_to_save", !r.lora_modules_to_save.empty());
    unused("lora_model_dir", r.lora_model_dir.has_value());
    unused("peft_use_dora", r.peft_use_dora);
    unused("peft_use_rslora", r.peft_use_rslora);
    unused("loraplus_lr_ratio", r.loraplus_lr_ratio.has_value());
  }
  if ((r.adapter == "lora" || r.adapter == "qlora") && r.lora_target_modules.empty() && !r.lora_target_linear)
    ctx.warnings.push_back(fmt::format(
        "`adapter: {}` without lora_target_modules or lora_target_linear: PEFT's default targets (q_proj, v_proj) are used",
        *r.adapter));
}

}  // namespace detail

const std::vector<std::string>& recipe_stages() {
  static const std::vector<std::string> s = {"pretrain", "sft", "dpo", "reward", "ppo"};
  return s;
}

void validate_for_stage(const Recipe& r, std::string_view stage) {
  const auto& stages = recipe_stages();
  if (std::find(stages.begin(), stages.end(), stage) == stages.end()) {
    auto guess = closest_match(stage, stages);
    fail("unknown stage `{}`; expected one of pretrain, sft, dpo, reward, ppo{}", stage,
         guess ? fmt::format(" — did you mean `{}`?", *guess) : std::string());
  }
  const std::string& src = r.source.name.empty() ? std::string("recipe") : r.source.name;
  auto missing = [&](const char* key, const char* what) {
    fail("{}: `llmtune {}` needs `{}` ({})", src, stage, key, what);
  };
  if (!r.base_model) missing("base_model", "the model to train: a hub id like TinyLlama/TinyLlama-1.1B-Chat-v1.0 or a local directory");
  if (stage == "pretrain") {
    if (r.datasets.empty() && r.pretraining_dataset.empty())
      missing("datasets", "raw text to train on; or `pretraining_dataset` for streamed text");
  } else if (r.datasets.empty()) {
    missing("datasets", stage == "ppo" ? "prompts to generate from: at least one `- path: ...` entry"
                                       : "at least one `- path: ...` entry");
  }
  auto wrong_rl = [&](const char* expected) {
    fail("{}: `rl: {}` does not belong to `llmtune {}`; {}", src, *r.rl, stage, expected);
  };
  if (r.gptq && stage != "sft")
    fail("{}: `gptq: true` (a LoRA over a frozen GPTQ checkpoint) is supported by `llmtune sft` only, not `llmtune {}`; "
         "merge the adapter (llmtune merge) and continue from the merged model", src, stage);
  if (stage == "pretrain" || stage == "sft") {
    if (r.rl) wrong_rl(*r.rl == "grpo" || *r.rl == "ppo" ? "run `llmtune ppo`" : "run `llmtune dpo`");
    if (r.reward_model) fail("{}: `reward_model: true` belongs to `llmtune reward`", src);
  } else if (stage == "dpo") {
    static const std::vector<std::string> ok = {"dpo", "ipo", "kto", "orpo", "simpo"};
    if (r.rl && std::find(ok.begin(), ok.end(), *r.rl) == ok.end()) wrong_rl("`llmtune dpo` runs rl: dpo, ipo, kto, orpo or simpo");
    if (r.reward_model) fail("{}: `reward_model: true` belongs to `llmtune reward`", src);
  } else if (stage == "reward") {
    if (r.rl) wrong_rl("a reward model is trained without `rl`");
    if (r.adapter == "prompt_tuning" || r.adapter == "prefix_tuning")
      fail("{}: `adapter: {}` cannot train a reward head; use lora, qlora or a full fine-tune", src, *r.adapter);
  } else if (stage == "ppo") {
    if (r.rl && *r.rl != "ppo" && *r.rl != "grpo") wrong_rl("`llmtune ppo` runs rl: ppo or grpo");
    if (r.trl.reward_funcs.empty() && !r.trl.reward_model_path)
      fail("{}: `llmtune ppo` needs a reward: `trl.reward_funcs: [exact_match]` or `[regex]` (with trl.reward_pattern) "
           "against each record's answer, or `trl.reward_model_path` (a reward model trained with `llmtune reward`)", src);
    if (r.trl.reward_funcs.size() + (r.trl.reward_model_path ? 1 : 0) > 1)
      fail("{}: llmtune ppo takes one reward: a single trl.reward_funcs entry or trl.reward_model_path", src);
    for (const auto& f : r.trl.reward_funcs)
      if (f == "regex" && !r.trl.reward_pattern) fail("{}: `trl.reward_funcs: [regex]` needs `trl.reward_pattern`", src);
  }
}

}  // namespace llmtune::config
