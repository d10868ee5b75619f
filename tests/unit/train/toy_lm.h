// A tiny causal LM and objective for the loop's tests: embedding → dropout → residual tanh MLP →
// LayerNorm → head, with the HF shifted cross-entropy. Small enough to train in milliseconds,
// with every parameter kind the loop cares about (2-D weights, biases, norm, dropout RNG).
#pragma once
#include <torch/torch.h>

#include "train/train.h"

namespace toy {

struct ToyLMImpl : torch::nn::Module {
  ToyLMImpl(int64_t vocab = 32, int64_t dim = 16, double dropout = 0.0) : vocab(vocab) {
    embed = register_module("embed", torch::nn::Embedding(vocab, dim));
    fc = register_module("fc", torch::nn::Linear(dim, dim));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    head = register_module("head", torch::nn::Linear(dim, vocab));
    drop = register_module("drop", torch::nn::Dropout(dropout));
  }
  torch::Tensor forward(const torch::Tensor& ids) {  // [B, T] → [B, T, V]
    auto x = drop(embed(ids));
    // A cheap causal mix so positions depend on their past: x_t += x_{t-1}.
    auto prev = torch::cat({torch::zeros_like(x.narrow(1, 0, 1)), x.narrow(1, 0, x.size(1) - 1)}, 1);
    x = x + 0.5 * prev;
    x = x + torch::tanh(fc(x));
    return head(norm(x));
  }
  int64_t vocab;
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear fc{nullptr}, head{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(ToyLM);

class LMObjective : public llmtune::train::Objective {
 public:
  explicit LMObjective(ToyLM model) : model_(std::move(model)) {}
  llmtune::train::StepOutput compute(const llmtune::train::Batch& b, double normaliser) override {
    using torch::indexing::Slice;
    auto logits = model_->forward(b.input_ids).to(torch::kFloat32);
    const int64_t T = b.input_ids.size(1);
    auto lg = logits.index({Slice(), Slice(0, T - 1)}).reshape({-1, model_->vocab});
    auto lb = b.labels.index({Slice(), Slice(1, T)}).reshape({-1});
    auto sum = torch::nn::functional::cross_entropy(
        lg, lb, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
    auto mask = lb.ne(-100);
    double n = mask.sum().item<double>();
    double correct = lg.argmax(-1).eq(lb).logical_and(mask).sum().item<double>();
    return {sum / normaliser, {{"token_accuracy", n > 0 ? correct / n : 0.0}}};
  }
  ToyLM model_;
};

// `n` batches of `rows` x `T` random tokens; labels mask a varying prefix of each row with -100.
inline std::vector<llmtune::train::Batch> make_batches(int64_t n, int64_t rows, int64_t T, uint64_t seed,
                                                       int64_t vocab = 32) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<llmtune::train::Batch> out;
  for (int64_t i = 0; i < n; ++i) {
    llmtune::train::Batch b;
    b.input_ids = torch::randint(0, vocab, {rows, T}, gen, torch::kLong);
    b.labels = b.input_ids.clone();
    for (int64_t r = 0; r < rows; ++r) {
      int64_t masked = (i * rows + r) * 3 % (T - 2);  // different target counts per row
      b.labels.index_put_({r, torch::indexing::Slice(0, masked)}, -100);
    }
    out.push_back(std::move(b));
  }
  return out;
}

// Concatenates rows of consecutive batches: k micro-batches of 1 row → batches of k rows.
inline std::vector<llmtune::train::Batch> regroup(const std::vector<llmtune::train::Batch>& in, int64_t k) {
  std::vector<llmtune::train::Batch> out;
  for (size_t i = 0; i < in.size(); i += k) {
    std::vector<torch::Tensor> ids, labels;
    for (size_t j = i; j < i + k; ++j) ids.push_back(in[j].input_ids), labels.push_back(in[j].labels);
    llmtune::train::Batch b;
    b.input_ids = torch::cat(ids);
    b.labels = torch::cat(labels);
    out.push_back(b);
  }
  return out;
}

inline std::map<std::string, torch::Tensor> snapshot(torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

}  // namespace toy
