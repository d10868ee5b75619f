// Unit tests of ChatTemplate behaviour that is ours rather than jinja2's: span provenance through
// string operations, turn spans, error messages (unsupported constructs with line/column,
// raise_exception), built-in lookup and the Message overload. Text parity lives in test_chat_golden.
#include <catch2/catch.hpp>
#include "tokenizer/chat_template.h"

using llmtune::tok::ChatTemplate;
using llmtune::tok::ChatTemplateError;
using llmtune::tok::Json;
using llmtune::tok::Message;
using llmtune::tok::RenderOptions;
using llmtune::tok::Span;

namespace {
std::string at(const std::string& text, const Span& s) { return text.substr(s.start, s.size()); }
Json conv() {
  return Json::parse(R"([{"role":"system","content":"Be brief."},{"role":"user","content":"  Hi there \n"},
                         {"role":"assistant","content":"\n Hello! \n"},{"role":"user","content":"Bye"},
                         {"role":"assistant","content":"See you."}])");
}
}  // namespace

TEST_CASE("llama3 built-in: assistant spans are the trimmed content, turns end after <|eot_id|>", "[chat]") {
  RenderOptions o;
  o.bos_token = "<|begin_of_text|>";
  auto r = ChatTemplate::builtin("llama3").render(conv(), o);
  REQUIRE(r.assistant_spans.size() == 2);
  CHECK(at(r.text, r.assistant_spans[0]) == "Hello!");
  CHECK(at(r.text, r.assistant_spans[1]) == "See you.");
  const auto& ms = r.message_spans[2];
  CHECK(ms.role == "assistant");
  CHECK(at(r.text, ms.turn) == "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
  // After the content, the rest of the turn is exactly the end-of-turn token.
  CHECK(r.text.substr(ms.content.end, ms.turn.end - ms.content.end) == "<|eot_id|>");
  // Turns tile the text (the BOS belongs to the first turn).
  CHECK(r.message_spans[0].turn.start == 0);
  for (size_t i = 1; i < r.message_spans.size(); ++i)
    CHECK(r.message_spans[i].turn.start == r.message_spans[i - 1].turn.end);
  CHECK(r.message_spans.back().turn.end == r.text.size());
}

TEST_CASE("provenance survives concatenation, strip, slicing, split/join and macros", "[chat]") {
  auto msgs = Json::parse(R"([{"role":"assistant","content":"  a b c  "}])");
  auto span_of = [&](const std::string& src) {
    auto r = ChatTemplate::from_jinja(src).render(msgs, {});
    REQUIRE(r.message_spans[0].rendered);
    return at(r.text, r.message_spans[0].content);
  };
  CHECK(span_of("{% set c = 'X' + messages[0].content.strip() + 'Y' %}{{ c }}") == "a b c");
  CHECK(span_of("{{ ('[' ~ messages[0]['content'] ~ ']') | trim }}") == "  a b c  ");
  CHECK(span_of("{{ messages[0].content[2:5] }}") == "a b");
  CHECK(span_of("{{ messages[0].content.split() | join(' ') }}") == "a b c");
  CHECK(span_of("{% macro m(x) %}<{{ x | trim }}>{% endmacro %}{{ m(messages[0].content) }}") == "a b c");
  CHECK(span_of("{% set s %}[{{ messages[0].content }}]{% endset %}{{ s }}") == "  a b c  ");
  // Operations that rewrite the text drop provenance (documented): the message is "not rendered".
  auto r = ChatTemplate::from_jinja("{{ messages[0].content | upper }}").render(msgs, {});
  CHECK_FALSE(r.message_spans[0].rendered);
  CHECK(r.assistant_spans.empty());
}

TEST_CASE("empty and whitespace-only content still get a (zero-length) span", "[chat]") {
  auto msgs = Json::parse(R"([{"role":"user","content":"q"},{"role":"assistant","content":"   "}])");
  RenderOptions o;
  o.bos_token = "<s>";
  auto r = ChatTemplate::builtin("llama3").render(msgs, o);
  REQUIRE(r.assistant_spans.size() == 1);
  CHECK(r.assistant_spans[0].size() == 0);
  CHECK(r.text.substr(r.assistant_spans[0].start, 10) == "<|eot_id|>");
}

TEST_CASE("generation blocks define assistant spans", "[chat]") {
  auto t = ChatTemplate::from_jinja(
      "{% for m in messages %}{% if m.role == 'assistant' %}A:{% generation %}{{ m.content }}!{% endgeneration %}"
      "{% else %}U:{{ m.content }}{% endif %}|{% endfor %}");
  REQUIRE(t.has_generation_blocks());
  auto r = t.render(Json::parse(R"([{"role":"user","content":"x"},{"role":"assistant","content":"y"}])"), {});
  CHECK(r.text == "U:x|A:y!|");
  REQUIRE(r.assistant_spans.size() == 1);
  CHECK(at(r.text, r.assistant_spans[0]) == "y!");
  CHECK(at(r.text, r.message_spans[1].content) == "y");
}

TEST_CASE("unsupported constructs fail at compile time with line and column", "[chat]") {
  try {
    ChatTemplate::from_jinja("line one\n{{ messages | wordwrap(10) }}", "mymodel");
    FAIL("expected an error");
  } catch (const llmtune::Error& e) {
    CHECK(std::string(e.what()) == "unsupported Jinja filter `wordwrap` at chat template `mymodel` line 2, column 15");
  }
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("{% include 'x.jinja' %}"),
                    Catch::Contains("unsupported Jinja statement `include`") && Catch::Contains("line 1, column 4"));
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("{{ x is wibble }}"), Catch::Contains("unsupported Jinja test `wibble`"));
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("{% if x %}never closed"), Catch::Contains("missing `{% elif %}`") || Catch::Contains("missing"));
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("{{ 'unterminated }}"), Catch::Contains("unterminated string literal"));
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("a\n  {{ (1 }}"), Catch::Contains("line 2"));
}

