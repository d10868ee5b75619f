// WindowSource: the token cache as a resumable stream of [B, T] batches. Window w covers tokens
// [w*T, (w+1)*T) of the concatenated documents; each epoch visits the windows in a permutation
// seeded by (seed, epoch), and its state (epoch, batch index) is all a checkpoint needs to continue
// exactly. Batches are built from the memory map on demand, so the corpus never sits in RAM.
#include <numeric>

#include "core/core.h"
#include "data/data.h"
#include "pretrain/pretrain.h"

namespace llmtune::pretrain {

WindowSource::WindowSource(std::shared_ptr<const TokenCache> cache, WindowOptions options)
    : cache_(std::move(cache)), o_(options) {
  if (o_.sequence_len < 2) fail("sequence_len must be >= 2 for pretraining (got {})", o_.sequence_len);
  if (o_.batch_size < 1) fail("micro_batch_size must be >= 1 (got {})", o_.batch_size);
  if (o_.world_size < 1 || o_.rank < 0 || o_.rank >= o_.world_size) fail("rank {} out of range for world size {}", o_.rank, o_.world_size);
  const int64_t total = windows_in(cache_->num_tokens(), o_.sequence_len);
  if (o_.first_window < 0 || o_.first_window > total) fail("first window {} is past the {} windows of the cache", o_.first_window, total);
  num_windows_ = o_.num_windows < 0 ? total - o_.first_window : std::min(o_.num_windows, total - o_.first_window);
  set_epoch(0);
}

void WindowSource::set_epoch(int64_t epoch) {
  epoch_ = epoch;
  index_ = 0;
  if (o_.shuffle) {
    order_ = data::permutation(num_windows_, data::derive_seed(o_.seed, static_cast<uint64_t>(epoch), 0x70726574));
  } else {
    order_.resize(static_cast<size_t>(num_windows_));
    std::iota(order_.begin(), order_.end(), int64_t{0});
  }
}

int64_t WindowSource::batches_per_epoch() const {
  // Full batches only, and the same count on every rank.
  return (num_windows_ / o_.batch_size) / o_.world_size;
}

std::optional<train::Batch> WindowSource::next() {
  if (index_ >= batches_per_epoch()) return std::nullopt;
  const int64_t global = index_ * o_.world_size + o_.rank;
  std::vector<int64_t> windows(static_cast<size_t>(o_.batch_size));
  for (int64_t i = 0; i < o_.batch_size; ++i)
    windows[static_cast<size_t>(i)] = o_.first_window + order_[static_cast<size_t>(global * o_.batch_size + i)];
  ++index_;
  return batch_of_windows(windows);
}

train::Batch WindowSource::batch_of_windows(const std::vector<int64_t>& windows) const {
  const int64_t B = static_cast<int64_t>(windows.size()), T = o_.sequence_len;
  auto ids = torch::empty({B, T}, torch::kLong);
  int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) cache_->read(windows[static_cast<size_t>(b)] * T, T, p + b * T);
  train::Batch batch;
  batch.input_ids = ids;
  batch.labels = ids.clone();
  batch.num_tokens = B * T;
  if (!o_.document_mask) {
    batch.num_target_tokens = B * (T - 1);
    return batch;
  }
  // Per-document attention: segments number the documents inside each row; positions restart at each
  // document (and at the window start, since earlier context is not visible); a document's first token
  // is not a target because it would be predicted from the previous document.
  auto seg = torch::empty({B, T}, torch::kLong), pos = torch::empty({B, T}, torch::kLong);
  int64_t *s = seg.data_ptr<int64_t>(), *q = pos.data_ptr<int64_t>(), *l = batch.labels.data_ptr<int64_t>();
  int64_t targets = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = windows[static_cast<size_t>(b)] * T;
    int64_t doc = cache_->document_of(start), segment = 1;
    int64_t seg_start = start, next = cache_->document_start(doc + 1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t at = start + t;
      while (at >= next) {  // documents can be empty only in theory; loop anyway
        ++doc;
        next = cache_->document_start(doc + 1);
        seg_start = at;
        ++segment;
      }
      s[b * T + t] = segment;
      q[b * T + t] = at - seg_start;
      if (at == seg_start && t > 0) l[b * T + t] = -100;
      else if (t > 0) ++targets;
    }
  }
  batch.segment_ids = seg;
  batch.position_ids = pos;
  batch.num_target_tokens = targets;
  return batch;
}

nlohmann::json WindowSource::state() const {
  return {{"epoch", epoch_}, {"index", index_}, {"seed", o_.seed}, {"num_windows", num_windows_},
          {"first_window", o_.first_window}, {"sequence_len", o_.sequence_len}, {"batch_size", o_.batch_size},
          {"world_size", o_.world_size}, {"num_tokens", cache_->num_tokens()}};
}

void WindowSource::load_state(const nlohmann::json& s) {
  auto same = [&](const char* key, int64_t mine) {
    if (!s.contains(key) || s.at(key).get<int64_t>() != mine)
      fail("the checkpoint's data position does not match this run ({} {} in the checkpoint, {} now); resume with the "
           "same corpus, filters, tokenizer, sequence_len, micro_batch_size and number of processes",
           key, s.contains(key) ? s.at(key).dump() : "missing", mine);
  };
  same("num_tokens", cache_->num_tokens());
  same("num_windows", num_windows_);
  same("first_window", o_.first_window);
  same("sequence_len", o_.sequence_len);
  same("batch_size", o_.batch_size);
  same("world_size", o_.world_size);
  same("seed", static_cast<int64_t>(o_.seed));
  set_epoch(s.at("epoch").get<int64_t>());
  index_ = s.at("index").get<int64_t>();
}

}  // namespace llmtune::pretrain
