// Generation with the KV cache: greedy or sampled (repetition penalty, temperature, top-k, top-p in
// transformers' order and semantics), single prompt or a left-padded batch. Sampling draws from a
// CPU torch::Generator seeded from the config, so a seed reproduces a run.
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "model/model.h"

namespace llmtune::model {

GenerationConfig GenerationConfig::from_model_dir(const fs::path& dir, const ModelConfig& config) {
  GenerationConfig g;
  g.eos_token_ids = config.eos_token_ids;
  g.pad_token_id = config.pad_token_id;
  fs::path p = dir / "generation_config.json";
  if (!fs::exists(p)) return g;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::read_text_file(p));
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: invalid JSON ({})", p.string(), e.what());
  }
  auto num = [&](const char* k, double& out) {
    if (j.contains(k) && j[k].is_number()) out = j[k].get<double>();
  };
  if (j.contains("do_sample") && j["do_sample"].is_boolean()) g.do_sample = j["do_sample"].get<bool>();
  num("temperature", g.temperature);
  num("top_p", g.top_p);
  num("repetition_penalty", g.repetition_penalty);
  if (j.contains("top_k") && j["top_k"].is_number_integer()) g.top_k = j["top_k"].get<int64_t>();
  if (j.contains("max_new_tokens") && j["max_new_tokens"].is_number_integer())
    g.max_new_tokens = j["max_new_tokens"].get<int64_t>();
  if (j.contains("eos_token_id")) {
    const auto& e = j["eos_token_id"];
    if (e.is_number_integer()) g.eos_token_ids = {e.get<int64_t>()};
    if (e.is_array()) {
      g.eos_token_ids.clear();
      for (const auto& x : e)
        if (x.is_number_integer()) g.eos_token_ids.push_back(x.get<int64_t>());
    }
  }
  if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) g.pad_token_id = j["pad_token_id"].get<int64_t>();
  return g;
}

torch::Tensor process_logits(const torch::Tensor& logits_in, const std::vector<std::vector<int64_t>>& seen,
                             const GenerationConfig& cfg) {
  auto logits = logits_in.to(torch::kFloat).clone();
  const int64_t N = logits.size(0), V = logits.size(1);
  if (cfg.repetition_penalty != 1.0) {
    if (cfg.repetition_penalty <= 0) fail("repetition_penalty must be positive, got {}", cfg.repetition_penalty);
    for (int64_t r = 0; r < N && r < (int64_t)seen.size(); ++r) {
      std::set<int64_t> uniq;
      for (int64_t t : seen[r])
        if (t >= 0 && t < V) uniq.insert(t);
      if (uniq.empty()) continue;
      auto idx = torch::tensor(std::vector<int64_t>(uniq.begin(), uniq.end()), torch::kLong).to(logits.device());
      auto row = logits[r];
      auto s = row.index_select(0, idx);
      s = torch::where(s < 0, s * cfg.repetition_penalty, s / cfg.repetition_penalty);
      row.index_copy_(0, idx, s);
    }
  }
  if (!cfg.do_sample) return logits;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (cfg.temperature <= 0) fail("temperature must be positive when sampling, got {}", cfg.temperature);
  if (cfg.temperature != 1.0) logits = logits / cfg.temperature;
  if (cfg.top_k > 0 && cfg.top_k < V) {
    auto kth = std::get<0>(logits.topk(cfg.top_k, -1)).narrow(-1, cfg.top_k - 1, 1);
    logits = logits.masked_fill(logits < kth, neg_inf);
  }
  if (cfg.top_p < 1.0) {
    auto [sorted, order] = logits.sort(-1, /*descending=*/false);
    auto cum = sorted.softmax(-1).cumsum(-1);
    auto remove = cum <= (1.0 - cfg.top_p);
    remove.narrow(-1, V - 1, 1).fill_(false);  // always keep the most likely token
    auto remove_orig = torch::zeros_like(remove).scatter(-1, order, remove);
    logits = logits.masked_fill(remove_orig, neg_inf);
  }
  return logits;
}