TEST_CASE("raise_exception carries the template's message", "[chat]") {
  auto msgs = Json::parse(R"([{"role":"user","content":"a"},{"role":"user","content":"b"}])");
  try {
    ChatTemplate::builtin("mistral").render(msgs, {});
    FAIL("expected raise_exception");
  } catch (const ChatTemplateError& e) {
    CHECK(e.template_message() == "Conversation roles must alternate user/assistant/user/assistant/...");
    CHECK_THAT(e.what(), Catch::Contains("mistral") && Catch::Contains("alternate"));
  }
}

TEST_CASE("built-in registry", "[chat]") {
  auto names = ChatTemplate::builtin_names();
  for (const char* n : {"llama3", "llama2", "chatml", "zephyr", "mistral", "alpaca", "phi_3", "gemma", "qwen2_5"}) {
    CHECK(std::find(names.begin(), names.end(), n) != names.end());
    CHECK(ChatTemplate::is_builtin(n));
  }
  CHECK_THROWS_WITH(ChatTemplate::builtin("lama3"), Catch::Contains("did you mean `llama3`"));
}

TEST_CASE("Message overload equals the JSON overload and keeps extra fields", "[chat]") {
  std::vector<Message> msgs = {{"user", "hi", Json::object()},
                               {"assistant", nullptr, Json{{"tool_calls", Json::array({Json{{"function", Json{{"name", "f"}, {"arguments", Json{{"x", 1}}}}}}})}}}};
  auto t = ChatTemplate::from_jinja(
      "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}{% endif %};{% endfor %}");
  auto a = t.render(msgs, {});
  Json arr = Json::array();
  for (const auto& m : msgs) arr.push_back(m.to_json());
  CHECK(a.text == t.render(arr, {}).text);
  CHECK(a.text == "user:hi;assistant:{\"name\": \"f\", \"arguments\": {\"x\": 1}};");
}

TEST_CASE("bad inputs are reported", "[chat]") {
  auto t = ChatTemplate::builtin("chatml");
  CHECK_THROWS_WITH(t.render(Json::object(), {}), Catch::Contains("messages must be a JSON array"));
  CHECK_THROWS_WITH(t.render(Json::parse("[1]"), {}), Catch::Contains("message 0 must be an object"));
  CHECK_THROWS_WITH(ChatTemplate::from_jinja("{{ messages[0].nope.deeper }}").render(Json::parse(R"([{"role":"user"}])"), {}),
                    Catch::Contains("has no attribute 'nope'") && Catch::Contains("line 1"));
}
