// Recipe loading: error messages (unknown keys, types, contradictions, refusals), notices,
// --set overrides, aliases, tri-state bf16 and the recipe_to_yaml round trip.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "config/config.h"
#include "core/core.h"

using namespace llmtune;
using config::parse_recipe;
using config::Recipe;

namespace {

// The message of the llmtune::Error thrown by `f`; fails the test if nothing is thrown.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected an llmtune::Error");
  return "";
}

Recipe parse(const std::string& text, const std::vector<std::string>& sets = {}, std::vector<std::string>* notes = nullptr) {
  return parse_recipe(text, "recipe.yaml", sets, notes);
}

// Everything written to stderr (where llmtune::log goes) while running f.
template <class F>
std::string capture_stderr(F&& f) {
  std::fflush(stderr);
  char path[] = "/tmp/llmtune_config_stderr_XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  int saved = dup(2);
  dup2(fd, 2);
  f();
  std::fflush(stderr);
  dup2(saved, 2);
  close(saved);
  close(fd);
  std::ifstream in(path);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::remove(path);
  return s;
}

const char* kBase = "base_model: TinyLlama/TinyLlama-1.1B-Chat-v1.0\n"
                    "datasets:\n"
                    "  - path: mhenrichsen/alpaca_2k_test\n"
                    "    type: alpaca\n";

}  // namespace

TEST_CASE("unknown keys name file:line:column and the closest valid key") {
  std::string msg = error_of([] { parse("base_model: x\nlora_r: 8\n\n\n\n\nlora_alhpa: 16\n"); });
  CHECK(msg == "unknown key `lora_alhpa` at recipe.yaml:7:1 — did you mean `lora_alpha`?");

  msg = error_of([] { parse("datasets:\n  - path: a\n    typ: alpaca\n"); });
  CHECK(msg == "unknown key `typ` in datasets[0] at recipe.yaml:3:5 — did you mean `type`?");

  msg = error_of([] { parse("trl:\n  num_generation: 4\n"); });
  CHECK(msg == "unknown key `num_generation` in trl at recipe.yaml:2:3 — did you mean `num_generations`?");

  msg = error_of([] { parse("zzzzqqqq_xx: 1\n"); });
  CHECK(msg.find("unknown key `zzzzqqqq_xx` at recipe.yaml:1:1") == 0);
  CHECK(msg.find("llmtune inspect --keys") != std::string::npos);

  msg = error_of([] { parse("datasets:\n  - path: a\n    type:\n      field_instrction: q\n"); });
  CHECK(msg.find("did you mean `field_instruction`") != std::string::npos);
  CHECK(msg.find("recipe.yaml:4:7") != std::string::npos);
}

TEST_CASE("wrong types name file:line:column, the key and the expected type") {
  CHECK(error_of([] { parse("base_model: x\nlora_r: sixteen\n"); }) ==
        "wrong type for `lora_r` at recipe.yaml:2:9: expected an integer, got `sixteen`");
  CHECK(error_of([] { parse("sample_packing: maybe\n"); }) ==
        "wrong type for `sample_packing` at recipe.yaml:1:17: expected a bool (true or false), got `maybe`");
  CHECK(error_of([] { parse("learning_rate: [1, 2]\n"); }) ==
        "wrong type for `learning_rate` at recipe.yaml:1:16: expected a number, got a list");
  CHECK(error_of([] { parse("datasets:\n  - path: a\n    split: {a: 1}\n"); }) ==
        "wrong type for `datasets[0].split` at recipe.yaml:3:12: expected a string, got a map");
  CHECK(error_of([] { parse("datasets: mhenrichsen/alpaca\n"); }).find("expected a list of dataset entries") != std::string::npos);
  // Ranges and enum-like values also point at the value.
  CHECK(error_of([] { parse("lora_dropout: 1.5\n"); }) ==
        "`lora_dropout: 1.5` at recipe.yaml:1:15 is out of range: expected a value in [0.0, 1.0)");
  CHECK(error_of([] { parse("lr_scheduler: cosin\n"); }).find(
            "`lr_scheduler: cosin` at recipe.yaml:1:15 is not a valid value; expected one of: cosine, linear") == 0);
  CHECK(error_of([] { parse("lr_scheduler: cosin\n"); }).find("did you mean `cosine`?") != std::string::npos);
  // Integral floats are accepted for integer keys (pydantic coerces them too), fractions are not.
  CHECK(parse("lora_r: 16.0\n").lora_r == 16);
  CHECK(error_of([] { parse("lora_r: 16.5\n"); }).find("expected an integer") != std::string::npos);
}