std::vector<std::vector<int64_t>> generate_batch(TransformerImpl& model, const std::vector<std::vector<int64_t>>& prompts,
                                                 const GenerationConfig& cfg,
                                                 const std::function<bool(int64_t, int64_t)>& on_token) {
  const int64_t B = (int64_t)prompts.size();
  std::vector<std::vector<int64_t>> out(B);
  if (B == 0 || cfg.max_new_tokens <= 0) return out;
  int64_t L = 0;
  for (const auto& p : prompts) {
    if (p.empty()) fail("generate: a prompt is empty; it needs at least one token (e.g. BOS)");
    L = std::max<int64_t>(L, (int64_t)p.size());
  }
  const auto& mc = model.config();
  for (const auto& p : prompts)
    for (int64_t t : p)
      if (t < 0 || t >= mc.vocab_size) fail("generate: token id {} is outside the vocabulary (size {})", t, mc.vocab_size);
  int64_t pad = cfg.pad_token_id ? *cfg.pad_token_id : (!cfg.eos_token_ids.empty() ? cfg.eos_token_ids[0] : 0);
  if (pad < 0 || pad >= mc.vocab_size) pad = 0;

  torch::NoGradGuard ng;
  auto weight = model.decoder->embed_tokens->weight;
  auto dev = weight.device();
  auto ids = torch::full({B, L}, pad, torch::kLong);
  auto mask = torch::zeros({B, L}, torch::kLong);
  std::vector<std::vector<int64_t>> seen(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = (int64_t)prompts[b].size();
    ids[b].narrow(0, L - n, n).copy_(torch::tensor(prompts[b], torch::kLong));
    mask[b].narrow(0, L - n, n).fill_(1);
    seen[b] = prompts[b];
  }
  KVCache cache(mc, B, L + cfg.max_new_tokens, weight.options());
  ForwardOptions fo;
  fo.cache = &cache;
  fo.attention_mask = mask.to(dev);
  auto logits = model.forward(ids.to(dev), fo).select(1, L - 1);  // [B,V]; last column is real (left padding)

  auto gen = at::make_generator<at::CPUGeneratorImpl>(cfg.seed);
  std::set<int64_t> eos(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());
  std::vector<bool> done(B, false);
  for (int64_t step = 0; step < cfg.max_new_tokens; ++step) {
    auto scores = process_logits(logits, seen, cfg);
    torch::Tensor next;
    if (cfg.do_sample)
      next = torch::multinomial(scores.softmax(-1).cpu(), 1, false, gen).squeeze(1);
    else
      next = scores.argmax(-1).cpu();
    auto acc = next.accessor<int64_t, 1>();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) {
        acc[b] = pad;
        continue;
      }
      int64_t t = acc[b];
      out[b].push_back(t);
      seen[b].push_back(t);
      if (eos.count(t) || (on_token && !on_token(b, t))) done[b] = true;
      all_done = all_done && done[b];
    }
    if (all_done || step + 1 == cfg.max_new_tokens) break;
    ForwardOptions so;
    so.cache = &cache;
    so.attention_mask = torch::ones({B, 1}, torch::TensorOptions().dtype(torch::kLong).device(dev));
    logits = model.forward(next.unsqueeze(1).to(dev), so).select(1, 0);
  }
  return out;
}

std::vector<int64_t> generate(TransformerImpl& model, const std::vector<int64_t>& prompt_ids,
                              const GenerationConfig& config, const std::function<bool(int64_t)>& on_token) {
  std::function<bool(int64_t, int64_t)> cb;
  if (on_token) cb = [&on_token](int64_t, int64_t t) { return on_token(t); };
  return generate_batch(model, {prompt_ids}, config, cb)[0];
}

}  // namespace llmtune::model
