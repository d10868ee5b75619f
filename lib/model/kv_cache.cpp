// KVCache: per-layer key/value buffers grown by doubling so decoding is amortised O(1) per token,
// and the key padding mask of everything cached (left-padded batches keep their pads masked).
// Every layer writes the same [length, length+T) slice; the model advances length afterwards.
#include <fmt/ranges.h>

#include "core/core.h"
#include "model/model.h"

namespace llmtune::model {

KVCache::KVCache(const ModelConfig& c, int64_t batch, int64_t capacity, torch::TensorOptions o)
    : batch_(batch), capacity_(std::max<int64_t>(capacity, 16)) {
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    k_.push_back(torch::empty({batch, c.num_key_value_heads, capacity_, c.head_dim}, o));
    v_.push_back(torch::empty({batch, c.num_key_value_heads, capacity_, c.head_dim}, o));
  }
  key_mask_ = torch::empty({batch, 0}, torch::TensorOptions().dtype(torch::kBool).device(o.device()));
}

void KVCache::reserve(int64_t needed) {
  if (needed <= capacity_) return;
  int64_t cap = capacity_;
  while (cap < needed) cap *= 2;
  for (auto* buf : {&k_, &v_}) {
    for (auto& t : *buf) {
      auto s = t.sizes().vec();
      s[2] = cap;
      auto n = torch::empty(s, t.options());
      n.narrow(2, 0, length_).copy_(t.narrow(2, 0, length_));
      t = n;
    }
  }
  capacity_ = cap;
}

std::pair<torch::Tensor, torch::Tensor> KVCache::update(int64_t layer, const torch::Tensor& k, const torch::Tensor& v) {
  if (layer < 0 || layer >= (int64_t)k_.size()) fail("KV cache has {} layers, got layer {}", k_.size(), layer);
  const int64_t T = k.size(2);
  if (k.size(0) != batch_) fail("KV cache was made for batch {} but got {}", batch_, k.size(0));
  reserve(length_ + T);
  pending_ = T;
  auto& K = k_[layer];
  auto& V = v_[layer];
  if (K.scalar_type() != k.scalar_type()) {  // cache follows the activation dtype
    K = K.to(k.scalar_type());
    V = V.to(v.scalar_type());
  }
  K.narrow(2, length_, T).copy_(k);
  V.narrow(2, length_, T).copy_(v);
  return {K.narrow(2, 0, length_ + T), V.narrow(2, 0, length_ + T)};
}

void KVCache::append_mask(const torch::Tensor& m) {
  key_mask_ = torch::cat({key_mask_, m.to(torch::kBool).to(key_mask_.device())}, 1);
  length_ += m.size(1);
  pending_ = 0;
}

void KVCache::crop(int64_t length) {
  if (length < 0 || length > length_) fail("KV cache crop to {} but it holds {} positions", length, length_);
  length_ = length;
  key_mask_ = key_mask_.narrow(1, 0, length).clone();
}

}  // namespace llmtune::model