TEST_CASE("syntax errors and duplicate keys are reported with their position") {
  CHECK(error_of([] { parse("base_model: x\nlora_r: [1, 2\n"); }).find("recipe.yaml:") == 0);
  CHECK(error_of([] { parse("base_model: x\nlora_r: 8\nlora_r: 16\n"); }) == "duplicate key `lora_r` at recipe.yaml:3:1");
  CHECK(error_of([] { parse("- a\n- b\n"); }).find("a recipe must be a map") != std::string::npos);
  // An empty file is an empty recipe: every default.
  CHECK(parse("") == parse("{}"));
}

TEST_CASE("required keys depend on the stage") {
  Recipe no_model = parse("datasets:\n  - path: a\n    type: alpaca\n");
  std::string msg = error_of([&] { config::validate_for_stage(no_model, "sft"); });
  CHECK(msg.find("recipe.yaml: `llmtune sft` needs `base_model`") == 0);
  Recipe no_data = parse("base_model: x\n");
  CHECK(error_of([&] { config::validate_for_stage(no_data, "sft"); }).find("needs `datasets`") != std::string::npos);
  CHECK(error_of([&] { config::validate_for_stage(no_data, "pretrain"); }).find("pretraining_dataset") != std::string::npos);

  Recipe sft = parse(kBase);
  CHECK_NOTHROW(config::validate_for_stage(sft, "sft"));
  CHECK_NOTHROW(config::validate_for_stage(sft, "pretrain"));
  CHECK_NOTHROW(config::validate_for_stage(sft, "dpo"));  // rl unset: dpo runs plain DPO
  CHECK(error_of([&] { config::validate_for_stage(sft, "ppo"); }).find("trl.reward_model_path") != std::string::npos);
  CHECK(error_of([&] { config::validate_for_stage(sft, "stf"); }).find("did you mean `sft`?") != std::string::npos);

  Recipe dpo = parse(std::string(kBase) + "rl: dpo\n");
  CHECK(dpo.dpo_loss_type == "sigmoid");
  CHECK_NOTHROW(config::validate_for_stage(dpo, "dpo"));
  CHECK(error_of([&] { config::validate_for_stage(dpo, "sft"); }).find("run `llmtune dpo`") != std::string::npos);
  Recipe grpo = parse(std::string(kBase) + "rl: grpo\n");
  CHECK(error_of([&] { config::validate_for_stage(grpo, "dpo"); }).find("rl: grpo") != std::string::npos);
  CHECK(error_of([&] { config::validate_for_stage(grpo, "ppo"); }).find("trl.reward_funcs") != std::string::npos);
  CHECK_NOTHROW(config::validate_for_stage(parse(std::string(kBase) + "rl: grpo\ntrl:\n  reward_funcs: [r.f]\n"), "ppo"));
  Recipe reward = parse(std::string(kBase) + "reward_model: true\n");
  CHECK_NOTHROW(config::validate_for_stage(reward, "reward"));
  CHECK(error_of([&] { config::validate_for_stage(reward, "sft"); }).find("llmtune reward") != std::string::npos);

  // A dataset entry always needs a path, whatever the stage.
  CHECK(error_of([] { parse("datasets:\n  - type: alpaca\n"); }) ==
        "datasets[0] at recipe.yaml:2:5 has no `path` (the dataset to read: a hub id, file or directory)");
}

