// `llmtune tokenize`: encode text with a tokenizer (a model directory or a tokenizer directory)
// and print the ids, one line of output per input line; --decode reverses it.
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::cli {

RunFn setup_tokenize(CLI::App& app) {
  struct Opts {
    std::string tokenizer, text, file;
    bool no_special = false, json = false, decode = false, tokens = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--tokenizer,--model", o->tokenizer, "Directory with tokenizer.json or tokenizer.model")->required();
  app.add_option("--text", o->text, "Text to encode");
  app.add_option("--file", o->file, "Encode every line of this file (- for stdin)");
  app.add_flag("--no-special", o->no_special, "Do not add BOS/EOS");
  app.add_flag("--tokens", o->tokens, "Print token strings next to ids");
  app.add_flag("--json", o->json, "One JSON array of ids per line");
  app.add_flag("--decode", o->decode, "Input lines are JSON arrays of ids: print their text");
  return [o]() {
    auto tk = tok::Tokenizer::load(o->tokenizer);
    auto handle = [&](const std::string& line) {
      if (o->decode) {
        auto ids = nlohmann::json::parse(line).get<std::vector<int32_t>>();
        std::cout << nlohmann::json(tk->decode(ids)).dump() << "\n";
        return;
      }
      auto ids = tk->encode(line, !o->no_special);
      if (o->json) {
        std::cout << nlohmann::json(ids).dump() << "\n";
      } else {
        for (size_t i = 0; i < ids.size(); ++i) {
          if (i) std::cout << ' ';
          std::cout << ids[i];
          if (o->tokens) std::cout << ':' << nlohmann::json(tk->id_to_token(ids[i])).dump();
        }
        std::cout << "\n";
      }
    };
    if (!o->text.empty()) handle(o->text);
    if (!o->file.empty()) {
      std::ifstream f;
      std::istream* in = &std::cin;
      if (o->file != "-") {
        f.open(o->file);
        if (!f) fail("cannot open {}", o->file);
        in = &f;
      }
      std::string line;
      while (std::getline(*in, line)) handle(line);
    }
    if (o->text.empty() && o->file.empty()) fail("give --text TEXT or --file FILE");
    return 0;
  };
}

static const CommandRegistration register_tokenize{{130, "tokenize", "Encode text with a model's tokenizer and print the ids", setup_tokenize}};

}  // namespace llmtune::cli
