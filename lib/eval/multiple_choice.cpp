// Multiple-choice log-likelihood scoring as the LM Evaluation Harness (lm-eval 0.4.x) does it:
// context = description + few-shot turns (question + target_delimiter + gold choice +
// fewshot_delimiter) + question; one request per choice with continuation = target_delimiter +
// choice; acc = argmax of summed log-probs, acc_norm = argmax of log-prob / len(choice) in code
// points (what the harness's code divides by), acc_bytes = by UTF-8 bytes. Caveat: whitespace moved
// from context to continuation is ASCII whitespace only (Python's rstrip also strips Unicode spaces).
#include <algorithm>
#include <cmath>
#include <fstream>

#include "core/core.h"
#include "eval/eval_impl.h"

namespace llmtune::eval {
namespace detail {

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open {}", path.string());
  std::vector<nlohmann::json> docs;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      docs.push_back(nlohmann::json::parse(line));
    } catch (const std::exception& e) {
      fail("{}:{}: malformed JSON ({})", path.string(), lineno, e.what());
    }
    if (!docs.back().is_object()) fail("{}:{}: each line must be a JSON object", path.string(), lineno);
  }
  return docs;
}

const nlohmann::json& field(const nlohmann::json& doc, const std::string& name, const TaskSpec& task, int64_t index) {
  auto it = doc.find(name);
  if (it != doc.end()) return *it;
  std::string keys;
  for (auto& [k, v] : doc.items()) keys += (keys.empty() ? "" : ", ") + k;
  fail("task {}: record {} of {} has no field `{}` (it has: {}); set the field name in {}", task.name, index + 1,
       task.data.string(), name, keys, task.source.empty() ? std::string("the task") : task.source.string());
}

