// Running tasks: multiple choice (requests → log-likelihoods → acc / acc_norm / acc_bytes with
// the harness's standard errors) and generation (chat-templated prompts → generate_batch → exact
// match / regex extraction / substring), plus sliding-window perplexity. Generation in batches is
// left-padded (model::generate_batch); greedy results equal one-at-a-time generation.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <regex>

#include "core/core.h"
#include "eval/eval_impl.h"

namespace llmtune::eval {
namespace {

std::vector<nlohmann::json> load_docs(const TaskSpec& t) {
  auto docs = detail::read_jsonl(t.data);
  if (t.limit > 0 && static_cast<int64_t>(docs.size()) > t.limit) docs.resize(static_cast<size_t>(t.limit));
  if (docs.empty()) fail("task {}: {} has no records", t.name, t.data.string());
  return docs;
}

Metric metric_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return {v.empty() ? 0 : s / static_cast<double>(v.size()), mean_stderr(v)};
}

int64_t argmax(const std::vector<double>& v) {  // first maximum, like numpy
  int64_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[static_cast<size_t>(best)]) best = static_cast<int64_t>(i);
  return best;
}

TaskResult run_multiple_choice(model::TransformerImpl& model, const tok::Tokenizer& tokenizer, const TaskSpec& t,
                               const RunOptions& o) {
  auto docs = load_docs(t);
  std::vector<nlohmann::json> fewshot;
  if (t.num_fewshot > 0) fewshot = t.fewshot_data.empty() ? detail::read_jsonl(t.data) : detail::read_jsonl(t.fewshot_data);
  std::vector<LoglikelihoodRequest> all;
  std::vector<std::pair<size_t, size_t>> span;  // per doc: [first request, count)
  std::vector<int64_t> gold(docs.size());
  for (size_t i = 0; i < docs.size(); ++i) {
    auto reqs = multiple_choice_requests(t, docs[i], fewshot, static_cast<int64_t>(i), &gold[i]);
    span.emplace_back(all.size(), reqs.size());
    all.insert(all.end(), reqs.begin(), reqs.end());
  }
  auto lls = loglikelihoods(model, tokenizer, all, o);
  TaskResult r;
  std::vector<double> acc, acc_norm, acc_bytes;
  for (size_t i = 0; i < docs.size(); ++i) {
    Sample s;
    s.index = static_cast<int64_t>(i);
    std::vector<double> by_chars, by_bytes;
    for (size_t k = 0; k < span[i].second; ++k) {
      const auto& req = all[span[i].first + k];
      const double ll = lls[span[i].first + k].logprob;
      const std::string choice = req.continuation.substr(t.target_delimiter.size());
      s.loglikelihoods.push_back(ll);
      by_chars.push_back(ll / static_cast<double>(detail::count_code_points(choice)));
      by_bytes.push_back(ll / static_cast<double>(choice.size()));
    }
    s.gold = gold[i];
    s.pred = argmax(s.loglikelihoods);
    s.pred_norm = argmax(by_chars);
    s.correct = s.pred == s.gold;
    s.prompt = all[span[i].first].context;
    s.output = all[span[i].first + static_cast<size_t>(s.pred)].continuation.substr(t.target_delimiter.size());
    s.target = all[span[i].first + static_cast<size_t>(s.gold)].continuation.substr(t.target_delimiter.size());
    acc.push_back(s.pred == s.gold);
    acc_norm.push_back(s.pred_norm == s.gold);
    acc_bytes.push_back(argmax(by_bytes) == s.gold);
    r.samples.push_back(std::move(s));
  }
  r.metrics["acc"] = metric_of(acc);
  r.metrics["acc_norm"] = metric_of(acc_norm);
  r.metrics["acc_bytes"] = metric_of(acc_bytes);
  return r;
}

std::string reference_of(const TaskSpec& t, const nlohmann::json& doc, int64_t i) {
  if (!t.messages_field.empty() && !doc.contains(t.answer_field)) {
    const auto& m = detail::field(doc, t.messages_field, t, i);
    if (m.is_array() && !m.empty() && m.back().value("role", "") == "assistant" && m.back()["content"].is_string())
      return m.back()["content"].get<std::string>();
  }
  const auto& a = detail::field(doc, t.answer_field, t, i);
  if (a.is_string()) return a.get<std::string>();
  if (a.is_number()) return a.dump();
  fail("task {}: record {}: `{}` must be a string or a number", t.name, i + 1, t.answer_field);
}

