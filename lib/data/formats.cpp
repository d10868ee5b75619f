// The Axolotl dataset types: record -> token ids + per-token "trained" flags.
//   alpaca:       prompt and response tokenized separately and concatenated (as Axolotl does), + EOS.
//   completion:   BOS + text + EOS, every token trained, split into sequence_len chunks (Axolotl).
//   input_output: each segment tokenized without special tokens; trained where label is true.
//   chat_template: the rendered conversation is tokenized whole; a token is trained when its byte range
//                  overlaps the content span of a trainable message (exact: spans come from the renderer,
//                  byte offsets from the tokenizer), plus the EOS/EOT closing that turn per train_on_eos.
#include <algorithm>
#include <set>

#include "core/core.h"
#include "data/data_impl.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::data {
namespace {

std::string field_list(const nlohmann::json& r) {
  std::string s;
  for (auto it = r.begin(); it != r.end(); ++it) s += (s.empty() ? "" : ", ") + it.key();
  return s.empty() ? "(no fields)" : s;
}

[[noreturn]] void missing_field(const nlohmann::json& r, const std::string& where, const std::string& field,
                                const std::string& key) {
  std::vector<std::string> names;
  for (auto it = r.begin(); it != r.end(); ++it) names.push_back(it.key());
  auto hint = closest_match(field, names);
  fail("{} has no field `{}`; it has: {}. Map fields with {}: <name>{}", where, field, field_list(r), key,
       hint ? fmt::format(" (did you mean {}: {}?)", key, *hint) : "");
}

// A string field; `null` counts as absent. Numbers are accepted (CSV columns are strings anyway).
std::optional<std::string> get_text(const nlohmann::json& r, const std::string& field, const std::string& where) {
  auto it = r.find(field);
  if (it == r.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_number() || it->is_boolean()) return it->dump();
  fail("{}: field `{}` is {}, expected text", where, field, it->type_name());
}

std::string require_text(const nlohmann::json& r, const std::string& field, const std::string& key,
                         const std::string& where) {
  auto v = get_text(r, field, where);
  if (!v) missing_field(r, where, field, key);
  return *v;
}

void push(Example& ex, const std::vector<int32_t>& ids, bool trained) {
  ex.input_ids.insert(ex.input_ids.end(), ids.begin(), ids.end());
  ex.trained.insert(ex.trained.end(), ids.size(), trained ? 1 : 0);
}

}  // namespace

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (!input.empty())
    return "Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
           instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
  return "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\n" +
         instruction + "\n\n### Response:\n";
}

std::pair<size_t, size_t> tokens_overlapping(const std::vector<std::pair<size_t, size_t>>& off, size_t start,
                                             size_t end) {
  if (start >= end) return {0, 0};
  size_t first = off.size(), last = 0;
  for (size_t i = 0; i < off.size(); ++i) {
    if (off[i].first < end && off[i].second > start) {
      first = std::min(first, i);
      last = i + 1;
    }
  }
  if (first >= last) return {0, 0};
  return {first, last};
}

// The special token a chat template writes right after an assistant turn's content (ChatML's
// <|im_end|>, Llama 3's <|eot_id|>, Llama 2's </s>), found by rendering a probe conversation.
// Used when eot_tokens is not set, so a model whose EOS is not the template's turn end (llmtune's
// default model: EOS </s>, ChatML turns) still learns to end its turn instead of running on.
std::optional<int32_t> template_turn_end(const tok::ChatTemplate& chat, const tok::Tokenizer& tokenizer,
                                         const std::string& bos, const std::string& eos) {
  tok::Json messages = tok::Json::array();
  messages.push_back(tok::Json{{"role", "user"}, {"content", "Hello"}});
  messages.push_back(tok::Json{{"role", "assistant"}, {"content", "Hi there"}});
  tok::RenderOptions ro;
  ro.bos_token = bos;
  ro.eos_token = eos;
  tok::RenderedChat rc;
  try {
    rc = chat.render(messages, ro);
  } catch (const std::exception&) {
    return std::nullopt;  // a template that refuses the probe: keep the EOS default
  }
  if (rc.message_spans.size() < 2 || !rc.message_spans[1].rendered) return std::nullopt;
  std::vector<std::pair<size_t, size_t>> off;
  auto ids = detail::encode_offsets(tokenizer, rc.text, off);
  auto [first, last] = tokens_overlapping(off, rc.message_spans[1].content.start, rc.message_spans[1].content.end);
  if (first >= last) return std::nullopt;
  for (size_t k = last; k < ids.size() && k < last + 3; ++k)
    if (tokenizer.is_special(ids[k]) && ids[k] != tokenizer.bos_id()) return ids[k];
  return std::nullopt;
}