TEST_CASE("contradictory keys are refused naming both") {
  CHECK(error_of([] { parse("warmup_steps: 10\nwarmup_ratio: 0.1\n"); }) ==
        "`warmup_steps` (recipe.yaml:1:1) and `warmup_ratio` (recipe.yaml:2:1) contradict: set only one way of giving the warmup length");
  CHECK(error_of([] { parse("bf16: true\nfp16: true\n"); }).find("`bf16` (recipe.yaml:1:1) and `fp16` (recipe.yaml:2:1) contradict") == 0);
  CHECK_NOTHROW(parse("bf16: auto\nfp16: false\n"));
  // Both quantizations: reported as a pair before load_in_8bit's own refusal.
  CHECK(error_of([] { parse("load_in_4bit: true\nload_in_8bit: true\nadapter: qlora\n"); })
            .find("`load_in_4bit` (recipe.yaml:1:1) and `load_in_8bit` (recipe.yaml:2:1) contradict") == 0);
  std::string msg = error_of([] { parse("adapter: qlora\n"); });
  CHECK(msg.find("`adapter` (recipe.yaml:1:1) and `load_in_4bit` ((default)) contradict") == 0);
  CHECK(msg.find("needs `load_in_4bit: true`") != std::string::npos);
  CHECK(error_of([] { parse("load_in_4bit: true\nadapter: lora\n"); }).find("use `adapter: qlora`") != std::string::npos);
  CHECK(error_of([] { parse("max_steps: 0\n"); }) ==
        "`max_steps: 0` (recipe.yaml:1:1) must be positive; remove it to train for num_epochs");
  CHECK(error_of([] { parse("max_steps: -5\n"); }).find("must be positive") != std::string::npos);
  CHECK(error_of([] { parse("eval_steps: 50\nevals_per_epoch: 4\n"); }).find("`eval_steps`") == 0);
  CHECK(error_of([] { parse("save_steps: 50\nsaves_per_epoch: 4\n"); }).find("`saves_per_epoch`") != std::string::npos);
  CHECK(error_of([] { parse("cosine_min_lr_ratio: 0.1\nmin_lr: 1e-6\n"); }).find("contradict") != std::string::npos);
  CHECK(error_of([] { parse("rl: ipo\ndpo_loss_type: sigmoid\n"); }).find("`rl` (recipe.yaml:1:1) and `dpo_loss_type`") == 0);
  CHECK(error_of([] { parse("fsdp: [full_shard]\nzero_stage: 3\n"); }).find("`fsdp`") == 0);
}

TEST_CASE("no-op keys are accepted with a one-line notice through llmtune::log::notice") {
  log::set_level(log::Level::info);
  std::vector<std::string> notes;
  Recipe r;
  std::string err = capture_stderr([&] {
    r = parse(std::string(kBase) + "wandb_project: my-proj\nflash_attention: true\nstrict: false\nwandb_entity:\n", {}, &notes);
  });
  CHECK(r.wandb_project == "my-proj");
  CHECK(r.flash_attention == true);
  REQUIRE(notes.size() == 2);  // strict: false is the default and wandb_entity is empty: no notice
  CHECK(notes[0].find("`wandb_project: my-proj` has no effect: ") == 0);
  CHECK(notes[1].find("`flash_attention: true` has no effect: ") == 0);
  CHECK(err.find("note: `wandb_project: my-proj` has no effect") != std::string::npos);
  CHECK(err.find("note: `flash_attention: true` has no effect") != std::string::npos);
  // One line each.
  for (const auto& n : notes) CHECK(n.find('\n') == std::string::npos);

  // A value mapped onto an implemented one says so.
  notes.clear();
  Recipe o = parse("optimizer: adamw_bnb_8bit\n", {}, &notes);
  CHECK(o.optimizer == "adamw_8bit");
  REQUIRE(notes.size() == 1);
  CHECK(notes[0].find("`optimizer: adamw_bnb_8bit` runs as `adamw_8bit`: the same block-wise 8-bit AdamW") == 0);
}

