// Small pieces around a Batch: the default eval hook, and an in-memory
// BatchSource with per-epoch shuffling from its own generator (the global RNG stays untouched,
// so data order never depends on how many dropout masks were drawn).
#include "core/core.h"
#include "train/train.h"

namespace llmtune::train {

EvalOutput Objective::evaluate(const Batch& micro) {
  EvalOutput out;
  StepOutput s = compute(micro, 1.0);  // normaliser 1: the loss is the plain sum
  out.loss_sum = s.loss.item<double>();
  out.count = target_count(micro);
  out.metrics = std::move(s.metrics);
  return out;
}

VectorBatchSource::VectorBatchSource(std::vector<Batch> batches, bool shuffle, uint64_t seed)
    : batches_(std::move(batches)), shuffle_(shuffle), seed_(seed) {
  set_epoch(0);
}

void VectorBatchSource::set_epoch(int64_t epoch) {
  epoch_ = epoch;
  pos_ = 0;
  const int64_t n = static_cast<int64_t>(batches_.size());
  order_.resize(n);
  if (!shuffle_) {
    for (int64_t i = 0; i < n; ++i) order_[i] = i;
    return;
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed_ + static_cast<uint64_t>(epoch));
  torch::Tensor perm = torch::randperm(n, gen, torch::kLong);
  for (int64_t i = 0; i < n; ++i) order_[i] = perm[i].item<int64_t>();
}

std::optional<Batch> VectorBatchSource::next() {
  if (pos_ >= static_cast<int64_t>(order_.size())) return std::nullopt;
  return batches_[order_[pos_++]];
}

nlohmann::json VectorBatchSource::state() const {
  return {{"epoch", epoch_}, {"position", pos_}, {"seed", seed_}, {"size", batches_.size()}};
}

void VectorBatchSource::load_state(const nlohmann::json& s) {
  if (s.at("size").get<size_t>() != batches_.size() || s.at("seed").get<uint64_t>() != seed_)
    fail("the checkpoint's data state (size {}, seed {}) does not match this dataset (size {}, seed {}); resume "
         "with the same data and seed", s.at("size").dump(), s.at("seed").dump(), batches_.size(), seed_);
  set_epoch(s.at("epoch").get<int64_t>());
  pos_ = s.at("position").get<int64_t>();
}

}  // namespace llmtune::train