std::vector<Example> Formatter::alpaca(const nlohmann::json& r, const std::string& where) const {
  std::string instruction = require_text(r, spec.field_instruction, "field_instruction", where);
  std::string input = get_text(r, spec.field_input, where).value_or("");
  std::string output = require_text(r, spec.field_output, "field_output", where);
  Example ex;
  push(ex, detail::encode(*tokenizer, alpaca_prompt(instruction, input), true), options->train_on_inputs);
  auto resp = detail::encode(*tokenizer, output, false);
  if (eos && (resp.empty() || resp.back() != *eos)) resp.push_back(*eos);
  push(ex, resp, true);
  return {std::move(ex)};
}

std::vector<Example> Formatter::completion(const nlohmann::json& r, const std::string& where) const {
  std::string text = require_text(r, spec.field, "field", where);
  auto ids = detail::encode(*tokenizer, text, true);
  if (eos && (ids.empty() || ids.back() != *eos)) ids.push_back(*eos);
  std::vector<Example> out;
  const size_t L = static_cast<size_t>(std::max<int64_t>(options->sequence_len, 1));
  for (size_t s = 0; s < ids.size(); s += L) {
    Example ex;
    ex.input_ids.assign(ids.begin() + s, ids.begin() + std::min(ids.size(), s + L));
    ex.trained.assign(ex.input_ids.size(), 1);
    out.push_back(std::move(ex));
  }
  return out;
}

std::vector<Example> Formatter::input_output(const nlohmann::json& r, const std::string& where) const {
  auto it = r.find("segments");
  if (it == r.end()) missing_field(r, where, "segments", "type: input_output expects segments; the field");
  if (!it->is_array()) fail("{}: `segments` is {}, expected a list of {{text, label}}", where, it->type_name());
  Example ex;
  for (size_t i = 0; i < it->size(); ++i) {
    const auto& seg = (*it)[i];
    std::string sw = fmt::format("{}, segment {}", where, i + 1);
    if (!seg.is_object()) fail("{} is {}, expected {{\"text\": ..., \"label\": true|false}}", sw, seg.type_name());
    std::string text = require_text(seg, "text", "segments[].text (fixed name); the field", sw);
    auto lab = seg.find("label");
    if (lab == seg.end() || !lab->is_boolean())
      fail("{} needs \"label\": true (trained) or false (masked); it has: {}", sw, field_list(seg));
    push(ex, detail::encode(*tokenizer, text, false), lab->get<bool>() || options->train_on_inputs);
  }
  return {std::move(ex)};
}