TEST_CASE("keys llmtune does not implement are refused with the reason") {
  CHECK(error_of([] { parse("relora_steps: 150\n"); }) ==
        "`relora_steps` at recipe.yaml:1:1 is not supported: ReLoRA (periodic LoRA merge-and-restart) is not implemented");
  CHECK(error_of([] { parse("lisa_n_layers: 4\n"); }).find("LISA") != std::string::npos);
  CHECK(error_of([] { parse("s2_attention: true\n"); }).find("shifted sparse attention") != std::string::npos);
  CHECK(error_of([] { parse("optimizer: adafactor\n"); }).find("Adafactor is not implemented") != std::string::npos);
  CHECK(error_of([] { parse("adapter: llama-adapter\n"); }).find("LLaMA-Adapter is not implemented") != std::string::npos);
  CHECK(error_of([] { parse("save_safetensors: false\n"); }).find("never pickles") != std::string::npos);
  // Written empty or false (as Axolotl's examples do), a refused key is harmless.
  Recipe r;
  CHECK_NOTHROW(r = parse("relora_steps:\ns2_attention: false\nload_in_8bit: false\nlora_fan_in_fan_out:\ngptq: false\n"));
  CHECK_FALSE(r.load_in_8bit);
  // Several refusals: the first is shown and the rest counted.
  CHECK(error_of([] { parse("relora_steps: 1\nlisa_n_layers: 2\n"); }).find("(and 1 more refused key(s))") != std::string::npos);
}

TEST_CASE("gptq: true: LoRA over a GPTQ checkpoint base") {
  Recipe r = parse("base_model: x\nadapter: lora\ngptq: true\n");
  CHECK(r.gptq);
  CHECK(error_of([] { parse("base_model: x\ngptq: true\n"); }).find("`gptq` (recipe.yaml:2:1) and `adapter` ((default)) contradict") != std::string::npos);
  CHECK(error_of([] { parse("base_model: x\nadapter: lora\ngptq: true\nload_in_8bit: true\n"); })
            .find("already quantized") != std::string::npos);
  r.datasets.emplace_back();
  r.datasets.back().path = "d.jsonl";
  CHECK_NOTHROW(config::validate_for_stage(r, "sft"));
  CHECK(error_of([&] { config::validate_for_stage(r, "dpo"); }).find("`gptq: true`") != std::string::npos);
}

TEST_CASE("bf16 is a tri-state: true, false or auto") {
  CHECK(parse("bf16: auto\n").bf16 == config::Tristate::automatic);
  CHECK(parse("bf16: true\n").bf16 == config::Tristate::on);
  CHECK(parse("bf16: false\n").bf16 == config::Tristate::off);
  CHECK(parse("bf16:\n").bf16 == config::Tristate::off);
  CHECK(error_of([] { parse("bf16: sometimes\n"); }) ==
        "wrong type for `bf16` at recipe.yaml:1:7: expected true, false or auto, got `sometimes`");
  CHECK(config::recipe_to_yaml(parse("bf16: auto\n")).find("\nbf16: auto\n") != std::string::npos);
}

