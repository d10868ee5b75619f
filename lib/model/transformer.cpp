// The decoder: embeddings, pre-norm blocks (RMSNorm -> GQA attention with RoPE -> residual,
// RMSNorm -> SwiGLU MLP -> residual), final norm, lm head. Parameter names equal HF's so
// named_parameters() maps 1:1 onto checkpoint tensors. Attention runs through SDPA with a boolean
// mask built once per forward (causal & padding & segments & sliding window).
#include <fmt/ranges.h>

#include "core/core.h"
#include "model/fused_rms_norm.h"
#include "model/half_compute.h"
#include "model/model.h"

namespace llmtune::model {

// ---------------------------------------------------------------------------------------------
// Leaf modules

DenseLinearImpl::DenseLinearImpl(int64_t in, int64_t out, bool has_bias, torch::TensorOptions o) {
  weight = register_parameter("weight", torch::empty({out, in}, o));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}, o));
}

torch::Tensor DenseLinearImpl::forward(const torch::Tensor& x) { return detail::linear(x, weight, bias); }

LinearPtr make_dense_linear(const LinearSpec& s) {
  return std::make_shared<DenseLinearImpl>(s.in_features, s.out_features, s.bias, s.options);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, torch::TensorOptions o) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}, o));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // The same formula in one pass per row on the CPU (fused_rms_norm.h); below, as LibTorch ops.
  if (detail::fused_rms_norm_applies(x, weight)) return detail::fused_rms_norm(x, weight, eps);
  auto in_dtype = x.scalar_type();
  auto h = x.to(torch::kFloat);
  auto var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * torch::rsqrt(var + eps);
  return weight * h.to(in_dtype);
}

EmbeddingImpl::EmbeddingImpl(int64_t vocab, int64_t dim, torch::TensorOptions o) {
  weight = register_parameter("weight", torch::empty({vocab, dim}, o));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return torch::embedding(weight, ids); }

// ---------------------------------------------------------------------------------------------
// Blocks

