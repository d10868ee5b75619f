// `llmtune tokenizer train --input FILES --vocab-size N --type bpe|unigram --out DIR`: trains a
// Llama-style SentencePiece tokenizer (byte fallback) and writes tokenizer.model, the matching
// tokenizer.json, tokenizer_config.json (specials, chat template) and special_tokens_map.json.
#include <cstdio>

#include "cli/commands.h"
#include "core/core.h"
#include "pretrain/pretrain.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::cli {

RunFn setup_tokenizer(CLI::App& app) {
  auto o = std::make_shared<pretrain::TokenizerTrainOptions>();
  auto inputs = std::make_shared<std::vector<std::string>>();
  auto no_markers = std::make_shared<bool>(false);
  app.require_subcommand(1);
  CLI::App* train = app.add_subcommand("train", "Train a SentencePiece tokenizer (BPE or Unigram, byte fallback) on text files");
  train->add_option("--input", *inputs, "Text files (one sentence per line; repeat or list several)")->required()->expected(1, -1);
  train->add_option("--vocab-size", o->vocab_size, "Vocabulary size, including specials and the 256 byte pieces")->required();
  train->add_option("--type", o->type, "bpe or unigram")->check(CLI::IsMember({"bpe", "unigram"}));
  train->add_option("--out", o->out, "Output directory")->required();
  train->add_option("--character-coverage", o->character_coverage, "Characters covered by pieces (the rest become bytes)");
  train->add_option("--input-sentence-size", o->input_sentence_size, "Train on a seeded sample of this many lines (0 = all)");
  train->add_option("--threads", o->threads, "Trainer threads (0 = all cores)");
  train->add_option("--chat-template", o->chat_template, "Built-in template name or Jinja source for tokenizer_config.json");
  train->add_option("--model-max-length", o->model_max_length, "model_max_length in tokenizer_config.json");
  train->add_flag("--no-chat-markers", *no_markers, "Do not reserve <|im_start|> / <|im_end|> (ids 3 and 4)");
  return [o, inputs, no_markers, train]() {
    if (!train->parsed()) fail("tokenizer: choose a subcommand: train");
    for (const auto& i : *inputs) o->inputs.emplace_back(i);
    if (*no_markers) {
      o->user_symbols.clear();
      if (o->chat_template == "chatml") o->chat_template.clear();
    }
    auto r = pretrain::train_tokenizer(*o);
    auto t = tok::Tokenizer::load(o->out);  // the result must load in llmtune's own tokenizer
    std::printf("trained a %s tokenizer with %lld pieces in %.1fs; wrote", o->type.c_str(), (long long)r.vocab_size, r.seconds);
    for (const auto& f : r.files) std::printf(" %s", f.filename().string().c_str());
    std::printf(" to %s (loads as %s)\n", o->out.string().c_str(), t->engine().c_str());
    return 0;
  };
}

static const CommandRegistration register_tokenizer{
    {135, "tokenizer", "Train a SentencePiece tokenizer (tokenizer.model + tokenizer.json + config)", setup_tokenizer}};

}  // namespace llmtune::cli