int64_t count_code_points(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

std::string strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_space(s[b])) ++b;
  while (e > b && is_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string lower(const std::string& s) {
  std::string out = s;
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace detail

double mean_stderr(const std::vector<double>& v) {
  const auto n = static_cast<double>(v.size());
  if (v.size() < 2) return 0;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return std::sqrt(ss / (n - 1)) / std::sqrt(n);
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> encode_request(const tok::Tokenizer& tokenizer,
                                                                     const LoglikelihoodRequest& r,
                                                                     bool add_special_tokens) {
  // The harness skips special tokens when the text already starts with the BOS string.
  auto enc = [&](const std::string& text) {
    bool specials = add_special_tokens;
    if (auto bos = tokenizer.special_token("bos_token"); specials && bos && !bos->empty() && text.starts_with(*bos))
      specials = false;
    auto ids = tokenizer.encode(text, specials);
    return std::vector<int64_t>(ids.begin(), ids.end());
  };
  if (r.context.empty()) {
    auto ids = tokenizer.encode(r.continuation, false);
    std::vector<int64_t> cont(ids.begin(), ids.end());
    auto prefix = tokenizer.bos_id() ? tokenizer.bos_id() : tokenizer.eos_id();
    if (!prefix) fail("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither");
    if (!cont.empty() && cont[0] == *prefix) return {{cont[0]}, std::vector<int64_t>(cont.begin() + 1, cont.end())};
    return {{*prefix}, cont};
  }
  std::string context = r.context, continuation = r.continuation;
  size_t keep = context.size();
  while (keep > 0 && (context[keep - 1] == ' ' || context[keep - 1] == '\t' || context[keep - 1] == '\n' ||
                      context[keep - 1] == '\r' || context[keep - 1] == '\v' || context[keep - 1] == '\f'))
    --keep;
  if (keep < context.size()) {
    continuation = context.substr(keep) + continuation;
    context.resize(keep);
  }
  auto whole = enc(context + continuation);
  auto ctx = enc(context);
  const size_t n = std::min(ctx.size(), whole.size());
  return {ctx, std::vector<int64_t>(whole.begin() + static_cast<std::ptrdiff_t>(n), whole.end())};
}

std::vector<Loglikelihood> loglikelihoods(model::TransformerImpl& model, const tok::Tokenizer& tokenizer,
                                          const std::vector<LoglikelihoodRequest>& requests, const RunOptions& o) {
  torch::NoGradGuard no_grad;
  const int64_t max_len = o.max_length > 0 ? o.max_length : model.config().max_position_embeddings;
  const auto device = model.decoder->embed_tokens->weight.device();
  struct Row {
    std::vector<int64_t> input;  // (ctx + cont)[-(max_len+1):][:-1]
    std::vector<int64_t> cont;
  };
  std::vector<Row> rows;
  for (const auto& r : requests) {
    auto [ctx, cont] = encode_request(tokenizer, r, o.add_special_tokens);
    if (cont.empty()) fail("a continuation encoded to no tokens (context {:?}, continuation {:?})", r.context, r.continuation);
    if (static_cast<int64_t>(cont.size()) > max_len)
      fail("a continuation has {} tokens, more than the context limit {}", cont.size(), max_len);
    std::vector<int64_t> all = ctx;
    all.insert(all.end(), cont.begin(), cont.end());
    const size_t start = all.size() > static_cast<size_t>(max_len + 1) ? all.size() - (max_len + 1) : 0;
    rows.push_back({std::vector<int64_t>(all.begin() + static_cast<std::ptrdiff_t>(start), all.end() - 1), cont});
  }
  // Longest first so each batch pads little; results go back to request order.
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rows[a].input.size() > rows[b].input.size(); });
  std::vector<Loglikelihood> out(rows.size());
  const auto bs = static_cast<size_t>(std::max<int64_t>(1, o.batch_size));
  std::unique_ptr<ProgressBar> bar;
  if (o.progress) bar = std::make_unique<ProgressBar>("loglikelihood", static_cast<int64_t>(rows.size()), "req");
  for (size_t b0 = 0; b0 < order.size(); b0 += bs) {
    const size_t b1 = std::min(order.size(), b0 + bs);
    int64_t T = 0;
    for (size_t k = b0; k < b1; ++k) T = std::max<int64_t>(T, static_cast<int64_t>(rows[order[k]].input.size()));
    // Right padding with no mask, as the harness does: causal attention never looks right.
    auto ids = torch::zeros({static_cast<int64_t>(b1 - b0), T}, torch::kLong);
    std::vector<int64_t> sel_b, sel_t, targets;
    for (size_t k = b0; k < b1; ++k) {
      const auto& row = rows[order[k]];
      const auto bi = static_cast<int64_t>(k - b0), n = static_cast<int64_t>(row.input.size());
      ids[bi].narrow(0, 0, n).copy_(torch::tensor(row.input, torch::kLong));
      const auto c = static_cast<int64_t>(row.cont.size());
      for (int64_t j = 0; j < c; ++j) {  // logits at n - c + j predict cont[j]
        sel_b.push_back(bi);
        sel_t.push_back(n - c + j);
        targets.push_back(row.cont[j]);
      }
    }
    auto hidden = model.hidden_states(ids.to(device));
    auto rows_h = hidden.index({torch::tensor(sel_b).to(device), torch::tensor(sel_t).to(device)});  // [N, C]
    auto logp = model.lm_head_logits(rows_h).to(torch::kFloat).log_softmax(-1).cpu();                 // [N, V]
    auto tgt = torch::tensor(targets, torch::kLong);
    auto picked = logp.gather(1, tgt.unsqueeze(1)).squeeze(1);
    auto greedy = logp.argmax(1).eq(tgt);
    auto picked_a = picked.accessor<float, 1>();
    auto greedy_a = greedy.accessor<bool, 1>();
    size_t pos = 0;
    for (size_t k = b0; k < b1; ++k) {
      Loglikelihood ll;
      ll.greedy = true;
      ll.tokens = static_cast<int64_t>(rows[order[k]].cont.size());
      for (int64_t j = 0; j < ll.tokens; ++j, ++pos) {
        ll.logprob += picked_a[static_cast<int64_t>(pos)];
        ll.greedy = ll.greedy && greedy_a[static_cast<int64_t>(pos)];
      }
      out[order[k]] = ll;
    }
    if (bar) bar->update(static_cast<int64_t>(b1 - b0));
  }
  if (bar) bar->finish();
  return out;
}

std::vector<LoglikelihoodRequest> multiple_choice_requests(const TaskSpec& task, const nlohmann::json& doc,
                                                           const std::vector<nlohmann::json>& fewshot_docs,
                                                           int64_t doc_index, int64_t* gold_out) {
  auto text_of = [&](const nlohmann::json& d, int64_t i) {
    const auto& v = detail::field(d, task.context_field, task, i);
    if (!v.is_string()) fail("task {}: record {}: `{}` must be a string", task.name, i + 1, task.context_field);
    return v.get<std::string>();
  };
  auto choices_of = [&](const nlohmann::json& d, int64_t i) {
    const auto& v = detail::field(d, task.choices_field, task, i);
    if (!v.is_array() || v.empty()) fail("task {}: record {}: `{}` must be a non-empty list of strings", task.name, i + 1, task.choices_field);
    std::vector<std::string> out;
    for (const auto& c : v) {
      if (!c.is_string()) fail("task {}: record {}: `{}` must be a list of strings", task.name, i + 1, task.choices_field);
      out.push_back(c.get<std::string>());
    }
    return out;
  };
  // The gold answer: an index into the choices, or the gold choice's text.
  auto gold_of = [&](const nlohmann::json& d, int64_t i, const std::vector<std::string>& choices) -> int64_t {
    const auto& v = detail::field(d, task.gold_field, task, i);
    if (v.is_number_integer()) {
      const auto g = v.get<int64_t>();
      if (g < 0 || g >= static_cast<int64_t>(choices.size()))
        fail("task {}: record {}: gold index {} is outside the {} choices", task.name, i + 1, g, choices.size());
      return g;
    }
    if (v.is_string()) {
      auto it = std::find(choices.begin(), choices.end(), v.get<std::string>());
      if (it == choices.end()) fail("task {}: record {}: gold {} is not one of the choices", task.name, i + 1, v.dump());
      return it - choices.begin();
    }
    fail("task {}: record {}: `{}` must be a choice index or the gold choice's text", task.name, i + 1, task.gold_field);
  };

  std::string ctx = task.description;
  if (task.num_fewshot > 0) {
    // first_n sampler: the first N few-shot records, skipping copies of the scored record when
    // the few-shot pool is the evaluated file itself.
    const bool same_pool = task.fewshot_data.empty() || task.fewshot_data == task.data;
    int64_t taken = 0;
    for (size_t i = 0; i < fewshot_docs.size() && taken < task.num_fewshot; ++i) {
      if (same_pool && fewshot_docs[i] == doc) continue;
      const auto& fd = fewshot_docs[i];
      auto choices = choices_of(fd, static_cast<int64_t>(i));
      ctx += text_of(fd, static_cast<int64_t>(i)) + task.target_delimiter +
             choices[static_cast<size_t>(gold_of(fd, static_cast<int64_t>(i), choices))] + task.fewshot_delimiter;
      ++taken;
    }
    if (taken < task.num_fewshot)
      fail("task {}: num_fewshot is {} but only {} other records are available for few-shot examples", task.name,
           task.num_fewshot, taken);
  }
  ctx += text_of(doc, doc_index);
  auto choices = choices_of(doc, doc_index);
  if (gold_out) *gold_out = gold_of(doc, doc_index, choices);
  std::vector<LoglikelihoodRequest> reqs;
  for (const auto& c : choices) reqs.push_back({ctx, task.target_delimiter + c});
  return reqs;
}

}  // namespace llmtune::eval
