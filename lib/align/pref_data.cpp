// Preference and prompt data for the alignment stages: record filters, prompt/chosen/rejected
// extraction (strings, message lists, Axolotl's chat_template.default layout, or an implicit shared
// prompt), chat-template rendering, tokenization with prompt/completion truncation, the seeded split.
// Caveat: prompt and completion are tokenized separately (as TRL does), so a BPE merge across the
// boundary is never formed.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>

#include "align/align.h"
#include "config/config.h"
#include "core/core.h"
#include "data/data.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::align {
namespace {

using json = nlohmann::json;

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// A number from a JSON number or a numeric string (CSV cells are strings).
std::optional<double> as_number(const json& v) {
  if (v.is_number()) return v.get<double>();
  if (v.is_boolean()) return v.get<bool>() ? 1.0 : 0.0;
  if (v.is_string()) {
    const std::string s = trim(v.get<std::string>());
    if (s.empty()) return std::nullopt;
    char* end = nullptr;
    double d = std::strtod(s.c_str(), &end);
    if (end && *end == 0) return d;
  }
  return std::nullopt;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Filters

RecordFilter RecordFilter::parse(const std::string& expr) {
  RecordFilter f;
  f.text_ = expr;
  static const char* ops[] = {"==", "!=", ">=", "<=", ">", "<"};
  size_t at = std::string::npos;
  std::string op;
  for (size_t i = 0; i < expr.size() && at == std::string::npos; ++i) {
    if (expr[i] == '"' || expr[i] == '\'') break;  // operators come before any quoted value
    for (const char* o : ops)
      if (expr.compare(i, std::char_traits<char>::length(o), o) == 0) {
        at = i;
        op = o;
        break;
      }
  }
  auto bad = [&](const std::string& why) -> RecordFilter {
    fail("filter `{}`: {}; write `field op value` with op one of == != >= <= > < (e.g. `status != \"tie\"`, "
         "`chosen_score >= 8`)", expr, why);
  };
  if (at == std::string::npos) return bad("no comparison operator");
  f.op_ = op;
  const std::string field = trim(expr.substr(0, at));
  const std::string value = trim(expr.substr(at + op.size()));
  if (field.empty()) return bad("no field name before the operator");
  if (value.empty()) return bad("no value after the operator");
  size_t start = 0;
  while (true) {
    size_t dot = field.find('.', start);
    f.path_.push_back(field.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (f.path_.back().empty()) return bad("empty part in the field path");
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  if ((value.front() == '"' || value.front() == '\'') ) {
    if (value.size() < 2 || value.back() != value.front()) return bad("unterminated string value");
    f.value_ = value.substr(1, value.size() - 2);
  } else if (value == "true" || value == "false") {
    f.value_ = value == "true";
  } else if (value == "null" || value == "None") {
    f.value_ = nullptr;
  } else if (auto n = as_number(json(value))) {
    f.value_ = *n;
  } else {
    return bad(fmt::format("value `{}` is not a number, true/false/null or a quoted string", value));
  }
  if ((op != "==" && op != "!=") && !f.value_.is_number() && !f.value_.is_string())
    return bad("ordering operators need a number or a string");
  return f;
}

bool RecordFilter::matches(const json& record) const {
  const json* v = &record;
  for (const auto& p : path_) {
    if (!v->is_object() || !v->contains(p)) {
      v = nullptr;
      break;
    }
    v = &(*v)[p];
  }
  const json field = v ? *v : json(nullptr);
  int cmp = 0;  // -1, 0, 1; comparable = whether ordering is defined
  bool comparable = false;
  if (value_.is_number()) {
    if (auto n = as_number(field)) {
      const double a = *n, b = value_.get<double>();
      cmp = a < b ? -1 : (a > b ? 1 : 0);
      comparable = true;
    }
  } else if (value_.is_string() && field.is_string()) {
    const auto& a = field.get_ref<const std::string&>();
    const auto& b = value_.get_ref<const std::string&>();
    cmp = a < b ? -1 : (a > b ? 1 : 0);
    comparable = true;
  } else if (value_.is_boolean() && field.is_boolean()) {
    cmp = field.get<bool>() == value_.get<bool>() ? 0 : 1;
    comparable = true;
  } else if (value_.is_null()) {
    cmp = field.is_null() ? 0 : 1;
    comparable = true;
  }
  if (op_ == "==") return comparable && cmp == 0;
  if (op_ == "!=") return !(comparable && cmp == 0);
  if (!comparable || value_.is_boolean() || value_.is_null()) return false;
  if (op_ == ">=") return cmp >= 0;
  if (op_ == "<=") return cmp <= 0;
  if (op_ == ">") return cmp > 0;
  return cmp < 0;
}

// ---------------------------------------------------------------------------------------------
// Record -> texts -> tokens

namespace {

// How one dataset entry is read.
struct EntryFormat {
  std::string field_prompt = "prompt", field_chosen = "chosen", field_rejected = "rejected";
  std::string field_completion = "completion", field_label = "label", field_messages = "messages";
  std::string field_answer = "answer";
  std::optional<std::string> field_margin;
  std::map<std::string, std::string> mappings;  // canonical -> source key (role, content)
  bool templated_strings = false;               // type chat_template*: wrap strings as messages
};

class Renderer {
 public:
  Renderer(const tok::Tokenizer& tok, const PreferenceDataOptions& o) : tok_(tok), opt_(o) {
    std::string req = o.chat_template;
    if (req.empty() && tok.chat_template().empty()) req = "chatml";
    // Templates are compiled lazily: plain-string datasets never need one.
    request_ = req;
  }
  const tok::ChatTemplate& tmpl() {
    if (!tmpl_) tmpl_ = std::make_unique<tok::ChatTemplate>(tok::select_chat_template(tok_, request_, opt_.chat_template_jinja));
    return *tmpl_;
  }
  std::string render(const json& messages, bool gen_prompt) {
    auto ro = tok::chat_render_options(tok_, gen_prompt);
    return tmpl().render(tok::Json::parse(messages.dump()), ro).text;
  }
  std::vector<int32_t> encode_prompt(const std::string& text) {
    return tok_.encode_with_bos_check(text, true, /*drop_duplicate_bos=*/true).ids;
  }
  std::vector<int32_t> encode_completion(const std::string& text, bool add_eos) {
    auto ids = tok_.encode(text, false);
    if (add_eos && tok_.eos_id() && (ids.empty() || ids.back() != *tok_.eos_id())) ids.push_back(*tok_.eos_id());
    return ids;
  }

 private:
  const tok::Tokenizer& tok_;
  const PreferenceDataOptions& opt_;
  std::string request_;
  std::unique_ptr<tok::ChatTemplate> tmpl_;
};

json map_message(const json& m, const EntryFormat& f, const std::string& where) {
  if (!m.is_object()) fail("{}: a message must be an object with role and content, got {}", where, m.dump().substr(0, 80));
  json out = json::object();
  const std::string rk = f.mappings.count("role") ? f.mappings.at("role") : "role";
  const std::string ck = f.mappings.count("content") ? f.mappings.at("content") : "content";
  if (!m.contains(rk)) fail("{}: message without `{}`: {}", where, rk, m.dump().substr(0, 80));
  out["role"] = m[rk];
  out["content"] = m.contains(ck) ? m[ck] : json("");
  return out;
}

json as_messages(const json& v, const EntryFormat& f, const std::string& where, const char* default_role) {
  json out = json::array();
  if (v.is_array()) {
    for (const auto& m : v) out.push_back(map_message(m, f, where));
  } else if (v.is_object()) {
    out.push_back(map_message(v, f, where));
  } else if (v.is_string()) {
    out.push_back(json{{"role", default_role}, {"content", v}});
  } else {
    fail("{}: expected a string, a message or a list of messages, got {}", where, v.dump().substr(0, 80));
  }
  return out;
}

// Prompt ids + completion ids of one (prompt, completion) pair of JSON values.
std::pair<std::vector<int32_t>, std::vector<int32_t>> tokenize_pair(Renderer& r, const json& prompt, const json& completion,
                                                                    const EntryFormat& f, const std::string& where) {
  const bool chat = !prompt.is_string() || !completion.is_string() || f.templated_strings;
  if (!chat) {
    return {r.encode_prompt(prompt.get<std::string>()), r.encode_completion(completion.get<std::string>(), true)};
  }
  json pm = prompt.is_null() ? json::array() : as_messages(prompt, f, where, "user");
  json cm = as_messages(completion, f, where, "assistant");
  const std::string ptext = r.render(pm, true);
  json all = pm;
  for (const auto& m : cm) all.push_back(m);
  const std::string full = r.render(all, false);
  if (full.compare(0, ptext.size(), ptext) != 0)
    fail("{}: the chat template renders the prompt with the generation prompt as a text that the full conversation "
         "does not start with, so the completion cannot be separated; use a template whose generation prompt matches "
         "the assistant turn header", where);
  // Tokenize the whole conversation and cut it at the prompt's length when the prompt's ids are a prefix of
  // it: encoding the completion on its own would give SentencePiece tokenizers a dummy-prefix piece ("▁")
  // at its start that the model never sees in a real conversation (and learns to emit first).
  auto prompt_ids = r.encode_prompt(ptext);
  auto full_ids = r.encode_prompt(full);
  if (full_ids.size() > prompt_ids.size() && std::equal(prompt_ids.begin(), prompt_ids.end(), full_ids.begin()))
    return {std::move(prompt_ids), std::vector<int32_t>(full_ids.begin() + static_cast<std::ptrdiff_t>(prompt_ids.size()),
                                                         full_ids.end())};
  return {std::move(prompt_ids), r.encode_completion(full.substr(ptext.size()), false)};
}

const json* field(const json& rec, const std::string& name) {
  if (!rec.is_object() || !rec.contains(name)) return nullptr;
  const json& v = rec[name];
  return v.is_null() ? nullptr : &v;
}

EntryFormat entry_format(const config::DatasetConfig& d) {
  EntryFormat f;
  if (d.field_prompt) f.field_prompt = *d.field_prompt;
  if (d.field_chosen) f.field_chosen = *d.field_chosen;
  if (d.field_rejected) f.field_rejected = *d.field_rejected;
  if (d.field_completion) f.field_completion = *d.field_completion;
  if (d.field_label) f.field_label = *d.field_label;
  if (d.field_output) f.field_answer = *d.field_output;
  f.field_margin = d.field_margin;
  f.field_messages = d.field_messages;
  for (const auto& [k, v] : d.message_property_mappings) f.mappings[k] = v;
  f.templated_strings = d.type && d.type->rfind("chat_template", 0) == 0;
  return f;
}

// Truncation: keep the prompt's end (max_prompt_len), then cut the completion to fit sequence_len.
bool fit(std::vector<int32_t>& prompt, std::vector<int32_t>& completion, const PreferenceDataOptions& o,
         PreferenceCounts& c, bool count_prompt) {
  if (o.max_prompt_len > 0 && static_cast<int64_t>(prompt.size()) > o.max_prompt_len) {
    prompt.erase(prompt.begin(), prompt.end() - o.max_prompt_len);
    if (count_prompt) ++c.prompt_truncated;
  }
  const int64_t room = o.sequence_len - static_cast<int64_t>(prompt.size());
  if (room <= 0) return false;
  if (static_cast<int64_t>(completion.size()) > room) {
    completion.resize(room);
    ++c.completion_truncated;
  }
  return !completion.empty();
}

void load_entry(const config::DatasetConfig& d, size_t entry_index, const PreferenceDataOptions& o, Renderer& r,
                std::vector<PreferenceExample>& out, PreferenceCounts& c, bool& has_margin) {
  if (!d.path || d.path->empty()) fail("datasets[{}]: `path` is required (a .jsonl/.json/.csv file)", entry_index);
  data::ReadOptions ro;
  if (d.ds_type) ro.format = *d.ds_type == "json" ? "auto" : *d.ds_type;
  ro.skip_invalid = o.skip_invalid;
  fs::path path = *d.path;
  if (!d.data_files.empty()) path /= d.data_files[0];
  data::RecordSet rs = data::read_records(path, ro);
  c.path = path.string();
  c.records = static_cast<int64_t>(rs.records.size());
  c.invalid_skipped = rs.skipped_invalid;
  std::vector<RecordFilter> filters;
  for (const auto& e : d.filters) {
    filters.push_back(RecordFilter::parse(e));
    c.filtered.emplace_back(e, 0);
  }
  const EntryFormat f = entry_format(d);
  for (size_t i = 0; i < rs.records.size(); ++i) {
    const json& rec = rs.records[i];
    const std::string where = rs.where(i);
    bool keep = true;
    for (size_t k = 0; k < filters.size() && keep; ++k)
      if (!filters[k].matches(rec)) {
        ++c.filtered[k].second;
        keep = false;
      }
    if (!keep) continue;
    // The prompt: field_prompt, else Axolotl's field_messages conversation, else (paired message lists)
    // the messages chosen and rejected share.
    const json* prompt = field(rec, f.field_prompt);
    if (!prompt) prompt = field(rec, f.field_messages);
    if (o.kind == DataKind::prompts) {
      if (!prompt)
        fail("{}: no `{}` field (the prompt); set field_prompt in the dataset entry", where, f.field_prompt);
      PreferenceExample ex;
      if (prompt->is_string() && !f.templated_strings) ex.prompt = r.encode_prompt(prompt->get<std::string>());
      else ex.prompt = r.encode_prompt(r.render(as_messages(*prompt, f, where, "user"), true));
      if (const json* a = field(rec, f.field_answer)) ex.answer = a->is_string() ? a->get<std::string>() : a->dump();
      if (o.max_prompt_len > 0 && static_cast<int64_t>(ex.prompt.size()) > o.max_prompt_len) {
        ex.prompt.erase(ex.prompt.begin(), ex.prompt.end() - o.max_prompt_len);
        ++c.prompt_truncated;
      }
      out.push_back(std::move(ex));
      ++c.kept;
      continue;
    }
    const json* chosen = field(rec, f.field_chosen);
    const json* rejected = field(rec, f.field_rejected);
    const json* completion = field(rec, f.field_completion);
    std::vector<std::pair<json, int>> completions;  // (completion, label)
    json implicit_prompt;
    if (chosen && rejected) {
      if (!prompt && chosen->is_array() && rejected->is_array()) {
        // Implicit prompt: the longest common prefix of the two conversations.
        size_t k = 0;
        while (k + 1 < chosen->size() && k + 1 < rejected->size() && (*chosen)[k] == (*rejected)[k]) ++k;
        implicit_prompt = json::array();
        json cw = json::array(), cl = json::array();
        for (size_t j = 0; j < k; ++j) implicit_prompt.push_back((*chosen)[j]);
        for (size_t j = k; j < chosen->size(); ++j) cw.push_back((*chosen)[j]);
        for (size_t j = k; j < rejected->size(); ++j) cl.push_back((*rejected)[j]);
        completions = {{cw, 1}, {cl, 0}};
        prompt = &implicit_prompt;
      } else {
        completions = {{*chosen, 1}, {*rejected, 0}};
      }
    } else if (completion && o.kind == DataKind::unpaired) {
      const json* lab = field(rec, f.field_label);
      if (!lab || !(lab->is_boolean() || lab->is_number()))
        fail("{}: unpaired (KTO) records need a boolean `{}` next to `{}`", where, f.field_label, f.field_completion);
      completions = {{*completion, lab->is_boolean() ? (lab->get<bool>() ? 1 : 0) : (lab->get<double>() != 0 ? 1 : 0)}};
    } else {
      fail("{}: expected `{}` and `{}` (preference pairs){}; found keys {}. Map other names with field_chosen / "
           "field_rejected / field_prompt in the dataset entry", where, f.field_chosen, f.field_rejected,
           o.kind == DataKind::unpaired ? fmt::format(" or `{}` + `{}` (unpaired)", f.field_completion, f.field_label) : "",
           rec.is_object() ? [&] { std::string k; for (auto it = rec.begin(); it != rec.end(); ++it) k += (k.empty() ? "" : ", ") + it.key(); return k; }()
                           : rec.dump().substr(0, 60));
    }
    if (!prompt && completions.front().first.is_string()) implicit_prompt = "";
    const json& pv = prompt ? *prompt : implicit_prompt;
    if (pv.is_null() && completions.front().first.is_string())
      fail("{}: no `{}` field (the prompt)", where, f.field_prompt);
    double margin = 0;
    const std::string mkey = f.field_margin.value_or("margin");
    if (const json* m = field(rec, mkey)) {
      auto n = as_number(*m);
      if (!n) fail("{}: `{}` (margin) must be a number, got {}", where, mkey, m->dump());
      margin = *n;
      has_margin = true;
    } else if (f.field_margin) {
      fail("{}: no `{}` field (field_margin)", where, mkey);
    }
    std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> toks;
    for (const auto& [cv, lab] : completions) toks.push_back(tokenize_pair(r, pv, cv, f, where));
    if (o.kind == DataKind::paired) {
      auto prompt_ids = toks[0].first;
      auto c1 = toks[0].second, c2 = toks[1].second;
      auto p2 = prompt_ids;
      const bool ok1 = fit(prompt_ids, c1, o, c, true);
      const bool ok2 = fit(p2, c2, o, c, false);
      if (!ok1 || !ok2) {
        ++c.dropped_empty;
        continue;
      }
      PreferenceExample ex;
      ex.prompt = std::move(prompt_ids);
      ex.chosen = std::move(c1);
      ex.rejected = std::move(c2);
      ex.margin = margin;
      out.push_back(std::move(ex));
      ++c.kept;
    } else {
      for (size_t k = 0; k < toks.size(); ++k) {
        auto p = toks[k].first, comp = toks[k].second;
        if (!fit(p, comp, o, c, k == 0)) {
          ++c.dropped_empty;
          continue;
        }
        PreferenceExample ex;
        ex.prompt = std::move(p);
        ex.chosen = std::move(comp);
        ex.label = completions[k].second;
        out.push_back(std::move(ex));
        ++c.kept;
      }
    }
  }
}

}  // namespace

PreferenceDataOptions preference_options_from_recipe(const config::Recipe& r, DataKind kind) {
  PreferenceDataOptions o;
  o.kind = kind;
  o.sequence_len = r.sequence_len;
  o.max_prompt_len = r.max_prompt_len.value_or(0);
  if (r.chat_template) o.chat_template = *r.chat_template;
  if (r.chat_template_jinja) o.chat_template_jinja = *r.chat_template_jinja;
  if (o.chat_template.empty() && !o.chat_template_jinja.empty()) o.chat_template = "jinja";
  o.val_set_size = r.val_set_size;
  o.seed = static_cast<uint64_t>(r.seed);
  o.skip_invalid = r.skip_invalid;
  return o;
}

PreferenceData load_preference_data(const std::vector<config::DatasetConfig>& datasets,
                                    const std::vector<config::DatasetConfig>& test_datasets,
                                    const PreferenceDataOptions& o, const tok::Tokenizer& tokenizer) {
  if (datasets.empty()) fail("no datasets: add a `datasets:` list with at least one `- path: ...` entry");
  PreferenceData out;
  Renderer r(tokenizer, o);
  std::vector<PreferenceExample> all;
  for (size_t i = 0; i < datasets.size(); ++i) {
    PreferenceCounts c;
    load_entry(datasets[i], i, o, r, all, c, out.has_margin);
    out.counts.push_back(std::move(c));
  }
  for (size_t i = 0; i < test_datasets.size(); ++i) {
    PreferenceCounts c;
    load_entry(test_datasets[i], i, o, r, out.val, c, out.has_margin);
    c.path += " (test)";
    out.counts.push_back(std::move(c));
  }
  int64_t n_val = 0;
  if (test_datasets.empty() && o.val_set_size > 0) {
    n_val = o.val_set_size < 1 ? static_cast<int64_t>(std::ceil(o.val_set_size * static_cast<double>(all.size())))
                               : static_cast<int64_t>(o.val_set_size);
    if (n_val >= static_cast<int64_t>(all.size()))
      fail("val_set_size {} leaves no training examples ({} examples after filtering)", o.val_set_size, all.size());
  }
  if (n_val > 0) {
    // Unpaired examples from one record stay together only by chance; the split is over examples.
    auto perm = data::permutation(static_cast<int64_t>(all.size()), data::derive_seed(o.seed, 0x5e11, 0));
    std::vector<char> is_val(all.size(), 0);
    for (int64_t k = 0; k < n_val; ++k) is_val[perm[k]] = 1;
    for (size_t k = 0; k < all.size(); ++k) (is_val[k] ? out.val : out.train).push_back(std::move(all[k]));
  } else {
    out.train = std::move(all);
  }
  return out;
}

std::string PreferenceData::summary() const {
  std::string s = fmt::format("  {:<40} {:>8} {:>8} {:>8} {:>10} {:>10}\n", "dataset", "records", "kept", "filtered",
                              "truncated", "dropped");
  for (const auto& c : counts) {
    int64_t filt = 0;
    for (const auto& [e, n] : c.filtered) filt += n;
    std::string name = c.path.size() > 40 ? "..." + c.path.substr(c.path.size() - 37) : c.path;
    s += fmt::format("  {:<40} {:>8} {:>8} {:>8} {:>10} {:>10}\n", name, c.records, c.kept, filt,
                     c.prompt_truncated + c.completion_truncated, c.dropped_empty + c.invalid_skipped);
    for (const auto& [e, n] : c.filtered) s += fmt::format("    filter `{}` removed {} record(s)\n", e, n);
  }
  s += fmt::format("  examples: {} train, {} eval", train.size(), val.size());
  return s;
}

// ---------------------------------------------------------------------------------------------
// Batches

train::Batch make_preference_batch(const std::vector<PreferenceExample>& ex, const std::vector<int64_t>& idx,
                                   DataKind kind, int32_t pad_id, const torch::Tensor& ref) {
  const int64_t B = static_cast<int64_t>(idx.size());
  const int64_t N = static_cast<int64_t>(ex.size());
  if (B == 0) fail("make_preference_batch: empty batch");
  struct Row {
    const std::vector<int32_t>* prompt;
    const std::vector<int32_t>* completion;
  };
  std::vector<Row> rows;
  for (int64_t i : idx) rows.push_back({&ex.at(i).prompt, &ex.at(i).chosen});
  if (kind == DataKind::paired) {
    for (int64_t i : idx) rows.push_back({&ex[i].prompt, &ex[i].rejected});
  } else if (kind == DataKind::unpaired) {
    // KTO's mismatched pairs: example i's prompt with the completion of example i-2 (dataset order,
    // so it does not depend on shuffling; 2 because the two halves of a paired record are neighbours).
    const int64_t shift = N > 2 ? 2 : 1;
    for (int64_t i : idx) rows.push_back({&ex[i].prompt, &ex[(i - shift % N + N) % N].chosen});
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  int64_t T = 1;
  for (const auto& r : rows) T = std::max<int64_t>(T, static_cast<int64_t>(r.prompt->size() + (kind == DataKind::prompts ? 0 : r.completion->size())));
  auto ids = torch::full({R, T}, static_cast<int64_t>(pad_id), torch::kLong);
  auto mask = torch::zeros({R, T}, torch::kLong);
  auto labels = torch::full({R, T}, int64_t{-100}, torch::kLong);
  auto pi = ids.accessor<int64_t, 2>();
  auto pm = mask.accessor<int64_t, 2>();
  auto pl = labels.accessor<int64_t, 2>();
  int64_t real = 0;
  for (int64_t r = 0; r < R; ++r) {
    const auto& p = *rows[r].prompt;
    if (kind == DataKind::prompts) {  // left padding for generation
      const int64_t off = T - static_cast<int64_t>(p.size());
      for (size_t t = 0; t < p.size(); ++t) {
        pi[r][off + t] = p[t];
        pm[r][off + t] = 1;
      }
      real += static_cast<int64_t>(p.size());
      continue;
    }
    const auto& c = *rows[r].completion;
    int64_t t = 0;
    for (int32_t id : p) {
      pi[r][t] = id;
      pm[r][t++] = 1;
    }
    for (int32_t id : c) {
      pi[r][t] = id;
      pl[r][t] = id;
      pm[r][t++] = 1;
    }
    real += t;
  }
  train::Batch b;
  b.input_ids = ids;
  b.attention_mask = mask;
  if (kind != DataKind::prompts) b.labels = labels;
  b.num_target_tokens = B;
  b.num_tokens = real;
  b.extra["index"] = torch::tensor(idx, torch::kLong);
  if (kind == DataKind::paired) {
    std::vector<float> m;
    for (int64_t i : idx) m.push_back(static_cast<float>(ex[i].margin));
    b.extra["margin"] = torch::tensor(m, torch::kFloat);
  } else if (kind == DataKind::unpaired) {
    std::vector<float> l;
    for (int64_t i : idx) l.push_back(ex[i].label == 1 ? 1.0f : 0.0f);
    b.extra["label"] = torch::tensor(l, torch::kFloat);
  }
  if (ref.defined()) {
    auto sel = ref.index_select(0, b.extra["index"]);  // [B, 2]
    b.extra["ref_logps"] = torch::cat({sel.select(1, 0), sel.select(1, 1)});  // [2B] in row order
  }
  return b;
}

PreferenceBatchSource::PreferenceBatchSource(const std::vector<PreferenceExample>& examples, DataKind kind,
                                             int64_t batch_size, int32_t pad_id, bool shuffle, uint64_t seed, int rank,
                                             int world_size)
    : ex_(examples), kind_(kind), batch_size_(std::max<int64_t>(1, batch_size)), pad_id_(pad_id), shuffle_(shuffle),
      seed_(seed), rank_(rank), world_size_(std::max(1, world_size)) {
  if (rank_ < 0 || rank_ >= world_size_) fail("PreferenceBatchSource: rank {} is outside world size {}", rank_, world_size_);
  set_epoch(0);
}

void PreferenceBatchSource::set_epoch(int64_t epoch) {
  epoch_ = epoch;
  index_ = 0;
  const int64_t n = static_cast<int64_t>(ex_.size());
  if (shuffle_) {
    order_ = data::permutation(n, data::derive_seed(seed_, static_cast<uint64_t>(epoch), 0xa11));
  } else {
    order_.resize(n);
    for (int64_t i = 0; i < n; ++i) order_[i] = i;
  }
}

std::optional<train::Batch> PreferenceBatchSource::next() {
  if (index_ >= batches_per_epoch()) return std::nullopt;
  const int64_t n = static_cast<int64_t>(order_.size());
  const int64_t global = index_ * world_size_ + rank_;  // the epoch's batch number
  const int64_t begin = global * batch_size_, end = std::min(n, begin + batch_size_);
  std::vector<int64_t> idx(order_.begin() + begin, order_.begin() + end);
  ++index_;
  return make_preference_batch(ex_, idx, kind_, pad_id_, ref_);
}

int64_t PreferenceBatchSource::batches_per_epoch() const {
  const int64_t all = (static_cast<int64_t>(ex_.size()) + batch_size_ - 1) / batch_size_;
  return world_size_ == 1 ? all : all / world_size_;  // several ranks: whole rounds only
}

nlohmann::json PreferenceBatchSource::state() const {
  return {{"epoch", epoch_}, {"index", index_}, {"seed", seed_}, {"examples", ex_.size()}, {"world_size", world_size_}};
}

void PreferenceBatchSource::load_state(const nlohmann::json& s) {
  if (s.value("examples", int64_t(-1)) != static_cast<int64_t>(ex_.size()))
    fail("cannot resume: the checkpoint was made with {} preference examples but the data now has {}; the dataset or "
         "its filters changed", s.value("examples", int64_t(-1)), ex_.size());
  seed_ = s.at("seed").get<uint64_t>();
  set_epoch(s.at("epoch").get<int64_t>());
  // Older checkpoints stored `pos` (examples consumed on one rank).
  const int64_t old_ws = s.value("world_size", int64_t{1});
  const int64_t done = s.contains("index") ? s.at("index").get<int64_t>() * old_ws
                                            : (s.at("pos").get<int64_t>() + batch_size_ - 1) / batch_size_;
  // `done` batches of the epoch are consumed; on another world size continue at the next whole round.
  index_ = (done + world_size_ - 1) / world_size_;
  if (index_ * world_size_ != done)
    log::warn(fmt::format("data: resuming batch {} of the epoch on {} ranks (was {}); {} batch(es) are skipped to keep "
                          "the ranks in step", done, world_size_, old_ws, index_ * world_size_ - done));
}

}  // namespace llmtune::align
