// llmtune::tok chat templates: render a conversation with a model's Jinja chat template (the
// subset of Jinja2 that HF chat templates use, with transformers' environment settings) and report
// where each message's content, each turn and each assistant reply landed in the text, so the
// data pipeline can build exact label masks. Offsets are byte offsets into the UTF-8 text.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>
#include <nlohmann/json.hpp>
#include "core/core.h"

namespace llmtune::tok {

// Insertion-ordered JSON, so dict key order (tool schemas, tojson output) matches Python.
using Json = nlohmann::ordered_json;

// Half-open byte range [start, end) of RenderedChat::text.
struct Span {
  size_t start = 0, end = 0;
  size_t size() const { return end - start; }
  bool operator==(const Span&) const = default;
};

struct Message {
  std::string role;
  Json content = "";           // usually a string; null or a list of parts also allowed
  Json fields = Json::object();  // any other keys (name, tool_calls, tool_call_id, ...), in order
  Json to_json() const;          // {"role", "content", ...fields}
};

struct MessageSpan {
  std::string role;
  size_t message_index = 0;  // index in the messages passed to render()
  bool rendered = false;     // false when the template never printed this message's content
  Span content;              // the printed content (after the template's trim/strip), if rendered
  // The turn: output of the template's loop iteration over this message (header, content, end-of-turn
  // tokens), i.e. from the end of the previous turn to the end of this one. Falls back to `content`
  // when the content was printed outside a loop over the messages.
  Span turn;
};

struct RenderedChat {
  std::string text;
  // One span per rendered assistant reply, in order. Templates with {% generation %} blocks: the
  // generation blocks (what transformers' return_assistant_tokens_mask marks); otherwise the printed
  // content of each assistant message.
  std::vector<Span> assistant_spans;
  std::vector<MessageSpan> message_spans;  // one per input message, in input order
  std::vector<Span> generation_spans;      // every {% generation %} block, in order
};

struct RenderOptions {
  bool add_generation_prompt = false;
  std::string bos_token, eos_token;
  Json tools = nullptr;      // list of JSON schemas, or null (transformers always passes `tools`)
  Json documents = nullptr;  // list of {title, text}, or null
  // Extra template variables (date_string, other special tokens, enable_thinking, ...); they override
  // the ones above when names collide.
  Json variables = Json::object();
  // Time used by strftime_now(): seconds since the epoch, local time zone; < 0 = now.
  int64_t now_unix = -1;
};

// A template's raise_exception("...") call. template_message() is the text the template passed.
class ChatTemplateError : public Error {
 public:
  ChatTemplateError(const std::string& what, std::string template_message)
      : Error(what), template_message_(std::move(template_message)) {}
  const std::string& template_message() const { return template_message_; }

 private:
  std::string template_message_;
};

namespace jinja {
struct Program;
}

class ChatTemplate {
 public:
  // Compiles a Jinja chat template; syntax or unsupported constructs fail here (llmtune::Error naming
  // `name`, line and column).
  static ChatTemplate from_jinja(std::string source, std::string name = "model");
  // Built-in formats (our own Jinja sources reproducing formats.md §4): llama3, llama2, chatml,
  // zephyr, mistral, alpaca, phi_3, gemma, qwen2_5. Unknown name -> Error with a suggestion.
  static ChatTemplate builtin(std::string_view name);
  static std::vector<std::string> builtin_names();
  static bool is_builtin(std::string_view name);
  static const std::string& builtin_source(std::string_view name);

  RenderedChat render(const std::vector<Message>& messages, const RenderOptions& opts = {}) const;
  // `messages` is a JSON array of message objects (any keys; "role" is required).
  RenderedChat render(const Json& messages, const RenderOptions& opts = {}) const;

  const std::string& name() const { return name_; }
  const std::string& source() const { return source_; }
  bool has_generation_blocks() const;

 private:
  std::string name_, source_;
  std::shared_ptr<const jinja::Program> program_;
};

}  // namespace llmtune::tok