TaskResult run_generate(model::TransformerImpl& model, const tok::Tokenizer& tokenizer, const TaskSpec& t,
                        const RunOptions& o) {
  auto docs = load_docs(t);
  const bool raw = t.chat_template == "none";
  std::optional<tok::ChatTemplate> tmpl;
  if (!raw) tmpl = tok::select_chat_template(tokenizer, t.chat_template);
  std::vector<std::vector<int64_t>> prompts;
  std::vector<std::string> prompt_texts, refs;
  for (size_t i = 0; i < docs.size(); ++i) {
    const auto idx = static_cast<int64_t>(i);
    tok::Json messages = tok::Json::array();
    std::string text;
    if (!t.system_prompt.empty()) messages.push_back({{"role", "system"}, {"content", t.system_prompt}});
    if (!t.messages_field.empty()) {
      const auto& m = detail::field(docs[i], t.messages_field, t, idx);
      if (!m.is_array()) fail("task {}: record {}: `{}` must be a list of messages", t.name, i + 1, t.messages_field);
      size_t n = m.size();
      if (n > 0 && m.back().value("role", "") == "assistant") --n;  // the reference answer, not the prompt
      for (size_t k = 0; k < n; ++k) messages.push_back(tok::Json::parse(m[k].dump()));
    } else {
      const auto& p = detail::field(docs[i], t.prompt_field, t, idx);
      if (!p.is_string()) fail("task {}: record {}: `{}` must be a string", t.name, i + 1, t.prompt_field);
      text = p.get<std::string>();
      messages.push_back({{"role", "user"}, {"content", text}});
    }
    std::vector<int32_t> ids;
    if (raw) {
      if (text.empty())
        for (const auto& m : messages) text += m["content"].get<std::string>() + "\n";
      ids = tokenizer.encode(text, true);
    } else {
      text = tmpl->render(messages, tok::chat_render_options(tokenizer, true)).text;
      ids = tokenizer.encode(text, false);  // the template holds BOS where the model wants it
    }
    prompts.emplace_back(ids.begin(), ids.end());
    prompt_texts.push_back(messages.back()["content"].is_string() ? messages.back()["content"].get<std::string>() : text);
    refs.push_back(reference_of(t, docs[i], idx));
  }
  model::GenerationConfig gen = o.model_dir.empty() ? model::GenerationConfig{}
                                                    : model::GenerationConfig::from_model_dir(o.model_dir, model.config());
  if (o.model_dir.empty()) gen.eos_token_ids = model.config().eos_token_ids;
  if (gen.eos_token_ids.empty() && tokenizer.eos_id()) gen.eos_token_ids.push_back(*tokenizer.eos_id());
  gen.max_new_tokens = t.max_new_tokens;
  gen.do_sample = t.do_sample;
  gen.temperature = t.temperature;
  gen.top_k = t.top_k;
  gen.top_p = t.top_p;
  gen.repetition_penalty = 1.0;
  gen.seed = t.seed;
  std::vector<std::vector<int64_t>> outputs;
  const auto bs = static_cast<size_t>(std::max<int64_t>(1, o.batch_size));
  std::unique_ptr<ProgressBar> bar;
  if (o.progress) bar = std::make_unique<ProgressBar>("generate " + t.name, static_cast<int64_t>(prompts.size()), "prompt");
  for (size_t b0 = 0; b0 < prompts.size(); b0 += bs) {
    std::vector<std::vector<int64_t>> chunk(prompts.begin() + static_cast<std::ptrdiff_t>(b0),
                                            prompts.begin() + static_cast<std::ptrdiff_t>(std::min(prompts.size(), b0 + bs)));
    gen.seed = t.seed + b0;  // sampled runs stay reproducible for a given batch size
    auto got = model::generate_batch(model, chunk, gen);
    outputs.insert(outputs.end(), got.begin(), got.end());
    if (bar) bar->update(static_cast<int64_t>(chunk.size()));
  }
  if (bar) bar->finish();
  TaskResult r;
  std::vector<double> scores;
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::vector<int32_t> ids;
    for (auto id : outputs[i])
      if (std::find(gen.eos_token_ids.begin(), gen.eos_token_ids.end(), id) == gen.eos_token_ids.end())
        ids.push_back(static_cast<int32_t>(id));
    Sample s;
    s.index = static_cast<int64_t>(i);
    s.prompt = prompt_texts[i];
    s.output = tokenizer.decode(ids, true);
    s.target = refs[i];
    s.correct = score_generation(t, s.output, s.target);
    scores.push_back(s.correct);
    r.samples.push_back(std::move(s));
  }
  r.metrics[t.scoring == "regex" ? "regex_match" : t.scoring] = metric_of(scores);
  return r;
}

}  // namespace

