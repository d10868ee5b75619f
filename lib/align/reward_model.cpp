// Reward models: the causal-LM body plus a scalar `score` head (HF *ForSequenceClassification layout),
// scores read at the last non-padding token, and save/load in the form transformers reads with
// num_labels 1. Caveat: transformers finds "the last non-padding token" from input_ids != pad_token_id,
// llmtune from the attention mask; they agree unless a sequence contains the pad id as a real token
// (e.g. pad == eos and the text ends with eos), where transformers reads an earlier position.
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "align/align.h"
#include "core/core.h"
#include "io/io.h"

namespace llmtune::align {

namespace {

std::string dtype_name(torch::ScalarType t) {
  if (t == torch::kBFloat16) return "bfloat16";
  if (t == torch::kHalf) return "float16";
  return "float32";
}

std::string classifier_architecture(const model::ModelConfig& c) {
  if (c.model_type == "mistral") return "MistralForSequenceClassification";
  if (c.model_type == "qwen2") return "Qwen2ForSequenceClassification";
  return "LlamaForSequenceClassification";
}

void write_json(const fs::path& p, const nlohmann::json& j) {
  fs::path tmp = p;
  tmp += ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) fail("cannot write {}", tmp.string());
    f << j.dump(2) << "\n";
    if (!f) fail("error writing {}", tmp.string());
  }
  fs::rename(tmp, p);
}

}  // namespace

RewardModel make_reward_model(model::Transformer net, int64_t num_labels, uint64_t seed) {
  if (num_labels < 1) fail("reward model: num_labels must be >= 1 (got {})", num_labels);
  RewardModel rm;
  rm.net = std::move(net);
  const auto dev = rm.net->decoder->embed_tokens->weight.device();
  const int64_t C = rm.net->config().hidden_size;
  rm.score = std::make_shared<model::DenseLinearImpl>(C, num_labels, false,
                                                      torch::TensorOptions().dtype(torch::kFloat).device(dev));
  {
    torch::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    rm.score->weight.copy_(torch::empty({num_labels, C}).normal_(0.0, rm.net->config().initializer_range, gen));
  }
  rm.net->register_module("score", rm.score);
  return rm;
}

torch::Tensor reward_scores(RewardModel& rm, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                            bool gradient_checkpointing) {
  model::ForwardOptions fo;
  const int64_t R = input_ids.size(0), T = input_ids.size(1);
  auto mask = attention_mask.defined() ? attention_mask : torch::ones_like(input_ids);
  fo.attention_mask = mask;
  fo.gradient_checkpointing = gradient_checkpointing && torch::GradMode::is_enabled();
  auto h = rm.net->hidden_states(input_ids, fo);  // [R, T, C]
  // Last real position: the largest t with mask 1 (works for left and right padding).
  auto pos = torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(h.device()));
  auto last = (pos.unsqueeze(0) * mask.to(torch::kLong).to(h.device())).argmax(1);  // [R]
  auto rows = torch::arange(R, torch::TensorOptions().dtype(torch::kLong).device(h.device()));
  auto hl = h.index({rows, last});                                                    // [R, C]
  return rm.score->forward(hl.to(rm.score->weight.scalar_type())).select(1, 0).to(torch::kFloat);
}

void save_reward_model(RewardModel& rm, const fs::path& dir, std::optional<int64_t> pad_token_id,
                       std::optional<torch::ScalarType> dtype) {
  auto all = model::hf_state_dict(*rm.net, dtype);  // refuses un-merged adapters
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [n, t] : all)
    if (n != "lm_head.weight") tensors.emplace_back(n, t);  // a classifier has no LM head
  fs::create_directories(dir);
  io::checkpoint_save(dir, tensors);
  model::ModelConfig cfg = rm.net->config();
  cfg.dtype = dtype_name(dtype ? *dtype : rm.net->decoder->embed_tokens->weight.scalar_type());
  nlohmann::json j = cfg.to_json();
  j["architectures"] = {classifier_architecture(cfg)};
  const int64_t L = rm.score->weight.size(0);
  nlohmann::json id2label = nlohmann::json::object(), label2id = nlohmann::json::object();
  for (int64_t i = 0; i < L; ++i) {
    id2label[std::to_string(i)] = fmt::format("LABEL_{}", i);
    label2id[fmt::format("LABEL_{}", i)] = i;
  }
  j["id2label"] = id2label;
  j["label2id"] = label2id;
  if (pad_token_id) j["pad_token_id"] = *pad_token_id;
  write_json(dir / "config.json", j);
}

RewardModel load_reward_model(const fs::path& dir, torch::ScalarType dtype, torch::Device device) {
  if (!fs::exists(dir / "config.json")) fail("reward model {}: no config.json (train one with `llmtune reward`)", dir.string());
  nlohmann::json raw;
  try {
    raw = nlohmann::json::parse(io::read_text_file(dir / "config.json"));
  } catch (const nlohmann::json::exception& e) {
    fail("reward model {}: config.json is not valid JSON: {}", dir.string(), e.what());
  }
  model::ModelConfig cfg = model::ModelConfig::from_json(raw, (dir / "config.json").string());
  // A classifier has no LM head: build the body as if tied so no lm_head parameter is expected.
  cfg.tie_word_embeddings = true;
  int64_t L = 1;
  if (raw.contains("id2label") && raw["id2label"].is_object()) L = static_cast<int64_t>(raw["id2label"].size());
  else if (raw.contains("num_labels")) L = raw["num_labels"].get<int64_t>();
  io::CheckpointReader reader(dir);
  if (!reader.contains("score.weight"))
    fail("{} has no score.weight: it is not a sequence-classification (reward) checkpoint", dir.string());
  RewardModel rm;
  rm.net = model::Transformer(cfg, torch::TensorOptions().dtype(dtype).device(device));
  rm.score = std::make_shared<model::DenseLinearImpl>(cfg.hidden_size, L, false,
                                                      torch::TensorOptions().dtype(torch::kFloat).device(device));
  rm.net->register_module("score", rm.score);
  torch::NoGradGuard ng;
  std::set<std::string> used;
  for (auto& item : rm.net->named_parameters()) {
    const std::string& name = item.key();
    if (!reader.contains(name)) fail("{} is missing from reward model {}", name, dir.string());
    const auto& info = reader.info(name);
    if (info.shape != item.value().sizes().vec())
      fail("{} in {} has shape [{}] but config.json implies [{}]", name, dir.string(), fmt::join(info.shape, ", "),
           fmt::join(item.value().sizes().vec(), ", "));
    item.value().copy_(reader.load(name));
    item.value().set_requires_grad(false);
    used.insert(name);
  }
  for (const auto& n : reader.names())
    if (!used.count(n) && n != "lm_head.weight" && n.find("rotary_emb.inv_freq") == std::string::npos)
      fail("reward model {}: unexpected tensor {} (is config.json from another model?)", dir.string(), n);
  rm.net->eval();
  return rm;
}

}  // namespace llmtune::align