namespace {

LinearPtr build_linear(torch::nn::Module& parent, const std::string& prefix, const std::string& child, int64_t in,
                       int64_t out, bool bias, const LinearFactory& f, torch::TensorOptions o) {
  LinearSpec spec{prefix + child, in, out, bias, o};
  LinearPtr m = f ? f(spec) : make_dense_linear(spec);
  if (!m) fail("linear factory returned no module for {}", spec.name);
  return parent.register_module(child, m);
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  auto half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

}  // namespace

AttentionImpl::AttentionImpl(const ModelConfig& c, int64_t layer_, const std::string& prefix, const LinearFactory& f,
                             torch::TensorOptions o)
    : layer(layer_),
      n_heads(c.num_attention_heads),
      n_kv_heads(c.num_key_value_heads),
      head_dim(c.head_dim),
      sliding(c.is_sliding(layer_)) {
  const int64_t H = c.hidden_size;
  q_proj = build_linear(*this, prefix, "q_proj", H, n_heads * head_dim, c.qkv_bias, f, o);
  k_proj = build_linear(*this, prefix, "k_proj", H, n_kv_heads * head_dim, c.qkv_bias, f, o);
  v_proj = build_linear(*this, prefix, "v_proj", H, n_kv_heads * head_dim, c.qkv_bias, f, o);
  o_proj = build_linear(*this, prefix, "o_proj", n_heads * head_dim, H, c.o_bias, f, o);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const LayerInputs& in) {
  const int64_t B = x.size(0), T = x.size(1);
  auto q = q_proj->forward(x).view({B, T, n_heads, head_dim}).transpose(1, 2);     // [B,H,T,D]
  auto k = k_proj->forward(x).view({B, T, n_kv_heads, head_dim}).transpose(1, 2);  // [B,Hkv,T,D]
  auto v = v_proj->forward(x).view({B, T, n_kv_heads, head_dim}).transpose(1, 2);
  auto cos = in.cos.unsqueeze(1), sin = in.sin.unsqueeze(1);  // [B,1,T,D]
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  if (in.cache) {
    std::tie(k, v) = in.cache->update(layer, k, v);
  } else if (!in.prefix.empty()) {  // prefix tuning without a cache: [B,Hkv,N+T,D]
    const auto& [pk, pv] = in.prefix.at(layer);
    k = torch::cat({pk.to(k.scalar_type()), k}, 2);
    v = torch::cat({pv.to(v.scalar_type()), v}, 2);
  }
  const torch::Tensor& mask = sliding ? in.mask_sliding : in.mask_full;
  bool causal = sliding ? in.causal_sliding : in.causal_full;
  std::optional<torch::Tensor> m;
  if (mask.defined()) m = mask;
  auto y = detail::attention(q, k, v, m, causal && !mask.defined(), /*gqa=*/n_kv_heads != n_heads);
  y = y.transpose(1, 2).reshape({B, T, n_heads * head_dim});
  return o_proj->forward(y);
}

MLPImpl::MLPImpl(const ModelConfig& c, const std::string& prefix, const LinearFactory& f, torch::TensorOptions o) {
  gate_proj = build_linear(*this, prefix, "gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias, f, o);
  up_proj = build_linear(*this, prefix, "up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias, f, o);
  down_proj = build_linear(*this, prefix, "down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias, f, o);
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  return down_proj->forward(torch::silu(gate_proj->forward(x)) * up_proj->forward(x));
}

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, int64_t layer, const LinearFactory& f,
                                   torch::TensorOptions o) {
  std::string p = fmt::format("model.layers.{}.", layer);
  self_attn = register_module("self_attn", Attention(c, layer, p + "self_attn.", f, o));
  mlp = register_module("mlp", MLP(c, p + "mlp.", f, o));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const LayerInputs& in) {
  auto a = self_attn->forward(input_layernorm->forward(x), in);
  if (attn_adapter) a = attn_adapter->forward(a);
  auto h = x + a;
  auto m = mlp->forward(post_attention_layernorm->forward(h));
  if (mlp_adapter) m = mlp_adapter->forward(m);
  return h + m;
}

void DecoderLayerImpl::set_adapters(SublayerAdapterPtr attn, SublayerAdapterPtr mlp_) {
  for (auto [name, ptr, member] : {std::tuple{"attn_adapter", attn, &attn_adapter}, std::tuple{"mlp_adapter", mlp_, &mlp_adapter}}) {
    if (*member) unregister_module(name);
    *member = ptr;
    if (ptr) register_module(name, ptr);
  }
}

DecoderStackImpl::DecoderStackImpl(const ModelConfig& c, const LinearFactory& f, torch::TensorOptions o) {
  embed_tokens = register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, o));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.push_back(DecoderLayer(c, i, f, o));
    layers->push_back(layer_list.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
}

// ---------------------------------------------------------------------------------------------
// Transformer

TransformerImpl::TransformerImpl(ModelConfig cfg, torch::TensorOptions o, LinearFactory factory)
    : config_(std::move(cfg)) {
  decoder = register_module("model", DecoderStack(config_, factory, o));
  if (!config_.tie_word_embeddings) {
    lm_head_ = build_linear(*this, "", "lm_head", config_.hidden_size, config_.vocab_size, false, factory, o);
  }
  std::tie(inv_freq_, attention_scaling_) = rope_inv_freq(config_, 0);
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    auto& L = decoder->layer_list[i];
    std::string p = fmt::format("model.layers.{}.", i);
    auto* a = L->self_attn.get();
    auto* m = L->mlp.get();
    slots_.push_back({p + "self_attn.q_proj", {a, "q_proj", &a->q_proj}});
    slots_.push_back({p + "self_attn.k_proj", {a, "k_proj", &a->k_proj}});
    slots_.push_back({p + "self_attn.v_proj", {a, "v_proj", &a->v_proj}});
    slots_.push_back({p + "self_attn.o_proj", {a, "o_proj", &a->o_proj}});
    slots_.push_back({p + "mlp.gate_proj", {m, "gate_proj", &m->gate_proj}});
    slots_.push_back({p + "mlp.up_proj", {m, "up_proj", &m->up_proj}});
    slots_.push_back({p + "mlp.down_proj", {m, "down_proj", &m->down_proj}});
  }
  if (lm_head_) slots_.push_back({"lm_head", {this, "lm_head", &lm_head_}});
}

std::vector<std::string> TransformerImpl::linear_names() const {
  std::vector<std::string> out;
  for (const auto& [name, slot] : slots_) out.push_back(name);
  return out;
}

LinearPtr TransformerImpl::get_linear(const std::string& name) const {
  for (const auto& [n, slot] : slots_)
    if (n == name) return *slot.member;
  auto names = linear_names();
  auto hint = closest_match(name, names);
  fail("no linear layer named \"{}\" in this {} model{}; names look like \"model.layers.0.self_attn.q_proj\"", name,
       config_.model_type, hint ? fmt::format(" (did you mean \"{}\"?)", *hint) : "");
}

void TransformerImpl::replace_linear(const std::string& name, LinearPtr module) {
  if (!module) fail("replace_linear({}): module is null", name);
  get_linear(name);  // validates the name with a did-you-mean message
  for (auto& [n, slot] : slots_) {
    if (n != name) continue;
    slot.parent->replace_module(slot.child, module);
    *slot.member = std::move(module);
    return;
  }
}

void TransformerImpl::set_virtual_tokens(VirtualTokensPtr v) {
  if (virtual_tokens_) unregister_module("prompt_encoder");
  virtual_tokens_ = std::move(v);
  if (virtual_tokens_) register_module("prompt_encoder", virtual_tokens_);
}

torch::Tensor TransformerImpl::embed(const torch::Tensor& input_ids) { return decoder->embed_tokens->forward(input_ids); }

torch::Tensor TransformerImpl::lm_head_logits(const torch::Tensor& hidden) {
  if (lm_head_) return lm_head_->forward(hidden);
  return detail::linear(hidden, decoder->embed_tokens->weight);
}

std::vector<torch::Tensor> TransformerImpl::lm_head_parameters() {
  if (lm_head_) return lm_head_->parameters();
  return {decoder->embed_tokens->weight};
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& input_ids, const ForwardOptions& opts) {
  return lm_head_logits(hidden_states(input_ids, opts));
}

void TransformerImpl::init_weights(uint64_t seed) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double std = config_.initializer_range;
  for (auto& p : named_parameters()) {
    auto& t = p.value();
    const std::string& n = p.key();
    torch::Tensor v;
    if (n.find("norm.weight") != std::string::npos || n.find("layernorm.weight") != std::string::npos)
      v = torch::ones(t.sizes());
    else if (n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0)
      v = torch::zeros(t.sizes());
    else
      v = at::normal(0.0, std, t.sizes(), gen);
    t.copy_(v);
  }
}

