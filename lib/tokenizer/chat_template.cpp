// ChatTemplate: compiles Jinja chat templates, holds the built-in formats (our own Jinja sources for
// the formats of formats.md §4) and turns the interpreter's provenance segments into message,
// turn, assistant and generation spans. Message content strings are tagged before rendering.
#include <algorithm>
#include <map>
#include <fmt/ranges.h>
#include "tokenizer/chat_template.h"
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok {

namespace {

// Built-in templates. Sources use whitespace control so the rendered text is exactly the format
// given in formats.md §4; they run unchanged under jinja2 (checked by the fixtures).
const std::map<std::string, std::string, std::less<>>& builtins() {
  static const std::map<std::string, std::string, std::less<>> t = {
      {"llama3", R"JINJA({#- llmtune built-in: Llama 3 / 3.1 instruct (content trimmed, BOS before the first turn) -#}
{%- for message in messages -%}
{%- if loop.first %}{{ bos_token }}{% endif -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{{ message['content'] | trim }}{{ '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif -%}
)JINJA"},
      {"llama2", R"JINJA({#- llmtune built-in: Llama 2 chat (system merged into the first user turn, content stripped) -#}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] | trim -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{ bos_token + '[INST] ' }}
    {%- if loop.first and system_message -%}{{ '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' }}{%- endif -%}
    {{ message['content'] | trim }}{{ ' [/INST]' }}
  {%- elif message['role'] == 'assistant' -%}
    {{ ' ' }}{{ message['content'] | trim }}{{ ' ' + eos_token }}
  {%- else -%}
    {{ raise_exception('Only user and assistant roles are supported after an optional system message') }}
  {%- endif -%}
{%- endfor -%}
)JINJA"},
      {"chatml", R"JINJA({#- llmtune built-in: ChatML -#}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' }}{{ message['content'] }}{{ '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}
)JINJA"},
      {"qwen2_5", R"JINJA({#- llmtune built-in: Qwen2.5 (ChatML with the default Qwen system prompt; no tools) -#}
{%- if not messages or messages[0]['role'] != 'system' -%}
{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif -%}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' }}{{ message['content'] }}{{ '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}
)JINJA"},
      {"zephyr", R"JINJA({#- llmtune built-in: Zephyr / TinyLlama-Chat -#}
{%- for message in messages -%}
{{ '<|' + message['role'] + '|>\n' }}{{ message['content'] }}{{ eos_token + '\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif -%}
)JINJA"},
      {"mistral", R"JINJA({#- llmtune built-in: Mistral/Mixtral instruct v0.1 (HF style); a system message is prepended to the first user turn -#}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{{ bos_token }}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{ '[INST] ' }}{% if loop.first and system_message is defined %}{{ system_message + '\n\n' }}{% endif %}{{ message['content'] }}{{ ' [/INST]' }}
  {%- elif message['role'] == 'assistant' -%}
    {{ message['content'] }}{{ eos_token }}
  {%- else -%}
    {{ raise_exception('Only user and assistant roles are supported after an optional system message') }}
  {%- endif -%}
{%- endfor -%}
)JINJA"},
      {"alpaca", R"JINJA({#- llmtune built-in: Alpaca (Axolotl instruct prompt). system -> preamble (default preamble when absent),
    user -> "### Instruction:", input -> "### Input:", assistant -> "### Response:" + EOS. -#}
{%- set has_input = messages | selectattr('role', 'equalto', 'input') | list | length > 0 -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] -%}
  {%- set loop_messages = messages[1:] -%}
{%- elif has_input -%}
  {%- set system_message = 'Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.' -%}
  {%- set loop_messages = messages -%}
{%- else -%}
  {%- set system_message = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{{ system_message + '\n\n' }}
{%- for message in loop_messages -%}
  {%- if message['role'] == 'user' -%}
    {{ '### Instruction:\n' }}{{ message['content'] }}{{ '\n\n' }}
  {%- elif message['role'] == 'input' -%}
    {{ '### Input:\n' }}{{ message['content'] }}{{ '\n\n' }}
  {%- elif message['role'] == 'assistant' -%}
    {{ '### Response:\n' }}{{ message['content'] }}{{ eos_token }}{% if not loop.last %}{{ '\n\n' }}{% endif %}
  {%- else -%}
    {{ raise_exception('alpaca: unsupported role ' + message['role']) }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '### Response:\n' }}{% endif -%}
)JINJA"},
      {"phi_3", R"JINJA({#- llmtune built-in: Phi-3 (Axolotl phi_3: BOS, then <|role|> turns closed by <|end|>) -#}
{{ bos_token }}
{%- for message in messages -%}
{{ '<|' + message['role'] + '|>\n' }}{{ message['content'] }}{{ '<|end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif -%}
)JINJA"},
      {"gemma", R"JINJA({#- llmtune built-in: Gemma instruct (assistant -> model, no system role, content trimmed) -#}
{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}
{%- for message in messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif -%}
)JINJA"},
  };
  return t;
}

using jinja::Seg;
using jinja::SegKind;
using jinja::Value;

// Tags string content (and the text of content parts) of message `idx` with its provenance.
Value tag_content(const Value& content, int idx) {
  if (content.is_string()) {
    jinja::Str s = *content.s;
    s.segs.push_back(Seg{0, s.text.size(), SegKind::Content, idx});
    return Value::string(std::move(s));
  }
  if (content.kind == Value::Kind::List) {
    std::vector<Value> parts;
    for (const auto& p : content.l->items) {
      if (p.kind == Value::Kind::Dict && p.d->find("text") && p.d->find("text")->is_string()) {
        auto items = p.d->items;
        for (auto& kv : items)
          if (kv.first == "text") kv.second = tag_content(kv.second, idx);
        parts.push_back(Value::dict(std::move(items)));
      } else {
        parts.push_back(p);
      }
    }
    return Value::list(std::move(parts));
  }
  return content;
}

}  // namespace

Json Message::to_json() const {
  Json j = Json::object();
  j["role"] = role;
  j["content"] = content;
  for (auto it = fields.begin(); it != fields.end(); ++it) j[it.key()] = it.value();
  return j;
}

ChatTemplate ChatTemplate::from_jinja(std::string source, std::string name) {
  ChatTemplate t;
  t.program_ = jinja::parse_template(source, name);
  t.name_ = std::move(name);
  t.source_ = std::move(source);
  return t;
}

std::vector<std::string> ChatTemplate::builtin_names() {
  std::vector<std::string> names;
  for (const auto& [k, v] : builtins()) names.push_back(k);
  return names;
}

bool ChatTemplate::is_builtin(std::string_view name) { return builtins().count(name) > 0; }

const std::string& ChatTemplate::builtin_source(std::string_view name) {
  auto it = builtins().find(name);
  if (it == builtins().end()) {
    auto names = builtin_names();
    auto best = closest_match(name, names);
    fail("unknown built-in chat template `{}`{}; available: {}", name,
         best ? fmt::format(" (did you mean `{}`?)", *best) : std::string(), fmt::join(names, ", "));
  }
  return it->second;
}

ChatTemplate ChatTemplate::builtin(std::string_view name) {
  return from_jinja(builtin_source(name), std::string(name));
}

bool ChatTemplate::has_generation_blocks() const { return program_ && program_->has_generation; }

RenderedChat ChatTemplate::render(const std::vector<Message>& messages, const RenderOptions& opts) const {
  Json arr = Json::array();
  for (const auto& m : messages) arr.push_back(m.to_json());
  return render(arr, opts);
}

RenderedChat ChatTemplate::render(const Json& messages, const RenderOptions& opts) const {
  if (!program_) fail("chat template is empty (default-constructed ChatTemplate)");
  if (!messages.is_array()) fail("chat template `{}`: messages must be a JSON array, got {}", name_, messages.type_name());
  std::vector<Value> msgs;
  std::vector<std::pair<const jinja::DictData*, int>> ids;
  std::vector<std::string> roles;
  for (size_t i = 0; i < messages.size(); ++i) {
    const Json& m = messages[i];
    if (!m.is_object()) fail("chat template `{}`: message {} must be an object, got {}", name_, i, m.type_name());
    Value v = Value::from_json(m);
    auto items = v.d->items;
    for (auto& kv : items)
      if (kv.first == "content") kv.second = tag_content(kv.second, int(i));
    v = Value::dict(std::move(items));
    ids.emplace_back(v.d.get(), int(i));
    msgs.push_back(v);
    auto r = m.find("role");
    roles.push_back(r != m.end() && r->is_string() ? r->get<std::string>() : std::string());
  }
  std::vector<std::pair<std::string, Value>> vars;
  vars.emplace_back("messages", Value::list(std::move(msgs)));
  vars.emplace_back("tools", Value::from_json(opts.tools));
  vars.emplace_back("documents", Value::from_json(opts.documents));
  vars.emplace_back("add_generation_prompt", Value::boolean(opts.add_generation_prompt));
  vars.emplace_back("bos_token", Value::string(opts.bos_token));
  vars.emplace_back("eos_token", Value::string(opts.eos_token));
  if (!opts.variables.is_object()) fail("chat template `{}`: RenderOptions::variables must be a JSON object", name_);
  for (auto it = opts.variables.begin(); it != opts.variables.end(); ++it) {
    bool found = false;
    for (auto& kv : vars)
      if (kv.first == it.key()) kv.second = Value::from_json(it.value()), found = true;
    if (!found) vars.emplace_back(it.key(), Value::from_json(it.value()));
  }

  jinja::RenderResult res = jinja::render_program(*program_, std::move(vars), std::move(ids), opts.now_unix);

  RenderedChat out;
  out.text = std::move(res.text);
  std::vector<Seg> segs = std::move(res.segs);
  std::stable_sort(segs.begin(), segs.end(), [](const Seg& a, const Seg& b) { return a.start < b.start; });
  for (const auto& g : segs)
    if (g.kind == SegKind::Generation) out.generation_spans.push_back(Span{g.start, g.end});

  for (size_t i = 0; i < messages.size(); ++i) {
    MessageSpan ms;
    ms.role = roles[i];
    ms.message_index = i;
    // Content: the first printed piece of this message's content, extended over later pieces as
    // long as no other message's content comes between (e.g. content split and re-joined).
    for (const auto& g : segs) {
      if (g.kind != SegKind::Content || g.msg != int(i)) continue;
      if (!ms.rendered) {
        ms.rendered = true;
        ms.content = Span{g.start, g.end};
        continue;
      }
      bool other_between = std::any_of(segs.begin(), segs.end(), [&](const Seg& o) {
        return o.kind == SegKind::Content && o.msg != int(i) && o.start >= ms.content.end && o.start < g.start;
      });
      if (other_between) break;
      ms.content.end = std::max(ms.content.end, g.end);
    }
    // Turn: the loop iteration over this message that contains its content; else the first one.
    const Seg* turn = nullptr;
    for (const auto& g : segs) {
      if (g.kind != SegKind::Turn || g.msg != int(i)) continue;
      if (ms.rendered && g.start <= ms.content.start && ms.content.end <= g.end) {
        turn = &g;
        break;
      }
      if (!turn && !ms.rendered && g.end > g.start) turn = &g;
    }
    ms.turn = turn ? Span{turn->start, turn->end} : ms.content;
    out.message_spans.push_back(std::move(ms));
  }
  if (program_->has_generation) {
    out.assistant_spans = out.generation_spans;
  } else {
    for (const auto& ms : out.message_spans)
      if (ms.role == "assistant" && ms.rendered) out.assistant_spans.push_back(ms.content);
  }
  return out;
}

}  // namespace llmtune::tok
