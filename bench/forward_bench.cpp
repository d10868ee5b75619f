// forward_bench: times llmtune's forward pass (full logits, no grad) on a randomly initialised
// Llama-shaped model and prints one JSON line (tokens/s, seconds per pass, peak RSS). Driven by
// scripts/bench/forward.py, which runs transformers on the same shape for comparison.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/core.h"
#include "model/model.h"

using namespace llmtune;

int main(int argc, char** argv) {
  nlohmann::json cfg = {{"model_type", "llama"}, {"vocab_size", 49152}, {"hidden_size", 576},
                        {"intermediate_size", 1536}, {"num_hidden_layers", 30}, {"num_attention_heads", 9},
                        {"num_key_value_heads", 3}, {"rope_theta", 100000.0}, {"tie_word_embeddings", true},
                        {"rms_norm_eps", 1e-5}, {"max_position_embeddings", 8192}};
  int64_t seq = 512, batch = 1, iters = 3, threads = 0;
  std::string dtype = "float32";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--seq") seq = std::stoll(v);
    else if (k == "--batch") batch = std::stoll(v);
    else if (k == "--iters") iters = std::stoll(v);
    else if (k == "--threads") threads = std::stoll(v);
    else if (k == "--dtype") dtype = v;
    else if (k == "--layers") cfg["num_hidden_layers"] = std::stoll(v);
    else if (k == "--hidden") cfg["hidden_size"] = std::stoll(v);
    else if (k == "--heads") cfg["num_attention_heads"] = std::stoll(v);
    else if (k == "--kv-heads") cfg["num_key_value_heads"] = std::stoll(v);
    else if (k == "--intermediate") cfg["intermediate_size"] = std::stoll(v);
    else if (k == "--vocab") cfg["vocab_size"] = std::stoll(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (threads > 0) torch::set_num_threads((int)threads);
  try {
    auto c = model::ModelConfig::from_json(cfg, "forward_bench");
    auto st = dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat;
    model::Transformer m(c, torch::TensorOptions().dtype(st));
    m->init_weights(0);
    m->eval();
    auto ids = torch::randint(0, c.vocab_size, {batch, seq}, torch::kLong);
    torch::InferenceMode im;
    m->forward(ids);  // warm-up
    double t0 = now_seconds();
    for (int64_t i = 0; i < iters; ++i) m->forward(ids);
    double dt = (now_seconds() - t0) / iters;
    std::printf("{\"impl\": \"llmtune\", \"dtype\": \"%s\", \"seconds\": %.6f, \"tokens_per_s\": %.1f, "
                "\"peak_rss_bytes\": %lld, \"threads\": %d}\n",
                dtype.c_str(), dt, batch * seq / dt, (long long)peak_rss_bytes(), torch::get_num_threads());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
