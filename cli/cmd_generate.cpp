// `llmtune generate`: text from a model, streamed to stdout. Plain prompts are encoded with
// the tokenizer's special tokens (BOS); --chat renders the prompt with the chat template and
// adds the generation prompt, exactly as transformers' apply_chat_template would.
#include <iostream>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"

namespace llmtune::cli {
namespace {

struct GenerateOpts {
  std::string model, tokenizer, prompt, system, chat_template, dtype = "fp32";
  bool chat = false, greedy = false, sample = false, json = false, skip_special = true;
  int64_t max_new_tokens = 128, top_k = 50;
  double temperature = 1.0, top_p = 1.0, repetition_penalty = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> stops, adapters;
  int threads = 0;
};

// Generates one reply; streams it to stdout unless `quiet`; honours stop strings.
std::pair<std::string, std::vector<int64_t>> reply(LoadedModel& lm, const std::vector<int32_t>& prompt,
                                                   const model::GenerationConfig& gen,
                                                   const std::vector<std::string>& stops, bool skip_special,
                                                   bool stream) {
  tok::StreamDecoder decoder(*lm.tokenizer, skip_special);
  std::string text;
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  bool stopped_by_string = false;
  auto produced = model::generate(*lm.model, ids, gen, [&](int64_t token) {
    std::string piece = decoder.put(static_cast<int32_t>(token));
    size_t before = text.size();
    text += piece;
    for (const auto& s : stops) {
      // Search only where a new match can start, then cut the text at the stop string.
      size_t from = before >= s.size() ? before - s.size() + 1 : 0;
      size_t at = text.find(s, from);
      if (at != std::string::npos) {
        if (stream && at > before) std::cout << text.substr(before, at - before);
        text.resize(at);
        stopped_by_string = true;
        return false;
      }
    }
    if (stream) std::cout << piece << std::flush;
    return true;
  });
  if (!stopped_by_string) {
    std::string rest = decoder.finish();
    text += rest;
    if (stream) std::cout << rest;
  }
  if (stream) std::cout << std::endl;
  return {text, produced};
}

int run_generate(const GenerateOpts& o) {
  set_threads(o.threads);
  if (o.greedy && o.sample) fail("--greedy and --sample contradict each other; choose one");
  auto lm = load_model_and_tokenizer(o.model, o.tokenizer, o.dtype, o.adapters);
  auto gen = model::GenerationConfig::from_model_dir(lm.dir, lm.model->config());
  gen.max_new_tokens = o.max_new_tokens;
  if (o.greedy) gen.do_sample = false;
  if (o.sample) gen.do_sample = true;
  gen.temperature = o.temperature;
  gen.top_k = o.top_k;
  gen.top_p = o.top_p;
  gen.repetition_penalty = o.repetition_penalty;
  gen.seed = o.seed;
  if (gen.eos_token_ids.empty() && lm.tokenizer->eos_id()) gen.eos_token_ids.push_back(*lm.tokenizer->eos_id());

  std::optional<tok::ChatTemplate> tmpl;
  if (o.chat) tmpl = tok::select_chat_template(*lm.tokenizer, o.chat_template);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (o.chat && !o.system.empty()) messages.push_back({{"role", "system"}, {"content", o.system}});

  auto encode_turn = [&](const std::string& user_text) {
    if (!o.chat) {
      auto checked = lm.tokenizer->encode_with_bos_check(user_text, true);
      for (const auto& w : checked.warnings) log::warn(w);
      return checked.ids;
    }
    messages.push_back({{"role", "user"}, {"content", user_text}});
    auto rendered = tmpl->render(messages, tok::chat_render_options(*lm.tokenizer, true));
    // The template already holds BOS where the model wants it: encode without adding specials.
    return lm.tokenizer->encode(rendered.text, false);
  };

  if (!o.prompt.empty()) {
    auto ids = encode_turn(o.prompt);
    double t0 = now_seconds();
    auto [text, produced] = reply(lm, ids, gen, o.stops, o.skip_special, !o.json);
    double dt = now_seconds() - t0;
    if (o.json) {
      nlohmann::json j = {{"prompt_tokens", ids.size()}, {"tokens", produced}, {"text", text}};
      std::cout << j.dump() << std::endl;
    }
    log::info(fmt::format("{} tokens in {:.2f}s ({:.1f} tokens/s)", produced.size(), dt, produced.size() / std::max(dt, 1e-9)));
    return 0;
  }
  if (!o.chat) fail("give --prompt TEXT, or --chat for an interactive conversation on stdin");
  // Interactive chat: one user turn per line until EOF; the conversation is kept.
  std::string line;
  std::cerr << "chat with " << lm.dir.string() << " (end with Ctrl-D)\n> " << std::flush;
  while (std::getline(std::cin, line)) {
    if (line.empty()) { std::cerr << "> " << std::flush; continue; }
    auto ids = encode_turn(line);
    auto [text, produced] = reply(lm, ids, gen, o.stops, o.skip_special, true);
    messages.push_back({{"role", "assistant"}, {"content", text}});
    std::cerr << "> " << std::flush;
  }
  return 0;
}

}  // namespace

RunFn setup_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOpts>();
  app.add_option("--model", o->model, "Model directory (config.json + safetensors) or hub id")->required();
  app.add_option("--tokenizer", o->tokenizer, "Tokenizer directory (default: the model's)");
  app.add_option("--prompt,-p", o->prompt, "Prompt text (omit with --chat for an interactive session)");
  app.add_flag("--chat", o->chat, "Render the prompt with the chat template and add the generation prompt");
  app.add_option("--system", o->system, "System message for --chat");
  app.add_option("--chat-template", o->chat_template, "Built-in template name (default: the tokenizer's own)");
  app.add_flag("--greedy", o->greedy, "Greedy decoding (the default unless generation_config.json samples)");
  app.add_flag("--sample", o->sample, "Sample with temperature/top-k/top-p");
  app.add_option("--max-new-tokens,-n", o->max_new_tokens, "Maximum tokens to generate")->capture_default_str();
  app.add_option("--temperature", o->temperature, "Sampling temperature")->capture_default_str();
  app.add_option("--top-k", o->top_k, "Top-k (0 disables)")->capture_default_str();
  app.add_option("--top-p", o->top_p, "Top-p nucleus (1 disables)")->capture_default_str();
  app.add_option("--repetition-penalty", o->repetition_penalty, "HF repetition penalty")->capture_default_str();
  app.add_option("--seed", o->seed, "Sampling seed")->capture_default_str();
  app.add_option("--stop", o->stops, "Stop when this string appears (repeatable)");
  app.add_option("--adapter", o->adapters, "PEFT LoRA adapter directory applied unmerged (repeatable, in order)");
  app.add_option("--dtype", o->dtype, "fp32 | bf16 | fp16 | auto")->capture_default_str();
  app.add_option("--threads", o->threads, "CPU threads (default: all cores)");
  app.add_flag("--json", o->json, "Print one JSON line {prompt_tokens, tokens, text} instead of streaming");
  return [o]() { return run_generate(*o); };
}

static const CommandRegistration register_generate{{100, "generate", "Generate text from a model (greedy or sampled, chat or plain)", setup_generate}};

}  // namespace llmtune::cli
