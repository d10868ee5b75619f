// Batch planning and assembly. An epoch's plan (which examples go in which row of which batch) is a pure
// function of (dataset, options, seed, epoch), so the stream resumes exactly from (epoch, index, seed).
// Packing is first-fit-decreasing inside groups of examples taken in shuffled order; without packing,
// examples are sorted by length inside mega-batches and the batch order is shuffled (less padding).
#include <algorithm>
#include <numeric>

#include "core/core.h"
#include "data/data.h"

namespace llmtune::data {
namespace {

// Max-segment tree over row remaining capacities: finds the first row with room >= len in O(log R).
class FirstFit {
 public:
  explicit FirstFit(size_t max_rows, int64_t capacity) : cap_(capacity) {
    size_ = 1;
    while (size_ < std::max<size_t>(max_rows, 1)) size_ <<= 1;
    tree_.assign(2 * size_, -1);  // -1 = row not opened yet
  }
  // Returns the row index used (opening a new one when none fits).
  size_t place(int64_t len) {
    size_t row;
    if (tree_[1] >= len) {
      size_t node = 1;
      while (node < size_) node = (tree_[2 * node] >= len) ? 2 * node : 2 * node + 1;
      row = node - size_;
    } else {
      row = opened_++;
      set(row, cap_);
    }
    set(row, tree_[size_ + row] - len);
    return row;
  }
  size_t rows() const { return opened_; }