std::string TransformerImpl::shape_explanation(const std::string& n) const {
  const auto& c = config_;
  auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  bool bias = n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
  if (has("q_proj"))
    return bias ? fmt::format("num_attention_heads={}, head_dim={}", c.num_attention_heads, c.head_dim)
                : fmt::format("num_attention_heads={}, head_dim={}, hidden_size={}", c.num_attention_heads,
                              c.head_dim, c.hidden_size);
  if (has("k_proj") || has("v_proj"))
    return bias ? fmt::format("num_key_value_heads={}, head_dim={}", c.num_key_value_heads, c.head_dim)
                : fmt::format("num_key_value_heads={}, head_dim={}, hidden_size={}", c.num_key_value_heads,
                              c.head_dim, c.hidden_size);
  if (has("o_proj"))
    return fmt::format("hidden_size={}, num_attention_heads={}, head_dim={}", c.hidden_size, c.num_attention_heads,
                       c.head_dim);
  if (has("gate_proj") || has("up_proj") || has("down_proj"))
    return fmt::format("intermediate_size={}, hidden_size={}", c.intermediate_size, c.hidden_size);
  if (has("embed_tokens") || has("lm_head"))
    return fmt::format("vocab_size={}, hidden_size={}", c.vocab_size, c.hidden_size);
  return fmt::format("hidden_size={}", c.hidden_size);
}