std::string extract_answer(const TaskSpec& t, const std::string& output) {
  std::string s = output;
  if (t.scoring == "regex") {
    std::regex re;
    try {
      re = std::regex(t.regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      fail("task {}: regex {:?} is invalid ({})", t.name, t.regex, e.what());
    }
    std::smatch m;
    if (!std::regex_search(output, m, re)) return "";  // no answer found: never matches a reference
    s = m.size() > 1 ? m[1].str() : m[0].str();
  }
  if (t.strip) s = detail::strip(s);
  if (t.ignore_case) s = detail::lower(s);
  return s;
}

bool score_generation(const TaskSpec& t, const std::string& output, const std::string& reference) {
  std::string ref = t.strip ? detail::strip(reference) : reference;
  if (t.ignore_case) ref = detail::lower(ref);
  if (t.scoring == "contains") {
    std::string out = t.ignore_case ? detail::lower(output) : output;
    return !ref.empty() && out.find(ref) != std::string::npos;
  }
  if (t.scoring == "regex") {
    std::string got = extract_answer(t, output);
    return !got.empty() && got == ref;
  }
  return extract_answer(t, output) == ref;
}

TaskResult run_task(model::TransformerImpl& model, const tok::Tokenizer& tokenizer, const TaskSpec& task,
                    const RunOptions& o) {
  torch::NoGradGuard no_grad;
  const double t0 = now_seconds();
  TaskResult r = task.type == "generate" ? run_generate(model, tokenizer, task, o)
                                         : run_multiple_choice(model, tokenizer, task, o);
  r.task = task.name;
  r.type = task.type;
  r.n = static_cast<int64_t>(r.samples.size());
  r.seconds = now_seconds() - t0;
  r.settings = task.to_json();
  r.settings["batch_size"] = o.batch_size;
  if (task.type == "multiple_choice") {
    r.settings["add_special_tokens"] = o.add_special_tokens;
    r.settings["max_length"] = o.max_length > 0 ? o.max_length : model.config().max_position_embeddings;
  }
  return r;
}

std::map<std::string, double> flat_metrics(const TaskResult& r) {
  std::map<std::string, double> m;
  for (const auto& [k, v] : r.metrics) m[r.task + "/" + k] = v.value;
  return m;
}

// ---------------------------------------------------------------------------------------------
// Perplexity

std::vector<std::string> read_documents(const fs::path& path, const std::string& field_name) {
  const std::string p = path.string();
  if (!(p.ends_with(".jsonl") || p.ends_with(".json"))) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot open {}", p);
    return {std::string(std::istreambuf_iterator<char>(in), {})};
  }
  std::vector<std::string> docs;
  auto rows = detail::read_jsonl(path);
  for (size_t i = 0; i < rows.size(); ++i) {
    auto it = rows[i].find(field_name);
    if (it == rows[i].end() || !it->is_string()) {
      std::string keys;
      for (auto& [k, v] : rows[i].items()) keys += (keys.empty() ? "" : ", ") + k;
      fail("{}: record {} has no string field `{}` (it has: {}); choose one with --field", p, i + 1, field_name, keys);
    }
    docs.push_back(it->get<std::string>());
  }
  return docs;
}

nlohmann::json PerplexityResult::to_json() const {
  return {{"documents", documents}, {"tokens", tokens}, {"scored_tokens", scored_tokens}, {"mean_nll", mean_nll},
          {"perplexity", perplexity}, {"max_length", max_length}, {"stride", stride}};
}

PerplexityResult perplexity(model::TransformerImpl& model, const tok::Tokenizer& tokenizer,
                            const std::vector<std::string>& docs, int64_t max_length, int64_t stride, bool progress) {
  torch::NoGradGuard no_grad;
  PerplexityResult r;
  r.max_length = max_length > 0 ? max_length : std::min<int64_t>(model.config().max_position_embeddings, 2048);
  r.stride = stride > 0 ? std::min(stride, r.max_length) : r.max_length;
  r.documents = static_cast<int64_t>(docs.size());
  const auto device = model.decoder->embed_tokens->weight.device();
  double nll_sum = 0;
  auto encoded = tokenizer.encode_batch(docs, true);
  for (const auto& ids : encoded) r.tokens += static_cast<int64_t>(ids.size());
  std::unique_ptr<ProgressBar> bar;
  if (progress) bar = std::make_unique<ProgressBar>("perplexity", r.tokens, "tok");
  for (const auto& ids32 : encoded) {
    std::vector<int64_t> ids(ids32.begin(), ids32.end());
    const auto n = static_cast<int64_t>(ids.size());
    int64_t prev_end = 0;
    for (int64_t begin = 0; begin < n; begin += r.stride) {
      const int64_t end = std::min(begin + r.max_length, n);
      const int64_t target_len = end - prev_end;  // tokens not scored by an earlier window
      auto window = torch::tensor(std::vector<int64_t>(ids.begin() + begin, ids.begin() + end)).unsqueeze(0).to(device);
      auto labels = window.clone();
      const int64_t ctx = (end - begin) - target_len;
      if (ctx > 0) labels.index_put_({0, torch::indexing::Slice(0, ctx)}, -100);
      if (window.size(1) >= 2) {
        auto hidden = model.hidden_states(window);
        auto loss = model::causal_lm_loss_sum(model, hidden, labels);
        nll_sum += loss.sum.item<double>();
        r.scored_tokens += loss.n_tokens;
      }
      if (bar) bar->update(end - prev_end);
      prev_end = end;
      if (end == n) break;
    }
  }
  if (bar) bar->finish();
  if (r.scored_tokens == 0) fail("perplexity: the documents have fewer than two tokens to score");
  r.mean_nll = nll_sum / static_cast<double>(r.scored_tokens);
  r.perplexity = std::exp(r.mean_nll);
  return r;
}

}  // namespace llmtune::eval
