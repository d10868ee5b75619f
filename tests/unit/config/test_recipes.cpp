// Every shipped recipe (recipes/*.yaml) and every Axolotl-style example under
// tests/unit/config/axolotl_examples loads, validates for its stage and round-trips.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <map>

#include "config/config.h"
#include "core/core.h"

namespace fs = std::filesystem;
using namespace llmtune;

namespace {

fs::path source_dir() {
  const char* s = std::getenv("LLMTUNE_SOURCE_DIR");
  if (!s || !*s) FAIL("LLMTUNE_SOURCE_DIR is not set; run through ctest or export it to the repository root");
  return fs::path(s);
}

std::vector<fs::path> yaml_files(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) FAIL("missing directory " << dir.string());
  for (const auto& e : fs::directory_iterator(dir)) {
    auto ext = e.path().extension().string();
    if (ext == ".yaml" || ext == ".yml") out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The stage a recipe is for, from its name (…-sft.yaml) or its keys.
std::string stage_of(const fs::path& file, const config::Recipe& r) {
  std::string name = file.stem().string();
  for (const char* s : {"pretrain", "dpo", "reward", "ppo", "sft"})
    if (name.find(s) != std::string::npos) return s;
  if (r.rl == "grpo" || r.rl == "ppo") return "ppo";
  if (r.rl) return "dpo";
  if (r.reward_model) return "reward";
  if (r.datasets.empty() && !r.pretraining_dataset.empty()) return "pretrain";
  return "sft";
}

void check_loads(const fs::path& file, const std::vector<std::string>& sets = {}) {
  INFO(file.string());
  config::Recipe r;
  try {
    r = config::load_recipe(file, sets);
  } catch (const Error& e) {
    FAIL(e.what());
  }
  std::string stage = stage_of(file, r);
  INFO("stage " << stage);
  try {
    config::validate_for_stage(r, stage);
  } catch (const Error& e) {
    FAIL(e.what());
  }
  CHECK(config::parse_recipe(config::recipe_to_yaml(r), "resolved") == r);
}

}  // namespace

TEST_CASE("every shipped recipe loads, validates for its stage and round-trips") {
  log::set_level(log::Level::warn);  // the no-op notices of real recipes are tested in test_config
  auto files = yaml_files(source_dir() / "recipes");
  REQUIRE(files.size() >= 3);
  for (const auto& f : files) check_loads(f);

  auto r = config::load_recipe(source_dir() / "recipes/tinyllama-lora-sft.yaml");
  CHECK(r.base_model == "TinyLlama/TinyLlama-1.1B-Chat-v1.0");
  CHECK(r.adapter == "lora");
  CHECK(r.lora_r == 64);
  CHECK(r.lora_alpha == 32);
  CHECK(r.lora_dropout == 0.1);
  CHECK(r.lora_target_modules ==
        std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
  CHECK(r.learning_rate == 2e-4);
  CHECK(r.lr_scheduler == "cosine");
  CHECK(r.micro_batch_size == 2);
  CHECK(r.gradient_accumulation_steps == 4);
  CHECK(r.sequence_len == 512);
}

TEST_CASE("Axolotl's example recipes load") {
  log::set_level(log::Level::warn);
  auto files = yaml_files(source_dir() / "tests/unit/config/axolotl_examples");
  REQUIRE(files.size() >= 8);
  for (const auto& f : files) check_loads(f);

  // The 8-bit LoRA examples run on int8 bases (load_in_8bit) with adamw_bnb_8bit mapped to adamw_8bit.
  for (const char* name : {"llama-3_lora-8b.yml", "llama-3_instruct-dpo-lora-8b.yml", "tiny-llama_lora.yml"}) {
    INFO(name);
    auto r = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples" / name);
    CHECK(r.load_in_8bit);
  }

  // Spot checks of what the examples mean.
  auto mistral = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples/mistral_qlora.yml");
  CHECK(mistral.adapter == "qlora");
  CHECK(mistral.load_in_4bit);
  CHECK(mistral.lora_target_modules.size() == 7);
  CHECK(mistral.bf16 == config::Tristate::automatic);
  CHECK(mistral.optimizer == "adamw_8bit");  // adamw_bnb_8bit in the file
  CHECK(mistral.loss_watchdog_threshold == 5.0);
  auto qwen = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples/qwen2_qlora-fsdp.yaml");
  CHECK(qwen.fsdp == std::vector<std::string>{"full_shard", "auto_wrap"});
  CHECK(qwen.fsdp_config->at("fsdp_transformer_layer_cls_to_wrap") == "Qwen2DecoderLayer");
  auto dpo = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples/llama-3_instruct-dpo-lora-8b.yml",
                                 {"load_in_8bit=false"});
  CHECK(dpo.rl == "dpo");
  CHECK(dpo.datasets[0].field_chosen == "chosen");
  CHECK(dpo.datasets[0].roles.at("assistant") == std::vector<std::string>{"assistant"});
  auto grpo = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples/qwen2_5_grpo.yaml");
  CHECK(grpo.trl.num_generations == 16);
  CHECK(grpo.trl.reward_weights == std::vector<double>{1.0});
  auto pre = config::load_recipe(source_dir() / "tests/unit/config/axolotl_examples/tiny-llama_pretrain.yml");
  CHECK(pre.pretraining_dataset.at(0).name == "en");
  CHECK(pre.max_steps == 200);
}