// Positions, RoPE tables and attention masks for one forward. new_key_mask receives the [B,T]
// validity of the new tokens (for the cache).
LayerInputs TransformerImpl::prepare(int64_t B, int64_t T, torch::Device dev, torch::ScalarType act,
                                     const ForwardOptions& opts, torch::Tensor* new_key_mask, int64_t prefix_len) {
  LayerInputs in;
  in.cache = opts.cache;
  // P earlier key positions: the cache's, or (no cache) prefix-tuning keys, which are all valid.
  const int64_t P = opts.cache ? opts.cache->length() : prefix_len;
  const int64_t Tk = P + T;
  auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);

  torch::Tensor new_mask;  // [B,T] bool or undefined (all real)
  if (opts.attention_mask) {
    const auto& am = *opts.attention_mask;
    if (am.dim() != 2 || am.size(0) != B || am.size(1) != T)
      fail("attention_mask must have shape [{}, {}] (batch, new tokens), got {}", B, T, am.sizes());
    new_mask = am.to(dev).to(torch::kBool);
  }
  torch::Tensor key_valid;  // [B,Tk] bool or undefined
  bool cache_has_pad = opts.cache && opts.cache->length() > 0 && !opts.cache->key_mask().all().item<bool>();
  bool new_has_pad = new_mask.defined() && !new_mask.all().item<bool>();
  if (cache_has_pad || new_has_pad) {
    auto nm = new_mask.defined() ? new_mask : torch::ones({B, T}, bopt);
    auto old = opts.cache ? opts.cache->key_mask().to(dev) : torch::ones({B, P}, bopt);
    key_valid = P > 0 ? torch::cat({old, nm}, 1) : nm;
  }
  *new_key_mask = new_mask.defined() ? new_mask : torch::ones({B, T}, bopt);
  if (opts.segment_ids && P > 0) fail("segment_ids cannot be combined with a non-empty KV cache");
  if (opts.segment_ids && (opts.segment_ids->size(0) != B || opts.segment_ids->size(1) != T))
    fail("segment_ids must have shape [{}, {}], got {}", B, T, opts.segment_ids->sizes());
  // The batcher gives every row segment ids; an unpacked, unpadded row holds one id throughout,
  // and then the ids change nothing: positions and masks stay on the plain causal path.
  torch::Tensor segments;
  if (opts.segment_ids && T > 1) {
    auto seg = opts.segment_ids->to(dev);
    if (!(seg == seg.narrow(1, 0, 1)).all().item<bool>()) segments = seg;
  }

  // Positions: explicit; else from the (cache + new) padding mask like HF generate(); else restart per
  // segment; else P + arange(T).
  torch::Tensor pos;
  if (opts.position_ids) {
    pos = opts.position_ids->to(dev).to(torch::kLong);
    if (pos.dim() == 1) pos = pos.unsqueeze(0).expand({B, T});
    if (pos.size(0) != B || pos.size(1) != T) fail("position_ids must have shape [{}, {}], got {}", B, T, pos.sizes());
  } else if (key_valid.defined()) {
    auto kv = key_valid.to(torch::kLong);
    pos = (kv.cumsum(-1) - 1).masked_fill(kv == 0, 1).narrow(1, P, T);
  } else if (segments.defined()) {
    const auto& seg = segments;
    auto idx = torch::arange(T, lopt).unsqueeze(0).expand({B, T});
    auto boundary = torch::ones({B, T}, bopt);
    if (T > 1) boundary.narrow(1, 1, T - 1).copy_(seg.narrow(1, 1, T - 1) != seg.narrow(1, 0, T - 1));
    auto start = std::get<0>(torch::where(boundary, idx, torch::zeros_like(idx)).cummax(1));
    pos = idx - start;
  } else {
    pos = (torch::arange(T, lopt) + P).unsqueeze(0).expand({B, T});
  }

  // RoPE: inv_freq depends on the sequence length only for dynamic / longrope.
  torch::Tensor inv = inv_freq_;
  double scaling = attention_scaling_;
  if (config_.rope.type == "dynamic" || config_.rope.type == "longrope") {
    int64_t seq_len = pos.max().item<int64_t>() + 1;
    if (config_.rope.type == "longrope" || seq_len > config_.max_position_embeddings)
      std::tie(inv, scaling) = rope_inv_freq(config_, seq_len);
  }
  auto freqs = pos.unsqueeze(-1).to(torch::kFloat) * inv.to(dev).to(torch::kFloat);  // [B,T,D/2]
  auto emb = torch::cat({freqs, freqs}, -1);
  auto cos = emb.cos(), sin = emb.sin();
  if (scaling != 1.0) {
    cos = cos * scaling;
    sin = sin * scaling;
  }
  in.cos = cos.to(act);
  in.sin = sin.to(act);

  // Masks. Cache indices (not positions) drive causality and the window, as in HF.
  const bool any_sliding = config_.sliding_window.has_value() &&
                           std::any_of(config_.layer_sliding.begin(), config_.layer_sliding.end(), [](bool b) { return b; });
  const bool window_matters = any_sliding && Tk > *config_.sliding_window;
  const bool simple = !key_valid.defined() && !segments.defined();
  if (simple && P == 0 && !window_matters) {
    in.causal_full = in.causal_sliding = true;  // SDPA's own causal path
    return in;
  }
  if (simple && T == 1 && !window_matters) return in;  // one new token sees every cached key
  auto q_idx = (torch::arange(T, lopt) + P).unsqueeze(1);  // [T,1]
  auto k_idx = torch::arange(Tk, lopt).unsqueeze(0);       // [1,Tk]
  auto base = (k_idx <= q_idx).unsqueeze(0);               // [1,T,Tk]
  if (key_valid.defined()) base = base & key_valid.unsqueeze(1);
  if (segments.defined()) {
    const auto& seg = segments;
    base = base & (seg.unsqueeze(2) == seg.unsqueeze(1));
  }
  // A padded query would see no key at all (NaN in SDPA); let it see itself. Its output is unused.
  auto diag = (k_idx == q_idx).unsqueeze(0);
  in.mask_full = (base | diag).unsqueeze(1);
  if (any_sliding) {
    auto window = (k_idx > q_idx - *config_.sliding_window).unsqueeze(0);
    in.mask_sliding = ((base & window) | diag).unsqueeze(1);
  }
  return in;
}

