// Bottleneck adapters (Houlsby et al. 2019): y + up(act(down(y))) on the attention output and the
// MLP output of every layer, before the residual add. No PEFT equivalent; llmtune's own layout:
// adapter_config.json {"peft_type": "BOTTLENECK", "bottleneck_size", "activation", "placement"},
// tensors `base_model.model.model.layers.{i}.{attn,mlp}_adapter.{down_proj,up_proj}.{weight,bias}`.
// Mergeable only with activation "identity": y + U(D y + d) + u = (I + U D) y + (U d + u) folds into
// o_proj / down_proj. Any non-linearity makes the map non-affine, so merging is refused.
#include <cmath>

#include "config/config.h"
#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::peft {

BottleneckConfig BottleneckConfig::from_recipe(const config::Recipe& rc) {
  BottleneckConfig c;
  c.size = rc.bottleneck_size;
  c.activation = rc.bottleneck_activation;
  if (rc.base_model) c.base_model_name_or_path = *rc.base_model;
  return c;
}

nlohmann::json BottleneckConfig::to_adapter_json() const {
  std::vector<std::string> placement;
  if (attn) placement.push_back("attn");
  if (mlp) placement.push_back("mlp");
  return {{"peft_type", "BOTTLENECK"},
          {"task_type", "CAUSAL_LM"},
          {"format", "llmtune-bottleneck-v1"},
          {"base_model_name_or_path", base_model_name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(base_model_name_or_path)},
          {"bottleneck_size", size},
          {"activation", activation},
          {"placement", placement}};
}

BottleneckConfig BottleneckConfig::from_adapter_json(const nlohmann::json& j, const std::string& source) {
  BottleneckConfig c;
  if (!j.contains("bottleneck_size") || !j["bottleneck_size"].is_number_integer())
    fail("{}: BOTTLENECK adapter needs an integer \"bottleneck_size\"", source);
  c.size = j["bottleneck_size"];
  if (j.contains("activation") && j["activation"].is_string()) c.activation = j["activation"];
  if (j.contains("placement") && j["placement"].is_array()) {
    c.attn = c.mlp = false;
    for (const auto& p : j["placement"]) {
      if (p == "attn") c.attn = true;
      else if (p == "mlp") c.mlp = true;
      else fail("{}: placement entry {} is unknown (attn or mlp)", source, p.dump());
    }
  }
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"];
  return c;
}

BottleneckAdapterImpl::BottleneckAdapterImpl(int64_t dim, int64_t size, std::string act, uint64_t seed)
    : activation(std::move(act)) {
  static const std::vector<std::string> ok = {"relu", "gelu", "silu", "tanh", "identity"};
  if (std::find(ok.begin(), ok.end(), activation) == ok.end())
    fail("bottleneck activation \"{}\" is unknown; use relu, gelu, silu, tanh or identity", activation);
  auto o = torch::TensorOptions().dtype(torch::kFloat);
  down_proj = register_module("down_proj", std::make_shared<model::DenseLinearImpl>(dim, size, true, o));
  up_proj = register_module("up_proj", std::make_shared<model::DenseLinearImpl>(size, dim, true, o));
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  double bound = 1.0 / std::sqrt(static_cast<double>(dim));  // nn.Linear's default on down
  down_proj->weight.copy_(torch::empty({size, dim}).uniform_(-bound, bound, gen));
  down_proj->bias.zero_();
  up_proj->weight.zero_();  // identity at start
  up_proj->bias.zero_();
}

torch::Tensor BottleneckAdapterImpl::forward(const torch::Tensor& y) {
  auto h = down_proj->forward(y.to(down_proj->weight.scalar_type()));
  if (activation == "relu") h = torch::relu(h);
  else if (activation == "gelu") h = torch::gelu(h);
  else if (activation == "silu") h = torch::silu(h);
  else if (activation == "tanh") h = torch::tanh(h);
  return (y.to(h.scalar_type()) + up_proj->forward(h)).to(y.scalar_type());
}

void apply_bottleneck(model::TransformerImpl& model, const BottleneckConfig& cfg, uint64_t seed) {
  if (cfg.size <= 0) fail("bottleneck_size must be positive (got {})", cfg.size);
  const int64_t C = model.config().hidden_size;
  auto dev = model.decoder->embed_tokens->weight.device();
  uint64_t i = 0;
  for (auto& layer : model.decoder->layer_list) {
    model::SublayerAdapterPtr a, m;
    if (cfg.attn) a = std::make_shared<BottleneckAdapterImpl>(C, cfg.size, cfg.activation, seed * 1000003ULL + 101 + i++);
    if (cfg.mlp) m = std::make_shared<BottleneckAdapterImpl>(C, cfg.size, cfg.activation, seed * 1000003ULL + 101 + i++);
    if (a) a->to(dev);
    if (m) m->to(dev);
    layer->set_adapters(a, m);
  }
}

}  // namespace llmtune::peft