TEST_CASE("dpo_beta is an alias of rl_beta; noisy_embedding_alpha of neftune_noise_alpha") {
  CHECK(parse("dpo_beta: 0.25\n").rl_beta == 0.25);
  CHECK(parse("dpo_beta: 0.25\n") == parse("rl_beta: 0.25\n"));
  CHECK(parse("noisy_embedding_alpha: 5\n").neftune_noise_alpha == 5.0);
  std::string msg = error_of([] { parse("rl_beta: 0.1\ndpo_beta: 0.2\n"); });
  CHECK(msg == "`dpo_beta` (recipe.yaml:2:1) is an alias of `rl_beta`, which is also set by `rl_beta` (recipe.yaml:1:1); set only one");
  CHECK(error_of([] { parse("dpo_beta: 0.2\nrl_beta: 0.1\n"); }).find("also set by its alias `dpo_beta`") != std::string::npos);
  // The resolved recipe uses the canonical name only.
  std::string y = config::recipe_to_yaml(parse("dpo_beta: 0.25\n"));
  CHECK(y.find("rl_beta: 0.25") != std::string::npos);
  CHECK(y.find("dpo_beta") == std::string::npos);
  // --set through the alias replaces the canonical key from the file (and vice versa).
  CHECK(parse("rl_beta: 0.1\n", {"dpo_beta=0.3"}).rl_beta == 0.3);
  CHECK(parse("dpo_beta: 0.1\n", {"rl_beta=0.4"}).rl_beta == 0.4);
  // message_field_role / message_field_content fold into message_property_mappings.
  Recipe m = parse("datasets:\n  - path: a\n    type: chat_template\n    message_field_role: from\n    message_field_content: value\n");
  CHECK(m.datasets[0].message_property_mappings == config::StrMap{{"role", "from"}, {"content", "value"}});
  CHECK(error_of([] {
          parse("datasets:\n  - path: a\n    message_property_mappings: {role: r}\n    message_field_role: from\n");
        }).find("set only one") != std::string::npos);
}