std::vector<Example> Formatter::chat_template(const nlohmann::json& r, const std::string& where) const {
  // Messages: field_messages, falling back to ShareGPT's `conversations`.
  const nlohmann::json* msgs = nullptr;
  if (auto it = r.find(spec.field_messages); it != r.end()) msgs = &*it;
  else if (auto c = r.find("conversations"); spec.field_messages == "messages" && c != r.end()) msgs = &*c;
  if (!msgs) missing_field(r, where, spec.field_messages, "field_messages");
  if (!msgs->is_array() || msgs->empty())
    fail("{}: `{}` must be a non-empty list of messages, got {}", where, spec.field_messages,
         msgs->is_array() ? "an empty list" : msgs->type_name());

  auto mapped = [&](const char* prop) -> std::string {
    auto m = spec.message_property_mappings.find(prop);
    return m == spec.message_property_mappings.end() ? std::string(prop) : m->second;
  };
  const std::string role_key = mapped("role"), content_key = mapped("content");
  const bool explicit_keys = role_key != "role" || content_key != "content";

  tok::Json messages = tok::Json::array();
  std::vector<std::string> roles;
  auto add = [&](const std::string& role, const std::string& content) {
    messages.push_back(tok::Json{{"role", role}, {"content", content}});
    roles.push_back(role);
  };
  for (size_t i = 0; i < msgs->size(); ++i) {
    const auto& m = (*msgs)[i];
    std::string mw = fmt::format("{}, message {}", where, i + 1);
    if (!m.is_object()) fail("{} is {}, expected an object with role and content", mw, m.type_name());
    std::string rk = role_key, ck = content_key;
    if (!explicit_keys && !m.contains("role") && m.contains("from")) rk = "from", ck = "value";  // ShareGPT
    std::string role = require_text(m, rk, "message_property_mappings.role (or message_field_role)", mw);
    std::string content = get_text(m, ck, mw).value_or("");
    if (!m.contains(ck)) missing_field(m, mw, ck, "message_property_mappings.content (or message_field_content)");
    auto rm = role_map.find(role);
    std::string trole = rm == role_map.end() ? role : rm->second;
    if (i == 0 && trole != "system") {
      if (auto sys = get_text(r, spec.field_system, where); sys && r.find(spec.field_system)->is_string()) add("system", *sys);
    }
    add(trole, content);
  }
  tok::RenderOptions ro;
  ro.bos_token = bos_str;
  ro.eos_token = eos_str;
  tok::RenderedChat rc;
  try {
    rc = chat->render(messages, ro);
  } catch (const tok::ChatTemplateError& e) {
    fail("{}: the chat template `{}` rejected the conversation: {}", where, chat->name(), e.template_message());
  }
  if (spec.drop_system_message && !roles.empty() && roles[0] == "system") {
    messages.erase(messages.begin());
    roles.erase(roles.begin());
  }
  std::vector<std::pair<size_t, size_t>> off;
  auto ids = detail::encode_offsets(*tokenizer, rc.text, off);
  Example ex;
  ex.input_ids = ids;
  ex.trained.assign(ids.size(), 0);

  // Axolotl: after each processed turn, the first EOT (and the first EOS) at most 3 tokens past the turn's
  // last content token is labeled per train_on_eot (train_on_eos): all turns, trained turns, or the last.
  std::set<int32_t> eot(eot_ids.begin(), eot_ids.end());
  auto find_after = [&](size_t from, auto pred) -> std::optional<size_t> {
    for (size_t k = from; k < ids.size(); ++k)
      if (pred(ids[k])) return (k - from <= 3) ? std::optional<size_t>(k) : std::nullopt;
    return std::nullopt;
  };
  std::optional<size_t> last_eot, last_eos;
  const bool any_all = train_on_eos == "all" || train_on_eot == "all";
  for (size_t i = 0; i < rc.message_spans.size() && i < roles.size(); ++i) {
    const auto& ms = rc.message_spans[i];
    bool train = options->train_on_inputs ||
                 std::find(roles_to_train.begin(), roles_to_train.end(), roles[i]) != roles_to_train.end();
    if (!train && !any_all) continue;
    if (!ms.rendered || ms.content.start >= ms.content.end) continue;  // empty turn: no boundary (Axolotl too)
    auto [first, last] = tokens_overlapping(off, ms.content.start, ms.content.end);
    if (first >= last) continue;
    if (train)
      for (size_t k = first; k < last; ++k) ex.trained[k] = 1;
    if (auto k = find_after(last, [&](int32_t id) { return eot.count(id) > 0; })) {
      last_eot = *k;
      if (train_on_eot == "all" || (train_on_eot == "turn" && train)) ex.trained[*k] = 1;
    }
    if (eos) {
      if (auto k = find_after(last, [&](int32_t id) { return id == *eos; })) {
        last_eos = *k;
        if (train_on_eos == "all" || (train_on_eos == "turn" && train)) ex.trained[*k] = 1;
      }
    }
  }
  if (train_on_eot == "last" && last_eot) ex.trained[*last_eot] = 1;
  if (train_on_eos == "last" && last_eos) ex.trained[*last_eos] = 1;
  return {std::move(ex)};
}

std::vector<Example> Formatter::format(const nlohmann::json& record, const std::string& where) const {
  if (!record.is_object()) fail("{} is {}, expected an object", where, record.type_name());
  if (spec.type == "alpaca") return alpaca(record, where);
  if (spec.type == "completion") return completion(record, where);
  if (spec.type == "input_output") return input_output(record, where);
  return chat_template(record, where);
}

const std::vector<std::string>& dataset_types() {
  static const std::vector<std::string> t = {"alpaca", "chat_template", "completion", "input_output"};
  return t;
}