 private:
  void set(size_t row, int64_t v) {
    size_t n = size_ + row;
    tree_[n] = v;
    for (n >>= 1; n >= 1; n >>= 1) tree_[n] = std::max(tree_[2 * n], tree_[2 * n + 1]);
  }
  int64_t cap_;
  size_t size_ = 1, opened_ = 0;
  std::vector<int64_t> tree_;
};

std::vector<BatchPlan> plan_epoch(const TokenizedDataset& data, const BatchOptions& o, uint64_t seed, int64_t epoch) {
  const int64_t n = static_cast<int64_t>(data.size());
  std::vector<int64_t> order;
  if (o.shuffle) {
    order = permutation(n, derive_seed(seed, static_cast<uint64_t>(epoch), 1));
  } else {
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
  }
  auto len = [&](int64_t i) { return std::min<int64_t>(data.length(i), o.sequence_len); };
  std::vector<BatchPlan> batches;
  const int64_t bs = std::max<int64_t>(o.batch_size, 1);

  if (o.sample_packing) {
    std::vector<std::vector<int64_t>> rows;
    const int64_t g = std::max<int64_t>(o.packing_group_size, 1);
    for (int64_t start = 0; start < n; start += g) {
      std::vector<int64_t> group(order.begin() + start, order.begin() + std::min(n, start + g));
      // Longest first; ties keep the shuffled order (stable), so the result is fully determined.
      std::stable_sort(group.begin(), group.end(), [&](int64_t a, int64_t b) { return len(a) > len(b); });
      FirstFit ff(group.size(), o.sequence_len);
      std::vector<std::vector<int64_t>> grows;
      for (int64_t i : group) {
        size_t r = ff.place(len(i));
        if (r >= grows.size()) grows.resize(r + 1);
        grows[r].push_back(i);
      }
      for (auto& r : grows) rows.push_back(std::move(r));
    }
    if (o.shuffle) {
      auto p = permutation(static_cast<int64_t>(rows.size()), derive_seed(seed, static_cast<uint64_t>(epoch), 2));
      std::vector<std::vector<int64_t>> shuffled(rows.size());
      for (size_t i = 0; i < rows.size(); ++i) shuffled[i] = std::move(rows[p[i]]);
      rows = std::move(shuffled);
    }
    for (size_t i = 0; i < rows.size(); i += bs) {
      BatchPlan b(rows.begin() + i, rows.begin() + std::min(rows.size(), i + static_cast<size_t>(bs)));
      batches.push_back(std::move(b));
    }
  } else {
    if (o.shuffle && o.group_by_length) {
      const int64_t mega = bs * std::max<int64_t>(o.mega_batch_mult, 1);
      for (int64_t start = 0; start < n; start += mega) {
        std::stable_sort(order.begin() + start, order.begin() + std::min(n, start + mega),
                         [&](int64_t a, int64_t b) { return len(a) > len(b); });
      }
    }
    for (int64_t i = 0; i < n; i += bs) {
      BatchPlan b;
      for (int64_t j = i; j < std::min(n, i + bs); ++j) b.push_back({order[j]});
      batches.push_back(std::move(b));
    }
    if (o.shuffle && o.group_by_length) {
      auto p = permutation(static_cast<int64_t>(batches.size()), derive_seed(seed, static_cast<uint64_t>(epoch), 3));
      std::vector<BatchPlan> shuffled(batches.size());
      for (size_t i = 0; i < batches.size(); ++i) shuffled[i] = std::move(batches[p[i]]);
      batches = std::move(shuffled);
    }
  }
  if (o.drop_last && !batches.empty()) {
    // The only short batch is the last one planned before any batch shuffle; drop every short one.
    std::erase_if(batches, [&](const BatchPlan& b) { return static_cast<int64_t>(b.size()) < bs; });
  }
  if (o.world_size > 1) {
    // Same count on every rank (DDP steps in lockstep): drop the tail that does not divide evenly.
    size_t per_rank = batches.size() / static_cast<size_t>(o.world_size);
    std::vector<BatchPlan> mine;
    for (size_t k = 0; k < per_rank; ++k) mine.push_back(std::move(batches[k * o.world_size + o.rank]));
    batches = std::move(mine);
  }
  return batches;
}

}  // namespace

nlohmann::json BatchState::to_json() const {
  return {{"epoch", epoch}, {"index", index}, {"seed", seed}, {"world_size", world_size}};
}

BatchState BatchState::from_json(const nlohmann::json& j) {
  BatchState s;
  try {
    s.epoch = j.at("epoch").get<int64_t>();
    s.index = j.at("index").get<int64_t>();
    s.seed = j.at("seed").get<uint64_t>();
    s.world_size = j.value("world_size", int64_t{1});
  } catch (const nlohmann::json::exception& e) {
    fail("data loader state {} is not {{epoch, index, seed}} ({}); the checkpoint's data state is damaged", j.dump(),
         e.what());
  }
  return s;
}

Batch make_batch(const TokenizedDataset& data, const BatchPlan& rows, const BatchOptions& o) {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t T = 0;
  if (o.sample_packing) {
    T = o.sequence_len;
  } else {
    for (const auto& r : rows) {
      int64_t l = 0;
      for (int64_t i : r) l += data.length(i);
      T = std::max(T, std::min(l, o.sequence_len));
    }
    int64_t m = std::max<int64_t>(o.pad_to_multiple_of, 1);
    T = std::max<int64_t>((T + m - 1) / m * m, 1);
  }
  auto ids = torch::full({B, T}, static_cast<int64_t>(o.pad_id), torch::kInt64);
  auto labels = torch::full({B, T}, static_cast<int64_t>(kIgnoreIndex), torch::kInt64);
  auto mask = torch::zeros({B, T}, torch::kInt64);
  auto pos = torch::zeros({B, T}, torch::kInt64);
  auto seg = torch::zeros({B, T}, torch::kInt64);
  int64_t *pi = ids.data_ptr<int64_t>(), *pl = labels.data_ptr<int64_t>(), *pm = mask.data_ptr<int64_t>(),
          *pp = pos.data_ptr<int64_t>(), *ps = seg.data_ptr<int64_t>();
  Batch batch;
  batch.num_target_tokens = 0;
  batch.num_tokens = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0, segment = 0;
    for (int64_t ex : rows[b]) {
      if (t >= T) break;
      ++segment;
      auto tok = data.ids(ex);
      const uint8_t* tr = data.trained.data() + data.offsets[ex];
      int64_t n = std::min<int64_t>(static_cast<int64_t>(tok.size()), T - t);
      for (int64_t k = 0; k < n; ++k, ++t) {
        int64_t at = b * T + t;
        pi[at] = tok[k];
        pm[at] = 1;
        pp[at] = k;
        ps[at] = segment;
        if (k > 0 && tr[k]) {
          pl[at] = tok[k];
          ++batch.num_target_tokens;
        }
      }
      batch.num_tokens += n;
    }
  }
  batch.input_ids = ids;
  batch.labels = labels;
  batch.attention_mask = mask;
  batch.position_ids = pos;
  batch.segment_ids = seg;
  return batch;
}