TEST_CASE("--set overrides: scalars, nested dataset keys, flow lists, maps") {
  Recipe r = parse(kBase, {"lora_r=16", "learning_rate=1e-4", "datasets.0.path=other/data",
                           "lora_target_modules=[q_proj,v_proj]", "bf16=auto", "special_tokens.pad_token=<pad>",
                           "datasets.1.path=second", "datasets.1.type=completion", "default_system_message=You are: helpful",
                           "trl.kl_coef=0.2"});
  CHECK(r.lora_r == 16);
  CHECK(r.learning_rate == 1e-4);
  REQUIRE(r.datasets.size() == 2);
  CHECK(r.datasets[0].path == "other/data");
  CHECK(r.datasets[0].type == "alpaca");  // untouched siblings stay
  CHECK(r.datasets[1].path == "second");
  CHECK(r.datasets[1].type == "completion");
  CHECK(r.lora_target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(r.bf16 == config::Tristate::automatic);
  CHECK(r.special_tokens.at("pad_token") == "<pad>");
  CHECK(r.default_system_message == "You are: helpful");
  CHECK(r.trl.kl_coef == 0.2);
  // A whole list in flow syntax, and unsetting a key with an empty value.
  Recipe d = parse(std::string(kBase) + "max_steps: 10\n", {"datasets=[{path: x, type: alpaca}, {path: y, type: completion}]", "max_steps="});
  REQUIRE(d.datasets.size() == 2);
  CHECK(d.datasets[1].path == "y");
  CHECK_FALSE(d.max_steps.has_value());

  CHECK(error_of([] { parse(kBase, {"lora_alhpa=16"}); }) == "unknown key `lora_alhpa` in --set lora_alhpa=16 — did you mean `lora_alpha`?");
  CHECK(error_of([] { parse(kBase, {"datasets.0.pth=x"}); }) ==
        "unknown key `pth` of a dataset entry in --set datasets.0.pth=x — did you mean `path`?");
  // Type errors in an override name the override instead of a line of the file.
  CHECK(error_of([] { parse(kBase, {"lora_r=abc"}); }) == "wrong type for `lora_r` at --set lora_r=abc: expected an integer, got `abc`");
  CHECK(error_of([] { parse(kBase, {"datasets.0.shards=[a]"}); }) ==
        "wrong type for `datasets[0].shards` at --set datasets.0.shards=[a]: expected an integer, got a list");
  // A string key keeps text that is not a YAML scalar as it is.
  CHECK(parse(kBase, {"datasets.0.split=[a]"}).datasets[0].split == "[a]");
  CHECK(error_of([] { parse(kBase, {"datasets.5.path=x"}); }).find("index 5 does not exist") != std::string::npos);
  CHECK(error_of([] { parse(kBase, {"lora_r"}); }).find("--set expects key=value") == 0);
  CHECK(error_of([] { parse(kBase, {"lora_r.x=1"}); }).find("is not a map") != std::string::npos);
  // Contradictions created by an override point at it.
  CHECK(error_of([] { parse("warmup_steps: 10\n", {"warmup_ratio=0.1"}); }).find("(--set warmup_ratio=0.1)") != std::string::npos);

  // On an already-loaded recipe.
  Recipe base = parse(kBase);
  Recipe over = config::apply_overrides(base, {"micro_batch_size=4", "datasets.0.split=train[:10%]"});
  CHECK(over.micro_batch_size == 4);
  CHECK(over.datasets[0].split == "train[:10%]");
  CHECK(over.eval_batch_size == 1);  // resolved from the original micro_batch_size, as printed
}

TEST_CASE("recipe_to_yaml prints every default and round-trips") {
  const std::string text = std::string(kBase) +
                           "test_datasets:\n  - path: held/out\n    type: completion\n    field: body\n"
                           "adapter: lora\nlora_r: 64\nlora_alpha: 32\nlora_dropout: 0.1\nlora_target_linear: true\n"
                           "learning_rate: 2e-4\nbf16: auto\nwarmup_ratio: 0.03\nspecial_tokens: {pad_token: \"</s>\", bos_token: '<s>'}\n"
                           "default_system_message: \"You are a helpful assistant.\\nBe brief: \\\"yes\\\" # or no\"\n"
                           "chat_template_jinja: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n"
                           "fsdp_config: {fsdp_offload_params: true, fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer, n: 1.5}\n"
                           "wandb_project: proj\nneftune_noise_alpha: 5\ntokens: ['<|im_start|>', 'true', '123', '']\n"
                           "seed: -7\nweight_decay: 0.1\nadam_epsilon: 1e-10\nval_set_size: 0\n"
                           "rl: dpo\ndpo_beta: 0.05\ntrl:\n  reward_weights: [1.0, 0.5]\n  reward_funcs: [a.b, c]\n";
  Recipe r = parse(text);
  std::string y = config::recipe_to_yaml(r);
  INFO(y);
  Recipe back = parse_recipe(y, "recipe.yaml");
  CHECK(back == r);
  CHECK(config::recipe_to_yaml(back) == y);
  // Defaults are filled in, including derived ones.
  CHECK(y.find("\nsequence_len: 512\n") != std::string::npos);
  CHECK(y.find("\neval_batch_size: 1\n") != std::string::npos);
  CHECK(y.find("\noptimizer: adamw_torch\n") != std::string::npos);
  CHECK(y.find("\nmax_steps: null\n") != std::string::npos);
  CHECK(y.find("\nlearning_rate: 0.0002\n") != std::string::npos);
  CHECK(y.find("\nadam_epsilon: 1.0e-10\n") != std::string::npos);  // PyYAML reads it as a float
  CHECK(y.find("    train_on_eot: turn\n") != std::string::npos);
  // Every implemented top-level key appears.
  for (const auto& k : config::recipe_keys())
    if (k.section.empty() && k.status == config::KeyStatus::implemented) CHECK(y.find("\n" + k.name + ":") != std::string::npos);
  // No-op keys only when set; refused keys never.
  CHECK(y.find("\nwandb_project: proj\n") != std::string::npos);
  CHECK(y.find("wandb_entity") == std::string::npos);
  CHECK(y.find("\ngptq: false\n") != std::string::npos);  // an implemented key (LoRA on a GPTQ base)

  // llmtune's own dataset keys.
  Recipe w = parse("datasets:\n  - path: a.txt\n    type: completion\n    text_split: paragraph\n    weight: 0.5\n");
  CHECK(w.datasets[0].weight == 0.5);
  CHECK(w.datasets[0].text_split == "paragraph");
  CHECK(parse_recipe(config::recipe_to_yaml(w), "recipe.yaml") == w);
  CHECK(error_of([] { parse("datasets:\n  - path: a\n    weight: 0\n"); }).find("out of range") != std::string::npos);

  // A custom prompt format (type given as a map) round-trips as a map.
  Recipe c = parse("datasets:\n  - path: a\n    type:\n      field_instruction: q\n      format: \"[INST] {instruction} [/INST]\"\n");
  CHECK(c.datasets[0].type == "user_defined");
  CHECK(c.datasets[0].format == "[INST] {instruction} [/INST]");
  std::string cy = config::recipe_to_yaml(c);
  CHECK(cy.find("type: {field_instruction: q, format: \"[INST] {instruction} [/INST]\"}") != std::string::npos);
  CHECK(parse_recipe(cy, "c.yaml") == c);

  // save_resolved writes output_dir/recipe.resolved.yaml that loads back equal.
  auto dir = std::filesystem::temp_directory_path() / ("llmtune_config_test_" + std::to_string(::getpid()));
  config::save_resolved(r, dir);
  CHECK(config::load_recipe(dir / "recipe.resolved.yaml") == r);
  std::filesystem::remove_all(dir);
}

TEST_CASE("bnb_config_kwargs folds into the bnb_4bit keys") {
  Recipe r = parse("load_in_4bit: true\nadapter: qlora\nbnb_config_kwargs:\n  llm_int8_has_fp16_weight: false\n"
                   "  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n");
  CHECK(r.bnb_4bit_quant_type == "fp4");
  CHECK_FALSE(r.bnb_4bit_use_double_quant);
  CHECK_FALSE(r.bnb_config_kwargs.has_value());
  CHECK(parse_recipe(config::recipe_to_yaml(r), "recipe.yaml") == r);
  CHECK(error_of([] { parse("bnb_config_kwargs: {bnb_4bit_quant_storage: uint8}\n"); }).find("is not supported") != std::string::npos);
}

TEST_CASE("deepspeed configs give the ZeRO stage") {
  CHECK(parse("deepspeed: {zero_optimization: {stage: 2}}\n").zero_stage == 2);
  std::vector<std::string> notes;
  CHECK(parse("deepspeed: deepspeed_configs/zero3_bf16.json\n", {}, &notes).zero_stage == 3);
  REQUIRE(notes.size() == 1);
  CHECK(notes[0].find("using ZeRO stage 3 from its name") != std::string::npos);
  CHECK(error_of([] { parse("deepspeed: ds.json\n"); }).find("set `zero_stage: 0..3` instead") != std::string::npos);
  CHECK(error_of([] { parse("deepspeed: {zero_optimization: {stage: 2}}\nzero_stage: 3\n"); }).find("contradict") != std::string::npos);
  // A real file next to the recipe.
  auto dir = std::filesystem::temp_directory_path() / ("llmtune_ds_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "ds.json") << R"({"zero_optimization": {"stage": 1}, "bf16": {"enabled": "auto"}})";
  std::ofstream(dir / "r.yaml") << "deepspeed: ds.json\n";
  CHECK(config::load_recipe(dir / "r.yaml").zero_stage == 1);
  std::filesystem::remove_all(dir);
  CHECK(error_of([] { config::load_recipe("/nonexistent/recipe.yaml"); }) == "cannot read recipe /nonexistent/recipe.yaml: no such file");
}

TEST_CASE("the key registry: one entry per key, with types, defaults and statuses") {
  const auto& keys = config::recipe_keys();
  std::set<std::string> seen;
  for (const auto& k : keys) {
    CHECK(seen.insert(k.section + "/" + k.name).second);
    CHECK_FALSE(k.help.empty());
    if (k.status == config::KeyStatus::refused || k.status == config::KeyStatus::accepted_noop) CHECK_FALSE(k.note.empty());
  }
  auto find = [&](const std::string& section, const std::string& name) -> const config::KeyInfo* {
    for (const auto& k : keys)
      if (k.section == section && k.name == name) return &k;
    return nullptr;
  };
  // Every key the project issue names exists.
  const char* top[] = {"base_model", "base_model_config", "tokenizer_config", "tokenizer_type", "model_type", "trust_remote_code",
                       "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "sequence_len", "sample_packing",
                       "pad_to_sequence_len", "eval_sample_packing", "adapter", "lora_model_dir", "lora_r", "lora_alpha",
                       "lora_dropout", "lora_target_modules", "lora_target_linear", "lora_modules_to_save", "lora_fan_in_fan_out",
                       "peft_use_dora", "peft_use_rslora", "loraplus_lr_ratio", "load_in_4bit", "load_in_8bit",
                       "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "micro_batch_size",
                       "gradient_accumulation_steps", "eval_batch_size", "num_epochs", "max_steps", "learning_rate",
                       "lr_scheduler", "cosine_min_lr_ratio", "min_lr", "warmup_steps", "warmup_ratio", "optimizer", "adam_beta1",
                       "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "bf16", "fp16", "tf32",
                       "gradient_checkpointing", "train_on_inputs", "chat_template", "chat_template_jinja",
                       "default_system_message", "special_tokens", "tokens", "eval_steps", "evals_per_epoch", "save_steps",
                       "saves_per_epoch", "save_total_limit", "logging_steps", "output_dir", "seed", "resume_from_checkpoint",
                       "auto_resume_from_checkpoints", "early_stopping_patience", "group_by_length", "unfrozen_parameters", "rl",
                       "rl_beta", "dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "simpo_gamma", "cpo_alpha", "orpo_alpha",
                       "precompute_ref_log_probs", "reward_model", "deepspeed", "fsdp", "fsdp_config", "zero_stage",
                       "ddp_backend", "ddp_timeout", "local_rank", "strict", "flash_attention", "sdp_attention",
                       "xformers_attention", "attn_implementation", "wandb_project", "wandb_entity", "wandb_name",
                       "wandb_watch", "wandb_log_model", "wandb_mode", "wandb_run_id", "mlflow_tracking_uri", "hub_model_id",
                       "hub_strategy", "push_dataset_to_hub", "use_tensorboard", "eval_tasks", "gptq", "neftune_noise_alpha",
                       "noisy_embedding_alpha", "debug", "is_llama_derived_model", "is_mistral_derived_model",
                       "is_qwen_derived_model", "relora_steps", "lisa_n_layers", "trl"};
  for (const char* k : top) {
    INFO(k);
    CHECK(find("", k) != nullptr);
  }
  const char* ds[] = {"path", "type", "split", "data_files", "name", "field_messages", "message_property_mappings",
                      "message_field_role", "message_field_content", "roles", "roles_to_train", "train_on_eos",
                      "chat_template", "field_instruction", "field_input", "field_output", "field"};
  for (const char* k : ds) {
    INFO(k);
    CHECK(find("datasets[]", k) != nullptr);
  }
  CHECK(find("", "dpo_beta")->status == config::KeyStatus::alias);
  CHECK(find("", "dpo_beta")->note == "rl_beta");
  CHECK(find("", "wandb_project")->status == config::KeyStatus::accepted_noop);
  CHECK(find("", "load_in_8bit")->status == config::KeyStatus::implemented);
  CHECK(find("", "lora_r")->default_value == "8");
  CHECK(find("", "learning_rate")->default_value == "5.0e-05");
  CHECK(find("", "bf16")->type == "bool|auto");
  CHECK(find("", "eval_batch_size")->default_value == "= micro_batch_size");
  CHECK(find("", "adapter")->choices.size() >= 2);
  std::string table = config::format_recipe_keys();
  CHECK(table.find("lora_alpha") != std::string::npos);
  CHECK(table.find("datasets[].field_messages") != std::string::npos);
  CHECK(table.find("trl.kl_coef") != std::string::npos);
  CHECK(table.find("refused: removed from Axolotl; use sample_packing") != std::string::npos);
}
