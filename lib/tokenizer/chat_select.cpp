// Picking a chat template for a tokenizer (recipe `chat_template`, CLI `--chat-template`).
#include <fmt/ranges.h>

#include "tokenizer/tokenizer.h"

namespace llmtune::tok {

ChatTemplate select_chat_template(const Tokenizer& tokenizer, const std::string& requested,
                                  const std::string& jinja_source) {
  const std::string fallback_prefix = "tokenizer_default_fallback_";
  if (requested.empty() || requested == "tokenizer_default" || requested.rfind(fallback_prefix, 0) == 0) {
    if (!tokenizer.chat_template().empty()) return ChatTemplate::from_jinja(tokenizer.chat_template(), "tokenizer");
    if (requested.rfind(fallback_prefix, 0) == 0) return ChatTemplate::builtin(requested.substr(fallback_prefix.size()));
    fail("the tokenizer in {} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); "
         "choose a built-in one: {}",
         tokenizer.source().string(), fmt::join(ChatTemplate::builtin_names(), ", "));
  }
  if (requested == "jinja") {
    if (jinja_source.empty()) fail("chat_template: jinja needs chat_template_jinja with the template source");
    return ChatTemplate::from_jinja(jinja_source, "chat_template_jinja");
  }
  return ChatTemplate::builtin(requested);
}

RenderOptions chat_render_options(const Tokenizer& tokenizer, bool add_generation_prompt) {
  RenderOptions o;
  o.add_generation_prompt = add_generation_prompt;
  const auto& s = tokenizer.specials();
  if (s.bos) o.bos_token = *s.bos;
  if (s.eos) o.eos_token = *s.eos;
  if (s.pad) o.variables["pad_token"] = *s.pad;
  if (s.unk) o.variables["unk_token"] = *s.unk;
  return o;
}

}  // namespace llmtune::tok