torch::Tensor TransformerImpl::hidden_states(const torch::Tensor& input_ids, const ForwardOptions& opts) {
  torch::Tensor x;
  if (opts.inputs_embeds) {
    x = *opts.inputs_embeds;
    if (x.dim() != 3 || x.size(2) != config_.hidden_size)
      fail("inputs_embeds must have shape [B, T, {}], got {}", config_.hidden_size, x.sizes());
  } else {
    if (!input_ids.defined() || input_ids.dim() != 2)
      fail("input_ids must be a [B, T] int64 tensor, got {}", input_ids.defined() ? input_ids.sizes() : c10::IntArrayRef{});
    x = embed(input_ids);
  }
  if (opts.cache && opts.cache->batch() != x.size(0))
    fail("KV cache was made for batch {} but the input has batch {}", opts.cache->batch(), x.size(0));

  // PEFT virtual tokens (prompt / prefix tuning), only on a fresh sequence: prompt embeddings are
  // prepended to x (and dropped from the output); prefix K/V go into the cache, or into `in.prefix`.
  ForwardOptions vo;
  const ForwardOptions* o = &opts;
  int64_t n_prompt = 0, n_prefix = 0;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> prefix_kv;
  if (virtual_tokens_ && (!opts.cache || opts.cache->length() == 0)) {
    // Virtual tokens belong to one sequence: rows that really hold several packed examples are
    // refused; a row with a single example (what an unpacked batch carries) needs no segment ids.
    if (opts.segment_ids && opts.segment_ids->max().item<int64_t>() > 1)
      fail("prompt/prefix tuning cannot be combined with packed sequences (set sample_packing: false)");
    const int64_t B0 = x.size(0), N = virtual_tokens_->num_virtual_tokens();
    auto lopt = torch::TensorOptions().dtype(torch::kLong).device(x.device());
    vo = opts;
    vo.segment_ids.reset();
    o = &vo;
    auto emb = virtual_tokens_->input_embeddings();
    if (emb.defined()) {
      n_prompt = N;
      x = torch::cat({emb.to(x.scalar_type()).unsqueeze(0).expand({B0, N, x.size(2)}), x}, 1);
      if (opts.attention_mask)
        vo.attention_mask = torch::cat({torch::ones({B0, N}, opts.attention_mask->options()), *opts.attention_mask}, 1);
      if (opts.position_ids) {
        auto p = opts.position_ids->to(x.device()).to(torch::kLong);
        if (p.dim() == 1) p = p.unsqueeze(0).expand({B0, p.size(0)});
        vo.position_ids = torch::cat({torch::arange(N, lopt).unsqueeze(0).expand({B0, N}), p + N}, 1);
      }
    }
    prefix_kv = virtual_tokens_->key_values();
    if (!prefix_kv.empty()) {
      if ((int64_t)prefix_kv.size() != config_.num_hidden_layers)
        fail("prefix tuning: {} key/value pairs for {} layers", prefix_kv.size(), config_.num_hidden_layers);
      for (auto& [k, v] : prefix_kv) {
        k = k.to(x.scalar_type()).unsqueeze(0).expand({B0, -1, -1, -1});
        v = v.to(x.scalar_type()).unsqueeze(0).expand({B0, -1, -1, -1});
      }
      if (opts.position_ids) vo.position_ids = opts.position_ids->to(x.device()).to(torch::kLong) + N;
      if (opts.cache) {  // written once; later steps find them cached like any earlier token
        for (int64_t l = 0; l < (int64_t)prefix_kv.size(); ++l) opts.cache->update(l, prefix_kv[l].first, prefix_kv[l].second);
        opts.cache->append_mask(torch::ones({B0, N}, torch::TensorOptions().dtype(torch::kBool).device(x.device())));
      } else {
        n_prefix = N;
      }
    }
  }

  const int64_t B = x.size(0), T = x.size(1);
  torch::Tensor new_key_mask;
  LayerInputs in = prepare(B, T, x.device(), x.scalar_type(), *o, &new_key_mask, n_prefix);
  if (n_prefix) in.prefix = prefix_kv;

  const bool ckpt = opts.gradient_checkpointing && torch::GradMode::is_enabled() && !opts.cache;
  if (layer_runner_ && !in.prefix.empty())
    fail("prefix tuning cannot run with a custom layer runner (fully sharded training)");
  for (auto& layer : decoder->layer_list) {
    if (layer_runner_) {
      x = layer_runner_(*layer, x, in, ckpt);
      continue;
    }
    if (!ckpt) {
      x = layer->forward(x, in);
      continue;
    }
    std::vector<torch::Tensor> params;
    for (auto& p : layer->parameters())
      if (p.requires_grad()) params.push_back(p);
    DecoderLayerImpl* L = layer.get();
    if (in.prefix.empty()) {
      x = checkpoint([L, in](const std::vector<torch::Tensor>& xs) { return L->forward(xs[0], in); }, {x}, params);
    } else {  // the layer's prefix K/V are inputs too, so their gradients flow
      const auto& kv = in.prefix.at(L->self_attn->layer);
      x = checkpoint(
          [L, in](const std::vector<torch::Tensor>& xs) {
            LayerInputs li = in;
            li.prefix[L->self_attn->layer] = {xs[1], xs[2]};
            return L->forward(xs[0], li);
          },
          {x, kv.first, kv.second}, params);
    }
  }
  if (opts.cache) opts.cache->append_mask(new_key_mask);
  if (n_prompt) x = x.narrow(1, n_prompt, T - n_prompt);
  return decoder->norm->forward(x);
}

}  // namespace llmtune::model