BatchSource::BatchSource(std::shared_ptr<const TokenizedDataset> data, BatchOptions options)
    : data_(std::move(data)), options_(std::move(options)) {
  if (!data_) fail("BatchSource: no dataset");
  if (options_.batch_size < 1) fail("micro_batch_size must be >= 1 (got {})", options_.batch_size);
  if (options_.sequence_len < 1) fail("sequence_len must be >= 1 (got {})", options_.sequence_len);
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size)
    fail("BatchSource: rank {} is outside world size {}", options_.rank, options_.world_size);
  state_.seed = options_.seed;
  state_.world_size = options_.world_size;
}

void BatchSource::ensure_epoch() {
  if (planned_epoch_ == state_.epoch && planned_seed_ == state_.seed) return;
  epoch_plan_ = plan_epoch(*data_, options_, state_.seed, state_.epoch);
  planned_epoch_ = state_.epoch;
  planned_seed_ = state_.seed;
}

int64_t BatchSource::batches_per_epoch() const {
  if (planned_epoch_ >= 0) return static_cast<int64_t>(epoch_plan_.size());
  // The count does not depend on the epoch for these plans; compute once on epoch 0's layout.
  return static_cast<int64_t>(plan_epoch(*data_, options_, state_.seed, state_.epoch).size());
}

void BatchSource::set_epoch(int64_t epoch) {
  state_.epoch = epoch;
  state_.index = 0;
}

void BatchSource::set_state(const BatchState& s) {
  if (s.epoch < 0 || s.index < 0) fail("data loader state has a negative epoch/index: {}", s.to_json().dump());
  state_ = s;
  // Resuming with another number of ranks: batch k of the epoch went to rank k % world_size, so a
  // state at index i had consumed i * old_world batches; continue at the same global position.
  const int64_t old_ws = std::max<int64_t>(s.world_size, 1), new_ws = options_.world_size;
  if (old_ws != new_ws) {
    const int64_t global = s.index * old_ws;
    if (global % new_ws != 0)
      log::warn(fmt::format("data: resuming batch {} of the epoch on {} ranks (was {}); {} batch(es) are skipped to "
                            "keep the ranks in step", global, new_ws, old_ws, new_ws - global % new_ws));
    state_.index = (global + new_ws - 1) / new_ws;
    state_.world_size = new_ws;
  }
  ensure_epoch();
  if (state_.index > static_cast<int64_t>(epoch_plan_.size()))
    fail("data loader state points at batch {} of epoch {}, but the epoch has {} batches; the data or batch "
         "settings changed since the checkpoint (resume with the same recipe)",
         s.index, s.epoch, epoch_plan_.size());
}

std::optional<Batch> BatchSource::next() {
  ensure_epoch();
  if (state_.index >= static_cast<int64_t>(epoch_plan_.size())) return std::nullopt;
  Batch b = make_batch(*data_, epoch_plan_[state_.index], options_);
  ++state_.index;
  return b;
}

const BatchPlan& BatchSource::plan(int64_t batch_index) {
  ensure_epoch();
  if (batch_index < 0 || batch_index >= static_cast<int64_t>(epoch_plan_.size()))
    fail("batch {} is outside this epoch's {} batches", batch_index, epoch_plan_.size());
  return epoch_plan_[batch_index];
}

PackingStats BatchSource::packing_stats() {
  ensure_epoch();
  PackingStats s;
  for (const auto& b : epoch_plan_)
    for (const auto& r : b) {
      ++s.rows;
      int64_t l = 0;
      for (int64_t i : r) l += data_->length(i);
      s.real_tokens += std::min(l, options_.sequence_len);
    }
  s.capacity = s.rows * options_.sequence_len;
  return s;
}

int64_t BatchSource::padding_tokens() {
  ensure_epoch();
  int64_t pad = 0;
  for (const auto& b : epoch_plan_) {
    int64_t T = 0, real = 0;
    for (const auto& r : b) {
      int64_t l = 0;
      for (int64_t i : r) l += data_->length(i);
      l = std::min(l, options_.sequence_len);
      T = std::max(T, l);
      real += l;
    }
    if (options_.sample_packing) T = options_.sequence_len;
    else {
      int64_t m = std::max<int64_t>(options_.pad_to_multiple_of, 1);
      T = (T + m - 1) / m * m;
    }
    pad += T * static_cast<int64_t>(b.size()) - real;
  }
  return pad;
}

}  // namespace llmtune::data