RecordFormatter::RecordFormatter(const DatasetSpec& spec, const DataOptions& options, const tok::Tokenizer& tokenizer,
                                 const tok::ChatTemplate* template_)
    : impl_(std::make_unique<Formatter>()) {
  auto& f = *impl_;
  f.spec = spec;
  f.options = &options;
  f.tokenizer = &tokenizer;
  if (std::find(dataset_types().begin(), dataset_types().end(), spec.type) == dataset_types().end()) {
    auto hint = closest_match(spec.type, dataset_types());
    fail("dataset {}: unknown type `{}`{}; supported: alpaca, chat_template, completion, input_output", spec.path,
         spec.type, hint ? fmt::format(" (did you mean `{}`?)", *hint) : "");
  }
  f.eos = detail::eos_id(tokenizer);
  f.eos_str = detail::eos_token(tokenizer);
  f.bos_str = detail::bos_token(tokenizer);
  if (spec.type != "chat_template") return;

  // Template: dataset override > object passed by the caller > recipe chat_template > tokenizer's own > chatml.
  auto compile = [&](const std::string& s) {
    const std::string fb = "tokenizer_default_fallback_";
    if (tok::ChatTemplate::is_builtin(s)) return tok::ChatTemplate::builtin(s);
    if (s.find("{%") != std::string::npos || s.find("{{") != std::string::npos)
      return tok::ChatTemplate::from_jinja(s, "recipe");
    if (s == "tokenizer_default" || s.rfind(fb, 0) == 0) {
      std::string own = detail::own_chat_template(tokenizer);
      if (!own.empty()) return tok::ChatTemplate::from_jinja(own, "tokenizer");
      if (s == "tokenizer_default")
        fail("chat_template: tokenizer_default, but the tokenizer has no chat template; name one (chatml, llama3, ...)");
      return tok::ChatTemplate::builtin(s.substr(fb.size()));
    }
    return tok::ChatTemplate::builtin(s);  // unknown name: builtin() explains and suggests
  };
  if (spec.chat_template && !spec.chat_template->empty()) f.chat = compile(*spec.chat_template);
  else if (template_) f.chat = *template_;
  else if (!options.chat_template.empty()) f.chat = compile(options.chat_template);
  else if (auto own = detail::own_chat_template(tokenizer); !own.empty())
    f.chat = tok::ChatTemplate::from_jinja(own, "tokenizer");
  else f.chat = tok::ChatTemplate::builtin("chatml");

  if (spec.roles.empty()) {
    f.role_map = {{"human", "user"}, {"user", "user"}, {"assistant", "assistant"}, {"gpt", "assistant"},
                  {"system", "system"}, {"tool", "tool"}};
  } else {
    for (const auto& [target, sources] : spec.roles)
      for (const auto& s : sources) f.role_map[s] = target;
  }
  for (const auto& r : spec.roles_to_train.value_or(options.roles_to_train)) {
    auto m = f.role_map.find(r);
    f.roles_to_train.push_back(m == f.role_map.end() ? r : m->second);
  }
  f.train_on_eos = spec.train_on_eos.value_or(options.train_on_eos);
  f.train_on_eot = spec.train_on_eot ? *spec.train_on_eot : options.train_on_eot.value_or(f.train_on_eos);
  for (const auto& [key, v] : {std::pair{"train_on_eos", f.train_on_eos}, std::pair{"train_on_eot", f.train_on_eot}})
    if (v != "all" && v != "turn" && v != "last" && v != "none")
      fail("dataset {}: {}: `{}` is not one of all, turn, last, none", spec.path, key, v);
  for (const auto& t : options.eot_tokens) {
    auto id = detail::single_token_id(tokenizer, t);
    if (!id) fail("eot_tokens: `{}` is not a single token of this tokenizer; add it as a special token or fix the name", t);
    f.eot_ids.push_back(*id);
  }
  if (f.eot_ids.empty() && f.eos) f.eot_ids.push_back(*f.eos);
  if (options.eot_tokens.empty() && f.chat)
    if (auto id = template_turn_end(*f.chat, tokenizer, f.bos_str, f.eos_str); id && id != f.eos) f.eot_ids.push_back(*id);
  if (f.eos && std::count(f.eot_ids.begin(), f.eot_ids.end(), *f.eos) && f.train_on_eos != f.train_on_eot)
    fail("dataset {}: the EOS token is one of the end-of-turn tokens but train_on_eos ({}) != train_on_eot ({}); "
         "make them equal",
         spec.path, f.train_on_eos, f.train_on_eot);
}

RecordFormatter::~RecordFormatter() = default;

std::vector<Example> RecordFormatter::format(const nlohmann::json& record, const std::string& where) const {
  return impl_->format(record, where);
}

std::string RecordFormatter::describe() const {
  const auto& f = *impl_;
  nlohmann::json j;
  j["type"] = f.spec.type;
  if (f.chat) j["template"] = hash_hex(f.chat->source());
  j["eot"] = f.eot_ids;
  j["roles_to_train"] = f.roles_to_train;
  j["role_map"] = f.role_map;
  j["train_on_eos"] = f.train_on_eos;
  j["train_on_eot"] = f.train_on_eot;
  j["bos"] = f.bos_str;
  j["eos"] = f.eos_str;
  return j.dump();
}

}  // namespace llmtune::data
